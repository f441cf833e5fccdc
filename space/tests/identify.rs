//! Identify as every space node runs it (`gleaner_space::swarm::identify_behaviour`): a peer learns a
//! node's listen addresses when they connect, and again, pushed at once, when the node listens
//! on another address; it does not wait for the periodic ask (`tuning::IDENTIFY_INTERVAL`).

use std::time::Duration;

use gleaner::SecretKey;
use libp2p::futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, Swarm, identify};
use tokio::time::timeout;

/// Longest wait for something that takes milliseconds on loopback, far below the periodic ask.
const WAIT: Duration = Duration::from_secs(15);
const _: () = assert!(WAIT.as_secs() * 10 < gleaner_space::tuning::IDENTIFY_INTERVAL.as_secs());

type Node = Swarm<gleaner_space::Quiet<identify::Behaviour>>;

fn node(seed: u8) -> Node {
    let kp = gleaner_space::keypair(&SecretKey::from_seed([seed; 32])).expect("a host key");
    gleaner_space::build_swarm_with(kp, Duration::from_secs(60), |k| {
        Ok(gleaner_space::swarm::identify_behaviour(k))
    })
    .expect("a swarm")
}

/// Listens on a new loopback TCP port of `n` and returns its address (the other swarm is
/// driven meanwhile, so that nothing it owes `n` waits).
async fn listen(n: &mut Node, other: &mut Node) -> Multiaddr {
    n.listen_on("/ip4/127.0.0.1/tcp/0".parse().expect("an address"))
        .expect("listening");
    timeout(WAIT, async {
        loop {
            tokio::select! {
                e = n.select_next_some() => {
                    if let SwarmEvent::NewListenAddr { address, .. } = e {
                        return address;
                    }
                }
                _ = other.select_next_some() => {}
            }
        }
    })
    .await
    .expect("a listen address within the wait")
}

/// Drives both swarms until `b` is told `a`'s listen addresses include `addr`.
async fn b_learns(a: &mut Node, b: &mut Node, addr: &Multiaddr) -> Result<(), String> {
    let a_id = *a.local_peer_id();
    timeout(WAIT, async {
        loop {
            tokio::select! {
                _ = a.select_next_some() => {}
                e = b.select_next_some() => {
                    if let SwarmEvent::Behaviour(identify::Event::Received { peer_id, info, .. }) = e
                        && peer_id == a_id
                        && info.listen_addrs.contains(addr)
                    {
                        return;
                    }
                }
            }
        }
    })
    .await
    .map_err(|_| format!("{addr} did not reach the connected peer within {WAIT:?}"))
}

#[tokio::test]
async fn a_new_listen_address_is_pushed_to_connected_peers() {
    let (mut a, mut b) = (node(1), node(2));
    let first = listen(&mut a, &mut b).await;
    b.dial(first.clone()).expect("a dial");
    // On connecting, b asks a and learns the address it dialled.
    b_learns(&mut a, &mut b, &first)
        .await
        .expect("identify on a new connection");
    let second = listen(&mut a, &mut b).await;
    assert_ne!(first, second);
    // The connection stays; b hears of a's new address with no new connection and no ask.
    b_learns(&mut a, &mut b, &second)
        .await
        .expect("identify push of a new listen address");
    assert!(a.is_connected(b.local_peer_id()));
}
