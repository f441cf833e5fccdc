//! The host's trust store and machine-type admission: which publishers this host trusts and with
//! what policy, the signed rotations and revocations it has seen, kept in `<state_dir>/trust.toml`
//! (written atomically), and the catalogue that offers admitted machine types to the factory and
//! withdraws them when trust changes.
//!
//! The settings file's `trust` entries (and `--trust`) are the department's baseline; the owner's
//! `gleaner trust add/remove` are kept in the store and win over the baseline, including removing a
//! baseline publisher on this host. Revocations win over everything, and a revoked key takes every
//! key joined to it by rotations down with it.
//!
//! Signed rotations and revocations come from the machine-types folder (`gleaner key rotate|revoke`
//! writes them there) or from peers in the space; whatever is new here is handed back for the
//! space to spread ([`Catalogue::take_fresh_trust`]), so a revocation made on one host reaches
//! every host that trusts the publisher.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use gleaner::trust::{Applied, KeyRotation, Policy, Refused, Revocation, TrustSet};
use gleaner::{Digest, Envelope, Kind, MachineType, PublicKey, Verified};
use serde::{Deserialize, Serialize};

use crate::control::Response;
use crate::factory::{FactoryHandle, Offer};

/// The store's file name inside the state dir.
pub const FILE_NAME: &str = "trust.toml";
/// Extensions of signed trust files in the machine-types folder.
pub const ROTATION_EXT: &str = "gkr";
pub const REVOCATION_EXT: &str = "grv";
/// Largest signed file read from the machine-types folder.
const SIGNED_FILE_MAX: u64 = 256 * 1024;

/// The store's path in `state_dir`.
pub fn store_path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// Parses a baseline entry: `ID[=SHARE][,allow-vms][,allow-egress][,max-cores=N]`.
///
/// Like the owner's `gleaner trust add`, an entry allows containers without network unless it says
/// otherwise.
pub fn parse_entry(s: &str) -> Result<(PublicKey, Policy), String> {
    let mut parts = s.split(',').map(str::trim);
    let head = parts.next().unwrap_or_default();
    let mut policy = Policy::default();
    let id = match head.split_once('=') {
        Some((id, share)) => {
            policy.share = share
                .trim()
                .parse()
                .map_err(|_| format!("{s:?}: the share {share:?} is not a number"))?;
            if !(policy.share.is_finite() && policy.share > 0.0) {
                return Err(format!("{s:?}: the share must be positive"));
            }
            id
        }
        None => head,
    };
    let key: PublicKey = id
        .trim()
        .parse()
        .map_err(|e| format!("{s:?} is not a publisher id: {e}"))?;
    for p in parts {
        match p.split_once('=') {
            None if p == "allow-vms" => policy.allow_vms = true,
            None if p == "allow-egress" => policy.allow_egress = true,
            Some(("max-cores", n)) => {
                policy.max_cores = Some(
                    n.trim()
                        .parse::<u16>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| format!("{s:?}: max-cores {n:?} is not a count of cores"))?,
                )
            }
            _ => {
                return Err(format!(
                    "{s:?}: {p:?} is not one of allow-vms, allow-egress, max-cores=N"
                ));
            }
        }
    }
    Ok((key, policy))
}

/// Why the trust store failed or refused.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("trust store {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRepr {
    /// Baseline publishers the owner removed on this host.
    #[serde(default)]
    removed: Vec<String>,
    #[serde(default, rename = "publisher")]
    publishers: Vec<PublisherRepr>,
    #[serde(default, rename = "rotation")]
    rotations: Vec<SignedRepr>,
    #[serde(default, rename = "revocation")]
    revocations: Vec<SignedRepr>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublisherRepr {
    id: String,
    share: f64,
    #[serde(default)]
    allow_vms: bool,
    #[serde(default)]
    allow_egress: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_cores: Option<u16>,
    #[serde(default)]
    added_at: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    note: String,
}

/// A signed rotation or revocation as kept: the envelope is what counts and is re-verified at
/// every load; the summary is for people reading the file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignedRepr {
    #[serde(default)]
    summary: String,
    envelope: String,
}

/// A publisher the owner added.
#[derive(Debug, Clone, PartialEq)]
struct OwnerEntry {
    policy: Policy,
    added_at: u64,
    note: String,
}

/// What `gleaner trust list` and the GUI show: the control API's types.
pub use gleaner::control::{Listed, Listing, Revoked, Rotated};

/// The trust store: baseline + owner entries + signed rotations and revocations, persisted.
#[derive(Debug)]
pub struct TrustStore {
    path: PathBuf,
    baseline: Vec<(PublicKey, Policy)>,
    owner: BTreeMap<PublicKey, OwnerEntry>,
    removed: BTreeSet<PublicKey>,
    rotations: Vec<(Verified<KeyRotation>, Vec<u8>)>,
    revocations: Vec<(Verified<Revocation>, Vec<u8>)>,
    set: TrustSet,
    generation: u64,
}

