//! PROTOCOL.md §2 (message format, stream behaviour, limits) and §7 (errors, framing
//! violations) over real WebSocket connections to the in-process server.

mod common;
use common::*;

use std::io::Write;
use std::net::TcpStream;

use middleman::broker::reason;
use middleman::protocol::{Decoded, Decoder, FrameError, Limits};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::Message;

// ---------------------------------------------------------------- helpers

/// The next data message as (is_text, payload).
fn recv_frame(p: &mut Peer) -> (bool, Vec<u8>) {
    match next_msg(&mut p.ws) {
        Message::Text(t) => (true, t.as_bytes().to_vec()),
        Message::Binary(b) => (false, b.to_vec()),
        other => panic!("expected a data message, got {other:?}"),
    }
}

/// A masked client frame, built by hand.
fn raw_frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut f = vec![first_byte];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Send bytes as one binary WebSocket message.
fn send_bin(p: &mut Peer, bytes: &[u8]) {
    p.ws.send(Message::binary(bytes.to_vec())).unwrap();
}

/// Connect a service, send `bytes` as one WebSocket message, expect a close frame with
/// `code` and `reason` and nothing before it; then the server hangs up.
fn assert_violation(p: &mut Peer, bytes: &[u8], code: u16, why: &str) {
    // (The server may already be hanging up: a failed write is reported by the read.)
    let _ = p.ws.send(Message::binary(bytes.to_vec()));
    let (c, r) = expect_close_only(&mut p.ws);
    assert_eq!(
        (c, r.as_str()),
        (code, why),
        "after sending {:?}",
        String::from_utf8_lossy(bytes)
    );
    assert!(!r.is_empty(), "close without a reason");
    expect_hangup(&mut p.ws);
}

/// `sync` cannot be used while a line is half sent: this proves the connection is still
/// open (and everything before was read) with a ping and its pong.
fn ping_roundtrip(p: &mut Peer) {
    p.ws.send(Message::Ping(b"still-open".to_vec().into()))
        .unwrap();
    loop {
        match p.ws.read() {
            Ok(Message::Pong(d)) if &d[..] == b"still-open" => return,
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(m) => panic!("expected the pong, got {m:?}"),
            Err(e) => panic!("expected the pong, got {e}"),
        }
    }
}

fn violation(addr: std::net::SocketAddr, bytes: &[u8], code: u16, why: &str) {
    let mut p = Peer::service(addr);
    assert_violation(&mut p, bytes, code, why);
}

/// A received message's raw bytes split at the end of its head: (first line + header
/// lines, body + terminator).
fn split_head(data: &[u8]) -> (&[u8], &[u8]) {
    let at = data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no blank line in {:?}", String::from_utf8_lossy(data)));
    (&data[..at + 2], &data[at + 4..])
}

/// Every line of the head ends with CRLF (output always uses CRLF, §2).
fn assert_crlf_head(head: &[u8]) {
    assert!(head.ends_with(b"\r\n"));
    for (i, &b) in head.iter().enumerate() {
        if b == b'\n' {
            assert!(
                i > 0 && head[i - 1] == b'\r',
                "bare LF in head {:?}",
                String::from_utf8_lossy(head)
            );
        }
    }
}

/// Decode one received message keeping its body as bytes.
fn decode_bytes(data: &[u8]) -> (String, String, Vec<(String, String)>, Vec<u8>) {
    let mut d = Decoder::new(Limits {
        max_message: 64 << 20,
        max_line: 64 << 20,
        max_headers: 1000,
    });
    d.feed(data);
    let out = match d.next() {
        Ok(Some(Decoded::Message(m))) => (
            String::from_utf8_lossy(m.cmd).into_owned(),
            String::from_utf8_lossy(m.target).into_owned(),
            m.headers()
                .map(|(n, v)| {
                    (
                        String::from_utf8_lossy(n).into_owned(),
                        String::from_utf8_lossy(v).into_owned(),
                    )
                })
                .collect(),
            m.body.to_vec(),
        ),
        other => panic!("not one message: {other:?}"),
    };
    assert!(!d.needs_more(), "trailing bytes after the message");
    out
}

/// The headers of a relayed message without the server-set `cid` and `uid`.
fn own_headers(m: &Msg) -> Vec<(&str, &str)> {
    m.headers
        .iter()
        .filter(|(n, _)| !n.eq_ignore_ascii_case("cid") && !n.eq_ignore_ascii_case("uid"))
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect()
}

/// Assert `m` is the §7 error for `cmd target` with `why` (and `reqid`).
fn assert_error(m: &Msg, cmd: &str, target: &str, why: &str, reqid: Option<(&str, &str)>) {
    assert_eq!(
        (m.cmd.as_str(), m.target.as_str()),
        ("PUB", "ERROR"),
        "{m:?}"
    );
    let mut want = vec![("cmd", cmd), ("target", target), ("reason", why)];
    if let Some(r) = reqid {
        want.push(r);
    }
    let got: Vec<(&str, &str)> = m
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    assert_eq!(got, want, "error headers");
    assert_eq!(m.body, format!("{why}: {cmd} {target}"));
}

