//! The space over libp2p: one `Swarm` owned by an event loop, reached through a cloneable
//! [`SpaceHandle`] with a bounded command channel. Factories gossip signed capacity adverts and
//! outcome reports on per-space gossipsub topics; every message is validated by hand (envelope
//! signature, kind for the topic, signer = gossip author, freshness, replay) before it is accepted
//! and forwarded, and rejected ones count against their sender's peer score.

use std::time::Duration;

use futures_util::StreamExt;
use gleaner::advert::{CapacityAdvert, OutcomeReport};
use gleaner::space::SpaceView;
use gleaner::{Envelope, Kind, SecretKey};
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, MessageAuthenticity};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent, behaviour::toggle::Toggle};
use libp2p::{Multiaddr, PeerId, identify, mdns, noise, ping, tcp, yamux};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Largest gossiped message.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Settings of one node.
#[derive(Debug, Clone, PartialEq)]
pub struct SpaceConfig {
    pub space: String,
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start (a wide-area space's bootstrap nodes).
    pub bootstrap: Vec<Multiaddr>,
    /// Discover peers on the LAN by mDNS.
    pub mdns: bool,
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    gossipsub: gossipsub::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
}

/// Why the space could not start or be reached.
#[derive(Debug, thiserror::Error)]
pub enum SpaceError {
    #[error("space setup: {0}")]
    Setup(String),
    #[error("the space event loop has stopped")]
    Gone,
}

/// What the view looks like, for `gleaner space` and status.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SpaceSummary {
    pub space: String,
    pub peer_id: String,
    pub listen: Vec<String>,
    pub connected: usize,
    pub peers: Vec<PeerSummary>,
    pub rejected_messages: u64,
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

enum Command {
    Publish(Envelope),
    Summary(oneshot::Sender<SpaceSummary>),
    View(oneshot::Sender<SpaceView>),
    Dial(Multiaddr),
}

/// A cloneable handle to the space's event loop.
#[derive(Clone)]
pub struct SpaceHandle {
    tx: mpsc::Sender<Command>,
}

impl SpaceHandle {
    /// Publishes a signed advert or outcome on its topic (dropped if the loop is busy).
    pub fn publish(&self, env: Envelope) -> Result<(), SpaceError> {
        self.tx
            .try_send(Command::Publish(env))
            .map_err(|_| SpaceError::Gone)
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
}

fn topics(space: &str) -> (IdentTopic, IdentTopic) {
    (
        IdentTopic::new(format!("gleaner/{space}/adverts")),
        IdentTopic::new(format!("gleaner/{space}/outcomes")),
    )
}

fn now() -> u64 {
    crate::factory::now_ms() / 1000
}

/// Starts a node with the host key as its libp2p identity; returns its handle and the addresses
/// it listens on (once bound).
pub async fn start(
    key: &SecretKey,
    cfg: SpaceConfig,
    cancel: CancellationToken,
) -> Result<(SpaceHandle, Vec<Multiaddr>, tokio::task::JoinHandle<()>), SpaceError> {
    let err = |e: &dyn std::fmt::Display| SpaceError::Setup(e.to_string());
    let keypair = libp2p::identity::Keypair::ed25519_from_bytes(key.seed()).map_err(|e| err(&e))?;
    let (adverts, outcomes) = topics(&cfg.space);
    let mdns_on = cfg.mdns;
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
            let gcfg = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_millis(500))
                .validation_mode(gossipsub::ValidationMode::Strict)
                .validate_messages()
                .max_transmit_size(MAX_MESSAGE)
                .message_id_fn(|m: &gossipsub::Message| {
                    gossipsub::MessageId::from(gleaner::Digest::of(&m.data).0.to_vec())
                })
                .build()
                .map_err(|e| e.to_string())?;
            let mut gs = gossipsub::Behaviour::new(MessageAuthenticity::Signed(k.clone()), gcfg)?;
            // Invalid messages cost their sender heavily; below the graylist threshold a peer
            // is ignored and pruned.
            let mut params = gossipsub::PeerScoreParams::default();
            for t in [&adverts, &outcomes] {
                params.topics.insert(
                    t.hash(),
                    gossipsub::TopicScoreParams {
                        invalid_message_deliveries_weight: -100.0,
                        invalid_message_deliveries_decay: 0.9,
                        ..Default::default()
                    },
                );
            }
            gs.with_peer_score(params, gossipsub::PeerScoreThresholds::default())?;
            let mdns = if mdns_on {
                Some(mdns::tokio::Behaviour::new(
                    mdns::Config::default(),
                    k.public().to_peer_id(),
                )?)
            } else {
                None
            };
            Ok(Behaviour {
                gossipsub: gs,
                identify: identify::Behaviour::new(identify::Config::new(
                    "/gleaner/1".into(),
                    k.public(),
                )),
                ping: ping::Behaviour::default(),
                mdns: Toggle::from(mdns),
            })
        })
        .map_err(|e| err(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    for t in [&adverts, &outcomes] {
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(t)
            .map_err(|e| err(&e))?;
    }
    for a in &cfg.listen {
        swarm.listen_on(a.clone()).map_err(|e| err(&e))?;
    }
    // Wait until every listener is bound so callers learn the real ports.
    let mut addrs = Vec::new();
    while addrs.len() < cfg.listen.len() {
        match tokio::time::timeout(Duration::from_secs(10), swarm.select_next_some()).await {
            Ok(SwarmEvent::NewListenAddr { address, .. }) => addrs.push(address),
            Ok(_) => {}
            Err(_) => return Err(SpaceError::Setup("listening took too long".into())),
        }
    }
    for b in &cfg.bootstrap {
        if let Err(e) = swarm.dial(b.clone()) {
            tracing::warn!("dial {b}: {e}");
        }
    }
    let (tx, rx) = mpsc::channel(256);
    let listen = addrs.clone();
    let task = tokio::spawn(event_loop(
        swarm,
        rx,
        cfg.space,
        listen,
        cfg.bootstrap,
        cancel,
    ));
    Ok((SpaceHandle { tx }, addrs, task))
}

async fn event_loop(
    mut swarm: libp2p::Swarm<Behaviour>,
    mut rx: mpsc::Receiver<Command>,
    space: String,
    listen: Vec<Multiaddr>,
    bootstrap: Vec<Multiaddr>,
    cancel: CancellationToken,
) {
    let (adverts, outcomes) = topics(&space);
    // A bootstrap peer may not be up yet (or may restart): keep dialing while we know nobody.
    let mut redial = tokio::time::interval(Duration::from_secs(2));
    redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut view = SpaceView::default();
    let mut rejected = 0u64;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = redial.tick() => {
                if swarm.connected_peers().next().is_none() {
                    for b in &bootstrap {
                        let _ = swarm.dial(b.clone());
                    }
                }
            }
            cmd = rx.recv() => match cmd {
                None => return,
                Some(Command::Publish(env)) => {
                    let topic = match env.kind() {
                        Ok(Kind::CapacityAdvert) => &adverts,
                        Ok(Kind::Outcome) => &outcomes,
                        _ => continue,
                    };
                    // Our own messages go into our own view as well.
                    accept(&mut view, &env, now());
                    if let Err(e) = swarm.behaviour_mut().gossipsub.publish(topic.clone(), env.to_bytes()) {
                        tracing::debug!("publish: {e}");
                    }
                }
                Some(Command::Summary(reply)) => {
                    view.expire(now());
                    let peers = view
                        .peers()
                        .map(|p| PeerSummary {
                            host: p.advert.host.to_string(),
                            free_cores: p.advert.free_cores,
                            free_memory_mib: p.advert.free_memory_mib,
                            running: p.advert.running.iter().map(|r| (r.machine_type.to_string(), r.count)).collect(),
                            owner_present: p.advert.owner_present,
                            draining: p.advert.draining,
                            seq: p.advert.seq,
                        })
                        .collect();
                    let _ = reply.send(SpaceSummary {
                        space: space.clone(),
                        peer_id: swarm.local_peer_id().to_string(),
                        listen: listen.iter().map(|a| a.to_string()).collect(),
                        connected: swarm.connected_peers().count(),
                        peers,
                        rejected_messages: rejected,
                    });
                }
                Some(Command::View(reply)) => {
                    view.expire(now());
                    let _ = reply.send(view.clone());
                }
                Some(Command::Dial(a)) => {
                    if let Err(e) = swarm.dial(a.clone()) {
                        tracing::warn!("dial {a}: {e}");
                    }
                }
            },
            ev = swarm.select_next_some() => match ev {
                SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message { propagation_source, message_id, message })) => {
                    let verdict = validate(&message, &adverts, &outcomes, &mut view);
                    if let Err(reason) = &verdict {
                        rejected += 1;
                        tracing::info!("rejected a message from {propagation_source}: {reason}");
                    }
                    let acceptance = if verdict.is_ok() { MessageAcceptance::Accept } else { MessageAcceptance::Reject };
                    swarm.behaviour_mut().gossipsub.report_message_validation_result(&message_id, &propagation_source, acceptance);
                }
                SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(list))) => {
                    for (peer, addr) in list {
                        if !swarm.is_connected(&peer) {
                            let _ = swarm.dial(addr);
                        }
                    }
                }
                _ => {}
            },
        }
    }
}

/// Checks a gossiped message and, if good, takes it into the view.
fn validate(
    m: &gossipsub::Message,
    adverts: &IdentTopic,
    outcomes: &IdentTopic,
    view: &mut SpaceView,
) -> Result<(), String> {
    if m.data.len() > MAX_MESSAGE {
        return Err("too large".into());
    }
    let env = Envelope::from_bytes(&m.data).map_err(|e| e.to_string())?;
    let author: Option<PeerId> = m.source;
    let now = now();
    if m.topic == adverts.hash() {
        let v = env.open::<CapacityAdvert>().map_err(|e| e.to_string())?;
        if author.map(|a| a.to_string()) != Some(v.signer.to_string()) {
            return Err("advert relayed under another author".into());
        }
        view.insert(v.message, now).map_err(|e| e.to_string())
    } else if m.topic == outcomes.hash() {
        let v = env.open::<OutcomeReport>().map_err(|e| e.to_string())?;
        if author.map(|a| a.to_string()) != Some(v.signer.to_string()) {
            return Err("outcome relayed under another author".into());
        }
        view.outcome(&v.message, now).map_err(|e| e.to_string())
    } else {
        Err("unknown topic".into())
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
    }
}
