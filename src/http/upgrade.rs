//! The WebSocket upgrade: everything decided before a connection becomes a session. Method and path, shutdown,
//! the handshake, the origin, and the connection budgets (admission), in that order, each refusal answered
//! with the API's JSON error shape; then the 101 and a session on this worker thread. A connection token in
//! the query (`?token=<jwt>`) is verified here, so a bad one is answered 401 before a session exists.
//! Besides `/ws`, the paths of `[[endpoints]]` upgrade too, under the same checks, into sessions bound to
//! their channel.

use actix::prelude::*;
use actix_http::h1;
use actix_http::ws::{HandshakeError, hash_key, verify_handshake};
use actix_http::{Method, Request};
use actix_web::HttpResponse;
use actix_web::http::StatusCode;
use actix_web::http::header;
use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use std::sync::Arc;

use crate::core::endpoint::Format;
use crate::core::token::Identity;
use crate::http::admission::Admission;
use crate::http::auth::origin_allowed;
use crate::http::reply::{error_body, error_response};
use crate::http::stall::Guarded;
use crate::node::hub::Hub;
use crate::node::registry::Registry;
use crate::node::session::{Opening, SessionLimits};
use crate::transport::{Coalescer, Outbox, Transport};

/// The path browsers connect to.
pub const WS_PATH: &str = "/ws";

/// What actix-http hands over when a request asks for a WebSocket upgrade.
pub type Upgrade = (Request, actix_codec::Framed<Guarded, h1::Codec>);

/// Validates a WebSocket upgrade and, if it is acceptable, answers 101 and starts a session on this worker
/// thread. Refusals get a JSON error like the rest of the HTTP API, and the connection is closed.
pub async fn accept(
    (request, framed): Upgrade,
    hub: Hub,
    registry: Addr<Registry>,
    admission: Arc<Admission>,
) -> Result<(), actix_web::Error> {
    let parts = framed.into_parts();
    // The session's transport keeps its own write deadline: the socket leaves the HTTP layer's wrapper.
    let mut io: TcpStream = parts.io.into_inner();
    let head = request.head();
    // `/ws` speaks the protocol; an endpoint's path (`[[endpoints]]`) is bound to its channel.
    let endpoint = match head.uri.path() {
        WS_PATH => None,
        path => hub.endpoints().resolve(path),
    };
    let refusal = if head.method == Method::CONNECT {
        Some((
            StatusCode::METHOD_NOT_ALLOWED,
            "bad_request",
            "CONNECT is not supported",
        ))
    } else if head.uri.path() != WS_PATH && endpoint.is_none() {
        Some((StatusCode::NOT_FOUND, "not_found", "no such endpoint"))
    } else if hub.is_shutting_down() {
        Some((
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "server is shutting down",
        ))
    } else if let Err(error) = verify_handshake(head) {
        Some((
            StatusCode::BAD_REQUEST,
            "bad_request",
            handshake_problem(&error),
        ))
    } else if !origin_allowed(&head.headers, hub.config()) {
        Some((StatusCode::FORBIDDEN, "forbidden", "origin not allowed"))
    } else {
        None
    };
    let token = match refusal {
        Some(_) => Ok(None),
        None => connection_token(&hub, head.uri.query()).await,
    };
    let token_problem = token.as_ref().err().cloned();
    let refusal = refusal.or_else(|| {
        token_problem
            .as_deref()
            .map(|message| (StatusCode::UNAUTHORIZED, "invalid_token", message))
    });
    let identity = token.ok().flatten();
    // Checked last, so a handshake that is refused anyway takes no slot. The permit goes into the session and
    // is given back when the session's context is dropped, however the connection ends.
    let admitted = match refusal {
        Some(refusal) => Err(refusal),
        None => {
            let peer = io
                .peer_addr()
                .map(|a| a.ip())
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
            let ip = admission.client_ip(peer, &head.headers);
            admission.admit(ip, hub.stats()).map_err(|refused| {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too_many_connections",
                    refused.message(),
                )
            })
        }
    };
    let permit = match admitted {
        Ok(permit) => permit,
        Err((status, code, message)) => {
            let body = error_body(code, message).to_string();
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            io.write_all(response.as_bytes()).await?;
            io.shutdown().await?;
            return Ok(());
        }
    };
    let key = head
        .headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|key| key.as_bytes())
        .unwrap_or_default();
    let accept_key = hash_key(key);
    let limits = SessionLimits::new(&hub.config().websocket);
    // A conflated connection keeps at most one pending message per subscription beside its queue.
    let outbox = Outbox::new(limits.mailbox_size, limits.max_queued_bytes)
        .with_slots(limits.max_subscriptions)
        .with_coalescer(Coalescer::for_this_thread(limits.write_delay));
    let outbox = match &endpoint {
        Some(e) => outbox.with_flavor(e.format == Format::Raw, e.snapshot),
        None => outbox,
    };
    // The 101 response goes out through the outbox, ahead of anything the session queues.
    let mut response = Vec::with_capacity(160);
    response.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: ");
    response.extend_from_slice(&accept_key);
    response.extend_from_slice(b"\r\n\r\n");
    let _ = outbox.push(Bytes::from(response));
    // Whatever actix-http read past the request is the client's first frames; its 8 KiB buffer is let go.
    let input = if parts.read_buf.is_empty() {
        BytesMut::new()
    } else {
        BytesMut::from(&parts.read_buf[..])
    };
    let transport = Transport::new(io, input, outbox.clone(), limits.transport());
    crate::node::session::start(
        hub,
        registry,
        limits,
        transport,
        outbox,
        Box::new(permit),
        Opening { identity, endpoint },
    );
    Ok(())
}

