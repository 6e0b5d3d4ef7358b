//! Version 1.1 at the broker (no sockets): what a presence request over 100,000
//! subscribers costs the event loop (counts alone, 1,000 lines, 10,000 lines), and what
//! connection events cost a subscribe/unsubscribe pair when nobody listens and when a
//! service does.

use std::rc::Rc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use middleman::broker::{Broker, Outbox, Role, Settings};
use middleman::protocol::{Decoded, Decoder, Limits, Packet};
use middleman::router::ConnId;

/// Counts what is sent and lets it go.
struct Count(u64);

impl Outbox for Count {
    fn send(&mut self, _to: ConnId, pkt: &Rc<Packet>) {
        self.0 += pkt.payload().len() as u64;
    }
}

fn apply_raw(broker: &mut Broker, from: ConnId, raw: &[u8], out: &mut Count) {
    let mut d = Decoder::new(Limits::default());
    d.feed(raw);
    while let Ok(Some(Decoded::Message(m))) = d.next() {
        broker.apply(from, &m, Instant::now(), out);
    }
}

fn presence(c: &mut Criterion) {
    const N: usize = 100_000;
    let mut g = c.benchmark_group("presence_100k");
    g.measurement_time(Duration::from_secs(3));
    g.sample_size(30);
    let mut broker = Broker::new(Settings::default(), "bench");
    let mut out = Count(0);
    let svc = N;
    broker.connect(svc, Role::Service);
    for conn in 0..N {
        broker.connect(conn, Role::Service);
        apply_raw(&mut broker, conn, b"SUB room\r\n.\r\n", &mut out);
    }
    for conn in (0..N).step_by(3) {
        let uid = format!(
            "INT UID\r\nforcid: {}\r\nsetuid: u{}\r\n\r\n.\r\n",
            broker.cid(conn).unwrap_or(""),
            conn % 1000
        );
        apply_raw(&mut broker, svc, uid.as_bytes(), &mut out);
    }
    for limit in [0usize, 1000, 10_000] {
        let req =
            format!("REQ SYS:PRESENCE\r\nReqID: 1\r\ntopic: room\r\nlimit: {limit}\r\n\r\n.\r\n");
        let mut dec = Decoder::new(Limits::default());
        g.bench_with_input(BenchmarkId::new("limit", limit), &limit, |b, _| {
            b.iter(|| {
                dec.feed(req.as_bytes());
                while let Ok(Some(Decoded::Message(m))) = dec.next() {
                    broker.apply(svc, &m, Instant::now(), &mut out);
                }
            })
        });
    }
    g.finish();
}

fn events(c: &mut Criterion) {
    let mut g = c.benchmark_group("sub_uns_pair");
    g.measurement_time(Duration::from_secs(3));
    g.sample_size(30);
    for watched in [false, true] {
        let mut broker = Broker::new(Settings::default(), "bench");
        let mut out = Count(0);
        for conn in 0..3 {
            broker.connect(conn, Role::Service);
        }
        if watched {
            apply_raw(
                &mut broker,
                2,
                b"SUB SYS:SUB\r\n.\r\nSUB SYS:UNS\r\n.\r\n",
                &mut out,
            );
        }
        let pair = b"SUB t\r\n.\r\nUNS t\r\n.\r\n";
        let mut dec = Decoder::new(Limits::default());
        let name = if watched {
            "events_watched"
        } else {
            "events_unwatched"
        };
        g.bench_function(name, |b| {
            b.iter(|| {
                dec.feed(pair);
                while let Ok(Some(Decoded::Message(m))) = dec.next() {
                    broker.apply(0, &m, Instant::now(), &mut out);
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, presence, events);
criterion_main!(benches);
