//! The idle daemon lets go of its executable's start-up pages: a real `gleaner daemon` process,
//! its resident pages of the `gleaner` binary read from `/proc/PID/smaps` before and after the
//! idle release point (`--idle-release-after`), while it keeps answering status; and it runs with
//! transparent huge pages off (docs/BENCHMARKS.md, idle footprint; the goal itself is measured by
//! `benches/footprint.rs`).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// Resident KiB of the mappings of `exe` in process `pid` (all of them: text, rodata, relro, data).
fn exe_rss_kib(pid: u32, exe: &Path) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/smaps: {e}"));
    let exe = exe.to_string_lossy();
    let mut in_exe = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            in_exe = f.nth(4).is_some_and(|p| p == exe);
        } else if in_exe && first == "Rss:" {
            kib += f.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    kib
}

fn status(sock: &Path) -> Option<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_gleaner"))
        .args(["status", "--json", "--socket"])
        .arg(sock)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success() && text.contains("engines")).then_some(text)
}

/// Polls `f` every second until it returns Some, or panics after `secs` with `what`.
fn poll<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "after {secs} s still no {what}");
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn an_idle_daemon_lets_go_of_its_executables_start_up_pages_and_keeps_answering() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let types = tmp.path().join("types");
    std::fs::create_dir_all(&types).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    let sock = state.join("control.sock");
    let log = tmp.path().join("daemon.log");
    let exe: PathBuf = std::fs::canonicalize(env!("CARGO_BIN_EXE_gleaner")).unwrap();
    // Long enough that start-up's pages are resident when first measured, even on a loaded
    // machine; the release is then seen in the log and in smaps.
    let mut cmd = daemon_command(&state, &types, &["--idle-release-after", "30"]);
    cmd.env("RUST_LOG", "warn,gleaner_client::daemon=debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let daemon = Daemon(cmd.spawn().expect("start gleaner daemon"));
    let pid = daemon.0.id();

    poll(240, "status from the daemon", || status(&sock));
    // Transparent huge pages are off for the daemon: where they are on, mimalloc's regions are
    // backed by 2 MiB pages and the idle daemon held twice its goal (docs/BENCHMARKS.md).
    let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    if let Some(thp) = proc_status.lines().find(|l| l.starts_with("THP_enabled:")) {
        assert!(thp.ends_with('0'), "the daemon has {thp}");
    }
    let released = |log: &Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .find(|l| l.contains("let go of the executable's and libraries' resident pages"))
            .map(str::to_owned)
    };
    let before = exe_rss_kib(pid, &exe);
    assert!(
        released(&log).is_none(),
        "the pages were let go before start-up was measured (the daemon answered status more \
         than 30 s after its housekeeping began?)"
    );
    assert!(
        before > 1024,
        "start-up left only {before} KiB of the binary resident"
    );

    let line = poll(240, "release of the executable's pages in the log", || {
        released(&log)
    });
    let after = poll(60, "the binary's resident pages halved", || {
        let kib = exe_rss_kib(pid, &exe);
        (kib * 2 <= before).then_some(kib)
    });
    eprintln!("the binary's resident pages: {before} KiB at start-up, {after} KiB after ({line})");

    // The daemon goes on working: status answers a few idle rounds later (housekeeping every 6 s),
    // with the pages its idle loop and the status call faulted back in — fewer than start-up's
    // (how many, in a release build after ten minutes, is the footprint bench's to say; a debug
    // build's unoptimised code spreads over more pages).
    std::thread::sleep(Duration::from_secs(15));
    let text = poll(60, "status after the release", || status(&sock));
    assert!(text.contains("machines"), "{text}");
    let settled = exe_rss_kib(pid, &exe);
    eprintln!("{settled} KiB after 15 s more of idling and a status call");
    assert!(
        settled < before,
        "the idle daemon touched all its binary back in: {before} KiB at start-up, {settled} KiB now"
    );
    drop(daemon);
}
