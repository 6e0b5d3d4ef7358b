//! Issue 10, item 4: requests in flight are bounded per connection, a ReqID is bounded in
//! length, and a disconnect costs only the requests of that connection.
//!
//! - the disconnect cost, timed on the broker itself (no sockets, so the number is the
//!   routing core's and not the machine's scheduling);
//! - the caps over real sockets against the in-process server;
//! - the server's memory (the real binary's VmRSS) while a client tries to hold a million
//!   requests in flight.

mod common;
use common::proc::{rss_kib, Proc};
use common::*;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use middleman::broker::{reason, Broker, Role, Settings};
use middleman::protocol::{Decoded, Decoder, Limits, Packet};
use middleman::router::ConnId;

// ------------------------------------------------------------------ broker level, timed

/// Apply every message in `bytes` from `from`.
fn apply(
    b: &mut Broker,
    from: ConnId,
    bytes: &[u8],
    now: Instant,
    out: &mut Vec<(ConnId, Rc<Packet>)>,
) {
    let mut d = Decoder::new(Limits::default());
    d.feed(bytes);
    while let Ok(Some(Decoded::Message(m))) = d.next() {
        b.apply(from, &m, now, out);
    }
    assert!(!d.needs_more());
}

/// The acceptance number of issue 10: with 100k requests pending, 1,000 disconnects of
/// other connections (each party to a request of its own, which is what made the old
/// `remove_conn` scan the whole table) cost under 100 ms in all.
#[test]
fn thousand_disconnects_with_100k_pending_cost_under_100ms() {
    let mut b = Broker::new(Settings::default(), "hr");
    let now = Instant::now();
    let mut out = Vec::new();
    let responder: ConnId = 0;
    b.connect(responder, Role::Service);
    apply(&mut b, responder, b"EREQ q\r\n.\r\n", now, &mut out);
    // 100 requesters, each at the default cap of 1,000: 100k pending.
    let mut batch = Vec::new();
    for i in 0..1000 {
        batch.extend_from_slice(format!("REQ q\r\nReqID: {i}\r\n\r\n.\r\n").as_bytes());
    }
    for c in 1..=100 {
        b.connect(c, Role::Client);
        apply(&mut b, c, &batch, now, &mut out);
    }
    assert_eq!(b.router().pending_count(), 100_000);
    assert_eq!(b.stats.req_too_many, 0);
    // 1,000 others: half with a request of their own in flight, half answering one.
    let others: Vec<ConnId> = (1000..2000).collect();
    for &c in &others {
        b.connect(c, Role::Service);
    }
    for pair in others.chunks(2) {
        let (asker, answerer) = (pair[0], pair[1]);
        let target = format!("own-{answerer}");
        apply(
            &mut b,
            answerer,
            format!("EREQ {target}\r\n.\r\n").as_bytes(),
            now,
            &mut out,
        );
        let req = format!("REQ {target}\r\nReqID: x\r\n\r\n.\r\n");
        apply(&mut b, asker, req.as_bytes(), now, &mut out);
    }
    assert_eq!(b.router().pending_count(), 100_500);
    b.router().check_invariants().unwrap();
    out.clear();
    // Half the pairs leave asker first (its request ends silently), half answerer first
    // (its request fails to the asker, still connected).
    let order: Vec<ConnId> = others
        .chunks(2)
        .enumerate()
        .flat_map(|(k, p)| {
            if k % 2 == 0 {
                [p[0], p[1]]
            } else {
                [p[1], p[0]]
            }
        })
        .collect();
    let t = Instant::now();
    for &c in &order {
        b.disconnect(c, &mut out);
    }
    let took = t.elapsed();
    println!(
        "1,000 disconnects with 100k pending: {:.3} ms in all ({:.1} us each)",
        took.as_secs_f64() * 1e3,
        took.as_secs_f64() * 1e6 / 1000.0
    );
    // Exactly their 500 requests ended, 250 with an error to a connection of theirs;
    // nothing else changed.
    assert_eq!(b.router().pending_count(), 100_000);
    assert_eq!(out.len(), 250);
    assert!(out.iter().all(|(to, _)| (1000..2000).contains(to)));
    assert_eq!(b.stats.req_responder_gone, 250);
    b.router().check_invariants().unwrap();
    assert!(
        took < Duration::from_millis(100),
        "1,000 disconnects took {took:?}"
    );
    // And the responder of the 100k leaving fails them all, each exactly once.
    b.disconnect(responder, &mut out);
    assert_eq!(out.len(), 250 + 100_000);
    assert_eq!(b.router().pending_count(), 0);
    assert_eq!(b.stats.req_responder_gone, 250 + 100_000);
}

