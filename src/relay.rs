//! The advert relay's logic (sans-IO, time passed in): how a node of a space spreads capacity
//! adverts to its few relay neighbours in batches, and keeps each advert's path a tree.
//!
//! Every host advertises about once a second, so an advert is a stream per host, and a missed one
//! is replaced by the next. A node forwards an advert it took (verified, newer than any it has from
//! that host) to every neighbour but the one it came from, batched into one frame per neighbour per
//! flush. The first copy of a host's advert wins; a copy that arrives again over another link makes
//! this node send that neighbour a `Prune(host)` ("do not send me this host's adverts"), so after
//! the first few seconds each host's adverts reach each node once, along a tree rooted at the host
//! (Plumtree's eager/lazy split, with the stream itself as the lazy push: a host silent longer than
//! [`RelayConfig::repair_ms`] is `Graft`ed back on every link this node pruned; a host whose tree
//! link goes down, or whose neighbour up the tree says with a graft that it lost the host, is
//! grafted on every other link, so that the subtree below looks for another way at once). A graft
//! is answered at once with the newest advert the neighbour holds (what was in flight on a link
//! that closed), and a node that lost its way in prunes no copy, so the answers do not undo its
//! grafts; only news makes a way in, so no loop forms. Duplicates are told from news by the host
//! and sequence number read from the envelope *before* its signature is checked, so copies cost no
//! signature check; news is verified by the caller before [`Relay::accepted`].
//!
//! Refreshes ([`crate::chain`]) travel the same trees as signed adverts and are told apart from
//! news the same way, by host and seq. A neighbour is sent a refresh only after the anchor it
//! refreshes: a node sends each link a host's signed advert before its first refresh of that anchor
//! there, so a node that joins (or a link that is new) can check what follows. A graft is answered
//! with the anchor (and its last refresh), and a node that gets a refresh it cannot check (the
//! frame with the anchor was lost) answers it with a graft. Only a copy of a host's newest advert
//! prunes its link: an older one is such an anchor sent ahead.
//!
//! Frame layout: a version byte (1), then items: `1, len: u16 BE, envelope bytes` (an advert),
//! `2, host: 32 bytes` (prune), `3, host: 32 bytes` (graft), `4, refresh` ([`Refresh::encode`]:
//! host, anchor seq u64 BE, index u16 BE, link).

use std::collections::HashMap;
use std::hash::Hash;

use crate::advert::CapacityAdvert;
use crate::chain::{REFRESH_LEN, Refresh};
use crate::envelope::Envelope;
use crate::ident::PublicKey;

use smallvec::SmallVec;

/// The relay's maps: foldhash, seeded at random per process, not SipHash. A node looks a host
/// and a neighbour up several times per item it reads or sends (~100 items a second),
/// and SipHash over 32-byte keys and peer ids was ~2 % of a node's CPU at 100 nodes. The random
/// seed keeps hosts' keys (which anyone can pick) from being ground into collisions.
type Map<K, V> = HashMap<K, V, foldhash::quality::RandomState>;

/// The frame format this build writes and reads.
pub const FRAME_VERSION: u8 = 1;
const ADVERT: u8 = 1;
const PRUNE: u8 = 2;
const GRAFT: u8 = 3;
const REFRESH: u8 = 4;

/// The relay's limits and timings.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayConfig {
    /// A host not heard for this long, plus up to as long again (a spread that differs per node
    /// and host), is grafted back on the links this node pruned it on. The spread keeps a whole
    /// subtree from grafting at once when one link upstream breaks: the node just below the break
    /// usually repairs first, and the next advert reaches the rest before their time comes.
    pub repair_ms: u64,
    /// Seeds this node's spread (pass a random number).
    pub spread_seed: u64,
    /// A host not heard for this long is forgotten (its advert has expired from the view).
    pub forget_ms: u64,
    /// Hosts tracked at most; a new host beyond this is still forwarded, but not tracked.
    pub max_hosts: usize,
    /// Hosts one neighbour may have pruned at once (more prunes are ignored).
    pub max_muted: usize,
    /// Bytes queued for one neighbour at most; adverts beyond are dropped (the neighbour is slow;
    /// the next advert replaces them).
    pub max_queued: usize,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            repair_ms: 3_000,
            spread_seed: 0,
            forget_ms: crate::space::ADVERT_TTL_S * 1000,
            max_hosts: 65_536,
            max_muted: 65_536,
            max_queued: 192 * 1024,
        }
    }
}

/// Why a frame could not be read: its sender is not relaying honestly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("empty frame")]
    Empty,
    #[error("relay frame version {0}, this build reads {FRAME_VERSION}")]
    Version(u8),
    #[error("item {index}: unknown tag {tag}")]
    Tag { index: usize, tag: u8 },
    #[error("item {index}: cut short")]
    Short { index: usize },
}

/// One item of a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item<'a> {
    Advert(&'a [u8]),
    Prune(PublicKey),
    Graft(PublicKey),
    Refresh(Refresh),
}

/// A host's repair spread at one node: below `range`, fixed for the pair (seed, host).
fn spread(seed: u64, host: &PublicKey, range: u64) -> u64 {
    let b = host.to_bytes();
    let x = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) ^ seed;
    // SplitMix64's finaliser: neighbouring seeds give unrelated spreads.
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) % range.max(1)
}

/// Reads a frame's items.
pub fn decode(frame: &[u8]) -> Result<Vec<Item<'_>>, FrameError> {
    let (&version, mut rest) = frame.split_first().ok_or(FrameError::Empty)?;
    if version != FRAME_VERSION {
        return Err(FrameError::Version(version));
    }
    let mut items = Vec::new();
    while let Some((&tag, body)) = rest.split_first() {
        let index = items.len();
        let short = FrameError::Short { index };
        match tag {
            ADVERT => {
                let (len, body) = body.split_at_checked(2).ok_or(short.clone())?;
                let len = u16::from_be_bytes([len[0], len[1]]) as usize;
                let (bytes, body) = body.split_at_checked(len).ok_or(short)?;
                items.push(Item::Advert(bytes));
                rest = body;
            }
            PRUNE | GRAFT => {
                let (key, body) = body.split_at_checked(32).ok_or(short)?;
                let key = PublicKey::from_wire(key).map_err(|_| FrameError::Short { index })?;
                items.push(if tag == PRUNE {
                    Item::Prune(key)
                } else {
                    Item::Graft(key)
                });
                rest = body;
            }
            REFRESH => {
                let r = Refresh::decode(body).ok_or(short)?;
                items.push(Item::Refresh(r));
                rest = &body[REFRESH_LEN..];
            }
            tag => return Err(FrameError::Tag { index, tag }),
        }
    }
    Ok(items)
}

/// Appends `item` to a frame being built (starting it with the version byte if empty). An advert
/// longer than `u16::MAX` bytes is not appended (false).
pub fn encode(out: &mut Vec<u8>, item: &Item<'_>) -> bool {
    if out.is_empty() {
        out.push(FRAME_VERSION);
    }
    match item {
        Item::Advert(bytes) => {
            let Ok(len) = u16::try_from(bytes.len()) else {
                return false;
            };
            out.push(ADVERT);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(bytes);
        }
        Item::Prune(k) => {
            out.push(PRUNE);
            out.extend_from_slice(&k.to_bytes());
        }
        Item::Graft(k) => {
            out.push(GRAFT);
            out.extend_from_slice(&k.to_bytes());
        }
        Item::Refresh(r) => {
            out.push(REFRESH);
            r.encode(out);
        }
    }
    true
}

/// What a piece of news is: a signed advert's envelope bytes, or a refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Carried<'a> {
    Signed(&'a [u8]),
    Refresh(Refresh),
}

/// An advert or refresh in a frame that is news (newer than anything from its host): to be
/// verified, and if good, handed back through [`Relay::accepted`] or [`Relay::accepted_refresh`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub carried: Carried<'a>,
    /// As the envelope or refresh claims (unverified).
    pub host: PublicKey,
    pub seq: u64,
}

/// What a frame held.
#[derive(Debug, Default)]
pub struct Received<'a> {
    /// News, to verify.
    pub news: Vec<Candidate<'a>>,
    /// Adverts whose envelope or payload could not even be read (junk: the sender relays what it
    /// did not check).
    pub junk: Vec<String>,
}

