//! The `gleaner` command line: one typed enum of commands, handled in one place.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use gleaner::{Backend, PublicKey};

use crate::control::{self, Request};
use crate::{keys, publish};

/// Exit codes of the `gleaner` binary.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// An operation failed (I/O, engine, bad input); the message says what and why.
    pub const FAILURE: u8 = 1;
    /// The command line was wrong (clap's own code).
    pub const USAGE: u8 = 2;
    /// A signature, schema or trust check refused the input.
    pub const REFUSED: u8 = 3;
}

/// Gleaner gathers the CPU, memory and disk that machines leave idle and lends them to science
/// projects, within limits the owner sets, with signed credit for every core-hour given.
#[derive(Debug, Parser)]
#[command(name = "gleaner", version, propagate_version = true)]
#[command(
    after_help = "Exit codes: 0 ok, 1 failure, 2 bad command line, 3 refused (signature, schema or trust)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make and inspect ed25519 keys (publisher keys sign machine types; host keys sign credit).
    #[command(subcommand)]
    Key(KeyCommand),
    /// Write, sign, verify and show machine types (for projects publishing work).
    #[command(subcommand, name = "machine-type")]
    MachineType(MachineTypeCommand),
    /// What runs, the owner state and why, usage, limits and recent events.
    Status(RemoteArgs),
    /// Freeze all work now (for an hour with --minutes 60), until `gleaner resume`.
    Pause {
        #[command(flatten)]
        remote: RemoteArgs,
        /// Resume by itself after this many minutes
        #[arg(long)]
        minutes: Option<u64>,
    },
    /// Thaw work frozen by `gleaner pause`.
    Resume(RemoteArgs),
    /// Start no new machines; running ones finish by their shutdowntime.
    Drain {
        #[command(flatten)]
        remote: RemoteArgs,
        /// Bring every machine's shutdowntime forward to now (plus the stop grace)
        #[arg(long)]
        now: bool,
        /// Lift a drain
        #[arg(long, conflicts_with = "now")]
        undo: bool,
    },
    /// Credit earned: CPU time in the local ledger, delivered and waiting.
    Credit(RemoteArgs),
    /// Recent events (machines started, ended, refused...).
    Events(RemoteArgs),
    /// The live view of the space: peers, their free capacity and what they run.
    Space(RemoteArgs),
    /// Run the factory daemon: start trusted machine types when the owner allows, account for
    /// them, deliver signed credit to the coordinator. Stops cleanly on SIGTERM or Ctrl-C.
    Daemon(Box<DaemonArgs>),
    /// Run a whole local space: a coordinator, a signed machine type, client daemons running real
    /// workloads, and credit on the dashboard. Ctrl-C stops it all and leaves nothing behind.
    Demo(crate::demo::DemoArgs),
    /// Check the host: engines reachable, KVM usable or TCG fallback, cgroups, idle sources,
    /// coordinator reachable — each with a fix hint. Exits 1 if a required check fails.
    Doctor {
        /// Also check this coordinator
        #[arg(long)]
        coordinator: Option<String>,
        /// Its certificate fingerprint
        #[arg(long, requires = "coordinator")]
        coordinator_fingerprint: Option<String>,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
}

