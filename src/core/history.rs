//! History (PROTOCOL.md §9.5) on one node, pure: per-topic rings of the relayed packets
//! (the same `Rc<Packet>` the fan-out queues hold, so storing copies nothing), an epoch
//! drawn at start, and eviction by `size` (at once), by `ttl` and by the total byte cap
//! (in the housekeeping pass, oldest first).
//!
//! Offsets come from one sequence for all topics: each topic's offsets strictly
//! increase (not by 1), and a topic evicted whole and published again later never
//! reuses an offset in the same epoch. A recovery is complete when no message of the
//! topic after the asked offset was evicted: each topic remembers the highest offset it
//! lost, and a topic created again starts from the highest offset any topic evicted
//! whole had (conservative: such a recovery answers `recovered: false`).

use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use foldhash::HashMap;

use crate::protocol::Packet;

/// One `[[history]]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRule {
    /// Topics starting with it keep history (the longest matching prefix wins).
    pub prefix: String,
    /// Messages kept per topic.
    pub size: usize,
    /// How long a message is kept.
    pub ttl: Duration,
}

/// History settings: the rules and the cap over all of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistorySettings {
    /// The `[[history]]` tables.
    pub rules: Vec<HistoryRule>,
    /// `[limits] max_history_bytes`.
    pub max_bytes: usize,
}

impl Default for HistorySettings {
    fn default() -> Self {
        HistorySettings {
            rules: Vec::new(),
            max_bytes: 64 << 20,
        }
    }
}

/// Memory a stored message costs beyond its packet's heap bytes (the `Rc` and packet
/// headers, its ring slot), counted against the byte cap.
pub const MESSAGE_OVERHEAD: usize = 96;
/// Memory a topic with history costs beyond its name (its map entry, ring and index).
pub const TOPIC_OVERHEAD: usize = 160;

fn cost(p: &Packet) -> usize {
    p.capacity() + MESSAGE_OVERHEAD
}

/// Take `log`'s oldest stored message out (its offset now lost), counted out of the
/// store's `bytes` and `messages`; `None` when the ring is empty.
fn pop_oldest(log: &mut TopicLog, bytes: &mut usize, messages: &mut usize) -> Option<Rc<Packet>> {
    let (o, _, p) = log.ring.pop_front()?;
    log.lost_upto = o;
    *bytes -= cost(&p);
    *messages -= 1;
    Some(p)
}

/// Why stored messages went.
pub const EVICTION_CAUSES: [&str; 3] = ["size", "ttl", "bytes"];

/// Counters.
#[derive(Debug, Clone, Default)]
pub struct HistoryStats {
    /// Messages stored since start.
    pub stored: u64,
    /// Messages evicted, by [`EVICTION_CAUSES`].
    pub evicted: [u64; 3],
    /// Recoveries by outcome: recovered, not recovered, `since: last`.
    pub recoveries: [u64; 3],
}

struct TopicLog {
    /// The newest offset assigned.
    last: u64,
    /// The highest offset of this topic no longer stored (messages at or below it may
    /// be gone).
    lost_upto: u64,
    /// Stored messages, oldest first: (offset, stored at, packet).
    ring: VecDeque<(u64, Instant, Rc<Packet>)>,
}

/// What a recovery finds (§9.5).
#[derive(Debug)]
pub enum Recovery {
    /// Every message after the asked offset, in order (maybe none), and the position
    /// to report (the last replayed, or the asked offset).
    Recovered(Vec<Rc<Packet>>, u64),
    /// Not possible: the topic's current position.
    Lost(u64),
}