/// Counters, for the space's summary and benchmarks.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RelayStats {
    /// Copies of adverts this node already had.
    pub duplicates: u64,
    /// Signed adverts and refreshes (checked by their hash chain, no signature) taken from
    /// neighbours.
    pub signed: u64,
    pub refreshes: u64,
    /// Signatures checked (signed adverts that were news here, taken or not).
    pub checked: u64,
    /// Refreshes this node could not check for want of their anchor, each answered with a graft
    /// that asks the sender for the anchor.
    pub anchors_asked: u64,
    pub prunes_sent: u64,
    pub grafts_sent: u64,
    /// Grafts from neighbours answered at once with the host's newest advert held here.
    pub grafts_answered: u64,
    /// Frame bytes read, and frames ignored for coming over a link this relay does not hold.
    pub bytes_in: u64,
    pub strangers: u64,
    /// Why hosts were grafted back: silent too long, their way in lost (the link went down, or
    /// the neighbour it came from lost it), news refused.
    pub silent: u64,
    pub orphaned: u64,
    pub refusals: u64,
    /// Adverts not queued to a neighbour whose queue was full (and, where the I/O counts them
    /// too, frames its link could not take).
    pub dropped: u64,
    /// Frames flushed, and those of them that carried only prunes and grafts (no advert or
    /// refresh).
    pub frames_sent: u64,
    pub frames_control: u64,
}

/// Notes that neighbour `l` holds a host's anchor `seq` (`seen`: the host's entries); beyond
/// [`RelayConfig::max_hosts`] anchors on the link it goes unnoted (a refresh to it then goes after
/// its anchor again).
fn note_anchor(l: &mut Link, seen: &mut Row, seq: u64) {
    update(l, seen, |s| s.anchor = Some(seq));
}

/// Appends `item` to a neighbour's frame if it fits within `max` bytes.
fn queue(l: &mut Link, item: &Item<'_>, max: usize) -> bool {
    let len = match item {
        Item::Advert(b) => b.len() + 3,
        Item::Refresh(_) => REFRESH_LEN + 1,
        Item::Prune(_) | Item::Graft(_) => 33,
    };
    let ok = l.out.len() + len <= max && encode(&mut l.out, item);
    l.news |= ok;
    ok
}

/// Answers a graft on link `l` for a host (`h`, its entries `seen`): its anchor and, if newer, its
/// last refresh, queued to the neighbour at once (counted as sent ahead, so the next refresh does
/// not repeat it). False if there was nothing to answer with, or no room in the neighbour's queue.
fn answer<P>(l: &mut Link, h: &Host<P>, seen: &mut Row, cfg: &RelayConfig) -> bool {
    let Some((seq, bytes)) = &h.anchor else {
        return false;
    };
    if !queue(l, &Item::Advert(bytes), cfg.max_queued) {
        return false;
    }
    note_anchor(l, seen, *seq);
    if let Some(r) = h.refresh.filter(|r| r.anchor_seq == *seq) {
        queue(l, &Item::Refresh(r), cfg.max_queued);
    }
    true
}

/// Whether an advert or refresh (host, seq) that came over link `l` from `from` is news; if not,
/// it is a copy and the link is pruned for the host (unless it is the host's way in).
/// `pruned`: whether this node pruned the link for the host; `full`: whether this node tracks
/// [`RelayConfig::max_hosts`] hosts already.
#[allow(clippy::too_many_arguments)]
fn is_news<P: Copy + Eq>(
    full: bool,
    e: &mut Entry<P>,
    stats: &mut RelayStats,
    l: &mut Link,
    pruned: bool,
    from: P,
    host: PublicKey,
    seq: u64,
    now_ms: u64,
) -> bool {
    // A link this node pruned for the host may still bring a frame it sent before the prune
    // reached it. Its news is news, but the link does not become the host's way in: if it did,
    // the copy from the real way in would prune that too, and the host would fall silent here
    // until repaired.
    match &mut e.host {
        Some(h) if seq <= h.seq => {
            stats.duplicates += 1;
            // Only a copy of the newest prunes: an older one is an anchor sent ahead of a
            // refresh (or a late copy), and pruning for it would undo the graft it answers.
            // A node that lost its way in prunes no copy: the links it grafted answer with the
            // newest they hold, the same as its own more often than not, and pruning for that
            // would undo the graft. The next news picks the way in.
            if seq == h.seq && h.from != Some(from) && !pruned && !h.lost() {
                update(l, &mut e.seen, |s| s.pruned = true);
                encode(&mut l.out, &Item::Prune(host));
                stats.prunes_sent += 1;
            }
            return false;
        }
        Some(h) => {
            h.seq = seq;
            if !pruned || h.from.is_none() {
                h.from = Some(from);
            }
        }
        None if !full => e.host = Some(Host::new(seq, Some(from), now_ms)),
        None => {}
    }
    true
}

/// Marks (seq, from `from`) taken for a host (its entry `e`): `Err` if a newer one from the host
/// was taken first (it is not forwarded), `Ok(false)` for a new host while this node tracks
/// [`RelayConfig::max_hosts`] already (`full`: forwarded, not tracked).
fn confirm<P: Copy>(
    e: &mut Entry<P>,
    full: bool,
    from: Option<P>,
    seq: u64,
    now_ms: u64,
) -> Result<bool, ()> {
    if full && e.host.is_none() {
        return Ok(false);
    }
    let h = e.host.get_or_insert_with(|| Host::new(seq, from, now_ms));
    if h.confirmed.is_some_and(|(c, _)| seq <= c) {
        return Err(());
    }
    h.confirmed = Some((seq, from));
    h.at_ms = now_ms;
    if seq > h.seq {
        h.seq = seq;
        h.from = from;
    }
    Ok(true)
}

/// Runs `f` on `host`'s entry, made if there is none, and forgets the entry if `f` leaves it
/// empty; `tracked` follows the entries that hold a [`Host`].
fn with_entry<P, R>(
    hosts: &mut Map<PublicKey, Entry<P>>,
    tracked: &mut usize,
    host: PublicKey,
    f: impl FnOnce(&mut Entry<P>) -> R,
) -> R {
    use std::collections::hash_map::Entry as Slot;
    let mut follow = |before: bool, after: bool| {
        *tracked = *tracked + usize::from(after) - usize::from(before);
    };
    match hosts.entry(host) {
        Slot::Occupied(mut o) => {
            let before = o.get().host.is_some();
            let r = f(o.get_mut());
            follow(before, o.get().host.is_some());
            if o.get().is_empty() {
                o.remove();
            }
            r
        }
        Slot::Vacant(v) => {
            let mut e = Entry::default();
            let r = f(&mut e);
            follow(false, e.host.is_some());
            if !e.is_empty() {
                v.insert(e);
            }
            r
        }
    }
}

/// One neighbour, as this node's relay keeps it.
#[derive(Debug)]
struct Link {
    /// The frame being built for this neighbour.
    out: Vec<u8>,
    /// Whether that frame carries an advert or refresh (not only prunes and grafts).
    news: bool,
    /// The link's place in every host's [`Row`]: no two links held at once share one.
    slot: u16,
    /// Hosts this link has muted (its entries in the rows with `muted` set), at most
    /// [`RelayConfig::max_muted`] (more prunes are ignored).
    muted: usize,
    /// Hosts this link holds an anchor of, at most [`RelayConfig::max_hosts`] (more go unnoted).
    anchors: usize,
    max_muted: usize,
    max_anchors: usize,
}

/// What a neighbour and this node told each other of one host. A link keeps an entry only
/// while something is set.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Seen {
    /// The neighbour asked not to be sent the host's adverts.
    muted: bool,
    /// This node asked the neighbour not to send them.
    pruned: bool,
    /// The newest signed advert (its seq) of the host that the neighbour sent this node or was
    /// sent by it: a refresh of that anchor needs no anchor sent first.
    anchor: Option<u64>,
}

/// What the links hold of one host, one [`Seen`] per link that holds something, by the link's
/// slot. A node has a few links (about four): they fit in the entry itself.
type Row = SmallVec<[(u16, Seen); 4]>;

/// All this node knows of one host, in one map entry: what it heard of the host (if it tracks
/// it), and what each neighbour and this node told each other of it. An item read or sent looks
/// its host up once, where a map of hosts and a map per link took two lookups per item read and
/// one plus one per link per refresh forwarded (~4.5 % of a node's CPU at 100 nodes,
/// docs/BENCHMARKS.md).
#[derive(Debug)]
struct Entry<P> {
    host: Option<Host<P>>,
    seen: Row,
}

impl<P> Default for Entry<P> {
    fn default() -> Self {
        Entry {
            host: None,
            seen: Row::new(),
        }
    }
}

impl<P> Entry<P> {
    fn is_empty(&self) -> bool {
        self.host.is_none() && self.seen.is_empty()
    }
}

/// What link `l` holds of a host (all unset if nothing), from the host's row.
fn seen(l: &Link, row: &Row) -> Seen {
    row.iter()
        .find(|(s, _)| *s == l.slot)
        .map(|(_, x)| *x)
        .unwrap_or_default()
}

