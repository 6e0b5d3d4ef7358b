//! Version 1.1 of the protocol (PROTOCOL.md §9.1-§9.4), pure like the rest of the
//! broker: per-connection grants and their withdrawal, server-side subscriptions and
//! kicks, presence, and connection events.
//!
//! Cluster-wide: a `forcid` on another node is carried to that node (`G`, `I` on its
//! node subject), a service that leaves withdraws its grants there (`W`), presence is
//! gathered from every node (`Y` out, `y` back, 1 s deadline), and each node publishes
//! its own connections' events on the event topic's subject, only while some node has a
//! subscriber (announced like an `ESUB` of the event topic, which no service may send).

use std::rc::Rc;
use std::time::Instant;

use crate::broker::{reason, Broker, Outbox};
use crate::protocol::encode::{fmt_u64, push_body, push_header};
use crate::protocol::{Message, Packet};
use crate::router::{ConnId, Enable, SubError};

/// The event topics (§9.4), in the order of their bits.
pub const EVENT_TOPICS: [&[u8]; 4] = [b"SYS:CONNECT", b"SYS:DISCONNECT", b"SYS:SUB", b"SYS:UNS"];

/// The bit of an event topic (0: not one).
pub fn event_bit(topic: &[u8]) -> u8 {
    EVENT_TOPICS
        .iter()
        .position(|t| *t == topic)
        .map_or(0, |i| 1 << i)
}

/// Most lines a presence answer lists (a larger `limit` is clamped).
pub const MAX_PRESENCE_LIMIT: usize = 10_000;
/// Lines listed when the request names no `limit`.
pub const DEFAULT_PRESENCE_LIMIT: usize = 1000;
/// Largest presence body (lines past it are cut, `truncated: true`): within the default
/// message size, so a service never gets an answer it could not have been sent.
pub const MAX_PRESENCE_BODY: usize = 1 << 20;
/// Presence questions a node waits on at once (each holds up to `limit` lines and the
/// uids of every node); one more is refused `too many requests in flight`.
pub const MAX_PRESENCE_QUERIES: usize = 256;
/// Longest kick reason, in bytes (cut at a character boundary).
pub const MAX_KICK_REASON: usize = 120;

/// A presence line: (cid, uid).
pub type Member = (Box<[u8]>, Box<[u8]>);

/// A connection event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// `SYS:CONNECT`.
    Connect = 0,
    /// `SYS:DISCONNECT` (with `reason`).
    Disconnect = 1,
    /// `SYS:SUB` (with `topic`).
    Sub = 2,
    /// `SYS:UNS` (with `topic`).
    Uns = 3,
}

/// Is `s` a cid (`[0-9a-z]`, 1 to 32 characters)?
pub fn is_cid(s: &[u8]) -> bool {
    (1..=32).contains(&s.len()) && s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'z'))
}

/// Is `t` a valid target (§2: non-empty, at most 255 bytes, no control character)?
pub fn is_target(t: &[u8]) -> bool {
    (1..=255).contains(&t.len()) && !t.iter().any(|&b| b < 0x20 || b == 0x7f)
}

/// `s` cut to at most `max` bytes at a UTF-8 character boundary (bytes that are not
/// UTF-8 are cut at `max`).
pub fn cut_utf8(s: &[u8], max: usize) -> &[u8] {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    if std::str::from_utf8(s).is_ok() {
        while end > 0 && (s[end] & 0xC0) == 0x80 {
            end -= 1;
        }
    }
    &s[..end]
}

/// Where a `forcid` lives.
pub(crate) enum Whom<'a> {
    /// A connection here.
    Local(ConnId),
    /// On another node this one hears (its id).
    Remote(&'a [u8]),
    /// Nowhere known: a silent no-op (§9).
    Nobody,
}

