//! The session actor: one per WebSocket connection. It parses client frames, answers them, keeps the
//! connection's subscriptions, writes the frames its registry delivers, and runs the heartbeat.
//!
//! Everything that touches the WebSocket transport (`actix-web-actors`) lives in this file, so moving to
//! `actix-ws` later is one file's work.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web::{HttpRequest, HttpResponse, web};
use actix_web_actors::ws;

use crate::hub::{Hub, PublishError};
use crate::messages::{Connect, Deliver, Disconnect, Kick, SessionId, Subscribe, Unsubscribe};
use crate::protocol::{
    self, ClientFrame, ErrorCode, ProtocolError, RequestId, Target, parse_client_frame,
    parse_target,
};
use crate::registry::Registry;
use crate::stats::Stats;

/// Limits and timings a session needs, copied out of the config once per worker.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    pub heartbeat_interval: Duration,
    pub client_timeout: Duration,
    pub max_message_bytes: usize,
    pub max_subscriptions: usize,
    pub mailbox_size: usize,
}

pub struct Session {
    id: SessionId,
    hub: Hub,
    registry: Addr<Registry>,
    limits: SessionLimits,
    /// Last time anything arrived from the client (frame, ping or pong).
    last_seen: Instant,
    /// Exact channels and pattern prefixes (with their `*`) this connection is subscribed to.
    subscriptions: HashSet<String>,
}

impl Session {
    pub fn new(hub: Hub, registry: Addr<Registry>, limits: SessionLimits) -> Session {
        Session {
            id: hub.next_session_id(),
            hub,
            registry,
            limits,
            last_seen: Instant::now(),
            subscriptions: HashSet::new(),
        }
    }

    fn send_error(ctx: &mut ws::WebsocketContext<Self>, id: &RequestId, error: &ProtocolError) {
        ctx.text(protocol::error_frame(id, error));
    }

    fn heartbeat(&self, ctx: &mut ws::WebsocketContext<Self>) {
        ctx.run_interval(self.limits.heartbeat_interval, |act, ctx| {
            if act.last_seen.elapsed() > act.limits.client_timeout {
                log::debug!("session {}: heartbeat timeout", act.id);
                ctx.close(Some(ws::CloseReason {
                    code: ws::CloseCode::Policy,
                    description: Some("heartbeat timeout".into()),
                }));
                ctx.stop();
                return;
            }
            ctx.ping(b"");
        });
    }

    fn handle_text(&mut self, text: &str, ctx: &mut ws::WebsocketContext<Self>) {
        let parsed = parse_client_frame(text);
        let id = parsed.id;
        let frame = match parsed.frame {
            Ok(frame) => frame,
            Err(error) => {
                Stats::add(&self.hub.stats().rejected_messages, 1);
                return Self::send_error(ctx, &id, &error);
            }
        };
        let result = match frame {
            ClientFrame::Ping => {
                ctx.text(protocol::pong_frame(&id));
                Ok(())
            }
            ClientFrame::Subscribe { channel } => self.subscribe(&id, channel, ctx),
            ClientFrame::Unsubscribe { channel } => self.unsubscribe(&id, channel, ctx),
            ClientFrame::Publish { channel, data } => self.publish(id.clone(), channel, data, ctx),
        };
        if let Err(error) = result {
            Self::send_error(ctx, &id, &error);
        }
    }

    fn subscribe(
        &mut self,
        id: &RequestId,
        name: String,
        ctx: &mut ws::WebsocketContext<Self>,
    ) -> Result<(), ProtocolError> {
        let target = parse_target(&name)?;
        let policy_channel = match &target {
            Target::Channel(c) => c.as_str(),
            Target::Pattern(p) => p.as_str(),
        };
        let policy =
            self.hub.config().policy(policy_channel).ok_or_else(|| {
                ProtocolError::new(ErrorCode::InvalidChannel, "unknown namespace")
            })?;
        if matches!(target, Target::Pattern(_)) && !policy.patterns {
            return Err(ProtocolError::new(
                ErrorCode::Forbidden,
                "pattern subscriptions are not enabled for this namespace",
            ));
        }
        if self.subscriptions.contains(&name) {
            // Idempotent: answer again, change nothing (no second snapshot).
            ctx.text(protocol::subscribed_frame(id, &name));
            return Ok(());
        }
        if self.subscriptions.len() >= self.limits.max_subscriptions {
            return Err(ProtocolError::new(
                ErrorCode::TooManySubscriptions,
                format!(
                    "at most {} subscriptions per connection",
                    self.limits.max_subscriptions
                ),
            ));
        }
        let ack = protocol::subscribed_frame(id, &name);
        self.subscriptions.insert(name);
        self.registry.do_send(Subscribe {
            id: self.id,
            target,
            ack,
        });
        Ok(())
    }

