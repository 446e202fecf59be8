//! The hub: the cheap-to-clone handle every part of relayhub holds. It owns the backend (memory or Redis),
//! the registries of the worker threads, the bridge's address and the counters, and it is the one publish
//! path: HTTP, client publishes and the poller all call `Hub::publish`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::bridge::Bridge;
use crate::config::Config;
use crate::messages::{
    CatchUp, CloseAll, Dispatch, ForgetLatest, SessionId, Unwatch, UnwatchPattern, Watch,
    WatchPattern,
};
use crate::publication::Publication;
use crate::registry::Registry;
use crate::session::SessionLimits;
use crate::stats::Stats;
use crate::store::Store;

/// Most echoes tracked at once (a bound, not an expected size: entries live for one reconnect).
const MAX_TRACKED_ECHOES: usize = 10_000;

/// Publishes made while the pub/sub link was not live are delivered locally by the publisher; when the link
/// comes back during such a publish, Redis may also echo it. This tracks both sides so each message is
/// delivered once.
#[derive(Default)]
struct Echoes {
    /// Publishes in flight that began while the link was not live, by channel.
    intents: HashMap<Arc<str>, usize>,
    /// Delivered locally by the publisher; the echo, if it comes, is dropped.
    delivered_locally: HashSet<(Arc<str>, u64)>,
    /// Relayed by the bridge while a publish of the channel was in flight; the publisher skips delivering it.
    relayed: HashSet<(Arc<str>, u64)>,
}

impl Echoes {
    fn is_empty(&self) -> bool {
        self.intents.is_empty() && self.delivered_locally.is_empty() && self.relayed.is_empty()
    }
}

/// Adds or removes one subscriber of `key` in a count index and returns the new count (a key at zero is
/// removed; removing from a missing key changes nothing and returns `usize::MAX`, which no caller acts on).
fn count_change(index: &Mutex<HashMap<Arc<str>, usize>>, key: &Arc<str>, join: bool) -> usize {
    let mut map = index.lock().expect("subscriber index poisoned");
    if join {
        let count = map.entry(key.clone()).or_insert(0);
        *count += 1;
        return *count;
    }
    let Some(count) = map.get_mut(key) else {
        return usize::MAX;
    };
    *count -= 1;
    let count = *count;
    if count == 0 {
        map.remove(key);
    }
    count
}

/// Subscriber counts by channel (or pattern).
pub type Counts = Vec<(String, usize)>;

/// What a publish did.
#[derive(Debug, Clone, Copy)]
pub struct PublishOutcome {
    /// The channel's sequence number for this message; `None` when it could only be delivered locally.
    pub seq: Option<u64>,
    /// Memory mode: subscribers on this instance. Redis mode: replicas that received it from Redis.
    pub delivered: u64,
    /// Whether the message went through the shared backend (false: Redis was down, local subscribers only).
    pub relayed: bool,
}

#[derive(Debug, Clone)]
pub enum PublishError {
    /// Nothing could take the message.
    Unavailable(String),
}

/// Told about channels gaining and losing their last local subscriber, and asked to fill empty caches.
/// The poller implements it (auto-start, auto-stop, fetch on subscribe).
pub trait ChannelObserver: Send + Sync {
    /// A channel's local subscriber count changed to `count`.
    fn subscribers_changed(&self, channel: &str, count: usize);
    /// Subscribers are waiting on a channel that had no cached value when it was read at `read_at`. Returns
    /// true when a value is being fetched (or was published after `read_at`) and will reach them shortly.
    fn request_fill(&self, channel: &str, read_at: Instant) -> bool;
}

#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    config: Arc<Config>,
    instance_id: String,
    stats: Stats,
    /// The labeled counters of `GET /metrics`.
    metrics: crate::metrics::Metrics,
    store: Store,
    /// One registry per HTTP worker thread, added as the workers start.
    registries: RwLock<Vec<Addr<Registry>>>,
    bridge: OnceLock<Addr<Bridge>>,
    observer: OnceLock<Arc<dyn ChannelObserver>>,
    /// Local subscribers per exact channel, across all registries.
    subscribers: Mutex<HashMap<Arc<str>, usize>>,
    /// Local subscribers per pattern prefix.
    pattern_subscribers: Mutex<HashMap<Arc<str>, usize>>,
    /// Exactly-once bookkeeping for publishes made while the pub/sub link is not live.
    echoes: Mutex<Echoes>,
    /// Whether `echoes` holds anything (read on every relayed message, so kept lock-free).
    echoes_active: AtomicBool,
    /// Pattern snapshot look-ups allowed to run at once (`channels.max_concurrent_pattern_scans`).
    pattern_scans: tokio::sync::Semaphore,
    shutting_down: AtomicBool,
    next_session: AtomicU64,
    started: Instant,
}

