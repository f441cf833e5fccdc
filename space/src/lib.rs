//! What every node of a Gleaner space shares, so that the client's factories and the
//! coordinator's observer cannot drift apart: the names on the wire (gossipsub topics, protocol
//! ids), the size limits, the transport and behaviours (anonymous gossipsub whose message id is the
//! SHA-256 of the bytes, peer scoring, Kademlia, identify, mDNS), the checks an advert or outcome
//! passes, the discovery steps of the event loop, and the advert relay ([`relay`], over the links
//! of [`links`], on connections of their own where both ends take them, [`direct`]). The tunable constants live in [`tuning`]. This crate links the core and
//! libp2p, never an engine (no bollard, no virt).

pub mod direct;
pub mod discovery;
pub mod gate;
pub mod links;
pub mod quiet;
pub mod relay;
pub mod swarm;
pub mod trim;
pub mod tuning;
pub mod woken;

pub use discovery::{SpaceBehaviour, peer_of};
pub use gate::{AdvertGate, AuthorRates, Checked, Verdict};
/// The behaviour that carries the relay's streams (add it to a node's behaviour, then hand its
/// control to [`relay::AdvertRelay::new`]).
pub use libp2p_stream::Behaviour as StreamBehaviour;
pub use links::{LinkEvent, Links, RELAY_PROTOCOL};
pub use quiet::Quiet;
pub use swarm::{build_swarm, build_swarm_with, gossipsub_behaviour, keypair, transport_bytes};
pub use trim::Trimmer;
pub use woken::WhenWoken;

use libp2p::StreamProtocol;
use libp2p::gossipsub::IdentTopic;

/// Largest gossiped frame (gossipsub's transmit limit); larger frames are refused by the codec.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Largest advert or outcome message; a bigger one is rejected (and penalised).
pub const MAX_ADVERT: usize = 16 * 1024;
/// Longest space name (it becomes part of topic names and the Kademlia protocol id).
pub const SPACE_NAME_MAX: usize = 64;

/// The identify protocol version every Gleaner node announces.
pub const IDENTIFY_PROTOCOL: &str = "/gleaner/1";
/// The request-response protocol for machine types.
pub const MT_PROTOCOL: &str = "/gleaner/mt/1";
/// The one gossipsub protocol a node speaks ([`swarm::gossipsub_config`]).
pub const GOSSIPSUB_PROTOCOL: &str = "/meshsub/1.1.0";

/// Why a space name is refused, if it is.
pub fn check_space_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > SPACE_NAME_MAX || name.contains(['/', ' ']) {
        return Err(format!(
            "{name:?}: a space name is 1-{SPACE_NAME_MAX} characters without '/' or spaces"
        ));
    }
    Ok(())
}

/// The gossipsub topics of one space (capacity adverts go over the relay, [`relay`]).
pub struct Topics {
    pub outcomes: IdentTopic,
    pub types: IdentTopic,
    pub trust: IdentTopic,
}

/// The topics of `space`.
pub fn topics(space: &str) -> Topics {
    Topics {
        outcomes: IdentTopic::new(format!("gleaner/{space}/outcomes")),
        types: IdentTopic::new(format!("gleaner/{space}/machine-types")),
        trust: IdentTopic::new(format!("gleaner/{space}/trust")),
    }
}

/// The Kademlia protocol id of `space` (each space keeps its own DHT).
pub fn kad_protocol(space: &str) -> Result<StreamProtocol, String> {
    StreamProtocol::try_from_owned(format!("/gleaner/{space}/kad/1"))
        .map_err(|e| format!("kademlia protocol for space {space:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn space_names() {
        assert!(check_space_name("demo").is_ok());
        assert!(check_space_name(&"x".repeat(SPACE_NAME_MAX)).is_ok());
        for bad in ["", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_space_name(bad).is_err(), "{bad:?}");
        }
    }

    /// The names are the wire format: a change here splits old and new nodes into two spaces.
    #[test]
    fn wire_names_are_stable() {
        let t = topics("demo");
        assert_eq!(t.outcomes.hash().as_str(), "gleaner/demo/outcomes");
        assert_eq!(t.types.hash().as_str(), "gleaner/demo/machine-types");
        assert_eq!(t.trust.hash().as_str(), "gleaner/demo/trust");
        assert_eq!(
            kad_protocol("demo").unwrap().as_ref(),
            "/gleaner/demo/kad/1"
        );
        assert_eq!(IDENTIFY_PROTOCOL, "/gleaner/1");
        assert_eq!(MT_PROTOCOL, "/gleaner/mt/1");
        assert_eq!(GOSSIPSUB_PROTOCOL, "/meshsub/1.1.0");
        assert_eq!(RELAY_PROTOCOL.as_ref(), "/gleaner/adverts/2");
    }
}
