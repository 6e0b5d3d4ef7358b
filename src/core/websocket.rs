//! Incremental reader of the WebSocket frames a client sends (RFC 6455 §5): pure, no
//! I/O, no allocation.
//!
//! The reactor reads socket bytes into a buffer and hands them to [`FrameReader::next`],
//! which walks the frame headers, unmasks payloads in place and returns them as ranges
//! of that buffer, a piece at a time as they arrive: a data message is never gathered
//! whole here (the protocol decoder holds what it needs), control frames (at most 125
//! bytes) are. Whatever a read leaves unfinished (a header cut short, the rest of a
//! control frame) is kept in the reader, so the buffer is free again after every read.
//!
//! It checks what tungstenite's reader checked: reserved bits and opcodes, masking,
//! control frames final and short, continuation order, the size of a message (before its
//! payload is read), the frames per message, UTF-8 in text messages (piece by piece, so
//! a bad byte fails at once) and close frames (length, UTF-8 reason). tungstenite still
//! does the handshake and writes every control frame we send.

use std::ops::Range;

/// Limits on what one client may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WsLimits {
    /// Largest data message (sum of its frames' payloads); a frame that would pass it is
    /// refused from its header.
    pub max_message: usize,
    /// Most frames in one data message.
    pub max_frames: usize,
}

/// Why the stream is refused. After one, the reader yields the same error again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsError {
    /// A violation of RFC 6455 framing (close 1002).
    Protocol(&'static str),
    /// A text message or a close reason that is not UTF-8 (close 1007).
    Utf8,
    /// A message larger than `max_message` (close 1009).
    TooLong,
    /// A message of more than `max_frames` frames (close 1008).
    TooManyFrames,
}

impl WsError {
    /// The close code for it.
    pub fn close_code(self) -> u16 {
        match self {
            WsError::Protocol(_) => 1002,
            WsError::Utf8 => 1007,
            WsError::TooLong => 1009,
            WsError::TooManyFrames => 1008,
        }
    }

    /// The reason sent in the close frame.
    pub fn reason(self) -> &'static str {
        match self {
            WsError::Protocol(_) => "websocket protocol error",
            WsError::Utf8 => "invalid utf-8",
            WsError::TooLong => "message too long",
            WsError::TooManyFrames => "too many fragments",
        }
    }
}

impl std::fmt::Display for WsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WsError::Protocol(what) => f.write_str(what),
            other => f.write_str(other.reason()),
        }
    }
}

/// Largest control frame payload (RFC 6455 §5.5).
pub const MAX_CONTROL: usize = 125;

/// What [`FrameReader::next`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsEvent {
    /// Payload bytes of a data message, unmasked in place: `buf[range]` of the buffer
    /// given to `next` (UTF-8 checked so far, for text). `last`: the message ends here
    /// (an empty message gives one empty range).
    Data {
        range: Range<usize>,
        text: bool,
        last: bool,
    },
    /// A ping and its payload.
    Ping(Control),
    /// A pong.
    Pong,
    /// A close frame: its status code, if it had one (the reason was checked to be
    /// UTF-8). Nothing after it is read.
    Close(Option<u16>),
}

/// A control frame's payload (at most [`MAX_CONTROL`] bytes), held by value.
#[derive(Clone, PartialEq, Eq)]
pub struct Control {
    bytes: [u8; MAX_CONTROL],
    len: u8,
}

impl Control {
    /// The payload.
    pub fn payload(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Control({:?})", self.payload())
    }
}

const OP_CONT: u8 = 0;
const OP_TEXT: u8 = 1;
const OP_BINARY: u8 = 2;
const OP_CLOSE: u8 = 8;
const OP_PING: u8 = 9;
const OP_PONG: u8 = 10;

/// Longest frame header: 2 bytes, 8 of extended length, 4 of mask.
const MAX_HEADER: usize = 14;

