//! Counters kept on the event-loop thread as plain integers, and their two renderings:
//! Prometheus text for `GET /metrics` (PROTOCOL.md §8) and JSON for `GET /stats` (the live
//! console). Both are built from one [`Snapshot`], so they always agree. No key ever
//! appears here: topic names that contain a configured key are redacted.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::broker::{reason, Broker, Keys, COMMANDS};
use crate::cluster::node::DROP_REASONS;
/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Closing handshake.
    Normal,
    /// A plain HTTP request (`/metrics`, `/stats`, ...) answered.
    Http,
    /// The key was refused.
    BadKey,
    /// Cut off as a slow consumer.
    SlowConsumer,
    /// Silent for the idle timeout.
    Idle,
    /// Handshake or key not in time.
    Timeout,
    /// A framing or WebSocket protocol violation.
    ProtocolError,
    /// Over a size limit.
    Limit,
    /// The peer hung up or reset.
    PeerGone,
    /// The server shut down.
    Shutdown,
    /// Dropped unauthenticated to make room for a new handshake (`--max-handshakes`).
    Evicted,
    /// Closed by a service's `INT KICK` (§9.2).
    Kicked,
    /// Closed by lame duck (SIGUSR2): the server is going away, spreading reconnects.
    LameDuck,
}

impl CloseReason {
    /// Every reason, in the order of [`Metrics::closed`].
    pub const ALL: [CloseReason; 13] = [
        CloseReason::Normal,
        CloseReason::Http,
        CloseReason::BadKey,
        CloseReason::SlowConsumer,
        CloseReason::Idle,
        CloseReason::Timeout,
        CloseReason::ProtocolError,
        CloseReason::Limit,
        CloseReason::PeerGone,
        CloseReason::Shutdown,
        CloseReason::Evicted,
        CloseReason::Kicked,
        CloseReason::LameDuck,
    ];

    /// Label value.
    pub fn name(self) -> &'static str {
        match self {
            CloseReason::Normal => "normal",
            CloseReason::Http => "http",
            CloseReason::BadKey => "bad_key",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Idle => "idle",
            CloseReason::Timeout => "timeout",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::Limit => "limit",
            CloseReason::PeerGone => "peer_gone",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Evicted => "evicted",
            CloseReason::Kicked => "kicked",
            CloseReason::LameDuck => "lame_duck",
        }
    }
}

/// How many per-second samples of the traffic totals are kept (the console's chart).
pub const HISTORY_SECONDS: usize = 300;
/// How many recent closes are kept (the console's list).
pub const RECENT_CLOSES: usize = 50;
/// How many topics the console's "busiest topics" table shows.
pub const BUSIEST_TOPICS: usize = 10;
/// How long a computed busiest-topics list is served before it is computed again: that
/// list is the only part of `/stats` that walks every topic, so a peer polling `/stats`
/// in a loop costs one walk a second, not one per request.
pub const BUSIEST_REFRESH: Duration = Duration::from_secs(1);

/// Topic names (redacted where needed) and their subscriber counts, busiest first.
type Busiest = Vec<(String, usize)>;

/// One per-second sample of the traffic totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Wall-clock time of the sample, ms since the Unix epoch.
    pub at_ms: u64,
    /// Protocol messages received so far.
    pub msgs_in: u64,
    /// Protocol messages sent so far.
    pub msgs_out: u64,
    /// Bytes read so far.
    pub bytes_in: u64,
    /// Bytes written so far.
    pub bytes_out: u64,
}

