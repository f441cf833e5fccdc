//! Space-wide target shares in the factory (issue 5): with the space's counts, a factory starts the
//! types the space as a whole lacks; without them it keeps its local shares.

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
    let publisher = SecretKey::from_seed([0x51; 32]);
    let mut mt = MachineType::example(publisher.public());
    mt.name = name.into();
    mt.backend = Backend::Container;
    mt.image = Some(Blob {
        url: format!("https://example.invalid/{name}.tar"),
        sha256: Digest::of(name.as_bytes()),
    });
    mt.cores_min = 1;
    mt.cores_max = 1;
    mt.memory_mib = 64;
    mt.not_after = 4_000_000_000;
    let v = Envelope::seal(&mt, &publisher)
        .open::<MachineType>()
        .unwrap();
    Offer {
        machine_type: v.message,
        digest: v.digest,
        share: 1.0,
        max_cores: 1,
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
