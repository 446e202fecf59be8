//! `--serve-reference ADDR:PORT`: a deliberately plain relay that speaks the part of relayhub's wire protocol
//! the bench uses, so `scripts/bench.sh ref-*` can run the same scenarios against it and give relayhub's figures
//! a baseline measured on the same machine. It is a reference for comparison, not relayhub, and not for use.
//!
//! It is written the way a typical small tokio relay is: one current-thread runtime, one listener, a task per
//! HTTP connection, a reader task and a writer task per WebSocket, a `Rc<RefCell<HashMap>>` of channel →
//! subscribers, and an unbounded channel per WebSocket whose writer does one `sink.send` per message. A publish
//! builds its frame once and hands every subscriber a clone of the same `Message::Text`; nothing is batched or
//! pre-encoded beyond that. Like relayhub, it turns `TCP_NODELAY` on, so neither side waits for Nagle.
//!
//! Protocol:
//! - `GET /ws` upgrades to a WebSocket (tokio-tungstenite); the client sends
//!   `{"op":"subscribe","channel":C,"id":X}` and gets `{"type":"subscribed","channel":C,"id":X}` (`id` only if
//!   sent). Other ops are ignored.
//! - `POST /api/publish` with the JSON body `{"channel":C,"data":D}` (HTTP/1.1, keep-alive, pipelining allowed)
//!   sends `{"type":"message","channel":C,"data":D}` to every subscriber of C, `D` copied verbatim, and answers
//!   `200 {"ok":true}`.
//! - With `--reference-redis URL`: `PUBLISH <prefix>ch:C D` on that Redis does the same, through one
//!   PSUBSCRIBE connection driven on the relay's one thread (what relayhub does with raw publishes, minus
//!   everything relayhub adds: no sequencing, no latest value, no stats).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};
use tokio::task::{LocalSet, spawn_local};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;

/// Channel name → the subscribed connections (connection id, that connection's outgoing queue).
type Registry = Rc<RefCell<HashMap<String, Vec<(u64, UnboundedSender<Message>)>>>>;

/// Largest HTTP request head, and largest body, accepted.
const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 1024 * 1024;

/// What `--serve-reference` serves.
pub struct Options {
    pub addr: String,
    /// Also relay what is published on this Redis.
    pub redis: Option<RedisInput>,
}

/// A Redis whose publishes the relay delivers.
pub struct RedisInput {
    pub url: String,
    /// `<prefix>ch:*`: the channel is what follows the `*`.
    pub pattern: String,
}

/// Serves on `options.addr` until SIGTERM or SIGINT.
pub fn serve(options: &Options) -> Result<(), String> {
    let addr = options.addr.as_str();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| format!("building the runtime: {error}"))?;
    LocalSet::new().block_on(&runtime, async {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|error| format!("binding {addr}: {error}"))?;
        let mut term = signal(SignalKind::terminate()).map_err(|error| error.to_string())?;
        let mut int = signal(SignalKind::interrupt()).map_err(|error| error.to_string())?;
        log::info!("reference relay listening on {addr} (single thread)");
        let registry = Registry::default();
        let redis = async {
            match &options.redis {
                Some(input) => redis_input(input, &registry).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = accept_loop(listener, registry.clone()) => {}
            result = redis => return result,
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        log::info!("reference relay stopping");
        Ok(())
    })
}

