//! The in-memory backend: per-channel sequence, latest value and last N snapshots, bounded by
//! `channels.max_channels` and `channels.max_memory` (least recently published evicted first), with expired
//! channels reclaimed when touched and by a periodic sweep. A real implementation, used when there is no
//! Redis; it serves exactly one instance.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::core::config::ChannelPolicy;
use crate::core::publication::Publication;
use crate::engine::seam::{Window, history_cutoff, within};

/// Bookkeeping bytes counted per channel and per kept message on top of their frames (map entries, index
/// entries, the allocations' own headers): an estimate, so the bound holds for many tiny values too.
const CHANNEL_OVERHEAD: usize = 192;
const MESSAGE_OVERHEAD: usize = 64;

/// Expired channels reclaimed by one publish on the way (the periodic sweep does the rest).
const SWEEP_ON_PUBLISH: usize = 8;

struct Entry {
    seq: u64,
    /// Newest first; the latest value is `history[0]`.
    history: VecDeque<Arc<Publication>>,
    expires: Instant,
    /// Position in the eviction order.
    tick: u64,
    /// Bytes this channel is counted for.
    bytes: usize,
}

fn message_bytes(p: &Publication) -> usize {
    p.size() + MESSAGE_OVERHEAD
}

#[derive(Default)]
struct Inner {
    channels: HashMap<Arc<str>, Entry>,
    /// tick -> channel, oldest publish first.
    order: BTreeMap<u64, Arc<str>>,
    /// (expiry, tick) -> channel, soonest first: what the sweep looks at.
    expiry: BTreeMap<(Instant, u64), Arc<str>>,
    next_tick: u64,
    /// Sum of every entry's `bytes`.
    bytes: usize,
}

impl Inner {
    fn remove(&mut self, channel: &str) -> Option<Entry> {
        let entry = self.channels.remove(channel)?;
        self.order.remove(&entry.tick);
        self.expiry.remove(&(entry.expires, entry.tick));
        self.bytes -= entry.bytes;
        Some(entry)
    }

    /// Removes up to `limit` expired channels; returns how many.
    fn sweep(&mut self, now: Instant, limit: usize) -> u64 {
        let mut reclaimed = 0;
        while reclaimed < limit as u64 {
            let Some((&(expires, _), channel)) = self.expiry.first_key_value() else {
                break;
            };
            if expires > now {
                break;
            }
            let channel = channel.clone();
            self.remove(&channel);
            reclaimed += 1;
        }
        reclaimed
    }
}

pub struct MemoryStore {
    inner: Mutex<Inner>,
    max_channels: usize,
    max_memory: usize,
    /// Channels evicted to stay within the bounds (reported by `/api/stats` as `store_evictions`).
    evictions: AtomicU64,
    /// Expired channels reclaimed (`store_expired`).
    expired: AtomicU64,
    /// Chosen at start: a restarted process numbers from 1 again under another epoch.
    started_as: u64,
}

impl MemoryStore {
    pub fn new(max_channels: usize, max_memory: usize) -> MemoryStore {
        MemoryStore {
            inner: Mutex::new(Inner::default()),
            max_channels,
            max_memory,
            evictions: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            started_as: crate::core::random::u64(),
        }
    }

    /// The epoch of every channel: this process's, and how many channels it dropped so far. A dropped channel
    /// (evicted or expired) numbers from 1 again, so every drop changes the epoch: coarse (other channels'
    /// clients lose recovery too) but never a replay of another message under a seq already seen.
    fn epoch(&self) -> Arc<str> {
        let dropped = self.evictions.load(Ordering::Relaxed) + self.expired.load(Ordering::Relaxed);
        format!("{:x}-{dropped}", self.started_as).into()
    }

