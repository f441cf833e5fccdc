//! The Docker runtime against the real dockerd (started by installers/install-deps.sh --start):
//! MJF and user_data reach the workload, limits hold by behaviour, the hardening shows in
//! `docker inspect`, freeze/thaw, graceful stop, images verified before loading, and nothing is
//! left behind. Each test has its own owner label, so they run in parallel.

mod common;

use std::time::{Duration, Instant};

use common::*;
use gleaner::Digest;
use gleaner_client::runtime::docker::{DockerRuntime, image_tag};
use gleaner_client::runtime::egress::EgressNames;
use gleaner_client::runtime::image::image_id;
use gleaner_client::runtime::{
    EngineKind, ImageSource, Limits, MachineHandle, MachineState, Runtime, RuntimeError,
};

async fn wait_exit(rt: &DockerRuntime, m: &MachineHandle, secs: u64) -> Option<i64> {
    eventually(secs, "the workload to exit", async || {
        match rt.state(m).await.unwrap() {
            MachineState::Exited { code } => Some(code),
            _ => None,
        }
    })
    .await
}

async fn wait_file(path: &std::path::Path, secs: u64) -> String {
    eventually(secs, &format!("{}", path.display()), async || {
        std::fs::read_to_string(path)
            .ok()
            .filter(|s| s.ends_with('\n'))
    })
    .await
}

#[tokio::test]
async fn workload_reads_mjf_and_user_data_and_writes_joboutputs() {
    let owner = owner("mjf");
    let guard = Guard::new(&owner);
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime(&owner, &tmp.path().join("cache")).await;
    let image = busybox(&rt).await;
    let script = r#"
set -u
out=$JOBOUTPUTS/result
{
  echo "hs06=$(cat $MACHINEFEATURES/hs06)"
  echo "cpu=$(cat $JOBFEATURES/allocated_cpu)"
  echo "user_data_bytes=$(wc -c < /user_data)"
  echo "uid=$(id -u)"
  touch /machinefeatures/x 2>/dev/null && echo "mf=writable" || echo "mf=readonly"
  touch /user_data 2>/dev/null && echo "ud=writable" || echo "ud=readonly"
  touch /rootfile 2>/dev/null && echo "root=writable" || echo "root=readonly"
  echo data > /scratch/f && echo "scratch=$(cat /scratch/f)"
  echo data > /tmp/f && echo "tmp=$(cat /tmp/f)"
  echo "net=$(ls /sys/class/net | tr '\n' ' ')"
} > $out.partial
mv $out.partial $out
exit 7
"#;
    let mjf = mjf_dir(tmp.path(), script);
    let spec = spec(&owner, "mjf", &image, &mjf);
    let m = rt.create(&spec).await.unwrap();
    guard.track_volumes(&m);
    rt.start(&m).await.unwrap();
    assert_eq!(wait_exit(&rt, &m, 60).await, Some(7));
    let result = std::fs::read_to_string(mjf.join("joboutputs/result")).unwrap();
    for want in [
        "hs06=42.5",
        "cpu=1",
        &format!("user_data_bytes={}\n", script.len()),
        "uid=65534",
        "mf=readonly",
        "ud=readonly",
        "root=readonly",
        "scratch=data",
        "tmp=data",
        // No network: only the loopback device.
        "net=lo \n",
    ] {
        assert!(result.contains(want), "{want:?} not in:\n{result}");
    }
    guard.finish(&rt, &[&m]).await;
}

