//! The rules a subscribe must pass, whichever transport carries it: a WebSocket session's `subscribe` and
//! an event stream's channels are both checked here, so a rule added later applies to both. Two steps, in
//! the order a subscribe takes them: [`target_policy`] (the namespace and whether it allows this kind of
//! target), then, between them, the caller's token rules, then [`within_limits`] (the per-connection
//! bounds, counted in stats when they refuse).

use crate::core::config::{ChannelPolicy, Config, RedisConfig};
use crate::core::protocol::{ErrorCode, ProtocolError, Target};
use crate::stats::Stats;

/// What a connection already holds when it asks for one more subscription.
#[derive(Debug, Clone, Copy, Default)]
pub struct Held {
    pub subscriptions: usize,
    pub patterns: usize,
}

/// The per-connection bounds (`websocket.max_subscriptions_per_connection`,
/// `websocket.max_patterns_per_connection`) and the word their refusals name the connection by.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_subscriptions: usize,
    pub max_patterns: usize,
    /// "connection" for a WebSocket, "stream" for an event stream.
    pub per: &'static str,
}

/// The settings of `target`'s namespace, or why it cannot be subscribed at all: no namespace, or a pattern
/// where patterns are not allowed (the namespace's `patterns`, or a cluster, where patterns cannot work).
pub fn target_policy(config: &Config, target: &Target) -> Result<ChannelPolicy, ProtocolError> {
    let (name, is_pattern) = match target {
        Target::Channel(c) => (c.as_str(), false),
        Target::Pattern(p) => (p.as_str(), true),
    };
    let policy = config
        .policy(name)
        .ok_or_else(|| ProtocolError::new(ErrorCode::InvalidChannel, "unknown namespace"))?;
    if is_pattern && config.redis.is_cluster() {
        return Err(ProtocolError::new(
            ErrorCode::Forbidden,
            RedisConfig::NO_PATTERNS_IN_CLUSTER,
        ));
    }
    if is_pattern && !policy.patterns {
        return Err(ProtocolError::new(
            ErrorCode::Forbidden,
            "pattern subscriptions are not enabled for this namespace",
        ));
    }
    Ok(policy)
}

/// Whether a connection holding `held` may take one more subscription of `target`'s kind. A refusal is
/// counted (`patterns_refused`, `subscriptions_refused`).
pub fn within_limits(
    stats: &Stats,
    limits: Limits,
    held: Held,
    target: &Target,
) -> Result<(), ProtocolError> {
    if matches!(target, Target::Pattern(_)) && held.patterns >= limits.max_patterns {
        Stats::add(&stats.patterns_refused, 1);
        return Err(ProtocolError::new(
            ErrorCode::TooManyPatterns,
            format!(
                "at most {} pattern subscriptions per {}",
                limits.max_patterns, limits.per
            ),
        ));
    }
    if held.subscriptions >= limits.max_subscriptions {
        Stats::add(&stats.subscriptions_refused, 1);
        return Err(ProtocolError::new(
            ErrorCode::TooManySubscriptions,
            format!(
                "at most {} subscriptions per {}",
                limits.max_subscriptions, limits.per
            ),
        ));
    }
    Ok(())
}
