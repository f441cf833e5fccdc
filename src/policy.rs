//! The owner's policy and the decision it makes, as a pure function of (policy, measured host
//! state, time): run within limits, throttle, freeze or stop — with the reason and the source that
//! decided, like BOINC's suspend reasons.

/// CPU and memory Gleaner may use in one owner state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Cores (may be fractional: a CPU quota).
    pub cores: f64,
    pub memory_bytes: u64,
}

/// A weekly window when work may run: days as a bit set (bit 0 = Monday … bit 6 = Sunday) and
/// minutes of the day `[start, end)`; `end < start` wraps past midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub days: u8,
    pub start_min: u16,
    pub end_min: u16,
}

impl Window {
    /// Whether local (weekday 0 = Monday, minute of day) falls in the window.
    pub fn contains(&self, weekday: u8, minute: u16) -> bool {
        let day_ok = |d: u8| self.days & (1 << (d % 7)) != 0;
        if self.start_min <= self.end_min {
            day_ok(weekday) && minute >= self.start_min && minute < self.end_min
        } else {
            (day_ok(weekday) && minute >= self.start_min)
                || (day_ok((weekday + 6) % 7) && minute < self.end_min)
        }
    }
}

/// What the owner allows.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnerPolicy {
    /// Limits while the owner is using the machine; `None`: freeze everything then.
    pub present: Option<Limits>,
    /// Limits while the owner is away.
    pub away: Limits,
    /// Seconds without input before the owner counts as away.
    pub idle_after_s: u64,
    /// Run while on battery power.
    pub run_on_battery: bool,
    /// Freeze when other programs keep more than this many cores busy.
    pub suspend_above_load: Option<f64>,
    /// When work may run at all (empty: always).
    pub schedule: Vec<Window>,
    pub max_machines: usize,
    /// Programs (process names) while any of which runs, work is frozen (games, video editing...).
    pub exclusive_apps: Vec<String>,
    /// Stop machines gracefully once they have been frozen this long, so their memory goes back
    /// to the owner (`None`: keep them frozen however long it takes).
    pub stop_after_frozen_s: Option<u64>,
}

/// How long machines stay frozen before the presets stop them: four hours, a working afternoon.
pub const DEFAULT_STOP_AFTER_FROZEN_S: u64 = 4 * 3600;

/// Named policies for common wishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// Only while nobody uses the machine (5 minutes idle), all cores and half the memory.
    OnlyWhenIdle,
    /// Always, but gently: one core and a quarter of memory while the owner works, more when away.
    AlwaysGently,
    /// Weeknights 19:00–07:00 and all weekend, when idle.
    NightsAndWeekends,
}

impl Preset {
    pub const ALL: [Preset; 3] = [
        Preset::OnlyWhenIdle,
        Preset::AlwaysGently,
        Preset::NightsAndWeekends,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Preset::OnlyWhenIdle => "only-when-idle",
            Preset::AlwaysGently => "always-gently",
            Preset::NightsAndWeekends => "nights-and-weekends",
        }
    }

    /// The policy for a host with `cores` and `memory_bytes`.
    pub fn policy(self, cores: f64, memory_bytes: u64) -> OwnerPolicy {
        let away = Limits {
            cores,
            memory_bytes: memory_bytes / 2,
        };
        match self {
            Preset::OnlyWhenIdle => OwnerPolicy {
                present: None,
                away,
                idle_after_s: 300,
                run_on_battery: false,
                suspend_above_load: Some(cores * 0.75),
                schedule: Vec::new(),
                max_machines: cores.max(1.0) as usize,
                exclusive_apps: Vec::new(),
                stop_after_frozen_s: Some(DEFAULT_STOP_AFTER_FROZEN_S),
            },
            Preset::AlwaysGently => OwnerPolicy {
                present: Some(Limits {
                    cores: 1.0_f64.min(cores),
                    memory_bytes: memory_bytes / 4,
                }),
                away,
                idle_after_s: 300,
                run_on_battery: false,
                suspend_above_load: None,
                schedule: Vec::new(),
                max_machines: cores.max(1.0) as usize,
                exclusive_apps: Vec::new(),
                stop_after_frozen_s: Some(DEFAULT_STOP_AFTER_FROZEN_S),
            },
            Preset::NightsAndWeekends => OwnerPolicy {
                present: None,
                away,
                idle_after_s: 300,
                run_on_battery: false,
                suspend_above_load: Some(cores * 0.75),
                schedule: vec![
                    Window {
                        days: 0b001_1111,
                        start_min: 19 * 60,
                        end_min: 7 * 60,
                    },
                    Window {
                        days: 0b110_0000,
                        start_min: 0,
                        end_min: 24 * 60,
                    },
                ],
                max_machines: cores.max(1.0) as usize,
                exclusive_apps: Vec::new(),
                stop_after_frozen_s: Some(DEFAULT_STOP_AFTER_FROZEN_S),
            },
        }
    }
}

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> Result<Preset, String> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                format!(
                    "{s:?} is not a preset; choose one of {}",
                    Preset::ALL.map(Preset::name).join(", ")
                )
            })
    }
}

