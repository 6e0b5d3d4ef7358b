//! Incremental, bounded decoder for the middleman message format (PROTOCOL.md §2).
//!
//! The [`Decoder`] owns one connection's inbound byte stream (the payloads of its
//! WebSocket messages after the key, or the raw stream of a TCP peer). Bytes are appended
//! with [`Decoder::feed`]; [`Decoder::next`] yields complete messages that borrow from the
//! decoder's buffer, so a message is never copied unless its body was dot-stuffed.
//!
//! Every line is scanned exactly once, whatever the split of the input. All limits are
//! checked as bytes arrive, so a peer can never make the decoder hold more than
//! `max_message` bytes of one message (plus one read).

use std::borrow::Cow;
use std::ops::Range;

/// Limits of §2. Exceeding `max_line` or `max_message` closes with 1009; more than
/// `max_headers` header lines closes with 1002.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Whole message on the wire, first byte of the first line through the terminator's
    /// line break.
    pub max_message: usize,
    /// One line, without its line break.
    pub max_line: usize,
    /// Header lines in one message.
    pub max_headers: usize,
}

/// Longest TARGET (fixed by §2).
pub const MAX_TARGET: usize = 255;
/// Longest CMD (fixed by §2).
pub const MAX_CMD: usize = 16;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message: 1 << 20,
            max_line: 8 << 10,
            max_headers: 64,
        }
    }
}

/// A framing violation (§7). After one, the decoder yields nothing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// A line longer than `max_line` (close 1009).
    LineTooLong,
    /// A message longer than `max_message` (close 1009).
    MessageTooLong,
    /// More than `max_headers` header lines (close 1002).
    TooManyHeaders,
    /// A first line without a space (close 1002).
    NoSpace,
    /// CMD is not 1 to 16 ASCII letters (close 1002).
    BadCommand,
    /// TARGET is empty, too long or holds a control character (close 1002).
    BadTarget,
}

impl FrameError {
    /// The WebSocket close code §7 assigns to this violation.
    pub fn close_code(self) -> u16 {
        match self {
            FrameError::LineTooLong | FrameError::MessageTooLong => 1009,
            _ => 1002,
        }
    }

    /// A short reason for the close frame.
    pub fn reason(self) -> &'static str {
        match self {
            FrameError::LineTooLong => "line too long",
            FrameError::MessageTooLong => "message too long",
            FrameError::TooManyHeaders => "too many header lines",
            FrameError::NoSpace => "unparsable first line",
            FrameError::BadCommand => "bad command",
            FrameError::BadTarget => "bad target",
        }
    }
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for FrameError {}

/// One decoded protocol message, borrowing from the decoder.
#[derive(Debug, Clone)]
pub struct Message<'a> {
    /// The command, 1 to 16 ASCII letters.
    pub cmd: &'a [u8],
    /// The target, trimmed, non-empty, at most 255 bytes, no control characters.
    pub target: &'a [u8],
    buf: &'a [u8],
    headers: &'a [HeaderSpan],
    /// The body, unstuffed, without the line break before the terminator.
    pub body: Cow<'a, [u8]>,
    /// Every byte of the message came through [`Decoder::feed_utf8`] (already checked to
    /// be UTF-8, e.g. a WebSocket text message), so the message is valid UTF-8.
    pub utf8: bool,
    /// No line of the body starts with `.`, so it is encoded again without stuffing
    /// (a plain copy, no search).
    pub plain_body: bool,
}

impl<'a> Message<'a> {
    /// The headers in order, names and values trimmed, otherwise as sent.
    pub fn headers(&self) -> impl ExactSizeIterator<Item = (&'a [u8], &'a [u8])> + Clone + 'a {
        let buf = self.buf;
        self.headers
            .iter()
            .map(move |h| (&buf[h.name.clone()], &buf[h.value.clone()]))
    }

    /// Number of header lines.
    pub fn header_count(&self) -> usize {
        self.headers.len()
    }

    /// The first header whose name matches `name` case-insensitively: (spelling, value).
    pub fn header(&self, name: &str) -> Option<(&'a [u8], &'a [u8])> {
        self.headers()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
    }

    /// The command as text (always ASCII letters).
    pub fn cmd_str(&self) -> &'a str {
        std::str::from_utf8(self.cmd).unwrap_or("")
    }
}

