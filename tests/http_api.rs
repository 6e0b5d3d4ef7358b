//! PROTOCOL.md §8.1 (the HTTP API for services) and the decisions of notes-21, over real
//! sockets against the in-process server on 127.0.0.1, with WebSocket services as
//! subscribers and responders.
//!
//! The tests named `curl_*` drive the API with curl (`/usr/bin/curl`, as a user would);
//! they need the curl program, so a plain `cargo test` lists them as ignored (run
//! `.ci/install-tools.sh`, then `cargo test --test http_api -- --include-ignored`). The
//! others speak HTTP over a `TcpStream` and always run: every status code and the
//! pub/req/cmd paths are covered without curl too.

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use middleman::protocol::{Decoded, Decoder, Limits};
use middleman::transport::{Endpoint, Listen};

/// An HTTP answer: status, header lines (name, value) in order, body.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The `MM-` headers, names without the prefix as sent.
    fn mm(&self) -> Vec<(String, String)> {
        self.headers
            .iter()
            .filter(|(n, _)| n.len() > 3 && n[..3].eq_ignore_ascii_case("mm-"))
            .map(|(n, v)| (n[3..].to_owned(), v.clone()))
            .collect()
    }
}

/// Parse a whole response (1xx interim answers skipped); the body is what follows the
/// head, checked against `Content-Length`.
fn parse_reply(raw: &[u8]) -> Reply {
    let mut rest = raw;
    loop {
        let end = rest
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no end of head in {:?}", String::from_utf8_lossy(raw)));
        let head = String::from_utf8_lossy(&rest[..end]).into_owned();
        let body = &rest[end + 4..];
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line {status_line:?}"));
        if (100..200).contains(&status) {
            rest = body;
            continue;
        }
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let reply = Reply {
            status,
            headers,
            body: body.to_vec(),
        };
        if status != 204 {
            let len: usize = reply
                .header("Content-Length")
                .expect("every answer has a Content-Length")
                .parse()
                .unwrap();
            assert_eq!(len, reply.body.len(), "Content-Length of {reply:?}");
        }
        assert_eq!(reply.header("Connection"), Some("close"));
        for key in [SERVICE_KEY, CLIENT_KEY, MONITOR_KEY] {
            assert!(
                !String::from_utf8_lossy(raw).contains(key),
                "a key in the answer"
            );
        }
        return reply;
    }
}

