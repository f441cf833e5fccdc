//! The factory: the Vac loop that turns admitted machine types into running logical machines —
//! decide → start / stop → account — with lifetimes, heartbeats, outcomes and usage records.
//!
//! One task owns all machine state; the rest of the daemon talks to it through a [`FactoryHandle`]
//! (bounded command channel, oneshot replies). Slow work (image downloads, engine calls to create a
//! machine) runs in spawned tasks that report back over a bounded channel, so the loop keeps its tick.
//! Every machine is recorded in the ledger before the engine creates it, and its final usage record
//! replaces that entry in one transaction: after a crash, [`Factory::recover`] adopts or accounts for
//! every machine, losing and duplicating nothing.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gleaner::lifecycle::{self, Action, Lifetimes, Observation, StopCause};
use gleaner::{
    Backend, Digest, Envelope, Id16, MachineType, OutcomeCode, OutcomeReport, PublicKey, SecretKey,
    UsageRecord,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::ledger::Ledger;
use crate::mjf::{Features, MjfDir};
use crate::runtime::{
    ImageSource, Limits, MachineHandle, MachineSpec, MachineState, PreparedImage, Runtime, Usage,
    egress_supported,
};

/// Milliseconds since the epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Where the factory reads the time (a real clock, or a test's).
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        now_ms()
    }
}

/// Static settings of a factory.
#[derive(Debug, Clone)]
pub struct FactoryConfig {
    /// The space this factory belongs to (rendered into user_data).
    pub space: String,
    /// Root of per-machine folders (`<state_dir>/machines/<id>`).
    pub state_dir: PathBuf,
    /// How often the loop looks at its machines.
    pub tick: Duration,
    /// Grace between asking a machine to stop and killing it.
    pub stop_grace: Duration,
    /// A long-running machine emits an interim usage record this often.
    pub interim_every_s: u64,
    /// The host's per-core benchmark score, signed into records.
    pub benchmark: u32,
    /// Cores on the host (for machinefeatures/total_cpu).
    pub host_cores: u16,
    pub pids_limit: u32,
    /// Most machines started at once (image downloads and engine calls in flight).
    pub max_starting: usize,
}

impl FactoryConfig {
    /// Defaults for a factory keeping its state in `state_dir`.
    pub fn new(state_dir: PathBuf) -> FactoryConfig {
        FactoryConfig {
            space: "default".into(),
            state_dir,
            tick: Duration::from_millis(500),
            stop_grace: Duration::from_secs(30),
            interim_every_s: 3600,
            benchmark: 1000,
            host_cores: std::thread::available_parallelism()
                .map(|n| n.get() as u16)
                .unwrap_or(1),
            pids_limit: 512,
            max_starting: 2,
        }
    }
}

// What the owner policy allows (fed by the owner module through a watch channel) and what status
// shows of the factory are the control API's types, defined once in the core for the GUI too.
pub use gleaner::control::{Allowance, Event, FactoryStatus, MachineStatus, OfferStatus};

/// A machine type the factory may run, admitted by the trust store.
#[derive(Debug, Clone)]
pub struct Offer {
    pub machine_type: MachineType,
    pub digest: Digest,
    /// Target share (relative weight among offers).
    pub share: f64,
    /// The publisher's cap on cores per machine.
    pub max_cores: u16,
}

/// Requests to the factory loop.
pub enum Command {
    Status(oneshot::Sender<FactoryStatus>),
    /// Stop starting machines; running ones finish by their shutdowntime (or now + grace if `now`).
    Drain {
        now: bool,
    },
    /// Start machines again after a drain.
    Undrain,
    /// Admit (or replace) a machine type.
    Offer(Box<Offer>),
    /// Forget a machine type (untrusted or revoked); its running machines are stopped.
    Withdraw(Digest),
    /// A machine of this type aborted elsewhere in the space at this time: back off here too.
    RemoteAbort(Digest, u64),
    /// An event from outside the loop (trust decisions), for `gleaner events`.
    Note(String),
    /// The host benchmark was re-measured: records from now on carry this score.
    SetBenchmark(u32),
    /// What the rest of the space runs (space-wide target shares).
    Space(SpaceCounts),
    /// Pause (freeze its machines, start none) or resume one machine type; replies with how many
    /// machines were frozen or thawed once the engine has done it.
    PauseType {
        digest: Digest,
        paused: bool,
        reply: oneshot::Sender<PauseOutcome>,
    },
}

/// What pausing or resuming a machine type did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PauseOutcome {
    /// Machines frozen (pause) or thawed (resume) now.
    pub machines: usize,
    /// Machines left frozen because the whole host is frozen (resume while the host is paused).
    pub still_frozen: usize,
    /// Engine calls that failed, with why.
    pub errors: Vec<String>,
}

// ---- space-wide target shares (issue 5) ----
/// What the rest of the space runs, from the space view, for space-wide target shares.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpaceCounts {
    /// Machines per type on other hosts ([`gleaner::space::SpaceView::running_elsewhere`]).
    pub elsewhere: BTreeMap<Digest, u64>,
    /// Factories that may start on the same view ([`gleaner::space::SpaceView::deciders`]).
    pub deciders: u64,
}

/// Counts older than this are not used: the factory falls back to its local shares.
const SPACE_COUNTS_FRESH_S: u64 = 30;
// ---- end space-wide target shares ----

/// A cloneable handle to the factory loop.
#[derive(Clone)]
pub struct FactoryHandle {
    tx: mpsc::Sender<Command>,
    registry: Registry,
}

/// Why the factory could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("the factory has stopped")]
pub struct FactoryGone;

impl FactoryHandle {
    async fn send(&self, c: Command) -> Result<(), FactoryGone> {
        self.tx.send(c).await.map_err(|_| FactoryGone)
    }

    pub async fn status(&self) -> Result<FactoryStatus, FactoryGone> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Status(tx)).await?;
        rx.await.map_err(|_| FactoryGone)
    }

    pub async fn drain(&self, now: bool) -> Result<(), FactoryGone> {
        self.send(Command::Drain { now }).await
    }

    pub async fn undrain(&self) -> Result<(), FactoryGone> {
        self.send(Command::Undrain).await
    }

    pub async fn offer(&self, offer: Offer) -> Result<(), FactoryGone> {
        self.send(Command::Offer(Box::new(offer))).await
    }

    pub async fn withdraw(&self, digest: Digest) -> Result<(), FactoryGone> {
        self.send(Command::Withdraw(digest)).await
    }

    pub async fn remote_abort(&self, digest: Digest, at: u64) -> Result<(), FactoryGone> {
        self.send(Command::RemoteAbort(digest, at)).await
    }

    pub async fn note(&self, message: String) -> Result<(), FactoryGone> {
        self.send(Command::Note(message)).await
    }

    pub async fn set_benchmark(&self, score: u32) -> Result<(), FactoryGone> {
        self.send(Command::SetBenchmark(score)).await
    }

    /// What the rest of the space runs; choices follow space-wide shares while this is fresh.
    pub async fn space_counts(&self, counts: SpaceCounts) -> Result<(), FactoryGone> {
        self.send(Command::Space(counts)).await
    }

    /// Pauses (`paused`) or resumes one machine type: its running machines are frozen (thawed,
    /// unless the whole host is frozen) and no new one starts while it is paused.
    pub async fn pause_type(
        &self,
        digest: Digest,
        paused: bool,
    ) -> Result<PauseOutcome, FactoryGone> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::PauseType {
            digest,
            paused,
            reply,
        })
        .await?;
        rx.await.map_err(|_| FactoryGone)
    }

    /// The machines the owner enforcer freezes and thaws directly: all running machines except
    /// those of paused types, which the factory keeps frozen itself.
    pub fn registry(&self) -> Registry {
        self.registry.clone()
    }
}

