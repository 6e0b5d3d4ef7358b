//! The meaning of each command (PROTOCOL.md §3-§7), pure and I/O-free.
//!
//! [`Broker::apply`] takes one decoded message from one connection, checks permissions,
//! updates the [`Router`] and hands every packet to send to an [`Outbox`] as
//! `(ConnId, Rc<Packet>)`. A published message is encoded once and the same packet is
//! given for every receiver.

use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::cluster::node::{Choice, Cluster, OutReq, REMOTE};
use crate::protocol::encode::{fmt_u64, push_body, push_header};
use crate::protocol::{Message, Packet, PacketPool};
use crate::router::{ConnId, Enable, Router, SubError};

/// Where the broker puts what must be sent. The reactor queues the packet on the
/// connection; tests collect it.
pub trait Outbox {
    /// Queue `pkt` for connection `to`.
    fn send(&mut self, to: ConnId, pkt: &Rc<Packet>);
    /// Queue a message for connection `to` alone: `fill` appends its protocol bytes (at
    /// most `size.bound`; `utf8`: they are known to be UTF-8). An outbox may build it in
    /// place in the connection's own queue (no shared packet, nothing to copy again on
    /// write); by default it is a packet from `pool`, sent as [`Outbox::send`] sends.
    fn send_one(
        &mut self,
        to: ConnId,
        pool: &mut PacketPool,
        size: Size,
        utf8: bool,
        fill: impl FnOnce(&mut Vec<u8>),
    ) {
        let pkt = pool.build(size.hint, utf8, fill);
        self.send(to, &pkt);
    }
    /// Close connection `to` with code 4000 and `reason` (`INT KICK`, §9.2), after what
    /// is queued for it.
    fn kick(&mut self, to: ConnId, reason: &str) {
        let _ = (to, reason);
    }
}

impl Outbox for Vec<(ConnId, Rc<Packet>)> {
    fn send(&mut self, to: ConnId, pkt: &Rc<Packet>) {
        self.push((to, pkt.clone()));
    }
}

/// What a key grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Trusted back end.
    Service,
    /// A service that also receives a copy of every PUB, REQ and RES routed.
    Monitor,
    /// Untrusted front end.
    Client,
}

impl Role {
    /// Services and monitors are trusted.
    pub fn is_service(self) -> bool {
        matches!(self, Role::Service | Role::Monitor)
    }
    /// Lower-case name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Role::Service => "service",
            Role::Monitor => "monitor",
            Role::Client => "client",
        }
    }
}

/// The configured keys. Comparison is constant-time per key. Its `Debug` shows only how
/// many there are, so a logged or printed configuration never holds a key.
#[derive(Clone, Default)]
pub struct Keys {
    /// Service keys.
    pub service: Vec<String>,
    /// Client keys.
    pub client: Vec<String>,
    /// Monitor keys.
    pub monitor: Vec<String>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Keys {{ service: {} redacted, client: {} redacted, monitor: {} redacted }}",
            self.service.len(),
            self.client.len(),
            self.monitor.len()
        )
    }
}

impl Keys {
    /// The role a presented key grants (surrounding whitespace ignored), if any. Every
    /// configured key is compared, whatever matches, so timing does not tell which.
    pub fn authenticate(&self, presented: &[u8]) -> Option<Role> {
        self.authenticate_digest(presented).map(|(role, _)| role)
    }

    /// [`Keys::authenticate`], with the digest of the key that matched, so a connection
    /// can be closed when its key is removed (a reload) without keeping the key.
    pub fn authenticate_digest(&self, presented: &[u8]) -> Option<(Role, KeyDigest)> {
        let key = presented.trim_ascii();
        // The key that matched is byte for byte the one presented (trimmed).
        self.find(key).map(|role| (role, KeyDigest::of(key)))
    }

    /// Every configured key as (role, digest).
    pub fn digests(&self) -> Vec<(Role, KeyDigest)> {
        [
            (&self.monitor, Role::Monitor),
            (&self.service, Role::Service),
            (&self.client, Role::Client),
        ]
        .into_iter()
        .flat_map(|(keys, role)| {
            keys.iter()
                .map(move |k| (role, KeyDigest::of(k.as_bytes())))
        })
        .collect()
    }

    fn find(&self, key: &[u8]) -> Option<Role> {
        let mut found = None;
        for (keys, role) in [
            (&self.monitor, Role::Monitor),
            (&self.service, Role::Service),
            (&self.client, Role::Client),
        ] {
            for k in keys {
                if ct_eq(k.as_bytes(), key) && found.is_none() {
                    found = Some(role);
                }
            }
        }
        found
    }

    /// True when no key at all is configured.
    pub fn is_empty(&self) -> bool {
        self.service.is_empty() && self.client.is_empty() && self.monitor.is_empty()
    }
}

/// Which key a connection logged in with, without the key: a 64-bit SipHash of it under
/// a random per-process key (std's `RandomState`), so the digest is of no use outside
/// this process and two different keys share one with a chance of 2^-64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyDigest(u64);

impl KeyDigest {
    /// The digest of `key`.
    pub fn of(key: &[u8]) -> KeyDigest {
        use std::hash::BuildHasher;
        static SEED: std::sync::OnceLock<std::collections::hash_map::RandomState> =
            std::sync::OnceLock::new();
        KeyDigest(SEED.get_or_init(Default::default).hash_one(key))
    }
}

/// Constant-time equality (time depends only on the lengths).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0xff);
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

/// Broker settings.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Subscriptions one connection may hold, not counting its private channel.
    pub max_subscriptions: usize,
    /// How long a request may stay unanswered (§6.5).
    pub request_timeout: Duration,
    /// Requests one connection may have in flight (as requester).
    pub max_pending_requests: usize,
    /// Longest `ReqID` value accepted.
    pub max_reqid_bytes: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_subscriptions: 10_000,
            request_timeout: Duration::from_secs(30),
            max_pending_requests: 1000,
            max_reqid_bytes: 256,
        }
    }
}

