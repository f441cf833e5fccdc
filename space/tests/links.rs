//! Relay links between real swarms on loopback TCP: frames both ways, send's refusals, the frame
//! limit, closing, crossed and late-crossed opens, a peer's replacement link, the inbound cap,
//! failed opens, and a connection closed under a link; links on connections of their own
//! (direct), kept on the swarm when either side takes none or the dial fails, and never to a peer
//! other than the one asked.

use std::collections::HashSet;
use std::time::Duration;

use gleaner::SecretKey;
use std::net::IpAddr;

use gleaner_space::direct::{DirectConfig, STAY};
use gleaner_space::links::{LINK_BACKLOG, MAX_FRAME, OPEN_TIMEOUT};
use gleaner_space::{LinkEvent, Links, RELAY_PROTOCOL};
use libp2p::futures::future::select_all;
use libp2p::futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, timeout};

/// Longest wait for something that takes milliseconds on loopback.
const WAIT: Duration = Duration::from_secs(15);
/// No event for this long and the links are taken to have settled.
const QUIET: Duration = Duration::from_millis(600);

enum Cmd {
    Dial(Multiaddr),
    Disconnect(PeerId),
}

/// A swarm driven by its own task, with (unless bare) relay links on it.
struct Node {
    id: PeerId,
    addr: Multiaddr,
    links: Option<Links>,
    control: libp2p_stream::Control,
    cmds: mpsc::Sender<Cmd>,
    connected: watch::Receiver<HashSet<PeerId>>,
    swarm: tokio::task::JoinHandle<()>,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.swarm.abort();
    }
}

impl Node {
    /// A node listening on loopback TCP; with relay links (keeping `max_inbound` inbound ones)
    /// or, with `None`, a bare one that does not speak the relay protocol.
    async fn new(seed: u8, max_inbound: Option<usize>) -> Node {
        Node::with(seed, max_inbound, false).await
    }

    /// As [`Node::new`], taking direct links on loopback (and opening them where it can).
    async fn direct(seed: u8) -> Node {
        Node::with(seed, Some(8), true).await
    }

    async fn with(seed: u8, max_inbound: Option<usize>, direct: bool) -> Node {
        let kp = gleaner_space::keypair(&SecretKey::from_seed([seed; 32])).unwrap();
        let mut swarm =
            gleaner_space::build_swarm_with(kp.clone(), Duration::from_secs(60), |_| {
                Ok(libp2p_stream::Behaviour::new())
            })
            .unwrap();
        let id = *swarm.local_peer_id();
        swarm
            .listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
            .unwrap();
        let addr = loop {
            if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                break address;
            }
        };
        let control = swarm.behaviour().new_control();
        let direct = direct.then(|| DirectConfig {
            keypair: kp.clone(),
            listen: "127.0.0.1:0".parse().unwrap(),
        });
        let links = max_inbound.map(|m| Links::new(control.clone(), id, m, direct).unwrap());
        let (cmds, mut cmd_rx) = mpsc::channel(8);
        let (conn_tx, connected) = watch::channel(HashSet::new());
        let swarm = tokio::spawn(async move {
            loop {
                tokio::select! {
                    ev = swarm.select_next_some() => match ev {
                        SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                            conn_tx.send_modify(|s| {
                                s.insert(peer_id);
                            });
                        }
                        SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                            conn_tx.send_modify(|s| {
                                s.remove(&peer_id);
                            });
                        }
                        _ => {}
                    },
                    cmd = cmd_rx.recv() => match cmd {
                        Some(Cmd::Dial(a)) => swarm.dial(a).unwrap(),
                        Some(Cmd::Disconnect(p)) => {
                            let _ = swarm.disconnect_peer_id(p);
                        }
                        None => break,
                    },
                }
            }
        });
        Node {
            id,
            addr,
            links,
            control,
            cmds,
            connected,
            swarm,
        }
    }

    fn links(&mut self) -> &mut Links {
        self.links.as_mut().expect("a bare node has no links")
    }

    /// The next link event, failing the test if none comes.
    /// The next event is `Up` for `peer`, opened by us or not.
    async fn expect_up(&mut self, peer: PeerId, outbound: bool) {
        assert_eq!(self.event().await, LinkEvent::Up { peer, outbound });
    }

    /// The next event is `Down` for `peer`.
    async fn expect_down(&mut self, peer: PeerId) {
        assert_eq!(self.event().await, LinkEvent::Down { peer });
    }

    async fn event(&mut self) -> LinkEvent {
        timeout(WAIT, self.links().next())
            .await
            .unwrap_or_else(|_| panic!("no link event within {WAIT:?}"))
    }

    fn linked(&mut self) -> Vec<(PeerId, bool)> {
        let mut v: Vec<_> = self.links().linked().collect();
        v.sort();
        v
    }

    async fn wait_connected(&self, peer: PeerId, yes: bool) {
        let mut c = self.connected.clone();
        timeout(WAIT, c.wait_for(|s| s.contains(&peer) == yes))
            .await
            .unwrap_or_else(|_| panic!("connection to {peer} never became {yes}"))
            .unwrap();
    }
}

