//! The outbox: posts waiting for the server's acknowledgement, and the pause after the
//! server said "posting too fast". Sans-IO like the session that owns it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How long to hold posts back after a rate-limit refusal.
pub(crate) const THROTTLE: Duration = Duration::from_secs(1);
/// Rate-limit refusals of one post before it is given up (and reported).
pub(crate) const MAX_RATE_RETRIES: u32 = 10;

#[derive(Clone, Debug)]
pub(crate) struct PendingPost {
    pub(crate) client_msg_id: String,
    pub(crate) text: String,
    /// Written on the current stream (and not refused since).
    pub(crate) sent: bool,
    /// Rate-limit refusals so far.
    pub(crate) refusals: u32,
}

/// Posts in the order they were made, until acknowledged or rejected for good.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    posts: VecDeque<PendingPost>,
    throttled_until: Option<Instant>,
}

impl Outbox {
    pub(crate) fn len(&self) -> usize {
        self.posts.len()
    }

    pub(crate) fn push(&mut self, client_msg_id: String, text: String) {
        self.posts.push_back(PendingPost { client_msg_id, text, sent: false, refusals: 0 });
    }

    /// True while posts must be held back (a rate-limit pause is running).
    pub(crate) fn throttled(&self) -> bool {
        self.throttled_until.is_some()
    }

    /// The end of the current pause, if any.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.throttled_until
    }

    /// Ends the pause if it is over at `now`; returns true when it ended.
    pub(crate) fn handle_timeout(&mut self, now: Instant) -> bool {
        match self.throttled_until {
            Some(at) if now >= at => {
                self.throttled_until = None;
                true
            }
            _ => false,
        }
    }

    /// A new stream: nothing is written on it yet.
    pub(crate) fn mark_all_unsent(&mut self) {
        for p in &mut self.posts {
            p.sent = false;
        }
    }

    /// The posts to write now, in order, marked as written.
    pub(crate) fn take_unsent(&mut self) -> Vec<(String, String)> {
        if self.throttled() {
            return Vec::new();
        }
        self.posts
            .iter_mut()
            .filter(|p| !p.sent)
            .map(|p| {
                p.sent = true;
                (p.client_msg_id.clone(), p.text.clone())
            })
            .collect()
    }

    /// The server echoed `client_msg_id`: the post is done. Returns whether it was ours.
    pub(crate) fn acknowledge(&mut self, client_msg_id: &str) -> bool {
        match self.posts.iter().position(|p| p.client_msg_id == client_msg_id) {
            Some(i) => {
                self.posts.remove(i);
                true
            }
            None => false,
        }
    }

    /// Removes the posts that match `reject` and returns their ids with the reasons.
    pub(crate) fn remove_where(
        &mut self,
        mut reject: impl FnMut(&PendingPost) -> Option<String>,
    ) -> Vec<(String, String)> {
        let mut removed = Vec::new();
        self.posts.retain(|p| match reject(p) {
            Some(reason) => {
                removed.push((p.client_msg_id.clone(), reason));
                false
            }
            None => true,
        });
        removed
    }

    /// The server refused `client_msg_id` for posting too fast. Keeps it for a retry
    /// after a pause and returns true, or returns false when it was refused too often
    /// (or is unknown); the caller then treats the refusal as final.
    pub(crate) fn rate_limited(&mut self, now: Instant, client_msg_id: &str) -> bool {
        let Some(post) = self.posts.iter_mut().find(|p| p.client_msg_id == client_msg_id) else {
            return false;
        };
        post.refusals += 1;
        if post.refusals > MAX_RATE_RETRIES {
            return false;
        }
        post.sent = false;
        self.throttled_until = Some(now + THROTTLE);
        true
    }
}
