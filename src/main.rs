//! The `middleman` binary: parse the command line, set up logging, run the server.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use middleman::args::ServeArgs;
use middleman::cli;
use middleman::config_file::{self, Effective};
use middleman::Server;

/// A low-latency publish/subscribe and request/response server over WebSocket.
///
/// Without a subcommand it serves. With no key configured, a service key and a client
/// key are generated and printed once at start (only allowed on a loopback address, and
/// not in a cluster, whose nodes need the same keys).
#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

/// Client subcommands (exit codes: 0 ok, 1 server error for the command or request,
/// 2 usage, 3 connection or authentication failure, 4 timeout).
#[derive(Subcommand, Debug)]
enum Cmd {
    /// Subscribe to topics and print each message on one line.
    Sub(cli::SubArgs),
    /// Publish one message.
    Pub(cli::PubArgs),
    /// Make a request and print the answer.
    Req(cli::ReqArgs),
    /// Answer requests for a target (a responder for trying things out).
    Reply(cli::ReplyArgs),
    /// Show who is subscribed to a topic (a service key; protocol 1.1).
    Presence(cli::PresenceArgs),
    /// Close a connection by its cid, with code 4000 (a service key; protocol 1.1).
    Kick(cli::KickArgs),
    /// Make a running server read its configuration again (sends it SIGHUP; the same
    /// as `kill -HUP PID` or `systemctl reload middleman`).
    Reload(cli::PidArgs),
    /// Put a running server in lame duck (SIGUSR2): it stops accepting, closes its
    /// connections spread over --lame-duck-duration, then exits.
    Lameduck(cli::LameDuckArgs),
    /// Load tool: measure a running server (middleman or nats-server) over WebSocket.
    Bench(middleman::bench::Args),
}

fn main() -> ExitCode {
    // The raw matches tell, for each option, whether it came from the command line, the
    // environment or a default: a configuration file value replaces only a default.
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let Some(cmd) = cli.cmd {
        return match cmd {
            Cmd::Sub(a) => cli::sub(a),
            Cmd::Pub(a) => cli::publish(a),
            Cmd::Req(a) => cli::request(a),
            Cmd::Reply(a) => cli::reply(a),
            Cmd::Presence(a) => cli::presence(a),
            Cmd::Kick(a) => cli::kick(a),
            Cmd::Reload(a) => cli::reload(a),
            Cmd::Lameduck(a) => cli::lameduck(a),
            Cmd::Bench(args) => middleman::bench::run(args),
        };
    }
    let args = cli.serve;
    let eff = match args.effective(&matches) {
        Ok(eff) => eff,
        Err(e) => {
            eprintln!("middleman: invalid configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.check_config {
        print!("{}", config_file::render(&eff));
        for w in config_file::warnings(&eff) {
            println!("# warning: {w}");
        }
        println!("# configuration is valid");
        return ExitCode::SUCCESS;
    }
    // Other crates log at most at debug: tungstenite's trace lines carry frame payloads,
    // and the first payload of every connection is its key.
    if let Err(e) = simple_logger::SimpleLogger::new()
        .with_level(eff.log_level.min(log::LevelFilter::Debug))
        .with_module_level("middleman", eff.log_level)
        .with_utc_timestamps()
        .init()
    {
        eprintln!("middleman: cannot set up logging: {e}");
    }
    for w in config_file::warnings(&eff) {
        log::warn!("{w}");
    }
    // A reload (SIGHUP) reads the same sources again: the file named at start, and the
    // command line and environment as they were then (kept in `matches`).
    let source = move || args.effective(&matches);
    match run(eff, Box::new(source)) {
        Ok(()) => ExitCode::SUCCESS,
        // Printed, not logged as well (that said it twice): on stderr, like the
        // configuration errors above, and seen even with log_level = "off".
        Err(e) => {
            eprintln!("middleman: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(
    eff: Effective,
    mut source: Box<dyn FnMut() -> Result<Effective, String>>,
) -> Result<(), String> {
    let mut cfg = eff.cfg;
    // validate() has refused generated keys on a non-loopback address and in a cluster.
    let generated = !cfg.echo && cfg.keys.is_empty();
    if generated {
        let keys = &mut cfg.keys;
        keys.service.push(generate_key()?);
        keys.client.push(generate_key()?);
        // The one place a key is ever printed: keys this server made up for this run.
        println!("No keys configured; generated for this run (loopback only):");
        println!("  service key: {}", keys.service[0]);
        println!("  client key:  {}", keys.client[0]);
    }
    raise_fd_limit(cfg.max_connections + cfg.max_handshakes);
    let wanted: Vec<String> = cfg.listeners.iter().map(ToString::to_string).collect();
    let mut server = Server::bind(cfg.clone())
        .map_err(|e| format!("cannot listen on {}: {e}", wanted.join(" ")))?;
    // Keys generated for this run stay theirs while the configuration still has none.
    let generated_keys = generated.then(|| cfg.keys.clone());
    server.reload_from(
        eff.log_level,
        Box::new(move || {
            let mut eff = source()?;
            if let Some(keys) = generated_keys.as_ref().filter(|_| eff.cfg.keys.is_empty()) {
                eff.cfg.keys = keys.clone();
            }
            Ok(eff)
        }),
    );
    let bound: Vec<String> = server.listeners().iter().map(ToString::to_string).collect();
    log::info!(
        "middleman {} listening on {}{} (config {}; keys: {} service, {} client, {} monitor{}; \
         limits: message {} B, line {} B, {} header lines, {} connections, {} subscriptions, \
         outbound {} B; timeouts: handshake {:?}, ping {:?}, idle {:?}, request {:?}, \
         shutdown grace {:?}, lame duck {:?}; HTTP: /healthz /metrics /stats /console)",
        env!("CARGO_PKG_VERSION"),
        bound.join(" "),
        if cfg.echo { " in echo mode" } else { "" },
        eff.file
            .as_ref()
            .map_or("none".to_owned(), |p| p.display().to_string()),
        cfg.keys.service.len(),
        cfg.keys.client.len(),
        cfg.keys.monitor.len(),
        if generated { ", generated" } else { "" },
        cfg.limits.max_message,
        cfg.limits.max_line,
        cfg.limits.max_headers,
        cfg.max_connections,
        cfg.max_subscriptions,
        cfg.max_outbound_bytes,
        cfg.handshake_timeout,
        cfg.ping_interval,
        cfg.idle_timeout,
        cfg.request_timeout,
        cfg.shutdown_grace,
        cfg.lame_duck_duration,
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
            "open-file limit {} is below --max-connections + --max-handshakes ({want}); accepts may fail with EMFILE",
            lim.rlim_cur
        );
    }
}
