//! The configuration file (`--config middleman.toml`): parsing with line numbers, merging
//! under the precedence command line > environment > file > defaults, validation, and the
//! redacted print-out of `--check-config`.
//!
//! ```toml
//! listen = ["ws://127.0.0.1:8765", "tcp://127.0.0.1:8764?roles=service"]  # or one string
//! log_level = "info"
//! reuse_port = false               # SO_REUSEPORT on the listeners
//!
//! [[keys]]
//! role = "service"                 # service, client or monitor
//! key_file = "secrets/service.key" # one key per line; or: key = "..."
//!
//! [limits]
//! max_message_bytes = "1MiB"
//!
//! [timeouts]
//! idle = "60s"
//!
//! [cluster]
//! nats = ["nats://127.0.0.1:4222"] # or one string; no URL: no cluster
//! token_file = "secrets/nats.token"
//! node_name = "eu-1"                # shown beside the node's id in /stats
//! ```

use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::config::listen::Listen;
use crate::config::{
    is_cluster_name, is_node_name, parse_bytes, parse_duration, parse_nats_url, Config, Secret,
};

/// Where an effective value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The built-in default.
    Default,
    /// The configuration file, at this line (1-based).
    File(usize),
    /// An `MM_*` environment variable.
    Env,
    /// The command line.
    CommandLine,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File(line) => write!(f, "file, line {line}"),
            Source::Env => f.write_str("environment"),
            Source::CommandLine => f.write_str("command line"),
        }
    }
}

// ------------------------------------------------------------------ raw file schema

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFile {
    listen: Option<Spanned<toml::Value>>,
    tls_cert: Option<Spanned<String>>,
    tls_key: Option<Spanned<String>>,
    log_level: Option<Spanned<String>>,
    reuse_port: Option<Spanned<bool>>,
    #[serde(default)]
    keys: Vec<Spanned<RawKey>>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    cluster: RawCluster,
    #[serde(default)]
    history: Vec<Spanned<RawHistory>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHistory {
    prefix: Spanned<String>,
    size: Option<Spanned<toml::Value>>,
    ttl: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    role: Spanned<String>,
    key: Option<Spanned<String>>,
    key_file: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_message_bytes: Option<Spanned<toml::Value>>,
    max_line_bytes: Option<Spanned<toml::Value>>,
    max_header_lines: Option<Spanned<toml::Value>>,
    max_connections: Option<Spanned<toml::Value>>,
    max_subscriptions: Option<Spanned<toml::Value>>,
    max_outbound_bytes: Option<Spanned<toml::Value>>,
    max_read_per_turn: Option<Spanned<toml::Value>>,
    max_messages_per_turn: Option<Spanned<toml::Value>>,
    max_fragments: Option<Spanned<toml::Value>>,
    max_key_bytes: Option<Spanned<toml::Value>>,
    max_pending_requests: Option<Spanned<toml::Value>>,
    max_reqid_bytes: Option<Spanned<toml::Value>>,
    max_handshakes: Option<Spanned<toml::Value>>,
    max_handshakes_per_ip: Option<Spanned<toml::Value>>,
    max_unanswered_pings: Option<Spanned<toml::Value>>,
    max_history_bytes: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    handshake: Option<Spanned<toml::Value>>,
    ping_interval: Option<Spanned<toml::Value>>,
    idle: Option<Spanned<toml::Value>>,
    request: Option<Spanned<toml::Value>>,
    shutdown_grace: Option<Spanned<toml::Value>>,
    lame_duck: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    nats: Option<Spanned<toml::Value>>,
    name: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
    password: Option<Spanned<String>>,
    token_file: Option<Spanned<String>>,
    max_pending: Option<Spanned<toml::Value>>,
    node_timeout: Option<Spanned<toml::Value>>,
    node_name: Option<Spanned<String>>,
    history_storage: Option<Spanned<String>>,
}

// ------------------------------------------------------------------ parsed file

/// A value from the file and the line it is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct At<T> {
    /// The value.
    pub value: T,
    /// 1-based line number.
    pub line: usize,
}

/// Keys of one role, and where they came from (for the print-out; never the keys).
#[derive(Debug, Clone, Default)]
pub struct FileKeys {
    /// The keys.
    pub keys: Vec<String>,
    /// One entry per key: where it came from ("line 12" or "key_file x, line 12").
    pub origins: Vec<String>,
}

/// A configuration file, parsed and checked; key files read.
#[derive(Debug, Clone, Default)]
pub struct FileConfig {
    /// The file's path as given.
    pub path: PathBuf,
    /// `listen`: one listener URL or a list of them.
    pub listen: Option<At<Vec<Listen>>>,
    /// `tls_cert` (relative to the file's folder).
    pub tls_cert: Option<At<Option<PathBuf>>>,
    /// `tls_key` (relative to the file's folder).
    pub tls_key: Option<At<Option<PathBuf>>>,
    /// `log_level`.
    pub log_level: Option<At<log::LevelFilter>>,
    /// `reuse_port` (top level, beside `listen`: it applies to every listener).
    pub reuse_port: Option<At<bool>>,
    /// `[[keys]]` with `role = "service"`.
    pub service_keys: FileKeys,
    /// `[[keys]]` with `role = "client"`.
    pub client_keys: FileKeys,
    /// `[[keys]]` with `role = "monitor"`.
    pub monitor_keys: FileKeys,
    /// `[limits] max_message_bytes`.
    pub max_message_bytes: Option<At<usize>>,
    /// `[limits] max_line_bytes`.
    pub max_line_bytes: Option<At<usize>>,
    /// `[limits] max_header_lines`.
    pub max_header_lines: Option<At<usize>>,
    /// `[limits] max_connections`.
    pub max_connections: Option<At<usize>>,
    /// `[limits] max_subscriptions`.
    pub max_subscriptions: Option<At<usize>>,
    /// `[limits] max_outbound_bytes`.
    pub max_outbound_bytes: Option<At<usize>>,
    /// `[limits] max_read_per_turn`.
    pub max_read_per_turn: Option<At<usize>>,
    /// `[limits] max_messages_per_turn`.
    pub max_messages_per_turn: Option<At<usize>>,
    /// `[limits] max_fragments`.
    pub max_fragments: Option<At<usize>>,
    /// `[limits] max_key_bytes`.
    pub max_key_bytes: Option<At<usize>>,
    /// `[limits] max_pending_requests`.
    pub max_pending_requests: Option<At<usize>>,
    /// `[limits] max_reqid_bytes`.
    pub max_reqid_bytes: Option<At<usize>>,
    /// `[limits] max_handshakes`.
    pub max_handshakes: Option<At<usize>>,
    /// `[limits] max_handshakes_per_ip`.
    pub max_handshakes_per_ip: Option<At<usize>>,
    /// `[limits] max_unanswered_pings`.
    pub max_unanswered_pings: Option<At<usize>>,
    /// `[limits] max_history_bytes`.
    pub max_history_bytes: Option<At<usize>>,
    /// `[[history]]` tables, in file order (line of the first).
    pub history: Option<At<Vec<crate::core::history::HistoryRule>>>,
    /// `[timeouts] handshake`.
    pub handshake_timeout: Option<At<Duration>>,
    /// `[timeouts] ping_interval`.
    pub ping_interval: Option<At<Duration>>,
    /// `[timeouts] idle`.
    pub idle_timeout: Option<At<Duration>>,
    /// `[timeouts] request`.
    pub request_timeout: Option<At<Duration>>,
    /// `[timeouts] shutdown_grace`.
    pub shutdown_grace: Option<At<Duration>>,
    /// `[timeouts] lame_duck`.
    pub lame_duck_duration: Option<At<Duration>>,
    /// `[cluster] nats`: one nats-server URL or a list of them (trimmed, checked).
    pub cluster_nats: Option<At<Vec<String>>>,
    /// `[cluster] name`.
    pub cluster_name: Option<At<String>>,
    /// `[cluster] user`.
    pub cluster_user: Option<At<Option<String>>>,
    /// `[cluster] password`.
    pub cluster_password: Option<At<Secret>>,
    /// `[cluster] token_file` (relative to the file's folder), read: the token.
    pub cluster_token: Option<At<Secret>>,
    /// `[cluster] max_pending`.
    pub cluster_max_pending: Option<At<usize>>,
    /// `[cluster] node_timeout`.
    pub cluster_node_timeout: Option<At<Duration>>,
    /// `[cluster] history_storage`.
    pub cluster_history_storage: Option<At<crate::cluster::history::Storage>>,
    /// `[cluster] node_name` (trimmed, checked).
    pub cluster_node_name: Option<At<Option<String>>>,
}

/// The token in a token file: its content, trimmed; an empty one is an error.
pub fn read_token(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("{} holds no token", path.display()));
    }
    Ok(token.to_owned())
}

/// 1-based (line, column) of a byte offset.
fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(src.len());
    while !src.is_char_boundary(end) {
        end -= 1;
    }
    let before = &src[..end];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

/// The dotted key whose line this is (`timeouts.idle`), from the line's text and the
/// nearest table header above it.
fn key_on_line(src: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = src.lines().collect();
    let text = lines.get(line.checked_sub(1)?)?.trim();
    let header = |l: &str| {
        let l = l.trim();
        l.starts_with('[')
            .then(|| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned())
    };
    if let Some(h) = header(text) {
        return Some(h);
    }
    let key = text.split_once('=')?.0.trim().trim_matches('"').to_owned();
    let table = lines[..line - 1].iter().rev().find_map(|l| header(l));
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key,
    })
}

/// Read and check a configuration file.
pub fn load(path: &Path) -> Result<FileConfig, String> {
    let src = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read configuration file {}: {e}", path.display()))?;
    parse(&src, path)
}

/// The file being parsed, for errors that point into it.
struct Src<'a> {
    text: &'a str,
    name: String,
}

