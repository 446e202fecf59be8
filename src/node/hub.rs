//! The hub: the cheap-to-clone handle the node's actors, the poller and the HTTP layer hold. It is the one
//! publish path (HTTP, client publishes and the poller all call `Hub::publish`) and the node's view of the
//! replica: configuration, counters, the engine, local delivery, shutdown. Everything in it is given at
//! construction.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::core::config::Config;
use crate::core::endpoint::Endpoints;
use crate::core::publication::Publication;
use crate::core::token::Verifier;
use crate::engine::{Engine, LinkHealth, MemoryUsage, Reach};
use crate::metrics::Metrics;
use crate::node::fanout::{Counts, Fanout};
use crate::node::messages::SessionId;
use crate::node::observer::ChannelObserver;
use crate::node::presence::Presence;
use crate::node::registry::Registry;
use crate::stats::Stats;

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

/// What `/ready` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Send clients here; `degraded` says what is wrong that taking this replica out would not fix.
    Ready { degraded: Option<&'static str> },
    /// Do not send clients here, and why.
    NotReady(&'static str),
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        matches!(self, Readiness::Ready { .. })
    }

    /// What is wrong while ready anyway.
    pub fn degraded(&self) -> Option<&'static str> {
        match self {
            Readiness::Ready { degraded } => *degraded,
            Readiness::NotReady(_) => None,
        }
    }
}

#[derive(Debug, Clone)]
pub enum PublishError {
    /// Nothing could take the message.
    Unavailable(String),
}

#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    config: Arc<Config>,
    instance_id: String,
    stats: Arc<Stats>,
    /// The labeled counters of `GET /metrics`, shared with the registries' fan-out.
    metrics: Arc<Metrics>,
    engine: Engine,
    /// The registries of the worker threads and the subscriber counts; the engine delivers through it.
    fanout: Arc<Fanout>,
    shutting_down: AtomicBool,
    next_session: AtomicU64,
    started: Instant,
    /// Verifies connection and subscription tokens; `None` when `[auth]` names no key.
    verifier: Option<Arc<Verifier>>,
    /// `[[endpoints]]`, parsed once (the config was validated before the hub was built).
    endpoints: Endpoints,
    /// This replica's presence members and the writer of their changes.
    presence: Arc<Presence>,
}

impl Hub {
    pub fn new(
        config: Arc<Config>,
        stats: Arc<Stats>,
        engine: Engine,
        fanout: Arc<Fanout>,
        instance_id: String,
        verifier: Option<Arc<Verifier>>,
    ) -> Hub {
        let metrics = Arc::new(Metrics::new(&config));
        let endpoints = config.compiled_endpoints().unwrap_or_default();
        let presence = Presence::start(engine.clone(), stats.clone(), config.channels.presence_ttl);
        Hub {
            inner: Arc::new(Inner {
                config,
                instance_id,
                stats,
                metrics,
                engine,
                fanout,
                shutting_down: AtomicBool::new(false),
                next_session: AtomicU64::new(1),
                started: Instant::now(),
                verifier,
                endpoints,
                presence,
            }),
        }
    }

    /// The drop-in endpoints a WebSocket upgrade's path may name.
    pub fn endpoints(&self) -> &Endpoints {
        &self.inner.endpoints
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The token verifier, when token auth is configured.
    pub fn verifier(&self) -> Option<&Verifier> {
        self.inner.verifier.as_deref()
    }

    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// The labeled counters of `GET /metrics` (the plain ones are in `stats`).
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// `memory` or `redis`.
    pub fn mode(&self) -> &'static str {
        self.inner.engine.mode()
    }

    /// Whether the pub/sub link is live (`pubsub_active`).
    pub fn link_active(&self) -> bool {
        self.inner.engine.link_active()
    }

    /// Memory mode: what the in-memory backend holds.
    pub fn memory_usage(&self) -> Option<MemoryUsage> {
        self.inner.engine.memory_usage()
    }