/// The history of every topic with a matching rule.
pub struct History {
    rules: Vec<HistoryRule>,
    max_bytes: usize,
    epoch: Box<str>,
    /// `epoch: <epoch>\r\n`, encoded once: every delivery of a history topic carries it.
    epoch_line: Box<[u8]>,
    topics: HashMap<Rc<[u8]>, TopicLog>,
    /// Per rule, the topics by the offset of their oldest stored message (one entry per
    /// topic with something stored; offsets grow with time, so the first is the oldest).
    /// A key may be older than its topic's front (the front went for `size` since): it
    /// is corrected when it comes first, so storing into a full ring touches no index.
    fronts: Vec<BTreeMap<u64, Rc<[u8]>>>,
    bytes: usize,
    messages: usize,
    /// The last offset assigned (any topic).
    seq: u64,
    /// The highest last offset of a topic evicted whole.
    whole_lost: u64,
    /// Counters.
    pub stats: HistoryStats,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "History {{ rules: {}, topics: {}, messages: {}, bytes: {} }}",
            self.rules.len(),
            self.topics.len(),
            self.messages,
            self.bytes
        )
    }
}

impl History {
    /// History under `settings`, with epoch `epoch` (`[0-9A-Za-z]`, new per process).
    pub fn new(settings: &HistorySettings, epoch: &str) -> History {
        History {
            fronts: settings.rules.iter().map(|_| BTreeMap::new()).collect(),
            rules: settings.rules.clone(),
            max_bytes: settings.max_bytes,
            epoch: epoch.into(),
            epoch_line: {
                let mut l = Vec::with_capacity(epoch.len() + 9);
                crate::protocol::encode::push_header(&mut l, b"epoch", epoch.as_bytes());
                l.into()
            },
            topics: HashMap::default(),
            bytes: 0,
            messages: 0,
            seq: 0,
            whole_lost: 0,
            stats: HistoryStats::default(),
        }
    }

    /// The epoch.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// The `epoch` header line, `epoch: <epoch>\r\n` (ASCII).
    pub fn epoch_line(&self) -> &[u8] {
        &self.epoch_line
    }

    /// The rule for `topic` (the longest matching prefix), if any.
    pub fn rule_for(&self, topic: &[u8]) -> Option<usize> {
        let mut best: Option<usize> = None;
        for (i, r) in self.rules.iter().enumerate() {
            if topic.starts_with(r.prefix.as_bytes())
                && best.is_none_or(|b| self.rules[b].prefix.len() < r.prefix.len())
            {
                best = Some(i);
            }
        }
        best
    }

    /// The offset the next stored message gets (whatever its topic).
    pub fn next_offset(&self) -> u64 {
        self.seq + 1
    }

    /// The current position of `topic`: the newest offset assigned (0 when none).
    pub fn position(&self, topic: &[u8]) -> u64 {
        self.topics.get(topic).map_or(0, |t| t.last)
    }

    /// Store `pkt` as `topic`'s message `offset` (from [`History::next_offset`]) under
    /// rule `rule`; the oldest goes when the topic holds `size`.
    pub fn store(
        &mut self,
        topic: &[u8],
        rule: usize,
        offset: u64,
        pkt: &Rc<Packet>,
        now: Instant,
    ) -> Option<Rc<Packet>> {
        let r = self.rules.get(rule)?;
        let size = r.size;
        if size == 0 {
            // Nothing kept: the offset is used up all the same.
            self.seq = self.seq.max(offset);
            return None;
        }
        self.seq = self.seq.max(offset);
        // One look-up per PUB to a topic that has history already (the common case);
        // a new topic is inserted with its key made once. A topic in the map always has
        // a message stored (one left empty goes whole), so only a new one enters its
        // rule's index of fronts.
        let log = match self.topics.get_mut(topic) {
            Some(log) => log,
            None => {
                self.new_topic(topic, rule, offset);
                self.topics.get_mut(topic)?
            }
        };
        log.last = offset;
        log.ring.push_back((offset, now, pkt.clone()));
        self.bytes += cost(pkt);
        self.messages += 1;
        self.stats.stored += 1;
        let mut dropped = None;
        while log.ring.len() > size {
            let Some(p) = pop_oldest(log, &mut self.bytes, &mut self.messages) else {
                break;
            };
            self.stats.evicted[0] += 1;
            dropped = Some(p);
        }
        // The housekeeping pass keeps the cap; a flood between two passes may pass it by
        // an eighth at most, then the oldest go at once.
        if self.bytes > self.max_bytes + self.max_bytes / 8 {
            self.enforce_cap();
        }
        // The packet `size` pushed out, for the caller's pool.
        dropped
    }

