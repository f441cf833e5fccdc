//! The input-device (evdev) owner source. This VM's kernel has no uinput (no /dev/uinput, no
//! modules), so a FIFO named like an event device stands in for one, fed the kernel's
//! `struct input_event` bytes: the source waits on it as on a real device. Against a real daemon and
//! container, a key press freezes the workload and idleness thaws it.

mod support;

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use gleaner_client::control::{ControlClient, Request};
use gleaner_client::evdev::{EV_KEY, EV_REL, EvdevIdle, encode_event};
use gleaner_client::owner::IdleSource;
use gleaner_client::runtime::{MachineState, Runtime};
use support::*;
use tokio_util::sync::CancellationToken;

/// A stand-in input device at `dir/name`: a FIFO held open for reading and writing, so the reader
/// never sees it closed while the test runs.
fn fake_device(dir: &Path, name: &str) -> std::fs::File {
    let path = dir.join(name);
    let ok = Command::new("mkfifo").arg(&path).status().expect("mkfifo");
    assert!(ok.success(), "mkfifo {}", path.display());
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open the fifo")
}

fn events(list: &[(u16, u16, i32)]) -> Vec<u8> {
    list.iter()
        .flat_map(|&(t, c, v)| encode_event(t, c, v))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_events_mark_the_owner_present() {
    let dir = tempfile::tempdir().unwrap();
    let cancel = CancellationToken::new();
    // No devices: skipped with the reason.
    let err = EvdevIdle::watch(dir.path(), None, cancel.clone())
        .err()
        .expect("no devices");
    assert!(err.contains("no event devices"), "{err}");
    // Only a file that cannot be waited on: refused, saying which and why.
    std::fs::write(dir.path().join("event1"), b"").unwrap();
    std::fs::write(dir.path().join("mouse0"), b"").unwrap();
    let err = EvdevIdle::watch(dir.path(), None, cancel.clone())
        .err()
        .expect("nothing readable");
    assert!(err.contains("event1: cannot wait on it"), "{err}");

    let mut dev = fake_device(dir.path(), "event0");
    let (tx, mut nudges) = tokio::sync::mpsc::channel(1);
    let mut src = EvdevIdle::watch(dir.path(), Some(tx), cancel.clone()).expect("event0");
    assert_eq!(src.devices(), ["event0"]);
    assert_eq!(src.name(), "evdev");

    // Events that are no one's doing (sync, scan codes, an accelerometer's axes, the lid switch,
    // a key release) leave the owner away.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    dev.write_all(&events(&[
        (0x04, 4, 30),
        (0x00, 0, 0),
        (0x03, 0, 512),
        (0x05, 0, 1),
        (EV_KEY, 30, 0),
    ]))
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(src.idle_s().unwrap() >= 1, "not owner input");
    assert!(nudges.try_recv().is_err(), "no nudge for non-input");

    // A key press: present at once, and the enforcer is nudged.
    dev.write_all(&events(&[(EV_KEY, 30, 1), (0x00, 0, 0)]))
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), nudges.recv())
        .await
        .expect("a nudge within 10 s")
        .expect("the source is alive");
    assert_eq!(src.idle_s(), Some(0));

    // An event split across writes (as a pipe may deliver it) is still read whole.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(src.idle_s().unwrap() >= 2);
    let motion = encode_event(EV_REL, 0, 5);
    dev.write_all(&motion[..7]).unwrap();
    dev.flush().unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    dev.write_all(&motion[7..]).unwrap();
    tokio::time::timeout(Duration::from_secs(10), nudges.recv())
        .await
        .expect("a nudge for the motion")
        .expect("the source is alive");
    assert_eq!(src.idle_s(), Some(0));

    // A device plugged in after the source started is read too; unplugged, it is dropped.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut late = fake_device(dir.path(), "event7");
    eventually(10, "event7 watched", async || {
        (src.devices() == ["event0", "event7"]).then_some(())
    })
    .await;
    assert!(src.idle_s().unwrap() >= 1, "plugging in is not input");
    late.write_all(&events(&[(EV_KEY, 57, 1), (0x00, 0, 0)]))
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), nudges.recv())
        .await
        .expect("a nudge from the device plugged in later")
        .expect("the source is alive");
    assert_eq!(src.idle_s(), Some(0));
    std::fs::remove_file(dir.path().join("event7")).unwrap();
    eventually(10, "event7 dropped", async || {
        (src.devices() == ["event0"]).then_some(())
    })
    .await;
    // Only `event*` names are devices.
    std::fs::write(dir.path().join("mouse1"), b"").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(src.devices(), ["event0"]);
    drop(late);
    cancel.cancel();
}

