//! Server configuration: limits, timeouts and keys, with the defaults of PROTOCOL.md.

pub mod args;
pub mod file;
pub mod listen;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::broker::Keys;
use crate::protocol::Limits;
use listen::Listen;

/// Everything the server needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listeners (at least one).
    pub listeners: Vec<Listen>,
    /// PEM certificate chain for `wss://` listeners.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `wss://` listeners.
    pub tls_key: Option<PathBuf>,
    /// API keys.
    pub keys: Keys,
    /// Message limits (§2).
    pub limits: Limits,
    /// Most simultaneous connections; beyond it new ones get HTTP 503.
    pub max_connections: usize,
    /// Subscriptions per connection, not counting its private channel.
    pub max_subscriptions: usize,
    /// Bytes queued for one peer before it is cut off as a slow consumer.
    pub max_outbound_bytes: usize,
    /// Bytes read from one connection per loop pass before others get their turn (every transport).
    pub max_read_per_turn: usize,
    /// Protocol messages decoded from one connection per loop pass; the rest waits in its decoder.
    pub max_messages_per_turn: usize,
    /// Most WebSocket frames in one message; more closes with 1008.
    pub max_fragments: usize,
    /// Largest message before the key is accepted (the key itself); larger closes with 1009.
    pub max_key_bytes: usize,
    /// Requests one connection may have in flight; beyond it a `too many requests in flight` error.
    pub max_pending_requests: usize,
    /// Longest ReqID value; longer gets a `ReqID too long` error.
    pub max_reqid_bytes: usize,
    /// Most connections not yet authenticated (HTTP, upgrade, key); beyond it the oldest is dropped.
    pub max_handshakes: usize,
    /// Most unauthenticated connections from one source address; beyond it new ones are refused.
    pub max_handshakes_per_ip: usize,
    /// Pongs a peer may leave unread; one more ping closes it with 1008.
    pub max_unanswered_pings: usize,
    /// Time allowed for the upgrade and the key.
    pub handshake_timeout: Duration,
    /// How often idle connections are pinged.
    pub ping_interval: Duration,
    /// A connection silent this long is closed.
    pub idle_timeout: Duration,
    /// How long a request may stay unanswered.
    pub request_timeout: Duration,
    /// How long shutdown waits for queued data to flush.
    pub shutdown_grace: Duration,
    /// Lame duck (SIGUSR2): the time over which the open connections are closed, spread
    /// evenly, before the server exits.
    pub lame_duck_duration: Duration,
    /// Echo mode: no keys, every data message is sent back (for Autobahn).
    pub echo: bool,
    /// Handle SIGINT/SIGTERM (the binary does; in-process test servers do not).
    pub handle_signals: bool,
    /// Joining a cluster through nats-server: None unless at least one URL is given.
    pub cluster: Option<ClusterConfig>,
    /// Listen with SO_REUSEPORT, so several middleman processes can share a port
    /// (Linux spreads new connections over them).
    pub reuse_port: bool,
    /// History (`[[history]]` tables, `[limits] max_history_bytes`; PROTOCOL.md §9.5).
    pub history: crate::core::history::HistorySettings,
}

/// Joining a cluster through nats-server (`--cluster`).
///
/// Its `Debug` shows whether a password or token is set, never their values.
#[derive(Clone)]
pub struct ClusterConfig {
    /// nats-server addresses as `nats://HOST:PORT` (port defaults to 4222), tried in turn.
    pub urls: Vec<String>,
    /// Subject prefix shared by the nodes of one cluster (one NATS token: [A-Za-z0-9_-]+), default "mm".
    pub name: String,
    /// Credentials for nats-server, if it requires them.
    pub user: Option<String>,
    /// Password for `user`.
    pub password: Option<String>,
    /// Token for nats-server (read from token_file when loading the configuration).
    pub token: Option<String>,
    /// Bytes waiting for nats-server beyond which messages for other nodes are dropped (default 64 MiB).
    pub max_pending: usize,
    /// A node unheard for this long is gone (default 3 s).
    pub node_timeout: Duration,
    /// A name for people (`--cluster-node-name`), shown beside the node's id in `/stats`
    /// and `/console`: 1 to 64 of `A-Z a-z 0-9 . _ -` ([`is_node_name`]).
    pub node_name: Option<String>,
    /// Where JetStream keeps the cluster's history (`[cluster] history_storage`).
    pub history_storage: crate::cluster::history::Storage,
}

