//! Trust in publishers, pure: signed key rotations and revocations, per-publisher policy, and the
//! admission verdict for a machine type. The client keeps the store on disk; this decides.
//!
//! A rotation is signed by the old key ("this new key replaces me") and moves the old key's trust,
//! policy and all, to the new key; afterwards types signed by the old key are refused. A revocation
//! is signed by the key itself and refuses that key for good — and with it every key joined to it
//! by rotations, before or after: whoever held a revoked key could have signed a rotation to a key
//! of their own, so no key of that chain can be told apart from a thief's. A publisher who rotated
//! and then revokes (the old key or the new) is trusted again only when the owner trusts a fresh
//! key that no rotation joins to the chain.

use std::collections::{BTreeMap, BTreeSet};

use crate::Error;
use crate::envelope::{Kind, Message, Verified, check_version};
use crate::ident::PublicKey;
use crate::machine_type::{Backend, MachineType};
use crate::wire::wire_struct;

/// The rotation and revocation schema version this build writes and reads.
pub const TRUST_VERSION: u8 = 1;

/// Longest reason a revocation may carry.
pub const REASON_MAX: usize = 512;

/// Longest chain of rotations followed from a listed key (a bound against cycles and abuse).
pub const ROTATION_CHAIN_MAX: usize = 16;

wire_struct! {
/// "`new` replaces me", signed by `old`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRotation {
    pub v: u8,
    /// The key being replaced; must be the envelope's signer.
    pub old: PublicKey,
    /// The key that takes over the old key's trust.
    pub new: PublicKey,
    /// Unix seconds when made (informational; order of arrival decides).
    pub at: u64,
}
}

impl Message for KeyRotation {
    const KIND: Kind = Kind::KeyRotation;

    fn validate(&self, signer: &PublicKey) -> Result<(), Error> {
        check_version("key rotation", self.v, TRUST_VERSION)?;
        if &self.old != signer {
            return Err(Error::invalid(
                "old",
                format!("names {} but was signed by {signer}", self.old),
            ));
        }
        if self.new == self.old {
            return Err(Error::invalid("new", "a key cannot replace itself"));
        }
        self.new.verifying_key()?;
        Ok(())
    }
}

wire_struct! {
/// "Refuse everything signed by me", signed by `key` itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    pub v: u8,
    /// The revoked key; must be the envelope's signer.
    pub key: PublicKey,
    /// Unix seconds when made.
    pub at: u64,
    /// Why, for people (at most [`REASON_MAX`] bytes).
    pub reason: String,
}
}

impl Message for Revocation {
    const KIND: Kind = Kind::Revocation;

    fn validate(&self, signer: &PublicKey) -> Result<(), Error> {
        check_version("revocation", self.v, TRUST_VERSION)?;
        if &self.key != signer {
            return Err(Error::invalid(
                "key",
                format!("names {} but was signed by {signer}", self.key),
            ));
        }
        if self.reason.len() > REASON_MAX {
            return Err(Error::invalid(
                "reason",
                format!("{} bytes, at most {REASON_MAX}", self.reason.len()),
            ));
        }
        Ok(())
    }
}

/// What this host lets one publisher run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Target share among trusted publishers (relative weight, > 0).
    pub share: f64,
    /// VM machine types may run.
    pub allow_vms: bool,
    /// Machine types that ask for outbound network may run.
    pub allow_egress: bool,
    /// Most cores one machine of this publisher gets; a type needing more is refused.
    pub max_cores: Option<u16>,
}

impl Default for Policy {
    /// Share 1, containers only, no network, no core cap beyond the owner's limits.
    fn default() -> Self {
        Policy {
            share: 1.0,
            allow_vms: false,
            allow_egress: false,
            max_cores: None,
        }
    }
}

