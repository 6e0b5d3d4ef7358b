//! The event loop: one thread, one `mio::Poll`, connections in a `Slab` keyed by their
//! `Token`. Edge-triggered: accept until `WouldBlock`; read until `WouldBlock` or until
//! the connection's [`Budget`] for the pass is spent (`--max-read-per-turn` bytes from the
//! socket, `--max-messages-per-turn` messages), then the connection waits on the `again`
//! list for the next pass so no peer can hold the loop; queue what the broker sends,
//! write a queue early once it passes a high-water mark, and write every dirty
//! connection once at the end of the pass.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::net::{TcpListener, UnixListener};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::{Role as WsRole, WebSocketConfig, WebSocketContext};
use tungstenite::Message as WsMessage;

use crate::broker::{random_cid_prefix, Broker, Outbox, Settings};
use crate::config::Config;
use crate::conn::{ws_step, Budget, FrameScan, Framing, Io, OutQueue, Step};
use crate::http::{self, Request};
use crate::metrics::{CloseReason, Metrics};
use crate::protocol::{Decoded, Decoder, Packet};
use crate::router::ConnId;
use crate::transport::{load_tls, Endpoint, Link, Listen, Scheme, Sock};
use crate::web;

/// Listener `i` has token `LISTENER_BASE - i`.
const LISTENER_BASE: usize = usize::MAX - 16;
const MAX_LISTENERS: usize = 1024;
const WAKER: Token = Token(usize::MAX - 2);
const SIGNALS: Token = Token(usize::MAX - 3);

/// Queued bytes past which a connection is written at once, within the pass, so a burst
/// read from others never trips the slow-consumer cap of a peer that reads as it comes.
const HIGH_WATER: usize = 256 * 1024;
/// Silent connections read once more, at most, before one is dropped to make room for a
/// new handshake.
const MAX_EVICTION_CHECKS: usize = 16;
/// How long a closing connection may take to flush and hang up.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// How often timeouts are checked.
const TICK: Duration = Duration::from_millis(250);
/// Most bytes read from a plain HTTP request before it must be complete.
const HTTP_READ_CAP: usize = http::MAX_REQUEST + 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading the HTTP request.
    Http,
    /// Upgraded; waiting for the API key.
    AwaitKey,
    /// Raw stream transport; waiting for the key line.
    RawKey,
    /// Authenticated; protocol messages flow.
    Open,
    /// Echo mode (Autobahn): data messages are sent back.
    Echo,
    /// Flushing what is queued, then hanging up.
    Closing,
}

struct Conn {
    /// Generation: tells this connection from a later one reusing its slab key.
    gen: u64,
    link: Link,
    peer: String,
    /// Source address (TCP), for the per-address handshake budget.
    ip: Option<IpAddr>,
    /// Counted in the handshake budget (not yet authenticated).
    in_hs: bool,
    /// Frame-header scanner (frames per message).
    scan: FrameScan,
    /// The decoder holds messages not yet handled (the message budget ran out).
    backlog: bool,
    /// On the `again` list (at most once).
    again: bool,
    /// Index of the listener it came through.
    listener: usize,
    /// WebSocket frames or the raw stream.
    framing: Framing,
    phase: Phase,
    ws: Option<WebSocketContext>,
    /// Boxed: the drain takes it out of the slab and puts it back for every message, and
    /// moving the whole decoder both ways was ~4.6% of the server's time at 64 B.
    dec: Option<Box<Decoder>>,
    out: OutQueue,
    http_buf: Vec<u8>,
    created: Instant,
    last_rx: Instant,
    last_ping: Instant,
    rx_bytes: u64,
    /// Queued in the dirty list for this pass.
    dirty: bool,
    /// Cut off as a slow consumer: nothing more may be queued.
    slow: bool,
    /// Closing: drop at this time whatever happens.
    close_deadline: Option<Instant>,
    /// Closing: the write side was shut down after the queue drained.
    write_shut: bool,
    /// Closing: the peer hung up.
    peer_eof: bool,
    /// Why it is closing (for metrics and logs).
    close_reason: CloseReason,
    /// Role and cid once authenticated, for the close log line (the broker forgets the
    /// session as soon as closing begins).
    who: Option<Box<str>>,
}

impl Conn {
    fn accepts_data(&self) -> bool {
        matches!(self.phase, Phase::Open | Phase::Echo) && !self.slow
    }
}

/// Stops a running [`Server`] from another thread (tests, embedding).
#[derive(Clone)]
pub struct StopHandle {
    flag: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

impl StopHandle {
    /// Begin a graceful shutdown, as SIGTERM would.
    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }
}

/// The outbox the broker writes into: queues packets on connections and notes the ones
/// to write at the end of the pass.
struct Sink<'a> {
    conns: &'a mut Slab<Conn>,
    dirty: &'a mut Vec<ConnId>,
    closes: &'a mut Vec<Close>,
    max_out: usize,
    bytes_out: &'a mut u64,
}

/// A close decided during the pass, carried out after it. The generation makes sure it
/// reaches the connection it was meant for, not a later one in the same slab slot.
#[derive(Debug, Clone, Copy)]
struct Close {
    id: ConnId,
    gen: u64,
    code: u16,
    reason: &'static str,
    why: CloseReason,
}

/// Nothing more may be queued for `c`; it is closed after the pass (see `Close`).
fn stop_queueing(
    closes: &mut Vec<Close>,
    id: ConnId,
    c: &mut Conn,
    code: u16,
    reason: &'static str,
    why: CloseReason,
) {
    c.slow = true;
    closes.push(Close {
        id,
        gen: c.gen,
        code,
        reason,
        why,
    });
}

impl Sink<'_> {
    /// Write what the socket takes now. False if the connection failed (it is then
    /// marked to be removed and takes nothing more).
    fn write_now(&mut self, to: ConnId) -> bool {
        let Some(c) = self.conns.get_mut(to) else {
            return false;
        };
        match c.out.write_to(&mut c.link) {
            Ok(n) => {
                *self.bytes_out += n as u64;
                true
            }
            Err(_) => {
                stop_queueing(self.closes, to, c, 1006, "", CloseReason::PeerGone);
                false
            }
        }
    }
}

impl Outbox for Sink<'_> {
    fn send(&mut self, to: ConnId, pkt: &Rc<Packet>) {
        let Some(c) = self.conns.get(to) else {
            return;
        };
        if !c.accepts_data() {
            return;
        }
        if c.out.len() + c.out.packet_len(pkt) > self.max_out {
            // Over the cap: first let the socket take what it can. A peer is a slow
            // consumer only if its queue stays over the cap with the socket full.
            if !self.write_now(to) {
                return;
            }
            let Some(c) = self.conns.get_mut(to) else {
                return;
            };
            if c.out.len() + c.out.packet_len(pkt) > self.max_out {
                // §7: never a gap in the middle; the stream stops here and the peer is
                // closed.
                let why = CloseReason::SlowConsumer;
                stop_queueing(self.closes, to, c, 1008, "slow consumer", why);
                return;
            }
        }
        let Some(c) = self.conns.get_mut(to) else {
            return;
        };
        c.out.push_packet(pkt);
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(to);
        }
        if c.out.len() >= HIGH_WATER {
            self.write_now(to);
        }
    }
}

