//! Shared harness for the integration tests: an in-process server on 127.0.0.1:0 and a
//! blocking WebSocket peer (tungstenite's client) with bounded read timeouts.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use middleman::broker::Keys;
use middleman::protocol::{Decoded, Decoder, Limits};
use middleman::transport::Listen;
use middleman::{Config, Running};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

pub const SERVICE_KEY: &str = "svc-9f3a1c7e-distinctive";
pub const CLIENT_KEY: &str = "cli-4b8d2e6f-distinctive";
pub const MONITOR_KEY: &str = "mon-7c1e5a9b-distinctive";

/// Longest any test waits for one expected event.
pub const WAIT: Duration = Duration::from_secs(5);

pub struct TestServer {
    pub addr: SocketAddr,
    running: Option<Running>,
}

pub fn config() -> Config {
    Config {
        listeners: vec![Listen::ws("127.0.0.1:0".parse().unwrap())],
        keys: Keys {
            service: vec![SERVICE_KEY.into()],
            client: vec![CLIENT_KEY.into()],
            monitor: vec![MONITOR_KEY.into()],
        },
        ..Config::default()
    }
}

impl TestServer {
    pub fn start() -> Self {
        Self::with(|_| {})
    }

    pub fn with(f: impl FnOnce(&mut Config)) -> Self {
        let mut cfg = config();
        f(&mut cfg);
        let running = Running::spawn(cfg).expect("server start");
        TestServer {
            addr: running.addr,
            running: Some(running),
        }
    }

    /// Every listener as bound (ports filled in).
    pub fn listeners(&self) -> &[Listen] {
        &self.running.as_ref().expect("running").listeners
    }

    pub fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    /// Stop gracefully and wait for the loop to end; returns what `run` returned.
    pub fn stop(mut self) -> std::io::Result<()> {
        self.running.take().unwrap().stop()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            let res = r.stop();
            if !std::thread::panicking() {
                res.expect("server run failed");
            }
        }
    }
}

/// One decoded message as received by a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub cmd: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Msg {
    /// An owned copy of a decoded message.
    pub fn of(m: &middleman::protocol::Message<'_>) -> Msg {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        Msg {
            cmd: text(m.cmd),
            target: text(m.target),
            headers: m.headers().map(|(n, v)| (text(n), text(v))).collect(),
            body: text(&m.body),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn headers_named(&self, name: &str) -> Vec<(&str, &str)> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect()
    }
}

pub struct Peer {
    pub ws: WebSocket<TcpStream>,
    pub cid: String,
}

/// Open a WebSocket to the server (no key sent yet).
pub fn ws_connect(addr: SocketAddr) -> WebSocket<TcpStream> {
    let sock = TcpStream::connect(addr).expect("connect");
    sock.set_read_timeout(Some(WAIT)).unwrap();
    sock.set_nodelay(true).unwrap();
    let (ws, _) = tungstenite::client::client(format!("ws://{addr}/"), sock).expect("upgrade");
    ws
}

impl Peer {
    /// Connect and authenticate; asserts `MM OK` and a cid of `[0-9a-z]`.
    pub fn connect(addr: SocketAddr, key: &str) -> Peer {
        let mut ws = ws_connect(addr);
        ws.send(Message::text(key)).unwrap();
        let ok = next_data(&mut ws).expect("MM OK");
        assert_eq!(ok, b"MM OK");
        let cid = String::from_utf8(next_data(&mut ws).expect("cid")).unwrap();
        assert!(
            !cid.is_empty()
                && cid
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "cid {cid:?}"
        );
        Peer { ws, cid }
    }
    pub fn service(addr: SocketAddr) -> Peer {
        Self::connect(addr, SERVICE_KEY)
    }
    pub fn client(addr: SocketAddr) -> Peer {
        Self::connect(addr, CLIENT_KEY)
    }
    pub fn monitor(addr: SocketAddr) -> Peer {
        Self::connect(addr, MONITOR_KEY)
    }

    /// Send raw protocol bytes as one text message.
    pub fn send_raw(&mut self, raw: &str) {
        self.ws.send(Message::text(raw)).unwrap();
    }

    /// Send one message: `CMD target`, headers, body.
    pub fn send(&mut self, cmd: &str, target: &str, headers: &[(&str, &str)], body: &str) {
        self.send_raw(&wire(cmd, target, headers, body));
    }

    /// Receive the next protocol message (exactly one per WebSocket message).
    pub fn recv(&mut self) -> Msg {
        let data = next_data(&mut self.ws).expect("expected a message");
        parse_one(&data)
    }

    /// A round trip through the server that proves everything sent before it was
    /// processed: publish on the private channel and wait for it.
    pub fn sync(&mut self) {
        let t = format!("MSG:{}", self.cid);
        let token = format!("sync-{}", Instant::now().elapsed().as_nanos());
        // Services may publish to MSG:*; clients cannot, so clients use an unknown
        // command, which always gets an error back.
        self.send("SYNC", &t, &[], &token);
        let m = self.recv();
        assert_eq!(m.cmd, "PUB", "sync: unexpected {m:?}");
        assert_eq!(m.target, "ERROR", "sync: unexpected {m:?}");
        assert_eq!(m.header("cmd"), Some("SYNC"), "sync: unexpected {m:?}");
    }

