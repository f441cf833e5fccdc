//! A container's signed egress policy, enforced: the policy is resolved to IPv4 networks and ports
//! when the machine is made, the container gets its own bridge with a known interface name, and an
//! iptables chain owned by Gleaner lets packets from that bridge reach only the listed destinations
//! (hooked from DOCKER-USER for routed traffic and from INPUT for the host itself); the rest is
//! rejected. Chain, hooks and network are removed with the machine.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use futures_util::future::BoxFuture;
use gleaner::{Digest, Egress};

use super::{EngineKind, RuntimeError};

/// Appended to the machine's name to name its Docker network.
pub const NETWORK_SUFFIX: &str = "-egress";
/// Prefix of the iptables chains Gleaner owns.
pub const CHAIN_PREFIX: &str = "GLEANER-";
/// How long resolving one host of a policy may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Addresses kept per host: a name that resolves to more is cut, not allowed wholesale.
const ADDRS_PER_HOST: usize = 16;

/// The engine objects that carry one machine's egress policy, all derived from the machine's
/// name so that removal (also after a crash) finds them from the name alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressNames {
    /// The Docker network the container is attached to.
    pub network: String,
    /// The bridge interface (at most 15 bytes, the kernel's limit).
    pub bridge: String,
    /// The iptables chain holding the policy (at most 28 bytes, iptables' limit).
    pub chain: String,
}

impl EgressNames {
    pub fn for_machine(name: &str) -> EgressNames {
        let h = Digest::of(name.as_bytes()).to_string();
        let short = &h[..12];
        EgressNames {
            network: format!("{name}{NETWORK_SUFFIX}"),
            bridge: format!("gl{short}"),
            chain: format!("{CHAIN_PREFIX}{}", short.to_ascii_uppercase()),
        }
    }

    /// The names for a network this runtime made, from the network's name.
    pub fn for_network(network: &str) -> Option<EgressNames> {
        network
            .strip_suffix(NETWORK_SUFFIX)
            .filter(|n| !n.is_empty())
            .map(EgressNames::for_machine)
    }
}

/// One allowed destination: TCP and UDP to `port` on the IPv4 network `net/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Allowed {
    pub net: Ipv4Addr,
    pub prefix: u8,
    pub port: u16,
}

/// What a policy means for a container's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// No network at all (an empty policy).
    None,
    /// Unrestricted (`*`): the engine's default bridge.
    Any,
    /// Only these destinations, on the machine's own filtered bridge; `hosts` are the names the
    /// policy lists with the addresses they resolved to, for the container's /etc/hosts (its
    /// DNS cannot reach a resolver through the filter).
    Filtered {
        allowed: Vec<Allowed>,
        hosts: Vec<(String, Ipv4Addr)>,
    },
}

/// Turns host names into addresses: the system resolver in the daemon, anything in tests.
pub trait Resolver: Send + Sync {
    fn lookup<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> BoxFuture<'a, std::io::Result<Vec<IpAddr>>>;
}

/// The system's resolver (getaddrinfo, through tokio).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn lookup<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> BoxFuture<'a, std::io::Result<Vec<IpAddr>>> {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host, port))
                .await?
                .map(|a| a.ip())
                .collect())
        })
    }
}

fn mask(addr: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    let bits = u32::from(addr);
    let m = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    };
    Ipv4Addr::from(bits & m)
}

fn refused(reason: String) -> RuntimeError {
    RuntimeError::Unsupported(format!("egress policy: {reason}"))
}

