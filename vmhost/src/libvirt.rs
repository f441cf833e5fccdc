//! VMs on libvirt/QEMU through the `virt` crate: a probe that test-boots under KVM before trusting
//! it (else TCG), domain XML from a real XML writer, direct kernel boot and/or a qcow2 base with a
//! per-machine copy-on-write overlay, user_data as a NoCloud (cidata) seed, MJF over virtiofs,
//! CPU quota via cputune, serial console to a log, suspend/resume, ACPI shutdown with a deadline.
//!
//! Every libvirt call is blocking, so each runs on tokio's blocking pool (`spawn_blocking`).
//! It runs in the `gleaner-vmhost` helper (see `serve.rs`), never in the daemon, which reaches it
//! through `gleaner_client::runtime::vmhost::VmHostRuntime`.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gleaner::{Digest, Id16};
use quick_xml::Writer;
use quick_xml::events::{BytesDecl, BytesText, Event};
use virt::connect::Connect;
use virt::domain::{Domain, DomainShutoffReason, DomainState, DomainStateReason, SchedulerInfo};
use virt::error::ErrorNumber;

use gleaner_client::runtime::blobs::BlobCache;
use gleaner_client::runtime::freezer::QemuFreezer;
use gleaner_client::runtime::vmhost::FREEZE_DEADLINE;
pub use gleaner_client::runtime::vmhost::{
    DEFAULT_URI, DomainType, LibvirtConfig, METADATA_NS, SHARE_TAGS,
};
use gleaner_client::runtime::{
    Backend, EngineKind, ImageSource, Limits, MachineHandle, MachineSpec, MachineState,
    OwnedMachine, PreparedImage, Probe, Progress, Runtime, RuntimeError, Usage,
};

const METADATA_PREFIX: &str = "gleaner";
/// The CFS period the domain's CPU quota is expressed in (µs).
const CPU_PERIOD_US: u64 = 100_000;
/// libvirt refuses a CFS quota below 1 ms.
const MIN_QUOTA_US: i64 = 1_000;
/// The kernel command line of a direct kernel boot. Fixed: nothing from a machine type reaches it.
const CMDLINE: &str = "console=ttyS0 panic=-1";
/// The only share a guest may write to; the others are served read-only (see `virtiofsd_ro`).
pub const WRITABLE_SHARE: &str = "joboutputs";
/// Where virtiofsd is looked for: Debian 13's Rust daemon, then QEMU's own (Debian 12).
pub const VIRTIOFSD: [&str; 2] = ["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"];
/// The wrapper's file name in the state directory.
const VIRTIOFSD_RO: &str = "virtiofsd-ro";

/// A virtiofsd that serves its shared folder read-only, for libvirt's `<binary path=…>`:
/// libvirt 9.0 cannot mark a virtiofs share read-only, and a guest's root can remount a share it
/// mounted read-only, so the host enforces it. The wrapper bind-mounts the folder read-only onto
/// itself in a private mount namespace and runs `real` there: the kernel refuses every write
/// (EROFS) whatever the guest asks, the host's own view stays writable (the factory updates
/// shutdowntime), and the mount ends with virtiofsd. Without a folder to serve it refuses to run.
pub fn virtiofsd_ro_script(real: &str) -> String {
    format!(
        r#"#!/bin/sh
# Written by gleaner: virtiofsd serving its shared folder read-only (see libvirt.rs).
set -eu
PATH=/usr/sbin:/usr/bin:/sbin:/bin
real='{real}'
case " $* " in
  *" --print-capabilities "*|*" --version "*|*" -V "*|*" --help "*|*" -h "*) exec "$real" "$@" ;;
esac
src=''
prev=''
for a in "$@"; do
  case "$a" in
    source=*|*,source=*) s=${{a#*source=}}; src=${{s%%,*}} ;;
    --shared-dir=*) src=${{a#--shared-dir=}} ;;
  esac
  [ "$prev" = --shared-dir ] && src=$a
  prev=$a
done
if [ -z "$src" ] || [ ! -d "$src" ]; then
  echo "gleaner virtiofsd-ro: no shared folder to serve read-only in: $*" >&2
  exit 1
fi
exec unshare -m --propagation private sh -c   'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'   gleaner-virtiofsd-ro "$src" "$real" "$@"
"#
    )
}

/// What the probe's boot sector prints on the serial port once it runs.
const PROBE_MARKER: &str = "GLEANER-KVM-OK";

/// The libvirt backend.
#[derive(Debug, Clone)]
pub struct LibvirtRuntime {
    link: Arc<Link<VirtOpener>>,
    cfg: Arc<LibvirtConfig>,
    blobs: BlobCache,
    /// What new domains run under: TCG until a probe has shown KVM works.
    domain_type: Arc<Mutex<DomainType>>,
    /// The highest memory sample per machine (libvirt keeps no high-water mark).
    peaks: Arc<Mutex<HashMap<String, u64>>>,
    /// The read-only virtiofsd wrapper in the state directory; `None` without a virtiofsd.
    virtiofsd_ro: Option<PathBuf>,
}

/// Opens connections to libvirtd: the real one, or a fake in the reconnection tests.
pub trait Opener: Send + Sync + 'static {
    type Conn: Send + Sync + 'static;
    /// Opens a new connection (blocking); the error says why it could not.
    fn open(&self) -> Result<Self::Conn, String>;
    /// Whether `c` still works: false once libvirtd closed it (a restart, an upgrade).
    fn alive(&self, c: &Self::Conn) -> bool;
    /// What is being connected to, for errors.
    fn target(&self) -> String;
}

/// A connection that is reopened on the next call after libvirtd went away: the call that met
/// the closed socket fails, the next one finds the connection dead and opens a new one, or
/// fails with `Unreachable` saying why (and tries again on the call after).
pub struct Link<K: Opener> {
    opener: K,
    current: Mutex<Option<Arc<K::Conn>>>,
    reopened: std::sync::atomic::AtomicU64,
}

impl<K: Opener> std::fmt::Debug for Link<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("target", &self.opener.target())
            .field("reopened", &self.reopened())
            .finish()
    }
}

impl<K: Opener> Link<K> {
    /// A link whose first connection is `first`.
    pub fn new(opener: K, first: K::Conn) -> Link<K> {
        Link {
            opener,
            current: Mutex::new(Some(Arc::new(first))),
            reopened: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The live connection, reopened first if the last one died (blocking). One caller reopens
    /// at a time; the others wait for its connection rather than opening their own.
    pub fn get(&self) -> Result<Arc<K::Conn>, RuntimeError> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cur.as_ref()
            && self.opener.alive(c)
        {
            return Ok(c.clone());
        }
        // Dropping the dead connection closes it before a new one is opened.
        *cur = None;
        let c = Arc::new(self.opener.open().map_err(|e| RuntimeError::Unreachable {
            engine: EngineKind::Libvirt,
            reason: format!(
                "the connection to {} was lost and reopening it failed: {e} (is libvirtd running?)",
                self.opener.target()
            ),
        })?);
        self.reopened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(target = %self.opener.target(), "reconnected to libvirtd");
        *cur = Some(c.clone());
        Ok(c)
    }

    /// How many times the connection was reopened.
    pub fn reopened(&self) -> u64 {
        self.reopened.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The real opener: `virConnectOpen` on the configured URI.
#[derive(Debug, Clone)]
pub struct VirtOpener {
    uri: String,
}

impl Opener for VirtOpener {
    type Conn = Connect;

    fn open(&self) -> Result<Connect, String> {
        Connect::open(Some(&self.uri)).map_err(|e| e.message().to_owned())
    }

    fn alive(&self, c: &Connect) -> bool {
        c.is_alive().unwrap_or(false)
    }

    fn target(&self) -> String {
        self.uri.clone()
    }
}

fn verr(call: &'static str) -> impl FnOnce(virt::error::Error) -> RuntimeError {
    move |e| RuntimeError::Call {
        engine: EngineKind::Libvirt,
        call: call.into(),
        reason: e.message().to_owned(),
    }
}

fn ioerr<'a>(call: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> RuntimeError + 'a {
    move |e| RuntimeError::Call {
        engine: EngineKind::Libvirt,
        call: call.into(),
        reason: format!("{}: {e}", path.display()),
    }
}

fn is_code(e: &virt::error::Error, code: ErrorNumber) -> bool {
    e.code().is(code)
}

/// A machine name becomes a domain name and a directory name: keep it to a safe alphabet.
pub fn check_name(name: &str) -> Result<(), RuntimeError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::Unsupported(format!(
            "machine name {name:?} must be 1 to 64 of A-Z a-z 0-9 . _ - starting with a letter or digit"
        )))
    }
}

