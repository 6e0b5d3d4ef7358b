//! Protocol 1.1 on one node (PROTOCOL.md §9 preamble, §9.1-§9.4; the decisions of
//! notes-21): per-connection grants and their withdrawal, private rooms, server-side
//! subscriptions and kicks, presence, connection events, and every refusal. One test per
//! rule, against the real binary over real sockets on 127.0.0.1.
//!
//! No sleeps: "nothing arrived" is [`quiet`] (a round trip after which everything queued
//! earlier has arrived), and a service's [`Peer::sync`] shows its commands took effect.

mod common;

use common::cluster::until;
use common::v11::*;
use common::*;

/// A cid that is well-formed (`[0-9a-z]{1,32}`) but was never connected.
const GHOST: &str = "zz00000000000000";

/// A client REQ refused for want of a right. Version 1 never said which reason wins when
/// the target is neither enabled nor answered (tests/routing.rs accepts both); a REQ
/// right without a responder is the one case §9.1 makes observable (`no responder`).
fn expect_req_refused(p: &mut Peer, target: &str, reqid: &str) {
    let m = p.recv();
    let why = m.header("reason").unwrap_or("").to_owned();
    assert!(
        why == "not permitted" || why == "no responder",
        "expected a refusal, got {m:?}"
    );
    assert_error(&m, "REQ", target, &why);
    assert_eq!(m.header("ReqID"), Some(reqid), "{m:?}");
}

// ---------------------------------------------------------------------------------------
// §9.1 grants
// ---------------------------------------------------------------------------------------

/// §9.1: "`ESUB t` ... with a header `forcid: <cid>` enable t for that one connection only."
#[test]
fn esub_forcid_lets_only_that_connection_subscribe() {
    let s = Server::start(&[]);
    let mut svc = Peer::service(s.addr);
    let mut c1 = Peer::client(s.addr);
    let mut c2 = Peer::client(s.addr);
    for_cid(&mut svc, "ESUB", "room", &c1.cid);
    svc.sync();
    c2.send("SUB", "room", &[], "");
    expect_error(&mut c2, "SUB", "room", "not permitted");
    accepted(&mut c1, "SUB", "room");
    svc.send("PUB", "room", &[], "hello");
    expect_pub(&mut c1, "room", "hello", &svc.cid);
    quiet(&mut c2, "not subscribed");
    // Only the right to subscribe: not to publish.
    c1.send("PUB", "room", &[], "x");
    expect_error(&mut c1, "PUB", "room", "not permitted");
    quiet(&mut svc, "grants are answered by nothing");
}

/// §9.1: `EPUB t` with `forcid` lets that one connection publish to t.
#[test]
fn epub_forcid_lets_only_that_connection_publish() {
    let s = Server::start(&[]);
    let mut svc = Peer::service(s.addr);
    let mut c1 = Peer::client(s.addr);
    let mut c2 = Peer::client(s.addr);
    svc.send("SUB", "room", &[], "");
    for_cid(&mut svc, "EPUB", "room", &c1.cid);
    svc.sync();
    c1.send("PUB", "room", &[], "from c1");
    expect_pub(&mut svc, "room", "from c1", &c1.cid);
    c2.send("PUB", "room", &[], "from c2");
    expect_error(&mut c2, "PUB", "room", "not permitted");
    quiet(&mut svc, "the refused PUB is not delivered");
    // Only the right to publish: not to subscribe.
    c1.send("SUB", "room", &[], "");
    expect_error(&mut c1, "SUB", "room", "not permitted");
}

/// §9.1: "With `forcid`, `EREQ` only grants the right to request t; it does not make the
/// service a responder (a plain `EREQ t` still does)."
#[test]
fn ereq_forcid_grants_the_request_right_and_does_not_make_a_responder() {
    let s = Server::start(&[]);
    let mut svc = Peer::service(s.addr);
    let mut c1 = Peer::client(s.addr);
    let mut c2 = Peer::client(s.addr);
    for_cid(&mut svc, "EREQ", "ask", &c1.cid);
    svc.sync();
    // c1 may request: it passes the check and finds no responder (the granting service
    // is not one).
    c1.send("REQ", "ask", &[("ReqID", "r1")], "q");
    let m = expect_error(&mut c1, "REQ", "ask", "no responder");
    assert_eq!(m.header("ReqID"), Some("r1"));
    quiet(&mut svc, "a forcid EREQ does not make a responder");
    c2.send("REQ", "ask", &[("ReqID", "r2")], "q");
    expect_req_refused(&mut c2, "ask", "r2");
    // A plain EREQ still makes a responder: c1's request reaches it.
    let mut responder = Peer::service(s.addr);
    responder.send("EREQ", "ask", &[], "");
    responder.sync();
    c1.send("REQ", "ask", &[("ReqID", "r3")], "q3");
    let req = expect(&mut responder, "REQ", "ask");
    assert_eq!(req.header("cid"), Some(c1.cid.as_str()));
    quiet(&mut svc, "still not a responder");
}

// ---------------------------------------------------------------------------------------
// §9.1 withdrawals
// ---------------------------------------------------------------------------------------

/// §9.1: "`DSUB t` ... without `forcid`, its own enablement of t for all clients".
/// Another service's ESUB of t stays in force. Existing subscriptions stay: only a DSUB
/// *with* forcid unsubscribes ("Withdrawing the last right ... (by `DSUB` with `forcid`
/// ...) also unsubscribes it").
#[test]
fn dsub_without_forcid_withdraws_only_the_senders_global_esub() {
    let s = Server::start(&[]);
    let mut svc1 = Peer::service(s.addr);
    let mut svc2 = Peer::service(s.addr);
    let mut c1 = Peer::client(s.addr);
    let mut c2 = Peer::client(s.addr);
    svc1.send("ESUB", "news", &[], "");
    svc2.send("ESUB", "news", &[], "");
    svc1.sync();
    svc2.sync();
    accepted(&mut c1, "SUB", "news");
    svc1.send("DSUB", "news", &[], "");
    svc1.sync();
    // svc2's enablement holds.
    accepted(&mut c2, "SUB", "news");
    c2.send("UNS", "news", &[], "");
    svc2.send("DSUB", "news", &[], "");
    svc2.sync();
    c2.send("SUB", "news", &[], "");
    expect_error(&mut c2, "SUB", "news", "not permitted");
    // c1's subscription made under the withdrawn enablement stays.
    svc1.send("PUB", "news", &[], "still");
    expect_pub(&mut c1, "news", "still", &svc1.cid);
    quiet(&mut c2, "c2 is not subscribed");
}

/// §9.1: `DPUB t` without forcid withdraws the sender's global EPUB of t.
#[test]
fn dpub_without_forcid_withdraws_only_the_senders_global_epub() {
    let s = Server::start(&[]);
    let mut svc1 = Peer::service(s.addr);
    let mut svc2 = Peer::service(s.addr);
    let mut c1 = Peer::client(s.addr);
    svc1.send("SUB", "chat", &[], "");
    svc1.send("EPUB", "chat", &[], "");
    svc2.send("EPUB", "chat", &[], "");
    svc1.sync();
    svc2.sync();
    svc1.send("DPUB", "chat", &[], "");
    svc1.sync();
    c1.send("PUB", "chat", &[], "a");
    expect_pub(&mut svc1, "chat", "a", &c1.cid);
    svc2.send("DPUB", "chat", &[], "");
    svc2.sync();
    c1.send("PUB", "chat", &[], "b");
    expect_error(&mut c1, "PUB", "chat", "not permitted");
    quiet(&mut svc1, "the refused PUB is not delivered");
}

/// §9.1: "`DREQ` also ends its role as responder for t: no new requests reach it;
/// requests in flight may still be answered".
#[test]
fn dreq_without_forcid_ends_the_responder_role_and_in_flight_requests_are_answered() {
    let s = Server::start(&[]);
    let mut r1 = Peer::service(s.addr);
    let mut c1 = Peer::client(s.addr);
    let mut other = Peer::service(s.addr);
    r1.send("EREQ", "ask", &[], "");
    r1.sync();
    c1.send("REQ", "ask", &[("ReqID", "in-flight")], "q1");
    let req = expect(&mut r1, "REQ", "ask");
    let rid = req.header("rid").expect("rid").to_owned();
    r1.send("DREQ", "ask", &[], "");
    r1.sync();
    // No new request reaches it: a service (which needs no right) finds no responder.
    other.send("REQ", "ask", &[("ReqID", "o1")], "");
    let m = expect_error(&mut other, "REQ", "ask", "no responder");
    assert_eq!(m.header("ReqID"), Some("o1"));
    // The client's right went with the enablement.
    c1.send("REQ", "ask", &[("ReqID", "late")], "");
    expect_req_refused(&mut c1, "ask", "late");
    quiet(&mut r1, "no new request after DREQ");
    // The request in flight is still answered.
    r1.send("RES", "ask", &[("rid", &rid)], "answer");
    let res = expect(&mut c1, "RES", "ask");
    assert_eq!(res.body, "answer");
    assert_eq!(res.header("ReqID"), Some("in-flight"));
}

