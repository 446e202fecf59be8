//! The Redis engine: the broker seam over one Redis, shared by every replica. Everything Redis-specific lives
//! in this folder: key names ([`keys`]), the Lua scripts, the pooled store ([`store`]), the pubsub-bridge
//! actor that owns the one pub/sub connection with its probes and reconnects ([`bridge`]), the link state
//! ([`link`]), job storage, leases and the fleet's demand and cache reads ([`jobs`]), presence
//! ([`presence`]) and the reads of `redis` polling sources ([`fields`]).

pub mod bridge;
pub mod fields;
pub mod jobs;
pub mod keys;
pub mod link;
pub mod presence;
pub mod pubsub;
pub mod store;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::dev::channel::{self, AddressReceiver};
use actix::prelude::*;
use tokio::sync::oneshot;

use self::bridge::{
    Bridge, BridgeParts, ReleaseIngest, Unwatch, UnwatchPattern, Watch, WatchPattern,
};
use self::jobs::RedisJobs;
use self::link::Link;
use self::presence::RedisPresence;
use self::store::RedisStore;
use crate::core::config::{ChannelPolicy, Config};
use crate::core::ingest::Route;
use crate::core::publication::Publication;
use crate::engine::seam::{
    BrokerEventHandler, EngineError, Held, Job, JobStatus, LinkHealth, Member, PresenceChange,
    PresenceCounts, PresencePage, Published, Put, Reach, ScanReport, Window,
};
use crate::stats::Stats;

struct Shared {
    config: Arc<Config>,
    stats: Arc<Stats>,
    store: Arc<RedisStore>,
    link: Arc<Link>,
    bridge: Addr<Bridge>,
    /// The bridge, until a worker thread runs it ([`RedisEngine::run_listener_here`]).
    unstarted_bridge: Mutex<Option<(AddressReceiver<Bridge>, Bridge)>>,
    jobs: RedisJobs,
    presence: RedisPresence,
    handler: Arc<dyn BrokerEventHandler>,
    /// Pattern snapshot look-ups allowed to run at once (`channels.max_concurrent_pattern_scans`).
    pattern_scans: tokio::sync::Semaphore,
}

/// The bridge's mailbox bound for senders that wait (`do_send`, which every sender here uses, does not).
const BRIDGE_MAILBOX: usize = 16;

/// How often Redis is asked for a PING while the pub/sub link is down. One probe per replica, whatever the
/// number of `/ready` requests: a balancer (or a stranger) polling it costs Redis nothing.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// While the link is down, PINGs Redis through the pool so readiness can tell "Redis is gone" (every replica
/// alike: stay in) from "this replica's link is broken" (take it out). Ends when the engine is dropped.
async fn probe_while_unlinked(shared: std::sync::Weak<Shared>) {
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.link.is_active() {
            continue;
        }
        let reach = match shared.store.ping().await {
            Ok(()) => Reach::Answering,
            Err(_) => Reach::Unreachable,
        };
        shared.link.set_reach(reach);
    }
}

/// A cheap-to-clone handle on the Redis engine.
#[derive(Clone)]
pub struct RedisEngine {
    shared: Arc<Shared>,
}

