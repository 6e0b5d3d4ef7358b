//! Helpers for the protocol 1.1 tests (`tests/rooms.rs`, `tests/cluster_rooms.rs`,
//! `tests/presence_scale.rs`): the real binary on 127.0.0.1:0, exact checks of errors,
//! events and presence answers (PROTOCOL.md §7, §9.1-§9.4; notes-21).
//!
//! No sleeps where a message can be awaited: "nothing arrived" is shown with [`drain`], a
//! round trip (an unknown command on the private channel, which always gets an error
//! back) after which everything queued earlier for that connection has arrived.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::proc::{Proc, SERVER_ARGS};
use super::{metrics, Msg, Peer, MONITOR_KEY, WAIT};

/// The four event topics of §9.4.
pub const EVENTS: [&str; 4] = ["SYS:CONNECT", "SYS:DISCONNECT", "SYS:SUB", "SYS:UNS"];

/// The real binary on 127.0.0.1:0 (WebSocket) with the harness' service, client and
/// monitor keys, plus `extra` arguments.
pub struct Server {
    pub proc: Proc,
    pub addr: SocketAddr,
}

pub fn server_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = SERVER_ARGS.to_vec();
    v.extend_from_slice(&["--monitor-key", MONITOR_KEY]);
    v.extend_from_slice(extra);
    v
}

impl Server {
    pub fn start(extra: &[&str]) -> Server {
        Server::from_proc(Proc::start(&server_args(extra), &[]))
    }
    pub fn from_proc(proc: Proc) -> Server {
        let addr = proc.addr();
        Server { proc, addr }
    }
    pub fn pid(&self) -> i32 {
        self.proc.child.id() as i32
    }
    /// Send a signal to this server's process, by its PID.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the child this test started, by its PID.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.pid());
    }
}

/// Everything queued for `p` before this call: sends an unknown command on its private
/// channel and returns what arrives before the error for it.
pub fn drain(p: &mut Peer) -> Vec<Msg> {
    let target = format!("MSG:{}", p.cid);
    p.send("DRAIN", &target, &[], "");
    let mut got = Vec::new();
    loop {
        let m = p.recv();
        if m.cmd == "PUB"
            && m.target == "ERROR"
            && m.header("cmd") == Some("DRAIN")
            && m.header("target") == Some(target.as_str())
        {
            return got;
        }
        got.push(m);
    }
}

/// Nothing is queued for `p`.
pub fn quiet(p: &mut Peer, what: &str) {
    let got = drain(p);
    assert!(got.is_empty(), "{what}: {} got unexpected {got:?}", p.cid);
}

/// `m` is the §7 error for `CMD TARGET` with `why`.
pub fn assert_error(m: &Msg, cmd: &str, target: &str, why: &str) {
    assert_eq!(
        (m.cmd.as_str(), m.target.as_str()),
        ("PUB", "ERROR"),
        "expected error {why:?} for {cmd} {target}, got {m:?}"
    );
    assert_eq!(m.headers_named("cmd"), vec![("cmd", cmd)], "{m:?}");
    assert_eq!(m.headers_named("target"), vec![("target", target)], "{m:?}");
    assert_eq!(m.headers_named("reason"), vec![("reason", why)], "{m:?}");
    assert_eq!(m.body, format!("{why}: {cmd} {target}"), "{m:?}");
}

/// The next message for `p` is the error for `CMD TARGET` with `why`.
pub fn expect_error(p: &mut Peer, cmd: &str, target: &str, why: &str) -> Msg {
    let m = p.recv();
    assert_error(&m, cmd, target, why);
    m
}

/// The next message for `p` is `CMD TARGET`.
pub fn expect(p: &mut Peer, cmd: &str, target: &str) -> Msg {
    let m = p.recv();
    assert_eq!((m.cmd.as_str(), m.target.as_str()), (cmd, target), "{m:?}");
    m
}

/// The next message for `p` is `PUB topic` with `body`, sent by `from`.
pub fn expect_pub(p: &mut Peer, topic: &str, body: &str, from: &str) {
    let m = expect(p, "PUB", topic);
    assert_eq!(m.body, body, "{m:?}");
    assert_eq!(m.header("cid"), Some(from), "{m:?}");
}

/// `cmd t` is accepted for `p`: no error comes back (and nothing else is queued).
pub fn accepted(p: &mut Peer, cmd: &str, t: &str) {
    p.send(cmd, t, &[], "");
    quiet(p, &format!("{cmd} {t} accepted"));
}

/// Leave with a close handshake: returns once the server answered the close.
pub fn leave(mut p: Peer) {
    let _ = p.ws.close(None);
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match p.ws.read() {
            Ok(_) => continue,
            Err(_) => return,
        }
    }
    panic!("the server did not answer the close within {WAIT:?}");
}

/// Service `svc` leaves; returns once the server has forgotten it (§6.5: a request it
/// holds is failed with `responder disconnected` to `watcher`).
pub fn leave_confirmed(mut svc: Peer, watcher: &mut Peer) {
    let probe = format!("probe-{}", svc.cid);
    svc.send("EREQ", &probe, &[], "");
    svc.sync();
    watcher.send("REQ", &probe, &[("ReqID", "probe")], "");
    expect(&mut svc, "REQ", &probe);
    leave(svc);
    let m = watcher.recv();
    assert_eq!(m.header("reason"), Some("responder disconnected"), "{m:?}");
    assert_eq!(m.header("ReqID"), Some("probe"), "{m:?}");
}

