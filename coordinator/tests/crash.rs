//! kill -9 of a real coordinator process in the middle of ingest: every batch is either wholly
//! committed and acknowledged, or not acknowledged and re-sent later — never lost, never counted
//! twice. On SQLite and on PostgreSQL (a throwaway cluster on loopback).

#[path = "support/pg.rs"]
mod pg;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use gleaner::enrolment::Enrolment;
use gleaner::{Digest, Envelope, Id16, OutcomeCode, SecretKey, UsageRecord};

struct Server {
    child: Child,
    fingerprint: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn coord(data: &Path, database: Option<&str>) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gleaner-coordinator"));
    c.arg("--data-dir").arg(data);
    if let Some(url) = database {
        c.arg("--database").arg(url);
    }
    c
}

fn serve(data: &Path, database: Option<&str>, port: u16) -> Server {
    let mut child = coord(data, database)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let line = BufReader::new(out).lines().next().unwrap().unwrap();
    let fingerprint = line
        .strip_prefix("fingerprint ")
        .unwrap()
        .trim()
        .to_string();
    Server { child, fingerprint }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn record(host: &SecretKey, batch: u16, i: u16) -> UsageRecord {
    let end = now() - 5;
    let mut id = [0u8; 16];
    id[..2].copy_from_slice(&batch.to_be_bytes());
    id[2..4].copy_from_slice(&i.to_be_bytes());
    UsageRecord {
        v: 1,
        record_id: Id16(id),
        host: host.public(),
        machine_id: Id16(id),
        publisher: host.public(),
        machine_type: Digest([1; 32]),
        start: end - 60,
        end,
        cpu_ms: 30_000,
        wall_ms: 60_000,
        peak_memory: 0,
        cores: 1,
        benchmark: 1000,
        outcome: OutcomeCode::Success,
    }
}

async fn wait_up(http: &reqwest::Client, base: &str) {
    for _ in 0..100 {
        if http.get(format!("{base}/healthz")).send().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("coordinator did not come up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_ingest_never_loses_or_double_counts() {
    kill_9_scenario(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_ingest_on_postgres() {
    let Some(cluster) = pg::PgCluster::start_or_skip("kill_9_mid_ingest_on_postgres") else {
        return;
    };
    kill_9_scenario(Some(&cluster.create_db("crash"))).await;
}

async fn kill_9_scenario(database: Option<&str>) {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("c");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    assert!(
        coord(&data, database)
            .args(["account", "add", "alice", "--token", "tok"])
            .status()
            .unwrap()
            .success()
    );
    let http = reqwest::Client::builder()
        .tls_danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    let base = format!("https://127.0.0.1:{port}");
    let host = SecretKey::from_seed([5; 32]);

    let mut server = serve(&data, database, port);
    wait_up(&http, &base).await;
    let e = Enrolment {
        v: 1,
        host: host.public(),
        account: "alice".into(),
        coordinator: server.fingerprint.clone(),
        at: now(),
    };
    let body = serde_json::json!({"account": "alice", "token": "tok", "envelope": hex::encode(Envelope::seal(&e, &host).to_bytes())});
    let r = http
        .post(format!("{base}/api/v1/enrol"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());

    const BATCHES: u16 = 12;
    const PER: u16 = 100;
    let batches: Vec<Vec<u8>> = (0..BATCHES)
        .map(|b| {
            let envs: Vec<Envelope> = (0..PER)
                .map(|i| Envelope::seal(&record(&host, b, i), &host))
                .collect();
            gleaner::cbor::to_vec(&envs)
        })
        .collect();

    // Send batches one after another; while the sixth is in flight, kill -9 the server.
    let mut acked = vec![false; batches.len()];
    let pid = server.child.id();
    for (i, b) in batches.iter().enumerate() {
        let send = http
            .post(format!("{base}/api/v1/usage"))
            .header("content-type", "application/cbor")
            .body(b.clone())
            .send();
        let r = if i == 5 {
            let inflight = tokio::spawn(send);
            tokio::time::sleep(Duration::from_millis(30)).await;
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            inflight.await.unwrap()
        } else {
            send.await
        };
        if let Ok(r) = r
            && r.status().is_success()
            && let Ok(text) = r.text().await
        {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert!(
                v["results"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|x| x["status"] == "accepted")
            );
            acked[i] = true;
        }
    }
    let _ = server.child.wait();
    let n_acked = acked.iter().filter(|a| **a).count();
    assert!(
        n_acked > 0 && n_acked < batches.len(),
        "the kill landed mid-ingest: {n_acked} of {} acknowledged",
        batches.len()
    );

    // Restart; the client re-sends what was not acknowledged (and, to be sure, everything).
    server = serve(&data, database, port);
    wait_up(&http, &base).await;
    let mut duplicates_of_acked = 0;
    for (i, b) in batches.iter().enumerate() {
        let r = http
            .post(format!("{base}/api/v1/usage"))
            .header("content-type", "application/cbor")
            .body(b.clone())
            .send()
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        let statuses: Vec<&str> = v["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["status"].as_str().unwrap())
            .collect();
        if acked[i] {
            // Acknowledged before the crash: durably there.
            assert!(
                statuses.iter().all(|s| *s == "duplicate"),
                "batch {i} was acknowledged but lost"
            );
            duplicates_of_acked += 1;
        } else {
            // Not acknowledged: wholly absent or wholly present (one transaction), never partial.
            let accepted = statuses.iter().filter(|s| **s == "accepted").count();
            assert!(
                accepted == 0 || accepted == statuses.len(),
                "batch {i} was partly committed"
            );
        }
    }
    assert_eq!(duplicates_of_acked, n_acked);
    let stats: serde_json::Value = serde_json::from_str(
        &http
            .get(format!("{base}/api/v1/stats"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        stats["records"].as_i64().unwrap(),
        i64::from(BATCHES) * i64::from(PER),
        "every record exactly once"
    );
    drop(server);
}
