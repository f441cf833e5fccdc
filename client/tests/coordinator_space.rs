//! The coordinator joined to a space of real client libp2p nodes on loopback (`serve --space`):
//! its dashboard page, `/api/space` and the Prometheus gauges show every factory's advertised
//! capacity; a factory that leaves expires from the view; a forged advert is refused.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use gleaner::advert::{CapacityAdvert, Running, backend_bits};
use gleaner::{Digest, Envelope, SecretKey};
use gleaner_client::coordinator_client::HttpUploader;
use gleaner_client::p2p::{self, SpaceConfig, SpaceHandle};
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use tokio_util::sync::CancellationToken;

use support::eventually;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Killed when dropped, so no test leaves a coordinator behind.
struct Coordinator(Child);

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn coordinator_binary() -> std::path::PathBuf {
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_gleaner"))
        .with_file_name("gleaner-coordinator");
    if !bin.exists() {
        let st = Command::new(env!("CARGO"))
            .args(["build", "-p", "gleaner-coordinator"])
            .status()
            .unwrap();
        assert!(st.success());
    }
    let help = Command::new(&bin)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("--space-listen"),
        "{} is older than this test: cargo build -p gleaner-coordinator",
        bin.display()
    );
    bin
}

/// A factory's signed advert: `free` cores, running `running` machines of one type.
fn advert(key: &SecretKey, seq: u64, free: u16, running: u16, owner_present: bool) -> Envelope {
    let a = CapacityAdvert {
        v: 1,
        host: key.public(),
        seq,
        at: now(),
        free_cores: free,
        free_memory_mib: 1000 * u32::from(free),
        free_disk_mib: 5000,
        backends: backend_bits::DOCKER | backend_bits::TCG,
        running: vec![Running {
            machine_type: Digest([9; 32]),
            count: running,
        }],
        owner_present,
        draining: false,
        benchmark: 1000,
        chain: gleaner::Digest::default(),
    };
    Envelope::seal(&a, key)
}

async fn node(
    seed: u8,
    bootstrap: Vec<Multiaddr>,
    cancel: &CancellationToken,
) -> (SecretKey, SpaceHandle, Multiaddr) {
    let key = SecretKey::from_seed([seed; 32]);
    let mut cfg = SpaceConfig::new("coord-test");
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    cfg.bootstrap = bootstrap;
    let (h, addrs, _task) = p2p::start(&key, cfg, cancel.clone()).await.unwrap();
    let addr = addrs[0]
        .clone()
        .with(Protocol::P2p(key.public().to_string().parse().unwrap()));
    (key, h, addr)
}

async fn get(api: &HttpUploader, path: &str) -> Option<String> {
    let r = api
        .http()
        .get(format!("{}{path}", api.base()))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.text().await.ok()
}

async fn space_json(api: &HttpUploader) -> Option<serde_json::Value> {
    serde_json::from_str(&get(api, "/api/space").await?).ok()
}

