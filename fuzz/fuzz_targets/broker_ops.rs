//! A random sequence of connects, disconnects, commands and clock ticks against the
//! pure routing core. After every step: the two subscription indexes agree, the pending
//! table and its per-connection indexes (asked, answering) agree both ways and no
//! pending request outlives a connection (`check_invariants`), and permissions hold:
//! a client's refused SUB/PUB changes nothing and gets exactly one error. Requests are
//! bounded: with a cap of 2 in flight per connection and ReqIDs of at most 3 bytes, a
//! REQ over either limit gets exactly one error (the right reason, its ReqID echoed
//! only under the cap), nothing is forwarded, and no connection ever has more than 2.
//!
//! Protocol 1.1 (§9.1-§9.4), on op bytes of 0x80 and above (the ops below keep their
//! meaning): grants and withdrawals with a `forcid` of a live, gone, unknown or malformed
//! cid, `INT SUB/UNS/KICK`, `REQ SYS:PRESENCE` with odd limits, SUB/UNS/PUB/REQ of `SYS:`
//! targets, `disconnect_because`; every connect is followed by `connected` (its
//! `SYS:CONNECT`). The outbox records kicks, which the harness then carries out as the
//! reactor does (`disconnect_because(.., "kicked")`). Checked: a refused SUB/PUB allows for
//! grants; a client or monitor is refused every 1.1 command with exactly one error; a kick
//! goes to a live connection, only for a service's `INT KICK`, with a reason of at most
//! 120 bytes; grants and subscriptions stay within `max_subscriptions`; every `PUB t`
//! goes to a subscriber of t (or, not for `SYS:` events, a monitor); `SYS:SUB/UNS` never
//! name a `MSG:` or `SYS:` topic; every connection keeps its `MSG:<cid>`; a presence answer goes to its asker, lists at most
//! `limit` lines in cid order, and counts the topic's subscribers.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use middleman::broker::{reason, Broker, Role, Settings};
use middleman::core::rooms::{MAX_KICK_REASON, MAX_PRESENCE_LIMIT};
use middleman::protocol::{Decoded, Decoder, Limits};
use middleman::router::{ConnId, Enable};
use middleman_fuzz::Out;

const CONNS: usize = 6;
const MAX_PENDING: usize = 2;
const MAX_REQID: usize = 3;
const TOPICS: [&str; 4] = ["a", "b", "c", "MSG:"];
const CMDS: [&str; 10] = [
    "SUB", "UNS", "PUB", "REQ", "RES", "EPUB", "ESUB", "EREQ", "INT", "FOO",
];
const MAX_SUBS: usize = 4;
/// FINDING (fixed): `ESUB MSG:<cid>` + `forcid: <cid>` and then the same `DSUB` used to
/// unsubscribe the client from its own private channel (`after_sub_right_lost` did not
/// spare `MSG:`). Kept as a switch for bisecting: while true, a `DSUB` of `MSG:<cid>`
/// excuses that connection from the "keeps its `MSG:<cid>`" check.
const KNOWN_DSUB_ENDS_PRIVATE: bool = false;
/// Version 1.1 commands (first line without the target, which follows when not given).
const CMDS11: [&str; 13] = [
    "ESUB",
    "EPUB",
    "EREQ",
    "DSUB",
    "DPUB",
    "DREQ",
    "INT SUB",
    "INT UNS",
    "INT KICK",
    "REQ SYS:PRESENCE",
    "SUB",
    "PUB",
    "UNS",
];
const TOPICS11: [&str; 8] = ["a", "b", "c", "SYS:SUB", "MSG:", "", "a\tb", "long"];
const SYS_TARGETS: [&str; 6] = [
    "SYS:CONNECT",
    "SYS:DISCONNECT",
    "SYS:SUB",
    "SYS:UNS",
    "SYS:PRESENCE",
    "SYS:X",
];
const SYS_CMDS: [&str; 4] = ["SUB", "UNS", "PUB", "REQ"];
const LIMITS: [&str; 10] = [
    "0",
    "1",
    "3",
    "10001",
    "-1",
    "abc",
    "+2",
    "18446744073709551615",
    "18446744073709551616",
    "",
];
const CLOSE_REASONS: [&str; 6] = ["normal", "idle", "kicked", "slow_consumer", "peer_gone", ""];

