//! The queue of encoded frames waiting for one connection's socket.
//!
//! Producers (the connection's registry during a fan-out, its session when it answers) push `Bytes` that are
//! usually shared with every other subscriber; the connection's transport swaps the whole queue out and writes
//! it with one vectored `write`. Pushing allocates nothing (the queue keeps its capacity) and wakes the writer
//! only when the queue stops being empty, so a burst of deliveries costs one wake-up and, as far as the socket
//! takes it, one syscall.
//!
//! The bound is the slow-consumer signal: a client that stops reading fills its socket buffer, then this queue,
//! and the push that finds it full tells the producer to drop the client. It is counted in frames and in bytes
//! (a few large messages weigh as much as many small ones); the bytes include the batch the writer has taken
//! and not yet written, so a connection never holds more than the byte bound, however its queue is split.
//!
//! Below the bound there is a high-water mark at half of it: past that the transport stops reading the
//! client's requests until the queue drains, so a client that pipelines requests and reads its answers is
//! slowed down, never mistaken for a slow consumer.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;

use bytes::Bytes;

use crate::core::frame;

/// One connection's outgoing queue. Cloning shares it.
///
/// A `Mutex` rather than a `RefCell`: the registry keeps these in actor state that actix requires to be
/// `Send`. Producer and writer run on the same worker thread, so the lock is never contended.
#[derive(Clone)]
pub struct Outbox(Arc<Mutex<Queue>>);

struct Queue {
    frames: VecDeque<Bytes>,
    /// Frames that may wait here before the client counts as slow.
    limit: usize,
    /// Bytes queued here or taken by the writer and not yet written.
    bytes: usize,
    /// Bytes that may be owed to the client before it counts as slow.
    max_bytes: usize,
    /// The writer, parked while the queue is empty.
    waker: Option<Waker>,
    /// A close frame is queued (or the connection is gone): nothing more is accepted.
    closing: bool,
    /// The code of the close frame queued, if one was (the disconnect counters are by close code).
    close_code: Option<u16>,
}

/// The queue is full: the client has stopped reading.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

