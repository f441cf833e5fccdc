//! An in-memory runtime for the factory's unit tests: deterministic (no clock, no threads),
//! scriptable per machine or machine type (exit code after N samples, CPU growth per sample,
//! refusing to stop, failing a named call), and it records every call it receives.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use gleaner::Digest;

use super::{
    EngineKind, ImageSource, Limits, MachineHandle, MachineSpec, MachineState, OwnedMachine,
    PreparedImage, Probe, Progress, Runtime, RuntimeError, Usage,
};

/// How one fake machine behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FakeScript {
    /// CPU nanoseconds added at each `sample` while the machine runs (not while frozen).
    pub cpu_ns_per_sample: u64,
    /// Memory in use reported by `sample`.
    pub memory_bytes: u64,
    /// The machine exits by itself with `code` once it has been sampled `after_samples` times
    /// while running. `None` runs until stopped.
    pub exit: Option<FakeExit>,
    /// Exit code when stopped: 143 (SIGTERM honoured) by default, 137 models a kill after grace.
    pub stop_code: i64,
}

/// A scripted self-exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FakeExit {
    pub after_samples: u32,
    pub code: i64,
}

impl Default for FakeScript {
    fn default() -> Self {
        FakeScript {
            cpu_ns_per_sample: 1_000_000_000,
            memory_bytes: 64 << 20,
            exit: None,
            stop_code: 143,
        }
    }
}

/// One call received by the fake, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum FakeCall {
    Probe,
    PrepareImage { url: String },
    Create { name: String },
    Start(String),
    Freeze(String),
    Thaw(String),
    SetLimits { name: String, limits: Limits },
    SetBackground(bool),
    State(String),
    Sample(String),
    Stop { name: String, grace: Duration },
    Remove(String),
    ListOwned,
}

impl FakeCall {
    /// The call's name as used by [`FakeRuntime::fail_next`].
    pub fn name(&self) -> &'static str {
        match self {
            FakeCall::Probe => "probe",
            FakeCall::PrepareImage { .. } => "prepare_image",
            FakeCall::Create { .. } => "create",
            FakeCall::Start(_) => "start",
            FakeCall::Freeze(_) => "freeze",
            FakeCall::Thaw(_) => "thaw",
            FakeCall::SetLimits { .. } => "set_limits",
            FakeCall::SetBackground(_) => "set_background",
            FakeCall::State(_) => "state",
            FakeCall::Sample(_) => "sample",
            FakeCall::Stop { .. } => "stop",
            FakeCall::Remove(_) => "remove",
            FakeCall::ListOwned => "list_owned",
        }
    }
}

/// A fake machine as the fake engine sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeMachine {
    pub spec: MachineSpec,
    pub state: MachineState,
    pub limits: Limits,
    pub cpu_ns: u64,
    pub peak_memory_bytes: u64,
    pub samples_running: u32,
    pub script: FakeScript,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    /// Prepended to engine ids, so two fakes standing for two engines never share an id.
    id_prefix: String,
    /// By engine id.
    machines: BTreeMap<String, FakeMachine>,
    calls: Vec<FakeCall>,
    default_script: FakeScript,
    by_name: HashMap<String, FakeScript>,
    by_type: HashMap<Digest, FakeScript>,
    /// What each url "really" serves; a url not listed serves what is asked for.
    served: HashMap<String, Digest>,
    /// Digests already "downloaded": a second prepare is a cache hit.
    cached: Vec<Digest>,
    downloads: u32,
    /// Call name -> reasons of the next failures, oldest first.
    failures: HashMap<&'static str, Vec<String>>,
}

/// The in-memory runtime.
#[derive(Debug, Default)]
pub struct FakeRuntime {
    state: Mutex<State>,
}

impl FakeRuntime {
    pub fn new() -> FakeRuntime {
        FakeRuntime::default()
    }