/// Error reasons (§7). The `reason` header and the body use these words.
pub mod reason {
    /// A well-formed command the server does not know.
    pub const UNKNOWN_COMMAND: &str = "unknown command";
    /// The sender's role may not do this.
    pub const NOT_PERMITTED: &str = "not permitted";
    /// A REQ without `ReqID`.
    pub const MISSING_REQID: &str = "missing ReqID";
    /// A RES without `rid`.
    pub const MISSING_RID: &str = "missing rid";
    /// Nobody answers the request target.
    pub const NO_RESPONDER: &str = "no responder";
    /// The request was not answered in time.
    pub const TIMED_OUT: &str = "request timed out";
    /// The responder left before answering.
    pub const RESPONDER_GONE: &str = "responder disconnected";
    /// A RES for a request delivered to another connection.
    pub const NOT_YOUR_REQUEST: &str = "not your request";
    /// A header line without `:`.
    pub const MALFORMED: &str = "malformed message";
    /// Over the per-connection subscription limit.
    pub const TOO_MANY_SUBSCRIPTIONS: &str = "too many subscriptions";
    /// `INT UID` without `forcid`/`setuid`.
    pub const MISSING_HEADER: &str = "missing header";
    /// `INT UID` for a cid that is not connected.
    pub const UNKNOWN_CID: &str = "unknown cid";
    /// `INT` with a target other than `UID`.
    pub const UNKNOWN_TARGET: &str = "unknown target";
    /// A REQ from a connection that already has `max_pending_requests` in flight.
    pub const TOO_MANY_REQUESTS: &str = "too many requests in flight";
    /// A REQ whose `ReqID` value is longer than `max_reqid_bytes` (not echoed back).
    pub const REQID_TOO_LONG: &str = "ReqID too long";
    /// A `forcid` that is not a cid (§9).
    pub const BAD_CID: &str = "bad cid";
    /// A `topic` header that is not a valid target (§9.2, §9.3).
    pub const BAD_TOPIC: &str = "bad topic";
    /// A presence `limit` that is not a number (§9.3).
    pub const BAD_LIMIT: &str = "bad limit";
    /// The connection holds as many grants as it may (§9.1).
    pub const TOO_MANY_GRANTS: &str = "too many grants";
    /// An enablement sent through `POST /api/cmd` (§8.1).
    pub const NOT_PERMITTED_OVER_HTTP: &str = "not permitted over HTTP";
    /// A `since` header that does not parse (§9.5).
    pub const BAD_SINCE: &str = "bad since";
    /// A `SUB` with `since` of a topic the connection holds (§9.5).
    pub const ALREADY_SUBSCRIBED: &str = "already subscribed";
    /// Every reason, for metrics.
    pub const ALL: &[&str] = &[
        UNKNOWN_COMMAND,
        NOT_PERMITTED,
        MISSING_REQID,
        MISSING_RID,
        NO_RESPONDER,
        TIMED_OUT,
        RESPONDER_GONE,
        NOT_YOUR_REQUEST,
        MALFORMED,
        TOO_MANY_SUBSCRIPTIONS,
        MISSING_HEADER,
        UNKNOWN_CID,
        UNKNOWN_TARGET,
        TOO_MANY_REQUESTS,
        REQID_TOO_LONG,
        BAD_CID,
        BAD_TOPIC,
        BAD_LIMIT,
        TOO_MANY_GRANTS,
        NOT_PERMITTED_OVER_HTTP,
        BAD_SINCE,
        ALREADY_SUBSCRIBED,
    ];
}

/// Commands, for counting.
pub const COMMANDS: &[&str] = &[
    "SUB", "UNS", "PUB", "REQ", "RES", "EPUB", "ESUB", "EREQ", "INT", "DPUB", "DSUB", "DREQ",
];

/// Counters kept by the broker (plain integers, one thread).
#[derive(Debug, Clone)]
pub struct Stats {
    /// Messages received, by command (index into [`COMMANDS`]; last slot: unknown).
    pub msgs_in: [u64; 13],
    /// Deliveries sent, by command routed (PUB, REQ, RES) and errors.
    pub delivered_pub: u64,
    /// REQ deliveries to responders.
    pub delivered_req: u64,
    /// RES deliveries to requesters.
    pub delivered_res: u64,
    /// Error messages sent, by reason (index into [`reason::ALL`]).
    pub errors: [u64; reason::ALL.len()],
    /// Requests answered.
    pub req_answered: u64,
    /// Requests that timed out.
    pub req_timed_out: u64,
    /// Requests refused for want of a responder.
    pub req_no_responder: u64,
    /// Requests whose responder left.
    pub req_responder_gone: u64,
    /// Requests refused because the requester had `max_pending_requests` in flight.
    pub req_too_many: u64,
    /// Connection events published (§9.4), by event (connect, disconnect, sub, uns).
    pub events: [u64; 4],
    /// Presence requests answered: on one node, by every node, partial.
    pub presence: [u64; 3],
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            msgs_in: [0; 13],
            delivered_pub: 0,
            delivered_req: 0,
            delivered_res: 0,
            errors: [0; reason::ALL.len()],
            req_answered: 0,
            req_timed_out: 0,
            req_no_responder: 0,
            req_responder_gone: 0,
            req_too_many: 0,
            events: [0; 4],
            presence: [0; 3],
        }
    }
}

