//! Prices as data, and what a request costs: per-model prices for each
//! token class, effective-dated (a change applies from its moment on, the
//! history kept), with prompt-length bands and multipliers for request
//! attributes that change the price; costs in integer micro-dollars so that
//! counters add up exactly. A model the table does not price is refused or
//! charged a fallback, never nothing.

use time::OffsetDateTime;
use time::macros::datetime;

use super::usage::TokenUsage;

/// Millionths of a US dollar: every cost and counter is a whole number of them.
pub type MicroUsd = u64;

/// One number per token class: prices (`ClassPrices`) or a multiplier's
/// factors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerClass {
    pub input: u64,
    pub output: u64,
    pub cache_write_5m: u64,
    pub cache_write_1h: u64,
    pub cache_read: u64,
}

/// Prices of one model for each token class, in micro-dollars per million
/// tokens (`$3 / MTok` is `3_000_000`).
pub type ClassPrices = PerClass;

impl ClassPrices {
    /// From dollars per million tokens, as price lists state them.
    pub const fn usd(
        input: f64,
        cache_write_5m: f64,
        cache_write_1h: f64,
        cache_read: f64,
        output: f64,
    ) -> Self {
        ClassPrices {
            input: micro(input),
            output: micro(output),
            cache_write_5m: micro(cache_write_5m),
            cache_write_1h: micro(cache_write_1h),
            cache_read: micro(cache_read),
        }
    }
}

/// The token classes a price list prices apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenClass {
    Input,
    Output,
    CacheWrite5m,
    CacheWrite1h,
    CacheRead,
}

impl PerClass {
    fn of(&self, class: TokenClass) -> u64 {
        match class {
            TokenClass::Input => self.input,
            TokenClass::Output => self.output,
            TokenClass::CacheWrite5m => self.cache_write_5m,
            TokenClass::CacheWrite1h => self.cache_write_1h,
            TokenClass::CacheRead => self.cache_read,
        }
    }
}

/// Dollars an admin wrote (a price, a dollar limit) to micro-dollars,
/// exactly: the amount must be the double nearest to a whole number of
/// micro-dollars (so `0.3` is `300_000`, and `1e-7` is refused rather than
/// rounded away), from 0 to `max_dollars` (at most 10^9: within what a
/// double holds exactly in micro-dollars).
pub fn exact_micro_usd(dollars: f64, max_dollars: f64) -> Option<MicroUsd> {
    if !dollars.is_finite() || !(0.0..=max_dollars.min(1e9)).contains(&dollars) {
        return None;
    }
    let micro = (dollars * 1_000_000.0).round();
    // In range: at most 10^15 < 2^53, which a double and a u64 hold exactly.
    (micro / 1_000_000.0 == dollars).then_some(micro as u64)
}

/// Dollars to micro-dollars, for prices written in the source (a const fn:
/// the shipped table is checked at compile time, never parsed).
const fn micro(usd: f64) -> u64 {
    // Every shipped price has at most four decimals: the rounding is exact.
    (usd * 1_000_000.0 + 0.5) as u64
}

/// A prompt-length band: a request whose prompt holds more than
/// `above_prompt_tokens` tokens is priced, whole, at `prices`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Band {
    pub above_prompt_tokens: u64,
    pub prices: ClassPrices,
}

/// The prices of the models a pattern names, from a moment on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceEntry {
    /// A model id, matched exactly, or a family (`claude-opus-4-5`) that
    /// matches ids it starts, up to a `-` or `@` (`claude-opus-4-5-20251101`).
    pub model: String,
    /// From when these prices apply (until a later entry for the same model).
    pub effective_from: OffsetDateTime,
    pub prices: ClassPrices,
    /// Higher bands, by ascending threshold.
    pub bands: Vec<Band>,
}

/// A request attribute that changes the price of some token classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Attribute {
    /// A request of a Message Batch.
    Batch,
    /// `inference_geo: "us"`: US-only inference.
    UsInference,
}

