//! Owner input from Linux input devices (`/dev/input/event*`, evdev): event-driven presence for
//! headless, console and Wayland machines, where no X server can be asked. Only whether input
//! happened is kept; key codes are never stored or logged.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
/// enforcer so workloads freeze at once. The folder itself is watched (inotify): a device plugged in
/// later is read from then on, one unplugged is dropped; the others go on.
pub struct EvdevIdle {
    /// Milliseconds after `epoch` of the last owner input.
    last_ms: Arc<AtomicU64>,
    epoch: Instant,
    devices: Devices,
}

/// Most devices watched at once: far more than a machine has, so that a folder filling with event
/// nodes cannot make the source spawn readers without end.
pub const MAX_DEVICES: usize = 256;

/// The start of the evdev source's line in status (the daemon refreshes it as devices come and go).
pub const NOTE_PREFIX: &str = "input devices (evdev)";

/// The devices being read now, shared by the readers, the folder watcher and status.
#[derive(Clone)]
pub struct Devices {
    dir: PathBuf,
    /// File name → (generation, the reader's cancel token): a reader that ends removes its own
    /// entry only, not a newer device's of the same name.
    readers: Arc<Mutex<BTreeMap<String, (u64, CancellationToken)>>>,
}

impl Devices {
    /// The device file names being read now, sorted (e.g. `event3`).
    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// The source's line in status, with the devices read right now.
    pub fn note(&self) -> String {
        let names = self.names();
        format!(
            "{NOTE_PREFIX} in {}: active ({}; devices plugged in later are watched too)",
            self.dir.display(),
            if names.is_empty() {
                "no device now".to_owned()
            } else {
                names.join(", ")
            }
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (u64, CancellationToken)>> {
        // A reader that panicked leaves the map itself whole.
        self.readers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether `name` is an event device's (`event` and digits), not `mouse0`, `by-id` and the like.
fn is_event_name(name: &str) -> bool {
    name.strip_prefix("event")
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// What the readers share.
#[derive(Clone)]
struct Shared {
    last_ms: Arc<AtomicU64>,
    epoch: Instant,
    nudge: Option<mpsc::Sender<()>>,
    devices: Devices,
    generation: Arc<AtomicU64>,
}

impl Shared {
    /// Opens `name` in the folder and starts its reader, unless it is read already.
    fn add(&self, name: &str, cancel: &CancellationToken) -> Result<bool, String> {
        if self.devices.lock().contains_key(name) {
            return Ok(false);
        }
        let path = self.devices.dir.join(name);
        let fd = open_device(&path)?;
        let token = cancel.child_token();
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        {
            let mut readers = self.devices.lock();
            if readers.len() >= MAX_DEVICES {
                return Err(format!("already {MAX_DEVICES} devices watched"));
            }
            readers.insert(name.to_owned(), (generation, token.clone()));
        }
        tokio::spawn(read_device(
            fd,
            path,
            name.to_owned(),
            generation,
            self.clone(),
            token,
        ));
        Ok(true)
    }

    /// Stops reading `name` (unplugged or renamed).
    fn remove(&self, name: &str) {
        if let Some((_, token)) = self.devices.lock().remove(name) {
            token.cancel();
            tracing::info!("input device {name} removed; no longer watched");
        }
    }
}

impl EvdevIdle {
    /// Opens every readable `event*` device under `dir`, starts watching them and the folder for
    /// devices plugged in later, until `cancel`. Fails, saying why for each, when none can be read
    /// at start (no devices, or no permission: the devices are normally root:input 0660). Must run
    /// inside a tokio runtime.
    pub fn watch(
        dir: &Path,
        nudge: Option<mpsc::Sender<()>>,
        cancel: CancellationToken,
    ) -> Result<EvdevIdle, String> {
        let rd = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut names: Vec<String> = rd
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| is_event_name(n))
            .collect();
        names.sort();
        if names.is_empty() {
            return Err(format!("no event devices in {}", dir.display()));
        }
        // The folder is watched before the devices are opened, so that none plugged in meanwhile
        // is missed (one seen twice is opened once).
        let folder = watch_folder(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let shared = Shared {
            // Until the first input the owner counts as just arrived, as for the interrupt
            // source: work waits a full idle period after the daemon starts.
            last_ms: Arc::new(AtomicU64::new(0)),
            epoch: Instant::now(),
            nudge,
            devices: Devices {
                dir: dir.to_owned(),
                readers: Arc::new(Mutex::new(BTreeMap::new())),
            },
            generation: Arc::new(AtomicU64::new(0)),
        };
        let mut refused = Vec::new();
        for name in names {
            if let Err(e) = shared.add(&name, &cancel) {
                refused.push(format!("{name}: {e}"));
            }
        }
        if shared.devices.names().is_empty() {
            return Err(format!(
                "no readable event device in {} ({})",
                dir.display(),
                refused.join(", ")
            ));
        }
        if !refused.is_empty() {
            tracing::debug!("input devices not watched: {}", refused.join(", "));
        }
        tokio::spawn(watch_hotplug(folder, shared.clone(), cancel));
        Ok(EvdevIdle {
            last_ms: shared.last_ms,
            epoch: shared.epoch,
            devices: shared.devices,
        })
    }

    /// The devices watched now, by file name (e.g. `event3`).
    pub fn devices(&self) -> Vec<String> {
        self.devices.names()
    }

    /// A handle on the devices watched, for status as they come and go.
    pub fn devices_handle(&self) -> Devices {
        self.devices.clone()
    }
}

/// An inotify descriptor watching `dir` for entries created, changed (udev sets a new node's
/// group and mode just after creating it), deleted or moved.
fn watch_folder(dir: &Path) -> Result<AsyncFd<std::fs::File>, String> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: plain system call; the result is checked before use.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(format!("inotify: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just opened and is owned by nothing else; the `File` closes it.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| "a NUL in the path".to_owned())?;
    let mask = libc::IN_CREATE
        | libc::IN_ATTRIB
        | libc::IN_DELETE
        | libc::IN_MOVED_FROM
        | libc::IN_MOVED_TO
        | libc::IN_DELETE_SELF
        | libc::IN_MOVE_SELF;
    // SAFETY: `fd` is open (held by `file`) and `c` a NUL-terminated path that outlives the call.
    if unsafe { libc::inotify_add_watch(fd, c.as_ptr(), mask) } < 0 {
        return Err(format!(
            "cannot watch for new devices ({})",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: as in `open_device`: the `File` owns the descriptor and moves into the `AsyncFd`.
    unsafe { AsyncFd::register_with_interest(file, tokio::io::Interest::READABLE) }
        .map_err(|e| format!("cannot wait on inotify ({})", e.into_parts().1))
}

/// The inotify events in `buf`: each one's mask and entry name (empty for the folder itself); a
/// record cut short ends the list.
pub fn parse_inotify(buf: &[u8]) -> Vec<(u32, String)> {
    // struct inotify_event: wd i32, mask u32, cookie u32, len u32, then `len` bytes of name
    // (NUL-padded).
    const HEAD: usize = 16;
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(head) = buf.get(at..at + HEAD) {
        let mask = u32::from_ne_bytes([head[4], head[5], head[6], head[7]]);
        let len = u32::from_ne_bytes([head[12], head[13], head[14], head[15]]) as usize;
        let Some(raw) = buf.get(at + HEAD..at + HEAD + len) else {
            break;
        };
        let name = raw.split(|&b| b == 0).next().unwrap_or_default();
        out.push((mask, String::from_utf8_lossy(name).into_owned()));
        at += HEAD + len;
    }
    out
}

/// Follows the folder until `cancel`: devices that appear (or become readable) are read, those
/// that go away are dropped.
async fn watch_hotplug(folder: AsyncFd<std::fs::File>, shared: Shared, cancel: CancellationToken) {
    let dir = shared.devices.dir.clone();
    // Room for many events at once; the kernel never splits one across reads.
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let mut guard = tokio::select! {
            _ = cancel.cancelled() => return,
            g = folder.readable() => match g {
                Ok(g) => g,
                Err(e) => {
                    tracing::warn!("{}: {e}; devices plugged in later are not watched", dir.display());
                    return;
                }
            },
        };
        let n = match guard.try_io(|f| f.get_ref().read(&mut buf)) {
            Err(_would_block) => continue,
            Ok(Ok(n)) => n,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(Err(e)) => {
                tracing::warn!(
                    "{}: {e}; devices plugged in later are not watched",
                    dir.display()
                );
                return;
            }
        };
        for (mask, name) in parse_inotify(&buf[..n]) {
            if mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF | libc::IN_IGNORED) != 0 {
                tracing::warn!(
                    "{} went away; devices plugged in later are not watched",
                    dir.display()
                );
                return;
            }
            if !is_event_name(&name) {
                continue;
            }
            if mask & (libc::IN_DELETE | libc::IN_MOVED_FROM) != 0 {
                shared.remove(&name);
            } else if mask & (libc::IN_CREATE | libc::IN_ATTRIB | libc::IN_MOVED_TO) != 0 {
                match shared.add(&name, &cancel) {
                    Ok(true) => tracing::info!("input device {name} plugged in; watched"),
                    Ok(false) => {}
                    // udev may not have made it readable yet: its IN_ATTRIB comes next.
                    Err(e) => tracing::debug!("input device {name}: {e}; not watched (yet)"),
                }
            }
        }
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

/// Reads one device until it goes away or `cancel`, recording owner input; then takes it off the
/// list (unless a newer device of the same name has taken its place).
async fn read_device(
    fd: AsyncFd<std::fs::File>,
    path: PathBuf,
    name: String,
    generation: u64,
    shared: Shared,
    cancel: CancellationToken,
) {
    read_events(&fd, &path, &shared, &cancel).await;
    let mut readers = shared.devices.lock();
    if readers.get(&name).is_some_and(|(g, _)| *g == generation) {
        readers.remove(&name);
    }
}

async fn read_events(
    fd: &AsyncFd<std::fs::File>,
    path: &Path,
    shared: &Shared,
    cancel: &CancellationToken,
) {
    let (last_ms, epoch, nudge) = (&shared.last_ms, shared.epoch, &shared.nudge);
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
            && let Some(n) = nudge
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
    fn inotify_records_are_split_by_their_lengths() {
        let record = |mask: u32, name: &str, len: usize| {
            let mut r = Vec::new();
            r.extend(1i32.to_ne_bytes());
            r.extend(mask.to_ne_bytes());
            r.extend(0u32.to_ne_bytes());
            r.extend((len as u32).to_ne_bytes());
            let mut n = name.as_bytes().to_vec();
            n.resize(len, 0);
            r.extend(n);
            r
        };
        let mut buf = record(libc::IN_CREATE, "event4", 16);
        buf.extend(record(libc::IN_DELETE, "mouse0", 16));
        buf.extend(record(libc::IN_DELETE_SELF, "", 0));
        assert_eq!(
            parse_inotify(&buf),
            [
                (libc::IN_CREATE, "event4".to_owned()),
                (libc::IN_DELETE, "mouse0".to_owned()),
                (libc::IN_DELETE_SELF, String::new()),
            ]
        );
        let cut = record(libc::IN_CREATE, "event5", 16);
        assert_eq!(parse_inotify(&cut[..20]), []);
        assert!(is_event_name("event12") && !is_event_name("event") && !is_event_name("by-id"));
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
