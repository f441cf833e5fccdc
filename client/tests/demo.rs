//! The main job end to end: `gleaner demo` brings up a coordinator and three client daemons that
//! run real containers (and, with libvirtd, a VM), until the dashboard shows credit from all three
//! and from the VM project; then it shuts down and nothing is left in the engines. Ctrl-C stops
//! it as cleanly, at once, whether it is watching or still starting.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One demo at a time: each brings up a whole local space.
static ONE_DEMO: Mutex<()> = Mutex::new(());

/// The `gleaner` binary, with the coordinator's beside it.
fn gleaner() -> std::path::PathBuf {
    let gleaner = std::path::PathBuf::from(env!("CARGO_BIN_EXE_gleaner"));
    if !gleaner.with_file_name("gleaner-coordinator").exists() {
        let st = Command::new(env!("CARGO"))
            .args(["build", "-p", "gleaner-coordinator"])
            .status()
            .unwrap();
        assert!(st.success());
    }
    gleaner
}

#[test]
fn demo_reaches_credit_from_every_client_and_leaves_nothing() {
    let _one = ONE_DEMO.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(gleaner())
        .args([
            "demo",
            "--work-seconds",
            "6",
            "--until-credit",
            "--duration",
            "240",
        ])
        .arg("--dir")
        .arg(dir.path().join("demo"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("every client's credit is on the dashboard"),
        "{text}"
    );
    assert!(text.contains("from 3 volunteers"), "{text}");
    assert!(text.contains("nothing left behind"), "{text}");
    // With libvirtd here, the VM project ran too and its credit reached the dashboard.
    if text.contains("VMs under") {
        assert!(
            text.contains("the VM project's credit (demo-vm-hashing) is on the dashboard"),
            "{text}"
        );
    }
    assert!(
        text.contains("client-1 sees 3 factories"),
        "the daemons found each other: {text}"
    );
    assert!(
        text.contains("the dashboard's space page shows 3"),
        "the coordinator joined the space and shows their capacity: {text}"
    );
    assert!(
        !dir.path().join("demo").exists(),
        "the working folder is removed"
    );
}

/// Runs the demo in its own process group, as a terminal runs its foreground job; once `ready`
/// says of its output so far that the time has come, sends SIGINT to the whole group, as a
/// terminal does on Ctrl-C, and returns how the demo ended and all it printed.
fn interrupted_demo(dir: &std::path::Path, ready: impl Fn(&str) -> bool) -> (ExitStatus, String) {
    let mut child = Command::new(gleaner())
        .args(["demo", "--work-seconds", "6"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let pgid = i32::try_from(child.id()).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    for pipe in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    drop(tx);
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !ready(&text) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            let _ = child.kill();
            panic!("the demo never came that far: {text}");
        };
        text.push_str(&line);
        text.push('\n');
    }
    // SAFETY: kill(2) with a negative pid signals that process group; no memory is involved.
    assert_eq!(unsafe { libc::kill(-pgid, libc::SIGINT) }, 0);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                text.push_str(&line);
                text.push('\n');
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!("the demo did not stop after Ctrl-C: {text}");
            }
        }
    }
    (child.wait().unwrap(), text)
}

/// Processes whose command line names `dir` (the demo's coordinator and daemons all do).
fn processes_under(dir: &std::path::Path) -> Vec<String> {
    let dir = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(&dir) {
                found.push(cmd);
            }
        }
    }
    found
}

/// The demo at `demo` exited cleanly, said it left nothing in the engines, removed its folder and
/// left no process of its own.
fn stopped_cleanly(demo: &std::path::Path, st: ExitStatus, text: &str) {
    assert!(st.success(), "{st}: {text}");
    assert!(text.contains("nothing left behind"), "{text}");
    assert!(!demo.exists(), "the working folder is removed: {text}");
    assert_eq!(processes_under(demo), Vec::<String>::new(), "{text}");
}

/// Ctrl-C in the terminal reaches the demo and its daemons alike (one process group): the demo
/// stops everything, says so, removes its folder, and does not wait on a space its daemons have
/// already left.
#[test]
fn ctrl_c_stops_the_demo_cleanly() {
    let _one = ONE_DEMO.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    // Up, and watching: the first client's status line comes after "Press Ctrl-C".
    let (st, text) = interrupted_demo(&demo, |text| {
        text.split_once("Press Ctrl-C")
            .is_some_and(|(_, after)| after.contains("client-1:"))
    });
    stopped_cleanly(&demo, st, &text);
    assert!(text.contains("interrupted"), "{text}");
    assert!(
        !text.contains("factories in the space"),
        "no wait on the space the daemons left: {text}"
    );
}

/// Ctrl-C while the demo is still starting (the coordinator up, the daemons being started) stops
/// what had started as cleanly: no process of the demo's is left, nor its folder.
#[test]
fn ctrl_c_while_starting_stops_the_demo_cleanly() {
    let _one = ONE_DEMO.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    let (st, text) = interrupted_demo(&demo, |text| text.contains("client daemons"));
    stopped_cleanly(&demo, st, &text);
    assert!(text.contains("interrupted while starting"), "{text}");
    assert!(
        !text.contains("Press Ctrl-C"),
        "it never got to watching: {text}"
    );
    assert!(text.contains("stopping the coordinator"), "{text}");
}
