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

/// A signed number (a counter that may go below zero); 0 when absent.
pub(crate) fn get_signed(item: &Item, name: &str) -> Result<i64, StoreError> {
    match item.get(name) {
        None | Some(AttributeValue::Null(_)) => Ok(0),
        Some(AttributeValue::N(value)) => value
            .parse()
            .map_err(|_| corrupt(item, name, "is not an integer")),
        Some(_) => Err(corrupt(item, name, "is not a number")),
    }
}

pub(crate) fn get_bool(item: &Item, name: &str) -> Result<bool, StoreError> {
    match item.get(name) {
        Some(AttributeValue::Bool(value)) => Ok(*value),
        Some(_) => Err(corrupt(item, name, "is not a boolean")),
        None => Err(corrupt(item, name, "is missing")),
    }
}

/// A boolean that may be absent (items written before it existed).
pub(crate) fn opt_bool(item: &Item, name: &str) -> Result<Option<bool>, StoreError> {
    match item.get(name) {
        None | Some(AttributeValue::Null(_)) => Ok(None),
        Some(AttributeValue::Bool(value)) => Ok(Some(*value)),
        Some(_) => Err(corrupt(item, name, "is not a boolean")),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::key::KeyId;
    use crate::store::layout;

    #[test]
    fn a_corrupt_attribute_names_its_item_and_attribute() {
        let key = KeyId::parse("abcdefABCDEF").unwrap();
        let mut item = layout::api_key(&key).item();
        item.insert("tokens_used".into(), s("many"));
        let err = get_n(&item, "tokens_used").unwrap_err();
        assert!(matches!(err, StoreError::Unexpected(_)));
        let text = err.to_string();
        assert!(text.contains("KEY#abcdefABCDEF / META"), "{text}");
        assert!(text.contains("`tokens_used`"), "{text}");
        let projected = Item::from([("file_id".to_owned(), n(1))]);
        assert!(get_s(&projected, "file_id").is_err());
    }

    #[test]
    fn an_operation_error_says_where_and_keeps_its_kind() {
        let err =
            StoreError::Unavailable(anyhow::anyhow!("throttled")).during("GetItem KEY#a / META");
        match err {
            StoreError::Unavailable(source) => {
                assert_eq!(format!("{source:#}"), "GetItem KEY#a / META: throttled");
            }
            other => panic!("{other:?}"),
        }
    }
}
