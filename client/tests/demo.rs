//! The main job end to end: `gleaner demo` brings up a coordinator and three client daemons that
//! run real containers (and, with libvirtd, a VM), until the dashboard shows credit from all three
//! and from the VM project; then it shuts down and nothing is left in the engines. Ctrl-C stops
//! it as cleanly, at once.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
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

/// Ctrl-C in the terminal reaches the demo and its daemons alike (one process group): the demo
/// stops everything, says so, removes its folder, and does not wait on a space its daemons have
/// already left.
#[test]
fn ctrl_c_stops_the_demo_cleanly() {
    let _one = ONE_DEMO.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(gleaner())
        .args(["demo", "--work-seconds", "6"])
        .arg("--dir")
        .arg(dir.path().join("demo"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, as a terminal's foreground job is.
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
    // Up, and watching: the first client's status line comes after "Press Ctrl-C".
    let mut pressed = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            let _ = child.kill();
            panic!("the demo never came up: {text}");
        };
        text.push_str(&line);
        text.push('\n');
        pressed |= line.contains("Press Ctrl-C");
        if pressed && line.contains("client-1:") {
            break;
        }
    }
    // What a terminal does on Ctrl-C: SIGINT to the whole foreground group.
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
    let st = child.wait().unwrap();
    assert!(st.success(), "{st}: {text}");
    assert!(text.contains("interrupted"), "{text}");
    assert!(
        !text.contains("factories in the space"),
        "no wait on the space the daemons left: {text}"
    );
    assert!(text.contains("nothing left behind"), "{text}");
    assert!(
        !dir.path().join("demo").exists(),
        "the working folder is removed: {text}"
    );
}
