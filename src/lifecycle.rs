//! The life of one logical machine as pure decisions (time passed in): heartbeat, max wallclock,
//! fizzle, and how the workload's own outcome is read — plus user_data rendering.

use crate::machine_type::MachineType;
use crate::usage::OutcomeCode;

/// The lifetimes a factory enforces for one machine, from its machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    pub started_at: u64,
    /// When the machine must be gone: written to `machinefeatures/shutdowntime` before anything is
    /// stopped (start + max wallclock, or earlier when draining).
    pub shutdown_at: u64,
    pub heartbeat_s: u64,
    pub fizzle_s: u64,
}

impl Lifetimes {
    /// The lifetimes of a machine of type `mt` started at `now`.
    pub fn new(mt: &MachineType, now: u64) -> Lifetimes {
        Lifetimes {
            started_at: now,
            shutdown_at: now + u64::from(mt.max_wallclock_s),
            heartbeat_s: u64::from(mt.heartbeat_s),
            fizzle_s: u64::from(mt.fizzle_s),
        }
    }
}

/// What the factory sees of a machine at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    Running {
        /// Modification time of `joboutputs/heartbeat`, if the workload has written one.
        last_heartbeat: Option<u64>,
    },
    Exited {
        exit_code: Option<i64>,
        /// Contents of `joboutputs/shutdown_message`, if the workload wrote one.
        shutdown_message: Option<String>,
    },
}

/// Why the factory itself is ending a machine (not the workload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCause {
    HeartbeatLost,
    Wallclock,
    Owner,
    Drain,
}

/// What to do about a machine now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Continue,
    /// Stop it gracefully (then kill after the grace period) and finish with this outcome.
    Stop {
        outcome: OutcomeCode,
        cause: StopCause,
    },
    /// It has ended: account for it with this outcome.
    Finish {
        outcome: OutcomeCode,
        detail: String,
    },
}

/// Decides about a machine that the factory has not asked to stop.
pub fn assess(l: &Lifetimes, obs: &Observation, now: u64) -> Action {
    match obs {
        Observation::Running { last_heartbeat } => {
            if now >= l.shutdown_at {
                return Action::Stop {
                    outcome: OutcomeCode::WallclockExceeded,
                    cause: StopCause::Wallclock,
                };
            }
            let since = last_heartbeat.unwrap_or(l.started_at).max(l.started_at);
            if now.saturating_sub(since) > l.heartbeat_s {
                return Action::Stop {
                    outcome: OutcomeCode::HeartbeatLost,
                    cause: StopCause::HeartbeatLost,
                };
            }
            Action::Continue
        }
        Observation::Exited {
            exit_code,
            shutdown_message,
        } => {
            let (outcome, detail) = workload_outcome(*exit_code, shutdown_message.as_deref());
            let ran = now.saturating_sub(l.started_at);
            if ran < l.fizzle_s && outcome != OutcomeCode::Success {
                return Action::Finish {
                    outcome: OutcomeCode::Fizzle,
                    detail: format!(
                        "ended after {ran} s, before the fizzle time of {} s: {detail}",
                        l.fizzle_s
                    ),
                };
            }
            Action::Finish { outcome, detail }
        }
    }
}

/// The outcome of a machine that the factory stopped for `cause`, after it has ended.
pub fn stopped_outcome(cause: StopCause) -> OutcomeCode {
    match cause {
        StopCause::HeartbeatLost => OutcomeCode::HeartbeatLost,
        StopCause::Wallclock => OutcomeCode::WallclockExceeded,
        StopCause::Owner => OutcomeCode::KilledByOwner,
        StopCause::Drain => OutcomeCode::Success,
    }
}

