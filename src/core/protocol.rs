//! The client protocol: parsing of client frames, building of server frames, error and close codes.
//! This is a public contract documented in the README; sessions and the HTTP API both speak it through here.

use std::fmt::Write as _;

use bytestring::ByteString;
use serde::Serialize;
use serde_json::value::RawValue;

/// Longest channel name accepted.
pub const MAX_CHANNEL_LEN: usize = 200;

/// Close codes sent to clients.
pub mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The server is going away (shutdown): reconnect, possibly to another replica.
    pub const GOING_AWAY: u16 = 1001;
    /// Not a valid WebSocket frame (bad opcode, unmasked client frame, stray continuation).
    pub const PROTOCOL: u16 = 1002;
    /// A text frame that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// Policy violation (heartbeat timeout, slow consumer, staying over the request rate).
    pub const POLICY: u16 = 1008;
    /// A frame was larger than `websocket.max_message_bytes`.
    pub const TOO_BIG: u16 = 1009;
    /// Internal error.
    pub const INTERNAL: u16 = 1011;
    /// The connection's token expired and no new one came in an `auth` frame: get a fresh token and
    /// reconnect. The hub's own codes are in 4000-4999; this is the only one so far.
    pub const TOKEN_EXPIRED: u16 = 4001;
}

/// Error codes of `{"type":"error"}` frames and of HTTP error bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, not an object, or a missing or mistyped field.
    BadRequest,
    /// `op` names no operation.
    UnknownOp,
    /// The channel name is malformed, or its namespace is not configured (strict namespaces).
    InvalidChannel,
    /// Unsubscribe from a channel the connection is not subscribed to.
    NotSubscribed,
    /// The namespace does not allow this (client publish, patterns).
    Forbidden,
    /// The connection already holds `max_subscriptions_per_connection` subscriptions.
    TooManySubscriptions,
    /// The connection already holds `max_patterns_per_connection` pattern subscriptions.
    TooManyPatterns,
    /// The connection is over its request rate (`websocket.requests_per_second`); the request was not run.
    RateLimited,
    /// The backend could not take the request now (Redis down); retry later.
    Unavailable,
    /// Something failed on the server.
    Internal,
    /// A token that does not verify: malformed, expired, wrongly signed, another algorithm, issuer or audience.
    InvalidToken,
    /// The namespace needs a valid connection token and this connection has none.
    Unauthorized,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::InvalidChannel => "invalid_channel",
            ErrorCode::NotSubscribed => "not_subscribed",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::TooManyPatterns => "too_many_patterns",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::Unauthorized => "unauthorized",
        }
    }
}

/// An error answered to one client request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// The `id` a client attached to a request, echoed in the reply. Any JSON number or string is accepted.
pub type RequestId = Option<Box<RawValue>>;

/// One parsed client frame.
#[derive(Debug)]
pub enum ClientFrame {
    Subscribe {
        channel: String,
        /// Where the client stands (`"since":{"epoch","seq"}`): recover what it missed after it.
        since: Option<crate::core::position::Position>,
        /// A pattern's `since`: where the client stands in each named channel
        /// (`"since":{"<channel>":{"epoch","seq"},...}`, possibly empty), in name order.
        since_channels: Option<Vec<(String, crate::core::position::Position)>>,
        /// A subscription token for this channel.
        token: Option<String>,
    },
    /// A connection token: the first one, or a fresh one before the current one expires.
    Auth {
        token: String,
    },
    Unsubscribe {
        channel: String,
    },
    Publish {
        channel: String,
        data: Box<RawValue>,
    },
    /// Who is subscribed to a channel (namespaces with `presence = true`).
    Presence {
        channel: String,
    },
    Ping,
}

/// A client frame with its request id; when parsing fails, the id (if it could be read) is kept for the error.
pub struct ParsedFrame {
    pub id: RequestId,
    pub frame: Result<ClientFrame, ProtocolError>,
}

#[derive(serde::Deserialize)]
struct RawFrame<'a> {
    #[serde(borrow)]
    op: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    channel: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    since: Option<&'a RawValue>,
    #[serde(borrow)]
    token: Option<&'a RawValue>,
}

