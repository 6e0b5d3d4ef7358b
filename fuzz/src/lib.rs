//! Helpers shared by the fuzz targets in `fuzz_targets/`.
//!
//! Input layout used by every target (after any target-specific prefix):
//! - first byte below 0x80: default limits, and the whole input is the byte stream (so a
//!   plain protocol stream is a useful seed as it is);
//! - first byte 0x80 or above: small limits taken from the first 4 bytes, the stream is
//!   the rest. This makes the line, message and header-count limits easy to reach.

use std::rc::Rc;

use middleman::broker::Outbox;
use middleman::protocol::decode::{MAX_CMD, MAX_TARGET};
use middleman::protocol::{decode_simple, Decoded, Decoder, Limits, Message, Packet};
use middleman::router::ConnId;

/// What the broker hands the reactor: packets, and kicks (which the harnesses carry out
/// as the reactor does).
#[derive(Default)]
pub struct Out {
    /// Packets, in order, with their receivers.
    pub sent: Vec<(ConnId, Rc<Packet>)>,
    /// Kicks, in order: (connection, close reason).
    pub kicks: Vec<(ConnId, String)>,
}

impl Outbox for Out {
    fn send(&mut self, to: ConnId, pkt: &Rc<Packet>) {
        self.sent.push((to, pkt.clone()));
    }
    fn kick(&mut self, to: ConnId, reason: &str) {
        self.kicks.push((to, reason.to_owned()));
    }
}

impl Out {
    /// Forget what was recorded.
    pub fn clear(&mut self) {
        self.sent.clear();
        self.kicks.clear();
    }
}

/// Split the input into decoder limits and the byte stream (see the module docs).
pub fn limits_and_stream(data: &[u8]) -> (Limits, &[u8]) {
    match data {
        [b0, b1, b2, b3, rest @ ..] if *b0 >= 0x80 => {
            let limits = Limits {
                max_headers: usize::from(b0 & 0x0f),
                max_line: usize::from(*b1),
                max_message: usize::from(u16::from_le_bytes([*b2, *b3]) & 0x0fff),
            };
            (limits, rest)
        }
        _ => (Limits::default(), data),
    }
}

/// Limits no re-encoded message can pass.
pub fn huge_limits() -> Limits {
    Limits {
        max_message: usize::MAX,
        max_line: usize::MAX,
        max_headers: usize::MAX,
    }
}

/// One decoder outcome, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Message(Msg),
    /// A malformed message, with what it carries (first line and headers before the bad
    /// line).
    Malformed(Msg),
    Close(u16),
}

/// An owned copy of a decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub cmd: Vec<u8>,
    pub target: Vec<u8>,
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub body: Vec<u8>,
    /// Known to be UTF-8 ([`Message::utf8`]) and relayed without stuffing.
    pub utf8: bool,
    pub plain_body: bool,
}

impl Msg {
    pub fn of(m: &Message<'_>) -> Msg {
        Msg {
            cmd: m.cmd.to_vec(),
            target: m.target.to_vec(),
            headers: m.headers().map(|(n, v)| (n.to_vec(), v.to_vec())).collect(),
            body: m.body.to_vec(),
            utf8: m.utf8,
            plain_body: m.plain_body,
        }
    }
}