/// The engine handles of running machines, shared read-mostly with the owner enforcer.
pub type Registry = Arc<RwLock<BTreeMap<Id16, MachineHandle>>>;

/// What the ledger keeps about a running machine, enough to adopt or account for it after a crash.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Persisted {
    machine_id: String,
    machine_type: String,
    publisher: String,
    type_name: String,
    engine_id: Option<String>,
    engine_name: String,
    cores: u16,
    memory_bytes: u64,
    started_at: u64,
    shutdown_at: u64,
    heartbeat_s: u64,
    fizzle_s: u64,
    backoff_s: u64,
    record_start_ms: u64,
    cpu_ns_at_record_start: u64,
    last_cpu_ns: u64,
    peak_memory: u64,
    stopping: Option<String>,
    mjf_root: PathBuf,
}

#[derive(Debug)]
struct Machine {
    id: Id16,
    digest: Digest,
    publisher: PublicKey,
    type_name: String,
    handle: MachineHandle,
    cores: u16,
    memory_bytes: u64,
    lifetimes: Lifetimes,
    backoff_s: u64,
    mjf: MjfDir,
    record_start_ms: u64,
    cpu_ns_at_record_start: u64,
    last: Usage,
    peak_memory: u64,
    /// Set once the factory asked it to stop: why, and when to kill it.
    stopping: Option<(StopCause, u64)>,
    /// When a freeze was first seen (heartbeats cannot arrive while frozen).
    frozen_since: Option<u64>,
    /// Heartbeat clock restarts here after a thaw.
    heartbeat_base: u64,
    ticks_since_persist: u32,
}

impl Machine {
    fn persisted(&self) -> Persisted {
        Persisted {
            machine_id: self.id.to_string(),
            machine_type: self.digest.to_string(),
            publisher: self.publisher.to_string(),
            type_name: self.type_name.clone(),
            engine_id: Some(self.handle.engine_id.clone()),
            engine_name: self.handle.name.clone(),
            cores: self.cores,
            memory_bytes: self.memory_bytes,
            started_at: self.lifetimes.started_at,
            shutdown_at: self.lifetimes.shutdown_at,
            heartbeat_s: self.lifetimes.heartbeat_s,
            fizzle_s: self.lifetimes.fizzle_s,
            backoff_s: self.backoff_s,
            record_start_ms: self.record_start_ms,
            cpu_ns_at_record_start: self.cpu_ns_at_record_start,
            last_cpu_ns: self.last.cpu_ns,
            peak_memory: self.peak_memory,
            stopping: self.stopping.map(|(c, _)| cause_name(c).to_owned()),
            mjf_root: self.mjf.root.clone(),
        }
    }

    fn from_persisted(p: &Persisted, handle: MachineHandle) -> Option<Machine> {
        Some(Machine {
            id: p.machine_id.parse().ok()?,
            digest: p.machine_type.parse().ok()?,
            publisher: p.publisher.parse().ok()?,
            type_name: p.type_name.clone(),
            handle,
            cores: p.cores,
            memory_bytes: p.memory_bytes,
            lifetimes: Lifetimes {
                started_at: p.started_at,
                shutdown_at: p.shutdown_at,
                heartbeat_s: p.heartbeat_s,
                fizzle_s: p.fizzle_s,
            },
            backoff_s: p.backoff_s,
            mjf: MjfDir {
                root: p.mjf_root.clone(),
            },
            record_start_ms: p.record_start_ms,
            cpu_ns_at_record_start: p.cpu_ns_at_record_start,
            last: Usage {
                cpu_ns: p.last_cpu_ns,
                memory_bytes: 0,
                peak_memory_bytes: p.peak_memory,
            },
            peak_memory: p.peak_memory,
            stopping: p
                .stopping
                .as_deref()
                .and_then(cause_from_name)
                .map(|c| (c, 0)),
            frozen_since: None,
            heartbeat_base: p.started_at,
            ticks_since_persist: 0,
        })
    }
}

fn cause_name(c: StopCause) -> &'static str {
    match c {
        StopCause::HeartbeatLost => "heartbeat-lost",
        StopCause::Wallclock => "wallclock",
        StopCause::Owner => "owner",
        StopCause::Drain => "drain",
    }
}

fn cause_from_name(s: &str) -> Option<StopCause> {
    Some(match s {
        "heartbeat-lost" => StopCause::HeartbeatLost,
        "wallclock" => StopCause::Wallclock,
        "owner" => StopCause::Owner,
        "drain" => StopCause::Drain,
        _ => return None,
    })
}

/// A start that finished in its task.
struct Started {
    result: Result<Machine, String>,
    digest: Digest,
    id: Id16,
}

/// The factory loop's state. Build with [`Factory::new`], then [`Factory::spawn`].
pub struct Factory<R: Runtime + 'static> {
    cfg: FactoryConfig,
    runtime: Arc<R>,
    ledger: Arc<Ledger>,
    host_key: SecretKey,
    clock: Arc<dyn Clock>,
    allowance: watch::Receiver<Allowance>,
    gossip: Option<mpsc::Sender<Envelope>>,
    offers: BTreeMap<Digest, Offer>,
    backoff_until: BTreeMap<Digest, u64>,
    machines: BTreeMap<Id16, Machine>,
    starting: BTreeMap<Id16, (Digest, u16, u64)>,
    /// When each offered type last had a machine started (ms): among types equally behind their
    /// shares, the one that waited longest goes first.
    last_started: BTreeMap<Digest, u64>,
    registry: Registry,
    draining: bool,
    events: VecDeque<Event>,
    /// The space's counts and when they came (space-wide target shares).
    space: Option<(SpaceCounts, u64)>,
    /// Machine types the owner paused: their machines are frozen and out of the registry.
    paused_types: BTreeSet<Digest>,
}

const EVENTS_KEPT: usize = 200;

