//! Typed configuration: one struct per component, read once at start (file, then environment) and handed down.
//! Every field has a default, so a config file sets only the keys it changes; unknown keys and bad values are
//! errors that name the key, and the binary exits with code 2 on them.

use std::collections::BTreeMap;

use crate::core::endpoint::{Endpoints, Format, Spec};
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The configuration embedded in the binary: what `relayhub` runs with when no file is given.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/default.toml");

/// Everything relayhub can be told.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Listener, HTTP API and shutdown.
    pub server: ServerConfig,
    /// Per-connection limits and heartbeat.
    pub websocket: WebsocketConfig,
    /// Redis connection; empty `url` means the in-memory backend.
    pub redis: RedisConfig,
    /// Defaults that apply to every channel whose namespace has no table of its own.
    pub channels: ChannelsConfig,
    /// Per-namespace settings (`[namespaces.chat]`), keyed by the part of a channel name before the first `:`
    /// (the whole name when it has none).
    pub namespaces: BTreeMap<String, NamespaceConfig>,
    /// Upstream sources the poller can run jobs from.
    pub sources: Vec<SourceConfig>,
    /// Routes that relay a Redis channel of an outside producer into relayhub channels.
    pub ingest: Vec<IngestConfig>,
    /// WebSocket paths bound to a channel or pattern, for front ends written for another server.
    pub endpoints: Vec<EndpointConfig>,
    /// The built-in synthetic upstream, so a fresh start shows moving data.
    pub demo: DemoConfig,
    /// The poller's fleet coordination.
    pub poller: PollerConfig,
    /// Log format and level.
    pub log: LogConfig,
    /// Token authentication (JWT); with no key configured, connections are anonymous.
    pub auth: AuthConfig,
}

/// Where the keys that verify tokens come from, and what a token must say. At most one key source; none
/// leaves token auth off (every connection anonymous, every namespace open as configured).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Shared secret of HS256 tokens (`RELAYHUB_JWT_SECRET` overrides it); at least 32 bytes.
    pub jwt_hs256_secret: String,
    /// PEM file with the public key of RS256 (RSA key) or ES256 (P-256 key) tokens; the algorithm is taken
    /// from the key, never from a token's header.
    pub jwt_public_key_file: String,
    /// When set, a token's `iss` must equal it.
    pub issuer: String,
    /// When set, a token's `aud` must contain it.
    pub audience: String,
    /// URL of a JWKS (the identity provider's public keys, RS256 and ES256, by `kid`): fetched at start,
    /// every `jwks_refresh_interval`, and when a token names a `kid` the cached set lacks.
    pub jwks_url: String,
    /// Time allowed for one JWKS fetch, body included.
    #[serde(deserialize_with = "de_duration")]
    pub jwks_timeout: Duration,
    /// Largest JWKS body accepted.
    pub jwks_max_bytes: usize,
    /// Fetches asked for by unknown `kid`s are at least this far apart: made-up `kid`s cannot hammer the
    /// identity provider.
    #[serde(deserialize_with = "de_duration")]
    pub jwks_min_refresh_interval: Duration,
    /// How often the JWKS is fetched anyway.
    #[serde(deserialize_with = "de_duration")]
    pub jwks_refresh_interval: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt_hs256_secret: String::new(),
            jwt_public_key_file: String::new(),
            issuer: String::new(),
            audience: String::new(),
            jwks_url: String::new(),
            jwks_timeout: Duration::from_secs(5),
            jwks_max_bytes: 1024 * 1024,
            jwks_min_refresh_interval: Duration::from_secs(30),
            jwks_refresh_interval: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (for people) or `json` (one object a line, for a log shipper). `RELAYHUB_LOG_FORMAT` overrides.
    pub format: LogFormat,
    /// The log filter when `RUST_LOG` is not set: a level (`info`) or env_logger directives
    /// (`warn,relayhub=debug`).
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to bind.
    pub host: String,
    /// Port to bind (`PORT` overrides it).
    pub port: u16,
    /// HTTP worker threads; 0 means one per available core.
    pub workers: usize,
    /// Origins allowed to open a WebSocket and to call the HTTP API from a browser. Entries: an exact origin
    /// (`https://app.example.com`), one with a wildcard port (`http://localhost:*`), `self` (the hub's own
    /// origin, whatever host it is reached by) or `*` (anyone; logged as a warning).
    pub allowed_origins: Vec<String>,
    /// Key required by `POST /api/publish` as `Authorization: Bearer <key>`; empty leaves the API open.
    pub api_key: String,
    /// Token required by the polling control API; empty restricts it to loopback clients that did not come
    /// through a proxy.
    pub admin_token: String,
    /// Reverse proxies (IPs or CIDR ranges, `10.0.0.0/8`) whose `X-Forwarded-For` names the client for the
    /// per-address connection budget. Without an admin token, a request from one of them is never trusted
    /// as loopback.
    pub trusted_proxies: Vec<String>,
    /// Open WebSocket connections this replica accepts; past it, a handshake is answered 503.
    pub max_connections: usize,
    /// Open WebSocket connections one client address may hold; past it, a handshake is answered 503.
    pub max_connections_per_ip: usize,
    /// How long a graceful shutdown may take before the process exits anyway.
    #[serde(deserialize_with = "de_duration")]
    pub shutdown_timeout: Duration,
    /// On a graceful shutdown, the WebSocket closes (1001) are spread over this long, so a balancer sees the
    /// replica leave through `/ready` and the survivors take its clients a few at a time, not as one herd.
    /// Must be shorter than `shutdown_timeout`.
    #[serde(deserialize_with = "de_duration")]
    pub drain_period: Duration,
    /// This replica's name in stats and job ownership; empty picks `<hostname>-<pid>-<random>`.
    pub instance_id: String,
    /// A directory whose files are served at `/` instead of the dashboard and client built into the binary
    /// (for developing them without a rebuild); empty serves the built-in ones.
    pub web_root: String,
    /// A second address (`127.0.0.1:9090`) that serves only `GET /metrics`, for a scraper kept off the
    /// public port; empty serves metrics on the main port only. They are on the main port either way.
    pub metrics_listen: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "0.0.0.0".into(),
            port: 8080,
            workers: 0,
            allowed_origins: vec![
                "self".into(),
                "http://localhost:*".into(),
                "http://127.0.0.1:*".into(),
            ],
            api_key: String::new(),
            admin_token: String::new(),
            trusted_proxies: Vec::new(),
            max_connections: 100_000,
            max_connections_per_ip: 1000,
            shutdown_timeout: Duration::from_secs(15),
            drain_period: Duration::from_secs(10),
            instance_id: String::new(),
            web_root: String::new(),
            metrics_listen: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebsocketConfig {
    /// How often the server pings each client.
    #[serde(deserialize_with = "de_duration")]
    pub heartbeat_interval: Duration,
    /// A client that sends nothing (not even a pong) for this long is disconnected.
    #[serde(deserialize_with = "de_duration")]
    pub client_timeout: Duration,
    /// Largest accepted frame; a larger one closes the connection with 1009. Also the HTTP publish body limit.
    pub max_message_bytes: usize,
    /// Subscriptions one connection may hold at once.
    pub max_subscriptions_per_connection: usize,
    /// Outgoing messages queued for one connection before it counts as a slow consumer.
    pub mailbox_size: usize,
    /// Outgoing bytes owed to one connection (queued or being written) before it counts as a slow consumer.
    /// Past half of it (or half of `mailbox_size`) the connection's own requests are not read until it drains.
    pub max_queued_bytes: usize,
    /// A connection owing bytes whose socket takes none for this long is aborted (socket dropped, no close
    /// handshake): a client that stopped reading cannot hold its socket, session and queue forever.
    #[serde(deserialize_with = "de_duration")]
    pub write_timeout: Duration,
    /// Frames for one connection that arrive within this long of the first leave in one write (0: each
    /// batch goes out as soon as the socket takes it). Fewer system calls per delivery, at up to this much
    /// added latency.
    #[serde(deserialize_with = "de_duration")]
    pub write_delay: Duration,
    /// Pattern subscriptions (`prices:*`) one connection may hold at once; each one is checked against every
    /// message of its namespace, so they cost more than exact channels.
    pub max_patterns_per_connection: usize,
    /// Requests (text frames) per second one connection may make on average; more are answered `rate_limited`.
    pub requests_per_second: u32,
    /// Requests one connection may make at once above the average rate (the token bucket's size).
    pub request_burst: u32,
    /// A connection refused at least once in every second for this long is closed with 1008.
    #[serde(deserialize_with = "de_duration")]
    pub rate_limited_close_after: Duration,
}

