//! What one node knows of the cluster, pure and I/O-free: the subjects it subscribes on
//! the backplane, the other nodes and the enablements they hold, the requests it sent to
//! other nodes and the ones it took from them, and the NATS bytes waiting to be written.
//!
//! The broker drives it (see `cluster::bridge`): every cross-node effect of a command is
//! one NATS `PUB` appended to [`Cluster::out`], which the reactor writes to nats-server.
//!
//! Subjects, for a cluster named `P` (default `mm`) and a node id `N` (its cid prefix):
//! - `P.pub.<token(t)>`: every PUB to `t`, the relayed message as the payload. A node
//!   subscribes it while it has a local subscriber of `t`.
//! - `P.req.<token(t)>`, queue group `P.req`: a REQ no local responder takes, the reply
//!   subject being `P.inbox.<N>.<id>`. Subscribed by every node with responders for `t`.
//! - `P.inbox.<N>.>`: answers to this node's forwarded requests: `T <node>` (taken),
//!   `R` + the relayed RES, `X <reason>`; or NATS's no-responders status.
//! - `P.node.<N>`: `M <cid>` + a private message, `U <cid>` + a uid, `S <node>` (send
//!   your full state to that node).
//! - `P.ctl`: `H <node> <version> <monitors>` every second, `E <node> <version> <kind>
//!   <0|1> <token>` on every change of the node's enablements, `F <node> <version>` and
//!   a line `<kind> <token>` per enablement (the full state), `J <node>` (joined: send
//!   me your state).
//! - `P.mon`: copies of REQ and RES for the monitors of other nodes (subscribed, with
//!   `P.pub.>`, by nodes that have monitors).

use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::cluster::{proto, subject};
use crate::router::{ConnId, Enable};

/// The requester recorded for a request another node forwarded here (its answer goes
/// back over the backplane, not to a connection).
pub const REMOTE: ConnId = usize::MAX;

/// Why a message for other nodes was not sent (`middleman_cluster_dropped_total{reason}`).
pub const DROP_REASONS: [&str; 3] = ["disconnected", "buffer_full", "too_large"];
const DISCONNECTED: usize = 0;
const BUFFER_FULL: usize = 1;
const TOO_LARGE: usize = 2;

/// Cluster settings.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// Subject prefix (one NATS token).
    pub name: String,
    /// Most bytes waiting for nats-server; beyond, messages for other nodes are dropped.
    pub max_pending: usize,
    /// A node unheard for this long is gone.
    pub node_timeout: Duration,
    /// Heartbeat period.
    pub heartbeat: Duration,
    /// Delay before a subject nobody here needs any more is unsubscribed (churn).
    pub unsub_delay: Duration,
    /// A name for people (`--cluster-node-name`), shown beside the id.
    pub node_name: Option<String>,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            name: "mm".into(),
            max_pending: 64 << 20,
            node_timeout: Duration::from_secs(3),
            heartbeat: Duration::from_secs(1),
            unsub_delay: Duration::from_secs(1),
            node_name: None,
        }
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct ClusterStats {
    /// Messages published to the backplane.
    pub messages_out: u64,
    /// Messages received from it.
    pub messages_in: u64,
    /// Messages for other nodes not sent, by [`DROP_REASONS`].
    pub dropped: [u64; 3],
    /// Connections to nats-server made after the first.
    pub reconnects: u64,
    /// Times the backplane connection was up (the first one included).
    pub connects: u64,
}

/// What a subscription id stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sid {
    /// `P.pub.<token(t)>`: deliver to the local subscribers of `t` (shared, so looking
    /// a message's subscription up costs no allocation).
    Pub(Rc<[u8]>),
    /// `P.req.<token(t)>`: take a request for `t`.
    Req(Rc<[u8]>),
    /// `P.inbox.<N>.>`.
    Inbox,
    /// `P.node.<N>`.
    Node,
    /// `P.ctl`.
    Ctl,
    /// `P.pub.>`: every PUB of the cluster, for the local monitors.
    MonPub,
    /// `P.mon`: REQ and RES of other nodes, for the local monitors.
    Mon,
}

/// Another node as `/stats` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    /// Its id (its cid prefix).
    pub id: String,
    /// Its `--cluster-node-name`, if it has one.
    pub name: Option<String>,
    /// It has monitors.
    pub monitors: bool,
    /// Seconds since it was last heard.
    pub heard_ago: f64,
}

