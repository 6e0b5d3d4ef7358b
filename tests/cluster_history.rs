//! History and recovery across a cluster (PROTOCOL.md §9.5): three in-process nodes
//! joined through a real nats-server with JetStream (`-js`, its store in a scratch
//! folder) on an ephemeral loopback port. One epoch and one offset sequence per topic
//! cluster-wide: every subscriber on every node sees the same order with strictly
//! increasing offsets, and a position taken on one node recovers on another.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::*;
use common::nats::NatsServer;
use common::*;
use middleman::core::history::{HistoryRule, HistorySettings};

fn history(size: usize) -> HistorySettings {
    HistorySettings {
        rules: vec![HistoryRule {
            prefix: "h.".into(),
            size,
            ttl: Duration::from_secs(3600),
        }],
        max_bytes: 64 << 20,
    }
}

/// A node of cluster `name` keeping history for `h.` topics (`size` per topic).
fn hist_node(nats: &NatsServer, name: &str, size: usize) -> TestServer {
    let cc = cluster_config(nats, name);
    TestServer::with(move |c| {
        c.cluster = Some(cc);
        c.history = history(size);
    })
}

/// `n` nodes, settled and each reading the history stream.
fn hist_cluster(nats: &NatsServer, name: &str, n: usize, size: usize) -> Vec<TestServer> {
    let nodes: Vec<TestServer> = (0..n).map(|_| hist_node(nats, name, size)).collect();
    let addrs: Vec<_> = nodes.iter().map(|s| s.addr).collect();
    settled(&addrs);
    for &a in &addrs {
        until(10, "history stream ready", || {
            metric(a, "middleman_history_jetstream_ready") == 1.0
        });
    }
    nodes
}

fn offset(m: &Msg) -> u64 {
    m.header("offset")
        .and_then(|o| o.parse().ok())
        .unwrap_or_else(|| panic!("no offset in {m:?}"))
}

/// Receive messages until `SYS:RECOVERY`; returns the replayed ones and the recovery.
fn until_recovery(p: &mut Peer) -> (Vec<Msg>, Msg) {
    let mut got = Vec::new();
    loop {
        let m = p.recv();
        if m.target == "SYS:RECOVERY" {
            return (got, m);
        }
        got.push(m);
    }
}

/// Read `n` messages of `topic`, checking offsets strictly increase and one epoch.
fn read_n(p: &mut Peer, topic: &str, n: usize) -> Vec<Msg> {
    let mut got: Vec<Msg> = Vec::with_capacity(n);
    while got.len() < n {
        let m = p.recv();
        assert_eq!(m.target, topic, "{m:?}");
        if let Some(prev) = got.last() {
            assert!(
                offset(prev) < offset(&m),
                "offsets must increase: {prev:?} then {m:?}"
            );
            assert_eq!(prev.header("epoch"), m.header("epoch"));
        }
        got.push(m);
    }
    got
}

