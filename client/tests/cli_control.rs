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
    let mt = machine_type("steady", HEARTBEAT);
    write_type(&types, "steady.gmt", &mt);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tcp = format!("127.0.0.1:{port}");
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
            "--control-tcp",
            &tcp,
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

    // Loopback TCP with the token from the state dir (0600, or 0640 for the gleaner group).
    let token = state.join("control.token");
    let mode = std::fs::metadata(&token).unwrap().permissions().mode() & 0o777;
    assert!(mode == 0o600 || mode == 0o640, "{mode:o}");
    let over_tcp = |token_file: &Path| {
        Command::new(env!("CARGO_BIN_EXE_gleaner"))
            .args(["status", "--json", "--tcp", &tcp, "--token-file"])
            .arg(token_file)
            .output()
            .unwrap()
    };
    let o = over_tcp(&token);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["host"], json["host"]);
    let wrong = tmp.path().join("wrong.token");
    std::fs::write(&wrong, "0".repeat(64)).unwrap();
    let o = over_tcp(&wrong);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("token refused: wrong token"),
        "{}",
        text(&o)
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

/// Whether a container is frozen (the engine's pause or Gleaner's cgroup freeze).
fn docker_paused(id: &str) -> bool {
    container_frozen(id).unwrap_or_else(|| panic!("container {id} is gone"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_one_machine_type_by_name_across_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = tmp.path().join("state");
    let types = tmp.path().join("types");
    let sock = state.join("control.sock");
    let (steady, other) = (
        machine_type("steady", HEARTBEAT),
        machine_type("other", HEARTBEAT),
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

    // A restart (kill -9: no graceful stop) keeps the pause: adopted and still frozen. It comes
    // back with a third core, so the factory has room to start one more machine: the other type.
    drop(daemon);
    let mut more = args;
    more[1] = "3";
    let daemon = spawn_daemon(&state, &types, &more);
    eventually(
        60,
        "the restarted daemon adopting the paused machine",
        async || {
            let o = cli(&sock, &["status", "--json"]);
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
            let ms = v["factory"]["machines"].as_array()?;
            ms.iter()
                .any(|m| m["name"] == "steady" && m["state"] == "paused (by you)")
                .then_some(())
        },
    )
    .await;
    assert!(docker_paused(&steady_c), "still paused after the restart");
    let count = async |d| {
        rt.list_owned()
            .await
            .unwrap()
            .into_iter()
            .filter(|o| o.machine_type == Some(d))
            .count()
    };
    eventually(
        60,
        "the free core going to the type not paused",
        async || (count(other_d).await == 2).then_some(()),
    )
    .await;
    assert_eq!(
        count(steady_d).await,
        1,
        "no new machine of the paused type"
    );

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

    // The whole host's pause holds across a restart too: nothing is thawed by the new daemon.
    assert!(cli(&sock, &["pause"]).status.success());
    assert!(docker_paused(&other_c) && docker_paused(&steady_c));
    drop(daemon);
    let _daemon = spawn_daemon(&state, &types, &more);
    eventually(60, "the restarted daemon, still paused", async || {
        let o = cli(&sock, &["status", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        (v["paused"] == true && v["factory"]["machines"].as_array()?.len() == 3).then_some(())
    })
    .await;
    assert!(
        docker_paused(&other_c) && docker_paused(&steady_c),
        "the host's pause survives a restart"
    );
    let o = cli(&sock, &["resume"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!docker_paused(&other_c) && !docker_paused(&steady_c));
}

/// The coordinator binary, built beside `gleaner` if it is not there yet.
fn coordinator_bin() -> std::path::PathBuf {
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_gleaner"))
        .with_file_name("gleaner-coordinator");
    if !bin.exists() {
        let st = Command::new(env!("CARGO"))
            .args(["build", "-p", "gleaner-coordinator"])
            .status()
            .unwrap();
        assert!(st.success());
    }
    bin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credit_shows_the_ledger_and_the_coordinator_and_survives_it_going_away() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (state, types, cdir) = (
        tmp.path().join("state"),
        tmp.path().join("types"),
        tmp.path().join("coordinator"),
    );
    let sock = state.join("control.sock");
    let coord = coordinator_bin();
    let o = Command::new(&coord)
        .arg("--data-dir")
        .arg(&cdir)
        .args(["account", "add", "alice", "--team", "t", "--token", "t0ken"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(&coord)
        .arg("--data-dir")
        .arg(&cdir)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let coordinator = Daemon(child);
    let fingerprint = std::io::BufReader::new(stdout)
        .lines()
        .take(10)
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("fingerprint ").map(|f| f.trim().to_owned()))
        .expect("the coordinator prints its fingerprint");

    let mt = machine_type("steady", HEARTBEAT);
    write_type(&types, "steady.gmt", &mt);
    let base = format!("https://127.0.0.1:{port}");
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
            "--coordinator",
            &base,
            "--coordinator-fingerprint",
            &fingerprint,
            "--enrol",
            "alice:t0ken",
        ],
    );
    let host = eventually(60, "a running machine", async || {
        let o = cli(&sock, &["status", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        (v["factory"]["machines"].as_array()?.len() == 1).then(|| v["host"].to_string())
    })
    .await;
    let _cleanup = Cleanup(host.trim_matches('"').to_string());
    // Enrolled, nothing delivered yet: the coordinator knows the host but has no records.
    eventually(60, "the coordinator knowing the host", async || {
        let v: serde_json::Value =
            serde_json::from_slice(&cli(&sock, &["credit", "--json"]).stdout).ok()?;
        (v["coordinator"]["reachable"] == true && v["coordinator"]["account"] == "alice")
            .then_some(())
    })
    .await;
    // The machine ends (drain now): its record is delivered and counted on both sides.
    assert!(cli(&sock, &["drain", "--now"]).status.success());
    let v = eventually(90, "the record counted by the coordinator", async || {
        let v: serde_json::Value =
            serde_json::from_slice(&cli(&sock, &["credit", "--json"]).stdout).ok()?;
        (v["coordinator"]["records"] == 1 && v["delivered"] == 1).then_some(v)
    })
    .await;
    assert_eq!(v["coordinator"]["url"], base.as_str());
    let o = cli(&sock, &["credit"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("this host's ledger")
            && t.contains("delivered")
            && t.contains(&format!("coordinator {base}"))
            && t.contains("in 1 records")
            && t.contains("account            alice"),
        "{t}"
    );

    // The coordinator goes away: credit still answers, with the ledger and why not.
    drop(coordinator);
    let o = cli(&sock, &["credit"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("coordinator unreachable:")
            && t.contains("127.0.0.1")
            && t.contains("cpu time recorded"),
        "{t}"
    );
}