/// `a` dials `b`; returns once both see the connection, and their links know where it is.
async fn connect(a: &mut Node, b: &mut Node) {
    a.cmds.send(Cmd::Dial(b.addr.clone())).await.unwrap();
    a.wait_connected(b.id, true).await;
    b.wait_connected(a.id, true).await;
    let (a_id, b_id) = (a.id, b.id);
    for (n, peer) in [(a, b_id), (b, a_id)] {
        if let Some(l) = n.links.as_mut() {
            l.set_address(peer, Some(LOOPBACK));
        }
    }
}

const LOOPBACK: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// `from` opens a raw stream of the relay protocol to `to` and chooses to stay on it, as an
/// opener does that takes no direct links.
async fn raw_link(from: &Node, to: PeerId) -> libp2p::Stream {
    let mut raw = timeout(WAIT, from.control.clone().open_stream(to, RELAY_PROTOCOL))
        .await
        .unwrap()
        .unwrap();
    let mut hello = [0u8; 2];
    timeout(WAIT, raw.read_exact(&mut hello))
        .await
        .unwrap()
        .unwrap();
    raw.write_all(&[STAY]).await.unwrap();
    raw.flush().await.unwrap();
    raw
}

/// The events of every node in `nodes` until none has come for [`QUIET`], one list per node.
async fn settle(nodes: &mut [&mut Node]) -> Vec<Vec<LinkEvent>> {
    let mut out = vec![Vec::new(); nodes.len()];
    let deadline = Instant::now() + WAIT;
    loop {
        let next = {
            let futs = nodes
                .iter_mut()
                .enumerate()
                .map(|(i, n)| Box::pin(async move { (i, n.links().next().await) }));
            timeout(QUIET, select_all(futs))
                .await
                .map(|((i, e), _, _)| (i, e))
        };
        match next {
            Ok((i, e)) => out[i].push(e),
            Err(_) => return out,
        }
        assert!(Instant::now() < deadline, "links never settled: {out:?}");
    }
}

/// The events of every node in `nodes`, polled together (each writes its links' backlogs only
/// while polled), until node `i` has `counts[i]` of them.
async fn events(nodes: &mut [&mut Node], counts: &[usize]) -> Vec<Vec<LinkEvent>> {
    let mut out = vec![Vec::new(); nodes.len()];
    let deadline = Instant::now() + WAIT;
    while out.iter().zip(counts).any(|(o, &c)| o.len() < c) {
        let futs = nodes
            .iter_mut()
            .enumerate()
            .map(|(i, n)| Box::pin(async move { (i, n.links().next().await) }));
        let ((i, e), _, _) = tokio::time::timeout_at(deadline, select_all(futs))
            .await
            .unwrap_or_else(|_| panic!("{counts:?} events never came: {out:?}"));
        out[i].push(e);
    }
    out
}

/// A frame of `len` bytes that differs with `tag`.
fn frame(tag: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| (j * 7 + tag * 13) as u8).collect()
}

/// Two nodes linked by `a`'s open, both `Up` seen.
async fn linked_pair(a_seed: u8, b_seed: u8) -> (Node, Node) {
    let mut a = Node::new(a_seed, Some(8)).await;
    let mut b = Node::new(b_seed, Some(8)).await;
    connect(&mut a, &mut b).await;
    a.links().open(b.id);
    a.expect_up(b.id, true).await;
    b.expect_up(a.id, false).await;
    (a, b)
}