/// Per-connection facts the broker keeps.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub(crate) role: Role,
    pub(crate) cid: Box<str>,
    /// Its uid (empty: none).
    pub(crate) uid: Box<[u8]>,
    /// An HTTP API sender (§8.1): no connection events.
    pub(crate) quiet: bool,
    /// The server's headers on everything this session sends, `cid: ..` and `uid: ..`
    /// encoded once (at the key and at `INT UID`) rather than on every relayed message.
    pub(crate) relay_tail: Box<[u8]>,
    /// `relay_tail` is valid UTF-8 (the uid came from a service; it may not be).
    pub(crate) tail_utf8: bool,
}

impl Session {
    /// Set the uid (`INT UID`), re-encoding the relayed headers.
    pub(crate) fn set_uid(&mut self, uid: &[u8]) {
        let quiet = self.quiet;
        *self = Session::new(self.role, &self.cid, uid);
        self.quiet = quiet;
    }

    fn new(role: Role, cid: &str, uid: &[u8]) -> Session {
        let mut tail = Vec::with_capacity(cid.len() + uid.len() + 14);
        push_header(&mut tail, b"cid", cid.as_bytes());
        push_header(&mut tail, b"uid", uid);
        Session {
            role,
            cid: cid.into(),
            uid: uid.into(),
            quiet: false,
            tail_utf8: std::str::from_utf8(uid).is_ok(),
            relay_tail: tail.into(),
        }
    }
}

/// The broker: routing tables plus sessions.
#[derive(Debug)]
pub struct Broker {
    pub(crate) router: Router,
    pub(crate) sessions: Vec<Option<Session>>,
    pub(crate) cids: foldhash::HashMap<Box<str>, ConnId>,
    pub(crate) monitors: Vec<ConnId>,
    pub(crate) settings: Settings,
    cid_prefix: String,
    cid_counter: u64,
    /// Relayed packets, reused once every queue has let them go.
    pub(crate) pool: PacketPool,
    /// The node's view of the cluster, when it is one (`--cluster`).
    pub cluster: Option<Box<Cluster>>,
    /// The time of the last call that told it (for delays that start in a call that is
    /// not given the time).
    pub(crate) clock: Option<Instant>,
    /// Sessions by role (services, monitors, clients), kept as they come and go so
    /// `/metrics` never walks the sessions.
    roles: [usize; 3],
    /// Event topics (§9.4) with subscribers here: one bit per topic
    /// ([`crate::core::rooms::event_bit`]).
    pub(crate) local_events: u8,
    /// Stored history (§9.5), when a `[[history]]` rule is configured.
    pub history: Option<Box<crate::core::history::History>>,
    /// Counters.
    pub stats: Stats,
}

fn role_slot(role: Role) -> usize {
    match role {
        Role::Service => 0,
        Role::Monitor => 1,
        Role::Client => 2,
    }
}

impl Broker {
    /// A broker whose cids start with `cid_prefix` (lower-case letters and digits,
    /// random per process so cids do not repeat after a restart).
    pub fn new(settings: Settings, cid_prefix: &str) -> Self {
        Broker {
            router: Router::new(),
            sessions: Vec::new(),
            cids: Default::default(),
            monitors: Vec::new(),
            settings,
            cid_prefix: cid_prefix.to_owned(),
            cid_counter: 0,
            pool: PacketPool::new(),
            cluster: None,
            clock: None,
            roles: [0; 3],
            local_events: 0,
            history: None,
            stats: Stats::default(),
        }
    }

    /// The routing tables (read-only).
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// The settings in force.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Number of authenticated connections.
    pub fn session_count(&self) -> usize {
        self.cids.len()
    }

    /// Authenticated connections by role: (services, monitors, clients). O(1).
    pub fn role_counts(&self) -> (usize, usize, usize) {
        (self.roles[0], self.roles[1], self.roles[2])
    }

    /// The role of an authenticated connection.
    pub fn role(&self, conn: ConnId) -> Option<Role> {
        self.session(conn).map(|s| s.role)
    }

    /// The cid of an authenticated connection.
    pub fn cid(&self, conn: ConnId) -> Option<&str> {
        self.session(conn).map(|s| &*s.cid)
    }

    /// The pool relayed packets are built from: the reactor gives it back the packets
    /// its queues let go of ([`PacketPool::recycle`]) and trims it from time to time.
    pub fn pool(&mut self) -> &mut PacketPool {
        &mut self.pool
    }

    /// Cids of connections admitted from now on start with `prefix` (a cluster node
    /// that had to change its id).
    pub(crate) fn set_cid_prefix(&mut self, prefix: &str) {
        self.cid_prefix = prefix.to_owned();
    }

    pub(crate) fn session(&self, conn: ConnId) -> Option<&Session> {
        self.sessions.get(conn).and_then(Option::as_ref)
    }

    /// Admit an authenticated connection: give it a cid and subscribe it to `MSG:<cid>`.
    pub fn connect(&mut self, conn: ConnId, role: Role) -> String {
        self.cid_counter += 1;
        let cid = format!("{}{}", self.cid_prefix, base36(self.cid_counter));
        if self.sessions.len() <= conn {
            self.sessions.resize_with(conn + 1, || None);
        }
        if let Some(old) = self.sessions[conn].take() {
            // Not expected (the reactor always disconnects first); should it happen, the
            // old session's routing state goes (its requests without errors) so the
            // tables and counts stay true.
            self.cids.remove(&old.cid);
            self.monitors.retain(|&m| m != conn);
            self.roles[role_slot(old.role)] -= 1;
            self.router.remove_conn(conn);
        }
        self.roles[role_slot(role)] += 1;
        self.sessions[conn] = Some(Session::new(role, &cid, b""));
        self.cids.insert(cid.as_str().into(), conn);
        self.router.add_conn(conn);
        self.router
            .set_conn_key(conn, crate::router::cid_key(cid.as_bytes()));
        let private = format!("MSG:{cid}");
        let _ = self.router.subscribe(conn, private.as_bytes(), usize::MAX);
        if role == Role::Monitor {
            self.monitors.push(conn);
            if let Some(c) = self.cluster.as_mut() {
                c.monitors(true);
            }
        }
        cid
    }

