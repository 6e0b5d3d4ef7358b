//! The command-line client (`middleman sub|pub|req|reply`, the real binary) against an
//! in-process server on 127.0.0.1:0: output lines and exit codes.

mod common;
use common::{TestServer, CLIENT_KEY, SERVICE_KEY};

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use middleman::client::Client;

const WAIT: Duration = Duration::from_secs(10);

fn cmd(srv: &TestServer, key: &str, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_middleman"));
    c.args(args)
        .env("MM_URL", srv.url())
        .env("MM_KEY", key)
        .env_remove("MM_LISTEN")
        .env_remove("MM_SERVICE_KEY")
        .env_remove("MM_CLIENT_KEY")
        .env_remove("MM_MONITOR_KEY")
        .stdin(Stdio::null());
    c
}

/// Run to completion (bounded): (exit code, stdout, stderr).
fn run(srv: &TestServer, key: &str, args: &[&str]) -> (i32, String, String) {
    let child = cmd(srv, key, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn middleman");
    finish(Bg::from(child))
}

/// A running child whose stderr lines are collected as they come.
struct Bg {
    child: Child,
    err_lines: mpsc::Receiver<String>,
    err_seen: Vec<String>,
}

impl From<Child> for Bg {
    fn from(mut child: Child) -> Bg {
        let (tx, err_lines) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Bg {
            child,
            err_lines,
            err_seen: Vec::new(),
        }
    }
}

impl Bg {
    fn spawn(srv: &TestServer, key: &str, args: &[&str]) -> Bg {
        let child = cmd(srv, key, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn middleman");
        Bg::from(child)
    }

    /// Wait for a stderr line starting with `prefix`.
    fn wait_err(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + WAIT;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.err_lines.recv_timeout(left) {
                Ok(l) => {
                    self.err_seen.push(l.clone());
                    if l.starts_with(prefix) {
                        return l;
                    }
                }
                Err(_) => break,
            }
        }
        panic!(
            "no stderr line {prefix:?} within {WAIT:?}; saw {:?}",
            self.err_seen
        );
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill(); // our own child, by its handle
            let _ = self.child.wait();
        }
    }
}

/// Wait (bounded) for the child to exit: (code, stdout, stderr).
fn finish(mut bg: Bg) -> (i32, String, String) {
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(st) = bg.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "middleman did not exit within {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    if let Some(mut o) = bg.child.stdout.take() {
        o.read_to_string(&mut out).unwrap();
    }
    let mut err: Vec<String> = std::mem::take(&mut bg.err_seen);
    while let Ok(l) = bg.err_lines.recv_timeout(Duration::from_secs(2)) {
        err.push(l);
    }
    let err = err.into_iter().map(|l| l + "\n").collect();
    (status.code().unwrap_or(-1), out, err)
}

#[test]
fn sub_and_pub() {
    let srv = TestServer::start();
    let mut sub = Bg::spawn(&srv, SERVICE_KEY, &["sub", "news", "-n", "3"]);
    let line = sub.wait_err("middleman: subscribed to news as ");
    assert!(line.len() > "middleman: subscribed to news as ".len());

    assert_eq!(
        run(&srv, SERVICE_KEY, &["pub", "news", "hello"]),
        (0, "".into(), "".into())
    );
    assert_eq!(
        run(
            &srv,
            SERVICE_KEY,
            &[
                "pub",
                "news",
                "two\nlines\\ \t.",
                "-H",
                "X-A: 1",
                "-H",
                "b:2"
            ]
        ),
        (0, "".into(), "".into())
    );
    let mut svc = Client::connect(&srv.url(), SERVICE_KEY).unwrap();
    svc.publish("news", &[], [b'o', b'k', 0xff]).unwrap();
    svc.sync().unwrap();
    let (code, out, err) = finish(sub);
    assert_eq!(
        (code, out.as_str()),
        (0, "hello\ntwo\\nlines\\\\ \\t.\nok\\xff\n"),
        "{err}"
    );
}

#[test]
fn sub_verbose_prints_headers() {
    let srv = TestServer::start();
    let mut sub = Bg::spawn(&srv, SERVICE_KEY, &["sub", "a", "b", "-n", "2", "-v"]);
    sub.wait_err("middleman: subscribed to a b as ");
    let mut svc = Client::connect(&srv.url(), SERVICE_KEY).unwrap();
    svc.publish("b", &[("K", "v")], "x").unwrap();
    svc.publish("a", &[], "").unwrap();
    let (code, out, _) = finish(sub);
    let cid = svc.cid();
    assert_eq!(code, 0);
    assert_eq!(
        out,
        format!("PUB b\tK: v\tcid: {cid}\tuid: \tx\nPUB a\tcid: {cid}\tuid: \t\n")
    );
}

