//! The WebSocket transport at the byte level: a raw TCP client writes exactly the frames a test needs
//! (pipelined, fragmented, unmasked, not UTF-8) against a real hub on port 0, and reads the server's frames as
//! they are on the wire.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::{FRAME_TIMEOUT, TestHub};

const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CONTINUATION: u8 = 0x0;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

fn handshake(addr: SocketAddr, path: &str, key: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// A client frame; `masked = false` breaks the protocol on purpose.
fn client_frame(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        len @ 0..=125 => out.push(mask_bit | len as u8),
        len @ 126..=0xFFFF => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// A raw client past the handshake.
struct Raw {
    tcp: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    /// Sends the handshake followed, in the same write, by `pipelined` bytes, and checks the 101.
    async fn connect(addr: SocketAddr, pipelined: &[u8]) -> Raw {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let mut request = handshake(addr, "/ws", "dGhlIHNhbXBsZSBub25jZQ==").into_bytes();
        request.extend_from_slice(pipelined);
        tcp.write_all(&request).await.unwrap();
        let mut raw = Raw {
            tcp,
            buf: Vec::new(),
        };
        let head = raw.read_head().await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        // RFC 6455's example key and its accept value.
        assert!(
            head.to_ascii_lowercase()
                .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
            "{head}"
        );
        raw
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 65536];
        let n = tokio::time::timeout(FRAME_TIMEOUT, self.tcp.read(&mut chunk))
            .await
            .expect("the server answers in time")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    async fn read_head(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 4);
                return head;
            }
            assert!(
                self.fill().await,
                "connection closed before the response head"
            );
        }
    }

    async fn send(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        self.tcp
            .write_all(&client_frame(fin, opcode, payload, true))
            .await
            .unwrap();
    }

    /// The next server frame, or `None` once the server closed the connection.
    async fn recv(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// The next text frame as JSON, skipping pings.
    async fn recv_json(&mut self) -> Value {
        loop {
            let (opcode, payload) = self.recv().await.expect("a frame");
            match opcode {
                PING => continue,
                TEXT => return serde_json::from_slice(&payload).unwrap(),
                other => panic!("expected text, got opcode {other}: {payload:?}"),
            }
        }
    }

    /// The close code the server sends, skipping other frames, then the server's end of the stream.
    async fn close_code(&mut self) -> u16 {
        loop {
            let (opcode, payload) = self.recv().await.expect("a close frame");
            if opcode == CLOSE {
                assert!(self.recv().await.is_none(), "the server ends the stream");
                return u16::from_be_bytes([payload[0], payload[1]]);
            }
        }
    }
}

/// Server frames are unmasked and, from relayhub, never fragmented.
fn parse_server_frame(b: &[u8]) -> Option<((u8, Vec<u8>), usize)> {
    if b.len() < 2 {
        return None;
    }
    assert_eq!(b[0] & 0x80, 0x80, "server frames are final");
    assert_eq!(b[1] & 0x80, 0, "server frames are not masked");
    let (len, mut at) = match b[1] & 0x7f {
        126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
        127 if b.len() >= 10 => (
            u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
            10,
        ),
        126 | 127 => return None,
        len => (len as usize, 2),
    };
    if b.len() < at + len {
        return None;
    }
    let payload = b[at..at + len].to_vec();
    at += len;
    Some(((b[0] & 0x0f, payload), at))
}

fn subscribe_frame(channel: &str) -> Vec<u8> {
    client_frame(
        true,
        TEXT,
        json!({"op": "subscribe", "channel": channel})
            .to_string()
            .as_bytes(),
        true,
    )
}

#[actix_web::test]
async fn a_frame_sent_right_behind_the_handshake_is_read() {
    let hub = TestHub::start("").await;
    // Handshake and first frame in one TCP write: the frame sits in the HTTP layer's buffer at the upgrade.
    let mut ws = Raw::connect(hub.addr, &subscribe_frame("prices:pipelined")).await;
    let ack = ws.recv_json().await;
    assert_eq!(
        (ack["type"].as_str(), ack["channel"].as_str()),
        (Some("subscribed"), Some("prices:pipelined"))
    );
    hub.publish("prices:pipelined", json!({"p": 1})).await;
    let message = ws.recv_json().await;
    assert_eq!(message["data"], json!({"p": 1}));
}

