//! `GET /api/channels/{channel}` (the latest value: the REST fallback for clients whose WebSocket fails) and
//! `GET /api/channels/{channel}/history?limit=N` (the last snapshots, newest first; with `since_seq=N` and
//! `epoch=E`, what a client that saw up to N missed, oldest first, and whether that is all of it). A channel
//! that needs a token to subscribe needs the same connection token here, as `Authorization: Bearer <jwt>`.
//! `GET /api/channels/{channel}/presence` and `.../presence/stats`: its members on every replica, and how
//! many there are, in namespaces with `presence = true`, under the same read rules.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::value::RawValue;

use std::sync::Arc;

use crate::core::position::Position;
use crate::core::protocol::{MAX_EPOCH_LEN, Target, validate_channel};
use crate::core::publication::Publication;
use crate::engine::{EngineError, Window};
use crate::http::auth::{bearer_token, may_read, request_identity};
use crate::http::reply::error_response;
use crate::node::hub::Hub;
use crate::stats::Stats;

/// The answer refusing to read `channel`, if the request may not: the rules of a subscribe, with the bearer
/// token as the connection token.
fn read_refusal(hub: &Hub, req: &HttpRequest, channel: &str) -> Option<HttpResponse> {
    let target = Target::Channel(channel.to_string());
    let refused = request_identity(hub, bearer_token(req))
        .and_then(|identity| may_read(hub, identity.as_ref(), &target))
        .err()?;
    Some(error_response(
        refused.status,
        refused.code,
        &refused.message,
    ))
}

pub async fn latest(
    hub: web::Data<Hub>,
    req: HttpRequest,
    channel: web::Path<String>,
) -> HttpResponse {
    if let Err(e) = validate_channel(&channel) {
        return error_response(StatusCode::BAD_REQUEST, e.code.as_str(), &e.message);
    }
    if let Some(refused) = read_refusal(&hub, &req, &channel) {
        return refused;
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
    /// Only messages after this seq, oldest first: what a client that saw up to it missed.
    since_seq: Option<u64>,
    /// The epoch `since_seq` belongs to (default: the channel's current one).
    epoch: Option<String>,
}

/// One history item. `data` is the published JSON as is (re-parsing it would reorder keys and round numbers).
#[derive(serde::Serialize)]
struct Item<'a> {
    data: &'a RawValue,
    seq: Option<u64>,
    ts: Option<&'a str>,
}

#[derive(serde::Serialize)]
struct History<'a> {
    channel: &'a str,
    /// The channel's epoch: `since_seq` is only meaningful under it.
    epoch: &'a str,
    /// The channel's newest seq under `epoch` (0 when none): a reader of `since_seq` pages that are cut by
    /// `limit` knows it has everything when its last item has this seq.
    seq: u64,
    /// With `since_seq`: whether the history held every message after it under the epoch asked for (the
    /// meaning of `recovered` on the WebSocket). Absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    recovered: Option<bool>,
    items: Vec<Item<'a>>,
}

pub async fn history(
    hub: web::Data<Hub>,
    req: HttpRequest,
    channel: web::Path<String>,
    // Taken as a `Result` so a bad query gets the API's error shape, not actix's plain-text reply.
    query: Result<web::Query<HistoryQuery>, actix_web::Error>,
) -> HttpResponse {
    if let Err(e) = validate_channel(&channel) {
        return error_response(StatusCode::BAD_REQUEST, e.code.as_str(), &e.message);
    }
    if let Some(refused) = read_refusal(&hub, &req, &channel) {
        return refused;
    }
    let query = match query {
        Ok(query) => query.into_inner(),
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("limit and since_seq must be whole numbers: {e}"),
            );
        }
    };
    if let Some(epoch) = &query.epoch {
        let refusal = if query.since_seq.is_none() {
            Some("epoch is only meaningful with since_seq".to_string())
        } else if epoch.is_empty() || epoch.chars().count() > MAX_EPOCH_LEN {
            Some(format!("epoch is 1 to {MAX_EPOCH_LEN} characters"))
        } else {
            None
        };
        if let Some(message) = refusal {
            return error_response(StatusCode::BAD_REQUEST, "bad_request", &message);
        }
    }
    let policy = hub
        .config()
        .policy(&channel)
        .unwrap_or_else(|| hub.config().default_policy());
    let limit = query
        .limit
        .unwrap_or(policy.history_size)
        .min(policy.history_size.max(1))
        .min(1000);
    // One atomic read: the epoch, the newest seq and the history belong together.
    let window = match hub.engine().window(&channel, policy).await {
        Ok(window) => window,
        Err(e) => return error_response(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &e.0),
    };
    let Some(after) = query.since_seq else {
        // The plain read lists every stored snapshot (values of outside producers without seq included).
        return match hub.engine().history(&channel, limit).await {
            Ok(found) => render(&channel, &window, None, &found),
            Err(e) => error_response(StatusCode::SERVICE_UNAVAILABLE, "unavailable", &e.0),
        };
    };
    let since = Position {
        epoch: query.epoch.unwrap_or_else(|| window.epoch.to_string()),
        seq: after,
    };
    let (recovered, mut found) = match window.replay_after(&since) {
        Some(missed) => (true, missed),
        None => {
            // What history holds after `since_seq`, oldest first, though not everything: the answer says so.
            let mut held: Vec<Arc<Publication>> = window
                .history
                .iter()
                .filter(|p| p.seq.is_some_and(|seq| seq > after))
                .cloned()
                .collect();
            held.reverse();
            (false, held)
        }
    };
    found.truncate(limit);
    render(&channel, &window, Some(recovered), &found)
}