impl Default for ClusterConfig {
    /// The defaults, with no nats-server URL.
    fn default() -> Self {
        ClusterConfig {
            urls: Vec::new(),
            name: "mm".into(),
            user: None,
            password: None,
            token: None,
            max_pending: 64 << 20,
            node_timeout: Duration::from_secs(3),
            node_name: None,
            history_storage: Default::default(),
        }
    }
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |s: &Option<String>| s.as_ref().map(|_| "(redacted)");
        f.debug_struct("ClusterConfig")
            .field("urls", &self.urls)
            .field("name", &self.name)
            .field("user", &self.user)
            .field("password", &redacted(&self.password))
            .field("token", &redacted(&self.token))
            .field("max_pending", &self.max_pending)
            .field("node_timeout", &self.node_timeout)
            .field("node_name", &self.node_name)
            .finish()
    }
}

/// A secret (a password, a token) on its way into the configuration: its `Debug` never
/// shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

/// Default port of nats-server.
pub const NATS_DEFAULT_PORT: u16 = 4222;

/// Check a nats-server URL, `nats://HOST:PORT` or `nats://HOST` (port 4222), and give
/// its host (an IPv6 address without its brackets) and port. No other scheme, no
/// credentials (they go in `user`/`password`), no path.
pub fn parse_nats_url(url: &str) -> Result<(String, u16), String> {
    let expected = "expected nats://HOST:PORT or nats://HOST";
    if url.contains('@') {
        // Not echoed: it would print the password.
        return Err(
            "a nats URL holding credentials (user:password@): give them as the cluster user \
             and password (or token file) instead"
                .to_owned(),
        );
    }
    let Some(rest) = url.strip_prefix("nats://") else {
        return Err(match url.split_once("://") {
            Some((scheme, _)) => format!(
                "unsupported scheme {scheme:?} in {url:?} ({expected}; nats:// is the only one)"
            ),
            None => format!("{url:?} has no scheme ({expected})"),
        });
    };
    if rest.contains(['/', '?', '#']) {
        return Err(format!("{url:?} has a path or query ({expected})"));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (addr, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("unclosed [ in {url:?}"))?;
        addr.parse::<std::net::Ipv6Addr>()
            .map_err(|_| format!("{addr:?} is not an IPv6 address in {url:?}"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| format!("{url:?}: expected :PORT after ]"))?,
            ),
        };
        (addr, port)
    } else {
        let (host, port) = match rest.split_once(':') {
            Some((_, p)) if p.contains(':') => {
                return Err(format!(
                    "{url:?}: put an IPv6 address in brackets, e.g. nats://[::1]:4222"
                ));
            }
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        };
        if host.is_empty() {
            return Err(format!("{url:?} names no host ({expected})"));
        }
        if !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err(format!("{host:?} is not a host name in {url:?}"));
        }
        (host, port)
    };
    let port = match port {
        None => NATS_DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("port {p:?} in {url:?} is not within 1-65535")),
        },
    };
    Ok((host.to_owned(), port))
}

/// Whether `name` can be a cluster name: 1 to 32 of `A-Z a-z 0-9 _ -` (one NATS token).
pub fn is_cluster_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A node name (`--cluster-node-name`): 1 to 64 of `A-Z a-z 0-9 . _ -`, so it reads the
/// same in a log line, a JSON string and a terminal.
pub fn is_node_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Config {
    /// A configuration listening on one WebSocket address (e.g. `127.0.0.1:0`).
    pub fn on(addr: SocketAddr) -> Config {
        Config {
            listeners: vec![Listen::ws(addr)],
            ..Config::default()
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listeners: vec![Listen::ws(SocketAddr::from(([127, 0, 0, 1], 8765)))],
            tls_cert: None,
            tls_key: None,
            keys: Keys::default(),
            limits: Limits::default(),
            max_connections: 10_000,
            max_subscriptions: 10_000,
            max_outbound_bytes: 4 << 20,
            max_read_per_turn: 64 << 10,
            max_messages_per_turn: 1000,
            max_fragments: 1024,
            max_key_bytes: 4 << 10,
            max_pending_requests: 1000,
            max_reqid_bytes: 256,
            max_handshakes: 1000,
            max_handshakes_per_ip: 64,
            max_unanswered_pings: 16,
            handshake_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            lame_duck_duration: Duration::from_secs(30),
            echo: false,
            handle_signals: false,
            cluster: None,
            reuse_port: false,
            history: Default::default(),
        }
    }
}

