//! Outside tools for the tests that a plain `cargo test` lists as ignored (each with the
//! reason). Under `cargo test -- --include-ignored` those tests run, and a missing tool
//! fails them: nothing here skips. `.ci/install-tools.sh` installs every such tool.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Stdio};

/// What to do about a missing tool.
pub const INSTALL: &str = "run .ci/install-tools.sh (Debian, as root)";

/// Whether `cmd args...` runs and exits 0.
pub fn runs(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Fail the test, naming everything in `missing`, unless it is empty.
pub fn require(test: &str, missing: &[String]) {
    assert!(
        missing.is_empty(),
        "{test} cannot run: missing {}; {INSTALL}",
        missing.join(", ")
    );
}

fn version_in(json_file: &Path, pointer: &str) -> Option<String> {
    let text = std::fs::read_to_string(json_file).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.pointer(pointer)?.as_str().map(str::to_owned)
}

/// Make `dir/node_modules` hold playwright-core exactly as `dir/package-lock.json` pins
/// it, running `npm ci` there when it does not (a fresh clone), so the browser tests need
/// only node, npm and Chromium on the machine.
pub fn npm_ci_if_needed(dir: &Path) -> Result<(), String> {
    let want = version_in(
        &dir.join("package-lock.json"),
        "/packages/node_modules~1playwright-core/version",
    )
    .ok_or_else(|| format!("no playwright-core in {}/package-lock.json", dir.display()))?;
    let installed = dir.join("node_modules/playwright-core/package.json");
    if version_in(&installed, "/version").as_deref() == Some(want.as_str()) {
        return Ok(());
    }
    eprintln!("npm ci in {} (playwright-core {want})", dir.display());
    let out = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("npm: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "npm ci in {} failed: {}{}",
            dir.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    match version_in(&installed, "/version") {
        Some(v) if v == want => Ok(()),
        other => Err(format!(
            "after npm ci, playwright-core is {other:?}, not {want}"
        )),
    }
}
