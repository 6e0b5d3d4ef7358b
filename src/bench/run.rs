//! The scenarios: set-up (blocking, on the main thread), then worker threads each
//! polling their share of the connections, then a report.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use super::stats::{self, histogram, latency_kv, latency_line, now_ns, ServerCpu, STAMP};
use super::ws::{
    encode_mm, encode_nats_pub, parse_dec, push_dec, push_msg, Ev, Proto, Url, WsConn,
};
use super::{Common, ConnsArgs, FanoutArgs, ReqresArgs};

/// After the last send, how long receivers may make no progress before the run ends.
const STALL: Duration = Duration::from_secs(3);
/// Reads per connection per event before the others get a turn.
const READS_PER_TURN: usize = 16;
/// Bodies of ready probes start with this (a stamp starts with hex digits, so never
/// with this); receivers skip them, so probes are never counted.
const PROBE: &[u8] = b"probe ";
/// The `ReqID` of a middleman probe request.
const PROBE_REQID: &[u8] = b"probe-";
/// How often a fan-out probe is published while some subscriber has none yet, and how
/// long to wait before asking again after a probe request failed.
const PROBE_EVERY: Duration = Duration::from_millis(20);
/// NATS drops a request nobody listens to: send another probe after this long.
const PROBE_RETRY: Duration = Duration::from_millis(100);

/// What a connection does in a worker.
enum Role {
    Subscriber {
        /// Index of its publisher's topic in [`Plan::subjects`].
        topic: usize,
        next: u64,
        received: u64,
        out_of_order: u64,
    },
    Responder {
        handled: u64,
    },
    Requester {
        id: usize,
        quota: u64,
        sent: u64,
        done: u64,
        outstanding: u32,
        window: u32,
        finished: bool,
    },
}

struct Slot {
    conn: WsConn,
    role: Role,
}

/// Shared between the main thread and the workers.
#[derive(Default)]
struct Shared {
    start: AtomicBool,
    stop: AtomicBool,
    /// Messages received by subscribers / responses received by requesters.
    received: AtomicU64,
    /// Finished requesters.
    finished: AtomicU64,
    /// Unix time-free deadline for issuing requests, as [`now_ns`].
    req_deadline_ns: AtomicU64,
}

/// What one worker measured.
struct Outcome {
    hist: Histogram<u64>,
    received: u64,
    out_of_order: u64,
    errors: u64,
    first_error: Option<String>,
    last_rx_ns: u64,
    /// Per responder: requests handled.
    handled: Vec<u64>,
    req_sent: u64,
    req_done: u64,
    /// Per subscriber: its topic, messages received, of which out of order.
    per_sub: Vec<(usize, u64, u64)>,
}

/// Per-worker scenario constants.
#[derive(Clone)]
struct Plan {
    proto: Proto,
    subject: Vec<u8>,
    /// Fan-out: the topic of each publisher (subscribers check theirs).
    subjects: Vec<Vec<u8>>,
    size: usize,
}

struct Worker {
    plan: Plan,
    shared: Arc<Shared>,
    /// This worker's progress per topic: the fewest messages any of its subscribers of
    /// that topic received (`u64::MAX` when it has none).
    progress: Arc<Vec<AtomicU64>>,
    hard_deadline: Instant,
}

