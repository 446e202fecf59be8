//! The hub behind a real nginx on loopback, configured by `deploy/nginx.conf`: what the proxy changes must not
//! open the admin API or merge every client into the proxy's one address, a fleet of real processes
//! behind it loses no message when one replica is stopped, and an event stream resumes through it on
//! whichever replica a balancer without sticky sessions picks.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};

use common::nginx::Nginx;
use common::process::{ConfigFile, Process, start_binary};
use common::sse::Stream;
use common::{RedisServer, TestHub, Ws, get_json, post_json, request};

async fn stop_job(url: &str) -> common::Reply {
    request(
        "POST",
        url,
        &[("Content-Type", "application/json")],
        Some(br#"{"job":"no-such-job"}"#.to_vec()),
    )
    .await
}

#[actix_web::test]
async fn without_an_admin_token_the_admin_api_is_refused_through_a_proxy() {
    let hub = TestHub::start("").await;
    let nginx = Nginx::start(hub.addr);
    // Straight from loopback, with no token configured, the admin API answers (404: the job is unknown).
    let direct = stop_job(&hub.http("/api/polling/stop")).await;
    assert_eq!(direct.status, 404, "{}", direct.text());
    // Through nginx the peer is still loopback, but the request is not from this host's operator.
    let proxied = stop_job(&nginx.http("/api/polling/stop")).await;
    assert_eq!(proxied.status, 403, "{}", proxied.text());
    assert_eq!(
        proxied.json()["error"]["code"],
        "forbidden",
        "{}",
        proxied.text()
    );
    let status = request("GET", &nginx.http("/api/polling/status"), &[], None).await;
    assert_eq!(status.status, 403, "{}", status.text());
    // Reading public data through the proxy is unaffected.
    let stats = request("GET", &nginx.http("/api/stats"), &[], None).await;
    assert_eq!(stats.status, 200, "{}", stats.text());
}

#[actix_web::test]
async fn with_an_admin_token_the_admin_api_works_through_a_proxy() {
    let hub = TestHub::start("[server]\nadmin_token = \"s3cret\"\n").await;
    let nginx = Nginx::start(hub.addr);
    let reply = request(
        "POST",
        &nginx.http("/api/polling/stop"),
        &[
            ("Content-Type", "application/json"),
            ("Authorization", "Bearer s3cret"),
        ],
        Some(br#"{"job":"no-such-job"}"#.to_vec()),
    )
    .await;
    assert_eq!(reply.status, 404, "{}", reply.text());
    let wrong = request(
        "POST",
        &nginx.http("/api/polling/stop"),
        &[
            ("Content-Type", "application/json"),
            ("Authorization", "Bearer guess"),
        ],
        Some(br#"{"job":"no-such-job"}"#.to_vec()),
    )
    .await;
    assert_eq!(wrong.status, 401, "{}", wrong.text());
}

/// A WebSocket through nginx from the loopback address `source`.
async fn connect_from(nginx: &Nginx, source: Ipv4Addr) -> Result<Ws, u16> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0)).unwrap();
    let stream = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], nginx.port)))
        .await
        .unwrap();
    let request = nginx.ws_url().into_client_request().unwrap();
    match tokio_tungstenite::client_async(request, tokio_tungstenite::MaybeTlsStream::Plain(stream))
        .await
    {
        Ok((stream, _)) => Ok(Ws { stream }),
        Err(tungstenite::Error::Http(response)) => {
            let body = response.body().clone().unwrap_or_default();
            let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            assert_eq!(json["error"]["code"], "too_many_connections", "{json}");
            Err(response.status().as_u16())
        }
        Err(e) => panic!("handshake through nginx: {e}"),
    }
}

#[actix_web::test]
async fn behind_a_trusted_nginx_each_client_address_has_its_own_connection_budget() {
    let hub =
        TestHub::start("[server]\nmax_connections_per_ip = 2\ntrusted_proxies = [\"127.0.0.1\"]\n")
            .await;
    let nginx = Nginx::start(hub.addr);
    let (a, b) = (Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3));
    let mut open = vec![
        connect_from(&nginx, a).await.expect("first from a"),
        connect_from(&nginx, a).await.expect("second from a"),
    ];
    assert_eq!(connect_from(&nginx, a).await.err(), Some(503));
    // Another client of the same proxy is not refused for a's connections.
    open.push(connect_from(&nginx, b).await.expect("b has its own budget"));
    open.push(connect_from(&nginx, b).await.expect("second from b"));
    let mut ws = open.pop().unwrap();
    ws.ping().await;
    assert_eq!(hub.stats().await["connections_refused"], 1);

    // Without trusting the proxy, every client through it is the proxy: one budget for all.
    let untrusting = TestHub::start("[server]\nmax_connections_per_ip = 2\n").await;
    let nginx = Nginx::start(untrusting.addr);
    let _a = connect_from(&nginx, a).await.expect("first");
    let _b = connect_from(&nginx, b).await.expect("second");
    assert_eq!(
        connect_from(&nginx, Ipv4Addr::new(127, 0, 0, 4))
            .await
            .err(),
        Some(503)
    );
    drop(open);
}

