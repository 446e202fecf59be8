//! The pubsub-bridge actor: this replica's one Redis pub/sub connection. It listens to exactly the channels
//! that have local subscribers (SUBSCRIBE on the first, UNSUBSCRIBE after the last), relays what arrives to
//! the local registries, and keeps the connection alive: reconnect with backoff and jitter forever,
//! resubscribe everything, and a probe through its own channel to catch a connection that is open but deaf.
//!
//! Watches and unwatches only change reference counts (the desired state). What Redis listens to follows by
//! reconciliation: one SUBSCRIBE/UNSUBSCRIBE batch in flight at a time, each computed from the difference
//! between the desired state and what Redis confirmed, so however watches, unwatches and replies interleave,
//! Redis converges to exactly the channels and patterns that have local subscribers.
//!
//! Publishing goes through the pooled publish script (`store`), so a message reaches this replica's
//! subscribers the same way it reaches every other replica's: as the echo from Redis, in Redis's order.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use deadpool_redis::redis::{self, Msg};
use futures_util::StreamExt;
use tokio::sync::oneshot;

use super::keys::Keys;
use super::link::Link;
use super::presence;
use super::pubsub::{self, Incoming, PubSubClient, Sink};
use super::store::{RedisStore, decode_payload, escape_glob};
use crate::core::config::Config;
use crate::core::ingest::Route;
use crate::core::publication::Publication;
use crate::engine::seam::BrokerEventHandler;
use crate::stats::Stats;

/// This replica needs messages of a channel from Redis. Sent with `do_send` at the moment a registry
/// decides, like `Unwatch`, so the bridge applies a registry's watches and unwatches in the order they were
/// made; `confirmed` is answered once Redis confirmed the SUBSCRIBE (or at once when Redis is unreachable:
/// local delivery never waits on Redis).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Watch {
    pub channel: Arc<str>,
    pub confirmed: oneshot::Sender<()>,
}

/// This replica needs every message of channels under a pattern prefix (`prices:` for `prices:*`); sent and
/// answered like `Watch`, once Redis confirmed the PSUBSCRIBE.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WatchPattern {
    pub prefix: Arc<str>,
    pub confirmed: oneshot::Sender<()>,
}

/// A registry no longer has subscribers of the pattern.
#[derive(Message)]
#[rtype(result = "()")]
pub struct UnwatchPattern {
    pub prefix: Arc<str>,
}

/// The replica is shutting down: stop sequencing `[[ingest]]` routes and hand their leases back (answered
/// once Redis has been told).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReleaseIngest;

/// A registry no longer has subscribers of the channel.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unwatch {
    pub channel: Arc<str>,
}

/// What the bridge is built from: everything it needs, given at start.
pub struct BridgeParts {
    pub config: Arc<Config>,
    pub stats: Arc<Stats>,
    /// The pooled store, for probes, catch-up reads, ingest leases and sequencing.
    pub store: Arc<RedisStore>,
    /// Link liveness, shared with the publish path.
    pub link: Arc<Link>,
    /// Where relayed messages and link events go.
    pub handler: Arc<dyn BrokerEventHandler>,
    /// The dedicated pub/sub connection is opened from this client (one Redis, or a cluster's seeds).
    pub client: PubSubClient,
    /// Outside producers' channels relayed into relayhub channels (compiled at start).
    pub routes: Vec<Route>,
    pub instance_id: String,
}

/// First reconnect delay; doubles per failed attempt up to `MAX_BACKOFF`, with jitter.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(3);
/// Probes that may go unanswered before the connection is declared dead.
const PROBE_MISSES: u32 = 3;
/// Ingested messages waiting for the lease holder to sequence them; past this they are dropped and counted
/// (`ingest_cache_dropped`) rather than queued without bound.
const INGEST_QUEUE: usize = 10_000;

/// One ingested message to take into the sequenced path, in the order received.
struct IngestWrite {
    channel: String,
    data: String,
    /// The route's `cache`: the message becomes the channel's latest value too.
    keep_latest: bool,
}

/// Something from one pub/sub connection, tagged with the connection it came from.
enum Event {
    Message(u64, Msg),
    /// A sharded channel was subscribed (cluster mode).
    Subscribed(u64, String),
    /// A sharded channel was unsubscribed (cluster mode).
    Unsubscribed(u64, String),
    /// The connection to a cluster node dropped.
    NodeLost(u64),
    Ended(u64),
}

impl actix::Message for Event {
    type Result = ();
}

struct WatchedPattern {
    /// Registries with subscribers of this pattern.
    refs: usize,
    /// The Redis pattern listened to, `<prefix>ch:prices:*`, built once (compared on every pattern message).
    redis_name: String,
    /// Redis has confirmed the PSUBSCRIBE on the current connection.
    confirmed: bool,
    /// Registries waiting for the confirmation.
    waiters: Vec<oneshot::Sender<()>>,
}

