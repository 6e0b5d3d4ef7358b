//! Encoder for the middleman message format (PROTOCOL.md §2 output rules) and the
//! [`Packet`]: one encoded message together with its WebSocket frame header, built once
//! and shared by every receiver.

/// Append one message to `out`: CRLF after the first line, each header and the blank
/// line; the body as given with every line that starts with `.` stuffed; then
/// CRLF `.` CRLF (so an empty body still gives one empty line).
pub fn encode_into<'h>(
    out: &mut Vec<u8>,
    cmd: &[u8],
    target: &[u8],
    headers: impl IntoIterator<Item = (&'h [u8], &'h [u8])>,
    body: &[u8],
) {
    out.reserve(cmd.len() + target.len() + body.len() + 16);
    out.extend_from_slice(cmd);
    out.push(b' ');
    out.extend_from_slice(target);
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        push_header(out, name, value);
    }
    out.extend_from_slice(b"\r\n");
    push_body(out, body);
    out.extend_from_slice(b"\r\n.\r\n");
}

/// Append one header line `name: value` CRLF.
pub fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Append a body with dot-stuffing (a `.` is added before every line starting with `.`).
///
/// Copies the runs between stuffing points whole rather than line by line (a 1 KiB
/// body of 16 lines was 16 `memchr` calls and 16 copies). Long bodies are scanned for
/// `\n.` with `memmem` (1 KiB: 39% faster than line by line); short ones with
/// `memchr_iter`, because building a `memmem` searcher per call made one-line 64-byte
/// bodies 50% slower.
pub fn push_body(out: &mut Vec<u8>, body: &[u8]) {
    out.reserve(body.len() + 1);
    if body.first() == Some(&b'.') {
        out.push(b'.');
    }
    let mut from = 0;
    // `i` is a line break followed by a '.' that starts the next line.
    let mut stuff = |i: usize, out: &mut Vec<u8>| {
        out.extend_from_slice(&body[from..=i]);
        out.push(b'.');
        from = i + 1;
    };
    if body.len() >= MEMMEM_FROM {
        for i in memchr::memmem::find_iter(body, b"\n.") {
            stuff(i, out);
        }
    } else {
        for i in memchr::memchr_iter(b'\n', body) {
            if body.get(i + 1) == Some(&b'.') {
                stuff(i, out);
            }
        }
    }
    out.extend_from_slice(&body[from..]);
}

/// Body length from which [`push_body`] searches with `memmem`.
const MEMMEM_FROM: usize = 256;

/// Room kept in front of a packet's payload for the largest WebSocket frame header.
const HEADROOM: usize = 10;

/// Bytes of the header of an unmasked WebSocket frame with a `len`-byte payload (the
/// shortest form, as RFC 6455 §5.2 requires).
pub fn frame_header_len(len: usize) -> usize {
    if len < 126 {
        2
    } else if len <= u16::MAX as usize {
        4
    } else {
        10
    }
}

