//! `bench floor`: what the machine allows a fixed-load row, measured with no server.
//!
//! The topology of `bench fanout --rate R --subs S --threads T` against a server, with
//! the server replaced by the least a relay can do: a publisher thread writes one
//! message per write at the offered rate; a relay, in a process of its own as a server
//! is (this binary's hidden `bench floor-relay`), waits in epoll, reads what arrived
//! and writes those bytes to each of the S subscriber sockets (one write each: no
//! framing, no parsing, no routing, no queue); T receiver threads poll their share of
//! the subscriber sockets with `mio` as the bench's workers do, but only split
//! fixed-size records (no WebSocket or protocol parsing: less work than the bench's
//! receivers). All over loopback TCP with `TCP_NODELAY`, stamped with the tool's
//! clock; the relay's CPU is its relaying thread's, from the start of relaying. Its latency is what wake-ups, the scheduler and loopback TCP leave
//! a relay that does nothing else on this machine: a server on the same machine, doing
//! more per message, is not expected to get below it (short of spinning instead of
//! sleeping, which on a machine shared with the load client takes the client's CPU).
//!
//! Messages are `--size` bytes: sequence number and send time (little-endian u64s),
//! then padding; receivers count losses and reordering per subscriber.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::{Events, Interest, Poll, Token};

use super::stats::{histogram, latency_kv, latency_line, now_ns, thread_cpu};
use super::{FloorArgs, FloorRelayArgs};

/// The relay's read buffer (one read is written to every subscriber).
const RELAY_BUF: usize = 64 * 1024;
/// Sequence number and send time.
const HEADER: usize = 16;
/// How long receivers and the relay may go without an event before checking the clock.
const IDLE_POLL: Duration = Duration::from_millis(2);
/// Longest the relay process may take to start and connect.
const SETUP: Duration = Duration::from_secs(10);
/// After the last send, how long the run may take to drain before it gives up.
const DRAIN: Duration = Duration::from_secs(10);

/// What the receiver threads measured.
struct Received {
    hist: Histogram<u64>,
    /// Per subscriber: messages received in order, and out of order.
    per_sub: Vec<(u64, u64)>,
    errors: u64,
    first_error: Option<String>,
}

impl Received {
    fn new() -> Received {
        Received {
            hist: histogram(),
            per_sub: Vec::new(),
            errors: 0,
            first_error: None,
        }
    }

    /// Count an error; the first one is kept for the report.
    fn fail(&mut self, err: String) {
        self.errors += 1;
        self.first_error.get_or_insert(err);
    }

