//! Cluster nodes: yielding to the site's batch system (Slurm first, behind [`BatchSystem`]) — the
//! `[batch]` settings, the claims that site jobs hold on this node (fed by the prolog/epilog hooks
//! or by polling the node's state, kept in the state dir so that they survive a daemon restart and
//! checked against the batch system at start), and `gleaner batch-hook`, which must never hold up
//! or fail a site job.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gleaner::policy::BatchClaim;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, Origin, Scalar};
use crate::control::{ControlClient, Request};
use crate::factory::FactoryHandle;
use crate::owner::EnforcerCommand;

/// How long a hook may hold up a site job by default.
pub const DEFAULT_HOOK_DEADLINE: Duration = Duration::from_secs(2);
/// How often poll mode looks at the node by default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(5);
/// Most site jobs remembered at once (a node runs far fewer; this bounds a flood of prologs).
pub const MAX_JOBS: usize = 4096;
/// Longest job id accepted from a hook.
const MAX_JOB_ID: usize = 64;
/// The claims file in the daemon's state dir.
pub const CLAIMS_FILE: &str = "batch-claims.json";
/// Largest claims file read back (`MAX_JOBS` entries fit well within it).
const MAX_CLAIMS_FILE: u64 = 4 << 20;
/// How often held claims are checked against the batch system once the first check succeeded
/// (a lost epilog would otherwise hold the node until the next restart).
pub const RECONCILE_EVERY: Duration = Duration::from_secs(300);
/// How soon a failed check is tried again.
pub const RECONCILE_RETRY: Duration = Duration::from_secs(30);

/// The `[batch]` table of the settings file, as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchFile {
    pub system: Option<toml::Spanned<String>>,
    pub mode: Option<toml::Spanned<String>>,
    pub node: Option<toml::Spanned<String>>,
    pub poll_interval: Option<toml::Spanned<Scalar>>,
    pub hook_deadline: Option<toml::Spanned<Scalar>>,
}

/// The batch systems Gleaner knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemKind {
    Slurm,
}

/// How the daemon learns what the batch system takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The site's prolog and epilog call `gleaner batch-hook` (preferred: before the job starts).
    Hook,
    /// The daemon asks the batch system every `poll_interval` (for sites without hooks).
    Poll,
}

/// Validated `[batch]` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchSettings {
    pub system: SystemKind,
    pub mode: Mode,
    /// This node's name in the batch system.
    pub node: String,
    pub poll_interval: Duration,
    pub hook_deadline: Duration,
}

/// The short host name, which Slurm uses as the node name by default.
pub fn short_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().split('.').next().unwrap_or("").to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Validates the `[batch]` table at `span` of the file `o`.
pub fn settings(
    f: &BatchFile,
    span: std::ops::Range<usize>,
    o: &Origin,
) -> Result<BatchSettings, ConfigError> {
    let system = match &f.system {
        None => {
            return Err(o.invalid(
                "batch.system",
                span,
                "missing: write system = \"slurm\" (the only batch system supported so far)",
            ));
        }
        Some(s) if s.get_ref() == "slurm" => SystemKind::Slurm,
        Some(s) => {
            return Err(o.invalid(
                "batch.system",
                s.span(),
                format!("{:?} is not supported; write \"slurm\"", s.get_ref()),
            ));
        }
    };
    let mode = match &f.mode {
        None => Mode::Hook,
        Some(m) => match m.get_ref().as_str() {
            "hook" => Mode::Hook,
            "poll" => Mode::Poll,
            other => {
                return Err(o.invalid(
                    "batch.mode",
                    m.span(),
                    format!("{other:?}: write \"hook\" (prolog/epilog) or \"poll\""),
                ));
            }
        },
    };
    let node = match &f.node {
        None => short_hostname(),
        Some(n) => {
            let v = n.get_ref();
            let ok = !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !ok {
                return Err(o.invalid(
                    "batch.node",
                    n.span(),
                    format!("{v:?} is not a node name (letters, digits, '-', '_', '.')"),
                ));
            }
            v.clone()
        }
    };
    let dur = |key: &str,
               v: &Option<toml::Spanned<Scalar>>,
               default: Duration,
               min: Duration,
               max: Duration|
     -> Result<Duration, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        let d = crate::config::duration(v.get_ref()).map_err(|e| o.invalid(key, v.span(), e))?;
        if d < min || d > max {
            return Err(o.invalid(
                key,
                v.span(),
                format!(
                    "{} is out of range: give between {} and {}",
                    humantime::format_duration(d),
                    humantime::format_duration(min),
                    humantime::format_duration(max)
                ),
            ));
        }
        Ok(d)
    };
    Ok(BatchSettings {
        system,
        mode,
        node,
        poll_interval: dur(
            "batch.poll_interval",
            &f.poll_interval,
            DEFAULT_POLL_INTERVAL,
            Duration::from_millis(200),
            Duration::from_secs(3600),
        )?,
        hook_deadline: dur(
            "batch.hook_deadline",
            &f.hook_deadline,
            DEFAULT_HOOK_DEADLINE,
            Duration::from_millis(50),
            Duration::from_secs(60),
        )?,
    })
}

/// Why the batch system could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("cannot run {command}: {cause}")]
    Spawn {
        command: &'static str,
        cause: std::io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Failed {
        command: &'static str,
        stderr: String,
    },
    #[error("{command} did not answer in {after:?}")]
    Timeout {
        command: &'static str,
        after: Duration,
    },
    #[error("cannot read {command}'s answer: {why}")]
    Parse { command: &'static str, why: String },
}

/// The node as the batch system sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    /// The batch system's word for it (e.g. Slurm's "mixed", "drained", "down*").
    pub state: String,
    pub allocated_cpus: u32,
    pub idle_cpus: u32,
    pub total_cpus: u32,
    /// Drained, draining, down, failed or in maintenance: no new work here.
    pub unavailable: bool,
}

