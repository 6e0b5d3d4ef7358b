//! Protocol 1.1 across a cluster (PROTOCOL.md §9 preamble: "Everything here holds
//! cluster-wide: a `forcid` on another node, presence, events and history behave as on
//! one node"): the real binary as nodes joined through a real nats-server on an
//! ephemeral loopback port. Each test starts its own nats-server and nodes; a node that
//! is killed or stopped is signalled by its PID.

mod common;

use std::time::{Duration, Instant};

use common::cluster::*;
use common::nats::NatsServer;
use common::proc::Proc;
use common::v11::*;
use common::*;

/// A node of cluster `name` (the real binary), with `extra` arguments.
fn start_node(nats: &NatsServer, name: &str, extra: &[&str]) -> Server {
    let url = nats.url();
    Server::from_proc(Proc::start(&node_args(&url, name, extra), &[]))
}

/// `n` nodes of cluster `name`, settled (each hears all the others).
fn cluster(nats: &NatsServer, name: &str, n: usize, extra: &[&str]) -> Vec<Server> {
    let nodes: Vec<Server> = (0..n).map(|_| start_node(nats, name, extra)).collect();
    settled(&nodes.iter().map(|s| s.addr).collect::<Vec<_>>());
    nodes
}

/// Try `PUB topic` as `client` (nobody may be subscribed to it but the server's answer):
/// true if refused `not permitted`, false if accepted. An unknown command after it
/// always gets an error back, which tells an accepted PUB (no answer) apart.
fn pub_refused(client: &mut Peer, topic: &str) -> bool {
    client.send("PUB", topic, &[], "probe");
    client.send("UNKNOWN", "probe", &[], "");
    let m = client.recv();
    if m.header("cmd") == Some("UNKNOWN") {
        return false;
    }
    assert_eq!(m.header("reason"), Some("not permitted"), "{m:?}");
    assert_eq!(client.recv().header("cmd"), Some("UNKNOWN"));
    true
}

/// Publish probes on `topic` from `publisher` until `sub` receives one (its node has
/// subscribed the topic on the backplane), then read it up to an end marker, so that
/// nothing of the probing is left unread.
fn await_route(publisher: &mut Peer, sub: &mut Peer, topic: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "no route to {topic} within 10s");
        publisher.send("PUB", topic, &[], "probe");
        let got = read_for(sub, Duration::from_millis(30));
        if !got.is_empty() {
            for m in got {
                assert_eq!((m.target.as_str(), m.body.as_str()), (topic, "probe"));
            }
            break;
        }
    }
    publisher.send("PUB", topic, &[], "probe-end");
    loop {
        let m = sub.recv();
        assert_eq!(m.target, topic, "{m:?}");
        if m.body == "probe-end" {
            break;
        }
        assert_eq!(m.body, "probe");
    }
}

/// Read `p`'s messages on `topic` up to the end marker of [`await_route`] (a subscriber
/// on the publisher's side receives the probes too).
fn skip_to_end(p: &mut Peer, topic: &str) {
    loop {
        let m = p.recv();
        assert_eq!(m.target, topic, "{m:?}");
        if m.body == "probe-end" {
            return;
        }
        assert_eq!(m.body, "probe", "{m:?}");
    }
}

/// A service on node `from` sends `PUB MSG:<cid>` with `marker`; the next message `p`
/// receives must be that marker (nothing published before it reached `p`).
fn next_is_marker(svc: &mut Peer, p: &mut Peer, marker: &str) {
    let t = format!("MSG:{}", p.cid);
    svc.send("PUB", &t, &[], marker);
    let m = p.recv();
    assert_eq!(
        (m.target.as_str(), m.body.as_str()),
        (t.as_str(), marker),
        "{m:?}"
    );
}

// ---------------------------------------------------------------------------------------
// §9.1 grants across nodes
// ---------------------------------------------------------------------------------------

