//! VM runtime benchmark against the real libvirtd, printing ratios to a baseline measured in the
//! same run: Gleaner's VM start (seed + define + start through the virt crate) vs `virsh create`
//! of an equivalent domain (the same XML, its seed made beforehand), both to "running" and to the
//! guest's first heartbeat, under the domain type the probe picks (TCG here).
//!
//! Run: `cargo bench -p gleaner-vmhost --bench vm --profile dev` (libvirtd running, see
//! installers/start-engines.sh). `GLEANER_BENCH_N` sets the sample count (default 8). The runtime
//! runs in process here (as in the helper); the daemon adds one pipe round trip per call.

#[path = "../../client/benches/common/mod.rs"]
mod common;
use common::{percentile, vm_assets};

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use gleaner::{Digest, Id16};
use gleaner_client::runtime::{Limits, MachineSpec, Runtime};
use gleaner_vmhost::libvirt::{DomainXml, LibvirtConfig, LibvirtRuntime, SHARE_TAGS, domain_xml};

const USER_DATA: &str = "#!/bin/sh\nsleep 600\n";

fn mjf(root: &Path) -> PathBuf {
    for sub in SHARE_TAGS {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    std::fs::set_permissions(
        root.join("joboutputs"),
        std::fs::Permissions::from_mode(0o1777),
    )
    .unwrap();
    std::fs::write(root.join("user_data"), USER_DATA).unwrap();
    root.to_owned()
}

fn virsh(args: &[&str]) -> bool {
    Command::new("virsh")
        .arg("-c")
        .arg("qemu:///system")
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn wait_heartbeat(mjf: &Path, t0: Instant) -> Duration {
    let beat = mjf.join("joboutputs/heartbeat");
    while !beat.exists() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no heartbeat");
        std::thread::sleep(Duration::from_millis(10));
    }
    t0.elapsed()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Destroys the bench's domains even when it panics.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for n in &self.0 {
            virsh(&["destroy", n]);
            virsh(&["undefine", n]);
        }
    }
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("GLEANER_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let (kernel, initrd) = vm_assets();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let owner = format!("bench-vm-{}", std::process::id());
    let rt = LibvirtRuntime::connect(LibvirtConfig::new(&owner, tmp.path().join("state")))
        .await
        .expect("libvirtd is running (installers/start-engines.sh)");
    let probe = rt.probe().await.unwrap();
    println!("{} — {:?}", probe.version, probe.notes);
    let mut cleanup = Cleanup(Vec::new());

    let mut ours_create = vec![];
    let (mut ours_run, mut ours_beat, mut base_run, mut base_beat) =
        (vec![], vec![], vec![], vec![]);
    for i in 0..n {
        // Gleaner: seed, define and start through the runtime.
        let name = format!("{owner}-g{i}");
        cleanup.0.push(name.clone());
        let dir = mjf(&tmp.path().join(format!("g{i}")));
        let spec = MachineSpec {
            backend: gleaner_client::runtime::Backend::Vm,
            machine_id: Id16([i as u8; 16]),
            machine_type: Digest::of(b"bench"),
            name: name.clone(),
            image: None,
            kernel: Some(kernel.clone()),
            initrd: Some(initrd.clone()),
            cores: 1,
            limits: Limits {
                cpus: 1.0,
                memory_bytes: 256 << 20,
            },
            disk_bytes: 64 << 20,
            pids_limit: 64,
            mjf_dir: dir.clone(),
            egress: vec![],
            command: None,
            labels: BTreeMap::new(),
        };
        let t0 = Instant::now();
        let m = rt.create(&spec).await.unwrap();
        ours_create.push(t0.elapsed());
        rt.start(&m).await.unwrap();
        ours_run.push(t0.elapsed());
        ours_beat.push(wait_heartbeat(&dir, t0));
        rt.remove(&m).await.unwrap();

        // Baseline: `virsh create` of the same domain (transient), its seed made beforehand.
        let bname = format!("{owner}-b{i}");
        cleanup.0.push(bname.clone());
        let bdir = mjf(&tmp.path().join(format!("b{i}")));
        let seed_src = tmp.path().join(format!("b{i}-seed"));
        std::fs::create_dir_all(&seed_src).unwrap();
        std::fs::write(seed_src.join("user-data"), USER_DATA).unwrap();
        std::fs::write(seed_src.join("meta-data"), "instance-id: b\n").unwrap();
        let seed = tmp.path().join(format!("b{i}-seed.iso"));
        let ok = Command::new("genisoimage")
            .args(["-quiet", "-volid", "cidata", "-joliet", "-rock", "-output"])
            .arg(&seed)
            .arg(seed_src.join("user-data"))
            .arg(seed_src.join("meta-data"))
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let labels = BTreeMap::new();
        let xml = domain_xml(&DomainXml {
            domain_type: rt.domain_type(),
            name: &bname,
            owner: &owner,
            machine_id: Id16([0xb0; 16]),
            machine_type: Digest::of(b"bench"),
            labels: &labels,
            vcpus: 1,
            memory_bytes: 256 << 20,
            cpus: 1.0,
            kernel: Some(&kernel),
            initrd: Some(&initrd),
            disk: None,
            seed: &seed,
            shares: SHARE_TAGS.iter().map(|t| (*t, bdir.join(t))).collect(),
            console_log: &tmp.path().join(format!("b{i}-console.log")),
            // The same read-only virtiofsd as the runtime's domains: an equivalent domain.
            virtiofsd_ro: rt.virtiofsd_ro().expect("virtiofsd is installed"),
            network: false,
        })
        .unwrap();
        let xml_path = tmp.path().join(format!("b{i}.xml"));
        std::fs::write(&xml_path, xml).unwrap();
        let t0 = Instant::now();
        assert!(virsh(&["create", xml_path.to_str().unwrap()]));
        base_run.push(t0.elapsed());
        base_beat.push(wait_heartbeat(&bdir, t0));
        virsh(&["destroy", &bname]);
    }

    for v in [
        &mut ours_run,
        &mut ours_beat,
        &mut base_run,
        &mut base_beat,
        &mut ours_create,
    ] {
        v.sort();
    }
    println!(
        "gleaner create (seed + define) p50 {}, the rest is start",
        ms(percentile(&ours_create, 0.5))
    );
    println!("\n{n} samples each, interleaved\n");
    println!("| metric | gleaner | baseline (`virsh create`) | ratio |");
    println!("| --- | --- | --- | --- |");
    for (what, ours, base) in [
        ("start to running (p50)", &ours_run, &base_run),
        ("start to first heartbeat (p50)", &ours_beat, &base_beat),
    ] {
        let (o, b) = (percentile(ours, 0.5), percentile(base, 0.5));
        println!(
            "| {what} | {} | {} | {:.2}× |",
            ms(o),
            ms(b),
            o.as_secs_f64() / b.as_secs_f64()
        );
    }
    for (what, ours, base) in [
        ("start to running (max)", &ours_run, &base_run),
        ("start to first heartbeat (max)", &ours_beat, &base_beat),
    ] {
        let (o, b) = (percentile(ours, 1.0), percentile(base, 1.0));
        println!(
            "| {what} | {} | {} | {:.2}× |",
            ms(o),
            ms(b),
            o.as_secs_f64() / b.as_secs_f64()
        );
    }
}
