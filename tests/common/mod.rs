//! Shared test harness: a real hub started in-process on port 0, a private `redis-server` on a free port
//! (killable and restartable), real WebSocket and HTTP clients. Nothing here fakes Redis or the network.
#![allow(dead_code)]

pub mod cluster;
pub mod nginx;
pub mod process;
pub mod sse;
pub mod upstream;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use relayhub::config::Config;

/// How long a test waits for a frame it expects before failing.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

pub fn init_logging() {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .is_test(true)
        .try_init();
}

/// A config for tests: the embedded defaults without the demo, then the given TOML, on loopback port 0 with
/// the repository's web root.
pub fn test_config(toml: &str) -> Config {
    let toml = format!("[demo]\nenabled = false\n{toml}");
    let mut config =
        Config::from_toml_over_defaults(&toml).unwrap_or_else(|e| panic!("test config: {e}"));
    config.server.host = "127.0.0.1".into();
    config.server.port = 0;
    if config.server.workers == 0 {
        config.server.workers = 2;
    }
    config.server.web_root = format!("{}/web", env!("CARGO_MANIFEST_DIR"));
    // Tests stop hubs often: short graceful stops, closes at once, unless a test asks for its own.
    let defaults = relayhub::config::ServerConfig::default();
    if config.server.shutdown_timeout == defaults.shutdown_timeout {
        config.server.shutdown_timeout = Duration::from_secs(3);
    }
    if config.server.drain_period == defaults.drain_period {
        config.server.drain_period = Duration::ZERO;
    }
    config
        .validate()
        .unwrap_or_else(|e| panic!("test config: {e}"));
    config
}

/// A hub running in this process.
pub struct TestHub {
    pub running: Option<relayhub::Running>,
    pub addr: SocketAddr,
}

impl TestHub {
    pub async fn start(toml: &str) -> TestHub {
        Self::start_with(test_config(toml)).await
    }

    pub async fn start_with(config: Config) -> TestHub {
        init_logging();
        let running = relayhub::start(config).await.expect("hub starts");
        TestHub {
            addr: running.addr,
            running: Some(running),
        }
    }

