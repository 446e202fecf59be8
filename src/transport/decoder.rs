//! Client frames off the wire (RFC 6455 §5.2), decoded by relayhub rather than by actix-http's parser.
//!
//! The reason is the length field: a frame announces its payload length in its header, and a parser that
//! waits for the whole payload before comparing it with the limit lets a client make the server buffer up to
//! 2^63 bytes. [`decode`] refuses an oversized data frame as soon as its header is complete, so nothing past
//! the header is ever kept. It also enforces the header rules that need no connection state (reserved bits,
//! masking, opcodes, control frame size and finality); fragment order and close payloads are checked by the
//! connection, which knows what came before.
//!
//! It is a pure function over a buffer, with no actix types, so it can be fuzzed on its own.

use bytes::{Buf, BytesMut};

/// Largest payload of a control frame (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl Opcode {
    /// Close, ping and pong: at most 125 bytes, never fragmented, allowed between a message's fragments.
    pub fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }
}

/// One complete client frame, unmasked.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    /// The last frame of its message.
    pub fin: bool,
    pub opcode: Opcode,
    /// Split off the input buffer (no copy) and unmasked in place.
    pub payload: BytesMut,
}

/// Why the input is not a valid client frame. Every variant ends the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// A data frame announcing more payload than allowed (close 1009).
    TooBig { len: u64, max: usize },
    /// An RSV bit is set; relayhub negotiates no extension that would define them (close 1002).
    ReservedBits,
    /// An opcode RFC 6455 reserves (3-7, B-F) (close 1002).
    ReservedOpcode(u8),
    /// A client frame without a mask (close 1002).
    Unmasked,
    /// A control frame with FIN=0 (close 1002).
    FragmentedControl,
    /// A control frame with more than 125 bytes of payload (close 1002).
    ControlTooLong(u64),
    /// A 64-bit length with its most significant bit set (close 1002).
    BadLength,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::TooBig { len, max } => {
                write!(f, "frame of {len} bytes is larger than {max} bytes")
            }
            DecodeError::ReservedBits => f.write_str("reserved bits set"),
            DecodeError::ReservedOpcode(op) => write!(f, "reserved opcode {op:#x}"),
            DecodeError::Unmasked => f.write_str("client frame is not masked"),
            DecodeError::FragmentedControl => f.write_str("fragmented control frame"),
            DecodeError::ControlTooLong(len) => {
                write!(f, "control frame of {len} bytes (at most 125)")
            }
            DecodeError::BadLength => f.write_str("payload length has its top bit set"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Decodes the frame at the front of `input`.
///
/// `Ok(Some(frame))` removes the frame from `input`; `Ok(None)` means more bytes are needed, and `input` is
/// left as it is (only a header or a payload within `max_payload` is ever waited for). `max_payload` applies
/// to data frames (text, binary, continuation); a caller reassembling a fragmented message passes what is left
/// of the message's allowance. Errors are final: the caller closes the connection and reads no further.
pub fn decode(input: &mut BytesMut, max_payload: usize) -> Result<Option<Frame>, DecodeError> {
    let Some(&[first, second]) = input.get(..2) else {
        return Ok(None);
    };
    let fin = first & 0x80 != 0;
    if first & 0x70 != 0 {
        return Err(DecodeError::ReservedBits);
    }
    let opcode = match first & 0x0F {
        0x0 => Opcode::Continuation,
        0x1 => Opcode::Text,
        0x2 => Opcode::Binary,
        0x8 => Opcode::Close,
        0x9 => Opcode::Ping,
        0xA => Opcode::Pong,
        other => return Err(DecodeError::ReservedOpcode(other)),
    };
    if second & 0x80 == 0 {
        return Err(DecodeError::Unmasked);
    }
    if opcode.is_control() && !fin {
        return Err(DecodeError::FragmentedControl);
    }
    let (len, len_bytes) = match second & 0x7F {
        126 => match input.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 2),
            None => return Ok(None),
        },
        127 => match input.get(2..10) {
            Some(b) => {
                let mut be = [0; 8];
                be.copy_from_slice(b);
                (u64::from_be_bytes(be), 8)
            }
            None => return Ok(None),
        },
        short => (u64::from(short), 0),
    };
    // Checked before waiting for the mask or the payload: an oversized frame is refused on its header alone.
    if len >> 63 != 0 {
        return Err(DecodeError::BadLength);
    }
    if opcode.is_control() {
        if len > MAX_CONTROL_PAYLOAD as u64 {
            return Err(DecodeError::ControlTooLong(len));
        }
    } else if len > max_payload as u64 {
        return Err(DecodeError::TooBig {
            len,
            max: max_payload,
        });
    }
    // `len` is at most `max_payload` or 125 here, so it fits a usize.
    let len = len as usize;
    let header = 2 + len_bytes + 4;
    if input.len() < header + len {
        // Room for the rest of this frame only; the limit above keeps it bounded.
        input.reserve(header + len - input.len());
        return Ok(None);
    }
    let mut mask = [0; 4];
    mask.copy_from_slice(&input[header - 4..header]);
    input.advance(header);
    let mut payload = input.split_to(len);
    unmask(&mut payload, mask);
    Ok(Some(Frame {
        fin,
        opcode,
        payload,
    }))
}

