//! One WebSocket connection's socket, driven inside its session actor.
//!
//! `Transport` is an actix `ActorFuture` spawned into the session's context, so the socket, the session and
//! its heartbeat share one task and the session handles each client frame by a direct call, not a message.
//! It reads client frames, decodes them ([`decoder`]), reassembles fragmented messages, and writes whatever
//! the connection's [`Outbox`] holds with vectored writes. A connection holds no buffer while idle: input is
//! read into a stack buffer and only a partial frame or message is kept on the heap; output is the shared
//! frames themselves.
//!
//! Input is read only while the outbox is below its high-water mark: a client's requests cannot fill its own
//! queue, they wait in the socket until it drains (TCP pushes back on the client).
//!
//! Closing is always the same path: a close frame is queued (by the session, the registry, the heartbeat or a
//! protocol error), written after what was queued before it, the write side is shut down, and the transport
//! waits briefly for the client to close its side, so the close frame is not lost to a reset. Then the
//! session stops. Whatever the client does, the socket is dropped within a bounded time: a connection whose
//! socket takes no bytes for `write_timeout` is aborted, and a close is given `write_timeout` plus the linger
//! to complete.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, Waker, ready};
use std::time::Duration;

use actix::fut::ActorFuture;
use actix::prelude::*;
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::decoder::{self, DecodeError, Opcode};
use super::outbox::Outbox;
use crate::core::frame;
use crate::core::protocol::close;

/// How long a closing connection waits for the client to acknowledge before the socket is dropped.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Bytes a closing connection reads and throws away while it waits for the client's end of the stream. Past
/// it the socket is no longer read: a client that keeps streaming (the rest of an oversized frame, garbage)
/// is held back by TCP flow control until the linger ends, instead of being read at line rate.
const MAX_DISCARD: usize = 64 * 1024;
/// Frames handed to one vectored write.
const MAX_IOVECS: usize = 64;
/// Bytes read per `read` call, into a stack buffer.
const READ_CHUNK: usize = 4096;
/// Reads per poll before the transport yields to other connections on the thread.
const READS_PER_POLL: usize = 16;
/// Read-then-write rounds per poll while the client's answers keep draining.
const ROUNDS_PER_POLL: usize = 4;

/// Why a transport ended a connection on its own; the session counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A frame or a reassembled message larger than `max_message_bytes` (close 1009).
    TooBig,
    /// Broken framing or an invalid close frame (close 1002), or text that is not UTF-8 (close 1007).
    Protocol,
    /// The socket took no bytes for `write_timeout` while some were owed: the connection was aborted.
    WriteTimeout,
}

/// What the session does with client input. The transport handles the WebSocket control frames itself.
pub trait Endpoint: Actor<Context = Context<Self>> {
    /// A complete text message.
    fn on_text(&mut self, text: &str, ctx: &mut Context<Self>);
    /// A data message relayhub's protocol does not use (binary); the connection stays open.
    fn on_unsupported(&mut self, what: &'static str, ctx: &mut Context<Self>);
    /// Something arrived from the client (any frame): it is alive.
    fn on_activity(&mut self);
    /// True while the session wants no further input (the previous frame is still being handled); the session
    /// wakes `waker` once it is ready again.
    fn input_paused(&mut self, waker: &Waker) -> bool;
    /// The transport is closing or aborting the connection for `failure`.
    fn on_failure(&mut self, failure: Failure);
}

/// A frame the connection refuses: how it is closed and why.
struct Refusal {
    failure: Failure,
    code: u16,
    reason: &'static str,
}

impl Refusal {
    fn protocol(reason: &'static str) -> Refusal {
        Refusal {
            failure: Failure::Protocol,
            code: close::PROTOCOL,
            reason,
        }
    }