/// The identity of a `?token=` connection token: `Ok(None)` without one (or when no key is configured, so
/// the connection is anonymous as it would be anyway), `Err` with the reason when it does not verify.
/// A token naming a `kid` the cached JWKS lacks waits for one fresh fetch (when the fetch rate allows one) and
/// is verified again.
async fn connection_token(hub: &Hub, query: Option<&str>) -> Result<Option<Identity>, String> {
    #[derive(serde::Deserialize)]
    struct Query {
        token: Option<String>,
    }
    let (Some(verifier), Some(query)) = (hub.verifier(), query) else {
        return Ok(None);
    };
    let token = match actix_web::web::Query::<Query>::from_query(query) {
        Ok(q) => q.into_inner().token,
        Err(_) => {
            crate::stats::Stats::add(&hub.stats().tokens_rejected, 1);
            return Err("the query string is malformed".into());
        }
    };
    let Some(token) = token else {
        return Ok(None);
    };
    let mut verified = verifier.verify_connection(&token);
    if let (Err(e), Some(jwks)) = (&verified, verifier.jwks())
        && e.unknown_key
    {
        let mut installed = jwks.installed();
        installed.borrow_and_update();
        if jwks.request_refresh() {
            let wait = hub.config().auth.jwks_timeout + std::time::Duration::from_secs(1);
            if tokio::time::timeout(wait, installed.changed())
                .await
                .is_ok()
            {
                verified = verifier.verify_connection(&token);
            }
        }
    }
    verified.map(Some).map_err(|e| {
        crate::stats::Stats::add(&hub.stats().tokens_rejected, 1);
        e.message
    })
}

fn handshake_problem(error: &HandshakeError) -> &'static str {
    match error {
        HandshakeError::GetMethodRequired => "the WebSocket handshake must be a GET",
        HandshakeError::NoWebsocketUpgrade => "missing `Upgrade: websocket`",
        HandshakeError::NoConnectionUpgrade => "missing `Connection: Upgrade`",
        HandshakeError::NoVersionHeader => "missing Sec-WebSocket-Version",
        HandshakeError::UnsupportedVersion => "only WebSocket version 13 is supported",
        HandshakeError::BadWebsocketKey => "missing or malformed Sec-WebSocket-Key",
    }
}

/// `GET /ws` that reached the app: it did not ask for an upgrade (those never get here).
pub async fn not_an_upgrade() -> HttpResponse {
    error_response(
        StatusCode::BAD_REQUEST,
        "bad_request",
        "this endpoint speaks WebSocket: send `Upgrade: websocket`",
    )
}
