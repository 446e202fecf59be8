//! The session actor: one per WebSocket connection. It answers client frames, keeps the connection's
//! subscriptions and runs the heartbeat. Its socket is driven by a [`Transport`] spawned into its context;
//! what it sends goes through the connection's [`Outbox`], the same queue its registry delivers into.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::core::config::WebsocketConfig;
use crate::core::endpoint::{Binding, Format};
use crate::core::position::Position;
use crate::core::protocol::{
    self, ClientFrame, ErrorCode, ProtocolError, RequestId, Target, close, parse_client_frame,
    parse_target,
};
use crate::core::token::{self, Identity, Standing};
use crate::engine::Member;
use crate::node::hub::{Hub, PublishError};
use crate::node::messages::{Connect, Disconnect, SessionId, Subscribe, Unsubscribe};
use crate::node::registry::Registry;
use crate::node::subscribe_rules;
use crate::stats::Stats;
use crate::transport::{Endpoint, Failure, Outbox, Transport, TransportLimits, frame};

/// Whatever must live exactly as long as the session: the edge's connection-admission slot, given back when
/// the session's context is dropped, however the connection ends. Type-erased so the node does not depend on
/// the edge that admitted it.
pub type Permit = Box<dyn Send + 'static>;

/// Limits and timings a session needs, copied out of the config once per worker.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    pub heartbeat_interval: Duration,
    pub client_timeout: Duration,
    pub max_message_bytes: usize,
    pub max_subscriptions: usize,
    pub mailbox_size: usize,
    pub max_queued_bytes: usize,
    pub write_timeout: Duration,
    pub write_delay: Duration,
    pub max_patterns: usize,
    pub requests_per_second: f64,
    pub request_burst: f64,
    pub rate_limited_close_after: Duration,
}

impl SessionLimits {
    pub fn new(ws: &WebsocketConfig) -> SessionLimits {
        SessionLimits {
            heartbeat_interval: ws.heartbeat_interval,
            client_timeout: ws.client_timeout,
            max_message_bytes: ws.max_message_bytes,
            max_subscriptions: ws.max_subscriptions_per_connection,
            mailbox_size: ws.mailbox_size,
            max_queued_bytes: ws.max_queued_bytes,
            write_timeout: ws.write_timeout,
            write_delay: ws.write_delay,
            max_patterns: ws.max_patterns_per_connection,
            requests_per_second: f64::from(ws.requests_per_second),
            request_burst: f64::from(ws.request_burst),
            rate_limited_close_after: ws.rate_limited_close_after,
        }
    }

    /// The part of the limits the connection's transport enforces.
    pub fn transport(&self) -> TransportLimits {
        TransportLimits {
            max_message_bytes: self.max_message_bytes,
            write_timeout: self.write_timeout,
        }
    }
}

/// A connection's request budget: a token bucket refilled at `requests_per_second` up to `request_burst`.
/// Refused requests do not run, so a flood costs a parse and an error frame each, not a publish or a
/// subscribe. A connection that is refused at least once in every second for `rate_limited_close_after` is
/// not slowing down and is closed.
#[derive(Debug)]
struct RequestBudget {
    tokens: f64,
    refilled: Instant,
    /// Start of the current run of refusals without a quiet second in between.
    limited_since: Option<Instant>,
    last_refused: Instant,
}

/// What the budget says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Run,
    Refuse,
    Close,
}

/// A run of refusals ends when a second passes without one.
const QUIET_GAP: Duration = Duration::from_secs(1);

impl RequestBudget {
    fn new(limits: &SessionLimits, now: Instant) -> RequestBudget {
        RequestBudget {
            tokens: limits.request_burst,
            refilled: now,
            limited_since: None,
            last_refused: now,
        }
    }