struct Watched {
    /// Registries (one per worker) with subscribers of this channel.
    refs: usize,
    /// Redis has confirmed the SUBSCRIBE on the current connection.
    confirmed: bool,
    /// Registries waiting for the confirmation.
    waiters: Vec<oneshot::Sender<()>>,
}

/// Answers everyone waiting for a subscription.
fn confirm(waiters: &mut Vec<oneshot::Sender<()>>) {
    for waiter in waiters.drain(..) {
        let _ = waiter.send(());
    }
}

/// One reconciliation step: what is sent to Redis in one go.
#[derive(Default)]
struct Batch {
    subscribe: Vec<Arc<str>>,
    unsubscribe: Vec<Arc<str>>,
    /// Pattern prefixes with their Redis pattern.
    psubscribe: Vec<(Arc<str>, String)>,
    punsubscribe: Vec<(Arc<str>, String)>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.subscribe.is_empty()
            && self.unsubscribe.is_empty()
            && self.psubscribe.is_empty()
            && self.punsubscribe.is_empty()
    }
}

pub struct Bridge {
    config: Arc<Config>,
    stats: Arc<Stats>,
    store: Arc<RedisStore>,
    link: Arc<Link>,
    handler: Arc<dyn BrokerEventHandler>,
    client: Arc<PubSubClient>,
    keys: Keys,
    probe_channel: String,
    probe_interval: Duration,
    connect_timeout: Duration,
    /// Sends SUBSCRIBE/UNSUBSCRIBE on the live connection; `None` while disconnected.
    sink: Option<Sink>,
    /// Number of the current connection; events of older ones are ignored.
    generation: u64,
    /// The current connection's message stream in this actor's context. Cancelled when the connection is given
    /// up: dropping the stream is what closes the socket, and a deaf connection never ends by itself.
    stream: Option<SpawnHandle>,
    channels: HashMap<Arc<str>, Watched>,
    /// Failed connection attempts in a row.
    attempts: u32,
    last_probe_seen: Instant,
    /// Whether any connection has succeeded yet (the first one is not a "reconnect").
    connected_once: bool,
    /// Rate limit for logging rejected messages.
    last_reject_log: Option<Instant>,
    /// Outside producers' channels relayed into relayhub channels.
    routes: Arc<Vec<Route>>,
    /// Pattern prefixes (`prices:`) with local subscribers.
    patterns: HashMap<Arc<str>, WatchedPattern>,
    /// Channels the current connection is subscribed to, as Redis confirmed (or as last sent, see `sync`).
    subscribed: HashSet<Arc<str>>,
    /// Pattern prefixes the current connection is subscribed to, with their Redis pattern.
    psubscribed: HashMap<Arc<str>, String>,
    /// Channels and pattern prefixes whose desired state changed since the last batch was computed.
    dirty: HashSet<Arc<str>>,
    dirty_patterns: HashSet<Arc<str>>,
    /// A batch is in flight; the next one is computed when it is answered, so Redis sees them in order.
    syncing: bool,
    /// Ingested messages to sequence, published one after the other by one task, in the order received.
    ingest_writes: Option<tokio::sync::mpsc::Sender<IngestWrite>>,
    /// Cluster mode: sharded channels whose SSUBSCRIBE this bridge sent and whose confirmation has not come
    /// yet. A confirmation of any other channel is the cluster connection resubscribing by itself after the
    /// channel's node was lost: the channel's history is read then, for what it missed.
    awaiting_confirmation: HashSet<String>,
    /// Cluster mode: sharded channels the server unsubscribed by itself and this bridge subscribed again;
    /// their confirmation is followed by a catch-up.
    resubscribing: HashSet<String>,
    /// Per route (in `routes` order): until when this replica surely holds its lease (a margin before the
    /// lease it took or renewed runs out); `None`: another replica, or nobody known, sequences it.
    ingest_held: Vec<Option<Instant>>,
    /// `redis.ingest_lease`.
    ingest_lease: Duration,
    /// Shutting down: the leases were handed back and are not taken again.
    ingest_released: bool,
    instance_id: String,
}

