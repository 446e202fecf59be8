//! `--calibrate`: what this machine's kernel charges for one small loopback TCP write and one read, the floor
//! under every delivery (a hub writes each frame to each subscriber's socket). No hub is involved: the bench
//! opens socket pairs to itself and times plain `write`/`read` calls with the thread's own CPU clock.
//! `--calibrate-batch N` writes N messages per call, as a hub does whose frames coalesce (`write_delay`), and
//! reports the cost per message: the floor per delivery at that batch size.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};

use serde::Serialize;

/// Socket pairs written in turn, like one message fanned out to this many subscribers.
const PAIRS: usize = 1000;
/// Bytes per message: about one `message` frame of the fan-out scenarios.
const MESSAGE: usize = 120;
/// Messages measured.
const MESSAGES: usize = 200_000;

/// The measured floor.
#[derive(Debug, Serialize)]
pub struct Calibration {
    pub pairs: usize,
    pub message_bytes: usize,
    /// Messages per `write`.
    pub batch: usize,
    pub messages: usize,
    /// CPU microseconds of `write` per message to one socket (includes loopback delivery to the peer), the
    /// cost of one write divided by `batch`.
    pub write_us: f64,
    /// CPU microseconds per `read` returning one message.
    pub read_us: f64,
    /// 1e6 / write_us: deliveries per CPU-second a hub could reach if writing were all it did.
    pub write_bound_per_cpu_second: f64,
}

/// Runs the measurement (about a second of CPU).
pub fn run(batch: usize) -> io::Result<Calibration> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut pairs = Vec::with_capacity(PAIRS);
    for _ in 0..PAIRS {
        let client = TcpStream::connect(addr)?;
        let (server, _) = listener.accept()?;
        server.set_nodelay(true)?;
        client.set_nonblocking(true)?;
        pairs.push((server, client));
    }
    let message = vec![b'x'; MESSAGE * batch];
    let mut buffer = [0; 4096];
    let (mut write_ns, mut read_ns, mut reads, mut written) = (0, 0, 0usize, 0usize);
    while written < MESSAGES {
        let start = thread_cpu_ns()?;
        for (server, _) in &mut pairs {
            server.write_all(&message)?;
        }
        let wrote = thread_cpu_ns()?;
        for (_, client) in &mut pairs {
            loop {
                match client.read(&mut buffer) {
                    Ok(0) => return Err(io::Error::new(ErrorKind::UnexpectedEof, "peer closed")),
                    Ok(_) => reads += 1,
                    Err(error) if error.kind() == ErrorKind::WouldBlock => break,
                    Err(error) => return Err(error),
                }
            }
        }
        let read = thread_cpu_ns()?;
        written += PAIRS * batch;
        write_ns += wrote - start;
        read_ns += read - wrote;
    }
    let write_us = write_ns as f64 / 1e3 / written as f64;
    Ok(Calibration {
        pairs: PAIRS,
        message_bytes: MESSAGE,
        batch,
        messages: written,
        write_us,
        // Each drain also pays one read that finds nothing (WouldBlock); it is charged to the messages.
        read_us: read_ns as f64 / 1e3 / reads.max(1) as f64,
        write_bound_per_cpu_second: 1e6 / write_us,
    })
}

/// This thread's CPU time in nanoseconds (first field of /proc/thread-self/schedstat).
fn thread_cpu_ns() -> io::Result<u64> {
    let schedstat = std::fs::read_to_string("/proc/thread-self/schedstat")?;
    schedstat
        .split_whitespace()
        .next()
        .and_then(|ns| ns.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                ErrorKind::InvalidData,
                "unexpected /proc/thread-self/schedstat",
            )
        })
}
