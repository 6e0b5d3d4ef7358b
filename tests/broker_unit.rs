//! Pure tests of the broker (PROTOCOL.md §3-§7), no sockets.
//!
//! Every input is built as wire bytes and decoded with the crate's own `Decoder`, exactly
//! as the reactor does; every packet the broker hands to the outbox is decoded back and
//! checked. `Router::check_invariants` runs after every single step (connect, apply,
//! disconnect, expire) of every test.
//!
//! Error reasons that PROTOCOL.md spells out (`no responder`, `request timed out`,
//! `responder disconnected`) are written literally; the others come from
//! `middleman::broker::reason`, since the protocol only fixes the error's shape.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use middleman::broker::{reason, Broker, Role, Settings};
use middleman::protocol::{Decoded, Decoder, Limits, Packet};
use middleman::router::{ConnId, Enable};

const TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

mod common;

/// One message as a receiver sees it (the harness' owned message type).
type M = common::Msg;

/// What these tests ask of a message beyond the harness' accessors.
trait MsgExt {
    /// Every header named `name` (case-insensitive), as (spelling, value).
    fn named(&self, name: &str) -> Vec<(&str, &str)>;
    /// The headers other than those named in `skip` (case-insensitive), in order.
    fn without(&self, skip: &[&str]) -> Vec<(&str, &str)>;
    /// A §7 error message.
    fn is_error(&self) -> bool;
}

impl MsgExt for M {
    fn named(&self, name: &str) -> Vec<(&str, &str)> {
        self.headers_named(name)
    }

    fn without(&self, skip: &[&str]) -> Vec<(&str, &str)> {
        self.headers
            .iter()
            .filter(|(n, _)| !skip.iter().any(|s| n.eq_ignore_ascii_case(s)))
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect()
    }

    fn is_error(&self) -> bool {
        self.cmd == "PUB" && self.target == "ERROR"
    }
}

/// Decode one outgoing packet; it must hold exactly one message, CRLF-terminated.
fn parse(pkt: &Packet) -> M {
    let payload = pkt.payload();
    assert!(
        payload.ends_with(b"\r\n.\r\n"),
        "output must end with CRLF . CRLF: {:?}",
        String::from_utf8_lossy(payload)
    );
    common::parse_one(payload)
}

/// Wire bytes of one message (CRLF, dot-stuffed body; LF inside the body kept as given).
fn wire(cmd: &str, target: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    common::wire(cmd, target, headers, body).into_bytes()
}

type Out = Vec<(ConnId, M)>;

/// A broker plus bookkeeping; every step checks the router's invariants.
struct H {
    b: Broker,
    now: Instant,
    next_id: ConnId,
    cids: HashMap<ConnId, String>,
}

impl H {
    fn new() -> H {
        H::with(Settings {
            request_timeout: TIMEOUT,
            ..Settings::default()
        })
    }

    fn with(settings: Settings) -> H {
        H {
            b: Broker::new(settings, "tp"),
            now: Instant::now(),
            next_id: 0,
            cids: HashMap::new(),
        }
    }

    fn check(&self) {
        if let Err(e) = self.b.router().check_invariants() {
            panic!("router invariant broken: {e}");
        }
    }

    fn connect(&mut self, role: Role) -> ConnId {
        let id = self.next_id;
        self.next_id += 1;
        self.connect_id(id, role);
        id
    }

    /// Admit connection `id` (a slab key the reactor may reuse after a disconnect).
    fn connect_id(&mut self, id: ConnId, role: Role) {
        let cid = self.b.connect(id, role);
        assert!(
            !cid.is_empty()
                && cid
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "cid {cid:?} is not [0-9a-z]+"
        );
        assert!(
            !self.cids.values().any(|c| *c == cid),
            "cid {cid} handed out twice"
        );
        assert_eq!(self.b.cid(id), Some(cid.as_str()));
        assert_eq!(self.b.role(id), Some(role));
        self.cids.insert(id, cid);
        self.check();
    }

    fn cid(&self, c: ConnId) -> String {
        self.cids[&c].clone()
    }

    /// Feed raw stream bytes from `from` and apply every message in them, in order.
    fn feed(&mut self, from: ConnId, bytes: &[u8]) -> Out {
        let mut d = Decoder::new(Limits::default());
        d.feed(bytes);
        let mut raw = Vec::new();
        loop {
            match d.next() {
                Ok(Some(Decoded::Message(m))) => self.b.apply(from, &m, self.now, &mut raw),
                Ok(Some(Decoded::Malformed(m))) => self.b.malformed(from, &m, &mut raw),
                Ok(None) => break,
                Err(e) => panic!("test input does not decode: {e}"),
            }
            self.check();
        }
        assert!(!d.needs_more(), "test input ends inside a message");
        raw.iter().map(|(c, p)| (*c, parse(p))).collect()
    }

    fn send(
        &mut self,
        from: ConnId,
        cmd: &str,
        target: &str,
        hdrs: &[(&str, &str)],
        body: &str,
    ) -> Out {
        self.feed(from, &wire(cmd, target, hdrs, body))
    }

    /// Send a command that must be accepted silently (SUB, UNS, EPUB, ESUB, EREQ, INT).
    fn ok(&mut self, from: ConnId, cmd: &str, target: &str) {
        let out = self.send(from, cmd, target, &[], "");
        assert!(
            out.is_empty(),
            "{cmd} {target} from {from}: unexpected {out:?}"
        );
    }

    fn leave(&mut self, c: ConnId) -> Out {
        let mut raw = Vec::new();
        self.b.disconnect(c, &mut raw);
        self.check();
        assert!(!self.b.router().has_conn(c));
        assert_eq!(self.b.cid(c), None);
        raw.iter().map(|(c, p)| (*c, parse(p))).collect()
    }

    fn expire(&mut self, at: Instant) -> Out {
        let mut raw = Vec::new();
        self.b.expire(at, &mut raw);
        self.check();
        raw.iter().map(|(c, p)| (*c, parse(p))).collect()
    }

    /// A REQ with `ReqID: <reqid>` that must be delivered; returns (responder, REQ as seen).
    fn request(&mut self, from: ConnId, target: &str, reqid: &str) -> (ConnId, M) {
        let out = self.send(from, "REQ", target, &[("ReqID", reqid)], reqid);
        let to_non_monitors: Vec<_> = out
            .iter()
            .filter(|(c, _)| self.b.role(*c) != Some(Role::Monitor))
            .collect();
        assert_eq!(to_non_monitors.len(), 1, "REQ {target}: {out:?}");
        let (to, m) = to_non_monitors[0].clone();
        assert_eq!(m.cmd, "REQ");
        assert_eq!(m.target, target);
        (to, m)
    }

    /// Answer a delivered REQ with its rid; returns what was sent out.
    fn answer(&mut self, responder: ConnId, req: &M, body: &str) -> Out {
        let rid = req.header("rid").expect("REQ carries rid").to_owned();
        self.send(responder, "RES", &req.target, &[("rid", &rid)], body)
    }
}

/// The messages `out` holds for `c`.
fn for_conn(out: &Out, c: ConnId) -> Vec<&M> {
    out.iter()
        .filter(|(to, _)| *to == c)
        .map(|(_, m)| m)
        .collect()
}

/// Receivers in `out`, sorted, with repeats.
fn receivers(out: &Out) -> Vec<ConnId> {
    let mut v: Vec<ConnId> = out.iter().map(|(c, _)| *c).collect();
    v.sort_unstable();
    v
}

/// `m` is the §7 error for `CMD TARGET` with `why`.
fn assert_error(m: &M, cmd: &str, target: &str, why: &str) {
    assert!(m.is_error(), "expected PUB ERROR, got {m:?}");
    // Exactly one of each, spelled in lower case (server-added names, §3/§7).
    assert_eq!(m.named("cmd"), vec![("cmd", cmd)], "cmd header of {m:?}");
    assert_eq!(
        m.named("target"),
        vec![("target", target)],
        "target header of {m:?}"
    );
    assert_eq!(
        m.named("reason"),
        vec![("reason", why)],
        "reason header of {m:?}"
    );
    assert_eq!(m.body, format!("{why}: {cmd} {target}"), "body of {m:?}");
}

/// `out` is exactly one §7 error, to `to`, for `CMD TARGET` with `why`.
fn assert_refused(out: &Out, to: ConnId, cmd: &str, target: &str, why: &str) {
    assert_eq!(out.len(), 1, "expected exactly one error, got {out:?}");
    assert_eq!(out[0].0, to, "error went to the wrong connection: {out:?}");
    assert_error(&out[0].1, cmd, target, why);
}

/// A client REQ on a target nobody req-enabled is refused by §4 (not req-enabled) and
/// §6.2 (no responder) at once; PROTOCOL.md does not say which reason wins, so both
/// are accepted. Returns the reason given.
fn assert_client_req_refused(out: &Out, to: ConnId, target: &str) -> String {
    assert_eq!(out.len(), 1, "expected exactly one error, got {out:?}");
    assert_eq!(out[0].0, to, "error went to the wrong connection: {out:?}");
    let why = out[0].1.header("reason").unwrap_or("").to_owned();
    assert!(
        why == reason::NOT_PERMITTED || why == reason::NO_RESPONDER,
        "unexpected reason {why:?}"
    );
    assert_error(&out[0].1, "REQ", target, &why);
    why
}

/// A broker with one service (0) and one client (1).
fn svc_cli() -> (H, ConnId, ConnId) {
    let mut h = H::new();
    let s = h.connect(Role::Service);
    let c = h.connect(Role::Client);
    (h, s, c)
}

// ---------------------------------------------------------------------------------------
// §4 SUB
// ---------------------------------------------------------------------------------------

#[test]
fn sub_service_any_topic_without_enablement() {
    let (mut h, s, _c) = svc_cli();
    let s2 = h.connect(Role::Service);
    h.ok(s, "SUB", "free");
    assert!(h.b.router().is_subscribed(s, b"free"));
    let out = h.send(s2, "PUB", "free", &[], "x");
    assert_eq!(receivers(&out), vec![s]);
    assert_eq!(out[0].1.body, "x");
}

#[test]
fn sub_service_may_subscribe_to_another_private_channel() {
    // "service: any t" includes MSG:<cid> of another connection.
    let (mut h, s, c) = svc_cli();
    let s2 = h.connect(Role::Service);
    let private = format!("MSG:{}", h.cid(c));
    h.ok(s2, "SUB", &private);
    let out = h.send(s, "PUB", &private, &[], "hi");
    assert_eq!(receivers(&out), vec![c, s2]);
}

