//! The coordinator's API driven without a socket: enrolment, verified ingest (forged, replayed,
//! duplicated, impossible and unenrolled records), credit, the dashboard, a project's history,
//! metrics, rate and size limits — on SQLite, and on PostgreSQL with the same answers.

#[path = "support/pg.rs"]
mod pg;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use gleaner::enrolment::Enrolment;
use gleaner::{Digest, Envelope, Id16, MachineType, OutcomeCode, SecretKey, UsageRecord};
use gleaner_coordinator::api::AppState;
use gleaner_coordinator::ratelimit::{Quota, RateLimits};
use gleaner_coordinator::store::{Backend, Stats, Store};
use tower::ServiceExt;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sqlite_url(dir: &std::path::Path) -> String {
    format!("sqlite://{}", dir.join("c.db").display())
}

async fn state_with(url: &str, limits: RateLimits) -> Arc<AppState> {
    let store = Store::open(url).await.unwrap();
    assert_eq!(
        store.backend() == Backend::Postgres,
        url.starts_with("postgres:"),
        "the URL chooses the engine"
    );
    store
        .add_account("alice", "physics", "t0ken", now())
        .await
        .unwrap();
    Arc::new(AppState::new(store, "coord-1".into(), limits))
}

async fn state(url: &str) -> Arc<AppState> {
    state_with(url, RateLimits::default()).await
}

async fn call(st: &Arc<AppState>, method: &str, uri: &str, body: Vec<u8>) -> (StatusCode, String) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header(
            "content-type",
            if uri.ends_with("enrol") {
                "application/json"
            } else {
                "application/cbor"
            },
        )
        .body(Body::from(body))
        .unwrap();
    let resp = gleaner_coordinator::app(st.clone())
        .oneshot(req)
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 24)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

fn record(host: &SecretKey, n: u8, cpu_ms: u64) -> UsageRecord {
    let end = now() - 10;
    UsageRecord {
        v: 1,
        record_id: Id16([n; 16]),
        host: host.public(),
        machine_id: Id16([n; 16]),
        publisher: SecretKey::from_seed([9; 32]).public(),
        machine_type: Digest([1; 32]),
        start: end - 3600,
        end,
        cpu_ms,
        wall_ms: 3_600_000,
        peak_memory: 1 << 20,
        cores: 1,
        benchmark: 1000,
        outcome: OutcomeCode::Success,
    }
}

fn batch(envs: &[Envelope]) -> Vec<u8> {
    gleaner::cbor::to_vec(&envs.to_vec())
}

async fn enrol(
    st: &Arc<AppState>,
    host: &SecretKey,
    account: &str,
    token: &str,
    coordinator: &str,
) -> (StatusCode, String) {
    let e = Enrolment {
        v: 1,
        host: host.public(),
        account: account.into(),
        coordinator: coordinator.into(),
        at: now(),
    };
    let body = serde_json::json!({"account": account, "token": token, "envelope": hex::encode(Envelope::seal(&e, host).to_bytes())});
    call(st, "POST", "/api/v1/enrol", body.to_string().into_bytes()).await
}

fn statuses(body: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap().to_owned())
        .collect()
}

/// Everything a client saw in the ingest scenario, to compare across backends.
#[derive(Debug, PartialEq)]
struct Transcript {
    statuses: Vec<Vec<String>>,
    stats: Stats,
}

