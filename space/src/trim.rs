//! Connection trimming: which connections a node closes once it holds more than it needs.
//!
//! Gossipsub keeps a stream open to every peer that speaks it, so no connection of a space ever
//! goes idle: every peer a Kademlia walk dialled stayed connected, and a space of n nodes became a
//! full mesh of n − 1 connections per node (99 per node at 100 nodes, each pinged, heartbeated and
//! polled). A node now closes connections *it dialled*, older than a grace period (a walk's
//! answer, a machine-type fetch), to peers it need not keep ([`Keep`]: an advert relay link or a
//! bootstrap peer it must; a gossipsub mesh peer it would rather, as gossipsub then grafts
//! another):
//!
//! - a second connection to a peer already held is closed at once, whatever the count. When two
//!   peers dialled each other (Kademlia walks often cross), the one with the smaller peer id closes
//!   its own, so that exactly one connection stays;
//! - past `high` peers held, whole peers go, those needed least and the oldest first, until `low`
//!   would remain.
//!
//! It never closes a connection a peer dialled: that peer dialled for its own reasons and trims its
//! own side, so a bootstrap node is not made to drop the clients that would only redial it.

use std::collections::HashMap;

use libp2p::PeerId;
use libp2p::swarm::ConnectionId;

use crate::tuning::TRIM_RECHECK;

/// How much a node needs a peer it dialled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Keep {
    /// Nothing uses it: closed first.
    No,
    /// Something would miss it (a gossipsub mesh): closed only if still too many.
    Rather,
    /// Never closed (an advert relay link, a bootstrap peer).
    Must,
}

/// One connection as the swarm reported it.
#[derive(Debug, Clone, Copy)]
struct Conn {
    peer: PeerId,
    dialled: bool,
    since_ms: u64,
}

/// The connections a node holds.
#[derive(Debug)]
pub struct Trimmer {
    local: PeerId,
    /// Every connection up and not yet closing.
    conns: HashMap<ConnectionId, Conn>,
    /// Connections per peer in `conns`, kept as they come and go: a node with nothing to trim
    /// (no peer held twice, no more peers than its mark) learns so without a pass over them.
    peers: HashMap<PeerId, usize>,
    /// Until when a look that found nothing stands ([`Trimmer::found_nothing`]); 0 once a
    /// connection came or went.
    rest_until_ms: u64,
}

/// One peer's connections, gathered.
#[derive(Default)]
struct Peer {
    /// This node's own connections to it past the grace period, oldest first.
    dialled: Vec<(u64, ConnectionId)>,
    /// Its connections to this node, and ours still in grace.
    others: usize,
    since_ms: u64,
}

impl Trimmer {
    /// The trimmer of node `local`.
    pub fn new(local: PeerId) -> Trimmer {
        Trimmer {
            local,
            conns: HashMap::new(),
            peers: HashMap::new(),
            rest_until_ms: 0,
        }
    }

    /// Connection `id` to `peer` came up; `dialled` when this node dialled it.
    pub fn established(&mut self, id: ConnectionId, peer: PeerId, dialled: bool, now_ms: u64) {
        let conn = Conn {
            peer,
            dialled,
            since_ms: now_ms,
        };
        if let Some(was) = self.conns.insert(id, conn) {
            self.forget(was.peer);
        }
        *self.peers.entry(peer).or_insert(0) += 1;
        self.rest_until_ms = 0;
    }

    /// Connection `id` closed.
    pub fn closed(&mut self, id: ConnectionId) {
        if let Some(c) = self.conns.remove(&id) {
            self.forget(c.peer);
            self.rest_until_ms = 0;
        }
    }

    /// Connection `id` is being closed (this node asked the swarm to): it is no longer held,
    /// so it is neither listed again nor counted while its close completes (a QUIC connection
    /// takes a while), and [`Trimmer::closed`] for it changes nothing.
    pub fn closing(&mut self, id: ConnectionId) {
        self.closed(id);
    }

    fn forget(&mut self, peer: PeerId) {
        if let Some(n) = self.peers.get_mut(&peer) {
            *n -= 1;
            if *n == 0 {
                self.peers.remove(&peer);
            }
        }
    }

    /// Peers held now.
    pub fn held(&self) -> usize {
        self.peers.len()
    }

    /// Whether [`Trimmer::surplus`] with this `high` mark could close anything at `now_ms`: only
    /// a peer held by two connections or more, or more peers than `high`, can be trimmed, and not
    /// while a look that found nothing stands ([`Trimmer::found_nothing`]). Cheap, so that a node
    /// asks for the surplus (and gathers what it needs to judge it) only then.
    pub fn may_trim(&self, high: usize, now_ms: u64) -> bool {
        now_ms >= self.rest_until_ms
            && (self.peers.len() > high || self.conns.len() > self.peers.len())
    }

