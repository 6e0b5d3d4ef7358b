//! History and recovery on one node (PROTOCOL.md §9.5), over real sockets: offsets and
//! epoch on every delivery, recovery with `since: <epoch>:<offset>` and `since: last`,
//! `SYS:RECOVERY` between the replay and the live stream, nothing lost or doubled at
//! the switch while publishers keep going, a new epoch after a restart.

mod common;

use std::time::Duration;

use common::*;
use middleman::core::history::{HistoryRule, HistorySettings};

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

fn offset(m: &Msg) -> u64 {
    m.header("offset")
        .and_then(|o| o.parse().ok())
        .unwrap_or_else(|| panic!("no offset in {m:?}"))
}

/// Receive messages until `SYS:RECOVERY`; returns the replayed ones and the recovery.
fn until_recovery(p: &mut Peer) -> (Vec<Msg>, Msg) {
    let mut got = Vec::new();
    loop {
        let m = p.recv();
        if m.target == "SYS:RECOVERY" {
            return (got, m);
        }
        got.push(m);
    }
}

#[test]
fn a_subscriber_back_with_since_gets_exactly_what_it_missed_then_live() {
    let srv = with_history(1000);
    let mut sub = Peer::service(srv.addr);
    sub.send("SUB", "h.room", &[], "");
    sub.sync();
    let mut pubs: Vec<Peer> = (0..3).map(|_| Peer::service(srv.addr)).collect();
    pubs[0].send(
        "PUB",
        "h.room",
        &[("offset", "999"), ("epoch", "forged")],
        "first",
    );
    let first = sub.recv();
    assert_eq!(first.body, "first");
    let (epoch, seen) = (first.header("epoch").unwrap().to_owned(), offset(&first));
    assert_ne!(epoch, "forged");
    assert_eq!(
        first.headers_named("offset").len(),
        1,
        "the sender's offset is replaced"
    );
    assert!(epoch.bytes().all(|b| b.is_ascii_alphanumeric()));
    drop(sub);
    for i in 0..500 {
        let p = &mut pubs[i % 3];
        p.send("PUB", "h.room", &[("n", &i.to_string())], &format!("m{i}"));
    }
    for p in &mut pubs {
        p.sync();
    }
    let mut back = Peer::service(srv.addr);
    back.send(
        "SUB",
        "h.room",
        &[("since", &format!("{epoch}:{seen}"))],
        "",
    );
    let (replayed, rec) = until_recovery(&mut back);
    assert_eq!(replayed.len(), 500);
    // The 500, each once, in offset order; each publisher's own in the order it sent
    // them (the three interleave as the server read them).
    let mut last = seen;
    let mut per_pub = [None::<usize>; 3];
    let mut all: Vec<usize> = Vec::new();
    for m in &replayed {
        let i: usize = m.body[1..].parse().unwrap();
        assert!(per_pub[i % 3].is_none_or(|j| j < i), "publisher order");
        per_pub[i % 3] = Some(i);
        all.push(i);
        assert!(offset(m) > last, "offsets increase");
        last = offset(m);
        assert_eq!(m.header("epoch"), Some(epoch.as_str()));
    }
    all.sort_unstable();
    assert_eq!(all, (0..500).collect::<Vec<_>>());
    assert_eq!(rec.header("topic"), Some("h.room"));
    assert_eq!(rec.header("recovered"), Some("true"));
    assert_eq!(rec.header("epoch"), Some(epoch.as_str()));
    assert_eq!(rec.header("offset"), Some(last.to_string().as_str()));
    assert_eq!(
        rec.header("cid"),
        None,
        "the server's own message has no sender"
    );
    pubs[1].send("PUB", "h.room", &[], "live");
    let live = back.recv();
    assert_eq!(live.body, "live");
    assert!(offset(&live) > last);
    // `since: last`: the newest only.
    let mut newest = Peer::service(srv.addr);
    newest.send("SUB", "h.room", &[("since", "last")], "");
    let (got, rec) = until_recovery(&mut newest);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, "live");
    assert_eq!(rec.header("recovered"), Some("true"));
    assert_eq!(
        rec.header("offset"),
        Some(offset(&live).to_string().as_str())
    );
    // Already subscribed, bad since: errors, nothing done.
    newest.send("SUB", "h.room", &[("since", "last")], "");
    let e = newest.recv();
    assert_eq!(e.header("reason"), Some("already subscribed"));
    for bad in ["", "x", "e:", ":1", "e:1:2", "e:-1"] {
        newest.send("SUB", "h.other", &[("since", bad)], "");
        let e = newest.recv();
        assert_eq!(e.header("reason"), Some("bad since"), "{bad:?}");
    }
    // A topic without history: the SUB is done, preceded by recovered: false and no
    // position.
    newest.send("SUB", "plain", &[("since", "last")], "");
    let rec = newest.recv();
    assert_eq!(rec.target, "SYS:RECOVERY");
    assert_eq!(rec.header("recovered"), Some("false"));
    assert_eq!((rec.header("epoch"), rec.header("offset")), (None, None));
    pubs[2].send("PUB", "plain", &[], "p");
    assert_eq!(newest.recv().body, "p");
    let m = metrics(srv.addr);
    assert_eq!(m["middleman_history_messages"], 502.0);
    assert_eq!(m["middleman_recoveries_total{outcome=\"recovered\"}"], 1.0);
    assert_eq!(m["middleman_recoveries_total{outcome=\"last\"}"], 1.0);
}

