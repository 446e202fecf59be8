//! The composition root: the only place that names concrete engines, and the one start order. Config checked
//! and compiled (sources, ingest routes), the port bound, the engine opened with the node's local delivery as
//! its event handler, the hub, the poller, then the server whose workers start their registries with the
//! poller's observer. Each part gets what it needs at construction; `Running` stops them in reverse.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_web::web;

use crate::core::config::Config;
use crate::core::token::Verifier;
use crate::demo;
use crate::engine::Engine;
use crate::engine::memory::MemoryEngine;
use crate::engine::redis::RedisEngine;
use crate::http::polling::PollerApi;
use crate::http::server;
use crate::node::fanout::Fanout;
use crate::node::hub::Hub;
use crate::poller;
use crate::stats::Stats;

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
    /// Graceful stop: `/ready` turns 503 and new WebSockets are refused at once; the replica keeps serving
    /// while it closes its clients with 1001, spread over `drain_period`; then the server drains. All within
    /// `shutdown_timeout`.
    pub async fn shutdown(self) {
        let config = self.hub.config();
        let timeout = config.server.shutdown_timeout;
        let drain_period = config.server.drain_period;
        let started = tokio::time::Instant::now();
        let deadline = started + timeout;
        log::info!(
            "shutting down: /ready is 503, closing connections with 1001 over {drain_period:?}, releasing polling leases"
        );
        self.hub.begin_shutdown();
        if let Some(metrics) = &self.metrics_server {
            metrics.stop(false).await;
        }
        let hub = self.hub.clone();
        let poller = self.poller.clone();
        let server = self.server.clone();
        let drain = async move {
            // Leases first (another replica takes the jobs at once), then wait for the spread closes and give
            // the last sessions a moment to write their close frames before the workers stop.
            let _ = tokio::time::timeout(timeout / 4, poller.send(poller::ReleaseAll)).await;
            let _ = tokio::time::timeout(timeout / 4, hub.engine().release_ingest_routes()).await;
            let drained = started + drain_period + (timeout - drain_period) / 2;
            while Stats::get(&hub.stats().connections) > 0 && tokio::time::Instant::now() < drained
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            server.stop(true).await;
            // The closed sessions' leaves, written and announced now rather than left to expire.
            hub.presence().flush().await;
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
        self.hub.presence().halt();
        if let Some(metrics) = &self.metrics_server {
            metrics.stop(false).await;
        }
        self.server.stop(false).await;
        let _ = self.server_task.await;
    }
}

/// Everything a start would refuse in the configuration, checked without starting: values first, then the
/// polling sources and ingest routes compiled.
pub fn check_config(config: &Config) -> Result<(), String> {
    config.validate().map_err(|e| e.to_string())?;
    poller::source::compile_sources(config, "http://127.0.0.1:0")
        .map_err(|e| format!("config key {e}"))?;
    crate::core::ingest::compile_routes(&config.ingest).map_err(|e| format!("config key {e}"))?;
    Verifier::from_config(&config.auth).map_err(|e| e.0)?;
    Ok(())
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
        crate::core::random::u64() & 0xffff
    )
}

/// Where Redis is, for the log, without passwords: the URL, or the cluster's seed nodes.
fn redis_target(config: &Config) -> String {
    if config.redis.is_cluster() {
        let nodes: Vec<String> = config
            .redis
            .cluster_nodes
            .iter()
            .map(|n| redact(n))
            .collect();
        format!("the redis cluster at {}", nodes.join(", "))
    } else {
        redact(&config.redis.url)
    }
}

async fn open_engine(
    config: &Arc<Config>,
    stats: &Arc<Stats>,
    fanout: &Arc<Fanout>,
    routes: Vec<crate::core::ingest::Route>,
    instance_id: &str,
) -> Result<Engine, StartError> {
    let memory = || Engine::from(MemoryEngine::new(config, fanout.clone(), instance_id));
    if !config.redis.is_configured() {
        if config.redis.required {
            return Err(StartError::RedisRequired(
                "redis.url and redis.cluster_nodes are empty".into(),
            ));
        }
        log::warn!("==========================================================================");
        log::warn!("MEMORY MODE: no Redis configured (redis.url / REDIS_URL). This instance keeps");
        log::warn!("values in memory and cannot share messages with other replicas: run ONE.");
        log::warn!("==========================================================================");
        return Ok(memory());
    }
    match RedisEngine::connect(
        config.clone(),
        stats.clone(),
        fanout.clone(),
        routes,
        instance_id,
    )
    .await
    {
        Ok(engine) => {
            log::info!("redis mode: connected to {}", redis_target(config));
            Ok(Engine::from(engine))
        }
        Err(e) if config.redis.required => Err(StartError::RedisRequired(e.0)),
        Err(e) => {
            log::warn!(
                "=========================================================================="
            );
            log::warn!(
                "MEMORY MODE: Redis at {} is unreachable ({e}).",
                redis_target(config)
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
    if !config.auth.enabled() {
        log::info!(
            "[auth] names no key: every connection is anonymous (see README, Authentication)"
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
    let addr = listeners[0].local_addr().map_err(bind_error)?;
    let self_base = format!("http://127.0.0.1:{}", addr.port());
    let sources =
        poller::source::compile_sources(&config, &self_base).map_err(StartError::Config)?;
    let routes = crate::core::ingest::compile_routes(&config.ingest).map_err(StartError::Config)?;
    let verifier = Verifier::from_config(&config.auth)
        .map_err(|e| StartError::Config(e.0.trim_start_matches("config key ").to_string()))?
        .map(Arc::new);

    let instance_id = instance_id(&config);
    let stats = Arc::new(Stats::default());
    let fanout = Arc::new(Fanout::new(&instance_id));
    if let Some(verifier) = &verifier
        && verifier.jwks().is_some()
    {
        crate::http::jwks::start(verifier, &config.auth, &stats).await;
        actix_web::rt::spawn(crate::http::jwks::run(
            verifier.clone(),
            config.auth.clone(),
            stats.clone(),
        ));
    }
    let engine = open_engine(&config, &stats, &fanout, routes, &instance_id).await?;
    let hub = Hub::new(config.clone(), stats, engine, fanout, instance_id, verifier);
    crate::logging::set_instance_id(hub.instance_id());
    log::info!(
        "instance {} starting in {} mode",
        hub.instance_id(),
        hub.mode()
    );

    let descriptions = serde_json::Value::Array(sources.iter().map(|s| s.describe()).collect());
    let (poller, observer) = poller::Poller::start(hub.clone(), sources);
    let poller_api = web::Data::new(PollerApi {
        poller: poller.clone(),
        sources: descriptions,
    });
    let demo_state = config
        .demo
        .enabled
        .then(|| web::Data::new(demo::DemoState::new()));
    let server = server::serve(
        listeners,
        &config,
        hub.clone(),
        poller_api,
        observer,
        demo_state,
    )
    .map_err(bind_error)?;
    let addr = server.addrs[0];
    let metrics_server = match config.server.metrics_listen.as_str() {
        "" => None,
        listen => {
            let server = crate::http::metrics::serve(listen, hub.clone())
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
