//! Where polling jobs live and who runs them. With Redis: job definitions in one hash (so every replica can
//! start, stop and list them, and they survive restarts), one lease key per job (SET NX PX; only the holder
//! renews or releases it, checked atomically in Lua), and a status key the owner refreshes. In memory mode the
//! same operations work on local maps and this replica owns every job.
//!
//! The number of jobs is bounded (`poller.max_jobs`, counted where they are stored), and a scan costs the same
//! few round trips whatever the number of jobs: one listing, one script for every lease, one pipeline for the
//! subscriber checks.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use deadpool_redis::redis;

use crate::hub::Hub;
use crate::poller::source::JobSpec;
use crate::store::{RedisError, Store};

/// Releases a lease only if this replica still holds it.
const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

/// What recording a job did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// A new job.
    Created,
    /// The job was there already (from any replica); nothing changed.
    Existed,
    /// `poller.max_jobs` jobs are stored: not recorded.
    Full,
}

/// A job this replica runs, as a scan sees it.
pub struct Held {
    pub id: String,
    pub channel: String,
    /// Whether the job stops when nobody listens (only then are its listeners counted).
    pub auto_stop: bool,
}

/// What one scan found.
pub struct ScanReport {
    /// Every job of the fleet.
    pub jobs: Vec<JobSpec>,
    /// Jobs this replica ran and lost (stopped, or the lease expired and another replica took it).
    pub lost: Vec<String>,
    /// Free jobs this replica took.
    pub acquired: Vec<String>,
    /// For each kept `auto_stop` job: whether any replica has a subscriber of its channel (exact or pattern).
    pub listening: HashMap<String, bool>,
}

/// The pattern prefixes (`prices:`) whose patterns match `channel`: each prefix of it ending in `:`.
fn covering_prefixes(channel: &str) -> impl Iterator<Item = &str> {
    channel.match_indices(':').map(move |(i, _)| &channel[..=i])
}

/// What the owner reports about a job.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct JobStatus {
    /// `running` (fetching on its interval) or `backoff` (retrying after failures).
    pub state: String,
    pub interval: String,
    pub last_success: Option<String>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    pub next_run: Option<String>,
    pub fetches: u64,
    /// The owner's local subscribers of the job's channel.
    pub subscribers: usize,
}

#[derive(Default)]
struct MemoryJobs {
    specs: HashMap<String, JobSpec>,
    statuses: HashMap<String, JobStatus>,
}

pub struct JobStore {
    hub: Hub,
    me: String,
    memory: Mutex<MemoryJobs>,
    release: redis::Script,
    put: redis::Script,
    scan: redis::Script,
}

