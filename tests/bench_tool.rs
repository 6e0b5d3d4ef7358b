//! The load tool end to end: the real binary's `bench fanout` (in each load shape:
//! window, deep pipeline, many publishers, fixed load), `bench reqres` and `bench conns`
//! run briefly against an in-process server (`bench floor` without one) and must report
//! zero lost, zero out of order, the shape they ran and sane numbers.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestServer, SERVICE_KEY};

/// Longest one bench run may take.
const LIMIT: Duration = Duration::from_secs(60);

/// Run `middleman bench ARGS...`; returns (exit code, stdout).
fn bench(server: &TestServer, args: &[&str]) -> (i32, String) {
    bench_at(&server.url(), args)
}

/// Run `middleman bench ARGS... --url URL`; returns (exit code, stdout).
fn bench_at(url: &str, args: &[&str]) -> (i32, String) {
    let pid = std::process::id().to_string();
    let tail = ["--url", url, "--key", SERVICE_KEY, "--server-pid", &pid];
    let (code, out, _) = tool(&[&["bench"], args, &tail].concat());
    (code, out)
}

/// Run `middleman ARGS...` within [`LIMIT`]; returns (exit code, stdout, stderr).
fn tool(args: &[&str]) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_middleman"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn middleman bench");
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} did not finish within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        o.read_to_string(&mut out).expect("stdout");
    }
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err).expect("stderr");
    }
    println!("{out}{err}");
    (status.code().unwrap_or(-1), out, err)
}

/// The value of `key=` on the `result:` line.
fn field<'a>(out: &'a str, key: &str) -> &'a str {
    let line = out
        .lines()
        .find(|l| l.starts_with("result:"))
        .unwrap_or_else(|| panic!("no result line in {out}"));
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

fn num(out: &str, key: &str) -> f64 {
    field(out, key)
        .parse()
        .unwrap_or_else(|_| panic!("{key} is not a number in {out}"))
}

/// Each of `keys` on the result line is 0 (nothing lost, reordered, failed...).
fn assert_zero(out: &str, keys: &[&str]) {
    for k in keys {
        assert_eq!(field(out, k), "0", "{k}: {out}");
    }
}

