//! `gleaner-space` is shared by the client and the coordinator: it must never pull in an engine
//! (bollard, virt and the libvirt it links) nor either of the crates that share it.

use std::process::Command;

const FORBIDDEN: &[&str] = &[
    "bollard",
    "virt",
    "virt-sys",
    "gleaner-client",
    "gleaner-coordinator",
    "sqlx",
    "axum",
];

#[test]
fn space_crate_links_no_engine_and_neither_sharer() {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "gleaner-space",
            "-e",
            "normal,build",
            "--prefix",
            "none",
            "--format",
            "{p}",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        names.contains(&"libp2p") && names.contains(&"gleaner"),
        "unexpected tree output:\n{tree}"
    );
    let bad: Vec<&&str> = names.iter().filter(|n| FORBIDDEN.contains(n)).collect();
    assert!(bad.is_empty(), "gleaner-space depends on {bad:?}:\n{tree}");
}
