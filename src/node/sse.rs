//! The subscriber behind one Server-Sent Events stream. It joins its worker's registry with its
//! connection's [`Outbox`] exactly as a WebSocket session does, so fan-out, recovery (`since`), the ordering
//! rule, the slow-consumer close and the shutdown drain are the registry's and are not repeated here. What is
//! left for this actor: subscribing once at the start (the stream takes no requests), the heartbeat the
//! stream turns into a comment line, and noticing that the client has gone.

use std::time::Duration;

use actix::prelude::*;
use tokio::sync::oneshot;

use crate::core::config::ChannelPolicy;
use crate::core::position::Position;
use crate::core::protocol::{self, Target, close};
use crate::node::hub::Hub;
use crate::node::messages::{Connect, Disconnect, SessionId, Subscribe};
use crate::node::registry::Registry;
use crate::stats::Stats;
use crate::transport::{Outbox, frame, sse};

/// One subscription of a stream, checked by the edge: the channel or pattern, its settings, where to resume.
pub struct StreamSubscription {
    pub name: String,
    pub target: Target,
    pub policy: ChannelPolicy,
    pub since: Option<Position>,
}

/// One stream's subscriber, on the worker thread that accepted the request (beside its registry).
pub struct SseSubscriber {
    /// Numbered with the WebSocket sessions: the registry tells its subscribers apart by this alone.
    id: SessionId,
    hub: Hub,
    registry: Addr<Registry>,
    /// The stream's queue, shared with the registry and drained by the response body.
    outbox: Outbox,
    /// `websocket.heartbeat_interval`: how often a comment line keeps proxies from closing an idle stream.
    heartbeat_interval: Duration,
    /// Sent to the registry when the actor starts.
    subscriptions: Vec<StreamSubscription>,
    /// The `exp` of the stream's connection token (seconds since the epoch): the stream ends then.
    token_expires_at: Option<u64>,
    /// Resolves when the response body is dropped: the client is gone.
    gone: Option<oneshot::Receiver<()>>,
    /// The outbox was found closing at a beat (slow consumer, shutdown): if the stream has not ended by the
    /// next one, its client is not reading and its queue is let go.
    closing_seen: bool,
}

impl SseSubscriber {
    /// Starts the subscriber on the calling (worker) thread, beside its registry.
    pub fn start(
        hub: Hub,
        registry: Addr<Registry>,
        outbox: Outbox,
        subscriptions: Vec<StreamSubscription>,
        token_expires_at: Option<u64>,
        gone: oneshot::Receiver<()>,
    ) -> Addr<SseSubscriber> {
        SseSubscriber {
            id: hub.next_session_id(),
            heartbeat_interval: hub.config().websocket.heartbeat_interval,
            hub,
            registry,
            outbox,
            subscriptions,
            token_expires_at,
            gone: Some(gone),
            closing_seen: false,
        }
        .start()
    }
}

impl Actor for SseSubscriber {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        Stats::add(&self.hub.stats().sse_connections, 1);
        Stats::add(&self.hub.stats().sse_streams_opened, 1);
        self.registry.do_send(Connect {
            id: self.id,
            outbox: self.outbox.clone(),
        });
        for subscription in std::mem::take(&mut self.subscriptions) {
            // Patterns do not recover: `since` applies to one channel's numbering.
            let since = subscription
                .since
                .filter(|_| matches!(subscription.target, Target::Channel(_)));
            self.registry.do_send(Subscribe {
                id: self.id,
                ack: frame::text(&protocol::subscribed_frame(&None, &subscription.name)),
                target: subscription.target,
                request: None,
                since,
                since_channels: None,
                policy: subscription.policy,
            });
        }
        if let Some(gone) = self.gone.take() {
            ctx.spawn(
                async move {
                    let _ = gone.await;
                }
                .into_actor(self)
                .map(|_, _, ctx| ctx.stop()),
            );
        }
        if let Some(exp) = self.token_expires_at {
            // A stream cannot be handed a fresh token: it ends when its token does, and the client opens a
            // new one with a fresh token.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let left = Duration::from_secs(exp).saturating_sub(now);
            ctx.run_later(left, |act, _| {
                Stats::add(&act.hub.stats().tokens_expired, 1);
                act.outbox.close(close::TOKEN_EXPIRED, "token expired");
            });
        }
        ctx.run_interval(self.heartbeat_interval, |act, ctx| {
            if act.outbox.is_closing() {
                if act.closing_seen {
                    sse::release(&act.outbox);
                    ctx.stop();
                }
                act.closing_seen = true;
                return;
            }
            act.outbox.push_or_close(frame::ping());
        });
    }

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        self.registry.do_send(Disconnect { id: self.id });
        self.hub
            .stats()
            .sse_connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        Running::Stop
    }
}