impl RedisEngine {
    /// Builds the pool, checks that Redis answers, and starts the pubsub-bridge actor.
    pub async fn connect(
        config: Arc<Config>,
        stats: Arc<Stats>,
        handler: Arc<dyn BrokerEventHandler>,
        routes: Vec<Route>,
        instance_id: &str,
    ) -> Result<RedisEngine, EngineError> {
        let store = Arc::new(RedisStore::connect(&config.redis).await?);
        let client = pubsub::PubSubClient::new(&config.redis)?;
        let link = Arc::new(Link::default());
        // The bridge gets its address now and runs later, on the first worker thread (see
        // `run_listener_here`); what is sent to it meanwhile waits in its mailbox.
        let (sender, receiver) = channel::channel(BRIDGE_MAILBOX);
        let bridge = Addr::new(sender);
        let unstarted = Bridge::new(BridgeParts {
            config: config.clone(),
            stats: stats.clone(),
            store: store.clone(),
            link: link.clone(),
            handler: handler.clone(),
            client,
            routes,
            instance_id: instance_id.to_string(),
        });
        let pattern_scans =
            tokio::sync::Semaphore::new(config.channels.max_concurrent_pattern_scans);
        let cluster = config.redis.is_cluster();
        let shared = Arc::new(Shared {
            config,
            stats,
            store,
            link,
            bridge,
            unstarted_bridge: Mutex::new(Some((receiver, unstarted))),
            jobs: RedisJobs::new(instance_id),
            presence: RedisPresence::new(cluster),
            handler,
            pattern_scans,
        });
        actix::spawn(probe_while_unlinked(Arc::downgrade(&shared)));
        Ok(RedisEngine { shared })
    }

    /// Starts the pubsub-bridge actor on the calling thread, if it is not running yet. Called by every worker
    /// thread as it starts, so the bridge runs on the first one: a message from Redis then reaches that
    /// worker's subscribers without a hop to another thread (with one worker, the usual deployment of one
    /// replica per core, none at all), as a single-threaded relay would deliver it.
    pub fn run_listener_here(&self) {
        let unstarted = self
            .shared
            .unstarted_bridge
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some((receiver, bridge)) = unstarted {
            Context::with_receiver(receiver).run(bridge);
        }
    }

    /// The link's state and, while it is down, whether Redis still answers commands.
    pub fn link_health(&self) -> LinkHealth {
        let link = &self.shared.link;
        LinkHealth {
            linked: link.is_active(),
            ever_linked: link.was_ever_active(),
            reach: link.reach(),
        }
    }

    fn store(&self) -> &RedisStore {
        &self.shared.store
    }

    /// Whether the pub/sub link is live (reported as `pubsub_active`; `/ready` is 503 without it).
    pub fn link_active(&self) -> bool {
        self.shared.link.is_active()
    }

    /// Records and publishes one message through the publish script. The echo from Redis delivers it here
    /// like on every replica, unless the link is (or was, during the script) down: then it is delivered here
    /// directly too, and if the echo still comes, the ordering rule drops whichever copy arrives second (both
    /// carry the seq). If Redis cannot take it, it is delivered to this replica's subscribers only.
    pub async fn publish(
        &self,
        channel: &str,
        data: &str,
        fetched_at: Option<&str>,
        policy: ChannelPolicy,
    ) -> Published {
        let shared = &self.shared;
        let ts = crate::core::protocol::now_ts();
        // The echo is certain only if the link was live before the script ran and still is after.
        let live_before = shared.link.is_active();
        let name: Arc<str> = channel.into();
        match self
            .store()
            .publish(channel, data, &ts, fetched_at, policy)
            .await
        {
            Ok(published) => {
                Stats::add(&shared.stats.relayed_out, 1);
                let live_after = shared.link.is_active();
                if !(live_before && live_after) {
                    let publication = Publication::with_fetched_at(
                        name,
                        data,
                        Some(published.seq),
                        Some(&ts),
                        fetched_at,
                    );
                    shared.handler.on_publication(Arc::new(publication));
                }
                Published {
                    seq: Some(published.seq),
                    receivers: Some(published.receivers),
                    relayed: true,
                }
            }
            Err(e) => {
                log::warn!(
                    "publish to `{channel}` through redis failed ({e}); delivering locally only"
                );
                let publication =
                    Publication::with_fetched_at(name, data, None, Some(&ts), fetched_at);
                shared.handler.on_publication(Arc::new(publication));
                Published {
                    seq: None,
                    receivers: None,
                    relayed: false,
                }
            }
        }
    }

    pub async fn latest(&self, channel: &str) -> Option<Arc<Publication>> {
        match self.store().latest(channel).await {
            Ok(p) => p.map(Arc::new),
            Err(e) => {
                log::warn!("reading the cached value of `{channel}` failed: {e}");
                None
            }
        }
    }