/// `"since":{"epoch":"E","seq":41}` as a client sends it.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Since {
    epoch: String,
    seq: u64,
}

/// Longest epoch accepted in `since` (the hub's own are 12 characters).
pub const MAX_EPOCH_LEN: usize = 64;

/// Parses a text frame. Never fails as a whole: a bad frame yields a `ProtocolError` to send back.
pub fn parse_client_frame(text: &str) -> ParsedFrame {
    let bad = |m: &str| ParsedFrame {
        id: None,
        frame: Err(ProtocolError::new(ErrorCode::BadRequest, m)),
    };
    let trimmed = text.trim_start();
    if !trimmed.starts_with('{') {
        return match serde_json::from_str::<&RawValue>(text) {
            Ok(_) => bad("frame must be a JSON object"),
            Err(e) => bad(&format!("frame is not valid JSON: {e}")),
        };
    }
    let raw: RawFrame = match serde_json::from_str(text) {
        Ok(raw) => raw,
        Err(e) => return bad(&format!("frame is not valid JSON: {e}")),
    };
    let id = match raw.id {
        None => None,
        Some(id) if id.get() == "null" => None,
        Some(id) if id.get().starts_with('"') => Some(id.to_owned()),
        // A number is echoed as written, so it must be one every JSON parser can read back: finite as a
        // double (`1e400` is valid JSON grammar, but serde_json and others refuse it as out of range).
        Some(id)
            if id
                .get()
                .starts_with(['-', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9'])
                && id.get().parse::<f64>().is_ok_and(f64::is_finite) =>
        {
            Some(id.to_owned())
        }
        Some(_) => return bad("`id` must be a string or a finite number"),
    };
    let frame = parse_fields(&raw);
    ParsedFrame { id, frame }
}

fn parse_fields(raw: &RawFrame) -> Result<ClientFrame, ProtocolError> {
    let bad = |m: String| ProtocolError::new(ErrorCode::BadRequest, m);
    let op: String = match raw.op {
        None => return Err(bad("missing field `op`".into())),
        Some(op) => {
            serde_json::from_str(op.get()).map_err(|_| bad("`op` must be a string".into()))?
        }
    };
    let channel = || -> Result<String, ProtocolError> {
        match raw.channel {
            None => Err(bad(format!("`{op}` needs a `channel`"))),
            Some(c) => {
                serde_json::from_str(c.get()).map_err(|_| bad("`channel` must be a string".into()))
            }
        }
    };
    let token = || -> Result<Option<String>, ProtocolError> {
        match raw.token {
            None => Ok(None),
            Some(t) if t.get() == "null" => Ok(None),
            Some(t) => serde_json::from_str(t.get())
                .map(Some)
                .map_err(|_| bad("`token` must be a string".into())),
        }
    };
    match op.as_str() {
        "auth" => match token()? {
            Some(token) => Ok(ClientFrame::Auth { token }),
            None => Err(bad("`auth` needs a `token`".into())),
        },
        "subscribe" => {
            let channel = channel()?;
            let is_pattern = channel.ends_with('*');
            let since = match raw.since {
                None => None,
                Some(since) if since.get() == "null" => None,
                Some(since) if is_pattern => {
                    let named: std::collections::BTreeMap<String, Since> =
                        serde_json::from_str(since.get()).map_err(|_| {
                            bad("a pattern's `since` must be {\"<channel>\": {\"epoch\": string, \"seq\": number}, ...}".into())
                        })?;
                    let mut since_channels = Vec::with_capacity(named.len());
                    for (name, since) in named {
                        if since.epoch.len() > MAX_EPOCH_LEN {
                            return Err(bad(format!(
                                "`since.epoch` is at most {MAX_EPOCH_LEN} characters"
                            )));
                        }
                        since_channels.push((
                            name,
                            crate::core::position::Position {
                                epoch: since.epoch,
                                seq: since.seq,
                            },
                        ));
                    }
                    return Ok(ClientFrame::Subscribe {
                        channel,
                        since: None,
                        since_channels: Some(since_channels),
                        token: token()?,
                    });
                }
                Some(since) => {
                    let since: Since = serde_json::from_str(since.get()).map_err(|_| {
                        bad("`since` must be {\"epoch\": string, \"seq\": number}".into())
                    })?;
                    if since.epoch.len() > MAX_EPOCH_LEN {
                        return Err(bad(format!(
                            "`since.epoch` is at most {MAX_EPOCH_LEN} characters"
                        )));
                    }
                    Some(crate::core::position::Position {
                        epoch: since.epoch,
                        seq: since.seq,
                    })
                }
            };
            Ok(ClientFrame::Subscribe {
                channel,
                since,
                since_channels: None,
                token: token()?,
            })
        }
        "unsubscribe" => Ok(ClientFrame::Unsubscribe {
            channel: channel()?,
        }),
        "publish" => {
            let channel = channel()?;
            let data = raw
                .data
                .ok_or_else(|| bad("`publish` needs `data`".into()))?
                .to_owned();
            Ok(ClientFrame::Publish { channel, data })
        }
        "presence" => Ok(ClientFrame::Presence {
            channel: channel()?,
        }),
        "ping" => Ok(ClientFrame::Ping),
        _ => Err(ProtocolError::new(
            ErrorCode::UnknownOp,
            format!("unknown op `{op}`"),
        )),
    }
}

/// Whether a byte may appear in a channel name: `[A-Za-z0-9_.:@#-]`. `#` marks a user channel
/// (`budget:alerts#42`: only user `42` may subscribe).
pub fn is_channel_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'#' | b'-')
}