/// See the module documentation. About 180 bytes, no heap.
#[derive(Clone)]
pub struct FrameReader {
    /// A header cut short by the end of a read, and how much of it is here.
    hdr: [u8; MAX_HEADER],
    have: u8,
    /// Inside a frame (its header read): opcode, final bit, mask, the mask's phase for
    /// the next payload byte, payload bytes still to come.
    in_frame: bool,
    opcode: u8,
    fin: bool,
    mask: [u8; 4],
    phase: u8,
    left: u64,
    /// The control frame being gathered.
    ctl: Control,
    /// The data message in progress: `Some(text)` between its first and final frame.
    msg: Option<bool>,
    /// Payload bytes of the message in progress so far (announced by headers).
    msg_len: u64,
    /// Non-final data frames since the last final one.
    run: usize,
    /// A UTF-8 sequence cut by the end of a piece of a text message.
    utf8: [u8; 4],
    utf8_len: u8,
    /// The error the stream failed with, if it did; the close frame, if one came.
    failed: Option<WsError>,
    closed: bool,
    /// Frames whose header was read (each is one unit of a read turn's message budget).
    pub frames: u64,
}

impl Default for FrameReader {
    fn default() -> Self {
        FrameReader {
            hdr: [0; MAX_HEADER],
            have: 0,
            in_frame: false,
            opcode: 0,
            fin: false,
            mask: [0; 4],
            phase: 0,
            left: 0,
            ctl: Control {
                bytes: [0; MAX_CONTROL],
                len: 0,
            },
            msg: None,
            msg_len: 0,
            run: 0,
            utf8: [0; 4],
            utf8_len: 0,
            failed: None,
            closed: false,
            frames: 0,
        }
    }
}

impl std::fmt::Debug for FrameReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameReader")
            .field("in_frame", &self.in_frame)
            .field("opcode", &self.opcode)
            .field("left", &self.left)
            .field("msg", &self.msg)
            .field("frames", &self.frames)
            .finish_non_exhaustive()
    }
}

