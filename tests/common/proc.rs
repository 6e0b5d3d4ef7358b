//! The real `middleman` binary as a child process, with its output lines collected.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

#[allow(dead_code)]
pub struct Proc {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    /// Lines received while waiting for another one. stdout and stderr are read by two
    /// threads, so their lines can arrive out of the order they were written in (keys
    /// on stdout, then "listening" on stderr): a wait must not throw away a line a
    /// later wait needs.
    held: std::cell::RefCell<Vec<String>>,
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
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(format!("out: {l}"));
            }
        });
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send(format!("err: {l}"));
            }
        });
        Proc {
            child,
            lines,
            held: Default::default(),
        }
    }

    /// Wait for a line containing `needle`; returns it.
    pub fn wait_line(&self, needle: &str) -> String {
        {
            let mut held = self.held.borrow_mut();
            if let Some(i) = held.iter().position(|l| l.contains(needle)) {
                return held.remove(i);
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(l) => self.held.borrow_mut().push(l),
                Err(_) => break,
            }
        }
        panic!("no line containing {needle:?} within 10s");
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
