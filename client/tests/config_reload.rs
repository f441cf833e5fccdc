//! The settings file end to end, with a real daemon and a real container: the file sets the owner
//! policy; an exclusive application freezes the workload and its exit thaws it; a bad reload is
//! refused with the file, line, key and reason and changes nothing; a good one (SIGHUP) applies
//! live; `gleaner cleanup` refuses while the daemon runs, then removes what a killed daemon left,
//! keeping the ledger unless purged.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use gleaner_client::control::{ControlClient, Request};
use gleaner_client::runtime::{MachineState, Runtime};
use support::*;

fn gleaner(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gleaner"))
        .args(args)
        .output()
        .expect("run gleaner")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

async fn call(sock: &Path, req: Request) -> serde_json::Value {
    let mut c = ControlClient::connect(sock).await.unwrap();
    c.call(&req).await.unwrap()
}

#[test]
fn config_check_validates_and_explains() {
    let t = tempfile::tempdir().unwrap();
    let good = t.path().join("good.toml");
    std::fs::write(
        &good,
        "cores = 2\npresent = { cores = 1, memory = \"512MiB\" }\nexclusive_apps = [\"blender\"]\n",
    )
    .unwrap();
    let o = gleaner(&["config", "check", good.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("valid"), "{}", text(&o));
    assert!(text(&o).contains("blender"), "{}", text(&o));

    let bad = t.path().join("bad.toml");
    std::fs::write(&bad, "space = \"lab\"\n\nmemory = \"plenty\"\n").unwrap();
    let o = gleaner(&["config", "check", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let msg = text(&o);
    assert!(
        msg.contains(&format!("{}:3: memory:", bad.display())) && msg.contains("\"plenty\""),
        "{msg}"
    );

    let missing = t.path().join("missing.toml");
    let o = gleaner(&["config", "check", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("cannot read"), "{}", text(&o));

    // The documented example is itself valid.
    let example = gleaner(&["config", "example"]);
    let ex = t.path().join("example.toml");
    std::fs::write(&ex, &example.stdout).unwrap();
    let o = gleaner(&["config", "check", ex.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_file_exclusive_apps_reload_and_cleanup() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let types = tmp.path().join("types");
    std::fs::create_dir_all(&types).unwrap();
    let sock = state.join("control.sock");
    let sock_s = sock.to_str().unwrap().to_owned();
    let cfg = tmp.path().join("client.toml");
    // A name of our own so that no other process matches it; under 15 bytes, as `comm` keeps.
    let app_name = format!("gx{}", std::process::id() % 1_000_000);
    let settings = |extra: &str| {
        format!(
            "# test settings\nidle_sources = [\"x11\"]\nsuspend_above_load = \"off\"\ncores = 1\nmemory = \"1GiB\"\n\
             exclusive_apps = [\"{app_name}\"]\n{extra}"
        )
    };
    std::fs::write(&cfg, settings("")).unwrap();
    write_type(&types, "w.gmt", &machine_type("excl-worker", HEARTBEAT));
    let mut daemon = spawn_daemon(&state, &types, &["--config", cfg.to_str().unwrap()]);
    let host = one_machine_host(&sock, 90, |_| ()).await;
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            remove_owned(&self.0);
        }
    }
    let _cleanup = Cleanup(host.clone());
    let limits = call(&sock, Request::Limits { set: None }).await;
    assert_eq!(limits["away"]["cores"], 1.0, "{limits}");
    assert_eq!(limits["away"]["memory_bytes"], 1u64 << 30, "{limits}");
    assert!(limits["present"].is_null(), "{limits}");

    let rt = docker(&host, &state).await;
    let h = the_running_machine(&rt).await;

    // The exclusive application starts: the workload freezes; it ends: the workload thaws.
    let app = tmp.path().join(&app_name);
    std::fs::copy("/bin/sleep", &app).unwrap();
    let mut app = Command::new(&app).arg("120").spawn().unwrap();
    eventually(15, "frozen while the exclusive app runs", async || {
        (rt.state(&h).await.ok()? == MachineState::Frozen).then_some(())
    })
    .await;
    // The enforcer freezes first and names the reason after, so status may lag the freeze by
    // the length of the freeze call: wait for it rather than read it once.
    eventually(10, "status naming the exclusive application", async || {
        let status = call(&sock, Request::Status).await;
        let reason = status["factory"]["allowance"]["reason"].to_string();
        reason.contains("exclusive application").then_some(())
    })
    .await;
    let _ = app.kill();
    let _ = app.wait();
    eventually(15, "thawed after the exclusive app", async || {
        (rt.state(&h).await.ok()? == MachineState::Running).then_some(())
    })
    .await;

    // A bad file: refused with where and why; the policy in force is unchanged.
    std::fs::write(&cfg, settings("\npresent = { cores = \"some\" }\n")).unwrap();
    let o = gleaner(&["reload", "--socket", &sock_s]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let msg = text(&o);
    assert!(
        msg.contains(&format!("{}:8: present.cores:", cfg.display()))
            && msg.contains("running settings are kept"),
        "{msg}"
    );
    assert_eq!(call(&sock, Request::Limits { set: None }).await, limits);

    // A good file by SIGHUP: applied live, no restart.
    std::fs::write(
        &cfg,
        settings("present = { cores = 1, memory = \"256MiB\" }\nidle_after = \"1h\"\n"),
    )
    .unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &daemon.0.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let now = eventually(10, "the reloaded policy", async || {
        let l = call(&sock, Request::Limits { set: None }).await;
        (!l["present"].is_null()).then_some(l)
    })
    .await;
    assert_eq!(now["present"]["memory_bytes"], 256u64 << 20, "{now}");
    assert_eq!(now["idle_after_s"], 3600, "{now}");
    assert!(
        daemon.0.try_wait().unwrap().is_none(),
        "the daemon kept running"
    );

    // The owner changes limits live: validated whole, kept in the state dir over the file.
    let o = gleaner(&[
        "limits",
        "--socket",
        &sock_s,
        "--set",
        "cores=0.5",
        "--set",
        "present={cores=1, memory=\"300MiB\"}",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let l = call(&sock, Request::Limits { set: None }).await;
    assert_eq!(l["away"]["cores"], 0.5, "{l}");
    assert_eq!(l["present"]["memory_bytes"], 300u64 << 20, "{l}");
    let saved = std::fs::read_to_string(state.join("owner.toml")).unwrap();
    assert!(saved.contains("cores = 0.5"), "{saved}");
    for (arg, want) in [
        ("memory=plenty", "owner.toml:"),
        ("space=elsewhere", "not an owner-policy key"),
        ("cpu_usage=200%", "cpu_usage: 200% is not between 0 and 100"),
    ] {
        let o = gleaner(&["limits", "--socket", &sock_s, "--set", arg]);
        assert_eq!(o.status.code(), Some(1), "{arg}: {}", text(&o));
        assert!(
            text(&o).contains(want) && text(&o).contains("nothing changed"),
            "{arg}: {}",
            text(&o)
        );
    }
    assert_eq!(call(&sock, Request::Limits { set: None }).await, l);
    let o = gleaner(&["limits", "--socket", &sock_s, "--unset", "cores"]);
    assert!(o.status.success(), "{}", text(&o));
    let l = call(&sock, Request::Limits { set: None }).await;
    assert_eq!(l["away"]["cores"], 1.0, "back to the file's: {l}");

    // A change that needs a restart is named as such.
    std::fs::write(&cfg, settings("space = \"elsewhere\"\n")).unwrap();
    let o = gleaner(&["reload", "--socket", &sock_s, "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["restart_needed"], serde_json::json!(["space"]), "{v}");

    // Cleanup refuses while the daemon runs.
    let state_s = state.to_str().unwrap().to_owned();
    let args = [
        "cleanup",
        "--state-dir",
        &state_s,
        "--socket",
        &sock_s,
        "--grace",
        "1s",
    ];
    let o = gleaner(&args);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("the daemon is running"), "{}", text(&o));

    // A daemon killed outright leaves its container; cleanup removes it and keeps the ledger.
    let _ = daemon.0.kill();
    let _ = daemon.0.wait();
    assert_eq!(rt.list_owned().await.unwrap().len(), 1);
    let _ = std::fs::remove_file(&sock);
    let o = gleaner(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert!(rt.list_owned().await.unwrap().is_empty());
    assert!(state.join("ledger.redb").exists() && state.join("host.key").exists());
    assert!(!state.join("machines").exists());
    let mut purge = args.to_vec();
    purge.push("--purge");
    let o = gleaner(&purge);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!state.exists());
}
