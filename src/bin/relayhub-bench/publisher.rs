//! The paced publisher: a dedicated std thread that publishes at a fixed total rate on an absolute schedule
//! (publish `n` is due at `start + n / rate`, so no drift accumulates) through Redis or the hub's HTTP API.
//! `run` starts it with [`spawn`] and learns from [`Event`]s when the measured window opens and closes.

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::args::{Args, PublishMode};
use crate::connections::unix_nanos;

/// A publish sent later than this behind its due time counts as late.
const LATE: Duration = Duration::from_millis(1);
/// When this many publishes in a row fail from the start, the publisher gives up: the path is broken.
const GIVE_UP_AFTER: u64 = 10;
/// Connect and read limit of the HTTP publisher.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a publish goes.
pub trait Sink: Send {
    /// Publishes `data` (a JSON document) on `channel`; `Ok(Some(k))` when the path reports `k` receivers.
    fn publish(&mut self, channel: &str, data: &str) -> Result<Option<u64>, String>;
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

/// What the publisher tells `run`.
#[derive(Debug)]
pub enum Event {
    /// The first measured publish is about to be sent.
    Measuring,
    /// All publishes are done.
    Finished(PublishTally),
    /// The publish path does not work at all; the message says why.
    GaveUp(String),
}

/// The publisher's own figures.
#[derive(Clone, Debug, Default)]
pub struct PublishTally {
    /// Publishes attempted, warmup included.
    pub published: u64,
    /// Publishes that failed.
    pub errors: u64,
    /// The first failure.
    pub first_error: Option<String>,
    /// Publishes sent more than 1 ms after their due time.
    pub late: u64,
    /// The worst delay behind schedule.
    pub max_lag: Duration,
    /// Publishes the path reported as reaching no subscriber (Redis `PUBLISH` returning 0).
    pub no_receivers: u64,
    /// From the first measured publish to the end of the last one.
    pub measured_elapsed: Duration,
}

/// Starts the publisher thread.
pub fn spawn(
    mut sink: Box<dyn Sink>,
    schedule: Schedule,
    events: Sender<Event>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("publisher".into())
        .spawn(move || {
            // The receiver side lives as long as the run waits for it; a closed channel just means nobody listens.
            let outcome = publish_all(sink.as_mut(), &schedule, &events);
            let _ = events.send(outcome);
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
        tally.published += 1;
        match sink.publish(&channels[(n % schedule.channels as u64) as usize], &data) {
            Ok(Some(0)) => tally.no_receivers += 1,
            Ok(_) => {}
            Err(error) => {
                tally.errors += 1;
                tally.first_error.get_or_insert(error);
                if tally.errors == tally.published && tally.errors >= GIVE_UP_AFTER {
                    let error = tally.first_error.take().unwrap_or_default();
                    return Event::GaveUp(format!(
                        "the first {GIVE_UP_AFTER} publishes all failed: {error}"
                    ));
                }
            }
        }
    }
    tally.measured_elapsed = measuring_since.map_or(Duration::ZERO, |since| since.elapsed());
    Event::Finished(tally)
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

/// `PUBLISH <prefix>ch:<channel> <data>` over one synchronous connection (request, reply, next).
struct RedisSink {
    client: redis::Client,
    /// Open connection; dropped on error and reopened by the next publish.
    conn: Option<redis::Connection>,
    /// The hub's key prefix followed by `ch:`.
    channel_prefix: String,
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
        })
    }
}

impl Sink for RedisSink {
    fn publish(&mut self, channel: &str, data: &str) -> Result<Option<u64>, String> {
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => self.conn.insert(
                self.client
                    .get_connection()
                    .map_err(|error| format!("Redis: {error}"))?,
            ),
        };
        let receivers = redis::cmd("PUBLISH")
            .arg(format!("{}{channel}", self.channel_prefix))
            .arg(data)
            .query::<u64>(conn)
            .map_err(|error| {
                self.conn = None;
                format!("Redis PUBLISH: {error}")
            })?;
        Ok(Some(receivers))
    }
}

