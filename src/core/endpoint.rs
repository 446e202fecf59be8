//! Drop-in endpoints (`[[endpoints]]`): a WebSocket path bound to one channel or pattern, so a front end
//! written for another server connects unchanged and is subscribed without sending anything. The templates
//! are checked and parsed once at start; resolving a request path is a split and a few comparisons.

use std::collections::BTreeMap;

use serde::Deserialize;

/// What an endpoint's frames look like.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Each frame is the message's `data` JSON alone, as the servers relayhub replaces sent it.
    #[default]
    Raw,
    /// relayhub's own frames (`subscribed`, `snapshot`, `message`).
    Envelope,
}

/// One endpoint as configured (`config::EndpointConfig`, borrowed).
#[derive(Debug, Clone, Copy)]
pub struct Spec<'a> {
    pub path: &'a str,
    pub channel: &'a str,
    pub alias: &'a BTreeMap<String, String>,
    pub format: Format,
    pub snapshot: bool,
}

/// Paths of the API and the dashboard an endpoint may not shadow.
const RESERVED_PATHS: &[&str] = &["/", "/ws", "/sse", "/health", "/ready", "/metrics"];
/// First segments of route groups an endpoint may not shadow.
const RESERVED_PREFIXES: &[&str] = &["api", "demo"];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Capture(String),
}

#[derive(Debug, Clone)]
struct Endpoint {
    segments: Vec<Piece>,
    channel: Vec<Piece>,
    alias: BTreeMap<String, String>,
    format: Format,
    snapshot: bool,
}

/// What a request path resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The channel, or a pattern (`crypto:*`) when an alias made one.
    pub channel: String,
    pub format: Format,
    pub snapshot: bool,
}

/// Every configured endpoint, parsed.
#[derive(Debug, Clone, Default)]
pub struct Endpoints(Vec<Endpoint>);

fn is_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Splits a channel template into literals and `{name}` captures.
fn parse_channel(template: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find(['{', '}']) {
        if rest.as_bytes()[open] == b'}' {
            return Err("has a `}` without its `{`".into());
        }
        if open > 0 {
            pieces.push(Piece::Literal(rest[..open].to_string()));
        }
        let Some(close) = rest[open..].find('}') else {
            return Err("has a `{` without its `}`".into());
        };
        let name = &rest[open + 1..open + close];
        if !is_name(name) {
            return Err(format!(
                "`{{{name}}}` is not a capture name (letters, digits, `_`)"
            ));
        }
        pieces.push(Piece::Capture(name.to_string()));
        rest = &rest[open + close + 1..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Literal(rest.to_string()));
    }
    Ok(pieces)
}

/// Splits a path template into segments, each a literal or a whole-segment capture.
fn parse_path(template: &str) -> Result<Vec<Piece>, String> {
    let Some(body) = template.strip_prefix('/') else {
        return Err("must start with `/`".into());
    };
    let mut segments = Vec::new();
    for segment in body.split('/') {
        if segment.is_empty() {
            return Err("has an empty segment".into());
        }
        let piece = match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            Some(name) if is_name(name) => Piece::Capture(name.to_string()),
            Some(_) => return Err(format!("`{segment}` is not a capture name")),
            None if segment.contains(['{', '}']) => {
                return Err(format!(
                    "`{segment}`: a capture is a whole segment, `{{name}}`"
                ));
            }
            None => Piece::Literal(segment.to_string()),
        };
        if let Piece::Capture(name) = &piece
            && segments.contains(&piece)
        {
            return Err(format!("captures `{{{name}}}` twice"));
        }
        segments.push(piece);
    }
    Ok(segments)
}

/// Why a path would shadow the API or the dashboard, if it would.
fn collision(template: &str, segments: &[Piece]) -> Option<String> {
    if RESERVED_PATHS.contains(&template) {
        return Some(format!("`{template}` is a route of relayhub"));
    }
    match segments.first() {
        Some(Piece::Literal(first)) if RESERVED_PREFIXES.contains(&first.as_str()) => {
            Some(format!("`/{first}/...` belongs to relayhub"))
        }
        Some(Piece::Capture(_)) => {
            Some("must begin with a literal segment (a capture there would shadow the API)".into())
        }
        // One segment is where the dashboard's files and the API's own paths live.
        _ if segments.len() < 2 => {
            Some("needs at least two segments (`/name` is where relayhub serves its files)".into())
        }
        _ => None,
    }
}

