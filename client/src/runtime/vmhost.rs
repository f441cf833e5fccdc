//! VMs through the `gleaner-vmhost` helper: the daemon's side of the libvirt runtime, which
//! lives in its own process so that libvirt and its libraries are never mapped into the daemon.
//!
//! The helper (`vmhost/`, package `gleaner-vmhost`) holds the libvirt runtime and serves it over
//! its stdin/stdout: length-delimited CBOR frames, each request with an id, at most
//! [`MAX_IN_FLIGHT`] requests in flight. The daemon starts it on the first call that needs
//! libvirt, and lets it go (closes its stdin) once no call has come for [`DEFAULT_IDLE`] and no
//! owned domain runs; the next call starts it again. A helper that dies mid-call fails that call
//! with `RuntimeError::Unreachable` naming the helper, and the next call starts a new one.
//!
//! What needs no libvirt stays here: freezing a VM through its QEMU's cgroup (the owner's yield
//! path, one write to a cgroup file) and fetching images into the verified blob cache.

use std::borrow::Cow;
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::{Semaphore, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use super::blobs::BlobCache;
use super::freezer::QemuFreezer;
use super::{
    EngineKind, ImageSource, Limits, MachineHandle, MachineSpec, MachineState, OwnedMachine,
    PreparedImage, Probe, Progress, Runtime, RuntimeError, Usage,
};

/// The helper's file name, looked for beside the daemon's own executable.
pub const HELPER: &str = "gleaner-vmhost";
/// An environment variable naming the helper's path instead (tests, unusual layouts).
pub const HELPER_ENV: &str = "GLEANER_VMHOST";
/// The version of the pipe protocol; a helper of another version refuses to open.
pub const PROTOCOL: u32 = 1;
/// The largest frame either side accepts (a listing of many domains fits with room to spare).
pub const MAX_FRAME: usize = 4 << 20;
/// Requests in flight to one helper at a time; more callers wait for a slot.
pub const MAX_IN_FLIGHT: usize = 32;
/// How long a helper stays without a call (and with no VM running) before it is let go.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(60);
/// How long a cgroup freeze may take before it is undone and libvirt suspends the domain instead.
pub const FREEZE_DEADLINE: Duration = Duration::from_secs(2);

/// The XML namespace of Gleaner's domain metadata element (ownership, machine id and type).
pub const METADATA_NS: &str = "https://gleaner.invalid/ns/libvirt/machine/1";
/// The system libvirtd's QEMU driver.
pub const DEFAULT_URI: &str = "qemu:///system";
/// The virtiofs tags the MJF folders are shared under (the guest mounts them by tag).
pub const SHARE_TAGS: [&str; 3] = ["machinefeatures", "jobfeatures", "joboutputs"];

/// The libvirt domain type a machine runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DomainType {
    /// Hardware virtualisation, only when a test boot showed it works.
    Kvm,
    /// QEMU's TCG emulation: slow but runs everywhere.
    Qemu,
}

impl DomainType {
    pub fn as_str(self) -> &'static str {
        match self {
            DomainType::Kvm => "kvm",
            DomainType::Qemu => "qemu",
        }
    }
}

/// Where and how the libvirt runtime works (in the helper, or in process in its tests).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LibvirtConfig {
    /// libvirt connection URI, normally [`DEFAULT_URI`].
    pub uri: String,
    /// The owner recorded in each domain's metadata: distinguishes daemons sharing one libvirtd.
    pub owner: String,
    /// Per-machine files (overlay, seed, console log) live in `<state_dir>/<machine name>/`; the
    /// directory must be reachable by the QEMU user (libvirt-qemu), so it is made mode 0755.
    pub state_dir: PathBuf,
    /// The content-addressed image cache and its quota.
    pub cache_dir: PathBuf,
    pub cache_quota_bytes: u64,
    /// How long the probe's KVM test boot may take before KVM is declared unusable.
    pub kvm_probe_timeout: Duration,
    /// Freeze a VM through its QEMU's cgroup (instant; libvirt keeps seeing it running) when
    /// this process can, else `virDomainSuspend`. Off: always `virDomainSuspend` (the yield
    /// bench's comparison).
    pub cgroup_freeze: bool,
}