#[tokio::test]
async fn a_link_opens_and_frames_flow_both_ways_in_order() {
    let mut a = Node::new(1, Some(8)).await;
    let mut b = Node::new(2, Some(8)).await;
    connect(&mut a, &mut b).await;
    a.links().open(b.id);
    a.links().open(b.id); // one open in flight already: no-op
    assert!(a.links().pending(&b.id));
    a.expect_up(b.id, true).await;
    b.expect_up(a.id, false).await;
    assert!(!a.links().pending(&b.id));
    a.links().open(b.id); // linked already: no-op
    assert!(!a.links().pending(&b.id));
    assert_eq!(a.linked(), vec![(b.id, true)]);
    assert_eq!(b.linked(), vec![(a.id, false)]);
    assert_eq!((a.links().outbound(), a.links().inbound()), (1, 0));
    assert_eq!((b.links().outbound(), b.links().inbound()), (0, 1));

    // Sizes around the prefix, yamux's frame and window sizes, 100 KiB and the limit itself:
    // less than LINK_BACKLOG beyond what the stream takes at once, so that none is refused.
    let sizes = [
        0,
        1,
        3,
        4,
        5,
        255,
        256,
        1000,
        4096,
        16 * 1024 - 1,
        65535,
        65536,
        65537,
        100 * 1024,
        MAX_FRAME,
    ];
    const { assert!(4 * 15 + 100 * 1024 + 3 * 65536 + 2 * MAX_FRAME < LINK_BACKLOG) };
    for round in 0..3 {
        for (i, &len) in sizes.iter().enumerate() {
            assert!(a.links().send(&b.id, frame(round * 100 + i, len)));
            assert!(b.links().send(&a.id, frame(round * 100 + 50 + i, len)));
        }
        let got = events(&mut [&mut a, &mut b], &[sizes.len(), sizes.len()]).await;
        let sent = |from: PeerId, tag: usize| -> Vec<LinkEvent> {
            sizes
                .iter()
                .enumerate()
                .map(|(i, &len)| LinkEvent::Frame {
                    peer: from,
                    frame: frame(round * 100 + tag + i, len),
                })
                .collect()
        };
        assert!(got[1] == sent(a.id, 0), "round {round}: a->b {:?}", got[1]);
        assert!(got[0] == sent(b.id, 50), "round {round}: b->a {:?}", got[0]);
    }
    // Nothing else happened on either side.
    let rest = settle(&mut [&mut a, &mut b]).await;
    assert_eq!(rest, vec![vec![], vec![]]);
}

/// A peer that does not read stops taking a link's frames once yamux's window is spent; the
/// link then holds up to LINK_BACKLOG bytes and refuses the frames beyond. Everything it took
/// arrives, in order, once the peer reads, and it takes frames again. Frames to no link and
/// oversize frames are refused.
#[tokio::test]
async fn send_refuses_frames_past_the_backlog_an_unlinked_peer_and_an_oversize_frame() {
    let (mut a, mut b) = linked_pair(1, 2).await;
    // `b` is not polled: its links read nothing. `a` sends until a frame is refused, yielding
    // between frames so that its connection takes what its stream queued.
    let mut accepted = 0;
    while a.links().send(&b.id, frame(accepted, 64 * 1024)) {
        accepted += 1;
        assert!(accepted < 256, "16 MiB taken by a peer that reads nothing");
        tokio::task::yield_now().await;
    }
    // The refusal came with the backlog full: at least its worth less one frame was taken.
    assert!(
        accepted * (64 * 1024 + 4) >= LINK_BACKLOG - 64 * 1024,
        "{accepted} frames taken"
    );
    let got = events(&mut [&mut a, &mut b], &[0, accepted]).await;
    assert_eq!(got[0], vec![]);
    assert!(
        got[1]
            == (0..accepted)
                .map(|i| LinkEvent::Frame {
                    peer: a.id,
                    frame: frame(i, 64 * 1024)
                })
                .collect::<Vec<_>>(),
        "{} frames, not the {accepted} taken in order",
        got[1].len()
    );
    let stranger = peer_of_seed(9);
    assert!(!a.links().send(&stranger, vec![1]));
    assert!(!a.links().send(&b.id, vec![0; MAX_FRAME + 1]));
    // The oversize frame was not sent: the link is still up and carries the next frame.
    assert!(a.links().send(&b.id, vec![5; MAX_FRAME]));
    let got = events(&mut [&mut a, &mut b], &[0, 1]).await;
    assert_eq!(
        got[1],
        vec![LinkEvent::Frame {
            peer: a.id,
            frame: vec![5; MAX_FRAME]
        }]
    );
    let rest = settle(&mut [&mut a, &mut b]).await;
    assert_eq!(rest, vec![vec![], vec![]]);
    assert_eq!(a.linked(), vec![(b.id, true)]);
}

/// `send` refuses oversize frames, so `b` writes them on a raw stream of the relay protocol,
/// which `a` takes for a link like any other.
#[tokio::test]
async fn an_oversize_frame_closes_the_link() {
    let mut a = Node::new(1, Some(8)).await;
    let mut b = Node::new(2, Some(8)).await;
    connect(&mut a, &mut b).await;
    let mut raw = raw_link(&b, a.id).await;
    a.expect_up(b.id, false).await;
    // A frame of exactly MAX_FRAME is fine. It is more than yamux's window: `a` reads while `b`
    // writes.
    let big = frame(1, MAX_FRAME);
    let (_, got) = tokio::join!(write_raw(&mut raw, &big), a.event());
    assert_eq!(
        got,
        LinkEvent::Frame {
            peer: b.id,
            frame: frame(1, MAX_FRAME)
        }
    );
    // One byte more in the prefix is not.
    raw.write_all(&(MAX_FRAME as u32 + 1).to_be_bytes())
        .await
        .unwrap();
    raw.flush().await.unwrap();
    a.expect_down(b.id).await;
    assert!(a.linked().is_empty());
    // And the writer's end sees the link closed.
    let mut byte = [0u8; 1];
    let read = timeout(WAIT, raw.read(&mut byte)).await.unwrap();
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let rest = settle(&mut [&mut a, &mut b]).await;
    assert_eq!(rest, vec![vec![], vec![]]);
}

