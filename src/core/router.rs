//! Routing tables (pure, no I/O): topics and their subscribers indexed both ways,
//! enablements, responders and pending requests with deadlines.
//!
//! The router never sees a socket: it stores and returns [`ConnId`]s. Every operation
//! keeps the two subscription indexes (topic -> subscribers, connection -> topics) in
//! agreement, and likewise the pending-request indexes (request id -> request, and per
//! connection the requests it asked and the requests it answers), so removing a
//! connection costs only what it holds; [`Router::check_invariants`] verifies that (used
//! by tests and fuzzing).

use std::collections::BTreeMap;
use std::rc::Rc;

// foldhash instead of SipHash: topic look-up is on every PUB/REQ and SipHash was ~7% of
// server time in the 1-subscriber fan-out profile. Seeds are still random per map; only
// services can create topics (clients may only use topics a service enabled), so
// untrusted peers cannot fill these tables with chosen keys.
use foldhash::{HashMap, HashSet};
use std::time::Instant;

use slab::Slab;

/// A connection, as the reactor numbers it (its slab key).
pub type ConnId = usize;
/// A topic, as the router numbers it (its slab key).
pub type TopicId = usize;

/// Which client permission a service granted on a topic (§4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Enable {
    /// `EPUB`: clients may publish.
    Pub,
    /// `ESUB`: clients may subscribe.
    Sub,
    /// `EREQ`: the service answers requests and clients may request.
    Req,
}

/// A responder registered with `EREQ`, and how many of its requests are unanswered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Responder {
    /// The responding connection.
    pub conn: ConnId,
    /// Requests delivered to it and not yet ended.
    pub in_flight: u32,
    /// Withdrawn (`DREQ`) with requests still in flight: it gets no new ones and goes
    /// when the last one ends.
    pub retired: bool,
}

/// One topic (also a request target; the namespaces are shared).
#[derive(Debug, Default)]
pub struct Topic {
    /// The topic's name as sent.
    pub name: Box<[u8]>,
    /// Subscribers, in subscription order (a connection's index is kept in its entry).
    pub subs: Vec<ConnId>,
    /// Services that sent `EPUB`.
    pub epub: Vec<ConnId>,
    /// Services that sent `ESUB`.
    pub esub: Vec<ConnId>,
    /// Services that sent `EREQ`.
    pub responders: Vec<Responder>,
    /// Round-robin cursor over `responders`.
    rr: usize,
    /// Its responders or their counts changed since [`Router::take_load_changes`].
    load_dirty: bool,
    /// Per-connection grants (§9.1) on this topic: (connection, kind) pairs granted.
    grants: u32,
    /// A private channel (`MSG:`): no presence index.
    private: bool,
    /// Presence (§9.3), while it has subscribers; never for private channels. Boxed:
    /// the topic table stays compact for the walks over it (`/stats`).
    presence: Option<Box<PresenceIndex>>,
}

/// A topic's subscribers as presence needs them.
#[derive(Debug, Default)]
struct PresenceIndex {
    /// Subscribers in cid order (presence lines).
    by_cid: std::collections::BTreeSet<(u128, ConnId)>,
    /// Subscribers per non-empty uid (presence's `users`).
    users: HashMap<Rc<[u8]>, u32>,
}

impl PresenceIndex {
    fn add_user(&mut self, u: &Rc<[u8]>) {
        *self.users.entry(u.clone()).or_insert(0) += 1;
    }

    fn remove_user(&mut self, u: &Rc<[u8]>) {
        if let Some(n) = self.users.get_mut(u) {
            *n -= 1;
            if *n == 0 {
                self.users.remove(u);
            }
        }
    }
}

impl Topic {
    fn is_unused(&self) -> bool {
        self.subs.is_empty()
            && self.epub.is_empty()
            && self.esub.is_empty()
            && self.responders.is_empty()
            && self.grants == 0
    }

    /// Responders that take new requests (not withdrawn).
    pub fn active_responders(&self) -> impl Iterator<Item = &Responder> {
        self.responders.iter().filter(|r| !r.retired)
    }

    /// Does it have a responder that takes new requests?
    pub fn has_responder(&self) -> bool {
        self.responders.iter().any(|r| !r.retired)
    }
}

/// A request delivered to a responder and not yet ended (§6).
#[derive(Debug, Clone)]
pub struct Pending {
    /// Its request id.
    pub rid: u64,
    /// Who asked (`cluster::node::REMOTE`: another node).
    pub requester: ConnId,
    /// Who was asked.
    pub responder: ConnId,
    /// The request target.
    pub topic: TopicId,
    /// The requester's `ReqID` header: name as spelled, then value (`name_len` splits them).
    reqid: Box<[u8]>,
    name_len: usize,
    /// When it times out.
    pub deadline: Instant,
    /// Position of this request's id in the requester's `asked` list.
    asked_at: u32,
    /// Position of this request's id in the responder's `answering` list.
    answering_at: u32,
}

impl Pending {
    /// The requester's spelling of the `ReqID` header name.
    pub fn reqid_name(&self) -> &[u8] {
        &self.reqid[..self.name_len]
    }
    /// The requester's `ReqID` value.
    pub fn reqid_value(&self) -> &[u8] {
        &self.reqid[self.name_len..]
    }
}

/// Per-connection routing state.
#[derive(Debug, Default)]
struct Entry {
    /// Topic -> index of this connection in that topic's `subs`.
    subs: HashMap<TopicId, u32>,
    /// Enablements this connection made.
    enabled: Vec<(TopicId, Enable)>,
    /// Ids of the pending requests this connection asked, in no order; each request
    /// knows its position here (`Pending::asked_at`), so removal is a swap-remove.
    /// Empty (no heap) while the connection has nothing in flight.
    asked: Vec<u64>,
    /// Ids of the pending requests delivered to this connection (same scheme,
    /// `Pending::answering_at`).
    answering: Vec<u64>,
    /// Its cid as a number that sorts like the cid (see [`cid_key`]).
    key: u128,
    /// Its uid, when not empty.
    uid: Option<Rc<[u8]>>,
    /// Rights granted to it (§9.1): (topic, kind) -> the granting services.
    held: HashMap<(TopicId, Enable), Vec<ConnId>>,
}