#[test]
fn fanout_delivers_everything_in_order() {
    let server = TestServer::start();
    let (code, out) = bench(
        &server,
        &[
            "fanout",
            "--subs",
            "20",
            "--msgs",
            "3000",
            "--duration",
            "20s",
            "--threads",
            "2",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(field(&out, "shape"), "window256");
    assert_eq!(field(&out, "msgs_per_write"), "16");
    assert_eq!(field(&out, "sent"), "3000");
    assert_eq!(field(&out, "deliveries"), "60000");
    assert_zero(&out, &["lost", "out_of_order", "errors"]);
    assert!(num(&out, "deliveries_per_s") > 0.0);
    assert!(num(&out, "server_cpu_s") >= 0.0);
    let (p50, p99, max) = (
        num(&out, "p50_us"),
        num(&out, "p99_us"),
        num(&out, "max_us"),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{out}");

    // A fixed rate and a 1 KiB body.
    let (code, out) = bench(
        &server,
        &[
            "fanout", "--subs", "2", "--msgs", "200", "--rate", "1000", "--size", "1KiB",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(field(&out, "shape"), "fixed1k");
    assert_eq!(field(&out, "deliveries"), "400");
    assert_eq!(field(&out, "size"), "1024");
    assert!(num(&out, "elapsed_s") >= 0.15, "rate not applied: {out}");

    // Bodies larger than the server's 8 KiB line limit are sent as several lines.
    let (code, out) = bench(
        &server,
        &["fanout", "--subs", "2", "--msgs", "50", "--size", "64KiB"],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(field(&out, "deliveries"), "100");
}

/// Deep pipeline: whole messages packed into 16 KiB writes, bounded by deliveries in
/// flight rather than a window of messages.
#[test]
fn deep_pipeline_delivers_everything_in_order() {
    let server = TestServer::start();
    let (code, out) = bench(
        &server,
        &[
            "fanout",
            "--subs",
            "5",
            "--write-kib",
            "16",
            "--inflight",
            "20000",
            "--msgs",
            "20000",
            "--duration",
            "20s",
            "--threads",
            "2",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(field(&out, "shape"), "pipeline16k-inflight20k");
    assert_eq!(field(&out, "inflight"), "20000");
    // A 64 B body is ~90 bytes framed: far more than 16 messages per 16 KiB write.
    let per_write = num(&out, "msgs_per_write");
    assert!((100.0..=16384.0 / 64.0).contains(&per_write), "{out}");
    assert_eq!(field(&out, "sent"), "20000");
    assert_eq!(field(&out, "deliveries"), "100000");
    assert_zero(&out, &["lost", "out_of_order", "errors"]);
    assert!(num(&out, "server_cpu_util") >= 0.0);

    // --write-kib alone: 100000 deliveries in flight; 1 KiB bodies (1050 B framed), 15
    // per write.
    let (code, out) = bench(
        &server,
        &[
            "fanout",
            "--subs",
            "2",
            "--size",
            "1KiB",
            "--write-kib",
            "16",
            "--msgs",
            "3000",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(field(&out, "shape"), "pipeline16k");
    assert_eq!(field(&out, "inflight"), "100000");
    assert_eq!(field(&out, "msgs_per_write"), "15");
    assert_eq!(field(&out, "deliveries"), "6000");
    assert_zero(&out, &["lost", "out_of_order"]);
}

/// Many publishers, one topic each, their own subscribers: sequence numbers, losses
/// and reordering are checked per publisher.
#[test]
fn many_publishers_each_deliver_everything_in_order() {
    let server = TestServer::start();
    let (code, out) = bench(
        &server,
        &[
            "fanout",
            "--publishers",
            "20",
            "--subs",
            "3",
            "--msgs",
            "500",
            "--duration",
            "20s",
            "--threads",
            "2",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(field(&out, "shape"), "pubs20x3-window256");
    assert_eq!(field(&out, "publishers"), "20");
    assert_eq!(field(&out, "sent"), "10000");
    assert_eq!(field(&out, "deliveries"), "30000");
    assert_zero(&out, &["lost", "out_of_order", "bad_publishers", "errors"]);

    // The same in the deep-pipeline shape.
    let (code, out) = bench(
        &server,
        &[
            "fanout",
            "--publishers",
            "5",
            "--subs",
            "2",
            "--write-kib",
            "8",
            "--msgs",
            "2000",
            "--duration",
            "20s",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(field(&out, "shape"), "pubs5x2-pipeline8k");
    assert_eq!(field(&out, "deliveries"), "20000");
    assert_zero(&out, &["lost", "out_of_order", "bad_publishers"]);
}

/// Fixed load: the offered rate is held (achieved within 5% of it), and the result
/// line carries the server's CPU utilisation and the latency percentiles.
#[test]
fn fixed_load_holds_its_rate_and_reports_cost() {
    let server = TestServer::start();
    let (code, out) = bench(
        &server,
        &[
            "fanout",
            "--subs",
            "10",
            "--rate",
            "2000",
            "--duration",
            "1s",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(field(&out, "shape"), "fixed2k");
    assert_zero(&out, &["lost", "out_of_order"]);
    let achieved = num(&out, "achieved_rate");
    assert!(
        (1900.0..=2100.0).contains(&achieved),
        "offered 2000 msg/s, achieved {achieved}: {out}"
    );
    assert_eq!(
        field(&out, "rate_held"),
        if achieved >= 0.98 * 2000.0 {
            "yes"
        } else {
            "no"
        }
    );
    let sent = num(&out, "sent");
    assert!((1900.0..=2100.0).contains(&sent), "{out}");
    assert_eq!(num(&out, "deliveries"), sent * 10.0);
    // The test process is the server: some CPU, less than all of the machine.
    let util = num(&out, "server_cpu_util");
    assert!(util > 0.0 && util < 64.0, "{out}");
    let (p50, p99, p999) = (
        num(&out, "p50_us"),
        num(&out, "p99_us"),
        num(&out, "p999_us"),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= p999, "{out}");
    assert!(num(&out, "late_p99_us") >= 0.0);

    // A rate the flow control cannot allow (one message in flight, 100k/s) is flagged
    // as not held; nothing is lost, so the run itself succeeds.
    let (code, out) = bench(
        &server,
        &[
            "fanout",
            "--subs",
            "1",
            "--rate",
            "100000",
            "--window",
            "1",
            "--duration",
            "500ms",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(field(&out, "shape"), "fixed100k");
    assert_eq!(field(&out, "rate_held"), "no", "{out}");
    assert!(num(&out, "achieved_rate") < 98000.0, "{out}");
    assert!(out.contains("RATE NOT HELD"), "{out}");
}

/// `bench floor` needs no server: a relay process copies every message to every
/// subscriber socket; all arrive, in order, across reads that split them (100-byte
/// messages), and the result line has the fixed-load keys compare.sh tabulates.
#[test]
fn floor_relays_everything_and_reports_latency() {
    let (code, out, _) = tool(&[
        "bench",
        "floor",
        "--subs",
        "3",
        "--threads",
        "2",
        "--rate",
        "2000",
        "--duration",
        "500ms",
        "--size",
        "100",
    ]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(field(&out, "scenario"), "floor");
    assert_eq!(field(&out, "proto"), "floor");
    assert_eq!(field(&out, "shape"), "fixed2k");
    // 500 ms at 2000 msg/s: exactly 1000 scheduled messages, each to 3 subscribers.
    assert_eq!(num(&out, "sent"), 1000.0, "{out}");
    assert_eq!(num(&out, "deliveries"), 3000.0, "{out}");
    assert_zero(&out, &["lost", "out_of_order", "errors"]);
    let (p50, p99, p999) = (
        num(&out, "p50_us"),
        num(&out, "p99_us"),
        num(&out, "p999_us"),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= p999, "{out}");
    // The relay is one thread: some CPU, at most one core.
    let util = num(&out, "server_cpu_util");
    assert!((0.0..=1.05).contains(&util), "{out}");
    assert!(num(&out, "relay_cpu_s") >= 0.0);

    // A rate and a deep pipeline are different load shapes: a clear error, exit 2.
    let (code, out, err) = tool(&["bench", "floor", "--rate", "100", "--write-kib", "16"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("different load shapes"), "{err}");
}

/// `bench floor` without `--rate` measures throughput in `fanout`'s load shapes: the
/// publisher writes as fast as the shape's flow control allows, the relay copies every
/// read to every subscriber, and every message arrives exactly once, in order; the
/// result line has the keys compare.sh tabulates beside the fan-out rows.
#[test]
fn floor_throughput_delivers_everything_in_each_shape() {
    // (extra arguments, shape, messages per write): 100-byte messages, so writes and
    // reads split them (16 KiB holds 163 whole ones).
    let shapes: [(&[&str], &str, &str); 2] = [
        (&[], "window256", "16"),
        (
            &["--write-kib", "16", "--inflight", "20000"],
            "pipeline16k-inflight20k",
            "163",
        ),
    ];
    for (extra, shape, per_write) in shapes {
        let args = [
            &[
                "bench",
                "floor",
                "--subs",
                "5",
                "--threads",
                "2",
                "--duration",
                "500ms",
                "--size",
                "100",
            ][..],
            extra,
        ]
        .concat();
        let (code, out, _) = tool(&args);
        assert_eq!(code, 0, "{out}");
        assert_eq!(field(&out, "scenario"), "floor");
        assert_eq!(field(&out, "proto"), "floor");
        assert_eq!(field(&out, "shape"), shape);
        assert_eq!(field(&out, "msgs_per_write"), per_write);
        assert_zero(&out, &["lost", "out_of_order", "errors"]);
        let sent = num(&out, "sent");
        assert!(sent > 0.0, "{out}");
        assert_eq!(num(&out, "deliveries"), 5.0 * sent, "{out}");
        // Whole writes only.
        assert_eq!(
            sent % per_write.parse::<f64>().expect("number"),
            0.0,
            "{out}"
        );
        // Per relay CPU-second, under the key `fanout` uses, consistent with the CPU.
        let per_cpu = num(&out, "deliveries_per_server_cpu_s");
        let cpu = num(&out, "server_cpu_s");
        assert!(per_cpu > 0.0 && cpu > 0.0, "{out}");
        // (server_cpu_s= is rounded to the millisecond.)
        let expect = 5.0 * sent / cpu;
        let tolerance = 0.0006 / cpu + 0.001;
        assert!(
            (per_cpu / expect - 1.0).abs() < tolerance,
            "{per_cpu} vs {expect}: {out}"
        );
        assert!(num(&out, "relay_full") >= 0.0, "{out}");
        // A throughput row is not a fixed-load row (compare.sh tells them apart so).
        assert!(!out.contains("rate_held="), "{out}");
    }
}

#[test]
fn a_refused_publisher_is_reported() {
    // A message limit below the body size: the server closes the publisher (1009).
    let server = TestServer::with(|c| c.limits.max_message = 500);
    let (code, out) = bench(&server, &["fanout", "--msgs", "5", "--size", "1000"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("first error: publisher"), "{out}");
}

#[test]
fn reqres_answers_every_request_across_responders() {
    let server = TestServer::start();
    let (code, out) = bench(
        &server,
        &[
            "reqres",
            "--requesters",
            "8",
            "--window",
            "4",
            "--responders",
            "2",
            "--msgs",
            "4000",
            "--duration",
            "20s",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(field(&out, "shape"), "req8x4x2");
    assert_eq!(field(&out, "sent"), "4000");
    assert_eq!(field(&out, "answered"), "4000");
    assert_zero(&out, &["lost", "errors"]);
    let spread: Vec<u64> = field(&out, "per_responder")
        .split(',')
        .map(|v| v.parse().expect("count"))
        .collect();
    assert_eq!(spread.len(), 2);
    assert_eq!(spread.iter().sum::<u64>(), 4000);
    assert!(spread.iter().all(|&n| n > 0), "one responder idle: {out}");
}

/// The same scenarios over the raw stream protocol (`tcp://`), next to a ws listener.
#[test]
fn tcp_transport_fanout_and_reqres() {
    let server = TestServer::with(|c| {
        c.listeners = vec![
            "ws://127.0.0.1:0".parse().unwrap(),
            "tcp://127.0.0.1:0".parse().unwrap(),
        ];
    });
    let tcp = server.listeners()[1].to_string();
    assert!(tcp.starts_with("tcp://127.0.0.1:"), "{tcp}");

    let (code, out) = bench_at(
        &tcp,
        &[
            "fanout",
            "--subs",
            "10",
            "--msgs",
            "2000",
            "--duration",
            "20s",
            "--threads",
            "2",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(field(&out, "transport"), "tcp");
    assert_eq!(field(&out, "sent"), "2000");
    assert_eq!(field(&out, "deliveries"), "20000");
    assert_zero(&out, &["lost", "out_of_order", "errors"]);
    assert!(num(&out, "server_cpu_s") >= 0.0);
    let (p50, max) = (num(&out, "p50_us"), num(&out, "max_us"));
    assert!(0.0 < p50 && p50 <= max, "{out}");

    // Multi-line bodies: the terminator scan must not stop inside a body.
    let (code, out) = bench_at(
        &tcp,
        &["fanout", "--subs", "2", "--msgs", "100", "--size", "16KiB"],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(field(&out, "deliveries"), "200");
    assert_zero(&out, &["lost", "out_of_order"]);

    let (code, out) = bench_at(
        &tcp,
        &[
            "reqres",
            "--requesters",
            "8",
            "--window",
            "4",
            "--responders",
            "2",
            "--msgs",
            "2000",
            "--duration",
            "20s",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(field(&out, "transport"), "tcp");
    assert_eq!(field(&out, "answered"), "2000");
    assert_zero(&out, &["lost", "errors"]);

    let (code, out) = bench_at(&tcp, &["conns", "--conns", "20", "--hold", "100ms"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(field(&out, "alive"), "20");

    // A wrong key on tcp:// fails cleanly too.
    let pid = std::process::id().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_middleman"))
        .args(["bench", "fanout", "--msgs", "10", "--url", &tcp])
        .args(["--key", "wrong", "--server-pid", &pid])
        .args(["--setup-timeout", "5s"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad key"), "{err}");
}

#[test]
fn conns_holds_idle_connections() {
    let server = TestServer::start();
    let (code, out) = bench(&server, &["conns", "--conns", "50", "--hold", "200ms"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(field(&out, "alive"), "50");
    assert!(num(&out, "rss_after") > 0.0);
}

#[test]
fn a_refused_key_fails_cleanly() {
    let server = TestServer::start();
    let pid = std::process::id().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_middleman"))
        .args(["bench", "fanout", "--msgs", "10", "--url", &server.url()])
        .args([
            "--key",
            "wrong",
            "--server-pid",
            &pid,
            "--setup-timeout",
            "5s",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad key"), "{err}");
}

/// Subscribers and responders somewhere else than the publisher and requesters
/// (`--sub-url`; here the same server's raw stream listener, in a cluster another
/// node): the run starts with a ready probe that is not counted, and the CPU of every
/// `--server-pid` is summed (here the test process twice).
#[test]
fn sub_url_probes_first_and_server_pids_sum() {
    let server = TestServer::with(|c| {
        c.listeners = vec![
            "ws://127.0.0.1:0".parse().unwrap(),
            "tcp://127.0.0.1:0".parse().unwrap(),
        ];
    });
    let ws = server.url();
    let tcp = server.listeners()[1].to_string();
    let pid = std::process::id().to_string();

    let (code, out) = bench_at(
        &ws,
        &[
            "fanout",
            "--subs",
            "10",
            "--msgs",
            "2000",
            "--duration",
            "20s",
            "--threads",
            "2",
            "--sub-url",
            &tcp,
            "--server-pid",
            &pid,
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(field(&out, "transport"), "ws");
    assert_eq!(field(&out, "sub_url"), tcp);
    assert_eq!(field(&out, "server_pids"), "2");
    assert!(
        num(&out, "ready_probes") >= 2.0,
        "a probe and the fence: {out}"
    );
    assert_eq!(field(&out, "sent"), "2000");
    assert_eq!(field(&out, "deliveries"), "20000");
    assert_zero(&out, &["lost", "out_of_order", "errors"]);
    assert!(num(&out, "server_cpu_s") >= 0.0);

    // Several publishers, each probing its own topic.
    let (code, out) = bench_at(
        &ws,
        &[
            "fanout",
            "--publishers",
            "3",
            "--subs",
            "2",
            "--msgs",
            "500",
            "--sub-url",
            &tcp,
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(field(&out, "deliveries"), "3000");
    assert_eq!(field(&out, "bad_publishers"), "0");

    let (code, out) = bench_at(
        &ws,
        &[
            "reqres",
            "--requesters",
            "8",
            "--window",
            "4",
            "--responders",
            "2",
            "--msgs",
            "2000",
            "--duration",
            "20s",
            "--sub-url",
            &tcp,
            "--server-pid",
            &pid,
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(field(&out, "sub_url"), tcp);
    assert_eq!(field(&out, "server_pids"), "2");
    assert!(num(&out, "ready_probes") >= 1.0, "{out}");
    assert_eq!(field(&out, "sent"), "2000");
    assert_eq!(field(&out, "answered"), "2000");
    let spread: u64 = field(&out, "per_responder")
        .split(',')
        .map(|v| v.parse::<u64>().expect("count"))
        .sum();
    assert_eq!(spread, 2000, "probes are not counted: {out}");
    assert_zero(&out, &["lost", "errors"]);

    // One URL: no sub_url key, no probe unless asked for.
    let (code, out) = bench_at(&ws, &["fanout", "--subs", "2", "--msgs", "100"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(field(&out, "server_pids"), "1");
    assert!(
        !out.contains("sub_url=") && !out.contains("ready_probes="),
        "{out}"
    );
    let (code, out) = bench_at(
        &ws,
        &["fanout", "--subs", "2", "--msgs", "100", "--ready-probe"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(num(&out, "ready_probes") >= 2.0, "{out}");
    assert_eq!(field(&out, "deliveries"), "200");
}

/// With several `--server-pid` (a cluster run: the nodes and nats-server) the result
/// line says which process the CPU went to, in the order given, and the parts add up to
/// the total; with one, no split is printed.
#[test]
fn cpu_is_split_by_process_when_several_are_charged() {
    let server = TestServer::start();
    let pid = std::process::id().to_string();
    let url = server.url();
    let run = |extra: &[&str]| {
        let args = [
            &[
                "bench",
                "fanout",
                "--subs",
                "2",
                "--msgs",
                "100000",
                "--duration",
                "20s",
            ][..],
            &["--url", &url, "--key", SERVICE_KEY, "--server-pid", &pid],
            extra,
        ]
        .concat();
        let (code, out, _) = tool(&args);
        assert_eq!(code, 0, "{out}");
        assert_eq!(field(&out, "deliveries"), "200000");
        assert_zero(&out, &["lost", "out_of_order", "errors"]);
        out
    };
    let one = run(&[]);
    assert!(!one.contains("server_cpu_each_s="), "{one}");
    // The same process charged twice: two equal parts that sum to the total (the
    // samples are a clock tick apart at most).
    let two = run(&["--server-pid", &pid]);
    assert_eq!(field(&two, "server_pids"), "2");
    let each: Vec<f64> = field(&two, "server_cpu_each_s")
        .split('/')
        .map(|v| v.parse().expect("seconds"))
        .collect();
    assert_eq!(each.len(), 2, "{two}");
    assert!(each[0] > 0.0, "{two}");
    let total = num(&two, "server_cpu_s");
    assert!(
        (each[0] + each[1] - total).abs() <= 0.03,
        "{each:?} vs {total}"
    );
    assert!((each[0] - each[1]).abs() <= 0.03, "{each:?}");
}