#[actix_web::test]
async fn control_frames_ping_pong_and_close_are_answered() {
    let hub = TestHub::start("").await;
    let mut ws = Raw::connect(hub.addr, b"").await;
    ws.send(true, PING, b"are you there").await;
    assert_eq!(ws.recv().await, Some((PONG, b"are you there".to_vec())));
    // An unsolicited pong is fine and answered with nothing.
    ws.send(true, PONG, b"").await;
    ws.send(true, CLOSE, &4000u16.to_be_bytes()).await;
    // The server echoes the code (RFC 6455 §5.5.1) and ends the stream.
    assert_eq!(ws.close_code().await, 4000);
}

#[actix_web::test]
async fn fragmented_messages_are_reassembled_with_pings_in_between() {
    let hub = TestHub::start("").await;
    let mut ws = Raw::connect(hub.addr, b"").await;
    let subscribe = json!({"op": "subscribe", "channel": "prices:frag"}).to_string();
    let (first, rest) = subscribe.as_bytes().split_at(10);
    ws.send(false, TEXT, first).await;
    // A control frame may sit between the fragments (RFC 6455 §5.4): it is answered at once.
    ws.send(true, PING, b"mid").await;
    assert_eq!(ws.recv().await, Some((PONG, b"mid".to_vec())));
    ws.send(false, CONTINUATION, &rest[..5]).await;
    ws.send(true, CONTINUATION, &rest[5..]).await;
    let ack = ws.recv_json().await;
    assert_eq!(
        (ack["type"].as_str(), ack["channel"].as_str()),
        (Some("subscribed"), Some("prices:frag"))
    );
    // A character split across fragments is fine: UTF-8 is checked on the whole message.
    let ping = r#"{"op":"ping","id":"é"}"#.as_bytes();
    let cut = ping.iter().position(|&b| b == 0xc3).unwrap() + 1;
    ws.send(false, TEXT, &ping[..cut]).await;
    ws.send(true, CONTINUATION, &ping[cut..]).await;
    let pong = ws.recv_json().await;
    assert_eq!(
        (pong["type"].as_str(), pong["id"].as_str()),
        (Some("pong"), Some("é"))
    );
    // Binary messages, whole or fragmented, get one error each and the connection stays open.
    ws.send(true, BINARY, &[0, 1, 2]).await;
    assert_eq!(ws.recv_json().await["code"], "bad_request");
    ws.send(false, BINARY, &[0, 1]).await;
    ws.send(true, CONTINUATION, &[2]).await;
    assert_eq!(ws.recv_json().await["code"], "bad_request");
    ws.send(true, TEXT, br#"{"op":"ping","id":1}"#).await;
    assert_eq!(ws.recv_json().await["id"], 1);
}

#[actix_web::test]
async fn reassembled_text_that_is_not_utf8_closes_with_1007() {
    let hub = TestHub::start("").await;
    let mut ws = Raw::connect(hub.addr, b"").await;
    ws.send(false, TEXT, b"{\"op\":").await;
    ws.send(true, CONTINUATION, &[0xff, b'}']).await;
    assert_eq!(ws.close_code().await, 1007);
}

#[actix_web::test]
async fn text_that_is_not_utf8_closes_with_1007() {
    let hub = TestHub::start("").await;
    let mut ws = Raw::connect(hub.addr, b"").await;
    ws.send(true, TEXT, &[b'{', 0xff, 0xfe, b'}']).await;
    assert_eq!(ws.close_code().await, 1007);
}

#[actix_web::test]
async fn broken_framing_closes_with_1002() {
    let hub = TestHub::start("").await;
    // A continuation with nothing to continue.
    let mut ws = Raw::connect(hub.addr, b"").await;
    ws.send(true, CONTINUATION, b"orphan").await;
    assert_eq!(ws.close_code().await, 1002);
    // A client frame without a mask.
    let mut ws = Raw::connect(hub.addr, b"").await;
    ws.tcp
        .write_all(&client_frame(true, TEXT, br#"{"op":"ping"}"#, false))
        .await
        .unwrap();
    assert_eq!(ws.close_code().await, 1002);
    // A reserved opcode.
    let mut ws = Raw::connect(hub.addr, b"").await;
    ws.send(true, 0x3, b"").await;
    assert_eq!(ws.close_code().await, 1002);
}

#[actix_web::test]
async fn a_frame_split_across_many_writes_is_reassembled() {
    let hub = TestHub::start("").await;
    let mut ws = Raw::connect(hub.addr, b"").await;
    for byte in subscribe_frame("prices:trickle") {
        ws.tcp.write_all(&[byte]).await.unwrap();
        ws.tcp.flush().await.unwrap();
    }
    assert_eq!(ws.recv_json().await["type"], "subscribed");
}

#[actix_web::test]
async fn large_messages_use_the_long_length_forms() {
    let hub = TestHub::start("[websocket]\nmax_message_bytes = 400000\n").await;
    let mut ws = Raw::connect(hub.addr, &subscribe_frame("prices:big")).await;
    assert_eq!(ws.recv_json().await["type"], "subscribed");
    // 200 bytes (16-bit length) and 300,000 bytes (64-bit length, several socket writes).
    for size in [200, 300_000] {
        let text = "z".repeat(size);
        hub.publish("prices:big", json!({ "text": text })).await;
        let message = ws.recv_json().await;
        assert_eq!(message["data"]["text"].as_str().map(str::len), Some(size));
    }
}

async fn raw_response(addr: SocketAddr, request: &str) -> (u16, Value) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut bytes))
        .await
        .expect("the server answers and closes")
        .unwrap();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[actix_web::test]
async fn refused_upgrades_get_a_json_error() {
    let hub = TestHub::start("[server]\nallowed_origins = [\"https://app.example.com\"]\n").await;
    let addr = hub.addr;
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let (status, body) = raw_response(addr, &handshake(addr, "/elsewhere", key)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, body) = raw_response(addr, &handshake(addr, "/ws", "short")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("bad_request"))
    );
    let old_version = handshake(addr, "/ws", key).replace("Version: 13", "Version: 8");
    let (status, body) = raw_response(addr, &old_version).await;
    assert_eq!(status, 400);
    assert!(body["error"]["message"].as_str().unwrap().contains("13"));
    let foreign = handshake(addr, "/ws", key)
        .replace("\r\n\r\n", "\r\nOrigin: https://evil.example.com\r\n\r\n");
    let (status, body) = raw_response(addr, &foreign).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    // A plain GET of the endpoint reaches the HTTP app, which says what it expects.
    let (status, body) = common::get_json(&hub.http("/ws")).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Upgrade")
    );
    // The server is still fine.
    let mut ws = Raw::connect(addr, &subscribe_frame("prices:after")).await;
    assert_eq!(ws.recv_json().await["type"], "subscribed");
}