/// Reactor-level counters.
#[derive(Debug)]
pub struct Metrics {
    /// Connections accepted (including refused ones).
    pub accepted: u64,
    /// Connections refused at the connection limit.
    pub refused: u64,
    /// Connections closed, by [`CloseReason::ALL`] index.
    pub closed: [u64; 13],
    /// Bytes read from sockets.
    pub bytes_in: u64,
    /// Bytes written to sockets.
    pub bytes_out: u64,
    /// Slow consumers cut off.
    pub slow_consumers: u64,
    /// In lame duck (SIGUSR2): not accepting, closing the connections spread over time.
    pub lame_duck: bool,
    /// Plain HTTP requests answered.
    pub http_requests: u64,
    /// Event-loop iterations.
    pub loop_iterations: u64,
    /// Time spent handling events (from the return of `poll` to the end of the pass), ns.
    pub busy_ns: u64,
    /// When the server started.
    pub started: Instant,
    /// Per-second samples of the traffic totals, oldest first.
    pub history: VecDeque<Sample>,
    /// When the next sample is due.
    pub next_sample: Instant,
    /// The most recent closes of WebSocket connections (ms since the Unix epoch, reason),
    /// oldest first.
    pub recent_closes: VecDeque<(u64, CloseReason)>,
    /// Configuration reloads: applied, refused as invalid.
    pub reloads: [u64; 2],
    /// The configuration in effect: when it was loaded (ms since the Unix epoch) and
    /// its hash (see `reload.rs`).
    pub config: (u64, String),
    /// Rate-limit state for warnings.
    pub warned_refused: (Instant, u32),
    /// Rate-limit state for warnings.
    pub warned_bad_key: (Instant, u32),
    /// Rate-limit state for warnings.
    pub warned_protocol: (Instant, u32),
    /// Rate-limit state for warnings.
    pub warned_slow: (Instant, u32),
    /// The last busiest-topics list and when it was computed (see [`BUSIEST_REFRESH`]).
    /// A cell because answering HTTP only reads the server's state otherwise.
    busiest: RefCell<Option<(Instant, Busiest)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let now = Instant::now();
        Metrics {
            accepted: 0,
            refused: 0,
            closed: [0; 13],
            bytes_in: 0,
            bytes_out: 0,
            slow_consumers: 0,
            lame_duck: false,
            http_requests: 0,
            loop_iterations: 0,
            busy_ns: 0,
            started: now,
            history: VecDeque::with_capacity(HISTORY_SECONDS),
            next_sample: now,
            recent_closes: VecDeque::with_capacity(RECENT_CLOSES),
            reloads: [0; 2],
            config: (unix_ms(), String::new()),
            warned_refused: (now, 0),
            warned_bad_key: (now, 0),
            warned_protocol: (now, 0),
            warned_slow: (now, 0),
            busiest: RefCell::new(None),
        }
    }
}

