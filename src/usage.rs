//! Usage records (signed by the host, one per finished machine or per interim period) and the outcome
//! codes a machine ends with.

use crate::Error;
use crate::envelope::{Kind, Message, check_version};
use crate::ident::PublicKey;
use crate::wire::{Digest, Id16, wire_code, wire_struct};

/// The usage-record schema version this build writes and reads.
pub const USAGE_RECORD_VERSION: u8 = 1;

wire_code! {
    /// How a logical machine ended (or `Running` for an interim record).
    OutcomeCode {
        Running = 0 => "running",
        Success = 1 => "success",
        NoWork = 2 => "no-work",
        Fizzle = 3 => "fizzle",
        HeartbeatLost = 4 => "heartbeat-lost",
        KilledByOwner = 5 => "killed-by-owner",
        WallclockExceeded = 6 => "wallclock-exceeded",
        Error = 7 => "error",
    }
}

impl OutcomeCode {
    /// Outcomes that count as an abort and back the machine type off across the space.
    pub fn is_abort(self) -> bool {
        matches!(
            self,
            OutcomeCode::Fizzle | OutcomeCode::HeartbeatLost | OutcomeCode::Error
        )
    }
}

wire_struct! {
/// The accounting of one logical machine over one period `[start, end]`.
///
/// Interim records (outcome `Running`) and the final record of a machine cover disjoint periods, so
/// their sums are the machine's totals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    /// Schema version, always [`USAGE_RECORD_VERSION`].
    pub v: u8,
    /// Random id chosen by the host; the coordinator de-duplicates by it.
    pub record_id: Id16,
    /// The host key; must be the envelope's signer.
    pub host: PublicKey,
    /// The logical machine this record accounts for.
    pub machine_id: Id16,
    /// The publisher (project) of the machine type.
    pub publisher: PublicKey,
    /// SHA-256 of the signed machine-type payload.
    pub machine_type: Digest,
    /// Start and end of the period, unix seconds.
    pub start: u64,
    pub end: u64,
    /// CPU time used in the period, from the engine's own accounting, in milliseconds.
    pub cpu_ms: u64,
    /// Wall time of the period in milliseconds.
    pub wall_ms: u64,
    /// Peak resident memory in bytes.
    pub peak_memory: u64,
    /// Cores allocated to the machine.
    pub cores: u16,
    /// The host's benchmark score (per core, in benchmark units) when the record was made.
    pub benchmark: u32,
    pub outcome: OutcomeCode,
}
}

/// How much longer than `end - start` the wall time may be, for rounding of second-granular times.
const WALL_SLACK_MS: u64 = 2_000;

impl Message for UsageRecord {
    const KIND: Kind = Kind::UsageRecord;

    fn validate(&self, signer: &PublicKey) -> Result<(), Error> {
        check_version("usage record", self.v, USAGE_RECORD_VERSION)?;
        if &self.host != signer {
            return Err(Error::invalid(
                "host",
                format!("names {} but was signed by {signer}", self.host),
            ));
        }
        if self.end < self.start {
            return Err(Error::invalid(
                "end",
                format!("{} is before start {}", self.end, self.start),
            ));
        }
        let span_ms = (self.end - self.start).saturating_mul(1000);
        if self.wall_ms > span_ms.saturating_add(WALL_SLACK_MS) {
            return Err(Error::invalid(
                "wall_ms",
                format!(
                    "{} ms is longer than the period {}..{}",
                    self.wall_ms, self.start, self.end
                ),
            ));
        }
        if self.cores == 0 {
            return Err(Error::invalid("cores", "must be at least 1"));
        }
        let max_cpu = self.wall_ms.saturating_mul(u64::from(self.cores));
        if self.cpu_ms > max_cpu {
            return Err(Error::invalid(
                "cpu_ms",
                format!(
                    "{} ms of cpu is more than {} cores x {} ms of wall time",
                    self.cpu_ms, self.cores, self.wall_ms
                ),
            ));
        }
        Ok(())
    }
}