    fn take(&mut self, limits: &SessionLimits, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens =
            (self.tokens + elapsed * limits.requests_per_second).min(limits.request_burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Run;
        }
        let since = match self.limited_since {
            Some(since) if now.saturating_duration_since(self.last_refused) < QUIET_GAP => since,
            _ => now,
        };
        self.limited_since = Some(since);
        self.last_refused = now;
        if now.saturating_duration_since(since) >= limits.rate_limited_close_after {
            Verdict::Close
        } else {
            Verdict::Refuse
        }
    }
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
    /// How many of `subscriptions` are patterns.
    patterns: usize,
    /// Requests this connection may still make now.
    budget: RequestBudget,
    /// Refused requests answered in the current second (`refusals_since`). Past `request_burst` of them the
    /// connection's input is paused until the second is over: a flood then costs at most
    /// `requests_per_second + 2 × request_burst` frames a second, the rest waits in the kernel and TCP holds
    /// the client back.
    refusals: u32,
    refusals_since: Instant,
    /// Input is paused for the rest of the current second (see `refusals`).
    throttled: bool,
    /// Frames to the client, shared with the registry and written by the transport.
    outbox: Outbox,
    /// A publish is in flight: the transport reads no further frame until it is answered, so a connection's
    /// publishes keep their order.
    publishing: bool,
    /// A presence query is in flight: like a publish, the next frame waits for its answer, so one connection
    /// has at most one presence read running.
    querying: bool,
    /// The transport, parked while `publishing`, `querying` or `throttled`.
    resume_input: Option<Waker>,
    /// This connection's slot in the replica's connection budgets, given back when the session is dropped.
    _permit: Permit,
    /// Who the connection is, from its last valid connection token; `None`: anonymous.
    identity: Option<Identity>,
    /// The timer that closes the connection with 4001 when `identity` expires.
    expiry: Option<SpawnHandle>,
    /// Subscriptions that rest on a token (the connection's or a subscription token), by name.
    standing: HashMap<String, Standing>,
    /// The endpoint this connection was opened on (`[[endpoints]]`): subscribed to its channel at once.
    endpoint: Option<Binding>,
}

impl Session {
    pub fn new(
        hub: Hub,
        registry: Addr<Registry>,
        limits: SessionLimits,
        outbox: Outbox,
        permit: Permit,
        identity: Option<Identity>,
        endpoint: Option<Binding>,
    ) -> Session {
        Session {
            id: hub.next_session_id(),
            hub,
            registry,
            limits,
            last_seen: Instant::now(),
            subscriptions: HashSet::new(),
            patterns: 0,
            budget: RequestBudget::new(&limits, Instant::now()),
            refusals: 0,
            refusals_since: Instant::now(),
            throttled: false,
            outbox,
            publishing: false,
            querying: false,
            resume_input: None,
            _permit: permit,
            identity,
            expiry: None,
            standing: HashMap::new(),
            endpoint,
        }
    }

    fn send_error(&self, id: &RequestId, error: &ProtocolError) {
        self.hub.metrics().rejected(error.code);
        self.outbox.push_text(&protocol::error_frame(id, error));
    }