    /// A fake whose engine ids start with `prefix` (two fakes standing for two engines).
    pub fn with_id_prefix(prefix: &str) -> FakeRuntime {
        let f = FakeRuntime::default();
        f.lock().id_prefix = prefix.to_owned();
        f
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock has already failed; keep the data usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The script of machines with no more specific one.
    pub fn set_default_script(&self, script: FakeScript) {
        self.lock().default_script = script;
    }

    /// The script of machines of one machine type (for machines created after this call).
    pub fn script_type(&self, machine_type: Digest, script: FakeScript) {
        self.lock().by_type.insert(machine_type, script);
    }

    /// The script of the machine named `name` (wins over the type's script).
    pub fn script_machine(&self, name: &str, script: FakeScript) {
        self.lock().by_name.insert(name.to_owned(), script);
    }

    /// Makes `url` serve content hashing to `actual`, so preparing it with another digest fails.
    pub fn serve(&self, url: &str, actual: Digest) {
        self.lock().served.insert(url.to_owned(), actual);
    }

    /// The next call named `call` (see [`FakeCall::name`]) fails with `reason`.
    pub fn fail_next(&self, call: &'static str, reason: &str) {
        self.lock()
            .failures
            .entry(call)
            .or_default()
            .push(reason.to_owned());
    }

    /// Every call received so far, in order.
    pub fn calls(&self) -> Vec<FakeCall> {
        self.lock().calls.clone()
    }

    /// How many image downloads happened (cache misses).
    pub fn downloads(&self) -> u32 {
        self.lock().downloads
    }

    /// The machine with engine id or name `key`, if it exists.
    pub fn machine(&self, key: &str) -> Option<FakeMachine> {
        let s = self.lock();
        s.machines
            .get(key)
            .or_else(|| s.machines.values().find(|m| m.spec.name == key))
            .cloned()
    }

    /// Ends a running machine now with `code`, as if its workload exited.
    pub fn finish(&self, key: &str, code: i64) -> Result<(), RuntimeError> {
        let mut s = self.lock();
        let id = find(&s, key)?;
        if let Some(m) = s.machines.get_mut(&id) {
            m.state = MachineState::Exited { code: Some(code) };
        }
        Ok(())
    }

    /// Puts a machine in the engine as a previous daemon would have left it (for adoption tests).
    pub fn insert_existing(&self, spec: &MachineSpec, state: MachineState) -> MachineHandle {
        let mut s = self.lock();
        let h = new_machine(&mut s, spec);
        if let Some(m) = s.machines.get_mut(&h.engine_id) {
            m.state = state;
        }
        h
    }

    /// Puts a running machine named `name` in the engine, as a daemon that died would leave it.
    pub fn add_owned(&self, name: &str) -> MachineHandle {
        let spec = MachineSpec {
            backend: super::Backend::Container,
            machine_id: gleaner::Id16([name.len() as u8; 16]),
            machine_type: Digest([0; 32]),
            name: name.into(),
            image: None,
            kernel: None,
            initrd: None,
            cores: 1,
            limits: Limits {
                cpus: 1.0,
                memory_bytes: 1 << 30,
            },
            disk_bytes: 1 << 30,
            pids_limit: 256,
            mjf_dir: "/nonexistent".into(),
            egress: vec![],
            command: None,
            labels: BTreeMap::new(),
        };
        self.insert_existing(&spec, MachineState::Running)
    }

    /// Records `call` and returns the scripted failure for it, if any.
    fn enter(&self, call: FakeCall) -> Result<MutexGuard<'_, State>, RuntimeError> {
        let mut s = self.lock();
        let name = call.name();
        s.calls.push(call);
        if let Some(q) = s.failures.get_mut(name)
            && !q.is_empty()
        {
            let reason = q.remove(0);
            return Err(RuntimeError::Call {
                engine: EngineKind::Fake,
                call: name.into(),
                reason,
            });
        }
        Ok(s)
    }
}

fn new_machine(s: &mut State, spec: &MachineSpec) -> MachineHandle {
    s.next_id += 1;
    let engine_id = format!("{}fake-{:04}", s.id_prefix, s.next_id);
    let script = s
        .by_name
        .get(&spec.name)
        .or_else(|| s.by_type.get(&spec.machine_type))
        .copied()
        .unwrap_or(s.default_script);
    s.machines.insert(
        engine_id.clone(),
        FakeMachine {
            spec: spec.clone(),
            state: MachineState::Created,
            limits: spec.limits,
            cpu_ns: 0,
            peak_memory_bytes: 0,
            samples_running: 0,
            script,
        },
    );
    MachineHandle {
        engine_id,
        name: spec.name.clone(),
    }
}