/// Largest capacity a request index keeps once it is empty again: a connection that
/// once had many requests in flight gives the memory back when idle, while the
/// common one-at-a-time request/response does not allocate per request.
const KEEP_RIDS: usize = 16;

/// Which per-connection request list.
#[derive(Clone, Copy)]
enum Side {
    Asked,
    Answering,
}

/// What a connection holds, by name (see [`Router::held_by`]).
#[derive(Debug, Default)]
pub struct Held {
    /// Topics it subscribes.
    pub subs: Vec<Box<[u8]>>,
    /// Enablements it made.
    pub enabled: Vec<(Box<[u8]>, Enable)>,
}

/// Why a subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubError {
    /// The connection holds `max` subscriptions already.
    TooMany,
}

/// A grant was refused: the connection holds `max` grants already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyGrants;

/// A topic's presence (§9.3): counts, and the first subscribers in cid order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Presence {
    /// Connections subscribed.
    pub count: usize,
    /// Distinct non-empty uids among them.
    pub users: usize,
    /// The first `limit` subscribers by cid.
    pub first: Vec<ConnId>,
}

/// A number that orders like the cid `cid` (byte order) for cids of up to 24 characters
/// of `[0-9a-z]`: each character is a base-37 digit (1-36), padded with zeros.
pub fn cid_key(cid: &[u8]) -> u128 {
    let mut k: u128 = 0;
    for i in 0..24 {
        let d = match cid.get(i) {
            Some(c @ b'0'..=b'9') => (c - b'0') as u128 + 1,
            Some(c @ b'a'..=b'z') => (c - b'a') as u128 + 11,
            _ => 0,
        };
        k = k * 37 + d;
    }
    k
}

/// The routing tables.
#[derive(Debug, Default)]
pub struct Router {
    names: HashMap<Box<[u8]>, TopicId>,
    topics: Slab<Topic>,
    conns: Vec<Option<Entry>>,
    pending: BTreeMap<u64, Pending>,
    next_rid: u64,
    /// Sum of `topics[*].subs.len()`, kept as subscriptions come and go.
    total_subs: usize,
    /// Topics whose responders changed, when changes are tracked (a cluster node
    /// announces them); each at most once (`Topic::load_dirty`).
    load_changes: Option<Vec<TopicId>>,
    /// Grants by granting service (a local connection or a stand-in for a service on
    /// another node): (topic, kind, grantee).
    made: HashMap<ConnId, HashSet<(TopicId, Enable, ConnId)>>,
    /// Grants in force (one per granter and grant), kept as they come and go.
    total_grants: usize,
}

impl Router {
    /// An empty router.
    pub fn new() -> Self {
        Router {
            next_rid: 1,
            ..Default::default()
        }
    }

    /// Register a connection (its id must not be registered).
    pub fn add_conn(&mut self, conn: ConnId) {
        if self.conns.len() <= conn {
            self.conns.resize_with(conn + 1, || None);
        }
        self.conns[conn] = Some(Entry::default());
    }

    /// Is this connection registered?
    pub fn has_conn(&self, conn: ConnId) -> bool {
        matches!(self.conns.get(conn), Some(Some(_)))
    }

    fn entry(&mut self, conn: ConnId) -> Option<&mut Entry> {
        self.conns.get_mut(conn).and_then(Option::as_mut)
    }

    /// The topic named `name`, if it exists.
    pub fn lookup(&self, name: &[u8]) -> Option<TopicId> {
        self.names.get(name).copied()
    }

    /// A topic by id.
    pub fn topic(&self, id: TopicId) -> Option<&Topic> {
        self.topics.get(id)
    }

    /// Subscribers of the topic named `name` (empty if none).
    pub fn subscribers(&self, name: &[u8]) -> &[ConnId] {
        match self.names.get(name).and_then(|&id| self.topics.get(id)) {
            Some(t) => &t.subs,
            None => &[],
        }
    }

    /// Every topic in the table (in no particular order).
    pub fn topics(&self) -> impl Iterator<Item = &Topic> {
        self.topics.iter().map(|(_, t)| t)
    }

    /// Every topic with its id.
    pub fn topics_with_ids(&self) -> impl Iterator<Item = (TopicId, &Topic)> {
        self.topics.iter()
    }

    /// Number of topics in the table.
    pub fn topic_count(&self) -> usize {
        self.topics.len()
    }

    /// Number of subscriptions held by `conn`.
    pub fn subscription_count(&self, conn: ConnId) -> usize {
        match self.conns.get(conn) {
            Some(Some(e)) => e.subs.len(),
            _ => 0,
        }
    }

    /// Total subscriptions over all topics (a running total: O(1)).
    pub fn total_subscriptions(&self) -> usize {
        self.total_subs
    }

    /// Is `conn` subscribed to the topic named `name`?
    pub fn is_subscribed(&self, conn: ConnId, name: &[u8]) -> bool {
        match (self.lookup(name), self.conns.get(conn)) {
            (Some(t), Some(Some(e))) => e.subs.contains_key(&t),
            _ => false,
        }
    }

    /// Is `conn` subscribed to topic `id`?
    pub fn is_subscribed_id(&self, conn: ConnId, id: TopicId) -> bool {
        matches!(self.conns.get(conn), Some(Some(e)) if e.subs.contains_key(&id))
    }

    fn intern(&mut self, name: &[u8]) -> TopicId {
        if let Some(&id) = self.names.get(name) {
            return id;
        }
        let id = self.topics.insert(Topic {
            name: name.into(),
            private: name.starts_with(b"MSG:"),
            ..Default::default()
        });
        self.names.insert(name.into(), id);
        id
    }