    fn heartbeat(&self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.limits.heartbeat_interval, |act, _| {
            if act.last_seen.elapsed() > act.limits.client_timeout {
                if act.outbox.close(close::POLICY, "heartbeat timeout") {
                    Stats::add(&act.hub.stats().heartbeat_timeouts, 1);
                    log::debug!("session {}: heartbeat timeout", act.id);
                }
                return;
            }
            act.outbox.push_or_close(frame::ping());
        });
    }

    /// Spends one request of the budget; `false` when the request must not run (it has been answered, or the
    /// connection is being closed).
    fn admit_request(&mut self, id: &RequestId, ctx: &mut Context<Self>) -> bool {
        let now = Instant::now();
        match self.budget.take(&self.limits, now) {
            Verdict::Run => true,
            Verdict::Refuse => {
                Stats::add(&self.hub.stats().requests_rate_limited, 1);
                let message = format!(
                    "more than {} requests per second",
                    self.limits.requests_per_second
                );
                self.send_error(id, &ProtocolError::new(ErrorCode::RateLimited, message));
                self.count_refusal(now, ctx);
                false
            }
            Verdict::Close => {
                Stats::add(&self.hub.stats().requests_rate_limited, 1);
                if self.outbox.close(close::POLICY, "request rate exceeded") {
                    Stats::add(&self.hub.stats().rate_limit_disconnects, 1);
                    log::debug!("session {}: closed for its request rate", self.id);
                }
                false
            }
        }
    }

    /// Counts an answered refusal; past `request_burst` of them in one second, reading pauses until the
    /// second is over.
    fn count_refusal(&mut self, now: Instant, ctx: &mut Context<Self>) {
        if now.saturating_duration_since(self.refusals_since) >= Duration::from_secs(1) {
            self.refusals = 0;
            self.refusals_since = now;
        }
        self.refusals += 1;
        if f64::from(self.refusals) < self.limits.request_burst || self.throttled {
            return;
        }
        self.throttled = true;
        let resume = (self.refusals_since + Duration::from_secs(1)).saturating_duration_since(now);
        ctx.run_later(resume, |act, _| {
            let now = Instant::now();
            act.throttled = false;
            act.refusals = 0;
            act.refusals_since = now;
            // The pause was spent over the rate (the client's requests waited unread): it does not break the
            // run of refusals that closes a connection after `rate_limited_close_after`.
            act.budget.last_refused = now;
            if !act.publishing
                && let Some(waker) = act.resume_input.take()
            {
                waker.wake();
            }
        });
    }

    fn handle_text(&mut self, text: &str, ctx: &mut Context<Self>) {
        if self.speaks_raw() {
            return self.ignore_frame();
        }
        let parsed = parse_client_frame(text);
        let id = parsed.id;
        // Malformed frames spend the budget too: each one costs a parse and an answer.
        if !self.admit_request(&id, ctx) {
            return;
        }
        let frame = match parsed.frame {
            Ok(frame) => frame,
            Err(error) => {
                Stats::add(&self.hub.stats().rejected_messages, 1);
                return self.send_error(&id, &error);
            }
        };
        let result = match frame {
            ClientFrame::Ping => {
                self.outbox.push_text(&protocol::pong_frame(&id));
                Ok(())
            }
            ClientFrame::Subscribe {
                channel,
                since,
                since_channels,
                token,
            } => self.subscribe(&id, channel, (since, since_channels), token, ctx),
            ClientFrame::Auth { token } => self.authenticate(&id, &token, ctx),
            ClientFrame::Unsubscribe { channel } => self.unsubscribe(&id, channel),
            ClientFrame::Publish { channel, data } => self.publish(id.clone(), channel, data, ctx),
            ClientFrame::Presence { channel } => self.presence(&id, channel, ctx),
        };
        if let Err(error) = result {
            self.send_error(&id, &error);
        }
    }

    /// A raw endpoint's client does not speak the protocol: what it sends is read, counted and dropped.
    fn speaks_raw(&self) -> bool {
        self.endpoint
            .as_ref()
            .is_some_and(|e| e.format == Format::Raw)
    }

    fn ignore_frame(&self) {
        Stats::add(&self.hub.stats().endpoint_frames_ignored, 1);
    }

    /// Subscribes an endpoint's connection to its channel under the rules of a subscribe; a refusal closes
    /// the connection with 1008 and the reason, since its client cannot read an error frame.
    fn subscribe_endpoint(&mut self, ctx: &mut Context<Self>) {
        let Some(channel) = self.endpoint.as_ref().map(|e| e.channel.clone()) else {
            return;
        };
        if let Err(error) = self.subscribe(&None, channel, (None, None), None, ctx) {
            self.hub.metrics().rejected(error.code);
            if self.outbox.close(close::POLICY, &error.message) {
                log::debug!(
                    "session {}: endpoint subscribe refused: {}",
                    self.id,
                    error.message
                );
            }
        }
    }

    fn subscribe(
        &mut self,
        id: &RequestId,
        name: String,
        (since, since_channels): (Option<Position>, Option<Vec<(String, Position)>>),
        token: Option<String>,
        ctx: &mut Context<Self>,
    ) -> Result<(), ProtocolError> {
        let target = parse_target(&name)?;
        let since_channels = match (&target, since_channels) {
            (Target::Pattern(prefix), Some(named)) => Some(self.pattern_since(prefix, named)?),
            _ => None,
        };
        let policy = subscribe_rules::target_policy(self.hub.config(), &target)?;
        let standing = self.may_subscribe(&policy, &target, token.as_deref())?;
        if self.subscriptions.contains(&name) {
            // Idempotent: answer again, change nothing (no second snapshot).
            self.outbox
                .push_text(&protocol::subscribed_frame(id, &name));
            return Ok(());
        }
        let is_pattern = matches!(target, Target::Pattern(_));
        subscribe_rules::within_limits(
            self.hub.stats(),
            subscribe_rules::Limits {
                max_subscriptions: self.limits.max_subscriptions,
                max_patterns: self.limits.max_patterns,
                per: "connection",
            },
            subscribe_rules::Held {
                subscriptions: self.subscriptions.len(),
                patterns: self.patterns,
            },
            &target,
        )?;
        let ack = frame::text(&protocol::subscribed_frame(id, &name));
        if !is_pattern && (policy.presence || policy.join_leave) {
            self.join_presence(&name, policy.join_leave);
        }
        self.rest_on(&name, standing, ctx);
        self.subscriptions.insert(name);
        self.patterns += usize::from(is_pattern);
        // A pattern recovers per named channel (`since_channels`); `since` applies to one channel's numbering.
        let since = since.filter(|_| !is_pattern);
        self.registry.do_send(Subscribe {
            id: self.id,
            target,
            request: id.clone(),
            since,
            since_channels,
            policy,
            ack,
        });
        Ok(())
    }

    /// Checks a pattern subscribe's `since` map: at most `channels.max_pattern_positions` channels, each a
    /// valid channel the pattern matches and a pattern may deliver (no user channels).
    fn pattern_since(
        &self,
        prefix: &str,
        named: Vec<(String, Position)>,
    ) -> Result<Vec<(std::sync::Arc<str>, Position)>, ProtocolError> {
        let bad = |m: String| ProtocolError::new(ErrorCode::BadRequest, m);
        let cap = self.hub.config().channels.max_pattern_positions;
        if named.len() > cap {
            return Err(bad(format!(
                "a pattern's `since` names at most {cap} channels"
            )));
        }
        named
            .into_iter()
            .map(|(channel, position)| {
                protocol::validate_channel(&channel)
                    .map_err(|e| bad(format!("`since`: {}", e.message)))?;
                if !channel.starts_with(prefix) {
                    return Err(bad(format!(
                        "`since` names `{channel}`, which the pattern does not match"
                    )));
                }
                if protocol::channel_owner(&channel).is_some() {
                    return Err(bad(format!(
                        "`since` names the user channel `{channel}`, which patterns never deliver"
                    )));
                }
                Ok((channel.into(), position))
            })
            .collect()
    }

    fn unsubscribe(&mut self, id: &RequestId, name: String) -> Result<(), ProtocolError> {
        let target = parse_target(&name)?;
        if !self.subscriptions.remove(&name) {
            return Err(ProtocolError::new(
                ErrorCode::NotSubscribed,
                format!("not subscribed to `{name}`"),
            ));
        }
        self.patterns -= usize::from(matches!(target, Target::Pattern(_)));
        self.standing.remove(&name);
        self.leave_presence(&name);
        self.registry.do_send(Unsubscribe {
            id: self.id,
            target,
        });
        self.outbox
            .push_text(&protocol::unsubscribed_frame(id, &name));
        Ok(())
    }

    fn publish(
        &mut self,
        id: RequestId,
        channel: String,
        data: Box<serde_json::value::RawValue>,
        ctx: &mut Context<Self>,
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
        let auth = self.hub.verifier().is_some();
        token::may_publish(auth, &policy, &channel, self.identity.as_ref()).inspect_err(|_| {
            Stats::add(&self.hub.stats().auth_refused, 1);
        })?;
        let hub = self.hub.clone();
        let fut = async move {
            let result = hub.publish(&channel, data.get()).await;
            (channel, result)
        };
        // Input pauses until this publish is answered: a connection's publishes keep their order, while
        // deliveries to it go on.
        self.publishing = true;
        ctx.spawn(fut.into_actor(self).map(move |(channel, result), act, _| {
            match result {
                Ok(outcome) => {
                    act.outbox
                        .push_text(&protocol::published_frame(&id, &channel, outcome.seq))
                }
                Err(PublishError::Unavailable(message)) => {
                    act.send_error(&id, &ProtocolError::new(ErrorCode::Unavailable, message))
                }
            }
            act.publishing = false;
            if !act.throttled
                && let Some(waker) = act.resume_input.take()
            {
                waker.wake();
            }
        }));
        Ok(())
    }
}

