//! `gleaner doctor`: checks what this host offers Gleaner, each check with a fix hint.

use serde::Serialize;

use crate::runtime::Runtime;

/// One check's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
    /// What to do when not ok.
    pub fix: Option<String>,
}

fn cpu_has_virt_flags() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

/// Runs every check (the coordinator one only when a URL is given).
pub async fn checks(coordinator: Option<(&str, Option<gleaner::Digest>)>) -> Vec<Check> {
    let mut out = Vec::new();
    let cache = std::env::temp_dir().join("gleaner-doctor-cache");
    match crate::runtime::docker::DockerRuntime::connect("gleaner-doctor", cache.clone(), 1 << 20).await {
        Ok(rt) => match rt.probe().await {
            Ok(p) => {
                out.push(Check {
                    name: "docker",
                    ok: true,
                    detail: format!("Docker Engine {}", p.version),
                    fix: None,
                });
                out.push(Check {
                    name: "cgroups",
                    ok: true,
                    detail: format!("cgroup v{}", p.cgroup_version),
                    fix: None,
                });
            }
            Err(e) => out.push(Check {
                name: "docker",
                ok: false,
                detail: e.to_string(),
                fix: Some("start dockerd (systemctl start docker) and add the gleaner user to the docker group".into()),
            }),
        },
        Err(e) => out.push(Check {
            name: "docker",
            ok: false,
            detail: e.to_string(),
            fix: Some("install Docker Engine (apt-get install docker.io) and start it".into()),
        }),
    }
    let _ = std::fs::remove_dir_all(&cache);
    // Not required: without it only container types whose egress lists destinations fail.
    out.push(
        match crate::runtime::egress::Iptables::default().check().await {
            Ok(detail) => Check {
                name: "egress",
                ok: true,
                detail,
                fix: None,
            },
            Err(e) => Check {
                name: "egress",
                ok: false,
                detail: format!("{e}: container types whose egress lists destinations cannot start"),
                fix: Some(
                    "install iptables and give the daemon CAP_NET_ADMIN (the packaged unit does) or run it as root"
                        .into(),
                ),
            },
        },
    );
    let kvm_dev = std::path::Path::new("/dev/kvm").exists();
    let flags = cpu_has_virt_flags();
    out.push(Check {
        name: "kvm",
        ok: kvm_dev && flags,
        detail: match (kvm_dev, flags) {
            (true, true) => "/dev/kvm present and the CPU has vmx/svm".into(),
            (true, false) => "/dev/kvm exists but the CPU shows no vmx/svm (software KVM): VMs would fall back to TCG".into(),
            (false, _) => "no /dev/kvm: VMs would fall back to TCG".into(),
        },
        fix: (!(kvm_dev && flags)).then(|| "enable hardware virtualisation in the firmware; containers work without it".into()),
    });
    // The VM helper (libvirt runs in it, never in the daemon), then the real VM engine through
    // it: libvirtd reachable, and its probe (a test boot before trusting KVM).
    let helper = crate::runtime::vmhost::find_helper();
    out.push(Check {
        name: "vm helper",
        ok: helper.is_ok(),
        detail: match &helper {
            Ok(p) => format!("{} (started only while VMs need libvirt)", p.display()),
            Err(e) => e.clone(),
        },
        fix: helper.is_err().then(|| {
            "reinstall the gleaner-client package, which ships gleaner-vmhost beside gleaner".into()
        }),
    });
    let vm_dir = std::env::temp_dir().join(format!("gleaner-doctor-vms-{}", std::process::id()));
    let cfg = crate::runtime::vmhost::LibvirtConfig::new("gleaner-doctor", vm_dir.clone());
    let connected = match helper {
        Ok(h) => Some(crate::runtime::vmhost::VmHostRuntime::connect(cfg, h).await),
        Err(_) => None,
    };
    match connected {
        // Said above, with the fix: without the helper libvirt is not tried.
        None => out.push(Check {
            name: "vm backend",
            ok: false,
            detail: "not tried without the VM helper; vm machine types are refused, containers \
                     still run"
                .into(),
            fix: None,
        }),
        Some(Ok(rt)) => match rt.probe().await {
            Ok(p) => out.push(Check {
                name: "vm backend",
                ok: true,
                detail: format!(
                    "{}; VMs run under {} ({})",
                    p.version,
                    if p.kvm_usable { "KVM" } else { "TCG" },
                    p.notes.join("; ")
                ),
                fix: None,
            }),
            Err(e) => out.push(Check {
                name: "vm backend",
                ok: false,
                detail: e.to_string(),
                fix: Some(
                    "check libvirtd's log; `virsh -c qemu:///system version` must answer".into(),
                ),
            }),
        },
        Some(Err(e)) => out.push(Check {
            name: "vm backend",
            ok: false,
            detail: format!("{e}; vm machine types are refused, containers still run"),
            fix: Some(
                "apt-get install libvirt-daemon-system qemu-system-x86 genisoimage, then start \
                 libvirtd and virtlogd (installers/start-engines.sh)"
                    .into(),
            ),
        }),
    }
    let _ = std::fs::remove_dir_all(&vm_dir);
    // The owner-activity sources the daemon would use here, found the same way it finds them.
    let display = std::env::var("DISPLAY").ok();
    let cancel = tokio_util::sync::CancellationToken::new();
    let (sources, notes) = crate::owner::Sources::detect(
        display.as_deref(),
        std::path::PathBuf::from("/sys/class/power_supply"),
        std::path::Path::new("/dev/input"),
        &[],
        None,
        cancel.clone(),
    )
    .await;
    cancel.cancel();
    let input = sources.idle.len();
    out.push(Check {
        name: "idle sources",
        ok: true,
        detail: format!("{input} owner-input source(s): {}", notes.join("; ")),
        fix: (input == 0).then(|| {
            "without an input source the owner always counts as away; on a desktop run the daemon \
             in the user's session (DISPLAY set) or with logind on the system bus"
                .into()
        }),
    });
    // A freeze through the kernel's cgroup freezer takes milliseconds; without write access to
    // the cgroups (an unprivileged user, systemd's ProtectControlGroups) the runtimes fall back
    // to the engines' own pause, and the idle CPU class is not set either.
    out.push(match crate::runtime::freezer::writable() {
        Ok(dir) => Check {
            name: "fast freeze",
            ok: true,
            detail: format!(
                "guests are frozen through their cgroups ({}) in milliseconds, and run in the \
                 idle CPU class while the owner is present",
                dir.display()
            ),
            fix: None,
        },
        Err(e) => Check {
            name: "fast freeze",
            ok: false,
            detail: format!(
                "cannot write the cgroups ({e}): guests are frozen by the engines instead \
                 (docker pause, virDomainSuspend: tens to hundreds of ms when the owner returns) \
                 and keep normal CPU weight while throttled"
            ),
            fix: Some(
                "run the daemon as root, or give it write access to /sys/fs/cgroup \
                 (see docs/guides/department.md, \"Yielding fast\")"
                    .into(),
            ),
        },
    });
    if let Some((url, pin)) = coordinator {
        let r = match crate::pinning::http_client(pin) {
            Ok(c) => c
                .get(format!("{}/healthz", url.trim_end_matches('/')))
                .send()
                .await
                .map_err(|e| format!("{e:#}")),
            Err(e) => Err(e),
        };
        out.push(match r {
            Ok(resp) if resp.status().is_success() => Check {
                name: "coordinator",
                ok: true,
                detail: format!("{url} answers"),
                fix: None,
            },
            Ok(resp) => Check {
                name: "coordinator",
                ok: false,
                detail: format!("{url}: {}", resp.status()),
                fix: Some("check the coordinator's logs".into()),
            },
            Err(e) => Check {
                name: "coordinator",
                ok: false,
                // No HTTPS client at all (no root certificates): the URL is not the problem.
                fix: Some(if e.starts_with("cannot set up HTTPS") {
                    "install the system's root certificates (apt install ca-certificates), or pin \
                     the coordinator's certificate with --coordinator-fingerprint"
                        .into()
                } else {
                    "check the URL, the network and the pinned fingerprint".into()
                }),
                detail: e,
            },
        });
    }
    out
}
