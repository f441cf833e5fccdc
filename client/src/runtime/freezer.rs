//! Freezing a VM's QEMU process through its cgroup (v1 `freezer.state`, v2 `cgroup.freeze`), the
//! way `docker pause` freezes a container: the kernel stops every thread where it stands, with
//! no round trip through libvirtd's RPC, its job lock and QEMU's monitor (virDomainSuspend).
//! A container is frozen the same way, through its own cgroup (the Docker runtime finds it from
//! its id): runc would read that cgroup as "paused" and refuse a `docker pause` on top, so the
//! Docker runtime never mixes the two on one container — it thaws what it froze, and leaves a
//! freeze the engine made (its fallback) to `docker unpause`.
//!
//! A VM's cgroup is found from the process itself (`/run/libvirt/qemu/<name>.pid`, its `-name guest=<name>` on the
//! command line, then `/proc/<pid>/cgroup`), so it follows wherever libvirt put the domain. Only
//! a cgroup of that domain's own is ever frozen: never a hierarchy's root or a parent shared
//! with other machines.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where libvirt keeps the QEMU pid files of the system and the session daemons.
fn pid_files(name: &str) -> Vec<PathBuf> {
    let mut v = vec![PathBuf::from(format!("/run/libvirt/qemu/{name}.pid"))];
    if let Some(run) = std::env::var_os("XDG_RUNTIME_DIR") {
        v.push(
            Path::new(&run)
                .join("libvirt/qemu/run")
                .join(format!("{name}.pid")),
        );
    }
    v
}

/// Whether this process may freeze cgroups (write the v1 freezer hierarchy or the v2 tree), or
/// why not: without it every freeze goes through the engines (`docker pause`, virDomainSuspend),
/// which is tens to hundreds of milliseconds instead of a few.
pub fn writable() -> Result<PathBuf, String> {
    let v1 = PathBuf::from("/sys/fs/cgroup/freezer");
    let dir = if v1.join("freezer.state").exists() || v1.join("tasks").exists() {
        v1
    } else {
        unified_mount().ok_or("no cgroup freezer: neither a v1 freezer hierarchy nor a v2 tree")?
    };
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{}: not a path", dir.display()))?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0 {
        Ok(dir)
    } else {
        Err(format!(
            "{}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ))
    }
}

/// Which cgroup interface the freeze goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// cgroup v1: `freezer.state` takes FROZEN / THAWED and reads FREEZING until all are stopped.
    V1,
    /// cgroup v2: `cgroup.freeze` takes 1 / 0; `cgroup.events` says `frozen 1` once stopped.
    V2,
}

/// The freezer of one cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupFreezer {
    /// The cgroup's directory in the freezer (v1) or unified (v2) hierarchy.
    pub dir: PathBuf,
    kind: Kind,
}

/// The freezer of one VM's QEMU process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuFreezer {
    /// The QEMU process.
    pub pid: i32,
    /// The domain's own cgroup.
    pub cgroup: CgroupFreezer,
}

impl std::ops::Deref for QemuFreezer {
    type Target = CgroupFreezer;
    fn deref(&self) -> &CgroupFreezer {
        &self.cgroup
    }
}

/// The unified (v2) hierarchy's mount: at the root on a v2 host, `unified` on a hybrid one.
fn unified_mount() -> Option<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    [root.to_owned(), root.join("unified")]
        .into_iter()
        .find(|m| m.join("cgroup.controllers").exists())
}

impl QemuFreezer {
    /// The freezer of domain `name`'s running QEMU, or why there is none (no pid file we may
    /// read, a pid that is not that domain's QEMU, no cgroup of the domain's own).
    pub fn for_domain(name: &str) -> Result<QemuFreezer, String> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(format!("{name:?} is not a domain name"));
        }
        let mut why = Vec::new();
        for f in pid_files(name) {
            match std::fs::read_to_string(&f) {
                Ok(s) => match s.trim().parse::<i32>() {
                    Ok(pid) if pid > 1 => return Self::for_pid(name, pid),
                    _ => why.push(format!("{}: not a pid: {:?}", f.display(), s.trim())),
                },
                Err(e) => why.push(format!("{}: {e}", f.display())),
            }
        }
        Err(format!("no QEMU pid for {name}: {}", why.join("; ")))
    }

    fn for_pid(name: &str, pid: i32) -> Result<QemuFreezer, String> {
        // The pid file may outlive its process and the pid be reused: the process must be this
        // domain's QEMU (`-name guest=<name>,…`).
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map_err(|e| format!("/proc/{pid}/cmdline: {e}"))?;
        let mut args = cmdline.split(|&b| b == 0);
        let ours = args.any(|a| a == b"-name")
            && args.next().is_some_and(|v| {
                let v = String::from_utf8_lossy(v);
                v == name
                    || v.strip_prefix("guest=")
                        .is_some_and(|g| g.split(',').next() == Some(name))
            });
        if !ours {
            return Err(format!("process {pid} is not the QEMU of {name}"));
        }
        let (CgroupFreezer { dir, kind }, mount) = CgroupFreezer::of_process(pid)?;
        let mut dir = dir;
        // libvirt may keep QEMU's main thread in a per-thread child (emulator, vcpuN): freeze
        // the domain's own cgroup, which holds them all.
        let leaf = |d: &Path| {
            d.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let l = leaf(&dir);
        if l == "emulator" || l.starts_with("vcpu") || l.starts_with("iothread") {
            dir.pop();
        }
        // Never a hierarchy's root or a parent of many machines (`machine`, `machine.slice`):
        // the domain's cgroup is named after its QEMU (`qemu-1-name.libvirt-qemu`,
        // `machine-qemu\x2d1\x2dname.scope`).
        if dir == mount || !leaf(&dir).contains("qemu") {
            return Err(format!(
                "process {pid}'s cgroup {} is not a cgroup of its own",
                dir.display()
            ));
        }
        let control = match kind {
            Kind::V1 => "freezer.state",
            Kind::V2 => "cgroup.freeze",
        };
        if !dir.join(control).exists() {
            return Err(format!("no {} in {}", control, dir.display()));
        }
        Ok(QemuFreezer {
            pid,
            cgroup: CgroupFreezer { dir, kind },
        })
    }
}

