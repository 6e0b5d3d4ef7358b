//! The `middleman` binary: parse the command line, set up logging, run the server.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use middleman::broker::Keys;
use middleman::config::{parse_bytes, parse_duration};
use middleman::protocol::Limits;
use middleman::{Config, Server};

/// A low-latency publish/subscribe and request/response server over WebSocket.
///
/// With no key configured, a service key and a client key are generated and printed
/// once at start (only allowed on a loopback address).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Address to listen on.
    #[arg(long, env = "MM_LISTEN", default_value = "127.0.0.1:8765")]
    listen: SocketAddr,
    /// A service (trusted) key; repeat for several. From the environment: comma-separated.
    #[arg(
        long = "service-key",
        env = "MM_SERVICE_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    service_keys: Vec<String>,
    /// A client (untrusted) key; repeatable.
    #[arg(
        long = "client-key",
        env = "MM_CLIENT_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    client_keys: Vec<String>,
    /// A monitor key (a service that also receives a copy of all traffic); repeatable.
    #[arg(
        long = "monitor-key",
        env = "MM_MONITOR_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    monitor_keys: Vec<String>,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, env = "MM_LOG_LEVEL", default_value = "info")]
    log_level: log::LevelFilter,
    /// Largest protocol message in bytes (e.g. 1MiB); larger closes with 1009.
    #[arg(long, default_value = "1MiB", value_parser = parse_bytes)]
    max_message_bytes: usize,
    /// Longest line in bytes; longer closes with 1009.
    #[arg(long, default_value = "8KiB", value_parser = parse_bytes)]
    max_line_bytes: usize,
    /// Most header lines in one message; more closes with 1002.
    #[arg(long, default_value_t = 64)]
    max_header_lines: usize,
    /// Most simultaneous connections; beyond it new ones get HTTP 503.
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
    /// Most subscriptions per connection (its private channel not counted).
    #[arg(long, default_value_t = 10_000)]
    max_subscriptions: usize,
    /// Bytes queued for one peer before it is closed as a slow consumer (1008).
    #[arg(long, default_value = "4MiB", value_parser = parse_bytes)]
    max_outbound_bytes: usize,
    /// Time allowed for the WebSocket upgrade and the key.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    handshake_timeout: Duration,
    /// How often the server pings a quiet connection.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    ping_interval: Duration,
    /// A connection silent this long is closed.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// How long a request may stay unanswered.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    request_timeout: Duration,
    /// How long shutdown waits for queued messages to flush.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    shutdown_grace: Duration,
    /// Echo mode for WebSocket compliance testing: no keys, every message is echoed.
    #[arg(long)]
    echo: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = simple_logger::SimpleLogger::new()
        .with_level(cli.log_level)
        .with_utc_timestamps()
        .init()
    {
        eprintln!("middleman: cannot set up logging: {e}");
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("middleman: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let mut keys = Keys {
        service: nonempty(cli.service_keys),
        client: nonempty(cli.client_keys),
        monitor: nonempty(cli.monitor_keys),
    };
    let loopback = cli.listen.ip().is_loopback();
    if cli.echo {
        if !loopback {
            return Err(format!(
                "echo mode has no keys and only listens on loopback, not {}",
                cli.listen
            ));
        }
    } else if keys.is_empty() {
        if !loopback {
            return Err(format!(
                "no keys configured: refusing to listen on non-loopback {} with generated keys \
                 (pass --service-key and --client-key, or MM_SERVICE_KEY / MM_CLIENT_KEY)",
                cli.listen
            ));
        }
        keys.service.push(generate_key()?);
        keys.client.push(generate_key()?);
        println!("No keys configured; generated for this run (loopback only):");
        println!("  service key: {}", keys.service[0]);
        println!("  client key:  {}", keys.client[0]);
    }
    let cfg = Config {
        listen: cli.listen,
        keys,
        limits: Limits {
            max_message: cli.max_message_bytes,
            max_line: cli.max_line_bytes,
            max_headers: cli.max_header_lines,
        },
        max_connections: cli.max_connections,
        max_subscriptions: cli.max_subscriptions,
        max_outbound_bytes: cli.max_outbound_bytes,
        handshake_timeout: cli.handshake_timeout,
        ping_interval: cli.ping_interval,
        idle_timeout: cli.idle_timeout,
        request_timeout: cli.request_timeout,
        shutdown_grace: cli.shutdown_grace,
        echo: cli.echo,
        handle_signals: true,
    };
    raise_fd_limit(cfg.max_connections);
    let server =
        Server::bind(cfg.clone()).map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
    log::info!(
        "middleman {} listening on ws://{}{} ({} service, {} client, {} monitor keys; \
         max message {} B, max connections {}, outbound cap {} B)",
        env!("CARGO_PKG_VERSION"),
        server.local_addr(),
        if cfg.echo { " in echo mode" } else { "" },
        cfg.keys.service.len(),
        cfg.keys.client.len(),
        cfg.keys.monitor.len(),
        cfg.limits.max_message,
        cfg.max_connections,
        cfg.max_outbound_bytes,
    );
    server.run().map_err(|e| format!("event loop failed: {e}"))
}

fn nonempty(keys: Vec<String>) -> Vec<String> {
    keys.into_iter()
        .map(|k| k.trim().to_owned())
        .filter(|k| !k.is_empty())
        .collect()
}

/// A random 24-character key of letters and digits.
fn generate_key() -> Result<String, String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for key generation: {e}"))?;
    Ok(bytes
        .iter()
        .map(|b| ALPHABET[(*b as usize) % ALPHABET.len()] as char)
        .collect())
}

/// Raise the soft open-file limit towards the hard one so `max_connections` fits.
fn raise_fd_limit(want: usize) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let target = (want as libc::rlim_t + 64).min(lim.rlim_max);
        if lim.rlim_cur < target {
            lim.rlim_cur = target;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                log::warn!("could not raise the open-file limit to {target}");
            }
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    if (lim.rlim_cur as usize) < want + 64 {
        log::warn!(
            "open-file limit {} is below --max-connections {want}; accepts may fail with EMFILE",
            lim.rlim_cur
        );
    }
}