/// POST over a plain socket: `headers` as given (no Content-Length added), then `body`;
/// reads until the server closes.
fn post_raw(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut req = format!("POST {path} HTTP/1.1\r\nHost: x\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    s.write_all(&bytes).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .expect("the server answers and closes");
    parse_reply(&out)
}

/// POST with a service key and a Content-Length.
fn post(addr: SocketAddr, path: &str, mm: &[(&str, &str)], body: &[u8]) -> Reply {
    let auth = format!("Bearer {SERVICE_KEY}");
    let len = body.len().to_string();
    let mut headers = vec![
        ("Authorization", auth.as_str()),
        ("Content-Length", len.as_str()),
    ];
    headers.extend_from_slice(mm);
    post_raw(addr, path, &headers, body)
}

/// Run curl with `args` (the body, if any, on stdin); returns its answer.
fn curl(args: &[&str], stdin: &[u8]) -> Reply {
    let mut child = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "10"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("curl runs (.ci/install-tools.sh installs it)");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_reply(&out.stdout)
}

/// curl POST of `body` (byte for byte, from stdin) with a service key.
fn curl_post(addr: SocketAddr, path: &str, extra: &[&str], body: &[u8]) -> Reply {
    let url = format!("http://{addr}{path}");
    let auth = format!("Authorization: Bearer {SERVICE_KEY}");
    let mut args = vec!["-H", auth.as_str(), "--data-binary", "@-"];
    args.extend_from_slice(extra);
    args.push(url.as_str());
    curl(&args, body)
}

/// The next message a peer receives, with its body as bytes.
fn recv_exact(p: &mut Peer) -> (Msg, Vec<u8>) {
    let data = next_data(&mut p.ws).expect("a message");
    let mut d = Decoder::new(Limits {
        max_message: 64 << 20,
        max_line: 64 << 20,
        max_headers: 1000,
    });
    d.feed(&data);
    match d.next() {
        Ok(Some(Decoded::Message(m))) => (Msg::of(&m), m.body.to_vec()),
        other => panic!("not a message: {other:?}"),
    }
}

/// A service subscribed to `topic` (the SUB processed).
fn subscriber(addr: SocketAddr, topic: &str) -> Peer {
    let mut p = Peer::service(addr);
    p.send("SUB", topic, &[], "");
    p.sync();
    p
}

/// A service that is the responder for `target` (the EREQ processed).
fn responder(addr: SocketAddr, target: &str) -> Peer {
    let mut p = Peer::service(addr);
    p.send("EREQ", target, &[], "");
    p.sync();
    p
}

/// Publish a marker over WebSocket and expect it as `sub`'s very next message: proof
/// that nothing else reached `sub` before it.
fn expect_nothing_but_marker(addr: SocketAddr, sub: &mut Peer, topic: &str) {
    let mut svc = Peer::service(addr);
    svc.send("PUB", topic, &[], "marker");
    let m = sub.recv();
    assert_eq!(
        (m.target.as_str(), m.body.as_str()),
        (topic, "marker"),
        "{m:?}"
    );
}

fn assert_cid(v: Option<&str>) -> String {
    let cid = v.expect("a cid").to_owned();
    assert!(
        !cid.is_empty()
            && cid
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "cid {cid:?}"
    );
    cid
}

// ---------------------------------------------------------------- pub

#[test]
#[ignore = "needs curl: run .ci/install-tools.sh"]
fn curl_pub_is_204_and_delivers_mm_headers_and_the_exact_body() {
    let srv = TestServer::start();
    let mut sub = subscriber(srv.addr, "news/eu");
    // Dots, CR, CRLF, LF, no final line break, bytes that are not UTF-8.
    let body: &[u8] = b".first\r\n..second\nthird\r\n.\r\n\xff\xfe end\r";
    let r = curl_post(
        srv.addr,
        "/api/pub/news%2Feu",
        &[
            "-H",
            "MM-Color: blue",
            "-H",
            "mm-X-Trace: a b",
            "-H",
            "MM-cid: forged",
        ],
        body,
    );
    assert_eq!(r.status, 204, "{r:?}");
    assert!(r.body.is_empty());
    let (m, got) = recv_exact(&mut sub);
    assert_eq!((m.cmd.as_str(), m.target.as_str()), ("PUB", "news/eu"));
    assert_eq!(got, body);
    let names: Vec<&str> = m.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["Color", "X-Trace", "cid", "uid"], "{m:?}");
    assert_eq!(m.header("Color"), Some("blue"));
    assert_eq!(m.header("X-Trace"), Some("a b"));
    let cid = assert_cid(m.header("cid"));
    assert_ne!(cid, "forged");
    assert_ne!(cid, sub.cid);
    assert_eq!(m.header("uid"), Some(""));
}

#[test]
fn pub_over_a_socket_is_204_and_delivered() {
    let srv = TestServer::start();
    let mut sub = subscriber(srv.addr, "t");
    let r = post(srv.addr, "/api/pub/t", &[("MM-Kind", "x")], b"hello\n");
    assert_eq!(r.status, 204, "{r:?}");
    let (m, body) = recv_exact(&mut sub);
    assert_eq!(body, b"hello\n");
    assert_eq!(m.header("Kind"), Some("x"));
    assert_eq!(m.headers.len(), 3);
    // A call is a connection of its own: each gets a new cid.
    post(srv.addr, "/api/pub/t", &[], b"again");
    let (m2, _) = recv_exact(&mut sub);
    assert_ne!(m.header("cid"), m2.header("cid"));
}

#[test]
fn calls_the_broker_or_the_decoder_refuses_are_400_with_the_error_text() {
    let srv = TestServer::with(|cfg| {
        cfg.limits.max_headers = 2;
        cfg.max_reqid_bytes = 8;
    });
    let mut sub = subscriber(srv.addr, "t");
    // More MM- headers than a message may have header lines: nothing applied.
    let r = post(
        srv.addr,
        "/api/pub/t",
        &[("MM-A", "1"), ("MM-B", "2"), ("MM-C", "3"), ("MM-D", "4")],
        b"x",
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.text(), "too many header lines\n");
    // The broker's own error (§7), not a 503/504 one: 400 with its text.
    let r = post(srv.addr, "/api/req/t", &[("MM-ReqID", "123456789")], b"x");
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.text(), "ReqID too long: REQ t\n");
    expect_nothing_but_marker(srv.addr, &mut sub, "t");
}