impl Policy {
    /// The policy that lets exactly this machine type run (for "trust the publisher of this file").
    pub fn for_type(mt: &MachineType) -> Policy {
        Policy {
            share: 1.0,
            allow_vms: mt.backend == Backend::Vm,
            allow_egress: mt.allows_network(),
            max_cores: None,
        }
    }

    /// Checks a machine type against this policy; the answer is the cores cap for its machines.
    pub fn check(&self, mt: &MachineType) -> Result<u16, Refused> {
        let publisher = mt.publisher;
        if mt.backend == Backend::Vm && !self.allow_vms {
            return Err(Refused::VmsNotAllowed { publisher });
        }
        if mt.allows_network() && !self.allow_egress {
            return Err(Refused::EgressNotAllowed {
                publisher,
                egress: mt.egress.join(" "),
            });
        }
        match self.max_cores {
            Some(cap) if mt.cores_min > cap => Err(Refused::TooManyCores {
                publisher,
                needs: mt.cores_min,
                cap,
            }),
            Some(cap) => Ok(mt.cores_max.min(cap)),
            None => Ok(mt.cores_max),
        }
    }
}

/// Why a machine type or key is refused; each says what to do about it where there is a fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("publisher {publisher} is not trusted (`gleaner trust add {publisher}`)")]
    NotTrusted { publisher: PublicKey },
    #[error("key {key} was revoked at {at}: {reason}")]
    Revoked {
        key: PublicKey,
        at: u64,
        reason: String,
    },
    #[error(
        "key {old} was rotated to {new}: only types signed by the new key are accepted (re-sign with it)"
    )]
    RotatedAway { old: PublicKey, new: PublicKey },
    #[error("publisher {publisher} may not run VMs here (allow_vms is off)")]
    VmsNotAllowed { publisher: PublicKey },
    #[error(
        "the type asks for network egress ({egress}) but publisher {publisher} may not use the network here (allow_egress is off)"
    )]
    EgressNotAllowed {
        publisher: PublicKey,
        egress: String,
    },
    #[error(
        "the type needs at least {needs} cores but publisher {publisher} is capped at {cap} here (max_cores)"
    )]
    TooManyCores {
        publisher: PublicKey,
        needs: u16,
        cap: u16,
    },
    #[error("key {old} was already rotated to {to}")]
    AlreadyRotated { old: PublicKey, to: PublicKey },
    #[error("the rotation from {old} to {new} would make a cycle")]
    Cycle { old: PublicKey, new: PublicKey },
}

/// A machine type admitted by the trust set: its share and the cores cap for its machines.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Admission {
    pub share: f64,
    pub max_cores: u16,
}

/// Whether a rotation or revocation changed anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    New,
    AlreadyKnown,
}

/// The publishers trusted here, with the rotations and revocations that bear on them.
///
/// Keys are *listed* with a policy as the owner or department wrote them; rotations move a listed
/// key's trust to its newest successor; revoked keys are never admitted.
#[derive(Debug, Clone, Default)]
pub struct TrustSet {
    listed: BTreeMap<PublicKey, Policy>,
    rotations: BTreeMap<PublicKey, (PublicKey, u64)>,
    revoked: BTreeMap<PublicKey, (u64, String)>,
}

impl TrustSet {
    /// Lists `key` with `policy` (replacing an earlier listing of the same key).
    pub fn list(&mut self, key: PublicKey, policy: Policy) {
        self.listed.insert(key, policy);
    }

    /// Records a verified rotation. Refused when a key joined to the old or the new key by
    /// rotations is revoked, when the old key already rotated to another key, or when the new key
    /// leads back to the old one.
    pub fn rotate(&mut self, r: &Verified<KeyRotation>) -> Result<Applied, Refused> {
        let (old, new) = (r.message.old, r.message.new);
        if let Some(e) = self.revoked_in_chain(old) {
            return Err(e);
        }
        if let Some((to, _)) = self.rotations.get(&old) {
            return if *to == new {
                Ok(Applied::AlreadyKnown)
            } else {
                Err(Refused::AlreadyRotated { old, to: *to })
            };
        }
        if let Some(e) = self.revoked_in_chain(new) {
            return Err(e);
        }
        if self.chain(new).contains(&old) {
            return Err(Refused::Cycle { old, new });
        }
        self.rotations.insert(old, (new, r.message.at));
        Ok(Applied::New)
    }

