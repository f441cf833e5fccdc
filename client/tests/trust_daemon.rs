//! The trust store end to end, with a real daemon on the real Docker Engine: `gleaner trust add
//! --from FILE.gmt` makes that type start; the trust survives a restart; a type asking for more than
//! the publisher's policy allows is refused with the reason in `gleaner events`; `gleaner trust
//! remove` withdraws the publisher and stops its machines, and that too survives a restart; a
//! revoked publisher's type never starts, even from the settings baseline; a rotation moves the
//! publisher's trust to its new key and the old key alone is refused; revoking the old key after
//! that ends the new key's trust too. Records carry the measured host benchmark. In a space of
//! three daemons on loopback, a rotation and then a revocation dropped on a host that trusts
//! nobody reach the hosts that trust the publisher: one moves to the new key (and fetches the new
//! key's type from a peer), then both stop the publisher's machines and refuse its types.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use gleaner::{Envelope, MachineType, SecretKey};
use gleaner_client::control::{ControlClient, Request};
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

/// A daemon that trusts nobody but `baseline` (the settings' `--trust` entries).
fn start(state: &Path, types: &Path, baseline: &[String]) -> Daemon {
    start_with(state, types, baseline, &["--no-space"])
}

/// As [`start`], with `extra` arguments (a space's `--listen`, `--bootstrap`...).
fn start_with(state: &Path, types: &Path, baseline: &[String], extra: &[&str]) -> Daemon {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gleaner"));
    c.args(["daemon", "--stop-grace", "2"])
        .args(extra)
        .arg("--state-dir")
        .arg(state)
        .arg("--socket")
        .arg(state.join("control.sock"))
        .arg("--machine-types")
        .arg(types)
        .args([
            "--cores",
            "2",
            "--memory",
            "2GiB",
            "--tick-ms",
            "200",
            "--preset",
            "always-gently",
        ])
        .env("RUST_LOG", "warn");
    for b in baseline {
        c.args(["--trust", b]);
    }
    Daemon(c.spawn().expect("start gleaner daemon"))
}

/// SIGTERM, and wait: machines are stopped and accounted for.
fn stop(mut d: Daemon) {
    let _ = Command::new("kill")
        .arg(d.0.id().to_string())
        .status()
        .unwrap();
    let _ = d.0.wait();
}