// ---------------------------------------------------------------- req

#[test]
#[ignore = "needs curl: run .ci/install-tools.sh"]
fn curl_req_is_200_with_the_res_body_and_mm_headers() {
    let srv = TestServer::start();
    let mut resp = responder(srv.addr, "calc");
    let addr = srv.addr;
    let call =
        std::thread::spawn(move || curl_post(addr, "/api/req/calc", &["-H", "MM-Op: add"], b"1 2"));
    let req = resp.recv();
    assert_eq!((req.cmd.as_str(), req.target.as_str()), ("REQ", "calc"));
    assert_eq!(req.body, "1 2");
    assert_eq!(req.header("Op"), Some("add"));
    let reqid = req.header("ReqID").expect("a ReqID supplied").to_owned();
    assert!(reqid.starts_with("http-"), "{reqid}");
    let caller = assert_cid(req.header("cid"));
    assert_eq!(req.header("uid"), Some(""));
    let rid = req.header("rid").expect("rid").to_owned();
    resp.send(
        "RES",
        "calc",
        &[("rid", &rid), ("Result", "3"), ("ReqID", "forged")],
        "three\nlines\n",
    );
    let r = call.join().unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), "three\nlines\n");
    assert_eq!(
        r.mm(),
        vec![
            ("Result".to_owned(), "3".to_owned()),
            ("ReqID".to_owned(), reqid),
            ("cid".to_owned(), resp.cid.clone()),
            ("uid".to_owned(), String::new()),
        ]
    );
    assert_ne!(caller, resp.cid);
    // A ReqID of the caller's is kept, under its spelling.
    let call = std::thread::spawn(move || {
        curl_post(addr, "/api/req/calc", &["-H", "MM-reqid: mine-1"], b"")
    });
    let req = resp.recv();
    assert_eq!(req.headers_named("ReqID"), vec![("reqid", "mine-1")]);
    let rid = req.header("rid").unwrap().to_owned();
    resp.send("RES", "calc", &[("rid", &rid)], "");
    let r = call.join().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("MM-reqid"), Some("mine-1"));
    assert_eq!(r.text(), "");
}

#[test]
fn req_over_a_socket_is_200() {
    let srv = TestServer::start();
    let mut resp = responder(srv.addr, "echo");
    let addr = srv.addr;
    let call = std::thread::spawn(move || post(addr, "/api/req/echo", &[], b"ping"));
    let req = resp.recv();
    let rid = req.header("rid").unwrap().to_owned();
    resp.send("RES", "echo", &[("rid", &rid)], "pong");
    let r = call.join().unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "pong"));
    assert_eq!(r.header("MM-ReqID"), req.header("ReqID"));
    // The call's session ended with the answer: the responder is the only service.
    assert_eq!(
        metrics(srv.addr)["middleman_connections{role=\"service\"}"],
        1.0
    );
}

#[test]
#[ignore = "needs curl: run .ci/install-tools.sh"]
fn curl_req_without_responder_is_503() {
    let srv = TestServer::start();
    let r = curl_post(srv.addr, "/api/req/nobody", &[], b"x");
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.text(), "no responder: REQ nobody\n");
}

#[test]
fn req_whose_responder_leaves_is_503() {
    let srv = TestServer::start();
    let resp = responder(srv.addr, "gone");
    let addr = srv.addr;
    let call = std::thread::spawn(move || post(addr, "/api/req/gone", &[], b"x"));
    let mut resp = resp;
    let _req = resp.recv();
    drop(resp);
    let r = call.join().unwrap();
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.text(), "responder disconnected: REQ gone\n");
}

#[test]
#[ignore = "needs curl: run .ci/install-tools.sh"]
fn curl_req_timeout_is_504_and_a_late_res_is_dropped() {
    let srv = TestServer::start();
    let mut resp = responder(srv.addr, "slow");
    let addr = srv.addr;
    let t = Instant::now();
    let call = std::thread::spawn(move || curl_post(addr, "/api/req/slow?timeout=1", &[], b"x"));
    let req = resp.recv();
    let r = call.join().unwrap();
    let took = t.elapsed();
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(r.text(), "request timed out\n");
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_secs(2),
        "{took:?}"
    );
    // The session is gone: the late RES is dropped silently (no error to the
    // responder, whose next message is the answer to its sync).
    let rid = req.header("rid").unwrap().to_owned();
    resp.send("RES", "slow", &[("rid", &rid)], "late");
    resp.sync();
}

