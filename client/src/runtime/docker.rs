//! Containers on the Docker Engine through bollard: hardened by default (no privileges, every
//! capability dropped, no new privileges, read-only root, pids/memory/CPU limits, no network unless
//! the signed egress policy allows it and then only to what it lists (see `egress.rs`), an
//! unprivileged user), MJF bind mounts in Vac's layout, and images loaded only after their sha256
//! has been verified (see `image.rs`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, ContainerStateStatusEnum, ContainerUpdateBody, HostConfig, Mount,
    MountType, NetworkCreateRequest, SystemInfoCgroupDriverEnum, SystemInfoCgroupVersionEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, InspectNetworkOptions, KillContainerOptionsBuilder,
    ListContainersOptionsBuilder, ListNetworksOptionsBuilder, RemoveContainerOptionsBuilder,
    StatsOptionsBuilder, StopContainerOptionsBuilder,
};
use futures_util::StreamExt;
use gleaner::{Digest, Id16};

use super::egress::{self, EgressNames, Firewall, Iptables, Plan, SystemResolver};
use super::freezer::CgroupFreezer;
use super::image::ImageStore;
pub use super::image::image_tag;
use super::{
    EngineKind, ImageSource, Limits, MACHINE_ID_LABEL, MACHINE_TYPE_LABEL, MachineHandle,
    MachineSpec, MachineState, OWNER_LABEL, OwnedMachine, PreparedImage, Probe, Progress, Runtime,
    RuntimeError, Usage,
};

/// The user the workload runs as inside the container (nobody:nogroup): never root, even with
/// every capability dropped.
pub const WORKLOAD_USER: &str = "65534:65534";

/// The smallest CPU quota the engine accepts (0.01 core).
const MIN_NANO_CPUS: i64 = 10_000_000;

/// The Docker Engine backend.
#[derive(Debug, Clone)]
pub struct DockerRuntime {
    docker: Docker,
    images: ImageStore,
    /// The value of the ownership label: distinguishes daemons sharing one engine (tests, demo).
    owner: String,
    /// The user the workload runs as inside the container.
    user: String,
    /// Where the rules enforcing egress policies go.
    firewall: Arc<dyn Firewall>,
    /// The cgroup parent of our containers for the engine's cgroup driver, learnt at first use.
    cgroup_parent: tokio::sync::OnceCell<String>,
    /// Whether guests should run in the background (idle class), as the enforcer last asked.
    background: Arc<AtomicBool>,
    /// Freeze through the container's own cgroup (the kernel's freezer, no engine call) rather
    /// than `docker pause` (dockerd → containerd → a runc process: tens of ms, a tail of hundreds
    /// on a busy host). On by default; `docker pause` stays the fallback.
    cgroup_freeze: bool,
}

/// How long a cgroup freeze may take to stop every task before the engine's pause is tried.
const FREEZE_DEADLINE: Duration = Duration::from_secs(1);

fn call(call: &'static str) -> impl FnOnce(bollard::errors::Error) -> RuntimeError {
    move |e| RuntimeError::Call {
        engine: EngineKind::Docker,
        call: call.into(),
        reason: e.to_string(),
    }
}

fn is_status(e: &bollard::errors::Error, code: u16) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError { status_code, .. } if *status_code == code
    )
}

/// How many times a freeze is asked of the engine before its refusal is the answer.
const FREEZE_TRIES: u32 = 3;

/// Whether a `docker pause` failed only because runc's freezer timed out (the task did not reach
/// the freezer in time): the container still runs and asking again can succeed.
fn freeze_gave_up(message: &str) -> bool {
    message.contains("unable to freeze") || message.contains("freezer.state")
}

fn is_not_found(e: &bollard::errors::Error) -> bool {
    is_status(e, 404)
}

/// The engine's CPU quota for `cpus` cores; zero would mean "unlimited" to the engine, so a
/// non-positive or non-finite quota is refused rather than passed on.
pub fn nano_cpus(cpus: f64) -> Result<i64, RuntimeError> {
    if !cpus.is_finite() || cpus <= 0.0 {
        return Err(RuntimeError::Unsupported(format!(
            "a cpu quota of {cpus} cores is not a limit"
        )));
    }
    Ok(((cpus * 1e9).round() as i64).max(MIN_NANO_CPUS))
}

fn memory_limit(bytes: u64) -> Result<i64, RuntimeError> {
    // The engine refuses less than 6 MiB; zero would mean unlimited.
    if bytes < 6 << 20 {
        return Err(RuntimeError::Unsupported(format!(
            "a memory limit of {bytes} bytes is below the engine's 6 MiB minimum"
        )));
    }
    i64::try_from(bytes)
        .map_err(|_| RuntimeError::Unsupported(format!("a memory limit of {bytes} bytes")))
}

