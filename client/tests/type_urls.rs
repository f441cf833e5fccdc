//! Machine types from their HTTPS URLs, with a real daemon on the real Docker Engine and a real
//! HTTPS server (self-signed, pinned by fingerprint): a trusted type is fetched, offered and run;
//! a new version at the URL replaces it; the old version served again is refused as a rollback;
//! an untrusted publisher's type, an expired type, an oversize body (with and without a length),
//! a 404 and a server whose certificate is not the pinned one each give nothing, with the reason in
//! `gleaner events`; a URL that starts answering later is picked up; unchanged types cost the
//! server a 304, not the body; and the versions seen survive a restart.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use gleaner::{Digest, Envelope, MachineType, SecretKey};
use support::*;

/// What the server serves and what it was asked.
#[derive(Default)]
struct Served {
    /// Path → body; a path absent is a 404. "bigstream" is streamed with no length.
    files: HashMap<String, Vec<u8>>,
    /// Requests per path, and how many of them got the whole body (200).
    asked: HashMap<String, usize>,
    bodies: HashMap<String, usize>,
}

type Shared = Arc<Mutex<Served>>;

async fn get(
    State(s): State<Shared>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let mut s = s.lock().unwrap();
    *s.asked.entry(name.clone()).or_default() += 1;
    let Some(body) = s.files.get(&name).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let etag = format!("\"{}\"", Digest::of(&body));
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        return StatusCode::NOT_MODIFIED.into_response();
    }
    *s.bodies.entry(name.clone()).or_default() += 1;
    if name == "bigstream" {
        let chunks = body
            .chunks(16 * 1024)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>();
        return Response::new(Body::from_stream(futures_util::stream::iter(chunks)));
    }
    ([(header::ETAG, etag)], body).into_response()
}

/// An HTTPS server on loopback with a fresh self-signed certificate: its address and the
/// certificate's SHA-256 (what `#fingerprint=` pins).
async fn serve(state: Shared) -> (SocketAddr, Digest) {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let made =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let fingerprint = Digest::of(made.cert.der());
    let config = axum_server::tls_rustls::RustlsConfig::from_pem(
        made.cert.pem().into_bytes(),
        made.signing_key.serialize_pem().into_bytes(),
    )
    .await
    .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/{name}", axum::routing::get(get))
        .with_state(state);
    tokio::spawn(async move {
        axum_server::from_tcp_rustls(listener, config)
            .unwrap()
            .serve(app.into_make_service())
            .await
    });
    (addr, fingerprint)
}

fn sealed(mt: &MachineType, key: &SecretKey) -> Vec<u8> {
    Envelope::seal(mt, key).to_bytes()
}

/// The offers as "name vN".
async fn offers(sock: &Path) -> Option<Vec<String>> {
    let s = status(sock).await?;
    let mut v: Vec<String> = s["factory"]["offers"]
        .as_array()?
        .iter()
        .map(|o| format!("{} v{}", o["name"].as_str().unwrap_or("?"), o["version"]))
        .collect();
    v.sort();
    Some(v)
}