impl Hub {
    pub fn new(config: Arc<Config>, store: Store, instance_id: String) -> Hub {
        let pattern_scans =
            tokio::sync::Semaphore::new(config.channels.max_concurrent_pattern_scans);
        let metrics = crate::metrics::Metrics::new(&config);
        Hub {
            inner: Arc::new(Inner {
                config,
                instance_id,
                stats: Stats::default(),
                metrics,
                store,
                registries: RwLock::new(Vec::new()),
                bridge: OnceLock::new(),
                observer: OnceLock::new(),
                subscribers: Mutex::new(HashMap::new()),
                pattern_subscribers: Mutex::new(HashMap::new()),
                echoes: Mutex::new(Echoes::default()),
                echoes_active: AtomicBool::new(false),
                pattern_scans,
                shutting_down: AtomicBool::new(false),
                next_session: AtomicU64::new(1),
                started: Instant::now(),
            }),
        }
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// The labeled counters of `GET /metrics` (the plain ones are in `stats`).
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.inner.metrics
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn instance_id(&self) -> &str {
        &self.inner.instance_id
    }

    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }

    pub fn next_session_id(&self) -> SessionId {
        self.inner.next_session.fetch_add(1, Ordering::Relaxed)
    }

    pub fn session_limits(&self) -> SessionLimits {
        let ws = &self.inner.config.websocket;
        SessionLimits {
            heartbeat_interval: ws.heartbeat_interval,
            client_timeout: ws.client_timeout,
            max_message_bytes: ws.max_message_bytes,
            max_subscriptions: ws.max_subscriptions_per_connection,
            mailbox_size: ws.mailbox_size,
            max_queued_bytes: ws.max_queued_bytes,
            write_timeout: ws.write_timeout,
            max_patterns: ws.max_patterns_per_connection,
            requests_per_second: f64::from(ws.requests_per_second),
            request_burst: f64::from(ws.request_burst),
            rate_limited_close_after: ws.rate_limited_close_after,
        }
    }

    /// Starts a registry on the calling (worker) thread and adds it to the fan-out list.
    pub fn start_registry(&self) -> Addr<Registry> {
        let addr = Registry::new(self.clone()).start();
        self.inner
            .registries
            .write()
            .expect("registry list lock poisoned")
            .push(addr.clone());
        addr
    }

    pub fn set_bridge(&self, bridge: Addr<Bridge>) {
        let _ = self.inner.bridge.set(bridge);
    }

