//! History and recovery on the client (PROTOCOL.md §9.5): the position of every history
//! message handed out by [`Client::recv`], subscriptions with `since`, and
//! [`Client::resume`], which reconnects and subscribes again from where the application
//! stopped reading.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use super::{Client, Error, Message, Result};

/// A place in a history topic: the `epoch` and `offset` headers of a message. Displayed
/// (and parsed) as `<epoch>:<offset>`, the value of a `since` header.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    /// Changes whenever the topic's stored history may have been lost (a restart).
    pub epoch: String,
    /// Strictly increases per topic within one epoch.
    pub offset: u64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.epoch, self.offset)
    }
}

impl FromStr for Position {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (epoch, offset) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?}: not <epoch>:<offset>"))?;
        let offset = offset
            .parse()
            .map_err(|_| format!("{s:?}: the offset is not a number"))?;
        if epoch.is_empty() || !epoch.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(format!("{s:?}: the epoch is not [0-9A-Za-z]+"));
        }
        Ok(Position {
            epoch: epoch.to_owned(),
            offset,
        })
    }
}

/// Where [`Client::subscribe_since`] starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Since {
    /// The newest stored message (`since: last`).
    Last,
    /// The stored messages after this position.
    After(Position),
}

impl fmt::Display for Since {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Since::Last => f.write_str("last"),
            Since::After(p) => p.fmt(f),
        }
    }
}

/// The server's answer to a subscription with `since` (`PUB SYS:RECOVERY`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The topic subscribed to.
    pub topic: String,
    /// Every message after the `since` position was replayed (they come from
    /// [`Client::recv`] before any live one). When false they are lost (the server
    /// restarted, or no longer keeps them): reload the topic's state from your database.
    pub recovered: bool,
    /// Where the topic stands (`None` for a topic without history).
    pub position: Option<Position>,
}

impl Message {
    /// The position a message of a history topic carries (`epoch` and `offset`).
    pub fn position(&self) -> Option<Position> {
        Some(Position {
            epoch: self.header("epoch")?.to_owned(),
            offset: self.header("offset")?.parse().ok()?,
        })
    }

    /// The recovery this message carries, if it is a `PUB SYS:RECOVERY`.
    pub fn recovery(&self) -> Option<Recovery> {
        if self.cmd != "PUB" || self.target != "SYS:RECOVERY" {
            return None;
        }
        Some(Recovery {
            topic: self.header("topic").unwrap_or_default().to_owned(),
            recovered: self.header("recovered") == Some("true"),
            position: self.position(),
        })
    }
}

impl Client {
    /// Subscribe to `topic` with `since` (confirmed): the stored messages after that
    /// position (or the newest, [`Since::Last`]) are kept for [`Client::recv`], before any
    /// live one, and the server's [`Recovery`] is returned (it does not come from `recv`).
    /// `recovered: false`: the messages missed are lost. A refusal (`not permitted`,
    /// `already subscribed`, `bad since`) is [`Error::Server`].
    pub fn subscribe_since(&mut self, topic: &str, since: &Since) -> Result<Recovery> {
        let since = since.to_string();
        self.confirmed("SUB", topic, &[("since", &since)], b"")?;
        self.subscribed(topic);
        // The server sends SYS:RECOVERY before it answers the sync ping: it is kept.
        let i = self
            .inbox
            .iter()
            .rposition(|m| m.recovery().is_some_and(|r| r.topic == topic))
            .ok_or_else(|| Error::Protocol(format!("no SYS:RECOVERY for SUB {topic}")))?;
        let rec = self
            .inbox
            .remove(i)
            .and_then(|m| m.recovery())
            .ok_or_else(|| Error::Protocol(format!("no SYS:RECOVERY for SUB {topic}")))?;
        match &rec.position {
            // Lost: resume from where the topic stands now.
            Some(p) if !rec.recovered => {
                self.positions.insert(topic.to_owned(), p.clone());
            }
            None => {
                self.positions.remove(topic);
            }
            // Recovered: the replayed messages set it when handed out.
            Some(_) => {}
        }
        Ok(rec)
    }

    /// The position of the last message handed out by [`Client::recv`] per history topic
    /// subscribed to: pass them to [`Client::subscribe_since`] on a new connection, or
    /// let [`Client::resume`] do it.
    pub fn positions(&self) -> HashMap<String, Position> {
        self.positions
            .iter()
            .filter(|(t, _)| self.subs.contains(t))
            .map(|(t, p)| (t.clone(), p.clone()))
            .collect()
    }

    /// Reconnect (same URL, same key, a new [`Client::cid`]) after the connection was
    /// lost, and subscribe again to every topic this client subscribed to: history topics
    /// with `since` the last message received (kept for [`Client::recv`] or handed out),
    /// so the application reads every message once, in order. Returns the server's
    /// [`Recovery`] for each of them (`recovered: false`: the messages missed are lost).
    /// Messages received but not handed out yet stay for `recv`. Enablements (`ESUB`,
    /// ...) are not sent again.
    pub fn resume(&mut self) -> Result<Vec<Recovery>> {
        let mut fresh = Client::connect(&self.url, &self.key)?;
        let mut kept = std::mem::take(&mut self.inbox);
        kept.extend(self.decoded.drain(..));
        // Where each topic resumes: after the last message received.
        let mut since = self.positions.clone();
        for m in &kept {
            if let (true, Some(p)) = (m.cmd == "PUB", m.position()) {
                since.insert(m.target.clone(), p);
            }
        }
        fresh.inbox = kept;
        fresh.positions = std::mem::take(&mut self.positions);
        fresh.next_id = self.next_id;
        let subs = std::mem::take(&mut self.subs);
        let mut recoveries = Vec::new();
        let mut result = Ok(());
        for topic in &subs {
            let r = match since.remove(topic) {
                Some(p) => fresh
                    .subscribe_since(topic, &Since::After(p))
                    .map(|r| recoveries.push(r)),
                None => fresh.subscribe(topic),
            };
            if let Err(e) = r {
                result = Err(e);
                break;
            }
        }
        // Topics not taken again (a refusal) stay listed: a later resume retries them.
        for t in subs {
            fresh.subscribed(&t);
        }
        let old = std::mem::replace(self, fresh);
        old.closer.close();
        result.map(|()| recoveries)
    }

    pub(super) fn subscribed(&mut self, topic: &str) {
        if !self.subs.iter().any(|t| t == topic) {
            self.subs.push(topic.to_owned());
        }
    }

    pub(super) fn unsubscribed(&mut self, topic: &str) {
        self.subs.retain(|t| t != topic);
        self.positions.remove(topic);
    }

    /// A message on its way out of `recv`: its position is now the topic's.
    pub(super) fn hand_out(&mut self, m: Message) -> Message {
        if m.cmd == "PUB" {
            if let Some(p) = m.position() {
                self.positions.insert(m.target.clone(), p);
            }
        }
        m
    }
}
