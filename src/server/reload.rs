//! Reloading the configuration (SIGHUP; `middleman reload --pid PID`; systemd's
//! `ExecReload=`): read the same sources again (the file, its key files, the TLS files;
//! the command line and the environment as they were at start), check everything as
//! `--check-config` does, then apply it all in one step on the loop's thread (no
//! connection is handled while it applies, so none sees half of it), or apply nothing
//! and log why. Signals that arrive together are one reload: at most one per pass.
//!
//! What applies, and from when:
//! - keys: new logins use the new keys at once; a connection whose key (or its role) is
//!   gone is closed with 1008 `key revoked`. Connections are matched by the role and the
//!   [`KeyDigest`] of the key they logged in with, never the key itself.
//! - TLS: new handshakes use the new certificate chain; open TLS connections go on with
//!   the session they have.
//! - limits and timeouts: every connection from the next pass (the message, line and
//!   header limits of each decoder and WebSocket context are replaced; a lowered
//!   outbound cap is checked at the next write to a connection, nobody is cut at once).
//! - `[[history]]` and `max_history_bytes`: [`Broker::reconfigure_history`] (stored
//!   messages stay where a rule still matches, same epoch); in a cluster
//!   [`Broker::reconfigure_cluster_history`] (the JetStream stream takes the new limits,
//!   same epoch).
//!
//! What needs a restart (listeners, `reuse_port`, `[cluster]`, `log_level`) is named in
//! a warning and left as it is; the rest is applied all the same.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use tungstenite::protocol::WebSocketConfig;

use crate::broker::{KeyDigest, Role, Settings};
use crate::config::Config;
use crate::config_file::{self, Effective};
use crate::core::websocket::WsLimits;
use crate::metrics::{unix_ms, CloseReason};

use super::{Phase, Server};

/// Reads the configuration again, from the same sources as at start.
pub type ReloadSource = Box<dyn FnMut() -> Result<Effective, String>>;

/// How to reload, and what the configuration in effect came from.
pub(super) struct Reloader {
    source: Option<ReloadSource>,
    /// The log level set at start (the logger cannot change it later).
    log_level: Option<log::LevelFilter>,
    /// A digest of the TLS files in effect, to tell whether a reload changed them.
    tls_files: u64,
}

impl Reloader {
    pub(super) fn new(cfg: &Config) -> Reloader {
        Reloader {
            source: None,
            log_level: None,
            tls_files: tls_files(cfg),
        }
    }
}

/// FNV-1a, 64 bits: stable from run to run and node to node, for the configuration hash
/// (which tells two configurations apart; it protects nothing).
fn fnv(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}
const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

fn tls_files(cfg: &Config) -> u64 {
    let mut h = FNV_START;
    for p in [&cfg.tls_cert, &cfg.tls_key].into_iter().flatten() {
        h = fnv(h, &std::fs::read(p).unwrap_or_default());
    }
    h
}

/// The hash shown on `/stats` and `/console`: every setting (keys as their number per
/// role only: the hash is public, and a hash over keys would let anyone test guesses
/// against it) and the certificate chain, 16 hex digits.
pub(super) fn config_hash(cfg: &Config) -> String {
    let mut h = fnv(FNV_START, format!("{cfg:?}").as_bytes());
    if let Some(p) = &cfg.tls_cert {
        h = fnv(h, &std::fs::read(p).unwrap_or_default());
    }
    format!("{h:016x}")
}

/// tungstenite's settings (it writes our control frames; our reader reads) and the
/// limits on what a client sends after the key is accepted, and before (the key only).
pub(super) fn ws_configs(cfg: &Config) -> (WebSocketConfig, WsLimits, WsLimits) {
    // tungstenite reads nothing, so its read buffer is never allocated.
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(0)
        .write_buffer_size(0);
    // A WebSocket message may hold one protocol message of the maximum size plus a
    // line of slack; a larger frame is refused from its header, before it is read.
    let ws_max = if cfg.echo {
        64 << 20
    } else {
        cfg.limits.max_message + cfg.limits.max_line
    };
    let key_max = if cfg.echo { ws_max } else { cfg.max_key_bytes };
    let open = WsLimits {
        max_message: ws_max,
        max_frames: cfg.max_fragments,
    };
    let key = WsLimits {
        max_message: key_max,
        ..open
    };
    (ws_config, open, key)
}

/// What echo mode raises (Autobahn's 16 MiB messages of up to 65,536 fragments).
pub(super) fn echo_settings(cfg: &mut Config) {
    if cfg.echo {
        cfg.max_outbound_bytes = cfg.max_outbound_bytes.max(256 << 20);
        cfg.max_fragments = cfg.max_fragments.max(1 << 20);
    }
}

