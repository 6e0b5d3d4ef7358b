//! Version 1.1 (PROTOCOL.md §9.1-§9.4) at the broker, without sockets: grants and their
//! withdrawal, INT SUB/UNS/KICK, presence and events, with the router's invariants
//! checked after every step.

use std::rc::Rc;
use std::time::Instant;

use middleman::broker::{Broker, Outbox, Role, Settings};
use middleman::protocol::{Decoded, Decoder, Limits, Packet};
use middleman::router::ConnId;

#[derive(Default)]
struct Out {
    sent: Vec<(ConnId, String)>,
    kicked: Vec<(ConnId, String)>,
}

impl Outbox for Out {
    fn send(&mut self, to: ConnId, pkt: &Rc<Packet>) {
        self.sent
            .push((to, String::from_utf8_lossy(pkt.payload()).into_owned()));
    }
    fn kick(&mut self, to: ConnId, reason: &str) {
        self.kicked.push((to, reason.to_owned()));
    }
}

struct H {
    b: Broker,
    next: ConnId,
}

impl H {
    fn new() -> H {
        let settings = Settings {
            max_subscriptions: 3,
            ..Settings::default()
        };
        H {
            b: Broker::new(settings, "tp"),
            next: 0,
        }
    }

    fn connect(&mut self, role: Role) -> (ConnId, String) {
        let id = self.next;
        self.next += 1;
        let cid = self.b.connect(id, role);
        let mut out = Out::default();
        self.b.connected(id, &mut out);
        (id, cid)
    }

    fn send(&mut self, from: ConnId, wire: &str) -> Out {
        let mut d = Decoder::new(Limits::default());
        d.feed(wire.as_bytes());
        let mut out = Out::default();
        while let Ok(Some(Decoded::Message(m))) = d.next() {
            self.b.apply(from, &m, Instant::now(), &mut out);
        }
        if let Err(e) = self.b.router().check_invariants() {
            panic!("router invariant broken: {e}");
        }
        out
    }
}

fn reason(out: &Out) -> Vec<String> {
    out.sent
        .iter()
        .filter(|(_, m)| m.starts_with("PUB ERROR"))
        .filter_map(|(_, m)| {
            m.lines()
                .find_map(|l| l.strip_prefix("reason: ").map(str::to_owned))
        })
        .collect()
}

#[test]
fn a_grant_opens_a_topic_to_one_connection_and_its_withdrawal_unsubscribes_it() {
    let mut h = H::new();
    let (s, _) = h.connect(Role::Service);
    let (a, acid) = h.connect(Role::Client);
    let (b, _) = h.connect(Role::Client);
    let (w, _) = h.connect(Role::Service);
    assert!(h.send(w, "SUB SYS:UNS\n\n.\n").sent.is_empty());
    let out = h.send(
        s,
        &format!("ESUB room\nforcid: {acid}\n\n.\nEPUB room\nforcid: {acid}\n\n.\n"),
    );
    assert!(out.sent.is_empty(), "{:?}", out.sent);
    assert!(h.send(a, "SUB room\n\n.\n").sent.len() <= 1);
    assert_eq!(reason(&h.send(b, "SUB room\n\n.\n")), ["not permitted"]);
    assert_eq!(reason(&h.send(b, "PUB room\n\nhi\n.\n")), ["not permitted"]);
    let out = h.send(a, "PUB room\n\nhi\n.\n");
    assert_eq!(out.sent.len(), 1);
    assert_eq!(out.sent[0].0, a);
    // Withdrawn: unsubscribed at once, with a SYS:UNS event.
    let out = h.send(s, &format!("DSUB room\nforcid: {acid}\n\n.\n"));
    assert_eq!(out.sent.len(), 1, "{:?}", out.sent);
    assert_eq!(out.sent[0].0, w);
    assert!(out.sent[0].1.starts_with(&format!(
        "PUB SYS:UNS\r\ncid: {acid}\r\nuid: \r\nrole: client\r\ntopic: room\r\n"
    )));
    assert!(!h.b.router().is_subscribed(a, b"room"));
    // The publish grant is still there until the service leaves.
    let out = h.send(a, "PUB room\n\nhi\n.\n");
    assert_eq!(out.sent.len(), 0, "{:?}", out.sent);
    let mut out = Out::default();
    h.b.disconnect(s, &mut out);
    assert_eq!(reason(&h.send(a, "PUB room\n\nhi\n.\n")), ["not permitted"]);
    h.b.router().check_invariants().unwrap();
    assert_eq!(
        h.b.router().topic_count(),
        4,
        "three private channels and SYS:UNS"
    );
}