fn path_str(p: &Path) -> Result<&str, RuntimeError> {
    p.to_str()
        .ok_or_else(|| RuntimeError::Unsupported(format!("path {} is not UTF-8", p.display())))
}

/// The domain's CFS quota (µs per [`CPU_PERIOD_US`]) for `cpus` cores across the whole domain.
pub fn cpu_quota_us(cpus: f64) -> Result<i64, RuntimeError> {
    if !cpus.is_finite() || cpus <= 0.0 {
        return Err(RuntimeError::Unsupported(format!(
            "a cpu quota of {cpus} cores is not a limit"
        )));
    }
    Ok(((cpus * CPU_PERIOD_US as f64).round() as i64).max(MIN_QUOTA_US))
}

/// Everything the domain XML is made from.
#[derive(Debug, Clone)]
pub struct DomainXml<'a> {
    pub domain_type: DomainType,
    pub name: &'a str,
    pub owner: &'a str,
    pub machine_id: Id16,
    pub machine_type: Digest,
    pub labels: &'a BTreeMap<String, String>,
    pub vcpus: u16,
    pub memory_bytes: u64,
    pub cpus: f64,
    pub kernel: Option<&'a Path>,
    pub initrd: Option<&'a Path>,
    /// The machine's copy-on-write overlay (qcow2), if it boots from or uses a disk image.
    pub disk: Option<&'a Path>,
    /// The NoCloud seed (an ISO 9660 image labelled `cidata`).
    pub seed: &'a Path,
    /// `(tag, host directory)` shared over virtiofs; all but [`WRITABLE_SHARE`] read-only.
    pub shares: Vec<(&'a str, PathBuf)>,
    /// The virtiofsd wrapper that serves a share read-only ([`virtiofsd_ro_script`]).
    pub virtiofsd_ro: &'a Path,
    pub console_log: &'a Path,
    /// User-mode networking when the signed egress policy allows any.
    pub network: bool,
}

type W = Writer<Vec<u8>>;

fn text(w: &mut W, name: &str, value: &str) -> io::Result<()> {
    w.create_element(name)
        .write_text_content(BytesText::new(value))?;
    Ok(())
}

/// The domain definition for `d`. Every value goes through the writer's escaping, so a label,
/// owner or path can never add elements or attributes.
pub fn domain_xml(d: &DomainXml<'_>) -> Result<String, RuntimeError> {
    check_name(d.name)?;
    if d.vcpus == 0 {
        return Err(RuntimeError::Unsupported(
            "a vm needs at least one vcpu".into(),
        ));
    }
    if d.memory_bytes < 16 << 20 {
        return Err(RuntimeError::Unsupported(format!(
            "{} bytes of memory is below the 16 MiB a vm needs",
            d.memory_bytes
        )));
    }
    if d.kernel.is_none() && d.disk.is_none() {
        return Err(RuntimeError::Unsupported(
            "a vm needs a disk image or a kernel".into(),
        ));
    }
    let quota = cpu_quota_us(d.cpus)?;
    let kib = (d.memory_bytes / 1024).to_string();
    let kernel = d.kernel.map(path_str).transpose()?;
    let initrd = d.initrd.map(path_str).transpose()?;
    let disk = d.disk.map(path_str).transpose()?;
    let seed = path_str(d.seed)?;
    let console = path_str(d.console_log)?;
    let virtiofsd_ro = path_str(d.virtiofsd_ro)?;
    let shares = d
        .shares
        .iter()
        .map(|(tag, p)| Ok((*tag, path_str(p)?.to_owned())))
        .collect::<Result<Vec<_>, RuntimeError>>()?;
    let machine_id = d.machine_id.to_string();
    let machine_type = d.machine_type.to_string();
    let xmlns = format!("xmlns:{METADATA_PREFIX}");
    let el = |local: &str| format!("{METADATA_PREFIX}:{local}");

    let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
    let r: io::Result<()> = (|| {
        w.write_event(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)))?;
        w.create_element("domain")
            .with_attribute(("type", d.domain_type.as_str()))
            .write_inner_content(|w| {
                text(w, "name", d.name)?;
                text(w, "title", &format!("gleaner machine {machine_id}"))?;
                w.create_element("metadata").write_inner_content(|w| {
                    w.create_element(el("machine").as_str())
                        .with_attribute((xmlns.as_str(), METADATA_NS))
                        .with_attribute(("owner", d.owner))
                        .with_attribute(("machine-id", machine_id.as_str()))
                        .with_attribute(("machine-type", machine_type.as_str()))
                        .write_inner_content(|w| {
                            for (k, v) in d.labels {
                                w.create_element(el("label").as_str())
                                    .with_attribute(("key", k.as_str()))
                                    .write_text_content(BytesText::new(v))?;
                            }
                            Ok(())
                        })?;
                    Ok(())
                })?;
                w.create_element("memory")
                    .with_attribute(("unit", "KiB"))
                    .write_text_content(BytesText::new(&kib))?;
                w.create_element("currentMemory")
                    .with_attribute(("unit", "KiB"))
                    .write_text_content(BytesText::new(&kib))?;
                w.create_element("vcpu")
                    .with_attribute(("placement", "static"))
                    .write_text_content(BytesText::new(&d.vcpus.to_string()))?;
                // The quota covers the whole domain (vCPUs and QEMU's own threads), like a
                // container's CPU limit: `cpus` cores in total, however many vCPUs there are.
                w.create_element("cputune").write_inner_content(|w| {
                    text(w, "global_period", &CPU_PERIOD_US.to_string())?;
                    text(w, "global_quota", &quota.to_string())
                })?;
                // virtiofs needs guest memory that virtiofsd can map.
                w.create_element("memoryBacking").write_inner_content(|w| {
                    w.create_element("source")
                        .with_attribute(("type", "memfd"))
                        .write_empty()?;
                    w.create_element("access")
                        .with_attribute(("mode", "shared"))
                        .write_empty()?;
                    Ok(())
                })?;
                w.create_element("os").write_inner_content(|w| {
                    w.create_element("type")
                        .with_attribute(("arch", "x86_64"))
                        .with_attribute(("machine", "pc"))
                        .write_text_content(BytesText::new("hvm"))?;
                    if let Some(k) = kernel {
                        text(w, "kernel", k)?;
                        if let Some(i) = initrd {
                            text(w, "initrd", i)?;
                        }
                        let cmdline = if disk.is_some() {
                            format!("{CMDLINE} root=/dev/vda rw")
                        } else {
                            CMDLINE.to_owned()
                        };
                        text(w, "cmdline", &cmdline)?;
                    } else {
                        w.create_element("boot")
                            .with_attribute(("dev", "hd"))
                            .write_empty()?;
                    }
                    Ok(())
                })?;
                w.create_element("features").write_inner_content(|w| {
                    w.create_element("acpi").write_empty()?;
                    w.create_element("apic").write_empty()?;
                    Ok(())
                })?;
                w.create_element("clock")
                    .with_attribute(("offset", "utc"))
                    .write_empty()?;
                // A machine that ends is over: never rebooted by libvirt.
                text(w, "on_poweroff", "destroy")?;
                text(w, "on_reboot", "destroy")?;
                text(w, "on_crash", "destroy")?;
                w.create_element("devices").write_inner_content(|w| {
                    let mut dev = b'a';
                    let mut disk_el = |w: &mut W, path: &str, format: &str, ro: bool| {
                        let target = format!("vd{}", dev as char);
                        dev += 1;
                        w.create_element("disk")
                            .with_attribute(("type", "file"))
                            .with_attribute(("device", "disk"))
                            .write_inner_content(|w| {
                                w.create_element("driver")
                                    .with_attribute(("name", "qemu"))
                                    .with_attribute(("type", format))
                                    .write_empty()?;
                                w.create_element("source")
                                    .with_attribute(("file", path))
                                    .write_empty()?;
                                w.create_element("target")
                                    .with_attribute(("dev", target.as_str()))
                                    .with_attribute(("bus", "virtio"))
                                    .write_empty()?;
                                if ro {
                                    w.create_element("readonly").write_empty()?;
                                }
                                Ok(())
                            })?;
                        Ok::<(), io::Error>(())
                    };
                    if let Some(disk) = disk {
                        disk_el(w, disk, "qcow2", false)?;
                    }
                    disk_el(w, seed, "raw", true)?;
                    for (tag, dir) in &shares {
                        w.create_element("filesystem")
                            .with_attribute(("type", "mount"))
                            .with_attribute(("accessmode", "passthrough"))
                            .write_inner_content(|w| {
                                w.create_element("driver")
                                    .with_attribute(("type", "virtiofs"))
                                    .write_empty()?;
                                if *tag != WRITABLE_SHARE {
                                    w.create_element("binary")
                                        .with_attribute(("path", virtiofsd_ro))
                                        .write_empty()?;
                                }
                                w.create_element("source")
                                    .with_attribute(("dir", dir.as_str()))
                                    .write_empty()?;
                                w.create_element("target")
                                    .with_attribute(("dir", *tag))
                                    .write_empty()?;
                                Ok(())
                            })?;
                    }
                    if d.network {
                        w.create_element("interface")
                            .with_attribute(("type", "user"))
                            .write_inner_content(|w| {
                                w.create_element("model")
                                    .with_attribute(("type", "virtio"))
                                    .write_empty()?;
                                Ok(())
                            })?;
                    }
                    // The serial console goes to a file through virtlogd, which caps its size.
                    w.create_element("serial")
                        .with_attribute(("type", "file"))
                        .write_inner_content(|w| {
                            w.create_element("source")
                                .with_attribute(("path", console))
                                .with_attribute(("append", "off"))
                                .write_empty()?;
                            w.create_element("target")
                                .with_attribute(("port", "0"))
                                .write_empty()?;
                            Ok(())
                        })?;
                    // No graphics, no USB tablet: the machine has nothing to show.
                    w.create_element("memballoon")
                        .with_attribute(("model", "virtio"))
                        .write_empty()?;
                    Ok(())
                })?;
                Ok(())
            })?;
        Ok(())
    })();
    r.map_err(|e| RuntimeError::Unsupported(format!("domain xml: {e}")))?;
    String::from_utf8(w.into_inner())
        .map_err(|e| RuntimeError::Unsupported(format!("domain xml: {e}")))
}