/// The value of header `name` in a packet (first occurrence).
fn header<'a>(payload: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let head_end = payload.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = &payload[..head_end];
    head.split(|&b| b == b'\n').skip(1).find_map(|l| {
        let l = l.strip_suffix(b"\r").unwrap_or(l);
        let rest = l.strip_prefix(name.as_bytes())?;
        rest.strip_prefix(b": ")
    })
}

/// The body of a packet (between the blank line and the final `.`), dot-unstuffed
/// lines not needed here.
fn body(payload: &[u8]) -> &[u8] {
    let start = payload
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(payload.len(), |i| i + 4);
    let rest = &payload[start..];
    rest.strip_suffix(b"\r\n.\r\n").unwrap_or(rest)
}

/// A version 1.1 command from `conn`: the raw bytes, the target, the topic it is about
/// (target or `topic` header), the `limit` header and the kick `reason` header.
struct Cmd11 {
    raw: Vec<u8>,
    cmd: &'static str,
    topic: Vec<u8>,
    limit: Option<&'static str>,
    reason: Option<Vec<u8>>,
}

fn cmd11(broker: &Broker, cids: &[Option<String>], x: u8, b: u8, c: u8) -> Cmd11 {
    let cmd = CMDS11[b as usize % CMDS11.len()];
    let sel = b as usize / CMDS11.len(); // 0..=19
    let mut topic: Vec<u8> = match TOPICS11[c as usize % TOPICS11.len()] {
        "MSG:" => {
            let other = x as usize % CONNS;
            format!("MSG:{}", broker.cid(other).unwrap_or("gone")).into_bytes()
        }
        "long" => vec![b't'; 256],
        t => t.as_bytes().to_vec(),
    };
    if topic.is_empty() && !cmd.starts_with("INT") && !cmd.starts_with("REQ") {
        topic = b"d".to_vec();
    }
    let hdrs = c as usize / TOPICS11.len(); // 0..=31
    let mut raw = Vec::new();
    raw.extend_from_slice(cmd.as_bytes());
    if !cmd.contains(' ') {
        raw.push(b' ');
        raw.extend_from_slice(&topic);
    }
    raw.extend_from_slice(b"\r\n");
    // forcid: a live or gone connection's cid, an unknown one, a malformed one, or none.
    let who = x as usize % CONNS;
    let forcid: Option<Vec<u8>> = match sel % 7 {
        0 | 1 | 2 => Some(
            broker
                .cid(who)
                .map(str::to_owned)
                .or_else(|| cids[who].clone())
                .unwrap_or_else(|| "fz9".into())
                .into_bytes(),
        ),
        3 => cids[who].clone().map(String::into_bytes),
        4 => Some(b"zz0unknown".to_vec()),
        5 => Some(match x % 4 {
            0 => b"Bad!".to_vec(),
            1 => vec![b'a'; 33],
            2 => b"fz 1".to_vec(),
            _ => b"".to_vec(),
        }),
        _ => None,
    };
    let plain = matches!(cmd, "SUB" | "PUB" | "UNS") && sel % 2 == 0;
    if let Some(f) = forcid.filter(|_| !plain && !cmd.starts_with("REQ")) {
        raw.extend_from_slice(b"forcid: ");
        raw.extend_from_slice(&f);
        raw.extend_from_slice(b"\r\n");
    }
    if cmd.starts_with("INT") || cmd.starts_with("REQ") {
        if hdrs % 4 != 3 {
            raw.extend_from_slice(b"topic: ");
            raw.extend_from_slice(&topic);
            raw.extend_from_slice(b"\r\n");
        }
    }
    let mut limit = None;
    let mut why = None;
    if cmd.starts_with("REQ") {
        if hdrs & 4 != 0 {
            raw.extend_from_slice(b"ReqID: p1\r\n");
        } else if hdrs & 8 != 0 {
            raw.extend_from_slice(b"ReqID: p1234\r\n");
        }
        if hdrs >= 16 {
            let l = LIMITS[(x as usize + hdrs) % LIMITS.len()];
            limit = Some(l);
            raw.extend_from_slice(format!("limit: {l}\r\n").as_bytes());
        }
    }
    if cmd == "INT KICK" && hdrs & 4 != 0 {
        let r: Vec<u8> = match hdrs / 8 {
            0 => b"bye".to_vec(),
            1 => "\u{e9}".repeat(70).into_bytes(),
            2 => {
                let mut v = vec![b'a'; 119];
                v.extend_from_slice("\u{e9}".as_bytes());
                v
            }
            _ => vec![0xff; 50 + x as usize % 100],
        };
        raw.extend_from_slice(b"reason: ");
        raw.extend_from_slice(&r);
        raw.extend_from_slice(b"\r\n");
        why = Some(r);
    }
    raw.extend_from_slice(b"\r\nbody\r\n.\r\n");
    Cmd11 {
        raw,
        cmd,
        topic,
        limit,
        reason: why,
    }
}

