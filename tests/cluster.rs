//! Several middleman nodes as one cluster through a real nats-server on an ephemeral
//! loopback port (PROTOCOL.md §3-§7 seen from any node). Each test starts its own
//! nats-server and nodes; nodes run in this process, except the one killed with SIGKILL.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::cluster::*;
use common::nats::NatsServer;
use common::proc::Proc;
use common::*;

/// Send requests until one is answered (the responder's node is known to the
/// requester's), reading the answers (or errors) of the ones sent before.
fn await_responder(requester: &mut Peer, target: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in 0.. {
        requester.send("REQ", target, &[("ReqID", &format!("probe-{i}"))], "probe");
        let m = requester.recv();
        if m.target != "ERROR" {
            assert_eq!(m.header("ReqID"), Some(format!("probe-{i}").as_str()));
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no responder for {target}: {m:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A responder loop run by hand: answer one request with `body`.
fn answer_one(responder: &mut Peer, body: &str) -> Msg {
    let req = responder.recv();
    assert_eq!(req.cmd, "REQ", "{req:?}");
    let rid = req.header("rid").expect("rid").to_owned();
    responder.send("RES", &req.target, &[("rid", &rid)], body);
    req
}

#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn published_messages_cross_nodes_in_order_without_duplicates() {
    let nats = NatsServer::start();
    let (a, b, c) = (node(&nats, "t1"), node(&nats, "t1"), node(&nats, "t1"));
    settled(&[a.addr, b.addr, c.addr]);
    let mut publisher = Peer::service(a.addr);
    let mut sub_b = Peer::service(b.addr);
    let mut sub_c = Peer::service(c.addr);
    let mut local = Peer::service(a.addr);
    for s in [&mut sub_b, &mut sub_c, &mut local] {
        s.send("SUB", "room", &[], "");
        s.sync();
    }
    await_routes(
        &mut publisher,
        &mut [&mut sub_b, &mut sub_c, &mut local],
        "room",
    );
    const N: usize = 2000;
    for i in 0..N {
        publisher.send("PUB", "room", &[("n", &i.to_string())], &format!("m{i}"));
    }
    publisher.send("PUB", "room", &[], "end");
    for (who, s) in [("B", &mut sub_b), ("C", &mut sub_c), ("A", &mut local)] {
        for i in 0..N {
            let m = s.recv();
            assert_eq!(m.body, format!("m{i}"), "node {who}, message {i}");
            assert_eq!(m.header("cid"), Some(publisher.cid.as_str()));
            assert_eq!(m.headers_named("cid").len(), 1, "one cid header");
        }
        assert_eq!(
            s.recv().body,
            "end",
            "node {who}: nothing more, no duplicate"
        );
    }
    // Nothing lost, nothing dropped.
    assert_eq!(
        metric(
            a.addr,
            "middleman_cluster_dropped_total{reason=\"buffer_full\"}"
        ),
        0.0
    );
    // /stats (behind /console) lists the two other nodes, by the cids' prefix.
    let stats = http_get(a.addr, "GET /stats HTTP/1.1\r\nHost: x\r\n\r\n");
    let json: serde_json::Value =
        serde_json::from_str(stats.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let mut ids: Vec<String> = json["cluster"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    let mut expect = vec![sub_b.cid[..6].to_owned(), sub_c.cid[..6].to_owned()];
    expect.sort();
    assert_eq!(ids, expect);
    assert_eq!(json["cluster"]["connected"], true);
}

#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn an_enablement_made_on_one_node_holds_on_another_and_lapses_with_its_service() {
    let nats = NatsServer::start();
    let (a, b, c) = (node(&nats, "t2"), node(&nats, "t2"), node(&nats, "t2"));
    settled(&[a.addr, b.addr, c.addr]);
    let mut client = Peer::client(b.addr);
    let mut third = Peer::client(c.addr);
    // Before: refused on B.
    client.send("SUB", "news", &[], "");
    let e = client.recv();
    assert_eq!(e.header("reason"), Some("not permitted"));
    let mut svc = Peer::service(a.addr);
    svc.send("ESUB", "news", &[], "");
    svc.send("EPUB", "news", &[], "");
    svc.send("EREQ", "ask", &[], "");
    svc.sync();
    // The announcement reaches B: a client SUB there is accepted.
    until(10, "ESUB from A known on B", || {
        !sub_refused(&mut client, "news")
    });
    // The client publishes on B, the service on A receives it (it subscribes; the
    // client does not, so that its probes do not come back to it).
    client.send("UNS", "news", &[], "");
    svc.send("SUB", "news", &[], "");
    svc.sync();
    await_route(&mut client, &mut svc, "news");
    client.send("PUB", "news", &[], "from b");
    let m = svc.recv();
    assert_eq!(
        (m.body.as_str(), m.header("cid")),
        ("from b", Some(client.cid.as_str()))
    );
    // The client requests `ask` on B; the service on A answers.
    client.send("REQ", "ask", &[("ReqID", "q1")], "question");
    let req = answer_one(&mut svc, "answer");
    assert_eq!(req.body, "question");
    assert_eq!(req.header("cid"), Some(client.cid.as_str()));
    let res = client.recv();
    assert_eq!((res.cmd.as_str(), res.body.as_str()), ("RES", "answer"));
    assert_eq!(res.header("ReqID"), Some("q1"));
    assert_eq!(res.header("rid"), None);
    assert_eq!(res.header("cid"), Some(svc.cid.as_str()));
    // A third node holds it as well.
    until(10, "ESUB from A known on C", || {
        !sub_refused(&mut third, "news")
    });
    // The service leaves: its enablements lapse on B and C (at once, by announcement).
    drop(svc);
    until(10, "ESUB lapsed on B", || sub_refused(&mut client, "news"));
    client.send("PUB", "news", &[], "x");
    assert_eq!(client.recv().header("reason"), Some("not permitted"));
    until(10, "ESUB lapsed on C", || sub_refused(&mut third, "news"));
    client.send("REQ", "ask", &[("ReqID", "q2")], "");
    let e = client.recv();
    assert_eq!(
        (e.header("reason"), e.header("ReqID")),
        (Some("no responder"), Some("q2"))
    );
}

#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn requests_spread_over_responders_on_two_nodes_and_fail_at_once_with_none() {
    let nats = NatsServer::start();
    let (a, b, c) = (node(&nats, "t3"), node(&nats, "t3"), node(&nats, "t3"));
    settled(&[a.addr, b.addr, c.addr]);
    let mut ra = Peer::service(a.addr);
    let mut rb = Peer::service(b.addr);
    for r in [&mut ra, &mut rb] {
        r.send("EREQ", "work", &[], "");
        r.sync();
    }
    let mut requester = Peer::service(c.addr);
    // With none anywhere: at once.
    let t = Instant::now();
    requester.send("REQ", "nobody", &[("ReqID", "n1")], "");
    let e = requester.recv();
    assert_eq!(
        (e.header("reason"), e.header("ReqID")),
        (Some("no responder"), Some("n1"))
    );
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // Both responders known on C (their announcements arrived).
    until(10, "both responders known on C", || {
        metric(c.addr, "middleman_cluster_remote_responders") == 2.0
    });
    // Answer in two threads; count who answered.
    let answerer = |mut p: Peer, name: &'static str| {
        std::thread::spawn(move || {
            p.ws.get_mut()
                .set_read_timeout(Some(Duration::from_millis(1500)))
                .unwrap();
            let mut n = 0;
            while let Ok(d) = next_data(&mut p.ws) {
                let req = parse_one(&d);
                if req.cmd != "REQ" {
                    continue;
                }
                let rid = req.header("rid").unwrap().to_owned();
                p.send("RES", "work", &[("rid", &rid)], name);
                n += 1;
            }
            n
        })
    };
    let ta = answerer(ra, "a");
    let tb = answerer(rb, "b");
    const N: usize = 200;
    let mut from = std::collections::HashMap::new();
    for i in 0..N {
        requester.send("REQ", "work", &[("ReqID", &format!("r{i}"))], "");
        let res = requester.recv();
        assert_eq!(res.cmd, "RES", "{res:?}");
        assert_eq!(res.header("ReqID"), Some(format!("r{i}").as_str()));
        *from.entry(res.body.clone()).or_insert(0) += 1;
    }
    let (na, nb) = (ta.join().unwrap(), tb.join().unwrap());
    assert_eq!(na + nb, N);
    assert!(na > 0 && nb > 0, "spread over both nodes: a {na}, b {nb}");
    assert_eq!(from.get("a"), Some(&na));
    assert_eq!(from.get("b"), Some(&nb));
}

#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn a_responder_node_killed_fails_its_requests_and_its_enablements_lapse() {
    let nats = NatsServer::start();
    let a = node(&nats, "t4");
    let url = nats.url();
    let b = Proc::start(
        &node_args(&url, "t4", &["--cluster-node-timeout", "3s"]),
        &[],
    );
    let b_addr = b.addr();
    settled(&[a.addr, b_addr]);
    let mut responder = Peer::service(b_addr);
    responder.send("EREQ", "slow", &[], "");
    responder.sync();
    let mut requester = Peer::client(a.addr);
    // Known on A: requests reach B (answered once, to be sure of the route).
    let helper = std::thread::spawn(move || {
        let _ = answer_one(&mut responder, "first");
        responder // keeps the connection; the next request is never answered
    });
    await_responder(&mut requester, "slow");
    let mut responder = helper.join().unwrap();
    requester.send("REQ", "slow", &[("ReqID", "pending-1")], "");
    let req = responder.recv();
    assert_eq!(req.header("ReqID"), Some("pending-1"));
    // Kill B without a goodbye.
    // SAFETY: kill(2) on the child this test started, by its PID.
    unsafe {
        libc::kill(b.child.id() as i32, libc::SIGKILL);
    }
    let t = Instant::now();
    let e = requester.recv();
    assert_eq!(
        (e.header("reason"), e.header("ReqID")),
        (Some("responder disconnected"), Some("pending-1"))
    );
    // Nothing tells A at once (nats-server does not say a client left): B's heartbeats
    // stop, and after the node timeout (3 s, checked every 250 ms) B is gone.
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(2500) && waited < Duration::from_millis(4500),
        "failed after {waited:?}"
    );
    // B's EREQ lapsed with it: the client may not request `slow` any more.
    requester.send("REQ", "slow", &[("ReqID", "after")], "");
    let e = requester.recv();
    assert_eq!(
        (e.header("reason"), e.header("ReqID")),
        (Some("no responder"), Some("after"))
    );
    assert_eq!(metric(a.addr, "middleman_cluster_nodes"), 0.0);
    drop(b);
}

