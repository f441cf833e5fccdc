//! CBOR encoding of wire types, with hard limits checked on the raw bytes before anything is allocated.
//!
//! Decoding is two passes: [`check_limits`] walks the item headers of untrusted bytes (total size,
//! nesting depth, collection and string lengths, definite lengths only, exactly one item) without
//! allocating; only bytes that pass are handed to ciborium.

use serde::{Serialize, de::DeserializeOwned};

use crate::Error;

/// Hard limits for one decoded message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Total encoded size in bytes.
    pub max_size: usize,
    /// Nesting depth of arrays, maps and tags.
    pub max_depth: usize,
    /// Items in one array or map, bytes in one string.
    pub max_len: u64,
}

impl Limits {
    /// Limits for a signed envelope around any message.
    pub const ENVELOPE: Limits = Limits {
        max_size: 256 * 1024,
        max_depth: 2,
        max_len: 256 * 1024,
    };
    /// Limits for the payload of any message.
    pub const PAYLOAD: Limits = Limits {
        max_size: 240 * 1024,
        max_depth: 8,
        max_len: 128 * 1024,
    };
    /// Limits for a batch of usage-record envelopes as posted to a coordinator.
    pub const BATCH: Limits = Limits {
        max_size: 4 * 1024 * 1024,
        max_depth: 4,
        max_len: 16 * 1024,
    };
}

/// Encodes a value as CBOR.
pub fn to_vec<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    // Writing into a Vec cannot fail, and our types have no serializer that fails.
    ciborium::into_writer(value, &mut out).expect("cbor encoding into a vec cannot fail");
    out
}

/// Checks `bytes` against `limits`, then decodes exactly one `T` from them.
pub fn from_slice<T: DeserializeOwned>(
    bytes: &[u8],
    limits: &Limits,
    what: &'static str,
) -> Result<T, Error> {
    check_limits(bytes, limits)?;
    // Nesting is already bounded by check_limits, so ciborium's own recursion guard is not needed;
    // a small scratch buffer (strings longer than it are read into their own allocation) avoids
    // zeroing ciborium's default 4 KiB on every call, which dominated decoding small records.
    let mut scratch = [0u8; 128];
    ciborium::de::from_reader_with_buffer(bytes, &mut scratch).map_err(|e| Error::Decode {
        what,
        reason: describe(e),
    })
}

fn describe(e: ciborium::de::Error<std::io::Error>) -> String {
    match e {
        ciborium::de::Error::Io(e) => e.to_string(),
        ciborium::de::Error::Syntax(off) => format!("syntax error at byte {off}"),
        ciborium::de::Error::Semantic(Some(off), msg) => format!("{msg} (at byte {off})"),
        ciborium::de::Error::Semantic(None, msg) => msg,
        ciborium::de::Error::RecursionLimitExceeded => "nested too deeply".into(),
    }
}

