//! `GET /api/channels/{channel}` (the latest value: the REST fallback for clients whose WebSocket fails) and
//! `GET /api/channels/{channel}/history?limit=N` (the last snapshots, newest first). A channel that needs a
//! token to subscribe needs the same connection token here, as `Authorization: Bearer <jwt>`.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::value::RawValue;

use crate::core::protocol::{ErrorCode, Target, validate_channel};
use crate::core::publication::Publication;
use crate::core::token;
use crate::http::auth::bearer_token;
use crate::http::reply::error_response;
use crate::node::hub::Hub;

/// The answer refusing to read `channel`, if the request may not: the rules of a subscribe, with the bearer
/// token as the connection token (subscription tokens are for WebSocket subscribes only).
fn read_refusal(hub: &Hub, req: &HttpRequest, channel: &str) -> Option<HttpResponse> {
    let policy = hub
        .config()
        .policy(channel)
        .unwrap_or_else(|| hub.config().default_policy());
    let identity = match (hub.verifier(), bearer_token(req)) {
        (Some(verifier), Some(bearer)) => match verifier.verify_connection(bearer) {
            Ok(identity) => Some(identity),
            Err(e) => {
                crate::stats::Stats::add(&hub.stats().tokens_rejected, 1);
                return Some(error_response(
                    StatusCode::UNAUTHORIZED,
                    "invalid_token",
                    &e.message,
                ));
            }
        },
        _ => None,
    };
    let target = Target::Channel(channel.to_string());
    let auth = hub.verifier().is_some();
    let refused = token::may_subscribe(auth, &policy, &target, identity.as_ref(), None).err()?;
    crate::stats::Stats::add(&hub.stats().auth_refused, 1);
    let status = match refused.code {
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        _ => StatusCode::FORBIDDEN,
    };
    Some(error_response(
        status,
        refused.code.as_str(),
        &refused.message,
    ))
}

pub async fn latest(
    hub: web::Data<Hub>,
    req: HttpRequest,
    channel: web::Path<String>,
) -> HttpResponse {
    if let Err(e) = validate_channel(&channel) {
        return error_response(StatusCode::BAD_REQUEST, e.code.as_str(), &e.message);
    }
    if let Some(refused) = read_refusal(&hub, &req, &channel) {
        return refused;
    }
    match hub.cached_latest(&channel).await {
        Some(p) => HttpResponse::Ok()
            .content_type("application/json")
            .insert_header(("Cache-Control", "no-store"))
            .body(p.to_rest_json()),
        None => error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            "no value for this channel",
        ),
    }
}

#[derive(serde::Deserialize)]
pub struct HistoryQuery {
    limit: Option<usize>,
}

/// One history item. `data` is the published JSON as is (re-parsing it would reorder keys and round numbers).
#[derive(serde::Serialize)]
struct Item<'a> {
    data: &'a RawValue,
    seq: Option<u64>,
    ts: Option<&'a str>,
}

#[derive(serde::Serialize)]
struct History<'a> {
    channel: &'a str,
    items: Vec<Item<'a>>,
}

pub async fn history(
    hub: web::Data<Hub>,
    req: HttpRequest,
    channel: web::Path<String>,
    // Taken as a `Result` so a bad `limit` gets the API's error shape, not actix's plain-text reply.
    query: Result<web::Query<HistoryQuery>, actix_web::Error>,
) -> HttpResponse {
    if let Err(e) = validate_channel(&channel) {
        return error_response(StatusCode::BAD_REQUEST, e.code.as_str(), &e.message);
    }
    if let Some(refused) = read_refusal(&hub, &req, &channel) {
        return refused;
    }
    let query = match query {
        Ok(query) => query,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("limit must be a whole number: {e}"),
            );
        }
    };
    let kept = hub
        .config()
        .policy(&channel)
        .unwrap_or_else(|| hub.config().default_policy())
        .history_size;
    let limit = query.limit.unwrap_or(kept).min(kept.max(1)).min(1000);
    match hub.engine().history(&channel, limit).await {
        Ok(found) => render(&channel, &found),
        Err(e) => error_response(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &e.0),
    }
}

fn render<P: std::borrow::Borrow<Publication>>(channel: &str, found: &[P]) -> HttpResponse {
    let items = found
        .iter()
        .map(|p| {
            let p = p.borrow();
            Item {
                // Valid JSON by construction (validated on publish or on arrival from Redis).
                data: serde_json::from_str(p.data()).unwrap_or(RawValue::NULL),
                seq: p.seq,
                ts: p.ts(),
            }
        })
        .collect();
    HttpResponse::Ok().json(History { channel, items })
}
