//! Server configuration: limits, timeouts and keys, with the defaults of PROTOCOL.md.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::broker::Keys;
use crate::protocol::Limits;
use crate::transport::Listen;

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
    /// Echo mode: no keys, every data message is sent back (for Autobahn).
    pub echo: bool,
    /// Handle SIGINT/SIGTERM (the binary does; in-process test servers do not).
    pub handle_signals: bool,
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
            echo: false,
            handle_signals: false,
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
    fn sizes() {
        assert_eq!(parse_bytes("1MiB"), Ok(1 << 20));
        assert_eq!(parse_bytes("64KiB"), Ok(64 << 10));
        assert_eq!(parse_bytes("100"), Ok(100));
        assert!(parse_bytes("x").is_err());
    }
}