#[tokio::test]
async fn docker_inspect_shows_the_hardening_and_probe_reports_the_engine() {
    let owner = owner("inspect");
    let guard = Guard::new(&owner);
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime(&owner, &tmp.path().join("cache")).await;

    let probe = rt.probe().await.unwrap();
    assert_eq!(probe.engine, EngineKind::Docker);
    let api = docker_cli(&["version", "--format", "{{.Server.APIVersion}}"]);
    assert!(probe.version.contains(api.trim()), "{probe:?}");
    let cg = docker_cli(&["info", "--format", "{{.CgroupVersion}}"]);
    assert_eq!(probe.cgroup_version.to_string(), cg.trim());

    let image = busybox(&rt).await;
    let mjf = mjf_dir(tmp.path(), "sleep 600\n");
    let mut s = spec(&owner, "inspect", &image, &mjf);
    s.pids_limit = 77;
    s.limits = Limits {
        cpus: 0.75,
        memory_bytes: 96 << 20,
    };
    let m = rt.create(&s).await.unwrap();
    let json = docker_cli(&["inspect", &m.engine_id]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let c = &v[0];
    let hc = &c["HostConfig"];
    assert_eq!(hc["Privileged"], false);
    assert_eq!(hc["CapDrop"], serde_json::json!(["ALL"]));
    assert!(hc["CapAdd"].is_null(), "{}", hc["CapAdd"]);
    assert_eq!(hc["ReadonlyRootfs"], true);
    assert!(
        hc["SecurityOpt"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o == "no-new-privileges"),
        "{}",
        hc["SecurityOpt"]
    );
    assert_eq!(hc["NetworkMode"], "none");
    assert_eq!(hc["PidsLimit"], 77);
    assert_eq!(hc["Memory"], 96 << 20);
    assert_eq!(hc["MemorySwap"], hc["Memory"]);
    assert_eq!(hc["NanoCpus"], 750_000_000);
    assert!(
        hc["Tmpfs"]["/scratch"]
            .as_str()
            .unwrap()
            .contains(&format!("size={}", 64 << 20)),
        "{}",
        hc["Tmpfs"]
    );
    assert_eq!(c["Config"]["User"], "65534:65534");
    assert_eq!(c["Config"]["Labels"]["org.gleaner.owner"], owner.as_str());
    assert_eq!(
        c["Config"]["Labels"]["org.gleaner.machine-id"],
        s.machine_id.to_string()
    );
    assert_eq!(c["Config"]["Labels"]["org.gleaner.test"], "inspect");
    let env: Vec<&str> = c["Config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    for want in [
        "MACHINEFEATURES=/machinefeatures",
        "JOBFEATURES=/jobfeatures",
        "JOBOUTPUTS=/joboutputs",
    ] {
        assert!(env.contains(&want), "{env:?}");
    }
    // Mounts: MJF in Vac's layout, read-only except joboutputs.
    let mounts = c["Mounts"].as_array().unwrap();
    let rw_of = |dest: &str| {
        mounts
            .iter()
            .find(|m| m["Destination"] == dest)
            .unwrap_or_else(|| panic!("no mount at {dest}: {mounts:?}"))["RW"]
            .as_bool()
            .unwrap()
    };
    assert!(!rw_of("/machinefeatures"));
    assert!(!rw_of("/jobfeatures"));
    assert!(!rw_of("/user_data"));
    assert!(rw_of("/joboutputs"));
    // The image it runs is the verified one, by id.
    assert_eq!(c["Image"], image.reference.as_str());

    // A signed egress policy of "*" is what opens the network without limits.
    let mut open = spec(&owner, "egress", &image, &mjf);
    open.egress = vec!["*".into()];
    let m2 = rt.create(&open).await.unwrap();
    let mode = docker_cli(&[
        "inspect",
        "--format",
        "{{.HostConfig.NetworkMode}}",
        &m2.engine_id,
    ]);
    assert_eq!(mode.trim(), "bridge");

    // Both are listed as owned, with their machine ids, and nothing of another owner is.
    let owned = rt.list_owned().await.unwrap();
    assert_eq!(owned.len(), 2, "{owned:?}");
    assert!(owned.iter().any(|o| o.machine_id == Some(s.machine_id)
        && o.name == s.name
        && o.state == MachineState::Created));
    let other = runtime(&format!("{owner}-other"), &tmp.path().join("cache")).await;
    assert!(other.list_owned().await.unwrap().is_empty());

    guard.finish(&rt, &[&m, &m2]).await;
}

#[tokio::test]
async fn memory_hog_is_killed_at_its_limit() {
    let owner = owner("oom");
    let guard = Guard::new(&owner);
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime(&owner, &tmp.path().join("cache")).await;
    let image = busybox(&rt).await;
    // awk doubles a string until the kernel's OOM killer ends it; the shell survives to report.
    let script = r#"
awk 'BEGIN { s = "xxxxxxxxxxxxxxxx"; while (1) s = s s }'
echo "hog exited $?" > $JOBOUTPUTS/hog
sleep 600
"#;
    let mjf = mjf_dir(tmp.path(), script);
    let mut s = spec(&owner, "oom", &image, &mjf);
    let limit: u64 = 48 << 20;
    s.limits.memory_bytes = limit;
    let m = rt.create(&s).await.unwrap();
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 1;
    rt.start(&m).await.unwrap();
    let hog = wait_file(&mjf.join("joboutputs/hog"), 60).await;
    // 137 = 128 + SIGKILL, the OOM killer's signal.
    assert_eq!(hog.trim(), "hog exited 137");
    // The engine saw the OOM kill (State.OOMKilled is only set when the main process dies).
    let until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 1;
    let events = docker_cli(&[
        "events",
        "--since",
        &since.to_string(),
        "--until",
        &until.to_string(),
        "--filter",
        &format!("container={}", m.engine_id),
        "--filter",
        "event=oom",
        "--format",
        "{{.Action}}",
    ]);
    assert_eq!(events.trim(), "oom");
    let usage = rt.sample(&m).await.unwrap();
    assert!(
        usage.peak_memory_bytes <= limit && usage.peak_memory_bytes > limit / 2,
        "peak {} with a limit of {limit}",
        usage.peak_memory_bytes
    );
    guard.finish(&rt, &[&m]).await;
}

#[tokio::test]
async fn fork_bomb_stops_at_the_pids_limit() {
    let owner = owner("pids");
    let guard = Guard::new(&owner);
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime(&owner, &tmp.path().join("cache")).await;
    let image = busybox(&rt).await;
    // The forking loop runs in a subshell: ash exits when a fork fails, and the outer shell
    // stays to report (its builtins and exec need no new task).
    let script = r#"
( i=0; while [ $i -lt 200 ]; do sleep 600 & i=$((i + 1)); echo $i > $JOBOUTPUTS/spawned; done ) 2> $JOBOUTPUTS/errors
echo "bomb over" > $JOBOUTPUTS/done
exec sleep 600
"#;
    let mjf = mjf_dir(tmp.path(), script);
    let mut s = spec(&owner, "pids", &image, &mjf);
    let limit = 24;
    s.pids_limit = limit;
    let m = rt.create(&s).await.unwrap();
    rt.start(&m).await.unwrap();
    let done = wait_file(&mjf.join("joboutputs/done"), 60).await;
    assert_eq!(done.trim(), "bomb over");
    let spawned: u32 = std::fs::read_to_string(mjf.join("joboutputs/spawned"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        spawned < 200,
        "all 200 forks succeeded under a limit of {limit}"
    );
    let errors = std::fs::read_to_string(mjf.join("joboutputs/errors")).unwrap();
    assert!(
        errors.contains("fork"),
        "no fork failure reported: {errors}"
    );
    // The engine's own count of tasks in the container's cgroup.
    let pids = docker_cli(&[
        "stats",
        "--no-stream",
        "--format",
        "{{.PIDs}}",
        &m.engine_id,
    ]);
    let pids: u32 = pids.trim().parse().unwrap();
    assert!(
        pids <= limit && pids >= limit - 3,
        "{pids} tasks with a limit of {limit}"
    );
    assert_eq!(rt.state(&m).await.unwrap(), MachineState::Running);
    guard.finish(&rt, &[&m]).await;
}

/// Jiffies (idle, total) summed over the host's CPUs, from /proc/stat.
fn host_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    // idle + iowait; guest time is already inside user.
    (cpu[3] + cpu[4], cpu.iter().take(8).sum())
}

/// CPU seconds per wall second over a window, from the engine's own accounting, and how many
/// of the host's cores sat idle on average meanwhile.
async fn cpu_rate(rt: &DockerRuntime, m: &MachineHandle, window: Duration) -> (f64, f64) {
    let a = rt.sample(m).await.unwrap().cpu_ns;
    let (i0, t0j) = host_jiffies();
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let b = rt.sample(m).await.unwrap().cpu_ns;
    let wall = t0.elapsed();
    let (i1, t1j) = host_jiffies();
    let cores = std::thread::available_parallelism().unwrap().get() as f64;
    let idle = (i1 - i0) as f64 / (t1j - t0j).max(1) as f64 * cores;
    ((b - a) as f64 / wall.as_nanos() as f64, idle)
}

/// The quota is never exceeded by more than 5 %; and when the host had cores to spare (so the
/// hog was not starved by other work), it got its quota within 5 %.
fn assert_within_quota(rate: f64, idle: f64, quota: f64) {
    assert!(
        rate <= quota * 1.05,
        "used {rate:.3} cores with a quota of {quota}"
    );
    if idle >= 0.5 {
        assert!(
            rate >= quota * 0.95,
            "used {rate:.3} cores with a quota of {quota} while {idle:.2} cores were idle"
        );
    } else {
        eprintln!(
            "host saturated ({idle:.2} cores idle): only the upper bound checked ({rate:.3} of {quota})"
        );
    }
}

#[tokio::test]
async fn cpu_hog_stays_within_its_quota_and_limits_change_live() {
    let owner = owner("cpu");
    let guard = Guard::new(&owner);
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime(&owner, &tmp.path().join("cache")).await;
    let image = busybox(&rt).await;
    // Two spinning shells: without a quota they would take both cores.
    let script = "while :; do :; done &\nwhile :; do :; done &\nwait\n";
    let mjf = mjf_dir(tmp.path(), script);
    let mut s = spec(&owner, "cpu", &image, &mjf);
    s.limits.cpus = 0.5;
    let m = rt.create(&s).await.unwrap();
    rt.start(&m).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rate, idle) = cpu_rate(&rt, &m, Duration::from_secs(5)).await;
    assert_within_quota(rate, idle, 0.5);
    // Live: the quota changes without a restart.
    rt.set_limits(
        &m,
        Limits {
            cpus: 0.25,
            memory_bytes: 64 << 20,
        },
    )
    .await
    .unwrap();
    let mem = docker_cli(&[
        "inspect",
        "--format",
        "{{.HostConfig.Memory}} {{.HostConfig.MemorySwap}}",
        &m.engine_id,
    ]);
    assert_eq!(mem.trim(), format!("{0} {0}", 64 << 20));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (rate, idle) = cpu_rate(&rt, &m, Duration::from_secs(5)).await;
    assert_within_quota(rate, idle, 0.25);
    assert_eq!(rt.state(&m).await.unwrap(), MachineState::Running);
    guard.finish(&rt, &[&m]).await;
}