/// What [`Decoder::next`] found.
#[derive(Debug)]
pub enum Decoded<'a> {
    /// A well-formed message.
    Message(Message<'a>),
    /// A message that had a header line without `:`, a header name that is not a token or
    /// a header value with a control character (§2). It carries the first line and
    /// the headers read before the bad line, with an empty body, so the error can name
    /// them; the connection stays open.
    Malformed(Message<'a>),
}

#[derive(Debug, Clone)]
struct HeaderSpan {
    name: Range<usize>,
    value: Range<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    First,
    Headers,
    Body,
    Skip,
}

/// Buffer capacity an idle decoder keeps (see [`Decoder::shrink`]).
pub const KEEP_BYTES: usize = 2048;
/// Header slots an idle decoder keeps.
pub const KEEP_HEADERS: usize = 16;

/// The incremental decoder. See the module documentation.
#[derive(Debug)]
pub struct Decoder {
    limits: Limits,
    buf: Vec<u8>,
    /// Bytes before this offset belong to messages already handed out.
    consumed: usize,
    /// Start of the next line to scan (always at a line start).
    scan: usize,
    /// The bytes from `scan` up to here were already searched and hold no LF, so a line
    /// that arrives in many pieces is still searched only once.
    searched: usize,
    /// Start of the current message's first line (empty lines before it are skipped).
    msg_start: usize,
    state: State,
    cmd: Range<usize>,
    target: Range<usize>,
    headers: Vec<HeaderSpan>,
    /// Where the body begins, and where its last line's content ends (exclusive).
    body_start: usize,
    body_end: usize,
    /// A body line started with `..` (the body must be copied to unstuff it).
    stuffed: bool,
    /// A body line started with `.` (stuffed or not).
    dotted: bool,
    body_tmp: Vec<u8>,
    failed: Option<FrameError>,
    /// Bytes before this offset may not be valid UTF-8 (they came through `feed`).
    unchecked_end: usize,
}

impl Decoder {
    /// A decoder with the given limits.
    pub fn new(limits: Limits) -> Self {
        Decoder {
            limits,
            buf: Vec::new(),
            consumed: 0,
            scan: 0,
            searched: 0,
            msg_start: 0,
            state: State::First,
            cmd: 0..0,
            target: 0..0,
            headers: Vec::new(),
            body_start: 0,
            body_end: 0,
            stuffed: false,
            dotted: false,
            body_tmp: Vec::new(),
            failed: None,
            unchecked_end: 0,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Change the limits (a configuration reload). They hold from the next byte scanned:
    /// a message already buffered beyond a lowered limit fails when it is scanned on.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Append stream bytes. Bytes of messages already returned are dropped first, so the
    /// buffer only ever holds the unfinished tail of the stream.
    pub fn feed(&mut self, data: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        self.compact();
        self.buf.extend_from_slice(data);
        self.unchecked_end = self.buf.len();
    }

    /// Like [`Decoder::feed`], for bytes known to be valid UTF-8 (a WebSocket text
    /// message, which the frame reader has checked): messages made only of such bytes
    /// say so ([`Message::utf8`]), and are not checked again when relayed.
    pub fn feed_utf8(&mut self, data: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        self.compact();
        self.buf.extend_from_slice(data);
    }

    /// Nothing buffered, between messages, not failed: the next bytes may be read
    /// elsewhere ([`decode_simple`]) without changing what the stream means.
    pub fn is_idle(&self) -> bool {
        self.failed.is_none() && self.state == State::First && self.buffered() == 0
    }

    /// True when the bytes so far end inside a message (more are needed to finish it).
    pub fn needs_more(&self) -> bool {
        self.failed.is_none() && (self.state != State::First || self.scan < self.buf.len())
    }

    /// Bytes held for the unfinished message (for memory accounting).
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.consumed
    }

    /// Heap capacity held by the decoder.
    pub fn capacity(&self) -> usize {
        self.buf.capacity() + self.body_tmp.capacity() + self.headers.capacity() * 48
    }

    /// Release buffer memory when idle (nothing buffered).
    ///
    /// Buffers no larger than [`KEEP_BYTES`] / [`KEEP_HEADERS`] are kept (emptied): the
    /// reactor shrinks after every complete message, and freeing and reallocating them
    /// each time was two malloc/free pairs per received message (~8% of server time in
    /// the request/response profile). Larger ones, left by a big message, are released.
    pub fn shrink(&mut self) {
        if self.buffered() == 0 && self.state == State::First {
            self.compact();
            self.buf.clear();
            self.unchecked_end = 0;
            self.scan = 0;
            self.searched = 0;
            self.msg_start = 0;
            if self.buf.capacity() > KEEP_BYTES {
                self.buf = Vec::new();
            }
            if self.body_tmp.capacity() > KEEP_BYTES {
                self.body_tmp = Vec::new();
            } else {
                self.body_tmp.clear();
            }
            if self.headers.capacity() > KEEP_HEADERS {
                self.headers = Vec::new();
            } else {
                self.headers.clear();
            }
        }
    }

    /// The framing violation that stopped the decoder, if any.
    pub fn failed(&self) -> Option<FrameError> {
        self.failed
    }

    fn compact(&mut self) {
        let n = self.consumed;
        if n == 0 {
            return;
        }
        self.buf.drain(..n);
        self.consumed = 0;
        self.unchecked_end = self.unchecked_end.saturating_sub(n);
        self.scan -= n;
        self.searched = self.searched.saturating_sub(n);
        self.msg_start -= n;
        let shift = |r: &mut Range<usize>| {
            r.start -= n;
            r.end -= n;
        };
        if self.state != State::First {
            shift(&mut self.cmd);
            shift(&mut self.target);
            for h in &mut self.headers {
                shift(&mut h.name);
                shift(&mut h.value);
            }
            if self.state == State::Body {
                self.body_start -= n;
                self.body_end -= n;
            }
        }
    }

    fn fail(&mut self, e: FrameError) -> FrameError {
        self.failed = Some(e);
        e
    }

    /// The next outcome: `Ok(Some(..))` for a message or a malformed message, `Ok(None)`
    /// when more bytes are needed, `Err` on a framing violation (then always `Err`).
    // Not `Iterator::next`: each message borrows the decoder (a lending iterator).
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Decoded<'_>>, FrameError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        loop {
            let from = self.scan;
            let look = self.searched.max(from);
            let Some(lf) = memchr::memchr(b'\n', &self.buf[look..]) else {
                self.searched = self.buf.len();
                return self.check_unfinished().map(|()| None);
            };
            let lf = look - from + lf;
            let line_end = from + lf + 1;
            let content_end = if lf > 0 && self.buf[from + lf - 1] == b'\r' {
                from + lf - 1
            } else {
                from + lf
            };
            self.scan = line_end;
            if self.state == State::First && content_end == from {
                // Empty lines where a first line is expected are ignored.
                self.msg_start = line_end;
                if self.consumed == from {
                    self.consumed = line_end;
                }
                continue;
            }
            if content_end - from > self.limits.max_line {
                return Err(self.fail(FrameError::LineTooLong));
            }
            if line_end - self.msg_start > self.limits.max_message {
                return Err(self.fail(FrameError::MessageTooLong));
            }
            let line = from..content_end;
            let done = match self.state {
                State::First => {
                    self.first_line(line)?;
                    false
                }
                State::Headers => self.header_line(line)?,
                State::Body => self.body_line(line),
                State::Skip => &self.buf[line] == b".",
            };
            if done {
                return Ok(Some(self.finish(line_end)));
            }
        }
    }

    /// §7: passing a limit closes "even before the message is complete".
    fn check_unfinished(&mut self) -> Result<(), FrameError> {
        let pending = &self.buf[self.scan..];
        if self.state == State::First && pending == b"\r" {
            // Perhaps half of an ignored empty line, which belongs to no message.
            return Ok(());
        }
        let mut len = pending.len();
        if pending.last() == Some(&b'\r') {
            len -= 1; // may become half of the CRLF, which a line's length leaves out
        }
        if len > self.limits.max_line {
            return Err(self.fail(FrameError::LineTooLong));
        }
        let start = if self.state == State::First {
            self.scan
        } else {
            self.msg_start
        };
        if self.buf.len() - start > self.limits.max_message {
            return Err(self.fail(FrameError::MessageTooLong));
        }
        Ok(())
    }

    fn first_line(&mut self, line: Range<usize>) -> Result<(), FrameError> {
        let (cmd, target) = match first_line_parts(&self.buf[line.clone()]) {
            Ok(parts) => parts,
            Err(e) => return Err(self.fail(e)),
        };
        self.msg_start = line.start;
        self.cmd = line.start + cmd.start..line.start + cmd.end;
        self.target = line.start + target.start..line.start + target.end;
        self.headers.clear();
        self.state = State::Headers;
        Ok(())
    }

    /// Returns true when the line ends the message.
    fn header_line(&mut self, line: Range<usize>) -> Result<bool, FrameError> {
        let text = &self.buf[line.clone()];
        if text.is_empty() {
            self.state = State::Body;
            self.body_start = self.scan; // just after the blank line
            self.body_end = self.body_start;
            self.stuffed = false;
            self.dotted = false;
            return Ok(false);
        }
        if text == b"." {
            self.body_start = line.start;
            self.body_end = line.start;
            self.stuffed = false;
            return Ok(true);
        }
        let Some(colon) = memchr::memchr(b':', text) else {
            self.state = State::Skip;
            return Ok(false);
        };
        let name = trim(text, 0..colon);
        let value = trim(text, colon + 1..text.len());
        // §2: a name that is not a token, or a value holding a control character other
        // than tab, makes the message malformed exactly like a line without `:` (a lone
        // CR in a value would let a sender forge a header for a receiver that splits
        // lines on CR). The check is one table look-up per header byte.
        if !is_token(&text[name.clone()]) || !is_clean_value(&text[value.clone()]) {
            self.state = State::Skip;
            return Ok(false);
        }
        if self.headers.len() >= self.limits.max_headers {
            return Err(self.fail(FrameError::TooManyHeaders));
        }
        let o = line.start;
        self.headers.push(HeaderSpan {
            name: o + name.start..o + name.end,
            value: o + value.start..o + value.end,
        });
        Ok(false)
    }

    /// Returns true when the line is the terminator.
    fn body_line(&mut self, line: Range<usize>) -> bool {
        let text = &self.buf[line.clone()];
        if text == b"." {
            return true;
        }
        if text.first() == Some(&b'.') {
            self.dotted = true;
            if text.starts_with(b"..") {
                self.stuffed = true;
            }
        }
        self.body_end = line.end;
        false
    }

    fn finish(&mut self, line_end: usize) -> Decoded<'_> {
        let state = self.state;
        self.state = State::First;
        self.consumed = line_end;
        self.msg_start = line_end;
        let buf = &self.buf[..];
        let malformed = state == State::Skip;
        let body: Cow<'_, [u8]> = if malformed || state == State::Headers {
            Cow::Borrowed(&[])
        } else if !self.stuffed {
            Cow::Borrowed(&buf[self.body_start..self.body_end])
        } else {
            // Copy line by line, dropping the stuffing dot of each line starting "..".
            self.body_tmp.clear();
            let mut rest = &buf[self.body_start..self.body_end];
            self.body_tmp.reserve(rest.len());
            while !rest.is_empty() {
                let len = memchr::memchr(b'\n', rest).map_or(rest.len(), |i| i + 1);
                let (line, tail) = rest.split_at(len);
                let line = if line.starts_with(b"..") {
                    &line[1..]
                } else {
                    line
                };
                self.body_tmp.extend_from_slice(line);
                rest = tail;
            }
            Cow::Borrowed(&self.body_tmp[..])
        };
        let msg = Message {
            cmd: &buf[self.cmd.clone()],
            target: &buf[self.target.clone()],
            buf,
            headers: &self.headers,
            body,
            utf8: self.cmd.start >= self.unchecked_end,
            plain_body: state != State::Body || !self.dotted,
        };
        if malformed {
            Decoded::Malformed(msg)
        } else {
            Decoded::Message(msg)
        }
    }
}

