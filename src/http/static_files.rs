//! Serves the files of `server.web_root` at `/` (the dashboard and the client library). Only plain file
//! names directly inside the directory (no paths, no dot files), so nothing outside it can be reached.

use std::path::PathBuf;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};

use crate::http::reply::error_response;
use crate::node::hub::Hub;

pub async fn index(hub: web::Data<Hub>) -> HttpResponse {
    serve(&hub, "index.html").await
}

pub async fn file(hub: web::Data<Hub>, name: web::Path<String>) -> HttpResponse {
    serve(&hub, &name).await
}

async fn serve(hub: &Hub, name: &str) -> HttpResponse {
    let valid = !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if !valid {
        return error_response(StatusCode::NOT_FOUND, "not_found", "no such file");
    }
    let path = PathBuf::from(&hub.config().server.web_root).join(name);
    match tokio::fs::read(&path).await {
        Ok(bytes) => HttpResponse::Ok()
            .content_type(content_type(name))
            .insert_header(("Cache-Control", "no-cache"))
            .insert_header(("X-Content-Type-Options", "nosniff"))
            .body(bytes),
        Err(_) => error_response(StatusCode::NOT_FOUND, "not_found", "no such file"),
    }
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        _ => "application/octet-stream",
    }
}
