//! A minimal, allocation-light WebSocket client for the load tool: an HTTP upgrade,
//! unmasked server frames parsed in place from a reused read buffer, client frames with
//! an all-zero mask (valid RFC 6455 framing that costs no XOR), and the two protocols
//! spoken over it (middleman and NATS) turned into one [`Ev`] type.
//!
//! With a `tcp://` URL the same connection speaks middleman's raw stream protocol
//! (README.md): the key as one line, `MM OK` and the cid as lines, then protocol
//! messages back to back, split at their terminator line `.` (bodies are dot-stuffed,
//! so a line that is exactly `.` only ever ends a message).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

pub use crate::protocol::encode::push_dec;

/// Which server the tool talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Proto {
    /// The middleman protocol (PROTOCOL.md).
    Mm,
    /// The NATS client protocol through nats-server's WebSocket listener.
    Nats,
}

/// A parsed `ws://host:port/path` or `tcp://host:port`.
#[derive(Debug, Clone)]
pub struct Url {
    /// Resolved address.
    pub addr: SocketAddr,
    /// `tcp://`: the raw stream protocol, no WebSocket.
    pub raw: bool,
    /// `host:port` as written (for the Host header).
    pub host: String,
    /// Request path (`/` when none).
    pub path: String,
}

impl Url {
    /// Parse and resolve a `ws://` or `tcp://` URL.
    pub fn parse(s: &str) -> Result<Url, String> {
        let (raw, rest) = if let Some(r) = s.strip_prefix("ws://") {
            (false, r)
        } else if let Some(r) = s.strip_prefix("tcp://") {
            (true, r)
        } else {
            return Err(format!("url {s:?}: only ws:// and tcp:// are supported"));
        };
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let addr = host
            .to_socket_addrs()
            .map_err(|e| format!("url {s:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("url {s:?}: no address"))?;
        Ok(Url {
            addr,
            raw,
            host: host.to_owned(),
            path: path.to_owned(),
        })
    }
}

/// One thing received.
#[derive(Debug)]
pub enum Ev<'a> {
    /// A routed message. middleman: `cmd` is PUB/REQ/RES, `reply` is the `rid` header,
    /// `reqid` the `ReqID` header. NATS: `cmd` is `MSG`, `reply` the reply subject.
    Msg {
        /// Command (`PUB`, `REQ`, `RES`, `MSG`).
        cmd: &'a [u8],
        /// Topic or subject.
        subject: &'a [u8],
        /// middleman `rid` / NATS reply subject (empty if none).
        reply: &'a [u8],
        /// middleman `ReqID` (empty if none).
        reqid: &'a [u8],
        /// The body / payload.
        body: &'a [u8],
    },
    /// A middleman data message that is not a protocol message (`MM OK`, the cid).
    Raw(&'a [u8]),
    /// NATS `PONG`.
    Pong,
    /// NATS `INFO`, `+OK`, `PING` (already answered) and anything else harmless.
    Other,
    /// NATS `-ERR` (text) or a middleman close frame (code and reason).
    Error(&'a [u8]),
}

/// Fixed `Sec-WebSocket-Key` (the RFC 6455 sample); the tool is not a browser.
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// Expected `Sec-WebSocket-Accept` for [`WS_KEY`].
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// A WebSocket client connection with reused buffers.
pub struct WsConn {
    /// The socket (blocking during set-up, non-blocking in worker loops).
    pub sock: TcpStream,
    /// Which protocol it speaks.
    pub proto: Proto,
    /// The raw stream protocol (`tcp://`): no WebSocket framing either way.
    pub raw: bool,
    /// Raw stream: bytes after `rstart` already scanned without finding a terminator.
    scanned: usize,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    /// Fragments of a data message not yet complete.
    frag: Vec<u8>,
    /// NATS: protocol bytes received and not yet parsed.
    nstream: Vec<u8>,
    /// Encoded frames waiting to be written.
    pub wbuf: Vec<u8>,
    wpos: usize,
    scratch: Vec<u8>,
    /// The middleman cid (empty for NATS).
    pub cid: String,
    /// The peer closed (or sent a close frame).
    pub closed: bool,
}

const RBUF: usize = 64 << 10;

impl WsConn {
    /// Connect, upgrade and authenticate (middleman: the key, `MM OK`, the cid; NATS:
    /// `INFO`, `CONNECT`, `PING`/`PONG`), blocking, within `timeout`.
    pub fn connect(url: &Url, proto: Proto, key: &str, timeout: Duration) -> io::Result<WsConn> {
        if url.raw && proto != Proto::Mm {
            return Err(io::Error::other("tcp:// is for --proto mm only"));
        }
        let deadline = Instant::now() + timeout;
        let sock = TcpStream::connect_timeout(&url.addr, timeout)?;
        sock.set_nodelay(true)?;
        let mut c = WsConn {
            sock,
            proto,
            raw: url.raw,
            scanned: 0,
            rbuf: vec![0; RBUF],
            rstart: 0,
            rend: 0,
            frag: Vec::new(),
            nstream: Vec::new(),
            wbuf: Vec::with_capacity(4096),
            wpos: 0,
            scratch: Vec::with_capacity(256),
            cid: String::new(),
            closed: false,
        };
        if url.raw {
            c.raw_auth(key, deadline)?;
            return Ok(c);
        }
        c.handshake(url, deadline)?;
        match proto {
            Proto::Mm => {
                c.send_frame(0x1, key.as_bytes());
                c.flush_blocking()?;
                let mut got = c.recv_raws(2, deadline)?.into_iter();
                let ok = got.next().unwrap_or_default();
                if ok != b"MM OK" {
                    return Err(io::Error::other(format!(
                        "key refused: {:?}",
                        String::from_utf8_lossy(&ok)
                    )));
                }
                let cid = got.next().unwrap_or_default();
                c.cid = String::from_utf8_lossy(&cid).into_owned();
            }
            Proto::Nats => {
                c.send_text(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n");
                c.sync_start();
                c.flush_blocking()?;
                c.sync_wait(deadline)?;
            }
        }
        Ok(c)
    }

    fn handshake(&mut self, url: &Url, deadline: Instant) -> io::Result<()> {
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n",
            url.path, url.host
        );
        self.sock.write_all(req.as_bytes())?;
        loop {
            if let Some(end) = memchr::memmem::find(&self.rbuf[..self.rend], b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.rbuf[..end]).to_ascii_lowercase();
                if !head.starts_with("http/1.1 101") || !head.contains(&WS_ACCEPT.to_lowercase()) {
                    let first = head.lines().next().unwrap_or("").to_owned();
                    return Err(io::Error::other(format!("upgrade refused: {first}")));
                }
                self.rstart = end + 4;
                return Ok(());
            }
            if self.rend == self.rbuf.len() {
                return Err(io::Error::other("upgrade response too long"));
            }
            self.read_some_blocking(deadline)?;
        }
    }

    /// Raw stream: send the key line, read `MM OK` and the cid (or `MM ERR ...`).
    fn raw_auth(&mut self, key: &str, deadline: Instant) -> io::Result<()> {
        self.wbuf.extend_from_slice(key.as_bytes());
        self.wbuf.extend_from_slice(b"\r\n");
        self.flush_blocking()?;
        let mut lines: Vec<Vec<u8>> = Vec::with_capacity(2);
        while lines.len() < 2 {
            if let Some(e) = memchr::memchr(b'\n', &self.rbuf[self.rstart..self.rend]) {
                let line = trim_cr(&self.rbuf[self.rstart..self.rstart + e]).to_vec();
                self.rstart += e + 1;
                if lines.is_empty() && line != b"MM OK" {
                    return Err(io::Error::other(format!(
                        "key refused: {:?}",
                        String::from_utf8_lossy(&line)
                    )));
                }
                lines.push(line);
                continue;
            }
            if self.rend - self.rstart > 4096 {
                return Err(io::Error::other("handshake line too long"));
            }
            self.read_some_blocking(deadline)?;
        }
        self.cid = String::from_utf8_lossy(&lines[1]).into_owned();
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        }
        Ok(())
    }

    fn read_some_blocking(&mut self, deadline: Instant) -> io::Result<usize> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.sock.set_read_timeout(Some(left))?;
        self.make_room();
        let n = self.sock.read(&mut self.rbuf[self.rend..])?;
        if n == 0 {
            self.closed = true;
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.rend += n;
        Ok(n)
    }

    /// Compact or grow the read buffer so there is room to read into.
    fn make_room(&mut self) {
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        } else if self.rend == self.rbuf.len() {
            if self.rstart > 0 {
                self.rbuf.copy_within(self.rstart..self.rend, 0);
                self.rend -= self.rstart;
                self.rstart = 0;
            } else {
                let n = self.rbuf.len() * 2;
                self.rbuf.resize(n, 0);
            }
        }
    }

