//! The admission write: one conditional update of the key item that checks
//! secret, status, expiry, quota and the rate window together (or, for a
//! batch that reserves tokens, one transaction that also records the
//! reservation as pending). The rules are `domain::admission`'s; this
//! module states them as a DynamoDB condition and runs it.

use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::builders::UpdateBuilder;
use aws_sdk_dynamodb::types::{
    AttributeValue, ReturnValue, ReturnValuesOnConditionCheckFailure, Update,
};
use time::OffsetDateTime;

use super::item::{Item, n, s};
use super::layout::owned::pending_item;
use super::{Store, StoreError, classify, conflict_pause, layout, transact_put, transact_update};
use crate::domain::admission::{
    AdmissionRefusal, AdmissionWrite, Charge, KeyState, QuotaRule, RateLimit, WindowStep, decide,
};
use crate::domain::format_timestamp;
use crate::domain::key::{ApiKeyRecord, KeyId, SecretHash};

/// Why a request was not admitted: a refusal the rules gave, or a store
/// that could not say.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    #[error(transparent)]
    Refused(#[from] AdmissionRefusal),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The secret and status checks of `domain::admission::decide` (secret,
/// then `key_status`), as a condition on the stored key item.
const KEY_CHECKS: &str = "attribute_exists(pk) AND secret_hash = :h AND is_active = :t \
     AND (attribute_not_exists(expires_at) OR expires_at > :now)";

/// The admission update of the key item: expression, condition, values.
fn admission_update(
    write: &AdmissionWrite,
    rate: RateLimit,
    hash: &SecretHash,
    now: OffsetDateTime,
) -> (String, String, Item) {
    let charge = &write.charge;
    let mut values = Item::from([
        (":h".to_owned(), s(hash.to_hex())),
        (":t".to_owned(), AttributeValue::Bool(true)),
        (":now".to_owned(), s(format_timestamp(now))),
        (":n".to_owned(), n(charge.requests)),
    ]);
    let (mut expression, window_condition) = match write.step {
        WindowStep::Same(w) => {
            values.insert(":w".into(), n(w));
            // rl_count + requests <= limit, without arithmetic in a condition.
            values.insert(
                ":room".into(),
                n(rate.requests.saturating_sub(charge.requests)),
            );
            (
                "SET rl_count = rl_count + :n".to_owned(),
                "rl_window = :w AND rl_count <= :room",
            )
        }
        WindowStep::New(w) => {
            values.insert(":w".into(), n(w));
            (
                "SET rl_window = :w, rl_count = :n".to_owned(),
                "(attribute_not_exists(rl_window) OR rl_window < :w)",
            )
        }
    };
    // `domain::admission::quota_admits`, stated on the stored attributes.
    let quota_condition = match charge.quota {
        QuotaRule::AnyLeft => {
            "(attribute_not_exists(token_limit) OR tokens_used < token_limit)".to_owned()
        }
        QuotaRule::Reserve { limit: None, .. } => "attribute_not_exists(token_limit)".to_owned(),
        QuotaRule::Reserve {
            limit: Some(token_limit),
            tokens,
        } => {
            values.insert(":tl".into(), n(token_limit));
            // tokens_used + tokens <= token_limit, stated on the stored
            // limit; negative when the worst case exceeds the whole limit,
            // so the write fails and the decision says by how much.
            let ceiling = i128::from(token_limit) - i128::from(tokens);
            values.insert(":ceiling".into(), n(ceiling));
            values.insert(":r".into(), n(tokens));
            expression.push_str(" ADD tokens_used :r, tokens_reserved :r");
            "token_limit = :tl AND tokens_used <= :ceiling".to_owned()
        }
    };
    let condition = format!("{KEY_CHECKS} AND {quota_condition} AND {window_condition}");
    (expression, condition, values)
}

impl Store {
    /// Admits one message request for key `id` presenting `hash` under a
    /// tier of `limit` requests per `period` seconds, or says why not.
    /// Atomic: a key disabled, rotated or over quota a moment ago is refused
    /// now. Returns the key as it is after counting the request.
    pub async fn admit(
        &self,
        id: &KeyId,
        hash: &SecretHash,
        limit: u64,
        period: u64,
        now: OffsetDateTime,
        last_seen_window: Option<u64>,
    ) -> Result<ApiKeyRecord, AdmissionError> {
        let rate = RateLimit {
            requests: limit,
            period,
        };
        let first = KeyState::Unread {
            last_window: last_seen_window,
        };
        let (item, _) = self
            .admit_with(id, hash, Charge::MESSAGE, rate, now, first, None)
            .await?;
        item.ok_or_else(|| {
            StoreError::Unexpected(anyhow::anyhow!("admission returned no item")).into()
        })
    }

    /// Admits a batch of `charge.requests` requests: counted in the tier's
    /// window and, on a limited key, its worst case reserved against the
    /// quota in the same transaction that records the reservation as
    /// pending (a creation that dies before its batch is recorded gives the
    /// tokens back, through the collector). Returns the tokens reserved.
    #[allow(clippy::too_many_arguments)]
    pub async fn admit_batch(
        &self,
        id: &KeyId,
        hash: &SecretHash,
        charge: Charge,
        limit: u64,
        period: u64,
        now: OffsetDateTime,
        request_id: &str,
    ) -> Result<u64, AdmissionError> {
        let rate = RateLimit {
            requests: limit,
            period,
        };
        let first = KeyState::Unread { last_window: None };
        let (_, charge) = self
            .admit_with(id, hash, charge, rate, now, first, Some(request_id))
            .await?;
        Ok(charge.reserved())
    }

    /// The admission write for `charge`: one conditional `UpdateItem` of the
    /// key item or, when it reserves tokens for the creation `pending_for`
    /// (a request id), one transaction that also records that reservation as
    /// pending. Returns the key as updated (plain updates only) and the
    /// charge as finally taken (the stored limit may have changed it).
    #[allow(clippy::too_many_arguments)]
    async fn admit_with(
        &self,
        id: &KeyId,
        hash: &SecretHash,
        charge: Charge,
        rate: RateLimit,
        now: OffsetDateTime,
        first: KeyState<'_>,
        pending_for: Option<&str>,
    ) -> Result<(Option<ApiKeyRecord>, Charge), AdmissionError> {
        let mut write = decide(first, hash, rate, charge, now)?;
        for attempt in 0..6 {
            let (expression, condition, values) = admission_update(&write, rate, hash, now);
            let update = Update::builder()
                .table_name(self.table())
                .set_key(Some(layout::api_key(id).item()))
                .update_expression(expression)
                .condition_expression(condition)
                .set_expression_attribute_values(Some(values))
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                );
            let charge = write.charge;
            let old_item = match pending_for.filter(|_| charge.reserved() > 0) {
                None => match self.admit_update(update).await? {
                    Ok(item) => return Ok((Some(ApiKeyRecord::try_from(&item)?), charge)),
                    Err(old) => old,
                },
                Some(request_id) => {
                    let pending = pending_item(id, request_id, charge.reserved(), now);
                    match self.admit_transaction(update, pending).await? {
                        Ok(()) => return Ok((None, charge)),
                        Err(old) => old,
                    }
                }
            };
            let Some(old_item) = old_item.or_conflict() else {
                // A settle transaction holds the item for a moment.
                conflict_pause(attempt).await;
                continue;
            };
            let old = old_item.as_ref().map(ApiKeyRecord::try_from).transpose()?;
            write = decide(KeyState::Stored(old.as_ref()), hash, rate, charge, now)?;
        }
        Err(StoreError::Unavailable(anyhow::anyhow!(
            "admission of {} kept conflicting",
            layout::api_key(id)
        ))
        .into())
    }

    /// Runs the admission update alone: the new item, or why it failed.
    async fn admit_update(
        &self,
        update: UpdateBuilder,
    ) -> Result<Result<Item, Refused>, StoreError> {
        let update = update.build()?;
        let key = layout::ItemKey::of(update.key())
            .map_or_else(|| "of the key".to_owned(), |key| key.to_string());
        let result = self
            .client
            .update_item()
            .table_name(update.table_name())
            .set_key(Some(update.key().clone()))
            .update_expression(update.update_expression())
            .set_condition_expression(update.condition_expression().map(str::to_owned))
            .set_expression_attribute_values(update.expression_attribute_values().cloned())
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match result {
            Ok(output) => output.attributes.map(Ok).ok_or_else(|| {
                StoreError::Unexpected(anyhow::anyhow!("admission returned no item"))
            }),
            Err(err) => match err.as_service_error() {
                Some(UpdateItemError::ConditionalCheckFailedException(failed)) => {
                    Ok(Err(Refused::Condition(failed.item.clone())))
                }
                Some(UpdateItemError::TransactionConflictException(_)) => {
                    Ok(Err(Refused::Conflict))
                }
                _ => Err(classify(err).during(format!("admission UpdateItem {key}"))),
            },
        }
    }

    /// Runs the admission update and `put` in one transaction.
    async fn admit_transaction(
        &self,
        update: UpdateBuilder,
        put: Item,
    ) -> Result<Result<(), Refused>, StoreError> {
        let items = vec![
            transact_update(update)?,
            transact_put(self.table(), put, Some("attribute_not_exists(pk)"))?,
        ];
        Ok(match self.transact(items).await? {
            Ok(()) => Ok(()),
            Err(canceled) if canceled.failed(0) => Err(Refused::Condition(canceled.item(0))),
            Err(canceled) if canceled.transient() => Err(Refused::Conflict),
            Err(canceled) => {
                return Err(StoreError::Unexpected(anyhow::anyhow!(
                    "admission: {canceled:?}"
                )));
            }
        })
    }
}

