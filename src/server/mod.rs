//! The event loop: one thread, one `mio::Poll`, connections in a `Slab` keyed by their
//! `Token`. Edge-triggered: accept until `WouldBlock`; read until `WouldBlock` or until
//! the connection's [`Budget`] for the pass is spent (`--max-read-per-turn` bytes from the
//! socket, `--max-messages-per-turn` messages), then the connection waits on the `again`
//! list for the next pass so no peer can hold the loop; queue what the broker sends,
//! write a queue early once it passes a high-water mark, and write every dirty
//! connection once at the end of the pass.
//!
//! Each phase of a connection has its own file, adding to `impl Server`: `accept`
//! (new connections and the handshake budget), `http` (the request: upgrade, or a plain
//! HTTP answer), `api_call` (an HTTP API call: its body, its broker session, the wait
//! for a RES), `ws` (WebSocket read turns, the key, messages to the broker), `raw` (the
//! raw stream transport), `closing` (close frames, lingering, removal), `outbound`
//! (queues and writes), `housekeeping` (timers and shutdown); beside them `listener`
//! (bound sockets) and `running` (a server on its own thread). This file holds the
//! constants, the connection state, and the loop with its token dispatch.

mod accept;
mod api_call;
mod backplane;
mod closing;
mod housekeeping;
mod http;
mod lameduck;
mod listener;
mod outbound;
mod raw;
mod reload;
mod running;
mod ws;

pub mod api;
pub mod conn;
pub mod metrics;
pub mod request;
pub mod transport;
pub mod web;

pub use running::{Running, StopHandle};

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use tungstenite::protocol::{WebSocketConfig, WebSocketContext};

use crate::broker::{random_cid_prefix, Broker, KeyDigest, Role};
use crate::cluster::link::{LinkSettings, NatsLink};
use crate::cluster::node::ClusterSettings;
use crate::config::Config;
use crate::conn::{Budget, Framing, OutQueue, Stage};
use crate::core::websocket::{FrameReader, WsLimits};
use crate::metrics::{CloseReason, Metrics};
use crate::protocol::{Decoder, Spent};
use crate::router::ConnId;
use crate::transport::{load_tls, Endpoint, Link, Listen, Scheme};
use ws::WsEnd;

use accept::Handshakes;
use closing::Close;
use listener::Listener;
use outbound::Sink;

/// Listener `i` has token `LISTENER_BASE - i`.
const LISTENER_BASE: usize = usize::MAX - 16;
const MAX_LISTENERS: usize = 1024;
const WAKER: Token = Token(usize::MAX - 2);
const SIGNALS: Token = Token(usize::MAX - 3);
const BACKPLANE: Token = Token(usize::MAX - 4);

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
const HTTP_READ_CAP: usize = crate::http::MAX_REQUEST + 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading the HTTP request.
    Http,
    /// An HTTP API call (§8.1) accepted: reading its body.
    ApiBody,
    /// An HTTP API call in progress: its broker session is open and what the broker
    /// delivers to it is captured (`Conn::api`), not framed, until the answer is sent.
    ApiWait,
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
    /// Reads the WebSocket frames the peer sends (what a read left unfinished).
    wsr: FrameReader,
    /// A close frame or a framing error that came after messages still waiting in the
    /// decoder: acted on once they are handled.
    ws_end: Option<WsEnd>,
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
    /// The role and the digest of the key it logged in with, so a reload that removes
    /// the key closes it (never the key itself).
    key: Option<(Role, KeyDigest)>,
    /// Boxed: the drain takes it out of the slab and puts it back for every message, and
    /// moving the whole decoder both ways was ~4.6% of the server's time at 64 B.
    dec: Option<Box<Decoder>>,
    out: OutQueue,
    /// The HTTP request being read (and an API call's body), or a raw stream's key line;
    /// after an upgrade, a WebSocket message gathered whole (the key, or a message echo
    /// mode sends back), bounded by the limits.
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
    /// The HTTP API call this connection carries (phases `ApiBody`, `ApiWait`).
    api: Option<Box<api_call::ApiCall>>,
}

impl Conn {
    fn accepts_data(&self) -> bool {
        matches!(self.phase, Phase::Open | Phase::Echo) && !self.slow
    }
}