impl Bridge {
    pub fn new(parts: BridgeParts) -> Bridge {
        let config = &parts.config.redis;
        let keys = Keys::with_layout(&config.prefix, config.is_cluster());
        Bridge {
            probe_channel: keys.probe(&parts.instance_id),
            probe_interval: config.probe_interval,
            connect_timeout: config.connect_timeout,
            keys,
            client: Arc::new(parts.client),
            sink: None,
            generation: 0,
            stream: None,
            channels: HashMap::new(),
            attempts: 0,
            last_probe_seen: Instant::now(),
            connected_once: false,
            last_reject_log: None,
            ingest_held: vec![None; parts.routes.len()],
            routes: Arc::new(parts.routes),
            patterns: HashMap::new(),
            subscribed: HashSet::new(),
            psubscribed: HashMap::new(),
            dirty: HashSet::new(),
            dirty_patterns: HashSet::new(),
            syncing: false,
            ingest_writes: None,
            awaiting_confirmation: HashSet::new(),
            resubscribing: HashSet::new(),
            ingest_lease: config.ingest_lease,
            ingest_released: false,
            instance_id: parts.instance_id.clone(),
            config: parts.config,
            stats: parts.stats,
            store: parts.store,
            link: parts.link,
            handler: parts.handler,
        }
    }

    fn set_active(&self, active: bool) {
        self.link.set_active(active);
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        self.generation += 1;
        let generation = self.generation;
        let client = self.client.clone();
        let probe = self.probe_channel.clone();
        let wanted: Vec<Arc<str>> = self.channels.keys().cloned().collect();
        let names: Vec<String> = wanted.iter().map(|c| self.keys.pubsub_channel(c)).collect();
        let timeout = self.connect_timeout;
        let routes = self.routes.clone();
        let wanted_patterns: Vec<(Arc<str>, String)> = self
            .patterns
            .iter()
            .map(|(prefix, p)| (prefix.clone(), p.redis_name.clone()))
            .collect();
        let patterns: Vec<String> = wanted_patterns.iter().map(|(_, n)| n.clone()).collect();
        if client.is_cluster() {
            self.awaiting_confirmation = names.iter().cloned().collect();
            self.awaiting_confirmation.insert(probe.clone());
            self.awaiting_confirmation.extend(
                routes
                    .iter()
                    .filter(|r| !r.is_pattern)
                    .map(|r| r.redis_channel.clone()),
            );
        }
        let (store, me, lease) = (
            self.store.clone(),
            self.instance_id.clone(),
            self.ingest_lease,
        );
        let fut = async move {
            let work = async {
                let (sink, stream) =
                    pubsub::open(&client, &probe, &routes, &names, &patterns).await?;
                // The routes' leases are taken before the replica counts as live, so a fleet that is ready
                // has a replica sequencing every route.
                let sent = Instant::now();
                let mut held = Vec::with_capacity(routes.len());
                for route in routes.iter() {
                    // A failed take counts as not held; the next renewal tries again.
                    held.push(
                        store
                            .hold_ingest_lease(&route.redis_channel, &me, lease)
                            .await
                            .unwrap_or(false),
                    );
                }
                Ok::<_, redis::RedisError>((sink, stream, held, sent))
            };
            match tokio::time::timeout(timeout * 2, work).await {
                Ok(Ok(pair)) => Ok(pair),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("timed out".to_string()),
            }
        };
        ctx.spawn(fut.into_actor(self).map(move |result, act, ctx| {
            if generation != act.generation {
                return;
            }
            match result {
                Ok((sink, stream, held, sent)) => {
                    if !act.ingest_released {
                        act.set_ingest_held(&held, sent);
                    }
                    act.connected(generation, sink, stream, wanted, wanted_patterns, ctx)
                }
                Err(e) => {
                    act.attempts += 1;
                    let delay = backoff(act.attempts);
                    log::warn!(
                        "redis pub/sub connection failed ({e}); retrying in {} ms",
                        delay.as_millis()
                    );
                    ctx.run_later(delay, |act, ctx| act.connect(ctx));
                }
            }
        }));
    }

