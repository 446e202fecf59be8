//! The poller actor: runs the polling jobs this replica owns. Each job fetches its upstream on its interval
//! (HTTP JSON or a set of Redis keys), transforms the value and publishes it through the hub's one publish
//! path, which caches it and fans it out; a `split` source publishes each element of a fetched array to a
//! channel of its own. Every job's fetch is its own future, so a slow upstream delays
//! nobody else. A periodic scan keeps ownership right across the fleet: it takes free jobs (leases), renews
//! its own, drops the ones it lost or that were stopped, and stops idle `auto_stop` jobs.
//!
//! The actor runs on its own arbiter because awc's client is not `Send` (one client per thread).

pub mod derive;
pub mod fetch;
pub mod jobs;
pub mod source;
pub mod template;
pub mod transform;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde_json::{Value, json};

use crate::core::backoff;
use crate::core::config::format_duration;
use crate::engine::EngineError as RedisError;
use crate::metrics::FetchResult;
use crate::node::hub::Hub;
use crate::node::observer::ChannelObserver;
use crate::poller::fetch::{FetchError, Fetched, Validators};
use crate::poller::jobs::{Held, JobStatus, JobStore, Put};
use crate::poller::source::{JobSpec, ParamError, Source};
use crate::stats::Stats;

/// How long a fill lock holds off other replicas from fetching the same empty channel.
const FILL_LOCK: Duration = Duration::from_secs(5);

/// Why a polling request failed; the HTTP API maps each to a status.
#[derive(Debug, Clone)]
pub enum PollError {
    UnknownSource(String),
    BadParams(String),
    UnknownJob(String),
    /// `poller.max_jobs` jobs exist (the limit).
    TooManyJobs(usize),
    Backend(String),
}

impl From<RedisError> for PollError {
    fn from(e: RedisError) -> Self {
        PollError::Backend(e.0)
    }
}

/// Start (or find) the job of a source with these parameters.
#[derive(Message)]
#[rtype(result = "Result<JobSpec, PollError>")]
pub struct StartJob {
    pub source: String,
    pub params: BTreeMap<String, String>,
}

/// Stop a job fleet-wide.
#[derive(Message)]
#[rtype(result = "Result<(), PollError>")]
pub struct StopJob {
    pub id: String,
}

/// Fetch a job now, from whichever replica owns it. Answers whether this replica owns it (then the fetch is
/// under way) or the owner was asked (it fetches at its next scan, within a quarter lease).
#[derive(Message)]
#[rtype(result = "Result<bool, PollError>")]
pub struct RefreshJob {
    pub id: String,
}

/// Every job of the fleet with its owner and status.
#[derive(Message)]
#[rtype(result = "Result<Vec<Value>, PollError>")]
pub struct ListJobs;

/// Give up every lease now (graceful shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReleaseAll;

/// Subscribers wait on an empty channel: fetch its value now.
#[derive(Message)]
#[rtype(result = "()")]
struct Fill {
    channel: String,
    /// When the registry read the empty cache: a value published after this reaches the waiting subscribers.
    at: Instant,
}

/// A channel gained its first local subscriber: start matching `auto_start` jobs.
#[derive(Message)]
#[rtype(result = "()")]
struct AutoStart {
    channel: String,
}

/// A channel gained its first local subscriber: if it is a job's that another replica runs, record this
/// replica's demand for it now, so the owner's `auto_stop` does not wait for this replica's next scan.
#[derive(Message)]
#[rtype(result = "()")]
struct Demanded {
    channel: String,
}

/// The result of one scan, applied to the actor's state when it completes.
struct Scan {
    jobs: Vec<JobSpec>,
    acquired: Vec<String>,
    lost: Vec<String>,
    listening: HashMap<String, bool>,
    demand: HashMap<String, usize>,
    refresh: Vec<String>,
    previous: HashMap<String, Option<Value>>,
    /// The cache reads this scan added to the fleet's totals (empty when that failed: they go next time).
    cache_reported: Vec<(String, u64, u64)>,
}

/// A job this replica owns and runs.
struct OwnedJob {
    spec: JobSpec,
    source: Arc<Source>,
    status: JobStatus,
    /// A fetch is under way (single flight per job).
    in_flight: bool,
    /// The last published value: the `previous` of `diff`, and the comparison for `only_on_change`.
    previous: Option<Value>,
    timer: Option<SpawnHandle>,
    idle_since: Option<Instant>,
    /// When the job last published a value.
    published_at: Option<Instant>,
    /// `ETag` / `Last-Modified` of the last document fetched, for the next conditional request.
    validators: Validators,
}

/// What one fetch did (when it did not fail).
enum Outcome {
    /// Published this value.
    Published(Value),
    /// The value equals the last one published (`publish = "on_change"`): not published, cache kept.
    Unchanged,
    /// 304 Not Modified: nothing published, cache kept.
    NotModified,
    /// The source's request budget was spent: no request made; try again after this long.
    Delayed(Duration),
    /// A split fetch: `published` of its elements changed and were published; `values` holds every
    /// element's value by key (the next fetch's `previous`).
    Split { published: usize, values: Value },
}

/// What a split fetch covered, for the job's status.
struct SplitReport {
    /// Elements published or kept (one channel each).
    channels: usize,
    /// Elements dropped: past `max_split_elements`, without a usable key, a duplicate key, or failing the
    /// transforms.
    dropped: usize,
    /// The array's length, when it was over `max_split_elements`.
    over_limit: Option<usize>,
}

/// One fetch's result: the outcome, or why it failed and when the upstream asked to be tried again.
struct Fetch {
    result: Result<Outcome, (String, Option<Duration>)>,
    /// The validators of a fetched document (replacing the old ones).
    validators: Option<Validators>,
    /// A split fetch's coverage.
    split: Option<SplitReport>,
}