/// Settings of `gleaner daemon`.
#[derive(Debug, Clone, clap::Args)]
pub struct DaemonArgs {
    /// Where the host key, ledger, image cache and machine folders live
    /// [default: /var/lib/gleaner as root, else ~/.local/share/gleaner]
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// The control socket [default: as for `gleaner status`]
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// The space (department or swarm) this factory belongs to
    #[arg(long, default_value = "default")]
    pub space: String,
    /// A folder of signed machine types (*.gmt) to offer when their publisher is trusted
    #[arg(long)]
    pub machine_types: Option<PathBuf>,
    /// Trust a publisher, optionally with a share: ID or ID=SHARE (repeatable)
    #[arg(long = "trust", value_name = "ID[=SHARE]")]
    pub trust: Vec<String>,
    /// Most cores Gleaner may use [default: all]
    #[arg(long)]
    pub cores: Option<u16>,
    /// Most memory Gleaner may use, e.g. 4GiB [default: half of RAM]
    #[arg(long)]
    pub memory: Option<String>,
    /// The coordinator's base URL, e.g. https://127.0.0.1:8443
    #[arg(long)]
    pub coordinator: Option<String>,
    /// Pin the coordinator's certificate by its SHA-256 (printed by the coordinator)
    #[arg(long, requires = "coordinator")]
    pub coordinator_fingerprint: Option<String>,
    /// Enrol this host with the coordinator once, as ACCOUNT:TOKEN (the token from
    /// `gleaner-coordinator account add`); retried until it succeeds
    #[arg(
        long,
        requires = "coordinator_fingerprint",
        value_name = "ACCOUNT:TOKEN"
    )]
    pub enrol: Option<String>,
    /// Seconds a machine gets between SIGTERM and SIGKILL
    #[arg(long, default_value_t = 30)]
    pub stop_grace: u64,
    /// The owner policy: only-when-idle, always-gently or nights-and-weekends
    #[arg(long, default_value = "only-when-idle")]
    pub preset: gleaner::policy::Preset,
    /// Override the preset's idle time before the owner counts as away, e.g. 5m or 30s
    #[arg(long)]
    pub idle_after: Option<String>,
    /// The X11 display to watch for the owner's input [default: $DISPLAY]
    #[arg(long)]
    pub display: Option<String>,
    /// Run while on battery power
    #[arg(long)]
    pub run_on_battery: bool,
    /// Listen for the space's peers on this libp2p address (repeatable)
    /// [default: /ip4/0.0.0.0/tcp/0 and /ip4/0.0.0.0/udp/0/quic-v1]
    #[arg(long = "listen", value_name = "MULTIADDR")]
    pub listen: Vec<libp2p::Multiaddr>,
    /// Dial these peers to join the space (a wide-area space's bootstrap nodes; repeatable)
    #[arg(long = "bootstrap", value_name = "MULTIADDR")]
    pub bootstrap: Vec<libp2p::Multiaddr>,
    /// Do not look for peers on the LAN by mDNS
    #[arg(long)]
    pub no_mdns: bool,
    /// Run alone, without joining a space
    #[arg(long)]
    pub no_space: bool,
    /// The sysfs power-supply folder (battery state)
    #[arg(long, default_value = "/sys/class/power_supply", hide = true)]
    pub power_supply: PathBuf,
    /// Milliseconds between looks at the machines
    #[arg(long, default_value_t = 500, hide = true)]
    pub tick_ms: u64,
}

