//! Resource limits over real sockets: connection cap, subscription cap, idle timeout and
//! pings, outbound cap per connection.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn connection_cap_refuses_new_connections_with_503_and_keeps_existing_ones() {
    let srv = TestServer::with(|c| c.max_connections = 3);
    let mut a = Peer::service(srv.addr);
    let mut b = Peer::service(srv.addr);
    let mut c = Peer::service(srv.addr);
    // The fourth is answered 503 before any upgrade.
    let resp = http_get(
        srv.addr,
        "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert!(resp.starts_with("HTTP/1.1 503 "), "{resp}");
    // Existing ones are unaffected.
    b.send("SUB", "t", &[], "");
    b.sync();
    a.send("PUB", "t", &[], "still here");
    assert_eq!(b.recv().body, "still here");
    c.sync();
    // Health checks are answered all the same (they never become connections).
    let h = http_get(srv.addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    // Once one leaves, a new one gets in.
    drop(a);
    let deadline = Instant::now() + WAIT;
    loop {
        let mut s = TcpStream::connect(srv.addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        use std::io::Write;
        s.write_all(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && s.read(&mut b).unwrap_or(0) == 1 {
            head.push(b[0]);
        }
        let resp = String::from_utf8_lossy(&head);
        if resp.starts_with("HTTP/1.1 101") {
            break;
        }
        assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
        assert!(Instant::now() < deadline, "slot never freed");
        std::thread::sleep(Duration::from_millis(20)); // polling the server's view, bounded
    }
}

#[test]
fn subscription_cap_gives_an_error_and_keeps_the_connection() {
    let srv = TestServer::with(|c| c.max_subscriptions = 3);
    let mut s = Peer::service(srv.addr);
    for t in ["a", "b", "c"] {
        s.send("SUB", t, &[], "");
    }
    s.send("SUB", "d", &[], "");
    let e = s.recv();
    assert_eq!((e.cmd.as_str(), e.target.as_str()), ("PUB", "ERROR"));
    assert_eq!(e.header("reason"), Some("too many subscriptions"));
    assert_eq!(e.header("target"), Some("d"));
    // Re-subscribing an existing topic is idempotent, not an error; UNS frees a slot.
    s.send("SUB", "a", &[], "");
    s.send("UNS", "b", &[], "");
    s.send("SUB", "d", &[], "");
    s.send("PUB", "d", &[], "ok");
    let m = s.recv();
    assert_eq!((m.target.as_str(), m.body.as_str()), ("d", "ok"));
}

#[test]
fn silent_connection_is_closed_after_the_idle_timeout_and_a_live_one_is_pinged() {
    let srv = TestServer::with(|c| {
        c.ping_interval = Duration::from_millis(200);
        c.idle_timeout = Duration::from_millis(900);
    });
    let mut silent = Peer::client(srv.addr);
    let mut live = Peer::client(srv.addr);
    // `live` reads (and so answers pings with pongs); `silent` does not read at all.
    let start = Instant::now();
    let mut pings = 0;
    live.ws
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    while start.elapsed() < Duration::from_millis(1500) {
        match live.ws.read() {
            Ok(tungstenite::Message::Ping(_)) => pings += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("live connection failed: {e}"),
        }
        let _ = live.ws.flush();
    }
    assert!(pings >= 2, "live connection saw {pings} pings");
    live.ws.get_mut().set_read_timeout(Some(WAIT)).unwrap();
    live.sync();
    let (code, reason) = silent.recv_close();
    assert_eq!(code, 1001);
    assert_eq!(reason, "idle timeout");
}

/// §7 shutdown: what is queued when the stop comes is flushed (within the grace period)
/// before close 1001, and run() returns Ok.
#[test]
fn shutdown_flushes_queued_messages_then_closes_1001() {
    let srv = TestServer::with(|c| c.shutdown_grace = Duration::from_secs(5));
    let mut publisher = Peer::service(srv.addr);
    let mut reader = Peer::service(srv.addr);
    reader.send("SUB", "t", &[], "");
    reader.sync();
    // ~2 MB for a reader that is not reading yet: most of it waits in the server's queue.
    let body = "q".repeat(2000);
    const N: usize = 1000;
    for i in 0..N {
        publisher.send("PUB", "t", &[("Seq", &i.to_string())], &body);
    }
    publisher.sync();
    let stopper = std::thread::spawn(move || srv.stop());
    for i in 0..N {
        let m = reader.recv();
        assert_eq!(m.header("Seq"), Some(i.to_string().as_str()));
    }
    assert_eq!(
        reader.recv_close(),
        (1001, "server shutting down".to_owned())
    );
    stopper.join().unwrap().expect("clean shutdown");
}