    fn connected(
        &mut self,
        generation: u64,
        sink: Sink,
        stream: futures_util::stream::BoxStream<'static, Incoming>,
        subscribed: Vec<Arc<str>>,
        psubscribed: Vec<(Arc<str>, String)>,
        ctx: &mut Context<Self>,
    ) {
        let reconnected = self.connected_once;
        if reconnected {
            Stats::add(&self.stats.redis_reconnects, 1);
            log::info!(
                "redis pub/sub connection restored; resubscribed to {} channels",
                subscribed.len()
            );
        } else {
            log::info!("redis pub/sub connection is live");
        }
        self.connected_once = true;
        self.attempts = 0;
        self.last_probe_seen = Instant::now();
        // What the connection listens to now; whatever was watched or dropped while it was being made is
        // reconciled by `sync`.
        self.subscribed = subscribed.iter().cloned().collect();
        self.psubscribed = psubscribed.into_iter().collect();
        self.syncing = false;
        self.dirty.extend(self.channels.keys().cloned());
        self.dirty.extend(self.subscribed.iter().cloned());
        self.dirty_patterns.extend(self.patterns.keys().cloned());
        self.dirty_patterns.extend(self.psubscribed.keys().cloned());
        for (channel, watched) in self.channels.iter_mut() {
            if self.subscribed.contains(channel) {
                watched.confirmed = true;
                confirm(&mut watched.waiters);
            }
        }
        for (prefix, watched) in self.patterns.iter_mut() {
            if self.psubscribed.contains_key(prefix) {
                watched.confirmed = true;
                confirm(&mut watched.waiters);
            }
        }
        self.sink = Some(sink);
        self.sync(ctx);
        self.drop_stream(ctx);
        self.stream = Some(
            ctx.add_stream(
                stream
                    .map(move |incoming| match incoming {
                        Incoming::Message(msg) => Event::Message(generation, msg),
                        Incoming::Subscribed(name) => Event::Subscribed(generation, name),
                        Incoming::Unsubscribed(name) => Event::Unsubscribed(generation, name),
                        Incoming::NodeLost => Event::NodeLost(generation),
                    })
                    .chain(futures_util::stream::once(async move {
                        Event::Ended(generation)
                    })),
            ),
        );
        self.set_active(true);
        if reconnected {
            // Messages published during the outage never reached this replica: its subscribers get what they
            // missed from each channel's history.
            actix::spawn(catch_up(
                self.config.clone(),
                self.store.clone(),
                self.handler.clone(),
                subscribed,
            ));
            self.handler.on_link_up();
        }
    }

    fn disconnected(&mut self, why: &str, ctx: &mut Context<Self>) {
        // Deaf, this replica cannot take the routes' messages: it stops renewing, so another takes over.
        self.ingest_held.iter_mut().for_each(|h| *h = None);
        self.handler.on_link_down();
        log::warn!("redis pub/sub connection lost ({why}); local delivery continues, reconnecting");
        self.sink = None;
        self.drop_stream(ctx);
        self.generation += 1;
        self.set_active(false);
        self.awaiting_confirmation.clear();
        self.resubscribing.clear();
        for watched in self.channels.values_mut() {
            watched.confirmed = false;
        }
        for watched in self.patterns.values_mut() {
            watched.confirmed = false;
        }
        // The next connection subscribes to the desired state from scratch.
        self.subscribed.clear();
        self.psubscribed.clear();
        self.dirty.clear();
        self.dirty_patterns.clear();
        self.syncing = false;
        self.attempts += 1;
        let delay = backoff(self.attempts);
        ctx.run_later(delay, |act, ctx| act.connect(ctx));
    }

    /// Closes the current connection's stream, if any (and with it the connection).
    fn drop_stream(&mut self, ctx: &mut Context<Self>) {
        if let Some(handle) = self.stream.take() {
            ctx.cancel_future(handle);
        }
    }

    /// The Redis pattern covering a relayhub pattern prefix: `<prefix>ch:prices:*`.
    fn pattern_name(&self, prefix: &str) -> String {
        format!("{}*", escape_glob(&self.keys.pubsub_channel(prefix)))
    }

