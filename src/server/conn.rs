//! Per-connection I/O pieces: the outbound queue, the bounded read of a read turn, and
//! the stream adapter through which tungstenite writes control frames into that queue.
//!
//! tungstenite's [`WebSocketContext`](tungstenite::protocol::WebSocketContext) takes the
//! stream by `&mut` on every call. We give it an [`Io`] that appends every write (pongs,
//! close frames, pings) to the connection's [`OutQueue`], so control frames and the data
//! frames we queue ourselves leave in one order, and tungstenite never sees `WouldBlock`
//! on write. Frames are read by [`crate::core::websocket::FrameReader`].

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::rc::Rc;

use crate::protocol::encode::packets_epoch;
use crate::protocol::{Packet, PacketPool, Spent};

/// How a packet goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Framing {
    /// As a WebSocket frame (header + payload).
    #[default]
    WebSocket,
    /// As bare protocol bytes (the raw stream transports).
    Raw,
}

/// The bytes of a queued packet in `framing`: a shared packet as a whole WebSocket frame
/// (or its bare payload on a raw stream); bytes queued verbatim as they are.
fn chunk_bytes(p: &Packet, framing: Framing) -> &[u8] {
    match framing {
        Framing::WebSocket => p.ws_frame(),
        Framing::Raw => p.payload(),
    }
}

/// Queue slots kept when the queue empties (more are released): 512 bytes, so an idle
/// connection that once took a burst stays small.
const KEEP_SLOTS: usize = 64;

/// Most pieces handed to one `writev`.
const MAX_IOV: usize = 256;

/// Chunks up to this size are copied into a [`Stage`] buffer of [`STAGE_BYTES`] and
/// handed to the kernel together: each piece of a `writev` costs the kernel a user-copy
/// set-up of its own, and with packets of 100 bytes `_copy_from_iter` was 22% of the
/// server's time (100 publishers, 10 subscribers each). Copying a 1 KiB packet once more
/// in user space costs less than its own piece too: staging chunks up to 16 KiB (was
/// 512 B) in 64 KiB (was 16 KiB on the stack) measured +24% deliveries per CPU-second at
/// 1 KiB x100, +30% at 64 B x100 and +12% with a deep pipeline to one subscriber (AMD
/// EPYC, 3 rounds each). Larger chunks are not copied twice.
const STAGE_CHUNK_MAX: usize = 16 << 10;
const STAGE_BYTES: usize = 64 << 10;
/// Small chunks at the front of the queue that make staging worth it (a queue of one or
/// two packets, a fixed light load, goes piece by piece).
const STAGE_MIN_RUN: usize = 8;

/// The staging buffer writes copy small chunks into (see [`STAGE_CHUNK_MAX`]): one per
/// server, lent to each write, never cleared (a stack array was zeroed on every write).
///
/// It remembers what it was filled from: the chunks walked (their addresses, from the
/// front of a queue none of whose bytes were written yet), the framing and the
/// [`packets_epoch`] then. The next write whose queue starts with the same chunks (a
/// fan-out's subscribers, written one after another, hold the same packets in the same
/// order) reuses those bytes instead of copying them again; the epoch moves whenever a
/// packet is made or changed, so an address cannot have come to hold other bytes.
#[derive(Debug, Default)]
pub struct Stage {
    buf: Vec<u8>,
    made_of: Vec<usize>,
    framing: Framing,
    epoch: u64,
}

/// A piece of one `writev`: staged bytes `[from, to)`, or the chunk at an index.
#[derive(Clone, Copy)]
enum Seg {
    Staged(usize, usize),
    Chunk(usize),
}

/// A connection's outbound queue: owned bytes and shared packets, written with `writev`.
#[derive(Debug, Default)]
pub struct OutQueue {
    framing: Framing,
    /// Shared packets and verbatim bytes ([`Packet::verbatim`]): one pointer a slot, so
    /// a pass that queues many packets on many connections touches few cache lines.
    chunks: VecDeque<Rc<Packet>>,
    /// Bytes of the front chunk already written.
    head_written: usize,
    /// Bytes queued and not yet written.
    len: usize,
    /// Bytes ever written (a position in the stream).
    written_total: u64,
    /// Stream positions at which queued pongs end; those not yet reached are unsent.
    pong_ends: VecDeque<u64>,
}

