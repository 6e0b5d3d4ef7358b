//! `middleman bench`: a load tool over real WebSocket connections (in the spirit of
//! `nats bench`), for middleman and, with `--proto nats`, for nats-server's WebSocket
//! listener, so both are measured with the same client.
//! With a `tcp://` URL it speaks middleman's raw stream protocol instead, so the two
//! transports are measured with the same client too.
//!
//! Scenarios: `fanout` (S subscribers, one publisher, or P publishers with S subscribers
//! each), `reqres` (C requesters with a window of W, K responders), `conns` (N idle
//! authenticated connections), and `floor` (no server: the same fan-out, fixed-load or
//! throughput, through a relay process that only copies bytes, i.e. the latency and the
//! deliveries per CPU-second this machine allows).
//! Fan-out has load shapes, named on the result line as `shape=`: `window256` (the
//! default: at most 256 messages ahead of the slowest subscriber, 16 per write),
//! `pipeline16k` (`--write-kib 16`: 16 KiB of messages per
//! write, up to `--inflight` deliveries not yet received), `fixed10k` (`--rate 10000`:
//! a fixed offered load, reporting the server's CPU utilisation and latency), and
//! with `--publishers P`, `pubsPxS-...` (P publishers, one topic each). Throughput
//! is reported per wall second and, given `--server-pid`, per server CPU-second (read
//! from `/proc/PID/stat`), next to the tool's own CPU time so a saturated client shows.
//!
//! The client side uses a few threads, each running one `mio` poll over its share of
//! the connections, with reused buffers. Every message carries its sequence number and
//! send time (nanoseconds on the tool's monotonic clock) at the start of its body, so
//! receivers count losses, reordering and end-to-end latency.

mod floor;
mod run;
pub mod stats;
pub mod ws;

use std::process::ExitCode;
use std::time::Duration;

use crate::config::{parse_bytes, parse_duration};
pub use ws::Proto;

/// `middleman bench SCENARIO [options]`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// What to measure.
#[derive(clap::Subcommand, Debug)]
pub enum Scenario {
    /// S subscribers, one publisher: deliveries/s, latency, lost and out-of-order counts.
    Fanout(FanoutArgs),
    /// C requesters with W requests in flight each, K responders.
    Reqres(ReqresArgs),
    /// N idle authenticated connections: connect+auth latency, server RSS per connection.
    Conns(ConnsArgs),
    /// No server: what this machine allows a fan-out (publisher, a relay process that
    /// only copies bytes, receivers; loopback TCP): latency at a fixed load (--rate), or
    /// deliveries per relay CPU-second in the fan-out load shapes.
    ///
    /// The relay copies each read to every subscriber socket: no framing, parsing or
    /// routing. With --rate R: one message per write on a schedule, as `fanout --rate`.
    /// Without: throughput with `fanout`'s flow control (--batch messages per write at
    /// most --window ahead of the slowest subscriber, or with --write-kib as many
    /// messages as fit per write and at most --inflight deliveries not yet received),
    /// reported as `deliveries_per_server_cpu_s=` of the relay's CPU.
    ///
    /// What differs from `fanout`: a message is --size bytes on the wire (no WebSocket
    /// frame, no protocol header or subject), so a --write-kib write holds more messages
    /// (256 of 64 B in 16 KiB). The relay never drops or queues: a write that finds a
    /// subscriber socket full finishes blocking (counted as `relay_full=`); the
    /// publisher's flow control is what keeps that rare.
    Floor(FloorArgs),
    /// The relay process of `floor` (started by it; not for direct use).
    #[command(hide = true)]
    FloorRelay(FloorRelayArgs),
}

/// Options every scenario takes.
#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// Server URL: `ws://HOST:PORT/PATH`, or `tcp://HOST:PORT` for middleman's raw
    /// stream protocol (no WebSocket framing; `--proto mm` only).
    #[arg(long, default_value = "ws://127.0.0.1:8765/")]
    pub url: String,
    /// middleman service key (ignored for NATS).
    #[arg(long, env = "MM_SERVICE_KEY", default_value = "")]
    pub key: String,
    /// Protocol spoken by the server.
    #[arg(long, value_enum, default_value = "mm")]
    pub proto: Proto,
    /// Where subscribers (`fanout`) and responders (`reqres`) connect, when not to
    /// --url: e.g. another node of a cluster, so every delivery crosses the backplane.
    /// When it differs from --url the run starts with a ready probe (see --ready-probe).
    #[arg(long)]
    pub sub_url: Option<String>,
    /// Before measuring, publish probes until one reaches every subscriber (`fanout`)
    /// or a probe request is answered (`reqres`), within --setup-timeout; probes are
    /// not counted. Always on when --sub-url differs from --url; give it when
    /// subscriptions need time to reach the publisher's node another way (e.g. nodes
    /// sharing a port with --reuse-port).
    #[arg(long)]
    pub ready_probe: bool,
    /// The server's process id: report its CPU time (and RSS for `conns`). Repeat it
    /// (or give a comma-separated list) to charge several processes, e.g. every node
    /// of a cluster and its nats-server: their CPU times (and RSS) are summed.
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Client threads receiving (each polls its share of the connections).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Subject / topic name.
    #[arg(long, default_value = "bench")]
    pub subject: String,
    /// Longest time to wait for set-up steps (connect, auth, subscribe).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub setup_timeout: Duration,
}