    /// The channel's epoch, newest seq, latest value and the history younger than `history_ttl`.
    pub fn window(&self, channel: &str, history_ttl: std::time::Duration) -> Window {
        let mut inner = self.lock();
        let live = self.live(&mut inner, channel);
        let epoch = self.epoch();
        let cutoff = history_cutoff(history_ttl);
        match inner.channels.get(channel).filter(|_| live) {
            Some(entry) => Window {
                epoch,
                seq: entry.seq,
                latest: entry.history.front().cloned(),
                history: entry
                    .history
                    .iter()
                    .take_while(|p| within(p.ts(), cutoff))
                    .cloned()
                    .collect(),
            },
            None => Window {
                epoch,
                seq: 0,
                latest: None,
                history: Vec::new(),
            },
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("memory store lock poisoned")
    }

    /// Assigns the next sequence number, records the message and hands it to `deliver` while still holding
    /// the lock, so concurrent publishers of one channel are delivered in sequence order.
    #[cfg(test)]
    pub fn publish(
        &self,
        channel: &str,
        data: &str,
        policy: ChannelPolicy,
        deliver: impl FnOnce(&Arc<Publication>),
    ) -> Arc<Publication> {
        self.publish_fetched(channel, data, None, policy, deliver)
    }

    /// `publish` of a polled value that carries its fetch time (`meta = true`).
    pub fn publish_fetched(
        &self,
        channel: &str,
        data: &str,
        fetched_at: Option<&str>,
        policy: ChannelPolicy,
        deliver: impl FnOnce(&Arc<Publication>),
    ) -> Arc<Publication> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        inner.next_tick += 1;
        let tick = inner.next_tick;
        let now = Instant::now();
        let keep = policy.history_size.max(1);
        let (name, seq) = match inner.channels.get(channel) {
            Some(entry) if entry.expires <= now => {
                // Expired: its values go, its sequence carries on.
                let (name, seq) = (
                    inner
                        .order
                        .get(&entry.tick)
                        .cloned()
                        .unwrap_or_else(|| channel.into()),
                    entry.seq,
                );
                inner.remove(channel);
                self.expired.fetch_add(1, Ordering::Relaxed);
                (name, seq + 1)
            }
            Some(entry) => (
                inner
                    .order
                    .get(&entry.tick)
                    .cloned()
                    .unwrap_or_else(|| channel.into()),
                entry.seq + 1,
            ),
            None => (Arc::from(channel), 1),
        };
        let publication = Arc::new(Publication::with_fetched_at(
            name.clone(),
            data,
            Some(seq),
            Some(&crate::core::protocol::now_ts()),
            fetched_at,
        ));
        let added = message_bytes(&publication);
        let expires = now + policy.ttl;
        match inner.channels.get_mut(&name) {
            Some(entry) => {
                let mut bytes = entry.bytes + added;
                entry.history.push_front(publication.clone());
                while entry.history.len() > keep {
                    if let Some(old) = entry.history.pop_back() {
                        bytes -= message_bytes(&old);
                    }
                }
                inner.bytes = inner.bytes + bytes - entry.bytes;
                entry.bytes = bytes;
                entry.seq = seq;
                inner.order.remove(&entry.tick);
                inner.expiry.remove(&(entry.expires, entry.tick));
                entry.tick = tick;
                entry.expires = expires;
            }
            None => {
                let mut history = VecDeque::with_capacity(keep);
                history.push_front(publication.clone());
                let bytes = CHANNEL_OVERHEAD + name.len() + added;
                inner.bytes += bytes;
                inner.channels.insert(
                    name.clone(),
                    Entry {
                        seq,
                        history,
                        expires,
                        tick,
                        bytes,
                    },
                );
            }
        }
        inner.order.insert(tick, name.clone());
        inner.expiry.insert((expires, tick), name.clone());
        let reclaimed = inner.sweep(now, SWEEP_ON_PUBLISH);
        self.expired.fetch_add(reclaimed, Ordering::Relaxed);
        self.enforce_bounds(inner, &name);
        deliver(&publication);
        publication
    }

    /// Evicts the least recently published channels until both bounds hold. The channel just published is
    /// kept: when it alone is over the byte bound, its older snapshots go instead.
    fn enforce_bounds(&self, inner: &mut Inner, current: &Arc<str>) {
        while inner.channels.len() > self.max_channels || inner.bytes > self.max_memory {
            let oldest = inner.order.first_key_value().map(|(_, c)| c.clone());
            match oldest {
                Some(oldest) if oldest != *current => {
                    inner.remove(&oldest);
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    let Some(entry) = inner.channels.get_mut(current) else {
                        return;
                    };
                    if entry.history.len() <= 1 {
                        // One message is bounded by `websocket.max_message_bytes`, far below the bound.
                        return;
                    }
                    if let Some(old) = entry.history.pop_back() {
                        let freed = message_bytes(&old);
                        entry.bytes -= freed;
                        inner.bytes -= freed;
                    }
                }
            }
        }
    }

    /// Makes a live channel expire `ttl` from now, never sooner than it would have.
    pub fn touch(&self, channel: &str, ttl: Duration) {
        let mut inner = self.lock();
        if !self.live(&mut inner, channel) {
            return;
        }
        let expires = Instant::now() + ttl;
        let inner = &mut *inner;
        let Some((name, entry)) = inner.channels.get_key_value(channel) else {
            return;
        };
        let (name, old, tick) = (name.clone(), entry.expires, entry.tick);
        if expires > old {
            inner.expiry.remove(&(old, tick));
            inner.expiry.insert((expires, tick), name.clone());
            if let Some(entry) = inner.channels.get_mut(&name) {
                entry.expires = expires;
            }
        }
    }