impl TrustStore {
    /// Opens the store at `path` (empty when the file does not exist yet) over `baseline`.
    /// A file that does not parse, or holds a signature that does not verify, is refused: silently
    /// dropping a revocation would be worse than not starting.
    pub fn open(path: &Path, baseline: Vec<(PublicKey, Policy)>) -> Result<TrustStore, TrustError> {
        let err = |reason: String| TrustError::File {
            path: path.to_owned(),
            reason,
        };
        let repr: FileRepr = match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|e| err(e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => FileRepr::default(),
            Err(e) => return Err(err(e.to_string())),
        };
        let mut store = TrustStore {
            path: path.to_owned(),
            baseline,
            owner: BTreeMap::new(),
            removed: BTreeSet::new(),
            rotations: Vec::new(),
            revocations: Vec::new(),
            set: TrustSet::default(),
            generation: 0,
        };
        for id in &repr.removed {
            store.removed.insert(
                id.parse()
                    .map_err(|e| err(format!("removed {id:?}: {e}")))?,
            );
        }
        for p in repr.publishers {
            let key: PublicKey =
                p.id.parse()
                    .map_err(|e| err(format!("publisher {:?}: {e}", p.id)))?;
            if !(p.share.is_finite() && p.share > 0.0) {
                return Err(err(format!("publisher {}: share must be positive", p.id)));
            }
            store.owner.insert(
                key,
                OwnerEntry {
                    policy: Policy {
                        share: p.share,
                        allow_vms: p.allow_vms,
                        allow_egress: p.allow_egress,
                        max_cores: p.max_cores,
                    },
                    added_at: p.added_at,
                    note: p.note,
                },
            );
        }
        let decode = |s: &SignedRepr| {
            hex::decode(s.envelope.trim())
                .map_err(|e| err(format!("envelope {:?}: {e}", s.summary)))
        };
        for s in &repr.rotations {
            let bytes = decode(s)?;
            let v = Envelope::open_bytes::<KeyRotation>(&bytes)
                .map_err(|e| err(format!("rotation {:?}: {e}", s.summary)))?;
            store.rotations.push((v, bytes));
        }
        for s in &repr.revocations {
            let bytes = decode(s)?;
            let v = Envelope::open_bytes::<Revocation>(&bytes)
                .map_err(|e| err(format!("revocation {:?}: {e}", s.summary)))?;
            store.revocations.push((v, bytes));
        }
        store.rebuild();
        Ok(store)
    }

    /// Counts changes; the catalogue re-checks its offers when this moves.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rebuilds the verdicts from the entries: rotations in arrival order, then revocations (each
    /// ends trust in its key's whole rotation chain, whenever the rotation came), then the
    /// listings.
    fn rebuild(&mut self) {
        let mut set = TrustSet::default();
        for (r, _) in &self.rotations {
            if let Err(e) = set.rotate(r) {
                tracing::warn!("trust store: rotation ignored: {e}");
            }
        }
        for (r, _) in &self.revocations {
            set.revoke(r);
        }
        for (k, p) in &self.baseline {
            if !self.removed.contains(&set.resolve(*k)) {
                set.list(*k, *p);
            }
        }
        for (k, e) in &self.owner {
            set.list(*k, e.policy);
        }
        self.set = set;
        self.generation += 1;
    }

    /// Writes the store: a temporary file, fsync, rename over the old one, fsync of the folder.
    fn save(&self) -> Result<(), TrustError> {
        let err = |reason: String| TrustError::File {
            path: self.path.clone(),
            reason,
        };
        let repr = FileRepr {
            removed: self.removed.iter().map(ToString::to_string).collect(),
            publishers: self
                .owner
                .iter()
                .map(|(k, e)| PublisherRepr {
                    id: k.to_string(),
                    share: e.policy.share,
                    allow_vms: e.policy.allow_vms,
                    allow_egress: e.policy.allow_egress,
                    max_cores: e.policy.max_cores,
                    added_at: e.added_at,
                    note: e.note.clone(),
                })
                .collect(),
            rotations: self
                .rotations
                .iter()
                .map(|(v, b)| SignedRepr {
                    summary: format!("{} replaced by {}", v.message.old, v.message.new),
                    envelope: hex::encode(b),
                })
                .collect(),
            revocations: self
                .revocations
                .iter()
                .map(|(v, b)| SignedRepr {
                    summary: format!("{} revoked: {}", v.message.key, v.message.reason),
                    envelope: hex::encode(b),
                })
                .collect(),
        };
        let body = toml::to_string(&repr).map_err(|e| err(e.to_string()))?;
        let text = format!(
            "# Gleaner's trust store: publishers the owner trusts on this host, and the signed key\n\
             # rotations and revocations seen. Written by the daemon; change it with `gleaner trust`.\n\n{body}"
        );
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        }
        crate::image_archive::write_atomic(&self.path, text.as_bytes())
            .map_err(|e| err(format!("cannot write: {e}")))?;
        if let Some(dir) = self.path.parent()
            && let Ok(d) = std::fs::File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Trusts `key` (or the key it rotated to) with `policy`, persisted; returns the key trusted.
    pub fn trust(
        &mut self,
        key: PublicKey,
        policy: Policy,
        note: String,
        now: u64,
    ) -> Result<PublicKey, TrustError> {
        if !(policy.share.is_finite() && policy.share > 0.0) {
            return Err(TrustError::Invalid("the share must be positive".into()));
        }
        if policy.max_cores == Some(0) {
            return Err(TrustError::Invalid("max_cores must be at least 1".into()));
        }
        let resolved = self.set.check_listable(key)?;
        let before = (self.owner.clone(), self.removed.clone());
        self.owner.insert(
            resolved,
            OwnerEntry {
                policy,
                added_at: now,
                note,
            },
        );
        self.removed.remove(&resolved);
        if let Err(e) = self.save() {
            (self.owner, self.removed) = before;
            return Err(e);
        }
        self.rebuild();
        Ok(resolved)
    }

    /// Stops trusting `key` (and whatever it rotated to) on this host, persisted; a baseline
    /// publisher is remembered as removed. Returns the key and whether it was trusted.
    pub fn untrust(&mut self, key: PublicKey) -> Result<(PublicKey, bool), TrustError> {
        let resolved = self.set.resolve(key);
        let was = self.set.effective().contains_key(&resolved);
        let before = (self.owner.clone(), self.removed.clone());
        let set = &self.set;
        self.owner.retain(|k, _| set.resolve(*k) != resolved);
        if self
            .baseline
            .iter()
            .any(|(k, _)| self.set.resolve(*k) == resolved)
        {
            self.removed.insert(resolved);
        }
        if let Err(e) = self.save() {
            (self.owner, self.removed) = before;
            return Err(e);
        }
        self.rebuild();
        Ok((resolved, was))
    }

