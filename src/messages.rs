//! The actix messages that cross actors: sessions <-> registry, hub -> registry, registry -> bridge.
//! Named for intent; the registry stores each session's `Outbox`, so it depends on no session type.

use std::sync::Arc;

use actix::prelude::*;
use bytes::Bytes;

use crate::protocol::Target;
use crate::publication::Publication;
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
    /// The encoded `subscribed` frame.
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

/// The pub/sub connection went down: the sequence floors of new subscribers go (Redis may restart and start
/// its sequences over).
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct ForgetLatest;

/// After a pub/sub outage: the cached latest values of channels this replica carries. Each one newer than what
/// a registry delivered last is delivered now, so subscribers catch up with the latest value they missed.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct CatchUp(pub Arc<Vec<Arc<Publication>>>);

/// Close every connection with 1001 (graceful shutdown).
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct CloseAll;

/// This replica needs messages of a channel from Redis. Sent with `do_send` at the moment the registry
/// decides, like `Unwatch`, so the bridge applies a registry's watches and unwatches in the order they were
/// made; `confirmed` is answered once Redis confirmed the SUBSCRIBE (or at once when Redis is unreachable:
/// local delivery never waits on Redis).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Watch {
    pub channel: Arc<str>,
    pub confirmed: tokio::sync::oneshot::Sender<()>,
}

/// This replica needs every message of channels under a pattern prefix (`prices:` for `prices:*`); sent and
/// answered like `Watch`, once Redis confirmed the PSUBSCRIBE.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WatchPattern {
    pub prefix: Arc<str>,
    pub confirmed: tokio::sync::oneshot::Sender<()>,
}

/// This registry no longer has subscribers of the pattern.
#[derive(Message)]
#[rtype(result = "()")]
pub struct UnwatchPattern {
    pub prefix: Arc<str>,
}

/// This registry no longer has subscribers of the channel.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unwatch {
    pub channel: Arc<str>,
}
