//! Machine type v1: a project's signed definition of a logical machine (Vac's vacuum pipe merged with
//! a Golem-style manifest) and its validation.

use crate::Error;
use crate::envelope::{Kind, Message, check_version};
use crate::ident::PublicKey;
use crate::wire::{Digest, wire_code, wire_struct};

/// The machine-type schema version this build writes and reads.
pub const MACHINE_TYPE_VERSION: u8 = 1;

wire_code! {
    /// How a machine type runs.
    Backend {
        Container = 0 => "container",
        Vm = 1 => "vm",
    }
}

wire_struct! {
/// A content-addressed blob: where to fetch it and the SHA-256 it must have.
///
/// `url` is `http(s)://…` or `file://…` for a tarball or disk image; for a container image from a
/// registry it is `oci://registry/name` and `sha256` is the manifest digest it is pinned to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub url: String,
    pub sha256: Digest,
}
}

wire_struct! {
/// A machine type as signed by its publisher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineType {
    /// Schema version, always [`MACHINE_TYPE_VERSION`].
    pub v: u8,
    /// Lowercase name, unique per publisher: `[a-z0-9][a-z0-9._-]{0,63}`.
    pub name: String,
    /// The publisher's key; must be the envelope's signer.
    pub publisher: PublicKey,
    /// Increases with every release; factories refuse a lower version than one they have seen.
    pub version: u64,
    /// Unix seconds after which the definition is refused.
    pub not_after: u64,
    pub backend: Backend,
    /// The container image or the VM disk image (optional for VMs that boot a kernel directly).
    pub image: Option<Blob>,
    /// Kernel and initrd for direct kernel boot (VMs only).
    pub kernel: Option<Blob>,
    pub initrd: Option<Blob>,
    /// The user_data template handed to the machine; `##user_data_…##` placeholders are substituted.
    pub user_data: String,
    pub cores_min: u16,
    pub cores_max: u16,
    pub memory_mib: u32,
    pub disk_mib: u32,
    pub max_wallclock_s: u32,
    pub heartbeat_s: u32,
    pub fizzle_s: u32,
    pub backoff_s: u32,
    /// Outbound network allowed: empty for none, `["*"]` for any, else `host:port`,
    /// `ip[/prefix]:port` or `[ipv6[/prefix]]:port` entries (see [`Egress`]).
    pub egress: Vec<String>,
    /// Accounting weight in thousandths (1000 = 1.0).
    pub weight_milli: u32,
    pub description: String,
}
}

/// Upper bounds that keep a definition sane; beyond them a definition is refused.
pub mod bounds {
    pub const NAME_MAX: usize = 64;
    pub const CORES_MAX: u16 = 1024;
    pub const MEMORY_MIB_MIN: u32 = 16;
    pub const MEMORY_MIB_MAX: u32 = 4 * 1024 * 1024;
    pub const DISK_MIB_MAX: u32 = 64 * 1024 * 1024;
    pub const WALLCLOCK_MAX_S: u32 = 30 * 24 * 3600;
    pub const USER_DATA_MAX: usize = 64 * 1024;
    pub const EGRESS_MAX: usize = 32;
    pub const WEIGHT_MILLI_MAX: u32 = 100_000;
    pub const URL_MAX: usize = 2048;
    pub const DESCRIPTION_MAX: usize = 4096;
}

impl MachineType {
    /// Refuses a definition that has expired at `now` (unix seconds).
    pub fn check_fresh(&self, now: u64) -> Result<(), Error> {
        if now > self.not_after {
            return Err(Error::Expired {
                not_after: self.not_after,
                now,
            });
        }
        Ok(())
    }

    /// True when the signed egress policy allows any outbound network at all.
    pub fn allows_network(&self) -> bool {
        !self.egress.is_empty()
    }

    /// The egress policy parsed (validation has already refused an entry that does not parse).
    pub fn egress_policy(&self) -> Result<Vec<Egress>, Error> {
        self.egress.iter().map(|e| Egress::parse(e)).collect()
    }
}

fn check_name(name: &str) -> Result<(), Error> {
    let ok_first = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let ok_rest = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if name.len() > bounds::NAME_MAX || !ok_first || !ok_rest {
        return Err(Error::invalid(
            "name",
            format!(
                "{name:?} must be 1 to {} characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit",
                bounds::NAME_MAX
            ),
        ));
    }
    Ok(())
}

fn check_blob(field: &'static str, blob: &Blob) -> Result<(), Error> {
    let url = &blob.url;
    if url.len() > bounds::URL_MAX {
        return Err(Error::invalid(
            field,
            format!("url longer than {} bytes", bounds::URL_MAX),
        ));
    }
    let scheme_ok = ["https://", "http://", "file://", "oci://"]
        .iter()
        .any(|s| url.starts_with(s) && url.len() > s.len());
    if !scheme_ok || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::invalid(
            field,
            format!("{url:?} must be an https://, http://, file:// or oci:// url without spaces"),
        ));
    }
    if blob.sha256 == Digest::default() {
        return Err(Error::invalid(field, "sha256 is all zeros"));
    }
    Ok(())
}

