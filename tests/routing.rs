//! Routing end to end over real sockets (PROTOCOL.md §3-§7): the important paths of
//! `tests/broker_unit.rs`, through the reactor, WebSocket framing and the harness.
//!
//! No sleeps: "nothing arrived" is shown with [`drain`], a round trip (an unknown command
//! that always gets an error back) after which everything queued earlier has arrived.
//! To know another connection's message was processed, that connection does a round trip
//! first (`sync`, or waiting for its own reply).

mod common;
use common::*;

use std::time::{Duration, Instant};

use middleman::broker::reason;
use tungstenite::Message;

/// Everything queued for `p` before this call: sends an unknown command on its private
/// channel and returns what arrives before the error for it.
fn drain(p: &mut Peer) -> Vec<Msg> {
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
fn quiet(p: &mut Peer, what: &str) {
    let got = drain(p);
    assert!(got.is_empty(), "{what}: {} got unexpected {got:?}", p.cid);
}

/// `m` is the §7 error for `CMD TARGET` with `why`.
fn assert_error(m: &Msg, cmd: &str, target: &str, why: &str) {
    assert_eq!(
        (m.cmd.as_str(), m.target.as_str()),
        ("PUB", "ERROR"),
        "{m:?}"
    );
    assert_eq!(m.headers_named("cmd"), vec![("cmd", cmd)], "{m:?}");
    assert_eq!(m.headers_named("target"), vec![("target", target)], "{m:?}");
    assert_eq!(m.headers_named("reason"), vec![("reason", why)], "{m:?}");
    assert_eq!(m.body, format!("{why}: {cmd} {target}"), "{m:?}");
}

/// The next message for `p` is the error for `CMD TARGET` with `why`.
fn expect_error(p: &mut Peer, cmd: &str, target: &str, why: &str) -> Msg {
    let m = p.recv();
    assert_error(&m, cmd, target, why);
    m
}

/// A client REQ on a target nobody req-enabled: refused by §4 and also without a
/// responder (§6.2). PROTOCOL.md does not say which reason wins; both are accepted.
fn expect_client_req_refused(p: &mut Peer, target: &str) -> Msg {
    let m = p.recv();
    let why = m.header("reason").unwrap_or("").to_owned();
    assert!(
        why == reason::NOT_PERMITTED || why == reason::NO_RESPONDER,
        "unexpected {m:?}"
    );
    assert_error(&m, "REQ", target, &why);
    m
}

/// The next message for `p` is `CMD TARGET`.
fn expect(p: &mut Peer, cmd: &str, target: &str) -> Msg {
    let m = p.recv();
    assert_eq!((m.cmd.as_str(), m.target.as_str()), (cmd, target), "{m:?}");
    m
}

/// Leave with a close handshake: returns once the server answered the close.
fn leave(mut p: Peer) {
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
fn leave_confirmed(mut svc: Peer, watcher: &mut Peer) {
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

// ---------------------------------------------------------------------------------------
// §4, client rows
// ---------------------------------------------------------------------------------------

#[test]
fn client_sub_allowed_when_enabled_refused_otherwise() {
    let srv = TestServer::start();
    let mut svc = Peer::service(srv.addr);
    let mut cli = Peer::client(srv.addr);
    svc.send("ESUB", "news", &[], "");
    svc.send("EPUB", "closed", &[], "");
    svc.sync();
    // Allowed.
    cli.send("SUB", "news", &[], "");
    cli.sync();
    svc.send("PUB", "news", &[], "n1");
    let m = expect(&mut cli, "PUB", "news");
    assert_eq!(m.body, "n1");
    // Refused: not enabled at all, or only pub-enabled.
    for t in ["other", "closed"] {
        cli.send("SUB", t, &[], "");
        expect_error(&mut cli, "SUB", t, reason::NOT_PERMITTED);
        svc.send("PUB", t, &[], "must not arrive");
        svc.sync();
        quiet(&mut cli, "refused SUB must not subscribe");
    }
}

#[test]
fn client_uns_always_allowed_noop_when_not_subscribed() {
    let srv = TestServer::start();
    let mut svc = Peer::service(srv.addr);
    let mut cli = Peer::client(srv.addr);
    cli.send("UNS", "never", &[], "");
    quiet(&mut cli, "UNS of a topic never subscribed");
    svc.send("ESUB", "t", &[], "");
    svc.sync();
    cli.send("SUB", "t", &[], "");
    cli.send("SUB", "t", &[], "");
    cli.sync();
    svc.send("PUB", "t", &[], "once");
    assert_eq!(expect(&mut cli, "PUB", "t").body, "once");
    quiet(&mut cli, "idempotent SUB delivers once");
    cli.send("UNS", "t", &[], "");
    cli.sync();
    svc.send("PUB", "t", &[], "after UNS");
    svc.sync();
    quiet(&mut cli, "after UNS");
}

#[test]
fn client_pub_allowed_when_enabled_refused_otherwise() {
    let srv = TestServer::start();
    let mut svc = Peer::service(srv.addr);
    let mut cli = Peer::client(srv.addr);
    svc.send("EPUB", "up", &[], "");
    svc.send("ESUB", "subonly", &[], "");
    svc.send("SUB", "up", &[], "");
    svc.send("SUB", "closed", &[], "");
    svc.send("SUB", "subonly", &[], "");
    svc.sync();
    cli.send("PUB", "up", &[("X-A", "1")], "hello");
    let m = expect(&mut svc, "PUB", "up");
    assert_eq!(m.body, "hello");
    assert_eq!(m.header("X-A"), Some("1"));
    assert_eq!(m.header("cid"), Some(cli.cid.as_str()));
    assert_eq!(m.header("uid"), Some(""));
    for t in ["closed", "subonly"] {
        cli.send("PUB", t, &[], "must not arrive");
        expect_error(&mut cli, "PUB", t, reason::NOT_PERMITTED);
        quiet(&mut svc, "refused PUB must not be delivered");
    }
}

#[test]
fn client_req_allowed_when_enabled_refused_otherwise() {
    let srv = TestServer::start();
    let mut svc = Peer::service(srv.addr);
    let mut cli = Peer::client(srv.addr);
    svc.send("EREQ", "calc", &[], "");
    svc.send("EPUB", "noreq", &[], "");
    svc.send("ESUB", "noreq", &[], "");
    svc.sync();
    // Full cycle (§6.3, §6.4).
    cli.send(
        "REQ",
        "calc",
        &[("reqID", "abc-1"), ("rid", "forged"), ("X-Q", "q")],
        "1+1",
    );
    let req = expect(&mut svc, "REQ", "calc");
    assert_eq!(req.body, "1+1");
    assert_eq!(req.headers_named("reqid"), vec![("reqID", "abc-1")]);
    let rids = req.headers_named("rid");
    assert_eq!(rids.len(), 1, "{req:?}");
    assert_eq!(rids[0].0, "rid");
    assert_ne!(rids[0].1, "forged");
    assert_eq!(req.header("cid"), Some(cli.cid.as_str()));
    let rid = rids[0].1.to_owned();
    svc.send(
        "RES",
        "calc",
        &[("X-R", "r"), ("rid", &rid), ("ReqID", "wrong")],
        "2\nexactly",
    );
    let res = expect(&mut cli, "RES", "calc");
    assert_eq!(res.body, "2\nexactly");
    assert!(res.headers_named("rid").is_empty(), "{res:?}");
    assert_eq!(res.headers_named("reqid"), vec![("reqID", "abc-1")]);
    assert_eq!(res.header("X-R"), Some("r"));
    assert_eq!(res.header("cid"), Some(svc.cid.as_str()));
    // Refused: not req-enabled (only pub/sub-enabled, or nothing).
    for t in ["noreq", "nothing"] {
        cli.send("REQ", t, &[("ReqID", "9")], "");
        let m = expect_client_req_refused(&mut cli, t);
        assert_eq!(m.header("ReqID"), Some("9"));
    }
    // Missing ReqID (§6.1).
    cli.send("REQ", "calc", &[], "");
    expect_error(&mut cli, "REQ", "calc", reason::MISSING_REQID);
    quiet(&mut svc, "refused REQs must not reach the responder");
}

#[test]
fn client_res_for_someone_elses_request_refused_unknown_rid_dropped() {
    let srv = TestServer::start();
    let mut svc = Peer::service(srv.addr);
    let mut requester = Peer::client(srv.addr);
    let mut cli = Peer::client(srv.addr);
    svc.send("EREQ", "q", &[], "");
    svc.sync();
    requester.send("REQ", "q", &[("ReqID", "r")], "");
    let req = expect(&mut svc, "REQ", "q");
    let rid = req.header("rid").unwrap().to_owned();
    cli.send("RES", "q", &[("rid", &rid)], "forged answer");
    expect_error(&mut cli, "RES", "q", reason::NOT_YOUR_REQUEST);
    quiet(&mut requester, "refused RES must not be delivered");
    cli.send("RES", "q", &[("rid", "987654321")], "");
    quiet(&mut cli, "RES with an unknown rid is dropped silently");
    // The request is still the responder's to answer.
    svc.send("RES", "q", &[("rid", &rid)], "real");
    assert_eq!(expect(&mut requester, "RES", "q").body, "real");
}

#[test]
fn client_enable_and_int_commands_refused_without_effect() {
    let srv = TestServer::start();
    let mut svc = Peer::service(srv.addr);
    let mut cli = Peer::client(srv.addr);
    let mut cli2 = Peer::client(srv.addr);
    for cmd in ["EPUB", "ESUB", "EREQ"] {
        cli.send(cmd, "t", &[], "");
        expect_error(&mut cli, cmd, "t", reason::NOT_PERMITTED);
    }
    let own = cli.cid.clone();
    cli.send("INT", "UID", &[("forcid", &own), ("setuid", "root")], "");
    expect_error(&mut cli, "INT", "UID", reason::NOT_PERMITTED);
    cli2.send("SUB", "t", &[], "");
    expect_error(&mut cli2, "SUB", "t", reason::NOT_PERMITTED);
    cli2.send("PUB", "t", &[], "");
    expect_error(&mut cli2, "PUB", "t", reason::NOT_PERMITTED);
    svc.send("REQ", "t", &[("ReqID", "1")], "");
    expect_error(&mut svc, "REQ", "t", "no responder");
    quiet(&mut cli, "a client is never made a responder");
    // The refused INT UID did not set a uid.
    svc.send("EPUB", "u", &[], "");
    svc.send("SUB", "u", &[], "");
    svc.sync();
    cli.send("PUB", "u", &[], "");
    assert_eq!(expect(&mut svc, "PUB", "u").header("uid"), Some(""));
}

#[test]
fn service_may_sub_pub_req_without_enablement() {
    let srv = TestServer::start();
    let mut s1 = Peer::service(srv.addr);
    let mut s2 = Peer::service(srv.addr);
    s1.send("SUB", "internal", &[], "");
    s1.sync();
    s2.send("PUB", "internal", &[], "x");
    assert_eq!(expect(&mut s1, "PUB", "internal").body, "x");
    // §6.2: no responder at all.
    s2.send("REQ", "nobody", &[("ReqID", "n1")], "");
    let m = expect_error(&mut s2, "REQ", "nobody", "no responder");
    assert_eq!(m.header("ReqID"), Some("n1"));
    s1.send("EREQ", "svcq", &[], "");
    s1.sync();
    s2.send("REQ", "svcq", &[("ReqID", "s")], "");
    expect(&mut s1, "REQ", "svcq");
}

#[test]
fn unknown_command_is_an_error_connection_stays() {
    let srv = TestServer::start();
    let mut svc = Peer::service(srv.addr);
    let mut cli = Peer::client(srv.addr);
    svc.send("SUB", "t", &[], "");
    svc.sync();
    cli.send("pub", "t", &[], "");
    expect_error(&mut cli, "pub", "t", reason::UNKNOWN_COMMAND);
    quiet(&mut svc, "unknown command must not be processed");
    cli.sync();
}

// ---------------------------------------------------------------------------------------
// Enablement lifetime (§4)
// ---------------------------------------------------------------------------------------

#[test]
fn enablement_lapses_when_the_enabling_service_disconnects() {
    let srv = TestServer::start();
    let mut s1 = Peer::service(srv.addr);
    let mut s2 = Peer::service(srv.addr);
    let mut c1 = Peer::client(srv.addr);
    let mut c2 = Peer::client(srv.addr);
    for cmd in ["ESUB", "EPUB", "EREQ"] {
        s1.send(cmd, "t", &[], "");
    }
    s1.sync();
    c1.send("SUB", "t", &[], "");
    c1.sync();
    // A request left pending on s1 shows when the server has forgotten s1.
    c1.send("REQ", "t", &[("ReqID", "pending")], "");
    expect(&mut s1, "REQ", "t");
    leave(s1);
    let m = expect_error(&mut c1, "REQ", "t", "responder disconnected");
    assert_eq!(m.header("ReqID"), Some("pending"));
    // New client SUB/PUB/REQ refused.
    c2.send("SUB", "t", &[], "");
    expect_error(&mut c2, "SUB", "t", reason::NOT_PERMITTED);
    c1.send("PUB", "t", &[], "");
    expect_error(&mut c1, "PUB", "t", reason::NOT_PERMITTED);
    c1.send("REQ", "t", &[("ReqID", "2")], "");
    expect_client_req_refused(&mut c1, "t");
    // The existing subscription stays.
    s2.send("PUB", "t", &[], "still subscribed");
    assert_eq!(expect(&mut c1, "PUB", "t").body, "still subscribed");
    s2.sync();
    quiet(&mut c2, "refused SUB");
}

#[test]
fn enablement_by_two_services_lapses_when_both_left() {
    let srv = TestServer::start();
    let mut s1 = Peer::service(srv.addr);
    let mut s2 = Peer::service(srv.addr);
    let mut watcher = Peer::service(srv.addr);
    let mut cli = Peer::client(srv.addr);
    for s in [&mut s1, &mut s2] {
        s.send("ESUB", "t", &[], "");
        s.sync();
    }
    leave_confirmed(s1, &mut watcher);
    cli.send("SUB", "t", &[], "");
    quiet(&mut cli, "still sub-enabled by s2");
    cli.send("UNS", "t", &[], "");
    leave_confirmed(s2, &mut watcher);
    cli.send("SUB", "t", &[], "");
    expect_error(&mut cli, "SUB", "t", reason::NOT_PERMITTED);
}

// ---------------------------------------------------------------------------------------
// §3 forgery, INT UID
// ---------------------------------------------------------------------------------------

#[test]
fn cid_and_uid_cannot_be_forged_int_uid_sets_uid() {
    let srv = TestServer::start();
    let mut svc = Peer::service(srv.addr);
    let mut cli = Peer::client(srv.addr);
    svc.send("EPUB", "t", &[], "");
    svc.send("SUB", "t", &[], "");
    svc.sync();
    let forged = [
        ("CID", "forged"),
        ("Uid", "root"),
        ("X-Keep", "k"),
        ("cid", "x"),
        ("UID", "admin"),
    ];
    cli.send("PUB", "t", &forged, "");
    let m = expect(&mut svc, "PUB", "t");
    assert_eq!(m.headers_named("cid"), vec![("cid", cli.cid.as_str())]);
    assert_eq!(m.headers_named("uid"), vec![("uid", "")]);
    assert_eq!(m.header("X-Keep"), Some("k"));
    // A service sets the client's uid; the client's forged uid is still replaced.
    let cid = cli.cid.clone();
    svc.send("INT", "UID", &[("forcid", &cid), ("setuid", "alice")], "");
    svc.sync();
    cli.send("PUB", "t", &forged, "");
    let m = expect(&mut svc, "PUB", "t");
    assert_eq!(m.headers_named("cid"), vec![("cid", cli.cid.as_str())]);
    assert_eq!(m.headers_named("uid"), vec![("uid", "alice")]);
    // INT UID errors.
    svc.send(
        "INT",
        "UID",
        &[("forcid", "nosuchcid"), ("setuid", "x")],
        "",
    );
    expect_error(&mut svc, "INT", "UID", reason::UNKNOWN_CID);
    svc.send("INT", "UID", &[("forcid", &cid)], "");
    expect_error(&mut svc, "INT", "UID", reason::MISSING_HEADER);
}

#[test]
fn headers_relayed_in_order_and_spelling_body_byte_for_byte() {
    let srv = TestServer::start();
    let mut svc = Peer::service(srv.addr);
    let mut sub = Peer::service(srv.addr);
    sub.send("SUB", "t", &[], "");
    sub.sync();
    let hdrs = [
        ("X-Zeta", "1"),
        ("alpha", "a b"),
        ("X-Zeta", "3"),
        ("ReqID", "r"),
    ];
    svc.send("PUB", "t", &hdrs, "l1\r\nl2\n.dot");
    let m = expect(&mut sub, "PUB", "t");
    let own: Vec<(&str, &str)> = m
        .headers
        .iter()
        .filter(|(n, _)| n != "cid" && n != "uid")
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    assert_eq!(own, hdrs.to_vec());
    assert_eq!(m.body, "l1\r\nl2\n.dot");
}

// ---------------------------------------------------------------------------------------
// §5 private channels
// ---------------------------------------------------------------------------------------

#[test]
fn private_channels() {
    let srv = TestServer::start();
    let mut svc = Peer::service(srv.addr);
    let mut cli = Peer::client(srv.addr);
    let mut cli2 = Peer::client(srv.addr);
    // From the moment of connection.
    let to_cli = format!("MSG:{}", cli.cid);
    svc.send("PUB", &to_cli, &[("X", "y")], "for you");
    let m = expect(&mut cli, "PUB", &to_cli);
    assert_eq!(m.body, "for you");
    assert_eq!(m.header("cid"), Some(svc.cid.as_str()));
    quiet(&mut cli2, "private message to someone else");
    // Clients may not publish to, nor subscribe to, any MSG: target.
    let to_svc = format!("MSG:{}", svc.cid);
    cli.send("PUB", &to_svc, &[], "x");
    expect_error(&mut cli, "PUB", &to_svc, reason::NOT_PERMITTED);
    quiet(&mut svc, "refused private PUB");
    let to_cli2 = format!("MSG:{}", cli2.cid);
    cli.send("SUB", &to_cli2, &[], "");
    expect_error(&mut cli, "SUB", &to_cli2, reason::NOT_PERMITTED);
    svc.send("PUB", &to_cli2, &[], "secret");
    assert_eq!(expect(&mut cli2, "PUB", &to_cli2).body, "secret");
    svc.sync();
    quiet(&mut cli, "refused private SUB");
    // Unknown cid: dropped silently.
    svc.send("PUB", "MSG:nosuchcid", &[], "");
    quiet(&mut svc, "PUB to an unknown cid");
    let gone = format!("MSG:{}", cli2.cid);
    leave(cli2);
    svc.send("PUB", &gone, &[], "");
    quiet(&mut svc, "PUB to a departed cid");
}

// ---------------------------------------------------------------------------------------
// §6 requests
// ---------------------------------------------------------------------------------------

#[test]
fn request_timed_out_then_late_res_dropped() {
    let srv = TestServer::with(|cfg| cfg.request_timeout = Duration::from_millis(300));
    let mut svc = Peer::service(srv.addr);
    let mut cli = Peer::client(srv.addr);
    svc.send("EREQ", "slow", &[], "");
    svc.sync();
    let sent = Instant::now();
    cli.send("REQ", "slow", &[("ReqId", "t-1")], "");
    let req = expect(&mut svc, "REQ", "slow");
    let m = expect_error(&mut cli, "REQ", "slow", "request timed out");
    let waited = sent.elapsed();
    assert_eq!(m.header("ReqID"), Some("t-1"));
    assert!(
        waited >= Duration::from_millis(290),
        "timed out after {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(3),
        "timed out after {waited:?}"
    );
    // The late answer goes nowhere and gets no error.
    let rid = req.header("rid").unwrap().to_owned();
    svc.send("RES", "slow", &[("rid", &rid)], "too late");
    quiet(&mut svc, "late RES");
    quiet(&mut cli, "late RES / second timeout");
}

#[test]
fn responder_disconnected_error_exactly_once() {
    let srv = TestServer::with(|cfg| cfg.request_timeout = Duration::from_millis(300));
    let mut svc = Peer::service(srv.addr);
    let mut cli = Peer::client(srv.addr);
    svc.send("EREQ", "q", &[], "");
    svc.sync();
    cli.send("REQ", "q", &[("ReqID", "d-1")], "");
    expect(&mut svc, "REQ", "q");
    leave(svc);
    let m = cli.recv();
    assert_eq!(m.header("reason"), Some("responder disconnected"), "{m:?}");
    assert_eq!(m.header("ReqID"), Some("d-1"), "{m:?}");
    // No timeout afterwards: wait past the deadline with a blocking read bounded by a
    // read timeout, then a round trip.
    cli.ws
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(600)))
        .unwrap();
    match cli.ws.read() {
        Ok(Message::Text(t)) => panic!("unexpected {t}"),
        Ok(Message::Binary(b)) => panic!("unexpected {b:?}"),
        _ => {}
    }
    cli.ws.get_mut().set_read_timeout(Some(WAIT)).unwrap();
    quiet(&mut cli, "exactly once");
    // §7: the error names the failed REQ.
    assert_error(&m, "REQ", "q", "responder disconnected");
}

#[test]
fn no_responder_at_once() {
    let srv = TestServer::start();
    let mut svc = Peer::service(srv.addr);
    let mut r = Peer::service(srv.addr);
    svc.send("REQ", "q", &[("ReqID", "1")], "");
    let m = expect_error(&mut svc, "REQ", "q", "no responder");
    assert_eq!(m.header("ReqID"), Some("1"));
    // After the only responder left, again none.
    r.send("EREQ", "q", &[], "");
    r.sync();
    let mut watcher = Peer::service(srv.addr);
    leave_confirmed(r, &mut watcher);
    svc.send("REQ", "q", &[("ReqID", "2")], "");
    let m = expect_error(&mut svc, "REQ", "q", "no responder");
    assert_eq!(m.header("ReqID"), Some("2"));
}

#[test]
fn res_by_the_wrong_connection_refused() {
    let srv = TestServer::start();
    let mut r1 = Peer::service(srv.addr);
    let mut r2 = Peer::service(srv.addr);
    let mut cli = Peer::client(srv.addr);
    r1.send("EREQ", "q", &[], "");
    r1.sync();
    cli.send("REQ", "q", &[("ReqID", "w")], "");
    let req = expect(&mut r1, "REQ", "q");
    let rid = req.header("rid").unwrap().to_owned();
    r2.send("RES", "q", &[("rid", &rid)], "not mine");
    expect_error(&mut r2, "RES", "q", reason::NOT_YOUR_REQUEST);
    quiet(&mut cli, "refused RES");
    r1.send("RES", "q", &[("rid", &rid)], "mine");
    let res = expect(&mut cli, "RES", "q");
    assert_eq!(res.body, "mine");
    assert_eq!(res.header("ReqID"), Some("w"));
    // Duplicate: dropped silently.
    r1.send("RES", "q", &[("rid", &rid)], "again");
    quiet(&mut r1, "duplicate RES");
    quiet(&mut cli, "duplicate RES");
}

#[test]
fn round_robin_across_two_responders() {
    let srv = TestServer::start();
    let mut rs = [Peer::service(srv.addr), Peer::service(srv.addr)];
    let mut cli = Peer::client(srv.addr);
    for r in rs.iter_mut() {
        r.send("EREQ", "q", &[], "");
        r.sync();
    }
    let mut picks = Vec::new();
    for i in 0..6 {
        let id = i.to_string();
        cli.send("REQ", "q", &[("ReqID", &id)], &id);
        cli.sync();
        let got: Vec<Vec<Msg>> = rs.iter_mut().map(drain).collect();
        let who: Vec<usize> = (0..2).filter(|&k| !got[k].is_empty()).collect();
        assert_eq!(who.len(), 1, "request {i} went to {got:?}");
        let k = who[0];
        assert_eq!(got[k].len(), 1, "{got:?}");
        let rid = got[k][0].header("rid").unwrap().to_owned();
        rs[k].send("RES", "q", &[("rid", &rid)], &id);
        let res = expect(&mut cli, "RES", "q");
        assert_eq!(res.header("ReqID"), Some(id.as_str()));
        picks.push(k);
    }
    for w in picks.windows(2) {
        assert_ne!(w[0], w[1], "not round-robin: {picks:?}");
    }
    // Fewest in flight: with a request left open on one responder, the other gets
    // the next ones.
    cli.send("REQ", "q", &[("ReqID", "open")], "");
    cli.sync();
    let got: Vec<Vec<Msg>> = rs.iter_mut().map(drain).collect();
    let busy = (0..2).find(|&k| !got[k].is_empty()).unwrap();
    for i in 0..3 {
        let id = format!("free{i}");
        cli.send("REQ", "q", &[("ReqID", &id)], "");
        let req = expect(&mut rs[1 - busy], "REQ", "q");
        let rid = req.header("rid").unwrap().to_owned();
        rs[1 - busy].send("RES", "q", &[("rid", &rid)], "");
        assert_eq!(
            expect(&mut cli, "RES", "q").header("ReqID"),
            Some(id.as_str())
        );
    }
    quiet(
        &mut rs[busy],
        "a busy responder was chosen over an idle one",
    );
}

// ---------------------------------------------------------------------------------------
// Monitors
// ---------------------------------------------------------------------------------------

#[test]
fn monitor_receives_copies_of_pub_req_res() {
    let srv = TestServer::start();
    let mut svc = Peer::service(srv.addr);
    let mut cli = Peer::client(srv.addr);
    let mut mon = Peer::monitor(srv.addr);
    svc.send("ESUB", "t", &[], "");
    svc.send("EREQ", "q", &[], "");
    svc.sync();
    cli.send("SUB", "t", &[], "");
    cli.sync();
    // PUB.
    svc.send("PUB", "t", &[("H", "1")], "news");
    let delivered = expect(&mut cli, "PUB", "t");
    assert_eq!(expect(&mut mon, "PUB", "t"), delivered);
    // REQ.
    cli.send("REQ", "q", &[("ReqID", "m")], "ask");
    let req = expect(&mut svc, "REQ", "q");
    let copy = expect(&mut mon, "REQ", "q");
    assert_eq!(copy, req);
    // The copy does not make the monitor the responder.
    let rid = copy.header("rid").unwrap().to_owned();
    mon.send("RES", "q", &[("rid", &rid)], "monitor answer");
    expect_error(&mut mon, "RES", "q", reason::NOT_YOUR_REQUEST);
    quiet(&mut cli, "the monitor's RES");
    // RES.
    svc.send("RES", "q", &[("rid", &rid)], "answer");
    let res = expect(&mut cli, "RES", "q");
    assert_eq!(res.body, "answer");
    assert_eq!(expect(&mut mon, "RES", "q"), res);
    quiet(&mut mon, "one copy each");
}

// ---------------------------------------------------------------------------------------
// Ordering (§4)
// ---------------------------------------------------------------------------------------

#[test]
fn sub_then_pub_in_one_websocket_message_reaches_the_sender() {
    let srv = TestServer::start();
    let mut svc = Peer::service(srv.addr);
    let mut cli = Peer::client(srv.addr);
    svc.send("ESUB", "t", &[], "");
    svc.send("EPUB", "t", &[], "");
    svc.sync();
    cli.send_raw("SUB t\r\n\r\n.\r\nPUB t\r\n\r\nto myself\r\n.\r\n");
    let m = expect(&mut cli, "PUB", "t");
    assert_eq!(m.body, "to myself");
    assert_eq!(m.header("cid"), Some(cli.cid.as_str()));
}

#[test]
fn one_thousand_messages_arrive_complete_and_in_order() {
    const N: usize = 1000;
    let srv = TestServer::start();
    let mut publisher = Peer::service(srv.addr);
    let mut subs: Vec<Peer> = (0..3).map(|_| Peer::client(srv.addr)).collect();
    publisher.send("ESUB", "stream", &[], "");
    publisher.sync();
    for s in subs.iter_mut() {
        s.send("SUB", "stream", &[], "");
        s.sync();
    }
    // Half one message per WebSocket message, half in batches of 10.
    let mut i = 0;
    while i < N / 2 {
        publisher.send(
            "PUB",
            "stream",
            &[("Seq", &i.to_string())],
            &format!("m{i}"),
        );
        i += 1;
    }
    while i < N {
        let mut batch = String::new();
        for _ in 0..10 {
            batch.push_str(&format!("PUB stream\r\nSeq: {i}\r\n\r\nm{i}\r\n.\r\n"));
            i += 1;
        }
        publisher.send_raw(&batch);
    }
    for s in subs.iter_mut() {
        for i in 0..N {
            let m = expect(s, "PUB", "stream");
            assert_eq!(m.header("Seq"), Some(i.to_string().as_str()), "{m:?}");
            assert_eq!(m.body, format!("m{i}"));
            assert_eq!(m.header("cid"), Some(publisher.cid.as_str()));
        }
        quiet(s, "nothing beyond the 1000");
    }
}
