//! The transport and behaviours of a space node: the host key as the libp2p identity, QUIC and
//! TCP (noise, yamux; kernel keepalive; TCP bytes counted for the benchmark), anonymous gossipsub
//! with the space's peer scoring, Kademlia, identify and mDNS.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use gleaner::SecretKey;
use libp2p::core::{Transport, upgrade::Version};
use libp2p::futures::io::{AsyncRead, AsyncWrite};
use libp2p::gossipsub::{self, MessageAuthenticity};
use libp2p::identity::Keypair;
use libp2p::swarm::{ConnectionHandler, NetworkBehaviour, THandler, behaviour::toggle::Toggle};
use libp2p::{PeerId, StreamProtocol, Swarm, identify, kad, mdns, noise, ping, tcp, yamux};

use crate::quiet::Quiet;
use crate::tuning;

/// The libp2p identity of a host key (the same ed25519 key, so its peer id is the host's id).
pub fn keypair(key: &SecretKey) -> Result<Keypair, String> {
    Keypair::ed25519_from_bytes(key.seed()).map_err(|e| format!("host key as libp2p identity: {e}"))
}

// ---- transport byte counters (for the benchmark) ----

static BYTES_IN: AtomicU64 = AtomicU64::new(0);
static BYTES_OUT: AtomicU64 = AtomicU64::new(0);

/// Bytes read and written on TCP connections by every node in this process, before noise and
/// yamux are taken off (what the wire carries, minus TCP/IP headers).
pub fn transport_bytes() -> (u64, u64) {
    (
        BYTES_IN.load(Ordering::Relaxed),
        BYTES_OUT.load(Ordering::Relaxed),
    )
}

/// A TCP stream that counts its bytes.
pub(crate) struct Metered<S>(pub(crate) S);

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.0).poll_read(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            BYTES_IN.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.0).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            BYTES_OUT.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_close(cx)
    }
}

// ---- liveness ----

/// Has the kernel find a TCP peer that vanished without closing (switched off, suspended,
/// unplugged): keepalive probes after [`tuning::TCP_KEEPALIVE_IDLE`] of silence, and the
/// connection aborted once sent data or probes go unacknowledged for
/// [`tuning::TCP_USER_TIMEOUT`]. The swarm then reports it closed, and the relay link on it goes
/// down. libp2p ping only reports a failed ping (libp2p-ping 0.48 leaves closing to its user);
/// QUIC has its own keep-alive and idle timeout. A socket that refuses the options keeps its
/// connection, without them.
pub(crate) fn keep_alive(s: &tokio::net::TcpStream) {
    let sock = socket2::SockRef::from(s);
    let probes = socket2::TcpKeepalive::new()
        .with_time(tuning::TCP_KEEPALIVE_IDLE)
        .with_interval(tuning::TCP_KEEPALIVE_INTERVAL);
    if let Err(e) = sock
        .set_tcp_keepalive(&probes)
        .and_then(|()| sock.set_tcp_user_timeout(Some(tuning::TCP_USER_TIMEOUT)))
    {
        tracing::debug!("TCP keepalive not set: {e}");
    }
}

// ---- swarm ----

/// A swarm on QUIC and metered TCP (noise, yamux) with the node's own behaviour, made by
/// `behaviour` from the identity; its connections poll the behaviour's handlers only when they
/// have work ([`Quiet`]).
pub fn build_swarm<B>(
    keypair: Keypair,
    behaviour: impl FnOnce(&Keypair) -> Result<B, Box<dyn std::error::Error + Send + Sync>>,
) -> Result<Swarm<Quiet<B>>, String>
where
    B: NetworkBehaviour,
    <THandler<B> as ConnectionHandler>::InboundOpenInfo: Clone,
{
    build_swarm_with(keypair, tuning::IDLE_CONNECTION_TIMEOUT, behaviour)
}

