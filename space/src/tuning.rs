//! The tunable constants of a space node, in one place: gossipsub heartbeat, publishing, IHAVE
//! gossip, mesh degrees and peer scoring, DHT walk and redial intervals, connection and
//! per-author rate limits. Both the client and the coordinator's observer take them from here,
//! so that they cannot drift apart.

use std::time::Duration;

/// Gossipsub heartbeat (mesh maintenance, peer scores and gossip emission). Gossipsub's default
/// is 1 s, and it was 500 ms while adverts rode gossipsub; what is left there (outcomes,
/// announcements, trust messages) is rare, and each heartbeat scores every peer: a fifth of an
/// idle node's CPU at 100 nodes with 1 s (docs/BENCHMARKS.md). A mesh repaired or a graylisted
/// peer pruned a second later costs nothing the space would see. Its timer, like every libp2p
/// timer here, runs on the node's runtime (patches/futures-timer).
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// How often libp2p ping measures each connection (its default is 15 s). A node holds ~25
/// connections, each pinged from both ends, and nothing here reads the round trips; dead peers
/// are found by the transports ([`TCP_KEEPALIVE_IDLE`], QUIC's keep-alive). Each ping wakes the
/// connection at both ends twice: every minute, that was about a tenth of an idle node's CPU at
/// 100 nodes (docs/BENCHMARKS.md). Every two minutes it is half that.
pub const PING_INTERVAL: Duration = Duration::from_secs(120);
/// How often identify asks each connection's peer again (libp2p-identify's default is 5 min).
/// A peer's listen addresses are learnt when the connection opens and pushed when they change
/// (`with_push_listen_addr_updates`), so the periodic ask is only a net; every 5 min it was
/// 7 % of an idle node's CPU at 100 nodes, the connections made at start-up coming due
/// together (docs/BENCHMARKS.md).
pub const IDENTIFY_INTERVAL: Duration = Duration::from_secs(30 * 60);
/// How long a TCP connection may be silent before the kernel probes its peer, and how often it
/// probes again ([`crate::swarm`]): a peer switched off without closing is found in about
/// [`TCP_USER_TIMEOUT`], by the kernel, at no cost to the node while its connections carry data.
pub const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
pub const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// A TCP connection whose data or keepalive probes go unacknowledged this long is aborted.
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);
const _: () = assert!(TCP_KEEPALIVE_IDLE.as_secs() < TCP_USER_TIMEOUT.as_secs());

/// Whether a node sends its own messages to every peer of the topic (gossipsub's default) or,
/// as here, only to its mesh like any message it forwards. Flooding costs the publisher N − 1
/// copies per advert (29 in a 30-node space, every second) and each receiver a duplicate; an
/// advert is superseded by the next one within seconds, so the mesh and IHAVE gossip carry it.
pub const FLOOD_PUBLISH: bool = false;
/// IHAVE gossip (the fallback for messages the mesh missed): ids of the last `HISTORY_GOSSIP`
/// heartbeats (4 s), sent to `GOSSIP_LAZY` peers outside the mesh per topic and heartbeat, or to
/// `GOSSIP_FACTOR` of them if more. Gossipsub's defaults (3 heartbeats to 6 peers) carried every
/// message id 1.5 s long to 6 peers twice a second: ~17 kB/s per node at 30 adverts/s, three
/// times the adverts themselves.
pub const HISTORY_GOSSIP: usize = 2;
pub const GOSSIP_LAZY: usize = 3;
pub const GOSSIP_FACTOR: f64 = 0.1;
const _: () = assert!(HISTORY_GOSSIP >= 1 && HISTORY_GOSSIP <= 5);

/// Gossipsub's mesh degree D, and the bounds it keeps a mesh within (grafting up to D below the
/// low bound, pruning to D above the high one): gossipsub's defaults, named here so that tests
/// and benchmarks can say what a full mesh is. (Adverts, nearly all of a space's traffic, left
/// gossipsub for the relay; what is left is sent once and wants the paths of a full mesh.)
pub const MESH_N: usize = 6;
pub const MESH_N_LOW: usize = 5;
pub const MESH_N_HIGH: usize = 12;
const _: () = assert!(MESH_N_LOW <= MESH_N && MESH_N <= MESH_N_HIGH);

/// A connection with no stream open for this long is closed. Gossipsub keeps a stream open to
/// every peer that speaks it (libp2p-gossipsub 0.50 does not exempt its streams from keep-alive),
/// so in practice this closes only connections to peers outside the space's gossip.
pub const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(120);

