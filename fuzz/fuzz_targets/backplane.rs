//! A cluster node's broker fed a random mix of local commands, clock ticks, backplane
//! connects and losses, and messages "from nats-server" for any of its subscriptions:
//! well-formed ones of every kind (heartbeats, enablements, full states, forwarded
//! requests, answers, batches of either, private messages, uids, no-responders statuses,
//! on single requests and on batches, one with the widest id range) with fuzzed fields,
//! and raw bytes. nats-server is a network peer: nothing it sends may panic the node.
//! After every step the routing tables hold their invariants (a request taken from
//! another node included), every packet goes to a connected connection, and the bytes
//! waiting for nats-server stay within the bound, control lane (heartbeats, interest
//! changes, announcements) included.
//!
//! Protocol 1.1 across nodes: nats-server also brings `G` (grant/withdrawal), `W` (a
//! granter left), `I S|U|K`, `Y` (presence question) and `y` (presence answer), well
//! formed and garbled, and event interest (`E .. s 1 SYS:..`); local commands byte 0x80
//! and above are the 1.1 commands whose `forcid` names a cid here, on another node heard
//! (`node021`), on a node never heard, or no cid at all, and presence while another node
//! is known (a `Y` sent, its `y` awaited). The outbox records kicks; a kick goes to a
//! connected connection with a reason of at most 120 bytes, and is carried out as the
//! reactor does.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use middleman::broker::{Broker, Role, Settings};
use middleman::cluster::history::Storage;
use middleman::cluster::node::ClusterSettings;
use middleman::cluster::proto::{Headers, Msg};
use middleman::core::history::{HistoryRule, HistorySettings};
use middleman::core::rooms::MAX_KICK_REASON;
use middleman::protocol::{Decoded, Decoder, Limits};
use middleman_fuzz::Out;

