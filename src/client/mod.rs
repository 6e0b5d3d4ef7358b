//! A blocking client for middleman servers, on tungstenite's client side (`ws://` only).
//!
//! [`Client`] is one authenticated connection: publish, subscribe, make requests and
//! receive messages. [`Service`] wraps a client into a responder loop. Everything is
//! blocking and single-threaded; a [`Closer`] ends a connection from another thread.
//!
//! Requests are matched to their answers by `ReqID`: [`Client::request`] returns the `RES`
//! or the server's error for that request as [`Error::Server`]. Messages that arrive while
//! a call waits for its answer are kept, in order, for [`Client::recv`].
//!
//! ```
//! # use middleman::{broker::Keys, Config, Running};
//! # let server = Running::spawn(Config {
//! #     listeners: vec!["ws://127.0.0.1:0".parse()?],
//! #     keys: Keys { service: vec!["svc-key".into()], client: vec!["cli-key".into()], monitor: vec![] },
//! #     ..Config::default()
//! # })?;
//! # let url = format!("ws://{}/", server.addr);
//! use middleman::client::Client;
//!
//! let mut news = Client::connect(&url, "svc-key")?;
//! news.enable_subscribe("news")?; // let clients (untrusted keys) subscribe to "news"
//!
//! let mut reader = Client::connect(&url, "cli-key")?;
//! reader.subscribe("news")?; // returns once the server has taken the subscription
//!
//! news.publish("news", &[("Lang", "en")], "hello")?;
//! let msg = reader.recv()?;
//! assert_eq!((msg.target.as_str(), msg.body_text().as_ref()), ("news", "hello"));
//! assert_eq!(msg.header("lang"), Some("en"));
//! assert_eq!(msg.cid(), Some(news.cid())); // set by the server, cannot be forged
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Services also use protocol 1.1 (PROTOCOL.md §9): [`Client::grant`] / [`Client::revoke`]
//! a [`Right`] for one connection, [`Client::disable`] their own enablements,
//! [`Client::subscribe_for`], [`Client::kick`], [`Client::presence`] and
//! [`Client::events`] (read with [`Message::event`]).
//!
//! ```
//! # use middleman::{broker::Keys, Config, Running};
//! # let server = Running::spawn(Config {
//! #     listeners: vec!["ws://127.0.0.1:0".parse()?],
//! #     keys: Keys { service: vec!["svc-key".into()], client: vec!["cli-key".into()], monitor: vec![] },
//! #     ..Config::default()
//! # })?;
//! # let url = format!("ws://{}/", server.addr);
//! use middleman::client::{Client, Error, EventKind, Right};
//!
//! let mut svc = Client::connect(&url, "svc-key")?;
//! svc.events(&[EventKind::Disconnect])?;
//! let mut ann = Client::connect(&url, "cli-key")?;
//! let cid = ann.cid().to_owned();
//!
//! svc.grant(&cid, "room.42", Right::Sub)?; // ann alone may subscribe to room.42
//! ann.subscribe("room.42")?;
//! let p = svc.presence("room.42", 100)?;
//! assert_eq!((p.count, p.members[0].cid.as_str()), (1, cid.as_str()));
//!
//! svc.kick(&cid, Some("bye"))?;
//! assert!(matches!(ann.recv(), Err(Error::Closed { code: 4000, .. })));
//! let ev = svc.recv()?.event().expect("an event");
//! assert_eq!((ev.kind, ev.reason.as_deref()), (EventKind::Disconnect, Some("kicked")));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod cli;
mod system;

pub use system::{Event, EventKind, Member, Presence, Right, KICK_CODE, PRESENCE_MAX};

use std::borrow::Cow;
use std::collections::{HashSet, VecDeque};
use std::io;
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tungstenite::handshake::HandshakeError;
use tungstenite::{Message as WsMessage, WebSocket};

use crate::protocol::decode::MAX_TARGET;
use crate::protocol::{encode_into, Decoded, Decoder, Limits};

