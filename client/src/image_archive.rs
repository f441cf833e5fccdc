//! Builds small container images as docker-archive tarballs, byte-for-byte reproducible, so that a
//! machine type can pin them by sha256: the demo's and the tests' busybox image, made from the
//! host's busybox-static without a registry, `docker build` or `docker import`.

use std::io::{self, Write};
use std::path::Path;

use gleaner::Digest;

/// A file in the image's root filesystem.
pub enum Entry<'a> {
    Dir(&'a str),
    File {
        path: &'a str,
        mode: u32,
        data: &'a [u8],
    },
    Symlink {
        path: &'a str,
        target: &'a str,
    },
}

fn header(path: &str, size: u64, mode: u32, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(kind);
    // Paths are set by the caller through append_data/append_link, which handle long names.
    let _ = path;
    h
}

/// A layer tarball of `entries`, in the order given (callers pass a sorted, stable order).
pub fn layer(entries: &[Entry<'_>]) -> io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    b.mode(tar::HeaderMode::Deterministic);
    for e in entries {
        match e {
            Entry::Dir(p) => {
                let mut h = header(p, 0, 0o755, tar::EntryType::Directory);
                b.append_data(&mut h, p, io::empty())?;
            }
            Entry::File { path, mode, data } => {
                let mut h = header(path, data.len() as u64, *mode, tar::EntryType::Regular);
                b.append_data(&mut h, path, *data)?;
            }
            Entry::Symlink { path, target } => {
                let mut h = header(path, 0, 0o777, tar::EntryType::Symlink);
                b.append_link(&mut h, path, target)?;
            }
        }
    }
    b.into_inner()
}

/// A docker-archive (the format `docker save` writes and `docker load` reads) with one layer.
pub fn docker_archive(layer_tar: &[u8], tag: &str, cmd: &[&str]) -> io::Result<Vec<u8>> {
    let diff_id = Digest::of(layer_tar);
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": cmd,
            "WorkingDir": "/",
        },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{diff_id}")] },
        "history": [{ "created": "1970-01-01T00:00:00Z", "created_by": "gleaner image_archive" }],
    });
    let config_bytes = serde_json::to_vec(&config).map_err(io::Error::other)?;
    let config_id = Digest::of(&config_bytes);
    let manifest = serde_json::json!([{
        "Config": format!("{config_id}.json"),
        "RepoTags": [tag],
        "Layers": [format!("{diff_id}/layer.tar")],
    }]);
    let manifest_bytes = serde_json::to_vec(&manifest).map_err(io::Error::other)?;
    let layer_path = format!("{diff_id}/layer.tar");
    let config_path = format!("{config_id}.json");
    layer(&[
        Entry::Dir(&diff_id.to_string()),
        Entry::File {
            path: &layer_path,
            mode: 0o644,
            data: layer_tar,
        },
        Entry::File {
            path: &config_path,
            mode: 0o644,
            data: &config_bytes,
        },
        Entry::File {
            path: "manifest.json",
            mode: 0o644,
            data: &manifest_bytes,
        },
    ])
}

/// The busybox applets linked into the image (enough for shell payloads).
const APPLETS: &[&str] = &[
    "awk",
    "cat",
    "cp",
    "cut",
    "date",
    "dd",
    "echo",
    "env",
    "expr",
    "false",
    "grep",
    "head",
    "id",
    "kill",
    "ls",
    "md5sum",
    "mkdir",
    "mv",
    "nproc",
    "printf",
    "ps",
    "rm",
    "seq",
    "sh",
    "sha1sum",
    "sha256sum",
    "sleep",
    "sort",
    "tail",
    "tee",
    "test",
    "timeout",
    "touch",
    "tr",
    "true",
    "uname",
    "wc",
    "xargs",
    "yes",
];

/// A busybox image from a static busybox binary (Debian's busybox-static: /bin/busybox).
/// The same binary always gives the same bytes.
pub fn busybox_image(busybox: &Path, tag: &str) -> io::Result<Vec<u8>> {
    let bin = std::fs::read(busybox)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", busybox.display())))?;
    let passwd =
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
    let group = b"root:x:0:\nnogroup:x:65534:\n";
    let mut entries = vec![
        Entry::Dir("bin"),
        Entry::File {
            path: "bin/busybox",
            mode: 0o755,
            data: &bin,
        },
    ];
    let links: Vec<String> = APPLETS.iter().map(|a| format!("bin/{a}")).collect();
    entries.extend(links.iter().map(|p| Entry::Symlink {
        path: p,
        target: "busybox",
    }));
    entries.extend([
        Entry::Dir("dev"),
        Entry::Dir("etc"),
        Entry::File {
            path: "etc/group",
            mode: 0o644,
            data: group,
        },
        Entry::File {
            path: "etc/passwd",
            mode: 0o644,
            data: passwd,
        },
        Entry::Dir("proc"),
        Entry::Dir("root"),
        Entry::Dir("scratch"),
        Entry::Dir("sys"),
        Entry::Dir("tmp"),
    ]);
    docker_archive(&layer(&entries)?, tag, &["/bin/sh"])
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archives_are_reproducible_and_well_formed() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("busybox");
        std::fs::write(&fake, b"\x7fELF not really").unwrap();
        let a = busybox_image(&fake, "gleaner/test:1").unwrap();
        let b = busybox_image(&fake, "gleaner/test:1").unwrap();
        assert_eq!(Digest::of(&a), Digest::of(&b));
        let mut names = Vec::new();
        let mut ar = tar::Archive::new(a.as_slice());
        for e in ar.entries().unwrap() {
            names.push(e.unwrap().path().unwrap().display().to_string());
        }
        assert!(names.contains(&"manifest.json".to_string()), "{names:?}");
        assert!(names.iter().any(|n| n.ends_with("/layer.tar")));
    }
}

#[cfg(test)]
mod docker_tests {
    /// Loads the real busybox image into the real dockerd and runs it hardened.
    #[test]
    fn docker_loads_and_runs_the_busybox_image() {
        let bytes = super::busybox_image(
            std::path::Path::new("/bin/busybox"),
            "gleaner/image-archive-test:1",
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.tar");
        std::fs::write(&path, &bytes).unwrap();
        let out = std::process::Command::new("docker")
            .args(["load", "-i"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = std::process::Command::new("docker")
            .args([
                "run",
                "--rm",
                "--read-only",
                "--network",
                "none",
                "--cap-drop",
                "ALL",
                "gleaner/image-archive-test:1",
                "/bin/sh",
                "-c",
                "echo hi; sha256sum /etc/passwd | cut -c1-8",
            ])
            .output()
            .unwrap();
        let _ = std::process::Command::new("docker")
            .args(["rmi", "gleaner/image-archive-test:1"])
            .output();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("hi\n"));
    }
}