/// `bench fanout`.
#[derive(clap::Args, Debug, Clone)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,
    /// Subscribers (per publisher's topic when --publishers is more than 1).
    #[arg(long, short = 's', default_value_t = 1)]
    pub subs: usize,
    /// Publishers, each on its own connection and topic (`SUBJECT.0`, `SUBJECT.1`, ...
    /// when more than one), each with --subs subscribers of its own; sequence numbers,
    /// losses and reordering are per publisher.
    #[arg(long, short = 'p', default_value_t = 1)]
    pub publishers: usize,
    /// Messages to publish, per publisher (0: until --duration).
    #[arg(long, short = 'n', default_value_t = 0)]
    pub msgs: u64,
    /// Publish for this long (when --msgs is 0, or whichever comes first).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Body size in bytes (at least 34: sequence number and timestamp).
    #[arg(long, default_value = "64", value_parser = parse_bytes)]
    pub size: usize,
    /// Fixed load: messages per second per publisher, one per write (0: as fast as the
    /// flow control allows). The result line reports the rate achieved, whether it was
    /// held, and the server's CPU use as a fraction of one core.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Most messages a publisher may be ahead of the slowest subscriber of its topic
    /// (unless --inflight is given).
    #[arg(long, default_value_t = 256)]
    pub window: u64,
    /// Messages per write when not rate-limited (unless --write-kib is given).
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Deep pipeline: each write carries as many whole messages as fit in this many KiB
    /// (at least one), instead of --batch messages. The in-flight bound becomes
    /// --inflight deliveries (100000 unless given).
    #[arg(long, default_value_t = 0)]
    pub write_kib: usize,
    /// Bound the deliveries published but not yet received by subscribers (all
    /// publishers together) instead of the per-publisher --window of messages.
    #[arg(long, default_value_t = 0)]
    pub inflight: u64,
    /// Put each batch in one WebSocket message (both protocols allow several protocol
    /// messages per WebSocket message; NATS WebSocket clients send that way) instead of
    /// one WebSocket message per published message.
    #[arg(long)]
    pub pack: bool,
}

/// `bench reqres`.
#[derive(clap::Args, Debug, Clone)]
pub struct ReqresArgs {
    #[command(flatten)]
    pub common: Common,
    /// Requesters.
    #[arg(long, short = 'c', default_value_t = 10)]
    pub requesters: usize,
    /// Requests in flight per requester.
    #[arg(long, short = 'w', default_value_t = 16)]
    pub window: u32,
    /// Responders.
    #[arg(long, short = 'k', default_value_t = 2)]
    pub responders: usize,
    /// Requests in total (0: until --duration).
    #[arg(long, short = 'n', default_value_t = 0)]
    pub msgs: u64,
    /// Issue requests for this long (when --msgs is 0, or whichever comes first).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Body size in bytes (at least 34).
    #[arg(long, default_value = "64", value_parser = parse_bytes)]
    pub size: usize,
}

/// `bench conns`.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnsArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections to open and hold.
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub conns: usize,
    /// How long to hold them before measuring the server's RSS.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub hold: Duration,
}

