//! Long-lived relay links: at most one libp2p stream per peer on [`RELAY_PROTOCOL`], carrying
//! length-prefixed frames, each link served by a reader task and a writer task.
//!
//! [`Links`] owns the state; the tasks only report to it through one bounded channel, and every
//! change of state happens in [`Links::next`] (or in the synchronous calls), so the event loop
//! that owns it needs no locks. Each link carries an id: whatever a torn-down link's tasks still
//! report is recognised as stale and ignored, so it never touches a newer link to the same peer.
//!
//! Two peers that open to each other at once both end with the link opened by the peer with the
//! smaller [`PeerId`]; each side applies that rule alone and they agree.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use libp2p::futures::StreamExt;
use libp2p::futures::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use libp2p::futures::task::AtomicWaker;
use libp2p::{PeerId, Stream, StreamProtocol};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// The protocol of relay links.
pub const RELAY_PROTOCOL: StreamProtocol = StreamProtocol::new("/gleaner/adverts/1");
/// Largest frame on a link; a bigger length prefix closes the link.
pub const MAX_FRAME: usize = 256 * 1024;
/// Frames queued to one link's writer; when full, `send` drops the frame and returns false.
pub const LINK_QUEUE: usize = 16;
/// How long an outbound open may take before it is reported failed.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Reports from the link tasks waiting for [`Links::next`]; readers wait when it is full.
const EVENT_QUEUE: usize = 256;
/// How often every link's pending read is polled again unprompted (see `read_frames`): the
/// longest a link outlives a connection this side closed.
const REPOLL: Duration = Duration::from_secs(1);
/// Bytes the writer gathers from queued frames before it writes and flushes them.
const WRITE_BATCH: usize = 64 * 1024;

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

/// What the tasks report to [`Links::next`].
enum Report {
    /// A peer opened a stream to us.
    Inbound { peer: PeerId, stream: Stream },
    /// An outbound open (attempt `attempt`) finished.
    Opened {
        peer: PeerId,
        attempt: u64,
        result: Result<Stream, String>,
    },
    /// Link `link` read a frame.
    Frame {
        peer: PeerId,
        link: u64,
        frame: Vec<u8>,
    },
    /// Link `link`'s reader or writer stopped.
    Ended {
        peer: PeerId,
        link: u64,
        reason: String,
    },
}

/// One link that is up.
struct Link {
    id: u64,
    outbound: bool,
    frames: mpsc::Sender<Vec<u8>>,
    reader: AbortHandle,
    writer: AbortHandle,
    /// The reader's waker, to poll its pending read again ([`Links::next`] every [`REPOLL`]).
    repoll: Arc<AtomicWaker>,
}

impl Link {
    fn stop(&self) {
        self.reader.abort();
        self.writer.abort();
    }
}

/// An outbound open in flight.
struct Pending {
    attempt: u64,
    task: AbortHandle,
    /// A stream the peer opened meanwhile, held while ours is in flight because ours wins the
    /// tie (we have the smaller id); it is used only if ours fails.
    parked: Option<Stream>,
}

/// The relay links of one node: at most one per peer, inbound ones capped.
pub struct Links {
    local: PeerId,
    control: libp2p_stream::Control,
    max_inbound: usize,
    reports_tx: mpsc::Sender<Report>,
    reports: mpsc::Receiver<Report>,
    links: HashMap<PeerId, Link>,
    pending: HashMap<PeerId, Pending>,
    /// Events decided but not yet returned by `next` (at most two per report or one per `close`).
    ready: VecDeque<LinkEvent>,
    next_id: u64,
    accept: AbortHandle,
    /// Ticks every [`REPOLL`] while links are up: one timer for all of them (a timer per reader
    /// woke an idle 100-node space 400 times a second).
    repoll: tokio::time::Interval,
}

