//! A session: a user name reserved in a room, its stream, its idempotency window and
//! its posting budget.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use super::config::RateLimit;
use super::ids::{ConnId, Seq, Token};

pub(crate) struct Session {
    pub(crate) token: Token,
    pub(crate) user: Arc<str>,
    pub(crate) room: Arc<str>,
    /// The stream it is attached to, if any.
    pub(crate) conn: Option<ConnId>,
    /// It has been attached at least once (a later attach is a resume).
    pub(crate) ever_attached: bool,
    /// The room's last seq when it joined: it is owed every message after that one.
    pub(crate) joined_at: Seq,
    pub(crate) recent: RecentIds,
    pub(crate) bucket: Option<Bucket>,
}

/// The last `capacity` idempotency keys of a session and the seqs they were given.
pub(crate) struct RecentIds {
    capacity: usize,
    order: VecDeque<Arc<str>>,
    seqs: HashMap<Arc<str>, Seq>,
}

impl RecentIds {
    pub(crate) fn new(capacity: usize) -> RecentIds {
        RecentIds { capacity, order: VecDeque::new(), seqs: HashMap::new() }
    }

    pub(crate) fn get(&self, id: &str) -> Option<Seq> {
        self.seqs.get(id).copied()
    }

    pub(crate) fn remember(&mut self, id: &str, seq: Seq) {
        if self.capacity == 0 {
            return;
        }
        if self.order.len() == self.capacity {
            let oldest = self.order.pop_front().expect("a full window is not empty");
            self.seqs.remove(&oldest);
        }
        let id: Arc<str> = id.into();
        self.order.push_back(Arc::clone(&id));
        self.seqs.insert(id, seq);
    }
}

/// A token bucket in virtual time.
pub(crate) struct Bucket {
    limit: RateLimit,
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    pub(crate) fn new(limit: RateLimit, now: Instant) -> Bucket {
        Bucket { limit, tokens: f64::from(limit.burst), updated: now }
    }

    /// Takes one token if there is one.
    pub(crate) fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.updated = self.updated.max(now);
        self.tokens = (self.tokens + elapsed * self.limit.per_second).min(f64::from(self.limit.burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