/// Handshake budget: connections not yet authenticated, counted globally and per source
/// address, oldest first for eviction.
#[derive(Debug, Default)]
struct Handshakes {
    count: usize,
    per_ip: foldhash::HashMap<IpAddr, u32>,
    /// (id, generation) in accept order; entries of connections that have left the
    /// budget are skipped when met.
    order: VecDeque<(ConnId, u64)>,
}

/// The server: listener, connections, broker and timers on one thread.
pub struct Server {
    poll: Poll,
    listeners: Vec<Listener>,
    tls: Option<Arc<rustls::ServerConfig>>,
    conns: Slab<Conn>,
    broker: Broker,
    cfg: Config,
    ws_config: WebSocketConfig,
    /// tungstenite settings before the key is accepted (small messages only).
    ws_config_key: WebSocketConfig,
    dirty: Vec<ConnId>,
    again: Vec<(ConnId, u64)>,
    closes: Vec<Close>,
    hs: Handshakes,
    next_gen: u64,
    stop_flag: Arc<AtomicBool>,
    waker: Arc<Waker>,
    signals: Option<signal_hook_mio::v1_0::Signals>,
    shutdown_deadline: Option<Instant>,
    accept_paused_until: Option<Instant>,
    next_tick: Instant,
    metrics: Metrics,
}

