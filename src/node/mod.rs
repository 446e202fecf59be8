//! The node: this replica's actors and the handle they share. `hub` (the publish path and the replica's view),
//! `fanout` (local delivery and subscriber counts: the engine's event handler), `registry` (one per worker:
//! subscriptions, fan-out, latest values), `session` (one per WebSocket), `presence` (this replica's members of channel presence), `sse` (one per event stream), `subscribe_rules` (the checks every subscribe passes, on either transport), `messages` (what they send each
//! other) and `observer` (what the poller is told). It uses the engine below it and never the HTTP edge.

pub mod fanout;
pub mod hub;
pub mod messages;
pub mod observer;
pub mod presence;
pub mod registry;
pub mod session;
pub mod sse;
pub mod subscribe_rules;