impl DockerRuntime {
    /// Connects to the local engine's unix socket (`DOCKER_HOST` if set to a unix socket) and
    /// negotiates the API version. `owner` labels everything this runtime makes; `cache_dir` and
    /// `quota_bytes` bound the image tarball cache.
    pub async fn connect(
        owner: &str,
        cache_dir: PathBuf,
        quota_bytes: u64,
    ) -> Result<DockerRuntime, RuntimeError> {
        let unreachable = |e: bollard::errors::Error| RuntimeError::Unreachable {
            engine: EngineKind::Docker,
            reason: format!("{e} (is dockerd running and may this user use /var/run/docker.sock?)"),
        };
        let docker = Docker::connect_with_unix_defaults().map_err(unreachable)?;
        let docker = docker.negotiate_version().await.map_err(unreachable)?;
        Ok(DockerRuntime::with_parts(
            docker,
            owner,
            ImageStore::new(cache_dir, quota_bytes)?,
        ))
    }

    /// A runtime over an already connected engine client and image store.
    pub fn with_parts(docker: Docker, owner: &str, images: ImageStore) -> DockerRuntime {
        DockerRuntime {
            docker,
            images,
            owner: owner.to_owned(),
            user: WORKLOAD_USER.into(),
            firewall: Arc::new(Iptables::default()),
            cgroup_parent: tokio::sync::OnceCell::new(),
            background: Arc::new(AtomicBool::new(false)),
            cgroup_freeze: true,
        }
    }

    /// The same runtime freezing through the kernel's cgroup freezer (`true`, the default) or
    /// only through `docker pause` (`false`: the benchmark's comparison, or a host whose cgroup
    /// layout the runtime does not know).
    pub fn with_cgroup_freeze(mut self, on: bool) -> DockerRuntime {
        self.cgroup_freeze = on;
        self
    }