impl Server {
    /// Bind the listener and set up the loop (does not run it).
    pub fn bind(mut cfg: Config) -> io::Result<Server> {
        if cfg.echo {
            // Echo mode answers Autobahn's 16 MiB messages: room for a few in flight.
            cfg.max_outbound_bytes = cfg.max_outbound_bytes.max(256 << 20);
        }
        let poll = Poll::new()?;
        if cfg.listeners.is_empty() || cfg.listeners.len() > MAX_LISTENERS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("between 1 and {MAX_LISTENERS} listeners are needed"),
            ));
        }
        let tls = if cfg.listeners.iter().any(|l| l.scheme == Scheme::Wss) {
            let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a wss:// listener needs --tls-cert and --tls-key",
                ));
            };
            Some(load_tls(cert, key).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?)
        } else {
            None
        };
        let mut listeners = Vec::new();
        for (i, spec) in cfg.listeners.iter().enumerate() {
            let mut l = Listener::bind(spec)?;
            poll.registry()
                .register(&mut l, Token(LISTENER_BASE - i), Interest::READABLE)?;
            listeners.push(l);
        }
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let signals = if cfg.handle_signals {
            let mut s = signal_hook_mio::v1_0::Signals::new([
                signal_hook::consts::SIGINT,
                signal_hook::consts::SIGTERM,
            ])?;
            poll.registry()
                .register(&mut s, SIGNALS, Interest::READABLE)?;
            Some(s)
        } else {
            None
        };
        // tungstenite's read buffer is allocated per connection and filled on every read:
        // 4 KiB keeps an idle authenticated connection near 5.5 kB of RSS (measured at
        // 10,000 connections; 8 KiB gave 9.6 kB) at the cost of more reads for large
        // frames.
        // A WebSocket message may hold one protocol message of the maximum size plus a
        // line of slack; a larger frame is refused before it is buffered.
        let ws_max = if cfg.echo {
            64 << 20
        } else {
            cfg.limits.max_message + cfg.limits.max_line
        };
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(4 * 1024)
            .write_buffer_size(0)
            .max_message_size(Some(ws_max))
            .max_frame_size(Some(ws_max));
        // Before the key is accepted the only message is the key: small.
        let key_max = if cfg.echo { ws_max } else { cfg.max_key_bytes };
        let ws_config_key = ws_config
            .max_message_size(Some(key_max))
            .max_frame_size(Some(key_max));
        if cfg.echo {
            // Autobahn sends messages of up to 65,536 fragments.
            cfg.max_fragments = cfg.max_fragments.max(1 << 20);
        }
        let broker = Broker::new(
            Settings {
                max_subscriptions: cfg.max_subscriptions,
                request_timeout: cfg.request_timeout,
                max_pending_requests: cfg.max_pending_requests,
                max_reqid_bytes: cfg.max_reqid_bytes,
            },
            &random_cid_prefix(),
        );
        Ok(Server {
            poll,
            listeners,
            tls,
            conns: Slab::with_capacity(1024),
            broker,
            ws_config,
            ws_config_key,
            dirty: Vec::new(),
            again: Vec::new(),
            closes: Vec::new(),
            hs: Handshakes::default(),
            next_gen: 0,
            stop_flag: Arc::new(AtomicBool::new(false)),
            waker,
            signals,
            shutdown_deadline: None,
            accept_paused_until: None,
            next_tick: Instant::now() + TICK,
            metrics: Metrics::default(),
            cfg,
        })
    }

    /// The first TCP address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listeners
            .iter()
            .find_map(|l| match l.bound.endpoint {
                Endpoint::Tcp(a) => Some(a),
                Endpoint::Unix(_) => None,
            })
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Every listener as bound (ports filled in).
    pub fn listeners(&self) -> Vec<Listen> {
        self.listeners.iter().map(|l| l.bound.clone()).collect()
    }

    /// A handle that stops the server from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            flag: self.stop_flag.clone(),
            waker: self.waker.clone(),
        }
    }

    /// Run until shut down (signal or [`StopHandle::stop`]) and every connection is
    /// closed or the grace period is over.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout(Instant::now());
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            let now = Instant::now();
            for ev in events.iter() {
                match ev.token() {
                    Token(t) if t > LISTENER_BASE - MAX_LISTENERS && t <= LISTENER_BASE => {
                        self.accept(LISTENER_BASE - t, now)
                    }
                    WAKER => {
                        if self.stop_flag.load(Ordering::SeqCst) {
                            self.begin_shutdown(now);
                        }
                    }
                    SIGNALS => {
                        let got = self
                            .signals
                            .as_mut()
                            .map(|s| s.pending().count())
                            .unwrap_or(0);
                        if got > 0 {
                            info!("signal received: shutting down");
                            self.begin_shutdown(now);
                        }
                    }
                    Token(id) => {
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.on_readable(id, now);
                        }
                        if ev.is_writable() {
                            self.flush_one(id);
                        }
                    }
                }
            }
            let again = std::mem::take(&mut self.again);
            for &(id, gen) in &again {
                if let Some(c) = self.conns.get_mut(id).filter(|c| c.gen == gen) {
                    c.again = false;
                    self.on_readable(id, now);
                }
            }
            if self.again.is_empty() {
                let mut again = again;
                again.clear();
                self.again = again; // keep the allocation
            }
            if let Some(t) = self.accept_paused_until {
                if now >= t {
                    self.accept_paused_until = None;
                    for i in 0..self.listeners.len() {
                        self.accept(i, now);
                    }
                }
            }
            {
                let (broker, mut sink) = self.split();
                broker.expire(now, &mut sink);
            }
            if now >= self.next_tick {
                self.next_tick = now + TICK;
                self.housekeeping(now);
            }
            self.process_closes(now);
            self.flush_dirty();
            self.metrics.end_pass(now, &self.broker);
            if let Some(deadline) = self.shutdown_deadline {
                if self.conns.is_empty() {
                    info!("shut down: every connection closed");
                    return Ok(());
                }
                if now >= deadline {
                    warn!(
                        "shut down: grace period over, {} connections dropped unflushed",
                        self.conns.len()
                    );
                    return Ok(());
                }
            }
        }
    }

    fn poll_timeout(&self, now: Instant) -> Duration {
        if !self.again.is_empty() || !self.closes.is_empty() {
            return Duration::ZERO;
        }
        let mut next = self.next_tick;
        if let Some(d) = self.broker.next_deadline() {
            next = next.min(d);
        }
        if let Some(d) = self.accept_paused_until {
            next = next.min(d);
        }
        next.saturating_duration_since(now)
    }

    fn split(&mut self) -> (&mut Broker, Sink<'_>) {
        (
            &mut self.broker,
            Sink {
                conns: &mut self.conns,
                dirty: &mut self.dirty,
                closes: &mut self.closes,
                max_out: self.cfg.max_outbound_bytes,
                bytes_out: &mut self.metrics.bytes_out,
            },
        )
    }

    fn accept(&mut self, index: usize, now: Instant) {
        if self.accept_paused_until.is_some() || self.shutdown_deadline.is_some() {
            return;
        }
        loop {
            let Some(listener) = self.listeners.get(index) else {
                return;
            };
            let scheme = listener.bound.scheme;
            let (mut sock, peer, ip) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS, ...: back off and keep serving the others.
                    warn!("accept failed: {e}; pausing accepts for 100ms");
                    self.accept_paused_until = Some(now + Duration::from_millis(100));
                    break;
                }
            };
            self.metrics.accepted += 1;
            // Unauthenticated connections have their own budget: a source address over
            // its share is refused; a full budget makes room by dropping the oldest, so
            // idle sockets cannot keep out the peers that finish their handshake.
            let over_ip = ip.is_some_and(|ip| {
                self.hs.per_ip.get(&ip).copied().unwrap_or(0) as usize
                    >= self.cfg.max_handshakes_per_ip
            });
            if over_ip {
                self.metrics.refused += 1;
                let refusal = if scheme.is_websocket() {
                    http::response(
                        503,
                        "text/plain",
                        b"too many handshakes from this address\n",
                    )
                } else {
                    b"MM ERR too many handshakes from this address\r\n".to_vec()
                };
                let _ = sock.write(&refusal);
                let _ = sock.shutdown(std::net::Shutdown::Both);
                warn_limited(&mut self.metrics.warned_refused, || {
                    format!("refused {peer}: too many handshakes from this address")
                });
                continue;
            }
            if !self.make_room_for_handshake(now) {
                self.metrics.refused += 1;
                let refusal = if scheme.is_websocket() {
                    http::response(503, "text/plain", b"server busy: too many handshakes\n")
                } else {
                    b"MM ERR server busy: too many handshakes\r\n".to_vec()
                };
                let _ = sock.write(&refusal);
                let _ = sock.shutdown(std::net::Shutdown::Both);
                continue;
            }
            let link = match (scheme, &self.tls) {
                (Scheme::Wss, Some(tls)) => match Link::tls(sock, tls) {
                    Ok(l) => l,
                    Err(e) => {
                        warn!("TLS session for {peer}: {e}");
                        continue;
                    }
                },
                _ => Link::plain(sock),
            };
            let framing = if scheme.is_websocket() {
                Framing::WebSocket
            } else {
                Framing::Raw
            };
            let entry = self.conns.vacant_entry();
            let id = entry.key();
            self.next_gen += 1;
            let gen = self.next_gen;
            let mut link = link;
            if let Err(e) = self.poll.registry().register(
                &mut link,
                Token(id),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                warn!("register {peer}: {e}");
                continue;
            }
            entry.insert(Conn {
                gen,
                link,
                peer: peer.clone(),
                ip,
                in_hs: true,
                scan: FrameScan::default(),
                backlog: false,
                again: false,
                listener: index,
                framing,
                phase: if scheme.is_websocket() {
                    Phase::Http
                } else {
                    Phase::RawKey
                },
                ws: None,
                dec: None,
                out: OutQueue::new(framing),
                http_buf: Vec::new(),
                created: now,
                last_rx: now,
                last_ping: now,
                rx_bytes: 0,
                dirty: false,
                slow: false,
                close_deadline: None,
                write_shut: false,
                peer_eof: false,
                close_reason: CloseReason::Normal,
                who: None,
            });
            self.hs.count += 1;
            if let Some(ip) = ip {
                *self.hs.per_ip.entry(ip).or_insert(0) += 1;
            }
            self.hs.order.push_back((id, gen));
            debug!("[{id}] accepted {peer} on {}", scheme.name());
            // Most clients send at once: read what is there now, so a connection that
            // has spoken is never taken for an idle one.
            self.on_readable(id, now);
        }
    }

    /// Make room in a full handshake budget by dropping one unauthenticated connection:
    /// the oldest that has sent nothing, else the oldest. A candidate that has sent
    /// nothing is read once more first (its bytes may be waiting in the socket, not yet
    /// seen): one that has spoken is kept. False if there is no room (never expected:
    /// a full budget always holds a connection to drop).
    fn make_room_for_handshake(&mut self, now: Instant) -> bool {
        // Forget entries of connections that have left the budget.
        while let Some(&(id, gen)) = self.hs.order.front() {
            if self.conns.get(id).is_some_and(|c| c.gen == gen && c.in_hs) {
                break;
            }
            self.hs.order.pop_front();
        }
        if self.hs.count < self.cfg.max_handshakes {
            return true;
        }
        let silent =
            |c: &Conn| matches!(c.phase, Phase::Http | Phase::RawKey) && c.http_buf.is_empty();
        let mut oldest = None;
        let mut candidates = Vec::new();
        for &(id, gen) in &self.hs.order {
            let Some(c) = self.conns.get(id).filter(|c| c.gen == gen && c.in_hs) else {
                continue;
            };
            oldest.get_or_insert(id);
            if silent(c) {
                candidates.push(id);
                if candidates.len() == MAX_EVICTION_CHECKS {
                    break;
                }
            }
        }
        for id in candidates {
            self.on_readable(id, now);
            if self.hs.count < self.cfg.max_handshakes {
                return true; // it left (hung up, or was answered and closed)
            }
            if self.conns.get(id).is_some_and(|c| c.in_hs && silent(c)) {
                return self.evict(id);
            }
        }
        match oldest {
            Some(id) if self.conns.get(id).is_some_and(|c| c.in_hs) => self.evict(id),
            _ => self.hs.count < self.cfg.max_handshakes,
        }
    }

    fn evict(&mut self, id: ConnId) -> bool {
        warn_limited(&mut self.metrics.warned_refused, || {
            format!("[{id}] handshake budget full: dropping an unauthenticated connection")
        });
        self.remove(id, CloseReason::Evicted);
        true
    }

    /// The connection is authenticated or gone: it leaves the handshake budget.
    fn leave_handshake(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        if !c.in_hs {
            return;
        }
        c.in_hs = false;
        self.hs.count -= 1;
        if let Some(ip) = c.ip {
            if let Some(n) = self.hs.per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.hs.per_ip.remove(&ip);
                }
            }
        }
    }

    /// Connections past their handshake (authenticated, or echo sessions), including
    /// those closing.
    fn established(&self) -> usize {
        self.conns.len() - self.hs.count
    }

    /// Read this connection again next pass (its budget ran out with data waiting).
    fn push_again(&mut self, id: ConnId) {
        if let Some(c) = self.conns.get_mut(id) {
            if !c.again {
                c.again = true;
                self.again.push((id, c.gen));
            }
        }
    }

    fn on_readable(&mut self, id: ConnId, now: Instant) {
        let Some(c) = self.conns.get(id) else {
            return;
        };
        match c.phase {
            Phase::Http => self.read_http(id, now),
            Phase::RawKey => self.read_raw_key(id, now),
            Phase::Open | Phase::Echo if c.framing == Framing::Raw => self.read_raw(id, now),
            Phase::AwaitKey | Phase::Open | Phase::Echo => self.read_ws(id, now),
            Phase::Closing => self.read_closing(id),
        }
    }

    fn read_http(&mut self, id: ConnId, now: Instant) {
        let full = self.established() >= self.cfg.max_connections;
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        let mut chunk = [0u8; 4096];
        let request = loop {
            match c.link.read(&mut chunk) {
                Ok(0) => return self.remove(id, CloseReason::PeerGone),
                Ok(n) => {
                    self.metrics.bytes_in += n as u64;
                    c.http_buf.extend_from_slice(&chunk[..n]);
                    match http::parse(&c.http_buf) {
                        Request::Partial if c.http_buf.len() < HTTP_READ_CAP => continue,
                        Request::Partial => break Request::Bad("request head too large"),
                        r => break r,
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.remove(id, CloseReason::PeerGone),
            }
        };
        match request {
            Request::Upgrade { .. } if full => {
                self.metrics.refused += 1;
                warn_limited(&mut self.metrics.warned_refused, || {
                    format!("refused {}: connection limit reached", c.peer)
                });
                let resp = http::response(503, "text/plain", b"too many connections\n");
                self.http_close(id, &resp, now, CloseReason::Limit);
            }
            Request::Upgrade { accept, consumed } => {
                let rest = c.http_buf.split_off(consumed.min(c.http_buf.len()));
                c.http_buf = Vec::new();
                c.out.push_bytes(&http::upgrade_response(&accept));
                // Frames that came with the request count like any others.
                if !c.scan.feed(&rest, self.cfg.max_fragments) {
                    return self.close_with(
                        id,
                        1008,
                        "too many fragments",
                        now,
                        CloseReason::Limit,
                    );
                }
                c.ws = Some(WebSocketContext::from_partially_read(
                    rest,
                    WsRole::Server,
                    Some(self.ws_config_key),
                ));
                c.phase = if self.cfg.echo {
                    Phase::Echo
                } else {
                    Phase::AwaitKey
                };
                c.last_rx = now;
                self.mark_dirty(id);
                if self.cfg.echo {
                    self.leave_handshake(id);
                }
                self.read_ws(id, now);
            }
            Request::Plain { method, path } => {
                let resp = self.plain_http(id, &method, &path);
                self.metrics.http_requests += 1;
                self.http_close(id, &resp, now, CloseReason::Http);
            }
            Request::Bad(why) => {
                debug!("[{id}] bad HTTP request: {why}");
                let resp = http::response(400, "text/plain", format!("{why}\n").as_bytes());
                self.http_close(id, &resp, now, CloseReason::ProtocolError);
            }
            Request::Partial => {}
        }
    }

    /// The answer to a plain HTTP request on connection `id`, limited to the pages its
    /// listener serves (`?pages=`).
    fn plain_http(&self, id: ConnId, method: &str, path: &str) -> Vec<u8> {
        let pages = self
            .conns
            .get(id)
            .and_then(|c| self.listeners.get(c.listener))
            .map_or(web::Pages::NONE, |l| l.bound.pages);
        let view = web::View {
            broker: &self.broker,
            metrics: &self.metrics,
            open: self.conns.len(),
            cfg: &self.cfg,
            pages,
        };
        web::respond(method, path, &view)
    }

    /// Queue an HTTP response and hang up after it is written.
    fn http_close(&mut self, id: ConnId, resp: &[u8], now: Instant, why: CloseReason) {
        if let Some(c) = self.conns.get_mut(id) {
            c.http_buf = Vec::new();
            c.out.push_bytes(resp);
            c.phase = Phase::Closing;
            c.close_reason = why;
            c.close_deadline = Some(now + CLOSE_LINGER);
            self.mark_dirty(id);
        }
    }

    fn budget(&self) -> Budget {
        Budget::new(self.cfg.max_read_per_turn, self.cfg.max_messages_per_turn)
    }

    /// One read turn of a WebSocket connection: messages left in its decoder first, then
    /// frames from the socket, until `WouldBlock` or the turn's budget is spent.
    fn read_ws(&mut self, id: ConnId, now: Instant) {
        let mut budget = self.budget();
        if !self.drain_decoder(id, now, &mut budget) {
            return;
        }
        let max_frames = self.cfg.max_fragments;
        // A peer that pings and never reads would fill its queue with pongs.
        let max_pings = self.cfg.max_unanswered_pings;
        loop {
            let Some(c) = self.conns.get_mut(id) else {
                return;
            };
            if !matches!(c.phase, Phase::AwaitKey | Phase::Open | Phase::Echo) {
                return;
            }
            if budget.spent() {
                return self.push_again(id);
            }
            let Some(ws) = c.ws.as_mut() else {
                return;
            };
            let before = c.rx_bytes;
            let step = ws_step(
                ws,
                &mut c.link,
                &mut c.out,
                &mut c.rx_bytes,
                &mut c.scan,
                max_frames,
                &mut budget,
            );
            self.metrics.bytes_in += c.rx_bytes - before;
            if !c.out.is_empty() && !c.dirty {
                c.dirty = true;
                self.dirty.push(id);
            }
            match step {
                Step::Msg(WsMessage::Text(t)) => {
                    c.last_rx = now;
                    if !self.on_data(id, t.as_bytes(), true, now, &mut budget) {
                        return;
                    }
                }
                Step::Msg(WsMessage::Binary(b)) => {
                    c.last_rx = now;
                    if !self.on_data(id, &b, false, now, &mut budget) {
                        return;
                    }
                }
                Step::Msg(WsMessage::Ping(_) | WsMessage::Frame(_)) => {
                    // Not activity for the idle timeout: a peer that pings and never
                    // reads is idle. Its pongs count against the outbound cap, and one
                    // that leaves more than a few unread is closed.
                    if c.out.pongs_unsent() > max_pings {
                        return self.close_with(
                            id,
                            1008,
                            "too many pings",
                            now,
                            CloseReason::Limit,
                        );
                    }
                }
                Step::Msg(WsMessage::Pong(_)) => {
                    // The answer to our ping: the peer reads what we send.
                    c.last_rx = now;
                }
                Step::Msg(WsMessage::Close(_)) => {
                    // tungstenite queued the close reply; flush it and hang up.
                    if let Some(ws) = c.ws.as_mut() {
                        let _ = ws.flush(&mut Io::writer(&mut c.link, &mut c.out, &mut c.rx_bytes));
                    }
                    self.enter_closing(id, now, CloseReason::Normal);
                    return;
                }
                Step::TooManyFrames => {
                    self.warn_protocol(id, "too many frames in one message");
                    return self.close_with(
                        id,
                        1008,
                        "too many fragments",
                        now,
                        CloseReason::Limit,
                    );
                }
                Step::Spent => return self.push_again(id),
                Step::Blocked => return,
                Step::Error(e) => return self.ws_error(id, e, now),
            }
        }
    }

    fn ws_error(&mut self, id: ConnId, e: tungstenite::Error, now: Instant) {
        use tungstenite::error::{CapacityError, Error as E, ProtocolError as P};
        match e {
            E::Io(ref io) if io.kind() == io::ErrorKind::WouldBlock => {}
            E::Io(ref io) if io.kind() == io::ErrorKind::Interrupted => self.push_again(id),
            E::ConnectionClosed | E::AlreadyClosed | E::Io(_) => {
                self.remove(id, CloseReason::PeerGone)
            }
            E::Protocol(P::ResetWithoutClosingHandshake) => self.remove(id, CloseReason::PeerGone),
            E::Capacity(CapacityError::MessageTooLong { .. }) => {
                self.close_with(id, 1009, "message too long", now, CloseReason::Limit)
            }
            E::Capacity(_) => self.close_with(id, 1009, "frame too large", now, CloseReason::Limit),
            E::Utf8(_) => {
                self.warn_protocol(id, "invalid utf-8");
                self.close_with(id, 1007, "invalid utf-8", now, CloseReason::ProtocolError)
            }
            E::Protocol(p) => {
                self.warn_protocol(id, &p.to_string());
                self.close_with(
                    id,
                    1002,
                    "websocket protocol error",
                    now,
                    CloseReason::ProtocolError,
                )
            }
            other => {
                self.warn_protocol(id, &other.to_string());
                self.close_with(id, 1002, "websocket error", now, CloseReason::ProtocolError)
            }
        }
    }

    fn warn_protocol(&mut self, id: ConnId, what: &str) {
        let peer = self.conns.get(id).map(|c| c.peer.clone());
        warn_limited(&mut self.metrics.warned_protocol, || match peer {
            Some(peer) => format!("[{id}] websocket protocol error from {peer}: {what}"),
            None => format!("[{id}] websocket protocol error: {what}"),
        });
    }

    /// Handle one received data message (WebSocket) or chunk (raw stream). Returns false
    /// when the read turn must end here (connection closing or gone, or the message
    /// budget spent with messages left in the decoder: then it is on the `again` list).
    fn on_data(
        &mut self,
        id: ConnId,
        data: &[u8],
        text: bool,
        now: Instant,
        budget: &mut Budget,
    ) -> bool {
        let Some(c) = self.conns.get_mut(id) else {
            return false;
        };
        match c.phase {
            Phase::Echo => {
                let pkt = Rc::new(Packet::with_kind(data, text));
                let (_, mut sink) = self.split();
                sink.send(id, &pkt);
                true
            }
            Phase::AwaitKey => {
                self.admit(id, data, now);
                self.conns.get(id).is_some_and(|c| c.phase == Phase::Open)
            }
            Phase::Open => {
                if let Some(dec) = c.dec.as_mut() {
                    if text {
                        dec.feed_utf8(data); // tungstenite checked it
                    } else {
                        dec.feed(data);
                    }
                }
                c.backlog = true;
                self.drain_decoder(id, now, budget)
            }
            Phase::Http | Phase::RawKey | Phase::Closing => false,
        }
    }

    /// Hand the messages waiting in the connection's decoder to the broker, one per unit
    /// of the message budget. Returns false when the turn must end (closing, gone, or
    /// budget spent with messages left: then it is on the `again` list).
    fn drain_decoder(&mut self, id: ConnId, now: Instant, budget: &mut Budget) -> bool {
        let Some(c) = self.conns.get_mut(id) else {
            return false;
        };
        if !c.backlog {
            return true;
        }
        let Some(mut dec) = c.dec.take() else {
            c.backlog = false;
            return true;
        };
        let mut failed = None;
        let mut drained = false;
        {
            let (broker, mut sink) = self.split();
            while budget.msgs > 0 {
                match dec.next() {
                    Ok(Some(Decoded::Message(m))) => broker.apply(id, &m, now, &mut sink),
                    Ok(Some(Decoded::Malformed(m))) => broker.malformed(id, &m, &mut sink),
                    Ok(None) => {
                        drained = true;
                        break;
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
                budget.msgs -= 1;
            }
        }
        if let Some(e) = failed {
            warn_limited(&mut self.metrics.warned_protocol, || {
                format!("[{id}] framing violation: {e}")
            });
            let why = if e.close_code() == 1009 {
                CloseReason::Limit
            } else {
                CloseReason::ProtocolError
            };
            self.close_with(id, e.close_code(), e.reason(), now, why);
            return false;
        }
        let Some(c) = self.conns.get_mut(id) else {
            return false;
        };
        if c.phase != Phase::Open {
            // Closed by what it sent (e.g. cut off as a slow consumer of its own echo).
            return false;
        }
        if drained {
            // Nothing pending: the decoder keeps small buffers for the next message and
            // gives back what a large one left behind.
            if !dec.needs_more() {
                dec.shrink();
            }
            c.backlog = false;
            c.dec = Some(dec);
            true
        } else {
            c.dec = Some(dec);
            self.push_again(id);
            false
        }
    }

    /// Check a presented key (and the listener's roles); admit or refuse.
    fn admit(&mut self, id: ConnId, key: &[u8], now: Instant) {
        let full = self.established() >= self.cfg.max_connections;
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        let role = self.cfg.keys.authenticate(key);
        let allowed = match (role, self.listeners.get(c.listener)) {
            (Some(r), Some(l)) => l.bound.allows(r),
            (Some(_), None) => true, // listeners are gone during shutdown
            (None, _) => false,
        };
        let Some(role) = role.filter(|_| allowed) else {
            let why = if role.is_some() {
                "role not allowed here"
            } else {
                "bad key"
            };
            warn_limited(&mut self.metrics.warned_bad_key, || {
                format!("{why} from {}", c.peer)
            });
            return self.close_with(id, 1008, why, now, CloseReason::BadKey);
        };
        if full {
            self.metrics.refused += 1;
            warn_limited(&mut self.metrics.warned_refused, || {
                format!("refused {}: connection limit reached", c.peer)
            });
            return self.close_with(id, 1008, "too many connections", now, CloseReason::Limit);
        }
        let cid = self.broker.connect(id, role);
        c.phase = Phase::Open;
        c.dec = Some(Box::new(Decoder::new(self.cfg.limits)));
        if let Some(ws) = c.ws.as_mut() {
            let full = self.ws_config;
            ws.set_config(|w| *w = full);
        }
        debug!("[{id}] {} {cid} connected from {}", role.name(), c.peer);
        c.who = Some(format!("{} {cid}", role.name()).into());
        if c.framing == Framing::Raw {
            c.out.push_bytes(b"MM OK\r\n");
            c.out.push_bytes(cid.as_bytes());
            c.out.push_bytes(b"\r\n");
            self.mark_dirty(id);
        } else {
            let (_, mut sink) = self.split();
            sink.send(id, &Rc::new(Packet::raw(b"MM OK")));
            sink.send(id, &Rc::new(Packet::raw(cid.as_bytes())));
        }
        self.leave_handshake(id);
    }

    /// Raw transport: read the key line (at most a line's length), then hand what
    /// follows to the decoder.
    fn read_raw_key(&mut self, id: ConnId, now: Instant) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        let cap = self.cfg.limits.max_line + 2;
        let mut chunk = [0u8; 4096];
        loop {
            let room = (cap + 1)
                .saturating_sub(c.http_buf.len())
                .clamp(1, chunk.len());
            match c.link.read(&mut chunk[..room]) {
                Ok(0) => return self.remove(id, CloseReason::PeerGone),
                Ok(n) => {
                    self.metrics.bytes_in += n as u64;
                    c.last_rx = now;
                    c.http_buf.extend_from_slice(&chunk[..n]);
                    if let Some(lf) = memchr::memchr(b'\n', &c.http_buf) {
                        let rest = c.http_buf.split_off(lf + 1);
                        let key = std::mem::take(&mut c.http_buf);
                        self.admit(id, &key, now);
                        let mut budget = self.budget();
                        if !rest.is_empty() && !self.on_data(id, &rest, false, now, &mut budget) {
                            return;
                        }
                        return self.read_raw_with(id, now, budget);
                    }
                    if c.http_buf.len() > cap {
                        return self.close_with(
                            id,
                            1009,
                            "key line too long",
                            now,
                            CloseReason::Limit,
                        );
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.remove(id, CloseReason::PeerGone),
            }
        }
    }

    /// Raw transport: one read turn (messages left in the decoder first, then stream
    /// bytes), bounded by the turn's budget.
    fn read_raw(&mut self, id: ConnId, now: Instant) {
        let budget = self.budget();
        self.read_raw_with(id, now, budget);
    }

    fn read_raw_with(&mut self, id: ConnId, now: Instant, mut budget: Budget) {
        if !self.drain_decoder(id, now, &mut budget) {
            return;
        }
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let Some(c) = self.conns.get_mut(id) else {
                return;
            };
            if !matches!(c.phase, Phase::Open | Phase::Echo) {
                return;
            }
            if budget.spent() {
                return self.push_again(id);
            }
            let room = chunk.len().min(budget.bytes);
            match c.link.read(&mut chunk[..room]) {
                Ok(0) => return self.remove(id, CloseReason::PeerGone),
                Ok(n) => {
                    budget.bytes -= n;
                    self.metrics.bytes_in += n as u64;
                    c.last_rx = now;
                    if c.phase == Phase::Echo {
                        c.out.push_bytes(&chunk[..n]);
                        self.mark_dirty(id);
                    } else if !self.on_data(id, &chunk[..n], false, now, &mut budget) {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.remove(id, CloseReason::PeerGone),
            }
        }
    }

    /// Send a close frame (after what is queued, or instead of it for a slow
    /// consumer), forget the connection's routing state and hang up once flushed.
    fn close_with(
        &mut self,
        id: ConnId,
        code: u16,
        reason: &'static str,
        now: Instant,
        why: CloseReason,
    ) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        if c.phase == Phase::Closing {
            return;
        }
        if why == CloseReason::SlowConsumer {
            c.out.drop_unsent();
            self.metrics.slow_consumers += 1;
            warn_limited(&mut self.metrics.warned_slow, || {
                format!("[{id}] slow consumer {} cut off", c.peer)
            });
        }
        if c.framing == Framing::Raw {
            // No close frame on a raw stream: a last line says why.
            if c.phase == Phase::RawKey || c.phase == Phase::AwaitKey {
                c.out.push_bytes(format!("MM ERR {reason}\r\n").as_bytes());
            } else {
                let pkt = crate::broker::error_packet(
                    b"CLOSE",
                    code.to_string().as_bytes(),
                    reason,
                    None,
                );
                c.out.push_packet(&Rc::new(pkt));
            }
        } else if let Some(ws) = c.ws.as_mut() {
            let frame = CloseFrame {
                code: CloseCode::from(code),
                reason: reason.into(),
            };
            let _ = ws.close(
                &mut Io::writer(&mut c.link, &mut c.out, &mut c.rx_bytes),
                Some(frame),
            );
        }
        self.enter_closing(id, now, why);
    }

    fn enter_closing(&mut self, id: ConnId, now: Instant, why: CloseReason) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        c.phase = Phase::Closing;
        c.dec = None;
        c.close_reason = why;
        let mut deadline = now + CLOSE_LINGER;
        if let Some(d) = self.shutdown_deadline {
            deadline = deadline.min(d);
        }
        c.close_deadline = Some(deadline);
        self.mark_dirty(id);
        let (broker, mut sink) = self.split();
        broker.disconnect(id, &mut sink);
    }

    fn read_closing(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        let mut scratch = [0u8; 4096];
        let mut left = self.cfg.max_read_per_turn;
        while left > 0 {
            let room = scratch.len().min(left);
            match c.link.read(&mut scratch[..room]) {
                Ok(0) => {
                    c.peer_eof = true;
                    if c.out.is_empty() {
                        let why = c.close_reason;
                        self.remove(id, why);
                    }
                    return;
                }
                Ok(n) => {
                    left -= n;
                    self.metrics.bytes_in += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    let why = c.close_reason;
                    return self.remove(id, why);
                }
            }
        }
        self.push_again(id);
    }

    fn mark_dirty(&mut self, id: ConnId) {
        if let Some(c) = self.conns.get_mut(id) {
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(id);
            }
        }
    }

    fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for &id in &dirty {
            if let Some(c) = self.conns.get_mut(id) {
                c.dirty = false;
            }
            self.flush_one(id);
        }
        dirty.clear();
        if self.dirty.is_empty() {
            self.dirty = dirty; // keep the allocation
        }
    }

    fn flush_one(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        if !c.out.is_empty() {
            match c.out.write_to(&mut c.link) {
                Ok(n) => self.metrics.bytes_out += n as u64,
                Err(_) => {
                    let why = match c.phase {
                        Phase::Closing => c.close_reason,
                        _ => CloseReason::PeerGone,
                    };
                    return self.remove(id, why);
                }
            }
        }
        if c.link.tls_pending() && c.link.flush_tls().is_err() {
            let why = c.close_reason;
            return self.remove(id, why);
        }
        if c.phase == Phase::Closing && c.out.is_empty() && !c.link.tls_pending() {
            if c.peer_eof {
                let why = c.close_reason;
                return self.remove(id, why);
            }
            if !c.write_shut {
                c.write_shut = true;
                c.link.send_close_notify();
                let _ = c.link.flush_tls();
                let _ = c.link.shutdown(std::net::Shutdown::Write);
            }
        }
    }

    fn process_closes(&mut self, now: Instant) {
        while let Some(cl) = self.closes.pop() {
            if self.conns.get(cl.id).is_none_or(|c| c.gen != cl.gen) {
                continue; // that connection is gone; its slot may hold another
            }
            if cl.why == CloseReason::PeerGone {
                self.remove(cl.id, cl.why);
            } else {
                self.close_with(cl.id, cl.code, cl.reason, now, cl.why);
            }
        }
    }

    fn remove(&mut self, id: ConnId, why: CloseReason) {
        if !self.conns.contains(id) {
            return;
        }
        self.leave_handshake(id);
        let mut c = self.conns.remove(id);
        let _ = self.poll.registry().deregister(&mut c.link);
        {
            let (broker, mut sink) = self.split();
            broker.disconnect(id, &mut sink);
        }
        self.metrics.count_close(why);
        debug!(
            "[{id}] {} from {} closed ({})",
            c.who.as_deref().unwrap_or("unauthenticated"),
            c.peer,
            why.name()
        );
    }

    fn housekeeping(&mut self, now: Instant) {
        let mut expired = Vec::new();
        let mut ping = Vec::new();
        for (id, c) in self.conns.iter_mut() {
            c.out.trim();
            match c.phase {
                Phase::Http | Phase::AwaitKey | Phase::RawKey => {
                    if now.duration_since(c.created) >= self.cfg.handshake_timeout {
                        expired.push((id, c.phase));
                    }
                }
                // Raw streams have no ping; TCP keepalive and the peer's own
                // timeouts look after them.
                Phase::Open | Phase::Echo if c.framing == Framing::Raw => {}
                Phase::Open | Phase::Echo => {
                    if now.duration_since(c.last_rx) >= self.cfg.idle_timeout {
                        expired.push((id, c.phase));
                    } else if now.duration_since(c.last_rx) >= self.cfg.ping_interval
                        && now.duration_since(c.last_ping) >= self.cfg.ping_interval
                    {
                        ping.push(id);
                    }
                }
                Phase::Closing => {
                    if c.close_deadline.is_some_and(|d| now >= d) {
                        expired.push((id, c.phase));
                    }
                }
            }
        }
        for (id, phase) in expired {
            match phase {
                Phase::Http => self.remove(id, CloseReason::Timeout),
                Phase::AwaitKey | Phase::RawKey => {
                    self.close_with(id, 1008, "handshake timeout", now, CloseReason::Timeout)
                }
                Phase::Open | Phase::Echo => {
                    self.close_with(id, 1001, "idle timeout", now, CloseReason::Idle)
                }
                Phase::Closing => {
                    let why = self.conns.get(id).map(|c| c.close_reason);
                    self.remove(id, why.unwrap_or(CloseReason::Normal));
                }
            }
        }
        for id in ping {
            if let Some(c) = self.conns.get_mut(id) {
                c.last_ping = now;
                if let Some(ws) = c.ws.as_mut() {
                    let _ = ws.write(
                        &mut Io::writer(&mut c.link, &mut c.out, &mut c.rx_bytes),
                        WsMessage::Ping(Default::default()),
                    );
                }
                self.mark_dirty(id);
            }
        }
    }

    fn begin_shutdown(&mut self, now: Instant) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        let deadline = now + self.cfg.shutdown_grace;
        self.shutdown_deadline = Some(deadline);
        for mut l in std::mem::take(&mut self.listeners) {
            let _ = self.poll.registry().deregister(&mut l);
        }
        info!(
            "shutting down: closing {} connections (grace {:?})",
            self.conns.len(),
            self.cfg.shutdown_grace
        );
        let ids: Vec<(ConnId, Phase)> = self.conns.iter().map(|(id, c)| (id, c.phase)).collect();
        for (id, phase) in ids {
            match phase {
                Phase::Http => self.remove(id, CloseReason::Shutdown),
                Phase::Closing => {
                    if let Some(c) = self.conns.get_mut(id) {
                        c.close_deadline = c.close_deadline.map(|d| d.min(deadline));
                    }
                }
                _ => self.close_with(id, 1001, "server shutting down", now, CloseReason::Shutdown),
            }
        }
    }
}

