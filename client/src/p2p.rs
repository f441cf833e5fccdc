//! The space over libp2p: one `Swarm` owned by an event loop, reached through a cloneable
//! [`SpaceHandle`] with a bounded command channel. Factories spread signed capacity adverts over
//! the advert relay (`gleaner_space::relay`: batched frames on long-lived streams to a few
//! neighbours, each host's adverts settling on a tree) and gossip outcome reports and
//! machine-type announcements on per-space gossipsub topics. Gossipsub itself signs nothing
//! (anonymous messages, id = SHA-256 of the bytes): every message is already an envelope signed
//! by its author's host key, so that one signature is the only one made and checked. Every
//! message is validated by hand (envelope signature, kind, freshness, replay, size, per-author
//! rate) before it is accepted and forwarded; rejected ones count against their sender's peer
//! score, and replays cost their re-sender an application score penalty; a peer whose score
//! falls below [`BAN_SCORE`] while it has lately sent this node junk (a rejected message or a
//! replay), or that sent [`JUNK_BAN`] rejected messages lately, is disconnected and blocked. A
//! score that fell only for slowness (messages that waited too long in its queue, IHAVE promises
//! kept late) is gossipsub's to weigh, not a ban. Signed machine types are fetched by digest from
//! the peers that advertise running them (request-response `/gleaner/mt/1`, CBOR, size-bounded,
//! each peer's requests rate-limited) and verified against the digest and the trusted publishers
//! before use. Publishers' signed key rotations and revocations travel on their own topic
//! (signature, kind, size and clock checked here; whether one bears on this host's trust is the
//! trust store's call) and are re-announced now and then so that late joiners learn them.
//! Kademlia finds peers beyond the bootstrap nodes. What the coordinator's observer shares with
//! this node (ids, transport, gossipsub and scoring, the relay, advert checks, discovery, the
//! tunable constants) lives in the `gleaner-space` crate.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use gleaner::advert::{CapacityAdvert, OutcomeReport};
use gleaner::chain::{Advertiser, Outgoing};
use gleaner::space::SpaceView;
use gleaner::{Digest, Envelope, Kind, MachineType, PublicKey, SecretKey};
use gleaner_space::direct::DirectConfig;
use gleaner_space::gate::refill;
use gleaner_space::relay::{AdvertRelay, RelaySummary};
use gleaner_space::trim::Keep;
use gleaner_space::{
    AdvertGate, LinkEvent, Quiet, SpaceBehaviour, Topics, Trimmer, Verdict, WhenWoken, discovery,
    topics, tuning,
};
use libp2p::gossipsub::{self, MessageAcceptance};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent, behaviour::toggle::Toggle};
use libp2p::{Multiaddr, PeerId, StreamProtocol, allow_block_list, identify, kad, mdns, ping};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use gleaner_space::{MAX_ADVERT, MAX_MESSAGE, MT_PROTOCOL, transport_bytes};
/// Largest signed machine type served or fetched over `/gleaner/mt/1` (the envelope limit).
pub const MAX_MACHINE_TYPE: usize = 256 * 1024;
/// Largest signed key rotation or revocation (a revocation's reason is at most 512 bytes).
pub const MAX_TRUST_MESSAGE: usize = 2 * 1024;
/// How often a node re-announces the rotations and revocations it holds (for peers that joined
/// since), and how soon it tries again when no peer could take one.
pub const TRUST_REANNOUNCE_S: u64 = 300;
const TRUST_RETRY_S: u64 = 2;
/// Rotations and revocations a node re-announces at most (its trust store keeps them all).
const MAX_TRUST_KEPT: usize = 256;
/// A rotation or revocation heard from a peer this recently is not announced again by this node
/// (the space has it; gossipsub would also refuse it as a duplicate for a minute), and how many
/// such recent ones are remembered.
const TRUST_HEARD_S: u64 = 90;
const MAX_TRUST_HEARD: usize = 1024;
/// A rotation or revocation made further ahead of this node's clock is ignored (not forwarded).
const TRUST_CLOCK_SKEW_S: u64 = 600;
/// A peer whose gossipsub score falls below this, and that has lately sent this node junk, is
/// disconnected and blocked for [`BAN_S`]. Gossipsub's score also falls for slowness: its
/// behaviour penalty counts IHAVE promises not kept within 3 s, and its slow-peer penalty messages
/// that waited too long in the peer's queue. An honest but overloaded peer earns those, and in a
/// 100-node bench on 2 cores banning for them blocked ~60 peers per node and set off ~1,100
/// reconnections a second; gossipsub itself stops gossiping with such a peer for a while.
pub const BAN_SCORE: f64 = -100.0;
/// How long a banned peer stays blocked.
pub const BAN_S: u64 = 600;
/// A peer with this many rejected messages outstanding (the count decays by [`PENALTY_DECAY`] a
/// second) is banned whatever its gossipsub score: an honest relay forwards only what it checked.
pub const JUNK_BAN: f64 = 5.0;
/// Machine-type requests one peer may make in a burst, and per second after that; more are
/// refused (the stream is closed unanswered) and counted.
const MT_BURST: f64 = 16.0;
const MT_PER_S: f64 = 2.0;
/// A peer with this many refused machine-type requests outstanding (the count decays by
/// [`PENALTY_DECAY`] a second) is flooding: it is banned like a low-scoring peer.
const MT_FLOOD_BAN: f64 = 64.0;
/// Application score per replay, times the square of the peer's (decaying) replay count: one
/// replay costs 10, a second soon after 40, a fourth takes a peer below [`BAN_SCORE`]. An honest
/// relay rarely sends a replay (only one that joined after the original, or that held it longer
/// than the duplicate cache), and the count decays, so honest peers are never cut off.
const REPLAY_PENALTY: f64 = 10.0;
/// Per-second decay of the replay and refused-request counts.
const PENALTY_DECAY: f64 = 0.9;
/// Signed machine types kept to serve to peers.
const MAX_STORED_TYPES: usize = 256;
/// Machine-type fetches in flight at once, and the longest wait between asks for one type.
const MAX_FETCHES: usize = 8;
const FETCH_RETRY_S: u64 = 30;
/// Digests found unusable (untrusted publisher, rollback), not fetched again.
const MAX_REFUSED: usize = 4096;

/// Settings of one node.
#[derive(Debug, Clone, PartialEq)]
pub struct SpaceConfig {
    pub space: String,
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start (a wide-area space's bootstrap nodes).
    pub bootstrap: Vec<Multiaddr>,
    /// Discover peers on the LAN by mDNS.
    pub mdns: bool,
    /// Kademlia server mode (answer other peers' lookups): `Some` forces it; `None` turns it on
    /// once this node listens on a public address, and leaves it a client otherwise.
    pub kad_server: Option<bool>,
    /// Publishers whose machine types this node fetches, keeps, forwards and hands on.
    pub trusted: Vec<PublicKey>,
    /// Seconds an advert counts without a newer one.
    pub advert_ttl_s: u64,
    /// Seconds gossipsub remembers a message id and silently drops copies; a copy arriving later
    /// is validated again, and caught as a replay.
    pub duplicate_cache_s: u64,
    /// How long a connection with no stream open stays before it is closed (gossipsub keeps one
    /// open to every space peer; tests shorten this to show that those connections stay).
    pub idle_timeout: Duration,
    /// Past this many connected peers the node closes connections it dialled that nothing uses
    /// (a relay link or bootstrap peer never, a gossipsub mesh peer last), down to three quarters
    /// of it.
    pub max_peers: usize,
    /// A connection younger than this is never closed as surplus.
    pub trim_grace: Duration,
    /// Whether advert relay links go on TCP connections of their own where both ends can
    /// (`gleaner_space::direct`; on by default), rather than on the swarm's connections.
    pub direct_links: bool,
}

impl SpaceConfig {
    /// A node of `space` listening nowhere, with the defaults.
    pub fn new(space: impl Into<String>) -> SpaceConfig {
        SpaceConfig {
            space: space.into(),
            listen: Vec::new(),
            bootstrap: Vec::new(),
            mdns: false,
            kad_server: None,
            trusted: Vec::new(),
            advert_ttl_s: gleaner::space::ADVERT_TTL_S,
            duplicate_cache_s: 60,
            idle_timeout: tuning::IDLE_CONNECTION_TIMEOUT,
            max_peers: tuning::TRIM_HIGH,
            trim_grace: tuning::TRIM_GRACE,
            direct_links: true,
        }
    }
}

/// A request on `/gleaner/mt/1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MtRequest {
    /// The signed machine type whose payload has this SHA-256 (32 bytes).
    Get { digest: serde_bytes::ByteBuf },
}

