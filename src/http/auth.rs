//! Who may use the edge: allowed origins (WebSocket upgrades, CORS, foreign writes) and bearer secrets.

use actix_web::HttpRequest;
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderMap};

use crate::core::config::Config;
use crate::core::protocol::{ErrorCode, Target};
use crate::core::token::{self, Identity};
use crate::node::hub::Hub;
use crate::stats::Stats;

/// Why a read over HTTP (REST, an event stream) is refused: the status, the error code and the message.
pub struct Refusal {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

/// The identity of a request that carries a connection token (`None` without one, or without `[auth]`).
pub fn request_identity(hub: &Hub, token: Option<&str>) -> Result<Option<Identity>, Refusal> {
    let (Some(verifier), Some(token)) = (hub.verifier(), token) else {
        return Ok(None);
    };
    verifier.verify_connection(token).map(Some).map_err(|e| {
        Stats::add(&hub.stats().tokens_rejected, 1);
        Refusal {
            status: StatusCode::UNAUTHORIZED,
            code: "invalid_token",
            message: e.message,
        }
    })
}

/// Whether `identity` may read `target` over HTTP: the rules of a WebSocket subscribe with a connection
/// token (subscription tokens are for WebSocket subscribes only).
pub fn may_read(hub: &Hub, identity: Option<&Identity>, target: &Target) -> Result<(), Refusal> {
    let name = match target {
        Target::Channel(c) | Target::Pattern(c) => c.as_str(),
    };
    let policy = hub
        .config()
        .policy(name)
        .unwrap_or_else(|| hub.config().default_policy());
    let auth = hub.verifier().is_some();
    token::may_subscribe(auth, &policy, target, identity, None)
        .map(|_| ())
        .map_err(|refused| {
            Stats::add(&hub.stats().auth_refused, 1);
            Refusal {
                status: match refused.code {
                    ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
                    _ => StatusCode::FORBIDDEN,
                },
                code: refused.code.as_str(),
                message: refused.message,
            }
        })
}

/// Whether the request's `Origin` (if any) may use this hub. Requests without one are not from a browser.
pub fn origin_allowed(headers: &HeaderMap, config: &Config) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else {
        return true;
    };
    // `self` compares with the host the browser used: behind a proxy, the one it forwarded.
    let host = [
        header::HeaderName::from_static("x-forwarded-host"),
        header::HOST,
    ]
    .iter()
    .find_map(|name| headers.get(name).and_then(|h| h.to_str().ok()))
    .and_then(|h| h.split(',').next())
    .map(str::trim)
    .unwrap_or("");
    config
        .server
        .allowed_origins
        .iter()
        .any(|allowed| origin_matches(allowed, origin, host))
}

fn origin_matches(allowed: &str, origin: &str, own_host: &str) -> bool {
    match allowed {
        "*" => true,
        "self" => origin
            .split_once("://")
            .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(own_host)),
        _ => match allowed.strip_suffix(":*") {
            Some(base) => origin
                .strip_prefix(base)
                .and_then(|rest| rest.strip_prefix(':'))
                .is_some_and(|port| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())),
            None => allowed.eq_ignore_ascii_case(origin),
        },
    }
}

/// Compares two secrets in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The bearer token of a request, if any.
pub fn bearer_token(req: &HttpRequest) -> Option<&str> {
    req.headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        assert!(origin_matches(
            "http://localhost:*",
            "http://localhost:3000",
            "x"
        ));
        assert!(!origin_matches(
            "http://localhost:*",
            "http://localhost.evil.com:3000",
            "x"
        ));
        assert!(!origin_matches(
            "http://localhost:*",
            "http://localhost",
            "x"
        ));
        assert!(origin_matches(
            "self",
            "https://hub.example.com",
            "hub.example.com"
        ));
        assert!(!origin_matches(
            "self",
            "https://evil.com",
            "hub.example.com"
        ));
        assert!(origin_matches(
            "https://app.example.com",
            "https://app.example.com",
            "x"
        ));
        assert!(origin_matches("*", "https://anything", "x"));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