/// A multiplier, in thousandths (`1100` is ×1.1), per token class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Multiplier {
    pub attribute: Attribute,
    pub thousandths: PerClass,
}

/// The whole price table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceTable {
    pub entries: Vec<PriceEntry>,
    pub multipliers: Vec<Multiplier>,
    /// What a model the table does not price is charged: never nothing.
    pub fallback: ClassPrices,
    /// Whether a request for such a model is refused before it is
    /// forwarded (else it is charged `fallback`, recorded as unpriced).
    pub refuse_unpriced: bool,
}

/// What a request cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cost {
    pub micro_usd: MicroUsd,
    /// The model matched no entry: charged the fallback prices.
    pub unpriced: bool,
    /// What prompt caching saved: the cost of the same usage with every
    /// cache token (reads and writes of either TTL) priced as plain input,
    /// in the same band with the same multipliers, minus `micro_usd`.
    /// Negative when cache writes cost more than their reads saved.
    pub saved_micro_usd: i64,
}

impl PriceTable {
    /// The prices in force for `model` at `at`: the entries of the exact id
    /// if there are any, else of the longest family it belongs to; of
    /// those, the latest that took effect by `at`.
    pub fn entry_for(&self, model: &str, at: OffsetDateTime) -> Option<&PriceEntry> {
        let pattern = self
            .entries
            .iter()
            .filter(|e| e.model == model)
            .map(|e| e.model.as_str())
            .next()
            .or_else(|| {
                self.entries
                    .iter()
                    .map(|e| e.model.as_str())
                    .filter(|family| in_family(model, family))
                    .max_by_key(|family| family.len())
            })?;
        self.entries
            .iter()
            .filter(|e| e.model == pattern && e.effective_from <= at)
            .max_by_key(|e| e.effective_from)
    }

    /// Whether a request for `model` at `at` is refused before forwarding:
    /// the table does not price it and says so.
    pub fn refuses(&self, model: &str, at: OffsetDateTime) -> bool {
        self.refuse_unpriced && self.entry_for(model, at).is_none()
    }

    /// The most a request for `model` could cost at `at`: `prompt` tokens
    /// of its dearest input class (plain input, a cache write or a cache
    /// read, whichever costs most in the band that prompt falls in) and
    /// `output` tokens, with `attributes` applied. What a request that
    /// has not been answered yet may spend, at worst.
    pub fn worst_case(
        &self,
        model: Option<&str>,
        prompt: u64,
        output: u64,
        attributes: &[Attribute],
        at: OffsetDateTime,
    ) -> MicroUsd {
        let placements = [
            TokenUsage {
                input_tokens: prompt,
                ..TokenUsage::default()
            },
            TokenUsage {
                cache_creation_input_tokens: prompt,
                cache_creation_5m: prompt,
                ..TokenUsage::default()
            },
            TokenUsage {
                cache_creation_input_tokens: prompt,
                cache_creation_1h: prompt,
                ..TokenUsage::default()
            },
            TokenUsage {
                cache_read_input_tokens: prompt,
                ..TokenUsage::default()
            },
        ];
        placements
            .into_iter()
            .map(|usage| {
                let usage = TokenUsage {
                    output_tokens: output,
                    ..usage
                };
                self.cost(model, &usage, attributes, at).micro_usd
            })
            .max()
            .unwrap_or(0)
    }