/// A presence request gathered from several nodes.
#[derive(Debug)]
pub struct PresenceQuery {
    /// Who asked, and its cid (to tell a later owner of the slot apart).
    pub requester: ConnId,
    /// The requester's cid.
    pub cid: Box<str>,
    /// The requester's `ReqID` (name, value).
    pub reqid: (Box<[u8]>, Box<[u8]>),
    /// Lines wanted.
    pub limit: usize,
    /// Nodes not yet answered.
    pub waiting: Vec<Box<str>>,
    /// A node did not answer (gone, or past the deadline).
    pub partial: bool,
    /// Sum of the counts.
    pub count: usize,
    /// Distinct uids seen (when every node listed them).
    pub uids: foldhash::HashSet<Box<[u8]>>,
    /// Users counted without their uids (a node whose list was too long).
    pub users_unlisted: usize,
    /// Lines so far: (cid, uid).
    pub lines: Vec<Member>,
    /// When to answer with what there is.
    pub deadline: Instant,
}

impl Broker {
    /// Where the connection `cid` lives.
    pub(crate) fn whom<'a>(&self, cid: &'a [u8]) -> Whom<'a> {
        if let Some(&c) = std::str::from_utf8(cid).ok().and_then(|c| self.cids.get(c)) {
            return Whom::Local(c);
        }
        if let Some(c) = self.cluster.as_ref() {
            if let Some(node) = c.node_of_cid(cid) {
                if c.knows_node(node) {
                    return Whom::Remote(node);
                }
            }
        }
        Whom::Nobody
    }

    /// The `forcid` of `msg`, checked: an error sent (and `None`) when missing or not a
    /// cid.
    fn forcid<'m>(
        &mut self,
        from: ConnId,
        msg: &Message<'m>,
        out: &mut impl Outbox,
    ) -> Option<&'m [u8]> {
        let Some((_, cid)) = msg.header("forcid") else {
            self.error(out, from, msg, reason::MISSING_HEADER);
            return None;
        };
        if !is_cid(cid) {
            self.error(out, from, msg, reason::BAD_CID);
            return None;
        }
        Some(cid)
    }

    // ------------------------------------------------------------------ subscriptions

    /// Subscribe `conn` to `t` (the right to do so checked by the caller): the cluster's
    /// interest, the `SYS:SUB` event, the event-topic bits. `Ok(false)`: it already was.
    pub(crate) fn subscribe_conn(
        &mut self,
        conn: ConnId,
        t: &[u8],
        now: Instant,
        out: &mut impl Outbox,
    ) -> Result<bool, SubError> {
        // The private channel is not counted against the limit.
        let max = self.settings.max_subscriptions.saturating_add(1);
        let added = self.router.subscribe(conn, t, max)?;
        if !added || t.starts_with(b"MSG:") {
            return Ok(added);
        }
        if self.router.subscribers(t).len() == 1 {
            if let Some(c) = self.cluster.as_mut() {
                c.interest(t, true, now);
            }
            if event_bit(t) != 0 {
                self.refresh_local_events();
            }
        }
        if !t.starts_with(b"SYS:") {
            self.emit(Event::Sub, conn, Some(t), out);
        }
        Ok(true)
    }

    /// Unsubscribe `conn` from `t`, with the cluster's interest and the `SYS:UNS` event.
    /// False if it was not subscribed.
    pub(crate) fn unsubscribe_conn(
        &mut self,
        conn: ConnId,
        t: &[u8],
        now: Instant,
        out: &mut impl Outbox,
    ) -> bool {
        if !self.router.unsubscribe(conn, t) {
            return false;
        }
        if t.starts_with(b"MSG:") {
            return true;
        }
        if self.router.subscribers(t).is_empty() {
            if let Some(c) = self.cluster.as_mut() {
                c.interest(t, false, now);
            }
            if event_bit(t) != 0 {
                self.refresh_local_events();
            }
        }
        if !t.starts_with(b"SYS:") {
            self.emit(Event::Uns, conn, Some(t), out);
        }
        true
    }

    /// Recompute which event topics have subscribers here; a change is announced to the
    /// other nodes (so they publish their events, or stop).
    pub(crate) fn refresh_local_events(&mut self) {
        let mut bits = 0;
        for (i, t) in EVENT_TOPICS.iter().enumerate() {
            if !self.router.subscribers(t).is_empty() {
                bits |= 1 << i;
            }
        }
        let changed = bits ^ self.local_events;
        self.local_events = bits;
        if let Some(c) = self.cluster.as_mut() {
            for (i, t) in EVENT_TOPICS.iter().enumerate() {
                if changed & (1 << i) != 0 {
                    c.announce(t, Enable::Sub, bits & (1 << i) != 0);
                }
            }
        }
    }

    // ------------------------------------------------------------------ events

    /// Does anyone, here or on another node, subscribe to this event? (The one check on
    /// the paths that produce events.)
    fn wants(&self, ev: Event) -> bool {
        let bit = 1 << ev as u8;
        (self.local_events | self.cluster.as_ref().map_or(0, |c| c.remote_events)) & bit != 0
    }

    /// A connection was admitted: its `SYS:CONNECT` (§9.4). The reactor calls it right
    /// after [`Broker::connect`], once the connection is told its cid.
    pub fn connected(&mut self, conn: ConnId, out: &mut impl Outbox) {
        self.emit(Event::Connect, conn, None, out);
    }

    /// Publish the event `ev` about `conn` (a topic for SUB/UNS, a reason for
    /// DISCONNECT) to its subscribers here and, when wanted, to the other nodes.
    pub(crate) fn emit(
        &mut self,
        ev: Event,
        conn: ConnId,
        detail: Option<&[u8]>,
        out: &mut impl Outbox,
    ) {
        if !self.wants(ev) {
            return;
        }
        let Some(s) = self.sessions.get(conn).and_then(Option::as_ref) else {
            return;
        };
        if s.quiet {
            return;
        }
        let topic = EVENT_TOPICS[ev as usize];
        let detail_name: &[u8] = match ev {
            Event::Disconnect => b"reason",
            _ => b"topic",
        };
        let utf8 = s.tail_utf8 && detail.is_none_or(|d| std::str::from_utf8(d).is_ok());
        let pkt = self.pool.build(64 + s.relay_tail.len(), utf8, |b| {
            b.extend_from_slice(b"PUB ");
            b.extend_from_slice(topic);
            b.extend_from_slice(b"\r\n");
            b.extend_from_slice(&s.relay_tail);
            push_header(b, b"role", s.role.name().as_bytes());
            if let Some(d) = detail {
                push_header(b, detail_name, d);
            }
            b.extend_from_slice(b"\r\n\r\n.\r\n");
        });
        for &to in self.router.subscribers(topic) {
            // A connection leaving is not told of its own departure.
            if !(ev == Event::Disconnect && to == conn) {
                out.send(to, &pkt);
            }
        }
        self.stats.events[ev as usize] += 1;
        if let Some(c) = self.cluster.as_mut() {
            if c.remote_events & (1 << ev as u8) != 0 {
                c.publish_pub(topic, pkt.payload());
            }
        }
    }

    // ------------------------------------------------------------------ grants

    /// `EPUB`/`ESUB`/`EREQ` (`on`) or `DPUB`/`DSUB`/`DREQ` with `forcid`: a grant to one
    /// connection, or its withdrawal (§9.1).
    pub(crate) fn grant_for(
        &mut self,
        from: ConnId,
        msg: &Message<'_>,
        kind: Enable,
        on: bool,
        now: Instant,
        out: &mut impl Outbox,
    ) {
        let Some(cid) = self.forcid(from, msg, out) else {
            return;
        };
        let t = msg.target;
        match self.whom(cid) {
            Whom::Nobody => {}
            Whom::Local(to) => {
                if on {
                    let max = self.settings.max_subscriptions;
                    if self.router.grant(from, to, t, kind, max).is_err() {
                        self.error(out, from, msg, reason::TOO_MANY_GRANTS);
                    }
                } else if self.router.revoke(from, to, t, kind) && kind == Enable::Sub {
                    self.after_sub_right_lost(to, t, now, out);
                }
            }
            Whom::Remote(node) => {
                let node = node.to_vec();
                let granter = self.cid(from).map(Box::<str>::from);
                if let (Some(c), Some(granter)) = (self.cluster.as_mut(), granter) {
                    c.send_grant(&node, from, &granter, kind, on, cid, t);
                }
            }
        }
    }

    /// `conn` lost a right to subscribe to `t`: if it has none left (no grant, no global
    /// enablement anywhere) and is a client subscribed to `t`, it is unsubscribed.
    fn after_sub_right_lost(
        &mut self,
        conn: ConnId,
        t: &[u8],
        now: Instant,
        out: &mut impl Outbox,
    ) {
        // A private channel is not held by a right (clients may not SUB it at all).
        if t.starts_with(b"MSG:") {
            return;
        }
        let client = self.role(conn).is_some_and(|r| !r.is_service());
        if client
            && !self.router.has_grant(conn, t, Enable::Sub)
            && !self.is_enabled(t, Enable::Sub)
        {
            self.unsubscribe_conn(conn, t, now, out);
        }
    }

    /// A grant or withdrawal from a service on another node (`G`), for `cid` here.
    /// False if a grant was refused (the connection holds too many).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn on_remote_grant(
        &mut self,
        granter: ConnId,
        cid: &[u8],
        kind: Enable,
        on: bool,
        t: &[u8],
        now: Instant,
        out: &mut impl Outbox,
    ) -> bool {
        let Whom::Local(to) = self.whom(cid) else {
            return true;
        };
        if on {
            let max = self.settings.max_subscriptions;
            return self.router.grant(granter, to, t, kind, max).is_ok();
        }
        if self.router.revoke(granter, to, t, kind) && kind == Enable::Sub {
            self.after_sub_right_lost(to, t, now, out);
        }
        true
    }

    // ------------------------------------------------------------------ INT SUB/UNS/KICK

    /// `INT SUB` / `INT UNS` (§9.2).
    pub(crate) fn int_sub(
        &mut self,
        from: ConnId,
        msg: &Message<'_>,
        now: Instant,
        out: &mut impl Outbox,
    ) {
        let Some(cid) = self.forcid(from, msg, out) else {
            return;
        };
        let Some((_, t)) = msg.header("topic") else {
            return self.error(out, from, msg, reason::MISSING_HEADER);
        };
        if !is_target(t) {
            return self.error(out, from, msg, reason::BAD_TOPIC);
        }
        if t.starts_with(b"SYS:") || t.starts_with(b"MSG:") {
            return self.error(out, from, msg, reason::NOT_PERMITTED);
        }
        let sub = msg.target == b"SUB";
        match self.whom(cid) {
            Whom::Nobody => {}
            Whom::Local(to) => {
                if sub {
                    if let Err(SubError::TooMany) = self.subscribe_conn(to, t, now, out) {
                        self.error(out, from, msg, reason::TOO_MANY_SUBSCRIPTIONS);
                    }
                } else {
                    self.unsubscribe_conn(to, t, now, out);
                }
            }
            Whom::Remote(node) => {
                let node = node.to_vec();
                if let Some(c) = self.cluster.as_mut() {
                    c.send_int(&node, if sub { b'S' } else { b'U' }, cid, t);
                }
            }
        }
    }

    /// `INT KICK` (§9.2).
    pub(crate) fn int_kick(&mut self, from: ConnId, msg: &Message<'_>, out: &mut impl Outbox) {
        let Some(cid) = self.forcid(from, msg, out) else {
            return;
        };
        let why = msg.header("reason").map_or(&b"kicked"[..], |(_, r)| r);
        let why = cut_utf8(why, MAX_KICK_REASON);
        match self.whom(cid) {
            Whom::Nobody => {}
            Whom::Local(to) => kick(out, to, why),
            Whom::Remote(node) => {
                let node = node.to_vec();
                if let Some(c) = self.cluster.as_mut() {
                    c.send_int(&node, b'K', cid, why);
                }
            }
        }
    }

    /// `I S|U|K <cid>` from another node, for a connection here.
    pub(crate) fn on_remote_int(
        &mut self,
        op: u8,
        cid: &[u8],
        arg: &[u8],
        now: Instant,
        out: &mut impl Outbox,
    ) {
        let Whom::Local(to) = self.whom(cid) else {
            return;
        };
        // What the sending node checked is checked again: a peer cannot take a private
        // channel away or subscribe anyone to a reserved target.
        let topic_ok = is_target(arg) && !arg.starts_with(b"SYS:") && !arg.starts_with(b"MSG:");
        match op {
            b'S' if topic_ok && self.subscribe_conn(to, arg, now, out).is_err() => {
                log::debug!("INT SUB from another node refused: too many subscriptions");
            }
            b'U' if topic_ok => {
                self.unsubscribe_conn(to, arg, now, out);
            }
            b'K' => kick(out, to, arg),
            _ => {}
        }
    }

    // ------------------------------------------------------------------ presence

    /// `REQ SYS:PRESENCE` (§9.3) from a service: answered at once on one node, gathered
    /// from every node in a cluster (answered when all did, or at the 1 s deadline).
    pub(crate) fn presence_request(
        &mut self,
        from: ConnId,
        msg: &Message<'_>,
        now: Instant,
        out: &mut impl Outbox,
    ) {
        let Some(reqid) = msg.header("ReqID") else {
            return self.error(out, from, msg, reason::MISSING_REQID);
        };
        if reqid.1.len() > self.settings.max_reqid_bytes {
            return self.error_to(out, from, msg.cmd, msg.target, reason::REQID_TOO_LONG, None);
        }
        let Some((_, topic)) = msg.header("topic") else {
            return self.error(out, from, msg, reason::MISSING_HEADER);
        };
        if !is_target(topic) {
            return self.error(out, from, msg, reason::BAD_TOPIC);
        }
        if topic.starts_with(b"MSG:") {
            return self.error(out, from, msg, reason::NOT_PERMITTED);
        }
        let limit = match msg.header("limit") {
            None => DEFAULT_PRESENCE_LIMIT,
            // Decimal digits only; any number past the most lines listed is that most.
            Some((_, l)) if !l.is_empty() && l.iter().all(u8::is_ascii_digit) => {
                std::str::from_utf8(l)
                    .ok()
                    .and_then(|l| l.parse::<usize>().ok())
                    .map_or(MAX_PRESENCE_LIMIT, |n| n.min(MAX_PRESENCE_LIMIT))
            }
            Some(_) => return self.error(out, from, msg, reason::BAD_LIMIT),
        };
        let others = self
            .cluster
            .as_ref()
            .filter(|c| c.connected)
            .map(|c| c.node_ids())
            .unwrap_or_default();
        if !others.is_empty()
            && self
                .cluster
                .as_ref()
                .is_some_and(|c| c.presence_pending() >= MAX_PRESENCE_QUERIES)
        {
            return self.error(out, from, msg, reason::TOO_MANY_REQUESTS);
        }
        let local = self.local_presence(topic, limit, !others.is_empty());
        if others.is_empty() {
            self.stats.presence[0] += 1;
            return self.presence_answer(
                from,
                (reqid.0, reqid.1),
                local.count,
                local.users,
                &local.lines,
                limit,
                false,
                out,
            );
        }
        let Some(cid) = self.cid(from).map(Box::<str>::from) else {
            return;
        };
        let q = PresenceQuery {
            requester: from,
            cid,
            reqid: (reqid.0.into(), reqid.1.into()),
            limit,
            waiting: others,
            partial: false,
            count: local.count,
            uids: local.uids,
            users_unlisted: 0,
            lines: local.lines,
            deadline: now + std::time::Duration::from_secs(1),
        };
        if let Some(c) = self.cluster.as_mut() {
            c.start_presence(q, topic);
        }
    }

    /// This node's part of a presence answer: counts, its distinct uids (`with_uids`:
    /// for merging with other nodes' answers, O(users)) and its first `limit` lines in
    /// cid order.
    pub(crate) fn local_presence(
        &self,
        topic: &[u8],
        limit: usize,
        with_uids: bool,
    ) -> LocalPresence {
        let p = self.router.presence(topic, limit);
        let mut lines = Vec::with_capacity(p.first.len());
        for c in p.first {
            if let Some(s) = self.session(c) {
                lines.push((s.cid.as_bytes().into(), s.uid.clone()));
            }
        }
        LocalPresence {
            count: p.count,
            uids: if with_uids {
                self.router.presence_uids(topic)
            } else {
                Default::default()
            },
            users: p.users,
            lines,
        }
    }

    /// A finished presence query (all answered, or past its deadline): answer it.
    pub(crate) fn finish_presence(&mut self, mut q: PresenceQuery, out: &mut impl Outbox) {
        if self.cid(q.requester) != Some(&*q.cid) {
            return; // the requester left
        }
        q.lines.sort_unstable();
        self.stats.presence[if q.partial { 2 } else { 1 }] += 1;
        let users = q.uids.len().saturating_add(q.users_unlisted);
        let reqid = (&q.reqid.0[..], &q.reqid.1[..]);
        self.presence_answer(
            q.requester,
            reqid,
            q.count,
            users,
            &q.lines,
            q.limit,
            q.partial,
            out,
        );
    }

    /// Send `RES SYS:PRESENCE` (§9.3). `lines` sorted by cid.
    #[allow(clippy::too_many_arguments)]
    fn presence_answer(
        &mut self,
        to: ConnId,
        reqid: (&[u8], &[u8]),
        count: usize,
        users: usize,
        lines: &[Member],
        limit: usize,
        partial: bool,
        out: &mut impl Outbox,
    ) {
        let mut body = Vec::new();
        let mut listed = 0;
        for (cid, uid) in lines.iter().take(limit) {
            if body.len() + cid.len() + uid.len() + 3 > MAX_PRESENCE_BODY {
                break;
            }
            if listed > 0 {
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(cid);
            if !uid.is_empty() {
                body.push(b' ');
                body.extend_from_slice(uid);
            }
            listed += 1;
        }
        let truncated = count > listed;
        let mut d = [0u8; 20];
        let mut e = [0u8; 20];
        let pkt = Packet::build(|b| {
            b.extend_from_slice(b"RES SYS:PRESENCE\r\n");
            push_header(b, reqid.0, reqid.1);
            push_header(b, b"count", fmt_u64(count as u64, &mut d));
            push_header(b, b"users", fmt_u64(users as u64, &mut e));
            if truncated {
                push_header(b, b"truncated", b"true");
            }
            if partial {
                push_header(b, b"partial", b"true");
            }
            b.extend_from_slice(b"\r\n");
            push_body(b, &body);
            b.extend_from_slice(b"\r\n.\r\n");
        });
        out.send(to, &Rc::new(pkt));
        self.stats.delivered_res += 1;
    }
}

/// This node's part of a presence answer.
pub(crate) struct LocalPresence {
    pub count: usize,
    pub users: usize,
    pub uids: foldhash::HashSet<Box<[u8]>>,
    pub lines: Vec<Member>,
}

/// Kick `to` with `why` as the close reason: text, at most [`MAX_KICK_REASON`] bytes
/// (bytes that are not UTF-8 become U+FFFD, then the whole is cut again at a character
/// boundary).
fn kick(out: &mut impl Outbox, to: ConnId, why: &[u8]) {
    let why = String::from_utf8_lossy(why);
    let why = cut_utf8(why.as_bytes(), MAX_KICK_REASON);
    out.kick(to, std::str::from_utf8(why).unwrap_or("kicked"));
}
