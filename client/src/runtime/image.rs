//! Container images by content: a docker-archive tarball fetched by URL and pinned by its sha256
//! (verified while it streams, before the engine sees a byte, cached by digest under a disk quota
//! with least-recently-used eviction), or a registry reference pinned by digest (`oci://`).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use bollard::Docker;
use bollard::query_parameters::{
    CreateImageOptionsBuilder, ImportImageOptionsBuilder, RemoveImageOptionsBuilder,
    TagImageOptionsBuilder,
};
use futures_util::StreamExt;
use gleaner::Digest;
use sha2::Digest as _;

use super::blobs::BlobCache;
use super::{EngineKind, ImageSource, PreparedImage, Progress, RuntimeError};

/// The repository (without tag) under which the image verified by `sha256` is kept in the engine.
pub fn image_repo(sha256: &Digest) -> String {
    format!("gleaner/{sha256}")
}

/// The full tag (`gleaner/<sha256-hex>:latest`) of the image verified by `sha256`.
pub fn image_tag(sha256: &Digest) -> String {
    format!("{}:latest", image_repo(sha256))
}

/// A registry image pinned by its manifest digest: `<repository>@sha256:<hex>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciRef {
    /// E.g. `registry.example.org:5000/project/worker`, lowercase, no tag.
    pub repository: String,
    pub digest: Digest,
}

impl std::fmt::Display for OciRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@sha256:{}", self.repository, self.digest)
    }
}

/// Where a machine type's image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageLocation {
    /// A docker-archive tarball at an `http://`, `https://` or `file://` url.
    Tarball(String),
    /// A registry image pulled by digest.
    Registry(OciRef),
}

fn image_err(url: &str, reason: impl Into<String>) -> RuntimeError {
    RuntimeError::Image {
        url: url.to_owned(),
        reason: reason.into(),
    }
}

fn call(call: &'static str) -> impl FnOnce(bollard::errors::Error) -> RuntimeError {
    move |e| RuntimeError::Call {
        engine: EngineKind::Docker,
        call: call.into(),
        reason: e.to_string(),
    }
}

/// Classifies `url`, and for `oci://` checks that the reference is pinned to exactly `sha256`.
///
/// Accepted: `oci://<repository>` (the digest comes from the machine type) or
/// `oci://<repository>@sha256:<hex>` where `<hex>` must equal the machine type's digest. A tag
/// (`:1.2`) is refused: a tag can move, a digest cannot.
pub fn parse_location(url: &str, sha256: &Digest) -> Result<ImageLocation, RuntimeError> {
    let Some(rest) = url.strip_prefix("oci://") else {
        return if ["http://", "https://", "file://"]
            .iter()
            .any(|p| url.starts_with(p))
        {
            Ok(ImageLocation::Tarball(url.to_owned()))
        } else {
            Err(image_err(
                url,
                "the url must start with http://, https://, file:// or oci://",
            ))
        };
    };
    let (repository, pinned) = match rest.split_once('@') {
        Some((repo, d)) => {
            let hex = d
                .strip_prefix("sha256:")
                .ok_or_else(|| image_err(url, "only sha256 digests are accepted"))?;
            let digest: Digest = hex
                .parse()
                .map_err(|e| image_err(url, format!("bad digest: {e}")))?;
            (repo, Some(digest))
        }
        None => (rest, None),
    };
    if let Some(d) = pinned
        && &d != sha256
    {
        return Err(image_err(
            url,
            format!("the reference pins sha256:{d} but the machine type requires sha256:{sha256}"),
        ));
    }
    if repository.is_empty() {
        return Err(image_err(url, "no repository named"));
    }
    // The last path component may carry a port only in its first component (the registry host),
    // so a ':' after the last '/' is a tag.
    let last = repository.rsplit('/').next().unwrap_or(repository);
    if last.contains(':') {
        return Err(image_err(
            url,
            "a tag is not a pin: name the image by digest only",
        ));
    }
    let ok_char = |c: char| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-' | '/' | ':')
    };
    if !repository.chars().all(ok_char)
        || repository.starts_with(['/', '.', '-', ':'])
        || repository.ends_with(['/', '.', '-', ':'])
        || repository.contains("//")
    {
        return Err(image_err(
            url,
            "the repository must be lowercase letters, digits and . _ - / (host:port first)",
        ));
    }
    Ok(ImageLocation::Registry(OciRef {
        repository: repository.to_owned(),
        digest: *sha256,
    }))
}

