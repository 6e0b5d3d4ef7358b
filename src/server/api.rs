//! The HTTP API for services (PROTOCOL.md §8.1), the pure part: what the head of a
//! `POST /api/...` asks for, the protocol message a `pub` or `req` becomes, and the HTTP
//! answers built from what the broker delivered. The reactor side (body, session,
//! waiting for the RES) is `api_call.rs`.
//!
//! | request | answer |
//! |---|---|
//! | `POST /api/pub/<topic>` | 204 once routed; the broker's error: 403 (`not permitted`) or 400 |
//! | `POST /api/req/<target>[?timeout=<s>]` | 200 with the RES (headers as `MM-<Name>`); 504, 503, 403, 400 |
//! | `POST /api/cmd` | 200 with the `PUB ERROR` messages produced, or 204 |
//!
//! Before anything is processed: 404 (unknown path), 405 (not POST), 401 (no or wrong
//! key), 403 (a client key, or a role the listener does not admit), 400 (bad target,
//! `timeout`, `Content-Length`), 411 (no `Content-Length`, or a `Transfer-Encoding`),
//! 413 (a body over the message limit).

use std::time::Duration;

use crate::protocol::encode::{push_body, push_header};
use crate::protocol::{Decoded, Decoder, Limits};

use super::request::{response, response_with, MAX_REQUEST};

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// `PUB <target>`.
    Pub(Vec<u8>),
    /// `REQ <target>`.
    Req(Vec<u8>),
    /// Protocol messages in the body.
    Cmd,
}

/// A request head that names an API call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The `Authorization: Bearer` token, if any (never logged or echoed).
    pub key: Option<Vec<u8>>,
    /// The call, or the refusal (status, text) to answer once the key is accepted.
    pub call: Result<Checked, (u16, &'static str)>,
}

/// A call whose head is acceptable (the key aside).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// What to do.
    pub call: Call,
    /// Body bytes (`Content-Length`).
    pub length: usize,
    /// The client sent `Expect: 100-continue`.
    pub expect_continue: bool,
    /// `MM-<Name>: value` request headers as message headers `<Name>: value`, in order.
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// `?timeout=` (req only).
    pub timeout: Option<Duration>,
}

/// Is `path` (without the query) under the API?
pub fn is_api_path(path: &str) -> bool {
    path == "/api" || path.starts_with("/api/")
}

/// Parse the head of a request to the API (`buf` holds at least the whole head).
/// `Err` is the complete answer for requests refused before the key is looked at
/// (unknown path: 404; another method: 405).
pub fn parse_head(buf: &[u8], max_body: usize) -> Result<Head, Vec<u8>> {
    let mut headers = [httparse::EMPTY_HEADER; 48];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(buf), Ok(httparse::Status::Complete(n)) if n <= MAX_REQUEST) {
        return Err(response(400, "text/plain", b"malformed request\n"));
    }
    let full = req.path.unwrap_or("/");
    let (path, query) = full.split_once('?').unwrap_or((full, ""));
    let call = if let Some(t) = path.strip_prefix("/api/pub/") {
        Some(target(t).map(Call::Pub))
    } else if let Some(t) = path.strip_prefix("/api/req/") {
        Some(target(t).map(Call::Req))
    } else if path == "/api/cmd" {
        Some(Ok(Call::Cmd))
    } else {
        None
    };
    let Some(call) = call else {
        return Err(response(404, "text/plain", b"not found\n"));
    };
    if req.method != Some("POST") {
        return Err(response_with(
            405,
            "text/plain",
            &[(b"Allow", b"POST")],
            b"use POST\n",
        ));
    }
    let mut key = None;
    let mut length: Option<Result<usize, ()>> = None;
    let mut chunked = false;
    let mut expect_continue = false;
    let mut mm = Vec::new();
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let value = h.value.trim_ascii();
        if name.eq_ignore_ascii_case(b"authorization") {
            if key.is_none() {
                key = bearer(value).map(<[u8]>::to_vec);
            }
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(value)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<usize>().ok())
                .ok_or(());
            length = match length {
                None => Some(n),
                Some(prev) if prev == n => Some(prev),
                Some(_) => Some(Err(())),
            };
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            chunked = true;
        } else if name.eq_ignore_ascii_case(b"expect") {
            expect_continue = value.eq_ignore_ascii_case(b"100-continue");
        } else if name.len() > 3 && name[..3].eq_ignore_ascii_case(b"mm-") {
            mm.push((name[3..].to_vec(), value.to_vec()));
        }
    }
    let checked = (|| {
        let call = call.map_err(|why| (400, why))?;
        if chunked {
            return Err((411, "a Content-Length is required (no Transfer-Encoding)"));
        }
        let length = match length {
            None => return Err((411, "a Content-Length is required")),
            Some(Err(())) => return Err((400, "bad Content-Length")),
            Some(Ok(n)) if n > max_body => return Err((413, "body over the message limit")),
            Some(Ok(n)) => n,
        };
        let mut timeout = None;
        if matches!(call, Call::Req(_)) {
            for pair in query.split('&') {
                if let Some(v) = pair.strip_prefix("timeout=") {
                    let secs = v
                        .parse::<f64>()
                        .ok()
                        .filter(|s| s.is_finite() && *s > 0.0 && *s <= 1e9)
                        .ok_or((400, "bad timeout (seconds, more than 0)"))?;
                    timeout = Some(Duration::from_secs_f64(secs));
                }
            }
        }
        Ok(Checked {
            call,
            length,
            expect_continue,
            headers: mm,
            timeout,
        })
    })();
    Ok(Head { key, call: checked })
}