impl<R: Runtime + 'static> Factory<R> {
    pub fn new(
        cfg: FactoryConfig,
        runtime: Arc<R>,
        ledger: Arc<Ledger>,
        host_key: SecretKey,
        allowance: watch::Receiver<Allowance>,
    ) -> Self {
        Factory {
            cfg,
            runtime,
            ledger,
            host_key,
            clock: Arc::new(SystemClock),
            allowance,
            gossip: None,
            offers: BTreeMap::new(),
            backoff_until: BTreeMap::new(),
            machines: BTreeMap::new(),
            starting: BTreeMap::new(),
            last_started: BTreeMap::new(),
            registry: Arc::new(RwLock::new(BTreeMap::new())),
            draining: false,
            events: VecDeque::with_capacity(EVENTS_KEPT),
            space: None,
            paused_types: BTreeSet::new(),
        }
    }

    /// Use another clock (tests).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Signed outcome reports are sent here for the space (bounded; dropped with a log when full).
    pub fn with_gossip(mut self, tx: mpsc::Sender<Envelope>) -> Self {
        self.gossip = Some(tx);
        self
    }

    fn now(&self) -> u64 {
        self.clock.now_ms() / 1000
    }

    fn event(&mut self, machine: Option<Id16>, message: String) {
        tracing::info!(machine = machine.map(|m| m.to_string()), "{message}");
        if self.events.len() == EVENTS_KEPT {
            self.events.pop_front();
        }
        self.events.push_back(Event {
            at: self.now(),
            machine: machine.map(|m| m.to_string()),
            message,
        });
    }

    /// Adopts the machines a previous run left behind and accounts for the rest, so that nothing is
    /// orphaned and no record is lost or duplicated. Call before [`Factory::spawn`].
    pub async fn recover(&mut self) -> Result<(), crate::ledger::LedgerError> {
        let persisted = self.ledger.machines()?;
        let owned = match self.runtime.list_owned().await {
            Ok(o) => o,
            Err(e) => {
                self.event(None, format!("cannot list machines to recover: {e}"));
                Vec::new()
            }
        };
        let mut known = std::collections::BTreeSet::new();
        for (id, bytes) in persisted {
            let Ok(p) = serde_json::from_slice::<Persisted>(&bytes) else {
                self.event(Some(id), "unreadable ledger entry; forgetting it".into());
                self.ledger.remove_machine(id)?;
                continue;
            };
            let engine = owned
                .iter()
                .find(|o| o.machine_id == Some(id) || Some(&o.engine_id) == p.engine_id.as_ref());
            let handle = match engine {
                Some(o) => MachineHandle {
                    engine_id: o.engine_id.clone(),
                    name: o.name.clone(),
                },
                None => MachineHandle {
                    engine_id: p.engine_id.clone().unwrap_or_default(),
                    name: p.engine_name.clone(),
                },
            };
            known.insert(handle.engine_id.clone());
            let Some(mut m) = Machine::from_persisted(&p, handle) else {
                self.ledger.remove_machine(id)?;
                continue;
            };
            m.heartbeat_base = self.now();
            match engine.map(|o| o.state) {
                Some(MachineState::Running) | Some(MachineState::Frozen) => {
                    self.event(Some(id), format!("adopted running machine {}", m.type_name));
                    self.register(&m);
                    self.machines.insert(id, m);
                }
                Some(MachineState::Exited { code }) => {
                    let obs = Observation::Exited {
                        exit_code: code,
                        shutdown_message: m.mjf.shutdown_message(),
                    };
                    let (outcome, detail) = match m.stopping {
                        Some((cause, _)) => (lifecycle::stopped_outcome(cause), "stopped".into()),
                        None => match lifecycle::assess(&m.lifetimes, &obs, self.now()) {
                            Action::Finish { outcome, detail } => (outcome, detail),
                            _ => (OutcomeCode::Error, "ended while the daemon was down".into()),
                        },
                    };
                    self.finish(m, outcome, detail).await;
                }
                _ => {
                    // Created but never started, or gone: account for what is known (CPU up to the
                    // last persisted sample) and clean up.
                    self.finish(
                        m,
                        OutcomeCode::Error,
                        "lost while the daemon was down".into(),
                    )
                    .await;
                }
            }
        }
        // Machines with our label that the ledger does not know: their record was already written
        // (finish committed, removal did not happen) or they never got one; either way remove them.
        for o in owned {
            if !known.contains(&o.engine_id) {
                let h = MachineHandle {
                    engine_id: o.engine_id.clone(),
                    name: o.name.clone(),
                };
                let _ = self.runtime.stop(&h, Duration::from_secs(1)).await;
                match self.runtime.remove(&h).await {
                    Ok(()) => self.event(None, format!("removed orphan {}", o.name)),
                    Err(e) => self.event(None, format!("cannot remove orphan {}: {e}", o.name)),
                }
            }
        }
        Ok(())
    }

    fn register(&self, m: &Machine) {
        if let Ok(mut r) = self.registry.write() {
            r.insert(m.id, m.handle.clone());
        }
    }

    fn unregister(&self, id: Id16) {
        if let Ok(mut r) = self.registry.write() {
            r.remove(&id);
        }
    }

    /// Starts the loop; it runs until `cancel` fires, then stops every machine gracefully
    /// (accounting for each) before returning.
    pub fn spawn(self, cancel: CancellationToken) -> (FactoryHandle, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(64);
        let handle = FactoryHandle {
            tx,
            registry: self.registry.clone(),
        };
        let task = tokio::spawn(self.run(rx, cancel));
        (handle, task)
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>, cancel: CancellationToken) {
        let (started_tx, mut started_rx) = mpsc::channel::<Started>(16);
        let mut tick = tokio::time::interval(self.cfg.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // With no machine, no start under way and nothing offered, a tick has nothing to do:
            // wait for a command instead (an offer arrives as one), so an idle daemon does not
            // wake twice a second for nothing. The first tick after that comes at once.
            let quiet =
                self.machines.is_empty() && self.starting.is_empty() && self.offers.is_empty();
            tokio::select! {
                _ = cancel.cancelled() => break,
                Some(cmd) = commands.recv() => self.command(cmd).await,
                Some(s) = started_rx.recv() => self.started(s).await,
                _ = tick.tick(), if !quiet => {
                    self.tick().await;
                    self.start_new(&started_tx);
                }
            }
        }
        self.shutdown(&mut started_rx).await;
    }

    async fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Drain { now } => {
                self.draining = true;
                let at = self.now() + self.cfg.stop_grace.as_secs();
                let mut n = 0;
                for m in self.machines.values_mut() {
                    if now && m.lifetimes.shutdown_at > at {
                        m.lifetimes.shutdown_at = at;
                        let _ = m.mjf.write_shutdown_time(at);
                    }
                    n += 1;
                }
                self.event(
                    None,
                    format!("draining: no new machines; {n} running finish by their shutdowntime"),
                );
            }
            Command::Undrain => {
                self.draining = false;
                self.event(None, "drain lifted".into());
            }
            Command::Offer(offer) => {
                let o = *offer;
                // Refused once, with the reason, rather than failing to start over and over.
                if !self.runtime.runs(o.machine_type.backend) {
                    self.event(
                        None,
                        format!(
                            "refused machine type {} v{}: this host runs no {} machines \
                             (its engine is missing or turned off; see `gleaner doctor`)",
                            o.machine_type.name, o.machine_type.version, o.machine_type.backend
                        ),
                    );
                    return;
                }
                if let Err(why) = egress_supported(o.machine_type.backend, &o.machine_type.egress) {
                    self.event(
                        None,
                        format!(
                            "refused machine type {} v{}: {why}",
                            o.machine_type.name, o.machine_type.version
                        ),
                    );
                    return;
                }
                self.event(
                    None,
                    format!(
                        "admitted machine type {} v{} ({})",
                        o.machine_type.name, o.machine_type.version, o.digest
                    ),
                );
                // A newer version of the same (publisher, name) replaces the older one.
                self.offers.retain(|_, old| {
                    !(old.machine_type.publisher == o.machine_type.publisher
                        && old.machine_type.name == o.machine_type.name)
                });
                self.offers.insert(o.digest, o);
            }
            Command::RemoteAbort(digest, at) => {
                if let Some(o) = self.offers.get(&digest) {
                    let until = at + u64::from(o.machine_type.backoff_s);
                    let name = o.machine_type.name.clone();
                    if until > self.now()
                        && self.backoff_until.get(&digest).is_none_or(|&u| u < until)
                    {
                        self.backoff_until.insert(digest, until);
                        self.event(
                            None,
                            format!(
                                "{name} aborted elsewhere in the space: backing off until {until}"
                            ),
                        );
                    }
                }
            }
            Command::Note(message) => self.event(None, message),
            Command::SetBenchmark(score) => self.cfg.benchmark = score,
            Command::Space(counts) => {
                self.space = Some((counts, self.now()));
            }
            Command::PauseType {
                digest,
                paused,
                reply,
            } => self.pause_type(digest, paused, reply),
            Command::Withdraw(digest) => {
                self.offers.remove(&digest);
                self.last_started.remove(&digest);
                let now = self.now();
                let grace = self.cfg.stop_grace.as_secs();
                let ids: Vec<Id16> = self
                    .machines
                    .values()
                    .filter(|m| m.digest == digest && m.stopping.is_none())
                    .map(|m| m.id)
                    .collect();
                for id in ids {
                    self.begin_stop(id, StopCause::Drain, now + grace).await;
                }
                self.event(None, format!("withdrew machine type {digest}"));
            }
        }
    }

    fn status(&self) -> FactoryStatus {
        let machines = self
            .machines
            .values()
            .map(|m| MachineStatus {
                machine_id: m.id.to_string(),
                machine_type: m.digest.to_string(),
                name: m.type_name.clone(),
                publisher: m.publisher.to_string(),
                state: match (m.stopping, m.frozen_since) {
                    (Some((c, _)), _) => format!("stopping ({})", cause_name(c)),
                    (None, _) if self.paused_types.contains(&m.digest) => "paused (by you)".into(),
                    (None, Some(_)) => "frozen".into(),
                    _ => "running".into(),
                },
                cores: m.cores,
                memory_bytes: m.memory_bytes,
                started_at: m.lifetimes.started_at,
                shutdown_at: m.lifetimes.shutdown_at,
                cpu_seconds: m.last.cpu_ns as f64 / 1e9,
                memory_now_bytes: m.last.memory_bytes,
            })
            .collect();
        let offers = self
            .offers
            .values()
            .map(|o| OfferStatus {
                machine_type: o.digest.to_string(),
                name: o.machine_type.name.clone(),
                version: o.machine_type.version,
                publisher: o.machine_type.publisher.to_string(),
                share: o.share,
                running: self.running_of(&o.digest),
                backed_off_until: self.backoff_until.get(&o.digest).copied(),
                paused: self.paused_types.contains(&o.digest),
            })
            .collect();
        FactoryStatus {
            draining: self.draining,
            allowance: self.allowance.borrow().clone(),
            machines,
            offers,
            events: self.events.iter().cloned().collect(),
            paused_types: self.paused_types.iter().map(|d| d.to_string()).collect(),
        }
    }

    fn running_of(&self, digest: &Digest) -> usize {
        self.machines
            .values()
            .filter(|m| &m.digest == digest)
            .count()
            + self
                .starting
                .values()
                .filter(|(d, _, _)| d == digest)
                .count()
    }

    /// Looks at every machine: samples its usage, applies lifetimes, finishes ended ones.
    async fn tick(&mut self) {
        let now = self.now();
        let allowance = self.allowance.borrow().clone();
        let ids: Vec<Id16> = self.machines.keys().copied().collect();
        // Ask the engine about every machine at once: one slow answer must not delay the rest.
        let looks = ids.iter().filter_map(|id| self.machines.get(id)).map(|m| {
            let rt = self.runtime.clone();
            let handle = m.handle.clone();
            async move {
                let state = rt.state(&handle).await;
                let usage = match state {
                    Ok(MachineState::Running | MachineState::Frozen) => {
                        rt.sample(&handle).await.ok()
                    }
                    _ => None,
                };
                (state, usage)
            }
        });
        let looks = futures_util::future::join_all(looks).await;
        let mut refreeze = Vec::new();
        for (id, (state, usage)) in ids.into_iter().zip(looks) {
            let Some(m) = self.machines.get(&id) else {
                continue;
            };
            let handle = m.handle.clone();
            let state = match state {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("state of {}: {e}", handle.name);
                    continue;
                }
            };
            if let Some(u) = usage
                && let Some(m) = self.machines.get_mut(&id)
            {
                if u.cpu_ns >= m.last.cpu_ns {
                    m.last = u;
                }
                m.peak_memory = m.peak_memory.max(u.peak_memory_bytes).max(u.memory_bytes);
            }
            let Some(m) = self.machines.get_mut(&id) else {
                continue;
            };
            // Frozen machines cannot heartbeat: restart the heartbeat clock when they thaw.
            match (state, m.frozen_since) {
                (MachineState::Frozen, None) => m.frozen_since = Some(now),
                (MachineState::Running, Some(_)) => {
                    m.frozen_since = None;
                    m.heartbeat_base = now;
                }
                _ => {}
            }
            m.ticks_since_persist += 1;
            if m.ticks_since_persist >= 20 {
                m.ticks_since_persist = 0;
                if let Ok(bytes) = serde_json::to_vec(&m.persisted()) {
                    let _ = self.ledger.put_machine(m.id, &bytes);
                }
            }
            let paused = self.paused_types.contains(&m.digest);
            match (state, m.stopping) {
                (MachineState::Exited { .. } | MachineState::Gone, Some((cause, _))) => {
                    let m = self.machines.remove(&id).expect("present");
                    self.finish(
                        m,
                        lifecycle::stopped_outcome(cause),
                        format!("stopped: {}", cause_name(cause)),
                    )
                    .await;
                }
                (MachineState::Exited { code }, None) => {
                    let obs = Observation::Exited {
                        exit_code: code,
                        shutdown_message: m.mjf.shutdown_message(),
                    };
                    let (outcome, detail) = match lifecycle::assess(&m.lifetimes, &obs, now) {
                        Action::Finish { outcome, detail } => (outcome, detail),
                        _ => (OutcomeCode::Error, "ended".into()),
                    };
                    let m = self.machines.remove(&id).expect("present");
                    self.finish(m, outcome, detail).await;
                }
                (MachineState::Gone, None) => {
                    let m = self.machines.remove(&id).expect("present");
                    self.finish(m, OutcomeCode::Error, "vanished from the engine".into())
                        .await;
                }
                (MachineState::Running | MachineState::Created, Some((cause, kill_at)))
                    if now >= kill_at =>
                {
                    // Still there after the grace: the runtime's stop kills after its own grace.
                    let _ = self.runtime.stop(&handle, Duration::from_secs(1)).await;
                    let m = self.machines.remove(&id).expect("present");
                    self.finish(
                        m,
                        lifecycle::stopped_outcome(cause),
                        format!("killed after the grace ({})", cause_name(cause)),
                    )
                    .await;
                }
                // A paused type's machine found running (the enforcer thawed the host in the same
                // instant): freeze it again.
                (MachineState::Running, None) if paused => refreeze.push(handle),
                // A paused machine still ends at its max wallclock, or when the owner policy stops
                // all work (the engine's stop thaws it first so it hears the request).
                (MachineState::Frozen, None)
                    if paused && (allowance.stop_all || now >= m.lifetimes.shutdown_at) =>
                {
                    let cause = if allowance.stop_all {
                        StopCause::Owner
                    } else if self.draining {
                        StopCause::Drain
                    } else {
                        StopCause::Wallclock
                    };
                    let kill_at = now + self.cfg.stop_grace.as_secs();
                    self.begin_stop(id, cause, kill_at).await;
                }
                (MachineState::Running, None) => {
                    let beat = m
                        .mjf
                        .last_heartbeat()
                        .map(|b| b.max(m.heartbeat_base))
                        .or(Some(m.heartbeat_base));
                    let action = lifecycle::assess(
                        &m.lifetimes,
                        &Observation::Running {
                            last_heartbeat: beat,
                        },
                        now,
                    );
                    if let Action::Stop { cause, .. } = action {
                        let kill_at = now + self.cfg.stop_grace.as_secs();
                        self.begin_stop(id, cause, kill_at).await;
                    } else if allowance.stop_all {
                        let kill_at = now + self.cfg.stop_grace.as_secs();
                        self.begin_stop(id, StopCause::Owner, kill_at).await;
                    } else if now.saturating_sub(m.record_start_ms / 1000)
                        >= self.cfg.interim_every_s
                    {
                        self.interim(id).await;
                    }
                }
                _ => {}
            }
        }
        if !refreeze.is_empty() {
            self.freeze_in_background(refreeze);
        }
    }

    /// Freezes these machines in a spawned task (the loop never waits on the engine).
    fn freeze_in_background(&self, handles: Vec<MachineHandle>) {
        let runtime = self.runtime.clone();
        tokio::spawn(async move {
            for r in freeze_all(runtime.as_ref(), &handles).await {
                tracing::warn!("freeze: {r}");
            }
        });
    }

    /// Pauses or resumes a machine type. Its machines leave the registry while paused, so the
    /// owner enforcer's thaw of the whole host cannot thaw them; on resume they rejoin it and are
    /// thawed unless the whole host is frozen (then they thaw with the host). The engine calls run
    /// in a spawned task that replies when they are done.
    fn pause_type(&mut self, digest: Digest, paused: bool, reply: oneshot::Sender<PauseOutcome>) {
        let changed = if paused {
            self.paused_types.insert(digest)
        } else {
            self.paused_types.remove(&digest)
        };
        let ms: Vec<(Id16, MachineHandle)> = self
            .machines
            .values()
            .filter(|m| m.digest == digest && m.stopping.is_none())
            .map(|m| (m.id, m.handle.clone()))
            .collect();
        let name = self
            .offers
            .get(&digest)
            .map(|o| o.machine_type.name.clone())
            .or_else(|| {
                self.machines
                    .values()
                    .find(|m| m.digest == digest)
                    .map(|m| m.type_name.clone())
            })
            .unwrap_or_else(|| digest.to_string());
        let host_frozen = self.allowance.borrow().frozen;
        for (id, _) in &ms {
            if paused {
                self.unregister(*id);
            } else if let Some(m) = self.machines.get(id) {
                self.register(m);
            }
        }
        if changed {
            self.event(
                None,
                match (paused, host_frozen) {
                    (true, _) => {
                        format!("paused {name} by the owner: {} machines frozen", ms.len())
                    }
                    (false, false) => format!("resumed {name}: {} machines thawed", ms.len()),
                    (false, true) => format!(
                        "resumed {name}: {} machines stay frozen while the host is paused",
                        ms.len()
                    ),
                },
            );
        }
        let runtime = self.runtime.clone();
        let handles: Vec<MachineHandle> = ms.into_iter().map(|(_, h)| h).collect();
        tokio::spawn(async move {
            let mut out = PauseOutcome::default();
            if paused {
                out.errors = freeze_all(runtime.as_ref(), &handles).await;
                out.machines = handles.len() - out.errors.len();
            } else if host_frozen {
                out.still_frozen = handles.len();
            } else {
                let thaws = handles.iter().map(|h| runtime.thaw(h));
                for (h, r) in handles
                    .iter()
                    .zip(futures_util::future::join_all(thaws).await)
                {
                    match r {
                        Ok(()) => out.machines += 1,
                        Err(e) => out.errors.push(format!("thaw {}: {e}", h.name)),
                    }
                }
            }
            let _ = reply.send(out);
        });
    }

    /// Writes the shutdown time, then asks the machine to stop; the loop kills it after the grace.
    async fn begin_stop(&mut self, id: Id16, cause: StopCause, kill_at: u64) {
        let Some(m) = self.machines.get_mut(&id) else {
            return;
        };
        let now = self.clock.now_ms() / 1000;
        if m.lifetimes.shutdown_at > now {
            m.lifetimes.shutdown_at = now;
        }
        if let Err(e) = m.mjf.write_shutdown_time(m.lifetimes.shutdown_at) {
            tracing::warn!("cannot write shutdowntime for {}: {e}", m.handle.name);
        }
        m.stopping = Some((cause, kill_at));
        let handle = m.handle.clone();
        if let Ok(bytes) = serde_json::to_vec(&m.persisted()) {
            let _ = self.ledger.put_machine(id, &bytes);
        }
        self.event(
            Some(id),
            format!("stopping {} ({})", handle.name, cause_name(cause)),
        );
        // The stop runs in its own task so a slow engine never holds up the loop; the next ticks
        // see the machine exit (or kill it at kill_at).
        let runtime = self.runtime.clone();
        let grace = self.cfg.stop_grace;
        tokio::spawn(async move {
            if let Err(e) = runtime.stop(&handle, grace).await {
                tracing::warn!("stop {}: {e}", handle.name);
            }
        });
    }

    fn usage_record(&self, m: &Machine, end_ms: u64, outcome: OutcomeCode) -> UsageRecord {
        let wall_ms = end_ms.saturating_sub(m.record_start_ms).max(1);
        let cpu_ms = m.last.cpu_ns.saturating_sub(m.cpu_ns_at_record_start) / 1_000_000;
        // Engine clocks and ours differ by milliseconds; never claim more than the cores could do.
        let cpu_ms = cpu_ms.min(wall_ms * u64::from(m.cores));
        let mut record_id = [0u8; 16];
        if getrandom::fill(&mut record_id).is_err() {
            // Unique enough without the OS: machine id xor the end time.
            record_id = m.id.0;
            record_id[..8]
                .iter_mut()
                .zip(end_ms.to_le_bytes())
                .for_each(|(a, b)| *a ^= b);
        }
        UsageRecord {
            v: gleaner::usage::USAGE_RECORD_VERSION,
            record_id: Id16(record_id),
            host: self.host_key.public(),
            machine_id: m.id,
            publisher: m.publisher,
            machine_type: m.digest,
            start: m.record_start_ms / 1000,
            end: end_ms.div_ceil(1000),
            cpu_ms,
            wall_ms,
            peak_memory: m.peak_memory,
            cores: m.cores,
            benchmark: self.cfg.benchmark,
            outcome,
        }
    }

    async fn interim(&mut self, id: Id16) {
        let end_ms = self.clock.now_ms();
        let Some(m) = self.machines.get(&id) else {
            return;
        };
        let record = self.usage_record(m, end_ms, OutcomeCode::Running);
        let env = Envelope::seal(&record, &self.host_key);
        let Some(m) = self.machines.get_mut(&id) else {
            return;
        };
        m.record_start_ms = end_ms;
        m.cpu_ns_at_record_start = m.last.cpu_ns;
        let Ok(state) = serde_json::to_vec(&m.persisted()) else {
            return;
        };
        match self
            .ledger
            .append_interim(id, &state, record.record_id, &env)
        {
            Ok(()) => self.event(
                Some(id),
                format!("interim record: {:.1} cpu s", record.cpu_ms as f64 / 1000.0),
            ),
            Err(e) => self.event(Some(id), format!("cannot write interim record: {e}")),
        }
    }

    /// Accounts for an ended machine (one signed record, atomically replacing its ledger entry),
    /// cleans up after it, publishes its outcome and applies back-off.
    async fn finish(&mut self, m: Machine, outcome: OutcomeCode, detail: String) {
        let end_ms = self.clock.now_ms();
        let record = self.usage_record(&m, end_ms, outcome);
        let env = Envelope::seal(&record, &self.host_key);
        if let Err(e) = self.ledger.finish_machine(m.id, record.record_id, &env) {
            // Keep the machine in the ledger: recovery will account for it on the next start.
            self.event(Some(m.id), format!("cannot write the usage record: {e}"));
            self.unregister(m.id);
            return;
        }
        self.unregister(m.id);
        if let Err(e) = self.runtime.remove(&m.handle).await {
            self.event(Some(m.id), format!("cannot remove {}: {e}", m.handle.name));
        }
        if let Err(e) = m.mjf.remove() {
            self.event(
                Some(m.id),
                format!("cannot remove {}: {e}", m.mjf.root.display()),
            );
        }
        let now = self.now();
        self.event(
            Some(m.id),
            format!(
                "{} ended: {outcome} ({detail}); {:.1} cpu s over {:.1} s",
                m.type_name,
                record.cpu_ms as f64 / 1000.0,
                record.wall_ms as f64 / 1000.0
            ),
        );
        if outcome.is_abort() {
            let until = now + m.backoff_s;
            self.backoff_until.insert(m.digest, until);
            self.event(
                Some(m.id),
                format!("{} backs off until {until}", m.type_name),
            );
        }
        if let Some(tx) = &self.gossip {
            let mut detail = detail;
            detail.truncate(gleaner::advert::OUTCOME_DETAIL_MAX / 2);
            let report = OutcomeReport {
                v: gleaner::advert::ADVERT_VERSION,
                host: self.host_key.public(),
                machine_id: m.id,
                machine_type: m.digest,
                at: now,
                ran_s: now.saturating_sub(m.lifetimes.started_at),
                outcome: if outcome == OutcomeCode::Running {
                    OutcomeCode::Success
                } else {
                    outcome
                },
                detail,
            };
            if tx
                .try_send(Envelope::seal(&report, &self.host_key))
                .is_err()
            {
                tracing::warn!("gossip queue full; outcome of {} not published", m.id);
            }
        }
    }

    /// Chooses what to start: among admitted types that are not backed off, the one lagging most
    /// behind its share — across the whole space while the space's counts are fresh
    /// ([`gleaner::space::pick_by_space_share`]), else here: the fewest running machines per unit of
    /// share, and among equals the one that waited longest for a start. If it does not fit yet,
    /// nothing smaller jumps the queue, and once the cores are free it is first in line (it waited
    /// longest), so multi-core types are not starved by single-core ones refilling freed cores.
    fn choose(&self, allowance: &Allowance, now: u64) -> Option<(Digest, u16)> {
        let used_cores: u16 = self.machines.values().map(|m| m.cores).sum::<u16>()
            + self.starting.values().map(|(_, c, _)| *c).sum::<u16>();
        let used_mem: u64 = self.machines.values().map(|m| m.memory_bytes).sum::<u64>()
            + self.starting.values().map(|(_, _, mem)| *mem).sum::<u64>();
        let count = self.machines.len() + self.starting.len();
        if count >= allowance.max_machines {
            return None;
        }
        let free_cores = allowance.cores.saturating_sub(used_cores);
        let free_mem = allowance.memory_bytes.saturating_sub(used_mem);
        let eligible = self
            .offers
            .values()
            .filter(|o| self.backoff_until.get(&o.digest).is_none_or(|&t| now >= t))
            .filter(|o| !self.paused_types.contains(&o.digest))
            // One start per type at a time: a new or flaky type cannot stampede the host.
            .filter(|o| !self.starting.values().any(|(d, _, _)| d == &o.digest))
            .filter(|o| o.machine_type.check_fresh(now).is_ok())
            // Types that could never fit under the current allowance are skipped, not waited for.
            .filter(|o| {
                o.machine_type.cores_min <= allowance.cores.min(o.max_cores)
                    && u64::from(o.machine_type.memory_mib) << 20 <= allowance.memory_bytes
            });
        let best = match &self.space {
            Some((space, at)) if now.saturating_sub(*at) <= SPACE_COUNTS_FRESH_S => {
                let eligible: Vec<&Offer> = eligible.collect();
                let candidates: Vec<(Digest, f64)> =
                    eligible.iter().map(|o| (o.digest, o.share)).collect();
                let mut running = space.elsewhere.clone();
                for (d, _) in &candidates {
                    *running.entry(*d).or_insert(0) += self.running_of(d) as u64;
                }
                // A different draw per host and per decision.
                let mut seed = self.host_key.public().to_bytes().to_vec();
                seed.extend_from_slice(&self.clock.now_ms().to_le_bytes());
                seed.extend_from_slice(&(count as u64).to_le_bytes());
                let h = Digest::of(&seed).0;
                let salt = u64::from_le_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]);
                let pick = gleaner::space::pick_by_space_share(
                    &candidates,
                    &running,
                    space.deciders,
                    salt,
                )?;
                eligible.into_iter().find(|o| o.digest == pick)?
            }
            _ => eligible.min_by(|a, b| {
                let ka = self.running_of(&a.digest) as f64 / a.share.max(1e-6);
                let kb = self.running_of(&b.digest) as f64 / b.share.max(1e-6);
                let last = |d: &Digest| self.last_started.get(d).copied().unwrap_or(0);
                ka.total_cmp(&kb)
                    .then(last(&a.digest).cmp(&last(&b.digest)))
                    .then(a.digest.cmp(&b.digest))
            })?,
        };
        let mt = &best.machine_type;
        let want = mt.cores_max.min(best.max_cores).min(free_cores);
        let mem = u64::from(mt.memory_mib) << 20;
        if want < mt.cores_min || mem > free_mem {
            return None;
        }
        Some((best.digest, want))
    }

    fn start_new(&mut self, started_tx: &mpsc::Sender<Started>) {
        let allowance = self.allowance.borrow().clone();
        if self.draining || !allowance.may_start || allowance.stop_all {
            return;
        }
        let now = self.now();
        while self.starting.len() < self.cfg.max_starting {
            let Some((digest, cores)) = self.choose(&allowance, now) else {
                return;
            };
            let Some(offer) = self.offers.get(&digest).cloned() else {
                return;
            };
            let mut id = [0u8; 16];
            if let Err(e) = getrandom::fill(&mut id) {
                self.event(None, format!("no randomness for a machine id: {e}"));
                return;
            }
            let id = Id16(id);
            let mem = u64::from(offer.machine_type.memory_mib) << 20;
            self.starting.insert(id, (digest, cores, mem));
            self.last_started.insert(digest, self.clock.now_ms());
            // A backed-off type that is allowed again gets one probe at a time.
            if self.backoff_until.remove(&digest).is_some() {
                self.event(
                    Some(id),
                    format!("probing {} after its back-off", offer.machine_type.name),
                );
            }
            self.event(
                Some(id),
                format!("starting {} with {cores} cores", offer.machine_type.name),
            );
            let job = StartJob {
                runtime: self.runtime.clone(),
                ledger: self.ledger.clone(),
                offer,
                id,
                cores,
                now_ms: self.clock.now_ms(),
                cfg: self.cfg.clone(),
                host: self.host_key.public(),
            };
            let tx = started_tx.clone();
            tokio::spawn(async move {
                let result = job.run().await;
                let _ = tx.send(Started { result, digest, id }).await;
            });
        }
    }

    async fn started(&mut self, s: Started) {
        self.starting.remove(&s.id);
        match s.result {
            Ok(m) => {
                self.event(
                    Some(m.id),
                    format!("{} running as {}", m.type_name, m.handle.name),
                );
                let (id, digest) = (m.id, m.digest);
                if self.paused_types.contains(&digest) {
                    // Paused while it was starting: it joins the others of its type, frozen.
                    self.freeze_in_background(vec![m.handle.clone()]);
                } else {
                    self.register(&m);
                }
                self.machines.insert(m.id, m);
                // Withdrawn (untrusted, revoked) while it was starting: stop it like the others.
                if !self.offers.contains_key(&digest) {
                    let at = self.now() + self.cfg.stop_grace.as_secs();
                    self.begin_stop(id, StopCause::Drain, at).await;
                }
            }
            Err(e) => {
                self.event(Some(s.id), format!("could not start: {e}"));
                if let Some(o) = self.offers.get(&s.digest) {
                    let until = self.now() + u64::from(o.machine_type.backoff_s);
                    self.backoff_until.insert(s.digest, until);
                }
            }
        }
    }

    /// Stops and accounts for every machine (SIGTERM / daemon shutdown).
    async fn shutdown(&mut self, started_rx: &mut mpsc::Receiver<Started>) {
        // Wait briefly for starts in flight so they are stopped too, not orphaned.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !self.starting.is_empty() {
            match tokio::time::timeout_at(deadline, started_rx.recv()).await {
                Ok(Some(s)) => self.started(s).await,
                _ => break,
            }
        }
        let now = self.now();
        let ids: Vec<Id16> = self.machines.keys().copied().collect();
        let grace = self.cfg.stop_grace.min(Duration::from_secs(10));
        for id in &ids {
            if let Some(m) = self.machines.get_mut(id) {
                m.lifetimes.shutdown_at = m.lifetimes.shutdown_at.min(now);
                let _ = m.mjf.write_shutdown_time(m.lifetimes.shutdown_at);
            }
        }
        let stops = ids.iter().filter_map(|id| self.machines.get(id)).map(|m| {
            let runtime = self.runtime.clone();
            let handle = m.handle.clone();
            async move { runtime.stop(&handle, grace).await }
        });
        futures_util::future::join_all(stops).await;
        for id in ids {
            if let Some(m) = self.machines.remove(&id) {
                let cause = m.stopping.map(|(c, _)| c).unwrap_or(StopCause::Drain);
                self.finish(
                    m,
                    lifecycle::stopped_outcome(cause),
                    "daemon shut down".into(),
                )
                .await;
            }
        }
    }
}

