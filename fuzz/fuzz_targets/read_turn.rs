//! The reactor's WebSocket read turn (`conn::ws_step` plus the decoder drain), driven
//! over an in-memory stream that hands out arbitrary pieces: never a panic, and no turn
//! reads more bytes or handles more messages than its budget allows.
//!
//! Input: byte 0 = byte budget per turn (x 64, at least 64); byte 1 = message budget per
//! turn (at least 1); byte 2 = most frames per message (at least 1); byte 3 = number of
//! piece sizes that follow (each one byte, 0 meaning "nothing now"); the rest is the
//! byte stream a client sends after the upgrade.
#![no_main]

use std::io::{self, Read};

use libfuzzer_sys::fuzz_target;
use middleman::conn::{ws_step, Budget, FrameScan, Framing, OutQueue, Step};
use middleman::protocol::{Decoded, Decoder, Limits};
use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};
use tungstenite::Message;

/// A socket that returns the stream in the given piece sizes, `WouldBlock` for a
/// zero-size piece, and end of stream at the end.
struct Pieces<'a> {
    data: &'a [u8],
    sizes: &'a [u8],
    next: usize,
    taken: usize,
}

impl Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.data.is_empty() {
            return Ok(0);
        }
        let size = if self.sizes.is_empty() {
            self.data.len()
        } else {
            let s = self.sizes[self.next % self.sizes.len()];
            self.next += 1;
            if s == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            usize::from(s) * 7
        };
        let n = size.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        self.taken += n;
        Ok(n)
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let bytes_per_turn = usize::from(data[0]).max(1) * 64;
    let msgs_per_turn = usize::from(data[1]).max(1);
    let max_frames = usize::from(data[2]).max(1);
    let n_sizes = usize::from(data[3]);
    let rest = &data[4..];
    if rest.len() < n_sizes {
        return;
    }
    let (sizes, stream) = rest.split_at(n_sizes);
    let config = WebSocketConfig::default()
        .read_buffer_size(256)
        .write_buffer_size(0)
        .max_message_size(Some(4096))
        .max_frame_size(Some(4096));
    let mut ws = WebSocketContext::new(Role::Server, Some(config));
    let mut sock = Pieces {
        data: stream,
        sizes,
        next: 0,
        taken: 0,
    };
    let mut out = OutQueue::new(Framing::WebSocket);
    let mut scan = FrameScan::default();
    let mut rx = 0u64;
    let mut dec = Decoder::new(Limits {
        max_message: 2048,
        max_line: 256,
        max_headers: 8,
    });
    let mut backlog = false;
    // Every turn makes progress or ends the connection, so the stream is used up in at
    // most one turn per byte (plus one per piece that would block).
    for _turn in 0..(stream.len() + sizes.len() + 2) {
        let mut budget = Budget::new(bytes_per_turn, msgs_per_turn);
        let taken_before = sock.taken;
        let mut handled = 0usize;
        let mut done = false;
        loop {
            // Messages waiting in the decoder go first, one budget unit each.
            while backlog && budget.msgs > 0 {
                match dec.next() {
                    Ok(Some(Decoded::Message(_) | Decoded::Malformed(_))) => {
                        budget.msgs -= 1;
                        handled += 1;
                    }
                    Ok(None) => backlog = false,
                    Err(_) => {
                        done = true;
                        break;
                    }
                }
            }
            if done || backlog || budget.spent() {
                break;
            }
            let msgs_before = budget.msgs;
            match ws_step(
                &mut ws,
                &mut sock,
                &mut out,
                &mut rx,
                &mut scan,
                max_frames,
                &mut budget,
            ) {
                Step::Msg(Message::Text(t)) => {
                    dec.feed(t.as_bytes());
                    backlog = true;
                }
                Step::Msg(Message::Binary(b)) => {
                    dec.feed(&b);
                    backlog = true;
                }
                Step::Msg(Message::Close(_)) => done = true,
                Step::Msg(_) => {}
                Step::Blocked | Step::Spent => break,
                Step::TooManyFrames | Step::Error(_) => done = true,
            }
            assert!(budget.msgs <= msgs_before);
            if done {
                break;
            }
        }
        let read = sock.taken - taken_before;
        assert!(
            read <= bytes_per_turn,
            "read {read} bytes in a turn of {bytes_per_turn}"
        );
        assert!(
            handled <= msgs_per_turn,
            "{handled} messages in a turn of {msgs_per_turn}"
        );
        assert_eq!(rx, sock.taken as u64);
        if done || (sock.data.is_empty() && !backlog) {
            return;
        }
    }
});