impl LibvirtConfig {
    pub fn new(owner: &str, state_dir: PathBuf) -> LibvirtConfig {
        LibvirtConfig {
            uri: DEFAULT_URI.into(),
            owner: owner.into(),
            cache_dir: state_dir.join("cache"),
            state_dir,
            cache_quota_bytes: 8 << 30,
            kvm_probe_timeout: Duration::from_secs(10),
            cgroup_freeze: true,
        }
    }
}

/// What the daemon asks of the helper. `Open` comes first and once.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Request {
    /// Connect to libvirtd with `config`; new domains get `domain_type` when a probe before
    /// (in an earlier helper) has chosen it.
    Open {
        protocol: u32,
        config: LibvirtConfig,
        domain_type: Option<DomainType>,
    },
    Probe,
    Create(Box<MachineSpec>),
    Start(MachineHandle),
    Freeze(MachineHandle),
    Thaw(MachineHandle),
    SetLimits(MachineHandle, Limits),
    State(MachineHandle),
    Sample(MachineHandle),
    Stop(MachineHandle, Duration),
    Remove(MachineHandle),
    ListOwned,
    RemoveStrays,
    /// Whether any domain of this owner is active (the helper is not idle then).
    Busy,
}

/// The helper's answers.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Reply {
    /// Connected: the helper's version.
    Opened {
        version: String,
    },
    Probe(Probe),
    Handle(MachineHandle),
    Done,
    State(MachineState),
    Usage(Usage),
    Owned(Vec<OwnedMachine>),
    Removed(Vec<String>),
    Busy(bool),
}

/// One request on the pipe.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct RequestFrame {
    pub id: u64,
    pub body: Request,
}

/// One answer on the pipe, to the request of the same id.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ReplyFrame {
    pub id: u64,
    pub body: Result<Reply, RuntimeError>,
}

/// The frame codec both sides use: a 4-byte big-endian length, then that many bytes of CBOR.
pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

/// One value as CBOR.
pub fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).map_err(|e| format!("cannot encode a frame: {e}"))?;
    Ok(out)
}

/// One value from CBOR.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    // Strings longer than the scratch buffer are read into their own allocation (see core cbor).
    let mut scratch = [0u8; 256];
    ciborium::de::from_reader_with_buffer(bytes, &mut scratch)
        .map_err(|e| format!("a frame does not decode: {e}"))
}

/// Where the helper is: `$GLEANER_VMHOST` if set, else beside this executable (or, for cargo's
/// test and bench executables in `target/<profile>/deps/`, in `target/<profile>/`). The error
/// says where it looked.
pub fn find_helper() -> Result<PathBuf, String> {
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find this executable to look for {HELPER} beside it: {e}"))?;
    find_helper_for(std::env::var_os(HELPER_ENV).map(PathBuf::from), &exe)
}