/// As [`build_swarm`], closing connections nobody needs after `idle` instead of
/// [`tuning::IDLE_CONNECTION_TIMEOUT`] (tests shorten it to see what stays).
pub fn build_swarm_with<B>(
    keypair: Keypair,
    idle: Duration,
    behaviour: impl FnOnce(&Keypair) -> Result<B, Box<dyn std::error::Error + Send + Sync>>,
) -> Result<Swarm<Quiet<B>>, String>
where
    B: NetworkBehaviour,
    <THandler<B> as ConnectionHandler>::InboundOpenInfo: Clone,
{
    Ok(libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_quic()
        .with_other_transport(|k| {
            let noise = noise::Config::new(k)
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
            Ok(tcp::tokio::Transport::new(tcp::Config::default())
                .map(|s, _| {
                    keep_alive(&s.0);
                    Metered(s)
                })
                .upgrade(Version::V1)
                .authenticate(noise)
                .multiplex(yamux::Config::default()))
        })
        .map_err(|e| format!("tcp transport: {e}"))?
        .with_behaviour(|k| behaviour(k).map(Quiet::new))
        .map_err(|e| format!("behaviour: {e}"))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
        .build())
}

/// Gossipsub's settings as every node of the space runs them (for outcomes, machine-type
/// announcements and trust messages; adverts travel on the relay, [`crate::relay`]).
///
/// No gossipsub signatures: each message is an envelope its author signed, checked by hand
/// before it is accepted; a second signature per message doubled the CPU per advert. Author,
/// seqno and signature fields a peer may still send are not trusted, only ignored. The message id
/// is the SHA-256 of the bytes, so that every node names a message alike. Messages stay
/// unforwarded until the node reports its verdict.
///
/// One protocol id, meshsub 1.1, which every gossipsub since 2020 speaks. libp2p-gossipsub offers
/// four by default (1.3, 1.2, 1.1, 1.0), and libp2p-swarm rebuilds each connection's set of local
/// protocols on every poll (rust-libp2p#4284), once per relay frame on each side: at 100 nodes
/// that work was 6.3 % of a node's CPU with the four, 5.6 % with one (within the profile's
/// noise; docs/BENCHMARKS.md). What 1.2 adds, IDONTWANT, acts only on messages over 1 kB that a
/// node already holds; the space's gossip is a few small, rare messages.
pub fn gossipsub_config(duplicate_cache: Duration) -> Result<gossipsub::Config, String> {
    gossipsub::ConfigBuilder::default()
        .protocol_id(crate::GOSSIPSUB_PROTOCOL, gossipsub::Version::V1_1)
        .heartbeat_interval(tuning::HEARTBEAT)
        .mesh_n(tuning::MESH_N)
        .mesh_n_low(tuning::MESH_N_LOW)
        .mesh_n_high(tuning::MESH_N_HIGH)
        .flood_publish(tuning::FLOOD_PUBLISH)
        .history_gossip(tuning::HISTORY_GOSSIP)
        .gossip_lazy(tuning::GOSSIP_LAZY)
        .gossip_factor(tuning::GOSSIP_FACTOR)
        .validation_mode(gossipsub::ValidationMode::None)
        .validate_messages()
        .max_transmit_size(crate::MAX_MESSAGE)
        .duplicate_cache_time(duplicate_cache)
        .message_id_fn(message_id)
        .build()
        .map_err(|e| format!("gossipsub config: {e}"))
}

