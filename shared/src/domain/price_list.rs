//! The price table as admins read and write it: dollars per million tokens
//! and decimal factors, as price lists state them. What a valid table is
//! lives here: every amount converted exactly to the domain's integers
//! (`domain::price`), every refusal naming its field path
//! (`entries[2].prices.output`). The same shape is what is stored, so a
//! stored table is read back through the same rules.

use std::collections::HashMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::key::FieldError;
use super::key::access::model_name_problem;
use super::price::exact_micro_usd;
use super::price::{
    Attribute, Band, ClassPrices, MicroUsd, Multiplier, PerClass, PriceEntry, PriceTable,
};
use super::{format_timestamp, parse_timestamp};

/// The most entries a table holds (each model's history included).
pub const MAX_ENTRIES: usize = 500;
/// The most prompt-length bands an entry holds.
pub const MAX_BANDS: usize = 16;
/// A model pattern's longest spelling.
pub const MAX_MODEL_PATTERN: usize = 128;
/// No price is above this many dollars per million tokens: a larger one is
/// a typo (cents for dollars, a missing decimal point).
pub const MAX_DOLLARS: f64 = 1_000_000.0;
/// No factor multiplies a price by more than this.
pub const MAX_FACTOR: f64 = 100.0;

/// A decimal amount as JSON carries it; whole amounts are shown without a
/// fraction (`5`, not `5.0`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decimal(pub f64);

impl Serialize for Decimal {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let whole = self.0.trunc();
        if whole == self.0 && (0.0..=MAX_DOLLARS).contains(&whole) {
            // Exact: a whole number this small is an integer as a double.
            serializer.serialize_u64(whole as u64)
        } else {
            serializer.serialize_f64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Decimal {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        f64::deserialize(deserializer).map(Decimal)
    }
}

/// Dollars per million tokens of each token class.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListedPrices {
    pub input: Decimal,
    pub output: Decimal,
    pub cache_write_5m: Decimal,
    pub cache_write_1h: Decimal,
    pub cache_read: Decimal,
}

/// A factor per token class; a class not named is not changed (`1`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListedFactors {
    #[serde(default = "unchanged")]
    pub input: Decimal,
    #[serde(default = "unchanged")]
    pub output: Decimal,
    #[serde(default = "unchanged")]
    pub cache_write_5m: Decimal,
    #[serde(default = "unchanged")]
    pub cache_write_1h: Decimal,
    #[serde(default = "unchanged")]
    pub cache_read: Decimal,
}

