//! `gleaner daemon`: turns command-line settings into daemon options, sets up logging and signal
//! handling, connects the engine, and runs the daemon until SIGTERM or Ctrl-C.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use gleaner::Digest;
use tokio_util::sync::CancellationToken;

use crate::cli::DaemonArgs;
use crate::config::{self, ConfigError, HostSize, Origin, PolicyOverrides, Scalar};
use crate::daemon::{self, DaemonOptions};
use crate::runtime::backends::{self, ConnectOptions};

/// The default state directory: /var/lib/gleaner as root, else the user's data dir.
pub fn default_state_dir() -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    if root {
        return PathBuf::from("/var/lib/gleaner");
    }
    directories::ProjectDirs::from("org", "gleaner", "gleaner")
        .map(|d| d.data_dir().to_owned())
        .unwrap_or_else(|| PathBuf::from(".gleaner"))
}

/// The coordinator this daemon reports to.
#[derive(Debug, Clone, PartialEq)]
pub struct CoordinatorSettings {
    pub url: String,
    pub pin: Option<Digest>,
    /// Enrol once as (account, token).
    pub enrol: Option<(String, String)>,
}

/// Everything `gleaner daemon` runs with: the command line over the settings file over defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    pub daemon: DaemonOptions,
    pub coordinator: Option<CoordinatorSettings>,
    /// Disk for cached images.
    pub disk_bytes: u64,
    /// The settings file read, if any.
    pub file: Option<PathBuf>,
    /// Which engines may run machines (settings key `backends`, option `--backends`).
    pub backends: EngineChoice,
}

/// The engines the owner allows (both by default); one that does not answer is skipped anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineChoice {
    pub docker: bool,
    pub libvirt: bool,
}

impl Default for EngineChoice {
    fn default() -> Self {
        EngineChoice {
            docker: true,
            libvirt: true,
        }
    }
}

/// The names `backends` accepts.
pub const BACKEND_NAMES: [&str; 2] = ["docker", "libvirt"];

/// Parses a `backends` list: known names, no repeats, at least one.
pub fn engine_choice<S: AsRef<str>>(names: &[S]) -> Result<EngineChoice, String> {
    let mut c = EngineChoice {
        docker: false,
        libvirt: false,
    };
    for n in names {
        let flag = match n.as_ref() {
            "docker" => &mut c.docker,
            "libvirt" => &mut c.libvirt,
            other => {
                return Err(format!(
                    "{other:?} is not a backend; choose among {}",
                    BACKEND_NAMES.join(", ")
                ));
            }
        };
        if *flag {
            return Err(format!("{:?} is listed twice", n.as_ref()));
        }
        *flag = true;
    }
    if !(c.docker || c.libvirt) {
        return Err(format!(
            "at least one backend is needed ({})",
            BACKEND_NAMES.join(", ")
        ));
    }
    Ok(c)
}

impl Settings {
    /// Which settings differ from `other` in ways only a restart applies (the owner policy is
    /// applied live and is not listed).
    pub fn restart_needed(&self, other: &Settings) -> Vec<&'static str> {
        let (a, b) = (&self.daemon, &other.daemon);
        let mut keys = Vec::new();
        let mut check = |differs: bool, key: &'static str| {
            if differs {
                keys.push(key);
            }
        };
        check(a.state_dir != b.state_dir, "state_dir");
        check(a.socket != b.socket, "socket");
        check(a.control_tcp != b.control_tcp, "control.tcp");
        check(a.space != b.space, "space");
        check(a.machine_types_dir != b.machine_types_dir, "machine_types");
        check(
            a.type_urls != b.type_urls || a.type_url_every != b.type_url_every,
            "type_urls",
        );
        check(a.trusted != b.trusted, "trust");
        check(a.stop_grace != b.stop_grace, "stop_grace");
        check(a.display != b.display, "display");
        check(a.p2p != b.p2p, "listen/bootstrap/no_mdns/no_space");
        check(self.coordinator != other.coordinator, "coordinator");
        check(self.disk_bytes != other.disk_bytes, "disk");
        check(a.batch != b.batch, "batch");
        check(self.backends != other.backends, "backends");
        keys
    }
}

