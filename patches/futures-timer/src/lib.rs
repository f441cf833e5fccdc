//! Gleaner's futures-timer 3: the same [`Delay`] (`new`, `reset`, a future of `()`), on tokio's
//! timer instead of a thread of its own.
//!
//! libp2p times nearly everything with futures-timer: the swarm's idle connections and stream
//! negotiations, gossipsub's heartbeat, ping, identify, Kademlia's queries, futures-bounded's
//! timeouts. futures-timer keeps its timers on a global thread: each `Delay::new` and `reset`
//! hands the timer to that thread and unparks it, and each deadline wakes the runtime from it, a
//! futex and a context switch each way. In a space of 100 nodes that thread and its wake-ups were
//! a quarter of what an idle node spends (docs/BENCHMARKS.md). Every libp2p future in Gleaner runs
//! on a tokio runtime with its timer enabled, so the root Cargo.toml patches this crate in for the
//! whole workspace: a deadline is a [`tokio::time::Sleep`] on the runtime that first polls it,
//! fired by that runtime's own timer wheel.
//!
//! A `Delay` must therefore be polled (not made: it reads no runtime until polled) inside a tokio
//! runtime with time enabled; one whose deadline passed is ready wherever it is polled.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// A future that is ready once its deadline has passed, and every time it is polled after.
pub struct Delay {
    deadline: Instant,
    /// Made on the first poll that finds the deadline ahead, inside the runtime polling it.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// `dur` from now, or a deadline so far ahead it never comes if that does not fit an `Instant`.
fn deadline(dur: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(dur)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 86_400)))
        .unwrap_or(now)
}

impl Delay {
    /// A delay ready `dur` from now.
    pub fn new(dur: Duration) -> Delay {
        Delay {
            deadline: deadline(dur),
            sleep: None,
        }
    }

    /// Moves the deadline to `dur` from now, whether or not the old one has passed.
    pub fn reset(&mut self, dur: Duration) {
        self.deadline = deadline(dur);
        if let Some(sleep) = self.sleep.as_mut() {
            sleep.as_mut().reset(self.deadline.into());
        }
    }
}

impl Future for Delay {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if Instant::now() >= this.deadline {
            return Poll::Ready(());
        }
        let at = this.deadline.into();
        this.sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)))
            .as_mut()
            .poll(cx)
    }
}

impl fmt::Debug for Delay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delay")
            .field("deadline", &self.deadline)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `d` is ready now, without waiting.
    fn ready(d: &mut Delay) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        Pin::new(d).poll(&mut cx).is_ready()
    }

    #[tokio::test(start_paused = true)]
    async fn a_delay_fires_at_its_deadline_and_stays_ready() {
        let mut d = Delay::new(Duration::from_secs(10));
        assert!(!ready(&mut d));
        assert!(
            tokio::time::timeout(Duration::from_secs(9), &mut d)
                .await
                .is_err(),
            "ready a second early"
        );
        tokio::time::timeout(Duration::from_secs(2), &mut d)
            .await
            .expect("ready at its deadline");
        assert!(ready(&mut d), "and ready after it");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_moves_the_deadline() {
        let mut d = Delay::new(Duration::from_secs(10));
        assert!(!ready(&mut d));
        d.reset(Duration::from_secs(30));
        assert!(
            tokio::time::timeout(Duration::from_secs(20), &mut d)
                .await
                .is_err(),
            "ready at its old deadline"
        );
        tokio::time::timeout(Duration::from_secs(11), &mut d)
            .await
            .expect("ready at its new deadline");
    }

    #[test]
    fn delays_start_no_timer_thread() {
        // futures-timer's own timers run on a thread it starts at the first `Delay` and names
        // "futures-timer". Counted by name: the test harness starts and ends threads meanwhile.
        let timer_threads = || {
            std::fs::read_dir("/proc/self/task")
                .expect("this process's threads")
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|name| name.trim() == "futures-timer")
                .count()
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime");
        rt.block_on(async {
            let mut delays: Vec<Delay> = (1..=100)
                .map(|i| Delay::new(Duration::from_millis(i)))
                .collect();
            for d in &mut delays {
                d.reset(Duration::from_millis(1));
            }
            for d in delays {
                d.await;
            }
        });
        assert_eq!(timer_threads(), 0, "a timer thread was started");
    }
}
