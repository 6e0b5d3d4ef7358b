//! PROTOCOL.md §1 (transport and handshake) and §8 (plain HTTP on the same port), over
//! real sockets against the in-process server.

mod common;
use common::*;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use tungstenite::{Message, WebSocket};

/// Open a WebSocket on `path` (no key sent yet).
fn ws_connect_path(addr: SocketAddr, path: &str) -> WebSocket<TcpStream> {
    let sock = TcpStream::connect(addr).expect("connect");
    sock.set_read_timeout(Some(WAIT)).unwrap();
    sock.set_nodelay(true).unwrap();
    let (ws, resp) =
        tungstenite::client::client(format!("ws://{addr}{path}"), sock).expect("upgrade");
    assert_eq!(resp.status().as_u16(), 101);
    ws
}

/// Send `key` on a fresh WebSocket and return the cid after `MM OK`.
fn authenticate(ws: &mut WebSocket<TcpStream>, key: &str) -> String {
    ws.send(Message::text(key)).unwrap();
    assert_eq!(next_data(ws).expect("MM OK"), b"MM OK");
    let cid = String::from_utf8(next_data(ws).expect("cid")).expect("cid is UTF-8");
    assert_cid(&cid);
    cid
}

fn assert_cid(cid: &str) {
    assert!(
        !cid.is_empty()
            && cid
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "cid {cid:?} is not [0-9a-z]+"
    );
}

/// Split an HTTP response into (status, head, body).
fn split_http(resp: &str) -> (u16, String, String) {
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in response {resp:?}"));
    let status_line = head.lines().next().unwrap_or("");
    let mut parts = status_line.split(' ');
    assert_eq!(
        parts.next(),
        Some("HTTP/1.1"),
        "status line {status_line:?}"
    );
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    (status, head.to_owned(), body.to_owned())
}

fn header_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// No HTTP response ever contains a configured key (§8).
fn assert_no_keys(resp: &str) {
    for key in [SERVICE_KEY, CLIENT_KEY, MONITOR_KEY] {
        assert!(
            !resp.contains(key),
            "response contains the key {key:?}: {resp}"
        );
    }
}

