//! The deployment files under deploy/: the public configuration passes `--check-config`
//! (with its key files and a certificate made in a scratch folder, as they would sit in
//! /etc/middleman), the systemd unit matches it, and `systemd-analyze verify` accepts
//! the unit.

mod common;
mod tools;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::proc::Proc;

const SVC: &str = "deploy-svc-3e9a0b7c51";
const CLI: &str = "deploy-cli-6d2f8e1a47";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn unit() -> String {
    std::fs::read_to_string(root().join("deploy/middleman.service")).unwrap()
}

/// `Key=value` lines of the unit's [Service] section.
fn service_settings(unit: &str) -> Vec<(String, String)> {
    let mut in_service = false;
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service && !line.starts_with('#') {
            if let Some((k, v)) = line.split_once('=') {
                out.push((k.to_owned(), v.to_owned()));
            }
        }
    }
    out
}

#[test]
fn public_configuration_passes_check_config() {
    let dir = scratch("deploy-check-config");
    let conf = dir.join("middleman.toml");
    std::fs::copy(root().join("deploy/middleman.public.toml"), &conf).unwrap();
    std::fs::write(dir.join("service.keys"), format!("# services\n{SVC}\n")).unwrap();
    std::fs::write(dir.join("client.keys"), format!("{CLI}\n")).unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.join("tls.crt"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), cert.signing_key.serialize_pem()).unwrap();

    let mut p = Proc::start(&["--config", conf.to_str().unwrap(), "--check-config"], &[]);
    let code = p.wait_exit();
    let lines = p.output_after_exit();
    let all = lines.join("\n");
    assert_eq!(code, 0, "{all}");
    let line = |prefix: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(&format!("out: {prefix}")))
            .unwrap_or_else(|| panic!("no line {prefix:?} in\n{all}"))
            .clone()
    };
    assert!(
        line("listen = ").contains(
            r#"["wss://0.0.0.0:443?roles=client&pages=healthz", "tcp://127.0.0.1:8764?roles=service", "ws://127.0.0.1:8765?roles=service,monitor"]"#
        ),
        "{all}"
    );
    for (setting, value) in [
        ("max_connections = ", "10000"),
        ("max_message_bytes = ", "\"64KiB\""),
        ("max_subscriptions = ", "100"),
        ("max_outbound_bytes = ", "\"1MiB\""),
        ("handshake = ", "\"5s\""),
        ("request = ", "\"15s\""),
    ] {
        let l = line(setting);
        assert!(
            l.contains(&format!("{setting}{value} ")) && l.contains("# file, line"),
            "{l}"
        );
    }
    assert!(line("tls_cert = ").contains("tls.crt"), "{all}");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("key = \"(redacted)\""))
            .count(),
        2,
        "{all}"
    );
    assert!(
        !all.contains(SVC) && !all.contains(CLI),
        "a key leaked:\n{all}"
    );
    assert!(!all.contains("warn"), "no warnings expected:\n{all}");
}

#[test]
fn systemd_unit_matches_the_configuration() {
    let settings = service_settings(&unit());
    let get = |k: &str| -> Vec<&str> {
        settings
            .iter()
            .filter(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    for (k, v) in [
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("Restart", "on-failure"),
    ] {
        assert_eq!(get(k), [v], "{k}");
    }
    assert!(get("ExecReload").is_empty(), "middleman has no reload");
    assert_eq!(
        get("ExecStart"),
        ["/usr/local/bin/middleman --config %d/middleman.toml"]
    );
    // Every file the configuration names is handed over as a credential.
    let creds: Vec<&str> = get("LoadCredential")
        .iter()
        .map(|v| v.split_once(':').unwrap().0)
        .collect();
    for f in [
        "middleman.toml",
        "service.keys",
        "client.keys",
        "tls.crt",
        "tls.key",
    ] {
        assert!(creds.contains(&f), "no LoadCredential for {f}: {creds:?}");
    }

    // LimitNOFILE fits max_connections (the server wants max_connections + 64).
    let conf: toml::Value = toml::from_str(
        &std::fs::read_to_string(root().join("deploy/middleman.public.toml")).unwrap(),
    )
    .unwrap();
    let max_conn = conf["limits"]["max_connections"].as_integer().unwrap();
    let nofile: i64 = get("LimitNOFILE")[0].parse().unwrap();
    assert!(
        nofile >= max_conn + 64 && nofile <= max_conn * 2,
        "LimitNOFILE={nofile} does not match max_connections={max_conn}"
    );
    // A stop waits longer than the shutdown grace.
    let grace = conf["timeouts"]["shutdown_grace"].as_str().unwrap();
    let grace_s: u64 = grace.trim_end_matches('s').parse().unwrap();
    let stop_s: u64 = get("TimeoutStopSec")[0]
        .trim_end_matches('s')
        .parse()
        .unwrap();
    assert!(
        stop_s > grace_s,
        "TimeoutStopSec {stop_s}s <= grace {grace}"
    );
}

#[test]
#[ignore = "needs systemd-analyze (Debian package systemd): run .ci/install-tools.sh"]
fn systemd_analyze_verify_accepts_the_unit() {
    if !tools::runs("systemd-analyze", &["--version"]) {
        tools::require("systemd-analyze verify", &["systemd-analyze".to_owned()]);
    }
    // The unit as installed, but running the binary of this build (verify checks that
    // ExecStart's program exists and is executable).
    let dir = scratch("deploy-systemd-verify");
    let text = unit().replace(
        "ExecStart=/usr/local/bin/middleman ",
        &format!("ExecStart={} ", env!("CARGO_BIN_EXE_middleman")),
    );
    assert_ne!(text, unit());
    std::fs::write(dir.join("middleman.service"), text).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "./middleman.service"])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .output()
        .expect("run systemd-analyze");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stdout}{stderr}"
    );
    assert_eq!(
        format!("{stdout}{stderr}").trim(),
        "",
        "systemd-analyze verify warned"
    );
}