// ------------------------------------------------------------------ real sockets

/// `m` is the §7 error for `REQ slow` with `why`, carrying exactly `reqid` (or none).
fn assert_req_error(m: &Msg, why: &str, reqid: Option<&str>) {
    assert_eq!(
        (m.cmd.as_str(), m.target.as_str()),
        ("PUB", "ERROR"),
        "{m:?}"
    );
    assert_eq!(m.header("cmd"), Some("REQ"), "{m:?}");
    assert_eq!(m.header("target"), Some("slow"), "{m:?}");
    assert_eq!(m.header("reason"), Some(why), "{m:?}");
    let got: Vec<&str> = m.headers_named("ReqID").iter().map(|(_, v)| *v).collect();
    assert_eq!(got, reqid.into_iter().collect::<Vec<_>>(), "{m:?}");
    assert_eq!(m.body, format!("{why}: REQ slow"));
}

/// A responder that never answers; a client sends 1,200 REQs: exactly 1,000 reach the
/// responder, exactly 200 come back `too many requests in flight` with their ReqIDs; a
/// ReqID of 257 bytes gets `ReqID too long` (256 passes); when the responder leaves, the
/// 1,000 (and the one of 256 bytes) get `responder disconnected`.
#[test]
fn pending_cap_and_reqid_limit_over_real_sockets() {
    let srv = TestServer::start(); // defaults: 1,000 in flight, ReqID 256 bytes
    let mut responder = Peer::service(srv.addr);
    responder.send("EREQ", "slow", &[], "");
    responder.sync();
    let mut c = Peer::client(srv.addr);
    // 12 WebSocket messages of 100 REQs each.
    for batch in 0..12 {
        let mut raw = String::new();
        for i in batch * 100..(batch + 1) * 100 {
            raw.push_str(&wire("REQ", "slow", &[("ReqID", &format!("r{i}"))], "q"));
        }
        c.send_raw(&raw);
    }
    for i in 1000..1200 {
        assert_req_error(&c.recv(), reason::TOO_MANY_REQUESTS, Some(&format!("r{i}")));
    }
    c.sync(); // nothing else came
    for i in 0..1000 {
        let m = responder.recv();
        assert_eq!(
            (m.cmd.as_str(), m.target.as_str()),
            ("REQ", "slow"),
            "{m:?}"
        );
        assert_eq!(m.header("ReqID"), Some(format!("r{i}").as_str()));
        assert_eq!(m.header("cid"), Some(c.cid.as_str()));
    }
    responder.sync(); // exactly 1,000
                      // The ReqID bound: 256 bytes pass, 257 are refused without echo.
    let mut c2 = Peer::client(srv.addr);
    let ok = "k".repeat(256);
    c2.send("REQ", "slow", &[("ReqID", &ok)], "");
    let m = responder.recv();
    assert_eq!(m.header("ReqID"), Some(ok.as_str()));
    let long = "L".repeat(257);
    c2.send("REQ", "slow", &[("ReqID", &long)], "");
    assert_req_error(&c2.recv(), reason::REQID_TOO_LONG, None);
    c2.sync();
    responder.sync();
    let m = metrics(srv.addr);
    assert_eq!(m["middleman_pending_requests"], 1001.0);
    // The responder leaves: every request in flight fails once, oldest first.
    drop(responder);
    for i in 0..1000 {
        assert_req_error(&c.recv(), reason::RESPONDER_GONE, Some(&format!("r{i}")));
    }
    c.sync();
    assert_req_error(&c2.recv(), reason::RESPONDER_GONE, Some(&ok));
    c2.sync();
    let m = metrics(srv.addr);
    let err = |r: &str| m[&format!("middleman_errors_total{{reason=\"{r}\"}}")];
    assert_eq!(err(reason::TOO_MANY_REQUESTS), 200.0);
    assert_eq!(err(reason::REQID_TOO_LONG), 1.0);
    assert_eq!(err(reason::RESPONDER_GONE), 1001.0);
    let outcome = |o: &str| m[&format!("middleman_requests_total{{outcome=\"{o}\"}}")];
    assert_eq!(outcome("too_many_in_flight"), 200.0);
    assert_eq!(outcome("responder_gone"), 1001.0);
    assert_eq!(m["middleman_pending_requests"], 0.0);
    // After all that the client is at zero in flight and may ask again.
    let mut again = Peer::service(srv.addr);
    again.send("EREQ", "slow", &[], "");
    again.sync();
    c.send("REQ", "slow", &[("ReqID", "fresh")], "");
    assert_eq!(again.recv().header("ReqID"), Some("fresh"));
}

