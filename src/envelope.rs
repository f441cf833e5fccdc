//! Signed envelopes: payload bytes + signer + an ed25519 signature over a per-kind domain tag and the
//! payload. The payload is decoded only after the signature holds.
//!
//! Wire layout (docs/protocol.md): a CBOR array `[version, kind, signer, signature, payload]` where
//! version is 1, kind a small unsigned integer, signer a 32-byte string, signature a 64-byte string and
//! payload a byte string holding the CBOR of the message. The signed bytes are
//! `"gleaner/v1/" || kind name || 0x00 || payload`.

use serde::{Serialize, de::DeserializeOwned};

use crate::Error;
use crate::cbor::{self, Limits};
use crate::ident::{PublicKey, SecretKey};
use crate::wire::{Digest, wire_code, wire_struct};

/// The envelope format version this build writes and reads.
pub const ENVELOPE_VERSION: u8 = 1;

wire_code! {
    /// What a signed envelope carries; part of the signed bytes, so a signature for one kind never
    /// verifies as another.
    Kind {
        MachineType = 1 => "machine-type",
        UsageRecord = 2 => "usage-record",
        CapacityAdvert = 3 => "capacity-advert",
        Outcome = 4 => "outcome",
        Enrolment = 5 => "enrolment",
        KeyRotation = 6 => "key-rotation",
        Revocation = 7 => "revocation",
    }
}

impl Kind {
    /// The domain-separation prefix signed before the payload.
    pub fn domain_tag(self) -> Vec<u8> {
        let mut tag = Vec::with_capacity(32);
        tag.extend_from_slice(b"gleaner/v1/");
        tag.extend_from_slice(self.as_str().as_bytes());
        tag.push(0);
        tag
    }
}

/// A message that travels inside a signed envelope.
pub trait Message: Serialize + DeserializeOwned {
    /// The envelope kind that carries this message.
    const KIND: Kind;
    /// Checks the decoded values (ranges, consistency with the signer); time-free.
    fn validate(&self, signer: &PublicKey) -> Result<(), Error>;
}

wire_struct! {
/// The raw envelope as it travels; nothing in it is trusted until [`Envelope::open`] succeeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub version: u8,
    pub kind: u8,
    pub signer: serde_bytes::ByteArray<32>,
    pub signature: serde_bytes::ByteArray<64>,
    pub payload: serde_bytes::ByteBuf,
}
}

/// A message whose signature and contents have been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified<T> {
    pub signer: PublicKey,
    pub message: T,
    /// SHA-256 of the payload bytes: the stable id of this exact message.
    pub digest: Digest,
}

impl Envelope {
    /// Encodes `message` and signs it with `key`.
    pub fn seal<T: Message>(message: &T, key: &SecretKey) -> Envelope {
        let payload = cbor::to_vec(message);
        let signature = key.sign_raw(&signed_bytes(T::KIND, &payload));
        Envelope {
            version: ENVELOPE_VERSION,
            kind: T::KIND as u8,
            signer: serde_bytes::ByteArray::new(key.public().to_bytes()),
            signature: serde_bytes::ByteArray::new(signature),
            payload: serde_bytes::ByteBuf::from(payload),
        }
    }

    /// Encodes the envelope as CBOR.
    pub fn to_bytes(&self) -> Vec<u8> {
        cbor::to_vec(self)
    }

    /// Decodes the outer envelope under [`Limits::ENVELOPE`]; verifies nothing yet.
    pub fn from_bytes(bytes: &[u8]) -> Result<Envelope, Error> {
        let env: Envelope = cbor::from_slice(bytes, &Limits::ENVELOPE, "envelope")?;
        if env.version != ENVELOPE_VERSION {
            return Err(Error::UnsupportedVersion {
                what: "envelope",
                found: env.version.into(),
                supported: ENVELOPE_VERSION.into(),
            });
        }
        Ok(env)
    }

    /// The kind this envelope claims (unverified until opened).
    pub fn kind(&self) -> Result<Kind, Error> {
        Kind::from_code(self.kind).ok_or(Error::UnknownKind(self.kind))
    }

    /// The signer this envelope claims (unverified until opened).
    pub fn signer(&self) -> Result<PublicKey, Error> {
        PublicKey::from_wire(self.signer.as_slice())
    }

    /// Checks kind and signature, then decodes and validates the payload as `T`.
    pub fn open<T: Message>(&self) -> Result<Verified<T>, Error> {
        let signer = self.check_header::<T>()?;
        signer
            .verifying_key()?
            .verify_strict(
                &signed_bytes(T::KIND, &self.payload),
                &ed25519_dalek::Signature::from_bytes(&self.signature),
            )
            .map_err(|_| Error::BadSignature {
                kind: T::KIND,
                signer: signer.to_string(),
            })?;
        self.decode_payload(signer)
    }

