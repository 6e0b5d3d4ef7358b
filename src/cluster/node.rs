//! What one node knows of the cluster, pure and I/O-free: the subjects it subscribes on
//! the backplane, the other nodes with the enablements and responder loads they
//! announced, the requests it forwarded to other nodes and the ones it took from them,
//! and the NATS bytes waiting to be written ([`Lanes`]: control ahead of data).
//!
//! The broker drives it (see `cluster::bridge`): every cross-node effect of a command is
//! one NATS `PUB`, which the reactor writes to nats-server.
//!
//! Subjects, for a cluster named `P` (default `mm`) and a node id `N` (its cid prefix):
//! - `P.pub.<token(t)>`: every PUB to `t`, the relayed message as the payload. A node
//!   subscribes it while it has a local subscriber of `t` (changes coalesced per subject,
//!   an unsubscription delayed, both written within a budget per pass).
//! - `P.node.<N>`: `M <cid>` + a private message, `U <cid>` + a uid, `S <node>` (send
//!   your full state to that node), `F ...` (a full state, see below), and batches
//!   (`+`, see [`proto::pub_batch_open`]) of `Q <node> <id> <cid> <token(t)> <ReqID
//!   name> <ReqID value>` + a request
//!   addressed to the responder `cid` (or `*`: any) of this node: the requests a node
//!   forwarded to this one one after the other within a pass, the reply subject
//!   `P.inbox.<node>.q.<N>.<first id>.<last id>`.
//! - `P.inbox.<N>.>`: about this node's forwarded requests: on `a`, batches of answers
//!   (`<id>` LF the RES as the requester gets it); on `<id>`, `X <reason>` (it failed);
//!   on a request batch's reply subject, NATS's no-responders status (the node is gone:
//!   the batch's requests fail).
//! - `P.ctl`: `H <node> <version> <monitors> <loadseq> <nonce> <name>` every second,
//!   `E <node> <version> <kind> <0|1> <token>` on every change of the node's enablements,
//!   `F <node> <version>` and a line `<kind> <token>` per enablement (the full state),
//!   `L <node> <loadseq> <full> <seen>` and a line `<token> <cid>=<n> ...` per request
//!   target whose responders' in-flight counts changed (rate-limited), `J <node> <nonce>`
//!   (joined: send me your state), `D <node> <nonce>` (leaving now).
//! - `P.mon`: copies of REQ and RES for the monitors of other nodes (subscribed, with
//!   `P.pub.>`, by nodes that have monitors).
//!
//! Requests are balanced across the cluster (PROTOCOL.md §6.2): the requester's node
//! picks the responder with the fewest requests in flight, local or remote, each remote
//! count being what its node last announced plus what this node forwarded to it since
//! (the `seen` of an `L` tells which of this node's forwards its counts include).

use std::collections::{BTreeMap, VecDeque};
// foldhash, not SipHash: these maps are looked up per forwarded request and per backplane
// message (SipHash was ~6% of a requester node's time). Some are keyed by targets clients
// choose; as in the router, the per-map random seed is what stands against collisions.
use foldhash::{HashMap, HashSet};
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::cluster::lanes::Lanes;
use crate::cluster::{proto, subject};
use crate::router::{ConnId, Enable};

/// The requester recorded for a request another node forwarded here (its answer goes
/// back over the backplane, not to a connection).
pub const REMOTE: ConnId = usize::MAX;

/// What a batch on the data lane carries (consecutive operations of one kind and key
/// within a pass go out as one NATS message: nats-server's cost is per message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Batch {
    /// PUBs of one topic, on `P.pub.<token>`.
    Pub,
    /// Requests forwarded to one node, on `P.node.<N>`.
    Req,
    /// Answers to requests taken from one node, on `P.inbox.<N>.a`.
    Ans,
}

/// Digits of the last id in a request batch's reply subject (any u64 fits).
const ID_DIGITS: usize = 20;

/// A subject under this node's inbox ([`Cluster::inbox_of`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbox<'s> {
    /// `<id>`: about one forwarded request (`X <reason>`: it failed).
    One(u64),
    /// `a`: a batch of answers, items `<id>` LF RES (an answer too large to share a
    /// batch comes alone, without the batch marker).
    Answers,
    /// `q.<node>.<first>.<last>`: the reply subject of a batch of requests forwarded to
    /// `node` (only nats-server's no-responders status comes here).
    Requests {
        node: &'s str,
        first: u64,
        last: u64,
    },
}

/// Why a message for other nodes was not sent (`middleman_cluster_dropped_total{reason}`).
pub const DROP_REASONS: [&str; 4] = ["disconnected", "buffer_full", "too_large", "control_full"];
const DISCONNECTED: usize = 0;
const BUFFER_FULL: usize = 1;
const TOO_LARGE: usize = 2;
const CONTROL_FULL: usize = 3;

/// Room beyond the control bound kept for heartbeats and PONGs, which are never dropped
/// (a few seconds of them: a backplane that takes nothing for that long fails its PING).
const HEARTBEAT_ROOM: usize = 512;
/// Interest changes (SUB/UNSUB lines) written per pass at most, and only while the
/// control lane holds less than this many bytes.
const INTEREST_PER_PASS: usize = 1024;
const INTEREST_ROOM: usize = 32 << 10;
/// Load announcements at most this often.
pub const LOAD_EVERY: Duration = Duration::from_millis(20);

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

impl ClusterSettings {
    /// The control lane's bound (an eighth of the whole, at most 4 MiB): what control
    /// traffic may hold besides heartbeats; data gets the rest.
    pub fn ctl_bound(&self) -> usize {
        (self.max_pending / 8).min(4 << 20)
    }

    /// The data lane's bound: data never eats the control lane's room.
    pub fn data_bound(&self) -> usize {
        self.max_pending
            .saturating_sub(self.ctl_bound() + HEARTBEAT_ROOM)
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
    pub dropped: [u64; 4],
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
    /// `P.js.<N>.api.>`: JetStream API answers and publish acks (cluster history).
    JsApi,
    /// `P.js.<N>.live.<gen>`: the live history consumer of generation `gen`.
    JsLive(u64),
    /// `P.js.<N>.rec.<id>`: recovery `id`'s consumer.
    JsRec(u64),
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
    /// The nonce of the process heard under this id (a new one: it restarted).
    nonce: Option<u64>,
    /// Version of its enablement state we hold (`None`: not synced yet).
    version: Option<u64>,
    /// Sequence of its last load announcement (`None`: none yet).
    load_seq: Option<u64>,
    monitors: bool,
    enabled: HashSet<(Box<[u8]>, u8)>,
    /// The highest of this node's forwarded-request ids its last load announcement
    /// counted.
    seen_mine: u64,
    /// Targets it announced responders for.
    load_targets: HashSet<Box<[u8]>>,
}

/// A responder on another node, as its node announced it.
#[derive(Debug)]
struct RemoteResp {
    node: Rc<str>,
    cid: Rc<str>,
    /// Requests in flight, as announced.
    announced: u32,
    /// This node's forwards to it that the announcement did not count yet.
    extra: u32,
    /// Ids of this node's forwards to it not yet ended.
    /// Ascending (ids only grow, so a new one goes at the back; answers come roughly in
    /// order, so an ended one is near the front): a B-tree's search was 12% of a
    /// requester node's time here.
    ids: VecDeque<u64>,
}

impl RemoteResp {
    fn estimate(&self) -> u32 {
        self.announced.saturating_add(self.extra)
    }
}

/// A request this node sent to other nodes.
#[derive(Debug)]
pub struct OutReq {
    /// The requesting connection (its cid in `text`: the slab key may be reused).
    pub requester: ConnId,
    pub deadline: Instant,
    /// The node it is addressed to and the responder chosen there (`*`: any).
    pub node: Rc<str>,
    pub responder: Rc<str>,
    /// The requester's cid, its `ReqID` header (name as spelled, value) and the target,
    /// one after the other in one allocation (one per request, not four), and where the
    /// first three end.
    text: Box<[u8]>,
    ends: [u32; 3],
}

impl OutReq {
    /// A request of `requester` (whose cid is `cid`) with `ReqID` header `reqid` (name
    /// and value) to `target`, addressed to `responder` of `node`.
    pub fn new(
        requester: ConnId,
        cid: &str,
        reqid: (&[u8], &[u8]),
        target: &[u8],
        deadline: Instant,
        node: Rc<str>,
        responder: Rc<str>,
    ) -> OutReq {
        let text = [cid.as_bytes(), reqid.0, reqid.1, target].concat();
        // Each part is within a message's limits (far below 4 GiB).
        let a = cid.len() as u32;
        let b = a + reqid.0.len() as u32;
        let c = b + reqid.1.len() as u32;
        OutReq {
            requester,
            deadline,
            node,
            responder,
            text: text.into(),
            ends: [a, b, c],
        }
    }

    fn part(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        let end = self.ends.get(i).map_or(self.text.len(), |&e| e as usize);
        &self.text[start..end]
    }

    /// The requester's cid.
    pub fn cid(&self) -> &[u8] {
        self.part(0)
    }

    /// The requester's `ReqID` header: name as spelled, value.
    pub fn reqid(&self) -> (&[u8], &[u8]) {
        (self.part(1), self.part(2))
    }

