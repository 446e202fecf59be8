//! The subscriber fleet: N WebSocket connections spread over receiver threads (one current-thread runtime
//! each) and source addresses. Each connection connects, waits for the subscribe phase, subscribes, then
//! records every delivery until told to stop. `run` drives the phases through [`Fleet`] and reads
//! [`Progress`] while the fleet works; [`Tally`] holds the figures once the fleet has stopped.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::LocalSet;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::frames::{self, Frame};

/// Longest latency the histogram holds; longer ones are recorded as this.
const MAX_LATENCY_NS: u64 = 60_000_000_000;
/// How long a connection waits for the hub to answer its close frame at the end.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Read buffer per connection: frames are small and tens of thousands of connections are open.
const READ_BUFFER: usize = 4 * 1024;

/// What every connection needs to know, shared by all threads.
#[derive(Debug)]
pub struct Plan {
    /// The hub's WebSocket URL.
    pub url: String,
    /// The resolved address of the hub.
    pub target: SocketAddr,
    /// Local addresses connections are bound to, round robin; empty = let the kernel choose.
    pub sources: Vec<IpAddr>,
    /// Number of connections.
    pub connections: usize,
    /// Number of channels; connection `i` subscribes to `bench:<i % channels>`.
    pub channels: usize,
    /// Receiver threads.
    pub threads: usize,
    /// Handshakes in flight at once, over all threads.
    pub connect_concurrency: usize,
    /// Publishes numbered below this are warmup: counted apart, no latency recorded.
    pub warmup_count: u64,
    /// Publishes numbered `warmup_count..warmup_count + measured_count` are measured.
    pub measured_count: u64,
}

impl Plan {
    /// `K` loopback sources 127.0.0.1..=127.0.0.K when the hub is on IPv4 loopback, none otherwise.
    pub fn loopback_sources(target: SocketAddr, count: u8) -> Vec<IpAddr> {
        match target.ip() {
            IpAddr::V4(ip) if ip.is_loopback() => (1..=count)
                .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The channel number connection `index` subscribes to.
    pub fn channel_of(&self, index: usize) -> usize {
        index % self.channels
    }

    /// Measured publishes that go to `channel`: publish `n` goes to channel `n % channels`.
    pub fn expected_on(&self, channel: usize) -> u64 {
        let below = |end: u64| {
            let (channel, channels) = (channel as u64, self.channels as u64);
            if end > channel {
                (end - channel - 1) / channels + 1
            } else {
                0
            }
        };
        below(self.warmup_count + self.measured_count) - below(self.warmup_count)
    }

    /// Measured deliveries over all connections if nothing is lost.
    pub fn expected_total(&self) -> u64 {
        (0..self.connections)
            .map(|index| self.expected_on(self.channel_of(index)))
            .sum()
    }

    fn is_measured(&self, n: u64) -> bool {
        (self.warmup_count..self.warmup_count + self.measured_count).contains(&n)
    }
}

/// The phase the fleet is in; only ever moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Connect,
    Subscribe,
    Stop,
}

/// Counters the receiver threads update while `run` watches them.
#[derive(Debug, Default)]
pub struct Progress {
    /// Connections whose WebSocket handshake completed.
    pub connected: AtomicUsize,
    /// Connections that could not connect.
    pub connect_failed: AtomicUsize,
    /// Connections whose subscribe was acknowledged.
    pub subscribed: AtomicUsize,
    /// Connections whose subscribe failed (error frame or closed before the ack).
    pub subscribe_failed: AtomicUsize,
    /// Subscribed connections closed or broken before the end of the run.
    pub dropped: AtomicUsize,
    /// Measured deliveries so far, so the drain can end as soon as everything arrived.
    pub measured_received: AtomicU64,
    /// The first error seen, for the report.
    first_error: Mutex<Option<String>>,
}

impl Progress {
    fn note_error(&self, error: String) {
        // A poisoned lock only means another thread panicked while noting; the value is still usable.
        let mut first = self
            .first_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        first.get_or_insert(error);
    }

