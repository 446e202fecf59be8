//! `websocket.write_delay`: one timer per worker thread holds back the writes of every connection on it.
//!
//! Without a delay, a connection is woken as soon as its queue stops being empty, and at moderate rates each
//! delivery is then one wake-up and one `write`, most of whose cost is the kernel's. With a delay, the push
//! that makes a queue non-empty hands the queue to its thread's [`Coalescer`] instead of waking the writer;
//! when the coalescer's tick ends, it wakes every connection handed to it since, and each writes its whole
//! queue with one `writev`.
//!
//! One timer per thread rather than one per connection: a timer per connection costs a timer-wheel entry and
//! an extra wake-up (to arm it) per batch, which at a few frames per batch is a large part of what the delay is
//! meant to save. The price is alignment: a frame waits until the thread's current tick ends, so at most
//! `write_delay` and sometimes less, and every connection that is waiting writes at that tick.
//!
//! A queue is handed over at most once per tick (a flag in the queue), so what a tick holds is bounded by the
//! connections of its thread, whatever the clients do.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// What waits for a tick: a connection's queue, whose writer the tick wakes.
pub trait Waiting: Send + Sync {
    /// The tick ended: wake the writer.
    fn release(&self);
}

/// The write timer of one worker thread.
pub struct Coalescer {
    delay: Duration,
    /// Queues waiting for the end of the current tick.
    waiting: Mutex<Vec<Arc<dyn Waiting>>>,
    /// Starts a tick when the first queue of one is handed over.
    start: Notify,
}

thread_local! {
    /// This thread's coalescer and the delay it was made for.
    static THIS_THREAD: RefCell<Option<Arc<Coalescer>>> = const { RefCell::new(None) };
}

impl Coalescer {
    /// The coalescer of the calling thread, made (and its timer task spawned on the thread's runtime) on first
    /// use; `None` when `delay` is zero. Must be called inside a runtime with a local task set, as every
    /// actix worker is.
    pub fn for_this_thread(delay: Duration) -> Option<Arc<Coalescer>> {
        if delay.is_zero() {
            return None;
        }
        THIS_THREAD.with(|cell| {
            let mut cell = cell.borrow_mut();
            if let Some(existing) = cell.as_ref().filter(|c| c.delay == delay) {
                return Some(existing.clone());
            }
            let coalescer = Arc::new(Coalescer {
                delay,
                waiting: Mutex::new(Vec::new()),
                start: Notify::new(),
            });
            tokio::task::spawn_local(coalescer.clone().run());
            *cell = Some(coalescer.clone());
            Some(coalescer)
        })
    }

    /// Holds `outbox`'s writer back until the end of the current tick (starting one if none runs). The
    /// outbox calls this at most once per tick.
    pub(super) fn defer(&self, queue: Arc<dyn Waiting>) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if waiting.is_empty() {
            self.start.notify_one();
        }
        waiting.push(queue);
    }

    /// Queues waiting for the current tick (tests).
    #[cfg(test)]
    pub(super) fn waiting(&self) -> usize {
        self.waiting.lock().unwrap().len()
    }

    async fn run(self: Arc<Self>) {
        // Swapped with the waiting list at each tick: neither allocates in steady state.
        let mut due = Vec::new();
        loop {
            self.start.notified().await;
            tokio::time::sleep(self.delay).await;
            std::mem::swap(
                &mut due,
                &mut *self.waiting.lock().unwrap_or_else(|p| p.into_inner()),
            );
            // Outside the list's lock: each release takes its queue's lock, and a push holding a queue's
            // lock may be waiting for the list's.
            for queue in due.drain(..) {
                queue.release();
            }
        }
    }
}
