//! A real `nats-server` as a child process on an ephemeral 127.0.0.1 port, for the live
//! NATS tests and the cluster tests.
//!
//! The port is read from the ports file nats-server writes once its listener is up
//! (`--ports_file_dir`), not from its log, then confirmed by connecting. [`NatsServer::restart`]
//! starts a new process on the same port (so clients can reconnect to the same URL);
//! [`NatsServer::kill`] crashes it. The process is killed by its PID on drop, also when
//! the test panics; its scratch folder (log, ports file, configuration) is removed after a
//! passing test and kept after a failing one. Every wait is bounded.
//!
//! A missing `nats-server` fails the test that starts one, naming `.ci/install-tools.sh`:
//! tests that need it are `#[ignore]`d in a plain `cargo test`, and run (and fail without
//! it) under `--include-ignored`.

use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The program, as found on PATH (Debian installs /usr/sbin/nats-server).
pub const PROGRAM: &str = "nats-server";

/// Longest wait for the server to come up or go down.
pub const START_WAIT: Duration = Duration::from_secs(10);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Whether `nats-server --version` runs.
pub fn available() -> bool {
    Command::new(PROGRAM)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    /// Extra command-line arguments, kept for restarts.
    args: Vec<String>,
    /// Configuration file (`-c`), if one was given.
    config: Option<PathBuf>,
}

impl NatsServer {
    /// A server with the defaults (no authentication, max_payload 1 MiB).
    pub fn start() -> NatsServer {
        Self::launch(&[], None)
    }

    /// A server with JetStream (`-js`), its store in the scratch folder.
    pub fn start_jetstream() -> NatsServer {
        Self::launch(&["-js"], None)
    }

    /// A server with extra command-line arguments (e.g. `["--user", "u", "--pass", "p"]`).
    pub fn start_with(args: &[&str]) -> NatsServer {
        Self::launch(args, None)
    }

    /// A server with a configuration file holding `config` (e.g. `max_payload: 1024`).
    /// The address and port given on the command line take precedence over it.
    pub fn start_with_config(config: &str) -> NatsServer {
        Self::launch(&[], Some(config))
    }

    fn launch(args: &[&str], config: Option<&str>) -> NatsServer {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("nats")
            .join(format!("{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the nats-server scratch folder");
        let config = config.map(|text| {
            let path = dir.join("nats.conf");
            std::fs::write(&path, text).expect("write nats.conf");
            path
        });
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        if args.iter().any(|a| a == "-js") && !args.iter().any(|a| a == "-sd") {
            // JetStream's store in the scratch folder (kept across restarts).
            args.extend(["-sd".to_owned(), dir.join("js").display().to_string()]);
        }
        let mut s = NatsServer {
            child: None,
            port: 0,
            dir,
            args,
            config,
        };
        s.spawn_and_wait();
        s
    }

    /// Spawn on `self.port` (0: an ephemeral one) and wait until it accepts connections.
    fn spawn_and_wait(&mut self) {
        // On a restart another process may hold the port for a moment: retry, bounded.
        let deadline = Instant::now() + START_WAIT;
        loop {
            match self.try_spawn() {
                Ok(()) => return,
                Err(why) if self.port != 0 && Instant::now() < deadline => {
                    eprintln!("nats-server restart on port {}: {why}; retrying", self.port);
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(why) => panic!(
                    "nats-server did not start: {why}\n--- log ({}):\n{}",
                    self.dir.display(),
                    self.log()
                ),
            }
        }
    }

    fn try_spawn(&mut self) -> Result<(), String> {
        let log = File::create(self.dir.join("nats.log")).map_err(|e| format!("log: {e}"))?;
        let err = log.try_clone().map_err(|e| format!("log: {e}"))?;
        let port = if self.port == 0 {
            "-1".to_owned() // nats-server: -1 picks a random free port
        } else {
            self.port.to_string()
        };
        let mut cmd = Command::new(PROGRAM);
        if let Some(c) = &self.config {
            cmd.arg("-c").arg(c);
        }
        cmd.args(["-a", "127.0.0.1", "-p", &port, "--ports_file_dir"])
            .arg(&self.dir)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err));
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "the NATS tests cannot run: missing {PROGRAM}; run .ci/install-tools.sh (Debian, as root)"
            ),
            Err(e) => panic!("spawn {PROGRAM}: {e}"),
        };
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + START_WAIT;
        // 1. The ports file of this process: the listener is up.
        let port = loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!("exited with {status}"));
            }
            if let Some(port) = read_ports_file(&self.dir, pid) {
                break port;
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!("no ports file within {START_WAIT:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if self.port != 0 && port != self.port {
            self.kill();
            return Err(format!("listening on {port}, not {}", self.port));
        }
        self.port = port;
        // 2. It accepts a connection.
        loop {
            if TcpStream::connect_timeout(&self.addr(), Duration::from_secs(1)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!(
                    "port {port} refused connections for {START_WAIT:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// 127.0.0.1 and the client port.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The running process' id (None once stopped or killed).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// Everything the server logged so far (all its starts, the current one last).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("nats.log")).unwrap_or_default()
    }

    /// Send a signal to the process (e.g. `libc::SIGUSR2`: lame duck mode).
    pub fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on the child we started, by its PID; it has not been reaped
            // (we own the Child and wait for it only when stopping), so the PID is ours.
            unsafe {
                libc::kill(pid as i32, sig);
            }
        }
    }

    /// Graceful stop: SIGTERM, then SIGKILL if it has not exited within [`START_WAIT`].
    pub fn stop(&mut self) {
        self.signal(libc::SIGTERM);
        let Some(mut child) = self.child.take() else {
            return;
        };
        let deadline = Instant::now() + START_WAIT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
            }
        }
    }

    /// Crash it: SIGKILL, and reap the process.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stop it gracefully and start a new process on the same port, with the same
    /// arguments and configuration. Connections to the old process are closed.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn_and_wait();
    }

    /// Start again after [`NatsServer::stop`] or [`NatsServer::kill`], on the same port.
    pub fn start_again(&mut self) {
        assert!(!self.is_running(), "nats-server is still running");
        self.spawn_and_wait();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("nats-server log kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The client port in `dir/<program>_<pid>.ports`, once it is complete:
/// `{"nats":["nats://127.0.0.1:PORT"],...}`.
fn read_ports_file(dir: &Path, pid: u32) -> Option<u16> {
    let suffix = format!("_{pid}.ports");
    let path = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(&suffix))
        })?;
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?; // not yet complete: retry
    let url = v.get("nats")?.get(0)?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
}
