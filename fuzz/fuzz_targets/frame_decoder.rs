//! The WebSocket frame decoder reads bytes straight from strangers' sockets. Whatever they send, it must not
//! panic, must never hand over a data frame larger than the limit or a control frame over 125 bytes, and must
//! decide the same whether the bytes arrive at once or in small pieces (TCP may split them anywhere).
//!
//! Input layout: two bytes of payload limit, one byte of piece size, then the wire bytes.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use relayhub::transport::decoder::{self, DecodeError, MAX_CONTROL_PAYLOAD, Opcode};

type Decoded = (Vec<(bool, Opcode, Vec<u8>)>, Option<DecodeError>, usize);

fn decode_in_pieces(wire: &[u8], max: usize, piece: usize) -> Decoded {
    let mut input = BytesMut::new();
    let mut frames = Vec::new();
    for bytes in wire.chunks(piece) {
        input.extend_from_slice(bytes);
        loop {
            match decoder::decode(&mut input, max) {
                Ok(Some(frame)) => {
                    let limit = if frame.opcode.is_control() {
                        MAX_CONTROL_PAYLOAD
                    } else {
                        max
                    };
                    assert!(
                        frame.payload.len() <= limit,
                        "a frame over its limit was handed over"
                    );
                    assert!(
                        frame.fin || !frame.opcode.is_control(),
                        "a fragmented control frame"
                    );
                    frames.push((frame.fin, frame.opcode, frame.payload.to_vec()));
                }
                Ok(None) => break,
                Err(error) => return (frames, Some(error), input.len()),
            }
        }
    }
    (frames, None, input.len())
}

fuzz_target!(|data: &[u8]| {
    let [a, b, piece, wire @ ..] = data else {
        return;
    };
    let max = usize::from(u16::from_le_bytes([*a, *b]));
    let whole = decode_in_pieces(wire, max, wire.len().max(1));
    let split = decode_in_pieces(wire, max, usize::from(*piece).max(1));
    // With an error the bytes left over depend on where the pieces ended; everything before it must match.
    assert_eq!(
        whole.0, split.0,
        "frames differ when the input arrives in pieces"
    );
    assert_eq!(
        whole.1, split.1,
        "the verdict differs when the input arrives in pieces"
    );
    if whole.1.is_none() {
        assert_eq!(whole.2, split.2, "a different amount is left waiting");
    }
});
