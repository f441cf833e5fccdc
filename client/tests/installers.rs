//! Installer tests: build the Debian packages from the debug binaries, check their contents and
//! maintainer scripts, install them into a fresh Debian 12 root (a container imported from a cached
//! debootstrap), verify the systemd units there, run `gleaner doctor` and the unit's own ExecStart
//! line as the `gleaner` user and the user unit's as a desktop user, then remove (every daemon's
//! containers, and the system daemon's libvirt domains on the host's real libvirtd, go; ledgers stay)
//! and purge, checking what stays and what goes.
//!
//! Needs root, Docker (started by `installers/start-engines.sh`), debootstrap, dpkg-dev and
//! shellcheck (`installers/install-deps.sh`), and the Debian mirror (a package registry) for the
//! first debootstrap and for apt to resolve the packages' dependencies.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd` and returns its stdout, panicking with everything it printed if it fails.
fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(out.status.success(), "{cmd:?} failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The packages, built once per test run by the script CI and releases use.
fn debs() -> &'static Path {
    static DEBS: OnceLock<PathBuf> = OnceLock::new();
    DEBS.get_or_init(|| {
        let out = repo().join("target/installers/debs");
        let _ = std::fs::remove_dir_all(&out);
        // The test's own binary is fresh; the coordinator's is built by `cargo test --workspace`.
        let gleaner = Path::new(env!("CARGO_BIN_EXE_gleaner"));
        assert!(gleaner.exists());
        // <target>/debug/gleaner: the packages take the binaries from this build's target dir,
        // wherever CARGO_TARGET_DIR or a cargo config put it.
        let target = gleaner
            .parent()
            .and_then(Path::parent)
            .expect("the test binary lives in <target>/debug");
        ok(Command::new("bash")
            .arg(repo().join("installers/build-debs.sh"))
            .arg("--out")
            .arg(&out)
            .env("CARGO_TARGET_DIR", target)
            .env("GLEANER_DEBS_NO_BUILD", "1"));
        out
    })
}

fn deb(name: &str) -> PathBuf {
    let dir = debs();
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with(&format!("{name}_")) && f.ends_with(".deb"))
        })
        .unwrap_or_else(|| panic!("no {name} package in {}", dir.display()))
}

/// A Docker image of a fresh Debian 12 root, removed on drop.
struct Image(String);

impl Image {
    fn fresh_debian(tag: &str) -> Image {
        let tarball = ok(Command::new("bash").arg(repo().join("tests/installers/debian-root.sh")));
        let name = format!("gleaner-installers-test:{tag}-{}", std::process::id());
        ok(Command::new("docker")
            .args(["import", tarball.trim()])
            .arg(&name));
        Image(name)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rmi", "-f", &self.0]).output();
    }
}

/// A container left running (`sleep infinity`) for `docker exec`, removed on drop.
struct Container(String);

impl Container {
    fn start(image: &Image, name: &str, args: &[String]) -> Container {
        let name = format!("{name}-{}", std::process::id());
        let _ = Command::new("docker").args(["rm", "-f", &name]).output();
        ok(Command::new("docker")
            // --init reaps the daemon once it exits (sleep as PID 1 would leave a zombie).
            .args(["run", "-d", "--init", "--name", &name, "--network", "host"])
            .args(args)
            .args([&image.0, "sleep", "infinity"]));
        Container(name)
    }

    fn sh(&self, script: &str) -> Output {
        run(Command::new("docker").args(["exec", &self.0, "sh", "-c", script]))
    }

    /// Runs `script` in the container and returns its stdout; panics with its output if it fails.
    fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "in the container, {script:?} failed: {}",
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}

fn docker_socket_gid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/var/run/docker.sock")
        .expect("docker is not running: installers/start-engines.sh starts it")
        .gid()
}

fn docker_cli() -> String {
    ok(Command::new("sh").args(["-c", "command -v docker"]))
        .trim()
        .to_owned()
}

/// The host's libvirtd socket (qemu:///system), when libvirtd runs.
const LIBVIRT_SOCK: &str = "/run/libvirt/libvirt-sock";

