//! The HTTP API for services (PROTOCOL.md §8.1) in the reactor. After the head of a
//! `POST /api/...` (`http.rs`): the listener, the key and the head are checked (nothing
//! is processed when one fails), the body is read within the turn's read budget and
//! the handshake timeout, and the call gets a broker session of its own (service role,
//! uid empty). What the broker delivers to that session is captured (`Sink::capture`)
//! instead of framed: `pub` and `cmd` are answered in the same turn; a `req` waits in
//! phase `ApiWait` for its RES or error, or for its `?timeout=`, without blocking the
//! loop. The session ends with the answer.

use std::io::{self, Read};
use std::rc::Rc;
use std::time::{Duration, Instant};

use log::debug;

use crate::broker::Role;
use crate::metrics::CloseReason;
use crate::protocol::{Decoded, Decoder, Packet};
use crate::router::ConnId;

use super::api::{self, Call, Delivered};
use super::request::response;
use super::{warn_limited, Phase, Server};

/// Error reason for enablements sent through `/api/cmd` (notes-21).
pub const NOT_OVER_HTTP: &str = crate::broker::reason::NOT_PERMITTED_OVER_HTTP;

/// A call in progress on a connection.
#[derive(Debug)]
pub(super) struct ApiCall {
    call: Call,
    /// Body bytes expected.
    length: usize,
    /// Where the body starts in the connection's `http_buf`.
    body_at: usize,
    /// Message headers from the `MM-` request headers.
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// `?timeout=` of a `req`.
    timeout: Option<Duration>,
    /// What the broker delivered to the session that the answer needs: `PUB ERROR`s,
    /// and for a `req` its `RES`.
    got: Vec<Rc<Packet>>,
    got_bytes: usize,
    /// A waiting `req` is answered 504 at this time.
    pub(super) deadline: Option<Instant>,
}

impl ApiCall {
    /// Keep `pkt` if the answer needs it and the captured bytes stay within `cap`.
    /// True if kept.
    pub(super) fn keep(&mut self, pkt: &Rc<Packet>, cap: usize) -> bool {
        let p = pkt.payload();
        let wanted = api::is_error_payload(p)
            || (matches!(self.call, Call::Req(_)) && api::is_res_payload(p));
        if !wanted || self.got_bytes + p.len() > cap {
            return false;
        }
        self.got_bytes += p.len();
        self.got.push(pkt.clone());
        true
    }
}

impl Server {
    /// A complete request head for a path under `/api` (`consumed` bytes of
    /// `http_buf`; body bytes may follow). Check everything that needs no body, then
    /// read the body.
    pub(super) fn start_api(&mut self, id: ConnId, consumed: usize, now: Instant) {
        let full = self.established() >= self.cfg.max_connections;
        let Some(c) = self.conns.get(id) else {
            return;
        };
        let listener = self.listeners.get(c.listener).map(|l| &l.bound);
        if !listener.is_some_and(|l| l.pages.serves_api() && l.allows(Role::Service)) {
            let resp = response(404, "text/plain", b"not found\n");
            return self.api_refuse(id, &resp, now);
        }
        let head = match api::parse_head(&c.http_buf[..consumed], self.cfg.limits.max_message) {
            Ok(h) => h,
            Err(resp) => return self.api_refuse(id, &resp, now),
        };
        let role = head
            .key
            .as_deref()
            .and_then(|k| self.cfg.keys.authenticate(k));
        let Some(role) = role else {
            let peer = &c.peer;
            warn_limited(&mut self.metrics.warned_bad_key, || {
                format!("HTTP API call without a valid key from {peer}")
            });
            let resp = crate::http::response_with(
                401,
                "text/plain",
                &[(b"WWW-Authenticate", b"Bearer")],
                b"a service key is required: Authorization: Bearer <key>\n",
            );
            return self.api_refuse(id, &resp, now);
        };
        if !role.is_service() || !listener.is_some_and(|l| l.allows(role)) {
            let resp = api::refusal(403, "this key may not use the HTTP API here");
            return self.api_refuse(id, &resp, now);
        }
        let checked = match head.call {
            Ok(c) => c,
            Err((status, why)) => return self.api_refuse(id, &api::refusal(status, why), now),
        };
        if full {
            self.metrics.refused += 1;
            let resp = api::refusal(503, "too many connections");
            return self.api_refuse(id, &resp, now);
        }
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        let have = c.http_buf.len() - consumed;
        if checked.length > have {
            c.http_buf.reserve_exact(checked.length - have);
            if checked.expect_continue {
                c.out.push_bytes(b"HTTP/1.1 100 Continue\r\n\r\n");
                self.mark_dirty(id);
            }
        }
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        c.api = Some(Box::new(ApiCall {
            call: checked.call,
            length: checked.length,
            body_at: consumed,
            headers: checked.headers,
            timeout: checked.timeout,
            got: Vec::new(),
            got_bytes: 0,
            deadline: None,
        }));
        c.phase = Phase::ApiBody;
        self.read_api_body(id, now);
    }

