//! The raw stream transport (tcp://, unix://): the key line, then read turns of stream
//! bytes through the decoder.

use std::io::{self, Read};
use std::time::Instant;

use crate::conn::Budget;
use crate::metrics::CloseReason;
use crate::router::ConnId;

use super::{Phase, Server};

impl Server {
    /// Raw transport: read the key line (at most a line's length), then hand what
    /// follows to the decoder.
    pub(super) fn read_raw_key(&mut self, id: ConnId, now: Instant) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        let cap = self.cfg.limits.max_line + 2;
        let mut chunk = [0u8; 4096];
        loop {
            let room = (cap + 1)
                .saturating_sub(c.http_buf.len())
                .clamp(1, chunk.len());
            match c.link.read(&mut chunk[..room]) {
                Ok(0) => return self.remove(id, CloseReason::PeerGone),
                Ok(n) => {
                    self.metrics.bytes_in += n as u64;
                    c.last_rx = now;
                    c.http_buf.extend_from_slice(&chunk[..n]);
                    if let Some(lf) = memchr::memchr(b'\n', &c.http_buf) {
                        let rest = c.http_buf.split_off(lf + 1);
                        let key = std::mem::take(&mut c.http_buf);
                        self.admit(id, &key, now);
                        let mut budget = self.budget();
                        if !rest.is_empty() && !self.on_data(id, &rest, false, now, &mut budget) {
                            return;
                        }
                        return self.read_raw_with(id, now, budget);
                    }
                    if c.http_buf.len() > cap {
                        return self.close_with(
                            id,
                            1009,
                            "key line too long",
                            now,
                            CloseReason::Limit,
                        );
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.remove(id, CloseReason::PeerGone),
            }
        }
    }

    /// Raw transport: one read turn (messages left in the decoder first, then stream
    /// bytes), bounded by the turn's budget.
    pub(super) fn read_raw(&mut self, id: ConnId, now: Instant) {
        let budget = self.budget();
        self.read_raw_with(id, now, budget);
    }

    fn read_raw_with(&mut self, id: ConnId, now: Instant, mut budget: Budget) {
        if !self.drain_decoder(id, now, &mut budget) {
            return;
        }
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let Some(c) = self.conns.get_mut(id) else {
                return;
            };
            if !matches!(c.phase, Phase::Open | Phase::Echo) {
                return;
            }
            if budget.spent() {
                return self.push_again(id);
            }
            let room = chunk.len().min(budget.bytes);
            match c.link.read(&mut chunk[..room]) {
                Ok(0) => return self.remove(id, CloseReason::PeerGone),
                Ok(n) => {
                    budget.bytes -= n;
                    self.metrics.bytes_in += n as u64;
                    c.last_rx = now;
                    if c.phase == Phase::Echo {
                        c.out.push_bytes(&chunk[..n]);
                        self.mark_dirty(id);
                    } else if !self.on_data(id, &chunk[..n], false, now, &mut budget) {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.remove(id, CloseReason::PeerGone),
            }
        }
    }
}
