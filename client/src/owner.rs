//! The owner's side: activity sources (X11 idle time, battery, other programs' CPU load) combined into
//! the core's `HostState`, and the enforcer that applies the core's decision — freezing every
//! machine at once when the owner returns, thawing or throttling them live when the owner leaves.

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

/// Where the enforcer reads the host's state.
pub struct Sources {
    pub idle: Vec<Box<dyn IdleSource>>,
    pub power_supply: PathBuf,
    last_busy: Option<(u64, std::time::Instant, u64)>,
    /// The last load computed over a long enough interval, reused between computations.
    other_load: f64,
}

impl Sources {
    /// The sources available here: X11 on `display` if it answers, battery from sysfs.
    pub fn detect(display: Option<&str>, power_supply: PathBuf) -> (Sources, Vec<String>) {
        let mut notes = Vec::new();
        let mut idle: Vec<Box<dyn IdleSource>> = Vec::new();
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
        notes.push(format!("battery from {}: active", power_supply.display()));
        notes.push("other programs' cpu load from /proc/stat: active".into());
        (
            Sources {
                idle,
                power_supply,
                last_busy: None,
                other_load: 0.0,
            },
            notes,
        )
    }

    /// Measures the host now; `gleaner_cpu_ns` is what Gleaner's machines have used in all.
    pub fn measure(&mut self, gleaner_cpu_ns: u64, paused: bool) -> HostState {
        let idle_s = self.idle.iter_mut().filter_map(|s| s.idle_s()).min();
        let hz = 100.0;
        let now = std::time::Instant::now();
        // /proc/stat counts in jiffies: measure over at least 200 ms and keep the last value in
        // between, or the load would read as zero every other tick and work would flap.
        if let Some(busy) = host_busy_jiffies() {
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
        HostState {
            idle_s,
            on_battery: on_battery(&self.power_supply),
            other_load: self.other_load,
            weekday,
            minute,
            paused,
        }
    }
}

/// Weekday (0 = Monday) and minute of the day, in UTC (the host's zone is not read: documented).
fn local_week_minute() -> (u8, u16) {
    let secs = crate::factory::now_ms() / 1000;
    let days = secs / 86_400;
    // 1970-01-01 was a Thursday (weekday 3).
    (((days + 3) % 7) as u8, ((secs % 86_400) / 60) as u16)
}

/// Requests to the enforcer.
pub enum EnforcerCommand {
    /// Re-measure and apply now; reply when done.
    Apply(oneshot::Sender<Decision>),
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
            }
        }
        let mut a = self.allowance.borrow().clone();
        if let Action::Run(l) = d.action {
            a.cores = l.cores.floor().max(if l.cores > 0.0 { 1.0 } else { 0.0 }) as u16;
            a.memory_bytes = l.memory_bytes;
        }
        a.may_start = d.may_start;
        a.max_machines = self.policy.max_machines;
        a.reason = format!("{} (source: {})", d.reason.text(), d.source);
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
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let reply = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => None,
                Some(EnforcerCommand::Apply(r)) = commands.recv() => Some(r),
            };
            let cpu = self.gleaner_cpu_ns().await;
            let state = self
                .sources
                .measure(cpu, self.paused.load(Ordering::SeqCst));
            let d = decide(&self.policy, &state);
            let count = self.handles().len();
            let changed = last.as_ref() != Some(&d);
            // New machines since the last look get the current treatment too.
            if changed || count != known || reply.is_some() {
                let was_frozen =
                    last.as_ref().is_none_or(|l| l.action == Action::Freeze) || reply.is_some();
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

    #[test]
    fn week_minute_is_in_range() {
        let (d, m) = local_week_minute();
        assert!(d < 7 && m < 1440);
    }
}
