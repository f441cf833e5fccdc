//! Owner input from Linux input devices (`/dev/input/event*`, evdev): event-driven presence for
//! headless, console and Wayland machines, where no X server can be asked. Only whether input
//! happened is kept; key codes are never stored or logged.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::owner::IdleSource;

/// Size of the kernel's `struct input_event` on this platform (24 bytes on 64-bit Linux: a
/// `timeval`, then type u16, code u16, value i32).
pub const EVENT_SIZE: usize = std::mem::size_of::<libc::input_event>();

/// Key and button presses (and repeats), from keyboards, mice, touchpads and touchscreens.
pub const EV_KEY: u16 = 0x01;
/// Relative motion: mice and wheels.
pub const EV_REL: u16 = 0x02;

/// One event's type, code and value from `EVENT_SIZE` bytes in the host's byte order. They are the
/// last 8 bytes, so the time stamp's width (32- or 64-bit `time_t`) does not matter.
pub fn parse_event(bytes: &[u8]) -> Option<(u16, u16, i32)> {
    let tail = bytes.get(EVENT_SIZE.checked_sub(8)?..EVENT_SIZE)?;
    let ty = u16::from_ne_bytes([tail[0], tail[1]]);
    let code = u16::from_ne_bytes([tail[2], tail[3]]);
    let value = i32::from_ne_bytes([tail[4], tail[5], tail[6], tail[7]]);
    Some((ty, code, value))
}

/// Whether an event is a person's doing. Key presses and relative motion are; absolute axes are
/// not on their own (accelerometers and some sensors report them all the time; a touchpad or
/// touchscreen also sends a BTN_TOUCH key when touched), nor are switches (lid, headphone jack),
/// LEDs, sync and misc events.
pub fn is_owner_input(ty: u16, value: i32) -> bool {
    match ty {
        EV_KEY => value != 0,
        EV_REL => value != 0,
        _ => false,
    }
}

/// Whether any whole event in `buf` is owner input.
pub fn any_owner_input(buf: &[u8]) -> bool {
    buf.chunks_exact(EVENT_SIZE)
        .filter_map(parse_event)
        .any(|(ty, _, value)| is_owner_input(ty, value))
}

/// The event bytes of one event, for tests and fakes that feed devices.
pub fn encode_event(ty: u16, code: u16, value: i32) -> Vec<u8> {
    let mut e = vec![0u8; EVENT_SIZE];
    let at = EVENT_SIZE - 8;
    e[at..at + 2].copy_from_slice(&ty.to_ne_bytes());
    e[at + 2..at + 4].copy_from_slice(&code.to_ne_bytes());
    e[at + 4..].copy_from_slice(&value.to_ne_bytes());
    e
}

/// Owner input from the event devices in a folder (normally `/dev/input`). Each device is read by a
/// task waiting on the kernel (no polling); the first input after a quiet second nudges the
/// enforcer so workloads freeze at once. Devices that go away end their task; the others go on.
pub struct EvdevIdle {
    /// Milliseconds after `epoch` of the last owner input.
    last_ms: Arc<AtomicU64>,
    epoch: Instant,
    devices: Vec<String>,
}

impl EvdevIdle {
    /// Opens every readable `event*` device under `dir` and starts watching them until `cancel`.
    /// Fails, saying why for each, when none can be read (no devices, or no permission: the
    /// devices are normally root:input 0660). Must run inside a tokio runtime.
    pub fn watch(
        dir: &Path,
        nudge: Option<mpsc::Sender<()>>,
        cancel: CancellationToken,
    ) -> Result<EvdevIdle, String> {
        let rd = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut paths: Vec<PathBuf> = rd
            .flatten()
            .filter(|e| {
                e.file_name().to_str().is_some_and(|n| {
                    n.strip_prefix("event")
                        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                })
            })
            .map(|e| e.path())
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(format!("no event devices in {}", dir.display()));
        }
        let epoch = Instant::now();
        // Until the first input the owner counts as just arrived, as for the interrupt source:
        // work waits a full idle period after the daemon starts.
        let last_ms = Arc::new(AtomicU64::new(0));
        let mut devices = Vec::new();
        let mut refused = Vec::new();
        for p in paths {
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("?")
                .to_owned();
            match open_device(&p) {
                Ok(fd) => {
                    devices.push(name);
                    tokio::spawn(read_device(
                        fd,
                        p,
                        last_ms.clone(),
                        epoch,
                        nudge.clone(),
                        cancel.clone(),
                    ));
                }
                Err(e) => refused.push(format!("{name}: {e}")),
            }
        }
        if devices.is_empty() {
            return Err(format!(
                "no readable event device in {} ({})",
                dir.display(),
                refused.join(", ")
            ));
        }
        if !refused.is_empty() {
            tracing::debug!("input devices not watched: {}", refused.join(", "));
        }
        Ok(EvdevIdle {
            last_ms,
            epoch,
            devices,
        })
    }

    /// The devices watched, by file name (e.g. `event3`).
    pub fn devices(&self) -> &[String] {
        &self.devices
    }
}

