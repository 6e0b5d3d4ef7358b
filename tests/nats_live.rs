//! The NATS codec (`middleman::cluster::proto`, `cluster::subject`) against a real
//! nats-server on 127.0.0.1: INFO, CONNECT and PING/PONG; PUB from one connection
//! received as the exact MSG on another; HPUB received as HMSG with the same headers; the
//! no-responders status; queue groups; the server's payload limit and protocol errors;
//! the launcher's restart on the same port. Plain blocking sockets with bounded waits.
//!
//! Needs nats-server, so a plain `cargo test` lists these as ignored; under
//! `--include-ignored` they fail where it is missing.

mod common;
mod tools;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::nats::NatsServer;
use middleman::cluster::proto::{self, ConnectOpts, NatsLimits, NatsParser, Op};
use middleman::cluster::subject;

/// Longest wait for one expected operation.
const WAIT: Duration = Duration::from_secs(5);

fn nats_server() -> NatsServer {
    require_nats();
    NatsServer::start()
}

fn require_nats() {
    if !common::nats::available() {
        tools::require("the live NATS tests", &["nats-server".to_owned()]);
    }
}

/// An owned header block.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hdr {
    raw: Vec<u8>,
    valid: bool,
    status: Option<u16>,
    description: Vec<u8>,
    fields: Vec<(Vec<u8>, Vec<u8>)>,
}

/// An owned MSG/HMSG.
#[derive(Debug, Clone, PartialEq, Eq)]
struct M {
    subject: Vec<u8>,
    sid: u64,
    reply: Option<Vec<u8>>,
    hdr: Option<Hdr>,
    payload: Vec<u8>,
    no_responders: bool,
}

/// One operation, owned (PING is answered inside [`Client::next`] and not returned).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Got {
    Info {
        server_id: String,
        max_payload: Option<u64>,
    },
    Msg(M),
    Pong,
    Ok,
    Err(String),
    Closed,
}

impl Got {
    fn of(op: &Op<'_>) -> Got {
        match op {
            Op::Info(i) => Got::Info {
                server_id: i.server_id.to_string(),
                max_payload: i.max_payload,
            },
            Op::Msg(m) => Got::Msg(M {
                subject: m.subject.to_vec(),
                sid: m.sid_u64().expect("numeric sid"),
                reply: m.reply.map(<[u8]>::to_vec),
                hdr: m.headers.map(|h| Hdr {
                    raw: h.raw().to_vec(),
                    valid: h.is_valid(),
                    status: h.status(),
                    description: h.description().to_vec(),
                    fields: h.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect(),
                }),
                payload: m.payload.to_vec(),
                no_responders: m.is_no_responders(),
            }),
            Op::Ping => unreachable!("answered in Client::next"),
            Op::Pong => Got::Pong,
            Op::Ok => Got::Ok,
            Op::Err(e) => Got::Err(String::from_utf8_lossy(e).into_owned()),
        }
    }

