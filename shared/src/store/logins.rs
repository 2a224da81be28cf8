//! Admin password checks per source IP (one item each, see `layout`), shared
//! by every Lambda instance so the lockout holds across them and across
//! concurrent requests.
//!
//! The item holds when the window opened and the password checks taken in
//! it (its attributes and the expressions on them: `layout::login`). A check's slot is taken before
//! bcrypt runs, so a check still running counts too; a successful login
//! deletes the item, which forgives every check before it. The policy
//! (how many checks, how long a window) is `domain::login`'s.

use std::net::IpAddr;

use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::ReturnValuesOnConditionCheckFailure;

use super::item::n;
use super::{Store, StoreError, classify, layout};
use crate::domain::login::{
    LoginWindow, MAX_LOGIN_FAILURES, SlotStep, locked_for, slot_step, window_cutoff, window_end,
};

/// Enough for the races that can happen (a window opened, expired or
/// cleared by a success between two writes); each turn is one write.
const SLOT_ATTEMPTS: usize = 4;

impl Store {
    /// Seconds until logins from `ip` are accepted again, if it is locked
    /// out. A read only: it takes no check slot (see `take_login_check`).
    pub async fn login_lockout(&self, ip: IpAddr, now: u64) -> Result<Option<u64>, StoreError> {
        let output = self
            .client
            .get_item()
            .table_name(self.table())
            .set_key(Some(layout::login(ip).item()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|err| classify(err).during(format!("GetItem {}", layout::login(ip))))?;
        let window = output
            .item
            .as_ref()
            .map(LoginWindow::try_from)
            .transpose()?;
        Ok(locked_for(window, now))
    }

    /// Takes one of the `MAX_LOGIN_FAILURES` password checks `ip` gets per
    /// window, before the check runs. `Ok(None)`: the slot is taken, check
    /// the password; `Ok(Some(seconds))`: no slot is left, and logins from
    /// `ip` are refused for that long (as `login_lockout` says).
    ///
    /// Atomic: a slot is taken by one conditional UpdateItem (count below
    /// the limit in the current window, or open a new window), so however
    /// many requests arrive at once, at most `MAX_LOGIN_FAILURES` checks run
    /// per window. A refused write returns the item it saw, which tells a
    /// lockout from a window that needs opening. The slot stays taken
    /// whatever the password: `clear_login_failures` gives them all back
    /// after a success.
    pub async fn take_login_check(&self, ip: IpAddr, now: u64) -> Result<Option<u64>, StoreError> {
        let cutoff = window_cutoff(now);
        // A success deletes the item, so most logins find none.
        let mut step = SlotStep::Open;
        for _ in 0..SLOT_ATTEMPTS {
            let request = self
                .client
                .update_item()
                .table_name(self.table())
                .set_key(Some(layout::login(ip).item()))
                .expression_attribute_values(":one", n(1))
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                );
            let request = match step {
                SlotStep::Open => request
                    .update_expression(layout::login::OPEN_WINDOW)
                    .condition_expression(layout::login::WINDOW_EXPIRED)
                    .expression_attribute_names(layout::login::TTL_NAME, layout::TTL_ATTRIBUTE)
                    .expression_attribute_values(":now", n(now))
                    .expression_attribute_values(":cutoff", n(cutoff))
                    .expression_attribute_values(":ttl", n(window_end(now))),
                // The window must be the one seen: if it was cleared or
                // reopened meanwhile, this write is refused and judged again.
                SlotStep::Add { window_start } => request
                    .update_expression(layout::login::ADD_CHECK)
                    .condition_expression(layout::login::SAME_WINDOW_BELOW_MAX)
                    .expression_attribute_values(":start", n(window_start))
                    .expression_attribute_values(":max", n(MAX_LOGIN_FAILURES)),
            };
            let err = match request.send().await {
                Ok(_) => return Ok(None),
                Err(err) => err,
            };
            let seen = match err.as_service_error() {
                Some(UpdateItemError::ConditionalCheckFailedException(failed)) => {
                    failed.item.clone()
                }
                _ => {
                    return Err(classify(err).during(format!("UpdateItem {}", layout::login(ip))));
                }
            };
            step = match slot_step(seen.as_ref().map(LoginWindow::try_from).transpose()?, now) {
                Ok(step) => step,
                Err(wait) => return Ok(Some(wait)),
            };
        }
        Err(StoreError::Unavailable(anyhow::anyhow!(
            "login check counter {} kept changing under us",
            layout::login(ip)
        )))
    }

    /// A successful login forgives earlier failures from that IP.
    pub async fn clear_login_failures(&self, ip: IpAddr) -> Result<(), StoreError> {
        self.client
            .delete_item()
            .table_name(self.table())
            .set_key(Some(layout::login(ip).item()))
            .send()
            .await
            .map_err(|err| classify(err).during(format!("DeleteItem {}", layout::login(ip))))?;
        Ok(())
    }
}
