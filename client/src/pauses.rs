//! What the owner paused — the whole host (`gleaner pause`) and machine types (`gleaner pause
//! TYPE`) — kept in `<state_dir>/paused.toml` (written atomically, so a restart keeps them), and
//! the names people type resolved to digests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gleaner::Digest;
use serde::{Deserialize, Serialize};

/// The file in the state dir.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("paused.toml")
}

/// One paused machine type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PausedType {
    pub digest: String,
    pub name: String,
    /// When it was paused (unix seconds).
    pub since: u64,
    /// Resumes by itself at this time (unix seconds), if the pause was for a while.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
}

/// The whole host paused by its owner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostPause {
    /// When it was paused (unix seconds).
    pub since: u64,
    /// Resumes by itself at this time (unix seconds), if the pause was for a while.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRepr {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    host: Option<HostPause>,
    #[serde(default, rename = "type")]
    types: Vec<PausedType>,
}

/// The owner's pauses: the whole host's, and the paused machine types by digest.
#[derive(Debug)]
pub struct PausedTypes {
    path: PathBuf,
    host: Option<HostPause>,
    entries: BTreeMap<Digest, PausedType>,
}

impl PausedTypes {
    /// Reads the file (none yet: nothing paused). A file that cannot be read is an error naming
    /// it, rather than pauses silently lost.
    pub fn open(path: &Path) -> Result<PausedTypes, String> {
        let mut entries = BTreeMap::new();
        let mut host = None;
        match std::fs::read_to_string(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: cannot read: {e}", path.display())),
            Ok(text) => {
                let repr: FileRepr = toml::from_str(&text).map_err(|e| {
                    format!(
                        "{}: {} (fix it, or remove it to resume every paused machine type)",
                        path.display(),
                        e.message().trim()
                    )
                })?;
                host = repr.host;
                for t in repr.types {
                    let d = t.digest.parse::<Digest>().map_err(|_| {
                        format!(
                            "{}: {:?} is not a machine type's digest (sha256 in hex)",
                            path.display(),
                            t.digest
                        )
                    })?;
                    entries.insert(d, t);
                }
            }
        }
        Ok(PausedTypes {
            path: path.to_owned(),
            host,
            entries,
        })
    }

    /// The whole host's pause, if the owner paused it.
    pub fn host(&self) -> Option<&HostPause> {
        self.host.as_ref()
    }

    /// Sets or lifts the whole host's pause, written to the file before it takes effect.
    pub fn set_host(&mut self, pause: Option<HostPause>) -> Result<(), String> {
        let old = std::mem::replace(&mut self.host, pause);
        self.save().inspect_err(|_| self.host = old)
    }

    pub fn list(&self) -> Vec<PausedType> {
        self.entries.values().cloned().collect()
    }

    pub fn digests(&self) -> Vec<Digest> {
        self.entries.keys().copied().collect()
    }

    pub fn contains(&self, d: &Digest) -> bool {
        self.entries.contains_key(d)
    }

    /// Adds (or renews) a pause, written to the file before it takes effect.
    pub fn pause(
        &mut self,
        d: Digest,
        name: &str,
        now: u64,
        until: Option<u64>,
    ) -> Result<(), String> {
        let old = self.entries.insert(
            d,
            PausedType {
                digest: d.to_string(),
                name: name.to_owned(),
                since: now,
                until,
            },
        );
        self.save().inspect_err(|_| {
            match old {
                Some(o) => self.entries.insert(d, o),
                None => self.entries.remove(&d),
            };
        })
    }

    /// Lifts a pause; false if it was not paused.
    pub fn resume(&mut self, d: &Digest) -> Result<bool, String> {
        let Some(old) = self.entries.remove(d) else {
            return Ok(false);
        };
        self.save().inspect_err(|_| {
            self.entries.insert(*d, old);
        })?;
        Ok(true)
    }

    /// Pauses whose time has run out.
    pub fn expired(&self, now: u64) -> Vec<Digest> {
        self.entries
            .iter()
            .filter(|(_, t)| t.until.is_some_and(|u| now >= u))
            .map(|(d, _)| *d)
            .collect()
    }

    /// A temporary file, fsync, rename over the old one, fsync of the folder.
    fn save(&self) -> Result<(), String> {
        let repr = FileRepr {
            host: self.host.clone(),
            types: self.list(),
        };
        let body = toml::to_string(&repr).map_err(|e| e.to_string())?;
        let text = format!(
            "# What the owner paused on this host ([host]: all work; [[type]]: machine types whose\n\
             # machines stay frozen and none starts). Written by the daemon; change it with\n\
             # `gleaner pause [TYPE]` / `gleaner resume [TYPE]`.\n\n{body}"
        );
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("{}: cannot create: {e}", dir.display()))?;
        }
        crate::image_archive::write_atomic(&self.path, text.as_bytes())
            .map_err(|e| format!("{}: cannot write: {e}", self.path.display()))?;
        if let Some(dir) = self.path.parent()
            && let Ok(d) = std::fs::File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// A machine type the daemon knows (offered, running, or paused), for resolving a name.