impl Outbox {
    /// A queue for at most `limit` frames and `max_bytes` bytes (one frame is always accepted into an empty
    /// queue, however large).
    pub fn new(limit: usize, max_bytes: usize) -> Outbox {
        Outbox(Arc::new(Mutex::new(Queue {
            frames: VecDeque::new(),
            limit: limit.max(1),
            bytes: 0,
            max_bytes,
            waker: None,
            closing: false,
            close_code: None,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic elsewhere while holding the lock leaves a queue that is still consistent.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues an encoded frame. Frames offered after a close are dropped without error (the connection is on
    /// its way out and its registry hears of it separately).
    pub fn push(&self, frame: Bytes) -> Result<(), Full> {
        let mut queue = self.lock();
        if queue.closing {
            return Ok(());
        }
        if queue.frames.len() >= queue.limit
            || (queue.bytes > 0 && queue.bytes + frame.len() > queue.max_bytes)
        {
            return Err(Full);
        }
        queue.bytes += frame.len();
        queue.frames.push_back(frame);
        if queue.frames.len() == 1
            && let Some(waker) = &queue.waker
        {
            waker.wake_by_ref();
        }
        Ok(())
    }

    /// Queues a frame the connection itself owes the client (an answer, a pong, a heartbeat ping); a full
    /// queue closes the connection as a slow consumer.
    pub fn push_or_close(&self, frame: Bytes) {
        if self.push(frame) == Err(Full) {
            self.close_slow_consumer();
        }
    }

    /// Queues a text frame built from `json`, as [`Outbox::push_or_close`].
    pub fn push_text(&self, json: &str) {
        self.push_or_close(frame::text(json));
    }

    /// Closes with 1008: the client stopped reading.
    pub fn close_slow_consumer(&self) -> bool {
        self.close(crate::core::protocol::close::POLICY, SLOW_CONSUMER)
    }

    /// Queues a close frame behind what is queued and accepts nothing after it. Returns false when the
    /// connection was already closing.
    pub fn close(&self, code: u16, reason: &str) -> bool {
        let mut queue = self.lock();
        if queue.closing {
            return false;
        }
        queue.closing = true;
        queue.close_code = Some(code);
        let close = frame::close(code, reason);
        queue.bytes += close.len();
        queue.frames.push_back(close);
        if let Some(waker) = &queue.waker {
            waker.wake_by_ref();
        }
        true
    }

    /// The code of the close frame queued, `None` when the connection ended without one.
    pub fn close_code(&self) -> Option<u16> {
        self.lock().close_code
    }

    /// Whether a close has been queued (or the connection is gone).
    pub fn is_closing(&self) -> bool {
        self.lock().closing
    }

    /// Past the high-water mark (half the bound in frames or in bytes): the connection should stop taking
    /// requests from its client until the queue drains.
    pub fn backlogged(&self) -> bool {
        let queue = self.lock();
        queue.frames.len() * 2 >= queue.limit || queue.bytes * 2 >= queue.max_bytes
    }

    /// Writer side: `n` bytes of the taken frames reached the socket.
    pub(super) fn written(&self, n: usize) {
        let mut queue = self.lock();
        queue.bytes = queue.bytes.saturating_sub(n);
    }

    /// Writer side: moves every queued frame into `into` (empty on entry) and reports whether the queue is
    /// closing. With nothing queued, parks `waker` until the next push.
    pub(super) fn take(&self, into: &mut VecDeque<Bytes>, waker: &Waker) -> bool {
        let mut queue = self.lock();
        if queue.frames.is_empty() {
            match &queue.waker {
                Some(parked) if parked.will_wake(waker) => {}
                _ => queue.waker = Some(waker.clone()),
            }
        } else {
            // Swapping keeps both buffers' capacity: neither side allocates in steady state.
            std::mem::swap(into, &mut queue.frames);
        }
        queue.closing
    }

    /// The connection is gone: drop what is queued and accept nothing more.
    pub(super) fn shut(&self) {
        let mut queue = self.lock();
        queue.closing = true;
        queue.frames = VecDeque::new();
        queue.bytes = 0;
        queue.waker = None;
    }
}

/// The close reason sent to a client whose queue overflowed.
const SLOW_CONSUMER: &str = "slow consumer: messages were not read in time";

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn one_wake_per_batch_and_a_bound() {
        let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        let outbox = Outbox::new(3, 1 << 20);
        let mut taken = VecDeque::new();
        assert!(!outbox.take(&mut taken, &waker));
        assert!(taken.is_empty());
        for _ in 0..3 {
            outbox.push(Bytes::from_static(b"x")).unwrap();
        }
        assert_eq!(outbox.push(Bytes::from_static(b"x")), Err(Full));
        assert_eq!(
            counter.0.load(Ordering::SeqCst),
            1,
            "woken once for three frames"
        );
        outbox.take(&mut taken, &waker);
        assert_eq!(taken.len(), 3);
        // The queue is empty again: the next frame wakes the writer again.
        outbox.push(Bytes::from_static(b"y")).unwrap();
        assert_eq!(counter.0.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn close_goes_last_and_ends_the_queue() {
        let outbox = Outbox::new(8, 1 << 20);
        outbox.push(frame::text("a")).unwrap();
        assert!(outbox.close(1001, "bye"));
        assert!(!outbox.close(1000, "again"));
        outbox.push(frame::text("late")).unwrap();
        let waker = Waker::from(Arc::new(CountingWaker(AtomicUsize::new(0))));
        let mut taken = VecDeque::new();
        assert!(outbox.take(&mut taken, &waker));
        assert_eq!(taken.len(), 2);
        assert_eq!(taken[1], frame::close(1001, "bye"));
    }

    #[test]
    fn bytes_are_bounded_including_the_batch_being_written() {
        let outbox = Outbox::new(100, 10);
        let waker = Waker::from(Arc::new(CountingWaker(AtomicUsize::new(0))));
        // One frame always fits an empty queue, whatever its size.
        outbox.push(Bytes::from(vec![0; 25])).unwrap();
        assert_eq!(outbox.push(Bytes::from_static(b"x")), Err(Full));
        // Taken by the writer but not written: still owed, still counted.
        let mut taken = VecDeque::new();
        outbox.take(&mut taken, &waker);
        assert_eq!(outbox.push(Bytes::from_static(b"x")), Err(Full));
        assert!(outbox.backlogged());
        outbox.written(20);
        assert_eq!(outbox.push(Bytes::from_static(b"abcd")), Ok(()));
        assert!(outbox.backlogged(), "9 of 10 bytes");
        outbox.written(5);
        assert!(!outbox.backlogged(), "4 of 10 bytes");
        assert_eq!(outbox.push(Bytes::from_static(b"toolong")), Err(Full));
        assert_eq!(outbox.push(Bytes::from_static(b"fits12")), Ok(()));
    }
}
