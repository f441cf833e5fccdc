//! Test vectors: fixed keys and messages whose exact bytes are checked in under tests/vectors/ and
//! documented in docs/protocol.md, so another implementation can check itself against ours.
//! Regenerate (only when the format deliberately changes) with `GLEANER_BLESS=1 cargo test --test vectors`.

use std::path::PathBuf;

use gleaner::advert::{CapacityAdvert, OutcomeReport, Running};
use gleaner::trust::{KeyRotation, Revocation, TRUST_VERSION};
use gleaner::{Digest, Envelope, Id16, MachineType, OutcomeCode, SecretKey, UsageRecord};

fn publisher() -> SecretKey {
    SecretKey::from_seed([0x01; 32])
}

fn host() -> SecretKey {
    SecretKey::from_seed([0x02; 32])
}

fn usage_record() -> UsageRecord {
    UsageRecord {
        v: 1,
        record_id: Id16([0x11; 16]),
        host: host().public(),
        machine_id: Id16([0x22; 16]),
        publisher: publisher().public(),
        machine_type: Digest([0x33; 32]),
        start: 1_800_000_000,
        end: 1_800_003_600,
        cpu_ms: 3_000_000,
        wall_ms: 3_600_000,
        peak_memory: 268_435_456,
        cores: 1,
        benchmark: 1500,
        outcome: OutcomeCode::Success,
    }
}

fn advert() -> CapacityAdvert {
    CapacityAdvert {
        v: 1,
        host: host().public(),
        seq: 7,
        at: 1_800_000_000,
        free_cores: 2,
        free_memory_mib: 4096,
        free_disk_mib: 10240,
        backends: 1 | 4,
        running: vec![Running {
            machine_type: Digest([0x33; 32]),
            count: 1,
        }],
        owner_present: false,
        draining: false,
        benchmark: 1500,
        chain: gleaner::Digest::default(),
    }
}

fn outcome() -> OutcomeReport {
    OutcomeReport {
        v: 1,
        host: host().public(),
        machine_id: Id16([0x22; 16]),
        machine_type: Digest([0x33; 32]),
        at: 1_800_003_600,
        ran_s: 3600,
        outcome: OutcomeCode::Fizzle,
        detail: "no work".into(),
    }
}

/// The publisher's key after rotation: seed 0x03 repeated.
fn rotated() -> SecretKey {
    SecretKey::from_seed([0x03; 32])
}

fn rotation() -> KeyRotation {
    KeyRotation {
        v: TRUST_VERSION,
        old: publisher().public(),
        new: rotated().public(),
        at: 1_800_000_000,
    }
}

fn revocation() -> Revocation {
    Revocation {
        v: TRUST_VERSION,
        key: publisher().public(),
        at: 1_800_000_100,
        reason: "key compromised".into(),
    }
}

fn vectors() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("publisher.public", publisher().public().to_bytes().to_vec()),
        ("host.public", host().public().to_bytes().to_vec()),
        (
            "machine-type.envelope",
            Envelope::seal(&MachineType::example(publisher().public()), &publisher()).to_bytes(),
        ),
        (
            "usage-record.envelope",
            Envelope::seal(&usage_record(), &host()).to_bytes(),
        ),
        (
            "capacity-advert.envelope",
            Envelope::seal(&advert(), &host()).to_bytes(),
        ),
        (
            "outcome.envelope",
            Envelope::seal(&outcome(), &host()).to_bytes(),
        ),
        (
            "key-rotation.envelope",
            Envelope::seal(&rotation(), &publisher()).to_bytes(),
        ),
        (
            "revocation.envelope",
            Envelope::seal(&revocation(), &publisher()).to_bytes(),
        ),
    ]
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

#[test]
fn vectors_match_the_checked_in_bytes() {
    let bless = std::env::var_os("GLEANER_BLESS").is_some();
    for (name, bytes) in vectors() {
        let path = dir().join(format!("{name}.hex"));
        if bless {
            std::fs::write(&path, format!("{}\n", hex::encode(&bytes))).unwrap();
        }
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (bless with GLEANER_BLESS=1)", path.display()));
        assert_eq!(
            text.trim(),
            hex::encode(&bytes),
            "{name} differs from {}",
            path.display()
        );
    }
}

#[test]
fn checked_in_vectors_verify_and_decode() {
    let read = |name: &str| {
        hex::decode(
            std::fs::read_to_string(dir().join(format!("{name}.hex")))
                .unwrap()
                .trim(),
        )
        .unwrap()
    };
    let mt = Envelope::open_bytes::<MachineType>(&read("machine-type.envelope")).unwrap();
    assert_eq!(mt.message, MachineType::example(publisher().public()));
    assert_eq!(mt.signer.to_string(), publisher().public().to_string());
    let r = Envelope::open_bytes::<UsageRecord>(&read("usage-record.envelope")).unwrap();
    assert_eq!(r.message, usage_record());
    let a = Envelope::open_bytes::<CapacityAdvert>(&read("capacity-advert.envelope")).unwrap();
    assert_eq!(a.message, advert());
    let o = Envelope::open_bytes::<OutcomeReport>(&read("outcome.envelope")).unwrap();
    assert_eq!(o.message, outcome());
    let k = Envelope::open_bytes::<KeyRotation>(&read("key-rotation.envelope")).unwrap();
    assert_eq!(k.message, rotation());
    let v = Envelope::open_bytes::<Revocation>(&read("revocation.envelope")).unwrap();
    assert_eq!(v.message, revocation());
}

#[test]
fn documented_ids_match() {
    // docs/protocol.md quotes these ids.
    assert_eq!(
        publisher().public().to_string(),
        include_str!("vectors/publisher.id").trim()
    );
    assert_eq!(
        host().public().to_string(),
        include_str!("vectors/host.id").trim()
    );
}
