//! The logind idle source over a real D-Bus daemon: a private `dbus-daemon` with a stand-in for
//! org.freedesktop.login1 that sets the seat's IdleHint as a desktop would; the source follows it.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gleaner_client::owner::{IdleSource, LogindIdle};
use tokio_util::sync::CancellationToken;

/// The seat's idle state as the stand-in serves it.
struct Manager(Arc<Mutex<(bool, u64)>>);

#[zbus::interface(name = "org.freedesktop.login1.Manager")]
impl Manager {
    #[zbus(property)]
    fn idle_hint(&self) -> bool {
        self.0.lock().map(|s| s.0).unwrap_or(false)
    }
    #[zbus(property)]
    fn idle_since_hint(&self) -> u64 {
        self.0.lock().map(|s| s.1).unwrap_or(0)
    }
}

struct Bus(Child);

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_seats_idle_hint() {
    let dir = tempfile::tempdir().unwrap();
    let address = format!("unix:path={}", dir.path().join("bus").display());
    let _bus = Bus(Command::new("dbus-daemon")
        .args([
            "--session",
            "--nofork",
            "--nopidfile",
            "--address",
            &address,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dbus-daemon is installed (installers/install-deps.sh)"));
    for _ in 0..100 {
        if dir.path().join("bus").exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Without logind on the bus, the source is skipped with a reason.
    let cancel = CancellationToken::new();
    let err = LogindIdle::connect(Some(&address), cancel.clone())
        .await
        .err()
        .expect("no logind yet");
    assert!(err.contains("logind"), "{err}");

    // Idle for 90 s by the hint.
    let seat = Arc::new(Mutex::new((true, now_us() - 90_000_000)));
    let _server = zbus::connection::Builder::address(address.as_str())
        .name("org.freedesktop.login1")
        .serve_at("/org/freedesktop/login1", Manager(seat.clone()))
        .build()
        .await
        .expect("serve the stand-in logind");
    let mut idle = LogindIdle::connect(Some(&address), cancel.clone())
        .await
        .expect("logind answers");
    assert_eq!(idle.name(), "logind");
    let s = idle.idle_s().expect("an answer");
    assert!((89..=95).contains(&s), "{s}");

    // The owner comes back: the hint clears, and within the poll period the source says 0.
    *seat.lock().unwrap() = (false, now_us());
    let mut got = None;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        got = idle.idle_s();
        if got == Some(0) {
            break;
        }
    }
    assert_eq!(got, Some(0));
    cancel.cancel();
}