    fn invalid_data(reason: &'static str) -> Refusal {
        Refusal {
            failure: Failure::Protocol,
            code: close::INVALID_DATA,
            reason,
        }
    }
}

/// Limits one transport enforces.
#[derive(Debug, Clone, Copy)]
pub struct TransportLimits {
    /// Largest message, whole or reassembled from fragments.
    pub max_message_bytes: usize,
    /// How long owed bytes may wait for a socket that takes none.
    pub write_timeout: Duration,
}

/// Generic over the socket (`S`): a TCP stream in the server, any other byte stream (TLS, an in-memory
/// duplex in tests) works the same.
pub struct Transport<S> {
    io: S,
    outbox: Outbox,
    /// Frames taken from the outbox and not yet fully written (the first one possibly in part).
    writing: VecDeque<bytes::Bytes>,
    /// Bytes of an incomplete client frame; no allocation between frames.
    input: BytesMut,
    limits: TransportLimits,
    /// The data opcode of the fragmented message being reassembled, if any.
    fragmented: Option<Opcode>,
    /// The fragments of that message so far (their total is within `max_message_bytes`).
    message: BytesMut,
    /// The client's input was left unread because the outbox is past its high-water mark.
    backpressure: bool,
    /// The outbox holds (or held) a close frame.
    closing: bool,
    /// Everything, the close frame included, is written and the write side is shut down.
    write_shut: bool,
    /// Set once a close is queued: past it the socket is dropped whatever the client does.
    linger: Option<Pin<Box<Sleep>>>,
    /// The linger was shortened to `CLOSE_LINGER` once the close frame was out.
    linger_short: bool,
    /// Set while owed bytes wait for the socket; reset whenever the socket takes some.
    stall: Option<Pin<Box<Sleep>>>,
    /// Bytes were written since `stall` was last set.
    progressed: bool,
    /// Bytes read and thrown away since the connection started closing.
    discarded: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Transport<S> {
    /// `input` holds bytes the HTTP layer read past the upgrade request (a client may send its first frame
    /// right behind it).
    pub fn new(io: S, input: BytesMut, outbox: Outbox, limits: TransportLimits) -> Transport<S> {
        Transport {
            io,
            outbox,
            writing: VecDeque::new(),
            input,
            limits,
            fragmented: None,
            message: BytesMut::new(),
            backpressure: false,
            closing: false,
            write_shut: false,
            linger: None,
            linger_short: false,
            stall: None,
            progressed: false,
            discarded: 0,
        }
    }

    /// Whether no further client input is wanted now: the session is busy, or the client's own answers have
    /// filled half its queue. Either way the transport is woken when that changes.
    fn hold_input<A: Endpoint>(&mut self, act: &mut A, waker: &Waker) -> bool {
        if act.input_paused(waker) {
            return true;
        }
        // The writer wakes this task as the queue drains (a write ready again, or a push to an empty queue).
        self.backpressure = self.outbox.backlogged();
        self.backpressure
    }

    /// Decodes and hands over every complete frame in `input`, unless input is held or the connection starts
    /// closing.
    fn process_input<A: Endpoint>(&mut self, act: &mut A, ctx: &mut Context<A>, waker: &Waker) {
        while !self.closing && !self.outbox.is_closing() {
            if self.hold_input(act, waker) {
                return;
            }
            // A fragment may bring the message up to the limit, not past it.
            let allowance = self.limits.max_message_bytes - self.message.len();
            let frame = match decoder::decode(&mut self.input, allowance) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(error) => {
                    log::debug!("websocket frame refused: {error}");
                    let refusal = match error {
                        DecodeError::TooBig { .. } => Refusal {
                            failure: Failure::TooBig,
                            code: close::TOO_BIG,
                            reason: "message larger than websocket.max_message_bytes",
                        },
                        _ => Refusal::protocol("protocol error"),
                    };
                    self.fail(act, refusal);
                    return;
                }
            };
            act.on_activity();
            if let Err(refusal) = self.handle_frame(frame, act, ctx) {
                self.fail(act, refusal);
                return;
            }
        }
        if self.input.is_empty() && self.input.capacity() > 0 {
            // Give the buffer back between frames: an idle connection holds no input memory.
            self.input = BytesMut::new();
        }
    }

    fn handle_frame<A: Endpoint>(
        &mut self,
        frame: decoder::Frame,
        act: &mut A,
        ctx: &mut Context<A>,
    ) -> Result<(), Refusal> {
        let payload = frame.payload;
        match frame.opcode {
            Opcode::Ping => self.outbox.push_or_close(frame::pong(&payload)),
            Opcode::Pong => {}
            Opcode::Close => self.answer_close(&payload)?,
            Opcode::Text | Opcode::Binary if self.fragmented.is_some() => {
                return Err(Refusal::protocol("new message inside a fragmented message"));
            }
            Opcode::Text | Opcode::Binary if frame.fin => {
                Self::deliver(frame.opcode, &payload, act, ctx)?
            }
            Opcode::Text | Opcode::Binary => {
                self.fragmented = Some(frame.opcode);
                self.message = payload;
            }
            Opcode::Continuation => {
                let Some(opcode) = self.fragmented else {
                    return Err(Refusal::protocol("unexpected continuation frame"));
                };
                self.message.extend_from_slice(&payload);
                if frame.fin {
                    self.fragmented = None;
                    // Taken, so the reassembly buffer is let go once the message is handled.
                    let message = std::mem::take(&mut self.message);
                    Self::deliver(opcode, &message, act, ctx)?;
                }
            }
        }
        Ok(())
    }

