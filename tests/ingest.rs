//! `[[ingest]]` routes taken into the sequenced path by exactly one replica, against two hub processes and a
//! real `redis-server`: an outside producer SETs its own key and PUBLISHes on the route's source channel, and
//! subscribers on both hubs get every message once, with `seq`; a client that comes back with `since`
//! recovers what it missed; when the route's lease holder dies, the other replica takes the route over.

mod common;

use std::time::Duration;

use serde_json::{Value, json};

use common::process::{ConfigFile, Process, start_binary};
use common::{RedisServer, Ws, eventually, get_json};

const LEASE_KEY: &str = "relayhub:ingestlease:ext:updates";

fn config(redis: &RedisServer, id: &str) -> ConfigFile {
    ConfigFile::new(&format!(
        r#"
[server]
instance_id = "{id}"

[demo]
enabled = false

[redis]
url = "{}"
required = true
ingest_lease = "600ms"

[channels]
history_size = 100

[[ingest]]
redis_channel = "ext:updates"
channel = "quotes:{{symbol}}"
cache = true
"#,
        redis.url()
    ))
}

async fn ready(base: &str) {
    eventually(Duration::from_secs(20), "the hub is ready", || async {
        get_json(&format!("http://{base}/ready")).await.0 == 200
    })
    .await;
}

/// The outside producer: its own latest value, then the update on the route's source channel.
fn produce(redis: &RedisServer, from: u64, to: u64) {
    for i in from..=to {
        let payload = json!({"symbol": "BTC", "i": i}).to_string();
        redis.cmd(&["SET", "ext:last:BTC", &payload]).unwrap();
        redis.cmd(&["PUBLISH", "ext:updates", &payload]).unwrap();
    }
}

async fn subscribe(base: &str, since: Option<Value>) -> (Ws, Value) {
    let mut ws = Ws::connect(&format!("ws://{base}/ws")).await;
    let mut frame = json!({"op": "subscribe", "channel": "quotes:BTC", "id": 1});
    if let Some(since) = since {
        frame["since"] = since;
    }
    ws.send(frame).await;
    let ack = ws.recv_type("subscribed").await;
    (ws, ack)
}

/// The next messages are `i` = `from..=to` with seq = i (the channel's numbering starts with the first
/// ingested message), each once, then nothing else.
async fn expect(ws: &mut Ws, from: u64, to: u64, who: &str) {
    for i in from..=to {
        let m = ws.recv().await;
        assert_eq!(m["type"], "message", "{who}: {m}");
        assert_eq!(
            (&m["data"]["i"], &m["seq"]),
            (&json!(i), &json!(i)),
            "{who}: {m}"
        );
    }
    ws.send(json!({"op": "ping", "id": "p"})).await;
    let next = ws.recv().await;
    assert_eq!(
        next["type"], "pong",
        "{who}: nothing else was queued: {next}"
    );
}

/// The lease's holder (the reply is raw RESP: `$5\r\nhub-a`, or `$-1` when nobody holds it).
fn holder(redis: &RedisServer) -> String {
    let reply = redis.cmd(&["GET", LEASE_KEY]).unwrap();
    reply.lines().last().unwrap_or("").trim().to_string()
}

#[actix_web::test]
async fn an_ingest_route_is_sequenced_once_recovered_and_taken_over_when_its_holder_dies() {
    let redis = RedisServer::start();
    let (config_a, config_b) = (config(&redis, "hub-a"), config(&redis, "hub-b"));
    let (a, base_a) = start_binary(&config_a).await;
    let (b, base_b) = start_binary(&config_b).await;
    ready(&base_a).await;
    ready(&base_b).await;
    // A replica that is ready has taken or found the route's lease: exactly one holds it.
    let first = holder(&redis);
    assert!(
        first == "hub-a" || first == "hub-b",
        "lease holder: {first:?}"
    );

    let (mut on_a, ack) = subscribe(&base_a, None).await;
    let (mut on_b, _) = subscribe(&base_b, None).await;
    produce(&redis, 1, 10);
    expect(&mut on_a, 1, 10, "subscriber on a").await;
    expect(&mut on_b, 1, 10, "subscriber on b").await;
    let epoch = ack["epoch"].as_str().expect("an epoch").to_string();

    // Away for five messages, back on the other replica with `since`: exactly those, replayed.
    on_a.close().await;
    produce(&redis, 11, 15);
    expect(&mut on_b, 11, 15, "subscriber on b").await;
    let (mut back, ack) = subscribe(&base_b, Some(json!({"epoch": epoch, "seq": 10}))).await;
    assert_eq!(
        (&ack["recovered"], &ack["seq"]),
        (&json!(true), &json!(15)),
        "{ack}"
    );
    expect(&mut back, 11, 15, "recovering subscriber").await;
    // The cached value and history are the sequenced ones.
    let (_, latest) = get_json(&format!("http://{base_a}/api/channels/quotes:BTC")).await;
    assert_eq!(
        (&latest["data"]["i"], &latest["seq"]),
        (&json!(15), &json!(15))
    );

    // The holder dies without a word (SIGKILL): the survivor takes the route over once the lease runs out.
    let (mut survivor_process, survivor_base, survivor_id, dead): (Process, String, &str, Process) =
        if first == "hub-a" {
            (b, base_b.clone(), "hub-b", a)
        } else {
            (a, base_a.clone(), "hub-a", b)
        };
    let (mut on_survivor, _) =
        subscribe(&survivor_base, Some(json!({"epoch": epoch, "seq": 15}))).await;
    drop(dead);
    eventually(
        Duration::from_secs(10),
        "the survivor holds the lease",
        || async { holder(&redis) == survivor_id },
    )
    .await;
    produce(&redis, 16, 20);
    expect(&mut on_survivor, 16, 20, "subscriber on the survivor").await;
    let (_, stats) = get_json(&format!("http://{survivor_base}/api/stats")).await;
    assert_eq!(stats["ingest_cache_dropped"], 0, "{stats}");
    survivor_process.stop_gracefully();
}

#[actix_web::test]
async fn a_holder_that_shuts_down_hands_its_ingest_route_back() {
    let redis = RedisServer::start();
    let (config_a, config_b) = (config(&redis, "hub-a"), config(&redis, "hub-b"));
    let (a, base_a) = start_binary(&config_a).await;
    ready(&base_a).await;
    // Started first, hub-a holds the route; hub-b waits for it.
    let (b, base_b) = start_binary(&config_b).await;
    ready(&base_b).await;
    assert_eq!(holder(&redis), "hub-a");
    let (mut on_b, _) = subscribe(&base_b, None).await;
    produce(&redis, 1, 3);
    expect(&mut on_b, 1, 3, "subscriber on b").await;

    let mut a = a;
    a.stop_gracefully();
    // Handed back on the way out, not left to run out.
    assert_ne!(
        holder(&redis),
        "hub-a",
        "the stopped replica's lease is gone"
    );
    eventually(Duration::from_secs(10), "hub-b takes the route", || async {
        holder(&redis) == "hub-b"
    })
    .await;
    produce(&redis, 4, 6);
    expect(&mut on_b, 4, 6, "subscriber on b").await;
    drop(b);
}