    /// Applies a signed rotation or revocation (envelope bytes); persisted when new. Returns what
    /// changed in words, or None when it was already known.
    pub fn apply_signed(&mut self, bytes: &[u8]) -> Result<Option<String>, TrustError> {
        let env = Envelope::from_bytes(bytes).map_err(|e| TrustError::Invalid(e.to_string()))?;
        let kind = env.kind().map_err(|e| TrustError::Invalid(e.to_string()))?;
        let bad = |e: gleaner::Error| TrustError::Invalid(e.to_string());
        let said = match kind {
            Kind::KeyRotation => {
                let v = env.open::<KeyRotation>().map_err(bad)?;
                let mut trial = self.set.clone();
                if trial.rotate(&v)? == Applied::AlreadyKnown {
                    return Ok(None);
                }
                let said = format!(
                    "key rotation: {} replaced by {} (signed by the old key)",
                    v.message.old, v.message.new
                );
                self.rotations.push((v, bytes.to_vec()));
                said
            }
            Kind::Revocation => {
                let v = env.open::<Revocation>().map_err(bad)?;
                if self.set.clone().revoke(&v) == Applied::AlreadyKnown {
                    return Ok(None);
                }
                let said = format!(
                    "revocation: key {} revoked by itself: {}",
                    v.message.key, v.message.reason
                );
                self.revocations.push((v, bytes.to_vec()));
                said
            }
            other => {
                return Err(TrustError::Invalid(format!(
                    "a {other} is neither a key rotation nor a revocation"
                )));
            }
        };
        if let Err(e) = self.save() {
            // Not kept on disk: not applied either, so the next scan tries again.
            match kind {
                Kind::KeyRotation => self.rotations.pop().map(drop),
                _ => self.revocations.pop().map(drop),
            };
            return Err(e);
        }
        self.rebuild();
        Ok(Some(said))
    }

    /// Whether signed rotation or revocation `bytes` bears on this host's trust: it names a key
    /// that is trusted here, or joined by rotations to one that is. Peers' messages that do not
    /// are not kept (anyone can make keys and revoke them; the store must not fill with those).
    pub fn concerns(&self, bytes: &[u8]) -> bool {
        let Ok(env) = Envelope::from_bytes(bytes) else {
            return false;
        };
        match env.kind() {
            Ok(Kind::KeyRotation) => env.open::<KeyRotation>().is_ok_and(|v| {
                self.set.concerns(v.message.old) || self.set.concerns(v.message.new)
            }),
            Ok(Kind::Revocation) => env
                .open::<Revocation>()
                .is_ok_and(|v| self.set.concerns(v.message.key)),
            _ => false,
        }
    }

    /// The publisher keys trusted now (after rotations and revocations).
    pub fn trusted_keys(&self) -> Vec<PublicKey> {
        self.set.effective().into_keys().collect()
    }

    /// Every signed rotation and revocation kept, as envelope bytes (for the space to spread).
    pub fn signed_entries(&self) -> Vec<Vec<u8>> {
        self.rotations
            .iter()
            .map(|(_, b)| b.clone())
            .chain(self.revocations.iter().map(|(_, b)| b.clone()))
            .collect()
    }

    /// The verdict on a verified machine type.
    pub fn admit(&self, mt: &MachineType) -> Result<gleaner::trust::Admission, Refused> {
        self.set.admit(mt)
    }

    /// The newest key `key`'s trust would land on.
    pub fn resolve(&self, key: PublicKey) -> PublicKey {
        self.set.resolve(key)
    }

    /// What is trusted now, and why.
    pub fn listing(&self) -> Listing {
        let trusted = self
            .set
            .effective()
            .into_iter()
            .map(|(k, p)| {
                let owner = self.owner.get(&k);
                Listed {
                    id: k.to_string(),
                    share: p.share,
                    allow_vms: p.allow_vms,
                    allow_egress: p.allow_egress,
                    max_cores: p.max_cores,
                    source: if owner.is_some() { "owner" } else { "settings" }.into(),
                    rotated_from: self
                        .set
                        .rotated_onto(k)
                        .iter()
                        .map(ToString::to_string)
                        .collect(),
                    note: owner.map(|o| o.note.clone()).unwrap_or_default(),
                }
            })
            .collect();
        Listing {
            file: self.path.clone(),
            trusted,
            removed: self.removed.iter().map(ToString::to_string).collect(),
            revoked: self
                .set
                .revoked()
                .map(|(k, (at, reason))| Revoked {
                    id: k.to_string(),
                    at: *at,
                    reason: reason.clone(),
                })
                .collect(),
            rotations: self
                .set
                .rotations()
                .map(|(o, n, at)| Rotated {
                    old: o.to_string(),
                    new: n.to_string(),
                    at,
                })
                .collect(),
        }
    }
}

