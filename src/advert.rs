//! Capacity adverts (what a factory can still take) and outcome reports (how a machine ended), both
//! gossiped across the space and signed by the host.

use crate::Error;
use crate::envelope::{Kind, Message, check_version};
use crate::ident::PublicKey;
use crate::usage::OutcomeCode;
use crate::wire::{Digest, Id16, wire_struct};

/// The advert and outcome schema version this build writes and reads.
pub const ADVERT_VERSION: u8 = 1;

/// Backend bits in [`CapacityAdvert::backends`].
pub mod backend_bits {
    pub const DOCKER: u8 = 1;
    pub const KVM: u8 = 2;
    pub const TCG: u8 = 4;
}

wire_struct! {
/// How many machines of one type a factory runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    pub machine_type: Digest,
    pub count: u16,
}
}

wire_struct! {
/// A factory's free capacity and what it runs, published jittered and on change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapacityAdvert {
    pub v: u8,
    /// The host key; must be the envelope's signer.
    pub host: PublicKey,
    /// Increases with every advert from this host; older ones are replays.
    pub seq: u64,
    /// Unix seconds when made.
    pub at: u64,
    pub free_cores: u16,
    pub free_memory_mib: u32,
    pub free_disk_mib: u32,
    /// [`backend_bits`] the host can run.
    pub backends: u8,
    pub running: Vec<Running>,
    pub owner_present: bool,
    pub draining: bool,
    pub benchmark: u32,
    /// The end x₀ of the hash chain whose links refresh this advert without a new signature
    /// ([`crate::chain`]); all zeros: no chain, every advert signed.
    pub chain: Digest,
}
}

/// Most machine types one advert may list.
pub const ADVERT_RUNNING_MAX: usize = 256;

impl Message for CapacityAdvert {
    const KIND: Kind = Kind::CapacityAdvert;

    fn validate(&self, signer: &PublicKey) -> Result<(), Error> {
        check_version("capacity advert", self.v, ADVERT_VERSION)?;
        if &self.host != signer {
            return Err(Error::invalid(
                "host",
                format!("names {} but was signed by {signer}", self.host),
            ));
        }
        if self.running.len() > ADVERT_RUNNING_MAX {
            return Err(Error::invalid(
                "running",
                format!(
                    "{} entries, at most {ADVERT_RUNNING_MAX}",
                    self.running.len()
                ),
            ));
        }
        if self.backends & !(backend_bits::DOCKER | backend_bits::KVM | backend_bits::TCG) != 0 {
            return Err(Error::invalid(
                "backends",
                format!("unknown bits in {:#04x}", self.backends),
            ));
        }
        Ok(())
    }
}

wire_struct! {
/// How one logical machine ended, published to the space so that aborts back its type off everywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutcomeReport {
    pub v: u8,
    pub host: PublicKey,
    pub machine_id: Id16,
    pub machine_type: Digest,
    /// Unix seconds when the machine ended.
    pub at: u64,
    /// Seconds the machine ran.
    pub ran_s: u64,
    pub outcome: OutcomeCode,
    /// A short message from the workload or the factory.
    pub detail: String,
}
}

/// Longest detail an outcome report may carry.
pub const OUTCOME_DETAIL_MAX: usize = 512;

impl Message for OutcomeReport {
    const KIND: Kind = Kind::Outcome;

    fn validate(&self, signer: &PublicKey) -> Result<(), Error> {
        check_version("outcome", self.v, ADVERT_VERSION)?;
        if &self.host != signer {
            return Err(Error::invalid(
                "host",
                format!("names {} but was signed by {signer}", self.host),
            ));
        }
        if self.detail.len() > OUTCOME_DETAIL_MAX {
            return Err(Error::invalid(
                "detail",
                format!("{} bytes, at most {OUTCOME_DETAIL_MAX}", self.detail.len()),
            ));
        }
        if self.outcome == OutcomeCode::Running {
            return Err(Error::invalid(
                "outcome",
                "a finished machine cannot be running",
            ));
        }
        Ok(())
    }
}
