//! Containers on the Docker Engine through bollard: hardened by default (no privileges, every
//! capability dropped, no new privileges, read-only root, pids/memory/CPU limits, no network unless
//! the signed egress policy allows it, an unprivileged user), MJF bind mounts in Vac's layout, and
//! images loaded only after their sha256 has been verified.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, ContainerStateStatusEnum, ContainerUpdateBody, HostConfig,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ImportImageOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, StatsOptionsBuilder, StopContainerOptionsBuilder,
    TagImageOptionsBuilder,
};
use futures_util::StreamExt;
use gleaner::{Digest, Id16};

use super::blobs::BlobCache;
use super::{
    EngineKind, ImageSource, Limits, MACHINE_ID_LABEL, MACHINE_TYPE_LABEL, MachineHandle,
    MachineSpec, MachineState, OWNER_LABEL, OwnedMachine, PreparedImage, Probe, Progress, Runtime,
    RuntimeError, Usage,
};

/// The Docker Engine backend.
#[derive(Debug, Clone)]
pub struct DockerRuntime {
    docker: Docker,
    blobs: BlobCache,
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

fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// The tag under which an image verified by `sha256` is kept in the engine.
pub fn image_tag(sha256: &Digest) -> String {
    format!("gleaner/sha256-{sha256}:latest")
}

impl DockerRuntime {
    /// Connects to the local engine's unix socket and negotiates the API version.
    /// `owner` labels everything this runtime makes; `cache_dir` and `quota_bytes` bound the
    /// image tarball cache.
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
        Ok(DockerRuntime {
            docker,
            blobs: BlobCache::new(cache_dir, quota_bytes)?,
            owner: owner.to_owned(),
            user: "65534:65534".into(),
        })
    }

    /// The engine client, for tests and diagnostics.
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    async fn image_present(&self, reference: &str) -> bool {
        self.docker.inspect_image(reference).await.is_ok()
    }

    async fn load_tarball(
        &self,
        path: &std::path::Path,
        url: &str,
    ) -> Result<String, RuntimeError> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| RuntimeError::Image {
                url: url.to_owned(),
                reason: e.to_string(),
            })?;
        let stream = tokio_util::io::ReaderStream::new(file);
        let mut out = self.docker.import_image_stream(
            ImportImageOptionsBuilder::default().quiet(true).build(),
            stream,
            None,
        );
        let mut loaded = None;
        while let Some(msg) = out.next().await {
            let info = msg.map_err(call("load image"))?;
            for text in [info.stream.as_deref(), info.status.as_deref()]
                .into_iter()
                .flatten()
            {
                for line in text.lines() {
                    if let Some(r) = line
                        .strip_prefix("Loaded image ID: ")
                        .or_else(|| line.strip_prefix("Loaded image: "))
                    {
                        loaded = Some(r.trim().to_owned());
                    }
                }
            }
        }
        loaded.ok_or_else(|| RuntimeError::Image {
            url: url.to_owned(),
            reason: "the engine loaded no image from the tarball".into(),
        })
    }

    fn labels(&self, spec: &MachineSpec) -> HashMap<String, String> {
        let mut labels: HashMap<String, String> = spec.labels.clone().into_iter().collect();
        labels.insert(OWNER_LABEL.into(), self.owner.clone());
        labels.insert(MACHINE_ID_LABEL.into(), spec.machine_id.to_string());
        labels.insert(MACHINE_TYPE_LABEL.into(), spec.machine_type.to_string());
        labels
    }
}

/// The host configuration of a hardened container for `spec`.
pub fn host_config(spec: &MachineSpec) -> HostConfig {
    let mjf = &spec.mjf_dir;
    let bind = |sub: &str, target: &str, mode: &str| {
        format!("{}:{target}:{mode}", mjf.join(sub).display())
    };
    let scratch = spec.disk_bytes.max(16 << 20);
    HostConfig {
        privileged: Some(false),
        cap_drop: Some(vec!["ALL".into()]),
        security_opt: Some(vec!["no-new-privileges".into()]),
        readonly_rootfs: Some(true),
        tmpfs: Some(HashMap::from([
            (
                "/tmp".into(),
                format!("rw,nosuid,nodev,size={}", scratch / 4),
            ),
            ("/scratch".into(), format!("rw,nosuid,nodev,size={scratch}")),
        ])),
        pids_limit: Some(i64::from(spec.pids_limit)),
        memory: Some(spec.limits.memory_bytes as i64),
        memory_swap: Some(spec.limits.memory_bytes as i64),
        nano_cpus: Some((spec.limits.cpus * 1e9) as i64),
        network_mode: Some(
            if spec.egress.is_empty() {
                "none"
            } else {
                "bridge"
            }
            .into(),
        ),
        binds: Some(vec![
            bind("machinefeatures", "/machinefeatures", "ro"),
            bind("jobfeatures", "/jobfeatures", "ro"),
            bind("joboutputs", "/joboutputs", "rw"),
            bind("user_data", "/user_data", "ro"),
        ]),
        init: Some(true),
        ..Default::default()
    }
}