/// Time allowed for the TCP connection, the WebSocket upgrade and the key exchange.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the server to confirm a command ([`Client::sync`]).
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// What can go wrong. [`Error::exit_code`] maps each kind to the command-line client's
/// exit codes.
#[derive(Debug)]
pub enum Error {
    /// The URL is not `ws://host[:port][/path]`.
    Url(String),
    /// An argument the protocol cannot carry (a target or header with a line break, ...).
    Invalid(String),
    /// The TCP connection could not be made.
    Connect(io::Error),
    /// The WebSocket upgrade or the key exchange failed (HTTP error, not a middleman).
    Handshake(String),
    /// The server refused the key (close 1008 `bad key`).
    BadKey,
    /// The connection is closed: by the server (its close code and reason), by the peer
    /// vanishing (code 1006), or by this side ([`Client::close`], a [`Closer`]).
    Closed {
        /// WebSocket close code (1006 when there was no close frame).
        code: u16,
        /// The close reason.
        reason: String,
    },
    /// A socket error on an established connection.
    Io(io::Error),
    /// The server sent something that is not a middleman message.
    Protocol(String),
    /// The server answered with an error (`PUB ERROR`) for this call.
    Server(ServerError),
    /// No answer within the time given.
    Timeout,
}

impl Error {
    /// The exit code the command-line client uses for this error: 1 the server refused or
    /// failed the request, 2 bad arguments, 3 connection or authentication failure,
    /// 4 timeout (also when the server reports `request timed out`).
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Server(e) if e.reason == "request timed out" => 4,
            Error::Server(_) => 1,
            Error::Url(_) | Error::Invalid(_) => 2,
            Error::Connect(_)
            | Error::Handshake(_)
            | Error::BadKey
            | Error::Closed { .. }
            | Error::Io(_)
            | Error::Protocol(_) => 3,
            Error::Timeout => 4,
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Url(s) => write!(f, "bad URL: {s}"),
            Error::Invalid(s) => write!(f, "invalid argument: {s}"),
            Error::Connect(e) => write!(f, "cannot connect: {e}"),
            Error::Handshake(s) => write!(f, "handshake failed: {s}"),
            Error::BadKey => f.write_str("the server refused the key"),
            Error::Closed { code, reason } if reason.is_empty() => {
                write!(f, "connection closed ({code})")
            }
            Error::Closed { code, reason } => write!(f, "connection closed ({code} {reason})"),
            Error::Io(e) => write!(f, "connection failed: {e}"),
            Error::Protocol(s) => write!(f, "protocol error from server: {s}"),
            Error::Server(e) => e.fmt(f),
            Error::Timeout => f.write_str("timed out"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Connect(e) | Error::Io(e) => Some(e),
            Error::Server(e) => Some(e),
            _ => None,
        }
    }
}

/// The result of client calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error the server reported with `PUB ERROR` (PROTOCOL.md §7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// Why, e.g. `not permitted`, `no responder`, `request timed out`.
    pub reason: String,
    /// The command that failed.
    pub cmd: String,
    /// Its target.
    pub target: String,
    /// The `ReqID` of the failed request, if it was one.
    pub reqid: Option<String>,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} {}", self.reason, self.cmd, self.target)
    }
}

impl std::error::Error for ServerError {}

/// One message received from the server. Text fields are converted from UTF-8 (invalid
/// sequences become U+FFFD); the body is kept as bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `PUB`, `REQ`, `RES`, ...
    pub cmd: String,
    /// The topic or request name.
    pub target: String,
    /// Every header in order, names as sent.
    pub headers: Vec<(String, String)>,
    /// The body, unstuffed.
    pub body: Vec<u8>,
}

impl Message {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The sender's connection id (set by the server).
    pub fn cid(&self) -> Option<&str> {
        self.header("cid")
    }

    /// The sender's user id (set by the server; empty when none was assigned).
    pub fn uid(&self) -> Option<&str> {
        self.header("uid")
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn body_text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.body)
    }

    /// The server error this message carries, if it is a `PUB ERROR`.
    pub fn error(&self) -> Option<ServerError> {
        if self.cmd != "PUB" || self.target != "ERROR" {
            return None;
        }
        Some(ServerError {
            reason: self.header("reason").unwrap_or_default().to_owned(),
            cmd: self.header("cmd").unwrap_or_default().to_owned(),
            target: self.header("target").unwrap_or_default().to_owned(),
            reqid: self.header("ReqID").map(str::to_owned),
        })
    }
}

