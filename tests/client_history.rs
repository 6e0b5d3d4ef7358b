//! The Rust client library and history topics (PROTOCOL.md §9.5): `subscribe_since`, the
//! positions handed out by `recv`, and `resume` after the connection was cut mid-stream,
//! against the real server in-process on 127.0.0.1:0.

mod common;
use common::{TestServer, CLIENT_KEY, SERVICE_KEY};

use std::time::Duration;

use middleman::client::{Client, Error, Position, Recovery, Since};
use middleman::core::history::{HistoryRule, HistorySettings};

const WAIT: Duration = Duration::from_secs(5);

fn with_history(size: usize) -> TestServer {
    TestServer::with(|cfg| {
        cfg.history = HistorySettings {
            rules: vec![HistoryRule {
                prefix: "h.".into(),
                size,
                ttl: Duration::from_secs(3600),
            }],
            max_bytes: 64 << 20,
        };
    })
}

fn next(c: &mut Client) -> middleman::client::Message {
    c.recv_timeout(WAIT)
        .expect("recv")
        .expect("a message in time")
}

#[test]
fn subscribe_since_replays_then_returns_the_recovery_and_recv_tracks_positions() {
    let srv = with_history(10);
    let mut svc = Client::connect(&srv.url(), SERVICE_KEY).unwrap();
    svc.enable_subscribe("h.x").unwrap();
    svc.enable_subscribe("plain").unwrap();
    for i in 0..3 {
        svc.publish("h.x", &[], i.to_string()).unwrap();
    }
    svc.sync().unwrap();

    let mut c = Client::connect(&srv.url(), CLIENT_KEY).unwrap();
    let rec = c.subscribe_since("h.x", &Since::Last).unwrap();
    assert!(rec.recovered && rec.topic == "h.x", "{rec:?}");
    assert!(c.positions().is_empty(), "nothing handed out yet");
    let m = next(&mut c);
    assert_eq!(m.body_text(), "2");
    let pos = m.position().expect("a position");
    assert_eq!(rec.position.as_ref(), Some(&pos));
    assert_eq!(c.positions().get("h.x"), Some(&pos));
    assert_eq!(pos.to_string().parse::<Position>(), Ok(pos.clone()));

    // From a position: what came after it; SYS:RECOVERY does not come from recv.
    let mut d = Client::connect(&srv.url(), CLIENT_KEY).unwrap();
    let first = Position {
        epoch: pos.epoch.clone(),
        offset: pos.offset - 2,
    };
    let rec = d.subscribe_since("h.x", &Since::After(first)).unwrap();
    assert_eq!(
        rec,
        Recovery {
            topic: "h.x".into(),
            recovered: true,
            position: Some(pos.clone()),
        }
    );
    assert_eq!(next(&mut d).body_text(), "1");
    assert_eq!(next(&mut d).body_text(), "2");
    d.sync().unwrap();
    assert_eq!(d.recv_timeout(Duration::ZERO).unwrap(), None);

    // Errors: already subscribed, bad since.
    let e = d.subscribe_since("h.x", &Since::Last).unwrap_err();
    assert!(
        matches!(&e, Error::Server(s) if s.reason == "already subscribed"),
        "{e:?}"
    );
    let e = svc
        .send("SUB", "h.y", &[("since", "nonsense")], b"")
        .and_then(|()| svc.sync())
        .map(|()| svc.recv_timeout(WAIT));
    let err = e.unwrap().unwrap().unwrap().error().expect("an error");
    assert_eq!(err.reason, "bad since");

    // Gone from the ring (size 10): not recovered; the position is the current one.
    for i in 3..30 {
        svc.publish("h.x", &[], i.to_string()).unwrap();
    }
    svc.sync().unwrap();
    let mut late = Client::connect(&srv.url(), CLIENT_KEY).unwrap();
    let old = Position {
        epoch: pos.epoch.clone(),
        offset: pos.offset,
    };
    let rec = late.subscribe_since("h.x", &Since::After(old)).unwrap();
    assert!(!rec.recovered, "{rec:?}");
    let now = rec.position.clone().expect("the current position");
    assert!(now.offset > pos.offset && now.epoch == pos.epoch);
    assert_eq!(late.positions().get("h.x"), Some(&now));
    late.sync().unwrap();
    assert_eq!(late.recv_timeout(Duration::ZERO).unwrap(), None);

    // A topic without history: not recovered, no position.
    let rec = late.subscribe_since("plain", &Since::Last).unwrap();
    assert_eq!((rec.recovered, rec.position), (false, None));
}

#[test]
fn resume_after_the_socket_is_cut_mid_stream_hands_out_every_message_once_in_order() {
    let srv = with_history(10_000);
    let mut svc = Client::connect(&srv.url(), SERVICE_KEY).unwrap();
    svc.enable_subscribe("h.seq").unwrap();
    svc.enable_subscribe("plain").unwrap();
    let mut c = Client::connect(&srv.url(), CLIENT_KEY).unwrap();
    c.subscribe("h.seq").unwrap();
    c.subscribe("plain").unwrap(); // no history: subscribed again, without since

    const N: usize = 400;
    let publisher = std::thread::spawn(move || {
        for i in 0..N {
            svc.publish("h.seq", &[], i.to_string()).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        svc.sync().unwrap();
        svc
    });
    let mut got = Vec::new();
    let mut resumed = Vec::new();
    while got.len() < N {
        match c.recv_timeout(WAIT) {
            Ok(Some(m)) => {
                assert_eq!(m.target, "h.seq", "{m:?}");
                got.push(m.body_text().parse::<usize>().unwrap());
                if got.len() == 50 || got.len() == 200 {
                    c.closer().close(); // the socket goes; the Client stays
                }
            }
            Ok(None) => panic!("nothing within {WAIT:?} after {}", got.len()),
            Err(Error::Closed { .. }) => {
                let cid = c.cid().to_owned();
                let recs = c.resume().expect("resume");
                assert_ne!(c.cid(), cid);
                assert_eq!(recs.len(), 1, "{recs:?}");
                assert!(recs[0].recovered && recs[0].topic == "h.seq", "{recs:?}");
                resumed.push(got.len());
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    let mut svc = publisher.join().unwrap();
    assert_eq!(got, (0..N).collect::<Vec<_>>());
    assert_eq!(resumed.len(), 2, "{resumed:?}");
    let pos = c.positions();
    assert_eq!(pos.len(), 1);
    assert!(pos.contains_key("h.seq"));

    // "plain" was subscribed again too.
    svc.enable_publish("plain").unwrap();
    svc.publish("plain", &[], "p").unwrap();
    let m = next(&mut c);
    assert_eq!((m.target.as_str(), m.body_text().as_ref()), ("plain", "p"));
    c.sync().unwrap();
    assert_eq!(c.recv_timeout(Duration::ZERO).unwrap(), None);
}
