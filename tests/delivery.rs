//! Delivery guarantees against real hubs, a real `redis-server` and real WebSocket clients: a client that
//! resubscribes with `since` gets exactly what it missed, in order, or `recovered:false` and a snapshot; a
//! message never reaches a subscriber twice.

mod common;

use serde_json::{Value, json};

use common::upstream::{Mode, Upstream};
use common::{RedisServer, TestHub, Ws, wait_ready};

const CHANNELS: &str = "[channels]\nhistory_size = 100\n";

fn redis_config(redis: &RedisServer) -> String {
    format!(
        "[redis]\nurl = \"{}\"\nrequired = true\n{CHANNELS}",
        redis.url()
    )
}

/// Subscribes and returns the `subscribed` answer.
async fn subscribe(ws: &mut Ws, channel: &str, since: Option<Value>) -> Value {
    let mut frame = json!({"op": "subscribe", "channel": channel, "id": 1});
    if let Some(since) = since {
        frame["since"] = since;
    }
    ws.send(frame).await;
    ws.recv_type("subscribed").await
}

/// Publishes `n` messages numbered from `from`.
async fn publish_range(hub: &TestHub, channel: &str, from: u64, n: u64) {
    for i in from..from + n {
        hub.publish(channel, json!({"i": i})).await;
    }
}

/// Reads frames until `n` messages arrived; fails on a snapshot or on anything after them within a moment.
async fn expect_exactly(ws: &mut Ws, n: u64, first_seq: u64) {
    for k in 0..n {
        let frame = ws.recv().await;
        assert_eq!(frame["type"], "message", "{frame}");
        assert_eq!(frame["seq"], first_seq + k, "{frame}");
    }
    nothing_else(ws).await;
}

/// The next frame is the answer to a ping: nothing was queued before it.
async fn nothing_else(ws: &mut Ws) {
    ws.send(json!({"op": "ping", "id": "p"})).await;
    let next = ws.recv().await;
    assert_eq!(next["type"], "pong", "{next}");
}

/// A client saw up to seq 10, leaves, 50 are published, it comes back (to `back`) with `since`.
async fn recovers_fifty(first: &TestHub, back: &TestHub) {
    let mut ws = first.connect().await;
    let ack = subscribe(&mut ws, "feed:a", None).await;
    assert_eq!(ack["seq"], 0);
    let epoch = ack["epoch"]
        .as_str()
        .expect("subscribed has an epoch")
        .to_string();
    publish_range(first, "feed:a", 1, 10).await;
    expect_exactly(&mut ws, 10, 1).await;
    ws.close().await;
    publish_range(first, "feed:a", 11, 50).await;
    let mut ws = back.connect().await;
    let ack = subscribe(&mut ws, "feed:a", Some(json!({"epoch": epoch, "seq": 10}))).await;
    assert_eq!(ack["recovered"], true, "{ack}");
    assert_eq!(
        (ack["epoch"].as_str(), &ack["seq"]),
        (Some(epoch.as_str()), &json!(60))
    );
    expect_exactly(&mut ws, 50, 11).await;
    // Then live ones, exactly once.
    publish_range(first, "feed:a", 61, 1).await;
    expect_exactly(&mut ws, 1, 61).await;
    let stats = back.stats().await;
    assert_eq!(stats["subscribes_recovered"], 1);
    assert_eq!(stats["messages_replayed"], 50);
}

#[actix_web::test]
async fn memory_mode_recovers_every_missed_message_in_order() {
    let hub = TestHub::start(CHANNELS).await;
    recovers_fifty(&hub, &hub).await;
}

#[actix_web::test]
async fn a_client_recovers_on_another_replica() {
    let redis = RedisServer::start();
    let a = TestHub::start(&redis_config(&redis)).await;
    let b = TestHub::start(&redis_config(&redis)).await;
    wait_ready(&a).await;
    wait_ready(&b).await;
    recovers_fifty(&a, &b).await;
}

#[actix_web::test]
async fn more_missed_than_history_or_a_lost_redis_is_not_recovered() {
    let mut redis = RedisServer::start();
    let hub = TestHub::start(&redis_config(&redis)).await;
    wait_ready(&hub).await;
    let mut ws = hub.connect().await;
    let ack = subscribe(&mut ws, "feed:b", None).await;
    let epoch = ack["epoch"].as_str().unwrap().to_string();
    publish_range(&hub, "feed:b", 1, 150).await;
    ws.close().await;
    // 150 published, 100 kept: a client at 20 missed some that are gone. No partial replay.
    let mut ws = hub.connect().await;
    let ack = subscribe(&mut ws, "feed:b", Some(json!({"epoch": epoch, "seq": 20}))).await;
    assert_eq!(ack["recovered"], false, "{ack}");
    let snapshot = ws.recv().await;
    assert_eq!(
        (&snapshot["type"], &snapshot["seq"]),
        (&json!("snapshot"), &json!(150))
    );
    ws.close().await;
    // Redis restarted empty: numbering starts over under a new epoch.
    redis.restart();
    wait_ready(&hub).await;
    hub.publish("feed:b", json!({"after": 1})).await;
    let mut ws = hub.connect().await;
    let ack = subscribe(&mut ws, "feed:b", Some(json!({"epoch": epoch, "seq": 150}))).await;
    assert_eq!(ack["recovered"], false, "{ack}");
    assert_ne!(ack["epoch"], json!(epoch));
    let snapshot = ws.recv().await;
    assert_eq!(
        (&snapshot["type"], &snapshot["seq"]),
        (&json!("snapshot"), &json!(1))
    );
    assert_eq!(hub.stats().await["subscribes_unrecovered"], 2);
}

#[actix_web::test]
async fn an_auto_start_channel_gives_its_first_value_once() {
    let redis = RedisServer::start();
    let upstream = Upstream::start();
    upstream.set_mode(Mode::Ok(json!({"v": "first"})));
    let config = format!(
        "{}\n[[sources]]\nname = \"ticker\"\nurl = \"{}\"\nchannel = \"ticker:{{symbol}}\"\ninterval = \"1h\"\ntimeout = \"2s\"\nauto_start = true\n",
        redis_config(&redis),
        upstream.url("/ticker/{symbol}")
    );
    let hub = TestHub::start(&config).await;
    wait_ready(&hub).await;
    let mut ws = hub.connect().await;
    subscribe(&mut ws, "ticker:ONE", None).await;
    let snapshot = ws.recv().await;
    assert_eq!(
        (&snapshot["type"], &snapshot["seq"]),
        (&json!("snapshot"), &json!(1))
    );
    // Nothing else: a `message` with seq 1 here is the double.
    nothing_else(&mut ws).await;
}
