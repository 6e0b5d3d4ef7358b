//! The Rust client library's protocol 1.1 calls (grants, `disable`, `subscribe_for`,
//! `kick`, `presence`, `events`) against the real server, in-process on 127.0.0.1:0.
//!
//! No sleeps: "nothing more arrived" is shown with a round trip (`sync`).

mod common;
use common::{TestServer, CLIENT_KEY, SERVICE_KEY};

use std::time::Duration;

use middleman::client::{
    Client, Error, Event, EventKind, Member, Presence, Right, ServerError, KICK_CODE,
};

const WAIT: Duration = Duration::from_secs(5);

fn service(srv: &TestServer) -> Client {
    Client::connect(&srv.url(), SERVICE_KEY).expect("service connects")
}

fn client(srv: &TestServer) -> Client {
    Client::connect(&srv.url(), CLIENT_KEY).expect("client connects")
}

/// Nothing is queued for `c`: a round trip brings nothing.
fn quiet(c: &mut Client) {
    c.sync().expect("sync");
    assert_eq!(c.recv_timeout(Duration::ZERO).expect("recv"), None);
}

fn server_error<T: std::fmt::Debug>(r: Result<T, Error>) -> ServerError {
    match r {
        Err(Error::Server(s)) => s,
        other => panic!("expected a server error, got {other:?}"),
    }
}

/// The next event about connection `cid` (others, e.g. the services' own, skipped).
fn next_event(c: &mut Client, cid: &str) -> Event {
    loop {
        let m = c
            .recv_timeout(WAIT)
            .expect("recv")
            .expect("an event in time");
        if let Some(e) = m.event() {
            if e.cid == cid {
                return e;
            }
        }
    }
}

#[test]
fn grant_revoke_and_disable() {
    let srv = TestServer::start();
    let mut svc = service(&srv);
    let mut a = client(&srv);
    let mut b = client(&srv);
    let a_cid = a.cid().to_owned();

    svc.grant(&a_cid, "room", Right::Sub).unwrap();
    a.subscribe("room").unwrap();
    let e = server_error(b.subscribe("room"));
    assert_eq!(
        (e.reason.as_str(), e.cmd.as_str()),
        ("not permitted", "SUB")
    );
    svc.publish("room", &[], "hi").unwrap();
    assert_eq!(a.recv_timeout(WAIT).unwrap().unwrap().body, b"hi");
    // Revoking the last right unsubscribes.
    svc.revoke(&a_cid, "room", Right::Sub).unwrap();
    svc.publish("room", &[], "after").unwrap();
    svc.sync().unwrap();
    quiet(&mut a);

    svc.grant(&a_cid, "up", Right::Pub).unwrap();
    svc.subscribe("up").unwrap();
    a.publish("up", &[], "x").unwrap();
    let m = svc.recv_timeout(WAIT).unwrap().unwrap();
    assert_eq!((m.target.as_str(), m.cid()), ("up", Some(a_cid.as_str())));
    svc.revoke(&a_cid, "up", Right::Pub).unwrap();

    // A grant to request makes the granting service no responder. (Without any
    // responder the server answers `no responder` whether or not the client may ask.)
    svc.grant(&a_cid, "ask", Right::Req).unwrap();
    let e = server_error(a.request("ask", &[], "", WAIT));
    assert_eq!(e.reason, "no responder");
    svc.revoke(&a_cid, "ask", Right::Req).unwrap();

    svc.enable_subscribe("open").unwrap();
    b.subscribe("open").unwrap();
    svc.disable("open", Right::Sub).unwrap();
    assert_eq!(server_error(a.subscribe("open")).reason, "not permitted");
    svc.enable_requests("svc.time").unwrap();
    svc.disable("svc.time", Right::Req).unwrap();
    let mut other = service(&srv);
    assert_eq!(
        server_error(other.request("svc.time", &[], "", WAIT)).reason,
        "no responder"
    );

    // A cid nobody has: no-op; one that is no cid: `bad cid`.
    svc.grant("zz0000000000", "room", Right::Sub).unwrap();
    let e = server_error(svc.grant("Not A Cid", "room", Right::Sub));
    assert_eq!(
        (e.reason.as_str(), e.cmd.as_str(), e.target.as_str()),
        ("bad cid", "ESUB", "room")
    );
    // Clients may do none of it.
    let svc_cid = svc.cid().to_owned();
    assert_eq!(
        server_error(a.grant(&svc_cid, "t", Right::Sub)).reason,
        "not permitted"
    );
    assert_eq!(
        server_error(a.disable("t", Right::Pub)).reason,
        "not permitted"
    );
}

