//! The admission rules without I/O: `check_access` on a key record with
//! IP, origin and model allowlists, for a request that passes every rule
//! (the common case, and the one that evaluates them all); and the
//! admission decision on a stored key that passes every check.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{Criterion, criterion_group, criterion_main};
use ipnet::IpNet;
use relay_shared::domain::admission::{BudgetCheck, Charge, KeyState, RateLimit, decide};
use relay_shared::domain::budget::{BudgetPolicy, BudgetZone, DollarLimit, Window};
use relay_shared::domain::key::ApiKeyRecord;
use relay_shared::domain::key::PresentedKey;
use relay_shared::domain::key::access::{RequestFacts, check_access};
use time::{Duration, OffsetDateTime};

fn record() -> ApiKeyRecord {
    record_of(&PresentedKey::generate())
}

fn record_of(key: &PresentedKey) -> ApiKeyRecord {
    let now = OffsetDateTime::now_utc();
    let nets = [
        "10.0.0.0/8",
        "172.16.0.0/12",
        "2001:db8::/32",
        "203.0.113.0/24",
        "198.51.100.7/32",
        "127.0.0.0/8",
    ];
    ApiKeyRecord {
        id: key.id().clone(),
        name: "bench".into(),
        description: None,
        prefix: "sk-proxy-".into(),
        secret_hash: key.hash(),
        is_active: true,
        created_at: now,
        updated_at: now,
        expires_at: Some(now + Duration::days(365)),
        token_limit: Some(50_000_000),
        tokens_used: 1_234_567,
        tokens_reserved: 0,
        rate_limit_tier: "premium".into(),
        allowed_ips: nets
            .iter()
            .filter_map(|n| n.parse::<IpNet>().ok())
            .collect(),
        allowed_origins: vec![
            "https://claude.ai".into(),
            "internal.corp.example".into(),
            "*.example.com".into(),
        ],
        allowed_models: vec![
            "claude-opus-4-1".into(),
            "claude-haiku-*".into(),
            "claude-sonnet-*".into(),
        ],
        rate_window: Some((1_700_000_000, 17)),
        dollar_limits: Some(vec![
            DollarLimit {
                window: Window::Day,
                limit: 20_000_000,
                models: None,
            },
            DollarLimit {
                window: Window::Week,
                limit: 50_000_000,
                models: Some("claude-opus-*".into()),
            },
            DollarLimit {
                window: Window::FiveHours,
                limit: 5_000_000,
                models: None,
            },
        ]),
        spend: Default::default(),
        five_hour_start: None,
        budget_alerts: Default::default(),
        flights: Vec::new(),
        max_concurrent: Some(4),
        in_flight: 0,
        tokens_per_minute: Default::default(),
        limit_mode: relay_shared::domain::key::LimitMode::Soft,
    }
}

fn bench(c: &mut Criterion) {
    let record = record();
    assert_eq!(record.allowed_ips.len(), 6, "every CIDR must parse");
    let facts = RequestFacts {
        // Matches the last CIDR, so every entry before it is tried.
        ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        origin: Some("https://app.example.com"),
        model: Some("claude-sonnet-4-5-20250929"),
        names_model: true,
    };
    let now = OffsetDateTime::now_utc();
    assert!(check_access(&record, &facts, now).is_ok());
    c.bench_function("check_access/allowlists_pass", |b| {
        b.iter(|| black_box(check_access(black_box(&record), black_box(&facts), now).is_ok()));
    });

    let key = PresentedKey::generate();
    let mut stored = record_of(&key);
    let hash = key.hash();
    let rate = RateLimit {
        requests: 1000,
        period: 60,
        tokens_per_minute: None,
    };
    stored.rate_window = None;
    // Calendar periods in a zone with daylight saving: the dearer case.
    let Ok(zone) = BudgetZone::named("Europe/Paris") else {
        panic!("Europe/Paris is in the bundled tz database");
    };
    let policy = BudgetPolicy {
        default_limits: Vec::new(),
        zone,
    };
    let budget = BudgetCheck {
        policy: &policy,
        models: &["claude-opus-4-5"],
        worst: None,
    };
    assert!(
        decide(
            KeyState::Stored(Some(&stored)),
            &hash,
            rate,
            Charge::MESSAGE,
            budget,
            now
        )
        .is_ok()
    );
    c.bench_function("admission/decide_stored_key", |b| {
        b.iter(|| {
            black_box(decide(
                KeyState::Stored(Some(black_box(&stored))),
                black_box(&hash),
                rate,
                Charge::MESSAGE,
                budget,
                now,
            ))
        });
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
