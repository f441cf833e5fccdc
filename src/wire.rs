//! Small wire newtypes shared by the messages: digests, record ids and one-byte codes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::Error;

/// A SHA-256 digest, encoded as a 32-byte CBOR byte string and printed as hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The SHA-256 of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        use sha2::Digest as _;
        Digest(sha2::Sha256::digest(bytes).into())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl FromStr for Digest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let s = s.strip_prefix("sha256:").unwrap_or(s);
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out)
            .map_err(|e| Error::invalid("sha256", format!("{s:?} is not 64 hex digits: {e}")))?;
        Ok(Digest(out))
    }
}

/// A 16-byte record or machine id, chosen at random by the host.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Id16(pub [u8; 16]);

impl fmt::Display for Id16 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Id16 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Id16({self})")
    }
}

impl FromStr for Id16 {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let mut out = [0u8; 16];
        hex::decode_to_slice(s, &mut out)
            .map_err(|e| Error::invalid("id", format!("{s:?} is not 32 hex digits: {e}")))?;
        Ok(Id16(out))
    }
}

macro_rules! bytes_serde {
    ($t:ty, $n:literal) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(&self.0)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw: serde_bytes::ByteArray<$n> = Deserialize::deserialize(d)?;
                Ok(Self(raw.into_array()))
            }
        }
    };
}
bytes_serde!(Digest, 32);
bytes_serde!(Id16, 16);

/// Declares a one-byte wire code: an enum with explicit values, encoded as a CBOR unsigned integer,
/// with a stable lowercase name for humans and TOML.
macro_rules! wire_code {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $var:ident = $val:literal => $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($(#[$vm])* $var = $val),+ }

        impl $name {
            /// Every value, in code order.
            pub const ALL: &'static [$name] = &[$($name::$var),+];
            /// The stable lowercase name.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$var => $text),+ }
            }
            /// The value for a wire code.
            pub fn from_code(code: u8) -> Option<Self> {
                match code { $($val => Some($name::$var),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::Error;
            fn from_str(s: &str) -> Result<Self, $crate::Error> {
                match s {
                    $($text => Ok($name::$var),)+
                    _ => Err($crate::Error::Invalid {
                        field: stringify!($name),
                        reason: format!(
                            "{s:?} is not one of {}",
                            [$($text),+].join(", ")
                        ),
                    }),
                }
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_u8(*self as u8)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let code = <u8 as serde::Deserialize>::deserialize(d)?;
                $name::from_code(code).ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "unknown {} code {code}",
                        stringify!($name)
                    ))
                })
            }
        }
    };
}
pub(crate) use wire_code;

/// Declares a wire struct encoded as a CBOR array of its fields in order (compact, positional).
///
/// Decoding is strict: a missing field and an extra (unknown) field are both refused, by name.
macro_rules! wire_struct {
    ($(#[$m:meta])* pub struct $name:ident { $($(#[$fm:meta])* pub $field:ident : $ty:ty),+ $(,)? }) => {
        $(#[$m])*
        pub struct $name { $($(#[$fm])* pub $field: $ty),+ }

        impl $name {
            /// Field names in wire order.
            pub const FIELDS: &'static [&'static str] = &[$(stringify!($field)),+];
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeTuple;
                let mut t = s.serialize_tuple(Self::FIELDS.len())?;
                $( t.serialize_element(&self.$field)?; )+
                t.end()
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        write!(f, "{} as an array of {} fields", stringify!($name), $name::FIELDS.len())
                    }
                    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<$name, A::Error> {
                        $(
                            let $field: $ty = seq.next_element()?.ok_or_else(|| {
                                serde::de::Error::custom(format!(
                                    "{}: missing field {}", stringify!($name), stringify!($field)
                                ))
                            })?;
                        )+
                        if seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                            return Err(serde::de::Error::custom(format!(
                                "{}: unknown field after the {} known ones",
                                stringify!($name), $name::FIELDS.len()
                            )));
                        }
                        Ok($name { $($field),+ })
                    }
                }
                d.deserialize_tuple($name::FIELDS.len(), V)
            }
        }
    };
}
pub(crate) use wire_struct;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_parses_with_or_without_prefix() {
        let d = Digest::of(b"abc");
        assert_eq!(
            d.to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(format!("sha256:{d}").parse::<Digest>().unwrap(), d);
        assert!("xyz".parse::<Digest>().is_err());
    }

    #[test]
    fn digest_is_a_cbor_byte_string() {
        let bytes = crate::cbor::to_vec(&Digest([1; 32]));
        assert_eq!(bytes[..2], [0x58, 32]);
    }
}