/// Walks the CBOR item headers in `bytes` and refuses anything beyond `limits`.
///
/// Accepts exactly one well-formed data item with definite lengths and nothing after it.
pub fn check_limits(bytes: &[u8], limits: &Limits) -> Result<(), Error> {
    if bytes.len() > limits.max_size {
        return Err(Error::TooLarge {
            size: bytes.len(),
            max: limits.max_size,
        });
    }
    let mut pos = 0usize;
    // Items still to read at each open level; the bottom entry is the single top-level item.
    // The stack is bounded by max_depth + 1, so this allocation is bounded too.
    let mut pending: Vec<u64> = Vec::with_capacity(limits.max_depth.min(64) + 1);
    pending.push(1);
    while let Some(top) = pending.last_mut() {
        if *top == 0 {
            pending.pop();
            continue;
        }
        *top -= 1;
        let start = pos;
        let initial = *bytes.get(pos).ok_or(Error::Malformed {
            offset: pos,
            reason: "truncated",
        })?;
        pos += 1;
        let major = initial >> 5;
        let info = initial & 0x1f;
        let arg: u64 = match info {
            0..=23 => u64::from(info),
            24..=27 => {
                let n = 1usize << (info - 24);
                let raw = bytes.get(pos..pos + n).ok_or(Error::Malformed {
                    offset: start,
                    reason: "truncated header",
                })?;
                pos += n;
                raw.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
            }
            31 => {
                return Err(Error::Malformed {
                    offset: start,
                    reason: "indefinite lengths are not allowed",
                });
            }
            _ => {
                return Err(Error::Malformed {
                    offset: start,
                    reason: "reserved additional information",
                });
            }
        };
        match major {
            0 | 1 => {}
            2 | 3 => {
                if arg > limits.max_len {
                    return Err(Error::CollectionTooLong {
                        len: arg,
                        max: limits.max_len,
                    });
                }
                let remaining = (bytes.len() - pos) as u64;
                if arg > remaining {
                    return Err(Error::Malformed {
                        offset: start,
                        reason: "string runs past the end",
                    });
                }
                pos += arg as usize;
            }
            4 | 5 => {
                if arg > limits.max_len {
                    return Err(Error::CollectionTooLong {
                        len: arg,
                        max: limits.max_len,
                    });
                }
                let items = if major == 5 { arg * 2 } else { arg };
                // Every item needs at least one byte: a cheap bound against huge declared lengths.
                if items > (bytes.len() - pos) as u64 {
                    return Err(Error::Malformed {
                        offset: start,
                        reason: "collection runs past the end",
                    });
                }
                if items > 0 {
                    if pending.len() > limits.max_depth {
                        return Err(Error::TooDeep {
                            max: limits.max_depth,
                        });
                    }
                    pending.push(items);
                }
            }
            6 => {
                if pending.len() > limits.max_depth {
                    return Err(Error::TooDeep {
                        max: limits.max_depth,
                    });
                }
                pending.push(1);
            }
            _ => {
                // Major 7: simple values and floats; their bytes were consumed with the header.
                if info == 24 && arg < 32 {
                    return Err(Error::Malformed {
                        offset: start,
                        reason: "invalid simple value",
                    });
                }
            }
        }
    }
    if pos != bytes.len() {
        return Err(Error::Malformed {
            offset: pos,
            reason: "trailing bytes after the message",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        max_size: 1024,
        max_depth: 3,
        max_len: 16,
    };

    #[test]
    fn accepts_nested_within_limits() {
        let v = to_vec(&vec![vec![vec![1u8, 2]]]);
        check_limits(&v, &L).unwrap();
    }

    #[test]
    fn refuses_too_deep() {
        let v = to_vec(&vec![vec![vec![vec![1u8]]]]);
        assert_eq!(check_limits(&v, &L), Err(Error::TooDeep { max: 3 }));
    }

    #[test]
    fn refuses_long_collection_before_allocating() {
        // An array header claiming 2^32 items followed by nothing.
        let v = [0x9a, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            check_limits(&v, &L),
            Err(Error::CollectionTooLong { .. })
        ));
        let big = Limits {
            max_len: u64::MAX,
            ..L
        };
        assert!(matches!(
            check_limits(&v, &big),
            Err(Error::Malformed { .. })
        ));
    }

    #[test]
    fn refuses_oversize_indefinite_trailing_truncated() {
        assert!(matches!(
            check_limits(&[0u8; 2000], &L),
            Err(Error::TooLarge { .. })
        ));
        assert!(matches!(
            check_limits(&[0x9f, 0xff], &L),
            Err(Error::Malformed { .. })
        ));
        assert!(matches!(
            check_limits(&[0x01, 0x02], &L),
            Err(Error::Malformed {
                reason: "trailing bytes after the message",
                ..
            })
        ));
        assert!(matches!(
            check_limits(&[0x82, 0x01], &L),
            Err(Error::Malformed { .. })
        ));
        assert!(matches!(
            check_limits(&[], &L),
            Err(Error::Malformed { .. })
        ));
    }
}
