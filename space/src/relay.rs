//! A space node's advert relay: the core's [`gleaner::relay::Relay`] (batching, prune on copies,
//! graft on silence) over [`Links`] (long-lived `/gleaner/adverts/2` links to a few
//! neighbours, each on a TCP connection of its own where both ends take that,
//! [`crate::direct`]), with every piece of news checked by the [`AdvertGate`] in one batch
//! signature check per frame. The client's factories and the coordinator's observer both run
//! one.
//!
//! Adverts left gossipsub for this: gossipsub sends each message to each mesh peer as its own
//! frame with its own timer, and each node got every advert D − 1 times; at 30 nodes that was
//! ~220 µs of CPU per advert per node and 5.4× the useful bytes (docs/BENCHMARKS.md). Here a
//! node reads each advert about once, in frames of many, and checks its signature once.

use std::collections::HashMap;

use gleaner::chain::Refresh;
use gleaner::relay::{Carried, Relay, RelayConfig, RelayStats};
use gleaner::space::SpaceView;
use gleaner::{Digest, Envelope, PublicKey};
use libp2p::PeerId;

use crate::direct::DirectConfig;
use crate::gate::{AdvertGate, Verdict};
use crate::links::{LinkEvent, Links};
use crate::tuning::{
    RELAY_FLUSH_BYTES, RELAY_MAX_INBOUND, RELAY_MIX_MAX_MS, RELAY_MIX_MS, RELAY_OUTBOUND,
    RELAY_RETRY_MS, RELAY_ROTATE_MS,
};

/// What a link event or a flush came to, for the node's own bookkeeping.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Signed adverts taken into the view: their authors and the machine types they show
    /// running (a refresh cannot change them).
    pub taken: Vec<(PublicKey, Vec<Digest>)>,
    /// Items a peer should not have relayed (junk, forgeries, broken frames), with reasons.
    pub rejected: Vec<(PeerId, String)>,
}

/// News waiting for the next flush to be verified, all in one batch.
struct News {
    from: PeerId,
    /// A signed advert's envelope bytes (empty for a refresh).
    bytes: Vec<u8>,
    refresh: Option<Refresh>,
    host: PublicKey,
    seq: u64,
}

/// Counters for the space's summary.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RelaySummary {
    /// Neighbours linked now (opened by this node, and by them).
    pub outbound: usize,
    pub inbound: usize,
    /// Of those, links on connections of their own ([`crate::direct`]).
    pub direct: usize,
    /// Copies, prunes, grafts and why, frame bytes, drops (frames a link could not take
    /// included).
    #[serde(flatten)]
    pub stats: RelayStats,
}

/// One node's advert relay.
pub struct AdvertRelay {
    links: Links,
    relay: Relay<PeerId>,
    /// Peers whose open failed lately (not a relay, or unreachable), and when (ms).
    failed: HashMap<PeerId, u64>,
    /// This node's own links and when each came up (ms): the oldest goes when one too many is up.
    opened: HashMap<PeerId, u64>,
    /// When it opens a link beyond its [`RELAY_OUTBOUND`] next.
    rotations: Rotations,
    /// News from every link since the last flush: a batch of ten signatures costs about 15 µs
    /// each, one alone 38 µs (docs/BENCHMARKS.md).
    news: Vec<News>,
    /// The frames read at a flush, kept for the allocation.
    inbox: Vec<(PeerId, Vec<u8>)>,
}

/// News waiting at most; more is verified at once.
const MAX_NEWS: usize = 256;

