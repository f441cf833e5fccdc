//! Shared helpers for the client's real-engine tests: a busybox image pinned by sha256, signed
//! machine types, a factory on the real Docker Engine, and polling with deadlines.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gleaner::{Backend, Blob, Digest, Envelope, MachineType, SecretKey};
use gleaner_client::factory::{Allowance, Factory, FactoryConfig, FactoryHandle, Offer};
use gleaner_client::ledger::Ledger;
use gleaner_client::runtime::Runtime;
use gleaner_client::runtime::docker::DockerRuntime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The busybox image tarball (built once per test binary) and its sha256.
pub fn busybox_image() -> (PathBuf, Digest) {
    static IMG: std::sync::OnceLock<(PathBuf, Digest)> = std::sync::OnceLock::new();
    IMG.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-assets");
        std::fs::create_dir_all(&dir).unwrap();
        let bytes = gleaner_client::image_archive::busybox_image(
            Path::new("/bin/busybox"),
            "gleaner/test-busybox:1",
        )
        .expect("busybox-static is installed (installers/install-deps.sh)");
        let digest = Digest::of(&bytes);
        let path = dir.join(format!("busybox-{digest}.tar"));
        if !path.exists() {
            gleaner_client::image_archive::write_atomic(&path, &bytes).unwrap();
        }
        (path, digest)
    })
    .clone()
}

pub fn publisher() -> SecretKey {
    SecretKey::from_seed([0x51; 32])
}

/// A container machine type running `script` (as /user_data) on the busybox image.
pub fn machine_type(name: &str, script: &str) -> MachineType {
    let (path, digest) = busybox_image();
    let mut mt = MachineType::example(publisher().public());
    mt.name = name.into();
    mt.backend = Backend::Container;
    mt.image = Some(Blob {
        url: format!("file://{}", path.display()),
        sha256: digest,
    });
    mt.user_data = script.into();
    mt.cores_min = 1;
    mt.cores_max = 1;
    mt.memory_mib = 128;
    mt.disk_mib = 64;
    mt.not_after = 4_000_000_000;
    mt
}

/// The offer for a signed machine type.
pub fn offer(mt: &MachineType) -> Offer {
    let env = Envelope::seal(mt, &publisher());
    let v = env.open::<MachineType>().expect("valid machine type");
    Offer {
        machine_type: v.message,
        digest: v.digest,
        share: 1.0,
        max_cores: 4,
    }
}

/// A unique owner label per test, so tests sharing one dockerd never see each other's machines.
pub fn owner(test: &str) -> String {
    format!("test-{test}-{}", std::process::id())
}

pub async fn docker(owner: &str, state: &Path) -> DockerRuntime {
    DockerRuntime::connect(owner, state.join("cache"), 1 << 30)
        .await
        .expect("dockerd is running (installers/start-engines.sh)")
}

/// A running factory on the real Docker Engine.
pub struct TestFactory {
    pub handle: FactoryHandle,
    pub ledger: Arc<Ledger>,
    pub runtime: Arc<DockerRuntime>,
    pub cancel: CancellationToken,
    pub task: Option<tokio::task::JoinHandle<()>>,
    pub state: PathBuf,
    pub owner: String,
    pub allowance: watch::Sender<Allowance>,
    pub key: SecretKey,
}

pub async fn factory(
    owner: &str,
    state: &Path,
    tweak: impl FnOnce(&mut FactoryConfig),
) -> TestFactory {
    let runtime = Arc::new(docker(owner, state).await);
    let ledger = Arc::new(Ledger::open(&state.join("ledger.redb")).unwrap());
    let mut cfg = FactoryConfig::new(state.to_owned());
    cfg.tick = Duration::from_millis(200);
    cfg.stop_grace = Duration::from_secs(3);
    tweak(&mut cfg);
    let (tx, rx) = watch::channel(Allowance::open(2, 2 << 30));
    let key = SecretKey::from_seed([0x77; 32]);
    let mut f = Factory::new(cfg, runtime.clone(), ledger.clone(), key.clone(), rx);
    f.recover().await.unwrap();
    let cancel = CancellationToken::new();
    let (handle, task) = f.spawn(cancel.clone());
    TestFactory {
        handle,
        ledger,
        runtime,
        cancel,
        task: Some(task),
        state: state.to_owned(),
        owner: owner.to_owned(),
        allowance: tx,
        key,
    }
}

