//! Container runtime benchmark against the real dockerd, printing ratios to baselines measured in
//! the same run: start latency with a cached image vs plain `docker run` of the same image, and
//! freeze latency (p50/p99) vs a raw SIGSTOP of a host process.
//!
//! Run: `cargo bench -p gleaner-client --bench runtime --profile dev` (dockerd running, see
//! installers/install-deps.sh --start). `GLEANER_BENCH_N` sets the sample count (default 20).

mod common;
use common::{busybox_tarball, percentile};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use gleaner::Id16;
use gleaner_client::runtime::docker::DockerRuntime;
use gleaner_client::runtime::{
    ImageSource, Limits, MachineHandle, MachineSpec, OWNER_LABEL, Runtime,
};

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

/// Removes every container (and egress network) carrying the bench's owner label, also when the
/// bench panics.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let out = Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                &format!("label={OWNER_LABEL}={}", self.0),
            ])
            .output();
        if let Ok(out) = out {
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
        common::remove_egress_networks(&self.0);
    }
}

fn mjf(root: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = root.join("mjf");
    for sub in ["machinefeatures", "jobfeatures", "joboutputs"] {
        std::fs::create_dir_all(dir.join(sub)).expect("mjf dir");
    }
    std::fs::set_permissions(
        dir.join("joboutputs"),
        std::fs::Permissions::from_mode(0o1777),
    )
    .expect("chmod");
    std::fs::write(dir.join("user_data"), "sleep 600\n").expect("user_data");
    dir
}

