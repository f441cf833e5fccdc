//! The live view of a space, pure (time passed in): the latest capacity advert of every factory,
//! with expiry and replay protection, running machines per type across the space, and aborts that
//! back a machine type off everywhere (each machine's outcome taken once); and the space-wide
//! target-share choice of what to start next.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::advert::{CapacityAdvert, OutcomeReport};
use crate::chain::{Anchor, ChainError, Refresh};
use crate::{Digest, Id16, PublicKey};

/// How long an advert counts without a newer one.
pub const ADVERT_TTL_S: u64 = 60;
/// How far an advert's time may be from ours.
pub const CLOCK_SKEW_S: u64 = 300;
/// Outcomes remembered for replay protection. Outcomes older than [`CLOCK_SKEW_S`] are refused by
/// their clock and forgotten; past this bound the oldest are forgotten early and everything up to
/// their time is refused as stale, so a forgotten outcome can still never be taken twice.
pub const OUTCOMES_REMEMBERED: usize = 1 << 16;

/// Why a gossiped message was not taken into the view.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The same message again: an advert with the seq already taken, or a second outcome for a
    /// machine whose outcome was taken. Whoever sends it again is replaying it.
    #[error("replayed: {0} was taken before")]
    Replay(String),
    /// Older than what the view holds: honest relays deliver such messages when paths reorder.
    #[error("stale: {0}")]
    Stale(String),
    #[error("made at {at}, too far from now ({now})")]
    Clock { at: u64, now: u64 },
    /// A refresh of an advert this view does not hold (it expired, or a newer one came first):
    /// honest relays can deliver one.
    #[error("a refresh of advert {anchor_seq} of {host}, which this view does not hold")]
    Unanchored { host: PublicKey, anchor_seq: u64 },
    /// A refresh whose link does not hash to its anchor's chain: made up.
    #[error("{0}")]
    Forged(ChainError),
}

/// One peer as the view keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    pub advert: CapacityAdvert,
    pub received_at: u64,
}

/// The maps a refresh looks its host up in (about a hundred lookups a second at 100 hosts):
/// foldhash, seeded at random per process, as in the relay. Ordered maps cost each lookup a chain
/// of 32-byte key comparisons, each on a node of its own (4–6 % of a node's CPU at 100 nodes); the
/// random seed keeps keys, which anyone can pick, from being ground into collisions.
type HostMap<V> = HashMap<PublicKey, V, foldhash::quality::RandomState>;

/// What the view holds of one host, in one entry: a refresh (about a hundred a second at 100
/// hosts) looks its host up once. Its seq, its live advert and that advert's chain had a map each
/// (the adverts an ordered one): three lookups and a walk of 32-byte key comparisons per refresh,
/// ~2.5 % of a node's CPU at 100 nodes (docs/BENCHMARKS.md).
#[derive(Debug, Clone, PartialEq)]
struct Held {
    /// The highest seq taken, kept after the advert expires so that old adverts cannot come back.
    seq: u64,
    /// The live advert (none once expired).
    peer: Option<Peer>,
    /// The hash chain of the live advert, if it has one: what refreshes verify against.
    chain: Option<Anchor>,
}

/// The space as this factory sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct SpaceView {
    /// Seconds an advert counts without a newer one ([`ADVERT_TTL_S`] unless set).
    ttl_s: u64,
    /// Every host heard, live or expired.
    hosts: HostMap<Held>,
    /// Last abort (fizzle, lost heartbeat, error) of each machine type anywhere in the space.
    aborts: BTreeMap<Digest, u64>,
    /// Outcomes taken, by (host, machine), and the same ordered by their time for forgetting.
    outcomes: BTreeMap<(PublicKey, Id16), u64>,
    outcomes_by_time: BTreeSet<(u64, PublicKey, Id16)>,
    /// Outcomes made at or before this time are refused: some of them were forgotten early.
    outcomes_floor: u64,
}

impl Default for SpaceView {
    fn default() -> Self {
        SpaceView::with_ttl(ADVERT_TTL_S)
    }
}

impl SpaceView {
    /// An empty view whose adverts expire after `ttl_s` seconds.
    pub fn with_ttl(ttl_s: u64) -> Self {
        SpaceView {
            ttl_s,
            hosts: HostMap::default(),
            aborts: BTreeMap::new(),
            outcomes: BTreeMap::new(),
            outcomes_by_time: BTreeSet::new(),
            outcomes_floor: 0,
        }
    }

