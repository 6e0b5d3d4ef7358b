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
//!
//! A listener may serve only some of them (`?pages=` on its URL, see [`Pages`]); the
//! others answer 404 there, like any unknown path.

use crate::broker::Broker;
use crate::config::Config;
use crate::http;
use crate::metrics::Metrics;

/// The live console: HTML, CSS and JavaScript in one file, no external assets.
pub const CONSOLE_HTML: &str = include_str!("console.html");

/// The plain HTTP pages a listener serves: a set of [`Pages::NAMES`], all by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pages(u8);

impl Default for Pages {
    fn default() -> Self {
        Pages::ALL
    }
}

impl Pages {
    /// Page names as written after `?pages=`, and their paths, in display order.
    pub const NAMES: [(&'static str, &'static str); 6] = [
        ("healthz", "/healthz"),
        ("metrics", "/metrics"),
        ("stats", "/stats"),
        ("console", "/console"),
        ("js", "/middleman.js"),
        ("demo", "/demo"),
    ];
    /// Every page (the default).
    pub const ALL: Pages = Pages((1 << Pages::NAMES.len()) - 1);
    /// No page: every plain HTTP request answers 404 (`pages=none`).
    pub const NONE: Pages = Pages(0);

    /// Parse a comma-separated list of page names (`none` alone: no page).
    pub fn parse_list(list: &str) -> Result<Pages, String> {
        let mut set = 0u8;
        let mut none = false;
        let mut any = false;
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            any = true;
            if name == "none" {
                none = true;
                continue;
            }
            let Some(i) = Pages::NAMES.iter().position(|(n, _)| *n == name) else {
                let known: Vec<&str> = Pages::NAMES.iter().map(|(n, _)| *n).collect();
                return Err(format!(
                    "unknown page {name:?} ({}, or none)",
                    known.join(", ")
                ));
            };
            set |= 1 << i;
        }
        match (any, none, set) {
            (false, ..) => Err("pages= names no page (use pages=none to serve none)".into()),
            (_, true, 0) => Ok(Pages::NONE),
            (_, true, _) => Err("pages=none cannot be combined with page names".into()),
            _ => Ok(Pages(set)),
        }
    }

    /// The names of the pages in the set, in [`Pages::NAMES`] order.
    pub fn names(self) -> Vec<&'static str> {
        Pages::NAMES
            .iter()
            .enumerate()
            .filter(|(i, _)| self.0 & (1 << i) != 0)
            .map(|(_, (n, _))| *n)
            .collect()
    }

    /// Is the page at `path` in the set? (False for paths that are no page.)
    pub fn serves(self, path: &str) -> bool {
        Pages::NAMES
            .iter()
            .position(|(_, p)| *p == path)
            .is_some_and(|i| self.0 & (1 << i) != 0)
    }
}

impl std::fmt::Display for Pages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 == 0 {
            f.write_str("none")
        } else {
            f.write_str(&self.names().join(","))
        }
    }
}

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
pub const MIDDLEMAN_JS: &str = include_str!("../clients/js/middleman.js");
/// The chat demo page, `examples/chat.html` (needs `cargo run --example chat`).
pub const DEMO_HTML: &str = include_str!("../examples/chat.html");

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_parse_display_and_serve() {
        assert_eq!(Pages::default(), Pages::ALL);
        assert_eq!(
            Pages::ALL.to_string(),
            "healthz,metrics,stats,console,js,demo"
        );
        let p = Pages::parse_list("healthz, metrics").unwrap();
        assert_eq!(p.to_string(), "healthz,metrics");
        assert!(p.serves("/healthz") && p.serves("/metrics"));
        assert!(!p.serves("/stats") && !p.serves("/middleman.js") && !p.serves("/x"));
        assert!(Pages::parse_list("js").unwrap().serves("/middleman.js"));
        assert_eq!(Pages::parse_list("none").unwrap(), Pages::NONE);
        assert_eq!(Pages::NONE.to_string(), "none");
        assert!(!Pages::NONE.serves("/healthz"));
        for bad in ["", ",", "admin", "healthz,admin", "none,healthz", "HEALTHZ"] {
            assert!(Pages::parse_list(bad).is_err(), "{bad:?}");
        }
    }
}
