//! The NATS client protocol, pure and I/O-free: [`NatsParser`] reads what a NATS server
//! sends to a client, the encoders ([`connect`], [`pub_`], [`hpub`], [`sub`], [`unsub`],
//! [`ping`], [`pong`]) write what a client sends.
//! Reference: <https://docs.nats.io/reference/reference-protocols/nats-protocol>.
//!
//! # Parser
//!
//! Like [`crate::protocol::Decoder`]: bytes are appended with [`NatsParser::feed`] and
//! [`NatsParser::next`] yields complete operations that borrow from the parser's buffer,
//! so a message is never copied after it is fed. Operation names are matched
//! case-insensitively; arguments are separated by runs of spaces or tabs; a control line
//! ends with LF, with or without CR before it; a payload is followed by exactly CRLF.
//!
//! Every line is searched once, whatever the split of the input, and the limits
//! ([`NatsLimits`]) are checked as bytes arrive: an unknown operation is refused from its
//! first byte that no operation name starts with, an over-long line as soon as it is
//! longer than its limit, a message over the payload limits as soon as its control line
//! ends. After [`NatsParser::next`] returns `Ok(None)` the parser holds at most one
//! unfinished operation. Any violation is final: the parser then always returns the same
//! error and the connection should be closed.
//!
//! A malformed header block is not a violation: the message is yielded with
//! [`Headers::is_valid`] false (a NATS server relays header blocks from publishers
//! without checking them, and one bad publisher should not cut the connection).
//!
//! # Encoders
//!
//! Encoders append to a `Vec<u8>` and allocate nothing but its growth. The ones taking
//! subjects, queue names or headers check them first, so no argument can inject a second
//! operation or break the framing; on an error nothing is written.

use std::borrow::Cow;
use std::ops::Range;

use serde::Deserialize;

use crate::protocol::encode::push_dec;

/// The payload limit a NATS server announces by default (`max_payload`, 1 MiB).
pub const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;

/// Limits of [`NatsParser`]. Exceeding one is a [`NatsError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatsLimits {
    /// A control line other than INFO, without its line break. nats-server refuses client
    /// lines over 4 KiB (`max_control_line`), and a delivered MSG line is that line plus
    /// the subscription id: the default, 8 KiB, leaves room for both.
    pub max_control_line: usize,
    /// An INFO line without its line break (its JSON lists the cluster's URLs).
    pub max_info_line: usize,
    /// Payload bytes of one message, header block not counted. Set it to the server's
    /// `max_payload` ([`Info::max_payload`], see [`NatsParser::set_max_payload`]).
    pub max_payload: usize,
    /// Header block of one HMSG. The server counts headers and payload together against
    /// its `max_payload`, so the default (1 MiB) refuses nothing the server accepts with
    /// the default `max_payload`.
    pub max_header: usize,
}

impl Default for NatsLimits {
    fn default() -> Self {
        NatsLimits {
            max_control_line: 8 << 10,
            max_info_line: 64 << 10,
            max_payload: DEFAULT_MAX_PAYLOAD,
            max_header: 1 << 20,
        }
    }
}

/// A protocol violation by the server. After one, the parser yields nothing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatsError {
    /// A line that does not start with a server-to-client operation name (an empty line
    /// included).
    UnknownOp,
    /// A control line over `max_control_line`, or an INFO line over `max_info_line`.
    LineTooLong,
    /// A MSG or HMSG announcing more than `max_payload` payload bytes or more than
    /// `max_header` header bytes.
    PayloadTooLarge,
    /// Arguments that do not fit the operation (their number, a size that is not a
    /// decimal number, header bytes over total bytes, text after PING/PONG/+OK, a CR
    /// inside a MSG line).
    BadArgs,
    /// An INFO whose argument is not a JSON object with the fields' expected types.
    BadInfo,
    /// A payload not followed by CRLF.
    BadPayloadEnd,
}

impl NatsError {
    /// A short description.
    pub fn reason(self) -> &'static str {
        match self {
            NatsError::UnknownOp => "unknown operation",
            NatsError::LineTooLong => "control line too long",
            NatsError::PayloadTooLarge => "message too large",
            NatsError::BadArgs => "bad arguments",
            NatsError::BadInfo => "bad INFO",
            NatsError::BadPayloadEnd => "payload not followed by CRLF",
        }
    }
}

impl std::fmt::Display for NatsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for NatsError {}

/// One operation from the server, borrowing from the parser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op<'a> {
    /// `INFO {json}`: sent first, and again when the cluster changes (protocol 1).
    Info(Info<'a>),
    /// `MSG` or `HMSG` (then [`Msg::headers`] is `Some`).
    Msg(Msg<'a>),
    /// `PING`: answer with [`pong`].
    Ping,
    /// `PONG`: the answer to one of our [`ping`]s.
    Pong,
    /// `+OK` (only in verbose mode, which [`connect`] turns off).
    Ok,
    /// `-ERR '<message>'`: the message without its quotes. Most errors are followed by the
    /// server closing the connection.
    Err(&'a [u8]),
}

/// The fields of INFO a client needs; [`Info::raw`] holds the whole JSON object.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Info<'a> {
    /// The JSON object as sent (spaces around it trimmed).
    #[serde(skip)]
    pub raw: &'a [u8],
    /// The server's unique id.
    #[serde(borrow, default)]
    pub server_id: Cow<'a, str>,
    /// The server's name (its id unless configured).
    #[serde(borrow, default)]
    pub server_name: Cow<'a, str>,
    /// The server's version.
    #[serde(borrow, default)]
    pub version: Cow<'a, str>,
    /// Protocol version the server speaks (1 sends INFO updates).
    #[serde(default)]
    pub proto: i64,
    /// Largest message the server accepts, headers and payload together.
    #[serde(default)]
    pub max_payload: Option<u64>,
    /// Whether the server supports headers (HPUB, HMSG).
    #[serde(default)]
    pub headers: bool,
    /// The id the server gave this connection.
    #[serde(default)]
    pub client_id: Option<u64>,
    /// Whether CONNECT must carry credentials.
    #[serde(default)]
    pub auth_required: bool,
    /// Whether the connection must be upgraded to TLS first.
    #[serde(default)]
    pub tls_required: bool,
    /// The server is in lame duck mode: it will close its clients soon, reconnect
    /// elsewhere.
    #[serde(default)]
    pub ldm: bool,
}

/// A delivered message: `MSG` (no headers) or `HMSG`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg<'a> {
    /// The subject it was published to.
    pub subject: &'a [u8],
    /// The subscription id it was delivered for, as we sent it in SUB.
    pub sid: &'a [u8],
    /// The reply subject, if the publisher gave one.
    pub reply: Option<&'a [u8]>,
    /// The header block of an HMSG; `None` for a MSG.
    pub headers: Option<Headers<'a>>,
    /// The payload.
    pub payload: &'a [u8],
}

impl<'a> Msg<'a> {
    /// The subscription id as a number (as [`sub`] writes it), if it is one.
    pub fn sid_u64(&self) -> Option<u64> {
        parse_u64(self.sid)
    }

    /// The status code of the header block's version line (`NATS/1.0 503`), if any.
    pub fn status(&self) -> Option<u16> {
        self.headers.as_ref().and_then(Headers::status)
    }

    /// The server's answer to a request nobody subscribes to (needs `no_responders` in
    /// CONNECT, which [`connect`] sends): status 503 and no payload.
    pub fn is_no_responders(&self) -> bool {
        self.status() == Some(503) && self.payload.is_empty()
    }
}

/// An HMSG header block: `NATS/1.0[ <status>[ <description>]]` CRLF, then `Name: value`
/// CRLF lines, then CRLF.
///
/// Names are case-sensitive in NATS ([`Headers::get`]); [`Headers::get_ignore_case`]
/// matches as middleman's own headers do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headers<'a> {
    raw: &'a [u8],
    valid: bool,
    status: Option<u16>,
    description: &'a [u8],
    /// The `Name: value` CRLF lines (each holds a `:`), when valid.
    fields: &'a [u8],
}

/// Version line of a header block.
const NATS_10: &[u8] = b"NATS/1.0";

