//! The live view of a space, pure (time passed in): the latest capacity advert of every factory,
//! with expiry and replay protection, running machines per type across the space, and aborts that
//! back a machine type off everywhere.

use std::collections::BTreeMap;

use crate::advert::{CapacityAdvert, OutcomeReport};
use crate::{Digest, PublicKey};

/// How long an advert counts without a newer one.
pub const ADVERT_TTL_S: u64 = 60;
/// How far an advert's time may be from ours.
pub const CLOCK_SKEW_S: u64 = 300;

/// Why a gossiped message was not taken into the view.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("replayed or stale: seq {seq} is not above {last}")]
    Replay { seq: u64, last: u64 },
    #[error("made at {at}, too far from now ({now})")]
    Clock { at: u64, now: u64 },
}

/// One peer as the view keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    pub advert: CapacityAdvert,
    pub received_at: u64,
}

/// The space as this factory sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpaceView {
    peers: BTreeMap<PublicKey, Peer>,
    /// Highest seq seen per host, kept after expiry so old adverts cannot come back.
    seqs: BTreeMap<PublicKey, u64>,
    /// Last abort (fizzle, lost heartbeat, error) of each machine type anywhere in the space.
    aborts: BTreeMap<Digest, u64>,
}

impl SpaceView {
    /// Takes a verified advert into the view.
    pub fn insert(&mut self, advert: CapacityAdvert, now: u64) -> Result<(), Refused> {
        if advert.at.abs_diff(now) > CLOCK_SKEW_S {
            return Err(Refused::Clock { at: advert.at, now });
        }
        if let Some(&last) = self.seqs.get(&advert.host)
            && advert.seq <= last
        {
            return Err(Refused::Replay {
                seq: advert.seq,
                last,
            });
        }
        self.seqs.insert(advert.host, advert.seq);
        self.peers.insert(
            advert.host,
            Peer {
                advert,
                received_at: now,
            },
        );
        Ok(())
    }

    /// Takes a verified outcome into the view; aborts start a back-off for their type.
    pub fn outcome(&mut self, report: &OutcomeReport, now: u64) -> Result<(), Refused> {
        if report.at.abs_diff(now) > CLOCK_SKEW_S {
            return Err(Refused::Clock { at: report.at, now });
        }
        if report.outcome.is_abort() {
            let e = self.aborts.entry(report.machine_type).or_insert(0);
            *e = (*e).max(report.at);
        }
        Ok(())
    }

    /// Forgets adverts older than the TTL.
    pub fn expire(&mut self, now: u64) {
        self.peers
            .retain(|_, p| now.saturating_sub(p.received_at) <= ADVERT_TTL_S);
    }

    /// Live peers (after [`SpaceView::expire`]).
    pub fn peers(&self) -> impl Iterator<Item = &Peer> {
        self.peers.values()
    }

    /// Machines of `machine_type` running across the space.
    pub fn running(&self, machine_type: &Digest) -> u64 {
        self.peers
            .values()
            .flat_map(|p| p.advert.running.iter())
            .filter(|r| &r.machine_type == machine_type)
            .map(|r| u64::from(r.count))
            .sum()
    }

    /// When the last abort of `machine_type` anywhere in the space happened.
    pub fn last_abort(&self, machine_type: &Digest) -> Option<u64> {
        self.aborts.get(machine_type).copied()
    }

    /// Free cores across the live space.
    pub fn free_cores(&self) -> u64 {
        self.peers
            .values()
            .map(|p| u64::from(p.advert.free_cores))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advert::Running;
    use crate::{Id16, OutcomeCode, SecretKey};

    fn advert(seed: u8, seq: u64, at: u64, running: u16) -> CapacityAdvert {
        CapacityAdvert {
            v: 1,
            host: SecretKey::from_seed([seed; 32]).public(),
            seq,
            at,
            free_cores: 2,
            free_memory_mib: 1024,
            free_disk_mib: 1024,
            backends: 1,
            running: vec![Running {
                machine_type: Digest([1; 32]),
                count: running,
            }],
            owner_present: false,
            draining: false,
            benchmark: 1000,
        }
    }

    #[test]
    fn replay_clock_expiry_and_counts() {
        let mut v = SpaceView::default();
        v.insert(advert(1, 1, 1000, 2), 1000).unwrap();
        v.insert(advert(2, 5, 1000, 1), 1000).unwrap();
        assert_eq!(v.running(&Digest([1; 32])), 3);
        assert_eq!(
            v.insert(advert(1, 1, 1001, 9), 1001),
            Err(Refused::Replay { seq: 1, last: 1 })
        );
        assert!(matches!(
            v.insert(advert(1, 2, 5000, 0), 1001),
            Err(Refused::Clock { .. })
        ));
        v.insert(advert(1, 2, 1030, 0), 1030).unwrap();
        assert_eq!(v.running(&Digest([1; 32])), 1);
        v.expire(1000 + ADVERT_TTL_S + 1);
        assert_eq!(v.peers().count(), 1, "host 2 expired");
        // An expired host's old advert cannot come back.
        assert!(v.insert(advert(2, 5, 1061, 1), 1061).is_err());
        assert_eq!(v.free_cores(), 2);
    }

    #[test]
    fn aborts_anywhere_are_remembered() {
        let mut v = SpaceView::default();
        let r = OutcomeReport {
            v: 1,
            host: SecretKey::from_seed([1; 32]).public(),
            machine_id: Id16([0; 16]),
            machine_type: Digest([7; 32]),
            at: 1000,
            ran_s: 3,
            outcome: OutcomeCode::Fizzle,
            detail: String::new(),
        };
        v.outcome(&r, 1000).unwrap();
        assert_eq!(v.last_abort(&Digest([7; 32])), Some(1000));
        let ok = OutcomeReport {
            outcome: OutcomeCode::Success,
            at: 2000,
            ..r
        };
        v.outcome(&ok, 2000).unwrap();
        assert_eq!(v.last_abort(&Digest([7; 32])), Some(1000));
    }
}
