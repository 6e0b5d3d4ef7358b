//! WebSocket read turns: frames through tungstenite, the key, then data messages through
//! the decoder to the broker, all within the turn's budget.

use std::io;
use std::rc::Rc;
use std::time::Instant;

use log::debug;
use tungstenite::Message as WsMessage;

use crate::broker::Outbox;
use crate::conn::{ws_step, Budget, Framing, Io, Step};
use crate::metrics::CloseReason;
use crate::protocol::{Decoded, Decoder, Packet};
use crate::router::ConnId;

use super::{warn_limited, Phase, Server};

impl Server {
    /// One read turn of a WebSocket connection: messages left in its decoder first, then
    /// frames from the socket, until `WouldBlock` or the turn's budget is spent.
    pub(super) fn read_ws(&mut self, id: ConnId, now: Instant) {
        let mut budget = self.budget();
        if !self.drain_decoder(id, now, &mut budget) {
            return;
        }
        let max_frames = self.cfg.max_fragments;
        // A peer that pings and never reads would fill its queue with pongs.
        let max_pings = self.cfg.max_unanswered_pings;
        loop {
            let Some(c) = self.conns.get_mut(id) else {
                return;
            };
            if !matches!(c.phase, Phase::AwaitKey | Phase::Open | Phase::Echo) {
                return;
            }
            if budget.spent() {
                return self.push_again(id);
            }
            let Some(ws) = c.ws.as_mut() else {
                return;
            };
            let before = c.rx_bytes;
            let step = ws_step(
                ws,
                &mut c.link,
                &mut c.out,
                &mut c.rx_bytes,
                &mut c.scan,
                max_frames,
                &mut budget,
            );
            self.metrics.bytes_in += c.rx_bytes - before;
            if !c.out.is_empty() && !c.dirty {
                c.dirty = true;
                self.dirty.push(id);
            }
            match step {
                Step::Msg(WsMessage::Text(t)) => {
                    c.last_rx = now;
                    if !self.on_data(id, t.as_bytes(), true, now, &mut budget) {
                        return;
                    }
                }
                Step::Msg(WsMessage::Binary(b)) => {
                    c.last_rx = now;
                    if !self.on_data(id, &b, false, now, &mut budget) {
                        return;
                    }
                }
                Step::Msg(WsMessage::Ping(_) | WsMessage::Frame(_)) => {
                    // Not activity for the idle timeout: a peer that pings and never
                    // reads is idle. Its pongs count against the outbound cap, and one
                    // that leaves more than a few unread is closed.
                    if c.out.pongs_unsent() > max_pings {
                        return self.close_with(
                            id,
                            1008,
                            "too many pings",
                            now,
                            CloseReason::Limit,
                        );
                    }
                }
                Step::Msg(WsMessage::Pong(_)) => {
                    // The answer to our ping: the peer reads what we send.
                    c.last_rx = now;
                }
                Step::Msg(WsMessage::Close(_)) => {
                    // tungstenite queued the close reply; flush it and hang up.
                    if let Some(ws) = c.ws.as_mut() {
                        let _ = ws.flush(&mut Io::writer(&mut c.link, &mut c.out, &mut c.rx_bytes));
                    }
                    self.enter_closing(id, now, CloseReason::Normal);
                    return;
                }
                Step::TooManyFrames => {
                    self.warn_protocol(id, "too many frames in one message");
                    return self.close_with(
                        id,
                        1008,
                        "too many fragments",
                        now,
                        CloseReason::Limit,
                    );
                }
                Step::Spent => return self.push_again(id),
                Step::Blocked => return,
                Step::Error(e) => return self.ws_error(id, e, now),
            }
        }
    }

    fn ws_error(&mut self, id: ConnId, e: tungstenite::Error, now: Instant) {
        use tungstenite::error::{CapacityError, Error as E, ProtocolError as P};
        match e {
            E::Io(ref io) if io.kind() == io::ErrorKind::WouldBlock => {}
            E::Io(ref io) if io.kind() == io::ErrorKind::Interrupted => self.push_again(id),
            E::ConnectionClosed | E::AlreadyClosed | E::Io(_) => {
                self.remove(id, CloseReason::PeerGone)
            }
            E::Protocol(P::ResetWithoutClosingHandshake) => self.remove(id, CloseReason::PeerGone),
            E::Capacity(CapacityError::MessageTooLong { .. }) => {
                self.close_with(id, 1009, "message too long", now, CloseReason::Limit)
            }
            E::Capacity(_) => self.close_with(id, 1009, "frame too large", now, CloseReason::Limit),
            E::Utf8(_) => {
                self.warn_protocol(id, "invalid utf-8");
                self.close_with(id, 1007, "invalid utf-8", now, CloseReason::ProtocolError)
            }
            E::Protocol(p) => {
                self.warn_protocol(id, &p.to_string());
                self.close_with(
                    id,
                    1002,
                    "websocket protocol error",
                    now,
                    CloseReason::ProtocolError,
                )
            }
            other => {
                self.warn_protocol(id, &other.to_string());
                self.close_with(id, 1002, "websocket error", now, CloseReason::ProtocolError)
            }
        }
    }

    fn warn_protocol(&mut self, id: ConnId, what: &str) {
        let peer = self.conns.get(id).map(|c| c.peer.clone());
        warn_limited(&mut self.metrics.warned_protocol, || match peer {
            Some(peer) => format!("[{id}] websocket protocol error from {peer}: {what}"),
            None => format!("[{id}] websocket protocol error: {what}"),
        });
    }

