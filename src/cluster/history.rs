//! History in a cluster (PROTOCOL.md §9.5), kept by nats-server's JetStream and driven
//! from the reactor over the backplane connection. Pure like the rest of the cluster
//! code: a JetStream API call is a request written on the control lane and answered on
//! this node's `js` inbox, with its own deadline; nothing waits.
//!
//! - One stream per cluster, `MM_<cluster>`, on the subjects `<cluster>.hist.>`. Its
//!   limits are the largest `size` (per subject) and `ttl` of the `[[history]]` tables
//!   and `max_history_bytes`, oldest discarded first; memory or file storage.
//! - A PUB to a history topic is published to `<cluster>.hist.<token>` (never on
//!   `<cluster>.pub.`), with an ack reply that counts the write: the stream sequence is
//!   its `offset`, one sequence for all topics, so each topic's offsets increase.
//! - Every node reads the whole stream through one ordered push consumer (no acks,
//!   flow control, idle heartbeats; restarted from the last sequence it saw after a gap
//!   or a silence) and delivers each message to its local subscribers and monitors with
//!   `offset` and `epoch` set: every subscriber on every node sees the stream's order,
//!   the publishing node's own subscribers included.
//! - `epoch` is derived from the stream's creation time: the same on every node, new
//!   when the stream is created again (a memory stream after a nats-server restart).
//! - Recovery: an ephemeral consumer filtered on the topic, from the asked offset (or
//!   its last message). The stored messages of a subject are always a suffix of what
//!   was published to it (every JetStream limit drops oldest first), so the asked
//!   message still being stored proves that nothing after it is missing. Live messages
//!   for the recovering connection are held meanwhile and released after
//!   `SYS:RECOVERY`, those already replayed skipped.
//! - JetStream unavailable (no `-js`, stream gone, timeouts): history topics are
//!   relayed as plain topics (no `offset`), the writes counted as failed, recoveries
//!   answered `recovered: false` without a position; live delivery never waits for it.

use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

use foldhash::HashMap;
use log::{info, warn};

use crate::broker::{relay_packet, Broker, Outbox};
use crate::cluster::node::{Cluster, Sid};
use crate::cluster::{proto, subject};
use crate::core::history::{recovery_packet, HistorySettings, Since};
use crate::protocol::{Message, Packet};
use crate::router::ConnId;

/// Where the stream keeps its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Storage {
    /// In nats-server's memory: fast, lost (new epoch) when nats-server restarts.
    #[default]
    Memory,
    /// On nats-server's disk (its `-sd` store directory): survives restarts.
    File,
}

impl Storage {
    /// The name in the configuration and in JetStream's API.
    pub fn name(self) -> &'static str {
        match self {
            Storage::Memory => "memory",
            Storage::File => "file",
        }
    }
}

/// Time allowed for a JetStream API answer.
const API_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a recovery may wait for JetStream (its consumer, the next replayed message),
/// after which it answers `recovered: false`.
pub const RECOVERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a whole recovery may take.
pub const RECOVERY_LIMIT: Duration = Duration::from_secs(60);
/// The live consumer's idle heartbeat; three missed restart it.
const IDLE_HEARTBEAT: Duration = Duration::from_secs(1);
/// Time a publish ack may take before the write is counted as failed.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the stream's totals are read (for `/stats` and `/metrics`).
const INFO_EVERY: Duration = Duration::from_secs(5);
/// Live messages held for one recovering connection, at most (bytes); beyond it the
/// recovery answers `recovered: false` at once.
const HOLD_MAX: usize = 8 << 20;
/// Recoveries in flight on this node, at most; more answer `recovered: false`.
const MAX_RECOVERIES: usize = 1024;

/// A JetStream API call waiting for its answer.
#[derive(Debug, Clone, Copy)]
enum Call {
    Create,
    Update,
    Info,
    /// The live consumer of generation `gen`.
    Live(u64),
    /// A recovery's consumer.
    Rec(u64),
    /// Answers nobody reads (deletes, flow control).
    Ignored,
}

#[derive(Debug)]
struct Live {
    gen: u64,
    sid: u64,
    /// The consumer is created (its answer came).
    ok: bool,
    name: Option<Box<str>>,
    /// Last time anything came on it (or it was created).
    heard: Instant,
    /// The consumer sequence of the last message (gap detection).
    last_cseq: u64,
}

/// What a recovery asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `since: <epoch>:<offset>` in the current epoch.
    Replay(u64),
    /// `since: last`.
    Last,
    /// Not recoverable (another epoch): only the current position is read.
    Position,
}

#[derive(Debug)]
struct Rec {
    conn: ConnId,
    cid: Box<str>,
    topic: Box<[u8]>,
    mode: Mode,
    sid: u64,
    consumer: Option<Box<str>>,
    deadline: Instant,
    started: Instant,
    /// For a replay: whether the asked message is still stored and no more than `size`
    /// messages follow it (decided by the first).
    complete: Option<bool>,
    /// The topic's rule's `size`.
    size: u64,
    /// The position to report: the last message replayed or read.
    at: u64,
    /// Messages received from the consumer.
    received: u64,
    /// From the consumer's creation answer: (pending, delivered) then.
    created: Option<(u64, u64)>,
    /// Live messages held for the connection: (stream sequence, packet).
    held: Vec<(u64, Rc<Packet>)>,
    held_bytes: usize,
    /// Over: JetStream failed or the hold overflowed (answer `recovered: false`).
    failed: bool,
    /// The replay is read; waiting for the live consumer to pass `at` (a fresh replay
    /// consumer can be ahead of it: what it has not delivered yet is held, then
    /// skipped up to `at`).
    read: bool,
}

