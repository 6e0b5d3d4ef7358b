//! A cluster node's broker fed a random mix of local commands, clock ticks, backplane
//! connects and losses, and messages "from nats-server" for any of its subscriptions:
//! well-formed ones of every kind (heartbeats, enablements, full states, forwarded
//! requests, answers, private messages, uids, no-responders statuses) with fuzzed fields,
//! and raw bytes. nats-server is a network peer: nothing it sends may panic the node.
//! After every step the routing tables hold their invariants (a request taken from
//! another node included), every packet goes to a connected connection, and the bytes
//! waiting for nats-server stay within the bound, control lane (heartbeats, interest
//! changes, announcements) included.
#![no_main]

use std::rc::Rc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use middleman::broker::{Broker, Role, Settings};
use middleman::cluster::node::ClusterSettings;
use middleman::cluster::proto::{Headers, Msg};
use middleman::protocol::{Decoded, Decoder, Limits, Packet};
use middleman::router::ConnId;

const CONNS: usize = 5;
const NODE: &str = "fuzz01";
const BOUND: usize = 8192;
const TOPICS: [&str; 3] = ["a", "b", "MSG:fuzz011"];
const CMDS: [&str; 9] = [
    "SUB", "UNS", "PUB", "REQ", "RES", "EPUB", "ESUB", "EREQ", "INT",
];
/// Payload templates for backplane messages; `{}` takes fuzzed bytes.
const PAYLOADS: [&str; 21] = [
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
    "Q node02 {} fuzz011 a\nREQ a\r\nReqID: {}\r\ncid: node021\r\nuid: \r\n\r\nq\r\n.\r\n",
    "Q node02 9 * a\nREQ a\r\nReqID: x\r\ncid: node021\r\nuid: \r\n\r\n{}\r\n.\r\n",
    "Q {} 1 {} {}\n{}",
    "REQ a\r\nReqID: {}\r\ncid: node021\r\nuid: \r\n\r\nq\r\n.\r\n",
];
const SUBJECTS: [&str; 9] = [
    "mm.pub.a",
    "mm.pub.b",
    "mm.inbox.fuzz01.3",
    "mm.inbox.fuzz01.1",
    "mm.inbox.fuzz01.2",
    "mm.node.fuzz01",
    "mm.ctl",
    "mm.mon",
    "mm.pub.MSG~3Afuzz011",
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
    let mut now = Instant::now();
    broker.cluster_connected(now, 1024);
    let mut connected = [false; CONNS];
    let mut out: Vec<(ConnId, Rc<Packet>)> = Vec::new();
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
                let wire = command(cmd, target, reqid, a);
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
                let reply = (kind % 2 == 0).then_some(&b"mm.inbox.node02.7"[..]);
                let status = a % 5 == 0;
                let msg = Msg {
                    subject: &subject,
                    sid: sid.as_bytes(),
                    reply,
                    headers: status.then(|| Headers::parse(b"NATS/1.0 503\r\n\r\n")),
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
        if let Err(e) = broker.router().check_invariants() {
            panic!("invariant broken: {e}");
        }
        for (to, _) in &out {
            assert!(*to < CONNS && connected[*to], "a packet for {to}, not connected");
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
