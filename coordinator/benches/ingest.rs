//! End-to-end ingest benchmark: many concurrent clients post signed usage batches over HTTPS to an
//! in-process coordinator (real TLS, real durable store), beside the raw ed25519 `verify_batch`
//! rate and the coordinator's own verification path measured in the same run; prints the ratios.
//!
//! `CARGO_TARGET_DIR=... nice cargo bench -p gleaner-coordinator --bench ingest`
//! Environment: `BENCH_DB=sqlite|postgres` (default sqlite), `BENCH_RECORDS` (default 100000),
//! `BENCH_CLIENTS` (16), `BENCH_BATCH` (500 for the throughput run; the latency runs use 50),
//! `BENCH_LOADS` (0.25,0.5: open-loop latency runs at these fractions of the measured
//! throughput), `BENCH_LAT_SECS` (5 per latency run), `BENCH_VERIFY_ROUNDS` (3: raw and path
//! rates measured back to back this many times; medians and the per-round ratios' spread).

#[path = "../tests/support/pg.rs"]
mod pg;

use std::sync::Arc;
use std::time::{Duration, Instant};

use gleaner::cbor::{self, Limits};
use gleaner::envelope::{Kind, open_batch_messages};
use gleaner::{Digest, Envelope, Id16, OutcomeCode, SecretKey, UsageRecord};
use gleaner_coordinator::api::AppState;
use gleaner_coordinator::ratelimit::RateLimits;
use gleaner_coordinator::store::{GroupStats, Store};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Signed batches: `clients` hosts, each with its own batches of `batch` records.
fn make_batches(
    run: u32,
    hosts: &[SecretKey],
    total: usize,
    batch: usize,
) -> Vec<Vec<Vec<Envelope>>> {
    let per_client = total / hosts.len() / batch;
    let end = now() - 60;
    hosts
        .iter()
        .enumerate()
        .map(|(h, key)| {
            (0..per_client)
                .map(|b| {
                    (0..batch)
                        .map(|i| {
                            let mut id = [0u8; 16];
                            id[..4].copy_from_slice(&run.to_be_bytes());
                            id[4..8].copy_from_slice(&(h as u32).to_be_bytes());
                            id[8..12].copy_from_slice(&(b as u32).to_be_bytes());
                            id[12..].copy_from_slice(&(i as u32).to_be_bytes());
                            let r = UsageRecord {
                                v: 1,
                                record_id: Id16(id),
                                host: key.public(),
                                machine_id: Id16(id),
                                publisher: hosts[0].public(),
                                machine_type: Digest([7; 32]),
                                start: end - 600,
                                end,
                                cpu_ms: 300_000,
                                wall_ms: 600_000,
                                peak_memory: 1 << 28,
                                cores: 1,
                                benchmark: 1000,
                                outcome: OutcomeCode::Success,
                            };
                            Envelope::seal(&r, key)
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}

/// Process CPU time (user + system, all threads) in seconds, from /proc (USER_HZ = 100 on Linux).
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |r| r.1);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Records per second of raw `ed25519_dalek::verify_batch` over the same signatures, batch by
/// batch, on `threads` threads. With `decompress`, each signer key is also decompressed per record
/// inside the timing (what a verifier that does not cache keys pays).
fn raw_verify_rate(batches: &[Vec<Envelope>], threads: usize, decompress: bool) -> Rate {
    let tag = Kind::UsageRecord.domain_tag();
    let prepared: Vec<_> = batches
        .iter()
        .map(|b| {
            let msgs: Vec<Vec<u8>> = b
                .iter()
                .map(|e| [tag.as_slice(), e.payload.as_slice()].concat())
                .collect();
            let sigs: Vec<ed25519_dalek::Signature> = b
                .iter()
                .map(|e| ed25519_dalek::Signature::from_bytes(&e.signature))
                .collect();
            let keys: Vec<ed25519_dalek::VerifyingKey> = b
                .iter()
                .map(|e| ed25519_dalek::VerifyingKey::from_bytes(&e.signer).expect("valid key"))
                .collect();
            (msgs, sigs, keys)
        })
        .collect();
    let n: usize = batches.iter().map(Vec::len).sum();
    let cpu0 = cpu_secs();
    let t = Instant::now();
    std::thread::scope(|s| {
        for part in prepared.chunks(prepared.len().div_ceil(threads)) {
            s.spawn(move || {
                for (msgs, sigs, keys) in part {
                    let refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
                    if decompress {
                        let keys: Vec<ed25519_dalek::VerifyingKey> = keys
                            .iter()
                            .map(|k| {
                                ed25519_dalek::VerifyingKey::from_bytes(k.as_bytes())
                                    .expect("valid key")
                            })
                            .collect();
                        assert!(ed25519_dalek::verify_batch(&refs, sigs, &keys).is_ok());
                    } else {
                        assert!(ed25519_dalek::verify_batch(&refs, sigs, keys).is_ok());
                    }
                }
            });
        }
    });
    Rate::new(n, t.elapsed().as_secs_f64(), cpu_secs() - cpu0)
}

/// Records per second of the coordinator's verification path (CBOR decode of the posted batch,
/// header checks, batch verification, payload decode and validation) on `threads` threads.
fn open_rate(bodies: &[Vec<u8>], records: usize, threads: usize) -> Rate {
    let cpu0 = cpu_secs();
    let t = Instant::now();
    std::thread::scope(|s| {
        for part in bodies.chunks(bodies.len().div_ceil(threads)) {
            s.spawn(move || {
                for body in part {
                    let envs: Vec<Envelope> =
                        cbor::from_slice(body, &Limits::BATCH, "batch").expect("batch decodes");
                    let opened = open_batch_messages::<UsageRecord>(&envs);
                    assert!(opened.iter().all(Result::is_ok));
                }
            });
        }
    });
    Rate::new(records, t.elapsed().as_secs_f64(), cpu_secs() - cpu0)
}

/// The middle element of `v` by `key` (the upper one of two).
fn median_by<T: Copy>(mut v: Vec<T>, key: impl Fn(&T) -> f64) -> T {
    v.sort_by(|a, b| key(a).total_cmp(&key(b)));
    v[v.len() / 2]
}

/// A measured rate: records per wall second, and CPU time per record (all threads of this
/// process). The CPU figure holds on a busy shared machine where the wall rate does not.
#[derive(Debug, Clone, Copy)]
struct Rate {
    per_s: f64,
    cpu_us: f64,
}

impl Rate {
    fn new(records: usize, secs: f64, cpu: f64) -> Rate {
        Rate {
            per_s: records as f64 / secs,
            cpu_us: cpu * 1e6 / records as f64,
        }
    }
}

struct Run {
    records: usize,
    secs: f64,
    cpu: f64,
    latencies: Vec<Duration>,
    commits: u64,
    batches: u64,
    commit_time: Duration,
    /// SQLite's WAL syncs after the commits, and their time in `fdatasync`.
    syncs: u64,
    sync_time: Duration,
    /// SQLite's checkpoints beside the writer, WAL restarts the writer waited for (and how long).
    checkpoints: u64,
    restarts: u64,
    restart_time: Duration,
}

impl Run {
    fn new(
        records: usize,
        secs: f64,
        cpu: f64,
        latencies: Vec<Duration>,
        g0: GroupStats,
        g1: GroupStats,
    ) -> Run {
        Run {
            records,
            secs,
            cpu,
            latencies,
            commits: g1.commits - g0.commits,
            batches: g1.batches - g0.batches,
            commit_time: g1.busy - g0.busy,
            syncs: g1.syncs - g0.syncs,
            sync_time: g1.sync_busy - g0.sync_busy,
            checkpoints: g1.checkpoints - g0.checkpoints,
            restarts: g1.restarts - g0.restarts,
            restart_time: g1.restart_busy - g0.restart_busy,
        }
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// Posts every client's batches over HTTPS, each client on its own connection, one request in
/// flight per client (a ledger waits for the acknowledgement before dropping its outbox entries),
/// as fast as acknowledgements come (throughput; a closed loop, so its latencies are those of a
/// saturated server).
async fn post_all(base: &str, store: &Store, per_client: Vec<Vec<Vec<u8>>>, records: usize) -> Run {
    let g0 = store.group_commits();
    let cpu0 = cpu_secs();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for bodies in per_client {
        let url = format!("{base}/api/v1/usage");
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .tls_danger_accept_invalid_certs(true)
                .build()
                .expect("client");
            let mut lat = Vec::with_capacity(bodies.len());
            for body in bodies {
                let n = body.len();
                let t = Instant::now();
                let r = http
                    .post(&url)
                    .header("content-type", "application/cbor")
                    .body(body)
                    .send()
                    .await
                    .expect("post");
                assert!(r.status().is_success(), "{}", r.status());
                let text = r.text().await.expect("answer");
                lat.push(t.elapsed());
                assert!(
                    !text.contains("rejected") && !text.contains("retry"),
                    "{n} bytes: {}",
                    &text[..text.len().min(300)]
                );
            }
            lat
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.expect("client task"));
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_secs() - cpu0;
    latencies.sort();
    let g1 = store.group_commits();
    Run::new(records, secs, cpu, latencies, g0, g1)
}

/// One request's times in milliseconds: as the client saw it (scheduled send to the end of the
/// answer), and the server's stages from its `Server-Timing` header.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    client: f64,
    body: f64,
    verify: f64,
    queue: f64,
    commit: f64,
    sync: f64,
    total: f64,
}

fn parse_server_timing(v: &str) -> Sample {
    let mut s = Sample::default();
    for part in v.split(',') {
        let Some((name, dur)) = part.trim().split_once(";dur=") else {
            continue;
        };
        let d: f64 = dur.parse().unwrap_or(f64::NAN);
        match name {
            "body" => s.body = d,
            "verify" => s.verify = d,
            "queue" => s.queue = d,
            "commit" => s.commit = d,
            "sync" => s.sync = d,
            "total" => s.total = d,
            _ => {}
        }
    }
    s
}

/// An open-loop run: batches are sent on a fixed schedule (`rate` requests per second) whether or
/// not earlier ones were answered, over a shared pool of HTTPS connections, so a slow answer does
/// not hold back the next request (no coordinated omission). Latency counts from the scheduled
/// send. The first tenth of the requests warms the connection pool and is left out.
async fn open_loop(
    base: &str,
    store: &Store,
    bodies: Vec<Vec<u8>>,
    records: usize,
    rate: f64,
) -> (Run, Vec<Sample>) {
    let http = reqwest::Client::builder()
        .tls_danger_accept_invalid_certs(true)
        .build()
        .expect("client");
    let url = format!("{base}/api/v1/usage");
    let n = bodies.len();
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    // At most this many requests outstanding; beyond it the generator waits (and that wait shows
    // in the latency, since it counts from the schedule).
    let in_flight = Arc::new(tokio::sync::Semaphore::new(512));
    let g0 = store.group_commits();
    let cpu0 = cpu_secs();
    let t0 = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for (k, body) in bodies.into_iter().enumerate() {
        let at = t0 + interval * k as u32;
        tokio::time::sleep_until(at).await;
        let permit = in_flight.clone().acquire_owned().await.expect("semaphore");
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(&url)
                .header("content-type", "application/cbor")
                .body(body)
                .send()
                .await
                .expect("post");
            assert!(r.status().is_success(), "{}", r.status());
            let timing = r
                .headers()
                .get("server-timing")
                .and_then(|v| v.to_str().ok())
                .map(parse_server_timing)
                .unwrap_or_default();
            let text = r.text().await.expect("answer");
            let client = at.elapsed().as_secs_f64() * 1000.0;
            drop(permit);
            assert!(
                !text.contains("rejected") && !text.contains("retry"),
                "{}",
                &text[..text.len().min(300)]
            );
            Sample { client, ..timing }
        }));
    }
    let mut samples = Vec::with_capacity(n);
    for t in tasks {
        samples.push(t.await.expect("request task"));
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_secs() - cpu0;
    let g1 = store.group_commits();
    let samples: Vec<Sample> = samples.split_off(n / 10);
    let mut latencies: Vec<Duration> = samples
        .iter()
        .map(|s| Duration::from_secs_f64(s.client / 1000.0))
        .collect();
    latencies.sort();
    (Run::new(records, secs, cpu, latencies, g0, g1), samples)
}

/// Picks one stage's milliseconds out of a sample.
type StageOf = fn(&Sample) -> f64;

/// p50 and p99 of one stage over the samples, in milliseconds.
fn stage(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> (f64, f64) {
    let mut v: Vec<f64> = samples.iter().map(f).collect();
    v.sort_by(f64::total_cmp);
    let at = |p: f64| {
        v.get(((v.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    (at(0.5), at(0.99))
}

fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let total = env("BENCH_RECORDS", 100_000);
    let clients = env("BENCH_CLIENTS", 16).max(1);
    let batch = env("BENCH_BATCH", 500).max(1);
    let db = std::env::var("BENCH_DB").unwrap_or_else(|_| "sqlite".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    let tmp = tempfile::tempdir().expect("temp dir");
    let cluster;
    let url = match db.as_str() {
        "sqlite" => format!("sqlite://{}", tmp.path().join("bench.db").display()),
        "postgres" => {
            cluster = pg::PgCluster::start(true).expect("a PostgreSQL cluster");
            cluster.create_db("bench")
        }
        other => panic!("BENCH_DB must be sqlite or postgres, not {other}"),
    };

    let hosts: Vec<SecretKey> = (0..clients)
        .map(|i| {
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
            SecretKey::from_seed(seed)
        })
        .collect();
    eprintln!("signing {total} records…");
    let tput = make_batches(1, &hosts, total, batch);
    let lat_batch = 50;
    let loads: Vec<f64> = std::env::var("BENCH_LOADS")
        .unwrap_or_else(|_| "0.25,0.5".into())
        .split(',')
        .filter_map(|x| x.trim().parse().ok())
        .collect();
    let lat_secs = env("BENCH_LAT_SECS", 5) as f64;
    let verify_rounds = env("BENCH_VERIFY_ROUNDS", 3).max(1);
    let flat: Vec<Vec<Envelope>> = tput.iter().flatten().cloned().collect();
    let n_tput: usize = flat.iter().map(Vec::len).sum();
    let bodies = |b: &Vec<Vec<Vec<Envelope>>>| -> Vec<Vec<Vec<u8>>> {
        b.iter()
            .map(|c| c.iter().map(cbor::to_vec).collect())
            .collect()
    };
    let tput_bodies = bodies(&tput);
    let flat_bodies: Vec<Vec<u8>> = tput_bodies.iter().flatten().cloned().collect();

    eprintln!("raw verify_batch and the verification path, {verify_rounds} rounds…");
    let load_before = loadavg();
    // Each round measures raw and path back to back, so a ratio compares two rates taken seconds
    // apart; the other sessions' load drifts over minutes and swung single-shot ratios by ±0.2.
    let mut rounds = Vec::with_capacity(verify_rounds);
    for _ in 0..verify_rounds {
        let raw1 = raw_verify_rate(&flat, 1, false);
        let open1 = open_rate(&flat_bodies, n_tput, 1);
        let rawn = raw_verify_rate(&flat, cores, false);
        let openn = open_rate(&flat_bodies, n_tput, cores);
        rounds.push([raw1, open1, rawn, openn]);
    }
    let rawd = raw_verify_rate(&flat, 1, true);
    let median_rate = |i: usize| median_by(rounds.iter().map(|r| r[i]).collect(), |r| r.per_s);
    let (raw1, open1, rawn, openn) = (
        median_rate(0),
        median_rate(1),
        median_rate(2),
        median_rate(3),
    );
    // Raw 2-thread rates around the end-to-end runs: before (the rounds), between, after.
    let mut raw_around: Vec<Rate> = rounds.iter().map(|r| r[2]).collect();

    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("server runtime");
    let (base, store, handle) = server_rt.block_on(async {
        let store = Store::open(&url).await.expect("store");
        store
            .add_account("bench", "bench", "tok", now())
            .await
            .expect("account");
        for h in &hosts {
            store
                .enrol(&h.public(), "bench", now())
                .await
                .expect("enrol");
        }
        let tls = gleaner_coordinator::tls::ensure(tmp.path(), None, None, &["localhost".into()])
            .expect("certificate");
        let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(&tls.cert, &tls.key)
            .await
            .expect("tls config");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let state = Arc::new(AppState::new(
            store.clone(),
            tls.fingerprint.to_string(),
            RateLimits::UNLIMITED,
        ));
        let handle = axum_server::Handle::new();
        let server = axum_server::from_tcp_rustls(listener, config)
            .expect("server")
            .handle(handle.clone())
            .serve(
                gleaner_coordinator::app(state)
                    .into_make_service_with_connect_info::<std::net::SocketAddr>(),
            );
        tokio::spawn(server);
        (format!("https://{addr}"), store, handle)
    });

    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("client runtime");
    eprintln!("ingest over HTTPS…");
    let t_run = client_rt.block_on(post_all(&base, &store, tput_bodies, n_tput));
    raw_around.push(raw_verify_rate(&flat, cores, false));
    let capacity = n_tput as f64 / t_run.secs;
    let mut l_runs = Vec::new();
    let mut n_lat = 0;
    for (i, load) in loads.iter().enumerate() {
        // Offered: this fraction of the throughput just measured, for `lat_secs`, in batches of
        // `lat_batch`, the hosts taking turns.
        let rate = capacity * load;
        let per_host = ((rate * lat_secs) as usize / lat_batch / clients).max(2);
        eprintln!(
            "open loop at {:.0} % of capacity ({rate:.0} records/s)…",
            load * 100.0
        );
        let signed = make_batches(
            2 + i as u32,
            &hosts,
            per_host * lat_batch * clients,
            lat_batch,
        );
        let mut order = Vec::with_capacity(per_host * clients);
        for b in 0..per_host {
            for host in &signed {
                order.push(cbor::to_vec(&host[b]));
            }
        }
        let n = order.len() * lat_batch;
        n_lat += n;
        let (run, samples) =
            client_rt.block_on(open_loop(&base, &store, order, n, rate / lat_batch as f64));
        l_runs.push((*load, rate, run, samples));
    }
    handle.shutdown();
    raw_around.push(raw_verify_rate(&flat, cores, false));
    let raw_e2e = median_by(raw_around.clone(), |r| r.per_s);

    println!(
        "ingest benchmark: {db}, {cores} cores, client and server in one process, \
         {clients} clients; load average {load_before} before, {} after",
        loadavg()
    );
    println!("  {:<52} {:>12} {:>16}", "", "records/s", "CPU µs/record");
    let row = |name: &str, r: Rate| {
        println!("  {name:<52} {:>12.0} {:>16.1}", r.per_s, r.cpu_us);
    };
    row(
        "raw verify_batch, 1 thread (keys decompressed before)",
        raw1,
    );
    row(&format!("raw verify_batch, {cores} threads"), rawn);
    row("raw verify_batch + key decompression, 1 thread", rawd);
    row(
        "verification path (decode + open_batch_messages), 1 thread",
        open1,
    );
    row(&format!("verification path, {cores} threads"), openn);
    let t_rate = Rate::new(t_run.records, t_run.secs, t_run.cpu);
    row(
        &format!("end to end, throughput (batches of {batch})"),
        t_rate,
    );
    for (load, _, r, _) in &l_runs {
        row(
            &format!(
                "end to end, open loop at {:.0} % (batches of {lat_batch})",
                load * 100.0
            ),
            Rate::new(r.records, r.secs, r.cpu),
        );
    }
    println!(
        "  ratios (wall rate; CPU cost in brackets, raw / path; rates above are medians of \
         {verify_rounds} rounds):"
    );
    for (threads, raw, path) in [(1, 0, 1), (cores, 2, 3)] {
        let mut wall: Vec<f64> = rounds
            .iter()
            .map(|r| r[path].per_s / r[raw].per_s)
            .collect();
        let mut cpu: Vec<f64> = rounds
            .iter()
            .map(|r| r[raw].cpu_us / r[path].cpu_us)
            .collect();
        wall.sort_by(f64::total_cmp);
        cpu.sort_by(f64::total_cmp);
        println!(
            "    verification path / raw verify_batch, {threads} thread(s), per round: median \
             {:.2}× ({:.2}×), spread {:.2}–{:.2}× ({:.2}–{:.2}×)",
            wall[wall.len() / 2],
            cpu[cpu.len() / 2],
            wall[0],
            wall[wall.len() - 1],
            cpu[0],
            cpu[cpu.len() - 1]
        );
    }
    let spread: Vec<String> = raw_around
        .iter()
        .map(|r| format!("{:.0}", r.per_s))
        .collect();
    println!(
        "    end to end / raw verify_batch, {cores} threads (median raw of before, between and \
         after the runs: {}): {:.2}× ({:.2}×)",
        spread.join(", "),
        t_rate.per_s / raw_e2e.per_s,
        raw_e2e.cpu_us / t_rate.cpu_us
    );
    let mut runs = vec![("throughput, closed loop".to_string(), &t_run)];
    for (load, rate, r, _) in &l_runs {
        runs.push((
            format!(
                "open loop {:.0} % ({rate:.0} records/s offered)",
                load * 100.0
            ),
            r,
        ));
    }
    for (name, r) in runs {
        println!(
            "  durable-ack latency, {name}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; \
             {} commits for {} batches ({:.1} batches per commit, {:.1} ms each on average); \
             {} WAL syncs ({:.1} ms each on average); {} checkpoints beside the writer, \
             {} WAL restarts ({:.1} ms each on average, the writer held)",
            pct(&r.latencies, 0.5),
            pct(&r.latencies, 0.99),
            pct(&r.latencies, 1.0),
            r.commits,
            r.batches,
            r.batches as f64 / r.commits.max(1) as f64,
            r.commit_time.as_secs_f64() * 1000.0 / r.commits.max(1) as f64,
            r.syncs,
            r.sync_time.as_secs_f64() * 1000.0 / r.syncs.max(1) as f64,
            r.checkpoints,
            r.restarts,
            r.restart_time.as_secs_f64() * 1000.0 / r.restarts.max(1) as f64
        );
    }
    for (load, _, _, samples) in &l_runs {
        println!(
            "  stages at {:.0} % load, p50 / p99 ms (server's Server-Timing; outside = client-seen minus server total: TLS, HTTP, client):",
            load * 100.0
        );
        let stages: [(&str, StageOf); 8] = [
            ("body read", |s| s.body),
            ("verify (with wait for a core)", |s| s.verify),
            ("queue for a writer", |s| s.queue),
            ("group commit (to COMMIT's return)", |s| s.commit),
            ("WAL sync after commit (SQLite)", |s| s.sync),
            ("server total", |s| s.total),
            ("outside the server", |s| s.client - s.total),
            ("client-seen", |s| s.client),
        ];
        for (name, f) in stages {
            let (p50, p99) = stage(samples, f);
            println!("    {name:<32} {p50:>8.2} {p99:>8.2}");
        }
    }
    server_rt.block_on(async {
        let stats = store.stats().await.expect("stats");
        assert_eq!(stats.records as usize, n_tput + n_lat, "every record once");
    });
}