/// §9.1: DREQ withdraws only what the sender enabled: another responder keeps answering.
#[test]
fn dreq_without_forcid_leaves_other_responders() {
    let s = Server::start(&[]);
    let mut r1 = Peer::service(s.addr);
    let mut r2 = Peer::service(s.addr);
    let mut c1 = Peer::client(s.addr);
    r1.send("EREQ", "ask", &[], "");
    r2.send("EREQ", "ask", &[], "");
    r1.sync();
    r2.sync();
    r1.send("DREQ", "ask", &[], "");
    r1.sync();
    for i in 0..4 {
        let id = format!("q{i}");
        c1.send("REQ", "ask", &[("ReqID", &id)], "");
        let req = expect(&mut r2, "REQ", "ask");
        let rid = req.header("rid").unwrap().to_owned();
        r2.send("RES", "ask", &[("rid", &rid)], "ok");
        let res = expect(&mut c1, "RES", "ask");
        assert_eq!(res.header("ReqID"), Some(id.as_str()));
    }
    quiet(&mut r1, "no request reaches a withdrawn responder");
}

/// §9.1: "without `forcid`, its own enablement of t for all clients": a plain DSUB /
/// DPUB / DREQ leaves the sender's grants to single connections standing.
#[test]
fn a_withdrawal_without_forcid_leaves_the_senders_grants() {
    let s = Server::start(&[]);
    let mut svc = Peer::service(s.addr);
    let mut c1 = Peer::client(s.addr);
    let mut c2 = Peer::client(s.addr);
    for cmd in ["ESUB", "EPUB"] {
        svc.send(cmd, "room", &[], "");
        for_cid(&mut svc, cmd, "room", &c1.cid);
    }
    svc.send("EREQ", "ask", &[], "");
    for_cid(&mut svc, "EREQ", "ask", &c1.cid);
    for cmd in ["DSUB", "DPUB"] {
        svc.send(cmd, "room", &[], "");
    }
    svc.send("DREQ", "ask", &[], "");
    svc.sync();
    // c2 had only the global enablements.
    c2.send("SUB", "room", &[], "");
    expect_error(&mut c2, "SUB", "room", "not permitted");
    c2.send("PUB", "room", &[], "");
    expect_error(&mut c2, "PUB", "room", "not permitted");
    c2.send("REQ", "ask", &[("ReqID", "r2")], "");
    expect_req_refused(&mut c2, "ask", "r2");
    // c1's grants stand.
    accepted(&mut c1, "SUB", "room");
    c1.send("PUB", "room", &[], "mine");
    let c1cid = c1.cid.clone();
    expect_pub(&mut c1, "room", "mine", &c1cid);
    c1.send("REQ", "ask", &[("ReqID", "r1")], "");
    let e = expect_error(&mut c1, "REQ", "ask", "no responder");
    assert_eq!(e.header("ReqID"), Some("r1"));
}

/// §9.1: "Withdrawing the last right a connection had to subscribe to t (by `DSUB` with
/// `forcid` ...) also unsubscribes it from t." At once: a PUB sent right after the DSUB
/// does not reach it.
#[test]
fn dsub_forcid_of_the_last_right_unsubscribes_at_once() {
    let s = Server::start(&[]);
    let mut svc = Peer::service(s.addr);
    let mut c1 = Peer::client(s.addr);
    for_cid(&mut svc, "ESUB", "room", &c1.cid);
    svc.sync();
    accepted(&mut c1, "SUB", "room");
    svc.send("PUB", "room", &[], "one");
    expect_pub(&mut c1, "room", "one", &svc.cid);
    // DSUB and PUB in one WebSocket message: the PUB is processed after the DSUB.
    let raw = wire("DSUB", "room", &[("forcid", &c1.cid)], "") + &wire("PUB", "room", &[], "two");
    svc.send_raw(&raw);
    svc.sync();
    quiet(&mut c1, "unsubscribed by DSUB forcid, before the next PUB");
    c1.send("SUB", "room", &[], "");
    expect_error(&mut c1, "SUB", "room", "not permitted");
    quiet(&mut svc, "no error for the withdrawal");
}

/// §9.1: "a global `ESUB` of t still in force counts as a right": DSUB forcid then leaves
/// the subscription alone; so does a grant of another service that still stands.
#[test]
fn dsub_forcid_keeps_the_subscription_while_another_right_stands() {
    let s = Server::start(&[]);
    let mut svc = Peer::service(s.addr);
    let mut svc2 = Peer::service(s.addr);
    let mut c1 = Peer::client(s.addr);
    // A global ESUB by another service.
    for_cid(&mut svc, "ESUB", "a", &c1.cid);
    svc2.send("ESUB", "a", &[], "");
    // A global ESUB by the same service.
    svc.send("ESUB", "b", &[], "");
    for_cid(&mut svc, "ESUB", "b", &c1.cid);
    // A grant of another service.
    for_cid(&mut svc, "ESUB", "c", &c1.cid);
    for_cid(&mut svc2, "ESUB", "c", &c1.cid);
    svc.sync();
    svc2.sync();
    for t in ["a", "b", "c"] {
        accepted(&mut c1, "SUB", t);
    }
    for t in ["a", "b", "c"] {
        for_cid(&mut svc, "DSUB", t, &c1.cid);
    }
    svc.sync();
    for t in ["a", "b", "c"] {
        svc.send("PUB", t, &[], t);
        expect_pub(&mut c1, t, t, &svc.cid);
    }
    // The last grant of c goes: c1 is unsubscribed from c.
    for_cid(&mut svc2, "DSUB", "c", &c1.cid);
    svc2.sync();
    svc.send("PUB", "c", &[], "gone");
    svc.send("PUB", "a", &[], "kept");
    expect_pub(&mut c1, "a", "kept", &svc.cid);
    quiet(&mut c1, "unsubscribed from c");
}

/// §9.1: "with `forcid`, its grant to that connection" (DPUB, DREQ).
#[test]
fn dpub_and_dreq_forcid_withdraw_the_grant() {
    let s = Server::start(&[]);
    let mut svc = Peer::service(s.addr);
    let mut c1 = Peer::client(s.addr);
    svc.send("SUB", "chat", &[], "");
    for_cid(&mut svc, "EPUB", "chat", &c1.cid);
    for_cid(&mut svc, "EREQ", "ask", &c1.cid);
    svc.sync();
    c1.send("PUB", "chat", &[], "a");
    expect_pub(&mut svc, "chat", "a", &c1.cid);
    c1.send("REQ", "ask", &[("ReqID", "r1")], "");
    expect_error(&mut c1, "REQ", "ask", "no responder");
    for_cid(&mut svc, "DPUB", "chat", &c1.cid);
    for_cid(&mut svc, "DREQ", "ask", &c1.cid);
    svc.sync();
    c1.send("PUB", "chat", &[], "b");
    expect_error(&mut c1, "PUB", "chat", "not permitted");
    c1.send("REQ", "ask", &[("ReqID", "r2")], "");
    expect_req_refused(&mut c1, "ask", "r2");
    quiet(&mut svc, "nothing delivered after the withdrawal");
}

/// §9.1: "A grant lasts until the service that made it withdraws it or leaves" and "When a
/// global enablement or a grant ends any other way (its service leaves ...), existing
/// subscriptions stay, as in §4."
#[test]
fn grants_end_when_the_granting_service_leaves_existing_subscriptions_stay() {
    let s = Server::start(&[]);
    let mut svc = Peer::service(s.addr);
    let mut other = Peer::service(s.addr);
    let mut c1 = Peer::client(s.addr);
    for_cid(&mut svc, "ESUB", "room", &c1.cid);
    for_cid(&mut svc, "EPUB", "room", &c1.cid);
    for_cid(&mut svc, "EREQ", "ask", &c1.cid);
    svc.sync();
    // A grant, not an enablement: another client has no right.
    let mut c2 = Peer::client(s.addr);
    c2.send("SUB", "room", &[], "");
    expect_error(&mut c2, "SUB", "room", "not permitted");
    accepted(&mut c1, "SUB", "room");
    c1.send("PUB", "room", &[], "before");
    let c1cid = c1.cid.clone();
    expect_pub(&mut c1, "room", "before", &c1cid);
    leave_confirmed(svc, &mut other);
    // The subscription stays.
    other.send("PUB", "room", &[], "stays");
    expect_pub(&mut c1, "room", "stays", &other.cid);
    // New commands on the granted topics are refused.
    c1.send("PUB", "room", &[], "after");
    expect_error(&mut c1, "PUB", "room", "not permitted");
    c1.send("UNS", "room", &[], "");
    c1.send("SUB", "room", &[], "");
    expect_error(&mut c1, "SUB", "room", "not permitted");
    c1.send("REQ", "ask", &[("ReqID", "r")], "");
    expect_req_refused(&mut c1, "ask", "r");
}

