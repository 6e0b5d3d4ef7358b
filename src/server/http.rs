//! The HTTP phase: read the request, then upgrade to WebSocket or answer a plain HTTP
//! request and hang up.

use std::io::{self, Read};
use std::time::Instant;

use log::debug;
use tungstenite::protocol::{Role as WsRole, WebSocketContext};

use crate::http::{self, Request};
use crate::metrics::CloseReason;
use crate::router::ConnId;
use crate::web;

use super::api;
use super::{warn_limited, Phase, Server, CLOSE_LINGER, HTTP_READ_CAP};

impl Server {
    pub(super) fn read_http(&mut self, id: ConnId, now: Instant) {
        let full = self.established() >= self.cfg.max_connections;
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        let mut chunk = [0u8; 4096];
        let request = loop {
            match c.link.read(&mut chunk) {
                Ok(0) => return self.remove(id, CloseReason::PeerGone),
                Ok(n) => {
                    self.metrics.bytes_in += n as u64;
                    c.http_buf.extend_from_slice(&chunk[..n]);
                    match http::parse(&c.http_buf) {
                        Request::Partial if c.http_buf.len() < HTTP_READ_CAP => continue,
                        Request::Partial => break Request::Bad("request head too large"),
                        r => break r,
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.remove(id, CloseReason::PeerGone),
            }
        };
        match request {
            Request::Upgrade { .. } if full => {
                self.metrics.refused += 1;
                warn_limited(&mut self.metrics.warned_refused, || {
                    format!("refused {}: connection limit reached", c.peer)
                });
                let resp = http::response(503, "text/plain", b"too many connections\n");
                self.http_close(id, &resp, now, CloseReason::Limit);
            }
            Request::Upgrade { accept, consumed } => {
                let mut rest = c.http_buf.split_off(consumed.min(c.http_buf.len()));
                c.http_buf = Vec::new();
                c.out.push_bytes(&http::upgrade_response(&accept));
                c.ws = Some(WebSocketContext::new(WsRole::Server, Some(self.ws_config)));
                c.phase = if self.cfg.echo {
                    Phase::Echo
                } else {
                    Phase::AwaitKey
                };
                c.last_rx = now;
                self.mark_dirty(id);
                if self.cfg.echo {
                    self.leave_handshake(id);
                }
                // Frames that came with the request count like any others.
                let mut budget = self.budget();
                if !rest.is_empty() && !self.ws_bytes(id, &mut rest, now, &mut budget) {
                    return;
                }
                self.read_ws_with(id, now, budget);
            }
            Request::Plain { path, consumed, .. } if api::is_api_path(&path) => {
                self.start_api(id, consumed, now);
            }
            Request::Plain { method, path, .. } => {
                let resp = self.plain_http(id, &method, &path);
                self.metrics.http_requests += 1;
                self.http_close(id, &resp, now, CloseReason::Http);
            }
            Request::Bad(why) => {
                debug!("[{id}] bad HTTP request: {why}");
                let resp = http::response(400, "text/plain", format!("{why}\n").as_bytes());
                self.http_close(id, &resp, now, CloseReason::ProtocolError);
            }
            Request::Partial => {}
        }
    }

    /// The answer to a plain HTTP request on connection `id`, limited to the pages its
    /// listener serves (`?pages=`).
    fn plain_http(&self, id: ConnId, method: &str, path: &str) -> Vec<u8> {
        let pages = self
            .conns
            .get(id)
            .and_then(|c| self.listeners.get(c.listener))
            .map_or(web::Pages::NONE, |l| l.bound.pages);
        let view = web::View {
            broker: &self.broker,
            metrics: &self.metrics,
            open: self.conns.len(),
            cfg: &self.cfg,
            pages,
        };
        web::respond(method, path, &view)
    }

    /// Queue an HTTP response and hang up after it is written.
    pub(super) fn http_close(&mut self, id: ConnId, resp: &[u8], now: Instant, why: CloseReason) {
        if let Some(c) = self.conns.get_mut(id) {
            c.http_buf = Vec::new();
            c.out.push_bytes(resp);
            c.phase = Phase::Closing;
            c.close_reason = why;
            c.close_deadline = Some(now + CLOSE_LINGER);
            self.mark_dirty(id);
        }
    }
}
