//! The coordinator as an observer in a space: a small libp2p node (the same transports, identify
//! and Kademlia protocol ids and gossipsub topic and message ids as the client's `p2p.rs`, so it
//! interoperates) that subscribes only to the space's capacity adverts, validates each by hand
//! (size, kind, per-author rate keyed by the envelope's signer, signature, schema, freshness, replay) and
//! keeps the core's `SpaceView` with expiry. It never publishes. One event loop owns the Swarm and
//! hands out a [`SpaceSnapshot`] through a `watch` channel (one value, so bounded) every second.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use gleaner::advert::{CapacityAdvert, backend_bits};
use gleaner::space::SpaceView;
use gleaner::{Envelope, Kind, SecretKey};
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, MessageAuthenticity};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent, behaviour::toggle::Toggle};
use libp2p::{Multiaddr, PeerId, StreamProtocol, identify, kad, mdns, noise, ping, tcp, yamux};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Largest gossiped frame (as the client's gossipsub transmit limit).
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Largest advert; a bigger one is rejected (as in the client).
pub const MAX_ADVERT: usize = 16 * 1024;
/// Adverts one author may have accepted in a burst, and per second after that (as in the client).
const RATE_BURST: f64 = 10.0;
const RATE_PER_S: f64 = 2.0;
/// Kademlia-discovered peers are dialled while fewer than this are connected.
const TARGET_PEERS: usize = 16;
/// Longest space name (as the client's).
pub const SPACE_NAME_MAX: usize = 64;

/// How the coordinator joins a space.
#[derive(Debug, Clone, PartialEq)]
pub struct SpaceConfig {
    pub space: String,
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start and redial while they are not connected.
    pub bootstrap: Vec<Multiaddr>,
    /// Discover peers on the LAN by mDNS.
    pub mdns: bool,
    /// Seconds an advert counts without a newer one.
    pub advert_ttl_s: u64,
}

impl SpaceConfig {
    /// Joins `space` listening nowhere, with the core's advert TTL.
    pub fn new(space: impl Into<String>) -> SpaceConfig {
        SpaceConfig {
            space: space.into(),
            listen: Vec::new(),
            bootstrap: Vec::new(),
            mdns: false,
            advert_ttl_s: gleaner::space::ADVERT_TTL_S,
        }
    }
}

/// Why a space name is refused, if it is (the client's rule: it becomes part of topic names).
pub fn check_space_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > SPACE_NAME_MAX || name.contains(['/', ' ']) {
        return Err(format!(
            "{name:?}: a space name is 1-{SPACE_NAME_MAX} characters without '/' or spaces"
        ));
    }
    Ok(())
}

/// Why the space could not be joined.
#[derive(Debug, thiserror::Error)]
pub enum SpaceError {
    #[error("joining the space: {0}")]
    Setup(String),
}

/// One factory's advertised capacity, as the dashboard and `/api/space` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerCapacity {
    pub host: String,
    pub free_cores: u16,
    pub free_memory_mib: u32,
    pub free_disk_mib: u32,
    /// Engines the host can run: `docker`, `kvm`, `tcg`.
    pub backends: Vec<String>,
    pub running: Vec<RunningType>,
    pub owner_present: bool,
    pub draining: bool,
    pub benchmark: u32,
    pub seq: u64,
    /// Unix seconds when the host made the advert.
    pub advert_at: u64,
    /// Seconds since the advert arrived.
    pub age_s: u64,
    /// Seconds until it expires without a newer one.
    pub expires_in_s: u64,
}

/// Machines of one type a host runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunningType {
    pub machine_type: String,
    pub count: u16,
}

/// Sums over the live peers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SpaceTotals {
    pub peers: u64,
    pub free_cores: u64,
    pub free_memory_mib: u64,
    pub running_machines: u64,
    /// Peers whose owner is at the machine.
    pub owner_present: u64,
    pub draining: u64,
}

/// The live view of the space at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SpaceSnapshot {
    pub space: String,
    /// The coordinator's own peer id in the space.
    pub peer_id: String,
    pub listen: Vec<String>,
    /// libp2p connections open now.
    pub connected: u64,
    pub advert_ttl_s: u64,
    /// Unix seconds when this snapshot was taken.
    pub at: u64,
    pub totals: SpaceTotals,
    /// Live peers, most free cores first.
    pub peers: Vec<PeerCapacity>,
    /// Gossiped adverts refused as forged or malformed.
    pub rejected_messages: u64,
    /// Adverts ignored because their author sent too many.
    pub rate_limited: u64,
}

