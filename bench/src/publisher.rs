//! The paced publisher: a dedicated std thread that publishes at a fixed total rate on an absolute schedule
//! (publish `n` is due at `start + n / rate`, so no drift accumulates) through Redis or the hub's HTTP API.
//! `run` starts it with [`spawn`] and learns from [`Event`]s when the measured window opens and when
//! everything is sent; joining the thread gives the path's [`Answers`].
//!
//! The load is open loop: the HTTP sink pipelines requests on one keep-alive connection and a reader thread
//! counts the responses, so a slow answer never delays the next publish (a closed loop would let the hub
//! slow the load down and hide its queueing from the latency figures).

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::args::{Args, PublishMode};
use crate::connections::unix_nanos;

/// A publish sent later than this behind its due time counts as late.
const LATE: Duration = Duration::from_millis(1);
/// When this many publishes failed and none succeeded, the publisher gives up: the path is broken.
const GIVE_UP_AFTER: u64 = 10;
/// Connect limit of the HTTP publisher.
const HTTP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the publisher waiting for its last answers looks again.
const ANSWER_POLL: Duration = Duration::from_millis(2);

/// How the publish path answered.
#[derive(Clone, Debug, Default)]
pub struct Answers {
    /// Publishes the path accepted.
    pub succeeded: u64,
    /// Publishes refused, failed, or not answered in time.
    pub failed: u64,
    /// The first failure.
    pub first_error: Option<String>,
    /// Publishes Redis reported as reaching no subscriber (`PUBLISH` returned 0).
    pub no_receivers: u64,
}

impl Answers {
    fn fail(&mut self, count: u64, error: impl FnOnce() -> String) {
        if count > 0 {
            self.failed += count;
            self.first_error.get_or_insert_with(error);
        }
    }
}

/// Where a publish goes.
pub trait Sink: Send {
    /// Sends one publish (`data` is a JSON document) without waiting longer than the path needs to take it.
    fn send(&mut self, channel: &str, data: &str);
    /// Answers so far.
    fn answers(&self) -> Answers;
    /// Waits up to `wait` for answers still outstanding; what is unanswered then counts as failed.
    fn finish(&mut self, wait: Duration) -> Answers;
}

/// Opens the sink the flags ask for; `None` for `--publish none`.
pub fn open_sink(args: &Args) -> Result<Option<Box<dyn Sink>>, String> {
    match args.publish {
        PublishMode::None => Ok(None),
        PublishMode::Redis => Ok(Some(Box::new(RedisSink::open(
            &args.redis_url,
            &args.prefix,
        )?))),
        PublishMode::Http => Ok(Some(Box::new(HttpSink::open(&args.http, &args.headers)?))),
    }
}

/// What to publish and when.
#[derive(Clone, Debug)]
pub struct Schedule {
    /// Publishes per second.
    pub rate: f64,
    /// Publishes before the measured window.
    pub warmup_count: u64,
    /// Publishes in the measured window.
    pub measured_count: u64,
    /// Publish `n` goes to `bench:<n % channels>`.
    pub channels: usize,
    /// Target size of each JSON document; 0 = no padding.
    pub payload: usize,
}

/// What the publisher tells `run` while it works.
#[derive(Debug)]
pub enum Event {
    /// The first measured publish is about to be sent.
    Measuring,
    /// Every publish has been sent; answers may still be on their way.
    Sent(PublishTally),
    /// The publish path does not work at all; the message says why.
    GaveUp(String),
}

/// The publisher's own timing.
#[derive(Clone, Debug, Default)]
pub struct PublishTally {
    /// Publishes sent, warmup included.
    pub published: u64,
    /// Publishes sent more than 1 ms after their due time.
    pub late: u64,
    /// The worst delay behind schedule.
    pub max_lag: Duration,
    /// From the first measured publish to the last one sent.
    pub measured_elapsed: Duration,
}

/// Starts the publisher thread; it waits up to `answer_wait` for the last answers before returning them.
pub fn spawn(
    mut sink: Box<dyn Sink>,
    schedule: Schedule,
    answer_wait: Duration,
    events: Sender<Event>,
) -> io::Result<JoinHandle<Answers>> {
    std::thread::Builder::new()
        .name("publisher".into())
        .spawn(move || {
            let last = publish_all(sink.as_mut(), &schedule, &events);
            let gave_up = matches!(last, Event::GaveUp(_));
            // A closed channel only means `run` stopped listening; the answers are still returned.
            let _ = events.send(last);
            if gave_up {
                sink.answers()
            } else {
                sink.finish(answer_wait)
            }
        })
}

