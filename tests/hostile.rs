//! Hostile peers over real sockets: a peer that floods continuation frames, tiny
//! messages, pings or oversized keys, or holds handshakes open, must neither hold the
//! loop nor pin memory, and a fast reader is never cut off by a burst.
//!
//! Latency is measured with a service doing PUB round trips on its own topic while the
//! attack runs; memory with VmRSS of a server binary started for the test.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::proc::{rss_kib, Proc};
use common::*;

/// How long each flood runs.
const FLOOD: Duration = Duration::from_secs(10);
/// The p99 a service's round trip must stay under during a flood.
const P99_LIMIT: Duration = Duration::from_millis(50);

// ------------------------------------------------------------------ raw WebSocket peer

/// A WebSocket peer written by hand, so it can send what no library would.
struct Raw {
    s: TcpStream,
}

impl Raw {
    /// Connect and upgrade; with a key, authenticate and read `MM OK` and the cid.
    fn connect(addr: SocketAddr, key: Option<&str>) -> Raw {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.set_write_timeout(Some(WAIT)).unwrap();
        s.set_nodelay(true).unwrap();
        let mut r = Raw { s };
        r.s.write_all(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(
                r.s.read(&mut b).expect("upgrade response"),
                1,
                "closed in upgrade"
            );
            head.push(b[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        if let Some(k) = key {
            r.s.write_all(&frame(true, 1, k.as_bytes())).unwrap();
            assert_eq!(r.read_frame(), (1, b"MM OK".to_vec()));
            let (op, _cid) = r.read_frame();
            assert_eq!(op, 1);
        }
        r
    }

    /// One server frame: (opcode, payload). Server frames are not masked.
    fn read_frame(&mut self) -> (u8, Vec<u8>) {
        let mut h = [0u8; 2];
        self.s.read_exact(&mut h).expect("frame header");
        let len = match h[1] & 0x7f {
            126 => {
                let mut l = [0u8; 2];
                self.s.read_exact(&mut l).unwrap();
                u16::from_be_bytes(l) as usize
            }
            127 => {
                let mut l = [0u8; 8];
                self.s.read_exact(&mut l).unwrap();
                u64::from_be_bytes(l) as usize
            }
            n => n as usize,
        };
        let mut p = vec![0u8; len];
        self.s.read_exact(&mut p).unwrap();
        (h[0] & 0x0f, p)
    }

    /// Read frames until a close frame; its code and reason.
    fn expect_close(&mut self) -> (u16, String) {
        for _ in 0..10_000 {
            let (op, p) = self.read_frame();
            if op == 8 {
                assert!(p.len() >= 2, "close without code");
                return (
                    u16::from_be_bytes([p[0], p[1]]),
                    String::from_utf8_lossy(&p[2..]).into_owned(),
                );
            }
        }
        panic!("no close frame");
    }
}

/// A masked client frame (mask key 0, so the payload is sent as is).
fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
    let n = payload.len();
    if n < 126 {
        f.push(0x80 | n as u8);
    } else if n < 65536 {
        f.push(0x80 | 126);
        f.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        f.push(0x80 | 127);
        f.extend_from_slice(&(n as u64).to_be_bytes());
    }
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

/// Run the calling thread at the lowest priority. An attacker on the internet does not
/// share the server's CPU; on this machine it does, and the tests measure how the
/// server shares its loop between peers, not how the kernel shares the CPU.
fn as_remote_attacker() {
    // SAFETY: gettid and setpriority on the calling thread only.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19);
    }
}

/// Write `chunk` again and again until `until` or the server closes; bytes written.
fn flood(s: &mut TcpStream, chunk: &[u8], until: Instant, max_bytes: u64) -> u64 {
    as_remote_attacker();
    s.set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut sent = 0u64;
    while Instant::now() < until && sent < max_bytes {
        match s.write(chunk) {
            Ok(0) => break,
            Ok(n) => sent += n as u64,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    sent
}

// ------------------------------------------------------------------ latency probe

/// A service doing PUB round trips on its own topic until `stop`; the sorted RTTs.
fn probe(addr: SocketAddr, stop: Arc<AtomicBool>) -> thread::JoinHandle<Vec<Duration>> {
    let mut p = Peer::service(addr);
    p.send("SUB", "probe", &[], "");
    p.sync();
    thread::spawn(move || {
        let mut rtts = Vec::new();
        let mut i = 0u64;
        while !stop.load(Ordering::SeqCst) {
            i += 1;
            let body = format!("p{i}");
            let t = Instant::now();
            p.send("PUB", "probe", &[], &body);
            let m = p.recv();
            rtts.push(t.elapsed());
            assert_eq!(m.body, body);
            thread::sleep(Duration::from_millis(2)); // pacing, not synchronisation
        }
        rtts.sort();
        rtts
    })
}

fn p99(rtts: &[Duration]) -> Duration {
    assert!(rtts.len() >= 100, "only {} round trips", rtts.len());
    rtts[rtts.len() * 99 / 100]
}

// ------------------------------------------------------------------ 1. continuation frames

#[test]
fn a_message_of_too_many_fragments_is_closed_1008() {
    let srv = TestServer::with(|c| c.max_fragments = 100);
    for key in [None, Some(CLIENT_KEY)] {
        let mut a = Raw::connect(srv.addr, key);
        let mut burst = frame(false, 1, b"x");
        for _ in 0..200 {
            burst.extend_from_slice(&frame(false, 0, b""));
        }
        let _ = a.s.write_all(&burst);
        assert_eq!(
            a.expect_close(),
            (1008, "too many fragments".into()),
            "key {key:?}"
        );
    }
    // 100 frames (99 unfinished + the last) is allowed.
    let mut c = Raw::connect(srv.addr, Some(SERVICE_KEY));
    let mut msg = frame(false, 1, b"PUB MSG:x\r\n\r\n");
    for _ in 0..98 {
        msg.extend_from_slice(&frame(false, 0, b""));
    }
    msg.extend_from_slice(&frame(true, 0, b"hi\r\n.\r\n"));
    c.s.write_all(&msg).unwrap();
    // Still open: a ping is answered.
    c.s.write_all(&frame(true, 9, b"still")).unwrap();
    assert_eq!(c.read_frame(), (10, b"still".to_vec()));
}

#[test]
fn frames_sent_with_the_upgrade_request_are_read_like_any_others() {
    // The request, the key, a PUB and a ping in one write: what follows the request in
    // the server's HTTP buffer goes through the same frame reader.
    let srv = TestServer::start();
    let mut sub = Peer::service(srv.addr);
    sub.send("SUB", "t", &[], "");
    sub.sync();
    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut all = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        .to_vec();
    all.extend_from_slice(&frame(true, 1, SERVICE_KEY.as_bytes()));
    all.extend_from_slice(&frame(false, 1, b"PUB t\r\n\r\nwith the "));
    all.extend_from_slice(&frame(true, 0, b"request\r\n.\r\n"));
    all.extend_from_slice(&frame(true, 9, b"p"));
    s.write_all(&all).unwrap();
    let mut raw = Raw { s };
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(raw.s.read(&mut b).expect("upgrade response"), 1);
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    assert_eq!(raw.read_frame(), (1, b"MM OK".to_vec()));
    assert_eq!(raw.read_frame().0, 1, "the cid");
    assert_eq!(raw.read_frame(), (10, b"p".to_vec()), "the pong");
    assert_eq!(sub.recv().body, "with the request");
}

#[test]
fn a_close_or_a_bad_frame_after_waiting_messages_comes_after_them() {
    // 150 PUBs in one write are 300 units of a turn's budget of 100 (a frame and a
    // message each): when the close frame (or a frame with reserved bits) is read, most
    // of them still wait in the decoder. They are all handled first, in order; then the
    // close is answered (1000 echoed) or the error closes the connection (1002).
    let srv = TestServer::with(|c| c.max_messages_per_turn = 100);
    let mut sub = Peer::service(srv.addr);
    sub.send("SUB", "t", &[], "");
    sub.sync();
    for (end, want) in [
        (
            frame(true, 8, &1000u16.to_be_bytes()),
            (1000, String::new()),
        ),
        (
            frame(true, 0x40 | 1, b"rsv1"),
            (1002, "websocket protocol error".into()),
        ),
    ] {
        let mut publisher = Raw::connect(srv.addr, Some(SERVICE_KEY));
        let mut burst = Vec::new();
        for i in 0..150 {
            burst.extend_from_slice(&frame(
                true,
                1,
                format!("PUB t\r\n\r\nm{i}\r\n.\r\n").as_bytes(),
            ));
        }
        burst.extend_from_slice(&end);
        burst.extend_from_slice(&frame(true, 1, b"PUB t\r\n\r\nafter the end\r\n.\r\n"));
        publisher.s.write_all(&burst).unwrap();
        for i in 0..150 {
            assert_eq!(sub.recv().body, format!("m{i}"), "ended by {want:?}");
        }
        assert_eq!(publisher.expect_close(), want);
        // Nothing after the end was handled: the next message is the probe's.
        sub.send("PUB", "t", &[], "probe");
        assert_eq!(sub.recv().body, "probe");
    }
}

#[test]
fn continuation_frame_flood_does_not_hold_the_loop() {
    // The fragment cap is lifted so the flood lasts: only the read budget protects.
    let srv = TestServer::with(|c| {
        c.max_fragments = usize::MAX;
        c.handshake_timeout = Duration::from_secs(2);
    });
    let stop = Arc::new(AtomicBool::new(false));
    let rtts = probe(srv.addr, stop.clone());
    let until = Instant::now() + FLOOD;
    let mut chunk = Vec::new();
    for _ in 0..2048 {
        chunk.extend_from_slice(&frame(false, 0, b""));
    }
    let attackers: Vec<_> = [None, Some(CLIENT_KEY)]
        .into_iter()
        .map(|key| {
            let chunk = chunk.clone();
            let addr = srv.addr;
            thread::spawn(move || {
                let mut a = Raw::connect(addr, key);
                a.s.write_all(&frame(false, 1, b"PUB x\r\n")).unwrap();
                let started = Instant::now();
                let sent = flood(&mut a.s, &chunk, until, u64::MAX);
                (key, sent, started.elapsed())
            })
        })
        .collect();
    let mut results = Vec::new();
    for a in attackers {
        results.push(a.join().unwrap());
    }
    stop.store(true, Ordering::SeqCst);
    let rtts = rtts.join().unwrap();
    let p = p99(&rtts);
    let closed: Vec<(String, f64)> = metrics(srv.addr)
        .into_iter()
        .filter(|(k, v)| {
            (k.starts_with("middleman_connections_closed_total") || k.starts_with("middleman_loop"))
                && *v > 0.0
        })
        .collect();
    println!(
        "continuation flood: {results:?}; closed {closed:?}; probe {} round trips, p50 {:?} p99 {p:?} max {:?}",
        rtts.len(),
        rtts[rtts.len() / 2],
        rtts[rtts.len() - 1]
    );
    assert!(p < P99_LIMIT, "p99 {p:?} during the flood");
    // The unauthenticated attacker was closed by the handshake timeout mid-flood.
    let (_, sent, lasted) = results[0];
    assert!(
        sent > 1 << 20,
        "the unauthenticated flood sent only {sent} bytes"
    );
    assert!(
        lasted < FLOOD - Duration::from_secs(3),
        "the handshake timeout never fired: {lasted:?}"
    );
    // The authenticated one flooded for the whole time and was read from throughout.
    assert!(
        results[1].1 > 10 << 20,
        "the client flood sent only {} bytes",
        results[1].1
    );
}

// ------------------------------------------------------------------ 6. tiny messages

#[test]
fn flood_of_frames_full_of_tiny_pubs_does_not_hold_the_loop() {
    let srv = TestServer::start();
    let mut svc = Peer::service(srv.addr);
    svc.send("EPUB", "room", &[], "");
    svc.sync();
    let stop = Arc::new(AtomicBool::new(false));
    let rtts = probe(srv.addr, stop.clone());
    let one = wire("PUB", "room", &[], "");
    let per_frame = (1 << 20) / one.len() - 1;
    let payload = one.repeat(per_frame);
    let big = frame(true, 1, payload.as_bytes());
    let until = Instant::now() + FLOOD;
    let addr = srv.addr;
    let attacker = thread::spawn(move || {
        let mut a = Raw::connect(addr, Some(CLIENT_KEY));
        flood(&mut a.s, &big, until, u64::MAX)
    });
    let sent = attacker.join().unwrap();
    stop.store(true, Ordering::SeqCst);
    let rtts = rtts.join().unwrap();
    let p = p99(&rtts);
    println!(
        "tiny-PUB flood: {} MiB sent ({per_frame} PUBs per frame); probe {} round trips, \
         p50 {:?} p99 {p:?} max {:?}",
        sent >> 20,
        rtts.len(),
        rtts[rtts.len() / 2],
        rtts[rtts.len() - 1]
    );
    assert!(sent > 4 << 20, "the flood sent only {sent} bytes");
    assert!(p < P99_LIMIT, "p99 {p:?} during the flood");
    let m = metrics(srv.addr);
    assert!(
        m["middleman_messages_in_total{cmd=\"PUB\"}"] > 100_000.0,
        "the server did process the flood: {:?}",
        m.get("middleman_messages_in_total{cmd=\"PUB\"}")
    );
}

// ------------------------------------------------------------------ 2. pings

/// A server binary with a raised per-address handshake budget (every test peer is on
/// 127.0.0.1); its pid and address.
fn server_binary(extra: &[&str]) -> Proc {
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--service-key",
        SERVICE_KEY,
        "--client-key",
        CLIENT_KEY,
        "--max-handshakes-per-ip",
        "1000",
    ];
    args.extend_from_slice(extra);
    let p = Proc::start(&args, &[]);
    p.wait_line("listening on");
    p
}

#[test]
fn ping_flood_from_a_peer_that_never_reads_is_bounded_and_closed() {
    let mut p = server_binary(&[]);
    let addr = p.addr();
    let pid = p.child.id();
    let base = rss_kib(pid, "VmRSS:");
    let mut chunk = Vec::new();
    for _ in 0..512 {
        chunk.extend_from_slice(&frame(true, 9, &[b'p'; 125]));
    }
    let limit_closes = |m: &std::collections::HashMap<String, f64>| {
        m["middleman_connections_closed_total{reason=\"limit\"}"]
    };
    for (i, key) in [None, Some(CLIENT_KEY)].into_iter().enumerate() {
        let mut a = Raw::connect(addr, key);
        // The peer never reads: the server's pongs fill the socket buffers, then count
        // as unsent in its queue, until it closes the peer (1008 "too many pings"; it
        // then discards what still comes for the close linger, and hangs up).
        let sent = flood(
            &mut a.s,
            &chunk,
            Instant::now() + Duration::from_secs(30),
            400 << 20,
        );
        let peak = rss_kib(pid, "VmHWM:");
        println!(
            "ping flood (key {:?}): {} MiB of pings sent; RSS {base} KiB -> peak {peak} KiB",
            key.is_some(),
            sent >> 20
        );
        assert!(sent > 16 << 20, "the flood sent only {sent} bytes");
        assert!(
            peak < base + 64 * 1024,
            "RSS grew from {base} to {peak} KiB"
        );
        // It was closed for its pings (not merely still being read).
        let deadline = Instant::now() + WAIT;
        while limit_closes(&metrics(addr)) < (i + 1) as f64 {
            assert!(
                Instant::now() < deadline,
                "the pinging peer was never closed"
            );
            thread::sleep(Duration::from_millis(20)); // polling the server's counters, bounded
        }
    }
    p.sigterm();
    assert_eq!(p.wait_exit(), 0);
}

#[test]
fn pings_alone_are_not_activity() {
    let srv = TestServer::with(|c| {
        c.idle_timeout = Duration::from_millis(1500);
        c.ping_interval = Duration::from_millis(500);
    });
    let idle = |m: &std::collections::HashMap<String, f64>| {
        m["middleman_connections_closed_total{reason=\"idle\"}"]
    };
    assert_eq!(idle(&metrics(srv.addr)), 0.0);
    let mut a = Raw::connect(srv.addr, Some(CLIENT_KEY));
    // Ping every 100 ms for twice the idle timeout, never reading.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        if a.s.write_all(&frame(true, 9, b"hi")).is_err() {
            break;
        }
        thread::sleep(Duration::from_millis(100)); // the peer's pace
    }
    // Closed as idle meanwhile (a ping is not activity): the close frame is already
    // waiting behind the pongs (had pings counted, it would come 1.5 s after the last).
    a.s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert_eq!(a.expect_close(), (1001, "idle timeout".into()));
    // Counted once the linger is over and the connection is gone.
    let deadline = Instant::now() + WAIT;
    while idle(&metrics(srv.addr)) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the idle close was never counted"
        );
        thread::sleep(Duration::from_millis(20)); // polling the server's counters, bounded
    }
}