/// What a responder sends back for one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reply {
    /// Headers of the `RES` (the client adds `rid`).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Reply {
    /// A reply with this body and no headers.
    pub fn new(body: impl Into<Vec<u8>>) -> Reply {
        Reply {
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// Add a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }
}

impl From<&str> for Reply {
    fn from(s: &str) -> Reply {
        Reply::new(s)
    }
}

impl From<String> for Reply {
    fn from(s: String) -> Reply {
        Reply::new(s)
    }
}

impl From<Vec<u8>> for Reply {
    fn from(b: Vec<u8>) -> Reply {
        Reply::new(b)
    }
}

impl From<&[u8]> for Reply {
    fn from(b: &[u8]) -> Reply {
        Reply::new(b)
    }
}

/// Ends a [`Client`]'s connection from any thread: a call blocked in it returns
/// [`Error::Closed`] (and [`Service::respond`] returns `Ok`).
#[derive(Debug, Clone)]
pub struct Closer {
    sock: Arc<TcpStream>,
    flag: Arc<AtomicBool>,
}

impl Closer {
    /// Shut the socket down (no close handshake).
    pub fn close(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = self.sock.shutdown(Shutdown::Both);
    }
}

enum Incoming {
    Msg(Message),
    Pong(Vec<u8>),
}

/// One authenticated connection to a middleman server.
///
/// ```
/// # use middleman::{broker::Keys, Config, Running};
/// # let server = Running::spawn(Config {
/// #     listeners: vec!["ws://127.0.0.1:0".parse()?],
/// #     keys: Keys { service: vec!["svc-key".into()], client: vec![], monitor: vec![] },
/// #     ..Config::default()
/// # })?;
/// # let url = format!("ws://{}/", server.addr);
/// use std::time::Duration;
/// use middleman::client::{Client, Error};
///
/// let mut c = Client::connect(&url, "svc-key")?;
/// // Nobody answers "time" yet: the server says so at once.
/// match c.request("time", &[], "", Duration::from_secs(5)) {
///     Err(Error::Server(e)) => assert_eq!(e.reason, "no responder"),
///     other => panic!("{other:?}"),
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Client {
    ws: WebSocket<TcpStream>,
    cid: String,
    dec: Decoder,
    /// Decoded but not yet handed out (one WebSocket message may hold several).
    decoded: VecDeque<Message>,
    /// Kept for [`Client::recv`].
    inbox: VecDeque<Message>,
    next_id: u64,
    /// `ReqID`s of requests given up locally: their late answers are dropped.
    abandoned: HashSet<String>,
    /// Why the connection is unusable, once it is.
    dead: Option<(u16, String)>,
    closer: Closer,
    out: Vec<u8>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("cid", &self.cid)
            .field("queued", &self.inbox.len())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connect to `url` (`ws://host:port/`), present `key` and wait for the connection id.
    pub fn connect(url: &str, key: &str) -> Result<Client> {
        let (host, port) = parse_url(url)?;
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let addrs: Vec<SocketAddr> = (host.as_str(), port)
            .to_socket_addrs()
            .map_err(Error::Connect)?
            .collect();
        let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host}: no address"));
        let mut sock = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                Ok(s) => {
                    sock = Some(s);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let sock = sock.ok_or(Error::Connect(last))?;
        let _ = sock.set_nodelay(true);
        sock.set_read_timeout(Some(CONNECT_TIMEOUT))
            .map_err(Error::Connect)?;
        sock.set_write_timeout(Some(CONNECT_TIMEOUT))
            .map_err(Error::Connect)?;
        let handle = sock.try_clone().map_err(Error::Connect)?;
        let (mut ws, _) = tungstenite::client::client(url, sock).map_err(|e| match e {
            HandshakeError::Interrupted(_) => Error::Handshake("timed out".into()),
            HandshakeError::Failure(tungstenite::Error::Http(resp)) => {
                Error::Handshake(format!("HTTP status {}", resp.status()))
            }
            HandshakeError::Failure(tungstenite::Error::Io(e)) => Error::Connect(e),
            HandshakeError::Failure(e) => Error::Handshake(e.to_string()),
        })?;
        ws.send(WsMessage::text(key.trim())).map_err(ws_error)?;
        let ok = auth_read(&mut ws, deadline)?;
        if ok != b"MM OK" {
            return Err(Error::Handshake(format!(
                "expected MM OK, got {:?}",
                String::from_utf8_lossy(&ok)
            )));
        }
        let cid = auth_read(&mut ws, deadline)?;
        let cid = match String::from_utf8(cid) {
            Ok(c) if !c.is_empty() && c.bytes().all(|b| b.is_ascii_alphanumeric()) => c,
            _ => return Err(Error::Handshake("the server sent no valid cid".into())),
        };
        let _ = ws.get_ref().set_write_timeout(None);
        Ok(Client {
            ws,
            cid,
            dec: Decoder::new(Limits {
                max_message: 64 << 20,
                max_line: 64 << 20,
                max_headers: 4096,
            }),
            decoded: VecDeque::new(),
            inbox: VecDeque::new(),
            next_id: 0,
            abandoned: HashSet::new(),
            dead: None,
            closer: Closer {
                sock: Arc::new(handle),
                flag: Arc::new(AtomicBool::new(false)),
            },
            out: Vec::new(),
        })
    }

    /// The connection id the server assigned.
    pub fn cid(&self) -> &str {
        &self.cid
    }

    /// A handle that ends this connection from another thread.
    pub fn closer(&self) -> Closer {
        self.closer.clone()
    }

    /// Subscribe to `topic`. Returns once the server has taken it; a refusal (a client
    /// key on a topic no service enabled with `ESUB`) is [`Error::Server`].
    pub fn subscribe(&mut self, topic: &str) -> Result<()> {
        self.confirmed("SUB", topic, &[], b"")
    }

    /// Unsubscribe from `topic` (never refused; returns once the server has taken it).
    pub fn unsubscribe(&mut self, topic: &str) -> Result<()> {
        self.confirmed("UNS", topic, &[], b"")
    }

    /// Publish `body` with `headers` to `topic`. Does not wait: a refusal arrives later
    /// as an error message from [`Client::recv`] (see [`Message::error`]); follow with
    /// [`Client::sync`] to wait for it.
    pub fn publish(
        &mut self,
        topic: &str,
        headers: &[(&str, &str)],
        body: impl AsRef<[u8]>,
    ) -> Result<()> {
        self.send("PUB", topic, headers, body.as_ref())
    }

    /// Send a request to one responder of `target` and wait up to `timeout` for its
    /// `RES`. The server's error for this request (`no responder`, `responder
    /// disconnected`, `request timed out`, `not permitted`) is [`Error::Server`]; no
    /// answer in time is [`Error::Timeout`] (a late answer is then dropped). Other
    /// messages that arrive meanwhile are kept for [`Client::recv`].
    ///
    /// ```
    /// # use middleman::{broker::Keys, Config, Running};
    /// # let server = Running::spawn(Config {
    /// #     listeners: vec!["ws://127.0.0.1:0".parse()?],
    /// #     keys: Keys { service: vec!["svc-key".into()], client: vec!["cli-key".into()], monitor: vec![] },
    /// #     ..Config::default()
    /// # })?;
    /// # let url = format!("ws://{}/", server.addr);
    /// use std::time::Duration;
    /// use middleman::client::{Client, Reply, Service};
    ///
    /// let mut svc = Service::connect(&url, "svc-key")?;
    /// svc.listen("upper")?; // EREQ: now the responder for "upper"
    /// let stop = svc.client().closer();
    /// let responder = std::thread::spawn(move || {
    ///     svc.respond("upper", |req| Reply::new(req.body_text().to_uppercase()).header("Kind", "upper"))
    /// });
    ///
    /// let mut c = Client::connect(&url, "cli-key")?;
    /// let res = c.request("upper", &[("Trace", "1")], "abc", Duration::from_secs(5))?;
    /// assert_eq!(res.body, b"ABC");
    /// assert_eq!(res.header("kind"), Some("upper"));
    ///
    /// stop.close();
    /// responder.join().unwrap()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn request(
        &mut self,
        target: &str,
        headers: &[(&str, &str)],
        body: impl AsRef<[u8]>,
        timeout: Duration,
    ) -> Result<Message> {
        if headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("ReqID")) {
            return Err(Error::Invalid("ReqID is set by the client".into()));
        }
        self.next_id += 1;
        let id = format!("r{}", self.next_id);
        let mut all = Vec::with_capacity(headers.len() + 1);
        all.push(("ReqID", id.as_str()));
        all.extend_from_slice(headers);
        self.send("REQ", target, &all, body.as_ref())?;
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_event(Some(deadline)) {
                Ok(Some(Incoming::Msg(m))) => {
                    if m.cmd == "RES" && m.header("ReqID") == Some(id.as_str()) {
                        return Ok(m);
                    }
                    if let Some(e) = m.error() {
                        if e.reqid.as_deref() == Some(id.as_str()) {
                            return Err(Error::Server(e));
                        }
                    }
                    self.stash(m);
                }
                Ok(Some(Incoming::Pong(_))) => {}
                Ok(None) => {
                    self.abandoned.insert(id);
                    return Err(Error::Timeout);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The next message: kept ones first, then from the socket (blocks). Error messages
    /// not tied to a call come here too (see [`Message::error`]).
    pub fn recv(&mut self) -> Result<Message> {
        if let Some(m) = self.inbox.pop_front() {
            return Ok(m);
        }
        loop {
            if let Some(Incoming::Msg(m)) = self.read_event(None)? {
                if let Some(m) = self.fresh(m) {
                    return Ok(m);
                }
            }
        }
    }

    /// Like [`Client::recv`], waiting at most `timeout`; `Ok(None)` when nothing came.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Message>> {
        if let Some(m) = self.inbox.pop_front() {
            return Ok(Some(m));
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_event(Some(deadline))? {
                Some(Incoming::Msg(m)) => {
                    if let Some(m) = self.fresh(m) {
                        return Ok(Some(m));
                    }
                }
                Some(Incoming::Pong(_)) => {}
                None => return Ok(None),
            }
        }
    }

    /// Wait until the server has processed everything sent so far (a WebSocket ping
    /// round trip; the server answers it after the replies to earlier messages).
    pub fn sync(&mut self) -> Result<()> {
        self.sync_collect(None).map(|_| ())
    }

    /// Let clients publish to `topic` (services only; confirmed).
    pub fn enable_publish(&mut self, topic: &str) -> Result<()> {
        self.confirmed("EPUB", topic, &[], b"")
    }

    /// Let clients subscribe to `topic` (services only; confirmed).
    pub fn enable_subscribe(&mut self, topic: &str) -> Result<()> {
        self.confirmed("ESUB", topic, &[], b"")
    }

    /// Register as a responder for `target` and let clients request it (services only;
    /// confirmed). Requests then arrive from [`Client::recv`]; answer with
    /// [`Client::reply`].
    pub fn enable_requests(&mut self, target: &str) -> Result<()> {
        self.confirmed("EREQ", target, &[], b"")
    }

    /// Answer a `REQ` received from [`Client::recv`] with a `RES` echoing its `rid`.
    pub fn reply(
        &mut self,
        req: &Message,
        headers: &[(&str, &str)],
        body: impl AsRef<[u8]>,
    ) -> Result<()> {
        let Some(rid) = req.header("rid") else {
            return Err(Error::Invalid("the message has no rid header".into()));
        };
        if headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("rid")) {
            return Err(Error::Invalid("rid is set by the client".into()));
        }
        let mut all = Vec::with_capacity(headers.len() + 1);
        all.push(("rid", rid));
        all.extend_from_slice(headers);
        self.send("RES", &req.target, &all, body.as_ref())
    }

    /// Tag connection `cid`'s later messages with `uid` (`INT UID`; services only;
    /// confirmed).
    pub fn set_uid(&mut self, cid: &str, uid: &str) -> Result<()> {
        self.confirmed("INT", "UID", &[("forcid", cid), ("setuid", uid)], b"")
    }

    /// Send any command without waiting (for commands this API does not name).
    pub fn send(
        &mut self,
        cmd: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<()> {
        check_cmd(cmd)?;
        check_target(target)?;
        for (n, v) in headers {
            check_header(n, v)?;
        }
        self.alive()?;
        self.out.clear();
        encode_into(
            &mut self.out,
            cmd.as_bytes(),
            target.as_bytes(),
            headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())),
            body,
        );
        let payload = std::mem::take(&mut self.out);
        let msg = match String::from_utf8(payload) {
            Ok(s) => WsMessage::text(s),
            Err(e) => WsMessage::binary(e.into_bytes()),
        };
        let res = self.ws.send(msg);
        res.map_err(|e| self.fail(e))
    }

    /// Close with a close handshake (waits up to a second for the server's answer).
    pub fn close(mut self) -> Result<()> {
        self.alive()?;
        self.ws.close(None).map_err(|e| self.fail(e))?;
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            let _ = self.ws.get_ref().set_read_timeout(Some(left));
            match self.ws.read() {
                Ok(_) => continue,
                Err(_) => return Ok(()),
            }
        }
    }

    /// Send and confirm: an error from the server for `CMD target` before the sync
    /// point is returned (and not kept for `recv`).
    fn confirmed(
        &mut self,
        cmd: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<()> {
        self.send(cmd, target, headers, body)?;
        match self.sync_collect(Some((cmd, target)))? {
            Some(e) => Err(Error::Server(e)),
            None => Ok(()),
        }
    }

    fn sync_collect(&mut self, watch: Option<(&str, &str)>) -> Result<Option<ServerError>> {
        self.alive()?;
        self.next_id += 1;
        let token = format!("mm-sync-{}", self.next_id).into_bytes();
        let res = self.ws.send(WsMessage::Ping(token.clone().into()));
        res.map_err(|e| self.fail(e))?;
        let deadline = Instant::now() + SYNC_TIMEOUT;
        let mut found = None;
        loop {
            match self.read_event(Some(deadline))? {
                Some(Incoming::Pong(p)) if p == token => return Ok(found),
                Some(Incoming::Pong(_)) => {}
                Some(Incoming::Msg(m)) => {
                    if let (Some((cmd, target)), Some(e)) = (watch, m.error()) {
                        if found.is_none() && e.cmd == cmd && e.target == target {
                            found = Some(e);
                            continue;
                        }
                    }
                    self.stash(m);
                }
                None => return Err(Error::Timeout),
            }
        }
    }

    /// Keep `m` for `recv` unless it answers an abandoned request.
    fn stash(&mut self, m: Message) {
        if let Some(m) = self.fresh(m) {
            self.inbox.push_back(m);
        }
    }

    fn fresh(&mut self, m: Message) -> Option<Message> {
        let late = (m.cmd == "RES" || m.error().is_some())
            && m.header("ReqID")
                .is_some_and(|id| self.abandoned.remove(id));
        (!late).then_some(m)
    }

    fn alive(&self) -> Result<()> {
        match &self.dead {
            Some((code, reason)) => Err(Error::Closed {
                code: *code,
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Record a fatal WebSocket error and describe it.
    fn fail(&mut self, e: tungstenite::Error) -> Error {
        let err = if self.closer.flag.load(Ordering::SeqCst) {
            Error::Closed {
                code: 1000,
                reason: "closed by this client".into(),
            }
        } else {
            ws_error(e)
        };
        if self.dead.is_none() {
            self.dead = Some(match &err {
                Error::Closed { code, reason } => (*code, reason.clone()),
                other => (1006, other.to_string()),
            });
        }
        err
    }

    /// The next message or pong, or `None` at the deadline.
    fn read_event(&mut self, deadline: Option<Instant>) -> Result<Option<Incoming>> {
        loop {
            if let Some(m) = self.decoded.pop_front() {
                return Ok(Some(Incoming::Msg(m)));
            }
            self.alive()?;
            let timeout = match deadline {
                None => None,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    Some(left)
                }
            };
            if let Err(e) = self.ws.get_ref().set_read_timeout(timeout) {
                return Err(self.fail(tungstenite::Error::Io(e)));
            }
            let data = match self.ws.read() {
                Ok(WsMessage::Text(t)) => t.as_bytes().to_vec(),
                Ok(WsMessage::Binary(b)) => b.to_vec(),
                Ok(WsMessage::Pong(p)) => return Ok(Some(Incoming::Pong(p.to_vec()))),
                Ok(WsMessage::Ping(_) | WsMessage::Frame(_)) => continue,
                Ok(WsMessage::Close(frame)) => {
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((1005, String::new()));
                    let _ = self.ws.flush(); // our close reply
                    self.dead = Some((code, reason.clone()));
                    return Err(Error::Closed { code, reason });
                }
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) && deadline.is_some() =>
                {
                    continue; // the loop returns None once the deadline has passed
                }
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {
                    continue
                }
                Err(e) => return Err(self.fail(e)),
            };
            self.decode(&data)?;
        }
    }

    fn decode(&mut self, data: &[u8]) -> Result<()> {
        self.dec.feed(data);
        loop {
            match self.dec.next() {
                Ok(Some(Decoded::Message(m))) => self.decoded.push_back(Message {
                    cmd: m.cmd_str().to_owned(),
                    target: String::from_utf8_lossy(m.target).into_owned(),
                    headers: m
                        .headers()
                        .map(|(n, v)| {
                            (
                                String::from_utf8_lossy(n).into_owned(),
                                String::from_utf8_lossy(v).into_owned(),
                            )
                        })
                        .collect(),
                    body: m.body.into_owned(),
                }),
                Ok(Some(Decoded::Malformed(_))) => {
                    return Err(self.protocol_error("a header line without ':'".into()))
                }
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.protocol_error(e.to_string())),
            }
        }
    }

    fn protocol_error(&mut self, why: String) -> Error {
        let _ = self.closer.sock.shutdown(Shutdown::Both);
        self.dead = Some((1002, why.clone()));
        Error::Protocol(why)
    }
}

/// A responder: a [`Client`] that answers requests.
///
/// ```
/// # use middleman::{broker::Keys, Config, Running};
/// # let server = Running::spawn(Config {
/// #     listeners: vec!["ws://127.0.0.1:0".parse()?],
/// #     keys: Keys { service: vec!["svc-key".into()], client: vec![], monitor: vec![] },
/// #     ..Config::default()
/// # })?;
/// # let url = format!("ws://{}/", server.addr);
/// use std::time::Duration;
/// use middleman::client::{Client, Service};
///
/// let mut echo = Service::connect(&url, "svc-key")?;
/// echo.listen("echo")?;
/// let stop = echo.client().closer();
/// let t = std::thread::spawn(move || echo.respond("echo", |req| req.body.clone()));
///
/// let mut c = Client::connect(&url, "svc-key")?;
/// assert_eq!(c.request("echo", &[], "hi", Duration::from_secs(5))?.body, b"hi");
/// stop.close(); // respond returns Ok(()) when ended by its Closer
/// t.join().unwrap()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Service {
    client: Client,
}

