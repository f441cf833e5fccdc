//! A throwaway PostgreSQL cluster on loopback for the PostgreSQL-backed tests and the benchmark:
//! initdb into a temporary directory, pg_ctl start on a free port, stopped (immediate) on drop.
//! As root the server runs as the `postgres` user, since PostgreSQL refuses to run as root.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running cluster; the database `postgres` belongs to the superuser `gleaner`, trusted on
/// loopback.
pub struct PgCluster {
    bin: PathBuf,
    data: PathBuf,
    _dir: tempfile::TempDir,
    pub port: u16,
    as_postgres: bool,
}

/// Where the server programs are: `pg_config --bindir`, else Debian's versioned directory.
fn bindir() -> Option<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() && dir.join("pg_ctl").exists() {
            return Some(dir);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").exists())
        .collect();
    found.sort();
    found.pop()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl PgCluster {
    /// Starts a cluster, or says why it cannot. `durable` keeps fsync on (benchmarks); tests turn
    /// it off since they never crash the database server itself.
    pub fn start(durable: bool) -> Result<PgCluster, String> {
        let bin = bindir().ok_or("no PostgreSQL server programs (apt-get install postgresql)")?;
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let data = dir.path().join("data");
        let as_postgres = is_root();
        if as_postgres {
            let st = Command::new("chown")
                .arg("postgres:postgres")
                .arg(dir.path())
                .status()
                .map_err(|e| format!("chown: {e}"))?;
            if !st.success() {
                return Err("cannot give the cluster directory to the postgres user".into());
            }
        }
        let port = free_port();
        let c = PgCluster {
            bin,
            data,
            _dir: dir,
            port,
            as_postgres,
        };
        c.run(
            "initdb",
            &[
                "-D",
                c.path(&c.data),
                "-U",
                "gleaner",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ],
        )?;
        let opts = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -k {} -c fsync={} -c max_connections=50",
            c.data.display(),
            if durable { "on" } else { "off" }
        );
        let log = c.data.join("server.log");
        c.run(
            "pg_ctl",
            &[
                "-D",
                c.path(&c.data),
                "-l",
                c.path(&log),
                "-o",
                &opts,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
        .map_err(|e| {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            format!("{e}\n{log}")
        })?;
        Ok(c)
    }

    /// Starts a cluster, or returns None (the test is skipped with a message) when PostgreSQL is
    /// not installed here. Under CI=true a missing or failing PostgreSQL fails the test instead.
    pub fn start_or_skip(test: &str) -> Option<PgCluster> {
        match PgCluster::start(false) {
            Ok(c) => Some(c),
            Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
                eprintln!("SKIPPED {test}: no PostgreSQL cluster: {e}");
                None
            }
            Err(e) => panic!("{test}: CI=true needs PostgreSQL: {e}"),
        }
    }

    fn path<'a>(&self, p: &'a Path) -> &'a str {
        p.to_str().expect("temp paths are UTF-8")
    }

    fn run(&self, prog: &str, args: &[&str]) -> Result<(), String> {
        let exe = self.bin.join(prog);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd
            .args(args)
            .output()
            .map_err(|e| format!("{prog}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{prog} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// The URL of a database in this cluster (`postgres` exists from the start).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://gleaner@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a fresh database and returns its URL.
    pub fn create_db(&self, db: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "gleaner", "-d", "postgres", "-v", "ON_ERROR_STOP=1"])
            .args(["-c", &format!("CREATE DATABASE \"{db}\"")])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "create database {db}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.url(db)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.data.to_string_lossy().into_owned();
        let _ = self.run("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }
}
