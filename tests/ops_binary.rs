//! Operations, against the real binary: the configuration file and `--check-config`, the
//! shipped example, and logs that never hold a key (issue 5).

mod common;
use common::proc::Proc;
use common::{http_get, next_data, recv_close, ws_connect};

use std::net::SocketAddr;
use std::path::PathBuf;

use tungstenite::Message;

const FILE_SVC: &str = "filesvc-0e5b77d2-keyfile-distinctive";
const FILE_CLI: &str = "filecli-7a1c90f3-inline-distinctive";
const ARG_CLI: &str = "argcli-3f6e21b8-cmdline-distinctive";
const ENV_MON: &str = "envmon-c4d8a615-environ-distinctive";
const ALL_KEYS: [&str; 4] = [FILE_SVC, FILE_CLI, ARG_CLI, ENV_MON];

/// A fresh directory under target/ for this test's files.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("ops-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Authenticate with `key`; returns the cid.
fn auth(addr: SocketAddr, key: &str) -> (tungstenite::WebSocket<std::net::TcpStream>, String) {
    let mut ws = ws_connect(addr);
    ws.send(Message::text(key)).unwrap();
    assert_eq!(next_data(&mut ws).unwrap(), b"MM OK");
    let cid = String::from_utf8(next_data(&mut ws).unwrap()).unwrap();
    (ws, cid)
}

fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (i32, Vec<String>) {
    let mut p = Proc::start(args, env);
    let code = p.wait_exit();
    (code, p.output_after_exit())
}

