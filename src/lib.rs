//! Gleaner's sans-IO core: identities, signed envelopes, versioned CBOR wire types with hard limits,
//! and the schemas every other part speaks. No tokio, no sockets, no files, no clock: time and
//! randomness are passed in.

pub mod advert;
pub mod cbor;
pub mod chain;
pub mod control;
pub mod credit;
pub mod enrolment;
pub mod envelope;
mod error;
pub mod fuzz;
pub mod ident;
pub mod lifecycle;
pub mod machine_type;
pub mod policy;
pub mod relay;
pub mod space;
pub mod trust;
pub mod usage;
pub mod wire;

pub use advert::{CapacityAdvert, OutcomeReport};
pub use envelope::{Envelope, Kind, Message, Verified};
pub use error::Error;
pub use ident::{PublicKey, SecretKey};
pub use machine_type::{Backend, Blob, Egress, MachineType};
pub use usage::{OutcomeCode, UsageRecord};
pub use wire::{Digest, Id16};
