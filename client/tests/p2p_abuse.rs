//! Abuse of the space (issue 5): a raw libp2p peer that floods the advert relay with junk,
//! forged adverts and broken frames is rejected, disconnected and blocked; an oversize frame
//! closes its link and never reaches a view; a node that floods valid adverts is rate-limited
//! without being banned; honest adverts keep arriving throughout; a replayed outcome is ignored,
//! not forwarded, and costs its re-sender until it is banned; a peer flooding machine-type
//! requests is refused and banned while an honest peer's fetch succeeds; a peer banned over a
//! direct relay link that dials the node's direct port again is closed as it comes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use gleaner::advert::{CapacityAdvert, OutcomeReport, Running};
use gleaner::chain::Refresh;
use gleaner::relay::{FRAME_VERSION, Item, encode};
use gleaner::{Backend, Blob, Digest, Envelope, Id16, MachineType, OutcomeCode, SecretKey};
use gleaner_client::p2p::{self, MtRequest, MtResponse, SpaceConfig, SpaceHandle};
use gleaner_space::direct::STAY;
use gleaner_space::links::{MAX_FRAME, RELAY_PROTOCOL};
use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol, noise, tcp, yamux};
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
        chain: gleaner::Digest::default(),
    };
    Envelope::seal(&a, key)
}

/// Publishes the honest nodes' adverts, a new seq each round, until every honest node has taken
/// one from every honest node made in this call; nothing forged ever shows in a view.
async fn honest_round(honest: &[(SecretKey, SpaceHandle)], seq: &mut u64) {
    let first = *seq + 1;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        *seq += 1;
        for (k, h) in honest {
            h.publish(advert(k, *seq, 2)).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut all = true;
        for (_, h) in honest {
            let s = h.summary().await.unwrap();
            assert!(s.peers.iter().all(|p| p.free_cores == 2), "{s:?}");
            let took = |k: &SecretKey| {
                s.peers
                    .iter()
                    .any(|p| p.host == k.public().to_string() && p.seq >= first)
            };
            all &= honest.iter().all(|(k, _)| took(k));
            assert!(
                all || Instant::now() < deadline,
                "honest adverts stopped arriving: {s:?}"
            );
        }
        if all {
            return;
        }
    }
}

async fn node(
    seed: u8,
    bootstrap: Vec<Multiaddr>,
    cancel: &CancellationToken,
) -> (SecretKey, SpaceHandle, Multiaddr) {
    node_with(seed, bootstrap, cancel, |_| {}).await
}

