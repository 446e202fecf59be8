//! The actix messages that cross the node's actors: sessions <-> registry, and local delivery -> registry.
//! Named for intent; the registry stores each session's `Outbox`, so it depends on no session type.

use std::sync::Arc;

use actix::prelude::*;
use bytes::Bytes;

use crate::core::config::ChannelPolicy;
use crate::core::position::Position;
use crate::core::protocol::{RequestId, Target};
use crate::core::publication::Publication;
use crate::engine::Window;
use crate::transport::Outbox;

/// Identifies one WebSocket connection for the lifetime of the process.
pub type SessionId = u64;

/// A session announces itself to its registry, with the queue its frames go into.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Connect {
    pub id: SessionId,
    pub outbox: Outbox,
}

/// A session is gone: drop its subscriptions.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnect {
    pub id: SessionId,
}

/// Add a subscription. The registry sends `ack` (the `subscribed` frame) once the subscription is live, then
/// the snapshot: after the acknowledgement, every message arrives as a `message`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Subscribe {
    pub id: SessionId,
    pub target: Target,
    /// The client's request id, echoed in the `subscribed` frame the registry builds for a channel (with the
    /// channel's position, known only once the subscription is live).
    pub request: RequestId,
    /// Where the client stood in the channel, to recover from.
    pub since: Option<Position>,
    /// A pattern subscription with `since`: where the client stood in each channel it names, to recover
    /// from (possibly none: the client then only asks to be told each channel's epoch).
    pub since_channels: Option<Vec<(Arc<str>, Position)>>,
    /// The channel's settings (how much history to read).
    pub policy: ChannelPolicy,
    /// The encoded `subscribed` frame of a pattern subscription.
    pub ack: Bytes,
}

/// Remove a subscription.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unsubscribe {
    pub id: SessionId,
    pub target: Target,
}

/// A message to fan out to this registry's subscribers of its channel.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Dispatch(pub Arc<Publication>);

/// A `join` or `leave` frame for the exact subscribers of `channel` (not sequenced, not history), except
/// `skip`: the local connection it is about.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Announce {
    pub channel: Arc<str>,
    pub frame: Bytes,
    pub skip: Option<SessionId>,
}

/// The pub/sub connection went down: the epochs known per channel may be stale (Redis may restart and start
/// its sequences over), so new subscribers read them again.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct ForgetLatest;

/// After a pub/sub outage: the history windows of channels this replica carries. Under an unchanged epoch
/// each subscriber gets, in order, the messages above its position; under a new one, the latest value.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct CatchUp(pub Arc<Vec<(Arc<str>, Window)>>);

/// The pub/sub connection is back after an outage, every subscription confirmed again: the channels only a
/// registry knows it carries (those its pattern subscribers have positions in) are caught up from history.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct LinkUp;

/// Close every connection with 1001 (graceful shutdown), spread evenly over `over`.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct CloseAll {
    pub over: std::time::Duration,
}
