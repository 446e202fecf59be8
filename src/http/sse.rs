//! `GET /sse?channel=a&channel=b`: a `text/event-stream` of the named channels, for networks that break
//! WebSockets. Every check the WebSocket upgrade makes is made here before the stream opens, each refusal in
//! the API's JSON error shape: shutdown, origin, the channels (namespaces, patterns, the per-connection
//! limits, by the rules a WebSocket subscribe passes: `node::subscribe_rules`) and the connection budgets.
//! The stream is then one more subscriber of this worker's registry (see `node::sse`), and its body is
//! written by `transport::sse`. Its connection's write deadline
//! (`websocket.write_timeout`, see `stall`) is armed, so a client that stops reading loses its socket and
//! slot as a WebSocket's would, not only its queue.
//!
//! `Last-Event-ID` (sent by browsers when an `EventSource` reconnects, or `?last_event_id=`) holds every
//! channel's position, so the stream resumes through the recovery protocol on whichever replica it reaches.
//!
//! A path of `[[endpoints]]` asked for with `Accept: text/event-stream` is the same stream of the endpoint's
//! channel; it is the app's last resort, so any other unrouted request stays a plain 404.

use std::sync::Arc;

use actix::Addr;
use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, web};
use percent_encoding::percent_decode_str;

use crate::core::config::ChannelPolicy;
use crate::core::protocol::{ErrorCode, ProtocolError, Target, parse_target};
use crate::http::admission::Admission;
use crate::http::auth::{Refusal, bearer_token, may_read, origin_allowed, request_identity};
use crate::http::reply::ApiError;
use crate::http::stall::WriteDeadline;
use crate::node::hub::Hub;
use crate::node::registry::Registry;
use crate::node::sse::{SseSubscriber, StreamSubscription};
use crate::node::subscribe_rules;
use crate::stats::Stats;
use crate::transport::Outbox;
use crate::transport::sse::{Cursor, EventStream};

const LAST_EVENT_ID: header::HeaderName = header::HeaderName::from_static("last-event-id");

/// The channels and resume point a request names, and its connection token if any.
struct StreamRequest {
    channels: Vec<String>,
    last_event_id: Option<String>,
    token: Option<String>,
}

/// Counts a stream its connection's write deadline ended (`write_timeouts`, as for WebSockets), when the
/// response goes with the connection.
struct TimedOut {
    deadline: Option<WriteDeadline>,
    hub: Hub,
}

impl Drop for TimedOut {
    fn drop(&mut self) {
        if self.deadline.as_ref().is_some_and(WriteDeadline::fired) {
            Stats::add(&self.hub.stats().write_timeouts, 1);
        }
    }
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
}

/// Reads `channel` (repeated) and `last_event_id` from the query string; the header wins over the parameter.
fn parse_request(req: &HttpRequest, bound: Option<&str>) -> Result<StreamRequest, ApiError> {
    let mut channels: Vec<String> = bound.into_iter().map(str::to_string).collect();
    let mut last_event_id = None;
    let mut token = None;
    for pair in req.query_string().split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = value.replace('+', " ");
        let value = percent_decode_str(&value)
            .decode_utf8()
            .map_err(|_| bad_request(format!("`{key}` is not UTF-8")))?
            .into_owned();
        match key {
            "channel" if bound.is_some() => {
                return Err(bad_request(
                    "this path names its channel: no `channel` here",
                ));
            }
            "channel" => channels.push(value),
            "last_event_id" => last_event_id = Some(value),
            // EventSource cannot set headers: the token comes in the URL, as `/ws?token=` does.
            "token" => token = Some(value),
            _ => return Err(bad_request(format!("unknown query parameter `{key}`"))),
        }
    }
    if let Some(header) = req.headers().get(LAST_EVENT_ID) {
        let header = header
            .to_str()
            .map_err(|_| bad_request("Last-Event-ID is not ASCII"))?;
        last_event_id = Some(header.to_string());
    }
    if channels.is_empty() {
        return Err(bad_request("name at least one `channel`"));
    }
    if let Some(bearer) = bearer_token(req) {
        token = Some(bearer.to_string());
    }
    Ok(StreamRequest {
        channels,
        last_event_id,
        token,
    })
}

/// Checks each channel as a WebSocket subscribe of it would be checked, in turn, by the same rules (and
/// counts refusals the same way): its name, its namespace, the per-connection limits.
fn check_channels(
    hub: &Hub,
    channels: &[String],
) -> Result<Vec<(Target, String, ChannelPolicy)>, ApiError> {
    let ws = &hub.config().websocket;
    let limits = subscribe_rules::Limits {
        max_subscriptions: ws.max_subscriptions_per_connection,
        max_patterns: ws.max_patterns_per_connection,
        per: "stream",
    };
    let mut held = subscribe_rules::Held::default();
    let mut checked = Vec::with_capacity(channels.len().min(limits.max_subscriptions));
    for (i, name) in channels.iter().enumerate() {
        if channels[..i].contains(name) {
            return Err(bad_request(format!("`{name}` is named twice")));
        }
        let target = parse_target(name)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.code.as_str(), e.message))?;
        let refused = |e: ProtocolError| {
            let status = match e.code {
                ErrorCode::Forbidden => StatusCode::FORBIDDEN,
                _ => StatusCode::BAD_REQUEST,
            };
            ApiError::new(status, e.code.as_str(), format!("`{name}`: {}", e.message))
        };
        let policy = subscribe_rules::target_policy(hub.config(), &target).map_err(refused)?;
        subscribe_rules::within_limits(hub.stats(), limits, held, &target).map_err(refused)?;
        held.subscriptions += 1;
        held.patterns += usize::from(matches!(target, Target::Pattern(_)));
        checked.push((target, name.clone(), policy));
    }
    Ok(checked)
}

