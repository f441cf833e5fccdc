//! The local control API's answers (docs/control-api.md) as plain serde types: the daemon
//! serialises them and the desktop app deserialises them, so both speak from one definition.
//!
//! These are JSON for local clients, not the signed CBOR wire: every struct reads leniently
//! (`#[serde(default)]`, unknown fields ignored), so that a newer daemon with more fields, or an
//! older one with fewer, still shows what it can. Serialising is what the daemon always sent.

use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

use crate::policy::OwnerPolicy;

/// `status` (and each `watch` item).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Status {
    /// The host's id (its public key).
    pub host: String,
    /// The owner paused the whole host.
    pub paused: bool,
    /// The pause ends by itself at this time (unix seconds).
    pub paused_until: Option<u64>,
    /// Machine types paused by the owner, with their names.
    pub paused_types: Vec<PausedType>,
    pub factory: FactoryStatus,
    pub ledger: LedgerTotals,
    /// Which owner-activity sources are active, and which were skipped and why.
    pub sources: Vec<String>,
    /// Which engines run machines (containers, VMs), and which were skipped and why.
    pub engines: Vec<String>,
}

/// One machine type paused by the owner.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PausedType {
    pub digest: String,
    pub name: String,
    /// When it was paused (unix seconds).
    pub since: u64,
    /// Resumes by itself at this time (unix seconds), if the pause was for a while.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
}

/// The factory's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FactoryStatus {
    pub draining: bool,
    pub allowance: Allowance,
    pub machines: Vec<MachineStatus>,
    pub offers: Vec<OfferStatus>,
    pub events: Vec<Event>,
    /// Machine types the owner paused (digests), running here or not.
    pub paused_types: Vec<String>,
}

/// What the owner policy currently allows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Allowance {
    /// Cores Gleaner may allocate to machines in all.
    pub cores: u16,
    pub memory_bytes: u64,
    /// Most machines at once.
    pub max_machines: usize,
    /// New machines may be started.
    pub may_start: bool,
    /// Running machines must be stopped (gracefully) — e.g. the owner's policy says so.
    pub stop_all: bool,
    /// The owner policy's decision in words, with its source: "running: the owner is away
    /// (source: x11)".
    pub reason: String,
    /// The source that decided, by name: the activity source that saw the owner (`x11`, `logind`,
    /// `evdev`, `terminals`, `interrupts`), or `battery`, `schedule`, `cpu-load`, `owner`,
    /// `batch-system`...; empty before the first decision (and from older daemons).
    pub source: String,
    /// The owner policy (or the owner's whole-host pause) has frozen all work: machines whose
    /// type-pause is lifted stay frozen until the host resumes.
    pub frozen: bool,
}

impl Allowance {
    /// Everything up to `cores` and `memory_bytes`, starting allowed.
    pub fn open(cores: u16, memory_bytes: u64) -> Allowance {
        Allowance {
            cores,
            memory_bytes,
            max_machines: usize::from(cores).max(1),
            may_start: true,
            stop_all: false,
            reason: "allowed".into(),
            source: String::new(),
            frozen: false,
        }
    }
}

/// One machine as status shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MachineStatus {
    pub machine_id: String,
    /// The machine type's digest.
    pub machine_type: String,
    pub name: String,
    pub publisher: String,
    /// `running`, `frozen`, `paused (by you)`, `stopping (…)`...
    pub state: String,
    pub cores: u16,
    pub memory_bytes: u64,
    pub started_at: u64,
    /// Its shutdowntime (unix seconds).
    pub shutdown_at: u64,
    pub cpu_seconds: f64,
    pub memory_now_bytes: u64,
}

/// One admitted machine type as status shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OfferStatus {
    /// The machine type's digest.
    pub machine_type: String,
    pub name: String,
    pub version: u64,
    pub publisher: String,
    pub share: f64,
    pub running: usize,
    pub backed_off_until: Option<u64>,
    /// Paused by the owner: its machines frozen, none started.
    pub paused: bool,
}

/// Something that happened, for status and the GUI.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Event {
    pub at: u64,
    pub machine: Option<String>,
    pub message: String,
}

/// Counts and sums over the ledger (in `status` and `credit`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LedgerTotals {
    pub pending: u64,
    pub delivered: u64,
    pub rejected: u64,
    /// CPU milliseconds in pending + delivered records.
    pub cpu_ms: u64,
    /// CPU milliseconds in delivered (acknowledged) records.
    pub delivered_cpu_ms: u64,
}

/// `credit`: the local ledger per project and per day, and the coordinator's count. The credit is
/// the formula's at weight 1.0 (the machine type's weight is not in the record), so the
/// coordinator's figure is the one that counts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CreditView {
    #[serde(flatten)]
    pub totals: LedgerTotals,
    pub by_project: Vec<ProjectCredit>,
    pub by_day: Vec<DayCredit>,
    /// What the coordinator says of this host (the daemon adds it; the ledger alone cannot).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<CoordinatorCredit>,
}

/// One project's (publisher's) machine type in [`CreditView`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProjectCredit {
    pub publisher: String,
    pub machine_type: String,
    pub records: u64,
    pub cpu_ms: u64,
    pub credit: f64,
}

/// One UTC day in [`CreditView`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DayCredit {
    /// Days since 1970-01-01 (UTC), by each record's end.
    pub day: u64,
    pub cpu_ms: u64,
    pub credit: f64,
}

