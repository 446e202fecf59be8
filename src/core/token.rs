//! Tokens: the JWTs an application's backend mints so the hub knows who a connection is and what it may
//! subscribe to and publish. Verification (signature, with the algorithm pinned by the configured key and never
//! read from the token alone; expiry; issuer and audience), the access rules of namespaces and user channels,
//! and minting for `relayhub token`. The cryptography is the `jsonwebtoken` crate's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::core::config::{AuthConfig, ChannelPolicy, ConfigError};
use crate::core::protocol::{ErrorCode, ProtocolError, Target, channel_owner};

/// Verifies tokens with the configured key, or with the keys of a JWKS.
pub struct Verifier {
    keys: Keys,
}

enum Keys {
    /// One key; the validation pins its algorithm and checks `exp`, `iss` and `aud`.
    Static {
        key: DecodingKey,
        validation: Validation,
    },
    Jwks(Jwks),
}

/// A JWKS's keys by `kid`, each with the validation of its own algorithm, and what asks for a fresh copy.
pub struct Jwks {
    /// The fetched set; replaced whole, so a verification holds one consistent set.
    keys: RwLock<Arc<HashMap<String, (DecodingKey, Validation)>>>,
    /// Checks shared by every key (`exp`, `iss`, `aud`); each key's copy pins its algorithm.
    base: Validation,
    /// Earliest time a fetch may be asked for again (`auth.jwks_min_refresh_interval`).
    next_refresh: Mutex<Instant>,
    min_refresh_interval: Duration,
    /// Wakes the fetcher.
    wanted: tokio::sync::Notify,
    /// Counts installed sets, so a waiter can tell when a fetch has landed.
    installed: tokio::sync::watch::Sender<u64>,
}

/// Most keys kept from one JWKS.
pub const MAX_JWKS_KEYS: usize = 64;

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.keys {
            Keys::Static { validation, .. } => f
                .debug_struct("Verifier")
                .field("algorithms", &validation.algorithms)
                .finish(),
            Keys::Jwks(_) => f.debug_struct("Verifier").field("keys", &"jwks").finish(),
        }
    }
}

/// Who a connection is, from a verified connection token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The token's `sub`.
    pub user: String,
    /// The token's `exp`, in seconds since the Unix epoch.
    pub expires_at: u64,
    /// Exact channels and `prefix:*` patterns this connection may subscribe to in private namespaces.
    pub channels: Vec<String>,
    /// The same form, for client publish in namespaces that are not anonymous.
    pub publish: Vec<String>,
    /// The token's `info` claim as compact JSON: what presence shows about the connection (bounded by the
    /// token's size).
    pub info: Option<String>,
}

impl Identity {
    /// `expires_at` as RFC 3339 (UTC, seconds).
    pub fn expires_at_rfc3339(&self) -> String {
        chrono::DateTime::from_timestamp(self.expires_at as i64, 0)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    }
}

/// A verified subscription token: the right of `user` (or of an anonymous connection) to one channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionGrant {
    pub user: Option<String>,
    pub channel: String,
    pub expires_at: u64,
}

/// Why a token was refused, in words a client can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenError {
    pub message: String,
    /// The token names a `kid` the cached JWKS lacks: a fresh copy may have it.
    pub unknown_key: bool,
}

impl TokenError {
    fn new(message: impl Into<String>) -> TokenError {
        TokenError {
            message: message.into(),
            unknown_key: false,
        }
    }
}

impl From<TokenError> for ProtocolError {
    fn from(e: TokenError) -> ProtocolError {
        ProtocolError::new(ErrorCode::InvalidToken, e.message)
    }
}

/// The claims relayhub reads; others are ignored.
#[derive(Debug, Deserialize, Serialize)]
struct Claims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    channels: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    publish: Option<Vec<String>>,
    /// Subscription tokens: the one channel they grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    channel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    info: Option<serde_json::Value>,
}

/// Longest token accepted (bytes): past it, nothing is decoded.
pub const MAX_TOKEN_BYTES: usize = 8192;

/// Most entries of a `channels` or `publish` claim: each subscribe and publish is checked against them.
pub const MAX_GRANTS: usize = 256;

