//! The node's one connection to nats-server, driven by the server's mio loop: connect
//! (non-blocking), INFO, CONNECT, PING/PONG, then MSG in and PUB/SUB out, with reconnects
//! (backoff with jitter, the addresses tried in turn) and a liveness ping. What it reads
//! goes to the broker ([`Broker::on_backplane`]); what it writes is the cluster's output
//! lanes ([`crate::cluster::node::Cluster::lanes`]), bounded there.

use std::io::{self, Read};
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::broker::{Broker, Outbox};
use crate::cluster::proto::{self, ConnectOpts, NatsLimits, NatsParser, Op};

/// How the node reaches nats-server.
#[derive(Debug, Clone, Default)]
pub struct LinkSettings {
    /// `nats://HOST[:PORT]` addresses, tried in turn.
    pub urls: Vec<String>,
    /// Credentials, if nats-server requires them.
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// Bytes read per loop pass before other connections get their turn.
    pub read_per_turn: usize,
    /// Messages handled per loop pass.
    pub messages_per_turn: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not connected; try again at this time.
    Idle(Instant),
    /// TCP connect in progress, started at.
    Connecting(Instant),
    /// Waiting for INFO.
    AwaitInfo(Instant),
    /// CONNECT and PING sent, waiting for PONG.
    AwaitPong(Instant),
    /// Up.
    Up,
}

/// Time allowed to connect, to get INFO, and to get the first PONG.
const STEP_TIMEOUT: Duration = Duration::from_secs(2);
/// Liveness: a PING this often while up; two unanswered and the connection is dropped.
const PING_EVERY: Duration = Duration::from_secs(2);
const MAX_PINGS_OUT: u32 = 2;
/// Reconnect backoff: from 100 ms, doubling, at most 2 s, with +-50% jitter.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The connection to nats-server. See the module documentation.
pub struct NatsLink {
    settings: LinkSettings,
    token: Token,
    next_url: usize,
    sock: Option<TcpStream>,
    peer: String,
    state: State,
    parser: NatsParser,
    attempt: u32,
    last_ping: Instant,
    pings_out: u32,
    rbuf: Vec<u8>,
    /// More may be waiting to be read (the turn's budget ran out).
    pub again: bool,
    /// The socket refused a write: wait for writable.
    blocked: bool,
    max_payload: usize,
    /// When the loss of the backplane was last logged (one line per outage).
    down_logged: bool,
    /// Messages dropped as too large, as last logged.
    too_large_logged: u64,
    last_too_large_log: Option<Instant>,
}

impl NatsLink {
    /// A link that will connect at the first tick.
    pub fn new(settings: LinkSettings, token: Token, now: Instant) -> NatsLink {
        NatsLink {
            settings,
            token,
            next_url: 0,
            sock: None,
            peer: String::new(),
            state: State::Idle(now),
            parser: NatsParser::new(NatsLimits::default()),
            attempt: 0,
            last_ping: now,
            pings_out: 0,
            rbuf: vec![0; 64 << 10],
            again: false,
            blocked: false,
            max_payload: 1 << 20,
            down_logged: false,
            too_large_logged: 0,
            last_too_large_log: None,
        }
    }

    /// Is the backplane up?
    pub fn is_up(&self) -> bool {
        self.state == State::Up
    }

    /// The nats-server address in use (or last tried).
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The first address of `nats://HOST[:PORT]` (checked by the configuration already).
    fn resolve(url: &str) -> Option<SocketAddr> {
        let (host, port) = crate::config::parse_nats_url(url).ok()?;
        (host.as_str(), port).to_socket_addrs().ok()?.next()
    }

    fn start_connect(&mut self, registry: &Registry, broker: &mut Broker, now: Instant) {
        let urls = &self.settings.urls;
        if urls.is_empty() {
            return;
        }
        let url = urls[self.next_url % urls.len()].clone();
        self.next_url = self.next_url.wrapping_add(1);
        self.peer = url.clone();
        if let Some(c) = broker.cluster.as_mut() {
            c.peer = url.clone();
        }
        let Some(addr) = Self::resolve(&url) else {
            log::warn!("cluster: cannot resolve {url}");
            return self.backoff(now);
        };
        match TcpStream::connect(addr) {
            Ok(mut s) => {
                let _ = s.set_nodelay(true);
                if let Err(e) =
                    registry.register(&mut s, self.token, Interest::READABLE | Interest::WRITABLE)
                {
                    log::warn!("cluster: cannot register the connection to {url}: {e}");
                    return self.backoff(now);
                }
                self.sock = Some(s);
                self.parser = NatsParser::new(NatsLimits::default());
                self.blocked = false;
                self.state = State::Connecting(now);
            }
            Err(e) => {
                self.log_down(&format!("cannot connect to {url}: {e}"));
                self.backoff(now);
            }
        }
    }

