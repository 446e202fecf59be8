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

/// Reads `n` messages and checks that they are `{"i": 0..n}` with consecutive seqs: every one, once, in order.
async fn expect_sequence(ws: &mut Ws, n: u64, who: &str) {
    let mut last_seq = None;
    for i in 0..n {
        let frame = ws.recv().await;
        assert_eq!(frame["type"], "message", "{who}, message {i}: {frame}");
        assert_eq!(frame["data"], json!({"i": i}), "{who}: {frame}");
        let seq = frame["seq"].as_u64().expect("a seq");
        if let Some(last) = last_seq {
            assert_eq!(seq, last + 1, "{who}: {frame}");
        }
        last_seq = Some(seq);
    }
    nothing_else(ws).await;
}

#[actix_web::test]
async fn killed_pubsub_connections_lose_nothing_while_publishing_at_500_per_second() {
    const MESSAGES: u64 = 1_000;
    let redis = RedisServer::start();
    let config = format!(
        "[redis]\nurl = \"{}\"\nrequired = true\n[channels]\nhistory_size = 2000\n",
        redis.url()
    );
    let hubs = [TestHub::start(&config).await, TestHub::start(&config).await];
    for hub in &hubs {
        wait_ready(hub).await;
    }
    let channel = "feed:kill";
    let mut clients = Vec::new();
    for hub in &hubs {
        for _ in 0..2 {
            let mut ws = hub.connect().await;
            subscribe(&mut ws, channel, None).await;
            clients.push(ws);
        }
        common::wait_subscribers(hub, channel, 2).await;
    }
    // 500 a second, alternating between the hubs; every replica's pub/sub connection is killed three times.
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(2));
    let mut kills = 0;
    for i in 0..MESSAGES {
        tick.tick().await;
        if i % 250 == 125 {
            let killed = redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
            kills += common::int_reply(&killed);
        }
        hubs[(i % 2) as usize]
            .publish(channel, json!({ "i": i }))
            .await;
    }
    assert!(kills >= 4, "{kills} pub/sub connections killed");
    for (n, ws) in clients.iter_mut().enumerate() {
        expect_sequence(ws, MESSAGES, &format!("subscriber {n}")).await;
    }
    // What the outages kept from the hubs came from history, not from luck.
    let mut replayed = 0;
    for hub in &hubs {
        let stats = hub.stats().await;
        assert!(stats["redis_reconnects"].as_u64() >= Some(1), "{stats}");
        replayed += stats["messages_replayed"].as_u64().unwrap();
    }
    assert!(
        replayed > 0,
        "nothing was missed: the kills did not test anything"
    );
}

/// A client that was away longer than `history_ttl` is not recovered, however few messages it missed.
async fn history_ttl_bounds_recovery(hub: &TestHub) {
    let channel = "feed:aged";
    let mut ws = hub.connect().await;
    let ack = subscribe(&mut ws, channel, None).await;
    let epoch = ack["epoch"].as_str().unwrap().to_string();
    publish_range(hub, channel, 1, 5).await;
    expect_exactly(&mut ws, 5, 1).await;
    ws.close().await;
    // Within the ttl: recovered.
    let mut ws = hub.connect().await;
    let ack = subscribe(&mut ws, channel, Some(json!({"epoch": epoch, "seq": 3}))).await;
    assert_eq!(ack["recovered"], true, "{ack}");
    expect_exactly(&mut ws, 2, 4).await;
    ws.close().await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    // 2 missed of a history of 100, but older than the ttl: not recovered, the snapshot instead.
    let mut ws = hub.connect().await;
    let ack = subscribe(&mut ws, channel, Some(json!({"epoch": epoch, "seq": 3}))).await;
    assert_eq!(ack["recovered"], false, "{ack}");
    let snapshot = ws.recv().await;
    assert_eq!(
        (&snapshot["type"], &snapshot["seq"]),
        (&json!("snapshot"), &json!(5))
    );
    nothing_else(&mut ws).await;
}

const AGED: &str = "[channels]\nhistory_size = 100\nhistory_ttl = \"1s\"\n";

#[actix_web::test]
async fn history_older_than_its_ttl_is_not_recovered_in_memory_mode() {
    let hub = TestHub::start(AGED).await;
    history_ttl_bounds_recovery(&hub).await;
}

