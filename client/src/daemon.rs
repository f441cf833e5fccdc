//! The client daemon: wires the factory, the ledger and its outbox, the machine-type catalogue and
//! the control API together, and shuts them down in order (SIGTERM drains, never orphans).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gleaner::{CapacityAdvert, Digest, Envelope, PublicKey, SecretKey};
use serde::Serialize;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::control::{self, Access, Controller, Request, Response};
use crate::factory::{Allowance, Factory, FactoryConfig, FactoryHandle};
use crate::ledger::Ledger;
use crate::outbox::{self, OutboxConfig, Uploader};
use crate::runtime::Runtime;

/// Everything the daemon needs to start.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// Also serve the control API on this loopback address, for callers showing the token.
    pub control_tcp: Option<std::net::SocketAddr>,
    pub space: String,
    /// Signed machine types (`*.gmt`) in this folder are offered, if their publisher is trusted.
    pub machine_types_dir: Option<PathBuf>,
    /// Signed machine types fetched from HTTPS URLs, and how often each is asked again.
    pub type_urls: Vec<crate::type_urls::TypeUrl>,
    pub type_url_every: Duration,
    /// The department's baseline of trusted publishers and their policies (the settings file's
    /// `trust` and `--trust`); the owner's changes are kept in the trust store in `state_dir`.
    pub trusted: Vec<(PublicKey, gleaner::trust::Policy)>,
    /// Cores and memory Gleaner may use.
    pub cores: u16,
    pub memory_bytes: u64,
    pub tick: Duration,
    /// How long with no machine running before the executable's start-up pages are let go
    /// (crate::pageout); again after each machine ends.
    pub idle_release_after: Duration,
    pub stop_grace: Duration,
    /// A fixed per-core benchmark score; `None`: measure it (crate::hostbench), cached in
    /// `state_dir` for a day and re-measured daily.
    pub benchmark: Option<u32>,
    /// The owner's policy and where to watch for the owner.
    pub policy: gleaner::policy::OwnerPolicy,
    pub display: Option<String>,
    /// Which owner-activity sources to use (empty: all that answer).
    pub idle_sources: Vec<String>,
    pub power_supply: PathBuf,
    /// Where input devices are watched (normally /dev/input).
    pub input_devices: PathBuf,
    pub owner_interval: Duration,
    /// The space over libp2p: where to listen, whom to dial, LAN discovery. `None`: no space.
    pub p2p: Option<crate::p2p::SpaceConfig>,
    /// A cluster node: the site's batch system comes first (`None`: not a cluster node).
    pub batch: Option<crate::batch::BatchSettings>,
    /// The coordinator's view of this host's credit, shown by `gleaner credit` beside the ledger's.
    pub coordinator_credit: Option<Arc<dyn crate::coordinator_client::CoordinatorCredit>>,
}

/// What a reload produced: the new owner policy (applied live) and the settings that changed but
/// only take effect at the next start.
#[derive(Debug, Clone, Serialize)]
pub struct Reloaded {
    #[serde(skip)]
    pub policy: gleaner::policy::OwnerPolicy,
    pub restart_needed: Vec<String>,
    pub file: Option<PathBuf>,
}

/// Where the daemon's settings come from, for live changes. Each call gives a whole valid result or
/// says why not, and then nothing changes.
pub trait SettingsSource: Send + Sync {
    /// Re-reads the settings file (and the owner's overrides).
    fn reload(&self) -> Result<Reloaded, String>;
    /// Changes owner-policy keys (settings-file names; `null` removes the owner's override),
    /// validated whole before anything is written, then persisted in the owner's overrides.
    fn set(&self, changes: &serde_json::Map<String, serde_json::Value>)
    -> Result<Reloaded, String>;
}

/// The daemon's settings source.
pub type Reload = Arc<dyn SettingsSource>;

/// Paths inside the state dir.
pub fn host_key_path(state_dir: &Path) -> PathBuf {
    state_dir.join("host.key")
}

