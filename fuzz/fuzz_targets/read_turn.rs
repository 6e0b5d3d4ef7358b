//! The reactor's WebSocket read turn (`conn::read_within`, the `FrameReader` and the
//! decoder drained frame by frame while the budget lasts, as `Server::ws_bytes` does),
//! driven over an in-memory stream that hands out arbitrary pieces: never a panic, no
//! turn reads more bytes or handles more messages than its budget allows, and the
//! frame reader finds the same data and the same end whatever the pieces.
//!
//! Input: byte 0 = byte budget per turn (x 64, at least 64); byte 1 = message budget per
//! turn (at least 1); byte 2 = most frames per message (at least 1); byte 3 = number of
//! piece sizes that follow (each one byte, 0 meaning "nothing now"); the rest is the
//! byte stream a client sends after the upgrade.
#![no_main]

use std::io::{self, Read};

use libfuzzer_sys::fuzz_target;
use middleman::conn::{read_within, Budget, READ_CHUNK};
use middleman::core::websocket::{FrameReader, WsError, WsEvent, WsLimits};
use middleman::protocol::{Decoded, Decoder, Limits};

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

/// What a whole stream reads as, in one piece: data bytes and the events in order
/// (data pieces merged per message), and how it ended.
fn whole(stream: &[u8], lim: &WsLimits) -> (Vec<u8>, Vec<String>, Option<WsError>) {
    let mut r = FrameReader::default();
    let mut buf = stream.to_vec();
    let mut pos = 0;
    let mut data = Vec::new();
    let mut events = Vec::new();
    loop {
        match r.next(&mut buf, &mut pos, lim) {
            Ok(Some(WsEvent::Data { range, last, .. })) => {
                data.extend_from_slice(&buf[range]);
                if last {
                    events.push("end".to_string());
                }
            }
            Ok(Some(ev)) => events.push(format!("{ev:?}")),
            Ok(None) => return (data, events, None),
            Err(e) => return (data, events, Some(e)),
        }
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
    let lim = WsLimits {
        max_message: 4096,
        max_frames,
    };
    let mut sock = Pieces {
        data: stream,
        sizes,
        next: 0,
        taken: 0,
    };
    let mut reader = FrameReader::default();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut dec = Decoder::new(Limits {
        max_message: 2048,
        max_line: 256,
        max_headers: 8,
    });
    let mut backlog = false;
    // What the turns found, to compare with the stream read whole.
    let mut got = Vec::new();
    let mut events = Vec::new();
    let mut end = None;
    // Every turn makes progress or ends the connection, so the stream is used up in at
    // most one turn per byte (plus one per piece that would block).
    'turns: for _turn in 0..(stream.len() + sizes.len() + 2) {
        let mut budget = Budget::new(bytes_per_turn, msgs_per_turn);
        let taken_before = sock.taken;
        let mut handled = 0usize;
        // Drain as much of the decoder as the budget allows; true when it is empty.
        let drain = |dec: &mut Decoder, budget: &mut Budget, handled: &mut usize| -> bool {
            while budget.msgs > 0 {
                match dec.next() {
                    Ok(Some(Decoded::Message(_) | Decoded::Malformed(_))) => {
                        budget.msgs -= 1;
                        *handled += 1;
                    }
                    Ok(None) => return true,
                    Err(_) => return true, // the connection would close
                }
            }
            false
        };
        if backlog {
            backlog = !drain(&mut dec, &mut budget, &mut handled);
        }
        while !backlog && end.is_none() {
            let n = match read_within(&mut sock, &mut buf, &mut budget) {
                Ok(0) => break 'turns,
                Ok(n) => n,
                Err(_) => break,
            };
            let mut pos = 0;
            loop {
                let frames = reader.frames;
                let ev = reader.next(&mut buf[..n], &mut pos, &lim);
                assert!(reader.frames >= frames);
                budget.msgs = budget.msgs.saturating_sub((reader.frames - frames) as usize);
                match ev {
                    Ok(Some(WsEvent::Data { range, last, .. })) => {
                        assert!(range.end <= n && range.start <= range.end);
                        got.extend_from_slice(&buf[range.clone()]);
                        if last {
                            events.push("end".to_string());
                        }
                        dec.feed(&buf[range]);
                        if !backlog {
                            backlog = !drain(&mut dec, &mut budget, &mut handled);
                        }
                    }
                    Ok(Some(ev)) => {
                        events.push(format!("{ev:?}"));
                        if matches!(ev, WsEvent::Close(_)) {
                            assert_eq!(reader.next(&mut buf[..n], &mut pos, &lim), Ok(None));
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        end = Some(e);
                        break;
                    }
                }
            }
            if end.is_none() {
                assert_eq!(pos, n, "a read is used up");
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
        if end.is_some() || (sock.data.is_empty() && !backlog) {
            break;
        }
    }
    // Whatever the pieces, the frame reader saw what it sees in the stream whole, up to
    // where the pieces stopped. (A frame that fails its UTF-8 check may have given its
    // first pieces when read in pieces: in one piece it gives none.)
    if sock.data.is_empty() || end.is_some() {
        let (w_data, w_events, w_end) = whole(&stream[..sock.taken], &lim);
        assert_eq!((&events, end), (&w_events, w_end));
        if end.is_some() {
            assert!(got.starts_with(&w_data));
        } else {
            assert_eq!(got, w_data);
        }
    }
});
