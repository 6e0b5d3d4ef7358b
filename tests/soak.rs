//! Soak: minutes of mixed connect / subscribe / publish / request / disconnect against the
//! real binary. After warm-up the server's RSS must not grow, and when the load stops
//! its slab, subscriptions, topics and pending requests return to the idle baseline.
//!
//! Run: `cargo test --release --test soak -- --ignored soak --nocapture`
//! (`MM_SOAK_SECS` sets the length; default 120).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::proc::{rss_kib, Proc};
use common::*;

fn gauges(addr: SocketAddr) -> (f64, f64, f64, f64) {
    let m = metrics(addr);
    let conns: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("middleman_connections{"))
        .map(|(_, v)| v)
        .sum();
    (
        conns,
        m["middleman_subscriptions"],
        m["middleman_topics"],
        m["middleman_pending_requests"],
    )
}

#[test]
#[ignore = "minutes long (MM_SOAK_SECS, default 120): run it with --ignored soak; .ci/run skips it by name"]
fn soak() {
    let secs: u64 = std::env::var("MM_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let p = Proc::server();
    let addr = p.addr();
    let pid = p.child.id();
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));

    // A permanent service enabling the topics, and two responders.
    let mut enabler = Peer::service(addr);
    for t in 0..20 {
        enabler.send("ESUB", &format!("t{t}"), &[], "");
        enabler.send("EPUB", &format!("t{t}"), &[], "");
    }
    enabler.sync();
    // The enabler must answer the server's pings (by reading), or it is closed as idle
    // after 60 s and its enablements lapse.
    enabler
        .ws
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let enabler_stop = stop.clone();
    let enabler_thread = std::thread::spawn(move || {
        while !enabler_stop.load(Ordering::Relaxed) {
            match next_data(&mut enabler.ws) {
                Ok(_) => {}
                Err(e)
                    if e.contains("WouldBlock")
                        || e.contains("timed out")
                        || e.contains("Resource temporarily") => {}
                Err(e) => panic!("enabler: {e}"),
            }
        }
    });
    let mut responders = Vec::new();
    for _ in 0..2 {
        let stop = stop.clone();
        let mut r = Peer::service(addr);
        r.send("EREQ", "echo", &[], "");
        r.sync();
        r.ws.get_mut()
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        responders.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match next_data(&mut r.ws) {
                    Ok(d) => {
                        let m = parse_one(&d);
                        if m.cmd == "REQ" {
                            let rid = m.header("rid").unwrap().to_owned();
                            r.send("RES", "echo", &[("rid", &rid)], &m.body);
                        }
                    }
                    Err(e)
                        if e.contains("WouldBlock")
                            || e.contains("timed out")
                            || e.contains("Resource temporarily") => {}
                    Err(e) => panic!("responder: {e}"),
                }
            }
        }));
    }
    let idle = gauges(addr);

    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut workers = Vec::new();
    for w in 0..6u64 {
        let ops = ops.clone();
        workers.push(std::thread::spawn(move || {
            let mut i = 0u64;
            while Instant::now() < deadline {
                i += 1;
                let mut c = if (w + i).is_multiple_of(2) {
                    Peer::client(addr)
                } else {
                    Peer::service(addr)
                };
                let topics: Vec<String> = (0..3)
                    .map(|k| format!("t{}", (w * 7 + i * 3 + k) % 20))
                    .collect();
                for t in &topics {
                    c.send("SUB", t, &[], "");
                }
                for t in &topics {
                    c.send(
                        "PUB",
                        t,
                        &[("X-Seq", &i.to_string())],
                        "soak body\n.with a dot line",
                    );
                }
                let rq = format!("{w}-{i}");
                c.send("REQ", "echo", &[("ReqID", &rq)], "ping");
                // Read until our response; publications from others interleave.
                let until = Instant::now() + WAIT;
                loop {
                    assert!(Instant::now() < until, "no response for {rq}");
                    let m = c.recv();
                    if m.cmd == "RES" {
                        assert_eq!(m.header("ReqID"), Some(rq.as_str()));
                        assert_eq!(m.body, "ping");
                        break;
                    }
                }
                ops.fetch_add(8, Ordering::Relaxed);
                if i.is_multiple_of(3) {
                    // Leave with unread data and a reset now and then.
                    set_linger_reset(c.ws.get_ref());
                }
            }
        }));
    }

    let mut samples = Vec::new();
    let start = Instant::now();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs((secs / 12).max(1))); // sampling period
        let rss = rss_kib(pid, "VmRSS:");
        let g = gauges(addr);
        println!(
            "t={:>4}s rss={rss} KiB conns={} subs={} topics={} pending={} ops={}",
            start.elapsed().as_secs(),
            g.0,
            g.1,
            g.2,
            g.3,
            ops.load(Ordering::Relaxed)
        );
        samples.push(rss);
    }
    for w in workers {
        w.join().expect("worker");
    }
    // Settle: back to the idle baseline (bounded poll of the server's view).
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let g = gauges(addr);
        if g == idle {
            break;
        }
        assert!(Instant::now() < until, "after load {g:?} != idle {idle:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for r in responders {
        r.join().expect("responder");
    }
    enabler_thread.join().expect("enabler");
    let warm = samples[samples.len() / 4];
    let last = *samples.last().unwrap();
    println!(
        "ops={} rss after warm-up {warm} KiB, at end {last} KiB",
        ops.load(Ordering::Relaxed)
    );
    assert!(
        last <= warm + warm / 5 + 2048,
        "RSS grew after warm-up: {warm} -> {last} KiB"
    );
}
