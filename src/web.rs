//! Plain HTTP on the server's port (PROTOCOL.md §8): the answer to every request that is
//! not a WebSocket upgrade. Read-only views of the server's state; no key ever appears.

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

/// The complete response (the connection closes after it).
pub fn respond(method: &str, path: &str, view: &View<'_>) -> Vec<u8> {
    match (method, path) {
        ("GET", "/healthz") => http::response(200, "text/plain", b"ok"),
        ("GET", "/metrics") => {
            let body = view.metrics.render(view.broker, view.open);
            http::response(200, "text/plain; version=0.0.4", body.as_bytes())
        }
        _ => http::response(404, "text/plain", b"not found\n"),
    }
}