/// The value of `key=` in the text of a systemd unit or a desktop entry.
fn unit_key(unit: &str, key: &str) -> String {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key}= missing from the unit:\n{unit}"))
        .to_owned()
}

/// A libvirt domain on the host's libvirtd marked as a Gleaner machine of `owner` (the metadata the
/// client writes), with no disk: started, it sits in the firmware under TCG, cheap and running.
/// Destroyed and undefined on drop.
struct Domain(String);

impl Domain {
    fn define(name: &str, owner: &str) -> Domain {
        let d = Domain(name.to_owned());
        d.undefine();
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><metadata>\
             <gleaner:machine xmlns:gleaner='{ns}' owner='{owner}'/></metadata>\
             <memory unit='MiB'>32</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64'>hvm</type></os><devices/></domain>",
            ns = gleaner_client::runtime::vmhost::METADATA_NS
        );
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), xml).unwrap();
        ok(Command::new("virsh")
            .args(["-c", "qemu:///system", "define"])
            .arg(file.path()));
        d
    }

    fn defined(&self) -> bool {
        support::virsh(&["list", "--all", "--name"])
            .lines()
            .any(|l| l.trim() == self.0)
    }

    fn undefine(&self) {
        support::remove_domains(&self.0);
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        self.undefine();
    }
}

#[test]
fn packages_hold_what_they_promise() {
    let client = deb("gleaner-client");
    let info = ok(Command::new("dpkg-deb").arg("-I").arg(&client));
    for field in [
        "Package: gleaner-client",
        "Depends: ",
        "passwd",
        "ca-certificates",
        "Recommends: docker.io",
    ] {
        assert!(info.contains(field), "control lacks {field:?}:\n{info}");
    }
    let files = ok(Command::new("dpkg-deb").arg("-c").arg(&client));
    for (mode, path) in [
        ("-rwxr-xr-x", "./usr/bin/gleaner"),
        ("-rwxr-xr-x", "./usr/bin/gleaner-vmhost"),
        ("-rw-r--r--", "./lib/systemd/system/gleaner.service"),
        ("-rw-r--r--", "./usr/lib/systemd/user/gleaner.service"),
        ("-rw-r-----", "./etc/gleaner/client.toml"),
        ("-rw-r--r--", "./usr/share/doc/gleaner-client/copyright"),
    ] {
        assert!(
            files
                .lines()
                .any(|l| l.starts_with(mode) && l.ends_with(path)),
            "{path} ({mode}) missing from the client package:\n{files}"
        );
    }
    let coordinator = deb("gleaner-coordinator");
    let files = ok(Command::new("dpkg-deb").arg("-c").arg(&coordinator));
    for path in [
        "./usr/bin/gleaner-coordinator",
        "./lib/systemd/system/gleaner-coordinator.service",
        "./etc/gleaner/coordinator.toml",
    ] {
        assert!(
            files.lines().any(|l| l.ends_with(path)),
            "{path} missing:\n{files}"
        );
    }

    // Maintainer scripts as shipped (not as in the tree): conffiles, syntax, shellcheck.
    let tmp = tempfile::tempdir().unwrap();
    for (pkg, conffile) in [
        (&client, "/etc/gleaner/client.toml"),
        (&coordinator, "/etc/gleaner/coordinator.toml"),
    ] {
        let ctrl = tmp.path().join(pkg.file_name().unwrap());
        ok(Command::new("dpkg-deb").arg("-e").arg(pkg).arg(&ctrl));
        let conffiles = std::fs::read_to_string(ctrl.join("conffiles")).unwrap();
        assert_eq!(conffiles.trim(), conffile);
        for script in ["postinst", "prerm", "postrm"] {
            let path = ctrl.join(script);
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o755, 0o755, "{} is not executable", path.display());
            ok(Command::new("sh").arg("-n").arg(&path));
            ok(Command::new("shellcheck").args(["-s", "sh"]).arg(&path));
        }
    }
    // The other scripts this package ships or runs.
    ok(Command::new("shellcheck")
        .current_dir(repo())
        .args(["installers/build-debs.sh", "installers/install.sh"])
        .args(["tests/installers/debian-root.sh"]));
    // The GUI's package: the binary, its desktop entry and icon; the entry as shipped is valid and
    // launches that binary with that icon.
    let gui = deb("gleaner-gui");
    let info = ok(Command::new("dpkg-deb").arg("-I").arg(&gui));
    assert!(
        info.lines()
            .any(|l| l.starts_with(" Depends: ") && l.contains("gleaner-client")),
        "the GUI package must depend on the client (it only talks to its daemon):\n{info}"
    );
    let files = ok(Command::new("dpkg-deb").arg("-c").arg(&gui));
    let entry = "./usr/share/applications/org.gleaner.Gleaner.desktop";
    for (mode, path) in [
        ("-rwxr-xr-x", "./usr/bin/gleaner-gui"),
        ("-rw-r--r--", entry),
        (
            "-rw-r--r--",
            "./usr/share/icons/hicolor/scalable/apps/org.gleaner.Gleaner.svg",
        ),
    ] {
        assert!(
            files
                .lines()
                .any(|l| l.starts_with(mode) && l.ends_with(path)),
            "{path} ({mode}) missing from the GUI package:\n{files}"
        );
    }
    let shipped = tmp.path().join("gui");
    std::fs::create_dir(&shipped).unwrap();
    ok(Command::new("sh")
        .arg("-c")
        .arg("dpkg-deb --fsys-tarfile \"$1\" | tar -x -C \"$2\" \"$3\"")
        .arg("sh")
        .arg(&gui)
        .arg(&shipped)
        .arg(entry));
    let shipped = shipped.join(entry);
    ok(Command::new("desktop-file-validate").arg(&shipped));
    let desktop = std::fs::read_to_string(&shipped).unwrap();
    assert_eq!(unit_key(&desktop, "Exec"), "gleaner-gui");
    assert_eq!(unit_key(&desktop, "Icon"), "org.gleaner.Gleaner");
}

