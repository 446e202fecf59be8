//! One WebSocket connection's socket, driven inside its session actor.
//!
//! `Transport` is an actix `ActorFuture` spawned into the session's context, so the socket, the session and
//! its heartbeat share one task and the session handles each client frame by a direct call, not a message.
//! It reads client frames, parses them, and writes whatever the connection's [`Outbox`] holds with vectored
//! writes. A connection holds no buffer while idle: input is read into a stack buffer and only a partial frame
//! is kept on the heap; output is the shared frames themselves.
//!
//! Closing is always the same path: a close frame is queued (by the session, the registry, the heartbeat or a
//! protocol error), written after what was queued before it, the write side is shut down, and the transport
//! waits briefly for the client to close its side, so the close frame is not lost to a reset. Then the
//! session stops.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, Waker, ready};
use std::time::Duration;

use actix::fut::ActorFuture;
use actix::prelude::*;
use actix_http::ws::{OpCode, Parser, ProtocolError as WsError};
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::frame;
use super::outbox::Outbox;
use crate::protocol::close;

/// How long a closing connection waits for the client to acknowledge before the socket is dropped.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Frames handed to one vectored write.
const MAX_IOVECS: usize = 64;
/// Bytes read per `read` call, into a stack buffer.
const READ_CHUNK: usize = 4096;
/// Reads per poll before the transport yields to other connections on the thread.
const READS_PER_POLL: usize = 16;

/// What the session does with client input. The transport handles the WebSocket control frames itself.
pub trait Endpoint: Actor<Context = Context<Self>> {
    /// A complete text message.
    fn on_text(&mut self, text: &str, ctx: &mut Context<Self>);
    /// A data frame relayhub's protocol does not use (binary, fragmented); the connection stays open.
    fn on_unsupported(&mut self, what: &'static str, ctx: &mut Context<Self>);
    /// Something arrived from the client (any frame): it is alive.
    fn on_activity(&mut self);
    /// True while the session wants no further input (the previous frame is still being handled); the session
    /// wakes `waker` once it is ready again.
    fn input_paused(&mut self, waker: &Waker) -> bool;
}

pub struct Transport {
    io: TcpStream,
    outbox: Outbox,
    /// Frames taken from the outbox and not yet fully written (the first one possibly in part).
    writing: VecDeque<Bytes>,
    /// Bytes of an incomplete client frame; no allocation between frames.
    input: BytesMut,
    max_frame: usize,
    /// A fragmented message is being skipped (its first frame was refused).
    skipping_fragments: bool,
    /// The outbox holds (or held) a close frame.
    closing: bool,
    /// Everything, the close frame included, is written and the write side is shut down.
    write_shut: bool,
    /// Set once closing: past it the socket is dropped whatever the client does.
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Transport {
    /// `input` holds bytes the HTTP layer read past the upgrade request (a client may send its first frame
    /// right behind it).
    pub fn new(io: TcpStream, input: BytesMut, outbox: Outbox, max_frame: usize) -> Transport {
        Transport {
            io,
            outbox,
            writing: VecDeque::new(),
            input,
            max_frame,
            skipping_fragments: false,
            closing: false,
            write_shut: false,
            linger: None,
        }
    }

    /// Parses and hands over every complete frame in `input`, unless the session pauses input or the
    /// connection starts closing.
    fn process_input<A: Endpoint>(&mut self, act: &mut A, ctx: &mut Context<A>, waker: &Waker) {
        while !self.closing && !self.outbox.is_closing() {
            if act.input_paused(waker) {
                return;
            }
            let (fin, opcode, payload) = match Parser::parse(&mut self.input, true, self.max_frame)
            {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(WsError::Overflow) => {
                    let reason = format!("frame larger than {} bytes", self.max_frame);
                    self.fail(close::TOO_BIG, &reason);
                    return;
                }
                Err(error) => {
                    log::debug!("websocket protocol error: {error}");
                    self.fail(close::PROTOCOL, "protocol error");
                    return;
                }
            };
            act.on_activity();
            let payload = payload.unwrap_or_default();
            match opcode {
                OpCode::Text | OpCode::Binary if !fin => {
                    self.skipping_fragments = true;
                    act.on_unsupported("fragmented frames are not supported", ctx);
                }
                OpCode::Continue => {
                    if !self.skipping_fragments {
                        // A continuation with no message to continue.
                        self.fail(close::PROTOCOL, "unexpected continuation frame");
                        return;
                    }
                    self.skipping_fragments = !fin;
                }
                OpCode::Text => match std::str::from_utf8(&payload) {
                    Ok(text) => act.on_text(text, ctx),
                    Err(_) => {
                        self.fail(close::INVALID_DATA, "text frame is not UTF-8");
                        return;
                    }
                },
                OpCode::Binary => {
                    act.on_unsupported("binary frames are not supported; send JSON text", ctx)
                }
                OpCode::Ping => self.outbox.push_or_close(frame::pong(&payload)),
                OpCode::Pong => {}
                OpCode::Close => {
                    // Echo the client's code (RFC 6455 §5.5.1); a close without one is answered with 1000.
                    let code = match payload.len() {
                        0 | 1 => close::NORMAL,
                        _ => u16::from_be_bytes([payload[0], payload[1]]),
                    };
                    self.outbox.close(code, "");
                }
                OpCode::Bad => {
                    self.fail(close::PROTOCOL, "bad opcode");
                    return;
                }
            }
        }
        if self.input.is_empty() && self.input.capacity() > 0 {
            // Give the buffer back between frames: an idle connection holds no input memory.
            self.input = BytesMut::new();
        }
    }

    /// A protocol failure: nothing more is read, a close frame with `code` goes out.
    fn fail(&mut self, code: u16, reason: &str) {
        self.input = BytesMut::new();
        self.outbox.close(code, reason);
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
            if open && act.input_paused(cx.waker()) {
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
                Ok(()) => {}
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
        if self.poll_input(act, ctx, cx).is_ready() {
            // The client may have closed only its sending side, right after its close frame: what is queued
            // (the answering close frame) still goes out if the socket takes it now.
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
        if !self.closing {
            return Poll::Pending;
        }
        let linger = self
            .linger
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(CLOSE_LINGER)));
        if linger.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        if flushed && !self.write_shut {
            match Pin::new(&mut self.io).poll_shutdown(cx) {
                Poll::Ready(Ok(())) => self.write_shut = true,
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => {}
            }
        }
        // Reading continues (poll_input above) until the client closes its side or the linger ends.
        Poll::Pending
    }
}

impl<A: Endpoint> ActorFuture<A> for Transport {
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
