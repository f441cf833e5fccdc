//! What the `gleaner` binary links: no libvirt (nor the libraries it pulls in), which only the VM
//! helper `gleaner-vmhost` maps, and only while VMs need it (docs/BENCHMARKS.md, idle footprint).

mod support;

use std::path::Path;
use std::process::Command;

/// The shared libraries `ldd` lists for `bin` (DT_NEEDED and what they need).
fn linked(bin: &Path) -> String {
    let out = Command::new("ldd").arg(bin).output().expect("ldd runs");
    assert!(out.status.success(), "ldd {}: {out:?}", bin.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_daemon_links_no_libvirt_and_the_helper_does() {
    let daemon = linked(Path::new(env!("CARGO_BIN_EXE_gleaner")));
    assert!(daemon.contains("libc.so"), "{daemon}");
    let virt: Vec<&str> = daemon.lines().filter(|l| l.contains("virt")).collect();
    assert!(virt.is_empty(), "gleaner links libvirt: {virt:?}");
    // The same check sees libvirt where it is linked: in the helper.
    let helper = linked(&support::vmhost_bin());
    assert!(helper.contains("libvirt.so"), "{helper}");
}

/// Nor does the client crate depend on the libvirt bindings at all (the helper's crate does).
#[test]
fn the_client_crate_depends_on_no_libvirt_bindings() {
    let tree = |pkg: &str| {
        let out = Command::new(env!("CARGO"))
            .args(["tree", "-p", pkg, "-e", "normal,build", "--prefix", "none"])
            .args(["--format", "{p}", "--offline"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("run cargo tree");
        assert!(
            out.status.success(),
            "cargo tree -p {pkg}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect::<Vec<_>>()
    };
    let client = tree("gleaner-client");
    assert!(client.iter().any(|n| n == "bollard"), "{client:?}");
    let virt: Vec<_> = client.iter().filter(|n| n.starts_with("virt")).collect();
    assert!(virt.is_empty(), "gleaner-client depends on {virt:?}");
    assert!(tree("gleaner-vmhost").iter().any(|n| n == "virt"));
}