/// One site job's share of this node, as a prolog learns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobShare {
    pub job: String,
    pub cpus: u32,
    pub memory_bytes: Option<u64>,
}

/// A site's batch system, as a cluster node's daemon and hooks need it. Slurm implements it
/// ([`Slurm`]); HTCondor (a startd hook) or PBS (`execjob_prologue`) would implement the same four
/// calls, and the rest — claims, poll loop, hooks, restart reconciliation — stays as it is.
pub trait BatchSystem: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// The node's state and CPUs now (poll mode).
    fn node_state(&self) -> impl Future<Output = Result<NodeState, BatchError>> + Send;
    /// The job id a hook runs for, from its environment alone (the epilog must not wait on the
    /// controller).
    fn job_id_from_env(&self, env: &BTreeMap<String, String>) -> Option<String>;
    /// The arriving job and its share of this node, from a hook's environment.
    fn job_from_env(
        &self,
        env: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<JobShare, BatchError>> + Send;
    /// The ids of the site jobs that hold (or are taking or giving back) resources on this node
    /// now; the same ids [`BatchSystem::job_id_from_env`] gives.
    fn jobs_on_node(&self) -> impl Future<Output = Result<BTreeSet<String>, BatchError>> + Send;
}

/// Slurm through its commands (`sinfo`, `scontrol`), which read `SLURM_CONF` from the environment.
#[derive(Debug, Clone)]
pub struct Slurm {
    pub node: String,
    /// Longest a Slurm command may take.
    pub timeout: Duration,
}

/// Runs a command with a deadline (the child is killed when it is passed) and returns its stdout.
async fn run_command(
    command: &'static str,
    args: &[&str],
    timeout: Duration,
) -> Result<String, BatchError> {
    let child = tokio::process::Command::new(command)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(timeout, child)
        .await
        .map_err(|_| BatchError::Timeout {
            command,
            after: timeout,
        })?
        .map_err(|cause| BatchError::Spawn { command, cause })?;
    if !out.status.success() {
        let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        stderr.truncate(512);
        return Err(BatchError::Failed { command, stderr });
    }
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.truncate(1 << 20);
    Ok(s)
}

/// Parses the state and CPUs of a node from `sinfo -h -N -o '%N %T %C'` (the name taken off):
/// "mixed 1/1/0/2" (allocated/idle/other/total CPUs).
pub fn parse_sinfo(text: &str) -> Result<NodeState, String> {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .ok_or("the node is not known to sinfo")?;
    let (state, cpus) = line
        .split_once(char::is_whitespace)
        .ok_or_else(|| format!("{line:?} is not \"STATE A/I/O/T\""))?;
    let n: Vec<u32> = cpus
        .trim()
        .split('/')
        .map(|x| x.parse::<u32>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("{cpus:?} is not A/I/O/T CPU counts"))?;
    let [allocated, idle, _other, total] = n[..] else {
        return Err(format!("{cpus:?} is not A/I/O/T CPU counts"));
    };
    let state = state.to_ascii_lowercase();
    let word = state.trim_end_matches(['*', '~', '#', '!', '%', '$', '@', '^', '-', '+']);
    const UNAVAILABLE: [&str; 9] = [
        "drain",
        "drng",
        "down",
        "fail",
        "maint",
        "reboot",
        "unk",
        "inval",
        "power_down",
    ];
    // Slurm 22.05 may show an allocated node as "allocated 0/2/0/2": the state word wins over
    // the counts, on the side of the site's job.
    let (allocated, idle) = if word.starts_with("alloc") {
        (allocated.max(total), 0)
    } else if word.starts_with("mix") && allocated == 0 {
        (
            total.saturating_sub(idle).max(1),
            idle.min(total.saturating_sub(1)),
        )
    } else {
        (allocated, idle)
    };
    Ok(NodeState {
        unavailable: UNAVAILABLE.iter().any(|u| word.contains(u)),
        state: word.to_owned(),
        allocated_cpus: allocated,
        idle_cpus: idle,
        total_cpus: total,
    })
}

/// Job ids from `squeue -h -o '%A %T'` ("41 RUNNING" per line).
pub fn parse_squeue(text: &str) -> Result<BTreeSet<String>, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let id = l.split_whitespace().next().unwrap_or("");
            if id.is_empty() || id.len() > MAX_JOB_ID || !id.bytes().all(|b| b.is_ascii_digit()) {
                Err(format!("{l:?} does not start with a job id"))
            } else {
                Ok(id.to_owned())
            }
        })
        .collect()
}

/// CPUs on the first node from `SLURM_JOB_CPUS_PER_NODE` ("2", "2(x3)", "4,2(x2)").
pub fn parse_cpus_per_node(v: &str) -> Option<u32> {
    let first = v.split(',').next()?.trim();
    let n = first.split('(').next()?.trim();
    n.parse().ok().filter(|n| *n > 0)
}

/// This node's memory (bytes) from `scontrol show job -d`: the line "Nodes=vm CPU_IDs=0 Mem=100"
/// (MiB), else `MinMemoryNode=100M`.
pub fn parse_job_memory(text: &str, node: &str) -> Option<u64> {
    let field = |line: &str, key: &str| -> Option<String> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key).map(str::to_owned))
    };
    for line in text.lines() {
        if let Some(nodes) = field(line, "Nodes=")
            && line.contains("Mem=")
            && (nodes == node || nodes.split(',').any(|n| n == node) || nodes.contains('['))
            && let Some(mib) = field(line, "Mem=").and_then(|m| m.parse::<u64>().ok())
        {
            return (mib > 0).then_some(mib << 20);
        }
    }
    let min = text.lines().find_map(|l| field(l, "MinMemoryNode="))?;
    let (num, unit) = min.split_at(min.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    let shift = match unit {
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return None,
    };
    (n > 0).then(|| n << shift)
}

