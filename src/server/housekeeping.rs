//! Timers (handshake and idle timeouts, pings, closing deadlines) and the start of a
//! graceful shutdown.

use std::time::Instant;

use log::info;
use tungstenite::Message as WsMessage;

use crate::conn::{Framing, Io};
use crate::metrics::CloseReason;
use crate::router::ConnId;

use super::{Phase, Server};

impl Server {
    pub(super) fn housekeeping(&mut self, now: Instant) {
        self.broker.history_housekeeping(now);
        self.broker.pool.trim();
        self.spent.trim();
        let mut expired = Vec::new();
        let mut ping = Vec::new();
        for (id, c) in self.conns.iter_mut() {
            c.out.trim();
            match c.phase {
                Phase::Http | Phase::ApiBody | Phase::AwaitKey | Phase::RawKey => {
                    if now.duration_since(c.created) >= self.cfg.handshake_timeout {
                        expired.push((id, c.phase));
                    }
                }
                // Raw streams have no ping; TCP keepalive and the peer's own
                // timeouts look after them.
                Phase::Open | Phase::Echo if c.framing == Framing::Raw => {}
                Phase::Open | Phase::Echo => {
                    if now.duration_since(c.last_rx) >= self.cfg.idle_timeout {
                        expired.push((id, c.phase));
                    } else if now.duration_since(c.last_rx) >= self.cfg.ping_interval
                        && now.duration_since(c.last_ping) >= self.cfg.ping_interval
                    {
                        ping.push(id);
                    }
                }
                // Its deadline is kept by `expire_api_calls`, to the millisecond.
                Phase::ApiWait => {}
                Phase::Closing => {
                    if c.close_deadline.is_some_and(|d| now >= d) {
                        expired.push((id, c.phase));
                    }
                }
            }
        }
        for (id, phase) in expired {
            match phase {
                Phase::Http | Phase::ApiBody => self.remove(id, CloseReason::Timeout),
                Phase::ApiWait => {}
                Phase::AwaitKey | Phase::RawKey => {
                    self.close_with(id, 1008, "handshake timeout", now, CloseReason::Timeout)
                }
                Phase::Open | Phase::Echo => {
                    self.close_with(id, 1001, "idle timeout", now, CloseReason::Idle)
                }
                Phase::Closing => {
                    let why = self.conns.get(id).map(|c| c.close_reason);
                    self.remove(id, why.unwrap_or(CloseReason::Normal));
                }
            }
        }
        for id in ping {
            if let Some(c) = self.conns.get_mut(id) {
                c.last_ping = now;
                if let Some(ws) = c.ws.as_mut() {
                    let _ = ws.write(
                        &mut Io::writer(&mut c.out),
                        WsMessage::Ping(Default::default()),
                    );
                }
                self.mark_dirty(id);
            }
        }
        self.lame_duck_tick(now);
    }

    pub(super) fn begin_shutdown(&mut self, now: Instant) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        let deadline = now + self.cfg.shutdown_grace;
        self.shutdown_deadline = Some(deadline);
        // The other nodes hear it first (written this pass, ahead of any data), so they
        // forget this node's enablements at once rather than after the node timeout.
        self.broker.cluster_leave();
        for mut l in std::mem::take(&mut self.listeners) {
            let _ = self.poll.registry().deregister(&mut l);
        }
        info!(
            "shutting down: closing {} connections (grace {:?})",
            self.conns.len(),
            self.cfg.shutdown_grace
        );
        let ids: Vec<(ConnId, Phase)> = self.conns.iter().map(|(id, c)| (id, c.phase)).collect();
        for (id, phase) in ids {
            match phase {
                Phase::Http | Phase::ApiBody => self.remove(id, CloseReason::Shutdown),
                Phase::ApiWait => {
                    let resp = super::api::refusal(503, "server shutting down");
                    self.api_answer(id, &resp, now);
                }
                Phase::Closing => {
                    if let Some(c) = self.conns.get_mut(id) {
                        c.close_deadline = c.close_deadline.map(|d| d.min(deadline));
                    }
                }
                _ => self.close_with(id, 1001, "server shutting down", now, CloseReason::Shutdown),
            }
        }
    }
}