/// The coordinator's count of this host's credit, or why it could not be asked. Only the fields of
/// its case are sent: `{"configured": false}`; `{configured, url, reachable: true, known: true,
/// credit, cpu_hours, records, account}`; `{configured, url, reachable: true, known: false}`; or
/// `{configured, url, reachable: false, error}` — see the constructors.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CoordinatorCredit {
    pub configured: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reachable: Option<bool>,
    /// The coordinator has records from this host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub known: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credit: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_hours: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub records: Option<i64>,
    /// Present (maybe `null`: not linked to an account yet) when the coordinator knows the host.
    #[serde(skip_serializing_if = "Option::is_none", deserialize_with = "present")]
    pub account: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A field that is there, even as `null`, is `Some`.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

impl CoordinatorCredit {
    /// No coordinator is configured.
    pub fn unconfigured() -> CoordinatorCredit {
        CoordinatorCredit::default()
    }

    /// The coordinator's count for this host.
    pub fn known(
        url: &str,
        credit: f64,
        cpu_hours: f64,
        records: i64,
        account: Option<String>,
    ) -> CoordinatorCredit {
        CoordinatorCredit {
            configured: true,
            url: url.into(),
            reachable: Some(true),
            known: Some(true),
            credit: Some(credit),
            cpu_hours: Some(cpu_hours),
            records: Some(records),
            account: Some(account),
            error: None,
        }
    }

    /// The coordinator answered but has nothing of this host yet.
    pub fn unknown(url: &str) -> CoordinatorCredit {
        CoordinatorCredit {
            configured: true,
            url: url.into(),
            reachable: Some(true),
            known: Some(false),
            ..CoordinatorCredit::default()
        }
    }

    /// The coordinator could not be asked, and why.
    pub fn unreachable(url: &str, error: &str) -> CoordinatorCredit {
        CoordinatorCredit {
            configured: true,
            url: url.into(),
            reachable: Some(false),
            error: Some(error.into()),
            ..CoordinatorCredit::default()
        }
    }
}

/// `limits` (no `set`): the owner policy in force.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Policy {
    pub away: PolicyLimits,
    /// Limits while the owner is present; `None`: frozen then.
    pub present: Option<PolicyLimits>,
    pub idle_after_s: u64,
    pub run_on_battery: bool,
    pub suspend_above_load: Option<f64>,
    pub schedule: Vec<PolicyWindow>,
    pub max_machines: usize,
    pub exclusive_apps: Vec<String>,
    pub stop_after_frozen_s: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicyLimits {
    pub cores: f64,
    pub memory_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicyWindow {
    /// Bit 0 = Monday.
    pub days: u8,
    pub start_min: u16,
    pub end_min: u16,
}

impl From<&OwnerPolicy> for Policy {
    fn from(p: &OwnerPolicy) -> Policy {
        let limits = |l: &crate::policy::Limits| PolicyLimits {
            cores: l.cores,
            memory_bytes: l.memory_bytes,
        };
        Policy {
            away: limits(&p.away),
            present: p.present.as_ref().map(limits),
            idle_after_s: p.idle_after_s,
            run_on_battery: p.run_on_battery,
            suspend_above_load: p.suspend_above_load,
            schedule: p
                .schedule
                .iter()
                .map(|w| PolicyWindow {
                    days: w.days,
                    start_min: w.start_min,
                    end_min: w.end_min,
                })
                .collect(),
            max_machines: p.max_machines,
            exclusive_apps: p.exclusive_apps.clone(),
            stop_after_frozen_s: p.stop_after_frozen_s,
        }
    }
}

/// `trusted`: the trust store's listing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Listing {
    /// The trust store's file.
    pub file: PathBuf,
    pub trusted: Vec<Listed>,
    /// Baseline publishers removed by the owner on this host.
    pub removed: Vec<String>,
    pub revoked: Vec<Revoked>,
    pub rotations: Vec<Rotated>,
}

/// One trusted publisher and the policy it has here.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Listed {
    pub id: String,
    pub share: f64,
    pub allow_vms: bool,
    pub allow_egress: bool,
    pub max_cores: Option<u16>,
    /// `owner` (trusted on this host) or `settings` (the department's baseline).
    pub source: String,
    /// Older keys of this publisher whose trust was rotated onto this one.
    pub rotated_from: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// A revoked key, when and why.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Revoked {
    pub id: String,
    pub at: u64,
    pub reason: String,
}

/// A key rotation: trust in `old` moved to `new`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Rotated {
    pub old: String,
    pub new: String,
    pub at: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON a `serde_json`-free test can check: round trips through the derive, and the
    /// coordinator's four cases keep exactly their documented keys.
    #[test]
    fn coordinator_cases_keep_their_keys() {
        let keys = |c: &CoordinatorCredit| -> Vec<String> {
            // ciborium is the core's encoder; a CBOR map keeps the serialised keys.
            let mut b = Vec::new();
            ciborium::into_writer(c, &mut b).unwrap();
            let v: ciborium::Value = ciborium::from_reader(&b[..]).unwrap();
            v.as_map()
                .unwrap()
                .iter()
                .map(|(k, _)| k.as_text().unwrap().to_owned())
                .collect()
        };
        assert_eq!(keys(&CoordinatorCredit::unconfigured()), vec!["configured"]);
        assert_eq!(
            keys(&CoordinatorCredit::known("u", 1.0, 2.0, 3, None)),
            vec![
                "configured",
                "url",
                "reachable",
                "known",
                "credit",
                "cpu_hours",
                "records",
                "account"
            ]
        );
        assert_eq!(
            keys(&CoordinatorCredit::unknown("u")),
            vec!["configured", "url", "reachable", "known"]
        );
        assert_eq!(
            keys(&CoordinatorCredit::unreachable("u", "refused")),
            vec!["configured", "url", "reachable", "error"]
        );
    }
}