    /// A look at `now_ms` (with grace period `grace_ms`) found nothing to close: [`may_trim`]
    /// says no until [`TRIM_RECHECK`] has passed, a connection comes or goes, or one this node
    /// dialled leaves its grace, whichever is first. Only what decides besides the connections
    /// (relay links, the mesh) may have changed unseen, for at most [`TRIM_RECHECK`].
    ///
    /// [`may_trim`]: Trimmer::may_trim
    pub fn found_nothing(&mut self, grace_ms: u64, now_ms: u64) {
        let recheck = now_ms.saturating_add(TRIM_RECHECK.as_millis() as u64);
        self.rest_until_ms = self
            .conns
            .values()
            .filter(|c| c.dialled)
            .map(|c| c.since_ms.saturating_add(grace_ms))
            .filter(|&out| out > now_ms)
            .fold(recheck, u64::min);
    }

    /// The connections to close now (see the module's rules): a pass over every connection, which
    /// a caller spares itself when [`Trimmer::may_trim`] says nothing can go.
    pub fn surplus(
        &self,
        high: usize,
        low: usize,
        grace_ms: u64,
        now_ms: u64,
        keep: impl Fn(&PeerId) -> Keep,
    ) -> Vec<ConnectionId> {
        let mut peers: HashMap<PeerId, Peer> = HashMap::new();
        for (id, c) in &self.conns {
            let p = peers.entry(c.peer).or_insert_with(|| Peer {
                since_ms: c.since_ms,
                ..Peer::default()
            });
            p.since_ms = p.since_ms.min(c.since_ms);
            if c.dialled && now_ms.saturating_sub(c.since_ms) >= grace_ms {
                p.dialled.push((c.since_ms, *id));
            } else {
                p.others += 1;
            }
        }
        let held = peers.len();
        let mut close = Vec::new();
        // Whole peers this node alone holds, as (keep, since, peer) for the second rule.
        let mut spare = Vec::new();
        for (peer, p) in &mut peers {
            if p.dialled.is_empty() {
                continue;
            }
            let k = keep(peer);
            if k == Keep::Must {
                continue;
            }
            p.dialled.sort_unstable();
            if p.others > 0 {
                // Held both ways: ours go, if ours is the smaller id.
                if self.local < *peer {
                    close.extend(p.dialled.iter().map(|(_, id)| *id));
                }
            } else {
                // Only ours: all but the oldest are doubles.
                close.extend(p.dialled.iter().skip(1).map(|(_, id)| *id));
                spare.push((k, p.since_ms, *peer, p.dialled[0].1));
            }
        }
        if held > high {
            spare.sort_unstable();
            close.extend(
                spare
                    .into_iter()
                    .take(held.saturating_sub(low))
                    .map(|(_, _, _, id)| id),
            );
        }
        close
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(n: usize) -> Vec<PeerId> {
        (0..n).map(|_| PeerId::random()).collect()
    }

    struct Ids(usize);
    impl Ids {
        fn next(&mut self) -> ConnectionId {
            self.0 += 1;
            ConnectionId::new_unchecked(self.0)
        }
    }

    fn sorted(mut v: Vec<ConnectionId>) -> Vec<ConnectionId> {
        v.sort();
        v
    }

    #[test]
    fn nothing_goes_at_or_under_the_high_mark() {
        let (mut t, mut ids) = (Trimmer::new(PeerId::random()), Ids(0));
        for p in peers(8) {
            t.established(ids.next(), p, true, 0);
        }
        assert!(t.surplus(8, 4, 0, 100_000, |_| Keep::No).is_empty());
        assert_eq!(t.surplus(7, 4, 0, 100_000, |_| Keep::No).len(), 4);
    }

    #[test]
    fn the_oldest_dialled_go_first_down_to_the_low_mark() {
        let (mut t, mut ids) = (Trimmer::new(PeerId::random()), Ids(0));
        let mut conns = Vec::new();
        for (i, p) in peers(10).into_iter().enumerate() {
            let id = ids.next();
            t.established(id, p, true, i as u64 * 1000);
            conns.push(id);
        }
        let gone = t.surplus(8, 6, 0, 100_000, |_| Keep::No);
        assert_eq!(sorted(gone), conns[..4].to_vec());
    }

    #[test]
    fn inbound_kept_and_young_are_spared() {
        let (mut t, mut ids) = (Trimmer::new(PeerId::random()), Ids(0));
        let ps = peers(5);
        t.established(ids.next(), ps[0], false, 0); // a peer dialled us
        t.established(ids.next(), ps[1], true, 0); // kept (a relay link, say)
        t.established(ids.next(), ps[2], true, 95_000); // too young
        let a = ids.next();
        t.established(a, ps[3], true, 0);
        let b = ids.next();
        t.established(b, ps[4], true, 0);
        let keep = |p: &PeerId| if *p == ps[1] { Keep::Must } else { Keep::No };
        assert_eq!(sorted(t.surplus(2, 0, 10_000, 100_000, keep)), vec![a, b]);
    }

    #[test]
    fn a_peer_held_both_ways_loses_the_smaller_ids_connection_whatever_the_count() {
        let ps = peers(2);
        let (small, big) = (ps[0].min(ps[1]), ps[0].max(ps[1]));
        let mut ids = Ids(0);
        let (small_dialled, big_dialled) = (ids.next(), ids.next());
        let mut at_small = Trimmer::new(small);
        at_small.established(small_dialled, big, true, 0);
        at_small.established(big_dialled, big, false, 0);
        let mut at_big = Trimmer::new(big);
        at_big.established(small_dialled, small, false, 0);
        at_big.established(big_dialled, small, true, 0);
        assert_eq!(
            at_small.surplus(100, 100, 0, 1, |_| Keep::No),
            vec![small_dialled]
        );
        assert!(at_big.surplus(100, 100, 0, 1, |_| Keep::No).is_empty());
        // Unless the peer is one to keep: then nothing moves.
        assert!(at_small.surplus(0, 0, 0, 1, |_| Keep::Must).is_empty());
    }

    #[test]
    fn doubles_of_our_own_go_but_the_oldest() {
        let (mut t, mut ids) = (Trimmer::new(PeerId::random()), Ids(0));
        let p = PeerId::random();
        let (a, b, c) = (ids.next(), ids.next(), ids.next());
        t.established(b, p, true, 5);
        t.established(a, p, true, 1);
        t.established(c, p, true, 9);
        assert_eq!(t.held(), 1);
        assert_eq!(sorted(t.surplus(10, 10, 0, 100, |_| Keep::No)), vec![b, c]);
    }

    #[test]
    fn peers_rather_kept_go_last() {
        let (mut t, mut ids) = (Trimmer::new(PeerId::random()), Ids(0));
        let ps = peers(6);
        let mut conns = Vec::new();
        for (i, p) in ps.iter().enumerate() {
            let id = ids.next();
            t.established(id, *p, true, i as u64);
            conns.push(id);
        }
        // The two oldest are in a mesh: the four others go first, then the older mesh peer.
        let keep = |p: &PeerId| {
            if ps[..2].contains(p) {
                Keep::Rather
            } else {
                Keep::No
            }
        };
        let gone = t.surplus(4, 1, 0, 100, keep);
        assert_eq!(gone.len(), 5);
        assert_eq!(&gone[..4], &conns[2..6]);
        assert_eq!(gone[4], conns[0]);
    }

    #[test]
    fn may_trim_says_whether_a_peer_is_held_twice_or_there_are_too_many() {
        let (mut t, mut ids) = (Trimmer::new(PeerId::random()), Ids(0));
        let ps = peers(4);
        for p in &ps[..3] {
            t.established(ids.next(), *p, true, 0);
        }
        assert!(!t.may_trim(3, 0));
        assert!(t.may_trim(2, 0));
        // A second connection to a peer held: something may go whatever the count.
        let double = ids.next();
        t.established(double, ps[0], false, 0);
        assert!(t.may_trim(10, 0));
        t.closed(double);
        assert!(!t.may_trim(3, 0));
        t.established(ids.next(), ps[3], true, 0);
        assert!(t.may_trim(3, 0));
    }

    #[test]
    fn surplus_finds_nothing_where_may_trim_says_so() {
        // Random spaces of connections (some peers held twice, some dialled, some young, some
        // to keep, some closed or closing): whenever a full pass would close a connection,
        // `may_trim` said so (the shortcut loses nothing), and the counts agree with a count
        // made from scratch.
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |below: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % below
        };
        let mut found = 0;
        for _ in 0..300 {
            let (mut t, mut ids) = (Trimmer::new(PeerId::random()), Ids(0));
            let ps = peers(1 + next(8) as usize);
            let mut up = Vec::new();
            for _ in 0..next(16) {
                let id = ids.next();
                let p = ps[next(ps.len() as u64) as usize];
                t.established(id, p, next(3) > 0, next(100));
                up.push(id);
                if next(4) == 0 {
                    let gone = up.swap_remove(next(up.len() as u64) as usize);
                    if next(2) == 0 {
                        t.closing(gone);
                    }
                    t.closed(gone);
                }
            }
            let mut fresh: Vec<PeerId> = t.conns.values().map(|c| c.peer).collect();
            fresh.sort_unstable();
            fresh.dedup();
            assert_eq!(t.held(), fresh.len());
            let kept = ps[0];
            let keep = |p: &PeerId| if *p == kept { Keep::Must } else { Keep::No };
            for high in 0..10 {
                let grace = next(60);
                let all = t.surplus(high, 0, grace, 100, keep);
                if !all.is_empty() {
                    found += 1;
                    assert!(
                        t.may_trim(high, 100),
                        "{all:?} to close, and may_trim said no"
                    );
                }
            }
        }
        // The spaces above did have something to trim, often.
        assert!(found > 300, "only {found} cases with a surplus");
    }

