//! One runtime over the engines a host has — containers on the Docker Engine, VMs on libvirt — that
//! routes each machine to the engine of its backend and each later call to the engine that made it.
//!
//! The engines are a closed set, so this is a plain struct of two optional runtimes rather than a
//! list of trait objects. Engine ids are remembered per machine when it is created and relearned
//! from `list_owned` (which lists both engines) after a restart; a handle nobody remembers is
//! asked about in each engine, which answers "gone" for ids it does not know.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use super::docker::DockerRuntime;
use super::vmhost::{LibvirtConfig, VmHostRuntime};
use super::{
    Backend, EngineKind, ImageSource, Limits, MachineHandle, MachineSpec, MachineState,
    OwnedMachine, PreparedImage, Probe, Progress, Runtime, RuntimeError, Usage,
};

/// Containers on `C`, VMs on `V`; either may be missing (not installed, not running, turned off).
#[derive(Debug)]
pub struct Backends<C: Runtime = DockerRuntime, V: Runtime = VmHostRuntime> {
    containers: Option<C>,
    vms: Option<V>,
    /// Which backend's engine made each machine, by engine id.
    made_by: Mutex<HashMap<String, Backend>>,
    /// Engines left out, and why (shown by `gleaner status` and in the probe's notes).
    skipped: Vec<String>,
}

/// The runtime the daemon runs: Docker for containers, libvirt (through the `gleaner-vmhost`
/// helper process) for VMs.
pub type HostRuntime = Backends<DockerRuntime, VmHostRuntime>;

fn missing(backend: Backend) -> RuntimeError {
    RuntimeError::Unsupported(match backend {
        Backend::Container => {
            "container machines need the Docker Engine, which this host does not offer".into()
        }
        Backend::Vm => "vm machines need libvirt, which this host does not offer".into(),
    })
}

/// Runs `$body` with `$rt` bound to the engine of `$backend` (each arm has its own type).
macro_rules! route {
    ($self:ident, $backend:expr, |$rt:ident| $body:expr) => {
        match $backend {
            Backend::Container => match &$self.containers {
                Some($rt) => $body,
                None => Err(missing(Backend::Container)),
            },
            Backend::Vm => match &$self.vms {
                Some($rt) => $body,
                None => Err(missing(Backend::Vm)),
            },
        }
    };
}

impl<C: Runtime, V: Runtime> Backends<C, V> {
    pub fn new(containers: Option<C>, vms: Option<V>) -> Self {
        Backends {
            containers,
            vms,
            made_by: Mutex::new(HashMap::new()),
            skipped: Vec::new(),
        }
    }

    /// Records why an engine was left out.
    pub fn with_skipped(mut self, notes: Vec<String>) -> Self {
        self.skipped = notes;
        self
    }

    pub fn containers(&self) -> Option<&C> {
        self.containers.as_ref()
    }

    pub fn vms(&self) -> Option<&V> {
        self.vms.as_ref()
    }

    /// Engines left out, and why.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    fn map(&self) -> MutexGuard<'_, HashMap<String, Backend>> {
        self.made_by.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn present(&self) -> Vec<Backend> {
        let mut out = Vec::new();
        if self.containers.is_some() {
            out.push(Backend::Container);
        }
        if self.vms.is_some() {
            out.push(Backend::Vm);
        }
        out
    }

    /// The backend whose engine holds `m`: remembered, else asked of each engine in turn.
    async fn which(&self, m: &MachineHandle) -> Option<Backend> {
        if let Some(b) = self.map().get(&m.engine_id).copied() {
            return Some(b);
        }
        for b in self.present() {
            let state: Result<MachineState, RuntimeError> = route!(self, b, |rt| rt.state(m).await);
            if matches!(state, Ok(s) if s != MachineState::Gone) {
                self.map().insert(m.engine_id.clone(), b);
                return Some(b);
            }
        }
        None
    }

    async fn routed(&self, m: &MachineHandle) -> Result<Backend, RuntimeError> {
        self.which(m)
            .await
            .ok_or_else(|| RuntimeError::NoSuchMachine(m.name.clone()))
    }
}

impl<C: Runtime, V: Runtime> Runtime for Backends<C, V> {
    fn engine(&self) -> EngineKind {
        match (&self.containers, &self.vms) {
            (Some(c), _) => c.engine(),
            (None, Some(v)) => v.engine(),
            (None, None) => EngineKind::Docker,
        }
    }