    pub fn instance_id(&self) -> &str {
        &self.inner.instance_id
    }

    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }

    /// Presence on this replica: sessions join and leave it.
    pub fn presence(&self) -> &Presence {
        &self.inner.presence
    }

    /// The id presence gives a connection of this replica (unique across the fleet).
    pub fn client_id(&self, session: SessionId) -> String {
        self.inner.fanout.client_id(session)
    }

    pub fn next_session_id(&self) -> SessionId {
        self.inner.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Starts a registry on the calling (worker) thread and adds it to the fan-out list; the first worker
    /// also runs the engine's listener (see `Engine::run_listener_here`).
    pub fn start_registry(&self, observer: Arc<dyn ChannelObserver>) -> Addr<Registry> {
        self.inner.engine.run_listener_here();
        Registry::new(
            self.inner.engine.clone(),
            self.inner.fanout.clone(),
            observer,
            self.inner.stats.clone(),
            self.inner.metrics.clone(),
            (
                self.config().channels.max_pattern_snapshots,
                self.config().channels.max_pattern_positions,
            ),
        )
        .start_here()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::Relaxed)
    }

    /// Whether a load balancer should send clients here, and if not, why. Not ready means taking this replica
    /// out helps: it is starting, draining, or its own pub/sub link is dead while Redis answers. With Redis
    /// itself unreachable every replica is alike, so it stays ready (clients stay connected and local
    /// delivery works) and reports the degradation instead.
    pub fn readiness(&self) -> Readiness {
        if self.is_shutting_down() {
            return Readiness::NotReady("draining");
        }
        let Some(link) = self.inner.engine.link_health() else {
            return Readiness::Ready { degraded: None };
        };
        match (link.linked, link.ever_linked, link.reach) {
            (true, _, _) => Readiness::Ready { degraded: None },
            (false, false, _) => {
                Readiness::NotReady("starting: the redis pub/sub link is not live yet")
            }
            (false, true, Reach::Answering) => {
                Readiness::NotReady("redis pub/sub link is down while redis answers commands")
            }
            (false, true, Reach::Unreachable) => Readiness::Ready {
                degraded: Some("redis unreachable"),
            },
            (false, true, Reach::Unknown) => Readiness::Ready {
                degraded: Some("redis pub/sub link is down"),
            },
        }
    }

    /// The shared backend's link state (`None` in memory mode).
    pub fn link_health(&self) -> Option<LinkHealth> {
        self.inner.engine.link_health()
    }

    /// Turns `/ready` to 503, refuses new WebSockets and closes the open ones with 1001, spread over
    /// `server.drain_period`.
    pub fn begin_shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::Relaxed);
        self.inner
            .fanout
            .close_all(self.inner.config.server.drain_period);
    }

    /// Publishes `data` (valid JSON) to `channel` (a valid name): records it as the latest value and snapshot,
    /// assigns its sequence number and delivers it to every subscriber of every replica exactly once.
    pub async fn publish(&self, channel: &str, data: &str) -> Result<PublishOutcome, PublishError> {
        self.publish_with(channel, data, None, None).await
    }

    /// `publish` with the cache lifetime overridden (a polling source's `ttl`) and, for a source with
    /// `meta = true`, the fetch time carried beside `data` (RFC 3339).
    pub async fn publish_with(
        &self,
        channel: &str,
        data: &str,
        ttl: Option<Duration>,
        fetched_at: Option<&str>,
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
        let published = self
            .inner
            .engine
            .publish(channel, data, fetched_at, policy)
            .await;
        Ok(PublishOutcome {
            seq: published.seq,
            delivered: published
                .receivers
                .unwrap_or_else(|| self.local_subscribers(channel) as u64),
            relayed: published.relayed,
        })
    }

    /// The latest value of a channel from the backend (cache-aside source of snapshots and the REST view).
    pub async fn cached_latest(&self, channel: &str) -> Option<Arc<Publication>> {
        self.inner.engine.latest(channel).await
    }

    /// Local subscribers of a channel: exact subscriptions plus patterns that match it.
    pub fn local_subscribers(&self, channel: &str) -> usize {
        self.inner.fanout.local_subscribers(channel)
    }

    /// Subscriber counts per channel, and per pattern (`prices:*`), for stats.
    pub fn subscriber_counts(&self) -> (Counts, Counts) {
        self.inner.fanout.subscriber_counts()
    }
}
