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
//! A connection whose channels are latest-value feeds can be kept instead ([`Outbox::push_latest`]): past the
//! bound, each channel keeps only its newest pending frame in a slot beside the queue, replaced by every newer
//! one, and the writer takes the slots behind the queued frames. There is at most one slot per channel and
//! at most [`Outbox::with_slots`] of them (the connection's subscription bound), so what such a connection
//! holds is bounded by its subscriptions, however much is published. What it owes its client (answers, pings)
//! is never conflated: past the bound it is still queued, in order, within a second, equal bound.
//!
//! Below the bound there is a high-water mark at half of it: past that the transport stops reading the
//! client's requests until the queue drains, so a client that pipelines requests and reads its answers is
//! slowed down, never mistaken for a slow consumer.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;

use bytes::Bytes;

use super::coalesce::{Coalescer, Waiting};
use crate::core::frame;
use crate::core::publication::Publication;

/// One connection's outgoing queue. Cloning shares it.
///
/// A `Mutex` rather than a `RefCell`: the registry keeps these in actor state that actix requires to be
/// `Send`. Producer and writer run on the same worker thread, so the lock is never contended.
/// Beside the queue, what kind of frames the connection takes: fixed for its life, so the registry reads it
/// without the lock.
#[derive(Clone)]
pub struct Outbox(Arc<Mutex<Queue>>, Flavor);

/// What kind of frames a connection takes.
#[derive(Debug, Clone, Copy)]
struct Flavor {
    /// A raw endpoint: messages as their `data` alone, no protocol replies.
    raw: bool,
    /// The latest value goes first on subscribing (off for endpoints with `snapshot = false`).
    snapshots: bool,
}

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
    /// Past the bound, the newest pending frame of each conflated channel (by name), in no order.
    latest: HashMap<Arc<str>, Bytes>,
    /// Bytes held in `latest`.
    latest_bytes: usize,
    /// Most slots in `latest`.
    max_slots: usize,
    /// With `write_delay`: the thread's timer, which wakes the writer instead of the push.
    coalescer: Option<Arc<Coalescer>>,
    /// The queue is with `coalescer`, waiting for its tick.
    deferred: bool,
}

/// Where [`Outbox::push_latest`] put a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    /// In the queue, like any frame.
    Queued,
    /// In its channel's slot, which was empty.
    Pending,
    /// In its channel's slot, in place of an older frame that will never be sent.
    Replaced,
}

/// The queue is full: the client has stopped reading.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

impl Outbox {
    /// A queue for at most `limit` frames and `max_bytes` bytes (one frame is always accepted into an empty
    /// queue, however large).
    pub fn new(limit: usize, max_bytes: usize) -> Outbox {
        Outbox(
            Arc::new(Mutex::new(Queue {
                frames: VecDeque::new(),
                limit: limit.max(1),
                bytes: 0,
                max_bytes,
                waker: None,
                closing: false,
                close_code: None,
                latest: HashMap::new(),
                latest_bytes: 0,
                max_slots: limit.max(1),
                coalescer: None,
                deferred: false,
            })),
            Flavor {
                raw: false,
                snapshots: true,
            },
        )
    }

    /// A connection of an endpoint: with `raw`, its messages are their `data` alone and it gets no protocol
    /// replies; without `snapshots`, no latest value is sent when it subscribes.
    pub fn with_flavor(self, raw: bool, snapshots: bool) -> Outbox {
        Outbox(self.0, Flavor { raw, snapshots })
    }

    /// Whether this connection takes raw frames.
    pub fn is_raw(&self) -> bool {
        self.1.raw
    }

    /// A message's frame for this connection, shared by every connection of its kind.
    pub fn message_frame(&self, publication: &Publication) -> Bytes {
        publication.wire_for(self.1.raw)
    }

    /// A snapshot's frame for this connection; `None` when it takes no snapshots.
    pub fn snapshot_frame(&self, publication: &Publication) -> Option<Bytes> {
        self.1
            .snapshots
            .then(|| publication.snapshot_wire_for(self.1.raw))
    }

    /// Queues a protocol reply (an acknowledgement) as [`Outbox::push`]; a raw connection does not speak the
    /// protocol and gets none.
    pub fn push_reply(&self, frame: Bytes) -> Result<(), Full> {
        if self.1.raw {
            return Ok(());
        }
        self.push(frame)
    }

