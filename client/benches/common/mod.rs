//! Helpers the client's benchmarks (and tests, for the VM assets) share: the busybox image tarball and the VM kernel + initrd the
//! tests build, percentiles.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use gleaner::Digest;

/// The busybox docker-archive built (and cached) by tests/assets/build.sh: its path and sha256.
pub fn busybox_tarball() -> (PathBuf, Digest) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/assets/build.sh");
    let out = Command::new(&script)
        .output()
        .expect("run tests/assets/build.sh");
    assert!(
        out.status.success(),
        "tests/assets/build.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let (path, sha) = text
        .trim()
        .rsplit('\n')
        .next()
        .and_then(|l| l.split_once(' '))
        .expect("\"<path> <sha256>\"");
    (PathBuf::from(path), sha.parse().expect("sha256"))
}

/// The test VM's kernel and busybox initrd, built (and cached across runs) by
/// client/tests/assets/build-vm-assets.sh, in folders the QEMU user can reach; built once per
/// process. Shared by the client's tests and benches and vmhost's (which include this file).
pub fn vm_assets() -> (PathBuf, PathBuf) {
    static ASSETS: std::sync::OnceLock<(PathBuf, PathBuf)> = std::sync::OnceLock::new();
    ASSETS
        .get_or_init(|| {
            use std::os::unix::fs::PermissionsExt;
            let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-assets/vm");
            let script = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../client/tests/assets/build-vm-assets.sh");
            let st = Command::new("bash")
                .arg(&script)
                .arg(&out)
                .status()
                .expect("bash runs");
            assert!(st.success(), "{} failed", script.display());
            // QEMU runs as libvirt-qemu and must reach them: every folder above gets read and
            // search for others added, never a bit taken away (setting 0755 outright made /tmp
            // lose its sticky bit and its write for all when the target dir was under it).
            let mut p = out.clone();
            while p.pop() && p != Path::new("/") {
                if let Ok(m) = std::fs::metadata(&p) {
                    let mode = m.permissions().mode();
                    if mode & 0o005 != 0o005 {
                        let _ = std::fs::set_permissions(
                            &p,
                            std::fs::Permissions::from_mode(mode | 0o005),
                        );
                    }
                }
            }
            (out.join("vmlinuz"), out.join("initrd.img"))
        })
        .clone()
}

/// The `p` quantile (0..=1) of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Removes the egress networks labelled with `owner` and their iptables chains, with the engine's
/// and iptables' own tools (what a bench that panicked would leave).
#[allow(dead_code)]
pub fn remove_egress_networks(owner: &str) {
    use gleaner_client::runtime::egress::{EgressNames, remove_script};
    use std::io::Write;
    let Ok(out) = Command::new("docker")
        .args(["network", "ls", "--format", "{{.Name}}", "--filter"])
        .arg(format!(
            "label={}={owner}",
            gleaner_client::runtime::OWNER_LABEL
        ))
        .output()
    else {
        return;
    };
    for network in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if let Some(names) = EgressNames::for_network(network)
            && let Ok(rules) = Command::new("iptables").args(["-w", "-S"]).output()
            && let Some(script) = remove_script(&String::from_utf8_lossy(&rules.stdout), &names)
            && let Ok(mut child) = Command::new("iptables-restore")
                .args(["-w", "--noflush"])
                .stdin(std::process::Stdio::piped())
                .spawn()
        {
            if let Some(mut stdin) = child.stdin.take() {
                let _ = stdin.write_all(script.as_bytes());
            }
            let _ = child.wait();
        }
        let _ = Command::new("docker")
            .args(["network", "rm", network])
            .output();
    }
}