/// [`find_helper`] for the executable `exe`, with `named` from the environment.
pub fn find_helper_for(named: Option<PathBuf>, exe: &Path) -> Result<PathBuf, String> {
    if let Some(p) = named {
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "no VM helper at {} (named by {HELPER_ENV})",
                p.display()
            ))
        };
    }
    let mut looked = Vec::new();
    if let Some(dir) = exe.parent() {
        looked.push(dir.join(HELPER));
        if dir.file_name().is_some_and(|n| n == "deps")
            && let Some(up) = dir.parent()
        {
            looked.push(up.join(HELPER));
        }
    }
    looked.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        format!(
            "no VM helper {HELPER} beside {} (looked for {}); VMs need it: it ships with \
             gleaner in the gleaner-client package, or build it with `cargo build -p \
             gleaner-vmhost`, or name it in {HELPER_ENV}",
            exe.display(),
            looked
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

fn unreachable(reason: String) -> RuntimeError {
    RuntimeError::Unreachable {
        engine: EngineKind::Libvirt,
        reason,
    }
}

fn unexpected(call: &'static str, r: Reply) -> RuntimeError {
    RuntimeError::Call {
        engine: EngineKind::Libvirt,
        call: Cow::Borrowed(call),
        reason: format!("the VM helper answered {r:?}"),
    }
}

type Pending = HashMap<u64, oneshot::Sender<Result<Reply, RuntimeError>>>;

/// One running helper process and its pipe.
struct Helper {
    path: PathBuf,
    pid: u32,
    writer: tokio::sync::Mutex<Option<FramedWrite<ChildStdin, LengthDelimitedCodec>>>,
    /// Calls waiting for their answer; `None` once the helper is gone.
    pending: Mutex<Option<Pending>>,
    /// Why the helper is gone, once it is.
    death: OnceLock<String>,
    child: Mutex<Option<Child>>,
    next_id: AtomicU64,
    slots: Semaphore,
    /// Calls under way (not counting the idleness check itself), and when the last one ended.
    in_flight: AtomicUsize,
    last_used: Mutex<Instant>,
}

/// Counts a call as under way while it lives.
struct InFlight(Arc<Helper>);

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Helper {
    fn is_dead(&self) -> bool {
        self.death.get().is_some()
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        *self.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        InFlight(self.clone())
    }

    fn idle_for(&self) -> Option<Duration> {
        (self.in_flight.load(Ordering::SeqCst) == 0).then(|| {
            self.last_used
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed()
        })
    }

    fn gone(&self) -> RuntimeError {
        unreachable(self.death.get().cloned().unwrap_or_else(|| {
            format!(
                "the VM helper {} (pid {}) is gone; the next call starts it again",
                self.path.display(),
                self.pid
            )
        }))
    }

    /// Sends `req` and waits for its answer.
    async fn request(&self, req: Request) -> Result<Reply, RuntimeError> {
        let _slot = self.slots.acquire().await.map_err(|_| self.gone())?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            Some(p) => p.insert(id, tx),
            None => return Err(self.gone()),
        };
        let frame = encode(&RequestFrame { id, body: req }).map_err(|reason| RuntimeError::Call {
            engine: EngineKind::Libvirt,
            call: Cow::Borrowed("send to the vm helper"),
            reason,
        });
        let sent = match frame {
            Ok(bytes) => match self.writer.lock().await.as_mut() {
                Some(w) => w
                    .send(tokio_util::bytes::Bytes::from(bytes))
                    .await
                    .map_err(|e| {
                        unreachable(format!(
                            "the VM helper {} (pid {}) does not take requests: {e}",
                            self.path.display(),
                            self.pid
                        ))
                    }),
                None => Err(self.gone()),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            if let Some(p) = self
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
            {
                p.remove(&id);
            }
            return Err(e);
        }
        rx.await.unwrap_or_else(|_| Err(self.gone()))
    }

    fn deliver(&self, f: ReplyFrame) {
        let tx = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
            .and_then(|p| p.remove(&f.id));
        match tx {
            // The caller may have given up (dropped its future): nothing to do then.
            Some(tx) => {
                let _ = tx.send(f.body);
            }
            None => tracing::warn!(id = f.id, "the VM helper answered a request nobody made"),
        }
    }

    /// The helper's pipe ended (`how`): fail every waiting call saying so, and reap the process.
    async fn die(&self, how: String) {
        let child = self.child.lock().unwrap_or_else(|p| p.into_inner()).take();
        let status = match child {
            Some(mut c) => match tokio::time::timeout(Duration::from_secs(5), c.wait()).await {
                Ok(Ok(s)) => s.to_string(),
                Ok(Err(e)) => format!("its status is unknown: {e}"),
                Err(_) => {
                    let _ = c.kill().await;
                    "killed: it kept running with its pipe closed".into()
                }
            },
            None => "already reaped".into(),
        };
        let reason = format!(
            "the VM helper {} (pid {}) {how} ({status}); the next call starts it again",
            self.path.display(),
            self.pid
        );
        let _ = self.death.set(reason.clone());
        let waiting = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        for (_, tx) in waiting.into_iter().flatten() {
            let _ = tx.send(Err(unreachable(reason.clone())));
        }
    }

    /// Lets the helper go: its stdin closes, it exits, the reader reaps it.
    async fn retire(&self) {
        self.writer.lock().await.take();
    }
}

/// Reads the helper's answers until its pipe ends.
async fn read_replies(mut reader: FramedRead<ChildStdout, LengthDelimitedCodec>, h: Weak<Helper>) {
    let how = loop {
        match reader.next().await {
            Some(Ok(bytes)) => match decode::<ReplyFrame>(&bytes) {
                Ok(f) => match h.upgrade() {
                    Some(h) => h.deliver(f),
                    None => return,
                },
                Err(e) => break format!("broke the protocol: {e}"),
            },
            Some(Err(e)) => break format!("sent a frame that cannot be read: {e}"),
            None => break "exited".to_owned(),
        }
    };
    if let Some(h) = h.upgrade() {
        if !how.starts_with("exited") {
            // A helper that breaks the protocol is not trusted with another request.
            if let Some(c) = h.child.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                let _ = c.start_kill();
            }
        }
        h.die(how).await;
    }
}