fn render(
    channel: &str,
    window: &Window,
    recovered: Option<bool>,
    found: &[Arc<Publication>],
) -> HttpResponse {
    let items = found
        .iter()
        .map(|p| {
            Item {
                // Valid JSON by construction (validated on publish or on arrival from Redis).
                data: serde_json::from_str(p.data()).unwrap_or(RawValue::NULL),
                seq: p.seq,
                ts: p.ts(),
            }
        })
        .collect();
    HttpResponse::Ok()
        .insert_header(("Cache-Control", "no-store"))
        .json(History {
            channel,
            epoch: &window.epoch,
            seq: window.seq,
            recovered,
            items,
        })
}

/// The answer refusing presence of `channel`, if any: a name that is not a channel, a namespace without
/// presence, or a request that may not read the channel.
fn presence_refusal(hub: &Hub, req: &HttpRequest, channel: &str) -> Option<HttpResponse> {
    if let Err(e) = validate_channel(channel) {
        return Some(error_response(
            StatusCode::BAD_REQUEST,
            e.code.as_str(),
            &e.message,
        ));
    }
    let enabled = hub.config().policy(channel).is_some_and(|p| p.presence);
    if !enabled {
        return Some(error_response(
            StatusCode::FORBIDDEN,
            "forbidden",
            "presence is not enabled for this namespace",
        ));
    }
    read_refusal(hub, req, channel)
}

fn unavailable(e: EngineError) -> HttpResponse {
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        &format!("presence: {e}"),
    )
}

/// Answers one presence read of `channel`: refused as [`presence_refusal`] says (before anything is read),
/// unavailable when `read` fails, otherwise what it read, never cached, and counted as a presence query.
async fn presence_read<T: serde::Serialize>(
    hub: &Hub,
    req: &HttpRequest,
    channel: &str,
    read: impl AsyncFnOnce() -> Result<T, EngineError>,
) -> HttpResponse {
    if let Some(refused) = presence_refusal(hub, req, channel) {
        return refused;
    }
    match read().await {
        Ok(answer) => {
            Stats::add(&hub.stats().presence_queries, 1);
            HttpResponse::Ok()
                .insert_header(("Cache-Control", "no-store"))
                .json(answer)
        }
        Err(e) => unavailable(e),
    }
}

#[derive(serde::Serialize)]
struct PresenceAnswer<'a> {
    channel: &'a str,
    members: Vec<Box<RawValue>>,
    /// Present (true) when the channel has more than `channels.max_presence_members` members.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    truncated: bool,
}

/// `GET /api/channels/{channel}/presence`: the channel's members on every replica.
pub async fn presence(
    hub: web::Data<Hub>,
    req: HttpRequest,
    channel: web::Path<String>,
) -> HttpResponse {
    let limit = hub.config().channels.max_presence_members;
    presence_read(&hub, &req, &channel, async || {
        let page = hub.engine().presence(&channel, limit).await?;
        if page.truncated {
            Stats::add(&hub.stats().presence_truncated, 1);
        }
        // Stored members are JSON the hub wrote itself; one that does not parse is skipped, not passed on.
        let members = page
            .members
            .into_iter()
            .filter_map(|m| RawValue::from_string(m).ok())
            .collect();
        Ok(PresenceAnswer {
            channel: &channel,
            members,
            truncated: page.truncated,
        })
    })
    .await
}

/// `GET /api/channels/{channel}/presence/stats`: how many connections and distinct users are members.
pub async fn presence_stats(
    hub: web::Data<Hub>,
    req: HttpRequest,
    channel: web::Path<String>,
) -> HttpResponse {
    presence_read(&hub, &req, &channel, async || {
        hub.engine().presence_counts(&channel).await
    })
    .await
}