#[actix_web::test]
async fn a_client_that_closes_and_half_closes_still_gets_the_close_answer() {
    let hub = TestHub::start("").await;
    let mut ws = Raw::connect(hub.addr, b"").await;
    ws.send(true, CLOSE, &1000u16.to_be_bytes()).await;
    // Close frame, then FIN: the client sends nothing more but still reads.
    ws.tcp.shutdown().await.unwrap();
    assert_eq!(ws.close_code().await, 1000);
}

/// Tests that measure this process's memory, or fill a hub's queues, take turns so they do not skew each
/// other's figures.
static MEMORY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// This process's resident set (the hub runs in-process), in KiB.
fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A raw client whose receive buffer is as small as the kernel allows: once it stops reading, the hub's
/// writes stall quickly.
async fn connect_tiny_window(addr: SocketAddr, pipelined: &[u8]) -> Raw {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(1024).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let mut raw = Raw {
        tcp,
        buf: Vec::new(),
    };
    let mut request = handshake(addr, "/ws", "dGhlIHNhbXBsZSBub25jZQ==").into_bytes();
    request.extend_from_slice(pipelined);
    raw.tcp.write_all(&request).await.unwrap();
    assert!(raw.read_head().await.starts_with("HTTP/1.1 101"));
    raw
}

