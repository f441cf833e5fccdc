//! Long-lived relay links: at most one libp2p stream per peer on [`RELAY_PROTOCOL`], carrying
//! length-prefixed frames, read and written by the task that owns [`Links`].
//!
//! [`Links`] owns the state and the streams. [`Links::send`] writes a frame into its stream at
//! once; what the stream cannot take yet (no credit, its queue to the connection full) waits in
//! the link's backlog. [`Links::next`] reads frames and writes backlogs, polling only the links
//! whose wakers fired: a frame costs no task of its own and no channel on its way in or out.
//! Opening and accepting streams are the only work done in tasks, which report through one
//! bounded channel. Each link carries an id, so a torn-down link's late wake is recognised as
//! stale and ignored, and never touches a newer link to the same peer.
//!
//! Two peers that open to each other at once both end with the link opened by the peer with the
//! smaller [`PeerId`]; each side applies that rule alone and they agree.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use libp2p::futures::StreamExt;
use libp2p::futures::io::{AsyncRead, AsyncWrite};
use libp2p::futures::task::AtomicWaker;
use libp2p::{PeerId, StreamProtocol};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::AbortHandle;

use crate::direct::{self, DirectConfig, LinkStream};

/// The protocol of relay links.
///
/// Version 2: the accepting peer first writes its direct port and the opener answers, before any
/// frame ([`crate::direct`]).
pub const RELAY_PROTOCOL: StreamProtocol = StreamProtocol::new("/gleaner/adverts/2");
/// Largest frame on a link; a bigger length prefix closes the link.
pub const MAX_FRAME: usize = 256 * 1024;
/// Bytes (frames with their prefixes) a link holds that its stream has not taken yet; `send`
/// refuses a frame that would take the backlog past it. Room for a few frames of the largest
/// size: a link whose peer stops reading refuses frames once yamux's window and this are full.
pub const LINK_BACKLOG: usize = 4 * (MAX_FRAME + 4);
/// How long an outbound open may take before it is reported failed.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Reports from the open and accept tasks waiting for [`Links::next`].
const EVENT_QUEUE: usize = 256;
/// Inbound opens on the swarm waiting for their opener's choice at most ([`direct`]); one beyond
/// them is dropped (reset), and its opener tries again later.
const ACCEPTING: usize = 32;
/// How often every link's pending read is polled again unprompted, in case a wake was lost: the
/// longest a link could outlive its stream's end if one were. yamux's graceful close did not wake
/// its streams' readers (libp2p/rust-yamux#216), and this was 1 s; the patched yamux
/// (patches/yamux) wakes them, and the repoll is only a net.
const REPOLL: Duration = Duration::from_secs(30);
/// Bytes a link reads from its stream at a time (more when a frame needs them): a read usually
/// takes all the frames that came since the last.
const READ_CHUNK: usize = 8 * 1024;
/// A link's read buffer or backlog past this size is let go once it is empty, so that one large
/// frame does not keep its memory for the link's life.
const KEEP_BUFFER: usize = 64 * 1024;

/// What happened to the links.
#[derive(Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// A link is up (registered, its reader and writer tasks running). `outbound`: we opened it.
    Up { peer: PeerId, outbound: bool },
    /// One frame read from `peer`'s link (the bytes after the 4-byte big-endian length prefix).
    Frame { peer: PeerId, frame: Vec<u8> },
    /// The link to `peer` is gone (closed by either side, an I/O error, an oversize frame, or
    /// `close`). Emitted once per link that was Up.
    Down { peer: PeerId },
    /// `open(peer)` failed (unsupported protocol, timeout, not connected); no Up/Down follows.
    OpenFailed { peer: PeerId, error: String },
}

/// Frames are shown by length: a 100 KiB frame in a failed assertion helps nobody.
impl fmt::Debug for LinkEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkEvent::Up { peer, outbound } => f
                .debug_struct("Up")
                .field("peer", peer)
                .field("outbound", outbound)
                .finish(),
            LinkEvent::Frame { peer, frame } => f
                .debug_struct("Frame")
                .field("peer", peer)
                .field("len", &frame.len())
                .finish(),
            LinkEvent::Down { peer } => f.debug_struct("Down").field("peer", peer).finish(),
            LinkEvent::OpenFailed { peer, error } => f
                .debug_struct("OpenFailed")
                .field("peer", peer)
                .field("error", error)
                .finish(),
        }
    }
}