fn backend_names(bits: u8) -> Vec<String> {
    [
        (backend_bits::DOCKER, "docker"),
        (backend_bits::KVM, "kvm"),
        (backend_bits::TCG, "tcg"),
    ]
    .into_iter()
    .filter(|(b, _)| bits & b != 0)
    .map(|(_, n)| n.to_owned())
    .collect()
}

/// The live peers of `view` at `now` (expired ones left out) with their totals.
pub fn capacity(view: &SpaceView, ttl_s: u64, now: u64) -> (Vec<PeerCapacity>, SpaceTotals) {
    let mut peers: Vec<PeerCapacity> = view
        .peers()
        .filter(|p| now.saturating_sub(p.received_at) <= ttl_s)
        .map(|p| {
            let a = &p.advert;
            let age_s = now.saturating_sub(p.received_at);
            PeerCapacity {
                host: a.host.to_string(),
                free_cores: a.free_cores,
                free_memory_mib: a.free_memory_mib,
                free_disk_mib: a.free_disk_mib,
                backends: backend_names(a.backends),
                running: a
                    .running
                    .iter()
                    .map(|r| RunningType {
                        machine_type: r.machine_type.to_string(),
                        count: r.count,
                    })
                    .collect(),
                owner_present: a.owner_present,
                draining: a.draining,
                benchmark: a.benchmark,
                seq: a.seq,
                advert_at: a.at,
                age_s,
                expires_in_s: ttl_s.saturating_sub(age_s),
            }
        })
        .collect();
    peers.sort_by(|a, b| {
        b.free_cores
            .cmp(&a.free_cores)
            .then_with(|| a.host.cmp(&b.host))
    });
    let totals = SpaceTotals {
        peers: peers.len() as u64,
        free_cores: peers.iter().map(|p| u64::from(p.free_cores)).sum(),
        free_memory_mib: peers.iter().map(|p| u64::from(p.free_memory_mib)).sum(),
        running_machines: peers
            .iter()
            .flat_map(|p| &p.running)
            .map(|r| u64::from(r.count))
            .sum(),
        owner_present: peers.iter().filter(|p| p.owner_present).count() as u64,
        draining: peers.iter().filter(|p| p.draining).count() as u64,
    };
    (peers, totals)
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    gossipsub: gossipsub::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    kad: kad::Behaviour<kad::store::MemoryStore>,
}