impl Verifier {
    /// The verifier `[auth]` describes; `None` when it names no key. Errors name the key at fault.
    pub fn from_config(auth: &AuthConfig) -> Result<Option<Verifier>, ConfigError> {
        let mut base = Validation::new(Algorithm::HS256);
        // Expiry is exact: the hub closes a connection when its token expires, and a leeway would let the
        // same token in again for that long.
        base.leeway = 0;
        base.set_required_spec_claims(&["exp"]);
        if auth.issuer.is_empty() {
            base.iss = None;
        } else {
            base.set_issuer(&[auth.issuer.as_str()]);
            base.required_spec_claims.insert("iss".into());
        }
        if auth.audience.is_empty() {
            base.validate_aud = false;
        } else {
            base.set_audience(&[auth.audience.as_str()]);
            base.required_spec_claims.insert("aud".into());
        }
        if !auth.jwks_url.is_empty() {
            return Ok(Some(Verifier {
                keys: Keys::Jwks(Jwks {
                    keys: RwLock::new(Arc::new(HashMap::new())),
                    base,
                    next_refresh: Mutex::new(Instant::now()),
                    min_refresh_interval: auth.jwks_min_refresh_interval,
                    wanted: tokio::sync::Notify::new(),
                    installed: tokio::sync::watch::Sender::new(0),
                }),
            }));
        }
        let (key, algorithm) = if !auth.jwt_hs256_secret.is_empty() {
            (
                DecodingKey::from_secret(auth.jwt_hs256_secret.as_bytes()),
                Algorithm::HS256,
            )
        } else if !auth.jwt_public_key_file.is_empty() {
            let path = &auth.jwt_public_key_file;
            let key_error =
                |m: String| ConfigError(format!("config key `auth.jwt_public_key_file`: {m}"));
            let pem =
                std::fs::read(path).map_err(|e| key_error(format!("cannot read {path}: {e}")))?;
            public_key_from_pem(&pem).map_err(|e| key_error(format!("{path}: {e}")))?
        } else {
            return Ok(None);
        };
        let mut validation = base;
        validation.algorithms = vec![algorithm];
        Ok(Some(Verifier {
            keys: Keys::Static { key, validation },
        }))
    }

    /// The JWKS behind this verifier, when it has one.
    pub fn jwks(&self) -> Option<&Jwks> {
        match &self.keys {
            Keys::Jwks(jwks) => Some(jwks),
            Keys::Static { .. } => None,
        }
    }

    fn claims(&self, token: &str) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::new(format!(
                "a token is at most {MAX_TOKEN_BYTES} bytes"
            )));
        }
        let decode = |key, validation| {
            jsonwebtoken::decode::<Claims>(token, key, validation)
                .map(|data| data.claims)
                .map_err(|e| TokenError::new(describe(e.kind())))
        };
        match &self.keys {
            Keys::Static { key, validation } => decode(key, validation),
            Keys::Jwks(jwks) => {
                let header = jsonwebtoken::decode_header(token)
                    .map_err(|e| TokenError::new(describe(e.kind())))?;
                let kid = header
                    .kid
                    .ok_or_else(|| TokenError::new("the token names no key (`kid` header)"))?;
                let keys = jwks.current();
                match keys.get(&kid) {
                    Some((key, validation)) => decode(key, validation),
                    None => Err(TokenError {
                        message: format!("the token's key `{kid}` is not in the key set"),
                        unknown_key: true,
                    }),
                }
            }
        }
    }

    /// A connection token: `sub` and `exp` required, `channels` and `publish` optional.
    pub fn verify_connection(&self, token: &str) -> Result<Identity, TokenError> {
        let claims = self.claims(token)?;
        let user = claims
            .sub
            .filter(|s| !s.is_empty())
            .ok_or_else(|| TokenError::new("a connection token needs a `sub` claim"))?;
        let grants = |list: Option<Vec<String>>, name: &str| -> Result<Vec<String>, TokenError> {
            let list = list.unwrap_or_default();
            if list.len() > MAX_GRANTS {
                return Err(TokenError::new(format!(
                    "the `{name}` claim lists at most {MAX_GRANTS} entries"
                )));
            }
            Ok(list)
        };
        Ok(Identity {
            user,
            expires_at: claims.exp,
            channels: grants(claims.channels, "channels")?,
            publish: grants(claims.publish, "publish")?,
            info: claims
                .info
                .filter(|info| !info.is_null())
                .map(|info| info.to_string()),
        })
    }

    /// A subscription token: `channel` and `exp` required, `sub` absent for anonymous connections.
    pub fn verify_subscription(&self, token: &str) -> Result<SubscriptionGrant, TokenError> {
        let claims = self.claims(token)?;
        let channel = claims
            .channel
            .ok_or_else(|| TokenError::new("a subscription token needs a `channel` claim"))?;
        Ok(SubscriptionGrant {
            user: claims.sub,
            channel,
            expires_at: claims.exp,
        })
    }
}

