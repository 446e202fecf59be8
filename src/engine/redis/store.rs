//! The Redis store: latest values, snapshot lists and sequence numbers in Redis, written and published in
//! one Lua script per message (one round trip, one atomic step), through a deadpool connection pool.
//!
//! Pub/sub payloads that relayhub publishes are envelopes: byte 0x1E, the sequence number, a space, the
//! timestamp, a space, then the JSON. Anything else on a `ch:` channel is an outside producer's raw JSON.

use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::redis::{self, AsyncCommands};
use deadpool_redis::{Pool, PoolConfig, Runtime, Timeouts};
use redis::cluster_async::ClusterConnection;
use serde_json::value::RawValue;

use super::keys::Keys;
use crate::core::config::{ChannelPolicy, RedisConfig};
use crate::core::publication::Publication;
use crate::engine::seam::{Window, history_cutoff, within};

/// Marks a relayhub envelope on a pub/sub channel: raw JSON can never start with it.
pub const ENVELOPE_MARK: u8 = 0x1e;
/// Marks an envelope that also carries a polled value's fetch time (`seq ts fetched_at data`).
pub const ENVELOPE_MARK_FETCHED: u8 = 0x1f;

/// INCR the sequence, SET the latest value with its TTL, LPUSH+LTRIM the snapshot list, PUBLISH the envelope.
const PUBLISH_SCRIPT: &str = include_str!("publish.lua");

/// Epoch (created when missing), seq, latest value and history of a channel in one atomic read.
const WINDOW_SCRIPT: &str = include_str!("window.lua");

/// Takes or renews the lease of an `[[ingest]]` route, or hands it back: one replica sequences its messages.
const INGEST_LEASE_SCRIPT: &str = include_str!("ingest_lease.lua");

/// Keys one SCAN step examines (its COUNT): large enough for few round trips, small enough that one step never
/// keeps Redis busy for long.
const SCAN_STEP: usize = 500;

pub use crate::engine::seam::EngineError as RedisError;

impl From<redis::RedisError> for RedisError {
    fn from(e: redis::RedisError) -> Self {
        RedisError(e.to_string())
    }
}

impl From<deadpool_redis::PoolError> for RedisError {
    fn from(e: deadpool_redis::PoolError) -> Self {
        RedisError(format!("redis pool: {e}"))
    }
}

/// Result of one publish script run.
pub struct Published {
    pub seq: u64,
    /// Redis pub/sub receivers: the replicas listening to the channel.
    pub receivers: u64,
}

/// Where commands go: a pool of connections to one Redis, or one cluster connection (it keeps a multiplexed
/// connection per node, routes each command to its slot's owner and follows MOVED, slot migrations and
/// failovers; cloning it is cheap and shares those connections).
enum Backend {
    Single(Pool),
    Cluster(ClusterConnection),
}

/// One connection taken for a command, whichever backend gave it; commands, pipelines and scripts run on it
/// alike. A pipeline given to a cluster connection must stay in one slot (relayhub's stay in a channel's or
/// in the fleet's).
pub enum Conn {
    Single(deadpool_redis::Connection),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

pub struct RedisStore {
    backend: Backend,
    keys: Keys,
    script: redis::Script,
    ingest_lease_script: redis::Script,
    window_script: redis::Script,
    command_timeout: Duration,
}

#[derive(serde::Deserialize)]
struct SnapshotEntry<'a> {
    seq: Option<u64>,
    #[serde(borrow)]
    ts: Option<&'a str>,
    #[serde(borrow, default)]
    fetched_at: Option<&'a str>,
    #[serde(borrow)]
    data: &'a RawValue,
}

impl SnapshotEntry<'_> {
    fn publication(&self, channel: Arc<str>) -> Publication {
        Publication::with_fetched_at(channel, self.data.get(), self.seq, self.ts, self.fetched_at)
    }
}