/// Why an admission write did not apply.
enum Refused {
    /// Its condition failed; the item as it was (`None`: no such item).
    Condition(Option<Item>),
    /// Another write held the item; try again.
    Conflict,
}

impl Refused {
    /// `Some(old item)` for a failed condition, `None` for a conflict.
    fn or_conflict(self) -> Option<Option<Item>> {
        match self {
            Refused::Condition(item) => Some(item),
            Refused::Conflict => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::key::PresentedKey;

    fn number(values: &Item, name: &str) -> String {
        match &values[name] {
            AttributeValue::N(n) => n.clone(),
            other => panic!("{other:?}"),
        }
    }

    const RATE: RateLimit = RateLimit {
        requests: 10,
        period: 60,
    };

    #[test]
    fn a_reservation_is_added_in_the_admission_write_and_bounded_by_the_limit() {
        let hash = PresentedKey::generate().hash();
        let charge = Charge {
            requests: 3,
            quota: QuotaRule::Reserve {
                limit: Some(1000),
                tokens: 400,
            },
        };
        let now = crate::domain::now();
        let write = AdmissionWrite {
            step: WindowStep::Same(60),
            charge,
        };
        let (expression, condition, values) = admission_update(&write, RATE, &hash, now);
        assert!(expression.contains("ADD tokens_used :r, tokens_reserved :r"));
        assert!(condition.contains("token_limit = :tl AND tokens_used <= :ceiling"));
        assert_eq!(number(&values, ":ceiling"), "600");
        assert_eq!(
            number(&values, ":room"),
            "7",
            "3 more requests fit under 10"
        );
        // A worst case over the whole limit can never pass the condition.
        let too_big = AdmissionWrite {
            step: WindowStep::New(60),
            charge: Charge {
                requests: 1,
                quota: QuotaRule::Reserve {
                    limit: Some(100),
                    tokens: 500,
                },
            },
        };
        let (_, _, values) = admission_update(&too_big, RATE, &hash, now);
        assert_eq!(number(&values, ":ceiling"), "-400");
        // Messages reserve nothing and need only some quota left.
        let message = AdmissionWrite {
            step: WindowStep::New(60),
            charge: Charge::MESSAGE,
        };
        let (expression, condition, _) = admission_update(&message, RATE, &hash, now);
        assert!(!expression.contains("ADD"));
        assert!(condition.contains("tokens_used < token_limit"));
    }
}