/// What the open and accept tasks report to [`Links::next`].
enum Report {
    /// A peer opened a link to us (on the swarm, or `direct`).
    Inbound {
        peer: PeerId,
        stream: LinkStream,
        direct: bool,
    },
    /// An outbound open (attempt `attempt`) finished.
    Opened {
        peer: PeerId,
        attempt: u64,
        result: Result<(LinkStream, bool), String>,
    },
}

/// The links whose wakers fired since they were last polled, and the task to wake.
struct Due {
    links: Mutex<Vec<(PeerId, u64)>>,
    task: AtomicWaker,
    /// Whether a link newly due wakes the task: always, unless frames are deferred
    /// ([`Links::defer_frames`]); then only while the owner waits in [`Links::frames_arrive`].
    wake: AtomicBool,
    /// Whether a report was sent since the channel was last read ([`ReportTx`]).
    reports: AtomicBool,
}

impl Default for Due {
    fn default() -> Self {
        Due {
            links: Mutex::new(Vec::new()),
            task: AtomicWaker::new(),
            wake: AtomicBool::new(true),
            reports: AtomicBool::new(false),
        }
    }
}

/// Where the accepting and opening tasks report to [`Links`]: the channel, and a flag that tells
/// the owner's poll to read it. The poll reads the channel only when the flag is set, not at every
/// wake of the node (each relay frame's, each timer's): an empty channel's read is a cold line of
/// its own, 0.9 % of a node's CPU at 100 nodes (docs/BENCHMARKS.md).
#[derive(Clone)]
struct ReportTx {
    tx: mpsc::Sender<Report>,
    due: Arc<Due>,
}

impl ReportTx {
    /// Sends `report` (waiting for room), then flags it and wakes the owner; false if
    /// [`Links`] is gone.
    async fn send(&self, report: Report) -> bool {
        if self.tx.send(report).await.is_err() {
            return false;
        }
        self.due.reports.store(true, Ordering::Release);
        self.due.task.wake();
        true
    }
}

impl Due {
    /// The list; a poisoned lock still holds a valid one (a push cannot panic half way).
    fn list(&self) -> std::sync::MutexGuard<'_, Vec<(PeerId, u64)>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One link's waker: what the stream registers for its reads and writes. Waking it marks the
/// link due (once until it is polled) and wakes the task that polls [`Links::next`].
struct LinkWake {
    peer: PeerId,
    id: u64,
    queued: AtomicBool,
    due: Arc<Due>,
}

impl LinkWake {
    /// Marks the link due; whether it was not already.
    fn mark(&self) -> bool {
        let fresh = !self.queued.swap(true, Ordering::AcqRel);
        if fresh {
            self.due.list().push((self.peer, self.id));
        }
        fresh
    }
}

impl Wake for LinkWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.mark() && self.due.wake.load(Ordering::Acquire) {
            self.due.task.wake();
        }
    }
}

/// One link that is up.
struct Link {
    id: u64,
    outbound: bool,
    /// On a connection of its own ([`direct`]), not a swarm stream.
    direct: bool,
    io: LinkIo,
    wake: Arc<LinkWake>,
    /// `wake` as a [`Waker`], made once.
    waker: Waker,
}

/// A link's stream with what was read from it and not yet taken as frames, and what was sent to
/// it and not yet taken by it.
struct LinkIo {
    stream: LinkStream,
    /// Read bytes; `inbuf[read_at..read_end]` are not yet taken as frames.
    inbuf: Vec<u8>,
    read_at: usize,
    read_end: usize,
    /// Frames with their prefixes; `out[out_at..]` are not yet taken by the stream.
    out: Vec<u8>,
    out_at: usize,
    /// Whether the stream took bytes since it was last flushed.
    unflushed: bool,
}

impl LinkIo {
    fn new(stream: LinkStream) -> LinkIo {
        LinkIo {
            stream,
            inbuf: Vec::new(),
            read_at: 0,
            read_end: 0,
            out: Vec::new(),
            out_at: 0,
            unflushed: false,
        }
    }

    fn backlog(&self) -> usize {
        self.out.len() - self.out_at
    }

