//! In-process fan-out through the routing core (no sockets): one PUB decoded, routed by
//! the broker and queued on every subscriber's outbound queue (the same queue type the
//! reactor writes from), to 1, 100 and 1000 subscribers. Throughput is deliveries.
//! The `history` group: the same 64 B PUB to a plain topic and to a topic under a
//! `[[history]]` rule (stored, `offset` and `epoch` on every delivery), side by side.

use std::rc::Rc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use middleman::broker::{Broker, Outbox, Role, Settings};
use middleman::conn::{OutQueue, Stage};
use middleman::protocol::{Decoded, Decoder, Limits, Packet};
use middleman::router::ConnId;

struct Queues(Vec<OutQueue>);

impl Outbox for Queues {
    fn send(&mut self, to: ConnId, pkt: &Rc<Packet>) {
        self.0[to].push_packet(pkt);
    }
}

/// A writer that takes everything (stands in for a fast socket).
struct Sink;
impl std::io::Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        Ok(b.len())
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        Ok(bufs.iter().map(|b| b.len()).sum())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn apply_raw(broker: &mut Broker, from: ConnId, raw: &[u8], out: &mut Queues) {
    let mut d = Decoder::new(Limits::default());
    d.feed(raw);
    while let Ok(Some(Decoded::Message(m))) = d.next() {
        broker.apply(from, &m, Instant::now(), out);
    }
}

fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout");
    g.measurement_time(Duration::from_secs(3));
    g.sample_size(20);
    for &body_len in &[64usize, 1024] {
        for &subs in &[1usize, 100, 1000] {
            let mut broker = Broker::new(Settings::default(), "bench");
            let mut stage = Stage::default();
            let mut out = Queues((0..=subs).map(|_| OutQueue::default()).collect());
            for conn in 0..=subs {
                broker.connect(conn, Role::Service);
            }
            for conn in 0..subs {
                apply_raw(&mut broker, conn, b"SUB news\r\n.\r\n", &mut out);
            }
            let body = "b".repeat(body_len);
            let msg = format!("PUB news\r\nX-Seq: 1\r\n\r\n{body}\r\n.\r\n");
            let mut dec = Decoder::new(Limits::default());
            g.throughput(Throughput::Elements(subs as u64));
            g.bench_with_input(
                BenchmarkId::new(format!("{body_len}B"), subs),
                &subs,
                |b, _| {
                    b.iter(|| {
                        dec.feed(msg.as_bytes());
                        if let Ok(Some(Decoded::Message(m))) = dec.next() {
                            broker.apply(subs, &m, Instant::now(), &mut out);
                        }
                        for q in out.0.iter_mut() {
                            let _ = q.write_to(&mut Sink, &mut stage);
                        }
                    })
                },
            );
        }
    }
    g.finish();
}

/// A plain PUB against a history PUB (PROTOCOL.md §9.5), 64 B, 1 and 100 subscribers,
/// with the compare script's rule (`hist.`, size 1000): the ring is full after the
/// warm-up, so each PUB also evicts one (the steady state of a busy topic).
fn history(c: &mut Criterion) {
    use middleman::core::history::{HistoryRule, HistorySettings};
    let mut g = c.benchmark_group("history");
    g.measurement_time(Duration::from_secs(3));
    g.sample_size(20);
    for &subs in &[1usize, 100] {
        for topic in ["plain.b", "hist.b"] {
            let mut broker = Broker::new(Settings::default(), "bench");
            broker.set_history(&HistorySettings {
                rules: vec![HistoryRule {
                    prefix: "hist.".into(),
                    size: 1000,
                    ttl: Duration::from_secs(3600),
                }],
                ..HistorySettings::default()
            });
            let mut stage = Stage::default();
            let mut out = Queues((0..=subs).map(|_| OutQueue::default()).collect());
            for conn in 0..=subs {
                broker.connect(conn, Role::Service);
            }
            let sub = format!("SUB {topic}\r\n.\r\n");
            for conn in 0..subs {
                apply_raw(&mut broker, conn, sub.as_bytes(), &mut out);
            }
            let body = "b".repeat(64);
            let msg = format!("PUB {topic}\r\n\r\n{body}\r\n.\r\n");
            let mut dec = Decoder::new(Limits::default());
            g.throughput(Throughput::Elements(subs as u64));
            let name = if topic.starts_with("hist.") {
                "history"
            } else {
                "plain"
            };
            g.bench_with_input(BenchmarkId::new(name, subs), &subs, |b, _| {
                b.iter(|| {
                    dec.feed(msg.as_bytes());
                    if let Ok(Some(Decoded::Message(m))) = dec.next() {
                        broker.apply(subs, &m, Instant::now(), &mut out);
                    }
                    for q in out.0.iter_mut() {
                        let _ = q.write_to(&mut Sink, &mut stage);
                    }
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, fanout, history);
criterion_main!(benches);
