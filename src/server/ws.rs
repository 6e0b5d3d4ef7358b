//! WebSocket read turns: frames through our reader, the key, then data messages through
//! the decoder to the broker, all within the turn's budget.

use std::io;
use std::rc::Rc;
use std::time::Instant;

use log::debug;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::Message as WsMessage;

use crate::broker::Outbox;
use crate::conn::{read_within, Budget, Framing, Io, READ_CHUNK};
use crate::core::websocket::{WsError, WsEvent};
use crate::metrics::CloseReason;
use crate::protocol::{decode_simple, Decoded, Decoder, Packet};
use crate::router::ConnId;

use super::{warn_limited, Phase, Server};

/// What ends a WebSocket read: a close frame (its code) or a framing error. When
/// messages read before it still wait in the decoder, it waits for them.
#[derive(Debug, Clone, Copy)]
pub(super) enum WsEnd {
    Close(Option<u16>),
    Fail(WsError),
}

impl Server {
    /// One read turn of a WebSocket connection: messages left in its decoder first, then
    /// frames from the socket, until `WouldBlock` or the turn's budget is spent.
    pub(super) fn read_ws(&mut self, id: ConnId, now: Instant) {
        let budget = self.budget();
        self.read_ws_with(id, now, budget);
    }

    /// [`Server::read_ws`] with what is left of a turn's budget.
    pub(super) fn read_ws_with(&mut self, id: ConnId, now: Instant, mut budget: Budget) {
        if !self.drain_decoder(id, now, &mut budget) {
            return;
        }
        if let Some(end) = self.conns.get_mut(id).and_then(|c| c.ws_end.take()) {
            self.ws_end(id, end, now, &mut budget);
            return;
        }
        // The read buffer is the server's, lent to one turn at a time.
        let mut buf = std::mem::take(&mut self.rx_buf);
        if buf.len() < READ_CHUNK {
            buf = vec![0; READ_CHUNK];
        }
        self.read_ws_turn(id, now, &mut budget, &mut buf);
        self.rx_buf = buf;
    }

