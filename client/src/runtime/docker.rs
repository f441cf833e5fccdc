//! Containers on the Docker Engine through bollard: hardened by default (no privileges, every
//! capability dropped, no new privileges, read-only root, pids/memory/CPU limits, no network unless
//! the signed egress policy allows it, an unprivileged user), MJF bind mounts in Vac's layout, and
//! images loaded only after their sha256 has been verified (see `image.rs`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, ContainerStateStatusEnum, ContainerUpdateBody, HostConfig, Mount,
    MountType, SystemInfoCgroupVersionEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, KillContainerOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, StatsOptionsBuilder, StopContainerOptionsBuilder,
};
use futures_util::StreamExt;
use gleaner::{Digest, Id16};

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
}

fn call(call: &'static str) -> impl FnOnce(bollard::errors::Error) -> RuntimeError {
    move |e| RuntimeError::Call {
        engine: EngineKind::Docker,
        call,
        reason: e.to_string(),
    }
}

fn is_status(e: &bollard::errors::Error, code: u16) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError { status_code, .. } if *status_code == code
    )
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
        }
    }

    /// The engine client, for tests and diagnostics.
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// The image cache.
    pub fn images(&self) -> &ImageStore {
        &self.images
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
}

/// The smallest writable scratch a container gets, whatever the machine type asks for.
const MIN_SCRATCH: u64 = 16 << 20;

/// The host configuration of a hardened container for `spec`.
pub fn host_config(spec: &MachineSpec) -> Result<HostConfig, RuntimeError> {
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
        network_mode: Some(
            if spec.egress.is_empty() {
                "none"
            } else {
                "bridge"
            }
            .into(),
        ),
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
        network_disabled: Some(spec.egress.is_empty()),
        host_config: Some(host_config(spec)?),
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
        let body = container_body(spec, &self.user, self.labels(spec))?;
        let r = self
            .docker
            .create_container(
                Some(
                    CreateContainerOptionsBuilder::default()
                        .name(&spec.name)
                        .build(),
                ),
                body,
            )
            .await
            .map_err(call("create container"))?;
        Ok(MachineHandle {
            engine_id: r.id,
            name: spec.name.clone(),
        })
    }

    async fn start(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        match self.docker.start_container(&m.engine_id, None).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Err(RuntimeError::NoSuchMachine(m.name.clone())),
            Err(e) => Err(call("start container")(e)),
        }
    }

    async fn freeze(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        match self.docker.pause_container(&m.engine_id).await {
            Ok(()) => Ok(()),
            // Already paused is what we wanted.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409,
                message,
            }) if message.contains("already paused") => Ok(()),
            Err(e) if is_not_found(&e) => Err(RuntimeError::NoSuchMachine(m.name.clone())),
            Err(e) => Err(call("pause container")(e)),
        }
    }

    async fn thaw(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        match self.docker.unpause_container(&m.engine_id).await {
            Ok(()) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409,
                message,
            }) if message.contains("not paused") => Ok(()),
            Err(e) if is_not_found(&e) => Err(RuntimeError::NoSuchMachine(m.name.clone())),
            Err(e) => Err(call("unpause container")(e)),
        }
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
        Ok(parse_state(state.status, state.exit_code))
    }

    async fn sample(&self, m: &MachineHandle) -> Result<Usage, RuntimeError> {
        // The kernel's own accounting straight from the container's cgroup v1 (the numbers the
        // stats API reports): no engine round trip, so the factory and the owner enforcer, which
        // sample every tick, never wait on the engine.
        if let Some(u) = cgroup_v1_usage(&m.engine_id) {
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
            .or_else(|| cgroup_memory_peak(&m.engine_id))
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
        // Force: kills a running container; v: deletes its anonymous volumes too.
        let opts = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        match self.docker.remove_container(&m.engine_id, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            // 409 "removal already in progress": another call is removing it.
            Err(e) if is_status(&e, 409) => Ok(()),
            Err(e) => Err(call("remove container")(e)),
        }
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
        Ok(list
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
            .collect())
    }
}

/// The cgroup v2 high-water mark of a container's memory (`memory.peak`, kernel 5.19+), from the
/// cgroupfs (`/sys/fs/cgroup/docker/<id>`) or systemd (`system.slice/docker-<id>.scope`) layout,
/// if this process can see it.
pub fn cgroup_memory_peak(id: &str) -> Option<u64> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let root = std::path::Path::new("/sys/fs/cgroup");
    [
        format!("docker/{id}"),
        format!("system.slice/docker-{id}.scope"),
    ]
    .iter()
    .find_map(|sub| {
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
pub fn cgroup_v1_usage(id: &str) -> Option<Usage> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let root = std::path::Path::new("/sys/fs/cgroup");
    [
        format!("docker/{id}"),
        format!("system.slice/docker-{id}.scope"),
    ]
    .iter()
    .find_map(|sub| {
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