impl Src<'_> {
    /// An error at a place in the file: "file:line:col: key: message" and the line itself.
    fn err_at(&self, span: Range<usize>, key: Option<&str>, msg: &str) -> String {
        let (line, col) = line_col(self.text, span.start);
        let key = key
            .map(str::to_owned)
            .or_else(|| key_on_line(self.text, line));
        let mut s = format!("{}:{line}:{col}: ", self.name);
        if let Some(k) = key {
            let _ = write!(s, "{k}: ");
        }
        s.push_str(msg.trim_end());
        if let Some(text) = self.text.lines().nth(line - 1) {
            let _ = write!(s, "\n  {line:>4} | {text}");
        }
        s
    }

    fn line_of(&self, span: Range<usize>) -> usize {
        line_col(self.text, span.start).0
    }

    /// `value` found at `span`, with its line.
    fn at<T>(&self, span: Range<usize>, value: T) -> At<T> {
        At {
            value,
            line: self.line_of(span),
        }
    }

    /// One string or a list of strings, not empty (`what`: the kind of URL, for errors;
    /// `empty`: what to say of an empty list).
    fn strings<'v>(
        &self,
        v: &'v Spanned<toml::Value>,
        key: &str,
        what: &str,
        empty: &str,
    ) -> Result<Vec<&'v str>, String> {
        let bad = |msg: &str| self.err_at(v.span(), Some(key), msg);
        let list: Vec<&str> = match v.get_ref() {
            toml::Value::String(one) => vec![one.as_str()],
            toml::Value::Array(many) => many
                .iter()
                .map(|v| v.as_str().ok_or_else(|| bad("expected a list of strings")))
                .collect::<Result<_, _>>()?,
            _ => return Err(bad(&format!("expected {what} or a list of them"))),
        };
        if list.is_empty() {
            return Err(bad(empty));
        }
        Ok(list)
    }

    /// A setting read by `read` from a TOML value, if present.
    fn value<T>(
        &self,
        v: &Option<Spanned<toml::Value>>,
        key: &str,
        read: impl FnOnce(&toml::Value) -> Result<T, String>,
    ) -> Result<Option<At<T>>, String> {
        let Some(v) = v else { return Ok(None) };
        let value = read(v.get_ref()).map_err(|e| self.err_at(v.span(), Some(key), &e))?;
        Ok(Some(self.at(v.span(), value)))
    }

    fn size(
        &self,
        v: &Option<Spanned<toml::Value>>,
        key: &str,
    ) -> Result<Option<At<usize>>, String> {
        self.value(v, key, |v| match v {
            toml::Value::Integer(n) => usize::try_from(*n).map_err(|_| "negative size".to_owned()),
            toml::Value::String(s) => parse_bytes(s),
            other => Err(format!(
                "expected a size like 1048576 or \"1MiB\", found {}",
                other.type_str()
            )),
        })
    }

    fn count(
        &self,
        v: &Option<Spanned<toml::Value>>,
        key: &str,
    ) -> Result<Option<At<usize>>, String> {
        self.value(v, key, |v| match v {
            toml::Value::Integer(n) => {
                usize::try_from(*n).map_err(|_| "negative number".to_owned())
            }
            other => Err(format!("expected an integer, found {}", other.type_str())),
        })
    }

    fn duration(
        &self,
        v: &Option<Spanned<toml::Value>>,
        key: &str,
    ) -> Result<Option<At<Duration>>, String> {
        self.value(v, key, |v| match v {
            toml::Value::Integer(n) => u64::try_from(*n)
                .map(Duration::from_secs)
                .map_err(|_| "negative duration".to_owned()),
            toml::Value::String(s) => parse_duration(s),
            other => Err(format!(
                "expected a duration like \"30s\" or \"500ms\", found {}",
                other.type_str()
            )),
        })
    }
}

/// Parse and check configuration text; `path` names it in errors and anchors relative
/// `key_file` paths (they are relative to the file's directory).
pub fn parse(src: &str, path: &Path) -> Result<FileConfig, String> {
    let f = Src {
        text: src,
        name: path.display().to_string(),
    };
    let raw: RawFile = toml::from_str(src).map_err(|e| match e.span() {
        Some(span) => f.err_at(span, None, e.message()),
        None => format!("{}: {}", f.name, e.message().trim_end()),
    })?;
    let mut out = FileConfig {
        path: path.to_owned(),
        ..Default::default()
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    parse_top(&f, &raw, dir, &mut out)?;
    parse_keys(&f, &raw, dir, &mut out)?;
    parse_limits(&f, &raw, &mut out)?;
    parse_cluster(&f, &raw.cluster, dir, &mut out)?;
    parse_history(&f, &raw, &mut out)?;
    Ok(out)
}

/// The top-level settings: listeners, TLS files, log level, reuse_port.
fn parse_top(f: &Src<'_>, raw: &RawFile, dir: &Path, out: &mut FileConfig) -> Result<(), String> {
    if let Some(l) = &raw.listen {
        let urls = f.strings(l, "listen", "a listener URL", "names no listener")?;
        let value = urls
            .iter()
            .map(|u| u.parse::<Listen>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                f.err_at(
                    l.span(),
                    Some("listen"),
                    &format!("{e} (expected e.g. \"ws://127.0.0.1:8765\")"),
                )
            })?;
        out.listen = Some(f.at(l.span(), value));
    }
    for (name, raw_path, dst) in [
        ("tls_cert", &raw.tls_cert, &mut out.tls_cert),
        ("tls_key", &raw.tls_key, &mut out.tls_key),
    ] {
        if let Some(p) = raw_path {
            if p.get_ref().trim().is_empty() {
                return Err(f.err_at(p.span(), Some(name), "empty path"));
            }
            *dst = Some(f.at(p.span(), Some(dir.join(p.get_ref().trim()))));
        }
    }
    if let Some(l) = &raw.log_level {
        let value = l
            .get_ref()
            .trim()
            .parse::<log::LevelFilter>()
            .map_err(|_| {
                f.err_at(
                    l.span(),
                    Some("log_level"),
                    "expected one of off, error, warn, info, debug, trace",
                )
            })?;
        out.log_level = Some(f.at(l.span(), value));
    }
    if let Some(r) = &raw.reuse_port {
        out.reuse_port = Some(f.at(r.span(), *r.get_ref()));
    }
    Ok(())
}

/// The `[[keys]]` tables: a key given inline or a file of keys, per role.
fn parse_keys(f: &Src<'_>, raw: &RawFile, dir: &Path, out: &mut FileConfig) -> Result<(), String> {
    for (i, entry) in raw.keys.iter().enumerate() {
        let here = format!("keys[{i}]");
        let k = entry.get_ref();
        let role = k.role.get_ref().trim();
        let bucket = match role {
            "service" => &mut out.service_keys,
            "client" => &mut out.client_keys,
            "monitor" => &mut out.monitor_keys,
            _ => {
                return Err(f.err_at(
                    k.role.span(),
                    Some(&format!("{here}.role")),
                    "expected \"service\", \"client\" or \"monitor\"",
                ))
            }
        };
        match (&k.key, &k.key_file) {
            (Some(key), None) => {
                let v = key.get_ref().trim();
                if v.is_empty() {
                    return Err(f.err_at(key.span(), Some(&format!("{here}.key")), "empty key"));
                }
                bucket.keys.push(v.to_owned());
                bucket
                    .origins
                    .push(format!("line {}", f.line_of(key.span())));
            }
            (None, Some(file)) => {
                let p = dir.join(file.get_ref().trim());
                let text = std::fs::read_to_string(&p).map_err(|e| {
                    f.err_at(
                        file.span(),
                        Some(&format!("{here}.key_file")),
                        &format!("cannot read {}: {e}", p.display()),
                    )
                })?;
                let before = bucket.keys.len();
                for l in text.lines().map(str::trim) {
                    if !l.is_empty() && !l.starts_with('#') {
                        bucket.keys.push(l.to_owned());
                        bucket.origins.push(format!(
                            "key_file {}, line {}",
                            p.display(),
                            f.line_of(file.span())
                        ));
                    }
                }
                if bucket.keys.len() == before {
                    return Err(f.err_at(
                        file.span(),
                        Some(&format!("{here}.key_file")),
                        &format!(
                            "{} holds no key (one key per line; # starts a comment)",
                            p.display()
                        ),
                    ));
                }
            }
            (Some(_), Some(_)) | (None, None) => {
                return Err(f.err_at(
                    entry.span(),
                    Some(&here),
                    "give exactly one of key = \"...\" or key_file = \"path\"",
                ));
            }
        }
    }
    Ok(())
}

/// `[limits]` and `[timeouts]`.
fn parse_limits(f: &Src<'_>, raw: &RawFile, out: &mut FileConfig) -> Result<(), String> {
    let l = &raw.limits;
    out.max_message_bytes = f.size(&l.max_message_bytes, "limits.max_message_bytes")?;
    out.max_line_bytes = f.size(&l.max_line_bytes, "limits.max_line_bytes")?;
    out.max_header_lines = f.count(&l.max_header_lines, "limits.max_header_lines")?;
    out.max_connections = f.count(&l.max_connections, "limits.max_connections")?;
    out.max_subscriptions = f.count(&l.max_subscriptions, "limits.max_subscriptions")?;
    out.max_outbound_bytes = f.size(&l.max_outbound_bytes, "limits.max_outbound_bytes")?;
    out.max_read_per_turn = f.size(&l.max_read_per_turn, "limits.max_read_per_turn")?;
    out.max_messages_per_turn =
        f.count(&l.max_messages_per_turn, "limits.max_messages_per_turn")?;
    out.max_fragments = f.count(&l.max_fragments, "limits.max_fragments")?;
    out.max_key_bytes = f.size(&l.max_key_bytes, "limits.max_key_bytes")?;
    out.max_pending_requests = f.count(&l.max_pending_requests, "limits.max_pending_requests")?;
    out.max_reqid_bytes = f.size(&l.max_reqid_bytes, "limits.max_reqid_bytes")?;
    out.max_handshakes = f.count(&l.max_handshakes, "limits.max_handshakes")?;
    out.max_handshakes_per_ip =
        f.count(&l.max_handshakes_per_ip, "limits.max_handshakes_per_ip")?;
    out.max_unanswered_pings = f.count(&l.max_unanswered_pings, "limits.max_unanswered_pings")?;
    let t = &raw.timeouts;
    out.handshake_timeout = f.duration(&t.handshake, "timeouts.handshake")?;
    out.ping_interval = f.duration(&t.ping_interval, "timeouts.ping_interval")?;
    out.idle_timeout = f.duration(&t.idle, "timeouts.idle")?;
    out.request_timeout = f.duration(&t.request, "timeouts.request")?;
    out.shutdown_grace = f.duration(&t.shutdown_grace, "timeouts.shutdown_grace")?;
    out.lame_duck_duration = f.duration(&t.lame_duck, "timeouts.lame_duck")?;
    Ok(())
}