/// An answer on `/gleaner/mt/1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MtResponse {
    /// The signed envelope, as the publisher made it.
    Found {
        envelope: serde_bytes::ByteBuf,
    },
    NotFound,
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    /// Long-lived streams for the advert relay.
    stream: gleaner_space::StreamBehaviour,
    gossipsub: gossipsub::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    mt: request_response::cbor::Behaviour<MtRequest, MtResponse>,
}

impl SpaceBehaviour for Behaviour {
    fn kad(&mut self) -> &mut kad::Behaviour<kad::store::MemoryStore> {
        &mut self.kad
    }
}

/// Why the space could not start or be reached.
#[derive(Debug, thiserror::Error)]
pub enum SpaceError {
    #[error("space setup: {0}")]
    Setup(String),
    #[error("the space event loop has stopped")]
    Gone,
    /// The event loop's command queue is full (it is behind): the message was not published.
    #[error("the space event loop is busy (its command queue is full); message dropped")]
    Busy,
    #[error("machine type refused: {0}")]
    Refused(String),
}

/// What the view looks like, for `gleaner space` and status.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SpaceSummary {
    pub space: String,
    pub peer_id: String,
    pub listen: Vec<String>,
    pub connected: usize,
    /// Connections this node closed because it held more than it needed.
    pub trimmed: u64,
    /// Connections that came up, dialled by either side (their churn is what costs: a handshake,
    /// identify, Kademlia and gossipsub's subscriptions each time).
    pub opened: u64,
    /// The advert relay: neighbours linked, copies, prunes and grafts.
    pub relay: RelaySummary,
    /// Peers in the Kademlia routing table.
    pub known_peers: usize,
    pub kad_server: bool,
    pub peers: Vec<PeerSummary>,
    pub rejected_messages: u64,
    /// Adverts and outcomes ignored because their author sent too many.
    pub rate_limited: u64,
    /// Adverts and outcomes ignored because they were taken before (their senders penalised).
    pub replayed: u64,
    /// Machine-type requests refused because their peer asked too often.
    pub mt_throttled: u64,
    /// Peers blocked for a low score.
    pub banned: Vec<String>,
    /// Gossipsub scores of connected peers.
    pub scores: Vec<(String, f64)>,
    /// Digests of the signed machine types this node serves.
    pub machine_types: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerSummary {
    pub host: String,
    pub free_cores: u16,
    pub free_memory_mib: u32,
    pub running: Vec<(String, u16)>,
    pub owner_present: bool,
    pub draining: bool,
    pub seq: u64,
}

/// A signed machine type this node learned from the space (fetched from a peer or announced),
/// already checked: signature, digest, freshness, trusted publisher, no rollback.
#[derive(Debug, Clone)]
pub struct LearnedType {
    pub digest: Digest,
    pub envelope: Vec<u8>,
    /// The peer it came from.
    pub from: String,
}

/// A signed key rotation or revocation gossiped by a peer: signature, kind, size and clock checked;
/// whether it bears on this host is for the trust store to say.
#[derive(Debug, Clone)]
pub struct LearnedTrust {
    pub envelope: Vec<u8>,
    /// The peer it came from.
    pub from: String,
}

enum Command {
    Publish(Envelope),
    /// This host's capacity: sent as a refresh of its last signed advert when that still says
    /// it, else signed anew.
    Advertise(Box<CapacityAdvert>),
    /// The publishers whose machine types this node fetches and forwards, after a trust change.
    SetTrusted(Vec<PublicKey>),
    /// Spread a signed rotation or revocation now and re-announce it from time to time.
    AnnounceTrust {
        envelope: Vec<u8>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Summary(oneshot::Sender<SpaceSummary>),
    View(oneshot::Sender<SpaceView>),
    Dial(Multiaddr),
    /// The seq of a host's advert in the view (cheap, for benchmarks and probes).
    SeqOf(PublicKey, oneshot::Sender<Option<u64>>),
    /// Serve a signed machine type; `announce` also gossips it to the space.
    Provide {
        envelope: Vec<u8>,
        announce: bool,
        reply: oneshot::Sender<Result<Digest, String>>,
    },
}

/// A cloneable handle to the space's event loop.
#[derive(Clone)]
pub struct SpaceHandle {
    tx: mpsc::Sender<Command>,
}

impl SpaceHandle {
    /// Publishes a signed advert or outcome on its topic; dropped with [`SpaceError::Busy`] if
    /// the loop is behind (its queue is full), never waiting.
    pub fn publish(&self, env: Envelope) -> Result<(), SpaceError> {
        self.tx
            .try_send(Command::Publish(env))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SpaceError::Busy,
                mpsc::error::TrySendError::Closed(_) => SpaceError::Gone,
            })
    }

    /// Advertises this host's capacity. `advert`'s host, seq, time and chain are set by the
    /// node (its seq is a floor: pass one above anything sent before, as a clock in ms is). While
    /// the content stays the same the node sends refreshes, links of a hash chain its last signed
    /// advert committed to, which peers check with a few SHA-256 calls instead of a signature
    /// (`gleaner::chain`). Dropped with [`SpaceError::Busy`] if the loop is behind.
    pub fn advertise(&self, advert: CapacityAdvert) -> Result<(), SpaceError> {
        self.tx
            .try_send(Command::Advertise(Box::new(advert)))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SpaceError::Busy,
                mpsc::error::TrySendError::Closed(_) => SpaceError::Gone,
            })
    }

    pub async fn summary(&self) -> Result<SpaceSummary, SpaceError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Summary(tx))
            .await
            .map_err(|_| SpaceError::Gone)?;
        rx.await.map_err(|_| SpaceError::Gone)
    }

    pub async fn view(&self) -> Result<SpaceView, SpaceError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::View(tx))
            .await
            .map_err(|_| SpaceError::Gone)?;
        rx.await.map_err(|_| SpaceError::Gone)
    }

    pub async fn dial(&self, addr: Multiaddr) -> Result<(), SpaceError> {
        self.tx
            .send(Command::Dial(addr))
            .await
            .map_err(|_| SpaceError::Gone)
    }

    /// The seq of `host`'s latest advert in the view, if any: a cheap probe of propagation.
    pub async fn seq_of(&self, host: PublicKey) -> Result<Option<u64>, SpaceError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::SeqOf(host, tx))
            .await
            .map_err(|_| SpaceError::Gone)?;
        rx.await.map_err(|_| SpaceError::Gone)
    }

    /// Serves a signed machine type (one this host admitted) to peers that ask for it by digest.
    pub async fn provide(&self, envelope: Vec<u8>) -> Result<Digest, SpaceError> {
        self.provide_or_announce(envelope, false).await
    }

    /// Serves a signed machine type and announces it to the space (a publisher's new version).
    /// Types too large to gossip are only served; peers fetch them when they see them run.
    pub async fn announce(&self, envelope: Vec<u8>) -> Result<Digest, SpaceError> {
        self.provide_or_announce(envelope, true).await
    }

    /// Replaces the publishers whose machine types this node fetches, keeps and forwards (after
    /// `gleaner trust`, a rotation or a revocation changed them).
    pub async fn set_trusted(&self, keys: Vec<PublicKey>) -> Result<(), SpaceError> {
        self.tx
            .send(Command::SetTrusted(keys))
            .await
            .map_err(|_| SpaceError::Gone)
    }

    /// Spreads a signed key rotation or revocation to the space (one this host applied), and
    /// re-announces it every [`TRUST_REANNOUNCE_S`] for peers that join later.
    pub async fn announce_trust(&self, envelope: Vec<u8>) -> Result<(), SpaceError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::AnnounceTrust {
                envelope,
                reply: tx,
            })
            .await
            .map_err(|_| SpaceError::Gone)?;
        rx.await
            .map_err(|_| SpaceError::Gone)?
            .map_err(SpaceError::Refused)
    }

    async fn provide_or_announce(
        &self,
        envelope: Vec<u8>,
        announce: bool,
    ) -> Result<Digest, SpaceError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Provide {
                envelope,
                announce,
                reply: tx,
            })
            .await
            .map_err(|_| SpaceError::Gone)?;
        rx.await
            .map_err(|_| SpaceError::Gone)?
            .map_err(SpaceError::Refused)
    }
}

/// A started node.
pub struct Space {
    pub handle: SpaceHandle,
    /// Where it listens (once bound).
    pub addrs: Vec<Multiaddr>,
    pub task: tokio::task::JoinHandle<()>,
    /// Machine types learned from the space (bounded; when full, new ones are dropped with a log).
    pub learned: mpsc::Receiver<LearnedType>,
    /// Signed key rotations and revocations learned from the space (bounded likewise).
    pub trust_learned: mpsc::Receiver<LearnedTrust>,
}

fn now() -> u64 {
    crate::factory::now_ms() / 1000
}