    /// Reclaims up to `limit` expired channels (the periodic sweep; bounded work while holding the lock).
    pub fn sweep(&self, limit: usize) {
        let reclaimed = self.lock().sweep(Instant::now(), limit);
        self.expired.fetch_add(reclaimed, Ordering::Relaxed);
    }

    /// Removes `channel` when it has expired (reclaimed on access); true when it is live.
    fn live(&self, inner: &mut Inner, channel: &str) -> bool {
        match inner.channels.get(channel) {
            Some(entry) if entry.expires <= Instant::now() => {
                inner.remove(channel);
                self.expired.fetch_add(1, Ordering::Relaxed);
                false
            }
            Some(_) => true,
            None => false,
        }
    }

    /// The latest value, unless it has expired.
    pub fn latest(&self, channel: &str) -> Option<Arc<Publication>> {
        let mut inner = self.lock();
        if !self.live(&mut inner, channel) {
            return None;
        }
        inner.channels.get(channel)?.history.front().cloned()
    }

    /// Up to `limit` snapshots, newest first.
    pub fn history(&self, channel: &str, limit: usize) -> Vec<Arc<Publication>> {
        let mut inner = self.lock();
        if !self.live(&mut inner, channel) {
            return Vec::new();
        }
        match inner.channels.get(channel) {
            Some(entry) => entry.history.iter().take(limit).cloned().collect(),
            None => Vec::new(),
        }
    }

    /// Latest values of channels starting with `prefix`, at most `limit`.
    pub fn latest_matching(&self, prefix: &str, limit: usize) -> Vec<Arc<Publication>> {
        let inner = self.lock();
        let now = Instant::now();
        inner
            .channels
            .iter()
            .filter(|(name, entry)| name.starts_with(prefix) && entry.expires > now)
            .filter_map(|(_, entry)| entry.history.front().cloned())
            .take(limit)
            .collect()
    }

    /// Channels with a value (expired ones not reclaimed yet included).
    pub fn len(&self) -> usize {
        self.lock().channels.len()
    }

    /// Bytes counted against `channels.max_memory`.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Channels evicted to stay within the bounds.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Expired channels reclaimed.
    pub fn expired(&self) -> u64 {
        self.expired.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn policy(history_size: usize, ttl: Duration) -> ChannelPolicy {
        ChannelPolicy {
            client_publish: false,
            patterns: false,
            anonymous: true,
            private: false,
            ttl,
            history_size,
            history_ttl: Duration::from_secs(600),
            slow_consumer: crate::core::config::SlowConsumer::Disconnect,
            presence: false,
            join_leave: false,
        }
    }

    #[test]
    fn sequence_history_and_eviction() {
        let store = MemoryStore::new(2, 1 << 20);
        let p = policy(2, Duration::from_secs(60));
        for i in 0..3 {
            store.publish("a", &i.to_string(), p, |_| {});
        }
        let latest = store.latest("a").unwrap();
        assert_eq!((latest.seq, latest.data()), (Some(3), "2"));
        let h: Vec<_> = store
            .history("a", 10)
            .iter()
            .map(|p| p.data().to_string())
            .collect();
        assert_eq!(h, ["2", "1"]);
        store.publish("b", "1", p, |_| {});
        store.publish("a", "3", p, |_| {}); // a is now the most recent
        store.publish("c", "1", p, |_| {}); // evicts b
        assert!(store.latest("b").is_none());
        assert!(store.latest("a").is_some());
        assert_eq!(store.len(), 2);
    }

    #[test]
    fn expiry() {
        let store = MemoryStore::new(10, 1 << 20);
        store.publish("a", "1", policy(3, Duration::from_millis(0)), |_| {});
        assert!(store.latest("a").is_none());
        assert!(store.history("a", 3).is_empty());
        assert_eq!((store.len(), store.bytes(), store.expired()), (0, 0, 1));
    }

    #[test]
    fn bytes_stay_within_the_bound() {
        let store = MemoryStore::new(1000, 100_000);
        let p = policy(3, Duration::from_secs(60));
        let big = "1".repeat(5_000);
        for i in 0..100 {
            store.publish(&format!("c{i}"), &big, p, |_| {});
            assert!(store.bytes() <= 100_000);
        }
        assert!(store.latest("c99").is_some() && store.latest("c0").is_none());
        assert!(store.evictions() > 70);
        // One channel with a long history trims its own snapshots rather than exceed the bound.
        let store = MemoryStore::new(10, 70_000);
        for _ in 0..20 {
            store.publish(
                "a",
                &"2".repeat(30_000),
                policy(10, Duration::from_secs(60)),
                |_| {},
            );
        }
        assert!(store.bytes() <= 70_000);
        assert_eq!(store.latest("a").unwrap().seq, Some(20));
    }
}
