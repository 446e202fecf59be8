//! The Server-Sent Events side of a connection's [`Outbox`]: the body of a `text/event-stream` response.
//!
//! An SSE subscriber is registered and fanned out to exactly like a WebSocket session: the registry pushes the
//! same shared frames into the same bounded queue, so the queue's byte bound, the slow-consumer close and the
//! drain at shutdown apply unchanged. This stream is the writer: it takes the queued frames and writes each
//! one as an event. Only the event's head (`id:` and `event:`) is written per subscriber; the `data:` line is
//! the frame's JSON as encoded once per publish, copied into the response's buffer.
//!
//! One `Last-Event-ID` must resume every channel of the stream, so each event's id carries the position of
//! every channel, in the order the request named them: `<epoch>:<seq>` for one channel,
//! `<epoch>:<seq>,<epoch>:<seq>,...` for several, an empty entry for a channel with no position yet. Its size
//! is bounded by `websocket.max_subscriptions_per_connection`. The positions are all the stream needs to
//! resume, so any replica can resume it.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use serde::Deserialize;

use crate::core::position::Position;
use crate::transport::Outbox;

const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;

/// Longest `Last-Event-ID` accepted, per channel of the stream (an epoch, a seq, two separators).
pub const MAX_ID_BYTES_PER_CHANNEL: usize = 96;

/// Where each channel of a stream stands, in the order the request named them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    channels: Vec<String>,
    positions: Vec<Option<Position>>,
    /// A resume that history could not fill: the channel's next snapshot says `"recovered":false`.
    unrecovered: Vec<bool>,
}

impl Cursor {
    /// A cursor for `channels`, resuming from `last_event_id` when there is one. The id must have been
    /// written by a stream of the same channels: one entry per channel.
    pub fn new(channels: Vec<String>, last_event_id: Option<&str>) -> Result<Cursor, String> {
        let mut positions = vec![None; channels.len()];
        if let Some(id) = last_event_id.filter(|id| !id.is_empty()) {
            if id.len() > MAX_ID_BYTES_PER_CHANNEL * channels.len() {
                return Err("the last event id is longer than this stream's ids".into());
            }
            let entries: Vec<&str> = id.split(',').collect();
            if entries.len() != channels.len() {
                return Err(format!(
                    "the last event id has {} positions for {} channels",
                    entries.len(),
                    channels.len()
                ));
            }
            for (slot, entry) in positions.iter_mut().zip(entries) {
                if entry.is_empty() {
                    continue;
                }
                let (epoch, seq) = entry
                    .rsplit_once(':')
                    .and_then(|(epoch, seq)| Some((epoch, seq.parse::<u64>().ok()?)))
                    .ok_or_else(|| format!("`{entry}` is not `<epoch>:<seq>`"))?;
                *slot = Some(Position {
                    epoch: epoch.to_string(),
                    seq,
                });
            }
        }
        Ok(Cursor {
            unrecovered: vec![false; channels.len()],
            channels,
            positions,
        })
    }

    /// The channels and where each resumes from.
    pub fn resume_points(&self) -> impl Iterator<Item = (&str, Option<&Position>)> {
        self.channels
            .iter()
            .map(String::as_str)
            .zip(self.positions.iter().map(Option::as_ref))
    }

    fn index(&self, channel: &str) -> Option<usize> {
        self.channels.iter().position(|c| c == channel)
    }

    /// Appends the id of the stream's current positions.
    fn write_id(&self, out: &mut String) {
        for (i, position) in self.positions.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            if let Some(position) = position {
                let _ = write!(out, "{}:{}", position.epoch, position.seq);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.positions.iter().all(Option::is_none)
    }
}

/// The fields of a server frame the stream reads (the rest is passed on untouched).
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(borrow, default)]
    channel: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    epoch: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    recovered: Option<bool>,
}

/// The response body of one SSE connection.
pub struct EventStream {
    outbox: Outbox,
    cursor: Cursor,
    /// Frames taken from the outbox, reused between batches.
    taken: VecDeque<Bytes>,
    /// The events of one batch, handed to the HTTP layer as one chunk.
    out: BytesMut,
    /// Reused for each event's id.
    id: String,
    /// A comment opens the stream, so the response head and the first bytes leave at once.
    opened: bool,
    done: bool,
    /// Whatever must live as long as the response: the connection-admission slot, and the signal that tells
    /// the stream's subscriber the client is gone.
    _guard: Box<dyn Send>,
}