    #[test]
    fn a_look_that_found_nothing_stands_until_something_changes() {
        let (mut t, mut ids) = (Trimmer::new(PeerId::random()), Ids(0));
        let ps = peers(3);
        // A peer held twice for a relay link: never trimmed, and may_trim cannot tell.
        for _ in 0..2 {
            t.established(ids.next(), ps[0], true, 0);
        }
        t.established(ids.next(), ps[1], false, 0);
        let must = |p: &PeerId| if *p == ps[0] { Keep::Must } else { Keep::No };
        let recheck = TRIM_RECHECK.as_millis() as u64;
        let now = 100_000;
        assert!(t.may_trim(8, now));
        assert!(t.surplus(8, 4, 0, now, must).is_empty());
        t.found_nothing(0, now);
        assert!(!t.may_trim(8, now));
        assert!(!t.may_trim(8, now + recheck - 1));
        assert!(t.may_trim(8, now + recheck));

        // A connection that comes, or goes, is looked at at once.
        t.found_nothing(0, now);
        let new = ids.next();
        t.established(new, ps[2], true, now);
        assert!(t.may_trim(8, now));
        t.found_nothing(0, now);
        t.closed(new);
        assert!(t.may_trim(8, now));
        // A connection closed that was not held changes nothing.
        t.found_nothing(0, now);
        t.closed(new);
        assert!(!t.may_trim(8, now));

        // Two dialled to one peer, still in their grace: looked at again as the first leaves it,
        // not a recheck later, and the younger goes once both have.
        let (first, second) = (ids.next(), ids.next());
        t.established(first, ps[2], true, now);
        t.established(second, ps[2], true, now + 500);
        let grace = 3_000;
        assert!(t.surplus(8, 4, grace, now + 1_000, must).is_empty());
        t.found_nothing(grace, now + 1_000);
        assert!(!t.may_trim(8, now + grace - 1));
        assert!(t.may_trim(8, now + grace));
        assert_eq!(
            t.surplus(8, 4, grace, now + grace + 500, must),
            vec![second]
        );
    }

