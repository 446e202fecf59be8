//! The in-memory backend: per-channel sequence, latest value and last N snapshots, bounded by
//! `channels.max_channels` (least recently published evicted first). A real implementation, used when there
//! is no Redis; it serves exactly one instance.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::ChannelPolicy;
use crate::publication::Publication;

struct Entry {
    seq: u64,
    /// Newest first; the latest value is `history[0]`.
    history: VecDeque<Arc<Publication>>,
    expires: Instant,
    /// Position in the eviction order.
    tick: u64,
}

#[derive(Default)]
struct Inner {
    channels: HashMap<Arc<str>, Entry>,
    /// tick -> channel, oldest publish first.
    order: BTreeMap<u64, Arc<str>>,
    next_tick: u64,
}

pub struct MemoryStore {
    inner: Mutex<Inner>,
    max_channels: usize,
}

impl MemoryStore {
    pub fn new(max_channels: usize) -> MemoryStore {
        MemoryStore {
            inner: Mutex::new(Inner::default()),
            max_channels,
        }
    }

    /// Assigns the next sequence number, records the message and hands it to `deliver` while still holding
    /// the lock, so concurrent publishers of one channel are delivered in sequence order.
    pub fn publish(
        &self,
        channel: &str,
        data: &str,
        policy: ChannelPolicy,
        deliver: impl FnOnce(&Arc<Publication>),
    ) -> Arc<Publication> {
        let mut inner = self.inner.lock().expect("memory store lock poisoned");
        let inner = &mut *inner;
        inner.next_tick += 1;
        let tick = inner.next_tick;
        let now = Instant::now();
        let publication = match inner.channels.get_mut(channel) {
            Some(entry) => {
                if entry.expires <= now {
                    entry.history.clear();
                }
                entry.seq += 1;
                let publication = Arc::new(Publication::new(
                    entry
                        .history
                        .front()
                        .map_or_else(|| channel.into(), |p| p.channel.clone()),
                    data,
                    Some(entry.seq),
                    Some(&crate::protocol::now_ts()),
                ));
                entry.history.push_front(publication.clone());
                entry.history.truncate(policy.history_size.max(1));
                entry.expires = now + policy.ttl;
                inner.order.remove(&entry.tick);
                entry.tick = tick;
                inner.order.insert(tick, publication.channel.clone());
                publication
            }
            None => {
                let name: Arc<str> = channel.into();
                let publication = Arc::new(Publication::new(
                    name.clone(),
                    data,
                    Some(1),
                    Some(&crate::protocol::now_ts()),
                ));
                let mut history = VecDeque::with_capacity(policy.history_size.max(1));
                history.push_front(publication.clone());
                inner.channels.insert(
                    name.clone(),
                    Entry {
                        seq: 1,
                        history,
                        expires: now + policy.ttl,
                        tick,
                    },
                );
                inner.order.insert(tick, name);
                while inner.channels.len() > self.max_channels {
                    let Some((_, oldest)) = inner.order.pop_first() else {
                        break;
                    };
                    inner.channels.remove(&oldest);
                }
                publication
            }
        };
        deliver(&publication);
        publication
    }

    /// The latest value, unless it has expired.
    pub fn latest(&self, channel: &str) -> Option<Arc<Publication>> {
        let inner = self.inner.lock().expect("memory store lock poisoned");
        let entry = inner.channels.get(channel)?;
        if entry.expires <= Instant::now() {
            return None;
        }
        entry.history.front().cloned()
    }

    /// Up to `limit` snapshots, newest first.
    pub fn history(&self, channel: &str, limit: usize) -> Vec<Arc<Publication>> {
        let inner = self.inner.lock().expect("memory store lock poisoned");
        match inner.channels.get(channel) {
            Some(entry) if entry.expires > Instant::now() => {
                entry.history.iter().take(limit).cloned().collect()
            }
            _ => Vec::new(),
        }
    }

    /// Latest values of channels starting with `prefix`, at most `limit`.
    pub fn latest_matching(&self, prefix: &str, limit: usize) -> Vec<Arc<Publication>> {
        let inner = self.inner.lock().expect("memory store lock poisoned");
        let now = Instant::now();
        inner
            .channels
            .iter()
            .filter(|(name, entry)| name.starts_with(prefix) && entry.expires > now)
            .filter_map(|(_, entry)| entry.history.front().cloned())
            .take(limit)
            .collect()
    }

    /// Channels with a value.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .expect("memory store lock poisoned")
            .channels
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
            ttl,
            history_size,
        }
    }

    #[test]
    fn sequence_history_and_eviction() {
        let store = MemoryStore::new(2);
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
        let store = MemoryStore::new(10);
        store.publish("a", "1", policy(3, Duration::from_millis(0)), |_| {});
        assert!(store.latest("a").is_none());
        assert!(store.history("a", 3).is_empty());
    }
}