/// Gossipsub as every node of the space runs it ([`gossipsub_config`]), scoring the `topics`
/// given: invalid messages cost their sender.
pub fn gossipsub_behaviour(
    topics: impl IntoIterator<Item = gossipsub::TopicHash>,
    duplicate_cache: Duration,
) -> Result<gossipsub::Behaviour, String> {
    let gcfg = gossipsub_config(duplicate_cache)?;
    let mut gs = gossipsub::Behaviour::new(MessageAuthenticity::Anonymous, gcfg)
        .map_err(|e| format!("gossipsub: {e}"))?;
    // Gossipsub's default decays are per 1 s decay: the same per second on ours.
    let (defaults, topic_defaults) = (
        gossipsub::PeerScoreParams::default(),
        gossipsub::TopicScoreParams::default(),
    );
    let per_s = |per_default_tick: f64| {
        tuning::decay_per_tick(per_default_tick.powf(1.0 / defaults.decay_interval.as_secs_f64()))
    };
    let mut params = gossipsub::PeerScoreParams {
        ip_colocation_factor_weight: tuning::IP_COLOCATION_FACTOR_WEIGHT,
        app_specific_weight: tuning::APP_SPECIFIC_WEIGHT,
        decay_interval: tuning::SCORE_DECAY_INTERVAL,
        behaviour_penalty_decay: per_s(defaults.behaviour_penalty_decay),
        slow_peer_decay: per_s(defaults.slow_peer_decay),
        ..Default::default()
    };
    for h in topics {
        params.topics.insert(
            h,
            gossipsub::TopicScoreParams {
                topic_weight: 1.0,
                time_in_mesh_weight: tuning::TIME_IN_MESH_WEIGHT,
                time_in_mesh_quantum: tuning::TIME_IN_MESH_QUANTUM,
                time_in_mesh_cap: tuning::TIME_IN_MESH_CAP,
                first_message_deliveries_weight: tuning::FIRST_MESSAGE_DELIVERIES_WEIGHT,
                first_message_deliveries_cap: tuning::FIRST_MESSAGE_DELIVERIES_CAP,
                mesh_message_deliveries_weight: tuning::MESH_MESSAGE_DELIVERIES_WEIGHT,
                mesh_failure_penalty_weight: tuning::MESH_FAILURE_PENALTY_WEIGHT,
                invalid_message_deliveries_weight: tuning::INVALID_MESSAGE_DELIVERIES_WEIGHT,
                invalid_message_deliveries_decay: tuning::decay_per_tick(
                    tuning::INVALID_MESSAGE_DELIVERIES_DECAY_PER_S,
                ),
                first_message_deliveries_decay: per_s(
                    topic_defaults.first_message_deliveries_decay,
                ),
                mesh_message_deliveries_decay: per_s(topic_defaults.mesh_message_deliveries_decay),
                mesh_failure_penalty_decay: per_s(topic_defaults.mesh_failure_penalty_decay),
                ..Default::default()
            },
        );
    }
    gs.with_peer_score(params, gossipsub::PeerScoreThresholds::default())
        .map_err(|e| format!("gossipsub peer score: {e}"))?;
    Ok(gs)
}

/// A gossiped message's id: the SHA-256 of its bytes.
pub fn message_id(m: &gossipsub::Message) -> gossipsub::MessageId {
    gossipsub::MessageId::from(gleaner::Digest::of(&m.data).0.to_vec())
}

/// Kademlia on the space's own protocol, walking only when the node asks
/// ([`crate::discovery::lookup`]: while it has fewer than [`tuning::TARGET_PEERS`] connections).
///
/// Kademlia's own periodic bootstrap is off. It walked every 5 min from each node's last walk, so
/// a space started together walked together: in a 100-node space each node then opened ~90
/// connections in a minute for its queries (noise handshakes, identify; trimmed as surplus later),
/// an idle space spent 2.5 ms/s per node instead of 0.3–0.6, and probes came 1.5–1.7 s late
/// (docs/BENCHMARKS.md). A walk is not cheap for the peers asked either: libp2p-kad 0.49 answers
/// each FIND_NODE by visiting k-buckets one by one, copying a 20-entry buffer per bucket. The
/// routing table is still fed by identify on every connection ([`crate::discovery::on_identify`]).
pub fn kad_behaviour(
    id: PeerId,
    protocol: StreamProtocol,
) -> kad::Behaviour<kad::store::MemoryStore> {
    let mut kcfg = kad::Config::new(protocol);
    kcfg.set_periodic_bootstrap_interval(None);
    // Peers enter the routing table only through `discovery` (bootstrap addresses, identify),
    // which skips a new peer whose bucket is full. Left to itself, Kademlia answers a new peer in
    // a full bucket by dialling the bucket's oldest disconnected entry to see if it lives: with
    // connections trimmed (`crate::trim`), each peer that came by redialled one that was just
    // closed, and a 100-node space churned through thousands of connections a minute.
    kcfg.set_kbucket_inserts(kad::BucketInserts::Manual);
    kad::Behaviour::with_config(id, kad::store::MemoryStore::new(id), kcfg)
}

/// libp2p ping as every node of the space runs it ([`tuning::PING_INTERVAL`]). It answers its
/// peers and measures round trips; it does not close a connection whose pings fail (libp2p-ping
/// 0.48 leaves that to its user): [`keep_alive`] and QUIC's own keep-alive find dead peers.
pub fn ping_behaviour() -> ping::Behaviour {
    ping::Behaviour::new(ping::Config::new().with_interval(tuning::PING_INTERVAL))
}

