//! The GUI against a real daemon on the real Docker Engine, in a real X server (Xvfb, rendered by
//! Mesa's software OpenGL): every view renders with the daemon's data (PNGs kept under
//! `target/gui-screenshots`, printed at the start and after each shot), a click on "Pause for 1
//! hour", a snooze or one machine type's pause freezes the container, a preset and detailed limits
//! are applied live while invalid ones are refused in the form, a project is trusted by key and by
//! a signed file (details shown first), and a missing daemon or a user without permission gets a
//! screen that says how to fix it.
//!
//! winit wants the main thread, so this test has its own `main` (harness = false). The same binary
//! is also the daemon: run with GLEANER_GUI_TEST_DAEMON=1 it is `gleaner` itself.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::sync::mpsc::{Sender, channel};
use std::time::{Duration, Instant};

use gleaner::{Backend, Blob, Digest, Envelope, MachineType, SecretKey, UsageRecord};
use gleaner_client::control::{ControlClient, Request};
use gleaner_gui::app::{Drive, save_png};
use gleaner_gui::limits::Field;
use gleaner_gui::model::{Ask, Model, View};
use gleaner_gui::view::Hits;

fn main() -> ExitCode {
    if std::env::var_os("GLEANER_GUI_TEST_DAEMON").is_some() {
        return gleaner_client::cli::main();
    }
    // `cargo test -- --list`, filters and --ignored as libtest would treat this one test.
    const NAME: &str = "gui_against_a_real_daemon";
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("{NAME}: test");
        return ExitCode::SUCCESS;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if args.iter().any(|a| a == "--ignored")
        || (!filters.is_empty() && !filters.iter().any(|f| NAME.contains(f.as_str())))
    {
        println!("running 0 tests");
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(()) => {
            println!("test gui_against_a_real_daemon ... ok");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("test gui_against_a_real_daemon ... FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

type R<T> = Result<T, String>;

fn shots() -> PathBuf {
    // <target>/tmp is CARGO_TARGET_TMPDIR; the artefacts go next to it.
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("gui-screenshots")
}

/// Kills (and reaps) a child process when dropped.
struct Reap(Child);
impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes the daemon's containers when dropped, even after a failure.
struct Containers(String);
impl Drop for Containers {
    fn drop(&mut self) {
        for id in containers(&self.0) {
            let _ = Command::new("docker").args(["rm", "-f", &id]).output();
        }
    }
}

fn containers(owner: &str) -> Vec<String> {
    Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=org.gleaner.owner={owner}"),
        ])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The container's state as the engine says it, except that a container frozen through its
/// cgroup by Gleaner's runtime (which the engine still calls running) reads "paused" too.
fn docker_state(id: &str) -> String {
    let o = Command::new("docker")
        .args(["inspect", "-f", "{{.State.Status}} {{.State.Pid}}", id])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let mut w = o.split_whitespace();
    let (status, pid) = (
        w.next().unwrap_or_default(),
        w.next().and_then(|p| p.parse().ok()),
    );
    match pid {
        Some(pid) if status == "running" && pid > 0 => {
            let frozen = gleaner_client::runtime::freezer::CgroupFreezer::of_process(pid)
                .is_ok_and(|(f, _)| f.is_freezing());
            if frozen { "paused" } else { "running" }.to_owned()
        }
        _ => status.to_owned(),
    }
}

/// Starts Xvfb on a display it picks itself (`-displayfd`: free, stale locks taken over) and
/// waits until it says it is ready; returns it and its name.
fn xvfb() -> R<(Reap, String)> {
    let mut child = Command::new("Xvfb")
        .args(["-displayfd", "1", "-screen", "0", "1280x1024x24", "-ac"])
        .args(["-nolisten", "tcp"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("Xvfb: {e} (installers/install-deps.sh installs xvfb)"))?;
    let out = child.stdout.take().ok_or("Xvfb's stdout")?;
    let x = Reap(child);
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line);
        let _ = tx.send(line);
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(n) if n.trim().parse::<u32>().is_ok() => Ok((x, format!(":{}", n.trim()))),
        Ok(_) => Err("Xvfb exited without a display".into()),
        Err(_) => Err("Xvfb did not start within 10 s".into()),
    }
}

fn publisher() -> SecretKey {
    SecretKey::from_seed([0x52; 32])
}

/// The publisher of the file the Projects view trusts (not trusted before).
fn climate_publisher() -> SecretKey {
    SecretKey::from_seed([0x53; 32])
}

/// The publisher the Projects view trusts by key.
fn key_publisher() -> SecretKey {
    SecretKey::from_seed([0x54; 32])
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The daemon's trust listing entry for `key`, if it trusts it.
fn trusted_entry(
    rt: &tokio::runtime::Runtime,
    sock: &Path,
    key: &str,
) -> Option<serde_json::Value> {
    call(rt, sock, Request::Trusted).ok().and_then(|v| {
        v["trusted"]
            .as_array()?
            .iter()
            .find(|t| t["id"] == key)
            .cloned()
    })
}

/// Waits until the daemon reports a whole-host pause ending `secs` (± a minute) from now.
fn paused_for(rt: &tokio::runtime::Runtime, sock: &Path, secs: u64, what: &str) -> R<()> {
    let last = std::cell::RefCell::new(serde_json::Value::Null);
    eventually(20, what, || {
        let v = call(rt, sock, Request::Status).ok()?;
        let until = v["paused_until"].as_u64();
        *last.borrow_mut() = v["paused_until"].clone();
        let now = now_s();
        (v["paused"] == true && until.is_some_and(|u| u + 90 >= now + secs && u <= now + secs + 60))
            .then_some(())
    })
    .map_err(|e| {
        format!(
            "{e} (paused_until {}, expected about now + {secs} s)",
            last.borrow()
        )
    })
}

/// A container machine type on a busybox image built here (no registry).
fn machine_type(dir: &Path, name: &str, script: &str) -> R<MachineType> {
    let bytes = gleaner_client::image_archive::busybox_image(
        Path::new("/bin/busybox"),
        "gleaner/test-busybox:1",
    )
    .map_err(|e| format!("busybox-static (installers/install-deps.sh): {e}"))?;
    let digest = Digest::of(&bytes);
    let path = dir.join(format!("busybox-{digest}.tar"));
    if !path.exists() {
        std::fs::write(&path, &bytes).map_err(|e| e.to_string())?;
    }
    let mut mt = MachineType::example(publisher().public());
    mt.name = name.into();
    mt.backend = Backend::Container;
    mt.image = Some(Blob {
        url: format!("file://{}", path.display()),
        sha256: digest,
    });
    mt.user_data = script.into();
    mt.cores_min = 1;
    mt.cores_max = 1;
    mt.memory_mib = 128;
    mt.disk_mib = 64;
    mt.not_after = 4_000_000_000;
    mt.description = "A test workload: busybox burning a little CPU".into();
    Ok(mt)
}

/// A week of earlier credit in the daemon's own ledger, signed with its host key, so the chart
/// has more than today's bar (today's records come from the running machines).
fn seed_ledger(state: &Path, mt: &MachineType) -> R<()> {
    let key =
        gleaner_client::keys::read_or_create(&state.join("host.key")).map_err(|e| e.to_string())?;
    let ledger = gleaner_client::ledger::Ledger::open(&state.join("ledger.redb"))
        .map_err(|e| e.to_string())?;
    let digest = Envelope::seal(mt, &publisher())
        .open::<MachineType>()
        .map_err(|e| e.to_string())?
        .digest;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for d in 1..=6u64 {
        let end = now - d * 86_400;
        // At most the wall time: the ledger drops records claiming more CPU than wall x cores.
        let cpu_ms = 1_200_000 + (d % 3) * 900_000;
        let r = UsageRecord {
            v: 1,
            record_id: gleaner::Id16([d as u8; 16]),
            host: key.public(),
            machine_id: gleaner::Id16([0x40 + d as u8; 16]),
            publisher: publisher().public(),
            machine_type: digest,
            start: end - 3_600,
            end,
            cpu_ms,
            wall_ms: 3_600_000,
            peak_memory: 64 << 20,
            cores: 1,
            benchmark: 1000,
            outcome: gleaner::OutcomeCode::Success,
        };
        ledger
            .append(r.record_id, &Envelope::seal(&r, &key))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// A blocking call to the daemon's control API.
fn call(rt: &tokio::runtime::Runtime, sock: &Path, req: Request) -> R<serde_json::Value> {
    rt.block_on(async {
        let mut c = ControlClient::connect(sock)
            .await
            .map_err(|e| e.to_string())?;
        c.call(&req).await.map_err(|e| e.to_string())
    })
}

fn eventually<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> R<T> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("timed out after {secs} s waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(150));
    }
}

/// The script's handle on the window.
struct Window(Sender<Drive>);

impl Window {
    fn inspect<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Model, &Hits) -> T + Send + 'static,
    ) -> R<T> {
        let (tx, rx) = channel();
        self.0
            .send(Drive::Inspect(Box::new(move |m, h| {
                let _ = tx.send(f(m, h));
            })))
            .map_err(|_| "the window closed")?;
        rx.recv_timeout(Duration::from_secs(10))
            .map_err(|_| "the window did not answer".into())
    }

    fn until(
        &self,
        secs: u64,
        what: &str,
        f: impl Fn(&Model) -> bool + Send + Sync + Clone + 'static,
    ) -> R<()> {
        eventually(secs, what, || {
            let f = f.clone();
            self.inspect(move |m, _| f(m)).ok().filter(|ok| *ok)
        })
        .map(|_| ())
    }

    fn click(&self, name: &str) -> R<()> {
        self.0
            .send(Drive::Click(name.into()))
            .map_err(|_| "the window closed".into())
    }

    fn type_into(&self, name: &str, text: &str) -> R<()> {
        self.0
            .send(Drive::Type(name.into(), text.into()))
            .map_err(|_| "the window closed".into())
    }

    fn screenshot(&self, name: &str) -> R<()> {
        // Let the last change settle into a drawn frame.
        std::thread::sleep(Duration::from_millis(400));
        let (tx, rx) = channel();
        self.0
            .send(Drive::Screenshot(tx))
            .map_err(|_| "the window closed")?;
        let image = rx
            .recv_timeout(Duration::from_secs(20))
            .map_err(|_| format!("no screenshot for {name}"))?;
        let path = shots().join(format!("{name}.png"));
        save_png(&image, &path).map_err(|e| e.to_string())?;
        // An all-one-colour image would mean nothing was rendered.
        let first = image.pixels[0];
        let distinct = image.pixels.iter().filter(|p| **p != first).count();
        if distinct < image.pixels.len() / 100 {
            return Err(format!("{name}.png is blank"));
        }
        println!("screenshot {}", path.display());
        Ok(())
    }
}

struct Setup {
    sock: PathBuf,
    display: String,
    gmt: PathBuf,
    host: String,
    rt: tokio::runtime::Runtime,
}

fn script(w: &Window, s: &Setup) -> R<()> {
    let rt = &s.rt;
    // Status: the machine runs, with its CPU measured.
    w.until(90, "a running machine with its CPU measured", |m| {
        m.status.as_ref().is_some_and(|s| {
            s.factory
                .machines
                .iter()
                .any(|mc| mc.state == "running" && mc.name == "steady")
        }) && !m.cpu_now.is_empty()
    })?;
    w.screenshot("status")?;
    // What runs, as the status view shows it: the type, its project, memory now and time left,
    // and the owner state in words.
    let key = publisher().public().to_string();
    w.until(
        30,
        "the machine's project, memory now and time left",
        move |m| {
            let now = now_s();
            m.status.as_ref().is_some_and(|s| {
                gleaner_gui::status::headline(s, now).owner == gleaner_gui::status::Owner::Away
                    && gleaner_gui::status::headline(s, now).title.contains("away")
                    && s.factory.machines.iter().any(|mc| {
                        mc.name == "steady"
                            && mc.publisher == key
                            && mc.memory_now_bytes > 0
                            && mc.shutdown_at > now
                    })
            })
        },
    )?;

    // The owner returns (real X pointer motion in this Xvfb): the window says so, and why.
    let display = s.display.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mover = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut x = 100;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                x = if x == 100 { 300 } else { 100 };
                let _ = Command::new("xdotool")
                    .args(["mousemove", &x.to_string(), "200"])
                    .env("DISPLAY", &display)
                    .output();
                std::thread::sleep(Duration::from_millis(150));
            }
        })
    };
    let present = w.until(20, "the window to say the owner is here", |m| {
        m.status.as_ref().is_some_and(|s| {
            gleaner_gui::status::headline(s, 0).owner == gleaner_gui::status::Owner::Present
        })
    });
    let shot = present.and_then(|()| w.screenshot("status-owner-present"));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = mover.join();
    shot?;
    w.until(20, "the owner away again", |m| {
        m.status.as_ref().is_some_and(|s| {
            gleaner_gui::status::headline(s, 0).owner == gleaner_gui::status::Owner::Away
        })
    })?;

    // One click on "Pause for 1 hour" freezes the container, as the engine says.
    let ids = containers(&s.host);
    let id = ids
        .first()
        .ok_or("no container for the running machine")?
        .clone();
    if docker_state(&id) != "running" {
        return Err(format!(
            "container {id} is {} before the pause",
            docker_state(&id)
        ));
    }
    w.click("pause-1h")?;
    let v = eventually(20, "the daemon to report the pause", || {
        call(rt, &s.sock, Request::Status)
            .ok()
            .filter(|v| v["paused"] == true)
    })?;
    let until = v["paused_until"]
        .as_u64()
        .ok_or("a pause for 1 hour has an end")?;
    let now = now_s();
    if !(now + 3_500..=now + 3_660).contains(&until) {
        return Err(format!(
            "paused until {until}, expected about {}",
            now + 3_600
        ));
    }
    eventually(20, "the container frozen by the engine", || {
        (docker_state(&id) == "paused").then_some(())
    })?;
    // ...and as the daemon's API says of the machine.
    eventually(
        20,
        "the API to show the machine paused by the owner",
        || {
            call(rt, &s.sock, Request::Status).ok().and_then(|v| {
                let machines = v["factory"]["machines"].as_array()?;
                (!machines.is_empty() && machines.iter().all(|m| m["state"] == "paused (by you)"))
                    .then_some(())
            })
        },
    )?;
    w.until(10, "the window to show the pause", |m| {
        m.status.as_ref().is_some_and(|s| s.paused)
    })?;
    w.screenshot("status-paused")?;
    // While paused the same place offers "Snooze 1 more hour": the pause ends an hour later.
    w.click("pause-1h")?;
    paused_for(rt, &s.sock, 7_200, "the snooze to add an hour")?;
    if docker_state(&id) != "paused" {
        return Err(format!("container {id} thawed by a snooze"));
    }
    w.click("resume")?;
    eventually(20, "the container thawed", || {
        (docker_state(&id) == "running").then_some(())
    })?;
    w.until(10, "the window to show work again", |m| {
        m.status.as_ref().is_some_and(|s| !s.paused)
    })?;

    // Pausing only its machine type (the toggle beside each type) freezes it too, and is undone.
    w.click("pause-type-0")?;
    eventually(20, "the daemon to report the type paused", || {
        call(rt, &s.sock, Request::Status)
            .ok()
            .filter(|v| v["paused_types"].as_array().is_some_and(|a| a.len() == 1))
    })?;
    eventually(20, "the container frozen by the type's pause", || {
        (docker_state(&id) == "paused").then_some(())
    })?;
    w.until(10, "the window to show the type paused", |m| {
        m.status
            .as_ref()
            .is_some_and(|s| s.factory.offers.iter().any(|o| o.paused))
    })?;
    w.screenshot("status-type-paused")?;
    w.click("pause-type-0")?;
    eventually(20, "the container thawed by the type's resume", || {
        (docker_state(&id) == "running").then_some(())
    })?;
    w.until(10, "the window to show the type running", |m| {
        m.status
            .as_ref()
            .is_some_and(|s| s.factory.offers.iter().all(|o| !o.paused))
    })?;

    // Snooze from the menu (not paused): 15 minutes of frozen work, then resumed by hand.
    w.click("snooze")?;
    w.click("snooze-15")?;
    paused_for(rt, &s.sock, 900, "a 15-minute snooze")?;
    eventually(20, "the container frozen by the snooze", || {
        (docker_state(&id) == "paused").then_some(())
    })?;
    w.until(10, "the window to show the snooze", |m| {
        m.status.as_ref().is_some_and(|s| {
            s.paused
                && gleaner_gui::status::headline(s, now_s())
                    .why
                    .contains("min more")
        })
    })?;
    w.screenshot("status-snoozed")?;
    w.click("resume")?;
    eventually(20, "the container thawed after the snooze", || {
        (docker_state(&id) == "running").then_some(())
    })?;

    // Limits: the form, an invalid value refused inline (nothing sent), a valid one sent.
    w.click("tab-limits")?;
    w.until(20, "the limits form", |m| {
        m.form.is_some() && m.form_check.is_ok()
    })?;
    w.screenshot("limits")?;
    let before = call(rt, &s.sock, Request::Limits { set: None })?;
    w.type_into("limits-memory", "lots")?;
    w.until(10, "the form to refuse the memory", |m| {
        matches!(&m.form_check, Err(e) if e.field == Some(Field::Memory) && e.reason.contains("is not a size"))
    })?;
    w.click("limits-apply")?;
    std::thread::sleep(Duration::from_millis(500));
    let sent = w.inspect(|m, _| m.busy.contains(&Ask::Limits) || m.limits_notice.is_some())?;
    if sent {
        return Err("an invalid form was sent to the daemon".into());
    }
    if call(rt, &s.sock, Request::Limits { set: None })? != before {
        return Err("the daemon's limits changed after an invalid form".into());
    }
    w.screenshot("limits-invalid")?;
    // A preset fills the detailed settings (here: freeze while the owner is present), which are
    // then adjusted by hand: away after 1 s idle, one core, 512 MiB, and (as in the settings file)
    // not frozen by other programs' load on this shared test machine.
    w.click("preset-only-when-idle")?;
    w.until(10, "the preset in the form", |m| {
        m.form.as_ref().is_some_and(|f| {
            f.preset == Some(gleaner::policy::Preset::OnlyWhenIdle) && !f.present_runs
        })
    })?;
    w.type_into("limits-idle_after", "1s")?;
    w.type_into("limits-cores", "1")?;
    w.type_into("limits-memory", "512MiB")?;
    w.type_into("limits-suspend_above_load", "off")?;
    w.until(
        10,
        "the form to accept 1s, 1 core, 512MiB and no load limit",
        |m| {
            m.form_check.is_ok()
                && m.form.as_ref().is_some_and(|f| {
                    f.idle_after == "1s"
                        && f.cores == "1"
                        && f.memory == "512MiB"
                        && f.suspend_above_load == "off"
                })
        },
    )?;
    w.click("limits-apply")?;
    w.until(20, "the daemon's answer to the limits", |m| {
        m.limits_notice.is_some()
    })?;
    let (ok, text) = w.inspect(|m, _| {
        let n = m.limits_notice.clone().unwrap();
        (n.ok, n.text)
    })?;
    if !ok {
        return Err(format!("the daemon refused valid limits: {text}"));
    }
    let after = call(rt, &s.sock, Request::Limits { set: None })?;
    if after["away"]["memory_bytes"] != 512u64 << 20
        || !after["present"].is_null()
        || after["idle_after_s"] != 1
    {
        return Err(format!(
            "the daemon did not apply the preset with 1s and 512MiB: {after}"
        ));
    }
    // Live: the daemon's allowance follows at once, without a restart.
    let last = std::cell::RefCell::new(serde_json::Value::Null);
    eventually(
        20,
        "the daemon's allowance to follow the new limits",
        || {
            let v = call(rt, &s.sock, Request::Status).ok()?;
            let a = v["factory"]["allowance"].clone();
            let ok = a["memory_bytes"].as_u64().is_some_and(|m| m <= 512 << 20) && a["cores"] == 1;
            *last.borrow_mut() = a;
            ok.then_some(())
        },
    )
    .map_err(|e| format!("{e}: {}", last.borrow()))?;
    w.screenshot("limits-applied")?;

    // Projects: the trusted publisher, and a signed file's details before trusting.
    w.click("tab-projects")?;
    let key = publisher().public().to_string();
    w.until(
        10,
        "the trusted project with its share and type",
        move |m| {
            m.projects()
                .iter()
                .any(|r| r.publisher == key && r.share == 1.0 && r.types == ["steady v1"])
        },
    )?;
    w.screenshot("projects")?;
    w.type_into("trust-file", &s.gmt.display().to_string())?;
    w.click("trust-file-open")?;
    w.until(10, "the machine type's details", |m| m.candidate.is_some())?;
    // What the owner reads before trusting: the name, the signer and where it may connect.
    let climate = climate_publisher().public().to_string();
    let details = w.inspect(|m, _| m.candidate.clone().unwrap().details)?;
    let has = |k: &str, v: &str| details.iter().any(|(dk, dv)| dk == k && dv.contains(v));
    if !(has("Name", "climate-ensemble v3")
        && has("Publisher", &climate)
        && details
            .iter()
            .any(|(_, v)| v.contains("queue.climate.example:443")))
    {
        return Err(format!(
            "the details before trusting lack name, signer or egress: {details:?}"
        ));
    }
    if trusted_entry(rt, &s.sock, &climate).is_some() {
        return Err("the publisher was trusted before the owner confirmed".into());
    }
    w.screenshot("projects-candidate")?;
    w.click("trust-file-confirm")?;
    w.until(20, "the daemon's answer to trust", |m| {
        m.projects_notice.is_some()
    })?;
    let notice = w.inspect(|m, _| m.projects_notice.clone().unwrap())?;
    println!("trust: {}", notice.text);
    if !notice.ok {
        return Err(format!(
            "the daemon refused the trust from the GUI: {}",
            notice.text
        ));
    }
    if trusted_entry(rt, &s.sock, &climate).is_none() {
        return Err("the daemon does not list the publisher trusted from the file".into());
    }
    w.screenshot("projects-trust")?;

    // By key: a publisher with no machine type here yet, with a share of 2.
    let by_key = key_publisher().public().to_string();
    w.type_into("share", "2")?;
    w.type_into("trust-key", &by_key)?;
    w.until(10, "the key and share in the form", {
        let k = by_key.clone();
        move |m| m.trust_key == k && m.share == "2"
    })?;
    w.click("trust-key-button")?;
    w.until(20, "the daemon's answer to trust by key", |m| {
        m.projects_notice.is_some() && m.trust_key.is_empty()
    })?;
    let notice = w.inspect(|m, _| m.projects_notice.clone().unwrap())?;
    if !notice.ok {
        return Err(format!("the daemon refused trust by key: {}", notice.text));
    }
    let entry = trusted_entry(rt, &s.sock, &by_key)
        .ok_or("the daemon does not list the publisher trusted by key")?;
    if entry["share"] != 2.0 {
        return Err(format!(
            "trusted by key with share 2, the daemon says {entry}"
        ));
    }
    w.until(10, "the window to list the new publisher and its share", {
        let k = by_key.clone();
        move |m| {
            m.projects()
                .iter()
                .any(|r| r.publisher == k && r.share == 2.0 && r.types.is_empty())
        }
    })?;
    w.screenshot("projects-by-key")?;

    // Credit: per project and per day, from the daemon's ledger.
    w.click("tab-credit")?;
    w.until(20, "credit per day", |m| {
        m.credit
            .as_ref()
            .is_some_and(|c| c.by_day.len() >= 6 && !c.by_project.is_empty())
    })?;
    w.screenshot("credit")?;

    // A user outside the gleaner group gets the permission screen (the real binary, as nobody).
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let out = tmp.path().join("permission.png");
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .map_err(|e| e.to_string())?;
    let o = Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(env!("CARGO_BIN_EXE_gleaner-gui"))
        .arg("--socket")
        .arg(&s.sock)
        .arg("--screenshot")
        .arg(&out)
        .env("HOME", tmp.path())
        .output()
        .map_err(|e| e.to_string())?;
    let said = String::from_utf8_lossy(&o.stdout);
    if !o.status.success() || !said.contains("You may not control the Gleaner daemon") {
        return Err(format!(
            "gleaner-gui as nobody showed {said:?}, not the permission screen: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    std::fs::copy(&out, shots().join("no-permission.png")).map_err(|e| e.to_string())?;
    println!("screenshot {}", shots().join("no-permission.png").display());
    Ok(())
}

fn run() -> R<()> {
    std::fs::create_dir_all(shots()).map_err(|e| e.to_string())?;
    println!("screenshots for review go to {}", shots().display());
    let (_x, display) = xvfb()?;
    // SAFETY: set before any other thread exists; eframe and Mesa read them at window creation.
    unsafe {
        std::env::set_var("DISPLAY", &display);
        std::env::remove_var("WAYLAND_DISPLAY");
        std::env::set_var("LIBGL_ALWAYS_SOFTWARE", "1");
    }

    // No daemon: the binary says so and how to fix it.
    let nodaemon = shots().join("no-daemon.png");
    let o = Command::new(env!("CARGO_BIN_EXE_gleaner-gui"))
        .args([
            "--socket",
            "/nonexistent/gleaner/control.sock",
            "--screenshot",
        ])
        .arg(&nodaemon)
        .output()
        .map_err(|e| e.to_string())?;
    let said = String::from_utf8_lossy(&o.stdout);
    if !o.status.success() || !said.contains("The Gleaner daemon is not running") {
        return Err(format!(
            "gleaner-gui without a daemon showed {said:?}, not the not-running screen: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    println!("screenshot {}", nodaemon.display());

    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    // nobody must reach the socket to be refused by its mode, not by the folder's.
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .map_err(|e| e.to_string())?;
    let state = tmp.path().join("state");
    let types = tmp.path().join("types");
    std::fs::create_dir_all(&types).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&state).map_err(|e| e.to_string())?;
    let steady = machine_type(
        tmp.path(),
        "steady",
        // About a fifth of a core: enough to see, little enough for a shared machine.
        "while true; do touch /joboutputs/heartbeat; i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done; sleep 0.5; done",
    )?;
    let signed = |mt: &MachineType| Envelope::seal(mt, &publisher()).to_bytes();
    std::fs::write(types.join("steady.gmt"), signed(&steady)).map_err(|e| e.to_string())?;
    // A file to trust from the Projects view (outside the daemon's folder).
    // Another publisher's, not trusted yet.
    let mut other = machine_type(tmp.path(), "climate-ensemble", "sleep 1")?;
    other.publisher = climate_publisher().public();
    other.version = 3;
    other.egress = vec!["queue.climate.example:443".into()];
    let gmt = tmp.path().join("climate-ensemble.gmt");
    std::fs::write(
        &gmt,
        Envelope::seal(&other, &climate_publisher()).to_bytes(),
    )
    .map_err(|e| e.to_string())?;
    seed_ledger(&state, &steady)?;
    let config = tmp.path().join("client.toml");
    // The owner policy in the settings file, not on the command line (which would win over the
    // GUI's changes). Away after 1 s of X idle (nobody touches this Xvfb); other programs' load on a
    // shared test machine must not freeze the workload.
    std::fs::write(
        &config,
        "preset = \"always-gently\"\ncores = 1\nmemory = \"1GiB\"\nidle_after = \"1s\"\n\
         suspend_above_load = \"off\"\n",
    )
    .map_err(|e| e.to_string())?;
    let sock = state.join("control.sock");
    let daemon = Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
        .env("GLEANER_GUI_TEST_DAEMON", "1")
        .env("RUST_LOG", "warn")
        .args([
            "daemon",
            "--no-space",
            "--stop-grace",
            "2",
            "--tick-ms",
            "200",
        ])
        .arg("--config")
        .arg(&config)
        .arg("--state-dir")
        .arg(&state)
        .arg("--socket")
        .arg(&sock)
        .arg("--machine-types")
        .arg(&types)
        .args(["--trust", &publisher().public().to_string()])
        .args(["--idle-sources", "x11", "--display", &display])
        .spawn()
        .map_err(|e| e.to_string())?;
    let _daemon = Reap(daemon);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let status = eventually(60, "the daemon's control socket", || {
        call(&rt, &sock, Request::Status).ok()
    })?;
    let host = status["host"]
        .as_str()
        .ok_or("status has the host")?
        .to_owned();
    let _containers = Containers(host.clone());
    let setup = Setup {
        sock: sock.clone(),
        display: display.clone(),
        gmt,
        host,
        rt,
    };

    let (tx, rx) = channel();
    let script = std::thread::spawn(move || {
        let w = Window(tx);
        let r = script(&w, &setup);
        if let Err(e) = &r {
            eprintln!("script failed: {e}");
            let _ = w.screenshot("failure");
        }
        let _ = w.0.send(Drive::Close);
        r
    });
    gleaner_gui::app::run(sock, View::Status, Some(rx)).map_err(|e| format!("eframe: {e}"))?;
    script
        .join()
        .map_err(|_| "the script panicked".to_string())?
}