    /// A topic's first stored message is coming (offset `first`): its (empty) log,
    /// counted, and in its rule's index of fronts.
    fn new_topic(&mut self, topic: &[u8], rule: usize, first: u64) {
        let key: Rc<[u8]> = topic.into();
        self.bytes += TOPIC_OVERHEAD + topic.len();
        self.fronts[rule].insert(first, key.clone());
        self.topics.insert(
            key,
            TopicLog {
                last: 0,
                lost_upto: self.whole_lost,
                ring: VecDeque::new(),
            },
        );
    }

    /// Evict the oldest messages (any rule) until under the byte cap.
    fn enforce_cap(&mut self) {
        while self.bytes > self.max_bytes {
            let oldest = (0..self.rules.len())
                .filter_map(|r| self.first_front(r).map(|o| (o, r)))
                .min();
            let Some((_, rule)) = oldest else {
                break;
            };
            self.evict_oldest(rule, 2);
        }
    }

    /// Drop messages past their rule's `ttl`, then the oldest until under the byte cap;
    /// topics left empty go whole. Costs O(log topics) per message evicted.
    pub fn housekeeping(&mut self, now: Instant) {
        for rule in 0..self.rules.len() {
            let ttl = self.rules[rule].ttl;
            while let Some((&key, topic)) = self.fronts[rule].first_key_value() {
                let front = self.topics.get(topic).and_then(|l| l.ring.front());
                let (at, stale) = match front {
                    Some((o, at, _)) => (*at, *o != key),
                    None => (now, false),
                };
                if stale {
                    self.correct_front(rule);
                    continue;
                }
                if now.saturating_duration_since(at) < ttl {
                    break;
                }
                self.evict_oldest(rule, 1);
            }
        }
        self.enforce_cap();
    }

    /// The offset of the oldest message stored under `rule` (its index's first entry,
    /// corrected if stale).
    fn first_front(&mut self, rule: usize) -> Option<u64> {
        loop {
            let (&key, topic) = self.fronts[rule].first_key_value()?;
            match self.topics.get(topic).and_then(|l| l.ring.front()) {
                Some((o, ..)) if *o != key => self.correct_front(rule),
                _ => return Some(key),
            }
        }
    }

    /// The first entry of `rule`'s index is stale: move it to its topic's front.
    fn correct_front(&mut self, rule: usize) {
        let Some((_, topic)) = self.fronts[rule].pop_first() else {
            return;
        };
        if let Some((o, ..)) = self.topics.get(&topic).and_then(|l| l.ring.front()) {
            self.fronts[rule].insert(*o, topic);
        }
    }

    /// `topic` goes whole (its ring is empty, or no rule keeps it): its entry's bytes
    /// are given back, and a later recovery of it answers `recovered: false`.
    fn forget_topic(&mut self, topic: &Rc<[u8]>) {
        if let Some(log) = self.topics.remove(topic) {
            self.bytes -= TOPIC_OVERHEAD + topic.len();
            self.whole_lost = self.whole_lost.max(log.last);
        }
    }

    /// Evict the oldest stored message under `rule` (correcting stale index entries on
    /// the way); its topic goes whole if empty.
    fn evict_oldest(&mut self, rule: usize, cause: usize) {
        if self.first_front(rule).is_none() {
            return;
        }
        let Some((_, topic)) = self.fronts[rule].pop_first() else {
            return;
        };
        let Some(log) = self.topics.get_mut(&topic) else {
            return;
        };
        if pop_oldest(log, &mut self.bytes, &mut self.messages).is_some() {
            self.stats.evicted[cause] += 1;
        }
        match log.ring.front() {
            Some((next, ..)) => {
                self.fronts[rule].insert(*next, topic);
            }
            None => self.forget_topic(&topic),
        }
    }

