//! Listener URLs (`ws://`, `wss://`, `tcp://`, `unix://`, with `?roles=` and `?pages=`):
//! what the configuration says a listener is. The transport binds and serves them; the
//! web pages honour their `pages`.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use crate::broker::Role;

/// How messages are framed on a listener's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// WebSocket over TCP.
    Ws,
    /// WebSocket over TLS.
    Wss,
    /// The raw stream protocol over TCP.
    Tcp,
    /// The raw stream protocol over a Unix-domain socket.
    Unix,
}

impl Scheme {
    /// WebSocket framing (ws, wss) rather than the raw stream.
    pub fn is_websocket(self) -> bool {
        matches!(self, Scheme::Ws | Scheme::Wss)
    }
    /// The URL scheme.
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Ws => "ws",
            Scheme::Wss => "wss",
            Scheme::Tcp => "tcp",
            Scheme::Unix => "unix",
        }
    }
}

/// Where a listener listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix-domain socket path.
    Unix(PathBuf),
}

/// One listener: scheme, endpoint, the roles whose keys it accepts and the plain HTTP
/// pages it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    /// Framing (and TLS).
    pub scheme: Scheme,
    /// Address or path.
    pub endpoint: Endpoint,
    /// Roles accepted here; `None` accepts every role.
    pub roles: Option<Vec<Role>>,
    /// Plain HTTP pages served here (`?pages=`); every page by default.
    pub pages: Pages,
}

impl Listen {
    /// A plain WebSocket listener accepting every role.
    pub fn ws(addr: SocketAddr) -> Listen {
        Listen {
            scheme: Scheme::Ws,
            endpoint: Endpoint::Tcp(addr),
            roles: None,
            pages: Pages::ALL,
        }
    }

    /// Whether a key of `role` may connect here.
    pub fn allows(&self, role: Role) -> bool {
        self.roles.as_ref().is_none_or(|r| r.contains(&role))
    }

    /// True for loopback TCP addresses and Unix sockets (local by nature).
    pub fn is_local(&self) -> bool {
        match &self.endpoint {
            Endpoint::Tcp(a) => a.ip().is_loopback(),
            Endpoint::Unix(_) => true,
        }
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.endpoint {
            Endpoint::Tcp(a) => write!(f, "{}://{a}", self.scheme.name())?,
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display())?,
        }
        let mut sep = '?';
        if let Some(roles) = &self.roles {
            let names: Vec<&str> = roles.iter().map(|r| r.name()).collect();
            write!(f, "{sep}roles={}", names.join(","))?;
            sep = '&';
        }
        if self.pages != Pages::ALL {
            write!(f, "{sep}pages={}", self.pages)?;
        }
        Ok(())
    }
}

impl FromStr for Listen {
    type Err = String;

