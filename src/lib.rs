//! relayhub: a realtime hub. Browsers subscribe to channels over one WebSocket and get the latest value at
//! once, then every update; Redis stays the shared source of truth between replicas.
//!
//! # Layout
//! - `config`: typed configuration (file, environment, defaults, validation).
//! - `protocol`: client frames in, server frames out, error and close codes.
//! - `publication`: one message encoded once, shared by every subscriber.
//! - `messages`: the actix messages between actors.
//! - `session`: the session actor, one per WebSocket: client requests, subscriptions, heartbeat.
//! - `transport`: relayhub's WebSocket transport: the upgrade, client frames decoded, frames encoded once, the
//!   socket loop.
//! - `server`: the listener, assembled so that WebSocket upgrades hand over the bare socket.
//! - `registry`: the channel-registry actor, one per worker thread: subscriptions, fan-out, latest values.
//! - `hub`: the handle everything holds: the publish path, registries, backend, counters.
//! - `store`: latest values and snapshots, in memory or in Redis (`keys` names every Redis key).
//! - `bridge`: the pubsub-bridge actor, relaying Redis pub/sub to the registries; `ingest` routes outside
//!   producers' own Redis channels into relayhub channels.
//! - `metrics`: the labeled counters of `GET /metrics` (the plain ones are `stats`).
//! - `poller`: the poller actor and its jobs (upstream fetches, leases, transforms).
//! - `logging`: the process's logger, text or one JSON object a line.
//! - `http`: the HTTP API and static files. `demo`: the built-in synthetic upstream.
//!
//! `start` builds and runs everything; the binary in `main.rs` only parses arguments and waits for a signal,
//! and tests call `start` with a config on port 0.

pub mod bridge;
pub mod config;
pub mod demo;
pub mod http;
pub mod hub;
pub mod ingest;
pub mod keys;
pub mod logging;
pub mod messages;
pub mod metrics;
pub mod poller;
pub mod protocol;
pub mod publication;
pub mod registry;
pub mod server;
pub mod session;
pub mod stats;
pub mod store;
pub mod transport;

use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_web::web;

use crate::config::Config;
use crate::hub::Hub;
use crate::store::{MemoryStore, RedisStore, Store};

/// Why the hub could not start. The binary exits with `exit_code()`.
#[derive(Debug)]
pub enum StartError {
    /// `redis.required = true` and Redis could not be reached.
    RedisRequired(String),
    /// The listen address could not be bound.
    Bind(String),
    /// A polling source could not be compiled.
    Config(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::RedisRequired(e) => write!(
                f,
                "redis.required is true but Redis is unreachable: {e}. Start Redis, fix redis.url (or REDIS_URL), or set redis.required = false to run in memory mode"
            ),
            StartError::Bind(e) => write!(f, "cannot listen: {e}"),
            StartError::Config(e) => write!(f, "config key {e}"),
        }
    }
}

impl StartError {
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::RedisRequired(_) => 3,
            StartError::Bind(_) => 4,
            StartError::Config(_) => 2,
        }
    }
}

/// A started hub: its address, its handle, and how to stop it.
pub struct Running {
    pub addr: SocketAddr,
    pub hub: Hub,
    poller: Addr<poller::Poller>,
    server: actix_server::ServerHandle,
    server_task: tokio::task::JoinHandle<std::io::Result<()>>,
    /// The `server.metrics_listen` listener, when configured.
    metrics_server: Option<actix_server::ServerHandle>,
}

impl Running {
    /// Graceful stop: `/ready` turns 503, clients get 1001, the server drains, all within `shutdown_timeout`.
    pub async fn shutdown(self) {
        let timeout = self.hub.config().server.shutdown_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        log::info!("shutting down: closing connections with 1001, releasing polling leases");
        self.hub.begin_shutdown();
        if let Some(metrics) = &self.metrics_server {
            metrics.stop(false).await;
        }
        let hub = self.hub.clone();
        let poller = self.poller.clone();
        let server = self.server.clone();
        let drain = async move {
            // Leases first (another replica takes the jobs at once), then give sessions a moment to write
            // their close frames before the workers stop.
            let _ = tokio::time::timeout(timeout / 4, poller.send(poller::ReleaseAll)).await;
            let drained = tokio::time::Instant::now() + timeout / 4;
            while stats::Stats::get(&hub.stats().connections) > 0
                && tokio::time::Instant::now() < drained
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            server.stop(true).await;
        };
        // Everything above, together, within shutdown_timeout.
        if tokio::time::timeout_at(deadline, drain).await.is_err() {
            log::warn!("shutdown took longer than server.shutdown_timeout; stopping anyway");
            self.server.stop(false).await;
        }
        let _ =
            tokio::time::timeout_at(deadline + Duration::from_millis(500), self.server_task).await;
    }

    /// Stops at once without closing clients or releasing leases: what a crash looks like to the fleet.
    pub async fn kill(self) {
        self.poller.do_send(poller::Halt);
        if let Some(metrics) = &self.metrics_server {
            metrics.stop(false).await;
        }
        self.server.stop(false).await;
        let _ = self.server_task.await;
    }
}

/// A random number from the standard library's per-process hasher keys (no `rand` dependency needed for
/// jitter and instance ids).
pub fn random_u64() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    hasher.finish()
}

