//! The `middleman` binary: parse the command line, set up logging, run the server.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use middleman::args::ServeArgs;
use middleman::Server;

/// A low-latency publish/subscribe and request/response server over WebSocket.
///
/// Without a subcommand it serves. With no key configured, a service key and a client
/// key are generated and printed once at start (only allowed on a loopback address).
#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Load tool: measure a running server (middleman or nats-server) over WebSocket.
    Bench(middleman::bench::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(cmd) = cli.cmd {
        match cmd {
            Cmd::Bench(args) => return middleman::bench::run(args),
        }
    }
    let cli = cli.serve;
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

fn run(cli: ServeArgs) -> Result<(), String> {
    let mut cfg = cli.to_config();
    let keys = &mut cfg.keys;
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