// ------------------------------------------------------------------ 3. bursts

#[test]
fn a_fast_reader_receives_every_byte_of_a_64_mib_burst() {
    let srv = TestServer::start();
    // The subscriber reads frames as fast as they come (no parsing on the way).
    let mut sub = Raw::connect(srv.addr, Some(SERVICE_KEY));
    let mut setup = frame(true, 1, wire("EPUB", "burst", &[], "").as_bytes());
    setup.extend_from_slice(&frame(true, 1, wire("SUB", "burst", &[], "").as_bytes()));
    setup.extend_from_slice(&frame(true, 9, b"sync"));
    sub.s.write_all(&setup).unwrap();
    assert_eq!(sub.read_frame(), (10, b"sync".to_vec())); // both processed
                                                          // Lines of 64 bytes (a line may not exceed 8 KiB).
    let body = format!("{}\n", "b".repeat(63)).repeat((1 << 20) / 64 - 16);
    let body = body.trim_end().to_owned();
    let one = wire("PUB", "burst", &[], &body);
    let tail = &one[one.find("\r\n\r\n").unwrap() + 2..]; // blank line, body, end
                                                          // The whole 64 MiB burst in one write from a client.
    let burst = frame(true, 1, one.as_bytes()).repeat(64);
    let addr = srv.addr;
    let publisher = thread::spawn(move || {
        let mut c = Raw::connect(addr, Some(CLIENT_KEY));
        c.s.set_write_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        c.s.write_all(&burst).unwrap();
        c
    });
    let mut got = 0u64;
    for i in 0..64 {
        let (op, p) = sub.read_frame();
        assert_eq!(op, 1, "message {i}");
        assert!(p.starts_with(b"PUB burst\r\n"), "message {i}");
        assert!(p.ends_with(tail.as_bytes()), "message {i} is not whole");
        got += p.len() as u64;
    }
    let _c = publisher.join().unwrap();
    println!("64 messages, {} MiB received whole", got >> 20);
    let m = metrics(srv.addr);
    assert_eq!(
        m["middleman_connections_closed_total{reason=\"slow_consumer\"}"],
        0.0
    );
}

