//! Feeding the same stream in pieces must give exactly the outcomes (and the same "needs
//! more bytes" flag) as feeding it in one piece.
//!
//! The server's shortcut for messages of the common shape (`decode_simple`, used while
//! the decoder is idle) must give the same outcomes too.
//!
//! Input: byte 0 = number of cuts (low 3 bits) and, with bit 3 set, also feed the stream one
//! byte at a time; then 2 bytes (little endian) per cut, taken modulo the stream length + 1;
//! then limits and stream as in `middleman_fuzz::limits_and_stream`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use middleman_fuzz::{limits_and_stream, run, run_simple};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let cuts = usize::from(mode & 7);
    if rest.len() < 2 * cuts {
        return;
    }
    let (cut_bytes, rest) = rest.split_at(2 * cuts);
    let (limits, stream) = limits_and_stream(rest);

    let whole = run(limits, [stream]);

    let mut at: Vec<usize> = cut_bytes
        .chunks_exact(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % (stream.len() + 1))
        .collect();
    at.sort_unstable();
    let mut pieces = Vec::with_capacity(at.len() + 1);
    let mut from = 0;
    for &cut in &at {
        pieces.push(&stream[from..cut]); // repeated cuts give empty pieces: fine
        from = cut;
    }
    pieces.push(&stream[from..]);
    let split = run(limits, pieces.iter().copied());
    assert_eq!(whole, split, "split at {at:?} differs from one piece");
    // As the server reads frames, common messages straight from each piece.
    let simple = run_simple(limits, pieces.iter().copied());
    assert_eq!(whole, simple, "decode_simple at {at:?} differs from the decoder");

    if mode & 8 != 0 {
        let bytes = run(limits, stream.chunks(1));
        assert_eq!(whole, bytes, "byte at a time differs from one piece");
    }
});
