//! Real network partitions (issue 5): two groups of nodes in separate network namespaces joined by
//! a veth pair. Cutting the link makes each side's view drop the other within the advert expiry;
//! healing it merges the views again. A peer that vanishes without closing (its address gone, as
//! when a machine is switched off) has its TCP connection dropped by the other side's keepalive. Needs root (`ip netns`); skipped with a message when not
//! root, unless CI is set. Each node is this test binary re-run as `netns_node` inside a namespace.

use std::io::{BufRead, BufReader};
use std::process::{ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gleaner::SecretKey;
use gleaner_client::p2p::SpaceConfig;

mod nsnode;
use nsnode::{Lab, may_run, sh, wait_for};

const TTL_S: u64 = 6;

/// One node, when run by the partition test: advertises every second and prints its view
/// (`VIEW <host> <host>...`) twice a second until killed.
#[test]
fn netns_node() {
    let Ok(seed) = std::env::var("GLEANER_NETNS_NODE") else {
        return;
    };
    let seed: u8 = seed.parse().unwrap();
    let listen: libp2p::Multiaddr = std::env::var("GLEANER_LISTEN").unwrap().parse().unwrap();
    let bootstrap: Vec<libp2p::Multiaddr> = std::env::var("GLEANER_BOOTSTRAP")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    let mut cfg = SpaceConfig::new("netns");
    cfg.listen = vec![listen];
    cfg.bootstrap = bootstrap;
    cfg.advert_ttl_s = TTL_S;
    nsnode::run_view_node(seed, cfg, Duration::from_secs(180));
}

#[test]
fn partition_and_heal_across_network_namespaces() {
    if !may_run("GLEANER_NETNS_NODE", "the netns partition test") {
        return;
    }
    let tag = std::process::id() % 100_000;
    let (mut lab, veth) = two_namespaces(tag, "gl", "10.201.0");
    let (na, nb, va) = (lab.ns[0].clone(), lab.ns[1].clone(), veth[0].clone());

    // A1, A2 in one namespace, B1, B2 in the other; each knows one or two nodes to start from.
    let id = |seed: u8| SecretKey::from_seed([seed; 32]).public().to_string();
    let addr =
        |ip: &str, port: u16, seed: u8| format!("/ip4/{ip}/udp/{port}/quic-v1/p2p/{}", id(seed));
    let a1 = addr("10.201.0.1", 41001, 101);
    let b1 = addr("10.201.0.2", 41003, 103);
    let nodes = [
        (
            101u8,
            &na,
            "/ip4/10.201.0.1/udp/41001/quic-v1",
            String::new(),
        ),
        (
            102,
            &na,
            "/ip4/10.201.0.1/udp/41002/quic-v1",
            format!("{a1},{b1}"),
        ),
        (103, &nb, "/ip4/10.201.0.2/udp/41003/quic-v1", a1.clone()),
        (
            104,
            &nb,
            "/ip4/10.201.0.2/udp/41004/quic-v1",
            format!("{b1},{a1}"),
        ),
    ];
    let views: Arc<Mutex<Vec<Vec<String>>>> = Arc::new(Mutex::new(vec![Vec::new(); 4]));
    for (i, (seed, ns, listen, boot)) in nodes.iter().enumerate() {
        let out = spawn_node(&mut lab, *seed, ns, listen, boot);
        let views = views.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("VIEW") {
                    let hosts = rest.split_whitespace().map(str::to_owned).collect();
                    views.lock().unwrap()[i] = hosts;
                }
            }
        });
    }
    let all: Vec<String> = [101u8, 102, 103, 104].iter().map(|&s| id(s)).collect();
    let side_a: Vec<String> = all[..2].to_vec();
    let side_b: Vec<String> = all[2..].to_vec();
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let read = || views.lock().unwrap().clone();
    let wait = |what: &str, secs: u64, want: &dyn Fn(usize) -> Vec<String>| {
        wait_for(what, secs, read, |v| {
            (0..4).all(|i| v[i] == sorted(want(i)))
        });
    };
    wait("converged", 60, &|_| all.clone());

    // Cut the link: each side forgets the other once its adverts expire.
    sh(&["ip", "-n", &na, "link", "set", &va, "down"]);
    wait("partitioned", TTL_S + 10, &|i| {
        if i < 2 {
            side_a.clone()
        } else {
            side_b.clone()
        }
    });

    // Heal: the views merge again.
    sh(&["ip", "-n", &na, "link", "set", &va, "up"]);
    wait("healed", 60, &|_| all.clone());
}