#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn private_messages_and_uids_reach_connections_on_other_nodes() {
    let nats = NatsServer::start();
    let (a, b) = (node(&nats, "t5"), node(&nats, "t5"));
    settled(&[a.addr, b.addr]);
    let mut svc = Peer::service(a.addr);
    let mut client = Peer::client(b.addr);
    svc.send("PUB", &format!("MSG:{}", client.cid), &[], "hello there");
    let m = client.recv();
    assert_eq!(
        (m.target.clone(), m.body.as_str()),
        (format!("MSG:{}", client.cid), "hello there")
    );
    assert_eq!(m.header("cid"), Some(svc.cid.as_str()));
    // INT UID for the client's cid, sent on A, applies on B.
    svc.send(
        "INT",
        "UID",
        &[("forcid", &client.cid), ("setuid", "alice")],
        "",
    );
    svc.send("EPUB", "chat", &[], "");
    svc.send("SUB", "chat", &[], "");
    svc.sync();
    // Its next PUB carries the uid (retried until the uid and the route have arrived).
    until(10, "uid set across nodes", || {
        client.send("PUB", "chat", &[], "hi");
        svc.ws
            .get_mut()
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        match next_data(&mut svc.ws) {
            Ok(d) => parse_one(&d).header("uid") == Some("alice"),
            Err(_) => {
                // Not permitted yet on B (EPUB in flight): read the refusal away.
                false
            }
        }
    });
}