/// A grant from a service on A to a client on B lets that client SUB and PUB there;
/// another client on B may not. DSUB forcid from A unsubscribes it on B.
#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn a_grant_to_a_connection_on_another_node_and_its_withdrawal() {
    let nats = NatsServer::start();
    let n = cluster(&nats, "g1", 2, &[]);
    let mut svc = Peer::service(n[0].addr);
    let mut sa = Peer::service(n[0].addr);
    let mut cb = Peer::client(n[1].addr);
    let mut other = Peer::client(n[1].addr);
    for_cid(&mut svc, "ESUB", "room", &cb.cid);
    for_cid(&mut svc, "EPUB", "room", &cb.cid);
    sa.send("SUB", "room", &[], "");
    svc.sync();
    sa.sync();
    until(10, "the grant from A applies on B", || {
        !sub_refused(&mut cb, "room")
    });
    assert!(
        sub_refused(&mut other, "room"),
        "no grant for the other client"
    );
    other.send("PUB", "room", &[], "x");
    expect_error(&mut other, "PUB", "room", "not permitted");
    // Routes both ways (the probes also reach the publisher's node's subscriber).
    await_route(&mut svc, &mut cb, "room");
    skip_to_end(&mut sa, "room");
    await_route(&mut cb, &mut sa, "room");
    skip_to_end(&mut cb, "room");
    // cb publishes on B: the service on A and cb itself receive it.
    cb.send("PUB", "room", &[], "from b");
    let cbcid = cb.cid.clone();
    expect_pub(&mut sa, "room", "from b", &cbcid);
    expect_pub(&mut cb, "room", "from b", &cbcid);
    // DSUB forcid from A: cb is unsubscribed before A's next PUB reaches B.
    for_cid(&mut svc, "DSUB", "room", &cb.cid);
    svc.send("PUB", "room", &[], "after");
    expect_pub(&mut sa, "room", "after", &svc.cid);
    next_is_marker(&mut svc, &mut cb, "marker");
    quiet(&mut cb, "unsubscribed by DSUB forcid from another node");
    assert!(sub_refused(&mut cb, "room"), "the grant is withdrawn");
    quiet(&mut other, "never subscribed");
    quiet(&mut sa, "nothing else");
}

/// §9.1 cluster-wide: DSUB / DPUB / DREQ without forcid from a service on A withdraw its
/// enablements on B too, and DREQ ends its role as responder for requests from B.
#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn withdrawals_without_forcid_hold_on_another_node() {
    let nats = NatsServer::start();
    let n = cluster(&nats, "g4", 2, &[]);
    let mut svc = Peer::service(n[0].addr);
    let mut cb = Peer::client(n[1].addr);
    let mut sb = Peer::service(n[1].addr);
    svc.send("ESUB", "room", &[], "");
    svc.send("EPUB", "lobby", &[], "");
    svc.send("EREQ", "ask", &[], "");
    svc.sync();
    until(10, "the enablements from A hold on B", || {
        !sub_refused(&mut cb, "room") && !pub_refused(&mut cb, "lobby")
    });
    // A request from B reaches the responder on A.
    until(10, "the responder on A known on B", || {
        sb.send("REQ", "ask", &[("ReqID", "probe")], "");
        let got = read_for(&mut svc, Duration::from_millis(100));
        if let Some(req) = got.first() {
            let rid = req.header("rid").unwrap().to_owned();
            svc.send("RES", "ask", &[("rid", &rid)], "ok");
            let res = sb.recv();
            assert_eq!(res.cmd, "RES", "{res:?}");
            true
        } else {
            let e = sb.recv();
            assert_eq!(e.header("reason"), Some("no responder"), "{e:?}");
            false
        }
    });
    svc.send("DSUB", "room", &[], "");
    svc.send("DPUB", "lobby", &[], "");
    svc.send("DREQ", "ask", &[], "");
    svc.sync();
    until(10, "the withdrawals reach B", || {
        sub_refused(&mut cb, "room") && pub_refused(&mut cb, "lobby")
    });
    until(10, "no responder for requests from B", || {
        sb.send("REQ", "ask", &[("ReqID", "after")], "");
        let m = sb.recv();
        assert_eq!(m.target, "ERROR", "{m:?}");
        m.header("reason") == Some("no responder")
    });
    quiet(&mut svc, "no request reaches the withdrawn responder");
}

