//! Helpers for the Docker runtime tests: the busybox image built by tests/assets/build.sh, a tiny
//! HTTP file server on 127.0.0.1 that counts requests, MJF folders, machine specs, and a guard
//! that removes every container carrying a test's owner label even when the test panics.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use gleaner::{Digest, Id16};
use gleaner_client::runtime::docker::DockerRuntime;
use gleaner_client::runtime::egress::{EgressNames, remove_script};
use gleaner_client::runtime::{
    Limits, MachineHandle, MachineSpec, OWNER_LABEL, PreparedImage, Runtime,
};

/// The busybox docker-archive from tests/assets/build.sh (run once per test binary): its path and
/// sha256 as the script printed them.
pub fn busybox_tarball() -> (PathBuf, Digest) {
    static IMG: OnceLock<(PathBuf, Digest)> = OnceLock::new();
    IMG.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/assets/build.sh");
        let out = Command::new(&script)
            .output()
            .expect("run tests/assets/build.sh");
        assert!(
            out.status.success(),
            "tests/assets/build.sh failed (installers/install-deps.sh --start installs busybox-static and starts dockerd): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let line = text.lines().last().expect("build.sh printed nothing");
        let (path, sha) = line.split_once(' ').expect("\"<path> <sha256>\"");
        let path = PathBuf::from(path);
        let digest: Digest = sha.parse().unwrap();
        // The script's word is checked, not trusted.
        assert_eq!(Digest::of(&std::fs::read(&path).unwrap()), digest);
        (path, digest)
    })
    .clone()
}

/// A unique owner label value for one test, so parallel tests never see each other's machines.
pub fn owner(test: &str) -> String {
    format!("test-rt-{test}-{}", std::process::id())
}

/// A runtime labelling its machines with `owner`, caching images in `cache`.
pub async fn runtime(owner: &str, cache: &Path) -> DockerRuntime {
    DockerRuntime::connect(owner, cache.to_owned(), 1 << 30)
        .await
        .expect("dockerd is running (installers/install-deps.sh --start)")
}

/// The busybox image, prepared through the runtime from a file:// url.
pub async fn busybox(rt: &DockerRuntime) -> PreparedImage {
    let (path, sha256) = busybox_tarball();
    rt.prepare_image(
        &gleaner_client::runtime::ImageSource {
            backend: gleaner_client::runtime::Backend::Container,
            url: format!("file://{}", path.display()),
            sha256,
        },
        &|_| {},
    )
    .await
    .unwrap()
}