#[actix_web::test]
async fn history_older_than_its_ttl_is_not_recovered_through_redis() {
    let redis = RedisServer::start();
    let hub = TestHub::start(&format!(
        "[redis]\nurl = \"{}\"\nrequired = true\n{AGED}",
        redis.url()
    ))
    .await;
    wait_ready(&hub).await;
    history_ttl_bounds_recovery(&hub).await;
}

/// Records a message the way the publish script does (seq, latest value, history), but publishes it on a
/// pub/sub channel nobody listens to: for the hubs it is a message lost on the way.
async fn record_without_publishing(redis: &RedisServer, channel: &str, data: Value) {
    use deadpool_redis::redis;
    let key = |kind: &str| format!("relayhub:{kind}:{channel}");
    let ts = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut conn = redis.client().await;
    let _: (u64, u64) = redis::Script::new(include_str!("../src/engine/redis/publish.lua"))
        .key(key("seq"))
        .key(key("cache"))
        .key(key("snap"))
        .key(key("epoch"))
        .arg(data.to_string())
        .arg(ts)
        .arg(3600)
        .arg(100)
        .arg("relayhub:nowhere")
        .arg("unused")
        .invoke_async(&mut conn)
        .await
        .expect("the publish script runs");
}

/// Deletes a channel's numbering, epoch, history and latest value, as a Redis restarted without persistence
/// would have lost them.
fn lose_channel_keys(redis: &RedisServer, channel: &str) {
    for kind in ["seq", "epoch", "snap", "cache"] {
        redis
            .cmd(&["DEL", &format!("relayhub:{kind}:{channel}")])
            .unwrap();
    }
}

/// A private Redis, one hub on it, and a client subscribed to `channel` that was given `n` messages: the
/// subscription's `subscribed` answer comes back too.
async fn subscribed_through_redis(channel: &str, n: u64) -> (RedisServer, TestHub, Ws, Value) {
    let redis = RedisServer::start();
    let hub = TestHub::start(&redis_config(&redis)).await;
    wait_ready(&hub).await;
    let mut ws = hub.connect().await;
    let ack = subscribe(&mut ws, channel, None).await;
    publish_range(&hub, channel, 1, n).await;
    expect_exactly(&mut ws, n, 1).await;
    (redis, hub, ws, ack)
}

#[actix_web::test]
async fn a_sequence_that_starts_over_under_a_new_epoch_is_delivered() {
    let channel = "feed:expired";
    let (redis, hub, mut ws, ack) = subscribed_through_redis(channel, 5).await;
    // The sequence and its epoch expire together (no publish for the channel's whole ttl) while the subscriber
    // stays: numbering starts over at 1 under a new epoch, and the link never went down.
    for kind in ["seq", "epoch", "snap"] {
        redis
            .cmd(&["DEL", &format!("relayhub:{kind}:{channel}")])
            .unwrap();
    }
    publish_range(&hub, channel, 6, 2).await;
    expect_exactly(&mut ws, 2, 1).await;
    ws.close().await;
    let mut ws = hub.connect().await;
    let again = subscribe(&mut ws, channel, None).await;
    assert_ne!(again["epoch"], ack["epoch"], "{again}");
}

#[actix_web::test]
async fn a_catch_up_of_a_numbering_that_started_over_and_lost_its_start_counts_the_loss() {
    let channel = "feed:restart";
    let (redis, hub, mut ws, _) = subscribed_through_redis(channel, 5).await;
    // The channel's keys are lost and its numbering starts over with five messages the hub's pub/sub
    // connection never delivers; history keeps only the newest three of them.
    lose_channel_keys(&redis, channel);
    for i in 1..=5 {
        record_without_publishing(&redis, channel, json!({ "again": i })).await;
    }
    redis
        .cmd(&["LTRIM", &format!("relayhub:snap:{channel}"), "0", "2"])
        .unwrap();
    nothing_else(&mut ws).await;
    redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
    for i in 3..=5 {
        let frame = ws.recv().await;
        assert_eq!(
            (&frame["type"], &frame["seq"], &frame["data"]),
            (&json!("message"), &json!(i), &json!({ "again": i })),
            "{frame}"
        );
    }
    nothing_else(&mut ws).await;
    // What history held of the new numbering was given; its lost start (1 and 2) is counted once.
    let stats = hub.stats().await;
    assert_eq!(
        (&stats["messages_replayed"], &stats["gaps_unfilled"]),
        (&json!(2), &json!(1)),
        "{stats}"
    );
}