/// A quick proof that the server serves others: a service round trip and /healthz.
fn assert_server_serves(addr: SocketAddr) {
    let mut p = Peer::service(addr);
    p.send(
        "PUB",
        &format!("MSG:{}", p.cid),
        &[("X-Alive", "1")],
        "alive",
    );
    let m = p.recv();
    assert_eq!((m.cmd.as_str(), m.body.as_str()), ("PUB", "alive"));
    assert_eq!(m.header("X-Alive"), Some("1"));
    let (status, _, body) = split_http(&http_get(addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"));
    assert_eq!((status, body.as_str()), (200, "ok"));
}

// ---------------------------------------------------------------- §1 handshake

#[test]
fn upgrade_works_on_any_path() {
    let srv = TestServer::start();
    for path in ["/", "/anything?x=1", "/a/b/c", "/healthz", "/metrics?y"] {
        let mut ws = ws_connect_path(srv.addr, path);
        let cid = authenticate(&mut ws, SERVICE_KEY);
        // The connection is fully usable: its private channel works.
        let raw = format!("PUB MSG:{cid}\r\n\r\nvia {path}\r\n.\r\n");
        ws.send(Message::text(raw)).unwrap();
        let m = parse_one(&next_data(&mut ws).expect("private message"));
        assert_eq!(m.target, format!("MSG:{cid}"), "path {path}");
        assert_eq!(m.body, format!("via {path}"), "path {path}");
    }
}

#[test]
fn key_accepted_gives_mm_ok_then_cid_as_text() {
    let srv = TestServer::start();
    for key in [SERVICE_KEY, CLIENT_KEY, MONITOR_KEY] {
        let mut ws = ws_connect(srv.addr);
        ws.send(Message::text(key)).unwrap();
        match next_msg(&mut ws) {
            Message::Text(t) => assert_eq!(t.as_str(), "MM OK"),
            other => panic!("expected text MM OK, got {other:?}"),
        }
        match next_msg(&mut ws) {
            Message::Text(t) => assert_cid(t.as_str()),
            other => panic!("expected a text cid, got {other:?}"),
        }
    }
}

#[test]
fn cids_are_unique_across_many_connections() {
    let srv = TestServer::start();
    let mut seen = HashSet::new();
    let mut open = Vec::new();
    for i in 0..200 {
        let key = [SERVICE_KEY, CLIENT_KEY, MONITOR_KEY][i % 3];
        let p = Peer::connect(srv.addr, key);
        assert!(seen.insert(p.cid.clone()), "cid {} repeated", p.cid);
        // Keep half open, close the other half: cids of departed connections are not
        // reused either.
        if i % 2 == 0 {
            open.push(p);
        }
    }
    assert_eq!(seen.len(), 200);
    // A cid is not repeated after a restart either (§1.6).
    let other = TestServer::start();
    for _ in 0..20 {
        let p = Peer::client(other.addr);
        assert!(
            seen.insert(p.cid.clone()),
            "cid {} repeated by a new server",
            p.cid
        );
    }
}

#[test]
fn key_with_surrounding_whitespace_is_accepted() {
    let srv = TestServer::start();
    let variants = [
        format!("{SERVICE_KEY}\r\n"),
        format!("{SERVICE_KEY}\n"),
        format!("  {SERVICE_KEY}  "),
        format!("\t{CLIENT_KEY}\t\r\n"),
        format!(" \r\n{MONITOR_KEY} \r\n"),
    ];
    for key in &variants {
        let mut ws = ws_connect(srv.addr);
        let cid = authenticate(&mut ws, key);
        // Prove the connection is authenticated with a round trip (an unknown command
        // always answers with an error, whatever the role).
        ws.send(Message::text("NOPE x\r\n\r\n.\r\n")).unwrap();
        let m = parse_one(&next_data(&mut ws).expect("error reply"));
        assert_eq!(
            (m.cmd.as_str(), m.target.as_str()),
            ("PUB", "ERROR"),
            "{key:?}"
        );
        assert_eq!(m.header("cmd"), Some("NOPE"), "{key:?} ({cid})");
    }
}

#[test]
fn bad_key_is_closed_with_1008_and_nothing_else_processed() {
    let srv = TestServer::start();
    let mut sub = Peer::service(srv.addr);
    sub.send("SUB", "news", &[], "");
    sub.sync();

    let bad_keys = [
        "wrong".to_owned(),
        String::new(),
        format!("{SERVICE_KEY}x"),
        SERVICE_KEY[..SERVICE_KEY.len() - 1].to_owned(),
        format!("{SERVICE_KEY} {CLIENT_KEY}"),
    ];
    for key in &bad_keys {
        let mut ws = ws_connect(srv.addr);
        ws.send(Message::text(key.as_str())).unwrap();
        // Sent right behind the bad key, before any answer: must never be processed.
        // (The server may already be hanging up: a failed write is fine.)
        let _ = ws.send(Message::text("PUB news\r\n\r\nsmuggled\r\n.\r\n"));
        let _ = ws.send(Message::text(format!("{SERVICE_KEY}\r\n")));
        let (code, reason) = expect_close_only(&mut ws);
        assert_eq!((code, reason.as_str()), (1008, "bad key"), "key {key:?}");
        expect_hangup(&mut ws);
    }

    // Nothing published by the refused connections reached the subscriber: the next
    // message it gets is this sentinel.
    let mut svc = Peer::service(srv.addr);
    svc.send("PUB", "news", &[], "sentinel");
    let m = sub.recv();
    assert_eq!((m.target.as_str(), m.body.as_str()), ("news", "sentinel"));
    assert_eq!(m.header("cid"), Some(svc.cid.as_str()));
}

#[test]
fn binary_bad_key_is_refused_too() {
    let srv = TestServer::start();
    let mut ws = ws_connect(srv.addr);
    ws.send(Message::binary(b"\xff\xfe not a key".to_vec()))
        .unwrap();
    let (code, reason) = expect_close_only(&mut ws);
    assert_eq!((code, reason.as_str()), (1008, "bad key"));
}

#[test]
fn handshake_timeout_closes_half_sent_http_request() {
    let srv = TestServer::with(|cfg| cfg.handshake_timeout = Duration::from_millis(300));
    let start = Instant::now();
    let mut half = TcpStream::connect(srv.addr).unwrap();
    half.set_read_timeout(Some(WAIT)).unwrap();
    half.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: webs")
        .unwrap();

    // While it hangs, others are served normally.
    assert_server_serves(srv.addr);

    let mut buf = [0u8; 256];
    let n = half
        .read(&mut buf)
        .expect("expected EOF from the server, got an error");
    let elapsed = start.elapsed();
    assert_eq!(
        n,
        0,
        "expected EOF, got {:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    assert!(
        elapsed >= Duration::from_millis(250),
        "closed before the handshake timeout: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "closed too late: {elapsed:?}"
    );
    assert_server_serves(srv.addr);
}

#[test]
fn handshake_timeout_closes_connection_that_never_upgrades() {
    // A TCP connection that sends nothing at all.
    let srv = TestServer::with(|cfg| cfg.handshake_timeout = Duration::from_millis(300));
    let start = Instant::now();
    let mut silent = TcpStream::connect(srv.addr).unwrap();
    silent.set_read_timeout(Some(WAIT)).unwrap();
    assert_server_serves(srv.addr);
    let mut buf = [0u8; 64];
    let n = silent.read(&mut buf).expect("expected EOF");
    assert_eq!(n, 0);
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(250), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
}

#[test]
fn handshake_timeout_closes_websocket_without_key() {
    let srv = TestServer::with(|cfg| cfg.handshake_timeout = Duration::from_millis(300));
    let start = Instant::now();
    let mut ws = ws_connect(srv.addr);
    // A second one that sent half a frame of its key.
    let mut half_key = ws_connect(srv.addr);
    half_key.get_mut().write_all(&[0x81, 0x90]).unwrap();

    assert_server_serves(srv.addr);

    for w in [&mut ws, &mut half_key] {
        let (code, reason) = expect_close_only(w);
        let elapsed = start.elapsed();
        assert_eq!(code, 1008, "reason {reason:?}");
        assert!(!reason.is_empty(), "close without a reason");
        assert!(elapsed >= Duration::from_millis(250), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    }
    // A key sent now is too late: nothing answers but the close.
    let _ = ws.send(Message::text(SERVICE_KEY));
    expect_hangup(&mut ws);
    assert_server_serves(srv.addr);
}

#[test]
fn handshake_timeout_does_not_touch_authenticated_connections() {
    let srv = TestServer::with(|cfg| cfg.handshake_timeout = Duration::from_millis(300));
    let mut p = Peer::service(srv.addr);
    // Wait past the handshake timeout on a message that is bound to arrive: a
    // key-less WebSocket opened after `p` is closed once the timeout has passed.
    let mut ws = ws_connect(srv.addr);
    let (code, _) = expect_close_only(&mut ws);
    assert_eq!(code, 1008);
    p.sync();
}

// ---------------------------------------------------------------- §8 plain HTTP

#[test]
fn healthz_is_200_ok() {
    let srv = TestServer::start();
    for req in [
        "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /healthz HTTP/1.0\r\n\r\n",
        "GET /healthz?probe=1 HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let resp = http_get(srv.addr, req);
        let (status, head, body) = split_http(&resp);
        assert_eq!(status, 200, "{req:?} -> {resp:?}");
        assert_eq!(body, "ok", "{req:?}");
        assert_eq!(header_value(&head, "Content-Length"), Some("2"));
        assert_no_keys(&resp);
    }
}

#[test]
fn unknown_path_is_404() {
    let srv = TestServer::start();
    for req in [
        "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        "POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    ] {
        let resp = http_get(srv.addr, req);
        let (status, head, body) = split_http(&resp);
        assert_eq!(status, 404, "{req:?} -> {resp:?}");
        if let Some(len) = header_value(&head, "Content-Length") {
            assert_eq!(len.parse::<usize>().unwrap(), body.len());
        }
        assert_no_keys(&resp);
    }
}

#[test]
fn metrics_is_prometheus_text_without_keys() {
    let srv = TestServer::start();
    let mut svc = Peer::service(srv.addr);
    let mut cli = Peer::client(srv.addr);
    let mut mon = Peer::monitor(srv.addr);
    svc.sync();
    cli.sync();
    mon.sync();
    // A refused key must not show up either.
    let mut bad = ws_connect(srv.addr);
    bad.send(Message::text(format!("{SERVICE_KEY}-but-wrong")))
        .unwrap();
    assert_eq!(expect_close_only(&mut bad).0, 1008);

    let resp = http_get(srv.addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let (status, head, body) = split_http(&resp);
    assert_eq!(status, 200, "{resp}");
    assert_no_keys(&resp);
    assert!(body.contains("middleman_connections"), "{body}");
    assert!(
        header_value(&head, "Content-Type").is_some_and(|v| v.starts_with("text/plain")),
        "{head}"
    );
    assert_eq!(
        header_value(&head, "Content-Length").map(|v| v.parse::<usize>().unwrap()),
        Some(body.len())
    );

    // Every line is a comment or `name[{labels}] value`.
    let mut by_role = std::collections::HashMap::new();
    for line in body.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(c) = line.strip_prefix("# ") {
            assert!(
                c.starts_with("HELP middleman_") || c.starts_with("TYPE middleman_"),
                "comment line {line:?}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("sample line {line:?}"));
        assert!(value.parse::<f64>().is_ok(), "value in {line:?}");
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':'),
            "metric name in {line:?}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "labels in {line:?}");
        }
        if name == "middleman_connections" {
            if let Some(role) = series
                .split_once("role=\"")
                .and_then(|(_, r)| r.split_once('"'))
                .map(|(r, _)| r.to_owned())
            {
                by_role.insert(role, value.parse::<f64>().unwrap());
            }
        }
    }
    for role in ["service", "client", "monitor"] {
        assert_eq!(
            by_role.get(role).copied(),
            Some(1.0),
            "middleman_connections{{role={role:?}}} in {body}"
        );
    }
}

#[test]
fn malformed_http_request_is_400() {
    let srv = TestServer::start();
    for req in [
        "\x00\x01garbage\r\n\r\n",
        "GARBAGE GARBAGE GARBAGE GARBAGE\r\n\r\n",
        "GET / HTTP/1.1\r\nno colon header\r\n\r\n",
    ] {
        let resp = http_get(srv.addr, req);
        let (status, _, _) = split_http(&resp);
        assert_eq!(status, 400, "{req:?} -> {resp:?}");
        assert_no_keys(&resp);
    }
    assert_server_serves(srv.addr);
}

#[test]
fn over_long_request_head_is_400() {
    let srv = TestServer::start();
    let mut req = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: ");
    req.push_str(&"a".repeat(9 * 1024));
    // No CRLFCRLF: the head never ends.
    let start = Instant::now();
    let resp = http_get(srv.addr, &req);
    let (status, _, _) = split_http(&resp);
    assert_eq!(status, 400, "{resp:?}");
    assert!(start.elapsed() < Duration::from_secs(3));
    assert_no_keys(&resp);

    // Many short header lines adding up to more than 8 KiB, also without an end.
    let mut req = String::from("GET / HTTP/1.1\r\n");
    for i in 0..40 {
        req.push_str(&format!("X-H{i}: {}\r\n", "b".repeat(250)));
    }
    let resp = http_get(srv.addr, &req);
    assert_eq!(split_http(&resp).0, 400, "{resp:?}");
    assert_server_serves(srv.addr);
}

#[test]
fn upgrade_missing_what_rfc6455_requires_is_400() {
    let srv = TestServer::start();
    let resp = http_get(
        srv.addr,
        "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n",
    );
    assert_eq!(split_http(&resp).0, 400, "{resp:?}");
    assert_no_keys(&resp);
}