/// An MJF folder in Vac's layout with a few features and `user_data`.
pub fn mjf_dir(root: &Path, user_data: &str) -> PathBuf {
    let dir = root.join("mjf");
    for (sub, files) in [
        (
            "machinefeatures",
            &[("hs06", "42.5"), ("jobslots", "1")][..],
        ),
        (
            "jobfeatures",
            &[("allocated_cpu", "1"), ("wall_limit_secs", "3600")][..],
        ),
    ] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        for (name, value) in files {
            std::fs::write(dir.join(sub).join(name), value).unwrap();
        }
    }
    std::fs::create_dir_all(dir.join("joboutputs")).unwrap();
    // The workload runs as nobody: it must be able to write its outputs.
    std::fs::set_permissions(
        dir.join("joboutputs"),
        std::fs::Permissions::from_mode(0o1777),
    )
    .unwrap();
    std::fs::write(dir.join("user_data"), user_data).unwrap();
    std::fs::set_permissions(
        dir.join("user_data"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    dir
}

/// A machine spec for `image` running `user_data` (the image's default command runs it).
pub fn spec(owner: &str, name: &str, image: &PreparedImage, mjf: &Path) -> MachineSpec {
    let mut id = [0u8; 16];
    let bytes = Digest::of(format!("{owner}/{name}").as_bytes()).0;
    id.copy_from_slice(&bytes[..16]);
    MachineSpec {
        backend: gleaner_client::runtime::Backend::Container,
        machine_id: Id16(id),
        machine_type: Digest::of(b"docker-runtime-test"),
        name: format!("{owner}-{name}"),
        image: Some(image.clone()),
        kernel: None,
        initrd: None,
        cores: 2,
        limits: Limits {
            cpus: 1.0,
            memory_bytes: 128 << 20,
        },
        disk_bytes: 64 << 20,
        pids_limit: 64,
        mjf_dir: mjf.to_owned(),
        egress: vec![],
        command: None,
        labels: BTreeMap::from([("org.gleaner.test".to_string(), name.to_string())]),
    }
}

/// Runs the docker CLI, independent of our client, and returns its stdout.
pub fn docker_cli(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Every image id in the engine, sorted.
pub fn image_ids() -> Vec<String> {
    let mut ids: Vec<String> = docker_cli(&["images", "-aq", "--no-trunc"])
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Removes what a test made under its owner label on drop (also when it panicked), and checks
/// at the end of a passing test that nothing is left.
pub struct Guard {
    pub owner: String,
    /// Named volumes seen mounted in the test's containers; they must be gone afterwards.
    pub volumes: Mutex<Vec<String>>,
}

impl Guard {
    pub fn new(owner: &str) -> Guard {
        Guard {
            owner: owner.to_owned(),
            volumes: Mutex::new(Vec::new()),
        }
    }

    /// This test's egress networks (named `<machine>-egress`, labelled with the owner).
    pub fn networks(&self) -> Vec<String> {
        docker_cli(&[
            "network",
            "ls",
            "--format",
            "{{.Name}}",
            "--filter",
            &format!("label={OWNER_LABEL}={}", self.owner),
        ])
        .split_whitespace()
        .map(str::to_owned)
        .collect()
    }

    fn containers(&self) -> Vec<String> {
        docker_cli(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label={OWNER_LABEL}={}", self.owner),
        ])
        .split_whitespace()
        .map(str::to_owned)
        .collect()
    }

    /// Remembers the volumes mounted in `m`, to check they are removed with it.
    pub fn track_volumes(&self, m: &MachineHandle) {
        let names = docker_cli(&[
            "inspect",
            "--format",
            "{{range .Mounts}}{{if eq .Type \"volume\"}}{{.Name}} {{end}}{{end}}",
            &m.engine_id,
        ]);
        self.volumes
            .lock()
            .unwrap()
            .extend(names.split_whitespace().map(str::to_owned));
    }

    /// Removes `m` through the runtime and asserts the engine holds nothing of this test's.
    pub async fn finish(&self, rt: &DockerRuntime, machines: &[&MachineHandle]) {
        for m in machines {
            rt.remove(m).await.unwrap();
        }
        let owned = rt.list_owned().await.unwrap();
        assert!(owned.is_empty(), "left behind: {owned:?}");
        assert!(self.containers().is_empty());
        assert!(
            self.networks().is_empty(),
            "networks left behind: {:?}",
            self.networks()
        );
        let volumes: Vec<String> = docker_cli(&["volume", "ls", "-q"])
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        for v in self.volumes.lock().unwrap().iter() {
            assert!(!volumes.contains(v), "volume {v} left behind");
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let ids = self.containers();
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(ids.iter().map(String::as_str));
            let _ = Command::new("docker").args(&args).output();
        }
        // Egress networks and their iptables rules, as the runtime would remove them.
        for network in self.networks() {
            if let Some(names) = EgressNames::for_network(&network) {
                remove_egress_rules(&names);
            }
            let _ = Command::new("docker")
                .args(["network", "rm", &network])
                .output();
        }
    }
}

/// The host's filter table as `iptables -S` prints it.
pub fn iptables_rules() -> String {
    let out = Command::new("iptables")
        .args(["-w", "-S"])
        .output()
        .expect("iptables is installed (installers/install-deps.sh)");
    assert!(
        out.status.success(),
        "iptables -S: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Removes an egress chain and its hooks with the iptables tools, independent of the runtime.
pub fn remove_egress_rules(names: &EgressNames) {
    if let Some(script) = remove_script(&iptables_rules(), names) {
        let mut child = Command::new("iptables-restore")
            .args(["-w", "--noflush"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let _ = child.stdin.take().unwrap().write_all(script.as_bytes());
        let _ = child.wait();
    }
}

/// A minimal HTTP/1.0 file server on 127.0.0.1 for image downloads, counting GET requests per path.
pub struct FileServer {
    pub port: u16,
    files: Arc<Mutex<HashMap<String, PathBuf>>>,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    stop: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FileServer {
    pub fn start() -> FileServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let files: Arc<Mutex<HashMap<String, PathBuf>>> = Arc::default();
        let hits: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (files, hits, stop, served) =
                (files.clone(), hits.clone(), stop.clone(), served.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let _ = serve_one(s, &files, &hits);
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        FileServer {
            port,
            files,
            hits,
            stop,
            served,
            thread: Some(thread),
        }
    }

    /// Serves `file` at `/name` and returns its url.
    pub fn add(&self, name: &str, file: &Path) -> String {
        self.files
            .lock()
            .unwrap()
            .insert(format!("/{name}"), file.to_owned());
        format!("http://127.0.0.1:{}/{name}", self.port)
    }

    /// How many GET requests reached `/name`.
    pub fn hits(&self, name: &str) -> usize {
        self.hits
            .lock()
            .unwrap()
            .get(&format!("/{name}"))
            .copied()
            .unwrap_or(0)
    }
}

fn serve_one(
    stream: TcpStream,
    files: &Mutex<HashMap<String, PathBuf>>,
    hits: &Mutex<HashMap<String, usize>>,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("/").to_owned();
    *hits.lock().unwrap().entry(path.clone()).or_default() += 1;
    let mut out = stream;
    let file = files.lock().unwrap().get(&path).cloned();
    match file.and_then(|f| std::fs::File::open(f).ok()) {
        Some(mut f) => {
            let len = f.metadata()?.len();
            write!(
                out,
                "HTTP/1.0 200 OK\r\nContent-Length: {len}\r\nContent-Type: application/x-tar\r\nConnection: close\r\n\r\n"
            )?;
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                out.write_all(&buf[..n])?;
            }
        }
        None => {
            out.write_all(
                b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )?;
        }
    }
    out.flush()
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Polls `f` every 100 ms until it returns Some, or panics after `secs` with `what`.
pub async fn eventually<T>(secs: u64, what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