/// How often a node walks the DHT while it has fewer than [`TARGET_PEERS`] connections and its
/// walks bring it more. These are the only walks: Kademlia's own periodic bootstrap is off
/// ([`crate::swarm::kad_behaviour`]), as a node well connected needs none.
pub const LOOKUP_INTERVAL: Duration = Duration::from_secs(10);
/// The longest wait between walks that brought no new connection: each such walk doubles the
/// wait from [`LOOKUP_INTERVAL`] up to this. A space smaller than the target (a department of ten
/// workstations) otherwise walked every 10 s forever, finding no one it did not hold.
pub const LOOKUP_MAX_INTERVAL: Duration = Duration::from_secs(320);
/// How often a node asks the LAN by mDNS once its first answer came. libp2p-mdns stops its quick
/// start-up probes at the first answer and then asks every 5 min by default, so a node whose own
/// probes went unanswered (it came up a moment before the LAN did) waited minutes to be found,
/// and a CI run saw one of three namespace nodes stay alone for 30 s. With Kademlia taking over
/// from any one peer found, a query a minute is plenty.
pub const MDNS_QUERY_INTERVAL: Duration = Duration::from_secs(60);
/// How often bootstrap peers that are not connected are dialled again.
pub const REDIAL_INTERVAL: Duration = Duration::from_secs(2);
/// Kademlia-discovered peers are dialled while fewer than this are connected.
pub const TARGET_PEERS: usize = 16;
/// Past this many connected peers a node closes the connections it dialled that nothing uses
/// ([`crate::trim`]), down to [`TRIM_LOW`]. Without it a space became a full mesh.
pub const TRIM_HIGH: usize = 32;
/// Where trimming stops.
pub const TRIM_LOW: usize = 24;
const _: () = assert!(TARGET_PEERS <= TRIM_LOW && TRIM_LOW <= TRIM_HIGH);
/// A connection younger than this is never trimmed (a DHT walk's answer, a machine-type fetch,
/// a relay link being opened).
pub const TRIM_GRACE: Duration = Duration::from_secs(30);
/// How long a node whose last look found nothing to trim waits before it looks again, unless a
/// connection comes or goes or one it dialled leaves its grace first ([`crate::trim::Trimmer`]).
/// What else decides (relay links, the gossipsub mesh) changes rarely, and a peer held twice for
/// a relay link (never trimmed) had every node with one look at all its connections each second:
/// ~7 % of an idle node's CPU at 100 nodes (the look 6 %, gathering the mesh for it 1 %).
pub const TRIM_RECHECK: Duration = Duration::from_secs(10);

/// Adverts and outcomes one author may have accepted in a burst, and per second after that;
/// more are ignored (not forwarded, not penalised: the relay may be honest).
pub const RATE_BURST: f64 = 10.0;
pub const RATE_PER_S: f64 = 2.0;
/// An author's rate bucket is forgotten after this long without a message.
pub const RATE_IDLE_MS: u64 = 60_000;

/// Per-topic peer scoring. Small rewards for time in the mesh (at most +36) and for first
/// deliveries (at most +10), so a long-lived peer cannot bank enough credit to keep sending junk.
pub const TIME_IN_MESH_WEIGHT: f64 = 0.01;
pub const TIME_IN_MESH_QUANTUM: Duration = Duration::from_secs(1);
pub const TIME_IN_MESH_CAP: f64 = 3600.0;
pub const FIRST_MESSAGE_DELIVERIES_WEIGHT: f64 = 0.5;
pub const FIRST_MESSAGE_DELIVERIES_CAP: f64 = 20.0;
/// Adverts come at about one per host every 2 s and announcements are rare: a mesh-delivery quota
/// would punish honest quiet peers.
pub const MESH_MESSAGE_DELIVERIES_WEIGHT: f64 = 0.0;
pub const MESH_FAILURE_PENALTY_WEIGHT: f64 = 0.0;
/// Invalid messages cost their sender heavily (the counter is squared): two take a peer below
/// the graylist threshold (ignored, pruned), three below the client's ban score. The counter
/// keeps 0.9 of itself a second.
pub const INVALID_MESSAGE_DELIVERIES_WEIGHT: f64 = -30.0;
pub const INVALID_MESSAGE_DELIVERIES_DECAY_PER_S: f64 = 0.9;

/// How often gossipsub decays its peers' score counters (its default is every second): once per
/// heartbeat, on the heartbeat's own period. Each decay walks every peer scored in the last hour
/// and its topics, ~7 % of an idle node's CPU at 100 nodes every second, and its own timer woke
/// the node between heartbeats. The counters decay as fast per second as before
/// ([`decay_per_tick`]).
pub const SCORE_DECAY_INTERVAL: Duration = HEARTBEAT;

