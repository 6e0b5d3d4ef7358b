//! Lame duck (SIGUSR2, `middleman lameduck --pid PID`) on the real binary: the listeners
//! close at once (a `--reuse-port` process on the same port takes every reconnect), the
//! open connections are closed with 1001 spread over `--lame-duck-duration`, messages
//! flow until a connection's turn, a SIGTERM cuts it short, the process exits 0; in a
//! cluster the others hear at once that the node leaves.

mod common;
mod tools;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::*;
use common::nats::NatsServer;
use common::proc::{Proc, SERVER_ARGS};
use common::*;
use tungstenite::{Message, WebSocket};

/// A server with the test arguments, `extra` and `--lame-duck-duration duration`.
fn lame_duck_server(extra: &[&str], duration: &str) -> Proc {
    let args = [&SERVER_ARGS[..], extra, &["--lame-duck-duration", duration]].concat();
    Proc::start(&args, &[])
}

fn signal(p: &Proc, sig: i32) {
    // SAFETY: kill(2) on the child this test started, by its PID.
    let rc = unsafe { libc::kill(p.child.id() as i32, sig) };
    assert_eq!(rc, 0, "kill({}, {sig})", p.child.id());
}

/// Wait (bounded) for the child to exit; returns its code and when it was seen gone
/// (polled every 10 ms).
fn exit_within(p: &mut Proc, within: Duration) -> (i32, Instant) {
    let deadline = Instant::now() + within;
    loop {
        if let Some(st) = p.child.try_wait().unwrap() {
            return (st.code().unwrap_or(-1), Instant::now());
        }
        assert!(
            Instant::now() < deadline,
            "middleman still running after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Read the close frame `p` gets, answer it and hang up, as a client does (so the
/// server need not wait out its linger for this one); returns (code, reason).
fn closed_by_server(mut p: Peer) -> (u16, String) {
    let got = p.recv_close();
    let _ = p.ws.flush();
    got
}

/// One connection waiting for its close: (its WebSocket, its cid).
struct Waiting {
    ws: WebSocket<TcpStream>,
    cid: String,
}

/// `n` logged-in clients of `addr`, waiting.
fn clients(addr: SocketAddr, n: usize) -> Vec<Waiting> {
    (0..n)
        .map(|_| {
            let p = Peer::client(addr);
            Waiting {
                ws: p.ws,
                cid: p.cid,
            }
        })
        .collect()
}

/// What a connection saw: when its close frame came, its code and reason, and the cid
/// its reconnect was given.
struct Closed {
    at: Instant,
    code: u16,
    reason: String,
    new_cid: String,
}

/// Wait for every connection's close frame (polling all of them), answer it, and
/// reconnect at once to `addr` with the client key, as a client library does. Bounded
/// by `within`.
fn closes_and_reconnects(
    mut open: Vec<Waiting>,
    addr: SocketAddr,
    within: Duration,
) -> (Vec<Closed>, Vec<Peer>) {
    for w in &open {
        w.ws.get_ref().set_nonblocking(true).unwrap();
    }
    let deadline = Instant::now() + within;
    let mut closed = Vec::new();
    let mut again = Vec::new();
    while !open.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} connections not closed within {within:?}",
            open.len()
        );
        let mut fds: Vec<libc::pollfd> = open
            .iter()
            .map(|w| libc::pollfd {
                fd: w.ws.get_ref().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: poll(2) on an array of pollfd we own, its length passed with it.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
        assert!(n >= 0, "poll: {}", std::io::Error::last_os_error());
        let at = Instant::now();
        let ready: Vec<usize> = fds
            .iter()
            .enumerate()
            .filter(|(_, f)| f.revents != 0)
            .map(|(i, _)| i)
            .collect();
        for &i in ready.iter().rev() {
            let w = &mut open[i];
            let (code, reason) = loop {
                match w.ws.read() {
                    Ok(Message::Close(Some(f))) => break (u16::from(f.code), f.reason.to_string()),
                    Ok(Message::Close(None)) => break (1005, String::new()),
                    Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                    Ok(m) => panic!("[{}] unexpected {m:?}", w.cid),
                    Err(tungstenite::Error::Io(e))
                        if e.kind() == std::io::ErrorKind::WouldBlock =>
                    {
                        break (0, String::new())
                    }
                    Err(e) => panic!("[{}] no close frame: {e}", w.cid),
                }
            };
            if code == 0 {
                continue; // not the close yet
            }
            let _ = w.ws.flush(); // the close reply tungstenite queued
            let w = open.swap_remove(i);
            drop(w);
            let p = Peer::client(addr);
            closed.push(Closed {
                at,
                code,
                reason,
                new_cid: p.cid.clone(),
            });
            again.push(p);
        }
    }
    (closed, again)
}

/// The acceptance test of the lame duck: 1,000 connections and a 5 s duration, a second
/// process on the same port (`--reuse-port`) started before it.
#[test]
fn a_lame_duck_spreads_1001_closes_over_its_duration_and_a_reuse_port_process_takes_every_reconnect(
) {
    const N: usize = 1000;
    const DURATION: Duration = Duration::from_secs(5);
    let mut old = lame_duck_server(&["--reuse-port"], "5s");
    let addr = old.addr();
    let port = addr.port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let open = clients(addr, N);
    let old_prefix = open[0].cid[..6].to_owned();
    assert!(open.iter().all(|w| w.cid.starts_with(&old_prefix)));
    // The new process, on the same port, before the lame duck: from now on the kernel
    // spreads new connections over both, and none is made until the old one closes its
    // listener.
    let new_args = [
        "--listen",
        &listen,
        "--service-key",
        SERVICE_KEY,
        "--client-key",
        CLIENT_KEY,
        "--reuse-port",
    ];
    let mut new = Proc::start(&new_args, &[]);
    assert_eq!(new.addr(), addr);

    let t0 = Instant::now();
    signal(&old, libc::SIGUSR2);
    let (closed, again) = closes_and_reconnects(open, addr, DURATION + Duration::from_secs(5));
    let (code, gone_at) = exit_within(&mut old, Duration::from_secs(5));
    assert_eq!(code, 0, "{:?}", old.output_after_exit());
    let took = gone_at - t0;

    // Every connection got 1001 with the lame duck's reason.
    assert_eq!(closed.len(), N);
    for c in &closed {
        assert_eq!((c.code, c.reason.as_str()), (1001, "server going away"));
    }
    // Spread: no second holds more than 30% of the closes, and the last one comes
    // near the end of the duration, not long before it.
    let mut per_second: BTreeMap<u64, usize> = BTreeMap::new();
    for c in &closed {
        *per_second.entry((c.at - t0).as_secs()).or_default() += 1;
    }
    let busiest = per_second.values().copied().max().unwrap_or(0);
    assert!(busiest * 10 <= N * 3, "closes per second: {per_second:?}");
    let first = closed.iter().map(|c| c.at - t0).min().unwrap();
    let last = closed.iter().map(|c| c.at - t0).max().unwrap();
    assert!(
        last >= DURATION - Duration::from_millis(500) && last <= DURATION + Duration::from_secs(1),
        "last close at {last:?}"
    );
    // The process is gone soon after the last close was answered.
    assert!(
        took <= DURATION + Duration::from_secs(2),
        "exited after {took:?}"
    );
    println!(
        "closes per second {per_second:?}, first {first:?}, last {last:?}, exit after {took:?}"
    );

    // Every reconnect was taken by the new process: its cids, and its gauge.
    assert_eq!(again.len(), N);
    let new_prefix = again[0].cid[..6].to_owned();
    assert_ne!(new_prefix, old_prefix);
    assert!(closed.iter().all(|c| c.new_cid.starts_with(&new_prefix)));
    let m = metrics(addr);
    assert_eq!(
        m.get("middleman_connections{role=\"client\"}"),
        Some(&(N as f64))
    );
    assert_eq!(m.get("middleman_lame_duck"), Some(&0.0));

    let lines = old.output_after_exit();
    let start = lines
        .iter()
        .find(|l| l.contains("lame duck: "))
        .unwrap_or_else(|| panic!("no start line: {lines:?}"));
    assert!(
        start.contains("closing 1000 connections (1001) spread over 5s"),
        "{start}"
    );
    let end = lines
        .iter()
        .find(|l| l.contains("lame duck over"))
        .unwrap_or_else(|| panic!("no end line: {lines:?}"));
    assert!(
        end.contains("1000 connections closed by it, 0 closed by themselves, 0 left"),
        "{end}"
    );
    drop(again);
    signal(&new, libc::SIGTERM);
    assert_eq!(exit_within(&mut new, Duration::from_secs(10)).0, 0);
}

/// `middleman lameduck --pid`: messages flow until a connection's turn, a SIGTERM during
/// the lame duck shuts down at once, and a PID that is not middleman is not signalled.
#[test]
fn the_lameduck_command_serves_until_each_turn_and_sigterm_cuts_it_short() {
    let mut srv = lame_duck_server(&[], "30s");
    let addr = srv.addr();
    // Oldest first: the idle one goes at the first tick, the subscriber after ~10 s, the
    // publisher after ~20 s (far enough for a loaded machine to do what follows first).
    let idle = Peer::client(addr);
    let mut sub = Peer::service(addr);
    sub.send("SUB", "news", &[], "");
    sub.sync();
    let mut publ = Peer::service(addr);

    let lameduck = |pid: u32| {
        Command::new(env!("CARGO_BIN_EXE_middleman"))
            .args(["lameduck", "--pid", &pid.to_string()])
            .stdin(Stdio::null())
            .output()
            .expect("run middleman lameduck")
    };
    // Not a middleman process: refused, and the process is not signalled.
    let mut other = Command::new("sleep")
        .arg("30")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn sleep");
    let out = lameduck(other.id());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("\"sleep\", not middleman: not signalled"),
        "{err}"
    );
    assert!(other.try_wait().unwrap().is_none(), "sleep was signalled");
    let _ = other.kill(); // our own child, by its handle
    let _ = other.wait();

    let out = lameduck(srv.child.id());
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let t0 = Instant::now();
    let line = srv.wait_line("lame duck: ");
    assert!(
        line.contains("closing 3 connections (1001) spread over 30s"),
        "{line}"
    );

    assert_eq!(
        closed_by_server(idle),
        (1001, "server going away".to_owned())
    );
    // Still served: a message published now reaches the subscriber.
    publ.send("PUB", "news", &[], "during the lame duck");
    let m = sub.recv();
    assert_eq!(
        (m.target.as_str(), m.body.as_str()),
        ("news", "during the lame duck")
    );
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "not before the subscriber's turn: {:?}",
        t0.elapsed()
    );
    // The listener is closed: nothing accepts on the port any more.
    assert!(TcpStream::connect(addr).is_err(), "still accepting");

    signal(&srv, libc::SIGTERM);
    let t1 = Instant::now();
    assert_eq!(
        closed_by_server(sub),
        (1001, "server shutting down".to_owned())
    );
    assert_eq!(
        closed_by_server(publ),
        (1001, "server shutting down".to_owned())
    );
    let (code, at) = exit_within(&mut srv, Duration::from_secs(5));
    assert_eq!(code, 0);
    // At once, not at the end of the lame duck's 30 s.
    assert!(
        at - t1 < Duration::from_secs(3),
        "exit {:?} after SIGTERM",
        at - t1
    );
    let lines = srv.output_after_exit();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("shutting down: closing 2 connections")),
        "{lines:?}"
    );
}