struct Inner {
    helper: PathBuf,
    cfg: LibvirtConfig,
    idle: Duration,
    blobs: BlobCache,
    current: tokio::sync::Mutex<Option<Arc<Helper>>>,
    /// The domain type the last probe chose, handed to every later helper.
    domain_type: Mutex<Option<DomainType>>,
    /// The highest memory sample per machine (kept here: a helper may be replaced).
    peaks: Mutex<HashMap<String, u64>>,
    spawns: AtomicU64,
}

/// The VM runtime of the daemon: every libvirt call forwarded to the helper process.
#[derive(Clone)]
pub struct VmHostRuntime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for VmHostRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmHostRuntime")
            .field("helper", &self.inner.helper)
            .field("uri", &self.inner.cfg.uri)
            .field("spawns", &self.spawns())
            .finish()
    }
}

impl VmHostRuntime {
    /// Prepares the state and cache directories, starts the helper at `helper` and has it
    /// connect to libvirtd: an error says why VMs cannot run here. The helper is let go after
    /// [`DEFAULT_IDLE`] without calls.
    pub async fn connect(
        cfg: LibvirtConfig,
        helper: PathBuf,
    ) -> Result<VmHostRuntime, RuntimeError> {
        Self::connect_with_idle(cfg, helper, DEFAULT_IDLE).await
    }

    /// As [`VmHostRuntime::connect`], letting the helper go after `idle` without calls.
    pub async fn connect_with_idle(
        cfg: LibvirtConfig,
        helper: PathBuf,
        idle: Duration,
    ) -> Result<VmHostRuntime, RuntimeError> {
        for dir in [&cfg.state_dir, &cfg.cache_dir] {
            let made = std::fs::create_dir_all(dir).and_then(|()| {
                // QEMU runs as its own user and must reach overlays, seeds and cached images.
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            });
            made.map_err(|e| RuntimeError::Call {
                engine: EngineKind::Libvirt,
                call: Cow::Borrowed("create state directory"),
                reason: format!("{}: {e}", dir.display()),
            })?;
        }
        let blobs = BlobCache::new(cfg.cache_dir.clone(), cfg.cache_quota_bytes)?;
        let rt = VmHostRuntime {
            inner: Arc::new(Inner {
                helper,
                cfg,
                idle,
                blobs,
                current: tokio::sync::Mutex::new(None),
                domain_type: Mutex::new(None),
                peaks: Mutex::new(HashMap::new()),
                spawns: AtomicU64::new(0),
            }),
        };
        // Started now so that a host where VMs cannot run is known at once.
        let (_h, _busy) = rt.helper().await?;
        Ok(rt)
    }

    /// The helper executable.
    pub fn helper_path(&self) -> &Path {
        &self.inner.helper
    }

    /// How many helper processes were started so far.
    pub fn spawns(&self) -> u64 {
        self.inner.spawns.load(Ordering::SeqCst)
    }

    /// The running helper's pid, if one runs.
    pub async fn helper_pid(&self) -> Option<u32> {
        self.inner
            .current
            .lock()
            .await
            .as_ref()
            .filter(|h| !h.is_dead())
            .map(|h| h.pid)
    }

