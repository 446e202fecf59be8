//! `GET /health` (the process is alive) and `GET /ready` (send traffic here: the pub/sub link is live and the
//! hub is not shutting down).

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};

use crate::node::hub::Hub;

pub async fn health() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

pub async fn ready(hub: web::Data<Hub>) -> HttpResponse {
    match hub.readiness() {
        Ok(()) => {
            HttpResponse::Ok().json(serde_json::json!({ "status": "ready", "mode": hub.mode() }))
        }
        Err(reason) => HttpResponse::build(StatusCode::SERVICE_UNAVAILABLE)
            .json(serde_json::json!({ "status": "unavailable", "reason": reason })),
    }
}
