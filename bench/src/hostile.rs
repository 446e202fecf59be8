//! `--hostile N`: clients that misbehave beside the measured subscribers, so a run shows what an attacker or a
//! broken client costs the well-behaved ones. They speak raw WebSocket over TCP (no client library would send
//! what they send) from their own loopback address, 127.0.0.200, and each repeats its behaviour until the run
//! ends, reconnecting whenever the hub closes it:
//!
//! - **stuck reader**: a tiny receive buffer, subscribes to every measured channel (up to 100) and never
//!   reads; after a while it looks whether the hub let it go;
//! - **giant frame**: a text frame header announcing 4 GiB, then zeros as fast as the hub takes them;
//! - **ping flood**: bursts of `ping` requests far over any request rate, reading the answers;
//! - **churn**: subscribe and unsubscribe in one write, over and over, sometimes dropping the socket unclosed;
//! - **malformed**: invalid JSON, binary, unmasked, reserved-opcode and stray-continuation frames.
//!
//! The figures are counts of what each kind did and saw; none of them is asserted.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The source address of every hostile client: apart from the measured ones (127.0.0.1..K), so a per-address
/// connection limit on the hub treats them as one stranger.
const SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 200));
/// How long a stuck reader stays stuck before it looks whether the hub released it.
const STUCK_FOR: Duration = Duration::from_secs(30);
/// Channels a stuck reader subscribes to, so that it owes the hub a lot quickly.
const STUCK_CHANNELS: usize = 100;
/// Pause between a hostile client's attempts, so the load generator's own core is not what gives out.
const PAUSE: Duration = Duration::from_millis(100);
/// Ping requests per flood burst.
const FLOOD_BURST: usize = 200;
/// Mask key of every frame a hostile client sends (the hub must unmask whatever it is).
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// The behaviours, assigned round robin by client index.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Stuck,
    Giant,
    Flood,
    Churn,
    Malformed,
}

const KINDS: [Kind; 5] = [
    Kind::Stuck,
    Kind::Giant,
    Kind::Flood,
    Kind::Churn,
    Kind::Malformed,
];

/// What one kind of hostile client did over the run.
#[derive(Debug, Default, Serialize)]
pub struct KindFigures {
    /// Clients of this kind.
    pub clients: u64,
    /// WebSocket handshakes completed.
    pub connects: u64,
    /// Handshakes the hub refused or that failed.
    pub refused: u64,
    /// Times the hub ended the connection (a close frame, EOF or a reset).
    pub closed_by_hub: u64,
    /// Close frames received, by close code.
    pub close_codes: std::collections::BTreeMap<u16, u64>,
}

/// Every kind's figures.
#[derive(Debug, Default, Serialize)]
pub struct HostileFigures {
    pub stuck_reader: KindFigures,
    pub giant_frame: KindFigures,
    pub ping_flood: KindFigures,
    pub churn: KindFigures,
    pub malformed: KindFigures,
}

/// Counters the hostile tasks bump, per kind.
#[derive(Default)]
struct Counters {
    connects: AtomicU64,
    refused: AtomicU64,
    closed_by_hub: AtomicU64,
    codes: std::sync::Mutex<std::collections::BTreeMap<u16, u64>>,
}

impl Counters {
    fn figures(&self, clients: u64) -> KindFigures {
        KindFigures {
            clients,
            connects: self.connects.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            closed_by_hub: self.closed_by_hub.load(Ordering::Relaxed),
            close_codes: self.codes.lock().map(|c| c.clone()).unwrap_or_default(),
        }
    }

    fn close_code(&self, code: u16) {
        if let Ok(mut codes) = self.codes.lock() {
            *codes.entry(code).or_default() += 1;
        }
    }
}

/// The running hostile clients; [`Hostile::stop`] ends them and returns their figures.
pub struct Hostile {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
    counters: Arc<[Counters; 5]>,
    clients: usize,
}

impl Hostile {
    /// Starts `clients` hostile clients against `target` (`path` is the WebSocket path) on a thread of their
    /// own; busy channels are `bench:0..channels`.
    pub fn start(
        target: SocketAddr,
        path: String,
        clients: usize,
        channels: usize,
    ) -> io::Result<Hostile> {
        let stop = Arc::new(AtomicBool::new(false));
        let counters: Arc<[Counters; 5]> = Arc::new(Default::default());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stop_flag, shared) = (stop.clone(), counters.clone());
        let thread = std::thread::Builder::new()
            .name("hostile".into())
            .spawn(move || {
                let local = tokio::task::LocalSet::new();
                local.block_on(&runtime, async move {
                    let mut tasks = Vec::new();
                    for index in 0..clients {
                        let client = Client {
                            target,
                            path: path.clone(),
                            channel: format!("bench:{}", index % channels.max(1)),
                            channels: channels.clamp(1, STUCK_CHANNELS),
                            index,
                            stop: stop_flag.clone(),
                            counters: shared.clone(),
                        };
                        tasks.push(tokio::task::spawn_local(client.run()));
                    }
                    for task in tasks {
                        let _ = task.await;
                    }
                });
            })?;
        Ok(Hostile {
            stop,
            thread,
            counters,
            clients,
        })
    }

    /// Stops every hostile client and returns what they did.
    pub fn stop(self) -> HostileFigures {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        let of = |k: usize| (self.clients / 5 + usize::from(k < self.clients % 5)) as u64;
        HostileFigures {
            stuck_reader: self.counters[0].figures(of(0)),
            giant_frame: self.counters[1].figures(of(1)),
            ping_flood: self.counters[2].figures(of(2)),
            churn: self.counters[3].figures(of(3)),
            malformed: self.counters[4].figures(of(4)),
        }
    }
}