/// CMD and TARGET of a first line (§2), as ranges of `text`.
fn first_line_parts(text: &[u8]) -> Result<(Range<usize>, Range<usize>), FrameError> {
    // The space ends a CMD of at most 16 letters: a plain loop over those few bytes (a
    // search set up for long text cost more), the rest searched only to tell the errors
    // apart.
    let head = &text[..text.len().min(MAX_CMD + 1)];
    let sp = match head.iter().position(|&b| b == b' ') {
        Some(sp) => sp,
        None => match memchr::memchr(b' ', text) {
            Some(sp) => sp,
            None => return Err(FrameError::NoSpace),
        },
    };
    if sp == 0 || sp > MAX_CMD || !text[..sp].iter().all(u8::is_ascii_alphabetic) {
        return Err(FrameError::BadCommand);
    }
    let t = trim(text, sp + 1..text.len());
    let target = &text[t.clone()];
    if target.is_empty() || target.len() > MAX_TARGET || has_control(target) {
        return Err(FrameError::BadTarget);
    }
    Ok((0..sp, t))
}

/// A byte below 0x20 or 0x7F in `b`: eight bytes at a time (a byte loop over every
/// target was a tenth of the first line's cost).
fn has_control(b: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    let mut words = b.chunks_exact(8);
    for w in &mut words {
        let mut a = [0u8; 8];
        a.copy_from_slice(w);
        let x = u64::from_ne_bytes(a);
        // A byte below 0x20 (exact for any bytes), or one equal to 0x7F (zero after
        // the XOR).
        let below = x.wrapping_sub(ONES * 0x20) & !x & HIGH;
        let d = x ^ (ONES * 0x7f);
        let del = d.wrapping_sub(ONES) & !d & HIGH;
        if below | del != 0 {
            return true;
        }
    }
    words.remainder().iter().any(|&c| c < 0x20 || c == 0x7f)
}