/// The sources and the jobs last seen, shared with the hub's observer (which must answer synchronously).
#[derive(Default)]
struct Known {
    jobs_by_channel: HashMap<String, JobSpec>,
}

pub struct Poller {
    hub: Hub,
    sources: Arc<Vec<Arc<Source>>>,
    store: Arc<JobStore>,
    known: Arc<Mutex<Known>>,
    client: Option<awc::Client>,
    lease: Duration,
    owned: HashMap<String, OwnedJob>,
    /// Channels being filled by a one-off fetch here.
    filling: HashSet<String>,
    scanning: bool,
    /// This replica's cache reads per source already added to the fleet's totals.
    cache_reported: HashMap<String, (u64, u64)>,
    /// Shutting down: take no job any more.
    stopping: bool,
    /// Jobs to start when the poller starts (the demo symbols).
    initial: Vec<(String, BTreeMap<String, String>)>,
}

/// The registries' view of the poller: answers `request_fill` from what the poller last saw, and forwards events.
pub struct PollerObserver {
    addr: Addr<Poller>,
    /// Where the per-source cache reads are counted.
    hub: Hub,
    sources: Arc<Vec<Arc<Source>>>,
    known: Arc<Mutex<Known>>,
}

impl ChannelObserver for PollerObserver {
    fn subscribers_changed(&self, channel: &str, count: usize) {
        if count > 0 {
            self.addr.do_send(Demanded {
                channel: channel.to_string(),
            });
        }
        if count > 0
            && self
                .sources
                .iter()
                .any(|s| s.auto_start && s.channel.match_channel(channel).is_some())
        {
            self.addr.do_send(AutoStart {
                channel: channel.to_string(),
            });
        }
    }

    fn request_fill(&self, channel: &str, read_at: Instant) -> bool {
        let channel = job_channel(&self.sources, channel);
        let channel = channel.as_str();
        let known = self
            .known
            .lock()
            .expect("poller state poisoned")
            .jobs_by_channel
            .contains_key(channel);
        let auto = self
            .sources
            .iter()
            .any(|s| s.auto_start && s.channel.match_channel(channel).is_some());
        if known || auto {
            self.addr.do_send(Fill {
                channel: channel.to_string(),
                at: read_at,
            });
        }
        known || auto
    }

    fn cache_read(&self, channel: &str, hits: u64, misses: u64) {
        if let Some(source) = self
            .sources
            .iter()
            .find(|s| s.channel.match_channel(channel).is_some())
        {
            self.hub.metrics().cache_read(&source.name, hits, misses);
        }
    }
}

