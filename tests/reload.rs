//! Reloading the configuration (SIGHUP, `middleman reload --pid`), against the real
//! binary started with a configuration file and key files in a scratch folder: keys
//! added and removed, the TLS pair replaced, a limit lowered, invalid configurations
//! refused whole, restart-only settings named, a storm of signals; and `--check-config`
//! on a bad TLS pair.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::proc::Proc;
use common::{metrics, parse_one, wire, wss_connect, Peer, TlsStream, SERVICE_KEY, WAIT};
use tungstenite::{Message, WebSocket};

const CLI_A: &str = "reload-cli-a-5e0d1f7c93";
const CLI_B: &str = "reload-cli-b-28a4c6e0b1";

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A configuration file: these listeners, the service key, client keys from
/// client.keys, and `extra` TOML at the end.
fn write_conf(dir: &Path, listen: &[&str], extra: &str) -> PathBuf {
    let listen: Vec<String> = listen.iter().map(|l| format!("{l:?}")).collect();
    let conf = dir.join("middleman.toml");
    std::fs::write(
        &conf,
        format!(
            "listen = [{}]\n\n[[keys]]\nrole = \"service\"\nkey = \"{SERVICE_KEY}\"\n\n\
             [[keys]]\nrole = \"client\"\nkey_file = \"client.keys\"\n{extra}",
            listen.join(", ")
        ),
    )
    .unwrap();
    conf
}

fn write_keys(dir: &Path, keys: &[&str]) {
    std::fs::write(dir.join("client.keys"), format!("{}\n", keys.join("\n"))).unwrap();
}

fn start(conf: &Path) -> (Proc, SocketAddr) {
    let p = Proc::start(&["--config", conf.to_str().unwrap()], &[]);
    let addr = p.addr();
    (p, addr)
}

fn hup(p: &Proc) {
    // SAFETY: kill(2) on the child this test started, by its PID.
    let rc = unsafe { libc::kill(p.child.id() as i32, libc::SIGHUP) };
    assert_eq!(rc, 0);
}

fn reloads(addr: SocketAddr) -> (u64, u64) {
    let m = metrics(addr);
    let get = |r: &str| {
        m.get(&format!("middleman_config_reloads_total{{result=\"{r}\"}}"))
            .copied()
            .unwrap_or(-1.0) as u64
    };
    (get("ok"), get("invalid"))
}

/// Wait (10 s at most) until the reload counters are (ok, invalid).
fn until_reloads(addr: SocketAddr, want: (u64, u64)) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = reloads(addr);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "reloads (ok, invalid) {got:?}, expected {want:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A key refused: close 1008 `bad key`.
fn refused(addr: SocketAddr, key: &str) -> (u16, String) {
    let mut ws = common::ws_connect(addr);
    ws.send(Message::text(key)).unwrap();
    common::recv_close(&mut ws)
}