/// §9 preamble: "An unknown or departed `forcid` is a silent no-op"; §9.1 a grant ends
/// when "the connection leaves": grants and withdrawals for it afterwards are silent.
#[test]
fn forcid_of_a_departed_or_unknown_connection_is_a_silent_noop() {
    let s = Server::start(&[]);
    let mut svc = Peer::service(s.addr);
    let c1 = Peer::client(s.addr);
    let gone = c1.cid.clone();
    for_cid(&mut svc, "ESUB", "room", &gone);
    svc.sync();
    leave(c1);
    // The server has seen the close once a later connection is accepted and a round trip
    // of the service is done; whatever it does with the leftovers, nothing comes back.
    let _c2 = Peer::client(s.addr);
    for cid in [gone.as_str(), GHOST] {
        for cmd in ["ESUB", "EPUB", "EREQ", "DSUB", "DPUB", "DREQ"] {
            for_cid(&mut svc, cmd, "room", cid);
        }
        int_sub(&mut svc, "SUB", cid, "room");
        int_sub(&mut svc, "UNS", cid, "room");
        svc.send("INT", "KICK", &[("forcid", cid)], "");
        quiet(&mut svc, &format!("forcid {cid}: silent"));
    }
}

/// §9.1: a grant and a global enablement are separate rights: the enablement lapsing
/// (its service leaves) leaves the grant; a service withdraws only what it enabled (a
/// DSUB forcid from a service that made no grant takes nothing away).
#[test]
fn a_service_withdraws_only_its_own_grants_and_rights_are_independent() {
    let s = Server::start(&[]);
    let mut granter = Peer::service(s.addr);
    let mut enabler = Peer::service(s.addr);
    let mut stranger = Peer::service(s.addr);
    let mut c1 = Peer::client(s.addr);
    let mut c2 = Peer::client(s.addr);
    for_cid(&mut granter, "ESUB", "room", &c1.cid);
    for_cid(&mut granter, "EPUB", "room", &c1.cid);
    enabler.send("ESUB", "room", &[], "");
    enabler.sync();
    granter.sync();
    accepted(&mut c1, "SUB", "room");
    accepted(&mut c2, "SUB", "room");
    // A service that granted nothing withdraws nothing.
    for cmd in ["DSUB", "DPUB"] {
        for_cid(&mut stranger, cmd, "room", &c1.cid);
    }
    stranger.send("DSUB", "room", &[], "");
    quiet(&mut stranger, "nothing to withdraw: silent");
    c1.send("PUB", "room", &[], "still granted");
    let c1cid = c1.cid.clone();
    expect_pub(&mut c1, "room", "still granted", &c1cid);
    expect_pub(&mut c2, "room", "still granted", &c1cid);
    // The global enablement lapses: c1's grant stands, c2 has no right any more.
    leave_confirmed(enabler, &mut stranger);
    c1.send("UNS", "room", &[], "");
    accepted(&mut c1, "SUB", "room");
    c2.send("UNS", "room", &[], "");
    c2.send("SUB", "room", &[], "");
    expect_error(&mut c2, "SUB", "room", "not permitted");
}

/// §9.1: "A grant lasts until the service that made it withdraws it or leaves, or the
/// connection leaves" — seen in `middleman_grants` (README: grants in force), which
/// returns to 0 either way, and a repeated grant is the same grant.
#[test]
fn grants_in_force_end_with_the_grantee_or_the_granter() {
    let s = Server::start(&[]);
    let grants = || common::cluster::metric(s.addr, "middleman_grants");
    let mut svc = Peer::service(s.addr);
    let mut other = Peer::service(s.addr);
    let c1 = Peer::client(s.addr);
    let c2 = Peer::client(s.addr);
    assert_eq!(grants(), 0.0);
    for cmd in ["ESUB", "EPUB", "EREQ"] {
        for_cid(&mut svc, cmd, "room", &c1.cid);
    }
    for_cid(&mut svc, "ESUB", "room", &c1.cid);
    for_cid(&mut svc, "ESUB", "room", &c2.cid);
    for_cid(&mut other, "ESUB", "room", &c2.cid);
    svc.sync();
    other.sync();
    assert_eq!(
        grants(),
        5.0,
        "3 to c1 (a repeat is the same grant), 2 to c2"
    );
    leave(c1);
    until(5, "c1's grants end with it", || grants() == 2.0);
    leave_confirmed(svc, &mut other);
    until(5, "svc's grants end with it", || grants() == 1.0);
    for_cid(&mut other, "DSUB", "room", &c2.cid);
    other.sync();
    assert_eq!(grants(), 0.0);
}

/// §9.1: "A `SUB` of a topic the connection already holds is a no-op, not checked again."
#[test]
fn sub_of_a_held_topic_is_a_noop_not_checked_again() {
    let s = Server::start(&[]);
    let mut svc = Peer::service(s.addr);
    let mut other = Peer::service(s.addr);
    let mut c1 = Peer::client(s.addr);
    let mut c2 = Peer::client(s.addr);
    svc.send("ESUB", "news", &[], "");
    svc.sync();
    accepted(&mut c1, "SUB", "news");
    leave_confirmed(svc, &mut other);
    let mut w = watcher(s.addr);
    // The enablement lapsed; c1 still holds news: SUB again is accepted, changes nothing.
    accepted(&mut c1, "SUB", "news");
    quiet(&mut w, "no SYS:SUB for a no-op SUB");
    other.send("PUB", "news", &[], "once");
    expect_pub(&mut c1, "news", "once", &other.cid);
    quiet(&mut c1, "delivered once");
    c2.send("SUB", "news", &[], "");
    expect_error(&mut c2, "SUB", "news", "not permitted");
}

/// A private room: a service grants two members SUB and PUB; a third client is refused
/// both; the members hear each other; a member revoked with DSUB forcid stops receiving
/// at once.
#[test]
fn private_room_of_two_members() {
    let s = Server::start(&[]);
    let mut svc = Peer::service(s.addr);
    let mut m1 = Peer::client(s.addr);
    let mut m2 = Peer::client(s.addr);
    let mut outsider = Peer::client(s.addr);
    let (m1cid, m2cid) = (m1.cid.clone(), m2.cid.clone());
    for m in [&m1cid, &m2cid] {
        for_cid(&mut svc, "ESUB", "room:42", m);
        for_cid(&mut svc, "EPUB", "room:42", m);
    }
    svc.sync();
    accepted(&mut m1, "SUB", "room:42");
    accepted(&mut m2, "SUB", "room:42");
    outsider.send("SUB", "room:42", &[], "");
    expect_error(&mut outsider, "SUB", "room:42", "not permitted");
    outsider.send("PUB", "room:42", &[], "let me in");
    expect_error(&mut outsider, "PUB", "room:42", "not permitted");
    m1.send("PUB", "room:42", &[], "hi from m1");
    expect_pub(&mut m1, "room:42", "hi from m1", &m1cid);
    expect_pub(&mut m2, "room:42", "hi from m1", &m1.cid);
    m2.send("PUB", "room:42", &[], "hi from m2");
    expect_pub(&mut m1, "room:42", "hi from m2", &m2.cid);
    expect_pub(&mut m2, "room:42", "hi from m2", &m2cid);
    quiet(&mut outsider, "the outsider hears nothing");
    // Revoke m2: it stops receiving at once.
    for_cid(&mut svc, "DSUB", "room:42", &m2.cid);
    svc.sync();
    m1.send("PUB", "room:42", &[], "m2 is out");
    expect_pub(&mut m1, "room:42", "m2 is out", &m1cid);
    quiet(&mut m2, "revoked member");
    quiet(&mut outsider, "the outsider hears nothing");
}

// ---------------------------------------------------------------------------------------
// §9.2 server-side subscriptions and kicks
// ---------------------------------------------------------------------------------------