impl Worker {
    fn run(self, mut slots: Vec<Slot>) -> io::Result<Outcome> {
        let mut poll = Poll::new()?;
        for (i, s) in slots.iter_mut().enumerate() {
            s.conn.sock.set_nonblocking(true)?;
            let fd = s.conn.sock.as_raw_fd();
            poll.registry().register(
                &mut SourceFd(&fd),
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            )?;
        }
        let mut o = Outcome {
            hist: histogram(),
            received: 0,
            out_of_order: 0,
            errors: 0,
            first_error: None,
            last_rx_ns: 0,
            handled: Vec::new(),
            req_sent: 0,
            req_done: 0,
            per_sub: Vec::new(),
        };
        while !self.shared.start.load(Ordering::Acquire) {
            if self.shared.stop.load(Ordering::Acquire) || Instant::now() > self.hard_deadline {
                return Ok(o);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let mut body = Vec::with_capacity(self.plan.size.max(STAMP));
        let mut scratch = Vec::with_capacity(self.plan.size + 128);
        // Requesters fill their windows.
        for s in slots.iter_mut() {
            if let Role::Requester { .. } = s.role {
                self.top_up(s, &mut body, &mut scratch);
            }
        }
        let mut events = Events::with_capacity(1024);
        let mut dirty: Vec<usize> = (0..slots.len()).collect();
        let mut again: Vec<usize> = Vec::new();
        let mut reported = 0u64;
        let mut mins = vec![u64::MAX; self.progress.len()];
        loop {
            for &i in &dirty {
                if let Some(s) = slots.get_mut(i) {
                    if let Err(e) = s.conn.flush_nonblocking() {
                        note_error(&mut o, format!("write: {e}"));
                        s.conn.closed = true;
                    }
                }
            }
            dirty.clear();
            if self.shared.stop.load(Ordering::Acquire) || Instant::now() > self.hard_deadline {
                break;
            }
            let timeout = if again.is_empty() {
                Duration::from_millis(2)
            } else {
                Duration::ZERO
            };
            poll.poll(&mut events, Some(timeout))?;
            let mut ready: Vec<usize> = std::mem::take(&mut again);
            ready.extend(events.iter().map(|e| e.token().0));
            for i in ready {
                let Some(s) = slots.get_mut(i) else { continue };
                if s.conn.closed {
                    continue;
                }
                let mut more = false;
                for turn in 0..=READS_PER_TURN {
                    if turn == READS_PER_TURN {
                        more = true;
                        break;
                    }
                    match s.conn.read_nonblocking() {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) => {
                            note_error(&mut o, format!("read: {e}"));
                            break;
                        }
                    }
                    if let Err(e) = self.drain(s, &mut o, &mut body, &mut scratch) {
                        note_error(&mut o, format!("parse: {e}"));
                        s.conn.closed = true;
                        break;
                    }
                }
                if more {
                    again.push(i);
                }
                dirty.push(i);
            }
            // Progress for the publishers' windows and the main thread.
            mins.iter_mut().for_each(|m| *m = u64::MAX);
            for s in &slots {
                if let Role::Subscriber {
                    topic, received, ..
                } = s.role
                {
                    if let Some(m) = mins.get_mut(topic) {
                        *m = (*m).min(received);
                    }
                }
            }
            for (p, &m) in self.progress.iter().zip(&mins) {
                p.store(m, Ordering::Release);
            }
            if o.received != reported {
                self.shared
                    .received
                    .fetch_add(o.received - reported, Ordering::AcqRel);
                reported = o.received;
            }
            // Requesters that stopped by the deadline and have nothing in flight.
            for s in slots.iter_mut() {
                if let Role::Requester {
                    quota,
                    sent,
                    outstanding,
                    ref mut finished,
                    ..
                } = s.role
                {
                    let past = now_ns() >= self.shared.req_deadline_ns.load(Ordering::Relaxed);
                    if !*finished && outstanding == 0 && (sent >= quota || past) {
                        *finished = true;
                        self.shared.finished.fetch_add(1, Ordering::AcqRel);
                    }
                }
            }
        }
        for s in &slots {
            match s.role {
                Role::Subscriber {
                    topic,
                    received,
                    out_of_order,
                    ..
                } => o.per_sub.push((topic, received, out_of_order)),
                Role::Responder { handled } => o.handled.push(handled),
                Role::Requester { sent, done, .. } => {
                    o.req_sent += sent;
                    o.req_done += done;
                }
            }
        }
        Ok(o)
    }

    /// Handle everything parsed from one connection's read buffer.
    fn drain(
        &self,
        s: &mut Slot,
        o: &mut Outcome,
        body: &mut Vec<u8>,
        scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        let plan = &self.plan;
        let mut top_up = false;
        let Slot { conn, role } = s;
        // Each connection frames for its own URL (--sub-url may be another transport).
        let raw = conn.raw;
        conn.drain(|ev, w| match ev {
            Ev::Msg {
                cmd,
                subject,
                reply,
                reqid,
                body: b,
            } => match role {
                Role::Subscriber {
                    topic,
                    next,
                    received,
                    out_of_order,
                } => {
                    if plan.subjects.get(*topic).map(Vec::as_slice) != Some(subject) {
                        return;
                    }
                    let now = now_ns();
                    let Some((seq, ts)) = stats::read_stamp(b) else {
                        if !b.starts_with(PROBE) {
                            note_error(o, "subscriber: body without stamp".into());
                        }
                        return;
                    };
                    o.hist.saturating_record(now.saturating_sub(ts).max(1));
                    if seq >= *next {
                        *next = seq + 1;
                    } else {
                        o.out_of_order += 1;
                        *out_of_order += 1;
                    }
                    *received += 1;
                    o.received += 1;
                    o.last_rx_ns = now;
                }
                Role::Responder { handled } => {
                    if (cmd == b"REQ" || cmd == b"MSG") && !reply.is_empty() {
                        // A late ready probe is answered but not counted.
                        if !b.starts_with(PROBE) {
                            *handled += 1;
                        }
                        scratch.clear();
                        match plan.proto {
                            Proto::Mm => encode_mm(scratch, b"RES", subject, &[(b"rid", reply)], b),
                            Proto::Nats => encode_nats_pub(scratch, reply, b"", b),
                        }
                        push_msg(w, raw, scratch);
                    }
                }
                Role::Requester {
                    done, outstanding, ..
                } => {
                    let ok = match plan.proto {
                        Proto::Mm => cmd == b"RES",
                        Proto::Nats => cmd == b"MSG",
                    };
                    if ok {
                        let now = now_ns();
                        match stats::read_stamp(b) {
                            Some((_, ts)) => {
                                o.hist.saturating_record(now.saturating_sub(ts).max(1))
                            }
                            // The late answer to a ready probe: not one of ours.
                            None if b.starts_with(PROBE) => return,
                            None => {}
                        }
                        o.received += 1;
                        o.last_rx_ns = now;
                    } else if subject == b"ERROR" {
                        if reqid.starts_with(PROBE_REQID) {
                            return;
                        }
                        note_error(o, format!("request failed: {}", String::from_utf8_lossy(b)));
                    } else {
                        return;
                    }
                    *done += 1;
                    *outstanding = outstanding.saturating_sub(1);
                    top_up = true;
                }
            },
            Ev::Error(e) => note_error(o, format!("server: {}", String::from_utf8_lossy(e))),
            _ => {}
        })?;
        if top_up {
            self.top_up(s, body, scratch);
        }
        Ok(())
    }

    /// A requester sends until its window is full (or its quota or the deadline is hit).
    fn top_up(&self, s: &mut Slot, body: &mut Vec<u8>, scratch: &mut Vec<u8>) {
        let Role::Requester {
            id,
            quota,
            sent,
            outstanding,
            window,
            ..
        } = &mut s.role
        else {
            return;
        };
        let deadline = self.shared.req_deadline_ns.load(Ordering::Relaxed);
        while *outstanding < *window && *sent < *quota {
            let now = now_ns();
            if now >= deadline {
                break;
            }
            stats::stamp_body(body, *sent, now, self.plan.size);
            scratch.clear();
            let mut tag = Vec::with_capacity(40);
            match self.plan.proto {
                Proto::Mm => {
                    push_dec(&mut tag, *sent);
                    encode_mm(
                        scratch,
                        b"REQ",
                        &self.plan.subject,
                        &[(b"ReqID", &tag)],
                        body,
                    );
                }
                Proto::Nats => {
                    tag.extend_from_slice(b"_INBOX.bench.");
                    push_dec(&mut tag, *id as u64);
                    tag.push(b'.');
                    push_dec(&mut tag, *sent);
                    encode_nats_pub(scratch, &self.plan.subject, &tag, body);
                }
            }
            push_msg(&mut s.conn.wbuf, s.conn.raw, scratch);
            *sent += 1;
            *outstanding += 1;
        }
    }
}

fn note_error(o: &mut Outcome, e: String) {
    o.errors += 1;
    if o.first_error.is_none() {
        o.first_error = Some(e);
    }
}

fn connect(c: &Common, url: &Url) -> io::Result<WsConn> {
    WsConn::connect(url, c.proto, &c.key, c.setup_timeout)
}

/// Subscribe every connection (pipelined; connection `i` to `subject(i)`), then wait
/// until the server confirms each.
fn subscribe_all(
    conns: &mut [WsConn],
    subject: impl Fn(usize) -> String,
    queue: Option<&str>,
    deadline: Instant,
) -> io::Result<()> {
    for (i, c) in conns.iter_mut().enumerate() {
        c.subscribe(&subject(i), queue, i as u64 + 1);
        c.sync_start();
        c.flush_blocking()?;
    }
    for c in conns.iter_mut() {
        c.sync_wait(deadline)?;
    }
    Ok(())
}

/// What a ready probe took: probes sent and the time until ready.
struct Ready {
    probes: u64,
    took: Duration,
}

impl Ready {
    fn kv(r: &Option<Ready>) -> String {
        r.as_ref().map_or(String::new(), |r| {
            format!(
                " ready_probes={} ready_ms={:.0}",
                r.probes,
                r.took.as_secs_f64() * 1e3
            )
        })
    }
}

/// Read what a non-blocking connection has now and hand every event to `f`.
fn poll_conn(conn: &mut WsConn, mut f: impl FnMut(Ev<'_>, &mut Vec<u8>)) -> Result<(), String> {
    loop {
        let n = conn.read_nonblocking().map_err(|e| e.to_string())?;
        conn.drain(&mut f).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
    }
    conn.flush_nonblocking().map_err(|e| e.to_string())?;
    Ok(())
}

/// Fan-out ready probe (subscribers on another node, or several nodes behind one
/// port): every publisher publishes `probe N` on its topic every [`PROBE_EVERY`]
/// until each subscriber has received one, i.e. every subscription has reached the
/// publisher's node; then one more, the fence, that each subscriber must receive too,
/// so no earlier probe is still on its way when the measured run starts (order is
/// kept per publisher). Subscriber `i` listens to `subjects[topic_of(i)]`. Probes
/// arriving later anyway are skipped by the workers.
fn fanout_ready(
    publishers: &mut [WsConn],
    subs: &mut [WsConn],
    subjects: &[String],
    topic_of: impl Fn(usize) -> usize,
    timeout: Duration,
) -> Result<Ready, String> {
    let t0 = Instant::now();
    let deadline = t0 + timeout;
    for s in subs.iter_mut() {
        s.sock.set_nonblocking(true).map_err(|e| e.to_string())?;
    }
    let mut seen: Vec<Option<u64>> = vec![None; subs.len()];
    let (mut next, mut fence, mut last_sent) = (0u64, None::<u64>, None::<Instant>);
    let (mut body, mut scratch) = (Vec::new(), Vec::new());
    loop {
        let all_seen = seen.iter().all(Option::is_some);
        if let Some(f) = fence {
            if seen.iter().all(|n| n.is_some_and(|n| n >= f)) {
                break;
            }
        } else if all_seen || last_sent.is_none_or(|t| t.elapsed() >= PROBE_EVERY) {
            body.clear();
            body.extend_from_slice(PROBE);
            push_dec(&mut body, next);
            for (p, publisher) in publishers.iter_mut().enumerate() {
                scratch.clear();
                encode_pub(publisher.proto, &mut scratch, subjects[p].as_bytes(), &body);
                push_msg(&mut publisher.wbuf, publisher.raw, &scratch);
                publisher
                    .flush_blocking()
                    .map_err(|e| format!("ready probe: publisher {p}: {e}"))?;
            }
            if all_seen {
                fence = Some(next);
            }
            next += 1;
            last_sent = Some(Instant::now());
        }
        if Instant::now() > deadline {
            let reached = seen.iter().filter(|n| n.is_some()).count();
            return Err(format!(
                "ready probe: {reached} of {} subscribers received a probe within --setup-timeout ({timeout:?}){}",
                subs.len(),
                if fence.is_some() { ", the last probe not everywhere" } else { "" }
            ));
        }
        for (i, s) in subs.iter_mut().enumerate() {
            let topic = subjects[topic_of(i)].as_bytes();
            let mut err = None;
            let got = &mut seen[i];
            poll_conn(s, |ev, _| match ev {
                Ev::Msg { subject, body, .. } if subject == topic => {
                    if let Some(n) = body.strip_prefix(PROBE).and_then(parse_dec) {
                        *got = Some(got.map_or(n, |m| m.max(n)));
                    }
                }
                Ev::Error(e) => err = Some(String::from_utf8_lossy(e).into_owned()),
                _ => {}
            })
            .map_err(|e| format!("ready probe: subscriber {i}: {e}"))?;
            if let Some(e) = err {
                return Err(format!("ready probe: subscriber {i}: server said {e}"));
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(Ready {
        probes: next * publishers.len() as u64,
        took: t0.elapsed(),
    })
}

/// Request/reply ready probe (responders on another node): `requester` sends probe
/// requests, answered here by the responders, until one answer comes back, i.e. the
/// requester's node knows a responder. middleman answers every request (with an error
/// while no node has a responder), so a new probe goes only after the last one's
/// answer; NATS drops a request nobody listens to, so one unanswered for
/// [`PROBE_RETRY`] is sent again (a late answer is skipped by the workers).
fn reqres_ready(
    requester: &mut WsConn,
    responders: &mut [WsConn],
    subject: &str,
    timeout: Duration,
) -> Result<Ready, String> {
    let t0 = Instant::now();
    let deadline = t0 + timeout;
    requester
        .sock
        .set_nonblocking(true)
        .map_err(|e| e.to_string())?;
    for r in responders.iter_mut() {
        r.sock.set_nonblocking(true).map_err(|e| e.to_string())?;
    }
    let (mut sent, mut waiting, mut last_sent) = (0u64, false, None::<Instant>);
    let mut last_err = String::from("no answer");
    let (mut body, mut tag, mut scratch) = (Vec::new(), Vec::new(), Vec::new());
    loop {
        let retry = match requester.proto {
            Proto::Mm => !waiting && last_sent.is_none_or(|t| t.elapsed() >= PROBE_EVERY),
            Proto::Nats => last_sent.is_none_or(|t| t.elapsed() >= PROBE_RETRY),
        };
        if retry {
            body.clear();
            body.extend_from_slice(PROBE);
            push_dec(&mut body, sent);
            tag.clear();
            match requester.proto {
                Proto::Mm => {
                    tag.extend_from_slice(PROBE_REQID);
                    push_dec(&mut tag, sent);
                    requester.send_mm(b"REQ", subject.as_bytes(), &[(b"ReqID", &tag)], &body);
                }
                Proto::Nats => {
                    // Requester 0's inbox (`_INBOX.bench.0.*`).
                    tag.extend_from_slice(b"_INBOX.bench.0.probe");
                    push_dec(&mut tag, sent);
                    scratch.clear();
                    encode_nats_pub(&mut scratch, subject.as_bytes(), &tag, &body);
                    requester.send_text(&scratch);
                }
            }
            sent += 1;
            waiting = true;
            last_sent = Some(Instant::now());
        }
        if !requester
            .flush_nonblocking()
            .map_err(|e| format!("ready probe: requester: {e}"))?
        {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "ready probe: no probe request answered within --setup-timeout ({timeout:?}), {sent} sent; last: {last_err}"
            ));
        }
        for (i, r) in responders.iter_mut().enumerate() {
            let (proto, raw) = (r.proto, r.raw);
            poll_conn(r, |ev, w| {
                if let Ev::Msg {
                    cmd,
                    subject,
                    reply,
                    body: b,
                    ..
                } = ev
                {
                    if (cmd == b"REQ" || cmd == b"MSG") && !reply.is_empty() {
                        scratch.clear();
                        match proto {
                            Proto::Mm => {
                                encode_mm(&mut scratch, b"RES", subject, &[(b"rid", reply)], b)
                            }
                            Proto::Nats => encode_nats_pub(&mut scratch, reply, b"", b),
                        }
                        push_msg(w, raw, &scratch);
                    }
                }
            })
            .map_err(|e| format!("ready probe: responder {i}: {e}"))?;
        }
        let (mut answered, mut fatal) = (false, None);
        poll_conn(requester, |ev, _| match ev {
            Ev::Msg {
                cmd,
                subject,
                reqid,
                body,
                ..
            } => {
                if (cmd == b"RES" || cmd == b"MSG") && body.starts_with(PROBE) {
                    answered = true;
                } else if subject == b"ERROR" && reqid.starts_with(PROBE_REQID) {
                    waiting = false;
                    last_err = format!("server error for the probe ({} B body)", body.len());
                }
            }
            Ev::Error(e) => fatal = Some(String::from_utf8_lossy(e).into_owned()),
            _ => {}
        })
        .map_err(|e| format!("ready probe: requester: {e}"))?;
        if let Some(e) = fatal {
            return Err(format!("ready probe: requester: server said {e}"));
        }
        if answered {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(Ready {
        probes: sent,
        took: t0.elapsed(),
    })
}

/// A worker's per-topic progress counters and its thread.
type WorkerHandle = (
    Arc<Vec<AtomicU64>>,
    std::thread::JoinHandle<io::Result<Outcome>>,
);

/// Spread slots over `threads` workers and start them.
fn spawn_workers(
    slots: Vec<Slot>,
    threads: usize,
    plan: &Plan,
    shared: &Arc<Shared>,
    hard_deadline: Instant,
) -> io::Result<Vec<WorkerHandle>> {
    let threads = threads.clamp(1, slots.len().max(1));
    let mut groups: Vec<Vec<Slot>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, s) in slots.into_iter().enumerate() {
        groups[i % threads].push(s);
    }
    let mut out = Vec::new();
    for (n, g) in groups.into_iter().enumerate() {
        let progress: Arc<Vec<AtomicU64>> = Arc::new(
            (0..plan.subjects.len().max(1))
                .map(|_| AtomicU64::new(0))
                .collect(),
        );
        let w = Worker {
            plan: plan.clone(),
            shared: shared.clone(),
            progress: progress.clone(),
            hard_deadline,
        };
        let h = std::thread::Builder::new()
            .name(format!("bench-{n}"))
            .spawn(move || w.run(g))?;
        out.push((progress, h));
    }
    Ok(out)
}

fn join_all(workers: Vec<WorkerHandle>) -> Result<Outcome, String> {
    let mut total: Option<Outcome> = None;
    for (_, h) in workers {
        let o = h
            .join()
            .map_err(|_| "a worker thread panicked".to_string())?
            .map_err(|e| format!("worker: {e}"))?;
        match total.as_mut() {
            None => total = Some(o),
            Some(t) => {
                let _ = t.hist.add(&o.hist);
                t.received += o.received;
                t.out_of_order += o.out_of_order;
                t.errors += o.errors;
                if t.first_error.is_none() {
                    t.first_error = o.first_error;
                }
                t.last_rx_ns = t.last_rx_ns.max(o.last_rx_ns);
                t.handled.extend(o.handled);
                t.req_sent += o.req_sent;
                t.req_done += o.req_done;
                t.per_sub.extend(o.per_sub);
            }
        }
    }
    total.ok_or_else(|| "no worker".to_string())
}

/// ` server_cpu_each_s=A/B/...`: each charged process's CPU seconds in the order of
/// `--server-pid`, where more than one is charged (which process the time went to:
/// in a cluster run the nodes and nats-server); printed too. Empty otherwise.
fn each_kv(each: Option<&[Duration]>) -> String {
    match each {
        Some(each) if each.len() > 1 => {
            let secs: Vec<String> = each
                .iter()
                .map(|d| format!("{:.3}", d.as_secs_f64()))
                .collect();
            println!(
                "  server CPU by process (--server-pid order): {} s",
                secs.join(" / ")
            );
            format!(" server_cpu_each_s={}", secs.join("/"))
        }
        _ => String::new(),
    }
}

/// `sub_url=` (when it differs from --url), `server_pids=`, and the ready probe's
/// `ready_probes=` and `ready_ms=` (when there was one), for the result line.
fn split_kv(c: &Common, ready: &Option<Ready>) -> String {
    let mut kv = String::new();
    if c.split() {
        kv += &format!(" sub_url={}", c.sub_url());
    }
    kv += &format!(" server_pids={}", c.server_pid.len());
    kv + &Ready::kv(ready)
}

/// The report's line on the ready probe, when there was one: `who` at the sub URL were
/// ready after so many `probes`.
fn print_ready(c: &Common, ready: &Option<Ready>, who: &str, probes: &str) {
    if let Some(r) = ready {
        println!(
            "  {who} at {}: ready after {} {probes} in {:.0} ms",
            c.sub_url(),
            r.probes,
            r.took.as_secs_f64() * 1e3
        );
    }
}

fn transport_name(u: &Url) -> &'static str {
    if u.raw {
        "tcp"
    } else {
        "ws"
    }
}

fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Mm => "mm",
        Proto::Nats => "nats",
    }
}

/// In-flight bound (deliveries) of the deep-pipeline shape when `--inflight` is not given.
pub(super) const DEFAULT_INFLIGHT: u64 = 100_000;
/// A fixed-load run held its rate (`rate_held=yes`) when it achieved at least this
/// fraction of the offered rate.
pub(super) const RATE_HELD: f64 = 0.98;

/// `10000` → `10k`, `2000000` → `2M`, `1500` → `1500`.
pub(super) fn short_count(n: u64) -> String {
    if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
        format!("{}M", n / 1_000_000)
    } else if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

/// The name of a fan-out load shape (`shape=` on the result line): the flow control,
/// with what differs from its defaults, prefixed by `pubsPxS-` for P > 1 publishers.
fn fanout_shape(a: &FanoutArgs, inflight: u64) -> String {
    let flow = flow_shape(a.rate, a.write_kib, inflight, a.window, a.batch, a.pack);
    if a.publishers > 1 {
        format!("pubs{}x{}-{flow}", a.publishers, a.subs)
    } else {
        flow
    }
}

/// The flow-control part of a load shape's name (`bench floor` names its rows so too).
pub(super) fn flow_shape(
    rate: u64,
    write_kib: usize,
    inflight: u64,
    window: u64,
    batch: usize,
    pack: bool,
) -> String {
    let mut flow = if rate > 0 {
        format!("fixed{}", short_count(rate))
    } else if write_kib > 0 {
        let mut f = format!("pipeline{write_kib}k");
        if inflight != DEFAULT_INFLIGHT {
            f += &format!("-inflight{}", short_count(inflight));
        }
        f
    } else {
        let mut f = if inflight > 0 {
            format!("inflight{}", short_count(inflight))
        } else {
            format!("window{window}")
        };
        if batch != 16 {
            f += &format!("-batch{batch}");
        }
        f
    };
    if pack {
        flow += "-pack";
    }
    flow
}

/// Encode one publication of `body` on `subject`.
fn encode_pub(proto: Proto, out: &mut Vec<u8>, subject: &[u8], body: &[u8]) {
    match proto {
        Proto::Mm => encode_mm(out, b"PUB", subject, &[], body),
        Proto::Nats => encode_nats_pub(out, subject, b"", body),
    }
}

/// `bench fanout`.
pub fn fanout(a: &FanoutArgs) -> Result<bool, String> {
    let c = &a.common;
    let url = Url::parse(&c.url)?;
    let sub_url = Url::parse(c.sub_url())?;
    if a.subs == 0 || a.publishers == 0 {
        return Err("--subs and --publishers must be at least 1".into());
    }
    if a.rate > 0 && a.write_kib > 0 {
        return Err(
            "--rate (one message per write) and --write-kib are different load shapes: give one"
                .into(),
        );
    }
    let size = a.size.max(STAMP);
    let npubs = a.publishers;
    let per_topic = a.subs as u64;
    let inflight = match (a.inflight, a.write_kib) {
        (0, 0) => 0,
        (0, _) => DEFAULT_INFLIGHT,
        (n, _) => n,
    };
    let shape = fanout_shape(a, inflight);
    let subjects: Vec<String> = if npubs == 1 {
        vec![c.subject.clone()]
    } else {
        (0..npubs).map(|p| format!("{}.{p}", c.subject)).collect()
    };
    stats::raise_fd_limit();
    now_ns();
    let nsubs = a.subs * npubs;
    let setup_deadline =
        Instant::now() + c.setup_timeout + Duration::from_millis((nsubs + npubs) as u64);
    let mut publishers = Vec::with_capacity(npubs);
    for p in 0..npubs {
        publishers.push(connect(c, &url).map_err(|e| format!("publisher {p}: {e}"))?);
    }
    let mut subs = Vec::with_capacity(nsubs);
    for i in 0..nsubs {
        subs.push(connect(c, &sub_url).map_err(|e| format!("subscriber {i}: {e}"))?);
    }
    // Subscriber i listens to publisher i / S.
    subscribe_all(
        &mut subs,
        |i| subjects[i / a.subs].clone(),
        None,
        setup_deadline,
    )
    .map_err(|e| format!("subscribe: {e}"))?;
    // Subscribed on their node is not yet subscribed on the publisher's: wait until a
    // probe from each publisher reaches every subscriber.
    let ready = if c.probe() {
        Some(fanout_ready(
            &mut publishers,
            &mut subs,
            &subjects,
            |i| i / a.subs,
            c.setup_timeout,
        )?)
    } else {
        None
    };
    let slots = subs
        .into_iter()
        .enumerate()
        .map(|(i, conn)| Slot {
            conn,
            role: Role::Subscriber {
                topic: i / a.subs,
                next: 0,
                received: 0,
                out_of_order: 0,
            },
        })
        .collect();
    let plan = Plan {
        proto: c.proto,
        subject: c.subject.as_bytes().to_vec(),
        subjects: subjects.iter().map(|s| s.as_bytes().to_vec()).collect(),
        size,
    };
    let shared = Arc::new(Shared::default());
    let hard = Instant::now() + a.duration + STALL + Duration::from_secs(30);
    let workers =
        spawn_workers(slots, c.threads, &plan, &shared, hard).map_err(|e| e.to_string())?;

    let mut body = Vec::with_capacity(size);
    stats::stamp_body(&mut body, 0, 0, size);
    let mut scratch = Vec::with_capacity(size + 64);
    // Messages per write: one at a fixed rate, --batch, or as many as fit in --write-kib.
    let per_write: u64 = if a.rate > 0 {
        1
    } else if a.write_kib > 0 {
        let longest = plan
            .subjects
            .iter()
            .max_by_key(|s| s.len())
            .map_or(&[][..], |s| s);
        encode_pub(c.proto, &mut scratch, longest, &body);
        let mut framed = Vec::new();
        push_msg(&mut framed, url.raw, &scratch);
        let (room, one) = if a.pack {
            // One frame header (at most 14 bytes) for the whole write.
            ((a.write_kib * 1024).saturating_sub(14), scratch.len())
        } else {
            (a.write_kib * 1024, framed.len())
        };
        scratch.clear();
        (room / one.max(1)).max(1) as u64
    } else {
        a.batch.max(1) as u64
    };

    let cpu = ServerCpu::start(&c.server_pid)?;
    let cpu_t0 = Instant::now();
    let self0 = stats::self_cpu();
    shared.start.store(true, Ordering::Release);
    let t0 = now_ns();
    let started = Instant::now();
    let end = started + a.duration;
    let limit = if a.msgs == 0 { u64::MAX } else { a.msgs };
    let interval_ns = 1_000_000_000u64.checked_div(a.rate).unwrap_or(0);
    let mut sent = vec![0u64; npubs];
    let mut total_sent = 0u64;
    let mut writes = 0u64;
    // Rounds done: in each, every publisher that may write writes once.
    let mut round = 0u64;
    // Fixed rate: how late each write was against its schedule.
    let mut late = histogram();
    let mut last_write = started;
    let mut idle_since: Option<Instant> = None;
    let mut spins = 0u32;
    let mut pub_err = None;
    let mut all_sent = false;
    'publish: loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if sent.iter().all(|&n| n >= limit) {
            all_sent = true;
            break;
        }
        let due = started + Duration::from_nanos(round.saturating_mul(interval_ns));
        if interval_ns > 0 && due >= end {
            // The schedule's slots are [0, duration): R × duration messages.
            break;
        }
        if interval_ns > 0 && due > now {
            std::thread::sleep(due - now);
        }
        let mut progressed = false;
        for (p, publisher) in publishers.iter_mut().enumerate() {
            let m = per_write.min(limit - sent[p]);
            if m == 0 {
                continue;
            }
            // Flow control: deliveries in flight (all publishers), or this publisher's
            // window over the slowest subscriber of its topic.
            if inflight > 0 {
                let got = shared.received.load(Ordering::Acquire);
                let out = (total_sent * per_topic).saturating_sub(got);
                if out > 0 && out + m * per_topic > inflight {
                    continue;
                }
            } else {
                let min = workers
                    .iter()
                    .map(|(g, _)| g.get(p).map_or(u64::MAX, |x| x.load(Ordering::Acquire)))
                    .min()
                    .unwrap_or(0);
                if sent[p] >= min.saturating_add(a.window) {
                    continue;
                }
            }
            if interval_ns > 0 {
                let behind = Instant::now().saturating_duration_since(due);
                late.saturating_record((behind.as_nanos() as u64).max(1));
            }
            let subject = &plan.subjects[p];
            scratch.clear();
            for _ in 0..m {
                stats::restamp(&mut body, sent[p], now_ns());
                encode_pub(c.proto, &mut scratch, subject, &body);
                if !a.pack {
                    push_msg(&mut publisher.wbuf, url.raw, &scratch);
                    scratch.clear();
                }
                sent[p] += 1;
            }
            if a.pack && !scratch.is_empty() {
                push_msg(&mut publisher.wbuf, url.raw, &scratch);
            }
            if let Err(e) = publisher.flush_blocking() {
                pub_err = Some(format!("publisher {p}: {e}"));
                break 'publish;
            }
            total_sent += m;
            writes += 1;
            progressed = true;
            last_write = Instant::now();
        }
        if progressed {
            round += 1;
            idle_since = None;
            spins = 0;
        } else {
            // Every publisher is held back by flow control: wait for the subscribers,
            // but not forever (they report losses if they stopped).
            if idle_since.get_or_insert_with(Instant::now).elapsed() > STALL {
                break;
            }
            spins += 1;
            if spins < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }
    let pub_secs = started.elapsed().as_secs_f64();
    // The span the offered rate applied to: the run's duration, or up to the last
    // message's slot when every publisher reached --msgs first.
    let rate_span = if all_sent {
        (last_write - started).as_secs_f64() + interval_ns as f64 / 1e9
    } else {
        pub_secs
    };

