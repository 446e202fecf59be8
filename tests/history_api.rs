//! `GET /api/channels/{channel}/history` as the catch-up read of a client that lost its socket: the channel's
//! epoch and newest seq, `since_seq` (what came after a position, oldest first) and `recovered` (whether that
//! is everything), on real hubs in memory mode and with a real `redis-server`, against what the WebSocket
//! says of the same channel.

mod common;

use std::time::Duration;

use serde_json::{Value, json};

use common::{RedisServer, TestHub, Ws, get_json, wait_ready};

const CHANNELS: &str = "[channels]\nhistory_size = 100\n[namespaces.brief]\nhistory_ttl = \"1s\"\n";

fn redis_config(redis: &RedisServer) -> String {
    format!(
        "[redis]\nurl = \"{}\"\nrequired = true\n{CHANNELS}",
        redis.url()
    )
}

/// `GET .../history{query}`; asserts 200.
async fn history(hub: &TestHub, channel: &str, query: &str) -> Value {
    let (status, body) =
        get_json(&hub.http(&format!("/api/channels/{channel}/history{query}"))).await;
    assert_eq!(status, 200, "{query}: {body}");
    body
}

/// The seqs of an answer's items, in the order given.
fn seqs(body: &Value) -> Vec<u64> {
    body["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["seq"].as_u64().expect("a seq"))
        .collect()
}

/// The epoch the WebSocket reports for `channel`.
async fn socket_epoch(hub: &TestHub, channel: &str) -> String {
    let mut ws: Ws = hub.connect().await;
    ws.send(json!({"op": "subscribe", "channel": channel, "id": 1}))
        .await;
    let ack = ws.recv_type("subscribed").await;
    ws.close().await;
    ack["epoch"].as_str().expect("an epoch").to_string()
}

/// Everything the query promises, with messages published on `a` and read on `b` (the same hub in memory
/// mode, two replicas with Redis). Returns the epoch.
async fn catch_up_reads(a: &TestHub, b: &TestHub) -> String {
    for i in 1..=10 {
        a.publish("feed:h", json!({"i": i})).await;
    }
    let plain = history(b, "feed:h", "?limit=3").await;
    let epoch = plain["epoch"].as_str().expect("an epoch").to_string();
    assert!(!epoch.is_empty());
    assert_eq!(plain["seq"], 10, "{plain}");
    assert!(plain.get("recovered").is_none(), "{plain}");
    assert_eq!(seqs(&plain), [10, 9, 8], "without since_seq: newest first");
    // The HTTP API and the WebSocket speak of one epoch, on every replica.
    assert_eq!(socket_epoch(a, "feed:h").await, epoch);
    assert_eq!(socket_epoch(b, "feed:h").await, epoch);

    // A client at 4 gets 5..10, oldest first, and knows it is everything.
    let after = history(b, "feed:h", &format!("?since_seq=4&epoch={epoch}")).await;
    assert_eq!(after["recovered"], true, "{after}");
    assert_eq!(seqs(&after), [5, 6, 7, 8, 9, 10]);
    let data: Vec<&Value> = after["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| &i["data"]["i"])
        .collect();
    assert_eq!(data, [5, 6, 7, 8, 9, 10]);
    // Without epoch, the channel's current one is meant.
    let same = history(b, "feed:h", "?since_seq=4").await;
    assert_eq!(
        (&same["recovered"], seqs(&same)),
        (&json!(true), vec![5, 6, 7, 8, 9, 10])
    );
    // Cut by limit: the first ones after the position; paging on from the last item ends at `seq`.
    let first = history(b, "feed:h", &format!("?since_seq=4&epoch={epoch}&limit=4")).await;
    assert_eq!(
        (&first["recovered"], seqs(&first)),
        (&json!(true), vec![5, 6, 7, 8])
    );
    let rest = history(b, "feed:h", &format!("?since_seq=8&epoch={epoch}&limit=4")).await;
    assert_eq!(seqs(&rest), [9, 10]);
    assert_eq!(rest["seq"], 10);
    // Up to date: nothing, and nothing missing.
    let none = history(b, "feed:h", &format!("?since_seq=10&epoch={epoch}")).await;
    assert_eq!((&none["recovered"], seqs(&none)), (&json!(true), vec![]));
    // Another epoch's position, or one ahead of the channel, cannot be recovered.
    let other = history(b, "feed:h", "?since_seq=4&epoch=not-this-one").await;
    assert_eq!(other["recovered"], false, "{other}");
    assert_eq!(other["epoch"], json!(epoch));
    let ahead = history(b, "feed:h", &format!("?since_seq=11&epoch={epoch}")).await;
    assert_eq!((&ahead["recovered"], seqs(&ahead)), (&json!(false), vec![]));

    // 150 published, 100 kept: a client at 20 missed some that are gone; one at 50 missed none of them.
    for i in 11..=150 {
        a.publish("feed:h", json!({"i": i})).await;
    }
    let trimmed = history(b, "feed:h", &format!("?since_seq=20&epoch={epoch}")).await;
    assert_eq!(trimmed["recovered"], false, "{trimmed}");
    assert_eq!(
        seqs(&trimmed),
        (51..=150).collect::<Vec<_>>(),
        "what is held, all the same"
    );
    let kept = history(b, "feed:h", &format!("?since_seq=50&epoch={epoch}")).await;
    assert_eq!(kept["recovered"], true);
    assert_eq!(seqs(&kept), (51..=150).collect::<Vec<_>>());

    // Older than the namespace's history_ttl: no longer history.
    a.publish("brief:x", json!(1)).await;
    let brief = history(b, "brief:x", "?since_seq=0").await;
    assert_eq!((&brief["recovered"], seqs(&brief)), (&json!(true), vec![1]));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let brief = history(b, "brief:x", "?since_seq=0").await;
    assert_eq!((&brief["recovered"], seqs(&brief)), (&json!(false), vec![]));

    // A channel nobody published on has an epoch too, and nothing is missing after 0.
    let empty = history(b, "feed:empty", "?since_seq=0").await;
    assert_eq!(
        (&empty["seq"], &empty["recovered"]),
        (&json!(0), &json!(true))
    );
    epoch
}

/// Bad queries get the API's error shape.
async fn refuses_bad_queries(hub: &TestHub) {
    let long = "e".repeat(65);
    for query in [
        "?since_seq=-1".to_string(),
        "?since_seq=abc".to_string(),
        "?since_seq=1.5".to_string(),
        "?epoch=E".to_string(),
        "?since_seq=1&epoch=".to_string(),
        format!("?since_seq=1&epoch={long}"),
    ] {
        let (status, body) =
            get_json(&hub.http(&format!("/api/channels/feed:h/history{query}"))).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"]["code"], "bad_request", "{query}: {body}");
    }
}

#[actix_web::test]
async fn memory_mode_history_answers_since_a_position() {
    let hub = TestHub::start(CHANNELS).await;
    let epoch = catch_up_reads(&hub, &hub).await;
    refuses_bad_queries(&hub).await;
    // A restarted memory hub starts numbering over under a new epoch: the old position is not recovered.
    let mut hub = hub;
    hub.shutdown().await;
    let hub = TestHub::start(CHANNELS).await;
    hub.publish("feed:h", json!({"i": 1})).await;
    let after = history(&hub, "feed:h", &format!("?since_seq=0&epoch={epoch}")).await;
    assert_ne!(after["epoch"], json!(epoch));
    assert_eq!(
        (&after["recovered"], seqs(&after)),
        (&json!(false), vec![1])
    );
}

#[actix_web::test]
async fn redis_mode_history_answers_since_a_position_on_every_replica() {
    let mut redis = RedisServer::start();
    let a = TestHub::start(&redis_config(&redis)).await;
    let b = TestHub::start(&redis_config(&redis)).await;
    wait_ready(&a).await;
    wait_ready(&b).await;
    let epoch = catch_up_reads(&a, &b).await;
    refuses_bad_queries(&b).await;
    // Redis restarted without persistence: a new epoch, and the old position is not recovered.
    redis.restart();
    wait_ready(&a).await;
    a.publish("feed:h", json!({"i": 1})).await;
    let after = history(&b, "feed:h", &format!("?since_seq=150&epoch={epoch}")).await;
    assert_ne!(after["epoch"], json!(epoch));
    assert_eq!(after["seq"], 1);
    assert_eq!(after["recovered"], false, "{after}");
}