/// §9.2: `INT SUB` / `INT UNS` subscribe or unsubscribe that connection "as if it had sent
/// the command with the right to"; "The connection is not told".
#[test]
fn int_sub_and_int_uns_start_and_stop_delivery_without_telling_the_connection() {
    let s = Server::start(&[]);
    let mut svc = Peer::service(s.addr);
    let mut c1 = Peer::client(s.addr);
    let mut c2 = Peer::client(s.addr);
    int_sub(&mut svc, "SUB", &c1.cid, "room");
    svc.sync();
    quiet(&mut c1, "INT SUB: not told");
    quiet(&mut svc, "INT SUB: no answer");
    svc.send("PUB", "room", &[], "in");
    expect_pub(&mut c1, "room", "in", &svc.cid);
    quiet(&mut c2, "not subscribed");
    int_sub(&mut svc, "UNS", &c1.cid, "room");
    svc.sync();
    quiet(&mut c1, "INT UNS: not told");
    quiet(&mut svc, "INT UNS: no answer");
    svc.send("PUB", "room", &[], "out");
    svc.sync();
    quiet(&mut c1, "unsubscribed");
    // INT SUB then the connection's own UNS (anyone may UNS).
    int_sub(&mut svc, "SUB", &c1.cid, "room");
    svc.sync();
    c1.send("UNS", "room", &[], "");
    quiet(&mut c1, "UNS accepted");
    svc.send("PUB", "room", &[], "after own UNS");
    svc.sync();
    quiet(&mut c1, "unsubscribed by its own UNS");
}

/// §9.2: `INT KICK` closes with 4000 and the reason (default `kicked`), counted as
/// `kicked` in `middleman_connections_closed_total`.
#[test]
fn int_kick_closes_with_4000_and_kicked_and_is_counted() {
    let s = Server::start(&[]);
    let mut svc = Peer::service(s.addr);
    let mut c1 = Peer::client(s.addr);
    let mut c2 = Peer::client(s.addr);
    let before = closed(s.addr, "kicked");
    svc.send("INT", "KICK", &[("forcid", &c1.cid)], "");
    assert_eq!(c1.recv_close(), (4000, "kicked".to_owned()));
    expect_hangup(&mut c1.ws);
    svc.send(
        "INT",
        "KICK",
        &[("forcid", &c2.cid), ("reason", "go away")],
        "",
    );
    assert_eq!(c2.recv_close(), (4000, "go away".to_owned()));
    quiet(&mut svc, "a kick is not answered");
    until(5, "two kicks counted", || {
        closed(s.addr, "kicked") == before + 2.0
    });
    // A service may be kicked too.
    let mut svc2 = Peer::service(s.addr);
    svc.send("INT", "KICK", &[("forcid", &svc2.cid)], "");
    assert_eq!(svc2.recv_close(), (4000, "kicked".to_owned()));
    until(5, "three kicks counted", || {
        closed(s.addr, "kicked") == before + 3.0
    });
}

/// §9.2 on a raw stream (README, The raw stream protocol: "Where WebSocket would send a
/// close frame ..., the server sends a last message `PUB ERROR` with `cmd: CLOSE`,
/// `target: <the close code>`, `reason: <why>`, then closes"): a kicked raw connection
/// gets `target: 4000`, `reason: kicked`.
#[test]
fn int_kick_of_a_raw_stream_connection_ends_with_close_4000() {
    use std::io::{Read, Write};
    let p = common::proc::Proc::start(&server_args(&["--listen", "tcp://127.0.0.1:0"]), &[]);
    let line = p.wait_line("listening on ws://");
    let tcp: std::net::SocketAddr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("tcp://"))
        .expect("a tcp:// listener")
        .parse()
        .unwrap();
    let s = Server::from_proc(p);
    let mut svc = Peer::service(s.addr);
    let mut raw = std::net::TcpStream::connect(tcp).unwrap();
    raw.set_read_timeout(Some(WAIT)).unwrap();
    raw.write_all(format!("{CLIENT_KEY}\r\n").as_bytes())
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // "MM OK", the cid, then (after the kick) the last message and EOF.
    while got.iter().filter(|&&b| b == b'\n').count() < 2 {
        let n = raw.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8(got.clone()).unwrap();
    let mut lines = text.split("\r\n");
    assert_eq!(lines.next(), Some("MM OK"));
    let cid = lines.next().unwrap().to_owned();
    let rest = got[text.find(&cid).unwrap() + cid.len() + 2..].to_vec();
    svc.send("INT", "KICK", &[("forcid", &cid)], "");
    let mut all = rest;
    loop {
        let n = raw.read(&mut buf).expect("read until EOF");
        if n == 0 {
            break;
        }
        all.extend_from_slice(&buf[..n]);
    }
    let m = parse_one(&all);
    assert_eq!(
        (m.cmd.as_str(), m.target.as_str()),
        ("PUB", "ERROR"),
        "{m:?}"
    );
    assert_eq!(m.header("cmd"), Some("CLOSE"), "{m:?}");
    assert_eq!(m.header("target"), Some("4000"), "{m:?}");
    assert_eq!(m.header("reason"), Some("kicked"), "{m:?}");
}

/// §9.2: "`reason: <text>` (cut to 120 bytes at a UTF-8 character boundary)".
#[test]
fn int_kick_reason_is_cut_to_120_bytes_at_a_character_boundary() {
    let s = Server::start(&[]);
    let mut svc = Peer::service(s.addr);
    let cases = [
        // é straddles byte 120: cut before it.
        (format!("{}é tail", "a".repeat(119)), "a".repeat(119)),
        ("b".repeat(121), "b".repeat(120)),
        ("c".repeat(120), "c".repeat(120)),
        // 70 two-byte characters: 60 of them are exactly 120 bytes.
        ("é".repeat(70), "é".repeat(60)),
        // A 4-byte character across the boundary (bytes 118..122).
        (format!("{}🙂xyz", "d".repeat(118)), "d".repeat(118)),
    ];
    for (sent, want) in cases {
        let mut c = Peer::client(s.addr);
        svc.send("INT", "KICK", &[("forcid", &c.cid), ("reason", &sent)], "");
        let (code, why) = c.recv_close();
        assert_eq!(code, 4000);
        assert_eq!(why, want, "reason {sent:?} ({} bytes)", sent.len());
        assert!(why.len() <= 120);
    }
}

// ---------------------------------------------------------------------------------------
// §9.3 presence
// ---------------------------------------------------------------------------------------

/// §9.3: `count` (connections subscribed), `users` (distinct non-empty uids), one line per
/// connection (services included), `<cid> <uid>` or `<cid>` alone, sorted by cid, CRLF;
/// the answer carries the requester's ReqID under its spelling and no sender cid/uid.
#[test]
fn presence_counts_users_and_lists_sorted_lines() {
    let s = Server::start(&[]);
    let mut req = Peer::service(s.addr);
    let mut holder = Peer::service(s.addr);
    let _monitor = Peer::monitor(s.addr);
    let mut cs: Vec<Peer> = (0..4).map(|_| Peer::client(s.addr)).collect();
    holder.send("ESUB", "room", &[], "");
    holder.send("SUB", "room", &[], "");
    set_uid(&mut holder, &cs[0].cid, "alice");
    set_uid(&mut holder, &cs[1].cid, "alice");
    set_uid(&mut holder, &cs[2].cid, "bob");
    holder.sync();
    for c in cs.iter_mut() {
        accepted(c, "SUB", "room");
    }
    req.send(
        "REQ",
        "SYS:PRESENCE",
        &[("reqId", "p-1"), ("topic", "room")],
        "",
    );
    let m = req.recv();
    let want = expected_lines(&[
        (&holder.cid, ""),
        (&cs[0].cid, "alice"),
        (&cs[1].cid, "alice"),
        (&cs[2].cid, "bob"),
        (&cs[3].cid, ""),
    ]);
    assert_presence(
        &m,
        &[("reqId", "p-1"), ("count", "5"), ("users", "2")],
        &want,
    );
    // The requester is not subscribed, neither is the monitor: not counted.
    // Leaving changes the answer.
    let c3 = cs.pop().unwrap();
    leave(c3);
    holder.sync();
    let m = presence(&mut req, "room", "p-2", &[]);
    let want = expected_lines(&[
        (&holder.cid, ""),
        (&cs[0].cid, "alice"),
        (&cs[1].cid, "alice"),
        (&cs[2].cid, "bob"),
    ]);
    assert_presence(
        &m,
        &[("ReqID", "p-2"), ("count", "4"), ("users", "2")],
        &want,
    );
}