pub fn ledger_path(state_dir: &Path) -> PathBuf {
    state_dir.join("ledger.redb")
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error(transparent)]
    Trust(#[from] crate::trust::TrustError),
    #[error(transparent)]
    BatchClaims(#[from] crate::batch::ClaimsError),
    #[error("paused machine types: {0}")]
    Paused(String),
    #[error("machine-type versions seen: {0}")]
    Versions(String),
}

/// The owner's manual pause (from `gleaner pause`).
#[derive(Debug, Clone, Default, Serialize)]
struct Pause {
    paused: bool,
    until: Option<u64>,
}

/// How often the daemon's housekeeping (machine-type folder, advert, space counts) runs while
/// machines run or types are offered, and while the daemon is idle.
const HOUSEKEEPING: Duration = Duration::from_secs(2);
const HOUSEKEEPING_IDLE: Duration = Duration::from_secs(6);

/// The daemon's side of the control API.
pub struct Daemon {
    factory: FactoryHandle,
    ledger: Arc<Ledger>,
    host: PublicKey,
    pause: Mutex<Pause>,
    paused: Arc<std::sync::atomic::AtomicBool>,
    enforcer: tokio::sync::mpsc::Sender<crate::owner::EnforcerCommand>,
    sources: Vec<String>,
    /// The input devices read now (evdev), refreshed in status as they are plugged in and out.
    evdev: Option<crate::evdev::Devices>,
    space: Option<crate::p2p::SpaceHandle>,
    reload: Option<Reload>,
    /// The owner policy in force (for `gleaner limits`).
    policy: Mutex<gleaner::policy::OwnerPolicy>,
    /// On a cluster node: what the site's jobs hold here.
    batch: Option<Arc<crate::batch::Claims>>,
    /// The trust store and what it admitted (shared with the housekeeping scan).
    catalogue: Arc<tokio::sync::Mutex<crate::trust::Catalogue>>,
    /// The engines that run machines here, and those skipped with why.
    engines: Vec<String>,
    /// Machine types the owner paused (persisted in the state dir).
    paused_types: tokio::sync::Mutex<crate::pauses::PausedTypes>,
    coordinator_credit: Option<Arc<dyn crate::coordinator_client::CoordinatorCredit>>,
}

/// `status` as the control API answers it (one definition, shared with the GUI).
use gleaner::control::Status;

impl Daemon {
    /// Sets the manual pause and has the enforcer apply the result before answering.
    async fn set_paused(&self, paused: bool, until: Option<u64>) -> Result<(), String> {
        // On disk first, so a restart keeps what the owner asked for.
        let host = paused.then(|| crate::pauses::HostPause {
            since: crate::factory::now_ms() / 1000,
            until,
        });
        self.paused_types
            .lock()
            .await
            .set_host(host)
            .map_err(|e| format!("cannot keep the pause: {e}"))?;
        if let Ok(mut p) = self.pause.lock() {
            *p = Pause { paused, until };
        }
        self.paused
            .store(paused, std::sync::atomic::Ordering::SeqCst);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.enforcer
            .send(crate::owner::EnforcerCommand::Apply(tx))
            .await
            .map_err(|_| "the owner-policy enforcer has stopped".to_string())?;
        rx.await
            .map_err(|_| "the owner-policy enforcer has stopped".to_string())?;
        Ok(())
    }

    /// Re-reads the settings file and applies the owner policy live; a bad file changes nothing.
    async fn reload(&self) -> Result<serde_json::Value, String> {
        let Some(source) = &self.reload else {
            return Err("this daemon was started without a settings file to reload".into());
        };
        let r = source
            .reload()
            .map_err(|e| format!("reload refused, the running settings are kept: {e}"))?;
        self.apply_settings(r).await
    }

    /// Changes owner-policy keys live (validated whole, persisted, applied).
    async fn set_limits(&self, set: serde_json::Value) -> Result<serde_json::Value, String> {
        let Some(source) = &self.reload else {
            return Err("this daemon cannot change its settings (started without them)".into());
        };
        let serde_json::Value::Object(changes) = set else {
            return Err("limits to set must be an object of settings-file keys".into());
        };
        let r = source
            .set(&changes)
            .map_err(|e| format!("limits refused, nothing changed: {e}"))?;
        self.apply_settings(r).await
    }

    /// Hands a new owner policy to the enforcer and reports what happened.
    async fn apply_settings(&self, r: Reloaded) -> Result<serde_json::Value, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.enforcer
            .send(crate::owner::EnforcerCommand::SetPolicy(
                Box::new(r.policy.clone()),
                tx,
            ))
            .await
            .map_err(|_| "the owner-policy enforcer has stopped".to_string())?;
        let d = rx
            .await
            .map_err(|_| "the owner-policy enforcer has stopped".to_string())?;
        if let Ok(mut p) = self.policy.lock() {
            *p = r.policy.clone();
        }
        if !r.restart_needed.is_empty() {
            tracing::warn!(
                "settings reloaded; these take effect at the next start: {}",
                r.restart_needed.join(", ")
            );
        }
        Ok(serde_json::json!({
            "file": r.file,
            "applied": "owner policy",
            "restart_needed": r.restart_needed,
            "decision": format!("{} (source: {})", d.reason.text(), d.source),
            "policy": gleaner::control::Policy::from(&r.policy),
        }))
    }

    /// Lifts a timed pause once it has run out (called from the daemon's housekeeping).
    async fn expire_pause(&self, now: u64) {
        let expired = self
            .pause
            .lock()
            .map(|p| p.paused && p.until.is_some_and(|u| now >= u))
            .unwrap_or(false);
        if expired {
            let _ = self.set_paused(false, None).await;
        }
    }
}