/// Parse a duration: `500ms`, `2s`, `1m`, `1h`, or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (expected e.g. 500ms, 2s, 1m)"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        u => {
            return Err(format!(
                "invalid duration unit {u:?} in {s:?} (use ms, s, m or h)"
            ))
        }
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("duration out of range: {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parse a byte size: `1048576`, `64KiB`, `1MiB`, `4mb`, ...
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("invalid size {s:?} (expected e.g. 1048576, 64KiB, 4MiB)"))?;
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        u => return Err(format!("invalid size unit {u:?} in {s:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size out of range: {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("2 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn nats_urls() {
        let ok = |u: &str| parse_nats_url(u).unwrap();
        assert_eq!(ok("nats://127.0.0.1:4222"), ("127.0.0.1".into(), 4222));
        assert_eq!(ok("nats://nats.internal"), ("nats.internal".into(), 4222));
        assert_eq!(ok("nats://[::1]:5000"), ("::1".into(), 5000));
        assert_eq!(ok("nats://[::1]"), ("::1".into(), 4222));
        for bad in [
            "tls://127.0.0.1:4222",
            "127.0.0.1:4222",
            "nats://",
            "nats://:4222",
            "nats://h:0",
            "nats://h:65536",
            "nats://h:",
            "nats://h:x",
            "nats://h:4222/",
            "nats://h/path",
            "nats://u:p@h:4222",
            "nats://::1:4222",
            "nats://[nothost]:1",
            "nats://[::1]x",
            "nats://bad host",
        ] {
            assert!(parse_nats_url(bad).is_err(), "{bad}");
        }
        let e = parse_nats_url("nats://u:secret@h").unwrap_err();
        assert!(
            e.contains("user and password") && !e.contains("secret"),
            "{e}"
        );
    }

    #[test]
    fn cluster_names() {
        assert!(is_cluster_name("mm"));
        assert!(is_cluster_name("prod_eu-1"));
        assert!(is_cluster_name(&"a".repeat(32)));
        assert!(!is_cluster_name(&"a".repeat(33)));
        assert!(!is_cluster_name(""));
        assert!(!is_cluster_name("a.b"));
        assert!(!is_cluster_name("a b"));
        assert!(!is_cluster_name("a*"));
    }

    #[test]
    fn node_names() {
        assert!(is_node_name("a"));
        assert!(is_node_name("eu-west-1.node_2"));
        assert!(is_node_name(&"n".repeat(64)));
        assert!(!is_node_name(&"n".repeat(65)));
        assert!(!is_node_name(""));
        for bad in ["a b", "a/b", "a:b", "é", "a\n", "a\"b", "<b>"] {
            assert!(!is_node_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn cluster_debug_redacts_secrets() {
        let c = ClusterConfig {
            urls: vec!["nats://127.0.0.1".into()],
            user: Some("u".into()),
            password: Some("pw-3f9e".into()),
            token: Some("tok-8a1c".into()),
            ..ClusterConfig::default()
        };
        let d = format!(
            "{c:?} {:?}",
            Config {
                cluster: Some(c.clone()),
                ..Config::default()
            }
        );
        assert!(!d.contains("pw-3f9e") && !d.contains("tok-8a1c"), "{d}");
        assert!(
            d.contains("(redacted)") && d.contains("nats://127.0.0.1"),
            "{d}"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("1MiB"), Ok(1 << 20));
        assert_eq!(parse_bytes("64KiB"), Ok(64 << 10));
        assert_eq!(parse_bytes("100"), Ok(100));
        assert!(parse_bytes("x").is_err());
    }
}
