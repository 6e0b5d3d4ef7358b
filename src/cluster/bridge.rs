//! The broker's side of the cluster: what a message from another node means here, and
//! what the node tells the others when its own tables change. Pure, like the broker.

use std::borrow::Cow;
use std::rc::Rc;
use std::time::Instant;

use crate::broker::{reason, Broker, Outbox, Size};
use crate::cluster::node::{Cluster, ClusterSettings, CtlEvent, Inbox, OutReq, Sid, REMOTE};
use crate::cluster::{proto, subject};
use crate::protocol::Packet;
use crate::router::{Enable, Held};

impl Broker {
    /// Make this broker a cluster node (its id is its cid prefix).
    pub fn join_cluster(&mut self, node: &str, settings: ClusterSettings) {
        self.cluster = Some(Box::new(Cluster::new(node, settings)));
        self.router.track_loads();
    }

    /// Is `kind` enabled on `target` by a service here or on another node?
    pub(crate) fn is_enabled(&self, target: &[u8], kind: Enable) -> bool {
        self.router.is_enabled(target, kind)
            || self
                .cluster
                .as_ref()
                .is_some_and(|c| c.remote_enabled(target, kind))
    }

    /// After a connection left: subjects nobody here needs any more, enablements that
    /// lapsed, monitors gone.
    pub(crate) fn cluster_after_leave(&mut self, held: Held, no_monitors: bool) {
        let now = self.clock.unwrap_or_else(Instant::now);
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        for t in held.subs {
            if !t.starts_with(b"MSG:") && self.router.subscribers(&t).is_empty() {
                c.interest(&t, false, now);
            }
        }
        for (t, kind) in held.enabled {
            if !self.router.is_enabled(&t, kind) {
                c.announce(&t, kind, false);
            }
        }
        if no_monitors {
            c.monitors(false);
        }
    }

    /// Send the answer to a request taken from another node (ending it here).
    pub(crate) fn answer_remote(&mut self, rid: u64, payload: &[u8]) {
        if let Some(c) = self.cluster.as_mut() {
            if let Some((node, id)) = c.end_in_request(rid) {
                c.answer(&node, id, payload);
            }
        }
    }

    /// Fail a request taken from another node (ending it here).
    pub(crate) fn fail_remote(&mut self, rid: u64, why: &str) {
        if let Some(c) = self.cluster.as_mut() {
            if let Some((node, id)) = c.end_in_request(rid) {
                c.answer_failed(&node, id, why);
            }
        }
    }

    /// The enablements of this node's services, for a full-state message.
    fn local_enablements(&self) -> Vec<(&[u8], Enable)> {
        let mut v = Vec::new();
        for t in self.router.topics() {
            for (held, kind) in [
                (!t.epub.is_empty(), Enable::Pub),
                (!t.esub.is_empty(), Enable::Sub),
                (t.has_responder(), Enable::Req),
            ] {
                if held {
                    v.push((&t.name[..], kind));
                }
            }
        }
        // Event topics with subscribers here travel as an ESUB of the event topic.
        for (i, t) in crate::core::rooms::EVENT_TOPICS.iter().enumerate() {
            if self.local_events & (1 << i) != 0 {
                v.push((t, Enable::Sub));
            }
        }
        v
    }

    /// The enablements (to `to` or everyone) and, after them, every responder load.
    fn send_state_to(&mut self, to: Option<&[u8]>, now: Instant) {
        let mut c = self.cluster.take();
        if let Some(c) = c.as_mut() {
            c.send_state(to, self.local_enablements().into_iter());
            let ids: Vec<_> = self
                .router
                .topics_with_ids()
                .filter(|(_, t)| t.has_responder())
                .map(|(id, _)| id)
                .collect();
            self.send_loads(c, now, true, &ids);
        }
        self.cluster = c;
    }

    /// Announce the responders of `ids` with their counts (cids from the sessions).
    fn send_loads(&self, c: &mut Cluster, now: Instant, full: bool, ids: &[usize]) {
        let lines = ids.iter().filter_map(|&id| {
            let t = self.router.topic(id)?;
            let resps = t
                .active_responders()
                .filter_map(|r| Some((self.cid(r.conn)?, r.in_flight)))
                .collect();
            Some((&t.name[..], resps))
        });
        c.send_loads(now, full, lines);
    }

    /// Before the pass's backplane write: interest changes within the budget, and the
    /// responder loads that changed (rate-limited).
    pub fn cluster_before_flush(&mut self, now: Instant) {
        let Some(mut c) = self.cluster.take() else {
            return;
        };
        let router = &self.router;
        c.write_interest(now, |t| !router.subscribers(t).is_empty());
        if self.router.has_load_changes() && c.load_due(now) {
            let ids = self.router.take_load_changes();
            self.send_loads(&mut c, now, false, &ids);
        }
        self.cluster = Some(c);
    }

    /// When the backplane wants a pass without waiting for an event (a load
    /// announcement held back by the rate limit), if it does.
    pub fn cluster_wake_at(&self) -> Option<Instant> {
        let c = self.cluster.as_ref()?;
        let presence = c.next_presence_deadline();
        if c.connected && self.router.has_load_changes() {
            let at = c.next_load_at().unwrap_or_else(Instant::now);
            return Some(presence.map_or(at, |p| p.min(at)));
        }
        presence
    }

