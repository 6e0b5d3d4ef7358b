//! Cluster nodes for the integration tests: in-process nodes joined through a real
//! nats-server, and the waits that tell a cluster has settled.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use middleman::config::ClusterConfig;

use super::nats::NatsServer;
use super::{metrics, next_data, parse_one, Peer, TestServer, WAIT};

pub fn cluster_config(nats: &NatsServer, name: &str) -> ClusterConfig {
    ClusterConfig {
        urls: vec![nats.url()],
        name: name.into(),
        max_pending: 64 << 20,
        node_timeout: Duration::from_secs(3),
        ..ClusterConfig::default()
    }
}

/// An in-process node of cluster `name`.
pub fn node(nats: &NatsServer, name: &str) -> TestServer {
    node_with(nats, name, |_| {})
}

/// An in-process node of cluster `name`, its cluster settings changed by `f`.
pub fn node_with(nats: &NatsServer, name: &str, f: impl FnOnce(&mut ClusterConfig)) -> TestServer {
    let mut cc = cluster_config(nats, name);
    f(&mut cc);
    TestServer::with(move |c| c.cluster = Some(cc))
}

/// One metric of a node (-1 if it is not there).
pub fn metric(addr: SocketAddr, name: &str) -> f64 {
    metrics(addr).get(name).copied().unwrap_or(-1.0)
}

/// Poll `cond` every 20 ms for up to `secs` seconds (state with no message to await,
/// e.g. a node seen by the others); panics with `what` if it never holds.
pub fn until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "not within {secs}s: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait until every node is connected to the backplane and hears all the others.
pub fn settled(nodes: &[SocketAddr]) {
    for &a in nodes {
        until(10, "node connected and hearing the others", || {
            let m = metrics(a);
            m.get("middleman_cluster_connected") == Some(&1.0)
                && m.get("middleman_cluster_nodes") == Some(&((nodes.len() - 1) as f64))
        });
    }
}

/// The arguments that start the binary as a node of cluster `name` on 127.0.0.1:0 with
/// the harness' keys, followed by `extra`.
pub fn node_args<'a>(nats_url: &'a str, name: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = super::proc::SERVER_ARGS.to_vec();
    v.extend_from_slice(&["--cluster", nats_url, "--cluster-name", name]);
    v.extend_from_slice(extra);
    v
}

/// Try `SUB topic` as `client` (after `UNS`, so an earlier subscription does not make
/// it a no-op): true if refused `not permitted`, false if accepted. An unknown command
/// after it always gets an error back, which tells an accepted SUB (no answer) apart.
pub fn sub_refused(client: &mut Peer, topic: &str) -> bool {
    client.send("UNS", topic, &[], "");
    client.send("SUB", topic, &[], "");
    client.send("UNKNOWN", "probe", &[], "");
    let m = client.recv();
    if m.header("cmd") == Some("UNKNOWN") {
        return false;
    }
    assert_eq!(m.header("reason"), Some("not permitted"), "{m:?}");
    assert_eq!(client.recv().header("cmd"), Some("UNKNOWN"));
    true
}

/// Publish probes on `topic` from `publisher` until every one of `subs` has received one
/// (their nodes have subscribed the topic on the backplane), then read each up to an end
/// marker, so that nothing of the probing is left unread.
pub fn await_routes(publisher: &mut Peer, subs: &mut [&mut Peer], topic: &str) {
    let mut reached = vec![false; subs.len()];
    let deadline = Instant::now() + Duration::from_secs(10);
    while reached.contains(&false) {
        assert!(Instant::now() < deadline, "no route to {topic} within 10s");
        publisher.send("PUB", topic, &[], "probe");
        for (s, r) in subs.iter_mut().zip(reached.iter_mut()) {
            if *r {
                continue;
            }
            s.ws.get_mut()
                .set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            if let Ok(d) = next_data(&mut s.ws) {
                assert_eq!(parse_one(&d).body, "probe");
                *r = true;
            }
        }
    }
    publisher.send("PUB", topic, &[], "probe-end");
    for s in subs.iter_mut() {
        s.ws.get_mut().set_read_timeout(Some(WAIT)).unwrap();
        loop {
            let m = s.recv();
            if m.body == "probe-end" {
                break;
            }
            assert_eq!(m.body, "probe");
        }
    }
}

pub fn await_route(publisher: &mut Peer, sub: &mut Peer, topic: &str) {
    await_routes(publisher, &mut [sub], topic);
}