#[test]
fn a_responder_reading_at_full_speed_gets_a_burst_of_large_requests() {
    let srv = TestServer::start();
    let mut svc = Raw::connect(srv.addr, Some(SERVICE_KEY));
    let mut setup = frame(true, 1, wire("EREQ", "big", &[], "").as_bytes());
    setup.extend_from_slice(&frame(true, 9, b"sync"));
    svc.s.write_all(&setup).unwrap();
    assert_eq!(svc.read_frame(), (10, b"sync".to_vec()));
    let body = format!("{}\n", "r".repeat(63)).repeat((1 << 20) / 64 - 16);
    let body = body.trim_end().to_owned();
    let mut burst = Vec::new();
    let mut tail = String::new();
    for i in 0..5 {
        let id = i.to_string();
        let one = wire("REQ", "big", &[("ReqID", &id)], &body);
        tail = one[one.find("\r\n\r\n").unwrap() + 2..].to_owned();
        burst.extend_from_slice(&frame(true, 1, one.as_bytes()));
    }
    let addr = srv.addr;
    let requester = thread::spawn(move || {
        let mut c = Raw::connect(addr, Some(CLIENT_KEY));
        c.s.set_write_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        c.s.write_all(&burst).unwrap();
        c
    });
    for i in 0..5 {
        let (op, p) = svc.read_frame();
        assert_eq!(op, 1);
        assert!(p.starts_with(b"REQ big\r\n"), "request {i}");
        let text = String::from_utf8_lossy(&p[..200]).into_owned();
        assert!(
            text.contains(&format!("ReqID: {i}\r\n")),
            "request {i}: {text}"
        );
        assert!(p.ends_with(tail.as_bytes()), "request {i} is not whole");
    }
    let _c = requester.join().unwrap();
    let m = metrics(srv.addr);
    assert_eq!(
        m["middleman_connections_closed_total{reason=\"slow_consumer\"}"],
        0.0
    );
}

