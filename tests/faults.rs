//! Faults: peers that vanish at every stage, resets, EPIPE, EMFILE. After each, the
//! server's own gauges (/metrics) must return to exactly what the live peers hold: no
//! leaked slab entry, subscription, pending request or topic.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

fn open_connections(m: &HashMap<String, f64>) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with("middleman_connections{"))
        .map(|(_, v)| v)
        .sum()
}

/// Wait until the gauges settle at the expected values (closes are asynchronous).
/// `conns` counts live peers; the /metrics request itself is one more connection.
fn settle(addr: SocketAddr, conns: f64, subs: f64, pending: f64, topics: f64) {
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let m = metrics(addr);
        let got = (
            open_connections(&m),
            m["middleman_subscriptions"],
            m["middleman_pending_requests"],
            m["middleman_topics"],
        );
        if got == (conns + 1.0, subs, pending, topics) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "gauges (connections incl. this request, subscriptions, pending, topics) = {got:?}, \
             expected {:?}",
            (conns + 1.0, subs, pending, topics)
        );
        std::thread::sleep(Duration::from_millis(50)); // bounded poll of the server's view
    }
}

/// Close with RST instead of FIN (SO_LINGER 0).
fn reset(sock: TcpStream) {
    set_linger_reset(&sock);
    drop(sock);
}

#[test]
fn peers_vanishing_at_every_stage_leak_nothing() {
    let srv = TestServer::with(|c| c.handshake_timeout = Duration::from_secs(30));
    let mut observer = Peer::service(srv.addr);
    observer.send("SUB", "keep", &[], "");
    observer.sync();
    // Baseline: observer holds MSG:<cid> and "keep" (2 subscriptions, 2 topics).
    settle(srv.addr, 1.0, 2.0, 0.0, 2.0);

    // Mid-handshake: half an HTTP request, then FIN; and another with RST.
    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nUpgrade: webs").unwrap();
    drop(s);
    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nUpg").unwrap();
    reset(s);
    // Upgraded, key never sent.
    let ws = ws_connect(srv.addr);
    drop(ws);
    // Authenticated, subscribed, then gone mid-frame (header promises 100 bytes).
    let mut p = Peer::client(srv.addr);
    observer.send("ESUB", "room", &[], "");
    observer.sync();
    p.send("SUB", "room", &[], "");
    p.sync();
    p.ws.get_mut()
        .write_all(&[0x81, 0x80 | 100, 1, 2, 3, 4, b'a', b'b'])
        .unwrap();
    reset(p.ws.into_inner());
    // Mid-message: first line and a header, no terminator.
    let mut p = Peer::service(srv.addr);
    p.send("SUB", "room", &[], "");
    p.sync();
    p.send_raw("PUB room\r\nA: 1\r\n");
    drop(p);
    settle(srv.addr, 1.0, 2.0, 0.0, 3.0); // "room" stays: observer's ESUB

    // Requests in flight: the requester vanishes, then the responder answers (dropped).
    let mut responder = Peer::service(srv.addr);
    responder.send("EREQ", "work", &[], "");
    responder.sync();
    let mut requester = Peer::service(srv.addr);
    requester.send("REQ", "work", &[("ReqID", "1")], "x");
    let req = responder.recv();
    reset(requester.ws.into_inner());
    settle(srv.addr, 2.0, 3.0, 0.0, 5.0); // + responder's MSG:<cid> and "work"
    responder.send(
        "RES",
        "work",
        &[("rid", req.header("rid").unwrap())],
        "late",
    );
    responder.sync();
    // The responder vanishes with a request in flight: the requester is told.
    let mut requester = Peer::service(srv.addr);
    requester.send("REQ", "work", &[("ReqID", "2")], "y");
    let _ = responder.recv();
    reset(responder.ws.into_inner());
    let e = requester.recv();
    assert_eq!(e.header("reason"), Some("responder disconnected"));
    assert_eq!(e.header("ReqID"), Some("2"));
    drop(requester);
    settle(srv.addr, 1.0, 2.0, 0.0, 3.0);

    // While being written to: a subscriber resets with a firehose aimed at it (EPIPE /
    // ECONNRESET on the server's writes).
    let mut sub = Peer::service(srv.addr);
    sub.send("SUB", "hose", &[], "");
    sub.sync();
    let body = "z".repeat(4000);
    for _ in 0..200 {
        observer.send("PUB", "hose", &[], &body);
    }
    reset(sub.ws.into_inner());
    for _ in 0..200 {
        observer.send("PUB", "hose", &[], &body);
    }
    observer.sync();
    settle(srv.addr, 1.0, 2.0, 0.0, 3.0);
}

/// EMFILE: with the open-file limit nearly used up, accepts fail; the server backs off,
/// keeps serving its connections, and accepts again once descriptors are free.
#[test]
fn accept_errors_back_off_and_serving_continues() {
    let p = common::proc::Proc::server();
    let addr = p.addr();
    let pid = p.child.id() as i32;
    // Lower the server's soft limit to what it has open now plus 3.
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit on our own child process with valid structs.
    let rc = unsafe {
        libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut lim);
        lim.rlim_cur = open + 3;
        libc::prlimit(pid, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut())
    };
    assert_eq!(rc, 0, "prlimit");
    let mut a = Peer::service(addr);
    a.send("SUB", "t", &[], "");
    a.sync();
    // These exhaust the descriptors; some are accepted, later ones fail with EMFILE
    // (they sit in the backlog, unanswered).
    let extra: Vec<TcpStream> = (0..6).map(|_| TcpStream::connect(addr).unwrap()).collect();
    p.wait_line("accept failed");
    // Still serving the existing connection.
    a.send("PUB", "t", &[], "alive");
    assert_eq!(a.recv().body, "alive");
    drop(extra);
    // Descriptors come back; a new connection is served.
    let mut b = Peer::service(addr);
    b.sync();
}