const CONNS: usize = 5;
const NODE: &str = "fuzz01";
const BOUND: usize = 8192;
const TOPICS: [&str; 4] = ["a", "b", "MSG:fuzz011", "h.x"];
const CMDS: [&str; 9] = [
    "SUB", "UNS", "PUB", "REQ", "RES", "EPUB", "ESUB", "EREQ", "INT",
];
/// Version 1.1 local commands (op byte 0x80 and above): the first line, then `forcid`
/// when the command takes one.
const CMDS11: [&str; 15] = [
    "ESUB a",
    "EPUB a",
    "EREQ a",
    "DSUB a",
    "DPUB a",
    "DREQ a",
    "INT SUB",
    "INT UNS",
    "INT KICK",
    "REQ SYS:PRESENCE",
    "SUB SYS:SUB",
    "SUB SYS:DISCONNECT",
    "SUB SYS:CONNECT",
    "UNS SYS:SUB",
    "SUB a",
];
/// Who a `forcid` names: a cid on node02 (heard once its heartbeat came), cids here, a
/// node never heard, not a cid.
const WHOM: [&str; 6] = ["node021", "fuzz011", "fuzz012", "zzzz991", "Bad!", "node02"];
/// FINDING (reported, not asserted): `I U <cid>` LF `MSG:<cid>` from a peer unsubscribes
/// the connection from its own private channel, and `I S` subscribes it to any target
/// (another's `MSG:`, a `SYS:` event topic): `on_remote_int` does not refuse what the
/// sending node's `INT SUB/UNS` refuses. The template below sends the first.
/// Payload templates for backplane messages; `{}` takes fuzzed bytes.
const PAYLOADS: [&str; 50] = [
    "H node02 {} 1 0 5 -",
    "H node02 1 0 {} 5 name-{}",
    "H fuzz01 0 0 0 {} -",
    "E node02 {} p 1 a",
    "E node02 2 r 1 a",
    "E node02 3 s 0 {}",
    "F node02 {}\np a\nr a\ns b\n{}",
    "J node02 5",
    "J fuzz01 {}",
    "D node02 {}",
    "L node02 {} 0 fuzz01={}\na node02x=1 node02y={}\nb\n{}",
    "L node02 1 1 -\na node021=0 node022=0\n",
    "X responder disconnected",
    "R\nRES a\r\nrid: {}\r\ncid: node021\r\n\r\nok\r\n.\r\n",
    "M fuzz011\nPUB MSG:fuzz011\r\ncid: node021\r\nuid: \r\n\r\n{}\r\n.\r\n",
    "U fuzz011\n{}",
    "S node02",
    "Q node02 {} fuzz011 a ReqID {}\nREQ a\r\nReqID: {}\r\ncid: node021\r\nuid: \r\n\r\nq\r\n.\r\n",
    "Q node02 9 * a reqid x y\nREQ a\r\nReqID: x\r\ncid: node021\r\nuid: \r\n\r\n{}\r\n.\r\n",
    "Q {} 1 {} {} {} {}\n{}",
    "REQ a\r\nReqID: {}\r\ncid: node021\r\nuid: \r\n\r\nq\r\n.\r\n",
    // Version 1.1 (cluster/rooms.rs), on this node's subject.
    "G node02 node02s s 1 fuzz01{}\n{}",
    "G node02 node02s {} {} {}\n{}",
    "G node02 node02s p 0 fuzz011\na",
    "G {} {} r 1 fuzz011\n{}",
    "W node02 node02s",
    "W {} {}",
    "I S fuzz01{}\n{}",
    "I {} fuzz011\n{}",
    "I K fuzz01{}\n{}",
    "I U fuzz011\nMSG:fuzz011",
    "Y node02 {} {}\n{}",
    "Y node02 7 3\na",
    "Y {} 1 99999999999999999999\na",
    "y {} node02\n{} {} {}\n{}\n{}",
    // Counts at the top of usize: summed without overflow (fuzz finding, fixed in
    // e617ef2).
    "y 0 node02\n18446744073709551615 18446744073709551615 -\n",
    "y {} node02\n3 2 2\nu1\nu2\nnode021 u1\nnode022 u2\nnode023\n",
    "y 0 node02\n1 1 99999999999\n{}",
    "E node02 {} s 1 SYS:{}",
    "G node02 {}",
    // Cluster history (cluster/history.rs): JetStream API answers, acks, deliveries.
    "{\"created\":\"2026-12-07T{}Z\",\"state\":{\"messages\":{},\"bytes\":1}}",
    "{\"error\":{\"code\":400,\"err_code\":10058,\"description\":\"{}\"}}",
    "{\"error\":{\"code\":503,\"err_code\":{}}}",
    "{\"name\":\"c{}\",\"num_pending\":{},\"delivered\":{\"consumer_seq\":{},\"stream_seq\":{}}}",
    "{\"stream\":\"MM_mm\",\"seq\":{}}",
    "PUB h.x\r\ncid: node021\r\nuid: \r\n\r\n{}\r\n.\r\n",
    // Batches (`+`, 4-byte lengths): of requests on the node subject, of answers
    // (`<id>` LF RES) on `inbox.<N>.a`.
    "+\0\0\0\x4bQ node02 {} * a ReqID x\nREQ a\r\nReqID: x\r\ncid: node021\r\nuid: \r\n\r\nq\r\n.\r\n{}",
    "+{}",
    "{}\nRES a\r\nReqID: {}\r\ncid: node021\r\n\r\nok\r\n.\r\n",
    "+\0\0\0\x28{}\nRES a\r\nReqID: x\r\ncid: node021\r\n\r\nok\r\n.\r\n{}",
];
const SUBJECTS: [&str; 20] = [
    "mm.js.fuzz01.api.1",
    "mm.js.fuzz01.api.2",
    "mm.js.fuzz01.api.3",
    "mm.js.fuzz01.api.4",
    "mm.js.fuzz01.api.ack",
    "mm.hist.h~2Ex",
    "mm.hist.h~2Ex",
    "mm.pub.a",
    "mm.pub.b",
    "mm.inbox.fuzz01.3",
    "mm.inbox.fuzz01.1",
    "mm.inbox.fuzz01.2",
    "mm.node.fuzz01",
    "mm.ctl",
    "mm.mon",
    "mm.pub.MSG~3Afuzz011",
    // Answer batches; request batches' replies (the no-responders status), one with a
    // range as wide as it gets.
    "mm.inbox.fuzz01.a",
    "mm.inbox.fuzz01.q.node02.1.00000000000000000003",
    "mm.inbox.fuzz01.q.node02.0.18446744073709551615",
    "mm.inbox.fuzz01.q.node02.x.1",
];

struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(b)
    }
    fn bytes(&mut self, max: usize) -> &'a [u8] {
        let n = (self.byte().unwrap_or(0) as usize % (max + 1)).min(self.data.len());
        let (b, rest) = self.data.split_at(n);
        self.data = rest;
        b
    }
}

/// A version 1.1 command (`sel`: op byte less 0x80); `extra` (fuzzed) is the presence
/// `limit` (as digits) or the kick `reason`.
fn command11(sel: u8, extra: &[u8]) -> Vec<u8> {
    let cmd = CMDS11[sel as usize % CMDS11.len()];
    let whom = WHOM[sel as usize / CMDS11.len() % WHOM.len()];
    let mut m = format!("{cmd}\r\n").into_bytes();
    if !cmd.contains("SYS:") && cmd != "SUB a" {
        m.extend_from_slice(format!("forcid: {whom}\r\n").as_bytes());
    }
    if cmd.starts_with("INT") || cmd.starts_with("REQ") {
        m.extend_from_slice(b"topic: a\r\n");
    }
    if cmd.starts_with("REQ") {
        m.extend_from_slice(b"ReqID: p\r\n");
        if !extra.is_empty() {
            m.extend_from_slice(b"limit: ");
            m.extend(extra.iter().map(|b| b'0' + b % 10));
            m.extend_from_slice(b"\r\n");
        }
    }
    if cmd == "INT KICK" && !extra.is_empty() {
        m.extend_from_slice(b"reason: ");
        m.extend_from_slice(extra);
        m.extend_from_slice(b"\r\n");
    }
    m.extend_from_slice(b"\r\n\r\n.\r\n");
    m
}

fn command(cmd: &str, target: &str, reqid: &[u8], rid: u8) -> Vec<u8> {
    let mut m = format!("{cmd} {target}\r\n").into_bytes();
    match cmd {
        "REQ" => {
            m.extend_from_slice(b"ReqID: ");
            m.extend(reqid.iter().map(|b| b'a' + b % 26));
            m.extend_from_slice(b"\r\n");
        }
        "RES" => m.extend_from_slice(format!("rid: {rid}\r\n").as_bytes()),
        "INT" => m.extend_from_slice(b"forcid: node021\r\nsetuid: bob\r\n"),
        // A recovery (cluster history): from a fuzzed position, or the last.
        "SUB" if rid % 3 == 0 => m.extend_from_slice(b"since: last\r\n"),
        "SUB" if rid % 3 == 1 => {
            m.extend_from_slice(b"since: E:");
            m.extend(reqid.iter().map(|b| b'0' + b % 10));
            m.extend_from_slice(b"1\r\n");
        }
        _ => {}
    }
    m.extend_from_slice(b"\r\nbody\r\n.\r\n");
    m
}