impl Runtime for DockerRuntime {
    fn engine(&self) -> EngineKind {
        EngineKind::Docker
    }

    async fn probe(&self) -> Result<Probe, RuntimeError> {
        let v = self.docker.version().await.map_err(call("version"))?;
        let info = self.docker.info().await.map_err(call("info"))?;
        let cgroup = match info.cgroup_version.as_ref().map(|c| format!("{c:?}")) {
            Some(c) if c.contains('2') => 2,
            _ => 1,
        };
        Ok(Probe {
            engine: EngineKind::Docker,
            reachable: true,
            version: format!(
                "{} (API {})",
                v.version.unwrap_or_default(),
                v.api_version.unwrap_or_default()
            ),
            kvm_usable: false,
            cgroup_version: cgroup,
            notes: Vec::new(),
        })
    }

    async fn prepare_image(
        &self,
        source: &ImageSource,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<PreparedImage, RuntimeError> {
        let tag = image_tag(&source.sha256);
        if let Some(reference) = source.url.strip_prefix("oci://") {
            // A registry image pinned by its manifest digest: pull exactly that digest.
            let pinned = format!("{reference}@sha256:{}", source.sha256);
            if !self.image_present(&pinned).await {
                let opts = bollard::query_parameters::CreateImageOptionsBuilder::default()
                    .from_image(&pinned)
                    .build();
                let mut pull = self.docker.create_image(Some(opts), None, None);
                while let Some(m) = pull.next().await {
                    m.map_err(call("pull image"))?;
                }
            }
            return Ok(PreparedImage {
                sha256: source.sha256,
                reference: pinned,
            });
        }
        if self.image_present(&tag).await {
            return Ok(PreparedImage {
                sha256: source.sha256,
                reference: tag,
            });
        }
        // Verified before the engine sees a byte.
        let path = self
            .blobs
            .fetch(&source.url, &source.sha256, progress)
            .await?;
        let loaded = self.load_tarball(&path, &source.url).await?;
        let (repo, tag_part) = tag.rsplit_once(':').unwrap_or((&tag, "latest"));
        self.docker
            .tag_image(
                &loaded,
                Some(
                    TagImageOptionsBuilder::default()
                        .repo(repo)
                        .tag(tag_part)
                        .build(),
                ),
            )
            .await
            .map_err(call("tag image"))?;
        Ok(PreparedImage {
            sha256: source.sha256,
            reference: tag,
        })
    }

    async fn create(&self, spec: &MachineSpec) -> Result<MachineHandle, RuntimeError> {
        let image = spec
            .image
            .as_ref()
            .ok_or_else(|| RuntimeError::Unsupported("a container needs an image".into()))?;
        let body = ContainerCreateBody {
            image: Some(image.reference.clone()),
            cmd: spec.command.clone(),
            user: Some(self.user.clone()),
            working_dir: Some("/scratch".into()),
            env: Some(vec![
                "MACHINEFEATURES=/machinefeatures".into(),
                "JOBFEATURES=/jobfeatures".into(),
                "JOBOUTPUTS=/joboutputs".into(),
                format!("GLEANER_MACHINE_ID={}", spec.machine_id),
            ]),
            labels: Some(self.labels(spec)),
            network_disabled: Some(spec.egress.is_empty()),
            host_config: Some(host_config(spec)),
            ..Default::default()
        };
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
        self.docker
            .start_container(&m.engine_id, None)
            .await
            .map_err(call("start container"))
    }

    async fn freeze(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        match self.docker.pause_container(&m.engine_id).await {
            Ok(()) => Ok(()),
            // Already paused is what we wanted.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409,
                message,
            }) if message.contains("already paused") => Ok(()),
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
            Err(e) => Err(call("unpause container")(e)),
        }
    }

    async fn set_limits(&self, m: &MachineHandle, limits: Limits) -> Result<(), RuntimeError> {
        let body = ContainerUpdateBody {
            nano_cpus: Some((limits.cpus * 1e9) as i64),
            memory: Some(limits.memory_bytes as i64),
            memory_swap: Some(limits.memory_bytes as i64),
            ..Default::default()
        };
        self.docker
            .update_container(&m.engine_id, body)
            .await
            .map_err(call("update container"))
    }

    async fn state(&self, m: &MachineHandle) -> Result<MachineState, RuntimeError> {
        let info = match self.docker.inspect_container(&m.engine_id, None).await {
            Ok(i) => i,
            Err(e) if is_not_found(&e) => return Ok(MachineState::Gone),
            Err(e) => return Err(call("inspect container")(e)),
        };
        let state = info.state.unwrap_or_default();
        Ok(match state.status {
            Some(ContainerStateStatusEnum::CREATED) => MachineState::Created,
            Some(ContainerStateStatusEnum::PAUSED) => MachineState::Frozen,
            Some(ContainerStateStatusEnum::EXITED | ContainerStateStatusEnum::DEAD) => {
                MachineState::Exited {
                    code: state.exit_code,
                }
            }
            Some(ContainerStateStatusEnum::REMOVING) => MachineState::Gone,
            _ => MachineState::Running,
        })
    }

    async fn sample(&self, m: &MachineHandle) -> Result<Usage, RuntimeError> {
        // The kernel's own accounting, read from the container's cgroup: the same numbers the
        // stats API reports, without its one-second sampling delay.
        if let Some(u) = cgroup_usage(&m.engine_id) {
            return Ok(u);
        }
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
        // cgroup v1 reports the high-water mark as max_usage; v2 engines leave it out, and the
        // factory keeps the highest sample it has seen instead.
        Ok(Usage {
            cpu_ns,
            memory_bytes: usage,
            peak_memory_bytes: mem.max_usage.unwrap_or(usage),
        })
    }

    async fn stop(&self, m: &MachineHandle, grace: Duration) -> Result<MachineState, RuntimeError> {
        // A frozen container cannot handle SIGTERM: thaw it first so it can shut down cleanly.
        if let Ok(MachineState::Frozen) = self.state(m).await {
            let _ = self.thaw(m).await;
        }
        let t = grace.as_secs().clamp(1, i32::MAX as u64) as i32;
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
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => {}
            Err(e) => return Err(call("stop container")(e)),
        }
        self.state(m).await
    }

    async fn remove(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        let opts = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        match self.docker.remove_container(&m.engine_id, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
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
                let state = match c.state.as_ref().map(|s| format!("{s:?}").to_lowercase()) {
                    Some(s) if s.contains("paused") => MachineState::Frozen,
                    Some(s) if s.contains("running") => MachineState::Running,
                    Some(s) if s.contains("created") => MachineState::Created,
                    Some(s) if s.contains("exited") || s.contains("dead") => {
                        MachineState::Exited { code: None }
                    }
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

fn read_u64(path: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Reads CPU and memory accounting from the container's cgroup (v1 cgroupfs or systemd layouts,
/// or v2), if this process can see it.
pub fn cgroup_usage(id: &str) -> Option<Usage> {
    use std::path::Path;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let root = Path::new("/sys/fs/cgroup");
    for sub in [
        format!("docker/{id}"),
        format!("system.slice/docker-{id}.scope"),
    ] {
        let cpu = root.join("cpuacct").join(&sub).join("cpuacct.usage");
        if let Some(cpu_ns) = read_u64(&cpu) {
            let mem = root.join("memory").join(&sub);
            let usage = read_u64(&mem.join("memory.usage_in_bytes")).unwrap_or(0);
            return Some(Usage {
                cpu_ns,
                memory_bytes: usage,
                peak_memory_bytes: read_u64(&mem.join("memory.max_usage_in_bytes"))
                    .unwrap_or(usage),
            });
        }
        let v2 = root.join(&sub);
        if let Ok(stat) = std::fs::read_to_string(v2.join("cpu.stat")) {
            let usec = stat
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse::<u64>().ok())?;
            let usage = read_u64(&v2.join("memory.current")).unwrap_or(0);
            return Some(Usage {
                cpu_ns: usec * 1000,
                memory_bytes: usage,
                peak_memory_bytes: read_u64(&v2.join("memory.peak")).unwrap_or(usage),
            });
        }
    }
    None
}