fn publish_all(sink: &mut dyn Sink, schedule: &Schedule, events: &Sender<Event>) -> Event {
    let channels: Vec<String> = (0..schedule.channels)
        .map(|channel| format!("bench:{channel}"))
        .collect();
    let total = schedule.warmup_count + schedule.measured_count;
    let mut tally = PublishTally::default();
    let mut data = String::with_capacity(schedule.payload + 64);
    let mut measuring_since = None;
    let start = Instant::now();
    for n in 0..total {
        let due = start + Duration::from_secs_f64(n as f64 / schedule.rate);
        let now = Instant::now();
        if now < due {
            std::thread::sleep(due - now);
        }
        let lag = Instant::now().saturating_duration_since(due);
        tally.max_lag = tally.max_lag.max(lag);
        if lag > LATE {
            tally.late += 1;
        }
        if n == schedule.warmup_count {
            let _ = events.send(Event::Measuring);
            measuring_since = Some(Instant::now());
        }
        payload(&mut data, unix_nanos(), n, schedule.payload);
        sink.send(&channels[(n % schedule.channels as u64) as usize], &data);
        tally.published += 1;
        if tally.published % GIVE_UP_AFTER == 0 {
            let answers = sink.answers();
            if answers.succeeded == 0 && answers.failed >= GIVE_UP_AFTER {
                let error = answers.first_error.unwrap_or_default();
                return Event::GaveUp(format!(
                    "{} publishes failed, none succeeded: {error}",
                    answers.failed
                ));
            }
        }
    }
    tally.measured_elapsed = measuring_since.map_or(Duration::ZERO, |since| since.elapsed());
    Event::Sent(tally)
}

