//! The host benchmark: a short single-core integer (SHA-256) and floating-point (dense matrix
//! product) workload, scored against a reference machine so that the reference scores 1000. The
//! score is per core and is what usage records and capacity adverts carry (the credit normaliser).
//!
//! Each half runs several short rounds and keeps its best round, which is what makes the score
//! repeatable on a shared machine: interference only ever slows a round down. The whole run stays
//! under two seconds. The daemon runs it at start, caches it in `<state_dir>/benchmark.json` with a
//! timestamp, and re-runs it daily when no machine is running.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Changes whenever the workload or the reference changes; an older cached score is re-measured.
pub const VERSION: u32 = 1;
/// A cached score older than this is re-measured.
pub const MAX_AGE_S: u64 = 24 * 3600;

/// SHA-256 bytes per second on the reference machine (release build; the 2-core Debian 12 build
/// host of 2026-12, whose CPU has the SHA extensions).
const REFERENCE_INTEGER: f64 = 6.8e8;
/// Multiply-adds per second of the matrix product on the reference machine (release build).
const REFERENCE_FLOAT: f64 = 2.1e9;

const ROUNDS: u32 = 5;
const ROUND: Duration = Duration::from_millis(70);
const BUDGET: Duration = Duration::from_millis(1800);

/// One measurement.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    /// The score: the geometric mean of the two halves.
    pub score: u32,
    pub integer: u32,
    pub float: u32,
    /// Wall time the run took, in milliseconds.
    pub took_ms: u64,
}

/// The best rate (work per second) of [`ROUNDS`] rounds of `step`, within `deadline`.
fn best_rate(deadline: Instant, mut step: impl FnMut() -> u64) -> f64 {
    let mut best = 0.0f64;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        let mut work = 0u64;
        while start.elapsed() < ROUND {
            work += step();
        }
        let rate = work as f64 / start.elapsed().as_secs_f64();
        best = best.max(rate);
        if Instant::now() >= deadline {
            break;
        }
    }
    best
}

fn scaled(rate: f64, reference: f64) -> u32 {
    (rate / reference * 1000.0)
        .round()
        .clamp(1.0, f64::from(u32::MAX)) as u32
}

/// Runs the benchmark on the calling thread (about 0.7 s; never more than about 2 s).
pub fn measure() -> Measurement {
    let start = Instant::now();
    let mut int = gleaner_hostbench::Integer::default();
    let integer = best_rate(start + BUDGET / 2, || int.run(4));
    std::hint::black_box(int.head());
    let mut fl = gleaner_hostbench::Float::default();
    let float = best_rate(start + BUDGET, || fl.run());
    std::hint::black_box(fl.checksum());
    let (integer, float) = (
        scaled(integer, REFERENCE_INTEGER),
        scaled(float, REFERENCE_FLOAT),
    );
    Measurement {
        score: ((f64::from(integer) * f64::from(float)).sqrt().round() as u32).max(1),
        integer,
        float,
        took_ms: start.elapsed().as_millis() as u64,
    }
}

/// Run-to-run spread of several scores.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    pub mean: f64,
    pub min: u32,
    pub max: u32,
    pub stddev: f64,
    /// Standard deviation as a percentage of the mean.
    pub stddev_pct: f64,
    /// (max - min) as a percentage of the mean.
    pub range_pct: f64,
}

impl Spread {
    pub fn of(scores: &[u32]) -> Spread {
        let n = scores.len().max(1) as f64;
        let mean = scores.iter().map(|s| f64::from(*s)).sum::<f64>() / n;
        let var = scores
            .iter()
            .map(|s| (f64::from(*s) - mean).powi(2))
            .sum::<f64>()
            / n;
        let (min, max) = (
            scores.iter().copied().min().unwrap_or(0),
            scores.iter().copied().max().unwrap_or(0),
        );
        let pct = |x: f64| if mean > 0.0 { x / mean * 100.0 } else { 0.0 };
        Spread {
            mean,
            min,
            max,
            stddev: var.sqrt(),
            stddev_pct: pct(var.sqrt()),
            range_pct: pct(f64::from(max - min)),
        }
    }
}

/// The cached score in the state dir.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Cached {
    pub version: u32,
    /// Unix seconds when measured.
    pub at: u64,
    #[serde(flatten)]
    pub measurement: Measurement,
}

impl Cached {
    /// Whether this cached score may still be used at `now`.
    pub fn is_current(&self, now: u64) -> bool {
        self.version == VERSION && self.at <= now && now - self.at < MAX_AGE_S
    }
}

pub fn cache_path(state_dir: &Path) -> PathBuf {
    state_dir.join("benchmark.json")
}

/// The cached score, if there is a readable one.
pub fn load(state_dir: &Path) -> Option<Cached> {
    let text = std::fs::read_to_string(cache_path(state_dir)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Measures and caches (atomically); a cache that cannot be written is logged, not fatal.
pub fn measure_and_cache(state_dir: &Path, now: u64) -> Cached {
    let c = Cached {
        version: VERSION,
        at: now,
        measurement: measure(),
    };
    match serde_json::to_vec_pretty(&c) {
        Ok(bytes) => {
            if let Err(e) = crate::image_archive::write_atomic(&cache_path(state_dir), &bytes) {
                tracing::warn!("cannot cache the benchmark: {e}");
            }
        }
        Err(e) => tracing::warn!("cannot cache the benchmark: {e}"),
    }
    tracing::info!(
        "host benchmark: {} per core (integer {}, float {}) in {} ms",
        c.measurement.score,
        c.measurement.integer,
        c.measurement.float,
        c.measurement.took_ms
    );
    c
}

/// The cached score when current, else a fresh measurement (cached).
pub fn current_or_measure(state_dir: &Path, now: u64) -> Cached {
    match load(state_dir) {
        Some(c) if c.is_current(now) => c,
        _ => measure_and_cache(state_dir, now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_short_and_scores_and_caches() {
        let dir = tempfile::tempdir().unwrap();
        let c = current_or_measure(dir.path(), 1_000_000);
        assert!(c.measurement.took_ms <= 2_500, "{c:?}");
        assert!(c.measurement.score >= 1);
        // Cached: the same score comes back without a new run within a day, not after.
        let again = current_or_measure(dir.path(), 1_000_000 + 3600);
        assert_eq!(again, c);
        let stale = load(dir.path()).unwrap();
        assert!(!stale.is_current(1_000_000 + MAX_AGE_S));
        assert!(
            !stale.is_current(999_999),
            "a clock that went backwards re-measures"
        );
    }

    #[test]
    fn spread_of_scores() {
        let s = Spread::of(&[990, 1000, 1010]);
        assert_eq!((s.min, s.max), (990, 1010));
        assert!((s.mean - 1000.0).abs() < 1e-9);
        assert!((s.range_pct - 2.0).abs() < 1e-9);
    }
}
