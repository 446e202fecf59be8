//! Several replicas against one real `redis-server` (started by each test on a free port): fan-out across the
//! fleet, one sequence per channel, outside producers, the cache and snapshot keys, outages, deaf pub/sub
//! connections and the Redis cost of a publish.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use deadpool_redis::redis;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use common::{
    RedisServer, TestHub, Ws, eventually, get_json, int_reply, wait_ready, wait_subscribers,
};

/// Config of a replica using `url`, with extra `[redis]` keys and any other tables.
fn config(url: &str, redis_extra: &str, rest: &str) -> String {
    format!("[redis]\nurl = \"{url}\"\nrequired = true\n{redis_extra}\n{rest}")
}

/// `n` replicas sharing `redis`, each ready (its pub/sub connection live).
async fn fleet(redis: &RedisServer, n: usize, redis_extra: &str, rest: &str) -> Vec<TestHub> {
    let mut hubs = Vec::new();
    for _ in 0..n {
        hubs.push(TestHub::start(&config(&redis.url(), redis_extra, rest)).await);
    }
    for hub in &hubs {
        wait_ready(hub).await;
    }
    hubs
}

/// Subscribes and returns the snapshot that must follow (the channel has a value).
async fn subscribe_with_snapshot(ws: &mut Ws, channel: &str) -> Value {
    ws.subscribe(channel).await;
    let snapshot = ws.recv_type("snapshot").await;
    assert_eq!(snapshot["channel"], channel);
    snapshot
}

fn redis_int(redis: &RedisServer, args: &[&str]) -> i64 {
    int_reply(&redis.cmd(args).expect("redis answers"))
}

async fn stat(hub: &TestHub, name: &str) -> Value {
    hub.stats().await[name].clone()
}

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Counts panics anywhere in this process (actor and worker threads included) from now on.
fn count_panics() -> usize {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default(info);
        }));
    });
    PANICS.load(Ordering::SeqCst)
}

fn assert_no_panic_since(before: usize) {
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        before,
        "something panicked in this process (see stderr)"
    );
}

#[actix_web::test]
async fn three_replicas_deliver_every_publish_once_in_one_order() {
    let redis = RedisServer::start();
    let hubs = fleet(&redis, 3, "", "").await;
    let channel = "chat:fleet";
    let other = "prices:fleet";
    // A first value makes each subscriber's activation visible: its snapshot arrives once the replica listens
    // to the channel in Redis and has read the cache.
    for name in [channel, other] {
        assert_eq!(hubs[0].publish(name, json!({"seed": true})).await["seq"], 1);
    }
    let mut clients = Vec::new();
    for hub in &hubs {
        for _ in 0..4 {
            let mut ws = hub.connect().await;
            for name in [channel, other] {
                assert_eq!(subscribe_with_snapshot(&mut ws, name).await["seq"], 1);
            }
            clients.push(ws);
        }
    }
    for hub in &hubs {
        wait_subscribers(hub, channel, 4).await;
        wait_subscribers(hub, other, 4).await;
    }

    // HTTP publishes, round robin over the replicas and the two channels: one fleet-wide sequence per
    // channel, whoever publishes.
    let mut expected: [Vec<Value>; 2] = Default::default();
    for n in 0..40u64 {
        let which = (n % 2) as usize;
        let name = [channel, other][which];
        let out = hubs[n as usize % 3]
            .publish(name, json!({"via": "http", "n": n}))
            .await;
        assert_eq!(out["seq"], n / 2 + 2, "{out}");
        assert_eq!(out["relayed"], true, "{out}");
        assert_eq!(
            out["delivered"], 3,
            "every replica listens to the channel: {out}"
        );
        expected[which]
            .push(json!({"channel": name, "seq": n / 2 + 2, "data": {"via": "http", "n": n}}));
    }
    for ws in &mut clients {
        let mut seen: [Vec<Value>; 2] = Default::default();
        for _ in 0..40 {
            let msg = ws.recv_type("message").await;
            let which = usize::from(msg["channel"] == other);
            seen[which]
                .push(json!({"channel": msg["channel"], "seq": msg["seq"], "data": msg["data"]}));
        }
        assert_eq!(
            seen, expected,
            "each channel in its own order, each message once"
        );
    }

    // Client publishes: one publisher per replica, 20 frames each sent back to back, all three at once.
    let mut publishers = Vec::new();
    for hub in &hubs {
        publishers.push(hub.connect().await);
    }
    let runs = publishers.iter_mut().enumerate().map(|(via, ws)| async move {
        for n in 0..20 {
            ws.send(json!({"op": "publish", "channel": channel, "data": {"via": via, "n": n}, "id": n}))
                .await;
        }
        let mut seqs = Vec::new();
        for n in 0..20 {
            let ack = ws.recv_type("published").await;
            assert_eq!(ack["id"], n, "acks come in request order: {ack}");
            seqs.push(ack["seq"].as_u64().expect("a relayed publish has a seq"));
        }
        seqs
    });
    let acked: Vec<Vec<u64>> = futures_util::future::join_all(runs).await;
    for seqs in &acked {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "one publisher's seqs increase: {seqs:?}"
        );
    }
    let mut all: Vec<u64> = acked.concat();
    all.sort_unstable();
    assert_eq!(
        all,
        (22..82).collect::<Vec<_>>(),
        "one gapless sequence for the channel"
    );

    // Every client sees the same 60 messages in seq order, each publisher's numbering in order.
    let mut reference: Option<Vec<Value>> = None;
    for ws in &mut clients {
        let mut seen = Vec::new();
        let mut last_seq = 21;
        let mut next_n = [0usize; 3];
        for _ in 0..60 {
            let msg = ws.recv_type("message").await;
            let seq = msg["seq"].as_u64().expect("seq");
            assert!(seq > last_seq, "seq {seq} after {last_seq}");
            last_seq = seq;
            let via = msg["data"]["via"].as_u64().expect("via") as usize;
            assert_eq!(
                msg["data"]["n"], next_n[via],
                "publisher {via} out of order: {msg}"
            );
            assert_eq!(
                acked[via][next_n[via]], seq,
                "the seq its publisher was told: {msg}"
            );
            next_n[via] += 1;
            seen.push(msg);
        }
        match &reference {
            None => reference = Some(seen),
            Some(first) => assert_eq!(first, &seen, "every client sees one order"),
        }
    }

    // Exactly once: a message published last is the very next frame everywhere (no duplicate queued before it).
    hubs[2].publish(channel, json!("end")).await;
    for ws in &mut clients {
        assert_eq!(ws.recv_type("message").await["data"], "end");
    }
}