impl Service {
    /// Connect with a service key.
    pub fn connect(url: &str, key: &str) -> Result<Service> {
        Client::connect(url, key).map(Service::from)
    }

    /// The underlying connection (to publish, enable topics, get a [`Closer`], ...).
    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    /// Back to a plain client.
    pub fn into_client(self) -> Client {
        self.client
    }

    /// Register as a responder for `target` (`EREQ`, confirmed). [`Service::respond`]
    /// does it too; calling it first means requests are accepted from this point on.
    pub fn listen(&mut self, target: &str) -> Result<()> {
        self.client.enable_requests(target)
    }

    /// Register for `target` and answer each of its `REQ`s with the handler's reply as
    /// a `RES` echoing `rid`, until the connection ends. Other messages are ignored.
    /// Returns `Ok(())` when ended by a [`Closer`] (or [`Client::closer`] of
    /// [`Service::client`]), the error otherwise (e.g. [`Error::Closed`] with 1001 when
    /// the server shuts down).
    pub fn respond<R, F>(&mut self, target: &str, mut handler: F) -> Result<()>
    where
        R: Into<Reply>,
        F: FnMut(&Message) -> R,
    {
        let mut run = |c: &mut Client| -> Result<()> {
            c.enable_requests(target)?;
            loop {
                let req = c.recv()?;
                if req.cmd != "REQ" || req.target != target {
                    continue;
                }
                let reply = handler(&req).into();
                let headers: Vec<(&str, &str)> = reply
                    .headers
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_str()))
                    .collect();
                c.reply(&req, &headers, &reply.body)?;
            }
        };
        match run(&mut self.client) {
            Err(_) if self.client.closer.flag.load(Ordering::SeqCst) => Ok(()),
            other => other,
        }
    }
}

