//! `gleaner daemon`: turns command-line settings into daemon options, sets up logging and signal
//! handling, connects the engine, and runs the daemon until SIGTERM or Ctrl-C.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use gleaner::{Digest, PublicKey};
use tokio_util::sync::CancellationToken;

use crate::cli::DaemonArgs;
use crate::config::{self, ConfigError, HostSize, Origin, PolicyOverrides, Scalar};
use crate::daemon::{self, DaemonOptions};
use crate::runtime::docker::DockerRuntime;

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

fn parse_trust(s: &str) -> Result<(PublicKey, f64), String> {
    let (id, share) = match s.split_once('=') {
        Some((id, share)) => {
            let share: f64 = share
                .trim()
                .parse()
                .map_err(|_| format!("{s:?}: the share {share:?} is not a number"))?;
            if !(share.is_finite() && share > 0.0) {
                return Err(format!("{s:?}: the share must be positive"));
            }
            (id, share)
        }
        None => (s, 1.0),
    };
    let key: PublicKey = id
        .trim()
        .parse()
        .map_err(|e| format!("{s:?} is not a publisher id: {e}"))?;
    Ok((key, share))
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
        check(a.space != b.space, "space");
        check(a.machine_types_dir != b.machine_types_dir, "machine_types");
        check(a.trusted != b.trusted, "trust");
        check(a.stop_grace != b.stop_grace, "stop_grace");
        check(a.display != b.display, "display");
        check(a.p2p != b.p2p, "listen/bootstrap/no_mdns/no_space");
        check(self.coordinator != other.coordinator, "coordinator");
        check(self.disk_bytes != other.disk_bytes, "disk");
        keys
    }
}

/// Builds the daemon's settings from the command line and the settings file it names (or the
/// default file, when it exists).
pub fn settings(args: &DaemonArgs, host: HostSize) -> Result<Settings, ConfigError> {
    let (file, text) = match &args.config {
        Some(path) => {
            let (f, text) = config::read(path)?;
            (Some((path.clone(), f)), text)
        }
        None => {
            let path = config::default_path();
            if path.exists() {
                let (f, text) = config::read(&path)?;
                (Some((path, f)), text)
            } else {
                (None, String::new())
            }
        }
    };
    let path = file
        .as_ref()
        .map(|(p, _)| p.clone())
        .unwrap_or_else(|| PathBuf::from("(no settings file)"));
    let f = file.as_ref().map(|(_, f)| f.clone()).unwrap_or_default();
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
    };
    let (policy, _preset) = config::owner_policy(&f, &o, &overrides, host)?;

    let mut trusted = Vec::new();
    if let Some(t) = &f.trust {
        for entry in t.get_ref() {
            trusted.push(parse_trust(entry).map_err(|e| o.invalid("trust", t.span(), e))?);
        }
    }
    for entry in &args.trust {
        trusted.push(parse_trust(entry).map_err(|e| config::invalid_option("--trust", e))?);
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
    let listen = multiaddrs(&args.listen, &f.listen, "listen")?;
    let bootstrap = multiaddrs(&args.bootstrap, &f.bootstrap, "bootstrap")?;
    let space = match (&args.space, &f.space) {
        (Some(s), _) => s.clone(),
        (None, Some(s)) => s.get_ref().clone(),
        (None, None) => "default".to_owned(),
    };
    if space.is_empty() || space.len() > 64 || space.contains(['/', ' ']) {
        return Err(match &f.space {
            Some(s) if args.space.is_none() => o.invalid(
                "space",
                s.span(),
                "a space name is 1-64 characters without '/' or spaces",
            ),
            _ => config::invalid_option(
                "--space",
                "a space name is 1-64 characters without '/' or spaces",
            ),
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
            space,
            machine_types_dir: args.machine_types.clone().or(f.machine_types.clone()),
            trusted,
            cores,
            memory_bytes,
            tick: Duration::from_millis(args.tick_ms.max(50)),
            stop_grace,
            benchmark: 1000,
            policy,
        },
        coordinator,
        disk_bytes,
        file: file.map(|(p, _)| p),
    })
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
    let opts = first.daemon.clone();
    let coordinator = first.coordinator.clone();
    let disk = first.disk_bytes;
    // A reload re-reads the file with the same command line; only a valid whole is applied.
    let reload: daemon::Reload = {
        let args = args.clone();
        let running = std::sync::Mutex::new(first);
        std::sync::Arc::new(move || {
            let new = settings(&args, host).map_err(|e| e.to_string())?;
            let mut running = running
                .lock()
                .map_err(|_| "the settings lock is poisoned".to_string())?;
            let restart_needed = new
                .restart_needed(&running)
                .into_iter()
                .map(str::to_owned)
                .collect();
            let policy = new.daemon.policy.clone();
            // The policy is what a reload applies; the rest waits for a restart and stays listed.
            running.daemon.policy = policy.clone();
            Ok(daemon::Reloaded {
                policy,
                restart_needed,
                file: new.file.clone(),
            })
        })
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        std::fs::create_dir_all(&opts.state_dir)
            .with_context(|| format!("cannot create {}", opts.state_dir.display()))?;
        let key = crate::keys::read_or_create(&daemon::host_key_path(&opts.state_dir))?;
        let runtime = DockerRuntime::connect(
            &key.public().to_string(),
            opts.state_dir.join("images"),
            disk,
        )
        .await?;
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
