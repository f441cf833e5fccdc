//! The owner policy on a real X server (Xvfb) with a real container: an idle machine runs the
//! workload, mouse input (xdotool) freezes it at once, idle again thaws it; a CPU hog outside
//! Gleaner suspends work too; under "always, gently" guests go to the background (idle CPU class)
//! only while the owner is present.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use gleaner_client::control::{ControlClient, Request};
use gleaner_client::runtime::{MachineState, Runtime};
use support::*;

/// Kills its processes, then removes the containers of `owner` (the daemon first, so it cannot
/// start new ones while they are removed).
struct Kill(Vec<Child>, Option<String>);

impl Drop for Kill {
    fn drop(&mut self) {
        for c in self.0.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(o) = &self.1 {
            remove_owned(o);
        }
    }
}

/// Xvfb on a display it picks itself (`-displayfd`: free, stale locks taken over), once it says
/// it is ready.
fn xvfb() -> (Child, String) {
    let mut child = Command::new("Xvfb")
        .args([
            "-displayfd",
            "1",
            "-nolisten",
            "tcp",
            "-screen",
            "0",
            "640x480x24",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("Xvfb is installed (installers/install-deps.sh)");
    let mut line = String::new();
    let out = child.stdout.take().expect("Xvfb's stdout");
    std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line).expect("Xvfb");
    let n: u32 = line.trim().parse().expect("Xvfb names its display");
    (child, format!(":{n}"))
}

async fn reason(sock: &Path) -> String {
    let mut c = ControlClient::connect(sock).await.unwrap();
    let s = c.call(&Request::Status).await.unwrap();
    s["factory"]["allowance"]["reason"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_freezes_idle_thaws_and_cpu_hogs_suspend() {
    let (x, display) = xvfb();
    let mut kill = Kill(vec![x], None);
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let types = tmp.path().join("types");
    std::fs::create_dir_all(&types).unwrap();
    let sock = state.join("control.sock");
    let mt = machine_type("idle-worker", HEARTBEAT);
    write_type(&types, "w.gmt", &mt);
    kill.0.push(
        daemon_command(
            &state,
            &types,
            &[
                "--cores",
                "1",
                "--memory",
                "1GiB",
                "--preset",
                "only-when-idle",
                "--idle-after",
                "2s",
                "--display",
                &display,
                "--suspend-above-load",
                "75%",
            ],
        )
        .spawn()
        .unwrap(),
    );
    // Idle for 2 s: the machine starts and runs.
    let host = one_machine_host(&sock, 60, |s| {
        let sources = s["sources"].to_string();
        assert!(sources.contains("x11 idle time"), "{sources}");
        assert!(sources.contains("x11 input events (XInput2)"), "{sources}");
    })
    .await;
    kill.1 = Some(host.clone());
    let rt = docker(&host, &state).await;
    let h = the_running_machine(&rt).await;
    assert!(reason(&sock).await.contains("owner is away"));

    // The owner moves the mouse: frozen.
    let moved = Command::new("xdotool")
        .args(["mousemove", "100", "100"])
        .env("DISPLAY", &display)
        .status()
        .unwrap();
    assert!(moved.success());
    eventually(5, "frozen after input", async || {
        (rt.state(&h).await.ok()? == MachineState::Frozen).then_some(())
    })
    .await;
    // The owner counts as present for 2 s after input: keep moving while status is read, so a
    // slow poll on a busy machine cannot miss the window.
    let mut x = 100;
    eventually(10, "the owner-present reason", async || {
        x += 1;
        Command::new("xdotool")
            .args(["mousemove", &x.to_string(), "100"])
            .env("DISPLAY", &display)
            .status()
            .ok()?;
        reason(&sock)
            .await
            .contains("owner is using the machine")
            .then_some(())
    })
    .await;

    // Idle again: thawed.
    eventually(15, "thawed after idle", async || {
        (rt.state(&h).await.ok()? == MachineState::Running).then_some(())
    })
    .await;

    // Other programs keep both cores busy: suspended; they stop: resumed.
    let hogs: Vec<Child> = (0..2)
        .map(|_| {
            Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .unwrap()
        })
        .collect();
    let mut hogs = Kill(hogs, None);
    eventually(20, "frozen under a cpu hog", async || {
        (rt.state(&h).await.ok()? == MachineState::Frozen).then_some(())
    })
    .await;
    eventually(10, "the cpu-load reason", async || {
        reason(&sock).await.contains("other programs").then_some(())
    })
    .await;
    for c in &mut hogs.0 {
        let _ = c.kill();
        let _ = c.wait();
    }
    eventually(20, "running after the hog", async || {
        (rt.state(&h).await.ok()? == MachineState::Running).then_some(())
    })
    .await;
}

/// The guests' `cpu.idle` mark (their per-daemon parent cgroup, cgroup v1 or v2).
fn guests_cpu_idle(host: &str) -> Option<String> {
    let parent = gleaner_client::runtime::docker::cgroup_parent_name(host);
    let root = Path::new("/sys/fs/cgroup");
    [root.join("cpu").join(&parent), root.join(&parent)]
        .iter()
        .find_map(|d| std::fs::read_to_string(d.join("cpu.idle")).ok())
        .map(|s| s.trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_go_to_the_background_only_while_the_owner_is_present() {
    let (x, display) = xvfb();
    let mut kill = Kill(vec![x], None);
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let types = tmp.path().join("types");
    std::fs::create_dir_all(&types).unwrap();
    let sock = state.join("control.sock");
    let mt = machine_type("gentle-worker", HEARTBEAT);
    write_type(&types, "w.gmt", &mt);
    kill.0.push(
        daemon_command(
            &state,
            &types,
            &[
                "--cores",
                "1",
                "--memory",
                "1GiB",
                "--preset",
                "always-gently",
                "--idle-after",
                "3s",
                "--display",
                &display,
                "--suspend-above-load",
                "off",
            ],
        )
        .spawn()
        .unwrap(),
    );
    let host = one_machine_host(&sock, 60, |_| ()).await;
    kill.1 = Some(host.clone());
    // The owner away: guests at normal weight, so the owner's return could freeze them at once.
    eventually(30, "normal weight while the owner is away", async || {
        (reason(&sock).await.contains("owner is away")
            && guests_cpu_idle(&host).as_deref() == Some("0"))
        .then_some(())
    })
    .await;

    // The owner at the machine (input every 300 ms): throttled, and in the background.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mover = {
        let (stop, display) = (stop.clone(), display.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i = (i + 7) % 300;
                let _ = Command::new("xdotool")
                    .args(["mousemove", &i.to_string(), "50"])
                    .env("DISPLAY", &display)
                    .stdout(Stdio::null())
                    .status();
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    };
    eventually(30, "the background while throttled", async || {
        (reason(&sock).await.contains("throttled")
            && guests_cpu_idle(&host).as_deref() == Some("1"))
        .then_some(())
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = mover.join();

    // The owner leaves: back at normal weight.
    eventually(30, "normal weight once the owner left", async || {
        (reason(&sock).await.contains("owner is away")
            && guests_cpu_idle(&host).as_deref() == Some("0"))
        .then_some(())
    })
    .await;
}
