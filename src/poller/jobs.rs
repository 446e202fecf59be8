//! Where polling jobs live and who runs them, in the poller's terms: `JobSpec`s stored through the engine
//! (job definitions, one lease per job, a status the owner refreshes). With a shared backend every replica
//! can start, stop and list them and they survive restarts; in memory mode this replica owns every job.
//!
//! The number of jobs is bounded (`poller.max_jobs`, counted where they are stored).

use std::time::Duration;

use crate::engine::{Engine, EngineError as RedisError, Job};
pub use crate::engine::{Held, JobStatus, Put};
use crate::node::hub::Hub;
use crate::poller::source::JobSpec;

impl Job for JobSpec {
    fn id(&self) -> &str {
        &self.id
    }

    fn channel(&self) -> &str {
        &self.channel
    }
}

/// What one scan found.
pub type ScanReport = crate::engine::ScanReport<JobSpec>;

pub struct JobStore {
    hub: Hub,
    engine: Engine,
}

impl JobStore {
    pub fn new(hub: Hub) -> JobStore {
        JobStore {
            engine: hub.engine().clone(),
            hub,
        }
    }

    /// Records a job unless `max` jobs are stored; starting one that exists changes nothing (same id from any
    /// replica), even at the limit.
    pub async fn put(&self, spec: &JobSpec, max: usize) -> Result<Put, RedisError> {
        self.engine.put_job(spec, max).await
    }

    /// Removes a job; returns whether it existed.
    pub async fn remove(&self, id: &str) -> Result<bool, RedisError> {
        self.engine.remove_job(id).await
    }

    /// Every job of the fleet.
    pub async fn list(&self) -> Result<Vec<JobSpec>, RedisError> {
        self.engine.list_jobs().await
    }

    /// Tries to become the job's owner for `lease`.
    pub async fn acquire(&self, id: &str, lease: Duration) -> Result<bool, RedisError> {
        self.engine.acquire(id, lease).await
    }

    /// Gives the job up at once, so another replica takes it without waiting for the lease to expire.
    pub async fn release(&self, id: &str) -> Result<(), RedisError> {
        self.engine.release(id).await
    }

    /// Owner replica and last reported status of each job.
    pub async fn owners_and_statuses(
        &self,
        ids: &[String],
    ) -> Result<Vec<(Option<String>, Option<JobStatus>)>, RedisError> {
        self.engine.owners_and_statuses(ids).await
    }

    /// Publishes the owner's view of a job, kept for `ttl` (a dead owner's status fades).
    pub async fn write_status(
        &self,
        id: &str,
        status: &JobStatus,
        ttl: Duration,
    ) -> Result<(), RedisError> {
        self.engine.write_status(id, status, ttl).await
    }

    /// Asks a job's owner to fetch at once (taken by its next scan, forgotten after `hold`).
    pub async fn request_refresh(&self, id: &str, hold: Duration) -> Result<(), RedisError> {
        self.engine.request_refresh(id, hold).await
    }

    /// The replica holding a job's lease, if any.
    pub async fn holder(&self, id: &str) -> Result<Option<String>, RedisError> {
        self.engine.holder(id).await
    }

    /// A short fleet-wide lock so one replica fills an empty cache for many concurrent subscribers.
    pub async fn fill_lock(&self, channel: &str, hold: Duration) -> Result<bool, RedisError> {
        self.engine.fill_lock(channel, hold).await
    }

    /// Lists the jobs, renews the leases of those this replica runs (`held`), tries to take the others,
    /// records this replica's subscribers of every job's channel (held for `lease`) and reads the fleet's:
    /// the demand of each job, and which kept `auto_stop` jobs still have listeners anywhere.
    pub async fn scan(&self, held: &[Held], lease: Duration) -> Result<ScanReport, RedisError> {
        let hub = &self.hub;
        self.engine
            .scan(held, lease, |channel| job_subscribers(hub, channel))
            .await
    }

    /// Records this replica's subscribers of some jobs' channels now (held for `hold`).
    pub async fn record_demand(
        &self,
        counts: &[(String, usize)],
        hold: Duration,
    ) -> Result<(), RedisError> {
        self.engine.record_demand(counts, hold).await
    }

    /// Adds this replica's cache reads since its last report to the fleet's totals.
    pub async fn add_cache_reads(&self, deltas: &[(String, u64, u64)]) -> Result<(), RedisError> {
        self.engine.add_cache_reads(deltas).await
    }

    /// Each source's fleet-wide cache reads; `None` in memory mode.
    pub async fn cache_reads(
        &self,
        sources: &[String],
    ) -> Result<Option<Vec<(u64, u64)>>, RedisError> {
        self.engine.cache_reads(sources).await
    }

    /// The fleet's subscribers of each job's channel as last recorded; `None` in memory mode.
    pub async fn demand(&self, ids: &[String]) -> Result<Option<Vec<usize>>, RedisError> {
        self.engine.demand(ids).await
    }
}

/// This replica's subscribers of a job's channel, patterns included; for a split job's channel
/// (`prices:*`), of every element channel it stands for.
pub fn job_subscribers(hub: &Hub, channel: &str) -> usize {
    let direct = hub.local_subscribers(channel);
    if !channel.contains('*') {
        return direct;
    }
    let elements: usize = hub
        .subscriber_counts()
        .0
        .iter()
        .filter(|(subscribed, _)| glob_match(channel, subscribed))
        .map(|(_, n)| *n)
        .sum();
    direct + elements
}

/// Whether `channel` is one of the channels a split job's channel stands for: its `*` matches any run of
/// characters (`prices:*` matches `prices:BTC`). A split job's listeners are spread over its element
/// channels, so a local check walks this replica's subscribed channels (once per scan per such job).
fn glob_match(pattern: &str, channel: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = channel.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            return rest.len() >= part.len() && rest.ends_with(part);
        }
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.is_empty()
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn split_job_channels_match_their_elements() {
        assert!(glob_match("prices:*", "prices:BTC"));
        assert!(glob_match("prices:x:*", "prices:x:a:b"));
        assert!(glob_match("p:*:usd", "p:BTC:usd"));
        assert!(!glob_match("p:*:usd", "p:BTC:eur"));
        assert!(!glob_match("prices:*", "other:BTC"));
        assert!(glob_match("plain", "plain"));
        assert!(!glob_match("plain", "plainer"));
    }
}
