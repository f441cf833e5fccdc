//! The main job end to end: `gleaner demo` brings up a coordinator and three client daemons that
//! run real containers (and, with libvirtd, a VM), until the dashboard shows credit from all three
//! and from the VM project; then it shuts down and nothing is left in the engines.

use std::process::Command;

#[test]
fn demo_reaches_credit_from_every_client_and_leaves_nothing() {
    let gleaner = std::path::PathBuf::from(env!("CARGO_BIN_EXE_gleaner"));
    if !gleaner.with_file_name("gleaner-coordinator").exists() {
        let st = Command::new(env!("CARGO"))
            .args(["build", "-p", "gleaner-coordinator"])
            .status()
            .unwrap();
        assert!(st.success());
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(&gleaner)
        .args([
            "demo",
            "--work-seconds",
            "6",
            "--until-credit",
            "--duration",
            "240",
        ])
        .arg("--dir")
        .arg(dir.path().join("demo"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("every client's credit is on the dashboard"),
        "{text}"
    );
    assert!(text.contains("from 3 volunteers"), "{text}");
    assert!(text.contains("nothing left behind"), "{text}");
    // With libvirtd here, the VM project ran too and its credit reached the dashboard.
    if text.contains("VMs under") {
        assert!(
            text.contains("the VM project's credit (demo-vm-hashing) is on the dashboard"),
            "{text}"
        );
    }
    assert!(
        text.contains("client-1 sees 3 factories"),
        "the daemons found each other: {text}"
    );
    assert!(
        text.contains("the dashboard's space page shows 3"),
        "the coordinator joined the space and shows their capacity: {text}"
    );
    assert!(
        !dir.path().join("demo").exists(),
        "the working folder is removed"
    );
}