#[tokio::test]
async fn guests_in_the_background_only_get_cpu_no_one_else_wants() {
    let owner = owner("cpuidle");
    let guard = Guard::new(&owner);
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime(&owner, &tmp.path().join("cache")).await;
    let image = busybox(&rt).await;
    let mjf = mjf_dir(tmp.path(), "while :; do :; done\n");
    let mut s = spec(&owner, "cpuidle", &image, &mjf);
    s.limits.cpus = 1.0;
    let m = rt.create(&s).await.unwrap();
    rt.start(&m).await.unwrap();
    // The container's cpu cgroup, as the kernel sees it through the process.
    let pid = docker_cli(&["inspect", "-f", "{{.State.Pid}}", &m.engine_id]);
    let pid = pid.trim();
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let cpu_dir = cgroups
        .lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
            if ctrl.split(',').any(|c| c == "cpu") {
                Some(format!("/sys/fs/cgroup/cpu{path}"))
            } else if ctrl.is_empty() {
                Some(format!("/sys/fs/cgroup{path}"))
            } else {
                None
            }
        })
        .expect("the container's cpu cgroup");
    // Its parent, shared by all guests: at normal weight until the enforcer puts them in the
    // background (the owner away: an owner's return must freeze them at once), then marked
    // idle — the mark ranks the whole group against everything else on the host.
    let parent = std::path::Path::new(&cpu_dir)
        .parent()
        .unwrap()
        .join("cpu.idle");
    let idle = || std::fs::read_to_string(&parent).unwrap().trim().to_owned();
    assert_eq!(idle(), "0", "{}", parent.display());
    rt.set_background(true).await.unwrap();
    assert_eq!(idle(), "1", "{}", parent.display());
    // By behaviour: an owner's spinning process on the same core takes it all but a sliver
    // (SCHED_IDLE weight 3 against 1024); an ordinary container would get half.
    let owner_hog = std::process::Command::new("taskset")
        .args(["-c", "0", "sh", "-c", "while :; do :; done"])
        .spawn()
        .unwrap();
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _owner_hog = KillOnDrop(owner_hog);
    // Every process of the container (its init and the spinning shell) onto that core.
    let procs = std::fs::read_to_string(format!("{cpu_dir}/cgroup.procs")).unwrap();
    for p in procs.lines() {
        let pinned = std::process::Command::new("taskset")
            .args(["-a", "-p", "-c", "0", p])
            .output()
            .unwrap();
        assert!(pinned.status.success(), "{pinned:?}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (rate, _) = cpu_rate(&rt, &m, Duration::from_secs(3)).await;
    assert!(
        rate < 0.1,
        "the guest took {rate:.3} of a core an owner process wanted"
    );
    // A freeze from the background does not wait for the guest to get CPU: the group is back
    // at normal weight first, and the guest really stops.
    rt.freeze(&m).await.unwrap();
    assert_eq!(rt.state(&m).await.unwrap(), MachineState::Frozen);
    assert_eq!(idle(), "0", "frozen guests stay marked idle");
    let a = rt.sample(&m).await.unwrap().cpu_ns;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        rt.sample(&m).await.unwrap().cpu_ns,
        a,
        "cpu time grew while frozen"
    );
    rt.thaw(&m).await.unwrap();
    // Back at normal weight (the owner left): the guest shares the core with the owner's hog
    // again. Other builds may share core 0 too, so it is given time to show a real share.
    rt.set_background(false).await.unwrap();
    assert_eq!(idle(), "0");
    eventually(
        60,
        "a normal-weight guest to get a share of the core",
        async || {
            let (rate, _) = cpu_rate(&rt, &m, Duration::from_secs(2)).await;
            (rate > 0.15).then_some(())
        },
    )
    .await;
    guard.finish(&rt, &[&m]).await;
    // No empty parent cgroup is left behind once its last guest is removed.
    let parent_dir = std::path::Path::new(&cpu_dir).parent().unwrap().to_owned();
    let t0 = Instant::now();
    while parent_dir.exists() && t0.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!parent_dir.exists(), "{} left behind", parent_dir.display());
}

