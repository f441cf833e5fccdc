//! The owner's side: activity sources (X11 idle time, logind, terminals, interrupts, input devices in
//! `evdev.rs`, battery, other programs' CPU load) combined into the core's `HostState`, and the
//! enforcer that applies the core's decision — freezing every machine at once when the owner
//! returns, thawing or throttling them live when the owner leaves.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use gleaner::policy::{Action, Decision, HostState, OwnerPolicy, decide};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::factory::{Allowance, Registry};
use crate::runtime::{Limits, Runtime};

/// Seconds since the owner's last input, from one source.
pub trait IdleSource: Send + Sync {
    fn name(&self) -> &'static str;
    /// `None` when the source cannot tell right now.
    fn idle_s(&mut self) -> Option<u64>;
}

/// X11 idle time through the MIT-SCREEN-SAVER extension (any X server, including Xvfb).
pub struct X11Idle {
    conn: x11rb::rust_connection::RustConnection,
    root: u32,
}

impl X11Idle {
    /// Connects to `display` (e.g. ":0"); fails when there is no X server or no extension.
    pub fn connect(display: &str) -> Result<X11Idle, String> {
        use x11rb::connection::Connection;
        let (conn, screen) = x11rb::rust_connection::RustConnection::connect(Some(display))
            .map_err(|e| format!("X11 display {display}: {e}"))?;
        let root = conn.setup().roots[screen].root;
        let me = X11Idle { conn, root };
        me.query()
            .ok_or_else(|| format!("X11 display {display} has no screen-saver extension"))?;
        Ok(me)
    }

    fn query(&self) -> Option<u64> {
        use x11rb::protocol::screensaver::ConnectionExt;
        let reply = self
            .conn
            .screensaver_query_info(self.root)
            .ok()?
            .reply()
            .ok()?;
        Some(u64::from(reply.ms_since_user_input) / 1000)
    }
}

impl IdleSource for X11Idle {
    fn name(&self) -> &'static str {
        "x11"
    }

    fn idle_s(&mut self) -> Option<u64> {
        self.query()
    }
}

/// Seconds since the last keystroke on any terminal, like `w`'s IDLE column: the kernel updates a
/// terminal device's access time when it reads input, so the newest access time among `/dev/pts/N`
/// and `/dev/ttyN` is the last time someone typed. For servers and text consoles.
pub struct TerminalIdle {
    dev: PathBuf,
    /// The terminal devices found at the last listing, and when that was: `/dev` holds hundreds
    /// of entries, so it is listed again only every [`TERMINAL_RELIST`], not at every look.
    ttys: (Vec<PathBuf>, Option<std::time::Instant>),
}

/// How often the terminal devices are listed again (a new SSH session's `/dev/pts/N`).
const TERMINAL_RELIST: Duration = Duration::from_secs(10);

impl TerminalIdle {
    /// Watches the terminals under `dev` (normally `/dev`).
    pub fn new(dev: impl Into<PathBuf>) -> TerminalIdle {
        TerminalIdle {
            dev: dev.into(),
            ttys: (Vec::new(), None),
        }
    }

    fn newest_input(&mut self) -> Option<std::time::SystemTime> {
        if self.ttys.1.is_none_or(|at| at.elapsed() >= TERMINAL_RELIST) {
            self.ttys = (self.list(), Some(std::time::Instant::now()));
        }
        self.ttys
            .0
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok()?.accessed().ok())
            .max()
    }

    fn list(&self) -> Vec<PathBuf> {
        let numbered = |dir: &Path, prefix: &str| -> Vec<PathBuf> {
            std::fs::read_dir(dir)
                .map(|rd| {
                    rd.flatten()
                        .filter(|e| {
                            e.file_name().to_str().is_some_and(|n| {
                                n.strip_prefix(prefix).is_some_and(|d| {
                                    !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())
                                })
                            })
                        })
                        .map(|e| e.path())
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut ttys = numbered(&self.dev.join("pts"), "");
        ttys.extend(numbered(&self.dev, "tty"));
        ttys
    }
}

impl IdleSource for TerminalIdle {
    fn name(&self) -> &'static str {
        "terminals"
    }

    fn idle_s(&mut self) -> Option<u64> {
        let t = self.newest_input()?;
        Some(
            std::time::SystemTime::now()
                .duration_since(t)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        )
    }
}