    /// [`Broker::connect`] for an HTTP API sender (§8.1): a service connection of its
    /// own for one request, which produces no connection events.
    pub fn connect_quiet(&mut self, conn: ConnId) -> String {
        let cid = self.connect(conn, Role::Service);
        if let Some(s) = self.sessions.get_mut(conn).and_then(Option::as_mut) {
            s.quiet = true;
        }
        cid
    }

    /// Forget a connection: its subscriptions, enablements and requests. Requesters
    /// waiting on it get `responder disconnected`.
    pub fn disconnect(&mut self, conn: ConnId, out: &mut impl Outbox) {
        self.disconnect_because(conn, "normal", out);
    }

    /// [`Broker::disconnect`], `why` naming the close reason (as `/metrics` does) for
    /// the `SYS:DISCONNECT` event (§9.4).
    pub fn disconnect_because(&mut self, conn: ConnId, why: &str, out: &mut impl Outbox) {
        if self.session(conn).is_none() {
            return;
        }
        self.emit(
            crate::core::rooms::Event::Disconnect,
            conn,
            Some(why.as_bytes()),
            out,
        );
        let Some(session) = self.sessions.get_mut(conn).and_then(Option::take) else {
            return;
        };
        self.cids.remove(&session.cid);
        self.roles[role_slot(session.role)] -= 1;
        self.monitors.retain(|&m| m != conn);
        let held = self.cluster.is_some().then(|| self.router.held_by(conn));
        let events = self.router.subscription_count(conn) > 0 && self.local_events != 0;
        let orphaned = self.router.remove_conn(conn);
        if events {
            self.refresh_local_events();
        }
        if let Some(c) = self.cluster.as_mut() {
            c.conn_left(conn);
            c.granter_left(conn, &session.cid);
        }
        if let Some(held) = held {
            self.cluster_after_leave(held, self.monitors.is_empty());
        }
        for (p, target) in orphaned {
            self.stats.req_responder_gone += 1;
            if p.requester == REMOTE {
                self.fail_remote(p.rid, reason::RESPONDER_GONE);
                continue;
            }
            self.error_to(
                out,
                p.requester,
                b"REQ",
                &target,
                reason::RESPONDER_GONE,
                Some((p.reqid_name(), p.reqid_value())),
            );
        }
    }

    /// End every request whose deadline has passed, telling each requester.
    pub fn expire(&mut self, now: Instant, out: &mut impl Outbox) {
        self.clock = Some(now);
        while let Some((rid, p)) = self.router.pop_expired(now) {
            if p.requester == REMOTE {
                // The requester's node times it out itself.
                if let Some(c) = self.cluster.as_mut() {
                    c.end_in_request(rid);
                }
                continue;
            }
            self.stats.req_timed_out += 1;
            let target = self.router.topic(p.topic).map(|t| t.name.clone());
            let target = target.as_deref().unwrap_or(b"");
            self.error_to(
                out,
                p.requester,
                b"REQ",
                target,
                reason::TIMED_OUT,
                Some((p.reqid_name(), p.reqid_value())),
            );
        }
    }

