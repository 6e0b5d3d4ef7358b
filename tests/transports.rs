//! Every transport on one reactor: ws, wss (self-signed certificate made here), raw tcp
//! and raw unix, with messages crossing between them, bad keys and restricted roles,
//! byte-by-byte raw streams and a stalled TLS handshake.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use middleman::protocol::{Decoded, Decoder, Limits};
use middleman::transport::{Endpoint, Listen, Scheme};
use middleman::{Config, Running};

struct Setup {
    server: Running,
    ws: SocketAddr,
    wss: SocketAddr,
    tcp: SocketAddr,
    tcp_services: SocketAddr,
    unix: PathBuf,
    ca_der: Vec<u8>,
    _dir: TempDir,
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(tag: &str) -> TempDir {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let d = std::env::temp_dir().join(format!("mm-{tag}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

fn setup(f: impl FnOnce(&mut Config)) -> Setup {
    let dir = temp_dir("tls");
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert_path = dir.0.join("cert.pem");
    let key_path = dir.0.join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let unix = dir.0.join("mm.sock");
    let mut cfg = config();
    cfg.listeners = vec![
        "ws://127.0.0.1:0".parse().unwrap(),
        "wss://127.0.0.1:0".parse().unwrap(),
        "tcp://127.0.0.1:0".parse().unwrap(),
        "tcp://127.0.0.1:0?roles=service,monitor".parse().unwrap(),
        format!("unix://{}", unix.display()).parse().unwrap(),
    ];
    cfg.tls_cert = Some(cert_path);
    cfg.tls_key = Some(key_path);
    f(&mut cfg);
    let server = Running::spawn(cfg).expect("server");
    let tcp_of = |i: usize| match &server.listeners[i].endpoint {
        Endpoint::Tcp(a) => *a,
        Endpoint::Unix(_) => panic!("not tcp"),
    };
    assert_eq!(server.listeners[1].scheme, Scheme::Wss);
    Setup {
        ws: tcp_of(0),
        wss: tcp_of(1),
        tcp: tcp_of(2),
        tcp_services: tcp_of(3),
        unix,
        ca_der: cert.cert.der().to_vec(),
        server,
        _dir: dir,
    }
}

/// A peer on the raw stream protocol over any byte stream.
struct Raw<S: Read + Write> {
    s: S,
    dec: Decoder,
    cid: String,
}

fn read_line<S: Read>(s: &mut S) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => panic!(
                "EOF while reading a line; got {:?}",
                String::from_utf8_lossy(&line)
            ),
            Ok(_) => {
                line.push(b[0]);
                if b[0] == b'\n' {
                    return String::from_utf8(line).unwrap();
                }
            }
            Err(e) => panic!("read: {e}"),
        }
    }
}

impl<S: Read + Write> Raw<S> {
    fn auth(mut s: S, key: &str) -> Raw<S> {
        s.write_all(format!("{key}\r\n").as_bytes()).unwrap();
        assert_eq!(read_line(&mut s), "MM OK\r\n");
        let cid = read_line(&mut s).trim_end().to_owned();
        assert!(!cid.is_empty() && cid.bytes().all(|b| b.is_ascii_alphanumeric()));
        Raw {
            s,
            dec: Decoder::new(Limits::default()),
            cid,
        }
    }

    fn send(&mut self, raw: &str) {
        self.s.write_all(raw.as_bytes()).unwrap();
    }

    fn recv(&mut self) -> Msg {
        let mut buf = [0u8; 4096];
        loop {
            match self.dec.next() {
                Ok(Some(Decoded::Message(m))) => return Msg::of(&m),
                Ok(None) => {}
                other => panic!("raw stream: {other:?}"),
            }
            let n = self.s.read(&mut buf).expect("read");
            assert!(n > 0, "EOF while waiting for a message");
            self.dec.feed(&buf[..n]);
        }
    }

