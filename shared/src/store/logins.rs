//! Admin password checks per source IP (`LOGINFAIL#<ip>` / `META`), shared
//! by every Lambda instance so the lockout holds across them and across
//! concurrent requests.
//!
//! The item holds `window_start` (when the window opened) and `failures`:
//! the password checks taken in the window. A check's slot is taken before
//! bcrypt runs, so a check still running counts too; a successful login
//! deletes the item, which forgives every check before it.

use std::net::IpAddr;

use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::ReturnValuesOnConditionCheckFailure;

use super::item::{get_n, n, s};
use super::{Store, StoreError, TTL_ATTRIBUTE, classify};

/// Password checks allowed per address per window; further logins are
/// refused (429) until the window ends.
pub const MAX_LOGIN_FAILURES: u64 = 5;
/// The window, counted from its first check.
pub const LOGIN_WINDOW_SECS: u64 = 15 * 60;

/// Enough for the races that can happen (a window opened, expired or
/// cleared by a success between two writes); each turn is one write.
const SLOT_ATTEMPTS: usize = 4;

fn pk(ip: IpAddr) -> String {
    format!("LOGINFAIL#{ip}")
}

/// Which conditional write to try for a slot, judged from the item as the
/// last refused write returned it. A wrong guess costs one more round trip,
/// never an extra check.
#[derive(Debug, Clone, Copy)]
enum SlotStep {
    /// No window, or only an expired one: open a new window holding this check.
    Open,
    /// Count this check in the window opened at `window_start`.
    Add { window_start: u64 },
}

impl Store {
    /// Seconds until logins from `ip` are accepted again, if it is locked
    /// out. A read only: it takes no check slot (see `take_login_check`).
    pub async fn login_lockout(&self, ip: IpAddr, now: u64) -> Result<Option<u64>, StoreError> {
        let output = self
            .client
            .get_item()
            .table_name(self.table())
            .key("pk", s(pk(ip)))
            .key("sk", s("META"))
            .consistent_read(true)
            .send()
            .await
            .map_err(classify)?;
        let Some(item) = output.item else {
            return Ok(None);
        };
        let failures = get_n(&item, "failures")?;
        let window_end = get_n(&item, "window_start")? + LOGIN_WINDOW_SECS;
        Ok((failures >= MAX_LOGIN_FAILURES && window_end > now).then(|| window_end - now))
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
        let cutoff = now.saturating_sub(LOGIN_WINDOW_SECS);
        // A success deletes the item, so most logins find none.
        let mut step = SlotStep::Open;
        for _ in 0..SLOT_ATTEMPTS {
            let request = self
                .client
                .update_item()
                .table_name(self.table())
                .key("pk", s(pk(ip)))
                .key("sk", s("META"))
                .expression_attribute_values(":one", n(1))
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                );
            let request = match step {
                SlotStep::Open => request
                    .update_expression("SET failures = :one, window_start = :now, #ttl = :ttl")
                    .condition_expression(
                        "attribute_not_exists(window_start) OR window_start <= :cutoff",
                    )
                    .expression_attribute_names("#ttl", TTL_ATTRIBUTE)
                    .expression_attribute_values(":now", n(now))
                    .expression_attribute_values(":cutoff", n(cutoff))
                    .expression_attribute_values(":ttl", n(now + LOGIN_WINDOW_SECS)),
                // The window must be the one seen: if it was cleared or
                // reopened meanwhile, this write is refused and judged again.
                SlotStep::Add { window_start } => request
                    .update_expression("ADD failures :one")
                    .condition_expression("window_start = :start AND failures < :max")
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
                _ => return Err(classify(err)),
            };
            step = match seen {
                // Cleared by a success since the last write.
                None => SlotStep::Open,
                Some(item) => {
                    let window_start = get_n(&item, "window_start")?;
                    let failures = get_n(&item, "failures")?;
                    if window_start <= cutoff {
                        SlotStep::Open
                    } else if failures >= MAX_LOGIN_FAILURES {
                        return Ok(Some((window_start + LOGIN_WINDOW_SECS).saturating_sub(now)));
                    } else {
                        SlotStep::Add { window_start }
                    }
                }
            };
        }
        Err(StoreError::Unavailable(anyhow::anyhow!(
            "login check counter kept changing under us"
        )))
    }

    /// A successful login forgives earlier failures from that IP.
    pub async fn clear_login_failures(&self, ip: IpAddr) -> Result<(), StoreError> {
        self.client
            .delete_item()
            .table_name(self.table())
            .key("pk", s(pk(ip)))
            .key("sk", s("META"))
            .send()
            .await
            .map_err(classify)?;
        Ok(())
    }
}