pub async fn stream(
    req: HttpRequest,
    hub: web::Data<Hub>,
    registry: web::Data<Addr<Registry>>,
    admission: web::Data<Admission>,
) -> Result<HttpResponse, ApiError> {
    open(req, hub, registry, admission, None).await
}

/// A path of `[[endpoints]]` requested with `Accept: text/event-stream`: the stream of the endpoint's
/// channel (or pattern), as `GET /sse?channel=` gives it. Any other request that reached no route is the
/// plain 404 it always was.
pub async fn endpoint_stream(
    req: HttpRequest,
    hub: web::Data<Hub>,
    registry: web::Data<Addr<Registry>>,
    admission: web::Data<Admission>,
) -> Result<HttpResponse, ApiError> {
    let wants_stream = req.method() == actix_web::http::Method::GET
        && req
            .headers()
            .get(header::ACCEPT)
            .and_then(|accept| accept.to_str().ok())
            .is_some_and(|accept| accept.contains("text/event-stream"));
    let binding = wants_stream
        .then(|| hub.endpoints().resolve(req.path()))
        .flatten();
    let Some(binding) = binding else {
        return Ok(HttpResponse::NotFound().finish());
    };
    open(req, hub, registry, admission, Some(&binding.channel)).await
}

async fn open(
    req: HttpRequest,
    hub: web::Data<Hub>,
    registry: web::Data<Addr<Registry>>,
    admission: web::Data<Admission>,
    bound: Option<&str>,
) -> Result<HttpResponse, ApiError> {
    if hub.is_shutting_down() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "server is shutting down",
        ));
    }
    if !origin_allowed(req.headers(), hub.config()) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "origin not allowed",
        ));
    }
    let request = parse_request(&req, bound)?;
    let checked = check_channels(&hub, &request.channels)?;
    let refused = |r: Refusal| ApiError::new(r.status, r.code, r.message);
    // The token rules of a WebSocket subscribe, with the stream's token as the connection token.
    let identity = request_identity(&hub, request.token.as_deref()).map_err(refused)?;
    for (target, _, _) in &checked {
        may_read(&hub, identity.as_ref(), target).map_err(refused)?;
    }
    let cursor = Cursor::new(request.channels, request.last_event_id.as_deref())
        .map_err(|message| bad_request(format!("Last-Event-ID: {message}")))?;
    let mut subscriptions = Vec::with_capacity(checked.len());
    for ((target, name, policy), (_, since)) in checked.into_iter().zip(cursor.resume_points()) {
        subscriptions.push(StreamSubscription {
            name,
            target,
            policy,
            since: since.cloned(),
        });
    }
    // Checked last, so a request refused anyway takes no slot.
    let peer = req
        .peer_addr()
        .map(|a| a.ip())
        .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
    let admission: Arc<Admission> = admission.into_inner();
    let ip = admission.client_ip(peer, req.headers());
    let permit = admission.admit(ip, hub.stats()).map_err(|refused| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            refused.message(),
        )
    })?;
    let ws = &hub.config().websocket;
    // A stream whose client takes no bytes for the write timeout is dropped, as a WebSocket is: its
    // socket, buffers and slot go back. Its queue is bounded (and let go) below that, by the outbox.
    let deadline = req.conn_data::<WriteDeadline>().cloned();
    if let Some(deadline) = &deadline {
        deadline.arm(ws.write_timeout);
    }
    let outbox = Outbox::new(ws.mailbox_size, ws.max_queued_bytes);
    let (gone, gone_heard) = tokio::sync::oneshot::channel::<()>();
    SseSubscriber::start(
        hub.get_ref().clone(),
        registry.get_ref().clone(),
        outbox.clone(),
        subscriptions,
        identity.map(|i| i.expires_at),
        gone_heard,
    );
    let mut response = HttpResponse::Ok();
    // The slot is held as long as the response (the connection), not only while the stream is subscribed.
    let timed_out = TimedOut {
        deadline,
        hub: hub.get_ref().clone(),
    };
    // Counted before the subscriber hears the client is gone, so the count is in before the stream is.
    let guard: Box<dyn Send> = Box::new((timed_out, permit, gone));
    response
        // A stream is never followed by another request: when it ends, the connection goes too.
        .force_close()
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        // nginx: pass events on as they come, whatever its buffering settings.
        .insert_header(("x-accel-buffering", "no"));
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        response
            .insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone()))
            .insert_header((header::VARY, "Origin"));
    }
    Ok(response.streaming(EventStream::new(outbox, cursor, guard)))
}