// ------------------------------------------------------------------ 5. unauthenticated memory

#[test]
fn unauthenticated_peers_cannot_send_large_keys() {
    let mut p = server_binary(&[]);
    let addr = p.addr();
    let pid = p.child.id();
    let base = rss_kib(pid, "VmRSS:");
    // A key frame announcing 1 MiB, and 64 KiB of it.
    let mut start = vec![0x81, 0x80 | 127];
    start.extend_from_slice(&(1u64 << 20).to_be_bytes());
    start.extend_from_slice(&[0, 0, 0, 0]);
    start.extend_from_slice(&[b'k'; 64 << 10]);
    let mut peers = Vec::new();
    for _ in 0..300 {
        let mut a = Raw::connect(addr, None);
        let _ = a.s.write_all(&start);
        peers.push(a);
    }
    let mut closed = 0;
    for a in &mut peers {
        let (code, reason) = a.expect_close();
        assert_eq!(code, 1009, "{reason}");
        assert!(
            ["frame too large", "message too long"].contains(&reason.as_str()),
            "{reason}"
        );
        closed += 1;
    }
    let peak = rss_kib(pid, "VmHWM:");
    println!(
        "300 unauthenticated 1 MiB keys: {closed} closed 1009; RSS {base} KiB -> peak {peak} KiB"
    );
    assert!(
        peak < base + 64 * 1024,
        "RSS grew from {base} to {peak} KiB"
    );
    // A key of the allowed size still works.
    let mut ok = Peer::client(addr);
    ok.sync();
    p.sigterm();
    assert_eq!(p.wait_exit(), 0);
}

