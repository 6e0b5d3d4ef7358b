//! Operations, in process: `/metrics` is Prometheus text whose counters move exactly with
//! the traffic sent, `/stats` agrees with it, and no configured key appears in any HTTP
//! answer (PROTOCOL.md §8, issue 5).

mod common;
use common::*;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::Message;

/// The body of a plain HTTP GET, asserting status 200.
fn get_body(addr: SocketAddr, path: &str) -> String {
    let resp = http_get(addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"));
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {resp:?}"));
    assert!(head.starts_with("HTTP/1.1 200 "), "{path}: {head}");
    body.to_owned()
}

/// Parse Prometheus text exposition strictly: every family has `# HELP` and `# TYPE`
/// before its samples, every sample line is `name{labels} value` or `name value`, label
/// values are quoted, counters end in `_total`. Returns series -> value.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut help = BTreeMap::new();
    let mut kind: BTreeMap<String, String> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, h) = rest.split_once(' ').expect("HELP name text");
            assert!(!h.trim().is_empty(), "empty HELP: {line}");
            assert!(
                help.insert(name.to_owned(), ()).is_none(),
                "HELP twice: {line}"
            );
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, k) = rest.split_once(' ').expect("TYPE name kind");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&k),
                "{line}"
            );
            assert!(help.contains_key(name), "TYPE before HELP: {line}");
            if k == "counter" {
                assert!(name.ends_with("_total"), "counter without _total: {line}");
            }
            kind.insert(name.to_owned(), k.to_owned());
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.is_empty(),
            "stray line {line:?}"
        );
        let (series, value) = line.rsplit_once(' ').expect("sample: name value");
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value in {line:?}"));
        let (name, labels) = match series.find('{') {
            Some(i) => (&series[..i], Some(&series[i..])),
            None => (series, None),
        };
        assert!(
            !name.is_empty()
                && !name.as_bytes()[0].is_ascii_digit()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':'),
            "metric name in {line:?}"
        );
        assert!(kind.contains_key(name), "sample before its TYPE: {line}");
        if let Some(l) = labels {
            let inner = l
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .unwrap_or_else(|| panic!("labels in {line:?}"));
            // name="value"(,name="value")*, value with \\ \" \n escapes
            let mut rest = inner;
            while !rest.is_empty() {
                let (lname, after) = rest.split_once("=\"").expect("label=\"value\"");
                assert!(
                    lname
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                    "label name in {line:?}"
                );
                let mut end = None;
                let mut esc = false;
                for (i, c) in after.char_indices() {
                    match (esc, c) {
                        (true, _) => esc = false,
                        (false, '\\') => esc = true,
                        (false, '"') => {
                            end = Some(i);
                            break;
                        }
                        _ => {}
                    }
                }
                let end = end.unwrap_or_else(|| panic!("unterminated label in {line:?}"));
                rest = &after[end + 1..];
                rest = rest.strip_prefix(',').unwrap_or(rest);
            }
        }
        assert!(
            out.insert(series.to_owned(), v).is_none(),
            "series twice: {line}"
        );
    }
    assert!(!out.is_empty());
    out
}

fn metrics(addr: SocketAddr) -> BTreeMap<String, f64> {
    parse_prometheus(&get_body(addr, "/metrics"))
}

fn stats(addr: SocketAddr) -> Value {
    serde_json::from_str(&get_body(addr, "/stats")).expect("/stats is JSON")
}

fn m(map: &BTreeMap<String, f64>, series: &str) -> f64 {
    *map.get(series)
        .unwrap_or_else(|| panic!("no series {series}"))
}