    /// Take new settings (a configuration reload), keeping the epoch and the offsets:
    /// each stored topic goes under the rule that now matches it (the longest prefix),
    /// its ring trimmed to that rule's `size` at once (evictions by `size`); a topic no
    /// rule matches any more loses its stored messages (a later recovery of it answers
    /// `recovered: false`), and the byte cap applies at once. A new `ttl` applies at the
    /// next housekeeping pass. O(topics log topics).
    pub fn reconfigure(&mut self, settings: &HistorySettings) {
        self.rules = settings.rules.clone();
        self.max_bytes = settings.max_bytes;
        self.fronts = self.rules.iter().map(|_| BTreeMap::new()).collect();
        let topics: Vec<Rc<[u8]>> = self.topics.keys().cloned().collect();
        for topic in topics {
            let rule = self.rule_for(&topic);
            let size = rule.map_or(0, |r| self.rules[r].size);
            let Some(log) = self.topics.get_mut(&topic) else {
                continue;
            };
            while log.ring.len() > size {
                if pop_oldest(log, &mut self.bytes, &mut self.messages).is_none() {
                    break;
                }
                if rule.is_some() {
                    self.stats.evicted[0] += 1;
                }
            }
            match (rule, log.ring.front()) {
                (Some(r), Some((front, ..))) => {
                    self.fronts[r].insert(*front, topic);
                }
                _ => self.forget_topic(&topic),
            }
        }
        self.enforce_cap();
    }

    /// Recover `topic` from `since` (epoch, offset) (§9.5).
    pub fn recover(&mut self, topic: &[u8], epoch: &str, offset: u64) -> Recovery {
        let (last, lost_upto) = match self.topics.get(topic) {
            Some(log) => (log.last, log.lost_upto),
            // Nothing stored: nothing was published since start, or it was all evicted
            // (up to `whole_lost` at most).
            None => (0, self.whole_lost),
        };
        let complete = epoch == &*self.epoch && offset >= lost_upto && offset <= self.seq;
        if !complete {
            self.stats.recoveries[1] += 1;
            return Recovery::Lost(last);
        }
        self.stats.recoveries[0] += 1;
        let msgs: Vec<_> = self.topics.get(topic).map_or_else(Vec::new, |log| {
            log.ring
                .iter()
                .filter(|(o, ..)| *o > offset)
                .map(|(.., p)| p.clone())
                .collect()
        });
        let at = if msgs.is_empty() { offset } else { last };
        Recovery::Recovered(msgs, at)
    }

    /// `since: last`: the newest stored message of `topic` and its offset, else the
    /// current position.
    pub fn last(&mut self, topic: &[u8]) -> (Option<Rc<Packet>>, u64) {
        self.stats.recoveries[2] += 1;
        match self.topics.get(topic) {
            Some(log) => match log.ring.back() {
                Some((o, _, p)) => (Some(p.clone()), *o),
                None => (None, log.last),
            },
            None => (None, 0),
        }
    }

    /// Topics with history, stored messages, stored bytes.
    pub fn totals(&self) -> (usize, usize, usize) {
        (self.topics.len(), self.messages, self.bytes)
    }
}

/// A `since` header: `last`, or `<epoch>:<offset>`.
#[derive(Debug, PartialEq, Eq)]
pub enum Since<'a> {
    /// `since: last`.
    Last,
    /// `since: <epoch>:<offset>`.
    At(&'a str, u64),
}

/// Parse a `since` value; `None` if it does not parse (`bad since`).
pub fn parse_since(v: &[u8]) -> Option<Since<'_>> {
    let v = std::str::from_utf8(v).ok()?;
    if v == "last" {
        return Some(Since::Last);
    }
    let (e, o) = v.split_once(':')?;
    if e.is_empty() || !e.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    if o.is_empty() || !o.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(Since::At(e, o.parse().ok()?))
}

