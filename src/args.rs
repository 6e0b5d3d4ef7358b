//! Command-line arguments of the server (`middleman [OPTIONS]`) and how they become a
//! [`Config`](crate::Config), merged with the configuration file (`--config`) under the
//! precedence command line > environment > file > defaults.

use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args};

use crate::broker::Keys;
use crate::config::{parse_bytes, parse_duration, Config};
use crate::config_file::{self, Effective, Source};
use crate::protocol::Limits;
use crate::transport::Listen;

/// Options of the server itself.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Configuration file (TOML; see middleman.example.toml). Command-line options and
    /// MM_* environment variables override its values.
    #[arg(long, env = "MM_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Check the configuration (file, environment, command line), print the effective
    /// configuration with keys redacted, and exit: 0 if valid, 1 if not.
    #[arg(long)]
    pub check_config: bool,
    /// Listener URL; repeat for several: `ws://HOST:PORT` (default scheme), `wss://HOST:PORT`
    /// (needs --tls-cert/--tls-key), `tcp://HOST:PORT`, `unix:///path`; `?roles=service,monitor`
    /// restricts which keys a listener accepts. From the environment: comma-separated.
    #[arg(
        long,
        env = "MM_LISTEN",
        value_delimiter = ',',
        default_value = "ws://127.0.0.1:8765"
    )]
    pub listen: Vec<Listen>,
    /// PEM certificate chain for wss:// listeners.
    #[arg(long, env = "MM_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for wss:// listeners.
    #[arg(long, env = "MM_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// A service (trusted) key; repeat for several. From the environment: comma-separated.
    #[arg(
        long = "service-key",
        env = "MM_SERVICE_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub service_keys: Vec<String>,
    /// A client (untrusted) key; repeatable.
    #[arg(
        long = "client-key",
        env = "MM_CLIENT_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub client_keys: Vec<String>,
    /// A monitor key (a service that also receives a copy of all traffic); repeatable.
    #[arg(
        long = "monitor-key",
        env = "MM_MONITOR_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub monitor_keys: Vec<String>,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, env = "MM_LOG_LEVEL", default_value = "info")]
    pub log_level: log::LevelFilter,
    /// Largest protocol message in bytes (e.g. 1MiB); larger closes with 1009.
    #[arg(long, env = "MM_MAX_MESSAGE_BYTES", default_value = "1MiB", value_parser = parse_bytes)]
    pub max_message_bytes: usize,
    /// Longest line in bytes; longer closes with 1009.
    #[arg(long, env = "MM_MAX_LINE_BYTES", default_value = "8KiB", value_parser = parse_bytes)]
    pub max_line_bytes: usize,
    /// Most header lines in one message; more closes with 1002.
    #[arg(long, env = "MM_MAX_HEADER_LINES", default_value_t = 64)]
    pub max_header_lines: usize,
    /// Most simultaneous connections; beyond it new ones get HTTP 503.
    #[arg(long, env = "MM_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Most subscriptions per connection (its private channel not counted).
    #[arg(long, env = "MM_MAX_SUBSCRIPTIONS", default_value_t = 10_000)]
    pub max_subscriptions: usize,
    /// Bytes queued for one peer before it is closed as a slow consumer (1008).
    #[arg(long, env = "MM_MAX_OUTBOUND_BYTES", default_value = "4MiB", value_parser = parse_bytes)]
    pub max_outbound_bytes: usize,
    /// Bytes read from one connection per loop pass before others get their turn (every transport).
    #[arg(long, env = "MM_MAX_READ_PER_TURN", default_value = "64KiB", value_parser = parse_bytes)]
    pub max_read_per_turn: usize,
    /// Protocol messages decoded from one connection per loop pass; the rest waits in its decoder.
    #[arg(long, env = "MM_MAX_MESSAGES_PER_TURN", default_value_t = 1000)]
    pub max_messages_per_turn: usize,
    /// Most WebSocket frames in one message; more closes with 1008.
    #[arg(long, env = "MM_MAX_FRAGMENTS", default_value_t = 1024)]
    pub max_fragments: usize,
    /// Largest message before the key is accepted (the key itself); larger closes with 1009.
    #[arg(long, env = "MM_MAX_KEY_BYTES", default_value = "4KiB", value_parser = parse_bytes)]
    pub max_key_bytes: usize,
    /// Requests one connection may have in flight; beyond it a `too many requests in flight` error.
    #[arg(long, env = "MM_MAX_PENDING_REQUESTS", default_value_t = 1000)]
    pub max_pending_requests: usize,
    /// Longest ReqID value; longer gets a `ReqID too long` error.
    #[arg(long, env = "MM_MAX_REQID_BYTES", default_value = "256", value_parser = parse_bytes)]
    pub max_reqid_bytes: usize,
    /// Most connections not yet authenticated (HTTP, upgrade, key); beyond it the oldest is dropped.
    #[arg(long, env = "MM_MAX_HANDSHAKES", default_value_t = 1000)]
    pub max_handshakes: usize,
    /// Most unauthenticated connections from one source address; beyond it new ones are refused.
    #[arg(long, env = "MM_MAX_HANDSHAKES_PER_IP", default_value_t = 64)]
    pub max_handshakes_per_ip: usize,
    /// Pongs a peer may leave unread; one more ping closes it with 1008.
    #[arg(long, env = "MM_MAX_UNANSWERED_PINGS", default_value_t = 16)]
    pub max_unanswered_pings: usize,
    /// Time allowed for the WebSocket upgrade and the key.
    #[arg(long, env = "MM_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,
    /// How often the server pings a quiet connection.
    #[arg(long, env = "MM_PING_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub ping_interval: Duration,
    /// A connection silent this long is closed.
    #[arg(long, env = "MM_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// How long a request may stay unanswered.
    #[arg(long, env = "MM_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// How long shutdown waits for queued messages to flush.
    #[arg(long, env = "MM_SHUTDOWN_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// Echo mode for WebSocket compliance testing: no keys, every message is echoed.
    #[arg(long)]
    pub echo: bool,
}