/// Kills the daemon, then removes the containers of `owner`.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_press_freezes_the_workload_and_idleness_thaws_it() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("input");
    std::fs::create_dir_all(&input).unwrap();
    let dev = fake_device(&input, "event0");
    let state = tmp.path().join("state");
    let types = tmp.path().join("types");
    let sock = state.join("control.sock");
    let mt = machine_type("evdev-worker", HEARTBEAT);
    write_type(&types, "w.gmt", &mt);
    let input_arg = input.display().to_string();
    let mut kill = Kill(
        vec![
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
                    "--idle-sources",
                    "evdev",
                    "--input-devices",
                    &input_arg,
                ],
            )
            .spawn()
            .unwrap(),
        ],
        None,
    );
    // Idle for 2 s: the machine starts and runs; status names the source.
    let host = one_machine_host(&sock, 60, |s| {
        let sources = s["sources"].to_string();
        assert!(
            sources.contains("input devices (evdev)") && sources.contains("event0"),
            "{sources}"
        );
    })
    .await;
    kill.1 = Some(host.clone());
    let rt = docker(&host, &state).await;
    let h = the_running_machine(&rt).await;

    // A keyboard plugged in after the daemon started: watched, and status lists it.
    let mut keyboard = fake_device(&input, "event5");
    eventually(30, "the new device in status", async || {
        let mut c = ControlClient::connect(&sock).await.ok()?;
        let s = c.call(&Request::Status).await.ok()?;
        s["sources"]
            .to_string()
            .contains("event0, event5")
            .then_some(())
    })
    .await;
    // The owner presses a key on it: frozen, for the owner's presence, seen by evdev.
    keyboard
        .write_all(&events(&[(0x04, 4, 30), (EV_KEY, 30, 1), (0x00, 0, 0)]))
        .unwrap();
    eventually(10, "frozen after a key press", async || {
        (rt.state(&h).await.ok()? == MachineState::Frozen).then_some(())
    })
    .await;
    eventually(10, "the owner-present reason, naming evdev", async || {
        let mut c = ControlClient::connect(&sock).await.ok()?;
        let s = c.call(&Request::Status).await.ok()?;
        let a = &s["factory"]["allowance"];
        let reason = a["reason"].as_str()?.to_owned();
        (reason == "frozen: the owner is using the machine (source: evdev)"
            && a["source"].as_str()? == "evdev")
            .then_some(())
    })
    .await;
    // `gleaner status` names the source too (present, or away again by now: evdev decides both).
    let out = Command::new(env!("CARGO_BIN_EXE_gleaner"))
        .args(["status", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("(source: evdev)"),
        "{text}"
    );

    // No more input: thawed once idle again.
    eventually(20, "thawed after idle", async || {
        (rt.state(&h).await.ok()? == MachineState::Running).then_some(())
    })
    .await;
    // Unplugged: no longer listed.
    std::fs::remove_file(input.join("event5")).unwrap();
    eventually(30, "the device gone from status", async || {
        let mut c = ControlClient::connect(&sock).await.ok()?;
        let s = c.call(&Request::Status).await.ok()?;
        let sources = s["sources"].to_string();
        (sources.contains("event0") && !sources.contains("event5")).then_some(())
    })
    .await;
    drop((dev, keyboard));
}