#[test]
fn logs_never_contain_a_key_and_tell_what_happened() {
    let dir = scratch("logs");
    std::fs::write(dir.join("service.keys"), format!("# service\n{FILE_SVC}\n")).unwrap();
    let conf = dir.join("mm.toml");
    std::fs::write(
        &conf,
        format!(
            "log_level = \"warn\"\n[[keys]]\nrole = \"service\"\nkey_file = \"service.keys\"\n\
             [[keys]]\nrole = \"client\"\nkey = \"{FILE_CLI}\"\n"
        ),
    )
    .unwrap();
    let conf_s = conf.to_str().unwrap();
    // The command line beats the file: trace logging, and the client key.
    let mut p = Proc::start(
        &[
            "--config",
            conf_s,
            "--listen",
            "127.0.0.1:0",
            "--log-level",
            "trace",
            "--client-key",
            ARG_CLI,
        ],
        &[("MM_MONITOR_KEY", ENV_MON)],
    );
    let addr = p.addr();

    let (mut svc, svc_cid) = auth(addr, FILE_SVC);
    let (mut cli, cli_cid) = auth(addr, ARG_CLI);
    let (_mon, _) = auth(addr, ENV_MON);
    // Keys as message content, and refused keys: the file's client key was replaced by
    // the command line's, and a near miss of a real key.
    cli.send(Message::text(format!(
        "PUB {ARG_CLI}\r\n\r\n{FILE_SVC}\r\n.\r\n"
    )))
    .unwrap();
    for wrong in [FILE_CLI.to_owned(), format!("{FILE_SVC}-")] {
        let mut bad = ws_connect(addr);
        bad.send(Message::text(wrong)).unwrap();
        assert_eq!(recv_close(&mut bad), (1008, "bad key".into()));
    }
    // A framing violation.
    svc.send(Message::text("NOSPACE\r\n.\r\n")).unwrap();
    assert_eq!(recv_close(&mut svc).0, 1002);
    drop(svc);
    for path in ["/metrics", "/stats", "/console"] {
        let a = http_get(addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(a.starts_with("HTTP/1.1 200 "));
    }
    cli.close(None).unwrap();
    let _ = recv_close(&mut cli);
    drop(cli);
    p.wait_line(&format!("client {cli_cid} from 127.0.0.1:"));

    p.sigterm();
    assert_eq!(p.wait_exit(), 0);
    let lines = p.output_after_exit();
    let all = lines.join("\n");
    for key in ALL_KEYS {
        assert!(!all.contains(key), "output holds the key {key:?}:\n{all}");
    }
    let has = |needle: &str| lines.iter().any(|l| l.contains(needle));
    // One start-up summary: version, listener, limits, key counts, the config file.
    let summary: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains(" INFO ") && l.contains("listening on ws://"))
        .collect();
    assert_eq!(summary.len(), 1, "{all}");
    for part in [
        &format!("middleman {}", env!("CARGO_PKG_VERSION")),
        &format!("listening on ws://{addr} "),
        "keys: 1 service, 1 client, 1 monitor;",
        "message 1048576 B",
        "10000 connections",
        conf_s,
    ] {
        assert!(summary[0].contains(part), "{part:?} not in {}", summary[0]);
    }
    // Connection open/close at debug with cid, peer, role and reason.
    assert!(
        has(&format!("service {svc_cid} connected from 127.0.0.1:")),
        "{all}"
    );
    assert!(
        has(&format!("service {svc_cid} from 127.0.0.1:"))
            && has("closed (protocol_error)")
            && has(&format!("client {cli_cid} from 127.0.0.1:")),
        "{all}"
    );
    assert!(
        lines
            .iter()
            .filter(|l| l.contains(" DEBUG ")
                && l.contains("unauthenticated from 127.0.0.1:")
                && l.contains("closed (bad_key)"))
            .count()
            == 2,
        "{all}"
    );
    // Warnings: refused keys and the framing violation.
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains(" WARN ") && l.contains("bad key from 127.0.0.1:"))
            .count(),
        2,
        "{all}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains(" WARN ") && l.contains("framing violation")),
        "{all}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_config_on_a_broken_file_names_key_and_line() {
    let dir = scratch("broken");
    let conf = dir.join("broken.toml");
    std::fs::write(
        &conf,
        "# a comment\nlisten = \"127.0.0.1:8765\"\n\n[timeouts]\nidle = \"60 parsecs\"\n",
    )
    .unwrap();
    let conf_s = conf.to_str().unwrap();
    let (code, lines) = run_to_exit(&["--config", conf_s, "--check-config"], &[]);
    assert_eq!(code, 1, "{lines:?}");
    assert_eq!(
        lines[0],
        format!(
            "err: middleman: invalid configuration: {conf_s}:5:8: timeouts.idle: invalid \
             duration unit \"parsecs\" in \"60 parsecs\" (use ms, s, m or h)"
        )
    );
    assert_eq!(lines[1], "err:      5 | idle = \"60 parsecs\"");

    // A TOML syntax error and a misspelt key: line and key named too.
    std::fs::write(
        &conf,
        "listen = \"127.0.0.1:8765\"\n[limits]\nmax_conections = 5\n",
    )
    .unwrap();
    let (code, lines) = run_to_exit(&["--config", conf_s, "--check-config"], &[]);
    assert_eq!(code, 1);
    assert!(
        lines[0].starts_with(&format!(
            "err: middleman: invalid configuration: {conf_s}:3:1: limits.max_conections: \
             unknown field `max_conections`"
        )),
        "{lines:?}"
    );
    std::fs::write(&conf, "listen = \"127.0.0.1:8765\n").unwrap();
    let (code, lines) = run_to_exit(&["--config", conf_s, "--check-config"], &[]);
    assert_eq!(code, 1);
    assert!(
        lines[0].contains(&format!("{conf_s}:1:")) && lines[0].contains("listen"),
        "{lines:?}"
    );
    // A missing key file names the entry and its line, and the server does not start.
    std::fs::write(
        &conf,
        "[[keys]]\nrole = \"service\"\nkey_file = \"nowhere.keys\"\n",
    )
    .unwrap();
    let (code, lines) = run_to_exit(&["--config", conf_s, "--listen", "127.0.0.1:0"], &[]);
    assert_eq!(code, 1);
    assert!(
        lines[0].contains(&format!("{conf_s}:3:12: keys[0].key_file: cannot read ")),
        "{lines:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_config_prints_the_effective_configuration_with_keys_redacted() {
    let dir = scratch("check");
    std::fs::write(dir.join("service.keys"), format!("{FILE_SVC}\n")).unwrap();
    let conf = dir.join("mm.toml");
    std::fs::write(
        &conf,
        format!(
            "listen = \"127.0.0.1:9100\"\n[[keys]]\nrole = \"service\"\nkey_file = \"service.keys\"\n\
             [[keys]]\nrole = \"client\"\nkey = \"{FILE_CLI}\"\n[limits]\nmax_connections = 50\n\
             max_subscriptions = 60\n[timeouts]\nidle = \"2m\"\n"
        ),
    )
    .unwrap();
    let conf_s = conf.to_str().unwrap();
    let (code, lines) = run_to_exit(
        &[
            "--config",
            conf_s,
            "--check-config",
            "--max-connections",
            "40",
        ],
        &[("MM_MONITOR_KEY", ENV_MON), ("MM_MAX_SUBSCRIPTIONS", "70")],
    );
    assert_eq!(code, 0, "{lines:?}");
    let out = lines.join("\n");
    for key in ALL_KEYS {
        assert!(!out.contains(key), "{out}");
    }
    let line = |prefix: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(&format!("out: {prefix}")))
            .unwrap_or_else(|| panic!("no {prefix:?} in {out}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(
        line("listen ="),
        "out: listen = [\"ws://127.0.0.1:9100\"] # file, line 1"
    );
    assert_eq!(
        line("max_connections ="),
        "out: max_connections = 40 # command line"
    );
    assert_eq!(
        line("max_subscriptions ="),
        "out: max_subscriptions = 70 # environment"
    );
    assert_eq!(line("idle ="), "out: idle = \"120s\" # file, line 12");
    assert_eq!(line("request ="), "out: request = \"30s\" # default");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.starts_with("out: key = \"(redacted)\""))
            .count(),
        3,
        "{out}"
    );
    assert_eq!(
        lines.last().map(String::as_str),
        Some("out: # configuration is valid")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_example_configuration_checks_and_starts() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/middleman.example.toml");
    let (code, lines) = run_to_exit(&["--config", example, "--check-config"], &[]);
    assert_eq!(code, 0, "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("out: listen = [\"ws://127.0.0.1:8765\"]")
                && l.contains("# file, line")),
        "{lines:?}"
    );

    // Started as a new user would, but on an ephemeral port (the command line wins).
    let mut p = Proc::start(&["--config", example, "--listen", "127.0.0.1:0"], &[]);
    let addr = p.addr();
    // Printed on stdout before the listener is bound; the log line came on stderr.
    let svc_key = p.wait_line("service key:");
    let svc_key = svc_key.rsplit(' ').next().unwrap().to_owned();
    let (_ws, _) = auth(addr, &svc_key);
    let health = http_get(addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(health.ends_with("\r\n\r\nok"), "{health}");
    p.sigterm();
    assert_eq!(p.wait_exit(), 0);
    // The generated keys are printed once, and never logged.
    let lines = p.output_after_exit();
    assert_eq!(
        lines.iter().filter(|l| l.contains(&svc_key)).count(),
        1,
        "{lines:?}"
    );
}