#[test]
fn req_ended_by_the_broker_request_timeout_is_504() {
    let srv = TestServer::with(|cfg| cfg.request_timeout = Duration::from_millis(300));
    let mut resp = responder(srv.addr, "slow");
    let addr = srv.addr;
    let call = std::thread::spawn(move || post(addr, "/api/req/slow", &[], b"x"));
    let _req = resp.recv();
    let r = call.join().unwrap();
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(r.text(), "request timed out: REQ slow\n");
}

#[test]
fn a_waiting_req_is_answered_503_at_shutdown() {
    let srv = TestServer::start();
    let mut resp = responder(srv.addr, "slow");
    let addr = srv.addr;
    let call = std::thread::spawn(move || post(addr, "/api/req/slow", &[], b"x"));
    let _req = resp.recv();
    srv.stop().expect("clean shutdown");
    let r = call.join().unwrap();
    assert_eq!(
        (r.status, r.text().as_str()),
        (503, "server shutting down\n")
    );
}

// ---------------------------------------------------------------- cmd

#[test]
#[ignore = "needs curl: run .ci/install-tools.sh"]
fn curl_cmd_applies_in_order_and_answers_the_one_error() {
    let srv = TestServer::start();
    let mut sub = subscriber(srv.addr, "room");
    let body = format!(
        "INT UID\r\nforcid: {}\r\nsetuid: alice\r\n\r\n.\r\n\
         ESUB room\r\nReqID: e1\r\n\r\n.\r\n\
         PUB room\r\nA: 1\r\n\r\nhello\r\n.\r\n",
        sub.cid
    );
    let r = curl_post(srv.addr, "/api/cmd", &[], body.as_bytes());
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.header("Content-Type").unwrap().starts_with("text/plain"));
    assert_eq!(
        r.text(),
        "PUB ERROR\r\ncmd: ESUB\r\ntarget: room\r\nreason: not permitted over HTTP\r\n\
         ReqID: e1\r\n\r\nnot permitted over HTTP: ESUB room\r\n.\r\n"
    );
    // The PUB was delivered; the INT UID took effect.
    let m = sub.recv();
    assert_eq!((m.target.as_str(), m.body.as_str()), ("room", "hello"));
    assert_eq!(m.header("A"), Some("1"));
    let mine = format!("MSG:{}", sub.cid);
    sub.send("PUB", &mine, &[], "me");
    assert_eq!(sub.recv().header("uid"), Some("alice"));
    // The ESUB was not applied: a client still may not subscribe.
    let mut cl = Peer::client(srv.addr);
    cl.send("SUB", "room", &[], "");
    let e = cl.recv();
    assert_eq!(e.header("reason"), Some("not permitted"));
    // No error: 204.
    let r = curl_post(srv.addr, "/api/cmd", &[], b"PUB room\r\n\r\nagain\r\n.");
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(sub.recv().body, "again");
}

#[test]
fn cmd_over_a_socket_every_error_in_order_or_400_for_bad_framing() {
    let srv = TestServer::start();
    let mut sub = subscriber(srv.addr, "room");
    let r = post(
        srv.addr,
        "/api/cmd",
        &[],
        b"EPUB a\n\n.\nFOO b\n\n.\nPUB room\n\nx\n.\nEREQ c\n\n.\n",
    );
    assert_eq!(r.status, 200, "{r:?}");
    let text = r.text();
    let reasons: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("reason: "))
        .map(str::trim_end)
        .collect();
    assert_eq!(
        reasons,
        [
            "not permitted over HTTP",
            "unknown command",
            "not permitted over HTTP"
        ]
    );
    assert_eq!(sub.recv().body, "x");
    // A framing violation anywhere: 400, nothing applied.
    for bad in [&b"PUB room\n\ny\n.\nPUBroom\n\n.\n"[..], b"PUB room\n\nz\n"] {
        let r = post(srv.addr, "/api/cmd", &[], bad);
        assert_eq!(r.status, 400, "{r:?}");
    }
    expect_nothing_but_marker(srv.addr, &mut sub, "room");
}

// ---------------------------------------------------------------- refusals

