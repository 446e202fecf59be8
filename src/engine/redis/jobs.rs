//! Polling jobs in Redis: job definitions in one hash (so every replica can start, stop and list them, and
//! they survive restarts), one lease key per job (SET NX PX; only the holder renews or releases it, checked
//! atomically in Lua), and a status key the owner refreshes.
//!
//! A scan costs the same few round trips whatever the number of jobs: one listing, one script for every
//! lease, one pipeline for the subscriber checks.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use deadpool_redis::redis;

use super::keys::Keys;
use super::store::{Conn, RedisStore, escape_glob};
use crate::engine::seam::{EngineError, Held, Job, JobStatus, Put, ScanReport};

/// Releases a lease only if this replica still holds it.
const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

/// The pattern prefixes (`prices:`) whose patterns match `channel`: each prefix of it ending in `:`.
fn covering_prefixes(channel: &str) -> impl Iterator<Item = &str> {
    channel.match_indices(':').map(move |(i, _)| &channel[..=i])
}

pub struct RedisJobs {
    me: String,
    release: redis::Script,
    put: redis::Script,
    scan: redis::Script,
    rate_turn: redis::Script,
}

/// Cluster mode: whether some replica listens to each job's channel. An exact channel is asked of its slot's
/// owner (`PUBSUB SHARDNUMSUB`: a shard's subscriptions live on the node serving it); a spread job's glob is
/// asked of every node (`PUBSUB SHARDCHANNELS`, answers combined).
async fn heard_in_cluster(
    c: &mut Conn,
    keys: &Keys,
    single: &[&Held],
    spread: &[&Held],
) -> redis::RedisResult<HashMap<String, bool>> {
    let mut heard = HashMap::new();
    for h in single {
        let channel = keys.pubsub_channel(&h.channel);
        let mut numsub = redis::cmd("PUBSUB");
        numsub.arg("SHARDNUMSUB").arg(&channel);
        let counts: HashMap<String, i64> = c.query_at_owner(numsub, &channel).await?;
        let n = counts.get(&channel).copied().unwrap_or(0);
        heard.insert(h.id.clone(), n > 0);
    }
    for h in spread {
        let glob: Vec<String> = keys
            .pubsub_channel(&h.channel)
            .split('*')
            .map(escape_glob)
            .collect();
        let channels: Vec<String> = redis::cmd("PUBSUB")
            .arg("SHARDCHANNELS")
            .arg(glob.join("*"))
            .query_async(c)
            .await?;
        heard.insert(h.id.clone(), !channels.is_empty());
    }
    Ok(heard)
}