/// What the metadata element of a domain says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DomainMetadata {
    pub owner: String,
    pub machine_id: Option<Id16>,
    pub machine_type: Option<Digest>,
}

/// Parses Gleaner's metadata element as libvirt returns it (with or without a prefix).
pub fn parse_metadata(xml: &str) -> Option<DomainMetadata> {
    let mut reader = quick_xml::Reader::from_str(xml);
    loop {
        match reader.read_event().ok()? {
            Event::Start(e) | Event::Empty(e) => {
                if e.local_name().as_ref() != b"machine" {
                    return None;
                }
                let mut m = DomainMetadata::default();
                for a in e.attributes().flatten() {
                    let v = a.unescape_value().ok()?.into_owned();
                    match a.key.local_name().as_ref() {
                        b"owner" => m.owner = v,
                        b"machine-id" => m.machine_id = v.parse().ok(),
                        b"machine-type" => m.machine_type = v.parse().ok(),
                        _ => {}
                    }
                }
                return Some(m);
            }
            Event::Eof => return None,
            _ => {}
        }
    }
}

fn map_state(state: DomainState, reason: Option<DomainStateReason>) -> MachineState {
    match state {
        DomainState::Paused | DomainState::PMSuspended => MachineState::Frozen,
        DomainState::Shutoff => match reason {
            // Defined and never started.
            Some(DomainStateReason::Shutoff(r)) if r.is(DomainShutoffReason::Unknown) => {
                MachineState::Created
            }
            // Powered off by its own guest: the VM's analogue of exit 0.
            Some(DomainStateReason::Shutoff(r)) if r.is(DomainShutoffReason::Shutdown) => {
                MachineState::Exited { code: Some(0) }
            }
            _ => MachineState::Exited { code: None },
        },
        DomainState::Crashed => MachineState::Exited { code: None },
        _ => MachineState::Running,
    }
}

fn domain_state(dom: &Domain) -> Result<MachineState, virt::error::Error> {
    let (state, reason) = dom.state()?;
    let state = state.unwrap_or(DomainState::NoState);
    let reason = match reason {
        virt::enumutil::Enum::Known(r) => Some(r),
        virt::enumutil::Enum::Unknown(_) => None,
    };
    Ok(map_state(state, reason))
}

/// The freezer of domain `name`'s QEMU if its cgroup is frozen or freezing now.
fn cgroup_frozen(name: &str) -> Option<QemuFreezer> {
    QemuFreezer::for_domain(name)
        .ok()
        .filter(|f| f.is_freezing())
}

/// The resident memory of a process in KiB (`VmRSS`), if it can be read.
fn process_rss_kib(pid: i32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The 512-byte boot sector the KVM probe boots: it prints [`PROBE_MARKER`] on COM1 and halts.
/// Real firmware, real mode, a real I/O port: enough to tell a working KVM from one that hangs.
pub fn probe_boot_sector() -> Vec<u8> {
    let mut s = vec![
        0xFA, // cli
        0x31, 0xC0, // xor ax, ax
        0x8E, 0xD8, // mov ds, ax
        0xBE, 0x16, 0x7C, // mov si, 0x7c16 (the message)
        0xBA, 0xF8, 0x03, // mov dx, 0x3f8 (COM1)
        0xAC, // lodsb
        0x84, 0xC0, // test al, al
        0x74, 0x03, // jz halt
        0xEE, // out dx, al
        0xEB, 0xF8, // jmp lodsb
        0xF4, // halt: hlt
        0xEB, 0xFD, // jmp halt
    ];
    s.extend_from_slice(PROBE_MARKER.as_bytes());
    s.extend_from_slice(b"\r\n\0");
    s.resize(510, 0);
    s.extend_from_slice(&[0x55, 0xAA]);
    s
}

/// Whether KVM is worth using, from a test boot under KVM and one under TCG: it must print its
/// marker in time and no slower than TCG (a software KVM such as PVM boots, but several times
/// slower than TCG, and real guest kernels then stall on it).
pub fn kvm_verdict(
    kvm: Result<Duration, String>,
    tcg: Result<Duration, String>,
) -> Result<String, String> {
    let kvm = kvm?;
    match tcg {
        Ok(tcg) if kvm > tcg => Err(format!(
            "a KVM test boot took {kvm:?}, slower than TCG's {tcg:?} (a software KVM?)"
        )),
        Ok(tcg) => Ok(format!(
            "a KVM test boot took {kvm:?} (TCG {tcg:?}): machines run under KVM"
        )),
        Err(_) => Ok(format!(
            "a KVM test boot took {kvm:?} (TCG did not boot): machines run under KVM"
        )),
    }
}

fn cpu_has_vmx_or_svm() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
        c.lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
    })
}

fn cgroup_version() -> u8 {
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        2
    } else {
        1
    }
}