impl Controller for Daemon {
    async fn handle(&self, req: Request) -> Response {
        match req {
            Request::Status => {
                let factory = match self.factory.status().await {
                    Ok(s) => s,
                    Err(e) => return Response::error(e.to_string()),
                };
                let ledger = match self.ledger.totals() {
                    Ok(t) => t,
                    Err(e) => return Response::error(e.to_string()),
                };
                let pause = self.pause.lock().map(|p| p.clone()).unwrap_or_default();
                let mut factory = factory;
                if pause.paused {
                    // Frozen by the owner's pause, in the owner's words.
                    for m in &mut factory.machines {
                        if m.state == "frozen" {
                            m.state = "paused (by you)".into();
                        }
                    }
                }
                Response::ok(Status {
                    host: self.host.to_string(),
                    paused: pause.paused,
                    paused_until: pause.until,
                    paused_types: self
                        .paused_types
                        .lock()
                        .await
                        .list()
                        .into_iter()
                        .map(|p| gleaner::control::PausedType {
                            digest: p.digest,
                            name: p.name,
                            since: p.since,
                            until: p.until,
                        })
                        .collect(),
                    factory,
                    ledger,
                    sources: self
                        .sources
                        .iter()
                        .map(|n| match &self.evdev {
                            Some(d) if n.starts_with(crate::evdev::NOTE_PREFIX) => d.note(),
                            _ => n.clone(),
                        })
                        .collect(),
                    engines: self.engines.clone(),
                })
            }
            Request::Pause {
                minutes,
                machine_type,
            } => {
                let until = minutes.map(|m| crate::factory::now_ms() / 1000 + m * 60);
                if let Some(t) = machine_type {
                    return match self.pause_type(&t, until).await {
                        Ok(v) => Response::ok(v),
                        Err(e) => Response::error(e),
                    };
                }
                match self.set_paused(true, until).await {
                    Ok(()) => Response::ok(serde_json::json!({"paused": true, "until": until})),
                    Err(e) => Response::error(e),
                }
            }
            Request::Resume {
                machine_type: Some(t),
            } => match self.resume_type(&t).await {
                Ok(v) => Response::ok(v),
                Err(e) => Response::error(e),
            },
            Request::Resume { machine_type: None } => match self.set_paused(false, None).await {
                Ok(()) => {
                    // Types paused one by one stay paused: the host's resume does not lift them.
                    let still: Vec<String> = self
                        .paused_types
                        .lock()
                        .await
                        .list()
                        .into_iter()
                        .map(|t| t.name)
                        .collect();
                    Response::ok(serde_json::json!({"paused": false, "paused_types": still}))
                }
                Err(e) => Response::error(e),
            },
            Request::Drain { now } => match self.factory.drain(now).await {
                Ok(()) => Response::ok(serde_json::json!({"draining": true})),
                Err(e) => Response::error(e.to_string()),
            },
            Request::Undrain => match self.factory.undrain().await {
                Ok(()) => Response::ok(serde_json::json!({"draining": false})),
                Err(e) => Response::error(e.to_string()),
            },
            Request::Credit => match self.ledger.credit() {
                Ok(mut view) => {
                    view.coordinator = Some(
                        coordinator_credit(self.coordinator_credit.as_deref(), &self.host).await,
                    );
                    Response::ok(view)
                }
                Err(e) => Response::error(e.to_string()),
            },
            Request::Space => match &self.space {
                None => Response::error("this daemon is not in a space (started without one)"),
                Some(h) => match h.summary().await {
                    Ok(s) => Response::ok(s),
                    Err(e) => Response::error(e.to_string()),
                },
            },
            Request::Reload => match self.reload().await {
                Ok(v) => Response::ok(v),
                Err(e) => Response::error(e),
            },
            Request::Limits { set: None } => {
                let p = self.policy.lock().map(|p| p.clone());
                match p {
                    Ok(p) => Response::ok(gleaner::control::Policy::from(&p)),
                    Err(_) => Response::error("the policy lock is poisoned"),
                }
            }
            Request::Limits { set: Some(set) } => match self.set_limits(set).await {
                Ok(v) => Response::ok(v),
                Err(e) => Response::error(e),
            },
            // Trust: see crate::trust for the store and what each op does to running machines.
            Request::Trust {
                publisher,
                machine_type_hex,
                share,
                allow_vms,
                allow_egress,
                max_cores,
            } => {
                let req = crate::trust::TrustRequest {
                    publisher,
                    machine_type_hex,
                    share,
                    allow_vms,
                    allow_egress,
                    max_cores,
                };
                let now = crate::factory::now_ms() / 1000;
                crate::trust::control_trust(&self.catalogue, &self.factory, req, now).await
            }
            Request::Untrust { publisher } => {
                crate::trust::control_untrust(&self.catalogue, &self.factory, &publisher).await
            }
            Request::Trusted => crate::trust::control_list(&self.catalogue).await,
            Request::Events => match self.factory.status().await {
                Ok(s) => Response::ok(s.events),
                Err(e) => Response::error(e.to_string()),
            },
            Request::BatchYield {
                job,
                cpus,
                memory_bytes,
            } => self.batch_yield(job, cpus, memory_bytes).await,
            Request::BatchRelease { job } => self.batch_release(job).await,
            other => Response::error(format!(
                "{} is not available in this daemon yet",
                serde_json::to_value(&other)
                    .ok()
                    .and_then(|v| v.get("op").and_then(|o| o.as_str().map(str::to_owned)))
                    .unwrap_or_else(|| "this request".into())
            )),
        }
    }
}

// Pausing one machine type: persisted, then the factory freezes its machines and starts none.
impl Daemon {
    /// The machine types the owner may name: offered, running, or already paused.
    async fn known_types(&self) -> Result<Vec<crate::pauses::Known>, String> {
        let s = self.factory.status().await.map_err(|e| e.to_string())?;
        let short = |p: &str| p.chars().take(12).collect::<String>();
        let mut known = Vec::new();
        for o in &s.offers {
            if let Ok(d) = o.machine_type.parse::<Digest>() {
                known.push(crate::pauses::Known {
                    digest: d,
                    name: o.name.clone(),
                    about: format!("v{} by {}", o.version, short(&o.publisher)),
                });
            }
        }
        for m in &s.machines {
            if let Ok(d) = m.machine_type.parse::<Digest>() {
                known.push(crate::pauses::Known {
                    digest: d,
                    name: m.name.clone(),
                    about: format!("running, by {}", short(&m.publisher)),
                });
            }
        }
        for t in self.paused_types.lock().await.list() {
            if let Ok(d) = t.digest.parse::<Digest>() {
                known.push(crate::pauses::Known {
                    digest: d,
                    name: t.name,
                    about: "paused".into(),
                });
            }
        }
        Ok(known)
    }

    /// Pauses one machine type (by name or digest): written to `paused.toml`, then frozen.
    async fn pause_type(&self, arg: &str, until: Option<u64>) -> Result<serde_json::Value, String> {
        let k = crate::pauses::resolve(arg, &self.known_types().await?)?;
        let now = crate::factory::now_ms() / 1000;
        self.paused_types
            .lock()
            .await
            .pause(k.digest, &k.name, now, until)?;
        let out = self
            .factory
            .pause_type(k.digest, true)
            .await
            .map_err(|e| e.to_string())?;
        Ok(serde_json::json!({
            "machine_type": k.name,
            "digest": k.digest.to_string(),
            "paused": true,
            "until": until,
            "machines_frozen": out.machines,
            "errors": out.errors,
        }))
    }

    /// Resumes one paused machine type: its machines thaw unless the whole host is paused.
    async fn resume_type(&self, arg: &str) -> Result<serde_json::Value, String> {
        // A name resolves among the paused types first (it may no longer be offered).
        let paused: Vec<crate::pauses::Known> = self
            .paused_types
            .lock()
            .await
            .list()
            .into_iter()
            .filter_map(|t| {
                Some(crate::pauses::Known {
                    digest: t.digest.parse().ok()?,
                    name: t.name,
                    about: "paused".into(),
                })
            })
            .collect();
        let k = match crate::pauses::resolve(arg, &paused) {
            Ok(k) => k,
            Err(_) => {
                let k = crate::pauses::resolve(arg, &self.known_types().await?)?;
                return Err(format!("{} is not paused", k.name));
            }
        };
        self.paused_types.lock().await.resume(&k.digest)?;
        let out = self
            .factory
            .pause_type(k.digest, false)
            .await
            .map_err(|e| e.to_string())?;
        Ok(serde_json::json!({
            "machine_type": k.name,
            "digest": k.digest.to_string(),
            "paused": false,
            "machines_thawed": out.machines,
            "still_frozen": out.still_frozen,
            "errors": out.errors,
        }))
    }