/// §9.3: the uid a line shows is the connection's current one (after `INT UID`).
#[test]
fn presence_shows_the_uid_set_after_subscribing() {
    let s = Server::start(&[]);
    let mut svc = Peer::service(s.addr);
    let c1 = Peer::client(s.addr);
    let c2 = Peer::client(s.addr);
    int_sub(&mut svc, "SUB", &c1.cid, "room");
    int_sub(&mut svc, "SUB", &c2.cid, "room");
    svc.sync();
    let m = presence(&mut svc, "room", "p1", &[]);
    let want = expected_lines(&[(&c1.cid, ""), (&c2.cid, "")]);
    assert_presence(
        &m,
        &[("ReqID", "p1"), ("count", "2"), ("users", "0")],
        &want,
    );
    set_uid(&mut svc, &c1.cid, "dave");
    set_uid(&mut svc, &c2.cid, "erin");
    svc.sync();
    let m = presence(&mut svc, "room", "p2", &[]);
    let want = expected_lines(&[(&c1.cid, "dave"), (&c2.cid, "erin")]);
    assert_presence(
        &m,
        &[("ReqID", "p2"), ("count", "2"), ("users", "2")],
        &want,
    );
    // The service itself subscribes: counted, uid empty.
    svc.send("SUB", "room", &[], "");
    let m = presence(&mut svc, "room", "p3", &[]);
    let want = expected_lines(&[(&c1.cid, "dave"), (&c2.cid, "erin"), (&svc.cid, "")]);
    assert_presence(
        &m,
        &[("ReqID", "p3"), ("count", "3"), ("users", "2")],
        &want,
    );
}

/// §9.3: "at most `limit` lines (header, default 1000; `limit: 0` asks for the counts
/// alone; more lines than the limit: header `truncated: true`)". notes-21: values above
/// 10000 are clamped to 10000.
#[test]
fn presence_limit_truncates_and_limit_zero_gives_the_counts_alone() {
    let s = Server::start(&[]);
    let mut svc = Peer::service(s.addr);
    let cs: Vec<Peer> = (0..6).map(|_| Peer::client(s.addr)).collect();
    for (i, c) in cs.iter().enumerate() {
        int_sub(&mut svc, "SUB", &c.cid, "room");
        set_uid(&mut svc, &c.cid, &format!("u{}", i % 4));
    }
    svc.sync();
    let all: Vec<(&str, String)> = cs
        .iter()
        .enumerate()
        .map(|(i, c)| (c.cid.as_str(), format!("u{}", i % 4)))
        .collect();
    let members: Vec<(&str, &str)> = all.iter().map(|(c, u)| (*c, u.as_str())).collect();
    let want = expected_lines(&members);
    let m = presence(&mut svc, "room", "l2", &[("limit", "2")]);
    assert_presence(
        &m,
        &[
            ("ReqID", "l2"),
            ("count", "6"),
            ("users", "4"),
            ("truncated", "true"),
        ],
        &want[..2],
    );
    for limit in ["6", "7", "1000", "10000", "99999999"] {
        let m = presence(&mut svc, "room", "l", &[("limit", limit)]);
        assert_presence(&m, &[("ReqID", "l"), ("count", "6"), ("users", "4")], &want);
    }
    // No limit: default 1000.
    let m = presence(&mut svc, "room", "d", &[]);
    assert_presence(&m, &[("ReqID", "d"), ("count", "6"), ("users", "4")], &want);
    // limit 0: the counts alone. Six lines are more than the limit of 0, hence truncated.
    let m = presence(&mut svc, "room", "z", &[("limit", "0")]);
    assert_presence(
        &m,
        &[
            ("ReqID", "z"),
            ("count", "6"),
            ("users", "4"),
            ("truncated", "true"),
        ],
        &[],
    );
    // A topic nobody holds.
    for limit in ["0", "5"] {
        let m = presence(&mut svc, "nobody", "n", &[("limit", limit)]);
        assert_presence(&m, &[("ReqID", "n"), ("count", "0"), ("users", "0")], &[]);
    }
}

/// notes-21: "`bad limit`: presence `limit` that is not a decimal integer; values above
/// 10000 are clamped to 10000": a decimal integer of any size is clamped, leading zeros
/// are still decimal.
#[test]
fn presence_limit_of_any_size_is_clamped_not_refused() {
    let s = Server::start(&[]);
    let mut svc = Peer::service(s.addr);
    let cs: Vec<Peer> = (0..3).map(|_| Peer::client(s.addr)).collect();
    for c in &cs {
        int_sub(&mut svc, "SUB", &c.cid, "room");
    }
    svc.sync();
    let members: Vec<(&str, &str)> = cs.iter().map(|c| (c.cid.as_str(), "")).collect();
    let want = expected_lines(&members);
    let m = presence(&mut svc, "room", "z", &[("limit", "002")]);
    assert_presence(
        &m,
        &[
            ("ReqID", "z"),
            ("count", "3"),
            ("users", "0"),
            ("truncated", "true"),
        ],
        &want[..2],
    );
    for huge in ["18446744073709551616", "99999999999999999999999999999999"] {
        let m = presence(&mut svc, "room", "h", &[("limit", huge)]);
        assert_presence(&m, &[("ReqID", "h"), ("count", "3"), ("users", "0")], &want);
    }
}

/// §9.3: "Private channels and monitors' copies are not subscriptions."
#[test]
fn presence_leaves_out_private_channels_and_monitor_copies() {
    let s = Server::start(&[]);
    let mut svc = Peer::service(s.addr);
    let mut mon = Peer::monitor(s.addr);
    let c1 = Peer::client(s.addr);
    int_sub(&mut svc, "SUB", &c1.cid, "room");
    svc.sync();
    svc.send("PUB", "room", &[], "copied to the monitor");
    expect_pub(&mut mon, "room", "copied to the monitor", &svc.cid);
    let m = presence(&mut svc, "room", "p", &[]);
    assert_presence(
        &m,
        &[("ReqID", "p"), ("count", "1"), ("users", "0")],
        &expected_lines(&[(&c1.cid, "")]),
    );
    // A monitor that subscribes is counted like anyone.
    mon.send("SUB", "room", &[], "");
    mon.sync();
    let m = presence(&mut svc, "room", "q", &[]);
    assert_presence(
        &m,
        &[("ReqID", "q"), ("count", "2"), ("users", "0")],
        &expected_lines(&[(&c1.cid, ""), (&mon.cid, "")]),
    );
    // Presence of a private channel: refused (notes-21).
    let t = format!("MSG:{}", c1.cid);
    svc.send("REQ", "SYS:PRESENCE", &[("ReqID", "m"), ("topic", &t)], "");
    let e = expect_error(&mut svc, "REQ", "SYS:PRESENCE", "not permitted");
    assert_eq!(e.header("ReqID"), Some("m"));
}

// ---------------------------------------------------------------------------------------
// §9.4 events
// ---------------------------------------------------------------------------------------

/// §9.4: SYS:CONNECT and SYS:DISCONNECT with `cid`, `uid`, `role` (and `reason`), in this
/// order, empty body, no sender cid/uid.
#[test]
fn connect_and_disconnect_events_name_the_connection_role_and_reason() {
    let s = Server::start(&[]);
    let mut w = watcher(s.addr);
    let mut admin = Peer::service(s.addr);
    expect_event(
        &mut w,
        "SYS:CONNECT",
        &[("cid", &admin.cid), ("uid", ""), ("role", "service")],
    );
    let c = Peer::client(s.addr);
    expect_event(
        &mut w,
        "SYS:CONNECT",
        &[("cid", &c.cid), ("uid", ""), ("role", "client")],
    );
    let mon = Peer::monitor(s.addr);
    expect_event(
        &mut w,
        "SYS:CONNECT",
        &[("cid", &mon.cid), ("uid", ""), ("role", "monitor")],
    );
    set_uid(&mut admin, &c.cid, "carol");
    admin.sync();
    let (ccid, mcid) = (c.cid.clone(), mon.cid.clone());
    leave(c);
    expect_event(
        &mut w,
        "SYS:DISCONNECT",
        &[
            ("cid", &ccid),
            ("uid", "carol"),
            ("role", "client"),
            ("reason", "normal"),
        ],
    );
    admin.send("INT", "KICK", &[("forcid", &mcid)], "");
    expect_event(
        &mut w,
        "SYS:DISCONNECT",
        &[
            ("cid", &mcid),
            ("uid", ""),
            ("role", "monitor"),
            ("reason", "kicked"),
        ],
    );
    quiet(&mut w, "one event each");
}