fuzz_target!(|data: &[u8]| {
    let settings = Settings {
        max_subscriptions: MAX_SUBS,
        request_timeout: Duration::from_secs(5),
        max_pending_requests: MAX_PENDING,
        max_reqid_bytes: MAX_REQID,
    };
    let mut broker = Broker::new(settings, "fz");
    let t0 = Instant::now();
    let mut now = t0;
    let mut connected = [false; CONNS];
    let mut last_rid: u64 = 0;
    let mut out = Out::default();
    // The last cid each slot had (a gone cid stays well-formed but unknown).
    let mut cids: Vec<Option<String>> = vec![None; CONNS];
    // A connection may `UNS` its own `MSG:<cid>` (§3 allows UNS of anything); then, and
    // only then, it may lack it.
    let mut own_uns = [false; CONNS];
    for op in data.chunks(4) {
        let [kind, a, b, c] = [
            op[0],
            *op.get(1).unwrap_or(&0),
            *op.get(2).unwrap_or(&0),
            *op.get(3).unwrap_or(&0),
        ];
        let conn = a as usize % CONNS;
        out.clear();
        let mut pub_step = None;
        match kind % 5 {
            _ if kind >= 0x80 => {
                pub_step = v11_step(
                    &mut broker,
                    &mut connected,
                    &cids,
                    &mut own_uns,
                    &mut out,
                    now,
                    [kind, a, b, c],
                );
            }
            0 if !connected[conn] => {
                let role = [Role::Service, Role::Client, Role::Monitor][b as usize % 3];
                cids[conn] = Some(broker.connect(conn, role));
                own_uns[conn] = false;
                connected[conn] = true;
                broker.connected(conn, &mut out);
                for (to, p) in &out.sent {
                    assert!(*to != conn, "a connection told of its own SYS:CONNECT");
                    assert!(p.payload().starts_with(b"PUB SYS:CONNECT\r\n"));
                }
            }
            1 if connected[conn] => {
                // Not to the leaving connection, its own SYS:DISCONNECT included (fuzz
                // finding, fixed in e617ef2).
                broker.disconnect(conn, &mut out);
                connected[conn] = false;
                assert!(out.sent.iter().all(|(to, _)| *to != conn && connected[*to]));
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
                if cmd == "UNS" && target.strip_prefix("MSG:") == broker.cid(conn) {
                    own_uns[conn] = true;
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
                // A grant to this connection is a right as good as an enablement (§9.1).
                let sub_enabled = broker.router().is_enabled(target.as_bytes(), Enable::Sub)
                    || broker
                        .router()
                        .has_grant(conn, target.as_bytes(), Enable::Sub);
                let pub_enabled = broker.router().is_enabled(target.as_bytes(), Enable::Pub)
                    || broker
                        .router()
                        .has_grant(conn, target.as_bytes(), Enable::Pub);
                let asked_before = broker.router().asked_count(conn);
                let pending_before = broker.router().pending_count();
                let mut dec = Decoder::new(Limits::default());
                dec.feed(raw.as_bytes());
                if let Ok(Some(Decoded::Message(m))) = dec.next() {
                    broker.apply(conn, &m, now, &mut out);
                }
                let private = target.starts_with("MSG:");
                let errors_to_sender = out
                    .sent
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
                        out.sent.iter().any(|(to, p)| {
                            *to == conn && p.payload().windows(r.len()).any(|w| w == r.as_bytes())
                        })
                    };
                    let line = format!("\r\nReqID: {reqid}\r\n");
                    let echoed = out.sent.iter().any(|(_, p)| {
                        p.payload()
                            .windows(line.len())
                            .any(|w| w == line.as_bytes())
                    });
                    if reqid.len() > MAX_REQID {
                        assert_eq!(out.sent.len(), 1, "an over-long ReqID was forwarded");
                        assert!(error_reason(reason::REQID_TOO_LONG));
                        assert!(!echoed, "an over-long ReqID was echoed");
                        assert_eq!(broker.router().pending_count(), pending_before);
                    } else if asked_before >= MAX_PENDING {
                        assert_eq!(out.sent.len(), 1, "a REQ over the cap was forwarded");
                        assert!(error_reason(reason::TOO_MANY_REQUESTS));
                        assert!(echoed, "the cap error must carry the ReqID");
                        assert_eq!(broker.router().asked_count(conn), asked_before);
                        assert_eq!(broker.router().pending_count(), pending_before);
                    }
                }
                if is_client && cmd == "PUB" && (private || !pub_enabled) {
                    assert_eq!(out.sent.len(), 1, "refused PUB was delivered");
                    assert_eq!(errors_to_sender, 1);
                }
                for (_, p) in &out.sent {
                    // Nobody can forge cid: every relayed message carries exactly one.
                    let text = p.payload();
                    let forged = text
                        .windows(12)
                        .any(|w| w.eq_ignore_ascii_case(b"cid: forged\r"));
                    assert!(!forged, "forged cid relayed");
                }
                if cmd == "PUB" {
                    pub_step = Some(target.clone());
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
        check_deliveries(&broker, &out, pub_step.as_deref());
        carry_out_kicks(&mut broker, &mut connected, &mut out);
        if let Err(e) = broker.router().check_invariants() {
            panic!("invariant broken: {e}");
        }
        for (to, _) in &out.sent {
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
            if let Some(cid) = broker.cid(c).filter(|_| !own_uns[c]) {
                // Nothing a connection sends ends another's (or its own) private channel.
                let private = format!("MSG:{cid}");
                assert!(
                    broker.router().is_subscribed(c, private.as_bytes()),
                    "{private} lost"
                );
            }
            assert!(
                broker.router().grant_count(c) <= MAX_SUBS,
                "conn {c}: too many grants"
            );
            assert!(
                broker.router().subscription_count(c) <= MAX_SUBS + 1,
                "conn {c}: too many subscriptions"
            );
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

/// Every `PUB t` (not an error) goes to a subscriber of t, or (not for an event) to a
/// monitor; `SYS:SUB/UNS` events never name a private channel or an event topic. Only
/// on steps where no subscription of the recipient can have ended (`pub_step`: a PUB of
/// that target, where nothing unsubscribes), or for events (their subscribers do not
/// change while they are sent) and private messages.
fn check_deliveries(broker: &Broker, out: &Out, pub_step: Option<&str>) {
    for (to, p) in &out.sent {
        let payload = p.payload();
        let Some(line_end) = payload.windows(2).position(|w| w == b"\r\n") else {
            continue;
        };
        let Some(t) = payload[..line_end].strip_prefix(b"PUB ") else {
            continue;
        };
        if t == b"ERROR" {
            continue;
        }
        let subscribed = broker.router().is_subscribed(*to, t);
        if t.starts_with(b"SYS:") {
            assert!(
                subscribed,
                "event {:?} to {to}, not subscribed",
                String::from_utf8_lossy(t)
            );
            assert!(
                broker.role(*to).is_some_and(Role::is_service),
                "event to a client"
            );
            if t == b"SYS:SUB" || t == b"SYS:UNS" {
                let topic = header(payload, "topic").expect("SUB/UNS event names a topic");
                assert!(
                    !topic.starts_with(b"MSG:") && !topic.starts_with(b"SYS:"),
                    "event about {:?}",
                    String::from_utf8_lossy(topic)
                );
            }
        } else if pub_step.is_some_and(|s| s.as_bytes() == t) {
            let monitor = broker.role(*to) == Some(Role::Monitor);
            assert!(
                subscribed || monitor,
                "PUB {:?} to {to}, neither subscribed nor a monitor",
                String::from_utf8_lossy(t)
            );
        }
    }
}

/// Kicks go to live connections; the reactor closes them (code 4000) and then forgets
/// them with the reason `kicked`.
fn carry_out_kicks(broker: &mut Broker, connected: &mut [bool], out: &mut Out) {
    let kicks = std::mem::take(&mut out.kicks);
    for (to, why) in kicks {
        // Within a close frame (123 bytes), a reason that was not UTF-8 too (each bad
        // byte becomes a 3-byte U+FFFD before the cut: fuzz finding, fixed in e617ef2).
        assert!(
            why.len() <= MAX_KICK_REASON,
            "kick reason of {} bytes",
            why.len()
        );
        if !connected[to] {
            // Kicked twice in one step: the first one closed it.
            continue;
        }
        broker.disconnect_because(to, "kicked", out);
        connected[to] = false;
        assert!(out.kicks.is_empty(), "a disconnect kicked someone");
    }
}

/// One version 1.1 op (op byte 0x80 and above).
fn v11_step(
    broker: &mut Broker,
    connected: &mut [bool],
    cids: &[Option<String>],
    own_uns: &mut [bool],
    out: &mut Out,
    now: Instant,
    [kind, a, b, c]: [u8; 4],
) -> Option<String> {
    let mut published = None;
    let conn = a as usize % CONNS;
    let x = (kind & 0x7f) >> 2;
    match kind & 3 {
        // A close for a reason: its SYS:DISCONNECT names it.
        0 if connected[conn] => {
            let why = CLOSE_REASONS[b as usize % CLOSE_REASONS.len()];
            broker.disconnect_because(conn, why, out);
            connected[conn] = false;
            for (to, p) in &out.sent {
                assert!(
                    *to != conn && connected[*to],
                    "packet for {to}, gone (leaving: {conn}): {:?}",
                    String::from_utf8_lossy(p.payload())
                );
                if p.payload().starts_with(b"PUB SYS:DISCONNECT\r\n") {
                    assert_eq!(header(p.payload(), "reason"), Some(why.as_bytes()));
                }
            }
        }
        // SUB/UNS/PUB/REQ of a SYS: target.
        1 if connected[conn] => {
            let cmd = SYS_CMDS[b as usize % SYS_CMDS.len()];
            let t = SYS_TARGETS[c as usize % SYS_TARGETS.len()];
            let mut raw = format!("{cmd} {t}\r\n");
            if c & 0x80 != 0 {
                raw.push_str("ReqID: s1\r\ntopic: a\r\n");
            }
            raw.push_str("\r\n\r\n.\r\n");
            // Monitors are services (§1).
            let service = broker.role(conn).is_some_and(Role::is_service);
            let before = broker.router().is_subscribed(conn, t.as_bytes());
            assert!(apply(broker, conn, raw.as_bytes(), now, out));
            let after = broker.router().is_subscribed(conn, t.as_bytes());
            let event_topic = t != "SYS:PRESENCE" && t != "SYS:X";
            if cmd == "SUB" && after && !before {
                assert!(service && event_topic, "SUB {t} allowed");
            }
            let refused_sub = cmd == "SUB" && !before && !(service && event_topic);
            let refused_req = cmd == "REQ" && (t != "SYS:PRESENCE" || !service);
            if cmd == "PUB" || refused_req || refused_sub {
                let errors = out
                    .sent
                    .iter()
                    .filter(|(to, p)| *to == conn && p.payload().starts_with(b"PUB ERROR\r\n"))
                    .count();
                assert_eq!(errors, 1, "{cmd} {t} not refused once");
            }
            // No event about a SYS: subscription.
            assert!(out
                .sent
                .iter()
                .all(|(_, p)| !p.payload().starts_with(b"PUB SYS:SUB\r\n")
                    && !p.payload().starts_with(b"PUB SYS:UNS\r\n")));
        }
        // A 1.1 command.
        2 | 3 if connected[conn] => {
            let m = cmd11(broker, cids, x, b, c);
            let own = broker.cid(conn).map(|c| format!("MSG:{c}").into_bytes());
            if m.cmd == "UNS" && own.as_ref() == Some(&m.topic) {
                own_uns[conn] = true;
            }
            if KNOWN_DSUB_ENDS_PRIVATE && m.cmd == "DSUB" && m.topic.starts_with(b"MSG:") {
                if let Some(c) =
                    (0..CONNS).find(|&c| broker.cid(c).map(str::as_bytes) == m.topic.get(4..))
                {
                    own_uns[c] = true;
                }
            }
            let service = broker.role(conn).is_some_and(Role::is_service);
            let grants_before: Vec<usize> =
                (0..CONNS).map(|i| broker.router().grant_count(i)).collect();
            let well_formed = apply(broker, conn, &m.raw, now, out);
            let plain = matches!(m.cmd, "SUB" | "PUB" | "UNS");
            if m.cmd == "PUB" {
                published = Some(String::from_utf8_lossy(&m.topic).into_owned());
            }
            if !service && !plain && well_formed {
                assert_eq!(
                    out.sent.len(),
                    1,
                    "{} from a non-service not refused once",
                    m.cmd
                );
                let (to, p) = &out.sent[0];
                assert_eq!(*to, conn);
                assert_eq!(
                    header(p.payload(), "reason"),
                    Some(reason::NOT_PERMITTED.as_bytes())
                );
                assert!(out.kicks.is_empty());
                let grants: Vec<usize> =
                    (0..CONNS).map(|i| broker.router().grant_count(i)).collect();
                assert_eq!(grants, grants_before, "a refused command changed grants");
            }
            for (to, _) in &out.kicks {
                assert!(service && m.cmd == "INT KICK", "a kick from {}", m.cmd);
                assert!(connected[*to], "kick for a connection that is gone");
            }
            if let (Some((_, why)), None) = (out.kicks.first(), &m.reason) {
                assert_eq!(why, "kicked");
            }
            if let (Some((_, why)), Some(r)) = (out.kicks.first(), &m.reason) {
                if let Ok(r) = std::str::from_utf8(r) {
                    assert!(r.starts_with(why.as_str()), "kick reason not a prefix");
                }
            }
            for (to, p) in &out.sent {
                if !p.payload().starts_with(b"RES SYS:PRESENCE\r\n") {
                    continue;
                }
                assert_eq!(*to, conn, "presence answer to another connection");
                assert!(service && m.cmd.starts_with("REQ"));
                let count: usize = std::str::from_utf8(header(p.payload(), "count").unwrap())
                    .unwrap()
                    .parse()
                    .unwrap();
                assert_eq!(
                    count,
                    broker.router().subscribers(&m.topic).len(),
                    "presence count"
                );
                let text = body(p.payload());
                let lines: Vec<&[u8]> = if text.is_empty() {
                    Vec::new()
                } else {
                    text.split(|&b| b == b'\n').collect()
                };
                let limit = match m.limit {
                    None => 1000,
                    Some(l) => l.parse::<u64>().map_or(usize::MAX, |n| n as usize),
                }
                .min(MAX_PRESENCE_LIMIT);
                assert!(lines.len() <= limit, "{} lines, limit {limit}", lines.len());
                assert!(lines.len() <= count);
                let cid = |l: &[u8]| {
                    l.split(|&b| b == b' ' || b == b'\r')
                        .next()
                        .unwrap()
                        .to_vec()
                };
                for w in lines.windows(2) {
                    assert!(cid(w[0]) < cid(w[1]), "presence lines not in cid order");
                }
                let truncated = header(p.payload(), "truncated").is_some();
                assert_eq!(truncated, count > lines.len(), "truncated flag");
            }
        }
        _ => {}
    }
    published
}

/// Decode `raw` and apply it as a message from `conn` (false: it was malformed).
fn apply(broker: &mut Broker, conn: ConnId, raw: &[u8], now: Instant, out: &mut Out) -> bool {
    let mut dec = Decoder::new(Limits::default());
    dec.feed(raw);
    match dec.next() {
        Ok(Some(Decoded::Message(m))) => {
            broker.apply(conn, &m, now, out);
            true
        }
        Ok(Some(Decoded::Malformed(m))) => {
            broker.malformed(conn, &m, out);
            false
        }
        _ => false,
    }
}
