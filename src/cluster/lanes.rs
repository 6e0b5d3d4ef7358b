//! What waits for nats-server, in two lanes: control (heartbeats, joins, enablement and
//! load announcements, request failures, interest changes, the NATS handshake) and data
//! (relayed messages, forwarded requests and their answers). Pure: the link hands
//! [`Lanes::write`] its socket.
//!
//! Control goes first: each write puts the control lane ahead of every data chunk not
//! yet started, so a heartbeat waits behind at most the rest of one data chunk
//! ([`CHUNK`] bytes plus one message), never behind the whole data backlog. The lanes
//! only switch between whole protocol operations: the control lane and every data chunk
//! hold complete operations, and a chunk begun is finished before control goes again.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

/// A data chunk is closed to new messages once it holds this many bytes.
pub const CHUNK: usize = 64 << 10;
/// Most pieces one write hands the kernel.
const MAX_SLICES: usize = 64;
/// Spare chunk buffers kept for reuse.
const KEEP_SPARE: usize = 4;

/// The two lanes. See the module documentation.
#[derive(Debug, Default)]
pub struct Lanes {
    ctl: Vec<u8>,
    ctl_sent: usize,
    data: VecDeque<Vec<u8>>,
    /// Bytes of the front data chunk already written.
    data_sent: usize,
    /// Unwritten bytes across the data chunks.
    data_len: usize,
    spare: Vec<Vec<u8>>,
    /// The last data operation may still grow ([`Lanes::push_data_open`]): the position
    /// its closure returned, in the last chunk. Forgotten at the next other operation
    /// and at every write.
    open: Option<usize>,
}

impl Lanes {
    /// Unwritten control bytes.
    pub fn ctl_len(&self) -> usize {
        self.ctl.len() - self.ctl_sent
    }

    /// Unwritten data bytes.
    pub fn data_len(&self) -> usize {
        self.data_len
    }

    /// Every unwritten byte.
    pub fn pending(&self) -> usize {
        self.ctl_len() + self.data_len
    }

    /// Nothing waits.
    pub fn is_empty(&self) -> bool {
        self.pending() == 0
    }

    /// Append one or more complete control operations through `f`.
    pub fn push_ctl<R>(&mut self, f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        f(&mut self.ctl)
    }

    /// Append one complete data operation through `f` (to the last chunk, or a new one
    /// when the last is full).
    pub fn push_data<R>(&mut self, f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        self.open = None;
        self.push_data_inner(f)
    }

    /// [`Lanes::push_data`] of an operation that may grow while it is the last one and
    /// nothing was written: `f` returns the position [`Lanes::extend_open`] will hand
    /// back (relative to the start of the chunk), or `None` if it wrote nothing.
    pub fn push_data_open(&mut self, f: impl FnOnce(&mut Vec<u8>) -> Option<usize>) -> bool {
        self.open = self.push_data_inner(f);
        self.open.is_some()
    }

    /// Grow the open operation through `f` (given the last chunk and the position
    /// `push_data_open` kept), if there is one and its chunk has room. False: there is
    /// none, and the caller pushes a new operation.
    pub fn extend_open(&mut self, f: impl FnOnce(&mut Vec<u8>, usize)) -> bool {
        let Some(at) = self.open else {
            return false;
        };
        let Some(chunk) = self.data.back_mut().filter(|c| c.len() < CHUNK) else {
            self.open = None;
            return false;
        };
        let before = chunk.len();
        f(chunk, at);
        self.data_len += chunk.len() - before;
        true
    }

    fn push_data_inner<R>(&mut self, f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        let need_new = self.data.back().is_none_or(|c| c.len() >= CHUNK);
        if need_new {
            let c = self.spare.pop().unwrap_or_default();
            self.data.push_back(c);
        }
        let Some(chunk) = self.data.back_mut() else {
            unreachable!("a chunk was pushed above")
        };
        let before = chunk.len();
        let r = f(chunk);
        self.data_len += chunk.len() - before;
        r
    }