impl From<Client> for Service {
    fn from(client: Client) -> Service {
        Service { client }
    }
}

/// Read one data message during the key exchange.
fn auth_read(ws: &mut WebSocket<TcpStream>, deadline: Instant) -> Result<Vec<u8>> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Handshake("timed out waiting for MM OK".into()));
        }
        ws.get_ref()
            .set_read_timeout(Some(left))
            .map_err(Error::Connect)?;
        match ws.read() {
            Ok(WsMessage::Text(t)) => return Ok(t.as_bytes().to_vec()),
            Ok(WsMessage::Binary(b)) => return Ok(b.to_vec()),
            Ok(WsMessage::Close(Some(f))) if u16::from(f.code) == 1008 => {
                return Err(Error::BadKey)
            }
            Ok(WsMessage::Close(f)) => {
                let (code, reason) = f
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                return Err(Error::Closed { code, reason });
            }
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => return Err(ws_error(e)),
        }
    }
}

fn ws_error(e: tungstenite::Error) -> Error {
    match e {
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => Error::Closed {
            code: 1006,
            reason: "connection closed".into(),
        },
        tungstenite::Error::Io(e)
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            ) =>
        {
            Error::Closed {
                code: 1006,
                reason: e.to_string(),
            }
        }
        tungstenite::Error::Protocol(
            tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        ) => Error::Closed {
            code: 1006,
            reason: "connection reset without a close frame".into(),
        },
        tungstenite::Error::Io(e) => Error::Io(e),
        other => Error::Protocol(other.to_string()),
    }
}