impl<'a> Headers<'a> {
    /// Parse a header block (the first `#header bytes` of an HMSG payload). Never fails:
    /// a malformed block gives [`Headers::is_valid`] false, no status and no fields.
    pub fn parse(raw: &'a [u8]) -> Headers<'a> {
        Self::try_parse(raw).unwrap_or(Headers {
            raw,
            valid: false,
            status: None,
            description: &[],
            fields: &[],
        })
    }

    fn try_parse(raw: &'a [u8]) -> Option<Headers<'a>> {
        // Every CR is followed by LF and every LF preceded by CR (no lone line breaks that
        // another reader would split differently).
        for (i, &b) in raw.iter().enumerate() {
            let ok = match b {
                b'\r' => raw.get(i + 1) == Some(&b'\n'),
                b'\n' => i > 0 && raw[i - 1] == b'\r',
                _ => true,
            };
            if !ok {
                return None;
            }
        }
        // The empty line that ends the block, after the CRLF of the line before it.
        let body = raw.strip_suffix(b"\r\n")?;
        if !body.ends_with(b"\r\n") {
            return None;
        }
        let first_end = memchr::memmem::find(body, b"\r\n")?;
        let version_line = &body[..first_end];
        let fields = &body[first_end + 2..];
        let rest = version_line.strip_prefix(NATS_10)?;
        if !rest.is_empty() && !rest.starts_with(b" ") {
            return None; // NATS/1.0x
        }
        let rest = trim(rest);
        let (status, description) = if rest.is_empty() {
            (None, rest)
        } else {
            let code = rest.get(..3)?;
            if !code.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let after = &rest[3..];
            if !after.is_empty() && !matches!(after[0], b' ' | b'\t') {
                return None;
            }
            let code = code.iter().fold(0u16, |n, &d| n * 10 + u16::from(d - b'0'));
            (Some(code), trim(after))
        };
        // Each field line: a name of printable ASCII other than ':', then ':'.
        for line in Lines(fields) {
            let colon = memchr::memchr(b':', line)?;
            let name = &line[..colon];
            if name.is_empty() || !name.iter().all(|&b| (33..=126).contains(&b)) {
                return None;
            }
        }
        Some(Headers {
            raw,
            valid: true,
            status,
            description,
            fields,
        })
    }

    /// The block as received.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// Whether the block is well formed. A malformed one has no status and no fields.
    pub fn is_valid(&self) -> bool {
        self.valid
    }

    /// The status code after `NATS/1.0` (e.g. 503: no responders), if any.
    pub fn status(&self) -> Option<u16> {
        self.status
    }

    /// The text after the status code (trimmed), e.g. `No Messages`; empty if none.
    pub fn description(&self) -> &'a [u8] {
        self.description
    }

    /// The fields in order: (name as sent, value with spaces and tabs around it trimmed).
    pub fn iter(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + Clone + 'a {
        Lines(self.fields).map(|line| {
            let colon = memchr::memchr(b':', line).unwrap_or(line.len());
            let value = line.get(colon + 1..).unwrap_or(&[]);
            (&line[..colon], trim(value))
        })
    }

    /// Number of fields.
    pub fn len(&self) -> usize {
        Lines(self.fields).count()
    }

    /// Whether there is no field.
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// The value of the first field named exactly `name` (NATS names are case-sensitive).
    pub fn get(&self, name: &[u8]) -> Option<&'a [u8]> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// The value of the first field whose name matches `name` ignoring ASCII case.
    pub fn get_ignore_case(&self, name: &[u8]) -> Option<&'a [u8]> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// Every value of the fields named exactly `name`, in order.
    pub fn get_all<'n>(&self, name: &'n [u8]) -> impl Iterator<Item = &'a [u8]> + 'n
    where
        'a: 'n,
    {
        self.iter().filter(move |(n, _)| *n == name).map(|(_, v)| v)
    }
}

/// CRLF-terminated lines of a block that ends with CRLF (or is empty).
#[derive(Clone)]
struct Lines<'a>(&'a [u8]);

impl<'a> Iterator for Lines<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        if self.0.is_empty() {
            return None;
        }
        let end = memchr::memmem::find(self.0, b"\r\n").unwrap_or(self.0.len());
        let line = &self.0[..end];
        self.0 = self.0.get(end + 2..).unwrap_or(&[]);
        Some(line)
    }
}

/// Spaces and tabs around `s` removed.
fn trim(s: &[u8]) -> &[u8] {
    let is_ws = |b: &u8| *b == b' ' || *b == b'\t';
    let start = s.iter().position(|b| !is_ws(b)).unwrap_or(s.len());
    let end = s.iter().rposition(|b| !is_ws(b)).map_or(start, |i| i + 1);
    &s[start..end]
}

/// A decimal number of 1 to 20 digits that fits in u64.
pub(crate) fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    s.iter().try_fold(0u64, |n, &d| {
        if d.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        } else {
            None
        }
    })
}

/// A size argument: decimal digits only; values that do not fit saturate (and so fail
/// any limit).
fn parse_size(s: &[u8]) -> Option<usize> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0usize, |n, &d| {
        n.saturating_mul(10).saturating_add(usize::from(d - b'0'))
    }))
}

/// Server-to-client operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Info,
    Msg,
    HMsg,
    Ping,
    Pong,
    Ok,
    Err,
}

const OPS: [(&[u8], Kind); 7] = [
    (b"INFO", Kind::Info),
    (b"MSG", Kind::Msg),
    (b"HMSG", Kind::HMsg),
    (b"PING", Kind::Ping),
    (b"PONG", Kind::Pong),
    (b"+OK", Kind::Ok),
    (b"-ERR", Kind::Err),
];

/// Longest operation name.
const MAX_OP: usize = 4;

/// Ends an operation name (LF never reaches here: it ends the line).
fn is_op_end(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r')
}

fn kind_of(word: &[u8]) -> Option<Kind> {
    OPS.iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(word))
        .map(|&(_, k)| k)
}

fn is_op_prefix(word: &[u8]) -> bool {
    OPS.iter()
        .any(|(name, _)| name.len() >= word.len() && name[..word.len()].eq_ignore_ascii_case(word))
}

/// A MSG/HMSG whose control line is read, waiting for its payload. Offsets are from the
/// start of the operation (the parser's `consumed`), so compaction does not move them.
#[derive(Debug, Clone)]
struct Pending {
    subject: Range<usize>,
    sid: Range<usize>,
    reply: Option<Range<usize>>,
    /// Header bytes (HMSG only).
    hdr: Option<usize>,
    /// Where the payload (header block included) starts.
    payload_start: usize,
    /// Header and payload bytes.
    total: usize,
}

#[derive(Debug, Clone)]
enum State {
    Line,
    Payload(Pending),
}

/// Buffer capacity an idle parser keeps (see [`NatsParser::shrink`]).
pub const KEEP_BYTES: usize = 64 << 10;

/// The incremental parser of server-to-client operations. See the module documentation.
#[derive(Debug)]
pub struct NatsParser {
    limits: NatsLimits,
    buf: Vec<u8>,
    /// Start of the current operation: bytes before it were handed out.
    consumed: usize,
    /// Bytes from `consumed` up to here hold no LF (each line is searched once).
    searched: usize,
    state: State,
    failed: Option<NatsError>,
}

impl Default for NatsParser {
    fn default() -> Self {
        NatsParser::new(NatsLimits::default())
    }
}