impl EventStream {
    pub fn new(outbox: Outbox, cursor: Cursor, guard: Box<dyn Send>) -> EventStream {
        EventStream {
            _guard: guard,
            outbox,
            cursor,
            taken: VecDeque::new(),
            out: BytesMut::new(),
            id: String::new(),
            opened: false,
            done: false,
        }
    }

    /// Writes one queued frame as SSE; returns false when it was the close.
    fn write_frame(&mut self, frame: &[u8]) -> bool {
        let Some((opcode, payload)) = split_frame(frame) else {
            return true;
        };
        match opcode {
            OP_PING => self.out.extend_from_slice(b": heartbeat\n\n"),
            OP_CLOSE => {
                let reason = payload.get(2..).unwrap_or_default();
                self.out.extend_from_slice(b": closed: ");
                // A close reason is one line of UTF-8 from the server itself.
                self.out.extend_from_slice(reason);
                self.out.extend_from_slice(b"\n\n");
                return false;
            }
            OP_TEXT => self.write_text(payload),
            _ => {}
        }
        true
    }

    fn write_text(&mut self, payload: &[u8]) {
        let Ok(head) = serde_json::from_slice::<Head>(payload) else {
            return;
        };
        let index = head
            .channel
            .as_deref()
            .and_then(|channel| self.cursor.index(channel));
        let event = match head.kind {
            "subscribed" => {
                if let (Some(i), Some(epoch)) = (index, head.epoch) {
                    self.cursor.positions[i] = Some(Position {
                        epoch: epoch.into_owned(),
                        seq: head.seq.unwrap_or(0),
                    });
                    self.cursor.unrecovered[i] = head.recovered == Some(false);
                }
                // A comment, invisible to EventSource: what follows for this channel is live.
                if let Some(channel) = head.channel {
                    self.out.extend_from_slice(b": subscribed ");
                    self.out.extend_from_slice(channel.as_bytes());
                    self.out.extend_from_slice(b"\n\n");
                }
                return;
            }
            "message" => "message",
            "snapshot" => "snapshot",
            // Nothing else is queued for a stream (its requests were checked before it opened).
            _ => return,
        };
        let mut marker = false;
        if let Some(i) = index {
            if let (Some(seq), Some(position)) = (head.seq, self.cursor.positions[i].as_mut()) {
                position.seq = seq;
            }
            if event == "snapshot" {
                marker = std::mem::take(&mut self.cursor.unrecovered[i]);
            }
        }
        if !self.cursor.is_empty() {
            self.id.clear();
            self.cursor.write_id(&mut self.id);
            self.out.extend_from_slice(b"id: ");
            self.out.extend_from_slice(self.id.as_bytes());
            self.out.extend_from_slice(b"\n");
        }
        self.out.extend_from_slice(b"event: ");
        self.out.extend_from_slice(event.as_bytes());
        self.out.extend_from_slice(b"\ndata: ");
        match payload.split_last() {
            Some((b'}', body)) if marker => {
                self.out.extend_from_slice(body);
                self.out.extend_from_slice(b",\"recovered\":false}");
            }
            // Compact JSON: no raw newline can end the data line early.
            _ => self.out.extend_from_slice(payload),
        }
        self.out.extend_from_slice(b"\n\n");
    }
}

/// Drops what is queued for a stream whose client stopped reading and accepts nothing more: the queue's
/// memory is given back while the response, stuck behind the client's full socket, waits for it to read
/// or go away.
pub fn release(outbox: &Outbox) {
    outbox.shut();
}

/// The opcode and payload of a server frame (never masked), `None` if it is cut short.
fn split_frame(frame: &[u8]) -> Option<(u8, &[u8])> {
    let opcode = frame.first()? & 0x0F;
    let (len, start): (usize, usize) = match *frame.get(1)? & 0x7F {
        126 => (
            usize::from(u16::from_be_bytes(frame.get(2..4)?.try_into().ok()?)),
            4,
        ),
        127 => (
            usize::try_from(u64::from_be_bytes(frame.get(2..10)?.try_into().ok()?)).ok()?,
            10,
        ),
        n => (usize::from(n), 2),
    };
    Some((opcode, frame.get(start..start.checked_add(len)?)?))
}