/// Changes what link `l` holds of a host (in the host's row) with `change`, within the link's
/// bounds (a mute or an anchor beyond them is not kept); what it held before.
fn update(l: &mut Link, row: &mut Row, change: impl FnOnce(&mut Seen)) -> Seen {
    let at = row.iter().position(|(s, _)| *s == l.slot);
    let before = at.map(|i| row[i].1).unwrap_or_default();
    let mut after = before;
    change(&mut after);
    if after.muted && !before.muted && l.muted >= l.max_muted {
        after.muted = false;
    }
    if after.anchor.is_some() && before.anchor.is_none() && l.anchors >= l.max_anchors {
        after.anchor = None;
    }
    l.muted = l.muted + usize::from(after.muted) - usize::from(before.muted);
    l.anchors =
        l.anchors + usize::from(after.anchor.is_some()) - usize::from(before.anchor.is_some());
    match (at, after == Seen::default()) {
        (Some(i), true) => {
            row.swap_remove(i);
        }
        (Some(i), false) => row[i].1 = after,
        (None, false) => row.push((l.slot, after)),
        (None, true) => {}
    }
    before
}

impl Link {
    fn new(cfg: &RelayConfig, slot: u16) -> Link {
        Link {
            out: Vec::new(),
            news: false,
            slot,
            muted: 0,
            anchors: 0,
            max_muted: cfg.max_muted,
            max_anchors: cfg.max_hosts,
        }
    }
}

#[derive(Debug)]
struct Host<P> {
    /// The highest seq heard, verified or still waiting to be ([`Relay::on_frame`] counts it at
    /// once, so copies that come meanwhile cost no second signature check).
    seq: u64,
    /// The neighbour it came from (`None`: this node's own, or its link went down).
    from: Option<P>,
    /// The last seq taken (verified) and where it came from: what a refused one falls back to.
    confirmed: Option<(u64, Option<P>)>,
    /// When its latest advert was taken (ms).
    at_ms: u64,
    /// When this node last grafted it back (ms).
    grafted_ms: u64,
    /// Its last signed advert taken (seq and envelope bytes): sent ahead of the first refresh of
    /// it to a neighbour that lacks it.
    anchor: Option<(u64, Vec<u8>)>,
    /// Its last refresh taken, if newer than the anchor: with the anchor, what a graft is
    /// answered with.
    refresh: Option<Refresh>,
}

impl<P> Host<P> {
    /// A host first heard (seq, from `from`) at `now_ms`, nothing of it taken yet.
    fn new(seq: u64, from: Option<P>, now_ms: u64) -> Host<P> {
        Host {
            seq,
            from,
            confirmed: None,
            at_ms: now_ms,
            grafted_ms: 0,
            anchor: None,
            refresh: None,
        }
    }

    /// Whether what was last taken of the host came from a neighbour (not this node's own).
    fn relayed(&self) -> bool {
        matches!(self.confirmed, Some((_, Some(_))))
    }

    /// Whether this node lost its way in for the host (the link went, the neighbour up the tree
    /// lost it, or it fell silent): not this node's own host, and no neighbour to hear it from.
    fn lost(&self) -> bool {
        self.from.is_none() && self.relayed()
    }
}

/// One node's relay state: its neighbours (links) and the hosts it hears.
#[derive(Debug)]
pub struct Relay<P> {
    cfg: RelayConfig,
    links: Map<P, Link>,
    /// Every host this node tracks or a link holds something of.
    hosts: Map<PublicKey, Entry<P>>,
    /// Entries that track their host (hold a [`Host`]): at most [`RelayConfig::max_hosts`].
    tracked: usize,
    pub stats: RelayStats,
}

impl<P: Copy + Eq + Hash> Relay<P> {
    pub fn new(cfg: RelayConfig) -> Relay<P> {
        Relay {
            cfg,
            links: Map::default(),
            hosts: Map::default(),
            tracked: 0,
            stats: RelayStats::default(),
        }
    }

    /// A neighbour linked: it gets every advert from now on until it prunes hosts, and it is
    /// pruned at once for every host whose adverts already reach this node over another link (a
    /// new link would otherwise bring a second copy of everything until each host's copy pruned
    /// it; this way it carries only what this node lacks, and stands by for grafts).
    pub fn add_link(&mut self, peer: P) {
        if self.links.contains_key(&peer) {
            return;
        }
        // The lowest slot no link holds: a link gone left nothing in the rows (remove_link).
        let slot = (0..=u16::MAX)
            .find(|s| self.links.values().all(|l| l.slot != *s))
            .unwrap_or(u16::MAX);
        let mut l = Link::new(&self.cfg, slot);
        for (host, e) in self.hosts.iter_mut() {
            if e.host
                .as_ref()
                .is_some_and(|h| h.from.is_some_and(|f| f != peer))
            {
                update(&mut l, &mut e.seen, |s| s.pruned = true);
                encode(&mut l.out, &Item::Prune(*host));
                self.stats.prunes_sent += 1;
            }
        }
        self.links.insert(peer, l);
    }

    /// A neighbour gone: every host whose adverts came through it is grafted back on the links
    /// this node pruned it on, so the next advert finds another way.
    pub fn remove_link(&mut self, peer: &P) {
        let Some(gone) = self.links.remove(peer) else {
            return;
        };
        let mut orphans: Vec<PublicKey> = Vec::new();
        self.hosts.retain(|k, e| {
            e.seen.retain(|(s, _)| *s != gone.slot);
            if let Some(h) = e.host.as_mut().filter(|h| h.from.as_ref() == Some(peer)) {
                h.from = None;
                orphans.push(*k);
            }
            !e.is_empty()
        });
        for host in orphans {
            self.stats.orphaned += 1;
            self.orphan(host, None);
        }
    }

