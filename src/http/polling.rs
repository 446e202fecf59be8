//! The polling control API (admin): start, stop and list jobs, list sources. Requires
//! `Authorization: Bearer <admin_token>`; with no token configured only loopback clients are served.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use actix::Addr;
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};

use crate::http::{bearer_token, constant_time_eq, error_response};
use crate::hub::Hub;
use crate::poller::{ListJobs, PollError, Poller, StartJob, StopJob};

/// The poller's address, set once it starts (after the listener is bound).
pub type PollerSlot = Arc<OnceLock<(Addr<Poller>, serde_json::Value)>>;

fn authorize(req: &HttpRequest, hub: &Hub) -> Result<(), HttpResponse> {
    let token = &hub.config().server.admin_token;
    if token.is_empty() {
        let loopback = req.peer_addr().is_some_and(|a| a.ip().is_loopback());
        return if loopback {
            Ok(())
        } else {
            Err(error_response(
                StatusCode::FORBIDDEN,
                "forbidden",
                "no admin token is configured: the polling API answers loopback clients only",
            ))
        };
    }
    match bearer_token(req) {
        Some(given) if constant_time_eq(given.as_bytes(), token.as_bytes()) => Ok(()),
        _ => Err(error_response(StatusCode::UNAUTHORIZED, "unauthorized", "missing or wrong admin token")),
    }
}

fn poller(slot: &PollerSlot) -> Result<&Addr<Poller>, HttpResponse> {
    slot.get()
        .map(|(addr, _)| addr)
        .ok_or_else(|| error_response(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the poller is not running"))
}

fn poll_error(e: PollError) -> HttpResponse {
    match e {
        PollError::UnknownSource(m) => error_response(StatusCode::BAD_REQUEST, "unknown_source", &m),
        PollError::BadParams(m) => error_response(StatusCode::BAD_REQUEST, "bad_request", &m),
        PollError::UnknownJob(id) => error_response(StatusCode::NOT_FOUND, "not_found", &format!("no job `{id}`")),
        PollError::Backend(m) => error_response(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &m),
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

fn parse<T: serde::de::DeserializeOwned>(body: &[u8], shape: &str) -> Result<T, HttpResponse> {
    serde_json::from_slice(body)
        .map_err(|e| error_response(StatusCode::BAD_REQUEST, "bad_request", &format!("body must be {shape}: {e}")))
}

pub async fn start(req: HttpRequest, body: web::Bytes, hub: web::Data<Hub>, slot: web::Data<PollerSlot>) -> HttpResponse {
    let run = async {
        authorize(&req, &hub)?;
        let body: StartBody = parse(&body, r#"{"source": string, "params": {name: string}}"#)?;
        let poller = poller(&slot)?;
        let result = poller
            .send(StartJob {
                source: body.source,
                params: body.params,
            })
            .await
            .map_err(|_| error_response(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the poller stopped"))?;
        let spec = result.map_err(poll_error)?;
        Ok::<_, HttpResponse>(HttpResponse::Ok().json(serde_json::json!({ "job": spec.id, "channel": spec.channel })))
    };
    run.await.unwrap_or_else(|response| response)
}

pub async fn stop(req: HttpRequest, body: web::Bytes, hub: web::Data<Hub>, slot: web::Data<PollerSlot>) -> HttpResponse {
    let run = async {
        authorize(&req, &hub)?;
        let body: StopBody = parse(&body, r#"{"job": string}"#)?;
        let poller = poller(&slot)?;
        let job = body.job.clone();
        poller
            .send(StopJob { id: body.job })
            .await
            .map_err(|_| error_response(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the poller stopped"))?
            .map_err(poll_error)?;
        Ok::<_, HttpResponse>(HttpResponse::Ok().json(serde_json::json!({ "job": job, "stopped": true })))
    };
    run.await.unwrap_or_else(|response| response)
}

pub async fn status(req: HttpRequest, hub: web::Data<Hub>, slot: web::Data<PollerSlot>) -> HttpResponse {
    let run = async {
        authorize(&req, &hub)?;
        let poller = poller(&slot)?;
        let jobs = poller
            .send(ListJobs)
            .await
            .map_err(|_| error_response(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the poller stopped"))?
            .map_err(poll_error)?;
        Ok::<_, HttpResponse>(HttpResponse::Ok().json(serde_json::json!({ "jobs": jobs })))
    };
    run.await.unwrap_or_else(|response| response)
}

pub async fn sources(req: HttpRequest, hub: web::Data<Hub>, slot: web::Data<PollerSlot>) -> HttpResponse {
    if let Err(response) = authorize(&req, &hub) {
        return response;
    }
    match slot.get() {
        Some((_, sources)) => HttpResponse::Ok().json(serde_json::json!({ "sources": sources })),
        None => error_response(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the poller is not running"),
    }
}