/// What a docker-archive tarball would load, read before the engine sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveInfo {
    /// The image id the engine will give it: `sha256:` + the hash of its config, computed here.
    pub image_id: String,
    /// The tags the engine would create on load.
    pub repo_tags: Vec<String>,
}

const SMALL_ENTRY: u64 = 1 << 20;

/// Reads `manifest.json` of a docker-archive (`docker save`) tarball and hashes its image config.
/// Refuses anything that is not exactly one image in that format.
pub fn inspect_archive(path: &Path) -> Result<ArchiveInfo, String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Entry {
        config: String,
        #[serde(default)]
        repo_tags: Option<Vec<String>>,
    }
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(file));
    let mut manifest: Option<Vec<Entry>> = None;
    // Hashes of the small entries that can be the image config; the manifest usually comes last.
    let mut hashes: BTreeMap<String, String> = BTreeMap::new();
    let entries = archive
        .entries()
        .map_err(|e| format!("not a tar archive: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("not a tar archive: {e}"))?;
        let name = entry
            .path()
            .map_err(|e| format!("bad entry name: {e}"))?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_owned();
        let size = entry.header().size().unwrap_or(u64::MAX);
        if name == "manifest.json" {
            if size > SMALL_ENTRY {
                return Err("manifest.json is larger than 1 MiB".into());
            }
            let mut text = Vec::new();
            entry
                .read_to_end(&mut text)
                .map_err(|e| format!("cannot read manifest.json: {e}"))?;
            manifest = Some(
                serde_json::from_slice(&text)
                    .map_err(|e| format!("manifest.json is not a docker-archive manifest: {e}"))?,
            );
        } else if size <= SMALL_ENTRY
            && ((name.ends_with(".json") && !name.contains('/'))
                || name.starts_with("blobs/sha256/"))
        {
            let mut data = Vec::new();
            entry
                .read_to_end(&mut data)
                .map_err(|e| format!("cannot read {name}: {e}"))?;
            hashes.insert(name, hex::encode(sha2::Sha256::digest(&data)));
        }
    }
    let mut manifest =
        manifest.ok_or("no manifest.json: not a docker-archive (docker save) tarball")?;
    if manifest.len() != 1 {
        return Err(format!(
            "the archive holds {} images; exactly one is accepted",
            manifest.len()
        ));
    }
    let entry = manifest.remove(0);
    let config = entry.config.trim_start_matches("./");
    let hash = hashes
        .get(config)
        .ok_or_else(|| format!("the image config {config} is missing or larger than 1 MiB"))?;
    let named = config
        .strip_prefix("blobs/sha256/")
        .or_else(|| config.strip_suffix(".json"))
        .unwrap_or(config);
    if named != hash {
        return Err(format!(
            "the image config {config} does not hash to its name (sha256 {hash})"
        ));
    }
    Ok(ArchiveInfo {
        image_id: format!("sha256:{hash}"),
        repo_tags: entry.repo_tags.unwrap_or_default(),
    })
}

/// The image cache: verified tarballs by digest under a quota, loaded into the engine on demand.
///
/// The quota bounds the tarballs kept here; the images loaded into the engine stay until removed
/// with [`ImageStore::remove`] (the engine may share them between containers).
#[derive(Debug, Clone)]
pub struct ImageStore {
    blobs: BlobCache,
}

impl ImageStore {
    /// A store keeping at most `quota_bytes` of tarballs in `dir` (created if missing).
    pub fn new(dir: PathBuf, quota_bytes: u64) -> Result<ImageStore, RuntimeError> {
        Ok(ImageStore {
            blobs: BlobCache::new(dir, quota_bytes)?,
        })
    }

    /// Whether the verified tarball of `sha256` is in the cache.
    pub fn is_cached(&self, sha256: &Digest) -> bool {
        self.blobs.path_of(sha256).exists()
    }