struct Client {
    target: SocketAddr,
    path: String,
    channel: String,
    /// Measured channels a stuck reader subscribes to.
    channels: usize,
    index: usize,
    stop: Arc<AtomicBool>,
    counters: Arc<[Counters; 5]>,
}

impl Client {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    async fn run(self) {
        let slot = self.index % KINDS.len();
        let kind = KINDS[slot];
        let counters = &self.counters[slot];
        let mut round = 0u64;
        while !self.stopped() {
            round += 1;
            match self.connect(matches!(kind, Kind::Stuck)).await {
                Ok(stream) => {
                    counters.connects.fetch_add(1, Ordering::Relaxed);
                    let ended = match kind {
                        Kind::Stuck => self.stuck(stream).await,
                        Kind::Giant => self.giant(stream).await,
                        Kind::Flood => self.flood(stream).await,
                        Kind::Churn => self.churn(stream, round).await,
                        Kind::Malformed => self.malformed(stream, round).await,
                    };
                    if let Some(code) = ended {
                        counters.closed_by_hub.fetch_add(1, Ordering::Relaxed);
                        if code != 0 {
                            counters.close_code(code);
                        }
                    }
                }
                Err(_) => {
                    counters.refused.fetch_add(1, Ordering::Relaxed);
                }
            }
            tokio::time::sleep(PAUSE).await;
        }
    }