/// Writes one frame on a raw stream.
async fn write_raw(s: &mut libp2p::Stream, frame: &[u8]) {
    s.write_all(&(frame.len() as u32).to_be_bytes())
        .await
        .unwrap();
    s.write_all(frame).await.unwrap();
    s.flush().await.unwrap();
}

/// A peer that opens a second link while its first is up (it took the first for dead) gets the
/// new one, and whatever the old one still reports once replaced (a late frame, its end) is
/// ignored: it must neither surface nor take the new link down. `b` speaks raw streams; `a`'s
/// events are read only once all of that has happened, so the old link's late reports wait in
/// the queue behind the new link's arrival.
#[tokio::test]
async fn a_peers_new_link_replaces_its_old_one_whose_late_reports_are_ignored() {
    let mut a = Node::new(1, Some(8)).await;
    let mut b = Node::new(2, Some(8)).await;
    connect(&mut a, &mut b).await;
    let up = LinkEvent::Up {
        peer: b.id,
        outbound: false,
    };
    let fr = |f: &[u8]| LinkEvent::Frame {
        peer: b.id,
        frame: f.to_vec(),
    };
    let mut old = raw_link(&b, a.id).await;
    write_raw(&mut old, b"old").await;
    assert_eq!(a.event().await, up);
    assert_eq!(a.event().await, fr(b"old"));

    // The old link's reader is running; `a` is not looking while the rest happens.
    let mut new = raw_link(&b, a.id).await;
    write_raw(&mut old, b"old, late").await;
    old.close().await.unwrap();
    drop(old);
    write_raw(&mut new, b"new").await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let ev = settle(&mut [&mut a]).await.remove(0);
    // The late frame may have been read before the new link was taken, and then shown before the
    // old link's Down; never after the new link's Up.
    let replaced = vec![LinkEvent::Down { peer: b.id }, up.clone(), fr(b"new")];
    let mut early = vec![fr(b"old, late")];
    early.extend(replaced.clone());
    assert!(ev == replaced || ev == early, "{ev:?}");
    assert_eq!(a.linked(), vec![(b.id, false)]);
    // The new link works both ways.
    assert!(a.links().send(&b.id, b"back".to_vec()));
    let mut prefix = [0u8; 4];
    timeout(WAIT, new.read_exact(&mut prefix))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(u32::from_be_bytes(prefix), 4);
    let mut body = [0u8; 4];
    new.read_exact(&mut body).await.unwrap();
    assert_eq!(&body, b"back");
}

#[tokio::test]
async fn close_takes_the_link_down_on_both_sides() {
    let (mut a, mut b) = linked_pair(1, 2).await;
    a.links().close(&b.id);
    assert!(a.linked().is_empty());
    assert!(!a.links().send(&b.id, vec![1]));
    a.expect_down(b.id).await;
    b.expect_down(a.id).await;
    assert!(b.linked().is_empty());
    let rest = settle(&mut [&mut a, &mut b]).await;
    assert_eq!(rest, vec![vec![], vec![]]);

    // The peer can link again, and the new link carries frames.
    b.links().open(a.id);
    b.expect_up(a.id, true).await;
    a.expect_up(b.id, false).await;
    assert!(a.links().send(&b.id, vec![1, 2, 3]));
    assert_eq!(
        b.event().await,
        LinkEvent::Frame {
            peer: a.id,
            frame: vec![1, 2, 3]
        }
    );
    a.links().close(&b.id);
    let ev = settle(&mut [&mut a, &mut b]).await;
    assert_eq!(
        ev,
        vec![
            vec![LinkEvent::Down { peer: b.id }],
            vec![LinkEvent::Down { peer: a.id }]
        ]
    );

    // Closing a peer whose open is in flight abandons the open: OpenFailed, nothing after. (The
    // peer may have seen the stream come and go.)
    a.links().open(b.id);
    a.links().close(&b.id);
    assert!(!a.links().pending(&b.id));
    let ev = settle(&mut [&mut a, &mut b]).await;
    assert!(
        matches!(ev[0].as_slice(), [LinkEvent::OpenFailed { peer, .. }] if *peer == b.id),
        "{ev:?}"
    );
    assert!(
        ev[1].is_empty()
            || ev[1]
                == vec![
                    LinkEvent::Up {
                        peer: a.id,
                        outbound: false
                    },
                    LinkEvent::Down { peer: a.id }
                ],
        "{ev:?}"
    );
    assert!(a.linked().is_empty() && b.linked().is_empty());
}