/// A message is received by `p` on its private channel with `body`.
fn expect_private(p: &mut Peer, body: &str) {
    let m = p.recv();
    assert_eq!(
        (m.cmd.as_str(), m.target.as_str(), m.body.as_str()),
        ("PUB", format!("MSG:{}", p.cid).as_str(), body),
        "{m:?}"
    );
}

fn small_limits() -> TestServer {
    TestServer::with(|cfg| {
        cfg.limits.max_line = 64;
        cfg.limits.max_message = 256;
    })
}

// ---------------------------------------------------------------- §7 framing violations

#[test]
fn first_line_without_space_closes_1002() {
    let srv = TestServer::start();
    let why = FrameError::NoSpace.reason();
    for bytes in [
        &b"HELLO\r\n"[..],
        b"PUB\r\n\r\n.\r\n",
        b"PUB\tnews\r\n\r\n.\r\n",
        b"\r\n\r\nSUB\n",
    ] {
        violation(srv.addr, bytes, 1002, why);
    }
    // After valid messages on the same connection, too: those are answered first.
    let mut p = Peer::service(srv.addr);
    let t = format!("MSG:{}", p.cid);
    p.send_raw(&format!("PUB {t}\r\n\r\nfirst\r\n.\r\nGARBAGE\r\n"));
    expect_private(&mut p, "first");
    let (c, r) = expect_close_only(&mut p.ws);
    assert_eq!((c, r.as_str()), (1002, why));
}

#[test]
fn bad_command_closes_1002() {
    let srv = TestServer::start();
    let why = FrameError::BadCommand.reason();
    let cmd17 = format!("{} t\r\n\r\n.\r\n", "ABCDEFGHIJKLMNOPQ");
    for bytes in [
        &b"P1B t\r\n\r\n.\r\n"[..],
        cmd17.as_bytes(),
        b" PUB t\r\n\r\n.\r\n",
        b"PU-B t\r\n\r\n.\r\n",
        b"PUB_X t\r\n\r\n.\r\n",
        "P\u{dc}B t\r\n\r\n.\r\n".as_bytes(),
    ] {
        violation(srv.addr, bytes, 1002, why);
    }
}

#[test]
fn sixteen_letter_command_is_well_formed() {
    let srv = TestServer::start();
    let mut p = Peer::client(srv.addr);
    p.send("ABCDEFGHIJKLMNOP", "t", &[], "");
    let m = p.recv();
    assert_error(&m, "ABCDEFGHIJKLMNOP", "t", reason::UNKNOWN_COMMAND, None);
    p.sync();
}

#[test]
fn bad_target_closes_1002() {
    let srv = TestServer::start();
    let why = FrameError::BadTarget.reason();
    let long = format!("PUB {}\r\n\r\n.\r\n", "a".repeat(256));
    for bytes in [
        &b"PUB \r\n\r\n.\r\n"[..],
        b"PUB  \t  \r\n\r\n.\r\n",
        long.as_bytes(),
        b"PUB a\x01b\r\n\r\n.\r\n",
        b"PUB a\tb\r\n\r\n.\r\n",
        b"PUB a\x7fb\r\n\r\n.\r\n",
        b"PUB a\rb\r\n\r\n.\r\n",
        b"PUB \x00\r\n\r\n.\r\n",
    ] {
        violation(srv.addr, bytes, 1002, why);
    }
}

#[test]
fn target_at_limit_and_trimmed_target_pass() {
    let srv = TestServer::start();
    let mut p = Peer::service(srv.addr);
    let t255 = "t".repeat(255);
    p.send("SUB", &t255, &[], "");
    p.send_raw("SUB \t news \t\r\n\r\n.\r\n");
    p.sync();
    p.send("PUB", &t255, &[], "long");
    let m = p.recv();
    assert_eq!(
        (m.target.as_str(), m.body.as_str()),
        (t255.as_str(), "long")
    );
    p.send_raw("PUB  \tnews\t  \r\n\r\ntrimmed\r\n.\r\n");
    let m = p.recv();
    assert_eq!((m.target.as_str(), m.body.as_str()), ("news", "trimmed"));
    // Spaces inside the target are part of it (only surrounding ones are trimmed).
    p.send_raw("SUB a b\r\n\r\n.\r\nPUB a b\r\n\r\ninner\r\n.\r\n");
    let m = p.recv();
    assert_eq!((m.target.as_str(), m.body.as_str()), ("a b", "inner"));
}

#[test]
fn more_than_64_header_lines_closes_1002() {
    let srv = TestServer::start();
    let mut p = Peer::service(srv.addr);
    let t = format!("MSG:{}", p.cid);
    // Exactly 64 passes.
    let mut raw = format!("PUB {t}\r\n");
    for i in 0..64 {
        raw.push_str(&format!("H{i}: {i}\r\n"));
    }
    raw.push_str("\r\nsixty-four\r\n.\r\n");
    p.send_raw(&raw);
    let m = p.recv();
    assert_eq!(m.body, "sixty-four");
    assert_eq!(own_headers(&m).len(), 64);
    assert_eq!(own_headers(&m)[63], ("H63", "63"));
    // 65 closes.
    let mut raw = format!("PUB {t}\r\n");
    for i in 0..65 {
        raw.push_str(&format!("H{i}: {i}\r\n"));
    }
    raw.push_str("\r\nsixty-five\r\n.\r\n");
    assert_violation(
        &mut p,
        raw.as_bytes(),
        1002,
        FrameError::TooManyHeaders.reason(),
    );
}

