//! The daemon's answers as the GUI reads them (Status, Credit, Limits), parsed leniently so that a
//! newer daemon with more fields, or an older one with fewer, still shows what it can.

use serde::Deserialize;

/// `Status` (and each `Watch` item).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Status {
    pub host: String,
    pub paused: bool,
    pub paused_until: Option<u64>,
    pub factory: Factory,
    pub ledger: Totals,
    /// Active owner-activity sources, and the ones skipped with why.
    pub sources: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Factory {
    pub draining: bool,
    pub allowance: Allowance,
    pub machines: Vec<Machine>,
    pub offers: Vec<Offer>,
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Allowance {
    pub cores: u16,
    pub memory_bytes: u64,
    pub max_machines: usize,
    pub may_start: bool,
    pub stop_all: bool,
    /// The owner policy's decision in words, with its source: "running: the owner is away
    /// (source: x11)".
    pub reason: String,
    /// The source that decided, by name ("x11", "evdev", "battery"...); empty from daemons that
    /// only name it inside `reason`.
    pub source: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Machine {
    pub machine_id: String,
    pub machine_type: String,
    pub name: String,
    pub publisher: String,
    pub state: String,
    pub cores: u16,
    pub memory_bytes: u64,
    pub started_at: u64,
    pub shutdown_at: u64,
    pub cpu_seconds: f64,
    pub memory_now_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Offer {
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

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Event {
    pub at: u64,
    pub machine: Option<String>,
    pub message: String,
}

/// The ledger's counts (in Status and Credit).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Totals {
    pub pending: u64,
    pub delivered: u64,
    pub rejected: u64,
    pub cpu_ms: u64,
    pub delivered_cpu_ms: u64,
}

/// `Credit`: the totals, and the breakdowns a daemon that has them sends.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Credit {
    #[serde(flatten)]
    pub totals: Totals,
    pub by_project: Vec<ProjectCredit>,
    pub by_day: Vec<DayCredit>,
    /// The coordinator's count for this host (daemons that ask it send this).
    pub coordinator: Option<CoordinatorCredit>,
}

/// What the coordinator says of this host's credit, or why it could not be asked.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct CoordinatorCredit {
    pub configured: bool,
    pub url: String,
    pub reachable: bool,
    /// The coordinator has records from this host.
    pub known: bool,
    pub credit: f64,
    pub cpu_hours: f64,
    pub records: i64,
    pub account: Option<String>,
    pub error: Option<String>,
}

impl CoordinatorCredit {
    /// One sentence for people.
    pub fn sentence(&self) -> String {
        if !self.configured {
            return "No coordinator is configured: credit is counted only here.".into();
        }
        if !self.reachable {
            return format!(
                "The coordinator ({}) is unreachable: {}. Records wait here and are sent when it answers.",
                self.url,
                self.error.as_deref().unwrap_or("no answer")
            );
        }
        if !self.known {
            return format!(
                "The coordinator ({}) has no records from this host yet.",
                self.url
            );
        }
        let account = match &self.account {
            Some(a) => format!(", credited to {a}"),
            None => ", not yet linked to an account".into(),
        };
        format!(
            "The coordinator ({}) counts {:.1} credit for this host: {} records, {:.2} CPU hours{account}.",
            self.url, self.credit, self.records, self.cpu_hours
        )
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct ProjectCredit {
    pub publisher: String,
    pub machine_type: String,
    pub records: u64,
    pub cpu_ms: u64,
    pub credit: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct DayCredit {
    /// Days since 1970-01-01 (UTC).
    pub day: u64,
    pub cpu_ms: u64,
    pub credit: f64,
}

/// The owner policy in force (`Limits` with no `set`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Policy {
    pub away: PolicyLimits,
    pub present: Option<PolicyLimits>,
    pub idle_after_s: u64,
    pub run_on_battery: bool,
    pub suspend_above_load: Option<f64>,
    pub schedule: Vec<PolicyWindow>,
    pub max_machines: usize,
    pub exclusive_apps: Vec<String>,
    pub stop_after_frozen_s: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct PolicyLimits {
    pub cores: f64,
    pub memory_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct PolicyWindow {
    /// Bit 0 = Monday.
    pub days: u8,
    pub start_min: u16,
    pub end_min: u16,
}

/// Whether the owner is at the machine, as far as the daemon's decision says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Present,
    Away,
    Unknown,
}

/// The owner state in plain words: a headline, the why, and who decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Headline {
    pub owner: Owner,
    pub title: String,
    pub why: String,
}

impl Status {
    /// What the daemon is doing and why, for a person.
    pub fn headline(&self, now: u64) -> Headline {
        let a = &self.factory.allowance;
        let (decision, mut source) = match a.reason.rsplit_once(" (source: ") {
            Some((d, s)) => (d.to_owned(), s.trim_end_matches(')').to_owned()),
            None => (a.reason.clone(), String::new()),
        };
        if !a.source.is_empty() {
            source.clone_from(&a.source);
        }
        let by = if source.is_empty() {
            String::new()
        } else {
            format!(" (noticed by: {source})")
        };
        let owner = if decision.contains("owner is away") {
            Owner::Away
        } else if decision.contains("owner is using") {
            Owner::Present
        } else {
            Owner::Unknown
        };
        let (title, why) = if self.paused {
            let until = match self.paused_until {
                Some(t) if t > now => format!("for {} more", duration_words(t - now)),
                _ => "until you resume".to_owned(),
            };
            (
                "Paused by you".to_owned(),
                format!("Work is frozen {until}. Nothing runs while paused."),
            )
        } else if self.factory.draining {
            (
                "Finishing up".to_owned(),
                "Running work finishes; no new work starts (drained).".to_owned(),
            )
        } else if decision.starts_with("running: the owner is away") {
            (
                "You are away: Gleaner is working".to_owned(),
                format!("Nobody is using this computer, so science projects may use it{by}."),
            )
        } else if decision.starts_with("throttled") {
            (
                "You are using the computer: Gleaner runs gently".to_owned(),
                format!("Work continues within your \"while I'm here\" limits{by}."),
            )
        } else if decision.starts_with("frozen: the owner is using") {
            (
                "You are using the computer: work is frozen".to_owned(),
                format!("It resumes once you have been away long enough{by}."),
            )
        } else if decision.contains("battery") {
            (
                "On battery: work is frozen".to_owned(),
                format!("Plug in to let work continue, or allow running on battery{by}."),
            )
        } else if decision.contains("other programs") {
            (
                "Your computer is busy: work is frozen".to_owned(),
                format!("Other programs are keeping the processor busy{by}."),
            )
        } else if decision.contains("outside the allowed hours") {
            (
                "Outside your schedule: work is frozen".to_owned(),
                format!("Work runs only in the hours you chose{by}."),
            )
        } else if decision.contains("exclusive application") {
            (
                "An exclusive application is running: work is frozen".to_owned(),
                format!("A program you listed as exclusive is open{by}."),
            )
        } else if decision == "starting" {
            (
                "Starting".to_owned(),
                "The daemon is checking whether you are at the computer.".to_owned(),
            )
        } else {
            (decision.clone(), by.trim().to_owned())
        };
        Headline { owner, title, why }
    }
}

/// "1 h 5 min", "42 s".
pub fn duration_words(secs: u64) -> String {
    let (d, h, m, s) = (
        secs / 86_400,
        secs % 86_400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    if d > 0 {
        format!("{d} d {h} h")
    } else if h > 0 {
        format!("{h} h {m} min")
    } else if m > 0 {
        format!("{m} min")
    } else {
        format!("{s} s")
    }
}

/// "4.0 GiB", "512 MiB".
pub fn bytes_words(b: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    if b < 1 << 20 {
        "under 1 MiB".into()
    } else if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / GIB)
    } else {
        format!("{} MiB", b >> 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(reason: &str) -> Status {
        let mut s = Status::default();
        s.factory.allowance.reason = reason.into();
        s
    }

    #[test]
    fn owner_state_in_plain_words() {
        let h = status("running: the owner is away (source: x11)").headline(0);
        assert_eq!(h.owner, Owner::Away);
        assert!(h.title.contains("away"), "{h:?}");
        assert!(h.why.contains("x11"), "{h:?}");
        let h = status("frozen: the owner is using the machine (source: logind)").headline(0);
        assert_eq!(h.owner, Owner::Present);
        assert!(h.title.contains("frozen"));
        let h = status("throttled: the owner is using the machine (source: x11)").headline(0);
        assert!(h.title.contains("gently"));
        let h = status("frozen: running on battery (source: power)").headline(0);
        assert!(h.title.contains("battery"));
        let mut p = status("frozen: paused by the owner (source: owner)");
        p.paused = true;
        p.paused_until = Some(3_600 + 100);
        let h = p.headline(100);
        assert_eq!(h.title, "Paused by you");
        assert!(h.why.contains("1 h 0 min"), "{h:?}");
    }

    #[test]
    fn the_named_source_field_wins_and_old_daemons_still_read() {
        // A daemon with the `source` field: the input source that saw the owner is named.
        let v = serde_json::json!({"factory": {"allowance": {
            "reason": "frozen: the owner is using the machine (source: evdev)", "source": "evdev"}}});
        let s: Status = serde_json::from_value(v).unwrap();
        assert_eq!(s.factory.allowance.source, "evdev");
        let h = s.headline(0);
        assert_eq!(h.owner, Owner::Present);
        assert!(h.why.contains("noticed by: evdev"), "{h:?}");
        // An older daemon without it: read from the reason, as before.
        let h = status("frozen: the owner is using the machine (source: input)").headline(0);
        assert!(h.why.contains("noticed by: input"), "{h:?}");
    }

    #[test]
    fn parses_a_daemon_status_and_ignores_unknown_fields() {
        let v = serde_json::json!({
            "host": "h1", "paused": false, "paused_until": null, "new_field": 1,
            "factory": {"draining": false, "allowance": {"cores": 2, "memory_bytes": 1073741824,
              "max_machines": 2, "may_start": true, "stop_all": false, "reason": "allowed"},
              "machines": [{"machine_id": "ab", "name": "steady", "cores": 1, "cpu_seconds": 1.5}],
              "offers": [], "events": []},
            "ledger": {"pending": 1, "delivered": 2, "rejected": 0, "cpu_ms": 10, "delivered_cpu_ms": 5},
            "sources": ["x11"]
        });
        let s: Status = serde_json::from_value(v).unwrap();
        assert_eq!(s.factory.machines[0].name, "steady");
        assert_eq!(s.ledger.delivered, 2);
        let c: Credit =
            serde_json::from_value(serde_json::json!({"pending": 3, "cpu_ms": 7})).unwrap();
        assert_eq!(c.totals.pending, 3);
        assert!(c.by_day.is_empty());
    }

    #[test]
    fn the_coordinators_count_reads_in_plain_words() {
        // As the daemon sends it (client/src/daemon.rs, coordinator_credit).
        let c: Credit = serde_json::from_value(serde_json::json!({"pending": 0,
            "coordinator": {"configured": true, "url": "https://c:8443", "reachable": true,
                "known": true, "credit": 12.34, "cpu_hours": 0.5, "records": 4, "account": "ada"}}))
        .unwrap();
        let s = c.coordinator.unwrap().sentence();
        assert!(
            s.contains("12.3 credit") && s.contains("4 records") && s.contains("ada"),
            "{s}"
        );
        let c: Credit = serde_json::from_value(serde_json::json!({"coordinator": {
            "configured": true, "url": "https://c:8443", "reachable": false,
            "error": "connection refused"}}))
        .unwrap();
        let s = c.coordinator.unwrap().sentence();
        assert!(s.contains("unreachable: connection refused"), "{s}");
        let c: Credit =
            serde_json::from_value(serde_json::json!({"coordinator": {"configured": false}}))
                .unwrap();
        assert!(c.coordinator.unwrap().sentence().contains("No coordinator"));
    }
}