/// What `policy` (the machine type's signed entries) means now: host names are resolved here, once,
/// when the machine is made. IPv6 networks are left out (the machine's network is IPv4 only, so
/// they are unreachable, not widened); a host with no IPv4 address is an error.
pub async fn plan(policy: &[String], resolver: &dyn Resolver) -> Result<Plan, RuntimeError> {
    if policy.is_empty() {
        return Ok(Plan::None);
    }
    let parsed = policy
        .iter()
        .map(|e| Egress::parse(e).map_err(|err| refused(err.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    if parsed.contains(&Egress::Any) {
        return Ok(Plan::Any);
    }
    let mut allowed = Vec::new();
    let mut hosts = Vec::new();
    for e in parsed {
        match e {
            Egress::Any => unreachable!("handled above"),
            Egress::Net {
                addr: IpAddr::V4(a),
                prefix,
                port,
            } => allowed.push(Allowed {
                net: mask(a, prefix),
                prefix,
                port,
            }),
            Egress::Net {
                addr: IpAddr::V6(_),
                ..
            } => {}
            Egress::Host { host, port } => {
                let addrs = tokio::time::timeout(RESOLVE_TIMEOUT, resolver.lookup(&host, port))
                    .await
                    .map_err(|_| {
                        refused(format!(
                            "resolving {host} took longer than {RESOLVE_TIMEOUT:?}"
                        ))
                    })?
                    .map_err(|e| refused(format!("cannot resolve {host}: {e}")))?;
                let mut v4: Vec<Ipv4Addr> = addrs
                    .into_iter()
                    .filter_map(|a| match a {
                        IpAddr::V4(a) => Some(a),
                        IpAddr::V6(a) => a.to_ipv4_mapped(),
                    })
                    .collect();
                v4.sort();
                v4.dedup();
                v4.truncate(ADDRS_PER_HOST);
                if v4.is_empty() {
                    return Err(refused(format!("{host} resolves to no IPv4 address")));
                }
                for a in v4 {
                    allowed.push(Allowed {
                        net: a,
                        prefix: 32,
                        port,
                    });
                    hosts.push((host.clone(), a));
                }
            }
        }
    }
    allowed.sort();
    allowed.dedup();
    hosts.sort();
    hosts.dedup();
    Ok(Plan::Filtered { allowed, hosts })
}

/// The `iptables-restore --noflush` input that (re)creates `names.chain` holding the policy and
/// hooks it for packets arriving from `names.bridge`: routed ones from `forward_hook` (DOCKER-USER,
/// or FORWARD when the engine manages no iptables) and those for the host itself from INPUT.
/// Allowed destinations go back to the hooks' own rules (RETURN), so the engine's and the
/// host's firewall still apply to them; everything else is rejected at once.
pub fn apply_script(names: &EgressNames, allowed: &[Allowed], forward_hook: &str) -> String {
    let c = &names.chain;
    let mut s = String::from("*filter\n");
    // Declaring the chain with --noflush creates it, or empties it if it is left over.
    let _ = writeln!(s, ":{c} - [0:0]");
    for a in allowed {
        for proto in ["tcp", "udp"] {
            let _ = writeln!(
                s,
                "-A {c} -d {}/{} -p {proto} -m {proto} --dport {} -j RETURN",
                a.net, a.prefix, a.port
            );
        }
    }
    let _ = writeln!(s, "-A {c} -p tcp -j REJECT --reject-with tcp-reset");
    let _ = writeln!(s, "-A {c} -j REJECT --reject-with icmp-port-unreachable");
    for hook in [forward_hook, "INPUT"] {
        let _ = writeln!(s, "-I {hook} 1 -i {} -j {c}", names.bridge);
    }
    s.push_str("COMMIT\n");
    s
}

/// The `iptables-restore --noflush` input that removes `names.chain` and every rule jumping to it,
/// given the filter table as `iptables -S` prints it; `None` when there is nothing to remove.
pub fn remove_script(listing: &str, names: &EgressNames) -> Option<String> {
    let c = &names.chain;
    let target = format!("-j {c}");
    let mut s = String::from("*filter\n");
    let mut any = false;
    for line in listing.lines() {
        let line = line.trim();
        if let Some(rule) = line.strip_prefix("-A ")
            && line.ends_with(&target)
            && !rule.starts_with(&format!("{c} "))
        {
            let _ = writeln!(s, "-D {rule}");
            any = true;
        }
    }
    let declared = listing.lines().any(|l| l.trim() == format!("-N {c}"));
    if declared {
        let _ = writeln!(s, "-F {c}\n-X {c}");
        any = true;
    }
    s.push_str("COMMIT\n");
    any.then_some(s)
}

/// Where a machine's egress rules live: iptables on the host, or a fake for unit tests.
pub trait Firewall: Send + Sync + std::fmt::Debug {
    /// Installs (replacing any left over) the rules letting `names.bridge` reach only `allowed`.
    fn apply<'a>(
        &'a self,
        names: &'a EgressNames,
        allowed: &'a [Allowed],
    ) -> BoxFuture<'a, Result<(), RuntimeError>>;
    /// Removes the chain and its hooks; nothing to remove is not an error.
    fn remove<'a>(&'a self, names: &'a EgressNames) -> BoxFuture<'a, Result<(), RuntimeError>>;
}

/// The host's iptables (the same front end, legacy or nf_tables, that the Docker Engine uses).
#[derive(Debug, Clone)]
pub struct Iptables {
    iptables: String,
    restore: String,
}

impl Default for Iptables {
    fn default() -> Self {
        Iptables {
            iptables: "iptables".into(),
            restore: "iptables-restore".into(),
        }
    }
}

fn fw_error(call: &'static str, reason: String) -> RuntimeError {
    RuntimeError::Call {
        engine: EngineKind::Docker,
        call: call.into(),
        reason,
    }
}

impl Iptables {
    async fn run(&self, call: &'static str, args: &[&str]) -> Result<String, RuntimeError> {
        let out = tokio::process::Command::new(&self.iptables)
            .args(args)
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| {
                fw_error(
                    call,
                    format!(
                        "cannot run {} (egress policies need iptables and root or CAP_NET_ADMIN): {e}",
                        self.iptables
                    ),
                )
            })?;
        if !out.status.success() {
            return Err(fw_error(
                call,
                format!(
                    "{} {}: {}",
                    self.iptables,
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        String::from_utf8(out.stdout)
            .map_err(|_| fw_error(call, "iptables printed something that is not UTF-8".into()))
    }

    async fn restore(&self, call: &'static str, script: &str) -> Result<(), RuntimeError> {
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new(&self.restore)
            .args(["-w", "--noflush"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                fw_error(
                    call,
                    format!(
                        "cannot run {} (egress policies need iptables and root or CAP_NET_ADMIN): {e}",
                        self.restore
                    ),
                )
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .await
                .map_err(|e| fw_error(call, format!("writing to {}: {e}", self.restore)))?;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| fw_error(call, format!("waiting for {}: {e}", self.restore)))?;
        if !out.status.success() {
            return Err(fw_error(
                call,
                format!(
                    "{} refused the rules ({}): {}\n{script}",
                    self.restore,
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        Ok(())
    }
}

impl Iptables {
    /// Whether this process can manage egress rules: lists the chain the engine sends routed
    /// container traffic through (for `gleaner doctor`). Says which hook rules would go in.
    pub async fn check(&self) -> Result<String, RuntimeError> {
        match self
            .run("iptables -S DOCKER-USER", &["-w", "-S", "DOCKER-USER"])
            .await
        {
            Ok(_) => Ok("iptables works; egress rules hook into DOCKER-USER and INPUT".into()),
            Err(e) => match self.run("iptables -S FORWARD", &["-w", "-S", "FORWARD"]).await {
                Ok(_) => Ok("iptables works; no DOCKER-USER chain, egress rules hook into FORWARD and INPUT".into()),
                Err(_) => Err(e),
            },
        }
    }
}

impl Firewall for Iptables {
    fn apply<'a>(
        &'a self,
        names: &'a EgressNames,
        allowed: &'a [Allowed],
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            // A left-over chain (a crash between apply and remove) would keep stale hooks.
            self.remove(names).await?;
            // The engine hands routed container traffic to DOCKER-USER first; an engine started
            // with --iptables=false has no such chain, and FORWARD is the place then.
            let hook = if self
                .run("iptables -S DOCKER-USER", &["-w", "-S", "DOCKER-USER"])
                .await
                .is_ok()
            {
                "DOCKER-USER"
            } else {
                "FORWARD"
            };
            self.restore(
                "iptables-restore (egress rules)",
                &apply_script(names, allowed, hook),
            )
            .await
        })
    }

    fn remove<'a>(&'a self, names: &'a EgressNames) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let listing = self.run("iptables -S", &["-w", "-S"]).await?;
            match remove_script(&listing, names) {
                Some(script) => {
                    self.restore("iptables-restore (remove egress rules)", &script)
                        .await
                }
                None => Ok(()),
            }
        })
    }
}

/// A firewall that only remembers what it was told, for unit tests of the runtime's bookkeeping.
#[derive(Debug, Default)]
pub struct FakeFirewall {
    /// Chains installed now, with their allowed destinations.
    pub chains: std::sync::Mutex<std::collections::BTreeMap<String, Vec<Allowed>>>,
}

impl Firewall for FakeFirewall {
    fn apply<'a>(
        &'a self,
        names: &'a EgressNames,
        allowed: &'a [Allowed],
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            self.chains
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(names.chain.clone(), allowed.to_vec());
            Ok(())
        })
    }

    fn remove<'a>(&'a self, names: &'a EgressNames) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            self.chains
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&names.chain);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers from a fixed table, like a zone file.
    struct Table(Vec<(&'static str, Vec<IpAddr>)>);

    impl Resolver for Table {
        fn lookup<'a>(
            &'a self,
            host: &'a str,
            _port: u16,
        ) -> BoxFuture<'a, std::io::Result<Vec<IpAddr>>> {
            let r = self
                .0
                .iter()
                .find(|(h, _)| *h == host)
                .map(|(_, a)| a.clone())
                .ok_or_else(|| std::io::Error::other("no such host"));
            Box::pin(async move { r })
        }
    }

    fn p(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn policies_become_plans() {
        let dns = Table(vec![
            (
                "queue.example.org",
                vec![
                    "192.0.2.10".parse().unwrap(),
                    "2001:db8::1".parse().unwrap(),
                    "192.0.2.9".parse().unwrap(),
                ],
            ),
            ("v6only.example.org", vec!["2001:db8::2".parse().unwrap()]),
        ]);
        assert_eq!(plan(&[], &dns).await.unwrap(), Plan::None);
        assert_eq!(
            plan(&p(&["10.0.0.1:80", "*"]), &dns).await.unwrap(),
            Plan::Any
        );
        let got = plan(
            &p(&[
                "queue.example.org:443",
                "10.1.2.3/16:8080",
                "[2001:db8::/32]:443",
                "10.1.0.0/16:8080",
            ]),
            &dns,
        )
        .await
        .unwrap();
        let a = |net: &str, prefix, port| Allowed {
            net: net.parse().unwrap(),
            prefix,
            port,
        };
        assert_eq!(
            got,
            Plan::Filtered {
                // The network is masked to its prefix and duplicates fold; IPv6 is left out.
                allowed: vec![
                    a("10.1.0.0", 16, 8080),
                    a("192.0.2.9", 32, 443),
                    a("192.0.2.10", 32, 443),
                ],
                hosts: vec![
                    ("queue.example.org".into(), "192.0.2.9".parse().unwrap()),
                    ("queue.example.org".into(), "192.0.2.10".parse().unwrap()),
                ],
            }
        );
        for (policy, why) in [
            (
                "nowhere.example.org:80",
                "cannot resolve nowhere.example.org",
            ),
            ("v6only.example.org:80", "no IPv4 address"),
            ("10.0.0.0/40:80", "prefix length"),
        ] {
            let e = plan(&p(&[policy]), &dns).await.unwrap_err().to_string();
            assert!(
                e.contains("egress policy") && e.contains(why),
                "{policy}: {e}"
            );
        }
    }

    #[test]
    fn names_fit_the_kernel_and_iptables_limits_and_come_back_from_the_network() {
        let n = EgressNames::for_machine("gleaner-0123456789abcdef0123456789abcdef");
        assert!(n.bridge.len() <= 15, "{n:?}");
        assert!(n.chain.len() <= 28, "{n:?}");
        assert_eq!(EgressNames::for_network(&n.network), Some(n.clone()));
        assert_eq!(EgressNames::for_network("bridge"), None);
        assert_ne!(EgressNames::for_machine("gleaner-other").chain, n.chain);
    }

    #[test]
    fn scripts_allow_the_listed_destinations_and_remove_exactly_their_own_rules() {
        let n = EgressNames::for_machine("m");
        let script = apply_script(
            &n,
            &[Allowed {
                net: "172.17.0.1".parse().unwrap(),
                prefix: 32,
                port: 8080,
            }],
            "DOCKER-USER",
        );
        let c = &n.chain;
        let b = &n.bridge;
        for want in [
            format!(":{c} - [0:0]"),
            format!("-A {c} -d 172.17.0.1/32 -p tcp -m tcp --dport 8080 -j RETURN"),
            format!("-A {c} -d 172.17.0.1/32 -p udp -m udp --dport 8080 -j RETURN"),
            format!("-A {c} -j REJECT --reject-with icmp-port-unreachable"),
            format!("-I DOCKER-USER 1 -i {b} -j {c}"),
            format!("-I INPUT 1 -i {b} -j {c}"),
        ] {
            assert!(script.contains(&want), "{want} not in\n{script}");
        }
        // The rejects come after every allow.
        assert!(script.find("RETURN") < script.find("REJECT"));

        let other = EgressNames::for_machine("other");
        let listing = format!(
            "-P INPUT ACCEPT\n-N DOCKER-USER\n-N {c}\n-N {oc}\n\
             -A INPUT -i {b} -j {c}\n-A INPUT -i {ob} -j {oc}\n\
             -A DOCKER-USER -i {b} -j {c}\n-A DOCKER-USER -j RETURN\n\
             -A {c} -d 172.17.0.1/32 -p tcp -m tcp --dport 8080 -j RETURN\n-A {c} -j REJECT --reject-with icmp-port-unreachable\n",
            oc = other.chain,
            ob = other.bridge
        );
        let rm = remove_script(&listing, &n).unwrap();
        assert_eq!(
            rm,
            format!(
                "*filter\n-D INPUT -i {b} -j {c}\n-D DOCKER-USER -i {b} -j {c}\n-F {c}\n-X {c}\nCOMMIT\n"
            )
        );
        assert_eq!(remove_script("-P INPUT ACCEPT\n-N DOCKER-USER\n", &n), None);
    }
}