#[test]
fn sub_client_allowed_when_sub_enabled() {
    let (mut h, s, c) = svc_cli();
    h.ok(s, "ESUB", "news");
    h.ok(c, "SUB", "news");
    assert!(h.b.router().is_subscribed(c, b"news"));
    let out = h.send(s, "PUB", "news", &[], "n1");
    assert_eq!(receivers(&out), vec![c]);
    assert_eq!(out[0].1.cmd, "PUB");
    assert_eq!(out[0].1.target, "news");
    assert_eq!(out[0].1.body, "n1");
}

#[test]
fn sub_client_refused_when_not_enabled_and_nothing_processed() {
    let (mut h, s, c) = svc_cli();
    let out = h.send(c, "SUB", "news", &[], "");
    assert_refused(&out, c, "SUB", "news", reason::NOT_PERMITTED);
    assert!(!h.b.router().is_subscribed(c, b"news"));
    assert_eq!(h.b.router().subscription_count(c), 1, "only MSG:<cid>");
    // Enabling afterwards does not resurrect the refused SUB.
    h.ok(s, "ESUB", "news");
    let out = h.send(s, "PUB", "news", &[], "n1");
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn sub_client_refused_when_only_pub_or_req_enabled() {
    let (mut h, s, c) = svc_cli();
    h.ok(s, "EPUB", "news");
    h.ok(s, "EREQ", "news");
    let out = h.send(c, "SUB", "news", &[], "");
    assert_refused(&out, c, "SUB", "news", reason::NOT_PERMITTED);
    assert!(!h.b.router().is_subscribed(c, b"news"));
}

#[test]
fn sub_is_idempotent_for_service_and_client() {
    let (mut h, s, c) = svc_cli();
    h.ok(s, "ESUB", "t");
    for _ in 0..3 {
        h.ok(s, "SUB", "t");
        h.ok(c, "SUB", "t");
    }
    assert_eq!(h.b.router().subscription_count(s), 2);
    assert_eq!(h.b.router().subscription_count(c), 2);
    assert_eq!(h.b.router().subscribers(b"t").len(), 2);
    let out = h.send(s, "PUB", "t", &[], "once");
    assert_eq!(receivers(&out), vec![s, c], "each subscriber exactly once");
    // One UNS undoes any number of SUBs.
    h.ok(c, "UNS", "t");
    let out = h.send(s, "PUB", "t", &[], "again");
    assert_eq!(receivers(&out), vec![s]);
}

// ---------------------------------------------------------------------------------------
// §4 UNS
// ---------------------------------------------------------------------------------------

#[test]
fn uns_service_and_client_stop_delivery() {
    let (mut h, s, c) = svc_cli();
    let s2 = h.connect(Role::Service);
    h.ok(s, "ESUB", "t");
    h.ok(s2, "SUB", "t");
    h.ok(c, "SUB", "t");
    h.ok(s2, "UNS", "t");
    h.ok(c, "UNS", "t");
    assert!(!h.b.router().is_subscribed(s2, b"t"));
    assert!(!h.b.router().is_subscribed(c, b"t"));
    let out = h.send(s, "PUB", "t", &[], "x");
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn uns_when_not_subscribed_is_a_silent_noop() {
    let (mut h, s, c) = svc_cli();
    let topics_before = h.b.router().topic_count();
    // Never subscribed, never enabled: no error for anyone, even a client.
    h.ok(s, "UNS", "never");
    h.ok(c, "UNS", "never");
    h.ok(c, "UNS", "never");
    assert_eq!(h.b.router().topic_count(), topics_before);
    // Subscribed by someone else: the other subscription is untouched.
    h.ok(s, "SUB", "t");
    h.ok(c, "UNS", "t");
    assert!(h.b.router().is_subscribed(s, b"t"));
    assert_eq!(h.b.router().subscription_count(c), 1);
}

// ---------------------------------------------------------------------------------------
// §4 PUB
// ---------------------------------------------------------------------------------------

#[test]
fn pub_service_any_topic_reaches_every_subscriber_once_sender_included() {
    let (mut h, s, c) = svc_cli();
    let s2 = h.connect(Role::Service);
    let c2 = h.connect(Role::Client);
    h.ok(s2, "ESUB", "t");
    h.ok(s, "SUB", "t");
    h.ok(s2, "SUB", "t");
    h.ok(c, "SUB", "t");
    // c2 not subscribed.
    let out = h.send(s, "PUB", "t", &[("X-A", "1")], "hello");
    let mut want = vec![s, s2, c];
    want.sort_unstable();
    assert_eq!(receivers(&out), want);
    assert!(for_conn(&out, c2).is_empty());
    for (_, m) in &out {
        assert_eq!(m.cmd, "PUB");
        assert_eq!(m.target, "t");
        assert_eq!(m.body, "hello");
        assert_eq!(m.header("X-A"), Some("1"));
        assert_eq!(m.header("cid"), Some(h.cid(s).as_str()));
    }
}

#[test]
fn pub_service_on_topic_nobody_enabled() {
    let (mut h, s, _c) = svc_cli();
    let s2 = h.connect(Role::Service);
    h.ok(s2, "SUB", "internal");
    let out = h.send(s, "PUB", "internal", &[], "x");
    assert_eq!(receivers(&out), vec![s2]);
}

#[test]
fn pub_with_no_subscriber_goes_nowhere_without_error() {
    let (mut h, s, c) = svc_cli();
    h.ok(s, "EPUB", "t");
    assert!(h.send(s, "PUB", "t", &[], "x").is_empty());
    assert!(h.send(c, "PUB", "t", &[], "x").is_empty());
}

#[test]
fn pub_client_allowed_when_pub_enabled() {
    let (mut h, s, c) = svc_cli();
    h.ok(s, "EPUB", "up");
    h.ok(s, "SUB", "up");
    let out = h.send(c, "PUB", "up", &[("k", "v")], "from client");
    assert_eq!(receivers(&out), vec![s]);
    let m = &out[0].1;
    assert_eq!((m.cmd.as_str(), m.target.as_str()), ("PUB", "up"));
    assert_eq!(m.body, "from client");
    assert_eq!(m.header("cid"), Some(h.cid(c).as_str()));
    assert_eq!(m.header("uid"), Some(""));
}

#[test]
fn pub_client_refused_when_not_enabled_and_nothing_delivered() {
    let (mut h, s, c) = svc_cli();
    let c2 = h.connect(Role::Client);
    h.ok(s, "SUB", "up");
    h.ok(s, "ESUB", "up");
    h.ok(c2, "SUB", "up");
    let out = h.send(c, "PUB", "up", &[], "x");
    assert_refused(&out, c, "PUB", "up", reason::NOT_PERMITTED);
}

#[test]
fn refused_message_error_carries_its_reqid_whatever_the_command() {
    let (mut h, _s, c) = svc_cli();
    let out = h.send(c, "PUB", "closed", &[("reqid", "p-1")], "");
    assert_refused(&out, c, "PUB", "closed", reason::NOT_PERMITTED);
    assert_eq!(out[0].1.header("ReqID"), Some("p-1"));
    let out = h.send(c, "SUB", "closed", &[], "");
    assert_refused(&out, c, "SUB", "closed", reason::NOT_PERMITTED);
    assert_eq!(
        out[0].1.header("ReqID"),
        None,
        "no ReqID when the message had none"
    );
}

#[test]
fn pub_client_refused_when_only_sub_or_req_enabled() {
    let (mut h, s, c) = svc_cli();
    h.ok(s, "ESUB", "up");
    h.ok(s, "EREQ", "up");
    h.ok(s, "SUB", "up");
    h.ok(c, "SUB", "up");
    let out = h.send(c, "PUB", "up", &[], "x");
    assert_refused(&out, c, "PUB", "up", reason::NOT_PERMITTED);
}

// ---------------------------------------------------------------------------------------
// §4 REQ
// ---------------------------------------------------------------------------------------

#[test]
fn req_service_allowed_on_any_target_with_a_responder() {
    let (mut h, s, _c) = svc_cli();
    let r = h.connect(Role::Service);
    h.ok(r, "EREQ", "q");
    let (to, m) = h.request(s, "q", "1");
    assert_eq!(to, r);
    assert_eq!(m.header("cid"), Some(h.cid(s).as_str()));
    assert_eq!(h.b.router().pending_count(), 1);
}

#[test]
fn req_service_without_responder_gets_no_responder_not_a_refusal() {
    let (mut h, s, _c) = svc_cli();
    let out = h.send(s, "REQ", "q", &[("ReqID", "r1")], "");
    assert_refused(&out, s, "REQ", "q", "no responder");
    assert_eq!(out[0].1.header("ReqID"), Some("r1"));
    assert_eq!(h.b.router().pending_count(), 0);
}

#[test]
fn req_client_allowed_when_req_enabled() {
    let (mut h, s, c) = svc_cli();
    h.ok(s, "EREQ", "q");
    let (to, m) = h.request(c, "q", "c-1");
    assert_eq!(to, s);
    assert_eq!(m.header("ReqID"), Some("c-1"));
    assert_eq!(m.header("cid"), Some(h.cid(c).as_str()));
    assert!(m.header("rid").is_some());
}

#[test]
fn req_client_refused_when_not_enabled() {
    let (mut h, s, c) = svc_cli();
    h.ok(s, "EPUB", "q");
    h.ok(s, "ESUB", "q");
    let out = h.send(c, "REQ", "q", &[("ReqID", "7")], "");
    assert_client_req_refused(&out, c, "q");
    assert_eq!(
        out[0].1.header("ReqID"),
        Some("7"),
        "error carries the ReqID"
    );
    assert_eq!(h.b.router().pending_count(), 0);
}

// ---------------------------------------------------------------------------------------
// §4 RES
// ---------------------------------------------------------------------------------------

#[test]
fn res_from_the_responder_is_routed_back() {
    let (mut h, s, c) = svc_cli();
    h.ok(s, "EREQ", "q");
    let (_, req) = h.request(c, "q", "a");
    let out = h.answer(s, &req, "answer");
    assert_eq!(receivers(&out), vec![c]);
    assert_eq!(out[0].1.cmd, "RES");
    assert_eq!(out[0].1.target, "q");
    assert_eq!(out[0].1.body, "answer");
    assert_eq!(h.b.router().pending_count(), 0);
}

#[test]
fn res_from_another_service_is_refused() {
    let (mut h, s, c) = svc_cli();
    let other = h.connect(Role::Service);
    h.ok(s, "EREQ", "q");
    let (_, req) = h.request(c, "q", "a");
    let rid = req.header("rid").unwrap().to_owned();
    let out = h.send(other, "RES", "q", &[("rid", &rid)], "forged");
    assert_refused(&out, other, "RES", "q", reason::NOT_YOUR_REQUEST);
    assert_eq!(h.b.router().pending_count(), 1, "still pending");
    // The real responder still answers.
    let out = h.answer(s, &req, "real");
    assert_eq!(receivers(&out), vec![c]);
    assert_eq!(out[0].1.body, "real");
}

#[test]
fn res_from_a_client_is_refused() {
    let (mut h, s, c) = svc_cli();
    let c2 = h.connect(Role::Client);
    h.ok(s, "EREQ", "q");
    let (_, req) = h.request(c, "q", "a");
    let rid = req.header("rid").unwrap().to_owned();
    for who in [c, c2] {
        let out = h.send(who, "RES", "q", &[("rid", &rid)], "forged");
        assert_refused(&out, who, "RES", "q", reason::NOT_YOUR_REQUEST);
    }
    assert_eq!(h.b.router().pending_count(), 1);
    let out = h.answer(s, &req, "real");
    assert_eq!(receivers(&out), vec![c]);
}

#[test]
fn res_from_a_client_with_unknown_rid_is_dropped_silently() {
    let (mut h, _s, c) = svc_cli();
    assert!(h.send(c, "RES", "q", &[("rid", "424242")], "x").is_empty());
    assert!(h
        .send(c, "RES", "q", &[("rid", "not-a-number")], "x")
        .is_empty());
}

// ---------------------------------------------------------------------------------------
// §4 EPUB / ESUB / EREQ
// ---------------------------------------------------------------------------------------

#[test]
fn enable_commands_by_a_service_are_silent_and_take_effect() {
    let (mut h, s, _c) = svc_cli();
    h.ok(s, "EPUB", "t");
    assert!(h.b.router().is_enabled(b"t", Enable::Pub));
    assert!(!h.b.router().is_enabled(b"t", Enable::Sub));
    h.ok(s, "ESUB", "t");
    assert!(h.b.router().is_enabled(b"t", Enable::Sub));
    assert!(!h.b.router().is_enabled(b"t", Enable::Req));
    h.ok(s, "EREQ", "t");
    assert!(h.b.router().is_enabled(b"t", Enable::Req));
    // Repeating them is harmless.
    h.ok(s, "EPUB", "t");
    h.ok(s, "ESUB", "t");
    h.ok(s, "EREQ", "t");
    let t = h.b.router().lookup(b"t").unwrap();
    let topic = h.b.router().topic(t).unwrap();
    assert_eq!(topic.responders.len(), 1, "EREQ twice registers once");
}

#[test]
fn enable_commands_by_a_client_are_refused_and_have_no_effect() {
    let (mut h, s, c) = svc_cli();
    let c2 = h.connect(Role::Client);
    for cmd in ["EPUB", "ESUB", "EREQ"] {
        let out = h.send(c, cmd, "t", &[], "");
        assert_refused(&out, c, cmd, "t", reason::NOT_PERMITTED);
    }
    for kind in [Enable::Pub, Enable::Sub, Enable::Req] {
        assert!(!h.b.router().is_enabled(b"t", kind), "{kind:?}");
    }
    let out = h.send(c2, "SUB", "t", &[], "");
    assert_refused(&out, c2, "SUB", "t", reason::NOT_PERMITTED);
    let out = h.send(c2, "PUB", "t", &[], "");
    assert_refused(&out, c2, "PUB", "t", reason::NOT_PERMITTED);
    // The client is not a responder either: a service REQ finds nobody.
    let out = h.send(s, "REQ", "t", &[("ReqID", "1")], "");
    assert_refused(&out, s, "REQ", "t", "no responder");
}

#[test]
fn monitor_may_enable_like_a_service() {
    let mut h = H::new();
    let m = h.connect(Role::Monitor);
    let c = h.connect(Role::Client);
    h.ok(m, "ESUB", "t");
    h.ok(m, "EPUB", "t");
    h.ok(c, "SUB", "t");
    let out = h.send(c, "PUB", "t", &[], "x");
    assert_eq!(receivers(&out), vec![m, c], "monitor copy + subscriber");
}

// ---------------------------------------------------------------------------------------
// §4 INT UID
// ---------------------------------------------------------------------------------------

#[test]
fn int_uid_by_service_sets_uid_on_later_messages() {
    let (mut h, s, c) = svc_cli();
    h.ok(s, "EPUB", "t");
    h.ok(s, "SUB", "t");
    h.ok(s, "EREQ", "q");
    let before = h.send(c, "PUB", "t", &[], "before");
    assert_eq!(before[0].1.header("uid"), Some(""));
    let cid = h.cid(c);
    let out = h.send(
        s,
        "INT",
        "UID",
        &[("forcid", &cid), ("setuid", "alice")],
        "",
    );
    assert!(out.is_empty(), "{out:?}");
    let out = h.send(c, "PUB", "t", &[], "after");
    assert_eq!(out[0].1.named("uid"), vec![("uid", "alice")]);
    assert_eq!(out[0].1.named("cid"), vec![("cid", cid.as_str())]);
    let (_, req) = h.request(c, "q", "1");
    assert_eq!(req.header("uid"), Some("alice"));
    // The responder's own uid (empty) is on the RES, not the requester's.
    let out = h.answer(s, &req, "r");
    assert_eq!(out[0].1.header("uid"), Some(""));
    // Header names are read case-insensitively; a later INT UID replaces the uid.
    let out = h.send(s, "INT", "UID", &[("ForCID", &cid), ("SETUID", "bob")], "");
    assert!(out.is_empty(), "{out:?}");
    let out = h.send(c, "PUB", "t", &[], "later");
    assert_eq!(out[0].1.header("uid"), Some("bob"));
}

#[test]
fn int_uid_service_may_set_its_own_uid() {
    let (mut h, s, _c) = svc_cli();
    let s2 = h.connect(Role::Service);
    h.ok(s2, "SUB", "t");
    let cid = h.cid(s);
    h.ok(s, "SUB", "dummy");
    let out = h.send(
        s,
        "INT",
        "UID",
        &[("forcid", &cid), ("setuid", "svc-user")],
        "",
    );
    assert!(out.is_empty());
    let out = h.send(s, "PUB", "t", &[], "");
    assert_eq!(out[0].1.header("uid"), Some("svc-user"));
}

#[test]
fn int_uid_by_client_is_refused() {
    let (mut h, s, c) = svc_cli();
    h.ok(s, "EPUB", "t");
    h.ok(s, "SUB", "t");
    let cid = h.cid(c);
    let out = h.send(c, "INT", "UID", &[("forcid", &cid), ("setuid", "root")], "");
    assert_refused(&out, c, "INT", "UID", reason::NOT_PERMITTED);
    let out = h.send(c, "PUB", "t", &[], "");
    assert_eq!(out[0].1.header("uid"), Some(""), "uid unchanged");
}

#[test]
fn int_uid_errors_unknown_cid_missing_headers_other_target() {
    let (mut h, s, c) = svc_cli();
    let cid = h.cid(c);
    let out = h.send(
        s,
        "INT",
        "UID",
        &[("forcid", "nosuchcid"), ("setuid", "x")],
        "",
    );
    assert_refused(&out, s, "INT", "UID", reason::UNKNOWN_CID);
    let out = h.send(s, "INT", "UID", &[("forcid", &cid)], "");
    assert_refused(&out, s, "INT", "UID", reason::MISSING_HEADER);
    let out = h.send(s, "INT", "UID", &[("setuid", "x")], "");
    assert_refused(&out, s, "INT", "UID", reason::MISSING_HEADER);
    let out = h.send(s, "INT", "UID", &[], "");
    assert_refused(&out, s, "INT", "UID", reason::MISSING_HEADER);
    let out = h.send(s, "INT", "FOO", &[("forcid", &cid), ("setuid", "x")], "");
    assert_refused(&out, s, "INT", "FOO", reason::UNKNOWN_TARGET);
    // A cid that has left is unknown too.
    let gone = h.connect(Role::Client);
    let gone_cid = h.cid(gone);
    h.leave(gone);
    let out = h.send(
        s,
        "INT",
        "UID",
        &[("forcid", &gone_cid), ("setuid", "x")],
        "",
    );
    assert_refused(&out, s, "INT", "UID", reason::UNKNOWN_CID);
    // None of these changed the client's uid.
    h.ok(s, "EPUB", "t");
    h.ok(s, "SUB", "t");
    let out = h.send(c, "PUB", "t", &[], "");
    assert_eq!(out[0].1.header("uid"), Some(""));
}

#[test]
fn uid_does_not_survive_a_reused_connection_id() {
    let (mut h, s, c) = svc_cli();
    let cid = h.cid(c);
    h.ok(s, "SUB", "t");
    h.ok(s, "EPUB", "t");
    h.ok(s, "ESUB", "u");
    h.ok(c, "SUB", "u");
    let out = h.send(
        s,
        "INT",
        "UID",
        &[("forcid", &cid), ("setuid", "alice")],
        "",
    );
    assert!(out.is_empty());
    h.leave(c);
    h.connect_id(c, Role::Client);
    assert_ne!(h.cid(c), cid, "a new connection gets a new cid");
    assert_eq!(
        h.b.router().subscription_count(c),
        1,
        "only the new MSG:<cid>"
    );
    assert!(h
        .b
        .router()
        .is_subscribed(c, format!("MSG:{}", h.cid(c)).as_bytes()));
    assert!(!h
        .b
        .router()
        .is_subscribed(c, format!("MSG:{cid}").as_bytes()));
    let out = h.send(c, "PUB", "t", &[], "");
    assert_eq!(out[0].1.header("uid"), Some(""));
    assert_eq!(out[0].1.header("cid"), Some(h.cid(c).as_str()));
}

// ---------------------------------------------------------------------------------------
// Unknown commands and malformed messages (§2, §4, §7)
// ---------------------------------------------------------------------------------------

#[test]
fn unknown_command_is_an_error_and_not_processed() {
    let (mut h, s, c) = svc_cli();
    h.ok(s, "SUB", "t");
    for who in [s, c] {
        let out = h.send(who, "pub", "t", &[], "x");
        assert_refused(&out, who, "pub", "t", reason::UNKNOWN_COMMAND);
        let out = h.send(who, "FOO", "t", &[], "x");
        assert_refused(&out, who, "FOO", "t", reason::UNKNOWN_COMMAND);
    }
}

#[test]
fn malformed_message_is_an_error_and_not_processed() {
    let (mut h, s, c) = svc_cli();
    h.ok(s, "SUB", "t");
    h.ok(s, "EPUB", "t");
    for who in [s, c] {
        let out = h.feed(
            who,
            b"PUB t\r\nX-Ok: 1\r\nno colon here\r\n\r\nbody\r\n.\r\n",
        );
        assert_refused(&out, who, "PUB", "t", reason::MALFORMED);
    }
    // A malformed REQ keeps its ReqID in the error and starts nothing.
    h.ok(s, "EREQ", "q");
    let out = h.feed(c, b"REQ q\r\nReqID: m1\r\nbroken\r\n\r\n.\r\n");
    assert_refused(&out, c, "REQ", "q", reason::MALFORMED);
    assert_eq!(out[0].1.header("ReqID"), Some("m1"));
    assert_eq!(h.b.router().pending_count(), 0);
    // The stream goes on: the next message is processed.
    let out = h.feed(c, b"PUB t\r\nbad\r\n.\r\nPUB t\r\n\r\nok\r\n.\r\n");
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(out[0].0, c);
    assert_error(&out[0].1, "PUB", "t", reason::MALFORMED);
    assert_eq!(out[1].0, s);
    assert_eq!(out[1].1.body, "ok");
}

// ---------------------------------------------------------------------------------------
// Enablement lifetime (§4)
// ---------------------------------------------------------------------------------------

#[test]
fn enablements_lapse_when_the_enabling_service_leaves_subscriptions_stay() {
    let (mut h, s, c) = svc_cli();
    let c2 = h.connect(Role::Client);
    let s2 = h.connect(Role::Service);
    h.ok(s, "ESUB", "t");
    h.ok(s, "EPUB", "t");
    h.ok(s, "EREQ", "t");
    h.ok(c, "SUB", "t");
    h.ok(s2, "SUB", "t");
    assert!(h.leave(s).is_empty());
    for kind in [Enable::Pub, Enable::Sub, Enable::Req] {
        assert!(!h.b.router().is_enabled(b"t", kind), "{kind:?}");
    }
    let out = h.send(c2, "SUB", "t", &[], "");
    assert_refused(&out, c2, "SUB", "t", reason::NOT_PERMITTED);
    let out = h.send(c, "PUB", "t", &[], "x");
    assert_refused(&out, c, "PUB", "t", reason::NOT_PERMITTED);
    let out = h.send(c, "REQ", "t", &[("ReqID", "1")], "");
    assert_client_req_refused(&out, c, "t");
    // The existing subscription stays.
    assert!(h.b.router().is_subscribed(c, b"t"));
    let out = h.send(s2, "PUB", "t", &[], "still here");
    assert_eq!(receivers(&out), vec![c, s2]);
    // And the client may still leave it.
    h.ok(c, "UNS", "t");
    let out = h.send(s2, "PUB", "t", &[], "");
    assert_eq!(receivers(&out), vec![s2]);
}

#[test]
fn enablement_by_two_services_lapses_only_when_both_left() {
    let mut h = H::new();
    let s1 = h.connect(Role::Service);
    let s2 = h.connect(Role::Service);
    let c = h.connect(Role::Client);
    for s in [s1, s2] {
        h.ok(s, "ESUB", "t");
        h.ok(s, "EPUB", "t");
        h.ok(s, "EREQ", "t");
    }
    h.leave(s1);
    h.ok(c, "SUB", "t");
    h.ok(c, "UNS", "t");
    let out = h.send(c, "PUB", "t", &[], "");
    assert!(out.is_empty(), "{out:?}");
    let (to, _) = h.request(c, "t", "1");
    assert_eq!(to, s2, "the remaining responder");
    h.leave(s2);
    let out = h.send(c, "SUB", "t", &[], "");
    assert_refused(&out, c, "SUB", "t", reason::NOT_PERMITTED);
    let out = h.send(c, "PUB", "t", &[], "");
    assert_refused(&out, c, "PUB", "t", reason::NOT_PERMITTED);
    let out = h.send(c, "REQ", "t", &[("ReqID", "2")], "");
    assert_client_req_refused(&out, c, "t");
}

#[test]
fn each_enablement_is_kept_alive_only_by_services_that_made_it() {
    let mut h = H::new();
    let s1 = h.connect(Role::Service);
    let s2 = h.connect(Role::Service);
    let c = h.connect(Role::Client);
    h.ok(s1, "ESUB", "t");
    h.ok(s2, "EPUB", "t");
    h.leave(s1);
    let out = h.send(c, "SUB", "t", &[], "");
    assert_refused(&out, c, "SUB", "t", reason::NOT_PERMITTED);
    assert!(
        h.send(c, "PUB", "t", &[], "").is_empty(),
        "EPUB by s2 still holds"
    );
}

#[test]
fn enablements_made_again_after_lapse_work_again() {
    let (mut h, s, c) = svc_cli();
    h.ok(s, "ESUB", "t");
    h.leave(s);
    let out = h.send(c, "SUB", "t", &[], "");
    assert_refused(&out, c, "SUB", "t", reason::NOT_PERMITTED);
    let s2 = h.connect(Role::Service);
    h.ok(s2, "ESUB", "t");
    h.ok(c, "SUB", "t");
}

// ---------------------------------------------------------------------------------------
// Ordering (§4)
// ---------------------------------------------------------------------------------------

#[test]
fn sub_then_pub_from_one_connection_delivers_to_the_sender() {
    let (mut h, s, c) = svc_cli();
    let mut batch = wire("SUB", "t", &[], "");
    batch.extend(wire("PUB", "t", &[], "self"));
    let out = h.feed(s, &batch);
    assert_eq!(receivers(&out), vec![s]);
    assert_eq!(out[0].1.body, "self");

    h.ok(s, "ESUB", "u");
    h.ok(s, "EPUB", "u");
    let mut batch = wire("SUB", "u", &[], "");
    batch.extend(wire("PUB", "u", &[], "mine"));
    batch.extend(wire("UNS", "u", &[], ""));
    batch.extend(wire("PUB", "u", &[], "not mine"));
    let out = h.feed(c, &batch);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].0, c);
    assert_eq!(out[0].1.body, "mine");
}