/// `ws://host[:port][/path]` -> (host, port). `wss://` needs TLS, which is not built in.
fn parse_url(url: &str) -> Result<(String, u16)> {
    let Some(rest) = url.strip_prefix("ws://") else {
        return Err(Error::Url(if url.starts_with("wss://") {
            format!("{url}: wss:// needs TLS, which this client does not include")
        } else {
            format!("{url}: expected ws://host:port/")
        }));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err(Error::Url(format!("{url}: user info is not supported")));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let Some((h, tail)) = v6.split_once(']') else {
            return Err(Error::Url(format!("{url}: unclosed '['")));
        };
        match tail.strip_prefix(':') {
            Some(p) => (h, Some(p)),
            None if tail.is_empty() => (h, None),
            None => return Err(Error::Url(format!("{url}: bad port"))),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(Error::Url(format!("{url}: no host")));
    }
    let port = match port {
        None => 80,
        Some(p) => p
            .parse()
            .map_err(|_| Error::Url(format!("{url}: bad port {p:?}")))?,
    };
    Ok((host.to_owned(), port))
}

fn check_cmd(cmd: &str) -> Result<()> {
    if cmd.is_empty() || cmd.len() > 16 || !cmd.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(Error::Invalid(format!(
            "command {cmd:?} is not 1 to 16 letters"
        )));
    }
    Ok(())
}