/// `svc` sends `cmd t` with `forcid: cid` (a grant, or its withdrawal).
pub fn for_cid(svc: &mut Peer, cmd: &str, t: &str, cid: &str) {
    svc.send(cmd, t, &[("forcid", cid)], "");
}

/// `svc` sets the uid of `cid` (version 1 `INT UID`).
pub fn set_uid(svc: &mut Peer, cid: &str, uid: &str) {
    svc.send("INT", "UID", &[("forcid", cid), ("setuid", uid)], "");
}

/// `svc` sends `INT SUB` / `INT UNS` (`what`) for `cid` and `topic`.
pub fn int_sub(svc: &mut Peer, what: &str, cid: &str, topic: &str) {
    svc.send("INT", what, &[("forcid", cid), ("topic", topic)], "");
}

/// A service subscribed to the four event topics, with everything its own subscribing
/// caused already read.
pub fn watcher(addr: SocketAddr) -> Peer {
    let mut w = Peer::service(addr);
    for t in EVENTS {
        w.send("SUB", t, &[], "");
    }
    w.sync();
    drain(&mut w);
    w
}

/// `m` is the event `PUB topic` with exactly `headers`, in this order, and an empty body.
pub fn assert_event(m: &Msg, topic: &str, headers: &[(&str, &str)]) {
    assert_eq!((m.cmd.as_str(), m.target.as_str()), ("PUB", topic), "{m:?}");
    let got: Vec<(&str, &str)> = m
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        got, headers,
        "headers of {topic} (§9.4: cid, uid, role, topic|reason)"
    );
    assert_eq!(m.body, "", "{m:?}");
}

/// The next message for `p` is the event `topic` with exactly `headers`.
pub fn expect_event(p: &mut Peer, topic: &str, headers: &[(&str, &str)]) {
    let m = p.recv();
    assert_event(&m, topic, headers);
}

/// Send `REQ SYS:PRESENCE` for `topic` with `ReqID: reqid` and `extra` headers; returns
/// the next message (the answer).
pub fn presence(svc: &mut Peer, topic: &str, reqid: &str, extra: &[(&str, &str)]) -> Msg {
    let mut h = vec![("ReqID", reqid), ("topic", topic)];
    h.extend_from_slice(extra);
    svc.send("REQ", "SYS:PRESENCE", &h, "");
    svc.recv()
}

/// The lines of a presence answer's body.
pub fn lines(m: &Msg) -> Vec<String> {
    if m.body.is_empty() {
        return Vec::new();
    }
    assert!(
        !m.body.contains('\n') || m.body.contains("\r\n"),
        "lines joined by CRLF: {:?}",
        m.body
    );
    m.body.split("\r\n").map(str::to_owned).collect()
}

/// The expected presence lines of `(cid, uid)` pairs: sorted by cid (byte order), `<cid>
/// <uid>` or `<cid>` alone when the uid is empty.
pub fn expected_lines(members: &[(&str, &str)]) -> Vec<String> {
    let mut v: Vec<(&str, &str)> = members.to_vec();
    v.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    v.iter()
        .map(|(c, u)| {
            if u.is_empty() {
                c.to_string()
            } else {
                format!("{c} {u}")
            }
        })
        .collect()
}

/// `m` is `RES SYS:PRESENCE` with exactly these headers (in this order) and lines.
pub fn assert_presence(m: &Msg, headers: &[(&str, &str)], want: &[String]) {
    assert_eq!(
        (m.cmd.as_str(), m.target.as_str()),
        ("RES", "SYS:PRESENCE"),
        "{m:?}"
    );
    let got: Vec<(&str, &str)> = m
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        got, headers,
        "presence headers (notes-21: ReqID, count, users, then truncated, partial; §9: no cid/uid of a sender)"
    );
    assert_eq!(lines(m), want, "presence lines");
}

/// One closed-connection counter of /metrics (0 when not listed).
pub fn closed(addr: SocketAddr, reason: &str) -> f64 {
    metrics(addr)
        .get(&format!(
            "middleman_connections_closed_total{{reason=\"{reason}\"}}"
        ))
        .copied()
        .unwrap_or(0.0)
}

/// Read messages for `p` for up to `d`, returning them (for "eventually" checks in a
/// cluster); the read timeout is restored to [`WAIT`].
pub fn read_for(p: &mut Peer, d: Duration) -> Vec<Msg> {
    let deadline = Instant::now() + d;
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        p.ws.get_mut()
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        // One frame at a time (pings included), so the deadline is checked between them.
        match p.ws.read() {
            Ok(tungstenite::Message::Text(t)) => got.push(super::parse_one(t.as_bytes())),
            Ok(tungstenite::Message::Binary(b)) => got.push(super::parse_one(&b)),
            Ok(tungstenite::Message::Close(f)) => panic!("{} closed: {f:?}", p.cid),
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break
            }
            Err(e) => panic!("{}: {e}", p.cid),
        }
    }
    p.ws.get_mut().set_read_timeout(Some(WAIT)).unwrap();
    got
}