#[test]
fn pub_refused_exits_1() {
    let srv = TestServer::start();
    let (code, out, err) = run(&srv, CLIENT_KEY, &["pub", "closed", "x"]);
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (1, "", "middleman: not permitted: PUB closed\n")
    );
    let (code, _, err) = run(&srv, CLIENT_KEY, &["sub", "closed"]);
    assert_eq!(
        (code, err.as_str()),
        (1, "middleman: not permitted: SUB closed\n")
    );
}

#[test]
fn req_and_reply_echo() {
    let srv = TestServer::start();
    let mut reply = Bg::spawn(&srv, SERVICE_KEY, &["reply", "echo", "--echo", "-n", "2"]);
    let line = reply.wait_err("middleman: answering echo as ");
    let reply_cid = line.rsplit(' ').next().unwrap().to_owned();

    assert_eq!(
        run(&srv, CLIENT_KEY, &["req", "echo", "hi there"]),
        (0, "hi there\n".into(), "".into())
    );
    let (code, out, err) = run(&srv, CLIENT_KEY, &["req", "echo", ".x", "-v", "-H", "T:1"]);
    assert_eq!(
        (code, out, err),
        (
            0,
            format!("RES echo\tReqID: r1\tcid: {reply_cid}\tuid: \t.x\n"),
            "".into()
        )
    );
    let (code, out, err) = finish(reply);
    assert_eq!((code, out.as_str()), (0, "hi there\n.x\n"), "{err}");
}

#[test]
fn reply_with_fixed_body_and_verbose() {
    let srv = TestServer::start();
    let mut reply = Bg::spawn(
        &srv,
        SERVICE_KEY,
        &["reply", "t", "--body", "fixed", "-n", "1", "-v"],
    );
    reply.wait_err("middleman: answering t as ");
    let mut c = Client::connect(&srv.url(), CLIENT_KEY).unwrap();
    let res = c.request("t", &[("A", "b")], "q", WAIT).unwrap();
    assert_eq!(res.body, b"fixed");
    let (code, out, _) = finish(reply);
    assert_eq!(code, 0);
    let rid_and_rest = out
        .strip_prefix("REQ t\tReqID: r1\tA: b\trid: ")
        .unwrap_or_else(|| panic!("{out:?}"));
    assert_eq!(
        rid_and_rest.split_once('\t').map(|x| x.1),
        Some(format!("cid: {}\tuid: \tq\n", c.cid()).as_str())
    );
}

#[test]
fn req_errors_and_exit_codes() {
    let srv = TestServer::with(|c| c.request_timeout = Duration::from_millis(300));
    assert_eq!(
        run(&srv, SERVICE_KEY, &["req", "nobody", "x"]),
        (1, "".into(), "middleman: no responder: REQ nobody\n".into())
    );
    // A responder that never answers: the client gives up first (exit 4) ...
    let mut silent = Client::connect(&srv.url(), SERVICE_KEY).unwrap();
    silent.enable_requests("silent").unwrap();
    let (code, out, err) = run(
        &srv,
        SERVICE_KEY,
        &["req", "silent", "x", "--timeout", "100ms"],
    );
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (4, "", "middleman: timed out\n")
    );
    // ... or the server does (also exit 4).
    let (code, out, err) = run(
        &srv,
        SERVICE_KEY,
        &["req", "silent", "x", "--timeout", "5s"],
    );
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (4, "", "middleman: request timed out: REQ silent\n")
    );
    assert_eq!(silent.recv().unwrap().cmd, "REQ");
    assert_eq!(silent.recv().unwrap().cmd, "REQ");
}

#[test]
fn responder_disconnect_exits_1() {
    let srv = TestServer::start();
    let mut responder = Client::connect(&srv.url(), SERVICE_KEY).unwrap();
    responder.enable_requests("flaky").unwrap();
    let req = Bg::spawn(&srv, CLIENT_KEY, &["req", "flaky", "x"]);
    assert_eq!(responder.recv().unwrap().target, "flaky");
    drop(responder);
    assert_eq!(
        finish(req),
        (
            1,
            "".into(),
            "middleman: responder disconnected: REQ flaky\n".into()
        )
    );
}