// ---- start ----

/// Starts a node with the host key as its libp2p identity; returns its handle and the addresses
/// it listens on (once bound). Machine types learned from the space are dropped: use
/// [`start_space`] to receive them.
pub async fn start(
    key: &SecretKey,
    cfg: SpaceConfig,
    cancel: CancellationToken,
) -> Result<(SpaceHandle, Vec<Multiaddr>, tokio::task::JoinHandle<()>), SpaceError> {
    let s = start_space(key, cfg, cancel).await?;
    Ok((s.handle, s.addrs, s.task))
}

/// As [`start_space`], on a thread of its own that runs a current-thread runtime: how the daemon
/// runs its node. The node's tasks (its loop, each connection's) then wake one another without
/// crossing threads, and the factory's work never delays them: in the space benchmark a
/// current-thread runtime cost 18–23 % less CPU per advert than a two-worker one, in runs made
/// one after the other, which drift (docs/BENCHMARKS.md). The returned `task` ends when the
/// node's loop does (`cancel`, or every handle dropped), and the thread with it; the caller's
/// runtime shutting down ends the thread too, its node cancelled.
pub async fn start_space_thread(
    key: &SecretKey,
    cfg: SpaceConfig,
    cancel: CancellationToken,
) -> Result<Space, SpaceError> {
    let (tx, rx) = oneshot::channel();
    let key = key.clone();
    std::thread::Builder::new()
        .name("gleaner-space".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(SpaceError::Setup(format!("space runtime: {e}"))));
                    return;
                }
            };
            rt.block_on(async move {
                let space = match start_space(&key, cfg, cancel).await {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                // The runtime (and with it the node) lives until the caller's side says the
                // node's loop has ended, or is gone.
                let (ended_tx, ended_rx) = oneshot::channel::<()>();
                if tx.send(Ok((space, ended_tx))).is_err() {
                    return;
                }
                let _ = ended_rx.await;
            });
        })
        .map_err(|e| SpaceError::Setup(format!("space thread: {e}")))?;
    let (space, ended) = rx.await.map_err(|_| {
        SpaceError::Setup("the space thread ended before its node started".into())
    })??;
    // A task's handle may be awaited from any runtime: this one, on the caller's, waits for the
    // node's loop and then lets the thread end.
    let node = space.task;
    Ok(Space {
        task: tokio::spawn(async move {
            let _ = node.await;
            drop(ended);
        }),
        ..space
    })
}

/// Whether `a` is an address other hosts on the internet could reach.
fn is_public(a: &Multiaddr) -> bool {
    a.iter().any(|p| match p {
        Protocol::Ip4(ip) => {
            !(ip.is_private()
                || ip.is_loopback()
                || ip.is_link_local()
                || ip.is_unspecified()
                || ip.is_broadcast()
                || ip.is_documentation()
                || ip.octets()[0] == 100 && (ip.octets()[1] & 0xc0) == 64)
        }
        Protocol::Ip6(ip) => {
            !(ip.is_loopback()
                || ip.is_unspecified()
                || (ip.segments()[0] & 0xfe00) == 0xfc00
                || (ip.segments()[0] & 0xffc0) == 0xfe80)
        }
        _ => false,
    })
}

/// The libp2p id of a host key.
fn peer_id(key: &PublicKey) -> Option<PeerId> {
    PeerId::from_bytes(&key.peer_id_bytes()).ok()
}

/// As [`start`], also handing out the machine types the node learns.
pub async fn start_space(
    key: &SecretKey,
    cfg: SpaceConfig,
    cancel: CancellationToken,
) -> Result<Space, SpaceError> {
    let err = |e: &dyn std::fmt::Display| SpaceError::Setup(e.to_string());
    let keypair = gleaner_space::keypair(key).map_err(SpaceError::Setup)?;
    let t = topics(&cfg.space);
    let kad_protocol = gleaner_space::kad_protocol(&cfg.space).map_err(SpaceError::Setup)?;
    let mdns_on = cfg.mdns;
    let kad_proto = kad_protocol.clone();
    let topics_scored = [t.outcomes.hash(), t.types.hash(), t.trust.hash()];
    let duplicate_cache = Duration::from_secs(cfg.duplicate_cache_s.max(1));
    let mut swarm = gleaner_space::build_swarm_with(keypair.clone(), cfg.idle_timeout, |k| {
        let codec = request_response::cbor::codec::Codec::default()
            .set_request_size_maximum(1024)
            .set_response_size_maximum(MAX_MACHINE_TYPE as u64 + 1024);
        let mt = request_response::Behaviour::with_codec(
            codec,
            [(StreamProtocol::new(MT_PROTOCOL), ProtocolSupport::Full)],
            request_response::Config::default()
                .with_request_timeout(Duration::from_secs(20))
                .with_max_concurrent_streams(32),
        );
        Ok(Behaviour {
            blocked: Default::default(),
            stream: gleaner_space::StreamBehaviour::new(),
            gossipsub: gleaner_space::gossipsub_behaviour(topics_scored, duplicate_cache)?,
            identify: gleaner_space::swarm::identify_behaviour(k),
            ping: gleaner_space::swarm::ping_behaviour(),
            mdns: gleaner_space::swarm::mdns_behaviour(mdns_on, k)?,
            kad: gleaner_space::swarm::kad_behaviour(k.public().to_peer_id(), kad_proto),
            mt,
        })
    })
    .map_err(SpaceError::Setup)?;
    match cfg.kad_server {
        Some(true) => swarm.behaviour_mut().kad.set_mode(Some(kad::Mode::Server)),
        Some(false) => swarm.behaviour_mut().kad.set_mode(Some(kad::Mode::Client)),
        // Server once an external (public) address is known, see NewListenAddr below.
        None => swarm.behaviour_mut().kad.set_mode(None),
    }
    // Adverts travel on the relay, not on gossipsub (see `gleaner_space::relay`).
    for topic in [&t.outcomes, &t.types, &t.trust] {
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(topic)
            .map_err(|e| err(&e))?;
    }
    // Wait until every listener is bound so callers learn the real ports.
    let kad_server = cfg.kad_server;
    let addrs = discovery::listen(&mut swarm, &cfg.listen, |swarm, address| {
        if kad_server.is_none() && is_public(address) {
            swarm.add_external_address(address.clone());
        }
    })
    .await
    .map_err(SpaceError::Setup)?;
    discovery::dial_bootstrap(&mut swarm, &cfg.bootstrap);
    let local = *swarm.local_peer_id();
    let direct = cfg
        .direct_links
        .then(|| DirectConfig::for_swarm(&keypair, &cfg.listen))
        .flatten();
    let relay = AdvertRelay::new(swarm.behaviour().stream.new_control(), local, direct)
        .map_err(SpaceError::Setup)?;
    let (tx, rx) = mpsc::channel(256);
    let (learned_tx, learned) = mpsc::channel(32);
    let (trust_tx, trust_learned) = mpsc::channel(32);
    let node = Node {
        advertiser: Advertiser::new(key.clone()),
        swarm,
        swarm_due: WhenWoken::new(),
        relay,
        topics: t,
        space: cfg.space,
        listen: addrs.clone(),
        bootstrap: cfg.bootstrap,
        trusted: cfg.trusted,
        kad_protocol,
        view: SpaceView::with_ttl(cfg.advert_ttl_s),
        rejected: 0,
        replayed: 0,
        mt_throttled: 0,
        gate: AdvertGate::default(),
        replays: HashMap::new(),
        rejects: HashMap::new(),
        mt_buckets: HashMap::new(),
        banned: HashMap::new(),
        types: BTreeMap::new(),
        type_order: 0,
        latest: BTreeMap::new(),
        wanted: HashMap::new(),
        fetching: HashMap::new(),
        refused: HashSet::new(),
        learned: learned_tx,
        trust: BTreeMap::new(),
        trust_heard: HashMap::new(),
        trust_learned: trust_tx,
        trimmer: Trimmer::new(local),
        max_peers: cfg.max_peers,
        trim_grace: cfg.trim_grace,
        walks: discovery::Walks::default(),
        trimmed: 0,
        opened: 0,
    };
    let task = tokio::spawn(node.run(rx, cancel));
    Ok(Space {
        handle: SpaceHandle { tx },
        addrs,
        task,
        learned,
        trust_learned,
    })
}

/// A signed machine type kept to serve.
struct Stored {
    envelope: Vec<u8>,
    order: u64,
}

/// What checking a signed machine type found.
enum TypeVerdict {
    /// Good and new: keep it, hand it on.
    New(Digest, Box<MachineType>),
    /// Good, already known.
    Known(Digest),
    /// Not for us (untrusted publisher, older version than one seen): ignore, do not forward.
    NotForUs(Digest, String),
    /// Broken or forged: reject, penalise the sender.
    Bad(String),
}