    /// Writes the backlog into the stream, then flushes it; Ready once both are done.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), String>> {
        while self.out_at < self.out.len() {
            match Pin::new(&mut self.stream).poll_write(cx, &self.out[self.out_at..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err("write: the stream took 0 bytes".into()));
                }
                Poll::Ready(Ok(n)) => {
                    self.out_at += n;
                    self.unflushed = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(format!("write: {e}"))),
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.out.capacity() > KEEP_BUFFER {
            self.out = Vec::new();
        } else {
            self.out.clear();
        }
        self.out_at = 0;
        if self.unflushed {
            match Pin::new(&mut self.stream).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.unflushed = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(format!("flush: {e}"))),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// The next frame: the bytes after its 4-byte big-endian length prefix. An error says why
    /// the link ends (closed by the peer, an I/O error, a prefix over [`MAX_FRAME`]).
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Result<Vec<u8>, String>> {
        loop {
            let have = &self.inbuf[self.read_at..self.read_end];
            let need = match have.first_chunk::<4>() {
                Some(prefix) => {
                    let len = u32::from_be_bytes(*prefix) as usize;
                    if len > MAX_FRAME {
                        return Poll::Ready(Err(format!(
                            "peer sent a {len}-byte frame, over the {MAX_FRAME}-byte limit"
                        )));
                    }
                    if let Some(frame) = have.get(4..4 + len) {
                        let frame = frame.to_vec();
                        self.read_at += 4 + len;
                        if self.read_at == self.read_end {
                            self.read_at = 0;
                            self.read_end = 0;
                            if self.inbuf.len() > KEEP_BUFFER {
                                self.inbuf = Vec::new();
                            }
                        }
                        return Poll::Ready(Ok(frame));
                    }
                    4 + len
                }
                None => 4,
            };
            // Room for the rest of this frame, and for a chunk at least.
            if self.read_at > 0 && self.read_at + need > self.inbuf.len() {
                self.inbuf.copy_within(self.read_at..self.read_end, 0);
                self.read_end -= self.read_at;
                self.read_at = 0;
            }
            let room = (self.read_at + need).max(self.read_end + READ_CHUNK);
            if self.inbuf.len() < room {
                self.inbuf.resize(room, 0);
            }
            let read = Pin::new(&mut self.stream).poll_read(cx, &mut self.inbuf[self.read_end..]);
            match read {
                Poll::Ready(Ok(0)) if self.read_end == self.read_at => {
                    return Poll::Ready(Err("closed by the peer".into()));
                }
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(format!(
                        "closed by the peer inside a frame ({} of {need} bytes read)",
                        self.read_end - self.read_at
                    )));
                }
                Poll::Ready(Ok(n)) => self.read_end += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(format!("read: {e}"))),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// An outbound open in flight.
struct Pending {
    attempt: u64,
    task: AbortHandle,
    /// A stream the peer opened meanwhile, held while ours is in flight because ours wins the
    /// tie (we have the smaller id); it is used only if ours fails.
    parked: Option<(LinkStream, bool)>,
}

/// The relay links of one node: at most one per peer, inbound ones capped.
pub struct Links {
    local: PeerId,
    control: libp2p_stream::Control,
    max_inbound: usize,
    reports_tx: ReportTx,
    reports: mpsc::Receiver<Report>,
    links: HashMap<PeerId, Link>,
    pending: HashMap<PeerId, Pending>,
    /// The links whose wakers fired, and the task polling `next`.
    due: Arc<Due>,
    /// The due list as last taken, kept for its allocation.
    taken: Vec<(PeerId, u64)>,
    /// Events decided but not yet returned by `next`.
    ready: VecDeque<LinkEvent>,
    next_id: u64,
    accept: AbortHandle,
    /// Direct links' listener (its port and identity), if this node takes them.
    direct: Option<direct::Listener>,
    /// Where this node is connected to each peer (the address of its first connection): where a
    /// direct link to it is dialled.
    ips: HashMap<PeerId, std::net::IpAddr>,
    /// Ticks every [`REPOLL`] while links are up: every link is polled again.
    repoll: tokio::time::Interval,
    /// Frames wait for [`Links::read_frames`] ([`Links::defer_frames`]).
    deferred: bool,
}

impl Links {
    /// Starts accepting inbound links on [`RELAY_PROTOCOL`] through `control` (from the swarm's
    /// `libp2p_stream::Behaviour`); at most `max_inbound` inbound links are kept, more are closed
    /// at once. `local` is this node's peer id, for the tie-break between crossed opens. With
    /// `direct`, links are taken on connections of their own at its address, and opened that way
    /// to peers that take them ([`crate::direct`]). Spawns tasks, so it must be called inside a
    /// tokio runtime. Fails if the protocol is already accepted through this behaviour (a second
    /// `Links` on one swarm), or `direct`'s address cannot be listened on.
    pub fn new(
        mut control: libp2p_stream::Control,
        local: PeerId,
        max_inbound: usize,
        direct: Option<DirectConfig>,
    ) -> Result<Links, String> {
        let mut incoming = control
            .accept(RELAY_PROTOCOL)
            .map_err(|e| format!("accepting {RELAY_PROTOCOL}: {e}"))?;
        let (tx, reports) = mpsc::channel(EVENT_QUEUE);
        let due = Arc::new(Due::default());
        let reports_tx = ReportTx {
            tx,
            due: due.clone(),
        };
        let direct = match direct {
            Some(cfg) => {
                let tx = reports_tx.clone();
                Some(direct::listen(&cfg, move |peer, stream| {
                    let tx = tx.clone();
                    async move {
                        tx.send(Report::Inbound {
                            peer,
                            stream,
                            direct: true,
                        })
                        .await
                    }
                })?)
            }
            None => None,
        };
        let port = direct.as_ref().map_or(0, |d| d.port);
        let tx = reports_tx.clone();
        // libp2p-stream hands over inbound streams through a one-slot channel and drops those
        // that find it full, so they are taken off it at once; the opener's choice is waited for
        // in a task of each stream's own, and the wait for room in the reports there.
        let accept = tokio::spawn(async move {
            let room = Arc::new(Semaphore::new(ACCEPTING));
            while let Some((peer, stream)) = incoming.next().await {
                let Ok(permit) = room.clone().try_acquire_owned() else {
                    tracing::debug!(%peer, "relay link refused: {ACCEPTING} opens under way");
                    continue;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let stream = direct::accept_stream(stream, port, OPEN_TIMEOUT).await;
                    drop(permit);
                    if let Some(stream) = stream {
                        tx.send(Report::Inbound {
                            peer,
                            stream: Box::new(stream),
                            direct: false,
                        })
                        .await;
                    }
                });
            }
        })
        .abort_handle();
        Ok(Links {
            local,
            control,
            max_inbound,
            reports_tx,
            reports,
            links: HashMap::new(),
            pending: HashMap::new(),
            due,
            taken: Vec::new(),
            deferred: false,
            ready: VecDeque::new(),
            next_id: 0,
            accept,
            direct,
            ips: HashMap::new(),
            repoll: {
                let mut every = tokio::time::interval(REPOLL);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                every
            },
        })
    }

    /// Opens an outbound link to a connected peer in a spawned task ([`OPEN_TIMEOUT`]). No-op if
    /// a link to it exists or an open is already pending. The open ends in `Up`, in `OpenFailed`,
    /// or in nothing when the peer's own link to us came up meanwhile and won (its `Up` was the
    /// news). libp2p-stream dials a peer that is not connected, with the addresses the swarm
    /// knows for it; with none, the open fails at once.
    pub fn open(&mut self, peer: PeerId) {
        if self.links.contains_key(&peer) || self.pending.contains_key(&peer) {
            return;
        }
        let attempt = self.id();
        let mut control = self.control.clone();
        let tx = self.reports_tx.clone();
        let direct = self
            .direct
            .as_ref()
            .zip(self.ips.get(&peer))
            .map(|(d, ip)| (d.keypair.clone(), *ip));
        let task = tokio::spawn(async move {
            let open = async {
                let stream = control
                    .open_stream(peer, RELAY_PROTOCOL)
                    .await
                    .map_err(|e| e.to_string())?;
                let direct = direct.as_ref().map(|(k, ip)| (k, *ip));
                direct::open_stream(stream, peer, direct).await
            };
            let result = match tokio::time::timeout(OPEN_TIMEOUT, open).await {
                Ok(result) => result,
                Err(_) => Err(format!("no link after {OPEN_TIMEOUT:?}")),
            };
            tx.send(Report::Opened {
                peer,
                attempt,
                result,
            })
            .await;
        })
        .abort_handle();
        self.pending.insert(
            peer,
            Pending {
                attempt,
                task,
                parked: None,
            },
        );
    }

    /// The next event; cancel-safe, for use in a `tokio::select!` loop beside the swarm. Frames
    /// are read, and backlogs written, only while this is polled.
    pub async fn next(&mut self) -> LinkEvent {
        loop {
            if let Some(event) = poll_fn(|cx| self.poll_next(cx, false)).await {
                return event;
            }
        }
    }

    /// The next event, or `None` once a link has something to read or write while frames are
    /// deferred ([`Links::defer_frames`]) and `arrive` is set: a deferred owner sets it while it
    /// has no flush coming, and starts one on `None`. Cancel-safe.
    pub async fn next_or_frames(&mut self, arrive: bool) -> Option<LinkEvent> {
        poll_fn(|cx| self.poll_next(cx, arrive)).await
    }

    /// Every change of state happens here or in the synchronous calls, and an event is returned
    /// only once decided, so a poll dropped half way loses nothing.
    fn poll_next(&mut self, cx: &mut Context<'_>, arrive: bool) -> Poll<Option<LinkEvent>> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Poll::Ready(Some(event));
            }
            self.due.task.register(cx.waker());
            // Flagged after the send, and cleared before the read: a report sent after the read
            // flags it again (and wakes this task).
            if self.due.reports.swap(false, Ordering::AcqRel) {
                while let Ok(report) = self.reports.try_recv() {
                    self.handle(report);
                }
                continue;
            }
            if !self.links.is_empty() && self.repoll.poll_tick(cx).is_ready() {
                for link in self.links.values() {
                    link.wake.mark();
                }
            }
            if self.deferred {
                if !arrive {
                    return Poll::Pending;
                }
                // Set before the list is looked at: a link marked after the look sees it and
                // wakes the task.
                self.due.wake.store(true, Ordering::Release);
                if !self.frames_waiting() {
                    return Poll::Pending;
                }
                self.due.wake.store(false, Ordering::Release);
                return Poll::Ready(None);
            }
            std::mem::swap(&mut self.taken, &mut self.due.list());
            if self.taken.is_empty() {
                return Poll::Pending;
            }
            let mut taken = std::mem::take(&mut self.taken);
            for (peer, id) in taken.drain(..) {
                self.poll_link(peer, id);
            }
            self.taken = taken;
        }
    }

    /// Polls a due link: writes its backlog, reads one frame (and marks it due again, as more
    /// may wait). A link that fails is torn down.
    fn poll_link(&mut self, peer: PeerId, id: u64) {
        let Some(link) = self.links.get_mut(&peer).filter(|l| l.id == id) else {
            return;
        };
        // Cleared before the poll, so that a wake during it marks the link due again.
        link.wake.queued.store(false, Ordering::Release);
        let mut cx = Context::from_waker(&link.waker);
        let ended = if let Poll::Ready(Err(reason)) = link.io.poll_write(&mut cx) {
            Some(reason)
        } else {
            match link.io.poll_frame(&mut cx) {
                Poll::Ready(Ok(frame)) => {
                    link.wake.mark();
                    self.ready.push_back(LinkEvent::Frame { peer, frame });
                    None
                }
                Poll::Ready(Err(reason)) => Some(reason),
                Poll::Pending => None,
            }
        };
        if let Some(reason) = ended {
            self.teardown(peer, &reason);
        }
    }

    /// From now on [`Links::next`] reads no frames: they wait in their streams until
    /// [`Links::read_frames`], and a link that has some wakes the task only while it waits in
    /// [`Links::next_or_frames`] with `arrive` set. For an owner that handles frames on a timer anyway (the relay
    /// verifies news and sends frames at its flush): it is then woken once per flush, not once per
    /// frame. Backlogs are written at `read_frames` too.
    pub fn defer_frames(&mut self) {
        self.deferred = true;
        self.due.wake.store(false, Ordering::Release);
    }

    /// Whether a link has something to read or write (a deferred owner's cue to call
    /// [`Links::read_frames`] soon).
    pub fn frames_waiting(&self) -> bool {
        !self.due.list().is_empty()
    }

    /// Reads every frame waiting on the links that have some, into `frames` (with the peer each
    /// came from, in order per link), and writes their backlogs. A link that fails is torn down
    /// (its `Down` comes from [`Links::next`]).
    pub fn read_frames(&mut self, frames: &mut Vec<(PeerId, Vec<u8>)>) {
        self.due.wake.store(false, Ordering::Release);
        std::mem::swap(&mut self.taken, &mut self.due.list());
        let mut taken = std::mem::take(&mut self.taken);
        for (peer, id) in taken.drain(..) {
            let Some(link) = self.links.get_mut(&peer).filter(|l| l.id == id) else {
                continue;
            };
            link.wake.queued.store(false, Ordering::Release);
            let mut cx = Context::from_waker(&link.waker);
            let mut ended = match link.io.poll_write(&mut cx) {
                Poll::Ready(Err(reason)) => Some(reason),
                _ => None,
            };
            while ended.is_none() {
                match link.io.poll_frame(&mut cx) {
                    Poll::Ready(Ok(frame)) => frames.push((peer, frame)),
                    Poll::Ready(Err(reason)) => ended = Some(reason),
                    Poll::Pending => break,
                }
            }
            if let Some(reason) = ended {
                self.teardown(peer, &reason);
            }
        }
        self.taken = taken;
    }

    /// Writes one frame to `peer`'s link (the u32 big-endian length prefix, then the bytes) and
    /// flushes it; what the stream cannot take at once waits in the link's backlog for
    /// [`Links::next`]. False if there is no link, the frame would take the backlog past
    /// [`LINK_BACKLOG`], the frame is over [`MAX_FRAME`] (the peer would close the link on it),
    /// or the link failed (a `Down` follows); the frame is then dropped.
    pub fn send(&mut self, peer: &PeerId, frame: Vec<u8>) -> bool {
        if frame.len() > MAX_FRAME {
            tracing::debug!(%peer, len = frame.len(), "relay frame over MAX_FRAME not sent");
            return false;
        }
        let Some(link) = self.links.get_mut(peer) else {
            return false;
        };
        if link.io.backlog() + 4 + frame.len() > LINK_BACKLOG {
            return false;
        }
        push_frame(&mut link.io.out, &frame);
        let mut cx = Context::from_waker(&link.waker);
        if let Poll::Ready(Err(reason)) = link.io.poll_write(&mut cx) {
            self.teardown(*peer, &reason);
            return false;
        }
        true
    }

    /// Closes the link to `peer` (a `Down` event follows). An open in flight to `peer` is
    /// abandoned too (an `OpenFailed` follows if no link was up).
    pub fn close(&mut self, peer: &PeerId) {
        let had_link = self.teardown(*peer, "closed here");
        if let Some(p) = self.pending.remove(peer) {
            p.task.abort();
            if !had_link {
                self.ready.push_back(LinkEvent::OpenFailed {
                    peer: *peer,
                    error: "closed here before it opened".into(),
                });
            }
        }
    }

    /// Links up now, with whether we opened them.
    pub fn linked(&self) -> impl Iterator<Item = (PeerId, bool)> + '_ {
        self.links.iter().map(|(p, l)| (*p, l.outbound))
    }

    /// Links up now that we opened.
    pub fn outbound(&self) -> usize {
        self.links.values().filter(|l| l.outbound).count()
    }

    /// Links up now that the peer opened.
    pub fn inbound(&self) -> usize {
        self.links.values().filter(|l| !l.outbound).count()
    }

    /// Links up now on connections of their own ([`crate::direct`]).
    pub fn direct(&self) -> usize {
        self.links.values().filter(|l| l.direct).count()
    }

    /// Whether the link to `peer` is on a connection of its own.
    pub fn is_direct(&self, peer: &PeerId) -> bool {
        self.links.get(peer).is_some_and(|l| l.direct)
    }

    /// The port direct links are taken on, if they are.
    pub fn direct_port(&self) -> Option<u16> {
        self.direct.as_ref().map(|d| d.port)
    }

    /// This node is connected to `peer` at `ip` (`None`: no longer connected): where a direct
    /// link to it is dialled. The first address is kept while the peer stays connected.
    pub fn set_address(&mut self, peer: PeerId, ip: Option<std::net::IpAddr>) {
        match ip {
            Some(ip) => {
                self.ips.entry(peer).or_insert(ip);
            }
            None => {
                self.ips.remove(&peer);
            }
        }
    }

    /// Whether an open to `peer` is in flight.
    pub fn pending(&self, peer: &PeerId) -> bool {
        self.pending.contains_key(peer)
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn handle(&mut self, report: Report) {
        match report {
            Report::Inbound {
                peer,
                stream,
                direct,
            } => {
                let our_open_wins = self.local < peer;
                if let Some(p) = self.pending.get_mut(&peer)
                    && our_open_wins
                    && !self.links.contains_key(&peer)
                {
                    tracing::debug!(%peer, "inbound relay link held until our crossing open ends");
                    p.parked = Some((stream, direct));
                    return;
                }
                self.admit(peer, stream, false, direct);
            }
            Report::Opened {
                peer,
                attempt,
                result,
            } => {
                // An attempt `close` abandoned has no entry, or a newer attempt's.
                let Some(p) = self.pending.remove(&peer) else {
                    return;
                };
                if p.attempt != attempt {
                    self.pending.insert(peer, p);
                    return;
                }
                match result {
                    Ok((stream, direct)) => {
                        // A parked stream lost the tie to this one; dropping it resets it.
                        drop(p.parked);
                        self.admit(peer, stream, true, direct);
                    }
                    Err(error) => {
                        tracing::debug!(%peer, %error, "relay link open failed");
                        if let Some((stream, direct)) = p.parked {
                            self.admit(peer, stream, false, direct);
                        } else if !self.links.contains_key(&peer) {
                            self.ready.push_back(LinkEvent::OpenFailed { peer, error });
                        }
                    }
                }
            }
        }
    }

    /// Takes `stream` as the link to `peer` unless the rules refuse it: one link per peer (the
    /// one opened by the smaller peer id wins; between two the peer opened, the newer), and at
    /// most `max_inbound` inbound links. A refused stream is dropped, which resets it.
    fn admit(&mut self, peer: PeerId, stream: LinkStream, outbound: bool, direct: bool) {
        let inbound = self.inbound();
        if let Some(existing) = self.links.get(&peer) {
            let keep_new = if existing.outbound == outbound {
                true
            } else {
                let opener = if outbound { self.local } else { peer };
                opener == self.local.min(peer)
            };
            if !keep_new {
                tracing::debug!(%peer, outbound, "second relay link to a linked peer dropped");
                return;
            }
            if !outbound && existing.outbound && inbound >= self.max_inbound {
                tracing::debug!(%peer, "winning inbound relay link refused: inbound links full");
                return;
            }
            self.teardown(peer, "replaced by the link the peers agree on");
        } else if !outbound && inbound >= self.max_inbound {
            tracing::debug!(%peer, max = self.max_inbound, "inbound relay link refused: full");
            return;
        }
        self.start(peer, stream, outbound, direct);
    }

    /// Takes `stream` as the link to `peer` (due at once: the peer may have written already)
    /// and reports it `Up`.
    fn start(&mut self, peer: PeerId, stream: LinkStream, outbound: bool, direct: bool) {
        let id = self.id();
        let wake = Arc::new(LinkWake {
            peer,
            id,
            queued: AtomicBool::new(false),
            due: Arc::clone(&self.due),
        });
        wake.mark();
        self.links.insert(
            peer,
            Link {
                id,
                outbound,
                direct,
                io: LinkIo::new(stream),
                waker: Waker::from(Arc::clone(&wake)),
                wake,
            },
        );
        self.ready.push_back(LinkEvent::Up { peer, outbound });
    }

    /// Stops the link to `peer`, if any, and reports it `Down`; whether there was one.
    fn teardown(&mut self, peer: PeerId, reason: &str) -> bool {
        match self.links.remove(&peer) {
            Some(link) => {
                // Dropping the stream ends it.
                tracing::debug!(%peer, outbound = link.outbound, reason, "relay link down");
                self.ready.push_back(LinkEvent::Down { peer });
                true
            }
            None => false,
        }
    }
}

impl Drop for Links {
    fn drop(&mut self) {
        self.accept.abort();
        if let Some(d) = &self.direct {
            d.task.abort();
        }
        for p in self.pending.values() {
            p.task.abort();
        }
    }
}

fn push_frame(buf: &mut Vec<u8>, frame: &[u8]) {
    // `send` refuses frames over MAX_FRAME, so the length fits a u32.
    buf.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    buf.extend_from_slice(frame);
}