/// Freezes all `handles` at once; the errors, each naming its machine.
async fn freeze_all<R: Runtime>(runtime: &R, handles: &[MachineHandle]) -> Vec<String> {
    let freezes = handles.iter().map(|h| runtime.freeze(h));
    handles
        .iter()
        .zip(futures_util::future::join_all(freezes).await)
        .filter_map(|(h, r)| r.err().map(|e| format!("freeze {}: {e}", h.name)))
        .collect()
}

/// Everything a start needs, moved into its task.
struct StartJob<R: Runtime> {
    runtime: Arc<R>,
    ledger: Arc<Ledger>,
    offer: Offer,
    id: Id16,
    cores: u16,
    now_ms: u64,
    cfg: FactoryConfig,
    host: PublicKey,
}

impl<R: Runtime> StartJob<R> {
    async fn run(self) -> Result<Machine, String> {
        let mt = &self.offer.machine_type;
        let now = self.now_ms / 1000;
        let prepared = prepare(self.runtime.as_ref(), mt).await?;
        let lifetimes = Lifetimes::new(mt, now);
        let memory_bytes = u64::from(mt.memory_mib) << 20;
        let disk_bytes = u64::from(mt.disk_mib) << 20;
        let name = format!("gleaner-{}", self.id);
        let root = self
            .cfg
            .state_dir
            .join("machines")
            .join(self.id.to_string());
        let features = Features {
            benchmark_per_core: self.cfg.benchmark,
            jobslots: 1,
            shutdown_at: lifetimes.shutdown_at,
            total_cpu: u32::from(self.cfg.host_cores),
            allocated_cpu: self.cores,
            wall_limit_secs: u64::from(mt.max_wallclock_s),
            max_rss_bytes: memory_bytes,
            scratch_limit_bytes: disk_bytes,
            jobstart_secs: now,
            job_id: self.id.to_string(),
        };
        let shutdown = lifetimes.shutdown_at.to_string();
        let id_text = self.id.to_string();
        let host_text = self.host.to_string();
        let user_data = lifecycle::render_user_data(
            &mt.user_data,
            &[
                ("space", &self.cfg.space),
                ("machine_id", &id_text),
                ("host", &host_text),
                ("shutdown_time", &shutdown),
                ("machinefeatures", "/machinefeatures"),
                ("jobfeatures", "/jobfeatures"),
                ("joboutputs", "/joboutputs"),
            ],
        );
        let mjf = MjfDir::create(&root, &features, &user_data)
            .map_err(|e| format!("cannot write machine features in {}: {e}", root.display()))?;
        let mut machine = Machine {
            id: self.id,
            digest: self.offer.digest,
            publisher: mt.publisher,
            type_name: mt.name.clone(),
            handle: MachineHandle {
                engine_id: String::new(),
                name: name.clone(),
            },
            cores: self.cores,
            memory_bytes,
            lifetimes,
            backoff_s: u64::from(mt.backoff_s),
            mjf,
            record_start_ms: self.now_ms,
            cpu_ns_at_record_start: 0,
            last: Usage::default(),
            peak_memory: 0,
            stopping: None,
            frozen_since: None,
            heartbeat_base: now,
            ticks_since_persist: 0,
        };
        // In the ledger before the engine knows it: a crash from here on is recoverable.
        let persist = |m: &Machine| {
            serde_json::to_vec(&m.persisted())
                .map_err(|e| e.to_string())
                .and_then(|b| self.ledger.put_machine(m.id, &b).map_err(|e| e.to_string()))
        };
        persist(&machine)?;
        let spec = MachineSpec {
            backend: mt.backend,
            machine_id: self.id,
            machine_type: self.offer.digest,
            name,
            image: prepared.image,
            kernel: prepared.kernel,
            initrd: prepared.initrd,
            cores: self.cores,
            limits: Limits {
                cpus: f64::from(self.cores),
                memory_bytes,
            },
            disk_bytes,
            pids_limit: self.cfg.pids_limit,
            mjf_dir: machine.mjf.root.clone(),
            egress: mt.egress.clone(),
            // A container runs user_data as its command; a VM's own init runs it from the seed.
            command: (mt.backend == Backend::Container)
                .then(|| vec!["/bin/sh".into(), "/user_data".into()]),
            labels: BTreeMap::from([("org.gleaner.machine-type-name".into(), mt.name.clone())]),
        };
        let created = self.runtime.create(&spec).await;
        let handle = match created {
            Ok(h) => h,
            Err(e) => {
                let _ = self.ledger.remove_machine(self.id);
                let _ = machine.mjf.remove();
                return Err(e.to_string());
            }
        };
        machine.handle = handle.clone();
        persist(&machine)?;
        if let Err(e) = self.runtime.start(&handle).await {
            let _ = self.runtime.remove(&handle).await;
            let _ = self.ledger.remove_machine(self.id);
            let _ = machine.mjf.remove();
            return Err(e.to_string());
        }
        Ok(machine)
    }
}