/// A WebSocket through nginx from `source`, or why not (a handshake refused by every replica nginx tried).
async fn try_connect_from(nginx: &Nginx, source: Ipv4Addr) -> Result<Ws, String> {
    let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket
        .bind(SocketAddr::new(IpAddr::V4(source), 0))
        .map_err(|e| e.to_string())?;
    let stream = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], nginx.port)))
        .await
        .map_err(|e| e.to_string())?;
    let request = nginx.ws_url().into_client_request().unwrap();
    tokio_tungstenite::client_async(request, tokio_tungstenite::MaybeTlsStream::Plain(stream))
        .await
        .map(|(stream, _)| Ws { stream })
        .map_err(|e| e.to_string())
}

/// Subscribes `ws` to `channel` (from `since` when given) and returns the `subscribed` answer.
async fn subscribe_since(ws: &mut Ws, channel: &str, since: Option<(&str, u64)>) -> Value {
    let mut op = json!({"op": "subscribe", "channel": channel, "id": 1});
    if let Some((epoch, seq)) = since {
        op["since"] = json!({"epoch": epoch, "seq": seq});
    }
    ws.send(op).await;
    ws.recv_type("subscribed").await
}

/// What one client behind the balancer saw: the seqs of its messages, in order, and how often it came back.
struct Followed {
    seqs: Vec<u64>,
    reconnects: usize,
}

/// A client that reads `channel` through nginx until it has seq `last`; when its replica closes it, it
/// reconnects through nginx (to whichever replica nginx picks) and resumes with `since`, as relayhub.js does.
async fn follow(
    nginx: &Nginx,
    source: Ipv4Addr,
    channel: &str,
    last: u64,
    subscribed: tokio::sync::mpsc::Sender<()>,
) -> Followed {
    let mut ws = try_connect_from(nginx, source)
        .await
        .expect("connects through nginx");
    let ack = subscribe_since(&mut ws, channel, None).await;
    let epoch = ack["epoch"].as_str().expect("an epoch").to_string();
    let mut position = ack["seq"].as_u64().expect("a seq");
    subscribed.send(()).await.unwrap();
    let mut seen = Followed {
        seqs: Vec::new(),
        reconnects: 0,
    };
    while position < last {
        let frame = tokio::time::timeout(Duration::from_secs(20), ws.stream.next())
            .await
            .unwrap_or_else(|_| panic!("{source}: nothing for 20 s at seq {position}"));
        match frame {
            Some(Ok(Message::Text(text))) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["type"] == "message" {
                    position = frame["seq"].as_u64().expect("a sequenced message");
                    seen.seqs.push(position);
                }
            }
            Some(Ok(Message::Close(close))) => {
                let code = close.map(|c| u16::from(c.code));
                assert_eq!(code, Some(1001), "{source}: closed with {code:?}");
                seen.reconnects += 1;
                ws = reconnect(nginx, source).await;
                let ack = subscribe_since(&mut ws, channel, Some((&epoch, position))).await;
                assert_eq!(ack["recovered"], true, "{source} from {position}: {ack}");
            }
            Some(Ok(_)) => {}
            other => panic!("{source}: the connection broke without a close frame: {other:?}"),
        }
    }
    seen
}

