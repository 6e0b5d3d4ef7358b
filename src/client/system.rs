//! Protocol 1.1 on the client (PROTOCOL.md §9.1-§9.4): per-connection grants and their
//! withdrawal, server-side subscriptions, kicks, presence and connection events. All of
//! it is for services; the server refuses it to clients (`not permitted`).

use super::{Client, Error, Message, Result, SYNC_TIMEOUT};

/// The close code of a connection a service kicked (`INT KICK`): a client sees
/// [`Error::Closed`] with this code and the service's reason.
pub const KICK_CODE: u16 = 4000;

/// The presence limit the server applies at most; larger ones are clamped to it.
pub const PRESENCE_MAX: usize = 10_000;

/// What a service enables for clients: `ESUB`/`EPUB`/`EREQ` (and `DSUB`/`DPUB`/`DREQ`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Right {
    /// Subscribe to a topic (`ESUB`, `DSUB`).
    Sub,
    /// Publish to a topic (`EPUB`, `DPUB`).
    Pub,
    /// Request a target (`EREQ`, `DREQ`).
    Req,
}

impl Right {
    /// The command that gives it: `ESUB`, `EPUB`, `EREQ`.
    pub fn enable_cmd(self) -> &'static str {
        match self {
            Right::Sub => "ESUB",
            Right::Pub => "EPUB",
            Right::Req => "EREQ",
        }
    }

    /// The command that withdraws it: `DSUB`, `DPUB`, `DREQ`.
    pub fn disable_cmd(self) -> &'static str {
        match self {
            Right::Sub => "DSUB",
            Right::Pub => "DPUB",
            Right::Req => "DREQ",
        }
    }
}

/// One connection subscribed to a topic, from [`Client::presence`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its connection id.
    pub cid: String,
    /// Its user id, empty when none was set.
    pub uid: String,
}

/// The answer of [`Client::presence`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Presence {
    /// Connections subscribed to the topic (services included).
    pub count: u64,
    /// Distinct non-empty uids among them.
    pub users: u64,
    /// At most `limit` of them, sorted by cid.
    pub members: Vec<Member>,
    /// There were more than `limit`.
    pub truncated: bool,
    /// A cluster node did not answer in time: the numbers cover the nodes that did.
    pub partial: bool,
}

impl Presence {
    /// Read a `RES SYS:PRESENCE`: headers `count`, `users`, `truncated`, `partial`;
    /// body lines `<cid> <uid>` or `<cid>`.
    pub fn from_message(m: &Message) -> Presence {
        let num = |name: &str| {
            m.header(name)
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let flag = |name: &str| m.header(name).is_some_and(|v| v.trim() == "true");
        let members = m
            .body_text()
            .split('\n')
            .map(|l| l.strip_suffix('\r').unwrap_or(l))
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (cid, uid) = l.split_once(' ').unwrap_or((l, ""));
                Member {
                    cid: cid.to_owned(),
                    uid: uid.to_owned(),
                }
            })
            .collect();
        Presence {
            count: num("count"),
            users: num("users"),
            members,
            truncated: flag("truncated"),
            partial: flag("partial"),
        }
    }
}

/// The kind of a connection event, and its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// `SYS:CONNECT`: a connection was accepted.
    Connect,
    /// `SYS:DISCONNECT`: a connection ended (`reason`).
    Disconnect,
    /// `SYS:SUB`: a connection subscribed to `topic`.
    Sub,
    /// `SYS:UNS`: a connection unsubscribed from `topic`.
    Uns,
}

impl EventKind {
    /// All four.
    pub const ALL: [EventKind; 4] = [
        EventKind::Connect,
        EventKind::Disconnect,
        EventKind::Sub,
        EventKind::Uns,
    ];