#[test]
fn messages_from_one_connection_reach_each_receiver_in_order() {
    let (mut h, s, c) = svc_cli();
    let s2 = h.connect(Role::Service);
    h.ok(s, "ESUB", "t");
    h.ok(c, "SUB", "t");
    h.ok(s2, "SUB", "t");
    let mut batch = Vec::new();
    for i in 0..200 {
        batch.extend(wire("PUB", "t", &[], &i.to_string()));
    }
    let out = h.feed(s, &batch);
    for r in [c, s2] {
        let bodies: Vec<String> = for_conn(&out, r).iter().map(|m| m.body.clone()).collect();
        let want: Vec<String> = (0..200).map(|i: i32| i.to_string()).collect();
        assert_eq!(bodies, want);
    }
}

// ---------------------------------------------------------------------------------------
// §3 Server-set headers, relaying
// ---------------------------------------------------------------------------------------

#[test]
fn cid_and_uid_replaced_under_any_spelling_on_pub_req_res() {
    let (mut h, s, c) = svc_cli();
    let sub = h.connect(Role::Service);
    h.ok(s, "EPUB", "t");
    h.ok(s, "EREQ", "q");
    h.ok(sub, "SUB", "t");
    let forged: &[(&str, &str)] = &[
        ("CID", "forged1"),
        ("X-Keep", "k"),
        ("Uid", "root"),
        ("cId", "forged2"),
        ("UID", "admin"),
        ("cid", "forged3"),
    ];
    let cid_c = h.cid(c);
    let cid_s = h.cid(s);
    let check = |m: &M, cid: &str| {
        assert_eq!(m.named("cid"), vec![("cid", cid)], "{m:?}");
        assert_eq!(m.named("uid"), vec![("uid", "")], "{m:?}");
        assert_eq!(m.header("X-Keep"), Some("k"));
    };
    // PUB from a client and from a service.
    let out = h.send(c, "PUB", "t", forged, "");
    assert_eq!(receivers(&out), vec![sub]);
    check(&out[0].1, &cid_c);
    let out = h.send(s, "PUB", "t", forged, "");
    check(&out[0].1, &cid_s);
    // REQ.
    let mut hdrs = forged.to_vec();
    hdrs.push(("ReqID", "f1"));
    let out = h.send(c, "REQ", "q", &hdrs, "");
    assert_eq!(receivers(&out), vec![s]);
    let req = out[0].1.clone();
    check(&req, &cid_c);
    // RES.
    let rid = req.header("rid").unwrap().to_owned();
    let mut hdrs = forged.to_vec();
    hdrs.push(("rid", &rid));
    let out = h.send(s, "RES", "q", &hdrs, "");
    assert_eq!(receivers(&out), vec![c]);
    check(&out[0].1, &cid_s);
}