    /// The target.
    pub fn target(&self) -> &[u8] {
        self.part(3)
    }
}

/// Where a forwarded request goes: a node and a responder of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub node: Rc<str>,
    /// The responder's cid, or `*` (the node picks).
    pub responder: Rc<str>,
    /// Its requests in flight as estimated here (`u32::MAX`: unknown).
    pub load: u32,
}

/// What a control message asks of the broker.
#[derive(Debug, PartialEq, Eq)]
pub enum CtlEvent {
    /// Nothing.
    None,
    /// Send the full state (enablements and loads) to this node.
    SendState(Box<str>),
    /// This node left (its forwarded requests fail at once).
    Gone(Box<str>),
    /// Another process uses this node's id: pick a new one.
    Collision,
}

/// A set of subjects in the order they came, each at most once, with a time each
/// (pending SUBs: now; delayed UNSUBs: when due). O(log n) to add, cancel or pop.
#[derive(Debug, Default)]
struct KeyedQueue {
    by_key: HashMap<Rc<[u8]>, u64>,
    order: BTreeMap<u64, (Rc<[u8]>, Instant)>,
    next: u64,
}

impl KeyedQueue {
    fn insert(&mut self, key: &[u8], at: Instant) -> bool {
        if self.by_key.contains_key(key) {
            return false;
        }
        let k: Rc<[u8]> = key.into();
        self.next += 1;
        self.by_key.insert(k.clone(), self.next);
        self.order.insert(self.next, (k, at));
        true
    }

    fn remove(&mut self, key: &[u8]) -> bool {
        match self.by_key.remove(key) {
            Some(seq) => {
                self.order.remove(&seq);
                true
            }
            None => false,
        }
    }

    /// The oldest entry, if its time has come.
    fn pop_due(&mut self, now: Instant) -> Option<Rc<[u8]>> {
        let (&seq, (_, at)) = self.order.first_key_value()?;
        if *at > now {
            return None;
        }
        let (k, _) = self.order.remove(&seq)?;
        self.by_key.remove(&k);
        Some(k)
    }

    fn len(&self) -> usize {
        self.by_key.len()
    }

    fn clear(&mut self) {
        self.by_key.clear();
        self.order.clear();
    }
}

/// The node's view of the cluster. See the module documentation.
#[derive(Debug)]
pub struct Cluster {
    /// This node's id (the cid prefix).
    pub node: Box<str>,
    settings: ClusterSettings,
    /// This process's nonce (tells two processes with one id apart).
    nonce: u64,
    /// NATS protocol bytes waiting to be written.
    pub lanes: Lanes,
    /// The backplane connection is up (CONNECT answered).
    pub connected: bool,
    /// Leaving (shutdown): the departure is announced, nothing more on `P.ctl`.
    leaving: bool,
    /// Another node has been heard since start (before that, nothing is counted as
    /// dropped while disconnected: there is nobody to drop it for).
    heard_any: bool,
    /// The server's `max_payload`.
    pub max_payload: usize,
    /// The nats-server address in use or last tried (set by the link).
    pub peer: String,
    next_sid: u64,
    pub(crate) sids: HashMap<u64, Sid>,
    /// Subjects subscribed on the backplane (SUB written) and their sids.
    pub_sids: HashMap<Box<[u8]>, u64>,
    /// Subjects to subscribe (not written yet) and to unsubscribe (when due).
    sub_queue: KeyedQueue,
    unsub_later: KeyedQueue,
    mon_sids: Option<(u64, u64)>,
    nodes: HashMap<Box<str>, Node>,
    /// Other nodes holding each enablement: (target, kind) -> count of nodes.
    /// By target, one count per kind (`kind_slot`): looked up by `&[u8]`, no key built.
    remote_enabled: HashMap<Box<[u8]>, [u32; 3]>,
    /// Responders of other nodes by target.
    remote_resps: HashMap<Box<[u8]>, Vec<RemoteResp>>,
    /// Entries in `remote_resps`, kept as they change (for `/metrics`).
    remote_resp_count: usize,
    /// Round-robin cursor among equally loaded remote responders.
    rr: usize,
    /// Version of this node's enablement state (one up per change).
    pub version: u64,
    /// Sequence of this node's load announcements, and when the last went out.
    load_seq: u64,
    last_load: Option<Instant>,
    out_reqs: HashMap<u64, OutReq>,
    out_order: VecDeque<(Instant, u64)>,
    out_by_conn: HashMap<ConnId, HashSet<u64>>,
    next_out: u64,
    /// Requests taken from other nodes: local rid -> the requester's node and its id
    /// there.
    in_reqs: HashMap<u64, (Rc<str>, u64)>,
    /// The highest forwarded-request id taken from each other node.
    taken_from: HashMap<Rc<str>, u64>,
    last_heartbeat: Option<Instant>,
    /// Counters.
    pub stats: ClusterStats,
    /// Scratch for subjects.
    subj: Vec<u8>,
    /// The batch that is the last data operation (while the lanes keep it open): its
    /// kind, key (topic, or node) and payload size so far.
    open_kind: Option<Batch>,
    open_key: Vec<u8>,
    open_len: usize,
    /// Scratch for the head of a batch item.
    head: Vec<u8>,
    /// `P.pub.` and `P.inbox.<N>.`, for reading subjects of incoming messages.
    pub_prefix: Box<[u8]>,
    inbox_prefix: Box<[u8]>,
    /// Event topics (§9.4) some other node has subscribers for (bits as
    /// `rooms::event_bit`): this node publishes those events.
    pub remote_events: u8,
    /// Version 1.1 state shared with other nodes (grants, presence queries).
    pub(crate) rooms: super::rooms::RoomsState,
    /// History kept in JetStream (§9.5), when `[[history]]` tables are configured.
    pub js: Option<Box<super::history::Js>>,
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

/// A random nonce for this process.
fn new_nonce() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        return t;
    }
    u64::from_le_bytes(b)
}

/// A cid or node id: 1 to 64 of `[0-9a-z]`.
fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
}