impl ServeArgs {
    /// The configuration these arguments describe (keys as given, none generated).
    pub fn to_config(&self) -> Config {
        Config {
            listeners: self.listen.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            keys: Keys {
                service: nonempty(&self.service_keys),
                client: nonempty(&self.client_keys),
                monitor: nonempty(&self.monitor_keys),
            },
            limits: Limits {
                max_message: self.max_message_bytes,
                max_line: self.max_line_bytes,
                max_headers: self.max_header_lines,
            },
            max_connections: self.max_connections,
            max_subscriptions: self.max_subscriptions,
            max_outbound_bytes: self.max_outbound_bytes,
            max_read_per_turn: self.max_read_per_turn,
            max_messages_per_turn: self.max_messages_per_turn,
            max_fragments: self.max_fragments,
            max_key_bytes: self.max_key_bytes,
            max_pending_requests: self.max_pending_requests,
            max_reqid_bytes: self.max_reqid_bytes,
            max_handshakes: self.max_handshakes,
            max_handshakes_per_ip: self.max_handshakes_per_ip,
            max_unanswered_pings: self.max_unanswered_pings,
            handshake_timeout: self.handshake_timeout,
            ping_interval: self.ping_interval,
            idle_timeout: self.idle_timeout,
            request_timeout: self.request_timeout,
            shutdown_grace: self.shutdown_grace,
            echo: self.echo,
            handle_signals: true,
            cluster: None,
            reuse_port: false,
        }
    }
}

impl ServeArgs {
    /// The effective configuration: these arguments (from the command line, the
    /// environment or clap's defaults, as `matches` tells), over the `--config` file if
    /// any. Checked as a whole; errors name the setting and where its value came from.
    pub fn effective(&self, matches: &ArgMatches) -> Result<Effective, String> {
        let file = match &self.config {
            Some(path) => Some(config_file::load(path)?),
            None => None,
        };
        let eff =
            config_file::merge(
                self.to_config(),
                self.log_level,
                file.as_ref(),
                |id| match matches.value_source(id) {
                    Some(ValueSource::CommandLine) => Source::CommandLine,
                    Some(ValueSource::EnvVariable) => Source::Env,
                    _ => Source::Default,
                },
            );
        config_file::validate(&eff)?;
        Ok(eff)
    }
}

fn nonempty(keys: &[String]) -> Vec<String> {
    keys.iter()
        .map(|k| k.trim().to_owned())
        .filter(|k| !k.is_empty())
        .collect()
}