#[tokio::test]
async fn freeze_stops_cpu_time_and_thaw_resumes_it() {
    let owner = owner("freeze");
    let guard = Guard::new(&owner);
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime(&owner, &tmp.path().join("cache")).await;
    let image = busybox(&rt).await;
    let mjf = mjf_dir(tmp.path(), "while :; do :; done\n");
    let mut s = spec(&owner, "freeze", &image, &mjf);
    s.limits.cpus = 0.5;
    let m = rt.create(&s).await.unwrap();
    rt.start(&m).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    rt.freeze(&m).await.unwrap();
    // Freezing twice is fine: the owner may press pause twice.
    rt.freeze(&m).await.unwrap();
    assert_eq!(rt.state(&m).await.unwrap(), MachineState::Frozen);
    // Frozen through its cgroup by the kernel, not by the engine's pause: the engine's books
    // still say running, and the runtime reports it frozen all the same (also when listing, as
    // a restarted daemon would).
    assert!(!engine_paused(&rt, &m).await, "froze through docker pause");
    let listed = rt.list_owned().await.unwrap();
    assert_eq!(
        listed
            .iter()
            .find(|o| o.engine_id == m.engine_id)
            .map(|o| o.state),
        Some(MachineState::Frozen)
    );
    // Limits change while frozen (the owner's policy may throttle a frozen guest before thawing).
    rt.set_limits(
        &m,
        Limits {
            cpus: 0.4,
            memory_bytes: 96 << 20,
        },
    )
    .await
    .unwrap();
    let a = rt.sample(&m).await.unwrap().cpu_ns;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b = rt.sample(&m).await.unwrap().cpu_ns;
    assert_eq!(a, b, "cpu time grew while frozen");
    rt.thaw(&m).await.unwrap();
    assert_eq!(rt.state(&m).await.unwrap(), MachineState::Running);
    // It runs again: on a loaded machine the hog's share of the CPU may be small, so the test
    // waits (generously) for it to add 0.2 s of CPU time rather than timing one second.
    eventually(60, "cpu time to grow after thaw", async || {
        let c = rt.sample(&m).await.unwrap().cpu_ns;
        (c - b > 200_000_000).then_some(())
    })
    .await;
    // A frozen machine still stops: it is thawed to receive its stop signal.
    rt.freeze(&m).await.unwrap();
    let state = rt.stop(&m, Duration::from_secs(2)).await.unwrap();
    assert!(matches!(state, MachineState::Exited { .. }), "{state:?}");
    guard.finish(&rt, &[&m]).await;
}

