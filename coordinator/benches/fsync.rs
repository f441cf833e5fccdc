//! The disk under the ingest ack, measured on its own: `fdatasync` latency of a file being
//! appended to, of a preallocated file overwritten in place (no size change, so no metadata to
//! journal on ext4), and of two threads syncing the same file at once (do their syncs overlap or
//! take turns?) — what tells whether a sync stage that lets a second commit's sync start while the
//! first one's runs can shorten the ack (docs/BENCHMARKS.md, "Coordinator ingest").
//!
//! `CARGO_TARGET_DIR=... nice cargo bench -p gleaner-coordinator --bench fsync`
//! Environment: `BENCH_DIR` (the folder to measure in; default the temporary folder, where the
//! ingest bench keeps its database), `BENCH_SYNCS` (300 per case), `BENCH_WRITE` (16384 bytes
//! written before each sync), `BENCH_ROUNDS` (3: the cases take turns this many times).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// One sync: when it started and ended, relative to the case's start.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: Duration,
    end: Duration,
}

impl Span {
    fn len(&self) -> Duration {
        self.end - self.start
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted
        .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or_default()
}

/// Prints p50 / p99 / max of the syncs' durations and syncs per wall second.
fn report(name: &str, spans: &[Span], wall: Duration) {
    let mut d: Vec<Duration> = spans.iter().map(Span::len).collect();
    d.sort();
    println!(
        "  {name:<58} {:>7.2} {:>7.2} {:>7.2} {:>8.0}",
        ms(pct(&d, 0.5)),
        ms(pct(&d, 0.99)),
        ms(pct(&d, 1.0)),
        spans.len() as f64 / wall.as_secs_f64()
    );
}

fn create(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()))
}

/// A file of `len` bytes of written zeros (real blocks, not a hole or unwritten extents, so that
/// overwriting them changes no metadata), made durable before the measurement.
fn preallocated(path: &Path, len: usize) -> File {
    let mut f = create(path);
    let chunk = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        f.write_all(&chunk[..n]).expect("preallocating");
        left -= n;
    }
    f.sync_all().expect("syncing the preallocated file");
    f
}

/// Every write's content differs from everything written before (a counter stamped into each
/// 512-byte sector): a virtual disk may skip or cheapen writes of unchanged blocks, which would
/// measure the hypervisor, not the sync.
static STAMP: AtomicU64 = AtomicU64::new(1);

/// `n` rounds of: write `buf` (stamped) at the offset `at(i)`, then `fdatasync` (or `fsync` with
/// `full`).
fn syncs(
    f: &File,
    n: usize,
    buf: &[u8],
    at: impl Fn(usize) -> u64,
    full: bool,
    t0: Instant,
) -> Vec<Span> {
    let mut buf = buf.to_vec();
    (0..n)
        .map(|i| {
            let stamp = STAMP.fetch_add(1, Ordering::Relaxed).to_le_bytes();
            for sector in buf.chunks_mut(512) {
                let k = sector.len().min(8);
                sector[..k].copy_from_slice(&stamp[..k]);
            }
            f.write_all_at(&buf, at(i)).expect("writing");
            let start = t0.elapsed();
            if full {
                f.sync_all().expect("fsync");
            } else {
                f.sync_data().expect("fdatasync");
            }
            Span {
                start,
                end: t0.elapsed(),
            }
        })
        .collect()
}

/// Two threads, each with its own descriptor of the same file, each writing its own region and
/// syncing, `n` times each, started together. Returns each thread's spans.
fn two_threads(
    path: &Path,
    n: usize,
    buf: &[u8],
    append: bool,
    t0: Instant,
) -> (Vec<Span>, Vec<Span>, Duration) {
    let barrier = Arc::new(Barrier::new(2));
    let started = Instant::now();
    let run = |k: usize| {
        let barrier = barrier.clone();
        let path = path.to_path_buf();
        let buf = buf.to_vec();
        std::thread::spawn(move || {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .expect("opening the shared file");
            barrier.wait();
            let w = buf.len() as u64;
            if append {
                // Both append: each write goes to the end of the file as it is now.
                let at = |_| f.metadata().map(|m| m.len()).unwrap_or(0);
                syncs(&f, n, &buf, at, false, t0)
            } else {
                // Interleaved slots of the preallocated file: thread k writes slots k, k+2, ...
                syncs(&f, n, &buf, |i| (2 * i + k) as u64 * w, false, t0)
            }
        })
    };
    let (a, b) = (run(0), run(1));
    let a = a.join().expect("thread a");
    let b = b.join().expect("thread b");
    (a, b, started.elapsed())
}