#[test]
fn forged_uid_after_int_uid_is_replaced_by_the_real_one() {
    let (mut h, s, c) = svc_cli();
    h.ok(s, "EPUB", "t");
    h.ok(s, "SUB", "t");
    let cid = h.cid(c);
    assert!(h
        .send(
            s,
            "INT",
            "UID",
            &[("forcid", &cid), ("setuid", "alice")],
            ""
        )
        .is_empty());
    let out = h.send(c, "PUB", "t", &[("uId", "root")], "");
    assert_eq!(out[0].1.named("uid"), vec![("uid", "alice")]);
}

#[test]
fn headers_relayed_in_original_order_and_spelling() {
    let (mut h, s, c) = svc_cli();
    h.ok(s, "EPUB", "t");
    h.ok(s, "SUB", "t");
    h.ok(s, "EREQ", "q");
    let hdrs: &[(&str, &str)] = &[
        ("X-Zeta", "1"),
        ("alpha", "two words"),
        ("X-Zeta", "3"),
        ("MiXeD-CaSe", "v:with:colons"),
        ("empty", ""),
    ];
    let out = h.send(c, "PUB", "t", hdrs, "");
    assert_eq!(out[0].1.without(&["cid", "uid"]), hdrs.to_vec());

    let mut req_hdrs = hdrs.to_vec();
    req_hdrs.insert(2, ("ReqID", "r-9"));
    let out = h.send(c, "REQ", "q", &req_hdrs, "");
    let req = out[0].1.clone();
    assert_eq!(req.without(&["cid", "uid", "rid"]), req_hdrs);

    let rid = req.header("rid").unwrap().to_owned();
    let res_hdrs: &[(&str, &str)] = &[
        ("Z-last", "z"),
        ("rid", &rid),
        ("a-First", "a"),
        ("Z-last", "zz"),
    ];
    let out = h.send(s, "RES", "q", res_hdrs, "");
    assert_eq!(
        out[0].1.without(&["cid", "uid", "rid", "reqid"]),
        vec![("Z-last", "z"), ("a-First", "a"), ("Z-last", "zz")]
    );
}

