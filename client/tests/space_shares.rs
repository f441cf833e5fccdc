//! Target shares in the factory: with the space's counts, a factory starts the types the space as a
//! whole lacks (issue 5); without them it keeps its local shares; and slots are laid like masonry
//! (issue 6): a multi-core type is not starved by single-core machines refilling each freed core.
//! An abort elsewhere in the space backs a type off here too, then lets a probe through (issue 5).

use std::sync::Arc;
use std::time::{Duration, Instant};

use gleaner::{Backend, Blob, Digest, Envelope, MachineType, SecretKey};
use gleaner_client::factory::{
    Allowance, Factory, FactoryConfig, FactoryHandle, Offer, SpaceCounts,
};
use gleaner_client::ledger::Ledger;
use gleaner_client::runtime::fake::FakeRuntime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn offer(name: &str) -> Offer {
    offer_cores(name, 1)
}

fn offer_cores(name: &str, cores: u16) -> Offer {
    offer_with(
        name,
        cores,
        MachineType::example(SecretKey::from_seed([0x51; 32]).public()).backoff_s,
    )
}

fn offer_with(name: &str, cores: u16, backoff_s: u32) -> Offer {
    let publisher = SecretKey::from_seed([0x51; 32]);
    let mut mt = MachineType::example(publisher.public());
    mt.name = name.into();
    mt.backend = Backend::Container;
    mt.image = Some(Blob {
        url: format!("https://example.invalid/{name}.tar"),
        sha256: Digest::of(name.as_bytes()),
    });
    mt.cores_min = cores;
    mt.cores_max = cores;
    mt.memory_mib = 64;
    mt.backoff_s = backoff_s;
    mt.not_after = 4_000_000_000;
    let v = Envelope::seal(&mt, &publisher)
        .open::<MachineType>()
        .unwrap();
    Offer {
        machine_type: v.message,
        digest: v.digest,
        share: 1.0,
        max_cores: cores,
    }
}

async fn factory(state: &std::path::Path) -> (FactoryHandle, CancellationToken) {
    let ledger = Arc::new(Ledger::open(&state.join("ledger.redb")).unwrap());
    let mut cfg = FactoryConfig::new(state.to_owned());
    cfg.tick = Duration::from_millis(50);
    cfg.max_starting = 1;
    // Nothing may start until the test has said what the space runs.
    let mut closed = Allowance::open(4, 4 << 30);
    closed.may_start = false;
    let (tx, rx) = watch::channel(closed);
    let f = Factory::new(
        cfg,
        Arc::new(FakeRuntime::new()),
        ledger,
        SecretKey::from_seed([0x77; 32]),
        rx,
    );
    let cancel = CancellationToken::new();
    let (h, _task) = f.spawn(cancel.clone());
    // Leak the sender into a task that opens the allowance a moment later.
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = tx.send(Allowance::open(4, 4 << 30));
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(tx);
    });
    (h, cancel)
}

/// Machines started per type once the factory has filled its 4 slots.
async fn filled(h: &FactoryHandle) -> Vec<(String, usize)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = h.status().await.unwrap();
        if s.machines.len() == 4 {
            let mut v: Vec<(String, usize)> = s
                .offers
                .iter()
                .map(|o| (o.name.clone(), o.running))
                .collect();
            v.sort();
            return v;
        }
        assert!(Instant::now() < deadline, "4 machines did not start: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_factory_fills_what_the_space_lacks() {
    let (a, b) = (offer("alpha"), offer("beta"));
    // The rest of the space runs 10 alpha and no beta; shares are equal.
    let dir = tempfile::tempdir().unwrap();
    let (h, cancel) = factory(dir.path()).await;
    h.offer(a.clone()).await.unwrap();
    h.offer(b.clone()).await.unwrap();
    h.space_counts(SpaceCounts {
        elsewhere: [(a.digest, 10)].into_iter().collect(),
        deciders: 1,
    })
    .await
    .unwrap();
    assert_eq!(
        filled(&h).await,
        vec![("alpha".into(), 0), ("beta".into(), 4)]
    );
    cancel.cancel();

    // Without a space the same factory splits its own slots by the shares.
    let dir = tempfile::tempdir().unwrap();
    let (h, cancel) = factory(dir.path()).await;
    h.offer(a).await.unwrap();
    h.offer(b).await.unwrap();
    assert_eq!(
        filled(&h).await,
        vec![("alpha".into(), 2), ("beta".into(), 2)]
    );
    cancel.cancel();
}