    fn msg(self) -> M {
        match self {
            Got::Msg(m) => m,
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

/// A NATS client on a blocking socket, driven by the codec.
struct Client {
    sock: TcpStream,
    parser: NatsParser,
    out: Vec<u8>,
    server_id: String,
    max_payload: u64,
}

impl Client {
    /// Connect, read INFO, send CONNECT and PING, expect PONG.
    fn connect(server: &NatsServer, name: &str) -> Client {
        let sock = TcpStream::connect_timeout(&server.addr(), WAIT).expect("connect");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        sock.set_nodelay(true).unwrap();
        let mut c = Client {
            sock,
            parser: NatsParser::new(NatsLimits::default()),
            out: Vec::new(),
            server_id: String::new(),
            max_payload: 0,
        };
        // The server speaks first, with INFO.
        let mut p = NatsParser::default();
        let deadline = Instant::now() + WAIT;
        let mut buf = [0u8; 4096];
        loop {
            assert!(Instant::now() < deadline, "no INFO within {WAIT:?}");
            match c.sock.read(&mut buf) {
                Ok(0) => panic!("closed before INFO"),
                Ok(n) => p.feed(&buf[..n]),
                Err(e) if is_timeout(&e) => continue,
                Err(e) => panic!("read: {e}"),
            }
            match p.next() {
                Ok(Some(Op::Info(info))) => {
                    assert!(info.headers, "server without header support: {info:?}");
                    assert_eq!(info.proto, 1);
                    assert!(!info.server_id.is_empty());
                    c.server_id = info.server_id.to_string();
                    c.max_payload = info.max_payload.expect("INFO without max_payload");
                    break;
                }
                Ok(Some(other)) => panic!("first operation is not INFO: {other:?}"),
                Ok(None) => continue,
                Err(e) => panic!("bad first operation: {e}"),
            }
        }
        assert!(!p.needs_more(), "bytes after INFO before CONNECT");
        c.parser.set_max_payload(c.max_payload as usize);
        proto::connect(
            &mut c.out,
            &ConnectOpts {
                name: Some(name),
                ..Default::default()
            },
        );
        proto::ping(&mut c.out);
        c.flush();
        assert_eq!(c.next(), Got::Pong, "CONNECT was not accepted");
        c
    }

    fn flush(&mut self) {
        self.sock.write_all(&self.out).expect("write");
        self.out.clear();
    }

    /// The next operation within [`WAIT`] (server PINGs answered on the way).
    fn next(&mut self) -> Got {
        let deadline = Instant::now() + WAIT;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match self.parser.next() {
                Ok(Some(Op::Ping)) => {
                    proto::pong(&mut self.out);
                    self.flush();
                    continue;
                }
                Ok(Some(op)) => return Got::of(&op),
                Ok(None) => {}
                Err(e) => panic!("protocol violation from nats-server: {e}"),
            }
            assert!(Instant::now() < deadline, "nothing within {WAIT:?}");
            match self.sock.read(&mut buf) {
                Ok(0) => return Got::Closed,
                Ok(n) => self.parser.feed(&buf[..n]),
                Err(e) if is_timeout(&e) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Got::Closed,
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// PING and every operation before its PONG: everything the server had for us when it
    /// read the PING.
    fn sync(&mut self) -> Vec<Got> {
        proto::ping(&mut self.out);
        self.flush();
        let mut before = Vec::new();
        for _ in 0..100_000 {
            match self.next() {
                Got::Pong => return before,
                Got::Closed => panic!("closed while waiting for PONG after {before:?}"),
                other => before.push(other),
            }
        }
        panic!("no PONG after 100000 operations");
    }

    fn sub(&mut self, subject: &[u8], queue: Option<&[u8]>, sid: u64) {
        proto::sub(&mut self.out, subject, queue, sid).unwrap();
        // After the PONG the subscription is in place for every other connection.
        assert_eq!(self.sync(), []);
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn info_connect_ping_pong() {
    let server = nats_server();
    let mut c = Client::connect(&server, "mm-live-info");
    assert_eq!(c.max_payload, 1 << 20, "nats-server's default max_payload");
    assert_eq!(c.sync(), []);
    // A second INFO-reading client sees the same server.
    let c2 = Client::connect(&server, "mm-live-info-2");
    assert_eq!(c.server_id, c2.server_id);
}

#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn pub_from_another_connection_arrives_as_the_exact_msg() {
    let server = nats_server();
    let mut s = Client::connect(&server, "mm-live-sub");
    let mut p = Client::connect(&server, "mm-live-pub");

    // A target that holds '.', a space, wildcards and a non-ASCII byte is one token.
    let target = "MSG:room 1.*>~é".as_bytes();
    let mut subj = b"mm.t.".to_vec();
    subject::encode(target, &mut subj);
    s.sub(&subj, None, 7);
    s.sub(b"mm.t.*", None, 8); // one token after mm.t: matches
    s.sub(b"mm.t.*.>", None, 9); // more than one: must not match

    let mut payload: Vec<u8> = (0..=255u8).collect();
    payload.extend_from_slice(b"\r\nMSG x 1 2\r\n\r\n");
    proto::pub_(&mut p.out, &subj, Some(b"_INBOX.r1"), &payload).unwrap();
    proto::pub_(&mut p.out, &subj, None, b"").unwrap();
    p.flush();
    assert_eq!(p.sync(), [], "publisher got something back (echo is off)");

    let mut got: Vec<M> = s.sync().into_iter().map(Got::msg).collect();
    got.sort_by_key(|m| (m.payload.is_empty(), m.sid));
    let want = |sid, reply: Option<&[u8]>, payload: &[u8]| M {
        subject: subj.clone(),
        sid,
        reply: reply.map(<[u8]>::to_vec),
        hdr: None,
        payload: payload.to_vec(),
        no_responders: false,
    };
    assert_eq!(
        got,
        [
            want(7, Some(b"_INBOX.r1"), &payload),
            want(8, Some(b"_INBOX.r1"), &payload),
            want(7, None, b""),
            want(8, None, b""),
        ]
    );
    let token = &got[0].subject[b"mm.t.".len()..];
    assert_eq!(subject::decode(token).as_deref(), Some(target));

    // UNSUB with a maximum counts the messages already delivered: sid 7 has had 2, so a
    // maximum of 3 lets one more through; a maximum it has reached ends it at once.
    proto::unsub(&mut s.out, 7, Some(3));
    s.sub(b"mm.t.>", None, 10);
    proto::pub_(&mut p.out, b"mm.t.x", None, b"").unwrap();
    p.flush();
    assert_eq!(p.sync(), []);
    assert_eq!(s.sync().len(), 2, "sid 8 and sid 10");
    proto::unsub(&mut s.out, 10, Some(1));
    proto::unsub(&mut s.out, 8, None);
    s.flush();
    assert_eq!(s.sync(), []);
    for i in 0..3u8 {
        proto::pub_(&mut p.out, &subj, None, &[i]).unwrap();
    }
    p.flush();
    assert_eq!(p.sync(), []);
    let got: Vec<M> = s.sync().into_iter().map(Got::msg).collect();
    assert_eq!(got, [want(7, None, &[0])]);
}

#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn hpub_arrives_as_hmsg_with_the_same_headers() {
    let server = nats_server();
    let mut s = Client::connect(&server, "mm-live-hsub");
    let mut p = Client::connect(&server, "mm-live-hpub");
    s.sub(b"mm.h", None, 1);

    let headers: [(&[u8], &[u8]); 4] = [
        (b"ReqID", b"42"),
        (b"reqid", b"lower case is another name"),
        (b"Multi", b"one"),
        (b"Multi", "two\twith tab and é".as_bytes()),
    ];
    proto::hpub(
        &mut p.out,
        b"mm.h",
        Some(b"_INBOX.h"),
        &headers,
        b"body\r\n.\r\n",
    )
    .unwrap();
    proto::hpub(&mut p.out, b"mm.h", None, &[], b"").unwrap();
    p.flush();
    assert_eq!(p.sync(), []);

    let got: Vec<M> = s.sync().into_iter().map(Got::msg).collect();
    assert_eq!(got.len(), 2, "{got:?}");
    let h = got[0].hdr.as_ref().expect("HMSG");
    assert!(h.valid);
    assert_eq!(h.status, None);
    let fields: Vec<(&[u8], &[u8])> = h
        .fields
        .iter()
        .map(|(n, v)| (n.as_slice(), v.as_slice()))
        .collect();
    assert_eq!(fields, headers, "order, case and duplicates kept");
    // The block is relayed byte for byte as we wrote it.
    let mut block = b"NATS/1.0\r\n".to_vec();
    for (n, v) in headers {
        block.extend_from_slice(&[n, b": ", v, b"\r\n"].concat());
    }
    block.extend_from_slice(b"\r\n");
    assert_eq!(h.raw, block);
    assert_eq!(got[0].payload, b"body\r\n.\r\n");
    assert_eq!(got[0].reply.as_deref(), Some(&b"_INBOX.h"[..]));
    let empty = got[1].hdr.as_ref().expect("HMSG");
    assert_eq!(
        (empty.raw.as_slice(), empty.fields.len()),
        (&b"NATS/1.0\r\n\r\n"[..], 0)
    );
    assert!(got[1].payload.is_empty() && !got[1].no_responders);
}

#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn request_without_responders_gets_status_503() {
    let server = nats_server();
    let mut c = Client::connect(&server, "mm-live-req");
    c.sub(b"_INBOX.mm.1", None, 3);
    proto::pub_(
        &mut c.out,
        b"mm.nobody.listens",
        Some(b"_INBOX.mm.1"),
        b"ping?",
    )
    .unwrap();
    c.flush();
    let got = c.sync();
    assert_eq!(got.len(), 1, "{got:?}");
    let m = got.into_iter().next().unwrap().msg();
    // Exactly what nats-server 2.9.10 sends: HMSG _INBOX.mm.1 3 16 16, an empty payload.
    assert_eq!(m.subject, b"_INBOX.mm.1");
    assert_eq!(m.sid, 3);
    assert_eq!(m.reply, None);
    let h = m.hdr.as_ref().expect("HMSG");
    assert_eq!(h.raw, b"NATS/1.0 503\r\n\r\n");
    assert_eq!(
        (h.valid, h.status, h.description.len()),
        (true, Some(503), 0)
    );
    assert!(m.payload.is_empty());
    assert!(m.no_responders);

    // With a responder there is no 503: the reply comes back instead.
    let mut r = Client::connect(&server, "mm-live-responder");
    r.sub(b"mm.svc", None, 1);
    proto::pub_(&mut c.out, b"mm.svc", Some(b"_INBOX.mm.1"), b"q").unwrap();
    c.flush();
    assert_eq!(c.sync(), []);
    let req = r.sync().into_iter().next().expect("request").msg();
    let reply = req.reply.expect("reply subject");
    proto::pub_(&mut r.out, &reply, None, b"answer").unwrap();
    r.flush();
    assert_eq!(r.sync(), []);
    let got: Vec<M> = c.sync().into_iter().map(Got::msg).collect();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (got[0].payload.as_slice(), got[0].hdr.is_none()),
        (&b"answer"[..], true)
    );
}

#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn queue_group_spreads_messages_and_plain_subscribers_get_all() {
    let server = nats_server();
    let mut q1 = Client::connect(&server, "mm-live-q1");
    let mut q2 = Client::connect(&server, "mm-live-q2");
    let mut all = Client::connect(&server, "mm-live-all");
    let mut p = Client::connect(&server, "mm-live-qpub");
    q1.sub(b"mm.work", Some(b"workers"), 1);
    q2.sub(b"mm.work", Some(b"workers"), 2);
    all.sub(b"mm.work", None, 3);

    const N: u32 = 200;
    for i in 0..N {
        proto::pub_(&mut p.out, b"mm.work", None, i.to_string().as_bytes()).unwrap();
    }
    p.flush();
    assert_eq!(p.sync(), []);

    let numbers = |c: &mut Client, sid: u64| -> Vec<u32> {
        c.sync()
            .into_iter()
            .map(|g| {
                let m = g.msg();
                assert_eq!((m.subject.as_slice(), m.sid), (&b"mm.work"[..], sid));
                String::from_utf8(m.payload).unwrap().parse().unwrap()
            })
            .collect()
    };
    let (a, b) = (numbers(&mut q1, 1), numbers(&mut q2, 2));
    assert!(
        !a.is_empty() && !b.is_empty(),
        "not spread: {} / {}",
        a.len(),
        b.len()
    );
    let mut both: Vec<u32> = a.iter().chain(&b).copied().collect();
    both.sort_unstable();
    assert_eq!(both, (0..N).collect::<Vec<_>>(), "each exactly once");
    // Each member gets its share in publication order.
    assert!(a.windows(2).all(|w| w[0] < w[1]) && b.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(numbers(&mut all, 3), (0..N).collect::<Vec<_>>());
    eprintln!("queue group split {N} messages {} / {}", a.len(), b.len());
}

#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn server_limits_and_errors() {
    require_nats();
    let server = NatsServer::start_with_config("max_payload: 1024\n");
    let mut c = Client::connect(&server, "mm-live-limits");
    assert_eq!(
        c.max_payload, 1024,
        "INFO carries the configured max_payload"
    );
    assert_eq!(c.parser.limits().max_payload, 1024);
    // Headers count against max_payload: 1024 in all passes.
    let mut s = Client::connect(&server, "mm-live-limits-sub");
    s.sub(b"mm.big", None, 1);
    let hdr: [(&[u8], &[u8]); 1] = [(b"A", b"b")];
    let fill = 1024 - proto::header_block_len(&hdr);
    proto::hpub(&mut c.out, b"mm.big", None, &hdr, &vec![b'x'; fill]).unwrap();
    c.flush();
    assert_eq!(c.sync(), []);
    let got = s.sync();
    assert_eq!(got.len(), 1);
    // One byte more: -ERR and the connection is closed.
    proto::pub_(&mut c.out, b"mm.big", None, &[b'x'; 1025]).unwrap();
    c.flush();
    assert_eq!(c.next(), Got::Err("Maximum Payload Violation".into()));
    assert_eq!(c.next(), Got::Closed);

    // An operation the server does not know.
    let mut c = Client::connect(&server, "mm-live-garbage");
    c.out.extend_from_slice(b"FOO bar\r\n");
    c.flush();
    assert_eq!(c.next(), Got::Err("Unknown Protocol Operation".into()));
    assert_eq!(c.next(), Got::Closed);
}

#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn launcher_restarts_on_the_same_port() {
    let mut server = nats_server();
    let (port, url, pid) = (server.port(), server.url(), server.pid());
    assert!(port != 0 && url.ends_with(&format!(":{port}")));
    let mut c = Client::connect(&server, "mm-live-restart");
    let id1 = c.server_id.clone();
    server.restart();
    assert_eq!(server.port(), port);
    assert_ne!(server.pid(), pid);
    // The old connection is closed (perhaps after the server's lame-duck INFO).
    let mut closed = false;
    for _ in 0..10 {
        match c.next() {
            Got::Closed => {
                closed = true;
                break;
            }
            Got::Info { .. } | Got::Err(_) => continue,
            other => panic!("unexpected {other:?} on the old connection"),
        }
    }
    assert!(closed, "old connection still open after restart");
    let c2 = Client::connect(&server, "mm-live-restart-2");
    assert_ne!(c2.server_id, id1, "a new server process has a new id");

    // Crash and start again: same port.
    server.kill();
    assert!(!server.is_running() && server.pid().is_none());
    assert!(TcpStream::connect_timeout(&server.addr(), Duration::from_secs(1)).is_err());
    server.start_again();
    assert_eq!(server.port(), port);
    Client::connect(&server, "mm-live-restart-3");
    assert!(server.log().contains("Server is ready"));
}