#[test]
fn check_config_shows_cluster_settings_by_precedence_with_secrets_redacted() {
    const PASSWORD: &str = "natspw-8e31c0d5-environ-distinctive";
    const TOKEN: &str = "natstok-2b7f94a6-file-distinctive";
    let dir = scratch("cluster");
    std::fs::write(dir.join("nats.token"), format!("{TOKEN}\n")).unwrap();
    let conf = dir.join("mm.toml");
    std::fs::write(
        &conf,
        "reuse_port = true\n[cluster]\nnats = [\"nats://127.0.0.1:4222\", \"nats://10.1.2.3\"]\n\
         name = \"from-file\"\ntoken_file = \"nats.token\"\nnode_timeout = \"5s\"\n",
    )
    .unwrap();
    let conf_s = conf.to_str().unwrap();
    // Every node of a cluster needs the same keys: configured, not generated.
    let keys = ["--service-key", ARG_CLI, "--client-key", FILE_CLI];
    let check = |args: &[&str], env: &[(&str, &str)]| {
        let mut all = vec!["--config", conf_s, "--check-config"];
        all.extend_from_slice(&keys);
        all.extend_from_slice(args);
        let (code, lines) = run_to_exit(&all, env);
        let out = lines.join("\n");
        assert_eq!(code, 0, "{out}");
        assert!(!out.contains(PASSWORD) && !out.contains(TOKEN), "{out}");
        let line = |prefix: &str| {
            lines
                .iter()
                .find(|l| l.starts_with(&format!("out: {prefix}")))
                .unwrap_or_else(|| panic!("no {prefix:?} in {out}"))
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        (line("name ="), line("reuse_port ="), out)
    };
    let env = [("MM_CLUSTER_NAME", "from-env")];
    let (name, _, _) = check(&["--cluster-name", "from-cli"], &env);
    assert_eq!(name, "out: name = \"from-cli\" # command line");
    let (name, _, _) = check(&[], &env);
    assert_eq!(name, "out: name = \"from-env\" # environment");
    let (name, reuse, out) = check(&[], &[]);
    assert_eq!(name, "out: name = \"from-file\" # file, line 4");
    assert_eq!(reuse, "out: reuse_port = true # file, line 1");
    for want in [
        "out: nats = [\"nats://127.0.0.1:4222\", \"nats://10.1.2.3\"] # file, line 3",
        "out: token = \"(redacted)\" # file, line 5",
        "out: node_timeout = \"5s\" # file, line 6",
        "out: max_pending = \"64MiB\" # default",
    ] {
        assert!(
            out.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>().join(" ") == want),
            "no {want:?} in {out}"
        );
    }
    // A password from the environment (with a user) is redacted too; reuse_port off
    // from the environment beats the file.
    let (_, reuse, out) = check(
        &["--cluster-user", "mm"],
        &[
            ("MM_CLUSTER_PASSWORD", PASSWORD),
            ("MM_REUSE_PORT", "false"),
        ],
    );
    assert_eq!(reuse, "out: reuse_port = false # environment");
    assert!(
        out.lines().any(
            |l| l.starts_with("out: password = \"(redacted)\"") && l.ends_with("# environment")
        ),
        "{out}"
    );

    // --cluster-node-name is shown with its source.
    let (_, _, out) = check(&["--cluster-node-name", "eu-1.a"], &[]);
    assert!(
        out.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")
                == "out: node_name = \"eu-1.a\" # command line"),
        "{out}"
    );
    // Without keys --check-config refuses the cluster, as the server would: the file
    // line that made it a cluster is named, and what to do.
    let (code, lines) = run_to_exit(&["--config", conf_s, "--check-config"], &[]);
    assert_eq!(code, 1, "{lines:?}");
    assert!(
        lines[0].starts_with(&format!(
            "err: middleman: invalid configuration: cluster.nats ({conf_s}:3): no keys \
             configured: refusing to join a cluster with generated keys"
        )),
        "{lines:?}"
    );
    assert!(
        lines[0].contains("every node of a cluster needs the same service and client keys"),
        "{lines:?}"
    );

    // A bad URL from the environment: the setting and its source are named.
    let (code, lines) = run_to_exit(
        &["--config", conf_s, "--check-config"],
        &[("MM_CLUSTER", "nats://a:4222,redis://b:6379")],
    );
    assert_eq!(code, 1, "{lines:?}");
    assert!(
        lines[0].starts_with(
            "err: middleman: invalid configuration: cluster.nats (environment): unsupported scheme \"redis\""
        ),
        "{lines:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