impl BatchSystem for Slurm {
    fn name(&self) -> &'static str {
        "slurm"
    }

    async fn node_state(&self) -> Result<NodeState, BatchError> {
        // Not `-n NODE`: Slurm 22.05 then loads the node alone and reports its CPUs as
        // unallocated ("allocated 0/2/0/2" for a mixed node).
        let out = run_command("sinfo", &["-h", "-N", "-o", "%N %T %C"], self.timeout).await?;
        let line = out
            .lines()
            .find_map(|l| {
                let (name, rest) = l.trim().split_once(char::is_whitespace)?;
                (name == self.node).then_some(rest)
            })
            .unwrap_or("");
        tracing::debug!("sinfo: {line}");
        parse_sinfo(line).map_err(|why| BatchError::Parse {
            command: "sinfo",
            why,
        })
    }

    fn job_id_from_env(&self, env: &BTreeMap<String, String>) -> Option<String> {
        env.get("SLURM_JOB_ID")
            .or_else(|| env.get("SLURM_JOBID"))
            .map(|j| j.trim().to_owned())
            .filter(|j| !j.is_empty() && j.len() <= MAX_JOB_ID)
    }

    async fn jobs_on_node(&self) -> Result<BTreeSet<String>, BatchError> {
        // `%A`: one id per job (array elements included), as SLURM_JOB_ID has it. The default
        // states (pending, running, completing...) with `-w`: the jobs allocated here.
        let out = run_command(
            "squeue",
            &["-h", "-w", &self.node, "-o", "%A %T"],
            self.timeout,
        )
        .await?;
        parse_squeue(&out).map_err(|why| BatchError::Parse {
            command: "squeue",
            why,
        })
    }

    async fn job_from_env(&self, env: &BTreeMap<String, String>) -> Result<JobShare, BatchError> {
        let job = self.job_id_from_env(env).ok_or(BatchError::Parse {
            command: "the prolog's environment",
            why: "no SLURM_JOB_ID".into(),
        })?;
        let cpus = env
            .get("SLURM_JOB_CPUS_PER_NODE")
            .and_then(|v| parse_cpus_per_node(v));
        // The memory is only in the job's record; a slow controller must not cost the CPUs.
        let node = env
            .get("SLURMD_NODENAME")
            .cloned()
            .unwrap_or_else(|| self.node.clone());
        let detail = run_command("scontrol", &["show", "job", "-d", &job], self.timeout).await;
        let (cpus, memory_bytes) = match detail {
            Ok(text) => (
                cpus.or_else(|| {
                    text.split_whitespace()
                        .find_map(|w| w.strip_prefix("NumCPUs=")?.parse().ok())
                }),
                parse_job_memory(&text, &node),
            ),
            Err(e) => {
                tracing::debug!("scontrol show job {job}: {e}");
                (cpus, None)
            }
        };
        Ok(JobShare {
            job,
            // Unknown: the whole node, the safe side for the site's job.
            cpus: cpus.unwrap_or_else(node_cpus),
            memory_bytes,
        })
    }
}

/// The CPUs of this host.
pub fn node_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Job {
    cpus: u32,
    memory_bytes: Option<u64>,
    /// Arrival order (the newest job names the claim).
    seq: u64,
}

/// The claims file: the site jobs holding resources here, written on every prolog and epilog.
#[derive(Debug, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimsFile {
    version: u32,
    jobs: BTreeMap<String, Job>,
}

/// Why the claims file cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ClaimsError {
    #[error(
        "cannot read the batch claims {path}: {why}; if no site job runs on this node, remove the file"
    )]
    Read { path: PathBuf, why: String },
    #[error("cannot write the batch claims {path}: {cause}")]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
}

#[derive(Debug, Default)]
struct ClaimState {
    jobs: BTreeMap<String, Job>,
    seq: u64,
    /// The node's state from the last poll.
    node: Option<NodeState>,
}

/// What site jobs hold on this node, shared by the control API (hooks), the poller and the
/// owner-policy enforcer (which reads it into `HostState`).
#[derive(Debug)]
pub struct Claims {
    state: Mutex<ClaimState>,
    node_cores: f64,
    node_memory_bytes: u64,
    /// Where the jobs are kept across restarts (`None`: memory only, for tests).
    file: Option<PathBuf>,
    /// One writer at a time, each writing the state as it is when it gets the lock: the last
    /// write holds the newest state.
    writing: Mutex<()>,
}

impl Claims {
    /// Claims kept in memory only.
    pub fn new(node_cores: f64, node_memory_bytes: u64) -> Claims {
        Claims {
            state: Mutex::new(ClaimState::default()),
            node_cores,
            node_memory_bytes,
            file: None,
            writing: Mutex::new(()),
        }
    }