impl Default for WebsocketConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(30),
            client_timeout: Duration::from_secs(60),
            max_message_bytes: 64 * 1024,
            max_subscriptions_per_connection: 128,
            mailbox_size: 1024,
            max_queued_bytes: 1024 * 1024,
            write_timeout: Duration::from_secs(10),
            write_delay: Duration::ZERO,
            max_patterns_per_connection: 16,
            requests_per_second: 50,
            request_burst: 200,
            rate_limited_close_after: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[:password@]host:port[/db]`; empty means memory mode. `REDIS_URL`, or `REDIS_HOST`,
    /// `REDIS_PORT` and `REDIS_PASSWORD`, override it.
    pub url: String,
    /// Seed nodes of a Redis Cluster (`redis://host:port`); non-empty means cluster mode, where `url` stays
    /// empty. `REDIS_CLUSTER_NODES` (comma separated) overrides it.
    pub cluster_nodes: Vec<String>,
    /// When true, a Redis that cannot be reached at start is fatal instead of a fall back to memory mode.
    pub required: bool,
    /// Prefix of every key and channel relayhub uses.
    pub prefix: String,
    /// Pooled connections for commands (the pub/sub connection is separate); in cluster mode, the commands in
    /// flight on each node's connection.
    pub pool_size: usize,
    /// Time allowed to open a connection.
    #[serde(deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// Time allowed for one command or script.
    #[serde(deserialize_with = "de_duration")]
    pub command_timeout: Duration,
    /// How often the bridge sends a probe through its own pub/sub connection to prove it is alive.
    #[serde(deserialize_with = "de_duration")]
    pub probe_interval: Duration,
    /// How long an `[[ingest]]` route's lease lasts: one replica at a time takes the route's messages into
    /// the sequenced path, renewing every third of this; another takes over this long after it stops.
    #[serde(deserialize_with = "de_duration")]
    pub ingest_lease: Duration,
}

impl RedisConfig {
    /// Cluster mode: keys carry hash tags, messages go through sharded pub/sub.
    pub fn is_cluster(&self) -> bool {
        !self.cluster_nodes.is_empty()
    }

    /// Why a pattern subscription is refused in cluster mode (the same words on every transport).
    pub const NO_PATTERNS_IN_CLUSTER: &'static str = "pattern subscriptions are not available: this hub runs on a Redis Cluster, whose sharded pub/sub has no patterns";

    /// Whether a Redis (one, or a cluster) is configured at all.
    pub fn is_configured(&self) -> bool {
        !self.url.is_empty() || self.is_cluster()
    }
}

/// What is wrong with a cluster seed node's URL, if anything: `redis://` or `rediss://`, a host and a port.
fn node_url_problem(node: &str) -> Option<&'static str> {
    let Some(rest) = node
        .strip_prefix("redis://")
        .or_else(|| node.strip_prefix("rediss://"))
    else {
        return Some("must start with redis:// or rediss://");
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    let Some((host, port)) = host_port.rsplit_once(':') else {
        return Some("must name host:port");
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Some("must name a host");
    }
    if port.parse::<u16>().map_or(true, |p| p == 0) {
        return Some("must name a port from 1 to 65535");
    }
    None
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            cluster_nodes: Vec::new(),
            required: false,
            prefix: "relayhub:".into(),
            pool_size: 16,
            connect_timeout: Duration::from_secs(2),
            command_timeout: Duration::from_secs(2),
            probe_interval: Duration::from_secs(3),
            ingest_lease: Duration::from_secs(3),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChannelsConfig {
    /// Most channels whose latest value the in-memory backend keeps; the least recently published is evicted.
    pub max_channels: usize,
    /// When true, channels in namespaces with no `[namespaces.X]` table are refused with `invalid_channel`.
    pub strict_namespaces: bool,
    /// Default lifetime of a channel's latest value and snapshots.
    #[serde(deserialize_with = "de_duration")]
    pub ttl: Duration,
    /// Default number of snapshots kept per channel: the history a resubscribing client recovers from.
    pub history_size: usize,
    /// Default age past which a message no longer counts as history (a client that missed it gets
    /// `recovered:false` and a snapshot).
    #[serde(deserialize_with = "de_duration")]
    pub history_ttl: Duration,
    /// Default treatment of a connection whose queue is over its bound.
    pub slow_consumer: SlowConsumer,
    /// Most snapshots sent when a pattern subscription starts.
    pub max_pattern_snapshots: usize,
    /// Most channels whose position a connection keeps for its pattern subscriptions (and most channels a
    /// pattern subscribe's `since` may name); messages of further channels are delivered without one.
    pub max_pattern_positions: usize,
    /// Memory mode: most bytes of latest values and snapshots kept; the least recently published channels
    /// are evicted first.
    pub max_memory: usize,
    /// Redis mode: most keys a pattern subscription's snapshot look-up examines (SCAN work), however many
    /// keys Redis holds.
    pub max_pattern_scan: usize,
    /// Redis mode: pattern snapshot look-ups running at once; more wait, so they never take the pool from
    /// publishes.
    pub max_concurrent_pattern_scans: usize,
    /// How long a replica's presence entries outlive its last refresh: the members of a replica that died
    /// leave presence within it (each replica refreshes its own every third of it).
    #[serde(deserialize_with = "de_duration")]
    pub presence_ttl: Duration,
    /// Most members one presence answer (WebSocket or REST) lists; past it the answer says `truncated`.
    pub max_presence_members: usize,
}

impl Default for ChannelsConfig {
    fn default() -> Self {
        Self {
            max_channels: 100_000,
            strict_namespaces: false,
            ttl: Duration::from_secs(24 * 3600),
            history_size: 3,
            history_ttl: Duration::from_secs(600),
            slow_consumer: SlowConsumer::Disconnect,
            max_pattern_snapshots: 100,
            max_pattern_positions: 256,
            max_memory: 256 * 1024 * 1024,
            max_pattern_scan: 10_000,
            max_concurrent_pattern_scans: 2,
            presence_ttl: Duration::from_secs(30),
            max_presence_members: 1_000,
        }
    }
}

/// Settings of one namespace; unset fields take the `[channels]` defaults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NamespaceConfig {
    /// Whether WebSocket clients may publish to channels of this namespace.
    pub client_publish: bool,
    /// Whether clients may subscribe to patterns such as `prices:*` here.
    pub patterns: bool,
    /// Lifetime of the latest value and snapshots.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub ttl: Option<Duration>,
    /// Snapshots kept per channel.
    pub history_size: Option<usize>,
    /// Age past which a message no longer counts as history.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub history_ttl: Option<Duration>,
    /// `false`: only connections with a valid token may subscribe here (default `true`). Needs `[auth]`.
    pub anonymous: Option<bool>,
    /// `true`: only connections whose token's `channels` claim matches the channel, or that present a
    /// subscription token for it, may subscribe (default `false`). Needs `[auth]`.
    pub private: bool,
    /// What happens to a connection over its queue bound, for this namespace's messages.
    pub slow_consumer: Option<SlowConsumer>,
    /// Whether the subscribers of a channel here are listed by `presence` (WebSocket) and
    /// `GET /api/channels/{c}/presence`.
    pub presence: bool,
    /// Whether the subscribers of a channel here are told when a client subscribes (`join`) or leaves it.
    pub join_leave: bool,
}