/// Both open at once, several times over: each time exactly one link survives, opened by the
/// smaller peer id, both sides agree, and it carries frames.
#[tokio::test]
async fn crossed_opens_leave_one_link_both_sides_agree_on() {
    let mut a = Node::new(1, Some(8)).await;
    let mut b = Node::new(2, Some(8)).await;
    connect(&mut a, &mut b).await;
    let a_opens = a.id < b.id;
    for round in 0..6u8 {
        // Alternate who calls first; both calls happen before either swarm task runs.
        if round % 2 == 0 {
            a.links().open(b.id);
            b.links().open(a.id);
        } else {
            b.links().open(a.id);
            a.links().open(b.id);
        }
        let ev = settle(&mut [&mut a, &mut b]).await;
        assert_eq!(a.linked(), vec![(b.id, a_opens)], "round {round}: {ev:?}");
        assert_eq!(b.linked(), vec![(a.id, !a_opens)], "round {round}: {ev:?}");
        assert!(!a.links().pending(&b.id) && !b.links().pending(&a.id));
        let (small, large) = if a_opens {
            (&ev[0], &ev[1])
        } else {
            (&ev[1], &ev[0])
        };
        let (small_id, large_id) = if a_opens { (a.id, b.id) } else { (b.id, a.id) };
        // The smaller side's own open wins at once: one Up, never a flap.
        assert_eq!(
            small,
            &vec![LinkEvent::Up {
                peer: large_id,
                outbound: true
            }],
            "round {round}"
        );
        // The larger side may first bring its own link up, then trade it: Ups and Downs pair
        // up and the last word is the smaller side's link.
        let ups = large
            .iter()
            .filter(|e| matches!(e, LinkEvent::Up { .. }))
            .count();
        let downs = large
            .iter()
            .filter(|e| matches!(e, LinkEvent::Down { .. }))
            .count();
        assert_eq!(ups, downs + 1, "round {round}: {large:?}");
        assert_eq!(
            large.last(),
            Some(&LinkEvent::Up {
                peer: small_id,
                outbound: false
            }),
            "round {round}: {large:?}"
        );
        assert_eq!(ups + downs, large.len(), "round {round}: {large:?}");

        // The link both kept carries frames both ways.
        assert!(a.links().send(&b.id, vec![round, 1]));
        assert!(b.links().send(&a.id, vec![round, 2]));
        assert_eq!(
            b.event().await,
            LinkEvent::Frame {
                peer: a.id,
                frame: vec![round, 1]
            }
        );
        assert_eq!(
            a.event().await,
            LinkEvent::Frame {
                peer: b.id,
                frame: vec![round, 2]
            }
        );
        a.links().close(&b.id);
        let ev = settle(&mut [&mut a, &mut b]).await;
        assert_eq!(
            ev,
            vec![
                vec![LinkEvent::Down { peer: b.id }],
                vec![LinkEvent::Down { peer: a.id }]
            ],
            "round {round}"
        );
    }
}

/// Crossed opens where one side's link is already up before the other side (whose `Links` has
/// not yet handled the inbound stream) opens too. When the larger side's link came first, the
/// smaller side's open must replace it on both sides (the larger sees Down, then Up); when the
/// smaller side's came first, the larger side's late open must be dropped without a flap.
#[tokio::test]
async fn late_crossed_opens_end_with_the_smaller_sides_link() {
    let mut a = Node::new(1, Some(8)).await;
    let mut b = Node::new(2, Some(8)).await;
    connect(&mut a, &mut b).await;
    let (mut small, mut large) = if a.id < b.id { (a, b) } else { (b, a) };
    for round in 0..3u8 {
        // The larger side's link comes up on its side; the smaller side opens before it has
        // looked at its events, so before it knows of that link.
        large.links().open(small.id);
        large.expect_up(small.id, true).await;
        small.links().open(large.id);
        let ev = settle(&mut [&mut small, &mut large]).await;
        assert_eq!(
            ev[0],
            vec![LinkEvent::Up {
                peer: large.id,
                outbound: true
            }],
            "round {round}"
        );
        assert_eq!(
            ev[1],
            vec![
                LinkEvent::Down { peer: small.id },
                LinkEvent::Up {
                    peer: small.id,
                    outbound: false
                }
            ],
            "round {round}"
        );
        assert_eq!(small.linked(), vec![(large.id, true)]);
        assert_eq!(large.linked(), vec![(small.id, false)]);
        assert!(large.links().send(&small.id, vec![round]));
        assert_eq!(
            small.event().await,
            LinkEvent::Frame {
                peer: large.id,
                frame: vec![round]
            }
        );
        small.links().close(&large.id);
        settle(&mut [&mut small, &mut large]).await;

        // The other way round: the smaller side's link is up first, the larger side opens late.
        small.links().open(large.id);
        small.expect_up(large.id, true).await;
        large.links().open(small.id);
        let ev = settle(&mut [&mut small, &mut large]).await;
        assert_eq!(ev[0], vec![], "round {round}");
        assert_eq!(
            ev[1],
            vec![LinkEvent::Up {
                peer: small.id,
                outbound: false
            }],
            "round {round}"
        );
        assert_eq!(small.linked(), vec![(large.id, true)]);
        assert_eq!(large.linked(), vec![(small.id, false)]);
        assert!(!large.links().pending(&small.id));
        assert!(large.links().send(&small.id, vec![round, 1]));
        assert_eq!(
            small.event().await,
            LinkEvent::Frame {
                peer: large.id,
                frame: vec![round, 1]
            }
        );
        small.links().close(&large.id);
        settle(&mut [&mut small, &mut large]).await;
    }
}

