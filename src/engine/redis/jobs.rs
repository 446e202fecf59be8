//! Polling jobs in Redis: job definitions in one hash (so every replica can start, stop and list them, and
//! they survive restarts), one lease key per job (SET NX PX; only the holder renews or releases it, checked
//! atomically in Lua), and a status key the owner refreshes.
//!
//! A scan costs the same few round trips whatever the number of jobs: one listing, one script for every
//! lease, one script recording this replica's subscribers of every job's channel and summing the fleet's.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use deadpool_redis::redis;

use super::keys::Keys;
use super::store::RedisStore;
use crate::engine::seam::{EngineError, Held, Job, JobStatus, Put, ScanReport};

/// Releases a lease only if this replica still holds it.
const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

pub struct RedisJobs {
    me: String,
    release: redis::Script,
    put: redis::Script,
    scan: redis::Script,
    rate_turn: redis::Script,
    demand: redis::Script,
}

impl RedisJobs {
    pub fn new(me: &str) -> RedisJobs {
        RedisJobs {
            me: me.to_string(),
            release: redis::Script::new(RELEASE),
            put: redis::Script::new(include_str!("put_job.lua")),
            scan: redis::Script::new(include_str!("scan_leases.lua")),
            rate_turn: redis::Script::new(include_str!("rate_turn.lua")),
            demand: redis::Script::new(include_str!("demand.lua")),
        }
    }

    pub async fn put<J: Job>(
        &self,
        r: &RedisStore,
        spec: &J,
        max: usize,
    ) -> Result<Put, EngineError> {
        let mut call = self.put.prepare_invoke();
        call.key(r.keys().jobs())
            .arg(spec.id())
            .arg(serde_json::to_string(spec).expect("a job spec serializes"))
            .arg(max);
        let put: i64 = r
            .with_conn(|mut c| async move { call.invoke_async(&mut c).await })
            .await?;
        Ok(match put {
            1 => Put::Created,
            0 => Put::Existed,
            _ => Put::Full,
        })
    }