    /// Drop everything (the connection is gone).
    pub fn clear(&mut self) {
        self.open = None;
        self.ctl.clear();
        self.ctl_sent = 0;
        while let Some(mut c) = self.data.pop_front() {
            self.recycle(&mut c);
        }
        self.data_sent = 0;
        self.data_len = 0;
        if self.ctl.capacity() > 4 << 20 {
            self.ctl = Vec::new();
        }
    }

    fn recycle(&mut self, c: &mut Vec<u8>) {
        if self.spare.len() < KEEP_SPARE && c.capacity() <= 4 * CHUNK {
            c.clear();
            self.spare.push(std::mem::take(c));
        }
    }

    /// One write of what waits, in lane order (see the module documentation). Returns
    /// the bytes written; `Ok(0)` only when nothing waits.
    pub fn write(&mut self, w: &mut impl Write) -> io::Result<usize> {
        if self.is_empty() {
            return Ok(0);
        }
        // What is written may include the open operation: it is closed now.
        self.open = None;
        let n = {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let mut k = 0;
            let mut chunks = self.data.iter();
            if self.data_sent > 0 {
                if let Some(front) = chunks.next() {
                    slices[k] = IoSlice::new(&front[self.data_sent..]);
                    k += 1;
                }
            }
            if self.ctl_sent < self.ctl.len() {
                slices[k] = IoSlice::new(&self.ctl[self.ctl_sent..]);
                k += 1;
            }
            for c in chunks {
                if k == MAX_SLICES {
                    break;
                }
                if !c.is_empty() {
                    slices[k] = IoSlice::new(c);
                    k += 1;
                }
            }
            w.write_vectored(&slices[..k])?
        };
        self.consume(n);
        Ok(n)
    }

    /// Mark `n` bytes written, in the order [`Lanes::write`] laid them out.
    fn consume(&mut self, mut n: usize) {
        if self.data_sent > 0 {
            n = self.consume_front(n);
        }
        let c = n.min(self.ctl.len() - self.ctl_sent);
        self.ctl_sent += c;
        n -= c;
        if self.ctl_sent == self.ctl.len() {
            self.ctl.clear();
            self.ctl_sent = 0;
            if self.ctl.capacity() > 4 << 20 {
                self.ctl = Vec::new();
            }
        } else if self.ctl_sent > (1 << 20) && self.ctl_sent * 2 > self.ctl.len() {
            self.ctl.drain(..self.ctl_sent);
            self.ctl_sent = 0;
        }
        while n > 0 && !self.data.is_empty() {
            n = self.consume_front(n);
        }
    }