    /// At most `slots` channels wait in slots past the bound (one per subscription; default: `limit`).
    pub fn with_slots(self, slots: usize) -> Outbox {
        self.lock().max_slots = slots.max(1);
        self
    }

    /// The writer is woken by `coalescer`'s tick rather than by the push that makes the queue non-empty
    /// (`websocket.write_delay`). A close is never held back.
    pub fn with_coalescer(self, coalescer: Option<Arc<Coalescer>>) -> Outbox {
        self.lock().coalescer = coalescer;
        self
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
        self.push_if(frame, Queue::fits)
    }

    /// Queues `frame` when `fits` lets it in (dropped without error after a close).
    fn push_if(&self, frame: Bytes, fits: impl Fn(&Queue, &Bytes) -> bool) -> Result<(), Full> {
        let mut queue = self.lock();
        if queue.closing {
            return Ok(());
        }
        if !fits(&queue, &frame) {
            return Err(Full);
        }
        self.enqueue(&mut queue, frame);
        Ok(())
    }

    /// Queues a message frame of `channel` for a connection that is kept when it falls behind: past the
    /// bound the frame waits in the channel's slot, replacing an older one there; while a slot is taken, every
    /// newer frame of its channel goes there too, so a channel's frames never overtake each other. `Full`
    /// only when the slots are over the bounds as well.
    pub fn push_latest(&self, channel: &Arc<str>, frame: Bytes) -> Result<Pushed, Full> {
        let mut queue = self.lock();
        if queue.closing {
            return Ok(Pushed::Queued);
        }
        if queue.latest.is_empty() || !queue.latest.contains_key(channel) {
            if queue.fits(&frame) {
                self.enqueue(&mut queue, frame);
                return Ok(Pushed::Queued);
            }
            if queue.latest.len() >= queue.max_slots {
                return Err(Full);
            }
            queue.latest_bytes += frame.len();
            queue.latest.insert(channel.clone(), frame);
            return Ok(Pushed::Pending);
        }
        let queue = &mut *queue;
        let slot = queue
            .latest
            .get_mut(channel)
            .expect("looked up above, under the same lock");
        queue.latest_bytes = queue.latest_bytes - slot.len() + frame.len();
        *slot = frame;
        Ok(Pushed::Replaced)
    }

    /// Queues a frame the connection itself owes the client (an answer, a pong, a heartbeat ping); a full
    /// queue closes the connection as a slow consumer, unless the connection is being conflated (a channel
    /// waits in a slot): then the frame is queued past the bound, as [`Outbox::push_owed`] does.
    pub fn push_or_close(&self, frame: Bytes) {
        let mut queue = self.lock();
        if queue.closing {
            return;
        }
        if queue.fits(&frame) || (!queue.latest.is_empty() && queue.fits_owed(&frame)) {
            self.enqueue(&mut queue, frame);
            return;
        }
        drop(queue);
        self.close_slow_consumer();
    }

    /// Queues a frame owed to a client of a conflating namespace (a subscribe answer, an `epoch` frame) that
    /// found the queue at its bound. Answers are never conflated: each one is queued, in order (so a channel's
    /// answer still comes before its snapshot, which may wait in a slot), past the bound by at most the
    /// number of slots in frames and once more the byte bound in bytes. They are few: past the high-water mark
    /// the connection reads no requests. Beyond that, `Full` (the caller closes the connection). None on a
    /// raw connection.
    pub fn push_owed(&self, frame: Bytes) -> Result<(), Full> {
        if self.1.raw {
            return Ok(());
        }
        self.push_if(frame, Queue::fits_owed)
    }

    /// Queues a text frame built from `json` (a protocol reply), as [`Outbox::push_or_close`]; none on a raw
    /// connection.
    pub fn push_text(&self, json: &str) {
        if self.1.raw {
            return;
        }
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
        if !queue.frames.is_empty() {
            // Swapping keeps both buffers' capacity: neither side allocates in steady state.
            std::mem::swap(into, &mut queue.frames);
        }
        if !queue.latest.is_empty() && !queue.closing {
            // Behind what was queued: each slot is newer than any queued frame of its channel.
            let queue = &mut *queue;
            queue.bytes += queue.latest_bytes;
            queue.latest_bytes = 0;
            into.extend(queue.latest.drain().map(|(_, frame)| frame));
        }
        if into.is_empty() {
            match &queue.waker {
                Some(parked) if parked.will_wake(waker) => {}
                _ => queue.waker = Some(waker.clone()),
            }
        }
        queue.closing
    }