/// Where the newest version admitted of each machine type is remembered.
pub fn versions_path(state_dir: &Path) -> PathBuf {
    state_dir.join("versions.toml")
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionsFile {
    #[serde(default, rename = "type")]
    types: Vec<VersionEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionEntry {
    publisher: String,
    name: String,
    version: u64,
    digest: String,
}

/// The newest version admitted per (publisher, name), and its digest. An older version, or a
/// second one with the same number, is a rollback: a URL, a peer or a folder serving an old
/// release (with a known flaw, say) after a newer one was seen. Kept in a file when given one.
#[derive(Debug, Default)]
struct Versions {
    path: Option<PathBuf>,
    latest: BTreeMap<(PublicKey, String), (u64, Digest)>,
}

impl Versions {
    fn open(path: &Path) -> Result<Versions, String> {
        let mut latest = BTreeMap::new();
        let forget = "fix it, or remove it to forget which versions were seen";
        match std::fs::read_to_string(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: cannot read: {e}", path.display())),
            Ok(text) => {
                let file: VersionsFile = toml::from_str(&text).map_err(|e| {
                    format!("{}: {} ({forget})", path.display(), e.message().trim())
                })?;
                for t in file.types {
                    let bad = |what: &str| format!("{}: {what} ({forget})", path.display());
                    let publisher = t
                        .publisher
                        .parse::<PublicKey>()
                        .map_err(|_| bad(&format!("{:?} is not a publisher id", t.publisher)))?;
                    let digest = t.digest.parse::<Digest>().map_err(|_| {
                        bad(&format!("{:?} is not a digest (sha256 in hex)", t.digest))
                    })?;
                    latest.insert((publisher, t.name), (t.version, digest));
                }
            }
        }
        Ok(Versions {
            path: Some(path.to_owned()),
            latest,
        })
    }

    /// Whether `mt` (with `digest`) may be admitted: not older than the newest seen, and not a
    /// different type under the same version number.
    fn check(&self, mt: &MachineType, digest: Digest) -> Result<(), String> {
        match self.latest.get(&(mt.publisher, mt.name.clone())) {
            Some(&(version, seen))
                if version > mt.version || version == mt.version && seen != digest =>
            {
                Err(format!(
                    "v{version} was admitted here before ({seen}); an older version or a second \
                     v{version} is a rollback"
                ))
            }
            _ => Ok(()),
        }
    }

    /// Records an admitted type, and writes the file if it is a new version.
    fn record(&mut self, mt: &MachineType, digest: Digest) {
        let key = (mt.publisher, mt.name.clone());
        if self.latest.get(&key) == Some(&(mt.version, digest)) {
            return;
        }
        self.latest.insert(key, (mt.version, digest));
        let Some(path) = &self.path else { return };
        let file = VersionsFile {
            types: self
                .latest
                .iter()
                .map(|((p, name), (version, digest))| VersionEntry {
                    publisher: p.to_string(),
                    name: name.clone(),
                    version: *version,
                    digest: digest.to_string(),
                })
                .collect(),
        };
        let written = toml::to_string(&file)
            .map_err(|e| e.to_string())
            .and_then(|text| {
                crate::image_archive::write_atomic(path, text.as_bytes()).map_err(|e| e.to_string())
            });
        if let Err(e) = written {
            tracing::warn!(
                "cannot write {}: {e}; rollbacks are still refused until the daemon restarts",
                path.display()
            );
        }
    }
}

/// A machine type the catalogue has offered to the factory.
#[derive(Debug, Clone)]
struct Offered {
    mt: MachineType,
    share: f64,
    max_cores: u16,
}

/// Admission: reads signed files from the machine-types folder, applies rotations and revocations
/// to the store, offers admitted machine types to the factory, and withdraws offers that trust no
/// longer covers. Every refusal is logged and shown in `gleaner events` with its reason.
#[derive(Debug)]
pub struct Catalogue {
    pub store: TrustStore,
    dir: Option<PathBuf>,
    seen_signed: BTreeSet<Digest>,
    seen_types: BTreeSet<Digest>,
    offered: BTreeMap<Digest, Offered>,
    /// The newest version admitted per (publisher, name): an older one is a rollback.
    versions: Versions,
    reconciled: u64,
    /// Signed rotations and revocations newly applied here, for the space to spread.
    fresh_trust: Vec<Vec<u8>>,
}

/// Fresh signed trust messages held for the space at most (more are dropped with a warning; the
/// store keeps them and the daemon re-announces the store's entries at start).
const FRESH_TRUST_MAX: usize = 64;

/// Logs `message` (a warning if `warn`) and shows it in `gleaner events`.
pub(crate) async fn say(factory: &FactoryHandle, warn: bool, message: String) {
    if warn {
        tracing::warn!("{message}");
    } else {
        tracing::info!("{message}");
    }
    let _ = factory.note(message).await;
}

fn files_with(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| exts.contains(&e))
        })
        .collect();
    paths.sort();
    paths
}

fn read_bounded(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path).ok()?;
    let mut bytes = Vec::new();
    f.take(SIGNED_FILE_MAX + 1).read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

impl Catalogue {
    pub fn new(store: TrustStore, dir: Option<PathBuf>) -> Catalogue {
        Catalogue {
            store,
            dir,
            seen_signed: BTreeSet::new(),
            seen_types: BTreeSet::new(),
            offered: BTreeMap::new(),
            versions: Versions::default(),
            reconciled: 0,
            fresh_trust: Vec::new(),
        }
    }

    /// Remembers the newest version admitted of each type in `path` (read now, written on each
    /// new version), so that a rollback is refused across restarts too. A file that cannot be
    /// read is an error naming it, rather than rollback protection silently lost.
    pub fn remember_versions(mut self, path: &Path) -> Result<Catalogue, String> {
        self.versions = Versions::open(path)?;
        Ok(self)
    }