    pub fn config(&self) -> &LibvirtConfig {
        &self.inner.cfg
    }

    /// The directory of one machine's files.
    pub fn machine_dir(&self, name: &str) -> PathBuf {
        self.inner.cfg.state_dir.join(name)
    }

    /// The serial console log of a machine.
    pub fn console_log(&self, name: &str) -> PathBuf {
        self.machine_dir(name).join("console.log")
    }

    /// The live helper (started if none runs), with this call counted as under way.
    async fn helper(&self) -> Result<(Arc<Helper>, InFlight), RuntimeError> {
        let mut cur = self.inner.current.lock().await;
        if let Some(h) = cur.as_ref()
            && !h.is_dead()
        {
            return Ok((h.clone(), h.begin()));
        }
        *cur = None;
        let h = self.spawn().await?;
        *cur = Some(h.clone());
        let busy = h.begin();
        Ok((h, busy))
    }

    async fn spawn(&self) -> Result<Arc<Helper>, RuntimeError> {
        let path = &self.inner.helper;
        let mut child = tokio::process::Command::new(path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                unreachable(format!(
                    "cannot start the VM helper {}: {e}",
                    path.display()
                ))
            })?;
        let pid = child.id().unwrap_or(0);
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(unreachable(format!(
                "the VM helper {} started without its pipes",
                path.display()
            )));
        };
        let h = Arc::new(Helper {
            path: path.clone(),
            pid,
            writer: tokio::sync::Mutex::new(Some(FramedWrite::new(stdin, codec()))),
            pending: Mutex::new(Some(HashMap::new())),
            death: OnceLock::new(),
            child: Mutex::new(Some(child)),
            next_id: AtomicU64::new(1),
            slots: Semaphore::new(MAX_IN_FLIGHT),
            in_flight: AtomicUsize::new(0),
            last_used: Mutex::new(Instant::now()),
        });
        tokio::spawn(read_replies(
            FramedRead::new(stdout, codec()),
            Arc::downgrade(&h),
        ));
        let mut cfg = self.inner.cfg.clone();
        // The cgroup freeze is done here, in the daemon; the helper is asked only when that
        // cannot be done, and then suspends through libvirt.
        cfg.cgroup_freeze = false;
        let open = Request::Open {
            protocol: PROTOCOL,
            config: cfg,
            domain_type: *self
                .inner
                .domain_type
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        };
        match h.request(open).await? {
            Reply::Opened { version } => {
                tracing::debug!(pid, %version, "started the VM helper");
            }
            r => return Err(unexpected("open", r)),
        }
        self.inner.spawns.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(let_go_when_idle(
            Arc::downgrade(&self.inner),
            Arc::downgrade(&h),
        ));
        Ok(h)
    }

    async fn call(&self, req: Request) -> Result<Reply, RuntimeError> {
        let (h, _busy) = self.helper().await?;
        h.request(req).await
    }
}

/// Lets `h` go once no call came for the idle time and no owned domain is active.
async fn let_go_when_idle(inner: Weak<Inner>, h: Weak<Helper>) {
    let Some(idle) = inner.upgrade().map(|i| i.idle) else {
        return;
    };
    let mut wait = idle;
    loop {
        tokio::time::sleep(wait).await;
        let Some(helper) = h.upgrade() else { return };
        if helper.is_dead() {
            return;
        }
        match helper.idle_for() {
            Some(quiet) if quiet >= idle => {}
            Some(quiet) => {
                wait = idle - quiet;
                continue;
            }
            None => {
                wait = idle;
                continue;
            }
        }
        match helper.request(Request::Busy).await {
            Ok(Reply::Busy(false)) => {}
            Ok(_) => {
                wait = idle;
                continue;
            }
            Err(_) => return,
        }
        let Some(inner) = inner.upgrade() else { return };
        let mut cur = inner.current.lock().await;
        if !cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, &helper)) {
            return;
        }
        // A call may have begun while the helper was asked (it would hold the lock to begin).
        if helper.idle_for().is_none_or(|q| q < idle) {
            wait = idle;
            continue;
        }
        *cur = None;
        drop(cur);
        tracing::debug!(pid = helper.pid, "letting the idle VM helper go");
        helper.retire().await;
        return;
    }
}