#[actix_web::test]
async fn pattern_subscribers_never_get_a_copy_across_killed_pubsub_connections() {
    const MESSAGES: u64 = 600;
    let redis = RedisServer::start();
    let config = format!(
        "[redis]\nurl = \"{}\"\nrequired = true\n[channels]\nhistory_size = 2000\n[namespaces.feed]\npatterns = true\n",
        redis.url()
    );
    let hub = TestHub::start(&config).await;
    wait_ready(&hub).await;
    // An exact subscriber beside the pattern: this replica holds SUBSCRIBE and PSUBSCRIBE, so Redis sends each
    // message twice, and publishes made while the link is down are delivered here and may be echoed again.
    let mut exact = hub.connect().await;
    subscribe(&mut exact, "feed:kill", None).await;
    let mut pattern = hub.connect().await;
    let ack = subscribe(&mut pattern, "feed:*", Some(json!({}))).await;
    assert_eq!(ack["recovered"], json!({}));
    common::wait_subscribers(&hub, "feed:kill", 1).await;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(2));
    for i in 0..MESSAGES {
        tick.tick().await;
        if i % 150 == 75 {
            redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
        }
        hub.publish("feed:kill", json!({ "i": i })).await;
    }
    hub.publish("feed:end", json!({})).await;
    expect_sequence(&mut exact, MESSAGES, "exact").await;
    // The pattern subscriber never gets a message twice: seqs only go up (that it misses nothing either is
    // the test of the two replicas below).
    let mut last = 0;
    loop {
        let frame = pattern.recv().await;
        match (frame["type"].as_str(), frame["channel"].as_str()) {
            (Some("epoch"), _) => continue,
            (Some("message"), Some("feed:end")) => break,
            (Some("message"), Some("feed:kill")) => {
                let seq = frame["seq"].as_u64().unwrap();
                assert!(seq > last, "a copy: {seq} after {last}");
                last = seq;
            }
            _ => panic!("unexpected frame: {frame}"),
        }
    }
    assert!(last >= MESSAGES / 2, "most messages arrived ({last})");
    let stats = hub.stats().await;
    assert!(
        stats["duplicates_dropped"].as_u64() > Some(0),
        "the copies reached the ordering rule: {stats}"
    );
}

const PATTERNS: &str = "[channels]\nhistory_size = 2000\n[namespaces.feed]\npatterns = true\n";

/// Reads frames until `n` messages of `channel` arrived (skipping `epoch` frames) and checks they are
/// `{"i": 0..n}` with consecutive seqs: every one, once, in order; then nothing else.
async fn expect_pattern_sequence(ws: &mut Ws, channel: &str, n: u64, who: &str) {
    let mut last_seq = None;
    let mut i = 0;
    while i < n {
        let frame = ws.recv().await;
        if frame["type"] == "epoch" {
            continue;
        }
        assert_eq!(
            (&frame["type"], &frame["channel"]),
            (&json!("message"), &json!(channel)),
            "{who}, message {i}: {frame}"
        );
        assert_eq!(frame["data"], json!({ "i": i }), "{who}: {frame}");
        let seq = frame["seq"].as_u64().expect("a seq");
        if let Some(last) = last_seq {
            assert_eq!(seq, last + 1, "{who}: {frame}");
        }
        last_seq = Some(seq);
        i += 1;
    }
    loop {
        ws.send(json!({"op": "ping", "id": "p"})).await;
        let next = ws.recv().await;
        match next["type"].as_str() {
            Some("epoch") => continue,
            _ => {
                assert_eq!(next["type"], "pong", "{who}: {next}");
                break;
            }
        }
    }
}

/// A private Redis and two ready hubs on it whose `feed` namespace allows patterns.
async fn two_pattern_hubs() -> (RedisServer, TestHub, TestHub) {
    let redis = RedisServer::start();
    let config = format!(
        "[redis]\nurl = \"{}\"\nrequired = true\n{PATTERNS}",
        redis.url()
    );
    let (a, b) = (TestHub::start(&config).await, TestHub::start(&config).await);
    wait_ready(&a).await;
    wait_ready(&b).await;
    (redis, a, b)
}