    /// The freezer of container `id`'s own cgroup, if this process can see it.
    async fn freezer(&self, id: &str) -> Option<CgroupFreezer> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let parent = self.cgroup_parent().await.ok();
        container_cgroups(parent, id)
            .iter()
            .find_map(|sub| CgroupFreezer::at(sub))
    }

    /// Whether the engine itself paused the container (`docker pause`), by its own books.
    async fn engine_paused(&self, m: &MachineHandle) -> Result<bool, RuntimeError> {
        match self.docker.inspect_container(&m.engine_id, None).await {
            Ok(i) => Ok(i.state.and_then(|s| s.paused).unwrap_or(false)),
            Err(e) if is_not_found(&e) => Err(RuntimeError::NoSuchMachine(m.name.clone())),
            Err(e) => Err(call("inspect container")(e)),
        }
    }

    /// The same runtime with its egress rules going to `firewall` (tests).
    pub fn with_firewall(mut self, firewall: Arc<dyn Firewall>) -> DockerRuntime {
        self.firewall = firewall;
        self
    }

    /// The engine client, for tests and diagnostics.
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// The image cache.
    pub fn images(&self) -> &ImageStore {
        &self.images
    }

    /// The parent cgroup of this runtime's containers below the hierarchy's root, by the engine's
    /// cgroup driver: `gleaner-<owner>` (cgroupfs; one per daemon, so daemons sharing an engine do
    /// not change each other's guests) or `gleaner.slice` (systemd, where a dash means nesting).
    async fn cgroup_parent(&self) -> Result<&str, RuntimeError> {
        self.cgroup_parent
            .get_or_try_init(|| async {
                let info = self.docker.info().await.map_err(call("info"))?;
                Ok(
                    if info.cgroup_driver == Some(SystemInfoCgroupDriverEnum::SYSTEMD) {
                        "gleaner.slice".to_owned()
                    } else {
                        cgroup_parent_name(&self.owner)
                    },
                )
            })
            .await
            .map(String::as_str)
    }

    /// Marks the guests' parent cgroup idle or back to normal weight. Best effort: an older kernel (before 5.15) or a parent not made yet leaves guests at
    /// normal weight, bounded by their quotas all the same.
    async fn apply_class(&self, idle: bool) {
        let Ok(parent) = self.cgroup_parent().await else {
            return;
        };
        if let Err(e) = cgroup_set_cpu_idle(parent, idle) {
            tracing::debug!("guests' cgroup {parent}: cpu.idle not set to {idle}: {e}");
        }
    }

    /// The value of the ownership label on everything this runtime makes.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    fn labels(&self, spec: &MachineSpec) -> HashMap<String, String> {
        let mut labels: HashMap<String, String> = spec.labels.clone().into_iter().collect();
        // The ownership labels are set last so that spec.labels cannot forge them.
        labels.insert(OWNER_LABEL.into(), self.owner.clone());
        labels.insert(MACHINE_ID_LABEL.into(), spec.machine_id.to_string());
        labels.insert(MACHINE_TYPE_LABEL.into(), spec.machine_type.to_string());
        labels
    }

    async fn kill(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        let opts = KillContainerOptionsBuilder::default()
            .signal("SIGKILL")
            .build();
        match self.docker.kill_container(&m.engine_id, Some(opts)).await {
            Ok(()) => Ok(()),
            // 404: gone; 409: not running. Either way it is not running any more.
            Err(e) if is_not_found(&e) || is_status(&e, 409) => Ok(()),
            Err(e) => Err(call("kill container")(e)),
        }
    }

    /// Makes the machine's own bridge network and the rules that let it reach only `allowed`.
    /// The network exists before its rules and outlives them (see `remove_egress`), so a crash
    /// at any point leaves a network by which the rest is found.
    async fn make_egress(
        &self,
        spec: &MachineSpec,
        names: &EgressNames,
        allowed: &[egress::Allowed],
    ) -> Result<(), RuntimeError> {
        // A network left by a crash under the same name goes first, with its rules.
        self.remove_egress(names).await?;
        let labels = HashMap::from([
            (OWNER_LABEL.to_string(), self.owner.clone()),
            (MACHINE_ID_LABEL.to_string(), spec.machine_id.to_string()),
        ]);
        let request = NetworkCreateRequest {
            name: names.network.clone(),
            driver: Some("bridge".into()),
            options: Some(HashMap::from([(
                "com.docker.network.bridge.name".to_string(),
                names.bridge.clone(),
            )])),
            labels: Some(labels),
            ..Default::default()
        };
        self.docker
            .create_network(request)
            .await
            .map_err(call("create network"))?;
        if let Err(e) = self.firewall.apply(names, allowed).await {
            let _ = self.remove_egress(names).await;
            return Err(e);
        }
        Ok(())
    }

    /// Removes a machine's egress rules, then its network; nothing there is not an error.
    async fn remove_egress(&self, names: &EgressNames) -> Result<(), RuntimeError> {
        match self
            .docker
            .inspect_network(&names.network, None::<InspectNetworkOptions>)
            .await
        {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => return Ok(()),
            Err(e) => return Err(call("inspect network")(e)),
        }
        self.firewall.remove(names).await?;
        match self.docker.remove_network(&names.network).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(call("remove network")(e)),
        }
    }

    /// Removes the egress networks (and their rules) this runtime owns that no machine uses any
    /// more: what a crash between making a network and its container leaves. `gleaner cleanup`
    /// runs it after removing the machines. Returns the networks removed.
    pub async fn remove_stray_egress(&self) -> Result<Vec<String>, RuntimeError> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{OWNER_LABEL}={}", self.owner)],
        )]);
        let networks = self
            .docker
            .list_networks(Some(
                ListNetworksOptionsBuilder::default()
                    .filters(&filters)
                    .build(),
            ))
            .await
            .map_err(call("list networks"))?;
        let machines: Vec<String> = self
            .list_owned()
            .await?
            .into_iter()
            .map(|m| m.name)
            .collect();
        let mut removed = Vec::new();
        for n in networks {
            let Some(name) = n.name else { continue };
            let Some(names) = EgressNames::for_network(&name) else {
                continue;
            };
            if machines
                .iter()
                .any(|m| EgressNames::for_machine(m) == names)
            {
                continue;
            }
            self.remove_egress(&names).await?;
            removed.push(name);
        }
        Ok(removed)
    }
}

/// The smallest writable scratch a container gets, whatever the machine type asks for.
const MIN_SCRATCH: u64 = 16 << 20;

/// The host configuration of a hardened container for `spec`, attached to `network` ("none",
/// "bridge" or the machine's own egress network) with `extra_hosts` ("name:ip") in /etc/hosts.
pub fn host_config(
    spec: &MachineSpec,
    network: &str,
    extra_hosts: Vec<String>,
) -> Result<HostConfig, RuntimeError> {
    let mjf = &spec.mjf_dir;
    // Mounts, not "src:dst:mode" binds: a host path holding ':' or ',' cannot be misread, and a
    // missing source is an error instead of an empty directory the engine makes.
    let bind = |sub: &str, target: &str, read_only: bool| Mount {
        target: Some(target.into()),
        source: Some(mjf.join(sub).display().to_string()),
        typ: Some(MountType::BIND),
        read_only: Some(read_only),
        ..Default::default()
    };
    // The root is read-only; the machine type's disk becomes a size-limited tmpfs at /scratch
    // and a quarter of it at /tmp. Both count against the memory limit.
    let scratch = spec.disk_bytes.max(MIN_SCRATCH);
    let memory = memory_limit(spec.limits.memory_bytes)?;
    Ok(HostConfig {
        privileged: Some(false),
        cap_drop: Some(vec!["ALL".into()]),
        security_opt: Some(vec!["no-new-privileges".into()]),
        readonly_rootfs: Some(true),
        tmpfs: Some(HashMap::from([
            // Writable by the unprivileged workload user; /tmp keeps the engine's noexec,
            // /scratch is where a job unpacks and runs what it fetched.
            (
                "/tmp".into(),
                format!("rw,noexec,nosuid,nodev,mode=1777,size={}", scratch / 4),
            ),
            (
                "/scratch".into(),
                format!("rw,exec,nosuid,nodev,mode=1777,size={scratch}"),
            ),
        ])),
        pids_limit: Some(i64::from(spec.pids_limit.max(1))),
        memory: Some(memory),
        // Swap equal to memory: no swap at all, so the limit holds and a hog meets the OOM killer.
        memory_swap: Some(memory),
        nano_cpus: Some(nano_cpus(spec.limits.cpus)?),
        network_mode: Some(network.into()),
        extra_hosts: (!extra_hosts.is_empty()).then_some(extra_hosts),
        mounts: Some(vec![
            bind("machinefeatures", "/machinefeatures", true),
            bind("jobfeatures", "/jobfeatures", true),
            bind("joboutputs", "/joboutputs", false),
            bind("user_data", "/user_data", true),
        ]),
        // An init reaps the workload's orphans and forwards SIGTERM, so a graceful stop works
        // for scripts that do not handle signals themselves.
        init: Some(true),
        ..Default::default()
    })
}