#[test]
#[ignore = "needs nats-server (.ci/install-tools.sh installs it)"]
fn recovered_on_another_node_in_one_order_everywhere() {
    let nats = NatsServer::start_jetstream();
    let nodes = hist_cluster(&nats, "hist", 3, 1000);
    let (a, b, c) = (nodes[0].addr, nodes[1].addr, nodes[2].addr);
    // A watcher on every node, subscribed throughout.
    let mut watchers: Vec<Peer> = [a, b, c].iter().map(|&n| Peer::service(n)).collect();
    for w in &mut watchers {
        w.send("SUB", "h.room", &[], "");
        w.sync();
    }
    let mut gone = Peer::service(a);
    gone.send("SUB", "h.room", &[], "");
    gone.sync();
    let mut pubs = [Peer::service(a), Peer::service(a), Peer::service(b)];
    pubs[0].send(
        "PUB",
        "h.room",
        &[("offset", "1"), ("epoch", "forged")],
        "first",
    );
    let first = gone.recv();
    assert_eq!(first.body, "first");
    let epoch = first.header("epoch").unwrap().to_owned();
    assert_ne!(epoch, "forged");
    let since = format!("{epoch}:{}", offset(&first));
    drop(gone);
    // 500 messages from three publishers on two nodes while the subscriber is away.
    let mut sent = Vec::new();
    for i in 0..500 {
        let body = format!("p{}-{i}", i % 3);
        pubs[i % 3].send("PUB", "h.room", &[], &body);
        sent.push(body);
    }
    let seen: Vec<Vec<Msg>> = watchers
        .iter_mut()
        .map(|w| read_n(w, "h.room", 501))
        .collect();
    // Every node delivered the stream's order: the same offsets and bodies everywhere.
    let order = |ms: &[Msg]| -> Vec<(u64, String)> {
        ms.iter().map(|m| (offset(m), m.body.clone())).collect()
    };
    assert_eq!(order(&seen[0]), order(&seen[1]));
    assert_eq!(order(&seen[0]), order(&seen[2]));
    assert_eq!(seen[0][0].body, "first");
    // Back on node C with the position taken on A: exactly the 500, in offset order.
    let mut back = Peer::service(c);
    back.send("SUB", "h.room", &[("since", &since)], "");
    let (replay, rec) = until_recovery(&mut back);
    assert_eq!(
        order(&replay),
        order(&seen[2][1..]),
        "the 500 missed, once each, in order"
    );
    let mut bodies: Vec<String> = replay.iter().map(|m| m.body.clone()).collect();
    bodies.sort();
    let mut want = sent.clone();
    want.sort();
    assert_eq!(bodies, want);
    assert_eq!(rec.header("recovered"), Some("true"), "{rec:?}");
    assert_eq!(rec.header("topic"), Some("h.room"));
    assert_eq!(rec.header("epoch"), Some(epoch.as_str()));
    let last = offset(seen[2].last().unwrap());
    assert_eq!(rec.header("offset"), Some(last.to_string().as_str()));
    // Then live messages, after the replay.
    pubs[2].send("PUB", "h.room", &[], "live");
    let m = back.recv();
    assert_eq!(m.body, "live");
    assert!(offset(&m) > last);
    // since: last on another node: the newest only.
    let mut newest = Peer::service(b);
    newest.send("SUB", "h.room", &[("since", "last")], "");
    let (got, rec) = until_recovery(&mut newest);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].body, "live");
    assert_eq!(rec.header("recovered"), Some("true"));
    assert_eq!(
        rec.header("offset"),
        Some(offset(&got[0]).to_string().as_str())
    );
    // A position from another epoch: not recovered, the current position given.
    let mut other = Peer::service(a);
    other.send("SUB", "h.room", &[("since", "Other1:1")], "");
    let (got, rec) = until_recovery(&mut other);
    assert!(got.is_empty(), "{got:?}");
    assert_eq!(rec.header("recovered"), Some("false"));
    assert_eq!(rec.header("epoch"), Some(epoch.as_str()));
    assert_eq!(rec.header("offset"), Some(offset(&m).to_string().as_str()));
    let m = metrics(c);
    assert_eq!(
        m.get("middleman_recoveries_total{outcome=\"recovered\"}"),
        Some(&1.0)
    );
    assert_eq!(metric(a, "middleman_history_write_failures_total"), 0.0);
}

#[test]
#[ignore = "needs nats-server (.ci/install-tools.sh installs it)"]
fn older_than_the_stream_keeps_is_not_recovered() {
    let nats = NatsServer::start_jetstream();
    let nodes = hist_cluster(&nats, "hist", 2, 10);
    let (a, b) = (nodes[0].addr, nodes[1].addr);
    let mut w = Peer::service(b);
    w.send("SUB", "h.t", &[], "");
    w.sync();
    let mut p = Peer::service(a);
    for i in 0..30 {
        p.send("PUB", "h.t", &[], &i.to_string());
    }
    let got = read_n(&mut w, "h.t", 30);
    let epoch = got[0].header("epoch").unwrap().to_owned();
    let mut back = Peer::service(b);
    back.send(
        "SUB",
        "h.t",
        &[("since", &format!("{epoch}:{}", offset(&got[0])))],
        "",
    );
    let (replay, rec) = until_recovery(&mut back);
    assert!(replay.is_empty(), "no partial replay: {replay:?}");
    assert_eq!(rec.header("recovered"), Some("false"));
    assert_eq!(rec.header("epoch"), Some(epoch.as_str()));
    assert_eq!(
        rec.header("offset"),
        Some(offset(&got[29]).to_string().as_str()),
        "the current position"
    );
    // The 20th is still stored (the last 10 are): recovered from there.
    let mut back = Peer::service(a);
    back.send(
        "SUB",
        "h.t",
        &[("since", &format!("{epoch}:{}", offset(&got[20])))],
        "",
    );
    let (replay, rec) = until_recovery(&mut back);
    let bodies: Vec<&str> = replay.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(
        bodies,
        ["21", "22", "23", "24", "25", "26", "27", "28", "29"]
    );
    assert_eq!(rec.header("recovered"), Some("true"));
}