fn open_device(p: &Path) -> Result<AsyncFd<std::fs::File>, String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(p)
        .map_err(|e| e.to_string())?;
    // Regular files cannot be waited on (epoll refuses them): only devices and pipes pass.
    // SAFETY: the `File` owns its open descriptor and moves into the `AsyncFd`, which only lends
    // it out by reference: it stays open and the same until the `AsyncFd` is dropped.
    unsafe { AsyncFd::register_with_interest(f, tokio::io::Interest::READABLE) }
        .map_err(|e| format!("cannot wait on it ({})", e.into_parts().1))
}

/// Reads one device until it goes away or `cancel`, recording owner input.
async fn read_device(
    fd: AsyncFd<std::fs::File>,
    path: PathBuf,
    last_ms: Arc<AtomicU64>,
    epoch: Instant,
    nudge: Option<mpsc::Sender<()>>,
    cancel: CancellationToken,
) {
    // The kernel hands out whole events; a pipe standing in for a device may not, so a partial
    // event is kept for the next read.
    let mut buf = vec![0u8; EVENT_SIZE * 64];
    let mut have = 0usize;
    let mut quiet_since: Option<Instant> = None;
    loop {
        let mut guard = tokio::select! {
            _ = cancel.cancelled() => return,
            g = fd.readable() => match g {
                Ok(g) => g,
                Err(e) => {
                    tracing::warn!("input device {}: {e}; no longer watched", path.display());
                    return;
                }
            },
        };
        let n = match guard.try_io(|f| f.get_ref().read(&mut buf[have..])) {
            Err(_would_block) => continue,
            Ok(Ok(0)) => {
                tracing::info!("input device {} closed; no longer watched", path.display());
                return;
            }
            Ok(Ok(n)) => n,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(Err(e)) => {
                // ENODEV: unplugged.
                tracing::info!("input device {}: {e}; no longer watched", path.display());
                return;
            }
        };
        have += n;
        let whole = have - have % EVENT_SIZE;
        let input = any_owner_input(&buf[..whole]);
        buf.copy_within(whole..have, 0);
        have -= whole;
        if !input {
            continue;
        }
        let now = Instant::now();
        last_ms.fetch_max(
            now.duration_since(epoch).as_millis() as u64,
            Ordering::Relaxed,
        );
        // Only the first input after a quiet second matters: the owner arriving. A full channel
        // already holds a nudge, which is just as good.
        if quiet_since.is_none_or(|l| now.duration_since(l) >= Duration::from_secs(1))
            && let Some(n) = &nudge
            && let Err(mpsc::error::TrySendError::Closed(())) = n.try_send(())
        {
            return;
        }
        quiet_since = Some(now);
    }
}

impl IdleSource for EvdevIdle {
    fn name(&self) -> &'static str {
        "evdev"
    }

    fn idle_s(&mut self) -> Option<u64> {
        let last = self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        Some(Instant::now().saturating_duration_since(last).as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_layout_matches_the_kernel() {
        // 64-bit time_t: two 8-byte fields of timeval, then 8 bytes of type, code, value.
        #[cfg(target_pointer_width = "64")]
        assert_eq!(EVENT_SIZE, 24);
        // SAFETY: input_event is plain old data; all zeroes is a valid value.
        let mut raw: libc::input_event = unsafe { std::mem::zeroed() };
        raw.type_ = EV_KEY;
        raw.code = 30; // KEY_A
        raw.value = 1;
        raw.time.tv_sec = 1_700_000_000;
        // SAFETY: input_event is plain old data of EVENT_SIZE bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw as *const libc::input_event).cast::<u8>(), EVENT_SIZE)
        };
        assert_eq!(parse_event(bytes), Some((EV_KEY, 30, 1)));
        assert_eq!(
            encode_event(EV_KEY, 30, 1)[EVENT_SIZE - 8..],
            bytes[EVENT_SIZE - 8..]
        );
    }

    #[test]
    fn only_presses_and_motion_count() {
        let cases = [
            (EV_KEY, 1, true),     // press
            (EV_KEY, 2, true),     // auto-repeat
            (EV_KEY, 0, false),    // release (the press counted)
            (EV_REL, -3, true),    // mouse motion
            (EV_REL, 0, false),    // no motion
            (0x00, 0, false),      // EV_SYN
            (0x03, 512, false),    // EV_ABS: an accelerometer's steady stream
            (0x04, 458756, false), // EV_MSC scan code
            (0x05, 1, false),      // EV_SW: the lid closing
            (0x11, 1, false),      // EV_LED
        ];
        for (ty, value, want) in cases {
            assert_eq!(
                is_owner_input(ty, value),
                want,
                "type {ty:#x} value {value}"
            );
        }
    }

    #[test]
    fn a_buffer_counts_only_whole_events() {
        let mut b = encode_event(0x04, 4, 30);
        b.extend(encode_event(0x00, 0, 0));
        assert!(!any_owner_input(&b));
        let press = encode_event(EV_KEY, 30, 1);
        b.extend(&press[..EVENT_SIZE - 1]);
        assert!(!any_owner_input(&b), "a partial event is not read");
        b.push(press[EVENT_SIZE - 1]);
        assert!(any_owner_input(&b));
        assert_eq!(parse_event(&press[..10]), None);
    }
}
