//! The factory running VM machine types on the real libvirtd (TCG) through the daemon's runtime
//! over both engines: a signed VM type boots the test kernel, reads its MJF and user_data over
//! virtiofs and the NoCloud seed, heartbeats, writes its outcome, and yields exactly one usage
//! record whose CPU time matches libvirt's accounting; a guest that stops its heartbeat is stopped
//! with outcome heartbeat-lost; one that overruns its max wallclock finds its shutdowntime already
//! passed when the host's graceful stop (ACPI) reaches it, and ends with outcome wallclock; after a
//! kill -9 of the factory, a restart
//! adopts the VM still running and accounts for and cleans the one that died; nothing is left.
//! Skipped only when libvirtd is unreachable and CI is unset.

mod support;

use std::sync::Mutex;
use std::time::{Duration, Instant};

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

/// Destroys and undefines the domains a test saw, even when it panics.
#[derive(Default)]
struct Domains(Mutex<Vec<String>>);

impl Domains {
    fn saw(&self, name: &str) {
        let mut v = self.0.lock().unwrap();
        if !v.iter().any(|n| n == name) {
            v.push(name.to_owned());
        }
    }

    fn names(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

impl Drop for Domains {
    fn drop(&mut self) {
        for n in self.names() {
            let _ = virsh(&["destroy", &n]);
            let _ = virsh(&["undefine", &n]);
        }
    }
}

/// The VM tests run one at a time: TCG guests on two shared cores are slow enough alone.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// libvirt's own CPU total for a domain (`virsh domstats --cpu-total`), in ns, while it runs
/// (a shut-off domain's stats are stale, so they do not count).
fn libvirt_cpu_ns(name: &str) -> Option<u64> {
    let stats = virsh(&["domstats", "--state", "--cpu-total", name]);
    let field = |key: &str| {
        stats
            .lines()
            .find_map(|l| l.trim().strip_prefix(key).map(|v| v.trim().to_owned()))
    };
    // VIR_DOMAIN_RUNNING is 1.
    if field("state.state=")? != "1" {
        return None;
    }
    field("cpu.time=")?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_runs_to_completion_with_one_record_matching_libvirt_cpu() {
    let _one = ONE_AT_A_TIME.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let owner = owner("vm-complete");
    let Some(rt) = host_runtime(&owner, tmp.path()).await else {
        return;
    };
    let domains = Domains::default();
    let ledger = std::sync::Arc::new(
        gleaner_client::ledger::Ledger::open(&tmp.path().join("ledger.redb")).unwrap(),
    );
    let mut f = vm_factory(rt, ledger, tmp.path(), 1).await;
    // Burn CPU for ~4 s in the guest, prove it read its MJF and user_data, then idle with the
    // init's heartbeat so libvirt's CPU total is (nearly) final while the test reads it.
    let script = r#"
end=$(( $(date +%s) + 4 ))
n=0
while [ "$(date +%s)" -lt "$end" ]; do n=$((n+1)); done
cat /jobfeatures/allocated_cpu > /joboutputs/seen_allocated_cpu
head -c 24 /user_data > /joboutputs/seen_user_data
touch /joboutputs/done
sleep 5
echo "200 Intended work completed ok" > /joboutputs/shutdown_message
"#;
    let mt = vm_machine_type("vm-complete", script);
    f.handle.offer(offer(&mt)).await.unwrap();
    eventually(120, "the vm to start", async || {
        (!f.handle.status().await.ok()?.machines.is_empty()).then_some(())
    })
    .await;
    // One machine, then no more.
    f.handle.drain(false).await.unwrap();
    let name = eventually(30, "the domain", async || {
        let m = f.runtime.list_owned().await.ok()?.into_iter().next()?;
        domains.saw(&m.name);
        Some(m.name)
    })
    .await;
    let machines = tmp.path().join("machines");
    let dir = eventually(240, "the guest to finish its work", async || {
        let dir = std::fs::read_dir(&machines).ok()?.next()?.ok()?.path();
        dir.join("joboutputs/done").exists().then_some(dir)
    })
    .await;
    let seen = std::fs::read_to_string(dir.join("joboutputs/seen_allocated_cpu")).unwrap();
    assert_eq!(seen.trim(), "1", "the guest read its jobfeatures");
    let ud = std::fs::read_to_string(dir.join("joboutputs/seen_user_data")).unwrap();
    assert!(ud.contains("end=$(( $(date +%s) + 4"), "{ud:?}");
    // libvirt's CPU total, last read while the domain still runs.
    let mut engine_ns = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        match libvirt_cpu_ns(&name) {
            Some(ns) => engine_ns = ns,
            None if engine_ns > 0 => break,
            None => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rs = eventually(60, "the usage record", async || {
        let rs = records(&f.ledger);
        (!rs.is_empty()).then_some(rs)
    })
    .await;
    // Nothing more comes (drained): exactly one record.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rs2 = records(&f.ledger);
    assert_eq!(rs2.len(), 1, "{rs2:?}");
    let r = &rs[0];
    assert_eq!(r.outcome, OutcomeCode::Success, "{r:?}");
    assert_eq!(r.host, f.key.public());
    assert_eq!(r.machine_type, offer(&mt).digest);
    assert_eq!(r.cores, 1);
    let engine_ms = engine_ns / 1_000_000;
    assert!(engine_ms > 2000, "the guest burned CPU: {engine_ms} ms");
    // Both were read in the last fraction of a second of an idle guest's life.
    let tolerance = (engine_ms / 20).max(300);
    assert!(
        r.cpu_ms.abs_diff(engine_ms) <= tolerance,
        "record {} ms vs libvirt {} ms (tolerance {tolerance} ms)",
        r.cpu_ms,
        engine_ms
    );
    assert!(r.cpu_ms <= r.wall_ms, "{r:?}");
    let pending = f.ledger.pending(10).unwrap();
    Envelope::open_bytes::<UsageRecord>(&pending[0].1).unwrap();
    let events = f.handle.status().await.unwrap().events;
    assert!(
        events.iter().any(|e| e.message.contains("ended: success")),
        "{events:?}"
    );
    let rt = f.runtime.clone();
    f.stop().await;
    assert_no_vm_left(&rt, tmp.path(), &domains.names()).await;
}

/// The folder of the one machine the factory runs under `state`, once it exists.
async fn machine_dir(state: &std::path::Path, what: &str) -> std::path::PathBuf {
    let machines = state.join("machines");
    eventually(240, what, async || {
        Some(std::fs::read_dir(&machines).ok()?.next()?.ok()?.path())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_whose_heartbeat_stops_is_stopped_with_heartbeat_lost() {
    let _one = ONE_AT_A_TIME.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let owner = owner("vm-heartbeat");
    let Some(rt) = host_runtime(&owner, tmp.path()).await else {
        return;
    };
    let domains = Domains::default();
    let ledger = std::sync::Arc::new(
        gleaner_client::ledger::Ledger::open(&tmp.path().join("ledger.redb")).unwrap(),
    );
    let mut f = vm_factory(rt, ledger, tmp.path(), 1).await;
    // The guest boots and heartbeats (the init's loop), then stops the heartbeat and stays up.
    let script = r#"
kill $(cat /run/heartbeat.pid)
touch /joboutputs/heartbeat_stopped
sleep 600
"#;
    let mut mt = vm_machine_type("vm-silent", script);
    // Longer than a TCG boot on a loaded machine, so that only the silence can trip it.
    mt.heartbeat_s = 30;
    mt.backoff_s = 3600;
    f.handle.offer(offer(&mt)).await.unwrap();
    let dir = machine_dir(tmp.path(), "the machine folder").await;
    eventually(240, "the guest to stop its heartbeat", async || {
        if let Ok(owned) = f.runtime.list_owned().await {
            owned.iter().for_each(|o| domains.saw(&o.name));
        }
        dir.join("joboutputs/heartbeat_stopped")
            .exists()
            .then_some(())
    })
    .await;
    f.handle.drain(false).await.unwrap();
    let r = eventually(180, "a heartbeat-lost record", async || {
        records(&f.ledger).into_iter().next()
    })
    .await;
    assert_eq!(r.outcome, OutcomeCode::HeartbeatLost, "{r:?}");
    let events = f.handle.status().await.unwrap().events;
    assert!(
        events.iter().any(|e| e.message.contains("heartbeat")),
        "{events:?}"
    );
    let rt = f.runtime.clone();
    f.handle.withdraw(offer(&mt).digest).await.unwrap();
    f.stop().await;
    assert_eq!(records(&f.ledger).len(), 1);
    assert_no_vm_left(&rt, tmp.path(), &domains.names()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_that_ends_early_fizzles_and_its_type_backs_off() {
    let _one = ONE_AT_A_TIME.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let owner = owner("vm-fizzle");
    let Some(rt) = host_runtime(&owner, tmp.path()).await else {
        return;
    };
    let domains = Domains::default();
    let ledger = std::sync::Arc::new(
        gleaner_client::ledger::Ledger::open(&tmp.path().join("ledger.redb")).unwrap(),
    );
    let mut f = vm_factory(rt, ledger, tmp.path(), 1).await;
    // The guest has nothing to do: it says so and powers off right after booting.
    let mut mt = vm_machine_type(
        "vm-fizzler",
        "echo '300 No more work' > /joboutputs/shutdown_message",
    );
    // Far longer than a TCG boot on a loaded machine: any end before it is a fizzle.
    mt.fizzle_s = 600;
    mt.backoff_s = 3600;
    f.handle.offer(offer(&mt)).await.unwrap();
    let r = eventually(240, "a fizzle record", async || {
        if let Ok(owned) = f.runtime.list_owned().await {
            owned.iter().for_each(|o| domains.saw(&o.name));
        }
        records(&f.ledger).into_iter().next()
    })
    .await;
    assert_eq!(r.outcome, OutcomeCode::Fizzle, "{r:?}");
    let status = f.handle.status().await.unwrap();
    assert!(
        status.offers[0].backed_off_until.is_some(),
        "the type backs off: {:?}",
        status.offers
    );
    // Backed off: no second VM starts, though the slot is free.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(records(&f.ledger).len(), 1);
    assert!(f.handle.status().await.unwrap().machines.is_empty());
    assert!(f.runtime.list_owned().await.unwrap().is_empty());
    let rt = f.runtime.clone();
    f.stop().await;
    assert_no_vm_left(&rt, tmp.path(), &domains.names()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_over_its_max_wallclock_sees_its_shutdowntime_then_is_stopped() {
    let _one = ONE_AT_A_TIME.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let owner = owner("vm-wallclock");
    let Some(rt) = host_runtime(&owner, tmp.path()).await else {
        return;
    };
    let domains = Domains::default();
    let ledger = std::sync::Arc::new(
        gleaner_client::ledger::Ledger::open(&tmp.path().join("ledger.redb")).unwrap(),
    );
    // A long grace, so that the guest can wait for the test to read what it wrote: the factory
    // removes the machine's folder as soon as the machine has ended.
    let mut f = vm_factory_with(rt, ledger, tmp.path(), 1, |c| {
        c.stop_grace = Duration::from_secs(90)
    })
    .await;
    // The guest takes over the power button from the init: when the host's graceful stop comes,
    // it records the shutdowntime it sees, waits (bounded) for the test to read it, then ends.
    let script = r#"
kill $(cat /run/powerbutton.pid)
for ev in /sys/class/input/event*; do
  [ "$(cat "$ev/device/name")" = "Power Button" ] && dev=/dev/input/$(basename "$ev")
done
touch /joboutputs/watching
dd if="$dev" bs=24 count=1 >/dev/null 2>&1
cat /machinefeatures/shutdowntime > /joboutputs/shutdowntime_at_stop
i=0
while [ ! -e /joboutputs/read ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
echo "100 Shutdown as requested by the host" > /joboutputs/shutdown_message
"#;
    let mut mt = vm_machine_type("vm-overrun", script);
    // Longer than a TCG boot on a loaded machine: the guest must be watching when it comes.
    mt.max_wallclock_s = 40;
    mt.heartbeat_s = 30;
    mt.backoff_s = 3600;
    f.handle.offer(offer(&mt)).await.unwrap();
    let dir = machine_dir(tmp.path(), "the machine folder").await;
    eventually(240, "the guest to watch its power button", async || {
        if let Ok(owned) = f.runtime.list_owned().await {
            owned.iter().for_each(|o| domains.saw(&o.name));
        }
        dir.join("joboutputs/watching").exists().then_some(())
    })
    .await;
    f.handle.drain(false).await.unwrap();
    let shutdown = eventually(180, "the guest to be asked to stop", async || {
        let s = std::fs::read_to_string(dir.join("joboutputs/shutdowntime_at_stop")).ok()?;
        s.trim().parse::<u64>().ok()
    })
    .await;
    // Host time, after the stop reached the guest (not the guest's clock, which TCG may skew).
    let seen_at = gleaner_client::factory::now_ms() / 1000;
    std::fs::write(dir.join("joboutputs/read"), b"").unwrap();
    assert!(
        shutdown <= seen_at,
        "the shutdowntime {shutdown} had passed when the stop reached the guest ({seen_at})"
    );
    let r = eventually(120, "a wallclock record", async || {
        records(&f.ledger).into_iter().next()
    })
    .await;
    assert_eq!(r.outcome, OutcomeCode::WallclockExceeded, "{r:?}");
    // The guest ended by itself after the graceful stop, long before the grace ran out.
    assert!(r.wall_ms < (40 + 60) * 1000, "{r:?}");
    let rt = f.runtime.clone();
    f.handle.withdraw(offer(&mt).digest).await.unwrap();
    f.stop().await;
    assert_eq!(records(&f.ledger).len(), 1);
    assert_no_vm_left(&rt, tmp.path(), &domains.names()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_kill_the_restarted_factory_adopts_or_cleans_every_vm() {
    let _one = ONE_AT_A_TIME.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let owner = owner("vm-recover");
    let Some(rt) = host_runtime(&owner, tmp.path()).await else {
        return;
    };
    let domains = Domains::default();
    let ledger = std::sync::Arc::new(
        gleaner_client::ledger::Ledger::open(&tmp.path().join("ledger.redb")).unwrap(),
    );
    let mut a = vm_factory(rt, ledger.clone(), tmp.path(), 2).await;
    // Each guest waits for the test's go-ahead (a file the host writes into joboutputs).
    let script = r#"
i=0
while [ ! -e /joboutputs/go ] && [ $i -lt 900 ]; do sleep 0.2; i=$((i+1)); done
echo "200 Released by the test" > /joboutputs/shutdown_message
"#;
    let mut mt = vm_machine_type("vm-recover", script);
    mt.backoff_s = 3600;
    a.handle.offer(offer(&mt)).await.unwrap();
    let owned = eventually(240, "two running vms", async || {
        let s = a.handle.status().await.ok()?;
        let owned = a.runtime.list_owned().await.ok()?;
        for o in &owned {
            domains.saw(&o.name);
        }
        (s.machines.len() == 2
            && owned.len() == 2
            && owned
                .iter()
                .all(|o| o.state == gleaner_client::runtime::MachineState::Running))
        .then_some(owned)
    })
    .await;
    a.handle.drain(false).await.unwrap();
    // kill -9: no shutdown, machines left running, ledger entries left open.
    a.kill().await;
    drop(a);
    // One VM dies while the daemon is down.
    let (dead, alive) = (&owned[0], &owned[1]);
    virsh(&["destroy", &dead.name]);
    assert!(records(&ledger).is_empty());

    // The restarted daemon: a new runtime over both engines, the same ledger and state.
    let rt = host_runtime(&owner, tmp.path()).await.unwrap();
    let mut b = vm_factory(rt, ledger.clone(), tmp.path(), 2).await;
    let status = b.handle.status().await.unwrap();
    assert_eq!(status.machines.len(), 1, "{:?}", status.events);
    assert_eq!(
        status.machines[0].machine_id,
        alive.machine_id.unwrap().to_string()
    );
    assert!(
        status
            .events
            .iter()
            .any(|e| e.message.contains("adopted running machine")),
        "{:?}",
        status.events
    );
    // The dead one is accounted for and cleaned at once.
    let rs = records(&ledger);
    assert_eq!(rs.len(), 1, "{rs:?}");
    assert_eq!(rs[0].machine_id, dead.machine_id.unwrap());
    assert_ne!(rs[0].outcome, OutcomeCode::Success);
    assert!(
        !virsh(&["list", "--all", "--name"])
            .lines()
            .any(|l| l.trim() == dead.name)
    );

    // Release the adopted one: it finishes under the new factory with the guest's outcome.
    let alive_dir = tmp
        .path()
        .join("machines")
        .join(alive.machine_id.unwrap().to_string());
    std::fs::write(alive_dir.join("joboutputs/go"), "go").unwrap();
    let rs = eventually(120, "the adopted vm's record", async || {
        let rs = records(&ledger);
        (rs.len() == 2).then_some(rs)
    })
    .await;
    let adopted = rs
        .iter()
        .find(|r| r.machine_id == alive.machine_id.unwrap())
        .expect("a record for the adopted vm");
    assert_eq!(adopted.outcome, OutcomeCode::Success, "{adopted:?}");
    assert!(adopted.cpu_ms > 0, "{adopted:?}");
    // No record lost or duplicated: one per machine, distinct ids.
    assert_ne!(rs[0].record_id, rs[1].record_id);
    assert_ne!(rs[0].machine_id, rs[1].machine_id);
    let rt = b.runtime.clone();
    b.stop().await;
    assert_eq!(records(&ledger).len(), 2);
    assert_no_vm_left(&rt, tmp.path(), &domains.names()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_type_is_refused_with_a_reason_when_libvirt_is_off() {
    let tmp = tempfile::tempdir().unwrap();
    let owner = owner("vm-off");
    let mut opts = gleaner_client::runtime::backends::ConnectOptions::new(
        &owner,
        tmp.path().to_owned(),
        1 << 30,
    );
    opts.vms = false;
    let rt = gleaner_client::runtime::backends::connect(&opts).await;
    assert!(!rt.runs(gleaner::Backend::Vm));
    let ledger = std::sync::Arc::new(
        gleaner_client::ledger::Ledger::open(&tmp.path().join("ledger.redb")).unwrap(),
    );
    let mut f = vm_factory(rt, ledger.clone(), tmp.path(), 1).await;
    let mt = vm_machine_type("vm-refused", "true");
    f.handle.offer(offer(&mt)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = f.handle.status().await.unwrap();
    assert!(s.offers.is_empty(), "{:?}", s.offers);
    assert!(s.machines.is_empty());
    let refusals: Vec<_> = s
        .events
        .iter()
        .filter(|e| e.message.contains("refused machine type vm-refused"))
        .collect();
    assert_eq!(refusals.len(), 1, "{:?}", s.events);
    assert!(
        refusals[0].message.contains("no vm machines"),
        "{refusals:?}"
    );
    assert!(records(&ledger).is_empty());
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_type_whose_egress_lists_destinations_is_refused_once_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let owner = owner("vm-egress");
    let Some(rt) = host_runtime(&owner, tmp.path()).await else {
        return;
    };
    let ledger = std::sync::Arc::new(
        gleaner_client::ledger::Ledger::open(&tmp.path().join("ledger.redb")).unwrap(),
    );
    let mut f = vm_factory(rt, ledger.clone(), tmp.path(), 1).await;
    let mut mt = vm_machine_type("vm-egress", "true");
    mt.egress = vec!["192.0.2.1:443".into()];
    f.handle.offer(offer(&mt)).await.unwrap();
    // Offered twice (gossip repeats offers): still refused, and said once per offer, never retried.
    f.handle.offer(offer(&mt)).await.unwrap();
    let s = eventually(30, "the refusal", async || {
        let s = f.handle.status().await.unwrap();
        (s.events
            .iter()
            .filter(|e| e.message.contains("refused machine type vm-egress"))
            .count()
            == 2)
            .then_some(s)
    })
    .await;
    assert!(s.offers.is_empty(), "{:?}", s.offers);
    assert!(s.machines.is_empty());
    let refusal = s
        .events
        .iter()
        .find(|e| e.message.contains("refused machine type vm-egress"))
        .unwrap();
    assert!(
        refusal.message.contains("192.0.2.1:443") && refusal.message.contains("containers only"),
        "{refusal:?}"
    );
    assert!(records(&ledger).is_empty());
    f.stop().await;
}

/// `gleaner cleanup` (what the package's removal runs) after a daemon died with a VM running: the
/// domain, its overlay and seed and the machine folders go; the host key and the ledger stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_removes_the_vms_a_dead_daemon_left() {
    let _one = ONE_AT_A_TIME.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    // The runtime's owner is the host key's id, as in the daemon.
    let key = gleaner::SecretKey::from_seed([0x79; 32]);
    gleaner_client::keys::write(&gleaner_client::daemon::host_key_path(&state), &key, false)
        .unwrap();
    let owner = key.public().to_string();
    let Some(rt) = host_runtime(&owner, &state).await else {
        return;
    };
    let ledger = std::sync::Arc::new(
        gleaner_client::ledger::Ledger::open(&gleaner_client::daemon::ledger_path(&state)).unwrap(),
    );
    let mut f = vm_factory(rt, ledger, &state, 1).await;
    let mut mt = vm_machine_type("vm-cleanup", "sleep 600");
    mt.backoff_s = 3600;
    f.handle.offer(offer(&mt)).await.unwrap();
    let names = eventually(240, "a running vm", async || {
        let owned = f.runtime.list_owned().await.ok()?;
        (owned.len() == 1 && owned[0].state == gleaner_client::runtime::MachineState::Running)
            .then(|| vec![owned[0].name.clone()])
    })
    .await;
    f.kill().await;
    drop(f);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gleaner"))
        .args(["cleanup", "--grace", "1s", "--state-dir"])
        .arg(&state)
        .arg("--socket")
        .arg(tmp.path().join("no-daemon.sock"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let rt = host_runtime(&owner, &state).await.unwrap();
    assert_no_vm_left(&rt, &state, &names).await;
    assert!(gleaner_client::daemon::host_key_path(&state).exists());
    assert!(gleaner_client::daemon::ledger_path(&state).exists());
}
