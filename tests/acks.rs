//! The frames a subscribe owes its client (its `subscribed` answer, its snapshots) are never dropped unseen:
//! past the connection's queue bound the connection is a slow consumer like any other, closed with 1008 and
//! counted, against a real hub and a real WebSocket client.

mod common;

use futures_util::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use common::{TestHub, Ws};

/// Reads until the server closes: the frames read before, and the close code.
async fn frames_until_close(ws: &mut Ws) -> (Vec<serde_json::Value>, Option<u16>) {
    let mut frames = Vec::new();
    loop {
        let next = tokio::time::timeout(std::time::Duration::from_secs(10), ws.stream.next())
            .await
            .expect("the server answers or closes");
        match next {
            Some(Ok(Message::Text(text))) => frames.push(serde_json::from_str(&text).unwrap()),
            Some(Ok(Message::Close(frame))) => return (frames, frame.map(|f| u16::from(f.code))),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return (frames, None),
        }
    }
}

#[actix_web::test]
async fn snapshots_past_the_queue_bound_close_the_connection_instead_of_vanishing() {
    let hub = TestHub::start(
        "[websocket]\nmailbox_size = 4\n[channels]\nmax_pattern_snapshots = 100\n[namespaces.feed]\npatterns = true\n",
    )
    .await;
    for i in 0..50 {
        hub.publish(&format!("feed:{i}"), json!({ "i": i })).await;
    }
    // One subscribe owes this client its answer and 50 snapshots at once: far past a queue of 4.
    let mut ws = hub.connect().await;
    ws.send(json!({"op": "subscribe", "channel": "feed:*", "id": 1}))
        .await;
    let (frames, code) = frames_until_close(&mut ws).await;
    let snapshots = frames.iter().filter(|f| f["type"] == "snapshot").count();
    assert!(
        snapshots < 50,
        "the queue bound was never reached: {frames:?}"
    );
    assert_eq!(code, Some(1008), "told, not left without them: {frames:?}");
    let stats = hub.stats().await;
    assert!(stats["replies_refused"].as_u64() >= Some(1), "{stats}");
    assert!(
        stats["slow_consumer_disconnects"].as_u64() >= Some(1),
        "{stats}"
    );
}

#[actix_web::test]
async fn pipelined_subscribes_get_every_answer_or_are_told() {
    let hub =
        TestHub::start("[websocket]\nmailbox_size = 2\nmax_subscriptions_per_connection = 500\n")
            .await;
    for i in 0..200 {
        hub.publish(
            &format!("news:{i}"),
            json!({ "pad": "x".repeat(200), "i": i }),
        )
        .await;
    }
    // Every channel is cached on this replica: each subscribe is answered with its snapshot at once.
    let mut warm = hub.connect().await;
    for i in 0..200 {
        warm.subscribe(&format!("news:{i}")).await;
        warm.recv_type("snapshot").await;
    }
    let mut ws = hub.connect().await;
    for i in 0..200 {
        ws.send(json!({"op": "subscribe", "channel": format!("news:{i}"), "id": i}))
            .await;
    }
    ws.send(json!({"op": "ping", "id": "end"})).await;
    let mut answered = std::collections::HashSet::new();
    let mut told = None;
    loop {
        let next = tokio::time::timeout(std::time::Duration::from_secs(10), ws.stream.next())
            .await
            .expect("every answer, or the close, within a moment");
        match next {
            Some(Ok(Message::Text(text))) => {
                let frame: serde_json::Value = serde_json::from_str(&text).unwrap();
                if frame["type"] == "subscribed" {
                    answered.insert(frame["id"].as_u64().unwrap());
                }
                if frame["type"] == "pong" {
                    break;
                }
            }
            Some(Ok(Message::Close(frame))) => {
                told = frame.map(|f| u16::from(f.code));
                break;
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => break,
        }
    }
    match told {
        Some(code) => {
            assert_eq!(code, 1008);
            let stats = hub.stats().await;
            assert!(stats["replies_refused"].as_u64() >= Some(1), "{stats}");
        }
        None => assert_eq!(answered.len(), 200, "an answer vanished"),
    }
}