    /// Records a verified revocation.
    pub fn revoke(&mut self, r: &Verified<Revocation>) -> Applied {
        if self.revoked.contains_key(&r.message.key) {
            return Applied::AlreadyKnown;
        }
        self.revoked
            .insert(r.message.key, (r.message.at, r.message.reason.clone()));
        Applied::New
    }

    /// Every key joined to `key` by rotations, in either direction (its predecessors, its
    /// successors, and their other predecessors), `key` included.
    fn linked(&self, key: PublicKey) -> BTreeSet<PublicKey> {
        let mut seen = BTreeSet::from([key]);
        let mut todo = vec![key];
        while let Some(k) = todo.pop() {
            let next = self.rotations.get(&k).map(|(n, _)| *n);
            let prev = self
                .rotations
                .iter()
                .filter(|(_, (n, _))| *n == k)
                .map(|(o, _)| *o);
            for j in next.into_iter().chain(prev) {
                if seen.insert(j) {
                    todo.push(j);
                }
            }
        }
        seen
    }

    /// The revocation that ends `key`'s trust: of `key` itself, or of any key joined to it by
    /// rotations (revoking the old key after a rotation must not leave the thief's new key
    /// trusted, and revoking the new key must not hand trust back to the old one).
    pub fn revoked_in_chain(&self, key: PublicKey) -> Option<Refused> {
        let found = |k: &PublicKey| {
            self.revoked.get(k).map(|(at, reason)| Refused::Revoked {
                key: *k,
                at: *at,
                reason: reason.clone(),
            })
        };
        found(&key).or_else(|| self.linked(key).iter().find_map(found))
    }

    /// Whether `key` bears on this set: it, or a key joined to it by rotations, is listed. Signed
    /// rotations and revocations that bear on nothing here need not be kept.
    pub fn concerns(&self, key: PublicKey) -> bool {
        self.linked(key).iter().any(|k| self.listed.contains_key(k))
    }

    /// `key` and its successors, in order, at most [`ROTATION_CHAIN_MAX`] long.
    fn chain(&self, key: PublicKey) -> Vec<PublicKey> {
        let mut out = vec![key];
        let mut k = key;
        while let Some((next, _)) = self.rotations.get(&k) {
            if out.contains(next) || out.len() >= ROTATION_CHAIN_MAX {
                break;
            }
            out.push(*next);
            k = *next;
        }
        out
    }

    /// The newest successor of `key` (itself when never rotated).
    pub fn resolve(&self, key: PublicKey) -> PublicKey {
        self.chain(key).last().copied().unwrap_or(key)
    }

    /// The key `key`'s trust lands on (its newest successor), or why none: a key of its chain is
    /// revoked.
    pub fn check_listable(&self, key: PublicKey) -> Result<PublicKey, Refused> {
        match self.revoked_in_chain(key) {
            Some(e) => Err(e),
            None => Ok(self.resolve(key)),
        }
    }

    /// The keys trusted now with their policies, after rotations and revocations. A key listed
    /// under its own name wins over a listing that rotated onto it.
    pub fn effective(&self) -> BTreeMap<PublicKey, Policy> {
        let mut out = BTreeMap::new();
        for (k, p) in &self.listed {
            let Ok(resolved) = self.check_listable(*k) else {
                continue;
            };
            if resolved == *k || !self.listed.contains_key(&resolved) {
                out.entry(resolved).or_insert(*p);
            }
        }
        out
    }