/// Token auth: the connection's identity, its expiry, and the subscriptions that rest on tokens.
impl Session {
    /// Checks a subscribe against the token rules; a subscription token sent with it is verified first.
    fn may_subscribe(
        &self,
        policy: &crate::core::config::ChannelPolicy,
        target: &Target,
        token: Option<&str>,
    ) -> Result<Standing, ProtocolError> {
        let stats = self.hub.stats();
        let grant = match (self.hub.verifier(), token) {
            (Some(verifier), Some(token)) => {
                Some(verifier.verify_subscription(token).map_err(|e| {
                    Stats::add(&stats.tokens_rejected, 1);
                    ProtocolError::from(e)
                })?)
            }
            _ => None,
        };
        let auth = self.hub.verifier().is_some();
        token::may_subscribe(auth, policy, target, self.identity.as_ref(), grant.as_ref())
            .inspect_err(|_| Stats::add(&stats.auth_refused, 1))
    }

    /// Remembers what a new subscription rests on; one resting on a subscription token ends when it expires.
    fn rest_on(&mut self, name: &str, standing: Standing, ctx: &mut Context<Self>) {
        match standing {
            Standing::Open => return,
            Standing::ConnectionToken => {}
            Standing::SubscriptionToken(expires_at) => {
                Self::watch_grant(name.to_string(), expires_at, ctx)
            }
        }
        self.standing.insert(name.to_string(), standing);
    }

