//! The real binary, as a user runs it: generated keys, environment keys, refusal to
//! expose generated keys beyond loopback or to a cluster, and SIGTERM handling (close
//! 1001, exit 0).

mod common;

use common::proc::Proc;
use common::*;

#[test]
fn generated_keys_are_printed_and_work_then_sigterm_closes_1001_and_exits_0() {
    let mut p = Proc::start(&["--listen", "127.0.0.1:0"], &[]);
    let svc_line = p.wait_line("service key:");
    let cli_line = p.wait_line("client key:");
    assert!(
        svc_line.starts_with("out: "),
        "keys go to stdout: {svc_line}"
    );
    let svc_key = svc_line.rsplit(' ').next().unwrap().to_owned();
    let cli_key = cli_line.rsplit(' ').next().unwrap().to_owned();
    assert_eq!(svc_key.len(), 24);
    assert_ne!(svc_key, cli_key);
    let addr = p.addr();

    let mut svc = Peer::connect(addr, &svc_key);
    let mut cli = Peer::connect(addr, &cli_key);
    svc.send("ESUB", "room", &[], "");
    svc.sync();
    cli.send("SUB", "room", &[], "");
    cli.sync();
    svc.send("PUB", "room", &[], "hi");
    assert_eq!(cli.recv().body, "hi");

    p.sigterm();
    assert_eq!(svc.recv_close().0, 1001);
    assert_eq!(cli.recv_close().0, 1001);
    assert_eq!(p.wait_exit(), 0);
}

#[test]
fn refuses_generated_keys_on_a_non_loopback_address() {
    // Nothing is bound: the check happens before listening.
    let mut p = Proc::start(&["--listen", "0.0.0.0:0"], &[]);
    let l = p.wait_line("refusing to listen on non-loopback");
    assert!(l.contains("0.0.0.0"), "{l}");
    assert_ne!(p.wait_exit(), 0);
}

#[test]
fn refuses_generated_keys_in_a_cluster() {
    // Each node would generate its own keys, so a key would work on one node only: the
    // check happens before any key is generated or printed, and before listening or
    // connecting to nats-server (port 1: none is there).
    let mut p = Proc::start(
        &["--listen", "127.0.0.1:0", "--cluster", "nats://127.0.0.1:1"],
        &[],
    );
    let l = p.wait_line("refusing to join a cluster with generated keys");
    assert!(
        l.starts_with(
            "err: middleman: invalid configuration: cluster.nats (command line): no keys configured"
        ),
        "{l}"
    );
    for want in [
        "every node of a cluster needs the same service and client keys",
        "--service-key and --client-key",
        "MM_SERVICE_KEY / MM_CLIENT_KEY",
        "[[keys]] in the configuration file",
    ] {
        assert!(l.contains(want), "no {want:?} in {l}");
    }
    assert_ne!(p.wait_exit(), 0);
    let lines = p.output_after_exit();
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("service key:") || l.contains("listening on")),
        "{lines:?}"
    );
    // The same from the environment; configured keys make it start (it then only waits
    // for nats-server, reconnecting).
    let mut p = Proc::start(
        &["--listen", "127.0.0.1:0"],
        &[("MM_CLUSTER", "nats://127.0.0.1:1")],
    );
    p.wait_line("cluster.nats (environment): no keys configured");
    assert_ne!(p.wait_exit(), 0);
    let mut p = Proc::start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--cluster",
            "nats://127.0.0.1:1",
            "--service-key",
            SERVICE_KEY,
            "--client-key",
            CLIENT_KEY,
        ],
        &[],
    );
    let _ = p.addr();
    p.sigterm();
    assert_eq!(p.wait_exit(), 0);
}

#[test]
fn keys_from_environment_and_flags() {
    let p = Proc::start(
        &["--listen", "127.0.0.1:0", "--client-key", "flag-client"],
        &[("MM_SERVICE_KEY", "env-svc-1,env-svc-2")],
    );
    let addr = p.addr();
    let mut a = Peer::connect(addr, "env-svc-1");
    let mut b = Peer::connect(addr, "env-svc-2");
    let mut c = Peer::connect(addr, "flag-client");
    a.send("EPUB", "t", &[], "");
    a.sync();
    b.send("SUB", "t", &[], "");
    b.sync();
    c.send("PUB", "t", &[], "from client");
    assert_eq!(b.recv().body, "from client");
    let mut bad = ws_connect(addr);
    bad.send(tungstenite::Message::text("nope")).unwrap();
    assert_eq!(recv_close(&mut bad), (1008, "bad key".to_owned()));
}