/// On a 2-core host, 1-core machines of one type fill both cores; then a 2-core type of equal share
/// is offered. Each time a 1-core machine ends, its core is held for the 2-core type rather than
/// refilled, and once both are free the 2-core type (which waited longest) starts — whichever way
/// the two types' digests sort.
#[tokio::test]
async fn a_two_core_type_is_not_starved_by_one_core_machines() {
    let narrow = offer("narrow");
    let wides: Vec<Offer> = (0..64)
        .map(|i| offer_cores(&format!("wide-{i}"), 2))
        .collect();
    let below = wides.iter().find(|w| w.digest < narrow.digest).unwrap();
    let above = wides.iter().find(|w| w.digest > narrow.digest).unwrap();
    for wide in [below, above] {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Arc::new(Ledger::open(&dir.path().join("ledger.redb")).unwrap());
        let mut cfg = FactoryConfig::new(dir.path().to_owned());
        cfg.tick = Duration::from_millis(50);
        cfg.max_starting = 1;
        let rt = Arc::new(FakeRuntime::new());
        let (_allowance, rx) = watch::channel(Allowance::open(2, 4 << 30));
        let f = Factory::new(
            cfg,
            rt.clone(),
            ledger,
            SecretKey::from_seed([0x77; 32]),
            rx,
        );
        let cancel = CancellationToken::new();
        let (h, _task) = f.spawn(cancel.clone());
        h.offer(narrow.clone()).await.unwrap();
        let machines = |want: usize| {
            let h = h.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    let s = h.status().await.unwrap();
                    if s.machines.len() == want {
                        return s.machines;
                    }
                    assert!(Instant::now() < deadline, "not {want} machines: {s:?}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        let first = machines(2).await;
        assert!(first.iter().all(|m| m.name == "narrow" && m.cores == 1));
        h.offer(wide.clone()).await.unwrap();
        let creates = || rt.calls().iter().filter(|c| c.name() == "create").count();
        assert_eq!(creates(), 2);

        // One 1-core machine ends: its core stays free for the 2-core type.
        rt.finish(&format!("gleaner-{}", first[0].machine_id), 0)
            .unwrap();
        let left = machines(1).await;
        assert_eq!(left[0].machine_id, first[1].machine_id);
        // Many ticks later, nothing has taken the freed core.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let s = h.status().await.unwrap();
        assert_eq!(s.machines.len(), 1, "the freed core was refilled: {s:?}");
        assert_eq!(creates(), 2, "{:?}", rt.calls());

        // The other ends: the 2-core type gets both cores.
        rt.finish(&format!("gleaner-{}", first[1].machine_id), 0)
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = h.status().await.unwrap();
            if s.machines.iter().any(|m| m.name == wide.machine_type.name) {
                assert_eq!(s.machines.len(), 1, "{s:?}");
                assert_eq!(s.machines[0].cores, 2);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} never started: {s:?}",
                wide.machine_type.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cancel.cancel();
    }
}

/// Vac's back-off across the space: another factory's abort of a type (as the daemon hands it on
/// from the space's view) keeps that type from starting here until the abort's time plus the
/// type's back-off, although slots are free; then one machine starts first as a probe.
#[tokio::test]
async fn an_abort_elsewhere_backs_the_type_off_here_then_lets_a_probe_through() {
    const BACKOFF_S: u32 = 3;
    let a = offer_with("alpha", 1, BACKOFF_S);
    let dir = tempfile::tempdir().unwrap();
    let (h, cancel) = factory(dir.path()).await;
    h.offer(a.clone()).await.unwrap();
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // Before the allowance opens (300 ms), so that nothing has started yet.
    h.remote_abort(a.digest, at).await.unwrap();
    let until = at + u64::from(BACKOFF_S);
    let s = h.status().await.unwrap();
    assert_eq!(s.offers[0].backed_off_until, Some(until), "{s:?}");
    // Free slots, and still nothing starts while the back-off lasts.
    let quiet_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < quiet_until {
        let s = h.status().await.unwrap();
        assert!(s.machines.is_empty(), "started during the back-off: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Once it is over, a probe goes first, then the type fills the slots again.
    assert_eq!(filled(&h).await, vec![("alpha".into(), 4)]);
    let s = h.status().await.unwrap();
    let said = |what: &str| s.events.iter().position(|e| e.message.contains(what));
    let (backed, probed) = (
        said("alpha aborted elsewhere in the space"),
        said("probing alpha after its back-off"),
    );
    assert!(backed.is_some() && probed.is_some(), "{:?}", s.events);
    assert!(backed < probed, "{:?}", s.events);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now >= until, "filled before the back-off ended");
    cancel.cancel();
}
