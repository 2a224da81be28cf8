//! The table definition, read from the `RelayTable` resource of template.yaml
//! so that AWS, the local stack and the tests create exactly the same table.

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection,
    ProjectionType, ScalarAttributeType, TimeToLiveSpecification,
};
use serde::Deserialize;

use super::{StoreError, classify};

const TEMPLATE: &str = include_str!("../../../template.yaml");
const TABLE_RESOURCE: &str = "RelayTable";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TableDefinition {
    pub attribute_definitions: Vec<AttributeDef>,
    pub key_schema: Vec<KeyDef>,
    #[serde(default)]
    pub global_secondary_indexes: Vec<IndexDef>,
    pub time_to_live_specification: Option<TtlDef>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AttributeDef {
    pub attribute_name: String,
    pub attribute_type: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct KeyDef {
    pub attribute_name: String,
    pub key_type: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct IndexDef {
    pub index_name: String,
    pub key_schema: Vec<KeyDef>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TtlDef {
    pub attribute_name: String,
    pub enabled: bool,
}

/// The table definition as template.yaml states it.
pub fn table_definition() -> anyhow::Result<TableDefinition> {
    // CloudFormation tags (!Ref, !Sub) elsewhere in the template parse as
    // tagged values; only the table's own properties are read.
    let template: serde_norway::Value = serde_norway::from_str(TEMPLATE)?;
    let properties = template
        .get("Resources")
        .and_then(|r| r.get(TABLE_RESOURCE))
        .and_then(|t| t.get("Properties"))
        .ok_or_else(|| {
            anyhow::anyhow!("template.yaml has no Resources.{TABLE_RESOURCE}.Properties")
        })?;
    Ok(serde_norway::from_value(properties.clone())?)
}

fn key_schema(keys: &[KeyDef]) -> anyhow::Result<Vec<KeySchemaElement>> {
    keys.iter()
        .map(|k| {
            Ok(KeySchemaElement::builder()
                .attribute_name(&k.attribute_name)
                .key_type(KeyType::from(k.key_type.as_str()))
                .build()?)
        })
        .collect()
}

/// Creates the table (and its TTL setting) unless it already exists.
pub async fn create_table(client: &Client, table_name: &str) -> Result<(), StoreError> {
    let definition = table_definition().map_err(StoreError::Unexpected)?;
    let build = || -> anyhow::Result<_> {
        let mut request = client
            .create_table()
            .table_name(table_name)
            .billing_mode(BillingMode::PayPerRequest)
            .set_key_schema(Some(key_schema(&definition.key_schema)?));
        for attribute in &definition.attribute_definitions {
            request = request.attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name(&attribute.attribute_name)
                    .attribute_type(ScalarAttributeType::from(attribute.attribute_type.as_str()))
                    .build()?,
            );
        }
        for index in &definition.global_secondary_indexes {
            request = request.global_secondary_indexes(
                GlobalSecondaryIndex::builder()
                    .index_name(&index.index_name)
                    .set_key_schema(Some(key_schema(&index.key_schema)?))
                    .projection(
                        Projection::builder()
                            .projection_type(ProjectionType::All)
                            .build(),
                    )
                    .build()?,
            );
        }
        Ok(request)
    };
    let request = build().map_err(StoreError::Unexpected)?;
    match request.send().await {
        Ok(_) => {}
        Err(err)
            if err
                .as_service_error()
                .is_some_and(|e| e.is_resource_in_use_exception()) =>
        {
            return Ok(());
        }
        Err(err) => return Err(classify(err)),
    }
    if let Some(ttl) = definition.time_to_live_specification.filter(|t| t.enabled) {
        client
            .update_time_to_live()
            .table_name(table_name)
            .time_to_live_specification(
                TimeToLiveSpecification::builder()
                    .attribute_name(ttl.attribute_name)
                    .enabled(true)
                    .build()?,
            )
            .send()
            .await
            .map_err(classify)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_table_has_pk_sk_gsi_and_ttl() {
        let definition = table_definition().unwrap();
        let keys: Vec<_> = definition
            .key_schema
            .iter()
            .map(|k| (k.attribute_name.as_str(), k.key_type.as_str()))
            .collect();
        assert_eq!(keys, [("pk", "HASH"), ("sk", "RANGE")]);
        assert_eq!(
            definition.global_secondary_indexes[0].index_name,
            super::super::GSI1
        );
        assert_eq!(
            definition
                .time_to_live_specification
                .unwrap()
                .attribute_name,
            super::super::TTL_ATTRIBUTE
        );
    }
}