struct Cleanup(String);
impl Drop for Cleanup {
    fn drop(&mut self) {
        remove_owned(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machine_types_come_from_their_https_urls() {
    let dir = tempfile::tempdir().unwrap();
    let (state, types) = (dir.path().join("state"), dir.path().join("types"));
    std::fs::create_dir_all(&types).unwrap();
    let trusted = publisher();
    let stranger = SecretKey::from_seed([0x5e; 32]);

    let worker = |version: u64, description: &str| {
        let mut mt = machine_type("worker", HEARTBEAT);
        mt.version = version;
        mt.description = description.into();
        sealed(&mt, &trusted)
    };
    let mut expired = machine_type("old", HEARTBEAT);
    expired.not_after = 1;
    let late = machine_type("late", HEARTBEAT);
    let served: Shared = Arc::default();
    {
        let mut s = served.lock().unwrap();
        s.files.insert("worker.gmt".into(), worker(1, "first"));
        let mut theirs = machine_type("stranger", HEARTBEAT);
        theirs.publisher = stranger.public();
        s.files
            .insert("stranger.gmt".into(), sealed(&theirs, &stranger));
        s.files.insert("old.gmt".into(), sealed(&expired, &trusted));
        s.files.insert("big.gmt".into(), vec![7; 300 * 1024]);
        s.files.insert("bigstream".into(), vec![7; 300 * 1024]);
    }
    let (addr, pin) = serve(served.clone()).await;
    let url = |name: &str| format!("https://{addr}/{name}#fingerprint={pin}");
    let wrong_pin = format!("https://{addr}/worker.gmt#fingerprint={}", "00".repeat(32));

    let mut args = vec![
        "--type-url-every",
        "1s",
        "--cores",
        "2",
        "--memory",
        "2GiB",
        "--tick-ms",
        "200",
        "--preset",
        "always-gently",
    ];
    let urls: Vec<String> = [
        "worker.gmt",
        "stranger.gmt",
        "old.gmt",
        "big.gmt",
        "bigstream",
        "late.gmt",
    ]
    .iter()
    .map(|n| url(n))
    .chain([wrong_pin])
    .collect();
    for u in &urls {
        args.extend(["--type-url", u.as_str()]);
    }
    let daemon = spawn_daemon(&state, &types, &args);
    let sock = state.join("control.sock");
    let host = eventually(30, "the daemon's status", async || status(&sock).await).await["host"]
        .as_str()
        .unwrap()
        .to_owned();
    let _cleanup = Cleanup(host);

    // The trusted type is fetched, offered and run; nothing else is offered.
    eventually(30, "worker v1 offered", async || {
        (offers(&sock).await? == ["worker v1"]).then_some(())
    })
    .await;
    eventually(60, "a worker machine running", async || {
        let s = status(&sock).await?;
        s["factory"]["machines"]
            .as_array()?
            .iter()
            .any(|m| m["name"] == "worker")
            .then_some(())
    })
    .await;
    // Each refusal, with its reason and URL.
    let reasons = [
        (url("stranger.gmt"), "not trusted"),
        (url("old.gmt"), "expired"),
        (url("big.gmt"), "larger than 262144 bytes"),
        (url("bigstream"), "larger than 262144 bytes"),
        (url("late.gmt"), "HTTP 404"),
        (format!("https://{addr}/worker.gmt"), "is pinned"),
    ];
    let said = eventually(30, "every refusal in the events", async || {
        let e = events_text(&sock).await;
        reasons
            .iter()
            .all(|(u, why)| {
                let u = u.split('#').next().unwrap_or(u);
                e.lines().any(|l| l.contains(u) && l.contains(why))
            })
            .then_some(e)
    })
    .await;
    // A URL down for good is said once, not at every retry.
    let notfound = said
        .lines()
        .filter(|l| l.contains("late.gmt") && l.contains("404"))
        .count();
    assert_eq!(notfound, 1, "{said}");

    // A new version at the URL replaces the old one.
    served
        .lock()
        .unwrap()
        .files
        .insert("worker.gmt".into(), worker(2, "second"));
    eventually(20, "worker v2 offered", async || {
        (offers(&sock).await? == ["worker v2"]).then_some(())
    })
    .await;

    // An older release this host never saw is a rollback, and so is a second v2: each is
    // refused, and v2 stays.
    for (version, description) in [(1, "an old release"), (2, "a second v2")] {
        served
            .lock()
            .unwrap()
            .files
            .insert("worker.gmt".into(), worker(version, description));
        eventually(20, "the rollback refused", async || {
            events_text(&sock)
                .await
                .lines()
                .any(|l| l.contains(&format!("worker v{version})")) && l.contains("rollback"))
                .then_some(())
        })
        .await;
        assert_eq!(offers(&sock).await.unwrap(), ["worker v2"]);
    }

    // A URL that starts answering is picked up, and said to answer again.
    served
        .lock()
        .unwrap()
        .files
        .insert("late.gmt".into(), sealed(&late, &trusted));
    eventually(30, "late v1 offered", async || {
        let o = offers(&sock).await?;
        o.contains(&format!("late v{}", late.version)).then_some(())
    })
    .await;
    assert!(
        events_text(&sock)
            .await
            .lines()
            .any(|l| l.contains("late.gmt") && l.contains("answers again")),
        "{}",
        events_text(&sock).await
    );
    let o = offers(&sock).await.unwrap();
    assert!(
        !o.iter()
            .any(|t| t.starts_with("stranger") || t.starts_with("old")),
        "{o:?}"
    );

    // Polled every second, the worker's URL sent its body once per release it served (v1, v2,
    // the old v1, the second v2): every other answer was a 304.
    let (asked, bodies) = eventually(20, "more polls of the worker's URL", async || {
        let s = served.lock().unwrap();
        let (asked, bodies) = (s.asked["worker.gmt"], s.bodies["worker.gmt"]);
        (asked >= bodies + 3).then_some((asked, bodies))
    })
    .await;
    assert_eq!(bodies, 4, "asked {asked} times");

    // The versions seen survive a restart: the URL still serves a second v2, refused again.
    drop(daemon);
    let _daemon = spawn_daemon(&state, &types, &args);
    eventually(30, "late offered after the restart", async || {
        let o = offers(&sock).await?;
        o.contains(&format!("late v{}", late.version)).then_some(())
    })
    .await;
    eventually(20, "the rollback refused after the restart", async || {
        events_text(&sock)
            .await
            .lines()
            .any(|l| l.contains("worker v2)") && l.contains("rollback"))
            .then_some(())
    })
    .await;
    let o = offers(&sock).await.unwrap();
    assert!(!o.iter().any(|t| t.starts_with("worker")), "{o:?}");
}