/// §9.1: a grant ends when its service leaves (existing subscriptions stay, new SUB/PUB
/// refused) — the service on another node, which leaves normally.
#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn grants_from_a_service_on_another_node_end_when_it_leaves() {
    let nats = NatsServer::start();
    let n = cluster(&nats, "g2", 2, &[]);
    let mut svc = Peer::service(n[0].addr);
    let mut publisher = Peer::service(n[0].addr);
    let mut cb = Peer::client(n[1].addr);
    for_cid(&mut svc, "ESUB", "room", &cb.cid);
    for_cid(&mut svc, "EPUB", "lobby", &cb.cid);
    svc.sync();
    // Both grants (they may be applied one after the other).
    until(10, "the grants from A apply on B", || {
        !sub_refused(&mut cb, "room") && !pub_refused(&mut cb, "lobby")
    });
    // A grant, not an enablement: another client on B has neither right.
    let mut other = Peer::client(n[1].addr);
    assert!(sub_refused(&mut other, "room"));
    assert!(pub_refused(&mut other, "lobby"));
    await_route(&mut publisher, &mut cb, "room");
    leave(svc);
    until(10, "the grants lapse on B", || {
        pub_refused(&mut cb, "lobby")
    });
    // The subscription stays.
    publisher.send("PUB", "room", &[], "stays");
    expect_pub(&mut cb, "room", "stays", &publisher.cid.clone());
    cb.send("UNS", "room", &[], "");
    cb.send("SUB", "room", &[], "");
    expect_error(&mut cb, "SUB", "room", "not permitted");
}

/// §9.1: "When a global enablement or a grant ends any other way (its service leaves, the
/// service's node is gone), existing subscriptions stay": the granting service's node is
/// killed by its PID.
#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn grants_end_when_the_granting_services_node_is_killed() {
    let nats = NatsServer::start();
    let timeout = ["--cluster-node-timeout", "3s"];
    let n = cluster(&nats, "g3", 2, &timeout);
    let c = start_node(&nats, "g3", &timeout);
    settled(&[n[0].addr, n[1].addr, c.addr]);
    let mut svc = Peer::service(c.addr);
    let mut publisher = Peer::service(n[0].addr);
    let mut cb = Peer::client(n[1].addr);
    for_cid(&mut svc, "ESUB", "room", &cb.cid);
    for_cid(&mut svc, "EPUB", "lobby", &cb.cid);
    svc.sync();
    // Both grants (they may be applied one after the other).
    until(10, "the grants from C apply on B", || {
        !sub_refused(&mut cb, "room") && !pub_refused(&mut cb, "lobby")
    });
    // A grant, not an enablement: another client on B has neither right.
    let mut other = Peer::client(n[1].addr);
    assert!(sub_refused(&mut other, "room"));
    assert!(pub_refused(&mut other, "lobby"));
    await_route(&mut publisher, &mut cb, "room");
    c.signal(libc::SIGKILL);
    let t = Instant::now();
    until(10, "the grants from the dead node lapse on B", || {
        pub_refused(&mut cb, "lobby")
    });
    eprintln!("grants lapsed {:?} after the kill", t.elapsed());
    publisher.send("PUB", "room", &[], "stays");
    expect_pub(&mut cb, "room", "stays", &publisher.cid.clone());
    cb.send("UNS", "room", &[], "");
    cb.send("SUB", "room", &[], "");
    expect_error(&mut cb, "SUB", "room", "not permitted");
    drop(svc);
    drop(c);
}

// ---------------------------------------------------------------------------------------
// §9.2 across nodes
// ---------------------------------------------------------------------------------------

