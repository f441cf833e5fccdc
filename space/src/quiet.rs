//! Protocol handlers polled only when they have work: libp2p-swarm polls every handler of a
//! connection each time anything on the connection wakes, and at 100 nodes nearly every wake is
//! a relay frame that none of them has anything to do with.
//!
//! A connection's task wakes once for each relay frame it sends or receives (~70 times a second
//! per node at 100 nodes), and each wake ran gossipsub's, ping's, Kademlia's, identify's,
//! request-response's and the stream behaviour's `poll` (11 % of the process in a profile of the
//! steady window). [`Quiet`] wraps a node's behaviour (every space node's, in
//! [`crate::swarm::build_swarm_with`]) so that its connections' handlers are polled only when they
//! may have something to do: a waker they were polled with fired, the behaviour or the connection
//! handed them an event, their last poll yielded something (there may be more), or their
//! connection woke [`SWEEP`] times without polling them.
//!
//! The gate is one for all of a connection's handlers (the behaviour's whole handler is wrapped):
//! any handler's wake or event polls them all, as every wake did before. What no longer polls them
//! is traffic on the connection's other streams (the relay's), and the sweep bounds that: a
//! handler that queues work without waking anyone and counts on the next poll, whatever caused it
//! (gossipsub's, with no outbound stream open, reads its queue without registering a waker), waits
//! at most [`SWEEP`] relay frames longer than it did.
//!
//! The same wakes also asked the handlers for their inbound protocols: libp2p-swarm ends every
//! poll of a connection by calling `listen_protocol` and comparing the protocols it lists with the
//! last set (libp2p/rust-libp2p#4284), which built every handler's upgrade and walked their nested
//! lists each time (8 % of the process). A [`QuietHandler`] keeps the upgrade its handlers built,
//! with the protocols it lists, until they are polled or handed an event ([`QuietUpgrade`]), and
//! tells the swarm (libp2p-swarm as patched in `patches/libp2p-swarm`) that they may have changed
//! only then, so that the swarm does not ask and compare at all in between (5 % of the process
//! with the upgrade kept).

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use libp2p::PeerId;
use libp2p::Stream;
use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::{InboundUpgrade, UpgradeInfo};
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::handler::{
    ConnectionEvent, FullyNegotiatedInbound, InboundUpgradeSend, ListenUpgradeError,
    UpgradeInfoSend,
};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
    NetworkBehaviour, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};

use crate::woken::WhenWoken;

/// How many wakes of its connection a quiet handler sleeps through at most (a relay link's
/// connection wakes ~10 times a second, an idle one once a minute for ping).
pub const SWEEP: u32 = 16;

/// A behaviour whose connection handlers are polled only when they have work
/// ([`QuietHandler`]); everything else passes through, and it derefs to the behaviour.
#[derive(Debug)]
pub struct Quiet<B>(B);

impl<B> Quiet<B> {
    /// `behaviour`, its handlers polled only when they have work.
    pub fn new(behaviour: B) -> Self {
        Quiet(behaviour)
    }
}

impl<B> Deref for Quiet<B> {
    type Target = B;
    fn deref(&self) -> &B {
        &self.0
    }
}

impl<B> DerefMut for Quiet<B> {
    fn deref_mut(&mut self) -> &mut B {
        &mut self.0
    }
}

impl<B> crate::SpaceBehaviour for Quiet<B>
where
    B: crate::SpaceBehaviour,
    <THandler<B> as ConnectionHandler>::InboundOpenInfo: Clone,
{
    fn kad(&mut self) -> &mut libp2p::kad::Behaviour<libp2p::kad::store::MemoryStore> {
        self.0.kad()
    }
}

impl<B> NetworkBehaviour for Quiet<B>
where
    B: NetworkBehaviour,
    <THandler<B> as ConnectionHandler>::InboundOpenInfo: Clone,
{
    type ConnectionHandler = QuietHandler<THandler<B>>;
    type ToSwarm = B::ToSwarm;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.0.handle_pending_inbound_connection(id, local, remote)
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.0
            .handle_established_inbound_connection(id, peer, local, remote)
            .map(QuietHandler::new)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: Option<PeerId>,
        addresses: &[Multiaddr],
        role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.0
            .handle_pending_outbound_connection(id, peer, addresses, role)
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.0
            .handle_established_outbound_connection(id, peer, addr, role, port_use)
            .map(QuietHandler::new)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        self.0.on_swarm_event(event)
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.0.on_connection_handler_event(peer, id, event)
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.0.poll(cx)
    }
}

