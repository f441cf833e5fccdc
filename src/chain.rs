//! Refreshes: a host says "my last signed advert still holds" with one link of a hash chain
//! instead of a new Ed25519 signature, so that a node checks most adverts with a few SHA-256
//! calls (well under a microsecond each) rather than a signature check (15–38 µs).
//!
//! A signed advert ("anchor") commits in its `chain` field to x₀, the end of a chain the host
//! drew from a random x_L: x_{i−1} = SHA-256(tag ‖ i ‖ x_i). Refresh i reveals x_i, and means
//! "the anchor with seq = anchor.seq + i, made at anchor.at + i seconds". Only the host knows
//! x_i before it reveals it, and hashing x_i down to the last link a node verified proves it is
//! the host's. A relay cannot change what a refresh says: seq and time follow from the index,
//! the content is the anchor's, so a refresh can be withheld or delayed like any message (by at
//! most the same clock skew as a signed advert) but not bent. Indices are the seconds since the
//! anchor (one more when the last refresh already took this second's), so a link is never more
//! than a second early; a change of content, a third advert within one second, or the end of
//! the chain ([`CHAIN_LEN`] s) makes a new signed anchor. See docs/protocol.md, "Refreshes".

use sha2::Digest as _;

use crate::advert::CapacityAdvert;
use crate::envelope::Envelope;
use crate::ident::{PublicKey, SecretKey};
use crate::wire::Digest;

/// Links in a chain: seconds an anchor can be refreshed for. It also bounds the SHA-256 calls one
/// refresh can cost a node (a refresh after a gap hashes once per second missed).
pub const CHAIN_LEN: u16 = 120;

/// Domain tag of the chain's hash.
const TAG: &[u8] = b"gleaner advert chain v1";

/// One step down the chain: x_{i−1} from x_i.
pub fn step(index: u16, link: &[u8; 32]) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    h.update(TAG);
    h.update(index.to_be_bytes());
    h.update(link);
    h.finalize().into()
}

/// A refresh as it travels: the anchor it refreshes (host and seq), its index, and link x_index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refresh {
    pub host: PublicKey,
    pub anchor_seq: u64,
    pub index: u16,
    pub link: [u8; 32],
}

/// Bytes of a refresh on the wire (after its tag in a relay frame).
pub const REFRESH_LEN: usize = 32 + 8 + 2 + 32;

impl Refresh {
    /// The seq this refresh gives its host's advert.
    pub fn seq(&self) -> u64 {
        self.anchor_seq.saturating_add(self.index.into())
    }

    /// Host, anchor seq (big-endian), index (big-endian), link.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.host.to_bytes());
        out.extend_from_slice(&self.anchor_seq.to_be_bytes());
        out.extend_from_slice(&self.index.to_be_bytes());
        out.extend_from_slice(&self.link);
    }

    /// Reads [`REFRESH_LEN`] bytes (`None` if there are fewer).
    pub fn decode(b: &[u8]) -> Option<Refresh> {
        let b: &[u8; REFRESH_LEN] = b.get(..REFRESH_LEN)?.try_into().ok()?;
        let (host, rest) = b.split_at(32);
        let (seq, rest) = rest.split_at(8);
        let (index, link) = rest.split_at(2);
        Some(Refresh {
            host: PublicKey::from_wire(host).ok()?,
            anchor_seq: u64::from_be_bytes(seq.try_into().ok()?),
            index: u16::from_be_bytes(index.try_into().ok()?),
            link: link.try_into().ok()?,
        })
    }
}

/// What a node holds of a host's chain: the anchor's seq, time and commitment, and the last link
/// it verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    pub seq: u64,
    pub at: u64,
    pub index: u16,
    pub link: [u8; 32],
}

/// Why a refresh does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("refresh index {index} is outside 1..={CHAIN_LEN}")]
    Index { index: u16 },
    #[error("refresh index {index} is not after the last verified, {last}")]
    Old { index: u16, last: u16 },
    #[error("refresh {index} of advert {seq} does not hash to its chain")]
    Forged { seq: u64, index: u16 },
}

impl Anchor {
    /// The chain of a signed advert, if it has one (a zero commitment: none).
    pub fn of(advert: &CapacityAdvert) -> Option<Anchor> {
        (advert.chain != Digest::default()).then_some(Anchor {
            seq: advert.seq,
            at: advert.at,
            index: 0,
            link: advert.chain.0,
        })
    }

    /// Checks refresh `r` of this anchor (its seq matches) against the last verified link and, if
    /// it holds, moves on to it. Returns the refreshed advert's time.
    pub fn advance(&mut self, r: &Refresh) -> Result<u64, ChainError> {
        if r.index == 0 || r.index > CHAIN_LEN {
            return Err(ChainError::Index { index: r.index });
        }
        if r.index <= self.index {
            return Err(ChainError::Old {
                index: r.index,
                last: self.index,
            });
        }
        let mut x = r.link;
        for i in (self.index + 1..=r.index).rev() {
            x = step(i, &x);
        }
        if x != self.link {
            return Err(ChainError::Forged {
                seq: self.seq,
                index: r.index,
            });
        }
        self.index = r.index;
        self.link = r.link;
        Ok(self.at + u64::from(r.index))
    }
}