    /// Shutting down: tell the other nodes this one leaves.
    pub fn cluster_leave(&mut self) {
        if let Some(c) = self.cluster.as_mut() {
            c.leave();
        }
    }

    /// The backplane connection came up: subscribe, say hello, publish the state.
    pub fn cluster_connected(&mut self, now: Instant, max_payload: usize) {
        let monitors = !self.monitors.is_empty();
        if let Some(c) = self.cluster.as_mut() {
            c.max_payload = max_payload;
            c.monitors(monitors);
            c.on_connected(now);
            c.js_connected(now);
        }
        self.send_state_to(None, now);
    }

    /// Once per tick: heartbeat, nodes gone, subjects to release, forwarded requests
    /// past their deadline.
    pub fn cluster_tick(&mut self, now: Instant, out: &mut impl Outbox) {
        self.clock = Some(now);
        let monitors = !self.monitors.is_empty();
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        c.heartbeat(now, monitors);
        let mut failed = Vec::new();
        for node in c.expire_nodes(now) {
            failed.extend(
                c.take_out_requests_of_node(&node)
                    .into_iter()
                    .map(|r| (r, reason::RESPONDER_GONE)),
            );
        }
        while let Some(r) = c.pop_expired_out(now) {
            failed.push((r, reason::TIMED_OUT));
        }
        for (r, why) in failed {
            match why {
                reason::TIMED_OUT => self.stats.req_timed_out += 1,
                _ => self.stats.req_responder_gone += 1,
            }
            self.fail_forwarded(&r, why, out);
        }
        self.rooms_housekeeping(now, out);
        self.js_housekeeping(now, out);
    }

    fn fail_forwarded(&mut self, r: &OutReq, why: &'static str, out: &mut impl Outbox) {
        if self.cid(r.requester).map(str::as_bytes) != Some(r.cid()) {
            return; // the requester left
        }
        let i = reason::ALL.iter().position(|x| *x == why);
        if let Some(i) = i {
            self.stats.errors[i] += 1;
        }
        let pkt = crate::broker::error_packet(b"REQ", r.target(), why, Some(r.reqid()));
        out.send(r.requester, &Rc::new(pkt));
    }

    /// One message from the backplane (a MSG or HMSG for one of the node's subscriptions).
    pub fn on_backplane(&mut self, msg: &proto::Msg<'_>, now: Instant, out: &mut impl Outbox) {
        let (subject, payload) = (msg.subject, msg.payload);
        let no_responders = msg.is_no_responders();
        let Some(sid) = msg.sid_u64() else {
            return;
        };
        self.clock = Some(now);
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        c.stats.messages_in += 1;
        let Some(kind) = c.sid(sid).cloned() else {
            return; // unsubscribed meanwhile
        };
        match kind {
            Sid::Pub(topic) => {
                let Some(id) = self.router.lookup(&topic) else {
                    return;
                };
                if self.router.topic(id).is_none_or(|t| t.subs.is_empty()) {
                    return;
                }
                // One message, or a batch of them (consecutive PUBs of the topic).
                let mut n = 0;
                for one in proto::batch_items(payload) {
                    match self.router.topic(id).map(|t| &t.subs[..]) {
                        // One subscriber: built in its queue (see Outbox::send_one).
                        Some(&[s]) => {
                            out.send_one(s, &mut self.pool, Size::exact(one.len()), false, |b| {
                                b.extend_from_slice(one)
                            });
                            self.stats.delivered_pub += 1;
                        }
                        Some(_) => {
                            let pkt = self.packet_from(one);
                            if let Some(t) = self.router.topic(id) {
                                for &s in &t.subs {
                                    out.send(s, &pkt);
                                }
                                self.stats.delivered_pub += t.subs.len() as u64;
                            }
                        }
                        None => {}
                    }
                    n += 1;
                }
                if let Some(c) = self.cluster.as_mut() {
                    c.batch_in(n);
                }
            }
            Sid::MonPub => {
                let Some(topic) = c.pub_topic(subject) else {
                    return;
                };
                // Events are not routed messages: monitors get no copies (§9.4).
                if self.monitors.is_empty() || topic.starts_with(b"SYS:") {
                    return;
                }
                let id = self.router.lookup(&topic);
                for one in proto::batch_items(payload) {
                    let pkt = self.packet_from(one);
                    for &m in &self.monitors {
                        if !id.is_some_and(|t| self.router.is_subscribed_id(m, t)) {
                            out.send(m, &pkt);
                        }
                    }
                }
            }
            Sid::Mon => {
                if !self.monitors.is_empty() {
                    let pkt = self.packet_from(payload);
                    for &m in &self.monitors {
                        out.send(m, &pkt);
                    }
                }
            }
            Sid::Inbox => self.on_inbox(subject, payload, no_responders, out),
            Sid::JsApi => self.on_js_api(msg, now, out),
            Sid::JsLive(gen) => self.on_js_live(gen, msg, now, out),
            Sid::JsRec(id) => self.on_js_rec(id, msg, now, out),
            Sid::Node => self.on_node_message(payload, now, out),
            Sid::Ctl => {
                match c.on_ctl(payload, now) {
                    CtlEvent::None => {}
                    CtlEvent::SendState(node) => self.send_state_to(Some(node.as_bytes()), now),
                    CtlEvent::Gone(node) => self.fail_requests_of_node(&node, out),
                    CtlEvent::Collision => self.cluster_rename(now, out),
                }
                self.rooms_housekeeping(now, out);
            }
        }
    }

