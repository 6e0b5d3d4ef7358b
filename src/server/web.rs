//! Plain HTTP on the server's port (PROTOCOL.md §8): the answer to every request that is
//! not a WebSocket upgrade. Read-only views of the server's state; no key ever appears.
//!
//! | path | answer |
//! |---|---|
//! | `GET /healthz` | `ok` |
//! | `GET /metrics` | Prometheus text exposition |
//! | `GET /stats` | the same counters as JSON, plus busiest topics, recent closes and rates |
//! | `GET /console` | a self-contained live page that polls `/stats` once a second |
//! | `GET /middleman.js` | the browser client (embedded) |
//! | `GET /demo` | the chat demo page (embedded) |
//! | `POST /api/...` | the HTTP API for services (`api.rs`, `api_call.rs`; not answered here) |
//!
//! A listener may serve only some of them (`?pages=` on its URL, see [`Pages`]); the
//! others answer 404 there, like any unknown path.

use crate::broker::Broker;
pub use crate::config::listen::Pages;
use crate::config::Config;
use crate::http;
use crate::metrics::Metrics;

/// The live console: HTML, CSS and JavaScript in one file, no external assets.
pub const CONSOLE_HTML: &str = include_str!("console.html");

/// What a plain HTTP request may look at.
pub struct View<'a> {
    /// Routing state and broker counters.
    pub broker: &'a Broker,
    /// Reactor counters.
    pub metrics: &'a Metrics,
    /// Open connections (slab entries).
    pub open: usize,
    /// The configuration in force (its keys are used only to keep them out of answers).
    pub cfg: &'a Config,
    /// The pages the listener that accepted the request serves.
    pub pages: Pages,
}

/// The browser client, `clients/js/middleman.js`.
pub const MIDDLEMAN_JS: &str = include_str!("../../clients/js/middleman.js");
/// The chat demo page, `examples/chat.html` (needs `cargo run --example chat`).
pub const DEMO_HTML: &str = include_str!("../../examples/chat.html");

/// The complete response (the connection closes after it).
pub fn respond(method: &str, path: &str, view: &View<'_>) -> Vec<u8> {
    if !view.pages.serves(path) {
        return not_found();
    }
    match (method, path) {
        ("GET", "/healthz") => http::response(200, "text/plain", b"ok"),
        ("GET", "/metrics") => {
            let body = view.metrics.render(view.broker, view.open, &view.cfg.keys);
            http::response(200, "text/plain; version=0.0.4", body.as_bytes())
        }
        ("GET", "/middleman.js") => http::response(200, "text/javascript", MIDDLEMAN_JS.as_bytes()),
        ("GET", "/demo") => http::response(200, "text/html; charset=utf-8", DEMO_HTML.as_bytes()),
        ("GET", "/stats") => {
            let mut doc = view
                .metrics
                .snapshot(view.broker, view.open, &view.cfg.keys)
                .json();
            doc["max_connections"] = view.cfg.max_connections.into();
            // Which process answered: with --reuse-port two may share the port.
            doc["pid"] = std::process::id().into();
            let body = doc.to_string();
            http::response(200, "application/json", body.as_bytes())
        }
        ("GET", "/console") => {
            http::response(200, "text/html; charset=utf-8", CONSOLE_HTML.as_bytes())
        }
        _ => not_found(),
    }
}

fn not_found() -> Vec<u8> {
    http::response(404, "text/plain", b"not found\n")
}