/// Whether the engine paused the container itself (`docker pause`), by its own books.
async fn engine_paused(rt: &DockerRuntime, m: &MachineHandle) -> bool {
    let i = rt
        .docker()
        .inspect_container(&m.engine_id, None)
        .await
        .unwrap();
    i.state.and_then(|s| s.paused).unwrap_or(false)
}

#[tokio::test]
async fn the_engines_pause_is_the_fallback_and_a_frozen_guest_is_removed() {
    let owner = owner("pausefb");
    let guard = Guard::new(&owner);
    let tmp = tempfile::tempdir().unwrap();
    // Without the cgroup freezer: the engine pauses, and thaw goes back through the engine.
    let rt = runtime(&owner, &tmp.path().join("cache"))
        .await
        .with_cgroup_freeze(false);
    let image = busybox(&rt).await;
    let mjf = mjf_dir(tmp.path(), "while :; do :; done\n");
    let mut s = spec(&owner, "pausefb", &image, &mjf);
    s.limits.cpus = 0.2;
    let m = rt.create(&s).await.unwrap();
    rt.start(&m).await.unwrap();
    rt.freeze(&m).await.unwrap();
    assert!(engine_paused(&rt, &m).await);
    assert_eq!(rt.state(&m).await.unwrap(), MachineState::Frozen);
    // A runtime with the cgroup freezer finds it frozen already, and thaws it through the engine
    // (whose books would otherwise still say paused).
    let rt2 = runtime(&owner, &tmp.path().join("cache")).await;
    rt2.freeze(&m).await.unwrap();
    assert!(engine_paused(&rt2, &m).await);
    rt2.thaw(&m).await.unwrap();
    assert!(!engine_paused(&rt2, &m).await);
    assert_eq!(rt2.state(&m).await.unwrap(), MachineState::Running);
    // Frozen through the cgroup, then removed: a frozen task cannot take the engine's SIGKILL
    // on cgroup v1, so the runtime thaws it first and the container goes.
    rt2.freeze(&m).await.unwrap();
    assert!(!engine_paused(&rt2, &m).await);
    rt2.remove(&m).await.unwrap();
    assert_eq!(rt2.state(&m).await.unwrap(), MachineState::Gone);
    guard.finish(&rt2, &[]).await;
}

