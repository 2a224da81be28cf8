//! The per-request key work: parsing the presented `sk-proxy-…` text,
//! hashing its secret and comparing with the stored hash in constant time.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use relay_shared::domain::key::PresentedKey;

fn bench(c: &mut Criterion) {
    let key = PresentedKey::generate();
    let text = key.expose();
    let stored = key.hash();

    let mut group = c.benchmark_group("key");
    group.bench_function("parse_hash_verify", |b| {
        b.iter(|| {
            let parsed = PresentedKey::parse(black_box(&text));
            black_box(parsed.is_ok_and(|k| stored.matches(&k.hash())))
        });
    });
    group.bench_function("parse", |b| {
        b.iter(|| black_box(PresentedKey::parse(black_box(&text)).is_ok()));
    });
    group.bench_function("hash", |b| b.iter(|| black_box(black_box(&key).hash())));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