    /// Fail the requests forwarded to `node` (gone), each `responder disconnected`.
    fn fail_requests_of_node(&mut self, node: &str, out: &mut impl Outbox) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        for r in c.take_out_requests_of_node(node) {
            self.stats.req_responder_gone += 1;
            self.fail_forwarded(&r, reason::RESPONDER_GONE, out);
        }
    }

    /// Another process has this node's id: take a new one (new connections get cids
    /// under it), failing the requests forwarded under the old one.
    fn cluster_rename(&mut self, now: Instant, out: &mut impl Outbox) {
        let new = crate::broker::random_cid_prefix();
        self.set_cid_prefix(&new);
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        for r in c.rename(&new, now) {
            self.stats.req_responder_gone += 1;
            self.fail_forwarded(&r, reason::RESPONDER_GONE, out);
        }
        self.send_state_to(None, now);
    }

    /// A packet holding a message another node relayed (its bytes as they are).
    fn packet_from(&mut self, payload: &[u8]) -> Rc<Packet> {
        self.pool
            .build(payload.len(), false, |b| b.extend_from_slice(payload))
    }

    /// A request another node addressed to this one (`Q <node> <id> <cid> <token> <ReqID
    /// name> <ReqID value>`):
    /// give it to the responder it chose, or to the least loaded one if that one left;
    /// if nobody here answers any more, say so at once.
    fn take_request(&mut self, line: &[u8], payload: &[u8], now: Instant, out: &mut impl Outbox) {
        let Some((from, id, cid, topic, (name, value))) = parse_q(line) else {
            return;
        };
        let deadline = now + self.settings.request_timeout;
        let to = self.cids.get(cid).copied();
        // The REQ comes as the requester's node relayed it (canonical: its header block
        // ends at the first blank line, no `rid`): the responder gets it with `rid` as
        // the last header, as `relay_packet` would write it, without decoding it again.
        let head_end = memchr::memmem::find(payload, b"\r\n\r\n").map(|i| i + 2);
        let taken = head_end.and_then(|at| {
            let (responder, rid) = self
                .router
                .start_request_to(REMOTE, &topic, to, name, value, deadline)?;
            let mut digits = [0u8; 20];
            let rid_text = crate::protocol::encode::fmt_u64(rid, &mut digits);
            let (head, rest) = payload.split_at(at);
            let size = Size::exact(payload.len() + 7 + rid_text.len());
            out.send_one(responder, &mut self.pool, size, false, |b| {
                b.extend_from_slice(head);
                b.extend_from_slice(b"rid: ");
                b.extend_from_slice(rid_text);
                b.extend_from_slice(b"\r\n");
                b.extend_from_slice(rest);
            });
            self.stats.delivered_req += 1;
            // Monitors got their copy from the requester's node.
            Some(rid)
        });
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        c.took(from, id, taken);
        if taken.is_none() {
            c.answer_failed(from, id, reason::NO_RESPONDER);
        }
    }

    /// A message on this node's inbox: answers to the requests it forwarded (a batch),
    /// one of them failed, or a batch of them nobody received.
    fn on_inbox(
        &mut self,
        subject: &[u8],
        payload: &[u8],
        no_responders: bool,
        out: &mut impl Outbox,
    ) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        match c.inbox_of(subject) {
            Some(Inbox::Answers) => {
                let mut n = 0;
                for item in proto::batch_items(payload) {
                    n += 1;
                    let Some(i) = memchr::memchr(b'\n', item) else {
                        continue;
                    };
                    if let Some(id) = proto::parse_u64(&item[..i]) {
                        self.on_answer(id, &item[i + 1..], out);
                    }
                }
                if let Some(c) = self.cluster.as_mut() {
                    c.batch_in(n);
                }
            }
            Some(Inbox::Requests { node, first, last }) if no_responders => {
                for r in c.take_out_requests_in(node, first, last) {
                    self.stats.req_no_responder += 1;
                    self.fail_forwarded(&r, reason::NO_RESPONDER, out);
                }
            }
            Some(Inbox::One(id)) => {
                let why = match payload.strip_prefix(b"X ") {
                    Some(b"responder disconnected") => reason::RESPONDER_GONE,
                    Some(_) => reason::NO_RESPONDER,
                    None => return,
                };
                if let Some(r) = c.end_out_request(id) {
                    match why {
                        reason::RESPONDER_GONE => self.stats.req_responder_gone += 1,
                        _ => self.stats.req_no_responder += 1,
                    }
                    self.fail_forwarded(&r, why, out);
                }
            }
            _ => {}
        }
    }

    /// The answer `res` (the RES as the responder's node relayed it for the requester) to
    /// forwarded request `id`.
    fn on_answer(&mut self, id: u64, res: &[u8], out: &mut impl Outbox) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        let Some(r) = c.end_out_request(id) else {
            return; // late: dropped silently (§6.5)
        };
        if self.cid(r.requester).map(str::as_bytes) != Some(r.cid()) {
            return;
        }
        // The responder's node relayed it as the requester gets it (its ReqID set).
        self.stats.req_answered += 1;
        out.send_one(
            r.requester,
            &mut self.pool,
            Size::exact(res.len()),
            false,
            |b| b.extend_from_slice(res),
        );
        self.stats.delivered_res += 1;
    }

    /// A message for this node alone: a request, a private message, a uid, a state
    /// request or a full state; or a batch of requests (a request too large to share a
    /// batch comes alone, without the batch marker).
    fn on_node_message(&mut self, payload: &[u8], now: Instant, out: &mut impl Outbox) {
        // Requests come in batches (consecutive ones within a pass of the sender).
        if payload.first() == Some(&proto::BATCH) {
            let mut n = 0;
            for item in proto::batch_items(payload) {
                if item.first() != Some(&proto::BATCH) {
                    self.on_node_message(item, now, out);
                }
                n += 1;
            }
            if let Some(c) = self.cluster.as_mut() {
                c.batch_in(n);
            }
            return;
        }
        let (line, rest) = match memchr::memchr(b'\n', payload) {
            Some(i) => (&payload[..i], &payload[i + 1..]),
            None => (payload, &[][..]),
        };
        if let Some(q) = line.strip_prefix(b"Q ") {
            self.take_request(q, rest, now, out);
        } else if let Some(cid) = line.strip_prefix(b"M ") {
            let to = std::str::from_utf8(cid)
                .ok()
                .and_then(|c| self.cids.get(c).copied());
            if let Some(to) = to {
                let pkt = self.packet_from(rest);
                out.send(to, &pkt);
                self.stats.delivered_pub += 1;
            }
        } else if let Some(cid) = line.strip_prefix(b"U ") {
            let to = std::str::from_utf8(cid)
                .ok()
                .and_then(|c| self.cids.get(c).copied());
            if let Some(s) = to.and_then(|c| self.sessions.get_mut(c).and_then(Option::as_mut)) {
                s.set_uid(rest);
            }
            if let Some(c) = to {
                self.router.set_uid(c, rest);
            }
        } else if line.first().is_some_and(|c| b"GWIYyN".contains(c)) && line.get(1) == Some(&b' ')
        {
            self.on_rooms_message(line, rest, now, out);
        } else if let Some(node) = line.strip_prefix(b"S ") {
            let node = node.to_vec();
            self.send_state_to(Some(&node), now);
        } else if line.starts_with(b"F ") {
            if let Some(c) = self.cluster.as_mut() {
                c.on_ctl(payload, now);
            }
        }
    }
}