/// The whole message at the start of `data` when it has the most common shape: a first
/// line, no header, no body line starting with `.`, within `limits` even as one line;
/// with the bytes it takes. It is exactly what an idle [`Decoder`] given `data` (through
/// [`Decoder::feed_utf8`] when `utf8`) would hand out first, with no buffer, state or
/// copy; `None` for anything else (incomplete, other shapes, errors), which the decoder
/// then reads (searching those bytes again: once, as the shortcut is only taken while
/// the decoder is idle). The blank line is looked at before the first line is parsed, so
/// a message with headers costs one search for a line feed here.
pub fn decode_simple<'a>(
    data: &'a [u8],
    limits: &Limits,
    utf8: bool,
) -> Option<(Message<'a>, usize)> {
    let lf = memchr::memchr(b'\n', data)?;
    let content_end = if lf > 0 && data[lf - 1] == b'\r' {
        lf - 1
    } else {
        lf
    };
    if content_end == 0 {
        return None; // an empty line before the message
    }
    // The blank line (no header) first: a message with headers costs one search here.
    let body_start = match data.get(lf + 1..lf + 3)? {
        [b'\r', b'\n'] => lf + 3,
        [b'\n', _] => lf + 2,
        _ => return None,
    };
    let (cmd, target) = first_line_parts(&data[..content_end]).ok()?;
    let mut line = body_start;
    loop {
        if *data.get(line)? == b'.' {
            // The terminator, or a dotted body line (not this shape).
            let end = match data.get(line + 1..)? {
                [b'\r', b'\n', ..] => line + 3,
                [b'\n', ..] => line + 2,
                _ => return None,
            };
            if end > limits.max_message || end > limits.max_line {
                return None;
            }
            // The body ends where its last line's content does (the line break before
            // the terminator is not part of it).
            let body_end = if line == body_start {
                body_start
            } else if data[line - 2] == b'\r' {
                line - 2
            } else {
                line - 1
            };
            let msg = Message {
                cmd: &data[cmd],
                target: &data[target],
                buf: data,
                headers: &[],
                body: Cow::Borrowed(&data[body_start..body_end.max(body_start)]),
                utf8,
                plain_body: true,
            };
            return Some((msg, end));
        }
        line += memchr::memchr(b'\n', &data[line..])? + 1;
    }
}