/// The user a channel belongs to: what follows its last `#`, if anything does.
pub fn channel_owner(channel: &str) -> Option<&str> {
    channel
        .rsplit_once('#')
        .map(|(_, user)| user)
        .filter(|user| !user.is_empty())
}

/// Checks a concrete channel name.
pub fn validate_channel(channel: &str) -> Result<(), ProtocolError> {
    if channel.is_empty() || channel.len() > MAX_CHANNEL_LEN {
        return Err(ProtocolError::new(
            ErrorCode::InvalidChannel,
            format!("channel names are 1 to {MAX_CHANNEL_LEN} characters"),
        ));
    }
    if !channel.bytes().all(is_channel_byte) {
        return Err(ProtocolError::new(
            ErrorCode::InvalidChannel,
            "channel names use only A-Z a-z 0-9 _ . : @ # -",
        ));
    }
    Ok(())
}

/// A subscription target: one channel, or a pattern whose last `:`-separated segment is `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Channel(String),
    /// The prefix every matching channel starts with, ending in `:` (from `prices:*`, `prices:`).
    Pattern(String),
}

/// Parses a subscribe target: a channel name, or a pattern `ns:...:*`.
pub fn parse_target(name: &str) -> Result<Target, ProtocolError> {
    if let Some(prefix) = name.strip_suffix('*') {
        if !prefix.ends_with(':') || prefix.len() < 2 {
            return Err(ProtocolError::new(
                ErrorCode::InvalidChannel,
                "a pattern ends with `*` as a whole segment, e.g. `prices:*`",
            ));
        }
        validate_channel(prefix)?;
        return Ok(Target::Pattern(prefix.to_string()));
    }
    validate_channel(name)?;
    Ok(Target::Channel(name.to_string()))
}

/// Appends `s` as a JSON string literal.
pub fn write_json_str(out: &mut String, s: &str) {
    // serde_json's escaping is the reference; writing into a String cannot fail.
    out.push_str(&serde_json::to_string(s).expect("a str always serializes"));
}

fn write_id(out: &mut String, id: &RequestId) {
    if let Some(id) = id {
        out.push_str(",\"id\":");
        out.push_str(id.get());
    }
}

fn reply(kind: &str, id: &RequestId, channel: Option<&str>, extra: &str) -> ByteString {
    let mut out = String::with_capacity(64);
    out.push_str("{\"type\":\"");
    out.push_str(kind);
    out.push('"');
    write_id(&mut out, id);
    if let Some(channel) = channel {
        out.push_str(",\"channel\":");
        write_json_str(&mut out, channel);
    }
    out.push_str(extra);
    out.push('}');
    out.into()
}