#[tokio::test]
async fn stop_is_graceful_then_kills() {
    let owner = owner("stop");
    let guard = Guard::new(&owner);
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime(&owner, &tmp.path().join("cache")).await;
    let image = busybox(&rt).await;

    let polite = mjf_dir(
        &tmp.path().join("a"),
        "trap 'echo bye > $JOBOUTPUTS/term; exit 0' TERM\necho up > $JOBOUTPUTS/up\nwhile :; do sleep 1; done\n",
    );
    let mut s = spec(&owner, "polite", &image, &polite);
    s.limits.cpus = 0.2;
    let a = rt.create(&s).await.unwrap();
    rt.start(&a).await.unwrap();
    wait_file(&polite.join("joboutputs/up"), 60).await;
    let state = rt.stop(&a, Duration::from_secs(10)).await.unwrap();
    assert_eq!(state, MachineState::Exited { code: Some(0) });
    assert_eq!(
        std::fs::read_to_string(polite.join("joboutputs/term")).unwrap(),
        "bye\n"
    );

    let stubborn = mjf_dir(
        &tmp.path().join("b"),
        "trap '' TERM\necho up > $JOBOUTPUTS/up\nwhile :; do sleep 1; done\n",
    );
    let b = rt
        .create(&spec(&owner, "stubborn", &image, &stubborn))
        .await
        .unwrap();
    rt.start(&b).await.unwrap();
    wait_file(&stubborn.join("joboutputs/up"), 60).await;
    let t0 = Instant::now();
    let state = rt.stop(&b, Duration::from_secs(1)).await.unwrap();
    // Killed after the grace: 137 = 128 + SIGKILL.
    assert_eq!(state, MachineState::Exited { code: Some(137) });
    assert!(t0.elapsed() >= Duration::from_secs(1));
    // Stopping what has stopped is not an error.
    assert_eq!(
        rt.stop(&b, Duration::from_secs(1)).await.unwrap(),
        MachineState::Exited { code: Some(137) }
    );
    guard.finish(&rt, &[&a, &b]).await;
    // And once removed, the engine no longer knows it.
    assert_eq!(rt.state(&a).await.unwrap(), MachineState::Gone);
    assert!(matches!(
        rt.start(&a).await,
        Err(RuntimeError::NoSuchMachine(_))
    ));
}

/// A docker-archive unique to this call (its config names `marker`), so the engine cannot
/// already hold it: the download-verify-load path runs for real.
fn unique_archive(dir: &std::path::Path, marker: &str) -> (std::path::PathBuf, Digest) {
    use gleaner_client::image_archive::{Entry, docker_archive, layer};
    let layer = layer(&[Entry::File {
        path: "marker",
        mode: 0o644,
        data: marker.as_bytes(),
    }])
    .unwrap();
    let bytes = docker_archive(
        &layer,
        &format!("gleaner-test/unique:{marker}"),
        &["/marker"],
    )
    .unwrap();
    let path = dir.join(format!("{marker}.tar"));
    std::fs::write(&path, &bytes).unwrap();
    (path, Digest::of(&bytes))
}

