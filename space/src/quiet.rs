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

use std::ops::{Deref, DerefMut};
use std::task::{Context, Poll};

use libp2p::PeerId;
use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::handler::ConnectionEvent;
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

impl<B: crate::SpaceBehaviour> crate::SpaceBehaviour for Quiet<B> {
    fn kad(&mut self) -> &mut libp2p::kad::Behaviour<libp2p::kad::store::MemoryStore> {
        self.0.kad()
    }
}

impl<B: NetworkBehaviour> NetworkBehaviour for Quiet<B> {
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
/// last poll was ready, or its connection woke [`SWEEP`] times since.
pub struct QuietHandler<H> {
    inner: H,
    gate: WhenWoken,
    /// Polls of the connection that skipped this handler, since it was last polled.
    skipped: u32,
}

impl<H> QuietHandler<H> {
    /// Due at once: a new handler may have work from its start.
    pub fn new(inner: H) -> Self {
        QuietHandler {
            inner,
            gate: WhenWoken::new(),
            skipped: 0,
        }
    }
}

impl<H: ConnectionHandler> ConnectionHandler for QuietHandler<H> {
    type FromBehaviour = H::FromBehaviour;
    type ToBehaviour = H::ToBehaviour;
    type InboundProtocol = H::InboundProtocol;
    type OutboundProtocol = H::OutboundProtocol;
    type InboundOpenInfo = H::InboundOpenInfo;
    type OutboundOpenInfo = H::OutboundOpenInfo;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, Self::InboundOpenInfo> {
        self.inner.listen_protocol()
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
        let (inner, skipped) = (&mut self.inner, &mut self.skipped);
        self.gate.poll(cx, |cx| {
            *skipped = 0;
            inner.poll(cx)
        })
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Option<Self::ToBehaviour>> {
        self.inner.poll_close(cx)
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        self.gate.touch();
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
}