/// Polls the hub's stats until `done` holds or `within` has passed; returns the last stats.
async fn stats_until(hub: &TestHub, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let stats = hub.stats().await;
        if done(&stats) || tokio::time::Instant::now() >= deadline {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes `size`-byte messages to `channel` until the hub reports a slow-consumer close, at most `max`.
async fn publish_until_slow(hub: &TestHub, channel: &str, size: usize, max: usize) -> usize {
    let text = "s".repeat(size);
    for n in 1..=max {
        hub.publish(channel, json!({ "text": text })).await;
        if hub.stats().await["slow_consumer_disconnects"] == 1 {
            return n;
        }
    }
    max
}

/// After the hub dropped a connection, the client reads whatever was in flight and then the end of the stream
/// (or a reset), never a hang.
async fn read_to_end_or_reset(ws: &mut Raw) {
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        match tokio::time::timeout(FRAME_TIMEOUT, ws.tcp.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
            Err(_) => panic!("the hub still holds the socket"),
        }
    }
}

#[actix_web::test]
async fn a_huge_declared_length_closes_1009_at_once_and_buffers_nothing() {
    let _turn = MEMORY.lock().await;
    let hub = TestHub::start("").await;
    let mut ws = Raw::connect(hub.addr, b"").await;
    let before = vm_rss_kib();
    // A text frame header announcing 2^32 bytes, then 64 MiB of payload streamed behind it.
    let mut header = vec![0x80 | TEXT, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 32).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    let (mut rx, mut tx) = ws.tcp.split();
    let stream = async {
        let chunk = vec![0x5au8; 1 << 20];
        if tx.write_all(&header).await.is_err() {
            return;
        }
        for _ in 0..64 {
            // The hub drops the socket after its close: the write fails, as it should.
            if tx.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    let read_close = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(((opcode, payload), _)) = parse_server_frame(&buf) {
                return (opcode, payload);
            }
            let n = tokio::time::timeout(FRAME_TIMEOUT, rx.read(&mut chunk))
                .await
                .expect("a close frame comes while the client is still sending")
                .unwrap();
            assert!(n > 0, "the stream ended before a close frame");
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    let (_, (opcode, payload)) = tokio::join!(stream, read_close);
    assert_eq!(opcode, CLOSE);
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1009);
    let grown = vm_rss_kib().saturating_sub(before);
    assert!(grown < 16 * 1024, "RSS grew by {grown} KiB");
    read_to_end_or_reset(&mut ws).await;
    let stats = stats_until(&hub, FRAME_TIMEOUT, |s| s["connections"] == 0).await;
    assert_eq!(stats["connections"], 0);
    assert_eq!(stats["frames_too_big"], 1);
}

#[actix_web::test]
async fn after_a_1009_the_rest_of_the_stream_is_not_read_at_line_rate() {
    let hub = TestHub::start("").await;
    let mut ws = Raw::connect(hub.addr, b"").await;
    let mut header = vec![0x80 | TEXT, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 32).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    ws.tcp.write_all(&header).await.unwrap();
    // Keep streaming the announced payload until the hub lets go of the socket. While it lingers for the
    // client's end it reads a little and then nothing: TCP flow control holds the client back, so what it
    // manages to send is bounded by the socket buffers, not by how fast the hub can read and discard.
    let chunk = vec![0x5au8; 1 << 20];
    let mut sent = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while sent < 1 << 30 {
        match tokio::time::timeout_at(deadline, ws.tcp.write_all(&chunk)).await {
            Ok(Ok(())) => sent += chunk.len(),
            Ok(Err(_)) => break, // the hub dropped the socket after its linger
            Err(_) => panic!("the hub still held the socket after 30 s"),
        }
    }
    assert!(
        sent < 64 << 20,
        "the hub read {} MiB of a refused frame while closing",
        sent >> 20
    );
    let stats = stats_until(&hub, FRAME_TIMEOUT, |s| s["connections"] == 0).await;
    assert_eq!(stats["frames_too_big"], 1);
}

#[actix_web::test]
async fn a_fragmented_message_over_the_limit_closes_1009() {
    let hub = TestHub::start("[websocket]\nmax_message_bytes = 1000\n").await;
    // Each fragment is within the limit; their running total is not.
    let mut ws = Raw::connect(hub.addr, b"").await;
    ws.send(false, TEXT, &[b' '; 600]).await;
    ws.send(false, CONTINUATION, &[b' '; 600]).await;
    assert_eq!(ws.close_code().await, 1009);
    // A single frame over the limit, refused on its header alone.
    let mut ws = Raw::connect(hub.addr, b"").await;
    ws.tcp
        .write_all(&client_frame(true, TEXT, &[b' '; 1001], true)[..8])
        .await
        .unwrap();
    assert_eq!(ws.close_code().await, 1009);
    // Exactly the limit is fine.
    let mut ws = Raw::connect(hub.addr, b"").await;
    let mut ping = br#"{"op":"ping","id":7}"#.to_vec();
    ping.resize(1000, b' ');
    ws.send(false, TEXT, &ping[..500]).await;
    ws.send(true, CONTINUATION, &ping[500..]).await;
    assert_eq!(ws.recv_json().await["id"], 7);
}

#[actix_web::test]
async fn control_frame_and_fragment_rules_close_with_1002() {
    let hub = TestHub::start("").await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a ping with FIN=0", client_frame(false, PING, b"", true)),
        (
            "a ping of 126 bytes",
            client_frame(true, PING, &[0; 126], true),
        ),
        (
            "a close of 126 bytes",
            client_frame(true, CLOSE, &[3; 126], true),
        ),
        ("RSV1 set", {
            let mut f = client_frame(true, TEXT, br#"{"op":"ping"}"#, true);
            f[0] |= 0x40;
            f
        }),
        ("RSV3 set on a ping", {
            let mut f = client_frame(true, PING, b"", true);
            f[0] |= 0x10;
            f
        }),
        ("a text frame inside a fragmented message", {
            let mut f = client_frame(false, TEXT, b"{\"op\":", true);
            f.extend(client_frame(true, TEXT, b"\"ping\"}", true));
            f
        }),
        ("a binary frame inside a fragmented message", {
            let mut f = client_frame(false, TEXT, b"{", true);
            f.extend(client_frame(false, BINARY, b"}", true));
            f
        }),
        (
            "a 1-byte close payload",
            client_frame(true, CLOSE, &[3], true),
        ),
    ];
    for (what, bytes) in cases {
        let mut ws = Raw::connect(hub.addr, b"").await;
        ws.tcp.write_all(&bytes).await.unwrap();
        assert_eq!(ws.close_code().await, 1002, "{what}");
    }
    let stats = hub.stats().await;
    assert!(stats["protocol_errors"].as_u64().unwrap() >= 8, "{stats}");
}

#[actix_web::test]
async fn close_codes_are_checked_before_they_are_echoed() {
    let hub = TestHub::start("").await;
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
        let mut ws = Raw::connect(hub.addr, b"").await;
        ws.send(true, CLOSE, &code.to_be_bytes()).await;
        assert_eq!(ws.close_code().await, 1002, "client close code {code}");
    }
    for code in [1000u16, 1001, 1003, 1007, 1011, 1014, 3000, 4999] {
        let mut ws = Raw::connect(hub.addr, b"").await;
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice("bye ✓".as_bytes());
        ws.send(true, CLOSE, &payload).await;
        assert_eq!(ws.close_code().await, code, "client close code {code}");
    }
    // An empty close is answered with 1000; a reason that is not UTF-8 with 1007.
    let mut ws = Raw::connect(hub.addr, b"").await;
    ws.send(true, CLOSE, b"").await;
    assert_eq!(ws.close_code().await, 1000);
    let mut ws = Raw::connect(hub.addr, b"").await;
    ws.send(true, CLOSE, &[0x03, 0xe8, 0xff, 0xfe]).await;
    assert_eq!(ws.close_code().await, 1007);
}

#[actix_web::test]
async fn a_burst_of_pipelined_requests_is_answered_not_closed() {
    let _turn = MEMORY.lock().await;
    // The request rate limit is lifted: what is under test is the queue's backpressure, not the rate limit
    // (which answers, throttles and finally closes a client that keeps 25 times its burst waiting).
    let hub =
        TestHub::start("[websocket]\nrequests_per_second = 1000000\nrequest_burst = 1000000\n")
            .await;
    let mut ws = Raw::connect(hub.addr, b"").await;
    const REQUESTS: usize = 5000;
    let ping = client_frame(true, TEXT, br#"{"op":"ping"}"#, true);
    let burst: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * REQUESTS)
        .collect();
    let (mut rx, mut tx) = ws.tcp.split();
    let write = async { tx.write_all(&burst).await.unwrap() };
    // Every answer counts, whatever its type (a pong, or a rate-limit error where one applies).
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 1 << 16];
        let mut answers = 0;
        while answers < REQUESTS {
            while let Some(((opcode, _), used)) = parse_server_frame(&buf) {
                buf.drain(..used);
                match opcode {
                    TEXT => answers += 1,
                    PING => {}
                    other => panic!("after {answers} answers: opcode {other}"),
                }
            }
            if answers == REQUESTS {
                break;
            }
            let n = tokio::time::timeout(FRAME_TIMEOUT, rx.read(&mut chunk))
                .await
                .expect("answers keep coming")
                .unwrap();
            assert!(n > 0, "closed after {answers} answers");
            buf.extend_from_slice(&chunk[..n]);
        }
        answers
    };
    let ((), answers) = tokio::join!(write, read);
    assert_eq!(answers, REQUESTS);
    let stats = hub.stats().await;
    assert_eq!(
        (&stats["connections"], &stats["slow_consumer_disconnects"]),
        (&json!(1), &json!(0))
    );
}