/// The token of `Bearer <token>` (scheme case-insensitive).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at(value.iter().position(|&b| b == b' ')?);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| rest.trim_ascii())
        .filter(|k| !k.is_empty())
}

/// Percent-decode a target from the path and check it against §2: non-empty, at most
/// 255 bytes, no control character, no surrounding space or tab.
pub fn target(raw: &str) -> Result<Vec<u8>, &'static str> {
    let raw = raw.as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            let hex = |b: u8| (b as char).to_digit(16);
            let (Some(hi), Some(lo)) = (
                raw.get(i + 1).copied().and_then(hex),
                raw.get(i + 2).copied().and_then(hex),
            ) else {
                return Err("bad percent-encoding in the target");
            };
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    let bad = out.is_empty()
        || out.len() > crate::protocol::decode::MAX_TARGET
        || out.iter().any(|&b| b < 0x20 || b == 0x7f)
        || out.trim_ascii() != out.as_slice();
    if bad {
        return Err("bad target: 1 to 255 bytes, no control character or surrounding space");
    }
    Ok(out)
}

/// The wire form of one message: `cmd target`, the headers, `extra` last, the body
/// dot-stuffed.
pub fn wire(
    cmd: &[u8],
    target: &[u8],
    headers: &[(Vec<u8>, Vec<u8>)],
    extra: Option<(&[u8], &[u8])>,
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 32 + 256);
    out.extend_from_slice(cmd);
    out.push(b' ');
    out.extend_from_slice(target);
    out.extend_from_slice(b"\r\n");
    for (n, v) in headers {
        push_header(&mut out, n, v);
    }
    if let Some((n, v)) = extra {
        push_header(&mut out, n, v);
    }
    out.extend_from_slice(b"\r\n");
    push_body(&mut out, body);
    out.extend_from_slice(b"\r\n.\r\n");
    out
}

/// A decoder for one [`wire`] message of `len` bytes: its lines may be as long as the
/// message (an HTTP body is one value, not lines), headers as many as `max_headers`.
pub fn wire_decoder(len: usize, max_headers: usize) -> Decoder {
    Decoder::new(Limits {
        max_message: len,
        max_line: len,
        max_headers,
    })
}

/// One delivered message, owned: command, target, headers, body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// The command.
    pub cmd: Vec<u8>,
    /// The target.
    pub target: Vec<u8>,
    /// Headers in order.
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Delivered {
    /// Decode the one message in a packet's payload (`None` if it is not one).
    pub fn parse(payload: &[u8]) -> Option<Delivered> {
        let n = payload.len().max(1);
        let mut d = wire_decoder(n, n);
        d.feed(payload);
        match d.next() {
            Ok(Some(Decoded::Message(m))) => Some(Delivered {
                cmd: m.cmd.to_vec(),
                target: m.target.to_vec(),
                headers: m.headers().map(|(n, v)| (n.to_vec(), v.to_vec())).collect(),
                body: m.body.into_owned(),
            }),
            _ => None,
        }
    }

    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v.as_slice())
    }

    /// A `PUB ERROR` (§7).
    pub fn is_error(&self) -> bool {
        self.cmd == b"PUB" && self.target == b"ERROR"
    }
}