#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn a_monitor_on_a_third_node_sees_traffic_between_two_others() {
    let nats = NatsServer::start();
    let (a, b, c) = (node(&nats, "t6"), node(&nats, "t6"), node(&nats, "t6"));
    settled(&[a.addr, b.addr, c.addr]);
    let mut monitor = Peer::monitor(c.addr);
    let mut publisher = Peer::service(a.addr);
    let mut sub = Peer::service(b.addr);
    sub.send("SUB", "feed", &[], "");
    sub.send("EREQ", "calc", &[], "");
    sub.sync();
    await_route(&mut publisher, &mut sub, "feed");
    // The monitor saw the probes; skip to a marked message.
    publisher.send("PUB", "feed", &[], "watched");
    assert_eq!(sub.recv().body, "watched");
    let deadline = Instant::now() + WAIT;
    loop {
        let m = monitor.recv();
        if m.body == "watched" {
            assert_eq!(m.header("cid"), Some(publisher.cid.as_str()));
            break;
        }
        assert!(Instant::now() < deadline);
    }
    // A request from A answered on B: the monitor sees the REQ and the RES.
    until(10, "A knows B's responder", || {
        metric(a.addr, "middleman_cluster_nodes") == 2.0
    });
    publisher.send("REQ", "calc", &[("ReqID", "m1")], "2+2");
    let req = answer_one(&mut sub, "4");
    assert_eq!(req.body, "2+2");
    let res = publisher.recv();
    assert_eq!((res.body.as_str(), res.header("ReqID")), ("4", Some("m1")));
    let (mut saw_req, mut saw_res) = (false, false);
    while !(saw_req && saw_res) {
        let m = monitor.recv();
        saw_req |= m.cmd == "REQ" && m.body == "2+2";
        saw_res |= m.cmd == "RES" && m.body == "4";
    }
}

