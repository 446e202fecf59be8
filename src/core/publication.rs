//! One published message, encoded once as the WebSocket frame every subscriber receives.
//! The frame bytes are shared (`Bytes` clones share one buffer), so fan-out copies no JSON and frames nothing
//! per subscriber; the snapshot frame and the REST view are derived from the same bytes.

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use bytestring::ByteString;

use crate::core::frame as wire;
use crate::core::protocol::write_json_str;

const MESSAGE_HEAD: &str = "{\"type\":\"message\",";
const SNAPSHOT_HEAD: &str = "{\"type\":\"snapshot\",";

/// A message on one channel, ready to send.
#[derive(Debug, Clone)]
pub struct Publication {
    /// The concrete channel.
    pub channel: Arc<str>,
    /// Per-channel sequence number; `None` for messages outside producers published raw.
    pub seq: Option<u64>,
    /// The WebSocket text frame carrying `frame`, built once and written as is to every subscriber.
    wire: Bytes,
    /// `{"type":"message","channel":..,"data":..,"seq":..,"ts":..}`: the payload of `wire`, same buffer.
    frame: ByteString,
    /// Where `data` sits inside `frame`.
    data: Range<usize>,
    /// Where the `ts` string (without quotes) sits inside `frame`; empty when there is none.
    ts: Range<usize>,
    /// Where the `fetched_at` string (without quotes) sits inside `frame`: a polled value's fetch time,
    /// carried beside `data` by sources with `meta = true`; empty when there is none.
    fetched_at: Range<usize>,
    /// The `snapshot` frame, built the first time a subscriber needs it and shared by the next ones.
    snapshot: OnceLock<Bytes>,
    /// The `data` JSON alone as a frame, for raw endpoints: built the first time one of their connections
    /// needs it and shared by the next ones, so it too is framed once per publish.
    raw: OnceLock<Bytes>,
}

impl Publication {
    /// Builds the frame. `data` must be valid JSON (callers validate it or received it from relayhub itself).
    pub fn new(channel: Arc<str>, data: &str, seq: Option<u64>, ts: Option<&str>) -> Publication {
        Publication::with_fetched_at(channel, data, seq, ts, None)
    }

    /// `new` with a `fetched_at` (RFC 3339, so nothing in it needs escaping) written beside `data`.
    pub fn with_fetched_at(
        channel: Arc<str>,
        data: &str,
        seq: Option<u64>,
        ts: Option<&str>,
        fetched_at: Option<&str>,
    ) -> Publication {
        let mut out = String::with_capacity(MESSAGE_HEAD.len() + channel.len() + data.len() + 96);
        out.push_str(MESSAGE_HEAD);
        out.push_str("\"channel\":");
        write_json_str(&mut out, &channel);
        out.push_str(",\"data\":");
        let start = out.len();
        out.push_str(data);
        let data_range = start..out.len();
        let fetched_range =
            fetched_at.map_or(0..0, |at| push_plain_field(&mut out, "fetched_at", at));
        if let Some(seq) = seq {
            out.push_str(",\"seq\":");
            out.push_str(itoa_u64(seq).as_str());
        }
        let ts_range = ts.map_or(0..0, |ts| push_plain_field(&mut out, "ts", ts));
        out.push('}');
        let wire = wire::text(&out);
        let frame = ByteString::try_from(wire.slice(wire::header_len(out.len())..))
            .expect("the payload was a String");
        Publication {
            channel,
            seq,
            wire,
            frame,
            data: data_range,
            ts: ts_range,
            fetched_at: fetched_range,
            snapshot: OnceLock::new(),
            raw: OnceLock::new(),
        }
    }

    /// The `message` frame's JSON.
    pub fn frame(&self) -> &str {
        &self.frame
    }

    /// The `message` frame as WebSocket bytes, shared.
    pub fn wire(&self) -> Bytes {
        self.wire.clone()
    }

    /// The `snapshot` frame as WebSocket bytes: the same fields under `"type":"snapshot"`.
    pub fn snapshot_wire(&self) -> Bytes {
        self.snapshot
            .get_or_init(|| {
                wire::text_from_parts(&[SNAPSHOT_HEAD, &self.frame[MESSAGE_HEAD.len()..]])
            })
            .clone()
    }

    /// The `data` JSON alone as WebSocket bytes, shared: what a raw endpoint sends for a message and for a
    /// snapshot alike.
    pub fn raw_wire(&self) -> Bytes {
        self.raw.get_or_init(|| wire::text(self.data())).clone()
    }

    /// The `message` frame, or the raw one for a connection that takes raw frames.
    pub fn wire_for(&self, raw: bool) -> Bytes {
        if raw { self.raw_wire() } else { self.wire() }
    }

    /// The `snapshot` frame, or the raw one for a connection that takes raw frames.
    pub fn snapshot_wire_for(&self, raw: bool) -> Bytes {
        if raw {
            self.raw_wire()
        } else {
            self.snapshot_wire()
        }
    }

    /// The published JSON, unchanged.
    pub fn data(&self) -> &str {
        &self.frame[self.data.clone()]
    }

    /// The publish time, RFC 3339.
    pub fn ts(&self) -> Option<&str> {
        (!self.ts.is_empty()).then(|| &self.frame[self.ts.clone()])
    }

    /// When a polling source fetched the value (sources with `meta = true`), RFC 3339.
    pub fn fetched_at(&self) -> Option<&str> {
        (!self.fetched_at.is_empty()).then(|| &self.frame[self.fetched_at.clone()])
    }

    /// Bytes held by this publication, for memory accounting.
    pub fn size(&self) -> usize {
        self.wire.len() + self.channel.len()
    }