#[test]
fn line_over_limit_closes_1009_before_the_line_is_complete() {
    let srv = small_limits();
    let why = FrameError::LineTooLong.reason();
    // First line, 65 bytes, no line break yet.
    let first = format!("PUB {}", "a".repeat(61));
    assert_eq!(first.len(), 65);
    violation(srv.addr, first.as_bytes(), 1009, why);
    // A header line, a body line: 65 bytes without a line break.
    let hdr = format!("PUB t\r\nX: {}", "h".repeat(62));
    violation(srv.addr, hdr.as_bytes(), 1009, why);
    let body = format!("PUB t\r\n\r\n{}", "b".repeat(65));
    violation(srv.addr, body.as_bytes(), 1009, why);
    // Complete lines over the limit, too.
    violation(srv.addr, format!("{first}\r\n").as_bytes(), 1009, why);
    violation(srv.addr, format!("{body}\r\n.\r\n").as_bytes(), 1009, why);
    // A stuffing dot counts: 65 bytes on the wire, 64 after unstuffing.
    let stuffed = format!("PUB t\r\n\r\n..{}\r\n.\r\n", "s".repeat(63));
    violation(srv.addr, stuffed.as_bytes(), 1009, why);
    // Skipped lines of a malformed message count too.
    let skipped = format!("PUB t\r\nbroken\r\n\r\n{}\r\n.\r\n", "k".repeat(65));
    violation(srv.addr, skipped.as_bytes(), 1009, why);
    // The partial line may arrive in several WebSocket messages.
    let mut p = Peer::service(srv.addr);
    send_bin(&mut p, &first.as_bytes()[..40]);
    ping_roundtrip(&mut p);
    assert_violation(&mut p, &first.as_bytes()[40..], 1009, why);
}

#[test]
fn lines_at_limit_pass() {
    let srv = small_limits();
    let mut p = Peer::service(srv.addr);
    // 64-byte first lines: `SUB ` / `PUB ` + a 60-byte target.
    let topic = "T".repeat(60);
    let sub = format!("SUB {topic}");
    assert_eq!(sub.len(), 64);
    // Sent without its line break first, then a lone CR (half a CRLF), then the LF.
    send_bin(&mut p, sub.as_bytes());
    ping_roundtrip(&mut p);
    send_bin(&mut p, b"\r");
    ping_roundtrip(&mut p);
    send_bin(&mut p, b"\n\r\n.\r\n");
    p.sync();
    // A 64-byte header line and a 64-byte body line.
    let hv = "v".repeat(61);
    let body = "b".repeat(64);
    let raw = format!("PUB {topic}\r\nX: {hv}\r\n\r\n{body}\r\n.\r\n");
    assert!(raw.len() <= 256);
    send_bin(&mut p, raw.as_bytes());
    let m = p.recv();
    assert_eq!(m.target, topic);
    assert_eq!(own_headers(&m), vec![("X", hv.as_str())]);
    assert_eq!(m.body, body);
    // A stuffed body line of 64 bytes on the wire (63 after unstuffing).
    let dotted = format!("..{}", "d".repeat(62));
    send_bin(
        &mut p,
        format!("PUB {topic}\r\n\r\n{dotted}\r\n.\r\n").as_bytes(),
    );
    assert_eq!(p.recv().body, format!(".{}", "d".repeat(62)));
    p.sync();
}

