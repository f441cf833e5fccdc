//! The checks a gossiped capacity advert or outcome report passes before a node takes it and lets
//! gossipsub forward it, cheapest first: size, envelope shape, kind for the topic, a well-formed
//! signer, that signer's rate, the signature and schema, then freshness and replay in the view.

use std::collections::HashMap;

use gleaner::advert::{CapacityAdvert, OutcomeReport};
use gleaner::chain::Refresh;
use gleaner::envelope::KeyCache;
use gleaner::space::{Refused, SpaceView};
use gleaner::{Digest, Envelope, Kind, PublicKey};

use crate::MAX_ADVERT;
use crate::tuning::{RATE_BURST, RATE_IDLE_MS, RATE_PER_S};

/// Verdict on one gossiped message.
#[derive(Debug)]
pub enum Verdict {
    Accept,
    Ignore(String),
    /// Taken before: ignored (the client also lowers its sender's application score).
    Replay(String),
    Reject(String),
}

/// Refills a token bucket of `burst` tokens at `per_s` and tells whether a token is there.
pub fn refill(tokens: &mut f64, last_ms: &mut u64, now_ms: u64, burst: f64, per_s: f64) -> bool {
    *tokens = (*tokens + now_ms.saturating_sub(*last_ms) as f64 / 1000.0 * per_s).min(burst);
    *last_ms = now_ms;
    *tokens >= 1.0
}

/// A token bucket per author (the envelope's signer): gossipsub carries no author, the envelope's
/// signer is the author. A token is looked at before the signature is checked and taken only once
/// the message verified and was news, so forgeries in an honest host's name cannot use up its
/// allowance, and a flood of well-formed messages costs a map lookup each, not a signature check.
#[derive(Debug, Default)]
pub struct AuthorRates {
    /// (tokens, last refill in ms).
    /// foldhash, seeded at random, as the view's host maps (a lookup for every advert and
    /// refresh).
    buckets: HashMap<PublicKey, (f64, u64), foldhash::quality::RandomState>,
}

impl AuthorRates {
    /// Whether `author` has a token left (refilled, not taken).
    pub fn ok(&mut self, author: PublicKey, now_ms: u64) -> bool {
        let (tokens, last) = self.buckets.entry(author).or_insert((RATE_BURST, now_ms));
        refill(tokens, last, now_ms, RATE_BURST, RATE_PER_S)
    }

    /// Takes a token from `author`'s bucket, once its message was accepted.
    pub fn take(&mut self, author: PublicKey) {
        if let Some((tokens, _)) = self.buckets.get_mut(&author) {
            *tokens = (*tokens - 1.0).max(0.0);
        }
    }

    /// Forgets authors not heard for a while (a full bucket again), so the map stays small.
    pub fn forget_idle(&mut self, now_ms: u64) {
        self.buckets
            .retain(|_, (_, last)| now_ms.saturating_sub(*last) < RATE_IDLE_MS);
    }
}

/// What checking a gossiped advert or outcome found.
#[derive(Debug)]
pub struct Checked {
    pub verdict: Verdict,
    /// For an advert taken into the view: its author and the machine types it shows running.
    pub running: Option<(PublicKey, Vec<Digest>)>,
}

/// The per-node state behind the checks on adverts and outcomes (rates and decompressed keys).
#[derive(Debug, Default)]
pub struct AdvertGate {
    pub rates: AuthorRates,
    /// Hosts' decompressed keys: each advert's signature is checked without decompressing its
    /// signer's key again.
    keys: KeyCache,
    /// Messages ignored because their author sent too many.
    pub rate_limited: u64,
}

impl AdvertGate {
    /// Checks a gossiped message of `kind` (a capacity advert or an outcome report) and, if it is
    /// good, takes it into `view`.
    ///
    /// Junk, relabelled messages and bad signatures or payloads are rejected (the relay should
    /// have checked, so they cost it its score). A stale message is ignored, not penalised: an
    /// honest relay may deliver an older advert after a newer one came another way, or have
    /// another clock. The very message taken before is a replay.
    pub fn check(
        &mut self,
        data: &[u8],
        kind: Kind,
        view: &mut SpaceView,
        now: u64,
        now_ms: u64,
    ) -> Checked {
        let mut running = None;
        let verdict = self.verdict(data, kind, view, now, now_ms, &mut running);
        Checked { verdict, running }
    }