#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn nodes_reconnect_after_nats_server_restarts_and_count_what_was_lost() {
    let mut nats = NatsServer::start();
    let (a, b) = (node(&nats, "t7"), node(&nats, "t7"));
    settled(&[a.addr, b.addr]);
    let mut publisher = Peer::service(a.addr);
    let mut sub = Peer::service(b.addr);
    sub.send("SUB", "live", &[], "");
    sub.sync();
    // An enablement made on A, in force on B before the outage.
    let mut svc = Peer::service(a.addr);
    svc.send("ESUB", "guarded", &[], "");
    svc.sync();
    let mut client = Peer::client(b.addr);
    until(10, "ESUB from A in force on B", || {
        !sub_refused(&mut client, "guarded")
    });
    await_route(&mut publisher, &mut sub, "live");
    nats.stop();
    until(10, "A sees the backplane down", || {
        metric(a.addr, "middleman_cluster_connected") == 0.0
    });
    // Published during the outage: lost for B, counted on A; local delivery goes on.
    let mut local = Peer::service(a.addr);
    local.send("SUB", "live", &[], "");
    local.sync();
    for i in 0..10 {
        publisher.send("PUB", "live", &[], &format!("lost {i}"));
    }
    for i in 0..10 {
        assert_eq!(local.recv().body, format!("lost {i}"));
    }
    assert!(
        metric(
            a.addr,
            "middleman_cluster_dropped_total{reason=\"disconnected\"}"
        ) >= 10.0
    );
    // Past the node timeout, B no longer counts A's enablement (A is unheard).
    until(10, "A forgotten by B", || {
        metric(b.addr, "middleman_cluster_nodes") == 0.0
    });
    assert!(
        sub_refused(&mut client, "guarded"),
        "lapsed during the outage"
    );
    nats.start_again();
    settled(&[a.addr, b.addr]);
    assert!(metric(a.addr, "middleman_cluster_reconnects_total") >= 1.0);
    // Re-synced: the enablement holds on B again.
    until(10, "ESUB back on B after the resync", || {
        !sub_refused(&mut client, "guarded")
    });
    // Resubscribed: traffic resumes.
    await_route(&mut publisher, &mut sub, "live");
    publisher.send("PUB", "live", &[], "after");
    assert_eq!(sub.recv().body, "after");
}