    /// What `usage` of `model` (`None`: the answer named none) costs at
    /// `at`, with `attributes` of the request applied.
    pub fn cost(
        &self,
        model: Option<&str>,
        usage: &TokenUsage,
        attributes: &[Attribute],
        at: OffsetDateTime,
    ) -> Cost {
        let (prices, unpriced) = match model.and_then(|m| self.entry_for(m, at)) {
            Some(entry) => (entry.prices_for(prompt_tokens(usage)), false),
            None => (self.fallback, usage.billed() > 0),
        };
        let multipliers: Vec<&Multiplier> = self
            .multipliers
            .iter()
            .filter(|m| attributes.contains(&m.attribute))
            .collect();
        let micro_usd = cost_of(usage, &prices, &multipliers);
        let uncached = cost_of(&without_cache(usage), &prices, &multipliers);
        Cost {
            micro_usd,
            unpriced,
            saved_micro_usd: signed(uncached) - signed(micro_usd),
        }
    }
}

/// The same usage had nothing been cached: every prompt token plain input.
/// Its prompt is as long, so it falls in the same band.
fn without_cache(usage: &TokenUsage) -> TokenUsage {
    TokenUsage {
        input_tokens: prompt_tokens(usage),
        output_tokens: usage.output_tokens,
        ..TokenUsage::default()
    }
}

fn signed(micro_usd: MicroUsd) -> i64 {
    i64::try_from(micro_usd).unwrap_or(i64::MAX)
}

impl PriceEntry {
    /// The prices of the band a prompt of `prompt` tokens falls in.
    fn prices_for(&self, prompt: u64) -> ClassPrices {
        self.bands
            .iter()
            .filter(|band| prompt > band.above_prompt_tokens)
            .max_by_key(|band| band.above_prompt_tokens)
            .map_or(self.prices, |band| band.prices)
    }
}

/// Whether `model` belongs to `family`: the family is a prefix of the id
/// ending where one of its segments ends.
fn in_family(model: &str, family: &str) -> bool {
    model
        .strip_prefix(family)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['-', '@']))
}

/// The tokens a request's prompt held: what bands are decided on.
pub fn prompt_tokens(usage: &TokenUsage) -> u64 {
    usage.input_tokens + usage.cache_creation_input_tokens + usage.cache_read_input_tokens
}

/// The sum of each class's tokens times its price and multipliers, rounded
/// once, to the nearest micro-dollar. Cache writes are priced by the 5-minute
/// / 1-hour split the answer reported; writes it did not split (answers from
/// before the split existed) are priced as 5-minute writes, the default TTL.
fn cost_of(usage: &TokenUsage, prices: &ClassPrices, multipliers: &[&Multiplier]) -> MicroUsd {
    let unsplit = usage
        .cache_creation_input_tokens
        .saturating_sub(usage.cache_creation_5m + usage.cache_creation_1h);
    let classes = [
        (usage.input_tokens, TokenClass::Input),
        (usage.output_tokens, TokenClass::Output),
        (usage.cache_creation_5m + unsplit, TokenClass::CacheWrite5m),
        (usage.cache_creation_1h, TokenClass::CacheWrite1h),
        (usage.cache_read_input_tokens, TokenClass::CacheRead),
    ];
    // tokens × µ$/MTok × Π(thousandths): divided by 10^6 and 10^3 per
    // multiplier at the end, so nothing is rounded twice.
    let scale = 1_000_000u128 * 1000u128.pow(u32::try_from(multipliers.len()).unwrap_or(0));
    let total: u128 = classes
        .iter()
        .map(|&(tokens, class)| {
            multipliers.iter().fold(
                u128::from(tokens) * u128::from(prices.of(class)),
                |sum, m| sum * u128::from(m.thousandths.of(class)),
            )
        })
        .sum();
    u64::try_from((total + scale / 2) / scale).unwrap_or(u64::MAX)
}