    fn release_if_unused(&mut self, id: TopicId) {
        if self.topics.get(id).is_some_and(Topic::is_unused) {
            let t = self.topics.remove(id);
            self.names.remove(&t.name);
        }
    }

    /// Subscribe `conn` to `name`. `Ok(false)` if it already was (idempotent).
    /// `max` bounds the subscriptions one connection may hold.
    pub fn subscribe(&mut self, conn: ConnId, name: &[u8], max: usize) -> Result<bool, SubError> {
        let existing = self.lookup(name);
        let Some(entry) = self.entry(conn) else {
            return Ok(false);
        };
        if let Some(id) = existing {
            if entry.subs.contains_key(&id) {
                return Ok(false);
            }
        }
        if entry.subs.len() >= max {
            return Err(SubError::TooMany);
        }
        let (key, uid) = (entry.key, entry.uid.clone());
        let id = self.intern(name);
        let topic = &mut self.topics[id];
        let idx = topic.subs.len() as u32;
        topic.subs.push(conn);
        if !topic.private {
            let p = topic.presence.get_or_insert_with(Default::default);
            p.by_cid.insert((key, conn));
            if let Some(u) = uid {
                p.add_user(&u);
            }
        }
        self.total_subs += 1;
        if let Some(e) = self.entry(conn) {
            e.subs.insert(id, idx);
        }
        Ok(true)
    }

    /// Unsubscribe `conn` from `name`; false if it was not subscribed.
    pub fn unsubscribe(&mut self, conn: ConnId, name: &[u8]) -> bool {
        let Some(id) = self.lookup(name) else {
            return false;
        };
        let Some((idx, key, uid)) = self
            .entry(conn)
            .and_then(|e| Some((e.subs.remove(&id)?, e.key, e.uid.clone())))
        else {
            return false;
        };
        self.remove_sub_at(id, idx as usize, key, uid.as_ref());
        self.release_if_unused(id);
        true
    }

    /// Remove `topic.subs[idx]` (a connection with sort key `key` and uid `uid`) in O(1),
    /// fixing the index of the one moved into its place.
    fn remove_sub_at(&mut self, id: TopicId, idx: usize, key: u128, uid: Option<&Rc<[u8]>>) {
        let topic = &mut self.topics[id];
        if let Some(p) = topic.presence.as_mut() {
            p.by_cid.remove(&(key, topic.subs[idx]));
            if let Some(u) = uid {
                p.remove_user(u);
            }
            if p.by_cid.is_empty() {
                topic.presence = None;
            }
        }
        topic.subs.swap_remove(idx);
        self.total_subs -= 1;
        if let Some(&moved) = topic.subs.get(idx) {
            if let Some(e) = self.entry(moved) {
                e.subs.insert(id, idx as u32);
            }
        }
    }

    /// Track the topics whose responders or in-flight counts change (for a cluster node,
    /// which announces them).
    pub fn track_loads(&mut self) {
        self.load_changes.get_or_insert_with(Vec::new);
    }

    fn load_changed(&mut self, id: TopicId) {
        if let (Some(list), Some(t)) = (self.load_changes.as_mut(), self.topics.get_mut(id)) {
            if !t.load_dirty {
                t.load_dirty = true;
                list.push(id);
            }
        }
    }

    /// The topics whose responders changed since the last call (still existing), their
    /// flags cleared.
    pub fn take_load_changes(&mut self) -> Vec<TopicId> {
        let Some(list) = self.load_changes.as_mut() else {
            return Vec::new();
        };
        let mut ids = std::mem::take(list);
        ids.retain(|&id| {
            self.topics
                .get_mut(id)
                .is_some_and(|t| std::mem::take(&mut t.load_dirty))
        });
        ids
    }

    /// Are there load changes to announce?
    pub fn has_load_changes(&self) -> bool {
        self.load_changes.as_ref().is_some_and(|l| !l.is_empty())
    }

    /// Record an enablement made by `conn` (a service). Idempotent.
    pub fn enable(&mut self, conn: ConnId, name: &[u8], kind: Enable) {
        if !self.has_conn(conn) {
            return;
        }
        let id = self.intern(name);
        let t = &mut self.topics[id];
        let added = match kind {
            Enable::Pub => add_once(&mut t.epub, conn),
            Enable::Sub => add_once(&mut t.esub, conn),
            Enable::Req => {
                if let Some(r) = t.responders.iter_mut().find(|r| r.conn == conn) {
                    // A withdrawn responder whose requests are still in flight is
                    // back; it never left the connection's list.
                    let back = std::mem::take(&mut r.retired);
                    if back {
                        self.load_changed(id);
                    }
                    return;
                } else {
                    t.responders.push(Responder {
                        conn,
                        in_flight: 0,
                        retired: false,
                    });
                    true
                }
            }
        };
        if added && kind == Enable::Req {
            self.load_changed(id);
        }
        if added {
            if let Some(e) = self.entry(conn) {
                e.enabled.push((id, kind));
            }
        }
    }

    /// Is `kind` enabled on `name` by at least one connected service?
    pub fn is_enabled(&self, name: &[u8], kind: Enable) -> bool {
        let Some(t) = self.lookup(name).and_then(|id| self.topics.get(id)) else {
            return false;
        };
        match kind {
            Enable::Pub => !t.epub.is_empty(),
            Enable::Sub => !t.esub.is_empty(),
            Enable::Req => t.has_responder(),
        }
    }

    /// Pick a responder for `name` (fewest in flight, ties round-robin) and record the
    /// request as pending. Returns the responder and the new request id, or `None` if
    /// nobody answers `name`.
    pub fn start_request(
        &mut self,
        requester: ConnId,
        name: &[u8],
        reqid_name: &[u8],
        reqid_value: &[u8],
        deadline: Instant,
    ) -> Option<(ConnId, u64)> {
        self.start_request_to(requester, name, None, reqid_name, reqid_value, deadline)
    }