fn peer_of_seed(seed: u8) -> PeerId {
    gleaner_space::keypair(&SecretKey::from_seed([seed; 32]))
        .unwrap()
        .public()
        .to_peer_id()
}

/// The smaller side holds back a link the larger side opened while its own crossing open is in
/// flight (its own would win); when its own fails, it takes the held one instead of ending with
/// none. The larger side here is bare (its open is a raw stream), so the smaller side's open
/// fails for want of the protocol; the raw stream arrives before that open even starts, and is
/// handled after it started, so it is held.
#[tokio::test]
async fn a_held_crossing_link_is_taken_when_our_own_open_fails() {
    let (s, l) = if peer_of_seed(1) < peer_of_seed(2) {
        (1, 2)
    } else {
        (2, 1)
    };
    let mut small = Node::new(s, Some(8)).await;
    let mut large = Node::new(l, None).await;
    connect(&mut small, &mut large).await;
    let mut raw = raw_link(&large, small.id).await;
    small.links().open(large.id);
    small.expect_up(large.id, false).await;
    let ev = settle(&mut [&mut small]).await;
    assert_eq!(
        ev,
        vec![vec![]],
        "no OpenFailed after the held link came up"
    );
    assert!(!small.links().pending(&large.id));
    assert_eq!(small.linked(), vec![(large.id, false)]);
    write_raw(&mut raw, b"held").await;
    assert_eq!(
        small.event().await,
        LinkEvent::Frame {
            peer: large.id,
            frame: b"held".to_vec()
        }
    );
}

#[tokio::test]
async fn inbound_links_beyond_the_cap_are_refused() {
    let mut c = Node::new(3, Some(1)).await;
    let mut a = Node::new(1, Some(8)).await;
    let mut b = Node::new(2, Some(8)).await;
    connect(&mut a, &mut c).await;
    connect(&mut b, &mut c).await;
    a.links().open(c.id);
    a.expect_up(c.id, true).await;
    c.expect_up(a.id, false).await;

    b.links().open(c.id);
    let ev = settle(&mut [&mut b, &mut c]).await;
    assert_eq!(ev[1], vec![], "c took a second inbound link");
    let refused_b = matches!(ev[0].as_slice(), [LinkEvent::OpenFailed { peer, .. }] if *peer == c.id)
        || ev[0]
            == vec![
                LinkEvent::Up {
                    peer: c.id,
                    outbound: true,
                },
                LinkEvent::Down { peer: c.id },
            ];
    assert!(refused_b, "b saw {:?}", ev[0]);
    assert!(b.linked().is_empty());
    assert_eq!(c.linked(), vec![(a.id, false)]);
    assert_eq!(c.links().inbound(), 1);

    // The first link still works.
    assert!(a.links().send(&c.id, vec![7]));
    assert_eq!(
        c.event().await,
        LinkEvent::Frame {
            peer: a.id,
            frame: vec![7]
        }
    );
    // The cap is on inbound links only: c may still open to b.
    c.links().open(b.id);
    c.expect_up(b.id, true).await;
    b.expect_up(c.id, false).await;
    assert_eq!((c.links().inbound(), c.links().outbound()), (1, 1));
}

