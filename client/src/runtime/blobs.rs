//! A content-addressed blob cache: images, kernels and disks fetched by URL and kept by their
//! SHA-256, verified while they stream and before any engine sees them, with a disk quota and
//! least-recently-used eviction.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use gleaner::Digest;
use sha2::Digest as _;
use tokio::io::AsyncWriteExt;

use super::{EngineKind, ImageSource, PreparedImage, Progress, RuntimeError};

/// The cache directory and its quota.
#[derive(Debug, Clone)]
pub struct BlobCache {
    dir: PathBuf,
    quota_bytes: u64,
    http: reqwest::Client,
    /// Fetches in progress, by digest: a second fetch of the same blob (two machine types on one
    /// image, started in the same tick) waits for the first and then finds it cached.
    fetching: Gates,
}

/// One async gate per digest being fetched; an entry lives while someone holds or waits for it,
/// so the map holds at most the fetches in progress.
#[derive(Debug, Clone, Default)]
struct Gates(Arc<std::sync::Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>>);

/// Held while fetching one digest; dropping it lets the next fetch of that digest go.
struct Gate {
    gates: Gates,
    digest: Digest,
    gate: Arc<tokio::sync::Mutex<()>>,
    held: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Gates {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<tokio::sync::Mutex<()>>>> {
        // The map is left consistent whatever panicked while holding it.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn hold(&self, digest: &Digest) -> Gate {
        let gate = self.map().entry(*digest).or_default().clone();
        let held = gate.clone().lock_owned().await;
        Gate {
            gates: self.clone(),
            digest: *digest,
            gate,
            held: Some(held),
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.held = None;
        let mut map = self.gates.map();
        // Ours and the map's: nobody else holds or waits for this digest.
        if Arc::strong_count(&self.gate) <= 2 {
            map.remove(&self.digest);
        }
    }
}

/// Numbers this process's partial downloads, so that no two fetches ever write the same file
/// (the daemon and the VM helper share the cache directory).
static PARTIAL: AtomicU64 = AtomicU64::new(0);

fn image_err(url: &str, reason: impl Into<String>) -> RuntimeError {
    RuntimeError::Image {
        url: url.to_owned(),
        reason: reason.into(),
    }
}

impl BlobCache {
    /// A VM's disk image fetched into this verified cache, made readable by the QEMU user (never
    /// written: each machine writes its own overlay). Both VM runtimes prepare images so: a
    /// download needs no libvirt.
    pub async fn prepare_vm_image(
        &self,
        source: &ImageSource,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<PreparedImage, RuntimeError> {
        use std::os::unix::fs::PermissionsExt;
        if source.url.starts_with("oci://") {
            return Err(RuntimeError::Unsupported(
                "a vm image cannot be an oci:// reference".into(),
            ));
        }
        let path = self.fetch(&source.url, &source.sha256, progress).await?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).map_err(|e| {
            RuntimeError::Call {
                engine: EngineKind::Libvirt,
                call: "prepare image".into(),
                reason: format!("{}: {e}", path.display()),
            }
        })?;
        let reference = path
            .to_str()
            .ok_or_else(|| {
                RuntimeError::Unsupported(format!("path {} is not UTF-8", path.display()))
            })?
            .to_owned();
        Ok(PreparedImage {
            sha256: source.sha256,
            reference,
        })
    }

    pub fn new(dir: PathBuf, quota_bytes: u64) -> Result<BlobCache, RuntimeError> {
        std::fs::create_dir_all(&dir).map_err(|e| RuntimeError::Call {
            engine: EngineKind::Docker,
            call: "create blob cache".into(),
            reason: format!("{}: {e}", dir.display()),
        })?;
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(15))
            .build()
            .map_err(|e| RuntimeError::Unsupported(crate::pinning::tls_setup_error(&e)))?;
        Ok(BlobCache {
            dir,
            quota_bytes,
            http,
            fetching: Gates::default(),
        })
    }

    /// The cached file of `sha256`, if present.
    pub fn path_of(&self, sha256: &Digest) -> PathBuf {
        self.dir.join(format!("{sha256}.blob"))
    }

    /// Returns the verified local file for `url` + `sha256`, downloading it if needed.
    pub async fn fetch(
        &self,
        url: &str,
        sha256: &Digest,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<PathBuf, RuntimeError> {
        let path = self.path_of(sha256);
        let _fetching = self.fetching.hold(sha256).await;
        if path.exists() {
            // Touch for LRU; a cached blob was verified when it was stored.
            let _ = std::fs::File::options()
                .append(true)
                .open(&path)
                .and_then(|f| f.set_modified(SystemTime::now()));
            return Ok(path);
        }
        let tmp = self.dir.join(format!(
            ".{sha256}.{}-{}.partial",
            std::process::id(),
            PARTIAL.fetch_add(1, Ordering::Relaxed)
        ));
        let result = self.download(url, &tmp, progress).await;
        let actual = match result {
            Ok(d) => d,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
        };
        if &actual != sha256 {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(RuntimeError::HashMismatch {
                url: url.to_owned(),
                expected: *sha256,
                actual,
            });
        }
        tokio::fs::rename(&tmp, &path)
            .await
            .map_err(|e| image_err(url, format!("cannot store in the cache: {e}")))?;
        self.evict(&path);
        Ok(path)
    }

    async fn download(
        &self,
        url: &str,
        tmp: &Path,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<Digest, RuntimeError> {
        let mut out = tokio::fs::File::create(tmp)
            .await
            .map_err(|e| image_err(url, format!("cannot write {}: {e}", tmp.display())))?;
        let mut hasher = sha2::Sha256::new();
        let mut done = 0u64;
        if let Some(path) = url.strip_prefix("file://") {
            let mut f = tokio::fs::File::open(path)
                .await
                .map_err(|e| image_err(url, e.to_string()))?;
            let total = f.metadata().await.ok().map(|m| m.len());
            let mut buf = vec![0u8; 1 << 20];
            loop {
                use tokio::io::AsyncReadExt;
                let n = f
                    .read(&mut buf)
                    .await
                    .map_err(|e| image_err(url, e.to_string()))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n])
                    .await
                    .map_err(|e| image_err(url, e.to_string()))?;
                done += n as u64;
                progress(Progress {
                    done_bytes: done,
                    total_bytes: total,
                });
            }
        } else if url.starts_with("http://") || url.starts_with("https://") {
            let resp = self
                .http
                .get(url)
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|e| image_err(url, e.to_string()))?;
            let total = resp.content_length();
            if let Some(t) = total
                && t > self.quota_bytes
            {
                return Err(image_err(
                    url,
                    format!(
                        "{t} bytes is more than the image quota of {} bytes",
                        self.quota_bytes
                    ),
                ));
            }
            let mut resp = resp;
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| image_err(url, e.to_string()))?
            {
                hasher.update(&chunk);
                out.write_all(&chunk)
                    .await
                    .map_err(|e| image_err(url, e.to_string()))?;
                done += chunk.len() as u64;
                if done > self.quota_bytes {
                    return Err(image_err(url, "larger than the image quota"));
                }
                progress(Progress {
                    done_bytes: done,
                    total_bytes: total,
                });
            }
        } else {
            return Err(image_err(
                url,
                "only http://, https:// and file:// urls can be fetched",
            ));
        }
        out.sync_all()
            .await
            .map_err(|e| image_err(url, e.to_string()))?;
        Ok(Digest(hasher.finalize().into()))
    }

    /// Deletes least recently used blobs until the cache fits its quota (never `keep`).
    fn evict(&self, keep: &Path) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut blobs: Vec<(SystemTime, u64, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "blob"))
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                Some((m.modified().ok()?, m.len(), e.path()))
            })
            .collect();
        let mut total: u64 = blobs.iter().map(|b| b.1).sum();
        blobs.sort();
        for (_, len, path) in blobs {
            if total <= self.quota_bytes {
                break;
            }
            if path != keep && std::fs::remove_file(&path).is_ok() {
                tracing::info!("evicted {} from the image cache", path.display());
                total -= len;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn verifies_caches_and_evicts() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let cache = BlobCache::new(dir.path().join("cache"), 250).unwrap();
        let mut digests = Vec::new();
        for i in 0..3u8 {
            let p = src.join(format!("b{i}"));
            std::fs::write(&p, vec![i; 100]).unwrap();
            let d = Digest::of(&[i; 100]);
            let url = format!("file://{}", p.display());
            let got = cache.fetch(&url, &d, &|_| {}).await.unwrap();
            assert_eq!(std::fs::read(&got).unwrap(), vec![i; 100]);
            digests.push(d);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // Quota 250 bytes holds two blobs: the oldest went.
        assert!(!cache.path_of(&digests[0]).exists());
        assert!(cache.path_of(&digests[2]).exists());
        // A wrong hash is refused and nothing is stored.
        let p = src.join("b1");
        let err = cache
            .fetch(
                &format!("file://{}", p.display()),
                &Digest([9; 32]),
                &|_| {},
            )
            .await
            .unwrap_err();
        assert!(matches!(err, RuntimeError::HashMismatch { .. }), "{err}");
        assert!(!cache.path_of(&Digest([9; 32])).exists());
        let stray = std::fs::read_dir(dir.path().join("cache"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains("partial")
            })
            .count();
        assert_eq!(stray, 0);
    }

    /// Two machine types on one image start in the same tick: their fetches of the same blob
    /// must not write one partial file over each other (before the gate, one of them failed with
    /// a hash mismatch or a vanished partial file, and its type was backed off).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_fetches_of_one_blob_all_get_it() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("big");
        let body: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src, &body).unwrap();
        let d = Digest::of(&body);
        let url = format!("file://{}", src.display());
        let cache = BlobCache::new(dir.path().join("cache"), 1 << 30).unwrap();
        let fetches = (0..4).map(|_| {
            let (cache, url) = (cache.clone(), url.clone());
            tokio::spawn(async move { cache.fetch(&url, &d, &|_| {}).await })
        });
        for f in futures_util::future::join_all(fetches).await {
            let got = f.unwrap().expect("every fetch gets the blob");
            assert_eq!(got, cache.path_of(&d));
        }
        assert_eq!(std::fs::read(cache.path_of(&d)).unwrap(), body);
        let names: Vec<String> = std::fs::read_dir(dir.path().join("cache"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![format!("{d}.blob")], "no partial file is left");
        assert!(
            cache.fetching.map().is_empty(),
            "no gate outlives its fetches"
        );
    }
}