    /// The first error any connection met.
    pub fn first_error(&self) -> Option<String> {
        self.first_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// The figures the receivers collected, merged over threads once the fleet stopped.
#[derive(Debug)]
pub struct Tally {
    /// End-to-end latency of measured deliveries, publish to receive, in nanoseconds.
    pub latency_ns: Histogram<u64>,
    /// Measured deliveries received.
    pub received: u64,
    /// Deliveries of warmup publishes.
    pub warmup_received: u64,
    /// Messages that were not bench publishes of this run (numbers out of range, other data).
    pub unexpected: u64,
    /// Deliveries whose number was not above the previous one on the same connection.
    pub out_of_order: u64,
    /// Error frames received after subscribing.
    pub error_frames: u64,
    /// Connections that received fewer measured messages than were published to their channel.
    pub incomplete_connections: u64,
    /// Unix time of the last measured delivery, in nanoseconds.
    pub last_delivery_ns: u64,
    /// How dropped connections ended: close code (`"1001"`), `"eof"` or `"error"`, with counts.
    pub endings: BTreeMap<String, u64>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            // Fixed, valid bounds: 1 ns to a minute at three significant figures.
            latency_ns: Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3)
                .expect("constant histogram bounds are valid"),
            received: 0,
            warmup_received: 0,
            unexpected: 0,
            out_of_order: 0,
            error_frames: 0,
            incomplete_connections: 0,
            last_delivery_ns: 0,
            endings: BTreeMap::new(),
        }
    }

    fn merge(&mut self, other: Tally) {
        // Same bounds on both sides, so adding cannot fail.
        self.latency_ns
            .add(&other.latency_ns)
            .expect("histograms share their bounds");
        self.received += other.received;
        self.warmup_received += other.warmup_received;
        self.unexpected += other.unexpected;
        self.out_of_order += other.out_of_order;
        self.error_frames += other.error_frames;
        self.incomplete_connections += other.incomplete_connections;
        self.last_delivery_ns = self.last_delivery_ns.max(other.last_delivery_ns);
        for (ending, count) in other.endings {
            *self.endings.entry(ending).or_default() += count;
        }
    }
}

/// Handle on the running receiver threads.
pub struct Fleet {
    /// Moves every connection to the next phase.
    phase: watch::Sender<Phase>,
    /// Live counters.
    pub progress: Arc<Progress>,
    /// One per receiver thread; each returns its tally.
    workers: Vec<JoinHandle<Tally>>,
}

impl Fleet {
    /// Starts the receiver threads; every connection starts connecting at once (within the concurrency cap).
    pub fn start(plan: Arc<Plan>) -> std::io::Result<Fleet> {
        let (phase, phase_rx) = watch::channel(Phase::Connect);
        let progress = Arc::new(Progress::default());
        let mut workers = Vec::with_capacity(plan.threads);
        for thread in 0..plan.threads {
            let (plan, progress, phase_rx) = (plan.clone(), progress.clone(), phase_rx.clone());
            let worker = std::thread::Builder::new()
                .name(format!("receiver-{thread}"))
                .spawn(move || receiver_thread(thread, plan, progress, phase_rx))?;
            workers.push(worker);
        }
        Ok(Fleet {
            phase,
            progress,
            workers,
        })
    }

    /// Lets every connected connection send its subscribe.
    pub fn subscribe(&self) {
        self.phase.send_replace(Phase::Subscribe);
    }

    /// Closes every connection, waits for the threads and returns the merged figures.
    pub fn stop(self) -> Tally {
        self.phase.send_replace(Phase::Stop);
        let mut total = Tally::new();
        for worker in self.workers {
            match worker.join() {
                Ok(tally) => total.merge(tally),
                Err(_) => self
                    .progress
                    .note_error("a receiver thread panicked".into()),
            }
        }
        total
    }
}

fn receiver_thread(
    thread: usize,
    plan: Arc<Plan>,
    progress: Arc<Progress>,
    phase: watch::Receiver<Phase>,
) -> Tally {
    // Building a current-thread runtime only fails if the OS refuses its timer or I/O driver.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime can be built");
    let tally = Rc::new(RefCell::new(Tally::new()));
    let gate = Rc::new(Semaphore::new(
        (plan.connect_concurrency / plan.threads).max(1),
    ));
    let local = LocalSet::new();
    local.block_on(&runtime, async {
        let tasks: Vec<_> = (thread..plan.connections)
            .step_by(plan.threads)
            .map(|index| {
                let subscriber = Subscriber {
                    index,
                    plan: plan.clone(),
                    progress: progress.clone(),
                    tally: tally.clone(),
                    received: 0,
                    last_n: None,
                };
                tokio::task::spawn_local(subscriber.run(gate.clone(), phase.clone()))
            })
            .collect();
        for task in tasks {
            if task.await.is_err() {
                progress.note_error("a connection task panicked".into());
            }
        }
    });
    drop(local);
    match Rc::try_unwrap(tally) {
        Ok(tally) => tally.into_inner(),
        // Every task holding a clone has finished and the local set is dropped, so this is the last one.
        Err(_) => unreachable!("all connection tasks have finished"),
    }
}