    /// Handle one received data message (WebSocket) or chunk (raw stream). Returns false
    /// when the read turn must end here (connection closing or gone, or the message
    /// budget spent with messages left in the decoder: then it is on the `again` list).
    pub(super) fn on_data(
        &mut self,
        id: ConnId,
        data: &[u8],
        text: bool,
        now: Instant,
        budget: &mut Budget,
    ) -> bool {
        let Some(c) = self.conns.get_mut(id) else {
            return false;
        };
        match c.phase {
            Phase::Echo => {
                let pkt = Rc::new(Packet::with_kind(data, text));
                let (_, mut sink) = self.split();
                sink.send(id, &pkt);
                true
            }
            Phase::AwaitKey => {
                self.admit(id, data, now);
                self.conns.get(id).is_some_and(|c| c.phase == Phase::Open)
            }
            Phase::Open => {
                if let Some(dec) = c.dec.as_mut() {
                    if text {
                        dec.feed_utf8(data); // tungstenite checked it
                    } else {
                        dec.feed(data);
                    }
                }
                c.backlog = true;
                self.drain_decoder(id, now, budget)
            }
            Phase::Http | Phase::ApiBody | Phase::ApiWait | Phase::RawKey | Phase::Closing => false,
        }
    }

    /// Hand the messages waiting in the connection's decoder to the broker, one per unit
    /// of the message budget. Returns false when the turn must end (closing, gone, or
    /// budget spent with messages left: then it is on the `again` list).
    pub(super) fn drain_decoder(&mut self, id: ConnId, now: Instant, budget: &mut Budget) -> bool {
        let Some(c) = self.conns.get_mut(id) else {
            return false;
        };
        if !c.backlog {
            return true;
        }
        let Some(mut dec) = c.dec.take() else {
            c.backlog = false;
            return true;
        };
        let mut failed = None;
        let mut drained = false;
        {
            let (broker, mut sink) = self.split();
            while budget.msgs > 0 {
                match dec.next() {
                    Ok(Some(Decoded::Message(m))) => broker.apply(id, &m, now, &mut sink),
                    Ok(Some(Decoded::Malformed(m))) => broker.malformed(id, &m, &mut sink),
                    Ok(None) => {
                        drained = true;
                        break;
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
                budget.msgs -= 1;
            }
        }
        if let Some(e) = failed {
            warn_limited(&mut self.metrics.warned_protocol, || {
                format!("[{id}] framing violation: {e}")
            });
            let why = if e.close_code() == 1009 {
                CloseReason::Limit
            } else {
                CloseReason::ProtocolError
            };
            self.close_with(id, e.close_code(), e.reason(), now, why);
            return false;
        }
        let Some(c) = self.conns.get_mut(id) else {
            return false;
        };
        if c.phase != Phase::Open {
            // Closed by what it sent (e.g. cut off as a slow consumer of its own echo).
            return false;
        }
        if drained {
            // Nothing pending: the decoder keeps small buffers for the next message and
            // gives back what a large one left behind.
            if !dec.needs_more() {
                dec.shrink();
            }
            c.backlog = false;
            c.dec = Some(dec);
            true
        } else {
            c.dec = Some(dec);
            self.push_again(id);
            false
        }
    }

    /// Check a presented key (and the listener's roles); admit or refuse.
    pub(super) fn admit(&mut self, id: ConnId, key: &[u8], now: Instant) {
        let full = self.established() >= self.cfg.max_connections;
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        let (role, digest) = self.cfg.keys.authenticate_digest(key).unzip();
        let allowed = match (role, self.listeners.get(c.listener)) {
            (Some(r), Some(l)) => l.bound.allows(r),
            (Some(_), None) => true, // listeners are gone during shutdown
            (None, _) => false,
        };
        let Some(role) = role.filter(|_| allowed) else {
            let why = if role.is_some() {
                "role not allowed here"
            } else {
                "bad key"
            };
            warn_limited(&mut self.metrics.warned_bad_key, || {
                format!("{why} from {}", c.peer)
            });
            return self.close_with(id, 1008, why, now, CloseReason::BadKey);
        };
        if full {
            self.metrics.refused += 1;
            warn_limited(&mut self.metrics.warned_refused, || {
                format!("refused {}: connection limit reached", c.peer)
            });
            return self.close_with(id, 1008, "too many connections", now, CloseReason::Limit);
        }
        let cid = self.broker.connect(id, role);
        c.phase = Phase::Open;
        c.dec = Some(Box::new(Decoder::new(self.cfg.limits)));
        if let Some(ws) = c.ws.as_mut() {
            let full = self.ws_config;
            ws.set_config(|w| *w = full);
        }
        debug!("[{id}] {} {cid} connected from {}", role.name(), c.peer);
        c.who = Some(format!("{} {cid}", role.name()).into());
        c.key = digest.map(|d| (role, d));
        if c.framing == Framing::Raw {
            c.out.push_bytes(b"MM OK\r\n");
            c.out.push_bytes(cid.as_bytes());
            c.out.push_bytes(b"\r\n");
            self.mark_dirty(id);
        } else {
            let (_, mut sink) = self.split();
            sink.send(id, &Rc::new(Packet::raw(b"MM OK")));
            sink.send(id, &Rc::new(Packet::raw(cid.as_bytes())));
        }
        let (broker, mut sink) = self.split();
        broker.connected(id, &mut sink);
        self.leave_handshake(id);
    }
}