impl Endpoints {
    /// Checks and parses the endpoints; an error names the key at fault (`endpoints[0].path`).
    pub fn compile<'a>(configs: impl IntoIterator<Item = Spec<'a>>) -> Result<Endpoints, String> {
        let err = |key: String, msg: String| format!("config key `{key}`: {msg}");
        let mut endpoints = Vec::new();
        for (i, config) in configs.into_iter().enumerate() {
            let path_key = format!("endpoints[{i}].path");
            if config.path.is_empty() {
                return Err(err(path_key, "is required".into()));
            }
            let segments = parse_path(config.path).map_err(|m| err(path_key.clone(), m))?;
            if let Some(problem) = collision(config.path, &segments) {
                return Err(err(path_key, problem));
            }
            let channel_key = format!("endpoints[{i}].channel");
            if config.channel.is_empty() {
                return Err(err(channel_key, "is required".into()));
            }
            let channel = parse_channel(config.channel).map_err(|m| err(channel_key.clone(), m))?;
            for piece in &channel {
                if let Piece::Capture(name) = piece
                    && !segments.contains(piece)
                {
                    return Err(err(
                        channel_key,
                        format!(
                            "names `{{{name}}}`, which `{}` does not capture",
                            config.path
                        ),
                    ));
                }
            }
            if let Some(earlier) = endpoints
                .iter()
                .position(|e: &Endpoint| same_shape(&e.segments, &segments))
            {
                return Err(err(
                    path_key,
                    format!("matches the same paths as endpoints[{earlier}].path"),
                ));
            }
            endpoints.push(Endpoint {
                segments,
                channel,
                alias: config.alias.clone(),
                format: config.format,
                snapshot: config.snapshot,
            });
        }
        Ok(Endpoints(endpoints))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The binding of a request path (without its query), if an endpoint matches it. A captured value with a
    /// `*` is refused: only an alias makes a pattern.
    pub fn resolve(&self, path: &str) -> Option<Binding> {
        let body = path.strip_prefix('/')?;
        'endpoints: for endpoint in &self.0 {
            let mut captured: Vec<(&str, &str)> = Vec::with_capacity(endpoint.segments.len());
            let mut parts = body.split('/');
            for piece in &endpoint.segments {
                let part = parts.next().filter(|p| !p.is_empty());
                match (piece, part) {
                    (Piece::Literal(l), Some(p)) if l == p => {}
                    (Piece::Capture(name), Some(p)) if !p.contains('*') => captured.push((name, p)),
                    _ => continue 'endpoints,
                }
            }
            if parts.next().is_some() {
                continue;
            }
            let mut channel = String::new();
            for piece in &endpoint.channel {
                match piece {
                    Piece::Literal(l) => channel.push_str(l),
                    Piece::Capture(name) => {
                        let value = captured
                            .iter()
                            .find(|(n, _)| n == name)
                            .map(|(_, v)| *v)
                            .unwrap_or_default();
                        channel.push_str(endpoint.alias.get(value).map_or(value, |a| a.as_str()));
                    }
                }
            }
            return Some(Binding {
                channel,
                format: endpoint.format,
                snapshot: endpoint.snapshot,
            });
        }
        None
    }
}

/// Two path templates match the same paths: same length, same literals, captures in the same places.
fn same_shape(a: &[Piece], b: &[Piece]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|pair| match pair {
            (Piece::Literal(x), Piece::Literal(y)) => x == y,
            (Piece::Capture(_), Piece::Capture(_)) => true,
            _ => false,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An endpoint as written in the config file.
    #[derive(Debug, Clone, Default)]
    struct Table {
        path: String,
        channel: String,
        alias: BTreeMap<String, String>,
        format: Format,
        snapshot: bool,
    }

    fn endpoint(path: &str, channel: &str) -> Table {
        Table {
            path: path.into(),
            channel: channel.into(),
            ..Table::default()
        }
    }

    fn compile(tables: &[Table]) -> Result<Endpoints, String> {
        Endpoints::compile(tables.iter().map(|t| Spec {
            path: &t.path,
            channel: &t.channel,
            alias: &t.alias,
            format: t.format,
            snapshot: t.snapshot,
        }))
    }

    #[test]
    fn paths_resolve_through_captures_and_aliases() {
        let mut prices = endpoint("/ws/prices/{symbol}", "crypto:{symbol}");
        prices.alias.insert("ALL".into(), "*".into());
        prices.snapshot = true;
        let mut stats = endpoint("/ws/stats", "workers:stats");
        stats.format = Format::Envelope;
        let endpoints = compile(&[prices, stats]).unwrap();
        let bound = endpoints.resolve("/ws/prices/BTC").unwrap();
        assert_eq!(bound.channel, "crypto:BTC");
        assert_eq!((bound.format, bound.snapshot), (Format::Raw, true));
        assert_eq!(
            endpoints.resolve("/ws/prices/ALL").unwrap().channel,
            "crypto:*"
        );
        assert_eq!(
            endpoints.resolve("/ws/stats").unwrap().format,
            Format::Envelope
        );
        for miss in [
            "/ws",
            "/ws/prices",
            "/ws/prices/",
            "/ws/prices/BTC/x",
            "/ws/prices/*",
            "/x",
        ] {
            assert_eq!(endpoints.resolve(miss), None, "{miss}");
        }
    }

    #[test]
    fn bad_templates_name_their_key() {
        let cases = [
            (endpoint("ws/x", "a"), "endpoints[0].path"),
            (endpoint("/ws/{a", "a"), "endpoints[0].path"),
            (endpoint("/ws/x{a}", "a"), "endpoints[0].path"),
            (endpoint("/ws/{a}/{a}", "a"), "endpoints[0].path"),
            (endpoint("/ws", "a"), "endpoints[0].path"),
            (endpoint("/sse", "a"), "endpoints[0].path"),
            (endpoint("/api/x", "a"), "endpoints[0].path"),
            (endpoint("/{x}/y", "a"), "endpoints[0].path"),
            (endpoint("/index.html", "a"), "endpoints[0].path"),
            (endpoint("/", "a"), "endpoints[0].path"),
            (endpoint("/ws/{a}", "c:{b}"), "endpoints[0].channel"),
            (endpoint("/ws/{a}", "c:{a"), "endpoints[0].channel"),
            (endpoint("/ws/{a}", ""), "endpoints[0].channel"),
        ];
        for (config, key) in cases {
            let error = compile(std::slice::from_ref(&config)).unwrap_err();
            assert!(error.contains(&format!("`{key}`")), "{config:?}: {error}");
        }
        let twice = [endpoint("/ws/{a}", "c:{a}"), endpoint("/ws/{b}", "d:{b}")];
        let error = compile(&twice).unwrap_err();
        assert!(error.contains("`endpoints[1].path`"), "{error}");
    }
}
