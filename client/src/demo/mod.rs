//! `gleaner demo`: a whole local space on embedded defaults — a coordinator (SQLite, self-signed
//! TLS), a publisher key and a signed machine type whose payload does real computation with a
//! heartbeat, and several client daemons on loopback that run it, sign usage records and deliver
//! them — with progress printed until credit shows on the dashboard. When libvirtd answers, a
//! second project publishes a VM machine type (a Debian cloud kernel and a busybox initramfs, the
//! same as the tests' VM) running the same payload, and the first client runs it beside the
//! containers. Ctrl-C stops it all and leaves nothing behind.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use gleaner::{Backend, Blob, Digest, Envelope, MachineType, SecretKey};

use crate::control::{ControlClient, Request};
use crate::runtime::Runtime;

/// Settings of `gleaner demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Working folder (state of every part; removed at the end unless --keep)
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// How many client daemons
    #[arg(long, default_value_t = 3)]
    pub clients: usize,
    /// Seconds of computation per machine
    #[arg(long, default_value_t = 20)]
    pub work_seconds: u32,
    /// Coordinator port on 127.0.0.1 [default: a free one]
    #[arg(long)]
    pub port: Option<u16>,
    /// Stop by itself once every client's credit is on the dashboard (for scripts and tests)
    #[arg(long)]
    pub until_credit: bool,
    /// Stop by itself after this many seconds
    #[arg(long)]
    pub duration: Option<u64>,
    /// Keep the working folder afterwards
    #[arg(long)]
    pub keep: bool,
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn terminate(&mut self, grace: Duration) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("  {} did not stop in {grace:?}; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(30));
    }
}

