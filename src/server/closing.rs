//! Closing: closes decided during the pass, the close frame (or last line), lingering
//! until flushed, and removal.

use std::borrow::Cow;
use std::io::{self, Read};
use std::rc::Rc;
use std::time::Instant;

use log::debug;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::frame::CloseFrame;

use crate::conn::{Framing, Io};
use crate::metrics::CloseReason;
use crate::router::ConnId;

use super::{warn_limited, Conn, Phase, Server, CLOSE_LINGER};

/// A close decided during the pass, carried out after it. The generation makes sure it
/// reaches the connection it was meant for, not a later one in the same slab slot.
#[derive(Debug, Clone)]
pub(super) struct Close {
    id: ConnId,
    gen: u64,
    code: u16,
    reason: Cow<'static, str>,
    why: CloseReason,
}

/// Nothing more may be queued for `c`; it is closed after the pass (see `Close`).
pub(super) fn stop_queueing(
    closes: &mut Vec<Close>,
    id: ConnId,
    c: &mut Conn,
    code: u16,
    reason: impl Into<Cow<'static, str>>,
    why: CloseReason,
) {
    c.slow = true;
    let reason = reason.into();
    closes.push(Close {
        id,
        gen: c.gen,
        code,
        reason,
        why,
    });
}

impl Server {
    /// Send a close frame (after what is queued, or instead of it for a slow
    /// consumer), forget the connection's routing state and hang up once flushed.
    pub(super) fn close_with(
        &mut self,
        id: ConnId,
        code: u16,
        reason: &str,
        now: Instant,
        why: CloseReason,
    ) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        if c.phase == Phase::Closing {
            return;
        }
        if why == CloseReason::SlowConsumer {
            c.out.drop_unsent();
            self.metrics.slow_consumers += 1;
            warn_limited(&mut self.metrics.warned_slow, || {
                format!("[{id}] slow consumer {} cut off", c.peer)
            });
        }
        if c.framing == Framing::Raw {
            // No close frame on a raw stream: a last line says why.
            if c.phase == Phase::RawKey || c.phase == Phase::AwaitKey {
                c.out.push_bytes(format!("MM ERR {reason}\r\n").as_bytes());
            } else {
                let pkt = crate::broker::error_packet(
                    b"CLOSE",
                    code.to_string().as_bytes(),
                    reason,
                    None,
                );
                c.out.push_packet(&Rc::new(pkt));
            }
        } else if let Some(ws) = c.ws.as_mut() {
            let frame = CloseFrame {
                code: CloseCode::from(code),
                reason: reason.to_owned().into(),
            };
            let _ = ws.close(&mut Io::writer(&mut c.out), Some(frame));
        }
        self.enter_closing(id, now, why);
    }

    pub(super) fn enter_closing(&mut self, id: ConnId, now: Instant, why: CloseReason) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        c.phase = Phase::Closing;
        c.dec = None;
        c.close_reason = why;
        let mut deadline = now + CLOSE_LINGER;
        if let Some(d) = self.shutdown_deadline {
            deadline = deadline.min(d);
        }
        c.close_deadline = Some(deadline);
        self.mark_dirty(id);
        let (broker, mut sink) = self.split();
        broker.disconnect_because(id, why.name(), &mut sink);
    }

    pub(super) fn read_closing(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        let mut scratch = [0u8; 4096];
        let mut left = self.cfg.max_read_per_turn;
        while left > 0 {
            let room = scratch.len().min(left);
            match c.link.read(&mut scratch[..room]) {
                Ok(0) => {
                    c.peer_eof = true;
                    if c.out.is_empty() {
                        let why = c.close_reason;
                        self.remove(id, why);
                    }
                    return;
                }
                Ok(n) => {
                    left -= n;
                    self.metrics.bytes_in += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    let why = c.close_reason;
                    return self.remove(id, why);
                }
            }
        }
        self.push_again(id);
    }

    pub(super) fn process_closes(&mut self, now: Instant) {
        while let Some(cl) = self.closes.pop() {
            if self.conns.get(cl.id).is_none_or(|c| c.gen != cl.gen) {
                continue; // that connection is gone; its slot may hold another
            }
            if cl.why == CloseReason::PeerGone {
                self.remove(cl.id, cl.why);
            } else {
                self.close_with(cl.id, cl.code, &cl.reason, now, cl.why);
            }
        }
    }

    pub(super) fn remove(&mut self, id: ConnId, why: CloseReason) {
        if !self.conns.contains(id) {
            return;
        }
        self.leave_handshake(id);
        let mut c = self.conns.remove(id);
        let _ = self.poll.registry().deregister(&mut c.link);
        {
            let (broker, mut sink) = self.split();
            broker.disconnect_because(id, why.name(), &mut sink);
        }
        self.metrics.count_close(why);
        debug!(
            "[{id}] {} from {} closed ({})",
            c.who.as_deref().unwrap_or("unauthenticated"),
            c.peer,
            why.name()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn server() -> Server {
        let mut cfg = Config::on("127.0.0.1:0".parse().expect("address"));
        cfg.keys.service = vec!["k".into()];
        Server::bind(cfg).expect("bind")
    }

    /// A close decided for a connection that is then removed in the same pass must not
    /// reach a new connection that reuses its slab key.
    #[test]
    fn a_close_never_reaches_the_next_owner_of_a_slab_key() {
        let mut s = server();
        let addr = s.local_addr();
        let now = Instant::now();
        let _a = std::net::TcpStream::connect(addr).expect("connect a");
        s.accept(0, now);
        let (id, gen) = s
            .conns
            .iter()
            .map(|(id, c)| (id, c.gen))
            .next()
            .expect("a accepted");
        s.closes.push(Close {
            id,
            gen,
            code: 1008,
            reason: "slow consumer".into(),
            why: CloseReason::SlowConsumer,
        });
        s.remove(id, CloseReason::PeerGone);
        let _b = std::net::TcpStream::connect(addr).expect("connect b");
        s.accept(0, now);
        let b = s.conns.get(id).expect("b reuses the slot");
        assert_ne!(b.gen, gen);
        s.process_closes(now);
        let b = s.conns.get(id).expect("b still there");
        assert_eq!(
            b.phase,
            Phase::Http,
            "the stale close reached the new connection"
        );
        assert_eq!(s.hs.count, 1);
    }
}