/// What the hub does with a connection whose outgoing queue is over `websocket.mailbox_size` or
/// `websocket.max_queued_bytes` when a message of a channel arrives for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlowConsumer {
    /// Close it (1008): it reconnects and starts from a snapshot or recovers with `since`.
    #[default]
    Disconnect,
    /// Keep it, and keep only the newest pending message of each of its channels until it reads again:
    /// right for latest-value channels (prices, stats), where an old value is worth nothing.
    Conflate,
}

/// The effective settings for one channel, resolved from its namespace and the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelPolicy {
    pub client_publish: bool,
    pub patterns: bool,
    /// Subscribing needs no token.
    pub anonymous: bool,
    /// Subscribing needs a `channels` claim or a subscription token for the channel.
    pub private: bool,
    pub ttl: Duration,
    pub history_size: usize,
    pub history_ttl: Duration,
    pub slow_consumer: SlowConsumer,
    /// Subscribers are listed by presence queries.
    pub presence: bool,
    /// Subscribers hear `join` and `leave`.
    pub join_leave: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SourceConfig {
    /// Name used by the polling API.
    pub name: String,
    /// `http` (fetch a URL) or `redis` (read keys).
    pub kind: SourceKind,
    /// URL template with `{param}` placeholders (http sources). `{self}` is this hub's own loopback address.
    pub url: String,
    /// Channel template with the same placeholders.
    pub channel: String,
    /// Time between fetches.
    #[serde(deserialize_with = "de_duration")]
    pub interval: Duration,
    /// Lifetime of the cached latest value.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub ttl: Option<Duration>,
    /// Time allowed for one fetch.
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Request headers; values may name environment variables as `${NAME}`.
    pub headers: BTreeMap<String, String>,
    /// Transforms applied in order: JSON Pointers (`/data`) and `diff` / `diff:<key>`.
    pub transform: Vec<String>,
    /// Fields of a `redis` source: field name = one read command (`GET key`, `LLEN key`, `HGETALL key`, `ZCARD key`).
    pub fields: BTreeMap<String, String>,
    /// Publish only when the value changed (redis sources).
    pub only_on_change: bool,
    /// Stop the job once its channel has had no subscriber for `idle_grace`.
    pub auto_stop: bool,
    /// Start a job when a client subscribes to a channel matching the template.
    pub auto_start: bool,
    /// How long a job may run without subscribers before `auto_stop` stops it.
    #[serde(deserialize_with = "de_duration")]
    pub idle_grace: Duration,
    /// Largest upstream body accepted.
    pub max_body_bytes: usize,
    /// `on_change` (default): a transformed value equal to the last one published is not published again
    /// (its cached copy is kept alive); `always`: every successful fetch is published.
    pub publish: PublishMode,
    /// Upstream requests allowed per minute for all of this source's jobs together, fleet-wide (0: no
    /// limit). Fetches past it wait for their turn; none is dropped.
    pub max_requests_per_minute: u32,
    /// Longest wait a `Retry-After` from the upstream may impose (a longer one is cut to this).
    #[serde(deserialize_with = "de_duration")]
    pub max_retry_after: Duration,
    /// A job is reported `stale` after this long without a successful fetch (default: 3 intervals).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub stale_after: Option<Duration>,
    /// JSON Pointer to an array in the fetched document (`""`: the document itself): each element is
    /// published to its own channel, the channel template's `{key}` taken from the element's `split_key`.
    pub split: Option<String>,
    /// With `split`: the field of each element that names its channel.
    pub split_key: String,
    /// With `split`: most elements one fetch publishes (the upstream decides how many it sends, and each
    /// element is a channel with its own keys); the rest are dropped and counted.
    pub max_split_elements: usize,
    /// Frames of this source's channels carry `"fetched_at"` (RFC 3339, when the fetch began) beside `data`.
    pub meta: bool,
    /// Fields computed into each value (each element with `split`): `"name = expression"`, in order.
    pub derive: Vec<String>,
}

/// When a polling source publishes what it fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PublishMode {
    Always,
    OnChange,
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            kind: SourceKind::Http,
            url: String::new(),
            channel: String::new(),
            interval: Duration::from_secs(5),
            ttl: None,
            timeout: Duration::from_secs(5),
            headers: BTreeMap::new(),
            transform: Vec::new(),
            fields: BTreeMap::new(),
            only_on_change: true,
            auto_stop: false,
            auto_start: false,
            idle_grace: Duration::from_secs(60),
            max_body_bytes: 4 * 1024 * 1024,
            publish: PublishMode::OnChange,
            max_requests_per_minute: 0,
            max_retry_after: Duration::from_secs(3600),
            stale_after: None,
            split: None,
            split_key: String::new(),
            max_split_elements: 1000,
            meta: false,
            derive: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Http,
    Redis,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// The producer's Redis channel, or a pattern (a `*` makes it a PSUBSCRIBE).
    pub redis_channel: String,
    /// Target channel template; `{field}` or `{/json/pointer}` are taken from each message.
    pub channel: String,
    /// Also update the latest value and snapshots.
    pub cache: bool,
}