#[test]
fn body_relayed_byte_for_byte() {
    let (mut h, s, _c) = svc_cli();
    let sub = h.connect(Role::Service);
    h.ok(sub, "SUB", "t");
    for body in [
        "",
        "one",
        "a\r\nb\nc",
        ".dot\n..two\r\n.",
        "\n\n",
        "trailing\r\n",
    ] {
        let out = h.send(s, "PUB", "t", &[], body);
        assert_eq!(out[0].1.body, body, "body {body:?}");
    }
}

#[test]
fn empty_body_is_sent_as_one_empty_line_before_the_terminator() {
    let (mut h, s, _c) = svc_cli();
    let sub = h.connect(Role::Service);
    h.ok(sub, "SUB", "t");
    let mut raw = Vec::new();
    let mut d = Decoder::new(Limits::default());
    d.feed(b"PUB t\n\n.\n");
    if let Ok(Some(Decoded::Message(m))) = d.next() {
        h.b.apply(s, &m, h.now, &mut raw);
    } else {
        panic!("does not decode");
    }
    let p = raw[0].1.payload();
    assert!(
        p.starts_with(b"PUB t\r\n"),
        "{:?}",
        String::from_utf8_lossy(p)
    );
    assert!(
        p.ends_with(b"\r\n\r\n\r\n.\r\n"),
        "{:?}",
        String::from_utf8_lossy(p)
    );
}

// ---------------------------------------------------------------------------------------
// §5 Private channels
// ---------------------------------------------------------------------------------------

#[test]
fn every_connection_is_on_its_private_channel_from_connect() {
    let mut h = H::new();
    for role in [Role::Service, Role::Client, Role::Monitor] {
        let c = h.connect(role);
        let private = format!("MSG:{}", h.cid(c));
        assert!(h.b.router().is_subscribed(c, private.as_bytes()));
        assert_eq!(h.b.router().subscription_count(c), 1);
        assert_eq!(h.b.router().subscribers(private.as_bytes()), &[c]);
    }
}

#[test]
fn service_pub_on_private_channel_reaches_only_that_connection() {
    let (mut h, s, c) = svc_cli();
    let _c2 = h.connect(Role::Client);
    let private = format!("MSG:{}", h.cid(c));
    let out = h.send(s, "PUB", &private, &[("X", "y")], "for you");
    assert_eq!(receivers(&out), vec![c]);
    let m = &out[0].1;
    assert_eq!(m.cmd, "PUB");
    assert_eq!(m.target, private);
    assert_eq!(m.body, "for you");
    assert_eq!(m.header("cid"), Some(h.cid(s).as_str()));
    // A service may also message another service, or itself.
    let own = format!("MSG:{}", h.cid(s));
    let out = h.send(s, "PUB", &own, &[], "me");
    assert_eq!(receivers(&out), vec![s]);
}

#[test]
fn client_may_not_publish_to_any_private_channel() {
    let (mut h, s, c) = svc_cli();
    let c2 = h.connect(Role::Client);
    // Even a service enabling a MSG: target does not open it to clients.
    h.ok(s, "EPUB", "MSG:open");
    h.ok(s, "SUB", "MSG:open");
    for t in [
        format!("MSG:{}", h.cid(s)),
        format!("MSG:{}", h.cid(c2)),
        format!("MSG:{}", h.cid(c)),
        "MSG:nobody".to_owned(),
        "MSG:open".to_owned(),
    ] {
        let out = h.send(c, "PUB", &t, &[], "x");
        assert_refused(&out, c, "PUB", &t, reason::NOT_PERMITTED);
    }
}

#[test]
fn client_may_not_subscribe_to_any_private_channel() {
    let (mut h, s, c) = svc_cli();
    let c2 = h.connect(Role::Client);
    h.ok(s, "ESUB", "MSG:open");
    for t in [
        format!("MSG:{}", h.cid(s)),
        format!("MSG:{}", h.cid(c2)),
        "MSG:nobody".to_owned(),
        "MSG:open".to_owned(),
    ] {
        let out = h.send(c, "SUB", &t, &[], "");
        assert_refused(&out, c, "SUB", &t, reason::NOT_PERMITTED);
        assert!(!h.b.router().is_subscribed(c, t.as_bytes()));
    }
    // So a private message to c2 reaches c2 only.
    let t = format!("MSG:{}", h.cid(c2));
    let out = h.send(s, "PUB", &t, &[], "secret");
    assert_eq!(receivers(&out), vec![c2]);
}

#[test]
fn pub_to_unknown_or_departed_cid_is_dropped_silently() {
    let (mut h, s, c) = svc_cli();
    assert!(h.send(s, "PUB", "MSG:nosuchcid", &[], "x").is_empty());
    let t = format!("MSG:{}", h.cid(c));
    h.leave(c);
    assert!(h.send(s, "PUB", &t, &[], "x").is_empty());
}

// ---------------------------------------------------------------------------------------
// §6 Requests
// ---------------------------------------------------------------------------------------

#[test]
fn req_without_reqid_is_refused() {
    let (mut h, s, c) = svc_cli();
    h.ok(s, "EREQ", "q");
    for who in [c, s] {
        let out = h.send(who, "REQ", "q", &[("X", "1")], "");
        assert_refused(&out, who, "REQ", "q", reason::MISSING_REQID);
        assert_eq!(out[0].1.header("ReqID"), None);
    }
    assert_eq!(h.b.router().pending_count(), 0);
    let t = h.b.router().lookup(b"q").unwrap();
    assert_eq!(h.b.router().topic(t).unwrap().responders[0].in_flight, 0);
}

#[test]
fn reqid_accepted_under_any_spelling() {
    let (mut h, s, c) = svc_cli();
    h.ok(s, "EREQ", "q");
    for name in ["ReqID", "reqid", "REQID", "rEqId"] {
        let out = h.send(c, "REQ", "q", &[(name, "v")], "");
        assert_eq!(receivers(&out), vec![s], "{name}: {out:?}");
        assert_eq!(out[0].1.named("reqid"), vec![(name, "v")]);
    }
}

#[test]
fn idle_responders_are_chosen_round_robin() {
    let mut h = H::new();
    let c = h.connect(Role::Client);
    let rs: Vec<ConnId> = (0..3).map(|_| h.connect(Role::Service)).collect();
    for &r in &rs {
        h.ok(r, "EREQ", "q");
    }
    let mut picks = Vec::new();
    for i in 0..12 {
        let (to, req) = h.request(c, "q", &i.to_string());
        picks.push(to);
        let out = h.answer(to, &req, "");
        assert_eq!(receivers(&out), vec![c]);
    }
    let first: BTreeSet<ConnId> = picks[..3].iter().copied().collect();
    assert_eq!(first, rs.iter().copied().collect(), "picks {picks:?}");
    for i in 3..picks.len() {
        assert_eq!(picks[i], picks[i % 3], "not a rotation: {picks:?}");
    }
}

#[test]
fn fewest_in_flight_first_then_round_robin_among_ties() {
    let mut h = H::new();
    let c = h.connect(Role::Client);
    let rs: Vec<ConnId> = (0..3).map(|_| h.connect(Role::Service)).collect();
    for &r in &rs {
        h.ok(r, "EREQ", "q");
    }
    // One responder gets a request that stays open.
    let (busy, busy_req) = h.request(c, "q", "busy");
    // While it is busy, answered requests alternate between the other two.
    let mut picks = Vec::new();
    for i in 0..8 {
        let (to, req) = h.request(c, "q", &format!("idle{i}"));
        assert_ne!(to, busy, "a busy responder was chosen over idle ones");
        picks.push(to);
        h.answer(to, &req, "");
    }
    for w in picks.windows(2) {
        assert_ne!(w[0], w[1], "ties not broken round-robin: {picks:?}");
    }
    // Now leave requests open: the one with fewest in flight always wins.
    let mut open = vec![(busy, busy_req)];
    let mut load: BTreeMap<ConnId, u32> = rs.iter().map(|&r| (r, 0)).collect();
    *load.get_mut(&busy).unwrap() = 1;
    for i in 0..9 {
        let min = *load.values().min().unwrap();
        let (to, req) = h.request(c, "q", &format!("open{i}"));
        assert_eq!(load[&to], min, "chose {to} with load {load:?}");
        *load.get_mut(&to).unwrap() += 1;
        open.push((to, req));
    }
    // Cross-check against the router's own counts.
    let t = h.b.router().lookup(b"q").unwrap();
    for r in &h.b.router().topic(t).unwrap().responders {
        assert_eq!(r.in_flight, load[&r.conn]);
    }
    // Answering two of one responder's requests makes it the only choice.
    let target = rs[1];
    let mine: Vec<usize> = open
        .iter()
        .enumerate()
        .filter(|(_, (r, _))| *r == target)
        .map(|(i, _)| i)
        .take(2)
        .collect();
    for &i in mine.iter().rev() {
        let (r, req) = open.remove(i);
        h.answer(r, &req, "");
        *load.get_mut(&r).unwrap() -= 1;
    }
    let (to, _) = h.request(c, "q", "after");
    assert_eq!(to, target);
}

#[test]
fn rid_is_added_and_replaces_a_sender_supplied_rid() {
    let (mut h, s, c) = svc_cli();
    h.ok(s, "EREQ", "q");
    let out = h.send(
        c,
        "REQ",
        "q",
        &[("RID", "evil"), ("ReqID", "1"), ("rid", "99")],
        "",
    );
    let m = &out[0].1;
    let rids = m.named("rid");
    assert_eq!(rids.len(), 1, "{m:?}");
    assert_eq!(rids[0].0, "rid", "server-added names are lower case");
    assert!(rids[0].1 != "evil" && rids[0].1 != "99");
    // A second request gets a different rid.
    let out2 = h.send(c, "REQ", "q", &[("ReqID", "2")], "");
    assert_ne!(out2[0].1.header("rid"), m.header("rid"));
    // The forged rid does not reach the requester's request: answering with it does nothing.
    assert!(h.send(s, "RES", "q", &[("rid", "99")], "").is_empty());
    assert_eq!(h.b.router().pending_count(), 2);
}

