//! The daemon's answers as the GUI reads them (Status, Credit, Limits), parsed leniently so that a
//! newer daemon with more fields, or an older one with fewer, still shows what it can.

// The daemon's answers are the control API's types, defined once in the core and shared with the
// daemon that writes them; they read leniently, so that a newer daemon with more fields, or an
// older one with fewer, still shows what it can.
pub use gleaner::control::{
    Allowance, CoordinatorCredit, CreditView, DayCredit, Event, FactoryStatus, LedgerTotals,
    Listed, Listing, MachineStatus, OfferStatus, Policy, PolicyLimits, PolicyWindow, ProjectCredit,
    Status,
};

/// What the coordinator says of this host's credit, or why it could not be asked, in one sentence.
pub fn coordinator_sentence(c: &CoordinatorCredit) -> String {
    if !c.configured {
        return "No coordinator is configured: credit is counted only here.".into();
    }
    if c.reachable != Some(true) {
        return format!(
            "The coordinator ({}) is unreachable: {}. Records wait here and are sent when it answers.",
            c.url,
            c.error.as_deref().unwrap_or("no answer")
        );
    }
    if c.known != Some(true) {
        return format!(
            "The coordinator ({}) has no records from this host yet.",
            c.url
        );
    }
    let account = match c.account.as_ref().and_then(Option::as_deref) {
        Some(a) => format!(", credited to {a}"),
        None => ", not yet linked to an account".into(),
    };
    format!(
        "The coordinator ({}) counts {:.1} credit for this host: {} records, {:.2} CPU hours{account}.",
        c.url,
        c.credit.unwrap_or(0.0),
        c.records.unwrap_or(0),
        c.cpu_hours.unwrap_or(0.0)
    )
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

/// What the daemon is doing and why, for a person.
pub fn headline(st: &Status, now: u64) -> Headline {
    let a = &st.factory.allowance;
    let (decision, mut source) = match a.reason.rsplit_once(" (source: ") {
        Some((d, s)) => (d.to_owned(), s.trim_end_matches(')').to_owned()),
        None => (a.reason.clone(), String::new()),
    };
    // A daemon that names the source in its own field is believed over the reason's words.
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
    let (title, why) = if st.paused {
        let until = match st.paused_until {
            Some(t) if t > now => format!("for {} more", duration_words(t - now)),
            _ => "until you resume".to_owned(),
        };
        (
            "Paused by you".to_owned(),
            format!("Work is frozen {until}. Nothing runs while paused."),
        )
    } else if st.factory.draining {
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
        let h = headline(&status("running: the owner is away (source: x11)"), 0);
        assert_eq!(h.owner, Owner::Away);
        assert!(h.title.contains("away"), "{h:?}");
        assert!(h.why.contains("x11"), "{h:?}");
        let h = headline(
            &status("frozen: the owner is using the machine (source: logind)"),
            0,
        );
        assert_eq!(h.owner, Owner::Present);
        assert!(h.title.contains("frozen"));
        let h = headline(
            &status("throttled: the owner is using the machine (source: x11)"),
            0,
        );
        assert!(h.title.contains("gently"));
        let h = headline(&status("frozen: running on battery (source: power)"), 0);
        assert!(h.title.contains("battery"));
        let mut p = status("frozen: paused by the owner (source: owner)");
        p.paused = true;
        p.paused_until = Some(3_600 + 100);
        let h = headline(&p, 100);
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
        let h = headline(&s, 0);
        assert_eq!(h.owner, Owner::Present);
        assert!(h.why.contains("noticed by: evdev"), "{h:?}");
        // An older daemon without it: read from the reason, as before.
        let h = headline(
            &status("frozen: the owner is using the machine (source: input)"),
            0,
        );
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
        let c: CreditView =
            serde_json::from_value(serde_json::json!({"pending": 3, "cpu_ms": 7})).unwrap();
        assert_eq!(c.totals.pending, 3);
        assert!(c.by_day.is_empty());
    }

    #[test]
    fn the_coordinators_count_reads_in_plain_words() {
        // As the daemon sends it (client/src/daemon.rs, coordinator_credit).
        let c: CreditView = serde_json::from_value(serde_json::json!({"pending": 0,
            "coordinator": {"configured": true, "url": "https://c:8443", "reachable": true,
                "known": true, "credit": 12.34, "cpu_hours": 0.5, "records": 4, "account": "ada"}}))
        .unwrap();
        let s = coordinator_sentence(&c.coordinator.unwrap());
        assert!(
            s.contains("12.3 credit") && s.contains("4 records") && s.contains("ada"),
            "{s}"
        );
        let c: CreditView = serde_json::from_value(serde_json::json!({"coordinator": {
            "configured": true, "url": "https://c:8443", "reachable": false,
            "error": "connection refused"}}))
        .unwrap();
        let s = coordinator_sentence(&c.coordinator.unwrap());
        assert!(s.contains("unreachable: connection refused"), "{s}");
        let c: CreditView =
            serde_json::from_value(serde_json::json!({"coordinator": {"configured": false}}))
                .unwrap();
        assert!(coordinator_sentence(&c.coordinator.unwrap()).contains("No coordinator"));
    }
}