/// Another node, as last heard.
#[derive(Debug)]
struct Node {
    last_heard: Instant,
    name: Option<Box<str>>,
    /// Version of its enablement state we hold (`None`: not synced yet).
    version: Option<u64>,
    monitors: bool,
    enabled: HashSet<(Box<[u8]>, u8)>,
}

/// A request this node sent to other nodes.
#[derive(Debug)]
pub struct OutReq {
    /// The requesting connection and its cid (the slab key may be reused).
    pub requester: ConnId,
    pub cid: Box<str>,
    /// The requester's `ReqID` header, name as spelled and value.
    pub reqid_name: Box<[u8]>,
    pub reqid_value: Box<[u8]>,
    /// The target.
    pub target: Box<[u8]>,
    pub deadline: Instant,
    /// The node that took it (told by its `T` answer).
    pub taken_by: Option<Box<str>>,
}

/// The node's view of the cluster. See the module documentation.
#[derive(Debug)]
pub struct Cluster {
    /// This node's id (the cid prefix).
    pub node: Box<str>,
    settings: ClusterSettings,
    /// NATS protocol bytes waiting to be written.
    pub out: Vec<u8>,
    /// Bytes of `out` already written.
    pub out_sent: usize,
    /// The backplane connection is up (CONNECT answered).
    pub connected: bool,
    /// The server's `max_payload`.
    pub max_payload: usize,
    /// The nats-server address in use or last tried (set by the link).
    pub peer: String,
    next_sid: u64,
    sids: HashMap<u64, Sid>,
    pub_sids: HashMap<Box<[u8]>, u64>,
    req_sids: HashMap<Box<[u8]>, u64>,
    mon_sids: Option<(u64, u64)>,
    unsub_later: VecDeque<(Box<[u8]>, Instant)>,
    nodes: HashMap<Box<str>, Node>,
    /// Other nodes holding each enablement: (target, kind) -> count of nodes.
    /// By target, one count per kind (`kind_slot`): looked up by `&[u8]`, no key built.
    remote_enabled: HashMap<Box<[u8]>, [u32; 3]>,
    /// Version of this node's enablement state (one up per change).
    pub version: u64,
    out_reqs: HashMap<u64, OutReq>,
    out_order: VecDeque<(Instant, u64)>,
    out_per_conn: HashMap<ConnId, u32>,
    next_out: u64,
    /// Requests taken from other nodes: local rid -> reply subject.
    in_reqs: HashMap<u64, Box<[u8]>>,
    last_heartbeat: Option<Instant>,
    /// Counters.
    pub stats: ClusterStats,
    /// Scratch for subjects.
    subj: Vec<u8>,
    /// Scratch for payloads.
    scratch: Vec<u8>,
    /// `P.pub.` and `P.inbox.<N>.`, for reading subjects of incoming messages.
    pub_prefix: Box<[u8]>,
    inbox_prefix: Box<[u8]>,
}

fn kind_code(kind: Enable) -> u8 {
    match kind {
        Enable::Pub => b'p',
        Enable::Sub => b's',
        Enable::Req => b'r',
    }
}

fn kind_slot(code: u8) -> usize {
    match code {
        b'p' => 0,
        b's' => 1,
        _ => 2,
    }
}

/// The enablement a kind code stands for.
pub fn kind_of(code: u8) -> Option<Enable> {
    match code {
        b'p' => Some(Enable::Pub),
        b's' => Some(Enable::Sub),
        b'r' => Some(Enable::Req),
        _ => None,
    }
}