/// A machine type to fetch.
struct Wanted {
    /// When to ask next (s).
    next: u64,
    /// The host asked last: the next ask goes to the one after it among the hosts the view shows
    /// running the type, so a host that advertises a type and does not serve it holds up no one.
    asked: Option<PublicKey>,
    /// Asks answered without the type or failed since the last success: the next host is asked
    /// 2, 4, 8, 16 s after, then every [`FETCH_RETRY_S`].
    failed: u32,
}

impl Wanted {
    fn at(next: u64) -> Wanted {
        Wanted {
            next,
            asked: None,
            failed: 0,
        }
    }
}

struct Node {
    swarm: libp2p::Swarm<Quiet<Behaviour>>,
    /// Whether the swarm is due a poll: the loop polls it only when it woke the task or was
    /// changed by the loop ([`WhenWoken`]), not on every relay frame and timer.
    swarm_due: WhenWoken,
    /// This host's adverts: signed anchors and the refreshes between them.
    advertiser: Advertiser,
    /// Adverts to and from a few neighbours, batched.
    relay: AdvertRelay,
    topics: Topics,
    space: String,
    listen: Vec<Multiaddr>,
    bootstrap: Vec<Multiaddr>,
    trusted: Vec<PublicKey>,
    kad_protocol: StreamProtocol,
    view: SpaceView,
    rejected: u64,
    replayed: u64,
    mt_throttled: u64,
    /// The checks on adverts and outcomes: per-author rates (trust messages share them) and the
    /// hosts' decompressed keys.
    gate: AdvertGate,
    /// Decaying count of replays per sending peer, behind its application score.
    replays: HashMap<PeerId, f64>,
    /// Decaying count of rejected messages per sending peer: with replays, the evidence a ban needs.
    rejects: HashMap<PeerId, f64>,
    /// Machine-type requests per asking peer: token bucket and decaying count of refusals.
    mt_buckets: HashMap<PeerId, MtBucket>,
    /// Blocked peers and until when.
    banned: HashMap<PeerId, u64>,
    types: BTreeMap<Digest, Stored>,
    type_order: u64,
    /// Highest version seen per (publisher, name), and its digest: older ones are rollbacks.
    latest: BTreeMap<(PublicKey, String), (u64, Digest)>,
    /// Digests to fetch: when to ask next, and whom.
    wanted: HashMap<Digest, Wanted>,
    fetching: HashMap<OutboundRequestId, (Digest, PeerId)>,
    refused: HashSet<Digest>,
    learned: mpsc::Sender<LearnedType>,
    /// Rotations and revocations this host applied, by digest: envelope and when to announce next.
    trust: BTreeMap<Digest, (Vec<u8>, u64)>,
    /// Valid rotations and revocations heard from peers lately, and when.
    trust_heard: HashMap<Digest, u64>,
    trust_learned: mpsc::Sender<LearnedTrust>,
    /// The connections held, to close those not needed past `max_peers`.
    trimmer: Trimmer,
    max_peers: usize,
    trim_grace: Duration,
    trimmed: u64,
    opened: u64,
    /// When to walk the DHT next.
    walks: discovery::Walks,
}

/// Checks a gossiped key rotation or revocation: size, kind, signature (by the key it names),
/// and that it was not made in the future. The payload digest names it.
fn check_trust(bytes: &[u8], now: u64) -> Result<Digest, Verdict> {
    if bytes.len() > MAX_TRUST_MESSAGE {
        return Err(Verdict::Reject(format!(
            "{} bytes, at most {MAX_TRUST_MESSAGE}",
            bytes.len()
        )));
    }
    let env = Envelope::from_bytes(bytes).map_err(|e| Verdict::Reject(e.to_string()))?;
    let bad = |e: gleaner::Error| Verdict::Reject(e.to_string());
    let (digest, at) = match env.kind() {
        Ok(Kind::KeyRotation) => {
            let v = env.open::<gleaner::trust::KeyRotation>().map_err(bad)?;
            (v.digest, v.message.at)
        }
        Ok(Kind::Revocation) => {
            let v = env.open::<gleaner::trust::Revocation>().map_err(bad)?;
            (v.digest, v.message.at)
        }
        _ => {
            return Err(Verdict::Reject(
                "wrong message kind for the topic (a key rotation or revocation)".into(),
            ));
        }
    };
    // The maker's clock, not the relay's fault: ignored, not penalised.
    if at > now + TRUST_CLOCK_SKEW_S {
        return Err(Verdict::Ignore(format!(
            "made at {at}, more than {TRUST_CLOCK_SKEW_S} s ahead of this clock ({now})"
        )));
    }
    Ok(digest)
}

/// The peers to ban now, with why: those not banned yet that sent junk lately (a rejected
/// message or a replay) and whose gossipsub `score` is below [`BAN_SCORE`], and those that sent
/// [`JUNK_BAN`] rejected messages lately whatever their score (relayed adverts do not travel on
/// gossipsub, so junk there costs no gossipsub score).
fn to_ban(
    rejects: &HashMap<PeerId, f64>,
    replays: &HashMap<PeerId, f64>,
    banned: &HashMap<PeerId, u64>,
    score: impl Fn(&PeerId) -> Option<f64>,
) -> Vec<(PeerId, String)> {
    let junk: HashSet<&PeerId> = rejects.keys().chain(replays.keys()).collect();
    junk.into_iter()
        .filter(|p| !banned.contains_key(*p))
        .filter_map(|p| {
            let n = rejects.get(p).copied().unwrap_or(0.0);
            if n >= JUNK_BAN {
                return Some((*p, format!("{n:.0} rejected messages lately")));
            }
            let s = score(p)?;
            (s < BAN_SCORE).then(|| (*p, format!("gossip score {s:.0} after sending junk")))
        })
        .collect()
}

/// A peer's allowance of machine-type requests.
struct MtBucket {
    tokens: f64,
    last_ms: u64,
    /// Refused requests, decaying by [`PENALTY_DECAY`] a second.
    refused: f64,
}