#[test]
fn subscribe_for_kick_and_presence() {
    let srv = TestServer::start();
    let mut svc = service(&srv);
    let mut a = client(&srv);
    let mut b = client(&srv);
    let (a_cid, b_cid) = (a.cid().to_owned(), b.cid().to_owned());

    svc.set_uid(&a_cid, "alice").unwrap();
    svc.subscribe_for(&a_cid, "news").unwrap();
    svc.subscribe_for(&b_cid, "news").unwrap();
    svc.publish("news", &[], "one").unwrap();
    assert_eq!(a.recv_timeout(WAIT).unwrap().unwrap().body, b"one");
    assert_eq!(b.recv_timeout(WAIT).unwrap().unwrap().body, b"one");

    let p = svc.presence("news", 1000).unwrap();
    let mut want = vec![
        Member {
            cid: a_cid.clone(),
            uid: "alice".into(),
        },
        Member {
            cid: b_cid.clone(),
            uid: String::new(),
        },
    ];
    want.sort_by(|x, y| x.cid.as_bytes().cmp(y.cid.as_bytes()));
    assert_eq!(
        p,
        Presence {
            count: 2,
            users: 1,
            members: want.clone(),
            truncated: false,
            partial: false
        }
    );
    let p1 = svc.presence("news", 1).unwrap();
    assert_eq!(
        (p1.count, p1.members, p1.truncated),
        (2, want[..1].to_vec(), true)
    );
    assert!(svc.presence("news", 0).unwrap().members.is_empty());
    assert_eq!(
        server_error(a.presence("news", 10)).reason,
        "not permitted",
        "a client asks for presence"
    );

    svc.unsubscribe_for(&b_cid, "news").unwrap();
    svc.publish("news", &[], "two").unwrap();
    svc.sync().unwrap();
    quiet(&mut b);
    assert_eq!(a.recv_timeout(WAIT).unwrap().unwrap().body, b"two");
    let e = server_error(svc.subscribe_for(&b_cid, "SYS:CONNECT"));
    assert_eq!(
        (e.reason.as_str(), e.cmd.as_str(), e.target.as_str()),
        ("not permitted", "INT", "SUB")
    );
    assert_eq!(
        server_error(svc.subscribe_for("BAD!", "x")).reason,
        "bad cid"
    );

    svc.kick(&a_cid, Some("bye now")).unwrap();
    match a.recv_timeout(WAIT) {
        Err(e @ Error::Closed { .. }) => {
            assert!(e.is_kicked());
            assert!(
                matches!(e, Error::Closed { code: KICK_CODE, ref reason } if reason == "bye now")
            );
        }
        other => panic!("expected the kick, got {other:?}"),
    }
    svc.kick(&b_cid, None).unwrap();
    match b.recv_timeout(WAIT) {
        Err(Error::Closed { code, reason }) => {
            assert_eq!((code, reason.as_str()), (4000, "kicked"))
        }
        other => panic!("expected the kick, got {other:?}"),
    }
    svc.kick("zz0000000000", None).unwrap(); // not connected: no-op
}

#[test]
fn events_of_every_kind() {
    let srv = TestServer::start();
    let mut svc = service(&srv);
    svc.events(&[]).unwrap();
    let mut gone = service(&srv);
    gone.events(&[EventKind::Disconnect]).unwrap();

    let c = client(&srv);
    let cid = c.cid().to_owned();
    let e = next_event(&mut svc, &cid);
    assert_eq!(
        (e.kind, e.role.as_str(), e.uid.as_str()),
        (EventKind::Connect, "client", "")
    );
    svc.set_uid(&cid, "carol").unwrap();
    svc.subscribe_for(&cid, "room").unwrap();
    let e = next_event(&mut svc, &cid);
    assert_eq!(
        (e.kind, e.uid.as_str(), e.topic.as_deref()),
        (EventKind::Sub, "carol", Some("room"))
    );
    svc.unsubscribe_for(&cid, "room").unwrap();
    let e = next_event(&mut svc, &cid);
    assert_eq!((e.kind, e.topic.as_deref()), (EventKind::Uns, Some("room")));
    svc.kick(&cid, None).unwrap();
    let e = next_event(&mut svc, &cid);
    assert_eq!(
        (e.kind, e.reason.as_deref()),
        (EventKind::Disconnect, Some("kicked"))
    );
    // Only the disconnect reached the service that asked for that kind alone.
    let e = next_event(&mut gone, &cid);
    assert_eq!((e.kind, e.uid.as_str()), (EventKind::Disconnect, "carol"));
    drop(c);

    let mut cl = client(&srv);
    assert_eq!(
        server_error(cl.events(&[EventKind::Connect])).reason,
        "not permitted"
    );
}
