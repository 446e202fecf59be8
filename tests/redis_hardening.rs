//! What strangers can do to the Redis side, against a real private `redis-server`: subscription churn packed
//! into single TCP writes (Redis must end up listening to exactly what live subscribers need), crafted
//! envelopes on `ch:` channels, ingest caching order, per-channel key lifetimes and bounded pattern scans.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use deadpool_redis::redis;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::{RedisServer, TestHub, eventually, get_json, int_reply, wait_ready};

fn redis_config(redis: &RedisServer, rest: &str) -> String {
    format!(
        "[redis]\nurl = \"{}\"\nrequired = true\n{rest}",
        redis.url()
    )
}

/// The strings of a RESP array reply (`*2\r\n$3\r\nabc\r\n...`), in order.
fn resp_strings(reply: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = reply.split("\r\n");
    while let Some(line) = lines.next() {
        if line.starts_with('$') && line != "$-1" {
            out.push(lines.next().unwrap_or_default().to_string());
        }
    }
    out
}

/// Redis pub/sub channels relayhub listens to for its own channels (probe channels excluded).
fn listened_channels(redis: &RedisServer) -> BTreeSet<String> {
    resp_strings(
        &redis
            .cmd(&["PUBSUB", "CHANNELS", "relayhub:ch:*"])
            .expect("PUBSUB CHANNELS"),
    )
    .into_iter()
    .collect()
}

fn listened_patterns(redis: &RedisServer) -> i64 {
    int_reply(&redis.cmd(&["PUBSUB", "NUMPAT"]).expect("PUBSUB NUMPAT"))
}

/// A masked client text frame (small payloads only).
fn client_text(text: &str) -> Vec<u8> {
    client_frame(0x1, text.as_bytes())
}

fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut out = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// A raw WebSocket connection after the handshake, for sending several frames in one write.
async fn raw_ws(hub: &TestHub) -> TcpStream {
    let mut stream = TcpStream::connect(hub.addr).await.expect("connect");
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        hub.addr
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte))
            .await
            .expect("handshake answer")
            .expect("read");
        assert_eq!(n, 1, "closed during the handshake");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(&head)
    );
    stream
}

fn op(op: &str, channel: &str) -> Vec<u8> {
    client_text(&json!({"op": op, "channel": channel}).to_string())
}

#[actix_web::test]
async fn subscription_churn_in_one_write_leaves_redis_listening_to_live_subscribers_only() {
    let redis = RedisServer::start();
    let config = redis_config(&redis, "[namespaces.pat]\npatterns = true\n");
    let hub = TestHub::start(&config).await;
    wait_ready(&hub).await;

    // Subscribers that stay: one exact channel and one pattern.
    let mut live = hub.connect().await;
    live.subscribe("live:1").await;
    live.subscribe("pat:live:*").await;

    let mut kept = Vec::new();
    for i in 0..60 {
        let mut ws = raw_ws(&hub).await;
        let channel = format!("churn:{}", i % 20);
        let pattern = format!("pat:{}:*", i % 10);
        let mut batch = Vec::new();
        match i % 3 {
            // Subscribe and unsubscribe in one write, exact and pattern.
            0 => {
                batch.extend(op("subscribe", &channel));
                batch.extend(op("unsubscribe", &channel));
                batch.extend(op("subscribe", &pattern));
                batch.extend(op("unsubscribe", &pattern));
                ws.write_all(&batch).await.unwrap();
                kept.push(ws);
            }
            // Subscribe, then a close frame, in one write.
            1 => {
                batch.extend(op("subscribe", &channel));
                batch.extend(op("subscribe", &pattern));
                batch.extend(client_frame(0x8, &1000u16.to_be_bytes()));
                ws.write_all(&batch).await.unwrap();
                kept.push(ws);
            }
            // Subscribe, then the socket goes away.
            _ => {
                batch.extend(op("subscribe", &channel));
                batch.extend(op("subscribe", &pattern));
                batch.extend(op("subscribe", "live:1"));
                ws.write_all(&batch).await.unwrap();
                drop(ws);
            }
        }
    }
    drop(kept);

    let want: BTreeSet<String> = ["relayhub:ch:live:1".to_string()].into();
    eventually(
        Duration::from_secs(20),
        "Redis listens to exactly the live subscribers' channel and pattern",
        || async { listened_channels(&redis) == want && listened_patterns(&redis) == 1 },
    )
    .await;
    // And stays there: nothing late re-subscribes what nobody needs.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(listened_channels(&redis), want);
    assert_eq!(listened_patterns(&redis), 1);
    // The live subscriptions still work.
    hub.publish("live:1", json!(1)).await;
    assert_eq!(live.recv_type("message").await["channel"], "live:1");
    hub.publish("pat:live:x", json!(2)).await;
    assert_eq!(live.recv_type("message").await["channel"], "pat:live:x");
    drop(live);
    eventually(
        Duration::from_secs(20),
        "Redis listens to nothing once the last subscriber is gone",
        || async { listened_channels(&redis).is_empty() && listened_patterns(&redis) == 0 },
    )
    .await;
}