fn find(s: &State, key: &str) -> Result<String, RuntimeError> {
    if s.machines.contains_key(key) {
        return Ok(key.to_owned());
    }
    s.machines
        .iter()
        .find(|(_, m)| m.spec.name == key)
        .map(|(id, _)| id.clone())
        .ok_or_else(|| RuntimeError::NoSuchMachine(key.to_owned()))
}

fn machine<'a>(s: &'a mut State, m: &MachineHandle) -> Result<&'a mut FakeMachine, RuntimeError> {
    s.machines
        .get_mut(&m.engine_id)
        .ok_or_else(|| RuntimeError::NoSuchMachine(m.name.clone()))
}

impl Runtime for FakeRuntime {
    fn engine(&self) -> EngineKind {
        EngineKind::Fake
    }

    async fn probe(&self) -> Result<Probe, RuntimeError> {
        drop(self.enter(FakeCall::Probe)?);
        Ok(Probe {
            engine: EngineKind::Fake,
            reachable: true,
            version: "fake 1".into(),
            kvm_usable: false,
            cgroup_version: 2,
            notes: vec!["in-memory fake".into()],
        })
    }

    async fn prepare_image(
        &self,
        source: &ImageSource,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<PreparedImage, RuntimeError> {
        let mut s = self.enter(FakeCall::PrepareImage {
            url: source.url.clone(),
        })?;
        let reference = format!("fake/{}:latest", source.sha256);
        if s.cached.contains(&source.sha256) {
            return Ok(PreparedImage {
                sha256: source.sha256,
                reference,
            });
        }
        s.downloads += 1;
        let actual = s.served.get(&source.url).copied().unwrap_or(source.sha256);
        drop(s);
        progress(Progress {
            done_bytes: 1,
            total_bytes: Some(1),
        });
        if actual != source.sha256 {
            return Err(RuntimeError::HashMismatch {
                url: source.url.clone(),
                expected: source.sha256,
                actual,
            });
        }
        self.lock().cached.push(source.sha256);
        Ok(PreparedImage {
            sha256: source.sha256,
            reference,
        })
    }

    async fn create(&self, spec: &MachineSpec) -> Result<MachineHandle, RuntimeError> {
        let mut s = self.enter(FakeCall::Create {
            name: spec.name.clone(),
        })?;
        if s.machines.values().any(|m| m.spec.name == spec.name) {
            return Err(RuntimeError::Call {
                engine: EngineKind::Fake,
                call: "create".into(),
                reason: format!("the name {} is already in use", spec.name),
            });
        }
        Ok(new_machine(&mut s, spec))
    }

    async fn start(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        let mut s = self.enter(FakeCall::Start(m.name.clone()))?;
        let fm = machine(&mut s, m)?;
        if fm.state == MachineState::Created {
            fm.state = MachineState::Running;
        }
        Ok(())
    }

    async fn freeze(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        let mut s = self.enter(FakeCall::Freeze(m.name.clone()))?;
        let fm = machine(&mut s, m)?;
        match fm.state {
            MachineState::Running | MachineState::Frozen => {
                fm.state = MachineState::Frozen;
                Ok(())
            }
            other => Err(RuntimeError::Call {
                engine: EngineKind::Fake,
                call: "freeze".into(),
                reason: format!("{} is {other:?}, not running", m.name),
            }),
        }
    }

    async fn thaw(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        let mut s = self.enter(FakeCall::Thaw(m.name.clone()))?;
        let fm = machine(&mut s, m)?;
        if fm.state == MachineState::Frozen {
            fm.state = MachineState::Running;
        }
        Ok(())
    }

    async fn set_limits(&self, m: &MachineHandle, limits: Limits) -> Result<(), RuntimeError> {
        let mut s = self.enter(FakeCall::SetLimits {
            name: m.name.clone(),
            limits,
        })?;
        machine(&mut s, m)?.limits = limits;
        Ok(())
    }

    async fn set_background(&self, on: bool) -> Result<(), RuntimeError> {
        drop(self.enter(FakeCall::SetBackground(on))?);
        Ok(())
    }

    async fn state(&self, m: &MachineHandle) -> Result<MachineState, RuntimeError> {
        let s = self.enter(FakeCall::State(m.name.clone()))?;
        Ok(s.machines
            .get(&m.engine_id)
            .map_or(MachineState::Gone, |fm| fm.state))
    }

    async fn sample(&self, m: &MachineHandle) -> Result<Usage, RuntimeError> {
        let mut s = self.enter(FakeCall::Sample(m.name.clone()))?;
        let fm = machine(&mut s, m)?;
        if fm.state == MachineState::Running {
            fm.samples_running += 1;
            // CPU time cannot outgrow the quota: a capped machine grows proportionally less.
            let cap = fm.limits.cpus.clamp(0.0, f64::from(fm.spec.cores.max(1)));
            let full = fm.script.cpu_ns_per_sample as f64;
            let grow = full.min(full * cap);
            fm.cpu_ns = fm.cpu_ns.saturating_add(grow as u64);
            fm.peak_memory_bytes = fm.peak_memory_bytes.max(fm.script.memory_bytes);
            if let Some(exit) = fm.script.exit
                && fm.samples_running >= exit.after_samples
            {
                fm.state = MachineState::Exited {
                    code: Some(exit.code),
                };
            }
        }
        let memory_bytes = match fm.state {
            MachineState::Running | MachineState::Frozen => fm.script.memory_bytes,
            _ => 0,
        };
        Ok(Usage {
            cpu_ns: fm.cpu_ns,
            memory_bytes,
            peak_memory_bytes: fm.peak_memory_bytes,
        })
    }

    async fn stop(&self, m: &MachineHandle, grace: Duration) -> Result<MachineState, RuntimeError> {
        let mut s = self.enter(FakeCall::Stop {
            name: m.name.clone(),
            grace,
        })?;
        let Some(fm) = s.machines.get_mut(&m.engine_id) else {
            return Ok(MachineState::Gone);
        };
        fm.state = match fm.state {
            MachineState::Running | MachineState::Frozen => MachineState::Exited {
                code: Some(fm.script.stop_code),
            },
            MachineState::Created => MachineState::Exited { code: None },
            other => other,
        };
        Ok(fm.state)
    }

    async fn remove(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        let mut s = self.enter(FakeCall::Remove(m.name.clone()))?;
        s.machines.remove(&m.engine_id);
        Ok(())
    }

    async fn list_owned(&self) -> Result<Vec<OwnedMachine>, RuntimeError> {
        let s = self.enter(FakeCall::ListOwned)?;
        Ok(s.machines
            .iter()
            .map(|(id, m)| OwnedMachine {
                engine_id: id.clone(),
                name: m.spec.name.clone(),
                machine_id: Some(m.spec.machine_id),
                machine_type: Some(m.spec.machine_type),
                state: m.state,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gleaner::Id16;

    fn spec(name: &str, ty: u8) -> MachineSpec {
        MachineSpec {
            backend: crate::runtime::Backend::Container,
            machine_id: Id16([ty; 16]),
            machine_type: Digest([ty; 32]),
            name: name.into(),
            image: None,
            kernel: None,
            initrd: None,
            cores: 2,
            limits: Limits {
                cpus: 2.0,
                memory_bytes: 1 << 30,
            },
            disk_bytes: 1 << 30,
            pids_limit: 256,
            mjf_dir: "/nonexistent".into(),
            egress: vec![],
            command: None,
            labels: BTreeMap::new(),
        }
    }

    #[tokio::test]
    async fn lifecycle_is_recorded_and_deterministic() {
        let rt = FakeRuntime::new();
        let h = rt.create(&spec("a", 1)).await.unwrap();
        assert_eq!(rt.state(&h).await.unwrap(), MachineState::Created);
        rt.start(&h).await.unwrap();
        assert_eq!(rt.sample(&h).await.unwrap().cpu_ns, 1_000_000_000);
        rt.freeze(&h).await.unwrap();
        // Frozen: CPU time does not grow.
        assert_eq!(rt.sample(&h).await.unwrap().cpu_ns, 1_000_000_000);
        rt.thaw(&h).await.unwrap();
        // Half a core of quota on a full-core script: half the growth.
        let half = Limits {
            cpus: 0.5,
            memory_bytes: 1 << 30,
        };
        rt.set_limits(&h, half).await.unwrap();
        assert_eq!(rt.sample(&h).await.unwrap().cpu_ns, 1_500_000_000);
        assert_eq!(
            rt.stop(&h, Duration::from_secs(3)).await.unwrap(),
            MachineState::Exited { code: Some(143) }
        );
        assert_eq!(rt.list_owned().await.unwrap().len(), 1);
        rt.remove(&h).await.unwrap();
        assert_eq!(rt.state(&h).await.unwrap(), MachineState::Gone);
        assert!(rt.list_owned().await.unwrap().is_empty());
        let names: Vec<&str> = rt.calls().iter().map(FakeCall::name).collect();
        assert_eq!(
            names,
            [
                "create",
                "state",
                "start",
                "sample",
                "freeze",
                "sample",
                "thaw",
                "set_limits",
                "sample",
                "stop",
                "list_owned",
                "remove",
                "state",
                "list_owned"
            ]
        );
        assert!(rt.calls().contains(&FakeCall::SetLimits {
            name: "a".into(),
            limits: half
        }));
    }

    #[tokio::test]
    async fn scripts_pick_exit_codes_by_name_then_type() {
        let rt = FakeRuntime::new();
        rt.script_type(
            Digest([2; 32]),
            FakeScript {
                exit: Some(FakeExit {
                    after_samples: 2,
                    code: 3,
                }),
                ..FakeScript::default()
            },
        );
        rt.script_machine(
            "special",
            FakeScript {
                cpu_ns_per_sample: 7,
                exit: Some(FakeExit {
                    after_samples: 1,
                    code: 0,
                }),
                ..FakeScript::default()
            },
        );
        let a = rt.create(&spec("by-type", 2)).await.unwrap();
        let b = rt.create(&spec("special", 2)).await.unwrap();
        let c = rt.create(&spec("plain", 9)).await.unwrap();
        for h in [&a, &b, &c] {
            rt.start(h).await.unwrap();
        }
        rt.sample(&a).await.unwrap();
        assert_eq!(rt.state(&a).await.unwrap(), MachineState::Running);
        rt.sample(&a).await.unwrap();
        assert_eq!(
            rt.state(&a).await.unwrap(),
            MachineState::Exited { code: Some(3) }
        );
        assert_eq!(rt.sample(&b).await.unwrap().cpu_ns, 7);
        assert_eq!(
            rt.state(&b).await.unwrap(),
            MachineState::Exited { code: Some(0) }
        );
        for _ in 0..10 {
            rt.sample(&c).await.unwrap();
        }
        assert_eq!(rt.state(&c).await.unwrap(), MachineState::Running);
        rt.finish("plain", 42).unwrap();
        assert_eq!(
            rt.state(&c).await.unwrap(),
            MachineState::Exited { code: Some(42) }
        );
        // Names are unique, as in a real engine.
        assert!(rt.create(&spec("plain", 9)).await.is_err());
    }

    #[tokio::test]
    async fn images_verify_cache_and_failures_are_injected() {
        let rt = FakeRuntime::new();
        let good = ImageSource {
            backend: crate::runtime::Backend::Container,
            url: "http://x/good.tar".into(),
            sha256: Digest([1; 32]),
        };
        rt.prepare_image(&good, &|_| {}).await.unwrap();
        rt.prepare_image(&good, &|_| {}).await.unwrap();
        assert_eq!(rt.downloads(), 1, "the second prepare is a cache hit");
        rt.serve("http://x/bad.tar", Digest([9; 32]));
        let bad = ImageSource {
            backend: crate::runtime::Backend::Container,
            url: "http://x/bad.tar".into(),
            sha256: Digest([2; 32]),
        };
        let err = rt.prepare_image(&bad, &|_| {}).await.unwrap_err();
        assert!(matches!(err, RuntimeError::HashMismatch { .. }), "{err}");
        // A mismatch is not cached: a retry downloads again.
        assert!(rt.prepare_image(&bad, &|_| {}).await.is_err());
        assert_eq!(rt.downloads(), 3);

        rt.fail_next("start", "engine on fire");
        let h = rt.create(&spec("f", 1)).await.unwrap();
        let err = rt.start(&h).await.unwrap_err();
        assert_eq!(err.to_string(), "Fake call start failed: engine on fire");
        rt.start(&h).await.unwrap();
        assert_eq!(rt.state(&h).await.unwrap(), MachineState::Running);
    }
}
