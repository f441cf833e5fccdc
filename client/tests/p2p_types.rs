//! Machine types over the space (issue 5): a node without the file learns a signed machine type
//! from a peer that advertises running it (`/gleaner/mt/1`), checks it against the digest and the
//! trusted publishers, and runs it; a publisher's announcement of a new version reaches it too; a
//! type from a publisher it does not trust is fetched but never offered; a node that comes to
//! trust a publisher fetches the types its view shows running, with no new signed advert, and
//! from another host when the first it asks does not serve it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gleaner::advert::{CapacityAdvert, Running};
use gleaner::{Backend, Blob, Digest, Envelope, MachineType, PublicKey, SecretKey};
use gleaner_client::factory::{Allowance, Factory, FactoryConfig, FactoryHandle};
use gleaner_client::ledger::Ledger;
use gleaner_client::p2p::{self, Space, SpaceConfig};
use gleaner_client::runtime::fake::FakeRuntime;
use gleaner_client::trust::{Catalogue, TrustStore};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

mod support;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn signed_type(publisher: &SecretKey, name: &str, version: u64) -> Vec<u8> {
    let mut mt = MachineType::example(publisher.public());
    mt.name = name.into();
    mt.version = version;
    mt.backend = Backend::Container;
    mt.image = Some(Blob {
        url: format!("https://example.invalid/{name}.tar"),
        sha256: Digest::of(name.as_bytes()),
    });
    mt.cores_min = 1;
    mt.cores_max = 1;
    mt.memory_mib = 64;
    mt.not_after = 4_000_000_000;
    Envelope::seal(&mt, publisher).to_bytes()
}

fn digest_of(envelope: &[u8]) -> Digest {
    Envelope::open_bytes::<MachineType>(envelope)
        .unwrap()
        .digest
}

async fn node(
    seed: u8,
    trusted: Vec<PublicKey>,
    bootstrap: Vec<libp2p::Multiaddr>,
    cancel: &CancellationToken,
) -> (SecretKey, Space, libp2p::Multiaddr) {
    let key = SecretKey::from_seed([seed; 32]);
    let mut cfg = SpaceConfig::new("types");
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    cfg.bootstrap = bootstrap;
    cfg.kad_server = Some(true);
    cfg.trusted = trusted;
    let s = p2p::start_space(&key, cfg, cancel.clone()).await.unwrap();
    let addr = s.addrs[0].clone().with(libp2p::multiaddr::Protocol::P2p(
        key.public().to_string().parse().unwrap(),
    ));
    (key, s, addr)
}

fn factory(state: &std::path::Path, cancel: &CancellationToken) -> FactoryHandle {
    let ledger = Arc::new(Ledger::open(&state.join("ledger.redb")).unwrap());
    let mut cfg = FactoryConfig::new(state.to_owned());
    cfg.tick = Duration::from_millis(100);
    let (tx, rx) = watch::channel(Allowance::open(4, 4 << 30));
    // The allowance stays open as long as the test runs.
    std::mem::forget(tx);
    let f = Factory::new(
        cfg,
        Arc::new(FakeRuntime::new()),
        ledger,
        SecretKey::from_seed([0x70; 32]),
        rx,
    );
    f.spawn(cancel.clone()).0
}

/// A factory's capacity as its adverts show it, running `running`.
fn capacity(key: &SecretKey, seq: u64, running: Vec<Running>) -> CapacityAdvert {
    CapacityAdvert {
        v: 1,
        host: key.public(),
        seq,
        at: now(),
        free_cores: 1,
        free_memory_mib: 1024,
        free_disk_mib: 0,
        backends: 1,
        running,
        owner_present: false,
        draining: false,
        benchmark: 1000,
        chain: gleaner::Digest::default(),
    }
}

/// Advertises `content` once a second, as the daemon does: one signed advert, then refreshes.
fn advertise_every_second(s: &Space, content: CapacityAdvert) -> tokio::task::JoinHandle<()> {
    let h = s.handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        // Never two in a second after a late tick: that would sign anew.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let _ = h.advertise(content.clone());
        }
    })
}

/// Makes `s` trust `publisher` and returns the first machine type it learns after, within 20 s.
async fn trust_and_learn(s: &mut Space, publisher: &SecretKey, failed: &str) -> p2p::LearnedType {
    s.handle
        .set_trusted(vec![publisher.public()])
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), s.learned.recv())
        .await
        .expect(failed)
        .unwrap()
}

