//! The broker's side of the cluster: what a message from another node means here, and
//! what the node tells the others when its own tables change. Pure, like the broker.

use std::rc::Rc;
use std::time::Instant;

use crate::broker::{reason, relay_packet, Broker, Origin, Outbox};
use crate::cluster::node::{Cluster, ClusterSettings, Sid, REMOTE};
use crate::cluster::proto;
use crate::protocol::{Decoded, Decoder, Limits, Message, Packet};
use crate::router::{Enable, Held};

impl Broker {
    /// Make this broker a cluster node (its id is its cid prefix).
    pub fn join_cluster(&mut self, node: &str, settings: ClusterSettings) {
        self.cluster = Some(Box::new(Cluster::new(node, settings)));
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
    pub(crate) fn answer_remote(&mut self, rid: u64, head: &[u8], payload: &[u8]) {
        if let Some(c) = self.cluster.as_mut() {
            if let Some(reply) = c.end_in_request(rid) {
                c.answer(&reply, head, payload);
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
                (!t.responders.is_empty(), Enable::Req),
            ] {
                if held {
                    v.push((&t.name[..], kind));
                }
            }
        }
        v
    }

    fn send_state_to(&mut self, to: Option<&[u8]>) {
        let mut c = self.cluster.take();
        if let Some(c) = c.as_mut() {
            c.send_state(to, self.local_enablements().into_iter());
        }
        self.cluster = c;
    }

    /// The backplane connection came up: subscribe, say hello, publish the state.
    pub fn cluster_connected(&mut self, now: Instant, max_payload: usize) {
        let monitors = !self.monitors.is_empty();
        if let Some(c) = self.cluster.as_mut() {
            c.max_payload = max_payload;
            c.monitors(monitors);
            c.on_connected(now);
        }
        self.send_state_to(None);
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
        let router = &self.router;
        c.unsubscribe_due(now, |t| !router.subscribers(t).is_empty());
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
    }

    fn fail_forwarded(
        &mut self,
        r: &crate::cluster::node::OutReq,
        why: &'static str,
        out: &mut impl Outbox,
    ) {
        if self.cid(r.requester) != Some(&*r.cid) {
            return; // the requester left
        }
        let i = reason::ALL.iter().position(|x| *x == why);
        if let Some(i) = i {
            self.stats.errors[i] += 1;
        }
        let pkt = crate::broker::error_packet(
            b"REQ",
            &r.target,
            why,
            Some((&r.reqid_name, &r.reqid_value)),
        );
        out.send(r.requester, &Rc::new(pkt));
    }

    /// One message from the backplane (a MSG or HMSG for one of the node's subscriptions).
    pub fn on_backplane(&mut self, msg: &proto::Msg<'_>, now: Instant, out: &mut impl Outbox) {
        let (subject, reply, payload) = (msg.subject, msg.reply, msg.payload);
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
                let subs = self.router.subscribers(&topic);
                if subs.is_empty() {
                    return;
                }
                let pkt = self.packet_from(payload);
                for &s in self.router.subscribers(&topic) {
                    out.send(s, &pkt);
                }
                self.stats.delivered_pub += self.router.subscribers(&topic).len() as u64;
            }
            Sid::MonPub => {
                let Some(topic) = c.pub_topic(subject) else {
                    return;
                };
                if self.monitors.is_empty() {
                    return;
                }
                let pkt = self.packet_from(payload);
                let id = self.router.lookup(&topic);
                for &m in &self.monitors {
                    if !id.is_some_and(|t| self.router.is_subscribed_id(m, t)) {
                        out.send(m, &pkt);
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
            Sid::Req(topic) => {
                if let Some(reply) = reply {
                    self.take_request(&topic, reply, payload, now, out);
                }
            }
            Sid::Inbox => self.on_inbox(subject, payload, no_responders, out),
            Sid::Node => self.on_node_message(payload, now, out),
            Sid::Ctl => {
                if let Some(node) = c.on_ctl(payload, now) {
                    self.send_state_to(Some(node.as_bytes()));
                }
            }
        }
    }

    /// A packet holding a message another node relayed (its bytes as they are).
    fn packet_from(&mut self, payload: &[u8]) -> Rc<Packet> {
        self.pool
            .build(payload.len(), false, |b| b.extend_from_slice(payload))
    }

    /// Run `f` on the one message `payload` holds (relayed by another node), if it is
    /// one well-formed message.
    fn with_remote_message<R>(
        &mut self,
        payload: &[u8],
        f: impl FnOnce(&mut Broker, &Message<'_>) -> R,
    ) -> Option<R> {
        let limits = self.decoder_limits();
        let mut dec = self
            .remote_dec
            .take()
            .unwrap_or_else(|| Box::new(Decoder::new(limits)));
        dec.feed(payload);
        let r = match dec.next() {
            Ok(Some(Decoded::Message(m))) => Some(f(self, &m)),
            _ => None,
        };
        // Whatever it held is dropped: a fresh decoder for the next one if this one
        // failed or kept bytes.
        if dec.failed().is_none() && !dec.needs_more() {
            dec.shrink();
            self.remote_dec = Some(dec);
        }
        r
    }

    /// Limits for messages from other nodes: they were checked by the node that took
    /// them; these only bound what a broken peer could make this one hold.
    fn decoder_limits(&self) -> Limits {
        Limits {
            max_message: 64 << 20,
            max_line: 64 << 20,
            max_headers: 1024,
        }
    }

    /// A request another node forwarded: give it to a local responder and tell that
    /// node it was taken (or that nobody here answers any more).
    fn take_request(
        &mut self,
        topic: &[u8],
        reply: &[u8],
        payload: &[u8],
        now: Instant,
        out: &mut impl Outbox,
    ) {
        let deadline = now + self.settings.request_timeout;
        let taken = self.with_remote_message(payload, |b, msg| {
            let (name, value) = msg.header("ReqID")?;
            let (responder, rid) = b
                .router
                .start_request(REMOTE, topic, name, value, deadline)?;
            let mut digits = [0u8; 20];
            let rid_text = fmt_rid(rid, &mut digits);
            let pkt = relay_packet(
                &mut b.pool,
                Origin::Remote,
                msg,
                &[b"rid"],
                Some((b"rid", rid_text)),
            );
            out.send(responder, &pkt);
            b.stats.delivered_req += 1;
            for &m in &b.monitors {
                if m != responder {
                    out.send(m, &pkt);
                }
            }
            Some(rid)
        });
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        match taken.flatten() {
            Some(rid) => c.took(rid, reply),
            None => c.answer(reply, b"X ", reason::NO_RESPONDER.as_bytes()),
        }
    }

    /// An answer about a request this node forwarded.
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
        let Some(id) = c.inbox_id(subject) else {
            return;
        };
        if no_responders {
            if let Some(r) = c.end_out_request(id) {
                self.stats.req_no_responder += 1;
                self.fail_forwarded(&r, reason::NO_RESPONDER, out);
            }
            return;
        }
        if let Some(node) = payload.strip_prefix(b"T ") {
            if let (Some(r), Ok(node)) = (c.out_request(id), std::str::from_utf8(node)) {
                r.taken_by = Some(node.into());
            }
        } else if let Some(why) = payload.strip_prefix(b"X ") {
            if let Some(r) = c.end_out_request(id) {
                let why = match why {
                    b"responder disconnected" => reason::RESPONDER_GONE,
                    _ => reason::NO_RESPONDER,
                };
                match why {
                    reason::RESPONDER_GONE => self.stats.req_responder_gone += 1,
                    _ => self.stats.req_no_responder += 1,
                }
                self.fail_forwarded(&r, why, out);
            }
        } else if let Some(res) = payload.strip_prefix(b"R\n") {
            let Some(r) = c.end_out_request(id) else {
                return; // late: dropped silently (§6.5)
            };
            if self.cid(r.requester) != Some(&*r.cid) {
                return;
            }
            self.stats.req_answered += 1;
            self.with_remote_message(res, |b, msg| {
                let pkt = relay_packet(
                    &mut b.pool,
                    Origin::Remote,
                    msg,
                    &[b"rid", b"reqid"],
                    Some((&r.reqid_name, &r.reqid_value)),
                );
                out.send(r.requester, &pkt);
                b.stats.delivered_res += 1;
            });
        }
    }

    /// A message for this node alone: a private message, a uid, a state request or a
    /// full state.
    fn on_node_message(&mut self, payload: &[u8], now: Instant, out: &mut impl Outbox) {
        let (line, rest) = match memchr::memchr(b'\n', payload) {
            Some(i) => (&payload[..i], &payload[i + 1..]),
            None => (payload, &[][..]),
        };
        if let Some(cid) = line.strip_prefix(b"M ") {
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
        } else if let Some(node) = line.strip_prefix(b"S ") {
            let node = node.to_vec();
            self.send_state_to(Some(&node));
        } else if line.starts_with(b"F ") {
            if let Some(c) = self.cluster.as_mut() {
                c.on_ctl(payload, now);
            }
        }
    }
}

fn fmt_rid(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}