async fn accept_loop(listener: TcpListener, registry: Registry) {
    let mut next_id = 0u64;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                next_id += 1;
                spawn_local(connection(stream, next_id, registry.clone()));
            }
            Err(error) => {
                // Out of descriptors, usually: wait a little rather than spin.
                log::warn!("accept: {error}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Tells a WebSocket upgrade (`GET`) from an HTTP publish by the first byte, without consuming it.
async fn connection(stream: TcpStream, id: u64, registry: Registry) {
    let _ = stream.set_nodelay(true);
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        Ok(1) if first[0] == b'G' => websocket(stream, id, registry).await,
        Ok(1) => {
            if let Err(error) = http(stream, &registry).await {
                log::debug!("HTTP connection {id}: {error}");
            }
        }
        _ => {} // closed before sending anything (a port probe)
    }
}

// --- WebSocket ---------------------------------------------------------------------------------------------

/// What a client sends; only `subscribe` is acted on.
#[derive(Deserialize)]
struct ClientOp {
    op: String,
    channel: Option<String>,
    id: Option<serde_json::Value>,
}

async fn websocket(stream: TcpStream, id: u64, registry: Registry) {
    // The error type is tungstenite's handshake callback's; its size is not ours to choose.
    #[allow(clippy::result_large_err)]
    let only_ws = |request: &Request, response: Response| {
        if request.uri().path() == "/ws" {
            Ok(response)
        } else {
            let mut refusal = ErrorResponse::new(Some("not found".into()));
            *refusal.status_mut() = StatusCode::NOT_FOUND;
            Err(refusal)
        }
    };
    let ws = match tokio_tungstenite::accept_hdr_async(stream, only_ws).await {
        Ok(ws) => ws,
        Err(error) => return log::debug!("WebSocket handshake {id}: {error}"),
    };
    let (mut sink, mut frames) = ws.split();
    let (tx, mut rx) = unbounded_channel::<Message>();

    let writer = spawn_local(async move {
        while let Some(message) = rx.recv().await {
            if sink.send(message).await.is_err() {
                break;
            }
        }
    });

    // Reader: runs until the client closes (tungstenite answers a close frame on the next read) or fails.
    let mut channels: Vec<String> = Vec::new();
    while let Some(Ok(message)) = frames.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        let Ok(ClientOp {
            op,
            channel: Some(channel),
            id: request_id,
        }) = serde_json::from_str::<ClientOp>(&text)
        else {
            continue;
        };
        if op != "subscribe" {
            continue;
        }
        if !channels.contains(&channel) {
            registry
                .borrow_mut()
                .entry(channel.clone())
                .or_default()
                .push((id, tx.clone()));
            channels.push(channel.clone());
        }
        let mut ack = serde_json::json!({ "type": "subscribed", "channel": channel });
        if let Some(request_id) = request_id {
            ack["id"] = request_id;
        }
        let _ = tx.send(Message::text(ack.to_string()));
    }

    // Gone: drop this connection's subscriptions; with the last sender gone the writer ends too.
    {
        let mut registry = registry.borrow_mut();
        for channel in channels {
            if let Some(subscribers) = registry.get_mut(&channel) {
                subscribers.retain(|(conn, _)| *conn != id);
                if subscribers.is_empty() {
                    registry.remove(&channel);
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

// --- HTTP --------------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct Publish {
    channel: String,
    data: Box<RawValue>,
}

/// One keep-alive HTTP/1.1 connection: answers every complete request in the buffer (pipelining), then reads.
async fn http(mut stream: TcpStream, registry: &Registry) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(8 * 1024);
    let mut out: Vec<u8> = Vec::new();
    loop {
        let mut used = 0;
        let mut close = false;
        while let Some(end) = find(&buf[used..], b"\r\n\r\n") {
            let head_len = end + 4;
            let Some(head) = Head::parse(&buf[used..used + end]) else {
                respond(
                    &mut out,
                    "400 Bad Request",
                    r#"{"ok":false,"error":"bad request"}"#,
                    true,
                );
                close = true;
                break;
            };
            if head.chunked || head.length > MAX_BODY {
                let error = r#"{"ok":false,"error":"body must have a Content-Length up to 1 MiB"}"#;
                respond(&mut out, "413 Content Too Large", error, true);
                close = true;
                break;
            }
            if buf.len() - used < head_len + head.length {
                break; // the body has not all arrived
            }
            let body = &buf[used + head_len..used + head_len + head.length];
            used += head_len + head.length;
            close = head.close;
            if head.method != "POST" || head.path != "/api/publish" {
                respond(
                    &mut out,
                    "404 Not Found",
                    r#"{"ok":false,"error":"not found"}"#,
                    close,
                );
            } else if publish(registry, body) {
                respond(&mut out, "200 OK", r#"{"ok":true}"#, close);
            } else {
                let error = r#"{"ok":false,"error":"expected {\"channel\":...,\"data\":...}"}"#;
                respond(&mut out, "400 Bad Request", error, close);
            }
            if close {
                break;
            }
        }
        buf.drain(..used);
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        if close {
            return Ok(());
        }
        if buf.len() > MAX_HEAD && find(&buf, b"\r\n\r\n").is_none() {
            let error = r#"{"ok":false,"error":"request head too large"}"#;
            respond(&mut out, "431 Request Header Fields Too Large", error, true);
            return stream.write_all(&out).await;
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}

/// Sends one publish to the channel's subscribers; false if the body is not a publish.
fn publish(registry: &Registry, body: &[u8]) -> bool {
    let Ok(request) = serde_json::from_slice::<Publish>(body) else {
        return false;
    };
    relay(registry, &request.channel, request.data.get());
    true
}

/// Sends `data` (JSON text, copied verbatim) to the subscribers of `channel`.
fn relay(registry: &Registry, channel: &str, data: &str) {
    let registry = registry.borrow();
    let Some(subscribers) = registry.get(channel) else {
        return;
    };
    // The channel name re-encoded as a JSON string; serializing a string cannot fail.
    let channel = serde_json::to_string(channel).expect("a string serializes");
    let frame = Message::text(format!(
        r#"{{"type":"message","channel":{channel},"data":{data}}}"#
    ));
    for (_, tx) in subscribers {
        let _ = tx.send(frame.clone());
    }
}

// --- Redis -------------------------------------------------------------------------------------------------

/// Relays every message published on `input.pattern` until the connection fails (an error: the run is void).
async fn redis_input(input: &RedisInput, registry: &Registry) -> Result<(), String> {
    let client = redis::Client::open(input.url.as_str())
        .map_err(|error| format!("--reference-redis {}: {error}", input.url))?;
    let mut pubsub = client
        .get_async_pubsub()
        .await
        .map_err(|error| format!("connecting to Redis at {}: {error}", input.url))?;
    pubsub
        .psubscribe(&input.pattern)
        .await
        .map_err(|error| format!("PSUBSCRIBE {}: {error}", input.pattern))?;
    let skip = input.pattern.len() - 1;
    let mut messages = pubsub.on_message();
    while let Some(message) = messages.next().await {
        let (Some(channel), Ok(data)) = (
            message.get_channel_name().get(skip..),
            std::str::from_utf8(message.get_payload_bytes()),
        ) else {
            continue;
        };
        relay(registry, channel, data);
    }
    Err(format!("the pub/sub connection to {} ended", input.url))
}

/// The parts of a request head the relay looks at.
struct Head<'a> {
    method: &'a str,
    path: &'a str,
    length: usize,
    chunked: bool,
    close: bool,
}

impl<'a> Head<'a> {
    /// Parses the head (request line and headers, without the blank line); `None` if malformed.
    fn parse(head: &'a [u8]) -> Option<Head<'a>> {
        let mut lines = std::str::from_utf8(head).ok()?.split("\r\n");
        let mut request_line = lines.next()?.split(' ');
        let (method, path) = (request_line.next()?, request_line.next()?);
        let mut parsed = Head {
            method,
            path,
            length: 0,
            chunked: false,
            close: false,
        };
        for line in lines {
            let (name, value) = line.split_once(':')?;
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                parsed.length = value.parse().ok()?;
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                parsed.chunked = true;
            } else if name.eq_ignore_ascii_case("connection") {
                parsed.close = value.eq_ignore_ascii_case("close");
            }
        }
        Some(parsed)
    }
}

fn respond(out: &mut Vec<u8>, status: &str, body: &str, close: bool) {
    let connection = if close { "Connection: close\r\n" } else { "" };
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{connection}\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_case_insensitively() {
        let head = Head::parse(
            b"POST /api/publish HTTP/1.1\r\nHost: x\r\ncontent-length: 12\r\nConnection: Close",
        )
        .expect("a valid head");
        assert_eq!((head.method, head.path), ("POST", "/api/publish"));
        assert_eq!((head.length, head.chunked, head.close), (12, false, true));
        assert!(Head::parse(b"POST /api/publish HTTP/1.1\r\nContent-Length: many").is_none());
    }

    /// Two pipelined publishes in one write get two answers, and the subscriber gets both frames, `data` verbatim.
    #[test]
    fn pipelined_publishes_reach_subscribers() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        LocalSet::new().block_on(&runtime, async {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("address");
            spawn_local(accept_loop(listener, Registry::default()));

            let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
                .await
                .expect("WebSocket");
            ws.send(Message::text(r#"{"op":"subscribe","channel":"c:1","id":7}"#))
                .await
                .expect("subscribe");
            let ack = ws.next().await.expect("ack").expect("ack frame");
            assert_eq!(
                serde_json::from_str::<serde_json::Value>(ack.to_text().expect("text"))
                    .expect("JSON"),
                serde_json::json!({"type":"subscribed","channel":"c:1","id":7})
            );

            let mut http = TcpStream::connect(addr).await.expect("HTTP");
            let mut requests = String::new();
            for n in 0..2 {
                let body = format!(r#"{{"channel":"c:1","data":{{"t":1, "n":{n}}}}}"#);
                requests.push_str(&format!(
                    "POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                ));
            }
            http.write_all(requests.as_bytes()).await.expect("write");
            let answer = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}";
            let mut answers = vec![0; 2 * answer.len()];
            http.read_exact(&mut answers).await.expect("two answers");
            assert_eq!(answers, answer.repeat(2).as_bytes());

            for n in 0..2 {
                let frame = ws.next().await.expect("frame").expect("frame");
                assert_eq!(
                    frame.to_text().expect("text"),
                    format!(r#"{{"type":"message","channel":"c:1","data":{{"t":1, "n":{n}}}}}"#)
                );
            }
        });
    }
}