    /// The topic its events are published to.
    pub fn topic(self) -> &'static str {
        match self {
            EventKind::Connect => "SYS:CONNECT",
            EventKind::Disconnect => "SYS:DISCONNECT",
            EventKind::Sub => "SYS:SUB",
            EventKind::Uns => "SYS:UNS",
        }
    }

    /// The kind whose topic is `topic`.
    pub fn from_topic(topic: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.topic() == topic)
    }
}

/// A connection event (PROTOCOL.md §9.4), from [`Message::event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Which event.
    pub kind: EventKind,
    /// The connection it is about.
    pub cid: String,
    /// Its uid (empty when none).
    pub uid: String,
    /// `service`, `client` or `monitor`.
    pub role: String,
    /// The topic, for [`EventKind::Sub`] and [`EventKind::Uns`].
    pub topic: Option<String>,
    /// Why it ended (`normal`, `idle`, `kicked`, ...), for [`EventKind::Disconnect`].
    pub reason: Option<String>,
}

impl Message {
    /// The connection event this message carries, if it is a `PUB` to one of the event
    /// topics (`SYS:CONNECT`, `SYS:DISCONNECT`, `SYS:SUB`, `SYS:UNS`).
    pub fn event(&self) -> Option<Event> {
        if self.cmd != "PUB" {
            return None;
        }
        let kind = EventKind::from_topic(&self.target)?;
        let get = |n: &str| self.header(n).unwrap_or_default().to_owned();
        Some(Event {
            kind,
            cid: get("cid"),
            uid: get("uid"),
            role: get("role"),
            topic: matches!(kind, EventKind::Sub | EventKind::Uns)
                .then(|| self.header("topic").map(str::to_owned))
                .flatten(),
            reason: (kind == EventKind::Disconnect)
                .then(|| self.header("reason").map(str::to_owned))
                .flatten(),
        })
    }
}

impl Client {
    /// Give connection `cid` alone the right to `topic` (`ESUB`/`EPUB`/`EREQ` with
    /// `forcid`; confirmed). It lasts until revoked or either connection leaves. A
    /// well-formed cid nobody has is a silent no-op; errors: `bad cid`, `too many
    /// grants`, `not permitted`.
    pub fn grant(&mut self, cid: &str, topic: &str, right: Right) -> Result<()> {
        self.confirmed(right.enable_cmd(), topic, &[("forcid", cid)], b"")
    }

    /// Withdraw [`Client::grant`] (`DSUB`/`DPUB`/`DREQ` with `forcid`; confirmed). A
    /// connection that loses its last right to subscribe to `topic` is unsubscribed.
    pub fn revoke(&mut self, cid: &str, topic: &str, right: Right) -> Result<()> {
        self.confirmed(right.disable_cmd(), topic, &[("forcid", cid)], b"")
    }

    /// Withdraw this service's own enablement of `topic` for all clients (`DSUB`,
    /// `DPUB`, `DREQ`; confirmed). `DREQ` also ends its role as responder for it.
    /// Existing subscriptions stay.
    pub fn disable(&mut self, topic: &str, right: Right) -> Result<()> {
        self.confirmed(right.disable_cmd(), topic, &[], b"")
    }

    /// Subscribe connection `cid` to `topic` (`INT SUB`; confirmed). It is not told.
    pub fn subscribe_for(&mut self, cid: &str, topic: &str) -> Result<()> {
        self.confirmed("INT", "SUB", &[("forcid", cid), ("topic", topic)], b"")
    }

    /// Unsubscribe connection `cid` from `topic` (`INT UNS`; confirmed).
    pub fn unsubscribe_for(&mut self, cid: &str, topic: &str) -> Result<()> {
        self.confirmed("INT", "UNS", &[("forcid", cid), ("topic", topic)], b"")
    }

    /// Close connection `cid` with code [`KICK_CODE`] and `reason` (`kicked` when
    /// `None`; the server cuts it to 120 bytes) (`INT KICK`; confirmed).
    pub fn kick(&mut self, cid: &str, reason: Option<&str>) -> Result<()> {
        let mut headers = vec![("forcid", cid)];
        if let Some(r) = reason {
            headers.push(("reason", r));
        }
        self.confirmed("INT", "KICK", &headers, b"")
    }