    /// Downloads (or finds in the cache) the tarball of `source`, verified; loads nothing.
    pub async fn fetch(
        &self,
        source: &ImageSource,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<PathBuf, RuntimeError> {
        self.blobs
            .fetch(&source.url, &source.sha256, progress)
            .await
    }

    /// Makes `source` available in the engine. A tarball is verified against its sha256 before the
    /// engine sees it; an image the engine already holds under `gleaner/<sha256>` is a cache hit
    /// (no download). The returned reference is the engine's image id, so a container is created
    /// from exactly what was verified even if someone moves the tag later.
    pub async fn prepare(
        &self,
        docker: &Docker,
        source: &ImageSource,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<PreparedImage, RuntimeError> {
        match parse_location(&source.url, &source.sha256)? {
            ImageLocation::Registry(r) => self.pull(docker, &r).await,
            ImageLocation::Tarball(url) => {
                let tag = image_tag(&source.sha256);
                if let Some(id) = image_id(docker, &tag).await? {
                    // Keep the tarball fresh in the LRU order too, if it is still here.
                    if self.is_cached(&source.sha256) {
                        self.fetch(source, progress).await?;
                    }
                    return Ok(PreparedImage {
                        sha256: source.sha256,
                        reference: id,
                    });
                }
                let path = self.fetch(source, progress).await?;
                let id = self.load(docker, &path, &url, &source.sha256).await?;
                Ok(PreparedImage {
                    sha256: source.sha256,
                    reference: id,
                })
            }
        }
    }

    async fn pull(&self, docker: &Docker, r: &OciRef) -> Result<PreparedImage, RuntimeError> {
        let pinned = r.to_string();
        if image_id(docker, &pinned).await?.is_none() {
            let opts = CreateImageOptionsBuilder::default()
                .from_image(&pinned)
                .build();
            let mut pull = docker.create_image(Some(opts), None, None);
            while let Some(m) = pull.next().await {
                m.map_err(call("create image (pull)"))?;
            }
        }
        Ok(PreparedImage {
            sha256: r.digest,
            reference: pinned,
        })
    }

    /// Loads a verified docker-archive into the engine, tags it `gleaner/<sha256>:latest` and
    /// returns its image id. Refuses an archive whose own tags would re-point a tag the engine
    /// already holds for another image, and removes the tags the load added beside ours.
    async fn load(
        &self,
        docker: &Docker,
        path: &Path,
        url: &str,
        sha256: &Digest,
    ) -> Result<String, RuntimeError> {
        let p = path.to_owned();
        let info = tokio::task::spawn_blocking(move || inspect_archive(&p))
            .await
            .map_err(|e| image_err(url, format!("archive check panicked: {e}")))?
            .map_err(|e| image_err(url, e))?;
        let mut added = Vec::new();
        for t in &info.repo_tags {
            match image_id(docker, t).await? {
                Some(id) if id != info.image_id => {
                    return Err(image_err(
                        url,
                        format!("the archive would re-point the engine's tag {t} (now {id})"),
                    ));
                }
                Some(_) => {}
                None => added.push(t.clone()),
            }
        }
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| image_err(url, format!("cannot open {}: {e}", path.display())))?;
        let mut out = docker.import_image_stream(
            ImportImageOptionsBuilder::default().quiet(true).build(),
            tokio_util::io::ReaderStream::new(file),
            None,
        );
        while let Some(msg) = out.next().await {
            let msg = msg.map_err(call("load image"))?;
            if let Some(e) = msg.error_detail.and_then(|d| d.message) {
                return Err(RuntimeError::Call {
                    engine: EngineKind::Docker,
                    call: "load image".into(),
                    reason: e,
                });
            }
        }
        if image_id(docker, &info.image_id).await?.is_none() {
            return Err(image_err(
                url,
                format!("the engine did not load image {}", info.image_id),
            ));
        }
        docker
            .tag_image(
                &info.image_id,
                Some(
                    TagImageOptionsBuilder::default()
                        .repo(&image_repo(sha256))
                        .tag("latest")
                        .build(),
                ),
            )
            .await
            .map_err(call("tag image"))?;
        for t in added {
            let opts = RemoveImageOptionsBuilder::default().noprune(true).build();
            // Untagging only: the image keeps our tag, so nothing is deleted.
            if let Err(e) = docker.remove_image(&t, Some(opts), None).await {
                tracing::warn!("cannot remove the tag {t} that loading {url} added: {e}");
            }
        }
        Ok(info.image_id)
    }

    /// Removes the engine's `gleaner/<sha256>` image (unless a container uses it) and the tarball.
    pub async fn remove(&self, docker: &Docker, sha256: &Digest) -> Result<(), RuntimeError> {
        match docker
            .remove_image(
                &image_tag(sha256),
                None::<bollard::query_parameters::RemoveImageOptions>,
                None,
            )
            .await
        {
            Ok(_) => {}
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            Err(e) => return Err(call("remove image")(e)),
        }
        match std::fs::remove_file(self.blobs.path_of(sha256)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(image_err(
                &sha256.to_string(),
                format!("cannot delete the cached tarball: {e}"),
            )),
        }
    }
}

/// The engine's image id for `reference`, or None when it has no such image.
pub async fn image_id(docker: &Docker, reference: &str) -> Result<Option<String>, RuntimeError> {
    match docker.inspect_image(reference).await {
        Ok(i) => Ok(i.id),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(e) => Err(call("inspect image")(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(b: u8) -> Digest {
        Digest([b; 32])
    }

    #[test]
    fn tarball_urls_pass_through() {
        for u in [
            "http://127.0.0.1:8080/a.tar",
            "https://x.org/a.tar",
            "file:///tmp/a",
        ] {
            assert_eq!(
                parse_location(u, &d(1)).unwrap(),
                ImageLocation::Tarball(u.into())
            );
        }
        assert!(parse_location("ftp://x/a.tar", &d(1)).is_err());
        assert!(parse_location("/tmp/a.tar", &d(1)).is_err());
    }

    #[test]
    fn oci_references_are_pinned_by_digest() {
        let hex = d(0xab).to_string();
        let r = parse_location("oci://registry.example.org:5000/proj/worker", &d(0xab)).unwrap();
        let ImageLocation::Registry(r) = r else {
            panic!("not a registry ref")
        };
        assert_eq!(r.repository, "registry.example.org:5000/proj/worker");
        assert_eq!(
            r.to_string(),
            format!("registry.example.org:5000/proj/worker@sha256:{hex}")
        );
        // An explicit pin must agree with the machine type.
        assert!(parse_location(&format!("oci://busybox@sha256:{hex}"), &d(0xab)).is_ok());
        let err = parse_location(&format!("oci://busybox@sha256:{hex}"), &d(0xcd)).unwrap_err();
        assert!(err.to_string().contains("requires"), "{err}");
        // Tags move; they are not pins.
        assert!(parse_location("oci://busybox:1.36", &d(1)).is_err());
        assert!(parse_location("oci://host:5000/busybox:1.36", &d(1)).is_err());
        // Other digest algorithms, bad digests and bad names are refused.
        assert!(parse_location("oci://busybox@sha512:00", &d(1)).is_err());
        assert!(parse_location("oci://busybox@sha256:zz", &d(1)).is_err());
        for bad in [
            "oci://",
            "oci://Busybox",
            "oci:///x",
            "oci://a//b",
            "oci://a b",
        ] {
            assert!(parse_location(bad, &d(1)).is_err(), "{bad}");
        }
    }

    #[test]
    fn tags_are_content_addressed() {
        assert_eq!(
            image_tag(&d(0)),
            format!("gleaner/{}:latest", "0".repeat(64))
        );
    }

    fn archive(entries: &[(&str, &[u8])]) -> tempfile::NamedTempFile {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, *data).unwrap();
        }
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), b.into_inner().unwrap()).unwrap();
        f
    }