fuzz_target!(|data: &[u8]| {
    let settings = Settings {
        max_subscriptions: 4,
        request_timeout: Duration::from_secs(2),
        max_pending_requests: 3,
        max_reqid_bytes: 8,
    };
    let mut broker = Broker::new(settings, NODE);
    broker.join_cluster(
        NODE,
        ClusterSettings {
            max_pending: BOUND,
            ..ClusterSettings::default()
        },
    );
    broker.cluster_history(
        &HistorySettings {
            rules: vec![HistoryRule {
                prefix: "h.".into(),
                size: 3,
                ttl: Duration::from_secs(60),
            }],
            max_bytes: 4096,
        },
        Storage::Memory,
    );
    let mut now = Instant::now();
    broker.cluster_connected(now, 1024);
    let mut connected = [false; CONNS];
    let mut out = Out::default();
    let mut input = Input { data };
    let mut steps = 0;
    while let Some(kind) = input.byte() {
        steps += 1;
        if steps > 200 {
            break;
        }
        out.clear();
        let a = input.byte().unwrap_or(0);
        let conn = a as usize % CONNS;
        match kind % 8 {
            0 if !connected[conn] => {
                let role = [Role::Service, Role::Client, Role::Monitor][a as usize / CONNS % 3];
                broker.connect(conn, role);
                connected[conn] = true;
                broker.connected(conn, &mut out);
            }
            1 if connected[conn] => {
                broker.disconnect(conn, &mut out);
                connected[conn] = false;
            }
            2 => {
                now += Duration::from_millis(u64::from(a) * 40);
                broker.expire(now, &mut out);
                broker.cluster_tick(now, &mut out);
            }
            3 if connected[conn] => {
                let b = input.byte().unwrap_or(0);
                let cmd = CMDS[b as usize % CMDS.len()];
                let target = TOPICS[b as usize / CMDS.len() % TOPICS.len()];
                let reqid = input.bytes(10);
                let wire = if b >= 0x80 {
                    command11(b - 0x80, reqid)
                } else {
                    command(cmd, target, reqid, a)
                };
                let mut dec = Decoder::new(Limits::default());
                dec.feed(&wire);
                if let Ok(Some(Decoded::Message(m))) = dec.next() {
                    broker.apply(conn, &m, now, &mut out);
                }
            }
            4 | 5 => {
                let subject = match input.byte().unwrap_or(0) {
                    s if (s as usize) < SUBJECTS.len() * 20 => {
                        SUBJECTS[s as usize % SUBJECTS.len()].as_bytes().to_vec()
                    }
                    _ => input.bytes(24).to_vec(),
                };
                let p = input.byte().unwrap_or(0);
                let payload: Vec<u8> = if p < 200 {
                    let t = PAYLOADS[p as usize % PAYLOADS.len()];
                    let mut v = Vec::new();
                    for (i, part) in t.split("{}").enumerate() {
                        if i > 0 {
                            v.extend_from_slice(input.bytes(12));
                        }
                        v.extend_from_slice(part.as_bytes());
                    }
                    v
                } else {
                    input.bytes(64).to_vec()
                };
                let sid = (a % 16 + 1).to_string();
                let ack = format!(
                    "$JS.ACK.MM_mm.c.1.{}.{}.0.{}",
                    input.byte().unwrap_or(1),
                    input.byte().unwrap_or(1),
                    input.byte().unwrap_or(0) % 4
                );
                let reply = match (kind % 2, a % 3) {
                    (0, _) => Some(&b"mm.inbox.node02.7"[..]),
                    (_, 0) => Some(ack.as_bytes()),
                    _ => None,
                };
                let status = a % 5 == 0;
                // Statuses: no responders, and JetStream's heartbeat and flow control.
                let head: &[u8] = match a % 3 {
                    0 => b"NATS/1.0 503\r\n\r\n",
                    1 => b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 3\r\n\r\n",
                    _ => b"NATS/1.0 100 FlowControl Request\r\n\r\n",
                };
                let msg = Msg {
                    subject: &subject,
                    sid: sid.as_bytes(),
                    reply,
                    headers: status.then(|| Headers::parse(head)),
                    payload: if status { &[] } else { &payload },
                };
                broker.on_backplane(&msg, now, &mut out);
            }
            6 => {
                if let Some(c) = broker.cluster.as_mut() {
                    if a % 2 == 0 {
                        c.on_disconnected(now);
                    } else {
                        c.take_written();
                    }
                }
                if a % 2 == 0 {
                    broker.cluster_connected(now, 512 + a as usize * 8);
                }
            }
            7 => {
                now += Duration::from_millis(u64::from(a));
                broker.cluster_before_flush(now);
                if a % 3 == 0 {
                    broker.cluster_leave();
                }
            }
            _ => {}
        }
        for (to, why) in std::mem::take(&mut out.kicks) {
            assert!(
                to < CONNS && connected[to],
                "a kick for {to}, not connected"
            );
            assert!(
                why.len() <= MAX_KICK_REASON,
                "kick reason of {} bytes",
                why.len()
            );
            // The reactor closes it (4000) and forgets it.
            broker.disconnect_because(to, "kicked", &mut out);
            connected[to] = false;
            assert!(out.kicks.is_empty(), "a disconnect kicked someone");
        }
        if let Err(e) = broker.router().check_invariants() {
            panic!("invariant broken: {e}");
        }
        for (to, _) in &out.sent {
            assert!(
                *to < CONNS && connected[*to],
                "a packet for {to}, not connected"
            );
        }
        let c = broker.cluster.as_mut().expect("joined");
        // The output is written by the reactor; here it is taken away every step, as a
        // fast nats-server would, once it holds more than the bound.
        let pending = c.pending_bytes();
        assert!(pending <= BOUND, "{pending} bytes waiting, bound {BOUND}");
        if pending > BOUND / 2 {
            c.take_written();
        }
    }
});