/// Of the time thread `a` spent in syncs, the fraction during which thread `b` was in one too.
/// 0 when they took turns, up to 1 when every sync ran beside one of the other thread's.
fn overlap(a: &[Span], b: &[Span]) -> f64 {
    let total: Duration = a.iter().map(Span::len).sum();
    let mut both = Duration::ZERO;
    for x in a {
        for y in b {
            let s = x.start.max(y.start);
            let e = x.end.min(y.end);
            if e > s {
                both += e - s;
            }
        }
    }
    both.as_secs_f64() / total.as_secs_f64().max(1e-9)
}

fn main() {
    let dir: PathBuf = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let n = env("BENCH_SYNCS", 300).max(2);
    let w = env("BENCH_WRITE", 16384).max(1);
    let tmp = tempfile::tempdir_in(&dir).expect("a temporary folder");
    let buf = vec![0x5au8; w];
    let load_before = loadavg();
    let rounds = env("BENCH_ROUNDS", 3).max(1);
    let per = (n / rounds).max(1);

    let append = tmp.path().join("append");
    let append_fsync = tmp.path().join("append-fsync");
    let pre = tmp.path().join("preallocated");
    let shared_append = tmp.path().join("append-shared");
    let (fa, faf) = (create(&append), create(&append_fsync));
    create(&shared_append);
    let fp = preallocated(&pre, 4 * n * w);
    let (mut a, mut af, mut b, mut bf) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut c1, mut c2, mut d1, mut d2) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut single_wall, mut c_wall, mut d_wall) =
        (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    // The disk is shared and its speed drifts, so the cases take turns: the single-threaded ones
    // one sync each in rotation, and the two-thread phases between them, `rounds` times.
    let epoch = Instant::now();
    for r in 0..rounds {
        let t0 = Instant::now();
        for k in 0..per {
            let i = r * per + k;
            // (a) appending: every sync also makes the new file size durable (a journal commit
            // on ext4); (a') the same with fsync, which SQLite's unix VFS calls (it is built
            // without HAVE_FDATASYNC).
            a.extend(syncs(&fa, 1, &buf, |_| (i * w) as u64, false, t0));
            af.extend(syncs(&faf, 1, &buf, |_| (i * w) as u64, true, t0));
            // (b) overwriting a preallocated file in place: data blocks only; (b') with fsync,
            // which must also journal the new mtime that fdatasync may skip.
            b.extend(syncs(&fp, 1, &buf, |_| (i * w) as u64, false, t0));
            bf.extend(syncs(&fp, 1, &buf, |_| ((n + i) * w) as u64, true, t0));
        }
        single_wall += t0.elapsed();
        // (c) two threads syncing the same preallocated file at once, (c') the same appending.
        let (x, y, wall) = two_threads(&pre, per, &buf, false, epoch);
        c1.extend(x);
        c2.extend(y);
        c_wall += wall;
        let (x, y, wall) = two_threads(&shared_append, per, &buf, true, epoch);
        d1.extend(x);
        d2.extend(y);
        d_wall += wall;
    }
    // The single-threaded cases shared their wall time; each one's rate is over a quarter of it.
    let (a_wall, af_wall, b_wall, bf_wall) = (
        single_wall / 4,
        single_wall / 4,
        single_wall / 4,
        single_wall / 4,
    );

    println!(
        "fdatasync latency in {} ({} syncs per case, {w} bytes written before each); \
         load average {load_before} before, {} after",
        dir.display(),
        n,
        loadavg()
    );
    println!(
        "  {:<58} {:>7} {:>7} {:>7} {:>8}",
        "case (ms)", "p50", "p99", "max", "syncs/s"
    );
    report("(a) appending, fdatasync", &a, a_wall);
    report("(a') appending, fsync", &af, af_wall);
    report(
        "(b) preallocated, overwritten in place, fdatasync",
        &b,
        b_wall,
    );
    report(
        "(b') preallocated, overwritten in place, fsync",
        &bf,
        bf_wall,
    );
    let both = |x: &[Span], y: &[Span]| [x, y].concat();
    report(
        "(c) 2 threads, same preallocated file, each sync",
        &both(&c1, &c2),
        c_wall,
    );
    report(
        "(c') 2 threads, same appending file, each sync",
        &both(&d1, &d2),
        d_wall,
    );
    println!(
        "  overlap: of a thread's sync time, the share during which the other thread was syncing \
         too (0 = they take turns): preallocated {:.2} / {:.2}, appending {:.2} / {:.2}",
        overlap(&c1, &c2),
        overlap(&c2, &c1),
        overlap(&d1, &d2),
        overlap(&d2, &d1)
    );
}