/// Messages a `[[history]]` table keeps per topic unless it says (`size`).
pub const DEFAULT_HISTORY_SIZE: usize = 100;
/// How long unless it says (`ttl`).
pub const DEFAULT_HISTORY_TTL: Duration = Duration::from_secs(3600);

/// `[[history]]` tables and `[limits] max_history_bytes`.
fn parse_history(f: &Src<'_>, raw: &RawFile, out: &mut FileConfig) -> Result<(), String> {
    out.max_history_bytes = f.size(&raw.limits.max_history_bytes, "limits.max_history_bytes")?;
    let mut rules: Vec<crate::core::history::HistoryRule> = Vec::new();
    for h in &raw.history {
        let h = h.get_ref();
        let prefix = h.prefix.get_ref();
        let bad = |msg: &str| f.err_at(h.prefix.span(), Some("history.prefix"), msg);
        if prefix.is_empty() || prefix.len() > 255 || prefix.bytes().any(|b| b < 0x20 || b == 0x7f)
        {
            return Err(bad(
                "expected a topic prefix (1 to 255 bytes, no control character)",
            ));
        }
        if prefix.starts_with("MSG:") || prefix.starts_with("SYS:") {
            return Err(bad("MSG: and SYS: targets keep no history"));
        }
        if rules.iter().any(|r| r.prefix == *prefix) {
            return Err(bad("this prefix has a [[history]] table already"));
        }
        let size = f.count(&h.size, "history.size")?;
        if let (Some(v), Some(at)) = (&h.size, &size) {
            if at.value == 0 {
                return Err(f.err_at(v.span(), Some("history.size"), "expected at least 1"));
            }
        }
        let ttl = f.duration(&h.ttl, "history.ttl")?;
        if let (Some(v), Some(at)) = (&h.ttl, &ttl) {
            if at.value.is_zero() {
                return Err(f.err_at(v.span(), Some("history.ttl"), "expected more than 0s"));
            }
        }
        rules.push(crate::core::history::HistoryRule {
            prefix: prefix.clone(),
            size: size.map_or(DEFAULT_HISTORY_SIZE, |a| a.value),
            ttl: ttl.map_or(DEFAULT_HISTORY_TTL, |a| a.value),
        });
    }
    if let Some(first) = raw.history.first() {
        out.history = Some(f.at(first.span(), rules));
    }
    Ok(())
}

/// `[cluster]`.
fn parse_cluster(
    f: &Src<'_>,
    c: &RawCluster,
    dir: &Path,
    out: &mut FileConfig,
) -> Result<(), String> {
    if let Some(n) = &c.nats {
        let urls = f.strings(
            n,
            "cluster.nats",
            "a nats-server URL",
            "names no nats-server (leave nats out for a node on its own)",
        )?;
        let mut value = Vec::with_capacity(urls.len());
        for u in urls {
            let u = u.trim();
            parse_nats_url(u).map_err(|e| {
                f.err_at(
                    n.span(),
                    Some("cluster.nats"),
                    &format!("{e} (expected e.g. \"nats://127.0.0.1:4222\")"),
                )
            })?;
            value.push(u.to_owned());
        }
        out.cluster_nats = Some(f.at(n.span(), value));
    }
    if let Some(n) = &c.name {
        out.cluster_name = Some(f.at(n.span(), n.get_ref().trim().to_owned()));
    }
    if let Some(u) = &c.user {
        let v = u.get_ref().trim();
        if v.is_empty() {
            return Err(f.err_at(u.span(), Some("cluster.user"), "empty user"));
        }
        out.cluster_user = Some(f.at(u.span(), Some(v.to_owned())));
    }
    if let Some(p) = &c.password {
        if p.get_ref().is_empty() {
            return Err(f.err_at(p.span(), Some("cluster.password"), "empty password"));
        }
        out.cluster_password = Some(f.at(p.span(), Secret(p.get_ref().clone())));
    }
    if let Some(file) = &c.token_file {
        if file.get_ref().trim().is_empty() {
            return Err(f.err_at(file.span(), Some("cluster.token_file"), "empty path"));
        }
        let p = dir.join(file.get_ref().trim());
        let token =
            read_token(&p).map_err(|e| f.err_at(file.span(), Some("cluster.token_file"), &e))?;
        out.cluster_token = Some(f.at(file.span(), Secret(token)));
    }
    out.cluster_max_pending = f.size(&c.max_pending, "cluster.max_pending")?;
    out.cluster_node_timeout = f.duration(&c.node_timeout, "cluster.node_timeout")?;
    if let Some(v) = &c.history_storage {
        use crate::cluster::history::Storage;
        let storage = match v.get_ref().trim() {
            "memory" => Storage::Memory,
            "file" => Storage::File,
            other => {
                return Err(f.err_at(
                    v.span(),
                    Some("cluster.history_storage"),
                    &format!("{other:?} is not \"memory\" or \"file\""),
                ))
            }
        };
        out.cluster_history_storage = Some(f.at(v.span(), storage));
    }
    if let Some(n) = &c.node_name {
        let v = n.get_ref().trim();
        if !is_node_name(v) {
            return Err(f.err_at(
                n.span(),
                Some("cluster.node_name"),
                &format!("{v:?} is not a node name ({NODE_NAME_RULE})"),
            ));
        }
        out.cluster_node_name = Some(f.at(n.span(), Some(v.to_owned())));
    }
    Ok(())
}

// ------------------------------------------------------------------ merging