#[actix_web::test]
async fn a_stuck_reader_is_dropped_after_write_timeout() {
    let _turn = MEMORY.lock().await;
    let hub = TestHub::start(
        "[websocket]\nmailbox_size = 8\nwrite_timeout = \"1s\"\nmax_message_bytes = 300000\n",
    )
    .await;
    let mut ws = connect_tiny_window(hub.addr, &subscribe_frame("prices:stuck")).await;
    assert_eq!(ws.recv_json().await["type"], "subscribed");
    // The client reads nothing more while the hub publishes to it.
    let published = publish_until_slow(&hub, "prices:stuck", 200_000, 400).await;
    assert!(
        published < 400,
        "no slow-consumer close after {published} messages"
    );
    // The close frame cannot be written; the hub gives up on the socket after write_timeout.
    let stats = stats_until(&hub, Duration::from_secs(6), |s| s["connections"] == 0).await;
    assert_eq!(stats["connections"], 0, "{stats}");
    assert_eq!(stats["write_timeouts"], 1);
    assert_eq!(stats["subscriptions"], 0);
    read_to_end_or_reset(&mut ws).await;
}

#[actix_web::test]
async fn a_heartbeat_close_to_a_client_that_stopped_reading_drops_the_socket() {
    let _turn = MEMORY.lock().await;
    let hub = TestHub::start(
        "[websocket]\nheartbeat_interval = \"200ms\"\nclient_timeout = \"500ms\"\nwrite_timeout = \"1s\"\nmax_message_bytes = 300000\nmax_queued_bytes = 100000000\n",
    )
    .await;
    let mut ws = connect_tiny_window(hub.addr, &subscribe_frame("prices:silent")).await;
    assert_eq!(ws.recv_json().await["type"], "subscribed");
    // Enough to fill the socket buffers on both sides, not enough to count as a slow consumer; then the
    // client goes silent, the heartbeat closes it, and that close frame cannot be written.
    let text = "h".repeat(200_000);
    for _ in 0..40 {
        hub.publish("prices:silent", json!({ "text": text })).await;
    }
    let stats = stats_until(&hub, Duration::from_secs(8), |s| s["connections"] == 0).await;
    assert_eq!(stats["connections"], 0, "{stats}");
    assert_eq!(stats["slow_consumer_disconnects"], 0);
    // Aborted: the close frame never reached the socket.
    assert_eq!(stats["write_timeouts"], 1);
    assert_eq!(stats["subscriptions"], 0);
    read_to_end_or_reset(&mut ws).await;
}