impl Poller {
    /// Starts the poller on its own arbiter. Returns its address and the observer the registries tell about
    /// their channels.
    pub fn start(hub: Hub, sources: Vec<Source>) -> (Addr<Poller>, Arc<PollerObserver>) {
        let sources: Arc<Vec<Arc<Source>>> = Arc::new(sources.into_iter().map(Arc::new).collect());
        let known = Arc::new(Mutex::new(Known::default()));
        let config = hub.config();
        let initial = if config.demo.enabled {
            config
                .demo
                .symbols
                .iter()
                .map(|s| {
                    (
                        "demo".to_string(),
                        BTreeMap::from([("symbol".to_string(), s.clone())]),
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        let (store, lease, actor_hub) = (
            Arc::new(JobStore::new(hub.clone())),
            config.poller.lease,
            hub.clone(),
        );
        let (actor_sources, actor_known) = (sources.clone(), known.clone());
        let arbiter = Arbiter::new();
        // Built on the poller's own thread: the awc client it will hold is not `Send`.
        let addr = Poller::start_in_arbiter(&arbiter.handle(), move |_| Poller {
            store,
            lease,
            hub: actor_hub,
            sources: actor_sources,
            known: actor_known,
            client: None,
            owned: HashMap::new(),
            filling: HashSet::new(),
            scanning: false,
            cache_reported: HashMap::new(),
            stopping: false,
            initial,
        });
        let observer = Arc::new(PollerObserver {
            addr: addr.clone(),
            hub,
            sources,
            known,
        });
        (addr, observer)
    }

    fn source(&self, name: &str) -> Option<Arc<Source>> {
        self.sources.iter().find(|s| s.name == name).cloned()
    }

    fn make_job(
        &self,
        source: &str,
        params: BTreeMap<String, String>,
    ) -> Result<JobSpec, PollError> {
        let source = self
            .source(source)
            .ok_or_else(|| PollError::UnknownSource(format!("no source named `{source}`")))?;
        source
            .job(params)
            .map_err(|ParamError(e)| PollError::BadParams(e))
    }

    /// The auto-start job for a channel, if a source's template matches it.
    fn auto_job(&self, channel: &str) -> Option<JobSpec> {
        self.sources.iter().filter(|s| s.auto_start).find_map(|s| {
            let params = s.params_for_channel(channel)?;
            s.job(params).ok()
        })
    }

    /// Records the job and tries to own it right away (rather than at the next scan).
    fn start_job(&mut self, spec: JobSpec, ctx: &mut Context<Self>) {
        let store = self.store.clone();
        let lease = self.lease;
        let hub = self.hub.clone();
        let id = spec.id.clone();
        let channel = spec.channel.clone();
        let max = hub.config().poller.max_jobs;
        let fut = async move {
            if store.put(&spec, max).await? == Put::Full {
                Stats::add(&hub.stats().jobs_refused, 1);
                return Ok(None);
            }
            let acquired = store.acquire(&id, lease).await?;
            let previous = if acquired {
                previous_value(&hub, &channel).await
            } else {
                None
            };
            Ok::<_, RedisError>(Some((spec, acquired, previous)))
        };
        ctx.spawn(fut.into_actor(self).map(|result, act, ctx| match result {
            Ok(Some((spec, true, previous))) => act.own(spec, previous, ctx),
            Ok(Some((spec, false, _))) => act.remember(&spec),
            // Subscribers of the channel stay subscribed; they get what others publish, but nothing is polled.
            Ok(None) => log::debug!("polling job not started: poller.max_jobs jobs exist"),
            Err(e) => log::warn!("starting a polling job failed: {e}"),
        }));
    }

    fn remember(&self, spec: &JobSpec) {
        self.known
            .lock()
            .expect("poller state poisoned")
            .jobs_by_channel
            .insert(spec.channel.clone(), spec.clone());
    }

    /// Takes ownership of a job and fetches at once.
    fn own(&mut self, spec: JobSpec, previous: Option<Value>, ctx: &mut Context<Self>) {
        if self.owned.contains_key(&spec.id) {
            return;
        }
        let source = self.source(&spec.source).filter(|_| !self.stopping);
        let Some(source) = source else {
            if !self.stopping {
                log::warn!(
                    "job `{}` names source `{}`, which this replica does not have",
                    spec.id,
                    spec.source
                );
            }
            let store = self.store.clone();
            let id = spec.id.clone();
            actix::spawn(async move {
                let _ = store.release(&id).await;
            });
            return;
        };
        log::info!("polling job `{}` is now run by this replica", spec.id);
        self.remember(&spec);
        let id = spec.id.clone();
        let status = JobStatus {
            state: "running".into(),
            interval: format_duration(source.interval),
            since: Some(crate::core::protocol::now_ts()),
            ..JobStatus::default()
        };
        self.owned.insert(
            id.clone(),
            OwnedJob {
                spec,
                source,
                status,
                in_flight: false,
                previous,
                timer: None,
                idle_since: None,
                published_at: None,
                validators: Validators::default(),
            },
        );
        self.fetch(&id, false, ctx);
    }

    /// Stops running a job here (it was stopped, lost or is idle).
    fn disown(&mut self, id: &str, ctx: &mut Context<Self>) {
        if let Some(job) = self.owned.remove(id) {
            if let Some(timer) = job.timer {
                ctx.cancel_future(timer);
            }
            log::info!("polling job `{id}` is no longer run by this replica");
        }
    }

    fn schedule(&mut self, id: &str, after: Duration, ctx: &mut Context<Self>) {
        let key = id.to_string();
        let handle = ctx.run_later(after, move |act, ctx| act.fetch(&key, false, ctx));
        if let Some(job) = self.owned.get_mut(id) {
            if let Some(old) = job.timer.replace(handle) {
                ctx.cancel_future(old);
            }
            job.status.next_run = Some(rfc3339_in(after));
        }
    }

    /// One fetch of an owned job: fetch, transform, publish, then schedule the next by the outcome. `force`
    /// (a fill or a refresh) asks unconditionally and publishes even an unchanged value.
    fn fetch(&mut self, id: &str, force: bool, ctx: &mut Context<Self>) {
        let Some(job) = self.owned.get_mut(id) else {
            return;
        };
        if job.in_flight {
            return;
        }
        job.in_flight = true;
        if let Some(timer) = job.timer.take() {
            ctx.cancel_future(timer);
        }
        let client = self
            .client
            .clone()
            .expect("the client is built when the actor starts");
        let hub = self.hub.clone();
        let source = job.source.clone();
        let spec = job.spec.clone();
        let previous = job.previous.clone();
        let validators = (!force).then(|| job.validators.clone());
        let fut = async move {
            let started = Instant::now();
            let fetch =
                run_fetch(&client, &hub, &source, &spec, previous, validators.as_ref()).await;
            (fetch, started.elapsed())
        };
        let id = id.to_string();
        ctx.spawn(
            fut.into_actor(self)
                .map(move |(fetch, took), act, ctx| act.fetched(&id, fetch, took, ctx)),
        );
    }

    fn fetched(&mut self, id: &str, fetch: Fetch, took: Duration, ctx: &mut Context<Self>) {
        let hub = self.hub.clone();
        let stats = hub.stats();
        let Some(job) = self.owned.get_mut(id) else {
            return;
        };
        job.in_flight = false;
        if let Some(validators) = fetch.validators {
            job.validators = validators;
        }
        let interval = job.source.interval;
        // A fetch put off by the request budget made no request: it is not a fetch in the metrics.
        let result = match &fetch.result {
            Ok(Outcome::Published(_)) => Some(FetchResult::Published),
            Ok(Outcome::Unchanged) => Some(FetchResult::Unchanged),
            Ok(Outcome::NotModified) => Some(FetchResult::NotModified),
            Ok(Outcome::Delayed(_)) => None,
            Ok(Outcome::Split { published, .. }) if *published > 0 => Some(FetchResult::Published),
            Ok(Outcome::Split { .. }) => Some(FetchResult::Unchanged),
            Err(_) => Some(FetchResult::Error),
        };
        if let Some(report) = &fetch.split {
            job.status.split_channels = report.channels;
            job.status.split_dropped = report.dropped;
            if let Some(len) = report.over_limit {
                Stats::add(&stats.poll_split_over_limit, 1);
                let max = job.source.split.as_ref().map_or(0, |s| s.max);
                job.status.last_error = Some(format!(
                    "the split array has {len} elements, over max_split_elements = {max}: the rest were dropped"
                ));
            }
        }
        let now = crate::core::protocol::now_ts;
        let success = |job: &mut OwnedJob| {
            job.status.fetches += 1;
            job.status.state = "running".into();
            job.status.consecutive_failures = 0;
            job.status.retry_at = None;
            job.status.last_success = Some(now());
        };
        let delay = match fetch.result {
            Ok(Outcome::Published(value)) => {
                success(job);
                job.previous = Some(value);
                job.published_at = Some(Instant::now());
                job.status.last_change = job.status.last_success.clone();
                interval
            }
            Ok(Outcome::Split { published, values }) => {
                success(job);
                job.previous = Some(values);
                if published > 0 {
                    job.published_at = Some(Instant::now());
                    job.status.last_change = job.status.last_success.clone();
                } else {
                    job.status.unchanged += 1;
                    Stats::add(&stats.poll_unchanged, 1);
                }
                interval
            }
            Ok(Outcome::Unchanged) => {
                success(job);
                job.status.unchanged += 1;
                Stats::add(&stats.poll_unchanged, 1);
                interval
            }
            Ok(Outcome::NotModified) => {
                success(job);
                job.status.not_modified += 1;
                Stats::add(&stats.poll_not_modified, 1);
                interval
            }
            Ok(Outcome::Delayed(wait)) => {
                Stats::add(&stats.poll_delayed, 1);
                // Spread the jobs waiting on one budget, so they do not all ask at the same instant.
                backoff::jitter(wait, 0.2)
            }
            Err((e, retry_after)) => {
                job.status.fetches += 1;
                job.status.consecutive_failures += 1;
                job.status.state = "backoff".into();
                log::warn!(
                    "polling job `{id}` failed ({} in a row): {e}",
                    job.status.consecutive_failures
                );
                job.status.last_error = Some(e);
                match retry_after {
                    Some(after) if !after.is_zero() => {
                        Stats::add(&stats.poll_retry_after, 1);
                        let after = after.min(job.source.max_retry_after);
                        job.status.retry_at = Some(rfc3339_in(after));
                        after
                    }
                    _ => {
                        job.status.retry_at = None;
                        backoff::jitter(
                            backoff::retry_delay(interval, job.status.consecutive_failures),
                            0.1,
                        )
                    }
                }
            }
        };
        if let Some(result) = result {
            self.record_fetch(id, result, took);
        }
        self.schedule(id, delay, ctx);
        self.write_status(id);
    }

    /// The fetch metrics of the job's source; its failure gauge is the worst of the source's jobs here.
    fn record_fetch(&self, id: &str, result: FetchResult, took: Duration) {
        let Some(source) = self.owned.get(id).map(|job| job.source.name.as_str()) else {
            return;
        };
        let failures = self
            .owned
            .values()
            .filter(|job| job.source.name == source)
            .map(|job| job.status.consecutive_failures)
            .max()
            .unwrap_or(0);
        self.hub.metrics().fetched(source, result, took, failures);
    }

    fn write_status(&self, id: &str) {
        let Some(job) = self.owned.get(id) else {
            return;
        };
        let store = self.store.clone();
        let status = job.status.clone();
        let ttl = (self.lease * 3).max(Duration::from_secs(30));
        let id = id.to_string();
        actix::spawn(async move {
            if let Err(e) = store.write_status(&id, &status, ttl).await {
                log::debug!("writing the status of `{id}` failed: {e}");
            }
        });
    }

    /// Keeps fleet ownership right; runs every quarter lease (renewal at least every third, as required).
    fn scan(&mut self, ctx: &mut Context<Self>) {
        if self.scanning || self.stopping {
            return;
        }
        self.scanning = true;
        let store = self.store.clone();
        let hub = self.hub.clone();
        let lease = self.lease;
        let held: Vec<Held> = self
            .owned
            .values()
            .map(|j| Held {
                id: j.spec.id.clone(),
                channel: j.spec.channel.clone(),
                auto_stop: j.source.auto_stop,
            })
            .collect();
        // Cache reads counted here since the last report, added to the fleet's totals with this scan.
        let cache_deltas: Vec<(String, u64, u64)> = self
            .sources
            .iter()
            .filter_map(|source| {
                let (hits, misses) = hub.metrics().cache_reads(&source.name);
                let (h0, m0) = self
                    .cache_reported
                    .get(&source.name)
                    .copied()
                    .unwrap_or((0, 0));
                let delta = (hits.saturating_sub(h0), misses.saturating_sub(m0));
                (delta != (0, 0)).then(|| (source.name.clone(), delta.0, delta.1))
            })
            .collect();
        let fut = async move {
            let report = store.scan(&held, lease).await?;
            let cache_reported = match store.add_cache_reads(&cache_deltas).await {
                Ok(()) => cache_deltas,
                Err(e) => {
                    log::debug!("adding cache reads to the fleet's totals failed: {e}");
                    Vec::new()
                }
            };
            // Only jobs taken over need their last value (for `diff`): nothing per job in a steady scan.
            let mut previous = HashMap::new();
            for job in report
                .jobs
                .iter()
                .filter(|j| report.acquired.contains(&j.id))
            {
                previous.insert(job.id.clone(), previous_value(&hub, &job.channel).await);
            }
            Ok::<_, RedisError>(Scan {
                jobs: report.jobs,
                acquired: report.acquired,
                lost: report.lost,
                listening: report.listening,
                demand: report.demand,
                refresh: report.refresh,
                previous,
                cache_reported,
            })
        };
        ctx.spawn(fut.into_actor(self).map(|result, act, ctx| {
            act.scanning = false;
            match result {
                Ok(scan) => act.apply_scan(scan, ctx),
                Err(e) => log::warn!("polling job scan failed: {e}"),
            }
        }));
    }

    fn apply_scan(&mut self, mut scan: Scan, ctx: &mut Context<Self>) {
        for (source, hits, misses) in scan.cache_reported.drain(..) {
            let reported = self.cache_reported.entry(source).or_insert((0, 0));
            reported.0 += hits;
            reported.1 += misses;
        }
        {
            let mut known = self.known.lock().expect("poller state poisoned");
            known.jobs_by_channel = scan
                .jobs
                .iter()
                .map(|j| (j.channel.clone(), j.clone()))
                .collect();
        }
        for id in &scan.lost {
            self.disown(id, ctx);
        }
        for id in &scan.refresh {
            self.fetch(id, true, ctx);
        }
        for job in scan.jobs.iter().filter(|j| scan.acquired.contains(&j.id)) {
            let previous = scan.previous.remove(&job.id).flatten();
            self.own(job.clone(), previous, ctx);
        }
        for (id, job) in self.owned.iter_mut() {
            if let Some(&n) = scan.demand.get(id) {
                job.status.subscribers = n;
            }
        }
        let now = Instant::now();
        let mut idle = Vec::new();
        for (id, listening) in scan.listening {
            let Some(job) = self.owned.get_mut(&id) else {
                continue;
            };
            if listening {
                job.idle_since = None;
            } else if now.duration_since(*job.idle_since.get_or_insert(now))
                >= job.source.idle_grace
            {
                idle.push(id);
            }
        }
        for id in idle {
            log::info!("polling job `{id}` has had no subscriber for its idle grace: stopping it");
            self.stop(id, ctx);
        }
    }

    fn stop(&mut self, id: String, ctx: &mut Context<Self>) {
        self.disown(&id, ctx);
        let store = self.store.clone();
        actix::spawn(async move {
            if let Err(e) = store.remove(&id).await {
                log::warn!("removing job `{id}` failed: {e}");
            }
            let _ = store.release(&id).await;
        });
    }

    /// A one-off fetch for subscribers waiting on an empty channel (its cached value expired) whose job another
    /// replica owns: one replica fleet-wide does it, under a short lock.
    fn fill_remote(&mut self, spec: JobSpec, ctx: &mut Context<Self>) {
        if !self.filling.insert(spec.channel.clone()) {
            return;
        }
        let Some(source) = self.source(&spec.source) else {
            self.filling.remove(&spec.channel);
            return;
        };
        let client = self
            .client
            .clone()
            .expect("the client is built when the actor starts");
        let store = self.store.clone();
        let hub = self.hub.clone();
        let fut = async move {
            // A job with an owner is fetched by its owner (at once when it just took the job); otherwise one
            // replica fleet-wide fetches, under a short lock.
            let owned = store
                .holder(&spec.id)
                .await
                .map(|h| h.is_some())
                .unwrap_or(true);
            let locked = !owned
                && store
                    .fill_lock(&spec.channel, FILL_LOCK)
                    .await
                    .unwrap_or(false);
            if locked
                && let Err((e, _)) = run_fetch(&client, &hub, &source, &spec, None, None)
                    .await
                    .result
            {
                log::warn!("filling `{}` failed: {e}", spec.channel);
            }
            spec.channel
        };
        ctx.spawn(fut.into_actor(self).map(|channel, act, _| {
            act.filling.remove(&channel);
        }));
    }
}

/// The channel of the job that publishes `channel`: for an element of a split job the job's own channel
/// (`prices:*`), else `channel` itself.
fn job_channel(sources: &[Arc<Source>], channel: &str) -> String {
    sources
        .iter()
        .find_map(|s| s.job_channel_for(channel))
        .unwrap_or_else(|| channel.to_string())
}

/// The value a job last published (its cached latest value), so `diff` continues across an owner change.
async fn previous_value(hub: &Hub, channel: &str) -> Option<Value> {
    let latest = hub.cached_latest(channel).await?;
    serde_json::from_str(latest.data()).ok()
}

/// Fetches, transforms and publishes one value. `validators` make the request conditional; `None` (a fill
/// or a refresh) also publishes a value equal to `previous`.
async fn run_fetch(
    client: &awc::Client,
    hub: &Hub,
    source: &Source,
    spec: &JobSpec,
    previous: Option<Value>,
    validators: Option<&Validators>,
) -> Fetch {
    let mut fetched_validators = None;
    let mut split = None;
    let result = fetch_and_publish(
        client,
        hub,
        source,
        spec,
        previous,
        validators,
        (&mut fetched_validators, &mut split),
    )
    .await;
    Fetch {
        result,
        validators: fetched_validators,
        split,
    }
}

async fn fetch_and_publish(
    client: &awc::Client,
    hub: &Hub,
    source: &Source,
    spec: &JobSpec,
    previous: Option<Value>,
    validators: Option<&Validators>,
    (fetched_validators, split_report): (&mut Option<Validators>, &mut Option<SplitReport>),
) -> Result<Outcome, (String, Option<Duration>)> {
    let fail = |e: String| (e, None);
    // When the fetch began: what a `meta = true` source's frames carry as `fetched_at`.
    let fetched_at = source.meta.then(crate::core::protocol::now_ts);
    let fetched_at = fetched_at.as_deref();
    let raw = match source.kind {
        crate::core::config::SourceKind::Http => {
            let url = source
                .url_for(spec)
                .ok_or_else(|| fail("the job's URL cannot be built".into()))?;
            if let Some(spacing) = source.request_spacing {
                let wait = hub
                    .engine()
                    .take_turn(&source.name, spacing)
                    .await
                    .map_err(|e| fail(format!("the request budget is unavailable: {e}")))?;
                if !wait.is_zero() {
                    return Ok(Outcome::Delayed(wait));
                }
            }
            let fetched = fetch::fetch_conditional(
                client,
                &url,
                &source.headers,
                validators.unwrap_or(&Validators::default()),
                source.timeout,
                source.max_body_bytes,
            )
            .await
            .map_err(|e| match e {
                FetchError::RetryAfter(_, after) => (e.to_string(), Some(after)),
                e => fail(e.to_string()),
            })?;
            match fetched {
                Fetched::Body(value, v) => {
                    *fetched_validators = Some(v);
                    value
                }
                Fetched::NotModified if validators.is_some() && previous.is_some() => {
                    match &previous {
                        Some(Value::Object(elements)) if source.split.is_some() => {
                            for key in elements.keys() {
                                if let Ok(channel) = source.element_channel(spec, key) {
                                    keep_cached(hub, source, &channel).await;
                                }
                            }
                        }
                        _ => keep_cached(hub, source, &spec.channel).await,
                    }
                    return Ok(Outcome::NotModified);
                }
                // A 304 to an unconditional request (or with no value to keep) has nothing to publish.
                Fetched::NotModified => {
                    return Err(fail("HTTP status 304 to an unconditional request".into()));
                }
            }
        }
        crate::core::config::SourceKind::Redis => {
            read_redis_fields(hub, source).await.map_err(fail)?
        }
    };
    if let Some(split) = &source.split {
        let conditional = validators.is_some();
        let (outcome, report) = publish_split(
            hub,
            source,
            spec,
            split,
            raw,
            previous,
            (conditional, fetched_at),
        )
        .await?;
        *split_report = Some(report);
        return Ok(outcome);
    }
    let (value, undiffed) = shape(source, raw, previous.as_ref()).map_err(fail)?;
    if source.only_on_change
        && validators.is_some()
        && previous.as_ref() == Some(undiffed.as_ref().unwrap_or(&value))
    {
        keep_cached(hub, source, &spec.channel).await;
        return Ok(Outcome::Unchanged);
    }
    publish_value(hub, source, &spec.channel, &value, fetched_at)
        .await
        .map_err(fail)?;
    Ok(Outcome::Published(undiffed.unwrap_or(value)))
}

/// Publishes each element of a split document to its own channel: each has its own transforms' `previous`
/// (so its own `diff`), and under `on_change` only the elements that changed are published. `previous` is
/// the job's last values by element key; after a takeover (none yet) each element's cached value stands in.
async fn publish_split(
    hub: &Hub,
    source: &Source,
    spec: &JobSpec,
    split: &source::Split,
    mut document: Value,
    previous: Option<Value>,
    (conditional, fetched_at): (bool, Option<&str>),
) -> Result<(Outcome, SplitReport), (String, Option<Duration>)> {
    let fail = |e: String| (e, None);
    let items = match document.pointer_mut(&split.pointer).map(Value::take) {
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(fail(format!(
                "split `{}` selected something that is not an array",
                split.pointer
            )));
        }
        None => return Err(fail(format!("split `{}` selected nothing", split.pointer))),
    };
    let total = items.len();
    let mut previous = match previous {
        Some(Value::Object(elements)) => elements,
        _ => serde_json::Map::new(),
    };
    let takeover = previous.is_empty();
    let mut current = serde_json::Map::new();
    let mut dropped = total.saturating_sub(split.max);
    let mut published = 0;
    for item in items.into_iter().take(split.max) {
        let key = match item.get(&split.key) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => {
                dropped += 1;
                continue;
            }
        };
        let Ok(channel) = source.element_channel(spec, &key) else {
            dropped += 1;
            continue;
        };
        if current.contains_key(&key) {
            dropped += 1;
            continue;
        }
        let before = match previous.remove(&key) {
            Some(value) => Some(value),
            None if takeover => previous_value(hub, &channel).await,
            None => None,
        };
        let Ok((value, undiffed)) = shape(source, item, before.as_ref()) else {
            dropped += 1;
            continue;
        };
        if source.only_on_change
            && conditional
            && before.as_ref() == Some(undiffed.as_ref().unwrap_or(&value))
        {
            keep_cached(hub, source, &channel).await;
        } else {
            publish_value(hub, source, &channel, &value, fetched_at)
                .await
                .map_err(|e| fail(format!("element `{key}`: {e}")))?;
            published += 1;
        }
        current.insert(key, undiffed.unwrap_or(value));
    }
    if current.is_empty() && total > 0 {
        return Err(fail(format!(
            "no element of the split array has a usable `{}` (a string or number that makes a valid channel)",
            split.key
        )));
    }
    let report = SplitReport {
        channels: current.len(),
        dropped,
        over_limit: (total > split.max).then_some(total),
    };
    let outcome = Outcome::Split {
        published,
        values: Value::Object(current),
    };
    Ok((outcome, report))
}

/// The value a source publishes from what it fetched: the pointers, then `derive`, then `diff` (last, so it
/// also reports the changes of derived fields). With `diff`, also the value before it: what the job keeps as
/// `previous` and compares under `on_change`, so `_change` fields (which differ between a first value and an
/// unchanged second one) never make an unchanged value count as changed. `diff` ignores the previous
/// value's own `_change` fields, so it gives the same result from either.
fn shape(
    source: &Source,
    value: Value,
    previous: Option<&Value>,
) -> Result<(Value, Option<Value>), String> {
    let (diff, pointers) = match source.transforms.split_last() {
        Some((diff @ transform::Transform::Diff { .. }, rest)) => (Some(diff), rest),
        _ => (None, source.transforms.as_slice()),
    };
    let value = transform::apply_all(pointers, value, previous)?;
    let value = derive::apply(&source.derive, value)?;
    match diff {
        Some(diff) => Ok((diff.apply(value.clone(), previous)?, Some(value))),
        None => Ok((value, None)),
    }
}

/// Publishes one transformed value to `channel`, refusing one over the size limit.
async fn publish_value(
    hub: &Hub,
    source: &Source,
    channel: &str,
    value: &Value,
    fetched_at: Option<&str>,
) -> Result<(), String> {
    let text = value.to_string();
    if text.len()
        > hub
            .config()
            .websocket
            .max_message_bytes
            .max(source.max_body_bytes)
    {
        return Err(format!(
            "transformed value is {} bytes, over the limit",
            text.len()
        ));
    }
    hub.publish_with(channel, &text, source.ttl, fetched_at)
        .await
        .map_err(|crate::node::hub::PublishError::Unavailable(e)| e)?;
    Ok(())
}

/// An unchanged value stays cached as long as a publish would keep it (a failure only logs: the value is
/// still there until its TTL ends).
async fn keep_cached(hub: &Hub, source: &Source, channel: &str) {
    let ttl = source.ttl.unwrap_or_else(|| {
        hub.config()
            .policy(channel)
            .unwrap_or_else(|| hub.config().default_policy())
            .ttl
    });
    if let Err(e) = hub.engine().touch(channel, ttl).await {
        log::debug!("keeping `{channel}` cached failed: {e}");
    }
}

/// Reads a `redis` source's keys in one round trip and builds one object: numbers as numbers, missing as null.
async fn read_redis_fields(hub: &Hub, source: &Source) -> Result<Value, String> {
    let commands: Vec<(String, String)> = source
        .fields
        .iter()
        .map(|(_, command, key)| (command.clone(), key.clone()))
        .collect();
    let values = hub.engine().read_fields(&commands).await?;
    let mut object = serde_json::Map::new();
    for ((name, _, _), value) in source.fields.iter().zip(values) {
        object.insert(name.clone(), value);
    }
    Ok(Value::Object(object))
}

/// Whether a job has gone `stale_after` without a success (counted from when its owner took it when it
/// never succeeded).
fn is_stale(status: &JobStatus, stale_after: Duration) -> bool {
    let since = status.last_success.as_ref().or(status.since.as_ref());
    let Some(at) = since.and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()) else {
        return false;
    };
    let age = chrono::Utc::now().signed_duration_since(at);
    age.to_std().unwrap_or_default() > stale_after
}

fn rfc3339_in(after: Duration) -> String {
    let at = chrono::Utc::now() + chrono::Duration::from_std(after).unwrap_or_default();
    at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl Actor for Poller {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.client = Some(fetch::build_client());
        for (source, params) in std::mem::take(&mut self.initial) {
            match self.make_job(&source, params) {
                Ok(spec) => self.start_job(spec, ctx),
                Err(e) => log::warn!("demo job not started: {e:?}"),
            }
        }
        self.scan(ctx);
        ctx.run_interval(self.lease / 4, |act, ctx| act.scan(ctx));
    }
}

impl Handler<StartJob> for Poller {
    type Result = ResponseActFuture<Self, Result<JobSpec, PollError>>;