    /// Who is subscribed to `topic` (`REQ SYS:PRESENCE`): the counts and at most
    /// `limit` members (0: the counts alone; the server caps it at [`PRESENCE_MAX`]).
    /// Waits at most [`SYNC_TIMEOUT`].
    pub fn presence(&mut self, topic: &str, limit: usize) -> Result<Presence> {
        let limit = limit.to_string();
        let res = self.request(
            "SYS:PRESENCE",
            &[("topic", topic), ("limit", &limit)],
            "",
            SYNC_TIMEOUT,
        )?;
        Ok(Presence::from_message(&res))
    }

    /// Subscribe to the event topics of `kinds` (all four when empty; confirmed). The
    /// events then arrive from [`Client::recv`]: read them with [`Message::event`].
    pub fn events(&mut self, kinds: &[EventKind]) -> Result<()> {
        let kinds = if kinds.is_empty() {
            &EventKind::ALL[..]
        } else {
            kinds
        };
        for k in kinds {
            self.subscribe(k.topic())?;
        }
        Ok(())
    }
}

impl Error {
    /// Whether this is the end of a connection a service kicked (close 4000); the
    /// reason is in [`Error::Closed`].
    pub fn is_kicked(&self) -> bool {
        matches!(self, Error::Closed { code, .. } if *code == KICK_CODE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(cmd: &str, target: &str, headers: &[(&str, &str)], body: &str) -> Message {
        Message {
            cmd: cmd.into(),
            target: target.into(),
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn presence_answers() {
        let m = msg(
            "RES",
            "SYS:PRESENCE",
            &[
                ("ReqID", "r1"),
                ("count", "3"),
                ("users", "1"),
                ("truncated", "true"),
            ],
            "a1 alice smith\r\nb2\r\nc3 alice",
        );
        let p = Presence::from_message(&m);
        assert_eq!(
            (p.count, p.users, p.truncated, p.partial),
            (3, 1, true, false)
        );
        let got: Vec<(&str, &str)> = p
            .members
            .iter()
            .map(|m| (m.cid.as_str(), m.uid.as_str()))
            .collect();
        assert_eq!(got, [("a1", "alice smith"), ("b2", ""), ("c3", "alice")]);
        let empty = Presence::from_message(&msg("RES", "SYS:PRESENCE", &[("count", "0")], ""));
        assert_eq!(empty, Presence::default());
    }

    #[test]
    fn events() {
        let m = msg(
            "PUB",
            "SYS:DISCONNECT",
            &[
                ("cid", "x1"),
                ("uid", "u"),
                ("role", "client"),
                ("reason", "kicked"),
            ],
            "",
        );
        let e = m.event().unwrap();
        assert_eq!(e.kind, EventKind::Disconnect);
        assert_eq!(
            (e.cid.as_str(), e.uid.as_str(), e.role.as_str()),
            ("x1", "u", "client")
        );
        assert_eq!((e.topic, e.reason.as_deref()), (None, Some("kicked")));
        let s = msg(
            "PUB",
            "SYS:SUB",
            &[
                ("cid", "x1"),
                ("uid", ""),
                ("role", "service"),
                ("topic", "t"),
            ],
            "",
        );
        assert_eq!(s.event().unwrap().topic.as_deref(), Some("t"));
        assert!(msg("PUB", "news", &[], "").event().is_none());
        assert!(msg("REQ", "SYS:SUB", &[], "").event().is_none());
        assert_eq!(EventKind::from_topic("SYS:UNS"), Some(EventKind::Uns));
        assert_eq!(Right::Req.disable_cmd(), "DREQ");
        assert!(Error::Closed {
            code: 4000,
            reason: "bye".into()
        }
        .is_kicked());
    }
}
