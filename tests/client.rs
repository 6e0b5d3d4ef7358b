//! The Rust client library (`middleman::client`) against the real server, in-process on
//! 127.0.0.1:0: every call, the errors it surfaces, and what it keeps for `recv`.
//!
//! No sleeps: "nothing more arrived" is shown with a round trip (`sync`, a WebSocket
//! ping the server answers after everything it queued earlier).

mod common;
use common::{TestServer, CLIENT_KEY, SERVICE_KEY};

use std::time::{Duration, Instant};

use middleman::client::{Client, Error, Message, Reply, ServerError, Service};

const WAIT: Duration = Duration::from_secs(5);

fn url(srv: &TestServer) -> String {
    srv.url()
}

fn service(srv: &TestServer) -> Client {
    Client::connect(&url(srv), SERVICE_KEY).expect("service connects")
}

fn client(srv: &TestServer) -> Client {
    Client::connect(&url(srv), CLIENT_KEY).expect("client connects")
}

fn headers(m: &Message) -> Vec<(&str, &str)> {
    m.headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect()
}

/// Nothing is queued for `c`: a round trip brings nothing.
fn quiet(c: &mut Client) {
    c.sync().expect("sync");
    assert_eq!(c.recv_timeout(Duration::ZERO).expect("recv"), None);
}

fn server_error(e: Error) -> ServerError {
    match e {
        Error::Server(s) => s,
        other => panic!("expected a server error, got {other:?}"),
    }
}

#[test]
fn connect_gives_a_cid_and_refuses_bad_keys_and_urls() {
    let srv = TestServer::start();
    let a = service(&srv);
    let b = client(&srv);
    for c in [a.cid(), b.cid()] {
        assert!(
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        );
    }
    assert_ne!(a.cid(), b.cid());

    let e = Client::connect(&url(&srv), "wrong").unwrap_err();
    assert!(matches!(e, Error::BadKey), "{e:?}");
    assert_eq!(e.exit_code(), 3);

    let e = Client::connect(&format!("wss://{}/", srv.addr), SERVICE_KEY).unwrap_err();
    assert!(matches!(e, Error::Url(_)), "{e:?}");
    assert_eq!(e.exit_code(), 2);

    // A port nobody listens on (bound, then released).
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let e = Client::connect(&format!("ws://127.0.0.1:{port}/"), SERVICE_KEY).unwrap_err();
    assert!(matches!(e, Error::Connect(_)), "{e:?}");
    assert_eq!(e.exit_code(), 3);

    // Plain HTTP server answer to the upgrade (not a WebSocket): a handshake error.
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let haddr = http.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = http.accept().unwrap();
        let mut buf = [0u8; 2048];
        let _ = s.read(&mut buf);
        let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
    });
    let e = Client::connect(&format!("ws://{haddr}/"), SERVICE_KEY).unwrap_err();
    assert!(
        matches!(e, Error::Handshake(ref s) if s.contains("404")),
        "{e:?}"
    );
    t.join().unwrap();
}

#[test]
fn subscribe_publish_recv_with_headers_and_exact_body() {
    let srv = TestServer::start();
    let mut svc = service(&srv);
    let mut cli = client(&srv);
    svc.enable_subscribe("news").unwrap();
    cli.subscribe("news").unwrap();

    let body = ".dot first\n..two dots\r\ncrlf kept\n.";
    svc.publish("news", &[("X-Lang", "en"), ("x-lang", "de")], body)
        .unwrap();
    let m = cli.recv().unwrap();
    assert_eq!((m.cmd.as_str(), m.target.as_str()), ("PUB", "news"));
    assert_eq!(
        headers(&m),
        vec![
            ("X-Lang", "en"),
            ("x-lang", "de"),
            ("cid", svc.cid()),
            ("uid", "")
        ]
    );
    assert_eq!(m.body, body.as_bytes());
    assert_eq!(m.header("X-LANG"), Some("en"));
    assert_eq!(m.cid(), Some(svc.cid()));
    assert_eq!(m.uid(), Some(""));
    assert_eq!(m.error(), None);

    // Binary (non-UTF-8) bodies go through untouched.
    svc.publish("news", &[], [0xff, 0x00, b'.', b'\n', b'.', 0xfe])
        .unwrap();
    assert_eq!(
        cli.recv().unwrap().body,
        vec![0xff, 0x00, b'.', b'\n', b'.', 0xfe]
    );

    // The sender gets its own message when subscribed (services may subscribe to anything).
    svc.subscribe("news").unwrap();
    svc.publish("news", &[], "").unwrap();
    assert_eq!(svc.recv().unwrap().body, b"");
    assert_eq!(cli.recv().unwrap().body, b"");
    quiet(&mut cli);
    quiet(&mut svc);
}