    /// Sends the next batch that brings Redis closer to the desired state, unless one is in flight (its answer
    /// calls this again) or there is no connection (the next one subscribes to everything desired).
    fn sync(&mut self, ctx: &mut Context<Self>) {
        if self.syncing {
            return;
        }
        let Some(mut sink) = self.sink.clone() else {
            return;
        };
        let mut batch = Batch::default();
        for channel in self.dirty.drain() {
            let have = self.subscribed.contains(&channel);
            match self.channels.get_mut(&channel) {
                Some(_) if !have => batch.subscribe.push(channel),
                Some(watched) => {
                    // Re-watched before its UNSUBSCRIBE was sent: Redis never stopped listening.
                    watched.confirmed = true;
                    confirm(&mut watched.waiters);
                }
                None if have => batch.unsubscribe.push(channel),
                None => {}
            }
        }
        for prefix in self.dirty_patterns.drain() {
            let have = self.psubscribed.get(&prefix).cloned();
            match (self.patterns.get_mut(&prefix), have) {
                (Some(watched), None) => {
                    batch.psubscribe.push((prefix, watched.redis_name.clone()));
                }
                (Some(watched), Some(_)) => {
                    watched.confirmed = true;
                    confirm(&mut watched.waiters);
                }
                (None, Some(name)) => batch.punsubscribe.push((prefix, name)),
                (None, None) => {}
            }
        }
        if batch.is_empty() {
            return;
        }
        self.syncing = true;
        let generation = self.generation;
        let keys = self.keys.clone();
        let names = |channels: &[Arc<str>]| -> Vec<String> {
            channels.iter().map(|c| keys.pubsub_channel(c)).collect()
        };
        let subscribe = names(&batch.subscribe);
        if self.keys.is_cluster() {
            self.awaiting_confirmation.extend(subscribe.iter().cloned());
        }
        let unsubscribe = names(&batch.unsubscribe);
        let psubscribe: Vec<String> = batch.psubscribe.iter().map(|(_, n)| n.clone()).collect();
        let punsubscribe: Vec<String> = batch.punsubscribe.iter().map(|(_, n)| n.clone()).collect();
        let fut = async move {
            if !subscribe.is_empty() {
                sink.subscribe(&subscribe).await?;
            }
            if !psubscribe.is_empty() {
                sink.psubscribe(&psubscribe).await?;
            }
            if !unsubscribe.is_empty() {
                sink.unsubscribe(&unsubscribe).await?;
            }
            if !punsubscribe.is_empty() {
                sink.punsubscribe(&punsubscribe).await?;
            }
            Ok::<_, redis::RedisError>(())
        };
        ctx.spawn(fut.into_actor(self).map(move |result, act, ctx| {
            if generation != act.generation {
                // That connection is gone; the next one starts from the desired state.
                return;
            }
            act.syncing = false;
            if let Err(e) = result {
                // The connection is failing; its end triggers a reconnect that subscribes to the desired state
                // from scratch. Until then the batch counts as done, so nobody waits on it.
                log::warn!("SUBSCRIBE/UNSUBSCRIBE on the pub/sub connection failed: {e}");
            }
            for channel in batch.subscribe {
                if let Some(watched) = act.channels.get_mut(&channel) {
                    watched.confirmed = true;
                    confirm(&mut watched.waiters);
                } else {
                    // Unwatched while the SUBSCRIBE was in flight: the next batch unsubscribes it.
                    act.dirty.insert(channel.clone());
                }
                act.subscribed.insert(channel);
            }
            for channel in batch.unsubscribe {
                act.subscribed.remove(&channel);
                if act.channels.contains_key(&channel) {
                    act.dirty.insert(channel);
                }
            }
            for (prefix, name) in batch.psubscribe {
                if let Some(watched) = act.patterns.get_mut(&prefix) {
                    watched.confirmed = true;
                    confirm(&mut watched.waiters);
                } else {
                    act.dirty_patterns.insert(prefix.clone());
                }
                act.psubscribed.insert(prefix, name);
            }
            for (prefix, _) in batch.punsubscribe {
                act.psubscribed.remove(&prefix);
                if act.patterns.contains_key(&prefix) {
                    act.dirty_patterns.insert(prefix);
                }
            }
            act.sync(ctx);
        }));
    }

    fn probe(&mut self, ctx: &mut Context<Self>) {
        if self.sink.is_none() {
            return;
        }
        if self.last_probe_seen.elapsed() > self.probe_interval * PROBE_MISSES {
            self.disconnected("probe not received: connection open but silent", ctx);
            return;
        }
        let store = self.store.clone();
        let channel = self.probe_channel.clone();
        let command = pubsub::probe_command(self.keys.is_cluster());
        actix::spawn(async move {
            let _ = store
                .with_conn(|mut c| async move {
                    redis::cmd(command)
                        .arg(channel)
                        .arg("probe")
                        .query_async::<i64>(&mut c)
                        .await
                })
                .await;
        });
    }

    fn relay(&mut self, msg: Msg) {
        let name = msg.get_channel_name();
        if name == self.probe_channel {
            self.last_probe_seen = Instant::now();
            return;
        }
        let from_pattern = msg.from_pattern();
        let result = match self.keys.channel_of(name) {
            Some(channel) => {
                let pattern: Option<String> = if from_pattern {
                    msg.get_pattern().ok()
                } else {
                    None
                };
                if from_pattern
                    && !pattern
                        .as_deref()
                        .is_some_and(|p| self.is_relayhub_pattern(p))
                {
                    // An ingest pattern broad enough to match relayhub's own channels: not an ingest message.
                    return;
                }
                if let Some(announced) = presence::decode_announcement(msg.get_payload_bytes()) {
                    // Only exact subscribers hear joins and leaves: a pattern's copy is not relayed.
                    if !from_pattern {
                        self.relay_announcement(channel, announced);
                    }
                    return;
                }
                match decode_payload(channel.into(), msg.get_payload_bytes()) {
                    Ok(publication) if self.is_duplicate(&publication, pattern.as_deref()) => {
                        return;
                    }
                    other => other.map_err(str::to_string),
                }
            }
            None => match self.ingest(&msg) {
                Ok(()) => return,
                Err(why) => Err(why.to_string()),
            },
        };
        let stats = &self.stats;
        match result {
            Ok(publication) => {
                Stats::add(&stats.relayed_in, 1);
                self.handler.on_publication(Arc::new(publication));
            }
            Err(why) => {
                Stats::add(&stats.rejected_messages, 1);
                let now = Instant::now();
                if self
                    .last_reject_log
                    .is_none_or(|t| now.duration_since(t) > Duration::from_secs(10))
                {
                    self.last_reject_log = Some(now);
                    log::warn!(
                        "dropped a message on redis channel `{name}`: {why} (logged at most every 10 s)"
                    );
                }
            }
        }
    }

