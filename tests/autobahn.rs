//! WebSocket compliance: the Autobahn|Testsuite fuzzing client against `--echo` mode
//! (same reactor and connection code, every data message echoed).
//!
//! Needs `../shared/tools/autobahn.sh` beside the checkout and Python 2.7 (pyenv 2.7.18
//! or `python2`), so a plain `cargo test` lists it as ignored; under `--include-ignored`
//! a missing tool fails it. `.ci/install-tools.sh` installs Python 2.7's package.

mod tools;

use std::path::Path;
use std::process::Command;

use middleman::transport::Listen;
use middleman::{Config, Running};

#[test]
#[ignore = "needs Python 2.7 and ../shared/tools/autobahn.sh: run .ci/install-tools.sh"]
fn autobahn_echo_has_no_failures() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tools/autobahn.sh");
    let py2 = Command::new("bash")
        .args([
            "-c",
            "PYENV_VERSION=2.7.18 pyenv which python 2>/dev/null || command -v python2",
        ])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let mut missing = Vec::new();
    if !script.exists() {
        missing.push(format!("{}", script.display()));
    }
    if !py2 {
        missing.push("Python 2.7 (pyenv 2.7.18 or python2)".to_owned());
    }
    tools::require("Autobahn", &missing);
    let server = Running::spawn(Config {
        listeners: vec![Listen::ws("127.0.0.1:0".parse().unwrap())],
        echo: true,
        ..Config::default()
    })
    .expect("echo server");
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("autobahn");
    let out = Command::new("bash")
        .arg(&script)
        .arg(format!("ws://{}", server.addr))
        .arg("*")
        .arg(&out_dir)
        .output()
        .expect("run autobahn.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("autobahn: "))
        .unwrap_or_else(|| panic!("no summary line\nstdout:\n{stdout}\nstderr:\n{stderr}"));
    println!("{summary}");
    assert!(summary.ends_with(" 0 failed"), "{stdout}");
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let passed: u32 = summary
        .trim_start_matches("autobahn: ")
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(passed >= 300, "too few cases ran: {summary}");
    server.stop().expect("echo server shut down cleanly");
}