#[tokio::test]
async fn open_fails_without_the_protocol_or_a_connection() {
    let mut a = Node::new(1, Some(8)).await;
    let mut bare = Node::new(2, None).await;
    connect(&mut a, &mut bare).await;
    a.links().open(bare.id);
    match a.event().await {
        LinkEvent::OpenFailed { peer, error } => {
            assert_eq!(peer, bare.id);
            assert!(error.contains(RELAY_PROTOCOL.as_ref()), "{error}");
        }
        e => panic!("expected OpenFailed, got {e:?}"),
    }
    assert!(!a.links().pending(&bare.id));
    assert!(a.linked().is_empty());

    // A peer the swarm has no address for fails at once, well before the open timeout.
    let stranger = peer_of_seed(9);
    let started = Instant::now();
    a.links().open(stranger);
    match a.event().await {
        LinkEvent::OpenFailed { peer, .. } => assert_eq!(peer, stranger),
        e => panic!("expected OpenFailed, got {e:?}"),
    }
    assert!(started.elapsed() < OPEN_TIMEOUT / 2);
    let rest = settle(&mut [&mut a]).await;
    assert_eq!(rest, vec![vec![]]);
}

#[tokio::test]
async fn a_closed_connection_takes_the_link_down() {
    let (mut a, mut b) = linked_pair(1, 2).await;
    // Some traffic first, so that the readers wait on a later frame, not the first.
    assert!(a.links().send(&b.id, vec![1]));
    assert!(b.links().send(&a.id, vec![2]));
    assert_eq!(
        b.event().await,
        LinkEvent::Frame {
            peer: a.id,
            frame: vec![1]
        }
    );
    assert_eq!(
        a.event().await,
        LinkEvent::Frame {
            peer: b.id,
            frame: vec![2]
        }
    );
    let started = Instant::now();
    a.cmds.send(Cmd::Disconnect(b.id)).await.unwrap();
    a.expect_down(b.id).await;
    b.expect_down(a.id).await;
    // This side closed the connection: the patched yamux wakes its reader (patches/yamux; the
    // repoll in links.rs comes only after 30 s).
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    a.wait_connected(b.id, false).await;
    assert!(a.linked().is_empty() && b.linked().is_empty());
}

/// Deferred frames (the relay's way): `next` reads none; with `arrive` set, it says once a link
/// has some; `read_frames` takes all of them, in order, and a failed link's `Down` follows from
/// `next`. A deferred owner is not woken by frames while it does not wait for them.
#[tokio::test]
async fn deferred_frames_wait_for_read_frames() {
    let (mut a, mut b) = linked_pair(1, 2).await;
    b.links().defer_frames();
    for i in 0..5 {
        assert!(a.links().send(&b.id, frame(i, 100 + i)));
    }
    // Not waiting for frames: nothing comes, though five wait.
    let quiet = timeout(QUIET, b.links().next_or_frames(false)).await;
    assert!(quiet.is_err(), "{quiet:?}");
    assert!(b.links().frames_waiting());
    // Waiting for them: told at once.
    let told = timeout(WAIT, b.links().next_or_frames(true)).await;
    assert_eq!(told.ok(), Some(None));
    let mut got = Vec::new();
    // All five may not have been read by b's connection yet: read until they are in.
    let deadline = Instant::now() + WAIT;
    while got.len() < 5 {
        assert!(Instant::now() < deadline, "{} of 5 frames read", got.len());
        b.links().read_frames(&mut got);
        if got.len() < 5 {
            timeout(WAIT, b.links().next_or_frames(true))
                .await
                .expect("no word of the frames left");
        }
    }
    assert_eq!(
        got,
        (0..5)
            .map(|i| (a.id, frame(i, 100 + i)))
            .collect::<Vec<_>>()
    );
    assert!(!b.links().frames_waiting());
    // Sending still works from the deferred side.
    assert!(b.links().send(&a.id, vec![9]));
    assert_eq!(
        a.event().await,
        LinkEvent::Frame {
            peer: b.id,
            frame: vec![9]
        }
    );
    // A link that ends is found at the next read, after the frames sent before its end, and
    // its Down comes from `next`.
    assert!(a.links().send(&b.id, vec![7; 3]));
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.links().close(&b.id);
    a.expect_down(b.id).await;
    let deadline = Instant::now() + WAIT;
    while b.links().linked().next().is_some() {
        assert!(Instant::now() < deadline, "the closed link is still up");
        timeout(WAIT, b.links().next_or_frames(true))
            .await
            .expect("no word of the closed link");
        b.links().read_frames(&mut got);
    }
    assert_eq!(got.len(), 6);
    assert_eq!(got[5], (a.id, vec![7; 3]));
    b.expect_down(a.id).await;
}

// ---- direct links (gleaner_space::direct) ----

