//! The publisher's side of machine types: a human-edited TOML file, validated by the core and signed
//! into the binary envelope that travels (`gleaner machine-type new|sign|verify|show`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use gleaner::machine_type::MACHINE_TYPE_VERSION;
use gleaner::{
    Backend, Blob, Digest, Envelope, MachineType, Message, PublicKey, SecretKey, Verified,
};
use serde::{Deserialize, Serialize};

/// Why a machine-type file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: {message}")]
    Toml { path: PathBuf, message: String },
    #[error("{path}: key {key}: {reason}")]
    Value {
        path: PathBuf,
        key: &'static str,
        reason: String,
    },
    #[error("{path}: {cause}")]
    Refused {
        path: PathBuf,
        cause: gleaner::Error,
    },
    #[error("{path}: signed by {signer}, which is not one of the expected publishers")]
    UnexpectedSigner { path: PathBuf, signer: PublicKey },
}

/// The TOML form of a machine type, as a publisher writes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineTypeToml {
    pub name: String,
    pub version: u64,
    /// An RFC 3339 time (`2027-06-01T00:00:00Z`) or a period from signing (`90days`).
    pub expires: String,
    pub backend: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub user_data: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<BlobToml>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<BlobToml>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<BlobToml>,
    pub resources: ResourcesToml,
    pub lifetimes: LifetimesToml,
    #[serde(default)]
    pub network: NetworkToml,
    #[serde(default)]
    pub accounting: AccountingToml,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobToml {
    pub url: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcesToml {
    pub cores_min: u16,
    pub cores_max: u16,
    /// A size like `512MiB` or `2GiB`.
    pub memory: String,
    pub disk: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LifetimesToml {
    /// Durations like `2h`, `90s`, `1h 30m`.
    pub max_wallclock: String,
    pub heartbeat: String,
    pub fizzle: String,
    pub backoff: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkToml {
    /// Outbound network allowed: `[]` none, `["*"]` any, or `host:port` entries.
    #[serde(default)]
    pub egress: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountingToml {
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

impl Default for AccountingToml {
    fn default() -> Self {
        AccountingToml { weight: 1.0 }
    }
}

/// A commented template for `gleaner machine-type new`.
pub fn template(name: &str, backend: Backend) -> String {
    let (image, extra) = match backend {
        Backend::Container => (
            "# The container image: a docker-archive tarball by URL, pinned by its sha256\n\
             # (or url = \"oci://registry/name\" with sha256 = the manifest digest).\n\
             [image]\nurl = \"https://example.org/images/worker.tar\"\n\
             sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\n",
            "",
        ),
        Backend::Vm => (
            "# Direct kernel boot: a kernel and an initrd, each pinned by sha256\n\
             # (or an [image] qcow2 disk, booted with a per-machine copy-on-write overlay).\n\
             [kernel]\nurl = \"https://example.org/vm/vmlinuz\"\n\
             sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\n\n\
             [initrd]\nurl = \"https://example.org/vm/initrd.gz\"\n\
             sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\n",
            "",
        ),
    };
    format!(
        r#"# A Gleaner machine type. Edit, then: gleaner machine-type sign {name}.toml --key publisher.key
name = "{name}"
# Raise with every release: factories refuse a version lower than one they have seen.
version = 1
# When factories stop accepting this definition: an RFC 3339 time or a period from signing.
expires = "90days"
backend = "{backend}"
description = "what this machine does, for volunteers deciding whether to trust it"
# Handed to the machine at /user_data (containers) or as NoCloud user-data (VMs).
# Placeholders: ##user_data_space##, ##user_data_machine_id##, ##user_data_host##,
# ##user_data_shutdown_time##, ##user_data_machinefeatures##, ##user_data_jobfeatures##,
# ##user_data_joboutputs##.
user_data = """
#!/bin/sh
echo "machine ##user_data_machine_id## starting"
"""

{image}{extra}
[resources]
cores_min = 1
cores_max = 2
memory = "1GiB"
disk = "2GiB"

[lifetimes]
# Longest a machine may run; shutdowntime is written before it is stopped.
max_wallclock = "6h"
# The workload touches joboutputs/heartbeat at least this often, or it is stopped.
heartbeat = "10m"
# Ending sooner than this counts as an abort and backs the type off across the space.
fizzle = "5m"
backoff = "30m"

[network]
# [] for no network at all, ["*"] for any, or only these: "host:port", "ip[/prefix]:port" (TCP and
# UDP; names resolved when a machine starts). A list is for containers: a VM takes [] or ["*"].
egress = []

[accounting]
weight = 1.0
"#
    )
}

fn value_err(path: &Path, key: &'static str, reason: impl Into<String>) -> PublishError {
    PublishError::Value {
        path: path.to_owned(),
        key,
        reason: reason.into(),
    }
}

fn size_mib(path: &Path, key: &'static str, text: &str) -> Result<u32, PublishError> {
    let bytes: bytesize::ByteSize = text.parse().map_err(|e| {
        value_err(
            path,
            key,
            format!("{text:?} is not a size like 512MiB: {e}"),
        )
    })?;
    u32::try_from(bytes.as_u64() / (1024 * 1024))
        .map_err(|_| value_err(path, key, format!("{text:?} is too large")))
}

fn seconds(path: &Path, key: &'static str, text: &str) -> Result<u32, PublishError> {
    let d = humantime::parse_duration(text).map_err(|e| {
        value_err(
            path,
            key,
            format!("{text:?} is not a duration like 2h or 90s: {e}"),
        )
    })?;
    u32::try_from(d.as_secs()).map_err(|_| value_err(path, key, format!("{text:?} is too long")))
}

fn blob(
    path: &Path,
    key: &'static str,
    b: &Option<BlobToml>,
) -> Result<Option<Blob>, PublishError> {
    b.as_ref()
        .map(|b| {
            let sha256: Digest = b
                .sha256
                .parse()
                .map_err(|e: gleaner::Error| value_err(path, key, e.to_string()))?;
            Ok(Blob {
                url: b.url.clone(),
                sha256,
            })
        })
        .transpose()
}

/// Parses and validates the TOML text of a machine type; `now` (unix seconds) resolves a relative
/// expiry; `publisher` is the key that will sign it.
pub fn parse_toml(
    path: &Path,
    text: &str,
    now: u64,
    publisher: PublicKey,
) -> Result<MachineType, PublishError> {
    let raw: MachineTypeToml = toml::from_str(text).map_err(|e| PublishError::Toml {
        path: path.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })?;
    let backend: Backend = raw.backend.parse().map_err(|_| {
        value_err(
            path,
            "backend",
            format!("{:?} is not container or vm", raw.backend),
        )
    })?;
    let not_after = match humantime::parse_rfc3339_weak(&raw.expires) {
        Ok(t) => t
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| value_err(path, "expires", "is before 1970"))?
            .as_secs(),
        Err(_) => {
            let d: Duration = humantime::parse_duration(&raw.expires).map_err(|_| {
                value_err(
                    path,
                    "expires",
                    format!(
                        "{:?} is neither an RFC 3339 time nor a period like 90days",
                        raw.expires
                    ),
                )
            })?;
            now.saturating_add(d.as_secs())
        }
    };
    if !raw.accounting.weight.is_finite() || raw.accounting.weight <= 0.0 {
        return Err(value_err(
            path,
            "accounting.weight",
            "must be a positive number",
        ));
    }
    let mt = MachineType {
        v: MACHINE_TYPE_VERSION,
        name: raw.name,
        publisher,
        version: raw.version,
        not_after,
        backend,
        image: blob(path, "image.sha256", &raw.image)?,
        kernel: blob(path, "kernel.sha256", &raw.kernel)?,
        initrd: blob(path, "initrd.sha256", &raw.initrd)?,
        user_data: raw.user_data,
        cores_min: raw.resources.cores_min,
        cores_max: raw.resources.cores_max,
        memory_mib: size_mib(path, "resources.memory", &raw.resources.memory)?,
        disk_mib: size_mib(path, "resources.disk", &raw.resources.disk)?,
        max_wallclock_s: seconds(
            path,
            "lifetimes.max_wallclock",
            &raw.lifetimes.max_wallclock,
        )?,
        heartbeat_s: seconds(path, "lifetimes.heartbeat", &raw.lifetimes.heartbeat)?,
        fizzle_s: seconds(path, "lifetimes.fizzle", &raw.lifetimes.fizzle)?,
        backoff_s: seconds(path, "lifetimes.backoff", &raw.lifetimes.backoff)?,
        egress: raw.network.egress,
        weight_milli: (raw.accounting.weight * 1000.0).round() as u32,
        description: raw.description,
    };
    mt.validate(&publisher)
        .map_err(|cause| PublishError::Refused {
            path: path.to_owned(),
            cause,
        })?;
    mt.check_fresh(now).map_err(|cause| PublishError::Refused {
        path: path.to_owned(),
        cause,
    })?;
    Ok(mt)
}

/// The TOML form of a machine type (for `show`), with an absolute expiry.
pub fn to_toml(mt: &MachineType) -> String {
    let blob = |b: &Option<Blob>| {
        b.as_ref().map(|b| BlobToml {
            url: b.url.clone(),
            sha256: b.sha256.to_string(),
        })
    };
    let expires = humantime::format_rfc3339(
        std::time::UNIX_EPOCH + Duration::from_secs(mt.not_after.min(253_402_300_799)),
    );
    let raw = MachineTypeToml {
        name: mt.name.clone(),
        version: mt.version,
        expires: expires.to_string(),
        backend: mt.backend.to_string(),
        description: mt.description.clone(),
        user_data: mt.user_data.clone(),
        image: blob(&mt.image),
        kernel: blob(&mt.kernel),
        initrd: blob(&mt.initrd),
        resources: ResourcesToml {
            cores_min: mt.cores_min,
            cores_max: mt.cores_max,
            memory: format!("{}MiB", mt.memory_mib),
            disk: format!("{}MiB", mt.disk_mib),
        },
        lifetimes: LifetimesToml {
            max_wallclock: humantime::format_duration(Duration::from_secs(
                mt.max_wallclock_s.into(),
            ))
            .to_string(),
            heartbeat: humantime::format_duration(Duration::from_secs(mt.heartbeat_s.into()))
                .to_string(),
            fizzle: humantime::format_duration(Duration::from_secs(mt.fizzle_s.into())).to_string(),
            backoff: humantime::format_duration(Duration::from_secs(mt.backoff_s.into()))
                .to_string(),
        },
        network: NetworkToml {
            egress: mt.egress.clone(),
        },
        accounting: AccountingToml {
            weight: f64::from(mt.weight_milli) / 1000.0,
        },
    };
    let body = toml::to_string(&raw).unwrap_or_else(|e| format!("# cannot render: {e}\n"));
    format!("publisher = \"{}\"  # the signer\n{body}", mt.publisher)
}

/// Reads a TOML machine type, validates it and signs it with `key`: the envelope bytes.
pub fn sign_file(
    path: &Path,
    key: &SecretKey,
    now: u64,
) -> Result<(MachineType, Vec<u8>), PublishError> {
    let text = std::fs::read_to_string(path).map_err(|cause| PublishError::Io {
        path: path.to_owned(),
        cause,
    })?;
    let mt = parse_toml(path, &text, now, key.public())?;
    let bytes = Envelope::seal(&mt, key).to_bytes();
    Ok((mt, bytes))
}

/// Verifies a signed machine-type file: signature, schema, expiry at `now`, and (if any are given)
/// that the signer is one of `publishers`.
pub fn verify_bytes(
    path: &Path,
    bytes: &[u8],
    now: u64,
    publishers: &[PublicKey],
) -> Result<Verified<MachineType>, PublishError> {
    let refused = |cause| PublishError::Refused {
        path: path.to_owned(),
        cause,
    };
    let v = Envelope::open_bytes::<MachineType>(bytes).map_err(refused)?;
    v.message.check_fresh(now).map_err(refused)?;
    if !publishers.is_empty() && !publishers.contains(&v.signer) {
        return Err(PublishError::UnexpectedSigner {
            path: path.to_owned(),
            signer: v.signer,
        });
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretKey {
        SecretKey::from_seed([3; 32])
    }

    #[test]
    fn template_needs_only_real_hashes_to_sign() {
        let text = template("demo", Backend::Container).replace(
            "0000000000000000000000000000000000000000000000000000000000000000",
            &Digest::of(b"x").to_string(),
        );
        let mt = parse_toml(Path::new("demo.toml"), &text, 1_000, key().public()).unwrap();
        assert_eq!(mt.name, "demo");
        assert_eq!(mt.not_after, 1_000 + 90 * 86_400);
        assert_eq!(mt.memory_mib, 1024);
        assert_eq!(mt.max_wallclock_s, 6 * 3600);
        // show → parse gives the same machine type back.
        let shown = to_toml(&mt);
        let body: String = shown.lines().skip(1).collect::<Vec<_>>().join("\n");
        assert_eq!(
            parse_toml(Path::new("x"), &body, 1_000, key().public()).unwrap(),
            mt
        );
    }

    #[test]
    fn the_all_zero_template_hash_is_refused() {
        let err = parse_toml(
            Path::new("t.toml"),
            &template("demo", Backend::Vm),
            0,
            key().public(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("sha256 is all zeros"), "{err}");
    }

    #[test]
    fn bad_values_name_the_file_and_key() {
        let text = template("demo", Backend::Container).replace(
            "0000000000000000000000000000000000000000000000000000000000000000",
            &"ab".repeat(32),
        );
        let cases = [
            (
                "memory = \"1GiB\"",
                "memory = \"lots\"",
                "t.toml: key resources.memory: \"lots\" is not a size",
            ),
            (
                "heartbeat = \"10m\"",
                "heartbeat = \"often\"",
                "t.toml: key lifetimes.heartbeat",
            ),
            (
                "expires = \"90days\"",
                "expires = \"soon\"",
                "t.toml: key expires",
            ),
            (
                "backend = \"container\"",
                "backend = \"jail\"",
                "t.toml: key backend",
            ),
            ("cores_max = 2", "cores_max = 0", "t.toml: invalid cores"),
            (
                "version = 1",
                "version = 1\ncolour = \"red\"",
                "unknown field `colour`",
            ),
            (
                "expires = \"90days\"",
                "expires = \"2001-01-01T00:00:00Z\"",
                "expired",
            ),
        ];
        for (from, to, want) in cases {
            let err = parse_toml(
                Path::new("t.toml"),
                &text.replace(from, to),
                1_000_000_000,
                key().public(),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains(want), "{to}: {err}");
        }
    }
}