    /// `ws://HOST:PORT` (also plain `HOST:PORT`), `wss://HOST:PORT`, `tcp://HOST:PORT`,
    /// `unix:///path`, each optionally followed by `?roles=service,monitor,client` and/or
    /// `pages=healthz,metrics,stats,console,js,demo,api` (or `pages=none`), joined by `&`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (rest, query) = match s.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (s, None),
        };
        let (scheme, addr) = match rest.split_once("://") {
            Some((sch, a)) => (sch.to_ascii_lowercase(), a),
            None => ("ws".to_owned(), rest),
        };
        let scheme = match scheme.as_str() {
            "ws" => Scheme::Ws,
            "wss" => Scheme::Wss,
            "tcp" => Scheme::Tcp,
            "unix" => Scheme::Unix,
            other => {
                return Err(format!(
                    "listener {s:?}: unknown scheme {other:?} (use ws, wss, tcp or unix)"
                ))
            }
        };
        let endpoint = if scheme == Scheme::Unix {
            if addr.is_empty() {
                return Err(format!("listener {s:?}: unix:// needs a path"));
            }
            Endpoint::Unix(PathBuf::from(addr))
        } else {
            let addr = addr.trim_end_matches('/');
            let parsed = addr.parse::<SocketAddr>().or_else(|_| {
                // Accept "localhost:PORT".
                match addr.rsplit_once(':') {
                    Some(("localhost", port)) => port
                        .parse::<u16>()
                        .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
                        .map_err(|_| ()),
                    _ => Err(()),
                }
            });
            Endpoint::Tcp(parsed.map_err(|_| {
                format!("listener {s:?}: {addr:?} is not an IP address with a port")
            })?)
        };
        let mut roles = None;
        let mut pages = Pages::ALL;
        if let Some(q) = query {
            for pair in q.split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                if k == "pages" {
                    pages = Pages::parse_list(v).map_err(|e| format!("listener {s:?}: {e}"))?;
                    continue;
                }
                if k != "roles" {
                    return Err(format!(
                        "listener {s:?}: unknown option {k:?} (roles= or pages=)"
                    ));
                }
                let mut list = Vec::new();
                for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                    list.push(match name {
                        "service" => Role::Service,
                        "client" => Role::Client,
                        "monitor" => Role::Monitor,
                        other => {
                            return Err(format!(
                                "listener {s:?}: unknown role {other:?} (service, client, monitor)"
                            ))
                        }
                    });
                }
                if list.is_empty() {
                    return Err(format!("listener {s:?}: roles= names no role"));
                }
                roles = Some(list);
            }
        }
        Ok(Listen {
            scheme,
            endpoint,
            roles,
            pages,
        })
    }
}

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
    /// `api` is the HTTP API for services (`/api/...`, PROTOCOL.md §8.1), served only
    /// where the listener also admits the service role.
    pub const NAMES: [(&'static str, &'static str); 7] = [
        ("healthz", "/healthz"),
        ("metrics", "/metrics"),
        ("stats", "/stats"),
        ("console", "/console"),
        ("js", "/middleman.js"),
        ("demo", "/demo"),
        ("api", "/api"),
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

    /// Is the HTTP API (`api`, every path under `/api/`) in the set?
    pub fn serves_api(self) -> bool {
        self.serves("/api")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_urls() {
        let l: Listen = "127.0.0.1:8765".parse().unwrap();
        assert_eq!(l, Listen::ws("127.0.0.1:8765".parse().unwrap()));
        let l: Listen = "wss://0.0.0.0:443?roles=client".parse().unwrap();
        assert_eq!(l.scheme, Scheme::Wss);
        assert_eq!(l.roles, Some(vec![Role::Client]));
        assert!(!l.is_local());
        let l: Listen = "tcp://127.0.0.1:8764?roles=service,monitor"
            .parse()
            .unwrap();
        assert!(l.allows(Role::Monitor) && !l.allows(Role::Client));
        assert_eq!(l.to_string(), "tcp://127.0.0.1:8764?roles=service,monitor");
        let l: Listen = "unix:///tmp/mm.sock".parse().unwrap();
        assert_eq!(l.endpoint, Endpoint::Unix("/tmp/mm.sock".into()));
        assert!(l.is_local());
        let l: Listen = "ws://localhost:9000/".parse().unwrap();
        assert_eq!(l.endpoint, Endpoint::Tcp("127.0.0.1:9000".parse().unwrap()));
        assert!("http://x:1".parse::<Listen>().is_err());
        assert!("tcp://nohost".parse::<Listen>().is_err());
        assert!("tcp://127.0.0.1:1?roles=admin".parse::<Listen>().is_err());
        assert!("tcp://127.0.0.1:1?x=1".parse::<Listen>().is_err());
        assert!("unix://".parse::<Listen>().is_err());
    }

    #[test]
    fn listener_pages() {
        let l: Listen = "ws://127.0.0.1:1".parse().unwrap();
        assert_eq!(l.pages, Pages::ALL);
        assert_eq!(l.to_string(), "ws://127.0.0.1:1");
        let l: Listen = "wss://0.0.0.0:443?pages=healthz".parse().unwrap();
        assert!(l.pages.serves("/healthz") && !l.pages.serves("/metrics"));
        assert_eq!(l.to_string(), "wss://0.0.0.0:443?pages=healthz");
        let l: Listen = "ws://127.0.0.1:2?roles=client&pages=healthz,metrics"
            .parse()
            .unwrap();
        assert_eq!(l.roles, Some(vec![Role::Client]));
        assert_eq!(
            l.to_string(),
            "ws://127.0.0.1:2?roles=client&pages=healthz,metrics"
        );
        assert_eq!(l.to_string().parse::<Listen>().unwrap(), l);
        let l: Listen = "tcp://127.0.0.1:3?pages=none".parse().unwrap();
        assert_eq!(l.pages, Pages::NONE);
        assert_eq!(l.to_string(), "tcp://127.0.0.1:3?pages=none");
        // Every page named is the same as no option.
        let l: Listen = "ws://127.0.0.1:4?pages=api,demo,js,console,stats,metrics,healthz"
            .parse()
            .unwrap();
        assert_eq!(l.to_string(), "ws://127.0.0.1:4");
        for bad in [
            "ws://127.0.0.1:1?pages=",
            "ws://127.0.0.1:1?pages=admin",
            "ws://127.0.0.1:1?pages=healthz,nope",
            "ws://127.0.0.1:1?pages=none,stats",
        ] {
            let e = bad.parse::<Listen>().unwrap_err();
            assert!(e.contains("page"), "{bad}: {e}");
        }
    }

    #[test]
    fn pages_parse_display_and_serve() {
        assert_eq!(Pages::default(), Pages::ALL);
        assert_eq!(
            Pages::ALL.to_string(),
            "healthz,metrics,stats,console,js,demo,api"
        );
        let p = Pages::parse_list("healthz, metrics").unwrap();
        assert_eq!(p.to_string(), "healthz,metrics");
        assert!(p.serves("/healthz") && p.serves("/metrics"));
        assert!(!p.serves("/stats") && !p.serves("/middleman.js") && !p.serves("/x"));
        assert!(Pages::parse_list("js").unwrap().serves("/middleman.js"));
        assert!(Pages::parse_list("api").unwrap().serves_api());
        assert!(Pages::ALL.serves_api() && !p.serves_api() && !Pages::NONE.serves_api());
        assert_eq!(Pages::parse_list("none").unwrap(), Pages::NONE);
        assert_eq!(Pages::NONE.to_string(), "none");
        assert!(!Pages::NONE.serves("/healthz"));
        for bad in ["", ",", "admin", "healthz,admin", "none,healthz", "HEALTHZ"] {
            assert!(Pages::parse_list(bad).is_err(), "{bad:?}");
        }
    }
}