impl Broker {
    /// A version 1.1 message from another node (see `cluster::rooms`).
    fn on_rooms_message(&mut self, line: &[u8], rest: &[u8], now: Instant, out: &mut impl Outbox) {
        let Ok(line) = std::str::from_utf8(line) else {
            return;
        };
        let mut w = line.split(' ');
        let tag = w.next().unwrap_or("");
        match tag {
            "G" => {
                let (Some(node), Some(granter), Some(kind), Some(on), Some(cid)) =
                    (w.next(), w.next(), w.next(), w.next(), w.next())
                else {
                    return;
                };
                let Some(kind) = crate::cluster::rooms::kind_from(kind.as_bytes()) else {
                    return;
                };
                let Some(c) = self.cluster.as_mut() else {
                    return;
                };
                let on = on == "1";
                let id = if on {
                    c.granter_id(node, granter)
                } else {
                    match c.granter_id_if_known(node, granter) {
                        Some(id) => id,
                        None => return,
                    }
                };
                let refused = !self.on_remote_grant(id, cid.as_bytes(), kind, on, rest, now, out);
                if let (true, Some(c)) = (refused, self.cluster.as_mut()) {
                    c.grant_refused(node.as_bytes(), granter, kind, rest);
                }
            }
            "W" => {
                let (Some(node), Some(granter)) = (w.next(), w.next()) else {
                    return;
                };
                let id = self
                    .cluster
                    .as_mut()
                    .and_then(|c| c.granter_gone(node, granter));
                if let Some(id) = id {
                    self.router.remove_granter(id);
                }
            }
            "I" => {
                let (Some(op), Some(cid)) = (w.next(), w.next()) else {
                    return;
                };
                let op = op.as_bytes().first().copied().unwrap_or(0);
                self.on_remote_int(op, cid.as_bytes(), rest, now, out);
            }
            "Y" => {
                let (Some(node), Some(id), Some(limit)) = (w.next(), w.next(), w.next()) else {
                    return;
                };
                let (Ok(id), Ok(limit)) = (id.parse::<u64>(), limit.parse::<usize>()) else {
                    return;
                };
                let limit = limit.min(crate::core::rooms::MAX_PRESENCE_LIMIT);
                let local = self.local_presence(rest, limit, true);
                let uids: Vec<Box<[u8]>> = local.uids.into_iter().collect();
                if let Some(c) = self.cluster.as_mut() {
                    let part = crate::cluster::rooms::PresencePart {
                        count: local.count,
                        users: local.users,
                        uids: &uids,
                        lines: &local.lines,
                    };
                    c.answer_presence(node.as_bytes(), id, part);
                }
            }
            "N" => {
                // A grant this node's service made was refused there: tell it.
                let (Some(granter), Some(kind)) = (w.next(), w.next()) else {
                    return;
                };
                let to = self.cids.get(granter).copied();
                let cmd: &[u8] = match kind {
                    "p" => b"EPUB",
                    "s" => b"ESUB",
                    _ => b"EREQ",
                };
                if let Some(to) = to {
                    self.error_to(out, to, cmd, rest, reason::TOO_MANY_GRANTS, None);
                }
            }
            "y" => {
                let (Some(id), Some(node)) = (w.next(), w.next()) else {
                    return;
                };
                let Ok(id) = id.parse::<u64>() else {
                    return;
                };
                let done = self
                    .cluster
                    .as_mut()
                    .and_then(|c| c.on_presence_answer(id, node, rest));
                if let Some(q) = done {
                    self.finish_presence(q, out);
                }
            }
            _ => {}
        }
    }