pub fn subscribed_frame(id: &RequestId, channel: &str) -> ByteString {
    reply("subscribed", id, Some(channel), "")
}

/// `subscribed` for a channel, with where it stood when the subscription went live, and whether the
/// client's `since` was recovered (absent when it sent none).
pub fn positioned_subscribed_frame(
    id: &RequestId,
    channel: &str,
    epoch: &str,
    seq: u64,
    recovered: Option<bool>,
) -> ByteString {
    let mut extra = String::with_capacity(48 + epoch.len());
    extra.push_str(",\"epoch\":");
    write_json_str(&mut extra, epoch);
    let _ = write!(extra, ",\"seq\":{seq}");
    if let Some(recovered) = recovered {
        let _ = write!(extra, ",\"recovered\":{recovered}");
    }
    reply("subscribed", id, Some(channel), &extra)
}

/// One named channel of a pattern's `since`: whether it was recovered, and its epoch and newest seq (absent
/// when its read failed).
pub type ChannelRecovery = (
    std::sync::Arc<str>,
    bool,
    Option<(std::sync::Arc<str>, u64)>,
);

/// `subscribed` for a pattern subscribe that named channels in `since`: per channel, whether its history
/// still held everything after the client's position (`recovered`), and where the channel stood when the
/// subscription went live (`positions`; absent for a channel whose read failed).
pub fn pattern_subscribed_frame(
    id: &RequestId,
    pattern: &str,
    channels: &[ChannelRecovery],
) -> ByteString {
    let mut extra = String::with_capacity(32 + channels.len() * 64);
    extra.push_str(",\"recovered\":{");
    for (i, (channel, recovered, _)) in channels.iter().enumerate() {
        if i > 0 {
            extra.push(',');
        }
        write_json_str(&mut extra, channel);
        let _ = write!(extra, ":{recovered}");
    }
    extra.push_str("},\"positions\":{");
    let mut first = true;
    for (channel, _, position) in channels {
        let Some((epoch, seq)) = position else {
            continue;
        };
        if !first {
            extra.push(',');
        }
        first = false;
        write_json_str(&mut extra, channel);
        extra.push_str(":{\"epoch\":");
        write_json_str(&mut extra, epoch);
        let _ = write!(extra, ",\"seq\":{seq}}}");
    }
    extra.push('}');
    reply("subscribed", id, Some(pattern), &extra)
}

/// `epoch`: the epoch of a channel a pattern subscription delivers, sent before or soon after its first
/// message through the pattern (and again when its numbering starts over), so the client can resume it.
pub fn epoch_frame(channel: &str, epoch: &str) -> ByteString {
    let mut extra = String::with_capacity(16 + epoch.len());
    extra.push_str(",\"epoch\":");
    write_json_str(&mut extra, epoch);
    reply("epoch", &None, Some(channel), &extra)
}

pub fn unsubscribed_frame(id: &RequestId, channel: &str) -> ByteString {
    reply("unsubscribed", id, Some(channel), "")
}

/// `unsubscribed` that the client did not ask for: the subscription's token expired (`token_expired`) or a
/// fresh connection token no longer covers it (`forbidden`).
pub fn revoked_frame(channel: &str, reason: &str) -> ByteString {
    let mut extra = String::with_capacity(16 + reason.len());
    extra.push_str(",\"reason\":");
    write_json_str(&mut extra, reason);
    reply("unsubscribed", &None, Some(channel), &extra)
}

pub fn published_frame(id: &RequestId, channel: &str, seq: Option<u64>) -> ByteString {
    let extra = match seq {
        Some(seq) => format!(",\"seq\":{seq}"),
        None => String::new(),
    };
    reply("published", id, Some(channel), &extra)
}