    /// Cluster mode: a sharded channel's subscription was confirmed. Unless this bridge asked for it (or asked
    /// again after the server dropped it), the cluster connection resubscribed by itself after the channel's
    /// node changed: messages published meanwhile never came, so the channel's history is read for its
    /// subscribers, as after an outage of the whole connection.
    fn sharded_subscribed(&mut self, name: String) {
        let asked_again = self.resubscribing.remove(&name);
        if self.awaiting_confirmation.remove(&name) && !asked_again {
            return;
        }
        let Some(channel) = self.keys.channel_of(&name) else {
            return;
        };
        let Some((channel, _)) = self.channels.get_key_value(channel) else {
            return;
        };
        if !asked_again {
            Stats::add(&self.stats.shard_resubscribes, 1);
        }
        log::info!("sharded channel `{channel}` resubscribed after its node changed; catching up");
        actix::spawn(catch_up(
            self.config.clone(),
            self.store.clone(),
            self.handler.clone(),
            vec![channel.clone()],
        ));
    }

    /// Cluster mode: a sharded channel was unsubscribed. When this replica still wants it and did not ask,
    /// the server dropped it (its slot moved to another node): it is subscribed again, where the slot now
    /// lives, and caught up once confirmed.
    fn sharded_unsubscribed(&mut self, name: String, ctx: &mut Context<Self>) {
        let Some(channel) = self.keys.channel_of(&name) else {
            return;
        };
        let Some((channel, _)) = self.channels.get_key_value(channel) else {
            return;
        };
        let channel = channel.clone();
        if self.subscribed.remove(&channel) {
            log::info!(
                "sharded channel `{channel}` was unsubscribed by redis (slot moved); subscribing again"
            );
            Stats::add(&self.stats.shard_resubscribes, 1);
            self.resubscribing.insert(name);
            self.dirty.insert(channel);
            self.sync(ctx);
        }
    }

    fn relay_announcement(&self, channel: &str, announced: presence::Announcement<'_>) {
        if announced.join {
            self.handler
                .on_join(channel, announced.client, announced.member);
        } else {
            self.handler
                .on_leave(channel, announced.client, announced.member);
        }
    }

    fn is_relayhub_pattern(&self, redis_pattern: &str) -> bool {
        self.patterns
            .values()
            .any(|p| p.redis_name == redis_pattern)
            || self.psubscribed.values().any(|p| p == redis_pattern)
    }

    /// A message of a channel with both an exact subscription and a matching pattern arrives twice (message
    /// and pmessage), and once more per pattern when patterns nest (`a:*` and `a:b:*`). Sequenced copies are
    /// all relayed: the ordering rule gives each subscriber one. An unsequenced message (a raw PUBLISH of an
    /// outside producer) has no seq to tell its copies apart, so exactly one of its copies is relayed: the
    /// exact one once its SUBSCRIBE is confirmed, else the one of the longest matching pattern.
    fn is_duplicate(&self, publication: &Publication, pattern: Option<&str>) -> bool {
        if publication.seq.is_some() {
            return false;
        }
        let channel = &publication.channel;
        let exact = self.channels.get(channel).is_some_and(|w| w.confirmed);
        let Some(pattern) = pattern else {
            return false;
        };
        let longest = self
            .patterns
            .iter()
            .filter(|(prefix, _)| channel.starts_with(&***prefix))
            .max_by_key(|(prefix, _)| prefix.len());
        exact || longest.is_some_and(|(_, watched)| watched.redis_name != pattern)
    }