#[actix_web::test]
async fn pattern_subscribers_on_another_replica_lose_nothing_across_killed_pubsub_connections() {
    const MESSAGES: u64 = 1_000;
    let (redis, a, b) = two_pattern_hubs().await;
    let mut plain = b.connect().await;
    subscribe(&mut plain, "feed:*", None).await;
    let mut resuming = b.connect().await;
    subscribe(&mut resuming, "feed:*", Some(json!({}))).await;
    // Both positioned in the channel before the outages begin (a gap is only seen from a known position).
    a.publish("feed:kill", json!({ "i": 0 })).await;
    for ws in [&mut plain, &mut resuming] {
        let first = loop {
            let frame = ws.recv().await;
            if frame["type"] == "message" {
                break frame;
            }
        };
        assert_eq!(first["data"], json!({ "i": 0 }), "{first}");
    }
    // Published on A at 500 a second; B's (and A's) pub/sub connection is killed three times meanwhile.
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(2));
    let mut kills = 0;
    for i in 1..MESSAGES {
        tick.tick().await;
        if i % 250 == 125 {
            let killed = redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
            kills += common::int_reply(&killed);
        }
        a.publish("feed:kill", json!({ "i": i })).await;
    }
    assert!(kills >= 4, "{kills} pub/sub connections killed");
    // The first message was read above: the rest follow, every one once, in order.
    for (ws, who) in [(&mut plain, "plain"), (&mut resuming, "resuming")] {
        expect_pattern_tail(ws, "feed:kill", 1, MESSAGES, who).await;
    }
    let stats = b.stats().await;
    assert!(stats["redis_reconnects"].as_u64() >= Some(1), "{stats}");
    assert!(
        stats["messages_replayed"].as_u64() > Some(0),
        "nothing was missed: the kills did not test anything: {stats}"
    );
}

/// As `expect_pattern_sequence`, from message `from` (the ones before were read).
async fn expect_pattern_tail(ws: &mut Ws, channel: &str, from: u64, n: u64, who: &str) {
    let mut last_seq = None;
    let mut i = from;
    while i < n {
        let frame = ws.recv().await;
        if frame["type"] == "epoch" {
            continue;
        }
        assert_eq!(
            (&frame["type"], &frame["channel"], &frame["data"]),
            (&json!("message"), &json!(channel), &json!({ "i": i })),
            "{who}, message {i}: {frame}"
        );
        let seq = frame["seq"].as_u64().expect("a seq");
        if let Some(last) = last_seq {
            assert_eq!(seq, last + 1, "{who}: {frame}");
        }
        last_seq = Some(seq);
        i += 1;
    }
    expect_pattern_sequence(ws, channel, 0, who).await;
}

/// A private Redis, one hub on it, and a pattern subscriber of `feed:*` given messages 1..=3 of `channel`.
async fn pattern_subscribed_through_redis(channel: &str) -> (RedisServer, TestHub, Ws) {
    let redis = RedisServer::start();
    let hub = TestHub::start(&format!(
        "[redis]\nurl = \"{}\"\nrequired = true\n{PATTERNS}",
        redis.url()
    ))
    .await;
    wait_ready(&hub).await;
    let mut ws = hub.connect().await;
    subscribe(&mut ws, "feed:*", None).await;
    for i in 1..=3u64 {
        hub.publish(channel, json!({ "i": i })).await;
    }
    for i in 1..=3u64 {
        let frame = ws.recv().await;
        assert_eq!(
            (&frame["seq"], &frame["data"]),
            (&json!(i), &json!({ "i": i })),
            "{frame}"
        );
    }
    (redis, hub, ws)
}

/// The next `seqs` are messages of `channel` numbered so, with `{"i": seq}`, in order; then nothing else.
async fn expect_seqs(ws: &mut Ws, channel: &str, seqs: std::ops::RangeInclusive<u64>) {
    for i in seqs {
        let frame = ws.recv().await;
        assert_eq!(
            (
                &frame["type"],
                &frame["channel"],
                &frame["seq"],
                &frame["data"]
            ),
            (
                &json!("message"),
                &json!(channel),
                &json!(i),
                &json!({ "i": i })
            ),
            "{frame}"
        );
    }
    nothing_else(ws).await;
}