impl AdvertRelay {
    /// A relay over `control` (from the swarm's `libp2p_stream::Behaviour`) for node `local`,
    /// its links on connections of their own where peers take them if `direct` says where this
    /// node takes them ([`crate::direct`]).
    pub fn new(
        control: libp2p_stream::Control,
        local: PeerId,
        direct: Option<DirectConfig>,
    ) -> Result<AdvertRelay, String> {
        let mut links = Links::new(control, local, RELAY_MAX_INBOUND, direct)?;
        links.defer_frames();
        Ok(AdvertRelay {
            links,
            relay: Relay::new(RelayConfig {
                spread_seed: random_below(usize::MAX) as u64,
                ..RelayConfig::default()
            }),
            failed: HashMap::new(),
            opened: HashMap::new(),
            rotations: Rotations::default(),
            news: Vec::new(),
            inbox: Vec::new(),
        })
    }

    /// The next link event (cancel-safe), for the node's select loop: links up, down, or not
    /// opened. Frames are read at the flush. While `arrive` is set (the node has nothing
    /// [`queued`](AdvertRelay::queued), so no flush coming), `None` once a link has a frame: the
    /// flush timer is then started. The frames of a node whose flush is coming wake it no
    /// sooner: they are read at the flush, which verifies their news and sends it on, as it would
    /// have had each been read as it came.
    pub async fn next(&mut self, arrive: bool) -> Option<LinkEvent> {
        self.links.next_or_frames(arrive).await
    }

    /// Whether anything waits for the flush: frames on the links, news, frames to send (the
    /// flush timer need not run otherwise: a node with nothing queued is not woken for nothing,
    /// and the first advert after a quiet spell goes out at once).
    pub fn queued(&self) -> bool {
        self.relay.queued() > 0 || !self.news.is_empty() || self.links.frames_waiting()
    }

    /// Handles one link event: links come and go, frames are read (prunes and grafts take effect,
    /// copies are dropped, news waits for the flush, junk is named). Verifying a frame's news
    /// with the rest at the flush makes batches of about ten signatures where a frame alone
    /// brings one to three.
    pub fn handle(
        &mut self,
        ev: LinkEvent,
        gate: &mut AdvertGate,
        view: &mut SpaceView,
        now: u64,
        now_ms: u64,
    ) -> Outcome {
        let mut out = Outcome::default();
        match ev {
            LinkEvent::Up { peer, outbound } => {
                self.failed.remove(&peer);
                if outbound {
                    self.opened.insert(peer, now_ms);
                }
                self.relay.add_link(peer);
            }
            LinkEvent::Down { peer } => {
                self.opened.remove(&peer);
                self.relay.remove_link(&peer);
            }
            LinkEvent::OpenFailed { peer, error } => {
                tracing::debug!("no advert link to {peer}: {error}");
                self.failed.insert(peer, now_ms);
            }
            LinkEvent::Frame { peer, frame } => {
                self.frame(peer, &frame, gate, view, now, now_ms, &mut out);
            }
        }
        out
    }

    /// One frame read from `peer`'s link: prunes and grafts take effect, copies are dropped,
    /// news waits for the flush, junk is named; a frame that cannot be read closes the link (and
    /// false is returned).
    #[allow(clippy::too_many_arguments)]
    fn frame(
        &mut self,
        peer: PeerId,
        frame: &[u8],
        gate: &mut AdvertGate,
        view: &mut SpaceView,
        now: u64,
        now_ms: u64,
        out: &mut Outcome,
    ) -> bool {
        let got = match self.relay.on_frame(peer, frame, now_ms) {
            Ok(got) => got,
            Err(e) => {
                out.rejected.push((peer, format!("advert frame: {e}")));
                self.links.close(&peer);
                return false;
            }
        };
        out.rejected
            .extend(got.junk.into_iter().map(|why| (peer, why)));
        self.news.extend(got.news.into_iter().map(|c| {
            let (bytes, refresh) = match c.carried {
                Carried::Signed(b) => (b.to_vec(), None),
                Carried::Refresh(r) => (Vec::new(), Some(r)),
            };
            News {
                from: peer,
                bytes,
                refresh,
                host: c.host,
                seq: c.seq,
            }
        }));
        if self.news.len() >= MAX_NEWS {
            self.verify(gate, view, now, now_ms, out);
        }
        if self.relay.queued() >= RELAY_FLUSH_BYTES {
            self.send_frames();
        }
        true
    }