    /// The next request deadline, if any request is pending.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.router.next_deadline()
    }

    /// Answer a message the decoder found malformed (§2): an error, nothing processed.
    pub fn malformed(&mut self, from: ConnId, msg: &Message<'_>, out: &mut impl Outbox) {
        let reqid = msg.header("ReqID");
        self.error_to(out, from, msg.cmd, msg.target, reason::MALFORMED, reqid);
    }

    /// Apply one message from an authenticated connection.
    pub fn apply(&mut self, from: ConnId, msg: &Message<'_>, now: Instant, out: &mut impl Outbox) {
        let Some(role) = self.role(from) else {
            return;
        };
        self.clock = Some(now);
        let cmd_idx = COMMANDS
            .iter()
            .position(|c| c.as_bytes() == msg.cmd)
            .unwrap_or(COMMANDS.len());
        self.stats.msgs_in[cmd_idx] += 1;
        let service = role.is_service();
        let private = msg.target.starts_with(b"MSG:");
        let sys = msg.target.starts_with(b"SYS:");
        let t = msg.target;
        match msg.cmd {
            b"SUB" => {
                let since = msg.header("since").map(|(_, v)| v);
                let since = match since.map(crate::core::history::parse_since) {
                    Some(None) => return self.error(out, from, msg, reason::BAD_SINCE),
                    Some(Some(s)) => Some(s),
                    None => None,
                };
                // A topic already held: a no-op, not checked again (§9.1); with `since`,
                // an error (§9.5).
                if self.router.is_subscribed(from, t) {
                    if since.is_some() {
                        self.error(out, from, msg, reason::ALREADY_SUBSCRIBED);
                    }
                    return;
                }
                let allowed = if sys {
                    service && crate::core::rooms::event_bit(t) != 0
                } else {
                    service
                        || (!private
                            && (self.is_enabled(t, Enable::Sub)
                                || self.router.has_grant(from, t, Enable::Sub)))
                };
                if !allowed {
                    return self.error(out, from, msg, reason::NOT_PERMITTED);
                }
                if let Some(since) = since {
                    if self.router.subscription_count(from) > self.settings.max_subscriptions {
                        return self.error(out, from, msg, reason::TOO_MANY_SUBSCRIPTIONS);
                    }
                    if self.cluster_keeps(t) {
                        // In a cluster the recovery waits for JetStream: the subscription
                        // is made now and its live messages held until it ends.
                        if let Err(SubError::TooMany) = self.subscribe_conn(from, t, now, out) {
                            return self.error(out, from, msg, reason::TOO_MANY_SUBSCRIPTIONS);
                        }
                        return self.cluster_recover(from, t, since, now, out);
                    }
                    self.recover(from, t, since, out);
                }
                if let Err(SubError::TooMany) = self.subscribe_conn(from, t, now, out) {
                    self.error(out, from, msg, reason::TOO_MANY_SUBSCRIPTIONS)
                }
            }
            b"UNS" => {
                self.unsubscribe_conn(from, t, now, out);
            }
            b"PUB" => {
                if sys
                    || (!service
                        && (private
                            || !(self.is_enabled(t, Enable::Pub)
                                || self.router.has_grant(from, t, Enable::Pub))))
                {
                    return self.error(out, from, msg, reason::NOT_PERMITTED);
                }
                self.publish(from, msg, now, out);
            }
            b"REQ" if sys => {
                if service && t == b"SYS:PRESENCE" {
                    self.presence_request(from, msg, now, out);
                } else {
                    self.error(out, from, msg, reason::NOT_PERMITTED);
                }
            }
            b"REQ" => self.request(from, msg, now, out),
            b"RES" => self.respond(from, msg, out),
            b"EPUB" | b"ESUB" | b"EREQ" | b"DPUB" | b"DSUB" | b"DREQ" => {
                if !service || sys {
                    return self.error(out, from, msg, reason::NOT_PERMITTED);
                }
                let kind = match &msg.cmd[1..] {
                    b"PUB" => Enable::Pub,
                    b"SUB" => Enable::Sub,
                    _ => Enable::Req,
                };
                let on = msg.cmd[0] == b'E';
                if msg.header("forcid").is_some() {
                    return self.grant_for(from, msg, kind, on, now, out);
                }
                if on {
                    let before = self.router.is_enabled(t, kind);
                    self.router.enable(from, t, kind);
                    if !before && self.router.is_enabled(t, kind) {
                        if let Some(c) = self.cluster.as_mut() {
                            c.announce(t, kind, true);
                        }
                    }
                } else if self.router.disable(from, t, kind) && !self.router.is_enabled(t, kind) {
                    if let Some(c) = self.cluster.as_mut() {
                        c.announce(t, kind, false);
                    }
                }
            }
            b"INT" => self.internal(from, msg, now, out),
            _ => self.error(out, from, msg, reason::UNKNOWN_COMMAND),
        }
    }

    fn publish(&mut self, from: ConnId, msg: &Message<'_>, now: Instant, out: &mut impl Outbox) {
        if self.cluster.as_ref().is_some_and(|c| c.js.is_some()) && self.cluster_keeps(msg.target) {
            return self.publish_cluster_history(from, msg, now, out);
        }
        // A history topic (§9.5): stored with `offset` and `epoch`, whoever listens.
        let kept = self.history.as_ref().and_then(|h| h.rule_for(msg.target));
        // One topic look-up per message: the subscriber list is borrowed from the
        // router while the packet is built from the session (disjoint fields).
        let topic = self.router.lookup(msg.target);
        let subs: &[ConnId] = topic
            .and_then(|id| self.router.topic(id))
            .map_or(&[], |t| &t.subs);
        if subs.is_empty() && self.monitors.is_empty() && self.cluster.is_none() && kept.is_none() {
            return;
        }
        let session = self.sessions.get(from).and_then(Option::as_ref);
        if let ([to], true, None) = (subs, self.only_here(), kept) {
            // One receiver and nobody else to share a packet with: built for it alone.
            relay_one(out, *to, &mut self.pool, session, msg, &[], &[], &[]);
            self.stats.delivered_pub += 1;
            return;
        }
        let pkt = match (kept, self.history.as_mut()) {
            (Some(rule), Some(h)) => {
                let offset = h.next_offset();
                // The two header lines as they go out: `offset: <n>` written here, the
                // epoch's encoded once per process; both ASCII (no UTF-8 check).
                let mut line = [0u8; OFFSET_LINE_MAX];
                let offset_line = offset_line(offset, &mut line);
                let pkt = relay_packet_lines(
                    &mut self.pool,
                    session,
                    msg,
                    &[b"offset", b"epoch"],
                    &[],
                    &[offset_line, h.epoch_line()],
                );
                // The packet `size` pushed out goes back to the pool: a full history
                // costs no allocation per message.
                if let Some(old) = h.store(msg.target, rule, offset, &pkt, now) {
                    self.pool.give(old);
                }
                pkt
            }
            _ => relay_packet(&mut self.pool, session, msg, &[], &[]),
        };
        for &s in subs {
            out.send(s, &pkt);
        }
        self.stats.delivered_pub += subs.len() as u64;
        for &m in &self.monitors {
            if !topic.is_some_and(|t| self.router.is_subscribed_id(m, t)) {
                out.send(m, &pkt);
            }
        }
        if let Some(c) = self.cluster.as_mut() {
            c.publish_pub(msg.target, pkt.payload());
            if let Some(cid) = msg.target.strip_prefix(b"MSG:") {
                if let Some(node) = c.node_of_cid(cid) {
                    c.publish_private(node, cid, pkt.payload());
                }
            }
        }
    }

    fn request(&mut self, from: ConnId, msg: &Message<'_>, now: Instant, out: &mut impl Outbox) {
        let Some((reqid_name, reqid_value)) = msg.header("ReqID") else {
            return self.error(out, from, msg, reason::MISSING_REQID);
        };
        if reqid_value.len() > self.settings.max_reqid_bytes {
            // The ReqID is not echoed: it is what is refused, and a truncated copy
            // could match another request the sender has in flight. The error names the
            // command and target; a client finds the request by elimination or timeout.
            return self.error_to(out, from, msg.cmd, msg.target, reason::REQID_TOO_LONG, None);
        }
        // Every role is bounded (services too): the cap is on table memory, not trust.
        let in_flight = self.router.asked_count(from)
            + self.cluster.as_ref().map_or(0, |c| c.out_requests_of(from));
        if in_flight >= self.settings.max_pending_requests {
            self.stats.req_too_many += 1;
            return self.error(out, from, msg, reason::TOO_MANY_REQUESTS);
        }
        let deadline = now + self.settings.request_timeout;
        // In a cluster the responder with the fewest in flight anywhere (§6.2); a local
        // one among equals.
        if let Some(c) = self.cluster.as_mut().filter(|c| c.connected) {
            let local = self.router.least_loaded(msg.target).map(|(_, n)| n);
            if let Some(choice) = c.choose_remote(msg.target) {
                if local.is_none_or(|n| choice.load < n) {
                    let sent = self.forward_request(
                        from,
                        msg,
                        (reqid_name, reqid_value),
                        deadline,
                        choice,
                        out,
                    );
                    if sent {
                        return;
                    }
                }
            }
        }
        let Some((responder, rid)) =
            self.router
                .start_request(from, msg.target, reqid_name, reqid_value, deadline)
        else {
            self.stats.req_no_responder += 1;
            return self.error(out, from, msg, reason::NO_RESPONDER);
        };
        let mut digits = [0; 20];
        let rid_text = fmt_u64(rid, &mut digits);
        let extra: &[(&[u8], &[u8])] = &[(b"rid", rid_text)];
        self.relay_to(out, responder, from, msg, &[b"rid"], extra);
        self.stats.delivered_req += 1;
    }

    /// Hand the request to the responder another node has (`to`). False if it could not
    /// be sent (the requester is gone, or the backplane's bound).
    fn forward_request(
        &mut self,
        from: ConnId,
        msg: &Message<'_>,
        reqid: (&[u8], &[u8]),
        deadline: Instant,
        to: Choice,
        out: &mut impl Outbox,
    ) -> bool {
        let Some(cid) = self.cid(from) else {
            return false;
        };
        let r = OutReq::new(
            from,
            cid,
            reqid,
            msg.target,
            deadline,
            to.node,
            to.responder,
        );
        let max = self.settings.max_pending_requests;
        let Some(c) = self.cluster.as_mut() else {
            return false;
        };
        let Some(id) = c.start_out_request(r, max) else {
            return false;
        };
        let pkt = self.relay_packet(from, msg, &[b"rid"], &[]);
        let Some(c) = self.cluster.as_mut() else {
            return false;
        };
        if !c.send_request(id, pkt.payload()) {
            return false;
        }
        // Monitors here and on other nodes see it once, from this node (the node that
        // takes it does not copy it again).
        self.copy_to_monitors(&pkt, &[], out);
        true
    }

    fn respond(&mut self, from: ConnId, msg: &Message<'_>, out: &mut impl Outbox) {
        let Some((_, rid_text)) = msg.header("rid") else {
            return self.error(out, from, msg, reason::MISSING_RID);
        };
        let Some(rid) = std::str::from_utf8(rid_text)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        else {
            return; // not a pending rid: dropped silently (§6.5)
        };
        match self.router.pending(rid) {
            None => return,
            Some(p) if p.responder != from => {
                return self.error(out, from, msg, reason::NOT_YOUR_REQUEST);
            }
            Some(_) => {}
        }
        let Some(p) = self.router.end_request(rid) else {
            return;
        };
        self.stats.req_answered += 1;
        if p.requester == REMOTE {
            // Taken from another node: the answer goes back to it as the requester
            // gets it (with its ReqID), which that node passes on as it is.
            let pkt = self.relay_packet(
                from,
                msg,
                &[b"rid", b"reqid"],
                &[(p.reqid_name(), p.reqid_value())],
            );
            self.answer_remote(rid, pkt.payload());
            self.copy_to_monitors(&pkt, &[], out);
            return;
        }
        let extra: &[(&[u8], &[u8])] = &[(p.reqid_name(), p.reqid_value())];
        self.relay_to(out, p.requester, from, msg, &[b"rid", b"reqid"], extra);
        self.stats.delivered_res += 1;
    }

    fn internal(&mut self, from: ConnId, msg: &Message<'_>, now: Instant, out: &mut impl Outbox) {
        if !self.role(from).is_some_and(Role::is_service) {
            return self.error(out, from, msg, reason::NOT_PERMITTED);
        }
        match msg.target {
            b"UID" => {}
            b"SUB" | b"UNS" => return self.int_sub(from, msg, now, out),
            b"KICK" => return self.int_kick(from, msg, out),
            _ => return self.error(out, from, msg, reason::UNKNOWN_TARGET),
        }
        let (Some((_, forcid)), Some((_, setuid))) = (msg.header("forcid"), msg.header("setuid"))
        else {
            return self.error(out, from, msg, reason::MISSING_HEADER);
        };
        let conn = std::str::from_utf8(forcid)
            .ok()
            .and_then(|c| self.cids.get(c).copied());
        let Some(session) = conn.and_then(|c| self.sessions.get_mut(c).and_then(Option::as_mut))
        else {
            if let Some(c) = self.cluster.as_mut() {
                if let Some(node) = c.node_of_cid(forcid) {
                    if c.knows_node(node) {
                        c.publish_uid(node, forcid, setuid);
                        return;
                    }
                }
            }
            return self.error(out, from, msg, reason::UNKNOWN_CID);
        };
        session.set_uid(setuid);
        if let Some(c) = conn {
            self.router.set_uid(c, setuid);
        }
    }

    /// The copies of a routed REQ or RES for the monitors here (but those in `skip`, who
    /// got it already) and on other nodes.
    fn copy_to_monitors(&mut self, pkt: &Rc<Packet>, skip: &[ConnId], out: &mut impl Outbox) {
        for &m in &self.monitors {
            if !skip.contains(&m) {
                out.send(m, pkt);
            }
        }
        if let Some(c) = self.cluster.as_mut() {
            c.publish_monitor_copy(pkt.payload());
        }
    }

    /// No monitor and no other node: a message routed to one connection here goes to
    /// nobody else.
    fn only_here(&self) -> bool {
        self.monitors.is_empty() && self.cluster.is_none()
    }

    /// `msg` relayed from `from` (as [`Broker::relay_packet`] encodes it) to `to`, and
    /// its copies to the monitors. With nobody else to share it with, built for `to`
    /// alone ([`Outbox::send_one`]).
    fn relay_to(
        &mut self,
        out: &mut impl Outbox,
        to: ConnId,
        from: ConnId,
        msg: &Message<'_>,
        drop: &[&[u8]],
        extra: &[(&[u8], &[u8])],
    ) {
        let session = self.sessions.get(from).and_then(Option::as_ref);
        if self.only_here() {
            return relay_one(out, to, &mut self.pool, session, msg, drop, extra, &[]);
        }
        let pkt = relay_packet(&mut self.pool, session, msg, drop, extra);
        out.send(to, &pkt);
        self.copy_to_monitors(&pkt, &[to], out);
    }

    /// Encode `msg` as relayed from `from`: the sender's headers in order, minus `cid`,
    /// `uid` and any name in `drop` (lower case; compared case-insensitively), then
    /// `extra`, then the server's `cid` and `uid`.
    fn relay_packet(
        &mut self,
        from: ConnId,
        msg: &Message<'_>,
        drop: &[&[u8]],
        extra: &[(&[u8], &[u8])],
    ) -> Rc<Packet> {
        let session = self.sessions.get(from).and_then(Option::as_ref);
        relay_packet(&mut self.pool, session, msg, drop, extra)
    }

    pub(crate) fn error(
        &mut self,
        out: &mut impl Outbox,
        to: ConnId,
        msg: &Message<'_>,
        why: &'static str,
    ) {
        let reqid = msg.header("ReqID");
        self.error_to(out, to, msg.cmd, msg.target, why, reqid);
    }

    pub(crate) fn error_to(
        &mut self,
        out: &mut impl Outbox,
        to: ConnId,
        cmd: &[u8],
        target: &[u8],
        why: &'static str,
        reqid: Option<(&[u8], &[u8])>,
    ) {
        if let Some(i) = reason::ALL.iter().position(|r| *r == why) {
            self.stats.errors[i] += 1;
        }
        out.send(to, &Rc::new(error_packet(cmd, target, why, reqid)));
    }
}

