//! The Docker runtime against the real dockerd (started by installers/install-deps.sh --start):
//! MJF and user_data reach the workload, limits hold by behaviour, the hardening shows in
//! `docker inspect`, freeze/thaw, graceful stop, images verified before loading, and nothing is
//! left behind. Each test has its own owner label, so they run in parallel.

mod common;

use std::time::{Duration, Instant};

use common::*;
use gleaner::Digest;
use gleaner_client::runtime::docker::{DockerRuntime, image_tag};
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

    // A signed egress policy is what opens the network.
    let mut open = spec(&owner, "egress", &image, &mjf);
    open.egress = vec!["https://queue.example.org".into()];
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
    let a = rt.sample(&m).await.unwrap().cpu_ns;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b = rt.sample(&m).await.unwrap().cpu_ns;
    assert_eq!(a, b, "cpu time grew while frozen");
    rt.thaw(&m).await.unwrap();
    assert_eq!(rt.state(&m).await.unwrap(), MachineState::Running);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let c = rt.sample(&m).await.unwrap().cpu_ns;
    assert!(
        c - b > 200_000_000,
        "only {} ns of cpu in the second after thaw",
        c - b
    );
    // A frozen machine still stops: it is thawed to receive its stop signal.
    rt.freeze(&m).await.unwrap();
    let state = rt.stop(&m, Duration::from_secs(2)).await.unwrap();
    assert!(matches!(state, MachineState::Exited { .. }), "{state:?}");
    guard.finish(&rt, &[&m]).await;
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
