//! Signed envelopes end to end: round trips, and every tampering refused with its specific reason.

use gleaner::cbor::{self, Limits};
use gleaner::envelope::{KeyCache, open_batch, open_batch_cached, open_batch_messages};
use gleaner::{
    Digest, Envelope, Error, Id16, Kind, MachineType, OutcomeCode, SecretKey, UsageRecord,
};

fn publisher() -> SecretKey {
    SecretKey::from_seed([1; 32])
}

fn record(host: &SecretKey, n: u8) -> UsageRecord {
    UsageRecord {
        v: 1,
        record_id: Id16([n; 16]),
        host: host.public(),
        machine_id: Id16([2; 16]),
        publisher: publisher().public(),
        machine_type: Digest([3; 32]),
        start: 1_800_000_000,
        end: 1_800_003_600,
        cpu_ms: 3_500_000,
        wall_ms: 3_600_000,
        peak_memory: 200 << 20,
        cores: 1,
        benchmark: 1234,
        outcome: OutcomeCode::Success,
    }
}

#[test]
fn machine_type_round_trips() {
    let key = publisher();
    let mt = MachineType::example(key.public());
    let bytes = Envelope::seal(&mt, &key).to_bytes();
    let opened = Envelope::open_bytes::<MachineType>(&bytes).unwrap();
    assert_eq!(opened.message, mt);
    assert_eq!(opened.signer, key.public());
    opened.message.check_fresh(1_800_000_000).unwrap();
}