    /// Grants of services on nodes now gone end; presence queries that are complete
    /// or past their deadline are answered.
    pub(crate) fn rooms_housekeeping(&mut self, now: Instant, out: &mut impl Outbox) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        let gone = c.take_gone_granters();
        let done = c.take_finished_presence(now);
        for id in gone {
            self.router.remove_granter(id);
        }
        for q in done {
            self.finish_presence(q, out);
        }
    }
}

/// The words of a `Q` line: requesting node, its request id, the responder's cid (or
/// `*`), the target and the requester's ReqID (name, and value: the rest of the line,
/// spaces and all).
type QLine<'a> = (&'a str, u64, &'a str, Cow<'a, [u8]>, (&'a [u8], &'a [u8]));

fn parse_q(line: &[u8]) -> Option<QLine<'_>> {
    let mut w = line.splitn(6, |&b| b == b' ');
    let from = std::str::from_utf8(w.next()?).ok()?;
    let id = proto::parse_u64(w.next()?)?;
    let cid = std::str::from_utf8(w.next()?).ok()?;
    let topic = subject::decode_cow(w.next()?)?;
    let name = w.next()?;
    let value = w.next()?;
    Some((from, id, cid, topic, (name, value)))
}
#[cfg(test)]
mod tests {
    //! Brokers joined through an in-process stand-in for nats-server: SUB/UNSUB/PUB parsed
    //! from each node's output, MSG delivered to the nodes whose subscriptions match
    //! (`>` wildcards, one member per queue group, never back to the publisher), and the
    //! no-responders status for a request nobody subscribes.

    use super::*;
    use crate::broker::{Role, Settings};
    use crate::protocol::{Decoded, Decoder, Limits};
    use crate::router::ConnId;
    use std::collections::HashMap;

    type Out = Vec<(ConnId, Rc<Packet>)>;

    /// A subscription: subject and queue group.
    type Subscription = (Vec<u8>, Option<Vec<u8>>);

    struct Bus {
        nodes: Vec<Broker>,
        /// (node, sid) -> subscription
        subs: HashMap<(usize, u64), Subscription>,
        rr: usize,
    }

    fn matches(pattern: &[u8], subject: &[u8]) -> bool {
        let p: Vec<&[u8]> = pattern.split(|&b| b == b'.').collect();
        let s: Vec<&[u8]> = subject.split(|&b| b == b'.').collect();
        for (i, tok) in p.iter().enumerate() {
            if *tok == b">" {
                return s.len() > i;
            }
            if i >= s.len() || (*tok != b"*" && *tok != s[i]) {
                return false;
            }
        }
        p.len() == s.len()
    }

    impl Bus {
        fn new(n: usize) -> Bus {
            Bus::with_ids(&(0..n).map(|i| format!("node0{i}")).collect::<Vec<_>>())
        }

        fn with_ids(ids: &[String]) -> Bus {
            let n = ids.len();
            let now = Instant::now();
            let mut nodes = Vec::new();
            for id in ids {
                let mut b = Broker::new(Settings::default(), id);
                b.join_cluster(id, ClusterSettings::default());
                b.cluster_connected(now, 1 << 20);
                nodes.push(b);
            }
            let mut bus = Bus {
                nodes,
                subs: HashMap::new(),
                rr: 0,
            };
            bus.run(&mut vec![Out::new(); n]);
            bus
        }

        /// Move every node's output through the bus until nothing moves.
        fn run(&mut self, outs: &mut [Out]) {
            let now = Instant::now();
            for _ in 0..100 {
                let mut moved = false;
                for from in 0..self.nodes.len() {
                    self.nodes[from].cluster_before_flush(now);
                    let c = self.nodes[from].cluster.as_mut().unwrap();
                    let bytes = c.take_written();
                    moved |= !bytes.is_empty();
                    self.ops(from, &bytes, now, outs);
                }
                if !moved {
                    return;
                }
            }
            panic!("the bus did not settle");
        }

