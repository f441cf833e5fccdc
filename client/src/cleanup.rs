//! `gleaner cleanup`: what an uninstall runs once the daemon has stopped — every machine this host
//! owns is stopped and removed from its engine (with a container's egress network and rules), the
//! image cache and machine folders are deleted, and the host key and the ledger (unsent credit)
//! are kept unless `--purge`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::runtime::{MachineHandle, Runtime};

/// What cleanup did.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Machines stopped and removed (engine names).
    pub removed: Vec<String>,
    /// Machines that could not be removed, with the engine's reason.
    pub failed: Vec<String>,
    /// Files and folders deleted.
    pub deleted: Vec<PathBuf>,
    /// Files kept without --purge: the host key, the ledger, and the owner's choices.
    pub kept: Vec<PathBuf>,
}

/// The folders under a state dir that only hold what machines need while they run.
const DISPOSABLE: [&str; 3] = ["images", "machines", "vms"];
/// What survives a plain cleanup: the host's identity, its unsent credit, what the owner chose
/// (trusted publishers, live limits, pauses), the machine-type versions seen, and what a site job
/// still claims — so a reinstall carries on.
const KEPT: [&str; 7] = [
    "host.key",
    "ledger.redb",
    "trust.toml",
    "owner.toml",
    "paused.toml",
    // The newest version seen of each machine type: a reinstall still refuses rollbacks.
    "versions.toml",
    crate::batch::CLAIMS_FILE,
];

/// Stops (with `grace`) and removes every machine `runtime` owns.
pub async fn remove_machines<R: Runtime>(runtime: &R, grace: Duration, report: &mut Report) {
    let owned = match runtime.list_owned().await {
        Ok(o) => o,
        Err(e) => {
            report
                .failed
                .push(format!("listing machines ({:?}): {e}", runtime.engine()));
            return;
        }
    };
    for m in owned {
        let h = MachineHandle {
            engine_id: m.engine_id.clone(),
            name: m.name.clone(),
        };
        // A failed graceful stop still ends in a forced removal.
        let _ = runtime.stop(&h, grace).await;
        match runtime.remove(&h).await {
            Ok(()) => report.removed.push(m.name),
            Err(e) => report.failed.push(format!("{}: {e}", m.name)),
        }
    }
}

/// Removes what the engines hold for machines that no longer exist (egress networks and firewall
/// rules a daemon that died between making them and the container left).
pub async fn remove_strays<R: Runtime>(runtime: &R, report: &mut Report) {
    match runtime.remove_strays().await {
        Ok(removed) => report.removed.extend(removed),
        Err(e) => report
            .failed
            .push(format!("left-overs ({:?}): {e}", runtime.engine())),
    }
}

/// Deletes the disposable parts of `state_dir` (everything when `purge`).
pub fn clean_state(state_dir: &Path, purge: bool, report: &mut Report) -> std::io::Result<()> {
    if !state_dir.exists() {
        return Ok(());
    }
    if purge {
        std::fs::remove_dir_all(state_dir)?;
        report.deleted.push(state_dir.to_owned());
        return Ok(());
    }
    for d in DISPOSABLE {
        let p = state_dir.join(d);
        if p.exists() {
            std::fs::remove_dir_all(&p)?;
            report.deleted.push(p);
        }
    }
    for k in KEPT {
        let p = state_dir.join(k);
        if p.exists() {
            report.kept.push(p);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::fake::FakeRuntime;

    #[test]
    fn keeps_the_key_and_ledger_unless_purged() {
        let t = tempfile::tempdir().unwrap();
        let s = t.path().join("state");
        for d in ["images/blobs", "machines/abc"] {
            std::fs::create_dir_all(s.join(d)).unwrap();
        }
        std::fs::write(s.join("host.key"), "k").unwrap();
        std::fs::write(s.join("ledger.redb"), "l").unwrap();
        std::fs::write(s.join("trust.toml"), "t").unwrap();
        let mut r = Report::default();
        clean_state(&s, false, &mut r).unwrap();
        assert!(!s.join("images").exists() && !s.join("machines").exists());
        assert!(s.join("host.key").exists() && s.join("ledger.redb").exists());
        // Every file kept is listed as kept, the owner's trust store too.
        assert_eq!(
            r.kept,
            vec![
                s.join("host.key"),
                s.join("ledger.redb"),
                s.join("trust.toml")
            ]
        );
        let mut r = Report::default();
        clean_state(&s, true, &mut r).unwrap();
        assert!(!s.exists());
        // A second run, with nothing left, is fine.
        clean_state(&s, true, &mut Report::default()).unwrap();
    }

    #[tokio::test]
    async fn removes_every_owned_machine() {
        let rt = FakeRuntime::new();
        for n in ["a", "b"] {
            rt.add_owned(n);
        }
        let mut r = Report::default();
        remove_machines(&rt, Duration::from_millis(10), &mut r).await;
        assert_eq!(r.removed.len(), 2, "{r:?}");
        assert!(rt.list_owned().await.unwrap().is_empty());
    }
}