/// Keyboard and mouse activity from `/proc/interrupts`: the counts of the input controllers'
/// interrupt lines (i8042 for PS/2 and laptop keyboards and touchpads). Works on headless and
/// Wayland machines where no X server can be asked; knows nothing of USB input (its interrupts are
/// shared with disks), so it is one source among several.
pub struct InterruptIdle {
    path: PathBuf,
    last: Option<(u64, std::time::Instant)>,
}

impl InterruptIdle {
    /// Watches `path` (normally `/proc/interrupts`); `None` when it has no input-controller line.
    pub fn new(path: impl Into<PathBuf>) -> Option<InterruptIdle> {
        let path = path.into();
        input_interrupts(&path)?;
        Some(InterruptIdle { path, last: None })
    }
}

/// The total of the input controllers' interrupt counts, over all CPUs.
fn input_interrupts(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut total = None;
    for line in text.lines() {
        if !line.contains("i8042") {
            continue;
        }
        let counts = line
            .split_whitespace()
            .skip(1)
            .map_while(|f| f.parse::<u64>().ok())
            .sum::<u64>();
        total = Some(total.unwrap_or(0) + counts);
    }
    total
}

impl IdleSource for InterruptIdle {
    fn name(&self) -> &'static str {
        "interrupts"
    }

    fn idle_s(&mut self) -> Option<u64> {
        let now = std::time::Instant::now();
        let count = input_interrupts(&self.path)?;
        match self.last {
            Some((c, at)) if c == count => Some(now.duration_since(at).as_secs()),
            Some(_) => {
                self.last = Some((count, now));
                Some(0)
            }
            // The first look cannot tell when the last input was; it counts as just now, so work
            // waits a full idle period after the daemon starts.
            None => {
                self.last = Some((count, now));
                Some(0)
            }
        }
    }
}

/// logind's Manager interface: the seat-wide idle hint that desktops (GNOME, KDE) and logind's own
/// terminal tracking set.
#[zbus::proxy(
    interface = "org.freedesktop.login1.Manager",
    default_service = "org.freedesktop.login1",
    default_path = "/org/freedesktop/login1"
)]
trait Login1Manager {
    #[zbus(property)]
    fn idle_hint(&self) -> zbus::Result<bool>;
    /// Microseconds since the epoch (CLOCK_REALTIME) of the last change of the hint.
    #[zbus(property)]
    fn idle_since_hint(&self) -> zbus::Result<u64>;
}

/// The owner's idleness from logind over D-Bus — how a system service (which cannot open the
/// desktop user's X display) learns whether someone is at the machine. Polled once a second by a
/// task; `idle_s` reads the last answer.
pub struct LogindIdle {
    /// Idle seconds + 1, or 0 when the last poll failed.
    latest: Arc<std::sync::atomic::AtomicU64>,
}

impl LogindIdle {
    /// Connects to the system bus (or `address`, e.g. a test's bus) and starts polling until
    /// `cancel`; fails when there is no bus or no logind on it.
    pub async fn connect(
        address: Option<&str>,
        cancel: CancellationToken,
    ) -> Result<LogindIdle, String> {
        let conn = match address {
            Some(a) => zbus::connection::Builder::address(a)
                .build()
                .await
                .map_err(|e| format!("D-Bus at {a}: {e}"))?,
            None => zbus::Connection::system()
                .await
                .map_err(|e| format!("the system D-Bus: {e}"))?,
        };
        let proxy = Login1ManagerProxy::builder(&conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(|e| format!("logind: {e}"))?;
        let first = logind_idle_s(&proxy)
            .await
            .map_err(|e| format!("logind does not answer: {e}"))?;
        let latest = Arc::new(std::sync::atomic::AtomicU64::new(first + 1));
        let l = latest.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                let v = logind_idle_s(&proxy).await.map_or(0, |s| s + 1);
                l.store(v, Ordering::Relaxed);
            }
        });
        Ok(LogindIdle { latest })
    }
}