#[actix_web::test]
async fn the_queue_is_bounded_in_bytes_as_well_as_frames() {
    let _turn = MEMORY.lock().await;
    let hub = TestHub::start(
        "[websocket]\nmax_message_bytes = 300000\nmax_queued_bytes = 400000\nwrite_timeout = \"1s\"\n",
    )
    .await;
    let mut ws = connect_tiny_window(hub.addr, &subscribe_frame("prices:bytes")).await;
    assert_eq!(ws.recv_json().await["type"], "subscribed");
    // 1,024 frames may queue, but 100 KB messages pass 400 KB long before that.
    let published = publish_until_slow(&hub, "prices:bytes", 100_000, 150).await;
    assert!(
        published < 150,
        "no slow-consumer close after {published} messages"
    );
    let stats = stats_until(&hub, Duration::from_secs(6), |s| s["connections"] == 0).await;
    assert_eq!(stats["connections"], 0, "{stats}");
    read_to_end_or_reset(&mut ws).await;
}

#[actix_web::test]
async fn a_conflating_reader_past_its_bound_still_gets_every_subscribe_answer() {
    let _turn = MEMORY.lock().await;
    const CHANNELS: usize = 100;
    let hub = TestHub::start(
        "[websocket]\nmailbox_size = 32\nmax_queued_bytes = 65536\nwrite_timeout = \"60s\"\n[namespaces.quotes]\nslow_consumer = \"conflate\"\n",
    )
    .await;
    // Every channel holds a 100 KB value: the snapshots alone are 10 MB, far past any socket buffer and the
    // queue's bound.
    let names: Vec<String> = (0..CHANNELS).map(|c| format!("quotes:a{c}")).collect();
    let pad = "v".repeat(100_000);
    for name in &names {
        let data = json!({"pad": pad}).to_string();
        hub.hub().publish(name, &data).await.unwrap();
    }
    // All subscribes arrive at once, before the client reads anything.
    let subscribes: Vec<u8> = names
        .iter()
        .enumerate()
        .flat_map(|(id, name)| {
            let frame = json!({"op": "subscribe", "channel": name, "id": id});
            client_frame(true, TEXT, frame.to_string().as_bytes(), true)
        })
        .collect();
    let mut reader = connect_tiny_window(hub.addr, &subscribes).await;
    let stats = stats_until(&hub, Duration::from_secs(5), |s| {
        s["subscriptions"] == CHANNELS as u64
    })
    .await;
    assert_eq!(stats["subscriptions"], CHANNELS as u64, "{stats}");
    assert_eq!(stats["slow_consumer_disconnects"], 0, "{stats}");
    // It reads: one answer per subscribe (ids in order), and each channel's value.
    let (mut answered, mut values) = (Vec::new(), std::collections::HashSet::new());
    while answered.len() < CHANNELS || values.len() < CHANNELS {
        let frame = reader.recv_json().await;
        match frame["type"].as_str() {
            Some("subscribed") => answered.push(frame["id"].as_u64().expect("an id")),
            Some("snapshot") | Some("message") => {
                values.insert(frame["channel"].as_str().unwrap().to_string());
            }
            _ => panic!("unexpected frame: {frame}"),
        }
    }
    // Answers follow the order the channels' reads finish in, not the order of the requests.
    answered.sort_unstable();
    assert_eq!(answered, (0..CHANNELS as u64).collect::<Vec<_>>());
    let stats = hub.stats().await;
    assert_eq!(stats["slow_consumer_disconnects"], 0, "{stats}");
    assert!(stats["replies_refused"].as_u64() > Some(0), "{stats}");
}

