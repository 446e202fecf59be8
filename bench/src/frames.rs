//! The hub's server-to-client frames, read as cheaply as possible: receivers only need the frame type and,
//! for messages, the publish time `t` and number `n` carried in `data`. Used by `connections`.
//!
//! The fast path scans for the keys the hub writes (`"type":"…"`, then `"t":` and `"n":` after `"data":`);
//! anything it cannot read that way goes through `serde_json`, so a change of key order or spacing on the hub
//! costs speed, never correctness.

use serde_json::Value;

/// What a received text frame means to the bench.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A published bench payload: publish time (unix nanoseconds) and publish number.
    Message { t: u64, n: u64 },
    /// A `message` whose data is not a bench payload (another publisher on the same channel).
    Foreign,
    /// The acknowledgement of a subscribe.
    Subscribed,
    /// An error frame; the text is `code: message`.
    Error(String),
    /// Anything else (snapshots, unknown types): ignored.
    Other,
}

/// Reads one text frame.
pub fn parse(text: &str) -> Frame {
    match fast_type(text) {
        Some("message") => {
            fast_payload(text).map_or_else(|| slow(text), |(t, n)| Frame::Message { t, n })
        }
        Some("subscribed") => Frame::Subscribed,
        Some("error") | None => slow(text),
        Some(_) => Frame::Other,
    }
}

/// The value of `"type":"…"` when written without spaces.
fn fast_type(text: &str) -> Option<&str> {
    const KEY: &str = "\"type\":\"";
    let start = text.find(KEY)? + KEY.len();
    let len = text[start..].find('"')?;
    Some(&text[start..start + len])
}

/// `t` and `n` from the object after `"data":`, when written without spaces.
fn fast_payload(text: &str) -> Option<(u64, u64)> {
    let data = &text[text.find("\"data\":{")? + "\"data\":".len()..];
    Some((
        integer_after(data, "\"t\":")?,
        integer_after(data, "\"n\":")?,
    ))
}

fn integer_after(text: &str, key: &str) -> Option<u64> {
    let digits = &text[text.find(key)? + key.len()..];
    let end = digits
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// Full JSON parse, for frames the fast path cannot read.
fn slow(text: &str) -> Frame {
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return Frame::Other;
    };
    match value.get("type").and_then(Value::as_str) {
        Some("message") => {
            let data = value.get("data");
            let field = |key: &str| data.and_then(|data| data.get(key)).and_then(Value::as_u64);
            match (field("t"), field("n")) {
                (Some(t), Some(n)) => Frame::Message { t, n },
                _ => Frame::Foreign,
            }
        }
        Some("subscribed") => Frame::Subscribed,
        Some("error") => {
            let text = |key: &str| {
                value
                    .get(key)
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string()
            };
            Frame::Error(format!("{}: {}", text("code"), text("message")))
        }
        _ => Frame::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hubs_compact_message_takes_the_fast_path() {
        let text = r#"{"type":"message","channel":"bench:0","data":{"t":1700000000123456789,"n":42,"pad":"xxxx"},"seq":7,"ts":"2026-11-22T01:00:00Z"}"#;
        assert_eq!(fast_payload(text), Some((1_700_000_000_123_456_789, 42)));
        assert_eq!(
            parse(text),
            Frame::Message {
                t: 1_700_000_000_123_456_789,
                n: 42
            }
        );
    }

    #[test]
    fn reordered_or_spaced_frames_still_parse() {
        let sorted = r#"{"channel":"bench:0","data":{"n":3,"pad":"","t":99},"type":"message"}"#;
        assert_eq!(parse(sorted), Frame::Message { t: 99, n: 3 });
        let spaced = r#"{ "type": "message", "data": { "t": 5, "n": 6 } }"#;
        assert_eq!(parse(spaced), Frame::Message { t: 5, n: 6 });
    }

    #[test]
    fn acks_errors_snapshots_and_foreign_data() {
        assert_eq!(
            parse(r#"{"type":"subscribed","id":1,"channel":"bench:0"}"#),
            Frame::Subscribed
        );
        assert_eq!(
            parse(r#"{"type":"error","code":"bad_channel","message":"no"}"#),
            Frame::Error("bad_channel: no".into())
        );
        assert_eq!(
            parse(r#"{"type":"snapshot","channel":"bench:0","data":{"t":1,"n":2}}"#),
            Frame::Other
        );
        assert_eq!(
            parse(r#"{"type":"message","channel":"bench:0","data":{"price":3}}"#),
            Frame::Foreign
        );
    }
}
