//! Fetches one upstream JSON document over HTTP(S) for the poller: the shared client setup ([`build_client`])
//! and one GET with a whole-request timeout, a body size limit and errors the poller can log and count.
//! A GET can be conditional ([`Validators`]: the `ETag` and `Last-Modified` of the last answer), and a 429 or
//! 503 with `Retry-After` says when the upstream wants to be asked again.

use std::fmt;
use std::sync::Once;
use std::time::{Duration, SystemTime};

use awc::error::SendRequestError;
use awc::http::header;
use futures_util::{Stream, StreamExt};
use serde_json::Value;

/// How many characters of an error response's body [`FetchError::Status`] keeps.
const STATUS_BODY_CHARS: usize = 200;

/// Backstop for connecting and the TLS handshake; the per-request timeout of [`fetch_json`] is normally
/// shorter and is the one that applies.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a fetch failed; every variant counts as a failed poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchError {
    /// The request could not be made or its response not read: bad URL or header, DNS, connection refused,
    /// TLS, a broken connection.
    Connect(String),
    /// The whole request, body included, took longer than the timeout.
    Timeout,
    /// The upstream answered with a non-2xx status; the string holds the first 200 characters of its body.
    Status(u16, String),
    /// A 429 or 503 with a usable `Retry-After`: ask again no sooner than this (capped by the caller's
    /// maximum).
    RetryAfter(u16, Duration),
    /// The body is larger than the allowed size (after decompression).
    TooLarge,
    /// The body is not valid JSON; the string is the parser's message.
    InvalidJson(String),
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::Connect(reason) => write!(f, "request failed: {reason}"),
            FetchError::Timeout => f.write_str("request timed out"),
            FetchError::Status(status, body) if body.is_empty() => {
                write!(f, "HTTP status {status}")
            }
            FetchError::Status(status, body) => write!(f, "HTTP status {status}: {body}"),
            FetchError::RetryAfter(status, after) => write!(
                f,
                "HTTP status {status}, retry after {}",
                crate::core::config::format_duration(*after)
            ),
            FetchError::TooLarge => f.write_str("response body too large"),
            FetchError::InvalidJson(reason) => write!(f, "invalid JSON: {reason}"),
        }
    }
}

impl std::error::Error for FetchError {}

/// Builds the upstream HTTP client: HTTP/1.1 and HTTP/2, HTTPS through rustls 0.23 with the webpki root
/// certificates (no system OpenSSL or certificate store needed), gzip responses decoded, redirects followed,
/// and no client-wide timeout: [`fetch_json`] gives each request its own.
///
/// Why awc: it is actix's own HTTP client, so the poller reuses the HTTP stack the server already builds
/// instead of a second one. An `awc::Client` is not `Send`: build one per arbiter (thread) that fetches.
/// Known limitation: awc ignores `HTTP_PROXY` / `HTTPS_PROXY`, so upstreams behind a forward proxy are not
/// reachable.
pub fn build_client() -> awc::Client {
    install_crypto_provider();
    // With awc's `rustls-0_23-webpki-roots` feature, `Connector::new()` builds exactly that connector: a
    // rustls 0.23 `ClientConfig` over the webpki roots with ALPN h2 + http/1.1 (it panics without a crypto
    // provider, hence the line above). Passing our own config through `Connector::rustls_0_23` would need
    // the `webpki-roots` crate as a direct dependency for the same result.
    let connector = awc::Connector::new()
        .timeout(CONNECT_TIMEOUT)
        .handshake_timeout(CONNECT_TIMEOUT);
    awc::Client::builder()
        .connector(connector)
        .disable_timeout()
        .add_default_header((header::USER_AGENT, "relayhub"))
        .finish()
}

/// Installs rustls's `ring` provider as the process default, once. Another provider already installed
/// (by another part of the process) is fine too: any default provider serves.
fn install_crypto_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // An `Err` means a default provider was already installed, which is all that is needed.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The validators of the last successful answer, sent back as `If-None-Match` / `If-Modified-Since` so an
/// unchanged document costs the upstream a 304 and no body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validators {
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

/// What a conditional GET brought.
#[derive(Debug, Clone, PartialEq)]
pub enum Fetched {
    /// A document, with the validators to send next time (none when the upstream sent none).
    Body(Value, Validators),
    /// 304: the document is the one the validators describe.
    NotModified,
}