    /// Queues `frame` and, when the queue stops being empty, wakes the writer (or has the coalescer wake it
    /// at its tick).
    fn enqueue(&self, queue: &mut Queue, frame: Bytes) {
        queue.bytes += frame.len();
        queue.frames.push_back(frame);
        if queue.frames.len() > 1 {
            return;
        }
        // No waker: the writer has not parked yet and takes the queue when it first runs.
        let Some(waker) = &queue.waker else {
            return;
        };
        match &queue.coalescer {
            Some(coalescer) => {
                if !queue.deferred {
                    queue.deferred = true;
                    coalescer.defer(self.0.clone());
                }
            }
            None => waker.wake_by_ref(),
        }
    }

    /// The connection is gone: drop what is queued and accept nothing more.
    pub(super) fn shut(&self) {
        let mut queue = self.lock();
        queue.closing = true;
        queue.frames = VecDeque::new();
        queue.bytes = 0;
        queue.waker = None;
        queue.latest = HashMap::new();
        queue.latest_bytes = 0;
    }
}

/// The coalescer's tick ended: the writer takes what is queued.
impl Waiting for Mutex<Queue> {
    fn release(&self) {
        let mut queue = self.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        queue.deferred = false;
        if let Some(waker) = &queue.waker {
            waker.wake_by_ref();
        }
    }
}

impl Queue {
    /// Whether `frame` may join the queue (one frame always fits an empty queue, however large).
    fn fits(&self, frame: &Bytes) -> bool {
        self.frames.len() < self.limit
            && (self.bytes == 0 || self.bytes + frame.len() <= self.max_bytes)
    }

    /// Whether an owed frame may join the queue past its bound ([`Outbox::push_owed`]): at most `max_slots`
    /// frames and `max_bytes` bytes beyond it.
    fn fits_owed(&self, frame: &Bytes) -> bool {
        self.frames.len() < self.limit + self.max_slots
            && self.bytes + frame.len() <= 2 * self.max_bytes
    }
}

