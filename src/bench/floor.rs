//! `bench floor`: what the machine allows a fan-out, measured with no server.
//!
//! The topology of `bench fanout --subs S --threads T` against a server, with the
//! server replaced by the least a relay can do: a publisher thread writes messages; a
//! relay, in a process of its own as a server is (this binary's hidden `bench
//! floor-relay`), waits in epoll, reads what arrived and writes those bytes to each of
//! the S subscriber sockets (one write each: no framing, no parsing, no routing, no
//! queue); T receiver threads poll their share of the subscriber sockets with `mio` as
//! the bench's workers do, but only split fixed-size records (no WebSocket or protocol
//! parsing: less work than the bench's receivers). All over loopback TCP with
//! `TCP_NODELAY`, stamped with the tool's clock; the relay's CPU is its relaying
//! thread's, from the start of relaying.
//!
//! Two modes, as `fanout` has:
//! - **Fixed load** (`--rate R`): one message per write on schedule. Its latency is
//!   what wake-ups, the scheduler and loopback TCP leave a relay that does nothing else
//!   on this machine: a server on the same machine, doing more per message, is not
//!   expected to get below it (short of spinning instead of sleeping, which on a
//!   machine shared with the load client takes the client's CPU).
//! - **Throughput** (no `--rate`): the publisher writes as fast as `fanout`'s flow
//!   control allows in the same shape: `--batch` messages per write at most `--window`
//!   messages ahead of the slowest subscriber (`window256`), or `--write-kib` KiB of
//!   messages per write with at most `--inflight` deliveries not yet received
//!   (`pipeline16k`). Deliveries per relay CPU-second are what the kernel's side of a
//!   fan-out costs, the part of a server's cost no server can avoid. What differs from
//!   `fanout`: no framing, so a message is `--size` bytes on the wire where a server's
//!   delivery also carries a WebSocket frame header and the protocol's header and
//!   subject, and a `--write-kib` write holds more messages.
//!
//! The relay never drops and never queues: its subscriber sockets are written
//! non-blocking, and a write that finds one full (or writes part) finishes in a
//! blocking write, which holds the relay until that receiver reads; such writes are
//! counted (`relay_full=`). The publisher's flow control is what keeps them rare.
//!
//! Messages are `--size` bytes: sequence number and send time (little-endian u64s),
//! then padding; receivers count losses and reordering per subscriber.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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
/// Throughput: how long the publisher may be held back by flow control with no
/// receiver making progress before it stops (the receivers then report losses).
const STALL: Duration = Duration::from_secs(3);

/// What the receiver threads measured.
struct Received {
    hist: Histogram<u64>,
    /// Per subscriber: messages received in order, and out of order.
    per_sub: Vec<(u64, u64)>,
    errors: u64,
    first_error: Option<String>,
    /// When the last message arrived ([`now_ns`]; 0: none).
    last_rx_ns: u64,
}