/// Byte classes for header checks: [`TCHAR`] for bytes allowed in a header name (RFC 9110
/// `tchar`), [`CTL`] for bytes refused in a header value (0x00-0x1F but tab, and 0x7F).
const TCHAR: u8 = 1;
const CTL: u8 = 2;
static HEADER_BYTES: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_alphanumeric() {
            t[b] |= TCHAR;
        }
        if (c < 0x20 && c != b'\t') || c == 0x7f {
            t[b] |= CTL;
        }
        b += 1;
    }
    let specials = b"!#$%&'*+-.^_`|~";
    let mut i = 0;
    while i < specials.len() {
        t[specials[i] as usize] |= TCHAR;
        i += 1;
    }
    t
};

/// A non-empty RFC 9110 token.
fn is_token(name: &[u8]) -> bool {
    !name.is_empty() && name.iter().all(|&b| HEADER_BYTES[b as usize] & TCHAR != 0)
}

/// No control character but tab.
fn is_clean_value(value: &[u8]) -> bool {
    value.iter().all(|&b| HEADER_BYTES[b as usize] & CTL == 0)
}

/// Trim spaces and tabs around `r` within `text`.
fn trim(text: &[u8], r: Range<usize>) -> Range<usize> {
    let s = &text[r.clone()];
    let is_ws = |b: &u8| *b == b' ' || *b == b'\t';
    let Some(first) = s.iter().position(|b| !is_ws(b)) else {
        return r.start..r.start;
    };
    let last = s.iter().rposition(|b| !is_ws(b)).unwrap_or(first);
    r.start + first..r.start + last + 1
}

