//! The daemon's idle footprint: resident memory and CPU time per second of an idle `gleaner daemon`
//! (in a space, watching the owner, no work offered) after it has settled, beside a `sleep` process
//! (the floor any process pays) measured in the same run. Goals: ≤ 12 MiB RSS, ≤ 1 ms CPU per second.
//!
//! Run: `cargo build --release -p gleaner-vmhost && cargo bench -p gleaner-client --bench footprint`
//! (release build; dockerd and libvirtd running: the daemon must be one that could run VMs, so the
//! VM helper `gleaner-vmhost` must sit beside `gleaner`, and the bench checks that the daemon found
//! libvirt through it). `GLEANER_FOOTPRINT_S` sets how long the daemon idles before the measured
//! minute (default 600). Prints the resident memory per mapping, and whether the helper still runs.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Resident memory (KiB) and CPU time (ticks) of `pid`, from /proc.
fn sample(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .expect("stat")
        .split_whitespace()
        .collect();
    // After the command name: state is field 3, utime 14 and stime 15 (1-based in proc(5)).
    let ticks =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    (rss, ticks)
}

/// The daemon's resident memory by kind: anonymous (heap, stacks) vs file-backed (the binary's
/// pages, shared with other processes mapping it) — from /proc/PID/status.
fn rss_split(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .filter(|l| {
            l.starts_with("RssAnon:") || l.starts_with("RssFile:") || l.starts_with("Threads:")
        })
        .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Resident memory (KiB) per mapped file (or `[heap]`, `[stack]`, `anonymous`), largest first.
fn rss_by_mapping(pid: u32) -> Vec<(String, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut by: std::collections::BTreeMap<String, u64> = Default::default();
    let mut current = String::from("anonymous");
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: range perms offset dev inode [path].
            current = f.nth(4).unwrap_or("anonymous").to_owned();
        } else if first == "Rss:" {
            *by.entry(current.clone()).or_default() +=
                f.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    let mut v: Vec<_> = by.into_iter().filter(|(_, kib)| *kib > 0).collect();
    v.sort_by_key(|m| std::cmp::Reverse(m.1));
    v
}

/// The pids of `parent`'s children named `name`.
fn children_named(parent: u32, name: &str) -> Vec<u32> {
    let out = Command::new("pgrep")
        .args(["-P", &parent.to_string(), "-x", name])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

struct Kill(Vec<Child>);

impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn main() {
    let settle: u64 = std::env::var("GLEANER_FOOTPRINT_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let window = Duration::from_secs(60);
    let gleaner = std::path::Path::new(env!("CARGO_BIN_EXE_gleaner"));
    let helper = gleaner.with_file_name("gleaner-vmhost");
    assert!(
        helper.is_file(),
        "no {} beside the daemon: build it first (cargo build --release -p gleaner-vmhost), \
         or the daemon measured could not run VMs",
        helper.display()
    );
    let dir = std::env::temp_dir().join(format!("gleaner-footprint-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("types")).expect("dir");
    let daemon = Command::new(env!("CARGO_BIN_EXE_gleaner"))
        .args(["daemon", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--socket")
        .arg(dir.join("control.sock"))
        .arg("--machine-types")
        .arg(dir.join("types"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start gleaner daemon");
    let floor = Command::new("sleep").arg("100000").spawn().expect("sleep");
    let (dpid, fpid) = (daemon.id(), floor.id());
    let _kill = Kill(vec![daemon, floor]);
    // A daemon that could run VMs: its engines (status) name libvirt, reached through the helper.
    let t = Instant::now();
    let engines = loop {
        let out = Command::new(gleaner)
            .args(["status", "--json", "--socket"])
            .arg(dir.join("control.sock"))
            .output()
            .expect("gleaner status");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && text.contains("engines") {
            break text;
        }
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "the daemon never answered status"
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    assert!(
        engines.contains("vms: libvirt"),
        "the daemon found no libvirt (is libvirtd running?): {engines}"
    );
    eprintln!(
        "the daemon runs VMs through {} ({} helper process now)",
        helper.display(),
        children_named(dpid, "gleaner-vmhost").len()
    );
    eprintln!(
        "idling {settle} s, then measuring for {} s",
        window.as_secs()
    );
    std::thread::sleep(Duration::from_secs(settle));
    let (_, d0) = sample(dpid);
    let (_, f0) = sample(fpid);
    let t0 = Instant::now();
    std::thread::sleep(window);
    let secs = t0.elapsed().as_secs_f64();
    let (drss, d1) = sample(dpid);
    let split = rss_split(dpid);
    let (frss, f1) = sample(fpid);
    let mappings = rss_by_mapping(dpid);
    let helpers = children_named(dpid, "gleaner-vmhost");
    let _ = std::fs::remove_dir_all(&dir);
    // Ticks are 1/100 s on Linux.
    let cpu_ms = |a: u64, b: u64| (b - a) as f64 * 10.0 / secs;
    let (dcpu, fcpu) = (cpu_ms(d0, d1), cpu_ms(f0, f1));
    println!(
        "\nIdle footprint after {settle} s, CPU over the next {:.0} s",
        secs
    );
    println!("| process | RSS | CPU per second | goal |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| gleaner daemon (space, owner watch, no work) | {:.1} MiB | {dcpu:.2} ms | ≤ 12 MiB {}, ≤ 1 ms {} |",
        drss as f64 / 1024.0,
        if drss <= 12 * 1024 { "✅" } else { "❌" },
        if dcpu <= 1.0 { "✅" } else { "❌" }
    );
    println!(
        "| `sleep` (floor) | {:.1} MiB | {fcpu:.2} ms | |",
        frss as f64 / 1024.0
    );
    println!("| ratio | {:.1}× | | |", drss as f64 / frss.max(1) as f64);
    println!("\ndaemon RSS by kind (KiB): {split}");
    println!(
        "VM helper processes at the end: {} (let go when idle)",
        helpers.len()
    );
    println!("\n| daemon mapping | RSS (KiB) |\n| --- | --- |");
    for (name, kib) in mappings.iter().take(25) {
        println!("| {name} | {kib} |");
    }
    let virt: u64 = mappings
        .iter()
        .filter(|(n, _)| n.contains("libvirt"))
        .map(|(_, k)| k)
        .sum();
    println!("| (libvirt's own libraries, all) | {virt} |");
}