/// One `[[endpoints]]` table as written (checked and parsed by `core::endpoint`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EndpointConfig {
    /// The path template; `{name}` captures one whole segment.
    pub path: String,
    /// The channel template, naming captures of `path`.
    pub channel: String,
    /// Captured values standing for something else (`{ ALL = "*" }` turns `crypto:{symbol}` into `crypto:*`).
    pub alias: BTreeMap<String, String>,
    /// `raw` or `envelope`.
    pub format: Format,
    /// Send the latest value first.
    pub snapshot: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DemoConfig {
    /// Serve `/demo/` and define the `demo` source (prices that random-walk).
    pub enabled: bool,
    /// Symbols whose demo jobs start with the hub.
    pub symbols: Vec<String>,
    /// Interval of the demo jobs.
    #[serde(deserialize_with = "de_duration")]
    pub interval: Duration,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            symbols: Vec::new(),
            interval: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PollerConfig {
    /// How long a replica owns a job without renewing it; renewed every third of it.
    #[serde(deserialize_with = "de_duration")]
    pub lease: Duration,
    /// Most polling jobs the fleet keeps (counted where jobs are stored: in Redis, fleet-wide). Every new
    /// `auto_start` channel creates one, so without a bound anyone who can subscribe can grow the job set.
    /// Past it `POST /api/polling/start` answers 429 `too_many_jobs` and auto-start starts nothing.
    pub max_jobs: usize,
}

impl Default for PollerConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(10),
            max_jobs: 1000,
        }
    }
}

impl AuthConfig {
    /// Whether a key to verify tokens is configured.
    pub fn enabled(&self) -> bool {
        !self.jwt_hs256_secret.is_empty()
            || !self.jwt_public_key_file.is_empty()
            || !self.jwks_url.is_empty()
    }
}