#[test]
fn unsubscribe_stops_delivery() {
    let srv = TestServer::start();
    let mut svc = service(&srv);
    let mut cli = client(&srv);
    svc.enable_subscribe("a").unwrap();
    svc.enable_subscribe("b").unwrap();
    cli.subscribe("a").unwrap();
    cli.subscribe("b").unwrap();
    cli.unsubscribe("a").unwrap();
    svc.publish("a", &[], "gone").unwrap();
    svc.publish("b", &[], "kept").unwrap();
    let m = cli.recv().unwrap();
    assert_eq!((m.target.as_str(), m.body_text().as_ref()), ("b", "kept"));
    quiet(&mut cli);
    // Unsubscribing from something never subscribed is not an error.
    cli.unsubscribe("never").unwrap();
}

#[test]
fn refusals_are_typed_server_errors() {
    let srv = TestServer::start();
    let mut svc = service(&srv);
    let mut cli = client(&srv);

    let e = server_error(cli.subscribe("secret").unwrap_err());
    assert_eq!(
        e,
        ServerError {
            reason: "not permitted".into(),
            cmd: "SUB".into(),
            target: "secret".into(),
            reqid: None
        }
    );
    assert_eq!(e.to_string(), "not permitted: SUB secret");
    for (r, cmd) in [
        (cli.enable_publish("x"), "EPUB"),
        (cli.enable_subscribe("x"), "ESUB"),
        (cli.enable_requests("x"), "EREQ"),
        (cli.set_uid(svc.cid(), "u"), "INT"),
    ] {
        let e = server_error(r.unwrap_err());
        assert_eq!((e.reason.as_str(), e.cmd.as_str()), ("not permitted", cmd));
    }
    let e = server_error(svc.set_uid("nosuchcid", "u").unwrap_err());
    assert_eq!(e.reason, "unknown cid");

    // A refused publish does not wait: its error comes from recv.
    cli.publish("closed", &[], "x").unwrap();
    cli.sync().unwrap();
    let m = cli
        .recv_timeout(Duration::ZERO)
        .unwrap()
        .expect("the error");
    assert_eq!(
        m.error(),
        Some(ServerError {
            reason: "not permitted".into(),
            cmd: "PUB".into(),
            target: "closed".into(),
            reqid: None
        })
    );
    quiet(&mut cli);
    // The connection stays usable.
    svc.enable_subscribe("open").unwrap();
    cli.subscribe("open").unwrap();
}

#[test]
fn arguments_the_protocol_cannot_carry_are_refused_before_sending() {
    let srv = TestServer::start();
    let mut svc = service(&srv);
    svc.subscribe("t").unwrap();
    let cases: Vec<Result<(), Error>> = vec![
        svc.publish("t\r\nPUB x", &[], "b"),
        svc.publish("", &[], "b"),
        svc.publish(" t", &[], "b"),
        svc.publish("t", &[("A", "1\r\nrid: 3")], "b"),
        svc.publish("t", &[("A:B", "1")], "b"),
        svc.request("t", &[("reqid", "mine")], "b", WAIT)
            .map(|_| ()),
        svc.send("P B", "t", &[], b""),
    ];
    for r in cases {
        let e = r.unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e:?}");
        assert_eq!(e.exit_code(), 2);
    }
    quiet(&mut svc);
}

