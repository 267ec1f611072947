//! The timer table: session expiry deadlines, earliest first.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use super::ids::SessionId;

/// Why a session has a deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Timer {
    /// Opened by `Join` and never attached.
    AttachTimeout,
    /// Its stream ended without a leave; it may still resume.
    ResumeGrace,
}

/// At most one deadline per session; `next()` is the earliest.
#[derive(Default)]
pub(crate) struct Timers {
    due: BTreeSet<(Instant, SessionId, Timer)>,
    by_session: HashMap<SessionId, (Instant, Timer)>,
}

impl Timers {
    pub(crate) fn set(&mut self, session: SessionId, at: Instant, timer: Timer) {
        self.cancel(session);
        self.due.insert((at, session, timer));
        self.by_session.insert(session, (at, timer));
    }

    pub(crate) fn cancel(&mut self, session: SessionId) {
        if let Some((at, timer)) = self.by_session.remove(&session) {
            self.due.remove(&(at, session, timer));
        }
    }

    pub(crate) fn get(&self, session: SessionId) -> Option<Timer> {
        self.by_session.get(&session).map(|&(_, t)| t)
    }

    pub(crate) fn next(&self) -> Option<Instant> {
        self.due.first().map(|&(at, _, _)| at)
    }

    /// Removes and returns the earliest entry if it is due at `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<(SessionId, Timer)> {
        let &(at, session, timer) = self.due.first()?;
        if at > now {
            return None;
        }
        self.due.pop_first();
        self.by_session.remove(&session);
        Some((session, timer))
    }
}
