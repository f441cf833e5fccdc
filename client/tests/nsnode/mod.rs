//! What the network-namespace tests (`p2p_netns`, `p2p_mdns`) share: the node each namespace runs
//! (this test binary re-run), which advertises every second and prints its view, and running the
//! `ip` commands that build the namespaces.
#![allow(dead_code)]

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use gleaner::SecretKey;
use gleaner::advert::CapacityAdvert;
use gleaner_client::p2p::{self, SpaceConfig};

/// Runs node `seed` with `cfg` for at most `lifetime`: advertises every second and prints its
/// view (`VIEW <host> <host>...`) and how many peers it holds connections to (`PEERS <n>`) twice
/// a second.
pub fn run_view_node(seed: u8, cfg: SpaceConfig, lifetime: Duration) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let key = SecretKey::from_seed([seed; 32]);
        let cancel = tokio_util::sync::CancellationToken::new();
        let (h, _, _) = p2p::start(&key, cfg, cancel).await.unwrap();
        let deadline = Instant::now() + lifetime;
        let mut seq = 0;
        while Instant::now() < deadline {
            seq += 1;
            if seq % 2 == 0 {
                let a = CapacityAdvert {
                    v: 1,
                    host: key.public(),
                    seq,
                    at: now(),
                    free_cores: 1,
                    free_memory_mib: 1,
                    free_disk_mib: 0,
                    backends: 1,
                    running: vec![],
                    owner_present: false,
                    draining: false,
                    benchmark: 1,
                    chain: gleaner::Digest::default(),
                };
                let _ = h.publish(gleaner::Envelope::seal(&a, &key));
            }
            if let Ok(s) = h.summary().await {
                let mut hosts: Vec<String> = s.peers.into_iter().map(|p| p.host).collect();
                hosts.sort();
                println!("VIEW {}", hosts.join(" "));
                println!("PEERS {}", s.connected);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Runs a command, failing the test with its stderr if it fails.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits up to `secs` for `want` to hold of what `read` returns (what the nodes last printed),
/// looking five times a second, and prints how long it took; fails the test with the last
/// reading if the time runs out.
pub fn wait_for<T: std::fmt::Debug>(
    what: &str,
    secs: u64,
    read: impl Fn() -> T,
    want: impl Fn(&T) -> bool,
) {
    let start = Instant::now();
    loop {
        let now = read();
        if want(&now) {
            eprintln!("{what}: {:.1} s", start.elapsed().as_secs_f64());
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "{what}: still {now:?} after {secs} s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether a namespace test may run here: not when this process is one of its nodes (`node_var`
/// set), and only as root; not root, it is skipped with a message, unless CI is set (CI runs as
/// root, so there the test must run).
pub fn may_run(node_var: &str, what: &str) -> bool {
    if std::env::var_os(node_var).is_some() {
        return false;
    }
    if !is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root: {what} must run"
        );
        eprintln!("skipped: {what} needs root (network namespaces)");
        return false;
    }
    true
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Network namespaces and the nodes running in them; all removed on drop, even after a failed
/// assertion.
pub struct Lab {
    pub ns: Vec<String>,
    pub nodes: Vec<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.nodes {
            let _ = c.kill();
            let _ = c.wait();
        }
        for n in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}