    /// Verifies the news waiting: signed adverts in one batch first (they may be the anchors of
    /// refreshes in the same batch), then each refresh against its chain. Good ones go into
    /// `view` and are queued to the other neighbours, the rest fall back (see
    /// [`Relay::refused`]).
    fn verify(
        &mut self,
        gate: &mut AdvertGate,
        view: &mut SpaceView,
        now: u64,
        now_ms: u64,
        out: &mut Outcome,
    ) {
        if self.news.is_empty() {
            return;
        }
        let news = std::mem::take(&mut self.news);
        let items: Vec<&[u8]> = news
            .iter()
            .filter(|n| n.refresh.is_none())
            .map(|n| n.bytes.as_slice())
            .collect();
        self.relay.stats.checked += items.len() as u64;
        let mut signed = gate.check_adverts(&items, view, now, now_ms).into_iter();
        let mut refreshed = news
            .iter()
            .filter_map(|n| n.refresh.as_ref().map(|r| (n.from, r)))
            .map(|(from, r)| {
                // Its anchor is not here (and no newer one is): the sender is asked for it
                // (with a graft).
                if view.anchor_seq(&r.host).is_none_or(|a| a < r.anchor_seq) {
                    self.relay.want_anchor(from, r.host);
                }
                gate.check_refresh(r, view, now, now_ms)
            })
            .collect::<Vec<_>>()
            .into_iter();
        for n in &news {
            // A refresh shows no running types of its own (its anchor's were reported).
            let checked = match n.refresh {
                Some(_) => refreshed.next().map(|v| (v, None)),
                None => signed.next().map(|c| (c.verdict, c.running)),
            };
            // One verdict per item, in order: none is missing.
            let Some((verdict, running)) = checked else {
                continue;
            };
            match verdict {
                Verdict::Accept => {
                    match &n.refresh {
                        Some(r) => self.relay.accepted_refresh(Some(n.from), r, now_ms),
                        None => self
                            .relay
                            .accepted(Some(n.from), n.host, n.seq, &n.bytes, now_ms),
                    }
                    if let Some(taken) = running {
                        out.taken.push(taken);
                    }
                }
                Verdict::Reject(why) => {
                    self.relay.refused(n.host, n.seq);
                    out.rejected.push((n.from, why));
                }
                // Too many from its author, or too old: not forwarded, not the relay's fault.
                Verdict::Ignore(_) | Verdict::Replay(_) => self.relay.refused(n.host, n.seq),
            }
        }
        // The next flush's news goes into the same allocation, not one grown afresh each time.
        let mut news = news;
        news.clear();
        self.news = news;
    }

    /// This node's own advert (already in its view): queued to every neighbour. Sent as it is,
    /// even if its signature does not hold or it cannot be read: the neighbours judge it.
    pub fn publish(&mut self, env: &Envelope, now_ms: u64) {
        let bytes = env.to_bytes();
        match env.peek::<gleaner::CapacityAdvert>() {
            Ok(advert) => self
                .relay
                .accepted(None, advert.host, advert.seq, &bytes, now_ms),
            Err(_) => self.relay.send_unread(&bytes),
        }
    }

    /// This node's own refresh (already in its view): queued to every neighbour, after the
    /// anchor to any that lacks it.
    pub fn publish_refresh(&mut self, r: &Refresh, now_ms: u64) {
        self.relay.accepted_refresh(None, r, now_ms);
    }