/// The freezer of domain `name`'s QEMU if its cgroup is frozen or freezing now.
fn cgroup_frozen(name: &str) -> Option<QemuFreezer> {
    QemuFreezer::for_domain(name)
        .ok()
        .filter(|f| f.is_freezing())
}

impl Runtime for VmHostRuntime {
    fn engine(&self) -> EngineKind {
        EngineKind::Libvirt
    }

    async fn probe(&self) -> Result<Probe, RuntimeError> {
        let mut p = match self.call(Request::Probe).await? {
            Reply::Probe(p) => p,
            r => return Err(unexpected("probe", r)),
        };
        *self
            .inner
            .domain_type
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(if p.kvm_usable {
            DomainType::Kvm
        } else {
            DomainType::Qemu
        });
        p.notes.push(format!(
            "libvirt through the helper {}, started when needed",
            self.inner.helper.display()
        ));
        Ok(p)
    }

    /// Fetched here, into the verified cache: a download needs no libvirt.
    async fn prepare_image(
        &self,
        source: &ImageSource,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<PreparedImage, RuntimeError> {
        self.inner.blobs.prepare_vm_image(source, progress).await
    }

    async fn create(&self, spec: &MachineSpec) -> Result<MachineHandle, RuntimeError> {
        match self.call(Request::Create(Box::new(spec.clone()))).await? {
            Reply::Handle(h) => Ok(h),
            r => Err(unexpected("create", r)),
        }
    }

    async fn start(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        match self.call(Request::Start(m.clone())).await? {
            Reply::Done => Ok(()),
            r => Err(unexpected("start", r)),
        }
    }

    /// QEMU's cgroup frozen here, with no call to the helper or libvirtd (the owner's yield
    /// path); only when that cannot be done does the helper suspend the domain.
    async fn freeze(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        if self.inner.cfg.cgroup_freeze {
            match QemuFreezer::for_domain(&m.name) {
                Ok(f) => match f.freeze(FREEZE_DEADLINE).await {
                    Ok(()) => return Ok(()),
                    Err(e) => tracing::warn!("{}: cgroup freeze failed, suspending: {e}", m.name),
                },
                Err(e) => tracing::debug!("{}: no cgroup freeze, suspending: {e}", m.name),
            }
        }
        match self.call(Request::Freeze(m.clone())).await? {
            Reply::Done => Ok(()),
            r => Err(unexpected("freeze", r)),
        }
    }

    async fn thaw(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        // A cgroup freeze (ours, or one a crashed daemon left) is undone here at once; the
        // helper then resumes a suspend made by libvirt (the fallback), if any.
        if let Some(f) = cgroup_frozen(&m.name) {
            f.thaw().map_err(|reason| RuntimeError::Call {
                engine: EngineKind::Libvirt,
                call: Cow::Borrowed("thaw qemu cgroup"),
                reason,
            })?;
        }
        match self.call(Request::Thaw(m.clone())).await? {
            Reply::Done => Ok(()),
            r => Err(unexpected("thaw", r)),
        }
    }

    async fn set_limits(&self, m: &MachineHandle, limits: Limits) -> Result<(), RuntimeError> {
        match self.call(Request::SetLimits(m.clone(), limits)).await? {
            Reply::Done => Ok(()),
            r => Err(unexpected("set limits", r)),
        }
    }

    async fn state(&self, m: &MachineHandle) -> Result<MachineState, RuntimeError> {
        match self.call(Request::State(m.clone())).await? {
            Reply::State(s) => Ok(s),
            r => Err(unexpected("state", r)),
        }
    }

    async fn sample(&self, m: &MachineHandle) -> Result<Usage, RuntimeError> {
        let mut u = match self.call(Request::Sample(m.clone())).await? {
            Reply::Usage(u) => u,
            r => return Err(unexpected("sample", r)),
        };
        let mut peaks = self.inner.peaks.lock().unwrap_or_else(|p| p.into_inner());
        let peak = peaks.entry(m.engine_id.clone()).or_insert(0);
        *peak = (*peak).max(u.peak_memory_bytes).max(u.memory_bytes);
        u.peak_memory_bytes = *peak;
        Ok(u)
    }

    async fn stop(&self, m: &MachineHandle, grace: Duration) -> Result<MachineState, RuntimeError> {
        match self.call(Request::Stop(m.clone(), grace)).await? {
            Reply::State(s) => Ok(s),
            r => Err(unexpected("stop", r)),
        }
    }

    async fn remove(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        match self.call(Request::Remove(m.clone())).await? {
            Reply::Done => {
                self.inner
                    .peaks
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&m.engine_id);
                Ok(())
            }
            r => Err(unexpected("remove", r)),
        }
    }