/// The broker's share of the configuration.
pub(super) fn broker_settings(cfg: &Config) -> Settings {
    Settings {
        max_subscriptions: cfg.max_subscriptions,
        request_timeout: cfg.request_timeout,
        max_pending_requests: cfg.max_pending_requests,
        max_reqid_bytes: cfg.max_reqid_bytes,
    }
}

/// Settings a reload cannot change, by name, that differ between `old` and `new`; each
/// is put back to its value in `old`.
fn keep_restart_only(old: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut held = Vec::new();
    let shown = |c: &Config| -> Vec<String> { c.listeners.iter().map(|l| l.to_string()).collect() };
    if shown(old) != shown(new) {
        held.push("listen");
    }
    if old.reuse_port != new.reuse_port {
        held.push("reuse_port");
    }
    if old.echo != new.echo {
        held.push("echo");
    }
    match (&old.cluster, &new.cluster) {
        (None, None) => {}
        (Some(_), None) | (None, Some(_)) => held.push("cluster.nats"),
        (Some(a), Some(b)) => {
            for (name, differs) in [
                ("cluster.nats", a.urls != b.urls),
                ("cluster.name", a.name != b.name),
                ("cluster.user", a.user != b.user),
                ("cluster.password", a.password != b.password),
                ("cluster.token_file", a.token != b.token),
                ("cluster.max_pending", a.max_pending != b.max_pending),
                ("cluster.node_timeout", a.node_timeout != b.node_timeout),
                ("cluster.node_name", a.node_name != b.node_name),
                (
                    "cluster.history_storage",
                    a.history_storage != b.history_storage,
                ),
            ] {
                if differs {
                    held.push(name);
                }
            }
        }
    }
    new.listeners.clone_from(&old.listeners);
    new.reuse_port = old.reuse_port;
    new.echo = old.echo;
    new.cluster.clone_from(&old.cluster);
    new.handle_signals = old.handle_signals;
    held
}

/// The settings that differ, as `name old -> new` (never a key: keys are counted).
fn changes(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut num = |name: &str, a: usize, b: usize| {
        if a != b {
            out.push(format!("{name} {a} -> {b}"));
        }
    };
    num(
        "limits.max_message_bytes",
        old.limits.max_message,
        new.limits.max_message,
    );
    num(
        "limits.max_line_bytes",
        old.limits.max_line,
        new.limits.max_line,
    );
    num(
        "limits.max_header_lines",
        old.limits.max_headers,
        new.limits.max_headers,
    );
    num(
        "limits.max_connections",
        old.max_connections,
        new.max_connections,
    );
    num(
        "limits.max_subscriptions",
        old.max_subscriptions,
        new.max_subscriptions,
    );
    num(
        "limits.max_outbound_bytes",
        old.max_outbound_bytes,
        new.max_outbound_bytes,
    );
    num(
        "limits.max_read_per_turn",
        old.max_read_per_turn,
        new.max_read_per_turn,
    );
    num(
        "limits.max_messages_per_turn",
        old.max_messages_per_turn,
        new.max_messages_per_turn,
    );
    num("limits.max_fragments", old.max_fragments, new.max_fragments);
    num("limits.max_key_bytes", old.max_key_bytes, new.max_key_bytes);
    num(
        "limits.max_pending_requests",
        old.max_pending_requests,
        new.max_pending_requests,
    );
    num(
        "limits.max_reqid_bytes",
        old.max_reqid_bytes,
        new.max_reqid_bytes,
    );
    num(
        "limits.max_handshakes",
        old.max_handshakes,
        new.max_handshakes,
    );
    num(
        "limits.max_handshakes_per_ip",
        old.max_handshakes_per_ip,
        new.max_handshakes_per_ip,
    );
    num(
        "limits.max_unanswered_pings",
        old.max_unanswered_pings,
        new.max_unanswered_pings,
    );
    num(
        "limits.max_history_bytes",
        old.history.max_bytes,
        new.history.max_bytes,
    );
    let mut dur = |name: &str, a: Duration, b: Duration| {
        if a != b {
            out.push(format!("{name} {a:?} -> {b:?}"));
        }
    };
    dur(
        "timeouts.handshake",
        old.handshake_timeout,
        new.handshake_timeout,
    );
    dur(
        "timeouts.ping_interval",
        old.ping_interval,
        new.ping_interval,
    );
    dur("timeouts.idle", old.idle_timeout, new.idle_timeout);
    dur("timeouts.request", old.request_timeout, new.request_timeout);
    dur(
        "timeouts.shutdown_grace",
        old.shutdown_grace,
        new.shutdown_grace,
    );
    if old.history.rules != new.history.rules {
        out.push(format!(
            "history {} -> {} rule(s)",
            old.history.rules.len(),
            new.history.rules.len()
        ));
    }
    for (name, a, b) in [
        ("tls_cert", &old.tls_cert, &new.tls_cert),
        ("tls_key", &old.tls_key, &new.tls_key),
    ] {
        if a != b {
            out.push(format!("{name} {a:?} -> {b:?}"));
        }
    }
    type Digests = HashSet<(Role, KeyDigest)>;
    let (was, now): (Digests, Digests) = (
        old.keys.digests().into_iter().collect(),
        new.keys.digests().into_iter().collect(),
    );
    for role in ["service", "client", "monitor"] {
        let count =
            |a: &Digests, b: &Digests| a.difference(b).filter(|(r, _)| r.name() == role).count();
        let (added, removed) = (count(&now, &was), count(&was, &now));
        if added + removed > 0 {
            out.push(format!("{role} keys +{added} -{removed}"));
        }
    }
    out
}