fn unchanged() -> Decimal {
    Decimal(1.0)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListedBand {
    pub above_prompt_tokens: u64,
    pub prices: ListedPrices,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListedEntry {
    /// A model id or family (`PriceEntry::model`).
    pub model: String,
    /// RFC 3339.
    pub effective_from: String,
    pub prices: ListedPrices,
    #[serde(default)]
    pub bands: Vec<ListedBand>,
}

/// The request attributes a multiplier may apply to, as spelt on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListedAttribute {
    Batch,
    UsInference,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListedMultiplier {
    pub attribute: ListedAttribute,
    pub factors: ListedFactors,
}

/// The whole table as admins write it. Whether unpriced models are refused
/// is the relay's configuration (`UNPRICED_MODELS`), not part of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceList {
    pub entries: Vec<ListedEntry>,
    #[serde(default)]
    pub multipliers: Vec<ListedMultiplier>,
    pub fallback: ListedPrices,
}

const PRICE_RULE: &str =
    "must be a non-negative number of dollars per million tokens with at most 6 decimals";

/// Prices to micro-dollars, exactly (`price::exact_micro_usd`).
fn micro_usd(amount: f64) -> Option<MicroUsd> {
    exact_micro_usd(amount, MAX_DOLLARS)
}

/// A factor to thousandths, exactly (`1.1` is `1100`; `1.0005` is refused).
fn thousandths(factor: f64) -> Option<u64> {
    if !factor.is_finite() || !(0.0..=MAX_FACTOR).contains(&factor) {
        return None;
    }
    let scaled = (factor * 1000.0).round();
    (scaled / 1000.0 == factor).then_some(scaled as u64)
}

/// Micro-dollars back to dollars: the double nearest to the decimal, which
/// `micro_usd` reads back to the same integer.
fn dollars(micro: MicroUsd) -> Decimal {
    Decimal(micro as f64 / 1_000_000.0)
}

fn factor(thousandths: u64) -> Decimal {
    Decimal(thousandths as f64 / 1000.0)
}

impl ListedPrices {
    fn validate(&self, path: &str) -> Result<ClassPrices, FieldError> {
        let class = |name: &str, amount: Decimal| {
            micro_usd(amount.0).ok_or_else(|| FieldError::new(format!("{path}.{name}"), PRICE_RULE))
        };
        Ok(ClassPrices {
            input: class("input", self.input)?,
            output: class("output", self.output)?,
            cache_write_5m: class("cache_write_5m", self.cache_write_5m)?,
            cache_write_1h: class("cache_write_1h", self.cache_write_1h)?,
            cache_read: class("cache_read", self.cache_read)?,
        })
    }

    fn of(prices: &ClassPrices) -> ListedPrices {
        ListedPrices {
            input: dollars(prices.input),
            output: dollars(prices.output),
            cache_write_5m: dollars(prices.cache_write_5m),
            cache_write_1h: dollars(prices.cache_write_1h),
            cache_read: dollars(prices.cache_read),
        }
    }
}

impl ListedFactors {
    fn validate(&self, path: &str) -> Result<PerClass, FieldError> {
        let class = |name: &str, value: Decimal| {
            thousandths(value.0).ok_or_else(|| {
                FieldError::new(
                    format!("{path}.{name}"),
                    format!(
                        "must be a factor from 0 to {MAX_FACTOR} with at most 3 decimals (1.1 is +10%)"
                    ),
                )
            })
        };
        Ok(PerClass {
            input: class("input", self.input)?,
            output: class("output", self.output)?,
            cache_write_5m: class("cache_write_5m", self.cache_write_5m)?,
            cache_write_1h: class("cache_write_1h", self.cache_write_1h)?,
            cache_read: class("cache_read", self.cache_read)?,
        })
    }

    fn of(thousandths: &PerClass) -> ListedFactors {
        ListedFactors {
            input: factor(thousandths.input),
            output: factor(thousandths.output),
            cache_write_5m: factor(thousandths.cache_write_5m),
            cache_write_1h: factor(thousandths.cache_write_1h),
            cache_read: factor(thousandths.cache_read),
        }
    }
}

impl ListedEntry {
    fn validate(&self, path: &str) -> Result<PriceEntry, FieldError> {
        if self.model.len() > MAX_MODEL_PATTERN || model_name_problem(&self.model).is_some() {
            return Err(FieldError::new(
                format!("{path}.model"),
                format!(
                    "must be 1 to {MAX_MODEL_PATTERN} characters of letters, digits and - . _ : @ / [ ]"
                ),
            ));
        }
        let effective_from = parse_timestamp(&self.effective_from)
            .filter(|at| at.nanosecond() % 1_000_000 == 0)
            .ok_or_else(|| {
                FieldError::new(
                    format!("{path}.effective_from"),
                    "must be an RFC 3339 timestamp (2026-01-01T00:00:00Z) with at most millisecond precision",
                )
            })?;
        let prices = self.prices.validate(&format!("{path}.prices"))?;
        if self.bands.len() > MAX_BANDS {
            return Err(FieldError::new(
                format!("{path}.bands"),
                format!("at most {MAX_BANDS} bands"),
            ));
        }
        let mut bands = Vec::with_capacity(self.bands.len());
        for (i, band) in self.bands.iter().enumerate() {
            let band_path = format!("{path}.bands[{i}]");
            if let Some(previous) = bands.last().map(|b: &Band| b.above_prompt_tokens)
                && band.above_prompt_tokens <= previous
            {
                return Err(FieldError::new(
                    format!("{band_path}.above_prompt_tokens"),
                    "bands must ascend",
                ));
            }
            bands.push(Band {
                above_prompt_tokens: band.above_prompt_tokens,
                prices: band.prices.validate(&format!("{band_path}.prices"))?,
            });
        }
        Ok(PriceEntry {
            model: self.model.clone(),
            effective_from,
            prices,
            bands,
        })
    }

    fn of(entry: &PriceEntry) -> ListedEntry {
        ListedEntry {
            model: entry.model.clone(),
            effective_from: format_timestamp(entry.effective_from),
            prices: ListedPrices::of(&entry.prices),
            bands: entry
                .bands
                .iter()
                .map(|band| ListedBand {
                    above_prompt_tokens: band.above_prompt_tokens,
                    prices: ListedPrices::of(&band.prices),
                })
                .collect(),
        }
    }
}

impl From<ListedAttribute> for Attribute {
    fn from(attribute: ListedAttribute) -> Attribute {
        match attribute {
            ListedAttribute::Batch => Attribute::Batch,
            ListedAttribute::UsInference => Attribute::UsInference,
        }
    }
}

impl From<Attribute> for ListedAttribute {
    fn from(attribute: Attribute) -> ListedAttribute {
        match attribute {
            Attribute::Batch => ListedAttribute::Batch,
            Attribute::UsInference => ListedAttribute::UsInference,
        }
    }
}

impl PriceList {
    /// The table this list describes, every field checked; unpriced models
    /// charged (the caller applies `UNPRICED_MODELS`).
    pub fn validate(&self) -> Result<PriceTable, FieldError> {
        if self.entries.len() > MAX_ENTRIES {
            return Err(FieldError::new(
                "entries",
                format!("at most {MAX_ENTRIES} entries"),
            ));
        }
        let mut entries = Vec::with_capacity(self.entries.len());
        // (model, effective_from) → index: two prices for one model from one
        // moment would leave the cost to the order of the list.
        let mut seen = HashMap::new();
        for (i, entry) in self.entries.iter().enumerate() {
            let path = format!("entries[{i}]");
            let entry = entry.validate(&path)?;
            if let Some(first) = seen.insert((entry.model.clone(), entry.effective_from), i) {
                return Err(FieldError::new(
                    format!("{path}.effective_from"),
                    format!("same `model` and `effective_from` as entries[{first}]"),
                ));
            }
            entries.push(entry);
        }
        let mut multipliers: Vec<Multiplier> = Vec::with_capacity(self.multipliers.len());
        for (i, multiplier) in self.multipliers.iter().enumerate() {
            let path = format!("multipliers[{i}]");
            let attribute = Attribute::from(multiplier.attribute);
            // Two multipliers of one attribute would both apply.
            if multipliers.iter().any(|m| m.attribute == attribute) {
                return Err(FieldError::new(
                    format!("{path}.attribute"),
                    "each attribute has at most one multiplier",
                ));
            }
            multipliers.push(Multiplier {
                attribute,
                thousandths: multiplier.factors.validate(&format!("{path}.factors"))?,
            });
        }
        Ok(PriceTable {
            entries,
            multipliers,
            fallback: self.fallback.validate("fallback")?,
            refuse_unpriced: false,
        })
    }

    /// How admins see `table`.
    pub fn of(table: &PriceTable) -> PriceList {
        PriceList {
            entries: table.entries.iter().map(ListedEntry::of).collect(),
            multipliers: table
                .multipliers
                .iter()
                .map(|m| ListedMultiplier {
                    attribute: m.attribute.into(),
                    factors: ListedFactors::of(&m.thousandths),
                })
                .collect(),
            fallback: ListedPrices::of(&table.fallback),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::domain::price::default_table;

    fn prices() -> Value {
        json!({"input": 5, "output": 25, "cache_write_5m": 6.25, "cache_write_1h": 10, "cache_read": 0.5})
    }

    fn table() -> Value {
        json!({
            "entries": [
                {"model": "claude-opus-4-5", "effective_from": "2025-01-01T00:00:00Z", "prices": prices()},
                {"model": "claude-haiku-5-5", "effective_from": "2025-01-01T00:00:00Z", "prices": prices(),
                 "bands": [{"above_prompt_tokens": 100000, "prices": prices()}]},
            ],
            "multipliers": [{"attribute": "batch", "factors": {"input": 0.5, "output": 0.5}}],
            "fallback": prices(),
        })
    }

    fn validate(list: &Value) -> Result<PriceTable, FieldError> {
        serde_json::from_value::<PriceList>(list.clone())
            .unwrap()
            .validate()
    }

    fn refusal(list: &Value) -> FieldError {
        validate(list).unwrap_err()
    }

    #[test]
    fn dollars_convert_exactly_to_micro_dollars() {
        let cases = [
            (6.25, Some(6_250_000)),
            (0.3, Some(300_000)),
            (0.1, Some(100_000)),
            (3.75, Some(3_750_000)),
            (0.000_001, Some(1)),
            (999_999.999_999, Some(999_999_999_999)),
            (1_000_000.0, Some(1_000_000_000_000)),
            (0.0, Some(0)),
            (0.000_000_1, None),
            (1.234_567_8, None),
            (-0.5, None),
            (1_000_000.5, None),
            (f64::NAN, None),
            (f64::INFINITY, None),
        ];
        for (amount, micro) in cases {
            assert_eq!(micro_usd(amount), micro, "{amount}");
        }
    }

    #[test]
    fn factors_convert_exactly_to_thousandths() {
        assert_eq!(thousandths(0.5), Some(500));
        assert_eq!(thousandths(1.1), Some(1100));
        assert_eq!(thousandths(1.0), Some(1000));
        assert_eq!(thousandths(1.0005), None);
        assert_eq!(thousandths(-1.0), None);
        assert_eq!(thousandths(101.0), None);
    }

    #[test]
    fn a_valid_list_becomes_the_table_in_integer_units() {
        let table = validate(&table()).unwrap();
        assert_eq!(table.entries.len(), 2);
        let opus = &table.entries[0];
        assert_eq!(opus.prices.cache_write_5m, 6_250_000);
        assert_eq!(opus.prices.cache_read, 500_000);
        assert_eq!(opus.effective_from.unix_timestamp(), 1_735_689_600);
        assert_eq!(table.entries[1].bands[0].above_prompt_tokens, 100_000);
        // Classes a multiplier does not name are unchanged.
        assert_eq!(
            table.multipliers[0].thousandths,
            PerClass {
                input: 500,
                output: 500,
                cache_write_5m: 1000,
                cache_write_1h: 1000,
                cache_read: 1000,
            }
        );
        assert!(!table.refuse_unpriced);
    }

    #[test]
    fn each_refusal_names_its_field() {
        let mut cases: Vec<(Value, String)> = Vec::new();
        let mut with = |path: &str, edit: &dyn Fn(&mut Value)| {
            let mut list = table();
            edit(&mut list);
            cases.push((list, path.to_owned()));
        };
        with("entries[1].prices.output", &|t| {
            t["entries"][1]["prices"]["output"] = json!(-1)
        });
        with("entries[0].prices.input", &|t| {
            t["entries"][0]["prices"]["input"] = json!(0.000_000_1)
        });
        with("entries[0].prices.cache_read", &|t| {
            t["entries"][0]["prices"]["cache_read"] = json!(2_000_000)
        });
        with("entries[1].bands[0].prices.cache_write_1h", &|t| {
            t["entries"][1]["bands"][0]["prices"]["cache_write_1h"] = json!(1.5e-9)
        });
        with("entries[1].bands[1].above_prompt_tokens", &|t| {
            t["entries"][1]["bands"]
                .as_array_mut()
                .unwrap()
                .push(json!({"above_prompt_tokens": 100000, "prices": prices()}))
        });
        with("entries[0].model", &|t| {
            t["entries"][0]["model"] = json!("")
        });
        with("entries[0].model", &|t| {
            t["entries"][0]["model"] = json!("claude opus")
        });
        with("entries[0].model", &|t| {
            t["entries"][0]["model"] = json!("c".repeat(129))
        });
        with("entries[0].effective_from", &|t| {
            t["entries"][0]["effective_from"] = json!("yesterday")
        });
        with("entries[0].effective_from", &|t| {
            t["entries"][0]["effective_from"] = json!("2025-01-01T00:00:00.0000001Z")
        });
        with("entries[2].effective_from", &|t| {
            let copy = t["entries"][0].clone();
            t["entries"].as_array_mut().unwrap().push(copy)
        });
        with("multipliers[0].factors.input", &|t| {
            t["multipliers"][0]["factors"]["input"] = json!(0.0005)
        });
        with("multipliers[1].attribute", &|t| {
            let copy = t["multipliers"][0].clone();
            t["multipliers"].as_array_mut().unwrap().push(copy)
        });
        with("fallback.cache_write_5m", &|t| {
            t["fallback"]["cache_write_5m"] = json!(-0.01)
        });
        with("entries", &|t| {
            let entry = t["entries"][0].clone();
            t["entries"] = Value::Array(
                (0..=MAX_ENTRIES)
                    .map(|i| {
                        let mut e = entry.clone();
                        e["model"] = json!(format!("m-{i}"));
                        e
                    })
                    .collect(),
            )
        });
        for (list, field) in cases {
            let err = refusal(&list);
            assert_eq!(err.field, field, "{err}");
            assert!(
                err.to_string().starts_with(&format!("`{field}`: ")),
                "{err}"
            );
        }
    }

    #[test]
    fn the_same_model_may_change_price_at_a_later_moment() {
        let mut list = table();
        let mut later = list["entries"][0].clone();
        later["effective_from"] = json!("2026-10-07T00:00:00+02:00");
        later["prices"]["input"] = json!(4);
        list["entries"].as_array_mut().unwrap().push(later);
        let table = validate(&list).unwrap();
        let at = crate::domain::parse_timestamp("2026-12-01T00:00:00Z").unwrap();
        assert_eq!(
            table.entry_for("claude-opus-4-5", at).unwrap().prices.input,
            4_000_000
        );
    }

    #[test]
    fn unknown_fields_and_attributes_are_refused() {
        let mut list = table();
        list["entries"][0]["price"] = json!(1);
        assert!(serde_json::from_value::<PriceList>(list).is_err());
        let mut list = table();
        list["multipliers"][0]["attribute"] = json!("priority");
        assert!(serde_json::from_value::<PriceList>(list).is_err());
        let mut list = table();
        list["refuse_unpriced"] = json!(true);
        assert!(serde_json::from_value::<PriceList>(list).is_err());
    }

    #[test]
    fn the_shipped_table_round_trips_through_its_listing() {
        let shipped = default_table();
        let listed = serde_json::to_value(PriceList::of(&shipped)).unwrap();
        // Whole amounts are shown as integers, others as decimals.
        let opus = listed["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["model"] == "claude-opus-4-5")
            .unwrap();
        assert_eq!(opus["prices"], prices());
        assert_eq!(opus["effective_from"], "2025-01-01T00:00:00.000Z");
        assert_eq!(listed["multipliers"][1]["factors"]["input"], json!(1.1));
        assert_eq!(validate(&listed).unwrap(), shipped);
    }
}
