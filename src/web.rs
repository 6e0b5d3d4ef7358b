//! Plain HTTP on the server's port (PROTOCOL.md §8): the answer to every request that is
//! not a WebSocket upgrade. Read-only views of the server's state; no key ever appears.
//! Also the browser client (`/middleman.js`) and the chat demo page (`/demo`), both
//! embedded in the binary.

use crate::broker::Broker;
use crate::http;
use crate::metrics::Metrics;

/// What a plain HTTP request may look at.
pub struct View<'a> {
    /// Routing state and broker counters.
    pub broker: &'a Broker,
    /// Reactor counters.
    pub metrics: &'a Metrics,
    /// Open connections (slab entries).
    pub open: usize,
}

/// The browser client, `clients/js/middleman.js`.
pub const MIDDLEMAN_JS: &str = include_str!("../clients/js/middleman.js");
/// The chat demo page, `examples/chat.html` (needs `cargo run --example chat`).
pub const DEMO_HTML: &str = include_str!("../examples/chat.html");

/// The complete response (the connection closes after it).
pub fn respond(method: &str, path: &str, view: &View<'_>) -> Vec<u8> {
    match (method, path) {
        ("GET", "/healthz") => http::response(200, "text/plain", b"ok"),
        ("GET", "/metrics") => {
            let body = view.metrics.render(view.broker, view.open);
            http::response(200, "text/plain; version=0.0.4", body.as_bytes())
        }
        ("GET", "/middleman.js") => http::response(200, "text/javascript", MIDDLEMAN_JS.as_bytes()),
        ("GET", "/demo") => http::response(200, "text/html; charset=utf-8", DEMO_HTML.as_bytes()),
        _ => http::response(404, "text/plain", b"not found\n"),
    }
}