/// What the host's activity sources measured.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct HostState {
    /// Seconds since the owner's last input, from the freshest source; `None` when no source can
    /// tell (a headless machine: then the owner counts as away).
    pub idle_s: Option<u64>,
    /// Which source measured `idle_s` (x11, logind, evdev, terminals, interrupts...), named as the
    /// source of an owner decision; `None` reads as "input".
    pub idle_source: Option<&'static str>,
    pub on_battery: bool,
    /// Cores kept busy by programs other than Gleaner's machines.
    pub other_load: f64,
    /// Local time for the schedule: weekday (0 = Monday) and minute of the day.
    pub weekday: u8,
    pub minute: u16,
    /// The owner's manual pause.
    pub paused: bool,
    /// An exclusive application (from the policy's list) is running.
    pub exclusive_app: bool,
    /// Seconds the work has been frozen without a break (0 while it runs).
    pub frozen_for_s: u64,
    /// What the site's batch system has taken on a cluster node (`None`: not a cluster node).
    pub batch: Option<BatchClaim>,
}

/// What the site's batch system (Slurm) holds on this node: its jobs come first, Gleaner gets only
/// what they leave.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct BatchClaim {
    /// The newest site job on the node, when the batch system names it (hook mode).
    pub job: Option<u64>,
    /// Site jobs on the node (0 with CPUs taken: poll mode, which sees CPUs but not jobs).
    pub jobs: u32,
    /// CPUs the site's jobs hold.
    pub cpus: u32,
    /// Cores the site's jobs leave free.
    pub free_cores: f64,
    /// Memory the site's jobs leave free, when they asked for memory.
    pub free_memory_bytes: Option<u64>,
    /// The node is drained, down or in maintenance: start nothing new.
    pub unavailable: bool,
}

impl BatchClaim {
    /// Whether the batch system wants anything from Gleaner now.
    pub fn active(&self) -> bool {
        self.cpus > 0 || self.unavailable
    }
}

/// Fewer cores than this left by site jobs is none: a sliver of a core is not worth the noise.
pub const BATCH_MIN_CORES: f64 = 0.1;

/// What to do with running work.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Action {
    /// Run within these limits (a throttle when they are below the away limits).
    Run(Limits),
    /// Freeze at once: no CPU at all, memory kept.
    Freeze,
    /// Stop running machines gracefully (they have been frozen too long); start none.
    Stop,
}

/// Why, in the words `gleaner status` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    OwnerAway,
    OwnerPresentThrottled,
    OwnerPresent,
    OnBattery,
    OtherLoad,
    OutsideSchedule,
    Paused,
    ExclusiveApp,
    /// The site's batch system took the node's CPUs (all: frozen; some: shrunk) or drained it.
    BatchSystem(BatchReason),
}

/// The batch-system details `gleaner status` shows: "yielding to the batch system (job 42, 2 CPUs)".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchReason {
    pub job: Option<u64>,
    pub jobs: u32,
    pub cpus: u32,
    pub unavailable: bool,
}

impl From<&BatchClaim> for BatchReason {
    fn from(c: &BatchClaim) -> BatchReason {
        BatchReason {
            job: c.job,
            jobs: c.jobs,
            cpus: c.cpus,
            unavailable: c.unavailable,
        }
    }
}

