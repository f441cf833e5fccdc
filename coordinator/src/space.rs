//! The coordinator as an observer in a space: a small libp2p node (transport, advert relay, ids and
//! discovery from `gleaner-space`, as the client's, so it interoperates) that takes only the
//! space's capacity adverts, from the relay links it opens to a few factories, validates each
//! with the client's checks (size, kind, per-author rate keyed by the envelope's signer,
//! signature, schema, freshness, replay) and keeps the core's `SpaceView` with expiry. It
//! publishes nothing of its own (as a relay node it forwards what it took, like any other). One
//! event loop owns the Swarm and hands out a [`SpaceSnapshot`] through a `watch` channel (one
//! value, so bounded) every second.

use std::time::Duration;

use gleaner::SecretKey;
use gleaner::advert::backend_bits;
use gleaner::space::SpaceView;
use gleaner_space::relay::AdvertRelay;
use gleaner_space::{AdvertGate, LinkEvent, Quiet, SpaceBehaviour, WhenWoken, discovery, tuning};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent, behaviour::toggle::Toggle};
use libp2p::{Multiaddr, StreamProtocol, identify, kad, mdns, ping};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use gleaner_space::{MAX_ADVERT, MAX_MESSAGE, SPACE_NAME_MAX, check_space_name};

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
    stream: gleaner_space::StreamBehaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    kad: kad::Behaviour<kad::store::MemoryStore>,
}