impl NatsParser {
    /// A parser with the given limits.
    pub fn new(limits: NatsLimits) -> Self {
        NatsParser {
            limits,
            buf: Vec::new(),
            consumed: 0,
            searched: 0,
            state: State::Line,
            failed: None,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> NatsLimits {
        self.limits
    }

    /// Adopt the server's `max_payload` ([`Info::max_payload`]) for control lines read from
    /// now on. The server counts headers in it, so it bounds an HMSG's payload too.
    pub fn set_max_payload(&mut self, max_payload: usize) {
        self.limits.max_payload = max_payload;
    }

    /// Append stream bytes. Bytes of operations already returned are dropped first, so the
    /// buffer holds only the unfinished tail of the stream. Call [`NatsParser::next`]
    /// until it returns `Ok(None)` after each feed: limits are checked there.
    pub fn feed(&mut self, data: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        self.compact();
        self.buf.extend_from_slice(data);
    }

    /// Bytes held for the unfinished operation.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.consumed
    }

    /// Heap capacity held.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// True when the bytes so far end inside an operation.
    pub fn needs_more(&self) -> bool {
        self.failed.is_none() && self.buffered() > 0
    }

    /// The violation that stopped the parser, if any.
    pub fn failed(&self) -> Option<NatsError> {
        self.failed
    }

    /// Release buffer memory when idle (nothing buffered); a buffer no larger than
    /// [`KEEP_BYTES`] is kept, emptied.
    pub fn shrink(&mut self) {
        if self.buffered() == 0 && matches!(self.state, State::Line) {
            self.buf.clear();
            self.consumed = 0;
            self.searched = 0;
            if self.buf.capacity() > KEEP_BYTES {
                self.buf = Vec::new();
            }
        }
    }

    fn compact(&mut self) {
        let n = self.consumed;
        if n == 0 {
            return;
        }
        self.buf.drain(..n);
        self.consumed = 0;
        self.searched = self.searched.saturating_sub(n);
    }

    fn fail(&mut self, e: NatsError) -> NatsError {
        self.failed = Some(e);
        e
    }

    /// The next operation: `Ok(Some(..))`, `Ok(None)` when more bytes are needed, `Err` on
    /// a violation (then always `Err`).
    // Not `Iterator::next`: each operation borrows the parser (a lending iterator).
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Op<'_>>, NatsError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let start = self.consumed;
        if let State::Line = self.state {
            let look = self.searched.max(start);
            let Some(i) = memchr::memchr(b'\n', &self.buf[look..]) else {
                self.searched = self.buf.len();
                return self.check_partial_line().map(|()| None);
            };
            let lf = look + i;
            let content_end = if lf > start && self.buf[lf - 1] == b'\r' {
                lf - 1
            } else {
                lf
            };
            let line_end = lf + 1;
            self.searched = line_end;
            let Some((kind, op_end)) = self.op_of_line(start..content_end, true)? else {
                return Err(self.fail(NatsError::UnknownOp)); // a complete line has a name
            };
            let args = op_end..content_end;
            match kind {
                Kind::Msg | Kind::HMsg => {
                    let pending = self.msg_line(kind, args, line_end)?;
                    self.state = State::Payload(pending);
                    // Falls through to the payload below: it may be here already.
                }
                Kind::Info => {
                    self.consumed = line_end;
                    let json = trim(&self.buf[args]);
                    return match parse_info(json) {
                        Ok(info) => Ok(Some(Op::Info(info))),
                        Err(e) => {
                            self.failed = Some(e);
                            Err(e)
                        }
                    };
                }
                Kind::Err => {
                    self.consumed = line_end;
                    let text = trim(&self.buf[args]);
                    let text = match text {
                        [b'\'', inner @ .., b'\''] => inner,
                        other => other,
                    };
                    return Ok(Some(Op::Err(text)));
                }
                Kind::Ping | Kind::Pong | Kind::Ok => {
                    if !trim(&self.buf[args]).is_empty() {
                        return Err(self.fail(NatsError::BadArgs));
                    }
                    self.consumed = line_end;
                    return Ok(Some(match kind {
                        Kind::Ping => Op::Ping,
                        Kind::Pong => Op::Pong,
                        _ => Op::Ok,
                    }));
                }
            }
        }
        let State::Payload(p) = &self.state else {
            return Ok(None);
        };
        let end = start + p.payload_start + p.total; // the payload's CRLF follows
        if self.buf.len() < end + 2 {
            // A wrong first byte after the payload is refused at once.
            if self.buf.get(end).is_some_and(|&b| b != b'\r') {
                return Err(self.fail(NatsError::BadPayloadEnd));
            }
            return Ok(None);
        }
        let at = |r: &Range<usize>| start + r.start..start + r.end;
        let (subject, sid, reply) = (at(&p.subject), at(&p.sid), p.reply.as_ref().map(at));
        let (payload_start, hdr) = (start + p.payload_start, p.hdr);
        if self.buf[end..end + 2] != *b"\r\n" {
            return Err(self.fail(NatsError::BadPayloadEnd));
        }
        self.state = State::Line;
        self.consumed = end + 2;
        self.searched = end + 2;
        let buf = &self.buf[..];
        let (headers, payload) = match hdr {
            Some(h) => (
                Some(Headers::parse(&buf[payload_start..payload_start + h])),
                &buf[payload_start + h..end],
            ),
            None => (None, &buf[payload_start..end]),
        };
        Ok(Some(Op::Msg(Msg {
            subject: &buf[subject],
            sid: &buf[sid],
            reply: reply.map(|r| &buf[r]),
            headers,
            payload,
        })))
    }

    /// The operation of the line (or the start of a line) at `line` and the end of its
    /// name, after checking the name and then the line's length, in that order whether the
    /// line is complete or not, so that any split of the input gives the same error.
    /// `Ok(None)`: the name of an incomplete line is still arriving.
    fn op_of_line(
        &mut self,
        line: Range<usize>,
        complete: bool,
    ) -> Result<Option<(Kind, usize)>, NatsError> {
        match op_of_line(&self.buf[line.clone()], complete, self.limits) {
            Ok(found) => Ok(found.map(|(kind, word)| (kind, line.start + word))),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Limits on a line whose LF has not arrived yet.
    fn check_partial_line(&mut self) -> Result<(), NatsError> {
        if !matches!(self.state, State::Line) || self.consumed == self.buf.len() {
            return Ok(());
        }
        self.op_of_line(self.consumed..self.buf.len(), false)
            .map(|_| ())
    }

    /// Parse the arguments of MSG/HMSG (`args`: the line after the name, without its line
    /// break) and check the sizes against the limits.
    fn msg_line(
        &mut self,
        kind: Kind,
        args: Range<usize>,
        line_end: usize,
    ) -> Result<Pending, NatsError> {
        let start = self.consumed;
        let Some((tokens, n)) = split_args(&self.buf[args.clone()], args.start - start) else {
            return Err(self.fail(NatsError::BadArgs));
        };
        let sizes = if kind == Kind::HMsg { 2 } else { 1 };
        if n != 2 + sizes && n != 3 + sizes {
            return Err(self.fail(NatsError::BadArgs));
        }
        let size = |r: &Range<usize>| parse_size(&self.buf[start + r.start..start + r.end]);
        let (hdr, total) = if kind == Kind::HMsg {
            match (size(&tokens[n - 2]), size(&tokens[n - 1])) {
                (Some(h), Some(t)) => (Some(h), t),
                _ => return Err(self.fail(NatsError::BadArgs)),
            }
        } else {
            match size(&tokens[n - 1]) {
                Some(t) => (None, t),
                None => return Err(self.fail(NatsError::BadArgs)),
            }
        };
        let h = hdr.unwrap_or(0);
        if h > total {
            return Err(self.fail(NatsError::BadArgs));
        }
        // Whatever the limits, the operation must fit in a Vec (so no offset overflows).
        let room = (isize::MAX as usize).saturating_sub(line_end - start + 2);
        if h > self.limits.max_header || total - h > self.limits.max_payload || total > room {
            return Err(self.fail(NatsError::PayloadTooLarge));
        }
        Ok(Pending {
            subject: tokens[0].clone(),
            sid: tokens[1].clone(),
            reply: (n == 3 + sizes).then(|| tokens[2].clone()),
            hdr,
            payload_start: line_end - start,
            total,
        })
    }
}

/// See [`NatsParser::op_of_line`]; `word` is relative to `text`.
fn op_of_line(
    text: &[u8],
    complete: bool,
    limits: NatsLimits,
) -> Result<Option<(Kind, usize)>, NatsError> {
    let head = &text[..text.len().min(MAX_OP + 1)];
    let word = match head.iter().position(|&b| is_op_end(b)) {
        Some(word) => word,
        None if head.len() > MAX_OP => return Err(NatsError::UnknownOp),
        None if complete => text.len(),
        // The name is still arriving: it must begin some operation's name.
        None if is_op_prefix(text) => return Ok(None),
        None => return Err(NatsError::UnknownOp),
    };
    let kind = kind_of(&text[..word]).ok_or(NatsError::UnknownOp)?;
    let limit = if kind == Kind::Info {
        limits.max_info_line
    } else {
        limits.max_control_line
    };
    let mut len = text.len();
    if !complete && text.last() == Some(&b'\r') {
        len -= 1; // perhaps the CR of the line's CRLF, which is not counted
    }
    if len > limit {
        return Err(NatsError::LineTooLong);
    }
    Ok(Some((kind, word)))
}

/// The arguments of a MSG/HMSG line, split at runs of spaces and tabs, as ranges offset by
/// `offset`; `None` when there are more than five or a CR is among them.
fn split_args(text: &[u8], offset: usize) -> Option<([Range<usize>; 5], usize)> {
    if text.contains(&b'\r') {
        return None;
    }
    let mut tokens: [Range<usize>; 5] = Default::default();
    let mut n = 0;
    let mut i = 0;
    while i < text.len() {
        if matches!(text[i], b' ' | b'\t') {
            i += 1;
            continue;
        }
        let from = i;
        while i < text.len() && !matches!(text[i], b' ' | b'\t') {
            i += 1;
        }
        *tokens.get_mut(n)? = offset + from..offset + i;
        n += 1;
    }
    Some((tokens, n))
}

fn parse_info(json: &[u8]) -> Result<Info<'_>, NatsError> {
    if json.first() != Some(&b'{') {
        return Err(NatsError::BadInfo);
    }
    let mut info: Info<'_> = serde_json::from_slice(json).map_err(|_| NatsError::BadInfo)?;
    info.raw = json;
    Ok(info)
}

// ---------------------------------------------------------------------------- encoders

/// Why an encoder refused its arguments (nothing was written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodeError {
    /// A subject that is empty, has an empty token (`a..b`, `.a`), holds a space or
    /// control byte, or a wildcard token where none may be (`*` or `>` to publish, `>`
    /// not last to subscribe).
    BadSubject,
    /// A reply subject that is not a valid subject without wildcards.
    BadReply,
    /// A queue group name that is empty or holds a space or control byte.
    BadQueue,
    /// A header name that is empty or holds a byte outside printable ASCII, or `:`.
    BadHeaderName,
    /// A header value holding a control byte other than tab (CR or LF would end it).
    BadHeaderValue,
}