    /// Expect a close frame; returns (code, reason).
    pub fn recv_close(&mut self) -> (u16, String) {
        recv_close(&mut self.ws)
    }
}

pub fn recv_close(ws: &mut WebSocket<TcpStream>) -> (u16, String) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match ws.read() {
            Ok(Message::Close(Some(f))) => return (u16::from(f.code), f.reason.to_string()),
            Ok(Message::Close(None)) => return (u16::from(CloseCode::Status), String::new()),
            Ok(_) => continue,
            Err(e) => panic!("expected a close frame, got error {e}"),
        }
    }
    panic!("no close frame within {WAIT:?}");
}

/// Next text/binary payload, skipping pings/pongs.
pub fn next_data(ws: &mut WebSocket<TcpStream>) -> Result<Vec<u8>, String> {
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => return Ok(t.as_bytes().to_vec()),
            Ok(Message::Binary(b)) => return Ok(b.to_vec()),
            Ok(Message::Close(f)) => return Err(format!("closed: {f:?}")),
            Ok(_) => continue,
            Err(e) => return Err(format!("read error: {e}")),
        }
    }
}

/// Wire text of one message: CRLF, dot-stuffed body, LF inside the body kept as given.
pub fn wire(cmd: &str, target: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut s = format!("{cmd} {target}\r\n");
    for (n, v) in headers {
        s.push_str(&format!("{n}: {v}\r\n"));
    }
    s.push_str("\r\n");
    for (i, line) in body.split('\n').enumerate() {
        if i > 0 {
            s.push('\n');
        }
        if line.starts_with('.') {
            s.push('.');
        }
        s.push_str(line);
    }
    s.push_str("\r\n.\r\n");
    s
}

/// Parse exactly one protocol message from one WebSocket payload.
pub fn parse_one(data: &[u8]) -> Msg {
    let mut d = Decoder::new(Limits {
        max_message: 64 << 20,
        max_line: 64 << 20,
        max_headers: 100_000,
    });
    d.feed(data);
    let m = match d.next() {
        Ok(Some(Decoded::Message(m))) => Msg::of(&m),
        other => panic!(
            "not one message: {other:?} in {:?}",
            String::from_utf8_lossy(data)
        ),
    };
    assert!(
        !d.needs_more(),
        "trailing bytes after the message in one WebSocket message"
    );
    m
}

/// Send a raw HTTP request and read the whole response (the server closes after it).
pub fn http_get(addr: SocketAddr, raw: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into()
}

/// The next WebSocket message that is not a ping or pong.
pub fn next_msg(ws: &mut WebSocket<TcpStream>) -> Message {
    loop {
        match ws.read() {
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(m) => return m,
            Err(e) => panic!("read error: {e}"),
        }
    }
}

/// Expect the very next message to be a close frame; returns (code, reason).
pub fn expect_close_only(ws: &mut WebSocket<TcpStream>) -> (u16, String) {
    match next_msg(ws) {
        Message::Close(Some(f)) => (u16::from(f.code), f.reason.to_string()),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

/// After the close frame the server hangs up.
pub fn expect_hangup(ws: &mut WebSocket<TcpStream>) {
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "server did not hang up");
        match ws.read() {
            Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_)) => continue,
            Ok(m) => panic!("data after the close frame: {m:?}"),
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => return,
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof | ErrorKind::BrokenPipe
                ) =>
            {
                return
            }
            Err(e) => panic!("expected the server to hang up, got {e}"),
        }
    }
}

/// A fresh directory under target/ for one test's files.
pub fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// GET /metrics, as a map from `name{labels}` to value.
pub fn metrics(addr: SocketAddr) -> HashMap<String, f64> {
    let resp = http_get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// Make the kernel answer the peer with RST on close (SO_LINGER 0).
pub fn set_linger_reset(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a correctly sized `linger`.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt SO_LINGER");
}

pub mod cluster;
pub mod nats;
pub mod proc;
pub mod v11;

/// A WebSocket over TLS as the tests open it.
pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A wss connection to `addr` (not logged in) trusting only the certificates `trusted`
/// (DER) for the name `localhost`, reads bounded by [`WAIT`].
pub fn wss_connect(addr: SocketAddr, trusted: &[&[u8]]) -> WebSocket<TlsStream> {
    use std::sync::Arc;
    let mut roots = rustls::RootCertStore::empty();
    for der in trusted {
        roots
            .add(rustls::pki_types::CertificateDer::from(der.to_vec()))
            .unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    sock.set_nodelay(true).unwrap();
    let (ws, _) = tungstenite::client::client(
        format!("wss://localhost:{}/", addr.port()),
        rustls::StreamOwned::new(conn, sock),
    )
    .expect("wss upgrade");
    ws
}
