//! Pattern subscriptions (`prices:*`): matching channels, snapshots, and one delivery when a pattern and an
//! exact subscription overlap on one connection.

mod common;

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