/// Now, in ms since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Metrics {
    /// Count a closed connection.
    pub fn count_close(&mut self, why: CloseReason) {
        if let Some(i) = CloseReason::ALL.iter().position(|r| *r == why) {
            self.closed[i] += 1;
        }
        if why == CloseReason::Http {
            return; // the console's own polls would fill the list
        }
        if self.recent_closes.len() == RECENT_CLOSES {
            self.recent_closes.pop_front();
        }
        self.recent_closes.push_back((unix_ms(), why));
    }

    /// End of one event-loop pass that began (poll returned) at `started`: count it,
    /// add its busy time, and take the once-a-second traffic sample when it is due.
    pub fn end_pass(&mut self, started: Instant, broker: &Broker) {
        let now = Instant::now();
        self.loop_iterations += 1;
        self.busy_ns += now.saturating_duration_since(started).as_nanos() as u64;
        if now >= self.next_sample {
            self.next_sample = now + Duration::from_secs(1);
            if self.history.len() == HISTORY_SECONDS {
                self.history.pop_front();
            }
            let st = &broker.stats;
            self.history.push_back(Sample {
                at_ms: unix_ms(),
                msgs_in: st.msgs_in.iter().sum(),
                msgs_out: messages_out(broker).iter().map(|(_, v)| v).sum(),
                bytes_in: self.bytes_in,
                bytes_out: self.bytes_out,
            });
        }
    }

    /// Everything `/metrics` and `/stats` show, read at one instant. O(1) apart from
    /// the busiest-topics list, which is computed at most once per [`BUSIEST_REFRESH`]
    /// (in between, the list computed last is shown).
    pub fn snapshot(&self, broker: &Broker, open: usize, keys: &Keys) -> Snapshot {
        let mut snap = self.counters(broker, open);
        snap.busiest_topics = self.busiest_topics(broker, keys, Instant::now());
        snap
    }

    /// The busiest topics, from the cache while it is younger than [`BUSIEST_REFRESH`].
    fn busiest_topics(&self, broker: &Broker, keys: &Keys, now: Instant) -> Vec<(String, usize)> {
        let mut cache = self.busiest.borrow_mut();
        if let Some((at, list)) = cache.as_ref() {
            if now.saturating_duration_since(*at) < BUSIEST_REFRESH {
                return list.clone();
            }
        }
        let list = busiest_topics(broker, keys);
        *cache = Some((now, list.clone()));
        list
    }

    /// Every counter and gauge, each O(1) (running totals kept by the broker and the
    /// router); the busiest-topics list is left empty.
    fn counters(&self, broker: &Broker, open: usize) -> Snapshot {
        let (svc, mon, cli) = broker.role_counts();
        let st = &broker.stats;
        let mut msgs_in: Vec<(&'static str, u64)> =
            COMMANDS.iter().copied().zip(st.msgs_in).collect();
        msgs_in.push(("other", st.msgs_in[COMMANDS.len()]));
        let router = broker.router();
        let js = broker.cluster.as_ref().and_then(|c| c.js.as_deref());
        Snapshot {
            version: env!("CARGO_PKG_VERSION"),
            uptime: self.started.elapsed(),
            connections: [
                ("service", svc as u64),
                ("monitor", mon as u64),
                ("client", cli as u64),
                (
                    "unauthenticated",
                    open.saturating_sub(svc + mon + cli) as u64,
                ),
            ],
            accepted: self.accepted,
            refused: self.refused,
            closed: CloseReason::ALL
                .iter()
                .zip(self.closed)
                .map(|(r, v)| (r.name(), v))
                .collect(),
            msgs_in,
            msgs_out: messages_out(broker),
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            subscriptions: router.total_subscriptions() as u64,
            topics: router.topic_count() as u64,
            pending_requests: router.pending_count() as u64,
            requests: vec![
                ("answered", st.req_answered),
                ("timed_out", st.req_timed_out),
                ("no_responder", st.req_no_responder),
                ("responder_gone", st.req_responder_gone),
                ("too_many_in_flight", st.req_too_many),
            ],
            slow_consumers: self.slow_consumers,
            lame_duck: self.lame_duck,
            grants: router.total_grants() as u64,
            events: ["connect", "disconnect", "sub", "uns"]
                .into_iter()
                .zip(st.events)
                .collect(),
            presence: ["local", "cluster", "partial"]
                .into_iter()
                .zip(st.presence)
                .collect(),
            stored: match (broker.history.as_ref(), js) {
                (Some(h), _) => {
                    let (t, m, b) = h.totals();
                    [t as u64, m as u64, b as u64]
                }
                (None, Some(js)) => [js.stats.subjects, js.stats.messages, js.stats.bytes],
                _ => [0; 3],
            },
            history_stored: match (broker.history.as_ref(), js) {
                (Some(h), _) => h.stats.stored,
                (None, Some(js)) => js.stats.writes_ok,
                _ => 0,
            },
            history_evicted: crate::core::history::EVICTION_CAUSES
                .into_iter()
                .zip(broker.history.as_ref().map_or([0; 3], |h| h.stats.evicted))
                .collect(),
            recoveries: ["recovered", "not_recovered", "last"]
                .into_iter()
                .zip(match (broker.history.as_ref(), js) {
                    (Some(h), _) => h.stats.recoveries,
                    (None, Some(js)) => js.stats.recoveries,
                    _ => [0; 3],
                })
                .collect(),
            jetstream: js.map(|js| JetStreamSnap {
                ready: js.ready(),
                stream: js.stream().to_owned(),
                storage: js.storage().name(),
                epoch: js.epoch().map(str::to_owned),
                writes_failed: js.stats.writes_failed,
                consumer_restarts: js.stats.restarts,
                recoveries_in_flight: js.recoveries_in_flight() as u64,
            }),
            errors: reason::ALL.iter().copied().zip(st.errors).collect(),
            http_requests: self.http_requests,
            loop_iterations: self.loop_iterations,
            busy: Duration::from_nanos(self.busy_ns),
            busiest_topics: Vec::new(),
            recent_closes: self
                .recent_closes
                .iter()
                .rev()
                .map(|&(at, r)| (at, r.name()))
                .collect(),
            history: self.history.iter().copied().collect(),
            reloads: vec![("ok", self.reloads[0]), ("invalid", self.reloads[1])],
            config_loaded_ms: self.config.0,
            config_hash: self.config.1.clone(),
            cluster: broker.cluster.as_ref().map(|c| ClusterSnap {
                node: NodeSelf {
                    id: c.node.to_string(),
                    name: c.node_name().map(str::to_owned),
                    cluster: c.cluster_name().to_owned(),
                    nats: Some(c.peer.clone()).filter(|p| !p.is_empty()),
                },
                connected: c.connected,
                nodes: c.nodes(Instant::now()),
                messages_out: c.stats.messages_out,
                messages_in: c.stats.messages_in,
                dropped: DROP_REASONS.iter().copied().zip(c.stats.dropped).collect(),
                reconnects: c.stats.reconnects,
                pending_bytes: c.pending_bytes() as u64,
                max_pending: c.settings().max_pending as u64,
                forwarded_requests: c.out_request_count() as u64,
                remote_responders: c.remote_responders() as u64,
                interest_pending: c.interest_pending() as u64,
            }),
        }
    }

    /// Prometheus text exposition (which has no busiest-topics list: O(1) plus
    /// rendering).
    pub fn render(&self, broker: &Broker, open: usize, _keys: &Keys) -> String {
        self.counters(broker, open).prometheus()
    }
}