#[actix_web::test]
async fn crafted_envelopes_are_dropped_and_counted() {
    let redis = RedisServer::start();
    let hub = TestHub::start(&redis_config(&redis, "")).await;
    wait_ready(&hub).await;
    let mut ws = hub.connect().await;
    ws.subscribe("prices:BTC").await;
    let before = hub.stats().await["rejected_messages"].as_u64().unwrap();

    let mut conn = redis.client().await;
    let crafted: [&[u8]; 6] = [
        // A `ts` that closes its string and adds a second `data` the producer never sent.
        b"\x1e7 x\",\"data\":\"forged {\"real\":1}",
        // Data that is not JSON.
        b"\x1e7 2026-01-01T00:00:00.000Z {broken",
        // A `ts` that is not RFC 3339.
        b"\x1e7 yesterday {\"real\":1}",
        // Data followed by more fields.
        b"\x1e7 2026-01-01T00:00:00.000Z 1,\"seq\":99",
        // A seq that is not a plain integer.
        b"\x1e+7 2026-01-01T00:00:00.000Z 1",
        b"\x1e7 2026-01-01T00:00:00.000Z ",
    ];
    for payload in crafted {
        let _: i64 = redis::cmd("PUBLISH")
            .arg("relayhub:ch:prices:BTC")
            .arg(payload)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    // A well-formed envelope and raw JSON still pass.
    let _: i64 = redis::cmd("PUBLISH")
        .arg("relayhub:ch:prices:BTC")
        .arg(&b"\x1e8 2026-01-01T00:00:00.000Z {\"ok\":true}"[..])
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: i64 = redis::cmd("PUBLISH")
        .arg("relayhub:ch:prices:BTC")
        .arg(&b"{\"raw\":true}"[..])
        .query_async(&mut conn)
        .await
        .unwrap();
    let first = ws.recv_type("message").await;
    assert_eq!(
        first,
        json!({"type": "message", "channel": "prices:BTC", "data": {"ok": true}, "seq": 8,
               "ts": "2026-01-01T00:00:00.000Z"})
    );
    let second = ws.recv_type("message").await;
    assert_eq!(
        second,
        json!({"type": "message", "channel": "prices:BTC", "data": {"raw": true}})
    );
    let after = hub.stats().await["rejected_messages"].as_u64().unwrap();
    assert_eq!(after - before, crafted.len() as u64);
}

const INGEST: &str = r#"
[[ingest]]
redis_channel = "feed:updates"
channel = "feed:{symbol}"
cache = true
"#;

async fn publish_raw(conn: &mut redis::aio::MultiplexedConnection, channel: &str, payload: &str) {
    let _: i64 = redis::cmd("PUBLISH")
        .arg(channel)
        .arg(payload)
        .query_async(conn)
        .await
        .unwrap();
}

async fn cached(hub: &TestHub, channel: &str) -> Value {
    get_json(&hub.http(&format!("/api/channels/{channel}")))
        .await
        .1["data"]
        .clone()
}

#[actix_web::test]
async fn the_ingest_cache_holds_the_last_message_received() {
    let redis = RedisServer::start();
    let config = redis_config(&redis, INGEST);
    let hubs = [TestHub::start(&config).await, TestHub::start(&config).await];
    for hub in &hubs {
        wait_ready(hub).await;
    }
    let mut ws = hubs[0].connect().await;
    ws.subscribe("feed:A").await;
    let mut conn = redis.client().await;

    // A, B, A: the cached value is A, the last one received.
    for v in [1, 2, 1] {
        publish_raw(
            &mut conn,
            "feed:updates",
            &json!({"symbol": "A", "v": v}).to_string(),
        )
        .await;
    }
    for v in [1, 2, 1] {
        assert_eq!(ws.recv_type("message").await["data"]["v"], v);
    }
    for hub in &hubs {
        eventually(Duration::from_secs(10), "A cached again", || async {
            cached(hub, "feed:A").await["v"] == 1
        })
        .await;
    }
    // Some time later it is still A (no late write of B).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(cached(&hubs[1], "feed:A").await["v"], 1);

    // A burst of distinct messages ends with the last one cached, on every replica's view.
    const N: u64 = 300;
    for v in 0..N {
        publish_raw(
            &mut conn,
            "feed:updates",
            &json!({"symbol": "B", "v": v}).to_string(),
        )
        .await;
    }
    for hub in &hubs {
        eventually(
            Duration::from_secs(10),
            "the burst's last value cached",
            || async { cached(hub, "feed:B").await["v"] == N - 1 },
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(cached(&hubs[0], "feed:B").await["v"], N - 1);
    // One snapshot per message fleet-wide, newest first.
    let (_, history) = get_json(&hubs[0].http("/api/channels/feed:A/history?limit=10")).await;
    let vs: Vec<Value> = history["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["data"]["v"].clone())
        .collect();
    assert_eq!(vs, [json!(1), json!(2), json!(1)]);
}

#[actix_web::test]
async fn memory_mode_stays_under_max_memory_evicting_the_least_recently_published() {
    const MAX: u64 = 1 << 20;
    let hub = TestHub::start(&format!(
        "[channels]\nmax_memory = {MAX}\nhistory_size = 3\n"
    ))
    .await;
    let big = "x".repeat(20_000);
    for i in 0..200 {
        hub.publish(&format!("big:{i}"), json!({"i": i, "pad": big}))
            .await;
        if i % 20 == 0 {
            let stats = hub.stats().await;
            assert!(stats["store_bytes"].as_u64().unwrap() <= MAX, "{stats}");
        }
    }
    let stats = hub.stats().await;
    let bytes = stats["store_bytes"].as_u64().unwrap();
    assert!(bytes <= MAX && bytes > MAX / 2, "{stats}");
    assert!(stats["store_evictions"].as_u64().unwrap() >= 100, "{stats}");
    // The oldest publishes were evicted, the newest are served.
    assert_eq!(get_json(&hub.http("/api/channels/big:0")).await.0, 404);
    let (status, latest) = get_json(&hub.http("/api/channels/big:199")).await;
    assert_eq!((status, latest["data"]["i"].clone()), (200, json!(199)));
}

#[actix_web::test]
async fn memory_mode_reclaims_expired_values() {
    let hub = TestHub::start("[namespaces.short]\nttl = \"100ms\"\n").await;
    for i in 0..50 {
        hub.publish(&format!("short:{i}"), json!(i)).await;
    }
    hub.publish("long:1", json!(1)).await;
    // Nobody reads the short channels again: the periodic sweep reclaims them.
    eventually(
        Duration::from_secs(10),
        "expired values reclaimed",
        || async {
            let stats = hub.stats().await;
            stats["store_expired"].as_u64() == Some(50)
                && stats["store_channels"].as_u64() == Some(1)
        },
    )
    .await;
    let stats = hub.stats().await;
    let bytes = stats["store_bytes"].as_u64().unwrap();
    assert!(bytes > 0 && bytes < 1000, "{stats}");
    assert_eq!(get_json(&hub.http("/api/channels/long:1")).await.0, 200);
}

#[actix_web::test]
async fn every_per_channel_redis_key_has_a_ttl_refreshed_on_publish() {
    let redis = RedisServer::start();
    let hub = TestHub::start(&redis_config(
        &redis,
        "[namespaces.t]\nttl = \"1h\"\nhistory_size = 2\n",
    ))
    .await;
    wait_ready(&hub).await;
    hub.publish("t:a", json!(1)).await;
    for key in [
        "relayhub:seq:t:a",
        "relayhub:cache:t:a",
        "relayhub:snap:t:a",
    ] {
        let ttl = int_reply(&redis.cmd(&["TTL", key]).unwrap());
        assert!(ttl > 3000 && ttl <= 3600, "{key}: TTL {ttl}");
    }
    // Shortened by hand, refreshed by the next publish; the sequence carries on.
    redis.cmd(&["EXPIRE", "relayhub:seq:t:a", "5"]).unwrap();
    let published = hub.publish("t:a", json!(2)).await;
    assert_eq!(published["seq"], 2);
    let ttl = int_reply(&redis.cmd(&["TTL", "relayhub:seq:t:a"]).unwrap());
    assert!(ttl > 3000, "TTL {ttl}");
}

/// SCAN calls counted by `INFO commandstats` since the last `CONFIG RESETSTAT`.
fn scan_calls(redis: &RedisServer) -> u64 {
    let info = redis.cmd(&["INFO", "commandstats"]).expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_scan:"))
        .and_then(|f| f.split(',').find_map(|f| f.strip_prefix("calls=")))
        .map_or(0, |n| n.parse().unwrap())
}

#[actix_web::test]
async fn pattern_snapshots_scan_a_bounded_number_of_keys_and_leave_the_pool_to_publishes() {
    let redis = RedisServer::start();
    let mut conn = redis.client().await;
    // 50,000 unrelated keys under the prefix, one rare cached channel.
    for chunk in 0..50 {
        let mut pipe = redis::pipe();
        for i in 0..1000 {
            pipe.set(format!("relayhub:other:{chunk}:{i}"), 1).ignore();
        }
        let _: () = pipe.query_async(&mut conn).await.unwrap();
    }
    let hub = TestHub::start(&redis_config(
        &redis,
        "pool_size = 2\n[namespaces.rare]\npatterns = true\n",
    ))
    .await;
    wait_ready(&hub).await;
    redis.cmd(&["CONFIG", "RESETSTAT"]).unwrap();
    let mut ws = hub.connect().await;
    ws.subscribe("rare:*").await;
    // The snapshot look-up runs after the acknowledgement: wait until it started, then give it time to end.
    eventually(Duration::from_secs(10), "the pattern scan ran", || async {
        scan_calls(&redis) > 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Default bound 10,000 keys examined, 500 per SCAN: at most 20 calls (the unbounded scan needs ~100).
    let calls = scan_calls(&redis);
    assert!((1..=20).contains(&calls), "SCAN calls: {calls}");

    // Several such scans at once do not starve publishes of pooled connections.
    redis.cmd(&["CONFIG", "RESETSTAT"]).unwrap();
    let mut scanners = Vec::new();
    for i in 0..8 {
        let mut ws = hub.connect().await;
        ws.send(json!({"op": "subscribe", "channel": format!("rare:{i}:*")}))
            .await;
        scanners.push(ws);
    }
    for n in 0..20 {
        let published = hub.publish("rare:live", json!(n)).await;
        assert_eq!(published["relayed"], true, "{published}");
        assert!(published["seq"].is_u64(), "{published}");
    }
    for ws in &mut scanners {
        ws.recv_type("subscribed").await;
        ws.ping().await;
    }
    let calls = scan_calls(&redis);
    assert!(calls <= 8 * 20, "SCAN calls: {calls}");
}