#[test]
fn connection_and_usage_failures() {
    let srv = TestServer::start();
    let (code, _, err) = run(&srv, "wrong-key", &["sub", "t"]);
    assert_eq!(
        (code, err.as_str()),
        (3, "middleman: the server refused the key\n")
    );

    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let url = format!("ws://127.0.0.1:{port}/");
    let (code, _, err) = run(&srv, SERVICE_KEY, &["pub", "t", "x", "--url", &url]);
    assert_eq!(code, 3, "{err}");
    // The URL is named, and the error said once.
    let refused = format!("middleman: cannot connect to {url}: Connection refused");
    assert!(err.starts_with(&refused), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    for args in [
        &["pub", "t"][..],                       // no body
        &["pub", "t", "x", "-H", "nocolon"][..], // bad header
        &["req", "t", "x", "--timeout", "soon"][..],
        &["reply", "t"][..], // neither --echo nor --body
        &["pub", "t\nx", "b"][..],
        &["pub", "t", "x", "--url", "http://127.0.0.1:1/"][..],
    ] {
        let (code, out, err) = run(&srv, SERVICE_KEY, args);
        assert_eq!((code, out.as_str()), (2, ""), "{args:?}: {err}");
        assert!(!err.is_empty());
    }
    // No key at all (nor an empty one): usage, naming both ways to give one, and
    // neither showing --url (it has a default) as required nor reading stdin first.
    for (cmd, key) in [
        (&["sub", "t"][..], None),
        (&["pub", "t", "-"][..], None),
        (&["req", "t", "x"][..], Some("")),
        (&["reply", "t", "--echo"][..], None),
    ] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_middleman"));
        c.args(cmd).env("MM_URL", srv.url());
        match key {
            Some(k) => c.env("MM_KEY", k),
            None => c.env_remove("MM_KEY"),
        };
        let out = c.stdin(Stdio::piped()).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            (out.status.code(), err.as_ref()),
            (
                Some(2),
                "middleman: no key: give --key KEY or set the MM_KEY environment variable\n"
            ),
            "{cmd:?}"
        );
    }
    // The help names the variable beside --key.
    let out = Command::new(env!("CARGO_BIN_EXE_middleman"))
        .args(["sub", "--help"])
        .env_remove("MM_KEY")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    let key_line = help.lines().find(|l| l.contains("--key <KEY>")).unwrap();
    assert!(help.contains("[env: MM_KEY"), "{help}");
    assert!(!key_line.contains("[required]"), "{help}");
    assert!(
        help.contains("API key (a service key or a client key); required, here or in MM_KEY"),
        "{help}"
    );
    assert!(!help.contains("clap"), "{help}");
    let usage = help.lines().find(|l| l.starts_with("Usage:")).unwrap();
    assert!(!usage.contains("--url"), "{usage}");
}

/// A start-up error of the server is said once on stderr (it used to be logged and
/// printed), for a busy address and for an invalid configuration.
#[test]
fn server_start_up_errors_are_printed_once() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap();
    let listen = format!("ws://{addr}");
    let bad_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-startup");
    std::fs::create_dir_all(&bad_dir).unwrap();
    let bad = bad_dir.join("bad.toml");
    std::fs::write(
        &bad,
        "listen = [\"ws://127.0.0.1:0\"]\n[limits]\nmax_connections = 0\n",
    )
    .unwrap();
    for (args, expect) in [
        (
            // error level: an open-file limit warning would be a line of its own, but the
            // old duplicate was logged at error level, so it would still show.
            vec!["--listen", listen.as_str(), "--log-level", "error"],
            format!("middleman: cannot listen on {listen}: Address already in use"),
        ),
        (
            vec!["--config", bad.to_str().unwrap()],
            format!(
                "middleman: invalid configuration: limits.max_connections ({}:3): 0 is below the minimum 1",
                bad.display()
            ),
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_middleman"))
            .args(&args)
            .env_remove("MM_CONFIG")
            .env_remove("MM_LOG_LEVEL")
            .env_remove("MM_LISTEN")
            .env_remove("MM_SERVICE_KEY")
            .env_remove("MM_CLIENT_KEY")
            .env_remove("MM_MONITOR_KEY")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(lines[0].starts_with(&expect), "{args:?}: {err}");
        // The message itself, not only its first words, appears once.
        let tail = lines[0].split(": ").last().unwrap();
        assert_eq!(err.matches(tail).count(), 1, "{err}");
    }
    drop(busy);
}

#[test]
fn sub_ends_with_3_when_the_server_goes_away() {
    let srv = TestServer::start();
    let mut sub = Bg::spawn(&srv, SERVICE_KEY, &["sub", "t"]);
    sub.wait_err("middleman: subscribed to t as ");
    srv.stop().unwrap();
    let (code, out, err) = finish(sub);
    assert_eq!((code, out.as_str()), (3, ""));
    assert!(err.contains("middleman: connection closed (1001"), "{err}");
}