/// Queued bytes go on in the last chunk while it holds less than this; then a new chunk.
const BYTES_CHUNK: usize = 16 << 10;
/// Slack a chunk of queued bytes may keep past a quarter of what it holds (see
/// [`OutQueue::trim`]).
const SLACK_MAX: usize = 4 << 10;

impl OutQueue {
    /// An empty queue writing packets with `framing`.
    pub fn new(framing: Framing) -> OutQueue {
        OutQueue {
            framing,
            ..Default::default()
        }
    }

    /// Bytes `p` takes in this queue.
    pub fn packet_len(&self, p: &Packet) -> usize {
        chunk_bytes(p, self.framing).len()
    }

    /// Bytes waiting to be written.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queue a shared packet as a WebSocket frame.
    pub fn push_packet(&mut self, p: &Rc<Packet>) {
        self.len += self.packet_len(p);
        self.chunks.push_back(p.clone());
    }

    /// Queue owned bytes (appended to the last chunk when that is owned bytes too).
    pub fn push_bytes(&mut self, b: &[u8]) {
        if b.is_empty() {
            return;
        }
        self.append(None, |buf| buf.extend_from_slice(b));
    }

    /// Queue one message built in place at the end of the queue's own bytes: `fill`
    /// appends its protocol bytes (at most `bound`, `utf8` if known to be UTF-8), which
    /// go out in a frame of their own (bare on a raw stream). Nothing is shared, and
    /// small messages queued together are written as one piece with no second copy.
    /// A new chunk, if one is needed, is one `pool` kept. Returns the bytes queued.
    pub fn push_built(
        &mut self,
        pool: &mut PacketPool,
        bound: usize,
        utf8: bool,
        fill: impl FnOnce(&mut Vec<u8>),
    ) -> usize {
        let framing = self.framing;
        self.append(Some(pool), |buf| match framing {
            Framing::WebSocket => crate::protocol::encode::append_frame(buf, bound, utf8, fill),
            Framing::Raw => fill(buf),
        })
    }

    /// Append to the queue's own bytes with `f` (a new chunk from `pool` if it has
    /// one); the bytes it appended.
    fn append(&mut self, pool: Option<&mut PacketPool>, f: impl FnOnce(&mut Vec<u8>)) -> usize {
        let n = match self.tail_bytes(pool) {
            Some(buf) => {
                let before = buf.len();
                f(buf);
                buf.len() - before
            }
            None => {
                // Not reached (the back chunk is one just checked or pushed); were it,
                // the bytes go in a chunk of their own.
                let mut v = Vec::new();
                f(&mut v);
                self.chunks.push_back(Rc::new(Packet::verbatim(&v)));
                v.len()
            }
        };
        self.len += n;
        n
    }

    /// The bytes of the last chunk to append to: that chunk when it is queued bytes held
    /// only here with room, else a new one (from `pool`, if it kept one).
    fn tail_bytes(&mut self, pool: Option<&mut PacketPool>) -> Option<&mut Vec<u8>> {
        let open = self.chunks.back_mut().is_some_and(|last| {
            last.is_verbatim() && last.payload().len() < BYTES_CHUNK && Rc::get_mut(last).is_some()
        });
        if !open {
            let fresh = pool.and_then(PacketPool::take_bytes);
            self.chunks
                .push_back(fresh.unwrap_or_else(|| Rc::new(Packet::verbatim(&[]))));
        }
        let last = self.chunks.back_mut().and_then(Rc::get_mut);
        last.and_then(Packet::verbatim_bytes)
    }

    /// Queue a pong frame, remembering where it ends so [`OutQueue::pongs_unsent`] can
    /// tell how many the peer has not been sent yet (a peer that pings and never reads).
    pub fn push_pong(&mut self, b: &[u8]) {
        self.push_bytes(b);
        self.pong_ends
            .push_back(self.written_total + self.len as u64);
    }