    /// The responder [`Router::start_request`] would pick for `name` now, and its count
    /// of requests in flight (nothing recorded).
    pub fn least_loaded(&self, name: &[u8]) -> Option<(ConnId, u32)> {
        let t = self.topics.get(self.lookup(name)?)?;
        let best = Self::pick(t)?;
        Some((t.responders[best].conn, t.responders[best].in_flight))
    }

    /// Fewest in flight, ties round-robin from the cursor.
    fn pick(t: &Topic) -> Option<usize> {
        let n = t.responders.len();
        let mut best: Option<usize> = None;
        for i in 0..n {
            let k = (t.rr + i) % n;
            let r = &t.responders[k];
            if !r.retired && best.is_none_or(|b| r.in_flight < t.responders[b].in_flight) {
                best = Some(k);
            }
        }
        best
    }

    /// [`Router::start_request`], given to `to` if it is one of `name`'s responders
    /// (another node chose it), else to the one picked as usual.
    pub fn start_request_to(
        &mut self,
        requester: ConnId,
        name: &[u8],
        to: Option<ConnId>,
        reqid_name: &[u8],
        reqid_value: &[u8],
        deadline: Instant,
    ) -> Option<(ConnId, u64)> {
        let id = self.lookup(name)?;
        let t = self.topics.get_mut(id)?;
        let chosen = to.and_then(|c| t.responders.iter().position(|r| r.conn == c && !r.retired));
        let best = match chosen {
            Some(k) => k,
            None => {
                let k = Self::pick(t)?;
                t.rr = k + 1;
                k
            }
        };
        t.responders[best].in_flight += 1;
        let responder = t.responders[best].conn;
        self.load_changed(id);
        let rid = self.next_rid;
        self.next_rid += 1;
        let mut reqid = Vec::with_capacity(reqid_name.len() + reqid_value.len());
        reqid.extend_from_slice(reqid_name);
        reqid.extend_from_slice(reqid_value);
        let asked_at = self.push_rid(requester, Side::Asked, rid);
        let answering_at = self.push_rid(responder, Side::Answering, rid);
        self.pending.insert(
            rid,
            Pending {
                rid,
                requester,
                responder,
                topic: id,
                reqid: reqid.into(),
                name_len: reqid_name.len(),
                deadline,
                asked_at,
                answering_at,
            },
        );
        Some((responder, rid))
    }

    /// Number of pending requests `conn` asked (what `max_pending_requests` bounds).
    pub fn asked_count(&self, conn: ConnId) -> usize {
        match self.conns.get(conn) {
            Some(Some(e)) => e.asked.len(),
            _ => 0,
        }
    }

    /// Number of pending requests delivered to `conn` and not yet ended.
    pub fn answering_count(&self, conn: ConnId) -> usize {
        match self.conns.get(conn) {
            Some(Some(e)) => e.answering.len(),
            _ => 0,
        }
    }

    /// Append `rid` to one of `conn`'s request lists; returns its position.
    fn push_rid(&mut self, conn: ConnId, side: Side, rid: u64) -> u32 {
        match self.entry(conn) {
            Some(e) => {
                let list = match side {
                    Side::Asked => &mut e.asked,
                    Side::Answering => &mut e.answering,
                };
                list.push(rid);
                (list.len() - 1) as u32
            }
            None => u32::MAX,
        }
    }

    /// Remove position `at` of one of `conn`'s request lists in O(1) (plus a look-up to
    /// fix the position of the id moved into its place). A connection already removed
    /// (its entry taken) has nothing to fix.
    fn remove_rid(&mut self, conn: ConnId, side: Side, at: u32) {
        let Some(e) = self.conns.get_mut(conn).and_then(Option::as_mut) else {
            return;
        };
        let list = match side {
            Side::Asked => &mut e.asked,
            Side::Answering => &mut e.answering,
        };
        let at = at as usize;
        if at >= list.len() {
            return;
        }
        list.swap_remove(at);
        let moved = list.get(at).copied();
        if list.is_empty() && list.capacity() > KEEP_RIDS {
            *list = Vec::new();
        }
        if let Some(p) = moved.and_then(|m| self.pending.get_mut(&m)) {
            match side {
                Side::Asked => p.asked_at = at as u32,
                Side::Answering => p.answering_at = at as u32,
            }
        }
    }

    /// The pending request `rid`, if any.
    pub fn pending(&self, rid: u64) -> Option<&Pending> {
        self.pending.get(&rid)
    }

    /// Number of pending requests.
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// End the pending request `rid` (answered, timed out, or a party left).
    pub fn end_request(&mut self, rid: u64) -> Option<Pending> {
        let p = self.pending.remove(&rid)?;
        let mut retire = None;
        if let Some(t) = self.topics.get_mut(p.topic) {
            if let Some(r) = t.responders.iter_mut().find(|r| r.conn == p.responder) {
                r.in_flight = r.in_flight.saturating_sub(1);
                if r.retired && r.in_flight == 0 {
                    retire = Some(p.responder);
                }
            }
        }
        self.load_changed(p.topic);
        if let Some(conn) = retire {
            // A withdrawn responder's last request ended: it goes now. (While the
            // connection itself is being removed, its entry is taken and its removal
            // releases the topic.)
            if let Some(t) = self.topics.get_mut(p.topic) {
                t.responders.retain(|r| r.conn != conn);
            }
            if let Some(e) = self.entry(conn) {
                e.enabled
                    .retain(|&(id, k)| !(id == p.topic && k == Enable::Req));
                self.release_if_unused(p.topic);
            }
        }
        self.remove_rid(p.requester, Side::Asked, p.asked_at);
        self.remove_rid(p.responder, Side::Answering, p.answering_at);
        Some(p)
    }