/// §9.4: SYS:SUB / SYS:UNS with `topic`, for the connection's own SUB/UNS, for INT SUB /
/// INT UNS (§9.2), and for the unsubscription by DSUB forcid (notes-21).
#[test]
fn sub_and_uns_events_for_own_commands_int_sub_uns_and_dsub_forcid() {
    let s = Server::start(&[]);
    let mut svc = Peer::service(s.addr);
    let mut c = Peer::client(s.addr);
    set_uid(&mut svc, &c.cid, "u1");
    for_cid(&mut svc, "ESUB", "room", &c.cid);
    svc.sync();
    let mut w = watcher(s.addr);
    let ev = |t: &'static str| -> Vec<(String, String)> {
        vec![
            ("cid".into(), String::new()),
            ("uid".into(), "u1".into()),
            ("role".into(), "client".into()),
            ("topic".into(), t.into()),
        ]
    };
    let check = |w: &mut Peer, kind: &str, t: &'static str, cid: &str| {
        let mut h = ev(t);
        h[0].1 = cid.to_owned();
        let h: Vec<(&str, &str)> = h.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        expect_event(w, kind, &h);
    };
    c.send("SUB", "room", &[], "");
    check(&mut w, "SYS:SUB", "room", &c.cid);
    c.send("UNS", "room", &[], "");
    check(&mut w, "SYS:UNS", "room", &c.cid);
    int_sub(&mut svc, "SUB", &c.cid, "other");
    check(&mut w, "SYS:SUB", "other", &c.cid);
    int_sub(&mut svc, "UNS", &c.cid, "other");
    check(&mut w, "SYS:UNS", "other", &c.cid);
    c.send("SUB", "room", &[], "");
    check(&mut w, "SYS:SUB", "room", &c.cid);
    for_cid(&mut svc, "DSUB", "room", &c.cid);
    check(&mut w, "SYS:UNS", "room", &c.cid);
    quiet(&mut w, "one event each");
    // A service's own SUB/UNS.
    svc.send("SUB", "svc-topic", &[], "");
    expect_event(
        &mut w,
        "SYS:SUB",
        &[
            ("cid", &svc.cid),
            ("uid", ""),
            ("role", "service"),
            ("topic", "svc-topic"),
        ],
    );
    svc.send("UNS", "svc-topic", &[], "");
    expect_event(
        &mut w,
        "SYS:UNS",
        &[
            ("cid", &svc.cid),
            ("uid", ""),
            ("role", "service"),
            ("topic", "svc-topic"),
        ],
    );
    quiet(&mut w, "one event each");
}

/// §9.4 / notes-21: no event for the private channel, none for a SUB/UNS that changes
/// nothing, and "subscriptions ended by a disconnect produce no `SYS:UNS`".
#[test]
fn no_event_for_private_channel_noop_sub_uns_or_subscriptions_ended_by_disconnect() {
    let s = Server::start(&[]);
    let mut svc = Peer::service(s.addr);
    let mut w = watcher(s.addr);
    let mut c = Peer::client(s.addr);
    expect_event(
        &mut w,
        "SYS:CONNECT",
        &[("cid", &c.cid), ("uid", ""), ("role", "client")],
    );
    quiet(&mut w, "no SYS:SUB for the private channel MSG:<cid>");
    int_sub(&mut svc, "SUB", &c.cid, "room");
    expect_event(
        &mut w,
        "SYS:SUB",
        &[
            ("cid", &c.cid),
            ("uid", ""),
            ("role", "client"),
            ("topic", "room"),
        ],
    );
    int_sub(&mut svc, "SUB", &c.cid, "room");
    svc.sync();
    accepted(&mut c, "SUB", "room");
    int_sub(&mut svc, "UNS", &c.cid, "never");
    svc.sync();
    accepted(&mut c, "UNS", "never");
    svc.send("UNS", "never", &[], "");
    svc.sync();
    quiet(&mut w, "no event for SUB/UNS that change nothing");
    let cid = c.cid.clone();
    leave(c);
    expect_event(
        &mut w,
        "SYS:DISCONNECT",
        &[
            ("cid", &cid),
            ("uid", ""),
            ("role", "client"),
            ("reason", "normal"),
        ],
    );
    quiet(
        &mut w,
        "no SYS:UNS for a subscription ended by a disconnect",
    );
}

/// Every `middleman_connections_closed_total` counter, by its `reason` label.
fn closes(addr: std::net::SocketAddr) -> std::collections::HashMap<String, f64> {
    metrics(addr)
        .into_iter()
        .filter_map(|(k, v)| {
            let r = k.strip_prefix("middleman_connections_closed_total{reason=\"")?;
            let r = r.strip_suffix("\"}")?;
            // Each GET /metrics is itself a connection closed as `http`.
            (r != "http").then(|| (r.to_owned(), v))
        })
        .collect()
}

/// §9.4: SYS:DISCONNECT carries "`reason` for DISCONNECT (the closed-connection reason of
/// `/metrics`)": for each way a connection ends, the event's reason is the label of the
/// counter that close incremented (notes-21 names `normal` and `kicked`).
#[test]
fn disconnect_reason_is_the_close_reason_counted_in_metrics() {
    let s = Server::start(&["--max-line-bytes", "1KiB"]);
    let mut w = watcher(s.addr);
    let mut svc = Peer::service(s.addr);
    drain(&mut w);
    // The watcher and the service must stay: they keep reading (answering pings).
    type Ender = Box<dyn Fn(&mut Peer, Peer)>;
    let cases: Vec<(&str, Option<&str>, Ender)> = vec![
        (
            "close handshake",
            Some("normal"),
            Box::new(|_svc: &mut Peer, c: Peer| leave(c)),
        ),
        (
            "kick",
            Some("kicked"),
            Box::new(|svc: &mut Peer, mut c: Peer| {
                svc.send("INT", "KICK", &[("forcid", &c.cid)], "");
                let _ = c.recv_close();
            }),
        ),
        (
            "reset without a close frame",
            None,
            Box::new(|_svc: &mut Peer, c: Peer| {
                set_linger_reset(c.ws.get_ref());
                drop(c);
            }),
        ),
        (
            "unparsable first line (close 1002)",
            None,
            Box::new(|_svc: &mut Peer, mut c: Peer| {
                c.send_raw("NOSPACE\r\n");
                assert_eq!(c.recv_close().0, 1002);
            }),
        ),
        (
            "line over the limit (close 1009)",
            None,
            Box::new(|_svc: &mut Peer, mut c: Peer| {
                c.send_raw(&format!("PUB {}\r\n", "x".repeat(2000)));
                assert_eq!(c.recv_close().0, 1009);
            }),
        ),
    ];
    for (what, name, end) in cases {
        let c = Peer::client(s.addr);
        let cid = c.cid.clone();
        expect_event(
            &mut w,
            "SYS:CONNECT",
            &[("cid", &cid), ("uid", ""), ("role", "client")],
        );
        let before = closes(s.addr);
        end(&mut svc, c);
        let m = w.recv();
        let mut counted = String::new();
        until(5, "the close counted", || {
            let after = closes(s.addr);
            let grew: Vec<&String> = after
                .iter()
                .filter(|(k, v)| **v > before.get(*k).copied().unwrap_or(0.0))
                .map(|(k, _)| k)
                .collect();
            if grew.len() == 1 {
                counted = grew[0].clone();
            }
            grew.len() == 1
        });
        if let Some(n) = name {
            assert_eq!(counted, n, "{what}: counted as");
        }
        assert_event(
            &m,
            "SYS:DISCONNECT",
            &[
                ("cid", &cid),
                ("uid", ""),
                ("role", "client"),
                ("reason", &counted),
            ],
        );
        eprintln!("{what}: reason {counted}");
    }
    quiet(&mut w, "one event each");
    // Idle: a connection that neither sends nor answers pings, on a server with short
    // timeouts; the watcher keeps reading (answering pings) meanwhile.
    let s = Server::start(&["--idle-timeout", "1s", "--ping-interval", "300ms"]);
    let mut w = watcher(s.addr);
    let c = Peer::client(s.addr);
    let before = closes(s.addr);
    let t = std::time::Instant::now();
    let mut got = Vec::new();
    while !got.iter().any(|m: &Msg| m.target == "SYS:DISCONNECT") {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "not closed as idle within 10 s: {got:?}"
        );
        got.extend(read_for(&mut w, std::time::Duration::from_millis(200)));
    }
    eprintln!("idle close after {:?}", t.elapsed());
    // Counted once the connection is gone (after its close linger).
    let mut grew = Vec::new();
    until(5, "the idle close counted", || {
        let after = closes(s.addr);
        grew = after
            .iter()
            .filter(|(k, v)| **v > before.get(*k).copied().unwrap_or(0.0))
            .map(|(k, _)| k.clone())
            .collect();
        grew.len() == 1
    });
    assert_eq!(got.len(), 2, "{got:?}");
    assert_event(
        &got[0],
        "SYS:CONNECT",
        &[("cid", &c.cid), ("uid", ""), ("role", "client")],
    );
    assert_event(
        &got[1],
        "SYS:DISCONNECT",
        &[
            ("cid", &c.cid),
            ("uid", ""),
            ("role", "client"),
            ("reason", &grew[0]),
        ],
    );
    eprintln!("idle: reason {}", grew[0]);
}