/// What a score counter that keeps `per_s` of itself a second keeps per decay
/// ([`SCORE_DECAY_INTERVAL`]).
pub fn decay_per_tick(per_s: f64) -> f64 {
    per_s.powf(SCORE_DECAY_INTERVAL.as_secs_f64())
}
/// Many factories share one address (a department behind NAT, a test on loopback): colocation is
/// no sign of a Sybil attack here.
pub const IP_COLOCATION_FACTOR_WEIGHT: f64 = 0.0;
/// The client's replay penalty is set as the application score, already weighted.
pub const APP_SPECIFIC_WEIGHT: f64 = 1.0;

/// Advert relay links each node opens itself (to connected peers picked at random), and inbound
/// links it keeps at most: a node has about 2 × [`RELAY_OUTBOUND`] neighbours. Each node reads
/// each advert about once whatever the degree (copies prune their link), so the degree buys
/// paths around a neighbour that leaves or misbehaves, and short trees.
pub const RELAY_OUTBOUND: usize = 2;
pub const RELAY_MAX_INBOUND: usize = 8;
/// How often each neighbour's queued adverts go out as one frame: the delay each hop adds at
/// most, and what makes a frame carry many adverts. Frames are most of a node's CPU (each crosses
/// the kernel at both ends, and a link on the swarm wakes its connection at both ends; measured
/// before links went direct, `crate::direct`): at 100 nodes, 130 ms sent 18 % fewer than
/// 100 ms and cost 12–17 % less CPU per advert; its p99 read 541, 583 and 809 ms in three runs
/// (100 ms: 505–516 ms; the goal is 1 s), the 809 a tree broken once in the run. 115 ms saved
/// half as much. Longer flushes took p99 past 1 s in earlier builds (docs/BENCHMARKS.md).
pub const RELAY_FLUSH: Duration = Duration::from_millis(130);
/// A neighbour's frame is sent before the flush once this many bytes wait.
pub const RELAY_FLUSH_BYTES: usize = 32 * 1024;
/// How often a node replaces its oldest relay link by one to a connected peer whose adverts do
/// not reach it (ms): what joins the two halves of a space that was split, each node's links all
/// on its own side.
pub const RELAY_ROTATE_MS: u64 = 60_000;
/// How long, on average, a node that hears every connected peer waits before its first
/// rotation that only mixes the graph (ms; each wait is drawn in [½, 1½) of its period): a link
/// to a peer picked at random replaces its oldest. Mixing re-forms trees that formed badly (a
/// space started at once forms its first trees under load) and mixes the graph as nodes come and
/// go. Each rotation re-forms the trees of the hosts that came over the old link (grafts,
/// answers, copies, prunes). At 100 nodes, rotating every ten minutes from the start left the
/// start's trees and p99 half again as long (docs/BENCHMARKS.md).
pub const RELAY_MIX_MS: u64 = 120_000;
/// The longest period between mixing rotations (ms): each rotation a node has done doubles the
/// period from [`RELAY_MIX_MS`] up to this, so its first few re-form the trees it started with
/// and later ones only keep the graph mixed. At 100 nodes, ten minutes after start, that read a
/// quarter of the copies and 14 % fewer bytes than mixing every two minutes, at the same p99 and
/// the same CPU (docs/BENCHMARKS.md).
pub const RELAY_MIX_MAX_MS: u64 = 960_000;
const _: () = assert!(RELAY_MIX_MS <= RELAY_MIX_MAX_MS);
/// A peer whose relay link could not be opened is not tried again for this long (ms).
pub const RELAY_RETRY_MS: u64 = 60_000;

#[cfg(test)]
mod tests {
    use super::*;

    /// A score counter decays as fast per second on [`SCORE_DECAY_INTERVAL`] as it would on a
    /// decay every second.
    #[test]
    fn score_counters_decay_as_fast_per_second_whatever_the_interval() {
        let (per_s, seconds) = (INVALID_MESSAGE_DELIVERIES_DECAY_PER_S, 10.0);
        let ticks = seconds / SCORE_DECAY_INTERVAL.as_secs_f64();
        let kept = decay_per_tick(per_s).powf(ticks);
        assert!((kept - per_s.powf(seconds)).abs() < 1e-12, "{kept}");
        assert!(
            decay_per_tick(per_s) < per_s,
            "a tick longer than a second keeps less"
        );
    }
}