impl Links {
    /// Starts accepting inbound links on [`RELAY_PROTOCOL`] through `control` (from the swarm's
    /// `libp2p_stream::Behaviour`); at most `max_inbound` inbound links are kept, more are closed
    /// at once. `local` is this node's peer id, for the tie-break between crossed opens. Spawns a
    /// task, so it must be called inside a tokio runtime. Fails if the protocol is already
    /// accepted through this behaviour (a second `Links` on one swarm).
    pub fn new(
        mut control: libp2p_stream::Control,
        local: PeerId,
        max_inbound: usize,
    ) -> Result<Links, String> {
        let mut incoming = control
            .accept(RELAY_PROTOCOL)
            .map_err(|e| format!("accepting {RELAY_PROTOCOL}: {e}"))?;
        let (reports_tx, reports) = mpsc::channel(EVENT_QUEUE);
        let tx = reports_tx.clone();
        // libp2p-stream hands over inbound streams through a one-slot channel and drops those
        // that find it full, so they are taken off it at once; the wait is here instead.
        let accept = tokio::spawn(async move {
            while let Some((peer, stream)) = incoming.next().await {
                if tx.send(Report::Inbound { peer, stream }).await.is_err() {
                    break;
                }
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
            ready: VecDeque::new(),
            next_id: 0,
            accept,
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
        let task = tokio::spawn(async move {
            let result =
                match tokio::time::timeout(OPEN_TIMEOUT, control.open_stream(peer, RELAY_PROTOCOL))
                    .await
                {
                    Ok(Ok(stream)) => Ok(stream),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no stream after {OPEN_TIMEOUT:?}")),
                };
            let _ = tx
                .send(Report::Opened {
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

    /// The next event; cancel-safe, for use in a `tokio::select!` loop beside the swarm.
    pub async fn next(&mut self) -> LinkEvent {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return event;
            }
            // Cancel-safe: a report is handled without awaiting once received, and a tick
            // only wakes the readers. `reports_tx` is held here, so the channel never closes.
            tokio::select! {
                report = self.reports.recv() => match report {
                    Some(report) => self.handle(report),
                    None => std::future::pending::<()>().await,
                },
                _ = self.repoll.tick(), if !self.links.is_empty() => {
                    for link in self.links.values() {
                        link.repoll.wake();
                    }
                }
            }
        }
    }

    /// Queues one frame to `peer`'s writer (which writes the u32 big-endian length prefix then
    /// the bytes, and flushes). False if there is no link, its queue is full, or the frame is
    /// over [`MAX_FRAME`] (the peer would close the link on it); the frame is then dropped.
    pub fn send(&mut self, peer: &PeerId, frame: Vec<u8>) -> bool {
        if frame.len() > MAX_FRAME {
            tracing::debug!(%peer, len = frame.len(), "relay frame over MAX_FRAME not sent");
            return false;
        }
        match self.links.get(peer) {
            Some(link) => link.frames.try_send(frame).is_ok(),
            None => false,
        }
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
            Report::Inbound { peer, stream } => {
                let our_open_wins = self.local < peer;
                if let Some(p) = self.pending.get_mut(&peer)
                    && our_open_wins
                    && !self.links.contains_key(&peer)
                {
                    tracing::debug!(%peer, "inbound relay link held until our crossing open ends");
                    p.parked = Some(stream);
                    return;
                }
                self.admit(peer, stream, false);
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
                    Ok(stream) => {
                        // A parked stream lost the tie to this one; dropping it resets it.
                        drop(p.parked);
                        self.admit(peer, stream, true);
                    }
                    Err(error) => {
                        tracing::debug!(%peer, %error, "relay link open failed");
                        if let Some(stream) = p.parked {
                            self.admit(peer, stream, false);
                        } else if !self.links.contains_key(&peer) {
                            self.ready.push_back(LinkEvent::OpenFailed { peer, error });
                        }
                    }
                }
            }
            Report::Frame { peer, link, frame } => {
                if self.links.get(&peer).is_some_and(|l| l.id == link) {
                    self.ready.push_back(LinkEvent::Frame { peer, frame });
                }
            }
            Report::Ended { peer, link, reason } => {
                if self.links.get(&peer).is_some_and(|l| l.id == link) {
                    self.teardown(peer, &reason);
                }
            }
        }
    }

    /// Takes `stream` as the link to `peer` unless the rules refuse it: one link per peer (the
    /// one opened by the smaller peer id wins; between two the peer opened, the newer), and at
    /// most `max_inbound` inbound links. A refused stream is dropped, which resets it.
    fn admit(&mut self, peer: PeerId, stream: Stream, outbound: bool) {
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
        self.start(peer, stream, outbound);
    }

    /// Starts `stream`'s reader and writer and reports it `Up`.
    fn start(&mut self, peer: PeerId, stream: Stream, outbound: bool) {
        let id = self.id();
        let (read, write) = stream.split();
        let (frames, queue) = mpsc::channel(LINK_QUEUE);
        let repoll = Arc::new(AtomicWaker::new());
        let tx = self.reports_tx.clone();
        let ended = move |tx: mpsc::Sender<Report>, reason: String| async move {
            let _ = tx
                .send(Report::Ended {
                    peer,
                    link: id,
                    reason,
                })
                .await;
        };
        let waker = Arc::clone(&repoll);
        let reader = tokio::spawn(async move {
            let reason = read_frames(read, peer, id, &tx, &waker).await;
            ended(tx, reason).await;
        })
        .abort_handle();
        let tx = self.reports_tx.clone();
        let writer = tokio::spawn(async move {
            let reason = write_frames(write, queue).await;
            ended(tx, reason).await;
        })
        .abort_handle();
        self.links.insert(
            peer,
            Link {
                id,
                outbound,
                frames,
                reader,
                writer,
                repoll,
            },
        );
        self.ready.push_back(LinkEvent::Up { peer, outbound });
    }

    /// Stops the link to `peer`, if any, and reports it `Down`; whether there was one.
    fn teardown(&mut self, peer: PeerId, reason: &str) -> bool {
        match self.links.remove(&peer) {
            Some(link) => {
                tracing::debug!(%peer, outbound = link.outbound, reason, "relay link down");
                link.stop();
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
        for link in self.links.values() {
            link.stop();
        }
        for p in self.pending.values() {
            p.task.abort();
        }
    }
}

/// Reads frames off a link until it ends; why it ended.
///
/// A pending read is polled again whenever `repoll` is woken ([`Links::next`] does every
/// [`REPOLL`]), even when nothing else woke it: when this side closes the connection
/// (`Swarm::disconnect_peer_id`), yamux's graceful close marks the streams closed without waking
/// their readers (libp2p/rust-yamux#216), so a read that only waits for its waker would never see
/// the end and the link would stay up on a dead connection.
async fn read_frames(
    mut read: ReadHalf<Stream>,
    peer: PeerId,
    link: u64,
    tx: &mpsc::Sender<Report>,
    repoll: &AtomicWaker,
) -> String {
    loop {
        let next = {
            let frame = read_frame(&mut read);
            tokio::pin!(frame);
            std::future::poll_fn(|cx| {
                repoll.register(cx.waker());
                frame.as_mut().poll(cx)
            })
            .await
        };
        match next {
            Ok(frame) => {
                if tx.send(Report::Frame { peer, link, frame }).await.is_err() {
                    return "links dropped".into();
                }
            }
            Err(reason) => return reason,
        }
    }
}

/// One frame: its length prefix, then that many bytes.
async fn read_frame(read: &mut ReadHalf<Stream>) -> Result<Vec<u8>, String> {
    let mut prefix = [0u8; 4];
    if let Err(e) = read.read_exact(&mut prefix).await {
        return Err(match e.kind() {
            std::io::ErrorKind::UnexpectedEof => "closed by the peer".into(),
            _ => format!("read: {e}"),
        });
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(format!(
            "peer sent a {len}-byte frame, over the {MAX_FRAME}-byte limit"
        ));
    }
    let mut frame = vec![0; len];
    if let Err(e) = read.read_exact(&mut frame).await {
        return Err(format!("read inside a {len}-byte frame: {e}"));
    }
    Ok(frame)
}

/// Writes queued frames, each after its length prefix, flushing once the queue is drained (or a
/// batch is large); why it ended.
async fn write_frames(mut write: WriteHalf<Stream>, mut queue: mpsc::Receiver<Vec<u8>>) -> String {
    let mut buf = Vec::new();
    while let Some(frame) = queue.recv().await {
        buf.clear();
        push_frame(&mut buf, &frame);
        while buf.len() < WRITE_BATCH {
            match queue.try_recv() {
                Ok(frame) => push_frame(&mut buf, &frame),
                Err(_) => break,
            }
        }
        if let Err(e) = write.write_all(&buf).await {
            return format!("write: {e}");
        }
        if let Err(e) = write.flush().await {
            return format!("flush: {e}");
        }
    }
    let _ = write.close().await;
    "writer queue closed".into()
}

fn push_frame(buf: &mut Vec<u8>, frame: &[u8]) {
    // `send` refuses frames over MAX_FRAME, so the length fits a u32.
    buf.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    buf.extend_from_slice(frame);
}
