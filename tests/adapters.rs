//! Fitting existing producers unchanged, against a real Redis: a Redis-key source (a worker's counters) and an
//! ingest route (a stream job publishing every symbol to one Redis channel), across replicas.

mod common;

use std::time::Duration;

use deadpool_redis::redis;
use serde_json::{Value, json};

use common::{RedisServer, TestHub, eventually, get_json, post_json};

fn redis_config(redis: &RedisServer) -> String {
    format!("[redis]\nurl = \"{}\"\nrequired = true\n", redis.url())
}

async fn ready(hub: &TestHub) {
    eventually(Duration::from_secs(10), "replica ready", || async {
        get_json(&hub.http("/ready")).await.0 == 200
    })
    .await;
}

async fn fetches(hub: &TestHub) -> u64 {
    let (_, status) = get_json(&hub.http("/api/polling/status")).await;
    status["jobs"][0]["fetches"].as_u64().unwrap_or(0)
}

#[actix_web::test]
async fn a_redis_key_source_publishes_one_object_per_change() {
    let redis = RedisServer::start();
    let config = format!(
        r#"{}
[[sources]]
name = "queue-stats"
kind = "redis"
channel = "stats:queue"
interval = "100ms"
[sources.fields]
total_messages = "GET total_messages"
current_rps = "GET current_rps"
queue_depth = "LLEN pending_messages"
workers = "HGETALL workers"
"#,
        redis_config(&redis)
    );
    let hub = TestHub::start(&config).await;
    ready(&hub).await;
    let mut ws = hub.connect().await;
    ws.subscribe("stats:queue").await;
    ws.subscribe("barrier:x").await;
    let (status, started) = post_json(
        &hub.http("/api/polling/start"),
        &json!({"source": "queue-stats"}),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{started}");
    // Missing keys read as null; an absent list has length 0 and an absent hash no fields.
    let first = ws.recv_type("message").await;
    assert_eq!(
        first["data"],
        json!({"total_messages": null, "current_rps": null, "queue_depth": 0, "workers": {}})
    );

    // A worker updating its counters at its own pace, each step atomic.
    let mut conn = redis.client().await;
    let steps: [(i64, f64, usize); 3] = [(10, 2.5, 3), (25, 3.0, 1), (40, 0.5, 0)];
    for (total, rps, depth) in steps {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .set("total_messages", total)
            .set("current_rps", rps)
            .del("pending_messages")
            .hset("workers", "w1", "busy");
        for i in 0..depth {
            pipe.rpush("pending_messages", i);
        }
        let _: () = pipe.query_async(&mut conn).await.unwrap();
        let update = ws.recv_type("message").await;
        assert_eq!(
            update["data"],
            json!({"total_messages": total, "current_rps": rps, "queue_depth": depth, "workers": {"w1": "busy"}})
        );
    }

    // Nothing changes for several polls: nothing is published. The next frame is the barrier message.
    let polled = fetches(&hub).await;
    eventually(Duration::from_secs(10), "five more polls", || async {
        fetches(&hub).await >= polled + 5
    })
    .await;
    hub.publish("barrier:x", json!("after")).await;
    assert_eq!(ws.recv_type("message").await["channel"], "barrier:x");
}

#[actix_web::test]
async fn an_ingest_route_delivers_each_message_once_across_replicas() {
    let redis = RedisServer::start();
    let config = format!(
        r#"{}
[namespaces.prices]
patterns = true
history_size = 5

[[ingest]]
redis_channel = "crypto:updates"
channel = "prices:{{symbol}}"
cache = true
"#,
        redis_config(&redis)
    );
    let hubs = [TestHub::start(&config).await, TestHub::start(&config).await];
    for hub in &hubs {
        ready(hub).await;
    }
    let mut btc = hubs[0].connect().await;
    btc.subscribe("prices:BTC").await;
    btc.subscribe("barrier:x").await;
    let mut all = hubs[1].connect().await;
    all.subscribe("prices:*").await;
    let mut both = hubs[1].connect().await;
    both.subscribe("prices:*").await;
    both.subscribe("prices:BTC").await;

    let mut producer = redis.client().await;
    let messages = [
        r#"{"symbol":"BTC","price":64000.5}"#,
        r#"{"symbol":"ETH","price":3150.2}"#,
        "not json",
        r#"{"price":1}"#,
        r#"{"symbol":"bad symbol","price":1}"#,
        r#"{"symbol":"BTC","price":64001.0}"#,
    ];
    for m in messages {
        let _: i64 = redis::cmd("PUBLISH")
            .arg("crypto:updates")
            .arg(m)
            .query_async(&mut producer)
            .await
            .unwrap();
    }
    // Sequenced once fleet-wide (each replica receives every message; the route's lease holder publishes it):
    // the latest value, and one snapshot per message, not one per replica.
    eventually(Duration::from_secs(5), "ingested values cached", || async {
        get_json(&hubs[0].http("/api/channels/prices:BTC")).await.1["data"]["price"]
            == json!(64001.0)
    })
    .await;
    // A message published through relayhub on the other replica reaches pattern and exact subscribers too.
    hubs[1].publish("prices:BTC", json!({"price": 1.5})).await;
    hubs[0].publish("barrier:x", json!(1)).await;
    hubs[1].publish("prices:END", json!("end")).await;

    let data = |frame: &Value| {
        (
            frame["channel"].as_str().unwrap().to_string(),
            frame["data"]["price"].clone(),
        )
    };
    // Exact subscriber: only BTC, each once, then the barrier.
    assert_eq!(
        data(&btc.recv_type("message").await),
        ("prices:BTC".into(), json!(64000.5))
    );
    assert_eq!(
        data(&btc.recv_type("message").await),
        ("prices:BTC".into(), json!(64001.0))
    );
    assert_eq!(
        data(&btc.recv_type("message").await),
        ("prices:BTC".into(), json!(1.5))
    );
    assert_eq!(btc.recv_type("message").await["channel"], "barrier:x");
    // Pattern subscribers (one of them also subscribed to BTC exactly): BTC and ETH, each once, then END.
    for ws in [&mut all, &mut both] {
        let mut got = Vec::new();
        loop {
            let frame = ws.recv_type("message").await;
            if frame["channel"] == "prices:END" {
                break;
            }
            got.push(data(&frame));
        }
        assert_eq!(
            got,
            [
                ("prices:BTC".to_string(), json!(64000.5)),
                ("prices:ETH".to_string(), json!(3150.2)),
                ("prices:BTC".to_string(), json!(64001.0)),
                ("prices:BTC".to_string(), json!(1.5))
            ]
        );
    }
    // Bad messages were counted on each replica, never delivered.
    for hub in &hubs {
        let stats = hub.stats().await;
        assert!(stats["rejected_messages"].as_u64() >= Some(3), "{stats}");
    }
    let (_, history) = get_json(&hubs[1].http("/api/channels/prices:BTC/history?limit=5")).await;
    let prices: Vec<Value> = history["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["data"]["price"].clone())
        .collect();
    assert_eq!(prices, [json!(1.5), json!(64001.0), json!(64000.5)]);
    // A new subscriber gets the ingested value as its snapshot, numbered: routes are sequenced like any publish.
    let mut late = hubs[1].connect().await;
    late.subscribe("prices:ETH").await;
    let snapshot = late.recv_type("snapshot").await;
    assert_eq!(
        (
            snapshot["data"]["price"].clone(),
            snapshot.get("seq").cloned()
        ),
        (json!(3150.2), Some(json!(1)))
    );
}
