//! The coordinator's API driven without a socket: enrolment, verified ingest (forged, replayed,
//! duplicated, impossible and unenrolled records), credit, the dashboard and metrics.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use gleaner::enrolment::Enrolment;
use gleaner::{Digest, Envelope, Id16, OutcomeCode, SecretKey, UsageRecord};
use gleaner_coordinator::api::{AppState, Metrics};
use gleaner_coordinator::store::Store;
use tower::ServiceExt;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn state(dir: &std::path::Path) -> Arc<AppState> {
    let store = Store::open(&format!("sqlite://{}", dir.join("c.db").display()))
        .await
        .unwrap();
    store
        .add_account("alice", "physics", "t0ken", now())
        .await
        .unwrap();
    Arc::new(AppState {
        store,
        identity: "coord-1".into(),
        metrics: Metrics::default(),
    })
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

#[tokio::test]
async fn enrolment_ingest_and_dashboard() {
    let dir = tempfile::tempdir().unwrap();
    let st = state(dir.path()).await;
    let host = SecretKey::from_seed([1; 32]);

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

    // A replay of the whole batch later is all duplicates: credit counted once.
    let (_, body) = call(&st, "POST", "/api/v1/usage", batch(&[env])).await;
    assert_eq!(statuses(&body), ["duplicate"]);
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
}