    fn verdict(
        &mut self,
        data: &[u8],
        kind: Kind,
        view: &mut SpaceView,
        now: u64,
        now_ms: u64,
        news: &mut Option<(PublicKey, Vec<Digest>)>,
    ) -> Verdict {
        let (env, author) = match self.precheck(data, kind, now_ms) {
            Ok(v) => v,
            Err(v) => return v,
        };
        let refused = if kind == Kind::CapacityAdvert {
            match env.open_cached::<CapacityAdvert>(&mut self.keys) {
                Ok(v) => return self.take_advert(author, v.message, view, now, news),
                Err(e) => return Verdict::Reject(e.to_string()),
            }
        } else {
            match env.open_cached::<OutcomeReport>(&mut self.keys) {
                Ok(v) => view.outcome(&v.message, now),
                Err(e) => return Verdict::Reject(e.to_string()),
            }
        };
        self.verdict_of(author, refused)
    }

    /// Checks relayed capacity adverts as [`AdvertGate::check`] does each, with one batch
    /// verification of their signatures; good ones go into `view`. One verdict per item, in order.
    pub fn check_adverts(
        &mut self,
        items: &[&[u8]],
        view: &mut SpaceView,
        now: u64,
        now_ms: u64,
    ) -> Vec<Checked> {
        let mut out: Vec<Checked> = Vec::with_capacity(items.len());
        let mut envs = Vec::with_capacity(items.len());
        let mut at = Vec::with_capacity(items.len());
        for (i, data) in items.iter().enumerate() {
            match self.precheck(data, Kind::CapacityAdvert, now_ms) {
                Ok((env, _)) => {
                    envs.push(env);
                    at.push(i);
                    // Filled in below.
                    out.push(Checked {
                        verdict: Verdict::Accept,
                        running: None,
                    });
                }
                Err(verdict) => out.push(Checked {
                    verdict,
                    running: None,
                }),
            }
        }
        let opened = gleaner::envelope::open_batch_cached::<CapacityAdvert>(&envs, &mut self.keys);
        for (i, r) in at.into_iter().zip(opened) {
            let c = &mut out[i];
            c.verdict = match r {
                Ok((author, advert)) => self.take_advert(author, advert, view, now, &mut c.running),
                Err(e) => Verdict::Reject(e.to_string()),
            };
        }
        out
    }

    /// Checks a relayed refresh of a host's advert: that host's rate, then its link against the
    /// chain of the advert held ([`SpaceView::refresh`]). A link that does not hash to the chain
    /// is a forgery (rejected); a refresh of an advert not held is ignored (it may have expired
    /// here, or a newer one came first). A refresh reports no machine types: it cannot change
    /// those its anchor showed, which were reported when the anchor was taken, and a node that
    /// could not fetch one yet retries from the view.
    pub fn check_refresh(
        &mut self,
        r: &Refresh,
        view: &mut SpaceView,
        now: u64,
        now_ms: u64,
    ) -> Verdict {
        if !self.rates.ok(r.host, now_ms) {
            self.rate_limited += 1;
            return Verdict::Ignore(format!("{} sends too many messages", r.host));
        }
        match view.refresh(r, now) {
            Ok(_) => self.verdict_of(r.host, Ok(())),
            Err(e @ Refused::Forged(_)) => Verdict::Reject(e.to_string()),
            Err(e) => self.verdict_of(r.host, Err(e)),
        }
    }

    /// The checks before a signature (cheapest first): kind, size, shape, kind on the wire, a
    /// well-formed signer, and that signer's rate.
    fn precheck(
        &mut self,
        data: &[u8],
        kind: Kind,
        now_ms: u64,
    ) -> Result<(Envelope, PublicKey), Verdict> {
        if kind != Kind::CapacityAdvert && kind != Kind::Outcome {
            return Err(Verdict::Reject(format!(
                "{kind:?} is not an advert or outcome"
            )));
        }
        if data.len() > MAX_ADVERT {
            return Err(Verdict::Reject(format!(
                "{} bytes, at most {MAX_ADVERT}",
                data.len()
            )));
        }
        let env = Envelope::from_bytes(data).map_err(|e| Verdict::Reject(e.to_string()))?;
        if env.kind().ok() != Some(kind) {
            return Err(Verdict::Reject("wrong message kind for the topic".into()));
        }
        let author = env.signer().map_err(|e| Verdict::Reject(e.to_string()))?;
        if !self.rates.ok(author, now_ms) {
            self.rate_limited += 1;
            return Err(Verdict::Ignore(format!("{author} sends too many messages")));
        }
        Ok((env, author))
    }

    /// A verified advert into the view; its running types are news if it was taken.
    fn take_advert(
        &mut self,
        author: PublicKey,
        advert: CapacityAdvert,
        view: &mut SpaceView,
        now: u64,
        news: &mut Option<(PublicKey, Vec<Digest>)>,
    ) -> Verdict {
        let running: Vec<Digest> = advert.running.iter().map(|r| r.machine_type).collect();
        let r = view.insert(advert, now);
        if r.is_ok() {
            *news = Some((author, running));
        }
        self.verdict_of(author, r)
    }