/// How to reach the daemon.
#[derive(Debug, Clone, clap::Args)]
pub struct RemoteArgs {
    /// The daemon's control socket [default: /run/gleaner/control.sock, or
    /// $XDG_RUNTIME_DIR/gleaner/control.sock for a desktop install; env GLEANER_SOCKET]
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// Print JSON for scripts instead of text for people
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Generate a new key, written with 0600 permissions; its public id goes to <FILE>.pub.
    ///
    /// The secret is never printed. Keep a backup: machine types you sign can only be updated by
    /// the same key (or one it rotated to).
    Generate {
        /// Where to write the key [default: publisher.key in the user's config dir]
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// Replace an existing key file (the old key is lost)
        #[arg(long)]
        force: bool,
    },
    /// Print a key's public id (the same string as its libp2p PeerId) and raw public key.
    Show {
        /// The key file [default: publisher.key in the user's config dir]
        file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum MachineTypeCommand {
    /// Write a commented TOML template to start a machine type from.
    New {
        /// The machine type's name (a-z, 0-9, '.', '_', '-')
        name: String,
        /// container or vm
        #[arg(long, default_value = "container")]
        backend: Backend,
        /// Output file [default: <NAME>.toml]
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Validate a TOML machine type and sign it into the binary envelope that travels.
    Sign {
        /// The TOML file
        file: PathBuf,
        /// The publisher key [default: publisher.key in the user's config dir]
        #[arg(long, short)]
        key: Option<PathBuf>,
        /// Output file [default: the TOML file with the extension .gmt]
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Check a signed machine type: signature, schema, expiry and (optionally) the signer.
    ///
    /// Prints who signed it; exits 3 with the reason if anything is wrong.
    Verify {
        /// The signed file (.gmt)
        file: PathBuf,
        /// Accept only these publisher ids (repeatable)
        #[arg(long = "publisher", value_name = "ID")]
        publishers: Vec<PublicKey>,
    },
    /// Print a signed machine type (or a TOML one, validated) in its TOML form.
    Show {
        /// A .gmt (signed) or .toml file
        file: PathBuf,
        /// Print JSON instead of TOML
        #[arg(long)]
        json: bool,
    },
}

/// Failures that map to their own exit code.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            eprintln!("gleaner: {e:#}");
            if e.downcast_ref::<Refused>().is_some() {
                ExitCode::from(exit::REFUSED)
            } else {
                ExitCode::from(exit::FAILURE)
            }
        }
    }
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Key(cmd) => key(cmd),
        Command::MachineType(cmd) => machine_type(cmd),
        Command::Status(r) => remote(&r, Request::Status),
        Command::Pause { remote: r, minutes } => remote(
            &r,
            Request::Pause {
                minutes,
                machine_type: None,
            },
        ),
        Command::Resume(r) => remote(&r, Request::Resume { machine_type: None }),
        Command::Drain {
            remote: r,
            now,
            undo,
        } => remote(
            &r,
            if undo {
                Request::Undrain
            } else {
                Request::Drain { now }
            },
        ),
        Command::Credit(r) => remote(&r, Request::Credit),
        Command::Events(r) => remote(&r, Request::Events),
        Command::Space(r) => remote(&r, Request::Space),
        Command::Daemon(args) => crate::daemon_cli::run(*args),
        Command::Demo(args) => crate::demo::run(args),
        Command::Doctor {
            coordinator,
            coordinator_fingerprint,
            json,
        } => doctor(coordinator, coordinator_fingerprint, json),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn doctor(coordinator: Option<String>, fingerprint: Option<String>, json: bool) -> Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let pin = fingerprint
        .map(|f| f.parse::<gleaner::Digest>())
        .transpose()
        .context("--coordinator-fingerprint is not a SHA-256 in hex")?;
    let checks = runtime()?.block_on(crate::doctor::checks(
        coordinator.as_deref().map(|c| (c, pin)),
    ));
    if json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            println!(
                "{} {:<13} {}",
                if c.ok { "ok  " } else { "FAIL" },
                c.name,
                c.detail
            );
            if let Some(fix) = &c.fix {
                println!("     {:<13} fix: {fix}", "");
            }
        }
    }
    let required_failed = checks
        .iter()
        .any(|c| !c.ok && matches!(c.name, "docker" | "coordinator"));
    if required_failed {
        anyhow::bail!("a required check failed");
    }
    Ok(())
}

/// Sends one request to the daemon and prints the answer.
fn remote(r: &RemoteArgs, req: Request) -> Result<()> {
    let socket = r.socket.clone().unwrap_or_else(control::default_socket);
    let op = req.clone();
    let value = runtime()?.block_on(async {
        let mut c = control::ControlClient::connect(&socket).await?;
        c.call(&req).await
    })?;
    if r.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!("{}", crate::render::render(&op, &value));
    }
    Ok(())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn default_publisher_key() -> Result<PathBuf> {
    directories::ProjectDirs::from("org", "gleaner", "gleaner")
        .map(|d| d.config_dir().join("publisher.key"))
        .context("cannot find the user's config dir; pass the key path explicitly")
}