#[test]
fn body_from_stdin() {
    let srv = TestServer::start();
    let mut reply = Bg::spawn(&srv, SERVICE_KEY, &["reply", "e", "--echo", "-n", "1"]);
    reply.wait_err("middleman: answering e as ");
    let mut child = cmd(&srv, SERVICE_KEY, &["req", "e", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"from\nstdin").unwrap();
    }
    assert_eq!(
        finish(Bg::from(child)),
        (0, "from\\nstdin\n".into(), "".into())
    );
    assert_eq!(finish(reply).0, 0);
}

#[test]
fn presence_lists_who_is_subscribed() {
    let srv = TestServer::start();
    let mut svc = Client::connect(&srv.url(), SERVICE_KEY).unwrap();
    let a = Client::connect(&srv.url(), CLIENT_KEY).unwrap();
    let b = Client::connect(&srv.url(), CLIENT_KEY).unwrap();
    svc.set_uid(a.cid(), "alice").unwrap();
    svc.subscribe_for(a.cid(), "room").unwrap();
    svc.subscribe_for(b.cid(), "room").unwrap();
    let mut lines = [format!("{} alice", a.cid()), b.cid().to_owned()];
    lines.sort();
    let (code, out, err) = run(&srv, SERVICE_KEY, &["presence", "room"]);
    assert_eq!(
        (code, out),
        (
            0,
            format!("count: 2\tusers: 1\n{}\n{}\n", lines[0], lines[1])
        ),
        "{err}"
    );
    let (code, out, _) = run(&srv, SERVICE_KEY, &["presence", "room", "--limit", "1"]);
    assert_eq!(
        (code, out),
        (
            0,
            format!("count: 2\tusers: 1\ttruncated: true\n{}\n", lines[0])
        )
    );
    let (code, out, _) = run(&srv, SERVICE_KEY, &["presence", "nobody"]);
    assert_eq!((code, out.as_str()), (0, "count: 0\tusers: 0\n"));
    let (code, out, err) = run(&srv, CLIENT_KEY, &["presence", "room"]);
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (1, "", "middleman: not permitted: REQ SYS:PRESENCE\n")
    );
    let (code, _, _) = run(&srv, SERVICE_KEY, &["presence", "room", "--limit", "x"]);
    assert_eq!(code, 2);
}

#[test]
fn kick_closes_a_connection_with_4000() {
    let srv = TestServer::start();
    let mut c = Client::connect(&srv.url(), CLIENT_KEY).unwrap();
    let cid = c.cid().to_owned();
    assert_eq!(
        run(&srv, SERVICE_KEY, &["kick", &cid, "--reason", "go away"]),
        (0, "".into(), "".into())
    );
    match c.recv_timeout(WAIT) {
        Err(middleman::client::Error::Closed { code, reason }) => {
            assert_eq!((code, reason.as_str()), (4000, "go away"))
        }
        other => panic!("expected the kick, got {other:?}"),
    }
    // Gone already: no error. Not a cid, or a client key: refused (exit 1).
    assert_eq!(run(&srv, SERVICE_KEY, &["kick", &cid]).0, 0);
    let (code, _, err) = run(&srv, SERVICE_KEY, &["kick", "NOT-A-CID"]);
    assert_eq!((code, err.as_str()), (1, "middleman: bad cid: INT KICK\n"));
    let (code, _, err) = run(&srv, CLIENT_KEY, &["kick", &cid]);
    assert_eq!(
        (code, err.as_str()),
        (1, "middleman: not permitted: INT KICK\n")
    );
}

#[test]
fn sub_prints_connection_events_with_their_headers() {
    let srv = TestServer::start();
    let mut sub = Bg::spawn(&srv, SERVICE_KEY, &["sub", "SYS:DISCONNECT", "-n", "1"]);
    sub.wait_err("middleman: subscribed to SYS:DISCONNECT as ");
    let mut svc = Client::connect(&srv.url(), SERVICE_KEY).unwrap();
    let c = Client::connect(&srv.url(), CLIENT_KEY).unwrap();
    let cid = c.cid().to_owned();
    svc.set_uid(&cid, "u-1").unwrap();
    svc.kick(&cid, Some("spam")).unwrap();
    let (code, out, err) = finish(sub);
    assert_eq!(
        (code, out),
        (
            0,
            format!("SYS:DISCONNECT\tcid: {cid}\tuid: u-1\trole: client\treason: kicked\n")
        ),
        "{err}"
    );
    // A client key may not.
    let (code, _, err) = run(&srv, CLIENT_KEY, &["sub", "SYS:DISCONNECT"]);
    assert_eq!(
        (code, err.as_str()),
        (1, "middleman: not permitted: SUB SYS:DISCONNECT\n")
    );
}