#[cfg(test)]
mod tests {
    #[test]
    fn utf8_is_known_only_for_bytes_fed_as_utf8() {
        let mut d = Decoder::new(Limits::default());
        d.feed_utf8(b"PUB a\r\n\r\nx\r\n.\r\n");
        let Ok(Some(Decoded::Message(m))) = d.next() else {
            panic!()
        };
        assert!(m.utf8);
        // A message that starts in unchecked bytes is not known, even if it ends in
        // checked ones.
        d.feed(b"PUB b\r\n");
        d.feed_utf8(b"\r\ny\r\n.\r\n");
        let Ok(Some(Decoded::Message(m))) = d.next() else {
            panic!()
        };
        assert!(!m.utf8);
        // After it, checked bytes count again.
        d.feed_utf8(b"PUB c\r\n\r\nz\r\n.\r\n");
        let Ok(Some(Decoded::Message(m))) = d.next() else {
            panic!()
        };
        assert!(m.utf8);
        // Unchecked bytes after the start of a message make it unknown too.
        d.feed_utf8(b"PUB d\r\n");
        d.feed(b"\r\nw\r\n.\r\n");
        let Ok(Some(Decoded::Message(m))) = d.next() else {
            panic!()
        };
        assert!(!m.utf8, "bytes fed after the message began were unchecked");
    }

    use super::*;

    fn all(input: &[u8], limits: Limits) -> (Vec<String>, bool) {
        let mut d = Decoder::new(limits);
        d.feed(input);
        let mut out = Vec::new();
        loop {
            match d.next() {
                Ok(Some(Decoded::Message(m))) => out.push(format!(
                    "{} {} {:?} {:?}",
                    m.cmd_str(),
                    String::from_utf8_lossy(m.target),
                    m.headers()
                        .map(|(n, v)| format!(
                            "{}={}",
                            String::from_utf8_lossy(n),
                            String::from_utf8_lossy(v)
                        ))
                        .collect::<Vec<_>>(),
                    String::from_utf8_lossy(&m.body)
                )),
                Ok(Some(Decoded::Malformed(_))) => out.push("malformed".into()),
                Ok(None) => break,
                Err(e) => {
                    out.push(format!("close {}", e.close_code()));
                    break;
                }
            }
        }
        (out, d.needs_more())
    }