/// GETs `url` with `headers` (name, value) and parses the body as JSON.
///
/// - `timeout` covers the whole request: connecting, the response head and reading the body.
/// - The body may be at most `max_bytes` long after gzip decoding; beyond that the read stops at once.
/// - Any non-2xx status is [`FetchError::Status`]; redirects are followed first.
#[cfg(test)]
pub async fn fetch_json(
    client: &awc::Client,
    url: &str,
    headers: &[(String, String)],
    timeout: Duration,
    max_bytes: usize,
) -> Result<Value, FetchError> {
    match fetch_conditional(
        client,
        url,
        headers,
        &Validators::default(),
        timeout,
        max_bytes,
    )
    .await?
    {
        Fetched::Body(value, _) => Ok(value),
        // Nothing conditional was asked: a 304 here is the upstream's mistake.
        Fetched::NotModified => Err(FetchError::Status(304, String::new())),
    }
}

/// [`fetch_json`], conditional on `validators`: a 304 answer is [`Fetched::NotModified`].
pub async fn fetch_conditional(
    client: &awc::Client,
    url: &str,
    headers: &[(String, String)],
    validators: &Validators,
    timeout: Duration,
    max_bytes: usize,
) -> Result<Fetched, FetchError> {
    tokio::time::timeout(timeout, fetch(client, url, headers, validators, max_bytes))
        .await
        .unwrap_or(Err(FetchError::Timeout))
}

/// `Retry-After` as a delay from now: delta-seconds or an HTTP date (a date in the past is no delay).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// [`fetch_conditional`] without the timeout.
async fn fetch(
    client: &awc::Client,
    url: &str,
    headers: &[(String, String)],
    validators: &Validators,
    max_bytes: usize,
) -> Result<Fetched, FetchError> {
    let mut request = client
        .get(url)
        .insert_header((header::ACCEPT, "application/json"));
    if let Some(etag) = &validators.etag {
        request = request.insert_header((header::IF_NONE_MATCH, etag.as_str()));
    }
    if let Some(date) = &validators.last_modified {
        request = request.insert_header((header::IF_MODIFIED_SINCE, date.as_str()));
    }
    for (name, value) in headers {
        request = request.insert_header((name.as_str(), value.as_str()));
    }
    let mut response = request.send().await.map_err(|err| match err {
        SendRequestError::Timeout => FetchError::Timeout,
        other => FetchError::Connect(other.to_string()),
    })?;

    let status = response.status();
    if status == awc::http::StatusCode::NOT_MODIFIED {
        return Ok(Fetched::NotModified);
    }
    if !status.is_success() {
        let retry_after = matches!(status.as_u16(), 429 | 503)
            .then(|| response.headers().get(header::RETRY_AFTER))
            .flatten()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        if let Some(after) = retry_after {
            return Err(FetchError::RetryAfter(status.as_u16(), after));
        }
        // At most 4 bytes per character; a body that cannot be read leaves the snippet short or empty.
        let (body, _) = read_body(&mut response, STATUS_BODY_CHARS * 4).await;
        let snippet = String::from_utf8_lossy(&body)
            .chars()
            .take(STATUS_BODY_CHARS)
            .collect();
        return Err(FetchError::Status(status.as_u16(), snippet));
    }

    // Fails fast on an honest Content-Length; the read below also enforces the limit (chunked, gzip).
    let declared = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let compressed = response.headers().contains_key(header::CONTENT_ENCODING);
    if let Some(len) = declared
        && !compressed
        && len > max_bytes as u64
    {
        return Err(FetchError::TooLarge);
    }

    let (body, outcome) = read_body(&mut response, max_bytes).await;
    match outcome {
        ReadOutcome::Complete => {}
        ReadOutcome::OverLimit => return Err(FetchError::TooLarge),
        ReadOutcome::Failed(reason) => {
            return Err(FetchError::Connect(format!(
                "reading the response body: {reason}"
            )));
        }
    }
    let header_text = |name| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let validators = Validators {
        etag: header_text(header::ETAG),
        last_modified: header_text(header::LAST_MODIFIED),
    };
    let value =
        serde_json::from_slice(&body).map_err(|err| FetchError::InvalidJson(err.to_string()))?;
    Ok(Fetched::Body(value, validators))
}

/// How a body read ended.
enum ReadOutcome {
    /// The whole body fit in the limit.
    Complete,
    /// The body went past the limit; the bytes read so far are returned, capped at the limit.
    OverLimit,
    /// The connection failed mid-body.
    Failed(String),
}