#[test]
fn since_older_than_the_ring_or_another_epoch_is_not_recovered() {
    let srv = with_history(10);
    let mut p = Peer::service(srv.addr);
    let mut sub = Peer::service(srv.addr);
    sub.send("SUB", "h.t", &[], "");
    sub.sync();
    p.send("PUB", "h.t", &[], "0");
    let first = sub.recv();
    let epoch = first.header("epoch").unwrap().to_owned();
    for i in 1..30 {
        p.send("PUB", "h.t", &[], &i.to_string());
    }
    p.sync();
    let mut back = Peer::service(srv.addr);
    back.send(
        "SUB",
        "h.t",
        &[("since", &format!("{epoch}:{}", offset(&first)))],
        "",
    );
    let (got, rec) = until_recovery(&mut back);
    assert!(got.is_empty(), "no partial replay: {got:?}");
    assert_eq!(rec.header("recovered"), Some("false"));
    assert_eq!(rec.header("epoch"), Some(epoch.as_str()));
    let mut other = Peer::service(srv.addr);
    other.send("SUB", "h.t", &[("since", "Other1:1")], "");
    let (got, rec) = until_recovery(&mut other);
    assert!(got.is_empty());
    assert_eq!(rec.header("recovered"), Some("false"));
    // A restart draws a new epoch: a position from before is not recovered.
    drop((p, sub, back, other));
    srv.stop().unwrap();
    let srv = with_history(10);
    let mut back = Peer::service(srv.addr);
    back.send("SUB", "h.t", &[("since", &format!("{epoch}:1"))], "");
    let (got, rec) = until_recovery(&mut back);
    assert!(got.is_empty());
    assert_eq!(rec.header("recovered"), Some("false"));
    assert_ne!(rec.header("epoch"), Some(epoch.as_str()));
}

