//! The runtime boundary: how a logical machine becomes a container (Docker Engine) or a VM (libvirt,
//! which runs in the `gleaner-vmhost` helper process: see `vmhost.rs`).
//!
//! One trait, a closed set of backends (an enum), each tested against its real engine; the fake serves
//! the factory's unit tests. Every machine a runtime makes carries ownership labels/metadata so a
//! restarted daemon can adopt or clean it up.

pub mod backends;
pub mod blobs;
pub mod docker;
pub mod egress;
pub mod fake;
pub mod freezer;
pub mod image;
pub mod vmhost;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

pub use gleaner::Backend;
use gleaner::{Digest, Id16};

/// Label (container) / metadata key (domain) that marks what Gleaner owns.
pub const OWNER_LABEL: &str = "org.gleaner.owner";
/// Label carrying the machine id (hex).
pub const MACHINE_ID_LABEL: &str = "org.gleaner.machine-id";
/// Label carrying the machine-type digest (hex).
pub const MACHINE_TYPE_LABEL: &str = "org.gleaner.machine-type";

/// Which engine a runtime drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    Docker,
    Libvirt,
    Fake,
}

/// What the host offers, found by really asking the engine (and, for KVM, a test boot).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Probe {
    pub engine: EngineKind,
    pub reachable: bool,
    /// Engine version string, e.g. "20.10.24 (API 1.41)" or "libvirt 9.0.0, QEMU 7.2.0".
    pub version: String,
    /// For libvirt: true only when a real test boot under KVM succeeded in time.
    pub kvm_usable: bool,
    /// 1 or 2.
    pub cgroup_version: u8,
    /// Human notes (why KVM is not usable, which fallback applies...).
    pub notes: Vec<String>,
}

/// A content-addressed image to make available: a tarball/disk by URL + sha256, or `oci://` pinned.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageSource {
    pub url: String,
    pub sha256: Digest,
    /// Which backend the image is for (a container image, or a VM's disk, kernel or initrd): a
    /// runtime holding several engines hands it to the one that runs that backend.
    pub backend: Backend,
}

/// An image that is ready in the engine (a Docker image id, or a local disk/kernel path).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PreparedImage {
    pub sha256: Digest,
    /// Docker: the image reference to create containers from. Libvirt: the local file path.
    pub reference: String,
}

/// Progress of a long image download, for display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub done_bytes: u64,
    pub total_bytes: Option<u64>,
}

/// Live resource limits of a machine (changed without restarting it).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// CPU quota in cores (e.g. 1.5); never more than the allocated cores.
    pub cpus: f64,
    pub memory_bytes: u64,
}

/// Everything needed to create one logical machine.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MachineSpec {
    /// Container or VM: which engine makes the machine.
    pub backend: Backend,
    pub machine_id: Id16,
    pub machine_type: Digest,
    /// Engine object name, e.g. `gleaner-<machine id>`.
    pub name: String,
    pub image: Option<PreparedImage>,
    /// Direct kernel boot (VMs).
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// Cores allocated (vCPUs for a VM; cpuset size is not pinned).
    pub cores: u16,
    pub limits: Limits,
    pub disk_bytes: u64,
    pub pids_limit: u32,
    /// Host directory holding `machinefeatures/`, `jobfeatures/`, `joboutputs/` and the file
    /// `user_data`; mounted into the machine (containers: `/machinefeatures` etc. and `/user_data`).
    pub mjf_dir: PathBuf,
    /// Signed egress policy: empty = no network at all.
    pub egress: Vec<String>,
    /// Command override (containers), mostly for tests; `None` runs the image's default.
    pub command: Option<Vec<String>>,
    /// Extra labels/metadata beside the ownership ones.
    pub labels: BTreeMap<String, String>,
}

/// The engine's view of a machine's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MachineState {
    Created,
    Running,
    Frozen,
    /// Ended by itself or stopped, with the exit code where the engine knows it.
    Exited {
        code: Option<i64>,
    },
    /// The engine no longer knows it.
    Gone,
}

/// One usage sample from the engine's own accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// Cumulative CPU time in nanoseconds since the machine started.
    pub cpu_ns: u64,
    pub memory_bytes: u64,
    pub peak_memory_bytes: u64,
}

/// A machine found in the engine with Gleaner's ownership labels.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OwnedMachine {
    pub engine_id: String,
    pub name: String,
    pub machine_id: Option<Id16>,
    pub machine_type: Option<Digest>,
    pub state: MachineState,
}