    fn unsubscribe(
        &mut self,
        id: &RequestId,
        name: String,
        ctx: &mut ws::WebsocketContext<Self>,
    ) -> Result<(), ProtocolError> {
        let target = parse_target(&name)?;
        if !self.subscriptions.remove(&name) {
            return Err(ProtocolError::new(
                ErrorCode::NotSubscribed,
                format!("not subscribed to `{name}`"),
            ));
        }
        self.registry.do_send(Unsubscribe {
            id: self.id,
            target,
        });
        ctx.text(protocol::unsubscribed_frame(id, &name));
        Ok(())
    }

    fn publish(
        &mut self,
        id: RequestId,
        channel: String,
        data: Box<serde_json::value::RawValue>,
        ctx: &mut ws::WebsocketContext<Self>,
    ) -> Result<(), ProtocolError> {
        protocol::validate_channel(&channel)?;
        let policy =
            self.hub.config().policy(&channel).ok_or_else(|| {
                ProtocolError::new(ErrorCode::InvalidChannel, "unknown namespace")
            })?;
        if !policy.client_publish {
            return Err(ProtocolError::new(
                ErrorCode::Forbidden,
                "clients may not publish to this namespace",
            ));
        }
        let hub = self.hub.clone();
        let fut = async move {
            let result = hub.publish(&channel, data.get()).await;
            (channel, result)
        };
        // `wait` keeps this connection's publishes in order: the next frame is read once this one is sent.
        ctx.wait(
            fut.into_actor(self)
                .map(move |(channel, result), _, ctx| match result {
                    Ok(outcome) => ctx.text(protocol::published_frame(&id, &channel, outcome.seq)),
                    Err(PublishError::Unavailable(message)) => Self::send_error(
                        ctx,
                        &id,
                        &ProtocolError::new(ErrorCode::Unavailable, message),
                    ),
                }),
        );
        Ok(())
    }
}

impl Actor for Session {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.limits.mailbox_size);
        Stats::add(&self.hub.stats().connections, 1);
        self.heartbeat(ctx);
        let addr = ctx.address();
        self.registry.do_send(Connect {
            id: self.id,
            deliver: addr.clone().recipient(),
            kick: addr.recipient(),
        });
    }

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        self.registry.do_send(Disconnect { id: self.id });
        self.hub
            .stats()
            .connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        Running::Stop
    }
}

impl Handler<Deliver> for Session {
    type Result = ();

    fn handle(&mut self, msg: Deliver, ctx: &mut Self::Context) {
        ctx.text(msg.0);
    }
}

impl Handler<Kick> for Session {
    type Result = ();

    fn handle(&mut self, msg: Kick, ctx: &mut Self::Context) {
        ctx.close(Some(ws::CloseReason {
            code: ws::CloseCode::from(msg.code),
            description: Some(msg.reason.into()),
        }));
        ctx.stop();
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for Session {
    fn handle(&mut self, msg: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        self.last_seen = Instant::now();
        match msg {
            Ok(ws::Message::Text(text)) => self.handle_text(&text, ctx),
            Ok(ws::Message::Binary(_)) => Self::send_error(
                ctx,
                &None,
                &ProtocolError::new(
                    ErrorCode::BadRequest,
                    "binary frames are not supported; send JSON text",
                ),
            ),
            Ok(ws::Message::Ping(payload)) => ctx.pong(&payload),
            Ok(ws::Message::Pong(_)) | Ok(ws::Message::Nop) => {}
            Ok(ws::Message::Continuation(_)) => Self::send_error(
                ctx,
                &None,
                &ProtocolError::new(ErrorCode::BadRequest, "fragmented frames are not supported"),
            ),
            Ok(ws::Message::Close(reason)) => {
                ctx.close(reason);
                ctx.stop();
            }
            Err(ws::ProtocolError::Overflow) => {
                ctx.close(Some(ws::CloseReason {
                    code: ws::CloseCode::Size,
                    description: Some(format!(
                        "frame larger than {} bytes",
                        self.limits.max_message_bytes
                    )),
                }));
                ctx.stop();
            }
            Err(e) => {
                log::debug!("session {}: protocol error: {e}", self.id);
                ctx.close(Some(ws::CloseReason {
                    code: ws::CloseCode::Protocol,
                    description: Some("protocol error".into()),
                }));
                ctx.stop();
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

/// `GET /ws`: checks the origin, then hands the connection to a new session actor.
pub async fn ws_route(
    req: HttpRequest,
    stream: web::Payload,
    hub: web::Data<Hub>,
    registry: web::Data<Addr<Registry>>,
) -> Result<HttpResponse, actix_web::Error> {
    if hub.is_shutting_down() {
        return Ok(crate::http::error_response(
            actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "server is shutting down",
        ));
    }
    if !crate::http::origin_allowed(&req, hub.config()) {
        return Ok(crate::http::error_response(
            actix_web::http::StatusCode::FORBIDDEN,
            "forbidden",
            "origin not allowed",
        ));
    }
    let limits = hub.session_limits();
    let session = Session::new(hub.get_ref().clone(), registry.get_ref().clone(), limits);
    ws::WsResponseBuilder::new(session, &req, stream)
        .frame_size(limits.max_message_bytes)
        .start()
}
