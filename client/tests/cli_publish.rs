//! The publisher's workflow through the real `gleaner` binary: key, template, sign, verify, show,
//! and every tampering refused with exit code 3 and its reason.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn gleaner(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gleaner"))
        .args(args)
        .current_dir(dir)
        .env("HOME", dir)
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .output()
        .expect("run gleaner")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn publish_sign_verify_and_refuse_tampering() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();

    let o = gleaner(d, &["key", "generate", "--out", "pub.key"]);
    assert!(o.status.success(), "{}", text(&o));
    let mode = std::fs::metadata(d.join("pub.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let id = std::fs::read_to_string(d.join("pub.key.pub"))
        .unwrap()
        .trim()
        .to_string();
    assert!(id.starts_with("12D3KooW"));
    let secret_hex = std::fs::read_to_string(d.join("pub.key"))
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .to_string();
    assert!(
        !text(&o).contains(&secret_hex),
        "the secret must never be printed"
    );
    let o = gleaner(d, &["key", "show", "pub.key"]);
    assert!(text(&o).contains(&id) && !text(&o).contains(&secret_hex));

    // A second generate without --force refuses and keeps the key.
    let o = gleaner(d, &["key", "generate", "--out", "pub.key"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("already exists"));

    let o = gleaner(d, &["machine-type", "new", "demo"]);
    assert!(o.status.success(), "{}", text(&o));
    // Unsigned template hashes are all zeros: signing refuses it with the reason.
    let o = gleaner(
        d,
        &["machine-type", "sign", "demo.toml", "--key", "pub.key"],
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("sha256 is all zeros"), "{}", text(&o));

    let toml = std::fs::read_to_string(d.join("demo.toml"))
        .unwrap()
        .replace(
            "0000000000000000000000000000000000000000000000000000000000000000",
            &"5a".repeat(32),
        );
    std::fs::write(d.join("demo.toml"), toml).unwrap();
    let o = gleaner(
        d,
        &["machine-type", "sign", "demo.toml", "--key", "pub.key"],
    );
    assert!(o.status.success(), "{}", text(&o));

    let o = gleaner(d, &["machine-type", "verify", "demo.gmt"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("signed by {id}")),
        "{}",
        text(&o)
    );
    let o = gleaner(
        d,
        &["machine-type", "verify", "demo.gmt", "--publisher", &id],
    );
    assert!(o.status.success(), "{}", text(&o));

    let o = gleaner(d, &["machine-type", "show", "demo.gmt"]);
    assert!(
        o.status.success() && text(&o).contains("name = \"demo\""),
        "{}",
        text(&o)
    );
    let o = gleaner(d, &["machine-type", "show", "demo.gmt", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(json["publisher"], id.as_str());

    // Someone else's id as the expected publisher.
    let o = gleaner(d, &["key", "generate", "--out", "other.key"]);
    assert!(o.status.success());
    let other = std::fs::read_to_string(d.join("other.key.pub"))
        .unwrap()
        .trim()
        .to_string();
    let o = gleaner(
        d,
        &["machine-type", "verify", "demo.gmt", "--publisher", &other],
    );
    assert_eq!(o.status.code(), Some(3));
    assert!(
        text(&o).contains("not one of the expected publishers"),
        "{}",
        text(&o)
    );

    // Flip one byte near the end (inside the signed payload): bad signature, exit 3.
    let mut bytes = std::fs::read(d.join("demo.gmt")).unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 0x20;
    std::fs::write(d.join("tampered.gmt"), &bytes).unwrap();
    let o = gleaner(d, &["machine-type", "verify", "tampered.gmt"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("bad signature"), "{}", text(&o));

    // Truncated files.
    std::fs::write(d.join("short.gmt"), &bytes[..40]).unwrap();
    let o = gleaner(d, &["machine-type", "verify", "short.gmt"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(text(&o).contains("malformed cbor"), "{}", text(&o));

    // A key readable by others is refused.
    std::fs::set_permissions(d.join("pub.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = gleaner(
        d,
        &["machine-type", "sign", "demo.toml", "--key", "pub.key"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("chmod 600"), "{}", text(&o));
}

#[test]
fn help_teaches() {
    let tmp = tempfile::tempdir().unwrap();
    let o = gleaner(tmp.path(), &["--help"]);
    assert!(o.status.success());
    let t = text(&o);
    assert!(
        t.contains("machine-type") && t.contains("Exit codes"),
        "{t}"
    );
}