#[derive(Debug, Clone, PartialEq)]
pub struct Known {
    pub digest: Digest,
    pub name: String,
    /// "v3 by <publisher>" or "paused, no longer offered", for the list in errors.
    pub about: String,
}

/// Resolves what the owner typed (a machine type's name, its digest, or at least 8 leading hex
/// digits of it) to one digest among `known`; unknown or ambiguous names are refused with what
/// matches or what there is.
pub fn resolve(arg: &str, known: &[Known]) -> Result<Known, String> {
    let arg = arg.trim();
    let mut matches: Vec<&Known> = Vec::new();
    let hex = arg.len() >= 8 && arg.bytes().all(|b| b.is_ascii_hexdigit());
    for k in known {
        let d = k.digest.to_string();
        let hit = k.name == arg || (hex && d.starts_with(&arg.to_ascii_lowercase()));
        if hit && !matches.iter().any(|m| m.digest == k.digest) {
            matches.push(k);
        }
    }
    let line = |k: &Known| format!("{} ({}, {})", k.name, k.about, k.digest);
    match matches.as_slice() {
        [one] => Ok((*one).clone()),
        [] if known.is_empty() => Err(format!(
            "no machine type {arg:?} here: this host offers no machine types yet"
        )),
        [] => {
            let mut names: Vec<String> = Vec::new();
            for k in known {
                if !names.contains(&k.name) {
                    names.push(k.name.clone());
                }
            }
            Err(format!(
                "no machine type {arg:?} here; the machine types here are: {}",
                names.join(", ")
            ))
        }
        many => Err(format!(
            "{arg:?} names {} machine types: {}; name one by its digest",
            many.len(),
            many.iter().map(|k| line(k)).collect::<Vec<_>>().join("; ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(name: &str, seed: &str) -> Known {
        Known {
            digest: Digest::of(seed.as_bytes()),
            name: name.into(),
            about: "v1 by test".into(),
        }
    }

    #[test]
    fn names_and_digests_resolve_and_ambiguity_is_refused() {
        let a = known("alpha", "a");
        let b1 = known("beta", "b1");
        let b2 = known("beta", "b2");
        let all = vec![a.clone(), b1.clone(), b2.clone(), a.clone()];
        assert_eq!(resolve("alpha", &all).unwrap(), a);
        assert_eq!(resolve(&b2.digest.to_string(), &all).unwrap(), b2);
        assert_eq!(resolve(&b1.digest.to_string()[..10], &all).unwrap(), b1);
        let e = resolve("beta", &all).unwrap_err();
        assert!(
            e.contains("names 2 machine types") && e.contains(&b1.digest.to_string()),
            "{e}"
        );
        let e = resolve("gamma", &all).unwrap_err();
        assert!(e.contains("alpha, beta"), "{e}");
        assert!(
            resolve("alpha", &[])
                .unwrap_err()
                .contains("no machine types")
        );
        // Short hex is a name, not a prefix.
        assert!(resolve("abc", &all).is_err());
    }

    #[test]
    fn pauses_survive_a_reopen_and_a_bad_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path());
        let d = Digest::of(b"x");
        let mut t = PausedTypes::open(&p).unwrap();
        t.pause(d, "x", 10, Some(70)).unwrap();
        let t2 = PausedTypes::open(&p).unwrap();
        assert!(t2.contains(&d));
        assert_eq!(t2.list()[0].name, "x");
        assert_eq!(t2.expired(69), vec![]);
        assert_eq!(t2.expired(70), vec![d]);
        assert!(t.resume(&d).unwrap());
        assert!(!t.resume(&d).unwrap());
        assert!(PausedTypes::open(&p).unwrap().list().is_empty());
        std::fs::write(&p, "[[type]]\ndigest = \"zz\"\nname = \"x\"\nsince = 1\n").unwrap();
        let e = PausedTypes::open(&p).unwrap_err();
        assert!(e.contains("paused.toml") && e.contains("digest"), "{e}");
        std::fs::write(&p, "bogus = 1\n").unwrap();
        assert!(PausedTypes::open(&p).unwrap_err().contains("remove it"));
    }

    #[test]
    fn the_host_pause_survives_a_reopen_beside_type_pauses() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path());
        let d = Digest::of(b"x");
        let mut t = PausedTypes::open(&p).unwrap();
        assert_eq!(t.host(), None);
        t.pause(d, "x", 10, None).unwrap();
        let hp = HostPause {
            since: 20,
            until: Some(80),
        };
        t.set_host(Some(hp.clone())).unwrap();
        let t2 = PausedTypes::open(&p).unwrap();
        assert_eq!(t2.host(), Some(&hp));
        assert!(t2.contains(&d));
        t.set_host(None).unwrap();
        let t3 = PausedTypes::open(&p).unwrap();
        assert_eq!(t3.host(), None);
        assert!(t3.contains(&d), "lifting the host's pause keeps the type's");
    }
}