    fn backoff(&mut self, now: Instant) {
        let base = BACKOFF_MIN
            .saturating_mul(1u32 << self.attempt.min(8))
            .min(BACKOFF_MAX);
        self.attempt = self.attempt.saturating_add(1);
        let mut r = [0u8; 2];
        let _ = getrandom::fill(&mut r);
        let jitter = 0.5 + f64::from(u16::from_le_bytes(r)) / 65535.0; // 0.5 .. 1.5
        self.state = State::Idle(now + base.mul_f64(jitter));
    }

    fn log_down(&mut self, why: &str) {
        if !self.down_logged {
            log::warn!(
                "cluster: backplane down ({why}); local traffic goes on, messages for other \
                 nodes are dropped and counted until it is back"
            );
            self.down_logged = true;
        }
    }

    /// Drop the connection (error, EOF, timeout) and schedule a reconnect.
    fn fail(&mut self, registry: &Registry, broker: &mut Broker, now: Instant, why: &str) {
        if let Some(mut s) = self.sock.take() {
            let _ = registry.deregister(&mut s);
        }
        let was_up = self.state == State::Up;
        if let Some(c) = broker.cluster.as_mut() {
            c.on_disconnected(now);
        }
        if was_up {
            self.down_logged = false;
            self.attempt = 0;
        }
        self.log_down(&format!("{}: {why}", self.peer));
        self.again = false;
        self.backoff(now);
    }