/// A bound listener.
struct Listener {
    sock: ListenSock,
    /// The spec with the port actually bound.
    bound: Listen,
}

enum ListenSock {
    Tcp(TcpListener),
    Unix(UnixListener, std::path::PathBuf),
}

impl Listener {
    fn bind(spec: &Listen) -> io::Result<Listener> {
        let (sock, endpoint) = match &spec.endpoint {
            Endpoint::Tcp(addr) => {
                let l = TcpListener::bind(*addr)?;
                let local = l.local_addr()?;
                (ListenSock::Tcp(l), Endpoint::Tcp(local))
            }
            Endpoint::Unix(path) => {
                // A socket file left by an earlier run is replaced; anything else is not.
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    use std::os::unix::fs::FileTypeExt;
                    if meta.file_type().is_socket() {
                        std::fs::remove_file(path)?;
                    }
                }
                let l = UnixListener::bind(path)?;
                (
                    ListenSock::Unix(l, path.clone()),
                    Endpoint::Unix(path.clone()),
                )
            }
        };
        Ok(Listener {
            sock,
            bound: Listen {
                endpoint,
                ..spec.clone()
            },
        })
    }

    fn accept(&self) -> io::Result<(Sock, String, Option<IpAddr>)> {
        match &self.sock {
            ListenSock::Tcp(l) => {
                let (s, peer) = l.accept()?;
                let _ = s.set_nodelay(true);
                Ok((Sock::Tcp(s), peer.to_string(), Some(peer.ip())))
            }
            ListenSock::Unix(l, path) => {
                let (s, _) = l.accept()?;
                Ok((Sock::Unix(s), format!("unix:{}", path.display()), None))
            }
        }
    }
}

