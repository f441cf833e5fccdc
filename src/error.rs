//! The core's one error type: every refusal says what was wrong and why.

use crate::envelope::Kind;

/// Why the core refused some bytes, a signature or a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("message too large: {size} bytes, the limit is {max}")]
    TooLarge { size: usize, max: usize },
    #[error("message nested too deeply: more than {max} levels")]
    TooDeep { max: usize },
    #[error("collection too long: {len} items, the limit is {max}")]
    CollectionTooLong { len: u64, max: u64 },
    #[error("malformed cbor at byte {offset}: {reason}")]
    Malformed { offset: usize, reason: &'static str },
    #[error("cannot decode {what}: {reason}")]
    Decode { what: &'static str, reason: String },
    #[error("unsupported {what} version {found}, this build understands {supported}")]
    UnsupportedVersion {
        what: &'static str,
        found: u64,
        supported: u64,
    },
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("wrong message kind: expected {expected}, found {found}")]
    WrongKind { expected: Kind, found: Kind },
    #[error("bad signature: the {kind} was not signed by {signer}")]
    BadSignature { kind: Kind, signer: String },
    #[error("signer {signer} is not an ed25519 public key")]
    BadKey { signer: String },
    #[error("expired: not valid after {not_after} (unix seconds), now is {now}")]
    Expired { not_after: u64, now: u64 },
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("cannot parse key: {0}")]
    KeyFormat(String),
}

impl Error {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::Invalid {
            field,
            reason: reason.into(),
        }
    }
}