/// Room for `offset: <u64>\r\n`.
const OFFSET_LINE_MAX: usize = 30;

/// `offset: <n>\r\n` in `buf`.
fn offset_line(n: u64, buf: &mut [u8; OFFSET_LINE_MAX]) -> &[u8] {
    let mut digits = itoa::Buffer::new();
    let d = digits.format(n).as_bytes();
    let end = 8 + d.len() + 2;
    buf[..8].copy_from_slice(b"offset: ");
    buf[8..8 + d.len()].copy_from_slice(d);
    buf[8 + d.len()..end].copy_from_slice(b"\r\n");
    &buf[..end]
}

/// Encode `msg` as relayed from the connection whose session is `origin` (`None`: not
/// authenticated): the sender's headers in order, minus any name in `drop` (lower case;
/// compared case-insensitively) and minus `cid` and `uid`; then `extra`; then the
/// server's `cid` and `uid` for the sender. (What another node relayed is passed on as it
/// is, never through here.)
pub(crate) fn relay_packet(
    pool: &mut PacketPool,
    origin: Option<&Session>,
    msg: &Message<'_>,
    drop: &[&[u8]],
    extra: &[(&[u8], &[u8])],
) -> Rc<Packet> {
    relay_packet_lines(pool, origin, msg, drop, extra, &[])
}