    /// Read the body within this turn's read budget; run the call once it is all here.
    pub(super) fn read_api_body(&mut self, id: ConnId, now: Instant) {
        let mut left = self.cfg.max_read_per_turn;
        loop {
            let Some(c) = self.conns.get_mut(id) else {
                return;
            };
            let Some(need) = c.api.as_ref().map(|a| a.body_at + a.length) else {
                return;
            };
            let at = c.http_buf.len();
            if at >= need {
                return self.run_api(id, now);
            }
            if left == 0 {
                return self.push_again(id);
            }
            let want = (need - at).min(left).min(64 << 10);
            c.http_buf.resize(at + want, 0);
            let res = c.link.read(&mut c.http_buf[at..]);
            c.http_buf.truncate(at + *res.as_ref().unwrap_or(&0));
            match res {
                Ok(0) => return self.remove(id, CloseReason::PeerGone),
                Ok(n) => {
                    left -= n;
                    self.metrics.bytes_in += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.remove(id, CloseReason::PeerGone),
            }
        }
    }

    /// While a `req` waits: bytes from the peer are read and dropped (within the turn's
    /// budget); its hang-up ends the call (the session goes, a late RES is dropped).
    pub(super) fn read_api_wait(&mut self, id: ConnId, _now: Instant) {
        let mut scratch = [0u8; 4096];
        let mut left = self.cfg.max_read_per_turn;
        while left > 0 {
            let Some(c) = self.conns.get_mut(id) else {
                return;
            };
            let room = scratch.len().min(left);
            match c.link.read(&mut scratch[..room]) {
                Ok(0) => return self.remove(id, CloseReason::PeerGone),
                Ok(n) => {
                    left -= n;
                    self.metrics.bytes_in += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.remove(id, CloseReason::PeerGone),
            }
        }
        self.push_again(id);
    }

    /// The body is here: open the session and carry out the call.
    fn run_api(&mut self, id: ConnId, now: Instant) {
        let Some(c) = self.conns.get_mut(id) else {
            return;
        };
        let Some(a) = c.api.as_mut() else {
            return;
        };
        let mut body = c.http_buf.split_off(a.body_at.min(c.http_buf.len()));
        body.truncate(a.length);
        c.http_buf = Vec::new();
        let call = a.call.clone();
        let headers = std::mem::take(&mut a.headers);
        let timeout = a.timeout;
        c.phase = Phase::ApiWait;
        let peer = c.peer.clone();
        self.leave_handshake(id);
        let cid = self.broker.connect_quiet(id);
        let what = match &call {
            Call::Pub(_) => "pub",
            Call::Req(_) => "req",
            Call::Cmd => "cmd",
        };
        debug!("[{id}] HTTP API {what} from {peer} as service {cid}");
        if let Some(c) = self.conns.get_mut(id) {
            c.who = Some(format!("HTTP API service {cid}").into());
        }
        match call {
            Call::Pub(t) => {
                if let Err(why) = self.api_apply_one(id, b"PUB", &t, &headers, None, &body, now) {
                    return self.api_answer(id, &api::refusal(400, why), now);
                }
                self.api_finish(id, now);
            }
            Call::Req(t) => {
                let has_reqid = headers
                    .iter()
                    .any(|(n, _)| n.eq_ignore_ascii_case(b"ReqID"));
                let supplied = (!has_reqid).then(|| {
                    self.api_seq += 1;
                    format!("http-{}", self.api_seq)
                });
                let extra = supplied.as_ref().map(|r| (&b"ReqID"[..], r.as_bytes()));
                if let Err(why) = self.api_apply_one(id, b"REQ", &t, &headers, extra, &body, now) {
                    return self.api_answer(id, &api::refusal(400, why), now);
                }
                // The broker's request timeout ends the request with an error; a
                // shorter `?timeout=` is ours, and a second past the broker's is a
                // backstop so no call ever waits forever.
                let backstop = self.broker.settings().request_timeout + Duration::from_secs(1);
                let wait = timeout.map_or(backstop, |t| t.min(backstop));
                if let Some(a) = self.conns.get_mut(id).and_then(|c| c.api.as_mut()) {
                    let d = now + wait;
                    a.deadline = Some(d);
                    self.api_next_deadline = Some(self.api_next_deadline.map_or(d, |n| n.min(d)));
                }
                // An answer already captured (no responder, ...) is sent at the end of
                // the pass, with any that arrive in the meantime (`finish_api_calls`).
            }
            Call::Cmd => {
                if let Err(why) = self.api_cmd(id, &body, now) {
                    return self.api_answer(id, &api::refusal(400, why), now);
                }
                self.api_finish(id, now);
            }
        }
    }

    /// Build `cmd target` with the call's headers (and `extra`) and `body`, and hand it
    /// to the broker as the session's message. Err: a framing violation (nothing
    /// applied).
    #[allow(clippy::too_many_arguments)]
    fn api_apply_one(
        &mut self,
        id: ConnId,
        cmd: &[u8],
        target: &[u8],
        headers: &[(Vec<u8>, Vec<u8>)],
        extra: Option<(&[u8], &[u8])>,
        body: &[u8],
        now: Instant,
    ) -> Result<(), &'static str> {
        let wire = api::wire(cmd, target, headers, extra, body);
        let max_headers = self.cfg.limits.max_headers.saturating_add(1);
        let mut dec = api::wire_decoder(wire.len(), max_headers);
        dec.feed(&wire);
        let (broker, mut sink) = self.split();
        match dec.next() {
            Ok(Some(Decoded::Message(m))) => broker.apply(id, &m, now, &mut sink),
            Ok(Some(Decoded::Malformed(m))) => broker.malformed(id, &m, &mut sink),
            Ok(None) => return Err("incomplete message"),
            Err(e) => return Err(e.reason()),
        }
        Ok(())
    }

    /// Apply the protocol messages of a `cmd` body in order. The whole body is checked
    /// first: a framing violation or an unfinished last message applies nothing (Err).
    /// `ESUB`, `EPUB`, `EREQ` are refused with [`NOT_OVER_HTTP`].
    fn api_cmd(&mut self, id: ConnId, body: &[u8], now: Instant) -> Result<(), &'static str> {
        let mut body = body.to_vec();
        if body.last().is_some_and(|&b| b != b'\n') {
            // A body cut after its last `.` (as `curl -d` sends a file) ends it anyway.
            body.extend_from_slice(b"\r\n");
        }
        let limits = self.cfg.limits;
        let mut check = Decoder::new(limits);
        check.feed(&body);
        loop {
            match check.next() {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => return Err(e.reason()),
            }
        }
        if check.needs_more() {
            return Err("the last message is unfinished (no `.` line)");
        }
        let mut dec = Decoder::new(limits);
        dec.feed(&body);
        let (broker, mut sink) = self.split();
        while let Ok(Some(d)) = dec.next() {
            match d {
                Decoded::Message(m) if matches!(m.cmd, b"ESUB" | b"EPUB" | b"EREQ") => {
                    // Counted in middleman_errors_total like any error.
                    let reqid = m.header("ReqID");
                    broker.error_to(&mut sink, id, m.cmd, m.target, NOT_OVER_HTTP, reqid);
                }
                Decoded::Message(m) => broker.apply(id, &m, now, &mut sink),
                Decoded::Malformed(m) => broker.malformed(id, &m, &mut sink),
            }
        }
        Ok(())
    }

