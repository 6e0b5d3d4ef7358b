//! A short smoke run of every cargo-fuzz target (`fuzz/smoke.sh`), so a crash the
//! fuzzers can find in seconds fails the suite. Needs cargo-fuzz, so a plain `cargo test`
//! lists it as ignored; under `--include-ignored` it fails where cargo-fuzz is missing.
//! `MM_FUZZ_SECS` sets the seconds per target (default 10).

mod tools;

use std::path::Path;
use std::process::Command;

#[test]
#[ignore = "needs cargo-fuzz: run .ci/install-tools.sh"]
fn every_fuzz_target_survives_a_smoke_run() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let have_fuzz = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have_fuzz {
        tools::require("the fuzz smoke test", &["cargo-fuzz".to_owned()]);
    }
    let secs = std::env::var("MM_FUZZ_SECS").unwrap_or_else(|_| "10".into());
    let out = Command::new("bash")
        .arg(root.join("fuzz/smoke.sh"))
        .arg(&secs)
        .current_dir(root)
        .output()
        .expect("run fuzz/smoke.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "fuzz smoke failed\n{stdout}\n{stderr}"
    );
    for target in [
        "decode",
        "decode_split",
        "roundtrip",
        "handshake",
        "broker_ops",
        "read_turn",
        "nats_proto",
        "subject_roundtrip",
        "backplane",
    ] {
        assert!(
            stdout.contains(target),
            "target {target} missing from the smoke run\n{stdout}"
        );
    }
}
