//! Key files on disk: generated from the OS's randomness, written 0600, refused when others can read them.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use gleaner::SecretKey;

/// Why a key file could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: already exists (pass --force to replace it, losing the old key)")]
    Exists { path: PathBuf },
    #[error("{path}: permissions {mode:04o} let others read the secret key; run chmod 600 {path}")]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("{path}: {cause}")]
    Format {
        path: PathBuf,
        cause: gleaner::Error,
    },
    #[error("no randomness from the operating system: {0}")]
    Random(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |cause| KeyError::Io {
        path: path.to_owned(),
        cause,
    }
}

/// A new key from the operating system's random source.
pub fn generate() -> Result<SecretKey, KeyError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(SecretKey::from_seed(seed))
}

/// Writes `key` to `path` with mode 0600 (and its public id beside it, in `<path>.pub`).
pub fn write(path: &Path, key: &SecretKey, force: bool) -> Result<(), KeyError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(io(dir))?;
    }
    if path.exists() && !force {
        return Err(KeyError::Exists {
            path: path.to_owned(),
        });
    }
    // Write to a fresh 0600 temp file and rename, so a crash never leaves a half-written key and the
    // secret never sits in a file with wider permissions.
    let tmp = path.with_extension("key.tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(key.to_file_text().as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))?;
    let pub_path = public_path(path);
    fs::write(&pub_path, format!("{}\n", key.public())).map_err(io(&pub_path))?;
    Ok(())
}

/// Where the public id of the key at `path` is written.
pub fn public_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

/// Reads a secret key, refusing files that group or others can read.
pub fn read(path: &Path) -> Result<SecretKey, KeyError> {
    let meta = fs::metadata(path).map_err(io(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::TooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    let text = fs::read_to_string(path).map_err(io(path))?;
    SecretKey::from_file_text(&text).map_err(|cause| KeyError::Format {
        path: path.to_owned(),
        cause,
    })
}

/// Reads the key at `path`, creating it first if it does not exist (host keys).
pub fn read_or_create(path: &Path) -> Result<SecretKey, KeyError> {
    if path.exists() {
        return read(path);
    }
    let key = generate()?;
    write(path, &key, false)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_key_is_private_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k/publisher.key");
        let key = generate().unwrap();
        write(&path, &key, false).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read(&path).unwrap().seed(), key.seed());
        let id = fs::read_to_string(public_path(&path)).unwrap();
        assert_eq!(id.trim(), key.public().to_string());
        assert!(matches!(
            write(&path, &key, false),
            Err(KeyError::Exists { .. })
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            read(&path),
            Err(KeyError::TooOpen { mode: 0o644, .. })
        ));
    }

    #[test]
    fn keys_differ() {
        assert_ne!(generate().unwrap().seed(), generate().unwrap().seed());
    }
}