/// INT SUB / INT UNS / INT KICK from a service on A for a connection on B.
#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn int_sub_uns_and_kick_reach_a_connection_on_another_node() {
    let nats = NatsServer::start();
    let n = cluster(&nats, "i1", 2, &[]);
    let mut svc = Peer::service(n[0].addr);
    let mut cb = Peer::client(n[1].addr);
    int_sub(&mut svc, "SUB", &cb.cid, "room");
    svc.sync();
    // Delivery starts (once B has subscribed the topic on the backplane); the client
    // receives the probes and nothing else (it is not told).
    await_route(&mut svc, &mut cb, "room");
    svc.send("PUB", "room", &[], "in");
    expect_pub(&mut cb, "room", "in", &svc.cid.clone());
    // INT UNS: A's next PUB does not reach it.
    int_sub(&mut svc, "UNS", &cb.cid, "room");
    svc.send("PUB", "room", &[], "out");
    next_is_marker(&mut svc, &mut cb, "after-uns");
    quiet(&mut cb, "unsubscribed, not told");
    quiet(&mut svc, "no error");
    // INT KICK with a reason.
    let before = closed(n[1].addr, "kicked");
    svc.send(
        "INT",
        "KICK",
        &[("forcid", &cb.cid), ("reason", "moved elsewhere")],
        "",
    );
    assert_eq!(cb.recv_close(), (4000, "moved elsewhere".to_owned()));
    until(5, "counted as kicked on B", || {
        closed(n[1].addr, "kicked") == before + 1.0
    });
    // A kick across nodes with the default reason.
    let mut cb2 = Peer::client(n[1].addr);
    svc.send("INT", "KICK", &[("forcid", &cb2.cid)], "");
    assert_eq!(cb2.recv_close(), (4000, "kicked".to_owned()));
    // The reason cut to 120 bytes at a character boundary (é straddles byte 120).
    let mut cb3 = Peer::client(n[1].addr);
    let long = format!("{}é and more", "a".repeat(119));
    svc.send(
        "INT",
        "KICK",
        &[("forcid", &cb3.cid), ("reason", &long)],
        "",
    );
    assert_eq!(cb3.recv_close(), (4000, "a".repeat(119)));
    quiet(&mut svc, "no error");
    // A well-formed cid connected nowhere in the cluster: silent (§9 preamble).
    let ghost = "zz00000000000000";
    for cmd in ["ESUB", "EPUB", "EREQ", "DSUB", "DPUB", "DREQ"] {
        for_cid(&mut svc, cmd, "room", ghost);
    }
    int_sub(&mut svc, "SUB", ghost, "room");
    int_sub(&mut svc, "UNS", ghost, "room");
    svc.send("INT", "KICK", &[("forcid", ghost)], "");
    std::thread::sleep(Duration::from_millis(300));
    quiet(&mut svc, "unknown cid: silent");
}

/// notes-21: "`too many grants`: a connection already holds `max_subscriptions` grants;
/// the error goes to the granting service, the grant is not made" — the granting service
/// on another node than the connection.
#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn too_many_grants_for_a_connection_on_another_node_goes_back_to_the_granting_service() {
    let nats = NatsServer::start();
    let n = cluster(&nats, "i2", 2, &["--max-subscriptions", "2"]);
    let mut svc = Peer::service(n[0].addr);
    let mut cb = Peer::client(n[1].addr);
    for t in ["a", "b"] {
        for_cid(&mut svc, "ESUB", t, &cb.cid);
    }
    svc.sync();
    until(10, "the grants apply on B", || !sub_refused(&mut cb, "b"));
    assert!(!sub_refused(&mut cb, "a"));
    quiet(&mut svc, "two grants fit");
    for_cid(&mut svc, "ESUB", "c", &cb.cid);
    let e = read_for(&mut svc, Duration::from_secs(3));
    let refused = sub_refused(&mut cb, "c");
    assert!(
        e.len() == 1 && refused,
        "one error back to the granting service (got {e:?}), the grant not made (SUB c refused: {refused})"
    );
    assert_error(&e[0], "ESUB", "c", "too many grants");
}

// ---------------------------------------------------------------------------------------
// §9.3 presence across nodes
// ---------------------------------------------------------------------------------------

