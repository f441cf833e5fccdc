//! Machine/job features on disk (the HEPiX MJF layout Vac uses): what the host tells a workload
//! (`machinefeatures/`, `jobfeatures/`, `user_data`) and what the workload tells the host
//! (`joboutputs/heartbeat`, `joboutputs/shutdown_message`).

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

/// What a machine is told about its host and its job slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Features {
    /// The host's per-core benchmark score (the `hs06` file carries it; see docs/credit.md).
    pub benchmark_per_core: u32,
    pub jobslots: u32,
    pub shutdown_at: u64,
    pub total_cpu: u32,
    pub allocated_cpu: u16,
    pub wall_limit_secs: u64,
    pub max_rss_bytes: u64,
    pub scratch_limit_bytes: u64,
    pub jobstart_secs: u64,
    pub job_id: String,
}

/// The MJF directory of one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MjfDir {
    pub root: PathBuf,
}

fn write_value(dir: &Path, name: &str, value: impl ToString) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, format!("{}\n", value.to_string()))?;
    fs::rename(tmp, dir.join(name))
}

impl MjfDir {
    /// Creates `root` with the three folders and the user_data file. `joboutputs/` is writable by
    /// anyone because the workload runs as an unprivileged user inside its machine.
    pub fn create(root: &Path, features: &Features, user_data: &str) -> io::Result<MjfDir> {
        let dir = MjfDir {
            root: root.to_owned(),
        };
        for sub in ["machinefeatures", "jobfeatures", "joboutputs"] {
            fs::create_dir_all(root.join(sub))?;
        }
        fs::set_permissions(root, fs::Permissions::from_mode(0o755))?;
        fs::set_permissions(dir.joboutputs(), fs::Permissions::from_mode(0o1777))?;
        dir.write_features(features)?;
        fs::write(root.join("user_data"), user_data)?;
        Ok(dir)
    }

    pub fn machinefeatures(&self) -> PathBuf {
        self.root.join("machinefeatures")
    }

    pub fn jobfeatures(&self) -> PathBuf {
        self.root.join("jobfeatures")
    }

    pub fn joboutputs(&self) -> PathBuf {
        self.root.join("joboutputs")
    }

    /// Writes (or rewrites) every feature file, each atomically.
    pub fn write_features(&self, f: &Features) -> io::Result<()> {
        let m = self.machinefeatures();
        write_value(&m, "hs06", f.benchmark_per_core)?;
        write_value(&m, "jobslots", f.jobslots)?;
        write_value(&m, "total_cpu", f.total_cpu)?;
        write_value(&m, "shutdowntime", f.shutdown_at)?;
        let j = self.jobfeatures();
        write_value(&j, "allocated_cpu", f.allocated_cpu)?;
        write_value(&j, "wall_limit_secs", f.wall_limit_secs)?;
        write_value(
            &j,
            "cpu_limit_secs",
            f.wall_limit_secs * u64::from(f.allocated_cpu),
        )?;
        write_value(&j, "max_rss_bytes", f.max_rss_bytes)?;
        write_value(&j, "max_swap_bytes", 0)?;
        write_value(&j, "scratch_limit_bytes", f.scratch_limit_bytes)?;
        write_value(&j, "jobstart_secs", f.jobstart_secs)?;
        write_value(&j, "job_id", &f.job_id)?;
        write_value(&j, "shutdowntime_job", f.shutdown_at)?;
        Ok(())
    }

    /// Moves the shutdown time (earlier, when draining or at max wallclock) before anything is stopped.
    pub fn write_shutdown_time(&self, at: u64) -> io::Result<()> {
        write_value(&self.machinefeatures(), "shutdowntime", at)?;
        write_value(&self.jobfeatures(), "shutdowntime_job", at)
    }

    /// The shutdown time currently written.
    pub fn shutdown_time(&self) -> Option<u64> {
        fs::read_to_string(self.machinefeatures().join("shutdowntime"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// Modification time of `joboutputs/heartbeat`, in unix seconds.
    pub fn last_heartbeat(&self) -> Option<u64> {
        fs::metadata(self.joboutputs().join("heartbeat"))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
    }

    /// The workload's `joboutputs/shutdown_message`, at most 1 KiB of it.
    pub fn shutdown_message(&self) -> Option<String> {
        use std::io::Read;
        let mut buf = Vec::new();
        fs::File::open(self.joboutputs().join("shutdown_message"))
            .and_then(|f| f.take(1024).read_to_end(&mut buf))
            .ok()?;
        Some(String::from_utf8_lossy(&buf).into_owned())
    }

    /// Removes the whole directory.
    pub fn remove(&self) -> io::Result<()> {
        match fs::remove_dir_all(&self.root) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_outputs() {
        let tmp = tempfile::tempdir().unwrap();
        let f = Features {
            benchmark_per_core: 1500,
            jobslots: 2,
            shutdown_at: 5000,
            total_cpu: 2,
            allocated_cpu: 1,
            wall_limit_secs: 3600,
            max_rss_bytes: 1 << 30,
            scratch_limit_bytes: 1 << 30,
            jobstart_secs: 1400,
            job_id: "abc".into(),
        };
        let d = MjfDir::create(&tmp.path().join("m"), &f, "hello").unwrap();
        assert_eq!(
            fs::read_to_string(d.jobfeatures().join("allocated_cpu")).unwrap(),
            "1\n"
        );
        assert_eq!(
            fs::read_to_string(d.root.join("user_data")).unwrap(),
            "hello"
        );
        assert_eq!(d.shutdown_time(), Some(5000));
        d.write_shutdown_time(4000).unwrap();
        assert_eq!(d.shutdown_time(), Some(4000));
        assert_eq!(d.last_heartbeat(), None);
        fs::write(d.joboutputs().join("heartbeat"), "").unwrap();
        assert!(d.last_heartbeat().is_some());
        fs::write(
            d.joboutputs().join("shutdown_message"),
            "300 No more work\n",
        )
        .unwrap();
        assert_eq!(d.shutdown_message().as_deref(), Some("300 No more work\n"));
        d.remove().unwrap();
        assert!(!d.root.exists());
    }
}
