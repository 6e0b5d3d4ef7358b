//! Version 1.1 across two nodes and a real nats-server, as one flow a chat service
//! goes through: a grant to a client on the other node, `INT SUB` there, presence
//! gathered from both nodes, events from the other node, a withdrawal, a kick.

mod common;

use std::time::{Duration, Instant};

use common::cluster::*;
use common::nats::NatsServer;
use common::*;

/// Receive until a message matching `want` arrives (skipping others), within 10 s.
fn recv_until(p: &mut Peer, what: &str, want: impl Fn(&Msg) -> bool) -> Msg {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "no {what} within 10 s");
        let m = p.recv();
        if want(&m) {
            return m;
        }
    }
}

#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn grants_int_sub_presence_events_and_kick_cross_nodes() {
    let nats = NatsServer::start();
    let (a, b) = (node(&nats, "r1"), node(&nats, "r1"));
    settled(&[a.addr, b.addr]);
    // A watcher of events on A; the event interest reaches B.
    let mut watch = Peer::service(a.addr);
    for t in ["SYS:CONNECT", "SYS:SUB", "SYS:UNS", "SYS:DISCONNECT"] {
        watch.send("SUB", t, &[], "");
    }
    watch.sync();
    let mut svc = Peer::service(a.addr);
    svc.send("SUB", "room", &[], "");
    svc.sync();
    // Clients on B connect until one's SYS:CONNECT reaches A (the interest has arrived).
    let mut return_client = None;
    let mut client = loop {
        let c = Peer::client(b.addr);
        watch
            .ws
            .get_mut()
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        while let Ok(d) = next_data(&mut watch.ws) {
            let m = parse_one(&d);
            if m.target == "SYS:CONNECT" && m.header("cid") == Some(c.cid.as_str()) {
                assert_eq!(m.header("role"), Some("client"));
                assert_eq!(m.header("uid"), Some(""));
                watch.ws.get_mut().set_read_timeout(Some(WAIT)).unwrap();
                return_client = Some(c);
                break;
            }
        }
        if let Some(c) = return_client.take() {
            break c;
        }
    };
    watch.ws.get_mut().set_read_timeout(Some(WAIT)).unwrap();
    // A grant from A for the client on B: it may subscribe and publish there.
    let ccid = client.cid.clone();
    let fc = [("forcid", ccid.as_str())];
    // (In this order: node B applies what A sends it in order, so the uid is set before
    // the grant lets the SUB through.)
    svc.send(
        "INT",
        "UID",
        &[("forcid", &client.cid), ("setuid", "bea")],
        "",
    );
    svc.send("ESUB", "room", &fc, "");
    svc.send("EPUB", "room", &fc, "");
    svc.sync();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        client.send("SUB", "room", &[], "");
        if !client.sync_or_error() {
            break;
        }
        assert!(Instant::now() < deadline, "grant never reached B");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ev = recv_until(&mut watch, "SYS:SUB", |m| m.target == "SYS:SUB");
    assert_eq!(ev.header("cid"), Some(client.cid.as_str()));
    assert_eq!(ev.header("uid"), Some("bea"));
    assert_eq!(ev.header("topic"), Some("room"));
    // Presence of `room` from A: both nodes, sorted by cid.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        svc.send(
            "REQ",
            "SYS:PRESENCE",
            &[("ReqID", "p1"), ("topic", "room")],
            "",
        );
        let m = svc.recv();
        assert_eq!(m.cmd, "RES", "{m:?}");
        assert_eq!(m.header("ReqID"), Some("p1"));
        assert_eq!(m.header("partial"), None, "{m:?}");
        if m.header("count") == Some("2") {
            assert_eq!(m.header("users"), Some("1"));
            let mut want = [format!("{} bea", client.cid), svc.cid.clone()];
            want.sort();
            assert_eq!(m.body, want.join("\r\n"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "presence never saw B's member: {m:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The client publishes under its grant; the service on A receives it.
    client.send("PUB", "room", &[], "hello");
    let m = recv_until(&mut svc, "the client's message", |m| m.body == "hello");
    assert_eq!(m.header("cid"), Some(client.cid.as_str()));
    // Withdrawn from A: the client is unsubscribed on B (SYS:UNS reaches A).
    svc.send("DSUB", "room", &fc, "");
    let ev = recv_until(&mut watch, "SYS:UNS", |m| m.target == "SYS:UNS");
    assert_eq!(ev.header("cid"), Some(client.cid.as_str()));
    assert_eq!(ev.header("topic"), Some("room"));
    // INT SUB from A to B.
    svc.send(
        "INT",
        "SUB",
        &[("forcid", &client.cid), ("topic", "news")],
        "",
    );
    let ev = recv_until(&mut watch, "SYS:SUB news", |m| m.target == "SYS:SUB");
    assert_eq!(ev.header("topic"), Some("news"));
    // Kicked from A: close 4000 with the reason; SYS:DISCONNECT says kicked.
    svc.send(
        "INT",
        "KICK",
        &[("forcid", &client.cid), ("reason", "bye now")],
        "",
    );
    assert_eq!(client.recv_close(), (4000, "bye now".to_owned()));
    let ev = recv_until(&mut watch, "SYS:DISCONNECT", |m| {
        m.target == "SYS:DISCONNECT"
    });
    assert_eq!(ev.header("cid"), Some(client.cid.as_str()));
    assert_eq!(ev.header("reason"), Some("kicked"));
    drop(client);
    until(10, "the kick counted on B", || {
        metric(
            b.addr,
            "middleman_connections_closed_total{reason=\"kicked\"}",
        ) == 1.0
    });
}

trait SyncOrError {
    /// A round trip; true if an error arrived first (the SUB was refused).
    fn sync_or_error(&mut self) -> bool;
}

impl SyncOrError for Peer {
    fn sync_or_error(&mut self) -> bool {
        let t = format!("MSG:{}", self.cid);
        self.send("SYNC", &t, &[], "");
        let mut refused = false;
        loop {
            let m = self.recv();
            assert_eq!(m.target, "ERROR", "{m:?}");
            if m.header("cmd") == Some("SYNC") {
                return refused;
            }
            assert_eq!(m.header("reason"), Some("not permitted"), "{m:?}");
            refused = true;
        }
    }
}