/// A message of exactly `len` bytes on the wire: `PUB t`, a blank line, body lines of at
/// most 62 bytes with their CRLF, and the terminator.
fn message_of_len(len: usize) -> (Vec<u8>, String) {
    let head = b"PUB t\r\n\r\n";
    let term = b".\r\n";
    let mut left = len - head.len() - term.len();
    let mut body_lines = Vec::new();
    while left > 0 {
        let n = left.min(62);
        assert!(n >= 2);
        body_lines.push("x".repeat(n - 2));
        left -= n;
    }
    let mut out = head.to_vec();
    for l in &body_lines {
        out.extend_from_slice(l.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(term);
    assert_eq!(out.len(), len);
    (out, body_lines.join("\r\n"))
}

#[test]
fn message_over_limit_closes_1009() {
    let srv = small_limits();
    let why = FrameError::MessageTooLong.reason();
    let mut p = Peer::service(srv.addr);
    p.send("SUB", "t", &[], "");
    p.sync();

    // Exactly 256 bytes passes, also after ignored empty lines (they are not counted).
    let (exact, body) = message_of_len(256);
    send_bin(&mut p, &exact);
    assert_eq!(p.recv().body, body);
    let mut padded = b"\r\n\r\n\n".to_vec();
    padded.extend_from_slice(&exact);
    send_bin(&mut p, &padded);
    assert_eq!(p.recv().body, body);
    // In 1-byte WebSocket messages too.
    for b in &exact {
        send_bin(&mut p, &[*b]);
    }
    assert_eq!(p.recv().body, body);

    // 257 bytes closes: the 256-byte message with one more byte in its last body line.
    let mut m257 = exact[..exact.len() - b"\r\n.\r\n".len()].to_vec();
    m257.extend_from_slice(b"x\r\n.\r\n");
    assert_eq!(m257.len(), 257);
    assert_violation(&mut p, &m257, 1009, why);

    // Before the message is complete: 257 bytes of complete lines, no terminator.
    let unfinished = format!(
        "PUB t\r\n\r\n{}",
        format!("{}\r\n", "y".repeat(60)).repeat(4)
    );
    assert_eq!(unfinished.len(), 257);
    violation(srv.addr, unfinished.as_bytes(), 1009, why);
    // ... and in the middle of a line (195 bytes of lines, then 62 without a break).
    let mid = format!(
        "PUB t\r\n\r\n{}{}",
        format!("{}\r\n", "z".repeat(60)).repeat(3),
        "z".repeat(62)
    );
    assert_eq!(mid.len(), 257);
    violation(srv.addr, mid.as_bytes(), 1009, why);
    // ... spread over many WebSocket messages.
    let mut q = Peer::service(srv.addr);
    for chunk in unfinished.as_bytes()[..250].chunks(10) {
        send_bin(&mut q, chunk);
    }
    ping_roundtrip(&mut q);
    assert_violation(&mut q, &unfinished.as_bytes()[250..], 1009, why);
    // Skipped bytes of a malformed message count too.
    let skipped = format!(
        "PUB t\r\nbroken\r\n\r\n{}.\r\n",
        format!("{}\r\n", "k".repeat(60)).repeat(4)
    );
    assert!(skipped.len() > 256);
    let skipped = skipped.into_bytes();
    violation(srv.addr, &skipped, 1009, why);
}

#[test]
fn websocket_message_far_over_limit_closes_1009() {
    let srv = small_limits();
    let mut p = Peer::service(srv.addr);
    let big = format!("PUB t\r\n\r\n{}", "w".repeat(1000));
    let _ = p.ws.send(Message::binary(big.into_bytes()));
    let (c, r) = expect_close_only(&mut p.ws);
    assert_eq!(c, 1009);
    assert!(!r.is_empty(), "close without a reason");
}

#[test]
fn invalid_websocket_frame_closes_1002() {
    let srv = TestServer::start();
    // Unmasked client frame, reserved opcode, RSV1 without an extension.
    let mut unmasked = vec![0x81u8, 5];
    unmasked.extend_from_slice(b"hello");
    let reserved_opcode = raw_frame(0x83, b"x");
    let rsv1 = raw_frame(0xc1, b"x");
    for bytes in [unmasked, reserved_opcode, rsv1] {
        let mut p = Peer::service(srv.addr);
        p.ws.get_mut().write_all(&bytes).unwrap();
        let (c, r) = expect_close_only(&mut p.ws);
        assert_eq!(c, 1002, "frame {bytes:02x?}");
        assert!(!r.is_empty(), "close without a reason");
    }
}

// ---------------------------------------------------------------- §7 protocol errors

#[test]
fn unknown_command_gets_error_and_connection_stays() {
    let srv = TestServer::start();
    for mut p in [Peer::service(srv.addr), Peer::client(srv.addr)] {
        for cmd in ["FOO", "pub", "Pub", "sub", "SYNCX"] {
            p.send(cmd, "t", &[], "body");
            assert_error(&p.recv(), cmd, "t", reason::UNKNOWN_COMMAND, None);
        }
        p.send("FOO", "a target", &[("ReqID", "r-42"), ("X", "y")], "");
        assert_error(
            &p.recv(),
            "FOO",
            "a target",
            reason::UNKNOWN_COMMAND,
            Some(("ReqID", "r-42")),
        );
        p.sync();
    }
    // The connection is really usable afterwards: a pub/sub round trip.
    let mut svc = Peer::service(srv.addr);
    svc.send("FOO", "t", &[], "");
    assert_error(&svc.recv(), "FOO", "t", reason::UNKNOWN_COMMAND, None);
    svc.send("SUB", "after", &[], "");
    svc.send("PUB", "after", &[], "round trip");
    let m = svc.recv();
    assert_eq!(
        (m.target.as_str(), m.body.as_str()),
        ("after", "round trip")
    );
}

#[test]
fn malformed_sub_is_not_processed() {
    let srv = TestServer::start();
    let mut s = Peer::service(srv.addr);
    let mut pubr = Peer::service(srv.addr);
    s.send_raw("SUB news\r\nX-A: 1\r\nno colon here\r\n\r\n.\r\n");
    assert_error(&s.recv(), "SUB", "news", reason::MALFORMED, None);
    s.sync();
    pubr.send("PUB", "news", &[], "must not arrive");
    pubr.send("PUB", &format!("MSG:{}", s.cid), &[], "sentinel");
    expect_private(&mut s, "sentinel");
}

#[test]
fn malformed_pub_is_not_delivered() {
    let srv = TestServer::start();
    let mut sub = Peer::service(srv.addr);
    sub.send("SUB", "news", &[], "");
    sub.sync();
    let mut p = Peer::service(srv.addr);
    p.send_raw("PUB news\r\nX-A: 1\r\nbroken\r\n\r\nbody\r\n.\r\n");
    assert_error(&p.recv(), "PUB", "news", reason::MALFORMED, None);
    // A line of only spaces and tabs is a header line without `:`.
    p.send_raw("PUB news\r\n \t \r\n\r\nbody\r\n.\r\n");
    assert_error(&p.recv(), "PUB", "news", reason::MALFORMED, None);
    p.send("PUB", "news", &[], "valid");
    let m = sub.recv();
    assert_eq!(m.body, "valid");
    assert_eq!(m.header("cid"), Some(p.cid.as_str()));
}

/// §2: header names are tokens and values hold no control character but tab. A lone CR
/// in a value, or a VT in a name, could forge a `cid` for a receiver that splits lines on
/// CR or trims with Python's `strip()`: such a message is malformed, nothing is relayed
/// (not to a subscriber, not to a monitor), and the connection stays usable.
#[test]
fn header_control_characters_are_malformed_and_never_relayed() {
    let srv = TestServer::start();
    let mut sub = Peer::service(srv.addr);
    sub.send("SUB", "news", &[], "");
    sub.sync();
    let mut mon = Peer::monitor(srv.addr);
    let mut p = Peer::service(srv.addr);
    p.send_raw("PUB news\r\nReqID: q-1\r\nX: a\rcid: forged\r\n\r\nbody\r\n.\r\n");
    assert_error(
        &p.recv(),
        "PUB",
        "news",
        reason::MALFORMED,
        Some(("ReqID", "q-1")),
    );
    p.send_raw("PUB news\r\ncid\x0b: forged\r\n\r\nbody\r\n.\r\n");
    assert_error(&p.recv(), "PUB", "news", reason::MALFORMED, None);
    p.send_raw("PUB news\r\nX: 1\x7f\r\n\r\nbody\r\n.\r\n");
    assert_error(&p.recv(), "PUB", "news", reason::MALFORMED, None);
    // A client's REQ is refused the same way, before any permission check.
    let mut c = Peer::client(srv.addr);
    c.send_raw("REQ q\r\nReqID: r-9\r\nX: a\x00b\r\n\r\n.\r\n");
    assert_error(
        &c.recv(),
        "REQ",
        "q",
        reason::MALFORMED,
        Some(("ReqID", "r-9")),
    );
    c.sync();
    // The connection stays usable: the next message is relayed, and it is the first
    // thing the subscriber and the monitor see.
    p.send("PUB", "news", &[("X-T", "a\tb")], "valid");
    for peer in [&mut sub, &mut mon] {
        let m = peer.recv();
        assert_eq!((m.target.as_str(), m.body.as_str()), ("news", "valid"));
        assert_eq!(own_headers(&m), vec![("X-T", "a\tb")]);
        assert_eq!(m.headers_named("cid"), vec![("cid", p.cid.as_str())]);
    }
    let errors = metrics(srv.addr);
    assert_eq!(
        errors[&format!("middleman_errors_total{{reason=\"{}\"}}", reason::MALFORMED)],
        4.0
    );
}

#[test]
fn malformed_message_keeps_reply_order_and_reqid() {
    let srv = TestServer::start();
    let mut p = Peer::service(srv.addr);
    let t = format!("MSG:{}", p.cid);
    let raw = format!(
        "PUB {t}\r\n\r\none\r\n.\r\n\
         PUB x\r\nReqID: q-7\r\nbroken line\r\n\r\nb\r\n..\r\n...\r\n.\r\n\
         PUB {t}\r\n\r\ntwo\r\n.\r\n\
         REQ y\r\nreqid: lower-1\r\n \t \r\n.\r\n\
         PUB {t}\r\n\r\nthree\r\n.\r\n"
    );
    p.send_raw(&raw);
    expect_private(&mut p, "one");
    assert_error(
        &p.recv(),
        "PUB",
        "x",
        reason::MALFORMED,
        Some(("ReqID", "q-7")),
    );
    expect_private(&mut p, "two");
    let m = p.recv();
    assert_eq!(m.header("cmd"), Some("REQ"));
    assert_eq!(m.header("reason"), Some(reason::MALFORMED));
    assert_eq!(m.header("ReqID"), Some("lower-1"));
    assert_eq!(m.body, format!("{}: REQ y", reason::MALFORMED));
    expect_private(&mut p, "three");
    p.sync();
}

#[test]
fn malformed_message_skipped_lines_do_not_count_as_headers() {
    let srv = TestServer::start();
    let mut p = Peer::service(srv.addr);
    let mut raw = String::from("PUB x\r\nbroken\r\n");
    for i in 0..100 {
        raw.push_str(&format!("H{i}: v\r\n"));
    }
    raw.push_str("\r\nbody\r\n.\r\n");
    p.send_raw(&raw);
    assert_error(&p.recv(), "PUB", "x", reason::MALFORMED, None);
    p.sync();
}

#[test]
fn malformed_message_split_over_websocket_messages() {
    let srv = TestServer::start();
    let mut p = Peer::service(srv.addr);
    let t = format!("MSG:{}", p.cid);
    let raw =
        format!("SUB z\r\nReqID: s-1\r\nno-colon\r\n\r\nx\r\n.\r\nPUB {t}\r\n\r\nafter\r\n.\r\n");
    for b in raw.as_bytes() {
        send_bin(&mut p, &[*b]);
    }
    assert_error(
        &p.recv(),
        "SUB",
        "z",
        reason::MALFORMED,
        Some(("ReqID", "s-1")),
    );
    expect_private(&mut p, "after");
}

// ---------------------------------------------------------------- §2 stream behaviour

#[test]
fn several_messages_in_one_websocket_message_one_out_per_websocket_message() {
    let srv = TestServer::start();
    let mut sub = Peer::service(srv.addr);
    sub.send("SUB", "s", &[], "");
    sub.sync();
    let mut p = Peer::service(srv.addr);
    let mut raw = String::new();
    for i in 0..5 {
        raw.push_str(&format!("PUB s\r\nN: {i}\r\n\r\nmsg {i}\r\n.\r\n"));
    }
    p.send_raw(&raw);
    for i in 0..5 {
        let (text, data) = recv_frame(&mut sub);
        assert!(text, "valid UTF-8 must arrive as a text message");
        // parse_one asserts the WebSocket message holds exactly one protocol message.
        let m = parse_one(&data);
        assert_eq!(m.body, format!("msg {i}"));
        assert_eq!(own_headers(&m), vec![("N", i.to_string().as_str())]);
    }
    sub.sync();
}

#[test]
fn one_message_in_one_byte_websocket_messages() {
    let srv = TestServer::start();
    let mut p = Peer::service(srv.addr);
    let raw = format!("PUB MSG:{}\r\nX-K: v\r\n\r\n..dot\r\nline2\r\n.\r\n", p.cid);
    for (i, b) in raw.bytes().enumerate() {
        // Text and binary WebSocket messages feed the same byte stream.
        let m = if i % 2 == 0 {
            Message::binary(vec![b])
        } else {
            Message::text(String::from(b as char))
        };
        p.ws.send(m).unwrap();
    }
    let m = p.recv();
    assert_eq!(m.body, ".dot\r\nline2");
    assert_eq!(own_headers(&m), vec![("X-K", "v")]);
    p.sync();
}

#[test]
fn one_message_split_in_two_at_every_byte_boundary() {
    let srv = TestServer::start();
    let mut p = Peer::service(srv.addr);
    let raw = format!("PUB MSG:{}\r\nA: b\r\n\r\n..x\r\ny\r\n.\r\n", p.cid);
    let bytes = raw.as_bytes();
    for cut in 1..bytes.len() {
        send_bin(&mut p, &bytes[..cut]);
        send_bin(&mut p, &bytes[cut..]);
        let m = p.recv();
        assert_eq!(m.body, ".x\r\ny", "cut at {cut}");
        assert_eq!(own_headers(&m), vec![("A", "b")], "cut at {cut}");
    }
    p.sync();
}

#[test]
fn lf_only_input_gets_crlf_output() {
    let srv = TestServer::start();
    let mut p = Peer::service(srv.addr);
    let raw = format!("PUB MSG:{}\nA: 1\n\nl1\nl2\n.\n", p.cid);
    p.send_raw(&raw);
    let (text, data) = recv_frame(&mut p);
    assert!(text);
    let (head, rest) = split_head(&data);
    assert_crlf_head(head);
    assert!(head.starts_with(format!("PUB MSG:{}\r\nA: 1\r\n", p.cid).as_bytes()));
    // The inner LF stays LF; the terminator uses CRLF.
    assert_eq!(rest, b"l1\nl2\r\n.\r\n");
    let m = parse_one(&data);
    assert_eq!(m.header("cid"), Some(p.cid.as_str()));
    assert_eq!(m.header("uid"), Some(""));
    // Mixed: LF first line, CRLF headers.
    p.send_raw(&format!("PUB MSG:{}\nB: 2\r\n\nz\r\n.\n", p.cid));
    let m = p.recv();
    assert_eq!((m.body.as_str(), own_headers(&m)), ("z", vec![("B", "2")]));
}

#[test]
fn empty_lines_before_a_first_line_are_ignored() {
    let srv = TestServer::start();
    let mut p = Peer::service(srv.addr);
    let t = format!("MSG:{}", p.cid);
    p.send_raw(&format!(
        "\r\n\n\r\n\nPUB {t}\r\n\r\nhi\r\n.\r\n\r\n\r\nPUB {t}\r\n\r\nhi2\r\n.\r\n\n"
    ));
    expect_private(&mut p, "hi");
    expect_private(&mut p, "hi2");
    // Empty lines in their own WebSocket messages, a CR split from its LF.
    send_bin(&mut p, b"\r\n");
    send_bin(&mut p, b"\r");
    send_bin(&mut p, b"\n");
    send_bin(&mut p, format!("PUB {t}\r\n\r\nhi3\r\n.\r\n").as_bytes());
    expect_private(&mut p, "hi3");
    p.sync();
}

#[test]
fn output_is_text_when_utf8_and_binary_otherwise() {
    let srv = TestServer::start();
    let mut sub = Peer::client(srv.addr);
    let mut svc = Peer::service(srv.addr);
    svc.send("ESUB", "bin", &[], "");
    svc.sync();
    sub.send("SUB", "bin", &[], "");
    sub.sync();

    // Invalid UTF-8 in the body, sent in a binary WebSocket message.
    send_bin(
        &mut svc,
        b"PUB bin\r\nX: 1\r\n\r\n\xff\xfe\x80ok\r\n\xc3\r\n.\r\n",
    );
    let (text, data) = recv_frame(&mut sub);
    assert!(!text, "invalid UTF-8 must arrive as a binary message");
    let (cmd, target, headers, body) = decode_bytes(&data);
    assert_eq!((cmd.as_str(), target.as_str()), ("PUB", "bin"));
    assert_eq!(body, b"\xff\xfe\x80ok\r\n\xc3");
    assert_eq!(headers[0], ("X".to_owned(), "1".to_owned()));
    let (_, rest) = split_head(&data);
    assert_eq!(rest, b"\xff\xfe\x80ok\r\n\xc3\r\n.\r\n");

    // Invalid UTF-8 in a header value only.
    send_bin(&mut svc, b"PUB bin\r\nX: \xfe\r\n\r\nplain\r\n.\r\n");
    let (text, data) = recv_frame(&mut sub);
    assert!(!text, "invalid UTF-8 must arrive as a binary message");
    assert_eq!(decode_bytes(&data).3, b"plain");

    // Valid UTF-8 sent in a binary WebSocket message arrives as text.
    send_bin(
        &mut svc,
        "PUB bin\r\n\r\nh\u{e9}llo \u{2713}\r\n.\r\n".as_bytes(),
    );
    let (text, data) = recv_frame(&mut sub);
    assert!(text, "valid UTF-8 must arrive as a text message");
    assert_eq!(parse_one(&data).body, "h\u{e9}llo \u{2713}");

    // A multi-byte character split across WebSocket messages is reassembled.
    let raw = "PUB bin\r\n\r\n\u{2713}\r\n.\r\n".as_bytes();
    let cut = raw.iter().position(|&b| b == 0xe2).unwrap() + 1;
    send_bin(&mut svc, &raw[..cut]);
    send_bin(&mut svc, &raw[cut..]);
    let (text, data) = recv_frame(&mut sub);
    assert!(text);
    assert_eq!(parse_one(&data).body, "\u{2713}");
}

#[test]
fn dot_stuffing_round_trip() {
    let srv = TestServer::start();
    let mut sub = Peer::service(srv.addr);
    sub.send("SUB", "dots", &[], "");
    sub.sync();
    let mut p = Peer::service(srv.addr);

    // (sent body lines, expected body, expected bytes after the head on output)
    let cases: &[(&str, &str, &str)] = &[
        // Lines starting with `.` and `..`; inner LF and CRLF kept as sent.
        (
            "..a\nx\r\n...b\r\n..\r\n",
            ".a\nx\r\n..b\r\n.",
            "..a\nx\r\n...b\r\n..\r\n.\r\n",
        ),
        ("..\r\n", ".", "..\r\n.\r\n"),
        ("...\r\n", "..", "...\r\n.\r\n"),
        // A line starting with a single `.` (not stuffed by the sender) is unchanged in
        // the body and stuffed on output.
        ("a.\r\n.b.\r\n", "a.\r\n.b.", "a.\r\n..b.\r\n.\r\n"),
        // A trailing empty line is part of the body: `a` CRLF.
        ("a\r\n\r\n", "a\r\n", "a\r\n\r\n.\r\n"),
        // Empty body.
        ("", "", "\r\n.\r\n"),
        ("\r\n", "", "\r\n.\r\n"),
        ("\n", "", "\r\n.\r\n"),
        // A line that is `.` followed by a space is not the terminator.
        ("x\r\n. \r\n", "x\r\n. ", "x\r\n.. \r\n.\r\n"),
    ];
    for &(lines, body, out) in cases {
        p.send_raw(&format!("PUB dots\r\n\r\n{lines}.\r\n"));
        let (_, data) = recv_frame(&mut sub);
        let m = parse_one(&data);
        assert_eq!(m.body, body, "sent {lines:?}");
        let (head, rest) = split_head(&data);
        assert_crlf_head(head);
        assert_eq!(
            String::from_utf8_lossy(rest),
            out,
            "sent body lines {lines:?}"
        );
    }
    // `.` where a header line or the blank line is expected ends the message: the
    // headers so far, an empty body.
    p.send_raw("PUB dots\r\n.\r\nPUB dots\r\nX-H: 1\r\n.\r\n");
    for want in [vec![], vec![("X-H", "1")]] {
        let (_, data) = recv_frame(&mut sub);
        let m = parse_one(&data);
        assert_eq!(m.body, "");
        assert_eq!(own_headers(&m), want);
        assert_eq!(split_head(&data).1, b"\r\n.\r\n");
    }
    // Through the harness' own encoder: any body survives.
    for body in [
        ".",
        "..",
        ".\n.",
        "a\n.\n..\n...",
        "\n",
        "\n\n",
        ". .",
        ".\r\n.",
    ] {
        p.send("PUB", "dots", &[], body);
        assert_eq!(sub.recv().body, body);
    }
    sub.sync();
}

#[test]
fn js_client_request_gets_reqid_spelled_as_sent() {
    let srv = TestServer::start();
    let mut svc = Peer::service(srv.addr);
    svc.send("EREQ", "name", &[], "");
    svc.sync();
    let mut cli = Peer::client(srv.addr);
    let uuid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
    cli.send_raw(&format!("REQ name\r\nReqID: {uuid}\r\n\r\nbody\r\n.\r\n"));

    let req = svc.recv();
    assert_eq!((req.cmd.as_str(), req.target.as_str()), ("REQ", "name"));
    assert_eq!(req.body, "body");
    assert_eq!(req.headers_named("ReqID"), vec![("ReqID", uuid)]);
    assert_eq!(req.header("cid"), Some(cli.cid.as_str()));
    let rid = req.header("rid").expect("REQ carries rid").to_owned();
    assert!(!rid.is_empty());

    svc.send_raw(&format!(
        "RES name\r\nrid: {rid}\r\nX-R: 1\r\n\r\nanswer\r\n.\r\n"
    ));
    let res = cli.recv();
    assert_eq!((res.cmd.as_str(), res.target.as_str()), ("RES", "name"));
    assert_eq!(res.body, "answer");
    // Spelled as the requester sent it: `ReqID`, not `Reqid`.
    assert_eq!(res.headers_named("reqid"), vec![("ReqID", uuid)]);
    assert_eq!(res.header("rid"), None);
    assert_eq!(res.header("X-R"), Some("1"));
    assert_eq!(res.header("cid"), Some(svc.cid.as_str()));
    cli.sync();
    svc.sync();
}

#[test]
fn python_service_ereq_lf_only_empty_body_is_accepted() {
    let srv = TestServer::start();
    let mut svc = Peer::service(srv.addr);
    svc.send_raw("EREQ name\n\n\r\n.\r\n");
    // No error for it (the next message is the sync's own).
    svc.sync();
    let mut cli = Peer::client(srv.addr);
    cli.send("REQ", "name", &[("ReqID", "py-1")], "q");
    let req = svc.recv();
    assert_eq!(
        (req.cmd.as_str(), req.target.as_str(), req.body.as_str()),
        ("REQ", "name", "q")
    );
    let rid = req.header("rid").expect("rid").to_owned();
    svc.send_raw(&format!("RES name\nrid: {rid}\n\n\r\n.\r\n"));
    let res = cli.recv();
    assert_eq!((res.cmd.as_str(), res.body.as_str()), ("RES", ""));
    assert_eq!(res.headers_named("reqid"), vec![("ReqID", "py-1")]);
}

// ---------------------------------------------------------------- closing

#[test]
fn peer_initiated_close_gets_close_reply() {
    let srv = TestServer::start();
    let mut other = Peer::service(srv.addr);
    other.send("SUB", "c", &[], "");
    other.sync();
    let mut p = Peer::service(srv.addr);
    p.send("SUB", "c", &[], "");
    p.sync();
    p.ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .unwrap();
    let (code, _) = expect_close_only(&mut p.ws);
    assert_eq!(code, 1000);
    expect_hangup(&mut p.ws);
    // The others go on.
    other.send("PUB", "c", &[], "still here");
    assert_eq!(other.recv().body, "still here");
    other.sync();
}

#[test]
fn reset_mid_frame_does_not_disturb_others() {
    let srv = TestServer::start();
    let mut sub = Peer::service(srv.addr);
    sub.send("SUB", "r", &[], "");
    sub.sync();

    let mut victims = Vec::new();
    // Mid-frame: the header of a 200-byte frame and 20 bytes of it.
    let mut a = Peer::service(srv.addr);
    let frame = raw_frame(0x82, &[b'q'; 200]);
    a.ws.get_mut().write_all(&frame[..28]).unwrap();
    victims.push(a.ws.get_mut().try_clone().unwrap());
    // Mid-protocol-message: a complete frame holding half a PUB.
    let mut b = Peer::service(srv.addr);
    b.send_raw("PUB r\r\n\r\nhalf a mess");
    victims.push(b.ws.get_mut().try_clone().unwrap());
    // Mid-HTTP-request.
    let mut c = TcpStream::connect(srv.addr).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nUpgrade: web").unwrap();
    victims.push(c);
    // Mid-handshake key frame.
    let mut d = ws_connect(srv.addr);
    d.get_mut()
        .write_all(&raw_frame(0x81, b"0123456789")[..6])
        .unwrap();
    victims.push(d.get_mut().try_clone().unwrap());

    for s in &victims {
        set_linger_reset(s);
    }
    drop(victims);
    drop((a, b, d));

    // Everyone else is served normally.
    let mut p = Peer::service(srv.addr);
    p.send("PUB", "r", &[], "after the resets");
    let m = sub.recv();
    assert_eq!(m.body, "after the resets");
    assert_eq!(m.header("cid"), Some(p.cid.as_str()));
    sub.sync();
    let resp = http_get(srv.addr, "GET /healthz HTTP/1.1\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}
