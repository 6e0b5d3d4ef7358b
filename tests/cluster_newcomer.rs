//! A cluster as a newcomer reads it: `/stats` on each node names the node itself (its
//! id, its `--cluster-node-name`, the cluster's name, the nats-server it uses) and lists
//! the other nodes by id; `/console` has the places that show them. Three nodes in this
//! process joined through a real nats-server on an ephemeral loopback port.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::nats::NatsServer;
use common::*;
use middleman::config::ClusterConfig;

const CLUSTER: &str = "newcomer";
const NAMED: &str = "alpha.eu-1_a";

/// Whether other nodes' names travel in their heartbeats yet. Until they do, the nodes
/// list holds each other node's id with `"name": null`; set to true once they do, and
/// the test then also checks that the others list the named node by its name.
const HEARTBEATS_CARRY_NAMES: bool = false;

fn node(nats: &NatsServer, node_name: Option<&str>) -> TestServer {
    let cc = ClusterConfig {
        urls: vec![nats.url()],
        name: CLUSTER.into(),
        node_name: node_name.map(Into::into),
        ..ClusterConfig::default()
    };
    TestServer::with(move |c| c.cluster = Some(cc))
}

/// Wait until every node is connected to the backplane and hears all the others.
fn settled(nodes: &[SocketAddr]) {
    for &a in nodes {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let m = metrics(a);
            if m.get("middleman_cluster_connected") == Some(&1.0)
                && m.get("middleman_cluster_nodes") == Some(&((nodes.len() - 1) as f64))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{a}: not connected and hearing the others within 10s: {m:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn stats(addr: SocketAddr) -> serde_json::Value {
    let resp = http_get(addr, "GET /stats HTTP/1.1\r\nHost: x\r\n\r\n");
    let body = resp.split("\r\n\r\n").nth(1).expect("a body");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The other nodes as `/stats` lists them: (id, name), by id.
fn others(json: &serde_json::Value) -> Vec<(String, Option<String>)> {
    let mut v: Vec<_> = json["cluster"]["nodes"]
        .as_array()
        .expect("cluster.nodes")
        .iter()
        .map(|n| {
            let name = n.get("name").expect("every node has a name field");
            (
                n["id"].as_str().expect("an id").to_owned(),
                name.as_str().map(str::to_owned),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn stats_and_console_name_the_node_and_list_the_others_by_id() {
    let nats = NatsServer::start();
    let (a, b, c) = (
        node(&nats, Some(NAMED)),
        node(&nats, None),
        node(&nats, None),
    );
    let addrs = [a.addr, b.addr, c.addr];
    settled(&addrs);

    // A connection's cid starts with its node's id: that is how a newcomer tells them
    // apart, and /stats must say the same.
    let cids: Vec<String> = addrs.iter().map(|&x| Peer::service(x).cid).collect();
    let jsons: Vec<serde_json::Value> = addrs.iter().map(|&x| stats(x)).collect();
    let mut ids = Vec::new();
    for ((json, cid), want_name) in jsons.iter().zip(&cids).zip([Some(NAMED), None, None]) {
        let me = &json["cluster"]["node"];
        let id = me["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no node id: {json}"));
        assert!(
            !id.is_empty() && cid.starts_with(id) && cid.len() > id.len(),
            "node id {id:?} is not the prefix of cid {cid:?}"
        );
        assert_eq!(me["name"].as_str(), want_name, "{me}");
        assert_eq!(me["cluster"], CLUSTER, "{me}");
        assert_eq!(me["nats"], nats.url().as_str(), "{me}");
        assert_eq!(me.as_object().map(|o| o.len()), Some(4), "{me}");
        assert_eq!(json["cluster"]["connected"], true);
        ids.push(id.to_owned());
    }
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "three distinct node ids: {ids:?}");

    // Each node lists exactly the two others, by the ids they give themselves.
    for (i, json) in jsons.iter().enumerate() {
        let listed: Vec<String> = others(json).into_iter().map(|(id, _)| id).collect();
        let mut want: Vec<String> = (0..3).filter(|&j| j != i).map(|j| ids[j].clone()).collect();
        want.sort();
        assert_eq!(listed, want, "node {} ({}) lists {json}", i, ids[i]);
    }
    if HEARTBEATS_CARRY_NAMES {
        others_list_the_named_node_by_name(&addrs, &ids[0]);
    }

    // /console has the places that show this node's id, name, cluster and nats-server,
    // and the others by name and id (its script fills them from /stats).
    let page = http_get(a.addr, "GET /console HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    for want in [
        "id=\"node-id\"",
        "id=\"node-name\"",
        "id=\"node-cluster\"",
        "id=\"node-nats\"",
        "me.name",
        "me.id",
        "me.cluster",
        "me.nats",
        "<th>other node</th><th>id</th>",
        "[[n.name || \"(no name)\", \"name\"], [n.id, \"name\"]",
    ] {
        assert!(page.contains(want), "/console has no {want:?}");
    }
}

/// Once heartbeats carry names (see [`HEARTBEATS_CARRY_NAMES`]): the nodes other than
/// the named one list it by its id and name (polled: a name arrives with a heartbeat).
fn others_list_the_named_node_by_name(addrs: &[SocketAddr], named_id: &str) {
    for &x in &addrs[1..] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let listed = others(&stats(x));
            let entry = listed.iter().find(|(id, _)| id == named_id);
            if entry.and_then(|(_, n)| n.as_deref()) == Some(NAMED) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{x} does not list {named_id} as {NAMED:?}: {listed:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
