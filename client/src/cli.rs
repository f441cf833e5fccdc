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
    /// Freeze all work now (for an hour with --minutes 60), until `gleaner resume`; or only one
    /// machine type's machines (`gleaner pause NAME`), kept across restarts.
    Pause {
        #[command(flatten)]
        remote: RemoteArgs,
        /// Pause only this machine type (its name, or its digest); others keep running
        machine_type: Option<String>,
        /// Resume by itself after this many minutes
        #[arg(long)]
        minutes: Option<u64>,
    },
    /// Thaw work frozen by `gleaner pause` (a type paused by name stays paused until
    /// `gleaner resume NAME`).
    Resume {
        #[command(flatten)]
        remote: RemoteArgs,
        /// Resume only this paused machine type (its name, or its digest)
        machine_type: Option<String>,
    },
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
    /// Re-read the daemon's settings file (as SIGHUP does): the owner policy changes at once; a
    /// bad file is refused with the line, key and reason, and the running settings are kept.
    Reload(RemoteArgs),
    /// The owner policy in force: limits when the owner is away and present, idle time, schedule,
    /// exclusive applications; or change them live with --set (kept in the state dir's owner.toml,
    /// over the settings file). Values are settings-file values: cores=2, memory=4GiB, cpu_usage=50%,
    /// present=freeze, present='{cores=1, memory="25%"}', idle_after=10m, exclusive_apps='["blender"]'.
    Limits {
        #[command(flatten)]
        remote: RemoteArgs,
        /// Change a key of the owner policy, as KEY=VALUE (repeatable); validated whole, applied at once
        #[arg(long, value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Drop the owner's own value of KEY, going back to the settings file's (repeatable)
        #[arg(long, value_name = "KEY")]
        unset: Vec<String>,
    },
    /// Check or print the daemon's settings file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Which publishers this host trusts and with what policy (VMs, network, cores); add and
    /// remove them. Kept in the daemon's state dir, so a restart keeps them.
    #[command(subcommand)]
    Trust(TrustCommand),
    /// Measure this host's single-core CPU benchmark (the score signed into usage records and
    /// adverts) several times and show the run-to-run spread.
    Benchmark {
        /// How many times to run it
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Stop and remove every machine this host runs and delete the image cache and machine folders,
    /// keeping the host key and the ledger (unsent credit) unless --purge. Run by the package's
    /// uninstall; stop the daemon first.
    Cleanup {
        /// The state dir [default: as for `gleaner daemon`]
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// The daemon's control socket, to make sure it is not running [default: as for status]
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Also delete the host key and the ledger: nothing of Gleaner is left on this host
        #[arg(long)]
        purge: bool,
        /// Time each machine gets to shut down before it is killed, e.g. 10s
        #[arg(long, default_value = "10s")]
        grace: humantime::Duration,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// For a cluster node's Slurm Prolog/Epilog (with PrologFlags=Alloc): free the arriving job's
    /// CPUs and memory (prolog) or hand them back (epilog). Always exits 0 within the deadline,
    /// even when the daemon is down, so that a site job is never held up or failed by Gleaner.
    #[command(name = "batch-hook")]
    BatchHook {
        phase: crate::batch::Phase,
        /// The daemon's settings file, for its socket and [batch] hook_deadline
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The daemon's control socket [default: from the settings file, else as for status]
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Give up after this long, e.g. 500ms [default: [batch] hook_deadline, else 2s]
        #[arg(long)]
        deadline: Option<humantime::Duration>,
    },
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

/// Settings of `gleaner daemon`. Each may also be set in the settings file (`--config`) under the
/// option's name with `_` for `-`; the command line wins over the file.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "The settings file holds the owner policy too: limits while the owner is \
present, a weekly schedule, exclusive applications, CPU usage %, disk. `gleaner config example` \
prints every key with its meaning; `gleaner config check FILE` validates one. SIGHUP or \
`gleaner reload` re-reads the file: the owner policy changes live, a bad file is refused and the \
running settings are kept."
)]
pub struct DaemonArgs {
    /// The settings file (TOML) [default: /etc/gleaner/client.toml as root, else
    /// ~/.config/gleaner/client.toml; used when it exists]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where the host key, ledger, image cache and machine folders live
    /// [default: /var/lib/gleaner as root, else ~/.local/share/gleaner]
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// The control socket [default: as for `gleaner status`]
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Also serve the control API on this loopback address (e.g. 127.0.0.1:7878), for callers
    /// showing the token in <state-dir>/control.token [default: off; settings: [control] tcp]
    #[arg(long, value_name = "ADDR")]
    pub control_tcp: Option<String>,
    /// The space (department or swarm) this factory belongs to [default: default]
    #[arg(long)]
    pub space: Option<String>,
    /// A folder of signed machine types (*.gmt) to offer when their publisher is trusted
    #[arg(long)]
    pub machine_types: Option<PathBuf>,
    /// Fetch a signed machine type from this https:// URL (repeatable; replaces the file's
    /// type_urls), admitted like the folder's. Add #fingerprint=SHA256 to pin a server with a
    /// self-signed certificate, as `gleaner-coordinator serve` prints it
    #[arg(long = "type-url", value_name = "URL")]
    pub type_url: Vec<String>,
    /// How often each type URL is asked for a new version, e.g. 15m [default: 15m]
    #[arg(long, value_name = "DURATION")]
    pub type_url_every: Option<String>,
    /// Trust a publisher: ID[=SHARE][,allow-vms][,allow-egress][,max-cores=N] (repeatable; adds
    /// to the file's). Without allow-vms / allow-egress only containers without network run
    #[arg(long = "trust", value_name = "ID[=SHARE][,...]")]
    pub trust: Vec<String>,
    /// Most cores Gleaner may use: a count or a percentage such as 50% [default: all]
    #[arg(long)]
    pub cores: Option<String>,
    /// Most memory Gleaner may use: a size such as 4GiB or a percentage of RAM [default: 50%]
    #[arg(long)]
    pub memory: Option<String>,
    /// The coordinator's base URL, e.g. https://127.0.0.1:8443
    #[arg(long)]
    pub coordinator: Option<String>,
    /// Pin the coordinator's certificate by its SHA-256 (printed by the coordinator)
    #[arg(long)]
    pub coordinator_fingerprint: Option<String>,
    /// Enrol this host with the coordinator once, as ACCOUNT:TOKEN (the token from
    /// `gleaner-coordinator account add`); retried until it succeeds
    #[arg(long, value_name = "ACCOUNT:TOKEN")]
    pub enrol: Option<String>,
    /// Time a machine gets between SIGTERM and SIGKILL, e.g. 30s [default: 30s]
    #[arg(long)]
    pub stop_grace: Option<String>,
    /// The owner policy to start from: only-when-idle, always-gently or nights-and-weekends
    /// [default: only-when-idle]
    #[arg(long)]
    pub preset: Option<gleaner::policy::Preset>,
    /// Override the preset's idle time before the owner counts as away, e.g. 5m or 30s
    #[arg(long)]
    pub idle_after: Option<String>,
    /// The X11 display to watch for the owner's input [default: $DISPLAY]
    #[arg(long)]
    pub display: Option<String>,
    /// Run while on battery power
    #[arg(long)]
    pub run_on_battery: bool,
    /// Freeze while other programs keep more than this many cores busy: a count, a percentage of
    /// the cores, or off [default: the preset's, 75%]
    #[arg(long, value_name = "LOAD")]
    pub suspend_above_load: Option<String>,
    /// Which owner-activity sources to watch, comma-separated among x11, logind, terminals,
    /// interrupts and evdev [default: all that answer]
    #[arg(long, value_name = "LIST")]
    pub idle_sources: Option<String>,
    /// Which engines may run machines, comma-separated among docker (containers) and libvirt
    /// (VMs) [default: both; an engine that does not answer is skipped]
    #[arg(long, value_name = "LIST")]
    pub backends: Option<String>,
    /// Listen for the space's peers on this libp2p address (repeatable)
    /// [default: /ip4/0.0.0.0/tcp/0 and /ip4/0.0.0.0/udp/0/quic-v1]. Advert relay links also
    /// take TCP connections of their own on the first TCP address's IP, at a port of the
    /// system's choosing; where a peer cannot reach it they stay on the libp2p connection
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
    /// The folder of input devices watched for the owner's input (evdev)
    #[arg(long, default_value = "/dev/input", hide = true)]
    pub input_devices: PathBuf,
    /// Milliseconds between looks at the machines
    #[arg(long, default_value_t = 500, hide = true)]
    pub tick_ms: u64,
    /// Seconds with no machine running before the daemon lets go of its executable's start-up
    /// pages (again after each machine ends); for tests and measurements
    #[arg(long, default_value_t = 60, hide = true)]
    pub idle_release_after: u64,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a settings file as the daemon would, and show the owner policy it gives; exits 1
    /// with the file, line, key and reason when it is wrong.
    Check {
        /// The file [default: /etc/gleaner/client.toml as root, else ~/.config/gleaner/client.toml]
        file: Option<PathBuf>,
    },
    /// Print the documented example settings file (every key, with its meaning and default).
    Example,
}

