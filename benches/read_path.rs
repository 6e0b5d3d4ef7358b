//! The reactor's read path in process (no sockets): masked WebSocket text frames read
//! through tungstenite exactly as a read turn does (`conn::ws_step` with a budget),
//! decoded, routed by the broker and queued for 1 or 100 subscribers, the queues written
//! out at the end of each turn. Throughput is bytes of frames read, for 64 B and 1 KiB
//! bodies.

use std::io::{self, Read, Write};
use std::rc::Rc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use middleman::broker::{Broker, Outbox, Role, Settings};
use middleman::conn::{ws_step, Budget, FrameScan, Framing, OutQueue, Step};
use middleman::protocol::{Decoded, Decoder, Limits, Packet};
use middleman::router::ConnId;
use tungstenite::protocol::{Role as WsRole, WebSocketConfig, WebSocketContext};
use tungstenite::Message;

struct Queues(Vec<OutQueue>);
impl Outbox for Queues {
    fn send(&mut self, to: ConnId, pkt: &Rc<Packet>) {
        self.0[to].push_packet(pkt);
    }
}

/// A writer that takes everything (a fast socket).
struct Sink;
impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        Ok(b.len())
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        Ok(bufs.iter().map(|b| b.len()).sum())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The publisher's socket: the same frames over and over, 16 KiB per read.
struct Frames {
    data: Vec<u8>,
    at: usize,
}
impl Read for Frames {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.at == self.data.len() {
            self.at = 0;
        }
        let n = buf.len().min(16 << 10).min(self.data.len() - self.at);
        buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

fn masked_text_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x81];
    let n = payload.len();
    if n < 126 {
        f.push(0x80 | n as u8);
    } else {
        f.push(0x80 | 126);
        f.extend_from_slice(&(n as u16).to_be_bytes());
    }
    let mask = [0x12, 0x34, 0x56, 0x78];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

fn read_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("read_path");
    g.measurement_time(Duration::from_secs(3));
    g.sample_size(20);
    for &body_len in &[64usize, 1024] {
        for &subs in &[1usize, 100] {
            let publisher = subs;
            let mut broker = Broker::new(Settings::default(), "bench");
            let mut out = Queues(
                (0..=subs)
                    .map(|_| OutQueue::new(Framing::WebSocket))
                    .collect(),
            );
            for conn in 0..=subs {
                broker.connect(conn, Role::Service);
            }
            for conn in 0..subs {
                let mut d = Decoder::new(Limits::default());
                d.feed(b"SUB news\r\n.\r\n");
                if let Ok(Some(Decoded::Message(m))) = d.next() {
                    broker.apply(conn, &m, Instant::now(), &mut out);
                }
            }
            let body = "b".repeat(body_len);
            let msg = format!("PUB news\r\nX-Seq: 1\r\n\r\n{body}\r\n.\r\n");
            let frame = masked_text_frame(msg.as_bytes());
            // Whole frames per turn budget: 64 KiB of them.
            let per_turn = (64 << 10) / frame.len();
            let mut sock = Frames {
                data: frame.repeat(per_turn),
                at: 0,
            };
            let config = WebSocketConfig::default()
                .read_buffer_size(4 * 1024)
                .write_buffer_size(0);
            let mut ws = WebSocketContext::new(WsRole::Server, Some(config));
            let mut scan = FrameScan::default();
            let mut own = OutQueue::new(Framing::WebSocket);
            let mut rx = 0u64;
            let mut dec = Decoder::new(Limits::default());
            g.throughput(Throughput::Bytes((per_turn * frame.len()) as u64));
            g.bench_with_input(
                BenchmarkId::new(format!("{body_len}B"), subs),
                &subs,
                |b, _| {
                    b.iter(|| {
                        // One read turn of a whole buffer of frames, then the writes.
                        let mut budget = Budget::new(per_turn * frame.len(), usize::MAX);
                        let mut got = 0;
                        while got < per_turn {
                            match ws_step(
                                &mut ws,
                                &mut sock,
                                &mut own,
                                &mut rx,
                                &mut scan,
                                1024,
                                &mut budget,
                            ) {
                                Step::Msg(Message::Text(t)) => {
                                    dec.feed_utf8(t.as_bytes());
                                    while let Ok(Some(Decoded::Message(m))) = dec.next() {
                                        broker.apply(publisher, &m, Instant::now(), &mut out);
                                    }
                                    dec.shrink();
                                    got += 1;
                                }
                                Step::Spent => budget = Budget::new(64 << 10, usize::MAX),
                                other => panic!("unexpected {other:?}"),
                            }
                        }
                        for q in out.0.iter_mut() {
                            let _ = q.write_to(&mut Sink);
                        }
                    })
                },
            );
        }
    }
    g.finish();
}

criterion_group!(benches, read_path);
criterion_main!(benches);
