//! The credit formula (docs/credit.md), pure: CPU time normalised by the host's benchmark and the
//! machine type's weight, with anti-cheat caps, and a decaying recent average like BOINC's RAC.

use crate::UsageRecord;

/// Credit for one core-hour on the reference machine (benchmark score 1000) at weight 1.0.
pub const CREDIT_PER_CORE_HOUR: f64 = 100.0;
/// The benchmark score of the reference machine.
pub const REFERENCE_BENCHMARK: f64 = 1000.0;
/// A host's benchmark scale is held within these bounds; beyond them the host is flagged.
pub const SCALE_MIN: f64 = 0.25;
pub const SCALE_MAX: f64 = 4.0;
/// Most credit a single record may earn (24 core-hours at the highest scale and weight 4).
pub const RECORD_CREDIT_MAX: f64 = CREDIT_PER_CORE_HOUR * 24.0 * SCALE_MAX * 4.0;
/// The recent average halves over this many seconds (one week).
pub const RAC_HALF_LIFE_S: f64 = 7.0 * 86_400.0;

/// The credit of one record and whether it hit a cap.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Credit {
    pub credit: f64,
    /// The host's claimed benchmark was outside the allowed scale (clamped).
    pub scale_clamped: bool,
    /// The record hit the per-record maximum (clamped).
    pub record_capped: bool,
}

/// The credit of `r` for a machine type of accounting weight `weight_milli` (1000 = 1.0; capped at 4.0
/// for credit even if the machine type says more).
pub fn credit(r: &UsageRecord, weight_milli: u32) -> Credit {
    let raw_scale = f64::from(r.benchmark) / REFERENCE_BENCHMARK;
    let scale = raw_scale.clamp(SCALE_MIN, SCALE_MAX);
    let weight = (f64::from(weight_milli) / 1000.0).clamp(0.001, 4.0);
    let cpu_hours = r.cpu_ms as f64 / 3_600_000.0;
    let c = cpu_hours * scale * weight * CREDIT_PER_CORE_HOUR;
    Credit {
        credit: c.min(RECORD_CREDIT_MAX),
        scale_clamped: scale != raw_scale,
        record_capped: c > RECORD_CREDIT_MAX,
    }
}

/// A recent average credit (credit per day, exponentially decaying), updated as records arrive.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Rac {
    pub value: f64,
    /// Unix seconds of the last update.
    pub at: u64,
}

impl Rac {
    /// Decays the average to `now`.
    pub fn at(self, now: u64) -> Rac {
        let dt = now.saturating_sub(self.at) as f64;
        Rac {
            value: self.value * 0.5f64.powf(dt / RAC_HALF_LIFE_S),
            at: now.max(self.at),
        }
    }

    /// Adds `credit` earned at `now`; a steady `c` per day converges to `c`.
    pub fn add(self, credit: f64, now: u64) -> Rac {
        let d = self.at(now);
        let per_day = std::f64::consts::LN_2 * 86_400.0 / RAC_HALF_LIFE_S;
        Rac {
            value: d.value + credit * per_day,
            at: d.at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Digest, Id16, OutcomeCode, SecretKey};

    fn rec(cpu_ms: u64, benchmark: u32) -> UsageRecord {
        let k = SecretKey::from_seed([1; 32]).public();
        UsageRecord {
            v: 1,
            record_id: Id16([0; 16]),
            host: k,
            machine_id: Id16([0; 16]),
            publisher: k,
            machine_type: Digest([0; 32]),
            start: 0,
            end: 100_000,
            cpu_ms,
            wall_ms: 100_000_000,
            peak_memory: 0,
            cores: 1,
            benchmark,
            outcome: OutcomeCode::Success,
        }
    }

    #[test]
    fn formula_and_caps() {
        let c = credit(&rec(3_600_000, 1000), 1000);
        assert!((c.credit - 100.0).abs() < 1e-9);
        assert!((credit(&rec(3_600_000, 2000), 500).credit - 100.0).abs() < 1e-9);
        let cheat = credit(&rec(3_600_000, 1_000_000), 1000);
        assert!(cheat.scale_clamped && (cheat.credit - 400.0).abs() < 1e-9);
        let huge = credit(&rec(3_600_000 * 1000, 4000), 4000);
        assert!(huge.record_capped && huge.credit == RECORD_CREDIT_MAX);
        assert_eq!(credit(&rec(0, 1000), 1000).credit, 0.0);
    }

    #[test]
    fn rac_converges_to_daily_credit_and_decays() {
        let mut r = Rac::default();
        for day in 0..200u64 {
            r = r.add(50.0, day * 86_400);
        }
        let v = r.at(199 * 86_400).value;
        assert!((v - 50.0).abs() < 5.0, "{v}");
        let later = r.at(199 * 86_400 + 7 * 86_400).value;
        assert!((later - v / 2.0).abs() < 1e-6);
    }
}