async fn node_with(
    seed: u8,
    bootstrap: Vec<Multiaddr>,
    cancel: &CancellationToken,
    tweak: impl FnOnce(&mut SpaceConfig),
) -> (SecretKey, SpaceHandle, Multiaddr) {
    let key = SecretKey::from_seed([seed; 32]);
    let mut cfg = SpaceConfig::new(SPACE);
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    cfg.bootstrap = bootstrap;
    tweak(&mut cfg);
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

/// A peer with a fresh key that speaks nothing but libp2p-stream (for raw relay links) over
/// TCP, noise and yamux.
fn bare_relay_swarm() -> (libp2p::Swarm<libp2p_stream::Behaviour>, PeerId) {
    bare_relay_swarm_with(libp2p::identity::Keypair::generate_ed25519())
}

/// As [`bare_relay_swarm`], with the identity `key`.
fn bare_relay_swarm_with(
    key: libp2p::identity::Keypair,
) -> (libp2p::Swarm<libp2p_stream::Behaviour>, PeerId) {
    let id = key.public().to_peer_id();
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    (swarm, id)
}

/// A bare relay peer (no Gleaner validation) that opens advert relay links to its targets and then
/// either announces one frame far over the limit (`oversize`) or floods frames of junk, adverts
/// forged with another host's key, and frames that are not frames at all; it opens its links again
/// whenever they are closed.
fn attacker(
    targets: Vec<Multiaddr>,
    victim_key: SecretKey,
    oversize: bool,
    cancel: CancellationToken,
) -> (PeerId, Arc<Attack>) {
    let (mut swarm, id) = bare_relay_swarm();
    let mut control = swarm.behaviour().new_control();
    let state = Arc::new(Attack::default());
    let st = state.clone();
    let c = cancel.clone();
    let dials = targets.clone();
    // The swarm: connections, and redials while cut off.
    tokio::spawn(async move {
        for t in &dials {
            swarm.dial(t.clone()).unwrap();
        }
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = c.cancelled() => return,
                ev = swarm.select_next_some() => {
                    if let SwarmEvent::ConnectionEstablished { .. } = ev {
                        st.connected.fetch_add(1, Ordering::SeqCst);
                    }
                }
                _ = tick.tick() => {
                    let open = swarm.connected_peers().count() as u64;
                    st.open.store(open, Ordering::SeqCst);
                    if open == 0 && st.started.load(Ordering::SeqCst) {
                        // Cut off: keep trying to come back.
                        for t in &dials { let _ = swarm.dial(t.clone()); }
                    }
                }
            }
        }
    });
    let peers: Vec<PeerId> = targets
        .iter()
        .filter_map(|a| match a.iter().last() {
            Some(libp2p::multiaddr::Protocol::P2p(p)) => Some(p),
            _ => None,
        })
        .collect();
    let st = state.clone();
    // The links: opened (again) every 20 ms while closed, each sent a frame of abuse.
    tokio::spawn(async move {
        use futures_util::AsyncWriteExt;
        let mut links: Vec<(PeerId, Option<libp2p::Stream>)> =
            peers.into_iter().map(|p| (p, None)).collect();
        let mut phase = 0u64;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
            phase += 1;
            for (peer, link) in links.iter_mut() {
                if link.is_none() {
                    match open_link(&mut control, *peer).await {
                        Some(s) => {
                            st.started.store(true, Ordering::SeqCst);
                            *link = Some(s);
                        }
                        None => continue,
                    }
                }
                let Some(s) = link.as_mut() else { continue };
                if oversize && st.sent.load(Ordering::SeqCst) > 0 {
                    continue;
                }
                let frame = if oversize {
                    // A length far above the relay's limit, and the bytes to go with it.
                    let mut f = ((MAX_FRAME * 4) as u32).to_be_bytes().to_vec();
                    f.extend(vec![0xa5; 64 * 1024]);
                    f
                } else {
                    let mut items = Vec::new();
                    if phase % 5 == 0 {
                        // Not a frame: a version byte, then an unknown tag.
                        items = vec![FRAME_VERSION, 0x7f, 1, 2, 3];
                    } else {
                        for i in 0..10u64 {
                            let data = if i % 2 == 0 {
                                format!("junk {phase} {i}").into_bytes()
                            } else {
                                // An advert for the victim, its signature broken.
                                let mut env = advert(&victim_key, 1_000_000 + phase * 10 + i, 999);
                                env.signature[0] ^= 0xff;
                                env.to_bytes()
                            };
                            encode(&mut items, &Item::Advert(&data));
                        }
                    }
                    let mut f = (items.len() as u32).to_be_bytes().to_vec();
                    f.extend(items);
                    f
                };
                match s.write_all(&frame).await {
                    Ok(()) if s.flush().await.is_ok() => {
                        st.sent.fetch_add(1, Ordering::SeqCst);
                    }
                    // Closed by the victim: open it again next time.
                    _ => *link = None,
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
    // but no longer delivers anything, and no victim holds a connection to it.
    let rejected = |s: &p2p::SpaceSummary| s.rejected_messages;
    let r0 = rejected(&h0.summary().await.unwrap());
    let r1 = rejected(&h1.summary().await.unwrap());
    let tries = attack.connected.load(Ordering::SeqCst);
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            attack.open.load(Ordering::SeqCst),
            0,
            "the flooder got back in"
        );
    }
    assert!(
        attack.connected.load(Ordering::SeqCst) > tries,
        "it did try"
    );
    assert_eq!(rejected(&h0.summary().await.unwrap()), r0);
    assert_eq!(rejected(&h1.summary().await.unwrap()), r1);

    // Honest adverts kept flowing: everyone takes everyone's new ones.
    honest_round(&honest, &mut seq).await;

    // A frame announced far over the relay's limit closes its link, and a 20 KiB advert is refused
    // by validation; neither reaches a view, and the space carries on.
    let (_, big) = attacker(vec![a1.clone()], honest[2].0.clone(), true, cancel.clone());
    // The fat advert comes from its own node: its sender is penalised, not an honest one.
    let (kj, hj, _) = node(8, vec![a0.clone()], &cancel).await;
    let mut fat = advert(&kj, 1, 77);
    fat.payload = serde_bytes::ByteBuf::from(vec![0u8; 20 * 1024]);
    let fat = fat;
    // Node 8 relays to a few of the others, not necessarily node 0: count what all of them refuse.
    let all_rejected = || async {
        let mut n = 0;
        for (_, h) in &honest {
            n += h.summary().await.unwrap().rejected_messages;
        }
        n
    };
    let before = all_rejected().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while big.sent.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the oversize frame was not sent: connected {} times, {} open",
            big.connected.load(Ordering::SeqCst),
            big.open.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The oversize frame's link was closed (the attacker opens it again and again, sending
    // nothing more).
    let deadline = Instant::now() + Duration::from_secs(30);
    while big.connected.load(Ordering::SeqCst) == 0 || big.sent.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "no oversize frame went out");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while all_rejected().await == before {
        // Sent again until node 8 has its relay links up.
        hj.publish(fat.clone()).unwrap();
        assert!(
            Instant::now() < deadline,
            "the 20 KiB advert was not rejected: {:?}\n{:?}",
            h0.summary().await.unwrap(),
            hj.summary().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    honest_round(&honest, &mut seq).await;

    // A node that floods *valid* adverts is rate-limited (ignored, not forwarded), not banned.
    let (kf, hf, _) = node(9, vec![a0.clone()], &cancel).await;
    // First it hears the space (its relay links are up: on a loaded machine that can take a
    // while), then it floods.
    let deadline = Instant::now() + Duration::from_secs(60);
    while hf.seq_of(honest[0].0.public()).await.unwrap().is_none() {
        assert!(Instant::now() < deadline, "node 9 never heard node 0");
        seq += 1;
        for (k, h) in &honest {
            h.publish(advert(k, seq, 2)).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut fseq = 0;
    loop {
        // Bursts of 40 until they are limited (the first may go before node 9's links are up).
        for _ in 0..40 {
            fseq += 1;
            hf.publish(advert(&kf, fseq, 2)).unwrap();
        }
        // Node 9's loop takes its commands in order: once it answers, the burst has left its
        // queue. Without this wait a loaded machine let bursts pile up in the bounded queue
        // faster than node 9 drained them, and a publish was refused as busy.
        hf.seq_of(kf.public()).await.unwrap();
        // Node 9 relays to a few of the others: whichever of them hear it first limit it.
        let mut limited = 0;
        for (_, h) in &honest {
            let s = h.summary().await.unwrap();
            assert!(!s.banned.contains(&kf.public().to_string()), "{s:?}");
            limited += s.rate_limited;
        }
        if limited > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the valid flood was not limited: {:?}",
            h0.summary().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cancel.cancel();
}

/// A frame of ten adverts for `victim`'s host, each with its signature broken (`tag` makes the
/// seqs new), with its length prefix.
fn forged_frame(victim: &SecretKey, tag: u64) -> Vec<u8> {
    let mut items = Vec::new();
    for i in 0..10u64 {
        let mut env = advert(victim, 1_000_000 + tag * 10 + i, 999);
        env.signature[0] ^= 0xff;
        encode(&mut items, &Item::Advert(&env.to_bytes()));
    }
    let mut f = (items.len() as u32).to_be_bytes().to_vec();
    f.extend(items);
    f
}

/// Whether `link` is closed by its other end within `wait` (what it sends meanwhile is read
/// and dropped).
async fn closed_within(link: &mut gleaner_space::direct::LinkStream, wait: Duration) -> bool {
    use futures_util::AsyncReadExt;
    let mut buf = vec![0u8; 64 * 1024];
    let drain = async {
        loop {
            match link.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(wait, drain).await.is_ok()
}

/// Direct relay links are not the swarm's, so its block list does not keep a banned peer off
/// them: a peer that sent forged adverts over a direct link is banned and its link closed, and
/// when it dials the node's direct port again (it learnt the port from the hello) and proves who
/// it is, that link is closed as it comes, before anything it sends is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_banned_peer_that_dials_a_direct_link_again_is_closed_at_once() {
    use futures_util::{AsyncReadExt, AsyncWriteExt};
    let cancel = CancellationToken::new();
    let (victim_key, h, addr) = node(61, vec![], &cancel).await;
    // The host the forged adverts claim to be from.
    let honest_key = SecretKey::from_seed([62; 32]);
    let target: PeerId = victim_key.public().to_string().parse().unwrap();
    let key = libp2p::identity::Keypair::generate_ed25519();
    let (mut swarm, bad) = bare_relay_swarm_with(key.clone());
    let mut control = swarm.behaviour().new_control();
    swarm.dial(addr).unwrap();
    let c = cancel.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = c.cancelled() => return,
                _ = swarm.select_next_some() => {}
            }
        }
    });
    // The node's direct port, from the hello of a stream opened and dropped.
    let port = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let Ok(mut s) = control.open_stream(target, RELAY_PROTOCOL).await {
                let mut hello = [0u8; 2];
                s.read_exact(&mut hello).await.unwrap();
                return u16::from_be_bytes(hello);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("no relay stream to the node");
    assert_ne!(port, 0, "the node takes no direct links");
    let loopback = std::net::IpAddr::from([127, 0, 0, 1]);

    // Forged adverts over a direct link until the node bans the sender and closes it.
    let mut link = gleaner_space::direct::dial(&key, target, loopback, port)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut tag = 0;
    let before = loop {
        tag += 1;
        let sent = link.write_all(&forged_frame(&honest_key, tag)).await;
        let _ = link.flush().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let s = h.summary().await.unwrap();
        if s.banned.contains(&bad.to_string()) {
            break s;
        }
        assert!(sent.is_ok(), "the link closed before a ban: {s:?}");
        assert!(Instant::now() < deadline, "no ban: {s:?}");
    };
    assert!(
        closed_within(&mut link, Duration::from_secs(5)).await,
        "the banned peer's link stayed open"
    );

    // Back on the direct port, proved: closed at once, and nothing it sends is read.
    for round in 0..3 {
        let mut again = gleaner_space::direct::dial(&key, target, loopback, port)
            .await
            .expect("the handshake itself is not refused");
        let _ = again
            .write_all(&forged_frame(&honest_key, 1000 + round))
            .await;
        let _ = again.flush().await;
        assert!(
            closed_within(&mut again, Duration::from_secs(5)).await,
            "a banned peer's direct link was kept (round {round})"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = h.summary().await.unwrap();
    assert_eq!(
        after.rejected_messages, before.rejected_messages,
        "a banned peer's frames were read"
    );
    cancel.cancel();
}

/// A bare relay peer that links to `target`, reads the frames it is sent, and answers every
/// refresh of `host`'s advert it sees with forgeries of the refreshes to come: the next index with
/// a made-up link, and the last index the chain allows with the link it just saw (the one lie a
/// relay could hope to pass off, a seq bump that would make the host's real adverts look old).
/// Counts the forgeries it sent.
fn refresh_forger(
    target: Multiaddr,
    host: gleaner::PublicKey,
    cancel: CancellationToken,
) -> (PeerId, Arc<Attack>) {
    let (mut swarm, id) = bare_relay_swarm();
    let mut control = swarm.behaviour().new_control();
    let state = Arc::new(Attack::default());
    let (st, c) = (state.clone(), cancel.clone());
    let Some(libp2p::multiaddr::Protocol::P2p(peer)) = target.iter().last() else {
        panic!("{target} names no peer");
    };
    tokio::spawn(async move {
        swarm.dial(target).unwrap();
        loop {
            tokio::select! {
                _ = c.cancelled() => return,
                ev = swarm.select_next_some() => {
                    if let SwarmEvent::ConnectionEstablished { .. } = ev {
                        st.connected.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }
    });
    let st = state.clone();
    tokio::spawn(async move {
        // A link the target closes (crossed opens settled by peer id, a rotation) is opened
        // again, as a real forger would: giving up after the first left the test waiting for
        // forgeries that never came.
        while !cancel.is_cancelled() {
            let Some(mut link) = open_link(&mut control, peer).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            if forge_refreshes(&mut link, host, &st, &cancel).await {
                return;
            }
        }
    });
    (id, state)
}

/// A relay link from a bare relay peer to `peer`, or `None` if it is not open within 2 s: the
/// stream, the peer's hello read and the choice to stay on it written (`gleaner_space::direct`).
async fn open_link(control: &mut libp2p_stream::Control, peer: PeerId) -> Option<libp2p::Stream> {
    use futures_util::{AsyncReadExt, AsyncWriteExt};
    let open = async {
        let mut link = control.open_stream(peer, RELAY_PROTOCOL).await.ok()?;
        let mut hello = [0u8; 2];
        link.read_exact(&mut hello).await.ok()?;
        link.write_all(&[STAY]).await.ok()?;
        link.flush().await.ok()?;
        Some(link)
    };
    tokio::time::timeout(Duration::from_secs(2), open)
        .await
        .ok()?
}

/// Reads the frames `link` brings and answers each refresh of `host`'s advert with two
/// forgeries ([`refresh_forger`]), counted in `st`; true when `cancel` fired, false when the link
/// failed (open another).
async fn forge_refreshes(
    link: &mut libp2p::Stream,
    host: gleaner::PublicKey,
    st: &Attack,
    cancel: &CancellationToken,
) -> bool {
    use futures_util::{AsyncReadExt, AsyncWriteExt};
    loop {
        let mut len = [0u8; 4];
        let read = tokio::select! {
            _ = cancel.cancelled() => return true,
            r = link.read_exact(&mut len) => r,
        };
        if read.is_err() {
            return false;
        }
        let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
        if link.read_exact(&mut frame).await.is_err() {
            return false;
        }
        let Ok(items) = gleaner::relay::decode(&frame) else {
            continue;
        };
        let mut out = Vec::new();
        for item in items {
            if let Item::Refresh(r) = item
                && r.host == host
            {
                let made_up = Refresh {
                    index: r.index + 1,
                    link: [0x5a; 32],
                    ..r
                };
                let bumped = Refresh {
                    index: gleaner::chain::CHAIN_LEN,
                    ..r
                };
                encode(&mut out, &Item::Refresh(made_up));
                encode(&mut out, &Item::Refresh(bumped));
            }
        }
        if out.is_empty() {
            continue;
        }
        let mut f = (out.len() as u32).to_be_bytes().to_vec();
        f.extend(out);
        if link.write_all(&f).await.is_err() || link.flush().await.is_err() {
            return false;
        }
        st.sent.fetch_add(2, Ordering::SeqCst);
    }
}

/// Refreshes cannot be forged: a relay that sends made-up links for an honest host's next
/// refreshes, or bumps its seq to the end of the chain, is rejected and banned; no view ever holds
/// a seq the host did not give, and the host's real refreshes keep arriving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_refreshes_are_rejected_and_the_real_ones_still_arrive() {
    let cancel = CancellationToken::new();
    let (k0, h0, a0) = node(31, vec![], &cancel).await;
    let (k1, h1, _) = node(32, vec![a0.clone()], &cancel).await;
    let (k2, h2, _) = node(33, vec![a0.clone()], &cancel).await;
    let honest = [(k0, h0.clone()), (k1, h1.clone()), (k2, h2.clone())];
    let victim = honest[2].0.public();
    let (bad, attack) = refresh_forger(a0.clone(), victim, cancel.clone());
    let content = |k: &SecretKey| advert(k, 0, 2).peek::<CapacityAdvert>().unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        for (k, h) in &honest {
            h.advertise(content(k)).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
        // What node 0 holds of the victim is never past what the victim itself gave.
        let held = h0.seq_of(victim).await.unwrap();
        let given = h2.seq_of(victim).await.unwrap();
        assert!(
            held <= given,
            "node 0 holds seq {held:?}, the host gave {given:?}"
        );
        let s0 = h0.summary().await.unwrap();
        if s0.banned.contains(&bad.to_string()) {
            assert!(s0.rejected_messages > 0, "{s0:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the forger was not banned: it sent {} forgeries; {s0:?}",
            attack.sent.load(Ordering::SeqCst)
        );
    }
    assert!(attack.sent.load(Ordering::SeqCst) > 0);
    // The victim's real refreshes still reach node 0 and 1.
    let want = h2.seq_of(victim).await.unwrap().unwrap() + 3;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for (k, h) in &honest {
            h.advertise(content(k)).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let (s0, s1) = (
            h0.seq_of(victim).await.unwrap(),
            h1.seq_of(victim).await.unwrap(),
        );
        let given = h2.seq_of(victim).await.unwrap();
        assert!(s0 <= given && s1 <= given, "{s0:?} {s1:?} past {given:?}");
        if s0 >= Some(want) && s1 >= Some(want) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the victim's refreshes stopped: {s0:?} {s1:?}, want {want}"
        );
    }
    for (_, h) in &honest {
        let s = h.summary().await.unwrap();
        assert!(s.relay.stats.refreshes > 0, "{s:?}");
    }
    cancel.cancel();
}

fn outcome(key: &SecretKey, machine: u8, machine_type: Digest) -> Envelope {
    let r = OutcomeReport {
        v: 1,
        host: key.public(),
        machine_id: Id16([machine; 16]),
        machine_type,
        at: now(),
        ran_s: 5,
        outcome: OutcomeCode::Fizzle,
        detail: String::new(),
    };
    Envelope::seal(&r, key)
}

/// A bare gossipsub peer that re-publishes `data` (an envelope it captured) on the outcomes
/// topic twice a second, as a new gossipsub message each time.
fn replayer(target: Multiaddr, data: Vec<u8>, cancel: CancellationToken) -> (PeerId, Arc<Attack>) {
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
    let topic = IdentTopic::new(format!("gleaner/{SPACE}/outcomes"));
    swarm.behaviour_mut().subscribe(&topic).unwrap();
    let state = Arc::new(Attack::default());
    let st = state.clone();
    tokio::spawn(async move {
        swarm.dial(target.clone()).unwrap();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
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
                        let _ = swarm.dial(target.clone());
                        continue;
                    }
                    if swarm.behaviour_mut().publish(topic.clone(), data.clone()).is_ok() {
                        st.sent.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }
    });
    (id, state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_outcome_is_ignored_and_its_resender_penalised() {
    let cancel = CancellationToken::new();
    // Copies are dropped unseen for 2 s (gossipsub's duplicate cache), checked after that.
    let short = |c: &mut SpaceConfig| c.duplicate_cache_s = 2;
    let (_, h0, a0) = node_with(21, vec![], &cancel, short).await;
    let (k1, h1, _) = node_with(22, vec![a0.clone()], &cancel, short).await;
    let wait_abort = |h: SpaceHandle, d: Digest, what: &'static str| async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        while h.view().await.unwrap().last_abort(&d).is_none() {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    // Node 1 reports a fizzle; node 0 takes it (publishing again until the mesh has formed).
    let first_type = Digest([0xa1; 32]);
    let original = outcome(&k1, 1, first_type);
    let deadline = Instant::now() + Duration::from_secs(30);
    while h0.view().await.unwrap().last_abort(&first_type).is_none() {
        assert!(
            Instant::now() < deadline,
            "the outcome did not reach node 0"
        );
        // A copy published again before it was delivered is the same message id: no replay.
        h1.publish(original.clone()).unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Node 2 joins later, through node 0 only, once the original is out of every gossip cache.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_, h2, _) = node_with(23, vec![a0.clone()], &cancel, short).await;
    // Node 2 hears node 1 (through node 0, its only peer) before the replays start.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seq = 0;
    while h2.seq_of(k1.public()).await.unwrap().is_none() {
        assert!(Instant::now() < deadline, "node 2 never heard node 1");
        seq += 1;
        h1.publish(advert(&k1, seq, 2)).unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Someone who captured the envelope publishes it again and again to node 0.
    let (bad, replays) = replayer(a0.clone(), original.to_bytes(), cancel.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    let s0 = loop {
        let s = h0.summary().await.unwrap();
        if s.banned.contains(&bad.to_string()) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the replayer was not banned: sent {}, {s:?}",
            replays.sent.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(s0.replayed > 0, "{s0:?}");
    assert_eq!(s0.rejected_messages, 0, "a replay is not a forgery: {s0:?}");
    assert!(!s0.banned.contains(&k1.public().to_string()), "{s0:?}");
    // Node 0 did not forward it: node 2, who never saw the original, does not hold it...
    assert_eq!(h2.view().await.unwrap().last_abort(&first_type), None);
    // ...although news reaches node 2 through node 0: a new outcome of node 1 does.
    let second_type = Digest([0xa2; 32]);
    let fresh = outcome(&k1, 2, second_type);
    let deliver = tokio::spawn(wait_abort(
        h2.clone(),
        second_type,
        "news did not reach node 2",
    ));
    while !deliver.is_finished() {
        let _ = h1.publish(fresh.clone());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    deliver.await.unwrap();
    assert_eq!(h2.view().await.unwrap().last_abort(&first_type), None);
    let s2 = h2.summary().await.unwrap();
    assert!(s2.banned.is_empty(), "{s2:?}");
    cancel.cancel();
}

fn signed_type(publisher: &SecretKey) -> Vec<u8> {
    let mut mt = MachineType::example(publisher.public());
    mt.name = "flood-target".into();
    mt.backend = Backend::Container;
    mt.image = Some(Blob {
        url: "https://example.invalid/flood.tar".into(),
        sha256: Digest::of(b"flood"),
    });
    mt.cores_min = 1;
    mt.cores_max = 1;
    mt.memory_mib = 64;
    mt.not_after = 4_000_000_000;
    Envelope::seal(&mt, publisher).to_bytes()
}

/// What the request flooder got back.
#[derive(Default)]
struct Flood {
    sent: AtomicU64,
    found: AtomicU64,
    failed: AtomicU64,
    open: AtomicU64,
}

/// A bare request-response peer asking `target` for `digest` as fast as its streams allow.
fn request_flooder(
    target: Multiaddr,
    digest: Digest,
    cancel: CancellationToken,
) -> (PeerId, Arc<Flood>) {
    let key = libp2p::identity::Keypair::generate_ed25519();
    let id = key.public().to_peer_id();
    let peer: PeerId = target
        .iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::P2p(id) => Some(id),
            _ => None,
        })
        .unwrap();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| {
            request_response::cbor::Behaviour::<MtRequest, MtResponse>::new(
                [(
                    StreamProtocol::new(p2p::MT_PROTOCOL),
                    ProtocolSupport::Outbound,
                )],
                request_response::Config::default()
                    .with_request_timeout(Duration::from_secs(5))
                    .with_max_concurrent_streams(256),
            )
        })
        .unwrap()
        .build();
    let state = Arc::new(Flood::default());
    let st = state.clone();
    tokio::spawn(async move {
        swarm.dial(target.clone()).unwrap();
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                ev = swarm.select_next_some() => {
                    use request_response::{Event, Message};
                    match ev {
                        SwarmEvent::Behaviour(Event::Message {
                            message: Message::Response { response: MtResponse::Found { .. }, .. },
                            ..
                        }) => { st.found.fetch_add(1, Ordering::SeqCst); }
                        SwarmEvent::Behaviour(Event::OutboundFailure { .. }) => {
                            st.failed.fetch_add(1, Ordering::SeqCst);
                        }
                        _ => {}
                    }
                }
                _ = tick.tick() => {
                    let open = swarm.connected_peers().count() as u64;
                    st.open.store(open, Ordering::SeqCst);
                    if open == 0 {
                        let _ = swarm.dial(target.clone());
                        continue;
                    }
                    for _ in 0..20 {
                        swarm.behaviour_mut().send_request(
                            &peer,
                            MtRequest::Get { digest: serde_bytes::ByteBuf::from(digest.0.to_vec()) },
                        );
                        st.sent.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }
    });
    (id, state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_type_request_flood_is_throttled_and_an_honest_fetch_succeeds() {
    let cancel = CancellationToken::new();
    let publisher = SecretKey::from_seed([0x51; 32]);
    let envelope = signed_type(&publisher);
    let digest = Envelope::open_bytes::<MachineType>(&envelope)
        .unwrap()
        .digest;
    // Node 0 holds the signed type; node 1 trusts its publisher but does not hold it.
    let key0 = SecretKey::from_seed([31; 32]);
    let mut cfg = SpaceConfig::new(SPACE);
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    let s0 = p2p::start_space(&key0, cfg, cancel.clone()).await.unwrap();
    let a0 = s0.addrs[0].clone().with(libp2p::multiaddr::Protocol::P2p(
        key0.public().to_string().parse().unwrap(),
    ));
    let h0 = s0.handle.clone();
    assert_eq!(h0.provide(envelope.clone()).await.unwrap(), digest);
    let mut cfg = SpaceConfig::new(SPACE);
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    cfg.bootstrap = vec![a0.clone()];
    cfg.trusted = vec![publisher.public()];
    let mut s1 = p2p::start_space(&SecretKey::from_seed([32; 32]), cfg, cancel.clone())
        .await
        .unwrap();

    // A peer asks node 0 for the type hundreds of times a second.
    let (bad, flood) = request_flooder(a0.clone(), digest, cancel.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    while h0.summary().await.unwrap().mt_throttled == 0 {
        assert!(
            Instant::now() < deadline,
            "the flood was not throttled: sent {}, answered {}",
            flood.sent.load(Ordering::SeqCst),
            flood.found.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Meanwhile node 0 advertises running the type, and node 1 fetches it from node 0.
    let running = |seq| {
        let a = CapacityAdvert {
            v: 1,
            host: key0.public(),
            seq,
            at: now(),
            free_cores: 1,
            free_memory_mib: 1024,
            free_disk_mib: 0,
            backends: 1,
            running: vec![Running {
                machine_type: digest,
                count: 1,
            }],
            owner_present: false,
            draining: false,
            benchmark: 1000,
            chain: gleaner::Digest::default(),
        };
        Envelope::seal(&a, &key0)
    };
    let mut seq = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    let learned = loop {
        seq += 1;
        h0.publish(running(seq)).unwrap();
        match tokio::time::timeout(Duration::from_millis(500), s1.learned.recv()).await {
            Ok(Some(l)) => break l,
            Ok(None) => panic!("node 1 stopped"),
            Err(_) => assert!(
                Instant::now() < deadline,
                "the honest fetch did not succeed: {:?}",
                h0.summary().await.unwrap()
            ),
        }
    };
    assert_eq!(learned.digest, digest);
    assert_eq!(learned.envelope, envelope);

    // The flooder got a handful of answers, not hundreds, and is banned for its flood.
    let deadline = Instant::now() + Duration::from_secs(30);
    let s = loop {
        let s = h0.summary().await.unwrap();
        if s.banned.contains(&bad.to_string()) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the flooder was not banned: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (sent, found) = (
        flood.sent.load(Ordering::SeqCst),
        flood.found.load(Ordering::SeqCst),
    );
    assert!(
        sent >= 100 && found <= 16 + 2 * 60,
        "sent {sent}, answered {found}, {s:?}"
    );
    assert!(s.mt_throttled >= 64, "{s:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while flood.open.load(Ordering::SeqCst) > 0 {
        assert!(Instant::now() < deadline, "the flooder stayed connected");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        !s.banned
            .contains(&s1.handle.summary().await.unwrap().peer_id)
    );
    cancel.cancel();
}