    /// Add another receiver thread's outcome to this one.
    fn absorb(&mut self, other: Received) {
        let _ = self.hist.add(&other.hist);
        self.per_sub.extend(other.per_sub);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// One subscriber socket on a receiver thread.
struct Sub {
    sock: mio::net::TcpStream,
    /// A message's first bytes when a read ended inside it.
    partial: Vec<u8>,
    next: u64,
    in_order: u64,
    out_of_order: u64,
    open: bool,
}

/// Run the floor measurement; prints a report and a `result:` line like `fanout`'s.
pub fn floor(a: &FloorArgs) -> Result<bool, String> {
    if a.rate == 0 {
        return Err("bench floor needs --rate (messages per second, at least 1)".into());
    }
    if a.subs == 0 {
        return Err("bench floor needs at least one subscriber (--subs)".into());
    }
    fn e(what: &'static str) -> impl Fn(io::Error) -> String {
        move |err| format!("{what}: {err}")
    }
    let size = a.size.max(HEADER);
    let threads = a.threads.clamp(1, a.subs);
    let count = (a.duration.as_nanos() as u64).saturating_mul(a.rate) / 1_000_000_000;
    let interval_ns = 1_000_000_000 / a.rate;
    let hard = Instant::now() + a.duration + DRAIN;

    // The relay runs in a process of its own, as a server would: it connects once for
    // the publisher's stream and once per subscriber, and says which is which.
    let listener = TcpListener::bind("127.0.0.1:0").map_err(e("bind 127.0.0.1:0"))?;
    let addr = listener.local_addr().map_err(e("local address"))?;
    let exe = std::env::current_exe().map_err(e("own executable"))?;
    let limit = (a.duration + DRAIN).as_secs().max(1);
    let child = Command::new(exe)
        .args(["bench", "floor-relay", "--connect", &addr.to_string()])
        .args([
            "--subs",
            &a.subs.to_string(),
            "--limit-secs",
            &limit.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(e("start the relay process"))?;
    let mut relay = Relay(child);
    let mut input = None;
    let mut subs: Vec<Option<TcpStream>> = (0..a.subs).map(|_| None).collect();
    listener.set_nonblocking(true).map_err(e("listener"))?;
    let setup_end = Instant::now() + SETUP;
    for _ in 0..=a.subs {
        let sock = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    if let Ok(Some(st)) = relay.0.try_wait() {
                        return Err(format!("the relay process exited during set-up: {st}"));
                    }
                    if Instant::now() > setup_end {
                        return Err(format!("the relay did not connect within {SETUP:?}"));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(err) => return Err(format!("accept: {err}")),
            }
        };
        sock.set_nonblocking(false).map_err(e("blocking mode"))?;
        sock.set_nodelay(true).map_err(e("TCP_NODELAY"))?;
        sock.set_read_timeout(Some(SETUP))
            .map_err(e("read timeout"))?;
        let mut which = [0u8; 8];
        (&sock)
            .read_exact(&mut which)
            .map_err(e("the relay's hello"))?;
        sock.set_read_timeout(None).map_err(e("read timeout"))?;
        match u64::from_le_bytes(which) as usize {
            0 if input.is_none() => input = Some(sock),
            i if (1..=a.subs).contains(&i) && subs[i - 1].is_none() => subs[i - 1] = Some(sock),
            i => {
                return Err(format!(
                    "the relay said it was connection {i} twice or past the end"
                ))
            }
        }
    }
    drop(listener);
    let mut publisher = input.ok_or("the relay never connected its input")?;
    let mut groups: Vec<Vec<TcpStream>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, s) in subs.into_iter().enumerate() {
        groups[i % threads].push(s.ok_or("a subscriber connection is missing")?);
    }
    let mut receivers = Vec::new();
    for (n, g) in groups.into_iter().enumerate() {
        let h = std::thread::Builder::new()
            .name(format!("floor-recv-{n}"))
            .spawn(move || receive_loop(g, size, hard))
            .map_err(e("spawn a receiver"))?;
        receivers.push(h);
    }

    // Publish: one message per write, on schedule; the stamp is taken just before the
    // write, so the publisher's own lateness is reported apart, not in the latency.
    let mut late = histogram();
    let mut msg = vec![0u8; size];
    let started = Instant::now();
    let mut sent = 0u64;
    let mut pub_err = None;
    for i in 0..count {
        let due = started + Duration::from_nanos(i.saturating_mul(interval_ns));
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let behind = Instant::now().saturating_duration_since(due);
        late.saturating_record((behind.as_nanos() as u64).max(1));
        msg[..8].copy_from_slice(&i.to_le_bytes());
        msg[8..HEADER].copy_from_slice(&now_ns().to_le_bytes());
        if let Err(err) = publisher.write_all(&msg) {
            pub_err = Some(format!("publisher: {err}"));
            break;
        }
        sent += 1;
    }
    let pub_secs = started.elapsed().as_secs_f64();
    // The relay reads end-of-stream, finishes, closes the subscribers' sockets and exits.
    let _ = publisher.shutdown(Shutdown::Write);

    let mut got = Received::new();
    for h in receivers {
        let r = h
            .join()
            .map_err(|_| "a receiver thread panicked".to_string())?;
        got.absorb(r);
    }

    let relay_cpu = relay.finish(hard)?;
    let deliveries: u64 = got.per_sub.iter().map(|&(i, o)| i + o).sum();
    let out_of_order: u64 = got.per_sub.iter().map(|&(_, o)| o).sum();
    let lost: u64 = got
        .per_sub
        .iter()
        .map(|&(i, _)| sent.saturating_sub(i))
        .sum::<u64>()
        + sent * (a.subs - got.per_sub.len()) as u64;
    let achieved = sent as f64 / pub_secs.max(1e-9);
    let held = achieved >= super::run::RATE_HELD * a.rate as f64;
    let shape = format!("fixed{}", super::run::short_count(a.rate));
    let util = relay_cpu.as_secs_f64() / pub_secs.max(1e-9);
    let us = |ns: u64| ns as f64 / 1e3;
    println!(
        "floor (no server: a relay process copying bytes to each subscriber over loopback TCP), shape {shape}: 1 publisher x {} subscribers, {size} B messages, {sent} published in {pub_secs:.2} s, {threads} receiver thread(s)",
        a.subs
    );
    println!(
        "  offered {} msg/s, achieved {achieved:.0} msg/s ({:.1}%){}; publisher lateness p99 {:.1} µs, max {:.1} µs",
        a.rate,
        100.0 * achieved / a.rate as f64,
        if held { "" } else { ": RATE NOT HELD" },
        us(late.value_at_quantile(0.99)),
        us(late.max())
    );
    println!(
        "  relay CPU: {:.2} s in {pub_secs:.2} s = {:.1}% of one core",
        relay_cpu.as_secs_f64(),
        100.0 * util
    );
    println!("  latency: {}", latency_line(&got.hist));
    println!("  deliveries: {deliveries}, lost: {lost}, out of order: {out_of_order}");
    if let Some(err) = got.first_error.as_ref().or(pub_err.as_ref()) {
        println!("  first error: {err}");
    }
    println!(
        "result: scenario=floor shape={shape} proto=floor transport=tcp publishers=1 subs={} size={size} rate={} threads={threads} sent={sent} deliveries={deliveries} achieved_rate={achieved:.0} rate_held={} late_p99_us={:.1} late_max_us={:.1} relay_cpu_s={:.3} server_cpu_util={util:.3} {} lost={lost} out_of_order={out_of_order} errors={}",
        a.subs,
        a.rate,
        if held { "yes" } else { "no" },
        us(late.value_at_quantile(0.99)),
        us(late.max()),
        relay_cpu.as_secs_f64(),
        latency_kv(&got.hist),
        got.errors
    );
    Ok(lost == 0 && out_of_order == 0 && got.errors == 0 && pub_err.is_none() && sent > 0)
}

/// The relay process, killed if it is still running when dropped (an error path).
struct Relay(Child);

impl Relay {
    /// Wait (until `hard`) for the relay to exit; the CPU time it reports.
    fn finish(&mut self, hard: Instant) -> Result<Duration, String> {
        let status = loop {
            match self.0.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if Instant::now() > hard => {
                    return Err("the relay process did not finish in time".into())
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(err) => return Err(format!("wait for the relay: {err}")),
            }
        };
        let mut out = String::new();
        if let Some(mut o) = self.0.stdout.take() {
            o.read_to_string(&mut out)
                .map_err(|err| format!("the relay's report: {err}"))?;
        }
        if !status.success() {
            return Err(format!("the relay process failed ({status}): {out}"));
        }
        out.split_whitespace()
            .find_map(|kv| kv.strip_prefix("relay_cpu_ns="))
            .and_then(|v| v.parse().ok())
            .map(Duration::from_nanos)
            .ok_or_else(|| format!("no relay_cpu_ns in the relay's report: {out}"))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `bench floor-relay`: the relay process `floor` starts. Connects its input and then
/// each subscriber, each announced by its index (0: input), relays until the input
/// ends, and prints `relay_cpu_ns=` (its relaying thread's CPU time).
pub fn relay_process(a: &FloorRelayArgs) -> Result<bool, String> {
    let connect = |i: u64| -> Result<TcpStream, String> {
        let mut s = TcpStream::connect_timeout(&a.connect, SETUP)
            .map_err(|err| format!("connect to {}: {err}", a.connect))?;
        s.set_nodelay(true)
            .map_err(|err| format!("TCP_NODELAY: {err}"))?;
        s.write_all(&i.to_le_bytes())
            .map_err(|err| format!("hello: {err}"))?;
        Ok(s)
    };
    let input = connect(0)?;
    let outputs = (1..=a.subs as u64)
        .map(connect)
        .collect::<Result<Vec<_>, _>>()?;
    let hard = Instant::now() + Duration::from_secs(a.limit_secs);
    let cpu = relay_loop(input, outputs, hard).map_err(|err| format!("relay: {err}"))?;
    println!("relay_cpu_ns={}", cpu.as_nanos());
    Ok(true)
}

/// The relay: wait in epoll for the publisher's bytes, write each read to every
/// subscriber (blocking writes: a receiver that falls behind holds the relay up, and
/// that shows as latency). Returns the thread's CPU time.
fn relay_loop(input: TcpStream, outputs: Vec<TcpStream>, hard: Instant) -> io::Result<Duration> {
    input.set_nonblocking(true)?;
    let mut input = mio::net::TcpStream::from_std(input);
    let mut outputs = outputs;
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut input, Token(0), Interest::READABLE)?;
    let mut events = Events::with_capacity(4);
    let mut buf = vec![0u8; RELAY_BUF];
    let cpu0 = thread_cpu();
    'run: while Instant::now() < hard {
        poll.poll(&mut events, Some(IDLE_POLL))?;
        if events.is_empty() {
            continue;
        }
        loop {
            match input.read(&mut buf) {
                Ok(0) => break 'run,
                Ok(n) => {
                    for out in outputs.iter_mut() {
                        out.write_all(&buf[..n])?;
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
    }
    Ok(thread_cpu().saturating_sub(cpu0))
}

/// A receiver: poll its subscribers until each has reached end-of-stream (the relay
/// closed it) or the deadline passes; record each message's latency.
fn receive_loop(socks: Vec<TcpStream>, size: usize, hard: Instant) -> Received {
    let mut r = Received::new();
    let poll = match Poll::new() {
        Ok(p) => p,
        Err(err) => {
            r.fail(format!("poll: {err}"));
            r.per_sub = vec![(0, 0); socks.len()];
            return r;
        }
    };
    let mut subs = Vec::with_capacity(socks.len());
    for (i, s) in socks.into_iter().enumerate() {
        let mut sock = match s.set_nonblocking(true) {
            Ok(()) => mio::net::TcpStream::from_std(s),
            Err(err) => {
                r.fail(format!("non-blocking: {err}"));
                continue;
            }
        };
        if let Err(err) = poll
            .registry()
            .register(&mut sock, Token(i), Interest::READABLE)
        {
            r.fail(format!("register: {err}"));
        }
        subs.push(Sub {
            sock,
            partial: Vec::with_capacity(size),
            next: 0,
            in_order: 0,
            out_of_order: 0,
            open: true,
        });
    }
    let mut poll = poll;
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    let mut open = subs.len();
    while open > 0 && Instant::now() < hard {
        if let Err(err) = poll.poll(&mut events, Some(IDLE_POLL)) {
            r.fail(format!("poll: {err}"));
            break;
        }
        for ev in events.iter() {
            let Some(s) = subs.get_mut(ev.token().0) else {
                continue;
            };
            while s.open {
                match s.sock.read(&mut buf) {
                    Ok(0) => {
                        s.open = false;
                        open -= 1;
                    }
                    Ok(n) => {
                        let now = now_ns();
                        take_messages(s, &buf[..n], size, now, &mut r.hist);
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) => {
                        r.fail(format!("read: {err}"));
                        s.open = false;
                        open -= 1;
                    }
                }
            }
        }
    }
    r.per_sub = subs.iter().map(|s| (s.in_order, s.out_of_order)).collect();
    r
}

/// Split `data` (what one read returned) into `size`-byte messages, carrying a partial
/// one over to the next read; count each and record its latency against `now`.
fn take_messages(s: &mut Sub, mut data: &[u8], size: usize, now: u64, hist: &mut Histogram<u64>) {
    let mut one = |s: &mut Sub, m: &[u8]| {
        let seq = u64::from_le_bytes(m[..8].try_into().unwrap_or([0; 8]));
        let ts = u64::from_le_bytes(m[8..HEADER].try_into().unwrap_or([0; 8]));
        if seq == s.next {
            s.in_order += 1;
        } else {
            s.out_of_order += 1;
        }
        s.next = seq + 1;
        hist.saturating_record(now.saturating_sub(ts).max(1));
    };
    if !s.partial.is_empty() {
        let need = (size - s.partial.len()).min(data.len());
        s.partial.extend_from_slice(&data[..need]);
        data = &data[need..];
        if s.partial.len() < size {
            return;
        }
        let m = std::mem::take(&mut s.partial);
        one(s, &m);
        s.partial = m;
        s.partial.clear();
    }
    let mut chunks = data.chunks_exact(size);
    for m in &mut chunks {
        one(s, m);
    }
    s.partial.extend_from_slice(chunks.remainder());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub() -> Sub {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let s = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        Sub {
            sock: mio::net::TcpStream::from_std(s),
            partial: Vec::new(),
            next: 0,
            in_order: 0,
            out_of_order: 0,
            open: true,
        }
    }

    fn msg(seq: u64, ts: u64, size: usize) -> Vec<u8> {
        let mut m = vec![0u8; size];
        m[..8].copy_from_slice(&seq.to_le_bytes());
        m[8..16].copy_from_slice(&ts.to_le_bytes());
        m
    }

    #[test]
    fn messages_split_across_reads_are_reassembled_and_counted() {
        let size = 20;
        let stream: Vec<u8> = (0..5).flat_map(|i| msg(i, 1000 + i, size)).collect();
        // A byte at a time, then in uneven pieces: the same five messages either way.
        for pieces in [vec![1usize; stream.len()], vec![7, 33, 1, 59]] {
            let mut s = sub();
            let mut h = histogram();
            let mut at = 0;
            for p in pieces {
                take_messages(&mut s, &stream[at..at + p], size, 2000, &mut h);
                at += p;
            }
            assert_eq!(at, stream.len());
            assert_eq!((s.in_order, s.out_of_order, s.partial.len()), (5, 0, 0));
            assert_eq!(h.len(), 5);
            // Latencies 2000 - (1000 + i): 1000, 999, 998, 997, 996 ns.
            assert_eq!((h.min(), h.max()), (996, 1000));
        }
    }

    #[test]
    fn a_gap_counts_as_out_of_order() {
        let mut s = sub();
        let mut h = histogram();
        let data: Vec<u8> = [0u64, 2, 3].iter().flat_map(|&i| msg(i, 1, 16)).collect();
        take_messages(&mut s, &data, 16, 5, &mut h);
        assert_eq!((s.in_order, s.out_of_order), (2, 1));
    }
}
