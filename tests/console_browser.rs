//! The live console in a real browser: headless Chromium, driven by playwright-core from
//! tests/browser-console/console.mjs, loads `/console` from an in-process server; the test
//! then applies load through the server with the harness peers, and the page must show
//! the numbers and the chart change. A screenshot of the console under load is kept at
//! target/console-browser/console-under-load.png.
//!
//! Needs node, npm and /usr/bin/chromium, so a plain `cargo test` lists it as ignored;
//! under `--include-ignored` a missing tool fails it. playwright-core is installed into
//! tests/browser-console by `npm ci` from its lock file when it is not there yet (a fresh
//! clone); `.ci/install-tools.sh` installs all of it.

mod common;
mod tools;
use common::*;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::Message;

const CHROMIUM: &str = "/usr/bin/chromium";

fn project_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser-console")
}

/// What is missing to run the browser test, if anything.
fn missing_tools() -> Vec<String> {
    let mut missing = Vec::new();
    if !tools::runs("node", &["--version"]) {
        missing.push("node (apt-get install -y nodejs)".to_owned());
    }
    if !tools::runs("npm", &["--version"]) {
        missing.push("npm (apt-get install -y npm)".to_owned());
    }
    if !Path::new(CHROMIUM).exists() {
        missing.push(format!("{CHROMIUM} (apt-get install -y chromium)"));
    }
    missing
}

/// Next line from the script's stdout that starts with one of `tags`, within `limit`.
fn next_tagged(lines: &mpsc::Receiver<String>, tags: &[&str], limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline
            .checked_duration_since(Instant::now())
            .unwrap_or_else(|| panic!("no {tags:?} line from the browser script in {limit:?}"));
        match lines.recv_timeout(left) {
            Ok(l) if tags.iter().any(|t| l.starts_with(t)) => return l,
            Ok(l) => eprintln!("browser script: {l}"),
            Err(_) => panic!("browser script ended or went quiet before {tags:?}"),
        }
    }
}

#[test]
#[ignore = "needs Chromium, node and npm: run .ci/install-tools.sh"]
fn console_shows_the_server_live_in_chromium() {
    tools::require("the console browser test", &missing_tools());
    tools::npm_ci_if_needed(&project_dir()).unwrap_or_else(|e| panic!("{e}"));
    let srv = TestServer::start();
    let base = format!("http://{}", srv.addr);
    let shot_dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("console-browser");
    std::fs::create_dir_all(&shot_dir).unwrap();
    let shot = shot_dir.join("console-under-load.png");
    let _ = std::fs::remove_file(&shot);

    let mut node = Command::new("node")
        .arg("console.mjs")
        .arg(&base)
        .arg(&shot)
        .current_dir(project_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start node");
    let mut stdin = node.stdin.take().unwrap();
    let stdout = node.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });

    // 1. The page is live and shows an idle server.
    let ready = next_tagged(&lines, &["READY ", "FAIL "], Duration::from_secs(60));
    assert!(ready.starts_with("READY "), "{ready}");
    let before: Value = serde_json::from_str(&ready["READY ".len()..]).unwrap();
    assert_eq!(before["service"], "0", "{before}");
    assert_eq!(before["client"], "0", "{before}");
    assert_eq!(before["pending"], "0", "{before}");
    // The configuration in effect: its hash (as /stats has it) and when it was loaded.
    let stats = http_get(srv.addr, "GET /stats HTTP/1.1\r\nHost: x\r\n\r\n");
    let stats: Value = serde_json::from_str(stats.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let hash = stats["config"]["hash"].as_str().unwrap();
    let shown = before["config"].as_str().unwrap();
    assert!(
        shown.starts_with(&format!("config {hash} loaded 20"))
            && shown.ends_with(" UTC (reloads: 0 ok, 0 invalid)"),
        "{before}"
    );

    // 2. Load: one service, three subscribed clients, a pending request, a refused key,
    //    and a steady stream of publications (the clients drain theirs on threads).
    let mut svc = Peer::service(srv.addr);
    svc.send("ESUB", "load-topic", &[], "");
    svc.send("EREQ", "clock", &[], "");
    svc.sync();
    let stop = Arc::new(AtomicBool::new(false));
    let mut drainers = Vec::new();
    for i in 0..3 {
        let mut c = Peer::client(srv.addr);
        c.send("SUB", "load-topic", &[], "");
        c.sync();
        if i == 0 {
            c.send("REQ", "clock", &[("ReqID", "1")], "");
            let req = svc.recv();
            assert_eq!(req.header("ReqID"), Some("1"));
            // One per-connection grant (version 1.1), shown under Rooms and history.
            svc.send("EPUB", "granted", &[("forcid", &c.cid)], "");
            svc.sync();
        }
        let stop = stop.clone();
        drainers.push(std::thread::spawn(move || {
            let mut got = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match c.ws.read() {
                    Ok(Message::Text(_) | Message::Binary(_)) => got += 1,
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            (got, c)
        }));
    }
    let mut bad = ws_connect(srv.addr);
    bad.send(Message::text("wrong-key")).unwrap();
    assert_eq!(recv_close(&mut bad).0, 1008);
    drop(bad);
    let publisher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut sent = 0u64;
            let limit = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < limit {
                for _ in 0..25 {
                    svc.send("PUB", "load-topic", &[], &format!("tick {sent}"));
                    sent += 1;
                }
                std::thread::sleep(Duration::from_millis(20)); // pacing, not synchronisation
            }
            (sent, svc)
        })
    };
    let want = serde_json::json!({
        "service": 1, "client": 3, "pending": 1, "topic": "load-topic", "subscribers": 3,
        "bad_key_closes": 1,
    });
    writeln!(stdin, "LOADED {want}").unwrap();
    stdin.flush().unwrap();

    // 3. The page shows it.
    let result = next_tagged(&lines, &["RESULT ", "FAIL "], Duration::from_secs(60));
    stop.store(true, Ordering::Relaxed);
    let (sent, _svc) = publisher.join().unwrap();
    for d in drainers {
        let _ = d.join();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = node.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = node.kill();
            panic!("node did not exit");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(result.starts_with("RESULT "), "{result}");
    assert!(status.success(), "node exited with {status}");
    let after: Value = serde_json::from_str(&result["RESULT ".len()..]).unwrap();
    assert_eq!(after["service"], "1", "{after}");
    assert_eq!(after["client"], "3", "{after}");
    assert_eq!(after["pending"], "1", "{after}");
    assert_eq!(after["grants"], "1", "{after}");
    assert_eq!(after["hist_topics"], "0", "{after}");
    assert_eq!(after["busiest"][0], serde_json::json!(["load-topic", "3"]));
    assert_eq!(after["chart_changed"], true);
    assert!(after["chart_points"].as_u64().unwrap() >= 2, "{after}");
    assert!(
        after["chart_max"].as_f64().unwrap() > before["chart_max"].as_f64().unwrap(),
        "{after}"
    );
    assert!(sent > 0);
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.len() > 10_000 && png.starts_with(b"\x89PNG\r\n\x1a\n"));
    eprintln!("console screenshot: {}", shot.display());
}