/// 10 rounds: publishers on A and B keep publishing while a subscriber on C leaves and
/// comes back with `since`; across every switch each message arrives exactly once, in
/// each publisher's order, with offsets strictly increasing.
#[test]
#[ignore = "needs nats-server (.ci/install-tools.sh installs it)"]
fn nothing_lost_or_doubled_at_the_switch_while_publishing() {
    let nats = NatsServer::start_jetstream();
    let nodes = hist_cluster(&nats, "hist", 3, 100_000);
    let stop = Arc::new(AtomicBool::new(false));
    let publishers: Vec<_> = [("a", nodes[0].addr), ("b", nodes[1].addr)]
        .into_iter()
        .map(|(name, addr)| {
            let flag = stop.clone();
            std::thread::spawn(move || {
                let mut p = Peer::service(addr);
                let mut n = 0u64;
                let deadline = Instant::now() + Duration::from_secs(60);
                // About 2,000 messages a second from each: a steady load a debug
                // build on two shared cores keeps up with.
                while !flag.load(Ordering::Relaxed) && n < 50_000 && Instant::now() < deadline {
                    p.send("PUB", "h.s", &[], &format!("{name}{n}"));
                    n += 1;
                    if n.is_multiple_of(2) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                p.send("PUB", "h.s", &[], &format!("{name}end"));
                p.sync();
                n
            })
        })
        .collect();
    let c = nodes[2].addr;
    let mut sub = Peer::service(c);
    sub.send("SUB", "h.s", &[], "");
    let mut seen: Vec<(u64, String)> = Vec::new();
    let mut epoch = String::new();
    let mut recovered = 0;
    for round in 0..10 {
        // After a resubscription: the replay up to SYS:RECOVERY, then 100 more.
        let mut after = if round == 0 { Some(0) } else { None };
        while after.is_none_or(|n| n < 100) {
            let m = sub.recv();
            if m.target == "SYS:RECOVERY" {
                assert_eq!(m.header("recovered"), Some("true"), "{m:?}");
                seen.push((0, format!("REC {:?}", m.header("offset"))));
                assert!(after.is_none(), "one SYS:RECOVERY per resubscription");
                recovered += 1;
                after = Some(0);
                continue;
            }
            epoch = m.header("epoch").unwrap().to_owned();
            seen.push((offset(&m), m.body.clone()));
            after = after.map(|n| n + 1);
        }
        drop(sub);
        sub = Peer::service(c);
        let since = format!("{epoch}:{}", seen.last().unwrap().0);
        sub.send("SUB", "h.s", &[("since", &since)], "");
    }
    stop.store(true, Ordering::Relaxed);
    let totals: Vec<u64> = publishers.into_iter().map(|p| p.join().unwrap()).collect();
    let mut ended = 0;
    while ended < 2 {
        let m = sub.recv();
        if m.target == "SYS:RECOVERY" {
            assert_eq!(m.header("recovered"), Some("true"), "{m:?}");
            recovered += 1;
            continue;
        }
        if m.body.ends_with("end") {
            ended += 1;
        }
        seen.push((offset(&m), m.body.clone()));
    }
    assert_eq!(recovered, 10, "one recovery per resubscription");
    let marks = seen.clone();
    seen.retain(|(o, _)| *o > 0);
    if let Some(i) = seen.windows(2).position(|w| w[0].0 >= w[1].0) {
        let at = marks.iter().position(|x| *x == seen[i]).unwrap_or(0);
        eprintln!(
            "{:?}",
            &marks[at.saturating_sub(5)..(at + 6).min(marks.len())]
        );
        panic!(
            "offsets must increase: {:?}",
            &seen[i.saturating_sub(3)..(i + 4).min(seen.len())]
        );
    }
    // Per publisher: a contiguous run from the first seen to the end, once each.
    let mut per: HashMap<char, Vec<String>> = HashMap::new();
    for (_, body) in &seen {
        per.entry(body.chars().next().unwrap())
            .or_default()
            .push(body[1..].to_owned());
    }
    for (name, total) in [('a', totals[0]), ('b', totals[1])] {
        let got = &per[&name];
        let first: u64 = got[0].parse().unwrap();
        let mut want: Vec<String> = (first..total).map(|n| n.to_string()).collect();
        want.push("end".into());
        assert_eq!(got, &want, "publisher {name}: every message once, in order");
    }
}

/// Without JetStream (nats-server without `-js`) history topics still flow between
/// nodes as plain topics, recoveries answer `recovered: false` at once, and the writes
/// are counted as failed.
#[test]
#[ignore = "needs nats-server (.ci/install-tools.sh installs it)"]
fn without_jetstream_live_delivery_goes_on() {
    let nats = NatsServer::start();
    let nodes: Vec<TestServer> = (0..2).map(|_| hist_node(&nats, "nojs", 100)).collect();
    let (a, b) = (nodes[0].addr, nodes[1].addr);
    settled(&[a, b]);
    let mut sub = Peer::service(b);
    sub.send("SUB", "h.x", &[], "");
    sub.sync();
    let mut p = Peer::service(a);
    // The subscription's route may take a moment: probe until one arrives.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "no delivery across nodes");
        p.send("PUB", "h.x", &[], "probe");
        let got = common::v11::read_for(&mut sub, Duration::from_millis(50));
        if !got.is_empty() {
            assert!(got[0].header("offset").is_none(), "{:?}", got[0]);
            break;
        }
    }
    p.send("PUB", "h.x", &[], "end");
    loop {
        if sub.recv().body == "end" {
            break;
        }
    }
    let mut back = Peer::service(b);
    back.send("SUB", "h.x", &[("since", "E:1")], "");
    let (got, rec) = until_recovery(&mut back);
    assert!(got.is_empty());
    assert_eq!(rec.header("recovered"), Some("false"));
    assert!(metric(a, "middleman_history_write_failures_total") >= 2.0);
    assert_eq!(metric(a, "middleman_history_jetstream_ready"), 0.0);
}