/// A configuration problem: which key (or variable, or file) and what is wrong with it.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Parses a TOML document; errors name the offending key (`server.port: invalid type ...`).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError(format!("config is not valid TOML: {e}")))?;
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| ConfigError(format!("config key `{}`: {}", e.path(), e.inner())))?;
        Ok(config)
    }

    /// Parses a TOML document laid over the embedded defaults: tables merge key by key, any other value
    /// (including an array such as `[[sources]]`) replaces the default.
    pub fn from_toml_over_defaults(text: &str) -> Result<Config, ConfigError> {
        let mut base: toml::Table = EMBEDDED_DEFAULT
            .parse()
            .map_err(|e: toml::de::Error| ConfigError(format!("embedded default config: {e}")))?;
        let overlay: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError(format!("config is not valid TOML: {e}")))?;
        merge(&mut base, overlay);
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(base))
            .map_err(|e| ConfigError(format!("config key `{}`: {}", e.path(), e.inner())))?;
        Ok(config)
    }

    /// Reads the given file over the embedded defaults, or the embedded defaults alone when there is none.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError(format!("cannot read config {}: {e}", path.display()))
                })?;
                Config::from_toml_over_defaults(&text)
                    .map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)))
            }
            None => Config::from_toml(EMBEDDED_DEFAULT),
        }
    }

    /// Applies environment overrides from `vars` (the process environment in production, a map in tests).
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(port) = var("PORT") {
            self.server.port = port.trim().parse().map_err(|_| {
                ConfigError(format!(
                    "environment variable PORT: `{port}` is not a port number"
                ))
            })?;
        }
        if let Some(host) = var("HOST") {
            self.server.host = host;
        }
        if let Some(key) = var("RELAYHUB_API_KEY") {
            self.server.api_key = key;
        }
        if let Some(token) = var("RELAYHUB_ADMIN_TOKEN") {
            self.server.admin_token = token;
        }
        if let Some(secret) = var("RELAYHUB_JWT_SECRET") {
            self.auth.jwt_hs256_secret = secret;
        }
        if let Some(id) = var("RELAYHUB_INSTANCE_ID") {
            self.server.instance_id = id;
        }
        if let Some(format) = var("RELAYHUB_LOG_FORMAT") {
            self.log.format = match format.trim() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => {
                    return Err(ConfigError(format!(
                        "environment variable RELAYHUB_LOG_FORMAT: `{format}` is not text or json"
                    )));
                }
            };
        }
        if let Some(url) = var("REDIS_URL") {
            self.redis.url = url;
        } else if let Some(host) = var("REDIS_HOST") {
            let port = var("REDIS_PORT").unwrap_or_else(|| "6379".into());
            port.parse::<u16>().map_err(|_| {
                ConfigError(format!(
                    "environment variable REDIS_PORT: `{port}` is not a port number"
                ))
            })?;
            self.redis.url = match var("REDIS_PASSWORD") {
                Some(password) if !password.is_empty() => {
                    format!(
                        "redis://:{}@{host}:{port}",
                        crate::core::encoding::url_component(&password)
                    )
                }
                _ => format!("redis://{host}:{port}"),
            };
        }
        if let Some(nodes) = var("REDIS_CLUSTER_NODES") {
            self.redis.cluster_nodes = nodes
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(str::to_string)
                .collect();
        }
        if let Some(required) = var("RELAYHUB_REDIS_REQUIRED") {
            self.redis.required = match required.trim() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => {
                    return Err(ConfigError(format!(
                        "environment variable RELAYHUB_REDIS_REQUIRED: `{required}` is not true or false"
                    )));
                }
            };
        }
        Ok(())
    }

    /// Checks what types alone cannot: ranges and names, each value on its own. Errors name the key. Polling
    /// sources and ingest routes are compiled where they are used, at start (`relayhub::check_config` does both).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, msg: &str| Err(ConfigError(format!("config key `{key}`: {msg}")));
        if self.websocket.max_message_bytes < 64 {
            return err("websocket.max_message_bytes", "must be at least 64");
        }
        if self.websocket.max_subscriptions_per_connection == 0 {
            return err(
                "websocket.max_subscriptions_per_connection",
                "must be at least 1",
            );
        }
        if self.websocket.mailbox_size < 2 {
            return err("websocket.mailbox_size", "must be at least 2");
        }
        if self.websocket.max_queued_bytes < self.websocket.max_message_bytes {
            return err(
                "websocket.max_queued_bytes",
                "must be at least websocket.max_message_bytes",
            );
        }
        if self.channels.history_ttl.is_zero() {
            return err("channels.history_ttl", "must be more than zero");
        }
        for (name, ns) in &self.namespaces {
            if ns.history_ttl.is_some_and(|t| t.is_zero()) {
                return err(
                    &format!("namespaces.{name}.history_ttl"),
                    "must be more than zero",
                );
            }
        }
        if self.websocket.write_timeout.is_zero() {
            return err("websocket.write_timeout", "must be more than zero");
        }
        if self.websocket.write_delay > Duration::from_secs(1) {
            return err("websocket.write_delay", "must be at most 1s");
        }
        if self.websocket.heartbeat_interval.is_zero() {
            return err("websocket.heartbeat_interval", "must be more than zero");
        }
        if self.websocket.client_timeout <= self.websocket.heartbeat_interval {
            return err(
                "websocket.client_timeout",
                "must be longer than websocket.heartbeat_interval",
            );
        }
        if self.websocket.requests_per_second == 0 {
            return err("websocket.requests_per_second", "must be at least 1");
        }
        if self.websocket.request_burst == 0 {
            return err("websocket.request_burst", "must be at least 1");
        }
        if self.websocket.rate_limited_close_after < Duration::from_secs(1) {
            return err("websocket.rate_limited_close_after", "must be at least 1s");
        }
        if self.server.drain_period >= self.server.shutdown_timeout {
            return err(
                "server.drain_period",
                "must be shorter than server.shutdown_timeout (the drain happens within it)",
            );
        }
        if self.server.max_connections == 0 {
            return err("server.max_connections", "must be at least 1");
        }
        if self.server.max_connections_per_ip == 0 {
            return err("server.max_connections_per_ip", "must be at least 1");
        }
        for entry in &self.server.trusted_proxies {
            parse_proxy(entry)
                .map_err(|e| ConfigError(format!("config key `server.trusted_proxies`: {e}")))?;
        }
        for directive in self.log.level.split(',').map(str::trim) {
            let level = directive
                .rsplit_once('=')
                .map_or(directive, |(_, level)| level);
            let known = ["off", "error", "warn", "info", "debug", "trace"];
            // A bare word may also be a module name (`relayhub::poller`): all its levels.
            let is_module = !directive.contains('=') && !level.is_empty();
            if !(known.contains(&level.to_ascii_lowercase().as_str()) || is_module) {
                return err(
                    "log.level",
                    &format!("`{directive}` is not a level (off, error, warn, info, debug, trace)"),
                );
            }
        }
        if !self.server.metrics_listen.is_empty()
            && std::net::ToSocketAddrs::to_socket_addrs(self.server.metrics_listen.as_str())
                .is_err()
        {
            return err(
                "server.metrics_listen",
                "must be an address with a port, like 127.0.0.1:9090",
            );
        }
        if self.channels.max_channels == 0 {
            return err("channels.max_channels", "must be at least 1");
        }
        if self.channels.max_memory < 64 * 1024 {
            return err("channels.max_memory", "must be at least 65536 (bytes)");
        }
        if self.channels.max_pattern_positions == 0 {
            return err("channels.max_pattern_positions", "must be at least 1");
        }
        if self.channels.max_pattern_scan == 0 {
            return err("channels.max_pattern_scan", "must be at least 1");
        }
        if self.channels.presence_ttl < Duration::from_secs(1) {
            return err("channels.presence_ttl", "must be at least 1s");
        }
        if self.channels.max_presence_members == 0 {
            return err("channels.max_presence_members", "must be at least 1");
        }
        if self.channels.max_concurrent_pattern_scans == 0 {
            return err(
                "channels.max_concurrent_pattern_scans",
                "must be at least 1",
            );
        }
        if self.redis.pool_size == 0 {
            return err("redis.pool_size", "must be at least 1");
        }
        let schemes = ["redis://", "rediss://", "unix://"];
        if !self.redis.url.is_empty() && !schemes.iter().any(|s| self.redis.url.starts_with(s)) {
            return err(
                "redis.url",
                "must start with redis://, rediss:// or unix://",
            );
        }
        self.validate_cluster()?;
        if self.redis.ingest_lease < Duration::from_millis(300) {
            return err("redis.ingest_lease", "must be at least 300ms");
        }
        if self.poller.lease < Duration::from_millis(300) {
            return err("poller.lease", "must be at least 300ms");
        }
        if self.poller.max_jobs == 0 {
            return err("poller.max_jobs", "must be at least 1");
        }
        let key_sources = [
            !self.auth.jwt_hs256_secret.is_empty(),
            !self.auth.jwt_public_key_file.is_empty(),
            !self.auth.jwks_url.is_empty(),
        ];
        if key_sources.iter().filter(|set| **set).count() > 1 {
            return err(
                "auth.jwt_public_key_file",
                "set one of auth.jwt_hs256_secret, auth.jwt_public_key_file and auth.jwks_url",
            );
        }
        let url = &self.auth.jwks_url;
        if !(url.is_empty() || url.starts_with("https://") || url.starts_with("http://")) {
            return err("auth.jwks_url", "must be an http:// or https:// URL");
        }
        if self.auth.jwks_timeout.is_zero() {
            return err("auth.jwks_timeout", "must be more than zero");
        }
        if self.auth.jwks_max_bytes < 1024 {
            return err("auth.jwks_max_bytes", "must be at least 1024");
        }
        if self.auth.jwks_min_refresh_interval < Duration::from_secs(1) {
            return err("auth.jwks_min_refresh_interval", "must be at least 1s");
        }
        if self.auth.jwks_refresh_interval < self.auth.jwks_min_refresh_interval {
            return err(
                "auth.jwks_refresh_interval",
                "must be at least auth.jwks_min_refresh_interval",
            );
        }
        if !self.auth.jwt_hs256_secret.is_empty() && self.auth.jwt_hs256_secret.len() < 32 {
            return err(
                "auth.jwt_hs256_secret",
                "must be at least 32 bytes (a shorter HS256 secret can be guessed offline from one token)",
            );
        }
        if !self.auth.enabled() {
            for (name, ns) in &self.namespaces {
                if ns.anonymous == Some(false) {
                    return err(
                        &format!("namespaces.{name}.anonymous"),
                        "false needs token auth: set auth.jwt_hs256_secret, auth.jwt_public_key_file or auth.jwks_url",
                    );
                }
                if ns.private {
                    return err(
                        &format!("namespaces.{name}.private"),
                        "true needs token auth: set auth.jwt_hs256_secret, auth.jwt_public_key_file or auth.jwks_url",
                    );
                }
            }
        }
        for name in self.namespaces.keys() {
            if name.is_empty()
                || !name.bytes().all(crate::core::protocol::is_channel_byte)
                || name.contains(':')
                || name.contains('#')
            {
                return err(
                    &format!("namespaces.{name}"),
                    "is not a valid namespace name",
                );
            }
        }
        for origin in &self.server.allowed_origins {
            if origin.is_empty() {
                return err("server.allowed_origins", "contains an empty entry");
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, source) in self.sources.iter().enumerate() {
            let key = format!("sources[{i}]");
            if source.name.is_empty() {
                return err(&format!("{key}.name"), "is required");
            }
            if !names.insert(source.name.as_str()) {
                return err(
                    &format!("{key}.name"),
                    &format!("`{}` is defined twice", source.name),
                );
            }
            if source.channel.is_empty() {
                return err(&format!("{key}.channel"), "is required");
            }
            if source.interval < Duration::from_millis(100) {
                return err(&format!("{key}.interval"), "must be at least 100ms");
            }
            match source.kind {
                SourceKind::Http if source.url.is_empty() => {
                    return err(&format!("{key}.url"), "is required for http sources");
                }
                SourceKind::Redis if source.fields.is_empty() => {
                    return err(&format!("{key}.fields"), "is required for redis sources");
                }
                _ => {}
            }
            if source.max_requests_per_minute > 60_000 {
                return err(
                    &format!("{key}.max_requests_per_minute"),
                    "must be at most 60000 (0 for no limit)",
                );
            }
            if source.max_retry_after.is_zero() {
                return err(&format!("{key}.max_retry_after"), "must be more than 0");
            }
            if source.stale_after.is_some_and(|d| d.is_zero()) {
                return err(&format!("{key}.stale_after"), "must be more than 0");
            }
            if source.split.is_some() {
                if source.split_key.is_empty() {
                    return err(&format!("{key}.split_key"), "is required with split");
                }
                if !(1..=100_000).contains(&source.max_split_elements) {
                    return err(&format!("{key}.max_split_elements"), "must be 1 to 100000");
                }
            } else if !source.split_key.is_empty() {
                return err(&format!("{key}.split"), "is required with split_key");
            }
        }
        for (i, route) in self.ingest.iter().enumerate() {
            if route.redis_channel.is_empty() {
                return err(&format!("ingest[{i}].redis_channel"), "is required");
            }
            if route.redis_channel.starts_with(&self.redis.prefix) {
                return err(
                    &format!("ingest[{i}].redis_channel"),
                    "must not be under redis.prefix (relayhub's own channels are relayed already)",
                );
            }
            if route.channel.is_empty() {
                return err(&format!("ingest[{i}].channel"), "is required");
            }
        }
        self.compiled_endpoints()?;
        Ok(())
    }

    /// What cluster mode asks of the rest of the configuration: seed nodes that are URLs, no `url` beside them,
    /// a prefix that cannot carry a hash tag of its own, and nothing that needs pattern subscriptions
    /// (Redis Cluster's sharded pub/sub has none).
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let err = |key: &str, msg: String| Err(ConfigError(format!("config key `{key}`: {msg}")));
        if !self.redis.is_cluster() {
            return Ok(());
        }
        if !self.redis.url.is_empty() {
            return err(
                "redis.cluster_nodes",
                "set either redis.url (one Redis) or redis.cluster_nodes (a cluster), not both"
                    .into(),
            );
        }
        for (i, node) in self.redis.cluster_nodes.iter().enumerate() {
            if let Some(problem) = node_url_problem(node) {
                return err(
                    &format!("redis.cluster_nodes[{i}]"),
                    format!("`{node}` {problem}"),
                );
            }
        }
        if self.redis.prefix.contains(['{', '}']) {
            return err(
                "redis.prefix",
                "must not contain `{` or `}` in cluster mode (relayhub places the hash tags itself)".into(),
            );
        }
        for (i, route) in self.ingest.iter().enumerate() {
            if route.redis_channel.contains('*') {
                return err(
                    &format!("ingest[{i}].redis_channel"),
                    "is a pattern, which cluster mode cannot listen to (sharded pub/sub has no patterns)"
                        .into(),
                );
            }
        }
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            if endpoint.channel.contains('*') || endpoint.alias.values().any(|v| v.contains('*')) {
                return err(
                    &format!("endpoints[{i}]"),
                    "binds a pattern, which cluster mode cannot serve (sharded pub/sub has no patterns)"
                        .into(),
                );
            }
        }
        Ok(())
    }

    /// `[[endpoints]]` checked and parsed; an error names the key at fault.
    pub fn compiled_endpoints(&self) -> Result<Endpoints, ConfigError> {
        Endpoints::compile(self.endpoints.iter().map(|e| Spec {
            path: &e.path,
            channel: &e.channel,
            alias: &e.alias,
            format: e.format,
            snapshot: e.snapshot,
        }))
        .map_err(ConfigError)
    }

    /// Problems that do not stop the hub but are likely mistakes: `check-config` prints them, the hub logs
    /// them at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let web_root = &self.server.web_root;
        if !web_root.is_empty() && !Path::new(web_root).join("index.html").is_file() {
            warnings.push(format!(
                "server.web_root `{web_root}` has no index.html: / and /relayhub.js answer 404 \
                 (leave it empty to serve the files built into the binary)"
            ));
        }
        for name in self.namespaces.keys() {
            if name.len() > crate::core::protocol::MAX_CHANNEL_LEN {
                warnings.push(format!(
                    "[namespaces.{name}] matches no channel: channel names are at most {} bytes",
                    crate::core::protocol::MAX_CHANNEL_LEN
                ));
            }
        }
        warnings
    }

    /// Resolves a channel's settings from its namespace; `None` when strict namespaces refuse it.
    pub fn policy(&self, channel: &str) -> Option<ChannelPolicy> {
        let defaults = &self.channels;
        match self.namespaces.get(namespace_of(channel)) {
            Some(ns) => Some(ChannelPolicy {
                client_publish: ns.client_publish,
                patterns: ns.patterns,
                anonymous: ns.anonymous.unwrap_or(true),
                private: ns.private,
                ttl: ns.ttl.unwrap_or(defaults.ttl),
                history_size: ns.history_size.unwrap_or(defaults.history_size),
                history_ttl: ns.history_ttl.unwrap_or(defaults.history_ttl),
                slow_consumer: ns.slow_consumer.unwrap_or(defaults.slow_consumer),
                presence: ns.presence,
                join_leave: ns.join_leave,
            }),
            None if defaults.strict_namespaces => None,
            None => Some(self.default_policy()),
        }
    }

    /// The settings of a channel in a namespace with no table of its own.
    pub fn default_policy(&self) -> ChannelPolicy {
        ChannelPolicy {
            client_publish: false,
            patterns: false,
            anonymous: true,
            private: false,
            ttl: self.channels.ttl,
            history_size: self.channels.history_size,
            history_ttl: self.channels.history_ttl,
            slow_consumer: self.channels.slow_consumer,
            presence: false,
            join_leave: false,
        }
    }
}