    /// Pongs queued and not yet fully written to the socket.
    pub fn pongs_unsent(&self) -> usize {
        self.pong_ends.len()
    }

    /// Give back the slots a burst left behind, if the queue is empty. Called from time
    /// to time (not after every write: a busy connection empties its queue every pass,
    /// and shrinking it then only to grow it again next pass cost allocations).
    pub fn trim(&mut self) {
        if self.chunks.is_empty() && self.chunks.capacity() > KEEP_SLOTS {
            self.chunks.shrink_to(KEEP_SLOTS);
        }
        if self.pong_ends.is_empty() && self.pong_ends.capacity() > 0 {
            self.pong_ends = VecDeque::new();
        }
        // Queued bytes in a chunk much larger than they are (grown by doubling, or one
        // the pool gave back, for a peer that then stopped reading): the chunk is cut to
        // size, so a slow peer's queue holds about what the cap counts, not twice that.
        for c in self.chunks.iter_mut() {
            if let Some(bytes) = Rc::get_mut(c).and_then(Packet::verbatim_bytes) {
                if bytes.capacity() > bytes.len() + bytes.len() / 4 + SLACK_MAX {
                    bytes.shrink_to_fit();
                }
            }
        }
    }

    /// Drop everything not yet started, keeping a partly written front chunk so the
    /// stream stays well framed (used when cutting off a slow consumer). A chunk of
    /// queued bytes is kept whole: the frames after the part written (up to about
    /// `BYTES_CHUNK`, counted under the cap when queued) still go before the close.
    pub fn drop_unsent(&mut self) {
        let keep = usize::from(self.head_written > 0);
        while self.chunks.len() > keep {
            if let Some(c) = self.chunks.pop_back() {
                self.len -= chunk_bytes(&c, self.framing).len();
            }
        }
        self.chunks.shrink_to_fit();
        self.pong_ends.clear();
    }

    /// Write as much as the socket takes. Returns the bytes written; `WouldBlock` is not
    /// an error (the rest stays queued).
    pub fn write_to<W: Write>(&mut self, w: &mut W, stage: &mut Stage) -> io::Result<usize> {
        self.write_inner(w, None, stage)
    }

    /// [`OutQueue::write_to`], offering each packet written out to `spent` (the pool
    /// takes those nobody else holds at the end of the pass).
    pub fn write_recycling<W: Write>(
        &mut self,
        w: &mut W,
        spent: &mut Spent,
        stage: &mut Stage,
    ) -> io::Result<usize> {
        self.write_inner(w, Some(spent), stage)
    }