/// Poll `/stats` (one request per 20 ms, at most `WAIT`) until `done` holds; returns it.
fn await_stats(addr: SocketAddr, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = stats(addr);
        if done(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what} never held; last /stats: {s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

#[test]
fn metrics_counters_move_exactly_with_traffic() {
    let srv = TestServer::start();
    let mut svc = Peer::service(srv.addr);
    let mut cli = Peer::client(srv.addr);
    let _mon = Peer::monitor(srv.addr);
    let before = metrics(srv.addr);
    assert_eq!(m(&before, r#"middleman_connections{role="service"}"#), 1.0);
    assert_eq!(m(&before, r#"middleman_connections{role="client"}"#), 1.0);
    assert_eq!(m(&before, r#"middleman_connections{role="monitor"}"#), 1.0);
    assert_eq!(m(&before, "middleman_subscriptions"), 3.0); // three private channels
    assert_eq!(m(&before, "middleman_topics"), 3.0);

    // 1. enablements, then a sync (an unknown command, answered with an error)
    svc.send("ESUB", "news", &[], "");
    svc.send("EREQ", "time", &[], "");
    svc.sync();
    // 2. a subscription
    cli.send("SUB", "news", &[], "");
    cli.sync();
    // 3. five publications, each delivered once
    for i in 0..5 {
        svc.send("PUB", "news", &[], &format!("n{i}"));
    }
    for i in 0..5 {
        assert_eq!(cli.recv().body, format!("n{i}"));
    }
    // 4. an answered request
    cli.send("REQ", "time", &[("ReqID", "1")], "");
    let req = svc.recv();
    let rid = req.header("rid").expect("rid").to_owned();
    svc.send("RES", "time", &[("rid", &rid)], "12:00");
    assert_eq!(cli.recv().body, "12:00");
    // 5. a request nobody answers, 6. a refused subscription
    cli.send("REQ", "nobody", &[("ReqID", "2")], "");
    assert_eq!(cli.recv().header("reason"), Some("no responder"));
    cli.send("SUB", "secret", &[], "");
    assert_eq!(cli.recv().header("reason"), Some("not permitted"));
    // 7. a request left pending
    cli.send("REQ", "time", &[("ReqID", "3")], "");
    let pending = svc.recv();
    assert_eq!(pending.header("ReqID"), Some("3"));

    let after = metrics(srv.addr);
    let delta = |s: &str| m(&after, s) - m(&before, s);
    for (cmd, n) in [
        ("PUB", 5.0),
        ("SUB", 2.0),
        ("REQ", 3.0),
        ("RES", 1.0),
        ("ESUB", 1.0),
        ("EREQ", 1.0),
        ("EPUB", 0.0),
        ("UNS", 0.0),
        ("INT", 0.0),
        ("other", 2.0),
    ] {
        assert_eq!(
            delta(&format!("middleman_messages_in_total{{cmd=\"{cmd}\"}}")),
            n,
            "messages in {cmd}"
        );
    }
    for (cmd, n) in [("PUB", 5.0), ("REQ", 2.0), ("RES", 1.0), ("ERROR", 4.0)] {
        assert_eq!(
            delta(&format!("middleman_messages_out_total{{cmd=\"{cmd}\"}}")),
            n,
            "messages out {cmd}"
        );
    }
    for (reason, n) in [
        ("unknown command", 2.0),
        ("no responder", 1.0),
        ("not permitted", 1.0),
        ("request timed out", 0.0),
    ] {
        assert_eq!(
            delta(&format!("middleman_errors_total{{reason=\"{reason}\"}}")),
            n,
            "errors {reason}"
        );
    }
    for (outcome, n) in [
        ("answered", 1.0),
        ("no_responder", 1.0),
        ("timed_out", 0.0),
        ("responder_gone", 0.0),
    ] {
        assert_eq!(
            delta(&format!(
                "middleman_requests_total{{outcome=\"{outcome}\"}}"
            )),
            n,
            "requests {outcome}"
        );
    }
    assert_eq!(m(&after, "middleman_pending_requests"), 1.0);
    assert_eq!(m(&after, "middleman_subscriptions"), 4.0); // + news
    assert_eq!(m(&after, "middleman_topics"), 5.0); // + news, time
    assert_eq!(delta("middleman_http_requests_total"), 1.0);
    assert_eq!(delta("middleman_connections_accepted_total"), 1.0); // this request
    assert!(delta("middleman_bytes_in_total") > 0.0);
    assert!(delta("middleman_bytes_out_total") > 0.0);
    assert!(delta("middleman_loop_iterations_total") >= 1.0);
    assert!(m(&after, "middleman_loop_busy_seconds_total") > 0.0);
    assert!(delta("middleman_loop_busy_seconds_total") >= 0.0);
    assert_eq!(m(&after, r#"middleman_build_info{version="0.1.0"}"#), 1.0);

    // The responder leaves with the request pending: responder_gone, pending back to 0.
    drop(svc);
    assert_eq!(cli.recv().header("reason"), Some("responder disconnected"));
    let gone = metrics(srv.addr);
    assert_eq!(
        m(
            &gone,
            r#"middleman_requests_total{outcome="responder_gone"}"#
        ) - m(
            &before,
            r#"middleman_requests_total{outcome="responder_gone"}"#
        ),
        1.0
    );
    assert_eq!(m(&gone, "middleman_pending_requests"), 0.0);
    assert_eq!(m(&gone, r#"middleman_connections{role="service"}"#), 0.0);
}

#[test]
fn closes_are_counted_by_reason() {
    let srv = TestServer::with(|c| c.limits.max_line = 256);
    let base = stats(srv.addr);
    let c0 = |r: &str| u(&base["connections_closed_total"][r]);

    // bad key
    let mut bad = ws_connect(srv.addr);
    bad.send(Message::text("not-a-key")).unwrap();
    assert_eq!(recv_close(&mut bad), (1008, "bad key".into()));
    drop(bad);
    // protocol error: an unparsable first line closes 1002
    let mut p = Peer::client(srv.addr);
    p.send_raw("NOSPACE\r\n.\r\n");
    assert_eq!(p.recv_close().0, 1002);
    drop(p);
    // limit: a line over 256 bytes closes 1009
    let mut p = Peer::client(srv.addr);
    p.send_raw(&format!("PUB {}\r\n.\r\n", "x".repeat(300)));
    assert_eq!(p.recv_close().0, 1009);
    drop(p);
    // normal: the client's closing handshake, twice
    for _ in 0..2 {
        let mut p = Peer::service(srv.addr);
        p.ws.close(None).unwrap();
        let _ = recv_close(&mut p.ws);
        drop(p);
    }

    let want = [
        ("normal", 2),
        ("bad_key", 1),
        ("protocol_error", 1),
        ("limit", 1),
        ("slow_consumer", 0),
        ("idle", 0),
    ];
    let s = await_stats(srv.addr, "closes counted", |s| {
        want.iter()
            .all(|(r, n)| u(&s["connections_closed_total"][r]) == c0(r) + n)
    });
    // Five WebSocket connections were accepted besides the HTTP requests.
    assert_eq!(
        u(&s["connections_accepted_total"]) - u(&base["connections_accepted_total"]),
        5 + u(&s["http_requests_total"]) - u(&base["http_requests_total"])
    );
    let recent: Vec<&str> = s["recent_closes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["reason"].as_str().unwrap())
        .collect();
    // WebSocket closes only: the plain HTTP polls of /stats are not listed.
    assert_eq!(recent.len(), 5, "{recent:?}");
    for r in ["bad_key", "protocol_error", "limit"] {
        assert_eq!(recent.iter().filter(|x| **x == r).count(), 1, "{recent:?}");
    }
    assert_eq!(recent.iter().filter(|x| **x == "normal").count(), 2);
    // HTTP closes have their own reason.
    assert!(u(&s["connections_closed_total"]["http"]) >= 1);
    // The same numbers in /metrics.
    let mm = metrics(srv.addr);
    for (r, n) in want {
        assert_eq!(
            m(
                &mm,
                &format!("middleman_connections_closed_total{{reason=\"{r}\"}}")
            ),
            (c0(r) + n) as f64
        );
    }
}

#[test]
fn stats_json_matches_metrics() {
    let srv = TestServer::start();
    let mut svc = Peer::service(srv.addr);
    let mut cli = Peer::client(srv.addr);
    let mut cli2 = Peer::client(srv.addr);
    svc.send("ESUB", "news", &[], "");
    svc.send("ESUB", "sport", &[], "");
    svc.send("EREQ", "time", &[], "");
    svc.sync();
    for c in [&mut cli, &mut cli2] {
        c.send("SUB", "news", &[], "");
        c.sync();
    }
    cli.send("SUB", "sport", &[], "");
    cli.sync();
    svc.send("PUB", "news", &[], "hello");
    cli.recv();
    cli2.recv();
    cli.send("REQ", "time", &[("ReqID", "7")], "");
    svc.recv();

    let mm = metrics(srv.addr);
    let s = stats(srv.addr);
    let same = |series: &str, json: &Value| {
        assert_eq!(m(&mm, series), u(json) as f64, "{series} vs {json}");
    };
    for role in ["service", "client", "monitor"] {
        same(
            &format!("middleman_connections{{role=\"{role}\"}}"),
            &s["connections"][role],
        );
    }
    for (cmd, v) in s["messages_in_total"].as_object().unwrap() {
        same(&format!("middleman_messages_in_total{{cmd=\"{cmd}\"}}"), v);
    }
    for (cmd, v) in s["messages_out_total"].as_object().unwrap() {
        same(&format!("middleman_messages_out_total{{cmd=\"{cmd}\"}}"), v);
    }
    for (r, v) in s["errors_total"].as_object().unwrap() {
        same(&format!("middleman_errors_total{{reason=\"{r}\"}}"), v);
    }
    for (o, v) in s["requests_total"].as_object().unwrap() {
        same(&format!("middleman_requests_total{{outcome=\"{o}\"}}"), v);
    }
    for r in [
        "bad_key",
        "slow_consumer",
        "idle",
        "protocol_error",
        "limit",
    ] {
        same(
            &format!("middleman_connections_closed_total{{reason=\"{r}\"}}"),
            &s["connections_closed_total"][r],
        );
    }
    same("middleman_subscriptions", &s["subscriptions"]);
    same("middleman_topics", &s["topics"]);
    same("middleman_pending_requests", &s["pending_requests"]);
    same("middleman_slow_consumers_total", &s["slow_consumers_total"]);
    same(
        "middleman_connections_refused_total",
        &s["connections_refused_total"],
    );
    // One more HTTP request (this /stats) in between.
    assert_eq!(
        u(&s["http_requests_total"]) as f64,
        m(&mm, "middleman_http_requests_total") + 1.0
    );
    assert_eq!(
        u(&s["connections_accepted_total"]) as f64,
        m(&mm, "middleman_connections_accepted_total") + 1.0
    );
    assert_eq!(u(&s["pending_requests"]), 1);
    assert_eq!(u(&s["subscriptions"]), 3 + 3);
    assert_eq!(
        s["busiest_topics"],
        serde_json::json!([
            {"name": "news", "subscribers": 2},
            {"name": "sport", "subscribers": 1},
        ])
    );
    assert_eq!(s["max_connections"], 10_000);
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    // The server runs in this process.
    assert_eq!(s["pid"], std::process::id());
    assert!(s["rates"].is_array());
    assert!(s["loop_busy_seconds_total"].as_f64().unwrap() > 0.0);
}

#[test]
fn no_configured_key_in_any_http_answer() {
    let srv = TestServer::start();
    let mut svc = Peer::service(srv.addr);
    let mut cli = Peer::client(srv.addr);
    let _mon = Peer::monitor(srv.addr);
    // A trusted service names topics after keys: the console must not show them.
    for (i, key) in [SERVICE_KEY, CLIENT_KEY, MONITOR_KEY].iter().enumerate() {
        for _ in 0..=i {
            svc.send("SUB", &format!("leak-{key}"), &[], "");
        }
        svc.send("ESUB", &format!("leak-{key}"), &[], "");
    }
    svc.sync();
    cli.send("SUB", &format!("leak-{CLIENT_KEY}"), &[], "");
    cli.sync();
    // Keys presented wrongly, and as message content.
    let mut bad = ws_connect(srv.addr);
    bad.send(Message::text(format!("{SERVICE_KEY}x"))).unwrap();
    assert_eq!(recv_close(&mut bad).0, 1008);
    svc.send(
        "PUB",
        CLIENT_KEY,
        &[(MONITOR_KEY, SERVICE_KEY)],
        SERVICE_KEY,
    );
    svc.sync();

    let stats_body = get_body(srv.addr, "/stats");
    let s: Value = serde_json::from_str(&stats_body).unwrap();
    let names: Vec<&str> = s["busiest_topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["(redacted)", "(redacted)", "(redacted)"]);
    let mut answers = vec![stats_body];
    for req in [
        "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /console HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /nope HTTP/1.1\r\nHost: x\r\n\r\n",
        "POST /stats HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        "GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
        "\x00garbage\r\n\r\n",
    ] {
        answers.push(http_get(srv.addr, req));
    }
    for a in &answers {
        assert!(!a.is_empty());
        for key in [SERVICE_KEY, CLIENT_KEY, MONITOR_KEY] {
            assert!(!a.contains(key), "answer holds {key:?}: {a}");
        }
    }
}

#[test]
fn console_page_is_self_contained() {
    let srv = TestServer::start();
    let resp = http_get(srv.addr, "GET /console HTTP/1.1\r\nHost: x\r\n\r\n");
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert!(
        head.lines()
            .any(|l| l.eq_ignore_ascii_case("content-type: text/html; charset=utf-8")),
        "{head}"
    );
    assert_eq!(body, middleman::web::CONSOLE_HTML);
    assert!(body.contains("fetch(\"/stats\""));
    assert!(body.contains("<canvas id=\"chart\""));
    // No external assets: nothing is loaded from another origin.
    for needle in ["http://", "https://", "src=", "@import", "//cdn", "url("] {
        assert!(!body.contains(needle), "console refers to {needle:?}");
    }
    // The one href is an empty inline icon (so the browser asks for no favicon).
    assert_eq!(body.matches("href=").count(), 1);
    assert!(body.contains("<link rel=\"icon\" href=\"data:,\">"));
}
