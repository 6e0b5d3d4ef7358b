//! The real `middleman` binary as a child process, with its output lines collected.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// The arguments of [`Proc::server`]: 127.0.0.1:0 with the harness' keys.
pub const SERVER_ARGS: [&str; 6] = [
    "--listen",
    "127.0.0.1:0",
    "--service-key",
    super::SERVICE_KEY,
    "--client-key",
    super::CLIENT_KEY,
];

#[allow(dead_code)]
pub struct Proc {
    pub child: Child,
    /// Every line printed so far, in arrival order ("out: ..." / "err: ..."), and a
    /// condition signalled at each new one.
    all: Arc<(Mutex<Vec<String>>, Condvar)>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Proc {
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_middleman"));
        cmd.args(args)
            .env_remove("MM_SERVICE_KEY")
            .env_remove("MM_CLIENT_KEY")
            .env_remove("MM_MONITOR_KEY")
            .env_remove("MM_LISTEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn middleman");
        let all = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let reader = |stream: Box<dyn std::io::Read + Send>, tag: &'static str| {
            let all = all.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(stream).lines().map_while(Result::ok) {
                    all.0.lock().unwrap().push(format!("{tag}: {l}"));
                    all.1.notify_all();
                }
            })
        };
        let readers = vec![reader(Box::new(out), "out"), reader(Box::new(err), "err")];
        Proc {
            child,
            all,
            readers,
        }
    }

    /// The server on 127.0.0.1:0 with the harness' service and client keys.
    pub fn server() -> Proc {
        Proc::start(&SERVER_ARGS, &[])
    }

    /// Wait for a line containing `needle` on either stream (the first such line printed
    /// since the start, whatever was waited for before); returns it. stdout and stderr
    /// are read on two threads, so lines of the two streams may arrive in either order.
    pub fn wait_line(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let (lock, cond) = &*self.all;
        let mut lines = lock.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) else {
                panic!("no line containing {needle:?} within 10s");
            };
            lines = cond.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// After the child has exited: every line it printed on stdout and stderr.
    pub fn output_after_exit(&mut self) -> Vec<String> {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        self.all.0.lock().unwrap().clone()
    }

    pub fn addr(&self) -> SocketAddr {
        let l = self.wait_line("listening on ws://");
        let rest = &l[l.find("ws://").unwrap() + 5..];
        rest.split_whitespace().next().unwrap().parse().unwrap()
    }

    pub fn sigterm(&self) {
        // SAFETY: plain kill(2) on the child we started, by its PID.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
    }

    pub fn wait_exit(&mut self) -> i32 {
        for _ in 0..100 {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        panic!("middleman did not exit within 10s");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A field of /proc/PID/status in KiB (VmRSS:, VmHWM:).
#[allow(dead_code)]
pub fn rss_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}
