//! Yield latency: the owner's input (an XTest motion event on a real Xvfb) → every workload frozen
//! by the owner enforcer (each container's cgroup frozen by the kernel's freezer), p50/p99 over
//! many trials; beside, in the same run and alternating blocks, the engine's own `docker pause`,
//! then the same enforcer without input events (polling every 100 ms) and a raw SIGSTOP of the
//! same containers' processes. Then the same for a busy VM (TCG here) through the daemon's VM
//! runtime (QEMU's cgroup frozen in process; libvirt in the gleaner-vmhost helper), in
//! alternating blocks with libvirt's own suspend
//! (virDomainSuspend returned), beside a raw SIGSTOP of its QEMU process, when libvirtd answers. BOINC polls every 1 s, HTCondor every 5 s.
//!
//! Run: `cargo build -p gleaner-vmhost && cargo bench -p gleaner-client --bench yield --profile dev`
//! (dockerd and libvirtd running and Xvfb installed, see installers/install-deps.sh --start; the
//! VM part goes through the daemon's runtime, so the `gleaner-vmhost` helper of the same profile
//! must be built). `GLEANER_BENCH_N` sets the trials
//! (200), `GLEANER_BENCH_VM_N` the VM's (the same).

mod common;
use common::{busybox_tarball, percentile, vm_assets};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use gleaner::Id16;
use gleaner::policy::{Action, Decision, Preset};
use gleaner_client::factory::Allowance;
use gleaner_client::owner::{Enforcer, Sources, watch_x11_input};
use gleaner_client::runtime::docker::DockerRuntime;
use gleaner_client::runtime::vmhost::{LibvirtConfig, SHARE_TAGS, VmHostRuntime, find_helper};
use gleaner_client::runtime::{
    ImageSource, Limits, MachineHandle, MachineSpec, OWNER_LABEL, Runtime,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use x11rb::connection::Connection;
use x11rb::protocol::xtest::ConnectionExt as _;

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// Kills Xvfb and removes the bench's containers, also when the bench panics.
struct Cleanup(String, Option<Child>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(c) = &mut self.1 {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Ok(out) = Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                &format!("label={OWNER_LABEL}={}", self.0),
            ])
            .output()
        {
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            if !ids.is_empty() {
                let _ = Command::new("docker")
                    .args(["rm", "-f", "-v"])
                    .args(&ids)
                    .output();
            }
        }
    }
}

fn stopped(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                .map(|c| c == "T")
        })
        .unwrap_or(false)
}

/// SIGSTOP of every pid, until the kernel reports each stopped.
fn sigstop_all(pids: &[i32]) -> Duration {
    let t0 = Instant::now();
    for &p in pids {
        // SAFETY: kill(2) with a live pid and a valid signal.
        unsafe { libc::kill(p, libc::SIGSTOP) };
    }
    while !pids.iter().all(|&p| stopped(p)) {
        std::hint::spin_loop();
    }
    let d = t0.elapsed();
    for &p in pids {
        // SAFETY: as above.
        unsafe { libc::kill(p, libc::SIGCONT) };
    }
    d
}

/// Runs `trials` owner arrivals against an enforcer (with input events when `events`), returning
/// the latency of each from the input event to every machine frozen.
async fn trials<R: Runtime + 'static>(
    rt: &Arc<R>,
    handles: &[MachineHandle],
    display: &str,
    events: bool,
    n: usize,
) -> Vec<Duration> {
    let registry = Arc::new(RwLock::new(
        handles
            .iter()
            .enumerate()
            .map(|(i, h)| (Id16([i as u8; 16]), h.clone()))
            .collect::<BTreeMap<_, _>>(),
    ));
    let cancel = CancellationToken::new();
    let (sources, _) = Sources::detect(
        Some(display),
        PathBuf::from("/nonexistent"),
        Path::new("/nonexistent"),
        &["x11".to_owned()],
        None,
        cancel.clone(),
    )
    .await;
    let mut policy = Preset::OnlyWhenIdle.policy(2.0, 2 << 30);
    policy.idle_after_s = 1;
    policy.suspend_above_load = None;
    policy.stop_after_frozen_s = None;
    let nudge = if events {
        let (tx, rx) = mpsc::channel(1);
        watch_x11_input(display, tx).expect("XInput2 on Xvfb");
        Some(rx)
    } else {
        None
    };
    let (allowance, _a) = watch::channel(Allowance::open(2, 2 << 30));
    let (decision, mut decisions) = watch::channel::<Option<Decision>>(None);
    let enforcer = Enforcer {
        policy,
        sources,
        runtime: rt.clone(),
        registry,
        allowance,
        paused: Arc::new(false.into()),
        interval: Duration::from_millis(100),
        decision,
        nudge,
        batch: None,
    };
    let (_cmd_tx, cmd_rx) = mpsc::channel(1);
    let task = tokio::spawn(enforcer.run(cmd_rx, cancel.clone()));
    let (conn, screen) = x11rb::rust_connection::RustConnection::connect(Some(display)).expect("X");
    let root = conn.setup().roots[screen].root;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        decisions
            .wait_for(|d| {
                d.as_ref()
                    .is_some_and(|d| matches!(d.action, Action::Run(_)))
            })
            .await
            .expect("enforcer running");
        // Land at a random point of the enforcer's polling period.
        tokio::time::sleep(Duration::from_millis((i as u64 * 37) % 100)).await;
        let t0 = Instant::now();
        conn.xtest_fake_input(6, 0, x11rb::CURRENT_TIME, root, (i % 600) as i16, 10, 0)
            .expect("xtest");
        conn.flush().expect("flush");
        decisions
            .wait_for(|d| d.as_ref().is_some_and(|d| d.action == Action::Freeze))
            .await
            .expect("enforcer running");
        out.push(t0.elapsed());
    }
    cancel.cancel();
    let _ = task.await;
    for h in handles {
        let _ = rt.thaw(h).await;
    }
    out.sort();
    out
}

