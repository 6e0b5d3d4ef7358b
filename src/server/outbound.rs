//! Outbound: the broker's outbox (queues on connections, the slow-consumer cap), and
//! the writes of dirty connections.

use std::rc::Rc;

use slab::Slab;

use crate::broker::{Outbox, Size};
use crate::conn::Stage;
use crate::metrics::CloseReason;
use crate::protocol::{Packet, PacketPool, Spent};
use crate::router::ConnId;

use super::closing::{stop_queueing, Close};
use super::{Conn, Phase, Server, HIGH_WATER};

/// The outbox the broker writes into: queues packets on connections and notes the ones
/// to write at the end of the pass.
pub(super) struct Sink<'a> {
    pub(super) conns: &'a mut Slab<Conn>,
    pub(super) dirty: &'a mut Vec<ConnId>,
    pub(super) closes: &'a mut Vec<Close>,
    pub(super) max_out: usize,
    pub(super) bytes_out: &'a mut u64,
    pub(super) spent: &'a mut Spent,
    pub(super) stage: &'a mut Stage,
    /// HTTP API calls that were delivered something (see `api_call.rs`).
    pub(super) api_ready: &'a mut Vec<(ConnId, u64)>,
}

impl Sink<'_> {
    /// Something was queued on `to`: it is written at the end of the pass, or now if
    /// its queue is past the high-water mark.
    fn queued(&mut self, to: ConnId) {
        let Some(c) = self.conns.get_mut(to) else {
            return;
        };
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(to);
        }
        if c.out.len() >= HIGH_WATER {
            self.write_now(to);
        }
    }

    /// Write what the socket takes now. False if the connection failed (it is then
    /// marked to be removed and takes nothing more).
    fn write_now(&mut self, to: ConnId) -> bool {
        let Some(c) = self.conns.get_mut(to) else {
            return false;
        };
        match c.out.write_recycling(&mut c.link, self.spent, self.stage) {
            Ok(n) => {
                *self.bytes_out += n as u64;
                true
            }
            Err(_) => {
                stop_queueing(self.closes, to, c, 1006, "", CloseReason::PeerGone);
                false
            }
        }
    }

    /// An HTTP API call's session receives `pkt`: kept for its answer (at most the
    /// outbound cap in all; past it, dropped), and the call is looked at after the pass.
    fn capture(&mut self, to: ConnId, pkt: &Rc<Packet>) {
        let Some(c) = self.conns.get_mut(to) else {
            return;
        };
        let gen = c.gen;
        if let Some(api) = c.api.as_mut() {
            if api.keep(pkt, self.max_out) {
                self.api_ready.push((to, gen));
            }
        }
    }
}

impl Outbox for Sink<'_> {
    fn send(&mut self, to: ConnId, pkt: &Rc<Packet>) {
        let Some(c) = self.conns.get(to) else {
            return;
        };
        if !c.accepts_data() {
            if c.phase == Phase::ApiWait {
                self.capture(to, pkt);
            }
            return;
        }
        if c.out.len() + c.out.packet_len(pkt) > self.max_out {
            // Over the cap: first let the socket take what it can. A peer is a slow
            // consumer only if its queue stays over the cap with the socket full.
            if !self.write_now(to) {
                return;
            }
            let Some(c) = self.conns.get_mut(to) else {
                return;
            };
            if c.out.len() + c.out.packet_len(pkt) > self.max_out {
                // §7: never a gap in the middle; the stream stops here and the peer is
                // closed.
                let why = CloseReason::SlowConsumer;
                stop_queueing(self.closes, to, c, 1008, "slow consumer", why);
                return;
            }
        }
        let Some(c) = self.conns.get_mut(to) else {
            return;
        };
        c.out.push_packet(pkt);
        self.queued(to);
    }

    fn send_one(
        &mut self,
        to: ConnId,
        pool: &mut PacketPool,
        size: Size,
        utf8: bool,
        fill: impl FnOnce(&mut Vec<u8>),
    ) {
        // Within the cap whatever the message turns out to be (its frame header is at
        // most 10 bytes): built in the connection's queue. Else (or if it is not taking
        // data) a packet, which `send` looks at exactly.
        let room = self
            .conns
            .get(to)
            .is_some_and(|c| c.accepts_data() && c.out.len() + size.bound + 10 <= self.max_out);
        let Some(c) = self.conns.get_mut(to).filter(|_| room) else {
            let pkt = pool.build(size.hint, utf8, fill);
            return self.send(to, &pkt);
        };
        let n = c.out.push_built(pool, size.bound, utf8, fill);
        // The bound is what kept the cap exact above.
        debug_assert!(
            n <= size.bound + 10,
            "{n} bytes for a bound of {}",
            size.bound
        );
        self.queued(to);
    }

    fn kick(&mut self, to: ConnId, reason: &str) {
        let Some(c) = self.conns.get_mut(to) else {
            return;
        };
        if !c.accepts_data() {
            return;
        }
        // After what is queued: the close frame follows the messages already sent.
        c.slow = true;
        let why = CloseReason::Kicked;
        stop_queueing(self.closes, to, c, 4000, reason.to_owned(), why);
    }
}

impl Server {
    pub(super) fn mark_dirty(&mut self, id: ConnId) {
        if let Some(c) = self.conns.get_mut(id) {
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(id);
            }
        }
    }

    pub(super) fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for &id in &dirty {
            if let Some(c) = self.conns.get_mut(id) {
                c.dirty = false;
            }
            self.flush_one(id);
        }
        dirty.clear();
        if self.dirty.is_empty() {
            self.dirty = dirty; // keep the allocation
        }
    }

    pub(super) fn flush_one(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        if !c.out.is_empty() {
            match c
                .out
                .write_recycling(&mut c.link, &mut self.spent, &mut self.stage)
            {
                Ok(n) => self.metrics.bytes_out += n as u64,
                Err(_) => {
                    let why = match c.phase {
                        Phase::Closing => c.close_reason,
                        _ => CloseReason::PeerGone,
                    };
                    return self.remove(id, why);
                }
            }
        }
        if c.link.tls_pending() && c.link.flush_tls().is_err() {
            let why = c.close_reason;
            return self.remove(id, why);
        }
        if c.phase == Phase::Closing && c.out.is_empty() && !c.link.tls_pending() {
            if c.peer_eof {
                let why = c.close_reason;
                return self.remove(id, why);
            }
            if !c.write_shut {
                c.write_shut = true;
                c.link.send_close_notify();
                let _ = c.link.flush_tls();
                let _ = c.link.shutdown(std::net::Shutdown::Write);
            }
        }
    }
}