#[test]
fn no_key_or_a_wrong_key_is_401_a_client_key_403_nothing_processed() {
    let srv = TestServer::start();
    let mut sub = subscriber(srv.addr, "t");
    let m0 = metrics(srv.addr);
    let len = [("Content-Length", "1")];
    let r = post_raw(srv.addr, "/api/pub/t", &len, b"x");
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.header("WWW-Authenticate"), Some("Bearer"));
    for auth in ["Bearer wrong", "Basic abc", "Bearer", SERVICE_KEY] {
        let r = post_raw(
            srv.addr,
            "/api/pub/t",
            &[("Authorization", auth), ("Content-Length", "1")],
            b"x",
        );
        assert_eq!(r.status, 401, "{auth}: {r:?}");
    }
    let client = format!("Bearer {CLIENT_KEY}");
    for path in ["/api/pub/t", "/api/req/t", "/api/cmd"] {
        let r = post_raw(
            srv.addr,
            path,
            &[("Authorization", &client), ("Content-Length", "1")],
            b"x",
        );
        assert_eq!(r.status, 403, "{r:?}");
    }
    // A monitor key is a service's (§1 words) and may publish.
    let monitor = format!("Bearer {MONITOR_KEY}");
    let r = post_raw(
        srv.addr,
        "/api/pub/t",
        &[("authorization", &monitor), ("Content-Length", "2")],
        b"ok",
    );
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(sub.recv().body, "ok");
    expect_nothing_but_marker(srv.addr, &mut sub, "t");
    let m1 = metrics(srv.addr);
    let http = "middleman_http_requests_total";
    // 5 refused with 401, 3 with 403, 1 published, and the first /metrics.
    assert_eq!(m1[http] - m0[http], 10.0);
}

