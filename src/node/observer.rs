//! What the node tells about its channels to whoever acts on them: channels gaining and losing their last
//! local subscriber, and subscribers waiting on an empty cache. The poller implements it (auto-start,
//! auto-stop, fetch on subscribe); registries get it at construction.

use std::time::Instant;

pub trait ChannelObserver: Send + Sync {
    /// A channel's local subscriber count changed to `count`.
    fn subscribers_changed(&self, channel: &str, count: usize);
    /// Subscribers are waiting on a channel that had no cached value when it was read at `read_at`. Returns
    /// true when a value is being fetched (or was published after `read_at`) and will reach them shortly.
    fn request_fill(&self, channel: &str, read_at: Instant) -> bool;
    /// Of the subscribes to `channel` just served, `hits` found a cached value and `misses` found none
    /// (the cache-aside reads, counted per polling source).
    fn cache_read(&self, _channel: &str, _hits: u64, _misses: u64) {}
}