    /// Takes a verified advert into the view.
    pub fn insert(&mut self, advert: CapacityAdvert, now: u64) -> Result<(), Refused> {
        if advert.at.abs_diff(now) > CLOCK_SKEW_S {
            return Err(Refused::Clock { at: advert.at, now });
        }
        if let Some(h) = self.hosts.get(&advert.host) {
            if advert.seq == h.seq {
                return Err(Refused::Replay(format!(
                    "advert {} of {}",
                    advert.seq, advert.host
                )));
            }
            if advert.seq < h.seq {
                return Err(Refused::Stale(format!(
                    "advert seq {} of {} is below {}",
                    advert.seq, advert.host, h.seq
                )));
            }
        }
        self.hosts.insert(
            advert.host,
            Held {
                seq: advert.seq,
                chain: Anchor::of(&advert),
                peer: Some(Peer {
                    advert,
                    received_at: now,
                }),
            },
        );
        Ok(())
    }

    /// `host`'s advert as the view holds it, if it does.
    pub fn peer(&self, host: &PublicKey) -> Option<&Peer> {
        self.hosts.get(host).and_then(|h| h.peer.as_ref())
    }

    /// The seq of the anchor whose refreshes this view can check for `host`, if it holds one.
    pub fn anchor_seq(&self, host: &PublicKey) -> Option<u64> {
        self.hosts
            .get(host)
            .and_then(|h| h.chain.as_ref())
            .map(|a| a.seq)
    }

    /// Takes a refresh of a host's advert: its link is checked against the chain of the advert
    /// held (a few SHA-256 calls), and the advert takes the refresh's seq and time. Returns the
    /// advert as it now is.
    pub fn refresh(&mut self, r: &Refresh, now: u64) -> Result<&Peer, Refused> {
        let seq = r.seq();
        let unanchored = Refused::Unanchored {
            host: r.host,
            anchor_seq: r.anchor_seq,
        };
        let Some(h) = self.hosts.get_mut(&r.host) else {
            return Err(unanchored);
        };
        if seq == h.seq {
            return Err(Refused::Replay(format!("advert {seq} of {}", r.host)));
        }
        if seq < h.seq {
            return Err(Refused::Stale(format!(
                "advert seq {seq} of {} is below {}",
                r.host, h.seq
            )));
        }
        let (Some(anchor), Some(peer)) = (h.chain.as_mut(), h.peer.as_mut()) else {
            return Err(unanchored);
        };
        if anchor.seq != r.anchor_seq {
            return Err(unanchored);
        }
        // The time is checked on a copy: a refresh from too far in the future moves nothing.
        let mut next = anchor.clone();
        let at = next.advance(r).map_err(Refused::Forged)?;
        if at.abs_diff(now) > CLOCK_SKEW_S {
            return Err(Refused::Clock { at, now });
        }
        *anchor = next;
        h.seq = seq;
        peer.advert.seq = seq;
        peer.advert.at = at;
        peer.received_at = now;
        Ok(peer)
    }

    /// Takes a verified outcome into the view, once per machine; aborts start a back-off for
    /// their type.
    pub fn outcome(&mut self, report: &OutcomeReport, now: u64) -> Result<(), Refused> {
        if report.at.abs_diff(now) > CLOCK_SKEW_S {
            return Err(Refused::Clock { at: report.at, now });
        }
        let key = (report.host, report.machine_id);
        if self.outcomes.contains_key(&key) {
            return Err(Refused::Replay(format!(
                "the outcome of machine {} on {}",
                report.machine_id, report.host
            )));
        }
        if report.at <= self.outcomes_floor {
            return Err(Refused::Stale(format!(
                "outcome made at {}, not after {} (outcomes up to then were forgotten)",
                report.at, self.outcomes_floor
            )));
        }
        self.forget_outcomes(now);
        while self.outcomes.len() >= OUTCOMES_REMEMBERED {
            let Some(oldest) = self.outcomes_by_time.pop_first() else {
                break;
            };
            self.outcomes.remove(&(oldest.1, oldest.2));
            self.outcomes_floor = self.outcomes_floor.max(oldest.0);
        }
        if report.at <= self.outcomes_floor {
            return Err(Refused::Stale(format!(
                "outcome made at {}, not after {} (outcomes up to then were forgotten)",
                report.at, self.outcomes_floor
            )));
        }
        self.outcomes.insert(key, report.at);
        self.outcomes_by_time
            .insert((report.at, report.host, report.machine_id));
        if report.outcome.is_abort() {
            let e = self.aborts.entry(report.machine_type).or_insert(0);
            *e = (*e).max(report.at);
        }
        Ok(())
    }