    fn runs(&self, backend: Backend) -> bool {
        match backend {
            Backend::Container => self.containers.as_ref().is_some_and(|c| c.runs(backend)),
            Backend::Vm => self.vms.as_ref().is_some_and(|v| v.runs(backend)),
        }
    }

    /// Both engines' probes in one: versions joined, KVM from the VM engine, every note kept
    /// (prefixed with its engine), and the engines left out with why.
    async fn probe(&self) -> Result<Probe, RuntimeError> {
        let mut probes = Vec::new();
        let mut notes = Vec::new();
        let mut first_err = None;
        for b in self.present() {
            let p: Result<Probe, RuntimeError> = route!(self, b, |rt| rt.probe().await);
            match p {
                Ok(p) => probes.push((b, p)),
                Err(e) => {
                    notes.push(format!("{b}s: {e}"));
                    first_err.get_or_insert(e);
                }
            }
        }
        notes.extend(self.skipped.iter().cloned());
        let Some((_, lead)) = probes.first() else {
            return Err(first_err.unwrap_or(RuntimeError::Unreachable {
                engine: EngineKind::Docker,
                reason: format!("no engine to run machines: {}", notes.join("; ")),
            }));
        };
        let engine = lead.engine;
        let cgroup_version = lead.cgroup_version;
        let version = probes
            .iter()
            .map(|(b, p)| format!("{b}s: {}", p.version))
            .collect::<Vec<_>>()
            .join("; ");
        let kvm_usable = probes
            .iter()
            .any(|(b, p)| *b == Backend::Vm && p.kvm_usable);
        for (b, p) in &probes {
            notes.extend(p.notes.iter().map(|n| format!("{b}s: {n}")));
        }
        Ok(Probe {
            engine,
            reachable: true,
            version,
            kvm_usable,
            cgroup_version,
            notes,
        })
    }

