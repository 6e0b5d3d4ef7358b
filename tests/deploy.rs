//! The deployment files under deploy/: the public and the proxy configurations pass
//! `--check-config` (with key files and a certificate made in a scratch folder, as they
//! would sit in /etc/middleman), the systemd unit matches them (it reads /etc/middleman
//! directly, so a reload sees the files as they are), deploy/install.sh installs into a
//! scratch root idempotently and upgrades the earlier credentials layout, and
//! `systemd-analyze verify` accepts the installed unit.

mod common;
mod tools;

use std::os::unix::fs::PermissionsExt;
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
        ("User", "middleman"),
        ("Group", "middleman"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ReadOnlyPaths", "/etc/middleman"),
        ("Restart", "on-failure"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        (
            "ExecStart",
            "/usr/local/bin/middleman --config /etc/middleman/middleman.toml",
        ),
    ] {
        assert_eq!(get(k), [v], "{k}");
    }
    // No credentials: systemd copies them at start only, so a reload would read stale
    // copies. No dynamic user: the files' group must be a static one.
    assert!(get("LoadCredential").is_empty());
    assert!(get("DynamicUser").is_empty());
    assert!(!root().join("deploy/middleman.service.d").exists());
    // The configurations name their secrets relative to /etc/middleman, which the
    // server reads.
    for config in ["public", "proxy"] {
        let text = std::fs::read_to_string(root().join(format!("deploy/middleman.{config}.toml")))
            .unwrap();
        let conf: toml::Value = toml::from_str(&text).unwrap();
        let mut files: Vec<&str> = conf["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["key_file"].as_str().unwrap())
            .collect();
        files.extend(
            ["tls_cert", "tls_key"]
                .iter()
                .filter_map(|k| conf.get(*k)?.as_str()),
        );
        assert!(!files.is_empty());
        for f in files {
            assert!(!f.contains('/'), "{config}: {f} is not in /etc/middleman");
        }
    }
    assert_eq!(
        std::fs::read_to_string(root().join("deploy/middleman.sysusers.conf"))
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>(),
        ["u middleman - \"middleman server\" / -"]
    );
    let proxy = std::fs::read_to_string(root().join("deploy/middleman.proxy.toml")).unwrap();
    assert!(
        !proxy.contains("tls_"),
        "the proxy configuration names no certificate"
    );

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
fn proxy_configuration_passes_check_config() {
    let dir = scratch("deploy-check-proxy");
    let conf = dir.join("middleman.toml");
    std::fs::copy(root().join("deploy/middleman.proxy.toml"), &conf).unwrap();
    std::fs::write(dir.join("service.keys"), format!("{SVC}\n")).unwrap();
    std::fs::write(dir.join("client.keys"), format!("{CLI}\n")).unwrap();
    let mut p = Proc::start(&["--config", conf.to_str().unwrap(), "--check-config"], &[]);
    let code = p.wait_exit();
    let all = p.output_after_exit().join("\n");
    assert_eq!(code, 0, "{all}");
    assert!(
        all.contains(r#"listen = ["ws://127.0.0.1:8080?roles=client&pages=healthz", "tcp://127.0.0.1:8764?roles=service", "ws://127.0.0.1:8765?roles=service,monitor"]"#),
        "{all}"
    );
    assert!(all.contains("max_message_bytes = \"64KiB\" "), "{all}");
    assert!(
        !all.contains(SVC) && !all.contains(CLI),
        "a key leaked:\n{all}"
    );
    assert!(!all.contains("warn"), "no warnings expected:\n{all}");
}

/// Every file and folder under `dir`: (relative path, mode, contents).
fn snapshot(dir: &Path) -> Vec<(String, u32, Vec<u8>)> {
    fn walk(base: &Path, d: &Path, out: &mut Vec<(String, u32, Vec<u8>)>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.is_dir() {
                out.push((rel + "/", mode, Vec::new()));
                walk(base, &p, out);
            } else {
                out.push((rel, mode, std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Run deploy/install.sh into `dest` with this build's binary.
fn install(dest: &Path, tls: bool) {
    let mut c = Command::new(root().join("deploy/install.sh"));
    c.arg("--root")
        .arg(dest)
        .arg("--binary")
        .arg(env!("CARGO_BIN_EXE_middleman"));
    if tls {
        c.arg("--tls");
    }
    let out = c
        .stdin(Stdio::null())
        .output()
        .expect("run deploy/install.sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "install.sh failed:\n{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "",
        "no output under --root"
    );
    // With --tls it says the certificate is still to be put in place, once per file.
    let want = if tls { 2 } else { 0 };
    assert_eq!(
        stderr.matches("before starting middleman").count(),
        want,
        "{stderr}"
    );
}

/// An installation into a scratch root: it runs twice, with the same files after each.
fn installed(name: &str, tls: bool) -> PathBuf {
    let dest = scratch(name);
    install(&dest, tls);
    let first = snapshot(&dest);
    install(&dest, tls);
    assert_eq!(
        snapshot(&dest),
        first,
        "a second run changed the installation"
    );
    dest
}

#[test]
fn install_script_installs_into_a_root_idempotently() {
    for tls in [false, true] {
        let dest = installed(&format!("deploy-install-{tls}"), tls);
        let files: Vec<(String, u32)> = snapshot(&dest)
            .into_iter()
            .filter(|(p, _, _)| !p.ends_with('/') || p.starts_with("etc/middleman"))
            .map(|(p, m, _)| (p, m))
            .collect();
        let want = vec![
            ("etc/middleman/".to_owned(), 0o750),
            ("etc/middleman/client.keys".to_owned(), 0o640),
            ("etc/middleman/middleman.toml".to_owned(), 0o640),
            ("etc/middleman/service.keys".to_owned(), 0o640),
            ("etc/systemd/system/middleman.service".to_owned(), 0o644),
            ("etc/sysusers.d/middleman.conf".to_owned(), 0o644),
            ("usr/local/bin/middleman".to_owned(), 0o755),
        ];
        assert_eq!(files, want, "tls: {tls}");
        let read = |p: &str| std::fs::read_to_string(dest.join(p)).unwrap();
        assert_eq!(read("etc/systemd/system/middleman.service"), unit());
        let config = if tls { "public" } else { "proxy" };
        assert_eq!(
            read("etc/middleman/middleman.toml"),
            std::fs::read_to_string(root().join(format!("deploy/middleman.{config}.toml")))
                .unwrap()
        );
        assert_eq!(
            read("etc/sysusers.d/middleman.conf"),
            std::fs::read_to_string(root().join("deploy/middleman.sysusers.conf")).unwrap()
        );
        // One generated key in each key file, different ones.
        let key = |f: &str| {
            let text = read(&format!("etc/middleman/{f}"));
            let keys: Vec<String> = text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_owned)
                .collect();
            assert_eq!(keys.len(), 1, "{f}: {text}");
            assert!(
                keys[0].len() == 32 && keys[0].bytes().all(|b| b.is_ascii_alphanumeric()),
                "{f}"
            );
            keys[0].clone()
        };
        assert_ne!(key("service.keys"), key("client.keys"));
        // The installed configuration is valid with the installed key files.
        let conf = dest.join("etc/middleman/middleman.toml");
        if tls {
            let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
            std::fs::write(dest.join("etc/middleman/tls.crt"), cert.cert.pem()).unwrap();
            std::fs::write(
                dest.join("etc/middleman/tls.key"),
                cert.signing_key.serialize_pem(),
            )
            .unwrap();
        }
        let mut p = Proc::start(&["--config", conf.to_str().unwrap(), "--check-config"], &[]);
        let code = p.wait_exit();
        let all = p.output_after_exit().join("\n");
        assert_eq!(code, 0, "{all}");
        assert!(!all.contains("warn"), "{all}");
    }
    // Over an earlier version's layout (root-only files handed over as credentials, a
    // TLS drop-in): the drop-in goes, the files become readable by the group, and the
    // configuration, keys and certificate stay as they were.
    let dest = installed("deploy-install-upgrade", true);
    let etc = dest.join("etc/middleman");
    let dropin = dest.join("etc/systemd/system/middleman.service.d");
    std::fs::create_dir_all(&dropin).unwrap();
    std::fs::write(
        dropin.join("tls.conf"),
        "[Service]\nLoadCredential=tls.crt:/etc/middleman/tls.crt\n",
    )
    .unwrap();
    std::fs::write(etc.join("tls.crt"), "certificate").unwrap();
    let mode =
        |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    mode(&etc, 0o700);
    for f in ["middleman.toml", "service.keys", "client.keys", "tls.crt"] {
        mode(&etc.join(f), 0o600);
    }
    let before: Vec<Vec<u8>> = ["middleman.toml", "service.keys", "client.keys", "tls.crt"]
        .iter()
        .map(|f| std::fs::read(etc.join(f)).unwrap())
        .collect();
    install(&dest, false);
    assert!(!dropin.exists());
    let snap = snapshot(&etc);
    assert_eq!(
        snap.iter()
            .map(|(p, m, _)| (p.as_str(), *m))
            .collect::<Vec<_>>(),
        [
            ("client.keys", 0o640),
            ("middleman.toml", 0o640),
            ("service.keys", 0o640),
            ("tls.crt", 0o640)
        ]
    );
    assert_eq!(
        std::fs::metadata(&etc).unwrap().permissions().mode() & 0o7777,
        0o750
    );
    let after: Vec<Vec<u8>> = snap.into_iter().map(|(_, _, c)| c).collect();
    assert_eq!(
        after,
        [
            before[2].clone(),
            before[0].clone(),
            before[1].clone(),
            before[3].clone()
        ]
    );
    assert!(String::from_utf8_lossy(&after[1]).contains("tls_cert"));
}

/// `systemd-analyze verify` on a copy of `dest`'s unit, with `extra` appended, in `dir`:
/// (success, stdout + stderr).
fn verify(dest: &Path, dir: &Path, extra: &str) -> (bool, String) {
    // The unit as installed, with ExecStart's program resolved under the scratch root:
    // verify checks that the program exists and is executable, and /usr/local/bin is
    // not ours to write. So the test substitutes the path in a copy (systemd-analyze
    // --root would need the host's targets, e.g. sysinit.target, under the root).
    let installed =
        std::fs::read_to_string(dest.join("etc/systemd/system/middleman.service")).unwrap();
    let bin = dest.join("usr/local/bin/middleman");
    let text = installed.replace(
        "ExecStart=/usr/local/bin/middleman ",
        &format!("ExecStart={} ", bin.display()),
    );
    assert_ne!(text, installed);
    std::fs::write(dir.join("middleman.service"), text + extra).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "./middleman.service"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run systemd-analyze");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    (out.status.success(), format!("{stdout}{stderr}"))
}

#[test]
#[ignore = "needs systemd-analyze (Debian package systemd, which .ci/install-tools.sh installs for .ci/run)"]
fn systemd_analyze_verify_accepts_the_installed_unit() {
    if !tools::runs("systemd-analyze", &["--version"]) {
        tools::require("systemd-analyze verify", &["systemd-analyze".to_owned()]);
    }
    for tls in [false, true] {
        let dest = installed(&format!("deploy-verify-root-{tls}"), tls);
        let dir = scratch(&format!("deploy-verify-{tls}"));
        let (ok, out) = verify(&dest, &dir, "");
        assert!(ok, "systemd-analyze verify failed (tls: {tls}):\n{out}");
        assert_eq!(out.trim(), "", "systemd-analyze verify warned (tls: {tls})");
    }
    // It does read the unit: a bad line in it is reported.
    let dest = installed("deploy-verify-root-bad", true);
    let dir = scratch("deploy-verify-bad");
    let (_, out) = verify(&dest, &dir, "NoSuchSetting=1\n");
    assert!(
        out.contains("NoSuchSetting"),
        "the unit was not read:\n{out}"
    );
}
