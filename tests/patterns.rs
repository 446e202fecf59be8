//! Pattern subscriptions (`prices:*`): matching channels, snapshots, one delivery when a pattern and an
//! exact subscription overlap on one connection, positions per channel (their cap, a numbering that starts
//! over) and recovery from a `since` map.

mod common;

use std::time::Duration;

use serde_json::json;

use common::TestHub;

#[actix_web::test]
async fn a_pattern_receives_every_matching_channel_once() {
    let hub = TestHub::start("[namespaces.prices]\npatterns = true\n").await;
    hub.publish("prices:BTC", json!({"p": 1})).await;
    let mut both = hub.connect().await;
    both.subscribe("prices:*").await;
    // The snapshot of the matching channel that has a value.
    let snapshot = both.recv_type("snapshot").await;
    assert_eq!(
        (snapshot["channel"].clone(), snapshot["data"].clone()),
        (json!("prices:BTC"), json!({"p": 1}))
    );
    both.subscribe("prices:BTC").await;
    assert_eq!(both.recv_type("snapshot").await["channel"], "prices:BTC");
    let mut exact = hub.connect().await;
    exact.subscribe("prices:BTC").await;
    exact.recv_type("snapshot").await;

    hub.publish("prices:BTC", json!({"p": 2})).await;
    hub.publish("prices:ETH", json!({"p": 3})).await;
    hub.publish("other:ETH", json!({"p": 4})).await;
    hub.publish("prices:BTC", json!({"p": 5})).await;
    // Overlapping pattern and exact subscription: each BTC message once, ETH through the pattern, with the
    // concrete channel in each frame; nothing from another namespace.
    let mut seen = Vec::new();
    for _ in 0..3 {
        let m = both.recv_type("message").await;
        seen.push((
            m["channel"].as_str().unwrap().to_string(),
            m["data"]["p"].as_i64().unwrap(),
        ));
    }
    assert_eq!(
        seen,
        [
            ("prices:BTC".to_string(), 2),
            ("prices:ETH".to_string(), 3),
            ("prices:BTC".to_string(), 5)
        ]
    );
    assert_eq!(exact.recv_type("message").await["data"]["p"], 2);
    assert_eq!(exact.recv_type("message").await["data"]["p"], 5);
    let stats = hub.stats().await;
    assert_eq!(stats["pattern_subscribers"]["prices:*"], 1, "{stats}");
    assert_eq!(stats["pattern_subscriptions"], 1);
}

#[actix_web::test]
async fn patterns_are_refused_where_the_namespace_does_not_allow_them() {
    let hub = TestHub::start("").await;
    let mut ws = hub.connect().await;
    ws.send(json!({"op": "subscribe", "channel": "chat:*", "id": 1}))
        .await;
    let err = ws.recv_type("error").await;
    assert_eq!(
        (err["code"].clone(), err["id"].clone()),
        (json!("forbidden"), json!(1))
    );
    ws.ping().await;
}

/// Nested patterns and an exact subscription on one connection, with and without Redis: one copy each.
async fn nested_patterns_deliver_once(hub: &TestHub, publisher: &TestHub) {
    let mut ws = hub.connect().await;
    ws.subscribe("opt:*").await;
    ws.subscribe("opt:NIFTY:*").await;
    ws.subscribe("opt:NIFTY:28").await;
    let mut outer = hub.connect().await;
    outer.subscribe("opt:*").await;
    common::eventually(
        std::time::Duration::from_secs(10),
        "subscriptions registered",
        || async {
            publisher.stats().await["mode"] == "memory"
                || hub.stats().await["pattern_subscriptions"] == 3
        },
    )
    .await;
    for (channel, n) in [
        ("opt:NIFTY:28", 1),
        ("opt:NIFTY:29", 2),
        ("opt:BANK:1", 3),
        ("optx:NIFTY:1", 4),
        ("opt:END", 5),
    ] {
        publisher.publish(channel, json!({"n": n})).await;
    }
    for ws in [&mut ws, &mut outer] {
        let mut got = Vec::new();
        loop {
            let m = ws.recv_type("message").await;
            got.push(m["data"]["n"].as_i64().unwrap());
            if m["channel"] == "opt:END" {
                break;
            }
        }
        assert_eq!(got, [1, 2, 3, 5]);
    }
}

#[actix_web::test]
async fn nested_patterns_and_an_exact_subscription_get_one_copy() {
    let hub = TestHub::start("[namespaces.opt]\npatterns = true\n").await;
    nested_patterns_deliver_once(&hub, &hub).await;
}