/// Two nodes that take direct links: `a`'s open ends on a connection of its own, both sides
/// say so, frames flow both ways, and the link outlives the swarm connection it was opened on
/// (it is not carried by it). Closed by one side, it goes down at both.
#[tokio::test]
async fn a_link_between_nodes_that_take_direct_links_is_direct() {
    let mut a = Node::direct(1).await;
    let mut b = Node::direct(2).await;
    connect(&mut a, &mut b).await;
    a.links().open(b.id);
    a.expect_up(b.id, true).await;
    b.expect_up(a.id, false).await;
    assert!(a.links().is_direct(&b.id) && b.links().is_direct(&a.id));
    assert_eq!((a.links().direct(), b.links().direct()), (1, 1));

    a.cmds.send(Cmd::Disconnect(b.id)).await.unwrap();
    a.wait_connected(b.id, false).await;
    b.wait_connected(a.id, false).await;
    for i in 0..3 {
        assert!(a.links().send(&b.id, frame(i, 1000)));
        assert!(b.links().send(&a.id, frame(i + 10, 10)));
    }
    let got = events(&mut [&mut a, &mut b], &[3, 3]).await;
    let frames = |peer: PeerId, tags: [usize; 3], len| {
        tags.iter()
            .map(|&t| LinkEvent::Frame {
                peer,
                frame: frame(t, len),
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(got[0], frames(b.id, [10, 11, 12], 10));
    assert_eq!(got[1], frames(a.id, [0, 1, 2], 1000));

    b.links().close(&a.id);
    b.expect_down(a.id).await;
    a.expect_down(b.id).await;
    assert!(a.linked().is_empty() && b.linked().is_empty());
}

/// A node that takes direct links and one that does not: the link stays on the swarm, whichever
/// opens it.
#[tokio::test]
async fn a_link_stays_on_the_swarm_when_either_side_takes_no_direct_links() {
    for direct_opens in [true, false] {
        let mut d = Node::direct(1).await;
        let mut s = Node::new(2, Some(8)).await;
        connect(&mut d, &mut s).await;
        let (opener, other) = if direct_opens {
            (&mut d, &mut s)
        } else {
            (&mut s, &mut d)
        };
        let other_id = other.id;
        opener.links().open(other_id);
        opener.expect_up(other_id, true).await;
        other.expect_up(opener.id, false).await;
        assert_eq!((d.links().direct(), s.links().direct()), (0, 0));
        assert!(d.links().send(&s.id, vec![1]));
        assert_eq!(
            s.event().await,
            LinkEvent::Frame {
                peer: d.id,
                frame: vec![1]
            }
        );
    }
}

/// An opener whose direct dial fails (nothing listens where it dials) stays on the swarm stream.
#[tokio::test]
async fn a_failed_direct_dial_leaves_the_link_on_the_swarm() {
    let mut a = Node::direct(1).await;
    let mut b = Node::direct(2).await;
    connect(&mut a, &mut b).await;
    // b listens on 127.0.0.1 only: a dial to 127.0.0.2 at its port is refused.
    a.links().set_address(b.id, None);
    a.links()
        .set_address(b.id, Some("127.0.0.2".parse().unwrap()));
    a.links().open(b.id);
    a.expect_up(b.id, true).await;
    b.expect_up(a.id, false).await;
    assert!(!a.links().is_direct(&b.id) && !b.links().is_direct(&a.id));
    assert!(b.links().send(&a.id, vec![2]));
    assert_eq!(
        a.event().await,
        LinkEvent::Frame {
            peer: b.id,
            frame: vec![2]
        }
    );
}

/// A direct link must be to the peer asked: a peer that points the opener at another node's
/// direct port (which proves to be that node) gets no direct link, and the opener stays on the
/// stream it opened, telling the peer so.
#[tokio::test]
async fn a_direct_port_that_proves_another_peer_is_not_linked() {
    let mut a = Node::direct(1).await;
    let mut liar = Node::new(2, None).await;
    let mut other = Node::direct(3).await;
    // Accepted before the connection: its handlers list their protocols when it opens.
    let mut incoming = liar.control.accept(RELAY_PROTOCOL).unwrap();
    connect(&mut a, &mut liar).await;
    connect(&mut a, &mut other).await;
    let port = other.links().direct_port().unwrap();
    a.links().open(liar.id);
    let (from, mut raw) = timeout(WAIT, incoming.next()).await.unwrap().unwrap();
    assert_eq!(from, a.id);
    raw.write_all(&port.to_be_bytes()).await.unwrap();
    raw.flush().await.unwrap();
    let mut choice = [0u8; 1];
    timeout(WAIT, raw.read_exact(&mut choice))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(choice[0], STAY, "the opener went direct to the wrong peer");
    a.expect_up(liar.id, true).await;
    assert!(!a.links().is_direct(&liar.id));
    // `other` took the connection `a` dialled for a link (it was `a`), and lost it when `a` let
    // it go.
    let rest = settle(&mut [&mut other]).await;
    let brief = vec![
        LinkEvent::Up {
            peer: a.id,
            outbound: false,
        },
        LinkEvent::Down { peer: a.id },
    ];
    assert!(rest == vec![vec![]] || rest == vec![brief], "{rest:?}");
    assert!(other.linked().is_empty());
}