    #[test]
    fn archive_manifest_and_config_are_checked() {
        let config = br#"{"config":{}}"#;
        let id = Digest::of(config).to_string();
        let cfg_name = format!("{id}.json");
        let manifest = format!(r#"[{{"Config":"{cfg_name}","RepoTags":["x/y:1"],"Layers":[]}}]"#);
        let f = archive(&[(&cfg_name, config), ("manifest.json", manifest.as_bytes())]);
        let info = inspect_archive(f.path()).unwrap();
        assert_eq!(info.image_id, format!("sha256:{id}"));
        assert_eq!(info.repo_tags, vec!["x/y:1".to_string()]);

        // A config whose name lies about its content.
        let wrong = format!("{}.json", d(7));
        let manifest = format!(r#"[{{"Config":"{wrong}","Layers":[]}}]"#);
        let f = archive(&[(&wrong, config), ("manifest.json", manifest.as_bytes())]);
        assert!(
            inspect_archive(f.path())
                .unwrap_err()
                .contains("does not hash")
        );

        // Not a docker archive at all.
        let f = archive(&[("hello.txt", b"hi")]);
        assert!(
            inspect_archive(f.path())
                .unwrap_err()
                .contains("no manifest")
        );
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), b"not a tar").unwrap();
        assert!(inspect_archive(f.path()).is_err());
    }
}