/// The container configuration (image, command, environment, labels) for `spec`.
fn container_body(
    spec: &MachineSpec,
    user: &str,
    labels: HashMap<String, String>,
    host_config: HostConfig,
) -> Result<ContainerCreateBody, RuntimeError> {
    let image = spec
        .image
        .as_ref()
        .ok_or_else(|| RuntimeError::Unsupported("a container needs an image".into()))?;
    Ok(ContainerCreateBody {
        image: Some(image.reference.clone()),
        cmd: spec.command.clone(),
        user: Some(user.to_owned()),
        // No working directory at /scratch: the engine would create it 0755 root in the image
        // layer and the tmpfs would copy that mode up, leaving it unwritable for the workload.
        // The HEPiX machine/job features convention: the environment names the folders.
        env: Some(vec![
            "MACHINEFEATURES=/machinefeatures".into(),
            "JOBFEATURES=/jobfeatures".into(),
            "JOBOUTPUTS=/joboutputs".into(),
            "USER_DATA=/user_data".into(),
            "SCRATCH=/scratch".into(),
            format!("GLEANER_MACHINE_ID={}", spec.machine_id),
        ]),
        labels: Some(labels),
        network_disabled: Some(host_config.network_mode.as_deref() == Some("none")),
        host_config: Some(host_config),
        ..Default::default()
    })
}

fn parse_state(status: Option<ContainerStateStatusEnum>, code: Option<i64>) -> MachineState {
    match status {
        Some(ContainerStateStatusEnum::CREATED) => MachineState::Created,
        Some(ContainerStateStatusEnum::PAUSED) => MachineState::Frozen,
        Some(ContainerStateStatusEnum::EXITED | ContainerStateStatusEnum::DEAD) => {
            MachineState::Exited { code }
        }
        Some(ContainerStateStatusEnum::REMOVING) => MachineState::Gone,
        _ => MachineState::Running,
    }
}

impl Runtime for DockerRuntime {
    fn engine(&self) -> EngineKind {
        EngineKind::Docker
    }

    async fn probe(&self) -> Result<Probe, RuntimeError> {
        let v = self.docker.version().await.map_err(call("version"))?;
        let info = self.docker.info().await.map_err(call("info"))?;
        let cgroup_version = match info.cgroup_version {
            Some(SystemInfoCgroupVersionEnum::_2) => 2,
            _ => 1,
        };
        let mut notes = vec![format!(
            "cgroup driver {}",
            info.cgroup_driver
                .map(|d| d.to_string())
                .unwrap_or_else(|| "unknown".into())
        )];
        if let Some(sec) = info.security_options {
            notes.push(format!("security options: {}", sec.join(", ")));
        }
        if cgroup_version == 1 {
            notes.push("cgroup v1: peak memory is the engine's max_usage".into());
        }
        Ok(Probe {
            engine: EngineKind::Docker,
            reachable: true,
            version: format!(
                "{} (API {}, negotiated {})",
                v.version.unwrap_or_default(),
                v.api_version.unwrap_or_default(),
                self.docker.client_version()
            ),
            kvm_usable: false,
            cgroup_version,
            notes,
        })
    }