/// Is this payload a `PUB ERROR` message? (Its first line, without decoding it.)
pub fn is_error_payload(payload: &[u8]) -> bool {
    payload.starts_with(b"PUB ERROR\r\n")
}

/// Is this payload a `RES` message?
pub fn is_res_payload(payload: &[u8]) -> bool {
    payload.starts_with(b"RES ")
}

/// The HTTP status for a `PUB ERROR` ended call: 504 `request timed out`, 503 `no
/// responder`/`responder disconnected`, 403 `not permitted`, 400 otherwise.
pub fn error_status(reason: &[u8]) -> u16 {
    match reason {
        b"request timed out" => 504,
        b"no responder" | b"responder disconnected" => 503,
        b"not permitted" => 403,
        _ => 400,
    }
}

/// The answer to a call the broker ended with this error: its status, the error's body
/// text and a line break.
pub fn error_answer(err: &Delivered) -> Vec<u8> {
    let status = error_status(err.header("reason").unwrap_or(b""));
    let mut body = err.body.clone();
    body.push(b'\n');
    response(status, "text/plain; charset=utf-8", &body)
}

/// The 200 answer of a `req`: the RES body, every header of it as `MM-<Name>`.
pub fn res_answer(res: &Delivered) -> Vec<u8> {
    let names: Vec<Vec<u8>> = res
        .headers
        .iter()
        .map(|(n, _)| [b"MM-".as_slice(), n].concat())
        .collect();
    let extra: Vec<(&[u8], &[u8])> = names
        .iter()
        .zip(&res.headers)
        .map(|(n, (_, v))| (n.as_slice(), v.as_slice()))
        .collect();
    let ctype = if std::str::from_utf8(&res.body).is_ok() {
        "text/plain; charset=utf-8"
    } else {
        "application/octet-stream"
    };
    response_with(200, ctype, &extra, &res.body)
}