#[test]
fn a_body_over_the_message_limit_is_413_without_being_read() {
    let srv = TestServer::with(|cfg| cfg.limits.max_message = 1000);
    let mut sub = subscriber(srv.addr, "t");
    // Only the head is sent: the answer comes at once, the body is never waited for.
    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let head = format!(
        "POST /api/pub/t HTTP/1.1\r\nAuthorization: Bearer {SERVICE_KEY}\r\n\
         Content-Length: 1001\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let r = parse_reply(&out);
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(r.text(), "body over the message limit\n");
    // At the limit: accepted.
    let r = post(srv.addr, "/api/pub/t", &[], &[b'a'; 1000]);
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(sub.recv().body.len(), 1000);
    expect_nothing_but_marker(srv.addr, &mut sub, "t");
}

#[test]
#[ignore = "needs curl: run .ci/install-tools.sh"]
fn curl_oversize_body_is_413_and_nothing_is_delivered() {
    let srv = TestServer::with(|cfg| cfg.limits.max_message = 1000);
    let mut sub = subscriber(srv.addr, "t");
    let r = curl_post(srv.addr, "/api/pub/t", &[], &[b'a'; 5000]);
    assert_eq!(r.status, 413, "{r:?}");
    expect_nothing_but_marker(srv.addr, &mut sub, "t");
}

#[test]
fn no_content_length_is_411() {
    let srv = TestServer::start();
    let mut sub = subscriber(srv.addr, "t");
    let auth = format!("Bearer {SERVICE_KEY}");
    let r = post_raw(srv.addr, "/api/pub/t", &[("Authorization", &auth)], b"");
    assert_eq!(r.status, 411, "{r:?}");
    let r = post_raw(
        srv.addr,
        "/api/pub/t",
        &[("Authorization", &auth), ("Transfer-Encoding", "chunked")],
        b"1\r\nx\r\n0\r\n\r\n",
    );
    assert_eq!(r.status, 411, "{r:?}");
    expect_nothing_but_marker(srv.addr, &mut sub, "t");
}

#[test]
#[ignore = "needs curl: run .ci/install-tools.sh"]
fn curl_chunked_is_411_and_expect_100_continue_does_not_stall() {
    let srv = TestServer::start();
    let r = curl_post(
        srv.addr,
        "/api/pub/t",
        &["-H", "Transfer-Encoding: chunked"],
        b"x",
    );
    assert_eq!(r.status, 411, "{r:?}");
    // curl waits up to 1 s for `100 Continue` before sending the body anyway.
    let t = Instant::now();
    let r = curl_post(
        srv.addr,
        "/api/pub/t",
        &["-H", "Expect: 100-continue"],
        b"xyz",
    );
    assert_eq!(r.status, 204, "{r:?}");
    assert!(
        t.elapsed() < Duration::from_millis(800),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn a_stalled_body_is_closed_by_the_handshake_timeout() {
    let srv = TestServer::with(|cfg| cfg.handshake_timeout = Duration::from_millis(300));
    let mut sub = subscriber(srv.addr, "t");
    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let head = format!(
        "POST /api/pub/t HTTP/1.1\r\nAuthorization: Bearer {SERVICE_KEY}\r\n\
         Content-Length: 10\r\nExpect: 100-continue\r\n\r\nabc"
    );
    let t = Instant::now();
    s.write_all(head.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&out),
        "HTTP/1.1 100 Continue\r\n\r\n"
    );
    expect_nothing_but_marker(srv.addr, &mut sub, "t");
    assert_eq!(
        metrics(srv.addr)["middleman_connections_closed_total{reason=\"timeout\"}"],
        1.0
    );
}

#[test]
fn a_listener_without_the_service_role_or_the_api_page_answers_404() {
    let srv = TestServer::with(|cfg| {
        cfg.listeners = vec![
            Listen::ws("127.0.0.1:0".parse().unwrap()),
            "ws://127.0.0.1:0?roles=client".parse().unwrap(),
            "ws://127.0.0.1:0?pages=healthz,metrics".parse().unwrap(),
            "ws://127.0.0.1:0?roles=service&pages=api".parse().unwrap(),
        ]
    });
    let addr = |i: usize| match srv.listeners()[i].endpoint {
        Endpoint::Tcp(a) => a,
        Endpoint::Unix(_) => unreachable!(),
    };
    for i in [1, 2] {
        let r = post(addr(i), "/api/pub/t", &[], b"x");
        assert_eq!(r.status, 404, "listener {i}: {r:?}");
        assert_eq!(r.text(), "not found\n");
    }
    assert_eq!(post(addr(3), "/api/pub/t", &[], b"x").status, 204);
    // Unknown API paths and other methods.
    assert_eq!(post(addr(0), "/api/sub/t", &[], b"x").status, 404);
    assert_eq!(post(addr(0), "/api", &[], b"x").status, 404);
    let r = parse_reply(http_get(addr(0), "GET /api/cmd HTTP/1.1\r\n\r\n").as_bytes());
    assert_eq!((r.status, r.header("Allow")), (405, Some("POST")));
    // A target that is not one (§2): 400.
    for bad in [
        "/api/pub/",
        "/api/pub/a%0db",
        "/api/req/%zz",
        "/api/pub/%20x",
    ] {
        let r = post(addr(0), bad, &[], b"x");
        assert_eq!(r.status, 400, "{bad}: {r:?}");
    }
}

/// §9: `SYS:` targets are reserved, over HTTP too (403 with the error); an HTTP API sender
/// is a connection of its own but announces no SYS:CONNECT/SYS:DISCONNECT, and its
/// `cmd` may use version 1.1 commands (`INT SUB` here).
#[test]
fn pub_to_sys_is_403_api_senders_make_no_events_and_cmd_takes_int_sub() {
    let srv = TestServer::start();
    let mut watch = Peer::service(srv.addr);
    for t in ["SYS:CONNECT", "SYS:DISCONNECT", "SYS:SUB"] {
        watch.send("SUB", t, &[], "");
    }
    watch.sync();
    let r = post(srv.addr, "/api/pub/SYS:CONNECT", &[], b"x");
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.text().contains("not permitted"), "{r:?}");
    let mut member = Peer::client(srv.addr);
    let ev = watch.recv();
    assert_eq!(ev.target, "SYS:CONNECT");
    assert_eq!(ev.header("cid"), Some(member.cid.as_str()));
    let cmd = format!(
        "INT SUB\r\nforcid: {}\r\ntopic: room\r\n\r\n\r\n.\r\n",
        member.cid
    );
    let r = post(srv.addr, "/api/cmd", &[], cmd.as_bytes());
    assert_eq!(r.status, 204, "{r:?}");
    // The only events: the member's SYS:SUB (none for the two HTTP senders).
    let ev = watch.recv();
    assert_eq!(ev.target, "SYS:SUB", "{ev:?}");
    assert_eq!(ev.header("cid"), Some(member.cid.as_str()));
    assert_eq!(ev.header("topic"), Some("room"));
    watch.sync();
    post(srv.addr, "/api/pub/room", &[], b"hi");
    assert_eq!(member.recv().body, "hi");
    watch.sync();
}