fn check_egress(egress: &[String]) -> Result<(), Error> {
    if egress.len() > bounds::EGRESS_MAX {
        return Err(Error::invalid(
            "egress",
            format!("{} entries, at most {}", egress.len(), bounds::EGRESS_MAX),
        ));
    }
    for e in egress {
        Egress::parse(e)?;
    }
    Ok(())
}

/// One entry of a machine type's egress policy, parsed: where the machine may connect (TCP or UDP
/// to `port`). Hosts are resolved by the client when the machine starts, never by the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Egress {
    /// `*`: any destination, any port.
    Any,
    /// `name:port`: the addresses the name resolves to when the machine starts.
    Host { host: String, port: u16 },
    /// `ip:port`, `ip/prefix:port`, `[v6]:port` or `[v6/prefix]:port`: a network.
    Net {
        addr: std::net::IpAddr,
        prefix: u8,
        port: u16,
    },
}

impl Egress {
    /// Parses one policy entry, saying what is wrong with it when it is not one of the forms.
    pub fn parse(e: &str) -> Result<Egress, Error> {
        if e == "*" {
            return Ok(Egress::Any);
        }
        let bad = |why: &str| {
            Error::invalid(
                "egress",
                format!(
                    "{e:?} is neither \"*\" nor host:port, ip[/prefix]:port or [ipv6[/prefix]]:port: {why}"
                ),
            )
        };
        let (dest, port) = e.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| bad("the port is not 1-65535"))?;
        let dest = match dest.strip_prefix('[') {
            Some(inner) => inner
                .strip_suffix(']')
                .ok_or_else(|| bad("an unclosed '['"))?,
            None => dest,
        };
        let (addr, prefix) = match dest.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (dest, None),
        };
        if let Ok(ip) = addr.parse::<std::net::IpAddr>() {
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let prefix = match prefix {
                None => max,
                Some(p) => p
                    .parse::<u8>()
                    .ok()
                    .filter(|p| *p <= max)
                    .ok_or_else(|| bad("the prefix length is out of range"))?,
            };
            return Ok(Egress::Net {
                addr: ip,
                prefix,
                port,
            });
        }
        if prefix.is_some() {
            return Err(bad("a prefix length needs an ip address"));
        }
        let host_ok = !addr.is_empty()
            && addr.len() <= 253
            && !addr.starts_with(['-', '.'])
            && addr
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b));
        if !host_ok {
            return Err(bad("the host is not a dns name or ip address"));
        }
        Ok(Egress::Host {
            host: addr.to_ascii_lowercase(),
            port,
        })
    }
}

impl Message for MachineType {
    const KIND: Kind = Kind::MachineType;

    fn validate(&self, signer: &PublicKey) -> Result<(), Error> {
        use bounds::*;
        check_version("machine type", self.v, MACHINE_TYPE_VERSION)?;
        check_name(&self.name)?;
        if &self.publisher != signer {
            return Err(Error::invalid(
                "publisher",
                format!("names {} but was signed by {signer}", self.publisher),
            ));
        }
        if self.version == 0 {
            return Err(Error::invalid("version", "must be at least 1"));
        }
        match self.backend {
            Backend::Container => {
                let Some(image) = &self.image else {
                    return Err(Error::invalid("image", "a container needs an image"));
                };
                check_blob("image", image)?;
                if self.kernel.is_some() || self.initrd.is_some() {
                    return Err(Error::invalid(
                        "kernel",
                        "kernel and initrd are for vm machine types only",
                    ));
                }
            }
            Backend::Vm => {
                if let Some(image) = &self.image {
                    check_blob("image", image)?;
                    if image.url.starts_with("oci://") {
                        return Err(Error::invalid(
                            "image",
                            "a vm image cannot be an oci:// reference",
                        ));
                    }
                }
                match (&self.kernel, &self.initrd) {
                    (Some(k), i) => {
                        check_blob("kernel", k)?;
                        if let Some(i) = i {
                            check_blob("initrd", i)?;
                        }
                    }
                    (None, Some(_)) => {
                        return Err(Error::invalid("initrd", "an initrd needs a kernel"));
                    }
                    (None, None) if self.image.is_none() => {
                        return Err(Error::invalid(
                            "image",
                            "a vm needs a disk image or a kernel",
                        ));
                    }
                    (None, None) => {}
                }
            }
        }
        if self.user_data.len() > USER_DATA_MAX {
            return Err(Error::invalid(
                "user_data",
                format!("{} bytes, at most {USER_DATA_MAX}", self.user_data.len()),
            ));
        }
        if self.cores_min == 0 || self.cores_min > self.cores_max || self.cores_max > CORES_MAX {
            return Err(Error::invalid(
                "cores",
                format!(
                    "min {} and max {} must satisfy 1 <= min <= max <= {CORES_MAX}",
                    self.cores_min, self.cores_max
                ),
            ));
        }
        if !(MEMORY_MIB_MIN..=MEMORY_MIB_MAX).contains(&self.memory_mib) {
            return Err(Error::invalid(
                "memory",
                format!(
                    "{} MiB is outside {MEMORY_MIB_MIN}..={MEMORY_MIB_MAX} MiB",
                    self.memory_mib
                ),
            ));
        }
        if self.disk_mib == 0 || self.disk_mib > DISK_MIB_MAX {
            return Err(Error::invalid(
                "disk",
                format!("{} MiB is outside 1..={DISK_MIB_MAX} MiB", self.disk_mib),
            ));
        }
        if self.max_wallclock_s == 0 || self.max_wallclock_s > WALLCLOCK_MAX_S {
            return Err(Error::invalid(
                "max_wallclock",
                format!(
                    "{} s is outside 1..={WALLCLOCK_MAX_S} s",
                    self.max_wallclock_s
                ),
            ));
        }
        if self.heartbeat_s == 0 || self.heartbeat_s > self.max_wallclock_s {
            return Err(Error::invalid(
                "heartbeat",
                format!(
                    "{} s must be at least 1 s and at most max_wallclock ({} s)",
                    self.heartbeat_s, self.max_wallclock_s
                ),
            ));
        }
        if self.fizzle_s >= self.max_wallclock_s {
            return Err(Error::invalid(
                "fizzle",
                format!(
                    "{} s must be below max_wallclock ({} s)",
                    self.fizzle_s, self.max_wallclock_s
                ),
            ));
        }
        if self.backoff_s > WALLCLOCK_MAX_S {
            return Err(Error::invalid(
                "backoff",
                format!("{} s is more than {WALLCLOCK_MAX_S} s", self.backoff_s),
            ));
        }
        check_egress(&self.egress)?;
        if self.weight_milli == 0 || self.weight_milli > WEIGHT_MILLI_MAX {
            return Err(Error::invalid(
                "weight",
                format!(
                    "{} must be in 0.001..=100",
                    f64::from(self.weight_milli) / 1000.0
                ),
            ));
        }
        if self.description.len() > DESCRIPTION_MAX {
            return Err(Error::invalid(
                "description",
                format!(
                    "{} bytes, at most {DESCRIPTION_MAX}",
                    self.description.len()
                ),
            ));
        }
        Ok(())
    }
}