#[test]
fn res_reaches_requester_without_rid_and_with_its_own_reqid_spelling() {
    let (mut h, s, c) = svc_cli();
    h.ok(s, "EREQ", "q");
    let out = h.send(
        c,
        "REQ",
        "q",
        &[("reqId", "abc-1"), ("X-Q", "q")],
        "question",
    );
    let req = out[0].1.clone();
    assert_eq!(req.body, "question");
    let rid = req.header("rid").unwrap().to_owned();
    let out = h.send(
        s,
        "RES",
        "q",
        &[
            ("X-R", "1"),
            ("REQID", "wrong"),
            ("rid", &rid),
            ("ReqID", "wrong2"),
        ],
        "the answer\nline 2",
    );
    assert_eq!(receivers(&out), vec![c]);
    let m = &out[0].1;
    assert_eq!(m.cmd, "RES");
    assert_eq!(m.target, "q");
    assert_eq!(m.body, "the answer\nline 2");
    assert!(m.named("rid").is_empty(), "rid removed: {m:?}");
    assert_eq!(m.named("reqid"), vec![("reqId", "abc-1")], "{m:?}");
    assert_eq!(m.header("X-R"), Some("1"));
    assert_eq!(
        m.header("X-Q"),
        None,
        "the RES carries the responder's headers only"
    );
    assert_eq!(m.header("cid"), Some(h.cid(s).as_str()));
}

#[test]
fn res_rid_header_read_under_any_spelling_and_removed() {
    let (mut h, s, c) = svc_cli();
    h.ok(s, "EREQ", "q");
    for name in ["RID", "Rid", "rId"] {
        let (_, req) = h.request(c, "q", name);
        let rid = req.header("rid").unwrap().to_owned();
        let out = h.send(s, "RES", "q", &[(name, &rid)], "");
        assert_eq!(receivers(&out), vec![c], "{name}: {out:?}");
        assert!(out[0].1.named("rid").is_empty(), "{:?}", out[0].1);
    }
    assert_eq!(h.b.router().pending_count(), 0);
}

#[test]
fn res_without_reqid_from_responder_still_gets_the_requesters() {
    let (mut h, s, c) = svc_cli();
    h.ok(s, "EREQ", "q");
    let (_, req) = h.request(c, "q", "only-mine");
    let out = h.answer(s, &req, "");
    assert_eq!(out[0].1.named("reqid"), vec![("ReqID", "only-mine")]);
}

#[test]
fn timeout_ends_the_request_exactly_once_with_reqid() {
    let (mut h, s, c) = svc_cli();
    h.ok(s, "EREQ", "q");
    let t0 = h.now;
    h.send(c, "REQ", "q", &[("reqid", "late-1")], "");
    assert_eq!(h.b.next_deadline(), Some(t0 + TIMEOUT));
    assert!(h.expire(t0 + TIMEOUT - Duration::from_millis(1)).is_empty());
    assert_eq!(h.b.router().pending_count(), 1);
    let out = h.expire(t0 + TIMEOUT);
    assert_refused(&out, c, "REQ", "q", "request timed out");
    assert_eq!(out[0].1.header("ReqID"), Some("late-1"));
    assert_eq!(h.b.router().pending_count(), 0);
    assert_eq!(h.b.next_deadline(), None);
    assert!(h.expire(t0 + TIMEOUT * 3).is_empty(), "exactly once");
    let t = h.b.router().lookup(b"q").unwrap();
    assert_eq!(h.b.router().topic(t).unwrap().responders[0].in_flight, 0);
}

#[test]
fn late_res_after_timeout_is_dropped_silently() {
    let (mut h, s, c) = svc_cli();
    h.ok(s, "EREQ", "q");
    let t0 = h.now;
    let (_, req) = h.request(c, "q", "x");
    assert_eq!(h.expire(t0 + TIMEOUT).len(), 1);
    assert!(h.answer(s, &req, "too late").is_empty());
}

#[test]
fn responder_disconnect_ends_its_requests_exactly_once() {
    // "q" is held only by its responder, so the topic itself goes away with it.
    let mut h = H::new();
    let c1 = h.connect(Role::Client);
    let c2 = h.connect(Role::Client);
    let r = h.connect(Role::Service);
    let other = h.connect(Role::Service);
    h.ok(r, "EREQ", "q");
    h.ok(other, "EREQ", "other");
    let t0 = h.now;
    h.request(c1, "q", "a");
    h.request(c2, "q", "B");
    h.request(c1, "other", "keep");
    let out = h.leave(r);
    assert_eq!(out.len(), 2, "{out:?}");
    let to_c1 = for_conn(&out, c1);
    let to_c2 = for_conn(&out, c2);
    assert_eq!((to_c1.len(), to_c2.len()), (1, 1), "{out:?}");
    assert_eq!(to_c1[0].header("reason"), Some("responder disconnected"));
    assert_eq!(to_c1[0].header("ReqID"), Some("a"));
    assert_eq!(to_c2[0].header("reason"), Some("responder disconnected"));
    assert_eq!(to_c2[0].header("ReqID"), Some("B"));
    assert_eq!(
        h.b.router().pending_count(),
        1,
        "the other responder's request stays"
    );
    // Not again: not on a repeated disconnect, not at the deadline.
    assert!(h.leave(r).is_empty());
    let late = h.expire(t0 + TIMEOUT);
    assert_eq!(late.len(), 1);
    assert_eq!(late[0].1.header("ReqID"), Some("keep"));
    // §7: the error names the failed message: `cmd: REQ`, `target: q`,
    // body `responder disconnected: REQ q`.
    assert_error(to_c1[0], "REQ", "q", "responder disconnected");
    assert_error(to_c2[0], "REQ", "q", "responder disconnected");
}

#[test]
fn responder_disconnect_error_names_a_target_that_outlives_the_responder() {
    let mut h = H::new();
    let c = h.connect(Role::Client);
    let r = h.connect(Role::Service);
    let r2 = h.connect(Role::Service);
    h.ok(r, "EREQ", "q");
    h.ok(r2, "EREQ", "q");
    let (first, _) = h.request(c, "q", "1");
    let out = h.leave(first);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].0, c);
    assert_error(&out[0].1, "REQ", "q", "responder disconnected");
    assert_eq!(out[0].1.header("ReqID"), Some("1"));
    let _ = (r, r2);
}

#[test]
fn res_from_a_different_connection_refused_request_stays() {
    let mut h = H::new();
    let c = h.connect(Role::Client);
    let r1 = h.connect(Role::Service);
    let r2 = h.connect(Role::Service);
    h.ok(r1, "EREQ", "q");
    h.ok(r2, "EREQ", "q");
    let (to, req) = h.request(c, "q", "1");
    let wrong = if to == r1 { r2 } else { r1 };
    let rid = req.header("rid").unwrap().to_owned();
    let out = h.send(wrong, "RES", "q", &[("rid", &rid), ("ReqID", "1")], "");
    assert_refused(&out, wrong, "RES", "q", reason::NOT_YOUR_REQUEST);
    assert_eq!(
        h.b.router()
            .pending(rid.parse().unwrap())
            .map(|p| p.responder),
        Some(to)
    );
    let out = h.answer(to, &req, "ok");
    assert_eq!(receivers(&out), vec![c]);
}

#[test]
fn duplicate_and_unknown_rid_res_dropped_silently() {
    let (mut h, s, c) = svc_cli();
    h.ok(s, "EREQ", "q");
    let (_, req) = h.request(c, "q", "1");
    assert_eq!(h.answer(s, &req, "first").len(), 1);
    assert!(h.answer(s, &req, "duplicate").is_empty());
    for rid in ["0", "123456789", "18446744073709551615", "abc", "-1", ""] {
        let out = h.send(s, "RES", "q", &[("rid", rid)], "");
        assert!(out.is_empty(), "rid {rid:?}: {out:?}");
    }
}

#[test]
fn res_after_requester_left_is_dropped_silently() {
    let mut h = H::new();
    let c = h.connect(Role::Client);
    let s = h.connect(Role::Service);
    let _mon = h.connect(Role::Monitor);
    h.ok(s, "EREQ", "q");
    let t0 = h.now;
    let (_, req) = h.request(c, "q", "1");
    assert!(h.leave(c).is_empty(), "the responder is not told");
    assert_eq!(h.b.router().pending_count(), 0);
    let out = h.answer(s, &req, "nobody listens");
    assert!(
        out.is_empty(),
        "not delivered, not copied, no error: {out:?}"
    );
    assert!(h.expire(t0 + TIMEOUT).is_empty());
    let t = h.b.router().lookup(b"q").unwrap();
    assert_eq!(h.b.router().topic(t).unwrap().responders[0].in_flight, 0);
}

#[test]
fn nothing_pending_outlives_its_deadline() {
    let mut h = H::new();
    let c = h.connect(Role::Client);
    let r1 = h.connect(Role::Service);
    let r2 = h.connect(Role::Service);
    h.ok(r1, "EREQ", "q");
    h.ok(r2, "EREQ", "q");
    let t0 = h.now;
    let mut open = Vec::new();
    for i in 0..10u64 {
        h.now = t0 + Duration::from_secs(i);
        let (to, req) = h.request(c, "q", &i.to_string());
        open.push((to, req, i));
    }
    // Answer the odd ones.
    for (to, req, i) in &open {
        if i % 2 == 1 {
            assert_eq!(h.answer(*to, req, "").len(), 1);
        }
    }
    // At t0+TIMEOUT+4s requests 0,2,4 are due.
    let out = h.expire(t0 + TIMEOUT + Duration::from_secs(4));
    let ids: Vec<&str> = out
        .iter()
        .map(|(_, m)| m.header("ReqID").unwrap())
        .collect();
    assert_eq!(ids, vec!["0", "2", "4"]);
    let out = h.expire(t0 + TIMEOUT + Duration::from_secs(100));
    let ids: Vec<&str> = out
        .iter()
        .map(|(_, m)| m.header("ReqID").unwrap())
        .collect();
    assert_eq!(ids, vec!["6", "8"]);
    for (to, m) in &out {
        assert_eq!(*to, c);
        assert_error(m, "REQ", "q", "request timed out");
    }
    assert_eq!(h.b.router().pending_count(), 0);
    assert_eq!(h.b.next_deadline(), None);
}