    /// End and return the first request whose deadline is at or before `now`. Request ids
    /// grow with time and every request gets the same timeout, so the oldest id is the
    /// earliest deadline.
    pub fn pop_expired(&mut self, now: Instant) -> Option<(u64, Pending)> {
        let (&rid, p) = self.pending.first_key_value()?;
        if p.deadline > now {
            return None;
        }
        self.end_request(rid).map(|p| (rid, p))
    }

    /// The earliest request deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.first_key_value().map(|(_, p)| p.deadline)
    }

    /// Withdraw `conn`'s own enablement of `name` (`DPUB`/`DSUB`/`DREQ` without
    /// `forcid`, §9.1). A responder with requests in flight is retired: no new requests,
    /// the ones in flight may still be answered. False if it had none.
    pub fn disable(&mut self, conn: ConnId, name: &[u8], kind: Enable) -> bool {
        let Some(id) = self.lookup(name) else {
            return false;
        };
        let Some(t) = self.topics.get_mut(id) else {
            return false;
        };
        let mut keep = false;
        let had = match kind {
            Enable::Pub => remove_one(&mut t.epub, conn),
            Enable::Sub => remove_one(&mut t.esub, conn),
            Enable::Req => match t.responders.iter().position(|r| r.conn == conn) {
                Some(i) if t.responders[i].retired => false,
                Some(i) if t.responders[i].in_flight > 0 => {
                    t.responders[i].retired = true;
                    keep = true;
                    true
                }
                Some(i) => {
                    t.responders.remove(i);
                    if t.rr > i {
                        t.rr -= 1;
                    }
                    true
                }
                None => false,
            },
        };
        if !had {
            return false;
        }
        if kind == Enable::Req {
            self.load_changed(id);
        }
        if !keep {
            if let Some(e) = self.entry(conn) {
                e.enabled.retain(|&(t, k)| !(t == id && k == kind));
            }
            self.release_if_unused(id);
        }
        true
    }

    /// Record `conn`'s cid (as [`cid_key`]) for presence's cid order. Before it
    /// subscribes to anything.
    pub fn set_conn_key(&mut self, conn: ConnId, key: u128) {
        if let Some(e) = self.entry(conn) {
            e.key = key;
        }
    }

    /// Set `conn`'s uid (empty: none), moving its weight in every topic's `users`.
    /// O(its subscriptions).
    pub fn set_uid(&mut self, conn: ConnId, uid: &[u8]) {
        let Some(e) = self.conns.get_mut(conn).and_then(Option::as_mut) else {
            return;
        };
        let new: Option<Rc<[u8]>> = (!uid.is_empty()).then(|| uid.into());
        if e.uid.as_deref() == new.as_deref() {
            return;
        }
        let old = std::mem::replace(&mut e.uid, new.clone());
        for &id in e.subs.keys() {
            let Some(p) = self.topics.get_mut(id).and_then(|t| t.presence.as_mut()) else {
                continue;
            };
            if let Some(u) = &old {
                p.remove_user(u);
            }
            if let Some(u) = &new {
                p.add_user(u);
            }
        }
    }

    /// The presence of `name` (§9.3): counts in O(1), the first `limit` subscribers in
    /// cid order in O(limit).
    pub fn presence(&self, name: &[u8], limit: usize) -> Presence {
        let Some(t) = self.lookup(name).and_then(|id| self.topics.get(id)) else {
            return Presence::default();
        };
        let Some(p) = t.presence.as_ref() else {
            return Presence::default();
        };
        Presence {
            count: t.subs.len(),
            users: p.users.len(),
            first: p.by_cid.iter().take(limit).map(|&(_, c)| c).collect(),
        }
    }

    /// The distinct non-empty uids among `name`'s subscribers (O(users): for merging
    /// presence answers of several nodes).
    pub fn presence_uids(&self, name: &[u8]) -> foldhash::HashSet<Box<[u8]>> {
        match self.lookup(name).and_then(|id| self.topics.get(id)) {
            Some(Topic {
                presence: Some(p), ..
            }) => p.users.keys().map(|u| Box::<[u8]>::from(&u[..])).collect(),
            _ => Default::default(),
        }
    }

    /// `granter` grants `grantee` the right `kind` on `name` (§9.1). `Ok(false)` if it
    /// had granted it already or the grantee is unknown; refused when the grantee holds
    /// `max` grants. `granter` need not be a registered connection (a service on another
    /// node stands in as an id of its own).
    pub fn grant(
        &mut self,
        granter: ConnId,
        grantee: ConnId,
        name: &[u8],
        kind: Enable,
        max: usize,
    ) -> Result<bool, TooManyGrants> {
        let existing = self.lookup(name);
        let Some(e) = self.entry(grantee) else {
            return Ok(false);
        };
        if let Some(list) = existing.and_then(|id| e.held.get(&(id, kind))) {
            if list.contains(&granter) {
                return Ok(false);
            }
        } else if e.held.len() >= max {
            return Err(TooManyGrants);
        }
        let id = self.intern(name);
        let Some(e) = self.entry(grantee) else {
            return Ok(false);
        };
        let list = e.held.entry((id, kind)).or_default();
        let new_key = list.is_empty();
        list.push(granter);
        self.total_grants += 1;
        if new_key {
            self.topics[id].grants += 1;
        }
        self.made
            .entry(granter)
            .or_default()
            .insert((id, kind, grantee));
        Ok(true)
    }

    /// `granter` withdraws its grant of `kind` on `name` to `grantee`. True if it had
    /// made it.
    pub fn revoke(&mut self, granter: ConnId, grantee: ConnId, name: &[u8], kind: Enable) -> bool {
        let Some(id) = self.lookup(name) else {
            return false;
        };
        let made = self
            .made
            .get_mut(&granter)
            .is_some_and(|m| m.remove(&(id, kind, grantee)));
        if !made {
            return false;
        }
        if self.made.get(&granter).is_some_and(HashSet::is_empty) {
            self.made.remove(&granter);
        }
        self.drop_held(grantee, id, kind, granter);
        self.release_if_unused(id);
        true
    }

    /// Remove `granter` from `grantee`'s holders of (id, kind).
    fn drop_held(&mut self, grantee: ConnId, id: TopicId, kind: Enable, granter: ConnId) {
        let Some(e) = self.conns.get_mut(grantee).and_then(Option::as_mut) else {
            return;
        };
        let Some(list) = e.held.get_mut(&(id, kind)) else {
            return;
        };
        if remove_one(list, granter) {
            self.total_grants -= 1;
        }
        if list.is_empty() {
            e.held.remove(&(id, kind));
            if let Some(t) = self.topics.get_mut(id) {
                t.grants -= 1;
            }
        }
    }

    /// Grants in force (a running total: O(1)).
    pub fn total_grants(&self) -> usize {
        self.total_grants
    }

    /// Has `conn` been granted `kind` on `name` by any service?
    pub fn has_grant(&self, conn: ConnId, name: &[u8], kind: Enable) -> bool {
        match (self.lookup(name), self.conns.get(conn)) {
            (Some(id), Some(Some(e))) => e.held.contains_key(&(id, kind)),
            _ => false,
        }
    }

    /// Number of grants `conn` holds ((topic, kind) pairs).
    pub fn grant_count(&self, conn: ConnId) -> usize {
        match self.conns.get(conn) {
            Some(Some(e)) => e.held.len(),
            _ => 0,
        }
    }

    /// Every grant `granter` made ends (it left, or its node is gone). O(its grants).
    /// Subscriptions made under them stay (§9.1).
    pub fn remove_granter(&mut self, granter: ConnId) {
        let Some(made) = self.made.remove(&granter) else {
            return;
        };
        for (id, kind, grantee) in made {
            self.drop_held(grantee, id, kind, granter);
            self.release_if_unused(id);
        }
    }

    /// The names of the topics `conn` subscribes and the enablements it made (the
    /// cluster compares them before and after the connection leaves).
    pub fn held_by(&self, conn: ConnId) -> Held {
        let mut held = Held::default();
        if let Some(Some(e)) = self.conns.get(conn) {
            let name = |id: &TopicId| self.topics.get(*id).map(|t| t.name.clone());
            held.subs = e.subs.keys().filter_map(name).collect();
            held.enabled = e
                .enabled
                .iter()
                .filter_map(|(id, k)| name(id).map(|n| (n, *k)))
                .collect();
        }
        held
    }

    /// Remove a connection and everything it holds. Requests it was answering are
    /// returned, oldest first, with their target's name, taken before the target may be
    /// released (they must be failed with `responder disconnected`); requests it asked are
    /// dropped (a late answer is then ignored). Costs O(k log n) for the k requests the
    /// connection is party to, whatever the size of the pending table.
    pub fn remove_conn(&mut self, conn: ConnId) -> Vec<(Pending, Box<[u8]>)> {
        let Some(mut entry) = self.conns.get_mut(conn).and_then(Option::take) else {
            return Vec::new();
        };
        let mut orphaned = Vec::new();
        // The entry is taken, so ending these requests leaves its lists alone; the
        // other party's lists are fixed as usual.
        for rid in std::mem::take(&mut entry.asked) {
            self.end_request(rid);
        }
        let mut answering = std::mem::take(&mut entry.answering);
        answering.sort_unstable();
        for rid in answering {
            // Absent if it was also one this connection asked (a service asking itself).
            if let Some(p) = self.end_request(rid) {
                let name = self.topics.get(p.topic).map(|t| t.name.clone());
                orphaned.push((p, name.unwrap_or_default()));
            }
        }
        for (&id, &idx) in &entry.subs {
            self.remove_sub_at(id, idx as usize, entry.key, entry.uid.as_ref());
        }
        // Grants it made, then grants it held (their granters forget them).
        self.remove_granter(conn);
        for (&(id, kind), granters) in &entry.held {
            self.total_grants -= granters.len();
            for g in granters {
                if let Some(m) = self.made.get_mut(g) {
                    m.remove(&(id, kind, conn));
                    if m.is_empty() {
                        self.made.remove(g);
                    }
                }
            }
            if let Some(t) = self.topics.get_mut(id) {
                t.grants -= 1;
            }
            self.release_if_unused(id);
        }
        for &(id, kind) in &entry.enabled {
            if let Some(t) = self.topics.get_mut(id) {
                match kind {
                    Enable::Pub => t.epub.retain(|&c| c != conn),
                    Enable::Sub => t.esub.retain(|&c| c != conn),
                    Enable::Req => t.responders.retain(|r| r.conn != conn),
                }
            }
            if kind == Enable::Req {
                self.load_changed(id);
            }
        }
        for &id in entry.subs.keys() {
            self.release_if_unused(id);
        }
        for &(id, _) in &entry.enabled {
            self.release_if_unused(id);
        }
        orphaned
    }

    /// Check that both subscription indexes agree, no topic is empty, and every pending
    /// request refers to registered connections and a registered responder.
    pub fn check_invariants(&self) -> Result<(), String> {
        for (id, t) in &self.topics {
            if t.is_unused() {
                return Err(format!("topic {id} is unused but kept"));
            }
            if self.names.get(&t.name) != Some(&id) {
                return Err(format!("topic {id} missing from the name index"));
            }
            for (i, &c) in t.subs.iter().enumerate() {
                match self.conns.get(c) {
                    Some(Some(e)) if e.subs.get(&id) == Some(&(i as u32)) => {}
                    _ => return Err(format!("topic {id} sub {c} at {i} not indexed by conn")),
                }
            }
        }
        if self.names.len() != self.topics.len() {
            return Err("name index size differs".into());
        }
        for (c, e) in self.conns.iter().enumerate() {
            let Some(e) = e else { continue };
            for (&id, &i) in &e.subs {
                if self.topics.get(id).and_then(|t| t.subs.get(i as usize)) != Some(&c) {
                    return Err(format!("conn {c} sub {id}@{i} not in topic"));
                }
            }
        }
        let mut grants: HashMap<TopicId, u32> = HashMap::default();
        let mut made = 0;
        for (c, e) in self.conns.iter().enumerate() {
            let Some(e) = e else { continue };
            for (&(id, kind), granters) in &e.held {
                *grants.entry(id).or_default() += 1;
                if granters.is_empty() {
                    return Err(format!("conn {c} holds an empty grant"));
                }
                for g in granters {
                    made += 1;
                    if !self.made.get(g).is_some_and(|m| m.contains(&(id, kind, c))) {
                        return Err(format!("conn {c} holds a grant {g} did not make"));
                    }
                }
            }
        }
        if made != self.made.values().map(HashSet::len).sum::<usize>() || made != self.total_grants
        {
            return Err("grants made and held differ".into());
        }
        for (id, t) in &self.topics {
            if grants.get(&id).copied().unwrap_or(0) != t.grants {
                return Err(format!("topic {id} grant count {} is wrong", t.grants));
            }
            if t.private || t.subs.is_empty() {
                if t.presence.is_some() {
                    return Err(format!("topic {id} keeps a presence index it needs not"));
                }
                continue;
            }
            let Some(p) = t.presence.as_ref() else {
                return Err(format!("topic {id} has no presence index"));
            };
            if p.by_cid.len() != t.subs.len() {
                return Err(format!("topic {id} cid index differs from its subscribers"));
            }
            let mut users: HashMap<&[u8], u32> = HashMap::default();
            for &c in &t.subs {
                if let Some(Some(e)) = self.conns.get(c) {
                    if !p.by_cid.contains(&(e.key, c)) {
                        return Err(format!("topic {id} sub {c} not in its cid index"));
                    }
                    if let Some(u) = &e.uid {
                        *users.entry(u).or_default() += 1;
                    }
                }
            }
            if users.len() != p.users.len() || users.iter().any(|(u, n)| p.users.get(*u) != Some(n))
            {
                return Err(format!("topic {id} users differ"));
            }
        }
        let subs: usize = self.topics.iter().map(|(_, t)| t.subs.len()).sum();
        if subs != self.total_subs {
            return Err(format!("total_subs {} but {subs} held", self.total_subs));
        }
        let at = |list: &[u64], i: u32| list.get(i as usize).copied();
        for (&rid, p) in &self.pending {
            let remote = p.requester == usize::MAX; // asked by another node
            let (Some(req), Some(Some(resp))) = (
                if remote {
                    Some(None)
                } else {
                    self.conns.get(p.requester).map(Option::as_ref)
                },
                self.conns.get(p.responder),
            ) else {
                return Err(format!("pending {rid} outlives a connection"));
            };
            if !remote && req.is_none() {
                return Err(format!("pending {rid} outlives its requester"));
            }
            let ok = self
                .topics
                .get(p.topic)
                .is_some_and(|t| t.responders.iter().any(|r| r.conn == p.responder));
            if !ok {
                return Err(format!("pending {rid} responder not registered"));
            }
            if req.is_some_and(|req| at(&req.asked, p.asked_at) != Some(rid)) {
                return Err(format!("pending {rid} not at its place in the asked index"));
            }
            if at(&resp.answering, p.answering_at) != Some(rid) {
                return Err(format!(
                    "pending {rid} not at its place in the answering index"
                ));
            }
        }
        // The other way: every indexed id is pending, with this connection in that role
        // (so with the check above, each list holds each of its requests exactly once).
        let (mut asked, mut answering) = (0, 0);
        for (c, e) in self.conns.iter().enumerate() {
            let Some(e) = e else { continue };
            for &rid in &e.asked {
                if self.pending.get(&rid).map(|p| p.requester) != Some(c) {
                    return Err(format!("conn {c} asked {rid}, which it did not"));
                }
            }
            for &rid in &e.answering {
                if self.pending.get(&rid).map(|p| p.responder) != Some(c) {
                    return Err(format!("conn {c} answers {rid}, which it was not given"));
                }
            }
            // An idle connection holds no request-index memory beyond the small kept one.
            if e.asked.is_empty() && e.asked.capacity() > KEEP_RIDS
                || e.answering.is_empty() && e.answering.capacity() > KEEP_RIDS
            {
                return Err(format!("conn {c} keeps a large empty request index"));
            }
            asked += e.asked.len();
            answering += e.answering.len();
        }
        let remote = self
            .pending
            .values()
            .filter(|p| p.requester == usize::MAX)
            .count();
        if asked + remote != self.pending.len() || answering != self.pending.len() {
            return Err(format!(
                "{} pending, {asked} indexed as asked, {answering} as answering",
                self.pending.len()
            ));
        }
        // Responders' in-flight counts agree with the pending table.
        let mut in_flight: HashMap<(TopicId, ConnId), usize> = HashMap::default();
        for p in self.pending.values() {
            *in_flight.entry((p.topic, p.responder)).or_default() += 1;
        }
        for (id, t) in &self.topics {
            for r in &t.responders {
                let n = in_flight.get(&(id, r.conn)).copied().unwrap_or(0);
                if n != r.in_flight as usize {
                    return Err(format!(
                        "topic {id} responder {} in_flight {} but {n} pending",
                        r.conn, r.in_flight
                    ));
                }
            }
        }
        Ok(())
    }
}