    /// Answer a `pub` or `cmd` from what the session was delivered.
    fn api_finish(&mut self, id: ConnId, now: Instant) {
        let Some(a) = self.conns.get_mut(id).and_then(|c| c.api.take()) else {
            return;
        };
        let errors: Vec<&Rc<Packet>> = a
            .got
            .iter()
            .filter(|p| api::is_error_payload(p.payload()))
            .collect();
        let resp = match (&a.call, errors.first()) {
            (_, None) => crate::http::response_with(204, "", &[], b""),
            (Call::Cmd, Some(_)) => {
                let mut body = Vec::with_capacity(a.got_bytes);
                for p in &errors {
                    body.extend_from_slice(p.payload());
                }
                response(200, "text/plain; charset=utf-8", &body)
            }
            (_, Some(first)) => match Delivered::parse(first.payload()) {
                Some(e) => api::error_answer(&e),
                None => api::refusal(400, "error"),
            },
        };
        self.api_answer(id, &resp, now);
    }

    /// Answer the `req`s that were delivered their RES or error this pass.
    pub(super) fn finish_api_calls(&mut self, now: Instant) {
        if self.api_ready.is_empty() {
            return;
        }
        let mut ready = std::mem::take(&mut self.api_ready);
        for &(id, gen) in &ready {
            let Some(c) = self
                .conns
                .get(id)
                .filter(|c| c.gen == gen && c.phase == Phase::ApiWait)
            else {
                continue;
            };
            let Some(first) = c.api.as_ref().and_then(|a| a.got.first()) else {
                continue;
            };
            let resp = match Delivered::parse(first.payload()) {
                Some(d) if d.is_error() => api::error_answer(&d),
                Some(d) => api::res_answer(&d),
                None => api::refusal(502, "unreadable answer"),
            };
            self.api_answer(id, &resp, now);
        }
        ready.clear();
        if self.api_ready.is_empty() {
            self.api_ready = ready; // keep the allocation
        }
    }

