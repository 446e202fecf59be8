//! `GET /api/openapi.json`: the HTTP API's contract (docs/openapi.json), embedded at build time so the
//! document served is the one this binary was built and tested against.

use actix_web::HttpResponse;

/// The OpenAPI 3.1 document of the HTTP API.
pub const DOCUMENT: &str = include_str!("../../docs/openapi.json");

pub async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(DOCUMENT)
}