/// §9.3 in a cluster: exact `count`/`users`, the lines of every node merged and sorted by
/// cid, `limit` applied to the merged list.
#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn presence_across_two_nodes_merges_sorted_lines_and_applies_the_limit() {
    let nats = NatsServer::start();
    let n = cluster(&nats, "p1", 2, &[]);
    let mut req = Peer::service(n[0].addr);
    let mut sa = Peer::service(n[0].addr);
    let mut sb = Peer::service(n[1].addr);
    let a1 = Peer::client(n[0].addr);
    let b1 = Peer::client(n[1].addr);
    let b2 = Peer::client(n[1].addr);
    let b3 = Peer::client(n[1].addr);
    sa.send("SUB", "room", &[], "");
    set_uid(&mut sa, &a1.cid, "alice");
    int_sub(&mut sa, "SUB", &a1.cid, "room");
    set_uid(&mut sb, &b1.cid, "alice");
    set_uid(&mut sb, &b2.cid, "bob");
    for c in [&b1, &b2, &b3] {
        int_sub(&mut sb, "SUB", &c.cid, "room");
    }
    sa.sync();
    sb.sync();
    let members = [
        (sa.cid.as_str(), ""),
        (a1.cid.as_str(), "alice"),
        (b1.cid.as_str(), "alice"),
        (b2.cid.as_str(), "bob"),
        (b3.cid.as_str(), ""),
    ];
    let want = expected_lines(&members);
    let m = presence(&mut req, "room", "p1", &[]);
    assert_presence(
        &m,
        &[("ReqID", "p1"), ("count", "5"), ("users", "2")],
        &want,
    );
    // The same from B.
    let m = presence(&mut sb, "room", "p2", &[]);
    assert_presence(
        &m,
        &[("ReqID", "p2"), ("count", "5"), ("users", "2")],
        &want,
    );
    // The limit applies to the merged list.
    let m = presence(&mut req, "room", "p3", &[("limit", "3")]);
    assert_presence(
        &m,
        &[
            ("ReqID", "p3"),
            ("count", "5"),
            ("users", "2"),
            ("truncated", "true"),
        ],
        &want[..3],
    );
    let m = presence(&mut req, "room", "p4", &[("limit", "5")]);
    assert_presence(
        &m,
        &[("ReqID", "p4"), ("count", "5"), ("users", "2")],
        &want,
    );
}

/// Three nodes: a uid present on every node counts once; `limit: 0`.
#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn presence_across_three_nodes_counts_a_uid_once() {
    let nats = NatsServer::start();
    let n = cluster(&nats, "p2", 3, &[]);
    let mut req = Peer::service(n[0].addr);
    let mut svcs: Vec<Peer> = n.iter().map(|s| Peer::service(s.addr)).collect();
    let mut clients = Vec::new();
    let mut members = Vec::new();
    for (i, s) in n.iter().enumerate() {
        for j in 0..3 {
            let c = Peer::client(s.addr);
            let uid = match j {
                0 => "same".to_owned(),
                1 => format!("node{i}"),
                _ => String::new(),
            };
            if !uid.is_empty() {
                set_uid(&mut svcs[i], &c.cid, &uid);
            }
            int_sub(&mut svcs[i], "SUB", &c.cid, "room");
            members.push((c.cid.clone(), uid));
            clients.push(c);
        }
        svcs[i].sync();
    }
    let pairs: Vec<(&str, &str)> = members
        .iter()
        .map(|(c, u)| (c.as_str(), u.as_str()))
        .collect();
    let want = expected_lines(&pairs);
    // users: "same", node0, node1, node2.
    let m = presence(&mut req, "room", "p", &[]);
    assert_presence(&m, &[("ReqID", "p"), ("count", "9"), ("users", "4")], &want);
    let m = presence(&mut req, "room", "z", &[("limit", "0")]);
    assert_presence(
        &m,
        &[
            ("ReqID", "z"),
            ("count", "9"),
            ("users", "4"),
            ("truncated", "true"),
        ],
        &[],
    );
    // One leaves on C: seen at once by a request from A.
    let gone = clients.pop().unwrap();
    let gone_cid = gone.cid.clone();
    leave(gone);
    svcs[2].sync();
    let pairs: Vec<(&str, &str)> = pairs.into_iter().filter(|p| p.0 != gone_cid).collect();
    let m = presence(&mut req, "room", "q", &[]);
    assert_presence(
        &m,
        &[("ReqID", "q"), ("count", "8"), ("users", "4")],
        &expected_lines(&pairs),
    );
}

