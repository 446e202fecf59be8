//! The actix messages that cross the node's actors: sessions <-> registry, and local delivery -> registry.
//! Named for intent; the registry stores each session's `Outbox`, so it depends on no session type.

use std::sync::Arc;

use actix::prelude::*;
use bytes::Bytes;

use crate::core::protocol::Target;
use crate::core::publication::Publication;
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
