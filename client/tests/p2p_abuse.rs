//! Abuse of the space (issue 5): a raw libp2p peer that floods junk and forged adverts is rejected,
//! scored down, disconnected and blocked; oversize frames never reach a view; a node that floods
//! valid adverts is rate-limited without being banned; honest adverts keep arriving throughout.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use gleaner::advert::CapacityAdvert;
use gleaner::{Envelope, SecretKey};
use gleaner_client::p2p::{self, SpaceConfig, SpaceHandle};
use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, noise, tcp, yamux};
use tokio_util::sync::CancellationToken;

const SPACE: &str = "abuse";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn advert(key: &SecretKey, seq: u64, free: u16) -> Envelope {
    let a = CapacityAdvert {
        v: 1,
        host: key.public(),
        seq,
        at: now(),
        free_cores: free,
        free_memory_mib: 1024,
        free_disk_mib: 0,
        backends: 1,
        running: vec![],
        owner_present: false,
        draining: false,
        benchmark: 1000,
    };
    Envelope::seal(&a, key)
}

async fn node(
    seed: u8,
    bootstrap: Vec<Multiaddr>,
    cancel: &CancellationToken,
) -> (SecretKey, SpaceHandle, Multiaddr) {
    let key = SecretKey::from_seed([seed; 32]);
    let mut cfg = SpaceConfig::new(SPACE);
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    cfg.bootstrap = bootstrap;
    let (h, addrs, _task) = p2p::start(&key, cfg, cancel.clone()).await.unwrap();
    let addr = addrs[0].clone().with(libp2p::multiaddr::Protocol::P2p(
        key.public().to_string().parse().unwrap(),
    ));
    (key, h, addr)
}

/// What the attacker has done so far, for the test to watch.
#[derive(Default)]
struct Attack {
    sent: AtomicU64,
    connected: AtomicU64,
    /// Connections open now.
    open: AtomicU64,
    /// Connected at least once.
    started: AtomicBool,
}