/// A refusal before anything was processed: status and text.
pub fn refusal(status: u16, text: &str) -> Vec<u8> {
    response(status, "text/plain", format!("{text}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Result<Head, Vec<u8>> {
        parse_head(raw.as_bytes(), 1000)
    }

    fn status(resp: &[u8]) -> u16 {
        std::str::from_utf8(&resp[9..12]).unwrap().parse().unwrap()
    }

    #[test]
    fn heads() {
        let h = head(
            "POST /api/pub/a%20b%2Fc?x=1 HTTP/1.1\r\nAuthorization: bearer  k1 \r\n\
             Content-Length: 5\r\nMM-Foo: bar \r\nmm-ReqID: 7\r\nExpect: 100-continue\r\n\r\n",
        )
        .unwrap();
        assert_eq!(h.key.as_deref(), Some(&b"k1"[..]));
        let c = h.call.unwrap();
        assert_eq!(c.call, Call::Pub(b"a b/c".to_vec()));
        assert_eq!(c.length, 5);
        assert!(c.expect_continue);
        assert_eq!(
            c.headers,
            vec![
                (b"Foo".to_vec(), b"bar".to_vec()),
                (b"ReqID".to_vec(), b"7".to_vec())
            ]
        );
        let h = head("POST /api/req/t?timeout=1.5 HTTP/1.1\r\nContent-Length: 0\r\n\r\n").unwrap();
        assert_eq!(h.key, None);
        let c = h.call.unwrap();
        assert_eq!(c.timeout, Some(Duration::from_millis(1500)));
        let refused = |raw: &str| head(raw).unwrap().call.unwrap_err().0;
        assert_eq!(refused("POST /api/cmd HTTP/1.1\r\n\r\n"), 411);
        assert_eq!(
            refused("POST /api/cmd HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
        assert_eq!(
            refused("POST /api/cmd HTTP/1.1\r\nContent-Length: 1001\r\n\r\n"),
            413
        );
        assert_eq!(
            refused("POST /api/cmd HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            400
        );
        assert_eq!(
            refused("POST /api/cmd HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        assert_eq!(
            refused("POST /api/pub/%0a HTTP/1.1\r\nContent-Length: 1\r\n\r\n"),
            400
        );
        assert_eq!(
            refused("POST /api/req/x?timeout=0 HTTP/1.1\r\nContent-Length: 1\r\n\r\n"),
            400
        );
        assert_eq!(
            status(&head("POST /api/x HTTP/1.1\r\n\r\n").unwrap_err()),
            404
        );
        assert_eq!(
            status(&head("GET /api/cmd HTTP/1.1\r\n\r\n").unwrap_err()),
            405
        );
        assert!(is_api_path("/api") && is_api_path("/api/x") && !is_api_path("/apix"));
    }

    #[test]
    fn targets() {
        assert_eq!(target("SYS%3Ax").unwrap(), b"SYS:x");
        assert_eq!(target("a/b").unwrap(), b"a/b");
        for bad in [
            "",
            "%",
            "%4",
            "%zz",
            "%20a",
            "a%09",
            "%7f",
            &"x".repeat(256),
        ] {
            assert!(target(bad).is_err(), "{bad:?}");
        }
        assert!(target(&"x".repeat(255)).is_ok());
    }

    /// A body goes through the wire form and the decoder byte for byte, whatever it
    /// holds: dots, lone CRs, CRLFs, no final line break, binary.
    #[test]
    fn bodies_survive_byte_for_byte() {
        let bodies: [&[u8]; 9] = [
            b"",
            b"x",
            b".",
            b"..\n.\r\n.",
            b"a\r",
            b"a\r\n",
            b"line\n\n",
            b"\r\n.\r\n",
            b"\x00\xff\x80 bin\r\r\n",
        ];
        for body in bodies {
            let w = wire(b"PUB", b"t", &[(b"A".to_vec(), b"1".to_vec())], None, body);
            let d = Delivered::parse(&w).expect("one message");
            assert_eq!(d.body, body, "{body:?}");
            assert_eq!(d.headers, vec![(b"A".to_vec(), b"1".to_vec())]);
        }
        // A long line is one value here, not subject to the line limit.
        let long = vec![b'z'; 100_000];
        let w = wire(b"PUB", b"t", &[], Some((b"ReqID", b"1")), &long);
        let mut d = wire_decoder(w.len(), 64);
        d.feed(&w);
        assert!(matches!(d.next(), Ok(Some(Decoded::Message(m))) if *m.body == long[..]));
    }

    #[test]
    fn answers() {
        let err = Delivered::parse(
            b"PUB ERROR\r\ncmd: REQ\r\ntarget: t\r\nreason: no responder\r\n\r\nno responder: REQ t\r\n.\r\n",
        )
        .unwrap();
        assert!(err.is_error());
        let a = String::from_utf8(error_answer(&err)).unwrap();
        assert!(a.starts_with("HTTP/1.1 503 "), "{a}");
        assert!(a.ends_with("\r\n\r\nno responder: REQ t\n"), "{a}");
        let res =
            Delivered::parse(b"RES t\r\nX-a: 1\r\ncid: c\r\nuid: \r\nReqID: r\r\n\r\nok\r\n.\r\n")
                .unwrap();
        let a = String::from_utf8(res_answer(&res)).unwrap();
        assert!(a.starts_with("HTTP/1.1 200 OK\r\n"), "{a}");
        for h in [
            "MM-X-a: 1\r\n",
            "MM-cid: c\r\n",
            "MM-uid: \r\n",
            "MM-ReqID: r\r\n",
        ] {
            assert!(a.contains(h), "{h} in {a}");
        }
        assert!(
            a.ends_with("Content-Length: 2\r\n") || a.ends_with("\r\n\r\nok"),
            "{a}"
        );
        assert_eq!(error_status(b"request timed out"), 504);
        assert_eq!(error_status(b"responder disconnected"), 503);
        assert_eq!(error_status(b"not permitted"), 403);
        assert_eq!(error_status(b"missing ReqID"), 400);
        let r = String::from_utf8(response_with(204, "x", &[], b"ignored")).unwrap();
        assert_eq!(
            r,
            "HTTP/1.1 204 No Content\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
        );
    }
}
