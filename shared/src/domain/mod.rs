//! Pure business rules: key records and their validation, tiers, allowlists,
//! the admission decision, the login lockout, usage records and arithmetic,
//! prices and what a request costs, and the price table as admins write it.
//! No I/O and no transport types live here: the store executes these rules.

pub mod admission;
pub mod bedrock;
pub mod budget;
pub mod client_setup;
pub mod flight;
pub mod key;
pub mod login;
pub mod model_catalog;
pub mod price;
pub mod price_list;
pub mod route;
pub mod tier;
pub mod tpm;
pub mod upstream_pool;
pub mod usage;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Timestamps are stored and shown as RFC 3339 UTC with millisecond precision:
/// a fixed width keeps them sortable as strings in DynamoDB sort keys.
pub fn format_timestamp(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.millisecond()
    )
}

/// The calendar day (`yyyy-mm-dd`, in the moment's own offset: the relay
/// passes UTC moments) a moment falls on: what daily
/// aggregates are kept and asked for by.
pub fn day_of(at: OffsetDateTime) -> String {
    format!(
        "{:04}-{:02}-{:02}",
        at.year(),
        u8::from(at.month()),
        at.day()
    )
}

pub fn parse_timestamp(text: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(text, &Rfc3339).ok()
}

/// Seconds since the Unix epoch (0 for earlier moments): rate windows,
/// lockouts and TTLs count in these.
pub fn epoch_seconds(at: OffsetDateTime) -> u64 {
    at.unix_timestamp().max(0).unsigned_abs()
}

/// Wall-clock "now"; one place, so the store and the rules agree.
pub fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_have_fixed_width_and_round_trip() {
        let at = parse_timestamp("2026-03-04T05:06:07.5+02:00").unwrap();
        let text = format_timestamp(at);
        assert_eq!(text, "2026-03-04T03:06:07.500Z");
        assert_eq!(parse_timestamp(&text).unwrap(), at);
    }

    #[test]
    fn a_day_is_its_calendar_date() {
        let at = parse_timestamp("2026-03-04T23:59:59.999Z").unwrap();
        assert_eq!(day_of(at), "2026-03-04");
    }
}