impl Jwks {
    fn current(&self) -> Arc<HashMap<String, (DecodingKey, Validation)>> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.current().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Replaces the key set with the one in a JWKS document; keeps the old one when the document has no
    /// usable key. Symmetric keys are never taken from a JWKS. Returns how many keys it holds now.
    pub fn install(&self, body: &[u8]) -> Result<usize, String> {
        let set: JwkSet =
            serde_json::from_slice(body).map_err(|e| format!("the JWKS is not valid: {e}"))?;
        let mut keys = HashMap::new();
        for jwk in set.keys.iter().take(MAX_JWKS_KEYS) {
            let Some(kid) = &jwk.common.key_id else {
                continue;
            };
            let algorithm = match (&jwk.algorithm, jwk.common.key_algorithm) {
                (AlgorithmParameters::RSA(_), None) => Algorithm::RS256,
                (AlgorithmParameters::EllipticCurve(p), None) if p.curve == EllipticCurve::P256 => {
                    Algorithm::ES256
                }
                (
                    AlgorithmParameters::RSA(_) | AlgorithmParameters::EllipticCurve(_),
                    Some(alg),
                ) => match Algorithm::try_from(alg) {
                    Ok(alg @ (Algorithm::RS256 | Algorithm::ES256)) => alg,
                    _ => continue,
                },
                _ => continue,
            };
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            let mut validation = self.base.clone();
            validation.algorithms = vec![algorithm];
            keys.insert(kid.clone(), (key, validation));
        }
        if keys.is_empty() {
            return Err("the JWKS holds no usable RS256 or ES256 key with a `kid`".into());
        }
        let count = keys.len();
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
        self.installed.send_modify(|n| *n += 1);
        Ok(count)
    }

    /// Asks for a fetch, unless one was asked for less than `jwks_min_refresh_interval` ago; `true` when the
    /// fetcher was woken.
    pub fn request_refresh(&self) -> bool {
        let now = Instant::now();
        let mut next = self
            .next_refresh
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if now < *next {
            return false;
        }
        *next = now + self.min_refresh_interval;
        self.wanted.notify_one();
        true
    }

    /// Resolves when a fetch is asked for.
    pub async fn wanted(&self) {
        self.wanted.notified().await
    }

    /// Changes each time a key set is installed.
    pub fn installed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.installed.subscribe()
    }
}

/// Reads a PEM public key and the one algorithm it verifies: RS256 for an RSA key, ES256 for a P-256 key.
fn public_key_from_pem(pem: &[u8]) -> Result<(DecodingKey, Algorithm), String> {
    let text = std::str::from_utf8(pem).map_err(|_| "is not a PEM file".to_string())?;
    if text.contains("PRIVATE KEY") {
        return Err("holds a private key: give the hub the public key only".into());
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        return Ok((key, Algorithm::RS256));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        return Ok((key, Algorithm::ES256));
    }
    Err("is not a PEM RSA or EC (P-256) public key".into())
}

fn describe(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::ExpiredSignature => "the token has expired".into(),
        ErrorKind::InvalidSignature => "the token's signature does not verify".into(),
        ErrorKind::InvalidAlgorithm => {
            "the token is not signed with the configured algorithm".into()
        }
        ErrorKind::InvalidIssuer => "the token's issuer is not the configured one".into(),
        ErrorKind::InvalidAudience => "the token's audience is not the configured one".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("the token has no `{claim}` claim"),
        ErrorKind::ImmatureSignature => "the token is not valid yet".into(),
        ErrorKind::Json(_) => "the token's claims are not what relayhub reads".into(),
        _ => "the token is malformed".into(),
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whether a `channels` or `publish` entry covers a subscription target: an exact channel covers itself, a
/// `prefix:*` entry every channel and pattern under its prefix.
pub fn grant_covers(grant: &str, target: &Target) -> bool {
    match (grant.strip_suffix('*'), target) {
        (Some(prefix), Target::Channel(c)) => prefix.ends_with(':') && c.starts_with(prefix),
        (Some(prefix), Target::Pattern(p)) => prefix.ends_with(':') && p.starts_with(prefix),
        (None, Target::Channel(c)) => grant == c,
        (None, Target::Pattern(_)) => false,
    }
}

/// What a subscription rests on, once allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Anyone may hold it.
    Open,
    /// It needed the connection's token: it ends with it.
    ConnectionToken,
    /// It needed a subscription token expiring at this time (seconds since the epoch).
    SubscriptionToken(u64),
}

