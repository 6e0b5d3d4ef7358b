//! A random sequence of connects, disconnects, commands and clock ticks against the
//! pure routing core. After every step: the two subscription indexes agree, the pending
//! table and its per-connection indexes (asked, answering) agree both ways and no
//! pending request outlives a connection (`check_invariants`), and permissions hold:
//! a client's refused SUB/PUB changes nothing and gets exactly one error. Requests are
//! bounded: with a cap of 2 in flight per connection and ReqIDs of at most 3 bytes, a
//! REQ over either limit gets exactly one error (the right reason, its ReqID echoed
//! only under the cap), nothing is forwarded, and no connection ever has more than 2.
#![no_main]

use std::rc::Rc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use middleman::broker::{reason, Broker, Role, Settings};
use middleman::protocol::{Decoded, Decoder, Limits, Packet};
use middleman::router::{ConnId, Enable};

const CONNS: usize = 6;
const MAX_PENDING: usize = 2;
const MAX_REQID: usize = 3;
const TOPICS: [&str; 4] = ["a", "b", "c", "MSG:"];
const CMDS: [&str; 10] = [
    "SUB", "UNS", "PUB", "REQ", "RES", "EPUB", "ESUB", "EREQ", "INT", "FOO",
];

fuzz_target!(|data: &[u8]| {
    let settings = Settings {
        max_subscriptions: 4,
        request_timeout: Duration::from_secs(5),
        max_pending_requests: MAX_PENDING,
        max_reqid_bytes: MAX_REQID,
    };
    let mut broker = Broker::new(settings, "fz");
    let t0 = Instant::now();
    let mut now = t0;
    let mut connected = [false; CONNS];
    let mut last_rid: u64 = 0;
    let mut out: Vec<(ConnId, Rc<Packet>)> = Vec::new();
    for op in data.chunks(4) {
        let [kind, a, b, c] = [
            op[0],
            *op.get(1).unwrap_or(&0),
            *op.get(2).unwrap_or(&0),
            *op.get(3).unwrap_or(&0),
        ];
        let conn = a as usize % CONNS;
        out.clear();
        match kind % 5 {
            0 if !connected[conn] => {
                let role = [Role::Service, Role::Client, Role::Monitor][b as usize % 3];
                broker.connect(conn, role);
                connected[conn] = true;
            }
            1 if connected[conn] => {
                broker.disconnect(conn, &mut out);
                connected[conn] = false;
                assert!(out.iter().all(|(to, _)| *to != conn && connected[*to]));
            }
            2 => now += Duration::from_millis(u64::from(b) * 100),
            _ if connected[conn] => {
                let cmd = CMDS[b as usize % CMDS.len()];
                let mut target = TOPICS[c as usize % TOPICS.len()].to_owned();
                if target == "MSG:" {
                    let other = (c as usize / 4) % CONNS;
                    target.push_str(broker.cid(other).unwrap_or("gone"));
                }
                if cmd == "INT" && c & 0x80 != 0 {
                    target = "UID".into();
                }
                let mut raw = format!("{cmd} {target}\r\n");
                // "r0".."r99" fit the 3-byte limit, "r100".."r255" do not.
                let reqid = format!("r{b}");
                if c & 1 != 0 {
                    raw.push_str(&format!("ReqID: {reqid}\r\n"));
                }
                if c & 2 != 0 {
                    raw.push_str(&format!(
                        "rid: {}\r\n",
                        last_rid.saturating_sub(u64::from(c >> 5))
                    ));
                }
                if c & 4 != 0 {
                    let other = (b as usize) % CONNS;
                    raw.push_str(&format!(
                        "forcid: {}\r\nsetuid: u{b}\r\n",
                        broker.cid(other).unwrap_or("x")
                    ));
                }
                raw.push_str("cid: forged\r\n\r\nbody\r\n.\r\n");
                let role = broker.role(conn);
                let is_client = role == Some(Role::Client);
                let sub_before = broker.router().is_subscribed(conn, target.as_bytes());
                let sub_enabled = broker.router().is_enabled(target.as_bytes(), Enable::Sub);
                let pub_enabled = broker.router().is_enabled(target.as_bytes(), Enable::Pub);
                let asked_before = broker.router().asked_count(conn);
                let pending_before = broker.router().pending_count();
                let mut dec = Decoder::new(Limits::default());
                dec.feed(raw.as_bytes());
                if let Ok(Some(Decoded::Message(m))) = dec.next() {
                    broker.apply(conn, &m, now, &mut out);
                }
                let private = target.starts_with("MSG:");
                let errors_to_sender = out
                    .iter()
                    .filter(|(to, p)| *to == conn && p.payload().starts_with(b"PUB ERROR\r\n"))
                    .count();
                if is_client && cmd == "SUB" && !sub_before && (private || !sub_enabled) {
                    assert!(
                        !broker.router().is_subscribed(conn, target.as_bytes()),
                        "refused SUB took effect"
                    );
                    assert_eq!(errors_to_sender, 1);
                }
                if cmd == "REQ" && c & 1 != 0 {
                    let error_reason = |why: &str| {
                        let r = format!("\r\nreason: {why}\r\n");
                        out.iter().any(|(to, p)| {
                            *to == conn && p.payload().windows(r.len()).any(|w| w == r.as_bytes())
                        })
                    };
                    let line = format!("\r\nReqID: {reqid}\r\n");
                    let echoed = out.iter().any(|(_, p)| {
                        p.payload()
                            .windows(line.len())
                            .any(|w| w == line.as_bytes())
                    });
                    if reqid.len() > MAX_REQID {
                        assert_eq!(out.len(), 1, "an over-long ReqID was forwarded");
                        assert!(error_reason(reason::REQID_TOO_LONG));
                        assert!(!echoed, "an over-long ReqID was echoed");
                        assert_eq!(broker.router().pending_count(), pending_before);
                    } else if asked_before >= MAX_PENDING {
                        assert_eq!(out.len(), 1, "a REQ over the cap was forwarded");
                        assert!(error_reason(reason::TOO_MANY_REQUESTS));
                        assert!(echoed, "the cap error must carry the ReqID");
                        assert_eq!(broker.router().asked_count(conn), asked_before);
                        assert_eq!(broker.router().pending_count(), pending_before);
                    }
                }
                if is_client && cmd == "PUB" && (private || !pub_enabled) {
                    assert_eq!(out.len(), 1, "refused PUB was delivered");
                    assert_eq!(errors_to_sender, 1);
                }
                for (_, p) in &out {
                    // Nobody can forge cid: every relayed message carries exactly one.
                    let text = p.payload();
                    let forged = text
                        .windows(12)
                        .any(|w| w.eq_ignore_ascii_case(b"cid: forged\r"));
                    assert!(!forged, "forged cid relayed");
                }
                if cmd == "REQ" {
                    if let Some(d) = broker.next_deadline() {
                        assert!(d <= now + Duration::from_secs(5));
                    }
                    last_rid += 1;
                }
            }
            _ => {}
        }
        broker.expire(now, &mut out);
        if let Err(e) = broker.router().check_invariants() {
            panic!("invariant broken: {e}");
        }
        for (to, _) in &out {
            assert!(connected[*to], "packet for a connection that is gone");
        }
        for (c, up) in connected.iter().enumerate() {
            let asked = broker.router().asked_count(c);
            assert!(
                asked <= MAX_PENDING,
                "conn {c} has {asked} requests in flight"
            );
            if !up {
                assert_eq!((asked, broker.router().answering_count(c)), (0, 0));
            }
        }
    }
    // Everyone leaves: nothing may remain.
    for (conn, up) in connected.iter_mut().enumerate() {
        if *up {
            out.clear();
            broker.disconnect(conn, &mut out);
            *up = false;
        }
    }
    assert_eq!(broker.router().pending_count(), 0);
    assert_eq!(broker.router().topic_count(), 0);
    assert_eq!(broker.session_count(), 0);
});
