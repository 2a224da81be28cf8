//! Failed admin logins per source IP (`LOGINFAIL#<ip>` / `META`), shared by
//! every Lambda instance so the lockout holds across them.

use std::net::IpAddr;

use aws_sdk_dynamodb::types::ReturnValue;

use super::item::{get_n, n, s};
use super::{Store, StoreError, TTL_ATTRIBUTE, classify};

/// Failures allowed per window before logins from that IP are refused.
pub const MAX_LOGIN_FAILURES: u64 = 5;
/// The window, counted from the first failure.
pub const LOGIN_WINDOW_SECS: u64 = 15 * 60;

fn pk(ip: IpAddr) -> String {
    format!("LOGINFAIL#{ip}")
}

impl Store {
    /// Seconds until logins from `ip` are accepted again, if it is locked out.
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

    /// Counts a failed login: adds to the current window, or starts a new
    /// one if the last has passed. Both steps are conditional, so concurrent
    /// failures are neither lost nor double-reset.
    pub async fn record_login_failure(&self, ip: IpAddr, now: u64) -> Result<(), StoreError> {
        let cutoff = now.saturating_sub(LOGIN_WINDOW_SECS);
        for _ in 0..3 {
            let added = self
                .client
                .update_item()
                .table_name(self.table())
                .key("pk", s(pk(ip)))
                .key("sk", s("META"))
                .update_expression("ADD failures :one")
                .condition_expression("window_start > :cutoff")
                .expression_attribute_values(":one", n(1))
                .expression_attribute_values(":cutoff", n(cutoff))
                .return_values(ReturnValue::None)
                .send()
                .await;
            match added {
                Ok(_) => return Ok(()),
                Err(err)
                    if !err
                        .as_service_error()
                        .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
                {
                    return Err(classify(err));
                }
                Err(_) => {}
            }
            let started = self
                .client
                .update_item()
                .table_name(self.table())
                .key("pk", s(pk(ip)))
                .key("sk", s("META"))
                .update_expression("SET failures = :one, window_start = :now, #ttl = :ttl")
                .condition_expression(
                    "attribute_not_exists(window_start) OR window_start <= :cutoff",
                )
                .expression_attribute_names("#ttl", TTL_ATTRIBUTE)
                .expression_attribute_values(":one", n(1))
                .expression_attribute_values(":now", n(now))
                .expression_attribute_values(":cutoff", n(cutoff))
                .expression_attribute_values(":ttl", n(now + LOGIN_WINDOW_SECS))
                .send()
                .await;
            match started {
                Ok(_) => return Ok(()),
                Err(err)
                    if !err
                        .as_service_error()
                        .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
                {
                    return Err(classify(err));
                }
                // Someone else started the window meanwhile: add to it.
                Err(_) => {}
            }
        }
        Err(StoreError::Unexpected(anyhow::anyhow!(
            "login failure counter kept changing under us"
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