impl SpaceBehaviour for Behaviour {
    fn kad(&mut self) -> &mut kad::Behaviour<kad::store::MemoryStore> {
        &mut self.kad
    }
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

/// Joins the space with `key` as the libp2p identity and starts the event loop; returns once every
/// listener is bound.
pub async fn start(
    key: &SecretKey,
    cfg: SpaceConfig,
    cancel: CancellationToken,
) -> Result<Space, SpaceError> {
    check_space_name(&cfg.space).map_err(SpaceError::Setup)?;
    let keypair = gleaner_space::keypair(key).map_err(SpaceError::Setup)?;
    // Only adverts (the relay): an observer has no use for outcomes, types or trust messages, so
    // no gossipsub.
    let kad_protocol = gleaner_space::kad_protocol(&cfg.space).map_err(SpaceError::Setup)?;
    let mdns_on = cfg.mdns;
    let kad_proto = kad_protocol.clone();
    let mut swarm = gleaner_space::build_swarm(keypair.clone(), |k| {
        Ok(Behaviour {
            stream: gleaner_space::StreamBehaviour::new(),
            identify: gleaner_space::swarm::identify_behaviour(k),
            ping: gleaner_space::swarm::ping_behaviour(),
            mdns: gleaner_space::swarm::mdns_behaviour(mdns_on, k)?,
            kad: gleaner_space::swarm::kad_behaviour(k.public().to_peer_id(), kad_proto),
        })
    })
    .map_err(SpaceError::Setup)?;
    // An observer looks peers up but answers no lookups: the factories keep the DHT.
    swarm.behaviour_mut().kad.set_mode(Some(kad::Mode::Client));
    let direct = gleaner_space::direct::DirectConfig::for_swarm(&keypair, &cfg.listen);
    let relay = AdvertRelay::new(
        swarm.behaviour().stream.new_control(),
        *swarm.local_peer_id(),
        direct,
    )
    .map_err(SpaceError::Setup)?;
    let addrs = discovery::listen(&mut swarm, &cfg.listen, |_, _| {})
        .await
        .map_err(SpaceError::Setup)?;
    discovery::dial_bootstrap(&mut swarm, &cfg.bootstrap);
    let me = *swarm.local_peer_id();
    let addrs: Vec<Multiaddr> = addrs
        .into_iter()
        .map(|a| a.with(Protocol::P2p(me)))
        .collect();
    let node = Node {
        swarm,
        swarm_due: WhenWoken::new(),
        relay,
        kad_protocol,
        space: cfg.space,
        listen: addrs.iter().map(|a| a.to_string()).collect(),
        bootstrap: cfg.bootstrap,
        ttl_s: cfg.advert_ttl_s,
        view: SpaceView::with_ttl(cfg.advert_ttl_s),
        gate: AdvertGate::default(),
        rejected: 0,
        walks: discovery::Walks::default(),
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
    swarm: libp2p::Swarm<Quiet<Behaviour>>,
    /// Polled only when it woke the loop or the loop changed it ([`WhenWoken`]).
    swarm_due: WhenWoken,
    relay: AdvertRelay,
    kad_protocol: StreamProtocol,
    space: String,
    listen: Vec<String>,
    bootstrap: Vec<Multiaddr>,
    ttl_s: u64,
    view: SpaceView,
    /// The client's checks on adverts, with their per-author rates.
    gate: AdvertGate,
    rejected: u64,
    /// When to walk the DHT next.
    walks: discovery::Walks,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Node {
    async fn run(mut self, tx: watch::Sender<SpaceSnapshot>, cancel: CancellationToken) {
        let mut redial = tokio::time::interval(tuning::REDIAL_INTERVAL);
        redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lookup = tokio::time::interval(tuning::LOOKUP_INTERVAL);
        lookup.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut flush = tokio::time::interval(tuning::RELAY_FLUSH);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Made once, as in the client's node loop: not a waiter put on the token's list and
        // taken off again at every wake.
        let cancelled = cancel.cancelled();
        tokio::pin!(cancelled);
        loop {
            let queued = self.relay.queued();
            // Each branch says whether it may have queued swarm work (a dial, a walk, a relay
            // link opened): such work wakes no one, so the swarm is then marked due. The relay's
            // frames and flushes do not touch the swarm.
            let touched = tokio::select! {
                _ = &mut cancelled => return,
                _ = redial.tick() => discovery::redial(&mut self.swarm, &self.bootstrap, |_| false),
                _ = tick.tick() => {
                    let now = now();
                    self.view.expire(now);
                    let ms = now_ms();
                    self.gate.rates.forget_idle(ms);
                    self.relay.maintain(self.swarm.connected_peers().copied(), |_| false, ms);
                    // Nobody reading is no reason to stop observing.
                    tx.send_replace(self.snapshot());
                    true
                }
                _ = lookup.tick() => discovery::lookup(
                    &mut self.swarm,
                    tuning::TARGET_PEERS,
                    &mut self.walks,
                    now_ms(),
                ),
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
            rate_limited: self.gate.rate_limited,
        }
    }

    fn event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(e)) => {
                discovery::on_mdns(&mut self.swarm, e)
            }
            // Factories that speak the space's DHT go into the routing table.
            SwarmEvent::Behaviour(BehaviourEvent::Identify(e)) => {
                discovery::on_identify(&mut self.swarm, e, &self.kad_protocol)
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => {
                discovery::on_kad(&mut self.swarm, e, tuning::TARGET_PEERS, |_| false)
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                self.relay
                    .connection(peer_id, Some(endpoint.get_remote_address()));
                discovery::on_connected(&mut self.swarm, peer_id, &self.bootstrap)
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => self.relay.connection(peer_id, None),
            _ => {}
        }
    }

    /// A relay link came, went or brought adverts.
    fn link_event(&mut self, ev: LinkEvent) {
        let out = self
            .relay
            .handle(ev, &mut self.gate, &mut self.view, now(), now_ms());
        self.relayed(out);
    }

    /// The relay's flush: the news of every link checked with the client's checks (cheapest
    /// first, one batch signature check), good ones into the view, frames sent.
    fn flush_relay(&mut self) {
        let out = self
            .relay
            .flush(&mut self.gate, &mut self.view, now(), now_ms());
        self.relayed(out);
    }

    /// The observer bans nobody (a factory's node does): it counts what it rejected.
    fn relayed(&mut self, out: gleaner_space::relay::Outcome) {
        for (peer, why) in out.rejected {
            self.rejected += 1;
            tracing::info!("space: rejected a relayed advert from {peer}: {why}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gleaner::advert::{CapacityAdvert, Running};
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
            chain: gleaner::Digest::default(),
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
}