#[test]
fn private_channel_and_uid() {
    let srv = TestServer::start();
    let mut svc = service(&srv);
    let mut cli = client(&srv);
    svc.publish(&format!("MSG:{}", cli.cid()), &[("K", "v")], "just you")
        .unwrap();
    let m = cli.recv().unwrap();
    assert_eq!(m.target, format!("MSG:{}", cli.cid()));
    assert_eq!(
        headers(&m),
        vec![("K", "v"), ("cid", svc.cid()), ("uid", "")]
    );
    assert_eq!(m.body, b"just you");

    svc.set_uid(cli.cid(), "alice").unwrap();
    svc.enable_publish("room").unwrap();
    svc.subscribe("room").unwrap();
    cli.publish("room", &[], "hi").unwrap();
    let m = svc.recv().unwrap();
    assert_eq!((m.cid(), m.uid()), (Some(cli.cid()), Some("alice")));
}

#[test]
fn request_answered_by_a_service() {
    let srv = TestServer::start();
    let mut svc = Service::connect(&url(&srv), SERVICE_KEY).unwrap();
    svc.listen("upper").unwrap();
    let stop = svc.client().closer();
    let svc_cid = svc.client().cid().to_owned();
    let t = std::thread::spawn(move || {
        svc.respond("upper", |req: &Message| {
            Reply::new(req.body_text().to_uppercase())
                .header("Seen-Trace", req.header("trace").unwrap_or("-"))
                .header(
                    "Seen-Rid",
                    if req.header("rid").is_some() {
                        "yes"
                    } else {
                        "no"
                    },
                )
        })
    });
    let mut cli = client(&srv);
    for i in 0..3 {
        let res = cli
            .request("upper", &[("Trace", &i.to_string())], "a.b\n.c", WAIT)
            .unwrap();
        assert_eq!((res.cmd.as_str(), res.target.as_str()), ("RES", "upper"));
        assert_eq!(
            headers(&res),
            vec![
                ("Seen-Trace", i.to_string().as_str()),
                ("Seen-Rid", "yes"),
                ("ReqID", format!("r{}", i + 1).as_str()),
                ("cid", svc_cid.as_str()),
                ("uid", ""),
            ]
        );
        assert_eq!(res.body, b"A.B\n.C");
    }
    quiet(&mut cli);
    stop.close();
    t.join()
        .unwrap()
        .expect("respond ends with Ok when closed by its Closer");
}

#[test]
fn request_without_responder_is_an_error() {
    let srv = TestServer::start();
    let mut svc = service(&srv);
    let e = server_error(svc.request("nobody", &[], "x", WAIT).unwrap_err());
    assert_eq!(
        e,
        ServerError {
            reason: "no responder".into(),
            cmd: "REQ".into(),
            target: "nobody".into(),
            reqid: Some("r1".into())
        }
    );
    assert_eq!(Error::Server(e).exit_code(), 1);
    quiet(&mut svc);
}

#[test]
fn messages_arriving_during_a_request_are_kept_for_recv() {
    let srv = TestServer::start();
    let mut responder = service(&srv);
    responder.enable_requests("slow").unwrap();
    responder.enable_subscribe("side").unwrap();
    let mut cli = client(&srv);
    cli.subscribe("side").unwrap();
    let t = std::thread::spawn(move || {
        let res = cli.request("slow", &[], "q", WAIT);
        (cli, res)
    });
    let req = responder.recv().unwrap();
    assert_eq!((req.cmd.as_str(), req.target.as_str()), ("REQ", "slow"));
    responder.publish("side", &[], "one").unwrap();
    responder.publish("side", &[], "two").unwrap();
    responder.reply(&req, &[], "answer").unwrap();
    let (mut cli, res) = t.join().unwrap();
    assert_eq!(res.unwrap().body, b"answer");
    assert_eq!(cli.recv().unwrap().body, b"one");
    assert_eq!(cli.recv().unwrap().body, b"two");
    quiet(&mut cli);
}