/// A joined space.
pub struct Space {
    /// The latest snapshot, renewed every second.
    pub snapshots: watch::Receiver<SpaceSnapshot>,
    /// Where it listens (once bound), with the peer id, for others to bootstrap from.
    pub addrs: Vec<Multiaddr>,
    pub task: tokio::task::JoinHandle<()>,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn peer_of(a: &Multiaddr) -> Option<PeerId> {
    a.iter().find_map(|p| match p {
        Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

/// The gossipsub settings the client uses, so that message ids (the digest of the data), signing
/// and limits agree across the space; invalid adverts cost their sender as in the client.
fn gossipsub_behaviour(advert_topic: gossipsub::TopicHash) -> Result<gossipsub::Behaviour, String> {
    let gcfg = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(Duration::from_millis(500))
        .validation_mode(gossipsub::ValidationMode::None)
        .validate_messages()
        .max_transmit_size(MAX_MESSAGE)
        .message_id_fn(|m: &gossipsub::Message| {
            gossipsub::MessageId::from(gleaner::Digest::of(&m.data).0.to_vec())
        })
        .build()
        .map_err(|e| e.to_string())?;
    // As in the client: gossipsub signs nothing, the envelope's signature is the only one.
    let mut gs = gossipsub::Behaviour::new(MessageAuthenticity::Anonymous, gcfg)?;
    let mut params = gossipsub::PeerScoreParams {
        // Many factories share one address (NAT, loopback): no Sybil sign here.
        ip_colocation_factor_weight: 0.0,
        ..Default::default()
    };
    params.topics.insert(
        advert_topic,
        gossipsub::TopicScoreParams {
            topic_weight: 1.0,
            time_in_mesh_weight: 0.01,
            time_in_mesh_quantum: Duration::from_secs(1),
            time_in_mesh_cap: 3600.0,
            first_message_deliveries_weight: 0.5,
            first_message_deliveries_cap: 20.0,
            mesh_message_deliveries_weight: 0.0,
            mesh_failure_penalty_weight: 0.0,
            invalid_message_deliveries_weight: -30.0,
            invalid_message_deliveries_decay: 0.9,
            ..Default::default()
        },
    );
    gs.with_peer_score(params, gossipsub::PeerScoreThresholds::default())?;
    Ok(gs)
}

/// Joins the space with `key` as the libp2p identity and starts the event loop; returns once every
/// listener is bound.
pub async fn start(
    key: &SecretKey,
    cfg: SpaceConfig,
    cancel: CancellationToken,
) -> Result<Space, SpaceError> {
    let err = |e: &dyn std::fmt::Display| SpaceError::Setup(e.to_string());
    check_space_name(&cfg.space).map_err(SpaceError::Setup)?;
    let keypair = libp2p::identity::Keypair::ed25519_from_bytes(key.seed()).map_err(|e| err(&e))?;
    let topic = IdentTopic::new(format!("gleaner/{}/adverts", cfg.space));
    let kad_protocol = StreamProtocol::try_from_owned(format!("/gleaner/{}/kad/1", cfg.space))
        .map_err(|e| err(&e))?;
    let mdns_on = cfg.mdns;
    let topic_hash = topic.hash();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| err(&e))?
        .with_quic()
        .with_behaviour(|k| {
            let gossipsub = gossipsub_behaviour(topic_hash)?;
            let mdns = if mdns_on {
                Some(mdns::tokio::Behaviour::new(
                    mdns::Config::default(),
                    k.public().to_peer_id(),
                )?)
            } else {
                None
            };
            let id = k.public().to_peer_id();
            let mut kcfg = kad::Config::new(kad_protocol.clone());
            kcfg.set_periodic_bootstrap_interval(Some(Duration::from_secs(60)));
            let kad = kad::Behaviour::with_config(id, kad::store::MemoryStore::new(id), kcfg);
            Ok(Behaviour {
                gossipsub,
                identify: identify::Behaviour::new(identify::Config::new(
                    "/gleaner/1".into(),
                    k.public(),
                )),
                ping: ping::Behaviour::default(),
                mdns: Toggle::from(mdns),
                kad,
            })
        })
        .map_err(|e| err(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    // An observer looks peers up but answers no lookups: the factories keep the DHT.
    swarm.behaviour_mut().kad.set_mode(Some(kad::Mode::Client));
    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&topic)
        .map_err(|e| err(&e))?;
    for a in &cfg.listen {
        swarm
            .listen_on(a.clone())
            .map_err(|e| SpaceError::Setup(format!("listen on {a}: {e}")))?;
    }
    let mut addrs = Vec::new();
    while addrs.len() < cfg.listen.len() {
        match tokio::time::timeout(Duration::from_secs(10), swarm.select_next_some()).await {
            Ok(SwarmEvent::NewListenAddr { address, .. }) => addrs.push(address),
            Ok(_) => {}
            Err(_) => return Err(SpaceError::Setup("listening took too long".into())),
        }
    }
    for b in &cfg.bootstrap {
        if let Some(p) = peer_of(b) {
            swarm.behaviour_mut().kad.add_address(&p, b.clone());
        }
        if let Err(e) = swarm.dial(b.clone()) {
            tracing::warn!("space: dial {b}: {e}");
        }
    }
    let me = *swarm.local_peer_id();
    let addrs: Vec<Multiaddr> = addrs
        .into_iter()
        .map(|a| a.with(Protocol::P2p(me)))
        .collect();
    let node = Node {
        swarm,
        topic: topic.hash(),
        kad_protocol,
        space: cfg.space,
        listen: addrs.iter().map(|a| a.to_string()).collect(),
        bootstrap: cfg.bootstrap,
        ttl_s: cfg.advert_ttl_s,
        view: SpaceView::with_ttl(cfg.advert_ttl_s),
        buckets: HashMap::new(),
        rejected: 0,
        rate_limited: 0,
    };
    let (tx, snapshots) = watch::channel(node.snapshot());
    let task = tokio::spawn(node.run(tx, cancel));
    Ok(Space {
        snapshots,
        addrs,
        task,
    })
}

struct Node {
    swarm: libp2p::Swarm<Behaviour>,
    topic: gossipsub::TopicHash,
    kad_protocol: StreamProtocol,
    space: String,
    listen: Vec<String>,
    bootstrap: Vec<Multiaddr>,
    ttl_s: u64,
    view: SpaceView,
    /// Token bucket per author: (tokens, last refill in ms).
    /// Token bucket per author (the envelope's signer): (tokens, last refill in ms).
    buckets: HashMap<gleaner::PublicKey, (f64, u128)>,
    rejected: u64,
    rate_limited: u64,
}

enum Verdict {
    Accept,
    Ignore(String),
    Reject(String),
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

impl Node {
    async fn run(mut self, tx: watch::Sender<SpaceSnapshot>, cancel: CancellationToken) {
        let mut redial = tokio::time::interval(Duration::from_secs(2));
        redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lookup = tokio::time::interval(Duration::from_secs(10));
        lookup.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = redial.tick() => self.redial(),
                _ = tick.tick() => {
                    let now = now();
                    self.view.expire(now);
                    let ms = now_ms();
                    self.buckets.retain(|_, (_, last)| ms.saturating_sub(*last) < 60_000);
                    // Nobody reading is no reason to stop observing.
                    tx.send_replace(self.snapshot());
                }
                _ = lookup.tick() => {
                    if self.swarm.connected_peers().count() < TARGET_PEERS {
                        let _ = self.swarm.behaviour_mut().kad.bootstrap();
                    }
                }
                ev = self.swarm.select_next_some() => self.event(ev),
            }
        }
    }

    fn snapshot(&self) -> SpaceSnapshot {
        let now = now();
        let (peers, totals) = capacity(&self.view, self.ttl_s, now);
        SpaceSnapshot {
            space: self.space.clone(),
            peer_id: self.swarm.local_peer_id().to_string(),
            listen: self.listen.clone(),
            connected: self.swarm.connected_peers().count() as u64,
            advert_ttl_s: self.ttl_s,
            at: now,
            totals,
            peers,
            rejected_messages: self.rejected,
            rate_limited: self.rate_limited,
        }
    }

    /// A bootstrap peer may not be up yet, may restart, or may have been cut off: redial it.
    fn redial(&mut self) {
        let none = self.swarm.connected_peers().next().is_none();
        for b in self.bootstrap.clone() {
            let go = match peer_of(&b) {
                Some(p) => !self.swarm.is_connected(&p),
                None => none,
            };
            if go {
                let _ = self.swarm.dial(b);
            }
        }
    }

    fn event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            })) => {
                let acceptance = match self.validate(&message) {
                    Verdict::Accept => MessageAcceptance::Accept,
                    Verdict::Ignore(why) => {
                        tracing::debug!(
                            "space: ignored an advert from {propagation_source}: {why}"
                        );
                        MessageAcceptance::Ignore
                    }
                    Verdict::Reject(why) => {
                        self.rejected += 1;
                        tracing::info!(
                            "space: rejected an advert from {propagation_source}: {why}"
                        );
                        MessageAcceptance::Reject
                    }
                };
                self.swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, acceptance);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(list))) => {
                for (peer, addr) in list {
                    if !self.swarm.is_connected(&peer) {
                        let _ = self.swarm.dial(addr);
                    }
                }
            }
            // Factories that speak the space's DHT go into the routing table.
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) if info.protocols.contains(&self.kad_protocol) => {
                for a in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, a);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer,
                addresses,
                ..
            })) if !self.swarm.is_connected(&peer)
                && self.swarm.connected_peers().count() < TARGET_PEERS =>
            {
                let opts = DialOpts::peer_id(peer)
                    .addresses(addresses.into_vec())
                    .build();
                let _ = self.swarm.dial(opts);
            }
            SwarmEvent::ConnectionEstablished { peer_id, .. }
                if self.bootstrap.iter().any(|b| peer_of(b) == Some(peer_id)) =>
            {
                let _ = self.swarm.behaviour_mut().kad.bootstrap();
            }
            _ => {}
        }
    }

    /// Takes a token from `author`'s bucket; false when it has sent too much.
    /// Whether `author` has a token left (refilled, not taken).
    fn rate_ok(&mut self, author: gleaner::PublicKey) -> bool {
        let ms = now_ms();
        let (tokens, last) = self.buckets.entry(author).or_insert((RATE_BURST, ms));
        *tokens = (*tokens + ms.saturating_sub(*last) as f64 / 1000.0 * RATE_PER_S).min(RATE_BURST);
        *last = ms;
        *tokens >= 1.0
    }

    /// Takes a token once `author`'s advert verified and was news, so that forgeries in an honest
    /// host's name cannot use up its allowance.
    fn rate_take(&mut self, author: gleaner::PublicKey) {
        if let Some((tokens, _)) = self.buckets.get_mut(&author) {
            *tokens = (*tokens - 1.0).max(0.0);
        }
    }

    /// The client's checks for an advert, cheapest first; good ones go into the view.
    fn validate(&mut self, m: &gossipsub::Message) -> Verdict {
        if m.topic != self.topic {
            return Verdict::Reject("not the advert topic".into());
        }
        if m.data.len() > MAX_ADVERT {
            return Verdict::Reject(format!("{} bytes, at most {MAX_ADVERT}", m.data.len()));
        }
        let env = match Envelope::from_bytes(&m.data) {
            Ok(e) => e,
            Err(e) => return Verdict::Reject(e.to_string()),
        };
        if env.kind().ok() != Some(Kind::CapacityAdvert) {
            return Verdict::Reject("wrong message kind for the advert topic".into());
        }
        // Gossipsub carries no author (anonymous, as in the client): the envelope's signer is.
        let author = match env.signer() {
            Ok(k) => k,
            Err(e) => return Verdict::Reject(e.to_string()),
        };
        if !self.rate_ok(author) {
            self.rate_limited += 1;
            return Verdict::Ignore(format!("{author} sends too many adverts"));
        }
        let v = match env.open::<CapacityAdvert>() {
            Ok(v) => v,
            Err(e) => return Verdict::Reject(e.to_string()),
        };
        // Stale or replayed adverts may come from honest relays: ignored, not penalised.
        match self.view.insert(v.message, now()) {
            Ok(()) => {
                self.rate_take(author);
                Verdict::Accept
            }
            Err(e) => Verdict::Ignore(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gleaner::advert::Running;
    use gleaner::{Digest, SecretKey};

    fn advert(seed: u8, at: u64, free: u16, running: u16, owner: bool) -> CapacityAdvert {
        CapacityAdvert {
            v: 1,
            host: SecretKey::from_seed([seed; 32]).public(),
            seq: 1,
            at,
            free_cores: free,
            free_memory_mib: 512 * u32::from(free),
            free_disk_mib: 0,
            backends: backend_bits::DOCKER | backend_bits::TCG,
            running: vec![Running {
                machine_type: Digest([3; 32]),
                count: running,
            }],
            owner_present: owner,
            draining: false,
            benchmark: 1000,
        }
    }

    #[test]
    fn capacity_sums_live_peers_and_leaves_out_expired_ones() {
        let mut v = SpaceView::with_ttl(10);
        v.insert(advert(1, 1000, 2, 1, false), 1000).unwrap();
        v.insert(advert(2, 1005, 4, 2, true), 1005).unwrap();
        let (peers, totals) = capacity(&v, 10, 1008);
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].free_cores, 4, "most free cores first");
        assert_eq!(peers[0].backends, ["docker", "tcg"]);
        assert_eq!((peers[0].age_s, peers[0].expires_in_s), (3, 7));
        assert_eq!(
            totals,
            SpaceTotals {
                peers: 2,
                free_cores: 6,
                free_memory_mib: 3072,
                running_machines: 3,
                owner_present: 1,
                draining: 0,
            }
        );
        // Host 1's advert is 11 s old: gone even before the view's own expiry runs.
        let (peers, totals) = capacity(&v, 10, 1011);
        assert_eq!(peers.len(), 1);
        assert_eq!(totals.free_cores, 4);
    }

    #[test]
    fn space_names() {
        assert!(check_space_name("demo").is_ok());
        for bad in ["", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_space_name(bad).is_err(), "{bad:?}");
        }
    }
}
