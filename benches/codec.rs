//! Codec throughput (PROTOCOL.md §2): the decoder on whole and split input, the encoder,
//! and `Packet::build` + encode, for 64 B, 1 KiB and 64 KiB bodies with LF and CRLF line
//! breaks.
//!
//! Run: `cargo bench --bench codec` (each bench is short: 20 samples, ~2 s).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use middleman::protocol::{encode_into, Decoded, Decoder, Limits, Packet};

const SIZES: [(usize, &str); 3] = [(64, "64B"), (1 << 10, "1KiB"), (64 << 10, "64KiB")];
const BREAKS: [(&[u8], &str); 2] = [(b"\n", "lf"), (b"\r\n", "crlf")];
/// Each decode input holds about this many bytes of messages.
const STREAM: usize = 256 << 10;
/// A typical TCP segment payload.
const PIECE: usize = 1400;

/// A body of `size` bytes: lines of up to 72 bytes separated by `brk`, every 8th line
/// starting with `.` (so it is stuffed on the wire: the 1 KiB and 64 KiB bodies are
/// unstuffed by the decoder, the one-line 64 B body is not).
fn body(size: usize, brk: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(size);
    let mut line = 0usize;
    while b.len() < size {
        if line % 8 == 7 {
            b.push(b'.');
        }
        let room = size - b.len();
        let n = room.min(72);
        b.extend((0..n).map(|i| b'a' + ((i + line) % 26) as u8));
        if b.len() + brk.len() < size {
            b.extend_from_slice(brk);
        }
        line += 1;
    }
    b.truncate(size);
    b
}

const HEADERS: [(&[u8], &[u8]); 3] = [
    (b"ReqID", b"4f1c2a9e"),
    (b"cid", b"k3x9q0000001f"),
    (b"uid", b"alice"),
];

/// One message on the wire as a client would send it, with `brk` after every line.
fn wire_message(body: &[u8], brk: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 128);
    out.extend_from_slice(b"PUB news.sports");
    out.extend_from_slice(brk);
    for (n, v) in HEADERS {
        out.extend_from_slice(n);
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(brk);
    }
    out.extend_from_slice(brk);
    let mut at_line_start = true;
    for &b in body {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out.extend_from_slice(brk);
    out.push(b'.');
    out.extend_from_slice(brk);
    out
}

/// Many messages back to back, about `STREAM` bytes (at least one message).
fn stream(size: usize, brk: &[u8]) -> (Vec<u8>, usize) {
    let one = wire_message(&body(size, brk), brk);
    let count = (STREAM / one.len()).max(1);
    (one.repeat(count), count)
}

/// Decode everything available, returning the number of messages.
fn drain(d: &mut Decoder) -> usize {
    let mut n = 0;
    while let Ok(Some(out)) = d.next() {
        if let Decoded::Message(m) = out {
            black_box(&m.body);
            n += 1;
        }
    }
    n
}

fn decode(c: &mut Criterion) {
    for (label, pieces) in [("decode_whole", usize::MAX), ("decode_split1400", PIECE)] {
        let mut g = c.benchmark_group(label);
        for (size, size_name) in SIZES {
            for (brk, brk_name) in BREAKS {
                let (input, count) = stream(size, brk);
                g.throughput(Throughput::Bytes(input.len() as u64));
                let id = BenchmarkId::from_parameter(format!("{size_name}/{brk_name}"));
                let mut d = Decoder::new(Limits::default());
                g.bench_with_input(id, &input, |b, input| {
                    b.iter(|| {
                        let mut got = 0;
                        for piece in input.chunks(pieces.min(input.len())) {
                            d.feed(piece);
                            got += drain(&mut d);
                        }
                        assert_eq!(got, count);
                    })
                });
            }
        }
        g.finish();
    }
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    for (size, size_name) in SIZES {
        for (brk, brk_name) in BREAKS {
            let body = body(size, brk);
            let mut out = Vec::new();
            encode_into(&mut out, b"PUB", b"news.sports", HEADERS, &body);
            g.throughput(Throughput::Bytes(out.len() as u64));
            let id = BenchmarkId::from_parameter(format!("{size_name}/{brk_name}"));
            g.bench_with_input(id, &body, |b, body| {
                b.iter(|| {
                    out.clear();
                    encode_into(&mut out, b"PUB", b"news.sports", HEADERS, body);
                    black_box(&out);
                })
            });
        }
    }
    g.finish();
}

fn packet(c: &mut Criterion) {
    let mut g = c.benchmark_group("packet_build_encode");
    for (size, size_name) in SIZES {
        let body = body(size, b"\r\n");
        let len = Packet::build(|b| encode_into(b, b"PUB", b"news.sports", HEADERS, &body))
            .ws_frame()
            .len();
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::from_parameter(size_name), &body, |b, body| {
            b.iter(|| {
                let p = Packet::build(|b| encode_into(b, b"PUB", b"news.sports", HEADERS, body));
                black_box(p.ws_frame().len())
            })
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = decode, encode, packet
}
criterion_main!(benches);