    /// Forgets adverts older than the TTL, and outcomes too old to pass the clock check.
    pub fn expire(&mut self, now: u64) {
        for h in self.hosts.values_mut() {
            if h.peer
                .as_ref()
                .is_some_and(|p| now.saturating_sub(p.received_at) > self.ttl_s)
            {
                h.peer = None;
                h.chain = None;
            }
        }
        self.forget_outcomes(now);
    }

    /// Outcomes made more than [`CLOCK_SKEW_S`] ago are refused by their clock: no need to
    /// remember them.
    fn forget_outcomes(&mut self, now: u64) {
        let horizon = now.saturating_sub(CLOCK_SKEW_S);
        while let Some(&(at, host, id)) = self.outcomes_by_time.first() {
            if at >= horizon {
                break;
            }
            self.outcomes_by_time.pop_first();
            self.outcomes.remove(&(host, id));
        }
    }

    /// Outcomes remembered for replay protection (bounded by [`OUTCOMES_REMEMBERED`]).
    pub fn outcomes_remembered(&self) -> usize {
        self.outcomes.len()
    }

    /// Live peers (after [`SpaceView::expire`]), ordered by host.
    pub fn peers(&self) -> impl Iterator<Item = &Peer> {
        let mut peers: Vec<&Peer> = self.live().collect();
        peers.sort_unstable_by_key(|p| p.advert.host);
        peers.into_iter()
    }

    /// Live peers in no order, for sums.
    fn live(&self) -> impl Iterator<Item = &Peer> {
        self.hosts.values().filter_map(|h| h.peer.as_ref())
    }

    /// Machines of `machine_type` running across the space.
    pub fn running(&self, machine_type: &Digest) -> u64 {
        self.live()
            .flat_map(|p| p.advert.running.iter())
            .filter(|r| &r.machine_type == machine_type)
            .map(|r| u64::from(r.count))
            .sum()
    }

    /// Machines per type that hosts other than `me` run, by their latest adverts. A factory adds
    /// its own machines from its own state, which is fresher than its last advert.
    pub fn running_elsewhere(&self, me: &PublicKey) -> BTreeMap<Digest, u64> {
        let mut out = BTreeMap::new();
        for p in self.live().filter(|p| &p.advert.host != me) {
            for r in &p.advert.running {
                *out.entry(r.machine_type).or_insert(0) += u64::from(r.count);
            }
        }
        out
    }

    /// How many factories may start a machine on the current view at once: this one plus every
    /// other live peer with a free core that is neither draining nor in use by its owner.
    pub fn deciders(&self, me: &PublicKey) -> u64 {
        1 + self
            .live()
            .filter(|p| &p.advert.host != me)
            .filter(|p| p.advert.free_cores > 0 && !p.advert.draining && !p.advert.owner_present)
            .count() as u64
    }

    /// When the last abort of `machine_type` anywhere in the space happened.
    pub fn last_abort(&self, machine_type: &Digest) -> Option<u64> {
        self.aborts.get(machine_type).copied()
    }

    /// Free cores across the live space.
    pub fn free_cores(&self) -> u64 {
        self.live().map(|p| u64::from(p.advert.free_cores)).sum()
    }
}

