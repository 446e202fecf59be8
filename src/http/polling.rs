//! The polling control API (admin): start, stop and list jobs, list sources. Requires
//! `Authorization: Bearer <admin_token>`; with no token configured only loopback clients are served, and none
//! that came through a proxy (a proxy on the same host would make everyone behind it look like loopback).

use std::collections::BTreeMap;

use actix::Addr;
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};

use crate::http::admission::Admission;
use crate::http::auth::{bearer_token, constant_time_eq};
use crate::http::reply::ApiError;
use crate::node::hub::Hub;
use crate::poller::{ListJobs, PollError, Poller, StartJob, StopJob};

/// What the polling API talks to: the poller, and its sources as listed.
pub struct PollerApi {
    pub poller: Addr<Poller>,
    pub sources: serde_json::Value,
}

fn authorize(req: &HttpRequest, hub: &Hub) -> Result<(), ApiError> {
    let token = &hub.config().server.admin_token;
    if token.is_empty() {
        let peer = req.peer_addr().map(|a| a.ip().to_canonical());
        let proxied = match req.app_data::<web::Data<Admission>>() {
            Some(admission) => admission.via_proxy(peer, req.headers()),
            // Not reachable from the server (it always registers one); refuse rather than trust.
            None => true,
        };
        if proxied {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "no admin token is configured and this request came through a proxy: set server.admin_token",
            ));
        }
        return if peer.is_some_and(|ip| ip.is_loopback()) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "no admin token is configured: the polling API answers loopback clients only",
            ))
        };
    }
    match bearer_token(req) {
        Some(given) if constant_time_eq(given.as_bytes(), token.as_bytes()) => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong admin token",
        )),
    }
}

fn poll_error(e: PollError) -> ApiError {
    match e {
        PollError::UnknownSource(m) => ApiError::new(StatusCode::BAD_REQUEST, "unknown_source", m),
        PollError::BadParams(m) => ApiError::new(StatusCode::BAD_REQUEST, "bad_request", m),
        PollError::UnknownJob(id) => {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no job `{id}`"))
        }
        PollError::TooManyJobs(max) => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_jobs",
            format!(
                "the fleet runs the most polling jobs it may ({max}, poller.max_jobs): stop one first"
            ),
        ),
        PollError::Backend(m) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartBody {
    source: String,
    #[serde(default)]
    params: BTreeMap<String, String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopBody {
    job: String,
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8], shape: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("body must be {shape}: {e}"),
        )
    })
}

/// Sends one request to the poller and maps both failure layers (poller gone, request refused) to API errors.
async fn ask<M, T>(api: &PollerApi, message: M) -> Result<T, ApiError>
where
    M: actix::Message<Result = Result<T, PollError>> + Send + 'static,
    T: Send + 'static,
    Poller: actix::Handler<M>,
{
    api.poller
        .send(message)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the poller stopped",
            )
        })?
        .map_err(poll_error)
}

pub async fn start(
    req: HttpRequest,
    body: web::Bytes,
    hub: web::Data<Hub>,
    api: web::Data<PollerApi>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &hub)?;
    let body: StartBody = parse(&body, r#"{"source": string, "params": {name: string}}"#)?;
    let message = StartJob {
        source: body.source,
        params: body.params,
    };
    let spec = ask(&api, message).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "job": spec.id, "channel": spec.channel })))
}

pub async fn stop(
    req: HttpRequest,
    body: web::Bytes,
    hub: web::Data<Hub>,
    api: web::Data<PollerApi>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &hub)?;
    let body: StopBody = parse(&body, r#"{"job": string}"#)?;
    let job = body.job.clone();
    ask(&api, StopJob { id: body.job }).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "job": job, "stopped": true })))
}

pub async fn status(
    req: HttpRequest,
    hub: web::Data<Hub>,
    api: web::Data<PollerApi>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &hub)?;
    let jobs = ask(&api, ListJobs).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "jobs": jobs })))
}

pub async fn sources(
    req: HttpRequest,
    hub: web::Data<Hub>,
    api: web::Data<PollerApi>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &hub)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "sources": api.sources })))
}