impl std::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EncodeError::BadSubject => "invalid subject",
            EncodeError::BadReply => "invalid reply subject",
            EncodeError::BadQueue => "invalid queue group",
            EncodeError::BadHeaderName => "invalid header name",
            EncodeError::BadHeaderValue => "invalid header value",
        })
    }
}

impl std::error::Error for EncodeError {}

/// What [`connect`] sends besides the fixed options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectOpts<'a> {
    /// A name for this connection (shown by the server's monitoring).
    pub name: Option<&'a str>,
    /// User and password, when the server requires them.
    pub user: Option<&'a str>,
    pub pass: Option<&'a str>,
    /// A token, when the server requires one.
    pub auth_token: Option<&'a str>,
    /// Receive our own publications on our subscriptions (off by default: a backplane
    /// must not hear itself).
    pub echo: bool,
}

/// `CONNECT {..}` CRLF: not verbose (no +OK), not pedantic, headers and no-responders
/// messages on, protocol 1 (INFO updates), `lang` "rust", `version` middleman's. Strings
/// are JSON-escaped.
pub fn connect(buf: &mut Vec<u8>, opts: &ConnectOpts<'_>) {
    buf.extend_from_slice(
        b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"no_responders\":true,\"echo\":",
    );
    buf.extend_from_slice(if opts.echo { b"true" } else { b"false" });
    buf.extend_from_slice(b",\"lang\":\"rust\",\"version\":");
    json_string(buf, env!("CARGO_PKG_VERSION"));
    buf.extend_from_slice(b",\"protocol\":1");
    for (key, value) in [
        ("name", opts.name),
        ("user", opts.user),
        ("pass", opts.pass),
        ("auth_token", opts.auth_token),
    ] {
        if let Some(value) = value {
            buf.push(b',');
            json_string(buf, key);
            buf.push(b':');
            json_string(buf, value);
        }
    }
    buf.extend_from_slice(b"}\r\n");
}

/// `PUB <subject> [reply] <#bytes>` CRLF payload CRLF.
pub fn pub_(
    buf: &mut Vec<u8>,
    subject: &[u8],
    reply: Option<&[u8]>,
    payload: &[u8],
) -> Result<(), EncodeError> {
    pub_parts(buf, subject, reply, b"", payload)
}

/// [`pub_`] of `head` followed by `payload` as one payload, without joining them first.
pub fn pub_parts(
    buf: &mut Vec<u8>,
    subject: &[u8],
    reply: Option<&[u8]>,
    head: &[u8],
    payload: &[u8],
) -> Result<(), EncodeError> {
    check_pub_subjects(subject, reply)?;
    let len = head.len() + payload.len();
    buf.reserve(subject.len() + reply.map_or(0, <[u8]>::len) + len + 32);
    buf.extend_from_slice(b"PUB ");
    subject_and_reply(buf, subject, reply);
    push_dec(buf, len as u64);
    buf.extend_from_slice(b"\r\n");
    buf.extend_from_slice(head);
    buf.extend_from_slice(payload);
    buf.extend_from_slice(b"\r\n");
    Ok(())
}

/// The first byte of a batch of relayed messages on a `pub` subject: `+`, then for each
/// message its length (4 bytes, big-endian) and its bytes. No protocol message starts
/// with `+` (a command is letters), so a payload without it is one message.
pub const BATCH: u8 = b'+';

/// Digits of the size in a PUB that may grow ([`pub_batch_open`]): zero-padded, so the
/// size can be written again in place (nats-server reads up to 9 digits).
const BATCH_SIZE_DIGITS: usize = 8;

/// Largest batch payload (what 8 digits hold).
pub const MAX_BATCH: usize = 99_999_999;

/// `PUB <subject> [reply] <size>` CRLF, a batch of one item (the concatenation of
/// `item`'s parts), CRLF, the size zero-padded so [`pub_batch_extend`] can add items.
/// Returns where the size digits are in `buf` (a reply's last bytes end one byte before).
pub fn pub_batch_open(
    buf: &mut Vec<u8>,
    subject: &[u8],
    reply: Option<&[u8]>,
    item: &[&[u8]],
) -> Result<usize, EncodeError> {
    check_pub_subjects(subject, reply)?;
    let len: usize = item.iter().map(|p| p.len()).sum();
    buf.reserve(subject.len() + reply.map_or(0, <[u8]>::len) + len + 24);
    buf.extend_from_slice(b"PUB ");
    subject_and_reply(buf, subject, reply);
    let at = buf.len();
    buf.extend_from_slice(&[b'0'; BATCH_SIZE_DIGITS]);
    buf.extend_from_slice(b"\r\n");
    buf.push(BATCH);
    buf.extend_from_slice(b"\r\n");
    pub_batch_extend(buf, at, item);
    Ok(at)
}

/// Add an item (the concatenation of `item`'s parts) to the batch whose PUB
/// [`pub_batch_open`] wrote with its size at `at`; that PUB must end `buf`. The caller
/// keeps the payload within [`MAX_BATCH`] and nats-server's `max_payload`.
pub fn pub_batch_extend(buf: &mut Vec<u8>, at: usize, item: &[&[u8]]) {
    buf.truncate(buf.len() - 2); // the CRLF after the payload
    let len: usize = item.iter().map(|p| p.len()).sum();
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    for p in item {
        buf.extend_from_slice(p);
    }
    let size = buf.len() - (at + BATCH_SIZE_DIGITS + 2);
    buf.extend_from_slice(b"\r\n");
    write_padded(&mut buf[at..at + BATCH_SIZE_DIGITS], size as u64);
}

/// Write `n` in decimal over `digits`, zero-padded (the high digits cut if it does not
/// fit: callers size the field for their largest value).
pub fn write_padded(digits: &mut [u8], mut n: u64) {
    for d in digits.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// Bytes a batch of one item of `len` bytes adds to the payload ([`pub_batch_open`]), or
/// one more item to a batch ([`pub_batch_extend`]).
pub fn batch_item_cost(len: usize, first: bool) -> usize {
    len + 4 + usize::from(first)
}

/// The messages of a payload received on a `pub` subject: the items of a batch, or the
/// payload as one message. A batch cut short ends where it stops making sense.
pub fn batch_items(payload: &[u8]) -> BatchItems<'_> {
    match payload.split_first() {
        Some((&BATCH, rest)) => BatchItems { rest, whole: false },
        _ => BatchItems {
            rest: payload,
            whole: true,
        },
    }
}

/// See [`batch_items`].
#[derive(Debug, Clone)]
pub struct BatchItems<'a> {
    rest: &'a [u8],
    whole: bool,
}

impl<'a> Iterator for BatchItems<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        if self.whole {
            self.whole = false;
            let all = std::mem::take(&mut self.rest);
            return Some(all);
        }
        let (len, rest) = self.rest.split_first_chunk::<4>()?;
        let len = u32::from_be_bytes(*len) as usize;
        if rest.len() < len {
            self.rest = &[];
            return None;
        }
        let (item, rest) = rest.split_at(len);
        self.rest = rest;
        Some(item)
    }
}