/// Writes `{"t":<unix ns>,"n":<number>,"pad":"xx.."}`, padded to about `size` bytes (no pad when 0).
fn payload(out: &mut String, t: u64, n: u64, size: usize) {
    out.clear();
    // Writing into a String cannot fail.
    write!(out, r#"{{"t":{t},"n":{n}"#).expect("writing to a String");
    const PAD_FRAME: usize = r#","pad":""}"#.len();
    if size > out.len() + PAD_FRAME {
        let pad = size - out.len() - PAD_FRAME;
        out.push_str(r#","pad":""#);
        out.extend(std::iter::repeat_n('x', pad));
        out.push('"');
    }
    out.push('}');
}

/// `PUBLISH <prefix>ch:<channel> <data>` over one synchronous connection. Redis answers in microseconds
/// whatever the hub does (the hub reads its pub/sub link on its own), so request-reply keeps the schedule.
struct RedisSink {
    client: redis::Client,
    /// Open connection; dropped on error and reopened by the next publish.
    conn: Option<redis::Connection>,
    /// The hub's key prefix followed by `ch:`.
    channel_prefix: String,
    answers: Answers,
}

impl RedisSink {
    fn open(url: &str, prefix: &str) -> Result<RedisSink, String> {
        let client =
            redis::Client::open(url).map_err(|error| format!("--redis-url {url}: {error}"))?;
        let conn = client
            .get_connection()
            .map_err(|error| format!("connecting to Redis at {url}: {error}"))?;
        Ok(RedisSink {
            client,
            conn: Some(conn),
            channel_prefix: format!("{prefix}ch:"),
            answers: Answers::default(),
        })
    }
}

impl Sink for RedisSink {
    fn send(&mut self, channel: &str, data: &str) {
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => match self.client.get_connection() {
                Ok(conn) => self.conn.insert(conn),
                Err(error) => return self.answers.fail(1, || format!("Redis: {error}")),
            },
        };
        let published = redis::cmd("PUBLISH")
            .arg(format!("{}{channel}", self.channel_prefix))
            .arg(data)
            .query::<u64>(conn);
        match published {
            Ok(receivers) => {
                self.answers.succeeded += 1;
                if receivers == 0 {
                    self.answers.no_receivers += 1;
                }
            }
            Err(error) => {
                self.conn = None;
                self.answers.fail(1, || format!("Redis PUBLISH: {error}"));
            }
        }
    }

    fn answers(&self) -> Answers {
        self.answers.clone()
    }

    fn finish(&mut self, _wait: Duration) -> Answers {
        self.answers.clone()
    }
}

/// `POST /api/publish` pipelined on one HTTP/1.1 keep-alive connection, written by hand: this thread writes
/// requests on schedule, a reader thread counts the responses in order.
struct HttpSink {
    addr: SocketAddr,
    /// `Host` header value.
    host: String,
    /// `<base path>/api/publish`.
    path: String,
    /// Extra header lines, each ending in CRLF.
    headers: String,
    /// Requests written, over all connections.
    sent: u64,
    /// The open connection; replaced when it breaks.
    link: Option<Link>,
    /// Counted by the reader threads.
    answers: Arc<Mutex<Answers>>,
}

/// One pipelined connection.
struct Link {
    writer: TcpStream,
    /// Requests written on this connection.
    written: u64,
    /// Responses read on this connection.
    answered: Arc<AtomicU64>,
    reader: JoinHandle<()>,
}

impl HttpSink {
    fn open(base: &str, headers: &[String]) -> Result<HttpSink, String> {
        let rest = base
            .strip_prefix("http://")
            .ok_or_else(|| format!("--http {base}: expected http://"))?;
        let (host, base_path) = rest.split_once('/').unwrap_or((rest, ""));
        let with_port = if host.contains(':') {
            host.to_string()
        } else {
            format!("{host}:80")
        };
        let addr = with_port
            .to_socket_addrs()
            .map_err(|error| format!("--http {base}: {error}"))?
            .next()
            .ok_or_else(|| format!("--http {base}: no address"))?;
        let base_path = base_path.trim_end_matches('/');
        let mut sink = HttpSink {
            addr,
            host: host.to_string(),
            path: if base_path.is_empty() {
                "/api/publish".into()
            } else {
                format!("/{base_path}/api/publish")
            },
            headers: headers
                .iter()
                .map(|header| format!("{header}\r\n"))
                .collect(),
            sent: 0,
            link: None,
            answers: Arc::new(Mutex::new(Answers::default())),
        };
        sink.connect()
            .map_err(|error| format!("connecting to {addr} for HTTP publishes: {error}"))?;
        Ok(sink)
    }

    fn connect(&mut self) -> io::Result<&mut Link> {
        let writer = TcpStream::connect_timeout(&self.addr, HTTP_CONNECT_TIMEOUT)?;
        writer.set_nodelay(true)?;
        let reading = writer.try_clone()?;
        let answered = Arc::new(AtomicU64::new(0));
        let (counter, answers, path) = (answered.clone(), self.answers.clone(), self.path.clone());
        let reader = std::thread::Builder::new()
            .name("publish-answers".into())
            .spawn(move || read_answers(reading, &path, &counter, &answers))?;
        Ok(self.link.insert(Link {
            writer,
            written: 0,
            answered,
            reader,
        }))
    }

    /// Closes the current connection; its requests that got no response count as failed.
    fn drop_link(&mut self, why: &str) {
        let Some(link) = self.link.take() else { return };
        let _ = link.writer.shutdown(Shutdown::Both);
        // The reader ends on the shutdown; a panic there only loses its count, which is booked below.
        let _ = link.reader.join();
        let unanswered = link
            .written
            .saturating_sub(link.answered.load(Ordering::Acquire));
        lock(&self.answers).fail(unanswered, || {
            format!("POST {}: {unanswered} requests {why}", self.path)
        });
    }

    fn answered(&self) -> u64 {
        let answers = lock(&self.answers);
        answers.succeeded + answers.failed
    }
}

impl Sink for HttpSink {
    fn send(&mut self, channel: &str, data: &str) {
        let body = format!(r#"{{"channel":"{channel}","data":{data}}}"#);
        let request = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n{body}",
            self.path,
            self.host,
            body.len(),
            self.headers
        );
        self.sent += 1;
        // A connection the server closed (reader ended) or that breaks on write is replaced once.
        for attempt in 0..2 {
            if self
                .link
                .as_ref()
                .is_some_and(|link| link.reader.is_finished())
            {
                self.drop_link("lost when the server closed the connection");
            }
            let link = match self.link.as_mut() {
                Some(link) => link,
                None => match self.connect() {
                    Ok(link) => link,
                    Err(error) => {
                        let addr = self.addr;
                        return lock(&self.answers)
                            .fail(1, || format!("HTTP connect to {addr}: {error}"));
                    }
                },
            };
            match link.writer.write_all(request.as_bytes()) {
                Ok(()) => {
                    link.written += 1;
                    return;
                }
                Err(error) => {
                    self.drop_link("lost with a broken connection");
                    if attempt == 1 {
                        return lock(&self.answers)
                            .fail(1, || format!("POST {}: {error}", self.path));
                    }
                }
            }
        }
    }

    fn answers(&self) -> Answers {
        lock(&self.answers).clone()
    }

    fn finish(&mut self, wait: Duration) -> Answers {
        let deadline = Instant::now() + wait;
        while self.answered() < self.sent && Instant::now() < deadline {
            std::thread::sleep(ANSWER_POLL);
        }
        self.drop_link(&format!(
            "had no response within {:.1} s of the last publish",
            wait.as_secs_f64()
        ));
        self.answers()
    }
}

/// The reader thread: counts responses in order until the connection ends.
fn read_answers(stream: TcpStream, path: &str, answered: &AtomicU64, answers: &Mutex<Answers>) {
    let mut reader = BufReader::new(stream);
    while let Ok((status, body, closes)) = read_response(&mut reader) {
        {
            let mut answers = lock(answers);
            if (200..300).contains(&status) {
                answers.succeeded += 1;
            } else {
                answers.fail(1, || {
                    format!("POST {path} answered {status}: {}", body.trim())
                });
            }
        }
        answered.fetch_add(1, Ordering::Release);
        if closes {
            break;
        }
    }
}

/// One HTTP/1.1 response: status, body, and whether the server closes the connection after it.
fn read_response(conn: &mut impl BufRead) -> io::Result<(u16, String, bool)> {
    let mut line = String::new();
    if conn.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad status line {line:?}"),
            )
        })?;
    let (mut length, mut chunked, mut closes) = (None, false, false);
    loop {
        line.clear();
        if conn.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed in the headers",
            ));
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            continue;
        };
        let (name, value) = (
            name.trim().to_ascii_lowercase(),
            value.trim().to_ascii_lowercase(),
        );
        match name.as_str() {
            "content-length" => length = value.parse::<usize>().ok(),
            "transfer-encoding" => chunked = value.contains("chunked"),
            "connection" => closes = value.contains("close"),
            _ => {}
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            conn.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or_default(), 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
            let mut chunk = vec![0; size + 2];
            conn.read_exact(&mut chunk)?;
            body.extend_from_slice(&chunk[..size]);
            if size == 0 {
                break;
            }
        }
    } else if let Some(length) = length {
        body.resize(length, 0);
        conn.read_exact(&mut body)?;
    } else {
        conn.read_to_end(&mut body)?;
        closes = true;
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned(), closes))
}