    /// Ends the subscription `name` when its subscription token expires (if it still rests on that token).
    fn watch_grant(name: String, expires_at: u64, ctx: &mut Context<Self>) {
        ctx.run_later(until(expires_at), move |act, ctx| {
            if act.standing.get(&name) != Some(&Standing::SubscriptionToken(expires_at)) {
                return;
            }
            if token::now_secs() < expires_at {
                // The timer is capped (see `until`): not there yet.
                return Self::watch_grant(name, expires_at, ctx);
            }
            act.revoke(&name, "token_expired");
        });
    }

    /// Ends a subscription the connection may no longer hold, telling the client why.
    fn revoke(&mut self, name: &str, reason: &str) {
        let Ok(target) = parse_target(name) else {
            return;
        };
        if !self.subscriptions.remove(name) {
            return;
        }
        self.standing.remove(name);
        self.patterns -= usize::from(matches!(target, Target::Pattern(_)));
        self.leave_presence(name);
        self.registry.do_send(Unsubscribe {
            id: self.id,
            target,
        });
        self.outbox
            .push_text(&protocol::revoked_frame(name, reason));
    }

    /// `{"op":"auth"}`: a first or a fresh connection token. A bad one changes nothing.
    fn authenticate(
        &mut self,
        id: &RequestId,
        token: &str,
        ctx: &mut Context<Self>,
    ) -> Result<(), ProtocolError> {
        let Some(verifier) = self.hub.verifier() else {
            return Err(ProtocolError::new(
                ErrorCode::InvalidToken,
                "this hub has no token auth configured",
            ));
        };
        let identity = verifier.verify_connection(token).map_err(|e| {
            Stats::add(&self.hub.stats().tokens_rejected, 1);
            // A key the cached JWKS lacks: fetch it (rate-limited) for the client's next try.
            if e.unknown_key
                && let Some(jwks) = verifier.jwks()
            {
                jwks.request_refresh();
            }
            ProtocolError::from(e)
        })?;
        if let Some(current) = &self.identity
            && current.user != identity.user
        {
            Stats::add(&self.hub.stats().auth_refused, 1);
            return Err(ProtocolError::new(
                ErrorCode::Forbidden,
                "a connection's user cannot change: reconnect with the other user's token",
            ));
        }
        self.outbox.push_text(&protocol::authed_frame(
            id,
            &identity.user,
            &identity.expires_at_rfc3339(),
        ));
        self.identity = Some(identity);
        self.schedule_expiry(ctx);
        // The new token's claims may cover less than the last one's.
        let resting: Vec<String> = self
            .standing
            .iter()
            .filter(|(_, s)| **s == Standing::ConnectionToken)
            .map(|(name, _)| name.clone())
            .collect();
        for name in resting {
            let still = parse_target(&name).ok().and_then(|target| {
                let policy = self.hub.config().policy(&name)?;
                token::may_subscribe(true, &policy, &target, self.identity.as_ref(), None).ok()
            });
            if still.is_none() {
                self.revoke(&name, "forbidden");
            }
        }
        Ok(())
    }

