//! The printed result: one markdown table of medians and ranges over the
//! repetitions, with targets, plus the criterion micro-benchmarks' headline
//! numbers read from their JSON output.

use std::collections::BTreeMap;
use std::path::Path;

use crate::stats::Spread;

/// Every figure, by name, one value per repetition.
#[derive(Default)]
pub struct Figures(BTreeMap<String, Vec<f64>>);

impl Figures {
    pub fn push(&mut self, name: &str, value: f64) {
        self.0.entry(name.to_owned()).or_default().push(value);
    }

    /// The value pushed last (this repetition's).
    pub fn last(&self, name: &str) -> Option<f64> {
        self.0.get(name).and_then(|v| v.last().copied())
    }

    pub fn spread(&self, name: &str) -> Option<Spread> {
        self.0.get(name).and_then(|v| Spread::of(v))
    }
}

/// A value with about three significant digits.
pub fn number(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn cell(spread: Option<Spread>, decimals: Option<usize>) -> String {
    let show = |v: f64| match decimals {
        Some(d) => format!("{v:.d$}"),
        None => number(v),
    };
    match spread {
        None => "—".into(),
        Some(s) if s.min == s.max => show(s.median),
        Some(s) => format!("{} ({}–{})", show(s.median), show(s.min), show(s.max)),
    }
}

/// A target on the median of one figure.
#[derive(Clone, Copy)]
pub enum Target {
    AtMost(f64),
}

impl Target {
    fn text(self) -> String {
        match self {
            Target::AtMost(v) => format!("≤ {}", number(v)),
        }
    }

    fn met(self, value: f64) -> bool {
        match self {
            Target::AtMost(v) => value <= v,
        }
    }
}

pub struct Row {
    pub measure: String,
    pub relay: String,
    pub direct: String,
    pub target: String,
    pub met: String,
}

impl Row {
    /// A row from figures: `relay` and `direct` name series (either may be
    /// absent); the target applies to the relay column's median. `decimals`
    /// fixes the precision (default: about three significant digits).
    pub fn of(
        figures: &Figures,
        measure: &str,
        relay: Option<&str>,
        direct: Option<&str>,
        target: Option<Target>,
        decimals: Option<usize>,
    ) -> Row {
        let relay_spread = relay.and_then(|n| figures.spread(n));
        let (target_text, met) = match (target, relay_spread) {
            (Some(t), Some(s)) => (t.text(), if t.met(s.median) { "yes" } else { "**no**" }),
            (Some(t), None) => (t.text(), "?"),
            (None, _) => ("—".to_owned(), ""),
        };
        Row {
            measure: measure.to_owned(),
            relay: cell(relay_spread, decimals),
            direct: cell(direct.and_then(|n| figures.spread(n)), decimals),
            target: target_text,
            met: met.to_owned(),
        }
    }

    pub fn text(measure: &str, relay: String) -> Row {
        Row {
            measure: measure.to_owned(),
            relay,
            direct: "—".into(),
            target: "—".into(),
            met: String::new(),
        }
    }
}

pub fn table(rows: &[Row]) -> String {
    let mut out =
        String::from("| measure | relay | fake direct | target | met? |\n|---|---|---|---|---|\n");
    for row in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            row.measure, row.relay, row.direct, row.target, row.met
        ));
    }
    out
}

/// One criterion result: median time per iteration and, when declared,
/// bytes per iteration.
pub struct Micro {
    pub median_ns: f64,
    pub bytes: Option<u64>,
}

/// Reads `<dir>/<group>/<function>/new/{benchmark,estimates}.json`.
pub fn criterion_results(dir: &Path) -> BTreeMap<String, Micro> {
    let mut found = BTreeMap::new();
    let mut stack = vec![(dir.to_owned(), 0)];
    while let Some((path, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&path) else {
            continue;
        };
        for entry in entries.flatten() {
            let p = entry.path();
            if p.is_dir() && depth < 4 {
                stack.push((p, depth + 1));
            } else if p.file_name().is_some_and(|n| n == "benchmark.json")
                && p.parent()
                    .and_then(Path::file_name)
                    .is_some_and(|n| n == "new")
                && let Some((id, micro)) = read_micro(&p)
            {
                found.insert(id, micro);
            }
        }
    }
    found
}

fn read_micro(benchmark: &Path) -> Option<(String, Micro)> {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(benchmark).ok()?).ok()?;
    let estimates: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(benchmark.with_file_name("estimates.json")).ok()?,
    )
    .ok()?;
    let id = meta.get("full_id")?.as_str()?.to_owned();
    let median_ns = estimates.get("median")?.get("point_estimate")?.as_f64()?;
    let bytes = meta
        .get("throughput")
        .and_then(|t| t.get("Bytes"))
        .and_then(serde_json::Value::as_u64);
    Some((id, Micro { median_ns, bytes }))
}

/// `1.23 µs`, `456 ns`, `7.89 ms`.
pub fn duration_text(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{} ms", number(ns / 1e6))
    } else if ns >= 1e3 {
        format!("{} µs", number(ns / 1e3))
    } else {
        format!("{} ns", number(ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_show_median_and_range() {
        let mut f = Figures::default();
        for v in [3.0, 1.0, 2.0] {
            f.push("x", v);
        }
        let row = Row::of(&f, "x", Some("x"), None, Some(Target::AtMost(2.5)), None);
        assert_eq!(row.relay, "2.00 (1.00–3.00)");
        assert_eq!(row.direct, "—");
        assert_eq!((row.target.as_str(), row.met.as_str()), ("≤ 2.50", "yes"));
        let missed = Row::of(&f, "x", Some("x"), None, Some(Target::AtMost(1.0)), Some(3));
        assert_eq!(missed.met, "**no**");
        assert_eq!(missed.relay, "2.000 (1.000–3.000)");
    }

    #[test]
    fn durations_pick_a_unit() {
        assert_eq!(duration_text(512.0), "512 ns");
        assert_eq!(duration_text(1530.0), "1.53 µs");
        assert_eq!(duration_text(2.5e6), "2.50 ms");
    }
}