    async fn prepare_image(
        &self,
        source: &ImageSource,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<PreparedImage, RuntimeError> {
        route!(self, source.backend, |rt| rt
            .prepare_image(source, progress)
            .await)
    }

    async fn create(&self, spec: &MachineSpec) -> Result<MachineHandle, RuntimeError> {
        let h = route!(self, spec.backend, |rt| rt.create(spec).await)?;
        self.map().insert(h.engine_id.clone(), spec.backend);
        Ok(h)
    }

    async fn start(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        route!(self, self.routed(m).await?, |rt| rt.start(m).await)
    }

    async fn freeze(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        route!(self, self.routed(m).await?, |rt| rt.freeze(m).await)
    }

    async fn thaw(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        route!(self, self.routed(m).await?, |rt| rt.thaw(m).await)
    }

    async fn set_limits(&self, m: &MachineHandle, limits: Limits) -> Result<(), RuntimeError> {
        route!(self, self.routed(m).await?, |rt| rt
            .set_limits(m, limits)
            .await)
    }

    async fn set_background(&self, on: bool) -> Result<(), RuntimeError> {
        // Every engine's guests alike; one that cannot is no reason to skip the other.
        let mut first_err = None;
        for b in self.present() {
            if let Err(e) = route!(self, b, |rt| rt.set_background(on).await) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    async fn state(&self, m: &MachineHandle) -> Result<MachineState, RuntimeError> {
        match self.which(m).await {
            Some(b) => route!(self, b, |rt| rt.state(m).await),
            None => Ok(MachineState::Gone),
        }
    }

    async fn sample(&self, m: &MachineHandle) -> Result<Usage, RuntimeError> {
        route!(self, self.routed(m).await?, |rt| rt.sample(m).await)
    }

    async fn stop(&self, m: &MachineHandle, grace: Duration) -> Result<MachineState, RuntimeError> {
        match self.which(m).await {
            Some(b) => route!(self, b, |rt| rt.stop(m, grace).await),
            None => Ok(MachineState::Gone),
        }
    }

    /// Removes through the engine that made `m`; a machine no engine knows is removed from each
    /// (every engine's remove is idempotent and also deletes the files it keeps by name).
    async fn remove(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        let targets = match self.which(m).await {
            Some(b) => vec![b],
            None => self.present(),
        };
        let mut result = Ok(());
        for b in targets {
            let r: Result<(), RuntimeError> = route!(self, b, |rt| rt.remove(m).await);
            if let Err(e) = r
                && result.is_ok()
            {
                result = Err(e);
            }
        }
        if result.is_ok() {
            self.map().remove(&m.engine_id);
        }
        result
    }

    /// Every machine either engine holds with this host's ownership; the routing is relearned from
    /// it. One engine failing fails the whole listing: a partial list would make recovery treat the
    /// other engine's machines as lost.
    async fn list_owned(&self) -> Result<Vec<OwnedMachine>, RuntimeError> {
        let mut all = Vec::new();
        for b in self.present() {
            let owned: Vec<OwnedMachine> = route!(self, b, |rt| rt.list_owned().await)?;
            let mut map = self.map();
            for o in &owned {
                map.insert(o.engine_id.clone(), b);
            }
            drop(map);
            all.extend(owned);
        }
        Ok(all)
    }

    async fn remove_strays(&self) -> Result<Vec<String>, RuntimeError> {
        let mut all = Vec::new();
        for b in self.present() {
            all.extend(route!(self, b, |rt| rt.remove_strays().await)?);
        }
        Ok(all)
    }
}

/// How the daemon (and `gleaner cleanup`) connects the engines.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The ownership label/metadata value: the host's public key.
    pub owner: String,
    /// The daemon's state dir: Docker's image cache in `images/`, libvirt's files in `vms/`.
    pub state_dir: PathBuf,
    /// Disk for cached images (each engine's cache).
    pub disk_bytes: u64,
    /// Which backends the owner allows (settings key `backends`).
    pub containers: bool,
    pub vms: bool,
    /// libvirt's URI (normally `qemu:///system`).
    pub libvirt_uri: String,
    /// The VM helper; `None`: found by [`super::vmhost::find_helper`] (beside this executable).
    pub vmhost: Option<PathBuf>,
}

impl ConnectOptions {
    pub fn new(owner: &str, state_dir: PathBuf, disk_bytes: u64) -> ConnectOptions {
        ConnectOptions {
            owner: owner.to_owned(),
            state_dir,
            disk_bytes,
            containers: true,
            vms: true,
            libvirt_uri: super::vmhost::DEFAULT_URI.into(),
            vmhost: None,
        }
    }
}

/// Where libvirt's per-machine files and image cache live under a state dir.
pub fn vm_state_dir(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("vms")
}

/// Connects every allowed engine that answers; the others are skipped with the reason.
pub async fn connect(opts: &ConnectOptions) -> HostRuntime {
    let mut skipped = Vec::new();
    let containers = if opts.containers {
        match DockerRuntime::connect(&opts.owner, opts.state_dir.join("images"), opts.disk_bytes)
            .await
        {
            Ok(d) => Some(d),
            Err(e) => {
                skipped.push(format!("containers: skipped ({e})"));
                None
            }
        }
    } else {
        skipped.push("containers: turned off by the settings (backends)".into());
        None
    };
    let vms = if opts.vms {
        let mut cfg = LibvirtConfig::new(&opts.owner, vm_state_dir(&opts.state_dir));
        cfg.uri = opts.libvirt_uri.clone();
        cfg.cache_quota_bytes = opts.disk_bytes;
        match opts
            .vmhost
            .clone()
            .map_or_else(super::vmhost::find_helper, Ok)
        {
            Ok(helper) => match VmHostRuntime::connect(cfg, helper).await {
                Ok(v) => Some(v),
                Err(e) => {
                    skipped.push(format!("vms: skipped ({e})"));
                    None
                }
            },
            Err(e) => {
                skipped.push(format!("vms: skipped ({e})"));
                None
            }
        }
    } else {
        skipped.push("vms: turned off by the settings (backends)".into());
        None
    };
    Backends::new(containers, vms).with_skipped(skipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::fake::FakeRuntime;
    use gleaner::{Digest, Id16};
    use std::collections::BTreeMap;

    fn spec(backend: Backend, name: &str) -> MachineSpec {
        MachineSpec {
            backend,
            machine_id: Id16([name.len() as u8; 16]),
            machine_type: Digest::of(name.as_bytes()),
            name: name.into(),
            image: None,
            kernel: None,
            initrd: None,
            cores: 1,
            limits: Limits {
                cpus: 1.0,
                memory_bytes: 64 << 20,
            },
            disk_bytes: 64 << 20,
            pids_limit: 64,
            mjf_dir: "/nonexistent".into(),
            egress: vec![],
            command: None,
            labels: BTreeMap::new(),
        }
    }

    fn both() -> Backends<FakeRuntime, FakeRuntime> {
        Backends::new(
            Some(FakeRuntime::with_id_prefix("c-")),
            Some(FakeRuntime::with_id_prefix("v-")),
        )
    }

    fn names(calls: &[crate::runtime::fake::FakeCall]) -> Vec<&'static str> {
        calls.iter().map(|c| c.name()).collect()
    }

    #[tokio::test]
    async fn images_and_machines_go_to_their_backends_engine() {
        let b = both();
        let src = |backend| ImageSource {
            url: "file:///x".into(),
            sha256: Digest::of(b"x"),
            backend,
        };
        b.prepare_image(&src(Backend::Vm), &|_| {}).await.unwrap();
        let vm = b.create(&spec(Backend::Vm, "vm")).await.unwrap();
        let ct = b.create(&spec(Backend::Container, "ct")).await.unwrap();
        b.start(&vm).await.unwrap();
        b.freeze(&vm).await.unwrap();
        b.start(&ct).await.unwrap();
        b.sample(&ct).await.unwrap();
        let (c, v) = (b.containers().unwrap(), b.vms().unwrap());
        assert_eq!(
            names(&v.calls()),
            ["prepare_image", "create", "start", "freeze"]
        );
        assert_eq!(names(&c.calls()), ["create", "start", "sample"]);
        assert_eq!(b.state(&vm).await.unwrap(), MachineState::Frozen);
        assert_eq!(b.state(&ct).await.unwrap(), MachineState::Running);
        b.remove(&vm).await.unwrap();
        assert!(v.machine("vm").is_none());
        assert!(c.machine("ct").is_some());
        assert_eq!(b.state(&vm).await.unwrap(), MachineState::Gone);
    }

    #[tokio::test]
    async fn a_restarted_runtime_relearns_who_made_what() {
        let b = both();
        let vm = b.vms().unwrap().add_owned("old-vm");
        let ct = b.containers().unwrap().add_owned("old-container");
        // From the listing, which holds both engines' machines.
        let owned = b.list_owned().await.unwrap();
        assert_eq!(owned.len(), 2, "{owned:?}");
        b.stop(&vm, Duration::from_secs(1)).await.unwrap();
        assert!(names(&b.vms().unwrap().calls()).contains(&"stop"));
        assert!(!names(&b.containers().unwrap().calls()).contains(&"stop"));
        // Without a listing: found by asking each engine.
        let fresh = Backends::new(
            Some(FakeRuntime::with_id_prefix("c-")),
            Some(FakeRuntime::with_id_prefix("v-")),
        );
        let ct2 = fresh.containers().unwrap().add_owned("c2");
        fresh.thaw(&ct2).await.unwrap();
        assert!(names(&fresh.containers().unwrap().calls()).contains(&"thaw"));
        assert!(!names(&fresh.vms().unwrap().calls()).contains(&"thaw"));
        // A machine no engine knows: gone, and removing it asks every engine.
        let ghost = MachineHandle {
            engine_id: "nope".into(),
            name: "ghost".into(),
        };
        assert_eq!(fresh.state(&ghost).await.unwrap(), MachineState::Gone);
        assert!(matches!(
            fresh.sample(&ghost).await,
            Err(RuntimeError::NoSuchMachine(_))
        ));
        fresh.remove(&ghost).await.unwrap();
        assert!(names(&fresh.vms().unwrap().calls()).contains(&"remove"));
        let _ = ct;
    }

    #[tokio::test]
    async fn a_missing_engine_refuses_its_backend_and_says_so() {
        let b: Backends<FakeRuntime, FakeRuntime> = Backends::new(Some(FakeRuntime::new()), None)
            .with_skipped(vec!["vms: skipped (no libvirtd)".into()]);
        assert!(b.runs(Backend::Container));
        assert!(!b.runs(Backend::Vm));
        let e = b.create(&spec(Backend::Vm, "vm")).await.unwrap_err();
        assert!(e.to_string().contains("libvirt"), "{e}");
        let p = b.probe().await.unwrap();
        assert!(p.notes.iter().any(|n| n.contains("no libvirtd")), "{p:?}");
        let none: Backends<FakeRuntime, FakeRuntime> = Backends::new(None, None);
        assert!(none.probe().await.is_err());
        assert!(none.list_owned().await.unwrap().is_empty());
    }
}
