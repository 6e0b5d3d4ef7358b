//! The reactor's read path in process (no sockets): masked WebSocket text frames read
//! as a read turn does (`conn::read_within` and the `FrameReader`, draining the decoder
//! frame by frame), decoded, routed by the broker and queued for 1 or 100 subscribers,
//! the queues written out at the end of each turn. Throughput is bytes of frames read,
//! for 64 B and 1 KiB bodies. `tungstenite/...` runs the same turn with tungstenite's
//! reader (`WebSocketContext::read`, a message at a time), as the server read before.

use std::io::{self, Read, Write};
use std::rc::Rc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use middleman::broker::{Broker, Outbox, Role, Settings};
use middleman::conn::{read_within, Budget, Framing, OutQueue, Stage, READ_CHUNK};
use middleman::core::websocket::{FrameReader, WsEvent, WsLimits};
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

/// tungstenite's stream: reads from the publisher's socket, writes nowhere.
struct Duplex<'a>(&'a mut Frames);
impl Read for Duplex<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}
impl Write for Duplex<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        Ok(b.len())
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
            let mut stage = Stage::default();
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
            let per_turn_bytes = per_turn * frame.len();
            let mut dec = Decoder::new(Limits::default());
            g.throughput(Throughput::Bytes(per_turn_bytes as u64));
            let lim = WsLimits {
                max_message: 1 << 20,
                max_frames: 1024,
            };
            let mut reader = FrameReader::default();
            let mut buf = vec![0u8; READ_CHUNK];
            g.bench_with_input(
                BenchmarkId::new(format!("reader/{body_len}B"), subs),
                &subs,
                |b, _| {
                    b.iter(|| {
                        // One read turn of a whole buffer of frames, then the writes.
                        let mut budget = Budget::new(per_turn_bytes, usize::MAX);
                        let mut got = 0;
                        while got < per_turn {
                            let n = read_within(&mut sock, &mut buf, &mut budget).unwrap();
                            let mut pos = 0;
                            while let Some(ev) = reader.next(&mut buf[..n], &mut pos, &lim).unwrap()
                            {
                                let WsEvent::Data { range, last, .. } = ev else {
                                    panic!("unexpected {ev:?}");
                                };
                                dec.feed_utf8(&buf[range]);
                                while let Ok(Some(Decoded::Message(m))) = dec.next() {
                                    broker.apply(publisher, &m, Instant::now(), &mut out);
                                }
                                if !dec.needs_more() {
                                    dec.shrink();
                                }
                                got += usize::from(last);
                            }
                        }
                        for q in out.0.iter_mut() {
                            let _ = q.write_to(&mut Sink, &mut stage);
                        }
                    })
                },
            );
            // The same turn through tungstenite's reader, for comparison.
            let config = WebSocketConfig::default()
                .read_buffer_size(4 * 1024)
                .write_buffer_size(0);
            let mut ws = WebSocketContext::new(WsRole::Server, Some(config));
            g.bench_with_input(
                BenchmarkId::new(format!("tungstenite/{body_len}B"), subs),
                &subs,
                |b, _| {
                    b.iter(|| {
                        let mut got = 0;
                        while got < per_turn {
                            match ws.read(&mut Duplex(&mut sock)) {
                                Ok(Message::Text(t)) => {
                                    dec.feed_utf8(t.as_bytes());
                                    while let Ok(Some(Decoded::Message(m))) = dec.next() {
                                        broker.apply(publisher, &m, Instant::now(), &mut out);
                                    }
                                    dec.shrink();
                                    got += 1;
                                }
                                other => panic!("unexpected {other:?}"),
                            }
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

criterion_group!(benches, read_path);
criterion_main!(benches);
