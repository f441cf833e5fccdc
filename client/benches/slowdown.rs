//! Owner slowdown: the throughput of an owner's single-threaded CPU benchmark (SHA-256 over 64 KiB
//! blocks) alone, and then while a `gleaner daemon` runs two busy guests under the "always, gently"
//! policy with the owner at the machine (input on a real Xvfb keeps them throttled to one core).
//! Goal: the owner keeps ≥ 97 % of the throughput alone. In the same run, the guests' parent cgroup
//! is then put back to normal CPU weight (`cpu.idle = 0`) to show what the idle mark is worth.
//!
//! Run: `cargo bench -p gleaner-client --bench slowdown` (dockerd running, Xvfb installed);
//! `GLEANER_BENCH_ROUNDS` sets the interleaved rounds (5).

mod common;
use common::busybox_tarball;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gleaner::{Backend, Blob, Envelope, MachineType, SecretKey};
use sha2::Digest as _;
use x11rb::connection::Connection;
use x11rb::protocol::xtest::ConnectionExt as _;

/// The owner's work: SHA-256 blocks hashed in `d`.
fn owner_blocks(d: Duration) -> f64 {
    let buf = vec![7u8; 64 * 1024];
    let t0 = Instant::now();
    let mut n = 0u64;
    let mut acc = [0u8; 32];
    while t0.elapsed() < d {
        let mut h = sha2::Sha256::new();
        h.update(acc);
        h.update(&buf);
        acc.copy_from_slice(&h.finalize());
        n += 1;
    }
    std::hint::black_box(acc);
    n as f64 / t0.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Kill(Vec<Child>, String);

impl Drop for Kill {
    fn drop(&mut self) {
        for c in self.0.iter_mut().rev() {
            // SIGTERM first: the daemon stops its machines.
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            for _ in 0..100 {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn status(sock: &Path) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_gleaner"))
        .args(["status", "--json", "--socket"])
        .arg(sock)
        .output()
        .expect("gleaner status");
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

fn main() {
    // Rounds alternate guests in the background / at normal weight / paused; the medians of
    // several rounds keep one noisy 5 s window (another process's burst) from deciding the row.
    let rounds: usize = std::env::var("GLEANER_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(5);
    let period = Duration::from_secs(5);
    let alone = median((0..rounds).map(|_| owner_blocks(period)).collect());

    let dir = std::env::temp_dir().join(format!("gleaner-slowdown-{}", std::process::id()));
    let types = dir.join("types");
    std::fs::create_dir_all(&types).expect("dir");
    let publisher = SecretKey::from_seed([0x52; 32]);
    let (path, sha256) = busybox_tarball();
    let mut mt = MachineType::example(publisher.public());
    mt.name = "busy".into();
    mt.backend = Backend::Container;
    mt.image = Some(Blob {
        url: format!("file://{}", path.display()),
        sha256,
    });
    mt.user_data = "while :; do touch /joboutputs/heartbeat; i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; done".into();
    mt.cores_min = 1;
    mt.cores_max = 1;
    mt.memory_mib = 128;
    mt.disk_mib = 64;
    mt.not_after = 4_000_000_000;
    std::fs::write(
        types.join("busy.gmt"),
        Envelope::seal(&mt, &publisher).to_bytes(),
    )
    .expect("write type");

    let d = 100 + std::process::id() % 50;
    let display = format!(":{d}");
    let xvfb = Command::new("Xvfb")
        .args([&display, "-nolisten", "tcp", "-screen", "0", "640x480x24"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("Xvfb is installed");
    std::thread::sleep(Duration::from_secs(1));
    let sock = dir.join("control.sock");
    let daemon = Command::new(env!("CARGO_BIN_EXE_gleaner"))
        .args([
            "daemon",
            "--no-space",
            "--preset",
            "always-gently",
            "--idle-after",
            "3s",
        ])
        .args([
            "--display",
            &display,
            "--idle-sources",
            "x11",
            "--suspend-above-load",
            "off",
        ])
        .args(["--trust", &publisher.public().to_string()])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--socket")
        .arg(&sock)
        .arg("--machine-types")
        .arg(&types)
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("gleaner daemon");
    let _kill = Kill(vec![xvfb, daemon], dir.display().to_string());
    // Away first: both guests start on both cores.
    let t0 = Instant::now();
    while status(&sock)["factory"]["machines"]
        .as_array()
        .is_none_or(|m| m.len() < 2)
    {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "two guests did not start"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The owner sits down: input every half second keeps the policy at "throttled".
    let (conn, screen) =
        x11rb::rust_connection::RustConnection::connect(Some(&display)).expect("X");
    let root = conn.setup().roots[screen].root;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let input = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut i = 0i16;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i = (i + 1) % 400;
                let _ = conn.xtest_fake_input(6, 0, x11rb::CURRENT_TIME, root, i, 20, 0);
                let _ = conn.flush();
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    let t0 = Instant::now();
    loop {
        let s = status(&sock);
        if s["factory"]["allowance"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("throttled"))
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the owner was not seen: {s}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    // The enforcer has put the guests in the background (their parent cgroup marked idle).
    // Rounds alternate with the same guests put back at normal weight by hand — what the owner
    // got before — and with the guests paused (the owner alone again), so every row sees the
    // same load from the rest of the machine.
    let host = status(&sock)["host"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let parent = gleaner_client::runtime::docker::cgroup_parent_name(&host);
    assert_eq!(
        gleaner_client::runtime::docker::cgroup_cpu_idle(&parent),
        Some(true),
        "the enforcer did not put the guests in the background"
    );
    let idle_file = |on: bool| {
        gleaner_client::runtime::docker::cgroup_set_cpu_idle(&parent, on).expect("cpu.idle")
    };
    let wait_reason = |want: &str| {
        let t0 = Instant::now();
        while !status(&sock)["factory"]["allowance"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains(want))
        {
            assert!(t0.elapsed() < Duration::from_secs(30), "no {want:?} reason");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let gleaner = |cmd: &str| {
        let st = Command::new(env!("CARGO_BIN_EXE_gleaner"))
            .args([cmd, "--socket"])
            .arg(&sock)
            .stdout(Stdio::null())
            .status()
            .expect("gleaner");
        assert!(st.success(), "gleaner {cmd}");
    };
    let (mut with, mut normal, mut paused) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        idle_file(true);
        std::thread::sleep(Duration::from_millis(500));
        with.push(owner_blocks(period));
        idle_file(false);
        std::thread::sleep(Duration::from_millis(500));
        normal.push(owner_blocks(period));
        gleaner("pause");
        wait_reason("paused");
        std::thread::sleep(Duration::from_millis(500));
        paused.push(owner_blocks(period));
        gleaner("resume");
        wait_reason("throttled");
        std::thread::sleep(Duration::from_millis(500));
    }
    let (with, normal, paused) = (median(with), median(normal), median(paused));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = input.join();
    let share = with / paused;
    println!(
        "\nOwner slowdown: SHA-256 blocks/s, median of {rounds} × {} s",
        period.as_secs()
    );
    println!("| owner benchmark | blocks/s | share of alone | goal |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| alone, before the daemon started | {alone:.0} | {:.1} % | |",
        alone / paused * 100.0
    );
    println!("| alone, guests paused (interleaved: the reference) | {paused:.0} | 100 % | |");
    println!(
        "| two busy guests, owner present, always-gently (guests in the background) | {with:.0} | {:.1} % | ≥ 97 % {} |",
        share * 100.0,
        if share >= 0.97 { "✅" } else { "❌" }
    );
    println!(
        "| the same guests at normal CPU weight (cpu.idle = 0, as before) | {normal:.0} | {:.1} % | |",
        normal / paused * 100.0
    );
}