/// Counters of cluster history.
#[derive(Debug, Clone, Default)]
pub struct JsStats {
    /// Writes JetStream acknowledged.
    pub writes_ok: u64,
    /// Writes refused, unacknowledged in time, dropped before nats-server, or relayed
    /// without history because JetStream was unavailable.
    pub writes_failed: u64,
    /// Recoveries: recovered, not recovered, `since: last`.
    pub recoveries: [u64; 3],
    /// The stream's messages, bytes and subjects when last read.
    pub messages: u64,
    pub bytes: u64,
    pub subjects: u64,
    /// Times the live consumer was created again (gap, silence, reconnect).
    pub restarts: u64,
}

/// Cluster history state (see the module documentation).
pub struct Js {
    settings: HistorySettings,
    storage: Storage,
    stream: Box<str>,
    /// `<cluster>.hist.`
    hist_prefix: Box<[u8]>,
    /// `<cluster>.js.<node>.`
    js_prefix: Box<[u8]>,
    epoch: Option<Box<str>>,
    created: Option<Box<str>>,
    stream_ok: bool,
    live: Option<Live>,
    next_gen: u64,
    /// The highest stream sequence delivered live in this epoch.
    last_sseq: u64,
    /// The live consumer starts from the stream's first message (a stream created
    /// again), not from new ones, while nothing was delivered from it.
    read_all: bool,
    calls: HashMap<u64, (Call, Instant)>,
    next_call: u64,
    retry_at: Option<Instant>,
    retry_wait: Duration,
    acks: VecDeque<Instant>,
    recs: HashMap<u64, Rec>,
    rec_topics: HashMap<Box<[u8]>, Vec<u64>>,
    next_rec: u64,
    last_info: Option<Instant>,
    /// Counters.
    pub stats: JsStats,
}

impl std::fmt::Debug for Js {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Js {{ stream: {}, epoch: {:?}, ready: {}, recoveries: {} }}",
            self.stream,
            self.epoch,
            self.ready(),
            self.recs.len()
        )
    }
}

impl Js {
    /// Ready: the stream exists and the live consumer runs.
    pub fn ready(&self) -> bool {
        self.stream_ok && self.live.as_ref().is_some_and(|l| l.ok)
    }

    /// The epoch, once the stream is known.
    pub fn epoch(&self) -> Option<&str> {
        self.epoch.as_deref()
    }

    /// The stream's name.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Where it is stored.
    pub fn storage(&self) -> Storage {
        self.storage
    }

    /// Whether `topic` keeps history (a `[[history]]` prefix matches).
    pub fn keeps(&self, topic: &[u8]) -> bool {
        self.settings
            .rules
            .iter()
            .any(|r| topic.starts_with(r.prefix.as_bytes()))
    }

    /// The `size` of `topic`'s rule (the longest matching prefix).
    fn size_for(&self, topic: &[u8]) -> u64 {
        self.settings
            .rules
            .iter()
            .filter(|r| topic.starts_with(r.prefix.as_bytes()))
            .max_by_key(|r| r.prefix.len())
            .map_or(0, |r| r.size as u64)
    }

    /// Recoveries in flight.
    pub fn recoveries_in_flight(&self) -> usize {
        self.recs.len()
    }

    fn schedule_retry(&mut self, now: Instant) {
        self.stream_ok = false;
        if self.retry_at.is_none() {
            self.retry_at = Some(now + self.retry_wait);
            self.retry_wait = (self.retry_wait * 2).min(Duration::from_secs(5));
        }
    }
}