fn key(cmd: KeyCommand) -> Result<()> {
    match cmd {
        KeyCommand::Generate { out, force } => {
            let path = match out {
                Some(p) => p,
                None => default_publisher_key()?,
            };
            let key = keys::generate()?;
            keys::write(&path, &key, force)?;
            println!("wrote {} (mode 0600)", path.display());
            println!("id    {}", key.public());
            println!("public id also in {}", keys::public_path(&path).display());
        }
        KeyCommand::Show { file } => {
            let path = match file {
                Some(p) => p,
                None => default_publisher_key()?,
            };
            let key = keys::read(&path)?;
            println!("id      {}", key.public());
            println!("public  {}", hex::encode(key.public().to_bytes()));
        }
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn machine_type(cmd: MachineTypeCommand) -> Result<()> {
    match cmd {
        MachineTypeCommand::New { name, backend, out } => {
            let path = out.unwrap_or_else(|| PathBuf::from(format!("{name}.toml")));
            if path.exists() {
                anyhow::bail!("{} already exists; choose another --out", path.display());
            }
            std::fs::write(&path, publish::template(&name, backend))
                .with_context(|| format!("cannot write {}", path.display()))?;
            println!(
                "wrote {}: fill in the image url and sha256, then run",
                path.display()
            );
            println!("  gleaner machine-type sign {}", path.display());
        }
        MachineTypeCommand::Sign { file, key, out } => {
            let key_path = match key {
                Some(p) => p,
                None => default_publisher_key()?,
            };
            let key = keys::read(&key_path)?;
            let (mt, bytes) =
                publish::sign_file(&file, &key, now()).map_err(|e| Refused(e.to_string()))?;
            let out = out.unwrap_or_else(|| file.with_extension("gmt"));
            std::fs::write(&out, &bytes)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!("signed {} v{} as {}", mt.name, mt.version, key.public());
            println!(
                "wrote  {} ({} bytes, sha256 {})",
                out.display(),
                bytes.len(),
                gleaner::Digest::of(&bytes)
            );
        }
        MachineTypeCommand::Verify { file, publishers } => {
            let bytes = read_file(&file)?;
            let v = publish::verify_bytes(&file, &bytes, now(), &publishers)
                .map_err(|e| Refused(e.to_string()))?;
            println!(
                "ok: {} v{} signed by {}",
                v.message.name, v.message.version, v.signer
            );
            println!("machine type {}", v.digest);
        }
        MachineTypeCommand::Show { file, json } => {
            let bytes = read_file(&file)?;
            let mt = if file.extension().is_some_and(|e| e == "toml") {
                let text = String::from_utf8(bytes)
                    .with_context(|| format!("{} is not UTF-8", file.display()))?;
                let placeholder = gleaner::SecretKey::from_seed([0; 32]).public();
                publish::parse_toml(&file, &text, now(), placeholder)
                    .map_err(|e| Refused(e.to_string()))?
            } else {
                let v = gleaner::Envelope::open_bytes::<gleaner::MachineType>(&bytes)
                    .map_err(|e| Refused(format!("{}: {e}", file.display())))?;
                if let Err(e) = v.message.check_fresh(now()) {
                    eprintln!("warning: {}: {e}", file.display());
                }
                v.message
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&publish_json(&mt))?);
            } else {
                print!("{}", publish::to_toml(&mt));
            }
        }
    }
    Ok(())
}

fn publish_json(mt: &gleaner::MachineType) -> serde_json::Value {
    let text = publish::to_toml(mt);
    let body: String = text.lines().skip(1).collect::<Vec<_>>().join("\n");
    let mut v: serde_json::Value = toml::from_str::<toml::Value>(&body)
        .ok()
        .and_then(|t| serde_json::to_value(t).ok())
        .unwrap_or(serde_json::Value::Null);
    if let Some(obj) = v.as_object_mut() {
        obj.insert("publisher".into(), mt.publisher.to_string().into());
    }
    v
}