/// Write the header of a final, unmasked text (or binary) frame with a `len`-byte
/// payload into `dst`, which is [`frame_header_len`]`(len)` bytes long.
fn put_frame_header(dst: &mut [u8], len: usize, text: bool) {
    dst[0] = if text { 0x81 } else { 0x82 }; // FIN + text/binary
    match dst.len() {
        2 => dst[1] = len as u8,
        4 => {
            dst[1] = 126;
            dst[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            dst[1] = 127;
            dst[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

/// Whether a payload goes out as a text frame: known to be UTF-8 (`utf8`, checked in
/// debug builds), or found to be. Most payloads are ASCII: eight bytes at a time settles
/// them before the general check (from_utf8 was 4% of a node relaying requests from
/// other nodes).
fn is_text(utf8: bool, payload: &[u8]) -> bool {
    debug_assert!(!utf8 || std::str::from_utf8(payload).is_ok());
    utf8 || crate::core::websocket::is_ascii(payload) || std::str::from_utf8(payload).is_ok()
}

/// Append one whole WebSocket frame to `buf`: `fill` appends its payload (at most
/// about `bound` bytes: the header's size is guessed from it and the payload moved
/// if the guess was wrong), which is sent as text when `utf8` says it is UTF-8 or it
/// is found to be. The same bytes [`Packet`] would hold as its frame, built in place
/// in a buffer that is written as it is (a connection's queued bytes).
pub fn append_frame(buf: &mut Vec<u8>, bound: usize, utf8: bool, fill: impl FnOnce(&mut Vec<u8>)) {
    let at = buf.len();
    let guess = frame_header_len(bound);
    buf.resize(at + guess, 0);
    fill(buf);
    let len = buf.len() - at - guess;
    let need = frame_header_len(len);
    if need < guess {
        buf.copy_within(at + guess.., at + need);
        buf.truncate(at + need + len);
    } else if need > guess {
        buf.resize(at + need + len, 0);
        buf.copy_within(at + guess..at + guess + len, at + need);
    }
    let text = is_text(utf8, &buf[at + need..]);
    put_frame_header(&mut buf[at..at + need], len, text);
}

/// An encoded protocol message with room for its WebSocket frame header in front.
///
/// Server-to-client WebSocket frames are not masked, so the same frame bytes can be
/// written to every receiver: a published message is encoded once into a `Packet` and
/// shared (`Rc<Packet>`) by all subscriber queues.
#[derive(Debug, PartialEq, Eq)]
pub struct Packet {
    buf: Vec<u8>,
    /// Where the WebSocket frame header starts within `buf`.
    start: usize,
    /// The payload is valid UTF-8 (sent as a text frame) or not (binary).
    text: bool,
}

impl Clone for Packet {
    fn clone(&self) -> Packet {
        touched();
        Packet {
            buf: self.buf.clone(),
            start: self.start,
            text: self.text,
        }
    }
}

thread_local! {
    static EPOCH: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// A count this thread moves on whenever a packet is made or its bytes may change: while
/// it stays the same, a packet at a given address holds the same bytes (what a write
/// staged from packets may be reused for another queue of the same packets).
pub fn packets_epoch() -> u64 {
    EPOCH.with(std::cell::Cell::get)
}

fn touched() {
    EPOCH.with(|e| e.set(e.get().wrapping_add(1)));
}

impl Packet {
    /// Build a packet: `fill` appends the protocol bytes to the vector it is given.
    pub fn build(fill: impl FnOnce(&mut Vec<u8>)) -> Packet {
        Self::build_sized(118, fill)
    }

    /// Like [`Packet::build`], with room for `payload_hint` payload bytes up front so a
    /// well-estimated packet is one allocation.
    pub fn build_sized(payload_hint: usize, fill: impl FnOnce(&mut Vec<u8>)) -> Packet {
        Self::build_utf8(payload_hint, false, fill)
    }

    /// Like [`Packet::build_sized`]; `utf8` says the payload is known to be valid UTF-8
    /// (it is then not checked again).
    fn build_utf8(payload_hint: usize, utf8: bool, fill: impl FnOnce(&mut Vec<u8>)) -> Packet {
        let mut buf = Vec::with_capacity(HEADROOM + payload_hint);
        buf.resize(HEADROOM, 0);
        fill(&mut buf);
        Self::from_headroom_vec(buf, utf8)
    }

    /// Build this packet again in place, reusing its buffer (see [`PacketPool`]).
    /// `utf8`: the payload is known to be valid UTF-8 (not checked again) or not known.
    pub fn rebuild(&mut self, payload_hint: usize, utf8: bool, fill: impl FnOnce(&mut Vec<u8>)) {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.reserve(HEADROOM + payload_hint);
        buf.resize(HEADROOM, 0);
        fill(&mut buf);
        *self = Self::from_headroom_vec(buf, utf8);
    }

    /// Bytes to be written as they are, framing or not (a WebSocket control frame
    /// tungstenite encoded, a handshake reply): its frame and its payload are the same
    /// bytes.
    pub fn verbatim(bytes: &[u8]) -> Packet {
        touched();
        let mut buf = Vec::with_capacity(HEADROOM + bytes.len());
        buf.resize(HEADROOM, 0);
        buf.extend_from_slice(bytes);
        Packet {
            buf,
            start: HEADROOM,
            text: false,
        }
    }

    /// Made by [`Packet::verbatim`] (a frame header always starts before `HEADROOM`).
    pub fn is_verbatim(&self) -> bool {
        self.start == HEADROOM
    }

    /// A verbatim packet's bytes, to append to (never to cut below what it held when
    /// made: its headroom) or `None` for any other packet.
    pub(crate) fn verbatim_bytes(&mut self) -> Option<&mut Vec<u8>> {
        if !self.is_verbatim() {
            return None;
        }
        touched();
        Some(&mut self.buf)
    }

    /// Empty a verbatim packet, keeping its buffer (ignored for any other packet).
    pub(crate) fn clear_verbatim(&mut self) {
        if let Some(bytes) = self.verbatim_bytes() {
            bytes.truncate(HEADROOM);
        }
    }

    /// Heap bytes the packet holds.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Build a packet from a vector whose first 10 bytes are reserved headroom; `utf8`
    /// says the payload is known to be valid UTF-8 (else it is checked).
    fn from_headroom_vec(mut buf: Vec<u8>, utf8: bool) -> Packet {
        touched();
        let len = buf.len() - HEADROOM;
        let text = is_text(utf8, &buf[HEADROOM..]);
        let start = HEADROOM - frame_header_len(len);
        put_frame_header(&mut buf[start..HEADROOM], len, text);
        Packet { buf, start, text }
    }

    /// A packet holding exactly `payload` (e.g. `MM OK`, a cid).
    pub fn raw(payload: &[u8]) -> Packet {
        Packet::build(|b| b.extend_from_slice(payload))
    }

    /// A packet holding exactly `payload`, sent as a text or binary frame as asked
    /// (echo mode keeps the type it received).
    pub fn with_kind(payload: &[u8], text: bool) -> Packet {
        let mut p = Packet::raw(payload);
        p.text = text;
        p.buf[p.start] = if text { 0x81 } else { 0x82 };
        p
    }

    /// The protocol bytes (the WebSocket payload).
    pub fn payload(&self) -> &[u8] {
        &self.buf[HEADROOM..]
    }

    /// The whole unmasked WebSocket frame: header and payload.
    pub fn ws_frame(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Whether it goes out as a text frame (valid UTF-8) or a binary frame.
    pub fn is_text(&self) -> bool {
        self.text
    }
}

/// Packets handed out recently, oldest first; at most this many are kept.
const POOL_SLOTS: usize = 2048;
/// Packets given back (see [`Spent`]) kept for reuse; at most this many.
const FREE_SLOTS: usize = 32 << 10;
/// Heap bytes the pool may keep alive in packets nobody else holds. (A pass that
/// publishes 100 batches of 150 small messages needs 15k packets, ~3 MiB; what a burst
/// left and later passes did not use is let go by [`PacketPool::trim`].)
const POOL_BYTES: usize = 8 << 20;
/// A packet with more capacity than this is never kept for reuse.
const POOL_PACKET_MAX: usize = 16 << 10;
/// Emptied chunks of queued bytes kept for reuse (see [`Spent::offer`]): at most this
/// many, of at most [`BYTE_CHUNK_MAX`] bytes each (4 MiB in all).
const BYTE_CHUNKS: usize = 64;
const BYTE_CHUNK_MAX: usize = 64 << 10;

/// Recycles packets: a packet the pool handed out is built again in place, with no
/// allocation, once every queue it went to has let it go (its `Rc` is unique again).
/// Packets are reused in the order they were handed out, so in a loop whose queues are
/// written every pass the oldest one is free again by the time it comes round. Packets
/// that stay queued longer than the ring reaches (many publishers, a slow subscriber)
/// come back through [`Spent`], which the queues fill as they let packets go.
#[derive(Debug, Default)]
pub struct PacketPool {
    ring: std::collections::VecDeque<std::rc::Rc<Packet>>,
    /// Packets nobody else holds, given back through [`PacketPool::recycle`].
    free: Vec<std::rc::Rc<Packet>>,
    /// The fewest packets `free` held since the last [`PacketPool::trim`]: that many
    /// were not needed.
    low: usize,
    /// Capacity of the packets in `ring` and `free`.
    bytes: usize,
    /// Emptied chunks of queued bytes (bounded by [`BYTE_CHUNKS`]), and the fewest held
    /// since the last trim.
    chunks: Vec<std::rc::Rc<Packet>>,
    chunks_low: usize,
}

/// `p` is the only handle on its packet (no other `Rc`, no `Weak`): it may be rebuilt.
fn held_by_nobody_else(p: &std::rc::Rc<Packet>) -> bool {
    std::rc::Rc::strong_count(p) == 1 && std::rc::Rc::weak_count(p) == 0
}

/// May the pool keep `p` for reuse? Nobody else holds it, it is a message (not
/// verbatim bytes) and not larger than a pooled packet may be.
fn poolable(p: &std::rc::Rc<Packet>) -> bool {
    !p.is_verbatim() && held_by_nobody_else(p) && p.capacity() <= POOL_PACKET_MAX
}

/// Packets the outbound queues let go of during a pass (each held by nobody else),
/// kept for [`PacketPool::recycle`] at the end of the pass. Bounded in count and in
/// bytes (the pool's bounds): past either, packets are freed as before.
#[derive(Debug, Default)]
pub struct Spent {
    pkts: Vec<std::rc::Rc<Packet>>,
    bytes: usize,
    /// Chunks of a queue's own bytes (see [`PacketPool::take_bytes`]), emptied.
    chunks: Vec<std::rc::Rc<Packet>>,
}

impl Spent {
    /// Keep `p` for the pool if nobody else holds it and there is room; else drop it.
    /// A chunk of verbatim bytes is kept (emptied) among at most [`BYTE_CHUNKS`] of at
    /// most [`BYTE_CHUNK_MAX`] bytes: messages built in place in a queue go in those,
    /// and a chunk per pass per connection was an allocation and a few reallocations.
    pub fn offer(&mut self, mut p: std::rc::Rc<Packet>) {
        let cap = p.capacity();
        if p.is_verbatim() {
            if self.chunks.len() < BYTE_CHUNKS && cap <= BYTE_CHUNK_MAX {
                if let Some(bytes) = std::rc::Rc::get_mut(&mut p) {
                    bytes.clear_verbatim();
                    self.chunks.push(p);
                }
            }
        } else if poolable(&p) && self.pkts.len() < FREE_SLOTS && self.bytes + cap <= POOL_BYTES {
            self.bytes += cap;
            self.pkts.push(p);
        }
    }

    /// Packets kept.
    pub fn len(&self) -> usize {
        self.pkts.len()
    }

    /// None kept.
    pub fn is_empty(&self) -> bool {
        self.pkts.is_empty()
    }

    /// Give back the list's memory after a burst (it is empty between passes).
    pub fn trim(&mut self) {
        if self.pkts.is_empty() && self.pkts.capacity() > POOL_SLOTS {
            self.pkts = Vec::new();
        }
    }
}

impl PacketPool {
    /// An empty pool.
    pub fn new() -> PacketPool {
        PacketPool::default()
    }

    /// A packet built by `fill` (as [`Packet::build_sized`]): one given back if there
    /// is one, else the oldest one handed out if nobody holds it any more, else new.
    pub fn build(
        &mut self,
        payload_hint: usize,
        utf8: bool,
        fill: impl FnOnce(&mut Vec<u8>),
    ) -> std::rc::Rc<Packet> {
        if let Some(mut free) = self.free.pop() {
            self.low = self.low.min(self.free.len());
            self.bytes -= free.capacity();
            if let Some(p) = std::rc::Rc::get_mut(&mut free) {
                p.rebuild(payload_hint, utf8, fill);
                return self.keep(free);
            }
        }
        let pkt = match self.ring.pop_front() {
            Some(mut oldest) => {
                let held = oldest.capacity();
                match std::rc::Rc::get_mut(&mut oldest) {
                    Some(free) => {
                        self.bytes -= held;
                        free.rebuild(payload_hint, utf8, fill);
                        oldest
                    }
                    None => {
                        // Still queued somewhere: it keeps its place, a new packet is
                        // made, and the ring grows to cover what is in flight (up to its
                        // bounds, below).
                        self.ring.push_front(oldest);
                        std::rc::Rc::new(Packet::build_utf8(payload_hint, utf8, fill))
                    }
                }
            }
            None => std::rc::Rc::new(Packet::build_utf8(payload_hint, utf8, fill)),
        };
        self.keep(pkt)
    }

    /// Note `pkt` at the back of the ring (making room), unless it is too large. A
    /// packet that leaves the ring for room goes to the free list if nobody holds it
    /// (else its last queue gives it back through [`Spent`]).
    fn keep(&mut self, pkt: std::rc::Rc<Packet>) -> std::rc::Rc<Packet> {
        let cap = pkt.capacity();
        if cap <= POOL_PACKET_MAX {
            while self.ring.len() >= POOL_SLOTS || self.bytes + cap > POOL_BYTES {
                let Some(old) = self.ring.pop_front() else {
                    break;
                };
                if self.bytes + cap <= POOL_BYTES
                    && self.free.len() < FREE_SLOTS
                    && held_by_nobody_else(&old)
                {
                    self.free.push(old); // its bytes stay counted
                } else {
                    self.bytes -= old.capacity();
                }
            }
            if self.bytes + cap <= POOL_BYTES {
                self.bytes += cap;
                self.ring.push_back(pkt.clone());
            }
        }
        pkt
    }

    /// Take back one packet someone let go of (history's oldest), if nobody else holds
    /// it and the pool has room; else it is freed.
    pub fn give(&mut self, p: std::rc::Rc<Packet>) {
        let cap = p.capacity();
        if poolable(&p) && self.free.len() < FREE_SLOTS && self.bytes + cap <= POOL_BYTES {
            self.bytes += cap;
            self.free.push(p);
        }
    }

    /// Take the packets the queues let go of this pass, within the pool's bounds (the
    /// rest are freed). `spent` is left empty.
    pub fn recycle(&mut self, spent: &mut Spent) {
        for p in spent.pkts.drain(..) {
            let cap = p.capacity();
            if self.free.len() < FREE_SLOTS && self.bytes + cap <= POOL_BYTES {
                self.bytes += cap;
                self.free.push(p);
            }
        }
        spent.bytes = 0;
        let room = BYTE_CHUNKS.saturating_sub(self.chunks.len());
        let n = spent.chunks.len().min(room);
        self.chunks.extend(spent.chunks.drain(..n));
        spent.chunks.clear();
    }

    /// An emptied chunk for a queue's own bytes, if one was given back (see
    /// [`Spent::offer`]).
    pub fn take_bytes(&mut self) -> Option<std::rc::Rc<Packet>> {
        let c = self.chunks.pop();
        self.chunks_low = self.chunks_low.min(self.chunks.len());
        c
    }

    /// Let go of the given-back packets not needed since the last call (the fewest the
    /// free list held meanwhile): called from time to time, so what a burst left does
    /// not stay for good.
    pub fn trim(&mut self) {
        let unused = self.low.min(self.free.len());
        for p in self.free.drain(..unused) {
            self.bytes -= p.capacity();
        }
        if self.free.is_empty() {
            self.free = Vec::new();
        }
        self.low = self.free.len();
        let unused = self.chunks_low.min(self.chunks.len());
        self.chunks.drain(..unused);
        self.chunks_low = self.chunks.len();
    }

    /// Packets kept (for tests).
    pub fn len(&self) -> usize {
        self.ring.len() + self.free.len()
    }

    /// Nothing kept.
    pub fn is_empty(&self) -> bool {
        self.ring.is_empty() && self.free.is_empty()
    }

    /// Heap bytes the kept packets hold (for tests).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// `n` in decimal, written at the end of `buf` (no allocation); the digits are returned.
pub fn fmt_u64(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Append `n` in decimal.
pub fn push_dec(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(fmt_u64(n, &mut [0; 20]));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stuffing() {
        let mut v = Vec::new();
        push_body(&mut v, b".a\n.b\r\nc\n.");
        assert_eq!(v, b"..a\n..b\r\nc\n..");
        for (body, want) in [
            (&b""[..], &b""[..]),
            (b".", b".."),
            (b"\n.\n.", b"\n..\n.."),
            (b"\n\n..x", b"\n\n...x"),
            (b"a.b\n c.", b"a.b\n c."),
        ] {
            let mut v = Vec::new();
            push_body(&mut v, body);
            assert_eq!(v, want, "{:?}", String::from_utf8_lossy(body));
        }
        let mut v = Vec::new();
        encode_into(&mut v, b"PUB", b"t", [], b"");
        assert_eq!(v, b"PUB t\r\n\r\n\r\n.\r\n");
    }

    /// The obvious line-by-line stuffing, to check both search paths against.
    fn stuff_reference(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, line) in body.split(|&b| b == b'\n').enumerate() {
            if i > 0 {
                out.push(b'\n');
            }
            if line.first() == Some(&b'.') {
                out.push(b'.');
            }
            out.extend_from_slice(line);
        }
        out
    }

    #[test]
    fn stuffing_long_and_short_bodies_agree_with_reference() {
        let alphabet = [b'.', b'\n', b'\r', b'a', b'.', b'\n'];
        let mut seed = 0x2545_f491_u64;
        for len in [0usize, 1, 2, 3, 63, 64, 255, 256, 257, 1000, 4096] {
            for _ in 0..20 {
                let body: Vec<u8> = (0..len)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        alphabet[(seed % alphabet.len() as u64) as usize]
                    })
                    .collect();
                let mut v = Vec::new();
                push_body(&mut v, &body);
                assert_eq!(v, stuff_reference(&body), "len {len}");
            }
        }
    }

    #[test]
    fn pool_reuses_packets_nobody_holds() {
        let mut pool = PacketPool::new();
        let a = pool.build(8, true, |b| b.extend_from_slice(b"first"));
        let a_ptr = std::rc::Rc::as_ptr(&a);
        drop(a);
        // The only packet in the pool is free again: rebuilt in place.
        let b = pool.build(8, false, |b| b.extend_from_slice(b"second message"));
        assert_eq!(std::rc::Rc::as_ptr(&b), a_ptr);
        assert_eq!(b.payload(), b"second message");
        assert_eq!(b.ws_frame()[..2], [0x81, 14]);
        // Held by a queue: not reused, a new one is made.
        let c = pool.build(8, false, |b| b.extend_from_slice(b"third"));
        assert_ne!(std::rc::Rc::as_ptr(&c), a_ptr);
        assert_eq!(b.payload(), b"second message");
        assert_eq!(c.payload(), b"third");
        let big = vec![b'x'; 20_000];
        let d = pool.build(20_000, false, |b| b.extend_from_slice(&big));
        assert_eq!(d.payload().len(), 20_000);
        assert!(pool.len() <= 2, "a large packet is not kept");
    }

    #[test]
    fn packets_given_back_are_reused_then_trimmed_when_unused() {
        let mut pool = PacketPool::new();
        let mut spent = Spent::default();
        // More packets than the ring keeps, all held (queued) at once.
        let held: Vec<_> = (0..POOL_SLOTS + 100)
            .map(|_| pool.build(8, true, |b| b.extend_from_slice(b"queued")))
            .collect();
        assert_eq!(pool.len(), POOL_SLOTS);
        // The queues let them go: those the ring still holds are not unique and stay
        // with the ring; the 100 it let go of come back through `spent`.
        let ptrs: Vec<_> = held.iter().map(std::rc::Rc::as_ptr).collect();
        for p in held {
            spent.offer(p);
        }
        assert_eq!(spent.len(), 100);
        pool.recycle(&mut spent);
        assert!(spent.is_empty());
        assert_eq!(pool.len(), POOL_SLOTS + 100);
        // Given-back packets are used first.
        let again = pool.build(8, true, |b| b.extend_from_slice(b"again"));
        assert!(ptrs[..100].contains(&std::rc::Rc::as_ptr(&again)));
        assert_eq!(again.payload(), b"again");
        drop(again);
        // A packet someone still holds is not taken.
        let kept = pool.build(8, true, |b| b.extend_from_slice(b"x"));
        spent.offer(kept.clone());
        assert!(spent.is_empty());
        // Two trims with no use between them: the free list is let go of.
        let before = pool.bytes();
        pool.trim();
        pool.trim();
        assert_eq!(pool.len(), POOL_SLOTS, "only the ring is left");
        assert!(pool.bytes() < before);
        drop(kept);
    }

    #[test]
    fn frame_headers() {
        let p = Packet::raw(b"MM OK");
        assert_eq!(p.ws_frame(), b"\x81\x05MM OK");
        let big = vec![b'a'; 300];
        let p = Packet::raw(&big);
        assert_eq!(&p.ws_frame()[..4], &[0x81, 126, 1, 44]);
        let huge = vec![0xffu8; 70000];
        let p = Packet::raw(&huge);
        assert!(!p.is_text());
        assert_eq!(p.ws_frame()[0], 0x82);
        assert_eq!(p.ws_frame()[1], 127);
        assert_eq!(p.ws_frame().len(), 70010);
    }

    #[test]
    fn a_frame_appended_in_place_is_the_packets_frame() {
        // Every header size, with the size guessed right, too small and too large
        // (the payload moved either way); text, binary, and UTF-8 not known beforehand.
        let mut buf = b"before".to_vec();
        let mut expect = buf.clone();
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 70_000] {
            for bound in [0, len, 125, 126, 65_535, 65_536, 100_000] {
                for byte in [b'a', 0xff] {
                    let payload = vec![byte; len];
                    for utf8 in [false, true] {
                        let utf8 = utf8 && byte == b'a';
                        append_frame(&mut buf, bound, utf8, |b| b.extend_from_slice(&payload));
                        expect.extend_from_slice(Packet::raw(&payload).ws_frame());
                    }
                }
            }
        }
        assert!(buf == expect, "the bytes differ");
    }

    #[test]
    fn chunks_of_bytes_come_back_emptied_and_bounded() {
        let mut pool = PacketPool::new();
        let mut spent = Spent::default();
        assert!(pool.take_bytes().is_none());
        let mut chunk = std::rc::Rc::new(Packet::verbatim(b"queued bytes"));
        let held = chunk.clone();
        spent.offer(chunk.clone());
        pool.recycle(&mut spent);
        assert!(
            pool.take_bytes().is_none(),
            "a chunk someone holds is not kept"
        );
        drop(held);
        std::rc::Rc::get_mut(&mut chunk)
            .and_then(Packet::verbatim_bytes)
            .unwrap()
            .extend_from_slice(&[b'x'; 100]);
        spent.offer(chunk);
        // Too large to keep.
        spent.offer(std::rc::Rc::new(Packet::verbatim(&vec![
            0;
            BYTE_CHUNK_MAX + 1
        ])));
        for _ in 0..2 * BYTE_CHUNKS {
            spent.offer(std::rc::Rc::new(Packet::verbatim(b"b")));
        }
        pool.recycle(&mut spent);
        let mut n = 0;
        while let Some(mut c) = pool.take_bytes() {
            let c = std::rc::Rc::get_mut(&mut c).unwrap();
            assert_eq!(
                c.verbatim_bytes().map(|b| b.len()),
                Some(HEADROOM),
                "emptied"
            );
            assert!(c.capacity() <= BYTE_CHUNK_MAX);
            n += 1;
        }
        assert_eq!(n, BYTE_CHUNKS);
        // Kept and not used between two trims: let go of.
        spent.offer(std::rc::Rc::new(Packet::verbatim(b"b")));
        pool.recycle(&mut spent);
        pool.trim();
        pool.trim();
        assert!(pool.take_bytes().is_none());
    }
}
