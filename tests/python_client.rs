//! The Python client (`clients/python`): its pytest suite against the release binary.
//!
//! Needs `target/release/middleman` built from the current sources (`cargo build
//! --release`; `.ci/run` builds it first) and fails when it is missing or older than
//! them. Makes a venv under target/ with python3, installs the package and pytest into it
//! from PyPI, checks the package with `mypy --strict`, and runs `clients/python/tests`.
//! Passes only when mypy is clean, pytest ran tests and all of them passed (pytest's
//! exit 5, "no tests collected", fails).

mod tools;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// Bound for the pytest run (it takes seconds).
const PYTEST_WAIT: Duration = Duration::from_secs(600);

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn newest_source(dir: &Path) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    for e in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
        let m = e.metadata().unwrap();
        let t = if m.is_dir() {
            newest_source(&e.path())
        } else {
            m.modified().unwrap()
        };
        newest = newest.max(t);
    }
    newest
}

/// The release binary, which must be newer than every source file.
fn release_binary() -> PathBuf {
    let this = PathBuf::from(env!("CARGO_BIN_EXE_middleman"));
    if !cfg!(debug_assertions) {
        return this; // this test is itself a release build: its binary is the one
    }
    // target/debug/middleman -> target/release/middleman
    let release = this
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("release")
        .join("middleman");
    let built = std::fs::metadata(&release)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| {
            panic!(
                "{} is missing: run cargo build --release",
                release.display()
            )
        });
    let sources = [
        newest_source(&root().join("src")),
        std::fs::metadata(root().join("Cargo.toml"))
            .unwrap()
            .modified()
            .unwrap(),
        std::fs::metadata(root().join("Cargo.lock"))
            .unwrap()
            .modified()
            .unwrap(),
    ];
    let newest = sources.into_iter().max().unwrap();
    assert!(
        built >= newest,
        "{} is older than the sources: run cargo build --release",
        release.display()
    );
    release
}

#[test]
#[ignore = "needs python3 with venv and pip (packages from PyPI) and cargo build --release: run .ci/install-tools.sh"]
fn python_client_pytest_suite_passes_against_the_release_binary() {
    let mut missing = Vec::new();
    if !tools::runs("python3", &["-c", "import venv, ensurepip"]) {
        missing.push("python3 with venv and ensurepip (apt-get install python3-venv)".to_owned());
    }
    tools::require("the Python client test", &missing);

    let bin = release_binary();
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-client-venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        run(
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
            "python3 -m venv",
        );
    }
    let pkg = root().join("clients/python");
    run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg(&pkg)
            .args(["pytest", "mypy"]),
        "pip install clients/python pytest mypy",
    );
    // The package's own files, even when its version number did not change.
    run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--force-reinstall",
                "--no-deps",
            ])
            .arg(&pkg),
        "pip install --force-reinstall clients/python",
    );

    // The package is typed (py.typed): it must stay clean under mypy --strict.
    run(
        Command::new(&python)
            .args([
                "-m",
                "mypy",
                "--strict",
                "--no-incremental",
                "src/middleman_client",
            ])
            .current_dir(&pkg),
        "mypy --strict clients/python/src/middleman_client",
    );

    let mut child = Command::new(&python)
        .args([
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rA",
            "tests",
        ])
        .current_dir(&pkg)
        .env("MIDDLEMAN_BIN", &bin)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run pytest");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + PYTEST_WAIT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill(); // our own child, by its handle
            let _ = child.wait();
            panic!("pytest did not finish within {PYTEST_WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = out_reader.join().unwrap();
    let err = err_reader.join().unwrap();
    println!("{out}");
    eprintln!("{err}");
    assert_ne!(
        status.code(),
        Some(5),
        "pytest collected no tests:\n{out}\n{err}"
    );
    assert!(status.success(), "pytest failed ({status}):\n{out}\n{err}");
    // The closing line, e.g. "21 passed in 5.27s": tests ran and none failed.
    let summary = out
        .lines()
        .rev()
        .find(|l| l.contains(" passed"))
        .unwrap_or_else(|| panic!("no pytest summary line:\n{out}"));
    let passed: u32 = summary
        .trim_matches(|c: char| c == '=' || c == ' ')
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(passed >= 30, "too few Python tests ran: {summary}");
    for bad in ["failed", "error", "skipped"] {
        assert!(!summary.contains(bad), "{summary}");
    }
}