/// The settings file named by `--config`, or the default one when it exists: its path and text.
pub fn main_file(args: &DaemonArgs) -> Result<Option<(PathBuf, String)>, ConfigError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            file: path.to_owned(),
            reason: e.to_string(),
        })
    };
    match &args.config {
        Some(path) => Ok(Some((path.clone(), read(path)?))),
        None => {
            let path = config::default_path();
            if path.exists() {
                Ok(Some((path.clone(), read(&path)?)))
            } else {
                Ok(None)
            }
        }
    }
}

/// Where the owner's own changes (from `gleaner limits --set`, the GUI) are kept: in the state dir,
/// layered over the settings file, so a department's /etc file is never rewritten.
pub fn overrides_path(state_dir: &Path) -> PathBuf {
    state_dir.join("owner.toml")
}

/// Builds the daemon's settings: the command line over the owner's overrides over the settings
/// file (the one `--config` names, or the default one when it exists) over defaults.
pub fn settings(args: &DaemonArgs, host: HostSize) -> Result<Settings, ConfigError> {
    let main = main_file(args)?;
    let base = settings_from(args, host, main.as_ref())?;
    let over = overrides_path(&base.daemon.state_dir);
    match std::fs::read_to_string(&over) {
        Ok(text) => with_overrides(args, host, main.as_ref(), (&over, &text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(base),
        Err(e) => Err(ConfigError::Read {
            file: over,
            reason: e.to_string(),
        }),
    }
}

/// The settings with the owner's overrides (`over`: path and text) layered over the main file.
/// The overrides are validated on their own first, so their errors name their own file and line.
pub fn with_overrides(
    args: &DaemonArgs,
    host: HostSize,
    main: Option<&(PathBuf, String)>,
    over: (&Path, &str),
) -> Result<Settings, ConfigError> {
    let o = Origin {
        file: over.0,
        text: over.1,
    };
    let f = config::parse(over.0, over.1)?;
    config::check_live_keys(over.0, over.1)?;
    config::owner_policy(&f, &o, &PolicyOverrides::default(), host)?;
    let table = |text: &str, file: &Path| {
        text.parse::<toml::Table>()
            .map_err(|e| config::invalid_at(file, "(syntax)", e.to_string()))
    };
    let mut merged = match main {
        Some((path, text)) => table(text, path)?,
        None => toml::Table::new(),
    };
    for (k, v) in table(over.1, over.0)? {
        merged.insert(k, v);
    }
    let text =
        toml::to_string(&merged).map_err(|e| config::invalid_at(over.0, "(all)", e.to_string()))?;
    let label = PathBuf::from(format!(
        "{} with {}",
        main.map(|(p, _)| p.display().to_string())
            .unwrap_or_else(|| "defaults".into()),
        over.0.display()
    ));
    let mut s = settings_from(args, host, Some(&(label, text)))?;
    s.file = main.map(|(p, _)| p.clone());
    Ok(s)
}

/// Builds the daemon's settings from the command line over `file` (path and text) over defaults.
pub fn settings_from(
    args: &DaemonArgs,
    host: HostSize,
    file: Option<&(PathBuf, String)>,
) -> Result<Settings, ConfigError> {
    let (path, text) = match file {
        Some((p, t)) => (p.clone(), t.clone()),
        None => (PathBuf::from("(no settings file)"), String::new()),
    };
    let f = config::parse(&path, &text)?;
    let file = file.map(|(p, _)| (p.clone(), ()));
    let o = Origin {
        file: &path,
        text: &text,
    };
    let overrides = PolicyOverrides {
        preset: args.preset,
        cores: args.cores.clone(),
        memory: args.memory.clone(),
        idle_after: args.idle_after.clone(),
        run_on_battery: args.run_on_battery,
        suspend_above_load: args.suspend_above_load.clone(),
    };
    let (policy, _preset) = config::owner_policy(&f, &o, &overrides, host)?;

    let mut trusted = Vec::new();
    if let Some(t) = &f.trust {
        for entry in t.get_ref() {
            trusted.push(
                crate::trust::parse_entry(entry).map_err(|e| o.invalid("trust", t.span(), e))?,
            );
        }
    }
    for entry in &args.trust {
        trusted.push(
            crate::trust::parse_entry(entry).map_err(|e| config::invalid_option("--trust", e))?,
        );
    }
    let multiaddrs = |cli: &[libp2p::Multiaddr],
                      file: &Option<toml::Spanned<Vec<String>>>,
                      key: &str|
     -> Result<Vec<libp2p::Multiaddr>, ConfigError> {
        if !cli.is_empty() {
            return Ok(cli.to_vec());
        }
        let Some(list) = file else {
            return Ok(Vec::new());
        };
        list.get_ref()
            .iter()
            .map(|a| {
                a.parse()
                    .map_err(|e| o.invalid(key, list.span(), format!("{a:?}: {e}")))
            })
            .collect()
    };
    let type_urls = if !args.type_url.is_empty() {
        args.type_url
            .iter()
            .map(|u| {
                crate::type_urls::TypeUrl::parse(u)
                    .map_err(|e| config::invalid_option("--type-url", e))
            })
            .collect::<Result<Vec<_>, _>>()?
    } else if let Some(list) = &f.type_urls {
        list.get_ref()
            .iter()
            .map(|u| {
                crate::type_urls::TypeUrl::parse(u)
                    .map_err(|e| o.invalid("type_urls", list.span(), e))
            })
            .collect::<Result<Vec<_>, _>>()?
    } else {
        Vec::new()
    };
    let at_least = |d: Duration| {
        if d < crate::type_urls::MIN_EVERY {
            Err(format!(
                "{} s is too often; ask at most once a second",
                d.as_secs_f64()
            ))
        } else {
            Ok(d)
        }
    };
    let type_url_every = match (&args.type_url_every, &f.type_url_every) {
        (Some(d), _) => config::duration(&Scalar::Text(d.clone()))
            .and_then(at_least)
            .map_err(|e| config::invalid_option("--type-url-every", e))?,
        (None, Some(d)) => config::duration(d.get_ref())
            .and_then(at_least)
            .map_err(|e| o.invalid("type_url_every", d.span(), e))?,
        (None, None) => crate::type_urls::DEFAULT_EVERY,
    };
    let listen = multiaddrs(&args.listen, &f.listen, "listen")?;
    let bootstrap = multiaddrs(&args.bootstrap, &f.bootstrap, "bootstrap")?;
    let space = match (&args.space, &f.space) {
        (Some(s), _) => s.clone(),
        (None, Some(s)) => s.get_ref().clone(),
        (None, None) => "default".to_owned(),
    };
    if let Err(why) = gleaner_space::check_space_name(&space) {
        return Err(match &f.space {
            Some(s) if args.space.is_none() => o.invalid("space", s.span(), why),
            _ => config::invalid_option("--space", why),
        });
    }
    let no_space = args.no_space || f.no_space.unwrap_or(false);
    let no_mdns = args.no_mdns || f.no_mdns.unwrap_or(false);
    let stop_grace = match (&args.stop_grace, &f.stop_grace) {
        (Some(g), _) => config::duration(&Scalar::Text(g.clone()))
            .or_else(|e| g.parse::<u64>().map(Duration::from_secs).map_err(|_| e))
            .map_err(|e| config::invalid_option("--stop-grace", e))?,
        (None, Some(g)) => {
            config::duration(g.get_ref()).map_err(|e| o.invalid("stop_grace", g.span(), e))?
        }
        (None, None) => Duration::from_secs(30),
    };
    let disk_bytes = match &f.disk {
        Some(d) => {
            config::size(d.get_ref(), u64::MAX).map_err(|e| o.invalid("disk", d.span(), e))?
        }
        None => 20 << 30,
    };
    let url = args
        .coordinator
        .clone()
        .or_else(|| f.coordinator.as_ref().map(|c| c.get_ref().clone()));
    let fingerprint = match (&args.coordinator_fingerprint, &f.coordinator_fingerprint) {
        (Some(fp), _) => Some(fp.replace(':', "").parse::<Digest>().map_err(|_| {
            config::invalid_option("--coordinator-fingerprint", "not a SHA-256 in hex")
        })?),
        (None, Some(fp)) => Some(fp.get_ref().replace(':', "").parse::<Digest>().map_err(
            |_| o.invalid("coordinator_fingerprint", fp.span(), "not a SHA-256 in hex"),
        )?),
        (None, None) => None,
    };
    let enrol = match (&args.enrol, &f.enrol) {
        (Some(e), _) => Some(
            e.split_once(':')
                .map(|(a, t)| (a.to_owned(), t.to_owned()))
                .ok_or_else(|| config::invalid_option("--enrol", "write ACCOUNT:TOKEN"))?,
        ),
        (None, Some(e)) => Some(
            e.get_ref()
                .split_once(':')
                .map(|(a, t)| (a.to_owned(), t.to_owned()))
                .ok_or_else(|| o.invalid("enrol", e.span(), "write \"ACCOUNT:TOKEN\""))?,
        ),
        (None, None) => None,
    };
    let coordinator = match url {
        Some(url) => {
            if enrol.is_some() && fingerprint.is_none() {
                return Err(config::invalid_option(
                    "enrol",
                    "enrolling needs the coordinator's certificate fingerprint \
                     (coordinator_fingerprint / --coordinator-fingerprint)",
                ));
            }
            Some(CoordinatorSettings {
                url,
                pin: fingerprint,
                enrol,
            })
        }
        None if fingerprint.is_some() || enrol.is_some() => {
            return Err(config::invalid_option(
                "coordinator",
                "a fingerprint or enrolment was given without the coordinator's URL",
            ));
        }
        None => None,
    };
    let idle_sources = match (&args.idle_sources, &f.idle_sources) {
        (Some(list), _) => list
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect(),
        (None, Some(list)) => list.get_ref().clone(),
        (None, None) => Vec::new(),
    };
    for s in &idle_sources {
        if !crate::owner::IDLE_SOURCES.contains(&s.as_str()) {
            let why = format!(
                "{s:?} is not a source; choose among {}",
                crate::owner::IDLE_SOURCES.join(", ")
            );
            return Err(match &f.idle_sources {
                Some(l) if args.idle_sources.is_none() => o.invalid("idle_sources", l.span(), why),
                _ => config::invalid_option("--idle-sources", why),
            });
        }
    }
    let backends = match (&args.backends, &f.backends) {
        (Some(list), _) => {
            let names: Vec<&str> = list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect();
            engine_choice(&names).map_err(|e| config::invalid_option("--backends", e))?
        }
        (None, Some(list)) => {
            engine_choice(list.get_ref()).map_err(|e| o.invalid("backends", list.span(), e))?
        }
        (None, None) => EngineChoice::default(),
    };
    let batch = match &f.batch {
        Some(b) => Some(crate::batch::settings(b.get_ref(), b.span(), &o)?),
        None => None,
    };
    let control_tcp = match (
        &args.control_tcp,
        f.control.as_ref().and_then(|c| c.get_ref().tcp.as_ref()),
    ) {
        (Some(a), _) => {
            Some(config::control_tcp(a).map_err(|e| config::invalid_option("--control-tcp", e))?)
        }
        (None, Some(t)) => Some(
            config::control_tcp(t.get_ref()).map_err(|e| o.invalid("control.tcp", t.span(), e))?,
        ),
        (None, None) => None,
    };
    let cores = policy.away.cores.ceil().max(1.0) as u16;
    let memory_bytes = policy.away.memory_bytes;
    Ok(Settings {
        daemon: DaemonOptions {
            display: args
                .display
                .clone()
                .or_else(|| f.display.clone())
                .or_else(|| std::env::var("DISPLAY").ok()),
            idle_sources,
            power_supply: args.power_supply.clone(),
            input_devices: args.input_devices.clone(),
            owner_interval: Duration::from_millis(100),
            p2p: (!no_space).then(|| crate::p2p::SpaceConfig {
                space: space.clone(),
                listen: if listen.is_empty() {
                    ["/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic-v1"]
                        .iter()
                        .filter_map(|a| a.parse().ok())
                        .collect()
                } else {
                    listen
                },
                bootstrap,
                mdns: !no_mdns,
                ..crate::p2p::SpaceConfig::new(space.clone())
            }),
            state_dir: args
                .state_dir
                .clone()
                .or_else(|| f.state_dir.clone())
                .unwrap_or_else(default_state_dir),
            socket: args
                .socket
                .clone()
                .or_else(|| f.socket.clone())
                .unwrap_or_else(crate::control::default_socket),
            control_tcp,
            space,
            machine_types_dir: args.machine_types.clone().or(f.machine_types.clone()),
            type_urls,
            type_url_every,
            trusted,
            cores,
            memory_bytes,
            tick: Duration::from_millis(args.tick_ms.max(50)),
            idle_release_after: Duration::from_secs(args.idle_release_after),
            stop_grace,
            benchmark: None,
            policy,
            batch,
            coordinator_credit: None,
        },
        coordinator,
        disk_bytes,
        file: file.map(|(p, _)| p),
        backends,
    })
}

/// The daemon's settings as they change while it runs.
struct LiveSettings {
    args: DaemonArgs,
    host: HostSize,
    running: std::sync::Mutex<Settings>,
}

impl LiveSettings {
    /// Takes `new` as the running settings, reporting what only a restart applies.
    fn adopt(&self, new: Settings) -> Result<daemon::Reloaded, String> {
        let mut running = self
            .running
            .lock()
            .map_err(|_| "the settings lock is poisoned".to_string())?;
        let restart_needed = new
            .restart_needed(&running)
            .into_iter()
            .map(str::to_owned)
            .collect();
        let policy = new.daemon.policy.clone();
        // The policy is what applies now; the rest waits for a restart and stays listed.
        running.daemon.policy = policy.clone();
        Ok(daemon::Reloaded {
            policy,
            restart_needed,
            file: new.file.clone(),
        })
    }
}

impl daemon::SettingsSource for LiveSettings {
    fn reload(&self) -> Result<daemon::Reloaded, String> {
        let new = settings(&self.args, self.host).map_err(|e| e.to_string())?;
        self.adopt(new)
    }

    fn set(
        &self,
        changes: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<daemon::Reloaded, String> {
        let state_dir = self
            .running
            .lock()
            .map_err(|_| "the settings lock is poisoned".to_string())?
            .daemon
            .state_dir
            .clone();
        let path = overrides_path(&state_dir);
        let mut table = match std::fs::read_to_string(&path) {
            Ok(t) => t
                .parse::<toml::Table>()
                .map_err(|e| format!("{}: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => toml::Table::new(),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        for (k, v) in changes {
            if !config::LIVE_KEYS.contains(&k.as_str()) {
                return Err(format!(
                    "{k}: not an owner-policy key; these can change live: {}",
                    config::LIVE_KEYS.join(", ")
                ));
            }
            if v.is_null() {
                table.remove(k);
            } else {
                let v = toml::Value::try_from(v).map_err(|e| format!("{k}: {e}"))?;
                table.insert(k.clone(), v);
            }
        }
        let text = format!(
            "# The owner's own limits, written by `gleaner limits --set` and the GUI; they override\n\
             # the settings file. Remove this file to go back to it.\n{}",
            toml::to_string(&table).map_err(|e| e.to_string())?
        );
        let main = main_file(&self.args).map_err(|e| e.to_string())?;
        let new = with_overrides(&self.args, self.host, main.as_ref(), (&path, &text))
            .map_err(|e| e.to_string())?;
        // Written whole or not at all.
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, &text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| format!("cannot save {}: {e}", path.display()))?;
        self.adopt(new)
    }
}

/// Runs `gleaner daemon`.
pub fn run(args: DaemonArgs) -> Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let host = HostSize::here();
    let first = settings(&args, host)?;
    if let Some(f) = &first.file {
        tracing::info!("settings from {}", f.display());
    }
    let mut opts = first.daemon.clone();
    let coordinator = first.coordinator.clone();
    let disk = first.disk_bytes;
    let engines = first.backends;
    // A reload re-reads the file with the same command line; only a valid whole is applied.
    let reload: daemon::Reload = std::sync::Arc::new(LiveSettings {
        args: args.clone(),
        host,
        running: std::sync::Mutex::new(first),
    });
    crate::daemon::keep_heap_small();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        std::fs::create_dir_all(&opts.state_dir)
            .with_context(|| format!("cannot create {}", opts.state_dir.display()))?;
        let key = crate::keys::read_or_create(&daemon::host_key_path(&opts.state_dir))?;
        // Every allowed engine that answers; the rest are skipped and `gleaner status` says why.
        let mut connect =
            ConnectOptions::new(&key.public().to_string(), opts.state_dir.clone(), disk);
        connect.containers = engines.docker;
        connect.vms = engines.libvirt;
        let runtime = backends::connect(&connect).await;
        for note in runtime.skipped() {
            tracing::warn!("engine {note}");
        }
        if runtime.containers().is_none() && runtime.vms().is_none() {
            anyhow::bail!(
                "no engine to run machines: {}; start dockerd or libvirtd \
                 (installers/start-engines.sh), or check `backends` in the settings",
                runtime.skipped().join("; ")
            );
        }
        if let Some(c) = &coordinator {
            opts.coordinator_credit = Some(std::sync::Arc::new(
                crate::coordinator_client::HttpCoordinatorCredit::new(&c.url, c.pin)
                    .map_err(anyhow::Error::msg)?,
            ));
        }
        let uploader = match &coordinator {
            Some(c) => Some(
                crate::coordinator_client::HttpUploader::new(&c.url, c.pin, key.clone())
                    .map_err(anyhow::Error::msg)?,
            ),
            None => None,
        };
        let cancel = CancellationToken::new();
        if let (Some(up), Some(c)) = (&uploader, &coordinator)
            && let (Some((account, token)), Some(pin)) = (c.enrol.clone(), c.pin)
        {
            let enroller =
                crate::coordinator_client::HttpUploader::new(up.base(), Some(pin), key.clone())
                    .map_err(anyhow::Error::msg)?;
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let mut wait = Duration::from_millis(500);
                loop {
                    let now = crate::factory::now_ms() / 1000;
                    match enroller
                        .enrol(&account, &token, &pin.to_string(), now)
                        .await
                    {
                        Ok(()) => {
                            tracing::info!("enrolled with the coordinator as {account}");
                            return;
                        }
                        Err(e) => tracing::warn!("enrolment: {e}; retrying in {wait:?}"),
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(60));
                }
            });
        }
        {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                use tokio::signal::unix::{SignalKind, signal};
                let (Ok(mut term), Ok(mut int)) = (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) else {
                    return;
                };
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                cancel.cancel();
            });
        }
        daemon::run_with(opts, runtime, uploader, cancel, Some(reload)).await?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings_of(text: &str, backends: Option<&str>) -> Result<Settings, ConfigError> {
        let args = DaemonArgs {
            backends: backends.map(str::to_owned),
            state_dir: Some(PathBuf::from("/nonexistent/state")),
            ..DaemonArgs::for_check()
        };
        let host = HostSize {
            cores: 4.0,
            memory_bytes: 8 << 30,
        };
        let file = (PathBuf::from("/etc/gleaner/client.toml"), text.to_owned());
        settings_from(&args, host, Some(&file))
    }

    #[test]
    fn backends_default_to_both_and_can_be_narrowed() {
        assert_eq!(
            settings_of("", None).unwrap().backends,
            EngineChoice::default()
        );
        let s = settings_of("backends = [\"docker\"]\n", None).unwrap();
        assert_eq!(
            s.backends,
            EngineChoice {
                docker: true,
                libvirt: false
            }
        );
        // The command line wins over the file.
        let s = settings_of("backends = [\"docker\"]\n", Some("libvirt")).unwrap();
        assert!(s.backends.libvirt && !s.backends.docker);
    }

    #[test]
    fn control_tcp_is_loopback_only() {
        let s = settings_of("[control]\ntcp = \"127.0.0.1:7878\"\n", None).unwrap();
        assert_eq!(
            s.daemon.control_tcp,
            Some("127.0.0.1:7878".parse().unwrap())
        );
        let s = settings_of("[control]\ntcp = \"[::1]:7878\"\n", None).unwrap();
        assert!(s.daemon.control_tcp.is_some());
        assert_eq!(settings_of("", None).unwrap().daemon.control_tcp, None);
        let e = settings_of("space = \"x\"\n[control]\ntcp = \"0.0.0.0:7878\"\n", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/gleaner/client.toml:3: control.tcp:")
                && e.contains("not a loopback address"),
            "{e}"
        );
        let e = settings_of("[control]\ntcp = \"192.168.1.5:7878\"\n", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a loopback address"), "{e}");
        let e = settings_of("[control]\ntcp = \"localhost\"\n", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an address with a port"), "{e}");
        let e = settings_of("[control]\nport = 1\n", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("control") && e.contains("port"), "{e}");
        let args = DaemonArgs {
            control_tcp: Some("10.0.0.1:1".into()),
            ..DaemonArgs::for_check()
        };
        let e = settings_from(
            &args,
            HostSize {
                cores: 1.0,
                memory_bytes: 1 << 30,
            },
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--control-tcp") && e.contains("loopback"), "{e}");
    }

    #[test]
    fn bad_backends_are_refused_with_file_line_key_and_reason() {
        let e = settings_of("space = \"x\"\nbackends = [\"xen\"]\n", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/gleaner/client.toml:2: backends:") && e.contains("\"xen\""),
            "{e}"
        );
        let e = settings_of("backends = []\n", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least one backend"), "{e}");
        let e = settings_of("backends = [\"docker\", \"docker\"]\n", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("twice"), "{e}");
        let e = settings_of("", Some("docker,vbox"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--backends"), "{e}");
    }
}