    pub async fn remove(&self, r: &RedisStore, id: &str) -> Result<bool, EngineError> {
        let (jobs, status) = (r.keys().jobs(), r.keys().job_status(id));
        let id = id.to_string();
        let (removed, _): (i64, i64) = r
            .with_conn(|mut c| async move {
                redis::pipe()
                    .hdel(jobs, id)
                    .del(status)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(removed > 0)
    }

    pub async fn list<J: Job>(&self, r: &RedisStore) -> Result<Vec<J>, EngineError> {
        let key = r.keys().jobs();
        let all: HashMap<String, String> = r
            .with_conn(
                |mut c| async move { redis::cmd("HGETALL").arg(key).query_async(&mut c).await },
            )
            .await?;
        Ok(all
            .values()
            .filter_map(|json| serde_json::from_str(json).ok())
            .collect())
    }

    /// Sets a key to this replica's id unless it exists (SET NX PX): true when this replica got it.
    pub async fn hold(
        &self,
        r: &RedisStore,
        key: impl FnOnce(&Keys) -> String,
        ttl: Duration,
    ) -> Result<bool, EngineError> {
        let key = key(r.keys());
        let me = self.me.clone();
        let set: Option<String> = r
            .with_conn(|mut c| async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(me)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl.as_millis() as u64)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(set.is_some())
    }

    pub async fn release(&self, r: &RedisStore, id: &str) -> Result<(), EngineError> {
        let mut call = self.release.prepare_invoke();
        call.key(r.keys().lease(id)).arg(&self.me);
        let _: i64 = r
            .with_conn(|mut c| async move { call.invoke_async(&mut c).await })
            .await?;
        Ok(())
    }

    pub async fn owners_and_statuses(
        &self,
        r: &RedisStore,
        ids: &[String],
    ) -> Result<Vec<(Option<String>, Option<JobStatus>)>, EngineError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.get(r.keys().lease(id)).get(r.keys().job_status(id));
        }
        let flat: Vec<Option<String>> = r
            .with_conn(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        Ok(flat
            .chunks(2)
            .map(|pair| {
                let status = pair[1]
                    .as_deref()
                    .and_then(|s| serde_json::from_str(s).ok());
                (pair[0].clone(), status)
            })
            .collect())
    }

    pub async fn write_status(
        &self,
        r: &RedisStore,
        id: &str,
        status: &JobStatus,
        ttl: Duration,
    ) -> Result<(), EngineError> {
        let key = r.keys().job_status(id);
        let json = serde_json::to_string(status).expect("a status serializes");
        r.with_conn(|mut c| async move {
            redis::cmd("SET")
                .arg(key)
                .arg(json)
                .arg("PX")
                .arg(ttl.as_millis() as u64)
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// Takes a turn of a fleet-wide budget of requests spaced `interval` apart: zero when the request may
    /// go now, else how long to wait before asking again. Timed by Redis's clock, so replicas agree.
    pub async fn take_turn(
        &self,
        r: &RedisStore,
        budget: &str,
        interval: Duration,
    ) -> Result<Duration, EngineError> {
        let mut call = self.rate_turn.prepare_invoke();
        call.key(r.keys().rate_limit(budget))
            .arg(interval.as_millis().max(1) as u64);
        let wait: u64 = r
            .with_conn(|mut c| async move { call.invoke_async(&mut c).await })
            .await?;
        Ok(Duration::from_millis(wait))
    }

    /// Keeps a channel's cached value (and its snapshots and sequence counter) for `ttl` more, as a publish
    /// would, without publishing: an unchanged polled value stays cached.
    pub async fn touch(
        &self,
        r: &RedisStore,
        channel: &str,
        ttl: Duration,
    ) -> Result<(), EngineError> {
        let keys = r.keys();
        let (cache, snapshots, seq) = (
            keys.cache(channel),
            keys.snapshots(channel),
            keys.seq(channel),
        );
        let secs = ttl.as_secs().max(1);
        r.with_conn(|mut c| async move {
            // GT on the counter: extended, never shortened (as the publish script does).
            redis::pipe()
                .cmd("EXPIRE")
                .arg(cache)
                .arg(secs)
                .ignore()
                .cmd("EXPIRE")
                .arg(snapshots)
                .arg(secs)
                .ignore()
                .cmd("EXPIRE")
                .arg(seq)
                .arg(secs)
                .arg("GT")
                .ignore()
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    pub async fn holder(&self, r: &RedisStore, id: &str) -> Result<Option<String>, EngineError> {
        let key = r.keys().lease(id);
        r.with_conn(|mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await })
            .await
    }

    /// Lists the jobs, renews the leases of those this replica runs (`held`), tries to take the others,
    /// records this replica's subscribers of every job's channel (`local_count`, held for `lease`) and reads
    /// every replica's: the demand of each job, and for the kept `auto_stop` jobs whether anybody listens.
    pub async fn scan<J: Job>(
        &self,
        r: &RedisStore,
        held: &[Held],
        lease: Duration,
        local_count: impl Fn(&str) -> usize,
    ) -> Result<ScanReport<J>, EngineError> {
        let held_ids: HashSet<&str> = held.iter().map(|h| h.id.as_str()).collect();
        let keys = r.keys().clone();
        let me = self.me.clone();
        let lease_ms = lease.as_millis() as u64;
        let mut call = self.scan.prepare_invoke();
        let mut demand_call = self.demand.prepare_invoke();
        let held_ids_ref = &held_ids;
        let local_count = &local_count;
        let (all, held_now, sums) = r
            .with_conn(|mut c| async move {
                let all: HashMap<String, String> = redis::cmd("HGETALL")
                    .arg(keys.jobs())
                    .query_async(&mut c)
                    .await?;
                let jobs: Vec<J> = all
                    .values()
                    .filter_map(|json| serde_json::from_str(json).ok())
                    .collect();
                if jobs.is_empty() {
                    return Ok((jobs, Vec::new(), Vec::new()));
                }
                // Renew what this replica runs, try to take the rest: one script call for every lease.
                call.arg(&me).arg(lease_ms);
                for job in &jobs {
                    call.key(keys.lease(job.id()));
                    call.arg(if held_ids_ref.contains(job.id()) {
                        "r"
                    } else {
                        "t"
                    });
                }
                for job in &jobs {
                    call.key(keys.refresh(job.id()));
                }
                let held_now: Vec<i64> = call.invoke_async(&mut c).await?;
                // This replica's listeners of every job and the fleet's: one script call too.
                demand_call.arg(&me).arg(lease_ms);
                for job in &jobs {
                    demand_call
                        .key(keys.demand(job.id()))
                        .arg(local_count(job.channel()));
                }
                let sums: Vec<u64> = demand_call.invoke_async(&mut c).await?;
                Ok((jobs, held_now, sums))
            })
            .await?;
        let demand: HashMap<String, usize> = all
            .iter()
            .zip(&sums)
            .map(|(job, n)| (job.id().to_string(), *n as usize))
            .collect();
        let mut lost: Vec<String> = held
            .iter()
            .filter(|h| !all.iter().any(|j| j.id() == h.id))
            .map(|h| h.id.clone())
            .collect();
        let mut acquired = Vec::new();
        let mut refresh = Vec::new();
        for (job, now) in all.iter().zip(&held_now) {
            match (held_ids.contains(job.id()), *now) {
                (true, 0) => lost.push(job.id().to_string()),
                (true, 2) => refresh.push(job.id().to_string()),
                (false, 1 | 2) => acquired.push(job.id().to_string()),
                _ => {}
            }
        }
        let listening = held
            .iter()
            .filter(|h| h.auto_stop && !lost.contains(&h.id))
            .map(|h| {
                let heard =
                    local_count(&h.channel) > 0 || demand.get(&h.id).copied().unwrap_or(0) > 0;
                (h.id.clone(), heard)
            })
            .collect();
        Ok(ScanReport {
            jobs: all,
            lost,
            acquired,
            listening,
            demand,
            refresh,
        })
    }

    /// Records this replica's subscribers of some jobs' channels at once (held for `hold`), between scans.
    pub async fn record_demand(
        &self,
        r: &RedisStore,
        counts: &[(String, usize)],
        hold: Duration,
    ) -> Result<(), EngineError> {
        if counts.is_empty() {
            return Ok(());
        }
        let mut call = self.demand.prepare_invoke();
        call.arg(&self.me).arg(hold.as_millis().max(1) as u64);
        for (id, count) in counts {
            call.key(r.keys().demand(id)).arg(*count);
        }
        let _: Vec<u64> = r
            .with_conn(|mut c| async move { call.invoke_async(&mut c).await })
            .await?;
        Ok(())
    }

    /// Adds this replica's cache reads since its last report to each source's fleet-wide totals, in one
    /// round trip.
    pub async fn add_cache_reads(
        &self,
        r: &RedisStore,
        deltas: &[(String, u64, u64)],
    ) -> Result<(), EngineError> {
        if deltas.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (source, hits, misses) in deltas {
            let key = r.keys().cache_reads(source);
            pipe.hincr(&key, "hits", *hits)
                .ignore()
                .hincr(&key, "misses", *misses)
                .ignore();
        }
        r.with_conn(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
    }

    /// Each source's fleet-wide cache reads (hits, misses).
    pub async fn cache_reads(
        &self,
        r: &RedisStore,
        sources: &[String],
    ) -> Result<Vec<(u64, u64)>, EngineError> {
        if sources.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for source in sources {
            pipe.cmd("HMGET")
                .arg(r.keys().cache_reads(source))
                .arg("hits")
                .arg("misses");
        }
        let found: Vec<(Option<u64>, Option<u64>)> = r
            .with_conn(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        Ok(found
            .into_iter()
            .map(|(h, m)| (h.unwrap_or(0), m.unwrap_or(0)))
            .collect())
    }

    /// The subscribers of each job's channel on every replica, as their last scans recorded them.
    pub async fn demand(&self, r: &RedisStore, ids: &[String]) -> Result<Vec<usize>, EngineError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut call = self.demand.prepare_invoke();
        call.arg(&self.me).arg(1);
        for id in ids {
            call.key(r.keys().demand(id));
        }
        let sums: Vec<u64> = r
            .with_conn(|mut c| async move { call.invoke_async(&mut c).await })
            .await?;
        Ok(sums.into_iter().map(|n| n as usize).collect())
    }

    /// Asks the owner of a job to fetch at once: a flag its next scan takes (it expires after `hold`).
    pub async fn request_refresh(
        &self,
        r: &RedisStore,
        id: &str,
        hold: Duration,
    ) -> Result<(), EngineError> {
        let key = r.keys().refresh(id);
        r.with_conn(|mut c| async move {
            redis::cmd("SET")
                .arg(key)
                .arg(1)
                .arg("PX")
                .arg(hold.as_millis() as u64)
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }
}