    /// Lifts the type pauses whose time has run out.
    async fn expire_type_pauses(&self, now: u64) {
        let expired = self.paused_types.lock().await.expired(now);
        for d in expired {
            if let Err(e) = self.resume_type(&d.to_string()).await {
                tracing::warn!("cannot lift the pause of {d}: {e}");
            }
        }
    }
}

// Cluster nodes (issue 12): the site's batch system takes and gives back resources.
impl Daemon {
    /// A site job arrives (prolog): answered once its CPUs and memory are free.
    async fn batch_yield(&self, job: String, cpus: u32, memory_bytes: Option<u64>) -> Response {
        let Some(claims) = &self.batch else {
            return Response::error("this daemon has no [batch] settings: not a cluster node");
        };
        if let Err(e) = claims.arrive(&job, cpus, memory_bytes) {
            return Response::error(e);
        }
        // Kept on disk alongside the freeze, so that a restarted daemon still yields the node.
        let (applied, saved) =
            tokio::join!(crate::batch::apply_now(&self.enforcer), claims.save_async());
        self.claims_saved(saved).await;
        match applied {
            Ok(d) => Response::ok(serde_json::json!({"job": job, "decision": d})),
            Err(e) => Response::error(e),
        }
    }

    /// A claims file that cannot be written costs only the restart case: the hook still gets its
    /// answer, and the event says why.
    async fn claims_saved(&self, saved: Result<(), crate::batch::ClaimsError>) {
        if let Err(e) = saved {
            tracing::warn!("{e}");
            let _ = self
                .factory
                .note(format!("batch: {e}; a restart would forget this claim"))
                .await;
        }
    }

    /// A site job has left (epilog): its resources go back to the owner policy.
    async fn batch_release(&self, job: String) -> Response {
        let Some(claims) = &self.batch else {
            return Response::error("this daemon has no [batch] settings: not a cluster node");
        };
        let held = claims.leave(&job);
        let (applied, saved) =
            tokio::join!(crate::batch::apply_now(&self.enforcer), claims.save_async());
        self.claims_saved(saved).await;
        match applied {
            Ok(d) => Response::ok(serde_json::json!({"job": job, "held": held, "decision": d})),
            Err(e) => Response::error(e),
        }
    }
}

/// The coordinator's side of `gleaner credit`: its count for this host, or why it could not be
/// asked (never an error: the local ledger is shown either way).
async fn coordinator_credit(
    view: Option<&dyn crate::coordinator_client::CoordinatorCredit>,
    host: &PublicKey,
) -> gleaner::control::CoordinatorCredit {
    use gleaner::control::CoordinatorCredit as C;
    let Some(view) = view else {
        return C::unconfigured();
    };
    match view.host_credit(&host.to_string()).await {
        Ok(Some(c)) => C::known(view.url(), c.credit, c.cpu_hours, c.records, c.account),
        Ok(None) => C::unknown(view.url()),
        Err(e) => C::unreachable(view.url(), &e),
    }
}

/// Runs the daemon until `cancel` fires: then the factory stops and accounts for every machine,
/// the outbox makes a last delivery attempt, and the control socket is removed.
pub async fn run<R: Runtime + 'static, U: Uploader>(
    opts: DaemonOptions,
    runtime: R,
    uploader: Option<U>,
    cancel: CancellationToken,
) -> Result<(), DaemonError> {
    run_with(opts, runtime, uploader, cancel, None).await
}