    /// Routes a message of an ingest route to its relayhub channel. The replica holding the route's lease
    /// takes it into the sequenced path (numbered, kept in history, published on the channel); every replica,
    /// this one included, delivers that sequenced copy, never the raw one, so each subscriber gets it once.
    fn ingest(&self, msg: &Msg) -> Result<(), String> {
        let name = msg.get_channel_name();
        let pattern: Option<String> = if msg.from_pattern() {
            msg.get_pattern().ok()
        } else {
            None
        };
        let (index, route) = self
            .routes
            .iter()
            .enumerate()
            .find(|(_, r)| match &pattern {
                Some(p) => r.is_pattern && r.redis_channel == *p,
                None => !r.is_pattern && r.redis_channel == name,
            })
            .ok_or("not a channel relayhub listens to")?;
        let text =
            std::str::from_utf8(msg.get_payload_bytes()).map_err(|_| "message is not UTF-8")?;
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|_| "message is not JSON")?;
        let channel = route.target(&value)?;
        let holding = self.ingest_held[index].is_some_and(|until| Instant::now() < until);
        if holding && let Some(writes) = &self.ingest_writes {
            let write = IngestWrite {
                channel,
                data: text.to_string(),
                keep_latest: route.cache,
            };
            if writes.try_send(write).is_err() {
                Stats::add(&self.stats.ingest_cache_dropped, 1);
            }
        }
        Ok(())
    }

    /// Records what taking or renewing the routes' leases answered (asked at `sent`).
    fn set_ingest_held(&mut self, held: &[bool], sent: Instant) {
        // A margin of a fifth of the lease: this replica stops before another can have taken over.
        let until = sent + self.ingest_lease - self.ingest_lease / 5;
        for (slot, held) in self.ingest_held.iter_mut().zip(held) {
            *slot = held.then_some(until);
        }
    }

    /// Renews the leases this replica holds and tries to take the others (a holder that stopped renewing is
    /// replaced once its lease ran out). Only while the pub/sub connection is live: a deaf replica would
    /// hold a route whose messages it cannot hear.
    fn renew_ingest_leases(&mut self, ctx: &mut Context<Self>) {
        if self.routes.is_empty() || self.sink.is_none() || self.ingest_released {
            return;
        }
        let (store, me, lease) = (
            self.store.clone(),
            self.instance_id.clone(),
            self.ingest_lease,
        );
        let routes = self.routes.clone();
        let sent = Instant::now();
        let generation = self.generation;
        let renew = async move {
            let mut held = Vec::with_capacity(routes.len());
            for route in routes.iter() {
                match store
                    .hold_ingest_lease(&route.redis_channel, &me, lease)
                    .await
                {
                    Ok(h) => held.push(h),
                    Err(e) => {
                        log::warn!(
                            "renewing the lease of ingest route `{}` failed: {e}",
                            route.redis_channel
                        );
                        held.push(false);
                    }
                }
            }
            held
        };
        ctx.spawn(renew.into_actor(self).map(move |held, act, _| {
            if act.generation == generation && !act.ingest_released {
                act.set_ingest_held(&held, sent);
            }
        }));
    }
}

/// Takes ingested messages into the sequenced path one at a time, in the order this replica (the route's
/// lease holder) received them.
async fn sequence_ingested(
    store: Arc<RedisStore>,
    config: Arc<Config>,
    stats: Arc<Stats>,
    mut rx: tokio::sync::mpsc::Receiver<IngestWrite>,
) {
    while let Some(write) = rx.recv().await {
        let policy = config
            .policy(&write.channel)
            .unwrap_or_else(|| config.default_policy());
        let ts = crate::core::protocol::now_ts();
        match store
            .publish_ingested(&write.channel, &write.data, &ts, policy, write.keep_latest)
            .await
        {
            Ok(_) => Stats::add(&stats.relayed_out, 1),
            Err(e) => {
                Stats::add(&stats.ingest_cache_dropped, 1);
                log::warn!(
                    "sequencing an ingested message for `{}` failed: {e}",
                    write.channel
                );
            }
        }
    }
}

/// After a pub/sub outage: reads the history window of each of `channels` and hands them to the handler,
/// which replays to each subscriber what it has not seen. One script run per channel, in batches, so a
/// replica carrying many channels sends its first replays early.
async fn catch_up(
    config: Arc<Config>,
    store: Arc<RedisStore>,
    handler: Arc<dyn BrokerEventHandler>,
    channels: Vec<Arc<str>>,
) {
    for chunk in channels.chunks(100) {
        let mut found = Vec::with_capacity(chunk.len());
        for channel in chunk {
            let policy = config
                .policy(channel)
                .unwrap_or_else(|| config.default_policy());
            match store.window(channel, policy).await {
                Ok(window) => found.push((channel.clone(), window)),
                Err(e) => {
                    log::warn!("catching up after the pub/sub outage failed: {e}");
                    return;
                }
            }
        }
        handler.on_catch_up(Arc::new(found));
    }
}

/// Exponential backoff with jitter: between half and all of `MIN_BACKOFF * 2^attempts`, capped.
fn backoff(attempts: u32) -> Duration {
    crate::core::backoff::reconnect_delay(attempts, MIN_BACKOFF, MAX_BACKOFF)
}

impl Actor for Bridge {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.set_active(false);
        if !self.routes.is_empty() {
            let (tx, rx) = tokio::sync::mpsc::channel(INGEST_QUEUE);
            self.ingest_writes = Some(tx);
            actix::spawn(sequence_ingested(
                self.store.clone(),
                self.config.clone(),
                self.stats.clone(),
                rx,
            ));
            ctx.run_interval(self.ingest_lease / 3, |act, ctx| {
                act.renew_ingest_leases(ctx)
            });
        }
        self.connect(ctx);
        ctx.run_interval(self.probe_interval, |act, ctx| act.probe(ctx));
    }
}