    /// Consume up to `n` bytes of the front chunk; returns what is left of `n`.
    fn consume_front(&mut self, n: usize) -> usize {
        let Some(front) = self.data.front() else {
            return n;
        };
        let left = front.len() - self.data_sent;
        let c = n.min(left);
        self.data_sent += c;
        self.data_len -= c;
        if c == left {
            if let Some(mut done) = self.data.pop_front() {
                self.recycle(&mut done);
            }
            self.data_sent = 0;
        }
        n - c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_operation_grows_until_anything_else_comes_or_a_write() {
        let mut l = Lanes::default();
        assert!(!l.extend_open(|_, _| unreachable!()));
        assert!(l.push_data_open(|b| {
            b.extend_from_slice(b"[a");
            Some(1)
        }));
        assert!(l.extend_open(|b, at| {
            assert_eq!(b[at], b'a');
            b.extend_from_slice(b"b");
        }));
        assert_eq!(l.data_len(), 3);
        l.push_ctl(|b| b.extend_from_slice(b"<ctl>")); // control does not close it
        assert!(l.extend_open(|b, _| b.extend_from_slice(b"c")));
        l.push_data(|b| b.extend_from_slice(b"]"));
        assert!(
            !l.extend_open(|_, _| unreachable!()),
            "another operation came"
        );
        assert!(l.push_data_open(|b| {
            b.extend_from_slice(b"[d");
            Some(0)
        }));
        let mut out = Vec::new();
        l.write(&mut out).unwrap();
        assert!(!l.extend_open(|_, _| unreachable!()), "written");
        assert_eq!(out, b"<ctl>[abc][d");
        assert!(!l.push_data_open(|_| None));
    }

    /// A sink that takes at most `cap` bytes per write, or refuses (`WouldBlock`) when
    /// `cap` is 0.
    struct Trickle {
        got: Vec<u8>,
        cap: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(b)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            if self.cap == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.cap - n);
                self.got.extend_from_slice(&b[..take]);
                n += take;
                if n == self.cap {
                    break;
                }
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn op(tag: u8, i: usize, len: usize) -> Vec<u8> {
        let mut v = format!("{}{i:05}:", tag as char).into_bytes();
        v.resize(len, tag);
        v.push(b'\n');
        v
    }

    fn ops(bytes: &[u8]) -> Vec<&[u8]> {
        bytes.split_inclusive(|&b| b == b'\n').collect()
    }

    #[test]
    fn control_overtakes_the_data_backlog_but_never_splits_an_operation() {
        let mut l = Lanes::default();
        for i in 0..200 {
            l.push_data(|b| b.extend_from_slice(&op(b'd', i, 2000)));
        }
        assert_eq!(l.data_len(), 200 * 2001);
        let mut sink = Trickle {
            got: Vec::new(),
            cap: 3000,
        };
        l.write(&mut sink).unwrap(); // into the first chunk
        l.push_ctl(|b| b.extend_from_slice(&op(b'c', 0, 50)));
        while !l.is_empty() {
            l.write(&mut sink).unwrap();
        }
        let got = ops(&sink.got);
        assert_eq!(got.len(), 201);
        for g in &got {
            assert!(g.len() == 2001 || g.len() == 51, "an operation was split");
        }
        let at = got.iter().position(|g| g[0] == b'c').unwrap();
        // The control operation went right after the chunk that had begun (33 ops of
        // 2001 bytes close a 64 KiB chunk), not after the 200 data operations.
        assert_eq!(at, CHUNK.div_ceil(2001));
        let data: Vec<_> = got.iter().filter(|g| g[0] == b'd').collect();
        for (i, d) in data.iter().enumerate() {
            assert_eq!(**d, &op(b'd', i, 2000)[..], "data in order");
        }
    }

    #[test]
    fn refused_and_partial_writes_keep_both_streams_whole_and_in_order() {
        let mut l = Lanes::default();
        let mut sink = Trickle {
            got: Vec::new(),
            cap: 0,
        };
        let (mut c, mut d) = (0, 0);
        for round in 0..500usize {
            for _ in 0..round % 7 {
                l.push_data(|b| b.extend_from_slice(&op(b'd', d, 100 + d % 900)));
                d += 1;
            }
            if round % 3 == 0 {
                l.push_ctl(|b| b.extend_from_slice(&op(b'c', c, 10 + c % 40)));
                c += 1;
            }
            sink.cap = [0, 1, 7, 333, 5000][round % 5];
            match l.write(&mut sink) {
                Ok(_) => {}
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock),
            }
        }
        sink.cap = 1 << 20;
        while !l.is_empty() {
            l.write(&mut sink).unwrap();
        }
        assert_eq!(l.pending(), 0);
        let got = ops(&sink.got);
        let cs: Vec<_> = got.iter().filter(|g| g[0] == b'c').collect();
        let ds: Vec<_> = got.iter().filter(|g| g[0] == b'd').collect();
        assert_eq!((cs.len(), ds.len()), (c, d));
        for (i, g) in cs.iter().enumerate() {
            assert_eq!(**g, &op(b'c', i, 10 + i % 40)[..]);
        }
        for (i, g) in ds.iter().enumerate() {
            assert_eq!(**g, &op(b'd', i, 100 + i % 900)[..]);
        }
    }

    #[test]
    fn clear_drops_everything_and_keeps_a_few_buffers() {
        let mut l = Lanes::default();
        for i in 0..100 {
            l.push_data(|b| b.extend_from_slice(&op(b'd', i, 4000)));
        }
        l.push_ctl(|b| b.extend_from_slice(b"PING\r\n"));
        l.clear();
        assert!(l.is_empty() && l.data.is_empty() && l.spare.len() <= KEEP_SPARE);
    }
}
