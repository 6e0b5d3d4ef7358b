//! The browser client (`/middleman.js`) in headless Chromium, driven by playwright-core
//! (`tests/browser-client/run.mjs`), against an in-process server answered by a Rust
//! service on the client library: subscribe, publish, request, `no responder`, and a
//! server restart on the same port (reconnect and re-subscribe); the checks shared with
//! Node (tests/browser-client/checks.mjs: subscribe confirmation, respond, binary bodies,
//! and protocol 1.1: grants, disable*, subscribeFor, presence, kick, events);
//! and the `/demo` page's forms. `js_client_in_node` runs the same client in Node.
//!
//! Needs node, npm and /usr/bin/chromium (or `MM_CHROMIUM`), so a plain `cargo test` lists
//! it as ignored; under `--include-ignored` a missing tool fails it. playwright-core is
//! installed into tests/browser-client by `npm ci` from its lock file when it is not
//! there yet (a fresh clone); `.ci/install-tools.sh` installs all of it.

mod common;
mod tools;
use common::{config, CLIENT_KEY, SERVICE_KEY};

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use middleman::client::{Client, Closer, Error};
use middleman::transport::Listen;
use middleman::{Config, Running};

/// Bound for the whole browser run.
const BROWSER_WAIT: Duration = Duration::from_secs(120);

fn project_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser-client")
}

/// What is missing to run the browser test, if anything.
fn missing() -> Vec<String> {
    let mut miss = Vec::new();
    if !tools::runs("node", &["--version"]) {
        miss.push("node (apt-get install -y nodejs)".to_owned());
    }
    if !tools::runs("npm", &["--version"]) {
        miss.push("npm (apt-get install -y npm)".to_owned());
    }
    let chromium = std::env::var("MM_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() {
        miss.push(format!("{chromium} (apt-get install -y chromium)"));
    }
    miss
}

/// The Rust side: enables "room" for clients, echoes "echo" requests (adding a header)
/// and answers "poke" by publishing `poked:<body>` to the room first.
fn service(addr: SocketAddr) -> (Closer, JoinHandle<Result<(), Error>>) {
    let mut c = Client::connect(&format!("ws://{addr}/"), SERVICE_KEY).expect("service");
    c.enable_publish("room").unwrap();
    c.enable_subscribe("room").unwrap();
    c.enable_requests("echo").unwrap();
    c.enable_requests("poke").unwrap();
    let closer = c.closer();
    let t = std::thread::spawn(move || loop {
        let m = c.recv()?;
        if m.cmd != "REQ" {
            continue;
        }
        match m.target.as_str() {
            "echo" => {
                let trace = m.header("Trace").unwrap_or("-").to_owned();
                c.reply(&m, &[("Trace-Seen", &trace)], &m.body)?
            }
            "poke" => {
                let body = [b"poked:".as_slice(), &m.body].concat();
                c.publish("room", &[], body)?;
                c.reply(&m, &[], "ok")?
            }
            _ => {}
        }
    });
    (closer, t)
}

fn start(cfg: Config) -> Running {
    Running::spawn(cfg).expect("server start")
}

/// The server and the Rust service a node script talks to; `restart-now` from the script
/// restarts both on the same port.
struct Setup {
    server: Option<Running>,
    addr: SocketAddr,
    closer: Closer,
    svc: JoinHandle<Result<(), Error>>,
    restarted: bool,
}

impl Setup {
    fn start() -> Self {
        let server = start(config());
        let addr = server.addr;
        let (closer, svc) = service(addr);
        Setup {
            server: Some(server),
            addr,
            closer,
            svc,
            restarted: false,
        }
    }

    /// For [`run_node`]: on `restart-now`, stop the server (the clients see close 1001),
    /// start a new one on the same port, bring the service back, and answer `restarted`.
    fn on_line(&mut self, line: &str) -> Option<String> {
        if line != "restart-now" {
            return None;
        }
        self.server.take().unwrap().stop().expect("server stop");
        let svc = std::mem::replace(&mut self.svc, std::thread::spawn(|| Ok(())));
        let e = svc.join().unwrap().unwrap_err();
        assert!(matches!(e, Error::Closed { code: 1001, .. }), "{e:?}");
        let cfg = Config {
            listeners: vec![Listen::ws(self.addr)],
            ..config()
        };
        self.server = Some(start(cfg));
        (self.closer, self.svc) = service(self.addr);
        self.restarted = true;
        Some("restarted".to_owned())
    }

    fn stop(mut self) {
        self.closer.close();
        let _ = self.svc.join();
        drop(self.server.take());
    }
}