impl StreamHandler<Event> for Bridge {
    fn handle(&mut self, event: Event, ctx: &mut Self::Context) {
        match event {
            Event::Message(generation, msg) if generation == self.generation => self.relay(msg),
            Event::Subscribed(generation, name) if generation == self.generation => {
                self.sharded_subscribed(name)
            }
            Event::Unsubscribed(generation, name) if generation == self.generation => {
                self.sharded_unsubscribed(name, ctx)
            }
            Event::NodeLost(generation) if generation == self.generation => {
                Stats::add(&self.stats.shard_resubscribes, 1);
                self.disconnected("a redis cluster node's connection dropped", ctx)
            }
            Event::Ended(generation) if generation == self.generation => {
                self.disconnected("connection closed", ctx)
            }
            _ => {}
        }
    }

    /// A finished stream is one dead connection, never the end of the bridge.
    fn finished(&mut self, _: &mut Self::Context) {}
}

impl Handler<Watch> for Bridge {
    type Result = ();

    fn handle(&mut self, msg: Watch, ctx: &mut Self::Context) {
        let connected = self.sink.is_some();
        let watched = self.channels.entry(msg.channel.clone()).or_insert(Watched {
            refs: 0,
            confirmed: false,
            waiters: Vec::new(),
        });
        watched.refs += 1;
        if !connected || watched.confirmed {
            // Without a connection nothing waits on Redis; the reconnect subscribes this channel.
            let _ = msg.confirmed.send(());
        } else {
            watched.waiters.push(msg.confirmed);
        }
        if watched.refs == 1 {
            self.dirty.insert(msg.channel);
            self.sync(ctx);
        }
    }
}

impl Handler<WatchPattern> for Bridge {
    type Result = ();

    fn handle(&mut self, msg: WatchPattern, ctx: &mut Self::Context) {
        let connected = self.sink.is_some();
        let redis_name = self.pattern_name(&msg.prefix);
        let watched = self
            .patterns
            .entry(msg.prefix.clone())
            .or_insert(WatchedPattern {
                refs: 0,
                redis_name,
                confirmed: false,
                waiters: Vec::new(),
            });
        watched.refs += 1;
        if !connected || watched.confirmed {
            let _ = msg.confirmed.send(());
        } else {
            watched.waiters.push(msg.confirmed);
        }
        if watched.refs == 1 {
            self.dirty_patterns.insert(msg.prefix);
            self.sync(ctx);
        }
    }
}

impl Handler<UnwatchPattern> for Bridge {
    type Result = ();

    fn handle(&mut self, msg: UnwatchPattern, ctx: &mut Self::Context) {
        let Some(watched) = self.patterns.get_mut(&msg.prefix) else {
            log::debug!("unwatch of pattern `{}*` that is not watched", msg.prefix);
            return;
        };
        watched.refs -= 1;
        if watched.refs == 0 {
            let mut watched = self.patterns.remove(&msg.prefix).expect("looked up above");
            // Anyone still waiting has gone (its registry unwatched); answer so nothing hangs.
            confirm(&mut watched.waiters);
            self.dirty_patterns.insert(msg.prefix);
            self.sync(ctx);
        }
    }
}

impl Handler<ReleaseIngest> for Bridge {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: ReleaseIngest, _: &mut Self::Context) -> Self::Result {
        self.ingest_released = true;
        self.ingest_held.iter_mut().for_each(|h| *h = None);
        let (store, me, routes) = (
            self.store.clone(),
            self.instance_id.clone(),
            self.routes.clone(),
        );
        Box::pin(async move {
            for route in routes.iter() {
                if let Err(e) = store.release_ingest_lease(&route.redis_channel, &me).await {
                    log::warn!(
                        "handing back the lease of ingest route `{}` failed: {e}",
                        route.redis_channel
                    );
                }
            }
        })
    }
}

impl Handler<Unwatch> for Bridge {
    type Result = ();

    fn handle(&mut self, msg: Unwatch, ctx: &mut Self::Context) {
        let Some(watched) = self.channels.get_mut(&msg.channel) else {
            log::debug!("unwatch of channel `{}` that is not watched", msg.channel);
            return;
        };
        watched.refs -= 1;
        if watched.refs == 0 {
            let mut watched = self.channels.remove(&msg.channel).expect("looked up above");
            confirm(&mut watched.waiters);
            self.dirty.insert(msg.channel);
            self.sync(ctx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempts in 0..40 {
            let d = backoff(attempts);
            assert!(d <= MAX_BACKOFF, "{d:?}");
            assert!(d >= MIN_BACKOFF / 2, "{d:?}");
        }
        assert!(backoff(10) >= MAX_BACKOFF / 2);
    }
}
