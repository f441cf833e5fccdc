//! Enrolment: a host proves possession of its key to a coordinator, for one account, at one time —
//! so a captured enrolment cannot be replayed to another coordinator or account, or much later.

use crate::Error;
use crate::envelope::{Kind, Message, check_version};
use crate::ident::PublicKey;
use crate::wire::wire_struct;

/// The enrolment schema version.
pub const ENROLMENT_VERSION: u8 = 1;
/// How far an enrolment's time may be from the coordinator's clock.
pub const ENROLMENT_SKEW_S: u64 = 600;

wire_struct! {
    /// "Host `host` joins `account` at coordinator `coordinator` (its certificate fingerprint or URL)."
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Enrolment {
        pub v: u8,
        pub host: PublicKey,
        pub account: String,
        pub coordinator: String,
        pub at: u64,
    }
}

impl Message for Enrolment {
    const KIND: Kind = Kind::Enrolment;

    fn validate(&self, signer: &PublicKey) -> Result<(), Error> {
        check_version("enrolment", self.v, ENROLMENT_VERSION)?;
        if &self.host != signer {
            return Err(Error::invalid(
                "host",
                format!("names {} but was signed by {signer}", self.host),
            ));
        }
        if self.account.is_empty() || self.account.len() > 64 {
            return Err(Error::invalid("account", "must be 1 to 64 bytes"));
        }
        if self.coordinator.len() > 256 {
            return Err(Error::invalid("coordinator", "longer than 256 bytes"));
        }
        Ok(())
    }
}

impl Enrolment {
    /// Checks that this enrolment is meant for `coordinator` and `account` and is fresh at `now`.
    pub fn check_for(&self, coordinator: &str, account: &str, now: u64) -> Result<(), Error> {
        if self.coordinator != coordinator {
            return Err(Error::invalid(
                "coordinator",
                format!("made for {:?}, this is {coordinator:?}", self.coordinator),
            ));
        }
        if self.account != account {
            return Err(Error::invalid(
                "account",
                format!("made for {:?}", self.account),
            ));
        }
        if self.at.abs_diff(now) > ENROLMENT_SKEW_S {
            return Err(Error::invalid(
                "at",
                format!(
                    "{} is more than {ENROLMENT_SKEW_S} s from now ({now})",
                    self.at
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Envelope, SecretKey};

    #[test]
    fn replay_elsewhere_or_later_is_refused() {
        let k = SecretKey::from_seed([3; 32]);
        let e = Enrolment {
            v: 1,
            host: k.public(),
            account: "alice".into(),
            coordinator: "abc".into(),
            at: 1000,
        };
        let v = Envelope::seal(&e, &k).open::<Enrolment>().unwrap().message;
        v.check_for("abc", "alice", 1100).unwrap();
        assert!(v.check_for("other", "alice", 1100).is_err());
        assert!(v.check_for("abc", "bob", 1100).is_err());
        assert!(v.check_for("abc", "alice", 1000 + 3600).is_err());
        let other = SecretKey::from_seed([4; 32]);
        assert!(Envelope::seal(&e, &other).open::<Enrolment>().is_err());
    }
}