/// Identify, announcing [`crate::IDENTIFY_PROTOCOL`]: on every new connection, to every peer
/// when this node's listen addresses change, and again every [`tuning::IDENTIFY_INTERVAL`].
pub fn identify_behaviour(k: &Keypair) -> identify::Behaviour {
    identify::Behaviour::new(
        identify::Config::new(crate::IDENTIFY_PROTOCOL.into(), k.public())
            .with_interval(tuning::IDENTIFY_INTERVAL)
            .with_push_listen_addr_updates(true),
    )
}

/// mDNS on the LAN when `on`, off otherwise.
pub fn mdns_behaviour(on: bool, k: &Keypair) -> std::io::Result<Toggle<mdns::tokio::Behaviour>> {
    let mdns = if on {
        Some(mdns::tokio::Behaviour::new(
            mdns::Config {
                query_interval: crate::tuning::MDNS_QUERY_INTERVAL,
                ..mdns::Config::default()
            },
            k.public().to_peer_id(),
        )?)
    } else {
        None
    };
    Ok(Toggle::from(mdns))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gossipsub connection handler listens on the one protocol id, so that the protocol set
    /// libp2p-swarm rebuilds on every poll stays short.
    #[test]
    fn gossipsub_listens_on_one_protocol() {
        use libp2p::core::upgrade::UpgradeInfo;
        use libp2p::swarm::{ConnectionHandler, ConnectionId};
        let mut gs = gossipsub_behaviour([], Duration::from_secs(60)).unwrap();
        let peer = keypair(&SecretKey::from_seed([3; 32]))
            .unwrap()
            .public()
            .to_peer_id();
        let addr: libp2p::Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        let handler = gs
            .handle_established_inbound_connection(
                ConnectionId::new_unchecked(0),
                peer,
                &addr,
                &addr,
            )
            .unwrap();
        let ids: Vec<String> = handler
            .listen_protocol()
            .upgrade()
            .protocol_info()
            .into_iter()
            .map(|p| p.either(|id| id.as_ref().to_owned(), str::to_owned))
            .collect();
        assert_eq!(ids, [crate::GOSSIPSUB_PROTOCOL]);
    }

    #[test]
    fn host_key_is_the_libp2p_identity() {
        let key = SecretKey::from_seed([42; 32]);
        let kp = keypair(&key).unwrap();
        assert_eq!(
            kp.public().to_peer_id().to_string(),
            key.public().to_string()
        );
    }

    /// Message ids are the SHA-256 of the data alone: not the (absent) author or seqno.
    #[test]
    fn message_id_is_the_sha256_of_the_bytes() {
        let m = gossipsub::Message {
            source: None,
            data: b"an envelope".to_vec(),
            sequence_number: None,
            topic: gossipsub::TopicHash::from_raw("gleaner/demo/adverts"),
        };
        let id = message_id(&m);
        assert_eq!(id.0, gleaner::Digest::of(b"an envelope").0.to_vec());
        let other = gossipsub::Message {
            source: Some(
                keypair(&SecretKey::from_seed([2; 32]))
                    .unwrap()
                    .public()
                    .to_peer_id(),
            ),
            sequence_number: Some(7),
            ..m
        };
        assert_eq!(message_id(&other), id);
    }

    #[test]
    fn every_topic_gets_the_full_mesh() {
        let t = crate::topics("demo");
        let c = gossipsub_config(Duration::from_secs(60)).unwrap();
        for topic in [t.outcomes, t.types, t.trust] {
            let h = topic.hash();
            assert_eq!(c.mesh_n_for_topic(&h), tuning::MESH_N, "{h}");
            assert_eq!(c.mesh_n_low_for_topic(&h), tuning::MESH_N_LOW, "{h}");
            assert_eq!(c.mesh_n_high_for_topic(&h), tuning::MESH_N_HIGH, "{h}");
        }
    }

    #[tokio::test]
    async fn swarm_builds_with_the_space_behaviours() {
        let t = crate::topics("demo");
        let kp = keypair(&SecretKey::from_seed([1; 32])).unwrap();
        let swarm = build_swarm(kp, |_| {
            Ok(gossipsub_behaviour(
                [t.outcomes.hash()],
                Duration::from_secs(60),
            )?)
        })
        .unwrap();
        assert_eq!(
            swarm.local_peer_id().to_string(),
            SecretKey::from_seed([1; 32]).public().to_string()
        );
    }
}