#[actix_web::test]
async fn a_conflating_reader_that_stops_reading_is_kept_bounded_and_gets_the_newest_values() {
    let _turn = MEMORY.lock().await;
    const CHANNELS: usize = 20;
    const ROUNDS: usize = 150;
    let hub = TestHub::start(
        "[websocket]\nmailbox_size = 32\nmax_queued_bytes = 65536\nwrite_timeout = \"60s\"\n[namespaces.quotes]\nslow_consumer = \"conflate\"\n",
    )
    .await;
    let names: Vec<String> = (0..CHANNELS).map(|c| format!("quotes:q{c}")).collect();
    let subscribes: Vec<u8> = names.iter().flat_map(|n| subscribe_frame(n)).collect();
    let mut reader = connect_tiny_window(hub.addr, &subscribes).await;
    for _ in 0..CHANNELS {
        assert_eq!(reader.recv_json().await["type"], "subscribed");
    }
    // Beside it, a reader of a disconnecting namespace that stops reading too.
    let mut stuck = connect_tiny_window(hub.addr, &subscribe_frame("feed:stuck")).await;
    assert_eq!(stuck.recv_json().await["type"], "subscribed");
    let before = vm_rss_kib();
    // 20 KB values: 150 rounds over 20 channels are 60 MB, far past any socket buffer and queue bound.
    let handle = hub.hub().clone();
    let pad = "v".repeat(20_000);
    for round in 0..ROUNDS {
        for name in &names {
            let data = json!({"round": round, "pad": pad}).to_string();
            handle.publish(name, &data).await.unwrap();
        }
        let data = json!({"round": round, "pad": pad}).to_string();
        handle.publish("feed:stuck", &data).await.unwrap();
    }
    let grown_mib = vm_rss_kib().saturating_sub(before) / 1024;
    assert!(grown_mib < 30, "the hub grew by {grown_mib} MiB");
    let stats = stats_until(&hub, Duration::from_secs(5), |s| {
        s["slow_consumer_disconnects"] == 1
    })
    .await;
    assert_eq!(stats["slow_consumer_disconnects"], 1, "{stats}");
    // The disconnecting reader lost its subscription; the conflating one keeps all of its own.
    assert_eq!(
        stats["subscribers"]["feed:stuck"].as_u64().unwrap_or(0),
        0,
        "{stats}"
    );
    for name in &names {
        assert_eq!(stats["subscribers"][name], 1, "{stats}");
    }
    assert!(stats["messages_conflated"].as_u64() > Some(0), "{stats}");
    // It reads again: every channel's newest value arrives, each channel's seq only goes up, and jumps.
    let mut newest: std::collections::HashMap<String, (u64, u64)> = Default::default();
    let mut jumped = false;
    while newest.len() < CHANNELS || newest.values().any(|(_, r)| *r != ROUNDS as u64 - 1) {
        let frame = reader.recv_json().await;
        assert_eq!(frame["type"], "message", "{}", frame["type"]);
        let channel = frame["channel"].as_str().unwrap().to_string();
        let (seq, round) = (
            frame["seq"].as_u64().unwrap(),
            frame["data"]["round"].as_u64().unwrap(),
        );
        if let Some((last, _)) = newest.get(&channel) {
            assert!(seq > *last, "{channel}: {seq} after {last}");
            jumped |= seq > last + 1;
        }
        newest.insert(channel, (seq, round));
    }
    assert!(jumped, "conflation shows in seq");
    // Caught up and still answering.
    reader
        .send(
            true,
            TEXT,
            json!({"op": "ping", "id": "p"}).to_string().as_bytes(),
        )
        .await;
    assert_eq!(reader.recv_json().await["type"], "pong");
    read_to_end_or_reset(&mut stuck).await;
}