/// §9.4: "A service's events follow the connection's own commands in order": a watcher
/// sees them interleaved with that connection's PUBs exactly as sent.
#[test]
fn events_follow_the_connections_commands_in_order() {
    let s = Server::start(&[]);
    let mut svc = Peer::service(s.addr);
    let mut w = watcher(s.addr);
    w.send("SUB", "mark", &[], "");
    drain(&mut w); // its own SYS:SUB mark
    let mut raw = String::new();
    for (cmd, t, body) in [
        ("SUB", "a", ""),
        ("SUB", "b", ""),
        ("PUB", "mark", "1"),
        ("UNS", "a", ""),
        ("SUB", "c", ""),
        ("PUB", "mark", "2"),
        ("UNS", "b", ""),
    ] {
        raw += &wire(cmd, t, &[], body);
    }
    svc.send_raw(&raw);
    let sub = |w: &mut Peer, kind: &str, t: &str, cid: &str| {
        expect_event(
            w,
            kind,
            &[("cid", cid), ("uid", ""), ("role", "service"), ("topic", t)],
        );
    };
    let cid = svc.cid.clone();
    sub(&mut w, "SYS:SUB", "a", &cid);
    sub(&mut w, "SYS:SUB", "b", &cid);
    expect_pub(&mut w, "mark", "1", &cid);
    sub(&mut w, "SYS:UNS", "a", &cid);
    sub(&mut w, "SYS:SUB", "c", &cid);
    expect_pub(&mut w, "mark", "2", &cid);
    sub(&mut w, "SYS:UNS", "b", &cid);
    leave(svc);
    expect_event(
        &mut w,
        "SYS:DISCONNECT",
        &[
            ("cid", &cid),
            ("uid", ""),
            ("role", "service"),
            ("reason", "normal"),
        ],
    );
    quiet(&mut w, "no SYS:UNS c at the disconnect");
}

/// notes-21: "Events go to subscribers only (monitors do not get copies)"; a service
/// subscribed to one event topic gets that one only.
#[test]
fn events_reach_only_their_subscribers_not_monitors() {
    let s = Server::start(&[]);
    let mut svc = Peer::service(s.addr);
    let mut mon = Peer::monitor(s.addr);
    let mut only_connect = Peer::service(s.addr);
    only_connect.send("SUB", "SYS:CONNECT", &[], "");
    only_connect.sync();
    let c = Peer::client(s.addr);
    int_sub(&mut svc, "SUB", &c.cid, "room");
    int_sub(&mut svc, "UNS", &c.cid, "room");
    svc.sync();
    let cid = c.cid.clone();
    leave(c);
    svc.sync();
    expect_event(
        &mut only_connect,
        "SYS:CONNECT",
        &[("cid", &cid), ("uid", ""), ("role", "client")],
    );
    quiet(&mut only_connect, "only SYS:CONNECT subscribed");
    quiet(&mut mon, "monitors get no copies of events");
}

/// §9.4: "Event subscribers are ordinary subscribers: a slow one is cut as any slow
/// consumer" (§7: close 1008 `slow consumer`); the connections the events are about are
/// not slowed.
#[test]
fn a_slow_event_subscriber_is_cut_as_a_slow_consumer() {
    let s = Server::start(&["--max-outbound-bytes", "64KiB"]);
    let mut w = watcher(s.addr);
    let mut svc = Peer::service(s.addr);
    let before = closed(s.addr, "slow_consumer");
    // The watcher stops reading; the service subscribes and unsubscribes until the
    // watcher's queue passes the cap (kernel buffers take some megabytes first).
    let mut batch = String::new();
    for i in 0..500 {
        batch += &wire("SUB", &format!("t{i}"), &[], "");
        batch += &wire("UNS", &format!("t{i}"), &[], "");
    }
    let t = std::time::Instant::now();
    while closed(s.addr, "slow_consumer") == before {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(60),
            "the watcher was not cut"
        );
        for _ in 0..20 {
            svc.send_raw(&batch);
        }
        svc.sync();
    }
    assert_eq!(closed(s.addr, "slow_consumer"), before + 1.0);
    // The watcher gets what was queued before the cap, then the close frame if it reads
    // all of that within the server's close linger (2 s; a debug build reading megabytes
    // of events from the kernel buffers may not), else the server hangs up.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the watcher was not closed"
        );
        match w.ws.read() {
            Ok(tungstenite::Message::Close(f)) => {
                let f = f.expect("a close frame with a code");
                assert_eq!(
                    (u16::from(f.code), f.reason.as_str()),
                    (1008, "slow consumer")
                );
                break;
            }
            Ok(tungstenite::Message::Text(t)) => {
                let m = parse_one(t.as_bytes());
                assert!(m.target.starts_with("SYS:"), "{m:?}");
            }
            Ok(_) => continue,
            Err(tungstenite::Error::Protocol(
                tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
            )) => break,
            Err(e) => panic!("watcher: {e}"),
        }
    }
    // The service was not slowed or cut.
    svc.send("SUB", "still-here", &[], "");
    svc.send("PUB", "still-here", &[], "yes");
    let cid = svc.cid.clone();
    expect_pub(&mut svc, "still-here", "yes", &cid);
}

// ---------------------------------------------------------------------------------------
// Refusals (§7, §9 preamble, notes-21)
// ---------------------------------------------------------------------------------------

/// notes-21: "`not permitted`: any new command (DSUB/DPUB/DREQ, INT SUB/UNS/KICK, REQ
/// SYS:PRESENCE, any `forcid` grant) from a client"; the connection stays and works.
#[test]
fn every_new_command_from_a_client_is_not_permitted_and_the_connection_stays() {
    let s = Server::start(&[]);
    let mut svc = Peer::service(s.addr);
    let mut c = Peer::client(s.addr);
    let mut victim = Peer::client(s.addr);
    let mut w = watcher(s.addr);
    svc.send("ESUB", "room", &[], "");
    svc.sync();
    drain(&mut w);
    for cmd in ["DSUB", "DPUB", "DREQ"] {
        c.send(cmd, "room", &[], "");
        expect_error(&mut c, cmd, "room", "not permitted");
        c.send(cmd, "room", &[("forcid", &victim.cid)], "");
        expect_error(&mut c, cmd, "room", "not permitted");
    }
    for cmd in ["ESUB", "EPUB", "EREQ"] {
        c.send(cmd, "room", &[("forcid", &c.cid.clone())], "");
        expect_error(&mut c, cmd, "room", "not permitted");
    }
    for what in ["SUB", "UNS"] {
        int_sub(&mut c, what, &victim.cid.clone(), "room");
        expect_error(&mut c, "INT", what, "not permitted");
    }
    c.send("INT", "KICK", &[("forcid", &victim.cid)], "");
    expect_error(&mut c, "INT", "KICK", "not permitted");
    c.send("INT", "KICK", &[("forcid", &c.cid.clone())], "");
    expect_error(&mut c, "INT", "KICK", "not permitted");
    c.send(
        "REQ",
        "SYS:PRESENCE",
        &[("ReqID", "p"), ("topic", "room")],
        "",
    );
    let e = expect_error(&mut c, "REQ", "SYS:PRESENCE", "not permitted");
    assert_eq!(e.header("ReqID"), Some("p"));
    quiet(&mut victim, "nothing happened to the victim");
    quiet(&mut w, "no event: nothing was done");
    // Both still work.
    accepted(&mut c, "SUB", "room");
    accepted(&mut victim, "SUB", "room");
    svc.send("PUB", "room", &[], "alive");
    expect_pub(&mut c, "room", "alive", &svc.cid);
    expect_pub(&mut victim, "room", "alive", &svc.cid);
}

