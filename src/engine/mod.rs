//! The broker seam: everything a shared backend does for the node, behind one type. Publish (atomically with
//! its sequence number, latest value and history), subscribe and unsubscribe channels and patterns, read
//! latest values and history, store polling jobs with their leases and the fleet's demand for them, and keep
//! channel presence (members of every replica, with `join` and `leave`). The engine reports what it hears
//! through [`BrokerEventHandler`], which the node implements and hands over at construction, so the engine
//! never imports the node and nothing is filled in late.
//!
//! One enum rather than a trait object: the backends are known, the publish path is not boxed, and generic
//! job storage stays possible. Only this file matches its variants; the composition root (`app`) is the only
//! place that names a concrete engine. A new backend is a folder beside `memory/` and `redis/` and one arm
//! per method here.

pub mod memory;
pub mod redis;
pub mod seam;

use std::sync::Arc;
use std::time::Duration;

use self::memory::MemoryEngine;
use self::redis::RedisEngine;
pub use self::seam::{
    BrokerEventHandler, EngineError, Held, Job, JobStatus, LinkHealth, Member, MemoryUsage,
    PresenceChange, PresenceCounts, PresencePage, Published, Put, Reach, ScanReport, Window,
};
use crate::core::config::ChannelPolicy;
use crate::core::publication::Publication;

/// The backend chosen at start; a cheap-to-clone handle.
#[derive(Clone)]
pub enum Engine {
    Memory(MemoryEngine),
    Redis(RedisEngine),
}

impl From<MemoryEngine> for Engine {
    fn from(engine: MemoryEngine) -> Engine {
        Engine::Memory(engine)
    }
}

impl From<RedisEngine> for Engine {
    fn from(engine: RedisEngine) -> Engine {
        Engine::Redis(engine)
    }
}