#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn a_stalled_backplane_neither_slows_local_traffic_nor_grows_past_its_bound() {
    let nats = NatsServer::start();
    let bound = 1 << 20;
    let a = node_with(&nats, "t8", |c| c.max_pending = bound);
    let b = node(&nats, "t8");
    settled(&[a.addr, b.addr]);
    let mut publisher = Peer::service(a.addr);
    let mut local = Peer::service(a.addr);
    local.send("SUB", "bulk", &[], "");
    local.sync();
    nats.signal(libc::SIGSTOP);
    let body = format!("{}\n", "x".repeat(1023)).repeat(32); // 32 KiB in lines of 1 KiB
    let mut worst = Duration::ZERO;
    for i in 0..400 {
        let t = Instant::now();
        publisher.send("PUB", "bulk", &[("n", &i.to_string())], &body);
        let d = next_data(&mut local.ws).unwrap_or_else(|e| panic!("message {i}: {e}"));
        let m = parse_one(&d);
        worst = worst.max(t.elapsed());
        assert_eq!(m.header("n"), Some(i.to_string().as_str()));
    }
    let pending = metric(a.addr, "middleman_cluster_pending_bytes");
    let dropped = metric(
        a.addr,
        "middleman_cluster_dropped_total{reason=\"buffer_full\"}",
    );
    nats.signal(libc::SIGCONT);
    assert!(pending <= bound as f64, "pending {pending} > bound {bound}");
    assert!(dropped > 0.0, "12.5 MiB into a 1 MiB bound: some dropped");
    assert!(
        worst < Duration::from_millis(500),
        "local round trip up to {worst:?}"
    );
    drop(b);
}

#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn two_nodes_sharing_one_port_with_reuse_port_serve_as_one() {
    use middleman::transport::Listen;
    let nats = NatsServer::start();
    let cc = cluster_config(&nats, "t9");
    let first = {
        let cc = cc.clone();
        TestServer::with(move |c| {
            c.reuse_port = true;
            c.cluster = Some(cc);
        })
    };
    let port = first.addr.port();
    let second = TestServer::with(move |c| {
        c.reuse_port = true;
        c.listeners = vec![Listen::ws(SocketAddr::from(([127, 0, 0, 1], port)))];
        c.cluster = Some(cc);
    });
    assert_eq!(second.addr, first.addr);
    settled(&[first.addr, second.addr]);
    // Without SO_REUSEPORT on the second, the port is refused.
    let taken = std::panic::catch_unwind(|| {
        TestServer::with(move |c| {
            c.listeners = vec![Listen::ws(SocketAddr::from(([127, 0, 0, 1], port)))];
        })
    });
    assert!(
        taken.is_err(),
        "a third listener without --reuse-port must fail to bind"
    );
    // 40 subscribers on the shared port land on both processes (Linux hashes each
    // connection to one); one publisher reaches them all through the backplane.
    let before: Vec<f64> = [first.addr, second.addr]
        .iter()
        .map(|&a| metric(a, "middleman_connections{role=\"service\"}"))
        .collect();
    let mut subs: Vec<Peer> = (0..40).map(|_| Peer::service(first.addr)).collect();
    let after: Vec<f64> = [first.addr, second.addr]
        .iter()
        .map(|&a| metric(a, "middleman_connections{role=\"service\"}"))
        .collect();
    assert!(
        after[0] > before[0] && after[1] > before[1],
        "connections on both processes: {before:?} -> {after:?}"
    );
    for s in &mut subs {
        s.send("SUB", "shared", &[], "");
        s.sync();
    }
    let mut publisher = Peer::service(first.addr);
    let mut refs: Vec<&mut Peer> = subs.iter_mut().collect();
    await_routes(&mut publisher, &mut refs, "shared");
    publisher.send("PUB", "shared", &[], "to all");
    for s in &mut subs {
        assert_eq!(s.recv().body, "to all");
    }
}