    fn handle(&mut self, msg: StartJob, _: &mut Self::Context) -> Self::Result {
        let spec = match self.make_job(&msg.source, msg.params) {
            Ok(spec) => spec,
            Err(e) => return Box::pin(fut::ready(Err(e))),
        };
        let store = self.store.clone();
        let lease = self.lease;
        let hub = self.hub.clone();
        let max = hub.config().poller.max_jobs;
        let fut = async move {
            if store.put(&spec, max).await? == Put::Full {
                Stats::add(&hub.stats().jobs_refused, 1);
                return Err(PollError::TooManyJobs(max));
            }
            let acquired = store.acquire(&spec.id, lease).await?;
            let previous = if acquired {
                previous_value(&hub, &spec.channel).await
            } else {
                None
            };
            Ok::<_, PollError>((spec, acquired, previous))
        };
        Box::pin(fut.into_actor(self).map(|result, act, ctx| {
            let (spec, acquired, previous) = result?;
            if acquired {
                act.own(spec.clone(), previous, ctx);
            } else {
                act.remember(&spec);
            }
            Ok(spec)
        }))
    }
}

impl Handler<StopJob> for Poller {
    type Result = ResponseActFuture<Self, Result<(), PollError>>;

    fn handle(&mut self, msg: StopJob, ctx: &mut Self::Context) -> Self::Result {
        self.disown(&msg.id, ctx);
        let store = self.store.clone();
        let id = msg.id;
        let fut = async move {
            let existed = store.remove(&id).await?;
            let _ = store.release(&id).await;
            if existed {
                Ok(())
            } else {
                Err(PollError::UnknownJob(id))
            }
        };
        Box::pin(fut.into_actor(self))
    }
}

impl Handler<RefreshJob> for Poller {
    type Result = ResponseActFuture<Self, Result<bool, PollError>>;