    #[test]
    fn a_closing_connection_is_not_held_nor_listed_again() {
        let (mut t, mut ids) = (Trimmer::new(PeerId::random()), Ids(0));
        let ps = peers(3);
        let c: Vec<ConnectionId> = ps
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let id = ids.next();
                t.established(id, *p, true, i as u64);
                id
            })
            .collect();
        let first = t.surplus(2, 2, 0, 100, |_| Keep::No);
        assert_eq!(first, vec![c[0]]);
        t.closing(c[0]);
        assert_eq!(t.held(), 2);
        assert!(!t.may_trim(2, 0));
        assert!(t.surplus(2, 2, 0, 100, |_| Keep::No).is_empty());
        // Its close completing changes nothing more.
        t.closed(c[0]);
        assert_eq!(t.held(), 2);
        assert_eq!(t.surplus(1, 1, 0, 100, |_| Keep::No), vec![c[1]]);
    }

    #[test]
    fn closed_connections_are_forgotten() {
        let (mut t, mut ids) = (Trimmer::new(PeerId::random()), Ids(0));
        let ps = peers(3);
        let c: Vec<ConnectionId> = ps
            .iter()
            .map(|p| {
                let id = ids.next();
                t.established(id, *p, true, 0);
                id
            })
            .collect();
        assert_eq!(t.held(), 3);
        t.closed(c[0]);
        t.closed(c[1]);
        assert_eq!(t.held(), 1);
        // A close the trimmer never saw opened changes nothing.
        t.closed(ids.next());
        assert_eq!(t.held(), 1);
        assert_eq!(t.surplus(0, 0, 0, 1, |_| Keep::No), vec![c[2]]);
    }
}