impl TestFactory {
    /// Stops the factory the way SIGTERM does (machines stopped and accounted for).
    pub async fn stop(&mut self) {
        self.cancel.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// Removes every container carrying `owner`'s label (a test that panicked leaves none behind).
pub fn remove_owned(owner: &str) {
    let out = std::process::Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=org.gleaner.owner={owner}"),
        ])
        .output();
    if let Ok(out) = out {
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        if !ids.is_empty() {
            let _ = std::process::Command::new("docker")
                .arg("rm")
                .arg("-f")
                .args(&ids)
                .output();
        }
    }
    // The daemon's guests' parent cgroup, which a killed daemon cannot remove (the engine's
    // shim may take a moment to drop the containers' own cgroups).
    let parent = gleaner_client::runtime::docker::cgroup_parent_name(owner);
    for _ in 0..20 {
        if gleaner_client::runtime::docker::cgroup_remove_parent(&parent) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

impl Drop for TestFactory {
    fn drop(&mut self) {
        self.cancel.cancel();
        remove_owned(&self.owner);
    }
}

/// Polls `f` every 100 ms until it returns Some, or panics after `secs` with `what`.
pub async fn eventually<T>(secs: u64, what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A guest that touches `/joboutputs/heartbeat` every half second until it is stopped.
pub const HEARTBEAT: &str = "while true; do touch /joboutputs/heartbeat; sleep 0.5; done";

/// Polls the daemon on `sock` until its factory runs exactly one machine, handing every status to
/// `check` (which may assert on it), and returns the daemon's host name (its machines' owner label).
pub async fn one_machine_host(
    sock: &Path,
    secs: u64,
    check: impl Fn(&serde_json::Value),
) -> String {
    use gleaner_client::control::{ControlClient, Request};
    eventually(secs, "the daemon running one machine", async || {
        let mut c = ControlClient::connect(sock).await.ok()?;
        let s = c.call(&Request::Status).await.ok()?;
        check(&s);
        (s["factory"]["machines"].as_array()?.len() == 1)
            .then(|| s["host"].as_str().map(str::to_owned))
            .flatten()
    })
    .await
}

/// The one machine `rt`'s owner has in the engine, once the engine says it runs.
pub async fn the_running_machine(rt: &DockerRuntime) -> gleaner_client::runtime::MachineHandle {
    use gleaner_client::runtime::{MachineHandle, MachineState};
    let owned = rt
        .list_owned()
        .await
        .expect("the engine lists our machines");
    assert_eq!(owned.len(), 1, "one machine: {owned:?}");
    let h = MachineHandle {
        engine_id: owned[0].engine_id.clone(),
        name: owned[0].name.clone(),
    };
    eventually(30, "the machine running", async || {
        (rt.state(&h).await.ok()? == MachineState::Running).then_some(())
    })
    .await;
    h
}

/// Asserts the engine holds no machine with this owner label.
pub async fn assert_nothing_left(rt: &DockerRuntime, state: &Path) {
    let owned = rt.list_owned().await.unwrap();
    assert!(owned.is_empty(), "left behind: {owned:?}");
    let machines = state.join("machines");
    if machines.exists() {
        let left: Vec<_> = std::fs::read_dir(&machines).unwrap().collect();
        assert!(left.is_empty(), "machine folders left behind: {left:?}");
    }
}

/// The daemon's status on `sock` (`gleaner status --json`), or None while it does not answer.
pub async fn status(sock: &Path) -> Option<serde_json::Value> {
    let mut c = gleaner_client::control::ControlClient::connect(sock)
        .await
        .ok()?;
    c.call(&gleaner_client::control::Request::Status).await.ok()
}

/// The messages of the factory's recent events, one per line (empty while the daemon is away).
pub async fn events_text(sock: &Path) -> String {
    let Some(s) = status(sock).await else {
        return String::new();
    };
    s["factory"]["events"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["message"].as_str())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// A `gleaner daemon` process, killed (SIGKILL) when dropped so no test leaves one behind.
pub struct Daemon(pub std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `gleaner daemon` alone (no space), on `state` with its socket inside, offering the signed
/// machine types in `types` from the test publisher, plus `extra` arguments. Unless `extra` says
/// otherwise, the owner is watched on X11 only (none here: away) and other programs' CPU load does
/// not freeze work, so that a busy test machine or a terminal in use does not change the outcome.
pub fn daemon_command(state: &Path, types: &Path, extra: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_gleaner"));
    c.args(["daemon", "--no-space", "--stop-grace", "2"])
        .arg("--state-dir")
        .arg(state)
        .arg("--socket")
        .arg(state.join("control.sock"))
        .arg("--machine-types")
        .arg(types)
        .args(["--trust", &publisher().public().to_string()])
        .args(extra)
        .env("RUST_LOG", "warn");
    if !extra.contains(&"--suspend-above-load") {
        c.args(["--suspend-above-load", "off"]);
    }
    if !extra.contains(&"--idle-sources") {
        c.args(["--idle-sources", "x11"]);
    }
    c
}

/// Starts a daemon as [`daemon_command`] describes.
pub fn spawn_daemon(state: &Path, types: &Path, extra: &[&str]) -> Daemon {
    Daemon(
        daemon_command(state, types, extra)
            .spawn()
            .expect("start gleaner daemon"),
    )
}

/// Signs `mt` with the test publisher into `types/<file>`.
pub fn write_type(types: &Path, file: &str, mt: &MachineType) {
    std::fs::create_dir_all(types).unwrap();
    std::fs::write(
        types.join(file),
        Envelope::seal(mt, &publisher()).to_bytes(),
    )
    .unwrap();
}

// ---- VMs: the factory over both engines, with the test VM (tests/assets/build-vm-assets.sh) ----

/// Whether this is CI, where the real-engine tests must run rather than skip.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

#[path = "../../benches/common/mod.rs"]
mod common;
/// The test VM's kernel and initramfs (built once from Debian packages, cached across runs).
pub use common::vm_assets;

/// A VM machine type (direct kernel boot of the test VM) whose guest runs `script` as user_data.
pub fn vm_machine_type(name: &str, script: &str) -> MachineType {
    let (kernel, initrd) = vm_assets();
    let blob = |p: &Path| Blob {
        url: format!("file://{}", p.display()),
        sha256: Digest::of(&std::fs::read(p).unwrap()),
    };
    let mut mt = MachineType::example(publisher().public());
    mt.name = name.into();
    mt.backend = Backend::Vm;
    mt.image = None;
    mt.kernel = Some(blob(&kernel));
    mt.initrd = Some(blob(&initrd));
    mt.user_data = script.into();
    mt.cores_min = 1;
    mt.cores_max = 1;
    mt.memory_mib = 256;
    mt.disk_mib = 64;
    // TCG boots take seconds; nothing here tests fizzles.
    mt.fizzle_s = 0;
    mt.heartbeat_s = 120;
    mt.not_after = 4_000_000_000;
    mt
}

/// The VM helper the daemon starts (`target/<profile>/gleaner-vmhost`, found as the daemon finds
/// it): `cargo test --workspace` builds it; a client test run alone needs `cargo build -p
/// gleaner-vmhost` first, and says so.
pub fn vmhost_bin() -> PathBuf {
    gleaner_client::runtime::vmhost::find_helper().unwrap_or_else(|e| panic!("{e}"))
}

/// The daemon's runtime (Docker and libvirt) for `owner`, or `None` (skip) when libvirtd is
/// unreachable outside CI. `state` is made traversable for the QEMU user.
pub async fn host_runtime(
    owner: &str,
    state: &Path,
) -> Option<gleaner_client::runtime::backends::HostRuntime> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let opts =
        gleaner_client::runtime::backends::ConnectOptions::new(owner, state.to_owned(), 1 << 30);
    let rt = gleaner_client::runtime::backends::connect(&opts).await;
    if rt.vms().is_none() {
        assert!(
            !ci(),
            "libvirtd must be reachable in CI (installers/start-engines.sh): {:?}",
            rt.skipped()
        );
        eprintln!(
            "SKIPPED: libvirtd is unreachable ({:?}); run installers/start-engines.sh",
            rt.skipped()
        );
        return None;
    }
    Some(rt)
}

/// A running factory over both engines.
pub struct VmFactory {
    pub handle: FactoryHandle,
    pub ledger: Arc<Ledger>,
    pub runtime: Arc<gleaner_client::runtime::backends::HostRuntime>,
    pub cancel: CancellationToken,
    pub task: Option<tokio::task::JoinHandle<()>>,
    pub allowance: watch::Sender<Allowance>,
    pub key: SecretKey,
}

/// Starts a factory on `runtime` with the ledger in `state` (recovering what a previous one left).
pub async fn vm_factory(
    runtime: gleaner_client::runtime::backends::HostRuntime,
    ledger: Arc<Ledger>,
    state: &Path,
    cores: u16,
) -> VmFactory {
    vm_factory_with(runtime, ledger, state, cores, |_| {}).await
}

/// As [`vm_factory`], with the factory's settings changed by `tweak` (a longer stop grace...).
pub async fn vm_factory_with(
    runtime: gleaner_client::runtime::backends::HostRuntime,
    ledger: Arc<Ledger>,
    state: &Path,
    cores: u16,
    tweak: impl FnOnce(&mut FactoryConfig),
) -> VmFactory {
    let runtime = Arc::new(runtime);
    let mut cfg = FactoryConfig::new(state.to_owned());
    cfg.tick = Duration::from_millis(200);
    cfg.stop_grace = Duration::from_secs(10);
    tweak(&mut cfg);
    let (tx, rx) = watch::channel(Allowance::open(cores, 2 << 30));
    let key = SecretKey::from_seed([0x78; 32]);
    let mut f = Factory::new(cfg, runtime.clone(), ledger.clone(), key.clone(), rx);
    f.recover().await.unwrap();
    let cancel = CancellationToken::new();
    let (handle, task) = f.spawn(cancel.clone());
    VmFactory {
        handle,
        ledger,
        runtime,
        cancel,
        task: Some(task),
        allowance: tx,
        key,
    }
}

impl VmFactory {
    /// Stops the factory the way SIGTERM does (machines stopped and accounted for).
    pub async fn stop(&mut self) {
        self.cancel.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    /// Ends the factory's loop with no shutdown at all, as kill -9 of the daemon would.
    pub async fn kill(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

/// `virsh -c qemu:///system ARGS`: stdout (libvirt's own view, independent of our client).
pub fn virsh(args: &[&str]) -> String {
    let out = std::process::Command::new("virsh")
        .args(["-c", "qemu:///system"])
        .args(args)
        .output()
        .expect("virsh runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Destroys and undefines every domain named with `prefix` (tests that panicked leave none).
pub fn remove_domains(prefix: &str) {
    for name in virsh(&["list", "--all", "--name"]).lines() {
        let name = name.trim();
        if !name.is_empty() && name.starts_with(prefix) {
            let _ = virsh(&["destroy", name]);
            let _ = virsh(&["undefine", name]);
        }
    }
}

/// Asserts no machine (container or domain), machine folder, overlay or seed is left.
pub async fn assert_no_vm_left(
    rt: &gleaner_client::runtime::backends::HostRuntime,
    state: &Path,
    names: &[String],
) {
    let owned = rt.list_owned().await.unwrap();
    assert!(owned.is_empty(), "left behind: {owned:?}");
    let domains = virsh(&["list", "--all", "--name"]);
    for n in names {
        assert!(
            !domains.lines().any(|l| l.trim() == n),
            "domain {n} still defined"
        );
    }
    for dir in ["machines", "vms"] {
        let d = state.join(dir);
        if d.exists() {
            let left: Vec<_> = std::fs::read_dir(&d)
                .unwrap()
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                // The verified image cache and the runtime's read-only virtiofsd wrapper stay
                // (they are reused); machine files do not.
                .filter(|n| n != "cache" && n != "virtiofsd-ro")
                .collect();
            assert!(left.is_empty(), "{} holds {left:?}", d.display());
        }
    }
}

/// Whether container `name` (or id) is frozen: paused by the engine, or frozen through its cgroup
/// by Gleaner's runtime (which the engine's books show as running). `None` when it is gone.
pub fn container_frozen(name: &str) -> Option<bool> {
    let o = std::process::Command::new("docker")
        .args(["inspect", "-f", "{{.State.Paused}} {{.State.Pid}}", name])
        .output()
        .ok()?;
    if !o.status.success() {
        return None;
    }
    let s = String::from_utf8_lossy(&o.stdout);
    let mut w = s.split_whitespace();
    let paused = w.next()? == "true";
    let pid: i32 = w.next()?.parse().ok()?;
    Some(
        paused
            || (pid > 0
                && gleaner_client::runtime::freezer::CgroupFreezer::of_process(pid)
                    .is_ok_and(|(f, _)| f.is_freezing())),
    )
}

/// A shell command printing `paused=<frozen> nanocpus=<quota>` for container `name` (frozen as
/// [`container_frozen`] says: the engine's pause or the cgroup freezer, v1 or v2), or `gone`.
pub fn shell_frozen_and_quota(name: &str) -> String {
    format!(
        r#"set -- $(docker inspect -f '{{{{.State.Paused}}}} {{{{.State.Pid}}}} {{{{.HostConfig.NanoCpus}}}}' {name} 2>/dev/null); if [ -z "$1" ]; then echo gone; else fz=$1; if [ "$fz" = false ] && [ "$2" != 0 ]; then p=$(awk -F: '$2 ~ /(^|,)freezer(,|$)/ {{print $3}}' /proc/$2/cgroup); if [ -n "$p" ]; then [ "$(cat /sys/fs/cgroup/freezer$p/freezer.state)" != THAWED ] && fz=true; else p=$(awk -F: '$1 == 0 {{print $3}}' /proc/$2/cgroup); for m in /sys/fs/cgroup /sys/fs/cgroup/unified; do [ "$(cat $m$p/cgroup.freeze 2>/dev/null)" = 1 ] && fz=true; done; fi; fi; echo paused=$fz nanocpus=$3; fi"#
    )
}