/// As [`run`], with a way to reload the settings (SIGHUP and `gleaner reload`). Tells systemd
/// READY=1 once the control socket is bound, and pings its watchdog while the daemon is healthy.
pub async fn run_with<R: Runtime + 'static, U: Uploader>(
    opts: DaemonOptions,
    runtime: R,
    uploader: Option<U>,
    cancel: CancellationToken,
    reload: Option<Reload>,
) -> Result<(), DaemonError> {
    let key: SecretKey = crate::keys::read_or_create(&host_key_path(&opts.state_dir))?;
    let trust = crate::trust::TrustStore::open(
        &crate::trust::store_path(&opts.state_dir),
        opts.trusted.clone(),
    )?;
    let catalogue = crate::trust::Catalogue::new(trust, opts.machine_types_dir.clone())
        .remember_versions(&crate::trust::versions_path(&opts.state_dir))
        .map_err(DaemonError::Versions)?;
    let catalogue = Arc::new(tokio::sync::Mutex::new(catalogue));
    let ledger = Arc::new(Ledger::open(&ledger_path(&opts.state_dir))?);
    let paused_types = crate::pauses::PausedTypes::open(&crate::pauses::path(&opts.state_dir))
        .map_err(DaemonError::Paused)?;
    let runtime = Arc::new(runtime);
    let mut base = Allowance::open(opts.cores, opts.memory_bytes);
    // Nothing starts until the owner policy has decided once.
    base.may_start = false;
    base.reason = "starting".into();
    let (allowance_tx, allowance_rx) = watch::channel(base);
    let mut cfg = FactoryConfig::new(opts.state_dir.clone());
    cfg.space = opts.space.clone();
    cfg.tick = opts.tick;
    cfg.stop_grace = opts.stop_grace;
    // The host benchmark: cached for a day, else measured now (under 2 s, off the executor).
    let benchmark = Arc::new(std::sync::atomic::AtomicU32::new(match opts.benchmark {
        Some(b) => b,
        None => {
            let dir = opts.state_dir.clone();
            let now = crate::factory::now_ms() / 1000;
            tokio::task::spawn_blocking(move || crate::hostbench::current_or_measure(&dir, now))
                .await
                .map(|c| c.measurement.score)
                .unwrap_or(1000)
        }
    }));
    cfg.benchmark = benchmark.load(std::sync::atomic::Ordering::Relaxed);
    let (gossip_tx, mut gossip_rx) = tokio::sync::mpsc::channel::<Envelope>(64);
    let mut factory = Factory::new(
        cfg,
        runtime.clone(),
        ledger.clone(),
        key.clone(),
        allowance_rx,
    )
    .with_gossip(gossip_tx);
    factory.recover().await?;
    // After recovery every machine is adopted or removed: what is left for none goes now.
    match runtime.remove_strays().await {
        Ok(removed) if !removed.is_empty() => {
            tracing::info!(
                ?removed,
                "removed what a crash left for machines that are gone"
            )
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("could not remove left-overs of gone machines: {e}"),
    }
    let (engines, backend_bits) = engines(runtime.as_ref()).await;
    for e in &engines {
        tracing::info!("engine {e}");
    }
    let factory_cancel = CancellationToken::new();
    let (handle, factory_task) = factory.spawn(factory_cancel.clone());
    // The owner's type pauses hold across restarts: frozen again before anything may start.
    for d in paused_types.digests() {
        match handle.pause_type(d, true).await {
            Ok(o) if o.errors.is_empty() => {}
            Ok(o) => tracing::warn!("paused machine type {d}: {}", o.errors.join("; ")),
            Err(e) => tracing::warn!("paused machine type {d}: {e}"),
        }
    }

    let tracker = TaskTracker::new();
    let space_cancel = CancellationToken::new();
    let mut learned = None;
    let mut trust_learned = None;
    let space = match &opts.p2p {
        None => None,
        Some(cfg) => {
            let mut cfg = cfg.clone();
            // Machine types are fetched from and forwarded for the publishers we trust (kept up to
            // date with the trust store below).
            cfg.trusted = catalogue.lock().await.store.trusted_keys();
            match crate::p2p::start_space_thread(&key, cfg.clone(), space_cancel.clone()).await {
                Ok(s) => {
                    for a in &s.addrs {
                        tracing::info!(
                            "space {}: listening on {a}/p2p/{}",
                            cfg.space,
                            key.public()
                        );
                    }
                    learned = Some(s.learned);
                    trust_learned = Some(s.trust_learned);
                    // The rotations and revocations this host holds go to the space again, for
                    // peers that were away when they were first spread.
                    for bytes in catalogue.lock().await.store.signed_entries() {
                        if let Err(e) = s.handle.announce_trust(bytes).await {
                            tracing::warn!("not spreading a rotation or revocation: {e}");
                        }
                    }
                    Some(s.handle)
                }
                Err(e) => {
                    tracing::warn!("{e}; running without a space");
                    None
                }
            }
        }
    };
    {
        // Outcomes of our machines go to the space.
        let space = space.clone();
        tracker.spawn(async move {
            while let Some(env) = gossip_rx.recv().await {
                if let Some(s) = &space {
                    let _ = s.publish(env);
                }
            }
        });
    }
    let wake = Arc::new(Notify::new());
    let outbox_cancel = CancellationToken::new();
    if let Some(up) = uploader {
        tracker.spawn(outbox::run(
            ledger.clone(),
            up,
            OutboxConfig::default(),
            wake.clone(),
            outbox_cancel.clone(),
        ));
    }

    // Event-driven sources (XInput2, input devices) nudge the enforcer when the owner arrives.
    let (nudge_tx, nudge_rx) = tokio::sync::mpsc::channel(1);
    let (sources, mut source_notes) = crate::owner::Sources::detect(
        opts.display.as_deref(),
        opts.power_supply.clone(),
        &opts.input_devices,
        &opts.idle_sources,
        Some(nudge_tx.clone()),
        cancel.child_token(),
    )
    .await;
    let evdev = sources.evdev.clone();
    let mut nudged = evdev.is_some();
    if let (Some(d), true) = (
        &opts.display,
        opts.idle_sources.is_empty() || opts.idle_sources.iter().any(|s| s == "x11"),
    ) {
        match crate::owner::watch_x11_input(d, nudge_tx) {
            Ok(()) => {
                source_notes.push(format!("x11 input events (XInput2) on {d}: active"));
                nudged = true;
            }
            Err(e) => {
                source_notes.push(format!("x11 input events: skipped ({e}); polling instead"))
            }
        }
    }
    let nudge = nudged.then_some(nudge_rx);
    for n in &source_notes {
        tracing::info!("owner activity: {n}");
    }
    // The owner's pause of the whole host holds across restarts (unless its time ran out).
    let host_pause = paused_types
        .host()
        .filter(|p| p.until.is_none_or(|u| crate::factory::now_ms() / 1000 < u))
        .map(|p| Pause {
            paused: true,
            until: p.until,
        })
        .unwrap_or_default();
    if host_pause.paused {
        tracing::info!("work stays paused, as the owner asked before the restart");
    }
    let paused = Arc::new(std::sync::atomic::AtomicBool::new(host_pause.paused));
    let (enforcer_tx, enforcer_rx) = tokio::sync::mpsc::channel(8);
    let (decision_tx, _decision_rx) = watch::channel(None);
    // Claims a previous run left are held from the first decision on: a site job may still run.
    let batch_claims = match &opts.batch {
        None => None,
        Some(_) => {
            let host = crate::config::HostSize::here();
            let claims = crate::batch::Claims::open(
                host.cores,
                host.memory_bytes,
                &opts.state_dir.join(crate::batch::CLAIMS_FILE),
            )?;
            if let Some(c) = claims.claim().filter(|c| c.jobs > 0) {
                tracing::info!(
                    "batch: {} site job(s) held from before the restart ({} CPUs)",
                    c.jobs,
                    c.cpus
                );
            }
            Some(Arc::new(claims))
        }
    };
    let enforcer = crate::owner::Enforcer {
        policy: opts.policy.clone(),
        sources,
        runtime: runtime.clone(),
        registry: handle.registry(),
        allowance: allowance_tx,
        paused: paused.clone(),
        interval: opts.owner_interval,
        decision: decision_tx,
        nudge,
        batch: batch_claims.clone(),
    };
    let enforcer_cancel = CancellationToken::new();
    if let (Some(b), Some(claims)) = (&opts.batch, &batch_claims) {
        let slurm = crate::batch::Slurm {
            node: b.node.clone(),
            timeout: b.poll_interval.max(Duration::from_secs(5)),
        };
        tracker.spawn(crate::batch::reconcile_loop(
            slurm.clone(),
            claims.clone(),
            enforcer_tx.clone(),
            handle.clone(),
            enforcer_cancel.clone(),
        ));
        if b.mode == crate::batch::Mode::Poll {
            tracker.spawn(crate::batch::poll(
                slurm,
                b.poll_interval,
                claims.clone(),
                enforcer_tx.clone(),
                handle.clone(),
                enforcer_cancel.clone(),
            ));
        }
    }
    tracker.spawn(enforcer.run(enforcer_rx, enforcer_cancel.clone()));
    let daemon = Arc::new(Daemon {
        factory: handle.clone(),
        ledger: ledger.clone(),
        host: key.public(),
        pause: Mutex::new(host_pause),
        paused,
        enforcer: enforcer_tx,
        sources: source_notes,
        evdev,
        space: space.clone(),
        reload,
        policy: Mutex::new(opts.policy.clone()),
        batch: batch_claims,
        catalogue: catalogue.clone(),
        engines,
        paused_types: tokio::sync::Mutex::new(paused_types),
        coordinator_credit: opts.coordinator_credit.clone(),
    });
    let listener = control::bind(&opts.socket, control::group_id("gleaner"))?;
    let access = Access {
        daemon_uid: own_uid(),
        group: control::group_id("gleaner"),
    };
    let control_cancel = CancellationToken::new();
    tracker.spawn(control::serve(
        listener,
        access,
        daemon.clone(),
        control_cancel.clone(),
    ));
    if let Some(addr) = opts.control_tcp {
        let token = control::read_or_create_token(
            &control::token_path(&opts.state_dir),
            control::group_id("gleaner"),
        )?;
        let listener = control::bind_tcp(addr).await?;
        tracing::info!(
            "control API also on tcp {addr} (token in {})",
            control::token_path(&opts.state_dir).display()
        );
        tracker.spawn(control::serve_tcp(
            listener,
            token,
            daemon.clone(),
            control_cancel.clone(),
        ));
    }
    // Only now can `gleaner status` reach us: tell systemd we are up.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    if let Some(every) = sd_notify::watchdog_enabled() {
        // Ping at half the watchdog interval, and only while the factory answers: a wedged
        // factory stops the pings and systemd restarts us.
        let handle = handle.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            loop {
                let healthy = tokio::time::timeout(every / 2, handle.status())
                    .await
                    .is_ok_and(|r| r.is_ok());
                if healthy {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                } else {
                    tracing::warn!(
                        "the factory did not answer in {:?}: no watchdog ping",
                        every / 2
                    );
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(every / 2) => {}
                }
            }
        });
    }
    {
        // SIGHUP re-reads the settings file, as `gleaner reload` does.
        let daemon = daemon.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                return;
            };
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    Some(()) = hup.recv() => match daemon.reload().await {
                        Ok(v) => tracing::info!("settings reloaded: {v}"),
                        Err(e) => tracing::error!("{e}"),
                    },
                }
            }
        });
    }

    // Machine types from their HTTPS URLs, admitted by the same trust policy as the folder's.
    if !opts.type_urls.is_empty() {
        tracker.spawn(crate::type_urls::run(
            opts.type_urls.clone(),
            opts.type_url_every,
            catalogue.clone(),
            handle.clone(),
            space.clone(),
            cancel.clone(),
        ));
    }

    // Housekeeping: new machine types, timed pauses, and a nudge for the outbox.
    let housekeeping = {
        let handle = handle.clone();
        let daemon = daemon.clone();
        let cancel = cancel.clone();
        let wake = wake.clone();
        let space = space.clone();
        let key = key.clone();
        let benchmark = benchmark.clone();
        let measure_daily = opts.benchmark.is_none().then(|| opts.state_dir.clone());
        let release_after = opts.idle_release_after.as_secs();
        async move {
            let mut seq = crate::factory::now_ms();
            let mut trust_generation = None;
            let mut last_trim: Option<u64> = None;
            // Since when no machine has run, and whether the start-up pages were let go since.
            let mut idle_since: Option<u64> = None;
            let mut pages_released = false;
            let mut pageout_failed = false;
            loop {
                let now = crate::factory::now_ms() / 1000;
                let admitted = catalogue.lock().await.scan(now, &handle).await;
                if let Some(space) = &space {
                    for bytes in admitted {
                        if let Err(e) = space.provide(bytes).await {
                            tracing::warn!("not serving a machine type to the space: {e}");
                        }
                    }
                }
                // Machine types the space brought (fetched from a peer or announced), admitted
                // by the same trust policy as the folder's.
                while let Some(l) = learned.as_mut().and_then(|r| r.try_recv().ok()) {
                    let origin = format!("machine type {} from peer {}", l.digest, l.from);
                    catalogue
                        .lock()
                        .await
                        .admit_signed(&l.envelope, &origin, now, &handle)
                        .await;
                }
                // Rotations and revocations from peers, kept when they bear on our trust; then
                // whatever is new here (from the folder or from peers) goes on to the space.
                while let Some(l) = trust_learned.as_mut().and_then(|r| r.try_recv().ok()) {
                    let origin = format!("from peer {}", l.from);
                    catalogue
                        .lock()
                        .await
                        .apply_from_space(&l.envelope, &origin, &handle)
                        .await;
                }
                let (fresh, generation, trusted) = {
                    let mut cat = catalogue.lock().await;
                    let g = cat.store.generation();
                    (cat.take_fresh_trust(), g, cat.store.trusted_keys())
                };
                if let Some(space) = &space {
                    // The space fetches and forwards types of the publishers trusted now.
                    if trust_generation != Some(generation)
                        && space.set_trusted(trusted).await.is_ok()
                    {
                        trust_generation = Some(generation);
                    }
                    for bytes in fresh {
                        if let Err(e) = space.announce_trust(bytes).await {
                            tracing::warn!("not spreading a rotation or revocation: {e}");
                        }
                    }
                }
                if let (Some(space), Ok(status)) = (&space, handle.status().await) {
                    seq += 1;
                    let bench = benchmark.load(std::sync::atomic::Ordering::Relaxed);
                    // Signed when it changed, else a refresh (a hash-chain link) of the last.
                    let _ = space.advertise(advert(&key, seq, now, &status, bench, backend_bits));
                    if let Ok(view) = space.view().await {
                        // Space-wide target shares: what the rest of the space runs.
                        let counts = crate::factory::SpaceCounts {
                            elsewhere: view.running_elsewhere(&key.public()),
                            deciders: view.deciders(&key.public()),
                        };
                        let _ = handle.space_counts(counts).await;
                        for o in &status.offers {
                            if let Ok(d) = o.machine_type.parse::<Digest>()
                                && let Some(at) = view.last_abort(&d)
                            {
                                let _ = handle.remote_abort(d, at).await;
                            }
                        }
                    }
                }
                if let Some(dir) = &measure_daily {
                    remeasure_when_due(dir, now, &handle, &benchmark).await;
                }
                daemon.expire_pause(now).await;
                daemon.expire_type_pauses(now).await;
                wake.notify_one();
                // Idle: no machine and nothing offered (so no advert worth refreshing often).
                let status = handle.status().await.ok();
                let idle = status
                    .as_ref()
                    .is_some_and(|s| s.machines.is_empty() && s.offers.is_empty());
                // Hand memory freed since (start-up's probes and benchmark, a finished machine's
                // bookkeeping) back to the system while idle, at most once a minute.
                if last_trim.is_none_or(|t| now.saturating_sub(t) >= 60)
                    && status.as_ref().is_some_and(|s| s.machines.is_empty())
                {
                    release_free_memory();
                    last_trim = Some(now);
                }
                // Once idle for a while (after start-up, and again after each machine ends), the
                // executable's and libraries' pages touched by start-up or by the machine's work are let go; the
                // idle loop faults back the few it uses (docs/BENCHMARKS.md, idle footprint).
                if status.as_ref().is_some_and(|s| s.machines.is_empty()) {
                    let since = *idle_since.get_or_insert(now);
                    if !pages_released && now.saturating_sub(since) >= release_after {
                        pages_released = true;
                        release_executable_pages(&mut pageout_failed);
                    }
                } else if status.is_some() {
                    idle_since = None;
                    if std::mem::take(&mut pages_released)
                        && let Err(e) = crate::pageout::restore_readahead()
                    {
                        tracing::debug!("the executable's read-ahead not restored: {e}");
                    }
                }
                // Every 2 s while there is work or something to offer; an idle daemon looks at its
                // folder and re-advertises less often, so it costs the owner next to nothing.
                let pause = if idle {
                    HOUSEKEEPING_IDLE
                } else {
                    HOUSEKEEPING
                };
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    };
    tracker.spawn(housekeeping);
    tracing::info!(host = %key.public(), socket = %opts.socket.display(), "gleaner daemon running");

    cancel.cancelled().await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!("shutting down: stopping machines");
    // The enforcer stops first so it cannot freeze machines the factory is stopping.
    enforcer_cancel.cancel();
    factory_cancel.cancel();
    space_cancel.cancel();
    let _ = factory_task.await;
    // One last delivery of the final records, bounded in time.
    wake.notify_one();
    tokio::time::sleep(Duration::from_millis(300)).await;
    outbox_cancel.cancel();
    control_cancel.cancel();
    enforcer_cancel.cancel();
    tracker.close();
    tracker.wait().await;
    let _ = std::fs::remove_file(&opts.socket);
    Ok(())
}

/// Keeps the daemon's heap small, before any thread starts:
/// - glibc's malloc arenas are capped at two. glibc gives each thread that allocates an arena of
///   its own (up to eight per core), and each keeps what was freed in it resident; a daemon that
///   mostly waits needs no more than two. (The `gleaner` binary's Rust heap is mimalloc's;
///   glibc's still serves the C code in the process.) `MALLOC_ARENA_MAX` in the environment
///   still wins.
/// - Transparent huge pages are turned off for the process. mimalloc reserves its memory in
///   aligned regions that the kernel backs with 2 MiB pages where THP is on: the idle daemon then
///   held 26.6 MiB instead of 12 (docs/BENCHMARKS.md). mimalloc is built not to ask for them
///   (`no_thp`); this covers machines whose THP mode is `always`.
pub fn keep_heap_small() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called before other threads exist.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE only sets a flag on this process's memory.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// Returns the allocators' free pages to the system: mimalloc's (the Rust heap, in the `gleaner`
/// binary) and glibc's (what C code in the process allocates, and the Rust heap where the library
/// runs in a binary that keeps the system allocator).
fn release_free_memory() {
    // SAFETY: mi_collect only frees what mimalloc holds unused; it is safe in any thread and
    // whichever allocator is global.
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory the allocator holds free.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Lets go of the executable's and its libraries' start-up pages (crate::pageout). A failure is logged once (at
/// debug: an old or unusual kernel, nothing the owner can act on) and the daemon carries on.
fn release_executable_pages(failed_before: &mut bool) {
    match crate::pageout::release_executable_pages() {
        Ok(r) => tracing::debug!(
            mappings = r.mappings,
            kib = r.kib,
            exe_kib = r.exe_kib,
            kept = r.kept,
            "idle: let go of the executable's and libraries' resident pages"
        ),
        Err(e) if !*failed_before => {
            *failed_before = true;
            tracing::debug!("idle: not letting go of the executable's pages: {e}");
        }
        Err(_) => {}
    }
}

/// The daemon's own uid, read from /proc (no unsafe libc call needed).
fn own_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0)
}

/// Re-measures the host benchmark once the cached score is a day old and no machine is running
/// (a busy host would measure itself slower than it is).
async fn remeasure_when_due(
    dir: &Path,
    now: u64,
    factory: &FactoryHandle,
    score: &std::sync::atomic::AtomicU32,
) {
    if crate::hostbench::load(dir).is_some_and(|c| c.is_current(now)) {
        return;
    }
    if factory
        .status()
        .await
        .map_or(true, |s| !s.machines.is_empty())
    {
        return;
    }
    let d = dir.to_owned();
    if let Ok(c) =
        tokio::task::spawn_blocking(move || crate::hostbench::measure_and_cache(&d, now)).await
    {
        score.store(c.measurement.score, std::sync::atomic::Ordering::Relaxed);
        let _ = factory.set_benchmark(c.measurement.score).await;
    }
}

/// This factory's capacity advert, from its status.
fn advert(
    key: &SecretKey,
    seq: u64,
    now: u64,
    s: &crate::factory::FactoryStatus,
    benchmark: u32,
    backends: u8,
) -> CapacityAdvert {
    let used: u16 = s.machines.iter().map(|m| m.cores).sum();
    let used_mem: u64 = s.machines.iter().map(|m| m.memory_bytes).sum();
    let mut running: BTreeMap<String, u16> = BTreeMap::new();
    for m in &s.machines {
        *running.entry(m.machine_type.clone()).or_default() += 1;
    }
    CapacityAdvert {
        v: gleaner::advert::ADVERT_VERSION,
        host: key.public(),
        seq,
        at: now,
        free_cores: s.allowance.cores.saturating_sub(used),
        free_memory_mib: (s.allowance.memory_bytes.saturating_sub(used_mem) >> 20) as u32,
        free_disk_mib: 0,
        backends,
        running: running
            .into_iter()
            .filter_map(|(d, count)| {
                Some(gleaner::advert::Running {
                    machine_type: d.parse().ok()?,
                    count,
                })
            })
            .take(gleaner::advert::ADVERT_RUNNING_MAX)
            .collect(),
        owner_present: s.allowance.reason.contains("owner is using"),
        draining: s.draining,
        benchmark,
        chain: gleaner::Digest::default(),
    }
}

/// What the engines offer, for status (one line each, skipped engines with why), and the
/// advert's backend bits: containers, and VMs under KVM or TCG as the probe found.
async fn engines<R: Runtime>(runtime: &R) -> (Vec<String>, u8) {
    use gleaner::Backend;
    use gleaner::advert::backend_bits;
    let probe = runtime.probe().await;
    let mut bits = 0;
    if runtime.runs(Backend::Container) {
        bits |= backend_bits::DOCKER;
    }
    let mut lines = Vec::new();
    match probe {
        Ok(p) => {
            if runtime.runs(Backend::Vm) {
                bits |= if p.kvm_usable {
                    backend_bits::KVM
                } else {
                    backend_bits::TCG
                };
            }
            lines.push(p.version);
            lines.extend(p.notes);
        }
        Err(e) => lines.push(format!("probe failed: {e}")),
    }
    (lines, bits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator_client::{CoordinatorCredit, HostCredit};

    /// A coordinator that answers what it was given.
    #[derive(Debug)]
    struct Fixed(Result<Option<HostCredit>, String>);

    impl CoordinatorCredit for Fixed {
        fn url(&self) -> &str {
            "https://coordinator.test"
        }
        fn host_credit<'a>(
            &'a self,
            _host: &'a str,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Option<HostCredit>, String>> + Send + 'a>,
        > {
            let r = self.0.clone();
            Box::pin(async move { r })
        }
    }

    #[tokio::test]
    async fn credit_shows_the_coordinator_or_why_not() {
        let host = SecretKey::from_seed([3; 32]).public();
        // The exact JSON of each case (docs/control-api.md), from the core's one definition.
        let json = |c: gleaner::control::CoordinatorCredit| serde_json::to_value(c).unwrap();
        let v = json(coordinator_credit(None, &host).await);
        assert_eq!(v, serde_json::json!({"configured": false}));
        let known = Fixed(Ok(Some(HostCredit {
            credit: 12.5,
            cpu_hours: 2.0,
            records: 4,
            account: Some("alice".into()),
        })));
        let v = json(coordinator_credit(Some(&known), &host).await);
        assert_eq!(
            v,
            serde_json::json!({"configured": true, "url": known.url(), "reachable": true,
                "known": true, "credit": 12.5, "cpu_hours": 2.0, "records": 4, "account": "alice"})
        );
        let unlinked = Fixed(Ok(Some(HostCredit {
            credit: 1.0,
            cpu_hours: 1.0,
            records: 1,
            account: None,
        })));
        let v = json(coordinator_credit(Some(&unlinked), &host).await);
        assert!(v["account"].is_null() && v.as_object().unwrap().contains_key("account"));
        let back: gleaner::control::CoordinatorCredit = serde_json::from_value(v).unwrap();
        assert_eq!(
            back.account,
            Some(None),
            "a null account is read back as present"
        );
        let v = json(coordinator_credit(Some(&Fixed(Ok(None))), &host).await);
        assert_eq!(
            v,
            serde_json::json!({"configured": true, "url": known.url(), "reachable": true,
                "known": false})
        );
        let v =
            json(coordinator_credit(Some(&Fixed(Err("connection refused".into()))), &host).await);
        assert_eq!(
            v,
            serde_json::json!({"configured": true, "url": known.url(), "reachable": false,
                "error": "connection refused"})
        );
        let text = crate::render::render(&Request::Credit, &serde_json::json!({"coordinator": v}));
        assert!(
            text.contains("coordinator unreachable: connection refused"),
            "{text}"
        );
    }
}