/// Enrolment, then good, duplicated, forged, impersonated, impossible, future and replayed records.
async fn ingest_scenario(url: &str) -> Transcript {
    let st = state(url).await;
    let host = SecretKey::from_seed([1; 32]);
    let mut seen = Vec::new();

    // Not enrolled yet: deferred, not lost.
    let env = Envelope::seal(&record(&host, 1, 1_800_000), &host);
    let (code, body) = call(
        &st,
        "POST",
        "/api/v1/usage",
        batch(std::slice::from_ref(&env)),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(statuses(&body), ["retry"]);
    seen.push(statuses(&body));

    // Enrolment: wrong token, wrong coordinator, then right.
    assert_eq!(
        enrol(&st, &host, "alice", "nope", "coord-1").await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        enrol(&st, &host, "alice", "t0ken", "coord-2").await.0,
        StatusCode::FORBIDDEN
    );
    let (code, body) = enrol(&st, &host, "alice", "t0ken", "coord-1").await;
    assert_eq!(code, StatusCode::OK, "{body}");

    // Good, duplicated, forged, impossible, future.
    let mut forged = Envelope::seal(&record(&host, 2, 1_000), &host);
    forged.signature[3] ^= 1;
    let stranger = SecretKey::from_seed([7; 32]);
    let mut impersonated = record(&host, 3, 1_000);
    impersonated.record_id = Id16([3; 16]);
    let impersonated = Envelope::seal(&impersonated, &stranger);
    let mut impossible = record(&host, 4, 0);
    impossible.cpu_ms = impossible.wall_ms * 2;
    let mut future = record(&host, 5, 1_000);
    future.end = now() + 86_400;
    future.start = future.end - 3600;
    let batch1 = batch(&[
        env.clone(),
        env.clone(),
        forged,
        impersonated,
        Envelope::seal(&impossible, &host),
        Envelope::seal(&future, &host),
    ]);
    let (code, body) = call(&st, "POST", "/api/v1/usage", batch1).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(
        statuses(&body),
        [
            "accepted",
            "duplicate",
            "rejected",
            "rejected",
            "rejected",
            "rejected"
        ],
        "{body}"
    );
    assert!(body.contains("bad signature"), "{body}");
    assert!(body.contains("future"), "{body}");
    seen.push(statuses(&body));

    // A replay of the whole batch later is all duplicates: credit counted once.
    let (_, body) = call(&st, "POST", "/api/v1/usage", batch(&[env])).await;
    assert_eq!(statuses(&body), ["duplicate"]);
    seen.push(statuses(&body));
    let stats = st.store.stats().await.unwrap();
    assert_eq!(stats.records, 1);
    assert!(
        (stats.total_credit - 50.0).abs() < 1e-6,
        "half a core-hour at reference speed: {}",
        stats.total_credit
    );
    assert_eq!(stats.volunteers[0].key, "alice");
    // 50 credits just now: the recent average per day is 50 × ln 2 / 7 days.
    let rac = stats.volunteers[0].rac;
    assert!(
        (rac - 50.0 * std::f64::consts::LN_2 / 7.0).abs() < 0.01,
        "{rac}"
    );
    assert_eq!(stats.teams[0].key, "physics");

    // Junk bodies are refused with a reason.
    let (code, body) = call(&st, "POST", "/api/v1/usage", vec![0x9f, 0xff]).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(body.contains("indefinite"), "{body}");

    let (code, html) = call(&st, "GET", "/", vec![]).await;
    assert_eq!(code, StatusCode::OK);
    assert!(
        html.contains("alice") && html.contains("<svg") && html.contains("class=\"bar\""),
        "{html}"
    );
    let (_, m) = call(&st, "GET", "/metrics", vec![]).await;
    assert!(
        m.contains("gleaner_coordinator_records_accepted_total 1"),
        "{m}"
    );
    assert_eq!(call(&st, "GET", "/healthz", vec![]).await.0, StatusCode::OK);
    let (code, _) = call(&st, "GET", &format!("/host/{}", host.public()), vec![]).await;
    assert_eq!(code, StatusCode::OK);
    Transcript {
        statuses: seen,
        stats: st.store.stats().await.unwrap(),
    }
}

#[tokio::test]
async fn ingest_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    ingest_scenario(&sqlite_url(dir.path())).await;
}

/// Floating sums may differ in the last bits between engines (summation order), and the recent
/// average decays between the two reads: compare those with a tolerance, the rest exactly.
fn assert_same_stats(a: &Stats, b: &Stats) {
    let close = |x: f64, y: f64| (x - y).abs() <= 1e-6 * x.abs().max(y.abs()).max(1.0);
    assert!(close(a.total_credit, b.total_credit), "{a:?}\n{b:?}");
    assert!(close(a.total_cpu_hours, b.total_cpu_hours), "{a:?}\n{b:?}");
    assert_eq!((a.records, a.hosts), (b.records, b.hosts));
    for (x, y) in [
        (&a.volunteers, &b.volunteers),
        (&a.teams, &b.teams),
        (&a.hosts_board, &b.hosts_board),
        (&a.projects, &b.projects),
    ] {
        assert_eq!(x.len(), y.len(), "{x:?}\n{y:?}");
        for (r, s) in x.iter().zip(y) {
            assert_eq!((&r.key, &r.id, r.records), (&s.key, &s.id, s.records));
            assert!(close(r.credit, s.credit) && close(r.cpu_hours, s.cpu_hours));
            // The two runs read RAC a few seconds apart (one-week half-life: 1e-4 is ~90 s).
            assert!(
                (r.rac - s.rac).abs() <= 1e-4 * r.rac.abs().max(1.0),
                "{r:?} {s:?}"
            );
        }
    }
    assert_eq!(a.per_day.len(), b.per_day.len());
    for (d, e) in a.per_day.iter().zip(&b.per_day) {
        assert!(d.0 == e.0 && close(d.1, e.1), "{d:?} {e:?}");
    }
}

#[tokio::test]
async fn ingest_on_postgres_gives_the_same_answers_as_sqlite() {
    let Some(cluster) = pg::PgCluster::start_or_skip("ingest_on_postgres") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let lite = ingest_scenario(&sqlite_url(dir.path())).await;
    let post = ingest_scenario(&cluster.create_db("ingest")).await;
    assert_eq!(lite.statuses, post.statuses);
    assert_same_stats(&lite.stats, &post.stats);
}

