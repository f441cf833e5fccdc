//! A stream polled only when it woke the task, or was changed from outside its poll: the node's
//! loop wakes ~45 times a second per node for relay frames and timers, and polling the whole swarm
//! on each wake (every behaviour, the connection pool, the listeners) was ~8 % of a node's CPU.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures_util::stream::{Stream, StreamExt};
use futures_util::task::{ArcWake, AtomicWaker, waker_ref};

/// Whether a stream is due a poll: set by the wakers the stream was polled with, by an item it
/// yielded (it may hold more), and by [`WhenWoken::touch`].
#[derive(Debug)]
struct Due {
    due: AtomicBool,
    task: AtomicWaker,
}

impl ArcWake for Due {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.due.store(true, Ordering::Release);
        arc_self.task.wake();
    }
}

/// Polls one stream (the swarm) only when it is due, with a waker of its own that marks it due
/// and wakes the task polling it.
///
/// Code that changes the stream outside its poll (a dial, a publish, a request: they queue work
/// for the next poll without waking anyone) must [`touch`](WhenWoken::touch) it afterwards, or
/// that work waits for the stream's next wake.
#[derive(Debug)]
pub struct WhenWoken {
    due: Arc<Due>,
}

impl Default for WhenWoken {
    fn default() -> Self {
        Self::new()
    }
}

impl WhenWoken {
    /// Due at once (the stream has never been polled).
    pub fn new() -> Self {
        WhenWoken {
            due: Arc::new(Due {
                due: AtomicBool::new(true),
                task: AtomicWaker::new(),
            }),
        }
    }

    /// Marks the stream due: it was changed from outside its poll.
    pub fn touch(&self) {
        self.due.due.store(true, Ordering::Release);
    }

    /// The stream's next item, polling it only while it is due.
    pub fn poll_next<S: Stream + Unpin>(
        &self,
        stream: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<Option<S::Item>> {
        self.poll(cx, |cx| stream.poll_next_unpin(cx))
    }

    /// Runs `poll` (a poll of whatever this gate guards) only while it is due, with the gate's
    /// own waker; a ready result leaves it due (there may be more).
    pub fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.due.task.register(cx.waker());
        if !self.due.due.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = waker_ref(&self.due);
        match poll(&mut Context::from_waker(&waker)) {
            Poll::Ready(item) => {
                self.touch();
                Poll::Ready(item)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// [`poll_next`](WhenWoken::poll_next) as a future (for a `select!` branch).
    pub fn next<'a, S: Stream + Unpin>(
        &'a self,
        stream: &'a mut S,
    ) -> impl Future<Output = Option<S::Item>> + 'a {
        futures_util::future::poll_fn(move |cx| self.poll_next(stream, cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::task::noop_waker_ref;
    use std::sync::atomic::AtomicUsize;
    use std::task::Waker;

    /// A stream that counts its polls, yields what was pushed, and keeps the last waker.
    #[derive(Default)]
    struct Counted {
        polls: usize,
        items: Vec<u32>,
        waker: Option<Waker>,
    }

    impl Stream for Counted {
        type Item = u32;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<u32>> {
            self.polls += 1;
            match self.items.pop() {
                Some(i) => Poll::Ready(Some(i)),
                None => {
                    self.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        }
    }

    /// A waker that counts its wakes (the task's).
    struct Task(AtomicUsize);
    impl ArcWake for Task {
        fn wake_by_ref(arc_self: &Arc<Self>) {
            arc_self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_stream_is_polled_only_when_it_woke_yielded_or_was_touched() {
        let gate = WhenWoken::new();
        let mut s = Counted::default();
        let task = Arc::new(Task(AtomicUsize::new(0)));
        let w = waker_ref(&task);
        let mut cx = Context::from_waker(&w);

        // Due at first: polled, nothing there.
        assert!(gate.poll_next(&mut s, &mut cx).is_pending());
        assert_eq!(s.polls, 1);
        // The task woken for something else: the stream is not polled.
        for _ in 0..5 {
            assert!(gate.poll_next(&mut s, &mut cx).is_pending());
        }
        assert_eq!(s.polls, 1);

        // The stream's own waker fires: the task is woken and the stream polled once.
        s.items.push(7);
        s.waker.take().expect("the stream kept a waker").wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
        assert_eq!(gate.poll_next(&mut s, &mut cx), Poll::Ready(Some(7)));
        assert_eq!(s.polls, 2);
        // An item may be followed by more: polled again.
        assert!(gate.poll_next(&mut s, &mut cx).is_pending());
        assert_eq!(s.polls, 3);
        assert!(gate.poll_next(&mut s, &mut cx).is_pending());
        assert_eq!(s.polls, 3);

        // Changed from outside its poll: touched, so polled.
        s.items.push(9);
        gate.touch();
        assert_eq!(gate.poll_next(&mut s, &mut cx), Poll::Ready(Some(9)));
        assert_eq!(s.polls, 4);
    }

    #[test]
    fn the_task_is_woken_even_when_it_first_polled_with_another_waker() {
        let gate = WhenWoken::new();
        let mut s = Counted::default();
        let mut cx = Context::from_waker(noop_waker_ref());
        assert!(gate.poll_next(&mut s, &mut cx).is_pending());
        // The task now polls with its real waker (a select! re-created the future).
        let task = Arc::new(Task(AtomicUsize::new(0)));
        let w = waker_ref(&task);
        let mut cx = Context::from_waker(&w);
        assert!(gate.poll_next(&mut s, &mut cx).is_pending());
        s.waker.take().expect("the stream kept a waker").wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
    }
}
