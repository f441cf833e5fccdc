//! `gleaner-coordinator serve --config FILE`: the installed unit's way of starting it. The file's
//! listen address and database are used, the command line wins over them, and a bad file is refused
//! with its name, the key and the reason before anything listens.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Stdio};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `serve` with `args` and returns its first two stdout lines.
fn first_lines(data: &std::path::Path, args: &[&str]) -> Vec<String> {
    first_n_lines(data, args, 2)
}

/// Starts `serve` with `args` and returns its first `n` stdout lines.
fn first_n_lines(data: &std::path::Path, args: &[&str], n: usize) -> Vec<String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gleaner-coordinator"))
        .arg("--data-dir")
        .arg(data)
        .arg("serve")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let lines: Vec<String> = BufReader::new(out)
        .lines()
        .take(n)
        .map(|l| l.unwrap())
        .collect();
    let _ = child.kill();
    let _ = child.wait();
    lines
}

#[test]
fn serve_reads_its_settings_file() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    let db = t.path().join("from-file.db");
    let port = free_port();
    let cfg = t.path().join("coordinator.toml");
    std::fs::write(
        &cfg,
        format!(
            "# settings\nlisten = \"127.0.0.1:{port}\"\ndatabase = \"sqlite://{}\"\n",
            db.display()
        ),
    )
    .unwrap();
    let lines = first_lines(&data, &["--config", cfg.to_str().unwrap()]);
    assert!(lines[0].starts_with("fingerprint "), "{lines:?}");
    assert_eq!(lines[1], format!("dashboard   https://127.0.0.1:{port}/"));
    assert!(db.exists(), "the file's database was used");

    // The command line wins over the file.
    let other = free_port();
    let lines = first_lines(
        &data,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{other}"),
        ],
    );
    assert_eq!(lines[1], format!("dashboard   https://127.0.0.1:{other}/"));

    // The installed example (every key commented) is valid.
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../installers/config/coordinator.toml"
    );
    let ex_port = free_port();
    let lines = first_lines(
        &data,
        &[
            "--config",
            example,
            "--listen",
            &format!("127.0.0.1:{ex_port}"),
        ],
    );
    assert!(lines[0].starts_with("fingerprint "), "{lines:?}");

    // The space keys: the coordinator joins and prints where it listens in the space.
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{port}\"\nspace = \"physics\"\nspace_listen = [\"/ip4/127.0.0.1/tcp/0\"]\nspace_advert_ttl = 30\n"
        ),
    )
    .unwrap();
    let lines = first_n_lines(&data, &["--config", cfg.to_str().unwrap()], 3);
    assert!(
        lines[2].starts_with("space       /ip4/127.0.0.1/tcp/")
            && lines[2].contains("/p2p/12D3KooW"),
        "{lines:?}"
    );

    // Bad files: refused, saying which file, key and why.
    for (text, want) in [
        (
            "space = \"a/b\"\n",
            "space: \"a/b\": a space name is 1-64 characters",
        ),
        (
            "space = \"x\"\nspace_listen = [\"tcp:4001\"]\n",
            "space_listen: \"tcp:4001\" is not a libp2p address",
        ),
        (
            "space_bootstrap = [\"/ip4/10.0.0.5/tcp/4001\"]\n",
            "space_bootstrap: only means something with a space to join",
        ),
        (
            "space = \"x\"\nspace_advert_ttl = 0\n",
            "space_advert_ttl: 0 is not a number of seconds",
        ),
        ("space = \"x\"\nspace_mdns = \"yes\"\n", "space_mdns"),
        (
            "listen = \"everywhere\"\n",
            "listen: \"everywhere\" is not an address",
        ),
        ("port = 443\n", "unknown field `port`"),
        ("cert = \"/x.pem\"\n", "give both cert and key"),
    ] {
        std::fs::write(&cfg, text).unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_gleaner-coordinator"))
            .arg("--data-dir")
            .arg(&data)
            .args(["serve", "--config", cfg.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains(cfg.to_str().unwrap()) && err.contains(want),
            "{text:?}: {err}"
        );
    }
}