/// [`relay_packet`], with `lines` after `extra`: server header lines encoded already
/// (`name: value\r\n` each), ASCII (so not checked for UTF-8 again).
pub(crate) fn relay_packet_lines(
    pool: &mut PacketPool,
    origin: Option<&Session>,
    msg: &Message<'_>,
    drop: &[&[u8]],
    extra: &[(&[u8], &[u8])],
    lines: &[&[u8]],
) -> Rc<Packet> {
    let r = Relay::new(origin, msg, drop, extra, lines);
    pool.build(r.size().hint, r.utf8(), |b| r.fill(b))
}

/// [`relay_packet_lines`] for one receiver only, through [`Outbox::send_one`] (which
/// may build it in place in that receiver's queue).
#[allow(clippy::too_many_arguments)]
pub(crate) fn relay_one(
    out: &mut impl Outbox,
    to: ConnId,
    pool: &mut PacketPool,
    origin: Option<&Session>,
    msg: &Message<'_>,
    drop: &[&[u8]],
    extra: &[(&[u8], &[u8])],
    lines: &[&[u8]],
) {
    let r = Relay::new(origin, msg, drop, extra, lines);
    out.send_one(to, pool, r.size(), r.utf8(), |b| r.fill(b));
}

/// The room a message about to be encoded asks for: `hint` up front (a little more than
/// it usually takes), `bound` at most (whatever its body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub hint: usize,
    pub bound: usize,
}

impl Size {
    /// A message of exactly `len` bytes.
    pub fn exact(len: usize) -> Size {
        Size {
            hint: len,
            bound: len,
        }
    }
}

/// A message as relayed (see [`relay_packet`]): what is encoded, before it is.
struct Relay<'a, 'm> {
    msg: &'a Message<'m>,
    /// The server's `cid` and `uid` lines for the sender.
    tail: &'a [u8],
    tail_utf8: bool,
    drop: &'a [&'a [u8]],
    extra: &'a [(&'a [u8], &'a [u8])],
    lines: &'a [&'a [u8]],
}