/// The [`BUSIEST_TOPICS`] topics with the most subscribers, most first, then by name
/// (private channels left out; names holding a key redacted). O(topics).
fn busiest_topics(broker: &Broker, keys: &Keys) -> Vec<(String, usize)> {
    broker
        .router()
        .topics()
        .filter(|t| !t.name.starts_with(b"MSG:") && !t.subs.is_empty())
        .map(|t| (t.name.as_ref(), t.subs.len()))
        .fold(Vec::new(), |mut top: Vec<(&[u8], usize)>, (name, n)| {
            // Keep the BUSIEST_TOPICS largest, most subscribers first, then by name.
            let pos = top
                .iter()
                .position(|&(tn, tc)| n > tc || (n == tc && name < tn))
                .unwrap_or(top.len());
            if pos < BUSIEST_TOPICS {
                top.insert(pos, (name, n));
                top.truncate(BUSIEST_TOPICS);
            }
            top
        })
        .into_iter()
        .map(|(name, n)| (redact_topic(name, keys), n))
        .collect()
}

/// Messages sent, by command: relayed PUB, REQ and RES, and errors.
fn messages_out(broker: &Broker) -> Vec<(&'static str, u64)> {
    let st = &broker.stats;
    vec![
        ("PUB", st.delivered_pub),
        ("REQ", st.delivered_req),
        ("RES", st.delivered_res),
        ("ERROR", st.errors.iter().sum::<u64>()),
    ]
}

/// A topic name for display: lossy UTF-8, and never a configured key (a trusted service
/// could name a topic after one).
fn redact_topic(name: &[u8], keys: &Keys) -> String {
    let all = keys.service.iter().chain(&keys.client).chain(&keys.monitor);
    for k in all {
        if !k.is_empty() && name.windows(k.len()).any(|w| w == k.as_bytes()) {
            return "(redacted)".to_owned();
        }
    }
    String::from_utf8_lossy(name).into_owned()
}