/// Waits for `want` on the notify socket (what systemd would read), returning everything received.
fn await_notify(sock: &UnixDatagram, want: &str, deadline: Duration) -> Vec<String> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = msg.lines().any(|l| l == want);
            got.push(msg);
            if done {
                return got;
            }
        }
    }
    panic!("no {want} within {deadline:?}; received {got:?}");
}

/// As [`await_notify`] for a daemon started in `c` with its output in `log`: a daemon that never
/// gets ready fails the test with what it printed.
fn await_ready(c: &Container, sock: &UnixDatagram, log: &str) {
    let got = std::panic::catch_unwind(|| await_notify(sock, "READY=1", Duration::from_secs(120)));
    if got.is_err() {
        panic!(
            "no READY=1 within 120 s; {log}:\n{}",
            text(&c.sh(&format!("cat {log}")))
        );
    }
}

#[test]
fn client_and_coordinator_install_run_and_uninstall_in_fresh_debian() {
    let (client, coordinator) = (deb("gleaner-client"), deb("gleaner-coordinator"));
    let image = Image::fresh_debian("install");
    let notify_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(notify_dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let notify = UnixDatagram::bind(notify_dir.path().join("sock")).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    std::fs::set_permissions(
        notify_dir.path().join("sock"),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    let mut mounts = vec![
        "-v".into(),
        format!("{}:/debs:ro", debs().display()),
        "-v".into(),
        "/var/run/docker.sock:/var/run/docker.sock".into(),
        "-v".into(),
        format!("{}:/usr/bin/docker:ro", docker_cli()),
        "-v".into(),
        format!("{}:/notify", notify_dir.path().display()),
    ];
    // The host's libvirtd, reached as the installed client reaches it (qemu:///system over its
    // socket): removal must take the system daemon's domains with it.
    let libvirt = Path::new(LIBVIRT_SOCK).exists();
    if libvirt {
        mounts.extend(["-v".into(), format!("{LIBVIRT_SOCK}:{LIBVIRT_SOCK}")]);
    } else {
        assert!(
            !support::ci(),
            "libvirtd must run in CI (installers/start-engines.sh): no {LIBVIRT_SOCK}"
        );
        eprintln!("SKIPPED (the domains part): no {LIBVIRT_SOCK}; run installers/start-engines.sh");
    }
    let c = Container::start(&image, "gleaner-installers-install", &mounts);
    let (client_name, coord_name) = (
        client.file_name().unwrap().to_str().unwrap(),
        coordinator.file_name().unwrap().to_str().unwrap(),
    );

    // A host with Docker has a docker group owning its socket; apt resolves our Depends for real.
    c.ok(&format!("groupadd -o -g {} docker", docker_socket_gid()));
    c.ok(&format!(
        "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
         --no-install-recommends /debs/{client_name} /debs/{coord_name}"
    ));
    let groups = c.ok("id -nG gleaner");
    assert_eq!(
        groups.split_whitespace().collect::<Vec<_>>(),
        ["gleaner", "docker"]
    );
    assert_eq!(
        c.ok("stat -c '%a %U %G' /var/lib/gleaner /etc/gleaner/client.toml /var/lib/gleaner-coordinator"),
        "750 gleaner gleaner\n640 root gleaner\n750 gleaner-coordinator gleaner-coordinator\n"
    );
    c.ok("test -L /etc/systemd/system/multi-user.target.wants/gleaner.service");
    c.ok("test -L /etc/systemd/system/multi-user.target.wants/gleaner-coordinator.service");
    c.ok("test ! -e /etc/systemd/user/default.target.wants/gleaner.service");

    // Idempotent: configuring again changes nothing.
    c.ok("/var/lib/dpkg/info/gleaner-client.postinst configure 0.1.0-1");
    c.ok("/var/lib/dpkg/info/gleaner-coordinator.postinst configure 0.1.0-1");
    assert_eq!(c.ok("id -nG gleaner"), groups);
    assert_eq!(c.ok("getent passwd gleaner | wc -l").trim(), "1");

    // The units, as installed, with the target's own systemd: no warnings at all.
    let verify = c.sh("systemd-analyze verify gleaner.service gleaner-coordinator.service 2>&1");
    assert!(
        verify.status.success() && text(&verify).trim().is_empty(),
        "systemd-analyze verify: {}",
        text(&verify)
    );
    let verify = c.sh("mkdir -p /tmp/xdg && XDG_RUNTIME_DIR=/tmp/xdg \
         systemd-analyze --user verify /usr/lib/systemd/user/gleaner.service 2>&1");
    assert!(
        verify.status.success() && text(&verify).trim().is_empty(),
        "systemd-analyze --user verify: {}",
        text(&verify)
    );

    // The hardening, as systemd itself assesses the installed units (offline: no systemd runs here
    // to apply it): a low overall exposure (the system unit is at 2.4 of 10 with systemd 252), and
    // the protections the issue names hold.
    let security = c.ok("systemd-analyze security --offline=yes --threshold=30 \
         /lib/systemd/system/gleaner.service 2>&1");
    for setting in ["NoNewPrivileges=", "ProtectSystem=", "ProtectHome="] {
        assert!(
            security
                .lines()
                .any(|l| l.starts_with(&format!("\u{2713} {setting}"))),
            "{setting} does not hold in gleaner.service:\n{security}"
        );
    }
    c.ok("systemd-analyze security --offline=yes --threshold=30 \
          /lib/systemd/system/gleaner-coordinator.service");

    // The daemon's own user reaches Docker through the group the postinst gave it.
    let doctor = c.ok("setpriv --reuid gleaner --regid gleaner --init-groups gleaner doctor");
    assert!(doctor.contains("ok   docker"), "{doctor}");
    // The daemon finds its VM helper beside it, where the package put it.
    assert!(
        doctor.contains("ok   vm helper") && doctor.contains("/usr/bin/gleaner-vmhost"),
        "{doctor}"
    );
    // On a system without root certificates (the package depends on ca-certificates; here they are
    // moved away), HTTPS to a coordinator that is not pinned fails with that reason and the fix.
    let no_roots = c.ok("mv /etc/ssl/certs /etc/ssl/certs.away \
         && { gleaner doctor --coordinator https://127.0.0.1:9 2>&1 || true; } \
         && mv /etc/ssl/certs.away /etc/ssl/certs");
    assert!(
        no_roots.contains("No CA certificates were loaded")
            && no_roots.contains("fix: install the system's root certificates"),
        "{no_roots}"
    );

    // Start the daemon as systemd would from the installed unit: its User=, RuntimeDirectory=,
    // ExecStart= and NOTIFY_SOCKET; systemd reads READY=1 from the socket.
    let unit = c.ok("cat /lib/systemd/system/gleaner.service");
    let key = |k: &str| unit_key(&unit, k);
    let mut exec = key("ExecStart");
    assert!(exec.contains("--config /etc/gleaner/client.toml"), "{exec}");
    // The shipped settings file is valid as installed.
    c.ok("gleaner config check /etc/gleaner/client.toml");
    // Alone: on the host's network it must not join the space of other tests' daemons.
    exec.push_str(" --no-space");
    c.ok(&format!(
        "install -d -o {u} -g {g} -m {m} /run/{d}",
        u = key("User"),
        g = key("Group"),
        m = key("RuntimeDirectoryMode"),
        d = key("RuntimeDirectory")
    ));
    c.ok(&format!(
        "cd / && NOTIFY_SOCKET=/notify/sock setpriv --reuid {u} --regid {g} --init-groups {exec} \
         >/var/log/gleaner-daemon.log 2>&1 & echo $! >/run/daemon.pid",
        u = key("User"),
        g = key("Group"),
    ));
    await_ready(&c, &notify, "/var/log/gleaner-daemon.log");
    // READY=1 comes only once the control socket is bound: status works at once.
    c.ok("test -S /run/gleaner/control.sock || { cat /var/log/gleaner-daemon.log; exit 1; }");
    assert_eq!(
        c.ok("stat -c '%a %U %G' /run/gleaner/control.sock"),
        "660 gleaner gleaner\n"
    );
    c.ok("useradd -m -G gleaner,docker alice && useradd mallory");
    c.ok("gleaner status");
    c.ok("setpriv --reuid alice --regid alice --init-groups gleaner status");
    let refused = c.sh("setpriv --reuid mallory --regid mallory --init-groups gleaner status");
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("permission denied"),
        "{}",
        text(&refused)
    );
    let owner =
        c.ok("gleaner key show /var/lib/gleaner/host.key | awk '$1 == \"id\" { print $2 }'");
    let owner = owner.trim();
    assert!(!owner.is_empty());
    // SIGTERM (systemctl stop) ends it.
    c.ok(
        "kill -TERM $(cat /run/daemon.pid); for i in $(seq 1 240); do \
          kill -0 $(cat /run/daemon.pid) 2>/dev/null || exit 0; sleep 0.25; done; exit 1",
    );
    c.ok("test -f /var/lib/gleaner/ledger.redb && test -f /var/lib/gleaner/host.key");

    // A desktop install: alice runs the user unit's ExecStart with what `systemctl --user` gives
    // it (HOME, XDG_RUNTIME_DIR, NOTIFY_SOCKET), her settings copied as the install guide says.
    let user_unit = c.ok("cat /usr/lib/systemd/user/gleaner.service");
    let ukey = |k: &str| unit_key(&user_unit, k);
    let uid = c.ok("id -u alice").trim().to_owned();
    let as_alice = format!(
        "HOME=/home/alice XDG_RUNTIME_DIR=/run/user/{uid} \
         setpriv --reuid alice --regid alice --init-groups"
    );
    c.ok(&format!(
        "install -d -o alice -g alice -m 0700 /run/user/{uid}"
    ));
    c.ok(&format!(
        "{as_alice} sh -c 'mkdir -p ~/.config/gleaner && cp /etc/gleaner/client.toml ~/.config/gleaner/'"
    ));
    c.ok(&format!(
        "cd /home/alice && NOTIFY_SOCKET=/notify/sock {as_alice} {exec} --no-space \
         >/var/log/alice-daemon.log 2>&1 & echo $! >/run/alice-daemon.pid",
        exec = ukey("ExecStart"),
    ));
    await_ready(&c, &notify, "/var/log/alice-daemon.log");
    // Her state and socket are hers; the unit's ExecReload re-reads ~/.config/gleaner/client.toml
    // (it fails for a daemon that found no settings file); her CLI finds the socket by itself.
    assert_eq!(
        c.ok(&format!(
            "stat -c %U /run/user/{uid}/gleaner/control.sock /home/alice/.local/share/gleaner/host.key"
        )),
        "alice\nalice\n"
    );
    c.ok(&format!("{as_alice} {}", ukey("ExecReload")));
    c.ok(&format!("{as_alice} gleaner status"));
    let alice_id = c.ok(
        "gleaner key show /home/alice/.local/share/gleaner/host.key | awk '$1 == \"id\" { print $2 }'",
    );
    let alice_id = alice_id.trim();
    assert!(!alice_id.is_empty() && alice_id != owner);
    // Her session ends (systemd --user stops the unit with SIGTERM).
    c.ok(
        "kill -TERM $(cat /run/alice-daemon.pid); for i in $(seq 1 240); do \
          kill -0 $(cat /run/alice-daemon.pid) 2>/dev/null || exit 0; sleep 0.25; done; exit 1",
    );

    // The coordinator as its unit starts it (its user, its ExecStart with the installed settings
    // file; on a free port here, beside other tests on the host's network); the installed client
    // reaches it, pinned by the certificate the coordinator made for itself.
    let cunit = c.ok("cat /lib/systemd/system/gleaner-coordinator.service");
    let cexec = unit_key(&cunit, "ExecStart");
    assert!(
        cexec.contains("serve --config /etc/gleaner/coordinator.toml"),
        "{cexec}"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    c.ok(&format!(
        "cd / && setpriv --reuid {u} --regid {g} --init-groups {cexec} --listen 127.0.0.1:{port} \
         >/var/log/coordinator.log 2>&1 & echo $! >/run/coordinator.pid",
        u = unit_key(&cunit, "User"),
        g = unit_key(&cunit, "Group"),
    ));
    let start = Instant::now();
    let log = loop {
        let log = c.ok("cat /var/log/coordinator.log");
        if log.contains("dashboard") {
            break log;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the coordinator did not start from its unit: {log}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let fingerprint = log
        .lines()
        .find_map(|l| l.strip_prefix("fingerprint "))
        .unwrap_or_else(|| panic!("no fingerprint in {log}"))
        .trim();
    let doctor = c.ok(&format!(
        "gleaner doctor --coordinator https://127.0.0.1:{port} --coordinator-fingerprint {fingerprint}"
    ));
    assert!(doctor.contains("ok   coordinator"), "{doctor}");
    c.ok("kill -TERM $(cat /run/coordinator.pid) && test -s /var/lib/gleaner-coordinator/coordinator.db");

    // Removal takes every daemon's containers (the system one's and alice's), the system daemon's
    // domains (one running) and their overlays with it, and nothing else.
    let owned = format!("{}-owned", c.0);
    let alices = format!("{}-alice", c.0);
    let other = format!("{}-other", c.0);
    for (name, label) in [
        (&owned, owner),
        (&alices, alice_id),
        (&other, "someone-else"),
    ] {
        ok(Command::new("docker")
            .args(["create", "--name", name, "--label"])
            .arg(format!("org.gleaner.owner={label}"))
            .args([&image.0, "true"]));
    }
    let domains = libvirt.then(|| {
        let vm_owned = Domain::define(&format!("{}-vm-owned", c.0), owner);
        let vm_other = Domain::define(&format!("{}-vm-other", c.0), "someone-else");
        ok(Command::new("virsh").args(["-c", "qemu:///system", "start", &vm_owned.0]));
        // Its machine folder, where the daemon keeps a VM's overlay and seed.
        c.ok(&format!(
            "install -d -o gleaner -g gleaner /var/lib/gleaner/vms/{n} \
             && touch /var/lib/gleaner/vms/{n}/overlay.qcow2",
            n = vm_owned.0
        ));
        (vm_owned, vm_other)
    });
    // An upgrade (the same package again: prerm upgrade, postinst configure) leaves the workloads
    // for the new daemon to adopt.
    c.ok(&format!("dpkg -i /debs/{client_name}"));
    assert!(
        run(Command::new("docker").args(["inspect", &owned]))
            .status
            .success(),
        "an upgrade removed the daemon's container"
    );
    if let Some((vm_owned, _)) = &domains {
        assert!(vm_owned.defined(), "an upgrade removed the daemon's domain");
    }
    let removed = c.sh("DEBIAN_FRONTEND=noninteractive apt-get remove -y -qq gleaner-client 2>&1");
    let exists = |name: &str| {
        run(Command::new("docker").args(["inspect", name]))
            .status
            .success()
    };
    let left = [exists(&owned), exists(&alices), exists(&other)];
    let _ = Command::new("docker")
        .args(["rm", "-f", &owned, &alices, &other])
        .output();
    assert!(removed.status.success(), "remove: {}", text(&removed));
    assert_eq!(
        left,
        [false, false, true],
        "containers left (system daemon's, alice's, someone else's) after removal: {}",
        text(&removed)
    );
    if let Some((vm_owned, vm_other)) = &domains {
        assert!(
            !vm_owned.defined(),
            "the daemon's domain survived removal: {}",
            text(&removed)
        );
        assert!(
            vm_other.defined(),
            "removal took a domain that is not this daemon's"
        );
        c.ok("test ! -e /var/lib/gleaner/vms");
    }
    // Kept on remove: the ledgers, the keys, the config, the user.
    c.ok(
        "test ! -e /usr/bin/gleaner && test -f /var/lib/gleaner/ledger.redb \
          && test -f /var/lib/gleaner/host.key && test -f /etc/gleaner/client.toml \
          && getent passwd gleaner && test -f /home/alice/.local/share/gleaner/ledger.redb \
          && test -f /home/alice/.local/share/gleaner/host.key",
    );

    // Purge: nothing of the client remains; the coordinator's config dir entry still does.
    c.ok("dpkg --purge gleaner-client");
    c.ok("test ! -e /var/lib/gleaner && test ! -e /etc/gleaner/client.toml \
          && ! getent passwd gleaner && ! getent group gleaner && test -f /etc/gleaner/coordinator.toml \
          && test ! -e /etc/systemd/system/multi-user.target.wants/gleaner.service");
    c.ok("dpkg --purge gleaner-coordinator");
    c.ok(
        "test ! -e /etc/gleaner && test ! -e /var/lib/gleaner-coordinator \
          && ! getent passwd gleaner-coordinator \
          && test ! -e /etc/systemd/system/multi-user.target.wants/gleaner-coordinator.service",
    );
}

#[test]
fn install_sh_sets_up_a_fresh_root_and_uninstalls() {
    let image = Image::fresh_debian("installsh");
    let c = Container::start(
        &image,
        "gleaner-installers-installsh",
        &[
            "-v".into(),
            format!("{}:/src:ro", repo().display()),
            "-v".into(),
            format!("{}:/bin-in/gleaner:ro", env!("CARGO_BIN_EXE_gleaner")),
            "-v".into(),
            format!(
                "{}:/bin-in/gleaner-vmhost:ro",
                support::vmhost_bin().display()
            ),
        ],
    );
    // No Docker on this host: the script installs, says so, and does not fail.
    let out = c.ok("/src/installers/install.sh --binary /bin-in/gleaner 2>&1");
    assert!(
        out.contains("docker"),
        "install.sh said nothing about Docker:\n{out}"
    );
    c.ok("test -x /usr/local/bin/gleaner && /usr/local/bin/gleaner --version");
    // The VM helper beside it, with the libvirt library it links (installed by the script).
    c.ok("/usr/local/bin/gleaner-vmhost --version && ! ldd /usr/local/bin/gleaner-vmhost | grep -q 'not found'");
    c.ok("getent passwd gleaner && test -d /var/lib/gleaner && test -f /etc/gleaner/client.toml");
    c.ok("grep -q '^ExecStart=/usr/local/bin/gleaner daemon' /etc/systemd/system/gleaner.service");
    let verify = c.sh("systemd-analyze verify /etc/systemd/system/gleaner.service 2>&1");
    assert!(
        verify.status.success() && text(&verify).trim().is_empty(),
        "systemd-analyze verify: {}",
        text(&verify)
    );
    c.ok("test -L /etc/systemd/system/multi-user.target.wants/gleaner.service");
    // The user unit for desktop sessions, pointed at the same binary.
    c.ok("grep -q '^ExecStart=/usr/local/bin/gleaner daemon' /etc/systemd/user/gleaner.service");
    let verify = c.sh("mkdir -p /tmp/xdg && XDG_RUNTIME_DIR=/tmp/xdg \
         systemd-analyze --user verify /etc/systemd/user/gleaner.service 2>&1");
    assert!(
        verify.status.success() && text(&verify).trim().is_empty(),
        "systemd-analyze --user verify: {}",
        text(&verify)
    );
    // Twice is the same as once.
    c.ok("/src/installers/install.sh --binary /bin-in/gleaner");
    assert_eq!(c.ok("getent passwd gleaner | wc -l").trim(), "1");
    // A desktop user ran the user unit: her daemon's state (key, ledger, an image cache).
    c.ok(
        "useradd -m alice && setpriv --reuid alice --regid alice --init-groups env HOME=/home/alice \
          sh -c 'd=~/.local/share/gleaner && mkdir -p $d/images && touch $d/ledger.redb \
          && gleaner key generate --out $d/host.key'",
    );
    // Uninstall keeps the ledgers; it cleans alice's daemon up as alice (with no Docker here the
    // cleanup reports that, and the uninstall goes on); --purge removes the system one's state.
    let out =
        c.ok("touch /var/lib/gleaner/ledger.redb && /src/installers/install.sh --uninstall 2>&1");
    assert!(out.contains("cleanup of alice's desktop daemon"), "{out}");
    c.ok(
        "test ! -e /usr/local/bin/gleaner && test ! -e /usr/local/bin/gleaner-vmhost \
          && test ! -e /etc/systemd/system/gleaner.service && test -f /var/lib/gleaner/ledger.redb",
    );
    assert_eq!(
        c.ok("cd /home/alice/.local/share/gleaner && test ! -e images && stat -c '%n %U' host.key ledger.redb && find . ! -user alice"),
        "host.key alice\nledger.redb alice\n"
    );
    c.ok("/src/installers/install.sh --uninstall --purge");
    c.ok("test ! -e /var/lib/gleaner && ! getent passwd gleaner && test ! -e /etc/gleaner");
    // An unsupported distribution is refused with a reason, not half-installed.
    let refused = c.sh(
        "sed -i 's/^ID=.*/ID=plan9/; s/^ID_LIKE=.*//' /etc/os-release && \
                        /src/installers/install.sh --binary /bin-in/gleaner 2>&1",
    );
    assert!(!refused.status.success());
    assert!(text(&refused).contains("plan9"), "{}", text(&refused));
    c.ok("test ! -e /usr/local/bin/gleaner");
}

/// systemd's watchdog (WatchdogSec= in gleaner.service) restarts a daemon that stops pinging.
#[test]
fn daemon_pings_the_watchdog_when_systemd_asks() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&sock_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_gleaner"))
        .arg("daemon")
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--socket")
        .arg(dir.path().join("control.sock"))
        .arg("--no-space")
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "2000000")
        .env_remove("WATCHDOG_PID")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ready = std::panic::catch_unwind(|| {
        await_notify(&notify, "READY=1", Duration::from_secs(60));
        // Two pings within a generous multiple of the 2 s period.
        await_notify(&notify, "WATCHDOG=1", Duration::from_secs(20));
        await_notify(&notify, "WATCHDOG=1", Duration::from_secs(20));
    });
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let _ = daemon.wait();
    if let Err(e) = ready {
        std::panic::resume_unwind(e);
    }
}