/// Free cores per host in the coordinator's view.
fn free_by_host(v: &serde_json::Value) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = v["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p["host"].as_str()?.to_owned(), p["free_cores"].as_u64()?)))
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_shows_live_space_capacity_and_expires_leavers() {
    const TTL: u64 = 6;
    let cancel = CancellationToken::new();
    // Factory A first; the coordinator joins through it, B joins through the coordinator and
    // C through A: the coordinator must interoperate both as dialler and as listener.
    let (ka, ha, aa) = node(1, vec![], &cancel).await;

    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(coordinator_binary())
        .arg("--data-dir")
        .arg(dir.path())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--space", "coord-test"])
        .args(["--space-listen", "/ip4/127.0.0.1/tcp/0"])
        .args(["--space-bootstrap", &aa.to_string()])
        .args(["--space-advert-ttl", &TTL.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _coordinator = Coordinator(child);
    let lines: Vec<String> = BufReader::new(stdout)
        .lines()
        .take(3)
        .map(|l| l.unwrap())
        .collect();
    let fingerprint: Digest = lines[0]
        .strip_prefix("fingerprint ")
        .unwrap_or_else(|| panic!("{lines:?}"))
        .trim()
        .parse()
        .unwrap();
    let coord_addr: Multiaddr = lines[2]
        .strip_prefix("space")
        .unwrap_or_else(|| panic!("no space address printed: {lines:?}"))
        .trim()
        .parse()
        .unwrap();
    let api = HttpUploader::new(
        &format!("https://127.0.0.1:{port}"),
        Some(fingerprint),
        SecretKey::from_seed([0; 32]),
    )
    .unwrap();

    let (kb, hb, _) = node(2, vec![coord_addr], &cancel).await;
    let cancel_c = cancel.child_token();
    let (kc, hc, _) = node(3, vec![aa.clone()], &cancel_c).await;
    let factories = [
        (&ka, &ha, 1u16, false),
        (&kb, &hb, 2, true),
        (&kc, &hc, 3, false),
    ];

    // Factories advertise every second, as they do (jittered) in the daemon.
    let mut seq = 1;
    let want: Vec<(String, u64)> = {
        let mut w: Vec<_> = factories
            .iter()
            .map(|(k, _, free, _)| (k.public().to_string(), u64::from(*free)))
            .collect();
        w.sort();
        w
    };
    let view = eventually(
        90,
        "the coordinator to see all three factories",
        async || {
            for (k, h, free, owner) in &factories {
                h.publish(advert(k, seq, *free, 1, *owner)).unwrap();
            }
            seq += 1;
            tokio::time::sleep(Duration::from_millis(900)).await;
            let v = space_json(&api).await?;
            (free_by_host(&v) == want).then_some(v)
        },
    )
    .await;
    assert_eq!(view["space"], "coord-test");
    assert_eq!(view["totals"]["peers"], 3);
    assert_eq!(view["totals"]["free_cores"], 6);
    assert_eq!(view["totals"]["free_memory_mib"], 6000);
    assert_eq!(view["totals"]["running_machines"], 3);
    assert_eq!(view["totals"]["owner_present"], 1);
    let b = view["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["host"] == kb.public().to_string())
        .unwrap();
    assert_eq!(b["owner_present"], true);
    assert_eq!(b["backends"], serde_json::json!(["docker", "tcg"]));
    assert_eq!(b["running"][0]["machine_type"], Digest([9; 32]).to_string());
    assert_eq!(b["running"][0]["count"], 1);

    // The dashboard: a Space page with a row per factory, a summary on the front page, gauges.
    let page = get(&api, "/space").await.expect("the space page");
    assert_eq!(page.matches("<tr class=\"peer\">").count(), 3, "{page}");
    for (k, ..) in &factories {
        assert!(page.contains(&k.public().to_string()), "{page}");
    }
    assert!(page.contains("present") && page.contains("away"), "{page}");
    let front = get(&api, "/").await.expect("the front page");
    assert!(front.contains("free cores 6"), "{front}");
    let metrics = get(&api, "/metrics").await.expect("metrics");
    assert!(
        metrics.contains("gleaner_coordinator_space_peers 3")
            && metrics.contains("gleaner_coordinator_space_free_cores 6"),
        "{metrics}"
    );

    // C leaves (its node stops); A and B go on advertising. C expires after the TTL.
    cancel_c.cancel();
    let left = [(&ka, &ha, 1u16, false), (&kb, &hb, 2, true)];
    let want_left: Vec<(String, u64)> = want
        .iter()
        .filter(|(h, _)| *h != kc.public().to_string())
        .cloned()
        .collect();
    eventually(TTL + 60, "factory C to expire from the view", async || {
        for (k, h, free, owner) in &left {
            h.publish(advert(k, seq, *free, 1, *owner)).unwrap();
        }
        seq += 1;
        tokio::time::sleep(Duration::from_millis(900)).await;
        let v = space_json(&api).await?;
        (free_by_host(&v) == want_left).then_some(())
    })
    .await;
    let page = get(&api, "/space").await.expect("the space page");
    assert!(!page.contains(&kc.public().to_string()), "{page}");

    // A forged advert (in B's name, but signed by another key), relayed by A, is refused.
    let mallory = SecretKey::from_seed([66; 32]);
    eventually(60, "the forged advert to be refused", async || {
        let mut forged = advert(&mallory, seq, 40, 0, false);
        forged.signer = serde_bytes::ByteArray::new(kb.public().to_bytes());
        ha.publish(forged).unwrap();
        seq += 1;
        tokio::time::sleep(Duration::from_millis(900)).await;
        let v = space_json(&api).await?;
        (v["rejected_messages"].as_u64()? >= 1).then_some(())
    })
    .await;
    let v = space_json(&api).await.unwrap();
    assert!(
        !free_by_host(&v)
            .iter()
            .any(|(h, free)| *h == mallory.public().to_string() || *free == 40),
        "{v}"
    );
    cancel.cancel();
}