    /// Read once without blocking (socket must be non-blocking). `Ok(0)`: nothing now.
    pub fn read_nonblocking(&mut self) -> io::Result<usize> {
        self.make_room();
        match self.sock.read(&mut self.rbuf[self.rend..]) {
            Ok(0) => {
                self.closed = true;
                Err(io::ErrorKind::UnexpectedEof.into())
            }
            Ok(n) => {
                self.rend += n;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Receive `n` middleman non-protocol payloads (`MM OK`, cid) during set-up.
    fn recv_raws(&mut self, n: usize, deadline: Instant) -> io::Result<Vec<Vec<u8>>> {
        let mut got = Vec::new();
        loop {
            let mut err: Option<String> = None;
            self.drain(|ev, _| match ev {
                Ev::Raw(p) => got.push(p.to_vec()),
                Ev::Error(e) if err.is_none() => err = Some(String::from_utf8_lossy(e).into()),
                _ => {}
            })?;
            if let Some(e) = err {
                return Err(io::Error::other(e));
            }
            if got.len() >= n {
                return Ok(got);
            }
            self.read_some_blocking(deadline)?;
        }
    }

    /// Queue what makes the server prove it processed everything sent before:
    /// middleman: a PUB to our own private channel; NATS: `PING`.
    pub fn sync_start(&mut self) {
        match self.proto {
            Proto::Mm => {
                let t = format!("MSG:{}", self.cid);
                self.send_mm(b"PUB", t.as_bytes(), &[], b"sync");
            }
            Proto::Nats => self.send_text(b"PING\r\n"),
        }
    }

    /// Wait (blocking) for the answer to [`WsConn::sync_start`]; anything else
    /// received meanwhile is ignored.
    pub fn sync_wait(&mut self, deadline: Instant) -> io::Result<()> {
        let private = format!("MSG:{}", self.cid);
        loop {
            let mut done = false;
            let mut err = None;
            self.drain(|ev, _| match ev {
                Ev::Pong => done = true,
                Ev::Msg { subject, body, .. }
                    if subject == private.as_bytes() && body == b"sync" =>
                {
                    done = true
                }
                Ev::Error(e) => err = Some(String::from_utf8_lossy(e).into_owned()),
                _ => {}
            })?;
            if let Some(e) = err {
                return Err(io::Error::other(e));
            }
            if done {
                return Ok(());
            }
            self.flush_blocking()?;
            self.read_some_blocking(deadline)?;
        }
    }

    /// Parse every complete frame in the read buffer and hand each event to `f`, with
    /// this connection's write buffer for answers.
    pub fn drain(&mut self, mut f: impl FnMut(Ev<'_>, &mut Vec<u8>)) -> io::Result<()> {
        if self.raw {
            self.drain_raw(&mut f);
            return Ok(());
        }
        loop {
            let buf = &self.rbuf[self.rstart..self.rend];
            let Some((op, fin, hlen, plen)) = parse_frame_header(buf)? else {
                break;
            };
            let total = hlen + plen;
            if buf.len() < total {
                if total > self.rbuf.len() {
                    // A frame larger than the buffer: grow so it fits.
                    let need = total + RBUF;
                    self.rbuf.copy_within(self.rstart..self.rend, 0);
                    self.rend -= self.rstart;
                    self.rstart = 0;
                    self.rbuf.resize(need, 0);
                }
                break;
            }
            let p0 = self.rstart + hlen;
            self.rstart += total;
            match op {
                0x0..=0x2 => {
                    if !fin || !self.frag.is_empty() {
                        self.frag.extend_from_slice(&self.rbuf[p0..p0 + plen]);
                        if !fin {
                            continue;
                        }
                        let whole = std::mem::take(&mut self.frag);
                        self.on_payload(&whole, &mut f);
                        self.frag = whole;
                        self.frag.clear();
                    } else {
                        // Split borrows: the payload lives in rbuf, answers go to wbuf.
                        let payload = &self.rbuf[p0..p0 + plen];
                        match self.proto {
                            Proto::Mm => f(parse_mm(payload), &mut self.wbuf),
                            Proto::Nats => {
                                self.nstream.extend_from_slice(payload);
                                nats_events(&mut self.nstream, &mut self.wbuf, &mut f)?;
                            }
                        }
                    }
                }
                0x8 => {
                    self.closed = true;
                    let p = &self.rbuf[p0..p0 + plen];
                    f(Ev::Error(p.get(2..).unwrap_or(b"close")), &mut self.wbuf);
                }
                0x9 => {
                    let p = self.rbuf[p0..p0 + plen].to_vec();
                    push_frame(&mut self.wbuf, 0xA, &p);
                }
                _ => {}
            }
        }
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        }
        Ok(())
    }

    /// Raw stream: hand every complete message in the read buffer to `f`.
    fn drain_raw(&mut self, f: &mut impl FnMut(Ev<'_>, &mut Vec<u8>)) {
        loop {
            let buf = &self.rbuf[self.rstart..self.rend];
            let Some(end) = raw_message_end(buf, &mut self.scanned) else {
                break;
            };
            f(parse_mm(&buf[..end]), &mut self.wbuf);
            self.rstart += end;
            self.scanned = 0;
        }
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        }
    }

    fn on_payload(&mut self, payload: &[u8], f: &mut impl FnMut(Ev<'_>, &mut Vec<u8>)) {
        match self.proto {
            Proto::Mm => f(parse_mm(payload), &mut self.wbuf),
            Proto::Nats => {
                self.nstream.extend_from_slice(payload);
                let _ = nats_events(&mut self.nstream, &mut self.wbuf, f);
            }
        }
    }

    /// Queue one text frame (raw stream: the bytes as they are).
    pub fn send_text(&mut self, payload: &[u8]) {
        push_msg(&mut self.wbuf, self.raw, payload);
    }

    fn send_frame(&mut self, op: u8, payload: &[u8]) {
        push_frame(&mut self.wbuf, op, payload);
    }

    /// Queue one middleman message (one frame; raw stream: no framing).
    pub fn send_mm(&mut self, cmd: &[u8], target: &[u8], headers: &[(&[u8], &[u8])], body: &[u8]) {
        if self.raw {
            encode_mm(&mut self.wbuf, cmd, target, headers, body);
            return;
        }
        self.scratch.clear();
        encode_mm(&mut self.scratch, cmd, target, headers, body);
        push_frame(&mut self.wbuf, 0x1, &self.scratch);
    }

    /// Subscribe to `subject` (NATS: with `sid`, in queue group `queue` if given;
    /// middleman: `SUB`, or `EREQ` when `queue` is given, i.e. become a responder).
    pub fn subscribe(&mut self, subject: &str, queue: Option<&str>, sid: u64) {
        match (self.proto, queue) {
            (Proto::Mm, None) => self.send_mm(b"SUB", subject.as_bytes(), &[], b""),
            (Proto::Mm, Some(_)) => self.send_mm(b"EREQ", subject.as_bytes(), &[], b""),
            (Proto::Nats, None) => self.send_text(format!("SUB {subject} {sid}\r\n").as_bytes()),
            (Proto::Nats, Some(q)) => {
                self.send_text(format!("SUB {subject} {q} {sid}\r\n").as_bytes())
            }
        }
    }

    /// Write everything queued, blocking.
    pub fn flush_blocking(&mut self) -> io::Result<()> {
        if self.wpos < self.wbuf.len() {
            self.sock.write_all(&self.wbuf[self.wpos..])?;
        }
        self.wbuf.clear();
        self.wpos = 0;
        Ok(())
    }

    /// Write what the socket takes now (non-blocking socket). True when all is written.
    pub fn flush_nonblocking(&mut self) -> io::Result<bool> {
        while self.wpos < self.wbuf.len() {
            match self.sock.write(&self.wbuf[self.wpos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.wbuf.clear();
        self.wpos = 0;
        Ok(true)
    }
}

/// Parse a server frame header: `(opcode, fin, header length, payload length)`, or
/// `None` when more bytes are needed.
fn parse_frame_header(b: &[u8]) -> io::Result<Option<(u8, bool, usize, usize)>> {
    if b.len() < 2 {
        return Ok(None);
    }
    let fin = b[0] & 0x80 != 0;
    let op = b[0] & 0x0f;
    if b[1] & 0x80 != 0 {
        return Err(io::Error::other("server sent a masked frame"));
    }
    let (hlen, plen) = match b[1] & 0x7f {
        126 => {
            let Some(x) = b.get(2..4) else {
                return Ok(None);
            };
            (4, u16::from_be_bytes([x[0], x[1]]) as usize)
        }
        127 => {
            let Some(x) = b.get(2..10) else {
                return Ok(None);
            };
            let mut a = [0u8; 8];
            a.copy_from_slice(x);
            let n = u64::from_be_bytes(a);
            if n > (1 << 30) {
                return Err(io::Error::other("frame too large"));
            }
            (10, n as usize)
        }
        n => (2, n as usize),
    };
    Ok(Some((op, fin, hlen, plen)))
}

/// Append one outgoing unit: a text frame, or on a raw stream the bytes as they are
/// (protocol messages carry their own terminator).
pub fn push_msg(w: &mut Vec<u8>, raw: bool, payload: &[u8]) {
    if raw {
        w.extend_from_slice(payload);
    } else {
        push_frame(w, 0x1, payload);
    }
}

/// Raw stream: the length of the first complete message in `b` (through its terminator
/// line), or `None` when it is not complete yet. `scanned` is how far earlier calls got
/// (a line start); it is advanced so bytes are not scanned twice.
fn raw_message_end(b: &[u8], scanned: &mut usize) -> Option<usize> {
    // Every message starts at a line start, and its first line is never ".", so the
    // terminator is the first "\n." followed by "\r\n" or "\n". '.' is rare in
    // bodies, so a substring search skips them faster than walking line by line.
    let mut at = (*scanned).min(b.len());
    while let Some(i) = memchr::memmem::find(&b[at..], b"\n.") {
        let dot = at + i + 1;
        match &b[dot + 1..] {
            [b'\n', ..] => return Some(dot + 2),
            [b'\r', b'\n', ..] => return Some(dot + 3),
            // Possibly a terminator not fully received yet: look again later.
            [b'\r'] | [] => {
                *scanned = at + i;
                return None;
            }
            _ => at = dot,
        }
    }
    // A trailing '\n' may be followed by the '.' still to come.
    *scanned = b.len().saturating_sub(1).max(at);
    None
}

/// Append one client frame (FIN, masked with an all-zero key, so the payload is as is).
pub fn push_frame(w: &mut Vec<u8>, op: u8, payload: &[u8]) {
    w.push(0x80 | op);
    let n = payload.len();
    if n < 126 {
        w.push(0x80 | n as u8);
    } else if n <= u16::MAX as usize {
        w.push(0x80 | 126);
        w.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        w.push(0x80 | 127);
        w.extend_from_slice(&(n as u64).to_be_bytes());
    }
    w.extend_from_slice(&[0, 0, 0, 0]);
    w.extend_from_slice(payload);
}

/// Encode one middleman message (bodies from the tool never start a line with `.`).
pub fn encode_mm(
    out: &mut Vec<u8>,
    cmd: &[u8],
    target: &[u8],
    headers: &[(&[u8], &[u8])],
    body: &[u8],
) {
    out.extend_from_slice(cmd);
    out.push(b' ');
    out.extend_from_slice(target);
    out.extend_from_slice(b"\r\n");
    for (n, v) in headers {
        out.extend_from_slice(n);
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out.extend_from_slice(b"\r\n.\r\n");
}

/// Encode one NATS `PUB subject [reply] n` with its payload.
pub fn encode_nats_pub(out: &mut Vec<u8>, subject: &[u8], reply: &[u8], body: &[u8]) {
    out.extend_from_slice(b"PUB ");
    out.extend_from_slice(subject);
    out.push(b' ');
    if !reply.is_empty() {
        out.extend_from_slice(reply);
        out.push(b' ');
    }
    push_dec(out, body.len() as u64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out.extend_from_slice(b"\r\n");
}

/// One middleman data message: a protocol message (first line, headers, blank line,
/// body, `.` line) or a raw payload.
fn parse_mm(p: &[u8]) -> Ev<'_> {
    let Some(eol) = memchr::memchr(b'\n', p) else {
        return Ev::Raw(p);
    };
    let first = trim_cr(&p[..eol]);
    let Some(sp) = memchr::memchr(b' ', first) else {
        return Ev::Raw(p);
    };
    let (cmd, subject) = (&first[..sp], &first[sp + 1..]);
    let mut reply: &[u8] = b"";
    let mut reqid: &[u8] = b"";
    let mut at = eol + 1;
    loop {
        let Some(e) = memchr::memchr(b'\n', &p[at..]) else {
            return Ev::Raw(p);
        };
        let line = trim_cr(&p[at..at + e]);
        at += e + 1;
        if line.is_empty() {
            break;
        }
        if let Some(c) = memchr::memchr(b':', line) {
            let (n, v) = (&line[..c], line[c + 1..].trim_ascii());
            if n.eq_ignore_ascii_case(b"rid") {
                reply = v;
            } else if n.eq_ignore_ascii_case(b"reqid") {
                reqid = v;
            }
        }
    }
    // The body ends before CRLF "." CRLF.
    let end = p.len().saturating_sub(5).max(at);
    Ev::Msg {
        cmd,
        subject,
        reply,
        reqid,
        body: &p[at..end],
    }
}

fn trim_cr(l: &[u8]) -> &[u8] {
    l.strip_suffix(b"\r").unwrap_or(l)
}

/// Parse every complete NATS operation in `s`, answer `PING`, drop what was parsed.
fn nats_events(
    s: &mut Vec<u8>,
    w: &mut Vec<u8>,
    f: &mut impl FnMut(Ev<'_>, &mut Vec<u8>),
) -> io::Result<()> {
    let mut at = 0;
    while let Some(e) = memchr::memchr(b'\n', &s[at..]) {
        let line = trim_cr(&s[at..at + e]);
        let after = at + e + 1;
        if let Some(args) = line.strip_prefix(b"MSG ") {
            // MSG subject sid [reply] n
            let mut parts = args.split(|&b| b == b' ').filter(|x| !x.is_empty());
            let subject = parts.next().unwrap_or(b"");
            let _sid = parts.next();
            let a = parts.next().unwrap_or(b"");
            let (reply, n) = match parts.next() {
                Some(n) => (a, n),
                None => (&b""[..], a),
            };
            let n = parse_dec(n).ok_or_else(|| io::Error::other("bad MSG size"))? as usize;
            if s.len() < after + n + 2 {
                break; // payload not complete yet
            }
            f(
                Ev::Msg {
                    cmd: b"MSG",
                    subject,
                    reply,
                    reqid: b"",
                    body: &s[after..after + n],
                },
                w,
            );
            at = after + n + 2;
            continue;
        }
        if line == b"PING" {
            push_frame(w, 0x1, b"PONG\r\n");
            f(Ev::Other, w);
        } else if line == b"PONG" {
            f(Ev::Pong, w);
        } else if line.starts_with(b"-ERR") {
            f(Ev::Error(line), w);
        } else {
            f(Ev::Other, w);
        }
        at = after;
    }
    s.drain(..at);
    Ok(())
}

/// Parse a decimal number.
pub fn parse_dec(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 19 {
        return None;
    }
    let mut n = 0u64;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n * 10 + (c - b'0') as u64;
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::raw_message_end;

    /// Split a stream into messages, feeding it `step` bytes at a time.
    fn split(stream: &[u8], step: usize) -> Vec<Vec<u8>> {
        let (mut out, mut start, mut scanned) = (Vec::new(), 0, 0);
        let mut end = 0;
        while end < stream.len() {
            end = (end + step).min(stream.len());
            while let Some(n) = raw_message_end(&stream[start..end], &mut scanned) {
                out.push(stream[start..start + n].to_vec());
                start += n;
                scanned = 0;
            }
        }
        assert_eq!(start, stream.len(), "left over");
        out
    }

    #[test]
    fn raw_stream_splits_at_the_terminator_line_only() {
        let a = b"PUB t\r\ncid: x\r\n\r\nx\r\n..\r\n.x\r\n...\r\n.\r\n".to_vec();
        let b = b"SUB t\n.\n".to_vec();
        let c = b"PUB t\r\n\r\n.\r\n".to_vec();
        let stream = [a.clone(), b.clone(), c.clone()].concat();
        for step in 1..stream.len() + 1 {
            assert_eq!(split(&stream, step), vec![a.clone(), b.clone(), c.clone()]);
        }
    }
}