impl Node {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>, cancel: CancellationToken) {
        // A bootstrap peer may not be up yet, may restart, or may have been cut off: redial it.
        let mut redial = tokio::time::interval(tuning::REDIAL_INTERVAL);
        redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lookup = tokio::time::interval(tuning::LOOKUP_INTERVAL);
        lookup.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut flush = tokio::time::interval(tuning::RELAY_FLUSH);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Made once: a `cancelled()` made afresh each time round put a waiter on the token's
        // list and took it off again at every wake of the node (each relay flush and link, each
        // timer): 0.6 % of a node's CPU at 100 nodes, 1.5 % of an idle one's.
        let cancelled = cancel.cancelled();
        tokio::pin!(cancelled);
        loop {
            // A node alone (no peer connected, none banned, no bootstrap address to redial) has
            // no housekeeping, redial or DHT walk to do: those timers sleep until a peer comes
            // (mDNS, or one dialling in), so an idle daemon is not woken for nothing. A timer
            // that slept fires at once when it is wanted again.
            let alone = self.swarm.connected_peers().next().is_none() && self.banned.is_empty();
            let dialling = !self.bootstrap.is_empty();
            let queued = self.relay.queued();
            // Each branch says whether it may have changed the swarm (queued a dial, a publish, a
            // request): such work wakes no one, so the swarm is then marked due.
            let touched = tokio::select! {
                _ = &mut cancelled => return,
                // A redial or a walk touches the swarm only when it tried a dial or started one.
                _ = redial.tick(), if dialling => {
                    discovery::redial(&mut self.swarm, &self.bootstrap, |p| self.banned.contains_key(p))
                }
                // Most seconds housekeeping changes nothing the swarm must act on: polling it
                // then for nothing (every behaviour, the pool, the listeners) was a swarm poll a
                // second per node.
                _ = housekeeping.tick(), if !alone => self.housekeeping(),
                _ = lookup.tick(), if !alone || dialling => {
                    let target = self.dial_target();
                    let now_ms = crate::factory::now_ms();
                    discovery::lookup(&mut self.swarm, target, &mut self.walks, now_ms)
                }
                // The relay touches the swarm only to fetch a machine type (`want`, which marks
                // it due itself).
                _ = flush.tick(), if queued => {
                    self.flush_relay();
                    false
                }
                // With nothing queued, a frame arriving starts the flush timer (the loop goes
                // round); otherwise frames wait for the flush.
                ev = self.relay.next(!queued) => {
                    if let Some(ev) = ev {
                        self.link_event(ev);
                    }
                    false
                }
                cmd = rx.recv() => match cmd {
                    None => return,
                    Some(c) => {
                        self.command(c);
                        true
                    }
                },
                Some(ev) = self.swarm_due.next(&mut self.swarm) => {
                    self.event(ev);
                    true
                }
            };
            if touched {
                self.swarm_due.touch();
            }
        }
    }

    /// The once-a-second chores; says whether they changed the swarm outside its poll (a ban,
    /// a ban lifted, a connection closed, a peer's score set, an announcement published), so
    /// that the swarm is polled. Links opened and fetches asked for wake what they need.
    fn housekeeping(&mut self) -> bool {
        let now = now();
        // Ban peers that sent junk lately and whose score says they send enough of it. Only
        // those are scored here: a low score without junk is slowness (see BAN_SCORE).
        let gossipsub = &self.swarm.behaviour().gossipsub;
        let low = to_ban(&self.rejects, &self.replays, &self.banned, |p| {
            gossipsub.peer_score(p)
        });
        let mut touched = !low.is_empty();
        for (p, why) in low {
            self.ban(p, &why, now);
        }
        for n in self.rejects.values_mut() {
            *n *= PENALTY_DECAY;
        }
        self.rejects.retain(|_, n| *n > 0.01);
        // Replay penalties and refused requests fade, so an honest peer's odd one is forgotten.
        touched |= !self.replays.is_empty();
        for (p, n) in self.replays.iter_mut() {
            *n *= PENALTY_DECAY;
            let score = -REPLAY_PENALTY * *n * *n;
            self.swarm
                .behaviour_mut()
                .gossipsub
                .set_application_score(p, score);
        }
        self.replays.retain(|_, n| *n > 0.01);
        let flooders: Vec<(PeerId, f64)> = self
            .mt_buckets
            .iter()
            .filter(|(_, b)| b.refused >= MT_FLOOD_BAN)
            .map(|(p, b)| (*p, b.refused))
            .collect();
        touched |= !flooders.is_empty();
        for (p, n) in flooders {
            self.mt_buckets.remove(&p);
            self.ban(
                p,
                &format!("{n:.0} machine-type requests over its limit"),
                now,
            );
        }
        for b in self.mt_buckets.values_mut() {
            b.refused *= PENALTY_DECAY;
        }
        let lifted: Vec<PeerId> = self
            .banned
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(p, _)| *p)
            .collect();
        touched |= !lifted.is_empty();
        for p in lifted {
            self.banned.remove(&p);
            self.swarm.behaviour_mut().blocked.unblock_peer(p);
        }
        let ms = crate::factory::now_ms();
        let banned = &self.banned;
        self.relay.maintain(
            self.swarm.connected_peers().copied(),
            |p| banned.contains_key(p),
            ms,
        );
        touched |= self.trim(ms);
        self.gate.rates.forget_idle(ms);
        self.mt_buckets
            .retain(|_, b| ms.saturating_sub(b.last_ms) < 60_000 || b.refused > 1.0);
        self.fetch_wanted(now);
        touched | self.announce_trust_due(now)
    }

    /// Where trimming stops: three quarters of `max_peers`, as [`tuning::TRIM_LOW`] is of
    /// [`tuning::TRIM_HIGH`].
    fn trim_low(&self) -> usize {
        self.max_peers * tuning::TRIM_LOW / tuning::TRIM_HIGH
    }

    /// How many peers discovery dials and walks the DHT for: [`tuning::TARGET_PEERS`], or fewer
    /// when trimming would close some of them again.
    fn dial_target(&self) -> usize {
        tuning::TARGET_PEERS.min(self.trim_low())
    }

    /// Closes the connections this node dialled and no longer needs, once it holds more than
    /// `max_peers` ([`gleaner_space::trim`]); says whether it closed any.
    fn trim(&mut self, now_ms: u64) -> bool {
        let (high, low) = (self.max_peers, self.trim_low());
        // Most seconds there is nothing to trim: the mesh is not gathered for nothing.
        if !self.trimmer.may_trim(high, now_ms) {
            return false;
        }
        let gossipsub = &self.swarm.behaviour().gossipsub;
        let mesh: HashSet<PeerId> = gossipsub.all_mesh_peers().copied().collect();
        let (relay, bootstrap) = (&self.relay, &self.bootstrap);
        let grace_ms = self.trim_grace.as_millis() as u64;
        let surplus = self.trimmer.surplus(high, low, grace_ms, now_ms, |p| {
            if relay.is_linked(p) || bootstrap.iter().any(|b| discovery::peer_of(b) == Some(*p)) {
                Keep::Must
            } else if mesh.contains(p) {
                Keep::Rather
            } else {
                Keep::No
            }
        });
        if surplus.is_empty() {
            self.trimmer.found_nothing(grace_ms, now_ms);
        }
        let mut closed = false;
        for c in surplus {
            if self.swarm.close_connection(c) {
                self.trimmer.closing(c);
                self.trimmed += 1;
                closed = true;
            }
        }
        closed
    }

    /// Publishes the rotations and revocations whose time has come; one no peer could take yet
    /// is tried again soon, one that went out (or that the space already had) in a while. Says
    /// whether it published any.
    fn announce_trust_due(&mut self, now: u64) -> bool {
        let due: Vec<Digest> = self
            .trust
            .iter()
            .filter(|(_, (_, next))| *next <= now)
            .map(|(d, _)| *d)
            .collect();
        self.trust_heard
            .retain(|_, at| now.saturating_sub(*at) < TRUST_HEARD_S);
        let mut published = false;
        for d in due {
            let Some((envelope, next)) = self.trust.get_mut(&d) else {
                continue;
            };
            if self.trust_heard.contains_key(&d) {
                *next = now + TRUST_REANNOUNCE_S;
                continue;
            }
            let topic = self.topics.trust.clone();
            published = true;
            *next = match self
                .swarm
                .behaviour_mut()
                .gossipsub
                .publish(topic, envelope.clone())
            {
                Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => now + TRUST_RETRY_S,
                Err(gossipsub::PublishError::Duplicate) | Ok(_) => now + TRUST_REANNOUNCE_S,
                Err(e) => {
                    tracing::debug!("announcing rotation or revocation {d}: {e}");
                    now + TRUST_RETRY_S
                }
            };
        }
        published
    }

    fn ban(&mut self, p: PeerId, why: &str, now: u64) {
        tracing::warn!("banning {p} for {BAN_S} s: {why}");
        self.banned.insert(p, now + BAN_S);
        self.relay.close(&p);
        self.swarm.behaviour_mut().blocked.block_peer(p);
        self.swarm.behaviour_mut().kad.remove_peer(&p);
    }

    /// A replay from `peer`: its application score drops with the square of its recent count.
    fn penalise_replay(&mut self, peer: PeerId) {
        let n = self.replays.entry(peer).or_insert(0.0);
        *n += 1.0;
        let score = -REPLAY_PENALTY * *n * *n;
        self.swarm
            .behaviour_mut()
            .gossipsub
            .set_application_score(&peer, score);
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Publish(env) => {
                let topic = match env.kind() {
                    Ok(Kind::CapacityAdvert) => None,
                    Ok(Kind::Outcome) => Some(self.topics.outcomes.clone()),
                    _ => return,
                };
                // Our own messages go into our own view as well.
                accept(&mut self.view, &env, now());
                let Some(topic) = topic else {
                    self.relay.publish(&env, crate::factory::now_ms());
                    return;
                };
                if let Err(e) = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(topic, env.to_bytes())
                {
                    tracing::debug!("publish: {e}");
                }
            }
            Command::Advertise(content) => {
                let (now, ms) = (now(), crate::factory::now_ms());
                let seed = || {
                    let mut b = [0u8; 32];
                    getrandom::fill(&mut b).ok().map(|()| b)
                };
                match self.advertiser.next(&content, now, seed) {
                    Outgoing::Signed(env) => {
                        accept(&mut self.view, &env, now);
                        self.relay.publish(&env, ms);
                    }
                    Outgoing::Refresh(r) => {
                        if let Err(e) = self.view.refresh(&r, now) {
                            tracing::debug!("own refresh not taken: {e}");
                        }
                        self.relay.publish_refresh(&r, ms);
                    }
                }
            }
            Command::SetTrusted(keys) => {
                if keys != self.trusted {
                    self.trusted = keys;
                    // Types refused for an untrusted publisher may be wanted now, and so may
                    // those the view shows running that were not wanted while nobody was
                    // trusted: `fetch_wanted` asks a host running each at its next pass (a
                    // refresh reports no types, and the next signed advert may be minutes off).
                    self.refused.clear();
                    self.want_from_view(now());
                }
            }
            Command::AnnounceTrust { envelope, reply } => {
                let now = now();
                let r = match check_trust(&envelope, now) {
                    Ok(d) => {
                        if !self.trust.contains_key(&d) && self.trust.len() >= MAX_TRUST_KEPT {
                            // One goes (the lowest digest, an arbitrary choice): the trust store
                            // keeps them all and the daemon announces them again at its next start.
                            if let Some(old) = self.trust.keys().next().copied() {
                                self.trust.remove(&old);
                            }
                        }
                        self.trust.insert(d, (envelope, now));
                        self.announce_trust_due(now);
                        Ok(())
                    }
                    Err(Verdict::Reject(why) | Verdict::Ignore(why) | Verdict::Replay(why)) => {
                        Err(why)
                    }
                    Err(Verdict::Accept) => Ok(()),
                };
                let _ = reply.send(r);
            }
            Command::Summary(reply) => {
                let _ = reply.send(self.summary());
            }
            Command::View(reply) => {
                self.view.expire(now());
                let _ = reply.send(self.view.clone());
            }
            Command::SeqOf(host, reply) => {
                let seq = self
                    .view
                    .peers()
                    .find(|p| p.advert.host == host)
                    .map(|p| p.advert.seq);
                let _ = reply.send(seq);
            }
            Command::Dial(a) => {
                if let Err(e) = self.swarm.dial(a.clone()) {
                    tracing::warn!("dial {a}: {e}");
                }
            }
            Command::Provide {
                envelope,
                announce,
                reply,
            } => {
                // Our own operator's choice: no trust check, but signature, expiry and rollback.
                let r = match self.check_type(&envelope, false) {
                    TypeVerdict::New(d, mt) => {
                        self.keep_type(d, &mt, envelope.clone());
                        Ok(d)
                    }
                    TypeVerdict::Known(d) => Ok(d),
                    TypeVerdict::NotForUs(_, why) | TypeVerdict::Bad(why) => Err(why),
                };
                if announce && r.is_ok() && envelope.len() < MAX_MESSAGE - 1024 {
                    let topic = self.topics.types.clone();
                    if let Err(e) = self
                        .swarm
                        .behaviour_mut()
                        .gossipsub
                        .publish(topic, envelope)
                    {
                        tracing::debug!("announce: {e}");
                    }
                }
                let _ = reply.send(r);
            }
        }
    }

    fn summary(&mut self) -> SpaceSummary {
        self.view.expire(now());
        let peers = self
            .view
            .peers()
            .map(|p| PeerSummary {
                host: p.advert.host.to_string(),
                free_cores: p.advert.free_cores,
                free_memory_mib: p.advert.free_memory_mib,
                running: p
                    .advert
                    .running
                    .iter()
                    .map(|r| (r.machine_type.to_string(), r.count))
                    .collect(),
                owner_present: p.advert.owner_present,
                draining: p.advert.draining,
                seq: p.advert.seq,
            })
            .collect();
        let known_peers = self
            .swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .map(|b| b.num_entries())
            .sum();
        let scores = self
            .swarm
            .connected_peers()
            .filter_map(|p| {
                Some((
                    p.to_string(),
                    self.swarm.behaviour().gossipsub.peer_score(p)?,
                ))
            })
            .collect();
        SpaceSummary {
            space: self.space.clone(),
            peer_id: self.swarm.local_peer_id().to_string(),
            listen: self.listen.iter().map(|a| a.to_string()).collect(),
            connected: self.swarm.connected_peers().count(),
            trimmed: self.trimmed,
            opened: self.opened,
            relay: self.relay.summary(),
            known_peers,
            kad_server: self.swarm.behaviour().kad.mode() == kad::Mode::Server,
            peers,
            rejected_messages: self.rejected,
            rate_limited: self.gate.rate_limited,
            replayed: self.replayed,
            mt_throttled: self.mt_throttled,
            banned: self.banned.keys().map(|p| p.to_string()).collect(),
            scores,
            machine_types: self.types.keys().map(|d| d.to_string()).collect(),
        }
    }

    fn event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) => {
                let acceptance = match self.validate(&message, &propagation_source) {
                    Verdict::Accept => MessageAcceptance::Accept,
                    Verdict::Ignore(reason) => {
                        tracing::debug!("ignored a message from {propagation_source}: {reason}");
                        MessageAcceptance::Ignore
                    }
                    Verdict::Replay(reason) => {
                        self.replayed += 1;
                        tracing::info!("ignored a replay from {propagation_source}: {reason}");
                        self.penalise_replay(propagation_source);
                        MessageAcceptance::Ignore
                    }
                    Verdict::Reject(reason) => {
                        self.rejected += 1;
                        *self.rejects.entry(propagation_source).or_insert(0.0) += 1.0;
                        tracing::info!("rejected a message from {propagation_source}: {reason}");
                        MessageAcceptance::Reject
                    }
                };
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, acceptance);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(e)) => {
                discovery::on_mdns(&mut self.swarm, e)
            }
            // Peers that speak our DHT go into the routing table under their listen addresses.
            SwarmEvent::Behaviour(BehaviourEvent::Identify(e)) => {
                discovery::on_identify(&mut self.swarm, e, &self.kad_protocol)
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => {
                let target = self.dial_target();
                discovery::on_kad(&mut self.swarm, e, target, |p| self.banned.contains_key(p))
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mt(e)) => self.mt_event(e),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                let (dialled, now_ms) = (endpoint.is_dialer(), crate::factory::now_ms());
                self.relay
                    .connection(peer_id, Some(endpoint.get_remote_address()));
                self.opened += 1;
                self.trimmer
                    .established(connection_id, peer_id, dialled, now_ms);
                discovery::on_connected(&mut self.swarm, peer_id, &self.bootstrap)
            }
            SwarmEvent::ConnectionClosed {
                connection_id,
                peer_id,
                num_established,
                ..
            } => {
                if num_established == 0 {
                    self.relay.connection(peer_id, None);
                }
                self.trimmer.closed(connection_id)
            }
            SwarmEvent::NewListenAddr { address, .. } if is_public(&address) => {
                self.swarm.add_external_address(address);
            }
            _ => {}
        }
    }

    /// Whether `author` has a token left (refilled, not taken).
    fn rate_ok(&mut self, author: PublicKey) -> bool {
        self.gate.rates.ok(author, crate::factory::now_ms())
    }

    /// Takes a token from `author`'s bucket, once its message was accepted.
    fn rate_take(&mut self, author: PublicKey) {
        self.gate.rates.take(author);
    }

    /// Checks a gossiped message and, if good, takes it into the view (or the type store).
    fn validate(&mut self, m: &gossipsub::Message, from: &PeerId) -> Verdict {
        if m.data.len() > MAX_MESSAGE {
            return Verdict::Reject("too large".into());
        }
        if m.topic == self.topics.types.hash() {
            return match self.check_type(&m.data, true) {
                TypeVerdict::New(d, mt) => {
                    self.keep_type(d, &mt, m.data.clone());
                    self.hand_on(d, m.data.clone(), from);
                    Verdict::Accept
                }
                TypeVerdict::Known(_) => Verdict::Accept,
                TypeVerdict::NotForUs(_, why) => Verdict::Ignore(why),
                TypeVerdict::Bad(why) => Verdict::Reject(why),
            };
        }
        if m.topic == self.topics.trust.hash() {
            return self.validate_trust(m, from);
        }
        // Adverts come over the relay (`link_event`), not gossipsub.
        if m.topic != self.topics.outcomes.hash() {
            return Verdict::Reject("unknown topic".into());
        }
        // Size, shape, kind, signer, rate, signature, then the view: see `AdvertGate::check`. A
        // replay's sender is penalised by the caller (softly: see REPLAY_PENALTY).
        self.gate
            .check(
                &m.data,
                Kind::Outcome,
                &mut self.view,
                now(),
                crate::factory::now_ms(),
            )
            .verdict
    }

    /// A link of the advert relay came, went, or brought a frame. A banned peer's link is closed
    /// as it comes: the swarm refuses its connections, but a direct link is not the swarm's.
    fn link_event(&mut self, ev: LinkEvent) {
        if let LinkEvent::Up { peer, .. } = &ev
            && self.banned.contains_key(peer)
        {
            tracing::debug!(%peer, "relay link from a banned peer closed");
            self.relay.close(peer);
        }
        let out = self.relay.handle(
            ev,
            &mut self.gate,
            &mut self.view,
            now(),
            crate::factory::now_ms(),
        );
        self.relayed(out);
    }

    /// The relay's flush: news verified (into the view), frames sent.
    fn flush_relay(&mut self) {
        let out = self.relay.flush(
            &mut self.gate,
            &mut self.view,
            now(),
            crate::factory::now_ms(),
        );
        self.relayed(out);
    }

    /// What the relay took and refused: the machine types its signed adverts show running are
    /// wanted, junk counts against its sender.
    fn relayed(&mut self, out: gleaner_space::relay::Outcome) {
        let now = now();
        for (author, running) in out.taken {
            if !running.is_empty() {
                self.want(&running, author, now);
            }
        }
        for (peer, why) in out.rejected {
            self.rejected += 1;
            *self.rejects.entry(peer).or_insert(0.0) += 1.0;
            tracing::info!("rejected a relayed advert from {peer}: {why}");
        }
    }

    /// A gossiped key rotation or revocation: checked, then handed to the daemon (whose trust
    /// store decides whether it bears on this host) unless this node already holds it. Any valid
    /// one is forwarded, so that hosts that trust the publisher learn it through hosts that do not.
    fn validate_trust(&mut self, m: &gossipsub::Message, from: &PeerId) -> Verdict {
        if m.data.len() > MAX_TRUST_MESSAGE {
            return Verdict::Reject(format!(
                "{} bytes, at most {MAX_TRUST_MESSAGE}",
                m.data.len()
            ));
        }
        // The cheap checks first, so junk is always penalised; a well-formed flood then costs a
        // map lookup per message, not a signature check.
        let env = match Envelope::from_bytes(&m.data) {
            Ok(e) => e,
            Err(e) => return Verdict::Reject(e.to_string()),
        };
        match env.kind() {
            Ok(Kind::KeyRotation | Kind::Revocation) => {}
            _ => return Verdict::Reject("wrong message kind for the topic".into()),
        }
        // The author is the envelope's signer (gossipsub carries no author); a token is taken
        // only once the signature holds, so forgeries cannot use up an honest signer's allowance.
        let author = match env.signer() {
            Ok(k) => k,
            Err(e) => return Verdict::Reject(e.to_string()),
        };
        if !self.rate_ok(author) {
            self.gate.rate_limited += 1;
            return Verdict::Ignore(format!("{author} sends too many messages"));
        }
        let now = now();
        let digest = match check_trust(&m.data, now) {
            Ok(d) => d,
            Err(v) => return v,
        };
        self.rate_take(author);
        if self.trust_heard.len() < MAX_TRUST_HEARD || self.trust_heard.contains_key(&digest) {
            self.trust_heard.insert(digest, now);
        }
        if !self.trust.contains_key(&digest) {
            let l = LearnedTrust {
                envelope: m.data.clone(),
                from: from.to_string(),
            };
            if self.trust_learned.try_send(l).is_err() {
                tracing::warn!("rotation or revocation {digest} dropped: nobody is taking them");
            }
        }
        Verdict::Accept
    }

    // ---- machine types ----

    fn check_type(&self, bytes: &[u8], need_trust: bool) -> TypeVerdict {
        if bytes.len() > MAX_MACHINE_TYPE {
            return TypeVerdict::Bad(format!("{} bytes, at most {MAX_MACHINE_TYPE}", bytes.len()));
        }
        let v = match Envelope::open_bytes::<MachineType>(bytes) {
            Ok(v) => v,
            Err(e) => return TypeVerdict::Bad(e.to_string()),
        };
        if self.types.contains_key(&v.digest) {
            return TypeVerdict::Known(v.digest);
        }
        if let Err(e) = v.message.check_fresh(now()) {
            return TypeVerdict::Bad(e.to_string());
        }
        if need_trust && !self.trusted.contains(&v.signer) {
            return TypeVerdict::NotForUs(
                v.digest,
                format!("publisher {} is not trusted", v.signer),
            );
        }
        if let Some((version, digest)) = self.latest.get(&(v.signer, v.message.name.clone()))
            && (*version > v.message.version
                || *version == v.message.version && *digest != v.digest)
        {
            return TypeVerdict::NotForUs(
                v.digest,
                format!(
                    "{} v{} after v{version}: rollback or a second v{version}",
                    v.message.name, v.message.version
                ),
            );
        }
        TypeVerdict::New(v.digest, Box::new(v.message))
    }

    fn keep_type(&mut self, d: Digest, mt: &MachineType, envelope: Vec<u8>) {
        self.latest
            .insert((mt.publisher, mt.name.clone()), (mt.version, d));
        self.wanted.remove(&d);
        if self.types.len() >= MAX_STORED_TYPES
            && let Some(oldest) = self
                .types
                .iter()
                .min_by_key(|(_, s)| s.order)
                .map(|(d, _)| *d)
        {
            self.types.remove(&oldest);
        }
        self.type_order += 1;
        self.types.insert(
            d,
            Stored {
                envelope,
                order: self.type_order,
            },
        );
    }

    fn hand_on(&mut self, digest: Digest, envelope: Vec<u8>, from: &PeerId) {
        let l = LearnedType {
            digest,
            envelope,
            from: from.to_string(),
        };
        if self.learned.try_send(l).is_err() {
            tracing::warn!("learned machine type {digest} dropped: nobody is taking them");
        }
    }

    /// Notes the types an advert shows running that we do not hold yet.
    fn want(&mut self, running: &[Digest], host: PublicKey, now: u64) {
        if self.trusted.is_empty() {
            return;
        }
        // Most adverts show types held or refused here already: the host's key becomes a
        // `PeerId` only for one that is neither.
        let mut peer = None;
        for d in running {
            if self.types.contains_key(d) || self.refused.contains(d) {
                continue;
            }
            let to = match peer {
                Some(p) => p,
                None => match peer_id(&host) {
                    Some(p) if p != *self.swarm.local_peer_id() => *peer.insert(p),
                    _ => return,
                },
            };
            if self.wanted.len() < MAX_STORED_TYPES {
                self.wanted.entry(*d).or_insert(Wanted::at(now));
            }
            if self.fetching.values().all(|(f, _)| f != d) && self.fetching.len() < MAX_FETCHES {
                let Some(w) = self.wanted.get_mut(d).filter(|w| w.next <= now) else {
                    continue;
                };
                w.next = now + FETCH_RETRY_S;
                w.asked = Some(host);
                let id = self.swarm.behaviour_mut().mt.send_request(
                    &to,
                    MtRequest::Get {
                        digest: serde_bytes::ByteBuf::from(d.0.to_vec()),
                    },
                );
                self.swarm_due.touch();
                self.fetching.insert(id, (*d, to));
            }
        }
    }

    /// Every type the view shows running and not held here becomes wanted (if room is left).
    fn want_from_view(&mut self, now: u64) {
        if self.trusted.is_empty() {
            return;
        }
        for p in self.view.peers() {
            for r in &p.advert.running {
                if self.wanted.len() >= MAX_STORED_TYPES {
                    return;
                }
                if !self.types.contains_key(&r.machine_type) {
                    self.wanted.entry(r.machine_type).or_insert(Wanted::at(now));
                }
            }
        }
    }

    /// Retries wanted types from peers whose adverts show them running: each time the host after
    /// the one asked last (in the view's order, wrapping round), never this host itself.
    fn fetch_wanted(&mut self, now: u64) {
        let due: Vec<(Digest, Option<PublicKey>)> = self
            .wanted
            .iter()
            .filter(|(_, w)| w.next <= now)
            .map(|(d, w)| (*d, w.asked))
            .collect();
        if due.is_empty() {
            return;
        }
        let me = self.advertiser.host();
        for (d, asked) in due {
            let holders: Vec<PublicKey> = self
                .view
                .peers()
                .filter(|p| {
                    p.advert.host != me && p.advert.running.iter().any(|r| r.machine_type == d)
                })
                .map(|p| p.advert.host)
                .collect();
            let next = asked
                .and_then(|a| holders.iter().find(|h| **h > a))
                .or(holders.first());
            match next {
                Some(h) => self.want(&[d], *h, now),
                // Nobody else runs it any more.
                None => {
                    self.wanted.remove(&d);
                }
            }
        }
    }

    /// A fetch of `d` came back without it: the next host is asked soon, then less often.
    fn fetch_failed(&mut self, d: Digest, now: u64) {
        if let Some(w) = self.wanted.get_mut(&d) {
            w.failed = w.failed.saturating_add(1);
            w.next = now + (1u64 << w.failed.min(5)).min(FETCH_RETRY_S);
        }
    }

    /// Takes a token from `peer`'s machine-type request bucket; counts a refusal when empty.
    fn mt_allowed(&mut self, peer: PeerId) -> bool {
        let ms = crate::factory::now_ms();
        let b = self.mt_buckets.entry(peer).or_insert(MtBucket {
            tokens: MT_BURST,
            last_ms: ms,
            refused: 0.0,
        });
        if refill(&mut b.tokens, &mut b.last_ms, ms, MT_BURST, MT_PER_S) {
            b.tokens -= 1.0;
            true
        } else {
            b.refused += 1.0;
            false
        }
    }

    fn mt_event(&mut self, e: request_response::Event<MtRequest, MtResponse>) {
        use request_response::{Event, Message};
        match e {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                if !self.mt_allowed(peer) {
                    // Dropping the channel closes the stream unanswered: no envelope is copied
                    // or sent for a peer that asks too often.
                    self.mt_throttled += 1;
                    tracing::debug!("{peer} asks for machine types too often; refused");
                    drop(channel);
                    return;
                }
                let MtRequest::Get { digest } = request;
                let resp = <[u8; 32]>::try_from(digest.as_slice())
                    .ok()
                    .and_then(|d| self.types.get(&Digest(d)))
                    .map(|s| MtResponse::Found {
                        envelope: serde_bytes::ByteBuf::from(s.envelope.clone()),
                    })
                    .unwrap_or(MtResponse::NotFound);
                if self
                    .swarm
                    .behaviour_mut()
                    .mt
                    .send_response(channel, resp)
                    .is_err()
                {
                    tracing::debug!("{peer} left before its machine type was sent");
                }
            }
            Event::Message {
                peer,
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                let Some((want, _)) = self.fetching.remove(&request_id) else {
                    return;
                };
                let MtResponse::Found { envelope } = response else {
                    tracing::debug!("{peer} does not hold machine type {want}");
                    self.fetch_failed(want, now());
                    return;
                };
                let envelope = envelope.into_vec();
                match self.check_type(&envelope, true) {
                    TypeVerdict::New(d, mt) if d == want => {
                        tracing::info!("fetched machine type {} ({d}) from {peer}", mt.name);
                        self.keep_type(d, &mt, envelope.clone());
                        self.hand_on(d, envelope, &peer);
                    }
                    TypeVerdict::Known(_) => {}
                    TypeVerdict::NotForUs(d, why) if d == want => {
                        tracing::info!("machine type {d} from {peer} not used: {why}");
                        if self.refused.len() < MAX_REFUSED {
                            self.refused.insert(d);
                        }
                        self.wanted.remove(&d);
                    }
                    TypeVerdict::Bad(why) => {
                        tracing::warn!("{peer} sent a bad machine type for {want}: {why}");
                        self.fetch_failed(want, now());
                    }
                    _ => {
                        tracing::warn!("{peer} sent another machine type than {want}");
                        self.fetch_failed(want, now());
                    }
                }
            }
            Event::OutboundFailure {
                request_id, error, ..
            } => {
                if let Some((d, p)) = self.fetching.remove(&request_id) {
                    tracing::debug!("fetching {d} from {p}: {error}");
                    self.fetch_failed(d, now());
                }
            }
            _ => {}
        }
    }
}

