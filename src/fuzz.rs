//! Entry points shared by the cargo-fuzz targets (tests/fuzz) and the property tests: feed untrusted
//! bytes to every decoder; they must return errors, never panic or allocate without bound.

use crate::advert::{CapacityAdvert, OutcomeReport};
use crate::cbor::{self, Limits};
use crate::envelope::{Envelope, open_batch};
use crate::{MachineType, UsageRecord};

/// Decodes `bytes` as an envelope and opens it as every message kind.
pub fn decode_envelope(bytes: &[u8]) {
    if let Ok(env) = Envelope::from_bytes(bytes) {
        let _ = env.open::<MachineType>();
        let _ = env.open::<UsageRecord>();
        let _ = env.open::<CapacityAdvert>();
        let _ = env.open::<OutcomeReport>();
    }
}

/// Decodes `bytes` as every payload type directly (as if a signature had held).
pub fn decode_payloads(bytes: &[u8]) {
    let _ = cbor::from_slice::<MachineType>(bytes, &Limits::PAYLOAD, "machine-type");
    let _ = cbor::from_slice::<UsageRecord>(bytes, &Limits::PAYLOAD, "usage-record");
    let _ = cbor::from_slice::<CapacityAdvert>(bytes, &Limits::PAYLOAD, "capacity-advert");
    let _ = cbor::from_slice::<OutcomeReport>(bytes, &Limits::PAYLOAD, "outcome");
}

/// Decodes `bytes` as a coordinator usage batch and batch-opens it.
pub fn decode_batch(bytes: &[u8]) {
    if let Ok(envs) = cbor::from_slice::<Vec<Envelope>>(bytes, &Limits::BATCH, "usage batch") {
        let _ = open_batch::<UsageRecord>(&envs);
    }
}

/// All of the above.
pub fn decode_anything(bytes: &[u8]) {
    decode_envelope(bytes);
    decode_payloads(bytes);
    decode_batch(bytes);
}
