//! Ingest routes: relay an outside producer's own Redis channel (or pattern) into relayhub channels, with the
//! routing key taken from inside each message (`prices:{symbol}`, `orders:{/account/id}`). Every replica
//! subscribes to the route once and delivers what it receives to its own subscribers, so nobody re-publishes
//! and each subscriber gets each message once. Used by the bridge.

use serde_json::Value;

use crate::core::config::IngestConfig;
use crate::core::protocol::validate_channel;

/// One piece of a target channel template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    /// A top-level field name (`{symbol}`).
    Field(String),
    /// A JSON Pointer (`{/a/b}`).
    Pointer(String),
}

/// A compiled `[[ingest]]` route.
#[derive(Debug, Clone)]
pub struct Route {
    /// The producer's Redis channel, or pattern when it contains `*` (PSUBSCRIBE).
    pub redis_channel: String,
    pub is_pattern: bool,
    parts: Vec<Part>,
    /// Also write the latest value and snapshots.
    pub cache: bool,
}

impl Route {
    pub fn compile(index: usize, config: &IngestConfig) -> Result<Route, String> {
        let key = format!("ingest[{index}].channel");
        let mut parts = Vec::new();
        let mut rest = config.channel.as_str();
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("{key}: `{{` without `}}`"))?
                + open;
            let name = &rest[open + 1..close];
            if name.is_empty() {
                return Err(format!("{key}: empty `{{}}`"));
            }
            parts.push(if name.starts_with('/') {
                Part::Pointer(name.to_string())
            } else {
                Part::Field(name.to_string())
            });
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("{key}: `}}` without `{{`"));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        Ok(Route {
            is_pattern: config.redis_channel.contains(['*', '?', '[']),
            redis_channel: config.redis_channel.clone(),
            parts,
            cache: config.cache,
        })
    }

    /// The relayhub channel a message goes to, or why it cannot be routed.
    pub fn target(&self, message: &Value) -> Result<String, String> {
        let mut out = String::new();
        for part in &self.parts {
            let value = match part {
                Part::Literal(text) => {
                    out.push_str(text);
                    continue;
                }
                Part::Field(name) => message.get(name),
                Part::Pointer(pointer) => message.pointer(pointer),
            };
            match value {
                Some(Value::String(s)) => out.push_str(s),
                Some(Value::Number(n)) => out.push_str(&n.to_string()),
                Some(Value::Bool(b)) => out.push_str(if *b { "true" } else { "false" }),
                _ => {
                    let name = match part {
                        Part::Field(n) | Part::Pointer(n) => n.as_str(),
                        Part::Literal(_) => unreachable!("literals are handled above"),
                    };
                    return Err(format!(
                        "no routing field `{name}` (string or number) in the message"
                    ));
                }
            }
        }
        validate_channel(&out)
            .map_err(|e| format!("routed channel `{out}` is invalid: {}", e.message))?;
        Ok(out)
    }
}

/// Compiles every route of a config.
pub fn compile_routes(routes: &[IngestConfig]) -> Result<Vec<Route>, String> {
    routes
        .iter()
        .enumerate()
        .map(|(i, r)| Route::compile(i, r))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn route(channel: &str) -> Route {
        Route::compile(
            0,
            &IngestConfig {
                redis_channel: "crypto:updates".into(),
                channel: channel.into(),
                cache: true,
            },
        )
        .unwrap()
    }

    #[test]
    fn routes_by_field_and_pointer() {
        assert_eq!(
            route("prices:{symbol}")
                .target(&json!({"symbol": "BTC", "p": 1}))
                .unwrap(),
            "prices:BTC"
        );
        assert_eq!(
            route("acct:{/a/id}:x")
                .target(&json!({"a": {"id": 42}}))
                .unwrap(),
            "acct:42:x"
        );
        assert!(
            route("prices:{symbol}")
                .target(&json!({"p": 1}))
                .unwrap_err()
                .contains("symbol")
        );
        assert!(
            route("prices:{symbol}")
                .target(&json!({"symbol": "a b"}))
                .is_err()
        );
        assert!(
            route("prices:{symbol}")
                .target(&json!({"symbol": {"x": 1}}))
                .is_err()
        );
        assert!(!route("x").is_pattern);
        assert!(
            Route::compile(
                0,
                &IngestConfig {
                    redis_channel: "a:*".into(),
                    channel: "x".into(),
                    cache: false
                }
            )
            .unwrap()
            .is_pattern
        );
        assert!(
            Route::compile(
                0,
                &IngestConfig {
                    redis_channel: "a".into(),
                    channel: "x:{y".into(),
                    cache: false
                }
            )
            .is_err()
        );
    }
}