impl FrameReader {
    /// The next event in `buf[*pos..]`, moving `*pos` past what it used. `Ok(None)`: the
    /// buffer is used up (`*pos == buf.len()`) and what was cut short is kept. Payloads
    /// are unmasked in place. After a close frame, `Ok(None)` without reading further.
    pub fn next(
        &mut self,
        buf: &mut [u8],
        pos: &mut usize,
        lim: &WsLimits,
    ) -> Result<Option<WsEvent>, WsError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let res = self.step(buf, pos, lim);
        if let Err(e) = res {
            self.failed = Some(e);
        }
        res
    }

    fn step(
        &mut self,
        buf: &mut [u8],
        pos: &mut usize,
        lim: &WsLimits,
    ) -> Result<Option<WsEvent>, WsError> {
        loop {
            if self.closed {
                *pos = buf.len();
                return Ok(None);
            }
            if !self.in_frame {
                if !self.read_header(buf, pos, lim)? {
                    return Ok(None);
                }
                if self.opcode & 0x08 == 0 && self.left == 0 {
                    // An empty data frame: only a final one says anything.
                    self.in_frame = false;
                    if self.fin {
                        return self.data_piece(buf, *pos..*pos);
                    }
                    continue;
                }
            }
            let avail = buf.len() - *pos;
            if avail == 0 && self.left > 0 {
                return Ok(None);
            }
            let n = (self.left.min(avail as u64)) as usize;
            let range = *pos..*pos + n;
            *pos += n;
            self.left -= n as u64;
            unmask(&mut buf[range.clone()], self.mask, self.phase);
            self.phase = ((usize::from(self.phase) + n) & 3) as u8;
            if self.opcode & 0x08 != 0 {
                let at = usize::from(self.ctl.len);
                self.ctl.bytes[at..at + n].copy_from_slice(&buf[range]);
                self.ctl.len += n as u8;
                if self.left == 0 {
                    self.in_frame = false;
                    return self.control().map(Some);
                }
                continue;
            }
            if self.left == 0 {
                self.in_frame = false;
            }
            return self.data_piece(buf, range);
        }
    }

    /// A piece of a data frame's payload, `buf[range]`, already unmasked.
    fn data_piece(&mut self, buf: &[u8], range: Range<usize>) -> Result<Option<WsEvent>, WsError> {
        let last = !self.in_frame && self.fin;
        let text = self.msg == Some(true);
        if text {
            self.check_utf8(&buf[range.clone()], last)?;
        }
        if last {
            self.msg = None;
            self.msg_len = 0;
        }
        Ok(Some(WsEvent::Data { range, text, last }))
    }

    /// Gather and check a frame header; false when the buffer ended first.
    fn read_header(
        &mut self,
        buf: &[u8],
        pos: &mut usize,
        lim: &WsLimits,
    ) -> Result<bool, WsError> {
        let rest = &buf[*pos..];
        let (b0, b1, len, mask, used) = if self.have == 0 && rest.len() >= MAX_HEADER {
            // The whole header is here (the usual case): read it in place.
            let need = header_len(rest[1]);
            let (len, mask) = length_and_mask(&rest[..need]);
            (rest[0], rest[1], len, mask, need)
        } else {
            let mut used = 0;
            loop {
                let have = usize::from(self.have);
                let need = if have < 2 { 2 } else { header_len(self.hdr[1]) };
                if have == need {
                    break;
                }
                let Some(&b) = rest.get(used) else {
                    *pos += used;
                    return Ok(false);
                };
                self.hdr[have] = b;
                self.have += 1;
                used += 1;
            }
            let need = usize::from(self.have);
            self.have = 0;
            let (len, mask) = length_and_mask(&self.hdr[..need]);
            (self.hdr[0], self.hdr[1], len, mask, used)
        };
        *pos += used;
        self.frames += 1;
        self.start_frame(b0, b1, len, mask, lim)?;
        Ok(true)
    }

    /// Check a frame's header and enter it.
    fn start_frame(
        &mut self,
        b0: u8,
        b1: u8,
        len: u64,
        mask: [u8; 4],
        lim: &WsLimits,
    ) -> Result<(), WsError> {
        if b0 & 0x70 != 0 {
            return Err(WsError::Protocol("reserved bits set"));
        }
        if b1 & 0x80 == 0 {
            return Err(WsError::Protocol("unmasked frame from a client"));
        }
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0f;
        match opcode {
            OP_CLOSE | OP_PING | OP_PONG => {
                if !fin {
                    return Err(WsError::Protocol("fragmented control frame"));
                }
                if len > MAX_CONTROL as u64 {
                    return Err(WsError::Protocol("control frame too long"));
                }
                self.ctl.len = 0;
            }
            OP_CONT | OP_TEXT | OP_BINARY => {
                match (opcode, self.msg) {
                    (OP_CONT, None) => {
                        return Err(WsError::Protocol("continuation frame without a message"))
                    }
                    (OP_TEXT | OP_BINARY, Some(_)) => {
                        return Err(WsError::Protocol("new message inside a fragmented one"))
                    }
                    (OP_CONT, Some(_)) => {}
                    _ => {
                        self.msg = Some(opcode == OP_TEXT);
                        self.msg_len = 0;
                        self.utf8_len = 0;
                    }
                }
                self.msg_len = self.msg_len.saturating_add(len);
                if self.msg_len > lim.max_message as u64 {
                    return Err(WsError::TooLong);
                }
                if fin {
                    self.run = 0;
                } else {
                    self.run += 1;
                    if self.run >= lim.max_frames {
                        return Err(WsError::TooManyFrames);
                    }
                }
            }
            _ => return Err(WsError::Protocol("unknown opcode")),
        }
        self.in_frame = true;
        self.opcode = opcode;
        self.fin = fin;
        self.mask = mask;
        self.phase = 0;
        self.left = len;
        Ok(())
    }

    /// A complete control frame.
    fn control(&mut self) -> Result<WsEvent, WsError> {
        match self.opcode {
            OP_PING => Ok(WsEvent::Ping(self.ctl.clone())),
            OP_PONG => Ok(WsEvent::Pong),
            _ => {
                let p = self.ctl.payload();
                let code = match p.len() {
                    0 => None,
                    1 => return Err(WsError::Protocol("close frame with a 1-byte payload")),
                    _ => {
                        std::str::from_utf8(&p[2..]).map_err(|_| WsError::Utf8)?;
                        Some(u16::from_be_bytes([p[0], p[1]]))
                    }
                };
                self.closed = true;
                Ok(WsEvent::Close(code))
            }
        }
    }

    /// Check the next piece of a text message; `last`: the message ends with it.
    fn check_utf8(&mut self, mut b: &[u8], last: bool) -> Result<(), WsError> {
        if self.utf8_len > 0 {
            // Finish the sequence the last piece cut.
            let have = usize::from(self.utf8_len);
            let width = utf8_width(self.utf8[0]);
            let take = (width - have).min(b.len());
            self.utf8[have..have + take].copy_from_slice(&b[..take]);
            b = &b[take..];
            self.utf8_len += take as u8;
            if usize::from(self.utf8_len) < width {
                // Still cut; the bytes so far must be a valid start.
                if let Err(e) = std::str::from_utf8(&self.utf8[..usize::from(self.utf8_len)]) {
                    if e.error_len().is_some() {
                        return Err(WsError::Utf8);
                    }
                }
                return if last { Err(WsError::Utf8) } else { Ok(()) };
            }
            std::str::from_utf8(&self.utf8[..width]).map_err(|_| WsError::Utf8)?;
            self.utf8_len = 0;
        }
        if is_ascii(b) {
            return Ok(());
        }
        match std::str::from_utf8(b) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_some() || last => Err(WsError::Utf8),
            Err(e) => {
                let tail = &b[e.valid_up_to()..];
                self.utf8[..tail.len()].copy_from_slice(tail);
                self.utf8_len = tail.len() as u8;
                Ok(())
            }
        }
    }
}

