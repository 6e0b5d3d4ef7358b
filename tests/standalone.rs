//! The repository stands alone: a clone of it in an empty directory, with no `../shared`
//! beside it, runs the codec vector tests and they pass (they read the in-repository copy
//! under `tests/vectors/`).
//!
//! Clones what is committed (`git clone` of this checkout), then runs
//! `cargo test --offline --test codec_vectors` in the clone, built in a target directory of
//! its own (`target/standalone`: the clone's binary must not replace this build's).

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Bound for the build and run in the clone.
const WAIT: Duration = Duration::from_secs(900);

fn temp_dir() -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("mm-standalone-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create a temporary directory");
    dir
}

/// Removes the directory when the test ends, passed or not.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
#[ignore = "clones the repository with git and builds it again there (a minute or more): run with --include-ignored"]
fn a_clone_with_nothing_beside_it_passes_the_codec_vector_tests() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = temp_dir();
    let _cleanup = Cleanup(tmp.clone());
    let clone = tmp.join("middleman");
    let st = Command::new("git")
        .args(["clone", "--quiet", "--no-hardlinks"])
        .arg(root)
        .arg(&clone)
        .status()
        .expect("run git clone");
    assert!(st.success(), "git clone failed: {st}");
    let beside: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(beside, ["middleman"], "the clone is alone in its directory");
    assert!(!tmp.join("shared").exists());
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let mut child = Command::new(env!("CARGO"))
        .args(["test", "--offline", "--test", "codec_vectors"])
        .current_dir(&clone)
        .env("CARGO_TARGET_DIR", target.join("standalone"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cargo test in the clone");
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out_t = drain(child.stdout.take().map(|s| Box::new(s) as _));
    let err_t = drain(child.stderr.take().map(|s| Box::new(s) as _));
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for cargo") {
            break st;
        }
        if start.elapsed() > WAIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cargo test in the clone did not finish within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    assert!(
        status.success(),
        "cargo test in the clone failed ({status}):\n{stdout}\n{stderr}"
    );
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("test result:"))
        .unwrap_or_else(|| panic!("no test summary:\n{stdout}\n{stderr}"));
    assert!(summary.contains(" 0 failed"), "{summary}");
    let passed: usize = summary
        .split_whitespace()
        .skip_while(|w| *w != "ok.")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(passed >= 2, "the vector tests ran: {summary}");
}
