//! The `gleaner-coordinator` binary: serve the API and dashboard over HTTPS, manage accounts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use gleaner_coordinator::api::AppState;
use gleaner_coordinator::ratelimit::{Quota, RateLimits};
use gleaner_coordinator::store::Store;
use gleaner_coordinator::{app, space, tls};

/// Gleaner's coordinator: verifies signed usage records from enrolled hosts, keeps them safely and
/// shows credit by volunteer, team, host, project and day.
#[derive(Debug, Parser)]
#[command(name = "gleaner-coordinator", version)]
#[command(after_help = "Exit codes: 0 ok, 1 failure, 2 bad command line.")]
struct Cli {
    /// Where the database and the self-signed certificate live
    #[arg(long, global = true, default_value = "/var/lib/gleaner-coordinator")]
    data_dir: PathBuf,
    /// Database URL [default: sqlite://<data dir>/coordinator.db]
    #[arg(long, global = true)]
    database: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the API and the dashboard over HTTPS.
    Serve {
        /// A settings file (TOML) with the keys listen, cert, key and database; options given on
        /// the command line win over it
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Address to listen on [default: 127.0.0.1:8443]
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// PEM certificate (with --key); without both, a self-signed one is made in the data dir
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
        /// Usage batches per second allowed from one client address (0 = no limit)
        #[arg(long, default_value_t = 20.0)]
        ingest_rate: f64,
        /// Usage batches one client address may send at once before the rate applies
        #[arg(long, default_value_t = 60)]
        ingest_burst: u32,
        /// Enrolments per second allowed from one client address (0 = no limit)
        #[arg(long, default_value_t = 0.2)]
        enrol_rate: f64,
        /// Enrolments one client address may send at once before the rate applies
        #[arg(long, default_value_t = 5)]
        enrol_burst: u32,
        /// Join this space (as an observer that never publishes) and show its live capacity on
        /// the dashboard (/space, /api/space, space gauges in /metrics)
        #[arg(long, value_name = "NAME")]
        space: Option<String>,
        /// libp2p address to listen on in the space, e.g. /ip4/0.0.0.0/tcp/4001 (repeatable)
        #[arg(long, value_name = "MULTIADDR")]
        space_listen: Vec<String>,
        /// A factory of the space to join through, e.g. /ip4/10.0.0.5/tcp/4001 (repeatable)
        #[arg(long, value_name = "MULTIADDR")]
        space_bootstrap: Vec<String>,
        /// Find the space's factories on the LAN by mDNS
        #[arg(long)]
        space_mdns: bool,
        /// Seconds a factory's capacity advert counts without a newer one [default: 60]
        #[arg(long, value_name = "SECONDS")]
        space_advert_ttl: Option<u64>,
    },
    /// Manage volunteer accounts.
    #[command(subcommand)]
    Account(AccountCommand),
    /// Print the certificate fingerprint that clients pin.
    Fingerprint,
}

#[derive(Debug, Subcommand)]
enum AccountCommand {
    /// Create an account and print its enrolment token (hosts need it once to enrol).
    Add {
        name: String,
        /// The team or department
        #[arg(long, default_value = "")]
        team: String,
        /// Use this token instead of a random one
        #[arg(long)]
        token: Option<String>,
    },
}

/// `serve --config`: the same settings as the options, in a file (installed as
/// /etc/gleaner/coordinator.toml).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ServeFile {
    listen: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    database: Option<String>,
    space: Option<String>,
    space_listen: Option<Vec<String>>,
    space_bootstrap: Option<Vec<String>>,
    space_mdns: Option<bool>,
    space_advert_ttl: Option<u64>,
}

/// The `space*` settings as given on the command line.
struct SpaceArgs<'a> {
    space: &'a Option<String>,
    listen: &'a [String],
    bootstrap: &'a [String],
    mdns: bool,
    advert_ttl: Option<u64>,
}