    /// Round trip: an unknown command always answers with an error.
    fn sync(&mut self) {
        self.send("SYNC x\r\n.\r\n");
        let m = self.recv();
        assert_eq!(
            (m.target.as_str(), m.header("cmd")),
            ("ERROR", Some("SYNC"))
        );
    }
}

fn tcp(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

fn unix(path: &PathBuf) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

fn wss_peer(setup: &Setup, key: &str) -> (tungstenite::WebSocket<TlsStream>, String) {
    let mut ws = wss_connect(setup.wss, &[&setup.ca_der]);
    ws.send(tungstenite::Message::text(key)).unwrap();
    assert_eq!(next_data_any(&mut ws), b"MM OK");
    let cid = String::from_utf8(next_data_any(&mut ws)).unwrap();
    (ws, cid)
}

fn next_data_any<S: Read + Write>(ws: &mut tungstenite::WebSocket<S>) -> Vec<u8> {
    loop {
        match ws.read().expect("read") {
            tungstenite::Message::Text(t) => return t.as_bytes().to_vec(),
            tungstenite::Message::Binary(b) => return b.to_vec(),
            tungstenite::Message::Close(f) => panic!("closed: {f:?}"),
            _ => {}
        }
    }
}

#[test]
fn handshake_on_every_transport() {
    let s = setup(|_| {});
    let mut a = Raw::auth(tcp(s.tcp), SERVICE_KEY);
    let mut b = Raw::auth(unix(&s.unix), CLIENT_KEY);
    let (_ws, cid) = wss_peer(&s, CLIENT_KEY);
    let w = Peer::client(s.ws);
    let cids = [a.cid.clone(), b.cid.clone(), cid, w.cid.clone()];
    for (i, x) in cids.iter().enumerate() {
        assert!(!cids[i + 1..].contains(x), "cid repeated: {cids:?}");
    }
    a.sync();
    b.sync();
}

#[test]
fn pub_sub_and_requests_cross_transports() {
    let s = setup(|_| {});
    // A service on unix enables and answers; subscribers on ws, wss, tcp.
    let mut svc = Raw::auth(unix(&s.unix), SERVICE_KEY);
    svc.send("ESUB news\r\n.\r\nEREQ time\r\n.\r\n");
    svc.sync();
    let mut ws = Peer::client(s.ws);
    ws.send("SUB", "news", &[], "");
    ws.sync();
    let (mut wss, wss_cid) = wss_peer(&s, CLIENT_KEY);
    wss.send(tungstenite::Message::text("SUB news\r\n.\r\n"))
        .unwrap();
    let mut raw = Raw::auth(tcp(s.tcp), CLIENT_KEY);
    raw.send("SUB news\r\n.\r\n");
    raw.sync();
    // Make sure the wss SUB was processed: a request round trip through the service.
    wss.send(tungstenite::Message::text(
        "REQ time\r\nReqID: w1\r\n\r\nnow?\r\n.\r\n",
    ))
    .unwrap();
    let req = svc.recv();
    assert_eq!(
        (req.cmd.as_str(), req.header("cid")),
        ("REQ", Some(wss_cid.as_str()))
    );
    let rid = req.header("rid").unwrap().to_owned();
    svc.send(&format!(
        "RES time\r\nrid: {rid}\r\n\r\n12:00\r\n..dot\r\n.\r\n"
    ));
    let res = parse_one(&next_data_any(&mut wss));
    assert_eq!(
        (res.cmd.as_str(), res.header("ReqID"), res.body.as_str()),
        ("RES", Some("w1"), "12:00\r\n.dot")
    );
    // Publish from unix: all three get it.
    svc.send("PUB news\r\nX: 1\r\n\r\nhello\r\n.\r\n");
    for m in [ws.recv(), parse_one(&next_data_any(&mut wss)), raw.recv()] {
        assert_eq!(
            (m.target.as_str(), m.body.as_str(), m.header("cid")),
            ("news", "hello", Some(svc.cid.as_str()))
        );
    }
    // And a request from raw tcp answered over unix.
    raw.send("REQ time\r\nReqID: r9\r\n\r\n\r\n.\r\n");
    let req = svc.recv();
    let rid = req.header("rid").unwrap().to_owned();
    svc.send(&format!("RES time\r\nrid: {rid}\r\n\r\nlater\r\n.\r\n"));
    let res = raw.recv();
    assert_eq!(
        (res.header("ReqID"), res.body.as_str()),
        (Some("r9"), "later")
    );
}

#[test]
fn bad_key_and_refused_roles() {
    let s = setup(|_| {});
    // Raw: a bad key gets one line and a close.
    let mut c = tcp(s.tcp);
    c.write_all(b"wrong\n").unwrap();
    let mut rest = String::new();
    c.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "MM ERR bad key\r\n");
    // A client key on a services-only listener.
    let mut c = tcp(s.tcp_services);
    c.write_all(format!("{CLIENT_KEY}\r\n").as_bytes()).unwrap();
    let mut rest = String::new();
    c.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "MM ERR role not allowed here\r\n");
    // A service key is fine there, and so is a monitor key.
    Raw::auth(tcp(s.tcp_services), SERVICE_KEY).sync();
    Raw::auth(tcp(s.tcp_services), MONITOR_KEY).sync();
    // WebSocket over TLS with a bad key: close 1008.
    let mut ws = wss_connect(s.wss, &[&s.ca_der]);
    ws.send(tungstenite::Message::text("nope")).unwrap();
    match ws.read().expect("close frame") {
        tungstenite::Message::Close(Some(f)) => {
            assert_eq!((u16::from(f.code), f.reason.as_str()), (1008, "bad key"))
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn raw_stream_split_at_every_byte_boundary() {
    let s = setup(|_| {});
    let mut svc = Raw::auth(unix(&s.unix), SERVICE_KEY);
    svc.send("SUB t\r\n.\r\n");
    svc.sync();
    let mut publisher = Raw::auth(tcp(s.tcp), SERVICE_KEY);
    let msg = "PUB t\r\nA: b\r\n\r\n..x\ny\r\n.\r\n";
    // k = len would send the whole message before the sync, which may then overtake
    // the sync's answer on svc; k = 0 already covers the whole message at once.
    for k in 0..msg.len() {
        publisher.send(&msg[..k]);
        publisher.s.flush().unwrap();
        // Give the first part its own segment: a round trip on another connection.
        svc.sync();
        publisher.send(&msg[k..]);
        let m = svc.recv();
        assert_eq!(
            (m.header("A"), m.body.as_str()),
            (Some("b"), ".x\ny"),
            "split at {k}"
        );
    }
    // Byte at a time, key line included.
    let mut c = tcp(s.tcp);
    for b in format!("{SERVICE_KEY}\r\n").bytes() {
        c.write_all(&[b]).unwrap();
    }
    assert_eq!(read_line(&mut c), "MM OK\r\n");
    let _cid = read_line(&mut c);
    for b in msg.bytes() {
        c.write_all(&[b]).unwrap();
    }
    let m = svc.recv();
    assert_eq!(m.body, ".x\ny");
}

#[test]
fn raw_limits_close_with_a_reason() {
    let s = setup(|c| c.limits.max_line = 64);
    let mut c = Raw::auth(tcp(s.tcp), SERVICE_KEY);
    c.send(&format!("PUB t\r\nX: {}\r\n", "y".repeat(100)));
    let m = c.recv();
    assert_eq!(
        (m.target.as_str(), m.header("cmd"), m.header("target")),
        ("ERROR", Some("CLOSE"), Some("1009"))
    );
    assert_eq!(m.header("reason"), Some("line too long"));
    let mut rest = Vec::new();
    let _ = c.s.read_to_end(&mut rest);
    assert!(rest.is_empty());
}

#[test]
fn tls_client_stalling_mid_handshake_is_timed_out() {
    let s = setup(|c| c.handshake_timeout = Duration::from_millis(300));
    let mut stalled = tcp(s.wss);
    // The first bytes of a ClientHello record, then nothing.
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .unwrap();
    let start = Instant::now();
    // Meanwhile others are served.
    let (_ws, _) = wss_peer(&s, CLIENT_KEY);
    Peer::client(s.ws).sync();
    let mut buf = [0u8; 64];
    let n = stalled.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "expected EOF");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // The listener list reflects what was asked.
    let bound: Vec<Listen> = s.server.listeners.clone();
    assert_eq!(bound.len(), 5);
}