#[test]
fn an_added_client_key_logs_in_without_a_restart() {
    let dir = scratch("reload-add-key");
    write_keys(&dir, &[CLI_A]);
    let conf = write_conf(&dir, &["ws://127.0.0.1:0"], "");
    let (p, addr) = start(&conf);
    let hash0 = stats_config(addr).1;
    assert_eq!(refused(addr, CLI_B), (1008, "bad key".into()));
    let mut a = Peer::connect(addr, CLI_A);

    write_keys(&dir, &[CLI_A, CLI_B]);
    // The subcommand, as an operator would use it.
    let out = Command::new(env!("CARGO_BIN_EXE_middleman"))
        .args(["reload", "--pid", &p.child.id().to_string()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    until_reloads(addr, (1, 0));
    let line = p.wait_line("configuration reloaded");
    assert!(line.contains("client keys +1 -0"), "{line}");
    assert!(!line.contains(CLI_B) && !line.contains(CLI_A), "{line}");
    let mut b = Peer::connect(addr, CLI_B);
    b.sync();
    a.sync(); // untouched
              // The configuration in effect is shown with its load time and hash.
    let (loaded_ms, hash, ok) = stats_config(addr);
    assert_eq!(ok, 1);
    assert_eq!(hash.len(), 16, "{hash}");
    // Keys enter the hash only as their number per role: one more client key.
    assert_ne!(hash, hash0);
    assert!(loaded_ms > 0);
    let console = common::http_get(addr, "GET /console HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(console.contains("id=\"config\"") && console.contains("s.config.hash"));

    // `reload --pid 0` would signal a process group: refused as usage.
    let out = Command::new(env!("CARGO_BIN_EXE_middleman"))
        .args(["reload", "--pid", "0"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// (loaded_at_ms, hash, reloads ok) from /stats.
fn stats_config(addr: SocketAddr) -> (u64, String, u64) {
    let resp = common::http_get(addr, "GET /stats HTTP/1.1\r\nHost: x\r\n\r\n");
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("");
    let doc: serde_json::Value = serde_json::from_str(body).unwrap();
    let c = &doc["config"];
    (
        c["loaded_at_ms"].as_u64().unwrap(),
        c["hash"].as_str().unwrap().to_owned(),
        c["reloads_total"]["ok"].as_u64().unwrap(),
    )
}

#[test]
fn a_removed_key_closes_exactly_its_connections_while_others_stream_on() {
    const GOOD: usize = 100;
    const DOOMED: usize = 5;
    let dir = scratch("reload-remove-key");
    write_keys(&dir, &[CLI_A, CLI_B]);
    let conf = write_conf(&dir, &["ws://127.0.0.1:0"], "");
    let (p, addr) = start(&conf);

    let mut publisher = Peer::service(addr);
    publisher.send("ESUB", "feed", &[], "");
    publisher.sync();
    let subscribe = |key: &str| {
        let mut s = Peer::connect(addr, key);
        s.send("SUB", "feed", &[], "");
        s.sync();
        s
    };
    let good: Vec<Peer> = (0..GOOD).map(|_| subscribe(CLI_A)).collect();
    let mut doomed: Vec<Peer> = (0..DOOMED).map(|_| subscribe(CLI_B)).collect();

    // Every subscriber reads until END and checks that it saw 0, 1, 2, ... in order.
    let readers: Vec<_> = good
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || {
                let got = read_sequence(&mut s);
                (got, s) // kept open until the counts are checked
            })
        })
        .collect();
    fn read_sequence(s: &mut Peer) -> Result<u64, String> {
        let mut next = 0u64;
        loop {
            let m = s.recv();
            if let Some(total) = m.body.strip_prefix("END ") {
                let total: u64 = total.parse().map_err(|_| m.body.clone())?;
                return if next == total {
                    Ok(next)
                } else {
                    Err(format!("got {next} of {total}"))
                };
            }
            let n: u64 = m.body.parse().map_err(|_| format!("{m:?}"))?;
            if n != next {
                return Err(format!("expected {next}, got {n}"));
            }
            next += 1;
        }
    }

    // The publisher streams until told the reload is done, then 200 more, then END.
    let sent = Arc::new(AtomicU64::new(0));
    let reloaded = Arc::new(AtomicBool::new(false));
    let pub_thread = {
        let (sent, reloaded) = (sent.clone(), reloaded.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            let mut stop_at = None;
            while stop_at != Some(n) && n < 50_000 {
                publisher.send("PUB", "feed", &[], &n.to_string());
                n += 1;
                sent.store(n, Ordering::SeqCst);
                if stop_at.is_none() && reloaded.load(Ordering::SeqCst) {
                    stop_at = Some(n + 200);
                }
                if n.is_multiple_of(20) {
                    // Pacing, so 100 subscribers keep up (not synchronisation).
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            publisher.send("PUB", "feed", &[], &format!("END {n}"));
            publisher.sync();
            n
        })
    };
    let deadline = Instant::now() + WAIT;
    while sent.load(Ordering::SeqCst) < 300 {
        assert!(Instant::now() < deadline, "publisher did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    write_keys(&dir, &[CLI_A]);
    hup(&p);
    for d in &mut doomed {
        assert_eq!(d.recv_close(), (1008, "key revoked".into()));
    }
    until_reloads(addr, (1, 0));
    reloaded.store(true, Ordering::SeqCst);
    let total = pub_thread.join().unwrap();
    eprintln!("{total} messages published to {GOOD} subscribers across the reload");
    assert!(total > 300, "{total}");
    let mut kept = Vec::new();
    for r in readers {
        let (got, peer) = r.join().unwrap();
        assert_eq!(got, Ok(total));
        kept.push(peer);
    }
    // A closed connection is counted once it is gone (the peer answered the close or
    // hung up): the doomed ones hang up now.
    drop(doomed);
    let deadline = Instant::now() + WAIT;
    let m = loop {
        let m = metrics(addr);
        if m["middleman_connections_closed_total{reason=\"bad_key\"}"] == DOOMED as f64
            || Instant::now() > deadline
        {
            break m;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        m["middleman_connections_closed_total{reason=\"bad_key\"}"],
        DOOMED as f64
    );
    assert_eq!(m["middleman_connections{role=\"client\"}"], GOOD as f64);
    assert_eq!(m["middleman_slow_consumers_total"], 0.0);
    let line = p.wait_line("configuration reloaded");
    assert!(line.contains("client keys +0 -1"), "{line}");
    p.wait_line(&format!(
        "closing {DOOMED} connection(s) whose key was removed"
    ));
    // The removed key no longer logs in; the kept one does.
    assert_eq!(refused(addr, CLI_B), (1008, "bad key".into()));
    Peer::connect(addr, CLI_A).sync();
}

/// A self-signed certificate for localhost: (certificate PEM, key PEM, certificate DER).
fn make_cert() -> (String, String, Vec<u8>) {
    let c =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    (
        c.cert.pem(),
        c.signing_key.serialize_pem(),
        c.cert.der().to_vec(),
    )
}

/// Open a wss connection trusting `trusted`, log in with CLI_A; returns the socket and
/// the end-entity certificate the server presented.
fn wss_login(addr: SocketAddr, trusted: &[&[u8]]) -> (WebSocket<TlsStream>, Vec<u8>) {
    let mut ws = wss_connect(addr, trusted);
    ws.send(Message::text(CLI_A)).unwrap();
    assert_eq!(next_data(&mut ws), b"MM OK");
    next_data(&mut ws); // the cid
    let presented = ws
        .get_ref()
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap();
    (ws, presented)
}

fn next_data<S: Read + Write>(ws: &mut WebSocket<S>) -> Vec<u8> {
    loop {
        match ws.read().expect("read") {
            Message::Text(t) => return t.as_bytes().to_vec(),
            Message::Binary(b) => return b.to_vec(),
            Message::Close(f) => panic!("closed: {f:?}"),
            _ => {}
        }
    }
}

/// A round trip: an unknown command always gets an error back.
fn round_trip<S: Read + Write>(ws: &mut WebSocket<S>) {
    ws.send(Message::text(wire("SYNC", "x", &[], "t"))).unwrap();
    let m = parse_one(&next_data(ws));
    assert_eq!(
        (m.cmd.as_str(), m.target.as_str()),
        ("PUB", "ERROR"),
        "{m:?}"
    );
}

/// The wss:// address in the "listening on" line.
fn wss_addr(p: &Proc) -> SocketAddr {
    let l = p.wait_line("listening on ");
    let rest = &l[l.find("wss://").unwrap() + 6..];
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn a_replaced_tls_pair_serves_new_handshakes_while_old_connections_go_on() {
    let dir = scratch("reload-tls");
    let (cert_a, key_a, der_a) = make_cert();
    let (cert_b, key_b, der_b) = make_cert();
    std::fs::write(dir.join("tls.crt"), &cert_a).unwrap();
    std::fs::write(dir.join("tls.key"), &key_a).unwrap();
    write_keys(&dir, &[CLI_A]);
    let conf = write_conf(&dir, &["ws://127.0.0.1:0", "wss://127.0.0.1:0"], "");
    // tls_cert and tls_key are top-level settings: before the first table.
    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(
        &conf,
        format!("tls_cert = \"tls.crt\"\ntls_key = \"tls.key\"\n{text}"),
    )
    .unwrap();
    let (p, addr) = start(&conf);
    let wss = wss_addr(&p);
    let trusted: [&[u8]; 2] = [&der_a, &der_b];
    let (mut old, presented) = wss_login(wss, &trusted);
    assert_eq!(presented, der_a);

    // Bad pairs first: each refused whole, the old pair still served.
    let bad: [(&str, &str, &str); 3] = [
        ("garbage certificate", "not a certificate\n", key_a.as_str()),
        (
            "key of another certificate",
            cert_a.as_str(),
            key_b.as_str(),
        ),
        (
            "garbage key",
            cert_a.as_str(),
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        ),
    ];
    for (i, (what, cert, key)) in bad.iter().enumerate() {
        std::fs::write(dir.join("tls.crt"), cert).unwrap();
        std::fs::write(dir.join("tls.key"), key).unwrap();
        hup(&p);
        until_reloads(addr, (0, i as u64 + 1));
        let (_, presented) = wss_login(wss, &trusted);
        assert_eq!(presented, der_a, "after a {what}");
    }
    let refused_line = p.wait_line("reload refused");
    assert!(refused_line.contains("tls_cert ("), "{refused_line}");
    p.wait_line("does not match the certificate");
    // An unreadable certificate file (a folder in its place).
    std::fs::remove_file(dir.join("tls.crt")).unwrap();
    std::fs::create_dir(dir.join("tls.crt")).unwrap();
    hup(&p);
    until_reloads(addr, (0, 4));
    std::fs::remove_dir(dir.join("tls.crt")).unwrap();

    std::fs::write(dir.join("tls.crt"), &cert_b).unwrap();
    std::fs::write(dir.join("tls.key"), &key_b).unwrap();
    hup(&p);
    until_reloads(addr, (1, 4));
    let line = p.wait_line("configuration reloaded");
    assert!(line.contains("TLS certificate and key reloaded"), "{line}");
    let (mut new, presented) = wss_login(wss, &trusted);
    assert_eq!(presented, der_b);
    round_trip(&mut new);
    // The connection opened under the old certificate goes on.
    round_trip(&mut old);
    assert_eq!(
        old.get_ref().conn.peer_certificates().unwrap()[0].as_ref(),
        der_a.as_slice()
    );
}

#[test]
fn a_lowered_message_limit_holds_on_an_open_connection() {
    let dir = scratch("reload-limit");
    write_keys(&dir, &[CLI_A]);
    let conf = write_conf(
        &dir,
        &["ws://127.0.0.1:0"],
        "\n[limits]\nmax_message_bytes = \"1MiB\"\n",
    );
    let (p, addr) = start(&conf);
    let mut svc = Peer::service(addr);
    let big = "x".repeat(4000);
    svc.send("PUB", "t", &[], &big);
    svc.sync();

    write_conf(
        &dir,
        &["ws://127.0.0.1:0"],
        "\n[limits]\nmax_message_bytes = 2048\n",
    );
    hup(&p);
    until_reloads(addr, (1, 0));
    let line = p.wait_line("configuration reloaded");
    assert!(
        line.contains("limits.max_message_bytes 1048576 -> 2048"),
        "{line}"
    );
    svc.send("PUB", "t", &[], &"y".repeat(1000));
    svc.sync(); // below the new limit: still fine
    svc.send("PUB", "t", &[], &big);
    assert_eq!(svc.recv_close().0, 1009);
}

#[test]
fn an_invalid_configuration_changes_nothing() {
    let dir = scratch("reload-invalid");
    write_keys(&dir, &[CLI_A]);
    let conf = write_conf(
        &dir,
        &["ws://127.0.0.1:0"],
        "\n[limits]\nmax_subscriptions = 5\n",
    );
    let good = std::fs::read_to_string(&conf).unwrap();
    let (p, addr) = start(&conf);
    let mut a = Peer::connect(addr, CLI_A);

    // A bad value (named by file:line:col), then a missing key file, then a broken file.
    std::fs::write(
        &conf,
        good.replace("max_subscriptions = 5", "max_subscriptions = \"lots\""),
    )
    .unwrap();
    write_keys(&dir, &[CLI_B]); // would revoke CLI_A if anything were applied
    hup(&p);
    until_reloads(addr, (0, 1));
    let line = p.wait_line("reload refused");
    // The value is on line 12, from column 21.
    let at = format!("{}:12:21: limits.max_subscriptions", conf.display());
    assert!(line.contains("ERROR") && line.contains(&at), "{line}");

    std::fs::write(&conf, &good).unwrap();
    std::fs::remove_file(dir.join("client.keys")).unwrap();
    hup(&p);
    until_reloads(addr, (0, 2));
    let line = p.wait_line("client.keys");
    assert!(
        line.contains("ERROR") && line.contains("reload refused"),
        "{line}"
    );

    write_keys(&dir, &[CLI_B]);
    std::fs::write(&conf, format!("{good}\n[limits\n")).unwrap();
    hup(&p);
    until_reloads(addr, (0, 3));
    let line = p.wait_line(&format!("{}:14:", conf.display()));
    assert!(
        line.contains("ERROR") && line.contains("reload refused"),
        "{line}"
    );

    // Nothing was applied: the old key still works, new ones do not, and the old
    // subscription limit holds.
    a.sync();
    assert_eq!(refused(addr, CLI_B), (1008, "bad key".into()));
    let mut svc = Peer::service(addr);
    for i in 0..6 {
        svc.send("SUB", &format!("s{i}"), &[], "");
    }
    let m = svc.recv();
    assert_eq!(m.target, "ERROR", "{m:?}");
    assert!(
        m.body.contains("too many subscriptions")
            || m.headers.iter().any(|(_, v)| v.contains("subscriptions")),
        "{m:?}"
    );
    assert_eq!(reloads(addr), (0, 3));
}

#[test]
fn changed_listeners_are_named_and_the_rest_is_applied() {
    let dir = scratch("reload-listeners");
    write_keys(&dir, &[CLI_A]);
    let conf = write_conf(&dir, &["ws://127.0.0.1:0"], "");
    let (p, addr) = start(&conf);
    write_keys(&dir, &[CLI_A, CLI_B]);
    let conf = write_conf(
        &dir,
        &["ws://127.0.0.1:0", "tcp://127.0.0.1:0"],
        "\n[timeouts]\nrequest = \"7s\"\n",
    );
    // A top-level setting: before the first table.
    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(&conf, format!("log_level = \"error\"\n{text}")).unwrap();
    hup(&p);
    until_reloads(addr, (1, 0));
    let warn = p.wait_line("cannot change without a restart");
    assert!(
        warn.contains("WARN") && warn.contains("reload: listen, log_level changed"),
        "{warn}"
    );
    // Logged at info: the level stays as at start.
    let line = p.wait_line("configuration reloaded");
    assert!(
        line.contains("timeouts.request 30s -> 7s") && line.contains("client keys +1 -0"),
        "{line}"
    );
    // The listener is the one bound at start; the new key works on it.
    Peer::connect(addr, CLI_B).sync();
}

#[test]
fn a_storm_of_sighup_leaves_the_server_serving() {
    let dir = scratch("reload-storm");
    write_keys(&dir, &[CLI_A]);
    let conf = write_conf(&dir, &["ws://127.0.0.1:0"], "");
    let (p, addr) = start(&conf);
    let mut a = Peer::connect(addr, CLI_A);
    let started = Instant::now();
    for _ in 0..100 {
        hup(&p);
        std::thread::sleep(Duration::from_millis(9));
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    a.sync();
    Peer::connect(addr, CLI_A).sync();
    // One more change and one more signal: applied after the storm.
    write_keys(&dir, &[CLI_A, CLI_B]);
    hup(&p);
    p.wait_line("client keys +1 -0");
    Peer::connect(addr, CLI_B).sync();
    a.sync();
    // Signals that came together were one reload; every reload counted, none invalid.
    let (ok, invalid) = reloads(addr);
    eprintln!("101 SIGHUP: {ok} reloads");
    assert_eq!(invalid, 0);
    assert!((2..=101).contains(&ok), "{ok}");
    let health = common::http_get(addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(health.ends_with("ok"), "{health}");
}

#[test]
fn check_config_refuses_a_bad_tls_pair() {
    let dir = scratch("reload-check-tls");
    let (cert_a, key_a, _) = make_cert();
    let (_, key_b, _) = make_cert();
    write_keys(&dir, &[CLI_A]);
    let conf = write_conf(&dir, &["wss://127.0.0.1:0"], "");
    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(
        &conf,
        format!("tls_cert = \"tls.crt\"\ntls_key = \"tls.key\"\n{text}"),
    )
    .unwrap();
    let check = |cert: &str, key: &str| -> (i32, Vec<String>) {
        std::fs::write(dir.join("tls.crt"), cert).unwrap();
        std::fs::write(dir.join("tls.key"), key).unwrap();
        let mut p = Proc::start(&["--config", conf.to_str().unwrap(), "--check-config"], &[]);
        let code = p.wait_exit();
        (code, p.output_after_exit())
    };
    let (code, out) = check(&cert_a, &key_a);
    assert_eq!(code, 0, "{out:?}");
    assert!(
        out.iter().any(|l| l.contains("configuration is valid")),
        "{out:?}"
    );

    let (code, out) = check("garbage\n", &key_a);
    assert_eq!(code, 1, "{out:?}");
    let want = format!(
        "err: middleman: invalid configuration: tls_cert ({}:1): TLS certificate {}: no PEM certificate found",
        conf.display(),
        dir.join("tls.crt").display()
    );
    assert!(out.contains(&want), "{out:?}");

    let (code, out) = check(&cert_a, &key_b);
    assert_eq!(code, 1, "{out:?}");
    assert!(
        out.iter().any(|l| l.starts_with(&format!(
            "err: middleman: invalid configuration: tls_key ({}:2): the private key in {} does not match the certificate in {}",
            conf.display(),
            dir.join("tls.key").display(),
            dir.join("tls.crt").display()
        ))),
        "{out:?}"
    );
    assert!(
        !out.iter().any(|l| l.contains("configuration is valid")),
        "{out:?}"
    );
}

/// A `[[history]]` table for `prefix`, keeping 100 messages for `ttl`.
fn history_table(prefix: &str, ttl: &str) -> String {
    format!("\n[[history]]\nprefix = \"{prefix}\"\nsize = 100\nttl = \"{ttl}\"\n")
}

/// PUB `topic` from `svc`, subscribed to it: the message as it came back.
fn pub_back(svc: &mut Peer, topic: &str, body: &str) -> common::Msg {
    svc.send("PUB", topic, &[], body);
    let m = svc.recv();
    assert_eq!((m.target.as_str(), m.body.as_str()), (topic, body), "{m:?}");
    m
}

/// The `max_age` (seconds) of JetStream stream `name`, asked of nats-server directly
/// with a bare NATS request.
fn stream_max_age(nats: SocketAddr, name: &str) -> u64 {
    use std::io::BufRead;
    let sock = TcpStream::connect(nats).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut w = sock.try_clone().unwrap();
    let mut r = std::io::BufReader::new(sock);
    write!(
        w,
        "CONNECT {{\"verbose\":false}}\r\nSUB _INBOX.reload 1\r\n\
         PUB $JS.API.STREAM.INFO.{name} _INBOX.reload 0\r\n\r\n"
    )
    .unwrap();
    let mut line = String::new();
    for _ in 0..10 {
        line.clear();
        r.read_line(&mut line).unwrap();
        if let Some(rest) = line.strip_prefix("MSG _INBOX.reload 1 ") {
            let n: usize = rest.trim().parse().unwrap();
            let mut body = vec![0; n + 2];
            r.read_exact(&mut body).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&body[..n]).unwrap();
            let ns = v["config"]["max_age"]
                .as_u64()
                .unwrap_or_else(|| panic!("{v}"));
            return ns / 1_000_000_000;
        }
    }
    panic!("no answer to STREAM.INFO: last line {line:?}");
}

#[test]
#[ignore = "needs nats-server (.ci/install-tools.sh installs it)"]
fn history_in_a_cluster_follows_a_reload() {
    let nats = common::nats::NatsServer::start_jetstream();
    let dir = scratch("reload-cluster-history");
    write_keys(&dir, &[CLI_A]);
    let cluster = format!(
        "\n[cluster]\nnats = {:?}\nname = \"reloadhist\"\n",
        nats.url()
    );
    let conf = write_conf(&dir, &["ws://127.0.0.1:0"], &cluster);
    let (p, addr) = start(&conf);
    common::cluster::until(10, "cluster connected", || {
        common::cluster::metric(addr, "middleman_cluster_connected") == 1.0
    });
    let mut svc = Peer::service(addr);
    for t in ["a.x", "b.x"] {
        svc.send("SUB", t, &[], "");
    }
    svc.sync();
    assert_eq!(pub_back(&mut svc, "a.x", "plain").header("offset"), None);

    // History turned on by a reload: the stream is made, a.* messages carry offsets.
    let on = format!("{cluster}{}", history_table("a.", "1h"));
    write_conf(&dir, &["ws://127.0.0.1:0"], &on);
    hup(&p);
    until_reloads(addr, (1, 0));
    p.wait_line("history 0 -> 1 rule(s)");
    common::cluster::until(10, "history stream ready", || {
        common::cluster::metric(addr, "middleman_history_jetstream_ready") == 1.0
    });
    let first = pub_back(&mut svc, "a.x", "kept");
    let epoch = first.header("epoch").expect("epoch").to_owned();
    let offset = first.header("offset").expect("offset").to_owned();
    assert_eq!(pub_back(&mut svc, "b.x", "plain").header("offset"), None);
    assert_eq!(stream_max_age(nats.addr(), "MM_reloadhist"), 3600);

    // A second table with a longer ttl: the stream takes the new limits, keeps its
    // messages and its epoch; b.* messages now carry offsets too.
    let more = format!("{on}{}", history_table("b.", "2h"));
    write_conf(&dir, &["ws://127.0.0.1:0"], &more);
    hup(&p);
    until_reloads(addr, (2, 0));
    p.wait_line("history 1 -> 2 rule(s)");
    common::cluster::until(10, "the stream's max_age updated", || {
        stream_max_age(nats.addr(), "MM_reloadhist") == 7200
    });
    let b = pub_back(&mut svc, "b.x", "kept too");
    assert_eq!(b.header("epoch"), Some(epoch.as_str()), "{b:?}");
    assert!(b.header("offset").is_some(), "{b:?}");
    let a = pub_back(&mut svc, "a.x", "after");
    assert_eq!(a.header("epoch"), Some(epoch.as_str()), "{a:?}");
    // What was stored before the reload is still there to recover.
    let mut late = Peer::service(addr);
    late.send("SUB", "a.x", &[("since", &format!("{epoch}:{offset}"))], "");
    let replayed = late.recv();
    assert_eq!(replayed.body, "after", "{replayed:?}");
    let rec = late.recv();
    assert_eq!(rec.target, "SYS:RECOVERY", "{rec:?}");
    assert_eq!(rec.header("recovered"), Some("true"), "{rec:?}");

    // A cluster setting is named and kept; history still applies.
    let renamed = more.replace("reloadhist", "other");
    write_conf(&dir, &["ws://127.0.0.1:0"], &renamed);
    hup(&p);
    until_reloads(addr, (3, 0));
    let warn = p.wait_line("cannot change without a restart");
    assert!(warn.contains("cluster.name"), "{warn}");
    assert!(pub_back(&mut svc, "b.x", "still")
        .header("offset")
        .is_some());
}

#[test]
fn history_follows_a_reload_on_a_single_node() {
    let dir = scratch("reload-history");
    write_keys(&dir, &[CLI_A]);
    let conf = write_conf(&dir, &["ws://127.0.0.1:0"], &history_table("a.", "1h"));
    let (p, addr) = start(&conf);
    let mut svc = Peer::service(addr);
    for t in ["a.x", "b.x"] {
        svc.send("SUB", t, &[], "");
    }
    svc.sync();
    let sent: Vec<common::Msg> = (0..3)
        .map(|i| pub_back(&mut svc, "a.x", &format!("m{i}")))
        .collect();
    let epoch = sent[0].header("epoch").expect("epoch").to_owned();
    assert_eq!(pub_back(&mut svc, "b.x", "plain").header("offset"), None);

    // a.* keeps 1 message instead of 100, b.* keeps history too.
    let two = format!(
        "{}{}",
        history_table("a.", "1h").replace("size = 100", "size = 1"),
        history_table("b.", "1h")
    );
    write_conf(&dir, &["ws://127.0.0.1:0"], &two);
    hup(&p);
    until_reloads(addr, (1, 0));
    p.wait_line("history 1 -> 2 rule(s)");
    let b = pub_back(&mut svc, "b.x", "kept");
    assert!(b.header("offset").is_some(), "{b:?}");
    // The same epoch, offsets going on (one sequence for all topics: b.x took one).
    let a = pub_back(&mut svc, "a.x", "m3");
    assert_eq!(a.header("epoch"), Some(epoch.as_str()), "{a:?}");
    let last = |m: &common::Msg| m.header("offset").unwrap().parse::<u64>().unwrap();
    assert_eq!(last(&a), last(&b) + 1);
    assert_eq!(last(&b), last(&sent[2]) + 1);
    // Trimmed to the new size at once: only m3 is kept, so a recovery from m2 is
    // whole and one from m1 is not.
    let recover = |since: &common::Msg| {
        let mut late = Peer::service(addr);
        let pos = format!("{epoch}:{}", last(since));
        late.send("SUB", "a.x", &[("since", &pos)], "");
        let mut got = Vec::new();
        loop {
            let m = late.recv();
            if m.target == "SYS:RECOVERY" {
                return (got, m.header("recovered").map(str::to_owned));
            }
            got.push(m.body);
        }
    };
    assert_eq!(
        recover(&sent[2]),
        (vec!["m3".to_owned()], Some("true".into()))
    );
    assert_eq!(recover(&sent[1]), (vec![], Some("false".into())));
}

#[test]
fn a_lowered_outbound_cap_is_checked_at_the_next_write() {
    let dir = scratch("reload-outbound");
    write_keys(&dir, &[CLI_A]);
    let limits = |cap: &str| format!("\n[limits]\nmax_outbound_bytes = \"{cap}\"\n");
    let conf = write_conf(&dir, &["ws://127.0.0.1:0"], &limits("256MiB"));
    let (p, addr) = start(&conf);
    let mut svc = Peer::service(addr);
    svc.send("ESUB", "t", &[], "");
    svc.sync();
    // A subscriber that stops reading: 48 MiB for it, more than loopback's socket
    // buffers take (a few MiB), so tens of MiB wait in its queue under the 256 MiB cap.
    let mut stuck = Peer::connect(addr, CLI_A);
    stuck.send("SUB", "t", &[], "");
    stuck.sync();
    // 64 KiB in lines of 1 KiB (under max_line_bytes).
    let chunk = [&"x".repeat(1023)[..]; 64].join("\n");
    for _ in 0..768 {
        svc.send("PUB", "t", &[], &chunk);
    }
    svc.sync();
    let slow = |addr| metrics(addr)["middleman_slow_consumers_total"];
    assert_eq!(slow(addr), 0.0);

    // 1 MiB from now on: nobody is cut by the reload itself...
    write_conf(&dir, &["ws://127.0.0.1:0"], &limits("1MiB"));
    hup(&p);
    until_reloads(addr, (1, 0));
    let line = p.wait_line("configuration reloaded");
    assert!(
        line.contains("limits.max_outbound_bytes 268435456 -> 1048576"),
        "{line}"
    );
    let m = metrics(addr);
    assert_eq!(m["middleman_slow_consumers_total"], 0.0);
    assert_eq!(m["middleman_connections{role=\"client\"}"], 1.0);
    // ... the next message for it finds its queue over the cap: closed as a slow
    // consumer, and only it.
    svc.send("PUB", "t", &[], "one more");
    svc.sync();
    let deadline = Instant::now() + WAIT;
    while slow(addr) != 1.0 {
        assert!(Instant::now() < deadline, "not closed as a slow consumer");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Counted as closed once it is gone: it hangs up now.
    drop(stuck);
    let closed =
        |addr| metrics(addr)["middleman_connections_closed_total{reason=\"slow_consumer\"}"];
    while closed(addr) != 1.0 {
        assert!(Instant::now() < deadline, "the close was not counted");
        std::thread::sleep(Duration::from_millis(20));
    }
    svc.sync();
    assert_eq!(
        metrics(addr)["middleman_connections{role=\"service\"}"],
        1.0
    );
}
