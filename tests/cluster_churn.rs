//! The cluster keeps the single-node promises under churn and at the edges, with a real
//! nats-server on an ephemeral loopback port: interest churn bounded, control traffic
//! never starved by data, per-connection state released with its connection, requests
//! balanced across nodes, departures heard at once, nothing counted as lost in a fresh
//! cluster.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::*;
use common::nats::NatsServer;
use common::proc::{rss_kib, Proc};
use common::*;

/// Read from every peer, with short timeouts, until `total` messages have come in all
/// or `within` has passed; returns how many each received (each must be `cmd`).
fn count_received(
    peers: &mut [&mut Peer],
    cmd: &str,
    total: usize,
    within: Duration,
) -> Vec<usize> {
    let mut got = vec![0; peers.len()];
    let deadline = Instant::now() + within;
    while got.iter().sum::<usize>() < total && Instant::now() < deadline {
        for (p, n) in peers.iter_mut().zip(got.iter_mut()) {
            p.ws.get_mut()
                .set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            while let Ok(d) = next_data(&mut p.ws) {
                let m = parse_one(&d);
                assert_eq!(m.cmd, cmd, "{m:?}");
                *n += 1;
            }
        }
    }
    for p in peers.iter_mut() {
        p.ws.get_mut().set_read_timeout(Some(WAIT)).unwrap();
    }
    got
}

#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn a_client_churning_one_topic_costs_its_node_no_memory() {
    let nats = NatsServer::start();
    let url = nats.url();
    let a = Proc::start(&node_args(&url, "churn1", &[]), &[]);
    let a_addr = a.addr();
    let b = node(&nats, "churn1");
    settled(&[a_addr, b.addr]);
    let mut svc = Peer::service(a_addr);
    svc.send("ESUB", "room", &[], "");
    svc.sync();
    let mut client = Peer::client(a_addr);
    const PAIRS: usize = 5000;
    let batch: String = (0..PAIRS)
        .map(|_| wire("SUB", "room", &[], "") + &wire("UNS", "room", &[], ""))
        .collect();
    // A first round, so what is allocated once is in the baseline.
    client.send_raw(&batch);
    client.sync();
    let pid = a.child.id();
    let before = rss_kib(pid, "VmRSS:");
    // A fixed count (300k pairs), bounded in time; the speed is the benchmarks' business,
    // the memory after a count of churn is this test's.
    const ROUNDS: usize = 60;
    let start = Instant::now();
    let mut rounds = 0;
    while rounds < ROUNDS && start.elapsed() < Duration::from_secs(60) {
        client.send_raw(&batch);
        client.sync();
        rounds += 1;
    }
    let after = rss_kib(pid, "VmRSS:");
    let pairs = rounds * PAIRS;
    eprintln!(
        "{pairs} SUB/UNS pairs of one topic in {:?}: node RSS {before} -> {after} KiB",
        start.elapsed()
    );
    assert_eq!(rounds, ROUNDS, "only {pairs} SUB/UNS pairs in 60 s");
    // The bound asked for is 16 MB; a copy of the topic queued per UNS grew the node by
    // 15 MB at 1M pairs (about 4.5 MB at 300k), so the bound here is 4 MB (coalesced:
    // +0.2 MB measured).
    assert!(
        after < before + 4 * 1024,
        "RSS {before} -> {after} KiB after {pairs} SUB/UNS pairs of one topic"
    );
    assert!(metric(a_addr, "middleman_cluster_interest_pending") <= 1.0);
}