/// How a subscribed connection's receive loop ended.
enum Ending {
    /// The run told it to stop: the normal end.
    Stopped,
    /// The hub closed it with this close code.
    Closed(Option<u16>),
    /// The TCP stream ended without a close frame.
    Eof,
    /// A read error.
    Failed(String),
}

/// One connection's state.
struct Subscriber {
    /// Global connection number; decides channel, source address and thread.
    index: usize,
    plan: Arc<Plan>,
    progress: Arc<Progress>,
    /// This thread's figures, shared by its connections.
    tally: Rc<RefCell<Tally>>,
    /// Measured deliveries on this connection.
    received: u64,
    /// Number of the previous delivery, to spot reordering and duplicates.
    last_n: Option<u64>,
}

impl Subscriber {
    async fn run(mut self, gate: Rc<Semaphore>, mut phase: watch::Receiver<Phase>) {
        let mut stop_rx = phase.clone();
        let stop = async move {
            // An error means the fleet handle is gone: stop as well.
            let _ = stop_rx.wait_for(|phase| *phase == Phase::Stop).await;
        };
        tokio::pin!(stop);

        let connecting = async {
            // The gate is never closed, so acquiring can only wait, not fail.
            let _permit = gate
                .acquire()
                .await
                .expect("the connect gate is never closed");
            connect(&self.plan, self.index).await
        };
        let mut ws = tokio::select! {
            result = connecting => match result {
                Ok(ws) => ws,
                Err(error) => {
                    self.progress.connect_failed.fetch_add(1, Ordering::Relaxed);
                    self.progress.note_error(format!("connection {}: {error}", self.index));
                    return;
                }
            },
            _ = &mut stop => return,
        };
        self.progress.connected.fetch_add(1, Ordering::Relaxed);

        let go = matches!(
            phase
                .wait_for(|phase| *phase >= Phase::Subscribe)
                .await
                .map(|p| *p),
            Ok(Phase::Subscribe)
        );
        if !go {
            close(ws).await;
            return;
        }
        if let Err(error) = self.subscribe(&mut ws, &mut stop).await {
            if let Some(error) = error {
                self.progress
                    .subscribe_failed
                    .fetch_add(1, Ordering::Relaxed);
                self.progress
                    .note_error(format!("connection {}: {error}", self.index));
            }
            close(ws).await;
            return;
        }
        self.progress.subscribed.fetch_add(1, Ordering::Relaxed);

        let ending = loop {
            tokio::select! {
                _ = &mut stop => break Ending::Stopped,
                next = ws.next() => match next {
                    Some(Ok(Message::Text(text))) => self.on_text(&text),
                    Some(Ok(Message::Close(frame))) => break Ending::Closed(frame.map(|frame| u16::from(frame.code))),
                    Some(Ok(_)) => {}
                    Some(Err(error)) => break Ending::Failed(error.to_string()),
                    None => break Ending::Eof,
                },
            }
        };
        self.finish(ending);
        close(ws).await;
    }

    /// Sends the subscribe and waits for its ack. `Err(None)` = stopped meanwhile, `Err(Some)` = failed.
    async fn subscribe(
        &mut self,
        ws: &mut WebSocketStream<TcpStream>,
        stop: &mut (impl Future<Output = ()> + Unpin),
    ) -> Result<(), Option<String>> {
        let request = format!(
            r#"{{"op":"subscribe","channel":"bench:{}","id":1}}"#,
            self.plan.channel_of(self.index)
        );
        ws.send(Message::text(request))
            .await
            .map_err(|error| Some(format!("sending subscribe: {error}")))?;
        loop {
            tokio::select! {
                _ = &mut *stop => return Err(None),
                next = ws.next() => match next {
                    Some(Ok(Message::Text(text))) => match frames::parse(&text) {
                        Frame::Subscribed => return Ok(()),
                        Frame::Error(error) => return Err(Some(format!("subscribe refused: {error}"))),
                        _ => self.on_text(&text),
                    },
                    Some(Ok(Message::Close(frame))) => {
                        return Err(Some(format!("closed before the subscribe ack: {frame:?}")));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(error)) => return Err(Some(format!("before the subscribe ack: {error}"))),
                    None => return Err(Some("stream ended before the subscribe ack".into())),
                },
            }
        }
    }