/// A memory stream lost with its nats-server: the nodes find the stream created again,
/// with a new epoch; a position from before is not recovered and live delivery resumes.
#[test]
#[ignore = "needs nats-server (.ci/install-tools.sh installs it)"]
fn a_stream_created_again_has_a_new_epoch() {
    // Memory storage (the default): the stream goes with the process.
    let mut nats = NatsServer::start_jetstream();
    let nodes = hist_cluster(&nats, "hist", 2, 100);
    let (a, b) = (nodes[0].addr, nodes[1].addr);
    let mut w = Peer::service(b);
    w.send("SUB", "h.e", &[], "");
    w.sync();
    let mut p = Peer::service(a);
    p.send("PUB", "h.e", &[], "before");
    let before = w.recv();
    let old = before.header("epoch").unwrap().to_owned();
    nats.restart();
    for &n in &[a, b] {
        until(20, "history stream ready again", || {
            metric(n, "middleman_history_jetstream_ready") == 1.0
        });
    }
    // Published until it arrives (the first may precede B's consumer).
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        assert!(Instant::now() < deadline, "no delivery after the restart");
        p.send("PUB", "h.e", &[], "after");
        let got = common::v11::read_for(&mut w, Duration::from_millis(100));
        if let Some(m) = got.into_iter().find(|m| m.body == "after") {
            break m;
        }
    };
    let new = after.header("epoch").unwrap().to_owned();
    assert_ne!(new, old);
    // On the node that delivered it (each node finds the new stream on its own; for a
    // moment two nodes may not agree yet).
    let mut back = Peer::service(b);
    back.send(
        "SUB",
        "h.e",
        &[("since", &format!("{old}:{}", offset(&before)))],
        "",
    );
    let (got, rec) = until_recovery(&mut back);
    assert!(got.is_empty());
    assert_eq!(rec.header("recovered"), Some("false"));
    assert_eq!(rec.header("epoch"), Some(new.as_str()));
}