/// Runs node `seed` (this binary's `netns_node`) in namespace `ns`, listening on `listen` and
/// starting from the comma-separated `boot`; its output, for the caller to read.
fn spawn_node(lab: &mut Lab, seed: u8, ns: &str, listen: &str, boot: &str) -> ChildStdout {
    let mut c = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "netns_node",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("GLEANER_NETNS_NODE", seed.to_string())
        .env("GLEANER_LISTEN", listen)
        .env("GLEANER_BOOTSTRAP", boot)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = c.stdout.take().unwrap();
    lab.nodes.push(c);
    out
}

/// Two namespaces, `{name}a{tag}` and `{name}b{tag}`, joined by a veth pair with addresses
/// `{net}.1` and `{net}.2`: the lab (which removes them on drop) and the two veth ends.
fn two_namespaces(tag: u32, name: &str, net: &str) -> (Lab, [String; 2]) {
    let (na, nb) = (format!("{name}a{tag}"), format!("{name}b{tag}"));
    let (va, vb) = (format!("{name}va{tag}"), format!("{name}vb{tag}"));
    let lab = Lab {
        ns: vec![na.clone(), nb.clone()],
        nodes: Vec::new(),
    };
    sh(&["ip", "netns", "add", &na]);
    sh(&["ip", "netns", "add", &nb]);
    sh(&[
        "ip", "link", "add", &va, "netns", &na, "type", "veth", "peer", "name", &vb, "netns", &nb,
    ]);
    for (ns, dev, ip) in [
        (&na, &va, format!("{net}.1/24")),
        (&nb, &vb, format!("{net}.2/24")),
    ] {
        sh(&["ip", "-n", ns, "addr", "add", &ip, "dev", dev]);
        sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }
    (lab, [va, vb])
}

/// A peer switched off sends no FIN and no RST: without keepalive its TCP connection, and the
/// advert relay link on it, would stay up until TCP gave up retransmitting (a quarter of an hour).
/// Here node b's address vanishes under it, and node a must drop the connection within about
/// `gleaner_space::tuning::TCP_USER_TIMEOUT`.
#[test]
fn a_tcp_peer_that_vanishes_without_closing_is_dropped() {
    if !may_run("GLEANER_NETNS_NODE", "the netns keepalive test") {
        return;
    }
    let tag = std::process::id() % 100_000;
    let (mut lab, veth) = two_namespaces(tag, "gk", "10.202.0");
    let (nb, vb) = (lab.ns[1].clone(), veth[1].clone());
    let id = |seed: u8| SecretKey::from_seed([seed; 32]).public().to_string();
    let a = format!("/ip4/10.202.0.1/tcp/41011/p2p/{}", id(111));
    let nodes = [
        (
            111u8,
            lab.ns[0].clone(),
            "/ip4/10.202.0.1/tcp/41011",
            String::new(),
        ),
        (112, lab.ns[1].clone(), "/ip4/10.202.0.2/tcp/41012", a),
    ];
    let peers: Arc<Mutex<Vec<Option<usize>>>> = Arc::new(Mutex::new(vec![None; 2]));
    for (i, (seed, ns, listen, boot)) in nodes.iter().enumerate() {
        let out = spawn_node(&mut lab, *seed, ns, listen, boot);
        let peers = peers.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(n) = line.strip_prefix("PEERS ").and_then(|n| n.parse().ok()) {
                    peers.lock().unwrap()[i] = Some(n);
                }
            }
        });
    }
    let read = || peers.lock().unwrap().clone();
    wait_for("connected", 60, read, |p| p == &[Some(1), Some(1)]);
    // Let the connection go quiet of start-up traffic, then take b's address away: b's kernel
    // drops what a sends, unanswered, and a's neighbour entry for b fails.
    std::thread::sleep(Duration::from_secs(3));
    sh(&["ip", "-n", &nb, "addr", "flush", "dev", &vb]);
    let limit = gleaner_space::tuning::TCP_USER_TIMEOUT.as_secs() + 20;
    wait_for("a dropped b", limit, read, |p| p[0] == Some(0));
}
