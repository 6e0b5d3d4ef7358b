//! Version 1.1 across nodes (PROTOCOL.md §9): grants and `INT` commands for a cid on
//! another node, a service's grants ending when it or its node goes, and presence
//! gathered from every node. Messages, all on the receiving node's subject:
//!
//! - `G <node> <granter cid> <p|s|r> <0|1> <cid>` LF `<topic>`: a grant or withdrawal;
//! - `W <node> <granter cid>`: that service left, its grants on this node end;
//! - `I <S|U|K> <cid>` LF `<topic or kick reason>`: `INT SUB`/`UNS`/`KICK`;
//! - `Y <node> <query id> <limit>` LF `<topic>`: a presence question, answered (data) by
//!   `y <query id> <node>` LF `<count> <users> <n|->` LF n uid lines, then the member
//!   lines `<cid>[ <uid>]` in cid order (`-`: the uids did not fit, `users` is a count).

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use crate::cluster::node::Cluster;
use crate::core::rooms::PresenceQuery;
use crate::router::{ConnId, Enable};

/// Ids standing in for services on other nodes as granters (above any slab key).
const REMOTE_GRANTER_BASE: ConnId = 1 << 48;

/// The cluster's version 1.1 state.
#[derive(Debug, Default)]
pub struct RoomsState {
    /// Stand-in ids of other nodes' services that granted something here.
    granters: HashMap<(Box<str>, Box<str>), ConnId>,
    granters_of_node: HashMap<Box<str>, Vec<(Box<str>, ConnId)>>,
    next_granter: ConnId,
    /// Nodes this node's services sent grants to, by service.
    sent: HashMap<ConnId, HashSet<Box<[u8]>>>,
    /// Presence questions waiting for other nodes.
    queries: HashMap<u64, PresenceQuery>,
    next_query: u64,
    /// Stand-in granters whose node is gone, for the broker to drop their grants.
    gone: Vec<ConnId>,
}

impl RoomsState {
    /// `node` is forgotten: its services' grants end, presence stops waiting for it.
    pub(crate) fn node_gone(&mut self, node: &str) {
        if let Some(list) = self.granters_of_node.remove(node) {
            for (cid, id) in list {
                self.granters.remove(&(node.into(), cid));
                self.gone.push(id);
            }
        }
        for q in self.queries.values_mut() {
            if let Some(i) = q.waiting.iter().position(|n| &**n == node) {
                q.waiting.swap_remove(i);
                q.partial = true;
            }
        }
    }
}

fn kind_char(kind: Enable) -> u8 {
    match kind {
        Enable::Pub => b'p',
        Enable::Sub => b's',
        Enable::Req => b'r',
    }
}

/// The kind a `G` message names.
pub fn kind_from(c: &[u8]) -> Option<Enable> {
    match c {
        b"p" => Some(Enable::Pub),
        b"s" => Some(Enable::Sub),
        b"r" => Some(Enable::Req),
        _ => None,
    }
}

impl Cluster {
    /// The ids of the other nodes heard.
    pub fn node_ids(&self) -> Vec<Box<str>> {
        self.nodes(Instant::now())
            .into_iter()
            .map(|n| n.id.into())
            .collect()
    }

    /// A grant (`on`) or its withdrawal by the local service `from` (cid `granter`) to
    /// `cid`, which lives on `node`.
    #[allow(clippy::too_many_arguments)]
    pub fn send_grant(
        &mut self,
        node: &[u8],
        from: ConnId,
        granter: &str,
        kind: Enable,
        on: bool,
        cid: &[u8],
        topic: &[u8],
    ) {
        let mut head = format!("G {} {granter} ", self.node).into_bytes();
        head.push(kind_char(kind));
        head.extend_from_slice(if on { b" 1 " } else { b" 0 " });
        head.extend_from_slice(cid);
        head.push(b'\n');
        if self.node_ctl(node, &head, topic) && on {
            self.rooms.sent.entry(from).or_default().insert(node.into());
        }
    }

    /// The local service `conn` (cid `cid`) left: the nodes it granted something to
    /// drop its grants.
    pub fn granter_left(&mut self, conn: ConnId, cid: &str) {
        let Some(nodes) = self.rooms.sent.remove(&conn) else {
            return;
        };
        let head = format!("W {} {cid}", self.node);
        for node in nodes {
            self.node_ctl(&node, head.as_bytes(), b"");
        }
    }

    /// `INT SUB`/`UNS`/`KICK` (`op` S, U, K) for `cid` on `node`.
    pub fn send_int(&mut self, node: &[u8], op: u8, cid: &[u8], arg: &[u8]) {
        let mut head = vec![b'I', b' ', op, b' '];
        head.extend_from_slice(cid);
        head.push(b'\n');
        self.node_ctl(node, &head, arg);
    }

    /// The stand-in id of service `cid` on `node` as a granter here (made on first use).
    pub fn granter_id(&mut self, node: &str, cid: &str) -> ConnId {
        let r = &mut self.rooms;
        if let Some(&id) = r.granters.get(&(node.into(), cid.into())) {
            return id;
        }
        let id = REMOTE_GRANTER_BASE + r.next_granter;
        r.next_granter += 1;
        r.granters.insert((node.into(), cid.into()), id);
        r.granters_of_node
            .entry(node.into())
            .or_default()
            .push((cid.into(), id));
        id
    }

    /// The stand-in id of service `cid` on `node`, if it granted anything here.
    pub fn granter_id_if_known(&self, node: &str, cid: &str) -> Option<ConnId> {
        self.rooms.granters.get(&(node.into(), cid.into())).copied()
    }

