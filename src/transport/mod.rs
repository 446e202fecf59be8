//! relayhub's own WebSocket transport: client frames decoded, frames queued by reference, and the socket loop.
//!
//! Why not actix-web-actors or actix-ws: both keep the connection inside actix-http's HTTP/1 dispatcher,
//! which holds two 8 KiB buffers per connection for its whole life and copies every outgoing frame into one of
//! them after the WebSocket context has encoded it, once per subscriber. A hub's connections are mostly idle
//! and its messages go to many sockets at once, so relayhub takes the socket at the upgrade instead:
//!
//! - actix-http's HTTP/1 service still parses every request; its `upgrade` hook hands over the request and the
//!   socket when a client asks for `Upgrade: websocket` (the HTTP layer's `upgrade` checks it and hands the
//!   socket here). Everything else is the actix-web app.
//! - Client frames are decoded by relayhub ([`decoder`]), which checks a frame's length on its header.
//! - A message is framed once per publish (`core::frame`), queued by reference in each subscriber's [`Outbox`], and
//!   written with one vectored `write` per batch ([`connection`]).
//! - An idle connection holds its session actor, its queue and a socket, and no buffers.

mod coalesce;
pub(crate) mod connection;
/// Public for the fuzz targets: it reads bytes straight from strangers' sockets.
pub mod decoder;
pub(crate) mod outbox;
pub(crate) mod sse;

pub(crate) use crate::core::frame;
pub(crate) use coalesce::Coalescer;
pub(crate) use connection::{Endpoint, Failure, Transport, TransportLimits};
pub(crate) use outbox::{Full, Outbox, Pushed};