    /// As [`Envelope::open`], taking the signer's decompressed key from `cache` (and putting it
    /// there): a peer heard again and again is decompressed once, not per message.
    pub fn open_cached<T: Message>(&self, cache: &mut KeyCache) -> Result<Verified<T>, Error> {
        let signer = self.check_header::<T>()?;
        cache
            .get(signer)?
            .verify_strict(
                &signed_bytes(T::KIND, &self.payload),
                &ed25519_dalek::Signature::from_bytes(&self.signature),
            )
            .map_err(|_| Error::BadSignature {
                kind: T::KIND,
                signer: signer.to_string(),
            })?;
        self.decode_payload(signer)
    }

    /// Decodes and opens envelope bytes in one step.
    pub fn open_bytes<T: Message>(bytes: &[u8]) -> Result<Verified<T>, Error> {
        Envelope::from_bytes(bytes)?.open()
    }

    /// Decodes the payload as `T` **without checking the signature or validating it**: for a
    /// relay to tell a copy of a message it already has (by host and sequence number) before it
    /// spends a signature check on it. Nothing read this way may be trusted or acted on.
    pub fn peek<T: Message>(&self) -> Result<T, Error> {
        self.check_header::<T>()?;
        cbor::from_slice(&self.payload, &Limits::PAYLOAD, T::KIND.as_str())
    }

    fn check_header<T: Message>(&self) -> Result<PublicKey, Error> {
        let kind = self.kind()?;
        if kind != T::KIND {
            return Err(Error::WrongKind {
                expected: T::KIND,
                found: kind,
            });
        }
        self.signer()
    }

    fn decode_payload<T: Message>(&self, signer: PublicKey) -> Result<Verified<T>, Error> {
        let message = self.decode_message::<T>(&signer)?;
        Ok(Verified {
            signer,
            message,
            digest: Digest::of(&self.payload),
        })
    }

    fn decode_message<T: Message>(&self, signer: &PublicKey) -> Result<T, Error> {
        let message: T = cbor::from_slice(&self.payload, &Limits::PAYLOAD, T::KIND.as_str())?;
        message.validate(signer)?;
        Ok(message)
    }
}

/// Decompressed keys of recent signers, at most [`KeyCache::MAX`]; when full it starts afresh, so
/// a stream of new (or made-up) signers costs what it would without a cache, never more memory.
/// Each key is kept with whether it is of small order (weak), which batch verification must refuse.
#[derive(Debug, Default)]
pub struct KeyCache {
    keys: std::collections::HashMap<PublicKey, (ed25519_dalek::VerifyingKey, bool)>,
}

impl KeyCache {
    pub const MAX: usize = 4096;

    fn get(&mut self, key: PublicKey) -> Result<ed25519_dalek::VerifyingKey, Error> {
        self.get_checked(key).map(|(vk, _)| vk)
    }