    /// Arms the timer that closes the connection with 4001 once its token expires.
    fn schedule_expiry(&mut self, ctx: &mut Context<Self>) {
        if let Some(handle) = self.expiry.take() {
            ctx.cancel_future(handle);
        }
        let Some(identity) = &self.identity else {
            return;
        };
        let at = identity.expires_at;
        self.expiry = Some(ctx.run_later(until(at), move |act, ctx| {
            act.expiry = None;
            if act.identity.as_ref().is_none_or(|i| i.expires_at != at) {
                return;
            }
            if token::now_secs() < at {
                // The timer is capped (see `until`): not there yet.
                return act.schedule_expiry(ctx);
            }
            if act.outbox.close(close::TOKEN_EXPIRED, "token expired") {
                Stats::add(&act.hub.stats().tokens_expired, 1);
                log::debug!("session {}: token expired", act.id);
            }
        }));
    }
}

/// Presence: the connection joins the presence of the channels it subscribes to where the namespace keeps
/// it, leaves it with them, and may ask who else is there.
impl Session {
    /// This connection as presence lists it, with its current identity.
    fn member(&self) -> Member {
        let client: Arc<str> = self.hub.client_id(self.id).into();
        let user = self.identity.as_ref().map(|i| i.user.as_str());
        let info = self.identity.as_ref().and_then(|i| i.info.as_deref());
        Member {
            json: protocol::member_json(&client, user, info).into(),
            user: user.map(Arc::from),
            client,
        }
    }

    fn join_presence(&self, channel: &str, announce: bool) {
        self.hub.presence().join(channel, self.member(), announce);
    }

    fn leave_presence(&self, channel: &str) {
        self.hub
            .presence()
            .leave(channel, &self.hub.client_id(self.id));
    }

    /// `{"op":"presence"}`: the channel's members on every replica, for a connection that may read it.
    fn presence(
        &mut self,
        id: &RequestId,
        name: String,
        ctx: &mut Context<Self>,
    ) -> Result<(), ProtocolError> {
        let target = parse_target(&name)?;
        if matches!(target, Target::Pattern(_)) {
            return Err(ProtocolError::new(
                ErrorCode::InvalidChannel,
                "presence is per channel, not per pattern",
            ));
        }
        let policy =
            self.hub.config().policy(&name).ok_or_else(|| {
                ProtocolError::new(ErrorCode::InvalidChannel, "unknown namespace")
            })?;
        if !policy.presence {
            return Err(ProtocolError::new(
                ErrorCode::Forbidden,
                "presence is not enabled for this namespace",
            ));
        }
        // A subscriber may read it (whatever token it subscribed with); anyone else needs the subscribe rules.
        if !self.subscriptions.contains(&name) {
            self.may_subscribe(&policy, &target, None)?;
        }
        let hub = self.hub.clone();
        let id = id.clone();
        let limit = hub.config().channels.max_presence_members;
        let fut = async move {
            let page = hub.engine().presence(&name, limit).await;
            (name, page)
        };
        // Like a publish, the next frame waits for the answer: one presence read per connection at a time.
        self.querying = true;
        ctx.spawn(fut.into_actor(self).map(move |(name, page), act, _| {
            act.querying = false;
            // Woken while still publishing or throttled, the transport only asks again.
            if let Some(waker) = act.resume_input.take() {
                waker.wake();
            }
            act.answer_presence(&id, &name, page);
        }));
        Ok(())
    }

    fn answer_presence(
        &self,
        id: &RequestId,
        name: &str,
        page: Result<crate::engine::PresencePage, crate::engine::EngineError>,
    ) {
        match page {
            Ok(page) => {
                let stats = self.hub.stats();
                Stats::add(&stats.presence_queries, 1);
                if page.truncated {
                    Stats::add(&stats.presence_truncated, 1);
                }
                self.outbox.push_text(&protocol::presence_frame(
                    id,
                    name,
                    &page.members,
                    page.truncated,
                ));
            }
            Err(e) => self.send_error(
                id,
                &ProtocolError::new(ErrorCode::Unavailable, format!("presence: {e}")),
            ),
        }
    }
}

/// Time until `expires_at` (seconds since the epoch), capped at a day so a far expiry never overflows a
/// timer; a capped timer re-arms itself.
fn until(expires_at: u64) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Duration::from_secs(expires_at)
        .saturating_sub(now)
        .min(Duration::from_secs(86_400))
}

