//! The load tool end to end: the real binary's `bench fanout`, `bench reqres` and
//! `bench conns` run briefly against an in-process server and must report zero lost,
//! zero out of order and sane numbers.

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
    let mut child = Command::new(env!("CARGO_BIN_EXE_middleman"))
        .arg("bench")
        .args(args)
        .args(["--url", url, "--key", SERVICE_KEY, "--server-pid", &pid])
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
            panic!("bench {args:?} did not finish within {LIMIT:?}");
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
    (status.code().unwrap_or(-1), out)
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
    assert_eq!(field(&out, "sent"), "3000");
    assert_eq!(field(&out, "deliveries"), "60000");
    assert_eq!(field(&out, "lost"), "0");
    assert_eq!(field(&out, "out_of_order"), "0");
    assert_eq!(field(&out, "errors"), "0");
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
    assert_eq!(field(&out, "sent"), "4000");
    assert_eq!(field(&out, "answered"), "4000");
    assert_eq!(field(&out, "lost"), "0");
    assert_eq!(field(&out, "errors"), "0");
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
    assert_eq!(field(&out, "lost"), "0");
    assert_eq!(field(&out, "out_of_order"), "0");
    assert_eq!(field(&out, "errors"), "0");
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
    assert_eq!(field(&out, "lost"), "0");
    assert_eq!(field(&out, "out_of_order"), "0");

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
    assert_eq!(field(&out, "lost"), "0");
    assert_eq!(field(&out, "errors"), "0");

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