/// Subscribes on `hubs[0]` while `hubs[1]` publishes the channel's first value, at once; returns the client
/// and the first frame after `subscribed`, which must carry that value (as the snapshot when it was published
/// before the subscription was live, as a message after: never nothing).
async fn race_subscribe_and_publish(hubs: &[TestHub], channel: &str, i: u64) -> (Ws, Value) {
    let mut ws = hubs[0].connect().await;
    let subscribe = ws.send(json!({"op": "subscribe", "channel": channel}));
    let publish = hubs[1].publish(channel, json!({"n": i}));
    let ((), out) = tokio::join!(subscribe, publish);
    assert_eq!(out["seq"], 1);
    ws.recv_type("subscribed").await;
    let first = ws.recv().await;
    assert!(
        first["type"] == "snapshot" || first["type"] == "message",
        "{first}"
    );
    assert_eq!(
        (&first["data"], &first["seq"]),
        (&json!({"n": i}), &json!(1)),
        "{first}"
    );
    (ws, first)
}

#[actix_web::test]
async fn a_publish_racing_a_subscribe_is_never_lost() {
    let redis = RedisServer::start();
    let hubs = fleet(&redis, 2, "", "").await;
    for i in 0..25 {
        let (ws, _) = race_subscribe_and_publish(&hubs, &format!("prices:race{i}"), i).await;
        ws.close().await;
    }
}

#[actix_web::test]
async fn a_publish_racing_a_subscribe_is_not_delivered_twice() {
    let redis = RedisServer::start();
    let hubs = fleet(&redis, 2, "", "").await;
    for i in 0..25 {
        let channel = format!("prices:twice{i}");
        let (mut ws, first) = race_subscribe_and_publish(&hubs, &channel, i).await;
        hubs[1].publish(&channel, json!("next")).await;
        let next = ws.recv().await;
        assert_eq!(
            (&next["type"], &next["seq"]),
            (&json!("message"), &json!(2)),
            "seq 1 came as `{}`, then this arrived: {next}",
            first["type"]
        );
        ws.close().await;
    }
}