    async fn list_owned(&self) -> Result<Vec<OwnedMachine>, RuntimeError> {
        match self.call(Request::ListOwned).await? {
            Reply::Owned(l) => Ok(l),
            r => Err(unexpected("list owned", r)),
        }
    }

    async fn remove_strays(&self) -> Result<Vec<String>, RuntimeError> {
        match self.call(Request::RemoveStrays).await? {
            Reply::Removed(l) => Ok(l),
            r => Err(unexpected("remove strays", r)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_errors_keep_their_kind() {
        let f = ReplyFrame {
            id: 7,
            body: Err(RuntimeError::Call {
                engine: EngineKind::Libvirt,
                call: Cow::Borrowed("define domain"),
                reason: "a domain named x already exists".into(),
            }),
        };
        let back: ReplyFrame = decode(&encode(&f).unwrap()).unwrap();
        assert_eq!(back.id, 7);
        let e = back.body.unwrap_err();
        assert_eq!(
            e.to_string(),
            "Libvirt call define domain failed: a domain named x already exists"
        );
        let open = RequestFrame {
            id: 1,
            body: Request::Open {
                protocol: PROTOCOL,
                config: LibvirtConfig::new("me", "/s".into()),
                domain_type: Some(DomainType::Kvm),
            },
        };
        let back: RequestFrame = decode(&encode(&open).unwrap()).unwrap();
        match back.body {
            Request::Open {
                config,
                domain_type,
                ..
            } => {
                assert_eq!(config, LibvirtConfig::new("me", "/s".into()));
                assert_eq!(domain_type, Some(DomainType::Kvm));
            }
            b => panic!("{b:?}"),
        }
        assert!(decode::<ReplyFrame>(b"\xff\x00").is_err());
    }

    #[test]
    fn the_helper_is_found_beside_the_executable_or_named_with_where_it_was_looked_for() {
        let t = tempfile::tempdir().unwrap();
        let deps = t.path().join("debug/deps");
        std::fs::create_dir_all(&deps).unwrap();
        let exe = deps.join("gleaner");
        // Nowhere yet: the error names both places and how to get it.
        let e = find_helper_for(None, &exe).unwrap_err();
        assert!(e.contains(&deps.join(HELPER).display().to_string()), "{e}");
        assert!(
            e.contains(&t.path().join("debug").join(HELPER).display().to_string()),
            "{e}"
        );
        assert!(e.contains("cargo build -p gleaner-vmhost"), "{e}");
        // cargo's layout: a test executable in deps/ finds the helper one folder up.
        std::fs::write(t.path().join("debug").join(HELPER), "").unwrap();
        assert_eq!(
            find_helper_for(None, &exe).unwrap(),
            t.path().join("debug").join(HELPER)
        );
        // Beside the executable wins.
        std::fs::write(deps.join(HELPER), "").unwrap();
        assert_eq!(find_helper_for(None, &exe).unwrap(), deps.join(HELPER));
        // Named: used if it is there, else refused saying who named it.
        let named = t.path().join("elsewhere");
        let e = find_helper_for(Some(named.clone()), &exe).unwrap_err();
        assert!(e.contains(HELPER_ENV) && e.contains("elsewhere"), "{e}");
        std::fs::write(&named, "").unwrap();
        assert_eq!(find_helper_for(Some(named.clone()), &exe).unwrap(), named);
    }
}
