//! Wide-area discovery by Kademlia (issue 5): nodes that only know one bootstrap node find each
//! other, so the space holds together after the bootstrap node is gone.

use std::time::{Duration, Instant};

use gleaner::advert::CapacityAdvert;
use gleaner::{Envelope, SecretKey};
use gleaner_client::p2p::{self, SpaceConfig, SpaceHandle};
use tokio_util::sync::CancellationToken;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn advert(key: &SecretKey, seq: u64) -> Envelope {
    let a = CapacityAdvert {
        v: 1,
        host: key.public(),
        seq,
        at: now(),
        free_cores: 1,
        free_memory_mib: 1024,
        free_disk_mib: 0,
        backends: 1,
        running: vec![],
        owner_present: false,
        draining: false,
        benchmark: 1000,
        chain: gleaner::Digest::default(),
    };
    Envelope::seal(&a, key)
}

async fn node(
    seed: u8,
    bootstrap: Vec<libp2p::Multiaddr>,
    cancel: CancellationToken,
) -> (SecretKey, SpaceHandle, libp2p::Multiaddr) {
    let key = SecretKey::from_seed([seed; 32]);
    let mut cfg = SpaceConfig::new("wide");
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    cfg.bootstrap = bootstrap;
    // Loopback is not a public address: say that these nodes serve the DHT.
    cfg.kad_server = Some(true);
    cfg.advert_ttl_s = 8;
    let (h, addrs, _task) = p2p::start(&key, cfg, cancel).await.unwrap();
    let addr = addrs[0].clone().with(libp2p::multiaddr::Protocol::P2p(
        key.public().to_string().parse().unwrap(),
    ));
    (key, h, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_that_know_one_bootstrap_node_find_each_other() {
    const N: usize = 8;
    let everyone = CancellationToken::new();
    let boot_cancel = everyone.child_token();
    let (_k0, h0, a0) = node(1, vec![], boot_cancel.clone()).await;
    let mut nodes = Vec::new();
    for i in 1..N {
        nodes.push(node(i as u8 + 1, vec![a0.clone()], everyone.child_token()).await);
    }
    // Every node's routing table fills with all the others, learned through the bootstrap node.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut known = Vec::new();
        for (_, h, _) in &nodes {
            known.push(h.summary().await.unwrap().known_peers);
        }
        if known.iter().all(|&k| k >= N - 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "routing tables did not fill: {known:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let s = nodes[0].1.summary().await.unwrap();
    assert!(s.kad_server);
    assert!(
        s.connected > 1,
        "connected to more than the bootstrap node: {}",
        s.connected
    );

    // The bootstrap node goes away; the rest still converge on each other's fresh adverts.
    drop(h0);
    boot_cancel.cancel();
    let mut seq = 1000;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        seq += 1;
        for (k, h, _) in &nodes {
            h.publish(advert(k, seq)).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut all = true;
        for (_, h, _) in &nodes {
            let s = h.summary().await.unwrap();
            // Every other non-bootstrap node, with an advert made after the bootstrap left.
            let fresh = s.peers.iter().filter(|p| p.seq > 1000).count();
            all &= fresh == N - 1;
        }
        if all {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "without the bootstrap node the space fell apart"
        );
    }
    everyone.cancel();
}