/// The prices shipped with the relay (`../shared/CLAUDE_CODE.md`, Anthropic's
/// price list): admins replace them as prices change.
pub fn default_table() -> PriceTable {
    let since = datetime!(2025-01-01 0:00 UTC);
    let entry = |model: &str, prices: ClassPrices| PriceEntry {
        model: model.to_owned(),
        effective_from: since,
        prices,
        bands: Vec::new(),
    };
    let fable_5_1 = ClassPrices::usd(10.0, 12.5, 20.0, 0.25, 50.0);
    let fable_5 = ClassPrices::usd(10.0, 12.5, 20.0, 1.0, 50.0);
    let opus_5_5 = ClassPrices::usd(4.0, 5.0, 8.0, 0.2, 20.0);
    let opus_4_5_to_5 = ClassPrices::usd(5.0, 6.25, 10.0, 0.5, 25.0);
    let opus_4 = ClassPrices::usd(15.0, 18.75, 30.0, 1.5, 75.0);
    let sonnet_5 = ClassPrices::usd(2.0, 2.5, 4.0, 0.2, 10.0);
    let sonnet_4 = ClassPrices::usd(3.0, 3.75, 6.0, 0.3, 15.0);
    let haiku_4_5 = ClassPrices::usd(1.0, 1.25, 2.0, 0.1, 5.0);
    let mut entries = Vec::new();
    for (family, prices) in [
        ("claude-fable-5-1", fable_5_1),
        ("claude-mythos-5-1", fable_5_1),
        ("claude-fable-5", fable_5),
        ("claude-mythos-5", fable_5),
        ("claude-opus-5-5", opus_5_5),
        ("claude-opus-5", opus_4_5_to_5),
        ("claude-opus-4-8", opus_4_5_to_5),
        ("claude-opus-4-7", opus_4_5_to_5),
        ("claude-opus-4-6", opus_4_5_to_5),
        ("claude-opus-4-5", opus_4_5_to_5),
        ("claude-opus-4-1", opus_4),
        ("claude-opus-4", opus_4),
        ("claude-sonnet-5-5", sonnet_5),
        ("claude-sonnet-5", sonnet_5),
        ("claude-sonnet-4-6", sonnet_4),
        ("claude-sonnet-4-5", sonnet_4),
        ("claude-sonnet-4", sonnet_4),
        ("claude-haiku-4-5", haiku_4_5),
    ] {
        entries.push(entry(family, prices));
    }
    // Sonnet 5.5's cache reads cost 0.20 until 2026-10-07, 0.10 from then.
    entries
        .iter_mut()
        .filter(|e| e.model == "claude-sonnet-5-5")
        .for_each(|e| {
            e.prices.cache_read = micro(0.2);
        });
    entries.push(PriceEntry {
        model: "claude-sonnet-5-5".into(),
        effective_from: datetime!(2026-10-07 0:00 UTC),
        prices: ClassPrices::usd(2.0, 2.5, 4.0, 0.1, 10.0),
        bands: Vec::new(),
    });
    // Haiku 5.5: a prompt over 100K tokens prices the whole request higher.
    entries.push(PriceEntry {
        model: "claude-haiku-5-5".into(),
        effective_from: since,
        prices: ClassPrices::usd(0.1, 0.125, 0.2, 0.01, 0.5),
        bands: vec![Band {
            above_prompt_tokens: 100_000,
            prices: ClassPrices::usd(0.5, 0.625, 1.0, 0.05, 2.5),
        }],
    });
    PriceTable {
        entries,
        multipliers: vec![
            Multiplier {
                attribute: Attribute::Batch,
                thousandths: PerClass {
                    input: 500,
                    output: 500,
                    cache_write_5m: 1000,
                    cache_write_1h: 1000,
                    cache_read: 1000,
                },
            },
            Multiplier {
                attribute: Attribute::UsInference,
                thousandths: PerClass {
                    input: 1100,
                    output: 1100,
                    cache_write_5m: 1100,
                    cache_write_1h: 1100,
                    cache_read: 1100,
                },
            },
        ],
        // The dearest shipped prices (Opus 4): an unknown model is never
        // cheaper than any known one.
        fallback: opus_4,
        refuse_unpriced: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(input: u64, output: u64, write_5m: u64, write_1h: u64, read: u64) -> TokenUsage {
        TokenUsage {
            input_tokens: input,
            output_tokens: output,
            cache_creation_input_tokens: write_5m + write_1h,
            cache_read_input_tokens: read,
            cache_creation_5m: write_5m,
            cache_creation_1h: write_1h,
        }
    }

    fn priced(cost: Cost) -> MicroUsd {
        assert!(!cost.unpriced, "{cost:?}");
        cost.micro_usd
    }

    const NOW: OffsetDateTime = datetime!(2026-11-28 12:00 UTC);

    #[test]
    fn every_token_class_is_priced_at_its_own_rate() {
        let table = default_table();
        // Sonnet 4.5: $3 in, $15 out, $3.75 5m write, $6 1h write, $0.30 read.
        let cases = [
            (usage(1_000_000, 0, 0, 0, 0), 3_000_000),
            (usage(0, 1_000_000, 0, 0, 0), 15_000_000),
            (usage(0, 0, 1_000_000, 0, 0), 3_750_000),
            (usage(0, 0, 0, 1_000_000, 0), 6_000_000),
            (usage(0, 0, 0, 0, 1_000_000), 300_000),
            // 1234 in, 567 out, 200 5m, 300 1h, 40000 read:
            // 3702 + 8505 + 750 + 1800 + 12000 = 26757 µ$
            (usage(1234, 567, 200, 300, 40_000), 26_757),
        ];
        for (usage, expected) in cases {
            let cost = table.cost(Some("claude-sonnet-4-5-20250929"), &usage, &[], NOW);
            assert_eq!(priced(cost), expected, "{usage:?}");
        }
    }

    #[test]
    fn one_hour_writes_cost_more_than_five_minute_writes_as_reported() {
        let table = default_table();
        let five = table.cost(
            Some("claude-opus-4-5"),
            &usage(0, 0, 10_000, 0, 0),
            &[],
            NOW,
        );
        let hour = table.cost(
            Some("claude-opus-4-5"),
            &usage(0, 0, 0, 10_000, 0),
            &[],
            NOW,
        );
        // Opus 4.5: $6.25 and $10 per million.
        assert_eq!((priced(five), priced(hour)), (62_500, 100_000));
        // A write the answer did not split is priced as a 5-minute write.
        let unsplit = TokenUsage {
            cache_creation_input_tokens: 10_000,
            ..TokenUsage::default()
        };
        assert_eq!(
            priced(table.cost(Some("claude-opus-4-5"), &unsplit, &[], NOW)),
            62_500
        );
    }

    #[test]
    fn a_prompt_over_the_band_prices_the_whole_request_higher() {
        let table = default_table();
        // Haiku 5.5 at 100,000 prompt tokens: the low band. 100000 × $0.10 +
        // 1000 × $0.50 = 10000 + 500 µ$.
        let at_edge = usage(90_000, 1000, 0, 0, 10_000);
        // 90000 × 0.10 + 10000 × 0.01 + 1000 × 0.50 = 9000 + 100 + 500
        assert_eq!(
            priced(table.cost(Some("claude-haiku-5-5"), &at_edge, &[], NOW)),
            9_600
        );
        // One token more: every class at the high band.
        // 90001 × 0.50 + 10000 × 0.05 + 1000 × 2.50 = 45000.5 + 500 + 2500
        let over = usage(90_001, 1000, 0, 0, 10_000);
        assert_eq!(
            priced(table.cost(Some("claude-haiku-5-5"), &over, &[], NOW)),
            48_001
        );
    }

    #[test]
    fn multipliers_apply_per_class_and_combine() {
        let table = default_table();
        let u = usage(1_000_000, 1_000_000, 0, 0, 1_000_000);
        // Sonnet 4: 3 + 15 + 0.30 = $18.30.
        assert_eq!(
            priced(table.cost(Some("claude-sonnet-4"), &u, &[], NOW)),
            18_300_000
        );
        // Batch: half on input and output only: 1.5 + 7.5 + 0.30.
        assert_eq!(
            priced(table.cost(Some("claude-sonnet-4"), &u, &[Attribute::Batch], NOW)),
            9_300_000
        );
        // US inference: ×1.1 on everything: 20.13.
        assert_eq!(
            priced(table.cost(Some("claude-sonnet-4"), &u, &[Attribute::UsInference], NOW)),
            20_130_000
        );
        // Both: (1.5 + 7.5) × 1.1 + 0.30 × 1.1 = 9.90 + 0.33.
        assert_eq!(
            priced(table.cost(
                Some("claude-sonnet-4"),
                &u,
                &[Attribute::Batch, Attribute::UsInference],
                NOW
            )),
            10_230_000
        );
    }

    #[test]
    fn a_price_change_applies_from_its_moment_on() {
        let table = default_table();
        let reads = usage(0, 0, 0, 0, 1_000_000);
        let before = datetime!(2026-10-06 23:59:59 UTC);
        let after = datetime!(2026-10-07 0:00 UTC);
        assert_eq!(
            priced(table.cost(Some("claude-sonnet-5-5"), &reads, &[], before)),
            200_000
        );
        assert_eq!(
            priced(table.cost(Some("claude-sonnet-5-5"), &reads, &[], after)),
            100_000
        );
    }

    #[test]
    fn a_model_matches_exactly_else_by_its_longest_family() {
        let table = default_table();
        let at = |model| table.entry_for(model, NOW).map(|e| e.model.as_str());
        assert_eq!(at("claude-opus-4-5"), Some("claude-opus-4-5"));
        assert_eq!(at("claude-opus-4-5-20251101"), Some("claude-opus-4-5"));
        assert_eq!(at("claude-opus-4-20250514"), Some("claude-opus-4"));
        assert_eq!(at("claude-opus-4-1@20250805"), Some("claude-opus-4-1"));
        // A family ends where a segment ends: Opus 4.10 is not Opus 4.1.
        assert_eq!(at("claude-opus-4-10"), Some("claude-opus-4"));
        assert_eq!(at("claude-opus-45"), None);
        assert_eq!(at("gpt-5"), None);
    }

    #[test]
    fn an_unpriced_model_is_refused_or_charged_the_fallback_never_free() {
        let mut table = default_table();
        let u = usage(1_000_000, 0, 0, 0, 0);
        // Charged the fallback (Opus 4's $15 input), flagged.
        assert_eq!(
            table.cost(Some("mystery-model"), &u, &[], NOW),
            Cost {
                micro_usd: 15_000_000,
                unpriced: true,
                saved_micro_usd: 0,
            }
        );
        assert_eq!(table.cost(None, &u, &[], NOW).micro_usd, 15_000_000);
        // Nothing used, nothing charged, nothing flagged.
        assert_eq!(
            table.cost(None, &TokenUsage::default(), &[], NOW),
            Cost::default()
        );
        assert!(!table.refuses("mystery-model", NOW));
        table.refuse_unpriced = true;
        assert!(table.refuses("mystery-model", NOW));
        assert!(!table.refuses("claude-opus-4-5-20251101", NOW));
    }

    #[test]
    fn costs_round_once_to_the_nearest_micro_dollar() {
        let table = default_table();
        // Haiku 4.5 reads at $0.10/M: 4 tokens are 0.4 µ$, 5 are 0.5 µ$.
        assert_eq!(
            priced(table.cost(Some("claude-haiku-4-5"), &usage(0, 0, 0, 0, 4), &[], NOW)),
            0
        );
        assert_eq!(
            priced(table.cost(Some("claude-haiku-4-5"), &usage(0, 0, 0, 0, 5), &[], NOW)),
            1
        );
        // Summed before rounding: 4 reads + 1 input = 0.4 + 1 = 1.4 µ$.
        assert_eq!(
            priced(table.cost(Some("claude-haiku-4-5"), &usage(1, 0, 0, 0, 4), &[], NOW)),
            1
        );
    }

    #[test]
    fn caching_saves_the_price_of_plain_input_less_what_the_cache_cost() {
        let table = default_table();
        // Sonnet 4.5: $3 in, $15 out, $3.75 5m write, $6 1h write, $0.30 read.
        // input 1000, read 50,000, 5m write 2000, 1h write 1000, output 300:
        // real: 1000 × 3 + 50000 × 0.30 + 2000 × 3.75 + 1000 × 6 + 300 × 15
        //     = 3000 + 15000 + 7500 + 6000 + 4500 = 36,000 µ$;
        // uncached: (1000 + 50000 + 2000 + 1000) × 3 + 300 × 15
        //     = 162,000 + 4500 = 166,500 µ$; saved 166,500 − 36,000 = 130,500.
        let cost = table.cost(
            Some("claude-sonnet-4-5-20250929"),
            &usage(1000, 300, 2000, 1000, 50_000),
            &[],
            NOW,
        );
        assert_eq!((priced(cost), cost.saved_micro_usd), (36_000, 130_500));
    }

    #[test]
    fn cache_writes_without_reads_save_a_negative_amount() {
        let table = default_table();
        // Sonnet 4.5, 10,000 written for 1 h and never read, 100 in:
        // real 100 × 3 + 10000 × 6 = 300 + 60,000 = 60,300 µ$;
        // uncached 10,100 × 3 = 30,300 µ$; saved 30,300 − 60,300 = −30,000.
        let cost = table.cost(
            Some("claude-sonnet-4-5"),
            &usage(100, 0, 0, 10_000, 0),
            &[],
            NOW,
        );
        assert_eq!((priced(cost), cost.saved_micro_usd), (60_300, -30_000));
        // No cache tokens, nothing saved or lost.
        let plain = table.cost(
            Some("claude-sonnet-4-5"),
            &usage(100, 50, 0, 0, 0),
            &[],
            NOW,
        );
        assert_eq!(plain.saved_micro_usd, 0);
    }

    #[test]
    fn savings_use_the_same_band_and_multipliers_as_the_cost() {
        let table = default_table();
        // Haiku 5.5 over 100K prompt tokens (high band: $0.50 in, $0.05
        // read, $2.50 out), a batch (input and output halved, reads not):
        // real: 1000 × 0.50 × 0.5 + 150,000 × 0.05 + 0 = 250 + 7500 = 7750 µ$;
        // uncached: 151,000 × 0.50 × 0.5 = 37,750 µ$; saved 30,000.
        let cost = table.cost(
            Some("claude-haiku-5-5"),
            &usage(1000, 0, 0, 0, 150_000),
            &[Attribute::Batch],
            NOW,
        );
        assert_eq!((priced(cost), cost.saved_micro_usd), (7_750, 30_000));
    }

    #[test]
    fn the_worst_case_prices_the_prompt_at_its_dearest_input_class() {
        let table = default_table();
        // Sonnet 4.5: the 1-hour write ($6) is the dearest input class:
        // 10,000 × 6 + 2,000 × 15 = 60,000 + 30,000 = 90,000 µ$.
        assert_eq!(
            table.worst_case(Some("claude-sonnet-4-5"), 10_000, 2_000, &[], NOW),
            90_000
        );
        // US inference ×1.1 on every class: 99,000 µ$.
        assert_eq!(
            table.worst_case(
                Some("claude-sonnet-4-5"),
                10_000,
                2_000,
                &[Attribute::UsInference],
                NOW
            ),
            99_000
        );
        // An unknown model: the fallback (Opus 4's $30 1-hour write, $75 out):
        // 1,000 × 30 + 100 × 75 = 30,000 + 7,500 = 37,500 µ$.
        assert_eq!(
            table.worst_case(Some("mystery"), 1_000, 100, &[], NOW),
            37_500
        );
    }
}
