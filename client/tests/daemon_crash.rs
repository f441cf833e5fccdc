//! The daemon as a process on the real Docker Engine: kill -9 with four machines running, restart,
//! and every machine is adopted within 10 s with nothing orphaned; SIGTERM then accounts for each
//! machine exactly once. A machine type from an untrusted publisher never starts.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use gleaner::{Envelope, SecretKey};
use gleaner_client::runtime::Runtime;
use support::*;

fn start(state: &Path, types: &Path) -> Daemon {
    spawn_daemon(
        state,
        types,
        &[
            "--cores",
            "4",
            "--memory",
            "2GiB",
            "--tick-ms",
            "200",
            "--preset",
            "always-gently",
        ],
    )
}

fn machine_ids(s: &serde_json::Value) -> Vec<String> {
    let mut ids: Vec<String> = s["factory"]["machines"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m["machine_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_adopts_everything_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let types = tmp.path().join("types");
    std::fs::create_dir_all(&types).unwrap();
    let sock = state.join("control.sock");

    let mt = machine_type("long-runner", HEARTBEAT);
    std::fs::write(
        types.join("long.gmt"),
        Envelope::seal(&mt, &publisher()).to_bytes(),
    )
    .unwrap();
    // The same kind of machine type, signed by a key nobody trusts.
    let stranger = SecretKey::from_seed([0x99; 32]);
    let mut bad = machine_type("stranger", "sleep 300");
    bad.publisher = stranger.public();
    std::fs::write(
        types.join("stranger.gmt"),
        Envelope::seal(&bad, &stranger).to_bytes(),
    )
    .unwrap();

    let mut daemon = start(&state, &types);
    let before = eventually(90, "four running machines", async || {
        let s = status(&sock).await?;
        let ids = machine_ids(&s);
        (ids.len() == 4).then_some(ids)
    })
    .await;
    // The daemon's owner label is its host id.
    let host = std::fs::read_to_string(state.join("host.key.pub"))
        .unwrap()
        .trim()
        .to_string();
    let _cleanup = Cleanup(host.clone());
    let s = status(&sock).await.unwrap();
    let offers = s["factory"]["offers"].as_array().unwrap();
    assert_eq!(
        offers.len(),
        1,
        "only the trusted type is offered: {offers:?}"
    );
    assert_eq!(offers[0]["name"], "long-runner");

    daemon.0.kill().unwrap(); // SIGKILL
    daemon.0.wait().unwrap();
    let rt = docker(&host, &state).await;
    assert_eq!(
        rt.list_owned().await.unwrap().len(),
        4,
        "machines outlive the daemon"
    );

    let mut daemon = start(&state, &types);
    let started = std::time::Instant::now();
    let after = eventually(
        30,
        "the restarted daemon to adopt its machines",
        async || {
            let s = status(&sock).await?;
            let ids = machine_ids(&s);
            (ids.len() >= 4).then_some(ids)
        },
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "adopted in {:?}",
        started.elapsed()
    );
    assert_eq!(after, before, "the same four machines, adopted");
    let owned = rt.list_owned().await.unwrap();
    assert_eq!(
        owned.len(),
        4,
        "no orphans and no extra machines: {owned:?}"
    );

    // SIGTERM: every machine stopped and accounted for exactly once.
    Command::new("kill")
        .arg("-TERM")
        .arg(daemon.0.id().to_string())
        .status()
        .unwrap();
    let code = daemon.0.wait().unwrap();
    assert!(code.success(), "daemon exit: {code:?}");
    assert!(
        rt.list_owned().await.unwrap().is_empty(),
        "nothing left in the engine"
    );
    let ledger = gleaner_client::ledger::Ledger::open(&state.join("ledger.redb")).unwrap();
    let records = ledger.records().unwrap();
    let mut ids: Vec<String> = records
        .iter()
        .map(|(r, _)| r.machine_id.to_string())
        .collect();
    ids.sort();
    assert_eq!(
        ids, before,
        "one record per machine, none lost, none duplicated"
    );
    assert!(ledger.machines().unwrap().is_empty());
}

struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        remove_owned(&self.0);
    }
}