impl Cluster {
    /// A node named `node` (its cid prefix), not yet connected.
    pub fn new(node: &str, settings: ClusterSettings) -> Cluster {
        let pub_prefix = format!("{}.pub.", settings.name).into_bytes().into();
        let inbox_prefix = format!("{}.inbox.{node}.", settings.name)
            .into_bytes()
            .into();
        Cluster {
            node: node.into(),
            settings,
            out: Vec::new(),
            out_sent: 0,
            connected: false,
            max_payload: 1 << 20,
            peer: String::new(),
            next_sid: 1,
            sids: HashMap::new(),
            pub_sids: HashMap::new(),
            req_sids: HashMap::new(),
            mon_sids: None,
            unsub_later: VecDeque::new(),
            nodes: HashMap::new(),
            remote_enabled: HashMap::new(),
            version: 0,
            out_reqs: HashMap::new(),
            out_order: VecDeque::new(),
            out_per_conn: HashMap::new(),
            next_out: 1,
            in_reqs: HashMap::new(),
            last_heartbeat: None,
            stats: ClusterStats::default(),
            subj: Vec::new(),
            scratch: Vec::new(),
            pub_prefix,
            inbox_prefix,
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    /// Bytes waiting for nats-server.
    pub fn pending_bytes(&self) -> usize {
        self.out.len() - self.out_sent
    }

    /// Other nodes currently heard.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The other nodes, by id.
    pub fn nodes(&self, now: Instant) -> Vec<NodeInfo> {
        let mut v: Vec<_> = self
            .nodes
            .iter()
            .map(|(id, n)| NodeInfo {
                id: id.to_string(),
                name: n.name.as_deref().map(str::to_owned),
                monitors: n.monitors,
                heard_ago: now.saturating_duration_since(n.last_heard).as_secs_f64(),
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// This node's `--cluster-node-name`, if it has one.
    pub fn node_name(&self) -> Option<&str> {
        self.settings.node_name.as_deref()
    }

    /// The cluster's name (the subject prefix).
    pub fn cluster_name(&self) -> &str {
        &self.settings.name
    }

    /// The node a cid belongs to, if it is another node's (cids start with the node id).
    pub fn node_of_cid<'c>(&self, cid: &'c [u8]) -> Option<&'c [u8]> {
        let n = self.node.len();
        if cid.len() > n && &cid[..n] != self.node.as_bytes() {
            Some(&cid[..n])
        } else {
            None
        }
    }

    /// Is `node` a node this one hears?
    pub fn knows_node(&self, node: &[u8]) -> bool {
        std::str::from_utf8(node).is_ok_and(|n| self.nodes.contains_key(n))
    }

    /// Does another node hold `kind` on `target`?
    pub fn remote_enabled(&self, target: &[u8], kind: Enable) -> bool {
        self.remote_enabled
            .get(target)
            .is_some_and(|c| c[kind_slot(kind_code(kind))] > 0)
    }

    fn count_remote(&mut self, key: &(Box<[u8]>, u8)) {
        self.remote_enabled.entry(key.0.clone()).or_insert([0; 3])[kind_slot(key.1)] += 1;
    }

    /// Does any other node have monitors?
    pub fn remote_monitors(&self) -> bool {
        self.nodes.values().any(|n| n.monitors)
    }

    fn sid_for(&mut self, sid: Sid) -> u64 {
        let id = self.next_sid;
        self.next_sid += 1;
        self.sids.insert(id, sid);
        id
    }

    /// What a subscription id stands for.
    pub fn sid(&self, id: u64) -> Option<&Sid> {
        self.sids.get(&id)
    }

    // ------------------------------------------------------------------ writing

    /// Append a control operation (SUB/UNSUB): never dropped for size (they are small
    /// and bounded by the tables), only skipped while disconnected (re-sent on connect).
    fn write_sub(&mut self, sid: u64) {
        if !self.connected {
            return;
        }
        let Some(kind) = self.sids.get(&sid).cloned() else {
            return;
        };
        let node = self.node.clone();
        let node = node.as_bytes();
        let (subj, queue) = match &kind {
            Sid::Pub(t) => (self.subject(&[b"pub"], Some(t)), None),
            Sid::Req(t) => (
                self.subject(&[b"req"], Some(t)),
                Some(format!("{}.req", self.settings.name)),
            ),
            Sid::Inbox => (self.subject(&[b"inbox", node, b">"], None), None),
            Sid::Node => (self.subject(&[b"node", node], None), None),
            Sid::Ctl => (self.subject(&[b"ctl"], None), None),
            Sid::MonPub => (self.subject(&[b"pub", b">"], None), None),
            Sid::Mon => (self.subject(&[b"mon"], None), None),
        };
        let _ = proto::sub(
            &mut self.out,
            &subj,
            queue.as_deref().map(str::as_bytes),
            sid,
        );
        self.done_subject(subj);
    }

    fn write_unsub(&mut self, sid: u64) {
        if self.connected {
            proto::unsub(&mut self.out, sid, None);
        }
    }

    /// Publish `payload` (after `head`, if any) on `subject` with an optional reply
    /// subject. Dropped and counted when disconnected, too large or over the bound.
    fn publish(
        &mut self,
        subject: &[u8],
        reply: Option<&[u8]>,
        head: &[u8],
        payload: &[u8],
    ) -> bool {
        if !self.connected {
            self.stats.dropped[DISCONNECTED] += 1;
            return false;
        }
        let len = head.len() + payload.len();
        if len > self.max_payload {
            self.stats.dropped[TOO_LARGE] += 1;
            return false;
        }
        if self.pending_bytes() + len + subject.len() + 64 > self.settings.max_pending {
            self.stats.dropped[BUFFER_FULL] += 1;
            return false;
        }
        let ok = if head.is_empty() {
            proto::pub_(&mut self.out, subject, reply, payload).is_ok()
        } else {
            let mut s = std::mem::take(&mut self.scratch);
            s.clear();
            s.extend_from_slice(head);
            s.extend_from_slice(payload);
            let ok = proto::pub_(&mut self.out, subject, reply, &s).is_ok();
            self.scratch = s;
            ok
        };
        if ok {
            self.stats.messages_out += 1;
        }
        ok
    }

    fn subject(&mut self, parts: &[&[u8]], token: Option<&[u8]>) -> Vec<u8> {
        let mut s = std::mem::take(&mut self.subj);
        s.clear();
        s.extend_from_slice(self.settings.name.as_bytes());
        for p in parts {
            s.push(b'.');
            s.extend_from_slice(p);
        }
        if let Some(t) = token {
            s.push(b'.');
            subject::encode(t, &mut s);
        }
        s
    }

    fn done_subject(&mut self, s: Vec<u8>) {
        self.subj = s;
    }

    /// Publish a relayed PUB of `target` to the other nodes.
    pub fn publish_pub(&mut self, target: &[u8], payload: &[u8]) {
        let s = self.subject(&[b"pub"], Some(target));
        self.publish(&s, None, b"", payload);
        self.done_subject(s);
    }

    /// Send a private message to the node owning `cid`.
    pub fn publish_private(&mut self, node: &[u8], cid: &[u8], payload: &[u8]) {
        self.send_to_node(node, b"M ", cid, payload);
    }

    /// Tell the node owning `cid` its new uid.
    pub fn publish_uid(&mut self, node: &[u8], cid: &[u8], uid: &[u8]) {
        self.send_to_node(node, b"U ", cid, uid);
    }

    /// `<tag><cid>` LF `payload` on `node`'s own subject.
    fn send_to_node(&mut self, node: &[u8], tag: &[u8], cid: &[u8], payload: &[u8]) {
        let s = self.subject(&[b"node", node], None);
        let mut head = Vec::with_capacity(tag.len() + cid.len() + 1);
        head.extend_from_slice(tag);
        head.extend_from_slice(cid);
        head.push(b'\n');
        self.publish(&s, None, &head, payload);
        self.done_subject(s);
    }

    /// A copy of a REQ or RES for the monitors of other nodes (only if there are any).
    pub fn publish_monitor_copy(&mut self, payload: &[u8]) {
        if self.remote_monitors() {
            let s = self.subject(&[b"mon"], None);
            self.publish(&s, None, b"", payload);
            self.done_subject(s);
        }
    }

    /// Answer a request taken from another node, on its reply subject.
    pub fn answer(&mut self, reply: &[u8], head: &[u8], payload: &[u8]) {
        self.publish(reply, None, head, payload);
    }

    // ------------------------------------------------------------------ interest

    /// A local subscriber of `target` appeared (`on`) or the last one left.
    pub fn interest(&mut self, target: &[u8], on: bool, now: Instant) {
        if on {
            if !self.pub_sids.contains_key(target) {
                let sid = self.sid_for(Sid::Pub(target.into()));
                self.pub_sids.insert(target.into(), sid);
                self.write_sub(sid);
            }
        } else if self.pub_sids.contains_key(target) {
            self.unsub_later
                .push_back((target.into(), now + self.settings.unsub_delay));
        }
    }

    /// Unsubscribe the subjects whose delay passed and that `still_needed` does not claim.
    pub fn unsubscribe_due(&mut self, now: Instant, still_needed: impl Fn(&[u8]) -> bool) {
        while let Some((_, at)) = self.unsub_later.front() {
            if *at > now {
                break;
            }
            let Some((t, _)) = self.unsub_later.pop_front() else {
                break;
            };
            if still_needed(&t) {
                continue;
            }
            if let Some(sid) = self.pub_sids.remove(&t) {
                self.sids.remove(&sid);
                self.write_unsub(sid);
            }
        }
    }

    /// The node's local responders for `target` appeared (`on`) or the last one left.
    pub fn responders(&mut self, target: &[u8], on: bool) {
        if on {
            if !self.req_sids.contains_key(target) {
                let sid = self.sid_for(Sid::Req(target.into()));
                self.req_sids.insert(target.into(), sid);
                self.write_sub(sid);
            }
        } else if let Some(sid) = self.req_sids.remove(target) {
            self.sids.remove(&sid);
            self.write_unsub(sid);
        }
    }

    /// The node has local monitors (`on`) or no more. The others are told at once (a
    /// heartbeat out of turn), so the copies they send start without waiting a period.
    pub fn monitors(&mut self, on: bool) {
        match (on, self.mon_sids) {
            (true, None) => {
                let a = self.sid_for(Sid::MonPub);
                let b = self.sid_for(Sid::Mon);
                self.mon_sids = Some((a, b));
                self.write_sub(a);
                self.write_sub(b);
                self.send_heartbeat(true);
            }
            (false, Some((a, b))) => {
                self.mon_sids = None;
                for s in [a, b] {
                    self.sids.remove(&s);
                    self.write_unsub(s);
                }
                self.send_heartbeat(false);
            }
            _ => {}
        }
    }

    /// A local enablement appeared or lapsed: announce it.
    pub fn announce(&mut self, target: &[u8], kind: Enable, on: bool) {
        self.version += 1;
        let mut head = format!(
            "E {} {} {} {} ",
            self.node,
            self.version,
            kind_code(kind) as char,
            u8::from(on)
        )
        .into_bytes();
        subject::encode(target, &mut head);
        let s = self.subject(&[b"ctl"], None);
        self.publish(&s, None, &head, b"");
        self.done_subject(s);
        if kind == Enable::Req {
            self.responders(target, on);
        }
    }

    /// Publish the full enablement state (`F`), to `to` or to everyone.
    pub fn send_state<'t>(
        &mut self,
        to: Option<&[u8]>,
        enabled: impl Iterator<Item = (&'t [u8], Enable)>,
    ) {
        let mut body = format!("F {} {}\n", self.node, self.version).into_bytes();
        for (t, kind) in enabled {
            let before = body.len();
            body.push(kind_code(kind));
            body.push(b' ');
            subject::encode(t, &mut body);
            body.push(b'\n');
            if body.len() > self.max_payload {
                body.truncate(before);
                log::warn!(
                    "cluster: this node's enablements exceed the backplane's max_payload \
                     ({} bytes); the rest are not announced",
                    self.max_payload
                );
                break;
            }
        }
        let s = match to {
            Some(node) => self.subject(&[b"node", node], None),
            None => self.subject(&[b"ctl"], None),
        };
        self.publish(&s, None, b"", &body);
        self.done_subject(s);
    }

    // ------------------------------------------------------------------ connection

    /// The backplane connection is up (CONNECT answered): subscribe everything again and
    /// say hello. `out` must hold only what the reactor wrote for this connection.
    pub fn on_connected(&mut self, now: Instant) {
        self.connected = true;
        self.stats.connects += 1;
        if self.stats.connects > 1 {
            self.stats.reconnects += 1;
        }
        if !self.sids.values().any(|s| *s == Sid::Ctl) {
            for s in [Sid::Ctl, Sid::Node, Sid::Inbox] {
                self.sid_for(s);
            }
        }
        let mut ids: Vec<u64> = self.sids.keys().copied().collect();
        ids.sort_unstable();
        for sid in ids {
            self.write_sub(sid);
        }
        let s = self.subject(&[b"ctl"], None);
        let hello = format!("J {}", self.node).into_bytes();
        self.publish(&s, None, &hello, b"");
        self.done_subject(s);
        self.last_heartbeat = Some(now);
        self.send_heartbeat(self.mon_sids.is_some());
    }

    /// The backplane connection is gone: what waits for it is dropped (counted).
    pub fn on_disconnected(&mut self) {
        self.connected = false;
        self.out.clear();
        self.out_sent = 0;
    }

    /// Send the heartbeat if it is due.
    pub fn heartbeat(&mut self, now: Instant, local_monitors: bool) {
        if self
            .last_heartbeat
            .is_some_and(|t| now.saturating_duration_since(t) < self.settings.heartbeat)
        {
            return;
        }
        self.last_heartbeat = Some(now);
        self.send_heartbeat(local_monitors);
    }

    fn send_heartbeat(&mut self, local_monitors: bool) {
        let s = self.subject(&[b"ctl"], None);
        let hb = format!(
            "H {} {} {}",
            self.node,
            self.version,
            u8::from(local_monitors)
        );
        self.publish(&s, None, hb.as_bytes(), b"");
        self.done_subject(s);
    }

    /// Nodes unheard for the node timeout: forget them, their enablements lapse. Returns
    /// their ids, for failing the requests they took.
    pub fn expire_nodes(&mut self, now: Instant) -> Vec<Box<str>> {
        let timeout = self.settings.node_timeout;
        let gone: Vec<Box<str>> = self
            .nodes
            .iter()
            .filter(|(_, n)| now.saturating_duration_since(n.last_heard) > timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            self.forget_node(id);
            log::warn!("cluster: node {id} unheard for {timeout:?}: gone, its enablements lapse");
        }
        gone
    }

    fn forget_node(&mut self, id: &str) {
        if let Some(n) = self.nodes.remove(id) {
            for key in n.enabled {
                self.lapse_remote(&key);
            }
        }
    }

    fn lapse_remote(&mut self, key: &(Box<[u8]>, u8)) {
        if let Some(c) = self.remote_enabled.get_mut(&key.0) {
            let slot = &mut c[kind_slot(key.1)];
            *slot = slot.saturating_sub(1);
            if *c == [0; 3] {
                self.remote_enabled.remove(&key.0);
            }
        }
    }

    fn heard(&mut self, node: &str, now: Instant) -> &mut Node {
        let n = self.nodes.entry(node.into()).or_insert_with(|| {
            log::info!("cluster: node {node} joined");
            Node {
                last_heard: now,
                name: None,
                version: None,
                monitors: false,
                enabled: HashSet::new(),
            }
        });
        n.last_heard = now;
        n
    }

    fn request_state(&mut self, from: &str) {
        let s = self.subject(&[b"node", from.as_bytes()], None);
        let req = format!("S {}", self.node);
        self.publish(&s, None, req.as_bytes(), b"");
        self.done_subject(s);
    }

    /// A `P.ctl` message. Returns the node whose full state must be sent to (a `J`).
    pub fn on_ctl(&mut self, payload: &[u8], now: Instant) -> Option<Box<str>> {
        let (line, rest) = match memchr::memchr(b'\n', payload) {
            Some(i) => (&payload[..i], &payload[i + 1..]),
            None => (payload, &[][..]),
        };
        let line = std::str::from_utf8(line).ok()?;
        let mut w = line.split(' ');
        let tag = w.next()?;
        let node = w.next()?;
        if node == &*self.node || node.is_empty() {
            return None;
        }
        match tag {
            "J" => {
                self.heard(node, now);
                return Some(node.into());
            }
            "H" => {
                let version: u64 = w.next()?.parse().ok()?;
                let monitors = w.next() == Some("1");
                let n = self.heard(node, now);
                n.monitors = monitors;
                if n.version != Some(version) {
                    self.request_state(node);
                }
            }
            "E" => {
                let version: u64 = w.next()?.parse().ok()?;
                let kind = w.next()?.as_bytes().first().copied()?;
                kind_of(kind)?;
                let on = w.next()? == "1";
                let target = subject::decode(w.next()?.as_bytes())?;
                let n = self.heard(node, now);
                if n.version.map(|v| v + 1) != Some(version) {
                    n.version = None;
                    self.request_state(node);
                    return None;
                }
                n.version = Some(version);
                let key = (target.into_boxed_slice(), kind);
                if on {
                    if n.enabled.insert(key.clone()) {
                        self.count_remote(&key);
                    }
                } else if n.enabled.remove(&key) {
                    self.lapse_remote(&key);
                }
            }
            "F" => self.on_full_state(node, w.next()?.parse().ok()?, rest, now),
            _ => {}
        }
        None
    }

    fn on_full_state(&mut self, node: &str, version: u64, lines: &[u8], now: Instant) {
        let mut set = HashSet::new();
        for l in lines.split(|&b| b == b'\n') {
            if l.len() < 3 || l[1] != b' ' || kind_of(l[0]).is_none() {
                continue;
            }
            if let Some(t) = subject::decode(&l[2..]) {
                set.insert((t.into_boxed_slice(), l[0]));
            }
        }
        let n = self.heard(node, now);
        let old = std::mem::replace(&mut n.enabled, set.clone());
        n.version = Some(version);
        for key in old.difference(&set) {
            self.lapse_remote(key);
        }
        for key in set.difference(&old) {
            self.count_remote(key);
        }
    }

    // ------------------------------------------------------------------ requests

    /// Record a request about to be forwarded; returns its reply subject, or `None` when
    /// the requester has too many in flight across the cluster already.
    pub fn start_out_request(&mut self, r: OutReq, max_per_conn: usize) -> Option<(u64, Vec<u8>)> {
        let n = self.out_per_conn.entry(r.requester).or_insert(0);
        if *n as usize >= max_per_conn {
            return None;
        }
        *n += 1;
        let id = self.next_out;
        self.next_out += 1;
        self.out_order.push_back((r.deadline, id));
        self.out_reqs.insert(id, r);
        let reply = format!("{}.inbox.{}.{id}", self.settings.name, self.node).into_bytes();
        Some((id, reply))
    }

    /// Requests `conn` has in flight toward other nodes.
    pub fn out_requests_of(&self, conn: ConnId) -> usize {
        self.out_per_conn.get(&conn).map_or(0, |&n| n as usize)
    }

    /// Forward a request (after [`Cluster::start_out_request`]). False if it could not be
    /// sent (then it is ended).
    pub fn send_request(&mut self, id: u64, target: &[u8], reply: &[u8], payload: &[u8]) -> bool {
        let s = self.subject(&[b"req"], Some(target));
        let ok = self.publish(&s, Some(reply), b"", payload);
        self.done_subject(s);
        if !ok {
            self.end_out_request(id);
        }
        ok
    }

    /// End a forwarded request (answered, failed, expired).
    pub fn end_out_request(&mut self, id: u64) -> Option<OutReq> {
        let r = self.out_reqs.remove(&id)?;
        if let Some(n) = self.out_per_conn.get_mut(&r.requester) {
            *n -= 1;
            if *n == 0 {
                self.out_per_conn.remove(&r.requester);
            }
        }
        Some(r)
    }

    /// The forwarded request `id`, if pending.
    pub fn out_request(&mut self, id: u64) -> Option<&mut OutReq> {
        self.out_reqs.get_mut(&id)
    }

    /// The next forwarded request past its deadline.
    pub fn pop_expired_out(&mut self, now: Instant) -> Option<OutReq> {
        while let Some(&(deadline, id)) = self.out_order.front() {
            if deadline > now {
                return None;
            }
            self.out_order.pop_front();
            if let Some(r) = self.end_out_request(id) {
                return Some(r);
            }
        }
        None
    }

    /// Forwarded requests taken by `node` (gone): ended and returned.
    pub fn take_out_requests_of_node(&mut self, node: &str) -> Vec<OutReq> {
        let ids: Vec<u64> = self
            .out_reqs
            .iter()
            .filter(|(_, r)| r.taken_by.as_deref() == Some(node))
            .map(|(&id, _)| id)
            .collect();
        let mut v: Vec<OutReq> = ids
            .into_iter()
            .filter_map(|id| self.end_out_request(id))
            .collect();
        v.sort_by_key(|r| r.deadline);
        v
    }

    /// Forwarded requests in flight.
    pub fn out_request_count(&self) -> usize {
        self.out_reqs.len()
    }

    /// A request from another node was delivered here under local `rid`.
    pub fn took(&mut self, rid: u64, reply: &[u8]) {
        self.in_reqs.insert(rid, reply.into());
        let head = format!("T {}", self.node);
        self.publish(reply, None, head.as_bytes(), b"");
    }

    /// The reply subject of a request taken from another node (ending it here).
    pub fn end_in_request(&mut self, rid: u64) -> Option<Box<[u8]>> {
        self.in_reqs.remove(&rid)
    }

    /// The inbox id of a subject `P.inbox.<N>.<id>`.
    pub fn inbox_id(&self, subject: &[u8]) -> Option<u64> {
        let rest = subject.strip_prefix(&*self.inbox_prefix)?;
        std::str::from_utf8(rest).ok()?.parse().ok()
    }

    /// The topic of a subject `P.pub.<token>`.
    pub fn pub_topic(&self, subject: &[u8]) -> Option<Vec<u8>> {
        subject::decode(subject.strip_prefix(&*self.pub_prefix)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connected(node: &str) -> Cluster {
        let mut c = Cluster::new(node, ClusterSettings::default());
        c.on_connected(Instant::now());
        c.out.clear();
        c
    }

    #[test]
    fn remote_enablements_follow_announcements_and_lapse_with_the_node() {
        let now = Instant::now();
        let mut b = connected("bbbbbb");
        assert_eq!(b.on_ctl(b"J aaaaaa", now).as_deref(), Some("aaaaaa"));
        b.on_ctl(b"F aaaaaa 3\np room\nr svc\n", now);
        assert!(b.remote_enabled(b"room", Enable::Pub));
        assert!(b.remote_enabled(b"svc", Enable::Req));
        assert!(!b.remote_enabled(b"room", Enable::Sub));
        // The next version applies; a gap asks for the full state instead.
        b.on_ctl(b"E aaaaaa 4 s 1 room", now);
        assert!(b.remote_enabled(b"room", Enable::Sub));
        b.out.clear();
        b.on_ctl(b"E aaaaaa 9 p 0 room", now);
        assert!(b.remote_enabled(b"room", Enable::Pub));
        assert!(String::from_utf8_lossy(&b.out).contains("S bbbbbb"));
        let gone = b.expire_nodes(now + Duration::from_secs(4));
        assert_eq!(gone, vec![Box::<str>::from("aaaaaa")]);
        assert!(!b.remote_enabled(b"room", Enable::Sub));
        assert!(!b.remote_enabled(b"svc", Enable::Req));
    }

    #[test]
    fn nothing_is_buffered_past_the_bound_or_while_disconnected() {
        let mut c = Cluster::new(
            "aaaaaa",
            ClusterSettings {
                max_pending: 4096,
                ..Default::default()
            },
        );
        c.publish_pub(b"t", b"x");
        assert_eq!(c.stats.dropped[DISCONNECTED], 1);
        c.on_connected(Instant::now());
        for _ in 0..100 {
            c.publish_pub(b"t", &[b'y'; 100]);
        }
        assert!(c.pending_bytes() <= 4096);
        assert!(c.stats.dropped[BUFFER_FULL] > 0);
        c.max_payload = 10;
        c.publish_pub(b"t", &[b'y'; 11]);
        assert_eq!(c.stats.dropped[TOO_LARGE], 1);
    }

    #[test]
    fn a_subject_is_unsubscribed_only_after_the_delay_and_if_still_unused() {
        let now = Instant::now();
        let mut c = connected("aaaaaa");
        c.interest(b"room 1", true, now);
        assert!(String::from_utf8_lossy(&c.out).starts_with("SUB mm.pub."));
        c.out.clear();
        c.interest(b"room 1", false, now);
        c.unsubscribe_due(now, |_| false);
        assert!(c.out.is_empty());
        c.unsubscribe_due(now + Duration::from_secs(2), |_| true);
        assert!(c.out.is_empty(), "needed again: kept");
        c.interest(b"room 1", false, now);
        c.unsubscribe_due(now + Duration::from_secs(2), |_| false);
        assert!(String::from_utf8_lossy(&c.out).starts_with("UNSUB "));
    }

    #[test]
    fn cids_of_other_nodes_are_recognised() {
        let c = connected("aaaaaa");
        assert_eq!(c.node_of_cid(b"bbbbbb12"), Some(&b"bbbbbb"[..]));
        assert_eq!(c.node_of_cid(b"aaaaaa12"), None);
        assert_eq!(c.node_of_cid(b"bbb"), None);
    }
}