#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn a_message_over_the_backplanes_max_payload_stays_on_its_node_and_is_counted() {
    let nats = NatsServer::start_with_config("max_payload: 4096\n");
    let (a, b) = (node(&nats, "t10"), node(&nats, "t10"));
    settled(&[a.addr, b.addr]);
    let mut publisher = Peer::service(a.addr);
    let mut local = Peer::service(a.addr);
    let mut remote = Peer::service(b.addr);
    for s in [&mut local, &mut remote] {
        s.send("SUB", "big", &[], "");
        s.sync();
    }
    await_routes(&mut publisher, &mut [&mut local, &mut remote], "big");
    let body = format!("{}\n", "y".repeat(999)).repeat(8); // 8,000 bytes > 4,096
    publisher.send("PUB", "big", &[], &body);
    publisher.send("PUB", "big", &[], "small");
    let m = local.recv();
    assert_eq!(m.body.len(), body.len(), "delivered on its own node");
    assert_eq!(local.recv().body, "small");
    assert_eq!(remote.recv().body, "small", "the large one did not cross");
    assert_eq!(
        metric(
            a.addr,
            "middleman_cluster_dropped_total{reason=\"too_large\"}"
        ),
        1.0
    );
}

#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn a_request_forwarded_to_another_node_times_out_like_a_local_one() {
    let nats = NatsServer::start();
    let cc = cluster_config(&nats, "t11");
    let a = {
        let cc = cc.clone();
        TestServer::with(move |c| {
            c.request_timeout = Duration::from_millis(700);
            c.cluster = Some(cc);
        })
    };
    let b = TestServer::with(move |c| {
        c.request_timeout = Duration::from_millis(700);
        c.cluster = Some(cc);
    });
    settled(&[a.addr, b.addr]);
    let mut responder = Peer::service(b.addr);
    responder.send("EREQ", "mute", &[], "");
    responder.sync();
    let mut requester = Peer::service(a.addr);
    let h = std::thread::spawn(move || {
        let _ = answer_one(&mut responder, "once");
        let req = responder.recv(); // the next one is never answered
        (responder, req)
    });
    await_responder(&mut requester, "mute");
    let t = Instant::now();
    requester.send("REQ", "mute", &[("ReqID", "late")], "");
    let (mut responder, req) = h.join().unwrap();
    assert_eq!(req.header("ReqID"), Some("late"));
    let e = requester.recv();
    assert_eq!(
        (e.header("reason"), e.header("ReqID")),
        (Some("request timed out"), Some("late"))
    );
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(650) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    // A late answer is dropped silently (§6.5): the requester gets nothing more.
    let rid = req.header("rid").unwrap().to_owned();
    responder.send("RES", "mute", &[("rid", &rid)], "too late");
    requester.sync();
}

#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn nodes_authenticate_to_nats_server_with_a_token_or_user_and_password() {
    let nats = NatsServer::start_with_config(
        "authorization {\n  users = [\n    { user: node, password: \"pw-1\" }\n  ]\n}\n",
    );
    let a = node_with(&nats, "t12", |c| {
        c.user = Some("node".into());
        c.password = Some("pw-1".into());
    });
    let b = node_with(&nats, "t12", |c| {
        c.user = Some("node".into());
        c.password = Some("pw-1".into());
    });
    settled(&[a.addr, b.addr]);
    // Wrong credentials: the node keeps serving locally and never connects.
    let c = node_with(&nats, "t12", |c| {
        c.user = Some("node".into());
        c.password = Some("wrong".into());
    });
    let mut s = Peer::service(c.addr);
    s.sync();
    let deadline = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < deadline {
        assert_eq!(metric(c.addr, "middleman_cluster_connected"), 0.0);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(metric(a.addr, "middleman_cluster_nodes"), 1.0);

    let tok = NatsServer::start_with_config("authorization {\n  token: \"tk-2\"\n}\n");
    let d = node_with(&tok, "t13", |c| c.token = Some("tk-2".into()));
    let e = node_with(&tok, "t13", |c| c.token = Some("tk-2".into()));
    settled(&[d.addr, e.addr]);
}