        fn ops(&mut self, from: usize, mut b: &[u8], now: Instant, outs: &mut [Out]) {
            while !b.is_empty() {
                let eol = b.windows(2).position(|w| w == b"\r\n").unwrap();
                let line = std::str::from_utf8(&b[..eol]).unwrap().to_owned();
                b = &b[eol + 2..];
                let w: Vec<&str> = line.split(' ').collect();
                match w[0] {
                    "SUB" => {
                        let (subject, queue, sid) = match w.len() {
                            3 => (w[1], None, w[2]),
                            _ => (w[1], Some(w[2].as_bytes().to_vec()), w[3]),
                        };
                        self.subs.insert(
                            (from, sid.parse().unwrap()),
                            (subject.as_bytes().to_vec(), queue),
                        );
                    }
                    "UNSUB" => {
                        self.subs.remove(&(from, w[1].parse().unwrap()));
                    }
                    "PUB" => {
                        let (subject, reply, len) = match w.len() {
                            3 => (w[1], None, w[2]),
                            _ => (w[1], Some(w[2]), w[3]),
                        };
                        let len: usize = len.parse().unwrap();
                        let payload = b[..len].to_vec();
                        b = &b[len + 2..];
                        self.deliver(from, subject.as_bytes(), reply, &payload, now, outs);
                    }
                    "CONNECT" | "PING" | "PONG" => {}
                    other => panic!("unexpected op {other}"),
                }
            }
        }

        fn deliver(
            &mut self,
            from: usize,
            subject: &[u8],
            reply: Option<&str>,
            payload: &[u8],
            now: Instant,
            outs: &mut [Out],
        ) {
            let mut targets: Vec<(usize, u64)> = Vec::new();
            let mut groups: HashMap<Vec<u8>, Vec<(usize, u64)>> = HashMap::new();
            let mut keys: Vec<_> = self.subs.keys().copied().collect();
            keys.sort_unstable();
            for k in keys {
                let (pat, q) = &self.subs[&k];
                if k.0 == from || !matches(pat, subject) {
                    continue; // echo off
                }
                match q {
                    Some(q) => groups.entry(q.clone()).or_default().push(k),
                    None => targets.push(k),
                }
            }
            for (_, members) in groups {
                self.rr += 1;
                targets.push(members[self.rr % members.len()]);
            }
            if targets.is_empty() {
                if let Some(reply) = reply {
                    // no responders: status 503 to the reply subject's owner
                    let owner = self
                        .subs
                        .iter()
                        .find(|(_, (p, _))| matches(p, reply.as_bytes()))
                        .map(|(k, _)| *k);
                    if let Some((node, sid)) = owner {
                        let hdr = b"NATS/1.0 503\r\n\r\n";
                        let sid = sid.to_string();
                        let m = proto::Msg {
                            subject: reply.as_bytes(),
                            sid: sid.as_bytes(),
                            reply: None,
                            headers: Some(proto::Headers::parse(hdr)),
                            payload: b"",
                        };
                        self.nodes[node].on_backplane(&m, now, &mut outs[node]);
                    }
                }
                return;
            }
            for (node, sid) in targets {
                let sid = sid.to_string();
                let m = proto::Msg {
                    subject,
                    sid: sid.as_bytes(),
                    reply: reply.map(str::as_bytes),
                    headers: None,
                    payload,
                };
                self.nodes[node].on_backplane(&m, now, &mut outs[node]);
            }
        }

        fn apply(&mut self, node: usize, conn: ConnId, wire: &str, outs: &mut [Out]) {
            apply_only(self, node, conn, wire, outs);
            self.run(outs);
        }
    }

    fn text(p: &Packet) -> String {
        String::from_utf8_lossy(p.payload()).into_owned()
    }

    fn take(out: &mut Out, conn: ConnId) -> Vec<String> {
        let (mine, rest): (Out, Out) = std::mem::take(out)
            .into_iter()
            .partition(|(c, _)| *c == conn);
        *out = rest;
        mine.iter().map(|(_, p)| text(p)).collect()
    }