    async fn prepare_image(
        &self,
        source: &ImageSource,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<PreparedImage, RuntimeError> {
        self.images.prepare(&self.docker, source, progress).await
    }

    async fn create(&self, spec: &MachineSpec) -> Result<MachineHandle, RuntimeError> {
        let names = EgressNames::for_machine(&spec.name);
        let (network, extra_hosts) = match egress::plan(&spec.egress, &SystemResolver).await? {
            Plan::None => ("none".to_string(), vec![]),
            Plan::Any => ("bridge".to_string(), vec![]),
            Plan::Filtered { allowed, hosts } => {
                self.make_egress(spec, &names, &allowed).await?;
                let hosts = hosts.iter().map(|(h, a)| format!("{h}:{a}")).collect();
                (names.network.clone(), hosts)
            }
        };
        let made = async {
            let mut hc = host_config(spec, &network, extra_hosts)?;
            // Every guest under one parent cgroup per daemon, which `set_background` marks idle
            // for the CPU scheduler while the owner is at the machine.
            let parent = self.cgroup_parent().await?;
            hc.cgroup_parent = Some(if parent.ends_with(".slice") {
                parent.to_owned()
            } else {
                format!("/{parent}")
            });
            let body = container_body(spec, &self.user, self.labels(spec), hc)?;
            self.docker
                .create_container(
                    Some(
                        CreateContainerOptionsBuilder::default()
                            .name(&spec.name)
                            .build(),
                    ),
                    body,
                )
                .await
                .map_err(call("create container"))
        }
        .await;
        let r = match made {
            Ok(r) => r,
            Err(e) => {
                // No container means nothing will remove the network: do it now.
                let _ = self.remove_egress(&names).await;
                return Err(e);
            }
        };
        Ok(MachineHandle {
            engine_id: r.id,
            name: spec.name.clone(),
        })
    }

    async fn start(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        match self.docker.start_container(&m.engine_id, None).await {
            Ok(()) => {
                // A guest started while the others are in the background joins them there (the
                // parent cgroup exists only once the engine made a first container in it).
                if self.background.load(Ordering::SeqCst) {
                    self.apply_class(true).await;
                }
                Ok(())
            }
            Err(e) if is_not_found(&e) => Err(RuntimeError::NoSuchMachine(m.name.clone())),
            Err(e) => Err(call("start container")(e)),
        }
    }

    async fn freeze(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        // A task freezes only when it next runs, and an idle-class guest on a busy host may not
        // run for a second or more: the engine then gives up ("unable to freeze"). So guests in
        // the background go back to normal weight first (one cgroup write, no engine call);
        // frozen, they take no CPU either way. Guests at normal weight — the owner away, the
        // case of an owner returning — skip this: nothing stands before the pause.
        // The mark is read, not remembered: a daemon that crashed may have left it set.
        if let Ok(p) = self.cgroup_parent().await
            && cgroup_cpu_idle(p) == Some(true)
        {
            self.apply_class(false).await;
        }
        // The instant way first: the kernel's freezer on the container's own cgroup. A container
        // frozen already (by us, or by the engine's pause) stays so.
        if self.cgroup_freeze
            && let Some(f) = self.freezer(&m.engine_id).await
        {
            if f.is_frozen() {
                return Ok(());
            }
            match f.freeze(FREEZE_DEADLINE).await {
                Ok(()) => return Ok(()),
                Err(e) => tracing::warn!("{}: cgroup freeze failed, pausing: {e}", m.name),
            }
        }
        // runc gives up on a freeze after a bounded wait when a task does not reach the freezer
        // in time (a heavily loaded host): the container is left running, so try again a few
        // times, briefly, rather than leave the owner's machine to a running guest.
        let mut tries = 0;
        loop {
            tries += 1;
            match self.docker.pause_container(&m.engine_id).await {
                Ok(()) => return Ok(()),
                // Already paused is what we wanted.
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 409,
                    message,
                }) if message.contains("already paused") => return Ok(()),
                Err(e) if is_not_found(&e) => {
                    return Err(RuntimeError::NoSuchMachine(m.name.clone()));
                }
                Err(bollard::errors::Error::DockerResponseServerError { message, .. })
                    if tries < FREEZE_TRIES && freeze_gave_up(&message) =>
                {
                    tracing::warn!(machine = %m.name, tries, "docker pause gave up ({message}); trying again");
                    tokio::time::sleep(Duration::from_millis(20 * tries as u64)).await;
                }
                Err(e) => return Err(call("pause container")(e)),
            }
        }
    }

    async fn thaw(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        // A freeze of ours (or one a crashed daemon left) is undone through the cgroup; one the
        // engine made (the fallback) through the engine, or its books would still say paused.
        if let Some(f) = self.freezer(&m.engine_id).await
            && f.is_freezing()
            && !self.engine_paused(m).await?
        {
            return f.thaw().map_err(|reason| RuntimeError::Call {
                engine: EngineKind::Docker,
                call: "thaw container cgroup".into(),
                reason,
            });
        }
        match self.docker.unpause_container(&m.engine_id).await {
            Ok(()) => Ok(()),
            // 409, or 500 when the engine's own pause was still settling: either way it runs.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409 | 500,
                message,
            }) if message.contains("not paused") => Ok(()),
            Err(e) if is_not_found(&e) => Err(RuntimeError::NoSuchMachine(m.name.clone())),
            Err(e) => Err(call("unpause container")(e)),
        }
    }

    async fn set_background(&self, on: bool) -> Result<(), RuntimeError> {
        self.background.store(on, Ordering::SeqCst);
        // Written every time (once per change of the owner's decision): a mark left by a daemon
        // that crashed is corrected at the first decision.
        self.apply_class(on).await;
        Ok(())
    }

    async fn set_limits(&self, m: &MachineHandle, limits: Limits) -> Result<(), RuntimeError> {
        let memory = memory_limit(limits.memory_bytes)?;
        let body = ContainerUpdateBody {
            nano_cpus: Some(nano_cpus(limits.cpus)?),
            memory: Some(memory),
            memory_swap: Some(memory),
            ..Default::default()
        };
        match self.docker.update_container(&m.engine_id, body).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Err(RuntimeError::NoSuchMachine(m.name.clone())),
            Err(e) => Err(call("update container")(e)),
        }
    }

    async fn state(&self, m: &MachineHandle) -> Result<MachineState, RuntimeError> {
        let info = match self.docker.inspect_container(&m.engine_id, None).await {
            Ok(i) => i,
            Err(e) if is_not_found(&e) => return Ok(MachineState::Gone),
            Err(e) => return Err(call("inspect container")(e)),
        };
        let state = info.state.unwrap_or_default();
        match parse_state(state.status, state.exit_code) {
            // The engine sees a container frozen through its cgroup as running.
            MachineState::Running if self.cgroup_frozen(&m.engine_id).await => {
                Ok(MachineState::Frozen)
            }
            s => Ok(s),
        }
    }

    async fn sample(&self, m: &MachineHandle) -> Result<Usage, RuntimeError> {
        // The kernel's own accounting straight from the container's cgroup v1 (the numbers the
        // stats API reports): no engine round trip, so the factory and the owner enforcer, which
        // sample every tick, never wait on the engine.
        if let Some(u) = cgroup_v1_usage(self.cgroup_parent.get().map(String::as_str), &m.engine_id)
        {
            return Ok(u);
        }
        // One-shot stats (API 1.41+): the engine reads the cgroup once instead of waiting a
        // second for a second reading to compute a percentage we do not need.
        let opts = StatsOptionsBuilder::default()
            .stream(false)
            .one_shot(true)
            .build();
        let mut stats = self.docker.stats(&m.engine_id, Some(opts));
        let s = match stats.next().await {
            Some(Ok(s)) => s,
            Some(Err(e)) if is_not_found(&e) => {
                return Err(RuntimeError::NoSuchMachine(m.name.clone()));
            }
            Some(Err(e)) => return Err(call("container stats")(e)),
            None => return Err(RuntimeError::NoSuchMachine(m.name.clone())),
        };
        let cpu_ns = s
            .cpu_stats
            .and_then(|c| c.cpu_usage)
            .and_then(|u| u.total_usage)
            .unwrap_or(0);
        let mem = s.memory_stats.unwrap_or_default();
        let usage = mem.usage.unwrap_or(0);
        // Like `docker stats`, memory in use excludes reclaimable page cache (inactive files).
        let cache = mem
            .stats
            .as_ref()
            .and_then(|st| {
                st.get("total_inactive_file")
                    .or_else(|| st.get("inactive_file"))
            })
            .copied()
            .unwrap_or(0);
        // Peak: cgroup v1 engines report the high-water mark as max_usage; cgroup v2 engines
        // leave it out, so it is read from the cgroup's memory.peak (kernel 5.19+) when this
        // process can see it, else the current usage stands in (the factory keeps its maximum).
        let peak = mem
            .max_usage
            .or_else(|| {
                cgroup_memory_peak(self.cgroup_parent.get().map(String::as_str), &m.engine_id)
            })
            .unwrap_or(usage);
        Ok(Usage {
            cpu_ns,
            memory_bytes: usage.saturating_sub(cache),
            peak_memory_bytes: peak,
        })
    }

    async fn stop(&self, m: &MachineHandle, grace: Duration) -> Result<MachineState, RuntimeError> {
        // A frozen container cannot handle SIGTERM: thaw it first so it can shut down cleanly.
        if let Ok(MachineState::Frozen) = self.state(m).await {
            self.thaw(m).await?;
        }
        // The engine sends the stop signal, waits `t` seconds, then SIGKILL. Its unit is whole
        // seconds, so a sub-second grace rounds up to one.
        let t = grace.as_secs_f64().ceil().clamp(1.0, 3600.0) as i32;
        match self
            .docker
            .stop_container(
                &m.engine_id,
                Some(StopContainerOptionsBuilder::default().t(t).build()),
            )
            .await
        {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => return Ok(MachineState::Gone),
            // 304: already stopped.
            Err(e) if is_status(&e, 304) => {}
            Err(e) => return Err(call("stop container")(e)),
        }
        match self.state(m).await? {
            // The engine gave up waiting (its HTTP call can time out first): kill it ourselves.
            MachineState::Running | MachineState::Frozen => {
                self.kill(m).await?;
                self.state(m).await
            }
            s => Ok(s),
        }
    }

    async fn remove(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        // A task frozen through its cgroup cannot die (cgroup v1): thaw a freeze of ours first,
        // so the engine's SIGKILL ends it. The engine handles its own pause itself.
        if self.cgroup_frozen(&m.engine_id).await {
            let _ = self.thaw(m).await;
        }
        // Force: kills a running container; v: deletes its anonymous volumes too.
        let opts = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        match self.docker.remove_container(&m.engine_id, Some(opts)).await {
            Ok(()) => {
                // The engine leaves the parent cgroup behind: remove it once it holds no guest
                // (removing a cgroup that still has children fails, harmlessly). The engine may
                // answer before its shim has removed the container's own cgroup: wait a little
                // for that one, never for other guests'.
                if let Some(p) = self.cgroup_parent.get().filter(|p| !p.ends_with(".slice")) {
                    for _ in 0..20 {
                        if cgroup_remove_parent(p) || cgroup_has_other_children(p, &m.engine_id) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            Err(e) if is_not_found(&e) => {}
            // 409 "removal already in progress": another call is removing it, and its network.
            Err(e) if is_status(&e, 409) => return Ok(()),
            Err(e) => return Err(call("remove container")(e)),
        }
        // The machine's egress network and rules, if its policy made them.
        self.remove_egress(&EgressNames::for_machine(&m.name)).await
    }

    async fn remove_strays(&self) -> Result<Vec<String>, RuntimeError> {
        self.remove_stray_egress().await
    }

    async fn list_owned(&self) -> Result<Vec<OwnedMachine>, RuntimeError> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{OWNER_LABEL}={}", self.owner)],
        )]);
        let list = self
            .docker
            .list_containers(Some(
                ListContainersOptionsBuilder::default()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await
            .map_err(call("list containers"))?;
        let mut owned: Vec<OwnedMachine> = list
            .into_iter()
            .map(|c| {
                let labels = c.labels.unwrap_or_default();
                let state = match c.state.map(|s| s.to_string()).as_deref() {
                    Some("paused") => MachineState::Frozen,
                    Some("running" | "restarting") => MachineState::Running,
                    Some("created") => MachineState::Created,
                    Some("exited" | "dead") => MachineState::Exited { code: None },
                    _ => MachineState::Gone,
                };
                OwnedMachine {
                    engine_id: c.id.unwrap_or_default(),
                    name: c
                        .names
                        .and_then(|n| n.first().map(|n| n.trim_start_matches('/').to_owned()))
                        .unwrap_or_default(),
                    machine_id: labels
                        .get(MACHINE_ID_LABEL)
                        .and_then(|v| v.parse::<Id16>().ok()),
                    machine_type: labels
                        .get(MACHINE_TYPE_LABEL)
                        .and_then(|v| v.parse::<Digest>().ok()),
                    state,
                }
            })
            .collect();
        // A container frozen through its cgroup (by a daemon that then crashed, say) is frozen,
        // whatever the engine's books say.
        for o in &mut owned {
            if o.state == MachineState::Running && self.cgroup_frozen(&o.engine_id).await {
                o.state = MachineState::Frozen;
            }
        }
        Ok(owned)
    }
}