/// The advert the daemon would publish for this factory: what it runs.
async fn advert(key: &SecretKey, seq: u64, f: &FactoryHandle) -> Envelope {
    let s = f.status().await.unwrap();
    let mut running: std::collections::BTreeMap<Digest, u16> = Default::default();
    for m in &s.machines {
        *running.entry(m.machine_type.parse().unwrap()).or_default() += 1;
    }
    let running = running
        .into_iter()
        .map(|(machine_type, count)| Running {
            machine_type,
            count,
        })
        .collect();
    Envelope::seal(&capacity(key, seq, running), key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_file_learns_the_type_from_a_peer_and_runs_it() {
    let cancel = CancellationToken::new();
    let publisher = SecretKey::from_seed([0x51; 32]);
    let stranger = SecretKey::from_seed([0x66; 32]);
    let v1 = signed_type(&publisher, "lhcb-sim", 1);
    let rogue = signed_type(&stranger, "miner", 1);
    let (d1, drogue) = (digest_of(&v1), digest_of(&rogue));

    // A: the publisher's node, holding v1. B: has the file and runs it, and also trusts (and runs)
    // a stranger's type. C: trusts only the publisher, has no file.
    let (_ka, a, a_addr) = node(1, vec![publisher.public()], vec![], &cancel).await;
    a.handle.provide(v1.clone()).await.unwrap();
    let (kb, b, _) = node(
        2,
        vec![publisher.public(), stranger.public()],
        vec![a_addr.clone()],
        &cancel,
    )
    .await;
    let (kc, mut c, _) = node(3, vec![publisher.public()], vec![a_addr], &cancel).await;

    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let fb = factory(dirs.0.path(), &cancel);
    let fc = factory(dirs.1.path(), &cancel);
    // Each node admits types through its trust store, as the daemon does.
    let catalogue = |dir: &std::path::Path, keys: &[PublicKey]| {
        let baseline = keys
            .iter()
            .map(|k| (*k, gleaner::trust::Policy::default()))
            .collect();
        Catalogue::new(
            TrustStore::open(&dir.join("trust.toml"), baseline).unwrap(),
            None,
        )
    };
    let mut trust_b = catalogue(dirs.0.path(), &[publisher.public(), stranger.public()]);
    let mut trust_c = catalogue(dirs.1.path(), &[publisher.public()]);
    // B's scan path: its files are offered and served.
    for t in [&v1, &rogue] {
        assert!(trust_b.admit_signed(t, "file", now(), &fb).await.is_some());
        b.handle.provide(t.clone()).await.unwrap();
    }

    // Run the daemons' loops: adverts from what each factory runs, learned types offered.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seq = 0;
    let mut offered = Vec::new();
    loop {
        seq += 1;
        b.handle.publish(advert(&kb, seq, &fb).await).unwrap();
        c.handle.publish(advert(&kc, seq, &fc).await).unwrap();
        while let Ok(l) = c.learned.try_recv() {
            offered.push(l.digest);
            assert!(
                trust_c
                    .admit_signed(&l.envelope, &l.from.to_string(), now(), &fc)
                    .await
                    .is_some()
            );
        }
        let s = fc.status().await.unwrap();
        if s.machines.iter().any(|m| m.machine_type == d1.to_string()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "C never ran the type it could fetch: {s:?}\n{:?}",
            c.handle.summary().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(offered, vec![d1], "C was handed only the trusted type");
    let sc = c.handle.summary().await.unwrap();
    assert!(
        sc.machine_types.contains(&d1.to_string()),
        "C now serves it"
    );
    assert!(!sc.machine_types.contains(&drogue.to_string()));

    // The publisher announces v2: C (and B) learn it without asking.
    let v2 = signed_type(&publisher, "lhcb-sim", 2);
    let d2 = digest_of(&v2);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Gossip needs a mesh; announcing again is harmless (the same bytes are one message).
        let _ = a.handle.announce(v2.clone()).await;
        if let Ok(l) = tokio::time::timeout(Duration::from_millis(500), c.learned.recv()).await {
            let l = l.unwrap();
            assert_eq!(l.digest, d2);
            assert!(
                trust_c
                    .admit_signed(&l.envelope, &l.from.to_string(), now(), &fc)
                    .await
                    .is_some()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the announcement did not reach C"
        );
    }
    let s = fc.status().await.unwrap();
    assert_eq!(
        s.offers.iter().map(|o| o.version).collect::<Vec<_>>(),
        vec![2],
        "v2 replaced v1"
    );
    // The publisher's v1 or v2 changed by `edit` and signed again.
    let reseal = |from: &[u8], edit: &dyn Fn(&mut MachineType)| {
        let mut mt = Envelope::open_bytes::<MachineType>(from).unwrap().message;
        edit(&mut mt);
        Envelope::seal(&mt, &publisher).to_bytes()
    };
    // A second, different v2 (equivocation) is not taken from the space.
    let other = reseal(&v2, &|m| m.description = "not the one announced".into());
    assert!(c.handle.announce(other).await.is_err());
    // Nor is a v1 it has not seen (a rollback), nor a v3 that has already expired. (The v1 it
    // holds is known bytes, still served to peers that run it, not learned again.)
    let older = reseal(&v1, &|m| m.description = "an older one".into());
    assert!(c.handle.announce(older).await.is_err(), "rollback taken");
    let stale = reseal(&v2, &|m| {
        m.version = 3;
        m.not_after = 1;
    });
    assert!(
        c.handle.announce(stale).await.is_err(),
        "expired type taken"
    );
    cancel.cancel();
}

/// A node that trusted nobody when a peer's signed advert came learns the types that peer runs
/// once it trusts their publisher, from the view, though the peer only refreshes its advert (a
/// refresh reports no types, and its next signed advert is two minutes off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_comes_to_trust_a_publisher_fetches_what_its_view_shows_running() {
    let cancel = CancellationToken::new();
    let publisher = SecretKey::from_seed([0x52; 32]);
    let t = signed_type(&publisher, "atlas-sim", 1);
    let d = digest_of(&t);
    // B holds the type and advertises running it; C trusts nobody yet.
    let (kb, b, b_addr) = node(4, vec![publisher.public()], vec![], &cancel).await;
    b.handle.provide(t.clone()).await.unwrap();
    let (_kc, mut c, _) = node(5, vec![], vec![b_addr], &cancel).await;
    let content = capacity(
        &kb,
        1,
        vec![Running {
            machine_type: d,
            count: 1,
        }],
    );
    let advertiser = advertise_every_second(&b, content);
    let anchor_of = |v: gleaner::space::SpaceView| v.anchor_seq(&kb.public());
    let handle = c.handle.clone();
    let anchor = support::eventually(30, "C to hold B's signed advert", async || {
        anchor_of(handle.view().await.unwrap())
    })
    .await;
    // Trusting nobody, C fetched nothing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(c.learned.try_recv().is_err());
    let trusted_at = Instant::now();
    let l = trust_and_learn(
        &mut c,
        &publisher,
        "C did not fetch the type its view shows B running once it trusted the publisher",
    )
    .await;
    assert_eq!(l.digest, d);
    // The same anchor the whole time: what C fetched came from its view, not a new signed advert.
    assert_eq!(
        anchor_of(c.handle.view().await.unwrap()),
        Some(anchor),
        "B signed anew {:?} after C trusted the publisher",
        trusted_at.elapsed()
    );
    advertiser.abort();
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_is_fetched_from_another_host_when_the_first_asked_does_not_serve_it() {
    let cancel = CancellationToken::new();
    let publisher = SecretKey::from_seed([0x53; 32]);
    let t = signed_type(&publisher, "cms-sim", 1);
    let d = digest_of(&t);
    // In the view's order (by host key): C first, then L, then H. All three advertise running the
    // type; only H holds it. C's own advert shows it too (as when its store let it go), and L
    // answers that it does not hold it. C trusts nobody yet.
    let mut seeds = [6u8, 7, 8];
    seeds.sort_by_key(|s| SecretKey::from_seed([*s; 32]).public());
    let (kh, h, h_addr) = node(seeds[2], vec![publisher.public()], vec![], &cancel).await;
    h.handle.provide(t.clone()).await.unwrap();
    let (kl, l, _) = node(seeds[1], vec![], vec![h_addr.clone()], &cancel).await;
    let (kc, mut c, _) = node(seeds[0], vec![], vec![h_addr], &cancel).await;
    let running = || {
        vec![Running {
            machine_type: d,
            count: 1,
        }]
    };
    let advertisers = [
        advertise_every_second(&h, capacity(&kh, 1, running())),
        advertise_every_second(&l, capacity(&kl, 1, running())),
        advertise_every_second(&c, capacity(&kc, 1, running())),
    ];
    let handle = c.handle.clone();
    support::eventually(30, "C to hold L's and H's signed adverts", async || {
        let v = handle.view().await.ok()?;
        (v.anchor_seq(&kl.public()).is_some() && v.anchor_seq(&kh.public()).is_some()).then_some(())
    })
    .await;
    // C asks the first host after itself, L, which has nothing to give; then the one after L.
    let got = trust_and_learn(
        &mut c,
        &publisher,
        "C did not fetch the type from H after L did not serve it",
    )
    .await;
    assert_eq!(got.digest, d);
    for a in advertisers {
        a.abort();
    }
    cancel.cancel();
}
