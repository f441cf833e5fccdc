//! The dashboard in a real browser: headless Chromium (Debian's package) loads the page served by a
//! real coordinator after records were ingested, and shows the leaderboard and the chart. The
//! screenshot is kept at target/test-artefacts/dashboard.png for reviewers. A project's history page,
//! linked from the dashboard, is loaded too.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use gleaner::enrolment::Enrolment;
use gleaner::{Digest, Envelope, Id16, OutcomeCode, SecretKey, UsageRecord};

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn chromium(args: &[&str], profile: &std::path::Path) -> std::process::Output {
    Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--ignore-certificate-errors",
            "--window-size=1280,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .expect("chromium is installed (installers/install-deps.sh)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_shows_leaderboard_and_chart() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("c");
    let bin = env!("CARGO_BIN_EXE_gleaner-coordinator");
    for (name, team) in [("alice", "physics"), ("bob", "biology")] {
        let ok = Command::new(bin)
            .arg("--data-dir")
            .arg(&data)
            .args(["account", "add", name, "--team", team, "--token", name])
            .status()
            .unwrap();
        assert!(ok.success());
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(bin)
        .arg("--data-dir")
        .arg(&data)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let line = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .next()
        .unwrap()
        .unwrap();
    let fingerprint = line
        .strip_prefix("fingerprint ")
        .unwrap()
        .trim()
        .to_string();
    let base = format!("https://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .tls_danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    for _ in 0..100 {
        if http.get(format!("{base}/healthz")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Two hosts, records over three days.
    for (seed, account, cpu_h) in [(1u8, "alice", 3u64), (2, "bob", 1)] {
        let host = SecretKey::from_seed([seed; 32]);
        let e = Enrolment {
            v: 1,
            host: host.public(),
            account: account.into(),
            coordinator: fingerprint.clone(),
            at: now(),
        };
        let body = serde_json::json!({"account": account, "token": account, "envelope": hex::encode(Envelope::seal(&e, &host).to_bytes())});
        let r = http
            .post(format!("{base}/api/v1/enrol"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        let envs: Vec<Envelope> = (0..3u8)
            .map(|day| {
                let end = now() - u64::from(day) * 86_400 - 60;
                let r = UsageRecord {
                    v: 1,
                    record_id: Id16([seed, day, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
                    host: host.public(),
                    machine_id: Id16([day; 16]),
                    publisher: host.public(),
                    machine_type: Digest([1; 32]),
                    start: end - cpu_h * 3600,
                    end,
                    cpu_ms: cpu_h * 3_600_000 * u64::from(day + 1) / 3,
                    wall_ms: cpu_h * 3_600_000,
                    peak_memory: 0,
                    cores: 1,
                    benchmark: 1000,
                    outcome: OutcomeCode::Success,
                };
                Envelope::seal(&r, &host)
            })
            .collect();
        let r = http
            .post(format!("{base}/api/v1/usage"))
            .header("content-type", "application/cbor")
            .body(gleaner::cbor::to_vec(&envs))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }

    let profile = tmp.path().join("profile");
    let dom = chromium(&["--dump-dom", &format!("{base}/")], &profile);
    let html = String::from_utf8_lossy(&dom.stdout);
    assert!(
        html.contains("Volunteers") && html.contains(">alice<") && html.contains(">bob<"),
        "{html}\n{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    assert!(html.contains(">physics<"), "the team board: {html}");
    assert_eq!(
        html.matches("class=\"bar\"").count(),
        3,
        "one bar per day in the chart: {html}"
    );
    let alice = html.find(">alice<").unwrap();
    let bob = html.find(">bob<").unwrap();
    assert!(alice < bob, "alice (more credit) leads the board");

    // The project board links each project's history page, which has its own chart.
    let project = SecretKey::from_seed([1; 32]).public().to_string();
    assert!(
        html.contains(&format!("href=\"/project/{project}\"")),
        "{html}"
    );
    let dom = chromium(
        &["--dump-dom", &format!("{base}/project/{project}")],
        &profile,
    );
    let page = String::from_utf8_lossy(&dom.stdout);
    assert!(page.contains("<h1>Project "), "{page}");
    assert_eq!(
        page.matches("class=\"bar\"").count(),
        3,
        "the project's credit on three days: {page}"
    );

    let art = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-artefacts");
    std::fs::create_dir_all(&art).unwrap();
    let shot = art.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let out = chromium(
        &[
            &format!("--screenshot={}", shot.display()),
            &format!("{base}/"),
        ],
        &profile,
    );
    assert!(shot.exists(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "a real picture"
    );
    let _ = child.kill();
    let _ = child.wait();
}