    /// Signed rotations and revocations applied since the last call, to publish to the space.
    pub fn take_fresh_trust(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.fresh_trust)
    }

    fn keep_fresh(&mut self, bytes: &[u8]) {
        if self.fresh_trust.len() < FRESH_TRUST_MAX {
            self.fresh_trust.push(bytes.to_vec());
        } else {
            tracing::warn!("too many new rotations and revocations at once: one is not spread");
        }
    }

    /// Applies a signed rotation or revocation a peer gossiped (`origin` names it), if it bears on
    /// this host's trust: persisted, logged and shown in `gleaner events`, offers it no longer
    /// covers withdrawn (their machines stop gracefully). Returns whether it was new here.
    pub async fn apply_from_space(
        &mut self,
        bytes: &[u8],
        origin: &str,
        factory: &FactoryHandle,
    ) -> bool {
        if !self.store.concerns(bytes) {
            tracing::debug!("{origin}: bears on no publisher trusted here; not kept");
            return false;
        }
        match self.store.apply_signed(bytes) {
            Ok(Some(said)) => {
                say(factory, true, format!("{said} ({origin})")).await;
                self.keep_fresh(bytes);
                self.reconcile(factory).await;
                true
            }
            Ok(None) => false,
            Err(e) => {
                say(factory, true, format!("refused {origin}: {e}")).await;
                false
            }
        }
    }

    /// One pass: signed trust files, then re-checking offers if trust changed, then new types.
    /// Returns the signed machine-type files newly admitted (a space serves them to its peers).
    pub async fn scan(&mut self, now: u64, factory: &FactoryHandle) -> Vec<Vec<u8>> {
        let mut admitted = Vec::new();
        if let Some(dir) = self.dir.clone() {
            for path in files_with(&dir, &[ROTATION_EXT, REVOCATION_EXT]) {
                let Some(bytes) = read_bounded(&path) else {
                    continue;
                };
                if !self.seen_signed.insert(Digest::of(&bytes)) {
                    continue;
                }
                match self.store.apply_signed(&bytes) {
                    Ok(Some(said)) => {
                        say(factory, false, format!("{said} ({})", path.display())).await;
                        self.keep_fresh(&bytes);
                    }
                    Ok(None) => {}
                    Err(e) => say(factory, true, format!("refused {}: {e}", path.display())).await,
                }
            }
        }
        self.reconcile(factory).await;
        let Some(dir) = self.dir.clone() else {
            return admitted;
        };
        for path in files_with(&dir, &["gmt"]) {
            let Some(bytes) = read_bounded(&path) else {
                continue;
            };
            if self
                .admit_signed(&bytes, &path.display().to_string(), now, factory)
                .await
                .is_some()
            {
                admitted.push(bytes);
            }
        }
        admitted
    }

    /// Admits one signed machine type (from the folder, or learned from a peer named by
    /// `origin`): signature, expiry and this host's trust policy; offers it to the factory.
    /// Refusals are logged and shown in `gleaner events`. Each file is looked at once.
    pub async fn admit_signed(
        &mut self,
        bytes: &[u8],
        origin: &str,
        now: u64,
        factory: &FactoryHandle,
    ) -> Option<Digest> {
        if !self.seen_types.insert(Digest::of(bytes)) {
            return None;
        }
        let v = match Envelope::open_bytes::<MachineType>(bytes) {
            Ok(v) => v,
            Err(e) => {
                say(factory, true, format!("refused {origin}: {e}")).await;
                return None;
            }
        };
        if let Err(e) = v.message.check_fresh(now) {
            say(factory, true, format!("refused {origin}: {e}")).await;
            return None;
        }
        if let Err(why) = self.versions.check(&v.message, v.digest) {
            say(
                factory,
                true,
                format!(
                    "refused {origin} ({} v{}): {why}",
                    v.message.name, v.message.version
                ),
            )
            .await;
            return None;
        }
        match self.store.admit(&v.message) {
            Ok(a) => {
                let digest = v.digest;
                self.versions.record(&v.message, digest);
                self.offer(v.message, digest, a, factory).await;
                Some(digest)
            }
            Err(e) => {
                say(
                    factory,
                    true,
                    format!(
                        "refused {origin} ({} v{}): {e}",
                        v.message.name, v.message.version
                    ),
                )
                .await;
                None
            }
        }
    }

    async fn offer(
        &mut self,
        mt: MachineType,
        digest: Digest,
        a: gleaner::trust::Admission,
        factory: &FactoryHandle,
    ) {
        if self
            .offered
            .get(&digest)
            .is_some_and(|o| o.share == a.share && o.max_cores == a.max_cores)
        {
            return;
        }
        if a.max_cores < mt.cores_max {
            say(
                factory,
                false,
                format!(
                    "{} v{}: machines capped at {} cores (the publisher's max_cores here)",
                    mt.name, mt.version, a.max_cores
                ),
            )
            .await;
        }
        let offer = Offer {
            machine_type: mt.clone(),
            digest,
            share: a.share,
            max_cores: a.max_cores,
        };
        if factory.offer(offer).await.is_ok() {
            self.offered.insert(
                digest,
                Offered {
                    mt,
                    share: a.share,
                    max_cores: a.max_cores,
                },
            );
        }
    }

    /// After a trust change: withdraws offers no longer admitted (their running machines are
    /// stopped gracefully by the factory), re-offers those whose share or cap changed, and
    /// forgets which types were read so that newly trusted ones are read again. Returns the names
    /// withdrawn.
    pub async fn reconcile(&mut self, factory: &FactoryHandle) -> Vec<String> {
        if self.reconciled == self.store.generation() {
            return Vec::new();
        }
        self.reconciled = self.store.generation();
        self.seen_types.clear();
        let mut withdrawn = Vec::new();
        for (digest, o) in self.offered.clone() {
            match self.store.admit(&o.mt) {
                Err(e) => {
                    self.offered.remove(&digest);
                    let _ = factory.withdraw(digest).await;
                    say(
                        factory,
                        true,
                        format!(
                            "withdrew {} v{}: {e}; its running machines stop gracefully",
                            o.mt.name, o.mt.version
                        ),
                    )
                    .await;
                    withdrawn.push(o.mt.name.clone());
                }
                Ok(a) => self.offer(o.mt, digest, a, factory).await,
            }
        }
        withdrawn
    }
}