fn sibling_binary(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe().context("cannot find the gleaner binary's folder")?;
    let path = me.with_file_name(name);
    if path.exists() {
        Ok(path)
    } else {
        bail!(
            "{} is missing next to {}: build the workspace first (cargo build --workspace)",
            name,
            me.display()
        )
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(l.local_addr()?.port())
}

const PAYLOAD: &str = include_str!("payload.sh");

/// The demo's container machine type: SHA-256 hashing with a heartbeat, on a busybox image.
fn machine_type(
    publisher: &SecretKey,
    image: &Path,
    sha256: Digest,
    work_seconds: u32,
    now: u64,
) -> MachineType {
    let mut mt = MachineType::example(publisher.public());
    mt.name = "demo-hashing".into();
    mt.description = "Gleaner demo: SHA-256 over chunks of data, with a heartbeat".into();
    mt.backend = Backend::Container;
    mt.image = Some(Blob {
        url: format!("file://{}", image.display()),
        sha256,
    });
    mt.user_data = PAYLOAD.replace("##user_data_work_seconds##", &work_seconds.to_string());
    mt.cores_min = 1;
    mt.cores_max = 1;
    mt.memory_mib = 128;
    mt.disk_mib = 128;
    mt.max_wallclock_s = work_seconds * 4 + 60;
    mt.heartbeat_s = 60;
    mt.fizzle_s = (work_seconds / 4).min(10);
    mt.backoff_s = 60;
    mt.not_after = now + 7 * 86_400;
    mt
}

struct Client {
    name: String,
    socket: PathBuf,
    host: String,
    _proc: Proc,
}

/// The VM project's machine type: the same payload in a VM booted straight into its initramfs.
fn vm_machine_type(
    publisher: &SecretKey,
    kernel: (&Path, Digest),
    initrd: (&Path, Digest),
    work_seconds: u32,
    now: u64,
) -> MachineType {
    let blob = |(p, sha256): (&Path, Digest)| Blob {
        url: format!("file://{}", p.display()),
        sha256,
    };
    let mut mt = MachineType::example(publisher.public());
    mt.name = "demo-vm-hashing".into();
    mt.description = "Gleaner demo: SHA-256 over chunks of data in a VM, with a heartbeat".into();
    mt.backend = Backend::Vm;
    mt.image = None;
    mt.kernel = Some(blob(kernel));
    mt.initrd = Some(blob(initrd));
    mt.user_data = PAYLOAD.replace("##user_data_work_seconds##", &work_seconds.to_string());
    mt.cores_min = 1;
    mt.cores_max = 1;
    mt.memory_mib = 256;
    mt.disk_mib = 64;
    // Booting under TCG takes seconds of the wallclock.
    mt.max_wallclock_s = work_seconds * 4 + 120;
    mt.heartbeat_s = 90;
    mt.fizzle_s = (work_seconds / 4).min(10);
    mt.backoff_s = 60;
    mt.not_after = now + 7 * 86_400;
    mt
}

const VM_ASSETS_SCRIPT: &str = include_str!("../../tests/assets/build-vm-assets.sh");
const VM_GUEST_INIT: &str = include_str!("../../tests/assets/vm-guest-init.sh");

/// The VM's kernel and initramfs: those the tests built (`target/tmp/test-assets/vm` beside this
/// binary) or `$GLEANER_VM_ASSETS`, else built the same way into the user's cache.
fn vm_assets(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let has = |d: &Path| d.join("vmlinuz").is_file() && d.join("initrd.img").is_file();
    let mut candidates = Vec::new();
    if let Some(d) = std::env::var_os("GLEANER_VM_ASSETS") {
        candidates.push(PathBuf::from(d));
    }
    if let Some(target) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent()?.parent().map(Path::to_path_buf))
    {
        candidates.push(target.join("tmp/test-assets/vm"));
    }
    if let Some(d) = candidates.iter().find(|d| has(d)) {
        return Ok((d.join("vmlinuz"), d.join("initrd.img")));
    }
    let out = directories::ProjectDirs::from("org", "gleaner", "gleaner")
        .map(|p| p.cache_dir().join("demo-vm"))
        .unwrap_or_else(|| dir.join("vm-assets"));
    let scripts = dir.join("vm-build");
    std::fs::create_dir_all(&scripts)?;
    std::fs::write(scripts.join("build-vm-assets.sh"), VM_ASSETS_SCRIPT)?;
    std::fs::write(scripts.join("vm-guest-init.sh"), VM_GUEST_INIT)?;
    println!(
        "    building the VM (a Debian cloud kernel + busybox initramfs) into {}",
        out.display()
    );
    let st = Command::new("bash")
        .arg(scripts.join("build-vm-assets.sh"))
        .arg(&out)
        .status()
        .context("cannot run bash")?;
    let _ = std::fs::remove_dir_all(&scripts);
    if !st.success() || !has(&out) {
        bail!("building the VM failed (needs apt lists, dpkg-deb, cpio and busybox-static)");
    }
    Ok((out.join("vmlinuz"), out.join("initrd.img")))
}