/// notes-21: "`bad cid`: a `forcid` value that is not a cid (`[0-9a-z]{1,32}`)".
#[test]
fn forcid_that_is_not_a_cid_is_bad_cid() {
    let s = Server::start(&[]);
    let mut svc = Peer::service(s.addr);
    let mut c = Peer::client(s.addr);
    let long = "a".repeat(33);
    for bad in ["NotACid", "a-b", "a.b", long.as_str(), "caf\u{e9}"] {
        for cmd in ["ESUB", "EPUB", "EREQ", "DSUB", "DPUB", "DREQ"] {
            for_cid(&mut svc, cmd, "room", bad);
            expect_error(&mut svc, cmd, "room", "bad cid");
        }
        for what in ["SUB", "UNS"] {
            int_sub(&mut svc, what, bad, "room");
            expect_error(&mut svc, "INT", what, "bad cid");
        }
        svc.send("INT", "KICK", &[("forcid", bad)], "");
        expect_error(&mut svc, "INT", "KICK", "bad cid");
    }
    // 32 characters is a cid (unknown: silent).
    for_cid(&mut svc, "ESUB", "room", &"a".repeat(32));
    quiet(&mut svc, "a 32-character cid is well-formed");
    // Nothing was granted to anyone.
    c.send("SUB", "room", &[], "");
    expect_error(&mut c, "SUB", "room", "not permitted");
}

/// notes-21: "`missing header`: INT SUB/UNS without `forcid` or `topic`; INT KICK without
/// `forcid`; REQ SYS:PRESENCE without `topic`" and "`missing ReqID`: REQ SYS:PRESENCE
/// without ReqID".
#[test]
fn missing_headers_are_errors() {
    let s = Server::start(&[]);
    let mut svc = Peer::service(s.addr);
    let c = Peer::client(s.addr);
    for what in ["SUB", "UNS"] {
        svc.send("INT", what, &[("topic", "room")], "");
        expect_error(&mut svc, "INT", what, "missing header");
        svc.send("INT", what, &[("forcid", &c.cid)], "");
        expect_error(&mut svc, "INT", what, "missing header");
        svc.send("INT", what, &[], "");
        expect_error(&mut svc, "INT", what, "missing header");
    }
    svc.send("INT", "KICK", &[("reason", "x")], "");
    expect_error(&mut svc, "INT", "KICK", "missing header");
    svc.send("REQ", "SYS:PRESENCE", &[("ReqID", "p1")], "");
    let e = expect_error(&mut svc, "REQ", "SYS:PRESENCE", "missing header");
    assert_eq!(e.header("ReqID"), Some("p1"));
    svc.send("REQ", "SYS:PRESENCE", &[("topic", "room")], "");
    let e = expect_error(&mut svc, "REQ", "SYS:PRESENCE", "missing ReqID");
    assert_eq!(e.header("ReqID"), None);
    // The kick target is still connected: nothing was done.
    let m = presence(&mut svc, "room", "p2", &[]);
    assert_presence(&m, &[("ReqID", "p2"), ("count", "0"), ("users", "0")], &[]);
}

/// §9 preamble: "Targets beginning with `SYS:` are reserved like `MSG:`: clients may not
/// SUB, PUB or REQ them, and no one may PUB to them or enable them (error `not
/// permitted`)"; notes-21 lists the service cases.
#[test]
fn sys_targets_are_reserved() {
    let s = Server::start(&[]);
    let mut svc = Peer::service(s.addr);
    let mut c = Peer::client(s.addr);
    let mut w = watcher(s.addr);
    // Services.
    for t in ["SYS:x", "SYS:CONNECT", "SYS:PRESENCE"] {
        for cmd in ["PUB", "EPUB", "ESUB", "EREQ"] {
            svc.send(cmd, t, &[], "");
            expect_error(&mut svc, cmd, t, "not permitted");
        }
        for_cid(&mut svc, "ESUB", t, &c.cid);
        expect_error(&mut svc, "ESUB", t, "not permitted");
    }
    for t in ["SYS:x", "SYS:RECOVERY", "SYS:PRESENCE"] {
        svc.send("SUB", t, &[], "");
        expect_error(&mut svc, "SUB", t, "not permitted");
    }
    svc.send("REQ", "SYS:x", &[("ReqID", "r")], "");
    let e = expect_error(&mut svc, "REQ", "SYS:x", "not permitted");
    assert_eq!(e.header("ReqID"), Some("r"));
    for t in [
        "SYS:CONNECT",
        "SYS:SUB",
        "MSG:abc",
        format!("MSG:{}", c.cid).as_str(),
    ] {
        int_sub(&mut svc, "SUB", &c.cid, t);
        expect_error(&mut svc, "INT", "SUB", "not permitted");
        int_sub(&mut svc, "UNS", &c.cid, t);
        expect_error(&mut svc, "INT", "UNS", "not permitted");
    }
    svc.send(
        "REQ",
        "SYS:PRESENCE",
        &[("ReqID", "p"), ("topic", "MSG:abc")],
        "",
    );
    let e = expect_error(&mut svc, "REQ", "SYS:PRESENCE", "not permitted");
    assert_eq!(e.header("ReqID"), Some("p"));
    quiet(&mut w, "no event, nothing reached SYS:");
    // Clients.
    for t in EVENTS.iter().copied().chain(["SYS:x"]) {
        c.send("SUB", t, &[], "");
        expect_error(&mut c, "SUB", t, "not permitted");
        c.send("PUB", t, &[], "");
        expect_error(&mut c, "PUB", t, "not permitted");
    }
    c.send("REQ", "SYS:x", &[("ReqID", "q")], "");
    let e = expect_error(&mut c, "REQ", "SYS:x", "not permitted");
    assert_eq!(e.header("ReqID"), Some("q"));
    quiet(&mut w, "no event, nothing reached SYS:");
    // A service may subscribe to the four event topics.
    let mut s2 = Peer::service(s.addr);
    for t in EVENTS {
        accepted(&mut s2, "SUB", t);
    }
}

/// notes-21: "`bad topic`: INT SUB/UNS or presence `topic` that is empty, longer than 255
/// bytes or holds a control character"; "`bad limit`: presence `limit` that is not a
/// decimal integer".
#[test]
fn bad_topic_and_bad_limit() {
    let s = Server::start(&[]);
    let mut svc = Peer::service(s.addr);
    let c = Peer::client(s.addr);
    let long = "t".repeat(256);
    for bad in ["", long.as_str(), "a\tb"] {
        for what in ["SUB", "UNS"] {
            int_sub(&mut svc, what, &c.cid, bad);
            expect_error(&mut svc, "INT", what, "bad topic");
        }
        svc.send("REQ", "SYS:PRESENCE", &[("ReqID", "t"), ("topic", bad)], "");
        let e = expect_error(&mut svc, "REQ", "SYS:PRESENCE", "bad topic");
        assert_eq!(e.header("ReqID"), Some("t"));
    }
    // 255 bytes is a topic.
    int_sub(&mut svc, "SUB", &c.cid, &"t".repeat(255));
    quiet(&mut svc, "a 255-byte topic is fine");
    for bad in ["abc", "1.5", "12x", "0x10"] {
        svc.send(
            "REQ",
            "SYS:PRESENCE",
            &[("ReqID", "l"), ("topic", "room"), ("limit", bad)],
            "",
        );
        let e = expect_error(&mut svc, "REQ", "SYS:PRESENCE", "bad limit");
        assert_eq!(e.header("ReqID"), Some("l"), "limit {bad:?}");
    }
}

/// notes-21: "`too many grants`: a connection already holds `max_subscriptions` grants;
/// the error goes to the granting service, the grant is not made."
#[test]
fn too_many_grants_goes_to_the_granting_service_and_grants_nothing() {
    let s = Server::start(&["--max-subscriptions", "3"]);
    let mut svc = Peer::service(s.addr);
    let mut svc2 = Peer::service(s.addr);
    let mut c1 = Peer::client(s.addr);
    let mut c2 = Peer::client(s.addr);
    for t in ["a", "b", "c"] {
        for_cid(&mut svc, "ESUB", t, &c1.cid);
    }
    quiet(&mut svc, "three grants fit");
    for_cid(&mut svc, "ESUB", "d", &c1.cid);
    expect_error(&mut svc, "ESUB", "d", "too many grants");
    for_cid(&mut svc2, "ESUB", "e", &c1.cid);
    expect_error(&mut svc2, "ESUB", "e", "too many grants");
    quiet(&mut c1, "the connection is not told");
    for t in ["d", "e"] {
        c1.send("SUB", t, &[], "");
        expect_error(&mut c1, "SUB", t, "not permitted");
    }
    for t in ["a", "b", "c"] {
        accepted(&mut c1, "SUB", t);
    }
    // The cap is per connection.
    for_cid(&mut svc, "ESUB", "d", &c2.cid);
    quiet(&mut svc, "another connection has room");
    accepted(&mut c2, "SUB", "d");
    // A withdrawal makes room.
    for_cid(&mut svc, "DSUB", "a", &c1.cid);
    for_cid(&mut svc, "ESUB", "d", &c1.cid);
    quiet(&mut svc, "room again after a withdrawal");
    accepted(&mut c1, "SUB", "d");
}
