//! The CLI against a running daemon on the real Docker Engine: status, pause freezes the container,
//! resume thaws it, drain stops new starts; callers without permission are refused.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use gleaner_client::runtime::{MachineHandle, MachineState, Runtime};
use support::*;

fn cli(sock: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gleaner"))
        .args(args)
        .arg("--socket")
        .arg(sock)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_pause_resume_drain_and_permissions() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = tmp.path().join("state");
    let types = tmp.path().join("types");
    std::fs::create_dir_all(&types).unwrap();
    let sock = state.join("control.sock");
    let mt = machine_type(
        "steady",
        "while true; do touch /joboutputs/heartbeat; sleep 0.5; done",
    );
    write_type(&types, "steady.gmt", &mt);
    let _daemon = spawn_daemon(
        &state,
        &types,
        &[
            "--cores",
            "1",
            "--memory",
            "1GiB",
            "--tick-ms",
            "200",
            "--preset",
            "always-gently",
        ],
    );
    let json = eventually(60, "a running machine", async || {
        let o = cli(&sock, &["status", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        (v["factory"]["machines"].as_array()?.len() == 1).then_some(v)
    })
    .await;
    let host = json["host"].as_str().unwrap().to_string();
    let _cleanup = Cleanup(host.clone());
    let rt = docker(&host, &state).await;
    let owned = rt.list_owned().await.unwrap();
    let h = MachineHandle {
        engine_id: owned[0].engine_id.clone(),
        name: owned[0].name.clone(),
    };

    let o = cli(&sock, &["status"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("machines  1") && text(&o).contains("steady"),
        "{}",
        text(&o)
    );

    let o = cli(&sock, &["pause"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        rt.state(&h).await.unwrap(),
        MachineState::Frozen,
        "pause freezes the container"
    );
    assert!(text(&cli(&sock, &["status"])).contains("paused by the owner"));

    let o = cli(&sock, &["resume"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        rt.state(&h).await.unwrap(),
        MachineState::Running,
        "resume thaws it"
    );

    let o = cli(&sock, &["drain"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&cli(&sock, &["status"])).contains("draining"));

    // A user outside root and the gleaner group is refused by the socket's permissions...
    let o = Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(env!("CARGO_BIN_EXE_gleaner"))
        .args(["status", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("permission denied"), "{}", text(&o));
    // ...and by the daemon's own credential check even if the socket were opened up by mistake.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let o = Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(env!("CARGO_BIN_EXE_gleaner"))
        .args(["pause", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("permission denied"), "{}", text(&o));
    assert_eq!(
        rt.state(&h).await.unwrap(),
        MachineState::Running,
        "the refused pause did nothing"
    );

    let o = cli(&sock, &["status", "--no-such-flag"]);
    assert_eq!(o.status.code(), Some(2));
}

struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        remove_owned(&self.0);
    }
}
