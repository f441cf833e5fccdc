//! How a space node finds and keeps its peers, as steps of its event loop: listening, dialling and
//! redialling the bootstrap peers, mDNS, identify feeding Kademlia, and dialling what Kademlia
//! finds while the node has fewer connections than it wants (its target, at most
//! [`TARGET_PEERS`](crate::tuning::TARGET_PEERS)).

use futures_util::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, identify, kad, mdns};

use crate::tuning::{LOOKUP_INTERVAL, LOOKUP_MAX_INTERVAL};

/// A node's behaviour: whatever else it runs, it has the space's Kademlia.
pub trait SpaceBehaviour: NetworkBehaviour {
    fn kad(&mut self) -> &mut kad::Behaviour<kad::store::MemoryStore>;
}

/// The peer id at the end of an address, if it names one.
pub fn peer_of(a: &Multiaddr) -> Option<PeerId> {
    a.iter().find_map(|p| match p {
        Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

/// Listens on every address in `listen` and waits until each is bound, so callers learn the real
/// ports; `bound` sees each address as it comes.
pub async fn listen<B: SpaceBehaviour>(
    swarm: &mut Swarm<B>,
    listen: &[Multiaddr],
    mut bound: impl FnMut(&mut Swarm<B>, &Multiaddr),
) -> Result<Vec<Multiaddr>, String> {
    for a in listen {
        swarm
            .listen_on(a.clone())
            .map_err(|e| format!("listen on {a}: {e}"))?;
    }
    let mut addrs = Vec::new();
    while addrs.len() < listen.len() {
        match tokio::time::timeout(std::time::Duration::from_secs(10), swarm.select_next_some())
            .await
        {
            Ok(SwarmEvent::NewListenAddr { address, .. }) => {
                bound(swarm, &address);
                addrs.push(address)
            }
            Ok(_) => {}
            Err(_) => return Err("listening took too long".into()),
        }
    }
    Ok(addrs)
}

/// Puts the bootstrap peers in the routing table and dials them.
pub fn dial_bootstrap<B: SpaceBehaviour>(swarm: &mut Swarm<B>, bootstrap: &[Multiaddr]) {
    for b in bootstrap {
        if let Some(p) = peer_of(b) {
            swarm.behaviour_mut().kad().add_address(&p, b.clone());
        }
        if let Err(e) = swarm.dial(b.clone()) {
            tracing::warn!("dial {b}: {e}");
        }
    }
}

/// A bootstrap peer may not be up yet, may restart, or may have been cut off: redial it (unless
/// `banned`). One without a peer id is dialled only while nothing is connected. Says whether it
/// tried any: a dial waits for the swarm's next poll, and one refused at once may have left the
/// behaviours work for it (they hear of the failure).
pub fn redial<B: SpaceBehaviour>(
    swarm: &mut Swarm<B>,
    bootstrap: &[Multiaddr],
    banned: impl Fn(&PeerId) -> bool,
) -> bool {
    let none = swarm.connected_peers().next().is_none();
    let mut tried = false;
    for b in bootstrap {
        let go = match peer_of(b) {
            Some(p) => !swarm.is_connected(&p) && !banned(&p),
            None => none,
        };
        if go {
            let _ = swarm.dial(b.clone());
            tried = true;
        }
    }
    tried
}

/// Walks the DHT while the node has fewer than `target` peers connected, as often as `walks`
/// allows. Says whether it started a walk (it waits for the swarm's next poll).
pub fn lookup<B: SpaceBehaviour>(
    swarm: &mut Swarm<B>,
    target: usize,
    walks: &mut Walks,
    now_ms: u64,
) -> bool {
    let connected = swarm.connected_peers().count();
    connected < target
        && walks.due(connected, now_ms)
        && swarm.behaviour_mut().kad().bootstrap().is_ok()
}

/// When a node below its target walks the DHT next: every [`LOOKUP_INTERVAL`] while walks bring
/// it connections, the wait doubling after each that did not, up to [`LOOKUP_MAX_INTERVAL`].
#[derive(Debug)]
pub struct Walks {
    next_ms: u64,
    wait_ms: u64,
    /// Peers connected at the last walk.
    had: usize,
}

impl Default for Walks {
    fn default() -> Walks {
        Walks {
            next_ms: 0,
            wait_ms: LOOKUP_INTERVAL.as_millis() as u64,
            had: 0,
        }
    }
}

impl Walks {
    /// Whether to walk now, with `connected` peers; if so, the walk is counted.
    pub fn due(&mut self, connected: usize, now_ms: u64) -> bool {
        if now_ms < self.next_ms {
            return false;
        }
        let base = LOOKUP_INTERVAL.as_millis() as u64;
        self.wait_ms = if self.next_ms == 0 || connected > self.had {
            base
        } else {
            (self.wait_ms * 2).min(LOOKUP_MAX_INTERVAL.as_millis() as u64)
        };
        self.had = connected;
        self.next_ms = now_ms + self.wait_ms;
        true
    }
}

/// mDNS found peers on the LAN: dial those not connected.
pub fn on_mdns<B: SpaceBehaviour>(swarm: &mut Swarm<B>, e: mdns::Event) {
    if let mdns::Event::Discovered(list) = e {
        for (peer, addr) in list {
            if !swarm.is_connected(&peer) {
                let _ = swarm.dial(addr);
            }
        }
    }
}

/// Peers that speak the space's DHT go into the routing table under their listen addresses: one
/// already there has its addresses refreshed, a new one goes in only if its bucket has room (a
/// new peer in a full bucket would make Kademlia dial the bucket's oldest disconnected entry,
/// see [`crate::swarm`]).
pub fn on_identify<B: SpaceBehaviour>(
    swarm: &mut Swarm<B>,
    e: identify::Event,
    kad_protocol: &StreamProtocol,
) {
    if let identify::Event::Received { peer_id, info, .. } = e
        && info.protocols.contains(kad_protocol)
    {
        let kad = swarm.behaviour_mut().kad();
        let room = kad.kbucket(peer_id).is_none_or(|b| {
            b.num_entries() < kad::K_VALUE.get()
                || b.iter().any(|e| *e.node.key.preimage() == peer_id)
        });
        if room {
            for a in info.listen_addrs {
                kad.add_address(&peer_id, a);
            }
        }
    }
}

/// A peer Kademlia found is dialled while fewer than `target` are connected (unless `banned`).
pub fn on_kad<B: SpaceBehaviour>(
    swarm: &mut Swarm<B>,
    e: kad::Event,
    target: usize,
    banned: impl Fn(&PeerId) -> bool,
) {
    if let kad::Event::RoutingUpdated {
        peer, addresses, ..
    } = e
        && !swarm.is_connected(&peer)
        && !banned(&peer)
        && swarm.connected_peers().count() < target
    {
        let opts = DialOpts::peer_id(peer)
            .addresses(addresses.into_vec())
            .build();
        let _ = swarm.dial(opts);
    }
}

/// Once a bootstrap peer is connected, the DHT is walked through it.
pub fn on_connected<B: SpaceBehaviour>(
    swarm: &mut Swarm<B>,
    peer_id: PeerId,
    bootstrap: &[Multiaddr],
) {
    if bootstrap.iter().any(|b| peer_of(b) == Some(peer_id)) {
        let _ = swarm.behaviour_mut().kad().bootstrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_back_off_while_they_bring_no_one_and_resume_when_they_do() {
        let mut w = Walks::default();
        let s = 1000;
        assert!(w.due(3, 0));
        assert!(!w.due(3, 9 * s));
        // Nothing new since: 20 s, then 40 s, ... up to the cap.
        assert!(w.due(3, 10 * s));
        assert!(!w.due(3, 29 * s));
        assert!(w.due(3, 30 * s));
        assert!(!w.due(3, 69 * s));
        assert!(w.due(3, 70 * s));
        let mut at = 70 * s;
        for _ in 0..10 {
            at += LOOKUP_MAX_INTERVAL.as_millis() as u64;
            assert!(w.due(3, at));
        }
        assert!(!w.due(3, at + LOOKUP_MAX_INTERVAL.as_millis() as u64 - 1));
        // A peer more since the last walk: back to every 10 s.
        at += LOOKUP_MAX_INTERVAL.as_millis() as u64;
        assert!(w.due(4, at));
        assert!(!w.due(4, at + 10 * s - 1));
        assert!(w.due(4, at + 10 * s));
    }

    #[test]
    fn peer_of_reads_the_p2p_part() {
        let id = crate::keypair(&gleaner::SecretKey::from_seed([3; 32]))
            .unwrap()
            .public()
            .to_peer_id();
        let a: Multiaddr = format!("/ip4/127.0.0.1/tcp/4001/p2p/{id}").parse().unwrap();
        assert_eq!(peer_of(&a), Some(id));
        assert_eq!(peer_of(&"/ip4/127.0.0.1/tcp/4001".parse().unwrap()), None);
    }
}