/// Locks the shared answers; a poisoned lock (a reader panicked) still holds usable counts.
fn lock(answers: &Mutex<Answers>) -> std::sync::MutexGuard<'_, Answers> {
    answers
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn payload_is_padded_to_about_the_asked_size() {
        let mut out = String::new();
        payload(&mut out, 1_700_000_000_000_000_000, 7, 0);
        assert_eq!(out, r#"{"t":1700000000000000000,"n":7}"#);
        payload(&mut out, 1_700_000_000_000_000_000, 7, 256);
        assert_eq!(out.len(), 256);
        let value: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
        assert_eq!(value["n"], 7);
    }

    #[test]
    fn pipelined_answers_are_counted_in_order() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("bound address");
        let server = std::thread::spawn(move || {
            let (socket, _) = listener.accept().expect("accept");
            let mut requests = BufReader::new(socket.try_clone().expect("clone"));
            let mut socket = socket;
            for response in [
                "HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"ok\":true}".as_bytes(),
                b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nbad\r\n0\r\n\r\n",
            ] {
                let length = skip_headers(&mut requests);
                let mut body = vec![0; length];
                requests.read_exact(&mut body).expect("read body");
                socket.write_all(response).expect("write response");
            }
        });
        let mut sink = HttpSink::open(&format!("http://{addr}"), &[]).expect("open");
        sink.send("bench:0", "{}");
        sink.send("bench:0", "{}");
        let answers = sink.finish(Duration::from_secs(5));
        server.join().expect("server thread");
        assert_eq!((answers.succeeded, answers.failed), (1, 1));
        let error = answers.first_error.expect("the 400 is kept");
        assert!(error.contains("400") && error.contains("bad"), "{error}");
    }

    #[test]
    fn unanswered_requests_count_as_failed() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("bound address");
        let server = std::thread::spawn(move || listener.accept().expect("accept"));
        let mut sink = HttpSink::open(&format!("http://{addr}"), &[]).expect("open");
        sink.send("bench:0", "{}");
        let answers = sink.finish(Duration::from_millis(50));
        drop(server.join());
        assert_eq!((answers.succeeded, answers.failed), (0, 1));
    }

    /// Reads one request's headers; returns its Content-Length.
    fn skip_headers(requests: &mut impl BufRead) -> usize {
        let mut length = 0;
        loop {
            let mut line = String::new();
            requests.read_line(&mut line).expect("read request");
            if line.trim().is_empty() {
                return length;
            }
            if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = value.trim().parse().expect("a length");
            }
        }
    }
}
