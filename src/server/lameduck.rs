//! Lame duck (SIGUSR2, `middleman lameduck --pid PID`): the way out for an upgrade
//! without a thundering herd. The listeners are closed at once (with `--reuse-port` a new
//! process on the same port takes every new connection), the cluster hears at once that
//! this node leaves (the other nodes forget its enablements and fail the requests they
//! forwarded here with `responder disconnected`), and the connections open at the start
//! are closed with 1001 spread evenly over `--lame-duck-duration`, oldest first, so their
//! clients reconnect a few at a time. Until its turn a connection is served as usual.
//! When every one is closed (or the duration is over) the server shuts down as on
//! SIGTERM, which ends the process with 0 once the last closes are flushed.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use log::info;

use crate::metrics::CloseReason;
use crate::router::ConnId;

use super::{Phase, Server};

/// The close reason a connection sees (code 1001, "going away").
pub(super) const GOING_AWAY: &str = "server going away";

/// A lame duck in progress: the connections open at its start, oldest first, and the
/// schedule they are closed on.
pub(super) struct LameDuck {
    started: Instant,
    duration: Duration,
    /// How many were open at the start: the schedule is computed from it.
    total: usize,
    /// Those not closed by the lame duck yet, (id, generation), oldest first; an entry
    /// whose connection is gone (or closing) closed by itself.
    queue: VecDeque<(ConnId, u64)>,
    /// Closed by the lame duck so far.
    closed: usize,
}

/// How many of `total` connections should be gone `elapsed` into a lame duck of
/// `duration`: ceil(total × elapsed / duration), all of them once it is over.
pub(super) fn due(total: usize, elapsed: Duration, duration: Duration) -> usize {
    if elapsed >= duration || duration.is_zero() {
        return total;
    }
    let num = total as u128 * elapsed.as_nanos();
    let den = duration.as_nanos();
    (num.div_ceil(den) as usize).min(total)
}

impl Server {
    /// Enter lame duck (ignored when already in it or shutting down).
    pub(super) fn begin_lame_duck(&mut self, now: Instant) {
        info!("SIGUSR2 received: lame duck");
        if self.shutdown_deadline.is_some() {
            info!("lame duck ignored: already shutting down");
            return;
        }
        if self.lame_duck.is_some() {
            info!("lame duck ignored: already in lame duck");
            return;
        }
        // What the kernel has already queued on the listeners is taken first (closing a
        // listener resets the connections in its backlog); it is served and closed in
        // its turn like the rest.
        for i in 0..self.listeners.len() {
            self.accept(i, now);
        }
        // Nothing new: the sockets are closed, so a process sharing the port
        // (--reuse-port) gets every new connection.
        let listeners = std::mem::take(&mut self.listeners);
        let closed_listeners = listeners.len();
        for mut l in listeners {
            let _ = self.poll.registry().deregister(&mut l);
        }
        self.accept_paused_until = None;
        // The other nodes hear it at once, ahead of any data written this pass.
        self.broker.cluster_leave();
        let mut open: Vec<(u64, ConnId)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.phase != Phase::Closing)
            .map(|(id, c)| (c.gen, id))
            .collect();
        open.sort_unstable();
        let duration = self.cfg.lame_duck_duration;
        info!(
            "lame duck: {closed_listeners} listener(s) closed, {}; closing {} connections \
             (1001) spread over {duration:?}, then exiting",
            if self.broker.cluster.is_some() {
                "the cluster told this node leaves"
            } else {
                "no cluster"
            },
            open.len()
        );
        self.metrics.lame_duck = true;
        self.lame_duck = Some(LameDuck {
            started: now,
            duration,
            total: open.len(),
            queue: open.into_iter().map(|(gen, id)| (id, gen)).collect(),
            closed: 0,
        });
        self.lame_duck_tick(now);
    }

    /// Once per tick in lame duck: close the share of the connections due by now; once
    /// none is left (or the duration is over), shut down.
    pub(super) fn lame_duck_tick(&mut self, now: Instant) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        let Some(mut ld) = self.lame_duck.take() else {
            return;
        };
        let open = |s: &Server, (id, gen): (ConnId, u64)| {
            s.conns
                .get(id)
                .is_some_and(|c| c.gen == gen && c.phase != Phase::Closing)
        };
        ld.queue.retain(|&e| open(self, e));
        let elapsed = now.saturating_duration_since(ld.started);
        let gone = ld.total - ld.queue.len();
        let mut to_close = due(ld.total, elapsed, ld.duration).saturating_sub(gone);
        while to_close > 0 {
            let Some((id, _)) = ld.queue.pop_front() else {
                break;
            };
            self.lame_duck_close(id, now);
            ld.closed += 1;
            to_close -= 1;
        }
        if ld.queue.is_empty() || elapsed >= ld.duration {
            info!(
                "lame duck over after {:.1?}: {} connections closed by it, {} closed by \
                 themselves, {} left; shutting down",
                elapsed,
                ld.closed,
                ld.total - ld.closed - ld.queue.len(),
                ld.queue.len()
            );
            self.lame_duck = Some(ld);
            self.begin_shutdown(now);
        } else {
            self.lame_duck = Some(ld);
        }
    }

    fn lame_duck_close(&mut self, id: ConnId, now: Instant) {
        let Some(c) = self.conns.get(id) else {
            return;
        };
        match c.phase {
            Phase::Http | Phase::ApiBody => self.remove(id, CloseReason::LameDuck),
            Phase::ApiWait => {
                let resp = super::api::refusal(503, GOING_AWAY);
                self.api_answer(id, &resp, now);
            }
            Phase::Closing => {}
            _ => self.close_with(id, 1001, GOING_AWAY, now, CloseReason::LameDuck),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_is_even_and_ends_with_everyone() {
        let d = Duration::from_secs(5);
        assert_eq!(due(1000, Duration::ZERO, d), 0);
        assert_eq!(due(1000, Duration::from_millis(250), d), 50);
        assert_eq!(due(1000, Duration::from_secs(1), d), 200);
        assert_eq!(due(1000, Duration::from_millis(4999), d), 1000);
        assert_eq!(due(1000, d, d), 1000);
        assert_eq!(due(1000, Duration::from_secs(60), d), 1000);
        // Rounded up: the first connection of a few goes at the first tick.
        assert_eq!(due(3, Duration::from_millis(1), d), 1);
        assert_eq!(due(0, Duration::from_secs(1), d), 0);
        assert_eq!(due(7, Duration::from_secs(1), Duration::ZERO), 7);
        // Every second of a 5 s lame duck closes a fifth.
        let per_second: Vec<usize> = (1..=5)
            .map(|s| {
                due(1000, Duration::from_secs(s), d) - due(1000, Duration::from_secs(s - 1), d)
            })
            .collect();
        assert_eq!(per_second, [200; 5]);
    }
}