#[actix_web::test]
async fn with_a_write_delay_frames_close_together_leave_in_one_write() {
    for (delay, batched) in [("500ms", true), ("0s", false)] {
        let hub = TestHub::start(&format!("[websocket]\nwrite_delay = \"{delay}\"\n")).await;
        let mut ws = Raw::connect(hub.addr, &subscribe_frame("prices:batch")).await;
        assert_eq!(ws.recv_json().await["type"], "subscribed");
        assert!(ws.buf.is_empty());
        let publish = async {
            for i in 0..5 {
                hub.publish("prices:batch", json!(i)).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        // Count the reads the five messages take while they are published: one write arrives in one read.
        let read = async {
            let (mut reads, mut messages) = (0, 0);
            while messages < 5 {
                assert!(ws.fill().await, "the hub closed the connection");
                reads += 1;
                while let Some(((opcode, _), used)) = parse_server_frame(&ws.buf) {
                    ws.buf.drain(..used);
                    messages += usize::from(opcode == TEXT);
                }
            }
            reads
        };
        let ((), reads) = tokio::join!(publish, read);
        if batched {
            assert_eq!(reads, 1, "write_delay {delay}: the batch left in one write");
        } else {
            assert!(
                reads >= 2,
                "without a write delay each message goes out at once"
            );
        }
    }
}
