//! `gleaner daemon`: turns command-line settings into daemon options, sets up logging and signal
//! handling, connects the engine, and runs the daemon until SIGTERM or Ctrl-C.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use gleaner::{Digest, PublicKey};
use tokio_util::sync::CancellationToken;

use crate::cli::DaemonArgs;
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

fn parse_trust(s: &str) -> Result<(PublicKey, f64)> {
    let (id, share) = match s.split_once('=') {
        Some((id, share)) => {
            let share: f64 = share
                .parse()
                .with_context(|| format!("--trust {s}: the share {share:?} is not a number"))?;
            if !(share.is_finite() && share > 0.0) {
                bail!("--trust {s}: the share must be positive");
            }
            (id, share)
        }
        None => (s, 1.0),
    };
    let key: PublicKey = id
        .parse()
        .with_context(|| format!("--trust {s}: not a publisher id"))?;
    Ok((key, share))
}

fn total_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kib| kib * 1024)
        .unwrap_or(2 << 30)
}

/// Builds the daemon's options from the command line.
pub fn options(args: &DaemonArgs) -> Result<DaemonOptions> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u16)
        .unwrap_or(1);
    let cores = match args.cores {
        Some(0) => bail!("--cores must be at least 1"),
        Some(c) => c,
        None => cores,
    };
    let memory_bytes = match &args.memory {
        Some(m) => m
            .parse::<bytesize::ByteSize>()
            .map_err(|e| anyhow::anyhow!("--memory {m:?} is not a size like 4GiB: {e}"))?
            .as_u64(),
        None => total_memory() / 2,
    };
    let host_cores = std::thread::available_parallelism()
        .map(|n| n.get() as f64)
        .unwrap_or(1.0);
    let mut policy = args.preset.policy(host_cores, total_memory());
    let cap = |l: gleaner::policy::Limits| gleaner::policy::Limits {
        cores: l.cores.min(f64::from(cores)),
        memory_bytes: l.memory_bytes.min(memory_bytes),
    };
    policy.away = gleaner::policy::Limits {
        cores: f64::from(cores),
        memory_bytes,
    };
    policy.present = policy.present.map(cap);
    policy.max_machines = usize::from(cores);
    policy.run_on_battery = args.run_on_battery;
    if let Some(idle) = &args.idle_after {
        policy.idle_after_s = humantime::parse_duration(idle)
            .map_err(|e| anyhow::anyhow!("--idle-after {idle:?} is not a duration like 5m: {e}"))?
            .as_secs();
    }
    Ok(DaemonOptions {
        policy,
        display: args
            .display
            .clone()
            .or_else(|| std::env::var("DISPLAY").ok()),
        power_supply: args.power_supply.clone(),
        owner_interval: Duration::from_millis(100),
        p2p: (!args.no_space).then(|| crate::p2p::SpaceConfig {
            space: args.space.clone(),
            listen: if args.listen.is_empty() {
                ["/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic-v1"]
                    .iter()
                    .filter_map(|a| a.parse().ok())
                    .collect()
            } else {
                args.listen.clone()
            },
            bootstrap: args.bootstrap.clone(),
            mdns: !args.no_mdns,
        }),
        state_dir: args.state_dir.clone().unwrap_or_else(default_state_dir),
        socket: args
            .socket
            .clone()
            .unwrap_or_else(crate::control::default_socket),
        space: args.space.clone(),
        machine_types_dir: args.machine_types.clone(),
        trusted: args
            .trust
            .iter()
            .map(|t| parse_trust(t))
            .collect::<Result<_>>()?,
        cores,
        memory_bytes,
        tick: Duration::from_millis(args.tick_ms.max(50)),
        stop_grace: Duration::from_secs(args.stop_grace),
        benchmark: 1000,
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
    let opts = options(&args)?;
    let pin = args
        .coordinator_fingerprint
        .as_deref()
        .map(|f| f.replace(':', "").parse::<Digest>())
        .transpose()
        .context("--coordinator-fingerprint is not a SHA-256 in hex")?;
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
            20 << 30,
        )
        .await?;
        let uploader = match &args.coordinator {
            Some(url) => Some(
                crate::coordinator_client::HttpUploader::new(url, pin, key.clone())
                    .map_err(anyhow::Error::msg)?,
            ),
            None => None,
        };
        let cancel = CancellationToken::new();
        if let (Some(up), Some(enrol), Some(pin)) = (&uploader, &args.enrol, pin) {
            let (account, token) = enrol
                .split_once(':')
                .context("--enrol must be ACCOUNT:TOKEN")?;
            let (account, token) = (account.to_owned(), token.to_owned());
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
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        daemon::run(opts, runtime, uploader, cancel).await?;
        Ok(())
    })
}