// ------------------------------------------------------------------ 7. handshake budget

/// Open `n` idle TCP sockets and keep them open (reopening those the server drops) until
/// `stop`; returns how many reopenings it made.
fn hold_idle_sockets(addr: SocketAddr, n: usize, stop: Arc<AtomicBool>) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let open = || {
            let s = TcpStream::connect(addr).ok()?;
            s.set_nonblocking(true).ok()?;
            Some(s)
        };
        let mut socks: Vec<Option<TcpStream>> = (0..n).map(|_| open()).collect();
        let mut reopened = 0;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            for s in &mut socks {
                let dead = match s {
                    Some(sock) => {
                        let mut b = [0u8; 512];
                        sock.read(&mut b).is_ok() // EOF or an answer: dropped
                            || matches!(sock.read(&mut b), Err(ref e) if e.kind() != ErrorKind::WouldBlock)
                    }
                    None => true,
                };
                if dead {
                    *s = open();
                    reopened += 1;
                }
            }
            thread::sleep(Duration::from_millis(50)); // the attacker's pace: a sweep per 50 ms
        }
        reopened
    })
}

#[test]
fn idle_sockets_holding_the_handshake_budget_do_not_keep_clients_out() {
    let srv = TestServer::with(|c| {
        c.max_connections = 100;
        c.max_handshakes = 100;
        c.max_handshakes_per_ip = 1000;
    });
    // 250 idle sockets against a budget of 100, reopened as soon as they are dropped
    // (every address on loopback here stands for many attacker addresses).
    let stop = Arc::new(AtomicBool::new(false));
    let attacker = hold_idle_sockets(srv.addr, 250, stop.clone());
    // Wait until the budget is full and evictions have begun.
    let deadline = Instant::now() + WAIT;
    while metrics(srv.addr)
        .get("middleman_connections_closed_total{reason=\"evicted\"}")
        .copied()
        .unwrap_or(0.0)
        < 150.0
    {
        assert!(
            Instant::now() < deadline,
            "the idle sockets never filled the budget"
        );
        thread::sleep(Duration::from_millis(20)); // polling the server's counters, bounded
    }
    let mut ok = 0;
    let mut peers = Vec::new();
    for _ in 0..25 {
        let mut c = Peer::client(srv.addr);
        c.sync();
        peers.push(c);
        ok += 1;
        let h = http_get(srv.addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    }
    stop.store(true, Ordering::SeqCst);
    let reopened = attacker.join().unwrap();
    println!("{ok} of 25 clients connected while idle sockets were reopened {reopened} times");
    assert_eq!(ok, 25);
}

#[test]
fn one_address_gets_only_its_share_of_the_handshake_budget() {
    let srv = TestServer::with(|c| c.max_handshakes_per_ip = 8);
    let idle: Vec<TcpStream> = (0..8)
        .map(|_| TcpStream::connect(srv.addr).unwrap())
        .collect();
    // The server has seen all eight once a ninth is refused.
    let h = http_get(srv.addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(h.starts_with("HTTP/1.1 503"), "{h}");
    assert!(h.contains("too many handshakes from this address"), "{h}");
    // Another address is served.
    let other = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    other
        .bind(&"127.0.0.2:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    other.connect(&srv.addr.into()).unwrap();
    let mut other: TcpStream = other.into();
    other.set_read_timeout(Some(WAIT)).unwrap();
    other
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    let _ = other.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    // Once the idle ones go, the address is served again.
    drop(idle);
    let deadline = Instant::now() + WAIT;
    loop {
        let h = http_get(srv.addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
        if h.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "never served again: {h}");
        thread::sleep(Duration::from_millis(20)); // the server sees the hang-ups, bounded
    }
}