    /// Verifies the news waiting, then sends what was queued for each neighbour, one frame each.
    pub fn flush(
        &mut self,
        gate: &mut AdvertGate,
        view: &mut SpaceView,
        now: u64,
        now_ms: u64,
    ) -> Outcome {
        let mut out = Outcome::default();
        let mut inbox = std::mem::take(&mut self.inbox);
        self.links.read_frames(&mut inbox);
        // The frames of a link closed for an earlier frame of this batch go with it; those of a
        // link the peer closed after sending them are read like any (its Down comes after).
        let mut broken: Vec<PeerId> = Vec::new();
        for (peer, frame) in inbox.drain(..) {
            if !broken.contains(&peer)
                && !self.frame(peer, &frame, gate, view, now, now_ms, &mut out)
            {
                broken.push(peer);
            }
        }
        self.inbox = inbox;
        self.verify(gate, view, now, now_ms, &mut out);
        self.send_frames();
        out
    }

    fn send_frames(&mut self) {
        for (peer, frame) in self.relay.flush() {
            if !self.links.send(&peer, frame) {
                self.relay.stats.dropped += 1;
            }
        }
    }

    /// Once a second: opens links while fewer than [`RELAY_OUTBOUND`] are this node's own (to
    /// connected peers picked at random, not `excluded`, not failed lately), and grafts back
    /// hosts gone silent. Every [`RELAY_ROTATE_MS`] it opens one link more and, once that one is
    /// up, closes its oldest: links that formed while the space was split (or small) would
    /// otherwise keep it split for good after it healed, each node's links all on its own side.
    pub fn maintain(
        &mut self,
        connected: impl Iterator<Item = PeerId>,
        excluded: impl Fn(&PeerId) -> bool,
        now_ms: u64,
    ) {
        self.rotations.start(now_ms);
        self.failed
            .retain(|_, at| now_ms.saturating_sub(*at) < RELAY_RETRY_MS);
        self.relay.repair(now_ms);
        let linked: Vec<PeerId> = self.links.linked().map(|(p, _)| p).collect();
        let connected: Vec<PeerId> = connected.collect();
        let pending = connected.iter().filter(|p| self.links.pending(p)).count();
        let mut candidates: Vec<PeerId> = connected
            .into_iter()
            .filter(|p| {
                !linked.contains(p)
                    && !self.links.pending(p)
                    && !self.failed.contains_key(p)
                    && !excluded(p)
            })
            .collect();
        let mut opening = self.links.outbound() + pending;
        // One too many up (a rotation done): the oldest goes.
        if self.links.outbound() > RELAY_OUTBOUND
            && let Some((&oldest, _)) = self.opened.iter().min_by_key(|(_, at)| **at)
        {
            self.links.close(&oldest);
            self.opened.remove(&oldest);
        }
        let mut want = RELAY_OUTBOUND;
        let relay = &self.relay;
        let hears = |p: &PeerId| {
            PublicKey::from_peer_id_bytes(&p.to_bytes()).is_some_and(|h| relay.hears(&h))
        };
        if opening >= RELAY_OUTBOUND
            && let Some(pick) = self.rotations.due(&candidates, hears, now_ms)
        {
            want += 1;
            candidates = pick;
        }
        while opening < want && !candidates.is_empty() {
            let i = random_below(candidates.len());
            let peer = candidates.swap_remove(i);
            self.links.open(peer);
            opening += 1;
        }
    }

    /// Whether `peer` is linked (either way) or a link to it is being opened.
    pub fn is_linked(&self, peer: &PeerId) -> bool {
        self.links.pending(peer) || self.links.linked().any(|(p, _)| p == *peer)
    }

    /// A connection to `peer` came up (`remote`: its address) or, with `None`, its last one
    /// closed: where a direct link to it is dialled.
    pub fn connection(&mut self, peer: PeerId, remote: Option<&libp2p::Multiaddr>) {
        match remote {
            Some(addr) => {
                if let Some(ip) = crate::direct::ip_of(addr) {
                    self.links.set_address(peer, Some(ip));
                }
            }
            None => self.links.set_address(peer, None),
        }
    }

    /// Closes the link to `peer` (a banned one).
    pub fn close(&mut self, peer: &PeerId) {
        self.links.close(peer);
    }