/// A stalled subscriber sent `n` numbered messages now reads: a prefix 0..k (0 < k <
/// n) without gaps, then close 1008 "slow consumer"; and the server's peak RSS was at
/// most 16 MiB over `baseline` for its 4 MiB cap.
fn cut_off_with_bounded_memory(stalled: &mut Peer, n: usize, baseline: u64, peak: u64) {
    let next = prefix_then_slow_consumer_close(stalled);
    assert!(next > 0 && next < n, "prefix of {next} messages");
    let growth_mib = peak.saturating_sub(baseline) / 1024;
    println!("stalled got {next}/{n}; server RSS baseline {baseline} KiB, peak {peak} KiB, growth {growth_mib} MiB");
    assert!(
        growth_mib <= 16,
        "server memory grew {growth_mib} MiB for a 4 MiB cap"
    );
}

/// A stalled subscriber now reads: a prefix 0..k of numbered messages without gaps,
/// then close 1008 "slow consumer". Returns k.
fn prefix_then_slow_consumer_close(stalled: &mut Peer) -> usize {
    let mut next = 0usize;
    let (code, reason) = loop {
        match stalled.ws.read() {
            Ok(tungstenite::Message::Text(t)) => {
                let m = parse_one(t.as_bytes());
                let seq: usize = m.body.split(' ').next().unwrap().parse().unwrap();
                assert_eq!(seq, next, "stalled subscriber: gap in the stream");
                next += 1;
            }
            Ok(tungstenite::Message::Close(Some(f))) => {
                break (u16::from(f.code), f.reason.to_string())
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(e) => panic!("stalled subscriber: {e} after {next} messages"),
        }
    };
    assert_eq!((code, reason.as_str()), (1008, "slow consumer"));
    next
}

/// The same for a subscriber alone on its topic (a message to one receiver is built in
/// that receiver's own queue, not shared): a gap-free prefix, close 1008, bounded memory.
#[test]
fn a_lone_slow_subscriber_is_cut_off_without_gaps() {
    let p = Proc::server();
    let addr = p.addr();
    let mut publisher = Peer::service(addr);
    let mut stalled = Peer::service(addr);
    stalled.send("SUB", "solo", &[], "");
    stalled.sync();
    let baseline = common::proc::rss_kib(p.child.id(), "VmRSS:");
    const N: usize = 40_000;
    let pad = "x".repeat(1000);
    for i in 0..N {
        publisher.send("PUB", "solo", &[], &format!("{i} {pad}"));
    }
    publisher.sync(); // every message above was handled
    let peak = common::proc::rss_kib(p.child.id(), "VmHWM:");
    cut_off_with_bounded_memory(&mut stalled, N, baseline, peak);
}

/// §7 slow consumer: one stalled subscriber, one fast one, a publisher pushing 40 MB.
/// The fast one gets everything in order; the stalled one gets a gap-free prefix and
/// then close 1008; the server's memory stays near the 4 MiB cap.
#[test]
fn slow_consumer_is_cut_off_without_gaps_and_memory_stays_bounded() {
    let p = Proc::server();
    let addr = p.addr();
    let mut publisher = Peer::service(addr);
    let mut stalled = Peer::service(addr);
    let mut fast = Peer::service(addr);
    for s in [&mut stalled, &mut fast] {
        s.send("SUB", "firehose", &[], "");
        s.sync();
    }
    let baseline = common::proc::rss_kib(p.child.id(), "VmRSS:");
    const N: usize = 40_000;
    let pad = "x".repeat(1000);
    let reader = std::thread::spawn(move || {
        let mut seen = 0usize;
        while seen < N {
            let m = fast.recv();
            let seq: usize = m.body.split(' ').next().unwrap().parse().unwrap();
            assert_eq!(seq, seen, "fast subscriber: out of order or gap");
            seen += 1;
        }
        seen
    });
    for i in 0..N {
        publisher.send("PUB", "firehose", &[], &format!("{i} {pad}"));
    }
    assert_eq!(reader.join().unwrap(), N);
    let peak = common::proc::rss_kib(p.child.id(), "VmHWM:");
    cut_off_with_bounded_memory(&mut stalled, N, baseline, peak);
}
