//! A write deadline for the HTTP connections that opt in: every accepted socket is wrapped in [`Guarded`],
//! which, once its connection's [`WriteDeadline`] is armed, fails a write that has stayed blocked (the
//! client's socket took no bytes) for the armed time. actix-http has no write timeout of its own: without
//! this, a response whose client stops reading holds its socket, its buffers and its slot for as long as the
//! client keeps the connection. The failed write makes actix-http drop the connection, and with it the
//! response and whatever the response holds.
//!
//! Only event streams arm it (with `websocket.write_timeout`): they are the responses that never end, and
//! a WebSocket has its own deadline once its socket is taken from actix-http (see `transport::connection`).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

/// One connection's write deadline, shared by its socket and the request that arms it (through the
/// connection's extensions).
#[derive(Clone, Default)]
pub struct WriteDeadline(Arc<Deadline>);

#[derive(Default)]
struct Deadline {
    /// How long a write may stay blocked, in milliseconds; 0 while unarmed.
    millis: AtomicU64,
    /// The deadline passed and the connection's write was failed.
    fired: AtomicBool,
}

impl WriteDeadline {
    /// From now on, a write blocked for `timeout` fails the connection.
    pub fn arm(&self, timeout: Duration) {
        let millis = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.0.millis.store(millis, Ordering::Relaxed);
    }

    /// Whether the connection was failed by this deadline.
    pub fn fired(&self) -> bool {
        self.0.fired.load(Ordering::Relaxed)
    }

    fn timeout(&self) -> Option<Duration> {
        match self.0.millis.load(Ordering::Relaxed) {
            0 => None,
            millis => Some(Duration::from_millis(millis)),
        }
    }
}

/// An accepted socket with its connection's write deadline.
pub struct Guarded {
    io: TcpStream,
    deadline: WriteDeadline,
    /// Started when a write first blocked; cleared by any write that goes through.
    blocked: Option<Pin<Box<Sleep>>>,
}

impl Guarded {
    pub fn new(io: TcpStream) -> Guarded {
        Guarded {
            io,
            deadline: WriteDeadline::default(),
            blocked: None,
        }
    }

    /// The deadline to hand to the connection's requests.
    pub fn deadline(&self) -> &WriteDeadline {
        &self.deadline
    }

    /// The socket itself, for a connection that leaves actix-http (a WebSocket).
    pub fn into_inner(self) -> TcpStream {
        self.io
    }

    /// A write came back: ready clears the clock, pending starts it (or fails the write once it has run
    /// out; the timer's waker wakes the connection to find that).
    fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.blocked = None;
            return poll;
        }
        let Some(timeout) = self.deadline.timeout() else {
            return poll;
        };
        let blocked = self
            .blocked
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if blocked.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.deadline.0.fired.store(true, Ordering::Relaxed);
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client took no bytes for the write timeout",
        )))
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write(cx, buf);
        this.watch(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
