//! The login-failure item (`LOGINFAIL#<ip>` / `META`): the address's
//! current window. Its writes are conditional updates (`store::logins`).

use super::super::StoreError;
use super::super::item::{Item, get_n};
use crate::domain::login::LoginWindow;

/// Attribute holding when the window opened (epoch seconds).
const WINDOW_START: &str = "window_start";
/// Attribute holding the checks taken in the window.
const FAILURES: &str = "failures";

impl TryFrom<&Item> for LoginWindow {
    type Error = StoreError;

    fn try_from(item: &Item) -> Result<Self, StoreError> {
        Ok(LoginWindow {
            start: get_n(item, WINDOW_START)?,
            failures: get_n(item, FAILURES)?,
        })
    }
}