    pub fn hub(&self) -> &relayhub::hub::Hub {
        &self.running.as_ref().expect("hub is running").hub
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub async fn connect(&self) -> Ws {
        Ws::connect(&self.ws_url()).await
    }

    pub async fn shutdown(&mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }

    pub async fn kill(&mut self) {
        if let Some(running) = self.running.take() {
            running.kill().await;
        }
    }

    /// Publishes through the HTTP API and returns the response body.
    pub async fn publish(&self, channel: &str, data: Value) -> Value {
        let (status, body) = post_json(
            &self.http("/api/publish"),
            &serde_json::json!({"channel": channel, "data": data}),
            &[],
        )
        .await;
        assert_eq!(status, 200, "publish failed: {body}");
        body
    }

    pub async fn stats(&self) -> Value {
        get_json(&self.http("/api/stats")).await.1
    }
}

/// A WebSocket client speaking the hub's protocol.
pub struct Ws {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Ws {
    pub async fn connect(url: &str) -> Ws {
        let (stream, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connects");
        Ws { stream }
    }

    /// Connects with an `Origin` header; the handshake error (e.g. 403) is returned as is.
    pub async fn connect_with_origin(url: &str, origin: &str) -> Result<Ws, tungstenite::Error> {
        let mut request = url.into_client_request()?;
        request
            .headers_mut()
            .insert("Origin", origin.parse().expect("valid header"));
        let (stream, _) = tokio_tungstenite::connect_async(request).await?;
        Ok(Ws { stream })
    }

    pub async fn send(&mut self, value: Value) {
        self.send_text(&value.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.stream.send(Message::text(text)).await.expect("send");
    }

    /// The next text frame as JSON; panics on timeout or close.
    pub async fn recv(&mut self) -> Value {
        let deadline = Instant::now() + FRAME_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let next = tokio::time::timeout(left, self.stream.next())
                .await
                .expect("timed out waiting for a frame");
            match next {
                Some(Ok(Message::Text(text))) => {
                    return serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("frame is not JSON ({e}): {text}"));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Waits for a frame of the given type, failing on any other.
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        let frame = self.recv().await;
        assert_eq!(frame["type"], kind, "unexpected frame: {frame}");
        frame
    }

    /// Subscribes and waits for the acknowledgement.
    pub async fn subscribe(&mut self, channel: &str) {
        self.send(serde_json::json!({"op": "subscribe", "channel": channel}))
            .await;
        let ack = self.recv_type("subscribed").await;
        assert_eq!(ack["channel"], channel);
    }

    /// Round trip proving the connection is open and answering.
    pub async fn ping(&mut self) {
        self.send(serde_json::json!({"op": "ping", "id": "alive"}))
            .await;
        let pong = self.recv_type("pong").await;
        assert_eq!(pong["id"], "alive");
    }

    /// Reads until the server closes; returns the close frame (skipping any frames before it).
    pub async fn expect_close(&mut self) -> Option<CloseFrame> {
        let deadline = Instant::now() + FRAME_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.stream.next())
                .await
                .expect("timed out waiting for close")
            {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.stream.close(None).await;
    }
}

pub async fn close_code(ws: &mut Ws) -> u16 {
    let frame = ws.expect_close().await.expect("a close frame with a code");
    u16::from(frame.code)
}

fn http_client() -> awc::Client {
    awc::Client::builder()
        .timeout(Duration::from_secs(10))
        .finish()
}

pub async fn get_json(url: &str) -> (u16, Value) {
    let mut response = http_client().get(url).send().await.expect("GET");
    let body = response.body().limit(16 << 20).await.expect("body");
    (
        response.status().as_u16(),
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

pub async fn post_json(url: &str, body: &Value, headers: &[(&str, &str)]) -> (u16, Value) {
    post_raw(url, body.to_string().into_bytes(), headers).await
}

pub async fn post_raw(url: &str, body: Vec<u8>, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut request = http_client().post(url).content_type("application/json");
    for (k, v) in headers {
        request = request.insert_header((*k, *v));
    }
    let mut response = request.send_body(body).await.expect("POST");
    let body = response.body().limit(16 << 20).await.expect("body");
    (
        response.status().as_u16(),
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

/// Waits until `check` holds, polling; fails with `what` after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A private `redis-server` on a free loopback port, stopped on drop. Never the shared one on 6379.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
}

fn redis_server_binary() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join("redis-server"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("redis-server is not on PATH: install it (Debian: apt-get install redis-server) or run scripts/test.sh, which does")
        })
}

/// A Redis integer reply (`:42\r\n`) as a number.
pub fn int_reply(reply: &str) -> i64 {
    reply
        .trim()
        .trim_start_matches(':')
        .parse()
        .unwrap_or_else(|_| panic!("not an integer reply: {reply:?}"))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("relayhub-test-redis-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut server = RedisServer {
            port,
            child: None,
            dir,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new(redis_server_binary())
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.cmd(&["PING"]).is_ok_and(|r| r.contains("PONG")) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL): a crash, not a shutdown.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Runs one command with a minimal RESP client and returns the reply rendered as text.
    pub fn cmd(&self, args: &[&str]) -> std::io::Result<String> {
        redis_command(self.port, args)
    }

    /// An async Redis connection from the `redis` crate, for producers in tests.
    pub async fn client(&self) -> deadpool_redis::redis::aio::MultiplexedConnection {
        deadpool_redis::redis::Client::open(self.url())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("redis connection")
    }
}

/// One command to the Redis on `port` with a minimal RESP client, the reply rendered as text (small test
/// commands only: it reads until the reply looks complete).
pub fn redis_command(port: u16, args: &[&str]) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut request = format!("*{}\r\n", args.len());
    for a in args {
        request.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    stream.write_all(request.as_bytes())?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
        if reply.ends_with(b"\r\n") && resp_complete(&reply) {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

/// Whether `reply` holds one complete RESP value.
fn resp_complete(reply: &[u8]) -> bool {
    fn parse(b: &[u8], i: &mut usize) -> Option<()> {
        let line_end = b[*i..].windows(2).position(|w| w == b"\r\n")? + *i;
        let kind = b[*i];
        let head = std::str::from_utf8(&b[*i + 1..line_end]).ok()?;
        *i = line_end + 2;
        match kind {
            b'$' => {
                let n: i64 = head.parse().ok()?;
                if n >= 0 {
                    *i += n as usize + 2;
                    if *i > b.len() {
                        return None;
                    }
                }
                Some(())
            }
            b'*' => {
                let n: i64 = head.parse().ok()?;
                for _ in 0..n.max(0) {
                    parse(b, i)?;
                }
                Some(())
            }
            _ => Some(()),
        }
    }
    let mut i = 0;
    parse(reply, &mut i).is_some() && i <= reply.len()
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One HTTP exchange with everything a test may look at: status, headers and the raw body.
pub struct Reply {
    pub status: u16,
    /// Header names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    /// The first value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Any request (`GET`, `OPTIONS`, `POST` ...) with extra headers and an optional body.
pub async fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Reply {
    let method = awc::http::Method::from_bytes(method.as_bytes()).expect("an HTTP method");
    let mut request = http_client().request(method, url);
    for (k, v) in headers {
        request = request.insert_header((*k, *v));
    }
    let mut response = match body {
        Some(body) => request.send_body(body).await,
        None => request.send().await,
    }
    .unwrap_or_else(|e| panic!("{url}: {e}"));
    let body = response
        .body()
        .limit(16 << 20)
        .await
        .expect("body")
        .to_vec();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                v.to_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    Reply {
        status: response.status().as_u16(),
        headers,
        body,
    }
}

/// Waits until the hub answers `/ready` with 200 (in Redis mode: its pub/sub connection is live).
pub async fn wait_ready(hub: &TestHub) {
    let url = hub.http("/ready");
    eventually(
        Duration::from_secs(30),
        &format!("{url} answers 200, nothing degraded"),
        || async {
            let (status, body) = get_json(&url).await;
            status == 200 && body["degraded"].is_null()
        },
    )
    .await;
}

/// Waits until `/api/stats` of `hub` counts `expected` subscribers of `channel`.
pub async fn wait_subscribers(hub: &TestHub, channel: &str, expected: u64) {
    eventually(
        Duration::from_secs(20),
        &format!("{} counts {expected} subscribers of {channel}", hub.addr),
        || async {
            hub.stats().await["subscribers"][channel]
                .as_u64()
                .unwrap_or(0)
                == expected
        },
    )
    .await;
}