/// How the subscriber of a live-gap scenario subscribes.
#[derive(Clone, Copy)]
enum Subscription {
    /// To the channel itself.
    Exact,
    /// To `feed:*`, which matches the channel.
    Pattern,
}

/// A subscriber of `channel` has messages 1 to 3; 4 and 5 are recorded but lost on the way, so the next live
/// message shows the gap and history fills it, each once, in order. When history no longer holds the missed
/// ones, the newer message is delivered anyway and the gap counted.
async fn a_live_gap_is_filled_from_history(subscription: Subscription, channel: &str) {
    let (redis, hub, mut ws) = match subscription {
        Subscription::Exact => {
            let (redis, hub, ws, _) = subscribed_through_redis(channel, 3).await;
            (redis, hub, ws)
        }
        Subscription::Pattern => pattern_subscribed_through_redis(channel).await,
    };
    record_without_publishing(&redis, channel, json!({"i": 4})).await;
    record_without_publishing(&redis, channel, json!({"i": 5})).await;
    nothing_else(&mut ws).await;
    hub.publish(channel, json!({"i": 6})).await;
    // 4 and 5 from history, then 6: in order, each once.
    expect_seqs(&mut ws, channel, 4..=6).await;
    let stats = hub.stats().await;
    assert_eq!(
        (&stats["messages_replayed"], &stats["gaps_unfilled"]),
        (&json!(2), &json!(0)),
        "{stats}"
    );
    // Lost again, and history no longer has them: the newer message is delivered anyway, and counted.
    record_without_publishing(&redis, channel, json!({"i": 7})).await;
    record_without_publishing(&redis, channel, json!({"i": 8})).await;
    redis
        .cmd(&["DEL", &format!("relayhub:snap:{channel}")])
        .unwrap();
    hub.publish(channel, json!({"i": 9})).await;
    expect_seqs(&mut ws, channel, 9..=9).await;
    let stats = hub.stats().await;
    assert_eq!(
        (&stats["messages_replayed"], &stats["gaps_unfilled"]),
        (&json!(2), &json!(1)),
        "{stats}"
    );
    // Back to normal: the next one is delivered at once.
    hub.publish(channel, json!({"i": 10})).await;
    expect_seqs(&mut ws, channel, 10..=10).await;
}

#[actix_web::test]
async fn a_gap_in_live_delivery_is_filled_from_history_before_the_newer_message() {
    a_live_gap_is_filled_from_history(Subscription::Exact, "feed:gap").await;
}

#[actix_web::test]
async fn a_gap_in_a_pattern_subscribers_live_delivery_is_filled_from_history() {
    a_live_gap_is_filled_from_history(Subscription::Pattern, "feed:pgap").await;
}

#[actix_web::test]
async fn a_pattern_subscriber_is_caught_up_after_its_replicas_pubsub_outage() {
    let channel = "feed:outage";
    let (redis, hub, mut ws) = pattern_subscribed_through_redis(channel).await;
    // Missed by this replica, and nothing else is published on the channel afterwards: only the catch-up
    // after the outage can bring them.
    record_without_publishing(&redis, channel, json!({"i": 4})).await;
    record_without_publishing(&redis, channel, json!({"i": 5})).await;
    nothing_else(&mut ws).await;
    redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
    expect_seqs(&mut ws, channel, 4..=5).await;
    let stats = hub.stats().await;
    assert_eq!(stats["redis_reconnects"], json!(1), "{stats}");
    assert_eq!(stats["messages_replayed"], json!(2), "{stats}");
    // The echo-free live path goes on from there.
    hub.publish(channel, json!({"i": 6})).await;
    expect_seqs(&mut ws, channel, 6..=6).await;
}

/// Reads `n` messages and the one `epoch` frame among or after them: `(seq, data)` per message, and the epoch.
async fn messages_and_epoch(ws: &mut Ws, n: usize) -> (Vec<(u64, Value)>, Value) {
    let (mut messages, mut epoch) = (Vec::new(), None);
    while messages.len() < n || epoch.is_none() {
        let frame = ws.recv().await;
        match frame["type"].as_str() {
            Some("message") => {
                messages.push((frame["seq"].as_u64().expect("a seq"), frame["data"].clone()))
            }
            Some("epoch") if epoch.is_none() => epoch = Some(frame["epoch"].clone()),
            _ => panic!("unexpected frame: {frame}"),
        }
    }
    (messages, epoch.expect("read above"))
}

