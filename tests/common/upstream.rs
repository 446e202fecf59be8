//! Integration-test utility: [`Upstream`], a real HTTP server on 127.0.0.1 that plays a polled upstream API
//! (JSON, error status, hang, bad JSON) and counts requests. Used by tests/*.rs through `mod common;`.

// Each test binary uses a different part of this file.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::http::StatusCode;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use serde_json::{Value, json};

/// How long a [`Mode::Hang`] request waits; longer than any test, and cut short when the server stops.
const HANG_FOR: Duration = Duration::from_secs(3600);

/// What the upstream answers to every request, whatever its path.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// 200 with this JSON; an object also gets `"n"`: the request's number (1, 2, ...), so successive
    /// values differ.
    Ok(Value),
    /// This status (500 when it is not a valid status code) with a small JSON error body.
    Status(u16),
    /// Never answers (until the server stops).
    Hang,
    /// 200 with `Content-Type: application/json` and a body that is not JSON.
    BadJson,
    /// 200 with exactly this JSON (no `"n"`): the same document every time.
    Fixed(Value),
    /// This JSON (no `"n"`) with `ETag` and `Last-Modified`; a request whose `If-None-Match` is the ETag gets
    /// 304 Not Modified and no body.
    Conditional {
        value: Value,
        etag: String,
        last_modified: String,
    },
    /// This status with a `Retry-After` header of this text.
    RetryAfter(u16, String),
}

/// State shared by the test and the server's handler.
struct Shared {
    /// The current answer.
    mode: Mutex<Mode>,
    /// Path and query of every request, in arrival order.
    requests: Mutex<Vec<String>>,
    /// Requests seen so far; the next request's number is this plus one.
    counter: AtomicU64,
    /// `If-None-Match` and `If-Modified-Since` of every request (empty when absent), in arrival order.
    conditions: Mutex<Vec<(String, String)>>,
    /// Answers sent with 304.
    not_modified: AtomicU64,
}

/// A real upstream HTTP server on `127.0.0.1:<free port>`, running on its own thread with its own actix
/// `System`, so it works the same from a plain `#[test]`, `#[actix_web::test]` or `#[tokio::test]`.
/// Answers `{"n": <request number>}` until [`Upstream::set_mode`] says otherwise. Dropping it stops it.
pub struct Upstream {
    /// Where the server listens.
    addr: SocketAddr,
    /// Mode and request log, shared with the handler.
    shared: Arc<Shared>,
    /// Stops the server on drop.
    server: ServerHandle,
    /// The server's thread, joined on drop.
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    /// Binds a free port on 127.0.0.1 and starts serving; requests are accepted as soon as this returns.
    pub fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("a bound socket has an address");
        let shared = Arc::new(Shared {
            mode: Mutex::new(Mode::Ok(json!({}))),
            requests: Mutex::new(Vec::new()),
            counter: AtomicU64::new(0),
            conditions: Mutex::new(Vec::new()),
            not_modified: AtomicU64::new(0),
        });
        let data = web::Data::from(Arc::clone(&shared));
        let (handle_tx, handle_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("upstream-{}", addr.port()))
            .spawn(move || {
                actix_web::rt::System::new().block_on(async move {
                    let server = HttpServer::new(move || {
                        App::new()
                            .app_data(data.clone())
                            .default_service(web::to(respond))
                    })
                    .workers(1)
                    .disable_signals()
                    .shutdown_timeout(0)
                    .listen(listener)
                    .expect("listen on the bound socket")
                    .run();
                    handle_tx
                        .send(server.handle())
                        .expect("Upstream::start waits for the handle");
                    // An error here only means the server stopped abnormally; the test sees failed requests.
                    let _ = server.await;
                });
            })
            .expect("spawn the upstream thread");
        let server = handle_rx
            .recv()
            .expect("the upstream thread started its server");
        Upstream {
            addr,
            shared,
            server,
            thread: Some(thread),
        }
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The full URL of `path` (which starts with `/`, and may have a query) on this server.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// How many requests so far had a path (with its query) starting with `path_prefix`; `""` counts all.
    pub fn requests(&self, path_prefix: &str) -> usize {
        lock(&self.shared.requests)
            .iter()
            .filter(|p| p.starts_with(path_prefix))
            .count()
    }

    /// `(If-None-Match, If-Modified-Since)` of every request so far (empty strings when absent).
    pub fn conditions(&self) -> Vec<(String, String)> {
        lock(&self.shared.conditions).clone()
    }

    /// How many requests were answered 304 Not Modified.
    pub fn not_modified(&self) -> u64 {
        self.shared.not_modified.load(Ordering::SeqCst)
    }

    /// Changes what every later request gets.
    pub fn set_mode(&self, mode: Mode) {
        *lock(&self.shared.mode) = mode;
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // `stop` sends its command at once; its future only waits for the result, which joining does too.
        // Not graceful: hanging requests are cut off.
        drop(self.server.stop(false));
        if let Some(thread) = self.thread.take() {
            // A panic on the server thread has already been printed; panicking again here could abort.
            let _ = thread.join();
        }
    }
}

/// The handler for every path and method.
async fn respond(req: HttpRequest, shared: web::Data<Shared>) -> HttpResponse {
    let n = shared.counter.fetch_add(1, Ordering::SeqCst) + 1;
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.path().to_owned(), |pq| pq.as_str().to_owned());
    lock(&shared.requests).push(target);
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let if_none_match = header("if-none-match");
    lock(&shared.conditions).push((if_none_match.clone(), header("if-modified-since")));
    let mode = lock(&shared.mode).clone();
    match mode {
        Mode::Ok(mut value) => {
            if let Value::Object(fields) = &mut value {
                fields.insert("n".to_owned(), json!(n));
            }
            HttpResponse::Ok().json(value)
        }
        Mode::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            HttpResponse::build(status)
                .json(json!({"error": format!("test upstream status {code}")}))
        }
        Mode::Hang => {
            actix_web::rt::time::sleep(HANG_FOR).await;
            HttpResponse::GatewayTimeout().finish()
        }
        Mode::BadJson => HttpResponse::Ok()
            .content_type("application/json")
            .body("{\"truncated\": "),
        Mode::Fixed(value) => HttpResponse::Ok().json(value),
        Mode::Conditional {
            value,
            etag,
            last_modified,
        } => {
            if if_none_match == etag {
                shared.not_modified.fetch_add(1, Ordering::SeqCst);
                return HttpResponse::NotModified()
                    .insert_header(("ETag", etag))
                    .finish();
            }
            HttpResponse::Ok()
                .insert_header(("ETag", etag))
                .insert_header(("Last-Modified", last_modified))
                .json(value)
        }
        Mode::RetryAfter(code, after) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            HttpResponse::build(status)
                .insert_header(("Retry-After", after))
                .json(json!({"error": "slow down"}))
        }
    }
}

/// Locks `m`, ignoring poisoning: a panicking test must not hide the next assertion behind a second panic.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
