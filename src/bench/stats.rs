//! Measurement helpers: the tool's clock, the body stamp (sequence number and send
//! time), process CPU time and RSS from `/proc`, and latency histograms.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the tool's first call (one monotonic clock for all its threads).
pub fn now_ns() -> u64 {
    let e = *EPOCH.get_or_init(Instant::now);
    e.elapsed().as_nanos() as u64
}

/// Shortest body: 16 hex digits of sequence, a space, 16 of timestamp, a space.
pub const STAMP: usize = 34;

/// Fill `out` with a body of `size` bytes starting with the stamp of `seq` and `ts`.
pub fn stamp_body(out: &mut Vec<u8>, seq: u64, ts: u64, size: usize) {
    out.clear();
    push_hex(out, seq);
    out.push(b' ');
    push_hex(out, ts);
    out.push(b' ');
    let size = size.max(STAMP);
    out.resize(size, b'x');
    // Lines of 64 bytes (LF, never the last byte), so large bodies stay within the
    // server's line limit (middleman: 8 KiB by default); a 64-byte body is one line.
    for i in (63..size - 1).step_by(64) {
        out[i] = b'\n';
    }
}

/// Overwrite the stamp at the start of an already built body.
pub fn restamp(body: &mut [u8], seq: u64, ts: u64) {
    if body.len() >= STAMP {
        write_hex(&mut body[..16], seq);
        write_hex(&mut body[17..33], ts);
    }
}

fn push_hex(out: &mut Vec<u8>, v: u64) {
    let mut b = [0u8; 16];
    write_hex(&mut b, v);
    out.extend_from_slice(&b);
}

fn write_hex(out: &mut [u8], v: u64) {
    const D: &[u8; 16] = b"0123456789abcdef";
    for (i, o) in out.iter_mut().take(16).enumerate() {
        *o = D[((v >> (60 - 4 * i)) & 0xf) as usize];
    }
}

/// Read the stamp from a body: `(seq, ts)`.
pub fn read_stamp(body: &[u8]) -> Option<(u64, u64)> {
    if body.len() < STAMP - 1 {
        return None;
    }
    Some((hex(&body[..16])?, hex(&body[17..33])?))
}

fn hex(b: &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for &c in b {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        v = (v << 4) | d as u64;
    }
    Some(v)
}

/// A latency histogram in nanoseconds, 1 ns to 100 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).unwrap_or_else(|_| {
        // The bounds are constants; fall back to an auto-resizing histogram.
        Histogram::new(3).unwrap_or_else(|_| unreachable!("sigfig 3 is valid"))
    })
}

/// `p50 p99 p99.9 max` in microseconds, formatted.
pub fn latency_line(h: &Histogram<u64>) -> String {
    format!(
        "p50 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs, max {:.1} µs ({} samples)",
        us(h.value_at_quantile(0.5)),
        us(h.value_at_quantile(0.99)),
        us(h.value_at_quantile(0.999)),
        us(h.max()),
        h.len()
    )
}

/// `p50_us=.. p99_us=.. p999_us=.. max_us=..` for the result line.
pub fn latency_kv(h: &Histogram<u64>) -> String {
    format!(
        "p50_us={:.1} p99_us={:.1} p999_us={:.1} max_us={:.1}",
        us(h.value_at_quantile(0.5)),
        us(h.value_at_quantile(0.99)),
        us(h.value_at_quantile(0.999)),
        us(h.max())
    )
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// CPU time (user + system) of process `pid`, from `/proc/PID/stat`.
pub fn proc_cpu(pid: u32) -> Result<Duration, String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("cannot read /proc/{pid}/stat: {e}"))?;
    // The command name is in parentheses and may hold spaces: fields follow the last ')'.
    let rest = s
        .rfind(')')
        .map(|i| &s[i + 1..])
        .ok_or_else(|| format!("/proc/{pid}/stat: unexpected format"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is f[0]; utime is field 14, stime field 15.
    let ticks = |i: usize| -> Result<u64, String> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("/proc/{pid}/stat: no field {}", i + 3))
    };
    let total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Ok(Duration::from_nanos(total * 1_000_000_000 / hz))
}

/// Resident set size of process `pid` in bytes, from `VmRSS` in `/proc/PID/status`.
pub fn proc_rss(pid: u32) -> Result<u64, String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read /proc/{pid}/status: {e}"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| format!("/proc/{pid}/status: no VmRSS"))
}

/// CPU time (user + system) of this process, all threads (getrusage).
pub fn self_cpu() -> Duration {
    rusage_cpu(libc::RUSAGE_SELF)
}

/// CPU time (user + system) of the calling thread (getrusage `RUSAGE_THREAD`).
pub fn thread_cpu() -> Duration {
    rusage_cpu(libc::RUSAGE_THREAD)
}

