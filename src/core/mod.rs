//! The pure core: what every other layer speaks and nothing here depends on (no actix, no Redis, no sockets).
//! Protocol frames, the publication encoded once, channel names and policies with the configuration they come
//! from, ingest routes, and two small utilities (backoff, randomness). Kept apart so it can be tested and
//! fuzzed alone, and so the layers above it cannot pull each other in through it.

pub mod backoff;
pub mod config;
pub mod encoding;
pub mod endpoint;
pub mod frame;
pub mod ingest;
pub mod position;
pub mod protocol;
pub mod publication;
pub mod random;
pub mod token;