/// The configuration in force, with the source of every value.
#[derive(Debug, Clone)]
pub struct Effective {
    /// The server configuration.
    pub cfg: Config,
    /// The log level.
    pub log_level: log::LevelFilter,
    /// The configuration file, if one was given.
    pub file: Option<PathBuf>,
    /// Source of each setting, by its file name (`listen`, `limits.max_line_bytes`, ...).
    pub sources: Vec<(&'static str, Source)>,
    /// Where each key came from, by role (service, client, monitor); never the keys.
    pub key_origins: [(&'static str, Vec<String>); 3],
    /// The TLS configuration of `wss://` listeners, once [`load_tls`] has loaded and
    /// checked the pair (None before, and without a `wss://` listener).
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
}

impl Effective {
    /// Source of a setting (Default if unknown).
    pub fn source(&self, name: &str) -> Source {
        self.sources
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| s.clone())
            .unwrap_or(Source::Default)
    }

    /// A setting's name and where its value came from, for errors:
    /// `tls_key (/etc/middleman/middleman.toml:7)`, `limits.max_line_bytes (command line)`.
    pub fn at(&self, name: &str) -> String {
        match self.source(name) {
            Source::File(line) => match &self.file {
                Some(p) => format!("{name} ({}:{line})", p.display()),
                None => name.to_owned(),
            },
            s => format!("{name} ({s})"),
        }
    }
}

/// Merge: `cfg` and `log_level` hold what the command line, the environment and the
/// defaults say; `arg_source(arg id)` tells which of the three each came from. A file
/// value replaces a default and nothing else.
///
/// `cfg.cluster` is taken whole, URL or not (the file may give the URL and the command
/// line the name); None stands for the defaults. In the result it is None unless a URL
/// is given somewhere.
pub fn merge(
    mut cfg: Config,
    mut log_level: log::LevelFilter,
    file: Option<&FileConfig>,
    arg_source: impl Fn(&str) -> Source,
) -> Effective {
    let mut sources = Vec::new();
    let empty = FileConfig::default();
    let f = file.unwrap_or(&empty);
    macro_rules! take {
        ($name:literal, $arg:literal, $file:expr, $dst:expr) => {
            take!($name, $arg, $file, $dst, Clone::clone)
        };
        ($name:literal, $arg:literal, $file:expr, $dst:expr, $conv:expr) => {{
            let src = arg_source($arg);
            match (&src, &$file) {
                (Source::Default, Some(at)) => {
                    $dst = $conv(&at.value);
                    sources.push(($name, Source::File(at.line)));
                }
                _ => sources.push(($name, src)),
            }
        }};
    }
    // History has no command-line flag: the file or the default.
    if let Some(at) = &f.history {
        cfg.history.rules = at.value.clone();
        sources.push(("history", Source::File(at.line)));
    }
    if let Some(at) = &f.max_history_bytes {
        cfg.history.max_bytes = at.value;
        sources.push(("limits.max_history_bytes", Source::File(at.line)));
    }
    take!("listen", "listen", f.listen, cfg.listeners);
    take!("tls_cert", "tls_cert", f.tls_cert, cfg.tls_cert);
    take!("tls_key", "tls_key", f.tls_key, cfg.tls_key);
    take!("log_level", "log_level", f.log_level, log_level);
    take!("reuse_port", "reuse_port", f.reuse_port, cfg.reuse_port);
    take!(
        "limits.max_message_bytes",
        "max_message_bytes",
        f.max_message_bytes,
        cfg.limits.max_message
    );
    take!(
        "limits.max_line_bytes",
        "max_line_bytes",
        f.max_line_bytes,
        cfg.limits.max_line
    );
    take!(
        "limits.max_header_lines",
        "max_header_lines",
        f.max_header_lines,
        cfg.limits.max_headers
    );
    take!(
        "limits.max_connections",
        "max_connections",
        f.max_connections,
        cfg.max_connections
    );
    take!(
        "limits.max_subscriptions",
        "max_subscriptions",
        f.max_subscriptions,
        cfg.max_subscriptions
    );
    take!(
        "limits.max_outbound_bytes",
        "max_outbound_bytes",
        f.max_outbound_bytes,
        cfg.max_outbound_bytes
    );
    take!(
        "limits.max_read_per_turn",
        "max_read_per_turn",
        f.max_read_per_turn,
        cfg.max_read_per_turn
    );
    take!(
        "limits.max_messages_per_turn",
        "max_messages_per_turn",
        f.max_messages_per_turn,
        cfg.max_messages_per_turn
    );
    take!(
        "limits.max_fragments",
        "max_fragments",
        f.max_fragments,
        cfg.max_fragments
    );
    take!(
        "limits.max_key_bytes",
        "max_key_bytes",
        f.max_key_bytes,
        cfg.max_key_bytes
    );
    take!(
        "limits.max_pending_requests",
        "max_pending_requests",
        f.max_pending_requests,
        cfg.max_pending_requests
    );
    take!(
        "limits.max_reqid_bytes",
        "max_reqid_bytes",
        f.max_reqid_bytes,
        cfg.max_reqid_bytes
    );
    take!(
        "limits.max_handshakes",
        "max_handshakes",
        f.max_handshakes,
        cfg.max_handshakes
    );
    take!(
        "limits.max_handshakes_per_ip",
        "max_handshakes_per_ip",
        f.max_handshakes_per_ip,
        cfg.max_handshakes_per_ip
    );
    take!(
        "limits.max_unanswered_pings",
        "max_unanswered_pings",
        f.max_unanswered_pings,
        cfg.max_unanswered_pings
    );
    take!(
        "timeouts.handshake",
        "handshake_timeout",
        f.handshake_timeout,
        cfg.handshake_timeout
    );
    take!(
        "timeouts.ping_interval",
        "ping_interval",
        f.ping_interval,
        cfg.ping_interval
    );
    take!(
        "timeouts.idle",
        "idle_timeout",
        f.idle_timeout,
        cfg.idle_timeout
    );
    take!(
        "timeouts.request",
        "request_timeout",
        f.request_timeout,
        cfg.request_timeout
    );
    take!(
        "timeouts.shutdown_grace",
        "shutdown_grace",
        f.shutdown_grace,
        cfg.shutdown_grace
    );
    take!(
        "timeouts.lame_duck",
        "lame_duck_duration",
        f.lame_duck_duration,
        cfg.lame_duck_duration
    );
    let mut cl = cfg.cluster.take().unwrap_or_default();
    let secret = |s: &Secret| Some(s.0.clone());
    take!("cluster.nats", "cluster", f.cluster_nats, cl.urls);
    take!("cluster.name", "cluster_name", f.cluster_name, cl.name);
    take!("cluster.user", "cluster_user", f.cluster_user, cl.user);
    take!(
        "cluster.password",
        "cluster_password",
        f.cluster_password,
        cl.password,
        secret
    );
    take!(
        "cluster.token_file",
        "cluster_token_file",
        f.cluster_token,
        cl.token,
        secret
    );
    take!(
        "cluster.max_pending",
        "cluster_max_pending",
        f.cluster_max_pending,
        cl.max_pending
    );
    take!(
        "cluster.node_timeout",
        "cluster_node_timeout",
        f.cluster_node_timeout,
        cl.node_timeout
    );
    take!(
        "cluster.node_name",
        "cluster_node_name",
        f.cluster_node_name,
        cl.node_name
    );
    // Like history, file only.
    if let Some(at) = &f.cluster_history_storage {
        cl.history_storage = at.value;
        sources.push(("cluster.history_storage", Source::File(at.line)));
    }
    cfg.cluster = Some(cl).filter(|c| !c.urls.is_empty());
    // Keys, per role: the command line or environment replaces the file's keys of that role.
    let mut origins: [(&'static str, Vec<String>); 3] =
        [("service", vec![]), ("client", vec![]), ("monitor", vec![])];
    for ((role, origin), (arg, dst, from_file)) in origins.iter_mut().zip([
        ("service_keys", &mut cfg.keys.service, &f.service_keys),
        ("client_keys", &mut cfg.keys.client, &f.client_keys),
        ("monitor_keys", &mut cfg.keys.monitor, &f.monitor_keys),
    ]) {
        let _ = role;
        match arg_source(arg) {
            Source::Default => {
                *dst = from_file.keys.clone();
                *origin = from_file
                    .origins
                    .iter()
                    .map(|o| format!("file, {o}"))
                    .collect();
            }
            src => *origin = vec![src.to_string(); dst.len()],
        }
    }
    Effective {
        cfg,
        log_level,
        file: file.map(|f| f.path.clone()),
        sources,
        key_origins: origins,
        tls: None,
    }
}

/// Check the effective configuration as a whole. Errors name the setting and where its
/// value came from.
pub fn validate(eff: &Effective) -> Result<(), String> {
    let c = &eff.cfg;
    let at = |name: &str| eff.at(name);
    let positive: [(&str, usize, usize); 15] = [
        ("limits.max_message_bytes", c.limits.max_message, 64),
        ("limits.max_line_bytes", c.limits.max_line, 64),
        ("limits.max_header_lines", c.limits.max_headers, 1),
        ("limits.max_connections", c.max_connections, 1),
        ("limits.max_subscriptions", c.max_subscriptions, 0),
        ("limits.max_outbound_bytes", c.max_outbound_bytes, 1024),
        ("limits.max_unanswered_pings", c.max_unanswered_pings, 1),
        ("limits.max_read_per_turn", c.max_read_per_turn, 1024),
        ("limits.max_messages_per_turn", c.max_messages_per_turn, 1),
        ("limits.max_fragments", c.max_fragments, 1),
        ("limits.max_key_bytes", c.max_key_bytes, 64),
        ("limits.max_pending_requests", c.max_pending_requests, 1),
        ("limits.max_reqid_bytes", c.max_reqid_bytes, 1),
        ("limits.max_handshakes", c.max_handshakes, 1),
        ("limits.max_handshakes_per_ip", c.max_handshakes_per_ip, 1),
    ];
    for (name, v, min) in positive {
        if v < min {
            return Err(format!("{}: {v} is below the minimum {min}", at(name)));
        }
    }
    for (name, v) in [
        ("timeouts.handshake", c.handshake_timeout),
        ("timeouts.ping_interval", c.ping_interval),
        ("timeouts.idle", c.idle_timeout),
        ("timeouts.request", c.request_timeout),
        ("timeouts.lame_duck", c.lame_duck_duration),
    ] {
        if v.is_zero() {
            return Err(format!("{}: must be more than 0", at(name)));
        }
    }
    let exposed: Vec<String> = c
        .listeners
        .iter()
        .filter(|l| !l.is_local())
        .map(ToString::to_string)
        .collect();
    if c.echo && !exposed.is_empty() {
        return Err(format!(
            "{}: echo mode has no keys and only listens on loopback, not {}",
            at("listen"),
            exposed.join(", ")
        ));
    }
    if !c.echo && c.keys.is_empty() && !exposed.is_empty() {
        return Err(format!(
            "{}: no keys configured: refusing to listen on non-loopback {} with generated \
             keys (configure [[keys]] in the file, --service-key and --client-key, or \
             MM_SERVICE_KEY / MM_CLIENT_KEY)",
            at("listen"),
            exposed.join(", ")
        ));
    }
    let wss = c
        .listeners
        .iter()
        .any(|l| l.scheme == crate::config::listen::Scheme::Wss);
    if wss && (c.tls_cert.is_none() || c.tls_key.is_none()) {
        return Err(format!(
            "{}: a wss:// listener needs tls_cert and tls_key (--tls-cert, --tls-key)",
            at("listen")
        ));
    }
    if let Some(cl) = &c.cluster {
        for u in &cl.urls {
            parse_nats_url(u).map_err(|e| format!("{}: {e}", at("cluster.nats")))?;
        }
        if !is_cluster_name(&cl.name) {
            return Err(format!(
                "{}: {:?} is not a cluster name (1 to 32 of A-Z a-z 0-9 _ -: one NATS token)",
                at("cluster.name"),
                cl.name
            ));
        }
        const MIN_PENDING: usize = 64 << 10;
        if cl.max_pending < MIN_PENDING {
            return Err(format!(
                "{}: {} is below the minimum {MIN_PENDING} (64KiB)",
                at("cluster.max_pending"),
                cl.max_pending
            ));
        }
        let (lo, hi) = (Duration::from_secs(1), Duration::from_secs(3600));
        if !(lo..=hi).contains(&cl.node_timeout) {
            return Err(format!(
                "{}: {} is not between \"1s\" and \"1h\"",
                at("cluster.node_timeout"),
                show_duration(cl.node_timeout)
            ));
        }
        match (&cl.user, &cl.password) {
            (Some(_), None) => {
                return Err(format!(
                    "{}: a user needs a password (cluster.password, --cluster-password)",
                    at("cluster.user")
                ))
            }
            (None, Some(_)) => {
                return Err(format!(
                    "{}: a password needs a user (cluster.user, --cluster-user)",
                    at("cluster.password")
                ))
            }
            _ => {}
        }
        if let Some(n) = &cl.node_name {
            if !is_node_name(n) {
                return Err(format!(
                    "{}: {n:?} is not a node name ({NODE_NAME_RULE})",
                    at("cluster.node_name")
                ));
            }
        }
        // Generated keys differ from node to node: a key would work on one node of the
        // cluster and be refused by the others, wherever a load balancer sends it.
        if !c.echo && c.keys.is_empty() {
            return Err(format!(
                "{}: no keys configured: refusing to join a cluster with generated keys \
                 (each node would make up its own, and a key would work on one node only); \
                 every node of a cluster needs the same service and client keys: give them \
                 to each node with --service-key and --client-key, MM_SERVICE_KEY / \
                 MM_CLIENT_KEY, or [[keys]] in the configuration file",
                at("cluster.nats")
            ));
        }
    }
    Ok(())
}

/// Load the certificate chain and key of the `wss://` listeners and check that they
/// belong together (None without a `wss://` listener: the files are not used then).
/// Called after [`validate`], which made sure both paths are given.
pub fn load_tls(eff: &Effective) -> Result<Option<std::sync::Arc<rustls::ServerConfig>>, String> {
    use crate::config::tls::{load_pair, TlsError};
    let c = &eff.cfg;
    let wss = c
        .listeners
        .iter()
        .any(|l| l.scheme == crate::config::listen::Scheme::Wss);
    let (true, Some(cert), Some(key)) = (wss, &c.tls_cert, &c.tls_key) else {
        return Ok(None);
    };
    load_pair(cert, key).map(Some).map_err(|e| match e {
        TlsError::Cert(m) => format!("{}: {m}", eff.at("tls_cert")),
        TlsError::Key(m) | TlsError::Mismatch(m) => format!("{}: {m}", eff.at("tls_key")),
    })
}

/// What a node name may be, for errors.
const NODE_NAME_RULE: &str = "1 to 64 of A-Z a-z 0-9 . _ -";

/// Warnings about settings that work but are probably not meant.
pub fn warnings(eff: &Effective) -> Vec<String> {
    let c = &eff.cfg;
    let mut w = Vec::new();
    if c.max_outbound_bytes < c.limits.max_message {
        w.push(format!(
            "limits.max_outbound_bytes ({}) is below limits.max_message_bytes ({}): one \
             large message closes its receiver as a slow consumer",
            c.max_outbound_bytes, c.limits.max_message
        ));
    }
    if c.ping_interval >= c.idle_timeout {
        w.push(format!(
            "timeouts.ping_interval ({}) is not below timeouts.idle ({}): quiet peers are \
             closed before they are pinged",
            show_duration(c.ping_interval),
            show_duration(c.idle_timeout)
        ));
    }
    if c.cluster.is_none() {
        let given: Vec<String> = CLUSTER_SETTINGS
            .iter()
            .filter_map(|name| match eff.source(name) {
                Source::Default => None,
                s => Some(format!("{name} ({s})")),
            })
            .collect();
        if !given.is_empty() {
            w.push(format!(
                "{} given without a nats-server URL (cluster.nats, --cluster): this node \
                 is not in a cluster",
                given.join(", ")
            ));
        }
    }
    w
}

/// The settings of `[cluster]` but `nats`, by their file names.
const CLUSTER_SETTINGS: [&str; 7] = [
    "cluster.name",
    "cluster.user",
    "cluster.password",
    "cluster.token_file",
    "cluster.max_pending",
    "cluster.node_timeout",
    "cluster.node_name",
];

// ------------------------------------------------------------------ print-out

fn show_bytes(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("\"{}MiB\"", n >> 20)
    } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
        format!("\"{}KiB\"", n >> 10)
    } else {
        n.to_string()
    }
}

fn show_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("\"{}s\"", ms / 1000)
    } else {
        format!("\"{ms}ms\"")
    }
}