/// Freezes the host process `pid` with SIGSTOP and waits until the kernel reports it stopped.
fn sigstop_latency(pid: i32) -> Duration {
    let stat = format!("/proc/{pid}/stat");
    let t0 = Instant::now();
    // SAFETY: kill(2) with a valid pid of our own child and a valid signal number.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    loop {
        let s = std::fs::read_to_string(&stat).expect("proc stat");
        // The state follows the ")" that closes the command name.
        if s.rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next())
            == Some("T")
        {
            break;
        }
        std::hint::spin_loop();
    }
    let d = t0.elapsed();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    d
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("GLEANER_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let owner = format!("bench-runtime-{}", std::process::id());
    let _cleanup = Cleanup(owner.clone());
    let tmp = std::env::temp_dir().join(&owner);
    std::fs::create_dir_all(&tmp).expect("tmp dir");
    let rt = DockerRuntime::connect(&owner, tmp.join("cache"), 1 << 30)
        .await
        .expect("dockerd is running (installers/install-deps.sh --start)");
    let (path, sha256) = busybox_tarball();
    let source = ImageSource {
        backend: gleaner_client::runtime::Backend::Container,
        url: format!("file://{}", path.display()),
        sha256,
    };
    // Warm the cache: every measured start below is a cache hit.
    let image = rt.prepare_image(&source, &|_| {}).await.expect("prepare");
    let mjf = mjf(&tmp);

    let spec = |i: usize| MachineSpec {
        backend: gleaner_client::runtime::Backend::Container,
        machine_id: Id16([i as u8; 16]),
        machine_type: sha256,
        name: format!("{owner}-{i}"),
        image: Some(image.clone()),
        kernel: None,
        initrd: None,
        cores: 1,
        limits: Limits {
            cpus: 1.0,
            memory_bytes: 128 << 20,
        },
        disk_bytes: 64 << 20,
        pids_limit: 64,
        mjf_dir: mjf.clone(),
        egress: vec![],
        command: Some(vec!["sleep".into(), "600".into()]),
        labels: BTreeMap::new(),
    };

    // Start latency: ours (prepare from cache + create + start) vs `docker run -d`, interleaved
    // so that both see the same engine state.
    let mut ours = Vec::new();
    let mut filtered = Vec::new();
    let mut plain = Vec::new();
    let mut handles: Vec<MachineHandle> = Vec::new();
    for i in 0..n {
        let t0 = Instant::now();
        let img = rt.prepare_image(&source, &|_| {}).await.expect("prepare");
        assert_eq!(img, image);
        let h = rt.create(&spec(i)).await.expect("create");
        rt.start(&h).await.expect("start");
        ours.push(t0.elapsed());
        handles.push(h);

        // The same with an egress list: its own bridge network and iptables chain first.
        let mut with_egress = spec(n + 2 + i);
        with_egress.egress = vec!["192.0.2.1:443".into()];
        let t0 = Instant::now();
        let h = rt.create(&with_egress).await.expect("create with egress");
        rt.start(&h).await.expect("start with egress");
        filtered.push(t0.elapsed());
        handles.push(h);

        let t0 = Instant::now();
        let out = Command::new("docker")
            .args([
                "run",
                "-d",
                "--label",
                &format!("{OWNER_LABEL}={owner}"),
                &image.reference,
                "sleep",
                "600",
            ])
            .output()
            .expect("docker run");
        plain.push(t0.elapsed());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Keep the engine's container count flat between samples.
        for h in handles.drain(..) {
            rt.remove(&h).await.expect("remove");
        }
        let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let _ = Command::new("docker").args(["rm", "-f", &id]).output();
    }
    ours.sort();
    filtered.sort();
    plain.sort();

    // Freeze latency: pause of a busy container vs SIGSTOP of a busy host process.
    let mut busy = spec(n + 1);
    busy.command = Some(vec!["sh".into(), "-c".into(), "while :; do :; done".into()]);
    busy.limits.cpus = 0.5;
    let h = rt.create(&busy).await.expect("create");
    rt.start(&h).await.expect("start");
    let mut freeze = Vec::new();
    for _ in 0..n * 5 {
        let t0 = Instant::now();
        rt.freeze(&h).await.expect("freeze");
        freeze.push(t0.elapsed());
        rt.thaw(&h).await.expect("thaw");
    }
    rt.remove(&h).await.expect("remove");
    freeze.sort();

    let mut child = Command::new("sh")
        .args(["-c", "while :; do :; done"])
        .spawn()
        .expect("spawn");
    let pid = child.id() as i32;
    let mut stop = Vec::new();
    for _ in 0..n * 5 {
        stop.push(sigstop_latency(pid));
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = child.kill();
    let _ = child.wait();
    stop.sort();
    let _ = std::fs::remove_dir_all(&tmp);

    let p50 = |v: &[Duration]| percentile(v, 0.5);
    let p99 = |v: &[Duration]| percentile(v, 0.99);
    println!("\nContainer runtime, {n} starts and {} freezes each", n * 5);
    println!("| metric | gleaner | baseline | ratio | goal |");
    println!("| --- | --- | --- | --- | --- |");
    let ratio = p50(&ours).as_secs_f64() / p50(&plain).as_secs_f64();
    println!(
        "| start, cached image (p50) | {} | {} (`docker run -d`) | {ratio:.2}× | ≤ 1.1× {} |",
        ms(p50(&ours)),
        ms(p50(&plain)),
        if ratio <= 1.1 { "✅" } else { "❌" }
    );
    println!(
        "| start, cached image (p99) | {} | {} | {:.2}× | |",
        ms(p99(&ours)),
        ms(p99(&plain)),
        p99(&ours).as_secs_f64() / p99(&plain).as_secs_f64()
    );
    println!(
        "| start, egress list (p50) | {} | {} (`docker run -d`) | {:.2}× | |",
        ms(p50(&filtered)),
        ms(p50(&plain)),
        p50(&filtered).as_secs_f64() / p50(&plain).as_secs_f64()
    );
    println!(
        "| start, egress list (p99) | {} | {} | {:.2}× | |",
        ms(p99(&filtered)),
        ms(p99(&plain)),
        p99(&filtered).as_secs_f64() / p99(&plain).as_secs_f64()
    );
    println!(
        "| freeze (p50) | {} | {} (SIGSTOP) | {:.0}× | |",
        us(p50(&freeze)),
        us(p50(&stop)),
        p50(&freeze).as_secs_f64() / p50(&stop).as_secs_f64()
    );
    println!(
        "| freeze (p99) | {} | {} (SIGSTOP) | {:.0}× | |",
        us(p99(&freeze)),
        us(p99(&stop)),
        p99(&freeze).as_secs_f64() / p99(&stop).as_secs_f64()
    );
}
