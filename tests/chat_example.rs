//! The chat example (`examples/chat`: service.py, index.html, chat.js) in headless
//! Chromium: the real `middleman` binary on 127.0.0.1, the Python service on the client
//! library of `clients/python` (which serves the page), and three pages driven by
//! playwright-core (`tests/browser-client/chat.mjs`): join a room, talk, member lists from
//! presence, a private room another page cannot join nor read (the server refuses its SUB
//! and PUB), leaving by request and by a plain UNS (SYS:UNS), and "bob left" once bob's
//! page is closed (SYS:DISCONNECT).
//! The service is also checked with `mypy --strict`.
//!
//! Needs node, npm, /usr/bin/chromium (or `MM_CHROMIUM`) and python3 with venv (the venv,
//! under target/, gets `websockets` and `mypy` from PyPI), so a plain `cargo test` lists
//! it as ignored; under `--include-ignored` a missing tool fails it.

mod common;
mod tools;
use common::proc::Proc;
use common::{CLIENT_KEY, SERVICE_KEY};

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Bound for the browser run (it takes seconds).
const BROWSER_WAIT: Duration = Duration::from_secs(120);
/// Bound for the service to connect and serve the page.
const SERVICE_WAIT: Duration = Duration::from_secs(30);

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn browser_dir() -> PathBuf {
    root().join("tests/browser-client")
}

/// What is missing to run the test, if anything.
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
    if !tools::runs("python3", &["-c", "import venv, ensurepip"]) {
        miss.push("python3 with venv and ensurepip (apt-get install python3-venv)".to_owned());
    }
    miss
}

fn run(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A venv under target/ with websockets and mypy; returns its python.
fn python_env() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chat-example-venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        run(
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
            "python3 -m venv",
        );
    }
    if !tools::runs(python.to_str().unwrap(), &["-c", "import websockets, mypy"]) {
        run(
            Command::new(&python).args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "websockets>=13",
                "mypy",
            ]),
            "pip install websockets mypy",
        );
    }
    python
}

/// A child process of this test, killed (by its own handle, so by its PID) when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The lines a child prints on stdout and stderr, in arrival order per stream.
fn lines_of(child: &mut Child, tag: &'static str) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
    let err: Box<dyn Read + Send> = Box::new(child.stderr.take().unwrap());
    for stream in [out, err] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(stream).lines().map_while(Result::ok) {
                eprintln!("{tag}> {l}");
                let _ = tx.send(l);
            }
        });
    }
    rx
}

/// Wait up to `until` for a line starting with `prefix`, keeping every line in `seen`.
fn wait_line(
    rx: &mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    prefix: &str,
    until: Instant,
) -> String {
    if let Some(l) = seen.iter().find(|l| l.starts_with(prefix)) {
        return l.clone();
    }
    loop {
        let left = until
            .checked_duration_since(Instant::now())
            .unwrap_or_else(|| panic!("no line {prefix:?} in time; got {seen:?}"));
        match rx.recv_timeout(left) {
            Ok(l) => {
                seen.push(l.clone());
                if l.starts_with(prefix) {
                    return l;
                }
            }
            Err(e) => panic!("no line {prefix:?} ({e}); got {seen:?}"),
        }
    }
}

#[test]
#[ignore = "needs Chromium, node, npm and python3 with venv (packages from PyPI): run .ci/install-tools.sh"]
fn chat_example_in_headless_chromium() {
    tools::require("the chat example test", &missing());
    tools::npm_ci_if_needed(&browser_dir()).unwrap_or_else(|e| panic!("{e}"));
    let python = python_env();
    let src = root().join("clients/python/src");
    let service_py = root().join("examples/chat/service.py");

    // The service is typed like the client library: mypy --strict, against its sources.
    run(
        Command::new(&python)
            .args(["-m", "mypy", "--strict", "--no-incremental"])
            .arg(&service_py)
            .env("MYPYPATH", &src),
        "mypy --strict examples/chat/service.py",
    );

    let server = Proc::server();
    let addr = server.addr();
    let ws_url = format!("ws://{addr}/");

    let mut service = Killed(
        Command::new(&python)
            .arg(&service_py)
            .env("PYTHONPATH", &src)
            .env("PYTHONUNBUFFERED", "1")
            .env("MM_URL", &ws_url)
            .env("MM_KEY", SERVICE_KEY)
            .env("CHAT_HTTP", "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the chat service"),
    );
    let service_lines = lines_of(&mut service.0, "service");
    let mut seen = Vec::new();
    let until = Instant::now() + SERVICE_WAIT;
    let page_line = wait_line(&service_lines, &mut seen, "chat: page at http://", until);
    let page_url = page_line["chat: page at ".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    wait_line(&service_lines, &mut seen, "chat: ready on ", until);

    // The page after the run, kept for a look (target/tmp, not in git).
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chat-example.png");
    let _ = std::fs::remove_file(&shot);
    let mut node = Killed(
        Command::new("node")
            .arg("chat.mjs")
            .arg(&page_url)
            .arg(&ws_url)
            .arg(CLIENT_KEY)
            .arg(&shot)
            .current_dir(browser_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn node"),
    );
    let node_lines = lines_of(&mut node.0, "node");
    let deadline = Instant::now() + BROWSER_WAIT;
    let status = loop {
        if let Some(st) = node.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "node did not finish within {BROWSER_WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // Every line, until both pipes are closed (the readers then drop their senders).
    let mut out = Vec::new();
    let until = Instant::now() + Duration::from_secs(10);
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        match node_lines.recv_timeout(left) {
            Ok(l) => out.push(l),
            Err(_) => break,
        }
    }
    assert!(status.success(), "node failed ({status}): {out:?}");
    assert_eq!(
        out.iter()
            .rfind(|l| l.starts_with("chat-example: "))
            .map(String::as_str),
        Some("chat-example: 19 passed, 0 failed"),
        "{out:?}"
    );
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("{}: {e}", shot.display()));
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is no screenshot",
        shot.display()
    );

    // The service is still up, and said nothing about errors.
    assert!(
        service.0.try_wait().unwrap().is_none(),
        "the chat service exited"
    );
    drop(service); // killed by its PID
    std::thread::sleep(Duration::from_millis(200));
    seen.extend(service_lines.try_iter());
    let bad: Vec<&String> = seen
        .iter()
        .filter(|l| l.contains("Traceback") || l.contains("error"))
        .collect();
    assert!(bad.is_empty(), "the service reported: {bad:?}\n{seen:?}");
    drop(server); // killed by its PID
}