impl CgroupFreezer {
    /// The freezer of the cgroup process `pid` is in (its own leaf, whoever else shares it), and
    /// the mount of that hierarchy.
    pub fn of_process(pid: i32) -> Result<(CgroupFreezer, PathBuf), String> {
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .map_err(|e| format!("/proc/{pid}/cgroup: {e}"))?;
        let root = Path::new("/sys/fs/cgroup");
        let mut found = None;
        for line in cgroups.lines() {
            let mut f = line.splitn(3, ':');
            let (Some(_), Some(ctrl), Some(path)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            if ctrl.split(',').any(|c| c == "freezer") {
                found = Some((Kind::V1, root.join("freezer"), path));
                break;
            }
            if ctrl.is_empty() {
                if let Some(m) = unified_mount() {
                    found = Some((Kind::V2, m, path));
                }
            }
        }
        let Some((kind, mount, path)) = found else {
            return Err(format!("process {pid} is in no freezer cgroup"));
        };
        let dir = mount.join(path.trim_start_matches('/'));
        Ok((CgroupFreezer { dir, kind }, mount))
    }

    /// The freezer of the cgroup at `sub` below the hierarchy's root (`gleaner-x/<id>`), in the
    /// v1 freezer hierarchy or else the v2 tree; `None` when neither has it (another layout, or
    /// the cgroup is gone).
    pub fn at(sub: &str) -> Option<CgroupFreezer> {
        let sub = sub.trim_start_matches('/');
        if sub.is_empty() || sub.split('/').any(|c| c == ".." || c == ".") {
            return None;
        }
        let v1 = Path::new("/sys/fs/cgroup/freezer").join(sub);
        if v1.join("freezer.state").exists() {
            return Some(CgroupFreezer {
                dir: v1,
                kind: Kind::V1,
            });
        }
        let v2 = unified_mount()?.join(sub);
        v2.join("cgroup.freeze").exists().then_some(CgroupFreezer {
            dir: v2,
            kind: Kind::V2,
        })
    }

    fn write(&self, frozen: bool) -> Result<(), String> {
        let (file, value) = match (self.kind, frozen) {
            (Kind::V1, true) => ("freezer.state", "FROZEN"),
            (Kind::V1, false) => ("freezer.state", "THAWED"),
            (Kind::V2, true) => ("cgroup.freeze", "1"),
            (Kind::V2, false) => ("cgroup.freeze", "0"),
        };
        let f = self.dir.join(file);
        std::fs::write(&f, value).map_err(|e| format!("{}: writing {value}: {e}", f.display()))
    }

    /// Whether every process of the cgroup is stopped (not merely asked to stop).
    pub fn is_frozen(&self) -> bool {
        match self.kind {
            Kind::V1 => std::fs::read_to_string(self.dir.join("freezer.state"))
                .is_ok_and(|s| s.trim() == "FROZEN"),
            Kind::V2 => std::fs::read_to_string(self.dir.join("cgroup.events"))
                .is_ok_and(|s| s.lines().any(|l| l.trim() == "frozen 1")),
        }
    }

    /// Whether the cgroup is frozen or being frozen (asked to freeze, not yet thawed).
    pub fn is_freezing(&self) -> bool {
        match self.kind {
            Kind::V1 => std::fs::read_to_string(self.dir.join("freezer.state"))
                .is_ok_and(|s| s.trim() != "THAWED"),
            Kind::V2 => std::fs::read_to_string(self.dir.join("cgroup.freeze"))
                .is_ok_and(|s| s.trim() == "1"),
        }
    }

    /// Freezes the cgroup and waits until every thread has stopped, up to `deadline`; one that
    /// does not stop in time is thawed again and the error says so.
    pub async fn freeze(&self, deadline: Duration) -> Result<(), String> {
        let t0 = Instant::now();
        self.write(true)?;
        while !self.is_frozen() {
            if t0.elapsed() > deadline {
                let _ = self.write(false);
                return Err(format!(
                    "{} did not stop within {deadline:?}",
                    self.dir.display()
                ));
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        Ok(())
    }

    /// Thaws the cgroup (at once: thawed tasks run at their next chance).
    pub fn thaw(&self) -> Result<(), String> {
        self.write(false)
    }
}