impl mio::event::Source for Listener {
    fn register(&mut self, r: &mio::Registry, t: Token, i: Interest) -> io::Result<()> {
        match &mut self.sock {
            ListenSock::Tcp(l) => l.register(r, t, i),
            ListenSock::Unix(l, _) => l.register(r, t, i),
        }
    }
    fn reregister(&mut self, r: &mio::Registry, t: Token, i: Interest) -> io::Result<()> {
        match &mut self.sock {
            ListenSock::Tcp(l) => l.reregister(r, t, i),
            ListenSock::Unix(l, _) => l.reregister(r, t, i),
        }
    }
    fn deregister(&mut self, r: &mio::Registry) -> io::Result<()> {
        match &mut self.sock {
            ListenSock::Tcp(l) => l.deregister(r),
            ListenSock::Unix(l, _) => l.deregister(r),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let ListenSock::Unix(_, path) = &self.sock {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Log a warning, at most 10 per second-long window per kind, so a flood of bad peers
/// cannot flood the log.
fn warn_limited(state: &mut (Instant, u32), msg: impl FnOnce() -> String) {
    let now = Instant::now();
    if now.duration_since(state.0) >= Duration::from_secs(1) {
        if state.1 > 10 {
            warn!("({} similar warnings suppressed)", state.1 - 10);
        }
        *state = (now, 0);
    }
    state.1 += 1;
    if state.1 <= 10 {
        warn!("{}", msg());
    }
}

/// A server running on its own thread (for tests and embedding).
pub struct Running {
    /// The first bound TCP address.
    pub addr: SocketAddr,
    /// Every listener as bound (ports filled in).
    pub listeners: Vec<Listen>,
    stop: StopHandle,
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl Running {
    /// Bind and run `cfg` on a new thread. The server itself is single-threaded and not
    /// `Send`, so it is built on the thread that runs it.
    pub fn spawn(cfg: Config) -> io::Result<Running> {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("middleman".into())
            .spawn(move || match Server::bind(cfg) {
                Ok(server) => {
                    let _ = tx.send(Ok((
                        server.local_addr(),
                        server.listeners(),
                        server.stop_handle(),
                    )));
                    server.run()
                }
                Err(e) => {
                    let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                    Err(e)
                }
            })?;
        let (addr, listeners, stop) = rx
            .recv()
            .map_err(|_| io::Error::other("server thread ended before binding"))??;
        Ok(Running {
            addr,
            listeners,
            stop,
            thread: Some(thread),
        })
    }

    /// A handle that stops the server.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Stop gracefully and wait for the loop to end.
    pub fn stop(mut self) -> io::Result<()> {
        self.stop.stop();
        self.join()
    }

    fn join(&mut self) -> io::Result<()> {
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| io::Error::other("server thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop.stop();
            let _ = self.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> Server {
        let mut cfg = Config::on("127.0.0.1:0".parse().expect("address"));
        cfg.keys.service = vec!["k".into()];
        Server::bind(cfg).expect("bind")
    }

    /// A close decided for a connection that is then removed in the same pass must not
    /// reach a new connection that reuses its slab key.
    #[test]
    fn a_close_never_reaches_the_next_owner_of_a_slab_key() {
        let mut s = server();
        let addr = s.local_addr();
        let now = Instant::now();
        let _a = std::net::TcpStream::connect(addr).expect("connect a");
        s.accept(0, now);
        let (id, gen) = s
            .conns
            .iter()
            .map(|(id, c)| (id, c.gen))
            .next()
            .expect("a accepted");
        s.closes.push(Close {
            id,
            gen,
            code: 1008,
            reason: "slow consumer",
            why: CloseReason::SlowConsumer,
        });
        s.remove(id, CloseReason::PeerGone);
        let _b = std::net::TcpStream::connect(addr).expect("connect b");
        s.accept(0, now);
        let b = s.conns.get(id).expect("b reuses the slot");
        assert_ne!(b.gen, gen);
        s.process_closes(now);
        let b = s.conns.get(id).expect("b still there");
        assert_eq!(
            b.phase,
            Phase::Http,
            "the stale close reached the new connection"
        );
        assert_eq!(s.hs.count, 1);
    }

    /// The handshake budget counts exactly the unauthenticated connections.
    #[test]
    fn handshake_budget_counts_and_evicts_the_silent_first() {
        let mut cfg = Config::on("127.0.0.1:0".parse().expect("address"));
        cfg.max_handshakes = 2;
        let mut s = Server::bind(cfg).expect("bind");
        let addr = s.local_addr();
        let now = Instant::now();
        use std::io::Write as _;
        let mut talker = std::net::TcpStream::connect(addr).expect("connect");
        talker.write_all(b"GET /heal").expect("write");
        let _silent = std::net::TcpStream::connect(addr).expect("connect");
        // Accept both, with a read of the talker's first bytes in between.
        for _ in 0..100 {
            s.accept(0, now);
            if s.conns.len() == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5)); // the kernel's accept queue, bounded
        }
        assert_eq!((s.conns.len(), s.hs.count), (2, 2));
        let ids: Vec<ConnId> = s.conns.iter().map(|(id, _)| id).collect();
        for &id in &ids {
            s.on_readable(id, now);
        }
        // A third: the silent one makes room, the talker stays.
        let _third = std::net::TcpStream::connect(addr).expect("connect");
        for _ in 0..100 {
            s.accept(0, now);
            if s.metrics.accepted == 3 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5)); // the kernel's accept queue, bounded
        }
        assert_eq!(s.hs.count, 2);
        let talker_kept = s.conns.iter().any(|(_, c)| c.http_buf == b"GET /heal");
        assert!(talker_kept, "the connection that spoke was dropped");
        assert_eq!(s.metrics.closed[10], 1, "one eviction");
    }
}