impl JobStore {
    pub fn new(hub: Hub) -> JobStore {
        JobStore {
            me: hub.instance_id().to_string(),
            hub,
            memory: Mutex::new(MemoryJobs::default()),
            release: redis::Script::new(RELEASE),
            put: redis::Script::new(include_str!("put_job.lua")),
            scan: redis::Script::new(include_str!("scan_leases.lua")),
        }
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, MemoryJobs> {
        self.memory.lock().expect("job store lock poisoned")
    }

    /// Records a job unless `max` jobs are stored; starting one that exists changes nothing (same id from any
    /// replica), even at the limit.
    pub async fn put(&self, spec: &JobSpec, max: usize) -> Result<Put, RedisError> {
        match self.hub.store() {
            Store::Memory(_) => {
                let mut m = self.memory();
                if m.specs.contains_key(&spec.id) {
                    Ok(Put::Existed)
                } else if m.specs.len() >= max {
                    Ok(Put::Full)
                } else {
                    m.specs.insert(spec.id.clone(), spec.clone());
                    Ok(Put::Created)
                }
            }
            Store::Redis(r) => {
                let mut call = self.put.prepare_invoke();
                call.key(r.keys().jobs())
                    .arg(&spec.id)
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
        }
    }

    /// Removes a job; returns whether it existed.
    pub async fn remove(&self, id: &str) -> Result<bool, RedisError> {
        match self.hub.store() {
            Store::Memory(_) => {
                let mut m = self.memory();
                m.statuses.remove(id);
                Ok(m.specs.remove(id).is_some())
            }
            Store::Redis(r) => {
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
        }
    }

    /// Every job of the fleet.
    pub async fn list(&self) -> Result<Vec<JobSpec>, RedisError> {
        match self.hub.store() {
            Store::Memory(_) => Ok(self.memory().specs.values().cloned().collect()),
            Store::Redis(r) => {
                let key = r.keys().jobs();
                let all: HashMap<String, String> = r
                    .with_conn(|mut c| async move {
                        redis::cmd("HGETALL").arg(key).query_async(&mut c).await
                    })
                    .await?;
                Ok(all
                    .values()
                    .filter_map(|json| serde_json::from_str(json).ok())
                    .collect())
            }
        }
    }

    /// Tries to become the job's owner for `lease`.
    pub async fn acquire(&self, id: &str, lease: Duration) -> Result<bool, RedisError> {
        self.hold(|keys| keys.lease(id), lease).await
    }

    /// Sets a key to this replica's id unless it exists (SET NX PX): true when this replica got it.
    async fn hold(
        &self,
        key: impl FnOnce(&crate::keys::Keys) -> String,
        ttl: Duration,
    ) -> Result<bool, RedisError> {
        match self.hub.store() {
            Store::Memory(_) => Ok(true),
            Store::Redis(r) => {
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
        }
    }

    /// Gives the job up at once, so another replica takes it without waiting for the lease to expire.
    pub async fn release(&self, id: &str) -> Result<(), RedisError> {
        match self.hub.store() {
            Store::Memory(_) => Ok(()),
            Store::Redis(r) => {
                let mut call = self.release.prepare_invoke();
                call.key(r.keys().lease(id)).arg(&self.me);
                let _: i64 = r
                    .with_conn(|mut c| async move { call.invoke_async(&mut c).await })
                    .await?;
                Ok(())
            }
        }
    }

    /// Owner replica and last reported status of each job.
    pub async fn owners_and_statuses(
        &self,
        ids: &[String],
    ) -> Result<Vec<(Option<String>, Option<JobStatus>)>, RedisError> {
        match self.hub.store() {
            Store::Memory(_) => {
                let m = self.memory();
                Ok(ids
                    .iter()
                    .map(|id| (Some(self.me.clone()), m.statuses.get(id).cloned()))
                    .collect())
            }
            Store::Redis(r) => {
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
        }
    }

    /// Publishes the owner's view of a job, kept for `ttl` (a dead owner's status fades).
    pub async fn write_status(
        &self,
        id: &str,
        status: &JobStatus,
        ttl: Duration,
    ) -> Result<(), RedisError> {
        match self.hub.store() {
            Store::Memory(_) => {
                let mut m = self.memory();
                if m.specs.contains_key(id) {
                    m.statuses.insert(id.to_string(), status.clone());
                }
                Ok(())
            }
            Store::Redis(r) => {
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
        }
    }

    /// The replica holding a job's lease, if any.
    pub async fn holder(&self, id: &str) -> Result<Option<String>, RedisError> {
        match self.hub.store() {
            Store::Memory(_) => Ok(None),
            Store::Redis(r) => {
                let key = r.keys().lease(id);
                r.with_conn(
                    |mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await },
                )
                .await
            }
        }
    }

    /// A short fleet-wide lock so one replica fills an empty cache for many concurrent subscribers.
    pub async fn fill_lock(&self, channel: &str, hold: Duration) -> Result<bool, RedisError> {
        self.hold(|keys| keys.fill_lock(channel), hold).await
    }

    /// Lists the jobs, renews the leases of those this replica runs (`held`), tries to take the others, and
    /// tells which kept `auto_stop` jobs still have listeners anywhere. `patterns` are this replica's pattern
    /// prefixes, announced for `lease` so the owners of jobs under them see them.
    pub async fn scan(
        &self,
        held: &[Held],
        patterns: &[String],
        lease: Duration,
    ) -> Result<ScanReport, RedisError> {
        let held_ids: HashSet<&str> = held.iter().map(|h| h.id.as_str()).collect();
        // A local subscriber (exact or pattern) is enough; only the others need asking.
        let locally_heard = |channel: &str| self.hub.local_subscribers(channel) > 0;
        let r = match self.hub.store() {
            Store::Memory(_) => {
                let jobs: Vec<JobSpec> = self.memory().specs.values().cloned().collect();
                let listed: HashSet<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
                let lost = held
                    .iter()
                    .filter(|h| !listed.contains(h.id.as_str()))
                    .map(|h| h.id.clone())
                    .collect();
                let listening = held
                    .iter()
                    .filter(|h| h.auto_stop && listed.contains(h.id.as_str()))
                    .map(|h| (h.id.clone(), locally_heard(&h.channel)))
                    .collect();
                let acquired = jobs
                    .iter()
                    .filter(|j| !held_ids.contains(j.id.as_str()))
                    .map(|j| j.id.clone())
                    .collect();
                return Ok(ScanReport {
                    jobs,
                    lost,
                    acquired,
                    listening,
                });
            }
            Store::Redis(r) => r,
        };
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
                let jobs: Vec<JobSpec> = all
                    .values()
                    .filter_map(|json| serde_json::from_str(json).ok())
                    .collect();
                // Renew what this replica runs, try to take the rest: one script call for every lease.
                call.arg(&me).arg(lease_ms);
                for job in &jobs {
                    call.key(keys.lease(&job.id));
                    call.arg(if held_ids_ref.contains(job.id.as_str()) {
                        "r"
                    } else {
                        "t"
                    });
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
                    for h in &asking {
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
                    let present: Vec<Option<String>> = match replies.next() {
                        Some(v) => redis::from_redis_value(v)?,
                        None => Vec::new(),
                    };
                    let present: HashSet<&str> = prefixes
                        .iter()
                        .zip(&present)
                        .filter(|(_, v)| v.is_some())
                        .map(|(p, _)| *p)
                        .collect();
                    for (h, count) in asking.iter().zip(numsub.chunks(2)) {
                        let exact = matches!(count.get(1), Some(redis::Value::Int(n)) if *n > 0);
                        let pattern = covering_prefixes(&h.channel).any(|p| present.contains(p));
                        heard.insert(h.id.clone(), exact || pattern);
                    }
                }
                Ok((jobs, held_now, heard))
            })
            .await?;
        let mut lost: Vec<String> = held
            .iter()
            .filter(|h| !all.iter().any(|j| j.id == h.id))
            .map(|h| h.id.clone())
            .collect();
        let mut acquired = Vec::new();
        for (job, now) in all.iter().zip(&held_now) {
            match (held_ids.contains(job.id.as_str()), *now == 1) {
                (true, false) => lost.push(job.id.clone()),
                (false, true) => acquired.push(job.id.clone()),
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
        })
    }
}
