//! Serves the dashboard and the client library at `/`. The files of `web/` are built into the binary, so a
//! hub started from any directory (or a bare container) serves them; `server.web_root` names a directory to
//! read instead, so a developer sees edits without rebuilding. Only plain file names directly inside the
//! directory (no paths, no dot files), so nothing outside it can be reached.

use std::borrow::Cow;
use std::path::PathBuf;

use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, web};

use crate::http::auth::origin_allowed;
use crate::http::reply::error_response;
use crate::node::hub::Hub;

/// `web/` as it was when the binary was built (debug builds too: the `debug-embed` feature), so tests see
/// what a release serves.
#[derive(rust_embed::Embed)]
#[folder = "web/"]
struct WebAssets;

/// The files other origins import (`import { RelayHub } from "https://hub.example.com/relayhub.js"`): they
/// get CORS for `server.allowed_origins`. The dashboard's own files are same-origin only.
const CLIENT_FILES: &[&str] = &["relayhub.js", "relayhub.d.ts"];

pub async fn index(hub: web::Data<Hub>, req: HttpRequest) -> HttpResponse {
    serve(&hub, &req, "index.html").await
}

pub async fn file(hub: web::Data<Hub>, req: HttpRequest, name: web::Path<String>) -> HttpResponse {
    serve(&hub, &req, &name).await
}

async fn serve(hub: &Hub, req: &HttpRequest, name: &str) -> HttpResponse {
    let valid = !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if !valid {
        return error_response(StatusCode::NOT_FOUND, "not_found", "no such file");
    }
    let Some(bytes) = read(&hub.config().server.web_root, name).await else {
        return error_response(StatusCode::NOT_FOUND, "not_found", "no such file");
    };
    let mut response = HttpResponse::Ok();
    response
        .content_type(content_type(name))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"));
    if CLIENT_FILES.contains(&name) {
        // Cached answers differ by origin, whether or not this one is allowed.
        response.insert_header((header::VARY, "Origin"));
        if let Some(origin) = req.headers().get(header::ORIGIN)
            && origin_allowed(req.headers(), hub.config())
        {
            response.insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone()));
        }
    }
    match bytes {
        Cow::Borrowed(bytes) => response.body(bytes),
        Cow::Owned(bytes) => response.body(bytes),
    }
}

/// A file's bytes: from `web_root` when one is set, else from the binary.
async fn read(web_root: &str, name: &str) -> Option<Cow<'static, [u8]>> {
    if web_root.is_empty() {
        return WebAssets::get(name).map(|file| file.data);
    }
    tokio::fs::read(PathBuf::from(web_root).join(name))
        .await
        .ok()
        .map(Cow::Owned)
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("ts") => "application/typescript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        _ => "application/octet-stream",
    }
}