fn accept(view: &mut SpaceView, env: &Envelope, now: u64) {
    match env.kind() {
        Ok(Kind::CapacityAdvert) => {
            if let Ok(v) = env.open::<CapacityAdvert>() {
                let _ = view.insert(v.message, now);
            }
        }
        Ok(Kind::Outcome) => {
            if let Ok(v) = env.open::<OutcomeReport>() {
                let _ = view.outcome(&v.message, now);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_key_is_the_libp2p_identity() {
        let key = SecretKey::from_seed([42; 32]);
        let kp = libp2p::identity::Keypair::ed25519_from_bytes(key.seed()).unwrap();
        assert_eq!(
            kp.public().to_peer_id().to_string(),
            key.public().to_string()
        );
        assert_eq!(peer_id(&key.public()), Some(kp.public().to_peer_id()));
    }

    #[test]
    fn trust_messages_are_checked_for_kind_signature_size_and_clock() {
        use gleaner::trust::{KeyRotation, Revocation, TRUST_VERSION};
        let (a, b) = (SecretKey::from_seed([1; 32]), SecretKey::from_seed([2; 32]));
        let now = 1_800_000_000;
        let rev = |at: u64, reason: String| Revocation {
            v: TRUST_VERSION,
            key: a.public(),
            at,
            reason,
        };
        let good = Envelope::seal(&rev(now, "stolen".into()), &a).to_bytes();
        assert!(check_trust(&good, now).is_ok());
        let rot = KeyRotation {
            v: TRUST_VERSION,
            old: a.public(),
            new: b.public(),
            at: now,
        };
        assert!(check_trust(&Envelope::seal(&rot, &a).to_bytes(), now).is_ok());
        // A revocation of A signed by B, a machine type, junk: rejected (the sender pays).
        let forged = Envelope::seal(&rev(now, "framed".into()), &b).to_bytes();
        assert!(matches!(check_trust(&forged, now), Err(Verdict::Reject(_))));
        let mt = Envelope::seal(&MachineType::example(a.public()), &a).to_bytes();
        assert!(matches!(check_trust(&mt, now), Err(Verdict::Reject(_))));
        assert!(matches!(check_trust(b"junk", now), Err(Verdict::Reject(_))));
        let mut tampered = good.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(matches!(
            check_trust(&tampered, now),
            Err(Verdict::Reject(_))
        ));
        let big = vec![0u8; MAX_TRUST_MESSAGE + 1];
        assert!(matches!(check_trust(&big, now), Err(Verdict::Reject(_))));
        // Made an hour ahead of this clock: ignored, not held against the relay.
        let ahead = Envelope::seal(&rev(now + 3600, "later".into()), &a).to_bytes();
        assert!(matches!(check_trust(&ahead, now), Err(Verdict::Ignore(_))));
        // An old one is fine: a revocation never expires.
        let old = Envelope::seal(&rev(1, "long ago".into()), &a).to_bytes();
        assert!(check_trust(&old, now).is_ok());
    }

    #[test]
    fn only_peers_that_sent_junk_are_banned_for_a_low_score() {
        let peer = |i: u8| {
            gleaner_space::keypair(&SecretKey::from_seed([i; 32]))
                .unwrap()
                .public()
                .to_peer_id()
        };
        let (junk_low, slow_low, junk_ok, replayer, banned_junk, gone, flooder) = (
            peer(1),
            peer(2),
            peer(3),
            peer(4),
            peer(5),
            peer(6),
            peer(7),
        );
        let rejects = HashMap::from([
            (junk_low, 1.0),
            (junk_ok, 3.0),
            (banned_junk, 1.0),
            (flooder, JUNK_BAN),
        ]);
        let replays = HashMap::from([(replayer, 2.0), (junk_low, 1.0), (gone, 1.0)]);
        let banned = HashMap::from([(banned_junk, 10_000)]);
        let score = |p: &PeerId| match p {
            p if *p == junk_ok || *p == flooder => Some(BAN_SCORE + 1.0),
            p if *p == gone => None,
            // Everyone else scores low, the slow peer included.
            _ => Some(BAN_SCORE - 50.0),
        };
        let mut got: Vec<PeerId> = to_ban(&rejects, &replays, &banned, score)
            .into_iter()
            .map(|(p, why)| {
                let want = if p == flooder {
                    format!("{JUNK_BAN:.0} rejected messages lately")
                } else {
                    format!("gossip score {:.0} after sending junk", BAN_SCORE - 50.0)
                };
                assert_eq!(why, want);
                p
            })
            .collect();
        got.sort();
        // The flooder, too, for its many rejected messages whatever its score.
        let mut want = vec![junk_low, replayer, flooder];
        want.sort();
        // Not the slow peer (low score, no junk), nor one above the line, nor one already banned
        // or no longer scored; the peer with both rejects and replays once.
        assert_eq!(got, want);
        assert!(!got.contains(&slow_low));
    }

    #[test]
    fn public_addresses() {
        for (a, public) in [
            ("/ip4/127.0.0.1/tcp/1", false),
            ("/ip4/10.1.2.3/tcp/1", false),
            ("/ip4/192.168.1.1/udp/1/quic-v1", false),
            ("/ip4/100.64.0.1/tcp/1", false),
            ("/ip4/0.0.0.0/tcp/1", false),
            ("/ip4/131.169.1.1/tcp/1", true),
            ("/ip6/::1/tcp/1", false),
            ("/ip6/fd00::1/tcp/1", false),
            ("/ip6/2001:638::1/tcp/1", true),
        ] {
            assert_eq!(is_public(&a.parse().unwrap()), public, "{a}");
        }
    }

    #[test]
    fn mt_wire_is_cbor_with_byte_strings() {
        let req = MtRequest::Get {
            digest: serde_bytes::ByteBuf::from(vec![7; 32]),
        };
        let buf = gleaner::cbor::to_vec(&req);
        // {"get": {"digest": h'07…'}}: a one-entry map, then the text "get".
        assert_eq!(&buf[..5], &[0xa1, 0x63, b'g', b'e', b't']);
        assert!(buf.windows(2).any(|w| w == [0x58, 32]), "digest is a bstr");
    }
}
