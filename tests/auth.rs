//! Token auth against real hubs and raw WebSocket clients: connection tokens at the upgrade (`?token=`) and
//! in `auth` frames (valid, expired, wrongly signed, `alg: none`, HS256 signed with an RS256 config's public
//! key, wrong issuer and audience, malformed), the namespace rules (`anonymous`, `private`), subscription
//! tokens, user channels, client publish with the `publish` claim, the REST fallback, and expiry (4001 unless
//! refreshed). RSA and EC keys are made at test time with the openssl command.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite;

use common::{TestHub, Ws, close_code, get_json, test_config};

const SECRET: &str = "a-test-secret-that-is-long-enough-0123456789";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sign(claims: &Value, alg: Algorithm, key: &EncodingKey) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).expect("sign a test token")
}

fn hs256(claims: Value) -> String {
    sign(
        &claims,
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
}

/// A connection token for `sub` valid for an hour, with extra claims merged in.
fn token_for(sub: &str, extra: Value) -> String {
    let mut claims = json!({"sub": sub, "exp": now() + 3600});
    if let Value::Object(extra) = extra {
        claims.as_object_mut().unwrap().extend(extra);
    }
    hs256(claims)
}

/// `alg: none`: no signature at all. jsonwebtoken refuses to make one, so it is put together here.
fn unsigned(claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{payload}.")
}

const AUTH_TOML: &str = r#"
[auth]
jwt_hs256_secret = "a-test-secret-that-is-long-enough-0123456789"
issuer = "https://app.example"
audience = "relayhub"

[namespaces.team]
anonymous = false

[namespaces.budget]
private = true
patterns = true

[namespaces.talk]
anonymous = false
client_publish = true

[namespaces.alerts]
patterns = true
"#;

/// Claims every token of AUTH_TOML's hub needs besides its own.
fn base(sub: &str) -> Value {
    json!({"sub": sub, "exp": now() + 3600, "iss": "https://app.example", "aud": "relayhub"})
}

fn with(mut claims: Value, extra: Value) -> Value {
    if let Value::Object(extra) = extra {
        claims.as_object_mut().unwrap().extend(extra);
    }
    claims
}

/// Tokens that must be refused by AUTH_TOML's hub, each with what is wrong with it.
fn bad_tokens() -> Vec<(&'static str, String)> {
    let other_key = EncodingKey::from_secret(b"another-secret-another-secret-another-secret");
    vec![
        (
            "expired",
            hs256(with(base("42"), json!({"exp": now() - 120}))),
        ),
        (
            "expired a moment ago (no leeway)",
            hs256(with(base("42"), json!({"exp": now() - 5}))),
        ),
        (
            "wrong signature",
            sign(&base("42"), Algorithm::HS256, &other_key),
        ),
        ("alg none", unsigned(&base("42"))),
        (
            "wrong issuer",
            hs256(with(base("42"), json!({"iss": "https://evil.example"}))),
        ),
        (
            "wrong audience",
            hs256(with(base("42"), json!({"aud": "someone-else"}))),
        ),
        (
            "no issuer",
            hs256(json!({"sub": "42", "exp": now() + 3600, "aud": "relayhub"})),
        ),
        (
            "no sub",
            hs256(json!({"exp": now() + 3600, "iss": "https://app.example", "aud": "relayhub"})),
        ),
        (
            "no exp",
            hs256(json!({"sub": "42", "iss": "https://app.example", "aud": "relayhub"})),
        ),
        ("malformed", "not.a.token".to_string()),
        ("garbage", "%%%".to_string()),
    ]
}

fn ws_with_token(hub: &TestHub, token: &str) -> String {
    let encoded: String = token
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    format!("{}?token={encoded}", hub.ws_url())
}

/// Opens a WebSocket with `?token=`; the refusal's status and JSON body when the handshake is refused.
async fn connect_with(hub: &TestHub, token: &str) -> Result<Ws, (u16, Value)> {
    match tokio_tungstenite::connect_async(ws_with_token(hub, token)).await {
        Ok((stream, _)) => Ok(Ws { stream }),
        Err(tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let body = response
                .body()
                .as_ref()
                .map(|b| serde_json::from_slice(b).unwrap_or(Value::Null))
                .unwrap_or(Value::Null);
            Err((status, body))
        }
        Err(e) => panic!("handshake failed without an HTTP answer: {e}"),
    }
}

async fn request(ws: &mut Ws, frame: Value) -> Value {
    ws.send(frame).await;
    ws.recv().await
}

async fn auth(ws: &mut Ws, token: &str) -> Value {
    request(ws, json!({"op": "auth", "token": token, "id": 1})).await
}

async fn subscribe(ws: &mut Ws, channel: &str) -> Value {
    request(ws, json!({"op": "subscribe", "channel": channel, "id": 2})).await
}

/// Subscribes to each channel in turn, expecting `subscribed` or the error code given.
async fn expect_subscribes(ws: &mut Ws, cases: &[(&str, &str)]) {
    for (channel, expected) in cases {
        let answer = subscribe(ws, channel).await;
        match *expected {
            "subscribed" => assert_eq!(answer["type"], "subscribed", "{channel}: {answer}"),
            code => assert_error(&answer, code, channel),
        }
    }
}

fn assert_error(frame: &Value, code: &str, what: &str) {
    assert_eq!(frame["type"], "error", "{what}: {frame}");
    assert_eq!(frame["code"], code, "{what}: {frame}");
}

#[actix_web::test]
async fn bad_tokens_are_refused_at_the_upgrade_with_401() {
    let mut hub = TestHub::start(AUTH_TOML).await;
    for (what, token) in bad_tokens() {
        match connect_with(&hub, &token).await {
            Ok(_) => panic!("{what}: the upgrade was accepted"),
            Err((status, body)) => {
                assert_eq!(status, 401, "{what}: {body}");
                assert_eq!(body["error"]["code"], "invalid_token", "{what}: {body}");
            }
        }
    }
    let stats = hub.stats().await;
    assert!(
        stats["tokens_rejected"].as_u64().unwrap() >= bad_tokens().len() as u64,
        "{stats}"
    );
    // A valid one opens the connection as its user: its user channel is its own.
    let mut ws = connect_with(&hub, &hs256(base("42")))
        .await
        .expect("valid token");
    let ack = subscribe(&mut ws, "alerts:budget#42").await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    // No token: anonymous, as before.
    let mut anonymous = hub.connect().await;
    anonymous.subscribe("prices:BTC").await;
    hub.shutdown().await;
}

#[actix_web::test]
async fn auth_frames_answer_authed_and_a_bad_token_keeps_the_identity() {
    let mut hub = TestHub::start(AUTH_TOML).await;
    let mut ws = hub.connect().await;
    // Anonymous, and refused tokens leave it anonymous.
    for (what, token) in bad_tokens() {
        assert_error(&auth(&mut ws, &token).await, "invalid_token", what);
    }
    assert_error(
        &subscribe(&mut ws, "team:x").await,
        "unauthorized",
        "still anonymous",
    );
    let exp = now() + 3600;
    let authed = auth(&mut ws, &hs256(with(base("42"), json!({"exp": exp})))).await;
    assert_eq!(authed["type"], "authed", "{authed}");
    assert_eq!(authed["id"], 1);
    assert_eq!(authed["user"], "42");
    let expires_at = chrono::DateTime::parse_from_rfc3339(authed["expires_at"].as_str().unwrap())
        .expect("expires_at is RFC 3339");
    assert_eq!(expires_at.timestamp() as u64, exp);
    // A bad token now keeps user 42.
    for (what, token) in bad_tokens() {
        assert_error(&auth(&mut ws, &token).await, "invalid_token", what);
    }
    assert_eq!(subscribe(&mut ws, "team:x").await["type"], "subscribed");
    assert_eq!(
        subscribe(&mut ws, "alerts:x#42").await["type"],
        "subscribed"
    );
    // Another user's token does not turn this connection into theirs.
    assert_error(
        &auth(&mut ws, &hs256(base("43"))).await,
        "forbidden",
        "user change",
    );
    assert_error(
        &subscribe(&mut ws, "alerts:x#43").await,
        "forbidden",
        "still 42",
    );
    hub.shutdown().await;
}

/// Makes a key pair with openssl in a fresh directory: (private PEM, public PEM path).
fn key_pair(kind: &str) -> (Vec<u8>, PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "relayhub-auth-{}-{kind}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let private = dir.join("private.pem");
    let public = dir.join("public.pem");
    let generate: &[&str] = match kind {
        "rsa" => &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        _ => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    };
    let mut genpkey = vec!["genpkey"];
    genpkey.extend_from_slice(generate);
    genpkey.extend(["-out", private.to_str().unwrap()]);
    let pubout = [
        "pkey",
        "-pubout",
        "-in",
        private.to_str().unwrap(),
        "-out",
        public.to_str().unwrap(),
    ];
    for args in [&genpkey[..], &pubout[..]] {
        let ok = Command::new("openssl")
            .args(args)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl runs")
            .success();
        assert!(ok, "openssl {args:?}");
    }
    (std::fs::read(&private).unwrap(), public)
}

#[actix_web::test]
async fn a_public_key_config_takes_its_algorithm_from_the_key() {
    for (kind, alg) in [("rsa", Algorithm::RS256), ("ec", Algorithm::ES256)] {
        let (private, public) = key_pair(kind);
        let toml = format!(
            "[auth]\njwt_public_key_file = \"{}\"\n[namespaces.team]\nanonymous = false\n",
            public.display()
        );
        let mut hub = TestHub::start(&toml).await;
        let signing = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&private).unwrap(),
            _ => EncodingKey::from_ec_pem(&private).unwrap(),
        };
        let claims = json!({"sub": "7", "exp": now() + 600});
        let mut ws = connect_with(&hub, &sign(&claims, alg, &signing))
            .await
            .unwrap_or_else(|e| panic!("{kind}: a token signed with the key: {e:?}"));
        assert_eq!(subscribe(&mut ws, "team:a").await["type"], "subscribed");
        // The classic confusion: HS256 with the public key's PEM as the HMAC secret.
        let public_pem = std::fs::read(&public).unwrap();
        let confused = sign(
            &claims,
            Algorithm::HS256,
            &EncodingKey::from_secret(&public_pem),
        );
        let (status, body) = connect_with(&hub, &confused).await.err().expect("refused");
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (401, Some("invalid_token")),
            "{kind}"
        );
        assert_error(&auth(&mut ws, &confused).await, "invalid_token", kind);
        assert_error(
            &auth(&mut ws, &unsigned(&claims)).await,
            "invalid_token",
            kind,
        );
        // Signed by another key of the same kind.
        let (other, _) = key_pair(kind);
        let other = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&other).unwrap(),
            _ => EncodingKey::from_ec_pem(&other).unwrap(),
        };
        assert_error(
            &auth(&mut ws, &sign(&claims, alg, &other)).await,
            "invalid_token",
            kind,
        );
        hub.shutdown().await;
    }
}