/// The Trust control op: by publisher id, or by the hex of a signed machine-type file (verified,
/// shown, and its publisher trusted with what that type needs unless the request says otherwise).
pub struct TrustRequest {
    pub publisher: Option<String>,
    pub machine_type_hex: Option<String>,
    pub share: Option<f64>,
    pub allow_vms: Option<bool>,
    pub allow_egress: Option<bool>,
    pub max_cores: Option<u16>,
}

fn type_details(v: &Verified<MachineType>, now: u64) -> serde_json::Value {
    let m = &v.message;
    serde_json::json!({
        "name": m.name,
        "version": m.version,
        "digest": v.digest.to_string(),
        "publisher": m.publisher.to_string(),
        "backend": m.backend.as_str(),
        "cores_min": m.cores_min,
        "cores_max": m.cores_max,
        "memory_mib": m.memory_mib,
        "disk_mib": m.disk_mib,
        "max_wallclock_s": m.max_wallclock_s,
        "egress": m.egress,
        "not_after": m.not_after,
        "expired": m.check_fresh(now).is_err(),
        "description": m.description,
    })
}

fn policy_json(p: &Policy) -> serde_json::Value {
    serde_json::json!({
        "share": p.share,
        "allow_vms": p.allow_vms,
        "allow_egress": p.allow_egress,
        "max_cores": p.max_cores,
    })
}

/// Serves `Trust`: persists the publisher, then re-reads the folder so its types start.
pub async fn control_trust(
    cat: &tokio::sync::Mutex<Catalogue>,
    factory: &FactoryHandle,
    req: TrustRequest,
    now: u64,
) -> Response {
    let from_type = match &req.machine_type_hex {
        None => None,
        Some(h) => {
            let bytes = match hex::decode(h.trim()) {
                Ok(b) => b,
                Err(e) => return Response::error(format!("machine_type_hex is not hex: {e}")),
            };
            match Envelope::open_bytes::<MachineType>(&bytes) {
                Ok(v) => Some(v),
                Err(e) => return Response::error(format!("the machine type is refused: {e}")),
            }
        }
    };
    let key = match (&req.publisher, &from_type) {
        (Some(p), from) => match p.parse::<PublicKey>() {
            Ok(k) if from.as_ref().is_none_or(|v| v.signer == k) => k,
            Ok(k) => {
                return Response::error(format!(
                    "the machine type was signed by {}, not by {k}",
                    from.as_ref()
                        .map(|v| v.signer.to_string())
                        .unwrap_or_default()
                ));
            }
            Err(e) => return Response::error(format!("{p:?} is not a publisher id: {e}")),
        },
        (None, Some(v)) => v.signer,
        (None, None) => {
            return Response::error("say which publisher: its id, or a signed machine type");
        }
    };
    let base = from_type
        .as_ref()
        .map(|v| Policy::for_type(&v.message))
        .unwrap_or_default();
    let policy = Policy {
        share: req.share.unwrap_or(base.share),
        allow_vms: req.allow_vms.unwrap_or(base.allow_vms),
        allow_egress: req.allow_egress.unwrap_or(base.allow_egress),
        max_cores: req.max_cores.or(base.max_cores),
    };
    let note = from_type
        .as_ref()
        .map(|v| {
            format!(
                "trusted from machine type {} v{}",
                v.message.name, v.message.version
            )
        })
        .unwrap_or_default();
    let mut cat = cat.lock().await;
    let trusted = match cat.store.trust(key, policy, note, now) {
        Ok(k) => k,
        Err(e) => return Response::error(format!("not trusted: {e}")),
    };
    let verdict = from_type
        .as_ref()
        .map(|v| match cat.store.admit(&v.message) {
            Ok(_) => "admitted".to_string(),
            Err(e) => format!("refused: {e}"),
        });
    say(
        factory,
        false,
        format!(
            "trusted publisher {trusted} (share {}, vms {}, egress {}, max cores {})",
            policy.share,
            policy.allow_vms,
            policy.allow_egress,
            policy.max_cores.map_or("-".into(), |c| c.to_string())
        ),
    )
    .await;
    cat.scan(now, factory).await;
    Response::ok(serde_json::json!({
        "publisher": trusted.to_string(),
        "rotated_from": (trusted != key).then(|| key.to_string()),
        "policy": policy_json(&policy),
        "machine_type": from_type.as_ref().map(|v| type_details(v, now)),
        "machine_type_verdict": verdict,
        "file": cat.store.path(),
    }))
}

/// Serves `Untrust`: persists the removal and withdraws the publisher's offers at once. Nothing new
/// of theirs starts; running machines are stopped gracefully (shutdowntime now + the stop grace,
/// then SIGTERM, then kill), and their usage is recorded as for any stop.
pub async fn control_untrust(
    cat: &tokio::sync::Mutex<Catalogue>,
    factory: &FactoryHandle,
    publisher: &str,
) -> Response {
    let key = match publisher.parse::<PublicKey>() {
        Ok(k) => k,
        Err(e) => return Response::error(format!("{publisher:?} is not a publisher id: {e}")),
    };
    let mut cat = cat.lock().await;
    let (resolved, was) = match cat.store.untrust(key) {
        Ok(r) => r,
        Err(e) => return Response::error(e.to_string()),
    };
    if was {
        say(
            factory,
            false,
            format!("stopped trusting publisher {resolved}"),
        )
        .await;
    }
    let withdrawn = cat.reconcile(factory).await;
    Response::ok(serde_json::json!({
        "publisher": resolved.to_string(),
        "was_trusted": was,
        "withdrawn": withdrawn,
        "running": "stopped gracefully: shutdowntime now plus the stop grace, then SIGTERM, then kill; usage recorded",
        "file": cat.store.path(),
    }))
}