#[tokio::test]
async fn images_are_verified_before_loading_cached_by_digest_and_evicted_lru() {
    let owner = owner("image");
    let tmp = tempfile::tempdir().unwrap();
    let nonce = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    // The shared busybox image is loaded first, so that parallel tests loading it do not change
    // the engine's image list while this test watches it.
    busybox(&runtime(&owner, &tmp.path().join("busybox-cache")).await).await;
    let (p1, d1) = unique_archive(tmp.path(), &format!("one-{nonce}"));
    let (p2, d2) = unique_archive(tmp.path(), &format!("two-{nonce}"));
    let size = std::fs::metadata(&p1).unwrap().len();
    // Room for one tarball, not two.
    let quota = size + size / 2;
    let rt = DockerRuntime::connect(&owner, tmp.path().join("cache"), quota)
        .await
        .unwrap();
    let server = FileServer::start();
    let u1 = server.add("one.tar", &p1);
    let u2 = server.add("two.tar", &p2);

    // A wrong hash: refused, nothing loaded, nothing cached.
    let before = image_ids();
    let wrong = ImageSource {
        backend: gleaner_client::runtime::Backend::Container,
        url: u1.clone(),
        sha256: d2,
    };
    let err = rt.prepare_image(&wrong, &|_| {}).await.unwrap_err();
    match &err {
        RuntimeError::HashMismatch {
            expected, actual, ..
        } => {
            assert_eq!(*expected, d2);
            assert_eq!(*actual, d1);
        }
        other => panic!("expected a hash mismatch, got {other}"),
    }
    assert_eq!(
        image_ids(),
        before,
        "the engine changed after a refused image"
    );
    assert_eq!(
        std::fs::read_dir(tmp.path().join("cache")).unwrap().count(),
        0,
        "a refused download was kept"
    );

    // The right hash: downloaded with progress, loaded, tagged by digest, pinned by id.
    let progress = std::sync::Mutex::new(Vec::new());
    let good = ImageSource {
        backend: gleaner_client::runtime::Backend::Container,
        url: u1.clone(),
        sha256: d1,
    };
    let img = rt
        .prepare_image(&good, &|p| progress.lock().unwrap().push(p))
        .await
        .unwrap();
    assert_eq!(server.hits("one.tar"), 2);
    let last = *progress.lock().unwrap().last().unwrap();
    assert_eq!(last.done_bytes, size);
    assert_eq!(last.total_bytes, Some(size));
    assert_eq!(
        image_id(rt.docker(), &image_tag(&d1)).await.unwrap(),
        Some(img.reference.clone())
    );
    // The archive's own tag was not left in the engine; only the content-addressed one.
    let tags = docker_cli(&[
        "image",
        "inspect",
        "--format",
        "{{json .RepoTags}}",
        &img.reference,
    ]);
    assert_eq!(tags.trim(), format!("[\"{}\"]", image_tag(&d1)));

    // Second prepare: a cache hit, no request.
    let again = rt.prepare_image(&good, &|_| {}).await.unwrap();
    assert_eq!(again, img);
    assert_eq!(server.hits("one.tar"), 2);

    // A second image pushes the first tarball out of the quota (least recently used).
    let img2 = rt
        .prepare_image(
            &ImageSource {
                backend: gleaner_client::runtime::Backend::Container,
                url: u2,
                sha256: d2,
            },
            &|_| {},
        )
        .await
        .unwrap();
    assert!(rt.images().is_cached(&d2));
    assert!(
        !rt.images().is_cached(&d1),
        "the older tarball was not evicted"
    );
    assert_ne!(img2.reference, img.reference);

    // Clean up: the engine is left as it was.
    rt.images().remove(rt.docker(), &d1).await.unwrap();
    rt.images().remove(rt.docker(), &d2).await.unwrap();
    assert_eq!(image_ids(), before);
}

/// TCP listeners on every host address that greet each connection with their tag and close it:
/// what a container's egress is tested against.
struct Greeters {
    ports: Vec<u16>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Greeters {
    fn start(tags: &[&'static str]) -> Greeters {
        use std::io::Write;
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut ports = Vec::new();
        let mut threads = Vec::new();
        for &tag in tags {
            let l = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
            l.set_nonblocking(true).unwrap();
            ports.push(l.local_addr().unwrap().port());
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((mut s, _)) => {
                            let _ = s.set_nonblocking(false);
                            let _ = writeln!(s, "{tag}");
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            }));
        }
        Greeters {
            ports,
            stop,
            threads,
        }
    }
}