/// A request from a given peer address, answered with its headers.
async fn call_from(
    st: &Arc<AppState>,
    peer: &str,
    uri: &str,
    body: Vec<u8>,
) -> (StatusCode, axum::http::HeaderMap) {
    let addr: std::net::SocketAddr = peer.parse().unwrap();
    let mut req = Request::builder()
        .method("POST")
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    req.extensions_mut()
        .insert(axum::extract::ConnectInfo(addr));
    let resp = gleaner_coordinator::app(st.clone())
        .oneshot(req)
        .await
        .unwrap();
    (resp.status(), resp.headers().clone())
}

#[tokio::test]
async fn rate_and_size_limits() {
    let dir = tempfile::tempdir().unwrap();
    let limits = RateLimits {
        ingest: Quota {
            per_second: 0.01,
            burst: 3,
        },
        enrol: Quota {
            per_second: 0.01,
            burst: 2,
        },
    };
    let st = state_with(&sqlite_url(dir.path()), limits).await;
    let host = SecretKey::from_seed([1; 32]);
    let e = Enrolment {
        v: 1,
        host: host.public(),
        account: "alice".into(),
        coordinator: "coord-1".into(),
        at: now(),
    };
    let wrong = serde_json::json!({"account": "alice", "token": "guess", "envelope": hex::encode(Envelope::seal(&e, &host).to_bytes())}).to_string();
    // Guessing tokens: the burst is answered, then 429 with when to come back.
    for _ in 0..2 {
        let (code, _) =
            call_from(&st, "10.1.1.1:5000", "/api/v1/enrol", wrong.clone().into()).await;
        assert_eq!(code, StatusCode::FORBIDDEN);
    }
    let (code, headers) =
        call_from(&st, "10.1.1.1:5001", "/api/v1/enrol", wrong.clone().into()).await;
    assert_eq!(code, StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=100).contains(&retry), "{retry}");
    // Another address is not held back by the first.
    let (code, _) = call_from(&st, "10.1.1.2:5000", "/api/v1/enrol", wrong.into()).await;
    assert_eq!(code, StatusCode::FORBIDDEN);

    // Ingest has its own bucket per address.
    let env = Envelope::seal(&record(&host, 1, 1_000), &host);
    for _ in 0..3 {
        let (code, _) = call_from(
            &st,
            "10.1.1.1:5000",
            "/api/v1/usage",
            batch(std::slice::from_ref(&env)),
        )
        .await;
        assert_eq!(code, StatusCode::OK);
    }
    let (code, headers) = call_from(
        &st,
        "[2001:db8::1]:5000",
        "/api/v1/usage",
        batch(std::slice::from_ref(&env)),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{headers:?}");
    let (code, headers) = call_from(&st, "10.1.1.1:5000", "/api/v1/usage", batch(&[env])).await;
    assert_eq!(code, StatusCode::TOO_MANY_REQUESTS);
    assert!(headers.contains_key("retry-after"));

    // A body over the batch limit (4 MiB) is refused before it is read whole.
    let (code, _) = call_from(&st, "10.1.1.3:5000", "/api/v1/usage", vec![0u8; 5 << 20]).await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
}

