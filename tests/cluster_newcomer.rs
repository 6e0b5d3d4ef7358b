//! A cluster as a newcomer reads it: `/stats` on each node names the node itself (its
//! id, its `--cluster-node-name`, the cluster's name, the nats-server it uses) and lists
//! the other nodes by id; `/console` has the places that show them. Three nodes in this
//! process joined through a real nats-server on an ephemeral loopback port.

mod common;

use std::net::SocketAddr;

use common::cluster::{node_with, settled, until};
use common::nats::NatsServer;
use common::*;

const CLUSTER: &str = "newcomer";
const NAMED: &str = "alpha.eu-1_a";

fn node(nats: &NatsServer, node_name: Option<&str>) -> TestServer {
    node_with(nats, CLUSTER, |c| c.node_name = node_name.map(Into::into))
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
    // And the others list the named node by its name too (it travels in heartbeats).
    for &x in &addrs[1..] {
        until(10, "the named node listed by its name", || {
            others(&stats(x))
                .iter()
                .any(|(id, n)| *id == ids[0] && n.as_deref() == Some(NAMED))
        });
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
