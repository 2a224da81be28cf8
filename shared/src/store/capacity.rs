//! The capacity units DynamoDB charges for the relay's calls, for `make
//! bench`: an SDK interceptor that asks every call for its consumed capacity
//! (`ReturnConsumedCapacity=TOTAL`) and sums the answers. Installed only
//! when `relay-local` runs with `RELAY_DEBUG_STATS=1`: production requests
//! never ask, so they stay exactly as they are.

use std::sync::{Arc, Mutex, PoisonError};

use aws_sdk_dynamodb::config::interceptors::{
    AfterDeserializationInterceptorContextRef, BeforeSerializationInterceptorContextMut,
};
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_dynamodb::error::BoxError;
use aws_sdk_dynamodb::operation::batch_get_item::{BatchGetItemInput, BatchGetItemOutput};
use aws_sdk_dynamodb::operation::batch_write_item::{BatchWriteItemInput, BatchWriteItemOutput};
use aws_sdk_dynamodb::operation::delete_item::{DeleteItemInput, DeleteItemOutput};
use aws_sdk_dynamodb::operation::get_item::{GetItemInput, GetItemOutput};
use aws_sdk_dynamodb::operation::put_item::{PutItemInput, PutItemOutput};
use aws_sdk_dynamodb::operation::query::{QueryInput, QueryOutput};
use aws_sdk_dynamodb::operation::scan::{ScanInput, ScanOutput};
use aws_sdk_dynamodb::operation::transact_get_items::{
    TransactGetItemsInput, TransactGetItemsOutput,
};
use aws_sdk_dynamodb::operation::transact_write_items::{
    TransactWriteItemsInput, TransactWriteItemsOutput,
};
use aws_sdk_dynamodb::operation::update_item::{UpdateItemInput, UpdateItemOutput};
use aws_sdk_dynamodb::types::{ConsumedCapacity, ReturnConsumedCapacity};
use aws_smithy_runtime_api::client::interceptors::context::{Input, Output};

/// Read and write capacity units consumed so far.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct CapacityUnits {
    pub read: f64,
    pub write: f64,
}

/// Whether an operation reads or writes: DynamoDB Local (and DynamoDB for
/// most calls) reports only `CapacityUnits`, which count as the
/// operation's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
}

impl CapacityUnits {
    /// Adds one reported figure: its read/write split when DynamoDB gives
    /// one, else its total as the operation's kind.
    fn add(&mut self, consumed: &ConsumedCapacity, kind: Kind) {
        let (read, write) = (consumed.read_capacity_units, consumed.write_capacity_units);
        if read.is_some() || write.is_some() {
            self.read += read.unwrap_or(0.0);
            self.write += write.unwrap_or(0.0);
            return;
        }
        let total = consumed.capacity_units.unwrap_or(0.0);
        match kind {
            Kind::Read => self.read += total,
            Kind::Write => self.write += total,
        }
    }
}

/// The interceptor: asks, then sums. Only in debug runs, so a mutex (one
/// short lock per call) is cheap enough.
#[derive(Debug, Default, Clone)]
pub(crate) struct CapacityCounter(Arc<Mutex<CapacityUnits>>);