    /// Claims kept in `file`, starting with the jobs a previous run left there (a site job may
    /// still hold the node). A file that cannot be read is an error: guessing "no jobs" could
    /// hand a running site job's CPUs to Gleaner.
    pub fn open(
        node_cores: f64,
        node_memory_bytes: u64,
        file: &Path,
    ) -> Result<Claims, ClaimsError> {
        let read_err = |why: String| ClaimsError::Read {
            path: file.to_owned(),
            why,
        };
        let mut state = ClaimState::default();
        match std::fs::File::open(file) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(read_err(e.to_string())),
            Ok(f) => {
                use std::io::Read;
                let mut bytes = Vec::new();
                f.take(MAX_CLAIMS_FILE + 1)
                    .read_to_end(&mut bytes)
                    .map_err(|e| read_err(e.to_string()))?;
                if bytes.len() as u64 > MAX_CLAIMS_FILE {
                    return Err(read_err(format!("larger than {MAX_CLAIMS_FILE} bytes")));
                }
                let saved: ClaimsFile =
                    serde_json::from_slice(&bytes).map_err(|e| read_err(e.to_string()))?;
                if saved.version != 1 {
                    return Err(read_err(format!(
                        "version {} is not known (1 is)",
                        saved.version
                    )));
                }
                if saved.jobs.len() > MAX_JOBS {
                    return Err(read_err(format!("more than {MAX_JOBS} jobs")));
                }
                if let Some(bad) = saved
                    .jobs
                    .keys()
                    .find(|j| j.is_empty() || j.len() > MAX_JOB_ID)
                {
                    return Err(read_err(format!("{bad:?} is not a job id")));
                }
                state.seq = saved.jobs.values().map(|j| j.seq).max().unwrap_or(0);
                state.jobs = saved.jobs;
            }
        }
        Ok(Claims {
            state: Mutex::new(state),
            node_cores,
            node_memory_bytes,
            file: Some(file.to_owned()),
            writing: Mutex::new(()),
        })
    }

    /// Writes the jobs held now to the claims file, atomically and durably (blocking: call it
    /// off the executor). Memory-only claims do nothing.
    pub fn save(&self) -> Result<(), ClaimsError> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let write_err = |cause| ClaimsError::Write {
            path: path.clone(),
            cause,
        };
        let _one = self
            .writing
            .lock()
            .map_err(|_| write_err(std::io::Error::other("a writer panicked")))?;
        let jobs = self
            .state
            .lock()
            .map_err(|_| write_err(std::io::Error::other("the batch claims are poisoned")))?
            .jobs
            .clone();
        let bytes = serde_json::to_vec_pretty(&ClaimsFile { version: 1, jobs })
            .map_err(|e| write_err(std::io::Error::other(e)))?;
        crate::image_archive::write_atomic(path, &bytes).map_err(write_err)?;
        // The rename is durable only once the folder is.
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(write_err)?;
        }
        Ok(())
    }

    /// [`Claims::save`] off the executor.
    pub async fn save_async(self: &Arc<Self>) -> Result<(), ClaimsError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.save())
            .await
            .unwrap_or_else(|e| {
                Err(ClaimsError::Write {
                    path: self.file.clone().unwrap_or_default(),
                    cause: std::io::Error::other(e),
                })
            })
    }

    /// The jobs held now, with their arrival numbers.
    fn held(&self) -> BTreeMap<String, u64> {
        self.state
            .lock()
            .map(|s| s.jobs.iter().map(|(k, j)| (k.clone(), j.seq)).collect())
            .unwrap_or_default()
    }

    /// Forgets `job` if it is still the arrival numbered `seq`; whether it did.
    fn forget(&self, job: &str, seq: u64) -> bool {
        self.state
            .lock()
            .map(|mut s| {
                let same = s.jobs.get(job).is_some_and(|j| j.seq == seq);
                if same {
                    s.jobs.remove(job);
                }
                same
            })
            .unwrap_or(false)
    }

    /// A site job arrives (prolog). Refused only when absurdly many jobs are held.
    pub fn arrive(&self, job: &str, cpus: u32, memory_bytes: Option<u64>) -> Result<(), String> {
        if job.is_empty() || job.len() > MAX_JOB_ID {
            return Err("a job id is 1-64 characters".into());
        }
        let mut s = self
            .state
            .lock()
            .map_err(|_| "the batch claims are poisoned")?;
        if s.jobs.len() >= MAX_JOBS && !s.jobs.contains_key(job) {
            return Err(format!("more than {MAX_JOBS} site jobs held"));
        }
        s.seq += 1;
        let seq = s.seq;
        s.jobs.insert(
            job.to_owned(),
            Job {
                cpus,
                memory_bytes,
                seq,
            },
        );
        Ok(())
    }

    /// A site job leaves (epilog); whether it was held.
    pub fn leave(&self, job: &str) -> bool {
        self.state
            .lock()
            .map(|mut s| s.jobs.remove(job).is_some())
            .unwrap_or(false)
    }

    /// The node's state from a poll; whether it changed.
    pub fn set_node(&self, n: NodeState) -> bool {
        self.state
            .lock()
            .map(|mut s| {
                let changed = s.node.as_ref() != Some(&n);
                s.node = Some(n);
                changed
            })
            .unwrap_or(false)
    }

    /// What the batch system holds now, for the owner policy.
    pub fn claim(&self) -> Option<BatchClaim> {
        let s = self.state.lock().ok()?;
        let mut c = BatchClaim::default();
        if let Some((id, _)) = s.jobs.iter().max_by_key(|(_, j)| j.seq) {
            c.job = id.parse().ok();
        }
        c.jobs = s.jobs.len() as u32;
        let hook_cpus: u32 = s.jobs.values().map(|j| j.cpus).fold(0, u32::saturating_add);
        let mem: Option<u64> = s
            .jobs
            .values()
            .filter_map(|j| j.memory_bytes)
            .reduce(u64::saturating_add);
        c.cpus = hook_cpus;
        c.free_cores = (self.node_cores - f64::from(hook_cpus)).max(0.0);
        c.free_memory_bytes = mem.map(|m| self.node_memory_bytes.saturating_sub(m));
        if let Some(n) = &s.node {
            c.unavailable = n.unavailable;
            // Whichever source sees more taken wins: hooks know jobs, polls know the CPUs.
            if n.allocated_cpus > c.cpus {
                c.cpus = n.allocated_cpus;
                c.free_cores = f64::from(n.idle_cpus).min(self.node_cores);
                if s.jobs.is_empty() {
                    c.job = None;
                    c.jobs = 0;
                }
            }
        }
        Some(c)
    }
}