    /// The listed keys whose trust now lands on `key` through rotations (not `key` itself).
    pub fn rotated_onto(&self, key: PublicKey) -> Vec<PublicKey> {
        self.rotations
            .keys()
            .filter(|k| **k != key && self.resolve(**k) == key)
            .copied()
            .collect()
    }

    /// Revoked keys with when and why.
    pub fn revoked(&self) -> impl Iterator<Item = (&PublicKey, &(u64, String))> {
        self.revoked.iter()
    }

    /// Rotations as (old, new, at).
    pub fn rotations(&self) -> impl Iterator<Item = (PublicKey, PublicKey, u64)> + '_ {
        self.rotations.iter().map(|(o, (n, at))| (*o, *n, *at))
    }

    /// The verdict on a verified machine type: its share and cores cap, or why it is refused.
    pub fn admit(&self, mt: &MachineType) -> Result<Admission, Refused> {
        let key = mt.publisher;
        if let Some(e) = self.revoked_in_chain(key) {
            return Err(e);
        }
        if self.rotations.contains_key(&key) {
            return Err(Refused::RotatedAway {
                old: key,
                new: self.resolve(key),
            });
        }
        let Some(policy) = self.effective().get(&key).copied() else {
            return Err(Refused::NotTrusted { publisher: key });
        };
        let max_cores = policy.check(mt)?;
        Ok(Admission {
            share: policy.share,
            max_cores,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Envelope, SecretKey};

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed([n; 32])
    }

    fn rotation(old: &SecretKey, new: &SecretKey) -> Verified<KeyRotation> {
        let m = KeyRotation {
            v: TRUST_VERSION,
            old: old.public(),
            new: new.public(),
            at: 1_800_000_000,
        };
        Envelope::seal(&m, old).open().unwrap()
    }

    fn revocation(k: &SecretKey) -> Verified<Revocation> {
        let m = Revocation {
            v: TRUST_VERSION,
            key: k.public(),
            at: 1_800_000_100,
            reason: "laptop stolen".into(),
        };
        Envelope::seal(&m, k).open().unwrap()
    }

    fn mt(k: &SecretKey) -> MachineType {
        MachineType::example(k.public())
    }

    #[test]
    fn rotation_must_be_signed_by_the_old_key() {
        let (a, b) = (key(1), key(2));
        let forged = KeyRotation {
            v: TRUST_VERSION,
            old: a.public(),
            new: b.public(),
            at: 0,
        };
        // Signed by the new key, not the old one: refused before it reaches the trust set.
        assert!(Envelope::seal(&forged, &b).open::<KeyRotation>().is_err());
        let selfish = KeyRotation {
            new: a.public(),
            ..forged.clone()
        };
        assert!(Envelope::seal(&selfish, &a).open::<KeyRotation>().is_err());
        let other = Revocation {
            v: TRUST_VERSION,
            key: a.public(),
            at: 0,
            reason: String::new(),
        };
        assert!(Envelope::seal(&other, &b).open::<Revocation>().is_err());
        // Domain separation: a rotation never opens as a revocation.
        let env = Envelope::seal(&forged, &a);
        assert!(env.open::<Revocation>().is_err());
    }

    #[test]
    fn rotation_moves_trust_and_refuses_the_old_key() {
        let (a, b) = (key(1), key(2));
        let mut t = TrustSet::default();
        let policy = Policy {
            share: 3.0,
            max_cores: Some(1),
            ..Policy::default()
        };
        t.list(a.public(), policy);
        assert_eq!(t.admit(&mt(&a)).unwrap().share, 3.0);
        assert!(matches!(t.admit(&mt(&b)), Err(Refused::NotTrusted { .. })));
        assert_eq!(t.rotate(&rotation(&a, &b)), Ok(Applied::New));
        assert_eq!(t.rotate(&rotation(&a, &b)), Ok(Applied::AlreadyKnown));
        let adm = t.admit(&mt(&b)).unwrap();
        assert_eq!((adm.share, adm.max_cores), (3.0, 1));
        assert!(matches!(
            t.admit(&mt(&a)),
            Err(Refused::RotatedAway { new, .. }) if new == b.public()
        ));
        assert_eq!(t.rotated_onto(b.public()), vec![a.public()]);
        // A second rotation of the same old key elsewhere is refused; a cycle too.
        assert!(matches!(
            t.rotate(&rotation(&a, &key(3))),
            Err(Refused::AlreadyRotated { .. })
        ));
        assert!(matches!(
            t.rotate(&rotation(&b, &a)),
            Err(Refused::Cycle { .. })
        ));
    }

    #[test]
    fn revocation_refuses_the_key_and_others_are_unaffected() {
        let (a, c) = (key(1), key(3));
        let mut t = TrustSet::default();
        t.list(a.public(), Policy::default());
        t.list(c.public(), Policy::default());
        assert_eq!(t.revoke(&revocation(&c)), Applied::New);
        assert_eq!(t.revoke(&revocation(&c)), Applied::AlreadyKnown);
        let err = t.admit(&mt(&c)).unwrap_err();
        assert!(err.to_string().contains("laptop stolen"), "{err}");
        assert!(t.check_listable(c.public()).is_err());
        assert!(t.admit(&mt(&a)).is_ok());
        assert_eq!(t.effective().keys().collect::<Vec<_>>(), vec![&a.public()]);
    }

    /// What happens to each key after a sequence of rotations and revocations.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Op {
        List(u8),
        Rotate(u8, u8),
        Revoke(u8),
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Then {
        Admitted,
        /// Refused because this key (by seed) is revoked.
        RevokedBy(u8),
        RotatedAway,
        NotTrusted,
    }

    fn verdict(t: &TrustSet, n: u8) -> Then {
        match t.admit(&mt(&key(n))) {
            Ok(_) => Then::Admitted,
            Err(Refused::Revoked { key: k, .. }) => {
                Then::RevokedBy((1..=9).find(|i| key(*i).public() == k).unwrap_or(0))
            }
            Err(Refused::RotatedAway { .. }) => Then::RotatedAway,
            Err(Refused::NotTrusted { .. }) => Then::NotTrusted,
            Err(e) => panic!("unexpected refusal of key {n}: {e}"),
        }
    }

    #[test]
    fn revoking_any_key_of_a_rotation_chain_ends_trust_in_the_whole_chain() {
        use Op::*;
        use Then::*;
        type Case<'a> = (&'a str, &'a [Op], &'a [(u8, Then)]);
        let table: &[Case] = &[
            (
                "rotation alone moves trust",
                &[List(1), Rotate(1, 2)],
                &[(1, RotatedAway), (2, Admitted)],
            ),
            (
                "rotate, then revoke the old key: a thief's rotation must not survive",
                &[List(1), Rotate(1, 2), Revoke(1)],
                &[(1, RevokedBy(1)), (2, RevokedBy(1))],
            ),
            (
                "rotate, then revoke the new key: trust does not fall back to the old one",
                &[List(1), Rotate(1, 2), Revoke(2)],
                &[(1, RevokedBy(2)), (2, RevokedBy(2))],
            ),
            (
                "a longer chain, revoked at its start",
                &[List(1), Rotate(1, 2), Rotate(2, 3), Revoke(1)],
                &[(1, RevokedBy(1)), (2, RevokedBy(1)), (3, RevokedBy(1))],
            ),
            (
                "a longer chain, revoked in its middle",
                &[List(1), Rotate(1, 2), Rotate(2, 3), Revoke(2)],
                &[(1, RevokedBy(2)), (2, RevokedBy(2)), (3, RevokedBy(2))],
            ),
            (
                "the new key listed by itself too is revoked with the chain",
                &[List(1), List(2), Rotate(1, 2), Revoke(1)],
                &[(1, RevokedBy(1)), (2, RevokedBy(1))],
            ),
            (
                "revoked first, then a rotation is refused: the new key gains nothing",
                &[List(1), Revoke(1), Rotate(1, 2)],
                &[(1, RevokedBy(1)), (2, NotTrusted)],
            ),
            (
                "a rotation onto a revoked key is refused",
                &[List(1), Revoke(2), Rotate(1, 2)],
                &[(1, Admitted), (2, RevokedBy(2))],
            ),
            (
                "a rotation onto a chain that holds a revoked key is refused",
                &[List(1), Rotate(2, 3), Revoke(2), Rotate(1, 3)],
                &[(1, Admitted), (3, RevokedBy(2))],
            ),
            (
                "another publisher is unaffected",
                &[List(1), List(5), Rotate(1, 2), Revoke(2)],
                &[(1, RevokedBy(2)), (2, RevokedBy(2)), (5, Admitted)],
            ),
        ];
        for (name, ops, then) in table {
            let mut t = TrustSet::default();
            for op in *ops {
                match *op {
                    List(n) => t.list(key(n).public(), Policy::default()),
                    Rotate(o, n) => {
                        let _ = t.rotate(&rotation(&key(o), &key(n)));
                    }
                    Revoke(n) => {
                        t.revoke(&revocation(&key(n)));
                    }
                }
            }
            for (n, want) in *then {
                assert_eq!(verdict(&t, *n), *want, "{name}: key {n}");
                // The listing and the trust command agree with the verdict.
                let listable = t.check_listable(key(*n).public()).is_ok();
                assert_eq!(
                    listable,
                    !matches!(want, RevokedBy(_)),
                    "{name}: check_listable of key {n}"
                );
                if let RevokedBy(_) = want {
                    let k = key(*n).public();
                    let effective = t.effective();
                    assert!(
                        !effective.contains_key(&k) && !effective.contains_key(&t.resolve(k)),
                        "{name}: key {n} or its successor is still trusted: {effective:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn concerns_follows_rotations_both_ways() {
        let mut t = TrustSet::default();
        t.list(key(1).public(), Policy::default());
        t.rotate(&rotation(&key(1), &key(2))).unwrap();
        assert!(t.concerns(key(1).public()));
        assert!(t.concerns(key(2).public()), "a successor of a listed key");
        assert!(!t.concerns(key(7).public()), "a stranger");
        t.rotate(&rotation(&key(6), &key(2))).unwrap();
        assert!(
            t.concerns(key(6).public()),
            "another predecessor of the same key"
        );
    }

    #[test]
    fn policy_refuses_vms_egress_and_cores_with_reasons() {
        let a = key(1);
        let mut t = TrustSet::default();
        t.list(
            a.public(),
            Policy {
                max_cores: Some(2),
                ..Policy::default()
            },
        );
        let mut vm = mt(&a);
        vm.backend = Backend::Vm;
        vm.image = None;
        let e = t.admit(&vm).unwrap_err();
        assert!(e.to_string().contains("allow_vms"), "{e}");
        let mut net = mt(&a);
        net.egress = vec!["queue.example.org:443".into()];
        let e = t.admit(&net).unwrap_err();
        assert!(e.to_string().contains("allow_egress"), "{e}");
        let mut big = mt(&a);
        big.cores_min = 4;
        big.cores_max = 8;
        let e = t.admit(&big).unwrap_err();
        assert!(e.to_string().contains("at least 4 cores"), "{e}");
        // Within the cap's reach, the machine is capped rather than refused.
        big.cores_min = 1;
        assert_eq!(t.admit(&big).unwrap().max_cores, 2);
        // The policy that a machine-type file asks for lets exactly that file run.
        t.list(a.public(), Policy::for_type(&net));
        assert!(t.admit(&net).is_ok());
        assert!(t.admit(&vm).is_err());
    }
}