impl Received {
    fn new() -> Received {
        Received {
            hist: histogram(),
            per_sub: Vec::new(),
            errors: 0,
            first_error: None,
            last_rx_ns: 0,
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
        self.last_rx_ns = self.last_rx_ns.max(other.last_rx_ns);
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// The receivers' progress, for the publisher's flow control.
struct Progress {
    /// Per receiver thread: the fewest messages any of its subscribers received.
    mins: Vec<AtomicU64>,
    /// Messages received by all subscribers together.
    total: AtomicU64,
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

/// What the publisher did.
struct Published {
    sent: u64,
    writes: u64,
    per_write: u64,
    secs: f64,
    /// Fixed load: how late each write was against its schedule.
    late: Histogram<u64>,
    err: Option<String>,
}

/// Run the floor measurement; prints a report and a `result:` line like `fanout`'s.
pub fn floor(a: &FloorArgs) -> Result<bool, String> {
    if a.subs == 0 {
        return Err("bench floor needs at least one subscriber (--subs)".into());
    }
    if a.rate > 0 && a.write_kib > 0 {
        return Err(
            "--rate (one message per write) and --write-kib are different load shapes: give one"
                .into(),
        );
    }
    if a.rate == 0 && a.inflight == 0 && a.write_kib == 0 && a.window == 0 {
        return Err("bench floor needs --window (or --inflight) of at least 1".into());
    }
    fn e(what: &'static str) -> impl Fn(io::Error) -> String {
        move |err| format!("{what}: {err}")
    }
    let size = a.size.max(HEADER);
    let threads = a.threads.clamp(1, a.subs);
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
    let progress = Arc::new(Progress {
        mins: (0..threads).map(|_| AtomicU64::new(0)).collect(),
        total: AtomicU64::new(0),
    });
    let mut receivers = Vec::new();
    for (n, g) in groups.into_iter().enumerate() {
        // Fixed load has no flow control: its receivers do not count progress.
        let pr = (a.rate == 0).then(|| Arc::clone(&progress));
        let h = std::thread::Builder::new()
            .name(format!("floor-recv-{n}"))
            .spawn(move || receive_loop(g, size, hard, n, pr.as_deref()))
            .map_err(e("spawn a receiver"))?;
        receivers.push(h);
    }

    let t0 = now_ns();
    let p = if a.rate > 0 {
        publish_fixed(&mut publisher, a, size)
    } else {
        publish_throughput(&mut publisher, a, size, &progress)
    };
    // The relay reads end-of-stream, finishes, closes the subscribers' sockets and exits.
    let _ = publisher.shutdown(Shutdown::Write);

    let mut got = Received::new();
    for h in receivers {
        let r = h
            .join()
            .map_err(|_| "a receiver thread panicked".to_string())?;
        got.absorb(r);
    }

    let (relay_cpu, relay_full) = relay.finish(hard)?;
    let sent = p.sent;
    let deliveries: u64 = got.per_sub.iter().map(|&(i, o)| i + o).sum();
    let out_of_order: u64 = got.per_sub.iter().map(|&(_, o)| o).sum();
    let lost: u64 = got
        .per_sub
        .iter()
        .map(|&(i, _)| sent.saturating_sub(i))
        .sum::<u64>()
        + sent * (a.subs - got.per_sub.len()) as u64;
    let ok = lost == 0 && out_of_order == 0 && got.errors == 0 && p.err.is_none() && sent > 0;
    let us = |ns: u64| ns as f64 / 1e3;
    let cpu_s = relay_cpu.as_secs_f64();
    if a.rate == 0 {
        let inflight = match (a.inflight, a.write_kib) {
            (0, 0) => 0,
            (0, _) => super::run::DEFAULT_INFLIGHT,
            (n, _) => n,
        };
        let shape = super::run::flow_shape(0, a.write_kib, inflight, a.window, a.batch, false);
        // As `fanout` reports it: from the first write to the last delivery.
        let elapsed = (got.last_rx_ns.max(t0 + 1) - t0) as f64 / 1e9;
        let rate = deliveries as f64 / elapsed;
        let per_cpu = if cpu_s > 0.0 {
            deliveries as f64 / cpu_s
        } else {
            f64::INFINITY
        };
        let util = cpu_s / elapsed.max(1e-9);
        println!(
            "floor (no server: a relay process copying bytes to each subscriber over loopback TCP), shape {shape}: 1 publisher x {} subscribers, {size} B messages, {sent} published in {:.2} s, {} writes ({} messages per write), {threads} receiver thread(s)",
            a.subs, p.secs, p.writes, p.per_write
        );
        println!("  deliveries: {deliveries} in {elapsed:.3} s = {rate:.0}/s");
        println!(
            "  relay CPU: {cpu_s:.2} s in {elapsed:.2} s = {:.1}% of one core; {:.0} deliveries per relay CPU-second; {relay_full} write(s) found a subscriber socket full",
            100.0 * util,
            per_cpu
        );
        println!("  latency: {}", latency_line(&got.hist));
        println!("  lost: {lost}, out of order: {out_of_order}");
        if let Some(err) = got.first_error.as_ref().or(p.err.as_ref()) {
            println!("  first error: {err}");
        }
        println!(
            "result: scenario=floor shape={shape} proto=floor transport=tcp publishers=1 subs={} size={size} rate=0 window={} batch={} write_kib={} inflight={inflight} msgs_per_write={} threads={threads} sent={sent} deliveries={deliveries} elapsed_s={elapsed:.3} deliveries_per_s={rate:.0} relay_cpu_s={cpu_s:.3} relay_full={relay_full} server_cpu_s={cpu_s:.3} deliveries_per_server_cpu_s={per_cpu:.0} server_cpu_util={util:.3} {} lost={lost} out_of_order={out_of_order} errors={}",
            a.subs,
            a.window,
            a.batch,
            a.write_kib,
            p.per_write,
            latency_kv(&got.hist),
            got.errors
        );
        return Ok(ok);
    }
    let pub_secs = p.secs;
    let late = &p.late;
    let achieved = sent as f64 / pub_secs.max(1e-9);
    let held = achieved >= super::run::RATE_HELD * a.rate as f64;
    let shape = format!("fixed{}", super::run::short_count(a.rate));
    let util = cpu_s / pub_secs.max(1e-9);
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
        "  relay CPU: {cpu_s:.2} s in {pub_secs:.2} s = {:.1}% of one core",
        100.0 * util
    );
    println!("  latency: {}", latency_line(&got.hist));
    println!("  deliveries: {deliveries}, lost: {lost}, out of order: {out_of_order}");
    if let Some(err) = got.first_error.as_ref().or(p.err.as_ref()) {
        println!("  first error: {err}");
    }
    println!(
        "result: scenario=floor shape={shape} proto=floor transport=tcp publishers=1 subs={} size={size} rate={} threads={threads} sent={sent} deliveries={deliveries} achieved_rate={achieved:.0} rate_held={} late_p99_us={:.1} late_max_us={:.1} relay_cpu_s={cpu_s:.3} relay_full={relay_full} server_cpu_util={util:.3} {} lost={lost} out_of_order={out_of_order} errors={}",
        a.subs,
        a.rate,
        if held { "yes" } else { "no" },
        us(late.value_at_quantile(0.99)),
        us(late.max()),
        latency_kv(&got.hist),
        got.errors
    );
    Ok(ok)
}

/// Fixed load: one message per write, on schedule; the stamp is taken just before the
/// write, so the publisher's own lateness is reported apart, not in the latency.
fn publish_fixed(publisher: &mut TcpStream, a: &FloorArgs, size: usize) -> Published {
    let count = (a.duration.as_nanos() as u64).saturating_mul(a.rate) / 1_000_000_000;
    let interval_ns = 1_000_000_000 / a.rate.max(1);
    let mut p = Published {
        sent: 0,
        writes: 0,
        per_write: 1,
        secs: 0.0,
        late: histogram(),
        err: None,
    };
    let mut msg = vec![0u8; size];
    let started = Instant::now();
    for i in 0..count {
        let due = started + Duration::from_nanos(i.saturating_mul(interval_ns));
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let behind = Instant::now().saturating_duration_since(due);
        p.late.saturating_record((behind.as_nanos() as u64).max(1));
        msg[..8].copy_from_slice(&i.to_le_bytes());
        msg[8..HEADER].copy_from_slice(&now_ns().to_le_bytes());
        if let Err(err) = publisher.write_all(&msg) {
            p.err = Some(format!("publisher: {err}"));
            break;
        }
        p.sent += 1;
        p.writes += 1;
    }
    p.secs = started.elapsed().as_secs_f64();
    p
}

/// Throughput: write `per_write` messages at a time for `--duration`, as far ahead of
/// the receivers as the shape's flow control allows (the same checks as `fanout`'s).
fn publish_throughput(
    publisher: &mut TcpStream,
    a: &FloorArgs,
    size: usize,
    progress: &Progress,
) -> Published {
    let (per_write, inflight) = if a.write_kib > 0 {
        let n = (a.write_kib * 1024 / size).max(1) as u64;
        let inflight = if a.inflight == 0 {
            super::run::DEFAULT_INFLIGHT
        } else {
            a.inflight
        };
        (n, inflight)
    } else {
        (a.batch.max(1) as u64, a.inflight)
    };
    let subs = a.subs as u64;
    let mut p = Published {
        sent: 0,
        writes: 0,
        per_write,
        secs: 0.0,
        late: histogram(),
        err: None,
    };
    let mut buf = vec![0u8; per_write as usize * size];
    let started = Instant::now();
    let end = started + a.duration;
    let mut idle_since: Option<Instant> = None;
    let mut spins = 0u32;
    while Instant::now() < end {
        let may = if inflight > 0 {
            let got = progress.total.load(Ordering::Acquire);
            let out = (p.sent * subs).saturating_sub(got);
            out == 0 || out + per_write * subs <= inflight
        } else {
            let min = progress
                .mins
                .iter()
                .map(|m| m.load(Ordering::Acquire))
                .min()
                .unwrap_or(0);
            p.sent < min.saturating_add(a.window)
        };
        if !may {
            // Held back by flow control: wait for the receivers, but not forever
            // (they report losses if they stopped).
            if idle_since.get_or_insert_with(Instant::now).elapsed() > STALL {
                p.err = Some(format!("publisher: no receiver progress in {STALL:?}"));
                break;
            }
            spins += 1;
            if spins < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
            continue;
        }
        idle_since = None;
        spins = 0;
        for (k, m) in buf.chunks_exact_mut(size).enumerate() {
            m[..8].copy_from_slice(&(p.sent + k as u64).to_le_bytes());
            m[8..HEADER].copy_from_slice(&now_ns().to_le_bytes());
        }
        if let Err(err) = publisher.write_all(&buf) {
            p.err = Some(format!("publisher: {err}"));
            break;
        }
        p.sent += per_write;
        p.writes += 1;
    }
    p.secs = started.elapsed().as_secs_f64();
    p
}

/// The relay process, killed if it is still running when dropped (an error path).
struct Relay(Child);

impl Relay {
    /// Wait (until `hard`) for the relay to exit; the CPU time it reports, and how many
    /// of its writes found a subscriber socket full.
    fn finish(&mut self, hard: Instant) -> Result<(Duration, u64), String> {
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
        let value = |key: &str| -> Result<u64, String> {
            out.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key))
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("no {key} in the relay's report: {out}"))
        };
        Ok((
            Duration::from_nanos(value("relay_cpu_ns=")?),
            value("relay_full=")?,
        ))
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
/// ends, and prints `relay_cpu_ns=` (its relaying thread's CPU time) and `relay_full=`
/// (writes that found a subscriber socket full and had to block).
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
    let (cpu, full) = relay_loop(input, outputs, hard).map_err(|err| format!("relay: {err}"))?;
    println!("relay_cpu_ns={} relay_full={full}", cpu.as_nanos());
    Ok(true)
}

/// The relay: wait in epoll for the publisher's bytes, write each read to every
/// subscriber. Nothing is dropped or queued: a write that finds a subscriber's socket
/// full finishes blocking (a receiver that falls behind holds the relay up, and that
/// shows as latency), and is counted. Returns the thread's CPU time and that count.
fn relay_loop(
    input: TcpStream,
    outputs: Vec<TcpStream>,
    hard: Instant,
) -> io::Result<(Duration, u64)> {
    input.set_nonblocking(true)?;
    let mut input = mio::net::TcpStream::from_std(input);
    let mut outputs = outputs;
    for out in &outputs {
        out.set_nonblocking(true)?;
    }
    let mut full = 0u64;
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
                        write_out(out, &buf[..n], &mut full)?;
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
    }
    Ok((thread_cpu().saturating_sub(cpu0), full))
}