/// The namespace of a channel: the part of its name before the first `:`, or the whole name when it has
/// none (`news` is in namespace `news`, like `news:sports`). relayhub.js's `namespaceOf` says the same.
pub fn namespace_of(channel: &str) -> &str {
    channel.split_once(':').map_or(channel, |(ns, _)| ns)
}

/// One `server.trusted_proxies` entry: an IP address (`10.0.0.5`, `::1`) or a CIDR range (`10.0.0.0/8`).
pub fn parse_proxy(entry: &str) -> Result<ipnet::IpNet, String> {
    let entry = entry.trim();
    entry
        .parse::<ipnet::IpNet>()
        .map(|net| net.trunc())
        .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("`{entry}` is not an IP address or a CIDR range like 10.0.0.0/8"))
}

fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(base_table)), toml::Value::Table(overlay_table)) => {
                merge(base_table, overlay_table)
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// The longest duration the config takes (about 317 years): anything longer is a typo, and deadlines
/// computed from it must not overflow.
const MAX_DURATION: Duration = Duration::from_secs(10_000_000_000);

/// Parses a duration as `humantime` does: `"500ms"`, `"30s"`, `"1.5s"`, `"5m"`, `"24h"`, `"2d"`, and sums
/// such as `"1h 30m"`. A number needs its unit.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    // humantime wants a digit first; `.5s` has always been accepted here.
    let with_digit = text.strip_prefix('.').map(|rest| format!("0.{rest}"));
    let duration =
        humantime::parse_duration(with_digit.as_deref().unwrap_or(text)).map_err(|e| {
            format!("`{text}` is not a duration like \"500ms\", \"30s\" or \"24h\" ({e})")
        })?;
    if duration > MAX_DURATION {
        return Err(format!("`{text}` is out of range"));
    }
    Ok(duration)
}