/// A random epoch: 10 characters of `[0-9A-Za-z]`.
pub fn new_epoch() -> String {
    const D: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut bytes = [0u8; 10];
    if getrandom::fill(&mut bytes).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes.copy_from_slice(&t.to_le_bytes()[..10]);
    }
    bytes
        .iter()
        .map(|b| D[(*b as usize) % 62] as char)
        .collect()
}

impl crate::broker::Broker {
    /// Give history-enabled settings to the broker (`None` rules: history off, one
    /// branch per PUB).
    pub fn set_history(&mut self, settings: &HistorySettings) {
        self.history =
            (!settings.rules.is_empty()).then(|| Box::new(History::new(settings, &new_epoch())));
    }

    /// New history settings for a running broker (a configuration reload): stored
    /// messages stay, under the same epoch, for every topic a rule still matches
    /// ([`History::reconfigure`]); history turned off drops the store, and turned on
    /// starts one with a new epoch.
    pub fn reconfigure_history(&mut self, settings: &HistorySettings) {
        match (self.history.as_mut(), settings.rules.is_empty()) {
            (Some(_), true) => self.history = None,
            (Some(h), false) => h.reconfigure(settings),
            (None, false) => self.set_history(settings),
            (None, true) => {}
        }
    }

    /// The housekeeping pass's part: ttl and the byte cap.
    pub fn history_housekeeping(&mut self, now: Instant) {
        if let Some(h) = self.history.as_mut() {
            h.housekeeping(now);
        }
    }

    /// `SUB t` with `since` (§9.5), before the subscription itself: the stored messages
    /// after `since` (or the newest), then `SYS:RECOVERY`. Both go through the
    /// connection's queue like live traffic (a replay over the outbound cap cuts the
    /// connection as a slow consumer, never silently short).
    pub(crate) fn recover(
        &mut self,
        conn: crate::router::ConnId,
        topic: &[u8],
        since: Since<'_>,
        out: &mut impl crate::broker::Outbox,
    ) {
        let Some(h) = self
            .history
            .as_mut()
            .filter(|h| h.rule_for(topic).is_some())
        else {
            return out.send(conn, &Rc::new(recovery_packet(topic, false, None)));
        };
        let epoch: Box<str> = h.epoch().into();
        let (msgs, recovered, at) = match since {
            Since::Last => {
                let (p, at) = h.last(topic);
                (p.into_iter().collect(), true, at)
            }
            Since::At(e, o) => match h.recover(topic, e, o) {
                Recovery::Recovered(msgs, at) => (msgs, true, at),
                Recovery::Lost(at) => (Vec::new(), false, at),
            },
        };
        for p in &msgs {
            out.send(conn, p);
        }
        self.stats.delivered_pub += msgs.len() as u64;
        let pkt = recovery_packet(topic, recovered, Some((&epoch, at)));
        out.send(conn, &Rc::new(pkt));
    }
}