#[actix_web::test]
async fn outside_producers_publish_and_set_directly() {
    let server = RedisServer::start();
    let hubs = fleet(&server, 2, "", "").await;
    let mut conn = server.client().await;
    let set = |key: &str, value: &str| redis::cmd("SET").arg(key).arg(value).clone();
    let publish =
        |channel: &str, payload: &[u8]| redis::cmd("PUBLISH").arg(channel).arg(payload).clone();

    // A value SET by the producer is the snapshot: no seq, no ts.
    set("relayhub:cache:prices:BTC", r#"{"p":0}"#)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let mut clients = Vec::new();
    for hub in &hubs {
        let mut ws = hub.connect().await;
        let snapshot = subscribe_with_snapshot(&mut ws, "prices:BTC").await;
        assert_eq!(
            snapshot,
            json!({"type": "snapshot", "channel": "prices:BTC", "data": {"p": 0}})
        );
        clients.push(ws);
    }
    for hub in &hubs {
        wait_subscribers(hub, "prices:BTC", 1).await;
    }

    let receivers: i64 = publish("relayhub:ch:prices:BTC", br#"{"p":1}"#)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(receivers, 2, "both replicas listen");
    for ws in &mut clients {
        let msg = ws.recv_type("message").await;
        assert_eq!(
            msg,
            json!({"type": "message", "channel": "prices:BTC", "data": {"p": 1}})
        );
    }

    // Garbage is dropped and counted, never delivered, never fatal.
    for bad in [&b"not json"[..], b"{\"p\":", b"\x1egarbage", b"\xff\xfe"] {
        let _: i64 = publish("relayhub:ch:prices:BTC", bad)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    for hub in &hubs {
        eventually(
            Duration::from_secs(10),
            "4 rejected messages counted",
            || async { stat(hub, "rejected_messages").await.as_u64() >= Some(4) },
        )
        .await;
    }
    let _: i64 = publish("relayhub:ch:prices:BTC", br#"{"p":2}"#)
        .query_async(&mut conn)
        .await
        .unwrap();
    for (ws, hub) in clients.iter_mut().zip(&hubs) {
        assert_eq!(ws.recv_type("message").await["data"], json!({"p": 2}));
        assert_eq!(stat(hub, "pubsub_active").await, true);
        assert_eq!(get_json(&hub.http("/ready")).await.0, 200);
    }

    // SET with and without a TTL: served on subscribe and by the REST view, without seq or ts.
    set("relayhub:cache:prices:ETH", r#"{"p":2}"#)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    set("relayhub:cache:prices:SOL", r#"{"p":3}"#)
        .arg("EX")
        .arg(60)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    for hub in &hubs {
        for (channel, data) in [
            ("prices:ETH", json!({"p": 2})),
            ("prices:SOL", json!({"p": 3})),
        ] {
            let (status, body) = get_json(&hub.http(&format!("/api/channels/{channel}"))).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(
                body,
                json!({"channel": channel, "data": data, "seq": null, "ts": null})
            );
            let mut ws = hub.connect().await;
            let snapshot = subscribe_with_snapshot(&mut ws, channel).await;
            assert_eq!(
                snapshot,
                json!({"type": "snapshot", "channel": channel, "data": data})
            );
        }
    }
}

#[actix_web::test]
async fn history_and_cache_live_in_redis_with_their_ttl() {
    let redis = RedisServer::start();
    let hubs = fleet(
        &redis,
        2,
        "",
        "[namespaces.short]\nttl = \"90s\"\nhistory_size = 2\n",
    )
    .await;
    for n in 1..=5 {
        hubs[0].publish("prices:HIST", json!({"n": n})).await;
    }
    for hub in &hubs {
        for (limit, count) in [
            (Some(1), 1),
            (Some(2), 2),
            (Some(3), 3),
            (Some(5), 3),
            (Some(100), 3),
            (None, 3),
        ] {
            let query = limit.map(|l| format!("?limit={l}")).unwrap_or_default();
            let (status, body) =
                get_json(&hub.http(&format!("/api/channels/prices:HIST/history{query}"))).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["channel"], "prices:HIST");
            let items = body["items"].as_array().expect("items");
            assert_eq!(items.len(), count, "limit {limit:?}: {body}");
            for (k, item) in items.iter().enumerate() {
                let n = 5 - k as u64;
                assert_eq!(
                    (&item["data"], &item["seq"]),
                    (&json!({"n": n}), &json!(n)),
                    "newest first: {body}"
                );
                let ts = item["ts"].as_str().expect("ts");
                assert!(chrono::DateTime::parse_from_rfc3339(ts).is_ok(), "{ts}");
                assert_eq!(
                    item.as_object().unwrap().len(),
                    3,
                    "only data, seq, ts: {item}"
                );
            }
        }
        let (status, latest) = get_json(&hub.http("/api/channels/prices:HIST")).await;
        assert_eq!(status, 200);
        assert_eq!(
            (&latest["data"], &latest["seq"]),
            (&json!({"n": 5}), &json!(5)),
            "{latest}"
        );
    }
    let mut ws = hubs[1].connect().await;
    assert_eq!(
        subscribe_with_snapshot(&mut ws, "prices:HIST").await["seq"],
        5
    );

    // The keys: latest value and snapshots with the channel's TTL (default 24h), three snapshots, the counter.
    let day = 24 * 3600;
    let ttl = redis_int(&redis, &["TTL", "relayhub:cache:prices:HIST"]);
    assert!(ttl > day - 120 && ttl <= day, "cache TTL {ttl}");
    let ttl = redis_int(&redis, &["TTL", "relayhub:snap:prices:HIST"]);
    assert!(ttl > day - 120 && ttl <= day, "snapshot TTL {ttl}");
    assert_eq!(redis_int(&redis, &["LLEN", "relayhub:snap:prices:HIST"]), 3);
    let ttl = redis_int(&redis, &["TTL", "relayhub:seq:prices:HIST"]);
    assert!(
        ttl > day - 120 && ttl <= day,
        "the counter lives as long as the channel's values: TTL {ttl}"
    );
    assert!(
        redis
            .cmd(&["GET", "relayhub:seq:prices:HIST"])
            .unwrap()
            .contains("\r\n5\r\n")
    );

    // A namespace's own ttl and history_size.
    for n in 1..=4 {
        hubs[1].publish("short:x", json!(n)).await;
    }
    for key in ["relayhub:cache:short:x", "relayhub:snap:short:x"] {
        let ttl = redis_int(&redis, &["TTL", key]);
        assert!(ttl > 0 && ttl <= 90, "{key} TTL {ttl}");
    }
    assert_eq!(redis_int(&redis, &["LLEN", "relayhub:snap:short:x"]), 2);
    let (_, body) = get_json(&hubs[0].http("/api/channels/short:x/history?limit=10")).await;
    let seqs: Vec<&Value> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| &i["seq"])
        .collect();
    assert_eq!(seqs, [&json!(4), &json!(3)], "{body}");
}

#[actix_web::test]
async fn redis_outage_keeps_clients_and_local_delivery_then_recovers() {
    let panics = count_panics();
    let mut redis = RedisServer::start();
    let hubs = fleet(&redis, 2, "", "").await;
    let (a, b) = (&hubs[0], &hubs[1]);
    let channel = "prices:OUT";
    a.publish(channel, json!("seed")).await;
    a.publish("chat:OUT", json!("seed")).await;
    let mut on_a = a.connect().await;
    subscribe_with_snapshot(&mut on_a, channel).await;
    let mut on_b = b.connect().await;
    subscribe_with_snapshot(&mut on_b, channel).await;
    let mut chat_reader = a.connect().await;
    subscribe_with_snapshot(&mut chat_reader, "chat:OUT").await;
    let mut chat_writer = a.connect().await;
    wait_subscribers(a, channel, 1).await;
    wait_subscribers(b, channel, 1).await;

    redis.kill();
    for hub in &hubs {
        eventually(
            Duration::from_secs(20),
            "the bridge notices the outage and the probe finds Redis gone",
            || async {
                let stats = hub.stats().await;
                stats["pubsub_active"] == false && stats["redis"]["commands"] == "unreachable"
            },
        )
        .await;
        // Every replica is alike: taking one out of the balancer would help nobody, so it stays ready and
        // says what is wrong.
        let (status, body) = get_json(&hub.http("/ready")).await;
        assert_eq!(
            (status, &body["degraded"]),
            (200, &json!("redis unreachable")),
            "{body}"
        );
        let (status, body) = get_json(&hub.http("/health")).await;
        assert_eq!(status, 200);
        assert_eq!(
            body["redis"],
            json!({"pubsub": "down", "commands": "unreachable"}),
            "{body}"
        );
        let metrics = common::request("GET", &hub.http("/metrics"), &[], None)
            .await
            .text();
        for line in [
            "relayhub_redis_up 0",
            "relayhub_degraded 1",
            "relayhub_up 1",
        ] {
            assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
        }
    }

    // Local delivery goes on: no seq (Redis assigns them), and the response says it was not relayed.
    let out = a.publish(channel, json!({"during": 1})).await;
    assert_eq!(
        (&out["relayed"], &out["seq"]),
        (&json!(false), &Value::Null),
        "{out}"
    );
    let msg = on_a.recv_type("message").await;
    assert_eq!(msg["data"], json!({"during": 1}));
    assert!(msg.get("seq").is_none(), "{msg}");
    chat_writer
        .send(json!({"op": "publish", "channel": "chat:OUT", "data": {"during": 2}, "id": 1}))
        .await;
    let ack = chat_writer.recv_type("published").await;
    assert!(ack.get("seq").is_none(), "{ack}");
    assert_eq!(
        chat_reader.recv_type("message").await["data"],
        json!({"during": 2})
    );
    on_b.ping().await;
    on_a.ping().await;

    redis.restart();
    for hub in &hubs {
        wait_ready(hub).await;
        let stats = hub.stats().await;
        assert!(stats["redis_reconnects"].as_u64() >= Some(1), "{stats}");
        assert_eq!(stats["pubsub_active"], true, "{stats}");
    }
    // The same connections receive across replicas again; B's client never saw A's local-only message.
    let out = a.publish(channel, json!({"after": 1})).await;
    assert_eq!(out["relayed"], true, "{out}");
    let seq = out["seq"].clone();
    for ws in [&mut on_a, &mut on_b] {
        let msg = ws.recv_type("message").await;
        assert_eq!(
            (&msg["data"], &msg["seq"]),
            (&json!({"after": 1}), &seq),
            "{msg}"
        );
    }
    b.publish(channel, json!({"after": 2})).await;
    for ws in [&mut on_a, &mut on_b] {
        assert_eq!(
            ws.recv_type("message").await["data"],
            json!({"after": 2}),
            "exactly once"
        );
    }
    assert_no_panic_since(panics);
}

#[actix_web::test]
async fn without_redis_at_start_optional_means_memory_mode() {
    let url = format!("redis://127.0.0.1:{}", common::free_port());
    let hub = TestHub::start(&format!("[redis]\nurl = \"{url}\"\nrequired = false\n")).await;
    let stats = hub.stats().await;
    assert_eq!(stats["mode"], "memory", "{stats}");
    let (status, body) = get_json(&hub.http("/ready")).await;
    assert_eq!((status, &body["mode"]), (200, &json!("memory")), "{body}");
    let mut ws = hub.connect().await;
    ws.subscribe("prices:MEM").await;
    let out = hub.publish("prices:MEM", json!(1)).await;
    assert_eq!((&out["seq"], &out["relayed"]), (&json!(1), &json!(true)));
    assert_eq!(ws.recv_type("message").await["seq"], 1);
}

#[actix_web::test]
async fn without_redis_at_start_required_refuses_to_start() {
    common::init_logging();
    let url = format!("redis://127.0.0.1:{}", common::free_port());
    let config = common::test_config(&format!("[redis]\nurl = \"{url}\"\nrequired = true\n"));
    match relayhub::start(config).await {
        Ok(_) => panic!("started without the required Redis"),
        Err(e) => {
            assert!(matches!(e, relayhub::StartError::RedisRequired(_)), "{e:?}");
            assert_eq!(e.exit_code(), 3);
            assert!(e.to_string().contains("redis.required"), "{e}");
        }
    }
}

/// Calls per command (as `INFO commandstats` counts them, script-internal commands included) since the last
/// `CONFIG RESETSTAT`, without this test's own administrative commands.
fn command_calls(redis: &RedisServer) -> BTreeMap<String, u64> {
    let info = redis.cmd(&["INFO", "commandstats"]).expect("INFO");
    let mut calls = BTreeMap::new();
    for line in info.lines() {
        let Some((name, fields)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        if ["config", "info", "client", "hello", "command"]
            .iter()
            .any(|admin| name.starts_with(admin))
        {
            continue;
        }
        let n = fields
            .split(',')
            .find_map(|f| f.strip_prefix("calls="))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no calls in {line}"));
        calls.insert(name.to_string(), n);
    }
    calls
}

/// Publishes `k` messages through `hub`, waits until every client has them, and returns the Redis calls made.
async fn redis_calls_for(
    redis: &RedisServer,
    hub: &TestHub,
    channel: &str,
    k: u64,
    clients: &mut [Ws],
) -> BTreeMap<String, u64> {
    redis
        .cmd(&["CONFIG", "RESETSTAT"])
        .expect("CONFIG RESETSTAT");
    for n in 0..k {
        hub.publish(channel, json!({"n": n})).await;
    }
    for ws in clients.iter_mut() {
        for n in 0..k {
            assert_eq!(ws.recv_type("message").await["data"]["n"], n);
        }
    }
    command_calls(redis)
}

#[actix_web::test]
async fn redis_work_per_publish_does_not_grow_with_subscribers() {
    const K: u64 = 20;
    let redis = RedisServer::start();
    // No probes and no job scans during the test: periodic Redis work of the bridge and the poller, not of a
    // publish.
    let hubs = fleet(
        &redis,
        3,
        "probe_interval = \"1h\"\n",
        "[poller]\nlease = \"1h\"\n",
    )
    .await;
    let channel = "prices:LOAD";
    // Loads the script too, so no SCRIPT LOAD lands in a measurement.
    hubs[0].publish(channel, json!("seed")).await;

    let mut clients = vec![hubs[0].connect().await];
    subscribe_with_snapshot(&mut clients[0], channel).await;
    wait_subscribers(&hubs[0], channel, 1).await;
    let one = redis_calls_for(&redis, &hubs[0], channel, K, &mut clients).await;

    let mut per_hub = [1, 0, 0];
    for i in 1..200 {
        let mut ws = hubs[i % 3].connect().await;
        subscribe_with_snapshot(&mut ws, channel).await;
        per_hub[i % 3] += 1;
        clients.push(ws);
    }
    for (hub, count) in hubs.iter().zip(per_hub) {
        wait_subscribers(hub, channel, count).await;
    }
    let many = redis_calls_for(&redis, &hubs[0], channel, K, &mut clients).await;

    let scripted = one.get("evalsha").or(one.get("eval")).copied().unwrap_or(0);
    assert_eq!(scripted, K, "one script run per publish: {one:?}");
    assert_eq!(one.get("publish"), Some(&K), "{one:?}");
    assert_eq!(
        one, many,
        "Redis calls for {K} publishes with 1 subscriber, then with 200"
    );
}

#[actix_web::test]
async fn killed_pubsub_connections_are_reopened_and_delivery_resumes() {
    let redis = RedisServer::start();
    let hubs = fleet(&redis, 2, "", "").await;
    let channel = "prices:KILL";
    hubs[0].publish(channel, json!("seed")).await;
    let mut clients = Vec::new();
    for hub in &hubs {
        let mut ws = hub.connect().await;
        subscribe_with_snapshot(&mut ws, channel).await;
        clients.push(ws);
        wait_subscribers(hub, channel, 1).await;
    }
    let killed = redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
    assert_eq!(int_reply(&killed), 2, "one pub/sub connection per replica");
    for hub in &hubs {
        eventually(Duration::from_secs(20), "the bridge reconnects", || async {
            let stats = hub.stats().await;
            stats["redis_reconnects"].as_u64() >= Some(1) && stats["pubsub_active"] == true
        })
        .await;
        wait_ready(hub).await;
    }
    for (n, hub) in hubs.iter().enumerate() {
        hub.publish(channel, json!({"after": n})).await;
        for ws in &mut clients {
            assert_eq!(
                ws.recv_type("message").await["data"],
                json!({"after": n}),
                "exactly once"
            );
        }
    }
}

/// A TCP proxy in front of Redis that can make the pub/sub connections through it deaf: open, but nothing
/// from Redis gets through (what a half-dead network path looks like). Command connections are untouched.
struct DeafProxy {
    port: u16,
    state: Arc<ProxyState>,
}

#[derive(Default)]
struct ProxyState {
    /// The `frozen` flag of every connection that has sent a SUBSCRIBE; the connection's task holds a clone.
    pubsub: Mutex<Vec<Arc<AtomicBool>>>,
    /// Pub/sub connections made from now on start frozen.
    freeze_new: AtomicBool,
}

impl DeafProxy {
    async fn start(redis_port: u16) -> DeafProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let state = Arc::new(ProxyState::default());
        let accept_state = state.clone();
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let Ok(up) = TcpStream::connect(("127.0.0.1", redis_port)).await else {
                    continue;
                };
                tokio::spawn(proxy_connection(down, up, accept_state.clone()));
            }
        });
        DeafProxy { port, state }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn pubsub(&self) -> std::sync::MutexGuard<'_, Vec<Arc<AtomicBool>>> {
        self.state.pubsub.lock().expect("proxy state")
    }

    /// Makes every open pub/sub connection deaf.
    fn deafen_open_pubsub(&self) {
        for frozen in self.pubsub().iter() {
            frozen.store(true, Ordering::SeqCst);
        }
    }

    fn deafen_new_pubsub(&self, on: bool) {
        self.state.freeze_new.store(on, Ordering::SeqCst);
    }

    /// Lets everything through again, including what was held back.
    fn heal(&self) {
        self.deafen_new_pubsub(false);
        for frozen in self.pubsub().iter() {
            frozen.store(false, Ordering::SeqCst);
        }
    }

    /// Pub/sub connections still open through the proxy (their task holds the other clone of the flag).
    fn open_pubsub(&self) -> usize {
        self.pubsub()
            .iter()
            .filter(|f| Arc::strong_count(f) > 1)
            .count()
    }

    fn deaf_pubsub(&self) -> usize {
        self.pubsub()
            .iter()
            .filter(|f| Arc::strong_count(f) > 1 && f.load(Ordering::SeqCst))
            .count()
    }
}