    #[test]
    fn pub_sub_enablements_requests_and_private_messages_cross_nodes() {
        let mut bus = Bus::new(3);
        let mut outs = vec![Out::new(); 3];
        let svc_a = 0;
        let cid_a = bus.nodes[0].connect(svc_a, Role::Service);
        let cli_b = 0;
        let cid_b = bus.nodes[1].connect(cli_b, Role::Client);
        let sub_c = 0;
        bus.nodes[2].connect(sub_c, Role::Service);
        let mon_c = 1;
        bus.nodes[2].connect(mon_c, Role::Monitor);
        // Heartbeats so nodes know each other.
        for (node, out) in bus.nodes.iter_mut().zip(outs.iter_mut()) {
            node.cluster_tick(Instant::now(), out);
        }
        bus.run(&mut outs);
        // A client on B may not subscribe before A's service enables it.
        bus.apply(1, cli_b, "SUB news\r\n\r\n.\r\n", &mut outs);
        assert!(take(&mut outs[1], cli_b)[0].contains("not permitted"));
        bus.apply(0, svc_a, "ESUB news\r\n\r\n.\r\n", &mut outs);
        bus.apply(0, svc_a, "EREQ ask\r\n\r\n.\r\n", &mut outs);
        bus.apply(1, cli_b, "SUB news\r\n\r\n.\r\n", &mut outs);
        assert!(take(&mut outs[1], cli_b).is_empty(), "accepted");
        bus.apply(2, sub_c, "SUB news\r\n\r\n.\r\n", &mut outs);
        // PUB on A reaches B and C once each, with A's cid.
        bus.apply(0, svc_a, "PUB news\r\n\r\nhello\r\n.\r\n", &mut outs);
        for (n, c) in [(1, cli_b), (2, sub_c)] {
            let got = take(&mut outs[n], c);
            assert_eq!(got.len(), 1, "node {n}: {got:?}");
            assert!(got[0].contains(&format!("cid: {cid_a}")) && got[0].contains("hello"));
        }
        // REQ from the client on B is forwarded to A's responder; the RES comes back.
        bus.apply(
            1,
            cli_b,
            "REQ ask\r\nReqID: q1\r\n\r\nwhat\r\n.\r\n",
            &mut outs,
        );
        let req = take(&mut outs[0], svc_a);
        assert_eq!(req.len(), 1, "{req:?}");
        let rid = req[0]
            .lines()
            .find_map(|l| l.strip_prefix("rid: "))
            .unwrap()
            .to_owned();
        assert!(req[0].contains(&format!("cid: {cid_b}")));
        bus.apply(
            0,
            svc_a,
            &format!("RES ask\r\nrid: {rid}\r\n\r\nthat\r\n.\r\n"),
            &mut outs,
        );
        let res = take(&mut outs[1], cli_b);
        assert_eq!(res.len(), 1, "{res:?}");
        assert!(res[0].starts_with("RES ask\r\n") && res[0].contains("ReqID: q1\r\n"));
        assert!(!res[0].contains("rid:") && res[0].contains(&format!("cid: {cid_a}")));
        // The monitor on C saw the PUB, the REQ and the RES, once each.
        let seen = take(&mut outs[2], mon_c);
        let count = |p: &str| seen.iter().filter(|m| m.starts_with(p)).count();
        assert_eq!(
            (count("PUB news"), count("REQ ask"), count("RES ask")),
            (1, 1, 1),
            "{seen:?}"
        );
        // No responder anywhere: at once.
        bus.apply(1, cli_b, "REQ none\r\nReqID: q2\r\n\r\n.\r\n", &mut outs);
        assert!(take(&mut outs[1], cli_b)[0].contains("no responder"));
        // MSG:<cid> of a client on B, from A.
        bus.apply(
            0,
            svc_a,
            &format!("PUB MSG:{cid_b}\r\n\r\npsst\r\n.\r\n"),
            &mut outs,
        );
        let got = take(&mut outs[1], cli_b);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].contains("psst"));
        // The responder leaves mid-request: the requester on B hears it.
        bus.apply(1, cli_b, "REQ ask\r\nReqID: q3\r\n\r\n.\r\n", &mut outs);
        assert_eq!(take(&mut outs[0], svc_a).len(), 1);
        bus.nodes[0].disconnect(svc_a, &mut outs[0]);
        bus.run(&mut outs);
        let e = take(&mut outs[1], cli_b);
        assert!(
            e[0].contains("responder disconnected") && e[0].contains("ReqID: q3"),
            "{e:?}"
        );
        // And its enablements lapsed on B.
        bus.apply(1, cli_b, "UNS news\r\n\r\n.\r\n", &mut outs);
        bus.apply(1, cli_b, "SUB news\r\n\r\n.\r\n", &mut outs);
        assert!(take(&mut outs[1], cli_b)[0].contains("not permitted"));
        for b in &bus.nodes {
            b.router().check_invariants().unwrap();
        }
    }

    /// Apply `wire` (one message) on `node` without moving the bus.
    fn apply_only(bus: &mut Bus, node: usize, conn: ConnId, wire: &str, outs: &mut [Out]) {
        let mut d = Decoder::new(Limits::default());
        d.feed(wire.as_bytes());
        let Ok(Some(Decoded::Message(m))) = d.next() else {
            panic!("bad test message {wire:?}");
        };
        bus.nodes[node].apply(conn, &m, Instant::now(), &mut outs[node]);
    }

    /// Move what `node` wrote through the bus; returns the PUB lines it wrote.
    fn flush(bus: &mut Bus, node: usize, outs: &mut [Out]) -> Vec<String> {
        let now = Instant::now();
        bus.nodes[node].cluster_before_flush(now);
        let bytes = bus.nodes[node].cluster.as_mut().unwrap().take_written();
        let text = String::from_utf8_lossy(&bytes);
        let pubs = text
            .split("\r\n")
            .filter(|l| l.starts_with("PUB "))
            .map(str::to_owned)
            .collect();
        bus.ops(node, &bytes, now, outs);
        pubs
    }

    #[test]
    fn requests_and_answers_of_one_pass_cross_as_one_batch_and_an_unheard_batch_fails_whole() {
        let mut bus = Bus::new(2);
        let mut outs = vec![Out::new(); 2];
        let svc = 0;
        bus.nodes[0].connect(svc, Role::Service);
        let cli = 0;
        bus.nodes[1].connect(cli, Role::Client);
        for (node, out) in bus.nodes.iter_mut().zip(outs.iter_mut()) {
            node.cluster_tick(Instant::now(), out);
        }
        bus.run(&mut outs);
        bus.apply(0, svc, "EREQ ask\r\n\r\n.\r\n", &mut outs);
        // Three requests in one pass: one NATS message to node00.
        for q in 1..=3 {
            // A ReqID value with spaces crosses as it is.
            let wire = format!("REQ ask\r\nReqID: q {q}\r\n\r\nwhat {q}\r\n.\r\n");
            apply_only(&mut bus, 1, cli, &wire, &mut outs);
        }
        let pubs = flush(&mut bus, 1, &mut outs);
        let to_node: Vec<&String> = pubs.iter().filter(|l| l.contains(".node.")).collect();
        assert_eq!(to_node.len(), 1, "{pubs:?}");
        assert!(
            to_node[0].starts_with("PUB mm.node.node00 mm.inbox.node01.q.node00.1.0"),
            "{to_node:?}"
        );
        let reqs = take(&mut outs[0], svc);
        assert_eq!(reqs.len(), 3, "{reqs:?}");
        // Three answers in one pass: one NATS message back, each to its requester.
        for (i, req) in reqs.iter().enumerate() {
            assert!(req.contains(&format!("what {}", i + 1)), "{req}");
            // As a local REQ is relayed: the sender's headers, cid, uid, then rid.
            let head = req.split("\r\n\r\n").next().unwrap();
            let names: Vec<&str> = head
                .lines()
                .skip(1)
                .map(|l| l.split(':').next().unwrap())
                .collect();
            assert_eq!(names, ["ReqID", "cid", "uid", "rid"], "{req}");
            let rid = req.lines().find_map(|l| l.strip_prefix("rid: ")).unwrap();
            let wire = format!("RES ask\r\nrid: {rid}\r\n\r\nthat {}\r\n.\r\n", i + 1);
            apply_only(&mut bus, 0, svc, &wire, &mut outs);
        }
        let pubs = flush(&mut bus, 0, &mut outs);
        let answers: Vec<&String> = pubs.iter().filter(|l| l.contains(".inbox.")).collect();
        assert_eq!(answers.len(), 1, "{pubs:?}");
        assert!(
            answers[0].starts_with("PUB mm.inbox.node01.a "),
            "{answers:?}"
        );
        let res = take(&mut outs[1], cli);
        assert_eq!(res.len(), 3, "{res:?}");
        for (i, r) in res.iter().enumerate() {
            let q = i + 1;
            assert!(r.contains(&format!("ReqID: q {q}\r\n")) && r.contains(&format!("that {q}")));
        }
        // node00 no longer subscribes its node subject (as if gone from nats-server):
        // the batch gets the no-responders status and both its requests fail at once.
        bus.subs.retain(|_, (p, _)| p != b"mm.node.node00");
        for q in 4..=5 {
            let wire = format!("REQ ask\r\nReqID: q{q}\r\n\r\n.\r\n");
            apply_only(&mut bus, 1, cli, &wire, &mut outs);
        }
        flush(&mut bus, 1, &mut outs);
        let e = take(&mut outs[1], cli);
        assert_eq!(e.len(), 2, "{e:?}");
        for (i, m) in e.iter().enumerate() {
            let q = i + 4;
            assert!(
                m.contains("no responder") && m.contains(&format!("ReqID: q{q}")),
                "{m}"
            );
        }
        assert_eq!(
            bus.nodes[1].cluster.as_ref().unwrap().out_request_count(),
            0
        );
    }

    #[test]
    fn two_processes_with_one_id_end_with_two_ids_and_working_private_messages() {
        let mut bus = Bus::with_ids(&["same01".into(), "same01".into(), "other1".into()]);
        let mut outs = vec![Out::new(); 3];
        // Heartbeats (due a period on): each hears the other under its own id; the one
        // with the higher nonce takes a new id.
        let later = Instant::now() + std::time::Duration::from_millis(1500);
        for (node, out) in bus.nodes.iter_mut().zip(outs.iter_mut()) {
            node.cluster_tick(later, out);
        }
        bus.run(&mut outs);
        let ids: Vec<String> = bus
            .nodes
            .iter()
            .map(|b| b.cluster.as_ref().unwrap().node.to_string())
            .collect();
        assert_ne!(ids[0], ids[1], "{ids:?}");
        assert!(ids[0] == "same01" || ids[1] == "same01", "{ids:?}");
        let renamed = usize::from(ids[1] != "same01");
        // New connections there get cids under the new id; the old connection keeps its
        // cid and is still reachable from the third node.
        let new_cid = bus.nodes[renamed].connect(1, Role::Client);
        assert!(new_cid.starts_with(&ids[renamed]), "{new_cid}");
        let later = later + std::time::Duration::from_millis(1500);
        for (node, out) in bus.nodes.iter_mut().zip(outs.iter_mut()) {
            node.cluster_tick(later, out);
        }
        bus.run(&mut outs);
        assert_eq!(bus.nodes[2].cluster.as_ref().unwrap().node_count(), 2);
        bus.nodes[2].connect(0, Role::Service);
        bus.apply(
            2,
            0,
            &format!("PUB MSG:{new_cid}\r\n\r\nhi\r\n.\r\n"),
            &mut outs,
        );
        let got = take(&mut outs[renamed], 1);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].contains("hi"));
        // And one on the node that kept the id, once, there only.
        let kept = 1 - renamed;
        let kept_cid = bus.nodes[kept].connect(1, Role::Client);
        assert!(kept_cid.starts_with("same01"), "{kept_cid}");
        bus.apply(
            2,
            0,
            &format!("PUB MSG:{kept_cid}\r\n\r\nho\r\n.\r\n"),
            &mut outs,
        );
        let got = take(&mut outs[kept], 1);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(take(&mut outs[renamed], 1).is_empty());
    }
}