/// A connection handler polled only when it is due: its waker fired, an event reached it, its
/// last poll was ready, or its connection woke [`SWEEP`] times since. Its inbound upgrade is kept
/// between those polls ([`QuietUpgrade`]).
pub struct QuietHandler<H: ConnectionHandler> {
    inner: H,
    gate: WhenWoken,
    /// Polls of the connection that skipped this handler, since it was last polled.
    skipped: u32,
    /// What `inner.listen_protocol()` gave, kept until `inner` is polled or handed an event.
    listen: Arc<Mutex<Listen<H::InboundProtocol, H::InboundOpenInfo>>>,
}

/// A handler's inbound upgrade as it last built it, with the protocols it lists. `era` counts
/// the times it was dropped as stale: an upgrade handed out before that is not taken back.
/// `listed` is the era of the last upgrade handed out.
struct Listen<U: UpgradeInfoSend, I> {
    era: u64,
    listed: Option<u64>,
    upgrade: Option<U>,
    infos: Vec<U::Info>,
    info: Option<I>,
    timeout: Duration,
}

impl<U: UpgradeInfoSend, I> Listen<U, I> {
    fn stale(&mut self) {
        self.era += 1;
        self.upgrade = None;
        self.info = None;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing that holds this lock panics; if something did, what it guards is still whole.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<H: ConnectionHandler> QuietHandler<H> {
    /// Due at once: a new handler may have work from its start.
    pub fn new(inner: H) -> Self {
        QuietHandler {
            inner,
            gate: WhenWoken::new(),
            skipped: 0,
            listen: Arc::new(Mutex::new(Listen {
                era: 0,
                listed: None,
                upgrade: None,
                infos: Vec::new(),
                info: None,
                timeout: Duration::ZERO,
            })),
        }
    }

    /// The inner handler may list other protocols from now on (it was polled or handed an
    /// event): its upgrade is built again when next asked for.
    fn stale(&self) {
        lock(&self.listen).stale();
    }
}

/// The inbound upgrade of a [`QuietHandler`]: the inner handler's, and the protocols it lists,
/// both kept by the handler. libp2p-swarm asks for one at the end of every poll of the connection
/// only to read its protocols, and drops it: it then goes back to the handler for the next ask,
/// unless the inner handler has moved on since. One a peer's stream is negotiated with is
/// consumed, and the handler builds the next.
pub struct QuietUpgrade<U: UpgradeInfoSend, I> {
    /// Always `Some` until the upgrade is applied or dropped.
    upgrade: Option<U>,
    era: u64,
    listen: Arc<Mutex<Listen<U, I>>>,
}

impl<U: UpgradeInfoSend, I> UpgradeInfo for QuietUpgrade<U, I> {
    type Info = U::Info;
    type InfoIter = std::vec::IntoIter<U::Info>;

    fn protocol_info(&self) -> Self::InfoIter {
        let listen = lock(&self.listen);
        if listen.era == self.era {
            return listen.infos.clone().into_iter();
        }
        drop(listen);
        // The handler moved on since this upgrade was handed out: what it lists itself.
        let infos: Vec<U::Info> = self
            .upgrade
            .iter()
            .flat_map(UpgradeInfoSend::protocol_info)
            .collect();
        infos.into_iter()
    }
}

impl<U: InboundUpgradeSend, I: Send + 'static> InboundUpgrade<Stream> for QuietUpgrade<U, I> {
    type Output = U::Output;
    type Error = U::Error;
    type Future = U::Future;

    fn upgrade_inbound(mut self, socket: Stream, info: U::Info) -> U::Future {
        // Built with the inner upgrade, which only this or `drop` takes, each consuming `self`.
        let upgrade = self
            .upgrade
            .take()
            .expect("a QuietUpgrade holds its upgrade until it is applied");
        upgrade.upgrade_inbound(socket, info)
    }
}

impl<U: UpgradeInfoSend, I> Drop for QuietUpgrade<U, I> {
    fn drop(&mut self) {
        if let Some(upgrade) = self.upgrade.take() {
            let mut listen = lock(&self.listen);
            if listen.era == self.era && listen.upgrade.is_none() {
                listen.upgrade = Some(upgrade);
            }
        }
    }
}

impl<H> ConnectionHandler for QuietHandler<H>
where
    H: ConnectionHandler,
    H::InboundOpenInfo: Clone,
{
    type FromBehaviour = H::FromBehaviour;
    type ToBehaviour = H::ToBehaviour;
    type InboundProtocol = QuietUpgrade<H::InboundProtocol, H::InboundOpenInfo>;
    type OutboundProtocol = H::OutboundProtocol;
    type InboundOpenInfo = H::InboundOpenInfo;
    type OutboundOpenInfo = H::OutboundOpenInfo;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, Self::InboundOpenInfo> {
        let mut listen = lock(&self.listen);
        let kept = match (listen.upgrade.take(), listen.info.clone()) {
            (Some(upgrade), Some(info)) => Some((upgrade, info)),
            _ => None,
        };
        let (upgrade, info) = kept.unwrap_or_else(|| {
            let fresh = self.inner.listen_protocol();
            listen.timeout = *fresh.timeout();
            let (upgrade, info) = fresh.into_upgrade();
            listen.infos = UpgradeInfoSend::protocol_info(&upgrade).collect();
            listen.info = Some(info.clone());
            (upgrade, info)
        });
        let (era, timeout) = (listen.era, listen.timeout);
        listen.listed = Some(era);
        drop(listen);
        let upgrade = QuietUpgrade {
            upgrade: Some(upgrade),
            era,
            listen: Arc::clone(&self.listen),
        };
        SubstreamProtocol::new(upgrade, info).with_timeout(timeout)
    }

    /// Only once the inner handler moved on (was polled or handed an event) since the last
    /// upgrade handed out: what it lists changes only then.
    fn listen_protocol_may_have_changed(&self) -> bool {
        let listen = lock(&self.listen);
        listen.listed != Some(listen.era)
    }

    fn connection_keep_alive(&self) -> bool {
        self.inner.connection_keep_alive()
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<
        ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>,
    > {
        self.skipped += 1;
        if self.skipped >= SWEEP {
            self.gate.touch();
        }
        let (inner, skipped, listen) = (&mut self.inner, &mut self.skipped, &self.listen);
        self.gate.poll(cx, |cx| {
            *skipped = 0;
            lock(listen).stale();
            inner.poll(cx)
        })
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Option<Self::ToBehaviour>> {
        self.stale();
        self.inner.poll_close(cx)
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        self.gate.touch();
        self.stale();
        self.inner.on_behaviour_event(event)
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<
            Self::InboundProtocol,
            Self::OutboundProtocol,
            Self::InboundOpenInfo,
            Self::OutboundOpenInfo,
        >,
    ) {
        self.gate.touch();
        self.stale();
        // The same event, for the inner handler's own upgrade type (its output and error are
        // the inner upgrade's).
        let event = match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound { protocol, info }) => {
                ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound { protocol, info })
            }
            ConnectionEvent::ListenUpgradeError(ListenUpgradeError { info, error }) => {
                ConnectionEvent::ListenUpgradeError(ListenUpgradeError { info, error })
            }
            ConnectionEvent::FullyNegotiatedOutbound(e) => {
                ConnectionEvent::FullyNegotiatedOutbound(e)
            }
            ConnectionEvent::DialUpgradeError(e) => ConnectionEvent::DialUpgradeError(e),
            ConnectionEvent::AddressChange(e) => ConnectionEvent::AddressChange(e),
            ConnectionEvent::LocalProtocolsChange(e) => ConnectionEvent::LocalProtocolsChange(e),
            ConnectionEvent::RemoteProtocolsChange(e) => ConnectionEvent::RemoteProtocolsChange(e),
            // A kind of event this libp2p-swarm does not have yet: nothing to pass on.
            _ => {
                tracing::debug!("a connection event of an unknown kind was not passed on");
                return;
            }
        };
        self.inner.on_connection_event(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::task::{ArcWake, waker_ref};
    use libp2p::core::upgrade::DeniedUpgrade;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Waker;
    use std::time::Duration;

    /// A handler that counts its polls, yields what it was handed, and keeps the last waker.
    #[derive(Default)]
    struct Counted {
        polls: usize,
        events: Vec<u32>,
        waker: Option<Waker>,
    }

    impl ConnectionHandler for Counted {
        type FromBehaviour = u32;
        type ToBehaviour = u32;
        type InboundProtocol = DeniedUpgrade;
        type OutboundProtocol = DeniedUpgrade;
        type InboundOpenInfo = ();
        type OutboundOpenInfo = ();

        fn listen_protocol(&self) -> SubstreamProtocol<DeniedUpgrade, ()> {
            SubstreamProtocol::new(DeniedUpgrade, ())
        }

        fn poll(
            &mut self,
            cx: &mut Context<'_>,
        ) -> Poll<ConnectionHandlerEvent<DeniedUpgrade, (), u32>> {
            self.polls += 1;
            match self.events.pop() {
                Some(e) => Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(e)),
                None => {
                    self.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        }

        fn on_behaviour_event(&mut self, e: u32) {
            self.events.push(e);
        }

        fn on_connection_event(&mut self, _: ConnectionEvent<DeniedUpgrade, DeniedUpgrade>) {}
    }

    /// The connection's task: counts its wakes.
    struct Task(AtomicUsize);
    impl ArcWake for Task {
        fn wake_by_ref(arc_self: &Arc<Self>) {
            arc_self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn notified(p: Poll<ConnectionHandlerEvent<DeniedUpgrade, (), u32>>) -> Option<u32> {
        match p {
            Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(e)) => Some(e),
            _ => None,
        }
    }

    #[test]
    fn a_handler_is_polled_only_when_it_has_work() {
        let mut h = QuietHandler::new(Counted::default());
        let task = Arc::new(Task(AtomicUsize::new(0)));
        let w = waker_ref(&task);
        let mut cx = Context::from_waker(&w);

        // New: polled, nothing there.
        assert!(h.poll(&mut cx).is_pending());
        assert_eq!(h.inner.polls, 1);
        // The connection woke for something else (a relay frame): not polled.
        for _ in 0..10 {
            assert!(h.poll(&mut cx).is_pending());
        }
        assert_eq!(h.inner.polls, 1);

        // Its own waker fires (a timer, a stream it reads): the task wakes, the handler is polled.
        h.inner
            .waker
            .take()
            .expect("the handler kept a waker")
            .wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
        assert!(h.poll(&mut cx).is_pending());
        assert_eq!(h.inner.polls, 2);

        // An event from the behaviour: polled, and again after it yielded (it may hold more).
        h.on_behaviour_event(7);
        assert_eq!(notified(h.poll(&mut cx)), Some(7));
        assert_eq!(h.inner.polls, 3);
        assert!(h.poll(&mut cx).is_pending());
        assert_eq!(h.inner.polls, 4);
        assert!(h.poll(&mut cx).is_pending());
        assert_eq!(h.inner.polls, 4);

        // Work queued behind its back (no wake, no event): picked up by the sweep.
        h.inner.events.push(9);
        let wakes = (1..=2 * SWEEP).find(|_| notified(h.poll(&mut cx)) == Some(9));
        let wakes = wakes.expect("the sweep polled the handler");
        assert!((SWEEP - 2..=SWEEP).contains(&wakes), "{wakes} wakes");
    }

    #[test]
    fn a_connection_event_makes_a_handler_due() {
        let mut h = QuietHandler::new(Counted::default());
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        assert!(h.poll(&mut cx).is_pending());
        assert!(h.poll(&mut cx).is_pending());
        assert_eq!(h.inner.polls, 1);
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().expect("an address");
        h.on_connection_event(ConnectionEvent::AddressChange(
            libp2p::swarm::handler::AddressChange { new_address: &addr },
        ));
        assert!(h.poll(&mut cx).is_pending());
        assert_eq!(h.inner.polls, 2);
    }

    /// An upgrade listing the protocols its handler held when it built it.
    struct Offer(Vec<&'static str>);

    impl UpgradeInfo for Offer {
        type Info = &'static str;
        type InfoIter = std::vec::IntoIter<&'static str>;
        fn protocol_info(&self) -> Self::InfoIter {
            self.0.clone().into_iter()
        }
    }

    impl InboundUpgrade<Stream> for Offer {
        type Output = ();
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<(), std::convert::Infallible>>;
        fn upgrade_inbound(self, _: Stream, _: &'static str) -> Self::Future {
            std::future::ready(Ok(()))
        }
    }

    /// A handler whose inbound protocols can change, counting the upgrades it builds.
    #[derive(Default)]
    struct Listed {
        protocols: Vec<&'static str>,
        built: std::sync::atomic::AtomicUsize,
        waker: Option<Waker>,
    }

    impl Listed {
        fn built(&self) -> usize {
            self.built.load(Ordering::SeqCst)
        }
    }

    impl ConnectionHandler for Listed {
        type FromBehaviour = &'static str;
        type ToBehaviour = ();
        type InboundProtocol = Offer;
        type OutboundProtocol = DeniedUpgrade;
        type InboundOpenInfo = ();
        type OutboundOpenInfo = ();

        fn listen_protocol(&self) -> SubstreamProtocol<Offer, ()> {
            self.built.fetch_add(1, Ordering::SeqCst);
            SubstreamProtocol::new(Offer(self.protocols.clone()), ())
                .with_timeout(Duration::from_secs(7))
        }

        fn poll(
            &mut self,
            cx: &mut Context<'_>,
        ) -> Poll<ConnectionHandlerEvent<DeniedUpgrade, (), ()>> {
            self.waker = Some(cx.waker().clone());
            Poll::Pending
        }

        fn on_behaviour_event(&mut self, added: &'static str) {
            self.protocols.push(added);
        }

        fn on_connection_event(&mut self, _: ConnectionEvent<Offer, DeniedUpgrade>) {}
    }

    /// What libp2p-swarm does at the end of each poll of a connection: asks for the inbound
    /// upgrade, reads its protocols, drops it.
    fn listed(h: &QuietHandler<Listed>) -> Vec<&'static str> {
        let p = h.listen_protocol();
        assert_eq!(
            *p.timeout(),
            Duration::from_secs(7),
            "the inner handler's timeout"
        );
        UpgradeInfo::protocol_info(p.upgrade()).collect()
    }

    #[test]
    fn the_inbound_upgrade_is_built_once_until_the_handler_moves_on() {
        let mut h = QuietHandler::new(Listed {
            protocols: vec!["/a/1", "/b/1"],
            ..Listed::default()
        });
        let task = Arc::new(Task(AtomicUsize::new(0)));
        let w = waker_ref(&task);
        let mut cx = Context::from_waker(&w);
        assert!(h.poll(&mut cx).is_pending());

        // The connection's polls (a relay frame each) ask again and again: built once, and
        // after the first listing the connection is told that nothing may have changed (it
        // then does not ask at all).
        assert!(h.listen_protocol_may_have_changed());
        for _ in 0..10 {
            assert_eq!(listed(&h), ["/a/1", "/b/1"]);
            assert!(h.poll(&mut cx).is_pending());
            assert!(!h.listen_protocol_may_have_changed());
        }
        assert_eq!(h.inner.built(), 1);

        // An event can change what the handler lists: built again, and then kept again.
        h.on_behaviour_event("/c/1");
        assert!(h.listen_protocol_may_have_changed());
        assert_eq!(listed(&h), ["/a/1", "/b/1", "/c/1"]);
        assert!(!h.listen_protocol_may_have_changed());
        assert_eq!(listed(&h), ["/a/1", "/b/1", "/c/1"]);
        assert_eq!(h.inner.built(), 2);

        // So can a poll of the handler (its waker fired).
        h.inner.protocols.push("/d/1");
        h.inner
            .waker
            .take()
            .expect("the handler kept a waker")
            .wake();
        assert!(h.poll(&mut cx).is_pending());
        assert!(h.listen_protocol_may_have_changed());
        assert_eq!(listed(&h), ["/a/1", "/b/1", "/c/1", "/d/1"]);
        assert_eq!(h.inner.built(), 3);
    }

    #[test]
    fn an_upgrade_out_when_the_handler_moves_on_lists_its_own_and_is_not_taken_back() {
        let mut h = QuietHandler::new(Listed {
            protocols: vec!["/a/1"],
            ..Listed::default()
        });
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        assert!(h.poll(&mut cx).is_pending());

        // Handed out and held (a peer's stream being negotiated with it): the next ask builds
        // another; the first back is kept, the second dropped.
        let held = h.listen_protocol();
        assert_eq!(listed(&h), ["/a/1"]);
        assert_eq!(h.inner.built(), 2);
        drop(held);
        assert_eq!(listed(&h), ["/a/1"]);
        assert_eq!(h.inner.built(), 2);

        // The handler moves on while one is out: that one still lists what it was built with,
        // and is not taken back when dropped.
        let held = h.listen_protocol();
        h.on_behaviour_event("/b/1");
        assert_eq!(
            UpgradeInfo::protocol_info(held.upgrade()).collect::<Vec<_>>(),
            ["/a/1"]
        );
        drop(held);
        assert_eq!(listed(&h), ["/a/1", "/b/1"]);
        assert_eq!(h.inner.built(), 3);
    }
}