/// What a host sends: a signed advert (an anchor), or a refresh of the last one.
#[derive(Debug, Clone)]
pub enum Outgoing {
    Signed(Envelope),
    Refresh(Refresh),
}

/// The host's side: turns each advert it makes into a refresh when the content is what the last
/// anchor said, or into a new signed anchor.
pub struct Advertiser {
    key: SecretKey,
    last_seq: u64,
    current: Option<Current>,
}

struct Current {
    /// As signed: host, seq, time and chain filled in.
    advert: CapacityAdvert,
    /// links[i] = x_i, 0..=CHAIN_LEN.
    links: Vec<[u8; 32]>,
    index: u16,
}

/// Whether two adverts say the same apart from host, seq, time and chain.
fn same_content(a: &CapacityAdvert, b: &CapacityAdvert) -> bool {
    a.v == b.v
        && a.free_cores == b.free_cores
        && a.free_memory_mib == b.free_memory_mib
        && a.free_disk_mib == b.free_disk_mib
        && a.backends == b.backends
        && a.running == b.running
        && a.owner_present == b.owner_present
        && a.draining == b.draining
        && a.benchmark == b.benchmark
}

impl Advertiser {
    pub fn new(key: SecretKey) -> Advertiser {
        Advertiser {
            key,
            last_seq: 0,
            current: None,
        }
    }

    pub fn host(&self) -> PublicKey {
        self.key.public()
    }

