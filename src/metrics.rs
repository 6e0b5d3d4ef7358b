//! Counters kept on the event-loop thread as plain integers, and their Prometheus text
//! rendering (PROTOCOL.md §8). No key ever appears here.

use std::fmt::Write;
use std::time::Instant;

use crate::broker::{reason, Broker, COMMANDS};

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Closing handshake or a plain HTTP request answered.
    Normal,
    /// The key was refused.
    BadKey,
    /// Cut off as a slow consumer.
    SlowConsumer,
    /// Silent for the idle timeout.
    Idle,
    /// Handshake or key not in time.
    Timeout,
    /// A framing or WebSocket protocol violation.
    ProtocolError,
    /// Over a size limit.
    Limit,
    /// The peer hung up or reset.
    PeerGone,
    /// The server shut down.
    Shutdown,
}

impl CloseReason {
    /// Every reason, in the order of [`Metrics::closed`].
    pub const ALL: [CloseReason; 9] = [
        CloseReason::Normal,
        CloseReason::BadKey,
        CloseReason::SlowConsumer,
        CloseReason::Idle,
        CloseReason::Timeout,
        CloseReason::ProtocolError,
        CloseReason::Limit,
        CloseReason::PeerGone,
        CloseReason::Shutdown,
    ];

    /// Label value.
    pub fn name(self) -> &'static str {
        match self {
            CloseReason::Normal => "normal",
            CloseReason::BadKey => "bad_key",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Idle => "idle",
            CloseReason::Timeout => "timeout",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::Limit => "limit",
            CloseReason::PeerGone => "peer_gone",
            CloseReason::Shutdown => "shutdown",
        }
    }
}

/// Reactor-level counters.
#[derive(Debug)]
pub struct Metrics {
    /// Connections accepted (including refused ones).
    pub accepted: u64,
    /// Connections refused at the connection limit.
    pub refused: u64,
    /// Connections closed, by [`CloseReason::ALL`] index.
    pub closed: [u64; 9],
    /// Bytes read from sockets.
    pub bytes_in: u64,
    /// Bytes written to sockets.
    pub bytes_out: u64,
    /// Slow consumers cut off.
    pub slow_consumers: u64,
    /// Plain HTTP requests answered.
    pub http_requests: u64,
    /// Event-loop iterations.
    pub loop_iterations: u64,
    /// Rate-limit state for warnings.
    pub warned_refused: (Instant, u32),
    /// Rate-limit state for warnings.
    pub warned_bad_key: (Instant, u32),
    /// Rate-limit state for warnings.
    pub warned_protocol: (Instant, u32),
    /// Rate-limit state for warnings.
    pub warned_slow: (Instant, u32),
}

impl Default for Metrics {
    fn default() -> Self {
        let now = Instant::now();
        Metrics {
            accepted: 0,
            refused: 0,
            closed: [0; 9],
            bytes_in: 0,
            bytes_out: 0,
            slow_consumers: 0,
            http_requests: 0,
            loop_iterations: 0,
            warned_refused: (now, 0),
            warned_bad_key: (now, 0),
            warned_protocol: (now, 0),
            warned_slow: (now, 0),
        }
    }
}