#[test]
fn local_timeout_then_the_late_answer_is_dropped() {
    let srv = TestServer::start();
    let mut responder = service(&srv);
    responder.enable_requests("sleepy").unwrap();
    let mut cli = client(&srv);
    let started = Instant::now();
    let e = cli
        .request("sleepy", &[], "q", Duration::from_millis(300))
        .unwrap_err();
    assert!(matches!(e, Error::Timeout), "{e:?}");
    assert_eq!(e.exit_code(), 4);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(started.elapsed() < WAIT);

    let req = responder.recv().unwrap();
    responder.reply(&req, &[], "too late").unwrap();
    responder.sync().unwrap(); // the server has routed the RES to cli
    quiet(&mut cli); // ... and cli dropped it

    // The next request works normally.
    let t = std::thread::spawn(move || {
        let req = responder.recv().unwrap();
        responder.reply(&req, &[], "on time").unwrap();
        responder
    });
    assert_eq!(
        cli.request("sleepy", &[], "q", WAIT).unwrap().body,
        b"on time"
    );
    t.join().unwrap();
}

#[test]
fn server_timeout_is_a_server_error_with_exit_code_4() {
    let srv = TestServer::with(|c| c.request_timeout = Duration::from_millis(200));
    let mut responder = service(&srv);
    responder.enable_requests("never").unwrap();
    let mut cli = client(&srv);
    let e = cli.request("never", &[], "q", WAIT).unwrap_err();
    assert_eq!(e.exit_code(), 4);
    let e = server_error(e);
    assert_eq!(
        (e.reason.as_str(), e.reqid.as_deref()),
        ("request timed out", Some("r1"))
    );
    assert_eq!(responder.recv().unwrap().cmd, "REQ");
}

#[test]
fn responder_that_disconnects_fails_the_request() {
    let srv = TestServer::start();
    let mut responder = service(&srv);
    responder.enable_requests("flaky").unwrap();
    let mut cli = client(&srv);
    let t = std::thread::spawn(move || cli.request("flaky", &[], "q", WAIT));
    let req = responder.recv().unwrap();
    assert_eq!(req.target, "flaky");
    drop(responder);
    let e = server_error(t.join().unwrap().unwrap_err());
    assert_eq!(
        (e.reason.as_str(), e.cmd.as_str(), e.target.as_str()),
        ("responder disconnected", "REQ", "flaky")
    );
}

#[test]
fn closer_unblocks_recv_and_server_shutdown_is_a_close() {
    let srv = TestServer::start();
    let mut cli = client(&srv);
    let closer = cli.closer();
    let t = std::thread::spawn(move || cli.recv());
    closer.close();
    let e = t.join().unwrap().unwrap_err();
    assert!(matches!(e, Error::Closed { code: 1000, .. }), "{e:?}");

    let mut svc = Service::connect(&url(&srv), SERVICE_KEY).unwrap();
    svc.listen("x").unwrap();
    let mut plain = client(&srv);
    let t = std::thread::spawn(move || svc.respond("x", |_: &Message| ""));
    srv.stop().unwrap();
    let e = t.join().unwrap().unwrap_err();
    assert!(
        matches!(e, Error::Closed { code: 1001, .. }),
        "respond: {e:?}"
    );
    let e = plain.recv().unwrap_err();
    assert!(matches!(e, Error::Closed { code: 1001, .. }), "recv: {e:?}");
    assert_eq!(e.exit_code(), 3);
    // Once closed, every call says so.
    let e = plain.publish("t", &[], "x").unwrap_err();
    assert!(matches!(e, Error::Closed { code: 1001, .. }), "{e:?}");
}

#[test]
fn recv_timeout_and_close() {
    let srv = TestServer::start();
    let mut cli = client(&srv);
    let started = Instant::now();
    assert_eq!(cli.recv_timeout(Duration::from_millis(100)).unwrap(), None);
    assert!(started.elapsed() >= Duration::from_millis(100));
    cli.close().unwrap();
}