/// Seconds the seat has been idle by logind's hint (0 while it is not idle).
async fn logind_idle_s(p: &Login1ManagerProxy<'_>) -> zbus::Result<u64> {
    if !p.idle_hint().await? {
        return Ok(0);
    }
    let since_us = p.idle_since_hint().await?;
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    Ok(now_us.saturating_sub(since_us) / 1_000_000)
}

impl IdleSource for LogindIdle {
    fn name(&self) -> &'static str {
        "logind"
    }

    fn idle_s(&mut self) -> Option<u64> {
        self.latest.load(Ordering::Relaxed).checked_sub(1)
    }
}

/// Which of `names` are running now, from the process names under `proc` (normally `/proc`):
/// each process's `comm` (the kernel keeps 15 bytes of it) and the file name of its `argv[0]`.
pub fn running_exclusive(proc: &Path, names: &[String]) -> Vec<String> {
    if names.is_empty() {
        return Vec::new();
    }
    let Ok(rd) = std::fs::read_dir(proc) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for e in rd.flatten() {
        let pid_dir = e.path();
        if !e
            .file_name()
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        let comm = std::fs::read_to_string(pid_dir.join("comm")).unwrap_or_default();
        let comm = comm.trim_end_matches('\n');
        let argv0 = std::fs::read(pid_dir.join("cmdline"))
            .ok()
            .and_then(|c| {
                let first = c.split(|b| *b == 0).next()?.to_vec();
                let first = String::from_utf8(first).ok()?;
                Path::new(&first)
                    .file_name()
                    .and_then(|f| f.to_str())
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        for n in names {
            let short: String = n.chars().take(15).collect();
            let hit =
                (!comm.is_empty() && (comm == n || (n.len() > 15 && comm == short))) || argv0 == *n;
            if hit && !found.contains(n) {
                found.push(n.clone());
            }
        }
    }
    found
}

/// The owner's input as it happens, from XInput2 raw events on the root window (keys, buttons,
/// motion of every device): when input comes after a quiet second, the enforcer is nudged at once
/// rather than at its next look, so workloads freeze within milliseconds of the owner's return.
/// Runs its own thread and X connection; ends when the display goes away or `nudge` is closed.
pub fn watch_x11_input(display: &str, nudge: mpsc::Sender<()>) -> Result<(), String> {
    use x11rb::connection::Connection;
    use x11rb::protocol::Event;
    use x11rb::protocol::xinput::{self, ConnectionExt as _};
    let (conn, screen) = x11rb::rust_connection::RustConnection::connect(Some(display))
        .map_err(|e| format!("X11 display {display}: {e}"))?;
    let root = conn.setup().roots[screen].root;
    let v = conn
        .xinput_xi_query_version(2, 2)
        .map_err(|e| e.to_string())?
        .reply()
        .map_err(|e| format!("no XInput2 on {display}: {e}"))?;
    if v.major_version < 2 {
        return Err(format!(
            "XInput {}.{} on {display}: raw events need 2.0",
            v.major_version, v.minor_version
        ));
    }
    let mask = xinput::XIEventMask::RAW_KEY_PRESS
        | xinput::XIEventMask::RAW_BUTTON_PRESS
        | xinput::XIEventMask::RAW_MOTION;
    conn.xinput_xi_select_events(
        root,
        &[xinput::EventMask {
            deviceid: xinput::Device::ALL_MASTER.into(),
            mask: vec![mask],
        }],
    )
    .map_err(|e| e.to_string())?
    .check()
    .map_err(|e| format!("XInput2 raw events on {display}: {e}"))?;
    std::thread::Builder::new()
        .name("x11-input".into())
        .spawn(move || {
            let mut last: Option<std::time::Instant> = None;
            while let Ok(ev) = conn.wait_for_event() {
                if !matches!(
                    ev,
                    Event::XinputRawKeyPress(_)
                        | Event::XinputRawButtonPress(_)
                        | Event::XinputRawMotion(_)
                ) {
                    continue;
                }
                let now = std::time::Instant::now();
                // Only the first input after a quiet second matters: the owner arriving. A full
                // channel already holds a nudge, which is just as good.
                if last.is_none_or(|l| now.duration_since(l) >= Duration::from_secs(1)) {
                    if let Err(mpsc::error::TrySendError::Closed(())) = nudge.try_send(()) {
                        return;
                    }
                }
                last = Some(now);
            }
        })
        .map_err(|e| format!("cannot start the X11 input thread: {e}"))?;
    Ok(())
}

/// Whether the host runs on battery, from a sysfs power-supply tree (injectable for tests).
pub fn on_battery(power_supply: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(power_supply) else {
        return false;
    };
    let mut mains_online = None;
    let mut discharging = false;
    for e in entries.flatten() {
        let p = e.path();
        let kind = std::fs::read_to_string(p.join("type")).unwrap_or_default();
        match kind.trim() {
            "Mains" => {
                let online = std::fs::read_to_string(p.join("online")).unwrap_or_default();
                mains_online = Some(mains_online.unwrap_or(false) || online.trim() == "1");
            }
            "Battery" => {
                let status = std::fs::read_to_string(p.join("status")).unwrap_or_default();
                discharging |= status.trim() == "Discharging";
            }
            _ => {}
        }
    }
    mains_online == Some(false) || (mains_online.is_none() && discharging)
}

/// Busy CPU time of the whole host, in jiffies, from /proc/stat.
fn host_busy_jiffies() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = cpu
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
    Some(
        v.iter()
            .take(8)
            .enumerate()
            .filter(|(i, _)| *i != 3 && *i != 4)
            .map(|(_, x)| x)
            .sum(),
    )
}

/// The owner-activity sources by name (`idle_sources` in the settings file).
pub const IDLE_SOURCES: [&str; 5] = ["x11", "logind", "terminals", "interrupts", "evdev"];

/// Where the enforcer reads the host's state.
pub struct Sources {
    pub idle: Vec<Box<dyn IdleSource>>,
    /// The input devices read now, when the evdev source is active (they come and go).
    pub evdev: Option<crate::evdev::Devices>,
    pub power_supply: PathBuf,
    /// Where processes are listed, for exclusive applications.
    pub proc: PathBuf,
    last_busy: Option<(u64, std::time::Instant, u64)>,
    /// The last load computed over a long enough interval, reused between computations.
    other_load: f64,
    /// The exclusive applications found at the last scan, and when it was (scans are rationed:
    /// listing every process ten times a second would cost the owner more than it saves).
    exclusive: (Vec<String>, Option<std::time::Instant>),
}

/// How often the process list is scanned for exclusive applications.
const EXCLUSIVE_SCAN: Duration = Duration::from_secs(2);

impl Sources {
    /// The sources available here among `enabled` (empty: all of [`IDLE_SOURCES`]): X11 on
    /// `display` if it answers, logind over D-Bus, terminals, input interrupts, the input devices
    /// under `input_dir` (which send `nudge` when the owner arrives); and always battery from sysfs
    /// and load from /proc/stat. Missing sources are skipped and noted, never fatal.
    pub async fn detect(
        display: Option<&str>,
        power_supply: PathBuf,
        input_dir: &Path,
        enabled: &[String],
        nudge: Option<mpsc::Sender<()>>,
        cancel: CancellationToken,
    ) -> (Sources, Vec<String>) {
        let on = |name: &str| enabled.is_empty() || enabled.iter().any(|e| e == name);
        let mut notes = Vec::new();
        let mut idle: Vec<Box<dyn IdleSource>> = Vec::new();
        let mut evdev = None;
        if on("x11") {
            match display {
                Some(d) => match X11Idle::connect(d) {
                    Ok(x) => {
                        notes.push(format!("x11 idle time on {d}: active"));
                        idle.push(Box::new(x));
                    }
                    Err(e) => notes.push(format!("x11: skipped ({e})")),
                },
                None => notes.push("x11: skipped (no display)".into()),
            }
        }
        if on("logind") {
            match LogindIdle::connect(None, cancel.clone()).await {
                Ok(l) => {
                    notes.push("logind idle hint (D-Bus): active".into());
                    idle.push(Box::new(l));
                }
                Err(e) => notes.push(format!("logind: skipped ({e})")),
            }
        }
        if on("terminals") {
            let mut terminals = TerminalIdle::new("/dev");
            if terminals.newest_input().is_some() {
                notes.push("terminal input (/dev/pts, /dev/tty*): active".into());
                idle.push(Box::new(terminals));
            } else {
                notes.push("terminal input: skipped (no terminal devices)".into());
            }
        }
        if on("interrupts") {
            match InterruptIdle::new("/proc/interrupts") {
                Some(i) => {
                    notes.push("keyboard/mouse interrupts (/proc/interrupts i8042): active".into());
                    idle.push(Box::new(i));
                }
                None => notes.push(
                    "keyboard/mouse interrupts: skipped (no i8042 line in /proc/interrupts)".into(),
                ),
            }
        }
        if on("evdev") {
            match crate::evdev::EvdevIdle::watch(input_dir, nudge, cancel) {
                Ok(e) => {
                    notes.push(e.devices_handle().note());
                    evdev = Some(e.devices_handle());
                    idle.push(Box::new(e));
                }
                Err(e) => notes.push(format!("{}: skipped ({e})", crate::evdev::NOTE_PREFIX)),
            }
        }
        notes.push(format!("battery from {}: active", power_supply.display()));
        notes.push("other programs' cpu load from /proc/stat: active".into());
        (
            Sources {
                idle,
                evdev,
                power_supply,
                proc: PathBuf::from("/proc"),
                last_busy: None,
                other_load: 0.0,
                exclusive: (Vec::new(), None),
            },
            notes,
        )
    }

    /// The exclusive applications running, rescanned at most every [`EXCLUSIVE_SCAN`].
    fn exclusive_running(&mut self, names: &[String]) -> &[String] {
        let due = self
            .exclusive
            .1
            .is_none_or(|at| at.elapsed() >= EXCLUSIVE_SCAN);
        if names.is_empty() {
            self.exclusive = (Vec::new(), None);
        } else if due {
            self.exclusive = (
                running_exclusive(&self.proc, names),
                Some(std::time::Instant::now()),
            );
        }
        &self.exclusive.0
    }

    /// Whether the next [`Sources::measure`] computes a new load reading (and so needs Gleaner's
    /// CPU time); otherwise the value it is given is not used.
    pub fn load_due(&self) -> bool {
        self.last_busy
            .is_none_or(|(_, t0, _)| t0.elapsed().as_secs_f64() > 0.2)
    }

    /// Measures the host now; `gleaner_cpu_ns` is what Gleaner's machines have used in all (`None`:
    /// not asked this time, so the load keeps its last reading).
    pub fn measure(
        &mut self,
        gleaner_cpu_ns: Option<u64>,
        paused: bool,
        policy: &OwnerPolicy,
        frozen_for_s: u64,
    ) -> HostState {
        // The freshest source decides, and is named in status ("source: evdev").
        let freshest = self
            .idle
            .iter_mut()
            .filter_map(|s| Some((s.idle_s()?, s.name())))
            .min_by_key(|(idle, _)| *idle);
        let hz = 100.0;
        let now = std::time::Instant::now();
        // /proc/stat counts in jiffies: measure over at least 200 ms and keep the last value in
        // between, or the load would read as zero every other tick and work would flap.
        if let (Some(busy), Some(gleaner_cpu_ns)) = (host_busy_jiffies(), gleaner_cpu_ns) {
            if let Some((b0, t0, g0)) = self.last_busy {
                let dt = now.duration_since(t0).as_secs_f64();
                if dt > 0.2 {
                    let host = (busy.saturating_sub(b0)) as f64 / hz / dt;
                    let ours = gleaner_cpu_ns.saturating_sub(g0) as f64 / 1e9 / dt;
                    self.other_load = (host - ours).max(0.0);
                    self.last_busy = Some((busy, now, gleaner_cpu_ns));
                }
            } else {
                self.last_busy = Some((busy, now, gleaner_cpu_ns));
            }
        }
        let (weekday, minute) = local_week_minute();
        let exclusive_app = !self.exclusive_running(&policy.exclusive_apps).is_empty();
        HostState {
            idle_s: freshest.map(|(idle, _)| idle),
            idle_source: freshest.map(|(_, name)| name),
            on_battery: on_battery(&self.power_supply),
            other_load: self.other_load,
            weekday,
            minute,
            paused,
            exclusive_app,
            frozen_for_s,
            batch: None,
        }
    }
}

/// Weekday (0 = Monday) and minute of the day in the host's time zone (TZ, else /etc/localtime;
/// UTC when neither names a zone), so "nights and weekends" are the owner's nights.
fn local_week_minute() -> (u8, u16) {
    let now = jiff::Zoned::now();
    (
        (now.weekday().to_monday_zero_offset()) as u8,
        (now.hour() as u16) * 60 + now.minute() as u16,
    )
}

/// Requests to the enforcer.
pub enum EnforcerCommand {
    /// Re-measure and apply now; reply when done.
    Apply(oneshot::Sender<Decision>),
    /// Replace the policy (a validated reload), apply it, and reply with the new decision.
    SetPolicy(Box<OwnerPolicy>, oneshot::Sender<Decision>),
}

/// Applies the owner policy to the running machines.
pub struct Enforcer<R: Runtime + 'static> {
    pub policy: OwnerPolicy,
    pub sources: Sources,
    pub runtime: Arc<R>,
    pub registry: Registry,
    pub allowance: watch::Sender<Allowance>,
    pub paused: Arc<AtomicBool>,
    pub interval: Duration,
    /// The latest decision, for status.
    pub decision: watch::Sender<Option<Decision>>,
    /// Nudges from event-driven sources (owner input): look now, not at the next tick.
    pub nudge: Option<mpsc::Receiver<()>>,
    /// On a cluster node: what the site's batch system holds here.
    pub batch: Option<Arc<crate::batch::Claims>>,
}