/// §9.3: "In a cluster the answer covers every node that answered within 1 s; if one did
/// not, header `partial: true`." Node C is stopped with SIGSTOP (it stays a member: the
/// node timeout is 10 s), then resumed with SIGCONT and killed by its PID.
#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn presence_is_partial_when_a_node_does_not_answer_within_one_second() {
    let nats = NatsServer::start();
    let timeout = ["--cluster-node-timeout", "10s"];
    let n = cluster(&nats, "p3", 3, &timeout);
    let mut req = Peer::service(n[0].addr);
    let mut sb = Peer::service(n[1].addr);
    let mut sc = Peer::service(n[2].addr);
    let b1 = Peer::client(n[1].addr);
    let c1 = Peer::client(n[2].addr);
    int_sub(&mut sb, "SUB", &b1.cid, "room");
    int_sub(&mut sc, "SUB", &c1.cid, "room");
    sb.sync();
    sc.sync();
    let m = presence(&mut req, "room", "full", &[]);
    assert_presence(
        &m,
        &[("ReqID", "full"), ("count", "2"), ("users", "0")],
        &expected_lines(&[(&b1.cid, ""), (&c1.cid, "")]),
    );
    n[2].signal(libc::SIGSTOP);
    let t = Instant::now();
    let m = presence(&mut req, "room", "part", &[]);
    let took = t.elapsed();
    assert_presence(
        &m,
        &[
            ("ReqID", "part"),
            ("count", "1"),
            ("users", "0"),
            ("partial", "true"),
        ],
        &expected_lines(&[(&b1.cid, "")]),
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "answered after {took:?} (1 s wait for the silent node)"
    );
    // Both flags, in the order of notes-21 (truncated, then partial).
    let m = presence(&mut req, "room", "part0", &[("limit", "0")]);
    assert_presence(
        &m,
        &[
            ("ReqID", "part0"),
            ("count", "1"),
            ("users", "0"),
            ("truncated", "true"),
            ("partial", "true"),
        ],
        &[],
    );
    n[2].signal(libc::SIGCONT);
    // Resumed, C answers again (its late answer to "part" is not delivered twice).
    until(10, "C answers again", || {
        let m = presence(&mut req, "room", "again", &[]);
        assert_eq!(m.header("ReqID"), Some("again"), "{m:?}");
        m.header("partial").is_none()
    });
    let m = presence(&mut req, "room", "last", &[]);
    assert_presence(
        &m,
        &[("ReqID", "last"), ("count", "2"), ("users", "0")],
        &expected_lines(&[(&b1.cid, ""), (&c1.cid, "")]),
    );
    quiet(&mut req, "no late answer");
    n[2].signal(libc::SIGKILL);
}

// ---------------------------------------------------------------------------------------
// §9.4 events across nodes
// ---------------------------------------------------------------------------------------