/// A project with one registered machine type and records on two days; returns the project's JSON.
async fn project_scenario(url: &str) -> serde_json::Value {
    let st = state(url).await;
    let host = SecretKey::from_seed([1; 32]);
    let publisher = SecretKey::from_seed([9; 32]);
    assert_eq!(
        enrol(&st, &host, "alice", "t0ken", "coord-1").await.0,
        StatusCode::OK
    );
    let mt = MachineType::example(publisher.public());
    let (code, body) = call(
        &st,
        "POST",
        "/api/v1/machine-types",
        Envelope::seal(&mt, &publisher).to_bytes(),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let digest = serde_json::from_str::<serde_json::Value>(&body).unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut envs = Vec::new();
    for (n, days_ago) in [(1u8, 0u64), (2, 0), (3, 2)] {
        let mut r = record(&host, n, 1_800_000);
        r.machine_type = Digest(hex::decode(&digest).unwrap().try_into().unwrap());
        r.end -= days_ago * 86_400;
        r.start -= days_ago * 86_400;
        envs.push(Envelope::seal(&r, &host));
    }
    // And one record of another project, which must not show up.
    let mut other = record(&host, 4, 1_800_000);
    other.publisher = SecretKey::from_seed([8; 32]).public();
    envs.push(Envelope::seal(&other, &host));
    let (_, body) = call(&st, "POST", "/api/v1/usage", batch(&envs)).await;
    assert_eq!(statuses(&body), ["accepted"; 4], "{body}");

    // The dashboard links the project by its publisher key, shown by its machine type's name.
    let (_, html) = call(&st, "GET", "/", vec![]).await;
    let link = format!("href=\"/project/{}\"", publisher.public());
    assert!(
        html.contains(&link) && html.contains("example-busybox"),
        "{html}"
    );

    let (code, html) = call(
        &st,
        "GET",
        &format!("/project/{}", publisher.public()),
        vec![],
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    assert!(html.contains("Project example-busybox"), "{html}");
    assert_eq!(html.matches("<rect class=\"bar\"").count(), 2, "{html}");
    assert!(html.contains("credit 150.00"), "{html}");

    let (code, json) = call(
        &st,
        "GET",
        &format!("/api/v1/project/{}", publisher.public()),
        vec![],
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["records"], 3);
    assert_eq!(v["hosts"], 1);
    assert_eq!(v["per_day"].as_array().unwrap().len(), 2);
    assert_eq!(v["machine_types"][0]["name"], "example-busybox");
    assert_eq!(v["machine_types"][0]["digest"], digest.as_str());

    // By machine type: the same records.
    let (code, json) = call(&st, "GET", &format!("/api/v1/project/{digest}"), vec![]).await;
    assert_eq!(code, StatusCode::OK);
    let by_mt: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(by_mt["records"], 3);
    assert_eq!(by_mt["name"], "example-busybox");

    // The host's own view (what `gleaner credit` shows): all its records, its account.
    let (code, json) = call(
        &st,
        "GET",
        &format!("/api/v1/host/{}", host.public()),
        vec![],
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{json}");
    let h: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(h["records"], 4);
    assert_eq!(h["account"], "alice");
    assert!((h["cpu_hours"].as_f64().unwrap() - 2.0).abs() < 1e-9, "{h}");
    assert!(h["credit"].as_f64().unwrap() > 0.0, "{h}");
    assert_eq!(
        call(&st, "GET", "/api/v1/host/nobody", vec![]).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        call(&st, "GET", "/project/nobody", vec![]).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        call(&st, "GET", "/api/v1/project/nobody", vec![]).await.0,
        StatusCode::NOT_FOUND
    );
    v
}

/// Many clients at once, re-sending overlapping batches (a ledger retrying after lost answers):
/// every record is accepted exactly once across all answers, and stored once.
async fn concurrent_exactly_once(url: &str) -> (usize, i64) {
    let st = state_with(url, RateLimits::UNLIMITED).await;
    let host = SecretKey::from_seed([1; 32]);
    assert_eq!(
        enrol(&st, &host, "alice", "t0ken", "coord-1").await.0,
        StatusCode::OK
    );
    let envs: Arc<Vec<Envelope>> = Arc::new(
        (0..200u8)
            .map(|n| Envelope::seal(&record(&host, n, 1_000), &host))
            .collect(),
    );
    let mut tasks = Vec::new();
    for t in 0..8usize {
        let (st, envs) = (st.clone(), envs.clone());
        tasks.push(tokio::spawn(async move {
            let mut accepted = 0;
            for b in 0..10usize {
                let start = (t * 37 + b * 23) % 150;
                let (code, body) = call(
                    &st,
                    "POST",
                    "/api/v1/usage",
                    batch(&envs[start..start + 50]),
                )
                .await;
                assert_eq!(code, StatusCode::OK, "{body}");
                accepted += statuses(&body).iter().filter(|s| *s == "accepted").count();
            }
            accepted
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        accepted += t.await.unwrap();
    }
    let stored = st.store.stats().await.unwrap().records;
    assert_eq!(
        accepted as i64, stored,
        "accepted answers match stored records"
    );
    (accepted, stored)
}

#[tokio::test]
async fn project_history_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    project_scenario(&sqlite_url(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_ingest_exactly_once_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    concurrent_exactly_once(&sqlite_url(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn project_and_concurrency_on_postgres_match_sqlite() {
    let Some(cluster) = pg::PgCluster::start_or_skip("project_on_postgres") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let lite = project_scenario(&sqlite_url(dir.path())).await;
    let post = project_scenario(&cluster.create_db("project")).await;
    assert_eq!(
        lite["per_day"].as_array().unwrap().len(),
        post["per_day"].as_array().unwrap().len()
    );
    for key in ["id", "name", "records", "hosts", "machine_types"] {
        assert_eq!(lite[key], post[key], "{key}");
    }
    assert!((lite["credit"].as_f64().unwrap() - post["credit"].as_f64().unwrap()).abs() < 1e-6);

    let dir2 = tempfile::tempdir().unwrap();
    let lite = concurrent_exactly_once(&sqlite_url(dir2.path())).await;
    let post = concurrent_exactly_once(&cluster.create_db("concurrent")).await;
    assert_eq!(lite, post);
}
