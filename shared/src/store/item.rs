//! Reading and writing typed values in DynamoDB items, with errors that name
//! the attribute (a corrupt item is a bug worth a clear log line).

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;

use super::StoreError;

pub(crate) type Item = HashMap<String, AttributeValue>;

/// A stored attribute the relay cannot read: names the item (its key, when
/// the item holds it) and the attribute.
pub(crate) fn corrupt(item: &Item, name: &str, what: &str) -> StoreError {
    let at = super::layout::ItemKey::of(item)
        .map_or_else(|| "an item".to_owned(), |key| format!("item {key}"));
    StoreError::Unexpected(anyhow::anyhow!("stored {at}: attribute `{name}` {what}"))
}

/// A stored attribute of the right type whose value makes no sense.
pub(crate) fn invalid(item: &Item, name: &str) -> StoreError {
    corrupt(item, name, "holds an invalid value")
}

pub(crate) fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

pub(crate) fn n(value: impl ToString) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

pub(crate) fn list(values: &[String]) -> AttributeValue {
    AttributeValue::L(values.iter().map(|v| s(v.clone())).collect())
}

pub(crate) fn get_s<'a>(item: &'a Item, name: &str) -> Result<&'a str, StoreError> {
    match item.get(name) {
        Some(AttributeValue::S(value)) => Ok(value),
        Some(_) => Err(corrupt(item, name, "is not a string")),
        None => Err(corrupt(item, name, "is missing")),
    }
}

pub(crate) fn opt_s<'a>(item: &'a Item, name: &str) -> Result<Option<&'a str>, StoreError> {
    match item.get(name) {
        None | Some(AttributeValue::Null(_)) => Ok(None),
        Some(_) => get_s(item, name).map(Some),
    }
}

pub(crate) fn opt_n(item: &Item, name: &str) -> Result<Option<u64>, StoreError> {
    match item.get(name) {
        None | Some(AttributeValue::Null(_)) => Ok(None),
        Some(AttributeValue::N(value)) => value
            .parse()
            .map(Some)
            .map_err(|_| corrupt(item, name, "is not a non-negative integer")),
        Some(_) => Err(corrupt(item, name, "is not a number")),
    }
}

pub(crate) fn get_n(item: &Item, name: &str) -> Result<u64, StoreError> {
    opt_n(item, name).map(Option::unwrap_or_default)
}

pub(crate) fn get_bool(item: &Item, name: &str) -> Result<bool, StoreError> {
    match item.get(name) {
        Some(AttributeValue::Bool(value)) => Ok(*value),
        Some(_) => Err(corrupt(item, name, "is not a boolean")),
        None => Err(corrupt(item, name, "is missing")),
    }
}

pub(crate) fn get_list(item: &Item, name: &str) -> Result<Vec<String>, StoreError> {
    match item.get(name) {
        None | Some(AttributeValue::Null(_)) => Ok(Vec::new()),
        Some(AttributeValue::L(values)) => values
            .iter()
            .map(|v| match v {
                AttributeValue::S(text) => Ok(text.clone()),
                _ => Err(corrupt(item, name, "holds a non-string entry")),
            })
            .collect(),
        Some(_) => Err(corrupt(item, name, "is not a list")),
    }
}