    /// Service `cid` on `node` left: its stand-in id, if it granted anything here.
    pub fn granter_gone(&mut self, node: &str, cid: &str) -> Option<ConnId> {
        let r = &mut self.rooms;
        let id = r.granters.remove(&(node.into(), cid.into()))?;
        if let Some(list) = r.granters_of_node.get_mut(node) {
            list.retain(|(_, x)| *x != id);
            if list.is_empty() {
                r.granters_of_node.remove(node);
            }
        }
        Some(id)
    }

    /// Stand-in granters whose node is gone since the last call.
    pub fn take_gone_granters(&mut self) -> Vec<ConnId> {
        std::mem::take(&mut self.rooms.gone)
    }

    /// Ask every node `q` waits for about `topic`; nodes the question could not be sent
    /// to are not waited for (the answer is then partial).
    pub fn start_presence(&mut self, mut q: PresenceQuery, topic: &[u8]) {
        let id = self.rooms.next_query;
        self.rooms.next_query += 1;
        let head = format!("Y {} {id} {}\n", self.node, q.limit);
        let mut waiting = Vec::with_capacity(q.waiting.len());
        for node in std::mem::take(&mut q.waiting) {
            if self.node_ctl(node.as_bytes(), head.as_bytes(), topic) {
                waiting.push(node);
            } else {
                q.partial = true;
            }
        }
        q.waiting = waiting;
        self.rooms.queries.insert(id, q);
    }

    /// Answer a presence question from `node` (query `id`) with this node's part.
    pub fn answer_presence(&mut self, node: &[u8], id: u64, part: PresencePart<'_>) {
        let max = self.max_payload.saturating_sub(256);
        let mut body = format!("y {id} {}\n{} {} ", self.node, part.count, part.users).into_bytes();
        let uid_bytes: usize = part.uids.iter().map(|u| u.len() + 1).sum();
        if uid_bytes <= max / 2 {
            body.extend_from_slice(part.uids.len().to_string().as_bytes());
            body.push(b'\n');
            for u in part.uids {
                body.extend_from_slice(u);
                body.push(b'\n');
            }
        } else {
            body.extend_from_slice(b"-\n");
        }
        for (cid, uid) in part.lines {
            if body.len() + cid.len() + uid.len() + 2 > max {
                break;
            }
            body.extend_from_slice(cid);
            if !uid.is_empty() {
                body.push(b' ');
                body.extend_from_slice(uid);
            }
            body.push(b'\n');
        }
        let s = self.subject(&[b"node", node], None);
        self.publish_data(&s, None, b"", &body);
        self.done_subject(s);
    }

    /// A node's answer to presence question `id` (`rest` after the `y` line): folded in;
    /// the query when nothing more is awaited.
    pub fn on_presence_answer(
        &mut self,
        id: u64,
        node: &str,
        rest: &[u8],
    ) -> Option<PresenceQuery> {
        let q = self.rooms.queries.get_mut(&id)?;
        let i = q.waiting.iter().position(|n| &**n == node)?;
        q.waiting.swap_remove(i);
        let mut lines = rest.split(|&b| b == b'\n');
        let head = std::str::from_utf8(lines.next()?).ok()?;
        let mut w = head.split(' ');
        let count: usize = w.next()?.parse().ok()?;
        let users: usize = w.next()?.parse().ok()?;
        q.count = q.count.saturating_add(count);
        match w.next()?.parse::<usize>() {
            Ok(n) => {
                for _ in 0..n {
                    let u = lines.next()?;
                    q.uids.insert(u.into());
                }
            }
            Err(_) => q.users_unlisted = q.users_unlisted.saturating_add(users),
        }
        for l in lines.filter(|l| !l.is_empty()) {
            let (cid, uid) = match memchr::memchr(b' ', l) {
                Some(k) => (&l[..k], &l[k + 1..]),
                None => (l, &[][..]),
            };
            q.lines.push((cid.into(), uid.into()));
        }
        // Only the first `limit` lines of all nodes are ever listed: keep no more.
        if q.lines.len() > 2 * q.limit.max(1) {
            q.lines.sort_unstable();
            q.lines.truncate(q.limit);
        }
        if q.waiting.is_empty() {
            return self.rooms.queries.remove(&id);
        }
        None
    }

    /// Presence queries answered by every node still there, or past their deadline
    /// (then partial).
    pub fn take_finished_presence(&mut self, now: Instant) -> Vec<PresenceQuery> {
        let done: Vec<u64> = self
            .rooms
            .queries
            .iter()
            .filter(|(_, q)| q.waiting.is_empty() || q.deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        let mut v = Vec::with_capacity(done.len());
        for id in done {
            if let Some(mut q) = self.rooms.queries.remove(&id) {
                if !q.waiting.is_empty() {
                    q.partial = true;
                }
                v.push(q);
            }
        }
        v
    }

    /// The earliest presence deadline.
    pub fn next_presence_deadline(&self) -> Option<Instant> {
        self.rooms.queries.values().map(|q| q.deadline).min()
    }

    /// Presence questions waiting (for `/metrics` and tests).
    pub fn presence_pending(&self) -> usize {
        self.rooms.queries.len()
    }
}

/// This node's part of a presence answer, for another node.
pub struct PresencePart<'a> {
    /// Connections subscribed here.
    pub count: usize,
    /// Distinct uids here.
    pub users: usize,
    /// Those uids.
    pub uids: &'a [Box<[u8]>],
    /// The first lines in cid order: (cid, uid).
    pub lines: &'a [crate::core::rooms::Member],
}