fn rusage_cpu(who: libc::c_int) -> Duration {
    // SAFETY: getrusage writes only into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `who` is RUSAGE_SELF or RUSAGE_THREAD, both valid on Linux.
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Raise the soft open-file limit to the hard one (the tool may hold many sockets).
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    lim.rlim_cur
}

/// CPU time (user + system) of several processes together, e.g. every node of a
/// cluster and its nats-server.
pub fn procs_cpu(pids: &[u32]) -> Result<Duration, String> {
    pids.iter().map(|&p| proc_cpu(p)).sum()
}

/// Resident set size of several processes together, in bytes.
pub fn procs_rss(pids: &[u32]) -> Result<u64, String> {
    pids.iter().map(|&p| proc_rss(p)).sum()
}

/// CPU used by the server (all its processes together) between two samples, if any
/// pid was given.
pub struct ServerCpu {
    pids: Vec<u32>,
    start: Option<Duration>,
    each: Vec<Duration>,
}

impl ServerCpu {
    /// Take the first sample.
    pub fn start(pids: &[u32]) -> Result<ServerCpu, String> {
        let start = if pids.is_empty() {
            None
        } else {
            Some(procs_cpu(pids)?)
        };
        let each = pids
            .iter()
            .map(|&p| proc_cpu(p))
            .collect::<Result<_, _>>()?;
        Ok(ServerCpu {
            pids: pids.to_vec(),
            start,
            each,
        })
    }
    /// Each process's CPU time since [`ServerCpu::start`], in the order of the pids
    /// (where several processes are charged: which one the time went to); `None` as
    /// for [`ServerCpu::elapsed`].
    pub fn each(&self) -> Option<Vec<Duration>> {
        self.start?;
        self.pids
            .iter()
            .zip(&self.each)
            .map(|(&p, &t0)| proc_cpu(p).ok().map(|t| t.saturating_sub(t0)))
            .collect()
    }
    /// CPU time since [`ServerCpu::start`]; `None` without pids, or when one of the
    /// processes is gone (a partial sum would flatter the server).
    pub fn elapsed(&self) -> Option<Duration> {
        let start = self.start?;
        procs_cpu(&self.pids).ok().map(|t| t.saturating_sub(start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trip() {
        let mut b = Vec::new();
        stamp_body(&mut b, 0x1234, u64::MAX - 7, 64);
        assert_eq!(b.len(), 64);
        assert_eq!(read_stamp(&b), Some((0x1234, u64::MAX - 7)));
        restamp(&mut b, 9, 10);
        assert_eq!(read_stamp(&b), Some((9, 10)));
        assert!(!b.contains(&b'\n'), "a 64-byte body is one line");
        stamp_body(&mut b, 1, 2, 1000);
        assert_eq!(b.len(), 1000);
        assert_eq!(read_stamp(&b), Some((1, 2)));
        assert!(b
            .split(|&c| c == b'\n')
            .all(|l| l.len() <= 64 && !l.starts_with(b".")));
        assert_ne!(b.last(), Some(&b'\n'));
        assert_eq!(read_stamp(b"short"), None);
        assert_eq!(read_stamp(&[b'z'; 40]), None);
    }

    #[test]
    fn own_cpu_and_rss() {
        let pid = std::process::id();
        assert!(proc_cpu(pid).is_ok());
        assert!(proc_rss(pid).unwrap_or(0) > 0);
    }

    /// Several pids: their CPU times and RSS are summed (here the same process twice,
    /// sampled between two single readings, so the sum is bracketed).
    #[test]
    fn several_pids_are_summed() {
        let pid = std::process::id();
        // Burn a little CPU so the readings are not all zero.
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let before = proc_cpu(pid).expect("cpu");
        let both = procs_cpu(&[pid, pid]).expect("cpu");
        let after = proc_cpu(pid).expect("cpu");
        assert!(
            before * 2 <= both && both <= after * 2,
            "{before:?} {both:?} {after:?}"
        );
        assert_eq!(procs_cpu(&[]).expect("empty"), Duration::ZERO);
        assert!(
            procs_cpu(&[pid, u32::MAX]).is_err(),
            "a missing process is an error"
        );
        let rss = proc_rss(pid).expect("rss");
        let sum = procs_rss(&[pid, pid]).expect("rss");
        // RSS moves a little between readings; the sum is about twice one.
        assert!(sum > rss && sum < rss * 3, "{rss} {sum}");

        let none = ServerCpu::start(&[]).expect("start");
        assert!(none.elapsed().is_none());
        let two = ServerCpu::start(&[pid, pid]).expect("start");
        assert!(two.elapsed().is_some());
    }
}