    /// Reads a frame from `from`: prunes and grafts take effect, copies of adverts this node has
    /// (or is about to verify) prune their link, and news is handed out to verify; each piece of
    /// news must come back through [`Relay::accepted`], [`Relay::accepted_refresh`] or
    /// [`Relay::refused`].
    pub fn on_frame<'a>(
        &mut self,
        from: P,
        frame: &'a [u8],
        now_ms: u64,
    ) -> Result<Received<'a>, FrameError> {
        let items = decode(frame)?;
        let mut got = Received::default();
        // Hosts the neighbour said it lost while it was this node's way in for them.
        let mut lost = Vec::new();
        // The link is looked up once per frame, not once or more per item.
        let Relay {
            cfg,
            links,
            hosts,
            tracked,
            stats,
        } = self;
        let Some(l) = links.get_mut(&from) else {
            stats.strangers += 1;
            return Ok(got);
        };
        stats.bytes_in += frame.len() as u64;
        for item in items {
            let (carried, host, seq, anchor_seq) = match item {
                Item::Prune(host) => {
                    with_entry(hosts, tracked, host, |e| {
                        update(l, &mut e.seen, |s| s.muted = true)
                    });
                    continue;
                }
                Item::Graft(host) => {
                    with_entry(hosts, tracked, host, |e| {
                        // The neighbour may lack the host's anchor too (it missed it, or its
                        // copy expired): the next refresh to it goes after the anchor.
                        update(l, &mut e.seen, |s| {
                            s.muted = false;
                            s.anchor = None;
                        });
                        match &e.host {
                            // From this node's way in for the host: that neighbour lost it.
                            Some(h) if h.from == Some(from) => lost.push(host),
                            // Answered at once with the newest this node holds: the advert the
                            // neighbour missed while it had no way in (a link closed with it in
                            // flight) reaches it now, not a second later with the next one.
                            Some(h) if !h.lost() => {
                                stats.grafts_answered += u64::from(answer(l, h, &mut e.seen, cfg));
                            }
                            _ => {}
                        }
                    });
                    continue;
                }
                Item::Advert(bytes) => {
                    let peeked =
                        Envelope::from_bytes(bytes).and_then(|e| e.peek::<CapacityAdvert>());
                    match peeked {
                        Ok(a) => (Carried::Signed(bytes), a.host, a.seq, a.seq),
                        Err(e) => {
                            got.junk.push(e.to_string());
                            continue;
                        }
                    }
                }
                Item::Refresh(r) => (Carried::Refresh(r), r.host, r.seq(), r.anchor_seq),
            };
            let full = *tracked >= cfg.max_hosts;
            let news = with_entry(hosts, tracked, host, |e| {
                // The neighbour holds the anchor it sent, or whose refresh it sent (it checked
                // it).
                let seen = update(l, &mut e.seen, |s| {
                    s.anchor = Some(s.anchor.map_or(anchor_seq, |a| a.max(anchor_seq)));
                });
                is_news(full, e, stats, l, seen.pruned, from, host, seq, now_ms)
            });
            if news {
                got.news.push(Candidate { carried, host, seq });
            }
        }
        for host in lost {
            self.stats.orphaned += 1;
            self.orphan(host, Some(from));
        }
        Ok(got)
    }

    /// A verified advert that is news, from neighbour `from` (`None`: this node's own): it is
    /// queued to every other neighbour that has not pruned its host (unless a newer one from the
    /// same host was taken first), and kept as the anchor its refreshes need.
    pub fn accepted(
        &mut self,
        from: Option<P>,
        host: PublicKey,
        seq: u64,
        bytes: &[u8],
        now_ms: u64,
    ) {
        self.taken(from, host, seq, now_ms, |e, links, stats, max| {
            if from.is_some() {
                stats.signed += 1;
            }
            if let Some(h) = &mut e.host {
                let mut anchor = h.anchor.take().map(|(_, b)| b).unwrap_or_default();
                anchor.clear();
                anchor.extend_from_slice(bytes);
                h.anchor = Some((seq, anchor));
                h.refresh = None;
            }
            for (peer, l) in links.iter_mut() {
                if Some(*peer) == from || seen(l, &e.seen).muted {
                    continue;
                }
                if queue(l, &Item::Advert(bytes), max) {
                    note_anchor(l, &mut e.seen, seq);
                } else {
                    stats.dropped += 1;
                }
            }
        });
    }

    /// A verified refresh that is news, from neighbour `from` (`None`: this node's own): queued
    /// like an advert, each neighbour that lacks its anchor sent the anchor first.
    pub fn accepted_refresh(&mut self, from: Option<P>, r: &Refresh, now_ms: u64) {
        self.taken(from, r.host, r.seq(), now_ms, |e, links, stats, max| {
            if from.is_some() {
                stats.refreshes += 1;
            }
            let Entry { host: h, seen: row } = e;
            if let Some(h) = h.as_mut() {
                h.refresh = Some(*r);
            }
            let anchor = h
                .as_ref()
                .and_then(|h| h.anchor.as_ref())
                .filter(|(seq, _)| *seq == r.anchor_seq)
                .map(|(_, b)| b.as_slice());
            for (peer, l) in links.iter_mut() {
                if Some(*peer) == from {
                    continue;
                }
                let s = seen(l, row);
                if s.muted {
                    continue;
                }
                if let Some(a) = anchor
                    && s.anchor != Some(r.anchor_seq)
                {
                    if !queue(l, &Item::Advert(a), max) {
                        stats.dropped += 1;
                        continue;
                    }
                    note_anchor(l, row, r.anchor_seq);
                }
                if !queue(l, &Item::Refresh(*r), max) {
                    stats.dropped += 1;
                }
            }
        });
    }

    /// Marks (host, seq) taken from `from` ([`confirm`]) and, unless a newer one was taken first,
    /// runs `f` on the host's entry with the links, the counters and the queue bound.
    fn taken(
        &mut self,
        from: Option<P>,
        host: PublicKey,
        seq: u64,
        now_ms: u64,
        f: impl FnOnce(&mut Entry<P>, &mut Map<P, Link>, &mut RelayStats, usize),
    ) {
        let Relay {
            cfg,
            links,
            hosts,
            tracked,
            stats,
        } = self;
        let full = *tracked >= cfg.max_hosts;
        with_entry(hosts, tracked, host, |e| {
            if confirm(e, full, from, seq, now_ms).is_ok() {
                f(e, links, stats, cfg.max_queued);
            }
        });
    }

    /// A refresh from `peer` could not be checked here: this node does not hold the anchor it
    /// refreshes (a frame that carried it was lost, or the advert expired here). A graft asks
    /// `peer` for the anchor: it answers with the anchor and its last refresh at once.
    pub fn want_anchor(&mut self, peer: P, host: PublicKey) {
        if let Some(l) = self.links.get_mut(&peer) {
            with_entry(&mut self.hosts, &mut self.tracked, host, |e| {
                update(l, &mut e.seen, |s| s.pruned = false)
            });
            encode(&mut l.out, &Item::Graft(host));
            self.stats.anchors_asked += 1;
        }
    }

    /// Appends an advert to the frame of every neighbour `to` picks, within each one's queue
    /// bound (counting what does not fit as dropped).
    fn enqueue(&mut self, bytes: &[u8], to: impl Fn(&P, &Link) -> bool) {
        let max = self.cfg.max_queued;
        for (peer, l) in self.links.iter_mut() {
            if to(peer, l) && !queue(l, &Item::Advert(bytes), max) {
                self.stats.dropped += 1;
            }
        }
    }

    /// News that did not verify (or was not taken): the host falls back to what was last taken
    /// from it, and every link pruned for it meanwhile is grafted back, so that a forgery that
    /// came first cannot cut the host's real adverts off.
    pub fn refused(&mut self, host: PublicKey, seq: u64) {
        let Some(e) = self.hosts.get_mut(&host) else {
            return;
        };
        let Some(h) = e.host.as_mut() else {
            return;
        };
        if h.seq != seq {
            return;
        }
        match h.confirmed {
            Some((c, from)) => {
                h.seq = c;
                h.from = from;
            }
            None => {
                with_entry(&mut self.hosts, &mut self.tracked, host, |e| e.host = None);
            }
        }
        self.stats.refusals += 1;
        self.graft(host);
    }

    /// Bytes this node sends as an advert of its own although they could not be read as one:
    /// queued to every neighbour as they are, for the neighbours to judge (and refuse).
    pub fn send_unread(&mut self, bytes: &[u8]) {
        self.enqueue(bytes, |_, _| true);
    }

    /// Grafts back hosts not heard for [`RelayConfig::repair_ms`] and their spread (at most once
    /// per that long each), and forgets hosts not heard for [`RelayConfig::forget_ms`].
    pub fn repair(&mut self, now_ms: u64) {
        let (base, forget, seed) = (self.cfg.repair_ms, self.cfg.forget_ms, self.cfg.spread_seed);
        let forgotten: Vec<PublicKey> = self
            .hosts
            .iter()
            .filter(|(_, e)| {
                e.host
                    .as_ref()
                    .is_some_and(|h| now_ms.saturating_sub(h.at_ms) >= forget)
            })
            .map(|(k, _)| *k)
            .collect();
        for k in forgotten {
            let links = &mut self.links;
            with_entry(&mut self.hosts, &mut self.tracked, k, |e| {
                e.host = None;
                for l in links.values_mut() {
                    update(l, &mut e.seen, |s| {
                        s.pruned = false;
                        s.anchor = None;
                    });
                }
            });
        }
        let due: Vec<PublicKey> = self
            .hosts
            .iter_mut()
            .filter_map(|(k, e)| e.host.as_mut().map(|h| (k, h)))
            .filter(|(k, h)| {
                let repair = base + spread(seed, k, base);
                now_ms.saturating_sub(h.at_ms) >= repair
                    && now_ms.saturating_sub(h.grafted_ms) >= repair
            })
            .map(|(k, h)| {
                h.grafted_ms = now_ms;
                // Its way in is presumed lost: the first news picks the next, and copies the
                // grafted links answer with do not prune them again.
                if h.relayed() {
                    h.from = None;
                }
                *k
            })
            .collect();
        for host in due {
            self.stats.silent += 1;
            self.graft(host);
        }
    }

    /// The frames built since the last flush, one per neighbour that has something.
    pub fn flush(&mut self) -> Vec<(P, Vec<u8>)> {
        let stats = &mut self.stats;
        self.links
            .iter_mut()
            .filter(|(_, l)| !l.out.is_empty())
            // The next frame starts at this one's size: grown item by item from empty, it was
            // reallocated several times a flush (2 % of a node's CPU at 100 nodes).
            .map(|(p, l)| {
                stats.frames_sent += 1;
                stats.frames_control += u64::from(!l.news);
                l.news = false;
                let size = l.out.len();
                (*p, std::mem::replace(&mut l.out, Vec::with_capacity(size)))
            })
            .collect()
    }

    /// Bytes waiting in the fullest neighbour's frame (to flush early when large).
    pub fn queued(&self) -> usize {
        self.links.values().map(|l| l.out.len()).max().unwrap_or(0)
    }

    /// Hosts tracked now.
    pub fn hosts(&self) -> usize {
        self.tracked
    }

    /// Whether `host`'s adverts reach this node (it is tracked: heard within
    /// [`RelayConfig::forget_ms`]).
    pub fn hears(&self, host: &PublicKey) -> bool {
        self.hosts.get(host).is_some_and(|e| e.host.is_some())
    }

    /// This node lost its way in for `host` (the link went, or the neighbour it came from lost
    /// it too and said so with a graft, `from`): every link but `from` is grafted. A link pruned
    /// for the host is another way its adverts reach this node; a neighbour that took the host
    /// from this node learns that this node lost it, and looks for another way itself, and so on
    /// down the tree; a neighbour that pruned this node answers with the newest it holds and
    /// sends the next. Grafting only the pruned links when there were some left a subtree whose
    /// pruned links all lay inside it waiting for the host's next advert but one (p99 744 against
    /// 388 ms in a same-time pair at 100 nodes, docs/BENCHMARKS.md); with none, such a subtree
    /// waited in silence for [`RelayConfig::repair_ms`] and its spread (3–6 s).
    fn orphan(&mut self, host: PublicKey, from: Option<P>) {
        if let Some(h) = self.hosts.get_mut(&host).and_then(|e| e.host.as_mut()) {
            h.from = None;
        }
        self.graft_on(host, |p, _| Some(*p) != from);
    }

    /// Grafts `host` back on the links this node pruned it on.
    fn graft(&mut self, host: PublicKey) {
        self.graft_on(host, |_, s| s.pruned);
    }

    /// Grafts `host` on the links `pick` chooses by their neighbour and what they hold of it.
    fn graft_on(&mut self, host: PublicKey, pick: impl Fn(&P, Seen) -> bool) {
        let Relay {
            links,
            hosts,
            tracked,
            stats,
            ..
        } = self;
        with_entry(hosts, tracked, host, |e| {
            for (p, l) in links.iter_mut() {
                if pick(p, seen(l, &e.seen)) {
                    update(l, &mut e.seen, |s| s.pruned = false);
                    encode(&mut l.out, &Item::Graft(host));
                    stats.grafts_sent += 1;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SecretKey;
    use std::collections::HashSet;

    fn advert(key: &SecretKey, seq: u64) -> Vec<u8> {
        let a = CapacityAdvert {
            v: 1,
            host: key.public(),
            seq,
            at: 1_800_000_000,
            free_cores: 2,
            free_memory_mib: 1024,
            free_disk_mib: 1024,
            backends: 1,
            running: vec![],
            owner_present: false,
            draining: false,
            benchmark: 1,
            chain: crate::Digest::default(),
        };
        Envelope::seal(&a, key).to_bytes()
    }

    fn relay() -> Relay<u8> {
        let mut r = Relay::new(RelayConfig::default());
        for p in 1..=3 {
            r.add_link(p);
        }
        r
    }

    fn frame(items: &[Item<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        for i in items {
            assert!(encode(&mut out, i));
        }
        out
    }

    fn sent(r: &mut Relay<u8>) -> HashMap<u8, Vec<Item<'static>>> {
        consistent(r);
        r.flush()
            .into_iter()
            .map(|(p, f)| {
                let f: &'static [u8] = Box::leak(f.into_boxed_slice());
                (p, decode(f).unwrap())
            })
            .collect()
    }

    #[test]
    fn repair_spreads_differ_by_node_and_host_and_stay_in_range() {
        let hosts: Vec<PublicKey> = (0..50u8)
            .map(|i| SecretKey::from_seed([i; 32]).public())
            .collect();
        let at = |seed: u64| -> Vec<u64> { hosts.iter().map(|h| spread(seed, h, 3_000)).collect() };
        let (a, b) = (at(1), at(2));
        assert!(a.iter().chain(&b).all(|&x| x < 3_000));
        assert_ne!(a, b, "two nodes spread the same hosts alike");
        let distinct: HashSet<&u64> = a.iter().collect();
        assert!(distinct.len() > 40, "{a:?}");
        assert_eq!(at(1), a, "a node keeps its spread");
    }

    #[test]
    fn frames_round_trip_and_broken_ones_are_named() {
        let k = SecretKey::from_seed([7; 32]);
        let a = advert(&k, 1);
        let items = vec![
            Item::Advert(&a),
            Item::Prune(k.public()),
            Item::Graft(k.public()),
        ];
        let f = frame(&items);
        assert_eq!(decode(&f).unwrap(), items);
        assert_eq!(decode(&[]), Err(FrameError::Empty));
        assert_eq!(decode(&[9]), Err(FrameError::Version(9)));
        assert_eq!(decode(&[1, 7]), Err(FrameError::Tag { index: 0, tag: 7 }));
        assert_eq!(
            decode(&f[..f.len() - 1]),
            Err(FrameError::Short { index: 2 })
        );
        assert_eq!(
            decode(&[1, 1, 0, 5, 1]),
            Err(FrameError::Short { index: 0 })
        );
        let mut out = Vec::new();
        assert!(!encode(&mut out, &Item::Advert(&vec![0; 70_000])));
    }

    #[test]
    fn news_is_forwarded_to_every_other_link_and_copies_prune_their_link() {
        let k = SecretKey::from_seed([7; 32]);
        let mut r = relay();
        let a1 = advert(&k, 1);
        let f = frame(&[Item::Advert(&a1)]);
        let got = r.on_frame(1, &f, 0).unwrap();
        assert_eq!(got.news.len(), 1);
        assert_eq!((got.news[0].host, got.news[0].seq), (k.public(), 1));
        r.accepted(Some(1), k.public(), 1, &a1, 1000);
        let out = sent(&mut r);
        // Not back to where it came from; to both others.
        assert!(!out.contains_key(&1));
        assert_eq!(out[&2], vec![Item::Advert(&a1)]);
        assert_eq!(out[&3], vec![Item::Advert(&a1)]);
        // The same advert again from link 2: no news, link 2 is pruned for this host, once.
        for _ in 0..2 {
            let got = r.on_frame(2, &f, 0).unwrap();
            assert!(got.news.is_empty());
        }
        assert_eq!(r.stats.duplicates, 2);
        assert_eq!(sent(&mut r)[&2], vec![Item::Prune(k.public())]);
        // A copy from the link it came from is no reason to prune that link.
        assert!(r.on_frame(1, &f, 0).unwrap().news.is_empty());
        assert!(sent(&mut r).is_empty());
        // An older advert is a copy too, but prunes nothing: it may be an anchor sent ahead.
        let a0 = advert(&k, 0);
        assert!(
            r.on_frame(3, &frame(&[Item::Advert(&a0)]), 0)
                .unwrap()
                .news
                .is_empty()
        );
        assert!(sent(&mut r).is_empty());
        // A copy of the newest from link 3 does.
        assert!(r.on_frame(3, &f, 0).unwrap().news.is_empty());
        assert_eq!(sent(&mut r)[&3], vec![Item::Prune(k.public())]);
    }

    #[test]
    fn a_new_link_is_pruned_for_the_hosts_that_already_come_another_way() {
        let (k, mine) = (SecretKey::from_seed([7; 32]), SecretKey::from_seed([8; 32]));
        let mut r = relay();
        let a1 = advert(&k, 1);
        r.on_frame(1, &frame(&[Item::Advert(&a1)]), 0).unwrap();
        r.accepted(Some(1), k.public(), 1, &a1, 1000);
        // This node's own adverts come over no link: nothing to prune for them.
        r.accepted(None, mine.public(), 1, &advert(&mine, 1), 1000);
        sent(&mut r);
        r.add_link(4);
        assert_eq!(sent(&mut r)[&4], vec![Item::Prune(k.public())]);
        // And that pruned link is grafted back when the host falls silent.
        r.repair(1000 + 6_000);
        assert!(sent(&mut r)[&4].contains(&Item::Graft(k.public())));
    }

    #[test]
    fn news_waiting_to_be_verified_makes_its_copies_duplicates_and_a_refusal_undoes_it() {
        let k = SecretKey::from_seed([7; 32]);
        let mut r = relay();
        let a1 = advert(&k, 1);
        r.on_frame(1, &frame(&[Item::Advert(&a1)]), 0).unwrap();
        r.accepted(Some(1), k.public(), 1, &a1, 1000);
        sent(&mut r);
        // Seq 2 comes from link 1 and, before it is verified, again from link 2: one check only.
        let a2 = advert(&k, 2);
        let f2 = frame(&[Item::Advert(&a2)]);
        assert_eq!(r.on_frame(1, &f2, 1100).unwrap().news.len(), 1);
        assert!(r.on_frame(2, &f2, 1100).unwrap().news.is_empty());
        assert_eq!(sent(&mut r)[&2], vec![Item::Prune(k.public())]);
        // It does not verify (say link 1 forged it): back to seq 1, and link 2 grafted back so
        // that the real seq 2 can still come that way.
        r.refused(k.public(), 2);
        assert_eq!(sent(&mut r)[&2], vec![Item::Graft(k.public())]);
        assert_eq!(r.on_frame(2, &f2, 1200).unwrap().news.len(), 1);
        r.accepted(Some(2), k.public(), 2, &a2, 1200);
        let out = sent(&mut r);
        assert_eq!(out[&1], vec![Item::Advert(&a2)]);
        assert!(!out.contains_key(&2));
        // A refused newcomer is forgotten.
        let other = SecretKey::from_seed([9; 32]);
        let b1 = advert(&other, 1);
        r.on_frame(3, &frame(&[Item::Advert(&b1)]), 1300).unwrap();
        assert_eq!(r.hosts(), 2);
        r.refused(other.public(), 1);
        assert_eq!(r.hosts(), 1);
        // Two pieces of news from one host taken out of order: the older is not forwarded.
        let (a3, a4) = (advert(&k, 3), advert(&k, 4));
        r.on_frame(1, &frame(&[Item::Advert(&a3), Item::Advert(&a4)]), 1400)
            .unwrap();
        r.accepted(Some(1), k.public(), 4, &a4, 1400);
        r.accepted(Some(1), k.public(), 3, &a3, 1400);
        assert_eq!(sent(&mut r)[&3], vec![Item::Advert(&a4)]);
    }

    #[test]
    fn a_late_frame_over_a_pruned_link_does_not_cut_the_host_off() {
        let k = SecretKey::from_seed([7; 32]);
        let mut r = relay();
        let a1 = advert(&k, 1);
        let f1 = frame(&[Item::Advert(&a1)]);
        r.on_frame(1, &f1, 0).unwrap();
        r.accepted(Some(1), k.public(), 1, &a1, 1000);
        r.on_frame(2, &f1, 0).unwrap();
        sent(&mut r);
        // Link 2 sent seq 2 before our prune reached it, and its frame comes first.
        let a2 = advert(&k, 2);
        let f2 = frame(&[Item::Advert(&a2)]);
        assert_eq!(r.on_frame(2, &f2, 1100).unwrap().news.len(), 1);
        // The copy over link 1, the host's way in, prunes nothing.
        assert!(r.on_frame(1, &f2, 1100).unwrap().news.is_empty());
        r.accepted(Some(2), k.public(), 2, &a2, 1100);
        let out = sent(&mut r);
        assert!(
            out.values().flatten().all(|i| !matches!(i, Item::Prune(_))),
            "{out:?}"
        );
        // Link 1 is still the way in: seq 3 over it is news.
        let a3 = advert(&k, 3);
        assert_eq!(
            r.on_frame(1, &frame(&[Item::Advert(&a3)]), 1200)
                .unwrap()
                .news
                .len(),
            1
        );
    }

    #[test]
    fn a_pruned_host_is_not_sent_until_grafted() {
        let k = SecretKey::from_seed([7; 32]);
        let mut r = relay();
        r.on_frame(2, &frame(&[Item::Prune(k.public())]), 0)
            .unwrap();
        let a1 = advert(&k, 1);
        r.accepted(None, k.public(), 1, &a1, 1000);
        let out = sent(&mut r);
        assert!(!out.contains_key(&2), "link 2 pruned this host");
        assert_eq!(
            out.len(),
            2,
            "this node's own advert goes to every other link"
        );
        r.on_frame(2, &frame(&[Item::Graft(k.public())]), 0)
            .unwrap();
        let a2 = advert(&k, 2);
        r.accepted(None, k.public(), 2, &a2, 2000);
        assert_eq!(sent(&mut r).len(), 3);
    }

    #[test]
    fn frames_are_counted_those_with_only_prunes_and_grafts_apart_and_hosts_heard_known() {
        let (k, other) = (SecretKey::from_seed([7; 32]), SecretKey::from_seed([8; 32]));
        let mut r = relay();
        assert!(!r.hears(&k.public()));
        r.accepted(Some(1), k.public(), 1, &advert(&k, 1), 1000);
        assert!(r.hears(&k.public()) && !r.hears(&other.public()));
        assert_eq!(r.flush().len(), 2, "news goes to the two other links");
        assert_eq!((r.stats.frames_sent, r.stats.frames_control), (2, 0));
        r.want_anchor(3, other.public());
        assert_eq!(r.flush().len(), 1, "a graft alone makes a frame");
        assert_eq!((r.stats.frames_sent, r.stats.frames_control), (3, 1));
        r.accepted(Some(1), k.public(), 2, &advert(&k, 2), 2000);
        r.want_anchor(3, other.public());
        assert_eq!(r.flush().len(), 2);
        assert_eq!(
            (r.stats.frames_sent, r.stats.frames_control),
            (5, 1),
            "a graft beside news is not a frame of its own"
        );
    }

    #[test]
    fn a_silent_host_and_a_lost_link_graft_the_pruned_links_back() {
        let k = SecretKey::from_seed([7; 32]);
        let mut r = relay();
        let a1 = advert(&k, 1);
        let f = frame(&[Item::Advert(&a1)]);
        r.on_frame(1, &f, 0).unwrap();
        r.accepted(Some(1), k.public(), 1, &a1, 1000);
        r.on_frame(2, &f, 0).unwrap();
        r.on_frame(3, &f, 0).unwrap();
        sent(&mut r);
        // Heard lately: nothing to repair.
        let due = 3_000 + spread(0, &k.public(), 3_000);
        r.repair(1000 + due - 1);
        assert!(sent(&mut r).is_empty());
        // Silent for the repair time: both pruned links grafted back, once per repair time.
        r.repair(1000 + due);
        let out = sent(&mut r);
        assert_eq!(out[&2], vec![Item::Graft(k.public())]);
        assert_eq!(out[&3], vec![Item::Graft(k.public())]);
        assert!(!out.contains_key(&1));
        r.repair(1000 + due + 500);
        assert!(sent(&mut r).is_empty());
        assert_eq!(r.stats.grafts_sent, 2);
        // Pruned again, then its tree link goes: grafted back at once.
        let a2 = advert(&k, 2);
        let f2 = frame(&[Item::Advert(&a2)]);
        r.on_frame(1, &f2, 0).unwrap();
        r.accepted(Some(1), k.public(), 2, &a2, 5000);
        r.on_frame(2, &f2, 0).unwrap();
        sent(&mut r);
        r.remove_link(&1);
        assert_eq!(sent(&mut r)[&2], vec![Item::Graft(k.public())]);
        // Forgotten once its advert would have expired.
        r.repair(5000 + RelayConfig::default().forget_ms);
        assert_eq!(r.hosts(), 0);
    }

    #[test]
    fn a_lost_way_in_grafts_every_other_link_and_the_neighbours_below_look_themselves() {
        let k = SecretKey::from_seed([7; 32]);
        let h = k.public();
        // Node r takes the host's adverts from 1 and forwards them to 2 and 3, none of which
        // sends a copy back: they are below r in the host's tree, and r has no other way in.
        let mut r = relay();
        let a1 = advert(&k, 1);
        r.on_frame(1, &frame(&[Item::Advert(&a1)]), 0).unwrap();
        r.accepted(Some(1), h, 1, &a1, 1000);
        sent(&mut r);
        r.remove_link(&1);
        let out = sent(&mut r);
        assert_eq!(out[&2], vec![Item::Graft(h)]);
        assert_eq!(out[&3], vec![Item::Graft(h)]);
        assert_eq!(r.stats.orphaned, 1);

        // With a pruned link to fall back on, the others are grafted too: that link may lie
        // below this node in the host's tree (its adverts came round through this node).
        let mut r = relay();
        r.on_frame(1, &frame(&[Item::Advert(&a1)]), 0).unwrap();
        r.accepted(Some(1), h, 1, &a1, 1000);
        r.on_frame(2, &frame(&[Item::Advert(&a1)]), 0).unwrap();
        sent(&mut r);
        r.remove_link(&1);
        let out = sent(&mut r);
        assert_eq!(out[&2], vec![Item::Graft(h)]);
        assert_eq!(out[&3], vec![Item::Graft(h)]);

        // A node below: its way in (1) sends a graft for the host, i.e. lost it. It grafts every
        // other link at once. A graft from a link that is not its way in only asks to be sent
        // the host again (and is answered).
        let mut below = relay();
        below.on_frame(1, &frame(&[Item::Advert(&a1)]), 0).unwrap();
        below.accepted(Some(1), h, 1, &a1, 1000);
        below.on_frame(2, &frame(&[Item::Advert(&a1)]), 0).unwrap();
        sent(&mut below);
        below.on_frame(3, &frame(&[Item::Graft(h)]), 0).unwrap();
        assert_eq!(sent(&mut below)[&3], vec![Item::Advert(&a1)]);
        below.on_frame(1, &frame(&[Item::Graft(h)]), 0).unwrap();
        let out = sent(&mut below);
        assert_eq!(out[&2], vec![Item::Graft(h)]);
        assert_eq!(out[&3], vec![Item::Graft(h)]);
        assert!(!out.contains_key(&1), "{out:?}");
        // The next advert is news from whichever link brings it first, and goes on to the
        // others (1 included: it lost the host).
        let a2 = advert(&k, 2);
        let f2 = frame(&[Item::Advert(&a2)]);
        assert_eq!(below.on_frame(2, &f2, 0).unwrap().news.len(), 1);
        below.accepted(Some(2), h, 2, &a2, 2000);
        let out = sent(&mut below);
        assert_eq!(out[&1], vec![Item::Advert(&a2)]);
        assert_eq!(out[&3], vec![Item::Advert(&a2)]);

        let mut leaf = relay();
        leaf.on_frame(1, &frame(&[Item::Advert(&a1)]), 0).unwrap();
        leaf.accepted(Some(1), h, 1, &a1, 1000);
        sent(&mut leaf);
        leaf.on_frame(1, &frame(&[Item::Graft(h)]), 0).unwrap();
        let out = sent(&mut leaf);
        assert_eq!(out[&2], vec![Item::Graft(h)]);
        assert_eq!(out[&3], vec![Item::Graft(h)]);
        assert!(!out.contains_key(&1), "{out:?}");
    }

    #[test]
    fn a_graft_is_answered_with_the_newest_held_and_a_node_without_a_way_in_prunes_no_copy() {
        let k = SecretKey::from_seed([7; 32]);
        let h = k.public();
        let (a1, a2) = (advert(&k, 1), advert(&k, 2));
        // Node b hears the host over link 1, and a copy over link 2 prunes that link.
        let mut b = relay();
        b.on_frame(1, &frame(&[Item::Advert(&a1)]), 0).unwrap();
        b.accepted(Some(1), h, 1, &a1, 1000);
        b.on_frame(2, &frame(&[Item::Advert(&a1)]), 0).unwrap();
        assert_eq!(sent(&mut b)[&2], vec![Item::Advert(&a1), Item::Prune(h)]);
        // Link 1 closes while advert 2 is on it: b grafts link 2 back.
        b.remove_link(&1);
        assert_eq!(sent(&mut b)[&2], vec![Item::Graft(h)]);

        // Node c (b's neighbour 2, where b is its link 9) took advert 2 from its own way in (1):
        // b's graft is answered at once with it, not with the next advert a second later.
        let mut c = relay();
        c.add_link(9);
        c.on_frame(1, &frame(&[Item::Advert(&a2)]), 0).unwrap();
        c.accepted(Some(1), h, 2, &a2, 1000);
        sent(&mut c);
        c.on_frame(9, &frame(&[Item::Graft(h)]), 0).unwrap();
        assert_eq!(sent(&mut c)[&9], vec![Item::Advert(&a2)]);
        assert_eq!(c.stats.grafts_answered, 1);
        // b takes it as news over link 2, its way in from now on, and passes it down.
        assert_eq!(
            b.on_frame(2, &frame(&[Item::Advert(&a2)]), 0)
                .unwrap()
                .news
                .len(),
            1
        );
        b.accepted(Some(2), h, 2, &a2, 2000);
        assert_eq!(sent(&mut b)[&3], vec![Item::Advert(&a2)]);

        // Without a way in, a copy of the newest (a grafted link answering with what b holds
        // already) prunes nothing, and becomes no way in: only news does, so no loop forms.
        let mut b = relay();
        b.on_frame(1, &frame(&[Item::Advert(&a1)]), 0).unwrap();
        b.accepted(Some(1), h, 1, &a1, 1000);
        b.on_frame(2, &frame(&[Item::Advert(&a1)]), 0).unwrap();
        sent(&mut b);
        b.remove_link(&1);
        sent(&mut b);
        assert!(
            b.on_frame(2, &frame(&[Item::Advert(&a1)]), 0)
                .unwrap()
                .news
                .is_empty()
        );
        assert!(
            b.on_frame(3, &frame(&[Item::Advert(&a1)]), 0)
                .unwrap()
                .news
                .is_empty()
        );
        assert!(
            sent(&mut b).is_empty(),
            "a copy pruned a link of a node without a way in"
        );
        // The next news picks the way in; copies prune again after it.
        assert_eq!(
            b.on_frame(3, &frame(&[Item::Advert(&a2)]), 0)
                .unwrap()
                .news
                .len(),
            1
        );
        b.accepted(Some(3), h, 2, &a2, 2000);
        sent(&mut b);
        b.on_frame(2, &frame(&[Item::Advert(&a2)]), 0).unwrap();
        assert_eq!(sent(&mut b)[&2], vec![Item::Prune(h)]);

        // A node that fell silent (no advert for the repair time) likewise: its grafted link
        // answers with the same advert, and the graft stands.
        let mut s = relay();
        s.on_frame(1, &frame(&[Item::Advert(&a1)]), 0).unwrap();
        s.accepted(Some(1), h, 1, &a1, 1000);
        s.on_frame(2, &frame(&[Item::Advert(&a1)]), 0).unwrap();
        sent(&mut s);
        s.repair(1000 + 2 * RelayConfig::default().repair_ms);
        assert_eq!(sent(&mut s)[&2], vec![Item::Graft(h)]);
        s.on_frame(2, &frame(&[Item::Advert(&a1)]), 0).unwrap();
        assert!(
            sent(&mut s).is_empty(),
            "the answer to a silent graft undid it"
        );

        // A graft is not answered by a node whose way in for the host is the grafting neighbour
        // (that neighbour lost it: it is sent nothing it has), nor by one that lost it too.
        let mut d = relay();
        d.on_frame(1, &frame(&[Item::Advert(&a1)]), 0).unwrap();
        d.accepted(Some(1), h, 1, &a1, 1000);
        sent(&mut d);
        d.on_frame(1, &frame(&[Item::Graft(h)]), 0).unwrap();
        assert!(!sent(&mut d).contains_key(&1));
        d.on_frame(2, &frame(&[Item::Graft(h)]), 0).unwrap();
        assert!(!sent(&mut d).contains_key(&2));
        // An unknown host's graft is not answered either.
        let other = SecretKey::from_seed([8; 32]).public();
        d.on_frame(3, &frame(&[Item::Graft(other)]), 0).unwrap();
        assert!(sent(&mut d).is_empty());
    }

    #[test]
    fn junk_is_named_and_a_stranger_link_is_not_heard() {
        let k = SecretKey::from_seed([7; 32]);
        let mut r = relay();
        let junk = frame(&[Item::Advert(b"not an envelope")]);
        let got = r.on_frame(1, &junk, 0).unwrap();
        assert!(got.news.is_empty());
        assert_eq!(got.junk.len(), 1);
        let a1 = advert(&k, 1);
        assert!(
            r.on_frame(9, &frame(&[Item::Advert(&a1)]), 0)
                .unwrap()
                .news
                .is_empty()
        );
    }

    #[test]
    fn refreshes_follow_their_anchor_onto_every_link_and_copies_prune_like_adverts() {
        use crate::chain::{Advertiser, Outgoing};
        let k = SecretKey::from_seed([7; 32]);
        let mut host = Advertiser::new(k.clone());
        let content = Envelope::from_bytes(&advert(&k, 1))
            .unwrap()
            .peek::<CapacityAdvert>()
            .unwrap();
        let Outgoing::Signed(env) = host.next(&content, 1_800_000_000, || Some([1; 32])) else {
            panic!("signed first");
        };
        let anchor = env.to_bytes();
        let seq = env.peek::<CapacityAdvert>().unwrap().seq;
        let Outgoing::Refresh(r1) = host.next(&content, 1_800_000_001, || Some([2; 32])) else {
            panic!("then a refresh");
        };
        let mut r = relay();
        // The anchor and a refresh of it come over link 1: both news, in order.
        let f = frame(&[Item::Advert(&anchor), Item::Refresh(r1)]);
        assert_eq!(
            decode(&f).unwrap(),
            vec![Item::Advert(&anchor), Item::Refresh(r1)]
        );
        let got = r.on_frame(1, &f, 0).unwrap();
        assert_eq!(
            got.news.iter().map(|c| c.seq).collect::<Vec<_>>(),
            vec![seq, seq + 1]
        );
        assert!(matches!(got.news[1].carried, Carried::Refresh(x) if x == r1));
        r.accepted(Some(1), k.public(), seq, &anchor, 1000);
        r.accepted_refresh(Some(1), &r1, 1000);
        // Links 2 and 3 get the anchor, then the refresh; link 1 neither.
        let out = sent(&mut r);
        assert!(!out.contains_key(&1));
        for p in [2, 3] {
            assert_eq!(out[&p], vec![Item::Advert(&anchor), Item::Refresh(r1)]);
        }
        // The next refresh goes alone: they hold its anchor.
        let Outgoing::Refresh(r2) = host.next(&content, 1_800_000_002, || Some([3; 32])) else {
            panic!("a refresh");
        };
        assert_eq!(
            r.on_frame(1, &frame(&[Item::Refresh(r2)]), 0)
                .unwrap()
                .news
                .len(),
            1
        );
        r.accepted_refresh(Some(1), &r2, 2000);
        assert_eq!(sent(&mut r)[&2], vec![Item::Refresh(r2)]);
        // A copy of it over link 2 is a duplicate and prunes link 2, like an advert's copy.
        assert!(
            r.on_frame(2, &frame(&[Item::Refresh(r2)]), 0)
                .unwrap()
                .news
                .is_empty()
        );
        assert_eq!(sent(&mut r)[&2], vec![Item::Prune(k.public())]);
        // A link that comes up later is sent the anchor before the first refresh it gets.
        r.add_link(4);
        sent(&mut r);
        let Outgoing::Refresh(r3) = host.next(&content, 1_800_000_003, || Some([4; 32])) else {
            panic!("a refresh");
        };
        r.on_frame(1, &frame(&[Item::Refresh(r3)]), 0).unwrap();
        r.accepted_refresh(Some(1), &r3, 3000);
        let out = sent(&mut r);
        assert_eq!(out[&4], vec![Item::Advert(&anchor), Item::Refresh(r3)]);
        assert_eq!(out[&3], vec![Item::Refresh(r3)]);
        // A neighbour that grafts the host is answered at once with the anchor and the last
        // refresh (what it may have missed), and the next refresh goes alone; the anchor it
        // already had prunes nothing there.
        r.on_frame(3, &frame(&[Item::Graft(k.public())]), 0)
            .unwrap();
        assert_eq!(
            sent(&mut r)[&3],
            vec![Item::Advert(&anchor), Item::Refresh(r3)]
        );
        let Outgoing::Refresh(r4) = host.next(&content, 1_800_000_004, || Some([5; 32])) else {
            panic!("a refresh");
        };
        r.on_frame(1, &frame(&[Item::Refresh(r4)]), 0).unwrap();
        r.accepted_refresh(Some(1), &r4, 4000);
        assert_eq!(sent(&mut r)[&3], vec![Item::Refresh(r4)]);
        let mut other: Relay<u8> = relay();
        other
            .on_frame(1, &frame(&[Item::Advert(&anchor), Item::Refresh(r3)]), 0)
            .unwrap();
        other.accepted(Some(1), k.public(), seq, &anchor, 0);
        other.accepted_refresh(Some(1), &r3, 0);
        sent(&mut other);
        assert!(
            other
                .on_frame(2, &frame(&[Item::Advert(&anchor), Item::Refresh(r4)]), 0)
                .unwrap()
                .news
                .len()
                == 1
        );
        assert!(
            sent(&mut other)
                .get(&2)
                .is_none_or(|items| !items.contains(&Item::Prune(k.public()))),
            "an anchor sent ahead pruned its link"
        );
        // A refresh this node cannot check: it asks its sender for the anchor with a graft.
        r.want_anchor(2, k.public());
        assert_eq!(sent(&mut r)[&2], vec![Item::Graft(k.public())]);
        assert_eq!(r.stats.anchors_asked, 1);
        // A refresh cut short is a broken frame.
        let mut cut = frame(&[Item::Refresh(r3)]);
        cut.pop();
        assert_eq!(decode(&cut), Err(FrameError::Short { index: 0 }));
    }

    #[test]
    fn what_a_neighbour_holds_is_bounded_by_the_hosts_tracked() {
        let mut r: Relay<u8> = Relay::new(RelayConfig {
            max_hosts: 2,
            ..RelayConfig::default()
        });
        r.add_link(1);
        r.add_link(2);
        for i in 0..5u8 {
            let k = SecretKey::from_seed([i; 32]);
            let a = advert(&k, 1);
            r.on_frame(1, &frame(&[Item::Advert(&a)]), 0).unwrap();
            r.accepted(Some(1), k.public(), 1, &a, 1000);
        }
        // Five hosts forwarded, two tracked and noted per neighbour.
        assert_eq!(r.hosts(), 2);
        assert!(r.links.values().all(|l| l.anchors <= 2));
        assert_eq!(sent(&mut r)[&2].len(), 5);
    }

    #[test]
    fn a_links_entries_keep_their_bounds_and_go_once_empty() {
        let cfg = RelayConfig {
            max_muted: 2,
            max_hosts: 3,
            ..RelayConfig::default()
        };
        let mut l = Link::new(&cfg, 1);
        // Another link's entries in the same rows, untouched by this one's.
        let mut other = Link::new(&cfg, 0);
        let mut rows: Vec<Row> = (0..5).map(|_| Row::new()).collect();
        for row in &mut rows {
            update(&mut other, row, |s| s.muted = true);
            update(&mut l, row, |s| s.muted = true);
            update(&mut l, row, |s| s.anchor = Some(7));
            update(&mut l, row, |s| s.pruned = true);
        }
        let count = |l: &Link, rows: &[Row], f: fn(Seen) -> bool| {
            rows.iter().filter(|r| f(seen(l, r))).count()
        };
        assert_eq!((count(&l, &rows, |s| s.muted), l.muted), (2, 2));
        assert_eq!(
            (count(&l, &rows, |s| s.anchor.is_some()), l.anchors),
            (3, 3)
        );
        // Prunes this node sent are bounded by the hosts it tracks, not here.
        assert_eq!(count(&l, &rows, |s| s.pruned), 5);
        // What was there before is given back; a change within the bounds is kept.
        assert_eq!(
            update(&mut l, &mut rows[0], |s| s.anchor = Some(9)).anchor,
            Some(7)
        );
        assert_eq!(seen(&l, &rows[0]).anchor, Some(9));
        assert_eq!(l.anchors, 3);
        // Emptied entries go, and their room takes the next mute.
        for row in &mut rows {
            update(&mut l, row, |s| *s = Seen::default());
        }
        assert!(rows.iter().flatten().all(|(s, _)| *s == other.slot));
        assert_eq!(rows.iter().map(|r| r.len()).sum::<usize>(), 2);
        assert_eq!((l.muted, l.anchors), (0, 0));
        assert_eq!(count(&other, &rows, |s| s.muted), 2);
        assert!(!update(&mut l, &mut rows[4], |s| s.muted = true).muted);
        assert!(seen(&l, &rows[4]).muted);
        assert_eq!(l.muted, 1);
    }

    /// The rows hold only what the links hold, and `tracked` counts the hosts tracked.
    fn consistent(r: &Relay<u8>) {
        assert_eq!(
            r.tracked,
            r.hosts.values().filter(|e| e.host.is_some()).count()
        );
        assert!(r.hosts.values().all(|e| !e.is_empty()));
        for e in r.hosts.values() {
            for (s, x) in &e.seen {
                assert_ne!(*x, Seen::default());
                assert!(
                    r.links.values().any(|l| l.slot == *s),
                    "slot {s} of no link"
                );
            }
        }
    }

    #[test]
    fn a_link_gone_leaves_nothing_for_the_next_to_inherit() {
        let mut r = relay();
        let hosts: Vec<SecretKey> = (0..4u8).map(|i| SecretKey::from_seed([i; 32])).collect();
        for k in &hosts {
            let a = advert(k, 1);
            r.on_frame(1, &frame(&[Item::Advert(&a)]), 0).unwrap();
            r.accepted(Some(1), k.public(), 1, &a, 0);
            // Link 3 mutes every host; link 2 holds every anchor.
            r.on_frame(3, &frame(&[Item::Prune(k.public())]), 0)
                .unwrap();
        }
        consistent(&r);
        let slot = r.links[&3].slot;
        r.remove_link(&3);
        consistent(&r);
        // The next link takes the slot, and starts as any new link: pruned for every host heard
        // over another, muting none, holding no anchor.
        r.add_link(4);
        assert_eq!(r.links[&4].slot, slot);
        consistent(&r);
        let l = &r.links[&4];
        assert_eq!((l.muted, l.anchors), (0, 0));
        for k in &hosts {
            let s = seen(l, &r.hosts[&k.public()].seen);
            assert_eq!(
                s,
                Seen {
                    muted: false,
                    pruned: true,
                    anchor: None
                }
            );
        }
        let a = advert(&hosts[0], 2);
        r.accepted(Some(1), hosts[0].public(), 2, &a, 1000);
        assert!(sent(&mut r)[&4].contains(&Item::Advert(&a)));
        // Forgetting the hosts leaves the links' mutes only.
        r.on_frame(4, &frame(&[Item::Prune(hosts[1].public())]), 0)
            .unwrap();
        r.repair(10 * r.cfg.forget_ms);
        consistent(&r);
        assert_eq!(r.hosts(), 0);
        assert_eq!(r.hosts.len(), 1);
        assert!(seen(&r.links[&4], &r.hosts[&hosts[1].public()].seen).muted);
    }

    #[test]
    fn a_slow_neighbours_queue_is_bounded() {
        let mut r: Relay<u8> = Relay::new(RelayConfig {
            max_queued: 1000,
            ..RelayConfig::default()
        });
        r.add_link(1);
        let k = SecretKey::from_seed([7; 32]);
        for seq in 1..20 {
            let a = advert(&k, seq);
            r.accepted(None, k.public(), seq, &a, seq * 1000);
        }
        assert!(r.queued() <= 1000);
        assert!(r.stats.dropped > 0);
    }
}
