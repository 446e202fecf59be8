//! The edge against strangers: cross-site and proxied admin requests, connection budgets per replica and per
//! client address, the per-connection request rate and the pattern cap. Real hubs on port 0, real sockets.

mod common;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

use common::{TestHub, Ws, request};

fn assert_error(reply: &common::Reply, status: u16, code: &str) {
    assert_eq!(reply.status, status, "{}", reply.text());
    assert_eq!(reply.json()["error"]["code"], code, "{}", reply.text());
    assert!(
        reply.json()["error"]["message"].is_string(),
        "{}",
        reply.text()
    );
}

async fn post(hub: &TestHub, path: &str, body: Value, headers: &[(&str, &str)]) -> common::Reply {
    let mut all = vec![("Content-Type", "application/json")];
    all.extend_from_slice(headers);
    request(
        "POST",
        &hub.http(path),
        &all,
        Some(body.to_string().into_bytes()),
    )
    .await
}

#[actix_web::test]
async fn cross_site_pages_cannot_call_any_state_changing_endpoint() {
    let hub = TestHub::start("").await;
    let evil = [("Origin", "http://evil.example")];
    let reply = post(&hub, "/api/polling/stop", json!({"job": "x"}), &evil).await;
    assert_error(&reply, 403, "forbidden");
    let body = json!({"source": "nope", "params": {}});
    let reply = post(&hub, "/api/polling/start", body.clone(), &evil).await;
    assert_error(&reply, 403, "forbidden");
    let reply = post(
        &hub,
        "/api/publish",
        json!({"channel": "prices:X", "data": 1}),
        &evil,
    )
    .await;
    assert_error(&reply, 403, "forbidden");
    // A form POST needs no preflight: the content type does not matter.
    let reply = request(
        "POST",
        &hub.http("/api/polling/stop"),
        &[
            ("Origin", "http://evil.example"),
            ("Content-Type", "text/plain"),
        ],
        Some(br#"{"job":"x"}"#.to_vec()),
    )
    .await;
    assert_error(&reply, 403, "forbidden");

    // An allowed page and a server (no Origin) get through to the endpoint itself.
    let reply = post(
        &hub,
        "/api/polling/stop",
        json!({"job": "x"}),
        &[("Origin", "http://localhost:5173")],
    )
    .await;
    assert_error(&reply, 404, "not_found");
    let reply = post(&hub, "/api/polling/start", body, &[]).await;
    assert_error(&reply, 400, "unknown_source");
}

#[actix_web::test]
async fn without_an_admin_token_requests_through_a_proxy_are_refused() {
    let hub = TestHub::start("").await;
    let stop = json!({"job": "x"});
    for header in [
        ("X-Forwarded-For", "203.0.113.9"),
        ("Forwarded", "for=203.0.113.9;proto=https"),
    ] {
        let reply = post(&hub, "/api/polling/stop", stop.clone(), &[header]).await;
        assert_error(&reply, 403, "forbidden");
        let reply = request("GET", &hub.http("/api/polling/status"), &[header], None).await;
        assert_error(&reply, 403, "forbidden");
    }
    // Loopback without forwarding headers is still served.
    let reply = request("GET", &hub.http("/api/polling/status"), &[], None).await;
    assert_eq!(reply.status, 200, "{}", reply.text());

    // A peer in trusted_proxies is a proxy even when it forwards nothing.
    let proxied = TestHub::start("[server]\ntrusted_proxies = [\"127.0.0.0/8\"]\n").await;
    let reply = request("GET", &proxied.http("/api/polling/status"), &[], None).await;
    assert_error(&reply, 403, "forbidden");

    // With a token, the token decides, proxy or not.
    let tokened =
        TestHub::start("[server]\nadmin_token = \"s3cret\"\ntrusted_proxies = [\"127.0.0.1\"]\n")
            .await;
    let xff = ("X-Forwarded-For", "203.0.113.9");
    let reply = post(&tokened, "/api/polling/stop", stop.clone(), &[xff]).await;
    assert_error(&reply, 401, "unauthorized");
    let auth = ("Authorization", "Bearer s3cret");
    let reply = post(&tokened, "/api/polling/stop", stop, &[xff, auth]).await;
    assert_error(&reply, 404, "not_found");
    let reply = request(
        "GET",
        &tokened.http("/api/polling/status"),
        &[xff, auth],
        None,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

/// Opens a WebSocket with extra handshake headers; a refusal comes back as its status and JSON body.
async fn connect_with(hub: &TestHub, headers: &[(&str, &str)]) -> Result<Ws, (u16, Value)> {
    let mut request = hub.ws_url().into_client_request().unwrap();
    for (k, v) in headers {
        request.headers_mut().insert(
            tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((stream, _)) => Ok(Ws { stream }),
        Err(tungstenite::Error::Http(response)) => {
            let body = response.body().clone().unwrap_or_default();
            Err((
                response.status().as_u16(),
                serde_json::from_slice(&body).unwrap_or(Value::Null),
            ))
        }
        Err(other) => panic!("handshake failed without an HTTP answer: {other}"),
    }
}

fn assert_too_many(refused: Result<Ws, (u16, Value)>) {
    match refused {
        Ok(_) => panic!("the handshake was accepted past the limit"),
        Err((status, body)) => {
            assert_eq!(status, 503, "{body}");
            assert_eq!(body["error"]["code"], "too_many_connections", "{body}");
            assert!(body["error"]["message"].is_string(), "{body}");
        }
    }
}

/// Connects, retrying while the budget a closed connection held is being released; also returns how many
/// handshakes were refused meanwhile (each one counts in `connections_refused`).
async fn connect_eventually(hub: &TestHub, headers: &[(&str, &str)]) -> (Ws, u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut refused = 0;
    loop {
        match connect_with(hub, headers).await {
            Ok(ws) => return (ws, refused),
            Err(refusal) => {
                refused += 1;
                assert!(
                    Instant::now() < deadline,
                    "a released slot was never given back: {refusal:?}"
                )
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[actix_web::test]
async fn connections_per_address_are_capped_and_given_back_on_any_close() {
    let hub = TestHub::start("[server]\nmax_connections_per_ip = 5\n").await;
    let mut open = Vec::new();
    for _ in 0..5 {
        open.push(connect_with(&hub, &[]).await.expect("under the limit"));
    }
    assert_too_many(connect_with(&hub, &[]).await);
    assert_eq!(hub.stats().await["connections_refused"], 1);

    // A clean close gives the slot back.
    open.pop().unwrap().close().await;
    let (mut ws, waited) = connect_eventually(&hub, &[]).await;
    ws.ping().await;
    assert_too_many(connect_with(&hub, &[]).await);

    // So does a connection that just vanishes (socket dropped, no close frame).
    drop(open.pop().unwrap());
    let (again, waited_again) = connect_eventually(&hub, &[]).await;
    open.push(again);
    open.push(ws);
    assert_too_many(connect_with(&hub, &[]).await);
    assert_eq!(
        hub.stats().await["connections_refused"],
        3 + waited + waited_again
    );
    assert_eq!(hub.stats().await["connections"], 5);
}

#[actix_web::test]
async fn max_connections_caps_the_replica() {
    let hub = TestHub::start("[server]\nmax_connections = 3\n").await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(connect_with(&hub, &[]).await.expect("under the limit"));
    }
    assert_too_many(connect_with(&hub, &[]).await);
    // A different forwarded address does not help: the replica is full.
    assert_too_many(connect_with(&hub, &[("X-Forwarded-For", "198.51.100.1")]).await);
    open.pop().unwrap().close().await;
    let (ws, waited) = connect_eventually(&hub, &[]).await;
    open.push(ws);
    assert_too_many(connect_with(&hub, &[]).await);
    assert_eq!(hub.stats().await["connections_refused"], 3 + waited);
}

#[actix_web::test]
async fn behind_a_trusted_proxy_each_forwarded_address_has_its_own_budget() {
    let hub = TestHub::start(
        "[server]\nmax_connections_per_ip = 2\ntrusted_proxies = [\"127.0.0.1\", \"10.0.0.0/8\"]\n",
    )
    .await;
    let a = [("X-Forwarded-For", "198.51.100.1")];
    let mut open = vec![
        connect_with(&hub, &a).await.expect("first of a"),
        connect_with(&hub, &a).await.expect("second of a"),
    ];
    assert_too_many(connect_with(&hub, &a).await);
    // Another client behind the same proxy.
    open.push(
        connect_with(&hub, &[("X-Forwarded-For", "198.51.100.2")])
            .await
            .expect("b has its own budget"),
    );
    // Only the last hop counts (the one the trusted proxy added); earlier ones are the client's to forge.
    open.push(
        connect_with(&hub, &[("X-Forwarded-For", "198.51.100.1, 198.51.100.3")])
            .await
            .expect("the last hop is c"),
    );
    assert_too_many(connect_with(&hub, &[("X-Forwarded-For", "198.51.100.3, 198.51.100.1")]).await);

    // From a peer that is not a trusted proxy, X-Forwarded-For is ignored: every handshake counts as 127.0.0.1.
    let direct = TestHub::start("[server]\nmax_connections_per_ip = 2\n").await;
    let mut open_direct = Vec::new();
    for n in 1..=2 {
        let forged = format!("198.51.100.{n}");
        open_direct.push(
            connect_with(&direct, &[("X-Forwarded-For", forged.as_str())])
                .await
                .expect("under the limit"),
        );
    }
    assert_too_many(connect_with(&direct, &[("X-Forwarded-For", "198.51.100.9")]).await);
    assert_eq!(direct.stats().await["connections_refused"], 1);
    drop((open, open_direct));
}

#[actix_web::test]
async fn a_burst_over_the_request_rate_is_answered_rate_limited() {
    let hub = TestHub::start("").await; // 50 requests/s, burst 200
    let mut ws = hub.connect().await;
    let started = Instant::now();
    for n in 0..500 {
        ws.stream
            .feed(Message::text(json!({"op": "ping", "id": n}).to_string()))
            .await
            .unwrap();
    }
    ws.stream.flush().await.unwrap();
    let (mut pongs, mut limited) = (0u64, 0u64);
    for n in 0..500 {
        let frame = ws.recv().await;
        // Answers come in request order, each with its request's id.
        assert_eq!(frame["id"], n, "{frame}");
        match frame["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") => {
                assert_eq!(frame["code"], "rate_limited", "{frame}");
                limited += 1;
            }
            _ => panic!("unexpected frame {frame}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // The burst, plus whatever the bucket refilled while the 500 were read (50 per second).
    let most = 200 + (50.0 * elapsed).ceil() as u64 + 1;
    assert!(
        (200..=most).contains(&pongs),
        "{pongs} pongs, {limited} rate_limited in {elapsed:.2}s"
    );
    assert_eq!(pongs + limited, 500);
    assert_eq!(hub.stats().await["requests_rate_limited"], limited);

    // Still open, and served again once the bucket refills.
    tokio::time::sleep(Duration::from_millis(100)).await;
    ws.ping().await;
}

#[actix_web::test]
async fn refused_requests_are_not_run() {
    let hub = TestHub::start("[websocket]\nrequests_per_second = 1\nrequest_burst = 3\n").await;
    let mut ws = hub.connect().await;
    for n in 0..10 {
        let subscribe = json!({"op": "subscribe", "channel": format!("prices:RL{n}"), "id": n});
        ws.stream
            .feed(Message::text(subscribe.to_string()))
            .await
            .unwrap();
    }
    ws.stream.flush().await.unwrap();
    // Acks come from the registry and refusals from the session, so they may interleave: match them by id.
    let mut subscribed = Vec::new();
    for _ in 0..10 {
        let frame = ws.recv().await;
        let n = frame["id"].as_u64().expect("an id");
        match frame["type"].as_str() {
            Some("subscribed") => subscribed.push(n),
            Some("error") => assert_eq!(frame["code"], "rate_limited", "{frame}"),
            _ => panic!("unexpected frame {frame}"),
        }
    }
    assert!(
        (3..10).contains(&subscribed.len()),
        "{subscribed:?} of 10 ran"
    );
    let stats = hub.stats().await;
    for n in 0..10 {
        let count = &stats["subscribers"][format!("prices:RL{n}")];
        if subscribed.contains(&n) {
            assert_eq!(count, 1, "prices:RL{n}: {stats}");
        } else {
            assert_eq!(
                count,
                &Value::Null,
                "a refused subscribe ran: prices:RL{n}: {stats}"
            );
        }
    }
}

#[actix_web::test]
async fn a_connection_that_stays_over_the_rate_is_closed_with_1008() {
    let hub = TestHub::start(
        "[websocket]\nrequests_per_second = 10\nrequest_burst = 10\nrate_limited_close_after = \"2s\"\n",
    )
    .await;
    let ws = hub.connect().await;
    let (mut sink, mut stream) = ws.stream.split();
    // About 200 requests per second, until the hub closes (or 15 s pass): far over 10 per second.
    let flood = tokio::spawn(async move {
        let end = Instant::now() + Duration::from_secs(15);
        while Instant::now() < end {
            let ping = Message::text(r#"{"op":"ping"}"#);
            if sink.send(ping).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    // Reading everything, so the hub never sees a slow consumer.
    let close = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(frame) = stream.next().await {
            match frame {
                Ok(Message::Close(frame)) => return frame,
                Ok(_) => continue,
                Err(e) => panic!("connection broke without a close frame: {e}"),
            }
        }
        None
    })
    .await
    .expect("a flooding connection was never closed")
    .expect("a close frame");
    flood.abort();
    assert_eq!(u16::from(close.code), 1008, "{close:?}");
    assert!(close.reason.contains("rate"), "{close:?}");
    let stats = hub.stats().await;
    assert_eq!(stats["rate_limit_disconnects"], 1, "{stats}");
    assert_eq!(stats["slow_consumer_disconnects"], 0, "{stats}");
    assert!(
        stats["requests_rate_limited"].as_u64().unwrap() > 100,
        "{stats}"
    );

    // A connection that bursts once and then stays under the rate is not closed.
    let mut calm = hub.connect().await;
    for _ in 0..30 {
        calm.send(json!({"op": "ping"})).await;
    }
    for _ in 0..30 {
        calm.recv().await;
    }
    for _ in 0..25 {
        tokio::time::sleep(Duration::from_millis(120)).await;
        calm.ping().await;
    }
    assert_eq!(hub.stats().await["rate_limit_disconnects"], 1);
}

#[actix_web::test]
async fn pattern_subscriptions_are_capped_per_connection() {
    let hub = TestHub::start("[websocket]\nmax_patterns_per_connection = 2\n").await;
    let mut ws = hub.connect().await;
    ws.subscribe("prices:a:*").await;
    ws.subscribe("prices:b:*").await;
    ws.send(json!({"op": "subscribe", "channel": "prices:c:*", "id": 7}))
        .await;
    let refused = ws.recv_type("error").await;
    assert_eq!(refused["code"], "too_many_patterns", "{refused}");
    assert_eq!(refused["id"], 7);
    assert_eq!(hub.stats().await["patterns_refused"], 1);
    // Subscribing again to a held pattern is still an idempotent answer, and exact channels are not capped by it.
    ws.subscribe("prices:a:*").await;
    ws.subscribe("prices:EXACT").await;
    // Unsubscribing one makes room for another.
    ws.send(json!({"op": "unsubscribe", "channel": "prices:a:*"}))
        .await;
    ws.recv_type("unsubscribed").await;
    ws.subscribe("prices:c:*").await;
    hub.publish("prices:c:1", json!(1)).await;
    let msg = ws.recv_type("message").await;
    assert_eq!(msg["channel"], "prices:c:1");
}