impl<'a, 'm> Relay<'a, 'm> {
    fn new(
        origin: Option<&'a Session>,
        msg: &'a Message<'m>,
        drop: &'a [&'a [u8]],
        extra: &'a [(&'a [u8], &'a [u8])],
        lines: &'a [&'a [u8]],
    ) -> Self {
        debug_assert!(lines.iter().all(|l| l.is_ascii() && l.ends_with(b"\r\n")));
        let (tail, tail_utf8): (&[u8], bool) = match origin {
            Some(s) => (&s.relay_tail, s.tail_utf8),
            None => (b"cid: \r\nuid: \r\n", true),
        };
        Relay {
            msg,
            tail,
            tail_utf8,
            drop,
            extra,
            lines,
        }
    }

    #[inline]
    fn size(&self) -> Size {
        let msg = self.msg;
        // First line, headers (+4 for ": " and CRLF each), server headers, blank line,
        // terminator: exact, or more when headers are dropped.
        let head = msg.cmd.len()
            + 1
            + msg.target.len()
            + 2
            + msg
                .headers()
                .map(|(n, v)| n.len() + v.len() + 4)
                .sum::<usize>()
            + self
                .extra
                .iter()
                .map(|(n, v)| n.len() + v.len() + 4)
                .sum::<usize>()
            + self.lines.iter().map(|l| l.len()).sum::<usize>()
            + self.tail.len()
            + 2
            + 5;
        let body = msg.body.len();
        // Stuffing adds a dot at the start and after each line feed: at most one for
        // every two bytes, and one.
        let stuffing = if msg.plain_body { 0 } else { body / 2 + 1 };
        Size {
            hint: head - 10 + body + body / 32 + 32,
            bound: head + body + stuffing,
        }
    }

    /// A message that came as UTF-8 stays UTF-8 when its parts are relayed (they are
    /// cut at ASCII bytes), with server headers that are UTF-8 too: no second check.
    #[inline]
    fn utf8(&self) -> bool {
        self.msg.utf8
            && self.tail_utf8
            && self
                .extra
                .iter()
                .all(|(n, v)| n.is_ascii() && std::str::from_utf8(v).is_ok())
    }

    fn fill(&self, b: &mut Vec<u8>) {
        let msg = self.msg;
        b.extend_from_slice(msg.cmd);
        b.push(b' ');
        b.extend_from_slice(msg.target);
        b.extend_from_slice(b"\r\n");
        for (name, value) in msg.headers() {
            let skip = name.eq_ignore_ascii_case(b"cid")
                || name.eq_ignore_ascii_case(b"uid")
                || self.drop.iter().any(|d| name.eq_ignore_ascii_case(d));
            if !skip {
                push_header(b, name, value);
            }
        }
        for (n, v) in self.extra {
            push_header(b, n, v);
        }
        for l in self.lines {
            b.extend_from_slice(l);
        }
        b.extend_from_slice(self.tail);
        b.extend_from_slice(b"\r\n");
        if msg.plain_body {
            b.extend_from_slice(&msg.body);
        } else {
            push_body(b, &msg.body);
        }
        b.extend_from_slice(b"\r\n.\r\n");
    }
}

/// The §7 error message: `PUB ERROR` with `cmd`, `target`, `reason` (and `ReqID`),
/// body `<reason>: <CMD> <TARGET>`.
pub fn error_packet(cmd: &[u8], target: &[u8], why: &str, reqid: Option<(&[u8], &[u8])>) -> Packet {
    Packet::build(|b| {
        b.extend_from_slice(b"PUB ERROR\r\n");
        push_header(b, b"cmd", cmd);
        push_header(b, b"target", target);
        push_header(b, b"reason", why.as_bytes());
        if let Some((n, v)) = reqid {
            push_header(b, n, v);
        }
        b.extend_from_slice(b"\r\n");
        let mut body = Vec::with_capacity(why.len() + cmd.len() + target.len() + 3);
        body.extend_from_slice(why.as_bytes());
        body.extend_from_slice(b": ");
        body.extend_from_slice(cmd);
        body.push(b' ');
        body.extend_from_slice(target);
        push_body(b, &body);
        b.extend_from_slice(b"\r\n.\r\n");
    })
}

fn base36(mut n: u64) -> String {
    const D: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut v = Vec::new();
    loop {
        v.push(D[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    v.reverse();
    String::from_utf8(v).unwrap_or_default()
}

/// A random cid prefix: 6 characters of `[0-9a-z]`.
pub fn random_cid_prefix() -> String {
    let mut bytes = [0u8; 6];
    if getrandom::fill(&mut bytes).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    const D: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let s: Vec<u8> = bytes.iter().map(|b| D[(*b as usize) % 36]).collect();
    String::from_utf8(s).unwrap_or_default()
}

#[cfg(test)]
mod key_tests {
    use super::*;

    #[test]
    fn the_digest_names_the_key_that_matched() {
        let keys = Keys {
            service: vec!["svc-1".into()],
            client: vec!["cli-1".into(), "cli-2".into()],
            monitor: vec![],
        };
        let (role, d) = keys.authenticate_digest(b"  cli-2\r\n").unwrap();
        assert_eq!(role, Role::Client);
        assert_eq!(d, KeyDigest::of(b"cli-2"));
        assert_ne!(d, KeyDigest::of(b"cli-1"));
        assert!(keys.digests().contains(&(Role::Client, d)));
        assert!(!keys.digests().contains(&(Role::Service, d)));
        assert_eq!(keys.authenticate_digest(b"cli-3"), None);
        // The digest's Debug is a number, never the key.
        assert!(!format!("{d:?}").contains("cli-2"));
    }
}