impl Metrics {
    /// Count a closed connection.
    pub fn count_close(&mut self, why: CloseReason) {
        if let Some(i) = CloseReason::ALL.iter().position(|r| *r == why) {
            self.closed[i] += 1;
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self, broker: &Broker, open: usize) -> String {
        let mut s = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(s, "{name}{labels} {v}");
            }
        };
        let (svc, mon, cli) = broker.role_counts();
        let pending_auth = open.saturating_sub(svc + mon + cli);
        metric(
            "middleman_connections",
            "gauge",
            "Open connections by role (unauthenticated: handshake or closing).",
            &[
                (r#"{role="service"}"#.into(), svc as u64),
                (r#"{role="monitor"}"#.into(), mon as u64),
                (r#"{role="client"}"#.into(), cli as u64),
                (r#"{role="unauthenticated"}"#.into(), pending_auth as u64),
            ],
        );
        metric(
            "middleman_connections_accepted_total",
            "counter",
            "Connections accepted.",
            &[(String::new(), self.accepted)],
        );
        metric(
            "middleman_connections_refused_total",
            "counter",
            "Connections refused at the connection limit.",
            &[(String::new(), self.refused)],
        );
        let closed: Vec<(String, u64)> = CloseReason::ALL
            .iter()
            .zip(self.closed)
            .map(|(r, v)| (format!(r#"{{reason="{}"}}"#, r.name()), v))
            .collect();
        metric(
            "middleman_connections_closed_total",
            "counter",
            "Connections closed, by reason.",
            &closed,
        );
        let mut msgs: Vec<(String, u64)> = COMMANDS
            .iter()
            .zip(broker.stats.msgs_in)
            .map(|(c, v)| (format!(r#"{{cmd="{c}"}}"#), v))
            .collect();
        msgs.push((
            r#"{cmd="other"}"#.into(),
            broker.stats.msgs_in[COMMANDS.len()],
        ));
        metric(
            "middleman_messages_in_total",
            "counter",
            "Protocol messages received, by command.",
            &msgs,
        );
        metric(
            "middleman_messages_out_total",
            "counter",
            "Protocol messages delivered, by command.",
            &[
                (r#"{cmd="PUB"}"#.into(), broker.stats.delivered_pub),
                (r#"{cmd="REQ"}"#.into(), broker.stats.delivered_req),
                (r#"{cmd="RES"}"#.into(), broker.stats.delivered_res),
                (
                    r#"{cmd="ERROR"}"#.into(),
                    broker.stats.errors.iter().sum::<u64>(),
                ),
            ],
        );
        metric(
            "middleman_bytes_in_total",
            "counter",
            "Bytes read from sockets.",
            &[(String::new(), self.bytes_in)],
        );
        metric(
            "middleman_bytes_out_total",
            "counter",
            "Bytes written to sockets.",
            &[(String::new(), self.bytes_out)],
        );
        metric(
            "middleman_subscriptions",
            "gauge",
            "Subscriptions held (private channels included).",
            &[(String::new(), broker.router().total_subscriptions() as u64)],
        );
        metric(
            "middleman_topics",
            "gauge",
            "Topics and request targets in the routing table.",
            &[(String::new(), broker.router().topic_count() as u64)],
        );
        metric(
            "middleman_pending_requests",
            "gauge",
            "Requests delivered and not yet ended.",
            &[(String::new(), broker.router().pending_count() as u64)],
        );
        let st = &broker.stats;
        metric(
            "middleman_requests_total",
            "counter",
            "Requests ended, by outcome.",
            &[
                (r#"{outcome="answered"}"#.into(), st.req_answered),
                (r#"{outcome="timed_out"}"#.into(), st.req_timed_out),
                (r#"{outcome="no_responder"}"#.into(), st.req_no_responder),
                (
                    r#"{outcome="responder_gone"}"#.into(),
                    st.req_responder_gone,
                ),
            ],
        );
        metric(
            "middleman_slow_consumers_total",
            "counter",
            "Connections cut off as slow consumers.",
            &[(String::new(), self.slow_consumers)],
        );
        let errors: Vec<(String, u64)> = reason::ALL
            .iter()
            .zip(st.errors)
            .map(|(r, v)| (format!(r#"{{reason="{r}"}}"#), v))
            .collect();
        metric(
            "middleman_errors_total",
            "counter",
            "Protocol errors sent, by reason.",
            &errors,
        );
        metric(
            "middleman_loop_iterations_total",
            "counter",
            "Event-loop iterations.",
            &[(String::new(), self.loop_iterations)],
        );
        s
    }
}