impl Drop for Greeters {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The gateway address of a Docker network (the host's address on that bridge).
/// The host's address on a Docker network: its IPAM gateway or, when the engine left that out
/// (dockerd adopting a `docker0` that already had its address does), the address of the
/// network's bridge interface on the host, which is what containers reach.
fn gateway(network: &str) -> String {
    let inspect = |format: &str| docker_cli(&["network", "inspect", "--format", format, network]);
    let gw = inspect("{{range .IPAM.Config}}{{.Gateway}}{{end}}")
        .trim()
        .to_owned();
    if !gw.is_empty() {
        return gw;
    }
    let bridge = inspect(r#"{{index .Options "com.docker.network.bridge.name"}}"#)
        .trim()
        .to_owned();
    let bridge = if bridge.is_empty() || bridge == "<no value>" {
        "docker0".to_owned()
    } else {
        bridge
    };
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "dev", &bridge])
        .output()
        .unwrap_or_else(|e| panic!("ip addr show dev {bridge}: {e}"));
    // "5: docker0    inet 172.17.0.1/16 brd ... scope global docker0"
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn egress_policy_lets_the_container_reach_only_the_listed_destinations() {
    let owner = owner("egress");
    let guard = Guard::new(&owner);
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime(&owner, &tmp.path().join("cache")).await;
    let image = busybox(&rt).await;
    // Two services on the host, reachable from containers at the default bridge's gateway (and
    // at every other host address): the policy allows port A there and nothing else.
    let greeters = Greeters::start(&["hello-a", "hello-b"]);
    let (a, b) = (greeters.ports[0], greeters.ports[1]);
    let host = gateway("bridge");
    assert!(!host.is_empty(), "the default bridge has no gateway");
    // The workload tries each target listed in jobfeatures/targets (written once the machine's own
    // network, and so the host's address on it, exists) and reports what answered.
    let script = r#"
out=$JOBOUTPUTS/result
for t in $(cat $JOBFEATURES/targets); do
  echo "$t=$(nc -w 5 ${t%:*} ${t#*:} </dev/null 2>&1 | head -n 1)"
done > $out.partial
mv $out.partial $out
"#;
    let mjf = mjf_dir(tmp.path(), script);
    let mut s = spec(&owner, "egress", &image, &mjf);
    s.egress = vec![format!("{host}:{a}"), "[2001:db8::1]:443".into()];
    let m = rt.create(&s).await.unwrap();

    // The container is on its own network, whose bridge the policy's chain is hooked on.
    let names = EgressNames::for_machine(&s.name);
    let mode = docker_cli(&[
        "inspect",
        "--format",
        "{{.HostConfig.NetworkMode}}",
        &m.engine_id,
    ]);
    assert_eq!(mode.trim(), names.network);
    let rules = iptables_rules();
    for want in [
        format!("-A DOCKER-USER -i {} -j {}", names.bridge, names.chain),
        format!("-A INPUT -i {} -j {}", names.bridge, names.chain),
        format!(
            "-A {} -d {host}/32 -p tcp -m tcp --dport {a} -j RETURN",
            names.chain
        ),
    ] {
        assert!(rules.contains(&want), "{want} not in:\n{rules}");
    }
    let own = gateway(&names.network);
    let targets = [
        format!("{host}:{a}"),
        format!("{host}:{b}"),
        format!("{own}:{a}"),
    ];
    std::fs::write(mjf.join("jobfeatures/targets"), targets.join("\n")).unwrap();

    rt.start(&m).await.unwrap();
    assert_eq!(wait_exit(&rt, &m, 90).await, Some(0));
    let result = wait_file(&mjf.join("joboutputs/result"), 10).await;
    let answer = |t: &str| {
        result
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{t}=")))
            .unwrap_or_else(|| panic!("no line for {t} in:\n{result}"))
            .to_owned()
    };
    assert_eq!(answer(&targets[0]), "hello-a", "{result}");
    assert_ne!(answer(&targets[1]), "hello-b", "another port: {result}");
    assert_ne!(answer(&targets[2]), "hello-a", "another address: {result}");

    // Without the rules the same container reaches them all: the policy, not the network, is
    // what stopped it.
    remove_egress_rules(&names);
    std::fs::remove_file(mjf.join("joboutputs/result")).unwrap();
    rt.start(&m).await.unwrap();
    assert_eq!(wait_exit(&rt, &m, 90).await, Some(0));
    let result = wait_file(&mjf.join("joboutputs/result"), 10).await;
    for (t, tag) in [(&targets[1], "hello-b"), (&targets[2], "hello-a")] {
        assert!(result.contains(&format!("{t}={tag}\n")), "{t}: {result}");
    }

    // Removing the machine removes its network and (re-applied here) its rules.
    rt.remove(&m).await.unwrap();
    let m = rt.create(&s).await.unwrap();
    assert!(iptables_rules().contains(&names.chain));
    guard.finish(&rt, &[&m]).await;
    let rules = iptables_rules();
    assert!(!rules.contains(&names.chain), "{rules}");
    assert!(!rules.contains(&names.bridge), "{rules}");
}

#[tokio::test]
async fn stray_egress_networks_and_rules_are_swept() {
    let owner = owner("egress-stray");
    let guard = Guard::new(&owner);
    let tmp = tempfile::tempdir().unwrap();
    let rt = runtime(&owner, &tmp.path().join("cache")).await;
    let image = busybox(&rt).await;
    let mjf = mjf_dir(tmp.path(), "true\n");
    let host = gateway("bridge");
    let mut kept = spec(&owner, "kept", &image, &mjf);
    kept.egress = vec![format!("{host}:9")];
    let mut lost = spec(&owner, "lost", &image, &mjf);
    lost.egress = vec![format!("{host}:9")];
    let k = rt.create(&kept).await.unwrap();
    let l = rt.create(&lost).await.unwrap();
    // A daemon that died after the engine lost the container (or before it made it) leaves the
    // network and its rules with no machine to remove them with.
    docker_cli(&["rm", "-f", &l.engine_id]);
    let lost_names = EgressNames::for_machine(&lost.name);
    assert!(iptables_rules().contains(&lost_names.chain));

    let swept = rt.remove_strays().await.unwrap();
    assert_eq!(swept, vec![lost_names.network.clone()]);
    assert!(!iptables_rules().contains(&lost_names.chain));
    // The machine still there keeps its network and rules.
    assert_eq!(
        guard.networks(),
        vec![EgressNames::for_machine(&kept.name).network]
    );
    assert!(iptables_rules().contains(&EgressNames::for_machine(&kept.name).chain));
    guard.finish(&rt, &[&k]).await;
}