impl Actor for Session {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        Stats::add(&self.hub.stats().connections, 1);
        self.heartbeat(ctx);
        self.schedule_expiry(ctx);
        self.registry.do_send(Connect {
            id: self.id,
            outbox: self.outbox.clone(),
        });
        self.subscribe_endpoint(ctx);
    }

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        self.registry.do_send(Disconnect { id: self.id });
        let subscriptions = std::mem::take(&mut self.subscriptions);
        for name in &subscriptions {
            self.leave_presence(name);
        }
        self.hub.metrics().disconnected(self.outbox.close_code());
        self.hub
            .stats()
            .connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        Running::Stop
    }
}

impl Endpoint for Session {
    fn on_text(&mut self, text: &str, ctx: &mut Context<Self>) {
        self.handle_text(text, ctx);
    }

    fn on_unsupported(&mut self, what: &'static str, ctx: &mut Context<Self>) {
        if self.speaks_raw() {
            return self.ignore_frame();
        }
        if self.admit_request(&None, ctx) {
            self.send_error(&None, &ProtocolError::new(ErrorCode::BadRequest, what));
        }
    }

    fn on_activity(&mut self) {
        self.last_seen = Instant::now();
    }

    fn on_failure(&mut self, failure: Failure) {
        let stats = self.hub.stats();
        let counter = match failure {
            Failure::TooBig => &stats.frames_too_big,
            Failure::Protocol => &stats.protocol_errors,
            Failure::WriteTimeout => &stats.write_timeouts,
        };
        Stats::add(counter, 1);
    }

    fn input_paused(&mut self, waker: &Waker) -> bool {
        let paused = self.publishing || self.querying || self.throttled;
        if paused {
            match &self.resume_input {
                Some(parked) if parked.will_wake(waker) => {}
                _ => self.resume_input = Some(waker.clone()),
            }
        }
        paused
    }
}

/// What the upgrade decided about a connection: who opened it (its `?token=`) and on which endpoint.
pub struct Opening {
    pub identity: Option<Identity>,
    pub endpoint: Option<Binding>,
}

/// Starts a session for an accepted WebSocket, with its transport in the same actor context.
pub fn start<S>(
    hub: Hub,
    registry: Addr<Registry>,
    limits: SessionLimits,
    transport: Transport<S>,
    outbox: Outbox,
    permit: Permit,
    opening: Opening,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    Session::create(move |ctx| {
        ctx.spawn(transport);
        let Opening { identity, endpoint } = opening;
        Session::new(hub, registry, limits, outbox, permit, identity, endpoint)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> SessionLimits {
        SessionLimits {
            heartbeat_interval: Duration::from_secs(30),
            client_timeout: Duration::from_secs(60),
            max_message_bytes: 65536,
            max_subscriptions: 128,
            mailbox_size: 1024,
            max_queued_bytes: 1 << 20,
            write_timeout: Duration::from_secs(10),
            write_delay: Duration::ZERO,
            max_patterns: 16,
            requests_per_second: 10.0,
            request_burst: 20.0,
            rate_limited_close_after: Duration::from_secs(5),
        }
    }

    #[test]
    fn the_budget_refills_and_closes_only_a_sustained_flood() {
        let limits = limits();
        let t0 = Instant::now();
        let mut budget = RequestBudget::new(&limits, t0);
        let ms = |n: u64| t0 + Duration::from_millis(n);
        for _ in 0..20 {
            assert_eq!(budget.take(&limits, t0), Verdict::Run);
        }
        assert_eq!(budget.take(&limits, t0), Verdict::Refuse);
        // 100 ms refill one token at 10 per second.
        assert_eq!(budget.take(&limits, ms(100)), Verdict::Run);
        assert_eq!(budget.take(&limits, ms(100)), Verdict::Refuse);
        // Quiet for more than a second (11 tokens back): the next run of refusals starts over.
        for _ in 0..11 {
            assert_eq!(budget.take(&limits, ms(1200)), Verdict::Run);
        }
        assert_eq!(budget.take(&limits, ms(1200)), Verdict::Refuse);
        // Asked every 50 ms, twice the refill rate: refused every other time, for the whole window: closed.
        let mut verdict = Verdict::Run;
        let mut at = 1200;
        while at <= 1200 + 5000 {
            at += 50;
            verdict = budget.take(&limits, ms(at));
            if verdict == Verdict::Close {
                break;
            }
        }
        assert_eq!(verdict, Verdict::Close);
        assert!(at >= 1200 + 5000, "closed after {at} ms");
    }
}