impl Stream for EventStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if !this.opened {
            this.opened = true;
            return Poll::Ready(Some(Ok(Bytes::from_static(b": connected\n\n"))));
        }
        let closing = this.outbox.take(&mut this.taken, cx.waker());
        if this.taken.is_empty() {
            if closing {
                this.done = true;
                return Poll::Ready(None);
            }
            return Poll::Pending;
        }
        let mut bytes = 0;
        let mut taken = std::mem::take(&mut this.taken);
        for frame in taken.drain(..) {
            bytes += frame.len();
            if !this.write_frame(&frame) {
                this.done = true;
                break;
            }
        }
        this.taken = taken;
        // Handed to the HTTP layer, which writes as the socket takes it and stops asking for more while its
        // own (bounded) buffer is full: from here the client's reading speed shows in the outbox.
        this.outbox.written(bytes);
        if this.out.is_empty() {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Some(Ok(this.out.split().freeze())))
    }
}

impl Drop for EventStream {
    /// The client went away (or the stream ended): nothing more is queued for it.
    fn drop(&mut self) {
        self.outbox.shut();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::frame;
    use crate::core::publication::Publication;

    fn cursor(channels: &[&str], id: Option<&str>) -> Result<Cursor, String> {
        Cursor::new(channels.iter().map(|c| c.to_string()).collect(), id)
    }

    #[test]
    fn ids_carry_every_channel_and_parse_back() {
        let c = cursor(&["a", "b", "c"], Some("e1:5,,e-2:7")).unwrap();
        let points: Vec<_> = c.resume_points().collect();
        assert_eq!(points[0].1.unwrap().seq, 5);
        assert!(points[1].1.is_none());
        assert_eq!(points[2].1.unwrap().epoch, "e-2");
        let mut id = String::new();
        c.write_id(&mut id);
        assert_eq!(id, "e1:5,,e-2:7");
        assert!(cursor(&["a"], Some("e1:5,e1:6")).is_err());
        assert!(cursor(&["a"], Some("e1")).is_err());
        assert!(cursor(&["a"], Some("e1:x")).is_err());
        assert!(cursor(&["a"], Some(&"x".repeat(200))).is_err());
        assert!(cursor(&["a"], Some("")).unwrap().is_empty());
    }

    #[test]
    fn frames_become_events_with_positions() {
        let outbox = Outbox::new(16, 1 << 20);
        let mut stream = EventStream::new(outbox, cursor(&["a", "b"], None).unwrap(), Box::new(()));
        let ack =
            crate::core::protocol::positioned_subscribed_frame(&None, "a", "ep", 3, Some(false));
        assert!(stream.write_frame(&frame::text(&ack)));
        let snapshot = Publication::new("a".into(), "{\"x\":1}", Some(3), None);
        stream.write_frame(&snapshot.snapshot_wire());
        let message = Publication::new("a".into(), "[1]", Some(4), None);
        stream.write_frame(&message.wire());
        stream.write_frame(&frame::ping());
        assert!(!stream.write_frame(&frame::close(1008, "slow consumer")));
        let text = String::from_utf8(stream.out.to_vec()).unwrap();
        assert_eq!(
            text,
            ": subscribed a\n\nid: ep:3,\nevent: snapshot\ndata: {\"type\":\"snapshot\",\"channel\":\"a\",\"data\":{\"x\":1},\"seq\":3,\"recovered\":false}\n\n\
             id: ep:4,\nevent: message\ndata: {\"type\":\"message\",\"channel\":\"a\",\"data\":[1],\"seq\":4}\n\n\
             : heartbeat\n\n: closed: slow consumer\n\n"
        );
    }

    #[test]
    fn long_frames_split() {
        let long = "x".repeat(70_000);
        let f = frame::text(&long);
        assert_eq!(split_frame(&f).unwrap().1.len(), 70_000);
        assert_eq!(split_frame(&f[..100]), None);
    }
}