/// `bench floor`: a fan-out with the server replaced by a relay process that copies
/// each read to every subscriber socket (no framing, parsing or routing).
///
/// With `--rate R`: the topology of `fanout --rate R` (one message per write on a
/// schedule), for latency. Without (`--rate 0`, the default): throughput in the
/// fan-out load shapes, the same options as `fanout` (`--window`/`--batch`, or
/// `--write-kib` with `--inflight`), reporting `deliveries_per_server_cpu_s` against
/// the relay's CPU. What differs from `fanout`: a message is `--size` bytes on the wire
/// (no WebSocket frame, no protocol header or subject), so a `--write-kib` write holds
/// more messages than `fanout`'s does (256 of 64 B in 16 KiB); the publisher's flow
/// control is the same (at most `--window` messages ahead of the slowest subscriber,
/// or at most `--inflight` deliveries not yet received), and it is what keeps the
/// relay from overrunning a subscriber: the relay never drops or queues, a full
/// subscriber socket holds it in a blocking write (counted as `relay_full=`).
#[derive(clap::Args, Debug, Clone)]
pub struct FloorArgs {
    /// Subscriber sockets the relay writes each message to.
    #[arg(long, short = 's', default_value_t = 1)]
    pub subs: usize,
    /// Fixed load: messages per second, one per write (0: throughput, as fast as the
    /// flow control allows).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Publish for this long.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Message size in bytes (at least 16: sequence number and timestamp).
    #[arg(long, default_value = "64", value_parser = parse_bytes)]
    pub size: usize,
    /// Receiver threads (each polls its share of the subscriber sockets).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Throughput: most messages the publisher may be ahead of the slowest subscriber
    /// (unless --inflight is given).
    #[arg(long, default_value_t = 256)]
    pub window: u64,
    /// Throughput: messages per write (unless --write-kib is given).
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Throughput, deep pipeline: each write carries as many whole messages as fit in
    /// this many KiB; the in-flight bound becomes --inflight deliveries (100000 unless
    /// given).
    #[arg(long, default_value_t = 0)]
    pub write_kib: usize,
    /// Throughput: bound the deliveries published but not yet received instead of the
    /// --window of messages.
    #[arg(long, default_value_t = 0)]
    pub inflight: u64,
}

/// `bench floor-relay`: connect to `floor`'s listener once for the input and once per
/// subscriber, relay until the input ends, print the CPU time used.
#[derive(clap::Args, Debug, Clone)]
pub struct FloorRelayArgs {
    /// The `floor` process's listener, `127.0.0.1:PORT`.
    #[arg(long)]
    pub connect: std::net::SocketAddr,
    /// Subscriber connections to make.
    #[arg(long)]
    pub subs: usize,
    /// Exit after this many seconds whatever happens.
    #[arg(long, default_value_t = 60)]
    pub limit_secs: u64,
}

impl Common {
    /// The subscribers' / responders' URL: --sub-url, or --url.
    pub fn sub_url(&self) -> &str {
        self.sub_url.as_deref().unwrap_or(&self.url)
    }

    /// Subscribers / responders connect somewhere else than the publishers / requesters.
    pub fn split(&self) -> bool {
        self.sub_url() != self.url
    }

    /// Whether the run starts with a ready probe.
    pub fn probe(&self) -> bool {
        self.ready_probe || self.split()
    }
}

/// Run a scenario; prints a report and a final `result:` line of `key=value` pairs.
/// Exit status 1 when anything was lost or reordered or the run failed.
pub fn run(args: Args) -> ExitCode {
    let res = match args.scenario {
        Scenario::Fanout(a) => run::fanout(&a),
        Scenario::Reqres(a) => run::reqres(&a),
        Scenario::Conns(a) => run::conns(&a),
        Scenario::Floor(a) => floor::floor(&a),
        Scenario::FloorRelay(a) => floor::relay_process(&a),
    };
    match res {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("middleman bench: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        scenario: Scenario,
    }

    fn common(args: &[&str]) -> Common {
        let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        match cli.scenario {
            Scenario::Fanout(a) => a.common,
            Scenario::Reqres(a) => a.common,
            Scenario::Conns(a) => a.common,
            Scenario::Floor(_) | Scenario::FloorRelay(_) => panic!("no common options"),
        }
    }

    #[test]
    fn server_pid_repeats_and_sub_url_defaults_to_url() {
        let c = common(&["t", "fanout", "--server-pid", "7", "--server-pid", "9"]);
        assert_eq!(c.server_pid, vec![7, 9]);
        assert_eq!(c.sub_url(), c.url);
        assert!(!c.split() && !c.probe());

        let c = common(&["t", "reqres", "--server-pid", "1,2,3"]);
        assert_eq!(c.server_pid, vec![1, 2, 3]);
        assert!(common(&["t", "conns"]).server_pid.is_empty());

        let c = common(&[
            "t",
            "fanout",
            "--url",
            "ws://127.0.0.1:1/",
            "--sub-url",
            "ws://127.0.0.1:2/",
        ]);
        assert_eq!(c.sub_url(), "ws://127.0.0.1:2/");
        assert!(c.split() && c.probe());

        // The same URL given twice is not a split; --ready-probe alone asks for a probe.
        let c = common(&["t", "fanout", "--sub-url", "ws://127.0.0.1:8765/"]);
        assert!(!c.split() && !c.probe());
        assert!(common(&["t", "fanout", "--ready-probe"]).probe());
    }
}