/// The server's counters and gauges at one instant.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Server version.
    pub version: &'static str,
    /// Time since start.
    pub uptime: Duration,
    /// Open connections by role.
    pub connections: [(&'static str, u64); 4],
    /// Connections accepted.
    pub accepted: u64,
    /// Connections refused at the limit.
    pub refused: u64,
    /// Connections closed, by reason.
    pub closed: Vec<(&'static str, u64)>,
    /// Messages received, by command.
    pub msgs_in: Vec<(&'static str, u64)>,
    /// Messages sent, by command.
    pub msgs_out: Vec<(&'static str, u64)>,
    /// Bytes read.
    pub bytes_in: u64,
    /// Bytes written.
    pub bytes_out: u64,
    /// Subscriptions held (private channels included).
    pub subscriptions: u64,
    /// Topics in the routing table.
    pub topics: u64,
    /// Requests in flight.
    pub pending_requests: u64,
    /// Requests ended, by outcome.
    pub requests: Vec<(&'static str, u64)>,
    /// Slow consumers cut off.
    pub slow_consumers: u64,
    /// In lame duck.
    pub lame_duck: bool,
    /// Per-connection grants in force (§9.1).
    pub grants: u64,
    /// Connection events published (§9.4), by event.
    pub events: Vec<(&'static str, u64)>,
    /// Presence requests answered (§9.3), by scope (`local`, `cluster`, `partial`).
    pub presence: Vec<(&'static str, u64)>,
    /// History (§9.5): topics with history, messages and bytes stored.
    pub stored: [u64; 3],
    /// Messages stored in history since start.
    pub history_stored: u64,
    /// History evictions, by cause (size, ttl, bytes).
    pub history_evicted: Vec<(&'static str, u64)>,
    /// Recoveries (`SUB` with `since`), by outcome.
    pub recoveries: Vec<(&'static str, u64)>,
    /// Cluster history in JetStream, when configured.
    pub jetstream: Option<JetStreamSnap>,
    /// Errors sent, by reason.
    pub errors: Vec<(&'static str, u64)>,
    /// Plain HTTP requests answered.
    pub http_requests: u64,
    /// Event-loop iterations.
    pub loop_iterations: u64,
    /// Time spent busy in the event loop.
    pub busy: Duration,
    /// The topics with the most subscribers (private channels left out).
    pub busiest_topics: Vec<(String, usize)>,
    /// Recent closes, newest first: (ms since the Unix epoch, reason).
    pub recent_closes: Vec<(u64, &'static str)>,
    /// Per-second samples of the traffic totals, oldest first.
    pub history: Vec<Sample>,
    /// Configuration reloads, by result (`ok`, `invalid`).
    pub reloads: Vec<(&'static str, u64)>,
    /// When the configuration in effect was loaded, ms since the Unix epoch.
    pub config_loaded_ms: u64,
    /// The hash of the configuration in effect.
    pub config_hash: String,
    /// The cluster, when the server is a node of one.
    pub cluster: Option<ClusterSnap>,
}

/// Cluster history kept in JetStream (§9.5).
#[derive(Debug, Clone)]
pub struct JetStreamSnap {
    /// The stream exists and this node's live consumer runs.
    pub ready: bool,
    /// The stream's name.
    pub stream: String,
    /// `memory` or `file`.
    pub storage: &'static str,
    /// The epoch, once the stream is known.
    pub epoch: Option<String>,
    /// History writes that failed (refused, unacknowledged, or relayed without history).
    pub writes_failed: u64,
    /// Times the live consumer was created again.
    pub consumer_restarts: u64,
    /// Recoveries waiting for JetStream.
    pub recoveries_in_flight: u64,
}

/// The cluster's gauges and counters.
#[derive(Debug, Clone)]
pub struct ClusterSnap {
    /// This node.
    pub node: NodeSelf,
    /// The backplane connection is up.
    pub connected: bool,
    /// The other nodes heard.
    pub nodes: Vec<crate::cluster::node::NodeInfo>,
    /// Messages published to the backplane.
    pub messages_out: u64,
    /// Messages received from it.
    pub messages_in: u64,
    /// Messages for other nodes not sent, by reason.
    pub dropped: Vec<(&'static str, u64)>,
    /// Reconnections to nats-server.
    pub reconnects: u64,
    /// Bytes waiting for nats-server, and their bound.
    pub pending_bytes: u64,
    pub max_pending: u64,
    /// Requests forwarded to other nodes and not yet ended.
    pub forwarded_requests: u64,
    /// Responders on other nodes as announced (per target and responder).
    pub remote_responders: u64,
    /// Subjects whose backplane subscription waits to be written or released.
    pub interest_pending: u64,
}

/// The node itself, as `/stats` names it.
#[derive(Debug, Clone)]
pub struct NodeSelf {
    /// Its id (the prefix of its connections' cids).
    pub id: String,
    /// Its `--cluster-node-name`, if it has one.
    pub name: Option<String>,
    /// The cluster's name (`--cluster-name`).
    pub cluster: String,
    /// The nats-server address in use or last tried (None before the first try).
    pub nats: Option<String>,
}

/// Label value escaping of the text exposition format.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Snapshot {
    /// Prometheus text exposition format 0.0.4.
    pub fn prometheus(&self) -> String {
        let mut s = String::with_capacity(8192);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(s, "{name}{labels} {v}");
            }
        };
        let one = |v: u64| vec![(String::new(), v.to_string())];
        let by = |label: &str, vs: &[(&str, u64)]| -> Vec<(String, String)> {
            vs.iter()
                .map(|(k, v)| {
                    (
                        format!("{{{label}=\"{}\"}}", escape_label(k)),
                        v.to_string(),
                    )
                })
                .collect()
        };
        metric(
            "middleman_build_info",
            "gauge",
            "Always 1; the version is a label.",
            &[(
                format!("{{version=\"{}\"}}", escape_label(self.version)),
                "1".into(),
            )],
        );
        metric(
            "middleman_uptime_seconds",
            "gauge",
            "Seconds since the server started.",
            &[(String::new(), format!("{:.3}", self.uptime.as_secs_f64()))],
        );
        metric(
            "middleman_connections",
            "gauge",
            "Open connections by role (unauthenticated: handshake, plain HTTP or closing).",
            &by("role", &self.connections),
        );
        metric(
            "middleman_connections_accepted_total",
            "counter",
            "Connections accepted (refused ones included).",
            &one(self.accepted),
        );
        metric(
            "middleman_connections_refused_total",
            "counter",
            "Connections refused at the connection limit (HTTP 503).",
            &one(self.refused),
        );
        metric(
            "middleman_connections_closed_total",
            "counter",
            "Connections closed, by reason.",
            &by("reason", &self.closed),
        );
        metric(
            "middleman_messages_in_total",
            "counter",
            "Protocol messages received, by command.",
            &by("cmd", &self.msgs_in),
        );
        metric(
            "middleman_messages_out_total",
            "counter",
            "Protocol messages delivered, by command (monitor copies not counted).",
            &by("cmd", &self.msgs_out),
        );
        metric(
            "middleman_bytes_in_total",
            "counter",
            "Bytes read from sockets.",
            &one(self.bytes_in),
        );
        metric(
            "middleman_bytes_out_total",
            "counter",
            "Bytes written to sockets.",
            &one(self.bytes_out),
        );
        metric(
            "middleman_subscriptions",
            "gauge",
            "Subscriptions held (private channels included).",
            &one(self.subscriptions),
        );
        metric(
            "middleman_topics",
            "gauge",
            "Topics and request targets in the routing table (private channels included).",
            &one(self.topics),
        );
        metric(
            "middleman_pending_requests",
            "gauge",
            "Requests delivered and not yet ended.",
            &one(self.pending_requests),
        );
        metric(
            "middleman_requests_total",
            "counter",
            "Requests ended, by outcome.",
            &by("outcome", &self.requests),
        );
        metric(
            "middleman_slow_consumers_total",
            "counter",
            "Connections cut off as slow consumers.",
            &one(self.slow_consumers),
        );
        metric(
            "middleman_lame_duck",
            "gauge",
            "1 in lame duck (SIGUSR2): not accepting, closing the connections spread over the lame-duck duration, then exiting.",
            &one(u64::from(self.lame_duck)),
        );
        metric(
            "middleman_grants",
            "gauge",
            "Per-connection grants in force (ESUB/EPUB/EREQ with forcid).",
            &one(self.grants),
        );
        metric(
            "middleman_events_total",
            "counter",
            "Connection events published (SYS:CONNECT, SYS:DISCONNECT, SYS:SUB, SYS:UNS), by event.",
            &by("event", &self.events),
        );
        metric(
            "middleman_presence_requests_total",
            "counter",
            "Presence requests answered, by scope (local: one node; cluster: every node answered; partial: one did not in time).",
            &by("scope", &self.presence),
        );
        metric(
            "middleman_history_topics",
            "gauge",
            "Topics with stored history.",
            &one(self.stored[0]),
        );
        metric(
            "middleman_history_messages",
            "gauge",
            "Messages stored in history.",
            &one(self.stored[1]),
        );
        metric(
            "middleman_history_bytes",
            "gauge",
            "Memory held by history: the relayed messages and their bookkeeping, as counted against max_history_bytes.",
            &one(self.stored[2]),
        );
        metric(
            "middleman_history_stored_total",
            "counter",
            "Messages stored in history.",
            &one(self.history_stored),
        );
        metric(
            "middleman_history_evictions_total",
            "counter",
            "Messages evicted from history, by cause (size, ttl, bytes).",
            &by("cause", &self.history_evicted),
        );
        if let Some(js) = &self.jetstream {
            metric(
                "middleman_history_jetstream_ready",
                "gauge",
                "1 when the cluster's history stream exists and this node reads it.",
                &one(u64::from(js.ready)),
            );
            metric(
                "middleman_history_write_failures_total",
                "counter",
                "History PUBs JetStream did not store (refused, unacknowledged in time, or relayed without history while it was unavailable).",
                &one(js.writes_failed),
            );
            metric(
                "middleman_history_consumer_restarts_total",
                "counter",
                "Times this node's history consumer was created again (gap, silence, reconnect).",
                &one(js.consumer_restarts),
            );
        }
        metric(
            "middleman_recoveries_total",
            "counter",
            "SUB with since, by outcome (recovered, not_recovered, last).",
            &by("outcome", &self.recoveries),
        );
        metric(
            "middleman_errors_total",
            "counter",
            "Protocol errors sent, by reason.",
            &by("reason", &self.errors),
        );
        metric(
            "middleman_config_reloads_total",
            "counter",
            "Configuration reloads (SIGHUP), by result: ok (applied), invalid (refused, nothing applied).",
            &by("result", &self.reloads),
        );
        metric(
            "middleman_config_loaded_timestamp_seconds",
            "gauge",
            "When the configuration in effect was loaded (start or last reload), seconds since the Unix epoch.",
            &[(String::new(), format!("{:.3}", self.config_loaded_ms as f64 / 1000.0))],
        );
        metric(
            "middleman_http_requests_total",
            "counter",
            "Plain HTTP requests answered.",
            &one(self.http_requests),
        );
        metric(
            "middleman_loop_iterations_total",
            "counter",
            "Event-loop iterations.",
            &one(self.loop_iterations),
        );
        metric(
            "middleman_loop_busy_seconds_total",
            "counter",
            "Time the event loop spent handling events (not waiting in poll).",
            &[(String::new(), format!("{:.6}", self.busy.as_secs_f64()))],
        );
        if let Some(c) = &self.cluster {
            metric(
                "middleman_cluster_connected",
                "gauge",
                "1 while the connection to the nats-server backplane is up.",
                &one(u64::from(c.connected)),
            );
            metric(
                "middleman_cluster_nodes",
                "gauge",
                "Other nodes of the cluster heard within the node timeout.",
                &one(c.nodes.len() as u64),
            );
            metric(
                "middleman_cluster_messages_out_total",
                "counter",
                "Messages published to the backplane.",
                &one(c.messages_out),
            );
            metric(
                "middleman_cluster_messages_in_total",
                "counter",
                "Messages received from the backplane.",
                &one(c.messages_in),
            );
            metric(
                "middleman_cluster_dropped_total",
                "counter",
                "Messages for other nodes not sent (at-most-once), by reason.",
                &by("reason", &c.dropped),
            );
            metric(
                "middleman_cluster_reconnects_total",
                "counter",
                "Reconnections to nats-server after the first connection.",
                &one(c.reconnects),
            );
            metric(
                "middleman_cluster_pending_bytes",
                "gauge",
                "Bytes waiting to be written to nats-server (bounded by --cluster-max-pending).",
                &one(c.pending_bytes),
            );
            metric(
                "middleman_cluster_forwarded_requests",
                "gauge",
                "Requests forwarded to other nodes and not yet ended.",
                &one(c.forwarded_requests),
            );
            metric(
                "middleman_cluster_remote_responders",
                "gauge",
                "Responders on other nodes, per request target, as their nodes announced them.",
                &one(c.remote_responders),
            );
            metric(
                "middleman_cluster_interest_pending",
                "gauge",
                "Subjects whose backplane subscription waits to be written or released (one change per subject at most).",
                &one(c.interest_pending),
            );
        }
        s
    }

    /// The JSON document of `GET /stats`.
    pub fn json(&self) -> serde_json::Value {
        use serde_json::{json, Map, Value};
        let obj = |vs: &[(&str, u64)]| -> Value {
            Value::Object(
                vs.iter()
                    .map(|(k, v)| ((*k).to_owned(), Value::from(*v)))
                    .collect::<Map<String, Value>>(),
            )
        };
        // Rates between successive samples, per second.
        let rates: Vec<Value> = self
            .history
            .windows(2)
            .map(|w| {
                let dt = (w[1].at_ms.saturating_sub(w[0].at_ms)).max(1) as f64 / 1000.0;
                let r = |a: u64, b: u64| (b.saturating_sub(a) as f64 / dt * 10.0).round() / 10.0;
                json!({
                    "at_ms": w[1].at_ms,
                    "messages_in": r(w[0].msgs_in, w[1].msgs_in),
                    "messages_out": r(w[0].msgs_out, w[1].msgs_out),
                    "bytes_in": r(w[0].bytes_in, w[1].bytes_in),
                    "bytes_out": r(w[0].bytes_out, w[1].bytes_out),
                })
            })
            .collect();
        // Apart, to keep the one macro below within the compiler's recursion limit.
        let cluster = self.cluster.as_ref().map(|c| json!({
            "node": {
                "id": c.node.id,
                "name": c.node.name,
                "cluster": c.node.cluster,
                "nats": c.node.nats,
            },
            "connected": c.connected,
            "nodes": c.nodes.iter()
                .map(|n| json!({"id": n.id, "name": n.name, "monitors": n.monitors, "heard_seconds_ago": (n.heard_ago * 10.0).round() / 10.0}))
                .collect::<Vec<_>>(),
            "messages_out_total": c.messages_out,
            "messages_in_total": c.messages_in,
            "dropped_total": obj(&c.dropped),
            "reconnects_total": c.reconnects,
            "pending_bytes": c.pending_bytes,
            "max_pending_bytes": c.max_pending,
            "forwarded_requests": c.forwarded_requests,
            "remote_responders": c.remote_responders,
            "interest_pending": c.interest_pending,
        }));
        let config = json!({
            "loaded_at_ms": self.config_loaded_ms,
            "hash": self.config_hash,
            "reloads_total": obj(&self.reloads),
        });
        json!({
            "version": self.version,
            "uptime_seconds": (self.uptime.as_secs_f64() * 1000.0).round() / 1000.0,
            "connections": obj(&self.connections),
            "connections_accepted_total": self.accepted,
            "connections_refused_total": self.refused,
            "connections_closed_total": obj(&self.closed),
            "messages_in_total": obj(&self.msgs_in),
            "messages_out_total": obj(&self.msgs_out),
            "bytes_in_total": self.bytes_in,
            "bytes_out_total": self.bytes_out,
            "subscriptions": self.subscriptions,
            "topics": self.topics,
            "pending_requests": self.pending_requests,
            "requests_total": obj(&self.requests),
            "slow_consumers_total": self.slow_consumers,
            "lame_duck": self.lame_duck,
            "grants": self.grants,
            "events_total": obj(&self.events),
            "presence_requests_total": obj(&self.presence),
            "history": {
                "topics": self.stored[0],
                "messages": self.stored[1],
                "bytes": self.stored[2],
                "stored_total": self.history_stored,
                "evictions_total": obj(&self.history_evicted),
                "recoveries_total": obj(&self.recoveries),
                "jetstream": self.jetstream.as_ref().map(|js| json!({
                    "ready": js.ready,
                    "stream": js.stream,
                    "storage": js.storage,
                    "epoch": js.epoch,
                    "write_failures_total": js.writes_failed,
                    "consumer_restarts_total": js.consumer_restarts,
                    "recoveries_in_flight": js.recoveries_in_flight,
                })),
            },
            "errors_total": obj(&self.errors),
            "config": config,
            "http_requests_total": self.http_requests,
            "loop_iterations_total": self.loop_iterations,
            "loop_busy_seconds_total": self.busy.as_secs_f64(),
            "busiest_topics": self.busiest_topics.iter()
                .map(|(name, n)| json!({"name": name, "subscribers": n}))
                .collect::<Vec<_>>(),
            "recent_closes": self.recent_closes.iter()
                .map(|(at, r)| json!({"at_ms": at, "reason": r}))
                .collect::<Vec<_>>(),
            "rates": rates,
            "cluster": cluster,
        })
    }
}
