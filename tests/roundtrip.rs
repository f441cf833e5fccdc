//! Property tests: every wire type survives encode → envelope → decode unchanged, and arbitrary bytes
//! never panic a decoder.

use gleaner::advert::{CapacityAdvert, OutcomeReport, Running};
use gleaner::{
    Backend, Blob, Digest, Envelope, Id16, MachineType, OutcomeCode, SecretKey, UsageRecord,
};
use proptest::prelude::*;

fn key() -> SecretKey {
    SecretKey::from_seed([42; 32])
}

fn outcome() -> impl Strategy<Value = OutcomeCode> {
    proptest::sample::select(OutcomeCode::ALL.to_vec())
}

prop_compose! {
    fn usage_record()(id in any::<[u8; 16]>(), mid in any::<[u8; 16]>(), mt in any::<[u8; 32]>(),
        start in 0u64..4_000_000_000, span in 0u64..1_000_000, cores in 1u16..256,
        frac in 0u64..=1000, peak in any::<u64>(), bench in any::<u32>(), out in outcome())
        -> UsageRecord {
        let wall_ms = span * 1000;
        UsageRecord {
            v: 1, record_id: Id16(id), host: key().public(), machine_id: Id16(mid),
            publisher: SecretKey::from_seed([7; 32]).public(), machine_type: Digest(mt),
            start, end: start + span, cpu_ms: wall_ms * u64::from(cores) * frac / 1000, wall_ms,
            peak_memory: peak, cores, benchmark: bench, outcome: out,
        }
    }
}

prop_compose! {
    fn machine_type()(name in "[a-z0-9][a-z0-9._-]{0,40}", version in 1u64.., not_after in any::<u64>(),
        cores_min in 1u16..8, extra in 0u16..8, memory_mib in 16u32..65536, disk_mib in 1u32..1_000_000,
        wall in 2u32..1_000_000, user_data in ".{0,200}", weight in 1u32..100_000,
        sha in any::<[u8; 32]>(), egress in proptest::collection::vec("[a-z]{1,10}\\.org:[1-9][0-9]{0,3}", 0..4))
        -> MachineType {
        MachineType {
            v: 1, name, publisher: key().public(), version, not_after, backend: Backend::Container,
            image: Some(Blob { url: "https://example.org/i.tar".into(), sha256: Digest(sha) }),
            kernel: None, initrd: None, user_data, cores_min, cores_max: cores_min + extra,
            memory_mib, disk_mib, max_wallclock_s: wall, heartbeat_s: wall / 2 + 1, fizzle_s: wall / 2,
            backoff_s: 60, egress, weight_milli: weight, description: String::new(),
        }
    }
}

proptest! {
    #[test]
    fn usage_records_round_trip(r in usage_record()) {
        let bytes = Envelope::seal(&r, &key()).to_bytes();
        let back = Envelope::open_bytes::<UsageRecord>(&bytes).unwrap();
        prop_assert_eq!(back.message, r);
    }

    #[test]
    fn machine_types_round_trip(mt in machine_type()) {
        let bytes = Envelope::seal(&mt, &key()).to_bytes();
        let back = Envelope::open_bytes::<MachineType>(&bytes).unwrap();
        prop_assert_eq!(back.message, mt);
    }

    #[test]
    fn adverts_and_outcomes_round_trip(seq in any::<u64>(), at in any::<u64>(), cores in any::<u16>(),
        n in 0usize..10, present in any::<bool>(), out in outcome(), detail in ".{0,100}") {
        let advert = CapacityAdvert {
            v: 1, host: key().public(), seq, at, free_cores: cores, free_memory_mib: 1024,
            free_disk_mib: 2048, backends: 5,
            running: (0..n).map(|i| Running { machine_type: Digest([i as u8; 32]), count: i as u16 }).collect(),
            owner_present: present, draining: !present, benchmark: 1000,
            chain: gleaner::Digest::default(),
        };
        let back = Envelope::open_bytes::<CapacityAdvert>(&Envelope::seal(&advert, &key()).to_bytes()).unwrap();
        prop_assert_eq!(back.message, advert);
        let out = if out == OutcomeCode::Running { OutcomeCode::Success } else { out };
        let report = OutcomeReport {
            v: 1, host: key().public(), machine_id: Id16([1; 16]), machine_type: Digest([2; 32]),
            at, ran_s: 10, outcome: out, detail,
        };
        let back = Envelope::open_bytes::<OutcomeReport>(&Envelope::seal(&report, &key()).to_bytes()).unwrap();
        prop_assert_eq!(back.message, report);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        gleaner::fuzz::decode_anything(&bytes);
    }

    #[test]
    fn mutated_envelopes_never_verify_with_changed_content(r in usage_record(), pos in any::<usize>(), bit in 0u8..8) {
        let env = Envelope::seal(&r, &key());
        let mut bytes = env.to_bytes();
        let i = pos % bytes.len();
        bytes[i] ^= 1 << bit;
        if let Ok(back) = Envelope::open_bytes::<UsageRecord>(&bytes) {
            // A flip can only survive where it does not change meaning (none exist in canonical CBOR).
            prop_assert_eq!(back.message, r);
        }
    }
}