/// `PUB SYS:RECOVERY` with `topic`, `recovered` and the position (§9.5); no sender's
/// `cid`/`uid` (the server originates it).
pub fn recovery_packet(topic: &[u8], recovered: bool, at: Option<(&str, u64)>) -> Packet {
    use crate::protocol::encode::{fmt_u64, push_header};
    Packet::build(|b| {
        b.extend_from_slice(b"PUB SYS:RECOVERY\r\n");
        push_header(b, b"topic", topic);
        push_header(
            b,
            b"recovered",
            if recovered { &b"true"[..] } else { b"false" },
        );
        if let Some((epoch, offset)) = at {
            let mut d = [0u8; 20];
            push_header(b, b"epoch", epoch.as_bytes());
            push_header(b, b"offset", fmt_u64(offset, &mut d));
        }
        b.extend_from_slice(b"\r\n\r\n.\r\n");
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(s: &str) -> Rc<Packet> {
        Rc::new(Packet::raw(s.as_bytes()))
    }

    fn settings(size: usize, ttl: u64, max: usize) -> HistorySettings {
        HistorySettings {
            rules: vec![
                HistoryRule {
                    prefix: "h.".into(),
                    size,
                    ttl: Duration::from_secs(ttl),
                },
                HistoryRule {
                    prefix: "h.long.".into(),
                    size: 100,
                    ttl: Duration::from_secs(1000),
                },
            ],
            max_bytes: max,
        }
    }

    #[test]
    fn reconfigure_keeps_what_a_rule_still_matches() {
        let mut h = History::new(&settings(10, 60, 1 << 20), "E1");
        let now = Instant::now();
        for topic in [&b"h.a"[..], b"h.long.b"] {
            for i in 0..5 {
                let o = h.next_offset();
                let rule = h.rule_for(topic).unwrap();
                h.store(topic, rule, o, &pkt(&format!("m{i}")), now);
            }
        }
        assert_eq!(h.totals().1, 10);
        // "h." keeps 2 per topic now; "h.long." is gone, so h.long.b falls under "h.".
        let mut s = settings(2, 60, 1 << 20);
        s.rules.truncate(1);
        h.reconfigure(&s);
        assert_eq!(h.epoch(), "E1");
        assert_eq!(h.totals().0, 2);
        assert_eq!(h.totals().1, 4);
        assert_eq!(h.stats.evicted[0], 6);
        // The two newest of h.a are still recoverable, from the same epoch.
        match h.recover(b"h.a", "E1", 3) {
            Recovery::Recovered(msgs, _) => assert_eq!(msgs.len(), 2),
            r => panic!("{r:?}"),
        }
        // A store under the new rules keeps the size of 2.
        let o = h.next_offset();
        assert_eq!(o, 11);
        h.store(b"h.a", 0, o, &pkt("m5"), now);
        assert_eq!(h.totals().1, 4);
        // No rule matching any more: the topics' messages go, and the byte count with them.
        h.reconfigure(&HistorySettings {
            rules: vec![HistoryRule {
                prefix: "other.".into(),
                size: 5,
                ttl: Duration::from_secs(60),
            }],
            max_bytes: 1 << 20,
        });
        assert_eq!(h.totals(), (0, 0, 0));
        assert!(matches!(h.recover(b"h.a", "E1", 3), Recovery::Lost(_)));
        h.housekeeping(now);
    }

    #[test]
    fn longest_prefix_offsets_and_size() {
        let mut h = History::new(&settings(3, 60, 1 << 20), "E1");
        assert_eq!(h.rule_for(b"x"), None);
        assert_eq!(h.rule_for(b"h.a"), Some(0));
        assert_eq!(h.rule_for(b"h.long.a"), Some(1));
        let now = Instant::now();
        for i in 1..=5 {
            let o = h.next_offset();
            assert_eq!(o, i);
            h.store(b"h.a", 0, o, &pkt(&format!("m{i}")), now);
        }
        let c = cost(&pkt("m1"));
        assert_eq!(h.totals(), (1, 3, 3 * c + TOPIC_OVERHEAD + 3));
        // Another topic's offsets come from the same sequence.
        assert_eq!(h.next_offset(), 6);
        match h.recover(b"h.a", "E1", 2) {
            Recovery::Recovered(m, 5) => assert_eq!(m.len(), 3),
            r => panic!("{r:?}"),
        }
        assert!(matches!(h.recover(b"h.a", "E1", 1), Recovery::Lost(5)));
        assert!(matches!(h.recover(b"h.a", "E2", 4), Recovery::Lost(5)));
        assert!(
            matches!(h.recover(b"h.a", "E1", 9), Recovery::Lost(5)),
            "beyond the sequence"
        );
        assert!(
            matches!(h.recover(b"h.b", "E1", 0), Recovery::Recovered(ref m, 0) if m.is_empty())
        );
        assert!(
            matches!(h.recover(b"h.a", "E1", 5), Recovery::Recovered(ref m, 5) if m.is_empty())
        );
        let (p, o) = h.last(b"h.a");
        assert_eq!(
            (p.map(|p| p.payload().to_vec()), o),
            (Some(b"m5".to_vec()), 5)
        );
        assert_eq!(h.stats.evicted, [2, 0, 0]);
    }

    #[test]
    fn ttl_and_byte_cap_evict_oldest_first_and_topics_go_whole() {
        let c = cost(&pkt("aaaa"));
        let topics = 2 * TOPIC_OVERHEAD + 3 + 8;
        let mut h = History::new(&settings(10, 5, 2 * c + topics), "E1");
        let t0 = Instant::now();
        h.store(b"h.a", 0, 1, &pkt("aaaa"), t0);
        h.store(b"h.long.b", 1, 1, &pkt("bbbb"), t0 + Duration::from_secs(1));
        h.store(b"h.a", 0, 2, &pkt("cccc"), t0 + Duration::from_secs(2));
        h.housekeeping(t0 + Duration::from_secs(2));
        // Three messages do not fit: the oldest (h.a offset 1) goes.
        assert_eq!(h.totals(), (2, 2, 2 * c + topics));
        assert_eq!(h.stats.evicted, [0, 0, 1]);
        h.housekeeping(t0 + Duration::from_secs(8));
        // h.a's last message is past its 5 s ttl: gone, and the topic with it; h.long.b
        // lives 1000 s.
        assert_eq!(h.totals(), (1, 1, c + TOPIC_OVERHEAD + 8));
        assert_eq!(h.stats.evicted, [0, 1, 1]);
        // h.a was evicted whole: a position from before cannot be recovered, and if it
        // is published again, its offsets still grow.
        assert!(matches!(h.recover(b"h.a", "E1", 1), Recovery::Lost(0)));
        let o = h.next_offset();
        assert_eq!(o, 3);
        h.store(b"h.a", 0, o, &pkt("dddd"), t0 + Duration::from_secs(9));
        assert!(matches!(h.recover(b"h.a", "E1", 1), Recovery::Lost(3)));
        assert!(
            matches!(h.recover(b"h.a", "E1", 2), Recovery::Recovered(ref m, 3) if m.len() == 1)
        );
    }

    /// A topic evicted whole and published again is indexed again (its first message
    /// goes in its rule's fronts), so ttl finds it a second time; and a topic whose ring
    /// is full is stored into without a new index entry (one per topic).
    #[test]
    fn topic_created_again_is_indexed_again() {
        let mut h = History::new(&settings(2, 5, 1 << 20), "E1");
        let t0 = Instant::now();
        for i in 1..=4 {
            h.store(b"h.a", 0, i, &pkt("x"), t0);
        }
        assert_eq!(h.fronts[0].len(), 1);
        h.housekeeping(t0 + Duration::from_secs(6));
        assert_eq!(h.totals().0, 0);
        assert!(h.fronts[0].is_empty());
        let t1 = t0 + Duration::from_secs(7);
        h.store(b"h.a", 0, 5, &pkt("y"), t1);
        assert_eq!((h.totals().0, h.totals().1), (1, 1));
        assert_eq!(h.fronts[0].len(), 1);
        h.housekeeping(t1 + Duration::from_secs(6));
        assert_eq!(h.totals(), (0, 0, 0));
        assert_eq!(h.stats.evicted, [2, 3, 0]);
    }

    #[test]
    fn since_parses_strictly() {
        assert_eq!(parse_since(b"last"), Some(Since::Last));
        assert_eq!(parse_since(b"Ab3:17"), Some(Since::At("Ab3", 17)));
        for bad in [
            &b""[..],
            b"x",
            b":1",
            b"a:",
            b"a:-1",
            b"a b:1",
            b"a:1x",
            b"a:99999999999999999999",
        ] {
            assert_eq!(parse_since(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        let e = new_epoch();
        assert_eq!(e.len(), 10);
        assert!(e.bytes().all(|b| b.is_ascii_alphanumeric()));
    }
}