/// Names of the machine types running (or starting to stop) now, each once: how many machines of
/// a type start depends on whether the owner seems present (a busy terminal on a shared machine).
async fn running(sock: &Path) -> Option<Vec<String>> {
    let s = status(sock).await?;
    let mut names: Vec<String> = s["factory"]["machines"]
        .as_array()?
        .iter()
        .filter_map(|m| m["name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    names.dedup();
    Some(names)
}

async fn offers(sock: &Path) -> Option<Vec<String>> {
    let s = status(sock).await?;
    let mut names: Vec<String> = s["factory"]["offers"]
        .as_array()?
        .iter()
        .filter_map(|m| m["name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    Some(names)
}

fn signed(types: &Path, file: &str, mt: &MachineType, key: &SecretKey) {
    std::fs::write(types.join(file), Envelope::seal(mt, key).to_bytes()).unwrap();
}

fn typed(name: &str, key: &SecretKey) -> MachineType {
    let mut mt = machine_type(name, HEARTBEAT);
    mt.publisher = key.public();
    mt
}

struct Cleanup(String);
impl Drop for Cleanup {
    fn drop(&mut self) {
        remove_owned(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_add_remove_revoke_and_rotate_on_a_real_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let types = tmp.path().join("types");
    std::fs::create_dir_all(&types).unwrap();
    let sock = state.join("control.sock");
    let s = sock.to_str().unwrap().to_owned();
    let a = publisher();
    let a_id = a.public().to_string();
    let revoked = SecretKey::from_seed([0x61; 32]);

    signed(&types, "a.gmt", &typed("alpha", &a), &a);
    // The same publisher asks for the network, which trusting it from alpha's file does not give.
    let mut net = typed("alpha-net", &a);
    net.egress = vec!["queue.example.org:443".into()];
    signed(&types, "a-net.gmt", &net, &a);
    // A publisher in the settings baseline whose key has revoked itself.
    signed(&types, "r.gmt", &typed("revoked-type", &revoked), &revoked);
    let rev = gleaner::trust::Revocation {
        v: gleaner::trust::TRUST_VERSION,
        key: revoked.public(),
        at: 1_800_000_000,
        reason: "key leaked".into(),
    };
    std::fs::write(
        types.join("r.grv"),
        Envelope::seal(&rev, &revoked).to_bytes(),
    )
    .unwrap();
    let baseline = vec![format!("{}=1", revoked.public())];

    let daemon = start(&state, &types, &baseline);
    let host = eventually(90, "the daemon to answer", async || {
        Some(status(&sock).await?["host"].as_str()?.to_owned())
    })
    .await;
    let _cleanup = Cleanup(host.clone());
    // Nobody trusted yet: the types are refused with their reasons, and nothing runs.
    let ev = eventually(20, "refusals in the events", async || {
        let ev = events_text(&sock).await;
        (ev.contains("is not trusted") && ev.contains("revoked")).then_some(ev)
    })
    .await;
    assert!(ev.contains("key leaked"), "{ev}");
    let o = gleaner(&["events", "--socket", &s]);
    assert!(text(&o).contains("is not trusted"), "{}", text(&o));
    assert_eq!(running(&sock).await.unwrap(), Vec::<String>::new());

    // Trust by file: the type is shown and starts.
    let o = gleaner(&[
        "trust",
        "add",
        "--from",
        types.join("a.gmt").to_str().unwrap(),
        "--socket",
        &s,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    assert!(
        out.contains("machine type alpha v1") && out.contains(&a_id),
        "{out}"
    );
    assert!(out.contains("admitted"), "{out}");
    eventually(60, "alpha running", async || {
        (running(&sock).await? == ["alpha"]).then_some(())
    })
    .await;
    // The network-asking type of the same publisher is refused with the policy's reason.
    let ev = eventually(10, "the egress refusal", async || {
        let ev = events_text(&sock).await;
        ev.contains("allow_egress is off").then_some(ev)
    })
    .await;
    assert!(ev.contains("alpha-net"), "{ev}");
    assert_eq!(offers(&sock).await.unwrap(), ["alpha"]);
    // A revoked key cannot be trusted by hand either.
    let o = gleaner(&[
        "trust",
        "add",
        &revoked.public().to_string(),
        "--socket",
        &s,
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("revoked"), "{}", text(&o));

    // A restart keeps the trust.
    stop(daemon);
    let daemon = start(&state, &types, &baseline);
    eventually(60, "alpha running after a restart", async || {
        (running(&sock).await? == ["alpha"]).then_some(())
    })
    .await;
    let o = gleaner(&["trust", "list", "--json", "--socket", &s]);
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list["trusted"][0]["id"], a_id, "{list}");
    assert_eq!(list["trusted"][0]["source"], "owner", "{list}");
    assert_eq!(list["trusted"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["revoked"][0]["id"], revoked.public().to_string());

    // Remove: withdrawn at once, the machine stops, nothing new starts — and a restart keeps it.
    let o = gleaner(&["trust", "remove", &a_id, "--socket", &s]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("no longer trusted"), "{}", text(&o));
    assert_eq!(offers(&sock).await.unwrap(), Vec::<String>::new());
    eventually(30, "alpha stopped", async || {
        running(&sock).await?.is_empty().then_some(())
    })
    .await;
    stop(daemon);
    let daemon = start(&state, &types, &baseline);
    eventually(30, "the restarted daemon", async || status(&sock).await).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(running(&sock).await.unwrap(), Vec::<String>::new());
    assert_eq!(offers(&sock).await.unwrap(), Vec::<String>::new());

    // Rotation: trust A again, then A signs that A2 replaces it.
    let o = gleaner(&["trust", "add", &a_id, "--share", "2", "--socket", &s]);
    assert!(o.status.success(), "{}", text(&o));
    eventually(60, "alpha running again", async || {
        (running(&sock).await? == ["alpha"]).then_some(())
    })
    .await;
    let a2 = SecretKey::from_seed([0x52; 32]);
    let (ka, ka2) = (tmp.path().join("a.key"), tmp.path().join("a2.key"));
    gleaner_client::keys::write(&ka, &a, false).unwrap();
    gleaner_client::keys::write(&ka2, &a2, false).unwrap();
    signed(&types, "a2.gmt", &typed("alpha-two", &a2), &a2);
    let o = gleaner(&[
        "key",
        "rotate",
        "--old",
        ka.to_str().unwrap(),
        "--new",
        ka2.to_str().unwrap(),
        "-o",
        types.join("a-to-a2.gkr").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    // The new key's type runs; the old key's is withdrawn and stopped.
    eventually(60, "alpha-two running and alpha gone", async || {
        (running(&sock).await? == ["alpha-two"]).then_some(())
    })
    .await;
    assert_eq!(offers(&sock).await.unwrap(), ["alpha-two"]);
    // A new type signed by the old key alone is refused.
    signed(&types, "a-v2.gmt", &typed("alpha-late", &a), &a);
    let ev = eventually(10, "the rotated-away refusal", async || {
        let ev = events_text(&sock).await;
        ev.contains("alpha-late").then_some(ev)
    })
    .await;
    assert!(ev.contains("was rotated to"), "{ev}");
    let o = gleaner(&["trust", "list", "--json", "--socket", &s]);
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list["trusted"][0]["id"], a2.public().to_string(), "{list}");
    assert_eq!(list["trusted"][0]["share"], 2.0, "{list}");
    assert_eq!(list["trusted"][0]["rotated_from"][0], a_id, "{list}");
    // Revoking the old key after the rotation ends the new key's trust too: whoever stole the
    // old key could have made that rotation.
    let o = gleaner(&[
        "key",
        "revoke",
        ka.to_str().unwrap(),
        "--reason",
        "old laptop stolen",
        "-o",
        types.join("a.grv").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    eventually(30, "alpha-two stopped", async || {
        running(&sock).await?.is_empty().then_some(())
    })
    .await;
    assert_eq!(offers(&sock).await.unwrap(), Vec::<String>::new());
    let ev = events_text(&sock).await;
    assert!(
        ev.contains("withdrew alpha-two") && ev.contains("old laptop stolen"),
        "{ev}"
    );
    let o = gleaner(&["trust", "list", "--json", "--socket", &s]);
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list["trusted"], serde_json::json!([]), "{list}");
    // The revoked publisher's type never started at any point.
    assert!(!ev.contains("starting revoked-type"), "{ev}");
    stop(daemon);
    let rt = docker(&host, &state).await;
    assert_nothing_left(&rt, &state).await;

    // Every usage record carries the host benchmark measured at the first start (cached with
    // its timestamp), not a fixed 1000.
    let cached: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("benchmark.json")).unwrap()).unwrap();
    let score = cached["score"].as_u64().unwrap();
    assert!(cached["at"].as_u64().unwrap() > 1_700_000_000, "{cached}");
    let ledger = gleaner_client::ledger::Ledger::open(&state.join("ledger.redb")).unwrap();
    let records = ledger.records().unwrap();
    assert!(
        records.len() >= 4,
        "alpha three times and alpha-two: {records:?}"
    );
    for (r, _) in &records {
        assert_eq!(u64::from(r.benchmark), score, "{r:?}");
    }
}

/// Waits until each daemon runs exactly the named machine types; on timeout, fails with what each
/// runs and its events.
async fn expect_running(want: &[(&Path, &[&str])], secs: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let mut all = true;
        for (sock, names) in want {
            all &= running(sock).await.is_some_and(|r| r == *names);
        }
        if all {
            return;
        }
        if std::time::Instant::now() > deadline {
            let mut why = String::new();
            for (sock, names) in want {
                why += &format!(
                    "\n{}: want {names:?}, status {:?}\nevents:\n{}",
                    sock.display(),
                    status(sock).await.map(|s| s["factory"]["machines"].clone()),
                    events_text(sock).await
                );
            }
            panic!("timed out after {secs} s waiting for machines:{why}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

async fn space(sock: &Path) -> Option<serde_json::Value> {
    let mut c = ControlClient::connect(sock).await.ok()?;
    c.call(&Request::Space).await.ok()
}

/// Whether the daemon at `sock` has adverts from every one of `hosts` in its view.
async fn sees(sock: &Path, hosts: &[&str]) -> Option<()> {
    let s = space(sock).await?;
    let peers: Vec<&str> = s["peers"]
        .as_array()?
        .iter()
        .filter_map(|p| p["host"].as_str())
        .collect();
    hosts.iter().all(|h| peers.contains(h)).then_some(())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotations_and_revocations_spread_across_the_space() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |n: &str| {
        let d = tmp.path().join(n);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    // Three hosts: A, where the publisher's signed files are dropped (it trusts nobody); R, which
    // trusts the publisher's new key and runs its type; B, which trusts the old key and runs its
    // type. A and B know only R (and cannot reach each other: everything passes through R).
    let (state_a, types_a) = (dir("a-state"), dir("a-types"));
    let (state_r, types_r) = (dir("r-state"), dir("r-types"));
    let (state_b, types_b) = (dir("b-state"), dir("b-types"));
    let relay_key = SecretKey::from_seed([0x71; 32]);
    gleaner_client::keys::write(&state_r.join("host.key"), &relay_key, false).unwrap();
    let port = free_port();
    let relay_addr = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{}", relay_key.public());
    let space_args = |listen: &str, bootstrap: bool| -> Vec<String> {
        let mut v = vec![
            "--space".to_string(),
            "trust-spread".into(),
            "--no-mdns".into(),
            "--listen".into(),
            listen.into(),
        ];
        if bootstrap {
            v.extend(["--bootstrap".into(), relay_addr.clone()]);
        }
        v
    };
    let p = SecretKey::from_seed([0x72; 32]);
    let p2 = SecretKey::from_seed([0x73; 32]);
    let (kp, kp2) = (tmp.path().join("p.key"), tmp.path().join("p2.key"));
    gleaner_client::keys::write(&kp, &p, false).unwrap();
    gleaner_client::keys::write(&kp2, &p2, false).unwrap();
    signed(&types_b, "old.gmt", &typed("spread-old", &p), &p);
    signed(&types_r, "new.gmt", &typed("spread-new", &p2), &p2);

    let r_args = space_args(&format!("/ip4/127.0.0.1/tcp/{port}"), false);
    let ab_args = space_args("/ip4/127.0.0.1/tcp/0", true);
    let r = start_with(
        &state_r,
        &types_r,
        &[format!("{}=1", p2.public())],
        &refs(&r_args),
    );
    let a = start_with(&state_a, &types_a, &[], &refs(&ab_args));
    let b = start_with(
        &state_b,
        &types_b,
        &[format!("{}=1", p.public())],
        &refs(&ab_args),
    );
    let (sock_a, sock_r, sock_b) = (
        state_a.join("control.sock"),
        state_r.join("control.sock"),
        state_b.join("control.sock"),
    );
    let mut hosts = Vec::new();
    for sock in [&sock_a, &sock_r, &sock_b] {
        let host = eventually(90, "a daemon to answer", async || {
            Some(status(sock).await?["host"].as_str()?.to_owned())
        })
        .await;
        hosts.push(host);
    }
    let _cleanup: Vec<Cleanup> = hosts.iter().map(|h| Cleanup(h.clone())).collect();
    expect_running(
        &[(&sock_b, &["spread-old"]), (&sock_r, &["spread-new"])],
        90,
    )
    .await;
    // Gossip flows both ways through the relay before anything is signed.
    let all: Vec<&str> = hosts.iter().map(String::as_str).collect();
    eventually(60, "A and B in each other's view", async || {
        sees(&sock_a, &all[1..]).await?;
        sees(&sock_b, &all[..2]).await
    })
    .await;
    // `gleaner space` shows that view, as JSON and as text, with the advert relay's links: R is
    // the only peer A and B know, so each of them holds a link to R.
    let s = sock_r.to_str().unwrap();
    let o = gleaner(&["space", "--json", "--socket", s]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut listed: Vec<&str> = v["peers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["host"].as_str())
        .collect();
    listed.sort();
    let mut want = all.clone();
    want.sort();
    assert_eq!(listed, want, "{v}");
    let links = v["relay"]["outbound"].as_u64().unwrap() + v["relay"]["inbound"].as_u64().unwrap();
    assert!(links >= 2, "R links A and B: {v}");
    let o = gleaner(&["space", "--socket", s]);
    assert!(o.status.success(), "{}", text(&o));
    let shown = String::from_utf8_lossy(&o.stdout);
    assert!(
        shown.contains("space trust-spread") && shown.contains("relay "),
        "{shown}"
    );
    for h in &all {
        assert!(shown.contains(h), "{h} missing from:\n{shown}");
    }

    // The publisher rotates to P2 on host A: B, which never saw the file, moves to the new key,
    // and fetches the new key's type from R, which it sees running it.
    let o = gleaner(&[
        "key",
        "rotate",
        "--old",
        kp.to_str().unwrap(),
        "--new",
        kp2.to_str().unwrap(),
        "-o",
        types_a.join("p-to-p2.gkr").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    eventually(
        60,
        "spread-new running on B instead of spread-old",
        async || (running(&sock_b).await? == ["spread-new"]).then_some(()),
    )
    .await;
    let ev = events_text(&sock_b).await;
    assert!(
        ev.contains("key rotation") && ev.contains("from peer"),
        "{ev}"
    );
    // B's space fetched it (the node keeps what it fetched to serve on): no file of B's had it.
    let new_bytes = std::fs::read(types_r.join("new.gmt")).unwrap();
    let new_digest = Envelope::open_bytes::<MachineType>(&new_bytes)
        .unwrap()
        .digest
        .to_string();
    let served = space(&sock_b).await.unwrap()["machine_types"].clone();
    assert!(
        served
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d.as_str() == Some(new_digest.as_str())),
        "{served}"
    );

    // Then the old key is revoked on host A: B stops the new key's machines and refuses its types,
    // and so does R, which trusted the new key alone (it is joined to the revoked one).
    let o = gleaner(&[
        "key",
        "revoke",
        kp.to_str().unwrap(),
        "--reason",
        "publisher key stolen",
        "-o",
        types_a.join("p.grv").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    eventually(60, "spread-new withdrawn and stopped on B", async || {
        (running(&sock_b).await?.is_empty() && offers(&sock_b).await?.is_empty()).then_some(())
    })
    .await;
    let ev = events_text(&sock_b).await;
    assert!(
        ev.contains("publisher key stolen") && ev.contains("withdrew spread-new"),
        "{ev}"
    );
    eventually(60, "spread-new stopped on R", async || {
        (running(&sock_r).await?.is_empty() && offers(&sock_r).await?.is_empty()).then_some(())
    })
    .await;
    // A type of the revoked chain that B reads afterwards is refused, with the reason.
    signed(&types_b, "late.gmt", &typed("spread-late", &p2), &p2);
    let ev = eventually(20, "the late type refused on B", async || {
        let ev = events_text(&sock_b).await;
        ev.contains("spread-late").then_some(ev)
    })
    .await;
    assert!(ev.contains("was revoked"), "{ev}");
    assert!(!ev.contains("starting spread-late"), "{ev}");
    // R and B keep the revocation and trust nobody now.
    for sock in [&sock_b, &sock_r] {
        let o = gleaner(&[
            "trust",
            "list",
            "--json",
            "--socket",
            sock.to_str().unwrap(),
        ]);
        let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(list["trusted"], serde_json::json!([]), "{list}");
        assert_eq!(list["revoked"][0]["id"], p.public().to_string(), "{list}");
    }
    assert_eq!(running(&sock_b).await.unwrap(), Vec::<String>::new());
    for d in [a, r, b] {
        stop(d);
    }
    for (host, state) in [(&hosts[1], &state_r), (&hosts[2], &state_b)] {
        let rt = docker(host, state).await;
        assert_nothing_left(&rt, state).await;
    }
}
