//! The HTTP side of a connection (pure): parse the request that opens it and decide
//! between a WebSocket upgrade (RFC 6455 §4.2) and a plain HTTP answer (PROTOCOL.md §8).

/// Largest request head accepted.
pub const MAX_REQUEST: usize = 8 * 1024;
const MAX_HEADERS: usize = 48;

/// What the bytes received so far amount to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Not complete yet.
    Partial,
    /// A valid WebSocket upgrade. `consumed` bytes were the request head; anything after
    /// them already belongs to the WebSocket stream.
    Upgrade {
        /// The `Sec-WebSocket-Accept` value to answer with.
        accept: String,
        /// Length of the request head.
        consumed: usize,
    },
    /// A plain HTTP request (not an upgrade).
    Plain {
        /// The method.
        method: String,
        /// The path, without the query string.
        path: String,
        /// Length of the request head (a body, if any, follows).
        consumed: usize,
    },
    /// Malformed, too large, or an upgrade missing what RFC 6455 requires.
    Bad(&'static str),
}

/// Parse the bytes received so far.
pub fn parse(buf: &[u8]) -> Request {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let consumed = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= MAX_REQUEST {
                Request::Bad("request head too large")
            } else {
                Request::Partial
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Request::Bad("too many headers"),
        Err(_) => return Request::Bad("malformed request"),
    };
    if consumed > MAX_REQUEST {
        return Request::Bad("request head too large");
    }
    let method = req.method.unwrap_or("").to_owned();
    let full_path = req.path.unwrap_or("/");
    let path = full_path.split('?').next().unwrap_or("/").to_owned();
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let has_token = |name: &str, token: &str| {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token("Upgrade", "websocket") {
        return Request::Plain {
            method,
            path,
            consumed,
        };
    }
    if method != "GET" || req.version != Some(1) {
        return Request::Bad("upgrade must be GET over HTTP/1.1");
    }
    if !has_token("Connection", "upgrade") {
        return Request::Bad("missing Connection: Upgrade");
    }
    if header("Sec-WebSocket-Version").map(<[u8]>::trim_ascii) != Some(b"13") {
        return Request::Bad("unsupported Sec-WebSocket-Version");
    }
    let Some(key) = header("Sec-WebSocket-Key").map(<[u8]>::trim_ascii) else {
        return Request::Bad("missing Sec-WebSocket-Key");
    };
    if key.is_empty() {
        return Request::Bad("missing Sec-WebSocket-Key");
    }
    Request::Upgrade {
        accept: tungstenite::handshake::derive_accept_key(key),
        consumed,
    }
}

/// The `101 Switching Protocols` answer.
pub fn upgrade_response(accept: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes()
}

/// A complete response that closes the connection.
pub fn response(status: u16, content_type: &str, body: &[u8]) -> Vec<u8> {
    response_with(status, content_type, &[], body)
}

/// A complete response that closes the connection, with `extra` header lines (names
/// and values as given; the caller makes sure they are valid field names and values).
/// A 204 has neither body nor `Content-Length` (RFC 9110 §8.6).
pub fn response_with(
    status: u16,
    content_type: &str,
    extra: &[(&[u8], &[u8])],
    body: &[u8],
) -> Vec<u8> {
    let text = match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Content Too Large",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    };
    let mut out = format!("HTTP/1.1 {status} {text}\r\n").into_bytes();
    if status != 204 {
        out.extend_from_slice(
            format!(
                "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
                body.len()
            )
            .as_bytes(),
        );
    }
    for (name, value) in extra {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Cache-Control: no-store\r\nConnection: close\r\n\r\n");
    if status != 204 {
        out.extend_from_slice(body);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_and_plain() {
        let req = b"GET /x HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\nKEY";
        match parse(req) {
            Request::Upgrade { accept, consumed } => {
                assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
                assert_eq!(&req[consumed..], b"KEY");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(parse(&req[..20]), Request::Partial);
        assert_eq!(
            parse(b"GET /healthz?x=1 HTTP/1.1\r\n\r\n"),
            Request::Plain {
                method: "GET".into(),
                path: "/healthz".into(),
                consumed: 29,
            }
        );
        assert!(matches!(parse(b"\x00\x01garbage\r\n\r\n"), Request::Bad(_)));
        assert!(matches!(parse(&[b'a'; MAX_REQUEST]), Request::Bad(_)));
    }
}
