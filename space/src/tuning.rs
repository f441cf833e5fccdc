//! The tunable constants of a space node, in one place: gossipsub heartbeat and peer scoring,
//! Kademlia and redial intervals, connection and per-author rate limits. Both the client and the
//! coordinator's observer take them from here, so that they cannot drift apart.

use std::time::Duration;

/// Gossipsub heartbeat (mesh maintenance and gossip emission).
pub const HEARTBEAT: Duration = Duration::from_millis(500);

/// A connection with no stream open for this long is closed.
pub const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(120);

/// Kademlia's own periodic bootstrap.
pub const KAD_BOOTSTRAP_INTERVAL: Duration = Duration::from_secs(60);
/// How often a node walks the DHT while it has fewer than [`TARGET_PEERS`] connections.
pub const LOOKUP_INTERVAL: Duration = Duration::from_secs(10);
/// How often bootstrap peers that are not connected are dialled again.
pub const REDIAL_INTERVAL: Duration = Duration::from_secs(2);
/// Kademlia-discovered peers are dialled while fewer than this are connected.
pub const TARGET_PEERS: usize = 16;

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
/// the graylist threshold (ignored, pruned), three below the client's ban score.
pub const INVALID_MESSAGE_DELIVERIES_WEIGHT: f64 = -30.0;
pub const INVALID_MESSAGE_DELIVERIES_DECAY: f64 = 0.9;
/// Many factories share one address (a department behind NAT, a test on loopback): colocation is
/// no sign of a Sybil attack here.
pub const IP_COLOCATION_FACTOR_WEIGHT: f64 = 0.0;
/// The client's replay penalty is set as the application score, already weighted.
pub const APP_SPECIFIC_WEIGHT: f64 = 1.0;