#[actix_web::test]
async fn nested_patterns_get_one_copy_across_replicas() {
    let redis = common::RedisServer::start();
    let config = format!(
        "[redis]\nurl = \"{}\"\nrequired = true\n[namespaces.opt]\npatterns = true\n",
        redis.url()
    );
    let a = TestHub::start(&config).await;
    let b = TestHub::start(&config).await;
    for hub in [&a, &b] {
        common::eventually(std::time::Duration::from_secs(10), "ready", || async {
            common::get_json(&hub.http("/ready")).await.0 == 200
        })
        .await;
    }
    nested_patterns_deliver_once(&a, &b).await;
}

const FEED: &str = "[channels]\nhistory_size = 50\n[namespaces.feed]\npatterns = true\n";

fn redis_feed(redis: &common::RedisServer, extra: &str) -> String {
    format!(
        "[redis]\nurl = \"{}\"\nrequired = true\n{FEED}{extra}",
        redis.url()
    )
}

async fn ready(hub: &TestHub) {
    common::eventually(std::time::Duration::from_secs(10), "ready", || async {
        common::get_json(&hub.http("/ready")).await.0 == 200
    })
    .await;
}

/// Reads `n` messages (and the `epoch` frames among them, until every channel that delivered has one):
/// returns `(channel, seq)` per message and the epoch of each channel.
async fn messages_and_epochs(
    ws: &mut common::Ws,
    n: usize,
) -> (
    Vec<(String, u64)>,
    std::collections::HashMap<String, String>,
) {
    let mut got = Vec::new();
    let mut epochs = std::collections::HashMap::new();
    while got.len() < n
        || got
            .iter()
            .any(|(c, _): &(String, u64)| !epochs.contains_key(c))
    {
        let frame = ws.recv().await;
        let channel = frame["channel"].as_str().unwrap().to_string();
        match frame["type"].as_str() {
            Some("message") => got.push((channel, frame["seq"].as_u64().expect("a seq"))),
            Some("epoch") => {
                assert!(
                    epochs
                        .insert(channel, frame["epoch"].as_str().unwrap().to_string())
                        .is_none(),
                    "one epoch frame per channel: {frame}"
                );
            }
            _ => panic!("unexpected frame: {frame}"),
        }
    }
    (got, epochs)
}

/// The next frame answers a ping: nothing else was queued.
async fn nothing_else(ws: &mut common::Ws) {
    ws.send(json!({"op": "ping", "id": "p"})).await;
    assert_eq!(ws.recv().await["type"], "pong");
}

#[actix_web::test]
async fn a_pattern_subscription_recovers_each_named_channel_on_another_replica() {
    let redis = common::RedisServer::start();
    let a = TestHub::start(&redis_feed(&redis, "")).await;
    let b = TestHub::start(&redis_feed(&redis, "")).await;
    ready(&a).await;
    ready(&b).await;
    let mut ws = a.connect().await;
    ws.send(json!({"op": "subscribe", "channel": "feed:*", "since": {}, "id": 1}))
        .await;
    let ack = ws.recv_type("subscribed").await;
    assert_eq!(
        (&ack["recovered"], &ack["positions"]),
        (&json!({}), &json!({})),
        "{ack}"
    );
    for i in 1..=5 {
        a.publish("feed:x", json!({ "i": i })).await;
        if i <= 3 {
            a.publish("feed:y", json!({ "i": i })).await;
        }
    }
    let (got, epochs) = messages_and_epochs(&mut ws, 8).await;
    let seqs = |channel: &str| {
        got.iter()
            .filter(|(c, _)| c == channel)
            .map(|(_, s)| *s)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        (seqs("feed:x"), seqs("feed:y")),
        (vec![1, 2, 3, 4, 5], vec![1, 2, 3])
    );
    nothing_else(&mut ws).await;
    ws.close().await;

    // Away: 5 more on feed:x (all still in history), 60 more on feed:y (history keeps 50).
    for i in 6..=10 {
        b.publish("feed:x", json!({ "i": i })).await;
    }
    for i in 4..=63 {
        b.publish("feed:y", json!({ "i": i })).await;
    }
    let mut ws = b.connect().await;
    ws.send(
        json!({"op": "subscribe", "channel": "feed:*", "id": 2, "since": {
            "feed:x": {"epoch": epochs["feed:x"], "seq": 5},
            "feed:y": {"epoch": epochs["feed:y"], "seq": 3},
        }}),
    )
    .await;
    let ack = ws.recv_type("subscribed").await;
    assert_eq!(
        ack["recovered"],
        json!({"feed:x": true, "feed:y": false}),
        "{ack}"
    );
    assert_eq!(
        ack["positions"],
        json!({
            "feed:x": {"epoch": epochs["feed:x"], "seq": 10},
            "feed:y": {"epoch": epochs["feed:y"], "seq": 63},
        })
    );
    // feed:x: exactly what was missed, in order; feed:y: its snapshot (never a partial replay).
    for seq in 6..=10 {
        let m = ws.recv_type("message").await;
        assert_eq!((&m["channel"], &m["seq"]), (&json!("feed:x"), &json!(seq)));
        assert_eq!(m["data"]["i"], seq);
    }
    let snapshot = ws.recv_type("snapshot").await;
    assert_eq!(
        (&snapshot["channel"], &snapshot["seq"]),
        (&json!("feed:y"), &json!(63))
    );
    // Then live messages, each once, with no second snapshot and no epoch frame for the named channels.
    a.publish("feed:x", json!({"i": 11})).await;
    a.publish("feed:y", json!({"i": 64})).await;
    let m = ws.recv_type("message").await;
    assert_eq!((&m["channel"], &m["seq"]), (&json!("feed:x"), &json!(11)));
    let m = ws.recv_type("message").await;
    assert_eq!((&m["channel"], &m["seq"]), (&json!("feed:y"), &json!(64)));
    nothing_else(&mut ws).await;
    let stats = b.stats().await;
    assert_eq!(
        (
            &stats["subscribes_recovered"],
            &stats["subscribes_unrecovered"],
            &stats["messages_replayed"]
        ),
        (&json!(1), &json!(1), &json!(5)),
        "{stats}"
    );
}

