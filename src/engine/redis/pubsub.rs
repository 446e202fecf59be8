//! The pub/sub connection under the bridge, for one Redis or a Redis Cluster. The bridge decides what to
//! listen to; this file says how: SUBSCRIBE and PSUBSCRIBE on one dedicated connection to one Redis, or
//! SSUBSCRIBE (sharded pub/sub) through one cluster connection speaking RESP3.
//!
//! The cluster connection keeps a connection per node and sends each SSUBSCRIBE to the node owning the
//! channel's slot. What it hears comes back as RESP3 pushes: messages, subscription changes and, from the
//! library, a notice when a node's connection dropped. A connection that only listens sends no command that
//! would make the library look for the slot's new owner, so a lost node is reported to the bridge, which
//! treats it like a lost connection: it opens a new one (subscribing each channel where its slot now lives,
//! once a replica took over) and reads what its channels missed. A channel the server unsubscribes by itself
//! (its slot moved to another node) is reported too, so the bridge subscribes it again where it now lives.

use std::time::Duration;

use deadpool_redis::redis::aio::PubSubSink;
use deadpool_redis::redis::{self, Msg, PushKind};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use redis::cluster_async::ClusterConnection;

use crate::core::config::RedisConfig;
use crate::core::ingest::Route;

/// How to open the pub/sub connection: a client for one Redis, or the cluster's seed nodes.
pub enum PubSubClient {
    Single(redis::Client),
    Cluster {
        nodes: Vec<String>,
        connect_timeout: Duration,
        command_timeout: Duration,
    },
}

impl PubSubClient {
    pub fn new(config: &RedisConfig) -> redis::RedisResult<PubSubClient> {
        if config.is_cluster() {
            Ok(PubSubClient::Cluster {
                nodes: config.cluster_nodes.clone(),
                connect_timeout: config.connect_timeout,
                command_timeout: config.command_timeout,
            })
        } else {
            Ok(PubSubClient::Single(redis::Client::open(
                config.url.as_str(),
            )?))
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, PubSubClient::Cluster { .. })
    }
}

/// What the connection hears.
pub enum Incoming {
    Message(Msg),
    /// A sharded channel was subscribed: answering a SSUBSCRIBE the bridge sent, or one the cluster
    /// connection sent by itself.
    Subscribed(String),
    /// A sharded channel was unsubscribed: answering a SUNSUBSCRIBE, or by the server (its slot moved).
    Unsubscribed(String),
    /// The connection to one of the cluster's nodes dropped.
    NodeLost,
}

/// Sends subscription changes on the live connection. Cloned into each batch; dropping every clone (and the
/// stream) closes the connection.
#[derive(Clone)]
pub enum Sink {
    Single(PubSubSink),
    Cluster(ClusterConnection),
}

impl Sink {
    pub async fn subscribe(&mut self, names: &[String]) -> redis::RedisResult<()> {
        match self {
            Sink::Single(sink) => sink.subscribe(names).await,
            // A SSUBSCRIBE names channels of one slot: one per channel, all in flight at once.
            Sink::Cluster(c) => {
                let each = names.iter().map(|name| {
                    let mut c = c.clone();
                    async move { c.ssubscribe(name).await }
                });
                futures_util::future::try_join_all(each).await.map(|_| ())
            }
        }
    }

    pub async fn unsubscribe(&mut self, names: &[String]) -> redis::RedisResult<()> {
        match self {
            Sink::Single(sink) => sink.unsubscribe(names).await,
            Sink::Cluster(c) => {
                let each = names.iter().map(|name| {
                    let mut c = c.clone();
                    async move { c.sunsubscribe(name).await }
                });
                futures_util::future::try_join_all(each).await.map(|_| ())
            }
        }
    }

    pub async fn psubscribe(&mut self, patterns: &[String]) -> redis::RedisResult<()> {
        match self {
            Sink::Single(sink) => sink.psubscribe(patterns).await,
            Sink::Cluster(_) => Err(no_patterns()),
        }
    }

    pub async fn punsubscribe(&mut self, patterns: &[String]) -> redis::RedisResult<()> {
        match self {
            Sink::Single(sink) => sink.punsubscribe(patterns).await,
            Sink::Cluster(_) => Err(no_patterns()),
        }
    }
}

/// Sharded pub/sub has no patterns: the configuration and the sessions refuse them in cluster mode, so this
/// is only reached by a mistake, reported rather than ignored.
fn no_patterns() -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::InvalidClientConfig,
        "pattern subscriptions are not available in cluster mode",
    ))
}

/// Opens the connection and subscribes to the probe channel, the ingest routes, `names` and `patterns`.
pub async fn open(
    client: &PubSubClient,
    probe: &str,
    routes: &[Route],
    names: &[String],
    patterns: &[String],
) -> redis::RedisResult<(Sink, BoxStream<'static, Incoming>)> {
    match client {
        PubSubClient::Single(client) => {
            let (mut sink, stream) = client.get_async_pubsub().await?.split();
            sink.subscribe(probe).await?;
            for route in routes {
                if route.is_pattern {
                    sink.psubscribe(&route.redis_channel).await?;
                } else {
                    sink.subscribe(&route.redis_channel).await?;
                }
            }
            if !names.is_empty() {
                sink.subscribe(names).await?;
            }
            if !patterns.is_empty() {
                sink.psubscribe(patterns).await?;
            }
            Ok((Sink::Single(sink), stream.map(Incoming::Message).boxed()))
        }
        PubSubClient::Cluster {
            nodes,
            connect_timeout,
            command_timeout,
        } => {
            // Unbounded like the single connection's own queue: the bridge reads it without waiting on
            // anything, and what Redis sends is bounded by what this replica subscribed to.
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let client = redis::cluster::ClusterClientBuilder::new(nodes.clone())
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(tx)
                .connection_timeout(*connect_timeout)
                .response_timeout(*command_timeout)
                .build()?;
            let connection = client.get_async_connection().await?;
            let mut sink = Sink::Cluster(connection);
            let mut first: Vec<String> = vec![probe.to_string()];
            // The configuration refuses pattern routes in cluster mode.
            first.extend(
                routes
                    .iter()
                    .filter(|r| !r.is_pattern)
                    .map(|r| r.redis_channel.clone()),
            );
            first.extend(names.iter().cloned());
            sink.subscribe(&first).await?;
            if !patterns.is_empty() {
                sink.psubscribe(patterns).await?;
            }
            let pushes = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|push| (push, rx))
            });
            let stream = pushes.filter_map(|push| async move { incoming(push) });
            Ok((sink, stream.boxed()))
        }
    }
}

/// A RESP3 push as the bridge sees it; pushes it has no use for are dropped.
fn incoming(push: redis::PushInfo) -> Option<Incoming> {
    let name = |push: &redis::PushInfo| -> Option<String> {
        push.data
            .first()
            .and_then(|v| redis::from_redis_value_ref(v).ok())
    };
    match push.kind {
        PushKind::SSubscribe => Some(Incoming::Subscribed(name(&push)?)),
        PushKind::SUnsubscribe => Some(Incoming::Unsubscribed(name(&push)?)),
        PushKind::Disconnection => Some(Incoming::NodeLost),
        PushKind::SMessage | PushKind::Message => Msg::from_push_info(push).map(Incoming::Message),
        _ => None,
    }
}

/// The probe is a sharded channel in cluster mode, published with SPUBLISH to its slot's owner.
pub fn probe_command(cluster: bool) -> &'static str {
    if cluster { "SPUBLISH" } else { "PUBLISH" }
}
