//! Where polling jobs live and who runs them. With Redis: job definitions in one hash (so every replica can
//! start, stop and list them, and they survive restarts), one lease key per job (SET NX PX; only the holder
//! renews or releases it, checked atomically in Lua), and a status key the owner refreshes. In memory mode the
//! same operations work on local maps and this replica owns every job.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use deadpool_redis::redis;

use crate::hub::Hub;
use crate::poller::source::JobSpec;
use crate::store::{RedisError, Store};

/// Renews a lease only if this replica still holds it.
const RENEW: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";
/// Releases a lease only if this replica still holds it.
const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

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
    renew: redis::Script,
    release: redis::Script,
}

impl JobStore {
    pub fn new(hub: Hub) -> JobStore {
        JobStore {
            me: hub.instance_id().to_string(),
            hub,
            memory: Mutex::new(MemoryJobs::default()),
            renew: redis::Script::new(RENEW),
            release: redis::Script::new(RELEASE),
        }
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, MemoryJobs> {
        self.memory.lock().expect("job store lock poisoned")
    }

    /// Records a job; starting one that exists changes nothing (same id from any replica).
    pub async fn put(&self, spec: &JobSpec) -> Result<(), RedisError> {
        match self.hub.store() {
            Store::Memory(_) => {
                self.memory()
                    .specs
                    .entry(spec.id.clone())
                    .or_insert_with(|| spec.clone());
                Ok(())
            }
            Store::Redis(r) => {
                let key = r.keys().jobs();
                let json = serde_json::to_string(spec).expect("a job spec serializes");
                let id = spec.id.clone();
                r.with_conn(|mut c| async move {
                    redis::cmd("HSETNX")
                        .arg(key)
                        .arg(id)
                        .arg(json)
                        .query_async::<i64>(&mut c)
                        .await
                })
                .await
                .map(|_| ())
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

    /// Extends this replica's lease; false when it was lost (expired and taken, or the job was stopped).
    pub async fn renew(&self, id: &str, lease: Duration) -> Result<bool, RedisError> {
        match self.hub.store() {
            Store::Memory(_) => Ok(self.memory().specs.contains_key(id)),
            Store::Redis(r) => {
                let mut call = self.renew.prepare_invoke();
                call.key(r.keys().lease(id))
                    .arg(&self.me)
                    .arg(lease.as_millis() as u64);
                let renewed: i64 = r
                    .with_conn(|mut c| async move { call.invoke_async(&mut c).await })
                    .await?;
                Ok(renewed == 1)
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

    /// Whether any replica has subscribers of `channel` (its bridge listens to the channel in Redis).
    pub async fn has_listeners(&self, channel: &str) -> Result<bool, RedisError> {
        match self.hub.store() {
            Store::Memory(_) => Ok(self.hub.local_subscribers(channel) > 0),
            Store::Redis(r) => {
                let name = r.keys().pubsub_channel(channel);
                let (_, count): (String, i64) = r
                    .with_conn(|mut c| async move {
                        let reply: Vec<redis::Value> = redis::cmd("PUBSUB")
                            .arg("NUMSUB")
                            .arg(&name)
                            .query_async(&mut c)
                            .await?;
                        let count = match reply.get(1) {
                            Some(redis::Value::Int(n)) => *n,
                            _ => 0,
                        };
                        Ok((name, count))
                    })
                    .await?;
                Ok(count > 0)
            }
        }
    }
}