    fn write_inner<W: Write>(
        &mut self,
        w: &mut W,
        mut spent: Option<&mut Spent>,
        stage: &mut Stage,
    ) -> io::Result<usize> {
        let mut total = 0;
        while self.len > 0 {
            // Staging pays when the queue starts with a run of small chunks; a queue of
            // a few packets (a fixed, light load) or of large ones goes piece by piece.
            let small = |c: &Rc<Packet>| chunk_bytes(c, self.framing).len() <= STAGE_CHUNK_MAX;
            let staged = self.chunks.len() >= STAGE_MIN_RUN
                && self.chunks.iter().take(STAGE_MIN_RUN).all(small);
            // The arrays below are cleared on every call: sized to the queue, not to the
            // largest write (see STAGE_MIN_RUN).
            let res = match (staged, self.chunks.len()) {
                (true, n) if n <= 32 => self.write_staged::<32, W>(w, stage),
                (true, _) => self.write_staged::<MAX_IOV, W>(w, stage),
                (false, n) if n <= STAGE_MIN_RUN => self.write_first::<STAGE_MIN_RUN, W>(w),
                (false, _) => self.write_first::<MAX_IOV, W>(w),
            };
            let written = match res {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            total += written;
            self.advance(written, spent.as_deref_mut());
        }
        Ok(total)
    }

    /// The front of the queue (the first chunk from `head_written`), chunk `i`'s bytes.
    fn piece(&self, i: usize) -> &[u8] {
        let b = chunk_bytes(&self.chunks[i], self.framing);
        if i == 0 {
            &b[self.head_written..]
        } else {
            b
        }
    }

    /// One `writev` of the first `N` chunks (or all, if fewer), each its own piece.
    fn write_first<const N: usize, W: Write>(&self, w: &mut W) -> io::Result<usize> {
        let mut iov: [IoSlice<'_>; N] = [IoSlice::new(&[]); N];
        let n = self.chunks.len().min(N);
        for (i, slot) in iov.iter_mut().enumerate().take(n) {
            *slot = IoSlice::new(self.piece(i));
        }
        w.write_vectored(&iov[..n])
    }

    /// One `writev` in which runs of small chunks are copied into the staging buffer (at
    /// most [`STAGE_BYTES`]) and go to the kernel as one piece; larger chunks as pieces of
    /// their own; at most `N` pieces.
    fn write_staged<const N: usize, W: Write>(
        &self,
        w: &mut W,
        stage: &mut Stage,
    ) -> io::Result<usize> {
        const B: usize = STAGE_BYTES;
        let epoch = packets_epoch();
        // How many of the chunks the buffer was filled from may still be what it holds.
        let mut same =
            if self.head_written == 0 && stage.epoch == epoch && stage.framing == self.framing {
                stage.made_of.len()
            } else {
                0
            };
        let (buf, made_of) = (&mut stage.buf, &mut stage.made_of);
        buf.reserve_exact(B.saturating_sub(buf.len())); // once per server: the buffer is kept
        let mut filled = 0;
        let mut walked = 0;
        let mut segs = [Seg::Staged(0, 0); N];
        let mut n = 0;
        let mut staging = false;
        for i in 0..self.chunks.len() {
            let b = self.piece(i);
            let at = Rc::as_ptr(&self.chunks[i]) as usize;
            if i < same && made_of[i] != at {
                same = i;
            }
            if b.len() <= STAGE_CHUNK_MAX && filled + b.len() <= B {
                if !staging {
                    if n == N {
                        break;
                    }
                    segs[n] = Seg::Staged(filled, filled);
                    n += 1;
                    staging = true;
                }
                // The same chunks so far, so the same bytes at the same place.
                if i >= same {
                    buf.truncate(filled);
                    buf.extend_from_slice(b);
                }
                filled += b.len();
                if let Some(Seg::Staged(_, end)) = segs.get_mut(n - 1) {
                    *end = filled;
                }
            } else {
                if n == N {
                    break;
                }
                segs[n] = Seg::Chunk(i);
                n += 1;
                staging = false;
            }
            match made_of.get_mut(i) {
                Some(m) => *m = at,
                None => made_of.push(at),
            }
            walked = i + 1;
        }
        // What the buffer now holds, for the next write (nothing to reuse when the first
        // chunk was staged from the middle).
        buf.truncate(filled);
        made_of.truncate(if self.head_written == 0 { walked } else { 0 });
        stage.epoch = epoch;
        stage.framing = self.framing;
        let mut iov: [IoSlice<'_>; N] = [IoSlice::new(&[]); N];
        for (slot, seg) in iov.iter_mut().zip(&segs[..n]) {
            *slot = IoSlice::new(match *seg {
                Seg::Staged(from, to) => &stage.buf[from..to],
                Seg::Chunk(i) => self.piece(i),
            });
        }
        w.write_vectored(&iov[..n])
    }

    fn advance(&mut self, mut n: usize, mut spent: Option<&mut Spent>) {
        self.len -= n;
        self.written_total += n as u64;
        while self
            .pong_ends
            .front()
            .is_some_and(|&e| e <= self.written_total)
        {
            self.pong_ends.pop_front();
        }
        while n > 0 {
            let Some(front) = self.chunks.front() else {
                break;
            };
            let left = chunk_bytes(front, self.framing).len() - self.head_written;
            if n >= left {
                n -= left;
                self.head_written = 0;
                if let (Some(p), Some(sp)) = (self.chunks.pop_front(), spent.as_mut()) {
                    sp.offer(p);
                }
            } else {
                self.head_written += n;
                n = 0;
            }
        }
    }
}

/// Work one connection may do in one pass of the loop: bytes read from its socket and
/// protocol messages handled. Spent, the connection waits for the next pass (it goes on
/// the `again` list), so no peer can hold the loop, whatever it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Bytes that may still be read from the socket (after TLS: plaintext bytes).
    pub bytes: usize,
    /// Messages (WebSocket messages, control frames, protocol messages) still allowed.
    pub msgs: usize,
}

impl Budget {
    /// A fresh budget for one turn.
    pub fn new(bytes: usize, msgs: usize) -> Budget {
        Budget { bytes, msgs }
    }
    /// Nothing left: stop and come back next pass.
    pub fn spent(&self) -> bool {
        self.bytes == 0 || self.msgs == 0
    }
}

/// Bytes one read of a WebSocket read turn may take (the reactor's read buffer).
pub const READ_CHUNK: usize = 16 << 10;

/// One read of a read turn: at most [`READ_CHUNK`] bytes and what the turn's byte budget
/// still allows (which it lowers), into `buf`. `WouldBlock` when the budget is spent.
pub fn read_within<S: Read>(
    sock: &mut S,
    buf: &mut [u8],
    budget: &mut Budget,
) -> io::Result<usize> {
    if budget.spent() {
        return Err(io::ErrorKind::WouldBlock.into());
    }
    let cap = buf.len().min(budget.bytes).min(READ_CHUNK);
    let n = sock.read(&mut buf[..cap])?;
    budget.bytes -= n;
    Ok(n)
}

/// The stream handed to tungstenite when it writes a control frame (pong, ping, close):
/// the bytes go to the connection's outbound queue, behind what is already there.
pub struct Io<'a> {
    /// The connection's outbound queue.
    pub out: &'a mut OutQueue,
}

impl<'a> Io<'a> {
    /// An adapter that appends to `out`.
    pub fn writer(out: &'a mut OutQueue) -> Self {
        Io { out }
    }
}

/// tungstenite's stream must also read; it never does (our reader reads).
impl Read for Io<'_> {
    fn read(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
}

impl Write for Io<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // tungstenite writes one whole frame per call (its write buffer is 0): a pong
        // is recognised by its first byte and counted until it is on the wire.
        if buf.first() == Some(&0x8A) {
            self.out.push_pong(buf);
        } else {
            self.out.push_bytes(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `cap` bytes per call.
    struct Trickle {
        got: Vec<u8>,
        cap: usize,
        calls: usize,
    }
    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.calls += 1;
            if self.calls.is_multiple_of(3) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.cap);
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn partial_writes_keep_order() {
        let mut q = OutQueue::default();
        let p = Rc::new(Packet::raw(b"hello"));
        let mut expect = Vec::new();
        for i in 0..50u8 {
            q.push_bytes(&[i; 3]);
            expect.extend_from_slice(&[i; 3]);
            q.push_packet(&p);
            expect.extend_from_slice(p.ws_frame());
        }
        let mut w = Trickle {
            got: Vec::new(),
            cap: 5,
            calls: 0,
        };
        write_out(&mut q, &mut w);
        assert_eq!(w.got, expect);
    }

    /// Write the queue out, a write call at a time (bounded), until it is empty.
    fn write_out(q: &mut OutQueue, w: &mut impl Write) {
        for _ in 0..100_000 {
            if q.is_empty() {
                break;
            }
            q.write_to(w, &mut Stage::default()).unwrap();
        }
        assert!(q.is_empty());
    }

    /// A socket: takes up to `caps[k]` bytes across the slices of the k-th write.
    struct Vectored {
        got: Vec<u8>,
        caps: Vec<usize>,
        calls: usize,
        most_pieces: usize,
    }
    impl Write for Vectored {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            let mut cap = self.caps[self.calls % self.caps.len()];
            self.calls += 1;
            if cap == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.most_pieces = self.most_pieces.max(bufs.len());
            let mut n = 0;
            for b in bufs {
                let k = b.len().min(cap);
                self.got.extend_from_slice(&b[..k]);
                n += k;
                cap -= k;
                if cap == 0 {
                    break;
                }
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn small_chunks_are_staged_and_the_stream_keeps_its_order() {
        // Small packets (staged), a mid-size one (its own piece), a large one, bytes,
        // more than one staging buffer and more than MAX_IOV chunks in all.
        let small = Rc::new(Packet::raw(&[b's'; 90]));
        let mid = Rc::new(Packet::raw(&[b'm'; STAGE_CHUNK_MAX + 1]));
        let large = Rc::new(Packet::raw(&[b'L'; 40_000]));
        for caps in [vec![usize::MAX], vec![7, 0, 1000, 3, 0, 70_000]] {
            let mut q = OutQueue::default();
            let mut expect = Vec::new();
            for i in 0..900usize {
                let p = match i % 300 {
                    150 => &large,
                    k if k % 50 == 7 => &mid,
                    _ => &small,
                };
                q.push_packet(p);
                expect.extend_from_slice(p.ws_frame());
                if i % 97 == 0 {
                    q.push_bytes(&[b'b', i as u8]);
                    expect.extend_from_slice(&[b'b', i as u8]);
                }
            }
            let mut w = Vectored {
                got: Vec::new(),
                caps,
                calls: 0,
                most_pieces: 0,
            };
            write_out(&mut q, &mut w);
            assert_eq!(w.got.len(), expect.len());
            assert!(w.got == expect, "the stream changed");
            assert!(w.most_pieces <= MAX_IOV);
        }
        // A whole burst of small packets goes in few pieces: 100 packets, one piece.
        let mut q = OutQueue::default();
        for _ in 0..100 {
            q.push_packet(&small);
        }
        let mut w = Vectored {
            got: Vec::new(),
            caps: vec![usize::MAX],
            calls: 0,
            most_pieces: 0,
        };
        let mut stage = Stage::default();
        q.write_to(&mut w, &mut stage).unwrap();
        assert_eq!((w.calls, w.most_pieces), (1, 1));
        assert_eq!(w.got.len(), 100 * small.ws_frame().len());
        // 1 KiB packets are staged too: of 70, the 63 the buffer holds go as one piece
        // and the other 7 as pieces of their own, all in one write.
        let kib = Rc::new(Packet::raw(&[b'k'; 1024]));
        for _ in 0..70 {
            q.push_packet(&kib);
        }
        w.got.clear();
        q.write_to(&mut w, &mut stage).unwrap();
        let staged = STAGE_BYTES / kib.ws_frame().len();
        assert_eq!(staged, 63, "the buffer holds 63 frames of 1 KiB");
        assert_eq!((w.calls, w.most_pieces), (2, 8));
        assert_eq!(w.got.len(), 70 * kib.ws_frame().len());
        assert!(q.is_empty());
    }

    #[test]
    fn messages_built_in_place_keep_the_stream_and_reuse_chunks() {
        // Built messages between shared packets and bytes, on both framings, through
        // partial writes: the stream is what packets of the same payloads would give.
        let shared = Rc::new(Packet::raw(b"shared"));
        for framing in [Framing::WebSocket, Framing::Raw] {
            for caps in [vec![usize::MAX], vec![7, 0, 1000, 3, 0, 70_000]] {
                let mut pool = PacketPool::new();
                let mut spent = Spent::default();
                let mut q = OutQueue::new(framing);
                let mut expect = Vec::new();
                let mut queued = 0;
                for i in 0..2000usize {
                    // Text and binary payloads; bounds exact, short (the frame header's
                    // size guessed too small) and long (guessed too large).
                    let byte = if i % 5 == 0 {
                        0xff
                    } else {
                        b'a' + (i % 26) as u8
                    };
                    let payload = vec![byte; i % 300];
                    let bound = match i % 3 {
                        0 => payload.len(),
                        1 => payload.len() / 2,
                        _ => payload.len() + 200,
                    };
                    let utf8 = byte != 0xff && i % 2 == 0;
                    let n = q.push_built(&mut pool, bound, utf8, |b| b.extend_from_slice(&payload));
                    let p = Packet::raw(&payload);
                    expect.extend_from_slice(chunk_bytes(&p, framing));
                    assert_eq!(n, chunk_bytes(&p, framing).len());
                    queued += n;
                    if i % 7 == 0 {
                        q.push_packet(&shared);
                        expect.extend_from_slice(chunk_bytes(&shared, framing));
                        queued += q.packet_len(&shared);
                    }
                    if i % 11 == 0 {
                        q.push_pong(b"pong");
                        expect.extend_from_slice(b"pong");
                        queued += 4;
                    }
                }
                assert_eq!(q.len(), queued);
                // Consecutive built messages share chunks of about BYTES_CHUNK.
                assert!(q.chunks.len() < 2000 / 7 * 2 + 2000 / 11 * 2 + queued / BYTES_CHUNK + 2);
                let mut w = Vectored {
                    got: Vec::new(),
                    caps,
                    calls: 0,
                    most_pieces: 0,
                };
                let mut stage = Stage::default();
                for _ in 0..100_000 {
                    if q.is_empty() {
                        break;
                    }
                    q.write_recycling(&mut w, &mut spent, &mut stage).unwrap();
                }
                assert!(q.is_empty());
                assert!(w.got == expect, "the stream changed");
                // The chunks written out come back through the pool, emptied, and the
                // next message goes in one of them.
                pool.recycle(&mut spent);
                let kept = pool.take_bytes().expect("a chunk kept");
                let cap = kept.capacity();
                assert!(kept.payload().is_empty());
                spent.offer(kept);
                pool.recycle(&mut spent);
                q.push_built(&mut pool, 5, true, |b| b.extend_from_slice(b"again"));
                assert_eq!(q.chunks.len(), 1);
                assert_eq!(q.chunks[0].capacity(), cap);
            }
        }
    }

    #[test]
    fn a_slow_peers_built_chunk_is_kept_whole_then_the_close_and_cut_to_size() {
        let mut pool = PacketPool::new();
        let mut q = OutQueue::new(Framing::WebSocket);
        let mut frames = Vec::new();
        for i in 0..40u8 {
            q.push_built(&mut pool, 20, true, |b| {
                b.extend_from_slice(&[b'a' + i % 26; 20])
            });
            frames.extend_from_slice(Packet::raw(&[b'a' + i % 26; 20]).ws_frame());
        }
        // A frame and a half written, then the peer stops reading and is cut off.
        let mut w = Vectored {
            got: Vec::new(),
            caps: vec![33, 0],
            calls: 0,
            most_pieces: 0,
        };
        q.write_to(&mut w, &mut Stage::default()).unwrap();
        assert_eq!(w.got.len(), 33);
        q.drop_unsent();
        q.push_bytes(b"close");
        assert_eq!(q.len(), frames.len() - 33 + 5, "the chunk is kept whole");
        w.caps = vec![usize::MAX];
        q.write_to(&mut w, &mut Stage::default()).unwrap();
        frames.extend_from_slice(b"close");
        assert!(w.got == frames, "every frame whole, then the close");
        // A chunk the pool gave back, far larger than the one message a peer that
        // stopped reading holds: cut to size by trim.
        let mut big = Rc::new(Packet::verbatim(&[0; 60_000]));
        Rc::get_mut(&mut big).unwrap().clear_verbatim();
        let mut spent = Spent::default();
        spent.offer(big);
        pool.recycle(&mut spent);
        let mut q = OutQueue::new(Framing::WebSocket);
        q.push_built(&mut pool, 5, true, |b| b.extend_from_slice(b"hello"));
        assert!(
            q.chunks[0].capacity() >= 60_000,
            "the pool's chunk was taken"
        );
        q.trim();
        assert!(q.chunks[0].capacity() < 100, "{}", q.chunks[0].capacity());
        assert_eq!(q.chunks[0].ws_frame(), Packet::raw(b"hello").ws_frame());
    }

    #[test]
    fn staged_bytes_are_reused_only_for_the_same_packets_unchanged() {
        let pkts: Vec<Rc<Packet>> = (0..12u8)
            .map(|i| Rc::new(Packet::raw(&[b'a' + i; 90])))
            .collect();
        let queue = |ps: &[Rc<Packet>]| {
            let mut q = OutQueue::default();
            for p in ps {
                q.push_packet(p);
            }
            q
        };
        let frames = |ps: &[Rc<Packet>]| {
            ps.iter()
                .flat_map(|p| p.ws_frame().to_vec())
                .collect::<Vec<u8>>()
        };
        let mut stage = Stage::default();
        let write = |q: &mut OutQueue, stage: &mut Stage| {
            let mut w = Vectored {
                got: Vec::new(),
                caps: vec![usize::MAX],
                calls: 0,
                most_pieces: 0,
            };
            q.write_to(&mut w, stage).unwrap();
            assert!(q.is_empty());
            w.got
        };
        assert_eq!(write(&mut queue(&pkts), &mut stage), frames(&pkts));
        // The same packets in the same order: the staged bytes are not copied again
        // (marked here, so a reuse shows in what is written).
        stage.buf[0] = b'!';
        let got = write(&mut queue(&pkts), &mut stage);
        assert_eq!(got[0], b'!', "reused");
        assert_eq!(got[1..], frames(&pkts)[1..]);
        // The mark undone.
        stage.buf[0] = 0x81;
        // Another packet at the front: copied again.
        let other = Rc::new(Packet::raw(&[b'z'; 90]));
        let mut ps = pkts.clone();
        ps[0] = other.clone();
        assert_eq!(write(&mut queue(&ps), &mut stage), frames(&ps));
        // The same prefix and a different packet later: the prefix reused, the rest not.
        ps = pkts.clone();
        assert_eq!(write(&mut queue(&ps), &mut stage), frames(&ps));
        stage.buf[0] = b'!';
        ps[9] = other.clone();
        let got = write(&mut queue(&ps), &mut stage);
        assert_eq!(got[0], b'!', "the prefix reused");
        stage.buf[0] = 0x81;
        assert_eq!(
            got[1..],
            frames(&ps)[1..],
            "the packet after the prefix copied"
        );
        // A packet rebuilt in place (same address, other bytes of the same length) is
        // copied again, whatever the buffer held.
        assert_eq!(write(&mut queue(&pkts), &mut stage), frames(&pkts));
        drop(ps);
        let mut ps = pkts;
        let first = Rc::get_mut(&mut ps[0]).expect("held once");
        first.rebuild(90, true, |b| b.extend_from_slice(&[b'R'; 90]));
        assert_eq!(write(&mut queue(&ps), &mut stage), frames(&ps));
        assert_eq!(&frames(&ps)[2..4], b"RR");
        // Nor is anything reused after a write that started in the middle of a chunk.
        let mut q = queue(&ps);
        let mut w = Vectored {
            got: Vec::new(),
            caps: vec![50, 0],
            calls: 0,
            most_pieces: 0,
        };
        q.write_to(&mut w, &mut stage).unwrap();
        q.write_to(&mut w, &mut stage).unwrap();
        w.caps = vec![usize::MAX];
        q.write_to(&mut w, &mut stage).unwrap();
        assert!(w.got == frames(&ps));
        assert_eq!(write(&mut queue(&ps), &mut stage), frames(&ps));
    }

    #[test]
    fn drop_unsent_keeps_partial_head() {
        let mut q = OutQueue::default();
        let p = Rc::new(Packet::raw(b"0123456789"));
        q.push_packet(&p);
        q.push_packet(&p);
        let mut w = Trickle {
            got: Vec::new(),
            cap: 4,
            calls: 1,
        };
        q.write_to(&mut w, &mut Stage::default()).unwrap(); // one write of 4 bytes, then WouldBlock
        q.drop_unsent();
        assert_eq!(q.len(), p.ws_frame().len() - 4);
    }
}