/// All of `b` is ASCII (so UTF-8): eight bytes at a time, which for the short payloads
/// of most messages is quicker than the general check.
pub(crate) fn is_ascii(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(8);
    let mut or = 0u64;
    for w in &mut words {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        or |= u64::from_ne_bytes(a);
    }
    let rest = words.remainder().iter().fold(0u8, |a, &x| a | x);
    (or & 0x8080_8080_8080_8080) == 0 && rest & 0x80 == 0
}

/// Bytes in a UTF-8 sequence that starts with `b` (a valid lead byte: 2 to 4).
fn utf8_width(b: u8) -> usize {
    match b {
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

/// Bytes in a frame header whose second byte is `b1`: 2, the extended length, the mask.
fn header_len(b1: u8) -> usize {
    let ext = match b1 & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 }
}

/// The payload length and mask of a complete frame header `h`.
fn length_and_mask(h: &[u8]) -> (u64, [u8; 4]) {
    let (len, at) = match h[1] & 0x7f {
        126 => (u64::from(u16::from_be_bytes([h[2], h[3]])), 4),
        127 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (u64::from(n), 2),
    };
    let mut mask = [0u8; 4];
    if h[1] & 0x80 != 0 {
        mask.copy_from_slice(&h[at..at + 4]);
    }
    (len, mask)
}

/// XOR `b` with `mask`, starting at byte `phase` of the mask, a word at a time.
fn unmask(b: &mut [u8], mask: [u8; 4], phase: u8) {
    let mut m = mask;
    m.rotate_left(usize::from(phase));
    let word = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut chunks = b.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(w) ^ word).to_ne_bytes());
    }
    for (i, x) in chunks.into_remainder().iter_mut().enumerate() {
        *x ^= m[i & 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIM: WsLimits = WsLimits {
        max_message: 1 << 20,
        max_frames: 8,
    };

    /// A client frame: `b0` (final bit and opcode), masked `payload`.
    fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut v = vec![b0];
        match payload.len() {
            n if n < 126 => v.push(0x80 | n as u8),
            n if n < 65536 => {
                v.push(0x80 | 126);
                v.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                v.push(0x80 | 127);
                v.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        v.extend_from_slice(&mask);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        v
    }

    /// Everything `stream` gives, fed in pieces of `piece` bytes: data messages
    /// (text flag, bytes) and the other events, or the error.
    fn read_all(stream: &[u8], piece: usize, lim: &WsLimits) -> (Vec<String>, Option<WsError>) {
        let mut r = FrameReader::default();
        let mut out = Vec::new();
        let mut msg = Vec::new();
        for chunk in stream.chunks(piece.max(1)) {
            let mut buf = chunk.to_vec();
            let mut pos = 0;
            loop {
                match r.next(&mut buf, &mut pos, lim) {
                    Ok(Some(WsEvent::Data { range, text, last })) => {
                        msg.extend_from_slice(&buf[range]);
                        if last {
                            let kind = if text { "text" } else { "binary" };
                            out.push(format!("{kind} {}", String::from_utf8_lossy(&msg)));
                            msg.clear();
                        }
                    }
                    Ok(Some(WsEvent::Ping(p))) => {
                        out.push(format!("ping {}", String::from_utf8_lossy(p.payload())))
                    }
                    Ok(Some(WsEvent::Pong)) => out.push("pong".into()),
                    Ok(Some(WsEvent::Close(c))) => out.push(format!("close {c:?}")),
                    Ok(None) => break,
                    Err(e) => return (out, Some(e)),
                }
            }
            assert_eq!(pos, buf.len());
        }
        (out, None)
    }

    /// The same events whatever the pieces the stream arrives in.
    fn same_in_any_pieces(stream: &[u8], lim: &WsLimits) -> (Vec<String>, Option<WsError>) {
        let whole = read_all(stream, stream.len(), lim);
        for piece in [1, 2, 3, 5, 7, 13, 64] {
            assert_eq!(read_all(stream, piece, lim), whole, "pieces of {piece}");
        }
        whole
    }

    #[test]
    fn messages_fragments_and_controls_in_any_pieces() {
        let big = "x".repeat(70_000);
        let mut s = frame(0x81, b"hello");
        s.extend(frame(0x02, b"bin"));
        s.extend(frame(0x89, b"p1"));
        s.extend(frame(0x00, b"ary"));
        s.extend(frame(0x80, b"!"));
        s.extend(frame(0x81, "caf\u{e9} \u{1f600}".as_bytes()));
        s.extend(frame(0x81, b""));
        s.extend(frame(0x81, big.as_bytes()));
        s.extend(frame(0x8a, b""));
        s.extend(frame(0x88, &[0x03, 0xe8, b'b', b'y', b'e']));
        s.extend(frame(0x81, b"after close: not read"));
        let (ev, err) = same_in_any_pieces(&s, &LIM);
        assert_eq!(err, None);
        assert_eq!(
            ev,
            vec![
                "text hello".to_string(),
                "ping p1".into(),
                "binary binary!".into(),
                "text caf\u{e9} \u{1f600}".into(),
                "text ".into(),
                format!("text {big}"),
                "pong".into(),
                "close Some(1000)".into(),
            ]
        );
    }

    #[test]
    fn a_multibyte_character_cut_across_frames_is_whole() {
        let s = "\u{1f600}".as_bytes();
        let mut st = frame(0x01, &s[..1]);
        st.extend(frame(0x00, &s[1..3]));
        st.extend(frame(0x80, &s[3..]));
        assert_eq!(
            same_in_any_pieces(&st, &LIM),
            (vec!["text \u{1f600}".to_string()], None)
        );
    }

    #[test]
    fn framing_violations_are_refused() {
        let p = |w| WsError::Protocol(w);
        let cases: Vec<(Vec<u8>, WsError)> = vec![
            (frame(0xc1, b"rsv1"), p("reserved bits set")),
            (frame(0x83, b"op3"), p("unknown opcode")),
            (frame(0x8b, b"op11"), p("unknown opcode")),
            (
                vec![0x81, 0x02, b'h', b'i'],
                p("unmasked frame from a client"),
            ),
            (frame(0x09, b"frag ping"), p("fragmented control frame")),
            (frame(0x89, &[b'p'; 126]), p("control frame too long")),
            (
                frame(0x80, b"cont"),
                p("continuation frame without a message"),
            ),
            (
                [frame(0x01, b"a"), frame(0x81, b"b")].concat(),
                p("new message inside a fragmented one"),
            ),
            (frame(0x88, &[0x03]), p("close frame with a 1-byte payload")),
            (frame(0x88, &[0x03, 0xe8, 0xff]), WsError::Utf8),
            (frame(0x81, &[b'a', 0xff, b'b']), WsError::Utf8),
            (frame(0x81, &[0xe2, 0x82]), WsError::Utf8),
            (
                [frame(0x01, &[0xe2]), frame(0x80, &[0x28])].concat(),
                WsError::Utf8,
            ),
            (frame(0x82, &[0; 101]), WsError::TooLong),
            (
                [frame(0x02, &[0; 60]), frame(0x80, &[0; 41])].concat(),
                WsError::TooLong,
            ),
            (
                [frame(0x01, b"a"), frame(0x00, b"b"), frame(0x00, b"c")].concat(),
                WsError::TooManyFrames,
            ),
        ];
        let lim = WsLimits {
            max_message: 100,
            max_frames: 2,
        };
        for (stream, want) in cases {
            let (_, err) = same_in_any_pieces(&stream, &lim);
            assert_eq!(err, Some(want), "{stream:02x?}");
        }
        // A frame longer than the limit is refused from its header alone.
        let mut r = FrameReader::default();
        let mut hdr = frame(0x82, &[0; 200])[..8].to_vec();
        assert_eq!(r.next(&mut hdr, &mut 0, &lim), Err(WsError::TooLong));
        // The 64-bit length with the top bit set is refused, not wrapped.
        let mut huge = vec![0x82, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4];
        assert_eq!(r.next(&mut huge, &mut 0, &lim), Err(WsError::TooLong));
        let mut r = FrameReader::default();
        assert_eq!(r.next(&mut huge, &mut 0, &lim), Err(WsError::TooLong));
    }

    #[test]
    fn a_bad_byte_fails_before_the_message_ends() {
        // Fail fast: the first piece with a bad byte is refused, the rest never needed.
        let mut r = FrameReader::default();
        let mut st = frame(0x81, &[b'a'; 1000]);
        st[8 + 10] ^= 0xff; // byte 10 of the payload becomes 0x9e: not UTF-8
        let mut part = st[..40].to_vec();
        let mut pos = 0;
        assert_eq!(r.next(&mut part, &mut pos, &LIM), Err(WsError::Utf8));
    }

    #[test]
    fn a_byte_over_127_anywhere_is_not_ascii() {
        for len in 0..24 {
            let mut b = vec![b'a'; len];
            assert!(is_ascii(&b));
            for i in 0..len {
                b[i] = 0x80;
                assert!(!is_ascii(&b), "{len} {i}");
                b[i] = b'a';
            }
        }
    }

    #[test]
    fn unmask_matches_bytewise_at_every_phase_and_length() {
        let mask = [1, 2, 4, 8];
        for phase in 0..4u8 {
            for len in 0..40 {
                let orig: Vec<u8> = (0..len as u8).map(|i| i.wrapping_mul(37)).collect();
                let mut b = orig.clone();
                unmask(&mut b, mask, phase);
                let want: Vec<u8> = orig
                    .iter()
                    .enumerate()
                    .map(|(i, x)| x ^ mask[(i + usize::from(phase)) & 3])
                    .collect();
                assert_eq!(b, want);
            }
        }
    }

    /// Reads from one buffer, writes (tungstenite's pongs) to another.
    struct Duplex {
        r: std::io::Cursor<Vec<u8>>,
        w: Vec<u8>,
    }
    impl std::io::Read for Duplex {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.r.read(buf)
        }
    }
    impl std::io::Write for Duplex {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.w.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_same_as_tungstenite_on_valid_streams() {
        use std::io::Cursor;
        use tungstenite::protocol::{Role, WebSocket};
        // Random valid streams (a fixed seed): tungstenite's reader and ours agree.
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..200 {
            let mut stream = Vec::new();
            let mut want = Vec::new();
            for _ in 0..rnd(20) {
                let text = rnd(2) == 0;
                let len = rnd(300) as usize;
                let body: String = (0..len)
                    .map(|i| ['a', '\u{e9}', '\u{1f600}', '.', '\n'][(i + len) % 5])
                    .collect();
                let bytes = body.as_bytes();
                let pieces = 1 + rnd(4) as usize;
                let step = bytes.len().div_ceil(pieces).max(1);
                let chunks: Vec<&[u8]> = if bytes.is_empty() {
                    vec![&[]]
                } else {
                    bytes.chunks(step).collect()
                };
                for (i, c) in chunks.iter().enumerate() {
                    let op = if i > 0 {
                        0
                    } else if text {
                        1
                    } else {
                        2
                    };
                    let fin = if i + 1 == chunks.len() { 0x80 } else { 0 };
                    stream.extend(frame(fin | op, c));
                    if rnd(5) == 0 {
                        stream.extend(frame(0x89, b"pi"));
                    }
                }
                want.push(format!("{} {body}", if text { "text" } else { "binary" }));
            }
            let duplex = Duplex {
                r: Cursor::new(stream.clone()),
                w: Vec::new(),
            };
            let mut ws = WebSocket::from_raw_socket(duplex, Role::Server, None);
            let mut theirs = Vec::new();
            while let Ok(m) = ws.read() {
                match m {
                    tungstenite::Message::Text(t) => theirs.push(format!("text {t}")),
                    tungstenite::Message::Binary(b) => {
                        theirs.push(format!("binary {}", String::from_utf8_lossy(&b)))
                    }
                    _ => {}
                }
            }
            let (ours, err) = same_in_any_pieces(&stream, &LIM);
            assert_eq!(err, None);
            let ours: Vec<String> = ours
                .into_iter()
                .filter(|e| !e.starts_with("ping"))
                .collect();
            assert_eq!(ours, want);
            assert_eq!(theirs, want);
        }
    }
}
