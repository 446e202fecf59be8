//! `GET /health` (the process is alive, and how its Redis links stand) and `GET /ready` (send traffic here:
//! see `Hub::readiness` for what makes a replica not ready, and why a Redis outage does not).

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use serde_json::{Value, json};

use crate::engine::Reach;
use crate::node::hub::{Hub, Readiness};

/// Always 200 while the process serves; the body says what is degraded.
pub async fn health(hub: web::Data<Hub>) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "status": "ok",
        "mode": hub.mode(),
        "degraded": hub.readiness().degraded(),
        "redis": redis_health(&hub),
    }))
}

/// `{"pubsub":"up"|"down","commands":"answering"|"unreachable"|"unknown"}`, or null in memory mode.
pub fn redis_health(hub: &Hub) -> Value {
    let Some(link) = hub.link_health() else {
        return Value::Null;
    };
    let commands = match (link.linked, link.reach) {
        (true, _) | (false, Reach::Answering) => "answering",
        (false, Reach::Unreachable) => "unreachable",
        (false, Reach::Unknown) => "unknown",
    };
    json!({ "pubsub": if link.linked { "up" } else { "down" }, "commands": commands })
}

pub async fn ready(hub: web::Data<Hub>) -> HttpResponse {
    match hub.readiness() {
        Readiness::Ready { degraded } => HttpResponse::Ok().json(json!({
            "status": "ready",
            "mode": hub.mode(),
            "degraded": degraded,
        })),
        Readiness::NotReady(reason) => HttpResponse::build(StatusCode::SERVICE_UNAVAILABLE)
            .json(json!({ "status": "unavailable", "reason": reason })),
    }
}
