//! The factory on the real Docker Engine: a machine type runs to completion and yields exactly one
//! usage record matching the engine's CPU accounting; heartbeat loss, fizzle with back-off and max
//! wallclock end machines with the right outcome; kill -9 of the daemon loses nothing.

mod support;

use std::time::Duration;

use gleaner::{Envelope, OutcomeCode, UsageRecord};
use gleaner_client::runtime::Runtime;
use support::*;

fn records(ledger: &gleaner_client::ledger::Ledger) -> Vec<UsageRecord> {
    ledger
        .records()
        .unwrap()
        .into_iter()
        .map(|(r, _)| r)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_to_completion_with_one_record_matching_engine_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let owner = owner("complete");
    let mut f = factory(&owner, tmp.path(), |_| {}).await;
    // Burn a fixed amount of CPU (about 2-3 s of it) with heartbeats, mark done, then idle so the
    // engine's CPU total is final while the test reads it. A fixed amount, not a fixed time:
    // guests only get CPU no one else wants, so on a busy host the same seconds hold less work.
    let script = r#"
n=0; while [ $n -lt 60 ]; do n=$((n+1))
  dd if=/dev/zero bs=1048576 count=4 2>/dev/null | sha256sum >/dev/null
  touch /joboutputs/heartbeat
done
cat /jobfeatures/allocated_cpu > /joboutputs/seen_allocated_cpu
head -c 40 /user_data > /joboutputs/seen_user_data
touch /joboutputs/done
sleep 4
echo "200 Intended work completed ok" > /joboutputs/shutdown_message
"#;
    let mt = machine_type("complete", script);
    // One core: exactly one machine at a time.
    f.allowance
        .send(gleaner_client::factory::Allowance::open(1, 2 << 30))
        .unwrap();
    f.handle.offer(offer(&mt)).await.unwrap();
    // One machine, then no more: drain as soon as it is running (it finishes by its shutdowntime).
    eventually(60, "the machine to start", async || {
        (!f.handle.status().await.ok()?.machines.is_empty()).then_some(())
    })
    .await;
    f.handle.drain(false).await.unwrap();

    // While the workload idles, read the engine's own CPU accounting for the container.
    let machines = tmp.path().join("machines");
    let engine_cpu_ns = eventually(60, "the workload to finish its work", async || {
        let dir = std::fs::read_dir(&machines).ok()?.next()?.ok()?.path();
        if !dir.join("joboutputs/done").exists() {
            return None;
        }
        let m = f.runtime.list_owned().await.ok()?.into_iter().next()?;
        // The engine's stats API (not our cgroup reader) is the reference.
        use futures_util::StreamExt;
        let opts = bollard::query_parameters::StatsOptionsBuilder::default()
            .stream(false)
            .build();
        let stats = f
            .runtime
            .docker()
            .stats(&m.engine_id, Some(opts))
            .next()
            .await?
            .ok()?;
        let cpu_ns = stats.cpu_stats?.cpu_usage?.total_usage?;
        let seen = std::fs::read_to_string(dir.join("joboutputs/seen_allocated_cpu")).ok()?;
        assert_eq!(seen.trim(), "1", "the workload read its jobfeatures");
        let ud = std::fs::read_to_string(dir.join("joboutputs/seen_user_data")).ok()?;
        assert!(
            ud.contains("n=0; while [ $n -lt 60 ]"),
            "the workload read its user_data: {ud:?}"
        );
        (cpu_ns > 0).then_some(cpu_ns)
    })
    .await;
    // Let the factory take a sample during the idle phase too (it samples every tick).
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = eventually(60, "exactly one usage record", async || {
        let rs = records(&f.ledger);
        (!rs.is_empty()).then_some(rs)
    })
    .await;
    assert_eq!(r.len(), 1, "{r:?}");
    let r = &r[0];
    assert_eq!(r.outcome, OutcomeCode::Success);
    assert_eq!(r.host, f.key.public());
    assert_eq!(r.machine_type, offer(&mt).digest);
    let engine_ms = engine_cpu_ns / 1_000_000;
    assert!(engine_ms > 1000, "the workload burned CPU: {engine_ms} ms");
    assert!(
        r.cpu_ms.abs_diff(engine_ms) <= 100,
        "record {} ms vs engine {} ms",
        r.cpu_ms,
        engine_ms
    );
    // At least the 4 s the workload idles after its work.
    assert!(r.wall_ms >= 4000 && r.cpu_ms <= r.wall_ms, "{r:?}");
    // The record verifies as the host's signature.
    let pending = f.ledger.pending(10).unwrap();
    Envelope::open_bytes::<UsageRecord>(&pending[0].1).unwrap();
    eventually(10, "cleanup", async || {
        f.runtime.list_owned().await.ok()?.is_empty().then_some(())
    })
    .await;
    let rt = f.runtime.clone();
    f.stop().await;
    assert_nothing_left(&rt, tmp.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_heartbeat_stops_the_machine() {
    let tmp = tempfile::tempdir().unwrap();
    let owner = owner("heartbeat");
    let mut f = factory(&owner, tmp.path(), |_| {}).await;
    let mut mt = machine_type("silent", "touch /joboutputs/heartbeat; sleep 300");
    mt.heartbeat_s = 2;
    mt.fizzle_s = 0;
    f.handle.offer(offer(&mt)).await.unwrap();
    let r = eventually(60, "a heartbeat-lost record", async || {
        records(&f.ledger).into_iter().next()
    })
    .await;
    assert_eq!(r.outcome, OutcomeCode::HeartbeatLost);
    let rt = f.runtime.clone();
    f.handle.withdraw(offer(&mt).digest).await.unwrap();
    f.stop().await;
    assert_nothing_left(&rt, tmp.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_exit_fizzles_and_backs_off() {
    let tmp = tempfile::tempdir().unwrap();
    let owner = owner("fizzle");
    let mut f = factory(&owner, tmp.path(), |_| {}).await;
    let mut mt = machine_type(
        "fizzler",
        "echo '300 No more work' > /joboutputs/shutdown_message",
    );
    mt.fizzle_s = 60;
    mt.backoff_s = 600;
    f.handle.offer(offer(&mt)).await.unwrap();
    let r = eventually(60, "a fizzle record", async || {
        records(&f.ledger).into_iter().next()
    })
    .await;
    assert_eq!(r.outcome, OutcomeCode::Fizzle);
    // Backed off: no second machine starts.
    let status = f.handle.status().await.unwrap();
    assert!(
        status.offers[0].backed_off_until.is_some(),
        "{:?}",
        status.offers
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(records(&f.ledger).len(), 1);
    assert!(f.handle.status().await.unwrap().machines.is_empty());
    let rt = f.runtime.clone();
    f.stop().await;
    assert_nothing_left(&rt, tmp.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_wallclock_writes_shutdowntime_before_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    let owner = owner("wallclock");
    // A long grace, so that the workload can wait for the test to read what it wrote: the factory
    // removes the machine's folder as soon as it has ended.
    let mut f = factory(&owner, tmp.path(), |c| {
        c.stop_grace = Duration::from_secs(60)
    })
    .await;
    // The workload records the shutdowntime it sees when it is asked to stop (SIGTERM), then waits
    // (bounded) until the test has read it.
    let script = r#"
trap 'cat /machinefeatures/shutdowntime > /joboutputs/shutdowntime_at_term; date +%s > /joboutputs/term_at; for i in $(seq 300); do [ -e /joboutputs/read ] && break; sleep 0.1; done; exit 0' TERM
while true; do touch /joboutputs/heartbeat; sleep 0.2; done
"#;
    let mut mt = machine_type("overrunner", script);
    mt.max_wallclock_s = 3;
    mt.heartbeat_s = 2;
    mt.fizzle_s = 0;
    f.handle.offer(offer(&mt)).await.unwrap();
    let dir = eventually(30, "the machine folder", async || {
        Some(
            std::fs::read_dir(tmp.path().join("machines"))
                .ok()?
                .next()?
                .ok()?
                .path(),
        )
    })
    .await;
    let (shutdown, term_at) = eventually(60, "the workload to see SIGTERM", async || {
        let s = std::fs::read_to_string(dir.join("joboutputs/shutdowntime_at_term")).ok()?;
        let t = std::fs::read_to_string(dir.join("joboutputs/term_at")).ok()?;
        Some((s.trim().parse::<u64>().ok()?, t.trim().parse::<u64>().ok()?))
    })
    .await;
    std::fs::write(dir.join("joboutputs/read"), b"").unwrap();
    assert!(
        shutdown <= term_at,
        "shutdowntime {shutdown} was written before the stop at {term_at}"
    );
    let r = eventually(30, "a wallclock record", async || {
        records(&f.ledger).into_iter().next()
    })
    .await;
    assert_eq!(r.outcome, OutcomeCode::WallclockExceeded);
    let rt = f.runtime.clone();
    f.handle.withdraw(offer(&mt).digest).await.unwrap();
    f.stop().await;
    assert_nothing_left(&rt, tmp.path()).await;
}