impl DockerRuntime {
    /// Whether container `id`'s cgroup is frozen or being frozen (by us or by the engine).
    async fn cgroup_frozen(&self, id: &str) -> bool {
        self.freezer(id).await.is_some_and(|f| f.is_freezing())
    }
}

/// The cgroupfs parent of the containers of daemon `owner`: `gleaner-<owner>`, with any character
/// a cgroup name should not hold replaced.
pub fn cgroup_parent_name(owner: &str) -> String {
    let clean: String = owner
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("gleaner-{clean}")
}

/// The container's cgroup paths below the hierarchy's root: under our parent, or the engine's
/// default parents for either driver (containers made before the parent existed).
fn container_cgroups(parent: Option<&str>, id: &str) -> Vec<String> {
    let mut v = Vec::with_capacity(3);
    match parent {
        Some(p) if p.ends_with(".slice") => v.push(format!("{p}/docker-{id}.scope")),
        Some(p) => v.push(format!("{p}/{id}")),
        None => {}
    }
    v.push(format!("docker/{id}"));
    v.push(format!("system.slice/docker-{id}.scope"));
    v
}

/// Marks the guests' parent cgroup idle for the CPU scheduler (`cpu.idle = 1`, kernel 5.15+, cgroup
/// v1 or v2), or back to normal: idle, the whole group is scheduled as SCHED_IDLE against
/// everything outside it, so any owner process that wants a core gets it at once (an idle mark on
/// each container alone would only rank them among the engine's other containers). Returns the
/// file written.
pub fn cgroup_set_cpu_idle(parent: &str, idle: bool) -> Result<std::path::PathBuf, String> {
    let root = std::path::Path::new("/sys/fs/cgroup");
    // v1 keeps the cpu controller in its own hierarchy; v2 has one tree.
    let candidates = [root.join("cpu").join(parent), root.join(parent)]
        .into_iter()
        .map(|d| d.join("cpu.idle"));
    let mut tried = Vec::new();
    for f in candidates {
        if !f.exists() {
            continue;
        }
        match std::fs::write(&f, if idle { "1" } else { "0" }) {
            Ok(()) => return Ok(f),
            Err(e) => tried.push(format!("{}: {e}", f.display())),
        }
    }
    Err(if tried.is_empty() {
        "no cpu.idle file for the guests' cgroup (kernel before 5.15, or another layout)".into()
    } else {
        tried.join(", ")
    })
}