/// The effective configuration as TOML, with every value's source as a comment and
/// every key redacted.
pub fn render(eff: &Effective) -> String {
    let c = &eff.cfg;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# middleman {}: effective configuration",
        env!("CARGO_PKG_VERSION")
    );
    let _ = writeln!(
        s,
        "# precedence: command line > environment > {} > defaults; keys, passwords and tokens redacted\n",
        eff.file
            .as_ref()
            .map_or("file (none given)".to_owned(), |p| p.display().to_string())
    );
    let line = |s: &mut String, name: &'static str, key: &str, value: String| {
        let text = format!("{key} = {value}");
        let _ = writeln!(s, "{text:<40} # {}", eff.source(name));
    };
    let urls: Vec<String> = c.listeners.iter().map(|l| format!("\"{l}\"")).collect();
    line(&mut s, "listen", "listen", format!("[{}]", urls.join(", ")));
    for (name, v) in [("tls_cert", &c.tls_cert), ("tls_key", &c.tls_key)] {
        if let Some(p) = v {
            line(&mut s, name, name, format!("{:?}", p.display().to_string()));
        }
    }
    line(
        &mut s,
        "log_level",
        "log_level",
        format!("\"{}\"", eff.log_level.as_str().to_ascii_lowercase()),
    );
    line(&mut s, "reuse_port", "reuse_port", c.reuse_port.to_string());
    if c.echo {
        let _ = writeln!(s, "# echo mode (--echo): no keys");
    } else if c.keys.is_empty() {
        let _ = writeln!(
            s,
            "\n# no keys configured: a service key and a client key are generated at start \
             and printed once (loopback only, not in a cluster)"
        );
    }
    for (role, origins) in &eff.key_origins {
        for o in origins {
            let _ = writeln!(s, "\n[[keys]]\nrole = \"{role}\"");
            let _ = writeln!(s, "{:<40} # {o}", "key = \"(redacted)\"");
        }
    }
    let _ = writeln!(s, "\n[limits]");
    line(
        &mut s,
        "limits.max_history_bytes",
        "max_history_bytes",
        show_bytes(c.history.max_bytes),
    );
    for (name, key, v) in [
        (
            "limits.max_message_bytes",
            "max_message_bytes",
            show_bytes(c.limits.max_message),
        ),
        (
            "limits.max_line_bytes",
            "max_line_bytes",
            show_bytes(c.limits.max_line),
        ),
        (
            "limits.max_header_lines",
            "max_header_lines",
            c.limits.max_headers.to_string(),
        ),
        (
            "limits.max_connections",
            "max_connections",
            c.max_connections.to_string(),
        ),
        (
            "limits.max_subscriptions",
            "max_subscriptions",
            c.max_subscriptions.to_string(),
        ),
        (
            "limits.max_outbound_bytes",
            "max_outbound_bytes",
            show_bytes(c.max_outbound_bytes),
        ),
        (
            "limits.max_unanswered_pings",
            "max_unanswered_pings",
            c.max_unanswered_pings.to_string(),
        ),
        (
            "limits.max_read_per_turn",
            "max_read_per_turn",
            show_bytes(c.max_read_per_turn),
        ),
        (
            "limits.max_messages_per_turn",
            "max_messages_per_turn",
            c.max_messages_per_turn.to_string(),
        ),
        (
            "limits.max_fragments",
            "max_fragments",
            c.max_fragments.to_string(),
        ),
        (
            "limits.max_key_bytes",
            "max_key_bytes",
            show_bytes(c.max_key_bytes),
        ),
        (
            "limits.max_pending_requests",
            "max_pending_requests",
            c.max_pending_requests.to_string(),
        ),
        (
            "limits.max_reqid_bytes",
            "max_reqid_bytes",
            show_bytes(c.max_reqid_bytes),
        ),
        (
            "limits.max_handshakes",
            "max_handshakes",
            c.max_handshakes.to_string(),
        ),
        (
            "limits.max_handshakes_per_ip",
            "max_handshakes_per_ip",
            c.max_handshakes_per_ip.to_string(),
        ),
    ] {
        line(&mut s, name, key, v);
    }
    let _ = writeln!(s, "\n[timeouts]");
    for (name, key, v) in [
        ("timeouts.handshake", "handshake", c.handshake_timeout),
        ("timeouts.ping_interval", "ping_interval", c.ping_interval),
        ("timeouts.idle", "idle", c.idle_timeout),
        ("timeouts.request", "request", c.request_timeout),
        (
            "timeouts.shutdown_grace",
            "shutdown_grace",
            c.shutdown_grace,
        ),
        ("timeouts.lame_duck", "lame_duck", c.lame_duck_duration),
    ] {
        line(&mut s, name, key, show_duration(v));
    }
    match &c.cluster {
        None => {
            let _ = writeln!(
                s,
                "\n# [cluster]: none (no nats-server URL): this node is on its own"
            );
        }
        Some(cl) => {
            let _ = writeln!(s, "\n[cluster]");
            let urls: Vec<String> = cl.urls.iter().map(|u| format!("{u:?}")).collect();
            line(
                &mut s,
                "cluster.nats",
                "nats",
                format!("[{}]", urls.join(", ")),
            );
            line(&mut s, "cluster.name", "name", format!("{:?}", cl.name));
            if let Some(u) = &cl.user {
                line(&mut s, "cluster.user", "user", format!("{u:?}"));
            }
            if cl.password.is_some() {
                line(
                    &mut s,
                    "cluster.password",
                    "password",
                    "\"(redacted)\"".into(),
                );
            }
            if cl.token.is_some() {
                line(
                    &mut s,
                    "cluster.token_file",
                    "token",
                    "\"(redacted)\"".into(),
                );
            }
            line(
                &mut s,
                "cluster.max_pending",
                "max_pending",
                show_bytes(cl.max_pending),
            );
            line(
                &mut s,
                "cluster.node_timeout",
                "node_timeout",
                show_duration(cl.node_timeout),
            );
            if let Some(n) = &cl.node_name {
                line(&mut s, "cluster.node_name", "node_name", format!("{n:?}"));
            }
            line(
                &mut s,
                "cluster.history_storage",
                "history_storage",
                format!("\"{}\"", cl.history_storage.name()),
            );
        }
    }
    if c.history.rules.is_empty() {
        let _ = writeln!(s, "\n# [[history]]: none (no topic keeps history)");
    }
    for r in &c.history.rules {
        let _ = writeln!(s, "\n[[history]]");
        line(&mut s, "history", "prefix", format!("{:?}", r.prefix));
        line(&mut s, "history", "size", r.size.to_string());
        line(
            &mut s,
            "history",
            "ttl",
            format!("\"{}\"", show_duration(r.ttl)),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClusterConfig;

    fn parse_str(src: &str) -> Result<FileConfig, String> {
        parse(src, Path::new("test.toml"))
    }

    #[test]
    fn full_file() {
        let f = parse_str(
            "listen = \"127.0.0.1:9000\"\nlog_level = \"debug\"\n\n[[keys]]\nrole = \"client\"\n\
             key = \" abc \"\n\n[limits]\nmax_message_bytes = \"2MiB\"\nmax_line_bytes = 4096\n\
             max_connections = 7\n\n[timeouts]\nidle = \"90s\"\nrequest = 5\n",
        )
        .unwrap();
        assert_eq!(
            f.listen,
            Some(At {
                value: vec!["127.0.0.1:9000".parse().unwrap()],
                line: 1
            })
        );
        assert_eq!(f.log_level.map(|a| a.value), Some(log::LevelFilter::Debug));
        assert_eq!(f.client_keys.keys, vec!["abc".to_owned()]);
        assert_eq!(f.client_keys.origins, vec!["line 6".to_owned()]);
        assert_eq!(
            f.max_message_bytes,
            Some(At {
                value: 2 << 20,
                line: 9
            })
        );
        assert_eq!(f.max_line_bytes.map(|a| a.value), Some(4096));
        assert_eq!(f.max_connections.map(|a| a.value), Some(7));
        assert_eq!(
            f.idle_timeout,
            Some(At {
                value: Duration::from_secs(90),
                line: 14
            })
        );
        assert_eq!(
            f.request_timeout.map(|a| a.value),
            Some(Duration::from_secs(5))
        );
        assert!(f.handshake_timeout.is_none());
    }

    #[test]
    fn errors_name_key_and_line() {
        let e =
            parse_str("listen = \"127.0.0.1:1\"\n[timeouts]\nidle = \"60 parsecs\"\n").unwrap_err();
        assert!(
            e.starts_with("test.toml:3:8: timeouts.idle: invalid duration"),
            "{e}"
        );
        assert!(e.contains("   3 | idle = \"60 parsecs\""), "{e}");

        let e = parse_str("\n[limits]\nmax_conections = 5\n").unwrap_err();
        assert!(
            e.starts_with("test.toml:3:1: limits.max_conections: "),
            "{e}"
        );
        assert!(e.contains("unknown field `max_conections`"), "{e}");

        let e = parse_str("listen = \"nowhere\"\n").unwrap_err();
        assert!(e.starts_with("test.toml:1:10: listen: "), "{e}");

        let e = parse_str("[limits]\nmax_connections = \"many\"\n").unwrap_err();
        assert!(
            e.starts_with("test.toml:2:19: limits.max_connections: expected an integer"),
            "{e}"
        );

        let e = parse_str("a = [\n").unwrap_err();
        assert!(e.starts_with("test.toml:"), "{e}");

        let e = parse_str("[[keys]]\nrole = \"admin\"\nkey = \"x\"\n").unwrap_err();
        assert!(e.starts_with("test.toml:2:8: keys[0].role: "), "{e}");

        let e = parse_str("[[keys]]\nrole = \"client\"\n").unwrap_err();
        assert!(e.contains("keys[0]: give exactly one of"), "{e}");

        let e =
            parse_str("[[keys]]\nrole = \"client\"\nkey_file = \"/nonexistent/k\"\n").unwrap_err();
        assert!(
            e.starts_with("test.toml:3:12: keys[0].key_file: cannot read /nonexistent/k"),
            "{e}"
        );
    }

    #[test]
    fn key_file_is_relative_to_the_config_file() {
        let dir = std::env::temp_dir().join(format!("mm-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("svc.keys"),
            "# rotated 2026-11\nk-one\n\n  k-two  \n",
        )
        .unwrap();
        let f = parse(
            "[[keys]]\nrole = \"service\"\nkey_file = \"svc.keys\"\n",
            &dir.join("m.toml"),
        )
        .unwrap();
        assert_eq!(f.service_keys.keys, vec!["k-one", "k-two"]);
        std::fs::write(dir.join("empty.keys"), "# nothing\n").unwrap();
        let e = parse(
            "[[keys]]\nrole = \"service\"\nkey_file = \"empty.keys\"\n",
            &dir.join("m.toml"),
        )
        .unwrap_err();
        assert!(e.contains("holds no key"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn precedence_command_line_env_file_default() {
        let f = parse_str(
            "listen = \"127.0.0.1:9000\"\n[[keys]]\nrole = \"service\"\nkey = \"file-svc\"\n\
             [[keys]]\nrole = \"client\"\nkey = \"file-cli\"\n[limits]\nmax_connections = 7\n\
             max_subscriptions = 8\n[timeouts]\nidle = \"90s\"\n",
        )
        .unwrap();
        let mut cfg = Config {
            listeners: vec!["127.0.0.1:1".parse().unwrap()], // from the command line
            max_connections: 3,                              // from the environment
            ..Config::default()
        };
        cfg.keys.client = vec!["env-cli".into()]; // from the environment
        let eff = merge(cfg, log::LevelFilter::Info, Some(&f), |id| match id {
            "listen" => Source::CommandLine,
            "max_connections" | "client_keys" => Source::Env,
            _ => Source::Default,
        });
        assert_eq!(eff.cfg.listeners, vec!["127.0.0.1:1".parse().unwrap()]);
        assert_eq!(eff.source("listen"), Source::CommandLine);
        assert_eq!(eff.cfg.max_connections, 3);
        assert_eq!(eff.source("limits.max_connections"), Source::Env);
        assert_eq!(eff.cfg.max_subscriptions, 8);
        assert_eq!(eff.source("limits.max_subscriptions"), Source::File(10));
        assert_eq!(eff.cfg.idle_timeout, Duration::from_secs(90));
        assert_eq!(eff.cfg.request_timeout, Duration::from_secs(30));
        assert_eq!(eff.source("timeouts.request"), Source::Default);
        assert_eq!(eff.cfg.keys.service, vec!["file-svc"]);
        assert_eq!(eff.cfg.keys.client, vec!["env-cli"]);
        let printed = render(&eff);
        assert!(!printed.contains("file-svc") && !printed.contains("env-cli"));
        assert!(printed.contains("max_subscriptions = 8"), "{printed}");
        assert!(printed.contains("# file, line 10"), "{printed}");
        assert!(validate(&eff).is_ok());
    }

    #[test]
    fn validation_names_the_source() {
        let f = parse_str("[limits]\nmax_connections = 0\n").unwrap();
        let eff = merge(Config::default(), log::LevelFilter::Info, Some(&f), |_| {
            Source::Default
        });
        let e = validate(&eff).unwrap_err();
        assert_eq!(
            e,
            "limits.max_connections (test.toml:2): 0 is below the minimum 1"
        );
        let cfg = Config {
            listeners: vec!["0.0.0.0:8765".parse().unwrap()],
            ..Config::default()
        };
        let eff = merge(cfg, log::LevelFilter::Info, None, |id| match id {
            "listen" => Source::CommandLine,
            _ => Source::Default,
        });
        let e = validate(&eff).unwrap_err();
        assert!(
            e.starts_with("listen (command line): no keys configured"),
            "{e}"
        );
    }

    #[test]
    fn lame_duck_duration_from_the_file_more_than_zero() {
        let f = parse_str("[timeouts]\nlame_duck = \"2m\"\n").unwrap();
        let eff = merge(Config::default(), log::LevelFilter::Info, Some(&f), |_| {
            Source::Default
        });
        assert_eq!(eff.cfg.lame_duck_duration, Duration::from_secs(120));
        assert_eq!(eff.source("timeouts.lame_duck"), Source::File(2));
        assert!(
            render(&eff).contains("lame_duck = \"120s\""),
            "{}",
            render(&eff)
        );
        assert!(validate(&eff).is_ok());
        // The command line over the file; zero refused, named by where it came from.
        let cfg = Config {
            lame_duck_duration: Duration::ZERO,
            ..Config::default()
        };
        let eff = merge(cfg, log::LevelFilter::Info, Some(&f), |id| match id {
            "lame_duck_duration" => Source::CommandLine,
            _ => Source::Default,
        });
        assert_eq!(
            validate(&eff).unwrap_err(),
            "timeouts.lame_duck (command line): must be more than 0"
        );
        let f = parse_str("[timeouts]\nlame_duck = \"0s\"\n").unwrap();
        let eff = merge(Config::default(), log::LevelFilter::Info, Some(&f), |_| {
            Source::Default
        });
        assert_eq!(
            validate(&eff).unwrap_err(),
            "timeouts.lame_duck (test.toml:2): must be more than 0"
        );
        let e = parse_str("[timeouts]\nlame_duck = true\n").unwrap_err();
        assert!(e.contains("timeouts.lame_duck"), "{e}");
    }

    #[test]
    fn listeners_with_roles_and_tls_paths() {
        let f = parse_str(
            "listen = [\"ws://127.0.0.1:1\", \"tcp://127.0.0.1:2?roles=service\"]\n\
             tls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n",
        )
        .unwrap();
        let l = f.listen.unwrap();
        assert_eq!(l.line, 1);
        assert_eq!(l.value.len(), 2);
        assert_eq!(l.value[1].roles, Some(vec![crate::broker::Role::Service]));
        assert!(f.tls_cert.unwrap().value.unwrap().ends_with("c.pem"));
        let e = parse_str("listen = [\"ftp://127.0.0.1:1\"]\n").unwrap_err();
        assert!(
            e.contains(":1:") && e.contains("listen: ") && e.contains("ftp"),
            "{e}"
        );
        let e = parse_str("listen = 5\n").unwrap_err();
        assert!(e.contains("listen: expected a listener URL"), "{e}");
    }

    /// A scratch folder for files a test's configuration names.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mm-cfg-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    const PASSWORD: &str = "pw-5c1e9a7b";
    const TOKEN: &str = "tok-0d4f2b86";

    /// The defaults with a service key and a client key configured (a cluster refuses
    /// generated keys); `merge` keeps them where their source is not `Default`.
    fn keyed() -> Config {
        Config {
            keys: crate::broker::Keys {
                service: vec!["svc-key".into()],
                client: vec!["cli-key".into()],
                monitor: vec![],
            },
            ..Config::default()
        }
    }

    #[test]
    fn cluster_section() {
        let dir = scratch("cluster");
        std::fs::write(dir.join("nats.token"), format!("\n  {TOKEN}  \n")).unwrap();
        let src = format!(
            "reuse_port = true\n\n[cluster]\nnats = [\"nats://10.0.0.1:4222\", \"nats://nats.b\"]\n\
             name = \"prod_eu-1\"\nuser = \"mm\"\npassword = \"{PASSWORD}\"\n\
             token_file = \"nats.token\"\nmax_pending = \"16MiB\"\nnode_timeout = \"1500ms\"\n\
             node_name = \" eu-1.a_2 \"\n"
        );
        let f = parse(&src, &dir.join("m.toml")).unwrap();
        assert_eq!(
            f.reuse_port,
            Some(At {
                value: true,
                line: 1
            })
        );
        assert_eq!(
            f.cluster_nats,
            Some(At {
                value: vec!["nats://10.0.0.1:4222".into(), "nats://nats.b".into()],
                line: 4
            })
        );
        assert_eq!(
            f.cluster_name,
            Some(At {
                value: "prod_eu-1".into(),
                line: 5
            })
        );
        assert_eq!(
            f.cluster_user.as_ref().unwrap().value.as_deref(),
            Some("mm")
        );
        assert_eq!(f.cluster_password.as_ref().unwrap().value.0, PASSWORD);
        // token_file is relative to the configuration file; its content is trimmed.
        assert_eq!(
            f.cluster_token,
            Some(At {
                value: Secret(TOKEN.into()),
                line: 8
            })
        );
        assert_eq!(f.cluster_max_pending.as_ref().unwrap().value, 16 << 20);
        assert_eq!(
            f.cluster_node_timeout.as_ref().unwrap().value,
            Duration::from_millis(1500)
        );
        assert_eq!(
            f.cluster_node_name,
            Some(At {
                value: Some("eu-1.a_2".into()),
                line: 11
            })
        );

        // The keys from the command line (a cluster needs them), the rest from the file.
        let eff = merge(keyed(), log::LevelFilter::Info, Some(&f), |id| match id {
            "service_keys" | "client_keys" => Source::CommandLine,
            _ => Source::Default,
        });
        assert!(eff.cfg.reuse_port);
        assert_eq!(eff.source("reuse_port"), Source::File(1));
        let cl = eff.cfg.cluster.as_ref().expect("a cluster");
        assert_eq!(cl.urls, ["nats://10.0.0.1:4222", "nats://nats.b"]);
        assert_eq!(cl.name, "prod_eu-1");
        assert_eq!(cl.user.as_deref(), Some("mm"));
        assert_eq!(cl.password.as_deref(), Some(PASSWORD));
        assert_eq!(cl.token.as_deref(), Some(TOKEN));
        assert_eq!(cl.max_pending, 16 << 20);
        assert_eq!(cl.node_timeout, Duration::from_millis(1500));
        assert_eq!(cl.node_name.as_deref(), Some("eu-1.a_2"));
        assert_eq!(eff.source("cluster.token_file"), Source::File(8));
        assert_eq!(eff.source("cluster.node_name"), Source::File(11));
        assert!(validate(&eff).is_ok(), "{:?}", validate(&eff));

        // Secrets never in --check-config's print-out nor in Debug.
        let printed = render(&eff);
        let debug = format!("{eff:?} {f:?}");
        for out in [&printed, &debug] {
            assert!(!out.contains(PASSWORD) && !out.contains(TOKEN), "{out}");
        }
        for want in [
            "reuse_port = true",
            "[cluster]",
            "nats = [\"nats://10.0.0.1:4222\", \"nats://nats.b\"]",
            "name = \"prod_eu-1\"",
            "user = \"mm\"",
            "password = \"(redacted)\"",
            "token = \"(redacted)\"",
            "max_pending = \"16MiB\"",
            "node_timeout = \"1500ms\"",
            "node_name = \"eu-1.a_2\"",
        ] {
            assert!(printed.contains(want), "no {want:?} in\n{printed}");
        }
        assert!(
            printed
                .lines()
                .any(|l| l.starts_with("token = ") && l.ends_with("# file, line 8")),
            "{printed}"
        );
        // The print-out is a configuration file again (but for the token's name).
        let reparsed: toml::Value = toml::from_str(&printed).unwrap();
        assert_eq!(reparsed["cluster"]["name"].as_str(), Some("prod_eu-1"));
        assert_eq!(reparsed["cluster"]["node_name"].as_str(), Some("eu-1.a_2"));
        assert!(warnings(&eff).is_empty(), "{:?}", warnings(&eff));

        // No URL: no cluster, and the print-out says so.
        let eff = merge(Config::default(), log::LevelFilter::Info, None, |_| {
            Source::Default
        });
        assert!(eff.cfg.cluster.is_none() && !eff.cfg.reuse_port);
        let printed = render(&eff);
        assert!(printed.contains("reuse_port = false"), "{printed}");
        assert!(!printed.contains("\n[cluster]"), "{printed}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn history_tables_defaults_and_errors() {
        use crate::core::history::HistoryRule;
        let f = parse_str(
            "[limits]\nmax_history_bytes = \"8MiB\"\n\n[[history]]\nprefix = \"chat.\"\n\
             size = 500\nttl = \"10m\"\n\n[[history]]\nprefix = \"feed.\"\n",
        )
        .unwrap();
        assert_eq!(f.max_history_bytes.map(|a| a.value), Some(8 << 20));
        let h = f.history.unwrap();
        assert_eq!(h.line, 4);
        assert_eq!(
            h.value,
            [
                HistoryRule {
                    prefix: "chat.".into(),
                    size: 500,
                    ttl: Duration::from_secs(600)
                },
                HistoryRule {
                    prefix: "feed.".into(),
                    size: DEFAULT_HISTORY_SIZE,
                    ttl: DEFAULT_HISTORY_TTL
                }
            ]
        );
        for (src, want) in [
            (
                "[[history]]\nprefix = \"\"\n",
                "test.toml:2:10: history.prefix: expected a topic prefix",
            ),
            (
                "[[history]]\nprefix = \"MSG:\"\n",
                "test.toml:2:10: history.prefix: MSG: and SYS:",
            ),
            (
                "[[history]]\nprefix = \"a\"\nsize = 0\n",
                "test.toml:3:8: history.size: expected at least 1",
            ),
            (
                "[[history]]\nprefix = \"a\"\nttl = \"soon\"\n",
                "test.toml:3:7: history.ttl: ",
            ),
            (
                "[[history]]\nprefix = \"a\"\n[[history]]\nprefix = \"a\"\n",
                "test.toml:4:10: history.prefix: this prefix has",
            ),
            ("[[history]]\nsize = 3\n", "test.toml:1:1: "),
        ] {
            let e = parse_str(src).unwrap_err();
            assert!(e.starts_with(want), "{src:?}: {e}");
        }
    }

    #[test]
    fn cluster_errors_name_key_and_line() {
        let e =
            parse_str("listen = \"127.0.0.1:1\"\n[cluster]\nnatz = \"nats://h\"\n").unwrap_err();
        assert!(e.starts_with("test.toml:3:1: cluster.natz: "), "{e}");
        assert!(e.contains("unknown field `natz`"), "{e}");

        let e = parse_str("[cluster]\nnats = [\"http://h:4222\"]\n").unwrap_err();
        assert!(
            e.starts_with("test.toml:2:8: cluster.nats: unsupported scheme \"http\""),
            "{e}"
        );
        assert!(e.contains("   2 | nats = [\"http://h:4222\"]"), "{e}");
        let e = parse_str("[cluster]\nnats = []\n").unwrap_err();
        assert!(
            e.starts_with("test.toml:2:8: cluster.nats: names no"),
            "{e}"
        );
        let e = parse_str("[cluster]\nnats = 4222\n").unwrap_err();
        assert!(
            e.contains("cluster.nats: expected a nats-server URL"),
            "{e}"
        );

        let e = parse_str("[cluster]\nnats = \"nats://h\"\nmax_pending = \"lots\"\n").unwrap_err();
        assert!(
            e.starts_with("test.toml:3:15: cluster.max_pending: invalid size"),
            "{e}"
        );
        let e = parse_str("[cluster]\nnode_timeout = \"3 fortnights\"\n").unwrap_err();
        assert!(
            e.starts_with("test.toml:2:16: cluster.node_timeout: invalid duration"),
            "{e}"
        );
        let e = parse_str("[cluster]\nname = 7\n").unwrap_err();
        assert!(e.starts_with("test.toml:2:8: cluster.name: "), "{e}");
        let e = parse_str("[cluster]\nnats = \"nats://h\"\nnode_name = \"web 1\"\n").unwrap_err();
        assert!(
            e.starts_with(
                "test.toml:3:13: cluster.node_name: \"web 1\" is not a node name \
                 (1 to 64 of A-Z a-z 0-9 . _ -)"
            ),
            "{e}"
        );
        assert!(e.contains("   3 | node_name = \"web 1\""), "{e}");
        let long = "n".repeat(65);
        let e = parse_str(&format!("[cluster]\nnode_name = \"{long}\"\n")).unwrap_err();
        assert!(e.starts_with("test.toml:2:13: cluster.node_name: "), "{e}");
        let e = parse_str("[cluster]\nnode_name = \"  \"\n").unwrap_err();
        assert!(
            e.starts_with("test.toml:2:13: cluster.node_name: \"\" is not"),
            "{e}"
        );
        let e = parse_str("[cluster]\nnode_name = 7\n").unwrap_err();
        assert!(e.starts_with("test.toml:2:13: cluster.node_name: "), "{e}");
        let e = parse_str("[cluster]\nuser = \" \"\n").unwrap_err();
        assert!(
            e.starts_with("test.toml:2:8: cluster.user: empty user"),
            "{e}"
        );

        let e = parse_str("[cluster]\ntoken_file = \"/nonexistent/nats.token\"\n").unwrap_err();
        assert!(
            e.starts_with(
                "test.toml:2:14: cluster.token_file: cannot read /nonexistent/nats.token"
            ),
            "{e}"
        );
        let dir = scratch("empty-token");
        std::fs::write(dir.join("t"), " \n").unwrap();
        let e = parse("[cluster]\ntoken_file = \"t\"\n", &dir.join("m.toml")).unwrap_err();
        assert!(
            e.contains("cluster.token_file: ") && e.contains("holds no token"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);

        let e = parse_str("listen = \"127.0.0.1:1\"\nreuse_port = \"yes\"\n").unwrap_err();
        assert!(e.starts_with("test.toml:2:14: reuse_port: "), "{e}");
    }

    #[test]
    fn cluster_precedence_command_line_env_file_default() {
        let f = parse_str(
            "reuse_port = true\n[cluster]\nnats = \"nats://h:4000\"\nname = \"from-file\"\n\
             node_timeout = \"5s\"\n",
        )
        .unwrap();
        // `merge` gets the cluster settings whole, with or without a URL.
        let given = |name: &str| Config {
            cluster: Some(ClusterConfig {
                name: name.into(),
                max_pending: 1 << 20,
                ..ClusterConfig::default()
            }),
            ..Config::default()
        };
        for (src, want) in [
            (Source::CommandLine, "from-cli"),
            (Source::Env, "from-cli"),
            (Source::Default, "from-file"),
        ] {
            let eff = merge(
                given("from-cli"),
                log::LevelFilter::Info,
                Some(&f),
                |id| match id {
                    "cluster_name" => src.clone(),
                    "cluster_max_pending" => Source::Env,
                    _ => Source::Default,
                },
            );
            let cl = eff.cfg.cluster.as_ref().unwrap();
            assert_eq!(cl.name, want);
            let expect_src = match src {
                Source::Default => Source::File(4),
                s => s,
            };
            assert_eq!(eff.source("cluster.name"), expect_src);
            // The URL from the file, the rest from wherever it was given.
            assert_eq!(cl.urls, ["nats://h:4000"]);
            assert_eq!(eff.source("cluster.nats"), Source::File(3));
            assert_eq!(cl.max_pending, 1 << 20);
            assert_eq!(eff.source("cluster.max_pending"), Source::Env);
            assert_eq!(cl.node_timeout, Duration::from_secs(5));
        }
        // Without a file: the defaults.
        let eff = merge(
            Config {
                cluster: Some(ClusterConfig {
                    urls: vec!["nats://h".into()],
                    ..ClusterConfig::default()
                }),
                ..Config::default()
            },
            log::LevelFilter::Info,
            None,
            |id| match id {
                "cluster" => Source::CommandLine,
                _ => Source::Default,
            },
        );
        let cl = eff.cfg.cluster.as_ref().unwrap();
        assert_eq!((cl.name.as_str(), cl.max_pending), ("mm", 64 << 20));
        assert_eq!(cl.node_timeout, Duration::from_secs(3));
        assert_eq!(eff.source("cluster.name"), Source::Default);
        // reuse_port: an explicit false from the environment beats the file's true.
        let eff = merge(
            Config::default(),
            log::LevelFilter::Info,
            Some(&f),
            |id| match id {
                "reuse_port" => Source::Env,
                _ => Source::Default,
            },
        );
        assert!(!eff.cfg.reuse_port);
        assert_eq!(eff.source("reuse_port"), Source::Env);
        // Cluster settings with no URL anywhere: no cluster, and a warning.
        let f = parse_str("[cluster]\nname = \"lonely\"\n").unwrap();
        let eff = merge(Config::default(), log::LevelFilter::Info, Some(&f), |_| {
            Source::Default
        });
        assert!(eff.cfg.cluster.is_none());
        assert!(validate(&eff).is_ok());
        let w = warnings(&eff);
        assert!(
            w.len() == 1 && w[0].starts_with("cluster.name (file, line 2) given without"),
            "{w:?}"
        );
    }

    #[test]
    fn cluster_validation_names_the_source() {
        let with = |cl: ClusterConfig, src: Source| {
            let cfg = Config {
                cluster: Some(cl),
                ..keyed()
            };
            let eff = merge(cfg, log::LevelFilter::Info, None, |_| src.clone());
            validate(&eff)
        };
        let ok = ClusterConfig {
            urls: vec!["nats://127.0.0.1:4222".into()],
            ..ClusterConfig::default()
        };
        assert_eq!(with(ok.clone(), Source::CommandLine), Ok(()));
        let e = with(
            ClusterConfig {
                urls: vec!["nats://127.0.0.1".into(), "tls://127.0.0.1:4222".into()],
                ..ok.clone()
            },
            Source::CommandLine,
        )
        .unwrap_err();
        assert!(
            e.starts_with("cluster.nats (command line): unsupported scheme \"tls\""),
            "{e}"
        );
        for bad in ["nats://h:99999", "nats://h:4222/x", "h:4222", "nats://"] {
            let cl = ClusterConfig {
                urls: vec![bad.into()],
                ..ok.clone()
            };
            let e = with(cl, Source::Env).unwrap_err();
            assert!(e.starts_with("cluster.nats (environment): "), "{bad}: {e}");
        }
        let e = with(
            ClusterConfig {
                name: "a.b".into(),
                ..ok.clone()
            },
            Source::Env,
        )
        .unwrap_err();
        assert!(
            e.starts_with("cluster.name (environment): \"a.b\" is not a cluster name"),
            "{e}"
        );
        let e = with(
            ClusterConfig {
                max_pending: 1000,
                ..ok.clone()
            },
            Source::CommandLine,
        )
        .unwrap_err();
        assert!(
            e.starts_with("cluster.max_pending (command line): 1000 is below the minimum 65536"),
            "{e}"
        );
        for t in [Duration::from_millis(999), Duration::from_secs(3601)] {
            let e = with(
                ClusterConfig {
                    node_timeout: t,
                    ..ok.clone()
                },
                Source::CommandLine,
            )
            .unwrap_err();
            assert!(
                e.starts_with("cluster.node_timeout (command line): "),
                "{e}"
            );
        }
        for (user, password, name) in [
            (Some("u"), None, "cluster.user"),
            (None, Some(PASSWORD), "cluster.password"),
        ] {
            let e = with(
                ClusterConfig {
                    user: user.map(Into::into),
                    password: password.map(Into::into),
                    ..ok.clone()
                },
                Source::CommandLine,
            )
            .unwrap_err();
            assert!(e.starts_with(&format!("{name} (command line): ")), "{e}");
            assert!(!e.contains(PASSWORD), "{e}");
        }

        let e = with(
            ClusterConfig {
                node_name: Some("web 1".into()),
                ..ok.clone()
            },
            Source::Env,
        )
        .unwrap_err();
        assert!(
            e.starts_with("cluster.node_name (environment): \"web 1\" is not a node name"),
            "{e}"
        );
        let named = ClusterConfig {
            node_name: Some("web-1".into()),
            ..ok.clone()
        };
        assert_eq!(with(named, Source::CommandLine), Ok(()));

        // Generated keys in a cluster: refused, the way a public address is, and the
        // error says what to do.
        let generated = |cl: ClusterConfig, src: Source, file: Option<&FileConfig>| {
            let cfg = Config {
                cluster: Some(cl),
                ..Config::default()
            };
            validate(&merge(cfg, log::LevelFilter::Info, file, |_| src.clone()))
        };
        let e = generated(ok.clone(), Source::CommandLine, None).unwrap_err();
        assert!(
            e.starts_with("cluster.nats (command line): no keys configured: refusing to join a cluster with generated keys"),
            "{e}"
        );
        for want in [
            "every node of a cluster needs the same service and client keys",
            "--service-key and --client-key",
            "MM_SERVICE_KEY / MM_CLIENT_KEY",
            "[[keys]]",
        ] {
            assert!(e.contains(want), "no {want:?} in {e}");
        }
        let f = parse_str("log_level = \"info\"\n[cluster]\nnats = \"nats://h\"\n").unwrap();
        let e = generated(ClusterConfig::default(), Source::Default, Some(&f)).unwrap_err();
        assert!(
            e.starts_with("cluster.nats (test.toml:3): no keys configured"),
            "{e}"
        );
        // One configured role is enough: nothing is generated then.
        let mut one = keyed();
        one.keys.client.clear();
        one.cluster = Some(ok.clone());
        let eff = merge(one, log::LevelFilter::Info, None, |_| Source::CommandLine);
        assert_eq!(validate(&eff), Ok(()));
        // Without a cluster, generated keys on loopback stay allowed.
        let eff = merge(Config::default(), log::LevelFilter::Info, None, |_| {
            Source::Default
        });
        assert_eq!(validate(&eff), Ok(()));

        // From the file: the file and line are named.
        let f = parse_str("[cluster]\nnats = \"nats://h\"\nname = \"no spaces\"\n").unwrap();
        let eff = merge(Config::default(), log::LevelFilter::Info, Some(&f), |_| {
            Source::Default
        });
        let e = validate(&eff).unwrap_err();
        assert!(
            e.starts_with("cluster.name (test.toml:3): \"no spaces\" is not a cluster name"),
            "{e}"
        );
    }
}
