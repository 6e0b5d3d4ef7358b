//! The delivery path allocates nothing per delivery: publishing to 1000 subscribers
//! costs exactly as many heap allocations as publishing to one (the packet, encoded
//! once and shared), and the topic look-up allocates nothing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use middleman::broker::{Broker, Outbox, Role, Settings};
use middleman::protocol::{Decoded, Decoder, Limits, Packet};
use middleman::router::ConnId;

struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Counts deliveries into a preallocated slot per connection (like a queue that has
/// already grown to its working size).
struct Slots {
    last: Vec<Option<Rc<Packet>>>,
    delivered: u64,
}

impl Outbox for Slots {
    fn send(&mut self, to: ConnId, pkt: &Rc<Packet>) {
        self.last[to] = Some(pkt.clone());
        self.delivered += 1;
    }
}

fn allocations_per_publish(subscribers: usize) -> (u64, u64) {
    let mut broker = Broker::new(Settings::default(), "test");
    let publisher = subscribers;
    for c in 0..=subscribers {
        broker.connect(c, Role::Service);
    }
    let mut out = Slots {
        last: vec![None; subscribers + 1],
        delivered: 0,
    };
    let mut dec = Decoder::new(Limits::default());
    dec.feed(b"SUB news\r\n.\r\n");
    let Ok(Some(Decoded::Message(sub))) = dec.next() else {
        panic!("decode SUB")
    };
    let sub = (sub.cmd.to_vec(), sub.target.to_vec());
    for c in 0..subscribers {
        let mut d = Decoder::new(Limits::default());
        d.feed(&[&sub.0[..], b" ", &sub.1[..], b"\r\n.\r\n"].concat());
        let Ok(Some(Decoded::Message(m))) = d.next() else {
            panic!()
        };
        broker.apply(c, &m, Instant::now(), &mut out);
    }
    let msg = b"PUB news\r\nX-Trace: abc\r\n\r\n64 bytes of body, more or less, to look like a real message..\r\n.\r\n";
    let mut dec = Decoder::new(Limits::default());
    // Warm up: the first publish may grow buffers.
    for _ in 0..3 {
        dec.feed(msg);
        let Ok(Some(Decoded::Message(m))) = dec.next() else {
            panic!()
        };
        broker.apply(publisher, &m, Instant::now(), &mut out);
    }
    let rounds = 50;
    let before_delivered = out.delivered;
    let before = ALLOCS.load(Ordering::Relaxed);
    for _ in 0..rounds {
        dec.feed(msg);
        let Ok(Some(Decoded::Message(m))) = dec.next() else {
            panic!()
        };
        broker.apply(publisher, &m, Instant::now(), &mut out);
    }
    let allocs = ALLOCS.load(Ordering::Relaxed) - before;
    let delivered = out.delivered - before_delivered;
    assert_eq!(delivered, rounds * subscribers as u64);
    (allocs / rounds, allocs % rounds)
}

#[test]
fn publishing_allocates_per_message_not_per_delivery() {
    let (one, rem1) = allocations_per_publish(1);
    let (thousand, rem2) = allocations_per_publish(1000);
    println!("allocations per publish: 1 subscriber {one}, 1000 subscribers {thousand}");
    assert_eq!((rem1, rem2), (0, 0), "allocations vary between messages");
    assert_eq!(one, thousand, "a delivery allocated");
    // The packet buffer and its Rc: nothing else (no String/HashMap per message).
    assert!(one <= 2, "{one} allocations per published message");
}