impl Reason {
    pub fn text(self) -> std::borrow::Cow<'static, str> {
        let fixed = match self {
            Reason::OwnerAway => "running: the owner is away",
            Reason::OwnerPresentThrottled => "throttled: the owner is using the machine",
            Reason::OwnerPresent => "frozen: the owner is using the machine",
            Reason::OnBattery => "frozen: running on battery",
            Reason::OtherLoad => "frozen: other programs are keeping the CPU busy",
            Reason::OutsideSchedule => "frozen: outside the allowed hours",
            Reason::Paused => "frozen: paused by the owner",
            Reason::ExclusiveApp => "frozen: an exclusive application is running",
            Reason::BatchSystem(b) => {
                let cpus = if b.cpus == 1 { "CPU" } else { "CPUs" };
                let what = match (b.unavailable, b.jobs, b.job) {
                    (true, _, _) => "node drained or down: starting nothing new".to_owned(),
                    (false, 0 | 1, Some(job)) => format!("job {job}, {} {cpus}", b.cpus),
                    (false, 0 | 1, None) => format!("{} {cpus} allocated", b.cpus),
                    (false, n, _) => format!("{n} jobs, {} {cpus}", b.cpus),
                };
                return format!("yielding to the batch system ({what})").into();
            }
        };
        fixed.into()
    }

    /// A short stable code for scripts and the GUI.
    pub fn code(self) -> &'static str {
        match self {
            Reason::OwnerAway => "owner-away",
            Reason::OwnerPresentThrottled => "owner-present-throttled",
            Reason::OwnerPresent => "owner-present",
            Reason::OnBattery => "on-battery",
            Reason::OtherLoad => "other-load",
            Reason::OutsideSchedule => "outside-schedule",
            Reason::Paused => "paused",
            Reason::ExclusiveApp => "exclusive-app",
            Reason::BatchSystem(_) => "batch-system",
        }
    }
}

/// The decision, with its reason and the source that decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub action: Action,
    pub reason: Reason,
    pub source: &'static str,
    /// New machines may start.
    pub may_start: bool,
}

impl Decision {
    /// Whether running guests should take only CPU time no other process wants (the idle
    /// scheduling class): while the owner is at the machine and they are throttled, so the
    /// owner's programs never share a core with them. While the owner is away they keep normal
    /// weight — an idle-class task may wait long for a busy core, and so for the freezer, and
    /// the owner's return must freeze them at once.
    pub fn guests_in_background(&self) -> bool {
        matches!(self.action, Action::Run(_)) && self.reason == Reason::OwnerPresentThrottled
    }
}

/// Decides what Gleaner may do now. A freeze that has lasted longer than the policy's
/// `stop_after_frozen_s` becomes a graceful stop, with the freeze's reason and source.
pub fn decide(p: &OwnerPolicy, s: &HostState) -> Decision {
    let freeze = |reason, source| Decision {
        action: if p
            .stop_after_frozen_s
            .is_some_and(|max| s.frozen_for_s >= max)
        {
            Action::Stop
        } else {
            Action::Freeze
        },
        reason,
        source,
        may_start: false,
    };
    if s.paused {
        return freeze(Reason::Paused, "owner");
    }
    let batch = s.batch.filter(BatchClaim::active);
    if let Some(b) = &batch
        && b.cpus > 0
        && b.free_cores < BATCH_MIN_CORES
    {
        return freeze(Reason::BatchSystem(b.into()), "batch-system");
    }
    let d = decide_owner(p, s, freeze);
    match batch {
        Some(b) => yield_to_batch(d, &b),
        None => d,
    }
}

/// A decision that runs work, shrunk to what the site's jobs leave and started no more on a
/// drained node; a freeze or stop for another reason stands.
fn yield_to_batch(mut d: Decision, b: &BatchClaim) -> Decision {
    let Action::Run(l) = d.action else {
        return d;
    };
    // A drained node with no job on it takes no CPUs: what runs keeps its limits.
    if b.cpus > 0 {
        d.action = Action::Run(Limits {
            cores: l.cores.min(b.free_cores),
            memory_bytes: b
                .free_memory_bytes
                .map_or(l.memory_bytes, |m| l.memory_bytes.min(m)),
        });
    }
    if b.unavailable {
        d.may_start = false;
    }
    d.reason = Reason::BatchSystem(b.into());
    d.source = "batch-system";
    d
}