#[actix_web::test]
async fn a_pattern_catch_up_gives_a_numbering_that_started_over_during_the_outage_from_its_start() {
    let channel = "feed:restart";
    let (redis, a, b) = two_pattern_hubs().await;
    let mut ws = b.connect().await;
    // With `since`, so the connection is told each channel's epoch, and when its numbering starts over.
    subscribe(&mut ws, "feed:*", Some(json!({}))).await;
    publish_range(&a, channel, 1, 5).await;
    let (given, old_epoch) = messages_and_epoch(&mut ws, 5).await;
    let expected: Vec<(u64, Value)> = (1..=5).map(|i| (i, json!({ "i": i }))).collect();
    assert_eq!(given, expected);
    // The channel's keys are lost (a Redis restarted without persistence) and its numbering starts over
    // under a new epoch with three messages B's pub/sub connection never delivers: it is killed, and only
    // the catch-up once it is back can bring them.
    lose_channel_keys(&redis, channel);
    for i in 1..=3 {
        record_without_publishing(&redis, channel, json!({ "again": i })).await;
    }
    nothing_else(&mut ws).await;
    redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
    let (given, new_epoch) = messages_and_epoch(&mut ws, 3).await;
    let expected: Vec<(u64, Value)> = (1..=3).map(|i| (i, json!({ "again": i }))).collect();
    assert_eq!(given, expected, "the new numbering, from its start, once");
    assert_ne!(new_epoch, old_epoch, "told the numbering started over");
    nothing_else(&mut ws).await;
    let stats = b.stats().await;
    assert_eq!(
        (
            &stats["redis_reconnects"],
            &stats["messages_replayed"],
            &stats["gaps_unfilled"]
        ),
        (&json!(1), &json!(3), &json!(0)),
        "{stats}"
    );
    // Live delivery goes on from the new numbering.
    a.publish(channel, json!({ "again": 4 })).await;
    let next = ws.recv().await;
    assert_eq!(
        (&next["type"], &next["seq"], &next["data"]),
        (&json!("message"), &json!(4), &json!({ "again": 4 })),
        "{next}"
    );
    nothing_else(&mut ws).await;
}

#[actix_web::test]
async fn a_pattern_catch_up_reads_at_most_its_cap_of_channels_and_the_rest_fill_as_gaps() {
    let redis = RedisServer::start();
    // One worker, so both connections share one registry, and one channel per catch-up.
    let hub = TestHub::start(&format!(
        "[server]\nworkers = 1\n[redis]\nurl = \"{}\"\nrequired = true\n[channels]\nhistory_size = 100\nmax_pattern_positions = 1\n[namespaces.feed]\npatterns = true\n",
        redis.url()
    ))
    .await;
    wait_ready(&hub).await;
    let mut clients = Vec::new();
    for (pattern, channel) in [("feed:a:*", "feed:a:1"), ("feed:b:*", "feed:b:1")] {
        let mut ws = hub.connect().await;
        subscribe(&mut ws, pattern, None).await;
        hub.publish(channel, json!({"i": 1})).await;
        let frame = ws.recv().await;
        assert_eq!(
            (&frame["channel"], &frame["seq"]),
            (&json!(channel), &json!(1)),
            "{frame}"
        );
        record_without_publishing(&redis, channel, json!({"i": 2})).await;
        clients.push((ws, channel));
    }
    redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
    let mut stats = hub.stats().await;
    for _ in 0..100 {
        if stats["messages_replayed"] == json!(1) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        stats = hub.stats().await;
    }
    assert_eq!(
        (
            &stats["messages_replayed"],
            &stats["pattern_catch_ups_truncated"]
        ),
        (&json!(1), &json!(1)),
        "{stats}"
    );
    // The channel left out is filled by its next message, as a gap: both end up with 2 and 3, in order.
    for (_, channel) in &clients {
        hub.publish(channel, json!({"i": 3})).await;
    }
    for (ws, channel) in &mut clients {
        expect_seqs(ws, channel, 2..=3).await;
    }
    let stats = hub.stats().await;
    assert_eq!(stats["messages_replayed"], json!(2), "{stats}");
}