/// Which machine type a factory should start next so that the space as a whole converges on the
/// target shares (Vac's target shares, held across factories instead of inside one).
///
/// `candidates` are the types this factory could start now (trusted, fresh, not backed off, fitting)
/// with their shares; `running` counts each type's machines across the whole space, this factory's
/// included; `horizon` is how many factories may start a machine on this same view before the
/// next adverts show it (see [`SpaceView::deciders`]; 1 for a factory alone). After those starts
/// the space would run `n = Σ running + horizon` machines of these types, of which type `i` should
/// have `n · share_i / Σ share`; its *deficit* is that minus what runs. The pick is drawn with
/// probability proportional to the positive deficits, using `salt` (uniform, different per factory
/// and per decision) as the draw: factories deciding at the same moment on the same view spread
/// their starts over the lagging types in proportion to how far each lags, instead of all starting
/// the single most-lagging type and overshooting it. Shares that are
/// not finite and positive are never picked. Ties are broken by digest, so the result is a pure
/// function of its inputs.
pub fn pick_by_space_share(
    candidates: &[(Digest, f64)],
    running: &BTreeMap<Digest, u64>,
    horizon: u64,
    salt: u64,
) -> Option<Digest> {
    let mut c: Vec<(Digest, f64)> = candidates
        .iter()
        .filter(|(_, s)| s.is_finite() && *s > 0.0)
        .copied()
        .collect();
    c.sort_by_key(|a| a.0);
    c.dedup_by(|a, b| a.0 == b.0);
    let total_share: f64 = c.iter().map(|(_, s)| s).sum();
    if c.is_empty() || !total_share.is_finite() {
        return None;
    }
    let count = |d: &Digest| running.get(d).copied().unwrap_or(0) as f64;
    let n = c.iter().map(|(d, _)| count(d)).sum::<f64>() + horizon.max(1) as f64;
    let deficits: Vec<f64> = c
        .iter()
        .map(|(d, s)| (n * s / total_share - count(d)).max(0.0))
        .collect();
    let total: f64 = deficits.iter().sum();
    if total <= 0.0 {
        // Cannot happen (the targets add up to more than what runs), but never divide by 0.
        return c.first().map(|(d, _)| *d);
    }
    // 53 random bits as a fraction in [0, 1).
    let mut left = (salt >> 11) as f64 / (1u64 << 53) as f64 * total;
    for ((d, _), w) in c.iter().zip(&deficits) {
        if *w > 0.0 && left < *w {
            return Some(*d);
        }
        left -= w;
    }
    // Rounding left us past the end: the last type with a deficit.
    c.iter()
        .zip(&deficits)
        .rev()
        .find(|(_, w)| **w > 0.0)
        .map(|((d, _), _)| *d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advert::Running;
    use crate::{Id16, OutcomeCode, SecretKey};

    fn advert(seed: u8, seq: u64, at: u64, running: u16) -> CapacityAdvert {
        CapacityAdvert {
            v: 1,
            host: SecretKey::from_seed([seed; 32]).public(),
            seq,
            at,
            free_cores: 2,
            free_memory_mib: 1024,
            free_disk_mib: 1024,
            backends: 1,
            running: vec![Running {
                machine_type: Digest([1; 32]),
                count: running,
            }],
            owner_present: false,
            draining: false,
            benchmark: 1000,
            chain: crate::Digest::default(),
        }
    }

    #[test]
    fn replay_clock_expiry_and_counts() {
        let mut v = SpaceView::default();
        v.insert(advert(1, 1, 1000, 2), 1000).unwrap();
        v.insert(advert(2, 5, 1000, 1), 1000).unwrap();
        assert_eq!(v.running(&Digest([1; 32])), 3);
        assert!(matches!(
            v.insert(advert(1, 1, 1001, 9), 1001),
            Err(Refused::Replay(_))
        ));
        assert!(matches!(
            v.insert(advert(1, 2, 5000, 0), 1001),
            Err(Refused::Clock { .. })
        ));
        v.insert(advert(1, 2, 1030, 0), 1030).unwrap();
        assert_eq!(v.running(&Digest([1; 32])), 1);
        v.expire(1000 + ADVERT_TTL_S + 1);
        assert_eq!(v.peers().count(), 1, "host 2 expired");
        // An expired host's old advert cannot come back.
        assert!(v.insert(advert(2, 5, 1061, 1), 1061).is_err());
        assert_eq!(v.free_cores(), 2);
    }

    #[test]
    fn refreshes_move_the_advert_on_and_forged_or_orphan_ones_do_not() {
        use crate::chain::{Advertiser, Outgoing, Refresh};
        let key = SecretKey::from_seed([1; 32]);
        let mut host = Advertiser::new(key.clone());
        let next = |host: &mut Advertiser, at: u64, cores: u16| {
            host.next(
                &CapacityAdvert {
                    free_cores: cores,
                    ..advert(1, 0, 0, 1)
                },
                at,
                || Some([at as u8; 32]),
            )
        };
        let Outgoing::Signed(env) = next(&mut host, 1000, 2) else {
            panic!("the first advert is signed");
        };
        let anchor = env.open::<CapacityAdvert>().unwrap().message;
        let mut v = SpaceView::default();
        // A refresh before its anchor: not held, nothing moves.
        let Outgoing::Refresh(r1) = next(&mut host, 1001, 2) else {
            panic!("same content a second later is a refresh");
        };
        assert!(matches!(
            v.refresh(&r1, 1001),
            Err(Refused::Unanchored { .. })
        ));
        v.insert(anchor.clone(), 1000).unwrap();
        // The advert as it now is comes back, and is what the view holds.
        let taken = v.refresh(&r1, 1001).unwrap().clone();
        let p = v.peers().next().unwrap();
        assert_eq!(&taken, p);
        assert_eq!(
            (p.advert.seq, p.advert.at, p.received_at),
            (anchor.seq + 1, 1001, 1001)
        );
        assert_eq!(p.advert.free_cores, 2);
        assert!(matches!(v.refresh(&r1, 1001), Err(Refused::Replay(_))));
        // Forged: a link that is not the host's. Nothing moves.
        let Outgoing::Refresh(r2) = next(&mut host, 1002, 2) else {
            panic!("a refresh");
        };
        let forged = Refresh {
            link: [0xee; 32],
            ..r2
        };
        assert!(matches!(v.refresh(&forged, 1002), Err(Refused::Forged(_))));
        // A link that hashes right but claims a time far off: refused by the clock, and the real
        // one still verifies after it.
        assert!(matches!(
            v.refresh(&r2, 1002 + CLOCK_SKEW_S + 10),
            Err(Refused::Clock { .. })
        ));
        v.refresh(&r2, 1002).unwrap();
        assert_eq!(v.peers().next().unwrap().advert.seq, anchor.seq + 2);
        // The content changes: a new anchor; refreshes of the old one no longer hold.
        let Outgoing::Signed(env) = next(&mut host, 1003, 1) else {
            panic!("new content is signed");
        };
        v.insert(env.open::<CapacityAdvert>().unwrap().message, 1003)
            .unwrap();
        let stale = Refresh {
            anchor_seq: anchor.seq,
            index: 50,
            ..r2
        };
        assert!(matches!(
            v.refresh(&stale, 1004),
            Err(Refused::Unanchored { .. })
        ));
        // Expired with its advert, the chain goes too.
        v.expire(1003 + ADVERT_TTL_S + 1);
        let Outgoing::Refresh(late) = next(&mut host, 1003 + ADVERT_TTL_S + 2, 1) else {
            panic!("a refresh");
        };
        assert!(matches!(
            v.refresh(&late, 1003 + ADVERT_TTL_S + 2),
            Err(Refused::Unanchored { .. })
        ));
    }

    #[test]
    fn aborts_anywhere_are_remembered() {
        let mut v = SpaceView::default();
        let r = OutcomeReport {
            v: 1,
            host: SecretKey::from_seed([1; 32]).public(),
            machine_id: Id16([0; 16]),
            machine_type: Digest([7; 32]),
            at: 1000,
            ran_s: 3,
            outcome: OutcomeCode::Fizzle,
            detail: String::new(),
        };
        v.outcome(&r, 1000).unwrap();
        assert_eq!(v.last_abort(&Digest([7; 32])), Some(1000));
        let ok = OutcomeReport {
            outcome: OutcomeCode::Success,
            machine_id: Id16([1; 16]),
            at: 2000,
            ..r
        };
        v.outcome(&ok, 2000).unwrap();
        assert_eq!(v.last_abort(&Digest([7; 32])), Some(1000));
    }

    fn outcome(host: u8, id: u8, at: u64) -> OutcomeReport {
        OutcomeReport {
            v: 1,
            host: SecretKey::from_seed([host; 32]).public(),
            machine_id: Id16([id; 16]),
            machine_type: Digest([7; 32]),
            at,
            ran_s: 3,
            outcome: OutcomeCode::Fizzle,
            detail: String::new(),
        }
    }

    #[test]
    fn an_outcome_is_taken_once_per_machine() {
        let mut v = SpaceView::default();
        v.outcome(&outcome(1, 1, 1000), 1000).unwrap();
        // The same report later, or another report for the same machine: a replay.
        assert!(matches!(
            v.outcome(&outcome(1, 1, 1000), 1100),
            Err(Refused::Replay(_))
        ));
        assert!(matches!(
            v.outcome(&outcome(1, 1, 1050), 1100),
            Err(Refused::Replay(_))
        ));
        // Another machine, or the same machine id on another host, is news.
        v.outcome(&outcome(1, 2, 1000), 1100).unwrap();
        v.outcome(&outcome(2, 1, 1000), 1100).unwrap();
        // Once too old for the clock check it is forgotten, and still refused (by the clock).
        v.expire(1000 + CLOCK_SKEW_S + 1);
        assert_eq!(v.outcomes_remembered(), 0);
        assert!(matches!(
            v.outcome(&outcome(1, 1, 1000), 1000 + CLOCK_SKEW_S + 1),
            Err(Refused::Clock { .. })
        ));
        // A stale advert (below the last seq) is not a replay of the last one.
        v.insert(advert(1, 5, 1300, 1), 1300).unwrap();
        assert!(matches!(
            v.insert(advert(1, 4, 1300, 1), 1300),
            Err(Refused::Stale(_))
        ));
    }

    #[test]
    fn forgetting_outcomes_early_never_lets_one_back_in() {
        let mut v = SpaceView::default();
        let now = 10_000;
        // Fill the memory with outcomes (a thousand per second of `at`), then one more.
        let template = outcome(1, 0, now - 200);
        for i in 0..OUTCOMES_REMEMBERED as u64 {
            let r = OutcomeReport {
                machine_id: Id16((i as u128).to_be_bytes()),
                at: now - 200 + i / 1000,
                ..template.clone()
            };
            v.outcome(&r, now).unwrap();
        }
        let mut last = outcome(1, 0, now);
        last.machine_id = Id16(u128::MAX.to_be_bytes());
        v.outcome(&last, now).unwrap();
        assert!(v.outcomes_remembered() <= OUTCOMES_REMEMBERED);
        // The first one was forgotten to make room; replaying it is refused as stale.
        let mut first = outcome(1, 0, now - 200);
        first.machine_id = Id16(0u128.to_be_bytes());
        assert!(matches!(v.outcome(&first, now), Err(Refused::Stale(_))));
    }

    fn d(n: u8) -> Digest {
        Digest([n; 32])
    }

    fn counts(c: &[(u8, u64)]) -> BTreeMap<Digest, u64> {
        c.iter().map(|&(n, k)| (d(n), k)).collect()
    }

    /// A salt that draws the fraction `f` of the total deficit.
    fn at(f: f64) -> u64 {
        ((f * (1u64 << 53) as f64) as u64) << 11
    }

    #[test]
    fn space_share_table() {
        // (candidates with shares, running across the space, draw, expected pick), horizon 1
        type Case = (&'static [(u8, f64)], &'static [(u8, u64)], f64, Option<u8>);
        let cases: &[Case] = &[
            // Nothing to choose from, or only invalid shares.
            (&[], &[], 0.5, None),
            (&[(1, 0.0), (2, -1.0), (3, f64::NAN)], &[], 0.5, None),
            // One candidate is always picked, whatever runs.
            (&[(1, 1.0)], &[(1, 40)], 0.99, Some(1)),
            // Empty space, equal shares: the draw splits evenly.
            (&[(1, 1.0), (2, 1.0)], &[], 0.49, Some(1)),
            (&[(1, 1.0), (2, 1.0)], &[], 0.51, Some(2)),
            // 3:1 shares, 3 vs 0 running: n = 4, targets 3 and 1, only type 2 lags.
            (&[(1, 3.0), (2, 1.0)], &[(1, 3)], 0.0, Some(2)),
            (&[(1, 3.0), (2, 1.0)], &[(1, 3)], 0.99, Some(2)),
            // At the target (3:1 running 6:2): n = 9, deficits 0.75 and 0.25.
            (&[(1, 3.0), (2, 1.0)], &[(1, 6), (2, 2)], 0.7, Some(1)),
            (&[(1, 3.0), (2, 1.0)], &[(1, 6), (2, 2)], 0.8, Some(2)),
            // Other factories run lots of type 1: this one starts type 2 even if it runs none.
            (&[(1, 1.0), (2, 1.0)], &[(1, 50), (2, 10)], 0.0, Some(2)),
            // Types this factory cannot start now do not count (2 backed off here).
            (
                &[(1, 1.0), (3, 1.0)],
                &[(1, 5), (2, 100), (3, 5)],
                0.3,
                Some(1),
            ),
            // Running counts of unknown types are ignored; duplicates counted once.
            (&[(1, 1.0), (1, 1.0), (2, 1.0)], &[(9, 7)], 0.75, Some(2)),
            // A zero share never runs, a tiny one still does when it lags.
            (&[(1, 1.0), (2, 0.0)], &[(1, 9)], 0.99, Some(1)),
            (&[(1, 1000.0), (2, 1.0)], &[(1, 2000)], 0.99, Some(2)),
            // The largest draw stays in range.
            (&[(1, 1.0), (2, 1.0)], &[], 1.0 - f64::EPSILON, Some(2)),
        ];
        for (i, (cands, running, draw, want)) in cases.iter().enumerate() {
            let cands: Vec<(Digest, f64)> = cands.iter().map(|&(n, s)| (d(n), s)).collect();
            let got = pick_by_space_share(&cands, &counts(running), 1, at(*draw));
            assert_eq!(got, want.map(d), "case {i}");
        }
        assert_eq!(
            pick_by_space_share(&[(d(1), 1.0), (d(2), 1.0)], &BTreeMap::new(), 1, u64::MAX),
            Some(d(2))
        );
        // With 10 factories deciding at once, 1:1 and 6 vs 0 running: n = 16, deficits 2 and 8,
        // so most (not all) starts go to the lagging type.
        let c = [(d(1), 1.0), (d(2), 1.0)];
        let r = counts(&[(1, 6)]);
        assert_eq!(pick_by_space_share(&c, &r, 10, at(0.19)), Some(d(1)));
        assert_eq!(pick_by_space_share(&c, &r, 10, at(0.21)), Some(d(2)));
        // The same with horizon 1: only the lagging type.
        assert_eq!(pick_by_space_share(&c, &r, 1, at(0.0)), Some(d(2)));
    }

    /// 40 factories decide all at once, in rounds, each on the view of the previous round (as
    /// gossip delivers it, late). Returns the space's running machines per type.
    fn simulate(shares: &[(Digest, f64)], rounds: usize, horizon: u64) -> BTreeMap<Digest, u64> {
        let factories = 40;
        let mut total: BTreeMap<Digest, u64> = BTreeMap::new();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..rounds {
            let view = total.clone();
            for _ in 0..factories {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let pick = pick_by_space_share(shares, &view, horizon, rng).unwrap();
                *total.entry(pick).or_insert(0) += 1;
            }
        }
        total
    }

    #[test]
    fn the_space_converges_on_the_shares() {
        let shares = [(d(1), 5.0), (d(2), 3.0), (d(3), 2.0)];
        let off = |total: &BTreeMap<Digest, u64>| {
            let n: u64 = total.values().sum();
            shares
                .iter()
                .map(|(dg, s)| {
                    let want = n as f64 * s / 10.0;
                    (total.get(dg).copied().unwrap_or(0) as f64 - want).abs()
                })
                .fold(0.0, f64::max)
        };
        // Knowing how many decide at once, 160 starts land within a few machines of 80:48:32.
        let good = simulate(&shares, 4, 40);
        assert_eq!(good.values().sum::<u64>(), 160);
        assert!(off(&good) <= 6.0, "{good:?}");
        // Deciding as if alone, simultaneous factories pile onto whichever type lags and overshoot.
        let naive = simulate(&shares, 4, 1);
        assert!(off(&naive) > 2.0 * off(&good), "{naive:?} vs {good:?}");
    }

    #[test]
    fn running_elsewhere_leaves_out_this_host_and_ttl_is_settable() {
        let mut v = SpaceView::with_ttl(5);
        v.insert(advert(1, 1, 1000, 2), 1000).unwrap();
        v.insert(advert(2, 1, 1000, 3), 1000).unwrap();
        let me = SecretKey::from_seed([1; 32]).public();
        assert_eq!(v.running_elsewhere(&me), counts(&[(1, 3)]));
        assert_eq!(v.deciders(&me), 2);
        v.expire(1006);
        assert_eq!(v.peers().count(), 0);
    }
}