    /// Latest values under a pattern prefix: the look-up examines at most `channels.max_pattern_scan` keys and
    /// waits its turn behind `channels.max_concurrent_pattern_scans` others, so many pattern subscribes cannot
    /// take the connection pool from publishes.
    pub async fn latest_matching(&self, prefix: &str, limit: usize) -> Vec<Arc<Publication>> {
        let _permit = self
            .shared
            .pattern_scans
            .acquire()
            .await
            .expect("the scan semaphore is never closed");
        let max_scan = self.shared.config.channels.max_pattern_scan;
        match self.store().latest_matching(prefix, limit, max_scan).await {
            Ok((found, truncated)) => {
                if truncated {
                    Stats::add(&self.shared.stats.pattern_scans_truncated, 1);
                }
                found.into_iter().map(Arc::new).collect()
            }
            Err(e) => {
                log::warn!("reading cached values under `{prefix}*` failed: {e}");
                Vec::new()
            }
        }
    }

    pub async fn history(
        &self,
        channel: &str,
        limit: usize,
    ) -> Result<Vec<Arc<Publication>>, EngineError> {
        let found = self.store().history(channel, limit).await?;
        Ok(found.into_iter().map(Arc::new).collect())
    }

    pub async fn window(
        &self,
        channel: &str,
        policy: ChannelPolicy,
    ) -> Result<Window, EngineError> {
        self.store().window(channel, policy).await
    }