impl Server {
    /// Reload from `source` on SIGHUP (the binary gives the command line, environment
    /// and file it started with); `log_level` is the level set at start, which a reload
    /// cannot change.
    pub fn reload_from(&mut self, log_level: log::LevelFilter, source: ReloadSource) {
        self.reloader.source = Some(source);
        self.reloader.log_level = Some(log_level);
    }

    /// Read the configuration again and apply it whole, or nothing (SIGHUP).
    pub(super) fn reload(&mut self, now: Instant) {
        if self.shutdown_deadline.is_some() {
            info!("reload: ignored, shutting down");
            return;
        }
        let Some(source) = self.reloader.source.as_mut() else {
            warn!("reload: this server has no configuration source to read again");
            return;
        };
        let took = Instant::now();
        let eff = match source() {
            Ok(eff) => eff,
            Err(e) => {
                self.metrics.reloads[1] += 1;
                // One line (a TOML error quotes the offending line below its position).
                let e: Vec<&str> = e.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
                error!(
                    "reload refused, the configuration in effect is unchanged: {}",
                    e.join(" ")
                );
                return;
            }
        };
        let mut new = eff.cfg.clone();
        echo_settings(&mut new);
        let mut held = keep_restart_only(&self.cfg, &mut new);
        if self.reloader.log_level.is_some_and(|l| l != eff.log_level) {
            held.push("log_level");
        }
        // The TLS pair is used only while a wss:// listener is (listeners stay).
        let tls = match (&self.tls, eff.tls.clone()) {
            (Some(_), Some(t)) => Some(t),
            (Some(_), None) => {
                // The new file has no wss:// listener; the old ones stay, and so does
                // their certificate.
                new.tls_cert.clone_from(&self.cfg.tls_cert);
                new.tls_key.clone_from(&self.cfg.tls_key);
                self.tls.clone()
            }
            (None, _) => None,
        };
        for w in config_file::warnings(&eff) {
            warn!("reload: {w}");
        }
        if !held.is_empty() {
            warn!(
                "reload: {} changed but cannot change without a restart: kept as at start \
                 (the other settings are applied)",
                held.join(", ")
            );
        }
        let mut changed = changes(&self.cfg, &new);
        let tls_files = tls_files(&new);
        if tls.is_some() && tls_files != self.reloader.tls_files {
            changed.push("TLS certificate and key reloaded".into());
        }
        self.apply(new, tls, now);
        self.reloader.tls_files = tls_files;
        self.metrics.reloads[0] += 1;
        self.metrics.config = (unix_ms(), config_hash(&self.cfg));
        info!(
            "configuration reloaded{} in {:.1} ms (hash {}): {}",
            eff.file
                .as_ref()
                .map_or(String::new(), |p| format!(" from {}", p.display())),
            took.elapsed().as_secs_f64() * 1000.0,
            self.metrics.config.1,
            if changed.is_empty() {
                "nothing changed".to_owned()
            } else {
                changed.join(", ")
            }
        );
    }

    /// Put `new` in force (checked, restart-only settings as they are).
    fn apply(&mut self, new: Config, tls: Option<Arc<rustls::ServerConfig>>, now: Instant) {
        let keys: HashSet<_> = new.keys.digests().into_iter().collect();
        (self.ws_config, self.ws_limits, self.ws_limits_key) = ws_configs(&new);
        self.tls = tls;
        self.broker.settings = broker_settings(&new);
        match &new.cluster {
            None => self.broker.reconfigure_history(&new.history),
            Some(cc) => {
                self.broker
                    .reconfigure_cluster_history(&new.history, cc.history_storage, now)
            }
        }
        let limits = new.limits;
        self.cfg = new;
        let mut revoked = Vec::new();
        for (id, c) in self.conns.iter_mut() {
            if let Some(dec) = c.dec.as_mut() {
                dec.set_limits(limits);
            }
            if c.phase == Phase::Open && c.key.is_some_and(|k| !keys.contains(&k)) {
                revoked.push(id);
            }
        }
        if !revoked.is_empty() {
            info!(
                "reload: closing {} connection(s) whose key was removed",
                revoked.len()
            );
        }
        for id in revoked {
            self.close_with(id, 1008, "key revoked", now, CloseReason::BadKey);
        }
    }
}