#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn a_service_churning_distinct_topics_under_heavy_data_stays_bounded_and_heard() {
    // The smallest bound allowed: A's data fills it, so the control lane has to pass a
    // full data lane.
    const BOUND: usize = 64 << 10;
    let nats = NatsServer::start();
    let a = node_with(&nats, "churn2", |c| c.max_pending = BOUND);
    let b = node(&nats, "churn2");
    settled(&[a.addr, b.addr]);
    let mut keeper = Peer::service(a.addr);
    keeper.send("ESUB", "keep", &[], "");
    keeper.sync();
    let mut client_b = Peer::client(b.addr);
    until(10, "the enablement known on B", || {
        !sub_refused(&mut client_b, "keep")
    });
    let stop = Arc::new(AtomicBool::new(false));
    // Heavy data: 8 KiB messages from A to a reader on B, as fast as A takes them.
    let mut reader = Peer::service(b.addr);
    reader.send("SUB", "bulk", &[], "");
    reader.sync();
    let reading = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            reader
                .ws
                .get_mut()
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                if next_data(&mut reader.ws).is_ok() {
                    n += 1;
                }
            }
            n
        })
    };
    let publishing = {
        let stop = stop.clone();
        let mut p = Peer::service(a.addr);
        std::thread::spawn(move || {
            let body = "x".repeat(8 << 10);
            let batch: String = (0..16).map(|_| wire("PUB", "bulk", &[], &body)).collect();
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                p.send_raw(&batch);
                n += 16;
                if n.is_multiple_of(1024) {
                    p.sync();
                }
            }
            n
        })
    };
    // Interest churn: a thousand new topics subscribed, written, then unsubscribed.
    let churning = {
        let stop = stop.clone();
        let mut s = Peer::service(a.addr);
        std::thread::spawn(move || {
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let subs: String = (i..i + 1000)
                    .map(|k| wire("SUB", &format!("t{k}"), &[], ""))
                    .collect();
                let unss: String = (i..i + 1000)
                    .map(|k| wire("UNS", &format!("t{k}"), &[], ""))
                    .collect();
                s.send_raw(&subs);
                s.sync();
                s.send_raw(&unss);
                s.sync();
                i += 1000;
            }
            i
        })
    };
    let start = Instant::now();
    let mut max_pending = 0.0f64;
    while start.elapsed() < Duration::from_secs(6) {
        let pending = metric(a.addr, "middleman_cluster_pending_bytes");
        max_pending = max_pending.max(pending);
        assert!(
            pending <= BOUND as f64,
            "{pending} bytes waiting, bound {BOUND}"
        );
        assert_eq!(
            metric(b.addr, "middleman_cluster_nodes"),
            1.0,
            "B lost A after {:?}",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::SeqCst);
    let topics = churning.join().unwrap();
    let published = publishing.join().unwrap();
    let received = reading.join().unwrap();
    assert!(topics >= 10_000, "only {topics} topics churned");
    // A floor for the load, not a speed figure: 8 KiB messages at 10-13k in 6 s on an
    // idle machine (debug build), about 8k with the other core busy; that the data lane
    // was full is asserted below (buffer_full drops).
    assert!(published >= 4_096, "only {published} messages published");
    assert!(received > 0, "nothing crossed");
    let m = metrics(a.addr);
    let dropped = |r: &str| {
        m.get(&format!(
            "middleman_cluster_dropped_total{{reason=\"{r}\"}}"
        ))
        .copied()
    };
    assert!(
        dropped("buffer_full") > Some(0.0),
        "the data lane was never full: {m:?}"
    );
    assert_eq!(dropped("control_full"), Some(0.0));
    assert!(
        !sub_refused(&mut client_b, "keep"),
        "A's enablement survived on B"
    );
    assert_eq!(metric(b.addr, "middleman_cluster_nodes"), 1.0);
    eprintln!(
        "churned {topics} topics, published {published} x 8 KiB ({received} crossed, {:?} \
         dropped for the bound), pending at most {max_pending} of {BOUND}",
        dropped("buffer_full")
    );
}

