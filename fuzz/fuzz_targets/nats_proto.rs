//! The NATS parser (`middleman::cluster::proto::NatsParser`) on any bytes and limits: no
//! panic; every operation keeps the limits and what the protocol promises; after `next`
//! returns `Ok(None)` at most one unfinished operation is held; a violation is final; and
//! feeding the stream in pieces (at arbitrary cuts, and byte at a time) gives exactly the
//! outcomes of feeding it whole.
//!
//! Input: byte 0 = number of cuts (bits 0-2), also feed byte at a time (bit 3), small
//! limits from the next 4 bytes (bit 4); then the 4 limit bytes if any; then 2 bytes
//! (little endian) per cut, taken modulo the stream length + 1; then the stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use middleman::cluster::proto::{Headers, NatsError, NatsLimits, NatsParser, Op};

/// One outcome, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Out {
    Info {
        raw: Vec<u8>,
        server_id: String,
        max_payload: Option<u64>,
        headers: bool,
        proto: i64,
    },
    Msg {
        subject: Vec<u8>,
        sid: Vec<u8>,
        reply: Option<Vec<u8>>,
        headers: Option<Vec<u8>>,
        payload: Vec<u8>,
    },
    Ping,
    Pong,
    Ok,
    Err(Vec<u8>),
    Failed(NatsError),
}

fn is_arg(s: &[u8]) -> bool {
    !s.is_empty() && !s.iter().any(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
}

/// What every yielded operation promises.
fn check(op: &Op<'_>, l: NatsLimits) -> Out {
    match op {
        Op::Info(i) => {
            assert!(i.raw.len() <= l.max_info_line, "INFO over its limit");
            assert!(i.raw.starts_with(b"{"));
            Out::Info {
                raw: i.raw.to_vec(),
                server_id: i.server_id.to_string(),
                max_payload: i.max_payload,
                headers: i.headers,
                proto: i.proto,
            }
        }
        Op::Msg(m) => {
            assert!(is_arg(m.subject) && is_arg(m.sid), "subject/sid");
            assert!(m.reply.is_none_or(is_arg), "reply");
            assert!(m.payload.len() <= l.max_payload, "payload over max_payload");
            if let Some(h) = &m.headers {
                assert!(
                    h.raw().len() <= l.max_header,
                    "header block over max_header"
                );
                assert_eq!(
                    Headers::parse(h.raw()),
                    *h,
                    "parse is a function of the bytes"
                );
                check_headers(h);
            }
            assert_eq!(
                m.is_no_responders(),
                m.status() == Some(503) && m.payload.is_empty()
            );
            Out::Msg {
                subject: m.subject.to_vec(),
                sid: m.sid.to_vec(),
                reply: m.reply.map(<[u8]>::to_vec),
                headers: m.headers.map(|h| h.raw().to_vec()),
                payload: m.payload.to_vec(),
            }
        }
        Op::Ping => Out::Ping,
        Op::Pong => Out::Pong,
        Op::Ok => Out::Ok,
        Op::Err(e) => {
            assert!(e.len() <= l.max_control_line, "-ERR over the line limit");
            assert!(!e.contains(&b'\n'));
            Out::Err(e.to_vec())
        }
    }
}

fn check_headers(h: &Headers<'_>) {
    if !h.is_valid() {
        assert_eq!((h.status(), h.len(), h.description()), (None, 0, &b""[..]));
        return;
    }
    let raw = h.raw();
    assert!(raw.starts_with(b"NATS/1.0") && raw.ends_with(b"\r\n\r\n"));
    if let Some(s) = h.status() {
        assert!(s <= 999);
    }
    assert!(!h.description().contains(&b'\r') && !h.description().contains(&b'\n'));
    for (name, value) in h.iter() {
        assert!(!name.is_empty() && name.iter().all(|&b| (33..=126).contains(&b) && b != b':'));
        assert!(!value.contains(&b'\r') && !value.contains(&b'\n'));
        assert!(
            !value.first().is_some_and(|b| matches!(b, b' ' | b'\t')),
            "value trimmed"
        );
        assert!(
            !value.last().is_some_and(|b| matches!(b, b' ' | b'\t')),
            "value trimmed"
        );
        let first = h.get(name).expect("a field's own name finds it");
        assert_eq!(Some(first), h.get_all(name).next());
        assert!(h.get_ignore_case(name).is_some());
    }
    assert_eq!(h.iter().count(), h.len());
}

/// Feed `pieces`, draining after each; the outcomes and `needs_more()` at the end.
fn run<'a>(l: NatsLimits, pieces: impl IntoIterator<Item = &'a [u8]>) -> (Vec<Out>, bool) {
    let mut p = NatsParser::new(l);
    let mut out = Vec::new();
    // A held unfinished operation: a control line and CR, or a MSG line, payload and CR.
    let line = l.max_control_line.max(l.max_info_line).max(4);
    let bound = line + 2 + l.max_header + l.max_payload + 2;
    for piece in pieces {
        p.feed(piece);
        if out.last().is_some_and(|o| matches!(o, Out::Failed(_))) {
            assert!(p.next().is_err(), "a violation is final");
            continue;
        }
        loop {
            match p.next() {
                Ok(Some(op)) => out.push(check(&op, l)),
                Ok(None) => {
                    assert!(p.buffered() <= bound, "holds {} > {bound}", p.buffered());
                    assert!(p.failed().is_none());
                    break;
                }
                Err(e) => {
                    assert_eq!(p.failed(), Some(e));
                    assert_eq!(p.next().err(), Some(e), "a violation is final");
                    assert!(!p.needs_more());
                    out.push(Out::Failed(e));
                    break;
                }
            }
        }
    }
    (out, p.needs_more())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let mut limits = NatsLimits::default();
    if mode & 16 != 0 {
        let [a, b, c, d, tail @ ..] = rest else {
            return;
        };
        limits = NatsLimits {
            max_control_line: usize::from(*a),
            max_info_line: usize::from(*b),
            max_payload: usize::from(*c),
            max_header: usize::from(*d),
        };
        rest = tail;
    }
    let cuts = usize::from(mode & 7);
    if rest.len() < 2 * cuts {
        return;
    }
    let (cut_bytes, stream) = rest.split_at(2 * cuts);

    let whole = run(limits, [stream]);

    let mut at: Vec<usize> = cut_bytes
        .chunks_exact(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % (stream.len() + 1))
        .collect();
    at.sort_unstable();
    let mut pieces = Vec::with_capacity(at.len() + 1);
    let mut from = 0;
    for &cut in &at {
        pieces.push(&stream[from..cut]);
        from = cut;
    }
    pieces.push(&stream[from..]);
    assert_eq!(
        run(limits, pieces),
        whole,
        "split at {at:?} differs from whole"
    );

    if mode & 8 != 0 {
        assert_eq!(
            run(limits, stream.chunks(1)),
            whole,
            "byte at a time differs"
        );
    }
});