impl DaemonArgs {
    /// No options given: only the settings file speaks (for `gleaner config check`).
    pub fn for_check() -> DaemonArgs {
        DaemonArgs {
            config: None,
            state_dir: None,
            socket: None,
            control_tcp: None,
            space: None,
            machine_types: None,
            type_url: Vec::new(),
            type_url_every: None,
            trust: Vec::new(),
            cores: None,
            memory: None,
            coordinator: None,
            coordinator_fingerprint: None,
            enrol: None,
            stop_grace: None,
            preset: None,
            idle_after: None,
            display: None,
            run_on_battery: false,
            idle_sources: None,
            backends: None,
            suspend_above_load: None,
            listen: Vec::new(),
            bootstrap: Vec::new(),
            no_mdns: false,
            no_space: false,
            power_supply: PathBuf::from("/sys/class/power_supply"),
            input_devices: PathBuf::from("/dev/input"),
            tick_ms: 500,
            idle_release_after: 60,
        }
    }
}

/// How to reach the daemon.
#[derive(Debug, Clone, clap::Args)]
pub struct RemoteArgs {
    /// The daemon's control socket [default: /run/gleaner/control.sock, or
    /// $XDG_RUNTIME_DIR/gleaner/control.sock for a desktop install; env GLEANER_SOCKET]
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// Reach the daemon over loopback TCP instead (its `[control] tcp` address) [env GLEANER_TCP]
    #[arg(long, global = true, value_name = "ADDR")]
    pub tcp: Option<std::net::SocketAddr>,
    /// The token file for --tcp [default: control.token in the daemon's state dir;
    /// env GLEANER_TOKEN_FILE]
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
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
    /// Sign, with the old key, that a new key replaces it (a .gkr file). Hosts that trust the old
    /// key move that trust to the new one and refuse the old key from then on; publish the file
    /// next to your machine types, re-signed with the new key.
    Rotate {
        /// The key being replaced
        #[arg(long)]
        old: PathBuf,
        /// The new key (only its public id is used)
        #[arg(long)]
        new: PathBuf,
        /// Output file [default: rotation.gkr]
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Sign, with the key itself, that it is revoked (a .grv file): hosts refuse everything it
    /// signed, for good.
    Revoke {
        /// The key to revoke
        file: PathBuf,
        /// Why, for the hosts' owners
        #[arg(long, default_value = "revoked by its owner")]
        reason: String,
        /// Output file [default: revocation.grv]
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TrustCommand {
    /// Trust a publisher by id, or the publisher of a signed machine type (--from FILE.gmt: it is
    /// verified and shown, and its publisher may then run what that type needs).
    Add {
        /// The publisher's id (12D3KooW...)
        #[arg(required_unless_present = "from")]
        id: Option<String>,
        /// A signed machine type whose publisher to trust
        #[arg(long, value_name = "FILE.gmt")]
        from: Option<PathBuf>,
        /// Target share among trusted publishers [default: 1]
        #[arg(long)]
        share: Option<f64>,
        /// Let this publisher run VMs
        #[arg(long)]
        allow_vms: bool,
        /// Let this publisher's machines use the network (as their signed egress list says)
        #[arg(long)]
        allow_egress: bool,
        /// Most cores one machine of this publisher gets
        #[arg(long)]
        max_cores: Option<u16>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Stop trusting a publisher: nothing new of theirs starts, and running machines are stopped
    /// gracefully (shutdowntime now, then SIGTERM, then kill after the stop grace).
    Remove {
        /// The publisher's id
        id: String,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Trusted publishers with their policy, and the rotations and revocations seen.
    List(RemoteArgs),
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
        Command::Pause {
            remote: r,
            machine_type,
            minutes,
        } => remote(
            &r,
            Request::Pause {
                minutes,
                machine_type,
            },
        ),
        Command::Resume {
            remote: r,
            machine_type,
        } => remote(&r, Request::Resume { machine_type }),
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
        Command::Reload(r) => remote(&r, Request::Reload),
        Command::Limits {
            remote: r,
            set,
            unset,
        } => {
            let changes = limit_changes(&set, &unset)?;
            remote(
                &r,
                Request::Limits {
                    set: (!changes.is_empty()).then_some(serde_json::Value::Object(changes)),
                },
            )
        }
        Command::Config(ConfigCommand::Example) => {
            print!("{}", crate::config::EXAMPLE);
            Ok(())
        }
        Command::Config(ConfigCommand::Check { file }) => config_check(file),
        Command::Trust(cmd) => trust(cmd),
        Command::Benchmark { runs, json } => benchmark(runs, json),
        Command::Cleanup {
            state_dir,
            socket,
            purge,
            grace,
            json,
        } => cleanup(state_dir, socket, purge, grace.into(), json),
        Command::Daemon(args) => crate::daemon_cli::run(*args),
        Command::BatchHook {
            phase,
            config,
            socket,
            deadline,
        } => {
            crate::batch::hook_main(phase, config.as_deref(), socket, deadline.map(Into::into));
            Ok(())
        }
        Command::Demo(args) => crate::demo::run(args),
        Command::Doctor {
            coordinator,
            coordinator_fingerprint,
            json,
        } => doctor(coordinator, coordinator_fingerprint, json),
    }
}

/// `--set KEY=VALUE` and `--unset KEY` as the JSON object the daemon takes. A value is read as
/// TOML (numbers, booleans, "strings", arrays, inline tables), else taken as a bare string.
fn limit_changes(
    set: &[String],
    unset: &[String],
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut changes = serde_json::Map::new();
    for kv in set {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--set {kv:?}: write KEY=VALUE, e.g. cores=2"))?;
        let (k, v) = (k.trim(), v.trim());
        let value = match format!("v = {v}").parse::<toml::Table>() {
            Ok(mut t) => t.remove("v").map(serde_json::to_value).transpose()?,
            Err(_) => None,
        }
        .unwrap_or_else(|| serde_json::Value::String(v.to_owned()));
        changes.insert(k.to_owned(), value);
    }
    for k in unset {
        changes.insert(k.trim().to_owned(), serde_json::Value::Null);
    }
    Ok(changes)
}

fn config_check(file: Option<PathBuf>) -> Result<()> {
    let file = file.unwrap_or_else(crate::config::default_path);
    let args = DaemonArgs {
        config: Some(file.clone()),
        ..DaemonArgs::for_check()
    };
    let s = crate::daemon_cli::settings(&args, crate::config::HostSize::here())?;
    let p = &s.daemon.policy;
    let mib = |b: u64| b >> 20;
    println!("{}: valid", file.display());
    println!(
        "  owner away:    {:.2} cores, {} MiB",
        p.away.cores,
        mib(p.away.memory_bytes)
    );
    match &p.present {
        Some(l) => println!(
            "  owner present: {:.2} cores, {} MiB",
            l.cores,
            mib(l.memory_bytes)
        ),
        None => println!("  owner present: frozen"),
    }
    println!("  idle after:    {} s", p.idle_after_s);
    println!(
        "  on battery:    {}",
        if p.run_on_battery { "run" } else { "frozen" }
    );
    if !p.schedule.is_empty() {
        println!("  schedule:      {} window(s)", p.schedule.len());
    }
    if !p.exclusive_apps.is_empty() {
        println!("  exclusive:     {}", p.exclusive_apps.join(", "));
    }
    println!("  space:         {}", s.daemon.space);
    println!("  trusted:       {} publisher(s)", s.daemon.trusted.len());
    if let Some(b) = &s.daemon.batch {
        println!(
            "  batch system:  {:?}, {:?} mode, node {}",
            b.system, b.mode, b.node
        );
    }
    Ok(())
}

fn cleanup(
    state_dir: Option<PathBuf>,
    socket: Option<PathBuf>,
    purge: bool,
    grace: std::time::Duration,
    json: bool,
) -> Result<()> {
    let state_dir = state_dir.unwrap_or_else(crate::daemon_cli::default_state_dir);
    let socket = socket.unwrap_or_else(control::default_socket);
    let rt = runtime()?;
    rt.block_on(async {
        if control::ControlClient::connect(&socket).await.is_ok() {
            anyhow::bail!(
                "the daemon is running (it answers on {}); stop it first, e.g. \
                 `systemctl stop gleaner`",
                socket.display()
            );
        }
        let mut report = crate::cleanup::Report::default();
        let key_path = crate::daemon::host_key_path(&state_dir);
        if key_path.exists() {
            let key = keys::read(&key_path)?;
            // Both engines: containers and VMs this host owns.
            let engines =
                crate::runtime::backends::connect(&crate::runtime::backends::ConnectOptions::new(
                    &key.public().to_string(),
                    state_dir.clone(),
                    0,
                ))
                .await;
            if engines.containers().is_none() {
                report.failed.push("docker: not reachable".into());
            }
            crate::cleanup::remove_machines(&engines, grace, &mut report).await;
            crate::cleanup::remove_strays(&engines, &mut report).await;
        }
        crate::cleanup::clean_state(&state_dir, purge, &mut report)
            .with_context(|| format!("cannot delete under {}", state_dir.display()))?;
        if json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            println!(
                "removed {} machine(s); deleted {} folder(s){}",
                report.removed.len(),
                report.deleted.len(),
                if report.kept.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; kept {}",
                        report
                            .kept
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            );
            for f in &report.failed {
                eprintln!("gleaner: could not clean up {f}");
            }
        }
        if report.failed.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("{} item(s) could not be cleaned up", report.failed.len())
        }
    })
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
    let op = req.clone();
    let value = runtime()?.block_on(async {
        let mut c = connect(r).await?;
        c.call(&req).await
    })?;
    if r.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!("{}", crate::render::render(&op, &value));
    }
    Ok(())
}

/// Connects as `r` says: the Unix socket, or loopback TCP with the token file's token.
async fn connect(r: &RemoteArgs) -> Result<control::ControlClient, control::ControlError> {
    let tcp = match (r.tcp, std::env::var("GLEANER_TCP")) {
        (Some(a), _) => Some(a),
        (None, Ok(s)) if !s.trim().is_empty() => Some(s.trim().parse().map_err(|_| {
            control::ControlError::Refused(format!(
                "GLEANER_TCP={s:?} is not an address with a port, such as 127.0.0.1:7878"
            ))
        })?),
        _ => None,
    };
    match tcp {
        Some(addr) => {
            let file = r
                .token_file
                .clone()
                .or_else(|| std::env::var_os("GLEANER_TOKEN_FILE").map(PathBuf::from))
                .unwrap_or_else(|| control::token_path(&crate::daemon_cli::default_state_dir()));
            control::ControlClient::connect_tcp(addr, control::read_token(&file)?).await
        }
        None => {
            let socket = r.socket.clone().unwrap_or_else(control::default_socket);
            control::ControlClient::connect(&socket).await
        }
    }
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
        KeyCommand::Rotate { old, new, out } => {
            let (old, new) = (keys::read(&old)?, keys::read(&new)?);
            let m = gleaner::trust::KeyRotation {
                v: gleaner::trust::TRUST_VERSION,
                old: old.public(),
                new: new.public(),
                at: now(),
            };
            let bytes = gleaner::Envelope::seal(&m, &old).to_bytes();
            gleaner::Envelope::open_bytes::<gleaner::trust::KeyRotation>(&bytes)
                .map_err(|e| Refused(e.to_string()))?;
            let out = out.unwrap_or_else(|| PathBuf::from("rotation.gkr"));
            std::fs::write(&out, &bytes)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!(
                "wrote {}: {} replaced by {}",
                out.display(),
                old.public(),
                new.public()
            );
        }
        KeyCommand::Revoke { file, reason, out } => {
            let key = keys::read(&file)?;
            let m = gleaner::trust::Revocation {
                v: gleaner::trust::TRUST_VERSION,
                key: key.public(),
                at: now(),
                reason,
            };
            let bytes = gleaner::Envelope::seal(&m, &key).to_bytes();
            gleaner::Envelope::open_bytes::<gleaner::trust::Revocation>(&bytes)
                .map_err(|e| Refused(e.to_string()))?;
            let out = out.unwrap_or_else(|| PathBuf::from("revocation.grv"));
            std::fs::write(&out, &bytes)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!("wrote {}: {} revoked", out.display(), key.public());
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

// ---- gleaner trust / gleaner benchmark ----

/// Sends one request and returns the answer (for commands that print their own way).
fn call(r: &RemoteArgs, req: Request) -> Result<serde_json::Value> {
    let v = runtime()?.block_on(async {
        let mut c = connect(r).await?;
        c.call(&req).await
    });
    match v {
        Err(control::ControlError::Refused(m)) => Err(Refused(m).into()),
        other => Ok(other?),
    }
}

fn policy_line(p: &serde_json::Value) -> String {
    format!(
        "share {}, vms {}, egress {}, max cores {}",
        p["share"],
        if p["allow_vms"] == true { "yes" } else { "no" },
        if p["allow_egress"] == true {
            "yes"
        } else {
            "no"
        },
        p["max_cores"]
            .as_u64()
            .map_or("-".into(), |c| c.to_string())
    )
}

fn trust(cmd: TrustCommand) -> Result<()> {
    match cmd {
        TrustCommand::Add {
            id,
            from,
            share,
            allow_vms,
            allow_egress,
            max_cores,
            remote: r,
        } => {
            let machine_type_hex = match &from {
                Some(f) => Some(hex::encode(read_file(f)?)),
                None => None,
            };
            let v = call(
                &r,
                Request::Trust {
                    publisher: id,
                    machine_type_hex,
                    share,
                    allow_vms: allow_vms.then_some(true),
                    allow_egress: allow_egress.then_some(true),
                    max_cores,
                },
            )?;
            if r.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let t = &v["machine_type"];
            if t.is_object() {
                println!(
                    "machine type {} v{} ({}, {}-{} cores, {} MiB, egress {})",
                    t["name"].as_str().unwrap_or("?"),
                    t["version"],
                    t["backend"].as_str().unwrap_or("?"),
                    t["cores_min"],
                    t["cores_max"],
                    t["memory_mib"],
                    t["egress"]
                );
                println!("  digest     {}", t["digest"].as_str().unwrap_or("?"));
                if t["expired"] == true {
                    println!("  warning: this machine type has expired");
                }
            }
            println!("trusted {}", v["publisher"].as_str().unwrap_or("?"));
            if let Some(old) = v["rotated_from"].as_str() {
                println!("  (the key {old} was rotated to it)");
            }
            println!("  {}", policy_line(&v["policy"]));
            if let Some(verdict) = v["machine_type_verdict"].as_str() {
                println!("  this machine type: {verdict}");
            }
        }
        TrustCommand::Remove { id, remote: r } => {
            let v = call(&r, Request::Untrust { publisher: id })?;
            if r.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let who = v["publisher"].as_str().unwrap_or("?");
            if v["was_trusted"] == true {
                println!("no longer trusted: {who}");
            } else {
                println!("{who} was not trusted; nothing changed");
            }
            let withdrawn = v["withdrawn"].as_array().map(Vec::len).unwrap_or(0);
            if withdrawn > 0 {
                println!(
                    "withdrew {withdrawn} machine type(s); running machines: {}",
                    v["running"].as_str().unwrap_or("")
                );
            }
        }
        TrustCommand::List(r) => {
            let v = call(&r, Request::Trusted)?;
            if r.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let empty = Vec::new();
            let list = v["trusted"].as_array().unwrap_or(&empty);
            if list.is_empty() {
                println!("no publisher is trusted: nothing will run");
            }
            for t in list {
                println!(
                    "{}  [{}]  {}",
                    t["id"].as_str().unwrap_or("?"),
                    t["source"].as_str().unwrap_or("?"),
                    policy_line(t)
                );
                for old in t["rotated_from"].as_array().unwrap_or(&empty) {
                    println!("    rotated from {}", old.as_str().unwrap_or("?"));
                }
            }
            for k in v["removed"].as_array().unwrap_or(&empty) {
                println!(
                    "removed here (settings baseline): {}",
                    k.as_str().unwrap_or("?")
                );
            }
            for k in v["revoked"].as_array().unwrap_or(&empty) {
                println!(
                    "revoked: {} ({})",
                    k["id"].as_str().unwrap_or("?"),
                    k["reason"].as_str().unwrap_or("")
                );
            }
        }
    }
    Ok(())
}

fn benchmark(runs: u32, json: bool) -> Result<()> {
    let runs = runs.clamp(1, 100);
    let mut scores = Vec::new();
    for i in 0..runs {
        let r = crate::hostbench::measure();
        if !json {
            println!(
                "run {:>2}: {:>5}  (integer {:>5}, float {:>5})",
                i + 1,
                r.score,
                r.integer,
                r.float
            );
        }
        scores.push(r.score);
    }
    let s = crate::hostbench::Spread::of(&scores);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"scores": scores, "spread": s}))?
        );
    } else {
        println!(
            "mean {:.0}, min {}, max {}, stddev {:.1} ({:.2} % of the mean), max-min {:.2} %",
            s.mean, s.min, s.max, s.stddev, s.stddev_pct, s.range_pct
        );
    }
    Ok(())
}