impl RedisStore {
    /// Builds the pool and checks that Redis answers.
    pub async fn connect(config: &RedisConfig) -> Result<RedisStore, RedisError> {
        let mut pool_config = PoolConfig::new(config.pool_size);
        pool_config.timeouts = Timeouts {
            wait: Some(config.command_timeout),
            create: Some(config.connect_timeout),
            recycle: Some(config.command_timeout),
        };
        let backend = if config.is_cluster() {
            let client = redis::cluster::ClusterClientBuilder::new(config.cluster_nodes.clone())
                .connection_timeout(config.connect_timeout)
                .response_timeout(config.command_timeout)
                // The pool's bound, per node: commands in flight past it wait their turn (within the
                // command timeout) instead of queueing without end behind a slow node.
                .connection_concurrency_limit(config.pool_size)
                .build()
                .map_err(|e| RedisError(format!("bad redis.cluster_nodes: {e}")))?;
            let connecting = client.get_async_connection();
            let connection = tokio::time::timeout(config.connect_timeout * 2, connecting)
                .await
                .map_err(|_| RedisError("the redis cluster did not answer in time".into()))??;
            Backend::Cluster(connection)
        } else {
            let mut cfg = deadpool_redis::Config::from_url(config.url.clone());
            cfg.pool = Some(pool_config);
            let pool = cfg
                .create_pool(Some(Runtime::Tokio1))
                .map_err(|e| RedisError(format!("bad redis.url: {e}")))?;
            Backend::Single(pool)
        };
        let store = RedisStore {
            backend,
            keys: Keys::with_layout(&config.prefix, config.is_cluster()),
            script: redis::Script::new(PUBLISH_SCRIPT),
            ingest_lease_script: redis::Script::new(INGEST_LEASE_SCRIPT),
            window_script: redis::Script::new(WINDOW_SCRIPT),
            command_timeout: config.command_timeout,
        };
        store.ping().await?;
        Ok(store)
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Runs `f` on a pooled connection within the command timeout.
    pub async fn with_conn<T, F, Fut>(&self, f: F) -> Result<T, RedisError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = Result<T, redis::RedisError>>,
    {
        let work = async {
            let conn = match &self.backend {
                Backend::Single(pool) => Conn::Single(pool.get().await?),
                Backend::Cluster(connection) => Conn::Cluster(connection.clone()),
            };
            f(conn).await.map_err(RedisError::from)
        };
        match tokio::time::timeout(self.command_timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(RedisError(format!(
                "redis did not answer within {:?}",
                self.command_timeout
            ))),
        }
    }

    pub async fn ping(&self) -> Result<(), RedisError> {
        self.with_conn(
            |mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await },
        )
        .await
        .map(|_| ())
    }