#[test]
fn bad_auth_config_names_the_key() {
    let dir = std::env::temp_dir().join(format!("relayhub-badpem-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.pem");
    let junk_pem = "-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n";
    std::fs::write(&junk, junk_pem).unwrap();
    let (_, public) = key_pair("rsa");
    let private = public.with_file_name("private.pem");
    let key_file =
        |path: &std::path::Path| format!("[auth]\njwt_public_key_file = \"{}\"\n", path.display());
    for (toml, named) in [
        (
            key_file("/nonexistent/key.pem".as_ref()),
            "auth.jwt_public_key_file",
        ),
        (key_file(&junk), "auth.jwt_public_key_file"),
        (key_file(&private), "private key"),
        (
            "[auth]\njwt_hs256_secret = \"short\"\n".into(),
            "auth.jwt_hs256_secret",
        ),
        (
            format!("{}jwt_hs256_secret = \"{SECRET}\"\n", key_file(&public)),
            "auth.jwt_public_key_file",
        ),
        (
            "[auth]\njwks_url = \"ftp://idp/keys\"\n".into(),
            "auth.jwks_url",
        ),
        (
            "[auth]\njwks_url = \"http://idp/keys\"\njwks_min_refresh_interval = \"0s\"\n".into(),
            "auth.jwks_min_refresh_interval",
        ),
        (
            "[auth]\njwks_url = \"http://idp/keys\"\njwks_max_bytes = 10\n".into(),
            "auth.jwks_max_bytes",
        ),
        (
            "[namespaces.team]\nanonymous = false\n".into(),
            "namespaces.team.anonymous",
        ),
        (
            "[namespaces.team]\nprivate = true\n".into(),
            "namespaces.team.private",
        ),
    ] {
        let e = relayhub::check_config(&test_config_unchecked(&toml)).unwrap_err();
        assert!(e.contains(named), "{toml}: {e}");
    }
    // The default config runs with no auth.
    relayhub::check_config(&test_config_unchecked("")).unwrap();
    assert!(!test_config_unchecked("").auth.enabled());
}

/// `test_config` without its validation (which would panic on the bad configs under test).
fn test_config_unchecked(toml: &str) -> relayhub::config::Config {
    relayhub::config::Config::from_toml_over_defaults(toml).expect("parses")
}

#[actix_web::test]
async fn namespace_rules_and_user_channels() {
    let mut hub = TestHub::start(AUTH_TOML).await;
    let mut anonymous = hub.connect().await;
    expect_subscribes(
        &mut anonymous,
        &[
            ("team:x", "unauthorized"),              // anonymous = false
            ("budget:family-7:ledger", "forbidden"), // private = true, nothing covers it
            ("prices:BTC", "subscribed"),            // open namespaces are as before
            ("alerts:x#42", "unauthorized"),         // a user channel needs its user
        ],
    )
    .await;
    let token = hs256(with(
        base("42"),
        json!({"channels": ["budget:family-7:*", "budget:shared"]}),
    ));
    let mut user = connect_with(&hub, &token).await.unwrap();
    expect_subscribes(
        &mut user,
        &[
            ("team:x", "subscribed"),
            ("budget:family-7:ledger", "subscribed"),
            ("budget:shared", "subscribed"),
            ("budget:family-7:*", "subscribed"),
            ("budget:family-8:ledger", "forbidden"),
            ("budget:*", "forbidden"),       // wider than the grant
            ("budget:shared2", "forbidden"), // an exact grant is exact
            ("alerts:x#42", "subscribed"),
        ],
    )
    .await;
    let mut other = connect_with(&hub, &hs256(base("43"))).await.unwrap();
    assert_error(
        &subscribe(&mut other, "alerts:x#42").await,
        "forbidden",
        "43 on 42's channel",
    );

    // A pattern never carries user channels (nor their snapshots): only the exact subscriber gets them.
    hub.publish("alerts:x#42", json!({"secret": 1})).await;
    let mut watcher = hub.connect().await;
    assert_eq!(
        subscribe(&mut watcher, "alerts:*").await["type"],
        "subscribed"
    );
    hub.publish("alerts:x#42", json!({"secret": 2})).await;
    hub.publish("alerts:x", json!({"public": 3})).await;
    let seen = watcher.recv().await;
    assert_eq!(seen["channel"], "alerts:x", "the pattern got {seen}");
    assert_eq!(seen["data"]["public"], 3);
    let mine = user.recv().await;
    assert_eq!(mine["type"], "message", "{mine}");
    assert_eq!(mine["data"]["secret"], 1, "{mine}");
    hub.shutdown().await;
}

#[actix_web::test]
async fn subscription_tokens_grant_one_channel_to_one_user() {
    let mut hub = TestHub::start(AUTH_TOML).await;
    let grant = |sub: Option<&str>, channel: &str| {
        let mut claims = json!({"channel": channel, "exp": now() + 600,
            "iss": "https://app.example", "aud": "relayhub"});
        if let Some(sub) = sub {
            claims["sub"] = sub.into();
        }
        hs256(claims)
    };
    let sub_with = |channel: &str, token: &str| json!({"op": "subscribe", "channel": channel, "token": token, "id": 3});
    let forged = unsigned(&json!({"sub": "42", "channel": "budget:b4", "exp": now() + 60}));
    let mut user = connect_with(&hub, &hs256(base("42"))).await.unwrap();
    let mut anonymous = hub.connect().await;
    for (as_user, channel, token, expected) in [
        (
            true,
            "budget:b1",
            grant(Some("42"), "budget:b1"),
            "subscribed",
        ),
        (
            true,
            "budget:b2",
            grant(Some("42"), "budget:b1"),
            "forbidden",
        ), // another channel
        (
            true,
            "budget:b3",
            grant(Some("43"), "budget:b3"),
            "forbidden",
        ), // another user
        (true, "budget:b3", grant(None, "budget:b3"), "forbidden"), // anonymous grant
        (true, "budget:b4", forged, "invalid_token"),
        (false, "budget:b5", grant(None, "budget:b5"), "subscribed"),
        (
            false,
            "budget:b6",
            grant(Some("42"), "budget:b6"),
            "forbidden",
        ),
    ] {
        let ws = if as_user { &mut user } else { &mut anonymous };
        let answer = request(ws, sub_with(channel, &token)).await;
        match expected {
            "subscribed" => assert_eq!(answer["type"], "subscribed", "{channel}: {answer}"),
            code => assert_error(&answer, code, channel),
        }
    }
    // The grant works: messages arrive.
    hub.publish("budget:b5", json!({"n": 1})).await;
    assert_eq!(anonymous.recv_type("message").await["data"]["n"], 1);
    hub.shutdown().await;
}

#[actix_web::test]
async fn client_publish_needs_the_publish_claim_where_the_namespace_is_not_anonymous() {
    let mut hub = TestHub::start(AUTH_TOML).await;
    let publish =
        |channel: &str| json!({"op": "publish", "channel": channel, "data": {"x": 1}, "id": 5});
    let mut anonymous = hub.connect().await;
    assert_error(
        &request(&mut anonymous, publish("talk:room")).await,
        "unauthorized",
        "anonymous",
    );
    let mut reader = connect_with(&hub, &hs256(base("1"))).await.unwrap();
    assert_error(
        &request(&mut reader, publish("talk:room")).await,
        "forbidden",
        "no publish claim",
    );
    let mut writer = connect_with(
        &hub,
        &hs256(with(base("2"), json!({"publish": ["talk:*"]}))),
    )
    .await
    .unwrap();
    assert_eq!(
        request(&mut writer, publish("talk:room")).await["type"],
        "published"
    );
    // client_publish = false stays false whatever the claim says.
    let mut wide = connect_with(
        &hub,
        &hs256(with(base("3"), json!({"publish": ["team:*"]}))),
    )
    .await
    .unwrap();
    assert_error(
        &request(&mut wide, publish("team:x")).await,
        "forbidden",
        "client_publish off",
    );
    let stats = hub.stats().await;
    assert!(stats["auth_refused"].as_u64().unwrap() >= 2, "{stats}");
    hub.shutdown().await;
}

#[actix_web::test]
async fn the_rest_fallback_applies_the_same_rules() {
    let mut hub = TestHub::start(AUTH_TOML).await;
    hub.publish("team:board", json!({"v": 1})).await;
    hub.publish("budget:family-7:ledger", json!({"v": 2})).await;
    hub.publish("alerts:inbox#42", json!({"v": 3})).await;
    let good = format!("Bearer {}", hs256(base("42")));
    let forged = format!("Bearer {}", unsigned(&base("42")));
    for (path, bearer, status, code) in [
        ("team:board", None, 401, Some("unauthorized")),
        ("team:board", Some(&good), 200, None),
        ("team:board", Some(&forged), 401, Some("invalid_token")),
        (
            "budget:family-7:ledger/history",
            Some(&good),
            403,
            Some("forbidden"),
        ),
        ("budget:family-7:ledger", None, 403, Some("forbidden")),
        ("alerts:inbox%2342", Some(&good), 200, None),
        ("alerts:inbox%2342", None, 401, Some("unauthorized")),
    ] {
        let headers: Vec<(&str, &str)> = bearer
            .map(|b| vec![("Authorization", b.as_str())])
            .unwrap_or_default();
        let url = hub.http(&format!("/api/channels/{path}"));
        let response = common::request("GET", &url, &headers, None).await;
        assert_eq!(response.status, status, "{path}: {}", response.text());
        assert_eq!(response.json()["error"]["code"].as_str(), code, "{path}");
    }
    let (status, _) = get_json(&hub.http("/api/channels/prices:none")).await;
    assert_eq!(status, 404, "open channels need no token");
    hub.shutdown().await;
}

#[actix_web::test]
async fn event_streams_apply_the_same_rules_and_end_with_their_token() {
    let mut hub = TestHub::start(AUTH_TOML).await;
    let good = hs256(base("42"));
    let forged = unsigned(&base("42"));
    let budget = hs256(with(base("42"), json!({"channels": ["budget:family-7:*"]})));
    for (query, header, status, code) in [
        ("channel=team:board", None, 401, "unauthorized"),
        (
            "channel=team:board&token=FORGED",
            None,
            401,
            "invalid_token",
        ),
        (
            "channel=budget:family-7:ledger&token=GOOD",
            None,
            403,
            "forbidden",
        ),
        ("channel=alerts:inbox%2342", None, 401, "unauthorized"),
        (
            "channel=alerts:inbox%2343&token=GOOD",
            None,
            403,
            "forbidden",
        ),
        ("channel=team:board", Some(&forged), 401, "invalid_token"),
    ] {
        let url = hub.http(&format!(
            "/sse?{}",
            query.replace("GOOD", &good).replace("FORGED", &forged)
        ));
        let bearer = header.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = bearer
            .as_deref()
            .map(|b| vec![("Authorization", b)])
            .unwrap_or_default();
        match common::sse::Stream::open(&url, &headers).await {
            Ok(_) => panic!("{query}: a stream opened"),
            Err((got, body)) => {
                assert_eq!(
                    (got, body["error"]["code"].as_str()),
                    (status, Some(code)),
                    "{query}: {body}"
                )
            }
        }
    }
    // Allowed with the token (in the URL, as EventSource must send it, or as a bearer header).
    let url = hub.http(&format!(
        "/sse?channel=team:board&channel=alerts:inbox%2342&token={good}"
    ));
    let mut stream = common::sse::Stream::open(&url, &[]).await.expect("opens");
    stream.subscribed(&["team:board", "alerts:inbox#42"]).await;
    hub.publish("alerts:inbox#42", json!({"v": 1})).await;
    assert_eq!(stream.event().await.data["data"], json!({"v": 1}));
    let url = hub.http("/sse?channel=budget:family-7:ledger");
    let bearer = format!("Bearer {budget}");
    let mut stream = common::sse::Stream::open(&url, &[("Authorization", &bearer)])
        .await
        .expect("opens with a bearer token");
    stream.subscribed(&["budget:family-7:ledger"]).await;
    // A stream ends when its token expires: it cannot be handed a fresh one.
    let short = hs256(with(base("42"), json!({"exp": now() + 2})));
    let url = hub.http(&format!("/sse?channel=team:board&token={short}"));
    let mut stream = common::sse::Stream::open(&url, &[]).await.expect("opens");
    stream.subscribed(&["team:board"]).await;
    let mut comments = Vec::new();
    while let Some(event) = stream.next().await {
        comments.extend(event.comment);
    }
    assert!(
        comments.iter().any(|c| c.contains("token expired")),
        "{comments:?}"
    );
    assert!(hub.stats().await["tokens_expired"].as_u64() >= Some(1));
    hub.shutdown().await;
}

#[actix_web::test]
async fn an_expired_token_closes_with_4001_unless_refreshed() {
    let mut hub = TestHub::start(AUTH_TOML).await;
    // Expires in 2 s, not refreshed: closed with 4001.
    let started = Instant::now();
    let mut ws = connect_with(&hub, &hs256(with(base("42"), json!({"exp": now() + 2}))))
        .await
        .unwrap();
    assert_eq!(subscribe(&mut ws, "team:x").await["type"], "subscribed");
    assert_eq!(close_code(&mut ws).await, 4001);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "closed early: {:?}",
        started.elapsed()
    );

    // Refreshed before it expires: still open past the first expiry, closed at the second.
    let mut ws = connect_with(&hub, &hs256(with(base("42"), json!({"exp": now() + 2}))))
        .await
        .unwrap();
    let authed = auth(&mut ws, &hs256(with(base("42"), json!({"exp": now() + 5})))).await;
    assert_eq!(authed["type"], "authed", "{authed}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    ws.ping().await;
    assert_eq!(close_code(&mut ws).await, 4001);
    let stats = hub.stats().await;
    assert!(stats["tokens_expired"].as_u64().unwrap() >= 2, "{stats}");

    // A subscription token's expiry ends that subscription only.
    let mut ws = connect_with(&hub, &hs256(base("42"))).await.unwrap();
    let grant = hs256(
        json!({"sub": "42", "channel": "budget:b1", "exp": now() + 2,
        "iss": "https://app.example", "aud": "relayhub"}),
    );
    let ok = request(
        &mut ws,
        json!({"op": "subscribe", "channel": "budget:b1", "token": grant}),
    )
    .await;
    assert_eq!(ok["type"], "subscribed");
    let ended = ws.recv().await;
    assert_eq!(
        ended,
        json!({"type": "unsubscribed", "channel": "budget:b1", "reason": "token_expired"})
    );
    ws.ping().await;
    hub.shutdown().await;
}

#[actix_web::test]
async fn a_refresh_with_narrower_claims_ends_what_it_no_longer_covers() {
    let mut hub = TestHub::start(AUTH_TOML).await;
    let wide = hs256(with(
        base("42"),
        json!({"channels": ["budget:a", "budget:b"]}),
    ));
    let mut ws = connect_with(&hub, &wide).await.unwrap();
    assert_eq!(subscribe(&mut ws, "budget:a").await["type"], "subscribed");
    assert_eq!(subscribe(&mut ws, "budget:b").await["type"], "subscribed");
    let narrow = hs256(with(base("42"), json!({"channels": ["budget:a"]})));
    assert_eq!(auth(&mut ws, &narrow).await["type"], "authed");
    let ended = ws.recv().await;
    assert_eq!(
        ended,
        json!({"type": "unsubscribed", "channel": "budget:b", "reason": "forbidden"})
    );
    hub.publish("budget:a", json!({"still": true})).await;
    assert_eq!(ws.recv_type("message").await["channel"], "budget:a");
    hub.shutdown().await;
}

#[actix_web::test]
async fn without_auth_tokens_change_nothing() {
    let mut hub = TestHub::start("").await;
    let hub_config = test_config("");
    assert!(!hub_config.auth.enabled());
    // A `?token=` is ignored; the connection is anonymous as any other.
    let mut ws = connect_with(&hub, &token_for("42", json!({})))
        .await
        .expect("no auth: accepted");
    assert_error(
        &auth(&mut ws, "whatever").await,
        "invalid_token",
        "no auth configured",
    );
    assert_eq!(subscribe(&mut ws, "chat:lobby").await["type"], "subscribed");
    // User channels still belong to their user: an anonymous connection cannot have them.
    assert_error(
        &subscribe(&mut ws, "chat:inbox#42").await,
        "unauthorized",
        "user channel",
    );
    hub.shutdown().await;
}

/// A JWK (public half of a test key) with its `kid`.
fn jwk(private: &[u8], alg: Algorithm, kid: &str) -> Value {
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(private).unwrap(),
        _ => EncodingKey::from_ec_pem(private).unwrap(),
    };
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, alg).expect("a JWK");
    jwk.common.key_id = Some(kid.into());
    serde_json::to_value(jwk).unwrap()
}