    /// Hands a complete data message to the session.
    fn deliver<A: Endpoint>(
        opcode: Opcode,
        payload: &[u8],
        act: &mut A,
        ctx: &mut Context<A>,
    ) -> Result<(), Refusal> {
        if opcode == Opcode::Binary {
            act.on_unsupported("binary frames are not supported; send JSON text", ctx);
            return Ok(());
        }
        match std::str::from_utf8(payload) {
            Ok(text) => {
                act.on_text(text, ctx);
                Ok(())
            }
            Err(_) => Err(Refusal::invalid_data("text frame is not UTF-8")),
        }
    }

    /// Answers the client's close frame (RFC 6455 §5.5.1, §7.4): a valid code is echoed, an empty close is
    /// answered with 1000, anything else is a protocol error.
    fn answer_close(&mut self, payload: &[u8]) -> Result<(), Refusal> {
        let code = match payload {
            [] => close::NORMAL,
            [_] => return Err(Refusal::protocol("close payload of 1 byte")),
            [high, low, reason @ ..] => {
                let code = u16::from_be_bytes([*high, *low]);
                if !close_code_allowed(code) {
                    return Err(Refusal::protocol("invalid close code"));
                }
                if std::str::from_utf8(reason).is_err() {
                    return Err(Refusal::invalid_data("close reason is not UTF-8"));
                }
                code
            }
        };
        self.outbox.close(code, "");
        Ok(())
    }

    /// A refused frame: nothing more is read or kept, a close frame with the refusal's code goes out.
    fn fail<A: Endpoint>(&mut self, act: &mut A, refusal: Refusal) {
        act.on_failure(refusal.failure);
        self.input = BytesMut::new();
        self.message = BytesMut::new();
        self.fragmented = None;
        self.outbox.close(refusal.code, refusal.reason);
    }

    /// Reads what the socket has, handing complete frames to the session (or discarding input once closing).
    /// `Ready` means the client is gone: it closed its side, or the socket failed.
    fn poll_input<A: Endpoint>(
        &mut self,
        act: &mut A,
        ctx: &mut Context<A>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<()> {
        self.process_input(act, ctx, cx.waker());
        for _ in 0..READS_PER_POLL {
            let open = !self.closing && !self.outbox.is_closing();
            if open && self.hold_input(act, cx.waker()) {
                return Poll::Pending;
            }
            if !open && self.discarded > MAX_DISCARD {
                // The linger timer (polled by `drive`) ends the connection; nothing more is read until then.
                return Poll::Pending;
            }
            // Uninitialised, so the wake-ups that find nothing to read do not clear 4 KiB each time.
            let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut buf = ReadBuf::uninit(&mut chunk);
            match ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf)) {
                Ok(()) if buf.filled().is_empty() => return Poll::Ready(()),
                Ok(()) if open => {
                    self.input.extend_from_slice(buf.filled());
                    self.process_input(act, ctx, cx.waker());
                }
                // Closing: the client's remaining frames are read only to reach its end of the stream.
                Ok(()) => self.discarded += buf.filled().len(),
                Err(error) => {
                    log::debug!("websocket read failed: {error}");
                    return Poll::Ready(());
                }
            }
        }
        // More may be waiting: come back after the other tasks of this thread had their turn.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Writes queued frames until the queue is empty (`Ready(Ok)`) or the socket is full (`Pending`).
    fn poll_output(&mut self, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.writing.is_empty() {
                self.closing |= self.outbox.take(&mut self.writing, cx.waker());
                if self.writing.is_empty() {
                    return Poll::Ready(Ok(()));
                }
            }
            let io = Pin::new(&mut self.io);
            let written = if self.writing.len() == 1 {
                // The common case between bursts; a plain write is cheaper than a one-element writev.
                ready!(io.poll_write(cx, &self.writing[0]))?
            } else {
                let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                let count = slices
                    .iter_mut()
                    .zip(&self.writing)
                    .map(|(slice, frame)| *slice = IoSlice::new(frame))
                    .count();
                ready!(io.poll_write_vectored(cx, &slices[..count]))?
            };
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.consume(written);
        }
    }