impl Engine {
    /// `memory` or `redis`, as stats report it.
    pub fn mode(&self) -> &'static str {
        match self {
            Engine::Memory(_) => "memory",
            Engine::Redis(_) => "redis",
        }
    }

    /// Runs the backend's listener (the pubsub-bridge actor) on the calling worker thread unless one already
    /// does; memory mode has none.
    pub fn run_listener_here(&self) {
        if let Engine::Redis(r) = self {
            r.run_listener_here();
        }
    }

    /// Whether the pub/sub link to a shared backend is live (`pubsub_active`; memory has no link: false).
    pub fn link_active(&self) -> bool {
        match self {
            Engine::Memory(_) => false,
            Engine::Redis(r) => r.link_active(),
        }
    }

    /// A shared backend's link state (`None` in memory mode, which has no link).
    pub fn link_health(&self) -> Option<LinkHealth> {
        match self {
            Engine::Memory(_) => None,
            Engine::Redis(r) => Some(r.link_health()),
        }
    }

    /// Whether the backend is shared with other replicas (pub/sub link state is then meaningful).
    pub fn is_shared(&self) -> bool {
        matches!(self, Engine::Redis(_))
    }

    /// What the in-memory backend holds; `None` for a shared backend (Redis's own INFO says it).
    pub fn memory_usage(&self) -> Option<MemoryUsage> {
        match self {
            Engine::Memory(m) => Some(m.usage()),
            Engine::Redis(_) => None,
        }
    }

    /// Records `data` as the channel's latest value and snapshot with its next sequence number, and delivers
    /// it to every subscriber of every replica exactly once (this replica's through the handler).
    pub async fn publish(
        &self,
        channel: &str,
        data: &str,
        fetched_at: Option<&str>,
        policy: ChannelPolicy,
    ) -> Published {
        match self {
            Engine::Memory(m) => m.publish(channel, data, fetched_at, policy),
            Engine::Redis(r) => r.publish(channel, data, fetched_at, policy).await,
        }
    }

    /// The latest value of a channel (a failed read logs and counts as none).
    pub async fn latest(&self, channel: &str) -> Option<Arc<Publication>> {
        match self {
            Engine::Memory(m) => m.latest(channel),
            Engine::Redis(r) => r.latest(channel).await,
        }
    }

    /// Latest values of channels under a pattern prefix, at most `limit`.
    pub async fn latest_matching(&self, prefix: &str, limit: usize) -> Vec<Arc<Publication>> {
        match self {
            Engine::Memory(m) => m.latest_matching(prefix, limit),
            Engine::Redis(r) => r.latest_matching(prefix, limit).await,
        }
    }

    /// Up to `limit` of a channel's snapshots, newest first.
    pub async fn history(
        &self,
        channel: &str,
        limit: usize,
    ) -> Result<Vec<Arc<Publication>>, EngineError> {
        match self {
            Engine::Memory(m) => Ok(m.history(channel, limit)),
            Engine::Redis(r) => r.history(channel, limit).await,
        }
    }

    /// The channel's epoch, newest seq, latest value and history (younger than `history_ttl`), read in one
    /// atomic step; the epoch is created here when the channel has none yet.
    pub async fn window(
        &self,
        channel: &str,
        policy: ChannelPolicy,
    ) -> Result<Window, EngineError> {
        match self {
            Engine::Memory(m) => Ok(m.window(channel, policy)),
            Engine::Redis(r) => r.window(channel, policy).await,
        }
    }

    /// Starts relaying a channel's messages from the backend to this replica, in the order of this thread's
    /// subscribes and unsubscribes; the future resolves once the backend confirmed it (at once in memory).
    pub fn subscribe(&self, channel: Arc<str>) -> impl std::future::Future<Output = ()> + 'static {
        let redis = match self {
            Engine::Memory(_) => None,
            Engine::Redis(r) => Some(r.subscribe(channel)),
        };
        async move {
            if let Some(confirmed) = redis {
                confirmed.await;
            }
        }
    }

    /// `subscribe` for every channel under a pattern prefix.
    pub fn subscribe_pattern(
        &self,
        prefix: Arc<str>,
    ) -> impl std::future::Future<Output = ()> + 'static {
        let redis = match self {
            Engine::Memory(_) => None,
            Engine::Redis(r) => Some(r.subscribe_pattern(prefix)),
        };
        async move {
            if let Some(confirmed) = redis {
                confirmed.await;
            }
        }
    }

    pub fn unsubscribe(&self, channel: Arc<str>) {
        if let Engine::Redis(r) = self {
            r.unsubscribe(channel);
        }
    }

    pub fn unsubscribe_pattern(&self, prefix: Arc<str>) {
        if let Engine::Redis(r) = self {
            r.unsubscribe_pattern(prefix);
        }
    }

    /// Shutting down: stop taking `[[ingest]]` routes into the sequenced path and hand their leases back, so
    /// another replica takes them at its next renewal instead of after a whole lease.
    pub async fn release_ingest_routes(&self) {
        if let Engine::Redis(r) = self {
            r.release_ingest_routes().await;
        }
    }

    /// Runs each `(command, key)` read of a `redis` polling source and returns the replies as JSON.
    pub async fn read_fields(
        &self,
        commands: &[(String, String)],
    ) -> Result<Vec<serde_json::Value>, String> {
        match self {
            Engine::Memory(_) => {
                Err("redis sources need Redis (the hub runs in memory mode)".into())
            }
            Engine::Redis(r) => r.read_fields(commands).await,
        }
    }

    /// Records a job unless `max` jobs are stored; starting one that exists changes nothing (same id from any
    /// replica), even at the limit.
    pub async fn put_job<J: Job>(&self, spec: &J, max: usize) -> Result<Put, EngineError> {
        match self {
            Engine::Memory(m) => Ok(m.put_job(spec, max)),
            Engine::Redis(r) => r.put_job(spec, max).await,
        }
    }

    /// Removes a job; returns whether it existed.
    pub async fn remove_job(&self, id: &str) -> Result<bool, EngineError> {
        match self {
            Engine::Memory(m) => Ok(m.remove_job(id)),
            Engine::Redis(r) => r.remove_job(id).await,
        }
    }

    /// Every job of the fleet.
    pub async fn list_jobs<J: Job>(&self) -> Result<Vec<J>, EngineError> {
        match self {
            Engine::Memory(m) => Ok(m.list_jobs()),
            Engine::Redis(r) => r.list_jobs().await,
        }
    }

    /// Tries to become the job's owner for `lease`.
    pub async fn acquire(&self, id: &str, lease: Duration) -> Result<bool, EngineError> {
        match self {
            Engine::Memory(_) => Ok(true),
            Engine::Redis(r) => r.acquire(id, lease).await,
        }
    }

    /// A short fleet-wide lock so one replica fills an empty cache for many concurrent subscribers.
    pub async fn fill_lock(&self, channel: &str, hold: Duration) -> Result<bool, EngineError> {
        match self {
            Engine::Memory(_) => Ok(true),
            Engine::Redis(r) => r.fill_lock(channel, hold).await,
        }
    }

    /// Gives the job up at once, so another replica takes it without waiting for the lease to expire.
    pub async fn release(&self, id: &str) -> Result<(), EngineError> {
        match self {
            Engine::Memory(_) => Ok(()),
            Engine::Redis(r) => r.release(id).await,
        }
    }

    /// Owner replica and last reported status of each job.
    pub async fn owners_and_statuses(
        &self,
        ids: &[String],
    ) -> Result<Vec<(Option<String>, Option<JobStatus>)>, EngineError> {
        match self {
            Engine::Memory(m) => Ok(m.owners_and_statuses(ids)),
            Engine::Redis(r) => r.owners_and_statuses(ids).await,
        }
    }

    /// Publishes the owner's view of a job, kept for `ttl` (a dead owner's status fades).
    pub async fn write_status(
        &self,
        id: &str,
        status: &JobStatus,
        ttl: Duration,
    ) -> Result<(), EngineError> {
        match self {
            Engine::Memory(m) => {
                m.write_status(id, status);
                Ok(())
            }
            Engine::Redis(r) => r.write_status(id, status, ttl).await,
        }
    }

    /// Takes a turn of the request budget `budget` (requests spaced `interval` apart, shared by every
    /// replica of a shared backend): zero when the request may go now, else how long to wait first.
    pub async fn take_turn(
        &self,
        budget: &str,
        interval: Duration,
    ) -> Result<Duration, EngineError> {
        match self {
            Engine::Memory(m) => Ok(m.take_turn(budget, interval)),
            Engine::Redis(r) => r.take_turn(budget, interval).await,
        }
    }

    /// Asks the owner replica of a job to fetch at once; its next scan takes the request (which expires after
    /// `hold`). In memory mode every job is this replica's, so there is nobody to ask.
    pub async fn request_refresh(&self, id: &str, hold: Duration) -> Result<(), EngineError> {
        match self {
            Engine::Memory(_) => Ok(()),
            Engine::Redis(r) => r.request_refresh(id, hold).await,
        }
    }

    /// Keeps a channel's cached value for `ttl` more without publishing (an unchanged polled value).
    pub async fn touch(&self, channel: &str, ttl: Duration) -> Result<(), EngineError> {
        match self {
            Engine::Memory(m) => {
                m.touch(channel, ttl);
                Ok(())
            }
            Engine::Redis(r) => r.touch(channel, ttl).await,
        }
    }

    /// The replica holding a job's lease, if any.
    pub async fn holder(&self, id: &str) -> Result<Option<String>, EngineError> {
        match self {
            Engine::Memory(_) => Ok(None),
            Engine::Redis(r) => r.holder(id).await,
        }
    }

    /// Lists the jobs, renews the leases of those this replica runs (`held`), tries to take the others, and
    /// reports the fleet-wide demand of every job: `local_count` answers for this replica (its subscribers of
    /// a job's channel, patterns included), recorded for `lease` so a replica that dies stops counting.
    pub async fn scan<J: Job>(
        &self,
        held: &[Held],
        lease: Duration,
        local_count: impl Fn(&str) -> usize,
    ) -> Result<ScanReport<J>, EngineError> {
        match self {
            Engine::Memory(m) => m.scan(held, local_count),
            Engine::Redis(r) => r.scan(held, lease, local_count).await,
        }
    }

    /// The subscribers of each job's channel on every replica, as last recorded; `None` in memory mode,
    /// where this replica is the fleet (its own counts answer).
    pub async fn demand(&self, ids: &[String]) -> Result<Option<Vec<usize>>, EngineError> {
        match self {
            Engine::Memory(_) => Ok(None),
            Engine::Redis(r) => r.demand(ids).await.map(Some),
        }
    }

    /// Records this replica's subscribers of some jobs' channels now rather than at its next scan (a first
    /// subscriber counts for the owner's `auto_stop` at once), held for `hold`.
    pub async fn record_demand(
        &self,
        counts: &[(String, usize)],
        hold: Duration,
    ) -> Result<(), EngineError> {
        match self {
            Engine::Memory(_) => Ok(()),
            Engine::Redis(r) => r.record_demand(counts, hold).await,
        }
    }

    /// Adds this replica's cache-aside reads per polling source (hits, misses since its last report) to the
    /// fleet's totals; memory mode has no fleet (this replica's own counters answer).
    pub async fn add_cache_reads(&self, deltas: &[(String, u64, u64)]) -> Result<(), EngineError> {
        match self {
            Engine::Memory(_) => Ok(()),
            Engine::Redis(r) => r.add_cache_reads(deltas).await,
        }
    }

    /// Each source's cache-aside reads (hits, misses) summed over the fleet; `None` in memory mode.
    pub async fn cache_reads(
        &self,
        sources: &[String],
    ) -> Result<Option<Vec<(u64, u64)>>, EngineError> {
        match self {
            Engine::Memory(_) => Ok(None),
            Engine::Redis(r) => r.cache_reads(sources).await.map(Some),
        }
    }

    /// Applies presence changes in order (announcing `join` and `leave` to the channels' subscribers on
    /// every replica where asked).
    pub async fn apply_presence(&self, changes: &[PresenceChange]) -> Result<(), EngineError> {
        match self {
            Engine::Memory(m) => {
                m.apply_presence(changes);
                Ok(())
            }
            Engine::Redis(r) => r.apply_presence(changes).await,
        }
    }

    /// Keeps this replica's members present for `channels.presence_ttl` more (a shared backend forgets the
    /// members of a replica that stops refreshing them; memory mode has nobody else to forget them for).
    pub async fn refresh_presence(
        &self,
        members: &[(Arc<str>, Vec<Member>)],
    ) -> Result<(), EngineError> {
        match self {
            Engine::Memory(_) => Ok(()),
            Engine::Redis(r) => r.refresh_presence(members).await,
        }
    }

    /// A channel's members on every replica, at most `limit`.
    pub async fn presence(&self, channel: &str, limit: usize) -> Result<PresencePage, EngineError> {
        match self {
            Engine::Memory(m) => Ok(m.presence(channel, limit)),
            Engine::Redis(r) => r.presence(channel, limit).await,
        }
    }

    /// How many connections and distinct users a channel's presence holds, on every replica.
    pub async fn presence_counts(&self, channel: &str) -> Result<PresenceCounts, EngineError> {
        match self {
            Engine::Memory(m) => Ok(m.presence_counts(channel)),
            Engine::Redis(r) => r.presence_counts(channel).await,
        }
    }
}
