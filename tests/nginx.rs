//! The hub behind a real nginx on loopback: what the proxy changes must not open the admin API or merge every
//! client into the proxy's one address.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde_json::Value;
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};

use common::nginx::Nginx;
use common::{TestHub, Ws, request};

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