    /// The earliest deadline of a waiting call has passed: answer every waiting `req`
    /// whose `?timeout=` (or backstop) has passed with 504, its session going with it
    /// so a late RES is dropped, and note the next deadline. A walk over the
    /// connections, at most once per deadline (as the 250 ms housekeeping walk).
    pub(super) fn expire_api_calls(&mut self, now: Instant) {
        let mut next: Option<Instant> = None;
        let mut due = Vec::new();
        for (id, c) in self.conns.iter() {
            if c.phase != Phase::ApiWait {
                continue;
            }
            match c.api.as_ref().and_then(|a| a.deadline) {
                Some(d) if now >= d => due.push(id),
                Some(d) => next = Some(next.map_or(d, |n| n.min(d))),
                None => {}
            }
        }
        self.api_next_deadline = next;
        let resp = api::refusal(504, "request timed out");
        for id in due {
            self.api_answer(id, &resp, now);
        }
    }

    /// End the call: the session leaves the broker, the answer is sent, the connection
    /// closes after it.
    pub(super) fn api_answer(&mut self, id: ConnId, resp: &[u8], now: Instant) {
        if let Some(c) = self.conns.get_mut(id) {
            c.api = None;
        }
        {
            let (broker, mut sink) = self.split();
            broker.disconnect(id, &mut sink);
        }
        self.metrics.http_requests += 1;
        self.http_close(id, resp, now, CloseReason::Http);
    }

    /// Refuse a call before anything was processed.
    fn api_refuse(&mut self, id: ConnId, resp: &[u8], now: Instant) {
        if let Some(c) = self.conns.get_mut(id) {
            c.api = None;
        }
        self.metrics.http_requests += 1;
        self.http_close(id, resp, now, CloseReason::Http);
    }
}