#[actix_web::test]
async fn a_malformed_or_oversized_pattern_since_is_refused() {
    let hub =
        TestHub::start(&FEED.replace("[namespaces", "max_pattern_positions = 2\n[namespaces"))
            .await;
    let mut ws = hub.connect().await;
    let at = json!({"epoch": "E", "seq": 1});
    for since in [
        json!({"epoch": "E", "seq": 1}),
        json!({"other:x": at}),
        json!({"feed:x#42": at}),
        json!({"feed:bad name": at}),
        json!({"feed:a": at, "feed:b": at, "feed:c": at}),
        json!({"feed:a": {"epoch": "E"}}),
    ] {
        ws.send(json!({"op": "subscribe", "channel": "feed:*", "since": since, "id": 7}))
            .await;
        let err = ws.recv_type("error").await;
        assert_eq!(
            (&err["code"], &err["id"]),
            (&json!("bad_request"), &json!(7)),
            "{since}: {err}"
        );
    }
    // Refused subscribes changed nothing: the pattern can still be subscribed.
    ws.send(json!({"op": "subscribe", "channel": "feed:*", "since": {"feed:a": at, "feed:b": at}, "id": 8}))
        .await;
    let ack = ws.recv_type("subscribed").await;
    assert_eq!(
        ack["recovered"],
        json!({"feed:a": false, "feed:b": false}),
        "{ack}"
    );
}

#[actix_web::test]
async fn pattern_positions_stop_at_their_cap_and_say_so() {
    let hub =
        TestHub::start(&FEED.replace("[namespaces", "max_pattern_positions = 2\n[namespaces"))
            .await;
    let mut ws = hub.connect().await;
    ws.subscribe("feed:*").await;
    for channel in ["feed:a", "feed:b", "feed:c", "feed:c"] {
        hub.publish(channel, json!({})).await;
    }
    // Past the cap the third channel is still delivered, without a position.
    for channel in ["feed:a", "feed:b", "feed:c", "feed:c"] {
        assert_eq!(ws.recv_type("message").await["channel"], channel);
    }
    nothing_else(&mut ws).await;
    let stats = hub.stats().await;
    assert_eq!(stats["pattern_positions_untracked"], 2, "{stats}");
}

#[actix_web::test]
async fn a_pattern_subscriber_follows_a_numbering_that_started_over_and_is_told_its_new_epoch() {
    let redis = common::RedisServer::start();
    let hub = TestHub::start(&redis_feed(&redis, "ttl = \"1s\"\n")).await;
    ready(&hub).await;
    let mut ws = hub.connect().await;
    ws.send(json!({"op": "subscribe", "channel": "feed:*", "since": {}, "id": 1}))
        .await;
    ws.recv_type("subscribed").await;
    for i in 1..=3 {
        hub.publish("feed:r", json!({ "i": i })).await;
    }
    let (got, epochs) = messages_and_epochs(&mut ws, 3).await;
    assert_eq!(got.iter().map(|(_, s)| *s).collect::<Vec<_>>(), [1, 2, 3]);
    // No publish for longer than the channel's ttl: its sequence expires and numbering starts over.
    common::eventually(Duration::from_secs(10), "the sequence expired", || async {
        redis
            .cmd(&["EXISTS", "relayhub:seq:feed:r"])
            .unwrap()
            .contains(":0")
    })
    .await;
    hub.publish("feed:r", json!({"i": "again"})).await;
    // Seq 1 again, at or below the position, but younger than anything given: delivered, not a copy, and
    // the new epoch is announced.
    let (got, new_epochs) = messages_and_epochs(&mut ws, 1).await;
    assert_eq!(got, [("feed:r".to_string(), 1)]);
    assert_ne!(new_epochs["feed:r"], epochs["feed:r"]);
    nothing_else(&mut ws).await;
}