// ---- Preparing what a machine type boots (containers and VMs) ----

/// What a machine type needs ready in its engine before a machine is created.
struct Prepared {
    /// The container image, or a VM's base disk (qcow2/raw) under its copy-on-write overlay.
    image: Option<PreparedImage>,
    /// A VM's kernel and initrd for direct boot (local paths in the engine's cache).
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
}

/// Fetches and verifies every blob of `mt` through the engine of its backend.
async fn prepare<R: Runtime>(runtime: &R, mt: &MachineType) -> Result<Prepared, String> {
    if !runtime.runs(mt.backend) {
        return Err(format!(
            "{} is a {} machine type; this host runs no {} machines",
            mt.name, mt.backend, mt.backend
        ));
    }
    let fetch = |blob: &gleaner::Blob| {
        let source = ImageSource {
            url: blob.url.clone(),
            sha256: blob.sha256,
            backend: mt.backend,
        };
        async move {
            runtime
                .prepare_image(&source, &|_| {})
                .await
                .map_err(|e| e.to_string())
        }
    };
    let image = match &mt.image {
        Some(blob) => Some(fetch(blob).await?),
        None => None,
    };
    let (kernel, initrd) = match mt.backend {
        Backend::Container => (None, None),
        Backend::Vm => {
            let kernel = match &mt.kernel {
                Some(b) => Some(PathBuf::from(fetch(b).await?.reference)),
                None => None,
            };
            let initrd = match &mt.initrd {
                Some(b) => Some(PathBuf::from(fetch(b).await?.reference)),
                None => None,
            };
            (kernel, initrd)
        }
    };
    Ok(Prepared {
        image,
        kernel,
        initrd,
    })
}