/// Reconnects through nginx, as a client library would after a 1001: retried briefly while the balancer
/// finds a replica that takes it.
async fn reconnect(nginx: &Nginx, source: Ipv4Addr) -> Ws {
    let mut last_error = String::new();
    for _ in 0..50 {
        match try_connect_from(nginx, source).await {
            Ok(ws) => return ws,
            Err(e) => last_error = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{source}: no replica took the reconnect through nginx: {last_error}");
}

#[actix_web::test]
async fn a_replica_stopped_with_sigterm_hands_its_clients_to_the_others_and_nothing_is_lost() {
    let redis = RedisServer::start();
    let config = ConfigFile::new(&format!(
        "[demo]\nenabled = false\n[server]\ndrain_period = \"1500ms\"\nshutdown_timeout = \"6s\"\n\
         trusted_proxies = [\"127.0.0.1\"]\n[channels]\nhistory_size = 1000\n[redis]\nurl = \"{}\"\nrequired = true\n",
        redis.url()
    ));
    let mut replicas: Vec<(Process, String)> = Vec::new();
    for _ in 0..3 {
        replicas.push(start_binary(&config).await);
    }
    for (_, base) in &replicas {
        common::eventually(Duration::from_secs(20), "replica ready", || async {
            get_json(&format!("http://{base}/ready")).await.0 == 200
        })
        .await;
    }
    let addrs: Vec<SocketAddr> = replicas.iter().map(|(_, b)| b.parse().unwrap()).collect();
    let nginx = Nginx::start_fleet(&addrs);

    // A namespace with the default history (more than a reconnect misses here), not `prices`' five.
    let channel = "fleet:c";
    const CLIENTS: u8 = 30;
    const MESSAGES: u64 = 200;
    let (subscribed_tx, mut subscribed_rx) = tokio::sync::mpsc::channel(CLIENTS as usize);
    let clients = futures_util::future::join_all((0..CLIENTS).map(|n| {
        let source = Ipv4Addr::new(127, 0, 0, 2 + n);
        follow(&nginx, source, channel, MESSAGES, subscribed_tx.clone())
    }));
    let run = async {
        for _ in 0..CLIENTS {
            subscribed_rx.recv().await.unwrap();
        }
        // The replica holding the most clients goes; the others publish.
        let mut held = Vec::new();
        for (_, base) in &replicas {
            let (_, stats) = get_json(&format!("http://{base}/api/stats")).await;
            held.push(stats["connections"].as_u64().unwrap());
        }
        assert_eq!(held.iter().sum::<u64>(), u64::from(CLIENTS), "{held:?}");
        let victim = (0..3).max_by_key(|&i| held[i]).unwrap();
        let publisher = &replicas[(victim + 1) % 3].1;
        for i in 1..=MESSAGES {
            let (status, body) = post_json(
                &format!("http://{publisher}/api/publish"),
                &json!({"channel": channel, "data": {"n": i}}),
                &[],
            )
            .await;
            assert_eq!((status, &body["seq"]), (200, &json!(i)), "{body}");
            if i == 50 {
                replicas[victim].0.terminate();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (victim, held[victim])
    };
    let (followed, (victim, victims_clients)) = tokio::join!(clients, run);

    let expected: Vec<u64> = (1..=MESSAGES).collect();
    for (n, seen) in followed.iter().enumerate() {
        assert_eq!(
            seen.seqs, expected,
            "client {n}: every message once, in order"
        );
    }
    let reconnects: usize = followed.iter().map(|f| f.reconnects).sum();
    assert_eq!(
        reconnects as u64, victims_clients,
        "the stopped replica's clients, and only they, came back through the balancer"
    );
    let status = replicas[victim].0.wait(Duration::from_secs(8));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        replicas[victim].0.output()
    );
}

/// Round robin, no sticky routing: every reconnect of an event stream may reach the other replica, and
/// with `Last-Event-ID` it gets exactly what it missed there, events passing nginx as they come.
#[actix_web::test]
async fn an_event_stream_resumes_through_nginx_on_any_replica() {
    let redis = RedisServer::start();
    let toml = format!(
        "[redis]\nurl = \"{}\"\nrequired = true\n[channels]\nhistory_size = 100\n",
        redis.url()
    );
    let a = TestHub::start(&toml).await;
    let b = TestHub::start(&toml).await;
    common::wait_ready(&a).await;
    common::wait_ready(&b).await;
    let nginx = Nginx::start_round_robin(&[a.addr, b.addr]);
    let url = nginx.http("/sse?channel=feed:n");
    let mut id = String::new();
    let mut next = 1u64;
    for round in 0..4 {
        let headers: Vec<(&str, &str)> = if id.is_empty() {
            vec![]
        } else {
            vec![("Last-Event-ID", id.as_str())]
        };
        let mut stream = Stream::open(&url, &headers).await.unwrap();
        stream.subscribed(&["feed:n"]).await;
        // Published while the stream is open (live) and, from round 1, while it was away (replayed).
        for _ in 0..3 {
            let publisher = if next.is_multiple_of(2) { &a } else { &b };
            publisher.publish("feed:n", json!({"n": next})).await;
            next += 1;
        }
        let first = next - 3 - if round == 0 { 0 } else { 2 };
        for seq in first..next {
            let event = stream.event().await;
            assert_eq!(
                event.event.as_deref(),
                Some("message"),
                "round {round}: {event:?}"
            );
            assert_eq!(
                event.data["seq"], seq,
                "round {round}: every message once, in order"
            );
            id = event.id.unwrap();
        }
        drop(stream);
        // Missed by the stream, to be replayed on its reconnect.
        for _ in 0..2 {
            a.publish("feed:n", json!({"n": next})).await;
            next += 1;
        }
    }
    let opened = |stats: Value| stats["sse_streams_opened"].as_u64().unwrap();
    let (on_a, on_b) = (opened(a.stats().await), opened(b.stats().await));
    assert_eq!(on_a + on_b, 4);
    assert!(
        on_a > 0 && on_b > 0,
        "both replicas served the stream: {on_a} and {on_b}"
    );
}