/// `authed`: the connection now acts as `user` until `expires_at` (RFC 3339).
pub fn authed_frame(id: &RequestId, user: &str, expires_at: &str) -> ByteString {
    let mut extra = String::with_capacity(32 + user.len() + expires_at.len());
    extra.push_str(",\"user\":");
    write_json_str(&mut extra, user);
    extra.push_str(",\"expires_at\":");
    write_json_str(&mut extra, expires_at);
    reply("authed", id, None, &extra)
}

/// `presence`: a channel's members (each one's JSON as stored), with `"truncated":true` when the channel has
/// more than were listed.
pub fn presence_frame(
    id: &RequestId,
    channel: &str,
    members: &[String],
    truncated: bool,
) -> ByteString {
    let mut extra = String::with_capacity(16 + members.iter().map(|m| m.len() + 1).sum::<usize>());
    extra.push_str(",\"members\":[");
    for (i, member) in members.iter().enumerate() {
        if i > 0 {
            extra.push(',');
        }
        extra.push_str(member);
    }
    extra.push(']');
    if truncated {
        extra.push_str(",\"truncated\":true");
    }
    reply("presence", id, Some(channel), &extra)
}

/// `join` or `leave`: a client subscribed to, or left, `channel`; `member` is its presence entry as JSON.
pub fn presence_event_frame(join: bool, channel: &str, member: &str) -> ByteString {
    let mut extra = String::with_capacity(12 + member.len());
    extra.push_str(",\"member\":");
    extra.push_str(member);
    reply(
        if join { "join" } else { "leave" },
        &None,
        Some(channel),
        &extra,
    )
}

/// A connection's presence entry: `{"client","user","info"}` (`info`: the token's claim, compact JSON).
pub fn member_json(client: &str, user: Option<&str>, info: Option<&str>) -> String {
    let mut out = String::with_capacity(48 + client.len() + info.map_or(0, str::len));
    out.push_str("{\"client\":");
    write_json_str(&mut out, client);
    out.push_str(",\"user\":");
    match user {
        Some(user) => write_json_str(&mut out, user),
        None => out.push_str("null"),
    }
    out.push_str(",\"info\":");
    out.push_str(info.unwrap_or("null"));
    out.push('}');
    out
}

pub fn pong_frame(id: &RequestId) -> ByteString {
    reply("pong", id, None, "")
}

pub fn error_frame(id: &RequestId, error: &ProtocolError) -> ByteString {
    let mut extra = String::with_capacity(48 + error.message.len());
    let _ = write!(extra, ",\"code\":\"{}\",\"message\":", error.code.as_str());
    write_json_str(&mut extra, &error.message);
    reply("error", id, None, &extra)
}