fn version_string(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, (v / 1000) % 1000, v % 1000)
}

/// Removes a path that may not exist.
fn remove_all(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

async fn run_tool(
    call: &'static str,
    program: &str,
    args: &[&str],
) -> Result<Vec<u8>, RuntimeError> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| RuntimeError::Call {
            engine: EngineKind::Libvirt,
            call: call.into(),
            reason: format!("{program}: {e}"),
        })?;
    if !out.status.success() {
        return Err(RuntimeError::Call {
            engine: EngineKind::Libvirt,
            call: call.into(),
            reason: format!(
                "{program} {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(out.stdout)
}

/// What `qemu-img info` says about a base image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseImage {
    pub format: String,
    pub virtual_size: u64,
}

/// Checks a base disk image before a machine is built on it: qcow2 or raw only, and no backing
/// file of its own (a backing file could point the VM at any file the QEMU user can read).
pub fn check_base_image(info_json: &[u8]) -> Result<BaseImage, String> {
    let v: serde_json::Value =
        serde_json::from_slice(info_json).map_err(|e| format!("qemu-img info: {e}"))?;
    let format = v
        .get("format")
        .and_then(|f| f.as_str())
        .ok_or("qemu-img info names no format")?;
    if !["qcow2", "raw"].contains(&format) {
        return Err(format!("a {format} image is not accepted (qcow2 or raw)"));
    }
    if v.get("backing-filename").is_some() || v.get("full-backing-filename").is_some() {
        return Err("the image has a backing file of its own".into());
    }
    if v.get("format-specific")
        .and_then(|f| f.get("data"))
        .and_then(|d| d.get("data-file"))
        .is_some()
    {
        return Err("the image has an external data file".into());
    }
    let virtual_size = v
        .get("virtual-size")
        .and_then(|s| s.as_u64())
        .ok_or("qemu-img info names no virtual size")?;
    Ok(BaseImage {
        format: format.to_owned(),
        virtual_size,
    })
}

/// Makes the NoCloud seed: an ISO 9660 image labelled `cidata` holding `user-data` and `meta-data`.
async fn make_seed(dir: &Path, user_data: &[u8], meta_data: &str) -> Result<PathBuf, RuntimeError> {
    let src = dir.join("seed");
    std::fs::create_dir_all(&src).map_err(ioerr("write seed", &src))?;
    let ud = src.join("user-data");
    let md = src.join("meta-data");
    std::fs::write(&ud, user_data).map_err(ioerr("write seed", &ud))?;
    std::fs::write(&md, meta_data).map_err(ioerr("write seed", &md))?;
    let iso = dir.join("seed.iso");
    run_tool(
        "make seed",
        "genisoimage",
        &[
            "-quiet",
            "-output",
            path_str(&iso)?,
            "-volid",
            "cidata",
            "-joliet",
            "-rock",
            path_str(&ud)?,
            path_str(&md)?,
        ],
    )
    .await?;
    let _ = std::fs::remove_dir_all(&src);
    Ok(iso)
}

impl LibvirtRuntime {
    /// Connects to libvirtd (off the executor) and prepares the state and cache directories.
    pub async fn connect(cfg: LibvirtConfig) -> Result<LibvirtRuntime, RuntimeError> {
        let uri = cfg.uri.clone();
        let conn = tokio::task::spawn_blocking(move || {
            // libvirt prints every error on stderr by default; ours are returned instead.
            virt::error::clear_error_callback();
            Connect::open(Some(&uri))
        })
        .await
        .map_err(|e| RuntimeError::Unreachable {
            engine: EngineKind::Libvirt,
            reason: e.to_string(),
        })?
        .map_err(|e| RuntimeError::Unreachable {
            engine: EngineKind::Libvirt,
            reason: format!(
                "{} ({}: is libvirtd running, and may this user use it?)",
                e.message(),
                cfg.uri
            ),
        })?;
        for dir in [&cfg.state_dir, &cfg.cache_dir] {
            std::fs::create_dir_all(dir).map_err(ioerr("create state directory", dir))?;
            // QEMU runs as its own user and must reach overlays, seeds and cached images.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .map_err(ioerr("create state directory", dir))?;
        }
        let blobs = BlobCache::new(cfg.cache_dir.clone(), cfg.cache_quota_bytes)?;
        let virtiofsd_ro = match VIRTIOFSD.iter().find(|p| Path::new(p).exists()) {
            Some(real) => {
                let path = cfg.state_dir.join(VIRTIOFSD_RO);
                let tmp = cfg
                    .state_dir
                    .join(format!(".{VIRTIOFSD_RO}.{}", std::process::id()));
                std::fs::write(&tmp, virtiofsd_ro_script(real))
                    .and_then(|()| {
                        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
                    })
                    .and_then(|()| std::fs::rename(&tmp, &path))
                    .map_err(ioerr("write the read-only virtiofsd wrapper", &path))?;
                Some(path)
            }
            None => None,
        };
        Ok(LibvirtRuntime {
            link: Arc::new(Link::new(
                VirtOpener {
                    uri: cfg.uri.clone(),
                },
                conn,
            )),
            cfg: Arc::new(cfg),
            blobs,
            domain_type: Arc::new(Mutex::new(DomainType::Qemu)),
            peaks: Arc::new(Mutex::new(HashMap::new())),
            virtiofsd_ro,
        })
    }

    /// The live connection, reopened if libvirtd went away, for tests and diagnostics (it
    /// blocks: use it off the executor).
    pub fn connection(&self) -> Result<Arc<Connect>, RuntimeError> {
        self.link.get()
    }

    /// The virtiofsd wrapper that serves machine/job features read-only (`None` without virtiofsd).
    pub fn virtiofsd_ro(&self) -> Option<&Path> {
        self.virtiofsd_ro.as_deref()
    }

    /// How many times the connection to libvirtd was reopened.
    pub fn reconnects(&self) -> u64 {
        self.link.reopened()
    }

    pub fn config(&self) -> &LibvirtConfig {
        &self.cfg
    }

    /// The domain type new machines get (set by [`Runtime::probe`], or forced here).
    pub fn domain_type(&self) -> DomainType {
        *self.domain_type.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_domain_type(&self, t: DomainType) {
        *self.domain_type.lock().unwrap_or_else(|p| p.into_inner()) = t;
    }

    /// The directory of one machine's files.
    pub fn machine_dir(&self, name: &str) -> PathBuf {
        self.cfg.state_dir.join(name)
    }

    /// The serial console log of a machine.
    pub fn console_log(&self, name: &str) -> PathBuf {
        self.machine_dir(name).join("console.log")
    }

    /// Runs `f` with the live connection (reopened if libvirtd went away) on the blocking pool.
    async fn blocking<T, F>(&self, f: F) -> Result<T, RuntimeError>
    where
        T: Send + 'static,
        F: FnOnce(&Connect) -> Result<T, RuntimeError> + Send + 'static,
    {
        let link = self.link.clone();
        tokio::task::spawn_blocking(move || f(&*link.get()?))
            .await
            .map_err(|e| RuntimeError::Call {
                engine: EngineKind::Libvirt,
                call: "blocking task".into(),
                reason: e.to_string(),
            })?
    }

    /// Runs `f` on the machine's domain on the blocking pool; a missing domain is `NoSuchMachine`.
    async fn with_domain<T, F>(&self, m: &MachineHandle, f: F) -> Result<T, RuntimeError>
    where
        T: Send + 'static,
        F: FnOnce(&Domain) -> Result<T, RuntimeError> + Send + 'static,
    {
        let id = m.engine_id.clone();
        let name = m.name.clone();
        self.blocking(move |conn| {
            let dom = lookup(conn, &id)?.ok_or(RuntimeError::NoSuchMachine(name))?;
            f(&dom)
        })
        .await
    }

    /// Boots the probe's boot sector under `t` and waits up to `timeout` for it to print on its
    /// serial port; returns how long that took. The probe uses it for KVM; under TCG it shows
    /// the mechanism itself works.
    pub async fn test_boot(&self, t: DomainType, timeout: Duration) -> Result<Duration, String> {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("gleaner-probe-{}-{}-{seq}", t.as_str(), std::process::id());
        let dir = self.cfg.state_dir.join(format!(".{name}"));
        let r = self.test_boot_in(t, timeout, &name, &dir).await;
        let _ = remove_all(&dir);
        r
    }

    async fn test_boot_in(
        &self,
        t: DomainType,
        timeout: Duration,
        name: &str,
        dir: &Path,
    ) -> Result<Duration, String> {
        remove_all(dir).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
        let disk = dir.join("boot.img");
        std::fs::write(&disk, probe_boot_sector()).map_err(|e| e.to_string())?;
        let log = dir.join("console.log");
        let xml = probe_xml(t, name, &disk, &log).map_err(|e| e.to_string())?;
        let started = Instant::now();
        let result = self
            .blocking(move |conn| {
                // Transient: it vanishes when destroyed, even if this process dies first.
                let dom = conn
                    .create_domain_xml(&xml, 0)
                    .map_err(verr("create probe domain"))?;
                let mut seen = None;
                while started.elapsed() < timeout {
                    if std::fs::read_to_string(&log).is_ok_and(|s| s.contains(PROBE_MARKER)) {
                        seen = Some(started.elapsed());
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = dom.destroy();
                Ok(seen)
            })
            .await;
        match result {
            Ok(Some(took)) => Ok(took),
            Ok(None) => Err(format!(
                "a {} test boot printed nothing within {timeout:?}",
                t.as_str()
            )),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// A transient domain of type `t` booting the probe's boot sector.
fn probe_xml(t: DomainType, name: &str, disk: &Path, log: &Path) -> Result<String, RuntimeError> {
    let disk = path_str(disk)?;
    let log = path_str(log)?;
    let mut w = Writer::new(Vec::new());
    let r: io::Result<()> = (|| {
        w.create_element("domain")
            .with_attribute(("type", t.as_str()))
            .write_inner_content(|w| {
                text(w, "name", name)?;
                w.create_element("memory")
                    .with_attribute(("unit", "MiB"))
                    .write_text_content(BytesText::new("16"))?;
                text(w, "vcpu", "1")?;
                w.create_element("os").write_inner_content(|w| {
                    w.create_element("type")
                        .with_attribute(("arch", "x86_64"))
                        .with_attribute(("machine", "pc"))
                        .write_text_content(BytesText::new("hvm"))?;
                    w.create_element("boot")
                        .with_attribute(("dev", "hd"))
                        .write_empty()?;
                    Ok(())
                })?;
                w.create_element("devices").write_inner_content(|w| {
                    w.create_element("disk")
                        .with_attribute(("type", "file"))
                        .with_attribute(("device", "disk"))
                        .write_inner_content(|w| {
                            w.create_element("driver")
                                .with_attribute(("name", "qemu"))
                                .with_attribute(("type", "raw"))
                                .write_empty()?;
                            w.create_element("source")
                                .with_attribute(("file", disk))
                                .write_empty()?;
                            w.create_element("target")
                                .with_attribute(("dev", "hda"))
                                .with_attribute(("bus", "ide"))
                                .write_empty()?;
                            Ok(())
                        })?;
                    w.create_element("serial")
                        .with_attribute(("type", "file"))
                        .write_inner_content(|w| {
                            w.create_element("source")
                                .with_attribute(("path", log))
                                .write_empty()?;
                            w.create_element("target")
                                .with_attribute(("port", "0"))
                                .write_empty()?;
                            Ok(())
                        })?;
                    w.create_element("memballoon")
                        .with_attribute(("model", "none"))
                        .write_empty()?;
                    Ok(())
                })?;
                Ok(())
            })?;
        Ok(())
    })();
    r.map_err(|e| RuntimeError::Unsupported(format!("probe xml: {e}")))?;
    String::from_utf8(w.into_inner()).map_err(|e| RuntimeError::Unsupported(e.to_string()))
}

/// Finds a domain by UUID (the engine id) or, failing that, by name.
fn lookup(conn: &Connect, id: &str) -> Result<Option<Domain>, RuntimeError> {
    let r = conn.lookup_domain_by_uuid_string(id).or_else(|e| {
        if is_code(&e, ErrorNumber::NoDomain) || is_code(&e, ErrorNumber::InvalidArg) {
            conn.lookup_domain_by_name(id)
        } else {
            Err(e)
        }
    });
    match r {
        Ok(d) => Ok(Some(d)),
        Err(e) if is_code(&e, ErrorNumber::NoDomain) => Ok(None),
        Err(e) => Err(verr("lookup domain")(e)),
    }
}

fn owned_metadata(dom: &Domain) -> Option<DomainMetadata> {
    let xml = dom
        .metadata(
            virt::sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            Some(METADATA_NS),
            0,
        )
        .ok()?;
    parse_metadata(&xml)
}

impl Runtime for LibvirtRuntime {
    fn engine(&self) -> EngineKind {
        EngineKind::Libvirt
    }

    async fn probe(&self) -> Result<Probe, RuntimeError> {
        let (lib, hyp, caps) = self
            .blocking(|conn| {
                let lib = conn.lib_version().map_err(verr("lib version"))?;
                let hyp = conn.hyp_version().map_err(verr("hypervisor version"))?;
                let caps = conn.capabilities().map_err(verr("capabilities"))?;
                Ok((lib, hyp, caps))
            })
            .await?;
        let mut notes = Vec::new();
        let kvm_offered = caps.contains("<domain type='kvm'");
        let kvm_usable = if !Path::new("/dev/kvm").exists() {
            notes.push("no /dev/kvm: machines run under TCG".into());
            false
        } else if !kvm_offered {
            notes.push("libvirt offers no kvm domains (is /dev/kvm usable by the QEMU user?): machines run under TCG".into());
            false
        } else if !cpu_has_vmx_or_svm() {
            // A software KVM (e.g. PVM) exposes /dev/kvm without vmx/svm; ordinary guests crawl
            // and then stop on an emulation failure there.
            notes.push("/dev/kvm exists but the CPU has no vmx/svm flag (a software KVM such as PVM): machines run under TCG".into());
            false
        } else {
            // Both boots, so that a KVM which works but crawls (a software KVM) loses to TCG.
            let tcg = self
                .test_boot(DomainType::Qemu, self.cfg.kvm_probe_timeout)
                .await;
            let kvm = self
                .test_boot(DomainType::Kvm, self.cfg.kvm_probe_timeout)
                .await;
            match kvm_verdict(kvm, tcg) {
                Ok(note) => {
                    notes.push(note);
                    true
                }
                Err(e) => {
                    notes.push(format!("{e}: machines run under TCG"));
                    false
                }
            }
        };
        self.set_domain_type(if kvm_usable {
            DomainType::Kvm
        } else {
            DomainType::Qemu
        });
        Ok(Probe {
            engine: EngineKind::Libvirt,
            reachable: true,
            version: format!(
                "libvirt {}, QEMU {}",
                version_string(lib),
                version_string(hyp)
            ),
            kvm_usable,
            cgroup_version: cgroup_version(),
            notes,
        })
    }

    async fn prepare_image(
        &self,
        source: &ImageSource,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<PreparedImage, RuntimeError> {
        self.blobs.prepare_vm_image(source, progress).await
    }

    async fn create(&self, spec: &MachineSpec) -> Result<MachineHandle, RuntimeError> {
        check_name(&spec.name)?;
        gleaner_client::runtime::egress_supported(Backend::Vm, &spec.egress)
            .map_err(|why| RuntimeError::Unsupported(format!("vm {}: {why}", spec.name)))?;
        let virtiofsd_ro = self.virtiofsd_ro.as_deref().ok_or_else(|| {
            RuntimeError::Unsupported(format!(
                "vm {}: no virtiofsd (looked for {}) to share machine/job features with",
                spec.name,
                VIRTIOFSD.join(", ")
            ))
        })?;
        // Never build over a defined domain: its overlay may be in use (an adopted machine).
        let name = spec.name.clone();
        if self
            .blocking(move |conn| lookup(conn, &name))
            .await?
            .is_some()
        {
            return Err(RuntimeError::Call {
                engine: EngineKind::Libvirt,
                call: "define domain".into(),
                reason: format!("a domain named {} already exists", spec.name),
            });
        }
        let dir = self.machine_dir(&spec.name);
        // A directory left by a crash of an earlier machine of the same name is stale.
        remove_all(&dir).map_err(ioerr("create machine directory", &dir))?;
        std::fs::create_dir_all(&dir).map_err(ioerr("create machine directory", &dir))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .map_err(ioerr("create machine directory", &dir))?;
        let built = self.build(spec, &dir, virtiofsd_ro).await;
        if built.is_err() {
            let _ = remove_all(&dir);
        }
        built
    }

    async fn start(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        self.with_domain(m, |dom| match dom.create() {
            Ok(_) => Ok(()),
            Err(e)
                if is_code(&e, ErrorNumber::OperationInvalid)
                    && dom.is_active().unwrap_or(false) =>
            {
                Ok(())
            }
            Err(e) => Err(verr("start domain")(e)),
        })
        .await
    }

    async fn freeze(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        // The instant way first: QEMU's cgroup frozen by the kernel, no libvirt call on the way
        // (virDomainSuspend waits on libvirtd's RPC and job lock and on QEMU's monitor, whose
        // `stop` waits for TCG vCPUs to leave translated code: a tail of hundreds of ms on a
        // busy host). libvirt still sees the domain running; `state` reports it frozen.
        match QemuFreezer::for_domain(&m.name).and_then(|f| {
            if self.cfg.cgroup_freeze {
                Ok(f)
            } else {
                Err("turned off in the settings".into())
            }
        }) {
            Ok(f) => match f.freeze(FREEZE_DEADLINE).await {
                Ok(()) => return Ok(()),
                Err(e) => tracing::warn!("{}: cgroup freeze failed, suspending: {e}", m.name),
            },
            Err(e) => tracing::debug!("{}: no cgroup freeze, suspending: {e}", m.name),
        }
        self.with_domain(m, |dom| {
            if domain_state(dom).map_err(verr("domain state"))? == MachineState::Frozen {
                return Ok(());
            }
            dom.suspend().map_err(verr("suspend domain"))
        })
        .await
    }

    async fn thaw(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        // A cgroup freeze (ours, or one a crashed daemon left) is undone first; then a suspend
        // made by libvirt (the fallback), if any.
        if let Some(f) = cgroup_frozen(&m.name) {
            f.thaw().map_err(|reason| RuntimeError::Call {
                engine: EngineKind::Libvirt,
                call: "thaw qemu cgroup".into(),
                reason,
            })?;
        }
        self.with_domain(m, |dom| {
            if domain_state(dom).map_err(verr("domain state"))? != MachineState::Frozen {
                return Ok(());
            }
            dom.resume().map_err(verr("resume domain"))
        })
        .await
    }

    async fn set_limits(&self, m: &MachineHandle, limits: Limits) -> Result<(), RuntimeError> {
        let quota = cpu_quota_us(limits.cpus)?;
        // The balloon is QEMU's monitor, which a frozen QEMU cannot answer: libvirtd would wait.
        if cgroup_frozen(&m.name).is_some() {
            return Err(RuntimeError::Unsupported(format!(
                "vm {} is frozen (its QEMU cgroup): its limits change only while it runs",
                m.name
            )));
        }
        self.with_domain(m, move |dom| {
            let info = SchedulerInfo {
                global_bw: virt::domain::SchedBandwidth {
                    period: Some(CPU_PERIOD_US),
                    quota: Some(quota),
                },
                ..Default::default()
            };
            dom.set_scheduler_parameters_flags(&info, virt::sys::VIR_DOMAIN_AFFECT_LIVE)
                .map_err(verr("set cpu quota"))?;
            let max_kib = dom.max_memory().map_err(verr("max memory"))?;
            let kib = limits.memory_bytes / 1024;
            if kib > max_kib {
                return Err(RuntimeError::Unsupported(format!(
                    "a vm's memory can shrink but not grow beyond the {max_kib} KiB it was created with"
                )));
            }
            // The balloon hands memory back only if the guest has a balloon driver.
            dom.set_memory_flags(kib, virt::sys::VIR_DOMAIN_AFFECT_LIVE)
                .map_err(verr("set memory"))
        })
        .await
    }

    async fn state(&self, m: &MachineHandle) -> Result<MachineState, RuntimeError> {
        let id = m.engine_id.clone();
        let state = self
            .blocking(move |conn| match lookup(conn, &id)? {
                None => Ok(MachineState::Gone),
                Some(dom) => domain_state(&dom).map_err(verr("domain state")),
            })
            .await?;
        // libvirt does not know of a cgroup freeze: running to it, frozen to everyone else.
        Ok(match state {
            MachineState::Running if cgroup_frozen(&m.name).is_some() => MachineState::Frozen,
            s => s,
        })
    }

    async fn sample(&self, m: &MachineHandle) -> Result<Usage, RuntimeError> {
        // Memory statistics come from QEMU's monitor, which a frozen QEMU cannot answer: its
        // RSS is read from /proc instead (CPU time is the kernel's either way).
        let frozen_rss = cgroup_frozen(&m.name).map(|f| process_rss_kib(f.pid));
        let (cpu_ns, memory) = self
            .with_domain(m, move |dom| {
                let info = dom.info().map_err(verr("domain info"))?;
                if let Some(rss) = frozen_rss {
                    return Ok((info.cpu_time, rss.unwrap_or(info.memory) * 1024));
                }
                // RSS of the QEMU process (what the host gives up), else the guest's allotment.
                let rss = dom.memory_stats(0).ok().and_then(|s| {
                    s.iter()
                        .find(|s| s.tag == virt::sys::VIR_DOMAIN_MEMORY_STAT_RSS)
                        .map(|s| s.val)
                });
                Ok((info.cpu_time, rss.unwrap_or(info.memory) * 1024))
            })
            .await?;
        let mut peaks = self.peaks.lock().unwrap_or_else(|p| p.into_inner());
        let peak = peaks.entry(m.engine_id.clone()).or_insert(0);
        *peak = (*peak).max(memory);
        Ok(Usage {
            cpu_ns,
            memory_bytes: memory,
            peak_memory_bytes: *peak,
        })
    }

    async fn stop(&self, m: &MachineHandle, grace: Duration) -> Result<MachineState, RuntimeError> {
        // A frozen QEMU can neither pass on the power button nor die of a signal (cgroup v1).
        if let Some(f) = cgroup_frozen(&m.name) {
            let _ = f.thaw();
        }
        let id = m.engine_id.clone();
        self.blocking(move |conn| {
            let Some(dom) = lookup(conn, &id)? else {
                return Ok(MachineState::Gone);
            };
            let state = domain_state(&dom).map_err(verr("domain state"))?;
            if state == MachineState::Frozen {
                // A suspended guest cannot see the power button.
                dom.resume().map_err(verr("resume domain"))?;
            } else if state != MachineState::Running {
                return Ok(state);
            }
            let deadline = Instant::now() + grace;
            match dom.shutdown_flags(virt::sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN) {
                Ok(_) => {}
                // It ended between the state check and the button.
                Err(e) if is_code(&e, ErrorNumber::OperationInvalid) => {}
                Err(e) => return Err(verr("shutdown domain")(e)),
            }
            while Instant::now() < deadline {
                if !dom.is_active().map_err(verr("domain state"))? {
                    return domain_state(&dom).map_err(verr("domain state"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            match dom.destroy() {
                Ok(_) => {}
                Err(e) if is_code(&e, ErrorNumber::OperationInvalid) => {}
                Err(e) => return Err(verr("destroy domain")(e)),
            }
            domain_state(&dom).map_err(verr("domain state"))
        })
        .await
    }

    async fn remove(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        if let Some(f) = cgroup_frozen(&m.name) {
            let _ = f.thaw();
        }
        let id = m.engine_id.clone();
        let dir_name = self
            .blocking(move |conn| {
                let Some(dom) = lookup(conn, &id)? else {
                    return Ok(None);
                };
                let name = dom.name().map_err(verr("domain name"))?;
                if dom.is_active().map_err(verr("domain state"))? {
                    match dom.destroy() {
                        Ok(_) => {}
                        Err(e) if is_code(&e, ErrorNumber::OperationInvalid) => {}
                        Err(e) => return Err(verr("destroy domain")(e)),
                    }
                }
                match dom.undefine() {
                    Ok(_) => {}
                    Err(e) if is_code(&e, ErrorNumber::NoDomain) => {}
                    Err(e) => return Err(verr("undefine domain")(e)),
                }
                Ok(Some(name))
            })
            .await?;
        self.peaks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&m.engine_id);
        // The handle's name is the directory even when the domain is already gone.
        for name in dir_name.iter().chain(std::iter::once(&m.name)) {
            if check_name(name).is_ok() {
                let dir = self.machine_dir(name);
                remove_all(&dir).map_err(ioerr("remove machine directory", &dir))?;
            }
        }
        Ok(())
    }

    async fn list_owned(&self) -> Result<Vec<OwnedMachine>, RuntimeError> {
        let owner = self.cfg.owner.clone();
        self.blocking(move |conn| {
            let doms = conn.list_all_domains(0).map_err(verr("list domains"))?;
            let mut out = Vec::new();
            for dom in doms {
                let Some(meta) = owned_metadata(&dom) else {
                    continue;
                };
                if meta.owner != owner {
                    continue;
                }
                let name = dom.name().unwrap_or_default();
                let state = match domain_state(&dom).unwrap_or(MachineState::Gone) {
                    MachineState::Running if cgroup_frozen(&name).is_some() => MachineState::Frozen,
                    s => s,
                };
                out.push(OwnedMachine {
                    engine_id: dom.uuid_string().unwrap_or_default(),
                    name,
                    machine_id: meta.machine_id,
                    machine_type: meta.machine_type,
                    state,
                });
            }
            Ok(out)
        })
        .await
    }
}

impl LibvirtRuntime {
    /// Builds a machine's files in `dir` and defines its domain.
    async fn build(
        &self,
        spec: &MachineSpec,
        dir: &Path,
        virtiofsd_ro: &Path,
    ) -> Result<MachineHandle, RuntimeError> {
        if spec.kernel.is_none() && spec.image.is_none() {
            return Err(RuntimeError::Unsupported(
                "a vm needs a disk image or a kernel".into(),
            ));
        }
        // The per-machine copy-on-write layer over the read-only base (WNoD's layout).
        let overlay = match &spec.image {
            None => None,
            Some(img) => {
                let base = PathBuf::from(&img.reference);
                let info = run_tool(
                    "inspect image",
                    "qemu-img",
                    &["info", "--output=json", path_str(&base)?],
                )
                .await?;
                let base_info = check_base_image(&info).map_err(|reason| RuntimeError::Image {
                    url: img.reference.clone(),
                    reason,
                })?;
                let overlay = dir.join("overlay.qcow2");
                let size = spec.disk_bytes.max(base_info.virtual_size).to_string();
                run_tool(
                    "create overlay",
                    "qemu-img",
                    &[
                        "create",
                        "-q",
                        "-f",
                        "qcow2",
                        "-F",
                        &base_info.format,
                        "-b",
                        path_str(&base)?,
                        path_str(&overlay)?,
                        &size,
                    ],
                )
                .await?;
                Some(overlay)
            }
        };
        let ud_path = spec.mjf_dir.join("user_data");
        let user_data = std::fs::read(&ud_path).map_err(ioerr("read user_data", &ud_path))?;
        let meta_data = format!(
            "instance-id: {}\nlocal-hostname: {}\n",
            spec.machine_id, spec.name
        );
        let seed = make_seed(dir, &user_data, &meta_data).await?;
        let console = dir.join("console.log");
        let mut labels = spec.labels.clone();
        // Ownership lives in the element's attributes; labels cannot forge them.
        labels.retain(|k, _| !k.starts_with("org.gleaner."));
        let xml = domain_xml(&DomainXml {
            domain_type: self.domain_type(),
            name: &spec.name,
            owner: &self.cfg.owner,
            machine_id: spec.machine_id,
            machine_type: spec.machine_type,
            labels: &labels,
            vcpus: spec.cores,
            memory_bytes: spec.limits.memory_bytes,
            cpus: spec.limits.cpus,
            kernel: spec.kernel.as_deref(),
            initrd: spec.initrd.as_deref(),
            disk: overlay.as_deref(),
            seed: &seed,
            shares: SHARE_TAGS
                .iter()
                .map(|t| (*t, spec.mjf_dir.join(t)))
                .collect(),
            console_log: &console,
            virtiofsd_ro,
            network: !spec.egress.is_empty(),
        })?;
        let name = spec.name.clone();
        let uuid = self
            .blocking(move |conn| {
                let dom = conn
                    .define_domain_xml(&xml)
                    .map_err(verr("define domain"))?;
                dom.uuid_string().map_err(verr("domain uuid"))
            })
            .await?;
        Ok(MachineHandle {
            engine_id: uuid,
            name,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xml_for(labels: &BTreeMap<String, String>, name: &str) -> Result<String, RuntimeError> {
        domain_xml(&DomainXml {
            domain_type: DomainType::Qemu,
            name,
            owner: "o\"wner<&>",
            machine_id: Id16([7; 16]),
            machine_type: Digest::of(b"t"),
            labels,
            vcpus: 2,
            memory_bytes: 256 << 20,
            cpus: 1.5,
            kernel: Some(Path::new("/k/vmlinuz")),
            initrd: Some(Path::new("/k/initrd.img")),
            disk: None,
            seed: Path::new("/m/seed.iso"),
            shares: vec![
                ("machinefeatures", PathBuf::from("/m/mf")),
                ("joboutputs", PathBuf::from("/m/j'o<b>")),
            ],
            console_log: Path::new("/m/console.log"),
            virtiofsd_ro: Path::new("/s/virtiofsd-ro"),
            network: false,
        })
    }

    #[test]
    fn xml_escapes_everything_untrusted() {
        let labels = BTreeMap::from([(
            "k\"/><evil/>".to_string(),
            "</gleaner:label><devices/>".to_string(),
        )]);
        let xml = xml_for(&labels, "gleaner-m1").unwrap();
        assert!(!xml.contains("<evil/>"), "{xml}");
        assert!(!xml.contains("<devices/>"), "{xml}");
        assert!(xml.contains("<global_quota>150000</global_quota>"), "{xml}");
        assert!(xml.contains("<vcpu placement=\"static\">2</vcpu>"), "{xml}");
        assert!(xml.contains("j&apos;o&lt;b&gt;"), "{xml}");
        assert!(
            !xml.contains("<interface"),
            "no network without egress: {xml}"
        );
        let meta_start = xml.find("<gleaner:machine").unwrap();
        let meta_end = xml.find("</gleaner:machine>").unwrap() + "</gleaner:machine>".len();
        let m = parse_metadata(&xml[meta_start..meta_end]).unwrap();
        assert_eq!(m.owner, "o\"wner<&>");
        assert_eq!(m.machine_id, Some(Id16([7; 16])));
        assert_eq!(m.machine_type, Some(Digest::of(b"t")));
    }

    #[test]
    fn only_joboutputs_is_shared_writable() {
        let xml = xml_for(&BTreeMap::new(), "gleaner-m1").unwrap();
        let share = |tag: &str| {
            let end = xml.find(&format!("<target dir=\"{tag}\"/>")).unwrap();
            let start = xml[..end].rfind("<filesystem").unwrap();
            xml[start..end].to_owned()
        };
        assert!(
            share("machinefeatures").contains("<binary path=\"/s/virtiofsd-ro\"/>"),
            "{xml}"
        );
        assert!(!share("joboutputs").contains("<binary"), "{xml}");
    }

    /// The wrapper, run as libvirt runs virtiofsd, around a stand-in that tries to write to the
    /// folder it serves: the write fails, and the host's own view of the folder stays writable.
    /// Needs root (a mount namespace), as libvirt's virtiofsd does.
    #[test]
    fn the_virtiofsd_wrapper_serves_the_folder_read_only() {
        if !nix_is_root() {
            // CI runs as root (as libvirtd does), so there the test always runs.
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run this test as root"
            );
            eprintln!("skipped: needs root for a mount namespace");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let shared = t.path().join("machinefeatures");
        std::fs::create_dir(&shared).unwrap();
        let real = t.path().join("fake-virtiofsd");
        std::fs::write(
            &real,
            "#!/bin/sh\nfor a; do case $a in source=*) d=${a#source=}; d=${d%%,*};; esac; done\n\
             touch \"$d/x\" 2>/dev/null && echo writable || echo read-only\n",
        )
        .unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o755)).unwrap();
        let wrapper = t.path().join("virtiofsd-ro");
        std::fs::write(&wrapper, virtiofsd_ro_script(real.to_str().unwrap())).unwrap();
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let run = |args: &[&str]| {
            std::process::Command::new(&wrapper)
                .args(args)
                .output()
                .unwrap()
        };
        let source = format!("source={},xattr", shared.display());
        let out = run(&["--fd=3", "-o", &source]);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "read-only\n");
        assert!(!shared.join("x").exists());
        std::fs::write(shared.join("hs06"), "1").unwrap();
        // Nothing to serve read-only: refused rather than run writable.
        let out = run(&["--fd=3"]);
        assert!(!out.status.success(), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("no shared folder"));
    }

    fn nix_is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("Uid:")
                        .map(|v| v.split_whitespace().next() == Some("0"))
                })
            })
            .unwrap_or(false)
    }

    /// A libvirtd that can be restarted (its connections die) and stopped (opening fails).
    #[derive(Default)]
    struct FakeDaemon {
        /// Bumped by a restart: connections of an older generation are dead.
        generation: std::sync::atomic::AtomicU32,
        down: std::sync::atomic::AtomicBool,
        opens: std::sync::atomic::AtomicU32,
    }

    impl Opener for Arc<FakeDaemon> {
        type Conn = u32;
        fn open(&self) -> Result<u32, String> {
            use std::sync::atomic::Ordering::SeqCst;
            self.opens.fetch_add(1, SeqCst);
            if self.down.load(SeqCst) {
                return Err("Failed to connect socket: No such file or directory".into());
            }
            Ok(self.generation.load(SeqCst))
        }
        fn alive(&self, c: &u32) -> bool {
            use std::sync::atomic::Ordering::SeqCst;
            !self.down.load(SeqCst) && *c == self.generation.load(SeqCst)
        }
        fn target(&self) -> String {
            "fake:///system".into()
        }
    }

    #[test]
    fn a_lost_connection_is_reopened_on_the_next_call_or_fails_typed() {
        use std::sync::atomic::Ordering::SeqCst;
        let d = Arc::new(FakeDaemon::default());
        let link = Link::new(d.clone(), 0);
        // A live connection is reused, not reopened.
        assert_eq!(*link.get().unwrap(), 0);
        assert_eq!(*link.get().unwrap(), 0);
        assert_eq!(d.opens.load(SeqCst), 0);
        // libvirtd is stopped: the dead connection is dropped and reopening fails, typed, with
        // the target and the cause; every call tries again rather than failing forever.
        d.down.store(true, SeqCst);
        for n in 1..=2 {
            let e = link.get().unwrap_err();
            assert!(
                matches!(
                    e,
                    RuntimeError::Unreachable {
                        engine: EngineKind::Libvirt,
                        ..
                    }
                ),
                "{e:?}"
            );
            let msg = e.to_string();
            assert!(
                msg.contains("fake:///system") && msg.contains("No such file"),
                "{msg}"
            );
            assert_eq!(d.opens.load(SeqCst), n);
        }
        // It comes back (restarted): the next call gets a new connection, kept from then on.
        d.generation.store(1, SeqCst);
        d.down.store(false, SeqCst);
        assert_eq!(*link.get().unwrap(), 1);
        assert_eq!(*link.get().unwrap(), 1);
        assert_eq!(link.reopened(), 1);
        // A restart while up (connections die, opening works) is one reopen.
        d.generation.store(2, SeqCst);
        assert_eq!(*link.get().unwrap(), 2);
        assert_eq!(link.reopened(), 2);
        assert_eq!(d.opens.load(SeqCst), 4);
    }

    #[test]
    fn names_and_limits_are_checked() {
        let labels = BTreeMap::new();
        assert!(xml_for(&labels, "../etc").is_err());
        assert!(xml_for(&labels, "a b").is_err());
        assert!(xml_for(&labels, "").is_err());
        assert!(cpu_quota_us(0.0).is_err());
        assert!(cpu_quota_us(f64::NAN).is_err());
        assert_eq!(cpu_quota_us(0.001).unwrap(), MIN_QUOTA_US);
        assert_eq!(cpu_quota_us(2.0).unwrap(), 200_000);
    }

    #[test]
    fn metadata_without_prefix_parses() {
        let m = parse_metadata(&format!(
            "<machine xmlns=\"{METADATA_NS}\" owner=\"me\" machine-id=\"zz\"/>"
        ))
        .unwrap();
        assert_eq!(m.owner, "me");
        assert_eq!(m.machine_id, None);
        assert!(parse_metadata("<other owner=\"me\"/>").is_none());
        assert!(parse_metadata("not xml <").is_none());
    }

    #[test]
    fn base_images_with_backing_files_are_refused() {
        let ok = br#"{"format":"qcow2","virtual-size":1048576}"#;
        assert_eq!(
            check_base_image(ok).unwrap(),
            BaseImage {
                format: "qcow2".into(),
                virtual_size: 1 << 20
            }
        );
        let backed = br#"{"format":"qcow2","virtual-size":1,"backing-filename":"/etc/shadow"}"#;
        assert!(check_base_image(backed).is_err());
        let vmdk = br#"{"format":"vmdk","virtual-size":1}"#;
        assert!(check_base_image(vmdk).is_err());
        let data_file =
            br#"{"format":"qcow2","virtual-size":1,"format-specific":{"data":{"data-file":"/x"}}}"#;
        assert!(check_base_image(data_file).is_err());
        assert!(check_base_image(b"{").is_err());
    }

    #[test]
    fn kvm_must_boot_and_beat_tcg() {
        let ms = Duration::from_millis;
        assert!(kvm_verdict(Ok(ms(200)), Ok(ms(600))).is_ok());
        assert!(kvm_verdict(Ok(ms(200)), Err("no tcg".into())).is_ok());
        // These machines: PVM boots the sector about 8x slower than TCG.
        assert!(kvm_verdict(Ok(ms(4600)), Ok(ms(570))).is_err());
        assert!(kvm_verdict(Err("hung".into()), Ok(ms(570))).is_err());
    }

    #[test]
    fn probe_boot_sector_is_a_boot_sector() {
        let s = probe_boot_sector();
        assert_eq!(s.len(), 512);
        assert_eq!(&s[510..], &[0x55, 0xAA]);
        // The message sits where `mov si` points (0x7c16 - 0x7c00).
        assert_eq!(&s[0x16..0x16 + PROBE_MARKER.len()], PROBE_MARKER.as_bytes());
    }
}