    pub fn summary(&self) -> RelaySummary {
        RelaySummary {
            outbound: self.links.outbound(),
            inbound: self.links.inbound(),
            direct: self.links.direct(),
            stats: self.relay.stats.clone(),
        }
    }
}

/// When a node rotates its links: the first time between half a [`RELAY_ROTATE_MS`] and one and a
/// half after it started, then as [`rotation`] says, each mixing wait drawn by [`mix_wait`].
#[derive(Debug, Default)]
struct Rotations {
    /// When the node last rotated (ms; 0: not started).
    last_ms: u64,
    /// How long after that it rotates to mix the graph.
    mix_wait_ms: u64,
    /// Rotations done.
    done: u32,
}

impl Rotations {
    /// Sets the first rotation's time, once. It comes at random, so that nodes started together
    /// (a department's machines booted at nine, a benchmark's space) do not all rotate in the
    /// same second ever after: each rotation re-forms part of the trees (prunes on the new link,
    /// grafts for the hosts that came over the old one), and a whole space doing that at once is
    /// a burst every period.
    fn start(&mut self, now_ms: u64) {
        if self.last_ms == 0 {
            let period = RELAY_ROTATE_MS as usize;
            self.last_ms = (now_ms + random_below(period) as u64).saturating_sub(period as u64 / 2);
            self.mix_wait_ms = mix_wait(0);
        }
    }

    /// The peers to rotate to if a rotation is due at `now_ms` ([`rotation`]), counted as done.
    fn due(
        &mut self,
        candidates: &[PeerId],
        hears: impl Fn(&PeerId) -> bool,
        now_ms: u64,
    ) -> Option<Vec<PeerId>> {
        let since_ms = now_ms.saturating_sub(self.last_ms);
        let pick = rotation(candidates, hears, since_ms, self.mix_wait_ms)?;
        self.last_ms = now_ms;
        self.done = self.done.saturating_add(1);
        self.mix_wait_ms = mix_wait(self.done);
        Some(pick)
    }
}

/// The peers a rotation picks from, if one is due `since_ms` after the last. A connected peer
/// whose adverts do not reach this node (`hears` says no) is a sign that the space is split with
/// this node's links all on its own side (or that the peer advertises nothing: an observer), so
/// after [`RELAY_ROTATE_MS`] the rotation links to one of those. While every candidate is heard,
/// links rotate only to mix the graph, after `mix_wait_ms`, to any candidate.
fn rotation(
    candidates: &[PeerId],
    hears: impl Fn(&PeerId) -> bool,
    since_ms: u64,
    mix_wait_ms: u64,
) -> Option<Vec<PeerId>> {
    if since_ms < RELAY_ROTATE_MS || candidates.is_empty() {
        return None;
    }
    let unheard: Vec<PeerId> = candidates.iter().filter(|p| !hears(p)).copied().collect();
    if !unheard.is_empty() {
        return Some(unheard);
    }
    (since_ms >= mix_wait_ms).then(|| candidates.to_vec())
}

/// A wait before the next rotation that only mixes the graph, after `rotations` done: in [½, 1½)
/// of [`RELAY_MIX_MS`] doubled for each, up to [`RELAY_MIX_MAX_MS`]. The first rotations re-form
/// the trees a space formed as it started (under load); later ones only keep the graph mixed.
fn mix_wait(rotations: u32) -> u64 {
    let period = RELAY_MIX_MS
        .saturating_mul(1 << rotations.min(16))
        .min(RELAY_MIX_MAX_MS);
    period / 2 + random_below(period as usize) as u64
}