    /// Handles one frame after the subscribe: the hot path of the bench.
    fn on_text(&mut self, text: &str) {
        let mut tally = self.tally.borrow_mut();
        match frames::parse(text) {
            Frame::Message { t, n } => {
                if self.plan.is_measured(n) {
                    let now = unix_nanos();
                    tally
                        .latency_ns
                        .saturating_record(now.saturating_sub(t).max(1));
                    tally.received += 1;
                    tally.last_delivery_ns = now;
                    self.received += 1;
                    self.progress
                        .measured_received
                        .fetch_add(1, Ordering::Relaxed);
                } else if n < self.plan.warmup_count {
                    tally.warmup_received += 1;
                } else {
                    tally.unexpected += 1;
                }
                if self.last_n.is_some_and(|last| n <= last) {
                    tally.out_of_order += 1;
                }
                self.last_n = Some(n);
            }
            Frame::Foreign => tally.unexpected += 1,
            Frame::Error(error) => {
                tally.error_frames += 1;
                self.progress
                    .note_error(format!("connection {}: error frame {error}", self.index));
            }
            Frame::Subscribed | Frame::Other => {}
        }
    }

    /// Books how the connection ended and whether it missed anything.
    fn finish(&self, ending: Ending) {
        let mut tally = self.tally.borrow_mut();
        if self.received < self.plan.expected_on(self.plan.channel_of(self.index)) {
            tally.incomplete_connections += 1;
        }
        let (key, detail) = match ending {
            Ending::Stopped => return,
            Ending::Closed(Some(code)) => (
                code.to_string(),
                format!("closed by the hub with code {code}"),
            ),
            Ending::Closed(None) => (
                "close-without-code".to_string(),
                "closed by the hub without a code".to_string(),
            ),
            Ending::Eof => (
                "eof".to_string(),
                "TCP stream ended without a close frame".to_string(),
            ),
            Ending::Failed(error) => ("error".to_string(), format!("read error: {error}")),
        };
        *tally.endings.entry(key).or_default() += 1;
        self.progress.dropped.fetch_add(1, Ordering::Relaxed);
        self.progress.note_error(format!(
            "connection {} dropped during the run: {detail}",
            self.index
        ));
    }
}

/// Opens one WebSocket, bound to the connection's source address.
async fn connect(plan: &Plan, index: usize) -> Result<WebSocketStream<TcpStream>, String> {
    let socket = if plan.target.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|error| format!("socket: {error}"))?;
    if !plan.sources.is_empty() {
        let source = plan.sources[index % plan.sources.len()];
        socket
            .bind(SocketAddr::new(source, 0))
            .map_err(|error| format!("bind {source}: {error}"))?;
    }
    socket
        .set_nodelay(true)
        .map_err(|error| format!("TCP_NODELAY: {error}"))?;
    let stream = socket
        .connect(plan.target)
        .await
        .map_err(|error| format!("connect {}: {error}", plan.target))?;
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0);
    let (ws, _response) =
        tokio_tungstenite::client_async_with_config(plan.url.as_str(), stream, Some(config))
            .await
            .map_err(|error| format!("WebSocket handshake: {error}"))?;
    Ok(ws)
}

/// Sends a close frame and waits briefly for the hub's answer.
async fn close(mut ws: WebSocketStream<TcpStream>) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        if ws.close(None).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}

/// Wall-clock time in unix nanoseconds: the publisher stamps it, receivers subtract it (same machine).
pub fn unix_nanos() -> u64 {
    // A clock before 1970 is not a state this bench can measure in; report zero rather than panic.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(connections: usize, channels: usize, warmup_count: u64, measured_count: u64) -> Plan {
        Plan {
            url: "ws://127.0.0.1:1/ws".into(),
            target: "127.0.0.1:1".parse().expect("literal address"),
            sources: Vec::new(),
            connections,
            channels,
            threads: 1,
            connect_concurrency: 1,
            warmup_count,
            measured_count,
        }
    }

    #[test]
    fn expected_deliveries_follow_the_round_robin() {
        // Measured publishes 5..15 over 3 channels: channel 0 gets 6, 9, 12 (3); 1 gets 7, 10, 13 (3);
        // 2 gets 5, 8, 11, 14 (4).
        let plan = plan(7, 3, 5, 10);
        assert_eq!(
            (
                plan.expected_on(0),
                plan.expected_on(1),
                plan.expected_on(2)
            ),
            (3, 3, 4)
        );
        // Connections 0, 3, 6 on channel 0; 1, 4 on 1; 2, 5 on 2.
        assert_eq!(plan.expected_total(), 3 * 3 + 2 * 3 + 2 * 4);
    }

    #[test]
    fn sources_are_loopback_only() {
        let local = Plan::loopback_sources("127.0.0.1:80".parse().expect("literal"), 3);
        assert_eq!(local.len(), 3);
        assert_eq!(local[2], IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)));
        assert!(Plan::loopback_sources("[::1]:80".parse().expect("literal"), 3).is_empty());
    }
}