    /// Asks the bridge to listen to `channel` (queued behind every earlier subscribe and unsubscribe of this
    /// thread); the future resolves once Redis confirmed it, or after `redis.command_timeout`.
    pub fn subscribe(&self, channel: Arc<str>) -> impl std::future::Future<Output = ()> + 'static {
        let (confirmed, rx) = oneshot::channel();
        self.shared.bridge.do_send(Watch { channel, confirmed });
        confirmation(rx, self.shared.config.redis.command_timeout)
    }

    pub fn subscribe_pattern(
        &self,
        prefix: Arc<str>,
    ) -> impl std::future::Future<Output = ()> + 'static {
        let (confirmed, rx) = oneshot::channel();
        self.shared
            .bridge
            .do_send(WatchPattern { prefix, confirmed });
        confirmation(rx, self.shared.config.redis.command_timeout)
    }

    pub fn unsubscribe(&self, channel: Arc<str>) {
        self.shared.bridge.do_send(Unwatch { channel });
    }

    pub fn unsubscribe_pattern(&self, prefix: Arc<str>) {
        self.shared.bridge.do_send(UnwatchPattern { prefix });
    }

    pub async fn release_ingest_routes(&self) {
        let _ = self.shared.bridge.send(ReleaseIngest).await;
    }

    pub async fn read_fields(
        &self,
        commands: &[(String, String)],
    ) -> Result<Vec<serde_json::Value>, String> {
        fields::read(self.store(), commands).await
    }

    pub async fn put_job<J: Job>(&self, spec: &J, max: usize) -> Result<Put, EngineError> {
        self.shared.jobs.put(self.store(), spec, max).await
    }

    pub async fn remove_job(&self, id: &str) -> Result<bool, EngineError> {
        self.shared.jobs.remove(self.store(), id).await
    }

    pub async fn list_jobs<J: Job>(&self) -> Result<Vec<J>, EngineError> {
        self.shared.jobs.list(self.store()).await
    }

    pub async fn acquire(&self, id: &str, lease: Duration) -> Result<bool, EngineError> {
        self.shared
            .jobs
            .hold(self.store(), |keys| keys.lease(id), lease)
            .await
    }

    pub async fn fill_lock(&self, channel: &str, hold: Duration) -> Result<bool, EngineError> {
        self.shared
            .jobs
            .hold(self.store(), |keys| keys.fill_lock(channel), hold)
            .await
    }

    pub async fn release(&self, id: &str) -> Result<(), EngineError> {
        self.shared.jobs.release(self.store(), id).await
    }

    pub async fn owners_and_statuses(
        &self,
        ids: &[String],
    ) -> Result<Vec<(Option<String>, Option<JobStatus>)>, EngineError> {
        self.shared
            .jobs
            .owners_and_statuses(self.store(), ids)
            .await
    }

    pub async fn write_status(
        &self,
        id: &str,
        status: &JobStatus,
        ttl: Duration,
    ) -> Result<(), EngineError> {
        self.shared
            .jobs
            .write_status(self.store(), id, status, ttl)
            .await
    }

    pub async fn holder(&self, id: &str) -> Result<Option<String>, EngineError> {
        self.shared.jobs.holder(self.store(), id).await
    }

    pub async fn take_turn(
        &self,
        budget: &str,
        interval: Duration,
    ) -> Result<Duration, EngineError> {
        self.shared
            .jobs
            .take_turn(self.store(), budget, interval)
            .await
    }

    pub async fn request_refresh(&self, id: &str, hold: Duration) -> Result<(), EngineError> {
        self.shared
            .jobs
            .request_refresh(self.store(), id, hold)
            .await
    }

    pub async fn touch(&self, channel: &str, ttl: Duration) -> Result<(), EngineError> {
        self.shared.jobs.touch(self.store(), channel, ttl).await
    }

    pub async fn scan<J: Job>(
        &self,
        held: &[Held],
        lease: Duration,
        local_count: impl Fn(&str) -> usize,
    ) -> Result<ScanReport<J>, EngineError> {
        self.shared
            .jobs
            .scan(self.store(), held, lease, local_count)
            .await
    }

    pub async fn record_demand(
        &self,
        counts: &[(String, usize)],
        hold: Duration,
    ) -> Result<(), EngineError> {
        self.shared
            .jobs
            .record_demand(self.store(), counts, hold)
            .await
    }

    pub async fn add_cache_reads(&self, deltas: &[(String, u64, u64)]) -> Result<(), EngineError> {
        self.shared.jobs.add_cache_reads(self.store(), deltas).await
    }

    pub async fn cache_reads(&self, sources: &[String]) -> Result<Vec<(u64, u64)>, EngineError> {
        self.shared.jobs.cache_reads(self.store(), sources).await
    }

    pub async fn demand(&self, ids: &[String]) -> Result<Vec<usize>, EngineError> {
        self.shared.jobs.demand(self.store(), ids).await
    }

    pub async fn apply_presence(&self, changes: &[PresenceChange]) -> Result<(), EngineError> {
        let ttl = self.shared.config.channels.presence_ttl;
        self.shared.presence.apply(self.store(), changes, ttl).await
    }

    pub async fn refresh_presence(
        &self,
        members: &[(Arc<str>, Vec<Member>)],
    ) -> Result<(), EngineError> {
        let ttl = self.shared.config.channels.presence_ttl;
        self.shared
            .presence
            .refresh(self.store(), members, ttl, |c| self.announces(c))
            .await
    }

    pub async fn presence(&self, channel: &str, limit: usize) -> Result<PresencePage, EngineError> {
        self.shared
            .presence
            .read(self.store(), channel, limit, self.announces(channel))
            .await
    }

    pub async fn presence_counts(&self, channel: &str) -> Result<PresenceCounts, EngineError> {
        self.shared
            .presence
            .counts(self.store(), channel, self.announces(channel))
            .await
    }

    /// Whether the channel's namespace tells its subscribers of joins and leaves.
    fn announces(&self, channel: &str) -> bool {
        self.shared
            .config
            .policy(channel)
            .is_some_and(|p| p.join_leave)
    }
}

/// Waits for Redis to confirm a subscription, never longer than `timeout` (local delivery never waits on a
/// Redis that does not answer).
async fn confirmation(rx: oneshot::Receiver<()>, timeout: Duration) {
    let _ = tokio::time::timeout(timeout, rx).await;
}