/// The server: listener, connections, broker and timers on one thread.
pub struct Server {
    poll: Poll,
    listeners: Vec<Listener>,
    tls: Option<Arc<rustls::ServerConfig>>,
    conns: Slab<Conn>,
    broker: Broker,
    cfg: Config,
    /// tungstenite's settings (it writes control frames).
    ws_config: WebSocketConfig,
    /// Limits on WebSocket messages after the key is accepted, and before it.
    ws_limits: WsLimits,
    ws_limits_key: WsLimits,
    dirty: Vec<ConnId>,
    /// Packets the queues let go of this pass, for the broker's pool.
    spent: Spent,
    /// The staging buffer of outbound writes.
    stage: Stage,
    /// The buffer WebSocket read turns read into, one turn at a time.
    rx_buf: Vec<u8>,
    again: Vec<(ConnId, u64)>,
    closes: Vec<Close>,
    hs: Handshakes,
    next_gen: u64,
    stop_flag: Arc<AtomicBool>,
    waker: Arc<Waker>,
    signals: Option<signal_hook_mio::v1_0::Signals>,
    shutdown_deadline: Option<Instant>,
    /// In lame duck (SIGUSR2): the connections still to close and their schedule.
    lame_duck: Option<lameduck::LameDuck>,
    accept_paused_until: Option<Instant>,
    next_tick: Instant,
    metrics: Metrics,
    /// The connection to nats-server, when the server is a cluster node.
    link: Option<NatsLink>,
    /// HTTP API calls the broker delivered something to this pass, (id, generation).
    api_ready: Vec<(ConnId, u64)>,
    /// Counter for the `ReqID`s the HTTP API supplies.
    api_seq: u64,
    /// The earliest deadline of a waiting HTTP API call, if any.
    api_next_deadline: Option<Instant>,
    /// How to read the configuration again (SIGHUP), and what the last reloads did.
    reloader: reload::Reloader,
}