impl MachineType {
    /// A complete, valid container machine type for `publisher`: the template behind
    /// `gleaner machine-type new`, test vectors and examples.
    pub fn example(publisher: PublicKey) -> MachineType {
        MachineType {
            v: MACHINE_TYPE_VERSION,
            name: "example-busybox".into(),
            publisher,
            version: 1,
            not_after: 1_900_000_000,
            backend: Backend::Container,
            image: Some(Blob {
                url: "http://127.0.0.1:8080/busybox.tar".into(),
                sha256: Digest::of(b"example image"),
            }),
            kernel: None,
            initrd: None,
            user_data: "#!/bin/sh\necho hello from ##user_data_machine_id##\n".into(),
            cores_min: 1,
            cores_max: 2,
            memory_mib: 256,
            disk_mib: 512,
            max_wallclock_s: 3600,
            heartbeat_s: 60,
            fizzle_s: 30,
            backoff_s: 600,
            egress: vec![],
            weight_milli: 1000,
            description: "an example machine type".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn egress_entries_parse_into_hosts_and_networks() {
        let net = |a: &str, prefix, port| Egress::Net {
            addr: ip(a),
            prefix,
            port,
        };
        for (entry, want) in [
            ("*", Egress::Any),
            (
                "Queue.Example.org:443",
                Egress::Host {
                    host: "queue.example.org".into(),
                    port: 443,
                },
            ),
            ("192.0.2.7:80", net("192.0.2.7", 32, 80)),
            ("10.0.0.0/8:9000", net("10.0.0.0", 8, 9000)),
            ("[2001:db8::1]:443", net("2001:db8::1", 128, 443)),
            ("[2001:db8::/32]:443", net("2001:db8::", 32, 443)),
            // Unbracketed IPv6, which earlier versions accepted, still parses.
            ("::1:8080", net("::1", 128, 8080)),
        ] {
            assert_eq!(Egress::parse(entry).unwrap(), want, "{entry}");
        }
    }

    #[test]
    fn bad_egress_entries_are_refused_with_the_reason() {
        for (entry, why) in [
            ("queue.example.org", "no port"),
            ("queue.example.org:0", "the port"),
            ("queue.example.org:70000", "the port"),
            ("10.0.0.0/33:80", "prefix length is out of range"),
            ("[2001:db8::/129]:80", "prefix length is out of range"),
            ("example.org/8:80", "needs an ip address"),
            ("[::1:80", "unclosed"),
            ("bad host:80", "not a dns name"),
            ("-x.org:80", "not a dns name"),
            (":80", "not a dns name"),
        ] {
            let e = Egress::parse(entry).unwrap_err().to_string();
            assert!(e.contains("egress") && e.contains(why), "{entry}: {e}");
        }
        let mut mt = MachineType::example(crate::SecretKey::from_seed([1; 32]).public());
        mt.egress = vec!["10.1.0.0/16:443".into(), "example.org:80".into()];
        assert_eq!(mt.egress_policy().unwrap().len(), 2);
        mt.egress = vec!["10.1.0.0/16".into()];
        assert!(mt.egress_policy().is_err());
    }
}