/// With no connection open the lame duck has nothing to wait for: the process exits (0)
/// at once, whatever the duration.
#[test]
fn a_lame_duck_with_no_connection_exits_at_once() {
    let mut srv = lame_duck_server(&[], "60s");
    srv.addr();
    let t = Instant::now();
    signal(&srv, libc::SIGUSR2);
    let (code, at) = exit_within(&mut srv, Duration::from_secs(5));
    assert_eq!(code, 0);
    assert!(at - t < Duration::from_secs(1), "exit after {:?}", at - t);
    let lines = srv.output_after_exit();
    assert!(
        lines.iter().any(|l| l.contains("lame duck over")
            && l.contains("0 connections closed by it, 0 closed by themselves, 0 left")),
        "{lines:?}"
    );
}

/// Two nodes and a real nats-server: lame duck on the responder's node A fails B's
/// pending request to it at once and B's next request gets `no responder`, long before
/// the node timeout (30 s here), while A still serves its own connections, and what is
/// published on B still reaches A's subscribers.
#[test]
#[ignore = "needs nats-server (Debian package nats-server): run .ci/install-tools.sh"]
fn a_lame_duck_node_is_forgotten_by_the_others_at_once() {
    let nats = NatsServer::start();
    let url = nats.url();
    let mut a = Proc::start(
        &node_args(
            &url,
            "lame1",
            &[
                "--cluster-node-timeout",
                "30s",
                "--lame-duck-duration",
                "40s",
            ],
        ),
        &[],
    );
    let a_addr = a.addr();
    let b = node_with(&nats, "lame1", |c| c.node_timeout = Duration::from_secs(30));
    settled(&[a_addr, b.addr]);
    // Oldest first: of A's four connections the idle one goes at the first tick, the
    // local requester after ~10 s, the responder after ~20 s, the subscriber after ~30 s.
    let idle = Peer::client(a_addr);
    let mut local = Peer::client(a_addr);
    let mut svc = Peer::service(a_addr);
    svc.send("EREQ", "slow", &[], "");
    svc.sync();
    let mut sub = Peer::service(a_addr);
    sub.send("SUB", "news", &[], "");
    sub.sync();
    let mut publ = Peer::service(b.addr);
    await_route(&mut publ, &mut sub, "news");
    let mut requester = Peer::client(b.addr);
    until(10, "A's responder known on B", || {
        metric(b.addr, "middleman_cluster_remote_responders") == 1.0
    });
    requester.send("REQ", "slow", &[("ReqID", "pending-1")], "");
    assert_eq!(svc.recv().header("ReqID"), Some("pending-1"));

    let t = Instant::now();
    signal(&a, libc::SIGUSR2);
    let e = requester.recv();
    assert_eq!(
        (e.header("reason"), e.header("ReqID")),
        (Some("responder disconnected"), Some("pending-1")),
        "{e:?}"
    );
    let failed = t.elapsed();
    requester.send("REQ", "slow", &[("ReqID", "after")], "");
    let e = requester.recv();
    assert_eq!(
        (e.header("reason"), e.header("ReqID")),
        (Some("no responder"), Some("after")),
        "{e:?}"
    );
    let refused = t.elapsed();
    assert!(
        failed < Duration::from_millis(500) && refused < Duration::from_millis(500),
        "failed after {failed:?}, refused after {refused:?}"
    );
    assert_eq!(metric(b.addr, "middleman_cluster_nodes"), 0.0);
    assert_eq!(metric(b.addr, "middleman_cluster_remote_responders"), 0.0);
    // Subscriptions are not enablements: A still has the topic on the backplane.
    publ.send("PUB", "news", &[], "during the lame duck");
    let m = sub.recv();
    assert_eq!(
        (m.target.as_str(), m.body.as_str()),
        ("news", "during the lame duck")
    );

    // A still serves the connections it holds: its responder answers its local
    // requester.
    assert_eq!(
        closed_by_server(idle),
        (1001, "server going away".to_owned())
    );
    local.send("REQ", "slow", &[("ReqID", "local-1")], "ping");
    let req = svc.recv();
    assert_eq!(
        (req.cmd.as_str(), req.header("ReqID")),
        ("REQ", Some("local-1"))
    );
    let rid = req.header("rid").expect("rid").to_owned();
    svc.send("RES", "slow", &[("rid", &rid)], "pong");
    let res = local.recv();
    assert_eq!(
        (res.cmd.as_str(), res.body.as_str()),
        ("RES", "pong"),
        "{res:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    println!("B failed the pending request after {failed:?}, refused the next after {refused:?}");

    // A SIGTERM ends the lame duck at once.
    signal(&a, libc::SIGTERM);
    assert_eq!(
        closed_by_server(svc),
        (1001, "server shutting down".to_owned())
    );
    assert_eq!(
        closed_by_server(local),
        (1001, "server shutting down".to_owned())
    );
    assert_eq!(
        closed_by_server(sub),
        (1001, "server shutting down".to_owned())
    );
    assert_eq!(exit_within(&mut a, Duration::from_secs(5)).0, 0);
}

/// The zero-downtime upgrade script of the README (section "Zero-downtime upgrade"),
/// taken from README.md as it is and run with `sh`: only its configuration path and its
/// port are replaced by this test's. The new process it starts takes every connection
/// the old one closes, and the old one exits 0.
#[test]
#[ignore = "needs curl (the README's script uses it): run .ci/install-tools.sh"]
fn the_readme_zero_downtime_script_hands_every_client_over() {
    const N: usize = 50;
    let mut missing = Vec::new();
    if !tools::runs("curl", &["--version"]) {
        missing.push("curl".to_owned());
    }
    tools::require("the README's upgrade script", &missing);

    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("read README.md");
    let section = &readme[readme
        .find("### Zero-downtime upgrade")
        .expect("README: no Zero-downtime upgrade section")..];
    let start = section.find("```sh\n").expect("README: no sh block") + "```sh\n".len();
    let script = &section[start..start + section[start..].find("```").expect("unclosed block")];
    for needed in [
        "/etc/middleman/middleman.toml",
        "127.0.0.1:8765",
        "--reuse-port",
        "lameduck --pid \"$OLD\"",
    ] {
        assert!(
            script.contains(needed),
            "the script lost {needed:?}:\n{script}"
        );
    }

    let mut old = lame_duck_server(&["--reuse-port"], "2s");
    let addr = old.addr();
    let old_pid = old.child.id();
    let dir = scratch("lame-duck-readme");
    let conf = dir.join("middleman.toml");
    std::fs::write(
        &conf,
        format!(
            "listen = \"ws://{addr}\"\n\
             [[keys]]\nrole = \"service\"\nkey = \"{SERVICE_KEY}\"\n\
             [[keys]]\nrole = \"client\"\nkey = \"{CLIENT_KEY}\"\n"
        ),
    )
    .unwrap();
    let path = dir.join("upgrade.sh");
    std::fs::write(
        &path,
        script
            .replace("/etc/middleman/middleman.toml", conf.to_str().unwrap())
            .replace("127.0.0.1:8765", &addr.to_string()),
    )
    .unwrap();
    let open = clients(addr, N);
    let old_prefix = open[0].cid[..6].to_owned();

    // `middleman` on the PATH is this build; the script's output (and the new
    // process's, which outlives it) goes to a file, so nothing waits on a pipe.
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_middleman"))
        .parent()
        .unwrap();
    let log = dir.join("upgrade.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new("sh")
        .arg(&path)
        .env(
            "PATH",
            format!(
                "{}:{}",
                bin_dir.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .env("OLD", old_pid.to_string())
        .env_remove("MM_SERVICE_KEY")
        .env_remove("MM_CLIENT_KEY")
        .env_remove("MM_MONITOR_KEY")
        .env_remove("MM_LISTEN")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("run sh");
    let mut script_run = ScriptRun { child, new: None };
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = script_run.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the script did not finish within 20s:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "the script failed ({status}):\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    // The old process is in lame duck: its listener is closed (before it logs so), so
    // the port is the new one's alone, and /stats names it.
    old.wait_line("lame duck: ");
    let stats = http_get(addr, "GET /stats HTTP/1.1\r\nHost: x\r\n\r\n");
    let body = stats.split("\r\n\r\n").nth(1).unwrap_or("");
    let doc: serde_json::Value = serde_json::from_str(body).expect("/stats is JSON");
    let new_pid = doc["pid"].as_u64().expect("/stats names its pid") as u32;
    script_run.new = Some(new_pid);
    assert_ne!(new_pid, old_pid);
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{new_pid}/comm"))
            .unwrap()
            .trim_end(),
        "middleman"
    );

    let (closed, again) = closes_and_reconnects(open, addr, Duration::from_secs(10));
    assert_eq!(closed.len(), N);
    assert!(closed
        .iter()
        .all(|c| (c.code, c.reason.as_str()) == (1001, "server going away")));
    let new_prefix = again[0].cid[..6].to_owned();
    assert_ne!(new_prefix, old_prefix);
    assert!(again.iter().all(|p| p.cid.starts_with(&new_prefix)));
    assert_eq!(exit_within(&mut old, Duration::from_secs(5)).0, 0);
    let m = metrics(addr);
    assert_eq!(
        m.get("middleman_connections{role=\"client\"}"),
        Some(&(N as f64))
    );
    drop(again);

    // The new process is ours to end: SIGTERM, and it is gone within the grace.
    // SAFETY: kill(2) on the process the script (our child) started, by its PID.
    assert_eq!(unsafe { libc::kill(new_pid as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while running(new_pid) {
        assert!(Instant::now() < deadline, "the new process did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    script_run.new = None;
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(log.contains("signal received: shutting down"), "{log}");
}

/// Whether `pid` is a live process (a zombie counts as gone: nothing may reap an
/// orphan in a container).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = &s[s.rfind(')')? + 1..];
            after.split_whitespace().next().map(|st| st != "Z")
        })
        .unwrap_or(false)
}

/// The README's script and the process it started: both killed (by PID) if the test
/// fails half-way.
struct ScriptRun {
    child: std::process::Child,
    new: Option<u32>,
}

impl Drop for ScriptRun {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // Its children (the new server, curl, sleep) first: they are ours too.
            let pid = self.child.id();
            let kids = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            for k in kids
                .split_whitespace()
                .filter_map(|k| k.parse::<i32>().ok())
            {
                // SAFETY: kill(2) on a child of our own child, by its PID.
                unsafe { libc::kill(k, libc::SIGKILL) };
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(pid) = self.new.filter(|&p| running(p)) {
            // SAFETY: kill(2) on the server the script started, by its PID.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}
