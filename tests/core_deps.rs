//! The core stays sans-IO: its dependency tree must never gain an I/O crate.

use std::process::Command;

/// Crates that do I/O (runtimes, sockets, engines, databases, files, clocks, randomness from the OS).
const FORBIDDEN: &[&str] = &[
    "tokio",
    "async-std",
    "smol",
    "mio",
    "libp2p",
    "bollard",
    "virt",
    "virt-sys",
    "sqlx",
    "axum",
    "hyper",
    "reqwest",
    "rustls",
    "redb",
    "rusqlite",
    "x11rb",
    "zbus",
    "sysinfo",
    "getrandom",
    "socket2",
    "nix",
    "directories",
    "notify",
    "eframe",
];

#[test]
fn core_dependency_tree_holds_no_io_crate() {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "-p",
            "gleaner",
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
        names.contains(&"ciborium"),
        "unexpected tree output:\n{tree}"
    );
    let bad: Vec<&&str> = names.iter().filter(|n| FORBIDDEN.contains(n)).collect();
    assert!(
        bad.is_empty(),
        "the core depends on I/O crates {bad:?}:\n{tree}"
    );
}