/// A runtime failure: which engine call failed and why. Serialisable: the VM helper sends it back
/// over its pipe as it was made.
#[derive(Debug, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum RuntimeError {
    #[error("{engine:?} is not reachable: {reason}")]
    Unreachable { engine: EngineKind, reason: String },
    #[error("{engine:?} call {call} failed: {reason}")]
    Call {
        engine: EngineKind,
        call: Cow<'static, str>,
        reason: String,
    },
    #[error("image {url}: sha256 is {actual}, the machine type requires {expected}")]
    HashMismatch {
        url: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("image {url}: {reason}")]
    Image { url: String, reason: String },
    #[error("no machine {0}")]
    NoSuchMachine(String),
    #[error("{0}")]
    Unsupported(String),
}

/// Whether this host can enforce `egress` for a machine of `backend`, or why not. Containers get
/// any policy (their own filtered bridge, see `egress.rs`). A VM's network is QEMU's user-mode
/// stack, whose connections leave from the QEMU process and cannot be told apart by a host
/// firewall, so a VM may have no network or an unrestricted one (`*`), never a list: a list
/// that could not be enforced is refused rather than silently widened.
pub fn egress_supported(backend: Backend, egress: &[String]) -> Result<(), String> {
    let listed = !egress.is_empty() && !egress.iter().any(|e| e == "*");
    if backend == Backend::Vm && listed {
        return Err(format!(
            "its egress policy lists destinations ({}), which this host can enforce for \
             containers only: a VM gets no network (egress = []) or an unrestricted one \
             (egress = [\"*\"])",
            egress.join(", ")
        ));
    }
    Ok(())
}

/// A handle to a machine created by a runtime: its engine id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct MachineHandle {
    pub engine_id: String,
    pub name: String,
}

/// The runtime boundary. All methods are cancel-safe to drop; blocking engines (libvirt) run their
/// calls off the async executor.
pub trait Runtime: Send + Sync {
    fn engine(&self) -> EngineKind;
    /// Whether this runtime can run machines of `backend` (a Docker runtime runs containers, a
    /// libvirt one VMs; a runtime over several engines answers for those it holds).
    fn runs(&self, backend: Backend) -> bool {
        match self.engine() {
            EngineKind::Docker => backend == Backend::Container,
            EngineKind::Libvirt => backend == Backend::Vm,
            EngineKind::Fake => true,
        }
    }
    fn probe(&self) -> impl Future<Output = Result<Probe, RuntimeError>> + Send;
    /// Makes an image available, verifying its sha256 before the engine sees it.
    fn prepare_image(
        &self,
        source: &ImageSource,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> impl Future<Output = Result<PreparedImage, RuntimeError>> + Send;
    fn create(
        &self,
        spec: &MachineSpec,
    ) -> impl Future<Output = Result<MachineHandle, RuntimeError>> + Send;
    fn start(&self, m: &MachineHandle) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn freeze(&self, m: &MachineHandle) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn thaw(&self, m: &MachineHandle) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn set_limits(
        &self,
        m: &MachineHandle,
        limits: Limits,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Puts this runtime's guests in the background — they run only on CPU time no other
    /// process wants (the idle scheduling class) — or back at normal weight. The enforcer asks
    /// for the background only while the owner is at the machine and guests are throttled;
    /// while the owner is away they keep normal weight, so an owner's return freezes them at
    /// once. Best effort: an engine or kernel that cannot leaves guests at normal weight, still
    /// bound by their quotas.
    fn set_background(&self, on: bool) -> impl Future<Output = Result<(), RuntimeError>> + Send {
        let _ = on;
        async { Ok(()) }
    }
    fn state(
        &self,
        m: &MachineHandle,
    ) -> impl Future<Output = Result<MachineState, RuntimeError>> + Send;
    fn sample(&self, m: &MachineHandle)
    -> impl Future<Output = Result<Usage, RuntimeError>> + Send;
    /// Asks the machine to stop (SIGTERM / ACPI), waits up to `grace`, then kills it.
    fn stop(
        &self,
        m: &MachineHandle,
        grace: Duration,
    ) -> impl Future<Output = Result<MachineState, RuntimeError>> + Send;
    /// Removes the machine and everything made for it (container, domain, overlay, volumes).
    fn remove(&self, m: &MachineHandle) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Every machine carrying Gleaner's ownership label/metadata.
    fn list_owned(&self) -> impl Future<Output = Result<Vec<OwnedMachine>, RuntimeError>> + Send;
    /// Removes what a crash left made for machines that no longer exist (a container's egress
    /// network and rules); returns what it removed. Run after recovery and by `gleaner cleanup`.
    fn remove_strays(&self) -> impl Future<Output = Result<Vec<String>, RuntimeError>> + Send {
        async { Ok(Vec::new()) }
    }
}
