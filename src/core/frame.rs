//! Server-side WebSocket frames on the wire (RFC 6455 §5.2).
//!
//! A server never masks its frames, so the bytes of a frame depend only on its payload: a message is encoded
//! once per publish and the same `Bytes` goes to every subscriber's socket. Client frames are decoded (and
//! unmasked) in `decoder.rs`.

use bytes::{BufMut, Bytes, BytesMut};

const FIN: u8 = 0x80;
const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Longest close reason that fits a control frame (125 bytes, 2 of them the code).
const MAX_CLOSE_REASON: usize = 123;

/// Header bytes of a server frame whose payload is `len` bytes long.
pub fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

fn put_header(dst: &mut BytesMut, opcode: u8, len: usize) {
    dst.put_u8(FIN | opcode);
    match len {
        0..=125 => dst.put_u8(len as u8),
        126..=0xFFFF => {
            dst.put_u8(126);
            dst.put_u16(len as u16);
        }
        _ => {
            dst.put_u8(127);
            dst.put_u64(len as u64);
        }
    }
}

fn frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut dst = BytesMut::with_capacity(header_len(payload.len()) + payload.len());
    put_header(&mut dst, opcode, payload.len());
    dst.extend_from_slice(payload);
    dst.freeze()
}

/// A final text frame.
pub fn text(payload: &str) -> Bytes {
    frame(OP_TEXT, payload.as_bytes())
}

/// A text frame whose payload is the concatenation of `parts`, built with one allocation.
pub fn text_from_parts(parts: &[&str]) -> Bytes {
    let len = parts.iter().map(|p| p.len()).sum();
    let mut dst = BytesMut::with_capacity(header_len(len) + len);
    put_header(&mut dst, OP_TEXT, len);
    for part in parts {
        dst.extend_from_slice(part.as_bytes());
    }
    dst.freeze()
}

/// A close frame with a status code and a reason (cut at a character boundary to fit a control frame).
pub fn close(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    frame(OP_CLOSE, &payload)
}

/// The server's heartbeat ping (empty payload).
pub fn ping() -> Bytes {
    Bytes::from_static(&[FIN | OP_PING, 0])
}

/// The answer to a client's ping, echoing its payload.
pub fn pong(payload: &[u8]) -> Bytes {
    frame(OP_PONG, payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_http::ws::{OpCode, Parser};

    /// What a client's parser makes of a server frame.
    fn parse(bytes: &Bytes) -> (OpCode, Vec<u8>) {
        let mut buf = BytesMut::from(&bytes[..]);
        let (fin, op, payload) = Parser::parse(&mut buf, false, usize::MAX).unwrap().unwrap();
        assert!(fin && buf.is_empty());
        (op, payload.map(|p| p.to_vec()).unwrap_or_default())
    }

    #[test]
    fn every_length_class_round_trips() {
        for len in [0, 1, 125, 126, 127, 65535, 65536, 200_000] {
            let payload = "x".repeat(len);
            let wire = text(&payload);
            assert_eq!(wire.len(), header_len(len) + len);
            assert_eq!(parse(&wire), (OpCode::Text, payload.into_bytes()));
        }
        let joined = text_from_parts(&["{\"a\":", "1", "}"]);
        assert_eq!(parse(&joined), (OpCode::Text, b"{\"a\":1}".to_vec()));
    }

    #[test]
    fn control_frames() {
        assert_eq!(parse(&ping()), (OpCode::Ping, vec![]));
        assert_eq!(parse(&pong(b"hi")), (OpCode::Pong, b"hi".to_vec()));
        let (op, payload) = parse(&close(1008, "slow consumer"));
        assert_eq!(op, OpCode::Close);
        assert_eq!(&payload[..2], &1008u16.to_be_bytes());
        assert_eq!(&payload[2..], b"slow consumer");
        // A long reason is cut to fit, at a character boundary.
        let (_, payload) = parse(&close(1000, &"é".repeat(100)));
        assert!(payload.len() <= 125);
        assert!(std::str::from_utf8(&payload[2..]).is_ok());
    }
}