/// Reads the workload's own verdict: Vac's `joboutputs/shutdown_message` ("NNN text": 100 shut down
/// as requested and 200 work completed → success; 300 no more work → no-work; 400–799 → error),
/// else the exit code (0 → success).
pub fn workload_outcome(
    exit_code: Option<i64>,
    shutdown_message: Option<&str>,
) -> (OutcomeCode, String) {
    if let Some(msg) = shutdown_message.map(str::trim).filter(|m| !m.is_empty()) {
        let (code, text) = msg.split_once(char::is_whitespace).unwrap_or((msg, ""));
        if let Ok(code) = code.parse::<u16>() {
            let outcome = match code {
                100..=299 => OutcomeCode::Success,
                300..=399 => OutcomeCode::NoWork,
                _ => OutcomeCode::Error,
            };
            return (outcome, truncate(&format!("{code} {}", text.trim()), 200));
        }
    }
    match exit_code {
        Some(0) => (OutcomeCode::Success, "exit code 0".into()),
        Some(c) => (OutcomeCode::Error, format!("exit code {c}")),
        None => (OutcomeCode::Error, "ended with no exit code".into()),
    }
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Substitutes `##user_data_<name>##` placeholders in a user_data template (Vac's convention).
/// Unknown placeholders are left as they are.
pub fn render_user_data(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = template.to_owned();
    for (name, value) in values {
        out = out.replace(&format!("##user_data_{name}##"), value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Lifetimes = Lifetimes {
        started_at: 1000,
        shutdown_at: 1000 + 3600,
        heartbeat_s: 60,
        fizzle_s: 120,
    };

    #[test]
    fn decision_table() {
        use Observation::*;
        let exited = |code: Option<i64>, msg: Option<&str>| Exited {
            exit_code: code,
            shutdown_message: msg.map(str::to_owned),
        };
        let stop = |outcome, cause| Action::Stop { outcome, cause };
        let cases: Vec<(Observation, u64, Action)> = vec![
            (
                Running {
                    last_heartbeat: None,
                },
                1030,
                Action::Continue,
            ),
            (
                Running {
                    last_heartbeat: None,
                },
                1061,
                stop(OutcomeCode::HeartbeatLost, StopCause::HeartbeatLost),
            ),
            (
                Running {
                    last_heartbeat: Some(1500),
                },
                1550,
                Action::Continue,
            ),
            (
                Running {
                    last_heartbeat: Some(1500),
                },
                1561,
                stop(OutcomeCode::HeartbeatLost, StopCause::HeartbeatLost),
            ),
            // A heartbeat older than the start (left over) counts from the start.
            (
                Running {
                    last_heartbeat: Some(10),
                },
                1030,
                Action::Continue,
            ),
            (
                Running {
                    last_heartbeat: Some(4599),
                },
                4600,
                stop(OutcomeCode::WallclockExceeded, StopCause::Wallclock),
            ),
        ];
        for (obs, now, want) in cases {
            assert_eq!(assess(&L, &obs, now), want, "{obs:?} at {now}");
        }
        let finish = |obs: Observation, now| match assess(&L, &obs, now) {
            Action::Finish { outcome, .. } => outcome,
            other => panic!("{other:?}"),
        };
        assert_eq!(finish(exited(Some(0), None), 2000), OutcomeCode::Success);
        assert_eq!(finish(exited(Some(0), None), 1010), OutcomeCode::Success);
        assert_eq!(finish(exited(Some(1), None), 1010), OutcomeCode::Fizzle);
        assert_eq!(
            finish(exited(Some(0), Some("300 No more work")), 1010),
            OutcomeCode::Fizzle
        );
        assert_eq!(
            finish(exited(Some(0), Some("300 No more work")), 2000),
            OutcomeCode::NoWork
        );
        assert_eq!(
            finish(exited(Some(0), Some("200 done")), 2000),
            OutcomeCode::Success
        );
        assert_eq!(
            finish(exited(Some(0), Some("500 queue down")), 2000),
            OutcomeCode::Error
        );
        assert_eq!(
            finish(exited(Some(3), Some("not a code")), 2000),
            OutcomeCode::Error
        );
        assert_eq!(finish(exited(None, None), 2000), OutcomeCode::Error);
    }

    #[test]
    fn shutdown_message_detail_is_kept_short() {
        let long = format!("200 {}", "é".repeat(500));
        let (_, detail) = workload_outcome(Some(0), Some(&long));
        assert!(detail.len() <= 200);
    }

    #[test]
    fn user_data_placeholders() {
        let t = "id=##user_data_machine_id## space=##user_data_space## other=##user_data_other##";
        assert_eq!(
            render_user_data(t, &[("machine_id", "abc"), ("space", "dept")]),
            "id=abc space=dept other=##user_data_other##"
        );
    }

    #[test]
    fn stopped_outcomes() {
        assert_eq!(
            stopped_outcome(StopCause::Owner),
            OutcomeCode::KilledByOwner
        );
        assert_eq!(stopped_outcome(StopCause::Drain), OutcomeCode::Success);
    }
}