#[test]
fn a_service_may_answer_its_own_request() {
    let (mut h, s, _c) = svc_cli();
    h.ok(s, "EREQ", "q");
    let (to, req) = h.request(s, "q", "self");
    assert_eq!(to, s);
    let out = h.answer(s, &req, "me");
    assert_eq!(receivers(&out), vec![s]);
    assert_eq!(out[0].1.header("ReqID"), Some("self"));
    assert!(h.leave(s).is_empty());
}

#[test]
fn self_request_pending_when_leaving_is_forgotten() {
    let (mut h, s, _c) = svc_cli();
    h.ok(s, "EREQ", "q");
    h.request(s, "q", "self");
    // Nobody is left to tell.
    assert!(h.leave(s).is_empty());
    assert_eq!(h.b.router().pending_count(), 0);
}

// ---------------------------------------------------------------------------------------
// Monitors
// ---------------------------------------------------------------------------------------

#[test]
fn monitor_gets_a_copy_of_every_pub() {
    let mut h = H::new();
    let s = h.connect(Role::Service);
    let c = h.connect(Role::Client);
    let mon = h.connect(Role::Monitor);
    h.ok(s, "ESUB", "t");
    h.ok(s, "EPUB", "t");
    h.ok(c, "SUB", "t");
    let out = h.send(s, "PUB", "t", &[("H", "1")], "body");
    assert_eq!(receivers(&out), vec![c, mon]);
    assert_eq!(for_conn(&out, mon)[0], for_conn(&out, c)[0], "a copy");
    let out = h.send(c, "PUB", "t", &[], "from client");
    assert_eq!(receivers(&out), vec![c, mon]);
    // With no subscriber at all.
    let out = h.send(s, "PUB", "lonely", &[], "x");
    assert_eq!(receivers(&out), vec![mon]);
    assert_eq!(out[0].1.target, "lonely");
    // On a private channel.
    let private = format!("MSG:{}", h.cid(c));
    let out = h.send(s, "PUB", &private, &[], "p");
    assert_eq!(receivers(&out), vec![c, mon]);
    // A monitor subscribed to the topic gets one copy, not two.
    h.ok(mon, "SUB", "t");
    let out = h.send(s, "PUB", "t", &[], "once");
    assert_eq!(receivers(&out), vec![c, mon]);
}

#[test]
fn monitor_gets_copies_of_req_and_res() {
    let mut h = H::new();
    let s = h.connect(Role::Service);
    let c = h.connect(Role::Client);
    let mon = h.connect(Role::Monitor);
    h.ok(s, "EREQ", "q");
    let out = h.send(c, "REQ", "q", &[("ReqID", "m1")], "ask");
    assert_eq!(receivers(&out), vec![s, mon]);
    let req = for_conn(&out, s)[0].clone();
    assert_eq!(
        for_conn(&out, mon)[0],
        &req,
        "a copy of the REQ as delivered"
    );
    let out = h.answer(s, &req, "reply");
    assert_eq!(receivers(&out), vec![c, mon]);
    assert_eq!(
        for_conn(&out, mon)[0],
        for_conn(&out, c)[0],
        "a copy of the RES"
    );
    assert_eq!(for_conn(&out, mon)[0].cmd, "RES");
}

#[test]
fn monitor_receiving_a_req_copy_is_not_its_responder() {
    let mut h = H::new();
    let s = h.connect(Role::Service);
    let c = h.connect(Role::Client);
    let mon = h.connect(Role::Monitor);
    h.ok(s, "EREQ", "q");
    let t = h.b.router().lookup(b"q").unwrap();
    for i in 0..4 {
        let out = h.send(c, "REQ", "q", &[("ReqID", &i.to_string())], "");
        assert_eq!(receivers(&out), vec![s, mon]);
        let copy = for_conn(&out, mon)[0].clone();
        let rid = copy.header("rid").unwrap().to_owned();
        assert_eq!(
            h.b.router()
                .pending(rid.parse().unwrap())
                .unwrap()
                .responder,
            s
        );
        let responders = &h.b.router().topic(t).unwrap().responders;
        assert_eq!(responders.len(), 1);
        assert_eq!(responders[0].conn, s);
        // The monitor's answer is refused; the real one goes through.
        let out = h.send(mon, "RES", "q", &[("rid", &rid)], "monitor");
        assert_refused(&out, mon, "RES", "q", reason::NOT_YOUR_REQUEST);
        let out = h.answer(s, &copy, "real");
        assert_eq!(for_conn(&out, c).len(), 1);
        assert_eq!(for_conn(&out, c)[0].body, "real");
    }
    // The monitor leaving does not fail anyone's request.
    h.request(c, "q", "x");
    assert!(h.leave(mon).is_empty());
    assert_eq!(h.b.router().pending_count(), 1);
}

#[test]
fn monitor_gets_no_copy_of_refused_messages_or_errors() {
    let mut h = H::new();
    let s = h.connect(Role::Service);
    let c = h.connect(Role::Client);
    let _mon = h.connect(Role::Monitor);
    h.ok(s, "SUB", "t");
    let out = h.send(c, "PUB", "t", &[], "x");
    assert_refused(&out, c, "PUB", "t", reason::NOT_PERMITTED);
    let out = h.send(c, "REQ", "nobody", &[("ReqID", "1")], "");
    assert_client_req_refused(&out, c, "nobody");
    let out = h.send(s, "REQ", "nobody", &[("ReqID", "1")], "");
    assert_refused(&out, s, "REQ", "nobody", "no responder");
    let out = h.send(c, "BOGUS", "t", &[], "");
    assert_refused(&out, c, "BOGUS", "t", reason::UNKNOWN_COMMAND);
}

// ---------------------------------------------------------------------------------------
// max_subscriptions
// ---------------------------------------------------------------------------------------

#[test]
fn max_subscriptions_refuses_beyond_the_limit_private_channel_not_counted() {
    let mut h = H::with(Settings {
        max_subscriptions: 2,
        request_timeout: TIMEOUT,
        ..Settings::default()
    });
    let s = h.connect(Role::Service);
    let c = h.connect(Role::Client);
    h.ok(s, "ESUB", "a");
    h.ok(s, "ESUB", "b");
    h.ok(s, "ESUB", "c");
    for who in [s, c] {
        h.ok(who, "SUB", "a");
        h.ok(who, "SUB", "b");
        let out = h.send(who, "SUB", "c", &[], "");
        assert_refused(&out, who, "SUB", "c", reason::TOO_MANY_SUBSCRIPTIONS);
        assert!(!h.b.router().is_subscribed(who, b"c"));
        assert_eq!(
            h.b.router().subscription_count(who),
            3,
            "a, b and MSG:<cid>"
        );
        // Re-subscribing at the limit is still idempotent, not an error.
        h.ok(who, "SUB", "a");
        h.ok(who, "UNS", "a");
        h.ok(who, "SUB", "c");
        assert!(h.b.router().is_subscribed(who, b"c"));
    }
    // The private channel keeps working.
    let t = format!("MSG:{}", h.cid(c));
    assert_eq!(receivers(&h.send(s, "PUB", &t, &[], "")), vec![c]);
}

/// Errors counted under `why` so far.
fn errors_counted(h: &H, why: &str) -> u64 {
    let i = reason::ALL
        .iter()
        .position(|r| *r == why)
        .expect("a reason");
    h.b.stats.errors[i]
}

#[test]
fn max_pending_requests_per_connection_for_every_role() {
    let mut h = H::with(Settings {
        request_timeout: TIMEOUT,
        max_pending_requests: 3,
        ..Settings::default()
    });
    let r = h.connect(Role::Service);
    let c = h.connect(Role::Client);
    let s = h.connect(Role::Service);
    let mon = h.connect(Role::Monitor);
    h.ok(r, "EREQ", "q");
    let t0 = h.now;
    // A client and a trusted service alike: three in flight, the fourth refused.
    for who in [c, s] {
        let mut reqs = Vec::new();
        for i in 0..3 {
            let (to, req) = h.request(who, "q", &format!("{who}-{i}"));
            assert_eq!(to, r);
            reqs.push(req);
        }
        assert_eq!(h.b.router().asked_count(who), 3);
        let out = h.send(who, "REQ", "q", &[("ReqID", "over")], "x");
        // Exactly one message: the error to the sender; nothing to the responder, no
        // monitor copy.
        assert_refused(&out, who, "REQ", "q", reason::TOO_MANY_REQUESTS);
        assert_eq!(out[0].1.named("ReqID"), vec![("ReqID", "over")]);
        assert_eq!(h.b.router().asked_count(who), 3);
        // Answering one frees one slot.
        assert_eq!(receivers(&h.answer(r, &reqs[0], "a")), vec![who, mon]);
        let (_, _) = h.request(who, "q", "again");
        let out = h.send(who, "REQ", "q", &[("reqid", "over-2")], "");
        assert_refused(&out, who, "REQ", "q", reason::TOO_MANY_REQUESTS);
        assert_eq!(out[0].1.named("reqid"), vec![("reqid", "over-2")]);
    }
    assert_eq!(h.b.router().pending_count(), 6);
    assert_eq!(h.b.router().answering_count(r), 6);
    assert_eq!(h.b.stats.req_too_many, 4);
    assert_eq!(errors_counted(&h, reason::TOO_MANY_REQUESTS), 4);
    assert_eq!(h.b.stats.delivered_req, 8);
    // The cap is per connection: the responder's own requests are not limited by what
    // it answers, and a timeout frees the slots.
    h.ok(s, "EREQ", "own");
    h.request(r, "own", "r-1");
    assert_eq!(h.expire(t0 + TIMEOUT).len(), 7);
    assert_eq!(h.b.router().pending_count(), 0);
    for who in [c, s, r] {
        assert_eq!(h.b.router().asked_count(who), 0);
        h.request(who, "q", "after-timeout");
    }
}