    fn handle(&mut self, msg: RefreshJob, ctx: &mut Self::Context) -> Self::Result {
        if self.owned.contains_key(&msg.id) {
            // Single flight: a fetch under way is the refresh; otherwise one starts now.
            self.fetch(&msg.id, true, ctx);
            return Box::pin(fut::ready(Ok(true)));
        }
        let store = self.store.clone();
        let lease = self.lease;
        let fut = async move {
            if !store.list().await?.iter().any(|j| j.id == msg.id) {
                return Err(PollError::UnknownJob(msg.id));
            }
            store.request_refresh(&msg.id, lease).await?;
            Ok(false)
        };
        Box::pin(fut.into_actor(self))
    }
}

impl Handler<ListJobs> for Poller {
    type Result = ResponseActFuture<Self, Result<Vec<Value>, PollError>>;

    fn handle(&mut self, _: ListJobs, _: &mut Self::Context) -> Self::Result {
        let store = self.store.clone();
        let fut = async move {
            let mut jobs = store.list().await?;
            jobs.sort_by(|a, b| a.id.cmp(&b.id));
            let ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
            let states = store.owners_and_statuses(&ids).await?;
            let demand = store.demand(&ids).await?;
            let sources: Vec<String> = jobs.iter().map(|j| j.source.clone()).collect();
            let cache_reads = store.cache_reads(&sources).await?;
            Ok::<_, PollError>((jobs, states, demand, cache_reads))
        };
        Box::pin(fut.into_actor(self).map(|result, act, _| {
            let (jobs, states, demand, cache_reads) = result?;
            Ok(jobs
                .into_iter()
                .zip(states)
                .enumerate()
                .map(|(i, (spec, (owner, status)))| {
                    // Every replica's subscribers as their scans last recorded them; in memory mode, ours.
                    let subscribers = match &demand {
                        Some(demand) => demand.get(i).copied().unwrap_or(0),
                        None => jobs::job_subscribers(&act.hub, &spec.channel),
                    };
                    let source = act.source(&spec.source);
                    let interval = source.as_ref().map(|s| format_duration(s.interval));
                    let stale = match (&source, &status) {
                        (Some(source), Some(status)) => Some(is_stale(status, source.stale_after)),
                        _ => None,
                    };
                    let status = status.unwrap_or_default();
                    // The fleet's totals as every replica's last scan added to them; in memory mode, ours.
                    let (cache_hits, cache_misses) = match &cache_reads {
                        Some(reads) => reads.get(i).copied().unwrap_or((0, 0)),
                        None => act.hub.metrics().cache_reads(&spec.source),
                    };
                    json!({
                        "id": spec.id,
                        "source": spec.source,
                        "params": spec.params,
                        "channel": spec.channel,
                        "owner": owner,
                        "state": if owner.is_some() && !status.state.is_empty() { status.state.as_str() } else { "waiting" },
                        "interval": interval,
                        "last_success": status.last_success,
                        "last_error": status.last_error,
                        "consecutive_failures": status.consecutive_failures,
                        "fetches": status.fetches,
                        "subscribers": subscribers,
                        "next_run": status.next_run,
                        "last_change": status.last_change,
                        "stale": stale,
                        "not_modified": status.not_modified,
                        "unchanged": status.unchanged,
                        "retry_at": status.retry_at,
                        "split_channels": source.as_ref().and_then(|s| s.split.as_ref()).map(|_| status.split_channels),
                        "split_dropped": source.as_ref().and_then(|s| s.split.as_ref()).map(|_| status.split_dropped),
                        "cache_hits": cache_hits,
                        "cache_misses": cache_misses,
                    })
                })
                .collect())
        }))
    }
}

impl Handler<ReleaseAll> for Poller {
    type Result = ResponseActFuture<Self, ()>;

