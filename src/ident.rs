//! Identities: ed25519 keys whose printable id is the libp2p PeerId of the same key.
//!
//! One key is one identity everywhere: the host key signs usage records and adverts and is the host's
//! libp2p identity; a publisher key signs machine types. The printable id is the base58btc of the
//! identity multihash of the protobuf-encoded public key, exactly as libp2p prints a PeerId.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

use crate::Error;

/// Prefix of the protobuf encoding of an ed25519 public key (field 1 = KeyType::Ed25519, field 2 = 32
/// bytes) followed by the identity multihash header (code 0x00, length 36).
const PEER_ID_PREFIX: [u8; 6] = [0x00, 0x24, 0x08, 0x01, 0x12, 0x20];

/// A secret ed25519 key. Never printed: its Debug shows only the public id.
#[derive(Clone)]
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// Builds a key from 32 secret bytes; the caller provides the randomness (the core has no RNG).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        SecretKey(SigningKey::from_bytes(&seed))
    }

    /// The 32 secret bytes, for storing in a 0600 file or handing to libp2p.
    pub fn seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    pub(crate) fn sign_raw(&self, msg: &[u8]) -> [u8; 64] {
        self.0.sign(msg).to_bytes()
    }

    /// Encodes the key as the text stored in a key file.
    pub fn to_file_text(&self) -> String {
        format!(
            "{KEY_FILE_HEADER}\n{}\n# id {}\n",
            hex::encode(self.seed()),
            self.public()
        )
    }

    /// Parses the text of a key file written by [`SecretKey::to_file_text`].
    pub fn from_file_text(text: &str) -> Result<Self, Error> {
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        if lines.next() != Some(KEY_FILE_HEADER) {
            return Err(Error::KeyFormat(format!(
                "not a gleaner secret key file (the first line must be {KEY_FILE_HEADER:?})"
            )));
        }
        let hex_seed = lines
            .next()
            .ok_or_else(|| Error::KeyFormat("the key line is missing".into()))?;
        let mut seed = [0u8; 32];
        hex::decode_to_slice(hex_seed, &mut seed)
            .map_err(|e| Error::KeyFormat(format!("the key line is not 64 hex digits: {e}")))?;
        Ok(SecretKey::from_seed(seed))
    }
}

const KEY_FILE_HEADER: &str = "gleaner-secret-key-v1";

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({})", self.public())
    }
}

/// A public ed25519 key; displays as its PeerId-compatible id (`12D3KooW…`).
///
/// Holds the 32 key bytes as they travel; the curve point is decompressed only when a signature is
/// verified, so decoding a message that names keys (a usage record names two) stays cheap.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Parses 32 raw bytes, refusing points that are not valid keys (for keys typed by people).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let key = Self::from_wire(bytes)?;
        key.verifying_key()?;
        Ok(key)
    }

    /// Takes 32 bytes as they came off the wire; validity is checked when verifying.
    pub fn from_wire(bytes: &[u8]) -> Result<Self, Error> {
        bytes.try_into().map(PublicKey).map_err(|_| Error::BadKey {
            signer: hex::encode(bytes),
        })
    }

    /// The 32 raw bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }

    /// The decompressed key, or why these bytes are not one.
    pub fn verifying_key(&self) -> Result<VerifyingKey, Error> {
        VerifyingKey::from_bytes(&self.0).map_err(|_| Error::BadKey {
            signer: hex::encode(self.0),
        })
    }

    /// The key a libp2p PeerId's bytes name, if they name an ed25519 key (validity is checked
    /// when verifying, as for [`PublicKey::from_wire`]).
    pub fn from_peer_id_bytes(raw: &[u8]) -> Option<PublicKey> {
        match raw.split_at_checked(6) {
            Some((prefix, key)) if prefix == PEER_ID_PREFIX => PublicKey::from_wire(key).ok(),
            _ => None,
        }
    }

    /// The id bytes: the identity multihash of the protobuf-encoded key (a libp2p PeerId).
    pub fn peer_id_bytes(&self) -> [u8; 38] {
        let mut out = [0u8; 38];
        out[..6].copy_from_slice(&PEER_ID_PREFIX);
        out[6..].copy_from_slice(&self.0);
        out
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&bs58::encode(self.peer_id_bytes()).into_string())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = Error;

    /// Parses an id (`12D3KooW…`) or 64 hex digits of the raw key.
    fn from_str(s: &str) -> Result<Self, Error> {
        let s = s.trim();
        if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            let raw = hex::decode(s).map_err(|e| Error::KeyFormat(e.to_string()))?;
            return PublicKey::from_bytes(&raw);
        }
        let raw = bs58::decode(s)
            .into_vec()
            .map_err(|e| Error::KeyFormat(format!("{s:?} is neither an id nor hex: {e}")))?;
        let key = PublicKey::from_peer_id_bytes(&raw)
            .ok_or_else(|| Error::KeyFormat(format!("{s:?} is not the id of an ed25519 key")))?;
        key.verifying_key()?;
        Ok(key)
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw: serde_bytes::ByteArray<32> = serde::Deserialize::deserialize(d)?;
        Ok(PublicKey(raw.into_array()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_round_trips_and_looks_like_a_peer_id() {
        let k = SecretKey::from_seed([7; 32]).public();
        let id = k.to_string();
        assert!(id.starts_with("12D3KooW"), "{id}");
        assert_eq!(id.parse::<PublicKey>().unwrap(), k);
        assert_eq!(hex::encode(k.to_bytes()).parse::<PublicKey>().unwrap(), k);
        assert!("12D3KooWnotakey".parse::<PublicKey>().is_err());
        assert_eq!(PublicKey::from_peer_id_bytes(&k.peer_id_bytes()), Some(k));
        assert_eq!(PublicKey::from_peer_id_bytes(&k.peer_id_bytes()[1..]), None);
        assert_eq!(PublicKey::from_peer_id_bytes(&k.to_bytes()), None);
    }

    #[test]
    fn key_file_round_trips_and_debug_hides_secret() {
        let k = SecretKey::from_seed([9; 32]);
        let text = k.to_file_text();
        assert_eq!(SecretKey::from_file_text(&text).unwrap().seed(), k.seed());
        assert!(!format!("{k:?}").contains(&hex::encode(k.seed())));
        assert!(SecretKey::from_file_text("nope\n00").is_err());
        assert!(SecretKey::from_file_text("gleaner-secret-key-v1\nzz").is_err());
    }
}