/// `HPUB <subject> [reply] <#header bytes> <#total bytes>` CRLF, the header block
/// (`NATS/1.0` CRLF, `Name: value` CRLF each, CRLF), payload CRLF. Names keep their case
/// (NATS names are case-sensitive); a receiver trims spaces and tabs around values.
pub fn hpub(
    buf: &mut Vec<u8>,
    subject: &[u8],
    reply: Option<&[u8]>,
    headers: &[(&[u8], &[u8])],
    payload: &[u8],
) -> Result<(), EncodeError> {
    check_pub_subjects(subject, reply)?;
    for (name, value) in headers {
        if name.is_empty() || !name.iter().all(|&b| (33..=126).contains(&b) && b != b':') {
            return Err(EncodeError::BadHeaderName);
        }
        if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err(EncodeError::BadHeaderValue);
        }
    }
    let hdr = header_block_len(headers);
    buf.reserve(subject.len() + reply.map_or(0, <[u8]>::len) + hdr + payload.len() + 56);
    buf.extend_from_slice(b"HPUB ");
    subject_and_reply(buf, subject, reply);
    push_dec(buf, hdr as u64);
    buf.push(b' ');
    push_dec(buf, (hdr + payload.len()) as u64);
    buf.extend_from_slice(b"\r\nNATS/1.0\r\n");
    for (name, value) in headers {
        buf.extend_from_slice(name);
        buf.extend_from_slice(b": ");
        buf.extend_from_slice(value);
        buf.extend_from_slice(b"\r\n");
    }
    buf.extend_from_slice(b"\r\n");
    buf.extend_from_slice(payload);
    buf.extend_from_slice(b"\r\n");
    Ok(())
}

/// Bytes of the header block [`hpub`] writes for `headers` (the server counts them with
/// the payload against its `max_payload`).
pub fn header_block_len(headers: &[(&[u8], &[u8])]) -> usize {
    NATS_10.len()
        + 2
        + headers
            .iter()
            .map(|(n, v)| n.len() + v.len() + 4)
            .sum::<usize>()
        + 2
}

/// `SUB <subject> [queue group] <sid>` CRLF. The subject may hold wildcards.
pub fn sub(
    buf: &mut Vec<u8>,
    subject: &[u8],
    queue: Option<&[u8]>,
    sid: u64,
) -> Result<(), EncodeError> {
    if !valid_subject(subject, true) {
        return Err(EncodeError::BadSubject);
    }
    if let Some(q) = queue {
        if q.is_empty() || q.iter().any(|&b| b <= b' ' || b == 0x7f) {
            return Err(EncodeError::BadQueue);
        }
    }
    buf.extend_from_slice(b"SUB ");
    buf.extend_from_slice(subject);
    buf.push(b' ');
    if let Some(q) = queue {
        buf.extend_from_slice(q);
        buf.push(b' ');
    }
    push_dec(buf, sid);
    buf.extend_from_slice(b"\r\n");
    Ok(())
}

/// `UNSUB <sid> [max msgs]` CRLF: with `max`, the server unsubscribes after that many
/// messages in all.
pub fn unsub(buf: &mut Vec<u8>, sid: u64, max: Option<u64>) {
    buf.extend_from_slice(b"UNSUB ");
    push_dec(buf, sid);
    if let Some(max) = max {
        buf.push(b' ');
        push_dec(buf, max);
    }
    buf.extend_from_slice(b"\r\n");
}

/// `PING` CRLF.
pub fn ping(buf: &mut Vec<u8>) {
    buf.extend_from_slice(b"PING\r\n");
}

/// `PONG` CRLF (the answer to the server's PING).
pub fn pong(buf: &mut Vec<u8>) {
    buf.extend_from_slice(b"PONG\r\n");
}

fn check_pub_subjects(subject: &[u8], reply: Option<&[u8]>) -> Result<(), EncodeError> {
    if !valid_subject(subject, false) {
        return Err(EncodeError::BadSubject);
    }
    if reply.is_some_and(|r| !valid_subject(r, false)) {
        return Err(EncodeError::BadReply);
    }
    Ok(())
}

/// `subject [reply] ` (with the space before the size).
fn subject_and_reply(buf: &mut Vec<u8>, subject: &[u8], reply: Option<&[u8]>) {
    buf.extend_from_slice(subject);
    buf.push(b' ');
    if let Some(r) = reply {
        buf.extend_from_slice(r);
        buf.push(b' ');
    }
}

/// A subject: non-empty tokens separated by `.`, no space or control byte; wildcard tokens
/// (`*`, and `>` as the last token) only when `wildcards`.
pub fn valid_subject(subject: &[u8], wildcards: bool) -> bool {
    if subject.is_empty() {
        return false;
    }
    let mut tokens = subject.split(|&b| b == b'.').peekable();
    while let Some(t) = tokens.next() {
        if t.is_empty() || t.iter().any(|&b| b <= b' ' || b == 0x7f) {
            return false;
        }
        let last = tokens.peek().is_none();
        match t {
            b"*" if !wildcards => return false,
            b">" if !wildcards || !last => return false,
            _ => {}
        }
    }
    true
}