/// What kind of control message, for the bound.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ctl {
    /// Heartbeats: kept in the room beyond the bound.
    Heartbeat,
    /// The departure: the last thing said.
    Departure,
    /// Anything else (joins, announcements, state, request failures, uids).
    Other,
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
            nonce: new_nonce(),
            lanes: Lanes::default(),
            connected: false,
            leaving: false,
            heard_any: false,
            max_payload: 1 << 20,
            peer: String::new(),
            next_sid: 1,
            sids: HashMap::default(),
            pub_sids: HashMap::default(),
            sub_queue: KeyedQueue::default(),
            unsub_later: KeyedQueue::default(),
            mon_sids: None,
            nodes: HashMap::default(),
            remote_enabled: HashMap::default(),
            remote_resps: HashMap::default(),
            remote_resp_count: 0,
            rr: 0,
            version: 0,
            load_seq: 0,
            last_load: None,
            out_reqs: HashMap::default(),
            out_order: VecDeque::new(),
            out_by_conn: HashMap::default(),
            next_out: 1,
            in_reqs: HashMap::default(),
            taken_from: HashMap::default(),
            last_heartbeat: None,
            stats: ClusterStats::default(),
            subj: Vec::new(),
            open_kind: None,
            open_key: Vec::new(),
            open_len: 0,
            head: Vec::new(),
            pub_prefix,
            inbox_prefix,
            remote_events: 0,
            rooms: Default::default(),
            js: None,
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    /// Bytes waiting for nats-server.
    pub fn pending_bytes(&self) -> usize {
        self.lanes.pending()
    }

    /// Subjects whose subscription on the backplane waits to be written or released.
    pub fn interest_pending(&self) -> usize {
        self.sub_queue.len() + self.unsub_later.len()
    }

    /// Responders on other nodes as announced (one per target and responder).
    pub fn remote_responders(&self) -> usize {
        self.remote_resp_count
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

    /// The node of a cid of another node (cids start with their node's id), if it is
    /// one this node hears.
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
        self.event_interest(&key.0);
    }

    /// An `ESUB` of an event topic from another node means it has subscribers of that
    /// event (no service may send one): keep `remote_events` in step.
    fn event_interest(&mut self, target: &[u8]) {
        let bit = crate::core::rooms::event_bit(target);
        if bit != 0 {
            if self.remote_enabled(target, Enable::Sub) {
                self.remote_events |= bit;
            } else {
                self.remote_events &= !bit;
            }
        }
    }

    /// Does any other node have monitors?
    pub fn remote_monitors(&self) -> bool {
        self.nodes.values().any(|n| n.monitors)
    }

    pub(crate) fn sid_for(&mut self, sid: Sid) -> u64 {
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

    /// Write the SUB of `sid` on the control lane (only while connected: everything is
    /// subscribed again on connect).
    pub(crate) fn write_sub(&mut self, sid: u64) {
        if !self.connected {
            return;
        }
        let Some(kind) = self.sids.get(&sid).cloned() else {
            return;
        };
        let node = self.node.clone();
        let node = node.as_bytes();
        let subj = match &kind {
            Sid::Pub(t) => self.subject(&[b"pub"], Some(t)),
            Sid::Inbox => self.subject(&[b"inbox", node, b">"], None),
            Sid::Node => self.subject(&[b"node", node], None),
            Sid::Ctl => self.subject(&[b"ctl"], None),
            Sid::MonPub => self.subject(&[b"pub", b">"], None),
            Sid::Mon => self.subject(&[b"mon"], None),
            Sid::JsApi | Sid::JsLive(_) | Sid::JsRec(_) => match self.js_sub_subject(&kind) {
                Some(s) => s,
                None => return,
            },
        };
        self.lanes.push_ctl(|b| {
            let _ = proto::sub(b, &subj, None, sid);
        });
        self.done_subject(subj);
    }

    pub(crate) fn write_unsub(&mut self, sid: u64) {
        if self.connected {
            self.lanes.push_ctl(|b| proto::unsub(b, sid, None));
        }
    }

    /// Publish a control message (`head` then `payload`) on `subject`, ahead of the
    /// data. Not sent while disconnected (the state is sent again on connect) nor, but
    /// the departure, once leaving; dropped and counted beyond the control bound, except
    /// heartbeats.
    fn publish_ctl(&mut self, subject: &[u8], head: &[u8], payload: &[u8], kind: Ctl) -> bool {
        if !self.connected || (self.leaving && kind != Ctl::Departure) {
            return false;
        }
        let len = head.len() + payload.len();
        if len > self.max_payload {
            self.stats.dropped[TOO_LARGE] += 1;
            return false;
        }
        let room = match kind {
            Ctl::Heartbeat | Ctl::Departure => self.settings.ctl_bound() + HEARTBEAT_ROOM,
            Ctl::Other => self.settings.ctl_bound(),
        };
        if self.lanes.ctl_len() + len + subject.len() + 32 > room {
            self.stats.dropped[CONTROL_FULL] += 1;
            return false;
        }
        let ok = self
            .lanes
            .push_ctl(|b| proto::pub_parts(b, subject, None, head, payload).is_ok());
        if ok {
            self.stats.messages_out += 1;
        }
        ok
    }

    /// Publish data (`head` then `payload`) on `subject` with an optional reply subject.
    /// Dropped and counted when disconnected, too large or over the data bound.
    pub(crate) fn publish_data(
        &mut self,
        subject: &[u8],
        reply: Option<&[u8]>,
        head: &[u8],
        payload: &[u8],
    ) -> bool {
        let extra = subject.len() + reply.map_or(0, <[u8]>::len) + 32;
        if !self.data_room(head.len() + payload.len(), extra) {
            return false;
        }
        let ok = self
            .lanes
            .push_data(|b| proto::pub_parts(b, subject, reply, head, payload).is_ok());
        if ok {
            self.stats.messages_out += 1;
        }
        ok
    }

    /// May a data operation of `len` payload bytes (and `extra` around them) go on the
    /// data lane? When not, why is counted (disconnected only once another node was
    /// heard; over `max_payload`; over the data bound).
    fn data_room(&mut self, len: usize, extra: usize) -> bool {
        if !self.connected {
            if self.heard_any {
                self.stats.dropped[DISCONNECTED] += 1;
            }
            return false;
        }
        if len > self.max_payload {
            self.stats.dropped[TOO_LARGE] += 1;
            return false;
        }
        if self.lanes.pending() + len + extra > self.settings.data_bound() {
            self.stats.dropped[BUFFER_FULL] += 1;
            return false;
        }
        true
    }

    pub(crate) fn subject(&mut self, parts: &[&[u8]], token: Option<&[u8]>) -> Vec<u8> {
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

    pub(crate) fn done_subject(&mut self, s: Vec<u8>) {
        self.subj = s;
    }

    fn ctl(&mut self, head: &[u8], payload: &[u8], kind: Ctl) -> bool {
        let s = self.subject(&[b"ctl"], None);
        let ok = self.publish_ctl(&s, head, payload, kind);
        self.done_subject(s);
        ok
    }

    pub(crate) fn node_ctl(&mut self, node: &[u8], head: &[u8], payload: &[u8]) -> bool {
        let s = self.subject(&[b"node", node], None);
        let ok = self.publish_ctl(&s, head, payload, Ctl::Other);
        self.done_subject(s);
        ok
    }

    /// Publish a relayed PUB of `target` to the other nodes. PUBs of one topic that
    /// follow each other within a pass go out as one NATS message, a batch
    /// ([`proto::pub_batch_open`]): nats-server's cost is per message, and at 64 bytes it
    /// was half of what a message to a subscriber on another node cost.
    pub fn publish_pub(&mut self, target: &[u8], payload: &[u8]) {
        self.batch(Batch::Pub, target, None, b"", payload);
    }

    /// Add the item `head` + `payload` to the open batch of `kind` for `key` (see
    /// [`Batch`]), or open one. `req_id`: the item's request id, for requests (the reply
    /// subject names the batch's first and last). False if it was dropped (counted).
    fn batch(
        &mut self,
        kind: Batch,
        key: &[u8],
        req_id: Option<u64>,
        head: &[u8],
        payload: &[u8],
    ) -> bool {
        let len = head.len() + payload.len();
        let cost = proto::batch_item_cost(len, false);
        if self.connected
            && self.open_kind == Some(kind)
            && self.open_key == key
            && self.open_len + cost <= self.max_payload.min(proto::MAX_BATCH)
            && self.lanes.pending() + cost <= self.settings.data_bound()
            && self.lanes.extend_open(|b, at| {
                proto::pub_batch_extend(b, at, &[head, payload]);
                if let Some(id) = req_id {
                    // The reply's last id, right before the size.
                    proto::write_padded(&mut b[at - 1 - ID_DIGITS..at - 1], id);
                }
            })
        {
            self.open_len += cost;
            self.stats.messages_out += 1;
            return true;
        }
        self.open_kind = None;
        let s = match kind {
            Batch::Pub => self.subject(&[b"pub"], Some(key)),
            Batch::Req => self.subject(&[b"node", key], None),
            Batch::Ans => self.subject(&[b"inbox", key, b"a"], None),
        };
        // Requests: `P.inbox.<N>.q.<node>.<first>.<last>` (the last zero-padded, written
        // again as the batch grows), where nats-server's no-responders status comes.
        let mut reply = Vec::new();
        if let Some(id) = req_id {
            reply.extend_from_slice(&self.inbox_prefix);
            reply.extend_from_slice(b"q.");
            reply.extend_from_slice(key);
            reply.push(b'.');
            reply.extend_from_slice(crate::protocol::encode::fmt_u64(id, &mut [0; 20]));
            reply.push(b'.');
            let at = reply.len();
            reply.resize(at + ID_DIGITS, b'0');
            proto::write_padded(&mut reply[at..], id);
        }
        let reply = req_id.map(|_| &reply[..]);
        let first = proto::batch_item_cost(len, true);
        let ok = if first > self.max_payload {
            // Fits only alone (just under the limit) or not at all: as any data.
            self.publish_data(&s, reply, head, payload)
        } else if self.data_room(first, s.len() + reply.map_or(0, <[u8]>::len) + 32)
            && self
                .lanes
                .push_data_open(|b| proto::pub_batch_open(b, &s, reply, &[head, payload]).ok())
        {
            self.stats.messages_out += 1;
            self.open_kind = Some(kind);
            self.open_key.clear();
            self.open_key.extend_from_slice(key);
            self.open_len = first;
            true
        } else {
            false
        };
        self.done_subject(s);
        ok
    }

    /// Send a private message to the node owning `cid`.
    pub fn publish_private(&mut self, node: &[u8], cid: &[u8], payload: &[u8]) {
        let head = [b"M ", cid, b"\n"].concat();
        let s = self.subject(&[b"node", node], None);
        self.publish_data(&s, None, &head, payload);
        self.done_subject(s);
    }

    /// Tell the node owning `cid` its new uid.
    pub fn publish_uid(&mut self, node: &[u8], cid: &[u8], uid: &[u8]) {
        let head = [b"U ", cid, b"\n"].concat();
        self.node_ctl(node, &head, uid);
    }

    /// A copy of a REQ or RES for the monitors of other nodes (only if there are any).
    pub fn publish_monitor_copy(&mut self, payload: &[u8]) {
        if self.remote_monitors() {
            let s = self.subject(&[b"mon"], None);
            self.publish_data(&s, None, b"", payload);
            self.done_subject(s);
        }
    }

    /// Answer request `id` taken from `node`: the RES as data, batched with the other
    /// answers to that node that follow it (`P.inbox.<node>.a`, items `<id>` LF RES).
    pub fn answer(&mut self, node: &str, id: u64, payload: &[u8]) {
        let mut digits = [0u8; 20];
        let mut head = std::mem::take(&mut self.head);
        head.clear();
        head.extend_from_slice(crate::protocol::encode::fmt_u64(id, &mut digits));
        head.push(b'\n');
        self.batch(Batch::Ans, node.as_bytes(), None, &head, payload);
        self.head = head;
    }

    /// Fail request `id` taken from `node`, on `P.inbox.<node>.<id>` (control).
    pub fn answer_failed(&mut self, node: &str, id: u64, why: &str) {
        let mut digits = [0u8; 20];
        let id = crate::protocol::encode::fmt_u64(id, &mut digits);
        let s = self.subject(&[b"inbox", node.as_bytes(), id], None);
        self.publish_ctl(&s, b"X ", why.as_bytes(), Ctl::Other);
        self.done_subject(s);
    }

    // ------------------------------------------------------------------ interest

    /// A local subscriber of `target` appeared (`on`) or the last one left. Coalesced
    /// per subject: a SUB not yet written is cancelled by the UNS, a delayed UNSUB by the
    /// SUB; at most one change per subject waits.
    pub fn interest(&mut self, target: &[u8], on: bool, now: Instant) {
        if on {
            if self.unsub_later.remove(target) || self.pub_sids.contains_key(target) {
                return;
            }
            self.sub_queue.insert(target, now);
        } else if !self.sub_queue.remove(target) && self.pub_sids.contains_key(target) {
            self.unsub_later
                .insert(target, now + self.settings.unsub_delay);
        }
    }

    /// Write the interest changes that are due, within the pass's budget and while the
    /// control lane has room; a subject due for release that `still_needed` claims is
    /// kept.
    pub fn write_interest(&mut self, now: Instant, still_needed: impl Fn(&[u8]) -> bool) {
        if !self.connected {
            return;
        }
        let room = INTEREST_ROOM.min(self.settings.ctl_bound());
        for _ in 0..INTEREST_PER_PASS {
            if self.lanes.ctl_len() + 64 + subject::MAX_TOKEN > room {
                return;
            }
            if let Some(t) = self.sub_queue.pop_due(now) {
                if self.pub_sids.contains_key(&t[..]) {
                    continue;
                }
                let sid = self.sid_for(Sid::Pub(t.clone()));
                self.pub_sids.insert(t[..].into(), sid);
                self.write_sub(sid);
            } else if let Some(t) = self.unsub_later.pop_due(now) {
                if still_needed(&t) {
                    continue;
                }
                if let Some(sid) = self.pub_sids.remove(&t[..]) {
                    self.sids.remove(&sid);
                    self.write_unsub(sid);
                }
            } else {
                return;
            }
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

    /// A local enablement appeared or lapsed: announce it. Not sent (control lane full):
    /// the others see the version move in the next heartbeat and ask for the state.
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
        self.ctl(&head, b"", Ctl::Other);
    }

    /// Publish the full enablement state (`F`), to `to` or to everyone.
    pub fn send_state<'t>(
        &mut self,
        to: Option<&[u8]>,
        enabled: impl Iterator<Item = (&'t [u8], Enable)>,
    ) {
        let max = self.max_payload.min(self.settings.ctl_bound() / 2);
        let mut body = format!("F {} {}\n", self.node, self.version).into_bytes();
        for (t, kind) in enabled {
            let before = body.len();
            body.push(kind_code(kind));
            body.push(b' ');
            subject::encode(t, &mut body);
            body.push(b'\n');
            if body.len() > max {
                body.truncate(before);
                log::warn!(
                    "cluster: this node's enablements exceed what one state message may \
                     hold ({max} bytes); the rest are not announced"
                );
                break;
            }
        }
        match to {
            Some(node) => self.node_ctl(node, b"", &body),
            None => self.ctl(b"", &body, Ctl::Other),
        };
    }

    // ------------------------------------------------------------------ loads

    /// Is a load announcement due (rate limit)?
    pub fn load_due(&self, now: Instant) -> bool {
        self.connected
            && self
                .last_load
                .is_none_or(|t| now.saturating_duration_since(t) >= LOAD_EVERY)
    }

    /// When the next load announcement may go.
    pub fn next_load_at(&self) -> Option<Instant> {
        self.last_load.map(|t| t + LOAD_EVERY)
    }

    /// Announce the responders' in-flight counts: `lines` is one
    /// `(target, [(cid, in_flight)])` per request target whose counts changed (an empty
    /// list: no responder here any more); `full`: every target (the others forget what
    /// they held for targets not listed). Split over several messages if need be.
    pub fn send_loads<'a>(
        &mut self,
        now: Instant,
        full: bool,
        lines: impl Iterator<Item = (&'a [u8], Vec<(&'a str, u32)>)>,
    ) {
        self.last_load = Some(now);
        let max = self
            .max_payload
            .min(self.settings.ctl_bound() / 2)
            .max(1024);
        let mut body = Vec::new();
        let mut first = true;
        for (t, resps) in lines {
            let at = body.len();
            subject::encode(t, &mut body);
            for (cid, n) in resps {
                body.push(b' ');
                body.extend_from_slice(cid.as_bytes());
                body.push(b'=');
                body.extend_from_slice(n.to_string().as_bytes());
                if body.len() - at > max / 2 {
                    break; // a target with thousands of responders: the first ones
                }
            }
            body.push(b'\n');
            if body.len() > max / 2 {
                self.send_load_message(full && first, &body);
                first = false;
                body.clear();
            }
        }
        if !body.is_empty() || (full && first) {
            self.send_load_message(full && first, &body);
        }
    }

    fn send_load_message(&mut self, full: bool, lines: &[u8]) {
        self.load_seq += 1;
        let mut head = format!("L {} {} {} ", self.node, self.load_seq, u8::from(full));
        if self.taken_from.is_empty() {
            head.push('-');
        }
        for (i, (node, id)) in self.taken_from.iter().enumerate() {
            if i > 0 {
                head.push(',');
            }
            head.push_str(&format!("{node}={id}"));
        }
        head.push('\n');
        self.ctl(head.as_bytes(), lines, Ctl::Other);
    }

    fn on_loads(
        &mut self,
        node: &str,
        seq: u64,
        full: bool,
        seen: &str,
        lines: &[u8],
        now: Instant,
    ) {
        let me = self.node.clone();
        let seen_mine = seen
            .split(',')
            .filter_map(|p| p.split_once('='))
            .find(|(n, _)| *n == &*me)
            .and_then(|(_, id)| id.parse::<u64>().ok())
            .unwrap_or(0);
        let n = self.heard(node, now);
        let gap = !full && n.load_seq.map(|s| s + 1) != Some(seq);
        n.load_seq = Some(seq);
        n.seen_mine = n.seen_mine.max(seen_mine);
        let seen_mine = n.seen_mine;
        if full {
            let old = std::mem::take(&mut n.load_targets);
            for t in old {
                self.set_remote_resps(node, &t, Vec::new(), seen_mine);
            }
        }
        for l in lines.split(|&b| b == b'\n') {
            let mut w = l.split(|&b| b == b' ');
            let Some(target) = w.next().and_then(subject::decode) else {
                continue;
            };
            let mut resps = Vec::new();
            for r in w {
                let Some(eq) = memchr::memchr(b'=', r) else {
                    continue;
                };
                let (Ok(cid), Some(count)) = (
                    std::str::from_utf8(&r[..eq]),
                    std::str::from_utf8(&r[eq + 1..])
                        .ok()
                        .and_then(|c| c.parse::<u32>().ok()),
                ) else {
                    continue;
                };
                if is_id(cid) && resps.len() < 4096 {
                    resps.push((Box::<str>::from(cid), count));
                }
            }
            self.set_remote_resps(node, &target, resps, seen_mine);
        }
        if gap {
            self.request_state(node);
        }
    }

    /// Replace `node`'s responders of `target` (keeping, per cid, this node's forwards
    /// to it).
    fn set_remote_resps(
        &mut self,
        node: &str,
        target: &[u8],
        resps: Vec<(Box<str>, u32)>,
        seen_mine: u64,
    ) {
        let list = self.remote_resps.entry(target.into()).or_default();
        let before = list.len();
        let mut old: Vec<RemoteResp> = Vec::new();
        list.retain_mut(|r| {
            if &*r.node == node {
                old.push(RemoteResp {
                    node: std::mem::take(&mut r.node),
                    cid: std::mem::take(&mut r.cid),
                    announced: 0,
                    extra: 0,
                    ids: std::mem::take(&mut r.ids),
                });
                false
            } else {
                true
            }
        });
        let listed = !resps.is_empty();
        for (cid, announced) in resps {
            let ids = old
                .iter_mut()
                .find(|o| *o.cid == *cid)
                .map(|o| std::mem::take(&mut o.ids))
                .unwrap_or_default();
            let extra = (ids.len() - ids.partition_point(|&x| x <= seen_mine)) as u32;
            list.push(RemoteResp {
                node: node.into(),
                cid: cid.into(),
                announced,
                extra,
                ids,
            });
        }
        self.remote_resp_count = self.remote_resp_count - before + list.len();
        if list.is_empty() {
            self.remote_resps.remove(target);
        }
        if let Some(n) = self.nodes.get_mut(node) {
            if listed {
                n.load_targets.insert(target.into());
            } else {
                n.load_targets.remove(target);
            }
        }
    }

    /// The responder of another node with the fewest requests in flight for `target`
    /// (ties in turn), or, when no node announced its loads yet, a node that answers
    /// `target` (its own choice of responder).
    pub fn choose_remote(&mut self, target: &[u8]) -> Option<Choice> {
        if let Some(list) = self.remote_resps.get(target).filter(|l| !l.is_empty()) {
            let n = list.len();
            let start = self.rr % n;
            let mut best = start;
            for i in 1..n {
                let k = (start + i) % n;
                if list[k].estimate() < list[best].estimate() {
                    best = k;
                }
            }
            self.rr = self.rr.wrapping_add(1);
            let r = &list[best];
            return Some(Choice {
                node: r.node.clone(),
                responder: r.cid.clone(),
                load: r.estimate(),
            });
        }
        if !self.remote_enabled(target, Enable::Req) {
            return None;
        }
        let key = (Box::<[u8]>::from(target), b'r');
        let mut ids: Vec<&Box<str>> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.enabled.contains(&key))
            .map(|(id, _)| id)
            .collect();
        ids.sort();
        let node: Rc<str> = Rc::from(&***ids.get(self.rr % ids.len().max(1))?);
        self.rr = self.rr.wrapping_add(1);
        Some(Choice {
            node,
            responder: "*".into(),
            load: u32::MAX,
        })
    }

    fn remote_resp_mut(&mut self, target: &[u8], node: &str, cid: &str) -> Option<&mut RemoteResp> {
        self.remote_resps
            .get_mut(target)?
            .iter_mut()
            .find(|r| &*r.node == node && &*r.cid == cid)
    }

    // ------------------------------------------------------------------ connection

    /// The backplane connection is up (CONNECT answered): subscribe everything again and
    /// say hello. The lanes must hold only what the link wrote for this connection.
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
        let mut ids: Vec<u64> = self
            .sids
            .iter()
            .filter(|(_, s)| !matches!(s, Sid::Pub(_)))
            .map(|(&id, _)| id)
            .collect();
        ids.sort_unstable();
        for sid in ids {
            self.write_sub(sid);
        }
        let hello = format!("J {} {}", self.node, self.nonce);
        self.ctl(hello.as_bytes(), b"", Ctl::Other);
        self.last_heartbeat = Some(now);
        self.send_heartbeat(self.mon_sids.is_some());
    }

    /// The backplane connection is gone: what waits for it is dropped, and every
    /// subject is to be subscribed again (within the budget) once it is back.
    pub fn on_disconnected(&mut self, now: Instant) {
        self.connected = false;
        self.js_disconnected();
        self.lanes.clear();
        let subscribed: Vec<Box<[u8]>> = self.pub_sids.drain().map(|(t, _)| t).collect();
        self.sids.retain(|_, s| !matches!(s, Sid::Pub(_)));
        for t in subscribed {
            if !self.unsub_later.remove(&t) {
                self.sub_queue.insert(&t, now);
            }
        }
        self.unsub_later.clear();
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
        let hb = format!(
            "H {} {} {} {} {} {}",
            self.node,
            self.version,
            u8::from(local_monitors),
            self.load_seq,
            self.nonce,
            self.settings.node_name.as_deref().unwrap_or("-"),
        );
        self.ctl(hb.as_bytes(), b"", Ctl::Heartbeat);
    }

    /// Leaving (shutdown): tell the others, so they forget this node's enablements and
    /// fail what they forwarded here at once. Nothing more goes on `P.ctl` after it.
    pub fn leave(&mut self) {
        if self.leaving {
            return;
        }
        let bye = format!("D {} {}", self.node, self.nonce);
        self.ctl(bye.as_bytes(), b"", Ctl::Departure);
        self.leaving = true;
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
        self.rooms.node_gone(id);
        if let Some(n) = self.nodes.remove(id) {
            for key in n.enabled {
                self.lapse_remote(&key);
            }
            for t in n.load_targets {
                if let Some(list) = self.remote_resps.get_mut(&t) {
                    let before = list.len();
                    list.retain(|r| &*r.node != id);
                    self.remote_resp_count -= before - list.len();
                    if list.is_empty() {
                        self.remote_resps.remove(&t);
                    }
                }
            }
        }
        self.taken_from.remove(id);
    }

    fn lapse_remote(&mut self, key: &(Box<[u8]>, u8)) {
        if let Some(c) = self.remote_enabled.get_mut(&key.0) {
            let slot = &mut c[kind_slot(key.1)];
            *slot = slot.saturating_sub(1);
            if *c == [0; 3] {
                self.remote_enabled.remove(&key.0);
            }
        }
        self.event_interest(&key.0);
    }

    fn heard(&mut self, node: &str, now: Instant) -> &mut Node {
        self.heard_any = true;
        let n = self.nodes.entry(node.into()).or_insert_with(|| {
            log::info!("cluster: node {node} joined");
            Node {
                last_heard: now,
                name: None,
                nonce: None,
                version: None,
                load_seq: None,
                monitors: false,
                enabled: HashSet::default(),
                seen_mine: 0,
                load_targets: HashSet::default(),
            }
        });
        n.last_heard = now;
        n
    }

    /// `node` is heard with `nonce`: a different one than before is a new process under
    /// the same id (restarted), whose state starts afresh.
    fn heard_process(&mut self, node: &str, nonce: u64, now: Instant) {
        if self
            .nodes
            .get(node)
            .is_some_and(|n| n.nonce.is_some_and(|x| x != nonce))
        {
            log::info!("cluster: node {node} restarted");
            self.forget_node(node);
        }
        self.heard(node, now).nonce = Some(nonce);
    }

    fn request_state(&mut self, from: &str) {
        let req = format!("S {}", self.node);
        self.node_ctl(from.as_bytes(), req.as_bytes(), b"");
    }

    /// A `P.ctl` message.
    pub fn on_ctl(&mut self, payload: &[u8], now: Instant) -> CtlEvent {
        self.on_ctl_inner(payload, now).unwrap_or(CtlEvent::None)
    }

    fn on_ctl_inner(&mut self, payload: &[u8], now: Instant) -> Option<CtlEvent> {
        let (line, rest) = match memchr::memchr(b'\n', payload) {
            Some(i) => (&payload[..i], &payload[i + 1..]),
            None => (payload, &[][..]),
        };
        let line = std::str::from_utf8(line).ok()?;
        let mut w = line.split(' ');
        let tag = w.next()?;
        let node = w.next()?;
        if !is_id(node) {
            return None;
        }
        if node == &*self.node {
            // nats-server does not echo this connection's own messages: another process
            // has this id.
            let theirs: u64 = match tag {
                "J" | "D" => w.next()?.parse().ok()?,
                "H" => w.nth(3)?.parse().ok()?,
                _ => return None,
            };
            if theirs == self.nonce || self.leaving {
                return None;
            }
            log::warn!(
                "cluster: another process (nonce {theirs}) uses this node's id {}",
                self.node
            );
            return Some(if self.nonce > theirs {
                CtlEvent::Collision
            } else {
                CtlEvent::None // the other one renames itself
            });
        }
        match tag {
            "J" => {
                let nonce: u64 = w.next()?.parse().ok()?;
                self.heard_process(node, nonce, now);
                return Some(CtlEvent::SendState(node.into()));
            }
            "D" => {
                let nonce: u64 = w.next()?.parse().ok()?;
                if self
                    .nodes
                    .get(node)
                    .is_some_and(|n| n.nonce.is_none_or(|x| x == nonce))
                {
                    self.forget_node(node);
                    log::info!("cluster: node {node} left");
                    return Some(CtlEvent::Gone(node.into()));
                }
            }
            "H" => {
                let version: u64 = w.next()?.parse().ok()?;
                let monitors = w.next() == Some("1");
                let load_seq: u64 = w.next()?.parse().ok()?;
                let nonce: u64 = w.next()?.parse().ok()?;
                let name = w.next().filter(|n| *n != "-" && n.len() <= 64);
                self.heard_process(node, nonce, now);
                let n = self.heard(node, now);
                n.monitors = monitors;
                if n.name.as_deref() != name {
                    n.name = name.map(Into::into);
                }
                let stale = n.version != Some(version) || n.load_seq.unwrap_or(0) != load_seq;
                if stale {
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
                    let seen = n.seen_mine;
                    self.lapse_remote(&key);
                    if kind == b'r' {
                        self.set_remote_resps(node, &key.0, Vec::new(), seen);
                    }
                }
            }
            "F" => self.on_full_state(node, w.next()?.parse().ok()?, rest, now),
            "L" => {
                let seq: u64 = w.next()?.parse().ok()?;
                let full = w.next()? == "1";
                let seen = w.next()?;
                self.on_loads(node, seq, full, seen, rest, now);
            }
            _ => {}
        }
        None
    }

    fn on_full_state(&mut self, node: &str, version: u64, lines: &[u8], now: Instant) {
        let mut set = HashSet::default();
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

    /// This node takes a new id (another process has the old one): the old inbox is
    /// given up (the requests forwarded under it are returned, to be failed), the new
    /// node and inbox subjects are subscribed, the old node subject is kept (private
    /// messages to this node's existing connections still reach them), and the node
    /// joins again under the new id.
    pub fn rename(&mut self, new: &str, now: Instant) -> Vec<OutReq> {
        let old = std::mem::replace(&mut self.node, new.into());
        // A request batch still open names the old inbox in its reply: none is extended.
        self.open_kind = None;
        log::warn!("cluster: node id {old} taken by another process: this node is now {new}");
        self.inbox_prefix = format!("{}.inbox.{new}.", self.settings.name)
            .into_bytes()
            .into();
        let inbox: Vec<u64> = self
            .sids
            .iter()
            .filter(|(_, s)| **s == Sid::Inbox)
            .map(|(&id, _)| id)
            .collect();
        for sid in inbox {
            self.sids.remove(&sid);
            self.write_unsub(sid);
        }
        for s in [Sid::Node, Sid::Inbox] {
            let sid = self.sid_for(s);
            self.write_sub(sid);
        }
        let mut failed: Vec<OutReq> = self.out_reqs.drain().map(|(_, r)| r).collect();
        failed.sort_by_key(|r| r.deadline);
        self.out_order.clear();
        self.out_by_conn.clear();
        for list in self.remote_resps.values_mut() {
            for r in list {
                r.ids.clear();
                r.extra = 0;
            }
        }
        self.nonce = new_nonce();
        if self.connected {
            let hello = format!("J {} {}", self.node, self.nonce);
            self.ctl(hello.as_bytes(), b"", Ctl::Other);
            self.last_heartbeat = Some(now);
            self.send_heartbeat(self.mon_sids.is_some());
        }
        failed
    }

    // ------------------------------------------------------------------ requests

    /// Record a request about to be forwarded to `to`; returns its id,
    /// or `None` when the requester has too many in flight across the cluster already.
    pub fn start_out_request(&mut self, r: OutReq, max_per_conn: usize) -> Option<u64> {
        let mine = self.out_by_conn.entry(r.requester).or_default();
        if mine.len() >= max_per_conn {
            return None;
        }
        let id = self.next_out;
        self.next_out += 1;
        mine.insert(id);
        let seen = self.nodes.get(&*r.node).map_or(0, |n| n.seen_mine);
        if let Some(rr) = self.remote_resp_mut(r.target(), &r.node, &r.responder) {
            debug_assert!(rr.ids.back().is_none_or(|&last| last < id));
            rr.ids.push_back(id);
            if id > seen {
                rr.extra += 1;
            }
        }
        self.out_order.push_back((r.deadline, id));
        self.out_reqs.insert(id, r);
        Some(id)
    }

    /// Requests `conn` has in flight toward other nodes.
    pub fn out_requests_of(&self, conn: ConnId) -> usize {
        self.out_by_conn.get(&conn).map_or(0, HashSet::len)
    }

    /// Forward a request (after [`Cluster::start_out_request`]) to its node, batched
    /// with the requests to that node that follow it: `Q <node> <id> <cid> <token>
    /// <ReqID name> <ReqID value>` LF the REQ, per item. False if it could not be sent
    /// (then it is ended).
    pub fn send_request(&mut self, id: u64, payload: &[u8]) -> bool {
        let Some(r) = self.out_reqs.get(&id) else {
            return false;
        };
        let mut digits = [0u8; 20];
        let mut head = std::mem::take(&mut self.head);
        head.clear();
        head.extend_from_slice(b"Q ");
        head.extend_from_slice(self.node.as_bytes());
        head.push(b' ');
        head.extend_from_slice(crate::protocol::encode::fmt_u64(id, &mut digits));
        head.push(b' ');
        head.extend_from_slice(r.responder.as_bytes());
        head.push(b' ');
        subject::encode(r.target(), &mut head);
        // The ReqID too, so the node that takes it need not decode the REQ (a header
        // value holds no CR or LF).
        let (name, value) = r.reqid();
        head.push(b' ');
        head.extend_from_slice(name);
        head.push(b' ');
        head.extend_from_slice(value);
        head.push(b'\n');
        let node = Rc::clone(&r.node);
        let ok = self.batch(Batch::Req, node.as_bytes(), Some(id), &head, payload);
        self.head = head;
        if !ok {
            self.end_out_request(id);
        }
        ok
    }

    /// End a forwarded request (answered, failed, expired, requester gone).
    pub fn end_out_request(&mut self, id: u64) -> Option<OutReq> {
        let r = self.out_reqs.remove(&id)?;
        if let Some(set) = self.out_by_conn.get_mut(&r.requester) {
            set.remove(&id);
            if set.is_empty() {
                self.out_by_conn.remove(&r.requester);
            }
        }
        let seen = self.nodes.get(&*r.node).map_or(0, |n| n.seen_mine);
        if let Some(rr) = self.remote_resp_mut(r.target(), &r.node, &r.responder) {
            let found = rr.ids.binary_search(&id).ok();
            if found.and_then(|i| rr.ids.remove(i)).is_some() && id > seen {
                rr.extra = rr.extra.saturating_sub(1);
            }
        }
        Some(r)
    }

    /// A connection left: the requests it forwarded end here (a late answer is dropped),
    /// so nothing of it is counted against the next connection given its slot.
    pub fn conn_left(&mut self, conn: ConnId) {
        if let Some(ids) = self.out_by_conn.remove(&conn) {
            for id in ids {
                self.end_out_request(id);
            }
        }
    }

    /// The forwarded request `id`, if pending.
    pub fn out_request(&self, id: u64) -> Option<&OutReq> {
        self.out_reqs.get(&id)
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
        if self.out_reqs.is_empty() && self.out_order.capacity() > 1024 {
            self.out_order.shrink_to(64);
        }
        None
    }

    /// Forwarded requests addressed to `node` (gone): ended and returned.
    pub fn take_out_requests_of_node(&mut self, node: &str) -> Vec<OutReq> {
        let ids: Vec<u64> = self
            .out_reqs
            .iter()
            .filter(|(_, r)| &*r.node == node)
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

    /// A request forwarded by `from` (its id there `id`) was taken here under local
    /// `rid` (or not: `rid` is `None`); the next load announcement counts it as seen.
    pub fn took(&mut self, from: &str, id: u64, rid: Option<u64>) {
        let name = match self.taken_from.get_key_value(from) {
            Some((name, _)) => Some(Rc::clone(name)),
            None if self.nodes.contains_key(from) => {
                let name: Rc<str> = from.into();
                self.taken_from.insert(Rc::clone(&name), 0);
                Some(name)
            }
            None => None,
        };
        if let Some(seen) = self.taken_from.get_mut(from) {
            *seen = (*seen).max(id);
        }
        if let Some(rid) = rid {
            let name = name.unwrap_or_else(|| from.into());
            self.in_reqs.insert(rid, (name, id));
        }
    }

    /// The node and id of a request taken from another node (ending it here).
    pub fn end_in_request(&mut self, rid: u64) -> Option<(Rc<str>, u64)> {
        self.in_reqs.remove(&rid)
    }

    /// What a subject under this node's inbox (`P.inbox.<N>.`) is.
    pub fn inbox_of<'s>(&self, subject: &'s [u8]) -> Option<Inbox<'s>> {
        let rest = subject.strip_prefix(&*self.inbox_prefix)?;
        if rest == b"a" {
            return Some(Inbox::Answers);
        }
        let rest = std::str::from_utf8(rest).ok()?;
        if let Some(q) = rest.strip_prefix("q.") {
            let mut w = q.split('.');
            let (node, first, last) = (w.next()?, w.next()?, w.next()?);
            if w.next().is_some() {
                return None;
            }
            return Some(Inbox::Requests {
                node,
                first: first.parse().ok()?,
                last: last.parse().ok()?,
            });
        }
        rest.parse().ok().map(Inbox::One)
    }

    /// Requests forwarded to `node` with ids from `first` to `last` (a batch nobody
    /// received): ended and returned, oldest first. Bounded by what is in flight
    /// whatever the range says.
    pub fn take_out_requests_in(&mut self, node: &str, first: u64, last: u64) -> Vec<OutReq> {
        let mut ids: Vec<u64> = if last.saturating_sub(first) < self.out_reqs.len() as u64 {
            (first..=last).collect()
        } else {
            self.out_reqs
                .keys()
                .copied()
                .filter(|id| (first..=last).contains(id))
                .collect()
        };
        ids.retain(|id| self.out_reqs.get(id).is_some_and(|r| &*r.node == node));
        ids.sort_unstable();
        ids.into_iter()
            .filter_map(|id| self.end_out_request(id))
            .collect()
    }

    /// The topic of a subject `P.pub.<token>`.
    pub fn pub_topic<'s>(&self, subject: &'s [u8]) -> Option<std::borrow::Cow<'s, [u8]>> {
        subject::decode_cow(subject.strip_prefix(&*self.pub_prefix)?)
    }

    /// `items` messages came in one batch (one NATS message, counted once already).
    pub(crate) fn batch_in(&mut self, items: u64) {
        self.stats.messages_in += items.saturating_sub(1);
    }

    /// Everything waiting, in the order it would be written (tests and fuzzing, which
    /// have no socket).
    pub fn take_written(&mut self) -> Vec<u8> {
        let mut v = Vec::new();
        while !self.lanes.is_empty() {
            if self.lanes.write(&mut v).is_err() {
                break;
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connected(node: &str) -> Cluster {
        let mut c = Cluster::new(node, ClusterSettings::default());
        c.on_connected(Instant::now());
        c.take_written();
        c
    }

    /// A node whose backplane bound is `max_pending`, not yet connected.
    fn bounded(max_pending: usize) -> Cluster {
        Cluster::new(
            "aaaaaa",
            ClusterSettings {
                max_pending,
                ..Default::default()
            },
        )
    }

    fn text(c: &mut Cluster) -> String {
        String::from_utf8_lossy(&c.take_written()).into_owned()
    }

    fn out_req(requester: ConnId, target: &[u8], node: &str, responder: &str) -> OutReq {
        OutReq::new(
            requester,
            &format!("aaaaaa{requester}"),
            (b"ReqID", b"1"),
            target,
            Instant::now() + Duration::from_secs(30),
            node.into(),
            responder.into(),
        )
    }

    #[test]
    fn remote_enablements_follow_announcements_and_lapse_with_the_node() {
        let now = Instant::now();
        let mut b = connected("bbbbbb");
        assert_eq!(
            b.on_ctl(b"J aaaaaa 7", now),
            CtlEvent::SendState("aaaaaa".into())
        );
        b.on_ctl(b"F aaaaaa 3\np room\nr svc\n", now);
        assert!(b.remote_enabled(b"room", Enable::Pub));
        assert!(b.remote_enabled(b"svc", Enable::Req));
        assert!(!b.remote_enabled(b"room", Enable::Sub));
        // The next version applies; a gap asks for the full state instead.
        b.on_ctl(b"E aaaaaa 4 s 1 room", now);
        assert!(b.remote_enabled(b"room", Enable::Sub));
        b.take_written();
        b.on_ctl(b"E aaaaaa 9 p 0 room", now);
        assert!(b.remote_enabled(b"room", Enable::Pub));
        assert!(text(&mut b).contains("S bbbbbb"));
        let gone = b.expire_nodes(now + Duration::from_secs(4));
        assert_eq!(gone, vec![Box::<str>::from("aaaaaa")]);
        assert!(!b.remote_enabled(b"room", Enable::Sub));
        assert!(!b.remote_enabled(b"svc", Enable::Req));
    }

    #[test]
    fn a_departure_forgets_the_node_at_once_and_only_for_its_process() {
        let now = Instant::now();
        let mut b = connected("bbbbbb");
        b.on_ctl(b"J aaaaaa 7", now);
        b.on_ctl(b"F aaaaaa 1\nr svc\n", now);
        // Another process's departure under the same id is not this one's.
        assert_eq!(b.on_ctl(b"D aaaaaa 8", now), CtlEvent::None);
        assert!(b.remote_enabled(b"svc", Enable::Req));
        assert_eq!(
            b.on_ctl(b"D aaaaaa 7", now),
            CtlEvent::Gone("aaaaaa".into())
        );
        assert!(!b.remote_enabled(b"svc", Enable::Req));
        assert_eq!(b.node_count(), 0);
        // The leaving node says nothing more on the control subject.
        let mut a = connected("aaaaaa");
        a.leave();
        assert!(text(&mut a).contains("D aaaaaa"));
        a.heartbeat(now + Duration::from_secs(5), false);
        a.announce(b"x", Enable::Pub, true);
        assert_eq!(text(&mut a), "");
    }

    #[test]
    fn hearing_its_own_id_from_another_process_makes_one_of_the_two_rename() {
        let now = Instant::now();
        let mut a = connected("aaaaaa");
        let mine = a.nonce;
        let hb = |nonce: u64| format!("H aaaaaa 0 0 0 {nonce} -");
        assert_eq!(a.on_ctl(hb(mine).as_bytes(), now), CtlEvent::None);
        let lower = mine.wrapping_sub(1).min(mine);
        let higher = mine.checked_add(1).unwrap_or(mine);
        if lower != mine {
            assert_eq!(a.on_ctl(hb(lower).as_bytes(), now), CtlEvent::Collision);
        }
        if higher != mine {
            assert_eq!(a.on_ctl(hb(higher).as_bytes(), now), CtlEvent::None);
        }
        let id = a
            .start_out_request(out_req(1, b"t", "bbbbbb", "*"), 10)
            .unwrap();
        assert!(a.send_request(id, b"x"));
        let failed = a.rename("cccccc", now);
        assert_eq!(failed.len(), 1);
        assert_eq!(a.out_request_count(), 0);
        // The batch opened under the old id is not extended: the next request to the
        // same node goes in a batch whose reply is under the new inbox.
        let id = a
            .start_out_request(out_req(1, b"t", "bbbbbb", "*"), 10)
            .unwrap();
        assert!(a.send_request(id, b"y"));
        let w = text(&mut a);
        assert!(
            w.contains("SUB mm.node.cccccc") && w.contains("SUB mm.inbox.cccccc.>"),
            "{w}"
        );
        assert!(
            w.contains(&format!(
                "PUB mm.node.bbbbbb mm.inbox.cccccc.q.bbbbbb.{id}."
            )),
            "{w}"
        );
        assert!(w.contains("J cccccc"), "{w}");
        assert_eq!(a.inbox_of(b"mm.inbox.cccccc.5"), Some(Inbox::One(5)));
        assert_eq!(a.inbox_of(b"mm.inbox.cccccc.a"), Some(Inbox::Answers));
        assert_eq!(
            a.inbox_of(b"mm.inbox.cccccc.q.bbbbbb.3.00000000000000000009"),
            Some(Inbox::Requests {
                node: "bbbbbb",
                first: 3,
                last: 9
            })
        );
        assert_eq!(a.inbox_of(b"mm.inbox.cccccc.q.bbbbbb.3.9.1"), None);
        assert_eq!(a.inbox_of(b"mm.inbox.aaaaaa.5"), None);
    }

    /// The NATS PUBs in `wire`: (subject, payload).
    fn pubs(wire: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let mut rest = wire;
        while let Some(i) = rest.windows(4).position(|w| w == b"PUB ") {
            rest = &rest[i..];
            let eol = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let line = std::str::from_utf8(&rest[..eol]).unwrap().to_owned();
            let w: Vec<&str> = line.split(' ').collect();
            let len: usize = w[w.len() - 1].parse().unwrap();
            out.push((w[1].to_owned(), rest[eol + 2..eol + 2 + len].to_vec()));
            rest = &rest[eol + 2 + len + 2..];
        }
        out
    }

    #[test]
    fn consecutive_pubs_of_a_topic_cross_as_one_batch_within_max_payload() {
        let now = Instant::now();
        let mut c = bounded(1 << 20);
        c.on_connected(now);
        c.on_ctl(b"J bbbbbb 1", now);
        let _ = text(&mut c);
        let before = c.stats.messages_out;
        for i in 0..3 {
            c.publish_pub(b"t", format!("MSG t {i}").as_bytes());
        }
        c.publish_pub(b"u", b"MSG u");
        c.publish_pub(b"t", b"MSG t 3");
        let w = c.take_written();
        let got = pubs(&w);
        let items = |p: &[u8]| -> Vec<String> {
            proto::batch_items(p)
                .map(|m| String::from_utf8_lossy(m).into_owned())
                .collect()
        };
        assert_eq!(got.len(), 3, "{}", String::from_utf8_lossy(&w));
        assert_eq!(items(&got[0].1), ["MSG t 0", "MSG t 1", "MSG t 2"]);
        assert_eq!(items(&got[1].1), ["MSG u"]);
        assert_eq!(items(&got[2].1), ["MSG t 3"]);
        assert_eq!(got[0].0, got[2].0);
        assert_eq!(
            c.stats.messages_out - before,
            5,
            "middleman messages, not NATS ones"
        );
        // A write closes the batch: the next PUB starts another.
        c.publish_pub(b"t", b"MSG t 4");
        assert_eq!(pubs(&c.take_written()).len(), 1);
        // A batch never passes nats-server's max_payload; what is left starts another.
        c.max_payload = 300;
        for _ in 0..10 {
            c.publish_pub(b"t", &[b'x'; 100]);
        }
        let got = pubs(&c.take_written());
        assert!(got.iter().all(|(_, p)| p.len() <= 300));
        assert_eq!(got.iter().map(|(_, p)| items(p).len()).sum::<usize>(), 10);
        assert_eq!(
            got.len(),
            5,
            "two of 100 bytes fit in 300 with their lengths"
        );
        // Just under the limit, a message goes alone, unbatched; over it, it is refused.
        c.publish_pub(b"t", &[b'y'; 298]);
        c.publish_pub(b"t", &[b'z'; 301]);
        let got = pubs(&c.take_written());
        assert_eq!(got.len(), 1);
        assert_eq!(
            items(&got[0].1),
            [String::from_utf8(vec![b'y'; 298]).unwrap()]
        );
        assert_eq!(c.stats.dropped[TOO_LARGE], 1);
    }

    #[test]
    fn nothing_is_buffered_past_the_bound_or_counted_before_anyone_was_heard() {
        let mut c = bounded(4096);
        c.publish_pub(b"t", b"x");
        assert_eq!(c.stats.dropped, [0; 4], "nobody heard yet: nothing dropped");
        c.on_connected(Instant::now());
        c.on_ctl(b"J bbbbbb 1", Instant::now());
        for _ in 0..100 {
            c.publish_pub(b"t", &[b'y'; 100]);
        }
        assert!(c.pending_bytes() <= 4096);
        assert!(c.stats.dropped[BUFFER_FULL] > 0);
        c.max_payload = 10;
        c.publish_pub(b"t", &[b'y'; 11]);
        assert_eq!(c.stats.dropped[TOO_LARGE], 1);
        c.on_disconnected(Instant::now());
        c.publish_pub(b"t", b"x");
        assert_eq!(c.stats.dropped[DISCONNECTED], 1);
    }

    #[test]
    fn heartbeats_and_announcements_pass_a_full_data_lane() {
        let now = Instant::now();
        let mut c = bounded(1 << 20);
        c.on_connected(now);
        c.on_ctl(b"J bbbbbb 1", now);
        while c.stats.dropped[BUFFER_FULL] == 0 {
            c.publish_pub(b"t", &[b'y'; 1000]);
        }
        assert!(c.pending_bytes() <= c.settings.data_bound());
        for i in 0..10 {
            c.announce(format!("room{i}").as_bytes(), Enable::Sub, true);
            c.heartbeat(now + Duration::from_secs(i + 1), false);
        }
        assert_eq!(c.stats.dropped[CONTROL_FULL], 0);
        assert!(c.pending_bytes() <= c.settings.max_pending);
        // Written, the control messages come out within the first data chunk.
        let w = c.take_written();
        let first_h = w.windows(9).position(|x| x == b"H aaaaaa ").unwrap();
        assert!(
            first_h < 2 * crate::cluster::lanes::CHUNK,
            "heartbeat at byte {first_h}"
        );
    }

    #[test]
    fn control_is_bounded_too_but_heartbeats_always_fit() {
        let now = Instant::now();
        let mut c = bounded(64 << 10);
        c.on_connected(now);
        for i in 0..10_000 {
            c.announce(format!("room{i}").as_bytes(), Enable::Sub, true);
        }
        assert!(c.stats.dropped[CONTROL_FULL] > 0);
        assert!(c.lanes.ctl_len() <= c.settings.ctl_bound());
        c.heartbeat(now + Duration::from_secs(2), false);
        assert!(c.lanes.ctl_len() > c.settings.ctl_bound() - 100);
        assert!(c.pending_bytes() <= c.settings.max_pending);
        assert!(String::from_utf8_lossy(&c.take_written()).contains("H aaaaaa"));
    }

    #[test]
    fn interest_changes_are_coalesced_per_subject_and_written_within_a_budget() {
        let now = Instant::now();
        let mut c = connected("aaaaaa");
        // Subscribed and unsubscribed before the pass writes: nothing at all.
        for i in 0..100_000 {
            let t = format!("t{i}");
            c.interest(t.as_bytes(), true, now);
            c.interest(t.as_bytes(), false, now);
        }
        assert_eq!(c.interest_pending(), 0);
        c.write_interest(now, |_| false);
        assert_eq!(text(&mut c), "");
        // One topic churned: one SUB, then at most one delayed UNSUB waiting.
        c.interest(b"room", true, now);
        c.write_interest(now, |_| false);
        assert!(text(&mut c).starts_with("SUB mm.pub.room "));
        for _ in 0..100_000 {
            c.interest(b"room", false, now);
            c.interest(b"room", true, now);
            c.interest(b"room", false, now);
        }
        assert_eq!(c.interest_pending(), 1);
        c.write_interest(now, |_| false);
        assert_eq!(text(&mut c), "", "the UNSUB waits for its delay");
        c.interest(b"room", true, now);
        assert_eq!(
            c.interest_pending(),
            0,
            "re-subscribed: the UNSUB is cancelled"
        );
        c.interest(b"room", false, now);
        c.write_interest(now + Duration::from_secs(2), |_| true);
        assert_eq!(text(&mut c), "", "still needed: kept");
        c.interest(b"room", false, now);
        c.write_interest(now + Duration::from_secs(2), |_| false);
        assert!(text(&mut c).starts_with("UNSUB "));
        // Many distinct subjects: written a budget at a time, the lane bounded.
        for i in 0..5000 {
            c.interest(format!("s{i}").as_bytes(), true, now);
        }
        let mut passes = 0;
        while c.interest_pending() > 0 {
            c.write_interest(now, |_| false);
            assert!(c.lanes.ctl_len() <= INTEREST_ROOM);
            c.take_written();
            passes += 1;
            assert!(passes < 100);
        }
        assert!(passes >= 5000 / INTEREST_PER_PASS);
        // Disconnected: everything is subscribed again, a budget at a time.
        c.on_disconnected(now);
        assert_eq!(c.interest_pending(), 5000);
        c.on_connected(now);
        c.write_interest(now, |_| false);
        assert!(c.interest_pending() < 5000);
    }

    #[test]
    fn requests_go_to_the_least_loaded_remote_responder_counting_own_forwards() {
        let now = Instant::now();
        let mut a = connected("aaaaaa");
        a.on_ctl(b"J bbbbbb 1", now);
        a.on_ctl(b"F bbbbbb 1\nr work\n", now);
        // Before any load announcement: the node, its choice.
        let c = a.choose_remote(b"work").unwrap();
        assert_eq!((&*c.node, &*c.responder, c.load), ("bbbbbb", "*", u32::MAX));
        a.on_ctl(b"L bbbbbb 1 1 -\nwork bbbbbb1=0 bbbbbb2=0\n", now);
        assert_eq!(a.remote_responders(), 2);
        let mut to = Vec::new();
        text(&mut a);
        for i in 0..6 {
            let c = a.choose_remote(b"work").unwrap();
            to.push(c.responder.to_string());
            let id = a
                .start_out_request(out_req(i, b"work", &c.node, &c.responder), 10)
                .unwrap();
            assert!(a.send_request(id, b"x"));
        }
        // The six cross as one batch, its reply naming the node, first and last id.
        let w = a.take_written();
        let line_end = w.windows(2).position(|x| x == b"\r\n").unwrap();
        assert_eq!(
            std::str::from_utf8(&w[..line_end]).unwrap(),
            format!(
                "PUB mm.node.bbbbbb mm.inbox.aaaaaa.q.bbbbbb.1.00000000000000000006 {:08}",
                w.len() - line_end - 4
            )
        );
        let items: Vec<&[u8]> = proto::batch_items(&w[line_end + 2..w.len() - 2]).collect();
        assert_eq!(items.len(), 6);
        assert!(items[0].starts_with(b"Q aaaaaa 1 bbbbbb"), "{:?}", items[0]);
        assert!(
            items[5].starts_with(b"Q aaaaaa 6 bbbbbb") && items[5].ends_with(b" work ReqID 1\nx")
        );
        to.sort();
        assert_eq!(
            to,
            ["bbbbbb1", "bbbbbb1", "bbbbbb1", "bbbbbb2", "bbbbbb2", "bbbbbb2"]
        );
        // B announces counts that include the first four of ours (seen 4): 2 and 2, plus
        // our fifth and sixth not yet counted.
        a.on_ctl(b"L bbbbbb 2 0 aaaaaa=4\nwork bbbbbb1=2 bbbbbb2=2\n", now);
        let loads: Vec<u32> = a.remote_resps[&b"work"[..]]
            .iter()
            .map(RemoteResp::estimate)
            .collect();
        assert_eq!(loads.iter().sum::<u32>(), 6, "{loads:?}");
        // Answers end ours; the requester leaving ends the rest, for the next connection
        // on its slot too.
        a.end_out_request(6);
        assert_eq!(a.out_requests_of(5), 0);
        a.conn_left(4);
        assert_eq!(a.out_request_count(), 4);
        for conn in 0..4 {
            a.conn_left(conn);
        }
        assert_eq!(a.out_request_count(), 0);
        assert!(a.out_by_conn.is_empty());
        let total: u32 = a.remote_resps[&b"work"[..]].iter().map(|r| r.extra).sum();
        assert_eq!(total, 0);
        // Its responders gone with the enablement, the node with its departure.
        a.on_ctl(b"E bbbbbb 2 r 0 work", now);
        assert!(a.choose_remote(b"work").is_none());
        assert!(a.remote_resps.is_empty());
        assert_eq!(a.remote_responders(), 0);
    }

    #[test]
    fn a_load_gap_asks_for_the_state_and_a_heartbeat_tells_the_latest() {
        let now = Instant::now();
        let mut a = connected("aaaaaa");
        a.on_ctl(b"J bbbbbb 1", now);
        a.on_ctl(b"F bbbbbb 0\nr work\n", now);
        a.on_ctl(b"L bbbbbb 1 1 -\nwork bbbbbb1=3\n", now);
        a.take_written();
        a.on_ctl(b"H bbbbbb 0 0 1 1 node-b", now);
        assert_eq!(text(&mut a), "", "in step");
        assert_eq!(a.nodes(now)[0].name.as_deref(), Some("node-b"));
        a.on_ctl(b"H bbbbbb 0 0 2 1 node-b", now);
        assert!(
            text(&mut a).contains("S aaaaaa"),
            "an announcement was missed"
        );
        a.on_ctl(b"L bbbbbb 5 0 -\nwork\n", now);
        assert!(text(&mut a).contains("S aaaaaa"));
        assert!(
            a.choose_remote(b"work").is_some(),
            "still enabled: the node picks"
        );
        assert!(a.remote_resps.is_empty());
        // A restarted node (new nonce) starts afresh.
        a.on_ctl(b"F bbbbbb 1\nr work\n", now);
        a.on_ctl(b"H bbbbbb 1 0 0 2 -", now);
        assert!(!a.remote_enabled(b"work", Enable::Req));
    }

    #[test]
    fn cids_of_other_nodes_are_recognised() {
        let c = connected("aaaaaa");
        assert_eq!(c.node_of_cid(b"bbbbbb12"), Some(&b"bbbbbb"[..]));
        assert_eq!(c.node_of_cid(b"aaaaaa12"), None);
        assert_eq!(c.node_of_cid(b"bbb"), None);
    }
}