/// A random number in [0, 1).
pub fn random_fraction() -> f64 {
    (random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

fn instance_id(config: &Config) -> String {
    if !config.server.instance_id.is_empty() {
        return config.server.instance_id.clone();
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "relayhub".into());
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        random_u64() & 0xffff
    )
}

/// How often memory mode reclaims expired values, and at most how many per sweep (the lock is held for it).
const MEMORY_SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);
const MEMORY_SWEEP_BATCH: usize = 2_000;

async fn open_store(config: &Config) -> Result<Store, StartError> {
    let memory = || {
        Store::Memory(MemoryStore::new(
            config.channels.max_channels,
            config.channels.max_memory,
        ))
    };
    if config.redis.url.is_empty() {
        if config.redis.required {
            return Err(StartError::RedisRequired("redis.url is empty".into()));
        }
        log::warn!("==========================================================================");
        log::warn!("MEMORY MODE: no Redis configured (redis.url / REDIS_URL). This instance keeps");
        log::warn!("values in memory and cannot share messages with other replicas: run ONE.");
        log::warn!("==========================================================================");
        return Ok(memory());
    }
    match RedisStore::connect(&config.redis).await {
        Ok(store) => {
            log::info!("redis mode: connected to {}", redact(&config.redis.url));
            Ok(Store::Redis(store))
        }
        Err(e) if config.redis.required => Err(StartError::RedisRequired(e.0)),
        Err(e) => {
            log::warn!(
                "=========================================================================="
            );
            log::warn!(
                "MEMORY MODE: Redis at {} is unreachable ({e}).",
                redact(&config.redis.url)
            );
            log::warn!(
                "redis.required = false, so this instance runs alone with values in memory;"
            );
            log::warn!("it will not see other replicas. Restart it once Redis is up.");
            log::warn!(
                "=========================================================================="
            );
            Ok(memory())
        }
    }
}

/// Hides a password in a Redis URL for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

fn warn_about_open_doors(config: &Config) {
    if config.server.api_key.is_empty() {
        log::warn!(
            "server.api_key is not set: POST /api/publish is open to anyone who can reach this port"
        );
    }
    if config.server.admin_token.is_empty() {
        log::warn!(
            "server.admin_token is not set: the polling API answers loopback clients only, and none that come \
             through a proxy (X-Forwarded-For, Forwarded, or a peer in server.trusted_proxies)"
        );
    }
    if config.server.allowed_origins.iter().any(|o| o == "*") {
        log::warn!("server.allowed_origins contains \"*\": any web page may connect to this hub");
    }
}

/// Starts the hub inside the current actix system and returns once it listens.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let config = Arc::new(config);
    warn_about_open_doors(&config);
    // The port first: nothing has started yet if it is taken.
    let bind_error = |e: std::io::Error| {
        StartError::Bind(format!(
            "{}:{}: {e}",
            config.server.host, config.server.port
        ))
    };
    let listeners = server::listen_all(&config).map_err(bind_error)?;
    let store = open_store(&config).await?;
    let redis_url = store.redis().map(|r| r.url().to_string());
    let hub = Hub::new(config.clone(), store, instance_id(&config));
    logging::set_instance_id(hub.instance_id());
    log::info!(
        "instance {} starting in {} mode",
        hub.instance_id(),
        hub.store().mode()
    );

    if let Some(url) = redis_url {
        let client = deadpool_redis::redis::Client::open(url.as_str())
            .map_err(|e| StartError::RedisRequired(e.to_string()))?;
        let bridge = bridge::Bridge::new(hub.clone(), client).start();
        hub.set_bridge(bridge);
    }

    if let Store::Memory(_) = hub.store() {
        // Expired values nobody reads again are reclaimed here, a bounded number per tick.
        let swept = hub.clone();
        actix_web::rt::spawn(async move {
            let mut tick = tokio::time::interval(MEMORY_SWEEP_INTERVAL);
            while !swept.is_shutting_down() {
                tick.tick().await;
                if let Store::Memory(memory) = swept.store() {
                    memory.sweep(MEMORY_SWEEP_BATCH);
                }
            }
        });
    }

    let poller_slot: http::polling::PollerSlot = Default::default();
    let demo_state = config
        .demo
        .enabled
        .then(|| web::Data::new(demo::DemoState::new()));
    let server = server::serve(
        listeners,
        &config,
        hub.clone(),
        poller_slot.clone(),
        demo_state,
    )
    .map_err(bind_error)?;
    let addr = server.addrs[0];
    let self_base = format!("http://127.0.0.1:{}", addr.port());
    let sources =
        poller::source::compile_sources(&config, &self_base).map_err(StartError::Config)?;
    let descriptions = serde_json::Value::Array(sources.iter().map(|s| s.describe()).collect());
    let poller = poller::Poller::start(hub.clone(), sources);
    let _ = poller_slot.set((poller.clone(), descriptions));
    let metrics_server = match config.server.metrics_listen.as_str() {
        "" => None,
        listen => {
            let server = http::metrics::serve(listen, hub.clone())
                .map_err(|e| StartError::Bind(format!("server.metrics_listen {listen}: {e}")))?;
            let handle = server.handle();
            actix_web::rt::spawn(server);
            log::info!("metrics on http://{listen}/metrics");
            Some(handle)
        }
    };
    let server = server.run();
    let handle = server.handle();
    let server_task = actix_web::rt::spawn(server);
    log::info!("listening on http://{addr}");
    Ok(Running {
        addr,
        hub,
        poller,
        server: handle,
        server_task,
        metrics_server,
    })
}