/// The current time as the protocol writes it: RFC 3339, UTC, milliseconds.
pub fn now_ts() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_id_out_of_a_doubles_range_is_refused() {
        for text in [
            r#"{"op":"ping","id":1e400}"#,
            r#"{"op":"ping","id":33333333333333333333e3333333333}"#,
        ] {
            let parsed = parse_client_frame(text);
            assert!(parsed.id.is_none(), "{text}");
            assert!(parsed.frame.is_err(), "{text}");
        }
        let parsed = parse_client_frame(r#"{"op":"ping","id":123456789012345678901234567890}"#);
        assert!(parsed.id.is_some() && parsed.frame.is_ok());
    }

    use super::*;

    fn err(text: &str) -> ProtocolError {
        parse_client_frame(text).frame.unwrap_err()
    }

    #[test]
    fn parses_every_op() {
        let p = parse_client_frame(r#"{"op":"subscribe","channel":"prices:BTC","id":1}"#);
        assert_eq!(p.id.unwrap().get(), "1");
        assert!(
            matches!(p.frame.unwrap(), ClientFrame::Subscribe { channel, since: None, token: None, .. } if channel == "prices:BTC")
        );
        let p = parse_client_frame(r#"{"op":"publish","channel":"chat:x","data":{"a":[1, 2]}}"#);
        assert!(p.id.is_none());
        match p.frame.unwrap() {
            ClientFrame::Publish { data, .. } => assert_eq!(data.get(), r#"{"a":[1, 2]}"#),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_client_frame(r#"{"op":"ping","id":"x"}"#).frame,
            Ok(ClientFrame::Ping)
        ));
    }

    #[test]
    fn bad_frames_get_codes() {
        assert_eq!(err("not json").code, ErrorCode::BadRequest);
        assert_eq!(err("[1,2]").code, ErrorCode::BadRequest);
        assert_eq!(err(r#"{"channel":"a"}"#).code, ErrorCode::BadRequest);
        assert_eq!(err(r#"{"op":5}"#).code, ErrorCode::BadRequest);
        assert_eq!(
            err(r#"{"op":"subscribe","channel":7}"#).code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            err(r#"{"op":"publish","channel":"a"}"#).code,
            ErrorCode::BadRequest
        );
        assert_eq!(err(r#"{"op":"dance"}"#).code, ErrorCode::UnknownOp);
        // A `since` that is not a position is refused, not ignored.
        for since in [
            r#""x""#,
            r#"{"epoch":"E"}"#,
            r#"{"epoch":"E","seq":-1}"#,
            r#"{"epoch":1,"seq":2}"#,
        ] {
            let text = format!(r#"{{"op":"subscribe","channel":"a","since":{since}}}"#);
            assert_eq!(err(&text).code, ErrorCode::BadRequest, "{since}");
        }
        let long = format!(
            r#"{{"op":"subscribe","channel":"a","since":{{"epoch":"{}","seq":1}}}}"#,
            "e".repeat(65)
        );
        assert_eq!(err(&long).code, ErrorCode::BadRequest);
        match parse_client_frame(
            r#"{"op":"subscribe","channel":"a","since":{"epoch":"E","seq":41}}"#,
        )
        .frame
        {
            Ok(ClientFrame::Subscribe { since: Some(p), .. }) => {
                assert_eq!((p.epoch.as_str(), p.seq), ("E", 41))
            }
            other => panic!("{other:?}"),
        }
        // A pattern's `since` names channels.
        match parse_client_frame(
            r#"{"op":"subscribe","channel":"p:*","since":{"p:b":{"epoch":"E","seq":4},"p:a":{"epoch":"F","seq":0}}}"#,
        )
        .frame
        {
            Ok(ClientFrame::Subscribe { since: None, since_channels: Some(named), .. }) => assert_eq!(
                named
                    .iter()
                    .map(|(c, p)| (c.as_str(), p.epoch.as_str(), p.seq))
                    .collect::<Vec<_>>(),
                [("p:a", "F", 0), ("p:b", "E", 4)]
            ),
            other => panic!("{other:?}"),
        }
        for since in [r#"{"epoch":"E","seq":4}"#, r#"{"p:a":3}"#, r#"[1]"#] {
            let text = format!(r#"{{"op":"subscribe","channel":"p:*","since":{since}}}"#);
            assert_eq!(err(&text).code, ErrorCode::BadRequest, "{since}");
        }
        // The id survives a bad op so the error can echo it.
        assert_eq!(
            parse_client_frame(r#"{"op":"dance","id":9}"#)
                .id
                .unwrap()
                .get(),
            "9"
        );
    }

    #[test]
    fn auth_frames_and_tokens() {
        match parse_client_frame(r#"{"op":"auth","token":"a.b.c","id":1}"#).frame {
            Ok(ClientFrame::Auth { token }) => assert_eq!(token, "a.b.c"),
            other => panic!("{other:?}"),
        }
        assert_eq!(err(r#"{"op":"auth"}"#).code, ErrorCode::BadRequest);
        assert_eq!(
            err(r#"{"op":"auth","token":5}"#).code,
            ErrorCode::BadRequest
        );
        match parse_client_frame(r#"{"op":"subscribe","channel":"a:b","token":"t"}"#).frame {
            Ok(ClientFrame::Subscribe { token, .. }) => assert_eq!(token.as_deref(), Some("t")),
            other => panic!("{other:?}"),
        }
        assert!(validate_channel("budget:alerts#42").is_ok());
        assert_eq!(channel_owner("budget:alerts#42"), Some("42"));
        assert_eq!(channel_owner("budget:a#b#7"), Some("7"));
        assert_eq!(channel_owner("budget:alerts#"), None);
        assert_eq!(channel_owner("budget:alerts"), None);
        let id: RequestId = Some(RawValue::from_string("1".into()).unwrap());
        let v: serde_json::Value =
            serde_json::from_str(&authed_frame(&id, "4\"2", "2026-01-01T00:00:00Z")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"authed","id":1,"user":"4\"2","expires_at":"2026-01-01T00:00:00Z"})
        );
    }

    #[test]
    fn channel_names() {
        assert!(validate_channel("option-chain:NIFTY:2025-11-28").is_ok());
        assert!(validate_channel("user@host.x_y").is_ok());
        assert!(validate_channel("").is_err());
        assert!(validate_channel("a b").is_err());
        assert!(validate_channel("a/b").is_err());
        assert!(validate_channel(&"x".repeat(201)).is_err());
        assert!(validate_channel(&"x".repeat(200)).is_ok());
        assert_eq!(
            parse_target("prices:*").unwrap(),
            Target::Pattern("prices:".into())
        );
        assert!(parse_target("prices*").is_err());
        assert!(parse_target("*").is_err());
    }

    #[test]
    fn pattern_recovery_frames_have_their_documented_shape() {
        let id: RequestId = Some(RawValue::from_string("3".into()).unwrap());
        let f = pattern_subscribed_frame(
            &id,
            "p:*",
            &[
                ("p:a".into(), true, Some(("E".into(), 7))),
                ("p:\"b".into(), false, None),
            ],
        );
        let v: serde_json::Value = serde_json::from_str(&f).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "subscribed", "id": 3, "channel": "p:*",
                "recovered": {"p:a": true, "p:\"b": false},
                "positions": {"p:a": {"epoch": "E", "seq": 7}}})
        );
        let v: serde_json::Value = serde_json::from_str(&epoch_frame("p:a", "E")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "epoch", "channel": "p:a", "epoch": "E"})
        );
    }

    #[test]
    fn frames_are_valid_json() {
        let id: RequestId = Some(RawValue::from_string("3".into()).unwrap());
        let f = error_frame(
            &id,
            &ProtocolError::new(ErrorCode::Forbidden, "no \"quotes\""),
        );
        let v: serde_json::Value = serde_json::from_str(&f).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["id"], 3);
        assert_eq!(v["code"], "forbidden");
        assert_eq!(v["message"], "no \"quotes\"");
        let v: serde_json::Value = serde_json::from_str(&subscribed_frame(&None, "a:b")).unwrap();
        assert_eq!(v, serde_json::json!({"type":"subscribed","channel":"a:b"}));
    }

    #[test]
    fn presence_frames_carry_members_as_given() {
        let parsed = parse_client_frame(r#"{"op":"presence","channel":"room:1","id":7}"#);
        assert!(
            matches!(parsed.frame, Ok(ClientFrame::Presence { ref channel }) if channel == "room:1")
        );
        assert_eq!(
            parse_client_frame(r#"{"op":"presence"}"#)
                .frame
                .unwrap_err()
                .code,
            ErrorCode::BadRequest
        );
        let ann = member_json("h-1", Some("a \"q\"\n"), Some(r#"{"n":[1,2]}"#));
        let anon = member_json("h-2", None, None);
        let id: RequestId = Some(RawValue::from_string("7".into()).unwrap());
        let frame = presence_frame(&id, "room:1", &[ann, anon.clone()], true);
        let v: serde_json::Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"presence","id":7,"channel":"room:1","members":[
                {"client":"h-1","user":"a \"q\"\n","info":{"n":[1,2]}},
                {"client":"h-2","user":null,"info":null}
            ],"truncated":true})
        );
        let v: serde_json::Value =
            serde_json::from_str(&presence_frame(&None, "room:1", &[], false)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"presence","channel":"room:1","members":[]})
        );
        let v: serde_json::Value =
            serde_json::from_str(&presence_event_frame(false, "room:1", &anon)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"leave","channel":"room:1","member":{"client":"h-2","user":null,"info":null}})
        );
    }
}