    /// The advert to send for `content` at `now` (Unix seconds). Its host, seq, time and chain are
    /// set here; `content.seq` is a floor for a new anchor's seq (a host that restarts passes a
    /// floor above anything it sent before, e.g. its clock in ms). `seed` gives 32 random bytes
    /// when a new chain is drawn; without them (`None`) the advert is signed with no chain.
    pub fn next(
        &mut self,
        content: &CapacityAdvert,
        now: u64,
        seed: impl FnOnce() -> Option<[u8; 32]>,
    ) -> Outgoing {
        if let Some(c) = &mut self.current
            && same_content(&c.advert, content)
            && let Some(elapsed) = now.checked_sub(c.advert.at)
            // The next index is the seconds elapsed, or one past the last if that was this
            // second's already: a host that advertises once a second on a busy runtime sees two
            // adverts fall within one second now and then (and none in the next), and would
            // otherwise sign each of those anew.
            && let next = elapsed.max(u64::from(c.index) + 1)
            && next <= elapsed + 1
            && next <= u64::from(CHAIN_LEN)
        {
            let index = next as u16;
            c.index = index;
            let r = Refresh {
                host: c.advert.host,
                anchor_seq: c.advert.seq,
                index,
                link: c.links[usize::from(index)],
            };
            self.last_seq = r.seq();
            return Outgoing::Refresh(r);
        }
        let mut advert = content.clone();
        advert.host = self.key.public();
        advert.seq = content.seq.max(self.last_seq.saturating_add(1));
        advert.at = now;
        advert.chain = Digest::default();
        self.last_seq = advert.seq;
        self.current = None;
        if let Some(end) = seed() {
            let mut links = vec![[0u8; 32]; usize::from(CHAIN_LEN) + 1];
            links[usize::from(CHAIN_LEN)] = end;
            for i in (1..=CHAIN_LEN).rev() {
                links[usize::from(i) - 1] = step(i, &links[usize::from(i)]);
            }
            advert.chain = Digest(links[0]);
            let env = Envelope::seal(&advert, &self.key);
            self.current = Some(Current {
                advert,
                links,
                index: 0,
            });
            return Outgoing::Signed(env);
        }
        Outgoing::Signed(Envelope::seal(&advert, &self.key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn content(free: u16) -> CapacityAdvert {
        CapacityAdvert {
            v: 1,
            host: SecretKey::from_seed([0; 32]).public(),
            seq: 0,
            at: 0,
            free_cores: free,
            free_memory_mib: 1024,
            free_disk_mib: 0,
            backends: 1,
            running: vec![],
            owner_present: false,
            draining: false,
            benchmark: 1,
            chain: Digest::default(),
        }
    }

    fn signed(o: Outgoing) -> CapacityAdvert {
        match o {
            Outgoing::Signed(env) => env.open::<CapacityAdvert>().expect("verifies").message,
            Outgoing::Refresh(r) => panic!("a refresh, {r:?}, where a signed advert was due"),
        }
    }

    fn refresh(o: Outgoing) -> Refresh {
        match o {
            Outgoing::Refresh(r) => r,
            Outgoing::Signed(_) => panic!("a signed advert where a refresh was due"),
        }
    }

    #[test]
    fn refreshes_verify_and_forgeries_do_not() {
        let key = SecretKey::from_seed([3; 32]);
        let mut a = Advertiser::new(key.clone());
        let anchor = signed(a.next(&content(2), NOW, || Some([9; 32])));
        assert_eq!((anchor.host, anchor.at), (key.public(), NOW));
        let mut held = Anchor::of(&anchor).expect("the advert commits to a chain");

        // One a second, verified one by one; the seq and time follow from the index.
        let r1 = refresh(a.next(&content(2), NOW + 1, || unreachable!()));
        assert_eq!(
            (r1.anchor_seq, r1.index, r1.seq()),
            (anchor.seq, 1, anchor.seq + 1)
        );
        assert_eq!(held.advance(&r1), Ok(NOW + 1));
        // Seconds missed: the next refresh hashes down over the gap.
        let r5 = refresh(a.next(&content(2), NOW + 5, || unreachable!()));
        assert_eq!(r5.index, 5);
        assert_eq!(held.advance(&r5), Ok(NOW + 5));
        // The same again, or an older one: not after the last verified.
        assert_eq!(
            held.advance(&r1),
            Err(ChainError::Old { index: 1, last: 5 })
        );
        assert!(matches!(held.advance(&r5), Err(ChainError::Old { .. })));

        // A relay cannot make a later refresh from the one it carries: a made-up link, or the
        // link it saw moved to a later index, does not hash to the chain.
        let r6 = refresh(a.next(&content(2), NOW + 6, || unreachable!()));
        for bad in [
            Refresh {
                link: [1; 32],
                ..r6
            },
            Refresh { index: 7, ..r6 },
            Refresh { index: 6, ..r5 },
        ] {
            assert!(
                matches!(held.copy_advance(&bad), Err(ChainError::Forged { .. })),
                "{bad:?} passed"
            );
        }
        assert_eq!(
            held.advance(&Refresh { index: 0, ..r6 }),
            Err(ChainError::Index { index: 0 })
        );
        assert_eq!(held.advance(&r6), Ok(NOW + 6));

        // On the wire and back.
        let mut w = Vec::new();
        r6.encode(&mut w);
        assert_eq!(w.len(), REFRESH_LEN);
        assert_eq!(Refresh::decode(&w), Some(r6));
        assert_eq!(Refresh::decode(&w[1..]), None);
    }

    #[test]
    fn a_new_anchor_when_content_changes_a_second_repeats_or_the_chain_ends() {
        let mut a = Advertiser::new(SecretKey::from_seed([4; 32]));
        let first = signed(a.next(&content(2), NOW, || Some([1; 32])));
        // Within the anchor's second: index 1, a second early at most.
        assert_eq!(
            refresh(a.next(&content(2), NOW, || unreachable!())).index,
            1
        );
        // Once more within it: that would be two seconds early, so a new anchor.
        let again = signed(a.next(&content(2), NOW, || Some([2; 32])));
        assert!(again.seq > first.seq + 1);
        assert_ne!(again.chain, first.chain);
        // Two in one second after a second with none (a busy runtime's 1 s ticks): both refresh.
        assert_eq!(
            refresh(a.next(&content(2), NOW + 2, || unreachable!())).index,
            2
        );
        assert_eq!(
            refresh(a.next(&content(2), NOW + 2, || unreachable!())).index,
            3
        );
        let r = refresh(a.next(&content(2), NOW + 3, || unreachable!()));
        assert_eq!(r.index, 4);
        let r = refresh(a.next(&content(2), NOW + 5, || unreachable!()));
        assert_eq!(r.index, 5);
        // Other content: signed, with a seq above the refresh's.
        let changed = signed(a.next(&content(1), NOW + 4, || Some([3; 32])));
        assert_eq!(changed.free_cores, 1);
        assert!(changed.seq > r.seq());
        // After a restart the host starts a new Advertiser: the floor it passes is taken.
        let floor = CapacityAdvert {
            seq: changed.seq + 1000,
            ..content(1)
        };
        let mut restarted = Advertiser::new(SecretKey::from_seed([4; 32]));
        assert_eq!(
            signed(restarted.next(&floor, NOW + 5, || Some([4; 32]))).seq,
            changed.seq + 1000
        );
        // The chain's last second is a refresh; past it, a new anchor.
        let end = NOW + 4 + u64::from(CHAIN_LEN);
        assert_eq!(
            refresh(a.next(&content(1), end, || unreachable!())).index,
            CHAIN_LEN
        );
        signed(a.next(&content(1), end + 1, || Some([5; 32])));
        // A clock that went back: a new anchor, never an index below the last.
        signed(a.next(&content(1), NOW, || Some([6; 32])));
        // No randomness to draw a chain from: signed with none, and signed again next time.
        let plain = signed(a.next(&content(3), NOW + 1, || None));
        assert_eq!(plain.chain, Digest::default());
        assert!(Anchor::of(&plain).is_none());
        signed(a.next(&content(3), NOW + 2, || None));
    }

    impl Anchor {
        /// `advance` on a copy, for checks that must not move the original.
        fn copy_advance(&self, r: &Refresh) -> Result<u64, ChainError> {
            self.clone().advance(r)
        }
    }
}