    /// Records and publishes one message in a single script run.
    pub async fn publish(
        &self,
        channel: &str,
        data: &str,
        ts: &str,
        fetched_at: Option<&str>,
        policy: ChannelPolicy,
    ) -> Result<Published, RedisError> {
        let keys = &self.keys;
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(keys.seq(channel))
            .key(keys.cache(channel))
            .key(keys.snapshots(channel))
            .key(keys.epoch(channel))
            .arg(data)
            .arg(ts)
            .arg(policy.ttl.as_secs().max(1))
            .arg(policy.history_size)
            .arg(keys.pubsub_channel(channel))
            .arg(new_epoch())
            .arg(fetched_at.unwrap_or(""))
            .arg("1")
            .arg(sharded(keys));
        let (seq, receivers): (u64, u64) = self
            .with_conn(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        Ok(Published { seq, receivers })
    }

    /// The channel's epoch, newest seq, latest value and history younger than `history_ttl`, read in one
    /// script run.
    pub async fn window(&self, channel: &str, policy: ChannelPolicy) -> Result<Window, RedisError> {
        let keys = &self.keys;
        let mut invocation = self.window_script.prepare_invoke();
        invocation
            .key(keys.seq(channel))
            .key(keys.epoch(channel))
            .key(keys.cache(channel))
            .key(keys.snapshots(channel))
            .arg(new_epoch())
            .arg(policy.history_size)
            .arg(policy.ttl.as_secs().max(1));
        let (epoch, seq, latest, items): (String, u64, Option<String>, Vec<String>) = self
            .with_conn(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        let name: Arc<str> = channel.into();
        let cutoff = history_cutoff(policy.history_ttl);
        let history = items
            .iter()
            .filter_map(|item| serde_json::from_str::<SnapshotEntry>(item).ok())
            .filter(|e| e.seq.is_some())
            .take_while(|e| within(e.ts, cutoff))
            .map(|e| Arc::new(e.publication(name.clone())))
            .collect();
        let latest = decode_latest(name, latest.as_deref(), items.first().map(|s| s.as_str()));
        Ok(Window {
            epoch: epoch.into(),
            seq,
            latest: latest.map(Arc::new),
            history,
        })
    }

    /// Takes or renews this replica's lease of the `[[ingest]]` route on `redis_channel`; true while it holds it.
    pub async fn hold_ingest_lease(
        &self,
        redis_channel: &str,
        me: &str,
        lease: std::time::Duration,
    ) -> Result<bool, RedisError> {
        self.ingest_lease(redis_channel, me, lease, "hold").await
    }

    /// Hands back this replica's lease of the `[[ingest]]` route on `redis_channel` (when it holds it).
    pub async fn release_ingest_lease(
        &self,
        redis_channel: &str,
        me: &str,
    ) -> Result<bool, RedisError> {
        self.ingest_lease(redis_channel, me, std::time::Duration::ZERO, "release")
            .await
    }

    async fn ingest_lease(
        &self,
        redis_channel: &str,
        me: &str,
        lease: std::time::Duration,
        mode: &str,
    ) -> Result<bool, RedisError> {
        let mut invocation = self.ingest_lease_script.prepare_invoke();
        invocation
            .key(self.keys.ingest_lease(redis_channel))
            .arg(me)
            .arg(lease.as_millis() as u64)
            .arg(mode);
        let held: i64 = self
            .with_conn(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        Ok(held == 1)
    }

    /// Takes a message that arrived through an `[[ingest]]` route into the sequenced path: the publish script
    /// numbers it, keeps it in history and publishes it on the channel; with `keep_latest` false (a route
    /// without `cache`) the latest value is left as it was.
    pub async fn publish_ingested(
        &self,
        channel: &str,
        data: &str,
        ts: &str,
        policy: ChannelPolicy,
        keep_latest: bool,
    ) -> Result<Published, RedisError> {
        let keys = &self.keys;
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(keys.seq(channel))
            .key(keys.cache(channel))
            .key(keys.snapshots(channel))
            .key(keys.epoch(channel))
            .arg(data)
            .arg(ts)
            .arg(policy.ttl.as_secs().max(1))
            .arg(policy.history_size)
            .arg(keys.pubsub_channel(channel))
            .arg(new_epoch())
            .arg("")
            .arg(if keep_latest { "1" } else { "0" })
            .arg(sharded(keys));
        let (seq, receivers): (u64, u64) = self
            .with_conn(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        Ok(Published { seq, receivers })
    }

    /// The cached latest value. Its seq and ts come from the newest snapshot when that snapshot holds the same
    /// data; a value an outside producer SET directly has neither.
    pub async fn latest(&self, channel: &str) -> Result<Option<Publication>, RedisError> {
        let mut found = self.latest_many(&[Arc::from(channel)]).await?;
        Ok(found.pop().flatten())
    }

    /// The cached latest values of several channels in one round trip (in the order asked).
    pub async fn latest_many(
        &self,
        channels: &[Arc<str>],
    ) -> Result<Vec<Option<Publication>>, RedisError> {
        if channels.is_empty() {
            return Ok(Vec::new());
        }
        if self.keys.is_cluster() {
            // A cluster pipeline stays in one slot: one small pipeline per channel, all in flight at once.
            let reads = channels
                .iter()
                .map(|channel| self.latest_one(channel.clone()));
            return futures_util::future::try_join_all(reads).await;
        }
        let mut pipe = redis::pipe();
        for channel in channels {
            pipe.get(self.keys.cache(channel))
                .lindex(self.keys.snapshots(channel), 0);
        }
        let replies: Vec<Option<String>> = self
            .with_conn(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        Ok(channels
            .iter()
            .zip(replies.chunks(2))
            .map(|(channel, pair)| {
                decode_latest(channel.clone(), pair[0].as_deref(), pair[1].as_deref())
            })
            .collect())
    }

    /// One channel's cached value (its two reads share the channel's slot).
    async fn latest_one(&self, channel: Arc<str>) -> Result<Option<Publication>, RedisError> {
        let mut pipe = redis::pipe();
        pipe.get(self.keys.cache(&channel))
            .lindex(self.keys.snapshots(&channel), 0);
        let (value, newest): (Option<String>, Option<String>) = self
            .with_conn(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        Ok(decode_latest(channel, value.as_deref(), newest.as_deref()))
    }

    /// Up to `limit` snapshots, newest first, as publications.
    pub async fn history(
        &self,
        channel: &str,
        limit: usize,
    ) -> Result<Vec<Publication>, RedisError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let key = self.keys.snapshots(channel);
        let items: Vec<String> = self
            .with_conn(|mut c| async move { c.lrange(key, 0, limit as isize - 1).await })
            .await?;
        let channel: Arc<str> = channel.into();
        Ok(items
            .iter()
            .filter_map(|item| serde_json::from_str::<SnapshotEntry>(item).ok())
            .map(|e| e.publication(channel.clone()))
            .collect())
    }

    /// Latest values of cached channels starting with `prefix`: at most `limit` of them, found by SCAN within
    /// about `max_scan` keys examined. Each SCAN step takes a pooled connection only for its own round trip,
    /// so a long scan never holds one that publishes need. The flag says the bound stopped the scan early.
    pub async fn latest_matching(
        &self,
        prefix: &str,
        limit: usize,
        max_scan: usize,
    ) -> Result<(Vec<Publication>, bool), RedisError> {
        if self.keys.is_cluster() {
            // Cluster mode refuses pattern subscriptions, the only reason to look keys up by prefix.
            return Ok((Vec::new(), false));
        }
        let pattern = format!("{}*", escape_glob(&self.keys.cache_prefix(prefix)));
        let step = SCAN_STEP.min(max_scan).max(1);
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        let mut examined = 0;
        let mut truncated = false;
        loop {
            let pattern = pattern.clone();
            let (next, batch): (u64, Vec<String>) = self
                .with_conn(|mut c| async move {
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(step)
                        .query_async(&mut c)
                        .await
                })
                .await?;
            keys.extend(batch);
            cursor = next;
            examined += step;
            if cursor == 0 || keys.len() >= limit {
                break;
            }
            if examined >= max_scan {
                truncated = true;
                break;
            }
        }
        keys.truncate(limit);
        let cache_prefix = self.keys.cache_prefix("");
        let channels: Vec<Arc<str>> = keys
            .iter()
            .filter_map(|key| key.strip_prefix(&cache_prefix))
            .filter(|channel| crate::core::protocol::validate_channel(channel).is_ok())
            .map(Arc::from)
            .collect();
        // One round trip for all of them.
        let found = self
            .latest_many(&channels)
            .await?
            .into_iter()
            .flatten()
            .collect();
        Ok((found, truncated))
    }
}

/// A cached value with the seq and ts of the newest snapshot when that snapshot holds the same data (a value
/// an outside producer SET directly has neither). A value that is not JSON is ignored (and logged).
fn decode_latest(
    channel: Arc<str>,
    value: Option<&str>,
    newest: Option<&str>,
) -> Option<Publication> {
    let value = value?;
    if serde_json::from_str::<&RawValue>(value).is_err() {
        log::warn!("cached value of `{channel}` is not JSON; ignoring it");
        return None;
    }
    if let Some(newest) = newest
        && let Ok(entry) = serde_json::from_str::<SnapshotEntry>(newest)
        && entry.data.get() == value
    {
        return Some(entry.publication(channel));
    }
    Some(Publication::new(channel, value, None, None))
}

/// The publish script's last argument: `s` makes it SPUBLISH (cluster mode), anything else PUBLISH.
fn sharded(keys: &Keys) -> &'static str {
    if keys.is_cluster() { "s" } else { "" }
}

/// A fresh epoch: short, random, the same for every replica once one of them stored it.
fn new_epoch() -> String {
    format!("{:x}", crate::core::random::u64() >> 16)
}

/// Escapes Redis glob metacharacters so a prefix matches literally.
pub fn escape_glob(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Decodes a pub/sub payload on a `ch:` channel: relayhub's envelope, or an outside producer's raw JSON.
pub fn decode_payload(channel: Arc<str>, payload: &[u8]) -> Result<Publication, &'static str> {
    let mark = payload.first().copied();
    if mark == Some(ENVELOPE_MARK) || mark == Some(ENVELOPE_MARK_FETCHED) {
        let text = std::str::from_utf8(&payload[1..]).map_err(|_| "envelope is not UTF-8")?;
        let (seq, rest) = text.split_once(' ').ok_or("envelope without seq")?;
        let (ts, rest) = rest.split_once(' ').ok_or("envelope without ts")?;
        let (fetched_at, data) = if mark == Some(ENVELOPE_MARK_FETCHED) {
            let (at, data) = rest.split_once(' ').ok_or("envelope without fetched_at")?;
            chrono::DateTime::parse_from_rfc3339(at)
                .map_err(|_| "envelope fetched_at is not RFC 3339")?;
            (Some(at), data)
        } else {
            (None, rest)
        };
        // Anyone who can PUBLISH on the channel can send a payload starting with the mark, and `ts` and `data`
        // are spliced into the frame as they are: each part is checked, so a crafted envelope cannot add or
        // replace fields. Once per message received, not per delivery.
        if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return Err("envelope seq is not a number");
        }
        let seq: u64 = seq.parse().map_err(|_| "envelope seq is not a number")?;
        chrono::DateTime::parse_from_rfc3339(ts).map_err(|_| "envelope ts is not RFC 3339")?;
        serde_json::from_str::<&RawValue>(data).map_err(|_| "envelope data is not JSON")?;
        return Ok(Publication::with_fetched_at(
            channel,
            data,
            Some(seq),
            Some(ts),
            fetched_at,
        ));
    }
    let text = std::str::from_utf8(payload).map_err(|_| "message is not UTF-8")?;
    serde_json::from_str::<&RawValue>(text).map_err(|_| "message is not JSON")?;
    Ok(Publication::new(channel, text, None, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads() {
        let p = decode_payload("a".into(), b"\x1e12 2026-01-01T00:00:00.000Z {\"x\":1}").unwrap();
        assert_eq!(
            (p.seq, p.ts(), p.data()),
            (Some(12), Some("2026-01-01T00:00:00.000Z"), "{\"x\":1}")
        );
        let p = decode_payload("a".into(), b" {\"y\": 2}").unwrap();
        assert_eq!((p.seq, p.data()), (None, " {\"y\": 2}"));
        assert!(decode_payload("a".into(), b"{broken").is_err());
        assert!(decode_payload("a".into(), b"\x1ex 1 2").is_err());
        for crafted in [
            &b"\x1e7 x\",\"data\":\"forged {}"[..],
            b"\x1e+7 2026-01-01T00:00:00.000Z 1",
            b"\x1e7 2026-01-01T00:00:00.000Z {",
            b"\x1e7 2026-01-01T00:00:00.000Z 1,\"seq\":2",
            b"\x1e7 2026-01-01 1",
        ] {
            assert!(decode_payload("a".into(), crafted).is_err(), "{crafted:?}");
        }
        let p = decode_payload(
            "a".into(),
            b"\x1f3 2026-01-01T00:00:01.000Z 2026-01-01T00:00:00.500Z [1]",
        )
        .unwrap();
        assert_eq!(
            (p.seq, p.fetched_at(), p.data()),
            (Some(3), Some("2026-01-01T00:00:00.500Z"), "[1]")
        );
        assert!(
            decode_payload(
                "a".into(),
                b"\x1f3 2026-01-01T00:00:01.000Z x\",\"seq\":9 [1]"
            )
            .is_err()
        );
        assert_eq!(escape_glob("a*b"), "a\\*b");
    }
}