#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn a_departed_requesters_forwarded_requests_do_not_count_against_the_next_connection() {
    let nats = NatsServer::start();
    let (a, b) = (node(&nats, "churn3"), node(&nats, "churn3"));
    settled(&[a.addr, b.addr]);
    let mut responder = Peer::service(b.addr);
    responder.send("EREQ", "slow", &[], "");
    responder.sync();
    until(10, "B's responder known on A", || {
        metric(a.addr, "middleman_cluster_remote_responders") == 1.0
    });
    let mut first = Peer::client(a.addr);
    let batch: String = (0..1000)
        .map(|i| wire("REQ", "slow", &[("ReqID", &format!("r{i}"))], ""))
        .collect();
    first.send_raw(&batch);
    for i in 0..1000 {
        let req = responder.recv();
        assert_eq!(req.header("ReqID"), Some(format!("r{i}").as_str()));
    }
    assert_eq!(
        metric(a.addr, "middleman_cluster_forwarded_requests"),
        1000.0
    );
    drop(first);
    until(5, "the departed requester's forwards released", || {
        metric(a.addr, "middleman_cluster_forwarded_requests") == 0.0
    });
    let mut next = Peer::client(a.addr);
    let t = Instant::now();
    next.send("REQ", "slow", &[("ReqID", "next-1")], "");
    let req = responder.recv();
    assert_eq!(req.header("ReqID"), Some("next-1"));
    let rid = req.header("rid").unwrap().to_owned();
    responder.send("RES", "slow", &[("rid", &rid)], "done");
    let res = next.recv();
    assert_eq!(
        (res.cmd.as_str(), res.body.as_str()),
        ("RES", "done"),
        "{res:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn twelve_requests_over_three_responders_on_two_nodes_land_four_each() {
    let nats = NatsServer::start();
    let (a, b) = (node(&nats, "churn4"), node(&nats, "churn4"));
    settled(&[a.addr, b.addr]);
    let mut r1 = Peer::service(a.addr);
    let mut r2 = Peer::service(b.addr);
    let mut r3 = Peer::service(b.addr);
    for r in [&mut r1, &mut r2, &mut r3] {
        r.send("EREQ", "work", &[], "");
        r.sync();
    }
    until(10, "B's two responders known on A", || {
        metric(a.addr, "middleman_cluster_remote_responders") == 2.0
    });
    let mut requester = Peer::client(a.addr);
    let batch: String = (0..12)
        .map(|i| wire("REQ", "work", &[("ReqID", &format!("w{i}"))], ""))
        .collect();
    requester.send_raw(&batch);
    let got = count_received(&mut [&mut r1, &mut r2, &mut r3], "REQ", 12, WAIT);
    assert_eq!(got, [4, 4, 4], "requests per responder (A's, B's, B's)");
}

#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn a_node_stopped_with_sigterm_is_forgotten_by_the_others_at_once() {
    let nats = NatsServer::start();
    let url = nats.url();
    let mut b = Proc::start(
        &node_args(&url, "churn5", &["--cluster-node-timeout", "3s"]),
        &[],
    );
    let b_addr = b.addr();
    let a = node(&nats, "churn5");
    settled(&[a.addr, b_addr]);
    let mut svc = Peer::service(b_addr);
    svc.send("ESUB", "room", &[], "");
    svc.send("EREQ", "slow", &[], "");
    svc.sync();
    let mut client = Peer::client(a.addr);
    until(10, "B's enablement known on A", || {
        !sub_refused(&mut client, "room")
    });
    until(10, "B's responder known on A", || {
        metric(a.addr, "middleman_cluster_remote_responders") == 1.0
    });
    client.send("REQ", "slow", &[("ReqID", "pending-1")], "");
    assert_eq!(svc.recv().header("ReqID"), Some("pending-1"));
    let t = Instant::now();
    b.sigterm();
    let e = client.recv();
    assert_eq!(
        (e.header("reason"), e.header("ReqID")),
        (Some("responder disconnected"), Some("pending-1")),
        "{e:?}"
    );
    while !sub_refused(&mut client, "room") {
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "still enabled after {:?}",
            t.elapsed()
        );
    }
    let waited = t.elapsed();
    assert!(
        waited < Duration::from_millis(500),
        "forgotten after {waited:?}"
    );
    assert_eq!(metric(a.addr, "middleman_cluster_nodes"), 0.0);
    assert_eq!(b.wait_exit(), 0);
}

#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn a_fresh_cluster_counts_nothing_dropped() {
    let nats = NatsServer::start();
    let nodes = [
        node(&nats, "churn6"),
        node(&nats, "churn6"),
        node(&nats, "churn6"),
    ];
    let addrs: Vec<_> = nodes.iter().map(|n| n.addr).collect();
    settled(&addrs);
    for a in &addrs {
        let m = metrics(*a);
        for reason in ["disconnected", "buffer_full", "too_large", "control_full"] {
            let key = format!("middleman_cluster_dropped_total{{reason=\"{reason}\"}}");
            assert_eq!(m.get(&key), Some(&0.0), "{key} on {a}");
        }
    }
}
