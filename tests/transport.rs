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
async fn fragmented_messages_get_one_error_and_the_connection_survives() {
    let hub = TestHub::start("").await;
    let mut ws = Raw::connect(hub.addr, b"").await;
    let subscribe = json!({"op": "subscribe", "channel": "prices:frag"}).to_string();
    let (first, rest) = subscribe.as_bytes().split_at(10);
    ws.send(false, TEXT, first).await;
    ws.send(false, CONTINUATION, &rest[..5]).await;
    ws.send(true, CONTINUATION, &rest[5..]).await;
    let error = ws.recv_json().await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["code"], "bad_request");
    assert!(error["message"].as_str().unwrap().contains("fragmented"));
    // One error for the whole message, nothing subscribed, and the next frame works.
    ws.send(true, TEXT, br#"{"op":"ping","id":1}"#).await;
    let pong = ws.recv_json().await;
    assert_eq!(
        (pong["type"].as_str(), pong["id"].as_i64()),
        (Some("pong"), Some(1))
    );
    ws.send(true, BINARY, &[0, 1, 2]).await;
    assert_eq!(ws.recv_json().await["code"], "bad_request");
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