/// Reads a body stream up to `limit` bytes, stopping as soon as the limit is passed.
async fn read_body<S, B, E>(body: &mut S, limit: usize) -> (Vec<u8>, ReadOutcome)
where
    S: Stream<Item = Result<B, E>> + Unpin,
    B: AsRef<[u8]>,
    E: fmt::Display,
{
    let mut buf = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(err) => return (buf, ReadOutcome::Failed(err.to_string())),
        };
        let chunk = chunk.as_ref();
        if chunk.len() > limit - buf.len() {
            buf.extend_from_slice(&chunk[..limit - buf.len()]);
            return (buf, ReadOutcome::OverLimit);
        }
        buf.extend_from_slice(chunk);
    }
    (buf, ReadOutcome::Complete)
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::dev::ServerHandle;
    use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
    use serde_json::json;

    const LIMIT: usize = 1024;
    const TIMEOUT: Duration = Duration::from_millis(500);

    async fn ok(req: HttpRequest) -> HttpResponse {
        let auth = req
            .headers()
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        HttpResponse::Ok().json(json!({"ok": true, "key": auth, "path": req.path()}))
    }

    async fn error() -> HttpResponse {
        HttpResponse::InternalServerError().body(format!("boom {}", "x".repeat(500)))
    }

    async fn not_found() -> HttpResponse {
        HttpResponse::NotFound().finish()
    }

    async fn bad_json() -> HttpResponse {
        HttpResponse::Ok()
            .content_type("application/json")
            .body("{\"a\": ")
    }

    async fn slow_head() -> HttpResponse {
        actix_web::rt::time::sleep(Duration::from_secs(10)).await;
        HttpResponse::Ok().json(json!({}))
    }

    /// Sends the head and half a document at once, then stalls: only a whole-request timeout catches it.
    async fn slow_body() -> HttpResponse {
        let chunks = futures_util::stream::unfold(0, |step| async move {
            match step {
                0 => Some((
                    Ok::<_, actix_web::Error>(web::Bytes::from_static(b"{\"a\":")),
                    1,
                )),
                1 => {
                    actix_web::rt::time::sleep(Duration::from_secs(10)).await;
                    Some((Ok(web::Bytes::from_static(b"1}")), 2))
                }
                _ => None,
            }
        });
        HttpResponse::Ok()
            .content_type("application/json")
            .streaming(chunks)
    }

    /// A JSON string of `LIMIT + 1` bytes with a Content-Length.
    async fn big() -> HttpResponse {
        HttpResponse::Ok()
            .content_type("application/json")
            .body(format!("\"{}\"", "x".repeat(LIMIT - 1)))
    }

    /// The same size, chunked (no Content-Length), so only the streaming check can catch it.
    async fn big_chunked() -> HttpResponse {
        let chunks = futures_util::stream::iter((0..5).map(|i| {
            let piece = if i == 0 { "\"" } else { "" };
            Ok::<_, actix_web::Error>(web::Bytes::from(format!("{piece}{}", "y".repeat(300))))
        }));
        HttpResponse::Ok()
            .content_type("application/json")
            .streaming(chunks)
    }

    /// A body of exactly `LIMIT` bytes is allowed.
    async fn exact() -> HttpResponse {
        HttpResponse::Ok()
            .content_type("application/json")
            .body(format!("\"{}\"", "z".repeat(LIMIT - 2)))
    }

    /// Starts a real server on 127.0.0.1:0 and returns its base URL.
    fn start_server() -> (String, ServerHandle) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("bound socket has an address");
        let server = HttpServer::new(|| {
            App::new()
                .route("/ok", web::get().to(ok))
                .route("/error", web::get().to(error))
                .route("/not-found", web::get().to(not_found))
                .route("/bad-json", web::get().to(bad_json))
                .route("/slow-head", web::get().to(slow_head))
                .route("/slow-body", web::get().to(slow_body))
                .route("/big", web::get().to(big))
                .route("/big-chunked", web::get().to(big_chunked))
                .route("/exact", web::get().to(exact))
        })
        .workers(1)
        .disable_signals()
        .shutdown_timeout(0)
        .listen(listener)
        .expect("listen on the bound socket")
        .run();
        let handle = server.handle();
        actix_web::rt::spawn(server);
        (format!("http://{addr}"), handle)
    }

    async fn get(client: &awc::Client, url: &str) -> Result<Value, FetchError> {
        fetch_json(client, url, &[], TIMEOUT, LIMIT).await
    }

    #[actix_web::test]
    async fn success_with_headers() {
        let (base, server) = start_server();
        let client = build_client();
        let headers = vec![("X-Api-Key".to_string(), "k-123".to_string())];
        let value = fetch_json(&client, &format!("{base}/ok"), &headers, TIMEOUT, LIMIT)
            .await
            .unwrap();
        assert_eq!(value, json!({"ok": true, "key": "k-123", "path": "/ok"}));
        // The client is reused for a second request.
        assert_eq!(
            get(&client, &format!("{base}/ok")).await.unwrap()["ok"],
            true
        );
        server.stop(false).await;
    }

    #[actix_web::test]
    async fn non_2xx_status_is_an_error_with_a_body_snippet() {
        let (base, server) = start_server();
        let client = build_client();
        let err = get(&client, &format!("{base}/error")).await.unwrap_err();
        let FetchError::Status(500, body) = &err else {
            panic!("expected a 500, got {err:?}");
        };
        assert_eq!(body.chars().count(), STATUS_BODY_CHARS);
        assert!(body.starts_with("boom xxx"));
        assert!(err.to_string().starts_with("HTTP status 500: boom x"));

        let err = get(&client, &format!("{base}/not-found"))
            .await
            .unwrap_err();
        assert_eq!(err, FetchError::Status(404, String::new()));
        assert_eq!(err.to_string(), "HTTP status 404");
        // An unknown route is actix's 404 too.
        assert!(matches!(
            get(&client, &format!("{base}/nope")).await,
            Err(FetchError::Status(404, _))
        ));
        server.stop(false).await;
    }

    #[actix_web::test]
    async fn bad_json_is_invalid_json() {
        let (base, server) = start_server();
        let err = get(&build_client(), &format!("{base}/bad-json"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, FetchError::InvalidJson(msg) if msg.contains("EOF")),
            "{err:?}"
        );
        assert!(err.to_string().starts_with("invalid JSON: "));
        server.stop(false).await;
    }

    #[actix_web::test]
    async fn timeout_covers_head_and_body() {
        let (base, server) = start_server();
        let client = build_client();
        for path in ["/slow-head", "/slow-body"] {
            let started = std::time::Instant::now();
            let err = get(&client, &format!("{base}{path}")).await.unwrap_err();
            assert_eq!(err, FetchError::Timeout, "{path}");
            let took = started.elapsed();
            assert!(
                took >= TIMEOUT && took < Duration::from_secs(5),
                "{path}: {took:?}"
            );
        }
        server.stop(false).await;
    }

    #[actix_web::test]
    async fn oversize_body_is_too_large() {
        let (base, server) = start_server();
        let client = build_client();
        assert_eq!(
            get(&client, &format!("{base}/big")).await,
            Err(FetchError::TooLarge)
        );
        assert_eq!(
            get(&client, &format!("{base}/big-chunked")).await,
            Err(FetchError::TooLarge)
        );
        let exact = get(&client, &format!("{base}/exact")).await.unwrap();
        assert_eq!(exact.as_str().map(str::len), Some(LIMIT - 2));
        server.stop(false).await;
    }

    #[actix_web::test]
    async fn connect_errors() {
        let client = build_client();
        // A port that was just free: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        let err = get(&client, &format!("http://127.0.0.1:{port}/"))
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::Connect(_)), "{err:?}");
        assert!(err.to_string().starts_with("request failed: "));

        let err = get(&client, "not a url").await.unwrap_err();
        assert!(matches!(err, FetchError::Connect(_)), "{err:?}");

        let bad_header = vec![("bad header".to_string(), "v".to_string())];
        let err = fetch_json(&client, "http://127.0.0.1:1/", &bad_header, TIMEOUT, LIMIT)
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::Connect(_)), "{err:?}");
    }

    #[test]
    fn build_client_twice_outside_a_runtime() {
        // The provider is installed once; the second call must not panic.
        let _first = build_client();
        let _second = build_client();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        // 2015-10-21 07:28:00 GMT is `now`; a minute later is a minute away.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:29:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn display() {
        assert_eq!(
            FetchError::Connect("refused".into()).to_string(),
            "request failed: refused"
        );
        assert_eq!(FetchError::Timeout.to_string(), "request timed out");
        assert_eq!(
            FetchError::Status(502, "bad gateway".into()).to_string(),
            "HTTP status 502: bad gateway"
        );
        assert_eq!(FetchError::TooLarge.to_string(), "response body too large");
        assert_eq!(
            FetchError::InvalidJson("EOF".into()).to_string(),
            "invalid JSON: EOF"
        );
    }
}
