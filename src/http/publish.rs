//! `POST /api/publish`: the HTTP way in for producers. Same validation, limits and publish path as a
//! WebSocket client's publish, plus the API key. (A browser page of an origin not in `allowed_origins` is
//! refused before it gets here, like every state-changing request: see `http::refuse_foreign_writes`.)

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::StreamExt;
use serde_json::value::RawValue;

use crate::core::protocol::validate_channel;
use crate::http::auth::{bearer_token, constant_time_eq};
use crate::http::reply::error_response;
use crate::node::hub::{Hub, PublishError};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody<'a> {
    channel: String,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// Reads a request body up to `limit` bytes; `Err` is the response to send (413 past the limit).
pub async fn read_body(
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::BytesMut, HttpResponse> {
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk
            .map_err(|e| error_response(StatusCode::BAD_REQUEST, "bad_request", &e.to_string()))?;
        if body.len() + chunk.len() > limit {
            return Err(error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                &format!("body larger than {limit} bytes"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

pub async fn publish(req: HttpRequest, payload: web::Payload, hub: web::Data<Hub>) -> HttpResponse {
    let config = hub.config();
    if !config.server.api_key.is_empty() {
        let ok = bearer_token(&req)
            .is_some_and(|t| constant_time_eq(t.as_bytes(), config.server.api_key.as_bytes()));
        if !ok {
            return error_response(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong API key",
            );
        }
    }
    let body = match read_body(payload, config.websocket.max_message_bytes).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let parsed: PublishBody = match serde_json::from_slice(&body) {
        Ok(parsed) => parsed,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("body must be {{\"channel\": string, \"data\": any JSON}}: {e}"),
            );
        }
    };
    if let Err(e) = validate_channel(&parsed.channel) {
        return error_response(StatusCode::BAD_REQUEST, e.code.as_str(), &e.message);
    }
    if config.policy(&parsed.channel).is_none() {
        return error_response(
            StatusCode::BAD_REQUEST,
            "invalid_channel",
            "unknown namespace",
        );
    }
    match hub.publish(&parsed.channel, parsed.data.get()).await {
        Ok(outcome) => HttpResponse::Ok().json(serde_json::json!({
            "channel": parsed.channel,
            "seq": outcome.seq,
            "delivered": outcome.delivered,
            "relayed": outcome.relayed,
        })),
        Err(PublishError::Unavailable(message)) => {
            error_response(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &message)
        }
    }
}