/// Check what §2 promises about every decoded message, malformed or not.
pub fn check_message(m: &Message<'_>, limits: Limits) {
    let is_ws = |b: &u8| *b == b' ' || *b == b'\t';
    assert!(!m.cmd.is_empty() && m.cmd.len() <= MAX_CMD, "cmd length");
    assert!(m.cmd.iter().all(u8::is_ascii_alphabetic), "cmd letters");
    assert!(
        !m.target.is_empty() && m.target.len() <= MAX_TARGET,
        "target length"
    );
    assert!(
        !m.target.iter().any(|&b| b < 0x20 || b == 0x7f),
        "target controls"
    );
    assert!(!m.target.first().is_some_and(is_ws), "target trimmed");
    assert!(!m.target.last().is_some_and(is_ws), "target trimmed");
    assert!(m.header_count() <= limits.max_headers, "header count");
    assert_eq!(m.headers().len(), m.header_count());
    for (name, value) in m.headers() {
        assert!(!name.contains(&b':'), "header name holds ':'");
        assert!(
            !name.contains(&b'\n') && !value.contains(&b'\n'),
            "LF in header"
        );
        for part in [name, value] {
            assert!(!part.first().is_some_and(is_ws), "header trimmed");
            assert!(!part.last().is_some_and(is_ws), "header trimmed");
            assert!(part.len() <= limits.max_line, "header longer than a line");
        }
        // §2: names are RFC 9110 tokens, values hold no control character but tab.
        let tchar = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
        assert!(
            !name.is_empty() && name.iter().all(tchar),
            "header name not a token"
        );
        assert!(
            !value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f),
            "control character in a header value"
        );
        if let Ok(text) = std::str::from_utf8(name) {
            let first = m.header(text).map(|(n, _)| n);
            assert!(
                first.is_some_and(|n| n.eq_ignore_ascii_case(name)),
                "header lookup"
            );
        }
    }
    assert!(
        m.body.len() <= limits.max_message,
        "body longer than a message"
    );
}

/// Drain every outcome available now into `out`, checking each message. Returns true
/// after a close (the decoder then stays closed).
pub fn drain(d: &mut Decoder, out: &mut Vec<Outcome>) -> bool {
    let limits = d.limits();
    loop {
        match d.next() {
            Ok(Some(Decoded::Message(m))) => {
                check_message(&m, limits);
                out.push(Outcome::Message(Msg::of(&m)));
            }
            Ok(Some(Decoded::Malformed(m))) => {
                check_message(&m, limits);
                assert!(m.body.is_empty(), "a malformed message has no body");
                out.push(Outcome::Malformed(Msg::of(&m)));
            }
            Ok(None) => {
                // Bounded: only the unfinished message is held (a lone CR may wait to
                // become an ignored empty line).
                assert!(
                    d.buffered() <= limits.max_message.max(1),
                    "holds {} bytes, limit {}",
                    d.buffered(),
                    limits.max_message
                );
                assert!(d.failed().is_none());
                return false;
            }
            Err(e) => {
                assert_eq!(d.failed(), Some(e));
                assert!(matches!(e.close_code(), 1002 | 1009));
                assert_eq!(d.next().err(), Some(e), "a close is final");
                assert!(!d.needs_more(), "nothing is partial after a close");
                out.push(Outcome::Close(e.close_code()));
                return true;
            }
        }
    }
}

/// As the server reads frames: while the decoder is idle, the messages of the common
/// shape at the front of a piece come from [`decode_simple`] and the rest of the piece
/// is fed. Must give exactly what [`run`] gives.
pub fn run_simple<'a>(
    limits: Limits,
    pieces: impl IntoIterator<Item = &'a [u8]>,
) -> (Vec<Outcome>, bool) {
    run_with(limits, pieces, true)
}

/// Feed `pieces` in order to a fresh decoder, collecting outcomes until the input is used
/// up or a close. Returns the outcomes and `needs_more()` after the last byte.
pub fn run<'a>(limits: Limits, pieces: impl IntoIterator<Item = &'a [u8]>) -> (Vec<Outcome>, bool) {
    run_with(limits, pieces, false)
}

fn run_with<'a>(
    limits: Limits,
    pieces: impl IntoIterator<Item = &'a [u8]>,
    simple: bool,
) -> (Vec<Outcome>, bool) {
    let mut d = Decoder::new(limits);
    let mut out = Vec::new();
    let mut closed = false;
    for piece in pieces {
        let mut rest = piece;
        if simple && d.is_idle() {
            while let Some((m, used)) = decode_simple(rest, &limits, false) {
                check_message(&m, limits);
                out.push(Outcome::Message(Msg::of(&m)));
                assert!(used > 0, "a message takes bytes");
                rest = &rest[used..];
            }
        }
        d.feed(rest);
        if closed {
            // Bytes after a close are ignored.
            assert!(d.next().is_err());
            continue;
        }
        closed = drain(&mut d, &mut out);
    }
    (out, d.needs_more())
}