/// Whether the guests' parent cgroup is marked idle now (`None`: no such file to read).
pub fn cgroup_cpu_idle(parent: &str) -> Option<bool> {
    let root = std::path::Path::new("/sys/fs/cgroup");
    [root.join("cpu").join(parent), root.join(parent)]
        .iter()
        .find_map(|d| std::fs::read_to_string(d.join("cpu.idle")).ok())
        .map(|v| v.trim() == "1")
}

/// The folders named `parent` in every hierarchy (v1 controllers, or the v2 tree).
fn parent_dirs(parent: &str) -> Vec<std::path::PathBuf> {
    let root = std::path::Path::new("/sys/fs/cgroup");
    let mut dirs = vec![root.join(parent)];
    if let Ok(rd) = std::fs::read_dir(root) {
        dirs.extend(rd.flatten().map(|e| e.path().join(parent)));
    }
    dirs
}

/// Removes the empty parent cgroup `parent` from every hierarchy; whether none is left.
pub fn cgroup_remove_parent(parent: &str) -> bool {
    let dirs = parent_dirs(parent);
    for d in &dirs {
        let _ = std::fs::remove_dir(d);
    }
    !dirs.iter().any(|d| d.exists())
}

/// Whether `parent` holds a guest's cgroup other than `id`'s in any hierarchy.
fn cgroup_has_other_children(parent: &str, id: &str) -> bool {
    parent_dirs(parent).iter().any(|d| {
        std::fs::read_dir(d).is_ok_and(|rd| {
            rd.flatten()
                .any(|e| e.path().is_dir() && e.file_name().to_str() != Some(id))
        })
    })
}