fn check_target(t: &str) -> Result<()> {
    if t.is_empty() || t.len() > MAX_TARGET {
        return Err(Error::Invalid(format!(
            "target {t:?} must be 1 to {MAX_TARGET} bytes"
        )));
    }
    if t.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Err(Error::Invalid(format!(
            "target {t:?} holds a control character"
        )));
    }
    if t.starts_with([' ', '\t']) || t.ends_with([' ', '\t']) {
        return Err(Error::Invalid(format!(
            "target {t:?} has surrounding spaces"
        )));
    }
    Ok(())
}

fn check_header(name: &str, value: &str) -> Result<()> {
    let bad_name = name.trim_matches([' ', '\t']).is_empty()
        || name.trim_matches([' ', '\t']) != name
        || name.bytes().any(|b| b == b':' || b < 0x20 || b == 0x7f);
    if bad_name {
        return Err(Error::Invalid(format!("header name {name:?}")));
    }
    if value.bytes().any(|b| b == b'\r' || b == b'\n') {
        return Err(Error::Invalid(format!(
            "header {name}: value {value:?} holds a line break"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("ws://127.0.0.1:8765/").unwrap(),
            ("127.0.0.1".into(), 8765)
        );
        assert_eq!(parse_url("ws://example/x").unwrap(), ("example".into(), 80));
        assert_eq!(parse_url("ws://[::1]:9/").unwrap(), ("::1".into(), 9));
        assert_eq!(parse_url("ws://h:1?x").unwrap(), ("h".into(), 1));
        for bad in [
            "http://h/",
            "wss://h/",
            "ws://",
            "ws://h:x/",
            "ws://[::1/",
            "ws://u@h/",
        ] {
            assert!(matches!(parse_url(bad), Err(Error::Url(_))), "{bad}");
        }
    }

    #[test]
    fn argument_checks() {
        assert!(check_target("news").is_ok());
        assert!(check_target("").is_err());
        assert!(check_target("a\r\nPUB x").is_err());
        assert!(check_target(" a").is_err());
        assert!(check_target(&"x".repeat(256)).is_err());
        assert!(check_header("X-A", "v 1").is_ok());
        assert!(check_header("X:A", "v").is_err());
        assert!(check_header("", "v").is_err());
        assert!(check_header("A", "v\r\nrid: 1").is_err());
        assert!(check_cmd("PUB").is_ok());
        assert!(check_cmd("P B").is_err());
    }

    #[test]
    fn exit_codes() {
        let server = |reason: &str| {
            Error::Server(ServerError {
                reason: reason.into(),
                cmd: "REQ".into(),
                target: "t".into(),
                reqid: None,
            })
        };
        assert_eq!(server("no responder").exit_code(), 1);
        assert_eq!(server("request timed out").exit_code(), 4);
        assert_eq!(Error::Invalid("x".into()).exit_code(), 2);
        assert_eq!(Error::BadKey.exit_code(), 3);
        assert_eq!(Error::Timeout.exit_code(), 4);
    }
}