    /// Graceful shutdown: stop every job, give every lease back, then stop the actor so no later scan takes
    /// a job again.
    fn handle(&mut self, _: ReleaseAll, ctx: &mut Self::Context) -> Self::Result {
        let ids: Vec<String> = self.owned.keys().cloned().collect();
        for id in &ids {
            self.disown(id, ctx);
        }
        self.stopping = true;
        let store = self.store.clone();
        Box::pin(
            async move {
                for id in ids {
                    let _ = store.release(&id).await;
                }
            }
            .into_actor(self)
            .map(|_, _, ctx| ctx.stop()),
        )
    }
}

impl Handler<Fill> for Poller {
    type Result = ();

    fn handle(&mut self, mut msg: Fill, ctx: &mut Self::Context) {
        // An element channel of a split job is filled by fetching the whole job.
        msg.channel = job_channel(&self.sources, &msg.channel);
        let owned = self
            .owned
            .values()
            .find(|j| j.spec.channel == msg.channel)
            .map(|j| {
                (
                    j.spec.id.clone(),
                    j.published_at.is_some_and(|t| t >= msg.at),
                )
            });
        if let Some((id, published_since)) = owned {
            // A value published since the request is already on its way to the waiting subscribers; else
            // fetch now (single flight: `fetch` does nothing while one is under way).
            if !published_since {
                self.fetch(&id, true, ctx);
            }
            return;
        }
        // An auto-start channel needs nothing more: whichever replica wins the job's lease fetches at once.
        let known = self
            .known
            .lock()
            .expect("poller state poisoned")
            .jobs_by_channel
            .get(&msg.channel)
            .cloned();
        if let Some(spec) = known {
            self.fill_remote(spec, ctx);
        }
    }
}

impl Handler<AutoStart> for Poller {
    type Result = ();

