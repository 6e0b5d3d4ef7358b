//! Command-line arguments of the server (`middleman [OPTIONS]`) and how they become a
//! [`Config`](crate::Config), merged with the configuration file (`--config`) under the
//! precedence command line > environment > file > defaults.

use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args};

use crate::broker::Keys;
use crate::config::listen::Listen;
use crate::config::{parse_bytes, parse_duration, ClusterConfig, Config, Secret};
use crate::config_file::{self, Effective, Source};
use crate::protocol::Limits;

/// Options of the server itself.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Configuration file (TOML; see middleman.example.toml). Command-line options and
    /// MM_* environment variables override its values.
    #[arg(long, env = "MM_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Check the configuration (file, environment, command line), print the effective
    /// configuration with keys, passwords and tokens redacted, and exit: 0 if valid, 1
    /// if not. The TLS certificate and key of wss:// listeners are loaded and must belong
    /// together.
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
    /// Lame duck (SIGUSR2, `middleman lameduck`): stop accepting, then close the open
    /// connections (1001) spread evenly over this time, then exit.
    #[arg(long, env = "MM_LAME_DUCK_DURATION", default_value = "30s", value_parser = parse_duration)]
    pub lame_duck_duration: Duration,
    /// Echo mode for WebSocket compliance testing: no keys, every message is echoed.
    #[arg(long)]
    pub echo: bool,
    /// Let several middleman processes listen on the same port (SO_REUSEPORT; Linux
    /// spreads connections over them).
    #[arg(
        long,
        env = "MM_REUSE_PORT",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub reuse_port: bool,
    /// Join a cluster through this nats-server, `nats://HOST:PORT` (port defaults to
    /// 4222); repeat for several, tried in turn. From the environment: comma-separated.
    #[arg(long, env = "MM_CLUSTER", value_delimiter = ',', value_name = "URL")]
    pub cluster: Vec<String>,
    /// Cluster name: the subject prefix shared by the nodes of one cluster (1 to 32 of
    /// A-Z a-z 0-9 _ -).
    #[arg(long, env = "MM_CLUSTER_NAME", default_value = "mm")]
    pub cluster_name: String,
    /// User name for nats-server (with --cluster-password).
    #[arg(long, env = "MM_CLUSTER_USER")]
    pub cluster_user: Option<String>,
    /// Password for nats-server (with --cluster-user).
    #[arg(
        long,
        env = "MM_CLUSTER_PASSWORD",
        hide_env_values = true,
        value_parser = |s: &str| Ok::<_, String>(Secret(s.to_owned()))
    )]
    pub cluster_password: Option<Secret>,
    /// File holding the token for nats-server (its content, trimmed).
    #[arg(long, env = "MM_CLUSTER_TOKEN_FILE", value_name = "FILE")]
    pub cluster_token_file: Option<PathBuf>,
    /// Bytes waiting for nats-server beyond which messages for other nodes are dropped.
    #[arg(long, env = "MM_CLUSTER_MAX_PENDING", default_value = "64MiB", value_parser = parse_bytes)]
    pub cluster_max_pending: usize,
    /// A cluster node unheard for this long is taken as gone.
    #[arg(long, env = "MM_CLUSTER_NODE_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    pub cluster_node_timeout: Duration,
    /// A name for this node, shown beside its id in /stats and /console (1 to 64 of
    /// A-Z a-z 0-9 . _ -).
    #[arg(long, env = "MM_CLUSTER_NODE_NAME", value_name = "NAME")]
    pub cluster_node_name: Option<String>,
}

impl ServeArgs {
    /// The cluster settings these arguments describe, with or without a URL; the token
    /// file is not read (`token` is None).
    pub fn cluster_settings(&self) -> ClusterConfig {
        let given = |s: &Option<String>| s.clone().filter(|s| !s.trim().is_empty());
        ClusterConfig {
            urls: nonempty(&self.cluster),
            name: self.cluster_name.trim().to_owned(),
            user: given(&self.cluster_user).map(|u| u.trim().to_owned()),
            password: given(&self.cluster_password.as_ref().map(|p| p.0.clone())),
            token: None,
            max_pending: self.cluster_max_pending,
            node_timeout: self.cluster_node_timeout,
            node_name: given(&self.cluster_node_name).map(|n| n.trim().to_owned()),
            history_storage: Default::default(),
        }
    }