    pub fn set_observer(&self, observer: Arc<dyn ChannelObserver>) {
        let _ = self.inner.observer.set(observer);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::Relaxed)
    }

    /// Whether a load balancer should send clients here, and if not, why.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.is_shutting_down() {
            return Err("shutting down");
        }
        if self.inner.store.redis().is_some()
            && !self.inner.stats.pubsub_active.load(Ordering::Relaxed)
        {
            return Err("redis pub/sub connection is down");
        }
        Ok(())
    }

    /// Turns `/ready` to 503 and closes every WebSocket with 1001.
    pub fn begin_shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::Relaxed);
        for registry in self.registries().iter() {
            registry.do_send(CloseAll);
        }
    }

    fn registries(&self) -> std::sync::RwLockReadGuard<'_, Vec<Addr<Registry>>> {
        self.inner
            .registries
            .read()
            .expect("registry list lock poisoned")
    }

    fn echoes(&self) -> std::sync::MutexGuard<'_, Echoes> {
        self.inner.echoes.lock().expect("echo bookkeeping poisoned")
    }

    fn update_echoes_active(&self, echoes: &Echoes) {
        self.inner
            .echoes_active
            .store(!echoes.is_empty(), Ordering::SeqCst);
    }

    /// A publish starts while the link is not live: its echo, if one comes, must be told apart.
    fn begin_unlinked_publish(&self, channel: &Arc<str>) {
        let mut echoes = self.echoes();
        *echoes.intents.entry(channel.clone()).or_insert(0) += 1;
        self.update_echoes_active(&echoes);
    }

    /// The script ran: deliver here unless the bridge already relayed its echo, and remember that it was
    /// delivered so a later echo is dropped. Done under the lock the bridge checks, so the two cannot cross.
    fn finish_unlinked_publish(&self, publication: Publication, intent: bool) {
        let mut echoes = self.echoes();
        let channel = publication.channel.clone();
        if intent && let Some(open) = echoes.intents.get_mut(&channel) {
            *open -= 1;
            if *open == 0 {
                echoes.intents.remove(&channel);
            }
        }
        let key = (channel, publication.seq.unwrap_or(0));
        if !echoes.relayed.remove(&key) {
            if echoes.delivered_locally.len() < MAX_TRACKED_ECHOES {
                echoes.delivered_locally.insert(key);
            }
            self.dispatch_local(Arc::new(publication));
        }
        self.update_echoes_active(&echoes);
    }

    fn cancel_unlinked_publish(&self, channel: &Arc<str>) {
        let mut echoes = self.echoes();
        if let Some(open) = echoes.intents.get_mut(channel) {
            *open -= 1;
            if *open == 0 {
                echoes.intents.remove(channel);
            }
        }
        self.update_echoes_active(&echoes);
    }

    /// Whether a message relayed from Redis was already delivered here by its publisher (then drop it).
    pub fn take_local_echo(&self, channel: &Arc<str>, seq: Option<u64>) -> bool {
        let Some(seq) = seq else {
            return false;
        };
        if !self.inner.echoes_active.load(Ordering::SeqCst) {
            return false;
        }
        let mut echoes = self.echoes();
        let key = (channel.clone(), seq);
        let duplicate = echoes.delivered_locally.remove(&key);
        if !duplicate
            && echoes.intents.contains_key(channel)
            && echoes.relayed.len() < MAX_TRACKED_ECHOES
        {
            echoes.relayed.insert(key);
        }
        self.update_echoes_active(&echoes);
        duplicate
    }

    /// The link went down again: echoes of what was delivered before can no longer come.
    pub fn clear_local_echoes(&self) {
        let mut echoes = self.echoes();
        echoes.delivered_locally.clear();
        echoes.relayed.clear();
        self.update_echoes_active(&echoes);
    }

    /// Tells every registry the pub/sub link went down (see `ForgetLatest`).
    pub fn pubsub_link_down(&self) {
        for registry in self.registries().iter() {
            registry.do_send(ForgetLatest);
        }
    }

    /// After a pub/sub outage: reads the cached latest values of `channels` and lets every registry deliver
    /// the ones its subscribers have not seen.
    pub async fn catch_up(&self, channels: Vec<Arc<str>>) {
        let Some(redis) = self.inner.store.redis() else {
            return;
        };
        let mut found = Vec::new();
        for chunk in channels.chunks(500) {
            match redis.latest_many(chunk).await {
                Ok(values) => found.extend(values.into_iter().flatten().map(Arc::new)),
                Err(e) => {
                    log::warn!("catching up after the pub/sub outage failed: {e}");
                    return;
                }
            }
        }
        if found.is_empty() {
            return;
        }
        let found = Arc::new(found);
        for registry in self.registries().iter() {
            registry.do_send(CatchUp(found.clone()));
        }
    }

    /// Hands a message to every local registry: one mailbox push per worker, not per subscriber.
    pub fn dispatch_local(&self, publication: Arc<Publication>) {
        for registry in self.registries().iter() {
            registry.do_send(Dispatch(publication.clone()));
        }
    }

    /// Publishes `data` (valid JSON) to `channel` (a valid name): records it as the latest value and snapshot,
    /// assigns its sequence number and delivers it to every subscriber of every replica exactly once.
    pub async fn publish(&self, channel: &str, data: &str) -> Result<PublishOutcome, PublishError> {
        self.publish_with(channel, data, None).await
    }

    /// `publish` with the cache lifetime overridden (a polling source's `ttl`).
    pub async fn publish_with(
        &self,
        channel: &str,
        data: &str,
        ttl: Option<Duration>,
    ) -> Result<PublishOutcome, PublishError> {
        let mut policy = self
            .config()
            .policy(channel)
            .unwrap_or_else(|| self.config().default_policy());
        if let Some(ttl) = ttl {
            policy.ttl = ttl;
        }
        Stats::add(&self.inner.stats.messages_published, 1);
        self.inner.metrics.published(channel);
        match &self.inner.store {
            Store::Memory(memory) => {
                let publication =
                    memory.publish(channel, data, policy, |p| self.dispatch_local(p.clone()));
                Ok(PublishOutcome {
                    seq: publication.seq,
                    delivered: self.local_subscribers(channel) as u64,
                    relayed: true,
                })
            }
            Store::Redis(redis) => {
                let ts = crate::protocol::now_ts();
                // The echo is certain only if the link was live before the script ran and still is after.
                let live_before = self.inner.stats.pubsub_active.load(Ordering::SeqCst);
                let name: Arc<str> = channel.into();
                if !live_before {
                    self.begin_unlinked_publish(&name);
                }
                match redis.publish(channel, data, &ts, policy).await {
                    Ok(published) => {
                        Stats::add(&self.inner.stats.relayed_out, 1);
                        let live_after = self.inner.stats.pubsub_active.load(Ordering::SeqCst);
                        if !(live_before && live_after) {
                            // The link is (or was) down: deliver here; the bookkeeping drops the echo if the
                            // link comes back in time to relay it, or skips this if it already did.
                            let publication =
                                Publication::new(name, data, Some(published.seq), Some(&ts));
                            self.finish_unlinked_publish(publication, !live_before);
                        }
                        Ok(PublishOutcome {
                            seq: Some(published.seq),
                            delivered: published.receivers,
                            relayed: true,
                        })
                    }
                    Err(e) => {
                        if !live_before {
                            self.cancel_unlinked_publish(&name);
                        }
                        log::warn!(
                            "publish to `{channel}` through redis failed ({e}); delivering locally only"
                        );
                        let publication = Publication::new(channel.into(), data, None, Some(&ts));
                        self.dispatch_local(Arc::new(publication));
                        Ok(PublishOutcome {
                            seq: None,
                            delivered: self.local_subscribers(channel) as u64,
                            relayed: false,
                        })
                    }
                }
            }
        }
    }

    /// The latest value of a channel from the backend (cache-aside source of snapshots and the REST view).
    pub async fn cached_latest(&self, channel: &str) -> Option<Arc<Publication>> {
        match &self.inner.store {
            Store::Memory(memory) => memory.latest(channel),
            Store::Redis(redis) => match redis.latest(channel).await {
                Ok(p) => p.map(Arc::new),
                Err(e) => {
                    log::warn!("reading the cached value of `{channel}` failed: {e}");
                    None
                }
            },
        }
    }

    /// Latest values of channels under a pattern prefix, bounded by `channels.max_pattern_snapshots`; in Redis
    /// mode the look-up examines at most `channels.max_pattern_scan` keys and waits its turn behind
    /// `channels.max_concurrent_pattern_scans` others, so many pattern subscribes cannot take the connection
    /// pool from publishes.
    pub async fn pattern_snapshots(&self, prefix: &str) -> Vec<Arc<Publication>> {
        let channels = &self.config().channels;
        let limit = channels.max_pattern_snapshots;
        match &self.inner.store {
            Store::Memory(memory) => memory.latest_matching(prefix, limit),
            Store::Redis(redis) => {
                let _permit = self
                    .inner
                    .pattern_scans
                    .acquire()
                    .await
                    .expect("the scan semaphore is never closed");
                self.redis_pattern_snapshots(redis, prefix, limit, channels.max_pattern_scan)
                    .await
            }
        }
    }

    async fn redis_pattern_snapshots(
        &self,
        redis: &crate::store::RedisStore,
        prefix: &str,
        limit: usize,
        max_scan: usize,
    ) -> Vec<Arc<Publication>> {
        match redis.latest_matching(prefix, limit, max_scan).await {
            Ok((found, truncated)) => {
                if truncated {
                    Stats::add(&self.inner.stats.pattern_scans_truncated, 1);
                }
                found.into_iter().map(Arc::new).collect()
            }
            Err(e) => {
                log::warn!("reading cached values under `{prefix}*` failed: {e}");
                Vec::new()
            }
        }
    }

    /// Asks the bridge to listen to `channel` now (queued behind every earlier watch and unwatch of this
    /// thread) and returns a future that waits until Redis confirmed it (immediately in memory mode or while
    /// Redis is down, and never longer than `redis.command_timeout`).
    pub fn watch(&self, channel: Arc<str>) -> impl std::future::Future<Output = ()> + 'static {
        let (confirmed, rx) = tokio::sync::oneshot::channel();
        let bridge = self.inner.bridge.get();
        if let Some(bridge) = bridge {
            bridge.do_send(Watch { channel, confirmed });
        }
        let wait = bridge.is_some();
        let timeout = self.config().redis.command_timeout;
        async move {
            if wait {
                let _ = tokio::time::timeout(timeout, rx).await;
            }
        }
    }

    /// `watch` for every channel under a pattern prefix.
    pub fn watch_pattern(
        &self,
        prefix: Arc<str>,
    ) -> impl std::future::Future<Output = ()> + 'static {
        let (confirmed, rx) = tokio::sync::oneshot::channel();
        let bridge = self.inner.bridge.get();
        if let Some(bridge) = bridge {
            bridge.do_send(WatchPattern { prefix, confirmed });
        }
        let wait = bridge.is_some();
        let timeout = self.config().redis.command_timeout;
        async move {
            if wait {
                let _ = tokio::time::timeout(timeout, rx).await;
            }
        }
    }

    pub fn unwatch_pattern(&self, prefix: Arc<str>) {
        if let Some(bridge) = self.inner.bridge.get() {
            bridge.do_send(UnwatchPattern { prefix });
        }
    }

    pub fn unwatch(&self, channel: Arc<str>) {
        if let Some(bridge) = self.inner.bridge.get() {
            bridge.do_send(Unwatch { channel });
        }
    }

    pub fn request_fill(&self, channel: &str, read_at: Instant) -> bool {
        self.inner
            .observer
            .get()
            .is_some_and(|observer| observer.request_fill(channel, read_at))
    }

    pub fn subscriber_joined(&self, channel: &Arc<str>) {
        if count_change(&self.inner.subscribers, channel, true) == 1
            && let Some(observer) = self.inner.observer.get()
        {
            observer.subscribers_changed(channel, 1);
        }
    }

    pub fn subscriber_left(&self, channel: &Arc<str>) {
        if count_change(&self.inner.subscribers, channel, false) == 0
            && let Some(observer) = self.inner.observer.get()
        {
            observer.subscribers_changed(channel, 0);
        }
    }

    pub fn pattern_subscriber_joined(&self, prefix: &Arc<str>) {
        count_change(&self.inner.pattern_subscribers, prefix, true);
    }

    pub fn pattern_subscriber_left(&self, prefix: &Arc<str>) {
        count_change(&self.inner.pattern_subscribers, prefix, false);
    }

    /// Local subscribers of a channel: exact subscriptions plus patterns that match it.
    pub fn local_subscribers(&self, channel: &str) -> usize {
        let exact = self
            .inner
            .subscribers
            .lock()
            .expect("subscriber index poisoned")
            .get(channel)
            .copied()
            .unwrap_or(0);
        let patterns: usize = self
            .inner
            .pattern_subscribers
            .lock()
            .expect("pattern index poisoned")
            .iter()
            .filter(|(prefix, _)| channel.starts_with(&***prefix))
            .map(|(_, n)| *n)
            .sum();
        exact + patterns
    }

    /// Subscriber counts per channel, and per pattern (`prices:*`), for stats.
    pub fn subscriber_counts(&self) -> (Counts, Counts) {
        let exact = self
            .inner
            .subscribers
            .lock()
            .expect("subscriber index poisoned")
            .iter()
            .map(|(c, n)| (c.to_string(), *n))
            .collect();
        let patterns = self
            .inner
            .pattern_subscribers
            .lock()
            .expect("pattern index poisoned")
            .iter()
            .map(|(p, n)| (format!("{p}*"), *n))
            .collect();
        (exact, patterns)
    }
}
