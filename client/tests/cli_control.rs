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

/// `docker inspect`'s State.Paused of a container.
fn docker_paused(id: &str) -> bool {
    let o = Command::new("docker")
        .args(["inspect", "-f", "{{.State.Paused}}", id])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout).trim() == "true"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_one_machine_type_by_name_across_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = tmp.path().join("state");
    let types = tmp.path().join("types");
    let sock = state.join("control.sock");
    let script = "while true; do touch /joboutputs/heartbeat; sleep 0.5; done";
    let (steady, other) = (
        machine_type("steady", script),
        machine_type("other", script),
    );
    write_type(&types, "steady.gmt", &steady);
    write_type(&types, "other.gmt", &other);
    let (steady_d, other_d) = (offer(&steady).digest, offer(&other).digest);
    let args = [
        "--cores",
        "2",
        "--memory",
        "1GiB",
        "--tick-ms",
        "200",
        "--preset",
        "always-gently",
    ];
    let daemon = spawn_daemon(&state, &types, &args);
    let json = eventually(90, "one machine of each type", async || {
        let o = cli(&sock, &["status", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        let names: Vec<&str> = v["factory"]["machines"]
            .as_array()?
            .iter()
            .filter(|m| m["state"] == "running")
            .filter_map(|m| m["name"].as_str())
            .collect();
        (names.contains(&"steady") && names.contains(&"other")).then_some(v)
    })
    .await;
    let host = json["host"].as_str().unwrap().to_string();
    let _cleanup = Cleanup(host.clone());
    let rt = docker(&host, &state).await;
    let container = async |d| {
        rt.list_owned()
            .await
            .unwrap()
            .into_iter()
            .find(|o| o.machine_type == Some(d))
            .map(|o| o.engine_id)
            .expect("a container of this type")
    };
    let (steady_c, other_c) = (container(steady_d).await, container(other_d).await);

    // Unknown names are refused with what there is.
    let o = cli(&sock, &["pause", "nosuch"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("no machine type \"nosuch\"") && text(&o).contains("other"),
        "{}",
        text(&o)
    );

    let o = cli(&sock, &["pause", "steady"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("paused steady"), "{}", text(&o));
    assert!(
        docker_paused(&steady_c),
        "pause steady freezes its container"
    );
    assert!(!docker_paused(&other_c), "the other type keeps running");
    let o = cli(&sock, &["status"]);
    assert!(
        text(&o).contains("paused by you  steady") && text(&o).contains("paused (by you)"),
        "{}",
        text(&o)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&cli(&sock, &["status", "--json"]).stdout).unwrap();
    assert_eq!(v["paused_types"][0]["name"], "steady");
    assert!(state.join("paused.toml").exists());

    // The whole host paused and resumed: the type stays paused.
    assert!(cli(&sock, &["pause"]).status.success());
    assert!(docker_paused(&other_c));
    let o = cli(&sock, &["resume"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("still paused by you: steady"),
        "{}",
        text(&o)
    );
    assert!(!docker_paused(&other_c), "resume thaws the host");
    assert!(docker_paused(&steady_c), "but not the type paused by name");

    // A restart (kill -9: no graceful stop) keeps the pause: adopted and still frozen.
    drop(daemon);
    let _daemon = spawn_daemon(&state, &types, &args);
    eventually(
        60,
        "the restarted daemon adopting both machines",
        async || {
            let o = cli(&sock, &["status", "--json"]);
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
            let ms = v["factory"]["machines"].as_array()?;
            (ms.len() == 2
                && ms
                    .iter()
                    .any(|m| m["name"] == "steady" && m["state"] == "paused (by you)"))
            .then_some(())
        },
    )
    .await;
    assert!(docker_paused(&steady_c), "still paused after the restart");
    // Several ticks later, no new steady machine has started beside it.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let steady_now = rt
        .list_owned()
        .await
        .unwrap()
        .into_iter()
        .filter(|o| o.machine_type == Some(steady_d))
        .count();
    assert_eq!(steady_now, 1);

    let o = cli(&sock, &["resume", "steady"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("resumed steady: 1 machines thawed"),
        "{}",
        text(&o)
    );
    assert!(!docker_paused(&steady_c), "resume steady thaws it");
    assert!(!docker_paused(&other_c));
    let o = cli(&sock, &["resume", "steady"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("steady is not paused"), "{}", text(&o));
}