    /// The configuration these arguments describe (keys as given, none generated; a
    /// cluster only with a URL, without the token of `--cluster-token-file`).
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
            lame_duck_duration: self.lame_duck_duration,
            echo: self.echo,
            handle_signals: true,
            cluster: Some(self.cluster_settings()).filter(|c| !c.urls.is_empty()),
            reuse_port: self.reuse_port,
            history: Default::default(),
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
        let source = |id: &str| match matches.value_source(id) {
            Some(ValueSource::CommandLine) => Source::CommandLine,
            Some(ValueSource::EnvVariable) => Source::Env,
            _ => Source::Default,
        };
        // merge() takes the cluster settings of the command line, environment and
        // defaults whole, URL or not: the file may give the URL and these the rest.
        let mut cluster = self.cluster_settings();
        if let Some(p) = &self.cluster_token_file {
            let token = config_file::read_token(p).map_err(|e| {
                format!("cluster.token_file ({}): {e}", source("cluster_token_file"))
            })?;
            cluster.token = Some(token);
        }
        let cfg = Config {
            cluster: Some(cluster),
            ..self.to_config()
        };
        let mut eff = config_file::merge(cfg, self.log_level, file.as_ref(), source);
        config_file::validate(&eff)?;
        eff.tls = config_file::load_tls(&eff)?;
        Ok(eff)
    }
}

