//! Wire benchmarks: CBOR encode/decode of a usage record beside postcard (the size/speed baseline,
//! measured in the same run), sign, verify, and batch verify.
//!
//! `cargo bench -p gleaner --bench wire` prints a ratio table first, then criterion's detail.

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, Throughput};
use gleaner::cbor::{self, Limits};
use gleaner::envelope::open_batch;
use gleaner::{Digest, Envelope, Id16, OutcomeCode, SecretKey, UsageRecord};

fn record(i: u8) -> UsageRecord {
    UsageRecord {
        v: 1,
        record_id: Id16([i; 16]),
        host: SecretKey::from_seed([2; 32]).public(),
        machine_id: Id16([0x22; 16]),
        publisher: SecretKey::from_seed([1; 32]).public(),
        machine_type: Digest([0x33; 32]),
        start: 1_800_000_000,
        end: 1_800_003_600,
        cpu_ms: 3_000_000,
        wall_ms: 3_600_000,
        peak_memory: 268_435_456,
        cores: 2,
        benchmark: 1500,
        outcome: OutcomeCode::Success,
    }
}

/// Median ns per call of `f` over a few batches.
fn ns_per_call(mut f: impl FnMut()) -> f64 {
    let n = 20_000u32;
    let mut runs: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..n {
                f();
            }
            t.elapsed().as_nanos() as f64 / f64::from(n)
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

fn ratio_table() {
    let r = record(1);
    let cbor_bytes = cbor::to_vec(&r);
    let post_bytes = postcard::to_stdvec(&r).expect("postcard encodes");
    let dec_cbor = ns_per_call(|| {
        black_box(
            cbor::from_slice::<UsageRecord>(black_box(&cbor_bytes), &Limits::PAYLOAD, "r")
                .expect("decodes"),
        );
    });
    let dec_post = ns_per_call(|| {
        black_box(postcard::from_bytes::<UsageRecord>(black_box(&post_bytes)).expect("decodes"));
    });
    let prescan = ns_per_call(|| {
        cbor::check_limits(black_box(&cbor_bytes), &Limits::PAYLOAD).expect("ok");
    });
    let enc_cbor = ns_per_call(|| {
        black_box(cbor::to_vec(black_box(&r)));
    });
    let enc_post = ns_per_call(|| {
        black_box(postcard::to_stdvec(black_box(&r)).expect("encodes"));
    });
    println!("usage record wire format (baseline: postcard, same run)");
    println!("  metric        cbor      postcard   ratio   goal");
    println!(
        "  size bytes    {:<9} {:<10} {:<7.2} <= 1.20",
        cbor_bytes.len(),
        post_bytes.len(),
        cbor_bytes.len() as f64 / post_bytes.len() as f64
    );
    println!(
        "  decode ns     {dec_cbor:<9.0} {dec_post:<10.0} {:<7.2} cbor <= 500 ns",
        dec_cbor / dec_post
    );
    println!(
        "  encode ns     {enc_cbor:<9.0} {enc_post:<10.0} {:<7.2}",
        enc_cbor / enc_post
    );
    println!("  (cbor decode includes the limit prescan: {prescan:.0} ns)");
}

fn benches(c: &mut Criterion) {
    let key = SecretKey::from_seed([2; 32]);
    let r = record(1);
    let cbor_bytes = cbor::to_vec(&r);
    let post_bytes = postcard::to_stdvec(&r).expect("postcard encodes");
    let mut g = c.benchmark_group("usage-record");
    g.bench_function("cbor-decode", |b| {
        b.iter(|| cbor::from_slice::<UsageRecord>(black_box(&cbor_bytes), &Limits::PAYLOAD, "r"))
    });
    g.bench_function("postcard-decode", |b| {
        b.iter(|| postcard::from_bytes::<UsageRecord>(black_box(&post_bytes)))
    });
    g.bench_function("cbor-encode", |b| b.iter(|| cbor::to_vec(black_box(&r))));
    g.bench_function("postcard-encode", |b| {
        b.iter(|| postcard::to_stdvec(black_box(&r)))
    });
    g.bench_function("sign", |b| b.iter(|| Envelope::seal(black_box(&r), &key)));
    let env = Envelope::seal(&r, &key);
    g.bench_function("open (verify_strict + decode)", |b| {
        b.iter(|| black_box(&env).open::<UsageRecord>())
    });
    g.finish();

    let envs: Vec<Envelope> = (0..64).map(|i| Envelope::seal(&record(i), &key)).collect();
    let mut g = c.benchmark_group("batch-64");
    g.throughput(Throughput::Elements(64));
    g.bench_function("open_batch", |b| {
        b.iter(|| open_batch::<UsageRecord>(black_box(&envs)))
    });
    g.bench_function("open one by one", |b| {
        b.iter(|| {
            black_box(&envs)
                .iter()
                .map(|e| e.open::<UsageRecord>())
                .collect::<Vec<_>>()
        })
    });
    g.finish();
}

fn main() {
    ratio_table();
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c);
    c.final_summary();
}