/// A random index below `n` (n > 0), from the OS's generator; 0 if it fails.
fn random_below(n: usize) -> usize {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return 0;
    }
    (u64::from_le_bytes(b) % n as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use gleaner::SecretKey;

    #[test]
    fn a_rotation_links_an_unheard_peer_each_period_and_only_mixes_when_all_are_heard() {
        let peers: Vec<PeerId> = (0..5).map(|_| PeerId::random()).collect();
        let unheard = peers[3];
        let all_heard = |_: &PeerId| true;
        let but_one = |p: &PeerId| *p != unheard;
        let mix = RELAY_MIX_MS;
        assert_eq!(rotation(&peers, but_one, RELAY_ROTATE_MS - 1, mix), None);
        assert_eq!(
            rotation(&peers, but_one, RELAY_ROTATE_MS, mix),
            Some(vec![unheard])
        );
        assert_eq!(rotation(&peers, all_heard, RELAY_ROTATE_MS, mix), None);
        assert_eq!(rotation(&peers, all_heard, mix - 1, mix), None);
        assert_eq!(rotation(&peers, all_heard, mix, mix), Some(peers.clone()));
        assert_eq!(rotation(&[], but_one, mix, mix), None);
        // Mixing rotations spread over a whole period, so a space started at once does not
        // rotate in one burst; each rotation done doubles the period, up to its ceiling.
        assert!(2 * mix < RELAY_MIX_MAX_MS);
        for (done, period) in [(0, mix), (1, 2 * mix), (40, RELAY_MIX_MAX_MS)] {
            let waits: Vec<u64> = (0..2000).map(|_| mix_wait(done)).collect();
            assert!(
                waits
                    .iter()
                    .all(|w| (period / 2..period * 3 / 2).contains(w)),
                "after {done} rotations"
            );
            assert!(
                waits.iter().any(|w| *w < period * 3 / 4)
                    && waits.iter().any(|w| *w > period * 5 / 4),
                "after {done} rotations"
            );
        }
    }

    #[test]
    fn each_rotation_makes_the_next_mixing_one_wait_longer_but_not_one_to_an_unheard_peer() {
        let peers: Vec<PeerId> = (0..5).map(|_| PeerId::random()).collect();
        let start = 10_000_000;
        let mut r = Rotations::default();
        r.start(start);
        let first = r.last_ms;
        r.start(start + 5_000);
        assert_eq!(r.last_ms, first, "the first rotation's time is set once");
        let half = RELAY_ROTATE_MS / 2;
        assert!((start - half..start + half).contains(&first));
        // Every peer heard: mixing rotations only, each period double the last, up to the ceiling.
        let (mut at, mut now) = (vec![], start);
        while at.len() < 7 {
            now += 1_000;
            assert!(
                now < start + 4 * 3_600_000,
                "rotations stopped after {at:?}"
            );
            if let Some(pick) = r.due(&peers, |_| true, now) {
                assert_eq!(pick, peers);
                at.push(now);
            }
        }
        for (k, w) in at.windows(2).enumerate() {
            let period = (RELAY_MIX_MS << (k + 1)).min(RELAY_MIX_MAX_MS);
            let gap = w[1] - w[0];
            assert!(
                gap >= RELAY_ROTATE_MS && (period / 2..period * 3 / 2 + 1_000).contains(&gap),
                "rotation {}: {gap} ms after the last, where the period is {period} ms",
                k + 2
            );
        }
        assert_eq!(r.done, 7);
        // A peer not heard is rotated to a period after the last rotation, however many were done.
        let last = *at.last().unwrap_or(&now);
        let but_one = |p: &PeerId| *p != peers[2];
        assert_eq!(r.due(&peers, but_one, last + RELAY_ROTATE_MS - 1), None);
        assert_eq!(
            r.due(&peers, but_one, last + RELAY_ROTATE_MS),
            Some(vec![peers[2]])
        );
    }

    #[test]
    fn a_peer_id_names_its_host_key() {
        let key = SecretKey::from_seed([3; 32]);
        let peer = PeerId::from(crate::keypair(&key).unwrap().public());
        assert_eq!(
            PublicKey::from_peer_id_bytes(&peer.to_bytes()),
            Some(key.public())
        );
        assert_eq!(
            PublicKey::from_peer_id_bytes(&PeerId::random().to_bytes()),
            None
        );
    }
}
