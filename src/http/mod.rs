//! The HTTP edge: routes, the JSON error shape, origin checks and CORS. One file per route group.

pub mod admission;
pub mod auth;
pub mod channels;
pub mod health;
pub mod jwks;
pub mod metrics;
pub mod openapi;
pub mod polling;
pub mod publish;
pub mod reply;
pub mod server;
pub mod sse;
pub mod stall;
pub mod static_files;
pub mod stats;
pub mod upgrade;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::{HttpRequest, HttpResponse, web};

use crate::http::auth::origin_allowed;
use crate::http::reply::error_response;
use crate::node::hub::Hub;

/// Registers every route. `/api` gets CORS for the allowed origins.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(one(
        "/ws",
        Method::GET,
        web::get().to(crate::http::upgrade::not_an_upgrade),
    ))
    .service(one("/sse", Method::GET, web::get().to(sse::stream)))
    .service(one("/health", Method::GET, web::get().to(health::health)))
    .service(one("/ready", Method::GET, web::get().to(health::ready)))
    .service(one(
        "/metrics",
        Method::GET,
        web::get().to(metrics::metrics),
    ))
    .service(
        web::scope("/api")
            .wrap(actix_web::middleware::from_fn(refuse_foreign_writes))
            .wrap(actix_web::middleware::from_fn(cors))
            .service(one(
                "/publish",
                Method::POST,
                web::post().to(publish::publish),
            ))
            .service(one("/stats", Method::GET, web::get().to(stats::stats)))
            .service(one(
                "/openapi.json",
                Method::GET,
                web::get().to(openapi::openapi),
            ))
            .service(one(
                "/channels/{channel}",
                Method::GET,
                web::get().to(channels::latest),
            ))
            .service(one(
                "/channels/{channel}/history",
                Method::GET,
                web::get().to(channels::history),
            ))
            .service(one(
                "/channels/{channel}/presence",
                Method::GET,
                web::get().to(channels::presence),
            ))
            .service(one(
                "/channels/{channel}/presence/stats",
                Method::GET,
                web::get().to(channels::presence_stats),
            ))
            .service(one(
                "/polling/start",
                Method::POST,
                web::post().to(polling::start),
            ))
            .service(one(
                "/polling/stop",
                Method::POST,
                web::post().to(polling::stop),
            ))
            .service(one(
                "/polling/refresh",
                Method::POST,
                web::post().to(polling::refresh),
            ))
            .service(one(
                "/polling/status",
                Method::GET,
                web::get().to(polling::status),
            ))
            .service(one(
                "/polling/sources",
                Method::GET,
                web::get().to(polling::sources),
            ))
            .default_service(web::to(not_found)),
    );
}

/// A path with its one method; any other method on it gets 405 with an `Allow` header and the JSON error
/// shape (not 404: the path exists).
fn one(path: &str, method: Method, route: actix_web::Route) -> actix_web::Resource {
    web::resource(path)
        .route(route)
        .default_service(web::to(move |req: HttpRequest| {
            let allow = method.clone();
            async move { method_not_allowed(&req, allow) }
        }))
}

fn method_not_allowed(req: &HttpRequest, allow: Method) -> HttpResponse {
    if req.method() == Method::OPTIONS {
        return HttpResponse::NoContent()
            .insert_header((header::ALLOW, format!("{allow}, OPTIONS")))
            .finish();
    }
    let mut response = error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!("this endpoint takes {allow} only"),
    );
    response.headers_mut().insert(
        header::ALLOW,
        header::HeaderValue::from_str(allow.as_str())
            .expect("a method name is a valid header value"),
    );
    response
}

/// The dashboard and client library; registered last so every other route wins.
pub fn static_routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(static_files::index))
        .route("/{name}", web::get().to(static_files::file))
        // Last of all: an endpoint's path asked for as an event stream, else 404.
        .default_service(web::to(sse::endpoint_stream));
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    if req.method() == Method::OPTIONS {
        return HttpResponse::NoContent().finish();
    }
    error_response(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

/// Every state-changing request (anything but GET, HEAD and OPTIONS) from a browser page whose origin is not
/// allowed gets 403. CORS only hides the answer from a page; a form or `text/plain` POST from any site would
/// still act through its visitors' browsers, loopback ones included. Browsers always send `Origin` on a
/// cross-origin POST; servers send none.
async fn refuse_foreign_writes(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let allowed = safe
        || req
            .app_data::<web::Data<Hub>>()
            .is_some_and(|hub| origin_allowed(req.headers(), hub.config()));
    if !allowed {
        let (http_req, _) = req.into_parts();
        let response = error_response(StatusCode::FORBIDDEN, "forbidden", "origin not allowed");
        return Ok(ServiceResponse::new(http_req, response));
    }
    Ok(next.call(req).await?.map_into_boxed_body())
}

/// CORS for the allowed origins: preflights answered here, responses tagged with the origin.
async fn cors(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let hub = req.app_data::<web::Data<Hub>>().cloned();
    let origin = req.headers().get(header::ORIGIN).cloned();
    let allowed = match (&hub, &origin) {
        (Some(hub), Some(_)) => origin_allowed(req.headers(), hub.config()),
        _ => false,
    };
    if req.method() == Method::OPTIONS {
        let (http_req, _) = req.into_parts();
        let mut response = HttpResponse::NoContent();
        if allowed && let Some(origin) = origin {
            response
                .insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, origin))
                .insert_header((header::ACCESS_CONTROL_ALLOW_METHODS, "GET, POST, OPTIONS"))
                .insert_header((
                    header::ACCESS_CONTROL_ALLOW_HEADERS,
                    "authorization, content-type",
                ))
                .insert_header((header::ACCESS_CONTROL_MAX_AGE, "600"))
                .insert_header((header::VARY, "Origin"));
        }
        return Ok(ServiceResponse::new(http_req, response.finish()));
    }
    let mut response = next.call(req).await?.map_into_boxed_body();
    if allowed && let Some(origin) = origin {
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.insert(header::VARY, header::HeaderValue::from_static("Origin"));
    }
    Ok(response)
}