    fn handle(&mut self, msg: AutoStart, ctx: &mut Self::Context) {
        let channel = job_channel(&self.sources, &msg.channel);
        if self.owned.values().any(|j| j.spec.channel == channel) {
            return;
        }
        if let Some(spec) = self.auto_job(&msg.channel) {
            self.start_job(spec, ctx);
        }
    }
}

impl Handler<Demanded> for Poller {
    type Result = ();

    fn handle(&mut self, msg: Demanded, _: &mut Self::Context) {
        let channel = job_channel(&self.sources, &msg.channel);
        if self.owned.values().any(|j| j.spec.channel == channel) {
            // The owner counts its own subscribers when it decides.
            return;
        }
        let Some(id) = self
            .known
            .lock()
            .expect("poller state poisoned")
            .jobs_by_channel
            .get(&channel)
            .map(|j| j.id.clone())
        else {
            return;
        };
        let count = jobs::job_subscribers(&self.hub, &channel);
        let store = self.store.clone();
        let hold = self.lease;
        actix::spawn(async move {
            if let Err(e) = store.record_demand(&[(id, count)], hold).await {
                log::debug!("recording the demand for a job failed: {e}");
            }
        });
    }
}

/// Stop at once, keeping the leases: used to simulate a crashed replica.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Halt;

impl Handler<Halt> for Poller {
    type Result = ();

    fn handle(&mut self, _: Halt, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