impl CapacityCounter {
    pub(crate) fn total(&self) -> CapacityUnits {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Sets `ReturnConsumedCapacity=TOTAL` on the input of every operation that
/// accepts it; others (CreateTable, DescribeTable…) pass unchanged.
fn ask_for_capacity(input: &mut Input) {
    macro_rules! ask {
        ($($input:ty),*) => {$(
            if let Some(input) = input.downcast_mut::<$input>() {
                input.return_consumed_capacity = Some(ReturnConsumedCapacity::Total);
                return;
            }
        )*};
    }
    ask!(
        GetItemInput,
        PutItemInput,
        UpdateItemInput,
        DeleteItemInput,
        QueryInput,
        ScanInput,
        BatchGetItemInput,
        BatchWriteItemInput,
        TransactGetItemsInput,
        TransactWriteItemsInput
    );
}

/// The capacity an operation's output reports, with the operation's kind;
/// `None` for outputs that report none.
fn reported(output: &Output) -> Option<(Kind, &[ConsumedCapacity])> {
    macro_rules! one {
        ($($output:ty => $kind:expr),*) => {$(
            if let Some(output) = output.downcast_ref::<$output>() {
                return Some(($kind, output.consumed_capacity().map(std::slice::from_ref).unwrap_or_default()));
            }
        )*};
    }
    macro_rules! many {
        ($($output:ty => $kind:expr),*) => {$(
            if let Some(output) = output.downcast_ref::<$output>() {
                return Some(($kind, output.consumed_capacity()));
            }
        )*};
    }
    one!(
        GetItemOutput => Kind::Read,
        QueryOutput => Kind::Read,
        ScanOutput => Kind::Read,
        PutItemOutput => Kind::Write,
        UpdateItemOutput => Kind::Write,
        DeleteItemOutput => Kind::Write
    );
    many!(
        BatchGetItemOutput => Kind::Read,
        TransactGetItemsOutput => Kind::Read,
        BatchWriteItemOutput => Kind::Write,
        TransactWriteItemsOutput => Kind::Write
    );
    None
}

impl Intercept for CapacityCounter {
    fn name(&self) -> &'static str {
        "CapacityCounter"
    }

    fn modify_before_serialization(
        &self,
        context: &mut BeforeSerializationInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        ask_for_capacity(context.input_mut());
        Ok(())
    }

    /// Successful calls only: DynamoDB's error answers (a failed condition,
    /// a canceled transaction) carry no consumed capacity, though DynamoDB
    /// charges for them.
    fn read_after_deserialization(
        &self,
        context: &AfterDeserializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Ok(output) = context.output_or_error()
            && let Some((kind, consumed)) = reported(output)
        {
            let mut total = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            for one in consumed {
                total.add(one, kind);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total_of(output: Output) -> CapacityUnits {
        let mut total = CapacityUnits::default();
        if let Some((kind, consumed)) = reported(&output) {
            for one in consumed {
                total.add(one, kind);
            }
        }
        total
    }

    fn units(total: f64) -> ConsumedCapacity {
        ConsumedCapacity::builder().capacity_units(total).build()
    }

    #[test]
    fn every_item_operation_is_asked_for_its_total_capacity() {
        let mut get = Input::erase(GetItemInput::builder().build().unwrap());
        let mut transact = Input::erase(TransactWriteItemsInput::builder().build().unwrap());
        ask_for_capacity(&mut get);
        ask_for_capacity(&mut transact);
        assert_eq!(
            get.downcast_ref::<GetItemInput>()
                .unwrap()
                .return_consumed_capacity,
            Some(ReturnConsumedCapacity::Total)
        );
        assert_eq!(
            transact
                .downcast_ref::<TransactWriteItemsInput>()
                .unwrap()
                .return_consumed_capacity,
            Some(ReturnConsumedCapacity::Total)
        );
    }

    #[test]
    fn a_bare_total_counts_as_the_operations_kind() {
        // DynamoDB Local's answers: only CapacityUnits.
        let read = total_of(Output::erase(
            GetItemOutput::builder()
                .consumed_capacity(units(0.5))
                .build(),
        ));
        let write = total_of(Output::erase(
            UpdateItemOutput::builder()
                .consumed_capacity(units(3.0))
                .build(),
        ));
        assert_eq!(
            read,
            CapacityUnits {
                read: 0.5,
                write: 0.0
            }
        );
        assert_eq!(
            write,
            CapacityUnits {
                read: 0.0,
                write: 3.0
            }
        );
    }

    #[test]
    fn a_list_of_capacities_is_summed() {
        // One entry per table of a transaction: 2 + 4 WCU.
        let transact = TransactWriteItemsOutput::builder()
            .consumed_capacity(units(2.0))
            .consumed_capacity(units(4.0))
            .build();
        assert_eq!(
            total_of(Output::erase(transact)),
            CapacityUnits {
                read: 0.0,
                write: 6.0
            }
        );
    }

    #[test]
    fn a_read_write_split_wins_over_the_total() {
        // A transaction whose condition check reads: DynamoDB may split.
        let split = ConsumedCapacity::builder()
            .capacity_units(5.0)
            .read_capacity_units(1.0)
            .write_capacity_units(4.0)
            .build();
        let transact = TransactWriteItemsOutput::builder()
            .consumed_capacity(split)
            .build();
        assert_eq!(
            total_of(Output::erase(transact)),
            CapacityUnits {
                read: 1.0,
                write: 4.0
            }
        );
    }

    #[test]
    fn outputs_without_capacity_add_nothing() {
        let no_capacity = GetItemOutput::builder().build();
        assert_eq!(
            total_of(Output::erase(no_capacity)),
            CapacityUnits::default()
        );
        assert!(reported(&Output::erase(String::new())).is_none());
    }
}