/// Run `node args...` in tests/browser-client, bounded by [`BROWSER_WAIT`]. Each stdout
/// line goes to `on_line`; what it returns is written to node's stdin as a line. Returns
/// the stdout lines once node exited 0 (panics otherwise, with its stderr).
fn run_node(args: &[String], mut on_line: impl FnMut(&str) -> Option<String>) -> Vec<String> {
    let mut node = Command::new("node")
        .args(args)
        .current_dir(project_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn node");
    let (tx, lines) = mpsc::channel::<String>();
    let out = node.stdout.take().unwrap();
    let err = node.stderr.take().unwrap();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let err_reader = std::thread::spawn(move || {
        let mut all = String::new();
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("node: {l}");
            all.push_str(&l);
            all.push('\n');
        }
        drop(tx2);
        all
    });
    let mut stdin = node.stdin.take();

    let deadline = Instant::now() + BROWSER_WAIT;
    let mut out_lines = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Ok(line) = lines.recv_timeout(left) else {
            break; // node finished (or the deadline passed)
        };
        eprintln!("node> {line}");
        if let Some(reply) = on_line(&line) {
            let s = stdin.as_mut().expect("stdin");
            s.write_all(format!("{reply}\n").as_bytes()).unwrap();
            s.flush().unwrap();
        }
        out_lines.push(line);
    }
    drop(stdin);
    let status = loop {
        if let Some(st) = node.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = node.kill(); // our own child, by its handle
            let _ = node.wait();
            panic!("node did not finish within {BROWSER_WAIT:?}; output {out_lines:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = err_reader.join().unwrap();
    assert!(
        status.success(),
        "node failed ({status}):\n{stderr}\nstdout: {out_lines:?}"
    );
    out_lines
}

#[test]
#[ignore = "needs Chromium, node and npm: run .ci/install-tools.sh"]
fn browser_client_in_headless_chromium() {
    tools::require("the browser client test", &missing());
    tools::npm_ci_if_needed(&project_dir()).unwrap_or_else(|e| panic!("{e}"));

    let mut setup = Setup::start();
    let addr = setup.addr;
    // The demo page after joining, kept for a look (target/tmp, not in git).
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("demo-joined.png");
    let _ = std::fs::remove_file(&shot);

    let args = [
        "run.mjs".to_owned(),
        format!("http://{addr}"),
        CLIENT_KEY.to_owned(),
        SERVICE_KEY.to_owned(),
        shot.display().to_string(),
    ];
    let out_lines = run_node(&args, |line| setup.on_line(line));
    assert!(
        setup.restarted,
        "the page never asked for the restart: {out_lines:?}"
    );
    assert_eq!(
        out_lines.last().map(String::as_str),
        Some("browser-client: 19 passed, 0 failed"),
        "{out_lines:?}"
    );
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("{}: {e}", shot.display()));
    assert!(
        png.len() > 1000 && png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is no screenshot ({} bytes)",
        shot.display(),
        png.len()
    );
    setup.stop();
}

/// Node's major version, if node runs.
fn node_major() -> Option<u32> {
    let out = Command::new("node").arg("--version").output().ok()?;
    let v = String::from_utf8(out.stdout).ok()?;
    v.trim()
        .trim_start_matches('v')
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// The same client file in Node (`tests/browser-client/node.mjs`): the checks shared with
/// the page (subscribe confirmation, respond, binary bodies), the `WebSocket` option, a
/// server restart (re-subscription, EREQ sent again) and a refused connection.
/// Node 22 has a global WebSocket; Node 20 needs `--experimental-websocket`, passed here.
#[test]
#[ignore = "needs node 20 or later: run .ci/install-tools.sh"]
fn js_client_in_node() {
    let major = node_major();
    tools::require(
        "the Node client test",
        &match major {
            Some(m) if m >= 20 => vec![],
            Some(m) => vec![format!("node 20 or later (found {m})")],
            None => vec!["node (apt-get install -y nodejs)".to_owned()],
        },
    );
    let mut setup = Setup::start();
    let mut args = Vec::new();
    if major < Some(22) {
        args.push("--experimental-websocket".to_owned());
    }
    args.extend([
        "node.mjs".to_owned(),
        format!("ws://{}/", setup.addr),
        CLIENT_KEY.to_owned(),
        SERVICE_KEY.to_owned(),
    ]);
    let out_lines = run_node(&args, |line| setup.on_line(line));
    assert!(
        setup.restarted,
        "node.mjs never asked for the restart: {out_lines:?}"
    );
    assert_eq!(
        out_lines.last().map(String::as_str),
        Some("node-client: 13 passed, 0 failed"),
        "{out_lines:?}"
    );
    setup.stop();
}

#[test]
fn the_server_serves_the_client_and_the_demo() {
    let srv = common::TestServer::start();
    let js = common::http_get(srv.addr, "GET /middleman.js HTTP/1.1\r\nHost: x\r\n\r\n");
    let file = include_str!("../clients/js/middleman.js");
    let (head, body) = js.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("\r\nContent-Type: text/javascript\r\n"),
        "{head}"
    );
    assert!(
        head.contains(&format!("\r\nContent-Length: {}\r\n", file.len())),
        "{head}"
    );
    assert_eq!(body, file);

    let demo = common::http_get(srv.addr, "GET /demo?key=abc HTTP/1.1\r\nHost: x\r\n\r\n");
    let (head, body) = demo.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("\r\nContent-Type: text/html; charset=utf-8\r\n"),
        "{head}"
    );
    assert_eq!(body, include_str!("../examples/chat.html"));
    assert!(body.contains(r#"import { connect } from "/middleman.js";"#));

    let other = common::http_get(srv.addr, "GET /middleman.jsx HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(other.starts_with("HTTP/1.1 404 "), "{other}");
}