/// `POST /api/publish` over one HTTP/1.1 keep-alive connection, written by hand: request, response, next.
struct HttpSink {
    addr: SocketAddr,
    /// `Host` header value.
    host: String,
    /// `<base path>/api/publish`.
    path: String,
    /// Extra header lines, each ending in CRLF.
    headers: String,
    /// Open connection; `None` after an error or `Connection: close`.
    conn: Option<BufReader<TcpStream>>,
}

impl HttpSink {
    fn open(base: &str, headers: &[String]) -> Result<HttpSink, String> {
        let rest = base
            .strip_prefix("http://")
            .ok_or_else(|| format!("--http {base}: expected http://"))?;
        let (host, base_path) = rest
            .split_once('/')
            .map_or((rest, ""), |(host, path)| (host, path));
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
            conn: None,
        };
        sink.connect()
            .map_err(|error| format!("connecting to {addr} for HTTP publishes: {error}"))?;
        Ok(sink)
    }

    fn connect(&mut self) -> io::Result<&mut BufReader<TcpStream>> {
        let stream = TcpStream::connect_timeout(&self.addr, HTTP_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
        Ok(self.conn.insert(BufReader::new(stream)))
    }

    /// One request and its response on the open connection: status, body, and whether the server closes.
    fn exchange(
        conn: &mut BufReader<TcpStream>,
        request: &[u8],
    ) -> io::Result<(u16, String, bool)> {
        conn.get_mut().write_all(request)?;
        let mut line = String::new();
        if conn.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the response",
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
            conn.read_line(&mut line)?;
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
                let size =
                    usize::from_str_radix(line.trim().split(';').next().unwrap_or_default(), 16)
                        .map_err(|_| {
                            io::Error::new(io::ErrorKind::InvalidData, "bad chunk size")
                        })?;
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
}

impl Sink for HttpSink {
    fn publish(&mut self, channel: &str, data: &str) -> Result<Option<u64>, String> {
        let body = format!(r#"{{"channel":"{channel}","data":{data}}}"#);
        let request = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n{body}",
            self.path,
            self.host,
            body.len(),
            self.headers
        );
        // A kept-alive connection may have been closed by the server meanwhile: one fresh retry.
        for attempt in 0..2 {
            let reused = self.conn.is_some();
            let addr = self.addr;
            let conn = match self.conn.as_mut() {
                Some(conn) => conn,
                None => self
                    .connect()
                    .map_err(|error| format!("HTTP connect to {addr}: {error}"))?,
            };
            match Self::exchange(conn, request.as_bytes()) {
                Ok((status, response, closes)) => {
                    if closes {
                        self.conn = None;
                    }
                    if !(200..300).contains(&status) {
                        return Err(format!(
                            "POST {} answered {status}: {}",
                            self.path,
                            response.trim()
                        ));
                    }
                    return Ok(None);
                }
                Err(error) => {
                    self.conn = None;
                    if !reused || attempt == 1 {
                        return Err(format!("POST {}: {error}", self.path));
                    }
                }
            }
        }
        unreachable!("the second attempt always returns")
    }
}

#[cfg(test)]
mod tests {
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
    fn http_exchange_reads_length_and_chunked_bodies() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("bound address");
        let server = std::thread::spawn(move || {
            let (mut socket, _) = listener.accept().expect("accept");
            let mut request = [0; 1024];
            for response in [
                "HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"ok\":true}".as_bytes(),
                b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nbad\r\n0\r\n\r\n",
            ] {
                let _ = socket.read(&mut request).expect("read request");
                socket.write_all(response).expect("write response");
            }
        });
        let mut sink = HttpSink::open(&format!("http://{addr}"), &[]).expect("open");
        assert_eq!(sink.publish("bench:0", "{}"), Ok(None));
        let refused = sink.publish("bench:0", "{}").expect_err("400 is an error");
        assert!(
            refused.contains("400") && refused.contains("bad"),
            "{refused}"
        );
        server.join().expect("server thread");
    }
}
