//! The cluster backplane as one more source of the loop: its token's events, its turn
//! when the read budget ran out, its timers and its writes (see `cluster::link`).

use std::time::Instant;

use mio::Registry;

use super::outbound::Sink;
use super::Server;
use crate::broker::Broker;
use crate::cluster::link::NatsLink;

impl Server {
    /// Run `f` with the link, the loop's registry, the broker and a sink, if the server
    /// is a cluster node.
    fn with_link(&mut self, f: impl FnOnce(&mut NatsLink, &Registry, &mut Broker, &mut Sink<'_>)) {
        let (broker, mut sink, link, registry) = self.split_all();
        if let Some(link) = link {
            f(link, registry, broker, &mut sink);
        }
    }

    /// A readiness event on the backplane connection.
    pub(super) fn backplane_event(&mut self, now: Instant) {
        self.with_link(|l, r, b, s| l.on_event(r, b, now, s));
    }

    /// The backplane's turn again when its read budget ran out last pass.
    pub(super) fn backplane_again(&mut self, now: Instant) {
        if self.link.as_ref().is_some_and(|l| l.again) {
            self.with_link(|l, r, b, s| l.read(r, b, now, s));
        }
    }

    /// Timers: reconnect, liveness, heartbeat, nodes gone, forwarded requests expired.
    pub(super) fn backplane_tick(&mut self, now: Instant) {
        self.with_link(|l, r, b, s| l.tick(r, b, now, s));
    }

    /// Write what the pass queued for the other nodes.
    pub(super) fn backplane_flush(&mut self, now: Instant) {
        self.with_link(|l, r, b, _| l.flush(r, b, now));
    }

    /// More backplane input waits (poll without sleeping).
    pub(super) fn backplane_pending(&self) -> bool {
        self.link.as_ref().is_some_and(|l| l.again)
    }
}