    /// `{"channel","data","seq","ts"}`: the REST view of the latest value.
    pub fn to_rest_json(&self) -> String {
        let mut out = String::with_capacity(self.frame.len());
        out.push_str("{\"channel\":");
        write_json_str(&mut out, &self.channel);
        out.push_str(",\"data\":");
        out.push_str(self.data());
        if let Some(at) = self.fetched_at() {
            out.push_str(",\"fetched_at\":\"");
            out.push_str(at);
            out.push('"');
        }
        out.push_str(",\"seq\":");
        match self.seq {
            Some(seq) => out.push_str(itoa_u64(seq).as_str()),
            None => out.push_str("null"),
        }
        out.push_str(",\"ts\":");
        match self.ts() {
            Some(ts) => {
                out.push('"');
                out.push_str(ts);
                out.push('"');
            }
            None => out.push_str("null"),
        }
        out.push('}');
        out
    }
}

/// Writes `,"name":"value"` and returns where `value` sits. Only for values with nothing to escape:
/// timestamps from chrono or from relayhub's own envelope (checked as RFC 3339 on arrival).
fn push_plain_field(out: &mut String, name: &str, value: &str) -> Range<usize> {
    out.push_str(",\"");
    out.push_str(name);
    out.push_str("\":\"");
    let start = out.len();
    out.push_str(value);
    let range = start..out.len();
    out.push('"');
    range
}

/// Formats an integer without going through `fmt` machinery's allocation.
fn itoa_u64(mut n: u64) -> SmallStr {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    SmallStr { buf, start: i }
}

struct SmallStr {
    buf: [u8; 20],
    start: usize,
}

impl SmallStr {
    fn as_str(&self) -> &str {
        // Only ASCII digits were written.
        std::str::from_utf8(&self.buf[self.start..]).expect("digits are UTF-8")
    }
}

/// What the pattern subscribers' ordering rule reads of a message.
impl crate::core::position::Sequenced for Publication {
    fn channel(&self) -> &Arc<str> {
        &self.channel
    }

    fn seq(&self) -> Option<u64> {
        self.seq
    }

    fn ts(&self) -> Option<&str> {
        Publication::ts(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// The JSON a client reads out of a server text frame.
    fn payload(frame: &Bytes) -> Value {
        let mut buf = bytes::BytesMut::from(&frame[..]);
        let (fin, op, payload) = actix_http::ws::Parser::parse(&mut buf, false, usize::MAX)
            .unwrap()
            .unwrap();
        assert!(fin && op == actix_http::ws::OpCode::Text && buf.is_empty());
        serde_json::from_slice(&payload.unwrap()).unwrap()
    }

    #[test]
    fn fetched_at_sits_beside_data_in_every_view() {
        let at = "2026-01-01T00:00:00.500Z";
        let p = Publication::with_fetched_at(
            "prices:BTC".into(),
            "[1]",
            Some(3),
            Some("2026-01-01T00:00:01.000Z"),
            Some(at),
        );
        let v: Value = serde_json::from_str(p.frame()).unwrap();
        assert_eq!(v, payload(&p.wire()));
        assert_eq!(v["fetched_at"], at);
        assert_eq!(v["data"], json!([1]));
        assert_eq!(p.data(), "[1]");
        assert_eq!(p.fetched_at(), Some(at));
        assert_eq!(payload(&p.snapshot_wire())["fetched_at"], at);
        let r: Value = serde_json::from_str(&p.to_rest_json()).unwrap();
        assert_eq!(r["fetched_at"], at);
        assert_eq!(
            Publication::new("c".into(), "1", None, None).fetched_at(),
            None
        );
    }

    #[test]
    fn frames_are_the_protocol() {
        let p = Publication::new(
            "prices:BTC".into(),
            r#"{"p": 1.5}"#,
            Some(42),
            Some("2026-01-01T00:00:00.000Z"),
        );
        let v: Value = serde_json::from_str(p.frame()).unwrap();
        assert_eq!(v, payload(&p.wire()));
        assert_eq!(
            v,
            json!({"type":"message","channel":"prices:BTC","data":{"p":1.5},"seq":42,"ts":"2026-01-01T00:00:00.000Z"})
        );
        assert_eq!(p.data(), r#"{"p": 1.5}"#);
        assert_eq!(payload(&p.raw_wire()), json!({"p": 1.5}));
        // Framed once: every raw subscriber shares one buffer.
        assert_eq!(p.raw_wire().as_ptr(), p.wire_for(true).as_ptr());
        assert_eq!(p.ts(), Some("2026-01-01T00:00:00.000Z"));
        let s = payload(&p.snapshot_wire());
        assert_eq!(s["type"], "snapshot");
        assert_eq!(s["seq"], 42);
        let r: Value = serde_json::from_str(&p.to_rest_json()).unwrap();
        assert_eq!(
            r,
            json!({"channel":"prices:BTC","data":{"p":1.5},"seq":42,"ts":"2026-01-01T00:00:00.000Z"})
        );
    }

    #[test]
    fn raw_messages_have_no_seq() {
        let p = Publication::new("a".into(), "7", None, None);
        let v = payload(&p.wire());
        assert_eq!(v, json!({"type":"message","channel":"a","data":7}));
        let r: Value = serde_json::from_str(&p.to_rest_json()).unwrap();
        assert_eq!(r, json!({"channel":"a","data":7,"seq":null,"ts":null}));
        assert_eq!(itoa_u64(0).as_str(), "0");
        assert_eq!(itoa_u64(u64::MAX).as_str(), "18446744073709551615");
    }
}