/// The owner's part of [`decide`].
fn decide_owner(
    p: &OwnerPolicy,
    s: &HostState,
    freeze: impl Fn(Reason, &'static str) -> Decision,
) -> Decision {
    if s.on_battery && !p.run_on_battery {
        return freeze(Reason::OnBattery, "battery");
    }
    if s.exclusive_app {
        return freeze(Reason::ExclusiveApp, "exclusive-app");
    }
    if !p.schedule.is_empty() && !p.schedule.iter().any(|w| w.contains(s.weekday, s.minute)) {
        return freeze(Reason::OutsideSchedule, "schedule");
    }
    if let Some(max) = p.suspend_above_load
        && s.other_load > max
    {
        return freeze(Reason::OtherLoad, "cpu-load");
    }
    let present = s.idle_s.is_some_and(|i| i < p.idle_after_s);
    let input = s.idle_source.unwrap_or("input");
    if present {
        return match p.present {
            None => freeze(Reason::OwnerPresent, input),
            Some(l) => Decision {
                action: Action::Run(Limits {
                    cores: l.cores.min(p.away.cores),
                    memory_bytes: l.memory_bytes.min(p.away.memory_bytes),
                }),
                reason: Reason::OwnerPresentThrottled,
                source: input,
                may_start: true,
            },
        };
    }
    Decision {
        action: Action::Run(p.away),
        reason: Reason::OwnerAway,
        source: if s.idle_s.is_some() {
            input
        } else {
            "no-input-source"
        },
        may_start: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn state(idle: Option<u64>) -> HostState {
        HostState {
            idle_s: idle,
            weekday: 2,
            minute: 12 * 60,
            ..HostState::default()
        }
    }

    #[test]
    fn guests_go_to_the_background_only_while_throttled_for_the_owner() {
        let idle = Preset::OnlyWhenIdle.policy(4.0, 8 * GIB);
        let gentle = Preset::AlwaysGently.policy(4.0, 8 * GIB);
        // Throttled for the owner: background.
        assert!(decide(&gentle, &state(Some(10))).guests_in_background());
        // Owner away (normal weight, so the owner's return freezes at once), frozen, or
        // throttled for another reason: not.
        assert!(!decide(&gentle, &state(Some(999))).guests_in_background());
        assert!(!decide(&idle, &state(Some(999))).guests_in_background());
        assert!(!decide(&idle, &state(Some(10))).guests_in_background());
        let mut busy = state(Some(10));
        busy.exclusive_app = true;
        assert!(!decide(&gentle, &busy).guests_in_background());
    }

    #[test]
    fn decision_table() {
        let idle = Preset::OnlyWhenIdle.policy(4.0, 8 * GIB);
        let gentle = Preset::AlwaysGently.policy(4.0, 8 * GIB);
        let nights = Preset::NightsAndWeekends.policy(4.0, 8 * GIB);
        let run = |c: f64, m: u64| {
            Action::Run(Limits {
                cores: c,
                memory_bytes: m,
            })
        };
        let cases: Vec<(&OwnerPolicy, HostState, Action, Reason)> = vec![
            (&idle, state(Some(10)), Action::Freeze, Reason::OwnerPresent),
            (
                &idle,
                state(Some(301)),
                run(4.0, 4 * GIB),
                Reason::OwnerAway,
            ),
            (&idle, state(None), run(4.0, 4 * GIB), Reason::OwnerAway),
            (
                &gentle,
                state(Some(10)),
                run(1.0, 2 * GIB),
                Reason::OwnerPresentThrottled,
            ),
            (
                &gentle,
                state(Some(999)),
                run(4.0, 4 * GIB),
                Reason::OwnerAway,
            ),
            (
                &idle,
                HostState {
                    on_battery: true,
                    ..state(Some(999))
                },
                Action::Freeze,
                Reason::OnBattery,
            ),
            (
                &idle,
                HostState {
                    other_load: 3.5,
                    ..state(Some(999))
                },
                Action::Freeze,
                Reason::OtherLoad,
            ),
            (
                &idle,
                HostState {
                    other_load: 2.5,
                    ..state(Some(999))
                },
                run(4.0, 4 * GIB),
                Reason::OwnerAway,
            ),
            (
                &gentle,
                HostState {
                    paused: true,
                    ..state(Some(999))
                },
                Action::Freeze,
                Reason::Paused,
            ),
            // Wednesday noon is outside nights and weekends; Wednesday 23:00 and Saturday noon are in.
            (
                &nights,
                state(Some(999)),
                Action::Freeze,
                Reason::OutsideSchedule,
            ),
            (
                &nights,
                HostState {
                    minute: 23 * 60,
                    ..state(Some(999))
                },
                run(4.0, 4 * GIB),
                Reason::OwnerAway,
            ),
            (
                &nights,
                HostState {
                    weekday: 5,
                    ..state(Some(999))
                },
                run(4.0, 4 * GIB),
                Reason::OwnerAway,
            ),
            (
                &gentle,
                HostState {
                    exclusive_app: true,
                    ..state(Some(999))
                },
                Action::Freeze,
                Reason::ExclusiveApp,
            ),
            // Frozen for four hours: stop gracefully and give the memory back.
            (
                &idle,
                HostState {
                    frozen_for_s: DEFAULT_STOP_AFTER_FROZEN_S,
                    ..state(Some(10))
                },
                Action::Stop,
                Reason::OwnerPresent,
            ),
            (
                &idle,
                HostState {
                    frozen_for_s: DEFAULT_STOP_AFTER_FROZEN_S - 1,
                    ..state(Some(10))
                },
                Action::Freeze,
                Reason::OwnerPresent,
            ),
            // 03:00 Thursday belongs to Wednesday night's window.
            (
                &nights,
                HostState {
                    weekday: 3,
                    minute: 180,
                    ..state(Some(999))
                },
                run(4.0, 4 * GIB),
                Reason::OwnerAway,
            ),
        ];
        for (p, s, action, reason) in cases {
            let d = decide(p, &s);
            assert_eq!((d.action, d.reason), (action, reason), "{s:?}");
            assert_eq!(d.may_start, matches!(action, Action::Run(_)));
        }
    }

    #[test]
    fn batch_system_table() {
        let idle = Preset::OnlyWhenIdle.policy(2.0, 8 * GIB);
        let gentle = Preset::AlwaysGently.policy(2.0, 8 * GIB);
        let claim = |cpus: u32, free: f64| BatchClaim {
            job: Some(42),
            jobs: 1,
            cpus,
            free_cores: free,
            free_memory_bytes: None,
            unavailable: false,
        };
        let with = |b: BatchClaim, s: HostState| HostState {
            batch: Some(b),
            ..s
        };
        let run = |c: f64, m: u64| {
            Action::Run(Limits {
                cores: c,
                memory_bytes: m,
            })
        };
        // (policy, state, action, may start, reason code, source)
        let cases: Vec<(&OwnerPolicy, HostState, Action, bool, &str, &str)> = vec![
            // A 2-CPU job on a 2-CPU node: frozen at once, whoever else is around.
            (
                &idle,
                with(claim(2, 0.0), state(None)),
                Action::Freeze,
                false,
                "batch-system",
                "batch-system",
            ),
            (
                &idle,
                with(claim(2, 0.0), state(Some(10))),
                Action::Freeze,
                false,
                "batch-system",
                "batch-system",
            ),
            // A long site job: the freeze becomes a graceful stop, as for the owner.
            (
                &idle,
                HostState {
                    frozen_for_s: DEFAULT_STOP_AFTER_FROZEN_S,
                    ..with(claim(2, 0.0), state(None))
                },
                Action::Stop,
                false,
                "batch-system",
                "batch-system",
            ),
            // A 1-CPU job: shrink to the other CPU, keep running.
            (
                &idle,
                with(claim(1, 1.0), state(None)),
                run(1.0, 4 * GIB),
                true,
                "batch-system",
                "batch-system",
            ),
            // ...and to the memory the job left.
            (
                &idle,
                with(
                    BatchClaim {
                        free_memory_bytes: Some(GIB),
                        ..claim(1, 1.0)
                    },
                    state(None),
                ),
                run(1.0, GIB),
                true,
                "batch-system",
                "batch-system",
            ),
            // The owner's own throttle is tighter than what the job leaves: the owner's stands,
            // with the batch system named since it shrank work too.
            (
                &gentle,
                with(claim(1, 1.5), state(Some(10))),
                run(1.0, 2 * GIB),
                true,
                "batch-system",
                "batch-system",
            ),
            // Another reason to freeze wins over a shrink.
            (
                &idle,
                with(claim(1, 1.0), state(Some(10))),
                Action::Freeze,
                false,
                "owner-present",
                "input",
            ),
            (
                &idle,
                HostState {
                    paused: true,
                    ..with(claim(2, 0.0), state(None))
                },
                Action::Freeze,
                false,
                "paused",
                "owner",
            ),
            // Drained: what runs may finish, nothing new starts.
            (
                &idle,
                with(
                    BatchClaim {
                        unavailable: true,
                        ..BatchClaim::default()
                    },
                    state(None),
                ),
                run(2.0, 4 * GIB),
                false,
                "batch-system",
                "batch-system",
            ),
            // The source that saw the owner is named (present, throttled and away alike).
            (
                &idle,
                HostState {
                    idle_source: Some("evdev"),
                    ..state(Some(10))
                },
                Action::Freeze,
                false,
                "owner-present",
                "evdev",
            ),
            (
                &gentle,
                HostState {
                    idle_source: Some("x11"),
                    ..state(Some(10))
                },
                run(1.0, 2 * GIB),
                true,
                "owner-present-throttled",
                "x11",
            ),
            (
                &idle,
                HostState {
                    idle_source: Some("logind"),
                    ..state(Some(999))
                },
                run(2.0, 4 * GIB),
                true,
                "owner-away",
                "logind",
            ),
            // No site job: the claim says nothing.
            (
                &idle,
                with(BatchClaim::default(), state(None)),
                run(2.0, 4 * GIB),
                true,
                "owner-away",
                "no-input-source",
            ),
        ];
        for (p, s, action, may_start, code, source) in cases {
            let d = decide(p, &s);
            assert_eq!(
                (d.action, d.may_start, d.reason.code(), d.source),
                (action, may_start, code, source),
                "{s:?}"
            );
        }
    }

    #[test]
    fn batch_reasons_read_well() {
        let r = |job, jobs, cpus, unavailable| {
            Reason::BatchSystem(BatchReason {
                job,
                jobs,
                cpus,
                unavailable,
            })
            .text()
            .into_owned()
        };
        assert_eq!(
            r(Some(7), 1, 2, false),
            "yielding to the batch system (job 7, 2 CPUs)"
        );
        assert_eq!(
            r(Some(7), 1, 1, false),
            "yielding to the batch system (job 7, 1 CPU)"
        );
        assert_eq!(
            r(Some(9), 3, 4, false),
            "yielding to the batch system (3 jobs, 4 CPUs)"
        );
        assert_eq!(
            r(None, 0, 2, false),
            "yielding to the batch system (2 CPUs allocated)"
        );
        assert!(r(None, 0, 0, true).contains("drained"));
    }

    #[test]
    fn never_grants_more_than_the_away_limits() {
        let p = OwnerPolicy {
            present: Some(Limits {
                cores: 16.0,
                memory_bytes: 64 * GIB,
            }),
            ..Preset::AlwaysGently.policy(2.0, 4 * GIB)
        };
        for idle in [None, Some(0), Some(10_000)] {
            if let Action::Run(l) = decide(&p, &state(idle)).action {
                assert!(l.cores <= 2.0 && l.memory_bytes <= 2 * GIB, "{l:?}");
            }
        }
    }

    #[test]
    fn presets_parse_by_name() {
        for p in Preset::ALL {
            assert_eq!(p.name().parse::<Preset>().unwrap(), p);
        }
        assert!(
            "sometimes"
                .parse::<Preset>()
                .unwrap_err()
                .contains("only-when-idle")
        );
    }
}