#[cfg(test)]
mod tests {
    //! Pausing one machine type, on the fake runtime.
    use super::*;
    use crate::runtime::fake::FakeRuntime;
    use gleaner::{Blob, MachineType};

    fn offer(name: &str) -> Offer {
        let publisher = SecretKey::from_seed([0x51; 32]);
        let mut mt = MachineType::example(publisher.public());
        mt.name = name.into();
        mt.image = Some(Blob {
            url: format!("https://example.invalid/{name}.tar"),
            sha256: Digest::of(name.as_bytes()),
        });
        mt.cores_min = 1;
        mt.cores_max = 1;
        mt.memory_mib = 64;
        mt.heartbeat_s = 3600;
        mt.not_after = 4_000_000_000;
        let v = Envelope::seal(&mt, &publisher)
            .open::<MachineType>()
            .unwrap();
        Offer {
            machine_type: v.message,
            digest: v.digest,
            share: 1.0,
            max_cores: 1,
        }
    }

    struct Fixture {
        handle: FactoryHandle,
        fake: Arc<FakeRuntime>,
        allowance: watch::Sender<Allowance>,
        cancel: CancellationToken,
        _dir: tempfile::TempDir,
    }

    fn fixture(open: Allowance) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(Ledger::open(&dir.path().join("ledger.redb")).unwrap());
        let mut cfg = FactoryConfig::new(dir.path().to_owned());
        cfg.tick = Duration::from_millis(50);
        cfg.stop_grace = Duration::from_secs(1);
        let (tx, rx) = watch::channel(open);
        let fake = Arc::new(FakeRuntime::new());
        let f = Factory::new(
            cfg,
            fake.clone(),
            ledger,
            SecretKey::from_seed([0x77; 32]),
            rx,
        );
        let cancel = CancellationToken::new();
        let (handle, _task) = f.spawn(cancel.clone());
        Fixture {
            handle,
            fake,
            allowance: tx,
            cancel,
            _dir: dir,
        }
    }

    /// The engine's view: (state) of each machine of `digest`.
    async fn states(fake: &FakeRuntime, digest: Digest) -> Vec<MachineState> {
        fake.list_owned()
            .await
            .unwrap()
            .into_iter()
            .filter(|o| o.machine_type == Some(digest))
            .map(|o| o.state)
            .collect()
    }

    async fn until<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(v) = f().await {
                return v;
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn pausing_a_type_freezes_only_its_machines_and_resume_thaws_them() {
        let fx = fixture(Allowance::open(2, 2 << 30));
        let (a, b) = (offer("alpha"), offer("beta"));
        fx.handle.offer(a.clone()).await.unwrap();
        fx.handle.offer(b.clone()).await.unwrap();
        until("one machine of each type", async || {
            (states(&fx.fake, a.digest).await == [MachineState::Running]
                && states(&fx.fake, b.digest).await == [MachineState::Running])
            .then_some(())
        })
        .await;

        let out = fx.handle.pause_type(a.digest, true).await.unwrap();
        assert_eq!(out.machines, 1, "{out:?}");
        assert_eq!(states(&fx.fake, a.digest).await, [MachineState::Frozen]);
        assert_eq!(states(&fx.fake, b.digest).await, [MachineState::Running]);
        // The owner enforcer no longer sees it, so a thaw of the whole host leaves it frozen.
        assert_eq!(fx.handle.registry().read().unwrap().len(), 1);
        let s = fx.handle.status().await.unwrap();
        let alpha = s.machines.iter().find(|m| m.name == "alpha").unwrap();
        assert_eq!(alpha.state, "paused (by you)");
        assert!(s.offers.iter().any(|o| o.name == "alpha" && o.paused));
        assert_eq!(s.paused_types, vec![a.digest.to_string()]);

        // Thawed behind the factory's back (the enforcer racing the pause): frozen again.
        let h = fx
            .fake
            .list_owned()
            .await
            .unwrap()
            .into_iter()
            .find(|o| o.machine_type == Some(a.digest))
            .map(|o| MachineHandle {
                engine_id: o.engine_id,
                name: o.name,
            })
            .unwrap();
        fx.fake.thaw(&h).await.unwrap();
        until("the paused machine frozen again", async || {
            (states(&fx.fake, a.digest).await == [MachineState::Frozen]).then_some(())
        })
        .await;

        // Resumed while the whole host is frozen: it stays frozen, back under the enforcer.
        let mut frozen = fx.allowance.borrow().clone();
        frozen.frozen = true;
        fx.allowance.send(frozen).unwrap();
        let out = fx.handle.pause_type(a.digest, false).await.unwrap();
        assert_eq!((out.machines, out.still_frozen), (0, 1), "{out:?}");
        assert_eq!(states(&fx.fake, a.digest).await, [MachineState::Frozen]);
        assert_eq!(fx.handle.registry().read().unwrap().len(), 2);

        // With the host running, pause then resume thaws it.
        fx.allowance.send(Allowance::open(2, 2 << 30)).unwrap();
        fx.handle.pause_type(a.digest, true).await.unwrap();
        let out = fx.handle.pause_type(a.digest, false).await.unwrap();
        assert_eq!(out.machines, 1, "{out:?}");
        assert_eq!(states(&fx.fake, a.digest).await, [MachineState::Running]);
        assert_eq!(states(&fx.fake, b.digest).await, [MachineState::Running]);
        let s = fx.handle.status().await.unwrap();
        assert!(s.paused_types.is_empty());
        assert!(s.machines.iter().all(|m| m.state == "running"), "{s:?}");
        fx.cancel.cancel();
    }

    #[tokio::test]
    async fn a_paused_type_never_starts_and_its_machines_stop_when_the_owner_stops_all() {
        let mut closed = Allowance::open(2, 2 << 30);
        closed.may_start = false;
        let fx = fixture(closed);
        let (a, b) = (offer("alpha"), offer("beta"));
        fx.handle.offer(a.clone()).await.unwrap();
        fx.handle.offer(b.clone()).await.unwrap();
        fx.handle.pause_type(a.digest, true).await.unwrap();
        fx.allowance.send(Allowance::open(2, 2 << 30)).unwrap();
        until("both slots filled by beta", async || {
            (states(&fx.fake, b.digest).await.len() == 2).then_some(())
        })
        .await;
        // Many ticks later, still no alpha.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(states(&fx.fake, a.digest).await.is_empty());

        // A paused machine still ends when the owner policy stops all work.
        let fx = fixture(Allowance::open(1, 1 << 30));
        fx.handle.offer(a.clone()).await.unwrap();
        until("alpha running", async || {
            (states(&fx.fake, a.digest).await == [MachineState::Running]).then_some(())
        })
        .await;
        fx.handle.pause_type(a.digest, true).await.unwrap();
        let mut stop = Allowance::open(1, 1 << 30);
        stop.stop_all = true;
        stop.may_start = false;
        fx.allowance.send(stop).unwrap();
        until("the paused machine stopped and accounted for", async || {
            let s = fx.handle.status().await.ok()?;
            s.machines.is_empty().then_some(())
        })
        .await;
        fx.cancel.cancel();
    }
}