#[test]
fn reqid_longer_than_the_limit_is_refused_and_not_echoed() {
    let mut h = H::with(Settings {
        request_timeout: TIMEOUT,
        max_reqid_bytes: 8,
        ..Settings::default()
    });
    let r = h.connect(Role::Service);
    let c = h.connect(Role::Client);
    let _mon = h.connect(Role::Monitor);
    h.ok(r, "EREQ", "q");
    let (_, req) = h.request(c, "q", "12345678");
    assert_eq!(req.header("ReqID"), Some("12345678"));
    let out = h.send(c, "REQ", "q", &[("ReqID", "123456789")], "x");
    assert_refused(&out, c, "REQ", "q", reason::REQID_TOO_LONG);
    assert!(out[0].1.named("ReqID").is_empty(), "{out:?}");
    assert_eq!(h.b.router().pending_count(), 1);
    assert_eq!(errors_counted(&h, reason::REQID_TOO_LONG), 1);
    // Checked before anything else about the request: even with no responder.
    let out = h.send(c, "REQ", "nobody", &[("ReqID", &"z".repeat(300))], "");
    assert_refused(&out, c, "REQ", "nobody", reason::REQID_TOO_LONG);
    // The limit is on the value only; surrounding spaces are not part of it.
    let out = h.send(c, "REQ", "q", &[("ReqID", "  abcdefgh  ")], "");
    assert_eq!(receivers(&out), vec![r, 2]);
}

#[test]
fn disconnect_ends_exactly_the_requests_of_that_connection() {
    let mut h = H::new();
    let r1 = h.connect(Role::Service);
    let r2 = h.connect(Role::Service);
    let c1 = h.connect(Role::Client);
    let c2 = h.connect(Role::Client);
    h.ok(r1, "EREQ", "a");
    h.ok(r2, "EREQ", "b");
    for i in 0..5 {
        h.request(c1, "a", &format!("c1a{i}"));
        h.request(c1, "b", &format!("c1b{i}"));
        h.request(c2, "a", &format!("c2a{i}"));
        h.request(c2, "b", &format!("c2b{i}"));
    }
    assert_eq!(h.b.router().pending_count(), 20);
    // The requester leaves: its 10 requests go silently, the others stay.
    assert!(h.leave(c1).is_empty());
    assert_eq!(h.b.router().pending_count(), 10);
    assert_eq!(
        (
            h.b.router().answering_count(r1),
            h.b.router().answering_count(r2)
        ),
        (5, 5)
    );
    // A responder leaves: exactly its 5 requests fail, oldest first, to their requester.
    let out = h.leave(r1);
    let ids: Vec<&str> = out
        .iter()
        .map(|(to, m)| {
            assert_eq!(*to, c2);
            assert_error(m, "REQ", "a", "responder disconnected");
            m.header("ReqID").unwrap()
        })
        .collect();
    assert_eq!(ids, vec!["c2a0", "c2a1", "c2a2", "c2a3", "c2a4"]);
    assert_eq!(h.b.router().pending_count(), 5);
    assert_eq!(h.b.router().asked_count(c2), 5);
    assert_eq!(h.b.stats.req_responder_gone, 5);
}

// ---------------------------------------------------------------------------------------
// Longer scenarios: invariants after every step (checked inside the harness)
// ---------------------------------------------------------------------------------------

#[test]
fn scenario_mixed_roles_with_reconnects() {
    let mut h = H::new();
    let s1 = h.connect(Role::Service);
    let s2 = h.connect(Role::Service);
    let mon = h.connect(Role::Monitor);
    let c1 = h.connect(Role::Client);
    let c2 = h.connect(Role::Client);
    h.ok(s1, "ESUB", "news");
    h.ok(s1, "EPUB", "chat");
    h.ok(s2, "ESUB", "chat");
    h.ok(s1, "EREQ", "calc");
    h.ok(s2, "EREQ", "calc");
    h.ok(c1, "SUB", "news");
    h.ok(c2, "SUB", "news");
    h.ok(c1, "SUB", "chat");
    h.ok(c2, "SUB", "chat");
    let out = h.send(c1, "PUB", "chat", &[], "hi");
    assert_eq!(receivers(&out), vec![mon, c1, c2]);
    let (r_a, req_a) = h.request(c1, "calc", "a");
    let (r_b, req_b) = h.request(c2, "calc", "b");
    assert_ne!(r_a, r_b);
    // s1 leaves: news ESUB lapses, chat EPUB lapses; subscriptions stay.
    let out = h.leave(s1);
    let (gone_req, gone_client, stays) = if r_a == s1 {
        (req_a, c1, (r_b, req_b, c2))
    } else {
        (req_b, c2, (r_a, req_a, c1))
    };
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, gone_client);
    assert_error(&out[0].1, "REQ", "calc", "responder disconnected");
    let _ = gone_req;
    let out = h.send(c1, "PUB", "chat", &[], "x");
    assert_refused(&out, c1, "PUB", "chat", reason::NOT_PERMITTED);
    let out = h.send(s2, "PUB", "news", &[], "still subscribed");
    assert_eq!(receivers(&out), vec![mon, c1, c2]);
    // Connection id s1 is reused by a client.
    h.connect_id(s1, Role::Client);
    let out = h.send(s1, "SUB", "news", &[], "");
    assert_refused(&out, s1, "SUB", "news", reason::NOT_PERMITTED);
    h.ok(s1, "SUB", "chat");
    let (r, req, who) = stays;
    let out = h.answer(r, &req, "done");
    assert_eq!(receivers(&out), vec![mon, who]);
    // Everyone leaves; nothing is left behind.
    for c in [c1, c2, mon, s2, s1] {
        h.leave(c);
    }
    assert_eq!(h.b.router().topic_count(), 0);
    assert_eq!(h.b.router().pending_count(), 0);
    assert_eq!(h.b.router().total_subscriptions(), 0);
    assert_eq!(h.b.session_count(), 0);
}

/// A small deterministic PRNG (xorshift64*).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn scenario_random_services_against_a_model() {
    const N: usize = 6;
    const TOPICS: [&str; 4] = ["a", "b", "c", "d"];
    const QS: [&str; 2] = ["q1", "q2"];
    let mut h = H::new();
    for _ in 0..N {
        h.connect(Role::Service);
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // Model: subscriptions, responders, pending (rid -> (requester, responder, reqid, req)).
    let mut subs: BTreeMap<&str, BTreeSet<ConnId>> = BTreeMap::new();
    let mut resp: BTreeMap<&str, BTreeSet<ConnId>> = BTreeMap::new();
    let mut pending: BTreeMap<String, (ConnId, ConnId, String, M)> = BTreeMap::new();
    let mut next_reqid = 0u32;
    for step in 0..3000 {
        let who = rng.below(N);
        match rng.below(9) {
            0 | 1 => {
                let t = TOPICS[rng.below(TOPICS.len())];
                h.ok(who, "SUB", t);
                subs.entry(t).or_default().insert(who);
            }
            2 => {
                let t = TOPICS[rng.below(TOPICS.len())];
                h.ok(who, "UNS", t);
                subs.entry(t).or_default().remove(&who);
            }
            3 | 4 => {
                let t = TOPICS[rng.below(TOPICS.len())];
                let out = h.send(who, "PUB", t, &[], &step.to_string());
                let want: Vec<ConnId> = subs
                    .get(t)
                    .map(|s| s.iter().copied().collect())
                    .unwrap_or_default();
                assert_eq!(receivers(&out), want, "step {step}: PUB {t}");
            }
            5 => {
                let q = QS[rng.below(QS.len())];
                h.ok(who, "EREQ", q);
                resp.entry(q).or_default().insert(who);
            }
            6 => {
                let q = QS[rng.below(QS.len())];
                next_reqid += 1;
                let reqid = format!("r{next_reqid}");
                let out = h.send(who, "REQ", q, &[("ReqID", &reqid)], "");
                let rs = resp.get(q).cloned().unwrap_or_default();
                if rs.is_empty() {
                    assert_refused(&out, who, "REQ", q, "no responder");
                } else {
                    assert_eq!(out.len(), 1, "step {step}: {out:?}");
                    let (to, m) = out[0].clone();
                    assert!(rs.contains(&to), "step {step}: {to} does not answer {q}");
                    // Fewest in flight among this target's responders.
                    let load = |c: ConnId| {
                        pending
                            .values()
                            .filter(|(_, r, _, m)| *r == c && m.target == q)
                            .count()
                    };
                    let min = rs.iter().map(|&c| load(c)).min().unwrap();
                    assert_eq!(load(to), min, "step {step}: not the least loaded");
                    let rid = m.header("rid").unwrap().to_owned();
                    pending.insert(rid, (who, to, reqid, m));
                }
            }
            7 => {
                // Answer a pending request, sometimes from the wrong connection.
                if pending.is_empty() {
                    continue;
                }
                let k = rng.below(pending.len());
                let rid = pending.keys().nth(k).unwrap().clone();
                let (requester, responder, reqid, req) = pending[&rid].clone();
                if rng.below(4) == 0 && who != responder {
                    let out = h.send(who, "RES", &req.target, &[("rid", &rid)], "");
                    assert_refused(&out, who, "RES", &req.target, reason::NOT_YOUR_REQUEST);
                } else {
                    let out = h.answer(responder, &req, "");
                    assert_eq!(receivers(&out), vec![requester], "step {step}");
                    assert_eq!(out[0].1.header("ReqID"), Some(reqid.as_str()));
                    pending.remove(&rid);
                }
            }
            _ => {
                // Reconnect `who` under the same connection id.
                let out = h.leave(who);
                let mut want_errors: Vec<(ConnId, String)> = Vec::new();
                pending.retain(|_, (requester, responder, reqid, _)| {
                    if *responder == who && *requester != who {
                        want_errors.push((*requester, reqid.clone()));
                    }
                    *requester != who && *responder != who
                });
                let mut got: Vec<(ConnId, String)> = out
                    .iter()
                    .map(|(c, m)| {
                        assert_eq!(m.header("reason"), Some("responder disconnected"));
                        (*c, m.header("ReqID").unwrap().to_owned())
                    })
                    .collect();
                got.sort();
                want_errors.sort();
                assert_eq!(got, want_errors, "step {step}");
                for s in subs.values_mut() {
                    s.remove(&who);
                }
                for r in resp.values_mut() {
                    r.remove(&who);
                }
                h.connect_id(who, Role::Service);
            }
        }
        assert_eq!(h.b.router().pending_count(), pending.len(), "step {step}");
    }
    // Every remaining request times out exactly once.
    let out = h.expire(h.now + TIMEOUT);
    assert_eq!(out.len(), pending.len());
    assert_eq!(h.b.router().pending_count(), 0);
}