/// The space to join, if any: the command line over the file; errors name the option or the file
/// and key, the value and why.
fn space_config(
    args: &SpaceArgs,
    file: &ServeFile,
    file_name: &str,
) -> Result<Option<space::SpaceConfig>> {
    // Where a value came from, for errors: "--space-listen" or "<file>: space_listen".
    let origin = |cli: bool, key: &str| {
        if cli {
            format!("--{}", key.replace('_', "-"))
        } else {
            format!("{file_name}: {key}")
        }
    };
    let addrs = |cli: &[String], f: &Option<Vec<String>>, key: &str| -> Result<_> {
        let (list, from_cli) = if cli.is_empty() {
            (f.clone().unwrap_or_default(), false)
        } else {
            (cli.to_vec(), true)
        };
        list.iter()
            .map(|a| {
                a.parse::<libp2p::Multiaddr>().map_err(|e| {
                    anyhow::anyhow!(
                        "{}: {a:?} is not a libp2p address like /ip4/0.0.0.0/tcp/4001: {e}",
                        origin(from_cli, key)
                    )
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(|v| (v, from_cli))
    };
    let (listen, listen_cli) = addrs(args.listen, &file.space_listen, "space_listen")?;
    let (bootstrap, bootstrap_cli) =
        addrs(args.bootstrap, &file.space_bootstrap, "space_bootstrap")?;
    let mdns = args.mdns || file.space_mdns.unwrap_or(false);
    let ttl = match (args.advert_ttl, file.space_advert_ttl) {
        (Some(t), _) => Some((t, true)),
        (None, Some(t)) => Some((t, false)),
        (None, None) => None,
    };
    let (name, name_cli) = match (args.space, &file.space) {
        (Some(n), _) => (n.clone(), true),
        (None, Some(n)) => (n.clone(), false),
        (None, None) => {
            let stray = [
                (!listen.is_empty()).then(|| origin(listen_cli, "space_listen")),
                (!bootstrap.is_empty()).then(|| origin(bootstrap_cli, "space_bootstrap")),
                mdns.then(|| origin(args.mdns, "space_mdns")),
                ttl.map(|(_, cli)| origin(cli, "space_advert_ttl")),
            ];
            if let Some(s) = stray.into_iter().flatten().next() {
                anyhow::bail!("{s}: only means something with a space to join (--space NAME)");
            }
            return Ok(None);
        }
    };
    space::check_space_name(&name)
        .map_err(|e| anyhow::anyhow!("{}: {e}", origin(name_cli, "space")))?;
    let mut cfg = space::SpaceConfig::new(name);
    if let Some((t, cli)) = ttl {
        if !(1..=86_400).contains(&t) {
            anyhow::bail!(
                "{}: {t} is not a number of seconds from 1 to 86400",
                origin(cli, "space_advert_ttl")
            );
        }
        cfg.advert_ttl_s = t;
    }
    cfg.listen = listen;
    cfg.bootstrap = bootstrap;
    cfg.mdns = mdns;
    Ok(Some(cfg))
}

/// The coordinator's identity in the space, kept in the data dir (0600) so that factories can
/// name it as a bootstrap peer across restarts.
fn space_key(data_dir: &std::path::Path) -> Result<gleaner::SecretKey> {
    let path = data_dir.join("space.key");
    match std::fs::read_to_string(&path) {
        Ok(text) => gleaner::SecretKey::from_file_text(&text)
            .map_err(|e| anyhow::anyhow!("{}: not a key file: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
            let key = gleaner::SecretKey::from_seed(seed);
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .and_then(|mut f| f.write_all(key.to_file_text().as_bytes()))
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

impl ServeFile {
    fn read(path: &std::path::Path) -> Result<ServeFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the settings file {}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A rate limit from the command line: 0 turns it off.
fn quota(per_second: f64, burst: u32) -> Result<Quota> {
    if !per_second.is_finite() || per_second < 0.0 {
        anyhow::bail!("a rate must be a number of requests per second, 0 or more: {per_second}");
    }
    Ok(if per_second == 0.0 {
        Quota::UNLIMITED
    } else {
        Quota {
            per_second,
            burst: burst.max(1),
        }
    })
}

async fn store(cli: &Cli, file_database: Option<&str>) -> Result<Store> {
    std::fs::create_dir_all(&cli.data_dir)
        .with_context(|| format!("cannot create {}", cli.data_dir.display()))?;
    let url = cli
        .database
        .clone()
        .or_else(|| file_database.map(str::to_owned))
        .unwrap_or_else(|| format!("sqlite://{}", cli.data_dir.join("coordinator.db").display()));
    Store::open(&url)
        .await
        .with_context(|| format!("cannot open {url}"))
}

async fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Serve {
            config,
            listen,
            cert,
            key,
            ingest_rate,
            ingest_burst,
            enrol_rate,
            enrol_burst,
            space: space_name,
            space_listen,
            space_bootstrap,
            space_mdns,
            space_advert_ttl,
        } => {
            let file = match config {
                Some(path) => ServeFile::read(path)?,
                None => ServeFile::default(),
            };
            let where_ = || {
                config
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            };
            let listen: SocketAddr = match (listen, &file.listen) {
                (Some(l), _) => *l,
                (None, Some(l)) => l.parse().map_err(|e| {
                    anyhow::anyhow!(
                        "{}: listen: {l:?} is not an address like 0.0.0.0:8443: {e}",
                        where_()
                    )
                })?,
                (None, None) => SocketAddr::from(([127, 0, 0, 1], 8443)),
            };
            let (cert, key) = match (cert, key) {
                (Some(c), Some(k)) => (Some(c.clone()), Some(k.clone())),
                _ => match (&file.cert, &file.key) {
                    (Some(c), Some(k)) => (Some(c.clone()), Some(k.clone())),
                    (None, None) => (None, None),
                    _ => anyhow::bail!("{}: give both cert and key, or neither", where_()),
                },
            };
            let space_cfg = space_config(
                &SpaceArgs {
                    space: space_name,
                    listen: space_listen,
                    bootstrap: space_bootstrap,
                    mdns: *space_mdns,
                    advert_ttl: *space_advert_ttl,
                },
                &file,
                &where_(),
            )?;
            let store = store(&cli, file.database.as_deref()).await?;
            let tls = tls::ensure(
                &cli.data_dir,
                cert,
                key,
                &["localhost".into(), listen.ip().to_string()],
            )?;
            let limits = RateLimits {
                ingest: quota(*ingest_rate, *ingest_burst)?,
                enrol: quota(*enrol_rate, *enrol_burst)?,
            };
            let mut state = AppState::new(store, tls.fingerprint.to_string(), limits);
            let cancel = tokio_util::sync::CancellationToken::new();
            let mut space_addrs = Vec::new();
            if let Some(cfg) = space_cfg {
                let name = cfg.space.clone();
                let joined = space::start(&space_key(&cli.data_dir)?, cfg, cancel.clone())
                    .await
                    .with_context(|| format!("cannot join the space {name:?}"))?;
                space_addrs = joined.addrs;
                state = state.with_space(joined.snapshots);
            }
            let state = Arc::new(state);
            // Whoever started us may stop reading after the fingerprint: a closed stdout must not
            // take the server down.
            {
                use std::io::Write;
                let mut out = std::io::stdout();
                let _ = writeln!(out, "fingerprint {}", tls.fingerprint);
                let _ = writeln!(out, "dashboard   https://{listen}/");
                for a in &space_addrs {
                    let _ = writeln!(out, "space       {a}");
                }
                let _ = out.flush();
            }
            let rustls_config =
                axum_server::tls_rustls::RustlsConfig::from_pem_file(&tls.cert, &tls.key)
                    .await
                    .context("cannot load the certificate")?;
            let handle = axum_server::Handle::new();
            {
                let handle = handle.clone();
                let cancel = cancel.clone();
                tokio::spawn(async move {
                    use tokio::signal::unix::{SignalKind, signal};
                    if let (Ok(mut t), Ok(mut i)) = (
                        signal(SignalKind::terminate()),
                        signal(SignalKind::interrupt()),
                    ) {
                        tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
                        cancel.cancel();
                        handle.graceful_shutdown(Some(std::time::Duration::from_secs(5)));
                    }
                });
            }
            axum_server::bind_rustls(listen, rustls_config)
                .handle(handle)
                .serve(app(state).into_make_service_with_connect_info::<SocketAddr>())
                .await
                .with_context(|| format!("cannot serve on {listen}"))?;
        }
        Command::Account(AccountCommand::Add { name, team, token }) => {
            let store = store(&cli, None).await?;
            let token = match token {
                Some(t) => t.clone(),
                None => {
                    let mut b = [0u8; 16];
                    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
                    hex::encode(b)
                }
            };
            if !store.add_account(name, team, &token, now()).await? {
                anyhow::bail!("account {name:?} already exists");
            }
            println!("account {name} (team {team:?})");
            println!("token   {token}");
        }
        Command::Fingerprint => {
            let tls = tls::ensure(&cli.data_dir, None, None, &["localhost".into()])?;
            println!("{}", tls.fingerprint);
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gleaner-coordinator: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gleaner-coordinator: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
