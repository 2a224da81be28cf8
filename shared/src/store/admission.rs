//! The admission write: one conditional update of the key item that checks
//! secret, status, expiry, quota and the rate window together (or, for a
//! batch that reserves tokens, one transaction that also records the
//! reservation as pending). The rules are `domain::admission`'s, stated as
//! a DynamoDB condition by `layout::api_key::admission_update`; this module
//! runs it, and judges again what a refused write saw.

use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::builders::UpdateBuilder;
use aws_sdk_dynamodb::types::{ReturnValue, ReturnValuesOnConditionCheckFailure, Update};
use time::OffsetDateTime;

use super::item::Item;
use super::layout::api_key::admission_update;
use super::layout::owned::pending_item;
use super::{Store, StoreError, classify, conflict_pause, layout, transact_put, transact_update};
use crate::domain::admission::{
    AdmissionRefusal, BudgetCheck, Charge, KeyState, RateLimit, decide,
};
use crate::domain::flight::Flight;
use crate::domain::key::{ApiKeyRecord, KeyId, SecretHash};

/// What an admission asks of a key: the charge, under the tier's rate
/// limit and the dollar limits, at a moment.
#[derive(Debug, Clone, Copy)]
pub struct Terms<'a> {
    pub charge: Charge,
    pub rate: RateLimit,
    pub budget: BudgetCheck<'a>,
    pub now: OffsetDateTime,
}

/// Why a request was not admitted: a refusal the rules gave, or a store
/// that could not say.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    #[error(transparent)]
    Refused(#[from] AdmissionRefusal),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Store {
    /// Admits one message request (`terms.charge`: `Charge::MESSAGE`) for
    /// key `id` presenting `hash` under the tier's rate and the dollar
    /// limits `terms` names, or says why not, leaving `flight`, its trace,
    /// on the key; the first write is stated from `believed` (a cached
    /// record).
    /// Atomic: a key disabled, rotated or over quota a moment ago is refused
    /// now. Returns the key as it is after counting the request.
    pub async fn admit(
        &self,
        id: &KeyId,
        hash: &SecretHash,
        terms: Terms<'_>,
        believed: Option<&ApiKeyRecord>,
        flight: &Flight,
    ) -> Result<ApiKeyRecord, AdmissionError> {
        let first = KeyState::Unread { believed };
        let (item, _) = self
            .admit_with(id, hash, terms, first, Trace::Flight(flight))
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
    pub async fn admit_batch(
        &self,
        id: &KeyId,
        hash: &SecretHash,
        terms: Terms<'_>,
        request_id: &str,
    ) -> Result<u64, AdmissionError> {
        let first = KeyState::Unread { believed: None };
        let (_, charge) = self
            .admit_with(id, hash, terms, first, Trace::Pending(request_id))
            .await?;
        Ok(charge.reserved())
    }

    /// The admission write for `charge`: one conditional `UpdateItem` of the
    /// key item or, when it reserves tokens for the creation `pending_for`
    /// (a request id), one transaction that also records that reservation as
    /// pending. Returns the key as updated (plain updates only) and the
    /// charge as finally taken (the stored limit may have changed it).
    async fn admit_with(
        &self,
        id: &KeyId,
        hash: &SecretHash,
        terms: Terms<'_>,
        first: KeyState<'_>,
        trace: Trace<'_>,
    ) -> Result<(Option<ApiKeyRecord>, Charge), AdmissionError> {
        let Terms {
            charge,
            rate,
            budget,
            now,
        } = terms;
        let mut write = decide(first, hash, rate, charge, budget, now)?;
        for attempt in 0..6 {
            if let Trace::Flight(flight) = trace {
                write.flight = Some(flight.clone());
            }
            let update = admission_update(&write, rate, hash, now);
            let update = Update::builder()
                .table_name(self.table())
                .set_key(Some(layout::api_key(id).item()))
                .update_expression(update.expression)
                .condition_expression(update.condition)
                .set_expression_attribute_names((!update.names.is_empty()).then_some(update.names))
                .set_expression_attribute_values(Some(update.values))
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                );
            let charge = write.charge;
            let pending_for = match trace {
                Trace::Pending(request_id) if charge.reserved() > 0 => Some(request_id),
                _ => None,
            };
            let old_item = match pending_for {
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
            write = decide(
                KeyState::Stored(old.as_ref()),
                hash,
                rate,
                charge,
                budget,
                now,
            )?;
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
            .set_expression_attribute_names(update.expression_attribute_names().cloned())
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
            transact_put(self.table(), put, Some(layout::ITEM_ABSENT))?,
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

/// What an admission leaves behind so that a request that never settles
/// is still accounted for.
#[derive(Debug, Clone, Copy)]
enum Trace<'a> {
    /// A message: its trace on the key item (`domain::flight`).
    Flight(&'a Flight),
    /// A batch creation: its reservation recorded as pending under this
    /// request id (given back by the collector if the batch is never
    /// recorded).
    Pending(&'a str),
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