    // Wait for every delivery, or until receivers stall.
    let expected = total_sent * per_topic;
    let mut last = (shared.received.load(Ordering::Acquire), Instant::now());
    while Instant::now() < hard {
        let got = shared.received.load(Ordering::Acquire);
        if got >= expected {
            break;
        }
        if got != last.0 {
            last = (got, Instant::now());
        } else if last.1.elapsed() > STALL {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    shared.stop.store(true, Ordering::Release);
    // Did the server refuse anything from a publisher (e.g. a close for a limit)?
    if pub_err.is_none() {
        pub_err = publishers.iter_mut().find_map(publisher_refusal);
    }
    let o = join_all(workers)?;
    let server_cpu = cpu.elapsed();
    let server_each = cpu.each();
    let cpu_wall = cpu_t0.elapsed().as_secs_f64();
    let client_cpu = stats::self_cpu().saturating_sub(self0);
    drop(publishers);

    // Losses per subscriber against what its own publisher sent.
    let mut lost = 0u64;
    let mut bad = vec![false; npubs];
    for &(topic, got, ooo) in &o.per_sub {
        let l = sent[topic].saturating_sub(got - ooo.min(got));
        lost += l;
        if l > 0 || ooo > 0 {
            bad[topic] = true;
        }
    }
    if o.per_sub.len() != nsubs {
        lost += expected.saturating_sub(o.received);
    }
    let bad_pubs = bad.iter().filter(|&&b| b).count();
    let elapsed = (o.last_rx_ns.max(t0 + 1) - t0) as f64 / 1e9;
    let rate = o.received as f64 / elapsed;
    println!(
        "fanout ({} over {}), shape {shape}: {} publisher(s) x {} subscribers, {} B bodies, {} messages published in {:.2} s, {} writes ({} messages per write){}",
        proto_name(c.proto),
        transport_name(&url),
        npubs,
        a.subs,
        size,
        total_sent,
        pub_secs,
        writes,
        per_write,
        if a.rate > 0 {
            format!(" at {} msg/s per publisher", a.rate)
        } else {
            String::new()
        }
    );
    println!(
        "  deliveries: {} in {:.3} s = {:.0}/s",
        o.received, elapsed, rate
    );
    let mut kv = format!(
        "result: scenario=fanout shape={shape} proto={} transport={} publishers={npubs} subs={} size={} rate={} window={} batch={} write_kib={} inflight={inflight} msgs_per_write={per_write} pack={} sent={} deliveries={} elapsed_s={:.3} deliveries_per_s={:.0}",
        proto_name(c.proto), transport_name(&url), a.subs, size, a.rate, a.window, a.batch, a.write_kib, u8::from(a.pack), total_sent, o.received, elapsed, rate
    );
    kv += &split_kv(c, &ready);
    print_ready(c, &ready, "subscribers", "probe(s)");
    if a.rate > 0 {
        let achieved = total_sent as f64 / npubs as f64 / rate_span.max(1e-9);
        let held = achieved >= RATE_HELD * a.rate as f64;
        println!(
            "  offered {} msg/s per publisher, achieved {:.0} msg/s ({:.1}%){}; publisher lateness p99 {:.1} µs, max {:.1} µs",
            a.rate,
            achieved,
            100.0 * achieved / a.rate as f64,
            if held { "" } else { ": RATE NOT HELD" },
            late.value_at_quantile(0.99) as f64 / 1e3,
            late.max() as f64 / 1e3,
        );
        kv += &format!(
            " achieved_rate={achieved:.0} rate_held={} late_p99_us={:.1} late_max_us={:.1}",
            if held { "yes" } else { "no" },
            late.value_at_quantile(0.99) as f64 / 1e3,
            late.max() as f64 / 1e3,
        );
    }
    if let Some(cpu) = server_cpu {
        let s = cpu.as_secs_f64();
        let per = if s > 0.0 {
            o.received as f64 / s
        } else {
            f64::INFINITY
        };
        let util = s / cpu_wall.max(1e-9);
        println!(
            "  server CPU: {:.2} s in {:.2} s = {:.1}% of one core; {:.3} s per million deliveries = {:.0} deliveries per server CPU-second",
            s,
            cpu_wall,
            100.0 * util,
            s * 1e6 / o.received.max(1) as f64,
            per
        );
        kv += &format!(
            " server_cpu_s={s:.3} deliveries_per_server_cpu_s={per:.0} server_cpu_util={util:.3}"
        );
        kv += &each_kv(server_each.as_deref());
    }
    println!(
        "  client CPU: {:.2} s ({:.0}% of one core)",
        client_cpu.as_secs_f64(),
        100.0 * client_cpu.as_secs_f64() / elapsed.max(1e-9)
    );
    kv += &format!(" client_cpu_s={:.3}", client_cpu.as_secs_f64());
    println!("  latency: {}", latency_line(&o.hist));
    println!(
        "  lost: {lost}, out of order: {}, publishers with either: {bad_pubs}",
        o.out_of_order
    );
    kv += &format!(
        " {} lost={lost} out_of_order={} bad_publishers={bad_pubs} errors={}",
        latency_kv(&o.hist),
        o.out_of_order,
        o.errors
    );
    if let Some(e) = o.first_error.as_ref().or(pub_err.as_ref()) {
        println!("  first error: {e}");
    }
    println!("{kv}");
    Ok(lost == 0 && o.out_of_order == 0 && o.errors == 0 && pub_err.is_none() && total_sent > 0)
}

/// An error or close the server sent the publisher, if any (read without blocking).
fn publisher_refusal(p: &mut WsConn) -> Option<String> {
    if p.sock.set_nonblocking(true).is_err() {
        return None;
    }
    let mut err = None;
    for _ in 0..64 {
        match p.read_nonblocking() {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                err.get_or_insert(format!("publisher: {e}"));
                break;
            }
        }
    }
    let _ = p.drain(|ev, _| match ev {
        Ev::Error(e) => {
            err = Some(format!(
                "publisher: server said {}",
                String::from_utf8_lossy(e)
            ));
        }
        Ev::Msg { subject, body, .. } if subject == b"ERROR" => {
            err = Some(format!("publisher: {}", String::from_utf8_lossy(body)));
        }
        _ => {}
    });
    err
}

/// `bench reqres`.
pub fn reqres(a: &ReqresArgs) -> Result<bool, String> {
    let c = &a.common;
    let url = Url::parse(&c.url)?;
    let sub_url = Url::parse(c.sub_url())?;
    if a.requesters == 0 || a.responders == 0 || a.window == 0 {
        return Err("--requesters, --responders and --window must be at least 1".into());
    }
    let size = a.size.max(STAMP);
    stats::raise_fd_limit();
    now_ns();
    let n = a.requesters + a.responders;
    let setup_deadline = Instant::now() + c.setup_timeout + Duration::from_millis(n as u64);
    let mut responders = Vec::new();
    for i in 0..a.responders {
        responders.push(connect(c, &sub_url).map_err(|e| format!("responder {i}: {e}"))?);
    }
    subscribe_all(
        &mut responders,
        |_| c.subject.clone(),
        Some("bench"),
        setup_deadline,
    )
    .map_err(|e| format!("responders: {e}"))?;
    let mut requesters = Vec::new();
    for i in 0..a.requesters {
        let mut r = connect(c, &url).map_err(|e| format!("requester {i}: {e}"))?;
        if c.proto == Proto::Nats {
            r.subscribe(&format!("_INBOX.bench.{i}.*"), None, 1);
        }
        requesters.push(r);
    }
    if c.proto == Proto::Nats {
        for r in requesters.iter_mut() {
            r.sync_start();
            r.flush_blocking().map_err(|e| e.to_string())?;
        }
        for r in requesters.iter_mut() {
            r.sync_wait(setup_deadline).map_err(|e| e.to_string())?;
        }
    }
    // The responders' node knows them; wait until the requesters' node does too.
    let ready = if c.probe() {
        Some(reqres_ready(
            &mut requesters[0],
            &mut responders,
            &c.subject,
            c.setup_timeout,
        )?)
    } else {
        None
    };
    let total = if a.msgs == 0 { u64::MAX } else { a.msgs };
    let per = total / a.requesters as u64;
    let extra = if a.msgs == 0 {
        0
    } else {
        total % a.requesters as u64
    };
    let mut slots: Vec<Slot> = Vec::new();
    for conn in responders {
        slots.push(Slot {
            conn,
            role: Role::Responder { handled: 0 },
        });
    }
    for (i, conn) in requesters.into_iter().enumerate() {
        slots.push(Slot {
            conn,
            role: Role::Requester {
                id: i,
                quota: per + u64::from((i as u64) < extra),
                sent: 0,
                done: 0,
                outstanding: 0,
                window: a.window,
                finished: false,
            },
        });
    }
    let plan = Plan {
        proto: c.proto,
        subject: c.subject.as_bytes().to_vec(),
        subjects: Vec::new(),
        size,
    };
    let shared = Arc::new(Shared::default());
    let hard = Instant::now() + a.duration + STALL + Duration::from_secs(30);
    let workers =
        spawn_workers(slots, c.threads, &plan, &shared, hard).map_err(|e| e.to_string())?;
    let cpu = ServerCpu::start(&c.server_pid)?;
    let cpu_t0 = Instant::now();
    let self0 = stats::self_cpu();
    let t0 = now_ns();
    shared
        .req_deadline_ns
        .store(t0 + a.duration.as_nanos() as u64, Ordering::Release);
    shared.start.store(true, Ordering::Release);
    let mut last = (0u64, Instant::now());
    while Instant::now() < hard {
        if shared.finished.load(Ordering::Acquire) >= a.requesters as u64 {
            break;
        }
        let got = shared.received.load(Ordering::Acquire);
        if got != last.0 {
            last = (got, Instant::now());
        } else if now_ns() > t0 + a.duration.as_nanos() as u64 && last.1.elapsed() > STALL {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    shared.stop.store(true, Ordering::Release);
    let o = join_all(workers)?;
    let server_cpu = cpu.elapsed();
    let server_each = cpu.each();
    let cpu_wall = cpu_t0.elapsed().as_secs_f64();
    let client_cpu = stats::self_cpu().saturating_sub(self0);

    let elapsed = (o.last_rx_ns.max(t0 + 1) - t0) as f64 / 1e9;
    let rate = o.received as f64 / elapsed;
    let lost = o.req_sent.saturating_sub(o.req_done);
    let shape = format!("req{}x{}x{}", a.requesters, a.window, a.responders);
    println!(
        "reqres ({} over {}): {} requesters x window {}, {} responders, {} B bodies",
        proto_name(c.proto),
        transport_name(&url),
        a.requesters,
        a.window,
        a.responders,
        size
    );
    println!(
        "  requests: {} answered of {} sent in {:.3} s = {:.0}/s",
        o.received, o.req_sent, elapsed, rate
    );
    let mut kv = format!(
        "result: scenario=reqres shape={shape} proto={} transport={} requesters={} window={} responders={} size={} sent={} answered={} elapsed_s={:.3} requests_per_s={:.0}",
        proto_name(c.proto), transport_name(&url), a.requesters, a.window, a.responders, size, o.req_sent, o.received, elapsed, rate
    );
    kv += &split_kv(c, &ready);
    print_ready(c, &ready, "responders", "probe request(s)");
    if let Some(cpu) = server_cpu {
        let s = cpu.as_secs_f64();
        let per = if s > 0.0 {
            o.received as f64 / s
        } else {
            f64::INFINITY
        };
        let util = s / cpu_wall.max(1e-9);
        println!(
            "  server CPU: {s:.2} s in {cpu_wall:.2} s = {:.1}% of one core; {per:.0} requests per server CPU-second",
            100.0 * util
        );
        kv += &format!(
            " server_cpu_s={s:.3} requests_per_server_cpu_s={per:.0} server_cpu_util={util:.3}"
        );
        kv += &each_kv(server_each.as_deref());
    }
    println!(
        "  client CPU: {:.2} s ({:.0}% of one core)",
        client_cpu.as_secs_f64(),
        100.0 * client_cpu.as_secs_f64() / elapsed.max(1e-9)
    );
    kv += &format!(" client_cpu_s={:.3}", client_cpu.as_secs_f64());
    println!("  latency: {}", latency_line(&o.hist));
    let spread: Vec<String> = o.handled.iter().map(|h| h.to_string()).collect();
    println!("  per responder: {}", spread.join(" "));
    println!("  unanswered: {lost}, errors: {}", o.errors);
    if let Some(e) = &o.first_error {
        println!("  first error: {e}");
    }
    kv += &format!(
        " {} per_responder={} lost={lost} errors={}",
        latency_kv(&o.hist),
        spread.join(","),
        o.errors
    );
    println!("{kv}");
    Ok(lost == 0 && o.errors == 0 && o.received > 0)
}

/// `bench conns`.
pub fn conns(a: &ConnsArgs) -> Result<bool, String> {
    let c = &a.common;
    let url = Url::parse(&c.url)?;
    let limit = stats::raise_fd_limit();
    if (limit as usize) < a.conns + 16 {
        return Err(format!(
            "open-file limit {limit} is too low for {} connections (raise ulimit -n)",
            a.conns
        ));
    }
    let pids = (!c.server_pid.is_empty()).then_some(&c.server_pid[..]);
    let rss0 = pids.map(stats::procs_rss).transpose()?;
    let mut hist = histogram();
    let mut held = Vec::with_capacity(a.conns);
    let t0 = Instant::now();
    for i in 0..a.conns {
        let t = Instant::now();
        let conn = connect(c, &url).map_err(|e| format!("connection {i}: {e}"))?;
        hist.saturating_record((t.elapsed().as_nanos() as u64).max(1));
        held.push(conn);
    }
    let took = t0.elapsed().as_secs_f64();
    std::thread::sleep(a.hold);
    let rss1 = pids.map(stats::procs_rss).transpose()?;
    // Still connected? Each must still be open (nothing read as EOF or close).
    let mut alive = 0;
    for conn in held.iter_mut() {
        conn.sock.set_nonblocking(true).map_err(|e| e.to_string())?;
        let ok = conn.read_nonblocking().is_ok() && !conn.closed;
        let _ = conn.drain(|_, _| {});
        if ok && !conn.closed {
            alive += 1;
        }
    }
    println!(
        "conns ({} over {}): {} connections opened in {:.2} s, {} still open after {:.1} s",
        proto_name(c.proto),
        transport_name(&url),
        a.conns,
        took,
        alive,
        a.hold.as_secs_f64()
    );
    println!("  connect+auth latency: {}", latency_line(&hist));
    let mut kv = format!(
        "result: scenario=conns shape=idle proto={} transport={} conns={} alive={alive} {}",
        proto_name(c.proto),
        transport_name(&url),
        a.conns,
        latency_kv(&hist)
    );
    kv += &format!(" server_pids={}", c.server_pid.len());
    if let (Some(r0), Some(r1)) = (rss0, rss1) {
        let per = r1.saturating_sub(r0) as f64 / a.conns.max(1) as f64;
        println!(
            "  server RSS: {:.1} MiB before, {:.1} MiB after = {:.0} B per connection",
            r0 as f64 / 1048576.0,
            r1 as f64 / 1048576.0,
            per
        );
        kv += &format!(" rss_before={r0} rss_after={r1} rss_per_conn={per:.0}");
    }
    println!("{kv}");
    drop(held);
    Ok(alive == a.conns)
}