#[test]
fn tampered_payload_byte_is_a_bad_signature() {
    let key = publisher();
    let mut env = Envelope::seal(&MachineType::example(key.public()), &key);
    // Flip a byte inside the description text so the payload still decodes.
    let n = env.payload.len();
    env.payload[n - 3] ^= 0x01;
    let err = Envelope::open_bytes::<MachineType>(&env.to_bytes()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::BadSignature {
                kind: Kind::MachineType,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn tampered_signature_byte_is_a_bad_signature() {
    let key = publisher();
    let mut env = Envelope::seal(&MachineType::example(key.public()), &key);
    env.signature[10] ^= 0x80;
    let err = env.open::<MachineType>().unwrap_err();
    assert!(matches!(err, Error::BadSignature { .. }), "{err}");
}

#[test]
fn wrong_signer_is_a_bad_signature() {
    let key = publisher();
    let other = SecretKey::from_seed([5; 32]);
    let mut env = Envelope::seal(&MachineType::example(key.public()), &key);
    env.signer = serde_bytes::ByteArray::new(other.public().to_bytes());
    let err = env.open::<MachineType>().unwrap_err();
    assert!(matches!(err, Error::BadSignature { .. }), "{err}");
}

#[test]
fn signed_by_someone_other_than_the_named_publisher_is_refused() {
    let key = publisher();
    let other = SecretKey::from_seed([5; 32]);
    let env = Envelope::seal(&MachineType::example(key.public()), &other);
    let err = env.open::<MachineType>().unwrap_err();
    assert!(
        matches!(
            err,
            Error::Invalid {
                field: "publisher",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn wrong_kind_is_refused_as_wrong_kind() {
    let host = SecretKey::from_seed([4; 32]);
    let env = Envelope::seal(&record(&host, 1), &host);
    let err = env.open::<MachineType>().unwrap_err();
    assert_eq!(
        err,
        Error::WrongKind {
            expected: Kind::MachineType,
            found: Kind::UsageRecord
        }
    );
}

#[test]
fn relabelled_kind_tag_breaks_the_signature() {
    // A usage record relabelled as a machine type: the kind matches what the reader expects, but the
    // signature covered the usage-record domain tag, so it fails before the payload is decoded.
    let host = SecretKey::from_seed([4; 32]);
    let mut env = Envelope::seal(&record(&host, 1), &host);
    env.kind = Kind::MachineType as u8;
    let err = env.open::<MachineType>().unwrap_err();
    assert!(
        matches!(
            err,
            Error::BadSignature {
                kind: Kind::MachineType,
                ..
            }
        ),
        "{err}"
    );
    env.kind = 99;
    assert_eq!(
        env.open::<MachineType>().unwrap_err(),
        Error::UnknownKind(99)
    );
}

#[test]
fn expired_machine_type_is_refused() {
    let key = publisher();
    let mt = MachineType::example(key.public());
    let opened =
        Envelope::open_bytes::<MachineType>(&Envelope::seal(&mt, &key).to_bytes()).unwrap();
    let err = opened.message.check_fresh(mt.not_after + 1).unwrap_err();
    assert_eq!(
        err,
        Error::Expired {
            not_after: mt.not_after,
            now: mt.not_after + 1
        }
    );
}

#[test]
fn oversize_envelope_is_refused_before_decoding() {
    let key = publisher();
    let mut mt = MachineType::example(key.public());
    mt.description = "x".repeat(Limits::ENVELOPE.max_size);
    let bytes = Envelope::seal(&mt, &key).to_bytes();
    let err = Envelope::open_bytes::<MachineType>(&bytes).unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err}");
}

#[test]
fn oversize_field_is_refused_by_validation() {
    let key = publisher();
    let mut mt = MachineType::example(key.public());
    mt.user_data = "x".repeat(65 * 1024);
    let err = Envelope::seal(&mt, &key).open::<MachineType>().unwrap_err();
    assert!(
        matches!(
            err,
            Error::Invalid {
                field: "user_data",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn deep_nesting_is_refused_in_envelope_and_payload() {
    // Envelope bytes that are just 100 nested arrays.
    let mut deep = vec![0x81u8; 100];
    deep.push(0x00);
    assert!(matches!(
        Envelope::from_bytes(&deep),
        Err(Error::TooDeep { .. })
    ));

    // A correctly signed envelope whose payload nests deeper than the payload limit.
    let key = publisher();
    let mut env = Envelope::seal(&MachineType::example(key.public()), &key);
    env.payload = serde_bytes::ByteBuf::from(deep);
    let resigned = resign(env, &key, Kind::MachineType);
    let err = resigned.open::<MachineType>().unwrap_err();
    assert!(matches!(err, Error::TooDeep { .. }), "{err}");
}

#[test]
fn unknown_field_is_refused() {
    // A payload array with one element more than the schema knows, signed correctly.
    let key = publisher();
    let env = Envelope::seal(&MachineType::example(key.public()), &key);
    let mut value: ciborium::Value = ciborium::from_reader(env.payload.as_slice()).unwrap();
    if let ciborium::Value::Array(items) = &mut value {
        items.push(ciborium::Value::Text("surprise".into()));
    }
    let mut env2 = env.clone();
    env2.payload = serde_bytes::ByteBuf::from(cbor::to_vec(&value));
    let err = resign(env2, &key, Kind::MachineType)
        .open::<MachineType>()
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Decode {
                what: "machine-type",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn unsupported_versions_are_refused() {
    let key = publisher();
    let mut mt = MachineType::example(key.public());
    mt.v = 2;
    let err = Envelope::seal(&mt, &key).open::<MachineType>().unwrap_err();
    assert!(
        matches!(err, Error::UnsupportedVersion { found: 2, .. }),
        "{err}"
    );
    let mut env = Envelope::seal(&MachineType::example(key.public()), &key);
    env.version = 7;
    let err = Envelope::from_bytes(&env.to_bytes()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnsupportedVersion {
                what: "envelope",
                found: 7,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn impossible_usage_is_refused() {
    let host = SecretKey::from_seed([4; 32]);
    let mut r = record(&host, 1);
    r.cpu_ms = r.wall_ms * 2;
    let err = Envelope::seal(&r, &host).open::<UsageRecord>().unwrap_err();
    assert!(
        matches!(
            err,
            Error::Invalid {
                field: "cpu_ms",
                ..
            }
        ),
        "{err}"
    );
    let mut r = record(&host, 1);
    r.end = r.start - 1;
    let err = Envelope::seal(&r, &host).open::<UsageRecord>().unwrap_err();
    assert!(matches!(err, Error::Invalid { field: "end", .. }), "{err}");
}

#[test]
fn batch_opens_good_records_and_singles_out_bad_ones() {
    let host = SecretKey::from_seed([4; 32]);
    let mut envs: Vec<Envelope> = (0..20)
        .map(|i| Envelope::seal(&record(&host, i), &host))
        .collect();
    let all = open_batch::<UsageRecord>(&envs);
    assert!(all.iter().all(Result::is_ok));
    envs[7].signature[0] ^= 1;
    envs[13].kind = Kind::Outcome as u8;
    let res = open_batch::<UsageRecord>(&envs);
    assert_eq!(res.len(), 20);
    for (i, r) in res.iter().enumerate() {
        match i {
            7 => assert!(matches!(r, Err(Error::BadSignature { .. })), "{r:?}"),
            13 => assert!(matches!(r, Err(Error::WrongKind { .. })), "{r:?}"),
            _ => assert_eq!(r.as_ref().unwrap().message.record_id, Id16([i as u8; 16])),
        }
    }
}

/// Batches of one and two are checked signature by signature: good ones open, a forged one is
/// named, at every size either side of the batch threshold.
#[test]
fn small_batches_open_good_records_and_single_out_a_forged_one() {
    let host = SecretKey::from_seed([4; 32]);
    for n in 1..=4 {
        let mut envs: Vec<Envelope> = (0..n)
            .map(|i| Envelope::seal(&record(&host, i as u8), &host))
            .collect();
        assert!(
            open_batch::<UsageRecord>(&envs).iter().all(Result::is_ok),
            "{n} good"
        );
        envs[n - 1].signature[5] ^= 1;
        let res = open_batch::<UsageRecord>(&envs);
        for (i, r) in res.iter().enumerate() {
            if i == n - 1 {
                assert!(matches!(r, Err(Error::BadSignature { .. })), "{n}: {r:?}");
            } else {
                assert!(r.is_ok(), "{n}, record {i}: {r:?}");
            }
        }
        let mut cache = KeyCache::default();
        let cached = open_batch_cached::<UsageRecord>(&envs, &mut cache);
        assert!(
            matches!(cached[n - 1], Err(Error::BadSignature { .. })),
            "{n} cached"
        );
    }
}

#[test]
fn batch_messages_match_batch_without_digests() {
    let host = SecretKey::from_seed([4; 32]);
    let other = SecretKey::from_seed([5; 32]);
    let mut envs: Vec<Envelope> = (0..12)
        .map(|i| Envelope::seal(&record(&host, i), &host))
        .collect();
    // One from another host in the middle, one forged, one whose payload is not a usage record.
    envs[4] = Envelope::seal(&record(&other, 4), &other);
    envs[6].signature[5] ^= 1;
    envs[9].payload = serde_bytes::ByteBuf::from(vec![0xa0]);
    let full = open_batch::<UsageRecord>(&envs);
    let bare = open_batch_messages::<UsageRecord>(&envs);
    assert_eq!(full.len(), bare.len());
    for (i, (f, b)) in full.iter().zip(&bare).enumerate() {
        match (f, b) {
            (Ok(f), Ok((signer, message))) => {
                assert_eq!((&f.signer, &f.message), (signer, message), "record {i}");
                let expected = if i == 4 { &other } else { &host };
                assert_eq!(*signer, expected.public(), "record {i}");
            }
            (Err(f), Err(b)) => assert_eq!(f.to_string(), b.to_string(), "record {i}"),
            _ => panic!("record {i}: open_batch gave {f:?}, open_batch_messages {b:?}"),
        }
    }
    assert!(matches!(bare[6], Err(Error::BadSignature { .. })));
    assert!(bare[9].is_err());
    assert_eq!(bare.iter().filter(|r| r.is_ok()).count(), 10);
    // With signers' keys from a cache (twice: cold, then warm), the same verdicts.
    let mut cache = KeyCache::default();
    for _ in 0..2 {
        let cached = open_batch_cached::<UsageRecord>(&envs, &mut cache);
        for (i, (c, b)) in cached.iter().zip(&bare).enumerate() {
            match (c, b) {
                (Ok(c), Ok(b)) => assert_eq!(c, b, "record {i}"),
                (Err(c), Err(b)) => assert_eq!(c.to_string(), b.to_string(), "record {i}"),
                _ => panic!("record {i}: cached gave {c:?}, open_batch_messages {b:?}"),
            }
        }
    }
    assert_eq!(cache.len(), 2);
}

/// Re-signs an envelope whose payload was replaced, as an attacker with their own key could.
fn resign(env: Envelope, key: &SecretKey, kind: Kind) -> Envelope {
    use ed25519_dalek::Signer;
    let sk = ed25519_dalek::SigningKey::from_bytes(&key.seed());
    let mut msg = kind.domain_tag();
    msg.extend_from_slice(&env.payload);
    Envelope {
        signature: serde_bytes::ByteArray::new(sk.sign(&msg).to_bytes()),
        ..env
    }
}

#[test]
fn the_key_cache_gives_the_same_verdicts_as_open() {
    use gleaner::envelope::KeyCache;
    let key = publisher();
    let other = SecretKey::from_seed([5; 32]);
    let mut cache = KeyCache::default();
    let good = Envelope::seal(&MachineType::example(key.public()), &key);
    let mut bad_sig = good.clone();
    bad_sig.signature[10] ^= 0x80;
    let mut bad_payload = good.clone();
    let n = bad_payload.payload.len();
    bad_payload.payload[n - 3] ^= 0x01;
    // Signed by another key than the one it names.
    let mut wrong_signer = good.clone();
    wrong_signer.signer = serde_bytes::ByteArray::new(other.public().to_bytes());
    // Twice each: the second time the key comes from the cache.
    for _ in 0..2 {
        for env in [&good, &bad_sig, &bad_payload, &wrong_signer] {
            let plain = env.open::<MachineType>().map_err(|e| e.to_string());
            let cached = env
                .open_cached::<MachineType>(&mut cache)
                .map_err(|e| e.to_string());
            assert_eq!(plain, cached);
        }
    }
    assert!(good.open_cached::<MachineType>(&mut cache).is_ok());
    assert_eq!(cache.len(), 2);
    // Not a point on the curve: refused, and not kept.
    let not_a_point = (0..=255u8)
        .map(|b| [b; 32])
        .find(|k| gleaner::PublicKey::from_bytes(k).is_err())
        .unwrap();
    let mut junk = good.clone();
    junk.signer = serde_bytes::ByteArray::new(not_a_point);
    assert!(junk.open_cached::<MachineType>(&mut cache).is_err());
    assert_eq!(cache.len(), 2);
}

/// A small-order signer key is refused in a batch every time it appears, and the records around
/// it (from a good key, before and after) still open: the per-signer cache keeps the weak verdict
/// with the key it belongs to.
#[test]
fn batch_refuses_a_small_order_signer_wherever_it_appears() {
    let host = SecretKey::from_seed([4; 32]);
    let mut envs: Vec<Envelope> = (0..8)
        .map(|i| Envelope::seal(&record(&host, i), &host))
        .collect();
    // The identity point: a valid encoding, of order 1.
    let mut identity = [0u8; 32];
    identity[0] = 1;
    for i in [2, 3, 6] {
        envs[i].signer = serde_bytes::ByteArray::new(identity);
    }
    for res in [
        open_batch_messages::<UsageRecord>(&envs)
            .into_iter()
            .map(|r| r.map(|(_, m)| m))
            .collect::<Vec<_>>(),
        open_batch::<UsageRecord>(&envs)
            .into_iter()
            .map(|r| r.map(|v| v.message))
            .collect(),
        open_batch_cached::<UsageRecord>(&envs, &mut KeyCache::default())
            .into_iter()
            .map(|r| r.map(|(_, m)| m))
            .collect(),
    ] {
        for (i, r) in res.iter().enumerate() {
            if [2, 3, 6].contains(&i) {
                assert!(matches!(r, Err(Error::BadKey { .. })), "record {i}: {r:?}");
            } else {
                assert_eq!(
                    r.as_ref().unwrap().record_id,
                    Id16([i as u8; 16]),
                    "record {i}"
                );
            }
        }
    }
}