/// Whether a connection may subscribe to `target` (named `name`), and on what. `auth` says whether token
/// auth is configured at all; `grant` is a verified subscription token sent with the subscribe.
pub fn may_subscribe(
    auth: bool,
    policy: &ChannelPolicy,
    target: &Target,
    identity: Option<&Identity>,
    grant: Option<&SubscriptionGrant>,
) -> Result<Standing, ProtocolError> {
    let forbidden = |m: &str| Err(ProtocolError::new(ErrorCode::Forbidden, m));
    let unauthorized = |m: &str| Err(ProtocolError::new(ErrorCode::Unauthorized, m));
    let mut standing = Standing::Open;
    if let Target::Channel(channel) = target
        && let Some(owner) = channel_owner(channel)
    {
        match identity {
            None => return unauthorized("a user channel needs a connection token"),
            Some(identity) if identity.user != owner => {
                return forbidden("this user channel belongs to another user");
            }
            Some(_) => standing = Standing::ConnectionToken,
        }
    }
    if !auth {
        return Ok(standing);
    }
    if !policy.anonymous {
        if identity.is_none() {
            return unauthorized("this namespace needs a connection token");
        }
        standing = Standing::ConnectionToken;
    }
    if policy.private {
        let claimed = identity.is_some_and(|i| i.channels.iter().any(|g| grant_covers(g, target)));
        if claimed {
            return Ok(Standing::ConnectionToken);
        }
        let Some(grant) = grant else {
            return forbidden(
                "this channel is private: the token's `channels` claim does not cover it",
            );
        };
        let name = match target {
            Target::Channel(c) => c.as_str(),
            Target::Pattern(_) => {
                return forbidden("a subscription token grants one channel, not a pattern");
            }
        };
        if grant.channel != name {
            return forbidden("the subscription token is for another channel");
        }
        if grant.user.as_deref() != identity.map(|i| i.user.as_str()) {
            return forbidden("the subscription token is for another user");
        }
        return Ok(Standing::SubscriptionToken(grant.expires_at));
    }
    Ok(standing)
}

/// Whether a connection may publish to `channel`: the namespace must allow client publish; a user channel
/// only by its user; with token auth, a namespace that is not anonymous only where the `publish` claim
/// covers the channel.
pub fn may_publish(
    auth: bool,
    policy: &ChannelPolicy,
    channel: &str,
    identity: Option<&Identity>,
) -> Result<(), ProtocolError> {
    let forbidden = |m: &str| Err(ProtocolError::new(ErrorCode::Forbidden, m));
    if !policy.client_publish {
        return forbidden("clients may not publish to this namespace");
    }
    if let Some(owner) = channel_owner(channel)
        && identity.is_none_or(|i| i.user != owner)
    {
        return forbidden("only its user may publish to a user channel");
    }
    if auth && !policy.anonymous {
        let Some(identity) = identity else {
            return Err(ProtocolError::new(
                ErrorCode::Unauthorized,
                "this namespace needs a connection token",
            ));
        };
        let target = Target::Channel(channel.to_string());
        if !identity.publish.iter().any(|g| grant_covers(g, &target)) {
            return forbidden("the token's `publish` claim does not cover this channel");
        }
    }
    Ok(())
}

/// What `relayhub token` puts in a token.
#[derive(Debug, Clone, Default)]
pub struct Mint {
    pub sub: Option<String>,
    pub channels: Vec<String>,
    pub publish: Vec<String>,
    /// A subscription token's channel.
    pub channel: Option<String>,
    pub ttl: std::time::Duration,
}

/// Signs a token with the configured HS256 secret (the only kind the hub can mint: it holds no private key).
pub fn mint(auth: &AuthConfig, mint: &Mint) -> Result<String, String> {
    if auth.jwt_hs256_secret.is_empty() {
        return Err(
            "minting needs auth.jwt_hs256_secret (or RELAYHUB_JWT_SECRET); tokens for a public key are signed by the holder of its private key".into(),
        );
    }
    let claims = Claims {
        sub: mint.sub.clone(),
        exp: now_secs() + mint.ttl.as_secs().max(1),
        channels: (!mint.channels.is_empty()).then(|| mint.channels.clone()),
        publish: (!mint.publish.is_empty()).then(|| mint.publish.clone()),
        channel: mint.channel.clone(),
        info: None,
    };
    let mut claims = serde_json::to_value(&claims).map_err(|e| e.to_string())?;
    if !auth.issuer.is_empty() {
        claims["iss"] = auth.issuer.clone().into();
    }
    if !auth.audience.is_empty() {
        claims["aud"] = auth.audience.clone().into();
    }
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(auth.jwt_hs256_secret.as_bytes()),
    )
    .map_err(|e| e.to_string())
}