/// Asks the enforcer to re-measure and apply now, and waits until it has.
pub async fn apply_now(enforcer: &mpsc::Sender<EnforcerCommand>) -> Result<String, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    enforcer
        .send(EnforcerCommand::Apply(tx))
        .await
        .map_err(|_| "the owner-policy enforcer has stopped".to_string())?;
    let d = rx
        .await
        .map_err(|_| "the owner-policy enforcer has stopped".to_string())?;
    Ok(format!("{} (source: {})", d.reason.text(), d.source))
}

/// Poll mode: looks at the node every `interval` until `cancel`; a change is applied at once, and
/// a drained or down node drains the factory (lifted when the node comes back, if we drained it).
pub async fn poll<B: BatchSystem>(
    system: B,
    interval: Duration,
    claims: Arc<Claims>,
    enforcer: mpsc::Sender<EnforcerCommand>,
    factory: FactoryHandle,
    cancel: CancellationToken,
) {
    let mut drained_by_us = false;
    let mut failing = false;
    loop {
        match system.node_state().await {
            Ok(n) => {
                if failing {
                    tracing::info!("{}: the node's state is readable again", system.name());
                    failing = false;
                }
                let unavailable = n.unavailable;
                let state = n.state.clone();
                let cpus = format!("{}/{} CPUs allocated", n.allocated_cpus, n.total_cpus);
                if claims.set_node(n) {
                    tracing::info!("{}: node is {state} ({cpus})", system.name());
                    if let Err(e) = apply_now(&enforcer).await {
                        tracing::warn!("{e}");
                        return;
                    }
                }
                if unavailable && !drained_by_us {
                    tracing::info!("{}: node {state}: draining", system.name());
                    if factory.drain(false).await.is_err() {
                        return;
                    }
                    drained_by_us = true;
                } else if !unavailable && drained_by_us {
                    tracing::info!("{}: node {state}: drain lifted", system.name());
                    if factory.undrain().await.is_err() {
                        return;
                    }
                    drained_by_us = false;
                }
            }
            // The last known state stands: guessing "idle" could slow a site job down.
            Err(e) if !failing => {
                tracing::warn!("{}: {e}; keeping the last known node state", system.name());
                failing = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// What a check of the held claims against the batch system found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reconciled {
    /// Held jobs the batch system still has on this node.
    pub kept: Vec<String>,
    /// Held jobs it no longer has (ended while nobody listened): forgotten.
    pub dropped: Vec<String>,
}

/// Checks the jobs held now against those `system` has on this node and forgets the ones that
/// are gone, saving the claims when any were. A job whose prolog arrives while the batch system
/// is being asked is never dropped: only jobs held before the question are candidates. When the
/// batch system cannot be asked, every claim is kept (the site job's side).
pub async fn reconcile<B: BatchSystem>(
    system: &B,
    claims: &Arc<Claims>,
) -> Result<Reconciled, BatchError> {
    let held = claims.held();
    if held.is_empty() {
        return Ok(Reconciled::default());
    }
    let on_node = system.jobs_on_node().await?;
    let mut r = Reconciled::default();
    for (job, seq) in held {
        if on_node.contains(&job) {
            r.kept.push(job);
        } else if claims.forget(&job, seq) {
            r.dropped.push(job);
        }
    }
    Ok(r)
}

/// Checks the claims a previous run left (at once), then every [`RECONCILE_EVERY`] for epilogs
/// that never reached the daemon; each dropped claim is an event, and the node goes back to the
/// owner policy at once. Runs until `cancel`.
pub async fn reconcile_loop<B: BatchSystem>(
    system: B,
    claims: Arc<Claims>,
    enforcer: mpsc::Sender<EnforcerCommand>,
    factory: FactoryHandle,
    cancel: CancellationToken,
) {
    let name = system.name();
    let mut failing = false;
    loop {
        let wait = match reconcile(&system, &claims).await {
            Ok(r) => {
                failing = false;
                if !r.kept.is_empty() {
                    tracing::info!(
                        "{name}: still on this node, claims kept: job {}",
                        r.kept.join(", job ")
                    );
                }
                if !r.dropped.is_empty() {
                    if let Err(e) = claims.save_async().await {
                        tracing::warn!("{e}");
                    }
                    for job in &r.dropped {
                        let msg = format!(
                            "batch: {name} job {job} is no longer on this node; its claim is dropped"
                        );
                        tracing::info!("{msg}");
                        if factory.note(msg).await.is_err() {
                            return;
                        }
                    }
                    if let Err(e) = apply_now(&enforcer).await {
                        tracing::warn!("{e}");
                        return;
                    }
                }
                RECONCILE_EVERY
            }
            Err(e) => {
                if !failing {
                    let msg = format!(
                        "batch: cannot check the site jobs' claims with {name} ({e}); all are kept, trying again in {}",
                        humantime::format_duration(RECONCILE_RETRY)
                    );
                    tracing::warn!("{msg}");
                    if factory.note(msg).await.is_err() {
                        return;
                    }
                    failing = true;
                }
                RECONCILE_RETRY
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// A hook's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Phase {
    /// A site job arrives: free its CPUs and memory, then return.
    Prolog,
    /// A site job has left: hand its resources back.
    Epilog,
}

/// What a hook did, for its one line on stderr (Slurm logs it).
#[derive(Debug, Clone, PartialEq)]
pub enum HookOutcome {
    Done(String),
    /// Nothing was done (daemon down, refused, no job id...); the job goes ahead regardless.
    Skipped(String),
    /// The deadline passed; the job goes ahead and the daemon finishes on its own.
    TimedOut(Duration),
}

/// One hook call: learn the job from `env`, tell the daemon at `socket`, wait for its answer —
/// all within `deadline`, whatever happens.
pub async fn hook<B: BatchSystem>(
    system: &B,
    phase: Phase,
    socket: &Path,
    env: &BTreeMap<String, String>,
    deadline: Duration,
) -> HookOutcome {
    let work = async {
        let req = match phase {
            Phase::Prolog => {
                // Is anyone there? Asked first, so a stopped daemon costs no scontrol call.
                let mut c = ControlClient::connect(socket)
                    .await
                    .map_err(|e| e.to_string())?;
                let share = system.job_from_env(env).await.map_err(|e| e.to_string())?;
                let req = Request::BatchYield {
                    job: share.job,
                    cpus: share.cpus,
                    memory_bytes: share.memory_bytes,
                };
                return c
                    .call(&req)
                    .await
                    .map(|v| describe(&v))
                    .map_err(|e| e.to_string());
            }
            Phase::Epilog => {
                let job = system
                    .job_id_from_env(env)
                    .ok_or_else(|| format!("no {} job id in the environment", system.name()))?;
                Request::BatchRelease { job }
            }
        };
        let mut c = ControlClient::connect(socket)
            .await
            .map_err(|e| e.to_string())?;
        c.call(&req)
            .await
            .map(|v| describe(&v))
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(deadline, work).await {
        Ok(Ok(s)) => HookOutcome::Done(s),
        Ok(Err(e)) => HookOutcome::Skipped(e),
        Err(_) => HookOutcome::TimedOut(deadline),
    }
}

fn describe(v: &serde_json::Value) -> String {
    v.get("decision")
        .and_then(|d| d.as_str())
        .unwrap_or("done")
        .to_owned()
}

/// Settings a hook runs with: the daemon's socket and the deadline, from the command line, else
/// the settings file's `socket` and `[batch]`, else the defaults. A broken file is not the site
/// job's problem: the defaults are used.
pub fn hook_settings(
    config: Option<&Path>,
    socket: Option<PathBuf>,
    deadline: Option<Duration>,
) -> (PathBuf, Duration, String) {
    let path = config
        .map(Path::to_owned)
        .unwrap_or_else(crate::config::default_path);
    let file = crate::config::read(&path).ok();
    let (file_socket, file_batch) = match &file {
        Some((f, text)) => {
            let o = Origin {
                file: &path,
                text: text.as_str(),
            };
            let b = f
                .batch
                .as_ref()
                .and_then(|b| settings(b.get_ref(), b.span(), &o).ok());
            (f.socket.clone(), b)
        }
        None => (None, None),
    };
    let node = file_batch
        .as_ref()
        .map(|b| b.node.clone())
        .unwrap_or_else(short_hostname);
    (
        socket
            .or(file_socket)
            .unwrap_or_else(crate::control::default_socket),
        deadline
            .or(file_batch.map(|b| b.hook_deadline))
            .unwrap_or(DEFAULT_HOOK_DEADLINE),
        node,
    )
}

/// `gleaner batch-hook prolog|epilog`: always returns (the process then exits 0) within the
/// deadline, whether or not the daemon is there.
pub fn hook_main(
    phase: Phase,
    config: Option<&Path>,
    socket: Option<PathBuf>,
    deadline: Option<Duration>,
) {
    let started = Instant::now();
    let (socket, deadline, node) = hook_settings(config, socket, deadline);
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gleaner batch-hook: cannot start: {e}; the job goes ahead");
            return;
        }
    };
    let slurm = Slurm {
        node,
        timeout: deadline,
    };
    let left = deadline.saturating_sub(started.elapsed());
    let outcome = rt.block_on(hook(&slurm, phase, &socket, &env, left));
    // Do not wait for a killed scontrol or a slow socket on the way out.
    rt.shutdown_background();
    let ms = started.elapsed().as_millis();
    match outcome {
        HookOutcome::Done(s) => eprintln!("gleaner batch-hook: {s} ({ms} ms)"),
        HookOutcome::Skipped(why) => {
            eprintln!("gleaner batch-hook: nothing done, the job goes ahead: {why} ({ms} ms)")
        }
        HookOutcome::TimedOut(_) => eprintln!(
            "gleaner batch-hook: the daemon did not answer within {}; the job goes ahead",
            humantime::format_duration(deadline)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scriptable batch system: the node's jobs (or an error), and a claim to make while the
    /// question is in flight (a prolog racing the check).
    struct FakeBatch {
        jobs: Result<BTreeSet<String>, String>,
        arriving: Option<(Arc<Claims>, &'static str)>,
    }

    impl BatchSystem for FakeBatch {
        fn name(&self) -> &'static str {
            "fake"
        }
        async fn node_state(&self) -> Result<NodeState, BatchError> {
            parse_sinfo("idle 0/2/0/2").map_err(|why| BatchError::Parse {
                command: "fake",
                why,
            })
        }
        fn job_id_from_env(&self, env: &BTreeMap<String, String>) -> Option<String> {
            env.get("FAKE_JOB").cloned()
        }
        async fn job_from_env(
            &self,
            env: &BTreeMap<String, String>,
        ) -> Result<JobShare, BatchError> {
            Ok(JobShare {
                job: self.job_id_from_env(env).unwrap_or_default(),
                cpus: 1,
                memory_bytes: None,
            })
        }
        async fn jobs_on_node(&self) -> Result<BTreeSet<String>, BatchError> {
            if let Some((c, job)) = &self.arriving {
                c.arrive(job, 1, None).unwrap();
            }
            self.jobs.clone().map_err(|stderr| BatchError::Failed {
                command: "fake",
                stderr,
            })
        }
    }

    fn ids(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn claims_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(CLAIMS_FILE);
        let c = Claims::open(4.0, 8 << 30, &file).unwrap();
        assert!(!c.claim().unwrap().active(), "no file: nothing held");
        c.arrive("41", 1, None).unwrap();
        c.arrive("42", 2, Some(1 << 30)).unwrap();
        c.save().unwrap();
        c.arrive("43", 1, None).unwrap();
        assert!(c.leave("43"));
        c.save().unwrap();
        drop(c);
        let c = Claims::open(4.0, 8 << 30, &file).unwrap();
        let k = c.claim().unwrap();
        assert_eq!((k.job, k.jobs, k.cpus, k.free_cores), (Some(42), 2, 3, 1.0));
        assert_eq!(k.free_memory_bytes, Some(7 << 30));
        // Arrivals after the restart are newer than the ones read back.
        c.arrive("7", 1, None).unwrap();
        assert_eq!(c.claim().unwrap().job, Some(7));
        assert!(!dir.path().join("batch-claims.tmp").exists());
        // Memory-only claims write nothing.
        Claims::new(1.0, 1).save().unwrap();
    }

    #[test]
    fn a_broken_claims_file_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(CLAIMS_FILE);
        for (text, want) in [
            ("{\"version\": 1, \"jobs\": {", "EOF"),
            ("{\"version\": 2, \"jobs\": {}}", "version 2 is not known"),
            (
                "{\"version\": 1, \"jobs\": {\"\": {\"cpus\": 1, \"memory_bytes\": null, \"seq\": 1}}}",
                "\"\" is not a job id",
            ),
            (
                "{\"version\": 1, \"jobs\": {}, \"extra\": 1}",
                "unknown field `extra`",
            ),
        ] {
            std::fs::write(&file, text).unwrap();
            let e = Claims::open(2.0, 1 << 30, &file).unwrap_err().to_string();
            assert!(
                e.contains(&file.display().to_string()) && e.contains(want),
                "{text}: {e}"
            );
            assert!(e.contains("remove the file"), "{e}");
        }
    }

    #[tokio::test]
    async fn reconcile_drops_gone_jobs_and_keeps_the_rest() {
        let c = Arc::new(Claims::new(4.0, 8 << 30));
        // Nothing held: the batch system is not even asked.
        let unreachable = FakeBatch {
            jobs: Err("controller down".into()),
            arriving: None,
        };
        assert_eq!(
            reconcile(&unreachable, &c).await.unwrap(),
            Reconciled::default()
        );
        c.arrive("41", 1, None).unwrap();
        c.arrive("42", 2, None).unwrap();
        // Cannot ask: everything is kept.
        assert!(reconcile(&unreachable, &c).await.is_err());
        assert_eq!(c.claim().unwrap().jobs, 2);
        // 41 ended while nobody listened; 43's prolog arrives during the question.
        let racing = FakeBatch {
            jobs: Ok(ids(&["42", "99"])),
            arriving: Some((c.clone(), "43")),
        };
        let r = reconcile(&racing, &c).await.unwrap();
        assert_eq!(r.dropped, vec!["41".to_string()]);
        assert_eq!(r.kept, vec!["42".to_string()]);
        let k = c.claim().unwrap();
        assert_eq!((k.jobs, k.cpus, k.job), (2, 3, Some(43)));
    }

    #[tokio::test]
    async fn hooks_use_the_systems_job_id_and_never_fail_the_job() {
        let fake = FakeBatch {
            jobs: Ok(BTreeSet::new()),
            arriving: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("none.sock");
        let no_env = BTreeMap::new();
        match hook(
            &fake,
            Phase::Epilog,
            &socket,
            &no_env,
            Duration::from_secs(5),
        )
        .await
        {
            HookOutcome::Skipped(why) => assert!(why.contains("no fake job id"), "{why}"),
            other => panic!("{other:?}"),
        }
        let env = BTreeMap::from([("FAKE_JOB".to_string(), "5".to_string())]);
        for phase in [Phase::Prolog, Phase::Epilog] {
            assert!(
                matches!(
                    hook(&fake, phase, &socket, &env, Duration::from_secs(5)).await,
                    HookOutcome::Skipped(_)
                ),
                "no daemon: nothing done, the job goes ahead"
            );
        }
    }

    #[test]
    fn squeue_job_ids() {
        assert_eq!(
            parse_squeue("41 RUNNING\n 42 COMPLETING\n\n").unwrap(),
            ids(&["41", "42"])
        );
        assert!(parse_squeue("").unwrap().is_empty());
        assert!(parse_squeue("squeue: error: x").is_err());
    }

    #[test]
    fn sinfo_states() {
        let n = parse_sinfo("mixed 1/1/0/2\n").unwrap();
        assert_eq!((n.allocated_cpus, n.idle_cpus, n.total_cpus), (1, 1, 2));
        assert!(!n.unavailable);
        assert_eq!(n.state, "mixed");
        assert!(parse_sinfo("drained 0/0/2/2").unwrap().unavailable);
        assert!(parse_sinfo("draining 2/0/0/2").unwrap().unavailable);
        assert!(parse_sinfo("down* 0/0/2/2").unwrap().unavailable);
        assert!(parse_sinfo("maint 0/2/0/2").unwrap().unavailable);
        assert!(!parse_sinfo("idle~ 0/2/0/2").unwrap().unavailable);
        let a = parse_sinfo("allocated 2/0/0/2").unwrap();
        assert!(!a.unavailable && a.allocated_cpus == 2 && a.idle_cpus == 0);
        let a = parse_sinfo("allocated 0/2/0/2").unwrap();
        assert_eq!(
            (a.allocated_cpus, a.idle_cpus),
            (2, 0),
            "the state word wins"
        );
        assert!(parse_sinfo("").is_err());
        assert!(parse_sinfo("idle 0/2/0").is_err());
        assert!(parse_sinfo("idle lots").is_err());
    }

    #[test]
    fn cpus_and_memory_from_slurm() {
        assert_eq!(parse_cpus_per_node("2"), Some(2));
        assert_eq!(parse_cpus_per_node("4(x3)"), Some(4));
        assert_eq!(parse_cpus_per_node("4,2(x2)"), Some(4));
        assert_eq!(parse_cpus_per_node("none"), None);
        assert_eq!(parse_cpus_per_node("0"), None);
        let job = "   NumNodes=1 NumCPUs=1 NumTasks=1 CPUs/Task=1\n     Nodes=vm CPU_IDs=0 Mem=100 GRES=\n   MinCPUsNode=1 MinMemoryNode=100M\n";
        assert_eq!(parse_job_memory(job, "vm"), Some(100 << 20));
        assert_eq!(parse_job_memory("MinMemoryNode=2G", "vm"), Some(2u64 << 30));
        assert_eq!(parse_job_memory("MinMemoryNode=0", "vm"), None);
        assert_eq!(parse_job_memory("NumCPUs=1", "vm"), None);
    }

    #[test]
    fn claims_add_up_and_polls_see_more() {
        let c = Claims::new(4.0, 8 << 30);
        assert!(!c.claim().unwrap().active());
        c.arrive("41", 1, None).unwrap();
        c.arrive("42", 2, Some(1 << 30)).unwrap();
        let k = c.claim().unwrap();
        assert_eq!((k.job, k.jobs, k.cpus, k.free_cores), (Some(42), 2, 3, 1.0));
        assert_eq!(k.free_memory_bytes, Some(7 << 30));
        assert!(c.leave("42"));
        assert!(!c.leave("42"));
        assert_eq!(c.claim().unwrap().cpus, 1);
        assert!(c.arrive("", 1, None).is_err());
        assert!(c.arrive(&"9".repeat(65), 1, None).is_err());
        c.leave("41");
        assert!(c.set_node(parse_sinfo("allocated 4/0/0/4").unwrap()));
        assert!(!c.set_node(parse_sinfo("allocated 4/0/0/4").unwrap()));
        let k = c.claim().unwrap();
        assert_eq!((k.job, k.cpus, k.free_cores), (None, 4, 0.0));
        c.set_node(parse_sinfo("drained 0/0/4/4").unwrap());
        assert!(c.claim().unwrap().unavailable);
    }

    fn parse_batch(text: &str) -> Result<BatchSettings, ConfigError> {
        let file = Path::new("/etc/gleaner/client.toml");
        let f = crate::config::parse(file, text)?;
        let b = f.batch.expect("a [batch] table");
        settings(b.get_ref(), b.span(), &Origin { file, text })
    }

    #[test]
    fn batch_settings_are_strict() {
        let b = parse_batch("[batch]\nsystem = \"slurm\"\n").unwrap();
        assert_eq!(b.mode, Mode::Hook);
        assert_eq!(b.hook_deadline, DEFAULT_HOOK_DEADLINE);
        assert_eq!(b.node, short_hostname());
        let b = parse_batch(
            "[batch]\nsystem = \"slurm\"\nmode = \"poll\"\nnode = \"wn-01\"\npoll_interval = \"2s\"\nhook_deadline = 0.5\n",
        )
        .unwrap();
        assert_eq!(
            (b.mode, b.node.as_str(), b.poll_interval, b.hook_deadline),
            (
                Mode::Poll,
                "wn-01",
                Duration::from_secs(2),
                Duration::from_millis(500)
            )
        );
        let cases: &[(&str, &str)] = &[
            (
                "[batch]\nmode = \"poll\"",
                "client.toml:1: batch.system: missing",
            ),
            (
                "[batch]\nsystem = \"pbs\"",
                "client.toml:2: batch.system: \"pbs\" is not supported",
            ),
            (
                "[batch]\nsystem = \"slurm\"\nmode = \"push\"",
                "client.toml:3: batch.mode: \"push\": write \"hook\"",
            ),
            (
                "[batch]\nsystem = \"slurm\"\nnode = \"a b\"",
                "client.toml:3: batch.node: \"a b\" is not a node name",
            ),
            (
                "[batch]\nsystem = \"slurm\"\nhook_deadline = \"5m\"",
                "client.toml:3: batch.hook_deadline: 5m is out of range",
            ),
            (
                "[batch]\nsystem = \"slurm\"\npoll_interval = \"often\"",
                "client.toml:3: batch.poll_interval: \"often\" is not a duration",
            ),
            (
                "[batch]\nsystem = \"slurm\"\nprolog = true",
                "unknown field `prolog`",
            ),
        ];
        for (text, want) in cases {
            let got = parse_batch(text).unwrap_err().to_string();
            assert!(got.contains(want), "{text:?}: got {got:?}, want {want:?}");
        }
    }
}
