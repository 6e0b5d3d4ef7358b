//! New connections: accept, and the handshake budget (connections not yet authenticated,
//! counted in all and per source address; the silent oldest makes room for a newcomer).

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use log::{debug, warn};
use mio::{Interest, Token};

use crate::conn::{Framing, OutQueue};
use crate::core::websocket::FrameReader;
use crate::http;
use crate::metrics::CloseReason;
use crate::router::ConnId;
use crate::transport::{Link, Scheme};

use super::{warn_limited, Conn, Phase, Server, MAX_EVICTION_CHECKS};

/// Handshake budget: connections not yet authenticated, counted globally and per source
/// address, oldest first for eviction.
#[derive(Debug, Default)]
pub(super) struct Handshakes {
    pub(super) count: usize,
    per_ip: foldhash::HashMap<IpAddr, u32>,
    /// (id, generation) in accept order; entries of connections that have left the
    /// budget are skipped when met.
    order: VecDeque<(ConnId, u64)>,
}

impl Server {
    pub(super) fn accept(&mut self, index: usize, now: Instant) {
        if self.accept_paused_until.is_some() || self.shutdown_deadline.is_some() {
            return;
        }
        loop {
            let Some(listener) = self.listeners.get(index) else {
                return;
            };
            let scheme = listener.bound.scheme;
            let (mut sock, peer, ip) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS, ...: back off and keep serving the others.
                    warn!("accept failed: {e}; pausing accepts for 100ms");
                    self.accept_paused_until = Some(now + Duration::from_millis(100));
                    break;
                }
            };
            self.metrics.accepted += 1;
            // Unauthenticated connections have their own budget: a source address over
            // its share is refused; a full budget makes room by dropping the oldest, so
            // idle sockets cannot keep out the peers that finish their handshake.
            let over_ip = ip.is_some_and(|ip| {
                self.hs.per_ip.get(&ip).copied().unwrap_or(0) as usize
                    >= self.cfg.max_handshakes_per_ip
            });
            if over_ip {
                self.metrics.refused += 1;
                let refusal = if scheme.is_websocket() {
                    http::response(
                        503,
                        "text/plain",
                        b"too many handshakes from this address\n",
                    )
                } else {
                    b"MM ERR too many handshakes from this address\r\n".to_vec()
                };
                let _ = sock.write(&refusal);
                let _ = sock.shutdown(std::net::Shutdown::Both);
                warn_limited(&mut self.metrics.warned_refused, || {
                    format!("refused {peer}: too many handshakes from this address")
                });
                continue;
            }
            if !self.make_room_for_handshake(now) {
                self.metrics.refused += 1;
                let refusal = if scheme.is_websocket() {
                    http::response(503, "text/plain", b"server busy: too many handshakes\n")
                } else {
                    b"MM ERR server busy: too many handshakes\r\n".to_vec()
                };
                let _ = sock.write(&refusal);
                let _ = sock.shutdown(std::net::Shutdown::Both);
                continue;
            }
            let link = match (scheme, &self.tls) {
                (Scheme::Wss, Some(tls)) => match Link::tls(sock, tls) {
                    Ok(l) => l,
                    Err(e) => {
                        warn!("TLS session for {peer}: {e}");
                        continue;
                    }
                },
                _ => Link::plain(sock),
            };
            let framing = if scheme.is_websocket() {
                Framing::WebSocket
            } else {
                Framing::Raw
            };
            let entry = self.conns.vacant_entry();
            let id = entry.key();
            self.next_gen += 1;
            let gen = self.next_gen;
            let mut link = link;
            if let Err(e) = self.poll.registry().register(
                &mut link,
                Token(id),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                warn!("register {peer}: {e}");
                continue;
            }
            entry.insert(Conn {
                gen,
                link,
                peer: peer.clone(),
                ip,
                in_hs: true,
                wsr: FrameReader::default(),
                ws_end: None,
                backlog: false,
                again: false,
                listener: index,
                framing,
                phase: if scheme.is_websocket() {
                    Phase::Http
                } else {
                    Phase::RawKey
                },
                ws: None,
                key: None,
                dec: None,
                out: OutQueue::new(framing),
                http_buf: Vec::new(),
                created: now,
                last_rx: now,
                last_ping: now,
                rx_bytes: 0,
                dirty: false,
                slow: false,
                close_deadline: None,
                write_shut: false,
                peer_eof: false,
                close_reason: CloseReason::Normal,
                who: None,
                api: None,
            });
            self.hs.count += 1;
            if let Some(ip) = ip {
                *self.hs.per_ip.entry(ip).or_insert(0) += 1;
            }
            self.hs.order.push_back((id, gen));
            debug!("[{id}] accepted {peer} on {}", scheme.name());
            // Most clients send at once: read what is there now, so a connection that
            // has spoken is never taken for an idle one.
            self.on_readable(id, now);
        }
    }

    /// Make room in a full handshake budget by dropping one unauthenticated connection:
    /// the oldest that has sent nothing, else the oldest. A candidate that has sent
    /// nothing is read once more first (its bytes may be waiting in the socket, not yet
    /// seen): one that has spoken is kept. False if there is no room (never expected:
    /// a full budget always holds a connection to drop).
    fn make_room_for_handshake(&mut self, now: Instant) -> bool {
        // Forget entries of connections that have left the budget.
        while let Some(&(id, gen)) = self.hs.order.front() {
            if self.conns.get(id).is_some_and(|c| c.gen == gen && c.in_hs) {
                break;
            }
            self.hs.order.pop_front();
        }
        if self.hs.count < self.cfg.max_handshakes {
            return true;
        }
        let silent =
            |c: &Conn| matches!(c.phase, Phase::Http | Phase::RawKey) && c.http_buf.is_empty();
        let mut oldest = None;
        let mut candidates = Vec::new();
        for &(id, gen) in &self.hs.order {
            let Some(c) = self.conns.get(id).filter(|c| c.gen == gen && c.in_hs) else {
                continue;
            };
            oldest.get_or_insert(id);
            if silent(c) {
                candidates.push(id);
                if candidates.len() == MAX_EVICTION_CHECKS {
                    break;
                }
            }
        }
        for id in candidates {
            self.on_readable(id, now);
            if self.hs.count < self.cfg.max_handshakes {
                return true; // it left (hung up, or was answered and closed)
            }
            if self.conns.get(id).is_some_and(|c| c.in_hs && silent(c)) {
                return self.evict(id);
            }
        }
        match oldest {
            Some(id) if self.conns.get(id).is_some_and(|c| c.in_hs) => self.evict(id),
            _ => self.hs.count < self.cfg.max_handshakes,
        }
    }

    fn evict(&mut self, id: ConnId) -> bool {
        warn_limited(&mut self.metrics.warned_refused, || {
            format!("[{id}] handshake budget full: dropping an unauthenticated connection")
        });
        self.remove(id, CloseReason::Evicted);
        true
    }

    /// The connection is authenticated or gone: it leaves the handshake budget.
    pub(super) fn leave_handshake(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        if !c.in_hs {
            return;
        }
        c.in_hs = false;
        self.hs.count -= 1;
        if let Some(ip) = c.ip {
            if let Some(n) = self.hs.per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.hs.per_ip.remove(&ip);
                }
            }
        }
    }

    /// Connections past their handshake (authenticated, or echo sessions), including
    /// those closing.
    pub(super) fn established(&self) -> usize {
        self.conns.len() - self.hs.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// The handshake budget counts exactly the unauthenticated connections.
    #[test]
    fn handshake_budget_counts_and_evicts_the_silent_first() {
        let mut cfg = Config::on("127.0.0.1:0".parse().expect("address"));
        cfg.max_handshakes = 2;
        let mut s = Server::bind(cfg).expect("bind");
        let addr = s.local_addr();
        let now = Instant::now();
        use std::io::Write as _;
        let mut talker = std::net::TcpStream::connect(addr).expect("connect");
        talker.write_all(b"GET /heal").expect("write");
        let _silent = std::net::TcpStream::connect(addr).expect("connect");
        // Accept both, with a read of the talker's first bytes in between.
        for _ in 0..100 {
            s.accept(0, now);
            if s.conns.len() == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5)); // the kernel's accept queue, bounded
        }
        assert_eq!((s.conns.len(), s.hs.count), (2, 2));
        let ids: Vec<ConnId> = s.conns.iter().map(|(id, _)| id).collect();
        for &id in &ids {
            s.on_readable(id, now);
        }
        // A third: the silent one makes room, the talker stays.
        let _third = std::net::TcpStream::connect(addr).expect("connect");
        for _ in 0..100 {
            s.accept(0, now);
            if s.metrics.accepted == 3 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5)); // the kernel's accept queue, bounded
        }
        assert_eq!(s.hs.count, 2);
        let talker_kept = s.conns.iter().any(|(_, c)| c.http_buf == b"GET /heal");
        assert!(talker_kept, "the connection that spoke was dropped");
        assert_eq!(s.metrics.closed[10], 1, "one eviction");
    }
}
