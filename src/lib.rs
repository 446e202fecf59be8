//! relayhub: a realtime hub. Browsers subscribe to channels over one WebSocket and get the latest value at
//! once, then every update; Redis stays the shared source of truth between replicas.
//!
//! # Layout
//! Layers, each using only the ones listed before it:
//! - `core`: pure vocabulary, no actix and no Redis. `protocol` (client frames in, server frames out, error
//!   and close codes), `frame` (WebSocket frame encoding), `publication` (one message encoded once, shared by
//!   every subscriber), `config` (typed configuration: file, environment, defaults, value checks; channel
//!   policies), `ingest` (outside producers' channels routed into relayhub channels), `token` (JWTs: who a
//!   connection is and what it may subscribe to and publish), `backoff`, `random`.
//!   `stats` (plain counters) sits beside it, and so do `metrics` (the labeled counters of `GET /metrics`) and
//!   `logging` (the process's logger, text or one JSON object a line).
//! - `transport`: relayhub's WebSocket transport: client frames decoded, frames queued by reference
//!   (`Outbox`), the socket loop (`connection`).
//! - `engine`: the broker seam. `Engine` publishes (with sequence numbers, latest values and history),
//!   subscribes channels and patterns, reads latest values and history, and stores polling jobs with their
//!   leases; `seam` holds the `BrokerEventHandler` it reports through. Behind it `memory/` and `redis/` (key
//!   names, Lua scripts, the pooled store, the pubsub-bridge actor with its probes and reconnects, link state,
//!   job storage).
//! - `node`: the actors and their shared handle. `hub` (the one publish path), `fanout` (local delivery and
//!   subscriber counts; the engine's event handler), `registry` (one per worker thread: subscriptions,
//!   fan-out, latest values), `session` (one per WebSocket), `messages`, `observer`.
//! - `poller`: the poller actor and its jobs (upstream fetches, transforms, templates); `demo`: the built-in
//!   synthetic upstream.
//! - `http`: the edge. Routes, the JSON error shape (`reply`), origins and secrets (`auth`), connection
//!   budgets (`admission`), the WebSocket upgrade (`upgrade`) and the listener (`server`).
//! - `app`: the composition root: checks and compiles the configuration, names the concrete engine, starts
//!   everything in order and stops it.
//!
//! `start` builds and runs everything; the binary in `main.rs` only parses arguments and waits for a signal,
//! and tests call `start` with a config on port 0. The public surface is what those need, re-exported below.

mod app;
mod core;
mod demo;
mod engine;
mod http;
pub mod logging;
mod metrics;
mod node;
mod poller;
mod stats;
pub mod transport;

pub use crate::app::{Running, StartError, check_config, start};
pub use crate::core::{config, protocol};

/// Tokens: verifying and minting (what `relayhub token` and tests use).
pub mod token {
    pub use crate::core::token::{Mint, Verifier, mint};
}

/// The handle a running hub exposes (publish, shutdown, identity).
pub mod hub {
    pub use crate::node::hub::{Hub, PublishError, PublishOutcome};
}
