//! A session: a user name reserved in a room, its stream, its idempotency window and
//! its posting budget.

use std::collections::VecDeque;
use std::hash::Hasher;
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

/// The last `capacity` idempotency keys of a session and the seqs they were given. Keys
/// are kept as 64-bit hashes in a ring searched from the newest: a window of 256 keys of
/// up to 64 bytes took ~42 KB per session as strings in a map, ~4 KB this way. Two of a
/// session's recent keys collide with odds of about 2^-48, and a collision can only merge
/// that session's own posts.
pub(crate) struct RecentIds {
    capacity: usize,
    ring: VecDeque<(u64, Seq)>,
}

impl RecentIds {
    pub(crate) fn new(capacity: usize) -> RecentIds {
        RecentIds { capacity, ring: VecDeque::new() }
    }

    pub(crate) fn get(&self, id: &str) -> Option<Seq> {
        let key = key(id);
        self.ring.iter().rev().find(|(k, _)| *k == key).map(|&(_, seq)| seq)
    }

    pub(crate) fn remember(&mut self, id: &str, seq: Seq) {
        if self.capacity == 0 {
            return;
        }
        if self.ring.len() == self.capacity {
            self.ring.pop_front();
        }
        self.ring.push_back((key(id), seq));
    }
}

/// The hash an idempotency key is remembered by (SipHash with fixed keys: deterministic).
fn key(id: &str) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    hasher.write(id.as_bytes());
    hasher.finish()
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