fn remove_one(v: &mut Vec<ConnId>, c: ConnId) -> bool {
    match v.iter().position(|&x| x == c) {
        Some(i) => {
            v.remove(i);
            true
        }
        None => false,
    }
}

fn add_once(v: &mut Vec<ConnId>, c: ConnId) -> bool {
    if v.contains(&c) {
        false
    } else {
        v.push(c);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn subscribe_both_ways_and_release() {
        let mut r = Router::new();
        for c in 0..3 {
            r.add_conn(c);
            assert_eq!(r.subscribe(c, b"t", 10), Ok(true));
        }
        assert_eq!(r.subscribe(1, b"t", 10), Ok(false));
        assert_eq!(r.subscribers(b"t"), &[0, 1, 2]);
        assert!(r.unsubscribe(0, b"t"));
        assert!(!r.unsubscribe(0, b"t"));
        r.check_invariants().unwrap();
        r.remove_conn(2);
        r.check_invariants().unwrap();
        assert_eq!(r.subscribers(b"t"), &[1]);
        r.remove_conn(1);
        assert_eq!(r.topic_count(), 0);
        r.check_invariants().unwrap();
    }

    #[test]
    fn subscription_cap() {
        let mut r = Router::new();
        r.add_conn(0);
        assert_eq!(r.subscribe(0, b"a", 1), Ok(true));
        assert_eq!(r.subscribe(0, b"b", 1), Err(SubError::TooMany));
        assert_eq!(r.subscribe(0, b"a", 1), Ok(false));
        assert_eq!(r.topic_count(), 1);
    }

    #[test]
    fn pending_indexes_follow_every_end_and_free_their_memory() {
        let mut r = Router::new();
        let d = Instant::now() + Duration::from_secs(30);
        for c in 0..4 {
            r.add_conn(c);
        }
        r.enable(0, b"q", Enable::Req);
        r.enable(1, b"q", Enable::Req);
        // Nothing in flight: the indexes hold no heap memory.
        for c in 0..4 {
            let e = r.conns[c].as_ref().unwrap();
            assert_eq!((e.asked.capacity(), e.answering.capacity()), (0, 0));
        }
        let mut rids = Vec::new();
        for i in 0..100u32 {
            let asker = 2 + (i as usize % 2);
            // Deliveries alternate, so each responder answers both requesters.
            let asker = if (i / 2) % 2 == 0 { asker } else { 5 - asker };
            let (to, rid) = r
                .start_request(asker, b"q", b"ReqID", i.to_string().as_bytes(), d)
                .unwrap();
            rids.push((rid, to, asker, i));
        }
        r.check_invariants().unwrap();
        assert_eq!((r.asked_count(2), r.asked_count(3)), (50, 50));
        assert_eq!((r.answering_count(0), r.answering_count(1)), (50, 50));
        // End them in an order that moves ids around inside the lists.
        for &(rid, ..) in rids.iter().filter(|x| x.3 % 3 == 1) {
            assert!(r.end_request(rid).is_some());
            r.check_invariants().unwrap();
        }
        assert!(r.end_request(rids[1].0).is_none(), "ends once");
        assert_eq!(r.pending_count(), 67);
        // The requester 2 leaves: only its requests go, none is orphaned.
        assert!(r.remove_conn(2).is_empty());
        r.check_invariants().unwrap();
        assert_eq!(r.pending_count(), 33);
        assert!(r.pending.values().all(|p| p.requester == 3));
        // Responder 0 leaves: its requests come back oldest first.
        let orphaned = r.remove_conn(0);
        let values: Vec<u32> = orphaned
            .iter()
            .map(|(p, _)| {
                std::str::from_utf8(p.reqid_value())
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        let expect: Vec<u32> = rids
            .iter()
            .filter(|&&(_, to, asker, i)| to == 0 && asker == 3 && i % 3 != 1)
            .map(|x| x.3)
            .collect();
        assert!(expect.len() >= 8, "{expect:?}");
        assert_eq!(values, expect);
        r.check_invariants().unwrap();
        // Drain the rest: the large lists are given back.
        while r.pop_expired(d).is_some() {}
        r.check_invariants().unwrap();
        for c in [1, 3] {
            let e = r.conns[c].as_ref().unwrap();
            assert!(e.asked.is_empty() && e.answering.is_empty());
            assert_eq!((e.asked.capacity(), e.answering.capacity()), (0, 0), "{c}");
        }
    }

    #[test]
    fn total_subscriptions_is_kept_as_a_running_total() {
        let mut r = Router::new();
        for c in 0..3 {
            r.add_conn(c);
            for t in [&b"a"[..], b"b", b"c"] {
                r.subscribe(c, t, 10).unwrap();
            }
        }
        assert_eq!(r.total_subscriptions(), 9);
        assert!(r.unsubscribe(1, b"b"));
        assert!(!r.unsubscribe(1, b"b"));
        assert_eq!(r.total_subscriptions(), 8);
        r.remove_conn(0);
        assert_eq!(r.total_subscriptions(), 5);
        r.check_invariants().unwrap();
    }

    #[test]
    fn responders_fewest_in_flight_then_round_robin() {
        let mut r = Router::new();
        let t0 = Instant::now();
        for c in 0..3 {
            r.add_conn(c);
        }
        r.enable(1, b"q", Enable::Req);
        r.enable(2, b"q", Enable::Req);
        let d = t0 + Duration::from_secs(30);
        let (a, rid_a) = r.start_request(0, b"q", b"ReqID", b"1", d).unwrap();
        let (b, _) = r.start_request(0, b"q", b"ReqID", b"2", d).unwrap();
        assert_ne!(a, b);
        r.end_request(rid_a);
        // a has fewer in flight now, so it is chosen even though it would not be next.
        let (c, _) = r.start_request(0, b"q", b"ReqID", b"3", d).unwrap();
        assert_eq!(c, a);
        r.check_invariants().unwrap();
        let orphaned = r.remove_conn(b);
        assert_eq!(orphaned.len(), 1);
        assert_eq!(orphaned[0].0.reqid_value(), b"2");
        assert_eq!(&*orphaned[0].1, b"q");
        r.check_invariants().unwrap();
        assert!(r.pop_expired(t0).is_none());
        let (_, p) = r.pop_expired(d).unwrap();
        assert_eq!(p.reqid_value(), b"3");
        assert_eq!(r.pending_count(), 0);
    }
}