    #[test]
    fn simple_and_stuffed() {
        let (o, p) = all(b"PUB t\r\nA: 1\r\n\r\n..x\r\ny\r\n.\r\n", Limits::default());
        assert_eq!(o, vec![r#"PUB t ["A=1"] ".x\r\ny""#]);
        assert!(!p);
    }

    #[test]
    fn a_body_with_no_line_starting_with_a_dot_is_plain() {
        for (input, plain) in [
            (&b"PUB t\r\n\r\nabc\r\ndef\r\n.\r\n"[..], true),
            (b"PUB t\r\nA: 1\r\n.\r\n", true),
            (b"PUB t\r\n\r\n\r\n.\r\n", true),
            (b"PUB t\r\n\r\na.b\r\n.\r\n", true),
            (b"PUB t\r\n\r\n.abc\r\n.\r\n", false),
            (b"PUB t\r\n\r\n..abc\r\n.\r\n", false),
            (b"PUB t\r\n\r\nabc\r\n..\r\n.\r\n", false),
        ] {
            let mut d = Decoder::new(Limits::default());
            d.feed(input);
            let Ok(Some(Decoded::Message(m))) = d.next() else {
                panic!("{input:?}")
            };
            assert_eq!(m.plain_body, plain, "{input:?}");
            if plain {
                // Nothing to stuff: a plain copy is what push_body would write.
                let mut stuffed = Vec::new();
                crate::protocol::encode::push_body(&mut stuffed, &m.body);
                assert_eq!(stuffed, &m.body[..]);
            }
        }
        // The flag is per message.
        let mut d = Decoder::new(Limits::default());
        d.feed(b"PUB t\r\n\r\n.x\r\n.\r\nPUB t\r\n\r\ny\r\n.\r\n");
        let Ok(Some(Decoded::Message(m))) = d.next() else {
            panic!()
        };
        assert!(!m.plain_body);
        let Ok(Some(Decoded::Message(m))) = d.next() else {
            panic!()
        };
        assert!(m.plain_body);
    }

    #[test]
    fn lone_cr_before_first_line_is_not_a_message() {
        // "\r" then "\n" is an ignored empty line, even when no message fits the limits.
        let limits = Limits {
            max_message: 0,
            ..Limits::default()
        };
        let mut d = Decoder::new(limits);
        d.feed(b"\r");
        assert!(d.next().unwrap().is_none());
        d.feed(b"\n\r\n");
        assert!(d.next().unwrap().is_none());
        assert!(!d.needs_more());
    }

    #[test]
    fn line_in_many_pieces_is_searched_once() {
        let mut d = Decoder::new(Limits::default());
        let mut input = b"PUB t\r\n\r\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 8000));
        input.extend_from_slice(b"\r\n.\r\n");
        let mut got = None;
        for piece in input.chunks(3) {
            d.feed(piece);
            if let Some(Decoded::Message(m)) = d.next().unwrap() {
                got = Some(m.body.len());
            }
            // Nothing before `searched` is looked at again.
            assert!(d.searched <= d.buf.len());
        }
        assert_eq!(got, Some(8000));
        assert!(!d.needs_more());
    }

    #[test]
    fn header_names_are_tokens_and_values_hold_no_control_characters() {
        let l = Limits::default();
        for bad in [
            &b"PUB a\r\nX: a\rcid: forged\r\n\r\n.\r\n"[..],
            b"PUB a\r\ncid\x0b: forged\r\n\r\n.\r\n",
            b"PUB a\r\nX: \x7f\r\n\r\n.\r\n",
            b"PUB a\r\nX: a\x00\r\n\r\n.\r\n",
            b"PUB a\r\nX(1): a\r\n\r\n.\r\n",
            b"PUB a\r\nX\xc3\xa9: a\r\n\r\n.\r\n",
            b"PUB a\r\n: a\r\n\r\n.\r\n",
            b"PUB a\r\n\t: a\r\n\r\n.\r\n",
        ] {
            let (o, p) = all(bad, l);
            assert_eq!(o, vec!["malformed"], "{:?}", String::from_utf8_lossy(bad));
            assert!(!p);
        }
        let (o, _) = all(
            b"PUB a\r\n!#$%&'*+-.^_`|~09Az: a\tb \xc3\xa9:\r\n\r\n.\r\n",
            l,
        );
        assert_eq!(o, vec!["PUB a [\"!#$%&'*+-.^_`|~09Az=a\\tb é:\"] \"\""]);
        // Bad lines do not count against the header-line limit (like a line without ':').
        let one = Limits {
            max_headers: 1,
            ..l
        };
        let (o, _) = all(b"PUB a\r\nA: 1\r\nB\x01: 2\r\nC: 3\r\n.\r\n", one);
        assert_eq!(o, vec!["malformed"]);
    }

    /// A message as text, with its flags.
    fn show(m: &Message<'_>) -> String {
        format!(
            "{:?} {:?} {:?} {:?} utf8={} plain={}",
            String::from_utf8_lossy(m.cmd),
            String::from_utf8_lossy(m.target),
            m.headers().collect::<Vec<_>>(),
            String::from_utf8_lossy(&m.body),
            m.utf8,
            m.plain_body
        )
    }

    /// `decode_simple(data)`, when it decodes, agrees with an idle decoder fed `data`:
    /// the same first message and the same bytes taken. Returns whether it decoded.
    fn simple_agrees(data: &[u8], limits: Limits, utf8: bool) -> bool {
        let Some((m, used)) = decode_simple(data, &limits, utf8) else {
            return false;
        };
        let simple = show(&m);
        let mut d = Decoder::new(limits);
        if utf8 {
            d.feed_utf8(data);
        } else {
            d.feed(data);
        }
        let Ok(Some(Decoded::Message(dm))) = d.next() else {
            panic!("simple decoded {simple} from {data:?}, the decoder did not");
        };
        assert_eq!(simple, show(&dm), "from {data:?}");
        assert_eq!(d.buffered(), data.len() - used, "bytes taken from {data:?}");
        true
    }

    #[test]
    fn the_simple_shape_decodes_as_the_decoder_does() {
        let small = Limits {
            max_message: 30,
            max_line: 20,
            max_headers: 2,
        };
        let messages: [&[u8]; 16] = [
            b"PUB a\r\n\r\nbody\r\n.\r\n",
            b"PUB a\n\nbody\n.\n",
            b"PUB  spaced topic \t\r\n\r\nx\r\n\r\ny\r\n.\r\n",
            b"SUB t\r\n\r\n.\r\n",
            b"SUB t\r\n.\r\n",
            b"PUB a\r\n\r\n\r\n.\r\n",
            b"PUB a\r\n\r\n\n.\r\n",
            b"PUB a\r\n\r\nx\r\r\n.\r\n",
            b"PUB a\r\n\r\n..stuffed\r\n.\r\n",
            b"PUB a\r\n\r\n.x\r\n.\r\n",
            b"PUB a\r\nX: 1\r\n\r\nb\r\n.\r\n",
            b"\r\nPUB a\r\n\r\nb\r\n.\r\n",
            b"PUB\r\n\r\nb\r\n.\r\n",
            b"P1B a\r\n\r\nb\r\n.\r\n",
            b"PUB a\x01\r\n\r\nb\r\n.\r\n",
            b"PUB \xc3\xa9t\xc3\xa9\r\n\r\nb\r\n.\r\n",
        ];
        let mut decoded = 0;
        for m in messages {
            // Alone, cut short anywhere, followed by more, and within small limits.
            let mut two = m.to_vec();
            two.extend_from_slice(b"PUB next\r\n\r\nz\r\n.\r\n");
            for limits in [Limits::default(), small] {
                for utf8 in [true, false] {
                    decoded += usize::from(simple_agrees(m, limits, utf8));
                    decoded += usize::from(simple_agrees(&two, limits, utf8));
                    for cut in 0..m.len() {
                        assert!(decode_simple(&m[..cut], &limits, utf8).is_none());
                    }
                }
            }
        }
        // 8 of the 16 are of its shape (7 fit the small limits), each decoded alone and
        // followed by more, marked UTF-8 or not: (8 + 7) * 2 * 2.
        assert_eq!(decoded, 60);
    }

    #[test]
    fn control_bytes_are_found_anywhere() {
        let naive = |b: &[u8]| b.iter().any(|&c| c < 0x20 || c == 0x7f);
        for len in 0..20 {
            for at in 0..len {
                for c in 0..=255u8 {
                    for fill in [b'a', 0x80, 0xff, 0x20, 0x7e] {
                        let mut v = vec![fill; len];
                        v[at] = c;
                        assert_eq!(has_control(&v), naive(&v), "{v:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn original_clients_shapes() {
        let (o, _) = all(b"EREQ name\n\n\r\n.\r\n", Limits::default());
        assert_eq!(o, vec![r#"EREQ name [] """#]);
        let (o, _) = all(
            b"REQ name\r\nReqID: abc\r\n\r\nbody\r\n.\r\n",
            Limits::default(),
        );
        assert_eq!(o, vec![r#"REQ name ["ReqID=abc"] "body""#]);
    }
}
