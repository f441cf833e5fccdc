//! Cluster nodes against a real one-node Slurm cluster on loopback (munged, slurmctld, slurmd
//! started by the test, torn down after it): hook mode freezes Gleaner's workload before a site
//! job's first command, shrinks it for a 1-CPU job and gives the node back afterwards; the prolog
//! never holds a job up when the daemon is down or hung; a job's claim survives a daemon crash
//! and restart, and one whose job ended meanwhile is dropped; poll mode yields within an interval
//! and a drained node drains Gleaner. Also the prolog-delay and poll-latency benchmarks (ignored).
//!
//! Needs `slurmctld slurmd slurm-client munge` (installers/install-deps.sh) and dockerd. Without
//! Slurm the tests skip with a message, unless CI is set: then they fail.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gleaner_client::control::{ControlClient, Request};
use support::*;

/// One Slurm cluster at a time: the tests share the machine's CPUs and would see each other's jobs.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn slurm_installed() -> bool {
    let found = ["slurmctld", "slurmd", "sbatch", "munged"].iter().all(|c| {
        Command::new("sh")
            .args(["-c", &format!("command -v {c}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "Slurm is not installed but CI is set: run installers/install-deps.sh"
        );
        eprintln!(
            "SKIPPED: Slurm is not installed (apt-get install --no-install-recommends \
             slurmctld slurmd slurm-client munge, or installers/install-deps.sh)"
        );
    }
    found
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Which prolog and epilog the cluster runs.
#[derive(Clone, Copy, PartialEq)]
enum Hooks {
    None,
    /// `gleaner batch-hook`, as the department guide shows it.
    Gleaner,
    /// Scripts that only `exit 0`: the baseline for the prolog's delay.
    Empty,
}

/// A one-node Slurm cluster on loopback, stopped (with its jobs) when dropped.
struct Cluster {
    dir: PathBuf,
    node: String,
    conf: PathBuf,
    procs: Vec<Child>,
}

impl Cluster {
    /// Starts munged, slurmctld and slurmd in `dir`; with `hooks`, Gleaner's prolog and epilog
    /// (talking to the daemon at `socket`) run at each job's allocation and end.
    fn start(dir: &Path, socket: &Path, hooks: Hooks) -> Cluster {
        let node = gleaner_client::batch::short_hostname();
        for d in ["munge", "state", "spool", "log", "jobs"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        // munged refuses a socket directory others may write to, and a key others may read.
        mode(&dir.join("munge"), 0o711);
        let key = dir.join("munge/key");
        let mut bytes = [0u8; 1024];
        getrandom::fill(&mut bytes).unwrap();
        std::fs::write(&key, bytes).unwrap();
        mode(&key, 0o400);
        let msock = dir.join("munge/sock");
        let log = |name: &str| std::fs::File::create(dir.join("log").join(name)).unwrap();
        let munged = Command::new("munged")
            .arg("-F")
            .arg("--force")
            .arg(format!("--socket={}", msock.display()))
            .arg(format!("--key-file={}", key.display()))
            .arg(format!("--pid-file={}", dir.join("munge/pid").display()))
            .arg(format!("--seed-file={}", dir.join("munge/seed").display()))
            .stdout(log("munged.out"))
            .stderr(log("munged.err"))
            .spawn()
            .expect("start munged");
        let mut c = Cluster {
            dir: dir.to_owned(),
            node: node.clone(),
            conf: dir.join("slurm.conf"),
            procs: vec![munged],
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !msock.exists() {
            assert!(Instant::now() < deadline, "munged did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let gleaner = env!("CARGO_BIN_EXE_gleaner");
        let hook = |phase: &str| {
            let path = dir.join(format!("{phase}.sh"));
            // As docs/guides/department.md shows it; the hook log is for the tests to read.
            let body = if hooks == Hooks::Empty {
                "#!/bin/sh\nexit 0\n".to_owned()
            } else {
                format!(
                    "#!/bin/sh\n{gleaner} batch-hook {phase} --socket {} --deadline 1s 2>>{}\nexit 0\n",
                    socket.display(),
                    dir.join("log/hook.log").display()
                )
            };
            std::fs::write(&path, body).unwrap();
            mode(&path, 0o755);
            path
        };
        let hooks_conf = if hooks != Hooks::None {
            format!(
                "Prolog={}\nEpilog={}\nPrologFlags=Alloc\n",
                hook("prolog").display(),
                hook("epilog").display()
            )
        } else {
            String::new()
        };
        // The node as slurmd sees it (sockets, cores, threads), less the memory: nothing here
        // asks for memory, and a smaller number keeps `RealMemory` below what the host has.
        let out = Command::new("slurmd")
            .arg("-C")
            .output()
            .expect("slurmd -C");
        let hw: String = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .filter(|w| !w.starts_with("NodeName=") && !w.starts_with("RealMemory="))
            .collect::<Vec<_>>()
            .join(" ");
        assert!(hw.contains("CPUs="), "slurmd -C: {hw:?}");
        let d = dir.display();
        std::fs::write(
            &c.conf,
            format!(
                "ClusterName=gleanertest\n\
                 SlurmctldHost=localhost(127.0.0.1)\n\
                 SlurmctldPort={ctld}\nSlurmdPort={slurmd}\n\
                 AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={msock}\n\
                 SlurmUser=root\nSlurmdUser=root\n\
                 StateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool\n\
                 SlurmctldPidFile={d}/slurmctld.pid\nSlurmdPidFile={d}/slurmd.pid\n\
                 SlurmctldLogFile={d}/log/slurmctld.log\nSlurmdLogFile={d}/log/slurmd.log\n\
                 ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nMpiDefault=none\n\
                 SchedulerType=sched/backfill\nSchedulerParameters=batch_sched_delay=0\n\
                 SelectType=select/cons_tres\nSelectTypeParameters=CR_Core_Memory\n\
                 ReturnToService=2\nJobCompType=jobcomp/none\n\
                 AccountingStorageType=accounting_storage/none\n\
                 {hooks_conf}\
                 NodeName={node} NodeAddr=127.0.0.1 {hw} RealMemory=1024\n\
                 PartitionName=main Nodes={node} Default=YES MaxTime=INFINITE State=UP\n",
                ctld = free_port(),
                slurmd = free_port(),
                msock = msock.display(),
            ),
        )
        .unwrap();
        let ctld = Command::new("slurmctld")
            .args(["-D", "-i"])
            .env("SLURM_CONF", &c.conf)
            .stdout(log("slurmctld.out"))
            .stderr(log("slurmctld.err"))
            .spawn()
            .expect("start slurmctld");
        c.procs.push(ctld);
        let slurmd = Command::new("slurmd")
            .args(["-D", "-N", &node])
            .env("SLURM_CONF", &c.conf)
            .stdout(log("slurmd.out"))
            .stderr(log("slurmd.err"))
            .spawn()
            .expect("start slurmd");
        c.procs.push(slurmd);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if c.node_state().starts_with("idle") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the node did not become idle: {}\n{}",
                c.node_state(),
                std::fs::read_to_string(dir.join("log/slurmctld.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        c
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    fn node_state(&self) -> String {
        self.cmd("sinfo")
            .args(["-h", "-N", "-n", &self.node, "-o", "%T %C"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    }

    /// Submits `script` asking for `cpus`; returns the job id.
    fn submit(&self, cpus: u32, script: &str) -> String {
        let path = self.dir.join(format!("jobs/job-{}.sh", rand_suffix()));
        std::fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        let out = self
            .cmd("sbatch")
            .args([
                "--parsable",
                "-N1",
                "-n1",
                "--mem=64M",
                "-c",
                &cpus.to_string(),
            ])
            .arg("-o")
            .arg(self.dir.join("jobs/%j.out"))
            .arg(&path)
            .output()
            .expect("sbatch");
        assert!(
            out.status.success(),
            "sbatch: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .split(';')
            .next()
            .unwrap()
            .to_owned()
    }

    /// Whether the job is still queued or running.
    fn active(&self, job: &str) -> bool {
        self.cmd("squeue")
            .args(["-h", "-j", job, "-o", "%T"])
            .output()
            .map(|o| !String::from_utf8_lossy(&o.stdout).trim().is_empty())
            .unwrap_or(false)
    }

    fn wait_done(&self, job: &str, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while self.active(job) {
            assert!(
                Instant::now() < deadline,
                "job {job} did not finish in {secs} s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.output(job)
    }

    fn output(&self, job: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("jobs/{job}.out"))).unwrap_or_default()
    }

    fn hook_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log/hook.log")).unwrap_or_default()
    }

    /// Cancels every job and stops the daemons; returns Slurm processes left behind.
    fn stop(&mut self) -> Vec<String> {
        if self.procs.is_empty() {
            return Vec::new();
        }
        let _ = self.cmd("scancel").args(["--user", "root"]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && !slurm_processes("slurmstepd").is_empty() {
            std::thread::sleep(Duration::from_millis(100));
        }
        // slurmd, slurmctld, then munged, each asked politely first.
        for mut p in self.procs.drain(..).rev() {
            let _ = Command::new("kill")
                .args(["-TERM", &p.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while p.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = p.kill();
            let _ = p.wait();
        }
        ["slurmstepd", "slurmd", "slurmctld", "munged"]
            .iter()
            .flat_map(|n| slurm_processes(n))
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Processes named `name` whose command line or environment points into a test cluster.
fn slurm_processes(name: &str) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            (comm.trim() == name).then(|| format!("{name} ({pid})"))
        })
        .collect()
}

fn rand_suffix() -> String {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).unwrap();
    hex::encode(b)
}

/// The daemon with a `[batch]` table, offering one 2-core worker.
fn start_daemon(tmp: &Path, batch: &str, slurm_conf: &Path) -> (Daemon, PathBuf, PathBuf) {
    let state = tmp.join("state");
    let types = tmp.join("types");
    let mut mt = machine_type("cluster-worker", HEARTBEAT);
    mt.cores_max = 2;
    write_type(&types, "w.gmt", &mt);
    let cfg = tmp.join("client.toml");
    std::fs::write(
        &cfg,
        format!(
            "idle_sources = [\"x11\"]\nsuspend_above_load = \"off\"\ncores = 2\nmemory = \"1GiB\"\n\
             max_machines = 1\n\n[batch]\nsystem = \"slurm\"\n{batch}\n"
        ),
    )
    .unwrap();
    std::fs::create_dir_all(&state).unwrap();
    let d = spawn_gleaner(tmp, slurm_conf, "daemon.log");
    (d, state.join("control.sock"), cfg)
}

/// (Re)starts the daemon `start_daemon` set up in `tmp`, with the same state dir and settings,
/// logging to `log` in `tmp`.
fn spawn_gleaner(tmp: &Path, slurm_conf: &Path, log: &str) -> Daemon {
    let cfg = tmp.join("client.toml");
    let mut c = daemon_command(
        &tmp.join("state"),
        &tmp.join("types"),
        &["--config", cfg.to_str().unwrap()],
    );
    c.env_remove("DISPLAY")
        .env("SLURM_CONF", slurm_conf)
        .env("RUST_LOG", "info,gleaner_client::batch=debug")
        .stderr(std::fs::File::create(tmp.join(log)).unwrap());
    Daemon(c.spawn().expect("start gleaner daemon"))
}

/// Waits for the daemon's one machine to run; returns the host id (owner label) and its name.
async fn running_machine(sock: &Path) -> (String, String) {
    let host = eventually(120, "a running machine", async || {
        let mut c = ControlClient::connect(sock).await.ok()?;
        let s = c.call(&Request::Status).await.ok()?;
        let m = s["factory"]["machines"].as_array()?.first()?.clone();
        (m["state"] == "running").then(|| s["host"].as_str().unwrap().to_owned())
    })
    .await;
    let out = Command::new("docker")
        .args(["ps", "--format", "{{.Names}}", "--filter"])
        .arg(format!("label=org.gleaner.owner={host}"))
        .output()
        .expect("docker ps");
    let name = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        !name.is_empty() && !name.contains('\n'),
        "one container: {name:?}"
    );
    (host, name)
}

/// The container: (frozen, NanoCpus), or None when it is gone. Frozen is the engine's pause or
/// Gleaner's cgroup freeze (which the engine's books show as running).
fn inspect(name: &str) -> Option<(bool, i64)> {
    let o = Command::new("docker")
        .args(["inspect", "-f", "{{.HostConfig.NanoCpus}}", name])
        .output()
        .ok()?;
    let nano = String::from_utf8_lossy(&o.stdout).trim().parse().ok()?;
    Some((container_frozen(name)?, nano))
}

/// The job's first command: record whether Gleaner's container is frozen (or gone) and its quota.
fn record_first(name: &str) -> String {
    shell_frozen_and_quota(name)
}

async fn reason(sock: &Path) -> String {
    let mut c = ControlClient::connect(sock).await.unwrap();
    let s = c.call(&Request::Status).await.unwrap();
    s["factory"]["allowance"]["reason"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

struct Containers(Option<String>);
impl Drop for Containers {
    fn drop(&mut self) {
        if let Some(o) = &self.0 {
            remove_owned(o);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_mode_yields_before_every_job_and_never_holds_one_up() {
    if !slurm_installed() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let slurm_dir = tmp.path().join("slurm");
    let (mut daemon, sock, _cfg) =
        start_daemon(tmp.path(), "mode = \"hook\"", &slurm_dir.join("slurm.conf"));
    let mut containers = Containers(None);
    let mut cluster = Cluster::start(&slurm_dir, &sock, Hooks::Gleaner);
    let (host, name) = running_machine(&sock).await;
    containers.0 = Some(host);
    let (paused, before) = inspect(&name).unwrap();
    assert!(!paused);
    assert_eq!(before, 2_000_000_000, "two cores while the node is idle");

    // Whole-node jobs: the workload is frozen before the job's first command, every time; the
    // status names the job; work resumes when it ends.
    let gleaner = env!("CARGO_BIN_EXE_gleaner");
    for round in 0..3 {
        let job = cluster.submit(
            2,
            &format!(
                "{}\n{gleaner} status --json --socket {} | grep -o 'yielding to the batch system[^\"]*'",
                record_first(&name),
                sock.display()
            ),
        );
        let out = cluster.wait_done(&job, 60);
        let first = out.lines().next().unwrap_or("");
        assert!(
            first.starts_with("paused=true") || first == "gone",
            "round {round}: job {job} found the workload running: {out:?}\nhook log:\n{}",
            cluster.hook_log()
        );
        assert!(
            out.contains(&format!("yielding to the batch system (job {job}, 2 CPUs)")),
            "{out:?}"
        );
        eventually(15, "the workload resumes after the job", async || {
            (inspect(&name)? == (false, 2_000_000_000)).then_some(())
        })
        .await;
    }
    assert!(reason(&sock).await.contains("owner is away"));

    // A 1-CPU job on the 2-CPU node: shrunk to the other CPU, not stopped.
    let job = cluster.submit(1, &record_first(&name));
    let out = cluster.wait_done(&job, 60);
    assert_eq!(out.trim(), "paused=false nanocpus=1000000000", "{out:?}");
    eventually(15, "two cores again", async || {
        (inspect(&name)? == (false, 2_000_000_000)).then_some(())
    })
    .await;

    // A hung daemon: the prolog gives up at its deadline (1 s) and the job runs.
    let pid = daemon.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let t = Instant::now();
    let job = cluster.submit(1, "echo ran");
    let out = cluster.wait_done(&job, 30);
    let hung = t.elapsed();
    let _ = Command::new("kill").args(["-CONT", &pid]).status();
    assert_eq!(out.trim(), "ran");
    assert!(
        cluster.hook_log().contains("did not answer within 1s"),
        "{}",
        cluster.hook_log()
    );
    assert!(hung < Duration::from_secs(10), "{hung:?}");

    // The daemon stopped: the prolog returns at once and the job runs.
    let _ = daemon.0.kill();
    let _ = daemon.0.wait();
    let job = cluster.submit(1, "echo ran");
    assert_eq!(cluster.wait_done(&job, 30).trim(), "ran");
    let log = cluster.hook_log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("nothing done"))
        .unwrap_or_else(|| panic!("{log}"));
    let ms: u64 = line
        .rsplit('(')
        .next()
        .and_then(|s| s.trim_end_matches(" ms)").parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(
        ms < 500,
        "the prolog took {ms} ms with the daemon down: {line}"
    );

    let left = cluster.stop();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// The daemon's recent events (`gleaner events`), as one string.
async fn events(sock: &Path) -> String {
    let mut c = ControlClient::connect(sock).await.unwrap();
    c.call(&Request::Events).await.unwrap().to_string()
}

/// Kills the daemon as a crash would (its machines stay as they are) and starts it again on the
/// same state dir; returns once the new one answers.
async fn crash_and_restart(
    daemon: &mut Daemon,
    tmp: &Path,
    slurm_conf: &Path,
    sock: &Path,
    log: &str,
) {
    let _ = daemon.0.kill();
    let _ = daemon.0.wait();
    *daemon = spawn_gleaner(tmp, slurm_conf, log);
    eventually(60, "the restarted daemon answering", async || {
        let mut c = ControlClient::connect(sock).await.ok()?;
        c.call(&Request::Status).await.ok().map(|_| ())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_mode_claims_survive_a_daemon_restart() {
    if !slurm_installed() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let slurm_dir = tmp.path().join("slurm");
    let conf = slurm_dir.join("slurm.conf");
    let (mut daemon, sock, _cfg) = start_daemon(tmp.path(), "mode = \"hook\"", &conf);
    let mut containers = Containers(None);
    let cluster = Cluster::start(&slurm_dir, &sock, Hooks::Gleaner);
    let (host, name) = running_machine(&sock).await;
    containers.0 = Some(host);
    let claims_file = tmp.path().join("state/batch-claims.json");
    let running = |job: &str| {
        cluster
            .cmd("squeue")
            .args(["-h", "-j", job, "-o", "%T"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "RUNNING")
    };

    // A long whole-node job holds the node; the daemon crashes and comes back mid-job.
    let job = cluster.submit(2, "sleep 300");
    eventually(60, "the job running with the workload frozen", async || {
        (running(&job) && inspect(&name)?.0).then_some(())
    })
    .await;
    let saved = std::fs::read_to_string(&claims_file).unwrap();
    assert!(saved.contains(&format!("\"{job}\"")), "{saved}");
    crash_and_restart(&mut daemon, tmp.path(), &conf, &sock, "daemon-2.log").await;
    // The restarted daemon's first decision yields to the job it read back, so the workload it
    // adopted stays frozen...
    let yielding = format!("yielding to the batch system (job {job}, 2 CPUs)");
    eventually(60, "the restarted daemon deciding", async || {
        let r = reason(&sock).await;
        (!r.contains("starting")).then(|| assert!(r.contains(&yielding), "{r}"))
    })
    .await;
    assert_eq!(
        inspect(&name).map(|i| i.0),
        Some(true),
        "frozen after the restart"
    );
    // ...and still after it has checked the claim with Slurm (the job is there, so it is kept).
    eventually(60, "the claim checked and kept", async || {
        let log = std::fs::read_to_string(tmp.path().join("daemon-2.log")).ok()?;
        log.contains(&format!("claims kept: job {job}"))
            .then_some(())
    })
    .await;
    let r = reason(&sock).await;
    assert!(r.contains(&yielding), "{r}");
    assert_eq!(
        inspect(&name).map(|i| i.0),
        Some(true),
        "frozen after the check"
    );
    assert!(running(&job), "the site job still runs");
    // The job ends: its epilog reaches the new daemon and work resumes.
    let _ = cluster.cmd("scancel").arg(&job).status();
    eventually(60, "the workload resumes after the job", async || {
        (inspect(&name)? == (false, 2_000_000_000)).then_some(())
    })
    .await;
    let saved = std::fs::read_to_string(&claims_file).unwrap();
    assert!(!saved.contains(&format!("\"{job}\"")), "{saved}");

    // A claim gone stale: the job ends while the daemon is down, so its epilog is lost.
    let job = cluster.submit(2, "sleep 300");
    eventually(60, "the job running with the workload frozen", async || {
        (running(&job) && inspect(&name)?.0).then_some(())
    })
    .await;
    let _ = daemon.0.kill();
    let _ = daemon.0.wait();
    let _ = cluster.cmd("scancel").arg(&job).status();
    cluster.wait_done(&job, 60);
    assert!(
        std::fs::read_to_string(&claims_file)
            .unwrap()
            .contains(&format!("\"{job}\"")),
        "the claim outlived the job"
    );
    crash_and_restart(&mut daemon, tmp.path(), &conf, &sock, "daemon-3.log").await;
    // Dropped at start with an event saying so, and the node is Gleaner's again.
    let dropped = format!("job {job} is no longer on this node; its claim is dropped");
    eventually(60, "the stale claim dropped", async || {
        events(&sock).await.contains(&dropped).then_some(())
    })
    .await;
    eventually(60, "the workload resumes", async || {
        (inspect(&name)? == (false, 2_000_000_000)).then_some(())
    })
    .await;
    // The factory's copy of the allowance may lag the enforcer's thaw by a tick.
    eventually(
        60,
        "the reason to say the node is Gleaner's again",
        async || reason(&sock).await.contains("owner is away").then_some(()),
    )
    .await;
    let saved = std::fs::read_to_string(&claims_file).unwrap();
    assert!(!saved.contains(&format!("\"{job}\"")), "{saved}");

    let mut cluster = cluster;
    let left = cluster.stop();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_mode_yields_within_an_interval_and_drain_drains() {
    if !slurm_installed() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let slurm_dir = tmp.path().join("slurm");
    std::fs::create_dir_all(&slurm_dir).unwrap();
    // The poller's sinfo finds this cluster through SLURM_CONF, as on a site's node.
    let (_daemon, sock, _cfg) = start_daemon(
        tmp.path(),
        "mode = \"poll\"\npoll_interval = \"1s\"",
        &slurm_dir.join("slurm.conf"),
    );
    let mut containers = Containers(None);
    let mut cluster = Cluster::start(&slurm_dir, &sock, Hooks::None);
    let (host, name) = running_machine(&sock).await;
    containers.0 = Some(host);

    // A whole-node job: frozen within an interval of the job starting.
    let job = cluster.submit(2, "sleep 6");
    eventually(10, "the job running", async || {
        cluster.node_state().starts_with("alloc").then_some(())
    })
    .await;
    let t = Instant::now();
    eventually(5, "frozen", async || inspect(&name)?.0.then_some(())).await;
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );
    let r = reason(&sock).await;
    assert!(
        r.contains("yielding to the batch system (2 CPUs allocated)"),
        "{r}"
    );
    let _ = cluster.cmd("scancel").arg(&job).status();
    eventually(15, "thawed after the job", async || {
        (!inspect(&name)?.0).then_some(())
    })
    .await;

    // A 1-CPU job: shrunk, not stopped.
    let job = cluster.submit(1, "sleep 30");
    eventually(15, "shrunk to one CPU", async || {
        (inspect(&name)? == (false, 1_000_000_000)).then_some(())
    })
    .await;
    let _ = cluster.cmd("scancel").arg(&job).status();
    eventually(15, "two CPUs again", async || {
        (inspect(&name)? == (false, 2_000_000_000)).then_some(())
    })
    .await;

    // The site drains the node: Gleaner drains; resumed, the drain is lifted.
    let update = |state: &str| {
        let ok = cluster
            .cmd("scontrol")
            .args(["update", &format!("nodename={}", cluster.node)])
            .arg(format!("state={state}"))
            .arg("reason=gleaner-test")
            .status()
            .unwrap()
            .success();
        assert!(ok, "scontrol update state={state}");
    };
    update("drain");
    let status = eventually(10, "Gleaner draining", async || {
        let mut c = ControlClient::connect(&sock).await.ok()?;
        let s = c.call(&Request::Status).await.ok()?;
        (s["factory"]["draining"] == true).then_some(s)
    })
    .await;
    let r = status["factory"]["allowance"]["reason"].to_string();
    assert!(r.contains("drained"), "{r}");
    update("resume");
    eventually(10, "the drain lifted", async || {
        let mut c = ControlClient::connect(&sock).await.ok()?;
        let s = c.call(&Request::Status).await.ok()?;
        (s["factory"]["draining"] == false).then_some(())
    })
    .await;

    let left = cluster.stop();
    assert!(left.is_empty(), "left behind: {left:?}");
}

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Submit-to-first-command times (ms) of `n` whole-node jobs, one after another.
fn job_start_delays(cluster: &Cluster, n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let t0 = now_ns();
            let job = cluster.submit(2, "date +%s%N");
            let out = cluster.wait_done(&job, 60);
            let t1: u128 = out.trim().parse().unwrap_or_else(|_| panic!("{out:?}"));
            (t1.saturating_sub(t0)) as f64 / 1e6
        })
        .collect()
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// The delay Gleaner's prolog adds to a site job's start, beside an empty prolog in the same run
/// (docs/BENCHMARKS.md). Not a test: it asserts nothing about time. Run with
/// `cargo test -p gleaner-client --test slurm -- --ignored --nocapture prolog_delay`
/// (`GLEANER_BENCH_JOBS`, default 50).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run it by name with --ignored"]
async fn prolog_delay() {
    if !slurm_installed() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let n: usize = std::env::var("GLEANER_BENCH_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let tmp = tempfile::tempdir().unwrap();
    let base = {
        let mut c = Cluster::start(
            &tmp.path().join("empty"),
            Path::new("/nonexistent"),
            Hooks::Empty,
        );
        job_start_delays(&c, 3);
        let v = job_start_delays(&c, n);
        c.stop();
        v
    };
    let slurm_dir = tmp.path().join("slurm");
    let (_daemon, sock, _cfg) =
        start_daemon(tmp.path(), "mode = \"hook\"", &slurm_dir.join("slurm.conf"));
    let mut containers = Containers(None);
    let mut cluster = Cluster::start(&slurm_dir, &sock, Hooks::Gleaner);
    let (host, name) = running_machine(&sock).await;
    containers.0 = Some(host);
    job_start_delays(&cluster, 3);
    let mut gleaner = Vec::new();
    for _ in 0..n {
        // Each job finds the workload running, as on an idle node.
        eventually(15, "the workload running", async || {
            (!inspect(&name)?.0).then_some(())
        })
        .await;
        gleaner.extend(job_start_delays(&cluster, 1));
    }
    let hook_ms: Vec<f64> = cluster
        .hook_log()
        .lines()
        .filter(|l| l.contains("batch-hook: yielding"))
        .filter_map(|l| l.rsplit('(').next()?.trim_end_matches(" ms)").parse().ok())
        .collect();
    cluster.stop();
    println!("jobs: {n} whole-node (2-CPU) jobs each, one at a time");
    for (what, v) in [("empty prolog", &base), ("gleaner prolog", &gleaner)] {
        println!(
            "{what:>15}: submit to first command p50 {:.1} ms, p99 {:.1} ms",
            percentile(v, 0.5),
            percentile(v, 0.99)
        );
    }
    println!(
        "{:>15}: p50 {:.1} ms, p99 {:.1} ms (the hook's own time, {} prologs)",
        "gleaner hook",
        percentile(&hook_ms, 0.5),
        percentile(&hook_ms, 0.99),
        hook_ms.len()
    );
    println!(
        "{:>15}: p50 {:+.1} ms, p99 {:+.1} ms",
        "added",
        percentile(&gleaner, 0.5) - percentile(&base, 0.5),
        percentile(&gleaner, 0.99) - percentile(&base, 0.99)
    );
}

/// When dockerd paused container `name` between `since_ns` and now (Unix ns), from its event log:
/// the engine's own time, finer than polling `docker inspect`.
fn paused_at(name: &str, since_ns: u128) -> Option<u128> {
    let secs = |ns: u128| format!("{}.{:09}", ns / 1_000_000_000, ns % 1_000_000_000);
    let out = Command::new("docker")
        .args([
            "events",
            "--since",
            &secs(since_ns),
            "--until",
            &secs(now_ns()),
        ])
        .args(["--filter", &format!("container={name}")])
        .args(["--filter", "event=pause", "--format", "{{.TimeNano}}"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse::<u128>().ok())
        .find(|t| *t >= since_ns)
}

/// Poll mode's yield latency against its interval (docs/BENCHMARKS.md): for each interval, `n`
/// whole-node jobs, one at a time and at a random point of the poll cycle, on a node where
/// Gleaner's workload runs; each measures from the job's first command (`date +%s%N`) to dockerd pausing the workload. Not a test: it asserts
/// nothing about time. Run with
/// `cargo test -p gleaner-client --test slurm -- --ignored --nocapture poll_latency`
/// (`GLEANER_BENCH_JOBS`, default 20; `GLEANER_BENCH_INTERVALS`, default "1s,2s").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run it by name with --ignored"]
async fn poll_latency() {
    if !slurm_installed() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let n: usize = std::env::var("GLEANER_BENCH_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let intervals: Vec<String> = std::env::var("GLEANER_BENCH_INTERVALS")
        .unwrap_or_else(|_| "1s,2s".into())
        .split(',')
        .map(|s| s.trim().to_owned())
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let slurm_dir = tmp.path().join("slurm");
    let conf = slurm_dir.join("slurm.conf");
    let mut cluster = Cluster::start(&slurm_dir, Path::new("/nonexistent"), Hooks::None);
    let mut rows = Vec::new();
    for (i, interval) in intervals.iter().enumerate() {
        let iv = humantime::parse_duration(interval).expect("an interval like 1s");
        let dir = tmp.path().join(format!("gleaner-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let (daemon, sock, _cfg) = start_daemon(
            &dir,
            &format!("mode = \"poll\"\npoll_interval = \"{interval}\""),
            &conf,
        );
        let mut containers = Containers(None);
        let (host, name) = running_machine(&sock).await;
        containers.0 = Some(host);
        let (mut from_start, mut from_submit) = (Vec::new(), Vec::new());
        for _ in 0..n {
            // Each job arrives on an idle node where the workload runs at full size.
            eventually(60, "the workload running on the idle node", async || {
                (inspect(&name)? == (false, 2_000_000_000)).then_some(())
            })
            .await;
            // The workload thaws right after a poll: without a random pause, every job would
            // arrive at the same point of the poll cycle, while a site's jobs arrive at any.
            let mut r = [0u8; 4];
            getrandom::fill(&mut r).unwrap();
            tokio::time::sleep(iv.mul_f64(f64::from(u32::from_le_bytes(r)) / f64::from(u32::MAX)))
                .await;
            let submitted = now_ns();
            let job = cluster.submit(2, "date +%s%N\nsleep 60");
            eventually(60, "the workload frozen", async || {
                inspect(&name)?.0.then_some(())
            })
            .await;
            let paused = paused_at(&name, submitted).expect("a pause event in dockerd's log");
            let started: u128 = eventually(60, "the job's first line", async || {
                cluster.output(&job).trim().lines().next()?.parse().ok()
            })
            .await;
            from_start.push((paused as f64 - started as f64) / 1e6);
            from_submit.push((paused.saturating_sub(submitted)) as f64 / 1e6);
            let _ = cluster.cmd("scancel").arg(&job).status();
            cluster.wait_done(&job, 60);
        }
        drop(daemon);
        rows.push((interval.clone(), iv, from_start, from_submit));
    }
    cluster.stop();
    println!("jobs: {n} whole-node (2-CPU) jobs per interval, one at a time");
    for (interval, iv, start, submit) in &rows {
        let ms = iv.as_secs_f64() * 1e3;
        let (p50, p99) = (percentile(start, 0.5), percentile(start, 0.99));
        println!(
            "poll_interval {interval:>5}: job start → frozen p50 {p50:.0} ms ({:.2}× interval), \
             p99 {p99:.0} ms ({:.2}× interval), max {:.0} ms; sbatch → frozen p50 {:.0} ms, p99 {:.0} ms",
            p50 / ms,
            p99 / ms,
            percentile(start, 1.0),
            percentile(submit, 0.5),
            percentile(submit, 0.99),
        );
    }
}