    fn read_ws_turn(&mut self, id: ConnId, now: Instant, budget: &mut Budget, buf: &mut [u8]) {
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
            let n = match read_within(&mut c.link, buf, budget) {
                Ok(0) => return self.remove(id, CloseReason::PeerGone),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.remove(id, CloseReason::PeerGone),
            };
            c.rx_bytes += n as u64;
            self.metrics.bytes_in += n as u64;
            if !self.ws_bytes(id, &mut buf[..n], now, budget) {
                return;
            }
        }
    }

    /// Handle bytes a WebSocket peer sent: every frame in them, then the messages they
    /// completed, within the budget (each frame is one unit of it, each message one).
    /// Returns false when the turn must end here.
    pub(super) fn ws_bytes(
        &mut self,
        id: ConnId,
        buf: &mut [u8],
        now: Instant,
        budget: &mut Budget,
    ) -> bool {
        // A peer that pings and never reads would fill its queue with pongs.
        let max_pings = self.cfg.max_unanswered_pings;
        let mut pos = 0;
        loop {
            let Some(c) = self.conns.get_mut(id) else {
                return false;
            };
            let lim = match c.phase {
                Phase::Open | Phase::Echo => self.ws_limits,
                Phase::AwaitKey => self.ws_limits_key,
                _ => return false,
            };
            let frames = c.wsr.frames;
            let ev = c.wsr.next(buf, &mut pos, &lim);
            budget.msgs = budget.msgs.saturating_sub((c.wsr.frames - frames) as usize);
            match ev {
                Ok(None) => break,
                Ok(Some(WsEvent::Data { range, text, last })) => {
                    c.last_rx = now;
                    let mut data = &buf[range];
                    if c.phase == Phase::Open
                        && !c.backlog
                        && c.dec.as_ref().is_some_and(|d| d.is_idle())
                    {
                        // The usual case, a message a frame: messages of the common
                        // shape go to the broker straight from the frame, the rest of
                        // it through the decoder below.
                        match self.simple_messages(id, data, text, now, budget) {
                            Some(used) => data = &data[used..],
                            None => return false, // closed by what it sent
                        }
                        if data.is_empty() {
                            continue;
                        }
                    }
                    let Some(c) = self.conns.get_mut(id) else {
                        return false;
                    };
                    match (c.phase, c.dec.as_mut()) {
                        (Phase::Open, Some(dec)) => {
                            if text {
                                dec.feed_utf8(data); // the reader checked it
                            } else {
                                dec.feed(data);
                            }
                            // Handled frame by frame while the budget lasts, so the
                            // decoder holds about one message, not a whole read; once
                            // it is spent, the rest of the read waits in the decoder.
                            let waiting = c.backlog;
                            c.backlog = true;
                            if !waiting
                                && !self.drain_decoder(id, now, budget)
                                && !self.conns.get(id).is_some_and(|c| c.phase == Phase::Open)
                            {
                                return false; // closed by what it sent
                            }
                        }
                        _ => {
                            // The key or an echoed message: gathered whole (the limits
                            // bound it).
                            c.http_buf.extend_from_slice(data);
                            if last {
                                let msg = std::mem::take(&mut c.http_buf);
                                if !self.on_data(id, &msg, text, now, budget) {
                                    return false;
                                }
                            }
                        }
                    }
                }
                Ok(Some(WsEvent::Ping(p))) => {
                    // Not activity for the idle timeout: a peer that pings and never
                    // reads is idle. Its pongs count against the outbound cap, and one
                    // that leaves more than a few unread is closed.
                    if let Some(ws) = c.ws.as_mut() {
                        let pong = WsMessage::Pong(p.payload().to_vec().into());
                        let _ = ws.write(&mut Io::writer(&mut c.out), pong);
                    }
                    if c.out.pongs_unsent() > max_pings {
                        self.close_with(id, 1008, "too many pings", now, CloseReason::Limit);
                        return false;
                    }
                    self.mark_dirty(id);
                }
                Ok(Some(WsEvent::Pong)) => {
                    // The answer to our ping: the peer reads what we send.
                    c.last_rx = now;
                }
                Ok(Some(WsEvent::Close(code))) => {
                    self.ws_end(id, WsEnd::Close(code), now, budget);
                    return false;
                }
                Err(e) => {
                    self.ws_end(id, WsEnd::Fail(e), now, budget);
                    return false;
                }
            }
        }
        // What waits in the decoder (the budget ran out): the next turn comes back for it.
        self.conns.get(id).is_some_and(|c| !c.backlog)
    }

    /// Messages of the common shape ([`decode_simple`]) at the front of `data`, handed to
    /// the broker while the budget lasts; the bytes they took, or `None` when the
    /// connection closed on one of them. Only when its decoder is idle: each is what the
    /// decoder would have handed out.
    fn simple_messages(
        &mut self,
        id: ConnId,
        data: &[u8],
        utf8: bool,
        now: Instant,
        budget: &mut Budget,
    ) -> Option<usize> {
        let limits = self.conns.get(id)?.dec.as_ref()?.limits();
        let mut pos = 0;
        while budget.msgs > 0 {
            let Some((m, used)) = decode_simple(&data[pos..], &limits, utf8) else {
                break;
            };
            let (broker, mut sink) = self.split();
            broker.apply(id, &m, now, &mut sink);
            pos += used;
            budget.msgs -= 1;
            if !self.conns.get(id).is_some_and(|c| c.phase == Phase::Open) {
                return None;
            }
        }
        Some(pos)
    }

    /// A close frame or a framing error: once the messages before it are handled, reply
    /// and close (close frames) or close with the error's code.
    fn ws_end(&mut self, id: ConnId, end: WsEnd, now: Instant, budget: &mut Budget) {
        if !self.drain_decoder(id, now, budget) {
            if let Some(c) = self.conns.get_mut(id) {
                if c.phase == Phase::Open {
                    c.ws_end = Some(end); // after the messages still waiting
                }
            }
            return;
        }
        match end {
            WsEnd::Close(code) => {
                let Some(c) = self.conns.get_mut(id) else {
                    return;
                };
                // The reply echoes the code, or says 1002 for one a peer may not send.
                let reply = code.map(|code| match CloseCode::from(code) {
                    c if c.is_allowed() => CloseFrame {
                        code: c,
                        reason: "".into(),
                    },
                    _ => CloseFrame {
                        code: CloseCode::Protocol,
                        reason: "invalid close code".into(),
                    },
                });
                if let Some(ws) = c.ws.as_mut() {
                    let _ = ws.close(&mut Io::writer(&mut c.out), reply);
                }
                self.mark_dirty(id);
                self.enter_closing(id, now, CloseReason::Normal);
            }
            WsEnd::Fail(e) => {
                let why = match e {
                    WsError::Protocol(_) | WsError::Utf8 => {
                        self.warn_protocol(id, &e.to_string());
                        CloseReason::ProtocolError
                    }
                    WsError::TooManyFrames => {
                        self.warn_protocol(id, "too many frames in one message");
                        CloseReason::Limit
                    }
                    WsError::TooLong => CloseReason::Limit,
                };
                self.close_with(id, e.close_code(), e.reason(), now, why);
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

    /// Handle one whole data message (WebSocket: the key, or an echoed message) or chunk
    /// (raw stream). Returns false when the read turn must end here (connection closing
    /// or gone, or the message budget spent with messages left in the decoder: then it
    /// is on the `again` list).
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
                        dec.feed_utf8(data); // checked by the frame reader
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
