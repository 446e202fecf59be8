//! `GET /api/channels/{channel}` (the latest value: the REST fallback for clients whose WebSocket fails) and
//! `GET /api/channels/{channel}/history?limit=N` (the last snapshots, newest first).

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};

use crate::http::error_response;
use crate::hub::Hub;
use crate::protocol::validate_channel;
use crate::store::Store;

pub async fn latest(hub: web::Data<Hub>, channel: web::Path<String>) -> HttpResponse {
    if let Err(e) = validate_channel(&channel) {
        return error_response(StatusCode::BAD_REQUEST, e.code.as_str(), &e.message);
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

pub async fn history(
    hub: web::Data<Hub>,
    channel: web::Path<String>,
    query: web::Query<HistoryQuery>,
) -> HttpResponse {
    if let Err(e) = validate_channel(&channel) {
        return error_response(StatusCode::BAD_REQUEST, e.code.as_str(), &e.message);
    }
    let kept = hub
        .config()
        .policy(&channel)
        .unwrap_or_else(|| hub.config().default_policy())
        .history_size;
    let limit = query.limit.unwrap_or(kept).min(kept.max(1)).min(1000);
    let items = match hub.store() {
        Store::Memory(memory) => memory
            .history(&channel, limit)
            .iter()
            .map(|p| item(p))
            .collect(),
        Store::Redis(redis) => match redis.history(&channel, limit).await {
            Ok(found) => found.iter().map(item).collect::<Vec<_>>(),
            Err(e) => return error_response(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &e.0),
        },
    };
    HttpResponse::Ok().json(serde_json::json!({ "channel": channel.as_str(), "items": items }))
}

fn item(p: &crate::publication::Publication) -> serde_json::Value {
    // The data is valid JSON by construction; parsing it here keeps the response one JSON document.
    let data: serde_json::Value = serde_json::from_str(p.data()).unwrap_or(serde_json::Value::Null);
    serde_json::json!({ "data": data, "seq": p.seq, "ts": p.ts() })
}