impl<R: Runtime + 'static> Enforcer<R> {
    async fn gleaner_cpu_ns(&self) -> u64 {
        let handles: Vec<_> = self.handles();
        let mut total = 0;
        for h in handles {
            if let Ok(u) = self.runtime.sample(&h).await {
                total += u.cpu_ns;
            }
        }
        total
    }

    fn handles(&self) -> Vec<crate::runtime::MachineHandle> {
        self.registry
            .read()
            .map(|r| r.values().cloned().collect())
            .unwrap_or_default()
    }

    async fn apply(&self, d: &Decision, frozen: bool) {
        let handles = self.handles();
        match d.action {
            Action::Stop => {
                // A graceful stop needs a running machine to hear its SIGTERM / ACPI request; the
                // factory stops them (stop_all below) and accounts for them.
                if frozen {
                    let ops = handles.iter().map(|h| self.runtime.thaw(h));
                    futures_util::future::join_all(ops).await;
                }
            }
            Action::Freeze => {
                // All at once: the owner must not wait for machines one by one.
                let ops = handles.iter().map(|h| self.runtime.freeze(h));
                for (h, r) in handles
                    .iter()
                    .zip(futures_util::future::join_all(ops).await)
                {
                    if let Err(e) = r {
                        tracing::warn!("freeze {}: {e}", h.name);
                    }
                }
            }
            Action::Run(l) => {
                if frozen {
                    let ops = handles.iter().map(|h| self.runtime.thaw(h));
                    futures_util::future::join_all(ops).await;
                }
                let n = handles.len().max(1) as f64;
                let per = (l.cores / n).max(0.01);
                let ops = handles.iter().map(|h| {
                    self.runtime.set_limits(
                        h,
                        Limits {
                            cpus: per,
                            memory_bytes: (l.memory_bytes as f64 / n) as u64,
                        },
                    )
                });
                for r in futures_util::future::join_all(ops).await {
                    if let Err(e) = r {
                        tracing::debug!("set limits: {e}");
                    }
                }
                // After the thaw and the new limits, off the path of any freeze: guests go to
                // the background while throttled for the owner, back to normal weight when
                // the owner leaves (a freeze from the background un-idles them itself).
                if let Err(e) = self.runtime.set_background(d.guests_in_background()).await {
                    tracing::debug!("guests' cpu class: {e}");
                }
            }
        }
        let mut a = self.allowance.borrow().clone();
        if let Action::Run(l) = d.action {
            a.cores = l.cores.floor().max(if l.cores > 0.0 { 1.0 } else { 0.0 }) as u16;
            a.memory_bytes = l.memory_bytes;
        }
        a.may_start = d.may_start;
        a.stop_all = d.action == Action::Stop;
        a.frozen = d.action == Action::Freeze;
        a.max_machines = self.policy.max_machines;
        a.reason = format!("{} (source: {})", d.reason.text(), d.source);
        a.source = d.source.to_owned();
        let _ = self.allowance.send(a);
        let _ = self.decision.send(Some(d.clone()));
    }

    /// Runs until `cancel`: measures every `interval`, applies each change of decision at once, and
    /// freezes machines that appear while frozen.
    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<EnforcerCommand>,
        cancel: CancellationToken,
    ) {
        let mut last: Option<Decision> = None;
        let mut known = 0usize;
        // Since when the work has been frozen without a break (for the policy's graceful stop).
        let mut frozen_since: Option<std::time::Instant> = None;
        // With nothing running there is nothing to freeze in a hurry: look ten times less often,
        // so an idle daemon costs the owner next to nothing.
        let idle_interval = (self.interval * 10).max(Duration::from_secs(1));
        loop {
            let reply = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(if known == 0 && self.handles().is_empty() {
                    idle_interval
                } else {
                    self.interval
                }) => None,
                Some(()) = async {
                    match self.nudge.as_mut() {
                        Some(n) => n.recv().await,
                        None => std::future::pending().await,
                    }
                } => None,
                Some(cmd) = commands.recv() => match cmd {
                    EnforcerCommand::Apply(r) => Some(r),
                    EnforcerCommand::SetPolicy(p, r) => {
                        tracing::info!("owner policy reloaded");
                        self.policy = *p;
                        Some(r)
                    }
                },
            };
            // Our machines' CPU time only matters when the load is due for a new reading; skipping
            // it otherwise keeps engine calls out of the path from the owner's input to the freeze.
            let cpu = if self.sources.load_due() {
                Some(self.gleaner_cpu_ns().await)
            } else {
                None
            };
            let frozen_for_s = frozen_since.map_or(0, |t| t.elapsed().as_secs());
            let mut state = self.sources.measure(
                cpu,
                self.paused.load(Ordering::SeqCst),
                &self.policy,
                frozen_for_s,
            );
            state.batch = self.batch.as_ref().and_then(|b| b.claim());
            let d = decide(&self.policy, &state);
            frozen_since = match d.action {
                Action::Run(_) => None,
                Action::Freeze | Action::Stop => {
                    frozen_since.or_else(|| Some(std::time::Instant::now()))
                }
            };
            let count = self.handles().len();
            let changed = last.as_ref() != Some(&d);
            // New machines since the last look get the current treatment too.
            if changed || count != known || reply.is_some() {
                let was_frozen = last
                    .as_ref()
                    .is_none_or(|l| !matches!(l.action, Action::Run(_)))
                    || reply.is_some();
                if changed {
                    tracing::info!("owner policy: {} (source: {})", d.reason.text(), d.source);
                }
                self.apply(&d, was_frozen).await;
                known = count;
                last = Some(d.clone());
            }
            if let Some(r) = reply {
                let _ = r.send(d);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supply(root: &Path, name: &str, kind: &str, file: &str, value: &str) {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("type"), format!("{kind}\n")).unwrap();
        std::fs::write(d.join(file), format!("{value}\n")).unwrap();
    }

    #[test]
    fn battery_from_a_fake_sysfs_tree() {
        let t = tempfile::tempdir().unwrap();
        assert!(!on_battery(t.path()), "no supplies: a desktop on mains");
        supply(t.path(), "BAT0", "Battery", "status", "Discharging");
        assert!(on_battery(t.path()));
        supply(t.path(), "AC", "Mains", "online", "1");
        assert!(!on_battery(t.path()), "mains online wins");
        supply(t.path(), "AC", "Mains", "online", "0");
        assert!(on_battery(t.path()));
        assert!(!on_battery(Path::new("/nonexistent")));
    }

    /// Sets a file's access time to `secs_ago` seconds before now.
    fn accessed(path: &Path, secs_ago: u64) {
        let f = std::fs::File::options()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap();
        let at = std::time::SystemTime::now() - Duration::from_secs(secs_ago);
        f.set_times(std::fs::FileTimes::new().set_accessed(at))
            .unwrap();
    }

    #[test]
    fn terminals_idle_since_the_newest_keystroke_on_a_numbered_terminal() {
        let dev = tempfile::tempdir().unwrap();
        assert_eq!(TerminalIdle::new(dev.path()).idle_s(), None, "no terminals");
        std::fs::create_dir(dev.path().join("pts")).unwrap();
        accessed(&dev.path().join("pts/0"), 1000);
        accessed(&dev.path().join("pts/3"), 100);
        accessed(&dev.path().join("tty2"), 500);
        // Not terminals someone types on: newer, and ignored.
        accessed(&dev.path().join("pts/ptmx"), 1);
        accessed(&dev.path().join("ttyS0"), 2);
        accessed(&dev.path().join("tty"), 3);
        accessed(&dev.path().join("null"), 4);
        let mut t = TerminalIdle::new(dev.path());
        let idle = t.idle_s().unwrap();
        assert!((100..=102).contains(&idle), "{idle}");
        // A keystroke on a console seen at the last listing counts at the next look.
        accessed(&dev.path().join("tty2"), 10);
        let idle = t.idle_s().unwrap();
        assert!((10..=12).contains(&idle), "{idle}");
    }

    #[test]
    fn interrupts_count_only_the_input_controllers_and_idle_grows_while_they_are_still() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("interrupts");
        let table = |kbd: u64, mouse: u64, disk: u64| {
            format!(
                "           CPU0       CPU1\n  1:  {kbd}  0   IO-APIC   1-edge      i8042\n \
                 12:  0  {mouse}   IO-APIC  12-edge      i8042\n 14:  {disk}  0   IO-APIC  \
                 14-edge      ata_piix\n"
            )
        };
        std::fs::write(
            &path,
            "           CPU0\n 14:  9   IO-APIC  14-edge  ata_piix\n",
        )
        .unwrap();
        assert!(InterruptIdle::new(&path).is_none(), "no input controller");
        std::fs::write(&path, table(10, 20, 5)).unwrap();
        assert_eq!(input_interrupts(&path), Some(30));
        let mut s = InterruptIdle::new(&path).unwrap();
        assert_eq!(
            s.idle_s(),
            Some(0),
            "the first look counts as input just now"
        );
        // Disk interrupts are not the owner.
        std::fs::write(&path, table(10, 20, 500)).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(s.idle_s(), Some(1));
        std::fs::write(&path, table(11, 20, 500)).unwrap();
        assert_eq!(s.idle_s(), Some(0), "a key press");
    }

    #[test]
    fn week_minute_is_in_range() {
        let (d, m) = local_week_minute();
        assert!(d < 7 && m < 1440);
    }
}