/// Write all of `data` to a non-blocking subscriber socket: one write when it has
/// room; when it has not (or takes only part), count it in `full` and write the rest
/// blocking.
fn write_out(out: &mut TcpStream, data: &[u8], full: &mut u64) -> io::Result<()> {
    let done = loop {
        match out.write(data) {
            Ok(n) => break n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => break 0,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    };
    if done == data.len() {
        return Ok(());
    }
    *full += 1;
    out.set_nonblocking(false)?;
    let res = out.write_all(&data[done..]);
    out.set_nonblocking(true)?;
    res
}

/// A receiver (number `me`): poll its subscribers until each has reached end-of-stream
/// (the relay closed it) or the deadline passes; record each message's latency, and
/// after each poll publish its progress for the publisher's flow control, if any.
fn receive_loop(
    socks: Vec<TcpStream>,
    size: usize,
    hard: Instant,
    me: usize,
    progress: Option<&Progress>,
) -> Received {
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
    let mut reported = 0u64;
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
                        r.last_rx_ns = now;
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
        if let (Some(progress), false) = (progress, events.is_empty()) {
            let count = |s: &Sub| s.in_order + s.out_of_order;
            let min = subs.iter().map(count).min().unwrap_or(u64::MAX);
            let total: u64 = subs.iter().map(count).sum();
            if let Some(m) = progress.mins.get(me) {
                m.store(min, Ordering::Release);
            }
            progress.total.fetch_add(total - reported, Ordering::AcqRel);
            reported = total;
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

    /// A subscriber socket that cannot take a whole read at once is neither dropped
    /// nor queued: the write finishes blocking, is counted, and every byte arrives.
    #[test]
    fn a_full_subscriber_socket_is_waited_for_and_counted() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut w = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (mut r, _) = l.accept().expect("accept");
        w.set_nonblocking(true).expect("non-blocking");
        // Small buffers both sides, so no one write can take what follows, whatever
        // the machine's autotuning limits.
        socket2::SockRef::from(&w)
            .set_send_buffer_size(16 * 1024)
            .expect("SO_SNDBUF");
        socket2::SockRef::from(&r)
            .set_recv_buffer_size(16 * 1024)
            .expect("SO_RCVBUF");
        // Far more than those buffers hold.
        let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
        let len = data.len();
        let reader = std::thread::spawn(move || {
            r.set_read_timeout(Some(Duration::from_secs(30)))
                .expect("timeout");
            let mut got = Vec::with_capacity(len);
            r.read_to_end(&mut got).map(|_| got)
        });
        // An empty socket has room: a small write goes out at once, not counted.
        let mut full = 0;
        write_out(&mut w, &data[..100], &mut full).expect("write");
        assert_eq!(full, 0);
        write_out(&mut w, &data, &mut full).expect("write");
        assert_eq!(full, 1);
        drop(w);
        let got = reader.join().expect("reader").expect("read");
        assert_eq!(got.len(), 100 + len);
        assert!(got[..100] == data[..100] && got[100..] == data[..]);
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