// ------------------------------------------------------------------ the binary's memory

/// Both bound addresses of a server started with a ws and a tcp listener.
fn ws_and_tcp(p: &Proc) -> (SocketAddr, SocketAddr) {
    let l = p.wait_line("listening on ws://");
    let field = |scheme: &str| -> SocketAddr {
        let rest = &l[l.find(scheme).unwrap() + scheme.len()..];
        rest.split_whitespace().next().unwrap().parse().unwrap()
    };
    (field("ws://"), field("tcp://"))
}

/// Send `bytes` then an unknown command, and read up to its error: everything sent
/// before it was processed.
fn round_trip(s: &mut TcpStream, rx: &mut BufReader<TcpStream>, bytes: &[u8]) {
    s.write_all(bytes).unwrap();
    s.write_all(b"HELLO x\r\n.\r\n").unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n.\r\n") {
        let mut byte = [0u8; 1];
        rx.read_exact(&mut byte).unwrap();
        got.push(byte[0]);
    }
    assert!(got.starts_with(b"PUB ERROR\r\ncmd: HELLO\r\n"), "{got:?}");
}

/// A raw-stream (tcp://) peer after its key was accepted.
fn raw_peer(addr: SocketAddr, key: &str) -> (TcpStream, BufReader<TcpStream>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(format!("{key}\r\n").as_bytes()).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "MM OK\r\n");
    line.clear();
    r.read_line(&mut line).unwrap();
    assert!(line.ends_with("\r\n") && line.len() > 2, "cid {line:?}");
    (s, r)
}