impl Server {
    /// Bind the listener and set up the loop (does not run it).
    pub fn bind(mut cfg: Config) -> io::Result<Server> {
        // Echo mode answers Autobahn's 16 MiB messages: room for a few in flight.
        reload::echo_settings(&mut cfg);
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
            let mut l = Listener::bind(spec, cfg.reuse_port)?;
            poll.registry()
                .register(&mut l, Token(LISTENER_BASE - i), Interest::READABLE)?;
            listeners.push(l);
        }
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let signals = if cfg.handle_signals {
            let mut s = signal_hook_mio::v1_0::Signals::new([
                signal_hook::consts::SIGINT,
                signal_hook::consts::SIGTERM,
                signal_hook::consts::SIGHUP,
                signal_hook::consts::SIGUSR2,
            ])?;
            poll.registry()
                .register(&mut s, SIGNALS, Interest::READABLE)?;
            Some(s)
        } else {
            None
        };
        let (ws_config, ws_limits, ws_limits_key) = reload::ws_configs(&cfg);
        let node_id = random_cid_prefix();
        let mut broker = Broker::new(reload::broker_settings(&cfg), &node_id);
        if cfg.cluster.is_none() {
            broker.set_history(&cfg.history);
            if !cfg.history.rules.is_empty() {
                info!(
                    "history on for {} topic prefix(es), at most {} bytes",
                    cfg.history.rules.len(),
                    cfg.history.max_bytes
                );
            }
        }
        let link = cfg.cluster.as_ref().map(|cc| {
            broker.join_cluster(
                &node_id,
                ClusterSettings {
                    name: cc.name.clone(),
                    max_pending: cc.max_pending,
                    node_timeout: cc.node_timeout,
                    node_name: cc.node_name.clone(),
                    ..ClusterSettings::default()
                },
            );
            info!(
                "cluster {:?}: this is node {node_id}{}, joining through {}",
                cc.name,
                cc.node_name
                    .as_ref()
                    .map_or(String::new(), |n| format!(" ({n})")),
                cc.urls.join(", ")
            );
            if !cfg.history.rules.is_empty() {
                // One epoch and one offset sequence per topic cluster-wide: JetStream's.
                broker.cluster_history(&cfg.history, cc.history_storage);
                info!(
                    "history on for {} topic prefix(es), kept in JetStream (stream MM_{}, {} \
                     storage, at most {} bytes)",
                    cfg.history.rules.len(),
                    cc.name,
                    cc.history_storage.name(),
                    cfg.history.max_bytes
                );
            }
            NatsLink::new(
                LinkSettings {
                    urls: cc.urls.clone(),
                    user: cc.user.clone(),
                    password: cc.password.clone(),
                    token: cc.token.clone(),
                    read_per_turn: cfg.max_read_per_turn.saturating_mul(4),
                    messages_per_turn: cfg.max_messages_per_turn.saturating_mul(4),
                },
                BACKPLANE,
                Instant::now(),
            )
        });
        let mut metrics = Metrics::default();
        metrics.config.1 = reload::config_hash(&cfg);
        Ok(Server {
            poll,
            listeners,
            tls,
            conns: Slab::with_capacity(1024),
            broker,
            ws_config,
            ws_limits,
            ws_limits_key,
            dirty: Vec::new(),
            spent: Spent::default(),
            stage: Stage::default(),
            rx_buf: Vec::new(),
            again: Vec::new(),
            closes: Vec::new(),
            hs: Handshakes::default(),
            next_gen: 0,
            stop_flag: Arc::new(AtomicBool::new(false)),
            waker,
            signals,
            shutdown_deadline: None,
            lame_duck: None,
            accept_paused_until: None,
            next_tick: Instant::now() + TICK,
            metrics,
            link,
            api_ready: Vec::new(),
            api_seq: 0,
            api_next_deadline: None,
            reloader: reload::Reloader::new(&cfg),
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
                    BACKPLANE => self.backplane_event(now),
                    SIGNALS => {
                        // pending() gives each signal number once however many came,
                        // so a storm of SIGHUP is one reload per pass at most.
                        let got: Vec<i32> = self
                            .signals
                            .as_mut()
                            .map(|s| s.pending().collect())
                            .unwrap_or_default();
                        for sig in got {
                            match sig {
                                signal_hook::consts::SIGHUP => self.reload(now),
                                signal_hook::consts::SIGUSR2 => self.begin_lame_duck(now),
                                _ => {
                                    info!("signal received: shutting down");
                                    self.begin_shutdown(now);
                                }
                            }
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
            self.backplane_again(now);
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
                self.backplane_tick(now);
            }
            self.finish_api_calls(now);
            if self.api_next_deadline.is_some_and(|d| now >= d) {
                self.expire_api_calls(now);
            }
            self.process_closes(now);
            self.backplane_flush(now);
            self.flush_dirty();
            self.broker.pool.recycle(&mut self.spent);
            self.metrics.end_pass(now, &self.broker);
            if let Some(deadline) = self.shutdown_deadline {
                if self.conns.is_empty() {
                    self.backplane_flush(now);
                    info!("shut down: every connection closed");
                    return Ok(());
                }
                if now >= deadline {
                    self.backplane_flush(now);
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
        if !self.again.is_empty() || !self.closes.is_empty() || self.backplane_pending() {
            return Duration::ZERO;
        }
        let mut next = self.next_tick;
        if let Some(d) = self.broker.next_deadline() {
            next = next.min(d);
        }
        if let Some(d) = self.accept_paused_until {
            next = next.min(d);
        }
        if let Some(d) = self.api_next_deadline {
            next = next.min(d);
        }
        if let Some(d) = self.broker.cluster_wake_at() {
            next = next.min(d);
        }
        next.saturating_duration_since(now)
    }

    fn split(&mut self) -> (&mut Broker, Sink<'_>) {
        let (broker, sink, _, _) = self.split_all();
        (broker, sink)
    }

    /// The broker and a sink over the connections, with the backplane link (if any) and
    /// the loop's registry beside them.
    fn split_all(&mut self) -> (&mut Broker, Sink<'_>, Option<&mut NatsLink>, &mio::Registry) {
        (
            &mut self.broker,
            Sink {
                conns: &mut self.conns,
                dirty: &mut self.dirty,
                closes: &mut self.closes,
                max_out: self.cfg.max_outbound_bytes,
                bytes_out: &mut self.metrics.bytes_out,
                spent: &mut self.spent,
                stage: &mut self.stage,
                api_ready: &mut self.api_ready,
            },
            self.link.as_mut(),
            self.poll.registry(),
        )
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
            Phase::ApiBody => self.read_api_body(id, now),
            Phase::ApiWait => self.read_api_wait(id, now),
            Phase::RawKey => self.read_raw_key(id, now),
            Phase::Open | Phase::Echo if c.framing == Framing::Raw => self.read_raw(id, now),
            Phase::AwaitKey | Phase::Open | Phase::Echo => self.read_ws(id, now),
            Phase::Closing => self.read_closing(id),
        }
    }

    fn budget(&self) -> Budget {
        Budget::new(self.cfg.max_read_per_turn, self.cfg.max_messages_per_turn)
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