    fn verdict_of(&mut self, author: PublicKey, r: Result<(), Refused>) -> Verdict {
        match r {
            Ok(()) => {
                self.rates.take(author);
                Verdict::Accept
            }
            Err(e @ Refused::Replay(_)) => Verdict::Replay(e.to_string()),
            Err(e) => Verdict::Ignore(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gleaner::OutcomeCode;
    use gleaner::SecretKey;
    use gleaner::advert::{Running, backend_bits};
    use gleaner::wire::Id16;

    const NOW: u64 = 1_800_000_000;

    fn advert(key: &SecretKey, seq: u64) -> Vec<u8> {
        let a = CapacityAdvert {
            v: 1,
            host: key.public(),
            seq,
            at: NOW,
            free_cores: 2,
            free_memory_mib: 1024,
            free_disk_mib: 0,
            backends: backend_bits::DOCKER,
            running: vec![Running {
                machine_type: Digest([3; 32]),
                count: 1,
            }],
            owner_present: false,
            draining: false,
            benchmark: 1000,
            chain: gleaner::Digest::default(),
        };
        Envelope::seal(&a, key).to_bytes()
    }

    /// `key`'s advert with its signature broken.
    fn forged(key: &SecretKey, seq: u64) -> Vec<u8> {
        let mut a = advert(key, seq);
        let last = a.len() - 1;
        a[last] ^= 1;
        a
    }

    fn check(g: &mut AdvertGate, v: &mut SpaceView, data: &[u8], ms: u64) -> Checked {
        g.check(data, Kind::CapacityAdvert, v, NOW, ms)
    }

    #[test]
    fn a_good_advert_is_taken_once_and_its_replay_is_named() {
        let (mut g, mut v) = (AdvertGate::default(), SpaceView::with_ttl(60));
        let key = SecretKey::from_seed([1; 32]);
        let a = advert(&key, 5);
        let c = check(&mut g, &mut v, &a, 0);
        assert!(matches!(c.verdict, Verdict::Accept), "{c:?}");
        assert_eq!(c.running, Some((key.public(), vec![Digest([3; 32])])));
        assert_eq!(v.peers().count(), 1);
        let c = check(&mut g, &mut v, &a, 0);
        assert!(matches!(c.verdict, Verdict::Replay(_)), "{c:?}");
        assert_eq!(c.running, None);
        // An older one may come from an honest relay: ignored, not a replay.
        let c = check(&mut g, &mut v, &advert(&key, 4), 0);
        assert!(matches!(c.verdict, Verdict::Ignore(_)), "{c:?}");
    }

    #[test]
    fn a_refresh_is_taken_after_its_anchor_once_and_a_forged_one_moves_nothing() {
        use gleaner::chain::{Advertiser, Outgoing};
        let (mut g, mut v) = (AdvertGate::default(), SpaceView::with_ttl(60));
        let key = SecretKey::from_seed([1; 32]);
        let content = Envelope::from_bytes(&advert(&key, 0))
            .unwrap()
            .open::<CapacityAdvert>()
            .unwrap()
            .message;
        let mut host = Advertiser::new(key.clone());
        let mut next = |at: u64| host.next(&content, at, || Some([9; 32]));
        let (Outgoing::Signed(anchor), Outgoing::Refresh(r), Outgoing::Refresh(r2)) =
            (next(NOW), next(NOW + 1), next(NOW + 2))
        else {
            panic!("the same content is signed once, then refreshed");
        };
        // Before its anchor: not taken.
        let verdict = g.check_refresh(&r, &mut v, NOW + 1, 1000);
        assert!(matches!(verdict, Verdict::Ignore(_)), "{verdict:?}");
        // The anchor reports the types it shows running, so a type not fetched yet is asked for.
        let c = check(&mut g, &mut v, &anchor.to_bytes(), 1000);
        assert!(matches!(c.verdict, Verdict::Accept), "{c:?}");
        assert_eq!(c.running, Some((key.public(), vec![Digest([3; 32])])));
        // Taken after it.
        let verdict = g.check_refresh(&r, &mut v, NOW + 1, 2000);
        assert!(matches!(verdict, Verdict::Accept), "{verdict:?}");
        assert_eq!(v.peer(&key.public()).unwrap().advert.seq, r.seq());
        // Again: a replay.
        let verdict = g.check_refresh(&r, &mut v, NOW + 1, 3000);
        assert!(matches!(verdict, Verdict::Replay(_)), "{verdict:?}");
        // A link that is not the host's: rejected, nothing moved.
        let forged = Refresh {
            link: [0xee; 32],
            ..r2
        };
        let verdict = g.check_refresh(&forged, &mut v, NOW + 2, 4000);
        assert!(matches!(verdict, Verdict::Reject(_)), "{verdict:?}");
        assert_eq!(v.peer(&key.public()).unwrap().advert.seq, r.seq());
    }

    #[test]
    fn a_batch_of_relayed_adverts_gets_the_verdicts_one_by_one_would() {
        let (mut g, mut v) = (AdvertGate::default(), SpaceView::with_ttl(60));
        let keys: Vec<SecretKey> = (1..=4).map(|i| SecretKey::from_seed([i; 32])).collect();
        let items = [
            advert(&keys[0], 5),
            forged(&keys[1], 1),
            b"junk".to_vec(),
            advert(&keys[2], 1),
            advert(&keys[0], 5),
            advert(&keys[3], 2),
            advert(&keys[3], 1),
        ];
        let refs: Vec<&[u8]> = items.iter().map(Vec::as_slice).collect();
        let out = g.check_adverts(&refs, &mut v, NOW, 0);
        let kinds: Vec<&str> = out
            .iter()
            .map(|c| match c.verdict {
                Verdict::Accept => "accept",
                Verdict::Reject(_) => "reject",
                Verdict::Replay(_) => "replay",
                Verdict::Ignore(_) => "ignore",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "accept", "reject", "reject", "accept", "replay", "accept", "ignore"
            ]
        );
        assert_eq!(
            out[3].running,
            Some((keys[2].public(), vec![Digest([3; 32])]))
        );
        assert_eq!(out[4].running, None);
        assert_eq!(v.peers().count(), 3);
    }

    #[test]
    fn junk_relabelled_forged_and_oversized_messages_are_rejected() {
        let (mut g, mut v) = (AdvertGate::default(), SpaceView::with_ttl(60));
        let key = SecretKey::from_seed([1; 32]);
        let big = vec![0u8; MAX_ADVERT + 1];
        for bad in [b"junk".to_vec(), forged(&key, 1), big] {
            let c = check(&mut g, &mut v, &bad, 0);
            assert!(matches!(c.verdict, Verdict::Reject(_)), "{c:?}");
        }
        // An advert on the outcome topic.
        let c = g.check(&advert(&key, 1), Kind::Outcome, &mut v, NOW, 0);
        assert!(matches!(c.verdict, Verdict::Reject(_)), "{c:?}");
        assert_eq!(v.peers().count(), 0);
    }

    #[test]
    fn an_outcome_is_taken_once() {
        let (mut g, mut v) = (AdvertGate::default(), SpaceView::with_ttl(60));
        let key = SecretKey::from_seed([1; 32]);
        let o = OutcomeReport {
            v: 1,
            host: key.public(),
            machine_id: Id16([9; 16]),
            machine_type: Digest([3; 32]),
            at: NOW,
            ran_s: 10,
            outcome: OutcomeCode::Success,
            detail: String::new(),
        };
        let o = Envelope::seal(&o, &key).to_bytes();
        let c = g.check(&o, Kind::Outcome, &mut v, NOW, 0);
        assert!(matches!(c.verdict, Verdict::Accept), "{c:?}");
        let c = g.check(&o, Kind::Outcome, &mut v, NOW, 0);
        assert!(matches!(c.verdict, Verdict::Replay(_)), "{c:?}");
    }

    #[test]
    fn an_author_is_held_to_its_rate_and_forgeries_do_not_spend_it() {
        let (mut g, mut v) = (AdvertGate::default(), SpaceView::with_ttl(60));
        let key = SecretKey::from_seed([1; 32]);
        // Forgeries in its name first: rejected, and no token taken.
        let forgery = forged(&key, 1000);
        for _ in 0..50 {
            let c = check(&mut g, &mut v, &forgery, 0);
            assert!(matches!(c.verdict, Verdict::Reject(_)), "{c:?}");
        }
        let burst = RATE_BURST as u64;
        for seq in 1..=burst {
            let c = check(&mut g, &mut v, &advert(&key, seq), 0);
            assert!(matches!(c.verdict, Verdict::Accept), "seq {seq}: {c:?}");
        }
        let c = check(&mut g, &mut v, &advert(&key, burst + 1), 0);
        assert!(matches!(c.verdict, Verdict::Ignore(_)), "{c:?}");
        assert_eq!(g.rate_limited, 1);
        // A second later the bucket has refilled by RATE_PER_S tokens.
        let c = check(&mut g, &mut v, &advert(&key, burst + 1), 1000);
        assert!(matches!(c.verdict, Verdict::Accept), "{c:?}");
        // Another author is not held to the first one's rate.
        let other = SecretKey::from_seed([2; 32]);
        let c = check(&mut g, &mut v, &advert(&other, 1), 1000);
        assert!(matches!(c.verdict, Verdict::Accept), "{c:?}");
        g.rates.forget_idle(1000 + RATE_IDLE_MS);
        assert!(g.rates.buckets.is_empty());
    }
}