/// A token signed with `private`, naming `kid` in its header.
fn signed_with(private: &[u8], alg: Algorithm, kid: &str, sub: &str) -> String {
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(private).unwrap(),
        _ => EncodingKey::from_ec_pem(private).unwrap(),
    };
    let mut header = Header::new(alg);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, &json!({"sub": sub, "exp": now() + 600}), &key).unwrap()
}

#[actix_web::test]
async fn a_jwks_is_fetched_cached_refreshed_on_an_unknown_kid_and_bounded() {
    use common::upstream::{Mode, Upstream};
    let (rsa, _) = key_pair("rsa");
    let (ec, _) = key_pair("ec");
    let upstream = Upstream::start();
    let set = |keys: Vec<Value>| Mode::Fixed(json!({ "keys": keys }));
    upstream.set_mode(set(vec![jwk(&rsa, Algorithm::RS256, "a")]));
    let toml = format!(
        "[auth]\njwks_url = \"{}\"\njwks_min_refresh_interval = \"1s\"\njwks_timeout = \"1s\"\njwks_max_bytes = 4096\n[namespaces.team]\nanonymous = false\n",
        upstream.url("/jwks")
    );
    let mut hub = TestHub::start(&toml).await;
    let fetches = || upstream.requests("/jwks");
    assert_eq!(fetches(), 1, "fetched once at start");
    let token_a = signed_with(&rsa, Algorithm::RS256, "a", "1");
    let token_b = signed_with(&ec, Algorithm::ES256, "b", "2");
    // Cached: many connections, no new fetch.
    for _ in 0..3 {
        let mut ws = connect_with(&hub, &token_a).await.expect("key a");
        assert_eq!(subscribe(&mut ws, "team:x").await["type"], "subscribed");
    }
    assert_eq!(fetches(), 1, "served from the cache");
    // An unknown kid: one fetch (still without b), refused.
    let (status, body) = connect_with(&hub, &token_b).await.err().expect("b unknown");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("invalid_token"))
    );
    assert_eq!(fetches(), 2);
    // Unknown kids again at once: the rate limit spares the provider.
    for _ in 0..5 {
        assert!(connect_with(&hub, &token_b).await.is_err());
    }
    assert_eq!(fetches(), 2, "no fetch within jwks_min_refresh_interval");
    // Rotation: b is published, a is retired. The next unknown kid (after the interval) brings b in.
    upstream.set_mode(set(vec![jwk(&ec, Algorithm::ES256, "b")]));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut ws = connect_with(&hub, &token_b)
        .await
        .expect("b after rotation");
    assert_eq!(subscribe(&mut ws, "team:x").await["type"], "subscribed");
    assert_eq!(fetches(), 3);
    assert!(connect_with(&hub, &token_a).await.is_err(), "a retired");
    // A token must name its key, and the key set never holds a symmetric key.
    let no_kid = sign(
        &json!({"sub": "3", "exp": now() + 60}),
        Algorithm::ES256,
        &EncodingKey::from_ec_pem(&ec).unwrap(),
    );
    assert!(connect_with(&hub, &no_kid).await.is_err());
    // A set past jwks_max_bytes, an upstream that hangs past jwks_timeout, a set without usable keys: each
    // fetch fails and b stays in use.
    for mode in [
        set(vec![
            json!({"kid": "pad", "kty": "oct", "k": "x".repeat(8000)}),
        ]),
        Mode::Hang,
        set(vec![json!({"kid": "h", "kty": "oct", "k": "c2VjcmV0"})]),
    ] {
        upstream.set_mode(mode);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let unknown = signed_with(&ec, Algorithm::ES256, "c", "4");
        let started = Instant::now();
        assert!(connect_with(&hub, &unknown).await.is_err());
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "bounded by jwks_timeout"
        );
        let mut ws = connect_with(&hub, &token_b).await.expect("b kept");
        ws.ping().await;
    }
    let stats = hub.stats().await;
    assert!(
        stats["jwks_fetch_failures"].as_u64().unwrap() >= 3,
        "{stats}"
    );
    assert!(stats["jwks_fetches"].as_u64().unwrap() >= 3, "{stats}");
    // An auth frame with an unknown kid asks for a fetch too; the client's next try gets in.
    upstream.set_mode(set(vec![
        jwk(&ec, Algorithm::ES256, "b"),
        jwk(&rsa, Algorithm::RS256, "d"),
    ]));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let token_d = signed_with(&rsa, Algorithm::RS256, "d", "2");
    assert_error(
        &auth(&mut ws, &token_d).await,
        "invalid_token",
        "d not fetched yet",
    );
    common::eventually(Duration::from_secs(5), "d fetched", || async {
        upstream.requests("/jwks") > 6
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let authed = auth(&mut ws, &token_d).await;
    assert_eq!(authed["type"], "authed", "{authed}");
    hub.shutdown().await;
}

#[actix_web::test]
async fn tokens_and_their_claims_are_bounded() {
    let mut hub = TestHub::start(AUTH_TOML).await;
    let mut ws = hub.connect().await;
    let huge = hs256(with(base("42"), json!({"pad": "x".repeat(9000)})));
    assert_error(&auth(&mut ws, &huge).await, "invalid_token", "over 8 KiB");
    let many: Vec<String> = (0..257).map(|i| format!("budget:c{i}")).collect();
    let wide = hs256(with(base("42"), json!({ "channels": many })));
    let refused = auth(&mut ws, &wide).await;
    assert_error(&refused, "invalid_token", "257 channels");
    assert!(
        refused["message"].as_str().unwrap().contains("256"),
        "{refused}"
    );
    let within: Vec<String> = (0..256).map(|i| format!("budget:c{i}")).collect();
    let ok = hs256(with(base("42"), json!({ "channels": within })));
    assert_eq!(auth(&mut ws, &ok).await["type"], "authed");
    hub.shutdown().await;
}