    /// Timers: reconnect when due, step timeouts, liveness pings, and the cluster's own
    /// (heartbeat, nodes gone, forwarded requests expired).
    pub fn tick(
        &mut self,
        registry: &Registry,
        broker: &mut Broker,
        now: Instant,
        out: &mut impl Outbox,
    ) {
        match self.state {
            State::Idle(at) if now >= at => self.start_connect(registry, broker, now),
            State::Connecting(t) | State::AwaitInfo(t) | State::AwaitPong(t)
                if now.saturating_duration_since(t) > STEP_TIMEOUT =>
            {
                self.fail(registry, broker, now, "no answer")
            }
            State::Up if now.saturating_duration_since(self.last_ping) >= PING_EVERY => {
                if self.pings_out >= MAX_PINGS_OUT {
                    self.fail(registry, broker, now, "PING unanswered");
                } else if let Some(c) = broker.cluster.as_mut() {
                    c.lanes.push_ctl(proto::ping);
                    self.pings_out += 1;
                    self.last_ping = now;
                }
            }
            _ => {}
        }
        broker.cluster_tick(now, out);
        if let Some(c) = broker.cluster.as_ref() {
            let dropped = c.stats.dropped[2];
            if dropped > self.too_large_logged
                && self
                    .last_too_large_log
                    .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(10))
            {
                log::warn!(
                    "cluster: {} message(s) larger than the backplane's max_payload ({} bytes) \
                     were delivered on this node only",
                    dropped - self.too_large_logged,
                    c.max_payload
                );
                self.too_large_logged = dropped;
                self.last_too_large_log = Some(now);
            }
        }
    }

    /// A readiness event for the link's token.
    pub fn on_event(
        &mut self,
        registry: &Registry,
        broker: &mut Broker,
        now: Instant,
        out: &mut impl Outbox,
    ) {
        if let State::Connecting(_) = self.state {
            let Some(s) = self.sock.as_ref() else {
                return;
            };
            match s.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => return self.fail(registry, broker, now, &e.to_string()),
            }
            match s.peer_addr() {
                Ok(_) => self.state = State::AwaitInfo(now),
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(e) => return self.fail(registry, broker, now, &e.to_string()),
            }
        }
        self.blocked = false;
        self.read(registry, broker, now, out);
        self.flush(registry, broker, now);
    }

    /// Read and handle what nats-server sent, within the turn's budget.
    pub fn read(
        &mut self,
        registry: &Registry,
        broker: &mut Broker,
        now: Instant,
        out: &mut impl Outbox,
    ) {
        self.again = false;
        let mut bytes = self.settings.read_per_turn.max(64 << 10);
        let mut msgs = self.settings.messages_per_turn.max(1000);
        loop {
            // Handle what is buffered first.
            loop {
                if msgs == 0 {
                    self.again = true;
                    return;
                }
                let op = match self.parser.next() {
                    Ok(Some(op)) => op,
                    Ok(None) => break,
                    Err(e) => {
                        let why = format!("protocol error from nats-server: {e}");
                        return self.fail(registry, broker, now, &why);
                    }
                };
                msgs -= 1;
                match op {
                    Op::Msg(m) => broker.on_backplane(&m, now, out),
                    Op::Ping => {
                        if let Some(c) = broker.cluster.as_mut() {
                            c.lanes.push_ctl(proto::pong);
                        }
                    }
                    Op::Pong => {
                        self.pings_out = 0;
                        if let State::AwaitPong(_) = self.state {
                            self.state = State::Up;
                            self.attempt = 0;
                            self.last_ping = now;
                            let max = self.max_payload;
                            log::info!(
                                "cluster: connected to nats-server {} (max_payload {max} bytes)",
                                self.peer
                            );
                            self.down_logged = false;
                            broker.cluster_connected(now, max);
                        }
                    }
                    Op::Info(info) => {
                        if let State::AwaitInfo(_) = self.state {
                            if let Some(mp) = info.max_payload {
                                self.max_payload = mp as usize;
                                self.parser.set_max_payload(mp as usize);
                            }
                            let node = broker.cluster.as_ref().map(|c| c.node.to_string());
                            let name = node.map(|n| format!("middleman-{n}"));
                            let opts = ConnectOpts {
                                name: name.as_deref(),
                                user: self.settings.user.as_deref(),
                                pass: self.settings.password.as_deref(),
                                auth_token: self.settings.token.as_deref(),
                                echo: false,
                            };
                            if let Some(c) = broker.cluster.as_mut() {
                                c.lanes.clear();
                                c.lanes.push_ctl(|b| {
                                    proto::connect(b, &opts);
                                    proto::ping(b);
                                });
                            }
                            self.state = State::AwaitPong(now);
                        }
                    }
                    Op::Ok => {}
                    Op::Err(e) => {
                        let e = String::from_utf8_lossy(e).into_owned();
                        log::warn!("cluster: nats-server {} says: {e}", self.peer);
                        if e.to_ascii_lowercase().contains("authorization")
                            || e.to_ascii_lowercase().contains("permissions")
                        {
                            return self.fail(registry, broker, now, &e);
                        }
                    }
                }
            }
            if bytes == 0 {
                self.again = true;
                return;
            }
            let Some(s) = self.sock.as_mut() else {
                return;
            };
            let cap = self.rbuf.len().min(bytes);
            match s.read(&mut self.rbuf[..cap]) {
                Ok(0) => return self.fail(registry, broker, now, "connection closed"),
                Ok(n) => {
                    bytes -= n;
                    self.parser.feed(&self.rbuf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !self.parser.needs_more() {
                        self.parser.shrink();
                    }
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.fail(registry, broker, now, &e.to_string()),
            }
        }
    }

    /// Write what waits for nats-server (control ahead of data), as far as the socket
    /// takes it, after the pass's interest changes and load announcements.
    pub fn flush(&mut self, registry: &Registry, broker: &mut Broker, now: Instant) {
        if self.state == State::Up {
            broker.cluster_before_flush(now);
        }
        if self.blocked || matches!(self.state, State::Idle(_) | State::Connecting(_)) {
            return;
        }
        let Some(c) = broker.cluster.as_mut() else {
            return;
        };
        let Some(s) = self.sock.as_mut() else {
            return;
        };
        let mut failed = None;
        while !c.lanes.is_empty() {
            match c.lanes.write(s) {
                Ok(0) => {
                    failed = Some("write returned 0".to_owned());
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.blocked = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failed = Some(e.to_string());
                    break;
                }
            }
        }
        if let Some(why) = failed {
            self.fail(registry, broker, now, &why);
        }
    }
}