/// §9.4: "a subscriber on any node receives the events of connections on every node".
#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn a_subscriber_on_one_node_receives_the_events_of_another() {
    let nats = NatsServer::start();
    let n = cluster(&nats, "e1", 2, &["--monitor-key", MONITOR_KEY]);
    let mut mon = Peer::monitor(n[0].addr);
    let mut w = watcher(n[0].addr);
    let mut svc_a = Peer::service(n[0].addr);
    // Wait until B knows A's interest in the event topics: connect probes on B until
    // the watcher hears of one. The probes stay connected (no DISCONNECT events), so once
    // one is heard nothing else of them is queued.
    let mut probes = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "no event from B within 10s");
        let p = Peer::client(n[1].addr);
        let got = read_for(&mut w, Duration::from_millis(50));
        let cid = p.cid.clone();
        probes.push(p);
        if let Some(m) = got.last() {
            // Only CONNECT events of probes (and the one of svc_a, local).
            for m in &got {
                assert_eq!(m.target, "SYS:CONNECT", "{m:?}");
            }
            if m.header("cid") == Some(cid.as_str()) {
                break;
            }
        }
    }
    quiet(&mut w, "caught up");
    let mut sb = Peer::service(n[1].addr);
    expect_event(
        &mut w,
        "SYS:CONNECT",
        &[("cid", &sb.cid), ("uid", ""), ("role", "service")],
    );
    let cb = Peer::client(n[1].addr);
    expect_event(
        &mut w,
        "SYS:CONNECT",
        &[("cid", &cb.cid), ("uid", ""), ("role", "client")],
    );
    set_uid(&mut sb, &cb.cid, "zed");
    int_sub(&mut sb, "SUB", &cb.cid, "room");
    let ev = |t: &str, cid: &str, topic: &str, w: &mut Peer| {
        expect_event(
            w,
            t,
            &[
                ("cid", cid),
                ("uid", "zed"),
                ("role", "client"),
                ("topic", topic),
            ],
        );
    };
    ev("SYS:SUB", &cb.cid, "room", &mut w);
    int_sub(&mut sb, "UNS", &cb.cid, "room");
    ev("SYS:UNS", &cb.cid, "room", &mut w);
    // INT SUB from A for the connection on B: the event comes from B.
    int_sub(&mut svc_a, "SUB", &cb.cid, "hall");
    ev("SYS:SUB", &cb.cid, "hall", &mut w);
    // DSUB forcid from A of the last right to a topic: SYS:UNS from B (notes-21).
    for_cid(&mut svc_a, "ESUB", "granted", &cb.cid);
    int_sub(&mut svc_a, "SUB", &cb.cid, "granted");
    ev("SYS:SUB", &cb.cid, "granted", &mut w);
    for_cid(&mut svc_a, "DSUB", "granted", &cb.cid);
    ev("SYS:UNS", &cb.cid, "granted", &mut w);
    // A service on B: its events follow its commands in order, its PUBs included.
    w.send("SUB", "mark", &[], "");
    drain(&mut w); // its own SYS:SUB mark
    await_route(&mut sb, &mut w, "mark");
    let mut raw = wire("SUB", "x", &[], "");
    raw += &wire("PUB", "mark", &[], "1");
    raw += &wire("SUB", "y", &[], "");
    raw += &wire("UNS", "x", &[], "");
    raw += &wire("PUB", "mark", &[], "2");
    sb.send_raw(&raw);
    let sbcid = sb.cid.clone();
    let sev = |w: &mut Peer, t: &str, topic: &str| {
        expect_event(
            w,
            t,
            &[
                ("cid", &sbcid),
                ("uid", ""),
                ("role", "service"),
                ("topic", topic),
            ],
        );
    };
    sev(&mut w, "SYS:SUB", "x");
    expect_pub(&mut w, "mark", "1", &sbcid);
    sev(&mut w, "SYS:SUB", "y");
    sev(&mut w, "SYS:UNS", "x");
    expect_pub(&mut w, "mark", "2", &sbcid);
    let cid = cb.cid.clone();
    leave(cb);
    expect_event(
        &mut w,
        "SYS:DISCONNECT",
        &[
            ("cid", &cid),
            ("uid", "zed"),
            ("role", "client"),
            ("reason", "normal"),
        ],
    );
    quiet(&mut w, "no SYS:UNS hall at the disconnect");
    // The monitor on A had copies of the PUBs (probes, marks), none of the events.
    let copies = drain(&mut mon);
    assert!(
        copies.iter().all(|m| !m.target.starts_with("SYS:")),
        "monitors get no copies of events: {copies:?}"
    );
    assert!(copies.iter().any(|m| m.target == "mark"), "{copies:?}");
    drop(probes);
}