/// The acceptance number of issue 10 for item 4: a client trying to hold 1M requests in
/// flight (sending as fast as the server takes them, reading its errors on a second
/// thread so it is no slow consumer) grows the server's RSS by under 64 MiB. Bounded to
/// 1M requests or 20 s of sending, whichever comes first.
#[test]
fn a_client_trying_to_hold_a_million_requests_grows_rss_under_64mib() {
    const TARGET: usize = 1_000_000;
    const SEND_FOR: Duration = Duration::from_secs(20);
    const BATCH: usize = 500;
    const WINDOW: usize = 10_000;
    let p = Proc::start(
        &[
            "--listen",
            "ws://127.0.0.1:0",
            "--listen",
            "tcp://127.0.0.1:0",
            "--service-key",
            SERVICE_KEY,
            "--client-key",
            CLIENT_KEY,
        ],
        &[],
    );
    let (ws_addr, tcp_addr) = ws_and_tcp(&p);
    let pid = p.child.id();
    // The responder takes requests and never answers (nor reads: 1,000 small REQs fit
    // in its socket buffers and outbound queue).
    let (mut responder, mut responder_rx) = raw_peer(tcp_addr, SERVICE_KEY);
    round_trip(&mut responder, &mut responder_rx, b"EREQ slow\r\n.\r\n");
    let (mut client, mut rx) = raw_peer(tcp_addr, CLIENT_KEY);
    round_trip(&mut client, &mut rx, b"");
    let baseline = rss_kib(pid, "VmRSS:");

    // Reader: counts the errors until the closing sync (another unknown command).
    let refused = Arc::new(AtomicUsize::new(0));
    let counted = refused.clone();
    let reader = std::thread::spawn(move || {
        let mut d = Decoder::new(Limits::default());
        let mut buf = vec![0u8; 256 << 10];
        let mut too_many = 0usize;
        let mut other = Vec::new();
        loop {
            let n = match rx.read(&mut buf) {
                Ok(0) => panic!("server hung up after {too_many} errors; then {other:?}"),
                Ok(n) => n,
                Err(e) => panic!("read: {e} after {too_many} errors"),
            };
            d.feed(&buf[..n]);
            while let Ok(Some(out)) = d.next() {
                let Decoded::Message(m) = out else {
                    panic!("malformed from the server")
                };
                match m.header("reason").map(|(_, v)| v) {
                    Some(r) if r == reason::TOO_MANY_REQUESTS.as_bytes() => {
                        too_many += 1;
                        counted.store(too_many, Ordering::Relaxed);
                    }
                    _ if m.header("cmd").map(|(_, v)| v) == Some(b"SYNC") => {
                        return (too_many, other)
                    }
                    _ => other.push(String::from_utf8_lossy(&m.body).into_owned()),
                }
            }
        }
    });
    let mut batch = Vec::new();
    for i in 0..BATCH {
        batch.extend_from_slice(format!("REQ slow\r\nReqID: {i:07}\r\n\r\n.\r\n").as_bytes());
    }
    let started = Instant::now();
    let mut sent = 0usize;
    while sent < TARGET && started.elapsed() < SEND_FOR {
        // A client that reads what it is sent: at most WINDOW answers outstanding, so it
        // is never a slow consumer (that rule is another item's; here the point is the
        // table of requests in flight).
        while sent.saturating_sub(1000 + refused.load(Ordering::Relaxed)) > WINDOW {
            if started.elapsed() > SEND_FOR + WAIT {
                panic!(
                    "no answers: {sent} sent, {} refused",
                    refused.load(Ordering::Relaxed)
                );
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        client.write_all(&batch).unwrap();
        sent += BATCH;
    }
    let send_time = started.elapsed();
    client.write_all(b"SYNC x\r\n.\r\n").unwrap();
    let (too_many, other) = reader.join().unwrap();
    let peak = rss_kib(pid, "VmHWM:");
    let now_rss = rss_kib(pid, "VmRSS:");
    let m = metrics(ws_addr);
    println!(
        "sent {sent} REQs in {:.1} s; {too_many} refused; server RSS baseline {baseline} KiB, \
         peak {peak} KiB (growth {} KiB), now {now_rss} KiB",
        send_time.as_secs_f64(),
        peak.saturating_sub(baseline)
    );
    assert!(sent >= 100_000, "only {sent} requests sent in {SEND_FOR:?}");
    assert!(
        other.is_empty(),
        "unexpected messages: {:?}",
        &other[..other.len().min(5)]
    );
    assert_eq!(too_many, sent - 1000, "all but the first 1,000 refused");
    assert_eq!(m["middleman_pending_requests"], 1000.0);
    assert_eq!(
        m["middleman_requests_total{outcome=\"too_many_in_flight\"}"],
        (sent - 1000) as f64
    );
    let growth_mib = peak.saturating_sub(baseline) / 1024;
    assert!(
        growth_mib < 64,
        "server RSS grew {growth_mib} MiB for {sent} requests"
    );
    drop(responder);
}