    /// Opens a raw WebSocket: the handshake is written by hand and its answer read up to the blank line.
    async fn connect(&self, tiny_receive_buffer: bool) -> io::Result<TcpStream> {
        let socket = if self.target.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if tiny_receive_buffer {
            socket.set_recv_buffer_size(4096)?;
        }
        if self.target.ip().is_loopback() && self.target.is_ipv4() {
            socket.bind(SocketAddr::new(SOURCE, 0))?;
        }
        let mut stream = socket.connect(self.target).await?;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            self.path, self.target
        );
        stream.write_all(request.as_bytes()).await?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).await? == 0 || head.len() > 4096 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            head.push(byte[0]);
        }
        if !head.starts_with(b"HTTP/1.1 101") {
            return Err(io::Error::other("handshake refused"));
        }
        Ok(stream)
    }

    /// Subscribes, never reads for [`STUCK_FOR`], then reads to see whether the hub has let go of it.
    async fn stuck(&self, mut stream: TcpStream) -> Option<u16> {
        let mut subscribes = Vec::new();
        for channel in 0..self.channels {
            let subscribe = format!(r#"{{"op":"subscribe","channel":"bench:{channel}"}}"#);
            subscribes.extend_from_slice(&masked(0x1, subscribe.as_bytes()));
        }
        stream.write_all(&subscribes).await.ok()?;
        let until = Instant::now() + STUCK_FOR;
        while Instant::now() < until && !self.stopped() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        read_to_end(&mut stream, Duration::from_secs(2)).await
    }

    /// A text frame header announcing 4 GiB, then zeros until the hub closes the connection.
    async fn giant(&self, mut stream: TcpStream) -> Option<u16> {
        let mut header = vec![0x81, 0x80 | 127];
        header.extend_from_slice(&(4u64 << 30).to_be_bytes());
        header.extend_from_slice(&MASK);
        stream.write_all(&header).await.ok()?;
        let zeros = vec![0u8; 64 * 1024];
        let (mut read, mut write) = stream.into_split();
        let writer = async {
            while !self.stopped() {
                if write.write_all(&zeros).await.is_err() {
                    break;
                }
            }
        };
        let reader = async {
            let mut buf = vec![0u8; 4096];
            let mut seen = Vec::new();
            loop {
                match read.read(&mut buf).await {
                    Ok(0) | Err(_) => return Some(close_code(&seen)),
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
        };
        tokio::select! {
            code = reader => code,
            () = writer => None,
        }
    }

    /// Bursts of pings, far over any request budget, reading whatever comes back.
    async fn flood(&self, stream: TcpStream) -> Option<u16> {
        let mut burst = Vec::new();
        for _ in 0..FLOOD_BURST {
            burst.extend_from_slice(&masked(0x1, br#"{"op":"ping"}"#));
        }
        let (mut read, mut write) = stream.into_split();
        let writer = async {
            while !self.stopped() {
                if write.write_all(&burst).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let reader = drain_until_closed(&mut read);
        tokio::select! {
            code = reader => code,
            () = writer => None,
        }
    }

    /// Subscribe and unsubscribe in one write, many times; every fourth round the socket is dropped unclosed.
    async fn churn(&self, stream: TcpStream, round: u64) -> Option<u16> {
        let (mut read, mut write) = stream.into_split();
        let writer = async {
            for i in 0..50u64 {
                if self.stopped() {
                    return;
                }
                let churn = format!("churn:{}-{}", self.index, (round * 50 + i) % 1000);
                let mut batch = Vec::new();
                for channel in [churn.as_str(), self.channel.as_str()] {
                    let sub = format!(r#"{{"op":"subscribe","channel":"{channel}"}}"#);
                    let unsub = format!(r#"{{"op":"unsubscribe","channel":"{channel}"}}"#);
                    batch.extend_from_slice(&masked(0x1, sub.as_bytes()));
                    batch.extend_from_slice(&masked(0x1, unsub.as_bytes()));
                }
                if write.write_all(&batch).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if !round.is_multiple_of(4) {
                let _ = write.write_all(&masked(0x8, &1000u16.to_be_bytes())).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        let reader = drain_until_closed(&mut read);
        tokio::select! {
            code = reader => code,
            () = writer => None,
        }
    }

    /// One malformed thing per connection, then whatever the hub answers until it closes.
    async fn malformed(&self, mut stream: TcpStream, round: u64) -> Option<u16> {
        let garbage: Vec<u8> = match round % 6 {
            0 => masked(0x1, b"{\"op\":\"subscribe\",\"channel\":"),
            1 => masked(0x2, &[0, 1, 2, 3]),
            2 => vec![0x81, 0x05, b'h', b'e', b'l', b'l', b'o'], // unmasked
            3 => masked(0x3, b"reserved"),
            4 => masked(0x0, b"stray continuation"),
            _ => masked(0x1, &[0xff, 0xfe, 0xfd]), // not UTF-8
        };
        stream.write_all(&garbage).await.ok()?;
        read_to_end(&mut stream, Duration::from_secs(5)).await
    }
}

/// Reads until the hub ends the connection; the close code it sent, or 0 when it sent none.
async fn drain_until_closed(read: &mut tokio::net::tcp::OwnedReadHalf) -> Option<u16> {
    let mut buf = vec![0u8; 16 * 1024];
    // Only the tail matters: a close frame is the last thing the hub sends.
    let mut tail: Vec<u8> = Vec::new();
    loop {
        match read.read(&mut buf).await {
            Ok(0) | Err(_) => return Some(close_code(&tail)),
            Ok(n) => {
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 256 {
                    tail.drain(..tail.len() - 256);
                }
            }
        }
    }
}

/// Reads for up to `limit`; `Some(code)` when the hub ended the connection in that time.
async fn read_to_end(stream: &mut TcpStream, limit: Duration) -> Option<u16> {
    let (mut read, _write) = stream.split();
    let mut buf = vec![0u8; 16 * 1024];
    let mut tail: Vec<u8> = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, read.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(close_code(&tail)),
            Ok(Ok(n)) => {
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 256 {
                    tail.drain(..tail.len() - 256);
                }
            }
        }
    }
}

/// The code of the last close frame (`0x88`, length, code) in `bytes`, or 0.
fn close_code(bytes: &[u8]) -> u16 {
    (0..bytes.len().saturating_sub(3))
        .rev()
        .find(|&i| {
            bytes[i] == 0x88
                && (2..=125).contains(&bytes[i + 1])
                && i + 2 + bytes[i + 1] as usize == bytes.len()
        })
        .map(|i| u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]))
        .unwrap_or(0)
}

/// A single masked client frame with FIN set.
fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= u16::MAX as usize => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&MASK);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_close_frame_gives_the_code() {
        let mut bytes = b"\x81\x02hi".to_vec();
        bytes.extend_from_slice(&[0x88, 0x02, 0x03, 0xf1]);
        assert_eq!(close_code(&bytes), 1009);
        assert_eq!(close_code(b"\x81\x02hi"), 0);
    }

    #[test]
    fn frames_are_masked() {
        let frame = masked(0x1, b"ab");
        assert_eq!(frame[..2], [0x81, 0x82]);
        assert_eq!(frame[6] ^ MASK[0], b'a');
        assert_eq!(frame[7] ^ MASK[1], b'b');
    }
}