/// Formats a duration the way config writes it (`"1500ms"`, `"30s"`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else {
        format!("{}s", ms / 1000)
    }
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses_and_validates() {
        let config = Config::load(None).unwrap();
        config.validate().unwrap();
        assert_eq!(config.server.port, 8080);
        assert!(config.policy("chat:lobby").unwrap().client_publish);
        assert!(!config.policy("prices:BTC").unwrap().client_publish);
    }

    #[test]
    fn a_file_sets_only_what_it_changes() {
        let config = Config::from_toml_over_defaults(
            "[server]\nport = 9000\n[namespaces.extra]\nclient_publish = true\n",
        )
        .unwrap();
        assert_eq!(config.server.port, 9000);
        assert_eq!(config.server.host, "0.0.0.0");
        assert_eq!(config.websocket.max_message_bytes, 65536);
        assert_eq!(config.websocket.heartbeat_interval, Duration::from_secs(30));
        assert!(config.policy("chat:x").unwrap().client_publish);
        assert!(config.policy("extra:x").unwrap().client_publish);
        // The struct defaults agree with the embedded file.
        let bare = Config::from_toml("").unwrap();
        let config = Config::load(None).unwrap();
        assert_eq!(bare.server.port, config.server.port);
        assert_eq!(bare.websocket.mailbox_size, config.websocket.mailbox_size);
        assert_eq!(bare.redis.prefix, config.redis.prefix);
        assert_eq!(bare.channels.ttl, config.channels.ttl);
        assert_eq!(bare.server.max_connections, config.server.max_connections);
        assert_eq!(
            bare.server.max_connections_per_ip,
            config.server.max_connections_per_ip
        );
        assert_eq!(bare.server.trusted_proxies, config.server.trusted_proxies);
        let (b, c) = (&bare.websocket, &config.websocket);
        assert_eq!(b.max_patterns_per_connection, c.max_patterns_per_connection);
        assert_eq!(b.requests_per_second, c.requests_per_second);
        assert_eq!(b.request_burst, c.request_burst);
        assert_eq!(b.rate_limited_close_after, c.rate_limited_close_after);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = Config::from_toml("[server]\nprot = 1\n").unwrap_err().0;
        assert!(e.contains("server") && e.contains("prot"), "{e}");
        let e = Config::from_toml("[server]\nport = \"x\"\n").unwrap_err().0;
        assert!(e.contains("server.port"), "{e}");
        let e = Config::from_toml("[websocket]\nclient_timeout = \"10 parsecs\"\n")
            .unwrap_err()
            .0;
        assert!(e.contains("websocket.client_timeout"), "{e}");
        let e = Config::from_toml("[namespaces.chat]\nclient_publish = \"yes\"\n")
            .unwrap_err()
            .0;
        assert!(e.contains("namespaces.chat.client_publish"), "{e}");
    }

    #[test]
    fn validation_names_the_key() {
        let mut c = Config::default();
        c.websocket.client_timeout = Duration::from_secs(1);
        assert!(
            c.validate()
                .unwrap_err()
                .0
                .contains("websocket.client_timeout")
        );
        let mut c = Config::default();
        assert_eq!(c.poller.max_jobs, 1000);
        c.poller.max_jobs = 0;
        assert!(c.validate().unwrap_err().0.contains("poller.max_jobs"));
    }

    #[test]
    fn transport_bounds_are_validated() {
        let defaults = Config::load(None).unwrap();
        assert_eq!(defaults.websocket.max_queued_bytes, 1_048_576);
        assert_eq!(defaults.websocket.write_timeout, Duration::from_secs(10));
        let mut c = Config::default();
        c.websocket.max_queued_bytes = c.websocket.max_message_bytes - 1;
        let e = c.validate().unwrap_err().0;
        assert!(e.contains("websocket.max_queued_bytes"), "{e}");
        let mut c = Config::default();
        c.websocket.write_timeout = Duration::ZERO;
        let e = c.validate().unwrap_err().0;
        assert!(e.contains("websocket.write_timeout"), "{e}");
        let e = Config::from_toml("[websocket]\nwrite_timeout = \"soon\"\n")
            .unwrap_err()
            .0;
        assert!(e.contains("websocket.write_timeout"), "{e}");
    }

    #[test]
    fn cluster_settings_are_validated_by_key() {
        let nodes =
            "[redis]\ncluster_nodes = [\"redis://10.0.0.1:7000\", \"rediss://u:p@h:7001\"]\n";
        let c = Config::from_toml(nodes).unwrap();
        c.validate().unwrap();
        assert!(c.redis.is_cluster() && c.redis.is_configured());
        for (toml, key) in [
            (
                "[redis]\ncluster_nodes = [\"10.0.0.1:7000\"]\n",
                "redis.cluster_nodes[0]",
            ),
            (
                "[redis]\ncluster_nodes = [\"redis://h\"]\n",
                "redis.cluster_nodes[0]",
            ),
            (
                "[redis]\ncluster_nodes = [\"redis://h:1\", \"redis://:0\"]\n",
                "redis.cluster_nodes[1]",
            ),
            (
                "[redis]\nurl = \"redis://h:1\"\ncluster_nodes = [\"redis://h:1\"]\n",
                "redis.cluster_nodes",
            ),
            (
                "[redis]\nprefix = \"a{b}:\"\ncluster_nodes = [\"redis://h:1\"]\n",
                "redis.prefix",
            ),
            (
                "[redis]\ncluster_nodes = [\"redis://h:1\"]\n[[ingest]]\nredis_channel = \"feed:*\"\nchannel = \"x:y\"\n",
                "ingest[0].redis_channel",
            ),
            (
                "[redis]\ncluster_nodes = [\"redis://h:1\"]\n[[endpoints]]\npath = \"/ws/{s}\"\nchannel = \"prices:{s}\"\nalias = { all = \"*\" }\n",
                "endpoints[0]",
            ),
        ] {
            let e = Config::from_toml(toml).unwrap().validate().unwrap_err().0;
            assert!(e.contains(key), "{toml}: {e}");
        }
        // Braces in the prefix are only a problem when relayhub places hash tags.
        Config::from_toml("[redis]\nprefix = \"a{b}:\"\n")
            .unwrap()
            .validate()
            .unwrap();
        let mut c = Config::default();
        c.apply_env(|name| {
            (name == "REDIS_CLUSTER_NODES").then(|| " redis://a:1, redis://b:2 ,".to_string())
        })
        .unwrap();
        assert_eq!(c.redis.cluster_nodes, ["redis://a:1", "redis://b:2"]);
    }

    #[test]
    fn edge_limits_are_validated_by_key() {
        for (toml, key) in [
            (
                "[server]\ntrusted_proxies = [\"10.0.0.0/33\"]\n",
                "server.trusted_proxies",
            ),
            (
                "[server]\ntrusted_proxies = [\"proxy.local\"]\n",
                "server.trusted_proxies",
            ),
            ("[server]\nmax_connections = 0\n", "server.max_connections"),
            (
                "[server]\ndrain_period = \"20s\"\nshutdown_timeout = \"20s\"\n",
                "server.drain_period",
            ),
            (
                "[server]\nmax_connections_per_ip = 0\n",
                "server.max_connections_per_ip",
            ),
            (
                "[websocket]\nrequests_per_second = 0\n",
                "websocket.requests_per_second",
            ),
            (
                "[websocket]\nrequest_burst = 0\n",
                "websocket.request_burst",
            ),
            (
                "[websocket]\nrate_limited_close_after = \"0s\"\n",
                "websocket.rate_limited_close_after",
            ),
        ] {
            let e = Config::from_toml(toml).unwrap().validate().unwrap_err().0;
            assert!(e.contains(key), "{toml}: {e}");
        }
        let ok = Config::from_toml(
            "[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"::1\", \"192.0.2.7\"]\n",
        );
        ok.unwrap().validate().unwrap();
        assert_eq!(parse_proxy("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
    }

    #[test]
    fn a_name_without_a_colon_is_its_own_namespace() {
        assert_eq!(namespace_of("news"), "news");
        assert_eq!(namespace_of("news:sports"), "news");
        assert_eq!(
            namespace_of("option-chain:NIFTY:2025-11-28"),
            "option-chain"
        );
        let config = Config::from_toml(
            "[channels]\nstrict_namespaces = true\n[namespaces.news]\nttl = \"2m\"\nclient_publish = true\n",
        )
        .unwrap();
        for channel in ["news", "news:sports"] {
            let policy = config.policy(channel).unwrap();
            assert_eq!(policy.ttl, Duration::from_secs(120), "{channel}");
            assert!(policy.client_publish, "{channel}");
        }
        // Strict: a bare name with no table of its own is refused like any other unknown namespace.
        assert_eq!(config.policy("predictions"), None);
        assert_eq!(config.policy("newsroom"), None);
    }

    #[test]
    fn namespace_tables_no_channel_can_match_are_warned_about() {
        let long = "n".repeat(crate::core::protocol::MAX_CHANNEL_LEN + 1);
        let longest = "n".repeat(crate::core::protocol::MAX_CHANNEL_LEN);
        let config =
            Config::from_toml(&format!("[namespaces.{long}]\n[namespaces.{longest}]\n")).unwrap();
        config.validate().unwrap();
        let warnings = config.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains(&long) && warnings[0].contains("matches no channel"),
            "{warnings:?}"
        );
        // The longest valid name is a channel of its own namespace.
        assert!(config.policy(&longest).is_some());
        assert!(Config::load(None).unwrap().warnings().is_empty());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("3 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("400000y").is_err());
        // Every form the hand-written parser took before humantime, with the same value.
        for (text, millis) in [
            ("0s", 0),
            ("0ms", 0),
            ("250ms", 250),
            ("1.5s", 1500),
            (".5s", 500),
            ("0.25m", 15_000),
            ("1.5h", 5_400_000),
            ("2d", 172_800_000),
            ("1.5d", 129_600_000),
            (" 10s ", 10_000),
            ("007s", 7000),
            ("3600000ms", 3_600_000),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_millis(millis)),
                "{text}"
            );
        }
        // And what humantime adds: sums and long unit names.
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("2min").unwrap(), Duration::from_secs(120));
        assert_eq!(
            parse_duration("1week").unwrap(),
            Duration::from_secs(604_800)
        );
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_secs(120)), "2m");
    }

    #[test]
    fn log_settings_are_validated() {
        let defaults = Config::load(None).unwrap();
        assert_eq!(defaults.log.format, LogFormat::Text);
        assert_eq!(defaults.log.level, "info");
        for level in ["debug", "warn,relayhub=debug", "relayhub::poller", "off"] {
            let mut c = Config::default();
            c.log.level = level.into();
            c.validate().unwrap();
        }
        for level in ["", "relayhub=loud", "info,,"] {
            let mut c = Config::default();
            c.log.level = level.into();
            let e = c.validate().unwrap_err().0;
            assert!(e.contains("log.level"), "{level}: {e}");
        }
        let mut c = Config::default();
        c.apply_env(|k| (k == "RELAYHUB_LOG_FORMAT").then(|| "json".to_string()))
            .unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn env_overrides() {
        let mut c = Config::default();
        let env = |k: &str| match k {
            "PORT" => Some("9100".to_string()),
            "REDIS_HOST" => Some("redis.internal".to_string()),
            "REDIS_PASSWORD" => Some("p@ss".to_string()),
            _ => None,
        };
        c.apply_env(env).unwrap();
        assert_eq!(c.server.port, 9100);
        assert_eq!(c.redis.url, "redis://:p%40ss@redis.internal:6379");
        let e = c
            .apply_env(|k| (k == "PORT").then(|| "http".to_string()))
            .unwrap_err();
        assert!(e.0.contains("PORT"));
        c.apply_env(|k| (k == "RELAYHUB_REDIS_REQUIRED").then(|| "true".to_string()))
            .unwrap();
        assert!(c.redis.required);
        let e = c
            .apply_env(|k| (k == "RELAYHUB_REDIS_REQUIRED").then(|| "yes".to_string()))
            .unwrap_err();
        assert!(e.0.contains("RELAYHUB_REDIS_REQUIRED"), "{e}");
    }
}