/// The cgroup v2 high-water mark of a container's memory (`memory.peak`, kernel 5.19+), from the
/// cgroupfs (`/sys/fs/cgroup/docker/<id>`) or systemd (`system.slice/docker-<id>.scope`) layout,
/// if this process can see it.
pub fn cgroup_memory_peak(parent: Option<&str>, id: &str) -> Option<u64> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let root = std::path::Path::new("/sys/fs/cgroup");
    container_cgroups(parent, id).iter().find_map(|sub| {
        std::fs::read_to_string(root.join(sub).join("memory.peak"))
            .ok()?
            .trim()
            .parse()
            .ok()
    })
}

fn read_u64(path: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// CPU and memory of a container from its cgroup v1 hierarchy (cgroupfs or systemd layout), if
/// this process can see it. Memory in use excludes inactive page cache, as `docker stats` does.
pub fn cgroup_v1_usage(parent: Option<&str>, id: &str) -> Option<Usage> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let root = std::path::Path::new("/sys/fs/cgroup");
    container_cgroups(parent, id).iter().find_map(|sub| {
        let cpu_ns = read_u64(&root.join("cpuacct").join(sub).join("cpuacct.usage"))?;
        let mem = root.join("memory").join(sub);
        let usage = read_u64(&mem.join("memory.usage_in_bytes")).unwrap_or(0);
        let inactive = std::fs::read_to_string(mem.join("memory.stat"))
            .ok()
            .and_then(|st| {
                st.lines().find_map(|l| {
                    l.strip_prefix("total_inactive_file ")
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
            })
            .unwrap_or(0);
        Some(Usage {
            cpu_ns,
            memory_bytes: usage.saturating_sub(inactive),
            peak_memory_bytes: read_u64(&mem.join("memory.max_usage_in_bytes")).unwrap_or(usage),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freezer_timeout_is_asked_again_other_refusals_are_not() {
        // What dockerd answered in the slowdown bench under load 16.
        assert!(freeze_gave_up(
            "Cannot pause container 3f2a: OCI runtime pause failed: unable to freeze: unknown"
        ));
        assert!(!freeze_gave_up("Container 3f2a is not running"));
        assert!(!freeze_gave_up("Container 3f2a is already paused"));
    }
}