fn nonempty(keys: &[String]) -> Vec<String> {
    keys.iter()
        .map(|k| k.trim().to_owned())
        .filter(|k| !k.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches, Parser};

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    /// Parse a command line as the binary does (the environment is read too: tests
    /// set no MM_CLUSTER* variable).
    fn effective(args: &[&str]) -> Result<Effective, String> {
        let matches = Cli::command()
            .try_get_matches_from(std::iter::once("middleman").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        let cli = Cli::from_arg_matches(&matches).map_err(|e| e.to_string())?;
        cli.serve.effective(&matches)
    }

    /// A service key and a client key (one argument each), as every cluster node needs.
    const KEYS: [&str; 2] = ["--service-key=svc-k1", "--client-key=cli-k1"];

    #[test]
    fn cluster_options_over_the_file() {
        let dir = std::env::temp_dir().join(format!("mm-args-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("m.toml");
        std::fs::write(
            &conf,
            "reuse_port = true\n[cluster]\nnats = \"nats://h:4000\"\nname = \"from-file\"\n\
             user = \"file-user\"\npassword = \"file-pw\"\nmax_pending = \"1MiB\"\n\
             node_name = \"file-node\"\n\
             [[keys]]\nrole = \"service\"\nkey = \"file-svc\"\n\
             [[keys]]\nrole = \"client\"\nkey = \"file-cli\"\n",
        )
        .unwrap();
        std::fs::write(dir.join("cli.token"), "cli-token-91ab\n").unwrap();
        let conf_s = conf.to_str().unwrap();

        // The file alone.
        let eff = effective(&["--config", conf_s]).unwrap();
        let cl = eff.cfg.cluster.as_ref().unwrap();
        assert_eq!(cl.name, "from-file");
        assert_eq!(eff.source("cluster.name"), Source::File(4));
        assert_eq!(cl.node_name.as_deref(), Some("file-node"));
        assert_eq!(eff.source("cluster.node_name"), Source::File(8));
        assert!(eff.cfg.reuse_port);

        // The command line over the file, setting by setting.
        let token = dir.join("cli.token");
        let eff = effective(&[
            "--config",
            conf_s,
            "--cluster-name",
            "from-cli",
            "--cluster",
            "nats://a:1,nats://b",
            "--cluster-token-file",
            token.to_str().unwrap(),
            "--cluster-node-timeout",
            "10s",
            "--cluster-node-name",
            "cli-node.2",
        ])
        .unwrap();
        let cl = eff.cfg.cluster.as_ref().unwrap();
        assert_eq!(cl.name, "from-cli");
        assert_eq!(eff.source("cluster.name"), Source::CommandLine);
        assert_eq!(cl.urls, ["nats://a:1", "nats://b"]);
        assert_eq!(cl.token.as_deref(), Some("cli-token-91ab"));
        assert_eq!(cl.node_timeout, Duration::from_secs(10));
        assert_eq!(cl.node_name.as_deref(), Some("cli-node.2"));
        assert_eq!(eff.source("cluster.node_name"), Source::CommandLine);
        assert_eq!(cl.max_pending, 1 << 20);
        assert_eq!(cl.user.as_deref(), Some("file-user"));
        assert_eq!(cl.password.as_deref(), Some("file-pw"));

        // No URL anywhere: no cluster; the defaults otherwise.
        let eff = effective(&["--cluster-name", "x"]).unwrap();
        assert!(eff.cfg.cluster.is_none() && !eff.cfg.reuse_port);
        let eff = effective(&[
            "--cluster",
            "nats://127.0.0.1",
            "--reuse-port",
            KEYS[0],
            KEYS[1],
        ])
        .unwrap();
        let cl = eff.cfg.cluster.as_ref().unwrap();
        assert_eq!((cl.name.as_str(), cl.max_pending), ("mm", 64 << 20));
        assert_eq!(cl.node_timeout, Duration::from_secs(3));
        assert_eq!(cl.node_name, None);
        assert!(eff.cfg.reuse_port);

        // Errors name the setting and where it came from.
        let e = effective(&["--cluster", "http://h"]).unwrap_err();
        assert!(e.starts_with("cluster.nats (command line): "), "{e}");
        let e = effective(&["--cluster", "nats://h", "--cluster-name", "a.b"]).unwrap_err();
        assert!(e.starts_with("cluster.name (command line): "), "{e}");
        let e = effective(&["--cluster-token-file", "/nonexistent/t"]).unwrap_err();
        assert!(
            e.starts_with("cluster.token_file (command line): cannot read /nonexistent/t"),
            "{e}"
        );
        let e = effective(&["--cluster", "nats://h", "--cluster-user", "u"]).unwrap_err();
        assert!(e.starts_with("cluster.user (command line): "), "{e}");

        // A password given on the command line is in none of the Debug print-outs.
        let args = [
            "middleman",
            "--cluster",
            "nats://h",
            "--cluster-user",
            "u",
            KEYS[0],
            KEYS[1],
        ];
        let args = [&args[..], &["--cluster-password", "cli-pw-77e0"]].concat();
        let matches = Cli::command().try_get_matches_from(args).unwrap();
        let cli = Cli::from_arg_matches(&matches).unwrap();
        let eff = cli.serve.effective(&matches).unwrap();
        let cl = eff.cfg.cluster.as_ref().unwrap();
        assert_eq!(cl.password.as_deref(), Some("cli-pw-77e0"));
        let printed = format!("{cli:?} {eff:?} {}", config_file::render(&eff));
        assert!(!printed.contains("cli-pw-77e0"), "{printed}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_cluster_refuses_generated_keys() {
        // --cluster with no key anywhere: the keys would be generated, one pair per node.
        let e = effective(&["--cluster", "nats://127.0.0.1:4222"]).unwrap_err();
        assert!(
            e.starts_with(
                "cluster.nats (command line): no keys configured: refusing to join a cluster \
                 with generated keys"
            ),
            "{e}"
        );
        assert!(
            e.contains("every node of a cluster needs the same service and client keys"),
            "{e}"
        );
        // The same from a file's [cluster] nats, named by file and line.
        let dir = std::env::temp_dir().join(format!("mm-args-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("m.toml");
        std::fs::write(&conf, "[cluster]\nnats = \"nats://127.0.0.1\"\n").unwrap();
        let conf_s = conf.to_str().unwrap();
        let e = effective(&["--config", conf_s]).unwrap_err();
        assert!(
            e.starts_with(&format!("cluster.nats ({conf_s}:2): no keys configured")),
            "{e}"
        );
        // Configured keys (here on the command line) are what a cluster needs.
        let eff = effective(&["--config", conf_s, KEYS[0], KEYS[1]]).unwrap();
        assert!(eff.cfg.cluster.is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_node_name_is_checked_where_it_is_used() {
        // A node name without a cluster is unused (a warning, not an error), and a bad
        // one is refused only where it would be used.
        let eff = effective(&["--cluster-node-name", "lonely"]).unwrap();
        assert!(eff.cfg.cluster.is_none());
        let w = config_file::warnings(&eff);
        assert!(
            w.iter()
                .any(|w| w.starts_with("cluster.node_name (command line) given without")),
            "{w:?}"
        );
        let e = effective(&["--cluster", "nats://h", "--cluster-node-name", "a b"]).unwrap_err();
        assert!(
            e.starts_with(
                "cluster.node_name (command line): \"a b\" is not a node name (1 to 64 of \
                 A-Z a-z 0-9 . _ -)"
            ),
            "{e}"
        );
    }
}