/// An epoch from the stream's name and creation time: `[0-9A-Za-z]`, the same on every
/// node, new when the stream is created again.
pub fn epoch_of(stream: &str, created: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in stream.bytes().chain([0]).chain(created.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    const D: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut s = String::with_capacity(11);
    for _ in 0..11 {
        s.push(D[(h % 62) as usize] as char);
        h /= 62;
    }
    s
}

/// Stream and consumer sequences and pending count from a JetStream delivery's reply
/// subject: `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`, or
/// the longer form with domain and account hash (nats-server 2.10 on).
pub fn ack_info(reply: &[u8]) -> Option<(u64, u64, u64)> {
    let s = std::str::from_utf8(reply).ok()?;
    let t: Vec<&str> = s.split('.').collect();
    if t.len() < 9 || t[0] != "$JS" || t[1] != "ACK" {
        return None;
    }
    let base = if t.len() == 9 { 2 } else { 4 };
    let n = |i: usize| t.get(base + i).and_then(|x| x.parse::<u64>().ok());
    Some((n(3)?, n(4)?, n(6)?))
}

/// `payload` (a relayed `PUB t` message) with `offset` and `epoch` headers after its
/// first line.
fn stamped(
    pool: &mut crate::protocol::PacketPool,
    payload: &[u8],
    offset: u64,
    epoch: &str,
) -> Option<Rc<Packet>> {
    let eol = memchr::memmem::find(payload, b"\r\n")? + 2;
    let mut d = [0u8; 20];
    let text = crate::protocol::encode::fmt_u64(offset, &mut d);
    let len = payload.len() + text.len() + epoch.len() + 20;
    Some(pool.build(len, false, |b| {
        b.extend_from_slice(&payload[..eol]);
        b.extend_from_slice(b"offset: ");
        b.extend_from_slice(text);
        b.extend_from_slice(b"\r\nepoch: ");
        b.extend_from_slice(epoch.as_bytes());
        b.extend_from_slice(b"\r\n");
        b.extend_from_slice(&payload[eol..]);
    }))
}

fn json_u64(v: &serde_json::Value, path: &[&str]) -> Option<u64> {
    let mut v = v;
    for p in path {
        v = v.get(p)?;
    }
    v.as_u64()
}

fn api_error(v: &serde_json::Value) -> Option<String> {
    let e = v.get("error")?;
    Some(format!(
        "{} ({})",
        e.get("description")
            .and_then(|d| d.as_str())
            .unwrap_or("no description"),
        e.get("err_code").and_then(|c| c.as_u64()).unwrap_or(0)
    ))
}

impl Cluster {
    /// Keep history for `settings`' topics in JetStream.
    pub fn enable_history(&mut self, settings: &HistorySettings, storage: Storage) {
        let name = self.cluster_name().to_owned();
        self.js = Some(Box::new(Js {
            settings: settings.clone(),
            storage,
            stream: format!("MM_{name}").into(),
            hist_prefix: format!("{name}.hist.").into_bytes().into(),
            js_prefix: format!("{name}.js.{}.", self.node).into_bytes().into(),
            epoch: None,
            created: None,
            stream_ok: false,
            live: None,
            next_gen: 1,
            last_sseq: 0,
            read_all: false,
            calls: HashMap::default(),
            next_call: 1,
            retry_at: None,
            retry_wait: Duration::from_millis(250),
            acks: VecDeque::new(),
            recs: HashMap::default(),
            rec_topics: HashMap::default(),
            next_rec: 1,
            last_info: None,
            stats: JsStats::default(),
        }));
        let sid = self.sid_for(Sid::JsApi);
        self.write_sub(sid);
    }

    /// A reload's `[[history]]`, for new messages: the stream keeps its messages and its
    /// epoch, and takes the new limits (`STREAM.UPDATE`; refused, the old ones stay and a
    /// warning says so). History turned on by a reload makes the stream as at start;
    /// turned off, this node writes no more to it and still delivers what other nodes
    /// write there.
    pub fn reconfigure_history(
        &mut self,
        settings: &HistorySettings,
        storage: Storage,
        now: Instant,
    ) {
        match self.js.as_mut() {
            None if settings.rules.is_empty() => {}
            None => {
                self.enable_history(settings, storage);
                if self.connected {
                    self.js_connected(now);
                }
            }
            Some(js) if js.settings == *settings => {}
            Some(js) => {
                js.settings = settings.clone();
                // Not ready yet: the next STREAM.CREATE carries the new limits.
                if self.connected && js.stream_ok && !settings.rules.is_empty() {
                    let stream = js.stream.clone();
                    self.update_stream(&stream, now);
                }
            }
        }
    }

    /// The subject a `Sid::Js*` subscription is on.
    pub(crate) fn js_sub_subject(&self, sid: &Sid) -> Option<Vec<u8>> {
        let js = self.js.as_ref()?;
        let mut s = js.js_prefix.to_vec();
        match sid {
            Sid::JsApi => s.extend_from_slice(b"api.>"),
            Sid::JsLive(g) => s.extend_from_slice(format!("live.{g}").as_bytes()),
            Sid::JsRec(id) => s.extend_from_slice(format!("rec.{id}").as_bytes()),
            _ => return None,
        }
        Some(s)
    }

    /// Asks JetStream to give `stream` this node's limits (`STREAM.UPDATE`).
    fn update_stream(&mut self, stream: &str, now: Instant) {
        if let Some(cfg) = self.stream_config() {
            self.js_call(
                &format!("$JS.API.STREAM.UPDATE.{stream}"),
                &cfg,
                Call::Update,
                now,
            );
        }
    }

    /// A JetStream API request (on the control lane: ahead of the data).
    fn js_call(&mut self, api: &str, payload: &[u8], call: Call, now: Instant) {
        let Some(js) = self.js.as_mut() else {
            return;
        };
        if !self.connected {
            return;
        }
        let id = js.next_call;
        js.next_call += 1;
        let mut reply = js.js_prefix.to_vec();
        reply.extend_from_slice(b"api.");
        reply.extend_from_slice(id.to_string().as_bytes());
        js.calls.insert(id, (call, now + API_TIMEOUT));
        let ok = self
            .lanes
            .push_ctl(|b| proto::pub_parts(b, api.as_bytes(), Some(&reply), b"", payload).is_ok());
        if ok {
            self.stats.messages_out += 1;
        }
    }

    fn stream_config(&self) -> Option<Vec<u8>> {
        let js = self.js.as_ref()?;
        let ttl = js
            .settings
            .rules
            .iter()
            .map(|r| r.ttl)
            .max()
            .unwrap_or(Duration::from_secs(60));
        let subjects = format!("{}>", String::from_utf8_lossy(&js.hist_prefix));
        let cfg = serde_json::json!({
            "name": &*js.stream,
            "subjects": [subjects],
            "retention": "limits",
            "max_consumers": -1,
            "max_msgs": -1,
            "max_bytes": js.settings.max_bytes as i64,
            "max_age": ttl.as_nanos() as u64,
            // No per-subject limit: a message pushed out before the consumers delivered
            // it would be lost to live subscribers without a trace. `size` is applied
            // when recovering; memory is bounded by max_bytes.
            "max_msgs_per_subject": -1,
            "max_msg_size": -1,
            "storage": js.storage.name(),
            "discard": "old",
            "num_replicas": 1,
        });
        serde_json::to_vec(&cfg).ok()
    }

    /// The backplane is up: make sure of the stream, then start the live consumer.
    pub fn js_connected(&mut self, now: Instant) {
        let Some(js) = self.js.as_mut() else {
            return;
        };
        js.stream_ok = false;
        js.retry_at = None;
        let stream = js.stream.clone();
        if let Some(cfg) = self.stream_config() {
            self.js_call(
                &format!("$JS.API.STREAM.CREATE.{stream}"),
                &cfg,
                Call::Create,
                now,
            );
        }
    }

    /// The backplane is down: the consumers are gone with it; recoveries fail.
    pub fn js_disconnected(&mut self) {
        let Some(js) = self.js.as_mut() else {
            return;
        };
        js.stream_ok = false;
        js.live = None;
        js.calls.clear();
        js.stats.writes_failed += js.acks.len() as u64;
        js.acks.clear();
        for r in js.recs.values_mut() {
            r.failed = true;
        }
        self.sids
            .retain(|_, s| !matches!(s, Sid::JsLive(_) | Sid::JsRec(_)));
    }

    /// Drop the live consumer (its subscription, and the consumer itself if created).
    fn drop_live(&mut self, now: Instant) {
        let Some(js) = self.js.as_mut() else {
            return;
        };
        let Some(old) = js.live.take() else {
            return;
        };
        let stream = js.stream.clone();
        self.sids.remove(&old.sid);
        self.write_unsub(old.sid);
        if let Some(name) = old.name {
            self.js_call(
                &format!("$JS.API.CONSUMER.DELETE.{stream}.{name}"),
                b"",
                Call::Ignored,
                now,
            );
        }
    }

    /// (Re)create the live consumer: from the sequence after the last one delivered,
    /// else from the first of a stream created again, else from new messages.
    fn start_live(&mut self, now: Instant) {
        if self.js.as_ref().is_some_and(|js| js.live.is_some()) {
            if let Some(js) = self.js.as_mut() {
                js.stats.restarts += 1;
            }
            self.drop_live(now);
        }
        let Some(js) = self.js.as_mut() else {
            return;
        };
        let gen = js.next_gen;
        js.next_gen += 1;
        let stream = js.stream.clone();
        let mut deliver = js.js_prefix.to_vec();
        deliver.extend_from_slice(format!("live.{gen}").as_bytes());
        let mut config = serde_json::json!({
            "deliver_subject": String::from_utf8_lossy(&deliver),
            "ack_policy": "none",
            "replay_policy": "instant",
            "flow_control": true,
            "idle_heartbeat": IDLE_HEARTBEAT.as_nanos() as u64,
            "mem_storage": true,
            "num_replicas": 1,
            "inactive_threshold": 30_000_000_000u64,
        });
        if js.last_sseq > 0 {
            config["deliver_policy"] = "by_start_sequence".into();
            config["opt_start_seq"] = (js.last_sseq + 1).into();
        } else if js.read_all {
            config["deliver_policy"] = "all".into();
        } else {
            config["deliver_policy"] = "new".into();
        }
        let req = serde_json::json!({ "stream_name": &*stream, "config": config });
        let sid = self.sid_for(Sid::JsLive(gen));
        self.write_sub(sid);
        if let Some(js) = self.js.as_mut() {
            js.live = Some(Live {
                gen,
                sid,
                ok: false,
                name: None,
                heard: now,
                last_cseq: 0,
            });
        }
        if let Ok(body) = serde_json::to_vec(&req) {
            self.js_call(
                &format!("$JS.API.CONSUMER.CREATE.{stream}"),
                &body,
                Call::Live(gen),
                now,
            );
        }
    }

    /// Publish a history message (a relayed PUB) to the stream; false when it could
    /// not go (counted as a failed write).
    pub fn js_publish(&mut self, topic: &[u8], payload: &[u8], now: Instant) -> bool {
        let Some(js) = self.js.as_ref() else {
            return false;
        };
        let mut s = js.hist_prefix.to_vec();
        subject::encode(topic, &mut s);
        let mut reply = js.js_prefix.to_vec();
        reply.extend_from_slice(b"api.ack");
        let ok = self.publish_data(&s, Some(&reply), b"", payload);
        if let Some(js) = self.js.as_mut() {
            if ok {
                js.acks.push_back(now);
            } else {
                js.stats.writes_failed += 1;
            }
        }
        ok
    }

    /// The topic of a `<cluster>.hist.<token>` subject.
    fn hist_topic(&self, subject: &[u8]) -> Option<Vec<u8>> {
        let js = self.js.as_ref()?;
        subject::decode(subject.strip_prefix(&*js.hist_prefix)?)
    }

    /// An answer on the `js` inbox: an API call's or a publish ack.
    fn on_js_api(&mut self, msg: &proto::Msg<'_>, now: Instant) -> Option<(u64, JsAnswer)> {
        let js = self.js.as_mut()?;
        let rest = msg.subject.strip_prefix(&*js.js_prefix)?;
        let rest = rest.strip_prefix(b"api.")?;
        if rest == b"ack" {
            js.acks.pop_front();
            let failed = msg.is_no_responders()
                || msg.status().is_some_and(|s| s >= 400)
                || memchr::memmem::find(msg.payload, b"\"error\"").is_some();
            if failed {
                js.stats.writes_failed += 1;
                if js.stream_ok {
                    warn!(
                        "cluster history: JetStream refused a write ({}); history topics are \
                         relayed without history until the stream is back",
                        String::from_utf8_lossy(msg.payload)
                    );
                }
                js.schedule_retry(now);
            } else {
                js.stats.writes_ok += 1;
            }
            return None;
        }
        let id: u64 = std::str::from_utf8(rest).ok()?.parse().ok()?;
        let (call, _) = js.calls.remove(&id)?;
        let v: serde_json::Value = if msg.is_no_responders() {
            serde_json::json!({"error": {"description": "JetStream not enabled (no responders)", "err_code": 503}})
        } else {
            serde_json::from_slice(msg.payload).unwrap_or_else(
                |_| serde_json::json!({"error": {"description": "unreadable answer", "err_code": 0}}),
            )
        };
        match call {
            Call::Create | Call::Update | Call::Info => {
                if let Some(e) = api_error(&v) {
                    if matches!(call, Call::Create)
                        && v.pointer("/error/err_code").and_then(|c| c.as_u64()) == Some(10058)
                    {
                        // Created earlier with other limits: take this node's.
                        let stream = js.stream.clone();
                        self.update_stream(&stream, now);
                        return None;
                    }
                    if matches!(call, Call::Update) {
                        warn!("cluster history: the stream's limits could not be updated: {e}; using it as it is");
                        let stream = js.stream.clone();
                        self.js_call(
                            &format!("$JS.API.STREAM.INFO.{stream}"),
                            b"",
                            Call::Info,
                            now,
                        );
                        return None;
                    }
                    if js.stream_ok || js.retry_wait <= Duration::from_millis(500) {
                        warn!(
                            "cluster history: JetStream stream {} unavailable: {e}; history \
                             topics are relayed without history meanwhile",
                            js.stream
                        );
                    }
                    js.schedule_retry(now);
                    return None;
                }
                js.stats.messages = json_u64(&v, &["state", "messages"]).unwrap_or(0);
                js.stats.bytes = json_u64(&v, &["state", "bytes"]).unwrap_or(0);
                js.stats.subjects = json_u64(&v, &["state", "num_subjects"]).unwrap_or(0);
                let created = v.get("created").and_then(|c| c.as_str()).unwrap_or("");
                let new_epoch = js.created.as_deref() != Some(created);
                if new_epoch {
                    let epoch = epoch_of(&js.stream, created);
                    if js.created.is_some() {
                        warn!(
                            "cluster history: stream {} was created again: new epoch {epoch}",
                            js.stream
                        );
                    } else {
                        info!(
                            "cluster history: JetStream stream {} ({} storage), epoch {epoch}",
                            js.stream,
                            js.storage.name()
                        );
                    }
                    // A stream created again holds only messages new to this node.
                    js.read_all = js.created.is_some();
                    js.last_sseq = 0;
                    js.created = Some(created.into());
                    js.epoch = Some(epoch.into());
                }
                js.stream_ok = true;
                js.retry_at = None;
                js.retry_wait = Duration::from_millis(250);
                if new_epoch || js.live.is_none() {
                    self.start_live(now);
                }
                None
            }
            Call::Live(gen) => {
                let live = js.live.as_mut().filter(|l| l.gen == gen)?;
                if let Some(e) = api_error(&v) {
                    warn!("cluster history: live consumer not created: {e}");
                    js.live = None;
                    js.schedule_retry(now);
                    return None;
                }
                live.ok = true;
                live.heard = now;
                live.name = v.get("name").and_then(|n| n.as_str()).map(Into::into);
                // Deliveries may have come before this answer (sequences already
                // counted); the consumer's start tells where "new" began.
                if let Some(s) = json_u64(&v, &["delivered", "stream_seq"]) {
                    js.last_sseq = js.last_sseq.max(s);
                }
                None
            }
            Call::Rec(id) => Some((id, JsAnswer::Rec(v))),
            Call::Ignored => None,
        }
    }

    /// Timers: API and ack deadlines, retries, the live consumer's silence, the
    /// stream's totals. Returns the recoveries to end (failed or out of time).
    pub fn js_tick(&mut self, now: Instant) -> Vec<u64> {
        let Some(js) = self.js.as_mut() else {
            return Vec::new();
        };
        while js.acks.front().is_some_and(|&t| now >= t + ACK_TIMEOUT) {
            js.acks.pop_front();
            js.stats.writes_failed += 1;
        }
        let mut expired = Vec::new();
        js.calls.retain(|_, (call, deadline)| {
            let keep = now < *deadline;
            if !keep {
                expired.push(*call);
            }
            keep
        });
        let mut ended: Vec<u64> = js
            .recs
            .iter()
            .filter(|(_, r)| r.failed || now >= r.deadline)
            .map(|(&id, _)| id)
            .collect();
        for call in expired {
            match call {
                Call::Create | Call::Update | Call::Info | Call::Live(_) => {
                    if js.stream_ok {
                        warn!("cluster history: JetStream did not answer in {API_TIMEOUT:?}");
                    }
                    if matches!(call, Call::Live(_)) {
                        js.live = None;
                    }
                    js.schedule_retry(now);
                }
                Call::Rec(id) => ended.push(id),
                Call::Ignored => {}
            }
        }
        if !self.connected {
            return ended;
        }
        let Some(js) = self.js.as_mut() else {
            return ended;
        };
        if js.retry_at.is_some_and(|t| now >= t) {
            js.retry_at = None;
            self.js_connected_retry(now);
        } else if js.stream_ok {
            let silent = js.live.as_ref().is_some_and(|l| {
                l.ok && now.saturating_duration_since(l.heard) > 3 * IDLE_HEARTBEAT
            });
            if silent {
                warn!("cluster history: the live consumer fell silent; creating it again");
                self.start_live(now);
            } else if js
                .last_info
                .is_none_or(|t| now.saturating_duration_since(t) >= INFO_EVERY)
            {
                js.last_info = Some(now);
                let stream = js.stream.clone();
                self.js_call(
                    &format!("$JS.API.STREAM.INFO.{stream}"),
                    b"",
                    Call::Info,
                    now,
                );
            }
        }
        ended
    }

    fn js_connected_retry(&mut self, now: Instant) {
        self.drop_live(now);
        let Some(js) = self.js.as_ref() else {
            return;
        };
        let stream = js.stream.clone();
        if let Some(cfg) = self.stream_config() {
            self.js_call(
                &format!("$JS.API.STREAM.CREATE.{stream}"),
                &cfg,
                Call::Create,
                now,
            );
        }
    }

    /// Answer a flow-control request of the live consumer.
    fn js_flow_reply(&mut self, reply: &[u8]) {
        if reply.is_empty() || !self.connected {
            return;
        }
        self.lanes
            .push_ctl(|b| proto::pub_parts(b, reply, None, b"", b"").is_ok());
    }
}

/// What an API answer means to the broker.
enum JsAnswer {
    Rec(serde_json::Value),
}

impl Broker {
    /// Keep history in JetStream (a cluster node with `[[history]]` tables).
    pub fn cluster_history(&mut self, settings: &HistorySettings, storage: Storage) {
        if let Some(c) = self.cluster.as_mut() {
            c.enable_history(settings, storage);
        }
    }

    /// A reload's `[[history]]` in a cluster ([`Cluster::reconfigure_history`]).
    pub fn reconfigure_cluster_history(
        &mut self,
        settings: &HistorySettings,
        storage: Storage,
        now: Instant,
    ) {
        if let Some(c) = self.cluster.as_mut() {
            c.reconfigure_history(settings, storage, now);
        }
    }

    /// Whether `topic` keeps history in the cluster's JetStream.
    pub(crate) fn cluster_keeps(&self, topic: &[u8]) -> bool {
        self.cluster
            .as_ref()
            .and_then(|c| c.js.as_ref())
            .is_some_and(|js| js.keeps(topic))
    }

    /// A PUB to a history topic in a cluster: to the stream when JetStream is ready
    /// (every node, this one included, delivers it from there), else relayed as a plain
    /// topic and counted as a failed write.
    pub(crate) fn publish_cluster_history(
        &mut self,
        from: ConnId,
        msg: &Message<'_>,
        now: Instant,
        out: &mut impl Outbox,
    ) {
        let session = self.sessions.get(from).and_then(Option::as_ref);
        let pkt = relay_packet(&mut self.pool, session, msg, &[b"offset", b"epoch"], &[]);
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        let ready = c.js.as_ref().is_some_and(|js| js.ready());
        if ready && c.connected {
            c.js_publish(msg.target, pkt.payload(), now);
            self.pool.give(pkt);
            return;
        }
        if let Some(js) = c.js.as_mut() {
            js.stats.writes_failed += 1;
        }
        c.publish_pub(msg.target, pkt.payload());
        let topic = self.router.lookup(msg.target);
        let subs: &[ConnId] = topic
            .and_then(|id| self.router.topic(id))
            .map_or(&[], |t| &t.subs);
        for &s in subs {
            out.send(s, &pkt);
        }
        self.stats.delivered_pub += subs.len() as u64;
        for &m in &self.monitors {
            if !topic.is_some_and(|t| self.router.is_subscribed_id(m, t)) {
                out.send(m, &pkt);
            }
        }
    }

    /// A message of the live consumer: deliver it here, stamped, in stream order.
    pub(crate) fn on_js_live(
        &mut self,
        gen: u64,
        msg: &proto::Msg<'_>,
        now: Instant,
        out: &mut impl Outbox,
    ) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        let Some(js) = c.js.as_mut() else {
            return;
        };
        let Some(live) = js.live.as_mut().filter(|l| l.gen == gen) else {
            return;
        };
        live.heard = now;
        if let Some(status) = msg.status() {
            if status == 100 {
                if let Some(reply) = msg.reply.filter(|r| !r.is_empty()) {
                    let reply = reply.to_vec();
                    c.js_flow_reply(&reply);
                    return;
                }
                // An idle heartbeat: a message this node never got means a gap.
                let last = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(b"Nats-Last-Consumer"))
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok());
                if last.is_some_and(|l| l > live.last_cseq) {
                    warn!("cluster history: the live consumer skipped messages; reading from the last seen");
                    c.start_live(now);
                }
            } else if status >= 400 {
                warn!(
                    "cluster history: the live consumer ended (status {status}); creating it again"
                );
                c.start_live(now);
            }
            return;
        }
        let Some((sseq, cseq, _)) = msg.reply.and_then(ack_info) else {
            return;
        };
        if cseq != live.last_cseq + 1 {
            warn!(
                "cluster history: gap in the live consumer ({} after {}); reading from stream sequence {}",
                cseq,
                live.last_cseq,
                js.last_sseq + 1
            );
            c.start_live(now);
            return;
        }
        live.last_cseq = cseq;
        if sseq <= js.last_sseq {
            return; // seen already (before a restart)
        }
        js.last_sseq = sseq;
        let Some(epoch) = js.epoch.clone() else {
            return;
        };
        let Some(topic) = c.hist_topic(msg.subject) else {
            return;
        };
        self.deliver_live(&topic, msg.payload, sseq, &epoch, out);
        self.end_passed_recoveries(sseq, out);
    }

    /// Deliver message `sseq` of `topic` to the local subscribers (held for those
    /// recovering) and monitors.
    fn deliver_live(
        &mut self,
        topic: &[u8],
        payload: &[u8],
        sseq: u64,
        epoch: &str,
        out: &mut impl Outbox,
    ) {
        let Some(c) = self.cluster.as_ref() else {
            return;
        };
        let holding: Vec<u64> =
            c.js.as_ref()
                .and_then(|js| js.rec_topics.get(topic).cloned())
                .unwrap_or_default();
        let id = self.router.lookup(topic);
        let subs: &[ConnId] = id
            .and_then(|i| self.router.topic(i))
            .map_or(&[], |t| &t.subs);
        if subs.is_empty() && self.monitors.is_empty() {
            return;
        }
        let Some(pkt) = stamped(&mut self.pool, payload, sseq, epoch) else {
            return;
        };
        let mut held: Vec<ConnId> = Vec::new();
        if !holding.is_empty() {
            if let Some(js) = self.cluster.as_mut().and_then(|c| c.js.as_mut()) {
                for rid in &holding {
                    if let Some(r) = js.recs.get_mut(rid) {
                        r.held_bytes += pkt.capacity();
                        r.held.push((sseq, pkt.clone()));
                        if r.held_bytes > HOLD_MAX {
                            r.failed = true;
                        }
                        held.push(r.conn);
                    }
                }
            }
        }
        for &s in subs {
            if !held.contains(&s) {
                out.send(s, &pkt);
            }
        }
        self.stats.delivered_pub += subs.len() as u64;
        for &m in &self.monitors {
            if !id.is_some_and(|t| self.router.is_subscribed_id(m, t)) {
                out.send(m, &pkt);
            }
        }
    }

    /// `SUB t` with `since` on a cluster node keeping history in JetStream: start the
    /// recovery (the subscription itself is made at once; live messages for it are held
    /// until `SYS:RECOVERY`).
    pub(crate) fn cluster_recover(
        &mut self,
        conn: ConnId,
        topic: &[u8],
        since: Since<'_>,
        now: Instant,
        out: &mut impl Outbox,
    ) {
        let cid: Box<str> = self.cid(conn).unwrap_or("").into();
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        let Some(js) = c.js.as_mut() else {
            return;
        };
        if !js.keeps(topic) {
            return out.send(conn, &Rc::new(recovery_packet(topic, false, None)));
        }
        let epoch = js.epoch.clone();
        if !js.ready() || !c.connected || js.recs.len() >= MAX_RECOVERIES || epoch.is_none() {
            js.stats.recoveries[1] += 1;
            return out.send(conn, &Rc::new(recovery_packet(topic, false, None)));
        }
        let mode = match since {
            Since::Last => Mode::Last,
            Since::At(e, o) if Some(e) == epoch.as_deref() => Mode::Replay(o),
            Since::At(..) => Mode::Position,
        };
        // One recovery per connection and topic: a newer one replaces it.
        if let Some(ids) = js.rec_topics.get(topic) {
            let old: Vec<u64> = ids
                .iter()
                .copied()
                .filter(|id| js.recs.get(id).is_some_and(|r| r.conn == conn))
                .collect();
            for id in old {
                if let Some(r) = js.recs.get_mut(&id) {
                    r.failed = true;
                    r.held.clear();
                }
            }
        }
        let size_for = js.size_for(topic);
        let id = js.next_rec;
        js.next_rec += 1;
        let stream = js.stream.clone();
        let mut filter = js.hist_prefix.to_vec();
        subject::encode(topic, &mut filter);
        let mut deliver = js.js_prefix.to_vec();
        deliver.extend_from_slice(format!("rec.{id}").as_bytes());
        let mut config = serde_json::json!({
            "deliver_subject": String::from_utf8_lossy(&deliver),
            "filter_subject": String::from_utf8_lossy(&filter),
            "ack_policy": "none",
            "replay_policy": "instant",
            "mem_storage": true,
            "num_replicas": 1,
            "inactive_threshold": 10_000_000_000u64,
        });
        match mode {
            Mode::Replay(o) => {
                config["deliver_policy"] = "by_start_sequence".into();
                config["opt_start_seq"] = o.max(1).into();
            }
            Mode::Last | Mode::Position => config["deliver_policy"] = "last_per_subject".into(),
        }
        js.rec_topics.entry(topic.into()).or_default().push(id);
        let sid = c.sid_for(Sid::JsRec(id));
        if let Some(js) = c.js.as_mut() {
            js.recs.insert(
                id,
                Rec {
                    conn,
                    cid,
                    topic: topic.into(),
                    mode,
                    sid,
                    consumer: None,
                    deadline: now + RECOVERY_TIMEOUT,
                    started: now,
                    complete: None,
                    size: size_for,
                    at: match mode {
                        Mode::Replay(o) => o,
                        _ => 0,
                    },
                    received: 0,
                    created: None,
                    held: Vec::new(),
                    held_bytes: 0,
                    failed: false,
                    read: false,
                },
            );
        }
        c.write_sub(sid);
        let req = serde_json::json!({ "stream_name": &*stream, "config": config });
        if let Ok(body) = serde_json::to_vec(&req) {
            c.js_call(
                &format!("$JS.API.CONSUMER.CREATE.{stream}"),
                &body,
                Call::Rec(id),
                now,
            );
        }
    }

    /// An answer on the `js` inbox.
    pub(crate) fn on_js_api(&mut self, msg: &proto::Msg<'_>, now: Instant, out: &mut impl Outbox) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        let Some((id, JsAnswer::Rec(v))) = c.on_js_api(msg, now) else {
            return;
        };
        let Some(r) = c.js.as_mut().and_then(|js| js.recs.get_mut(&id)) else {
            return;
        };
        if api_error(&v).is_some() {
            r.failed = true;
            return self.end_recovery(id, out);
        }
        r.consumer = v.get("name").and_then(|n| n.as_str()).map(Into::into);
        let pending = json_u64(&v, &["num_pending"]).unwrap_or(0);
        let delivered = json_u64(&v, &["delivered", "consumer_seq"]).unwrap_or(0);
        r.created = Some((pending, delivered));
        if pending == 0 && r.received >= delivered {
            self.replay_read(id, out);
        }
    }

    /// A message of a recovery's consumer.
    pub(crate) fn on_js_rec(
        &mut self,
        id: u64,
        msg: &proto::Msg<'_>,
        now: Instant,
        out: &mut impl Outbox,
    ) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        let Some(js) = c.js.as_mut() else {
            return;
        };
        let epoch = js.epoch.clone();
        let Some(r) = js.recs.get_mut(&id).filter(|r| !r.read) else {
            return;
        };
        if msg.status().is_some() {
            return;
        }
        let Some((sseq, _, pending)) = msg.reply.and_then(ack_info) else {
            return;
        };
        r.received += 1;
        // A replay that progresses is given time (bounded); a silent one ends.
        r.deadline = (now + RECOVERY_TIMEOUT).min(r.started + RECOVERY_LIMIT);
        let send = match r.mode {
            Mode::Replay(o) => {
                // The asked message still stored proves nothing after it was dropped
                // (every limit drops oldest first); more than `size` after it is more
                // than the topic keeps, as on one node.
                let size = r.size;
                let complete = *r
                    .complete
                    .get_or_insert(o > 0 && sseq == o && pending <= size);
                if complete && sseq > o {
                    r.at = sseq;
                    true
                } else {
                    if !complete {
                        r.at = sseq;
                    }
                    false
                }
            }
            Mode::Last => {
                r.at = sseq;
                true
            }
            Mode::Position => {
                r.at = sseq;
                false
            }
        };
        let conn = r.conn;
        // Done when the consumer has nothing more, or when it reaches the live messages
        // held meanwhile (with publishers going on, it would never run out).
        let done = pending == 0
            || r.created.is_some_and(|(p, d)| p == 0 && r.received >= d)
            || r.held.first().is_some_and(|(s, _)| sseq >= *s);
        if send && !r.failed {
            if let Some(pkt) = epoch
                .as_deref()
                .and_then(|e| stamped(&mut self.pool, msg.payload, sseq, e))
            {
                out.send(conn, &pkt);
                self.stats.delivered_pub += 1;
            }
        }
        if done {
            self.replay_read(id, out);
        }
    }

    /// Recovery `id` has read its replay: it ends once the live consumer has passed the
    /// position it reports (at once, usually).
    fn replay_read(&mut self, id: u64, out: &mut impl Outbox) {
        let Some(js) = self.cluster.as_mut().and_then(|c| c.js.as_mut()) else {
            return;
        };
        let live = js.last_sseq;
        let Some(r) = js.recs.get_mut(&id) else {
            return;
        };
        r.read = true;
        if r.failed || live >= r.at {
            self.end_recovery(id, out);
        }
    }

    /// End the recoveries that read their replay and whose position the live consumer
    /// has now reached (`sseq`, delivered or held a moment ago).
    fn end_passed_recoveries(&mut self, sseq: u64, out: &mut impl Outbox) {
        let Some(js) = self.cluster.as_ref().and_then(|c| c.js.as_ref()) else {
            return;
        };
        if js.recs.is_empty() {
            return;
        }
        let done: Vec<u64> = js
            .recs
            .iter()
            .filter(|(_, r)| r.read && sseq >= r.at)
            .map(|(&id, _)| id)
            .collect();
        for id in done {
            self.end_recovery(id, out);
        }
    }

    /// Recoveries out of time or failed, from the tick.
    pub(crate) fn js_housekeeping(&mut self, now: Instant, out: &mut impl Outbox) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        for id in c.js_tick(now) {
            let r = self
                .cluster
                .as_mut()
                .and_then(|c| c.js.as_mut())
                .and_then(|js| js.recs.get_mut(&id));
            if let Some(r) = r {
                r.failed = true;
            }
            self.end_recovery(id, out);
        }
    }

    /// End recovery `id`: `SYS:RECOVERY`, then the live messages held after the position
    /// reported; its consumer and subscription go.
    fn end_recovery(&mut self, id: u64, out: &mut impl Outbox) {
        let now = self.clock.unwrap_or_else(Instant::now);
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        let Some(js) = c.js.as_mut() else {
            return;
        };
        let Some(r) = js.recs.remove(&id) else {
            return;
        };
        if let Some(ids) = js.rec_topics.get_mut(&r.topic) {
            ids.retain(|x| *x != id);
            if ids.is_empty() {
                js.rec_topics.remove(&r.topic);
            }
        }
        let stream = js.stream.clone();
        let epoch = js.epoch.clone();
        let (recovered, at) = if r.failed {
            (false, None)
        } else {
            match r.mode {
                Mode::Replay(_) => (r.complete == Some(true), Some(r.at)),
                Mode::Last => (true, Some(r.at)),
                Mode::Position => (false, Some(r.at)),
            }
        };
        let slot = match (r.failed, r.mode, recovered) {
            (false, Mode::Last, _) => 2,
            (_, _, true) => 0,
            _ => 1,
        };
        js.stats.recoveries[slot] += 1;
        c.sids.remove(&r.sid);
        c.write_unsub(r.sid);
        if let Some(name) = &r.consumer {
            c.js_call(
                &format!("$JS.API.CONSUMER.DELETE.{stream}.{name}"),
                b"",
                Call::Ignored,
                now,
            );
        }
        // The connection may have gone, or left the topic, meanwhile.
        if self.cid(r.conn) != Some(&*r.cid) || !self.router.is_subscribed(r.conn, &r.topic) {
            return;
        }
        let pos = at.and_then(|a| epoch.as_deref().map(|e| (e, a)));
        let pkt = recovery_packet(&r.topic, recovered, pos);
        out.send(r.conn, &Rc::new(pkt));
        let after = at.unwrap_or(0);
        for (seq, p) in &r.held {
            if *seq > after {
                out.send(r.conn, p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_subjects_both_forms() {
        assert_eq!(
            ack_info(b"$JS.ACK.MM_mm.abc.1.42.7.1700000000000000000.3"),
            Some((42, 7, 3))
        );
        assert_eq!(
            ack_info(b"$JS.ACK._.ACCHASH.MM_mm.abc.1.42.7.1700000000000000000.0.rnd"),
            Some((42, 7, 0))
        );
        assert_eq!(ack_info(b"$JS.ACK.x.y"), None);
        assert_eq!(ack_info(b"foo.bar.a.b.c.d.e.f.g"), None);
    }

    #[test]
    fn epochs_follow_creation_time() {
        let a = epoch_of("MM_mm", "2026-12-07T07:00:00.1Z");
        assert_eq!(a, epoch_of("MM_mm", "2026-12-07T07:00:00.1Z"));
        assert_ne!(a, epoch_of("MM_mm", "2026-12-07T07:00:00.2Z"));
        assert_eq!(a.len(), 11);
        assert!(a.bytes().all(|b| b.is_ascii_alphanumeric()));
    }

    #[test]
    fn stamping_puts_the_headers_after_the_first_line() {
        let mut pool = crate::protocol::PacketPool::default();
        let p = stamped(&mut pool, b"PUB h.a\r\ncid: x\r\n\r\nhi\r\n.\r\n", 17, "E1").unwrap();
        assert_eq!(
            p.payload(),
            b"PUB h.a\r\noffset: 17\r\nepoch: E1\r\ncid: x\r\n\r\nhi\r\n.\r\n"
        );
        assert!(stamped(&mut pool, b"no line end", 1, "E").is_none());
    }
}