/// Serves `Trusted`: the listing.
pub async fn control_list(cat: &tokio::sync::Mutex<Catalogue>) -> Response {
    Response::ok(cat.lock().await.store.listing())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gleaner::SecretKey;
    use gleaner::trust::TRUST_VERSION;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed([n; 32])
    }

    fn rotation(old: &SecretKey, new: &SecretKey) -> Vec<u8> {
        let m = KeyRotation {
            v: TRUST_VERSION,
            old: old.public(),
            new: new.public(),
            at: 1,
        };
        Envelope::seal(&m, old).to_bytes()
    }

    #[test]
    fn versions_refuse_rollbacks_and_are_kept_in_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = versions_path(dir.path());
        let mut mt = MachineType::example(key(1).public());
        mt.version = 3;
        let (d3, other) = (Digest::of(b"v3"), Digest::of(b"another v3"));
        let mut v = Versions::open(&path).unwrap();
        assert_eq!(v.check(&mt, d3), Ok(()));
        v.record(&mt, d3);
        assert_eq!(v.check(&mt, d3), Ok(()), "the same type again");
        let e = v.check(&mt, other).unwrap_err();
        assert!(e.contains("second v3"), "{e}");
        let mut old = mt.clone();
        old.version = 2;
        assert!(v.check(&old, Digest::of(b"v2")).is_err());
        let mut newer = mt.clone();
        newer.version = 4;
        assert_eq!(v.check(&newer, Digest::of(b"v4")), Ok(()));
        // Another publisher's type of the same name is another type.
        let mut theirs = old.clone();
        theirs.publisher = key(2).public();
        assert_eq!(v.check(&theirs, Digest::of(b"v2")), Ok(()));

        // Read back after a restart.
        let again = Versions::open(&path).unwrap();
        assert!(again.check(&old, Digest::of(b"v2")).is_err());
        assert_eq!(again.check(&mt, d3), Ok(()));

        // A damaged file is an error naming it, not protection silently lost.
        std::fs::write(&path, "[[type]]\npublisher = \"nobody\"\n").unwrap();
        let e = Versions::open(&path).unwrap_err();
        assert!(
            e.contains("versions.toml") && e.contains("remove it"),
            "{e}"
        );
    }

    fn revocation(k: &SecretKey) -> Vec<u8> {
        let m = Revocation {
            v: TRUST_VERSION,
            key: k.public(),
            at: 2,
            reason: "compromised".into(),
        };
        Envelope::seal(&m, k).to_bytes()
    }

    #[test]
    fn entries_parse_with_policy() {
        let id = key(1).public().to_string();
        let (k, p) = parse_entry(&id).unwrap();
        assert_eq!((k, p), (key(1).public(), Policy::default()));
        let (_, p) = parse_entry(&format!("{id}=2.5, allow-vms,allow-egress,max-cores=4")).unwrap();
        assert_eq!(
            p,
            Policy {
                share: 2.5,
                allow_vms: true,
                allow_egress: true,
                max_cores: Some(4)
            }
        );
        assert!(parse_entry(&format!("{id}=0")).is_err());
        assert!(parse_entry(&format!("{id},max-cores=0")).is_err());
        let e = parse_entry(&format!("{id},vms")).unwrap_err();
        assert!(e.contains("allow-vms"), "{e}");
        assert!(parse_entry("12D3KooWnope").is_err());
    }

    #[test]
    fn persists_trust_untrust_rotation_and_revocation() {
        let dir = tempfile::tempdir().unwrap();
        let path = store_path(dir.path());
        let (a, b, c, d) = (key(1), key(2), key(3), key(4));
        let baseline = vec![(d.public(), Policy::default())];
        let mut s = TrustStore::open(&path, baseline.clone()).unwrap();
        assert!(!path.exists(), "nothing written until something changes");
        let vms = Policy {
            allow_vms: true,
            share: 2.0,
            ..Policy::default()
        };
        s.trust(a.public(), vms, "note".into(), 10).unwrap();
        s.trust(c.public(), Policy::default(), String::new(), 10)
            .unwrap();
        assert!(s.apply_signed(&rotation(&a, &b)).unwrap().is_some());
        assert_eq!(s.apply_signed(&rotation(&a, &b)).unwrap(), None);
        assert!(s.apply_signed(&revocation(&c)).unwrap().is_some());
        let (_, was) = s.untrust(d.public()).unwrap();
        assert!(was, "a baseline publisher can be removed on this host");
        let gen_before = s.generation();

        // A restart keeps every decision.
        let s = TrustStore::open(&path, baseline).unwrap();
        assert!(s.generation() <= gen_before);
        let list = s.listing();
        let ids: Vec<&str> = list.trusted.iter().map(|l| l.id.as_str()).collect();
        assert_eq!(ids, vec![b.public().to_string()], "{list:?}");
        assert_eq!(list.trusted[0].share, 2.0);
        assert!(list.trusted[0].allow_vms);
        assert_eq!(list.trusted[0].rotated_from, vec![a.public().to_string()]);
        assert_eq!(list.removed, vec![d.public().to_string()]);
        assert_eq!(list.revoked.len(), 1);
        let mt = |k: &SecretKey| MachineType::example(k.public());
        assert!(s.admit(&mt(&b)).is_ok());
        assert!(matches!(s.admit(&mt(&a)), Err(Refused::RotatedAway { .. })));
        assert!(matches!(s.admit(&mt(&c)), Err(Refused::Revoked { .. })));
        assert!(matches!(s.admit(&mt(&d)), Err(Refused::NotTrusted { .. })));
    }

    #[test]
    fn rotate_then_revoke_leaves_no_trust_in_the_chain_across_restarts() {
        for (revoked, name) in [(1u8, "the old key"), (2u8, "the new key")] {
            let dir = tempfile::tempdir().unwrap();
            let path = store_path(dir.path());
            let (a, b, c) = (key(1), key(2), key(3));
            let baseline = vec![(c.public(), Policy::default())];
            let mut s = TrustStore::open(&path, baseline.clone()).unwrap();
            s.trust(a.public(), Policy::default(), String::new(), 1)
                .unwrap();
            s.apply_signed(&rotation(&a, &b)).unwrap();
            let mt = |k: &SecretKey| MachineType::example(k.public());
            assert!(s.admit(&mt(&b)).is_ok());
            // Signed rotations and revocations of this chain bear on this host; a stranger's not.
            assert!(s.concerns(&revocation(&key(revoked))));
            assert!(!s.concerns(&revocation(&key(9))));
            assert!(
                s.apply_signed(&revocation(&key(revoked)))
                    .unwrap()
                    .is_some()
            );
            for s in [&s, &TrustStore::open(&path, baseline.clone()).unwrap()] {
                for k in [&a, &b] {
                    let e = s.admit(&mt(k)).unwrap_err();
                    assert!(
                        matches!(e, Refused::Revoked { .. })
                            && e.to_string().contains("compromised"),
                        "revoking {name}: {e}"
                    );
                }
                let trusted: Vec<String> = s.listing().trusted.into_iter().map(|l| l.id).collect();
                assert_eq!(trusted, vec![c.public().to_string()], "revoking {name}");
                assert!(s.admit(&mt(&c)).is_ok(), "another publisher is unaffected");
                assert_eq!(s.signed_entries().len(), 2);
            }
            let mut s = TrustStore::open(&path, baseline).unwrap();
            for k in [&a, &b] {
                let e = s
                    .trust(k.public(), Policy::default(), String::new(), 2)
                    .unwrap_err();
                assert!(e.to_string().contains("revoked"), "revoking {name}: {e}");
            }
        }
    }

    #[test]
    fn revoked_keys_cannot_be_trusted_and_bad_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = store_path(dir.path());
        let mut s = TrustStore::open(&path, Vec::new()).unwrap();
        s.apply_signed(&revocation(&key(5))).unwrap();
        let e = s
            .trust(key(5).public(), Policy::default(), String::new(), 0)
            .unwrap_err();
        assert!(e.to_string().contains("revoked"), "{e}");
        // A machine type is neither a rotation nor a revocation.
        let mt = Envelope::seal(&MachineType::example(key(6).public()), &key(6)).to_bytes();
        assert!(s.apply_signed(&mt).is_err());
        // A tampered signature in the file stops the store from opening.
        let text = std::fs::read_to_string(&path).unwrap();
        let tampered = text.replacen("envelope = \"85", "envelope = \"86", 1);
        assert_ne!(text, tampered);
        std::fs::write(&path, tampered).unwrap();
        assert!(TrustStore::open(&path, Vec::new()).is_err());
        std::fs::write(&path, "publisher = 3\n").unwrap();
        let e = TrustStore::open(&path, Vec::new()).unwrap_err();
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }

    #[test]
    fn owner_policy_wins_over_the_baseline_and_refusals_have_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let a = key(1);
        let mut s = TrustStore::open(
            &store_path(dir.path()),
            vec![(a.public(), Policy::default())],
        )
        .unwrap();
        let mut vm = MachineType::example(a.public());
        vm.backend = gleaner::Backend::Vm;
        let e = s.admit(&vm).unwrap_err();
        assert!(e.to_string().contains("allow_vms is off"), "{e}");
        s.trust(
            a.public(),
            Policy {
                allow_vms: true,
                max_cores: Some(1),
                ..Policy::default()
            },
            String::new(),
            0,
        )
        .unwrap();
        assert_eq!(s.admit(&vm).unwrap().max_cores, 1);
        assert_eq!(s.listing().trusted[0].source, "owner");
    }
}