impl RedisJobs {
    pub fn new(me: &str) -> RedisJobs {
        RedisJobs {
            me: me.to_string(),
            release: redis::Script::new(RELEASE),
            put: redis::Script::new(include_str!("put_job.lua")),
            scan: redis::Script::new(include_str!("scan_leases.lua")),
            rate_turn: redis::Script::new(include_str!("rate_turn.lua")),
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

    /// Lists the jobs, renews the leases of those this replica runs (`held`), tries to take the others, and
    /// tells which kept `auto_stop` jobs still have listeners anywhere. `patterns` are this replica's pattern
    /// prefixes, announced for `lease` so the owners of jobs under them see them.
    pub async fn scan<J: Job>(
        &self,
        r: &RedisStore,
        held: &[Held],
        patterns: &[String],
        lease: Duration,
        locally_heard: impl Fn(&str) -> bool,
    ) -> Result<ScanReport<J>, EngineError> {
        let held_ids: HashSet<&str> = held.iter().map(|h| h.id.as_str()).collect();
        let locally_heard = &locally_heard;
        let keys = r.keys().clone();
        let me = self.me.clone();
        let lease_ms = lease.as_millis() as u64;
        let mut call = self.scan.prepare_invoke();
        let held_ids_ref = &held_ids;
        let (all, held_now, heard) = r
            .with_conn(|mut c| async move {
                let all: HashMap<String, String> = redis::cmd("HGETALL")
                    .arg(keys.jobs())
                    .query_async(&mut c)
                    .await?;
                let jobs: Vec<J> = all
                    .values()
                    .filter_map(|json| serde_json::from_str(json).ok())
                    .collect();
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
                let held_now: Vec<i64> = if jobs.is_empty() {
                    Vec::new()
                } else {
                    call.invoke_async(&mut c).await?
                };
                // Listeners of the auto_stop jobs kept, and this replica's patterns: one pipeline.
                let asking: Vec<&Held> = held
                    .iter()
                    .filter(|h| h.auto_stop && !locally_heard(&h.channel))
                    .collect();
                let prefixes: Vec<&str> = asking
                    .iter()
                    .flat_map(|h| covering_prefixes(&h.channel))
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                // A split job's channel stands for all its element channels (`prices:*`): asked with
                // PUBSUB CHANNELS and a glob, the rest with one NUMSUB.
                let (spread, single): (Vec<&Held>, Vec<&Held>) = asking
                    .iter()
                    .copied()
                    .partition(|h| h.channel.contains('*'));
                if keys.is_cluster() {
                    // Sharded pub/sub has no patterns (nor pattern markers), and its subscriptions are
                    // counted by the node owning each channel's slot.
                    let heard = heard_in_cluster(&mut c, &keys, &single, &spread).await?;
                    return Ok((jobs, held_now, heard));
                }
                let mut pipe = redis::pipe();
                for prefix in patterns {
                    pipe.cmd("SET")
                        .arg(keys.pattern_presence(prefix))
                        .arg(&me)
                        .arg("PX")
                        .arg(lease_ms)
                        .ignore();
                }
                if !asking.is_empty() {
                    let mut numsub = redis::cmd("PUBSUB");
                    numsub.arg("NUMSUB");
                    for h in &single {
                        numsub.arg(keys.pubsub_channel(&h.channel));
                    }
                    pipe.add_command(numsub);
                }
                if !prefixes.is_empty() {
                    let mut mget = redis::cmd("MGET");
                    for prefix in &prefixes {
                        mget.arg(keys.pattern_presence(prefix));
                    }
                    pipe.add_command(mget);
                }
                for h in &spread {
                    let glob: Vec<String> = keys
                        .pubsub_channel(&h.channel)
                        .split('*')
                        .map(escape_glob)
                        .collect();
                    pipe.cmd("PUBSUB").arg("CHANNELS").arg(glob.join("*"));
                }
                let mut heard = HashMap::new();
                if pipe.cmd_iter().next().is_none() {
                    return Ok((jobs, held_now, heard));
                }
                let mut replies = pipe
                    .query_async::<Vec<redis::Value>>(&mut c)
                    .await?
                    .into_iter();
                if !asking.is_empty() {
                    // NUMSUB answers channel, count, channel, count ... in the order asked.
                    let numsub: Vec<redis::Value> = match replies.next() {
                        Some(redis::Value::Array(items)) => items,
                        _ => Vec::new(),
                    };
                    let present: Vec<Option<String>> = if prefixes.is_empty() {
                        Vec::new()
                    } else {
                        match replies.next() {
                            Some(v) => redis::from_redis_value(v)?,
                            None => Vec::new(),
                        }
                    };
                    let present: HashSet<&str> = prefixes
                        .iter()
                        .zip(&present)
                        .filter(|(_, v)| v.is_some())
                        .map(|(p, _)| *p)
                        .collect();
                    let mut exact: HashMap<&str, bool> = single
                        .iter()
                        .zip(numsub.chunks(2))
                        .map(|(h, count)| {
                            let n = matches!(count.get(1), Some(redis::Value::Int(n)) if *n > 0);
                            (h.id.as_str(), n)
                        })
                        .collect();
                    for h in &spread {
                        let channels: Vec<String> = match replies.next() {
                            Some(v) => redis::from_redis_value(v)?,
                            None => Vec::new(),
                        };
                        exact.insert(h.id.as_str(), !channels.is_empty());
                    }
                    for h in &asking {
                        let exact = exact.get(h.id.as_str()).copied().unwrap_or(false);
                        let pattern = covering_prefixes(&h.channel).any(|p| present.contains(p));
                        heard.insert(h.id.clone(), exact || pattern);
                    }
                }
                Ok((jobs, held_now, heard))
            })
            .await?;
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
                let heard = locally_heard(&h.channel) || heard.get(&h.id).copied().unwrap_or(false);
                (h.id.clone(), heard)
            })
            .collect();
        Ok(ScanReport {
            jobs: all,
            lost,
            acquired,
            listening,
            refresh,
        })
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