/// A bare gossipsub peer (no Gleaner validation, a 1 MiB transmit limit) that joins the adverts
/// topic, then either sends one oversize frame (`oversize`) or floods junk and adverts forged
/// with another host's key.
fn attacker(
    targets: Vec<Multiaddr>,
    victim_key: SecretKey,
    oversize: bool,
    cancel: CancellationToken,
) -> (PeerId, Arc<Attack>) {
    let key = libp2p::identity::Keypair::generate_ed25519();
    let id = key.public().to_peer_id();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|k| {
            let cfg = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_millis(500))
                .max_transmit_size(1 << 20)
                .build()
                .unwrap();
            gossipsub::Behaviour::<
                gossipsub::IdentityTransform,
                gossipsub::AllowAllSubscriptionFilter,
            >::new(MessageAuthenticity::Signed(k.clone()), cfg)
            .unwrap()
        })
        .unwrap()
        .build();
    let topic = IdentTopic::new(format!("gleaner/{SPACE}/adverts"));
    swarm.behaviour_mut().subscribe(&topic).unwrap();
    let state = Arc::new(Attack::default());
    let st = state.clone();
    tokio::spawn(async move {
        for t in &targets {
            swarm.dial(t.clone()).unwrap();
        }
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let mut phase = 0u64;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                ev = swarm.select_next_some() => {
                    if let SwarmEvent::ConnectionEstablished { .. } = ev {
                        st.connected.fetch_add(1, Ordering::SeqCst);
                    }
                }
                _ = tick.tick() => {
                    let open = swarm.connected_peers().count() as u64;
                    st.open.store(open, Ordering::SeqCst);
                    if open == 0 {
                        if st.started.load(Ordering::SeqCst) {
                            // Cut off: keep trying to come back.
                            for t in &targets { let _ = swarm.dial(t.clone()); }
                        }
                        continue;
                    }
                    st.started.store(true, Ordering::SeqCst);
                    phase += 1;
                    let g = swarm.behaviour_mut();
                    let data = match phase {
                        // Wait a moment for the subscriptions to be exchanged.
                        0..=25 => continue,
                        // One frame far above the space's 64 KiB limit.
                        _ if oversize && st.sent.load(Ordering::SeqCst) == 0 => {
                            vec![0xa5; 200 * 1024]
                        }
                        _ if oversize => continue,
                        // Then junk and forgeries, 10 per tick.
                        _ => {
                            for i in 0..10u64 {
                                let data = if i % 2 == 0 {
                                    format!("junk {phase} {i}").into_bytes()
                                } else {
                                    // An advert for the victim, signed by the attacker's own key.
                                    let mut env = advert(&victim_key, 1_000_000 + phase * 10 + i, 999);
                                    env.signature[0] ^= 0xff;
                                    env.to_bytes()
                                };
                                if g.publish(topic.clone(), data).is_ok() {
                                    st.sent.fetch_add(1, Ordering::SeqCst);
                                }
                            }
                            continue;
                        }
                    };
                    if g.publish(topic.clone(), data).is_ok() {
                        st.sent.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }
    });
    (id, state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_floods_are_banned_and_honest_adverts_still_arrive() {
    let cancel = CancellationToken::new();
    let (k0, h0, a0) = node(1, vec![], &cancel).await;
    let (k1, h1, a1) = node(2, vec![a0.clone()], &cancel).await;
    let (k2, h2, _) = node(3, vec![a0.clone()], &cancel).await;
    let honest = [(k0, h0.clone()), (k1, h1.clone()), (k2, h2.clone())];
    let (bad, attack) = attacker(
        vec![a0.clone(), a1.clone()],
        honest[2].0.clone(),
        false,
        cancel.clone(),
    );

    // Honest nodes advertise twice a second throughout; count what node 0 and 1 receive from 2.
    let mut seq = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    let banned = loop {
        seq += 1;
        for (k, h) in &honest {
            h.publish(advert(k, seq, 2)).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s0 = h0.summary().await.unwrap();
        let s1 = h1.summary().await.unwrap();
        if s0.banned.contains(&bad.to_string()) && s1.banned.contains(&bad.to_string()) {
            break (s0, s1);
        }
        assert!(
            Instant::now() < deadline,
            "the flooder was not banned: sent {}, {s0:?}",
            attack.sent.load(Ordering::SeqCst)
        );
    };
    assert!(
        banned.0.rejected_messages > 0 && banned.1.rejected_messages > 0,
        "{banned:?}"
    );
    // Nothing forged or oversize got into any view.
    for (_, h) in &honest {
        let s = h.summary().await.unwrap();
        assert!(s.peers.iter().all(|p| p.free_cores == 2), "{s:?}");
    }
    // The flooder is cut off and cannot come back while banned.
    let deadline = Instant::now() + Duration::from_secs(20);
    while attack.open.load(Ordering::SeqCst) > 0 {
        assert!(Instant::now() < deadline, "the flooder stayed connected");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // It keeps redialling (its connections are accepted by TCP, then closed by the block list),
    // but no longer delivers anything, and no victim counts it among its peers.
    let rejected = |s: &p2p::SpaceSummary| s.rejected_messages;
    let r0 = rejected(&h0.summary().await.unwrap());
    let r1 = rejected(&h1.summary().await.unwrap());
    let tries = attack.connected.load(Ordering::SeqCst);
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        for h in [&h0, &h1] {
            let s = h.summary().await.unwrap();
            assert!(s.scores.iter().all(|(p, _)| *p != bad.to_string()), "{s:?}");
        }
    }
    assert!(
        attack.connected.load(Ordering::SeqCst) > tries,
        "it did try"
    );
    assert_eq!(rejected(&h0.summary().await.unwrap()), r0);
    assert_eq!(rejected(&h1.summary().await.unwrap()), r1);

    // Honest adverts kept flowing: everyone holds everyone's latest (or the one before).
    let last = seq;
    seq += 1;
    for (k, h) in &honest {
        h.publish(advert(k, seq, 2)).unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (_, h) in &honest {
        let s = h.summary().await.unwrap();
        assert_eq!(s.peers.len(), 3, "{s:?}");
        assert!(s.peers.iter().all(|p| p.seq >= last), "{s:?}");
    }

    // An oversize frame (200 KiB) is refused by the codec and a 20 KiB advert by validation;
    // neither reaches a view, and the space carries on.
    let (_, big) = attacker(vec![a1.clone()], honest[2].0.clone(), true, cancel.clone());
    // The fat advert comes from its own node: its sender is penalised, not an honest one.
    let (kj, hj, _) = node(8, vec![a0.clone()], &cancel).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut fat = advert(&kj, 1, 77);
    fat.payload = serde_bytes::ByteBuf::from(vec![0u8; 20 * 1024]);
    let before = h0.summary().await.unwrap().rejected_messages;
    let deadline = Instant::now() + Duration::from_secs(20);
    while big.sent.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the oversize frame was not sent");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    hj.publish(fat).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while h0.summary().await.unwrap().rejected_messages == before {
        assert!(
            Instant::now() < deadline,
            "the 20 KiB advert was not rejected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    seq += 2;
    for (k, h) in &honest {
        h.publish(advert(k, seq, 2)).unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (_, h) in &honest {
        let s = h.summary().await.unwrap();
        let honest_seen = s.peers.iter().filter(|p| p.seq == seq).count();
        assert_eq!(honest_seen, 3, "{s:?}");
        assert!(s.peers.iter().all(|p| p.free_cores == 2), "{s:?}");
    }

    // A node that floods *valid* adverts is rate-limited (ignored, not forwarded), not banned.
    let (kf, hf, _) = node(9, vec![a0.clone()], &cancel).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 1..=200 {
        hf.publish(advert(&kf, i, 2)).unwrap();
        if i % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = h0.summary().await.unwrap();
        if s.rate_limited > 0 {
            assert!(!s.banned.contains(&kf.public().to_string()));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the valid flood was not limited: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cancel.cancel();
}