    /// The decompressed key and whether it is weak (of small order).
    fn get_checked(
        &mut self,
        key: PublicKey,
    ) -> Result<(ed25519_dalek::VerifyingKey, bool), Error> {
        if let Some(entry) = self.keys.get(&key) {
            return Ok(*entry);
        }
        let vk = key.verifying_key()?;
        let entry = (vk, vk.is_weak());
        if self.keys.len() >= Self::MAX {
            self.keys.clear();
        }
        self.keys.insert(key, entry);
        Ok(entry)
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Opens many envelopes of one kind with a single batch verification; when the batch fails, each
/// signature is judged alone with `verify_strict` so that one bad record does not sink the rest.
/// The result has one entry per envelope, in order.
pub fn open_batch<T: Message>(envelopes: &[Envelope]) -> Vec<Result<Verified<T>, Error>> {
    open_batch_messages(envelopes)
        .into_iter()
        .zip(envelopes)
        .map(|(r, env)| {
            r.map(|(signer, message)| Verified {
                signer,
                message,
                digest: Digest::of(&env.payload),
            })
        })
        .collect()
}

/// As [`open_batch`], giving each message with its signer but without the payload digest, for
/// a receiver that keys messages by their own ids (the coordinator's record ids): it saves a
/// SHA-256 per message. The same checks: kind, signer, signature, strict decode, `validate`.
pub fn open_batch_messages<T: Message>(
    envelopes: &[Envelope],
) -> Vec<Result<(PublicKey, T), Error>> {
    // A batch usually comes from one host: decompress each distinct signer's point, and check
    // it is not of small order (three doublings per call), once.
    let mut last: Option<(PublicKey, ed25519_dalek::VerifyingKey, bool)> = None;
    open_batch_keyed(envelopes, |k| {
        if let Some((lk, vk, weak)) = &last
            && *lk == k
        {
            return Ok((*vk, *weak));
        }
        let vk = k.verifying_key()?;
        let weak = vk.is_weak();
        last = Some((k, vk, weak));
        Ok((vk, weak))
    })
}

/// As [`open_batch_messages`], for a batch from many signers heard again and again (a space's
/// adverts): each signer's decompressed key comes from `cache`.
pub fn open_batch_cached<T: Message>(
    envelopes: &[Envelope],
    cache: &mut KeyCache,
) -> Vec<Result<(PublicKey, T), Error>> {
    open_batch_keyed(envelopes, |k| cache.get_checked(k))
}

/// Signatures checked in one batch at least; fewer are checked one by one.
const MIN_BATCH: usize = 3;

/// The batch verification behind [`open_batch_messages`] and [`open_batch_cached`]; `key` gives
/// a signer's decompressed key and whether it is weak.
fn open_batch_keyed<T: Message>(
    envelopes: &[Envelope],
    mut key: impl FnMut(PublicKey) -> Result<(ed25519_dalek::VerifyingKey, bool), Error>,
) -> Vec<Result<(PublicKey, T), Error>> {
    let mut results: Vec<Option<Result<(PublicKey, T), Error>>> =
        Vec::with_capacity(envelopes.len());
    let mut keys = Vec::with_capacity(envelopes.len());
    let mut sigs = Vec::with_capacity(envelopes.len());
    // Every signed message (domain tag + payload) in one buffer: one allocation per batch, not
    // two per record.
    let tag = T::KIND.domain_tag();
    let total: usize = envelopes.iter().map(|e| tag.len() + e.payload.len()).sum();
    let mut signed = Vec::with_capacity(total);
    let mut ends = Vec::with_capacity(envelopes.len());
    let mut idx = Vec::with_capacity(envelopes.len());
    for (i, env) in envelopes.iter().enumerate() {
        match env
            .check_header::<T>()
            .and_then(|k| key(k).map(|(vk, weak)| (k, vk, weak)))
        {
            Ok((_, vk, false)) => {
                keys.push(vk);
                sigs.push(ed25519_dalek::Signature::from_bytes(&env.signature));
                signed.extend_from_slice(&tag);
                signed.extend_from_slice(&env.payload);
                ends.push(signed.len());
                idx.push(i);
                results.push(None);
            }
            Ok((k, _, true)) => results.push(Some(Err(Error::BadKey {
                signer: k.to_string(),
            }))),
            Err(e) => results.push(Some(Err(e))),
        }
    }
    let mut refs: Vec<&[u8]> = Vec::with_capacity(ends.len());
    let mut start = 0;
    for &end in &ends {
        refs.push(&signed[start..end]);
        start = end;
    }
    // A batch of one or two is checked signature by signature with `verify_strict` (what a failed
    // batch falls back to): a batch check multiplies generic points with random scalars and uses
    // no precomputed basepoint table, so for one signature it cost several times a single check.
    // A space's flushes bring about one signed advert each (docs/BENCHMARKS.md).
    let batch_ok =
        refs.len() >= MIN_BATCH && ed25519_dalek::verify_batch(&refs, &sigs, &keys).is_ok();
    for (j, &i) in idx.iter().enumerate() {
        let env = &envelopes[i];
        let signer = PublicKey::from_wire(keys[j].as_bytes());
        results[i] = Some(signer.and_then(|signer| {
            if !batch_ok && keys[j].verify_strict(refs[j], &sigs[j]).is_err() {
                return Err(Error::BadSignature {
                    kind: T::KIND,
                    signer: signer.to_string(),
                });
            }
            env.decode_message::<T>(&signer).map(|m| (signer, m))
        }));
    }
    // Every entry is filled by now. Collected into a vector sized up front: `flatten` tells
    // `collect` nothing of its length, so the results (a few hundred bytes each for adverts)
    // were reallocated about log2(n) times per batch.
    let mut out = Vec::with_capacity(results.len());
    out.extend(results.into_iter().flatten());
    out
}

fn signed_bytes(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut out = kind.domain_tag();
    out.extend_from_slice(payload);
    out
}

pub(crate) fn check_version(what: &'static str, found: u8, supported: u8) -> Result<(), Error> {
    if found == supported {
        Ok(())
    } else {
        Err(Error::UnsupportedVersion {
            what,
            found: found.into(),
            supported: supported.into(),
        })
    }
}
