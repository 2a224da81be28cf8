//! The login-failure item (`LOGINFAIL#<ip>` / `META`): the address's
//! current window, and the conditional updates `store::logins` takes a
//! check slot with. Each update also uses `:one` (one check).

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

/// Opens a new window holding one check (`:one`), opened `:now`, expiring
/// at `:ttl` (through the `#ttl` placeholder: `ttl` is a reserved word).
pub(crate) const OPEN_WINDOW: &str = "SET failures = :one, window_start = :now, #ttl = :ttl";
/// The `#ttl` placeholder of [`OPEN_WINDOW`], standing for `TTL_ATTRIBUTE`.
pub(crate) const TTL_NAME: &str = "#ttl";
/// Condition of [`OPEN_WINDOW`]: no window, or one opened at or before
/// `:cutoff`.
pub(crate) const WINDOW_EXPIRED: &str =
    "attribute_not_exists(window_start) OR window_start <= :cutoff";
/// Takes one more check (`:one`) in the current window.
pub(crate) const ADD_CHECK: &str = "ADD failures :one";
/// Condition of [`ADD_CHECK`]: the window opened at `:start` is still the
/// current one, and holds fewer than `:max` checks.
pub(crate) const SAME_WINDOW_BELOW_MAX: &str = "window_start = :start AND failures < :max";