    /// Drops `written` bytes from the front of the frames being written.
    fn consume(&mut self, mut written: usize) {
        self.outbox.written(written);
        self.progressed = true;
        while written > 0 {
            let front = self
                .writing
                .front_mut()
                .expect("written bytes came from queued frames");
            if front.len() <= written {
                written -= front.len();
                self.writing.pop_front();
            } else {
                front.advance(written);
                written = 0;
            }
        }
    }

    fn drive<A: Endpoint>(
        &mut self,
        act: &mut A,
        ctx: &mut Context<A>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<()> {
        for _ in 0..ROUNDS_PER_POLL {
            if self.poll_input(act, ctx, cx).is_ready() {
                // The client may have closed only its sending side, right after its close frame: what is
                // queued (the answering close frame) still goes out if the socket takes it now.
                let _ = self.poll_output(cx);
                return Poll::Ready(());
            }
            let flushed = match self.poll_output(cx) {
                Poll::Ready(Ok(())) => true,
                Poll::Ready(Err(error)) => {
                    log::debug!("websocket write failed: {error}");
                    return Poll::Ready(());
                }
                Poll::Pending => false,
            };
            // Input held back for the client's own answers, and the writer has drained them: read on.
            if self.backpressure && !self.outbox.backlogged() {
                self.backpressure = false;
                continue;
            }
            return self.poll_deadlines(flushed, act, cx);
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// The write timeout, and the close sequence with its bounded linger. `flushed`: nothing is owed.
    fn poll_deadlines<A: Endpoint>(
        &mut self,
        flushed: bool,
        act: &mut A,
        cx: &mut TaskContext<'_>,
    ) -> Poll<()> {
        if flushed {
            self.stall = None;
        } else {
            let timeout = self.limits.write_timeout;
            let stall = match &mut self.stall {
                Some(stall) => {
                    if self.progressed {
                        stall.as_mut().reset(Instant::now() + timeout);
                    }
                    stall
                }
                None => self.stall.insert(Box::pin(tokio::time::sleep(timeout))),
            };
            self.progressed = false;
            if stall.as_mut().poll(cx).is_ready() {
                log::debug!("websocket write timeout: the client takes no bytes");
                act.on_failure(Failure::WriteTimeout);
                return Poll::Ready(());
            }
        }
        if !self.closing && !self.outbox.is_closing() {
            return Poll::Pending;
        }
        // A close is queued. It gets the write timeout to reach the socket (a client that reads a byte now
        // and then resets the stall forever), then the linger.
        let linger = self.linger.get_or_insert_with(|| {
            Box::pin(tokio::time::sleep(self.limits.write_timeout + CLOSE_LINGER))
        });
        if flushed && !self.write_shut {
            match Pin::new(&mut self.io).poll_shutdown(cx) {
                Poll::Ready(Ok(())) => self.write_shut = true,
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => {}
            }
        }
        if self.write_shut && !self.linger_short {
            // The close frame is out: the client has the usual linger to answer.
            self.linger_short = true;
            let short = Instant::now() + CLOSE_LINGER;
            if short < linger.deadline() {
                linger.as_mut().reset(short);
            }
        }
        if linger.as_mut().poll(cx).is_ready() {
            if !flushed {
                act.on_failure(Failure::WriteTimeout);
            }
            return Poll::Ready(());
        }
        // Reading continues (poll_input) until the client closes its side or the linger ends.
        Poll::Pending
    }
}

/// Close codes a client may send (RFC 6455 §7.4): the defined ones, except those that must never be on the wire
/// (1005, 1006, 1015) or are unassigned, and the registered (3000-3999) and private (4000-4999) ranges.
fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

impl<A: Endpoint, S: AsyncRead + AsyncWrite + Unpin> ActorFuture<A> for Transport<S> {
    type Output = ();

    fn poll(
        self: Pin<&mut Self>,
        act: &mut A,
        ctx: &mut Context<A>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<()> {
        let this = self.get_mut();
        let done = this.drive(act, ctx, cx);
        if done.is_ready() {
            this.outbox.shut();
            ctx.stop();
        }
        done
    }
}