async fn proxy_connection(down: TcpStream, up: TcpStream, state: Arc<ProxyState>) {
    let frozen = Arc::new(AtomicBool::new(false));
    let (mut down_read, mut down_write) = down.into_split();
    let (mut up_read, mut up_write) = up.into_split();
    let to_redis = async {
        let mut buf = vec![0u8; 16 * 1024];
        let mut registered = false;
        loop {
            let n = match down_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if !registered
                && buf[..n]
                    .windows(9)
                    .any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE"))
            {
                registered = true;
                frozen.store(state.freeze_new.load(Ordering::SeqCst), Ordering::SeqCst);
                state
                    .pubsub
                    .lock()
                    .expect("proxy state")
                    .push(frozen.clone());
            }
            if up_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let to_client = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match up_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            while frozen.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if down_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    // Either side closing ends both: the client closing a deaf connection closes it at Redis too.
    tokio::select! {
        _ = to_redis => {}
        _ = to_client => {}
    }
}

/// Splits complete RESP commands (arrays of bulk strings) off the front of `buf`; returns each one's name.
fn take_commands(buf: &mut Vec<u8>) -> Vec<String> {
    fn line(b: &[u8], at: usize) -> Option<(&str, usize)> {
        let end = b.get(at..)?.windows(2).position(|w| w == b"\r\n")? + at;
        Some((std::str::from_utf8(&b[at + 1..end]).ok()?, end + 2))
    }
    let mut names = Vec::new();
    loop {
        let parsed = (|| {
            let (count, mut at) = line(buf, 0)?;
            let mut name = String::new();
            for i in 0..count.parse::<usize>().ok()? {
                let (len, start) = line(buf, at)?;
                let end = start + len.parse::<usize>().ok()?;
                if buf.len() < end + 2 {
                    return None;
                }
                if i == 0 {
                    name = String::from_utf8_lossy(&buf[start..end]).to_ascii_uppercase();
                }
                at = end + 2;
            }
            Some((name, at))
        })();
        let Some((name, used)) = parsed else {
            return names;
        };
        buf.drain(..used);
        names.push(name);
    }
}

#[actix_web::test]
async fn reconnect_attempts_back_off_up_to_three_seconds() {
    let mut redis = RedisServer::start();
    let hub = &fleet(&redis, 1, "", "").await[0];
    redis.kill();
    // On Redis's port, a stand-in that answers +OK to everything and hangs up on SUBSCRIBE: each attempt of
    // the bridge fails fast and is seen (command connections get nonsense answers and fail too).
    let listener = TcpListener::bind(("127.0.0.1", redis.port))
        .await
        .expect("Redis's port is free again");
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let stand_in = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let seen_tx = seen_tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while let Ok(n @ 1..) = socket.read(&mut chunk).await {
                    buf.extend_from_slice(&chunk[..n]);
                    for name in take_commands(&mut buf) {
                        if name == "SUBSCRIBE" {
                            let _ = seen_tx.send(tokio::time::Instant::now());
                            return;
                        }
                        if socket.write_all(b"+OK\r\n").await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    let mut attempts = Vec::new();
    while attempts.len() < 8 {
        let attempt = tokio::time::timeout(Duration::from_secs(20), seen.recv()).await;
        attempts.push(
            attempt
                .expect("the bridge keeps trying")
                .expect("stand-in running"),
        );
    }
    stand_in.abort();
    let _ = stand_in.await;
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    // Doubling from 100 ms, capped at 3 s (jitter: half to all of it); 1.5 s of slack for a loaded machine.
    assert!(
        gaps.iter().all(|g| *g <= Duration::from_millis(4500)),
        "gaps between attempts: {gaps:?}"
    );
    assert!(gaps[0] < gaps[gaps.len() - 1], "the pause grows: {gaps:?}");
    assert_eq!(stat(hub, "pubsub_active").await, false);
    redis.restart();
    wait_ready(hub).await;
}

fn redis_pubsub_clients(redis: &RedisServer) -> usize {
    redis
        .cmd(&["CLIENT", "LIST", "TYPE", "pubsub"])
        .expect("CLIENT LIST")
        .matches("id=")
        .count()
}

#[actix_web::test]
async fn ready_waits_for_the_pubsub_connection() {
    let redis = RedisServer::start();
    let proxy = DeafProxy::start(redis.port).await;
    proxy.deafen_new_pubsub(true);
    let hub = TestHub::start(&config(&proxy.url(), "", "")).await;
    eventually(
        Duration::from_secs(20),
        "the bridge's SUBSCRIBE is held back",
        || async { proxy.deaf_pubsub() >= 1 },
    )
    .await;
    // Commands work (the store answered PING at start), but the pub/sub connection is not live: not ready.
    let (status, body) = get_json(&hub.http("/ready")).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["reason"]
            .as_str()
            .is_some_and(|r| r.contains("pub/sub")),
        "{body}"
    );
    assert_eq!(hub.stats().await["pubsub_active"], false);

    assert!(
        body["reason"].as_str().unwrap().starts_with("starting"),
        "{body}"
    );

    proxy.heal();
    wait_ready(&hub).await;
    let mut ws = hub.connect().await;
    ws.subscribe("prices:READY").await;
    wait_subscribers(&hub, "prices:READY", 1).await;
    let out = hub.publish("prices:READY", json!(1)).await;
    assert_eq!(out["relayed"], true);
    let msg = ws.recv().await;
    assert_eq!(msg["data"], 1, "{msg}");
}

/// Two ready replicas on `redis`: A through a [`DeafProxy`] (probing its link every 200 ms), B directly.
async fn deaf_pair(redis: &RedisServer) -> (DeafProxy, TestHub, TestHub) {
    let proxy = DeafProxy::start(redis.port).await;
    let a = TestHub::start(&config(&proxy.url(), "probe_interval = \"200ms\"\n", "")).await;
    let b = TestHub::start(&config(&redis.url(), "", "")).await;
    wait_ready(&a).await;
    wait_ready(&b).await;
    (proxy, a, b)
}

#[actix_web::test]
async fn a_dead_link_while_redis_answers_takes_only_this_replica_out() {
    let redis = RedisServer::start();
    let (proxy, a, b) = deaf_pair(&redis).await;
    // A's pub/sub connection goes deaf and every replacement is held back; its commands still get through.
    proxy.deafen_new_pubsub(true);
    proxy.deafen_open_pubsub();
    eventually(
        Duration::from_secs(20),
        "A takes itself out: its own link is dead while Redis answers",
        || async {
            let (status, body) = get_json(&a.http("/ready")).await;
            status == 503
                && body["reason"] == "redis pub/sub link is down while redis answers commands"
        },
    )
    .await;
    let (_, health) = get_json(&a.http("/health")).await;
    assert_eq!(
        health["redis"],
        json!({"pubsub": "down", "commands": "answering"}),
        "{health}"
    );
    // B, on the same Redis, is untouched.
    let (status, body) = get_json(&b.http("/ready")).await;
    assert_eq!(
        (status, body),
        (
            200,
            json!({"status": "ready", "mode": "redis", "degraded": null})
        )
    );
    proxy.heal();
    wait_ready(&a).await;
}

#[actix_web::test]
async fn a_deaf_pubsub_connection_is_found_by_the_probe_and_replaced() {
    let redis = RedisServer::start();
    let (proxy, a, b) = deaf_pair(&redis).await;
    let channel = "prices:DEAF";
    b.publish(channel, json!("seed")).await;
    let mut on_a = a.connect().await;
    subscribe_with_snapshot(&mut on_a, channel).await;
    let mut on_b = b.connect().await;
    subscribe_with_snapshot(&mut on_b, channel).await;
    wait_subscribers(&a, channel, 1).await;
    wait_subscribers(&b, channel, 1).await;
    b.publish(channel, json!("before")).await;
    assert_eq!(on_a.recv_type("message").await["data"], "before");
    assert_eq!(on_b.recv_type("message").await["data"], "before");
    assert_eq!(proxy.open_pubsub(), 1);

    proxy.deafen_open_pubsub();
    // Published while A is deaf (its probe needs three intervals to notice): B's client gets both at once.
    b.publish(channel, json!("missed-1")).await;
    b.publish(channel, json!("missed-2")).await;
    assert_eq!(on_b.recv_type("message").await["data"], "missed-1");
    assert_eq!(on_b.recv_type("message").await["data"], "missed-2");
    eventually(
        Duration::from_secs(20),
        "A's bridge replaces its deaf connection",
        || async {
            let stats = a.stats().await;
            stats["redis_reconnects"].as_u64() >= Some(1) && stats["pubsub_active"] == true
        },
    )
    .await;
    wait_ready(&a).await;
    // After the reconnect A catches up with the latest value its client missed (once, in order).
    let mut caught = Vec::new();
    while caught.last().map(String::as_str) != Some("missed-2") {
        let frame = on_a.recv_type("message").await;
        caught.push(frame["data"].as_str().unwrap().to_string());
    }
    assert!(
        caught == ["missed-2"] || caught == ["missed-1", "missed-2"],
        "{caught:?}"
    );
    for (n, hub) in [&b, &a].into_iter().enumerate() {
        hub.publish(channel, json!({"after": n})).await;
        for ws in [&mut on_a, &mut on_b] {
            assert_eq!(
                ws.recv_type("message").await["data"],
                json!({"after": n}),
                "exactly once"
            );
        }
    }
    // The deaf connection is closed, not kept open beside its replacement.
    eventually(
        Duration::from_secs(20),
        "the deaf connection is closed",
        || async { proxy.open_pubsub() == 1 },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "Redis has one pub/sub client per replica",
        || async { redis_pubsub_clients(&redis) == 2 },
    )
    .await;
}

#[actix_web::test]
async fn publishing_through_a_reconnect_delivers_each_message_once() {
    let mut redis = RedisServer::start();
    let hubs = fleet(&redis, 1, "", "").await;
    let hub = &hubs[0];
    let channel = "prices:RECON";
    hub.publish(channel, json!("seed")).await;
    let mut ws = hub.connect().await;
    subscribe_with_snapshot(&mut ws, channel).await;
    for round in 0..4 {
        redis.kill();
        eventually(
            Duration::from_secs(20),
            "the bridge notices the outage",
            || async { stat(hub, "pubsub_active").await == false },
        )
        .await;
        redis.restart();
        // Publish back to back while the bridge reconnects, and on for a while after.
        let mut sent = 0;
        let mut after = 0;
        while after < 30 {
            hub.publish(channel, json!({"round": round, "n": sent}))
                .await;
            sent += 1;
            if stat(hub, "pubsub_active").await == true {
                after += 1;
            }
        }
        for n in 0..sent {
            let msg = ws.recv_type("message").await;
            assert_eq!(
                msg["data"],
                json!({"round": round, "n": n}),
                "round {round}: {msg}"
            );
        }
    }
}