#[cfg(test)]
mod shape_tests {
    use crate::control::Request;

    #[test]
    fn the_guis_request_shapes_still_parse() {
        // The shapes declared before the policy fields existed, as the GUI sends them.
        let r: Request =
            serde_json::from_str(r#"{"op":"trust","publisher":"x","share":2.0}"#).unwrap();
        assert!(matches!(
            r,
            Request::Trust {
                allow_vms: None,
                max_cores: None,
                ..
            }
        ));
        let r: Request =
            serde_json::from_str(r#"{"op":"trust","publisher":null,"machine_type_hex":"00"}"#)
                .unwrap();
        assert!(matches!(
            r,
            Request::Trust {
                publisher: None,
                ..
            }
        ));
        let r: Request = serde_json::from_str(
            r#"{"op":"trust","publisher":"x","allow_vms":true,"allow_egress":false,"max_cores":2}"#,
        )
        .unwrap();
        assert!(matches!(
            r,
            Request::Trust {
                allow_vms: Some(true),
                max_cores: Some(2),
                ..
            }
        ));
        let r: Request = serde_json::from_str(r#"{"op":"untrust","publisher":"x"}"#).unwrap();
        assert_eq!(
            r,
            Request::Untrust {
                publisher: "x".into()
            }
        );
        let r: Request = serde_json::from_str(r#"{"op":"trusted"}"#).unwrap();
        assert_eq!(r, Request::Trusted);
        // What the CLI sends without policy flags is the old shape exactly.
        let v = serde_json::to_value(Request::Trust {
            publisher: Some("x".into()),
            machine_type_hex: None,
            share: None,
            allow_vms: None,
            allow_egress: None,
            max_cores: None,
        })
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"op":"trust","publisher":"x","machine_type_hex":null,"share":null})
        );
    }
}