/// The close reason sent to a client whose queue overflowed.
const SLOW_CONSUMER: &str = "slow consumer: messages were not read in time";

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;
    use std::time::Duration;

    /// A waker that counts its wake-ups.
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
    fn past_the_bound_each_channel_keeps_its_newest_frame_behind_the_queue() {
        let outbox = Outbox::new(2, 1 << 20);
        let waker = Waker::from(Arc::new(CountingWaker(AtomicUsize::new(0))));
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let f = |s: &'static str| Bytes::from_static(s.as_bytes());
        assert_eq!(outbox.push_latest(&a, f("a1")), Ok(Pushed::Queued));
        assert_eq!(outbox.push_latest(&b, f("b1")), Ok(Pushed::Queued));
        assert_eq!(outbox.push_latest(&a, f("a2")), Ok(Pushed::Pending));
        assert_eq!(outbox.push_latest(&a, f("a3")), Ok(Pushed::Replaced));
        assert_eq!(outbox.push_latest(&b, f("b2")), Ok(Pushed::Pending));
        // A third channel: two slots are the most (by default the frame bound), so this one is over it.
        assert_eq!(outbox.push_latest(&"c".into(), f("c1")), Err(Full));
        let mut taken = VecDeque::new();
        assert!(!outbox.take(&mut taken, &waker));
        let mut slots: Vec<_> = taken.iter().skip(2).cloned().collect();
        slots.sort();
        assert_eq!(
            taken.iter().take(2).cloned().collect::<Vec<_>>(),
            [f("a1"), f("b1")]
        );
        assert_eq!(slots, [f("a3"), f("b2")]);
        // Drained: frames queue again, and a slot is taken only past the bound.
        outbox.written(8);
        assert_eq!(outbox.push_latest(&a, f("a4")), Ok(Pushed::Queued));
        assert!(!outbox.is_closing());
    }

    #[test]
    fn a_conflated_connection_queues_what_it_owes_in_order_within_a_second_bound() {
        let outbox = Outbox::new(2, 1 << 20).with_slots(2);
        let a: Arc<str> = "a".into();
        let f = |s: &'static str| Bytes::from_static(s.as_bytes());
        outbox.push_latest(&a, f("a1")).unwrap();
        outbox.push_latest(&a, f("a2")).unwrap();
        assert_eq!(outbox.push_latest(&a, f("a3")), Ok(Pushed::Pending));
        // Past the bound: answers are queued, in order, and never replace one another.
        assert_eq!(outbox.push_owed(f("ack1")), Ok(()));
        outbox.push_or_close(f("pong"));
        assert!(!outbox.is_closing());
        // The second bound (two more frames): the next one is refused, and an own frame closes.
        assert_eq!(outbox.push_owed(f("ack2")), Err(Full));
        assert!(!outbox.is_closing());
        let waker: Waker = Arc::new(CountingWaker(AtomicUsize::new(0))).into();
        let mut taken = VecDeque::new();
        outbox.take(&mut taken, &waker);
        assert_eq!(
            taken.into_iter().collect::<Vec<_>>(),
            [f("a1"), f("a2"), f("ack1"), f("pong"), f("a3")],
            "answers after what was queued before them, the slot behind"
        );
        outbox.push_latest(&a, f("a4")).unwrap();
        outbox.push_latest(&a, f("a5")).unwrap();
        outbox.push_latest(&a, f("a6")).unwrap();
        outbox.push_or_close(f("ping"));
        outbox.push_or_close(f("ping"));
        outbox.push_or_close(f("ping"));
        assert!(outbox.is_closing(), "past the second bound");
        // Not conflated: a full queue closes at once.
        let plain = Outbox::new(1, 1 << 20);
        plain.push_or_close(frame::ping());
        plain.push_or_close(frame::ping());
        assert!(plain.is_closing());
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

    fn parked(coalescer: &Arc<Coalescer>) -> (Outbox, Arc<CountingWaker>) {
        let outbox = Outbox::new(16, 1 << 20).with_coalescer(Some(coalescer.clone()));
        let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let mut taken = VecDeque::new();
        outbox.take(&mut taken, &Waker::from(counter.clone()));
        (outbox, counter)
    }

    #[test]
    fn with_a_coalescer_pushes_wake_no_writer_until_the_tick_then_each_once() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&runtime, async {
            let delay = Duration::from_millis(20);
            assert!(Coalescer::for_this_thread(Duration::ZERO).is_none());
            let coalescer = Coalescer::for_this_thread(delay).unwrap();
            assert!(Arc::ptr_eq(
                &coalescer,
                &Coalescer::for_this_thread(delay).unwrap()
            ));
            let (a, a_wakes) = parked(&coalescer);
            let (b, b_wakes) = parked(&coalescer);
            for _ in 0..3 {
                a.push(Bytes::from_static(b"a")).unwrap();
            }
            b.push(Bytes::from_static(b"b")).unwrap();
            assert_eq!(a_wakes.0.load(Ordering::SeqCst), 0, "held until the tick");
            assert_eq!(coalescer.waiting(), 2, "once per queue");
            tokio::time::sleep(delay * 3).await;
            assert_eq!(a_wakes.0.load(Ordering::SeqCst), 1);
            assert_eq!(b_wakes.0.load(Ordering::SeqCst), 1);

            // Taken and written: the next frame waits for the next tick.
            let mut taken = VecDeque::new();
            a.take(&mut taken, &Waker::from(a_wakes.clone()));
            assert_eq!(taken.len(), 3);
            a.push(Bytes::from_static(b"a")).unwrap();
            assert_eq!(a_wakes.0.load(Ordering::SeqCst), 1);
            tokio::time::sleep(delay * 3).await;
            assert_eq!(a_wakes.0.load(Ordering::SeqCst), 2);

            // A close is never held back.
            b.take(&mut VecDeque::new(), &Waker::from(b_wakes.clone()));
            assert!(b.close(1000, "bye"));
            assert_eq!(b_wakes.0.load(Ordering::SeqCst), 2);
        });
    }
}
