//! The memory engine: the broker seam for a single instance with no shared backend. Values, snapshots and
//! sequences live in [`store::MemoryStore`]; jobs and their statuses in local maps (this replica owns every
//! job); presence in [`presence::MemoryPresence`]; a publish (and a join or leave) is delivered straight to the
//! node's handler. A real implementation, used when there is no Redis and in tests.

pub mod presence;
pub mod store;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use self::presence::MemoryPresence;
use self::store::MemoryStore;
use crate::core::config::{ChannelPolicy, Config};
use crate::core::publication::Publication;
use crate::engine::seam::{
    BrokerEventHandler, EngineError, Held, Job, JobStatus, MemoryUsage, PresenceChange,
    PresenceCounts, PresencePage, Published, Put, ScanReport, Window,
};

/// How often expired values are reclaimed, and at most how many per sweep (the lock is held for it).
const SWEEP_INTERVAL: Duration = Duration::from_millis(500);
const SWEEP_BATCH: usize = 2_000;

#[derive(Default)]
struct Jobs {
    /// Job definitions as stored (JSON), by id.
    specs: HashMap<String, String>,
    statuses: HashMap<String, JobStatus>,
    /// When each request budget's next request may go (one entry per rate-limited source).
    turns: HashMap<String, Instant>,
}

struct Shared {
    store: MemoryStore,
    jobs: Mutex<Jobs>,
    handler: Arc<dyn BrokerEventHandler>,
    presence: MemoryPresence,
    /// This replica's id: the owner of every job.
    me: String,
}

/// A cheap-to-clone handle on the memory engine.
#[derive(Clone)]
pub struct MemoryEngine {
    shared: Arc<Shared>,
}

impl MemoryEngine {
    /// Builds the engine and starts its sweep of expired values, which ends when the last handle is dropped.
    pub fn new(config: &Config, handler: Arc<dyn BrokerEventHandler>, me: &str) -> MemoryEngine {
        let shared = Arc::new(Shared {
            store: MemoryStore::new(config.channels.max_channels, config.channels.max_memory),
            jobs: Mutex::new(Jobs::default()),
            handler,
            presence: MemoryPresence::default(),
            me: me.to_string(),
        });
        let weak: Weak<Shared> = Arc::downgrade(&shared);
        actix::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_INTERVAL);
            loop {
                tick.tick().await;
                let Some(shared) = weak.upgrade() else {
                    return;
                };
                shared.store.sweep(SWEEP_BATCH);
            }
        });
        MemoryEngine { shared }
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, Jobs> {
        self.shared.jobs.lock().expect("job store lock poisoned")
    }

    pub fn publish(
        &self,
        channel: &str,
        data: &str,
        fetched_at: Option<&str>,
        policy: ChannelPolicy,
    ) -> Published {
        let handler = &self.shared.handler;
        let publication =
            self.shared
                .store
                .publish_fetched(channel, data, fetched_at, policy, |p| {
                    handler.on_publication(p.clone())
                });
        Published {
            seq: publication.seq,
            receivers: None,
            relayed: true,
        }
    }

    pub fn latest(&self, channel: &str) -> Option<Arc<Publication>> {
        self.shared.store.latest(channel)
    }

    pub fn latest_matching(&self, prefix: &str, limit: usize) -> Vec<Arc<Publication>> {
        self.shared.store.latest_matching(prefix, limit)
    }

    pub fn history(&self, channel: &str, limit: usize) -> Vec<Arc<Publication>> {
        self.shared.store.history(channel, limit)
    }

    pub fn window(&self, channel: &str, policy: ChannelPolicy) -> Window {
        self.shared.store.window(channel, policy.history_ttl)
    }

    pub fn usage(&self) -> MemoryUsage {
        let store = &self.shared.store;
        MemoryUsage {
            channels: store.len(),
            bytes: store.bytes(),
            evictions: store.evictions(),
            expired: store.expired(),
        }
    }

    pub fn put_job<J: Job>(&self, spec: &J, max: usize) -> Put {
        let mut jobs = self.jobs();
        if jobs.specs.contains_key(spec.id()) {
            Put::Existed
        } else if jobs.specs.len() >= max {
            Put::Full
        } else {
            let json = serde_json::to_string(spec).expect("a job spec serializes");
            jobs.specs.insert(spec.id().to_string(), json);
            Put::Created
        }
    }

    pub fn remove_job(&self, id: &str) -> bool {
        let mut jobs = self.jobs();
        jobs.statuses.remove(id);
        jobs.specs.remove(id).is_some()
    }

    pub fn list_jobs<J: Job>(&self) -> Vec<J> {
        self.jobs()
            .specs
            .values()
            .filter_map(|json| serde_json::from_str(json).ok())
            .collect()
    }

    pub fn owners_and_statuses(&self, ids: &[String]) -> Vec<(Option<String>, Option<JobStatus>)> {
        let jobs = self.jobs();
        ids.iter()
            .map(|id| (Some(self.shared.me.clone()), jobs.statuses.get(id).cloned()))
            .collect()
    }

    /// [`crate::engine::Engine::take_turn`] for this replica alone.
    pub fn take_turn(&self, budget: &str, interval: Duration) -> Duration {
        let now = Instant::now();
        let mut jobs = self.jobs();
        let next = jobs.turns.entry(budget.to_string()).or_insert(now);
        if *next > now {
            return *next - now;
        }
        *next = now + interval;
        Duration::ZERO
    }

    /// Keeps a channel's latest value for `ttl` more.
    pub fn touch(&self, channel: &str, ttl: Duration) {
        self.shared.store.touch(channel, ttl);
    }

    pub fn write_status(&self, id: &str, status: &JobStatus) {
        let mut jobs = self.jobs();
        if jobs.specs.contains_key(id) {
            jobs.statuses.insert(id.to_string(), status.clone());
        }
    }

    pub fn apply_presence(&self, changes: &[PresenceChange]) {
        self.shared
            .presence
            .apply(changes, self.shared.handler.as_ref());
    }

    pub fn presence(&self, channel: &str, limit: usize) -> PresencePage {
        self.shared.presence.read(channel, limit)
    }

    pub fn presence_counts(&self, channel: &str) -> PresenceCounts {
        self.shared.presence.counts(channel)
    }

    /// Every job is this replica's: the ones it does not hold yet are acquired, the ones gone are lost; the
    /// demand for a job is this replica's subscribers of its channel.
    pub fn scan<J: Job>(
        &self,
        held: &[Held],
        local_count: impl Fn(&str) -> usize,
    ) -> Result<ScanReport<J>, EngineError> {
        let held_ids: HashSet<&str> = held.iter().map(|h| h.id.as_str()).collect();
        let jobs: Vec<J> = self.list_jobs();
        let listed: HashSet<&str> = jobs.iter().map(|j| j.id()).collect();
        let lost = held
            .iter()
            .filter(|h| !listed.contains(h.id.as_str()))
            .map(|h| h.id.clone())
            .collect();
        let listening = held
            .iter()
            .filter(|h| h.auto_stop && listed.contains(h.id.as_str()))
            .map(|h| (h.id.clone(), local_count(&h.channel) > 0))
            .collect();
        let demand = jobs
            .iter()
            .map(|j| (j.id().to_string(), local_count(j.channel())))
            .collect();
        let acquired = jobs
            .iter()
            .filter(|j| !held_ids.contains(j.id()))
            .map(|j| j.id().to_string())
            .collect();
        Ok(ScanReport {
            jobs,
            lost,
            acquired,
            listening,
            demand,
            refresh: Vec::new(),
        })
    }
}