/// A JSON string literal: `"` and `\` escaped, control characters as `\n`, `\u00XX`...
fn json_string(buf: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    buf.push(b'"');
    for &b in s.as_bytes() {
        match b {
            b'"' => buf.extend_from_slice(b"\\\""),
            b'\\' => buf.extend_from_slice(b"\\\\"),
            b'\n' => buf.extend_from_slice(b"\\n"),
            b'\r' => buf.extend_from_slice(b"\\r"),
            b'\t' => buf.extend_from_slice(b"\\t"),
            0..=0x1f | 0x7f => buf.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 15)],
            ]),
            _ => buf.push(b),
        }
    }
    buf.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_grows_in_place_and_splits_back_into_its_items() {
        let mut buf = b"PING\r\n".to_vec();
        let items: [&[u8]; 4] = [b"MSG a\r\n\r\none\r\n.\r\n", b"", b"+x", &[7; 300]];
        let at = pub_batch_open(&mut buf, b"mm.pub.a", None, &[items[0]]).unwrap();
        for it in &items[1..] {
            pub_batch_extend(&mut buf, at, &[it]);
        }
        // What nats-server reads: the size, then exactly that many payload bytes.
        let text = &buf[6..];
        let eol = text.windows(2).position(|w| w == b"\r\n").unwrap();
        let line = std::str::from_utf8(&text[..eol]).unwrap();
        let size: usize = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(line.starts_with("PUB mm.pub.a 0"), "{line}");
        let payload = &text[eol + 2..eol + 2 + size];
        assert_eq!(&text[eol + 2 + size..], b"\r\n");
        let cost: usize = items
            .iter()
            .enumerate()
            .map(|(i, it)| batch_item_cost(it.len(), i == 0))
            .sum();
        assert_eq!(size, cost);
        assert_eq!(batch_items(payload).collect::<Vec<_>>(), items.to_vec());
        // A payload without the marker is one message; a batch cut short stops.
        assert_eq!(
            batch_items(b"MSG b\r\n").collect::<Vec<_>>(),
            vec![&b"MSG b\r\n"[..]]
        );
        assert_eq!(batch_items(&payload[..payload.len() - 1]).count(), 3);
        assert_eq!(batch_items(b"+\0\0").count(), 0);
    }

    fn lossy(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    /// An owned, comparable rendering of one operation.
    fn show(op: &Op<'_>) -> String {
        match op {
            Op::Info(i) => format!(
                "INFO id={} max={:?} headers={} proto={} raw={}",
                i.server_id,
                i.max_payload,
                i.headers,
                i.proto,
                lossy(i.raw)
            ),
            Op::Msg(m) => {
                let mut s = format!(
                    "MSG {} sid={} reply={:?} payload={:?}",
                    lossy(m.subject),
                    lossy(m.sid),
                    m.reply.map(lossy),
                    lossy(m.payload)
                );
                if let Some(h) = &m.headers {
                    s += &format!(
                        " hdr valid={} status={:?} desc={:?} fields={:?}",
                        h.is_valid(),
                        h.status(),
                        lossy(h.description()),
                        h.iter()
                            .map(|(n, v)| format!("{}={}", lossy(n), lossy(v)))
                            .collect::<Vec<_>>()
                    );
                }
                s
            }
            Op::Ping => "PING".into(),
            Op::Pong => "PONG".into(),
            Op::Ok => "+OK".into(),
            Op::Err(m) => format!("-ERR {}", lossy(m)),
        }
    }

    /// Feed `pieces` in order, draining after each; the outcomes, ending with the error if
    /// one stopped the parser.
    fn run<'a>(limits: NatsLimits, pieces: impl IntoIterator<Item = &'a [u8]>) -> Vec<String> {
        let mut p = NatsParser::new(limits);
        let mut out = Vec::new();
        for piece in pieces {
            p.feed(piece);
            loop {
                match p.next() {
                    Ok(Some(op)) => out.push(show(&op)),
                    Ok(None) => break,
                    Err(e) => {
                        out.push(format!("error {e:?}"));
                        assert_eq!(p.next(), Err(e), "an error is final");
                        return out;
                    }
                }
            }
        }
        out
    }

    /// The outcomes of `input` whole, which must be the same byte at a time and split in
    /// two at every position.
    fn all_splits(limits: NatsLimits, input: &[u8]) -> Vec<String> {
        let whole = run(limits, [input]);
        assert_eq!(run(limits, input.chunks(1)), whole, "byte at a time");
        for i in 0..=input.len() {
            let (a, b) = input.split_at(i);
            assert_eq!(run(limits, [a, b]), whole, "split at {i}");
        }
        whole
    }

    fn ok(input: &[u8]) -> Vec<String> {
        all_splits(NatsLimits::default(), input)
    }

    /// As nats-server 2.9.10 sends it (with the space before CRLF).
    const INFO: &[u8] = b"INFO {\"server_id\":\"NBRUMZPOU6J\",\"server_name\":\"n1\",\"version\":\"2.9.10\",\"proto\":1,\"go\":\"go1.19.8\",\"host\":\"127.0.0.1\",\"port\":43941,\"headers\":true,\"max_payload\":1048576,\"client_id\":4,\"client_ip\":\"127.0.0.1\"} \r\n";

    #[test]
    fn info_fields_and_raw_json() {
        let mut p = NatsParser::default();
        p.feed(INFO);
        let Ok(Some(Op::Info(i))) = p.next() else {
            panic!("no INFO")
        };
        assert_eq!(i.server_id, "NBRUMZPOU6J");
        assert_eq!(i.server_name, "n1");
        assert_eq!(i.version, "2.9.10");
        assert_eq!(i.proto, 1);
        assert_eq!(i.max_payload, Some(1 << 20));
        assert!(i.headers);
        assert_eq!(i.client_id, Some(4));
        assert!(!i.auth_required && !i.tls_required && !i.ldm);
        assert!(i.raw.starts_with(b"{\"server_id\"") && i.raw.ends_with(b"\"127.0.0.1\"}"));
        assert_eq!(p.next(), Ok(None));
        assert!(!p.needs_more());
        ok(INFO);
        // Escaped strings are unescaped; unknown fields and missing ones are fine.
        let out = ok(b"info {\"server_id\":\"a\\\"b\",\"nested\":{\"server_id\":\"x\"}}\r\n");
        assert_eq!(
            out,
            [
                r#"INFO id=a"b max=None headers=false proto=0 raw={"server_id":"a\"b","nested":{"server_id":"x"}}"#
            ]
        );
    }

    #[test]
    fn every_op_whole_and_split_everywhere() {
        assert_eq!(
            ok(b"MSG foo.bar 9 11\r\nHello World\r\n"),
            [r#"MSG foo.bar sid=9 reply=None payload="Hello World""#]
        );
        assert_eq!(
            ok(b"MSG foo.bar 9 _INBOX.34 11\r\nHello World\r\n"),
            [r#"MSG foo.bar sid=9 reply=Some("_INBOX.34") payload="Hello World""#]
        );
        assert_eq!(
            ok(b"HMSG FOO.BAR 9 34 45\r\nNATS/1.0\r\nFoodGroup: vegetable\r\n\r\nHello World\r\n"),
            [
                r#"MSG FOO.BAR sid=9 reply=None payload="Hello World" hdr valid=true status=None desc="" fields=["FoodGroup=vegetable"]"#
            ]
        );
        assert_eq!(
            ok(b"HMSG FOO.BAR 9 BAZ.69 34 45\r\nNATS/1.0\r\nFoodGroup: vegetable\r\n\r\nHello World\r\n"),
            [r#"MSG FOO.BAR sid=9 reply=Some("BAZ.69") payload="Hello World" hdr valid=true status=None desc="" fields=["FoodGroup=vegetable"]"#]
        );
        assert_eq!(ok(b"PING\r\n"), ["PING"]);
        assert_eq!(ok(b"PONG\r\n"), ["PONG"]);
        assert_eq!(ok(b"+OK\r\n"), ["+OK"]);
        assert_eq!(
            ok(b"-ERR 'Unknown Protocol Operation'\r\n"),
            ["-ERR Unknown Protocol Operation"]
        );
        assert_eq!(ok(b"-ERR\r\n"), ["-ERR "]);
        assert_eq!(ok(b"-ERR no quotes \r\n"), ["-ERR no quotes"]);
        // All of them in one stream.
        let mut stream = INFO.to_vec();
        stream.extend_from_slice(
            b"PING\r\nMSG a 1 2\r\nhi\r\nHMSG _INBOX.x 7 16 16\r\nNATS/1.0 503\r\n\r\n\r\n+OK\r\nPONG\r\n-ERR 'Stale Connection'\r\n",
        );
        let out = ok(&stream);
        assert_eq!(out.len(), 7, "{out:?}");
        assert_eq!(out[6], "-ERR Stale Connection");
    }

    #[test]
    fn names_are_case_insensitive_and_args_split_at_spaces_and_tabs() {
        assert_eq!(
            ok(b"msg a 1 2\r\nhi\r\nping\r\nPong\r\n+ok\r\n-err 'x'\r\nInfo {}\r\n"),
            [
                r#"MSG a sid=1 reply=None payload="hi""#,
                "PING",
                "PONG",
                "+OK",
                "-ERR x",
                "INFO id= max=None headers=false proto=0 raw={}"
            ]
        );
        assert_eq!(
            ok(b"MSG\ta \t 1  r\t2 \r\nhi\r\nhmsg a 1 12 12\r\nNATS/1.0\r\n\r\n\r\n"),
            [
                r#"MSG a sid=1 reply=Some("r") payload="hi""#,
                r#"MSG a sid=1 reply=None payload="" hdr valid=true status=None desc="" fields=[]"#
            ]
        );
        // LF alone ends a control line too; PING may carry trailing spaces.
        assert_eq!(
            ok(b"PING\nMSG a 1 0\n\r\nPONG  \r\n"),
            ["PING", r#"MSG a sid=1 reply=None payload="""#, "PONG"]
        );
    }

    #[test]
    fn payload_holding_line_breaks_and_op_names() {
        assert_eq!(
            ok(b"MSG a 1 14\r\nx\r\nPING\r\n\r\ny\r\n\r\nPONG\r\n"),
            [
                r#"MSG a sid=1 reply=None payload="x\r\nPING\r\n\r\ny\r\n""#,
                "PONG"
            ]
        );
        let m = ok(b"HMSG a 1 20 24\r\nNATS/1.0\r\nK: \r\nv\r\n\r\n\r\n\r\n\r\n");
        assert_eq!(
            m,
            [
                r#"MSG a sid=1 reply=None payload="\r\n\r\n" hdr valid=false status=None desc="" fields=[]"#
            ]
        );
    }

    #[test]
    fn no_responders_as_nats_server_sends_it() {
        // nats-server 2.9.10, for a request to a subject nobody subscribes to.
        let input = b"HMSG _INBOX.x 7 16 16\r\nNATS/1.0 503\r\n\r\n\r\n";
        assert_eq!(
            ok(input),
            [
                r#"MSG _INBOX.x sid=7 reply=None payload="" hdr valid=true status=Some(503) desc="" fields=[]"#
            ]
        );
        let mut p = NatsParser::default();
        p.feed(input);
        let Ok(Some(Op::Msg(m))) = p.next() else {
            panic!()
        };
        assert!(m.is_no_responders());
        assert_eq!(m.status(), Some(503));
        assert_eq!(m.sid_u64(), Some(7));
        let h = m.headers.unwrap();
        assert!(h.is_empty() && h.iter().count() == 0 && h.raw() == b"NATS/1.0 503\r\n\r\n");
    }

    #[test]
    fn header_blocks() {
        let h = Headers::parse(
            b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 0\r\nA:b\r\nA:  c \t\r\nX-Empty:\r\n\r\n",
        );
        assert!(h.is_valid());
        assert_eq!(h.status(), Some(100));
        assert_eq!(h.description(), b"Idle Heartbeat");
        assert_eq!(h.len(), 4);
        assert_eq!(h.get(b"Nats-Last-Consumer"), Some(&b"0"[..]));
        assert_eq!(
            h.get(b"nats-last-consumer"),
            None,
            "names are case-sensitive"
        );
        assert_eq!(h.get_ignore_case(b"nats-last-consumer"), Some(&b"0"[..]));
        assert_eq!(h.get_all(b"A").collect::<Vec<_>>(), [&b"b"[..], b"c"]);
        assert_eq!(h.get(b"X-Empty"), Some(&b""[..]));
        let h = Headers::parse(b"NATS/1.0 408 Request Timeout\r\n\r\n");
        assert_eq!(
            (h.status(), h.description()),
            (Some(408), &b"Request Timeout"[..])
        );
        let h = Headers::parse(b"NATS/1.0  503  \r\n\r\n");
        assert_eq!((h.is_valid(), h.status()), (true, Some(503)));
        let h = Headers::parse(b"NATS/1.0 \r\nA: 1\r\n\r\n");
        assert_eq!((h.is_valid(), h.status(), h.len()), (true, None, 1));
        for bad in [
            &b""[..],
            b"\r\n\r\n",
            b"NATS/1.0\r\n",
            b"NATS/1.0\r\n\r",
            b"NATS/2.0\r\n\r\n",
            b"nats/1.0\r\n\r\n",
            b"NATS/1.0x\r\n\r\n",
            b"NATS/1.0 5x3\r\n\r\n",
            b"NATS/1.0 5034\r\n\r\n",
            b"NATS/1.0 50\r\n\r\n",
            b"NATS/1.0\r\nno colon\r\n\r\n",
            b"NATS/1.0\r\n: empty name\r\n\r\n",
            b"NATS/1.0\r\nsp ace: x\r\n\r\n",
            b"NATS/1.0\r\n folded: x\r\n\r\n",
            b"NATS/1.0\r\nA: lone\nLF\r\n\r\n",
            b"NATS/1.0\r\nA: lone\rCR\r\n\r\n",
            b"NATS/1.0\r\nA: b\r\n\r\n\r\n",
            b"NATS/1.0\r\nA: b\r\n",
        ] {
            let h = Headers::parse(bad);
            assert!(!h.is_valid(), "{:?}", lossy(bad));
            assert_eq!((h.status(), h.len(), h.raw()), (None, 0, bad));
        }
    }

    #[test]
    fn violations_are_final() {
        let l = NatsLimits::default();
        let err = |input: &[u8], e: NatsError| {
            let out = all_splits(l, input);
            assert_eq!(
                out.last().map(String::as_str),
                Some(&*format!("error {e:?}")),
                "{:?}",
                lossy(input)
            );
        };
        err(b"FOO bar\r\n", NatsError::UnknownOp);
        err(b"\r\n", NatsError::UnknownOp);
        err(b"\n", NatsError::UnknownOp);
        err(b" PING\r\n", NatsError::UnknownOp);
        err(b"PINGX\r\n", NatsError::UnknownOp);
        err(b"PIN\r\n", NatsError::UnknownOp);
        err(b"PUB a 1\r\n", NatsError::UnknownOp); // a client operation
        err(b"PING x\r\n", NatsError::BadArgs);
        err(b"PING\r\r\n", NatsError::BadArgs);
        err(b"MSG a 1\r\n", NatsError::BadArgs);
        err(b"MSG a 1 x\r\n", NatsError::BadArgs);
        err(b"MSG a 1 -2\r\n", NatsError::BadArgs);
        err(b"MSG a 1 r s 2\r\n", NatsError::BadArgs);
        err(b"MSG a 1 r s t u 2\r\n", NatsError::BadArgs);
        err(b"MSG a\r1 2\r\n", NatsError::BadArgs);
        err(b"HMSG a 1 2\r\n", NatsError::BadArgs);
        err(b"HMSG a 1 5 4\r\n", NatsError::BadArgs);
        err(b"MSG a 1 2\r\nhiXY", NatsError::BadPayloadEnd);
        err(b"MSG a 1 2\r\nhi\n", NatsError::BadPayloadEnd);
        err(b"INFO\r\n", NatsError::BadInfo);
        err(b"INFO []\r\n", NatsError::BadInfo);
        err(b"INFO {\"max_payload\":-1}\r\n", NatsError::BadInfo);
        err(b"INFO {\"server_id\":\"x\"\r\n", NatsError::BadInfo);
        err(b"INFO {} {}\r\n", NatsError::BadInfo);
        // An unknown name fails before its line ends.
        let mut p = NatsParser::default();
        p.feed(b"PING\r\nX");
        assert_eq!(p.next(), Ok(Some(Op::Ping)));
        assert_eq!(p.next(), Err(NatsError::UnknownOp));
        assert_eq!(p.failed(), Some(NatsError::UnknownOp));
        p.feed(b"\r\nPING\r\n"); // ignored
        assert_eq!(p.next(), Err(NatsError::UnknownOp));
        assert!(!p.needs_more());
        // Operations before the violation are delivered.
        assert_eq!(
            ok(b"PING\r\nMSG a 1 1\r\nx\r\nBAD\r\n"),
            [
                "PING",
                r#"MSG a sid=1 reply=None payload="x""#,
                "error UnknownOp"
            ]
        );
    }

    fn small() -> NatsLimits {
        NatsLimits {
            max_control_line: 16,
            max_info_line: 40,
            max_payload: 8,
            max_header: 20,
        }
    }

    #[test]
    fn line_limits() {
        let l = small();
        // 16 bytes of control line pass, 17 do not, with LF or CRLF.
        assert_eq!(all_splits(l, b"MSG abcdefgh 1 0\r\n\r\n").len(), 1);
        assert_eq!(all_splits(l, b"MSG abcdefgh 1 0\n\r\n").len(), 1);
        assert_eq!(
            all_splits(l, b"MSG abcdefghi 1 0\r\n\r\n"),
            ["error LineTooLong"]
        );
        // INFO has its own limit.
        let info = b"INFO {\"server_id\":\"abcdefghijklmnopq\"}\r\n"; // 38 bytes
        assert_eq!(all_splits(l, info).len(), 1);
        assert_eq!(
            all_splits(l, b"INFO {\"server_id\":\"abcdefghijklmnopqrst\"}\r\n"),
            ["error LineTooLong"]
        );
        assert_eq!(
            all_splits(l, b"-ERR '0123456789ab'\r\n"),
            ["error LineTooLong"]
        );
        // Before the line ends: a line one byte over fails at once, a CR at the limit
        // may still be the line break.
        let mut p = NatsParser::new(l);
        p.feed(b"MSG abcdefgh 1 0\r");
        assert_eq!(p.next(), Ok(None));
        assert!(p.needs_more());
        p.feed(b"x");
        assert_eq!(p.next(), Err(NatsError::LineTooLong));
        // A long line arriving in pieces is refused without waiting for its end, and the
        // parser never holds more than the limit.
        let mut p = NatsParser::default();
        let mut failed = None;
        for _ in 0..200 {
            p.feed(b"MSG aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa");
            match p.next() {
                Ok(None) => assert!(p.buffered() <= p.limits().max_control_line + 1),
                other => {
                    failed = Some(other.map(|o| o.map(|op| show(&op))));
                    break;
                }
            }
        }
        assert_eq!(failed, Some(Err(NatsError::LineTooLong)));
    }

    #[test]
    fn payload_limits() {
        let l = small();
        assert_eq!(all_splits(l, b"MSG a 1 8\r\n12345678\r\n").len(), 1);
        assert_eq!(
            all_splits(l, b"MSG a 1 9\r\n123456789\r\n"),
            ["error PayloadTooLarge"]
        );
        assert_eq!(
            all_splits(
                NatsLimits::default(),
                b"MSG a 1 99999999999999999999999\r\n"
            ),
            ["error PayloadTooLarge"]
        );
        // HMSG: 20 header bytes and 8 payload bytes pass; one more of either does not.
        let ok_h = b"HMSG a 1 20 28\r\nNATS/1.0\r\nA: 12345\r\n\r\n12345678\r\n";
        assert_eq!(all_splits(l, ok_h).len(), 1);
        assert_eq!(
            all_splits(l, b"HMSG a 1 21 21\r\nNATS/1.0\r\nA: 123456\r\n\r\n\r\n"),
            ["error PayloadTooLarge"]
        );
        assert_eq!(
            all_splits(l, b"HMSG a 1 12 21\r\nNATS/1.0\r\n\r\n123456789\r\n"),
            ["error PayloadTooLarge"]
        );
        // Refused when the control line ends, before any payload byte.
        let mut p = NatsParser::new(l);
        p.feed(b"MSG a 1 1000000\r\n");
        assert_eq!(p.next(), Err(NatsError::PayloadTooLarge));
        // The server's max_payload from INFO.
        let mut p = NatsParser::new(l);
        p.set_max_payload(9);
        p.feed(b"MSG a 1 9\r\n123456789\r\n");
        assert!(matches!(p.next(), Ok(Some(Op::Msg(_)))));
        // Limits set to "anything" still refuse sizes no buffer can hold.
        let huge = NatsLimits {
            max_control_line: usize::MAX,
            max_info_line: usize::MAX,
            max_payload: usize::MAX,
            max_header: usize::MAX,
        };
        for line in [
            &b"MSG a 1 99999999999999999999999\r\n"[..],
            b"HMSG a 1 0 99999999999999999999999\r\n",
            b"HMSG a 1 99999999999999999999999 99999999999999999999999\r\n",
        ] {
            let mut p = NatsParser::new(huge);
            p.feed(line);
            assert_eq!(p.next(), Err(NatsError::PayloadTooLarge));
        }
    }

    #[test]
    fn big_payload_in_pieces_is_held_once_and_released() {
        let mut p = NatsParser::default();
        let mut input = b"MSG big 1 1000000\r\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 1_000_000));
        input.extend_from_slice(b"\r\nPING\r\n");
        let mut got = Vec::new();
        for piece in input.chunks(65536) {
            p.feed(piece);
            while let Some(op) = p.next().unwrap() {
                got.push(match op {
                    Op::Msg(m) => m.payload.len(),
                    _ => 0,
                });
            }
            assert!(p.buffered() <= 1_000_000 + 64);
        }
        assert_eq!(got, [1_000_000, 0]);
        assert!(p.capacity() > KEEP_BYTES);
        p.shrink();
        assert_eq!((p.capacity(), p.buffered()), (0, 0));
        p.feed(b"PONG\r\n");
        assert_eq!(p.next(), Ok(Some(Op::Pong)));
    }

    #[test]
    fn encoders_write_the_protocol() {
        let mut b = Vec::new();
        pub_(&mut b, b"foo.bar", None, b"Hello World").unwrap();
        pub_(&mut b, b"foo", Some(b"_INBOX.1"), b"").unwrap();
        hpub(
            &mut b,
            b"FOO",
            Some(b"BAR"),
            &[(b"FoodGroup", b"vegetable")],
            b"Hello World",
        )
        .unwrap();
        hpub(&mut b, b"FOO", None, &[], b"").unwrap();
        sub(&mut b, b"FOO.*.>", None, 1).unwrap();
        sub(&mut b, b"BAR", Some(b"G1"), u64::MAX).unwrap();
        unsub(&mut b, 1, None);
        unsub(&mut b, 0, Some(5));
        ping(&mut b);
        pong(&mut b);
        assert_eq!(
            lossy(&b),
            "PUB foo.bar 11\r\nHello World\r\n\
             PUB foo _INBOX.1 0\r\n\r\n\
             HPUB FOO BAR 34 45\r\nNATS/1.0\r\nFoodGroup: vegetable\r\n\r\nHello World\r\n\
             HPUB FOO 12 12\r\nNATS/1.0\r\n\r\n\r\n\
             SUB FOO.*.> 1\r\n\
             SUB BAR G1 18446744073709551615\r\n\
             UNSUB 1\r\nUNSUB 0 5\r\nPING\r\nPONG\r\n"
        );
        assert_eq!(header_block_len(&[(b"FoodGroup", b"vegetable")]), 34);
    }

    #[test]
    fn encoders_refuse_what_would_break_the_framing() {
        let mut b = b"kept".to_vec();
        for s in [
            &b""[..],
            b"a b",
            b"a\tb",
            b"a\r\nPUB x 0",
            b"a..b",
            b".a",
            b"a.",
            b"*",
            b"a.>",
            b"a.*.b",
            b"\x7f",
        ] {
            assert_eq!(
                pub_(&mut b, s, None, b"x"),
                Err(EncodeError::BadSubject),
                "{:?}",
                lossy(s)
            );
            assert_eq!(
                hpub(&mut b, s, None, &[], b"x"),
                Err(EncodeError::BadSubject)
            );
        }
        assert_eq!(
            pub_(&mut b, b"a", Some(b"r s"), b""),
            Err(EncodeError::BadReply)
        );
        assert_eq!(
            pub_(&mut b, b"a", Some(b"r.*"), b""),
            Err(EncodeError::BadReply)
        );
        for s in [&b""[..], b"a b", b"a.>.b", b"a..b"] {
            assert_eq!(sub(&mut b, s, None, 1), Err(EncodeError::BadSubject));
        }
        assert_eq!(sub(&mut b, b"a", Some(b""), 1), Err(EncodeError::BadQueue));
        assert_eq!(
            sub(&mut b, b"a", Some(b"q 1"), 1),
            Err(EncodeError::BadQueue)
        );
        for name in [&b""[..], b"a:b", b"a b", b"\xc3\xa9", b"a\r\n"] {
            assert_eq!(
                hpub(&mut b, b"a", None, &[(name, b"v")], b""),
                Err(EncodeError::BadHeaderName)
            );
        }
        for value in [&b"a\r\nB: forged"[..], b"\n", b"\r", b"\x00", b"\x7f"] {
            assert_eq!(
                hpub(&mut b, b"a", None, &[(b"A", value)], b""),
                Err(EncodeError::BadHeaderValue)
            );
        }
        assert_eq!(b, b"kept", "nothing written on an error");
        // Allowed: tab and UTF-8 in values, wildcards in SUB, UTF-8 subjects.
        hpub(
            &mut b,
            "é.x".as_bytes(),
            None,
            &[(b"A", "\tv é".as_bytes())],
            b"",
        )
        .unwrap();
        sub(&mut b, b">", Some(b"q.1"), 2).unwrap();
    }

    #[test]
    fn hpub_header_block_reads_back() {
        let headers: [(&[u8], &[u8]); 3] = [(b"ReqID", b"42"), (b"A", b"1"), (b"A", b"x y")];
        let mut b = Vec::new();
        hpub(&mut b, b"s", Some(b"r"), &headers, b"body\r\n").unwrap();
        // The server delivers it as HMSG with the sid in front of the reply.
        let msg = [b"HMSG s 9 r".as_slice(), &b[b"HPUB s r".len()..]].concat();
        let mut p = NatsParser::default();
        p.feed(&msg);
        let Ok(Some(Op::Msg(m))) = p.next() else {
            panic!("{}", lossy(&msg))
        };
        let h = m.headers.unwrap();
        assert!(h.is_valid());
        assert_eq!(h.iter().collect::<Vec<_>>(), headers);
        assert_eq!(m.payload, b"body\r\n");
        assert_eq!(m.reply, Some(&b"r"[..]));
    }

    #[test]
    fn connect_is_json_with_escaped_strings() {
        let mut b = Vec::new();
        connect(
            &mut b,
            &ConnectOpts {
                name: Some("node \"1\"\n\\"),
                user: Some("u\u{1}"),
                pass: Some("p\u{7f}é"),
                auth_token: None,
                echo: false,
            },
        );
        let line = b
            .strip_prefix(b"CONNECT ")
            .unwrap()
            .strip_suffix(b"\r\n")
            .unwrap();
        assert!(!line.contains(&b'\n') && !line.contains(&b'\r'));
        let v: serde_json::Value = serde_json::from_slice(line).unwrap();
        assert_eq!(v["name"], "node \"1\"\n\\");
        assert_eq!(v["user"], "u\u{1}");
        assert_eq!(v["pass"], "p\u{7f}é");
        assert!(v.get("auth_token").is_none());
        for (k, want) in [
            ("verbose", false),
            ("pedantic", false),
            ("headers", true),
            ("no_responders", true),
            ("echo", false),
        ] {
            assert_eq!(v[k], want, "{k}");
        }
        assert_eq!(v["protocol"], 1);
        assert_eq!(v["lang"], "rust");
        assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
        let mut b = Vec::new();
        connect(
            &mut b,
            &ConnectOpts {
                echo: true,
                auth_token: Some("t"),
                ..Default::default()
            },
        );
        let v: serde_json::Value = serde_json::from_slice(&b[8..b.len() - 2]).unwrap();
        assert_eq!(
            (v["echo"].as_bool(), v["auth_token"].as_str()),
            (Some(true), Some("t"))
        );
    }
}