/// Destroys the bench's VM even when the bench panics.
struct VmCleanup(String);

impl Drop for VmCleanup {
    fn drop(&mut self) {
        // A QEMU left frozen in its cgroup could not die.
        if let Ok(f) = gleaner_client::runtime::freezer::QemuFreezer::for_domain(&self.0) {
            let _ = f.thaw();
        }
        for cmd in ["destroy", "undefine"] {
            let _ = Command::new("virsh")
                .args(["-c", "qemu:///system", cmd, &self.0])
                .output();
        }
    }
}

/// The VM's results, each sorted.
struct VmRows {
    version: String,
    /// Owner input → frozen through QEMU's cgroup (what Gleaner does).
    events: Vec<Duration>,
    /// Owner input → virDomainSuspend returned.
    suspend: Vec<Duration>,
    /// The runtime's freeze call alone: cgroup, and virDomainSuspend.
    call_cg: Vec<Duration>,
    call_suspend: Vec<Duration>,
    /// Raw SIGSTOP of QEMU.
    stop: Vec<Duration>,
}

/// One busy VM (a spinning shell under the probe's domain type) through the libvirt runtime:
/// owner input → suspended, over `n` trials, and a raw SIGSTOP of its QEMU process as often.
async fn vm_trials(display: &str, owner: &str, tmp: &Path, n: usize) -> Result<VmRows, String> {
    use std::os::unix::fs::PermissionsExt;
    let (kernel, initrd) = vm_assets();
    let state = tmp.join("vm");
    let mjf = tmp.join("vm-mjf");
    for d in SHARE_TAGS {
        std::fs::create_dir_all(mjf.join(d)).map_err(|e| e.to_string())?;
    }
    for d in [tmp, &state, &mjf] {
        let _ = std::fs::create_dir_all(d);
        let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755));
    }
    let _ = std::fs::set_permissions(
        mjf.join("joboutputs"),
        std::fs::Permissions::from_mode(0o1777),
    );
    std::fs::write(mjf.join("user_data"), "#!/bin/sh\nwhile :; do :; done\n")
        .map_err(|e| e.to_string())?;
    // The daemon's own VM runtime: the cgroup freeze in this process, libvirt in the helper.
    let helper = find_helper()?;
    let rt = Arc::new(
        VmHostRuntime::connect(LibvirtConfig::new(owner, state), helper.clone())
            .await
            .map_err(|e| format!("libvirtd: {e}"))?,
    );
    let probe = rt.probe().await.map_err(|e| e.to_string())?;
    let name = format!("{owner}-vm");
    let _cleanup = VmCleanup(name.clone());
    let spec = MachineSpec {
        backend: gleaner_client::runtime::Backend::Vm,
        machine_id: Id16([0x76; 16]),
        machine_type: gleaner::Digest::of(b"bench-yield-vm"),
        name: name.clone(),
        image: None,
        kernel: Some(kernel),
        initrd: Some(initrd),
        cores: 1,
        limits: Limits {
            cpus: 1.0,
            memory_bytes: 256 << 20,
        },
        disk_bytes: 64 << 20,
        pids_limit: 64,
        mjf_dir: mjf.clone(),
        egress: vec![],
        command: None,
        labels: BTreeMap::new(),
    };
    let h = rt.create(&spec).await.map_err(|e| e.to_string())?;
    rt.start(&h).await.map_err(|e| e.to_string())?;
    // Booted into the workload: the guest's init writes a heartbeat before running user_data.
    let t0 = Instant::now();
    while !mjf.join("joboutputs/heartbeat").exists() {
        if t0.elapsed() > Duration::from_secs(180) {
            return Err("the VM wrote no heartbeat in 180 s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid: i32 = std::fs::read_to_string(format!("/run/libvirt/qemu/{name}.pid"))
        .map_err(|e| format!("qemu pid file: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("qemu pid: {e}"))?;
    // The same VM frozen by libvirt alone (virDomainSuspend, what main did), in alternating
    // blocks with the cgroup freeze so that both see the same load.
    let mut cfg = LibvirtConfig::new(owner, tmp.join("vm"));
    cfg.cgroup_freeze = false;
    let rt_suspend = Arc::new(
        VmHostRuntime::connect(cfg, helper)
            .await
            .map_err(|e| format!("libvirtd: {e}"))?,
    );
    let (mut events, mut suspend) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for block in 0..4 {
        let k = n / 4 + usize::from(block < n % 4);
        events.extend(trials(&rt, std::slice::from_ref(&h), display, true, k).await);
        suspend.extend(trials(&rt_suspend, std::slice::from_ref(&h), display, true, k).await);
    }
    events.sort();
    suspend.sort();
    // The engine call alone, without the input path (X server, enforcer, decision): where the
    // tail comes from. Alternating, each followed by a thaw and a pause for the guest to run.
    let (mut call_cg, mut call_suspend) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        for (rt, out) in [(&rt, &mut call_cg), (&rt_suspend, &mut call_suspend)] {
            let t0 = Instant::now();
            rt.freeze(&h).await.map_err(|e| e.to_string())?;
            out.push(t0.elapsed());
            rt.thaw(&h).await.map_err(|e| e.to_string())?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    call_cg.sort();
    call_suspend.sort();
    let mut stop: Vec<Duration> = (0..n)
        .map(|_| {
            let d = sigstop_all(&[pid]);
            std::thread::sleep(Duration::from_millis(5));
            d
        })
        .collect();
    stop.sort();
    let _ = rt.remove(&h).await;
    Ok(VmRows {
        version: probe.version,
        events,
        suspend,
        call_cg,
        call_suspend,
        stop,
    })
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("GLEANER_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let owner = format!("bench-yield-{}", std::process::id());
    let d = 150 + std::process::id() % 100;
    let display = format!(":{d}");
    let xvfb = Command::new("Xvfb")
        .args([&display, "-nolisten", "tcp", "-screen", "0", "640x480x24"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("Xvfb is installed");
    let _cleanup = Cleanup(owner.clone(), Some(xvfb));
    for _ in 0..100 {
        if Path::new(&format!("/tmp/.X11-unix/X{d}")).exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let tmp = std::env::temp_dir().join(&owner);
    let mjf = tmp.join("mjf");
    for sub in ["machinefeatures", "jobfeatures", "joboutputs"] {
        std::fs::create_dir_all(mjf.join(sub)).expect("mjf");
    }
    std::fs::write(mjf.join("user_data"), "").expect("user_data");
    let rt = Arc::new(
        DockerRuntime::connect(&owner, tmp.join("cache"), 1 << 30)
            .await
            .expect("dockerd is running"),
    );
    let (path, sha256) = busybox_tarball();
    let image = rt
        .prepare_image(
            &ImageSource {
                backend: gleaner_client::runtime::Backend::Container,
                url: format!("file://{}", path.display()),
                sha256,
            },
            &|_| {},
        )
        .await
        .expect("prepare");
    // Two busy guests, as on a 2-core desktop lending both cores.
    let mut handles = Vec::new();
    for i in 0..2u8 {
        let spec = MachineSpec {
            backend: gleaner_client::runtime::Backend::Container,
            machine_id: Id16([i; 16]),
            machine_type: sha256,
            name: format!("{owner}-{i}"),
            image: Some(image.clone()),
            kernel: None,
            initrd: None,
            cores: 1,
            limits: Limits {
                cpus: 0.5,
                memory_bytes: 128 << 20,
            },
            disk_bytes: 64 << 20,
            pids_limit: 64,
            mjf_dir: mjf.clone(),
            egress: vec![],
            command: Some(vec!["sh".into(), "-c".into(), "while :; do :; done".into()]),
            labels: BTreeMap::new(),
        };
        let h = rt.create(&spec).await.expect("create");
        rt.start(&h).await.expect("start");
        handles.push(h);
    }
    let pids: Vec<i32> = handles
        .iter()
        .map(|h| {
            let out = Command::new("docker")
                .args(["inspect", "-f", "{{.State.Pid}}", &h.engine_id])
                .output()
                .expect("docker inspect");
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("pid")
        })
        .collect();

    // The same containers frozen by the engine alone (`docker pause`, what main did), in
    // alternating blocks with the cgroup freeze so that both see the same load.
    let rt_pause = Arc::new(
        DockerRuntime::connect(&owner, tmp.join("cache"), 1 << 30)
            .await
            .expect("dockerd is running")
            .with_cgroup_freeze(false),
    );
    let (mut events, mut paused) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for block in 0..4 {
        let k = n / 4 + usize::from(block < n % 4);
        events.extend(trials(&rt, &handles, &display, true, k).await);
        paused.extend(trials(&rt_pause, &handles, &display, true, k).await);
    }
    events.sort();
    paused.sort();
    let polled = trials(&rt, &handles, &display, false, (n / 4).max(20)).await;
    let mut stop: Vec<Duration> = (0..n)
        .map(|_| {
            let d = sigstop_all(&pids);
            std::thread::sleep(Duration::from_millis(5));
            d
        })
        .collect();
    stop.sort();
    for h in &handles {
        let _ = rt.remove(h).await;
    }
    let vm_n: usize = std::env::var("GLEANER_BENCH_VM_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(n);
    let vm = vm_trials(&display, &owner, &tmp, vm_n).await;
    let _ = std::fs::remove_dir_all(&tmp);

    let p = |v: &[Duration], q| percentile(v, q);
    println!(
        "\nYield latency: owner input → 2 busy containers frozen ({n} trials; polling {})",
        polled.len()
    );
    println!("| path | p50 | p99 | p99 vs SIGSTOP | goal |");
    println!("| --- | --- | --- | --- | --- |");
    let goal = Duration::from_millis(50);
    for (name, v) in [
        (
            "XInput2 event → containers' cgroups frozen (gleaner)",
            &events,
        ),
        (
            "XInput2 event → docker pause (engine only, what main did)",
            &paused,
        ),
        ("100 ms polling → cgroups frozen", &polled),
        ("raw SIGSTOP of the same processes", &stop),
    ] {
        println!(
            "| {name} | {} | {} | {:.1}× | {} |",
            ms(p(v, 0.5)),
            ms(p(v, 0.99)),
            p(v, 0.99).as_secs_f64() / p(&stop, 0.99).as_secs_f64(),
            if std::ptr::eq(v, &events) {
                format!(
                    "p99 ≤ 50 ms {}",
                    if p(v, 0.99) <= goal { "✅" } else { "❌" }
                )
            } else {
                String::new()
            }
        );
    }
    println!("| BOINC (polls every 1 s) | ~500 ms | ~1000 ms | | |");
    match vm {
        Ok(VmRows {
            version,
            events,
            suspend,
            call_cg,
            call_suspend,
            stop,
        }) => {
            println!(
                "\nYield latency: owner input → 1 busy VM suspended ({} trials; {version})",
                events.len()
            );
            println!("| path | p50 | p99 | p99 vs SIGSTOP | goal |");
            println!("| --- | --- | --- | --- | --- |");
            let goal = Duration::from_millis(100);
            println!(
                "| XInput2 event → QEMU's cgroup frozen (gleaner) | {} | {} | {:.1}× | p99 ≤ 100 ms {} |",
                ms(p(&events, 0.5)),
                ms(p(&events, 0.99)),
                p(&events, 0.99).as_secs_f64() / p(&stop, 0.99).as_secs_f64(),
                if p(&events, 0.99) <= goal {
                    "✅"
                } else {
                    "❌"
                }
            );
            println!(
                "| XInput2 event → virDomainSuspend (libvirt only) | {} | {} | {:.1}× | |",
                ms(p(&suspend, 0.5)),
                ms(p(&suspend, 0.99)),
                p(&suspend, 0.99).as_secs_f64() / p(&stop, 0.99).as_secs_f64(),
            );
            for (name, v) in [
                ("the runtime's freeze call alone: QEMU's cgroup", &call_cg),
                (
                    "the runtime's freeze call alone: virDomainSuspend",
                    &call_suspend,
                ),
            ] {
                println!(
                    "| {name} | {} | {} | {:.1}× | |",
                    ms(p(v, 0.5)),
                    ms(p(v, 0.99)),
                    p(v, 0.99).as_secs_f64() / p(&stop, 0.99).as_secs_f64(),
                );
            }
            println!(
                "| raw SIGSTOP of the QEMU process | {} | {} | 1.0× | |",
                ms(p(&stop, 0.5)),
                ms(p(&stop, 0.99))
            );
        }
        Err(e) => println!("\nNo VM row: {e}"),
    }
}