/// The VM project, when this host can run VMs: libvirtd answers and the VM can be had.
async fn vm_project(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    step("checking the VM engine");
    let cfg =
        crate::runtime::vmhost::LibvirtConfig::new("gleaner-demo-probe", dir.join("probe-vms"));
    let probe = match crate::runtime::vmhost::find_helper() {
        Ok(helper) => match crate::runtime::vmhost::VmHostRuntime::connect(cfg, helper).await {
            Ok(rt) => rt.probe().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        },
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_dir_all(dir.join("probe-vms"));
    match probe {
        Ok(p) => println!(
            "    {}, VMs under {}",
            p.version,
            if p.kvm_usable { "KVM" } else { "TCG" }
        ),
        Err(e) => {
            println!("    no VMs in this demo ({e}); containers only");
            return None;
        }
    }
    match vm_assets(dir) {
        Ok(a) => Some(a),
        Err(e) => {
            println!("    no VMs in this demo ({e:#}); containers only");
            None
        }
    }
}

/// Runs the demo.
pub fn run(args: DemoArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("gleaner-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let result = rt.block_on(run_in(&args, &dir));
    if !args.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn step(msg: &str) {
    println!("==> {msg}");
}

/// What the demo has started so far: stopped at the end, whether start-up finished, failed or
/// was interrupted.
#[derive(Default)]
struct Parts {
    /// The demo's own connection to Docker Engine, to check that nothing is left in it.
    probe: Option<crate::runtime::docker::DockerRuntime>,
    /// Whether the VM project runs (so libvirt is checked too).
    vms: bool,
    coordinator: Option<Proc>,
    clients: Vec<Client>,
}

/// A local space that came up: its coordinator, and the project whose credit must show too.
struct Started {
    api: crate::coordinator_client::HttpUploader,
    base: String,
    /// A project whose credit must show too before `--until-credit` ends (the VM project).
    want_project: Option<&'static str>,
}

async fn run_in(args: &DemoArgs, dir: &Path) -> Result<()> {
    // Listening from the start: Ctrl-C while images are built or the coordinator and daemons
    // start stops what has started and removes the folder, as it does once the demo is watching.
    let mut ctrl_c = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("listening for Ctrl-C")?;
    let mut parts = Parts::default();
    let started = tokio::select! {
        s = start(args, dir, &mut parts) => s.map(Some),
        _ = ctrl_c.recv() => {
            println!();
            println!("  interrupted while starting");
            Ok(None)
        }
    };
    let result = match started {
        Ok(Some(s)) => {
            let ended = watch(
                args,
                &parts.clients,
                &s.api,
                &s.base,
                s.want_project,
                &mut ctrl_c,
            )
            .await;
            // Not after Ctrl-C: the terminal sent it to the daemons too, and they are stopping.
            if matches!(ended, Ok(Ended::Done)) {
                report_space(&parts.clients, &s.api, &s.base).await;
            }
            ended.map(|_| ())
        }
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    stop(parts, dir).await;
    result
}

/// Brings the local space up, keeping each part in `parts` as it starts.
async fn start(args: &DemoArgs, dir: &Path, parts: &mut Parts) -> Result<Started> {
    let now = crate::factory::now_ms() / 1000;
    step("checking the container engine");
    let probe_rt = crate::runtime::docker::DockerRuntime::connect(
        "gleaner-demo-probe",
        dir.join("probe-cache"),
        1 << 20,
    )
    .await
    .context("Docker Engine is not reachable; run: bash installers/install-deps.sh --start")?;
    let probe = probe_rt.probe().await?;
    println!(
        "    Docker Engine {}, cgroup v{}",
        probe.version, probe.cgroup_version
    );
    parts.probe = Some(probe_rt);

    let vm = vm_project(dir).await;
    parts.vms = vm.is_some();

    step("starting the coordinator (SQLite, self-signed TLS)");
    let coord_bin = sibling_binary("gleaner-coordinator")?;
    let port = match args.port {
        Some(p) => p,
        None => free_port()?,
    };
    let cdir = dir.join("coordinator");
    // The first daemon listens on a known port; the others, and the coordinator (which shows the
    // space's live capacity on its dashboard), join the space through it.
    let space_port = free_port()?;
    let first = format!("/ip4/127.0.0.1/tcp/{space_port}");
    let mut tokens = Vec::new();
    for i in 1..=args.clients {
        let token = format!("demo-token-{i}");
        let out = Command::new(&coord_bin)
            .arg("--data-dir")
            .arg(&cdir)
            .args([
                "account",
                "add",
                &format!("volunteer-{i}"),
                "--team",
                "demo",
                "--token",
                &token,
            ])
            .output()
            .context("cannot run gleaner-coordinator")?;
        if !out.status.success() {
            bail!(
                "gleaner-coordinator account add: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tokens.push(token);
    }
    let mut child = Command::new(&coord_bin)
        .arg("--data-dir")
        .arg(&cdir)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--space", "demo", "--space-bootstrap", &first])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start gleaner-coordinator")?;
    let stdout = child.stdout.take().context("no coordinator output")?;
    parts.coordinator = Some(Proc {
        name: "coordinator".into(),
        child,
    });
    let mut fingerprint = None;
    for line in BufReader::new(stdout).lines().take(5) {
        let line = line?;
        if let Some(f) = line.strip_prefix("fingerprint ") {
            fingerprint = Some(f.trim().to_owned());
            break;
        }
    }
    let fingerprint = fingerprint.context("the coordinator did not print its fingerprint")?;
    let pin: Digest = fingerprint.parse()?;
    let base = format!("https://127.0.0.1:{port}");
    let api = crate::coordinator_client::HttpUploader::new(
        &base,
        Some(pin),
        SecretKey::from_seed([0; 32]),
    )
    .map_err(anyhow::Error::msg)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while api
        .http()
        .get(format!("{base}/healthz"))
        .send()
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("the coordinator did not answer on {base}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("    {base}  (certificate sha256 {fingerprint})");

    step("publishing a signed machine type");
    let publisher = crate::keys::generate()?;
    crate::keys::write(&dir.join("publisher.key"), &publisher, true)?;
    let image_bytes =
        crate::image_archive::busybox_image(Path::new("/bin/busybox"), "gleaner/demo-busybox:1")
            .context("building the demo image needs busybox-static (installers/install-deps.sh)")?;
    let image_sha = Digest::of(&image_bytes);
    let image = dir.join("images/busybox.tar");
    std::fs::create_dir_all(image.parent().unwrap_or(dir))?;
    crate::image_archive::write_atomic(&image, &image_bytes)?;
    let mt = machine_type(&publisher, &image, image_sha, args.work_seconds, now);
    let signed = Envelope::seal(&mt, &publisher).to_bytes();
    let types = dir.join("machine-types");
    std::fs::create_dir_all(&types)?;
    std::fs::write(types.join("demo-hashing.gmt"), &signed)?;
    api.register_machine_type(&signed)
        .await
        .map_err(anyhow::Error::msg)?;
    println!(
        "    {} v{} by {} (image sha256 {image_sha})",
        mt.name,
        mt.version,
        publisher.public()
    );
    // The VM type comes from a second project, so the dashboard shows its credit apart.
    let vm_publisher = match &vm {
        Some((kernel, initrd)) => {
            let vp = crate::keys::generate()?;
            let sha = |p: &Path| -> Result<Digest> {
                Ok(Digest::of(
                    &std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
                ))
            };
            let vmt = vm_machine_type(
                &vp,
                (kernel, sha(kernel)?),
                (initrd, sha(initrd)?),
                args.work_seconds,
                now,
            );
            let signed = Envelope::seal(&vmt, &vp).to_bytes();
            std::fs::write(types.join("demo-vm-hashing.gmt"), &signed)?;
            api.register_machine_type(&signed)
                .await
                .map_err(anyhow::Error::msg)?;
            println!(
                "    {} v{} by {} (kernel {})",
                vmt.name,
                vmt.version,
                vp.public(),
                kernel.display()
            );
            Some(vp.public().to_string())
        }
        None => None,
    };

    step(&format!("starting {} client daemons", args.clients));
    let gleaner = std::env::current_exe()?;
    for (i, token) in tokens.iter().enumerate() {
        let name = format!("client-{}", i + 1);
        let state = dir.join(&name);
        std::fs::create_dir_all(&state)?;
        let socket = state.join("control.sock");
        let log = std::fs::File::create(state.join("daemon.log"))?;
        // A settings file of the demo's own, so that an installed host's /etc/gleaner/client.toml
        // (its trust, its limits) does not leak into the demo.
        let settings = state.join("client.toml");
        std::fs::write(
            &settings,
            "# gleaner demo: everything is on the command line\n",
        )?;
        let child = Command::new(&gleaner)
            .arg("daemon")
            .arg("--config")
            .arg(&settings)
            .arg("--state-dir")
            .arg(&state)
            .arg("--socket")
            .arg(&socket)
            .arg("--machine-types")
            .arg(&types)
            .args(["--trust", &publisher.public().to_string()])
            // The first client also runs the VM project's type, on a second core.
            .args(match (&vm_publisher, i) {
                (Some(vp), 0) => vec!["--trust".to_string(), format!("{vp},allow-vms")],
                _ => vec![],
            })
            .args([
                "--cores",
                if vm_publisher.is_some() && i == 0 {
                    "2"
                } else {
                    "1"
                },
                "--memory",
                "1GiB",
                "--stop-grace",
                "5",
                "--space",
                "demo",
                "--preset",
                "always-gently",
            ])
            .args([
                "--coordinator",
                &base,
                "--coordinator-fingerprint",
                &fingerprint,
            ])
            .args(["--enrol", &format!("volunteer-{}:{token}", i + 1)])
            .args(["--no-mdns", "--listen"])
            .arg(if i == 0 {
                first.clone()
            } else {
                "/ip4/127.0.0.1/tcp/0".to_string()
            })
            .args(if i == 0 {
                vec![]
            } else {
                vec!["--bootstrap".to_string(), first.clone()]
            })
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start gleaner daemon")?;
        parts.clients.push(Client {
            name,
            socket,
            host: String::new(),
            _proc: Proc {
                name: format!("client-{}", i + 1),
                child,
            },
        });
    }
    for c in &mut parts.clients {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut cc) = ControlClient::connect(&c.socket).await
                && let Ok(s) = cc.call(&Request::Status).await
            {
                c.host = s["host"].as_str().unwrap_or("").to_owned();
                println!("    {} host {}", c.name, c.host);
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not start; see {}",
                    c.name,
                    c.socket.with_file_name("daemon.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    println!();
    println!("Dashboard: {base}/   (self-signed certificate, sha256 {fingerprint})");
    println!("Space:     {base}/space   (live capacity the factories advertise)");
    println!("Press Ctrl-C to stop everything.");
    println!();
    Ok(Started {
        api,
        base,
        want_project: vm.as_ref().map(|_| "demo-vm-hashing"),
    })
}

/// Stops what the demo started, and checks that the engines hold none of its clients' machines.
async fn stop(parts: Parts, dir: &Path) {
    let Parts {
        probe,
        vms,
        coordinator,
        clients,
    } = parts;
    // Only this demo's hosts: other Gleaner users of the same engine are not ours to judge. A
    // daemon stopped before it answered is known by its key (its machines' owner label); one
    // without a key file had started none.
    let hosts: Vec<String> = clients
        .iter()
        .filter_map(|c| {
            if !c.host.is_empty() {
                return Some(c.host.clone());
            }
            let state = c.socket.parent()?;
            let key = crate::daemon::host_key_path(state);
            let key = crate::keys::read(&key).ok()?;
            Some(key.public().to_string())
        })
        .collect();
    if !clients.is_empty() {
        step("stopping the clients (their machines are stopped and accounted for)");
        drop(clients);
    }
    if let Some(c) = coordinator {
        step("stopping the coordinator");
        drop(c);
    }
    let Some(probe_rt) = probe else {
        return;
    };
    let mut left = 0;
    for host in &hosts {
        left += probe_rt
            .docker()
            .list_containers(Some(
                bollard::query_parameters::ListContainersOptionsBuilder::default()
                    .all(true)
                    .filters(&std::collections::HashMap::from([(
                        "label".to_string(),
                        vec![format!("{}={host}", crate::runtime::OWNER_LABEL)],
                    )]))
                    .build(),
            ))
            .await
            .map(|l| l.len())
            .unwrap_or(0);
    }
    if vms {
        for host in &hosts {
            let cfg = crate::runtime::vmhost::LibvirtConfig::new(host, dir.join("probe-vms"));
            if let Ok(helper) = crate::runtime::vmhost::find_helper()
                && let Ok(rt) = crate::runtime::vmhost::VmHostRuntime::connect(cfg, helper).await
            {
                left += rt.list_owned().await.map(|l| l.len()).unwrap_or(0);
            }
            let _ = std::fs::remove_dir_all(dir.join("probe-vms"));
        }
    }
    if left > 0 {
        println!("    warning: {left} Gleaner machines are still in the engines");
    } else {
        println!("    nothing left behind");
    }
}

/// The daemons found each other over libp2p: waits (briefly) until the first sees them all, and
/// the coordinator's dashboard too, and says what each shows.
async fn report_space(
    clients: &[Client],
    api: &crate::coordinator_client::HttpUploader,
    base: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let seen = match ControlClient::connect(&clients[0].socket).await {
            Ok(mut cc) => cc.call(&Request::Space).await.ok(),
            Err(_) => None,
        };
        let n = seen
            .as_ref()
            .and_then(|v| v["peers"].as_array().map(Vec::len))
            .unwrap_or(0);
        // The coordinator joined the space too: its dashboard shows the same factories.
        let on_dashboard = match api.http().get(format!("{base}/api/space")).send().await {
            Ok(r) => r
                .text()
                .await
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok()),
            Err(_) => None,
        }
        .and_then(|v| v["totals"]["peers"].as_u64())
        .unwrap_or(0);
        if (n >= clients.len() && on_dashboard >= clients.len() as u64) || Instant::now() > deadline
        {
            println!(
                "space: {} sees {n} factories in the space \"demo\"; the dashboard's space page shows {on_dashboard}",
                clients[0].name
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How watching the local space ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// Credit came (`--until-credit`) or `--duration` passed.
    Done,
    /// Ctrl-C.
    Interrupted,
}

async fn watch(
    args: &DemoArgs,
    clients: &[Client],
    api: &crate::coordinator_client::HttpUploader,
    base: &str,
    // A project whose credit must show too before `--until-credit` ends (the VM project).
    want_project: Option<&str>,
    ctrl_c: &mut tokio::signal::unix::Signal,
) -> Result<Ended> {
    let started = Instant::now();
    let mut last_lines: Vec<String> = vec![String::new(); clients.len()];
    let mut last_total = String::new();
    loop {
        for (i, c) in clients.iter().enumerate() {
            let line = match ControlClient::connect(&c.socket).await {
                Ok(mut cc) => match cc.call(&Request::Status).await {
                    Ok(s) => {
                        let machines = s["factory"]["machines"]
                            .as_array()
                            .map(Vec::len)
                            .unwrap_or(0);
                        let cpu: f64 = s["factory"]["machines"]
                            .as_array()
                            .map(|a| {
                                a.iter()
                                    .filter_map(|m| m["cpu_seconds"].as_f64())
                                    .sum::<f64>()
                                    .max(0.0)
                            })
                            .unwrap_or(0.0);
                        format!(
                            "{}: {} running (cpu {:.0} s), {} records delivered, {} waiting",
                            c.name, machines, cpu, s["ledger"]["delivered"], s["ledger"]["pending"]
                        )
                    }
                    Err(e) => format!("{}: {e}", c.name),
                },
                Err(e) => format!("{}: {e}", c.name),
            };
            if line != last_lines[i] {
                println!("  [{:>4}s] {line}", started.elapsed().as_secs());
                last_lines[i] = line;
            }
        }
        let stats: Option<serde_json::Value> =
            match api.http().get(format!("{base}/api/v1/stats")).send().await {
                Ok(r) => r
                    .text()
                    .await
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok()),
                Err(_) => None,
            };
        let mut credited = 0;
        let mut projects = Vec::new();
        if let Some(s) = &stats {
            credited = s["volunteers"].as_array().map(Vec::len).unwrap_or(0);
            projects = s["projects"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|p| {
                            Some((p["key"].as_str()?.to_owned(), p["credit"].as_f64()?))
                        })
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            let by_project = projects
                .iter()
                .map(|(k, c)| format!("{k} {c:.2}"))
                .collect::<Vec<_>>()
                .join(", ");
            let total = format!(
                "dashboard: {:.2} credit from {} volunteers, {} records ({by_project})",
                s["total_credit"].as_f64().unwrap_or(0.0),
                credited,
                s["records"]
            );
            if total != last_total {
                println!("  [{:>4}s] {total}", started.elapsed().as_secs());
                last_total = total;
            }
        }
        let project_done = want_project.is_none_or(|w| projects.iter().any(|(k, _)| k == w));
        if args.until_credit && credited >= clients.len() && project_done {
            if let Some(w) = want_project {
                println!("  the VM project's credit ({w}) is on the dashboard");
            }
            println!("  every client's credit is on the dashboard");
            return Ok(Ended::Done);
        }
        if args
            .duration
            .is_some_and(|d| started.elapsed() >= Duration::from_secs(d))
        {
            return Ok(Ended::Done);
        }
        tokio::select! {
            _ = ctrl_c.recv() => {
                println!();
                println!("  interrupted");
                return Ok(Ended::Interrupted);
            }
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