#[test]
fn a_grant_cap_and_bad_forcids_are_errors_and_unknown_cids_are_silent() {
    let mut h = H::new();
    let (s, _) = h.connect(Role::Service);
    let (_, acid) = h.connect(Role::Client);
    for t in ["a", "b", "c"] {
        assert!(h
            .send(s, &format!("ESUB {t}\nforcid: {acid}\n\n.\n"))
            .sent
            .is_empty());
    }
    let out = h.send(s, &format!("ESUB d\nforcid: {acid}\n\n.\n"));
    assert_eq!(reason(&out), ["too many grants"]);
    assert_eq!(
        reason(&h.send(s, "ESUB d\nforcid: NOT-A-CID\n\n.\n")),
        ["bad cid"]
    );
    assert!(h.send(s, "ESUB d\nforcid: tpzzzz\n\n.\n").sent.is_empty());
    assert_eq!(
        reason(&h.send(s, "INT SUB\nforcid: tp1\n\n.\n")),
        ["missing header"]
    );
    assert_eq!(
        reason(&h.send(s, &format!("INT SUB\nforcid: {acid}\ntopic: SYS:X\n\n.\n"))),
        ["not permitted"]
    );
    assert_eq!(
        reason(&h.send(s, "PUB SYS:CONNECT\n\n.\n")),
        ["not permitted"]
    );
    assert_eq!(
        reason(&h.send(s, "ESUB SYS:CONNECT\n\n.\n")),
        ["not permitted"]
    );
    assert_eq!(
        reason(&h.send(s, "REQ SYS:PRESENCE\nReqID: 1\ntopic: a\nlimit: x\n\n.\n")),
        ["bad limit"]
    );
}

#[test]
fn int_sub_kick_presence_and_events() {
    let mut h = H::new();
    let (s, _) = h.connect(Role::Service);
    let (w, _) = h.connect(Role::Service);
    for t in ["SYS:CONNECT", "SYS:SUB", "SYS:DISCONNECT"] {
        assert!(h.send(w, &format!("SUB {t}\n\n.\n")).sent.is_empty());
    }
    let id = h.next;
    h.next += 1;
    let cid = h.b.connect(id, Role::Client);
    let mut out = Out::default();
    h.b.connected(id, &mut out);
    assert_eq!(out.sent.len(), 1);
    assert_eq!(
        out.sent[0].1,
        format!("PUB SYS:CONNECT\r\ncid: {cid}\r\nuid: \r\nrole: client\r\n\r\n\r\n.\r\n")
    );
    h.send(s, &format!("INT UID\nforcid: {cid}\nsetuid: ann\n\n.\n"));
    let out = h.send(s, &format!("INT SUB\nforcid: {cid}\ntopic: room\n\n.\n"));
    assert_eq!(out.sent.len(), 1);
    assert!(out.sent[0].1.contains("topic: room"));
    h.send(s, "SUB room\n\n.\n");
    let out = h.send(s, "REQ SYS:PRESENCE\nreqid: 7\ntopic: room\n\n.\n");
    let scid = h.b.cid(s).unwrap().to_owned();
    let mut lines = [format!("{cid} ann"), scid];
    lines.sort();
    assert_eq!(
        out.sent.last().unwrap().1,
        format!(
            "RES SYS:PRESENCE\r\nreqid: 7\r\ncount: 2\r\nusers: 1\r\n\r\n{}\r\n.\r\n",
            lines.join("\r\n")
        )
    );
    let out = h.send(
        s,
        "REQ SYS:PRESENCE\nReqID: 8\ntopic: room\nlimit: 1\n\n.\n",
    );
    assert!(out.sent[0].1.contains("truncated: true\r\n"));
    let long = "é".repeat(100);
    let out = h.send(
        s,
        &format!("INT KICK\nforcid: {cid}\nreason: {long}\n\n.\n"),
    );
    assert_eq!(out.kicked.len(), 1);
    assert_eq!(out.kicked[0].1, "é".repeat(60));
    let mut out = Out::default();
    h.b.disconnect_because(id, "kicked", &mut out);
    assert_eq!(
        out.sent[0].1,
        format!("PUB SYS:DISCONNECT\r\ncid: {cid}\r\nuid: ann\r\nrole: client\r\nreason: kicked\r\n\r\n\r\n.\r\n")
    );
    h.b.router().check_invariants().unwrap();
}