/// XORs `data` with the repeating 4-byte `mask`, a word at a time where it can.
fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = data.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let value = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) ^ word;
        chunk.copy_from_slice(&value.to_ne_bytes());
    }
    for (byte, m) in chunks.into_remainder().iter_mut().zip(mask) {
        *byte ^= m;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        match payload.len() {
            len @ 0..=125 => out.push(0x80 | len as u8),
            len @ 126..=0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&MASK);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
        out
    }

    #[test]
    fn every_length_form_decodes_byte_by_byte() {
        for len in [0, 1, 5, 125, 126, 65535, 65536, 70_001] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let wire = masked(0x81, &payload);
            let mut input = BytesMut::new();
            // Fed in growing prefixes: every prefix but the whole asks for more and keeps the input.
            let steps: Vec<usize> = (1..=14).chain([wire.len() / 2, wire.len()]).collect();
            let mut fed = 0;
            for step in steps.into_iter().filter(|&s| s <= wire.len()) {
                if step <= fed {
                    continue;
                }
                input.extend_from_slice(&wire[fed..step]);
                fed = step;
                let result = decode(&mut input, 100_000).unwrap();
                if fed < wire.len() {
                    assert_eq!(result, None, "len {len}, {fed} bytes");
                    assert_eq!(input.len(), fed);
                } else {
                    let frame = result.unwrap();
                    assert!(frame.fin);
                    assert_eq!(frame.opcode, Opcode::Text);
                    assert_eq!(&frame.payload[..], &payload[..], "len {len}");
                    assert!(input.is_empty());
                }
            }
        }
    }

    #[test]
    fn an_oversized_length_is_refused_on_the_header_alone() {
        let mut input = BytesMut::from(&[0x81, 0x80 | 127, 0, 0, 0, 1, 0, 0, 0, 0][..]);
        assert_eq!(
            decode(&mut input, 65536),
            Err(DecodeError::TooBig {
                len: 1 << 32,
                max: 65536
            })
        );
        let mut input = BytesMut::from(&[0x02, 0x80 | 126, 0x01, 0x00][..]);
        assert!(matches!(
            decode(&mut input, 255),
            Err(DecodeError::TooBig { len: 256, .. })
        ));
        let mut input = BytesMut::from(&[0x81, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0][..]);
        assert_eq!(decode(&mut input, usize::MAX), Err(DecodeError::BadLength));
        // Waiting for an allowed payload reserves no more than that payload.
        let mut input = BytesMut::from(&masked(0x81, &[b'x'; 1000])[..8]);
        assert_eq!(decode(&mut input, 1000), Ok(None));
        assert!(input.capacity() < 2048);
    }

    #[test]
    fn header_rules() {
        let cases: [(Vec<u8>, DecodeError); 6] = [
            (masked(0x81 | 0x40, b"x"), DecodeError::ReservedBits),
            (masked(0x83, b""), DecodeError::ReservedOpcode(3)),
            (masked(0x8B, b""), DecodeError::ReservedOpcode(0xB)),
            (vec![0x81, 0x01, b'x'], DecodeError::Unmasked),
            (masked(0x09, b""), DecodeError::FragmentedControl),
            (masked(0x89, &[0; 126]), DecodeError::ControlTooLong(126)),
        ];
        for (wire, error) in cases {
            assert_eq!(decode(&mut BytesMut::from(&wire[..]), 1 << 20), Err(error));
        }
        // Control frames have their own limit, whatever is left of a message's allowance.
        let mut input = BytesMut::from(&masked(0x89, &[7; 125])[..]);
        let frame = decode(&mut input, 0).unwrap().unwrap();
        assert_eq!((frame.opcode, frame.payload.len()), (Opcode::Ping, 125));
    }

    #[test]
    fn frames_back_to_back() {
        let mut wire = masked(0x01, b"hel");
        wire.extend(masked(0x8A, b"p"));
        wire.extend(masked(0x80, b"lo"));
        let mut input = BytesMut::from(&wire[..]);
        let mut seen = Vec::new();
        while let Some(frame) = decode(&mut input, 10).unwrap() {
            seen.push((frame.fin, frame.opcode, frame.payload.to_vec()));
        }
        assert_eq!(
            seen,
            [
                (false, Opcode::Text, b"hel".to_vec()),
                (true, Opcode::Pong, b"p".to_vec()),
                (true, Opcode::Continuation, b"lo".to_vec()),
            ]
        );
    }
}