/// 10 rounds: a publisher keeps publishing while the subscriber leaves and comes back
/// with `since`; across the switch every offset arrives exactly once, in order.
#[test]
fn nothing_lost_or_doubled_at_the_switch_while_publishing() {
    let srv = with_history(100_000);
    let addr = srv.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let publisher = std::thread::spawn(move || {
        let mut p = Peer::service(addr);
        let mut n = 0u64;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) && n < 200_000 {
            p.send("PUB", "h.s", &[], &n.to_string());
            n += 1;
            if n.is_multiple_of(100) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        p.sync();
        n
    });
    let mut sub = Peer::service(srv.addr);
    sub.send("SUB", "h.s", &[], "");
    let mut bodies: Vec<u64> = Vec::new();
    let mut offsets: Vec<u64> = Vec::new();
    let mut epoch = String::new();
    for _round in 0..10 {
        // Read a few live messages, then leave and come back from the last one seen.
        for _ in 0..50 {
            let m = sub.recv();
            if m.target == "SYS:RECOVERY" {
                assert_eq!(m.header("recovered"), Some("true"), "{m:?}");
                continue;
            }
            epoch = m.header("epoch").unwrap().to_owned();
            offsets.push(offset(&m));
            bodies.push(m.body.parse().unwrap());
        }
        drop(sub);
        sub = Peer::service(srv.addr);
        let since = format!("{epoch}:{}", offsets.last().unwrap());
        sub.send("SUB", "h.s", &[("since", &since)], "");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let total = publisher.join().unwrap();
    // Drain up to the end (which the rounds may have read already: on a loaded machine
    // the publisher can be slow enough that its last message came in the last round).
    while bodies.last() != Some(&(total - 1)) {
        let m = sub.recv();
        if m.target == "SYS:RECOVERY" {
            assert_eq!(m.header("recovered"), Some("true"), "{m:?}");
            continue;
        }
        offsets.push(offset(&m));
        bodies.push(m.body.parse().unwrap());
    }
    let expect: Vec<u64> = (bodies[0]..total).collect();
    assert_eq!(bodies, expect, "every message once, in order");
    assert!(offsets.windows(2).all(|w| w[0] < w[1]));
}

/// A flood of unique history topics (100k topics x 10 messages) under a 16 MiB cap: the
/// stored bytes stay under the cap (plus the eighth a flood may pass it by between two
/// housekeeping passes), the process's memory with them, and the evictions are counted.
#[test]
fn a_flood_of_unique_history_topics_stays_under_the_byte_cap() {
    use common::proc::{rss_kib, Proc, SERVER_ARGS};
    let dir = std::env::temp_dir().join(format!("mm-history-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("h.toml");
    std::fs::write(
        &file,
        "[limits]\nmax_history_bytes = \"16MiB\"\n\n[[history]]\nprefix = \"m.\"\nsize = 10\nttl = \"1h\"\n",
    )
    .unwrap();
    let mut args: Vec<&str> = SERVER_ARGS.to_vec();
    let path = file.display().to_string();
    args.extend(["--config", &path]);
    let srv = Proc::start(&args, &[]);
    let addr = srv.addr();
    let mut p = Peer::service(addr);
    let body = "x".repeat(64);
    let send_topics = |p: &mut Peer, from: usize, to: usize| {
        for chunk in (from..to).collect::<Vec<_>>().chunks(200) {
            let mut raw = String::with_capacity(200 * 10 * 100);
            for t in chunk {
                for _ in 0..10 {
                    raw.push_str(&wire("PUB", &format!("m.{t}"), &[], &body));
                }
            }
            p.send_raw(&raw);
        }
        p.sync();
    };
    // A first 20k topics (the cap is reached), then the baseline.
    send_topics(&mut p, 0, 20_000);
    let pid = srv.child.id();
    let before = rss_kib(pid, "VmRSS:");
    send_topics(&mut p, 20_000, 100_000);
    let after = rss_kib(pid, "VmRSS:");
    let m = metrics(addr);
    let cap = 16.0 * 1024.0 * 1024.0;
    eprintln!(
        "100k topics x 10: RSS {before} -> {after} KiB, history {} bytes in {} messages of {} topics, {} evicted by the cap",
        m["middleman_history_bytes"],
        m["middleman_history_messages"],
        m["middleman_history_topics"],
        m["middleman_history_evictions_total{cause=\"bytes\"}"]
    );
    assert!(m["middleman_history_bytes"] <= cap * 1.125);
    assert_eq!(m["middleman_history_stored_total"], 1_000_000.0);
    let evicted = m["middleman_history_evictions_total{cause=\"bytes\"}"];
    assert_eq!(
        m["middleman_history_messages"]
            + evicted
            + m["middleman_history_evictions_total{cause=\"size\"}"],
        1_000_000.0,
        "every message stored is still there or counted as evicted"
    );
    assert!(evicted > 800_000.0, "{evicted}");
    // 80k more topics than the baseline, and the process grew by far less than their
    // 800k messages would take: the cap held.
    assert!(after < before + 24 * 1024, "RSS {before} -> {after} KiB");
    let _ = std::fs::remove_dir_all(&dir);
}
