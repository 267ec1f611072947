//! Configuration of the core: limits, history size, timers, policies.

use std::time::Duration;

/// Sizes of client-supplied fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest user name, in characters.
    pub max_user_chars: usize,
    /// Longest room name, in characters (ASCII only).
    pub max_room_chars: usize,
    /// Longest message text, in bytes of UTF-8.
    pub max_text_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_user_chars: 32, max_room_chars: 64, max_text_bytes: 4096 }
    }
}

/// A per-session token bucket: `per_second` posts on average, up to `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    /// Sustained posts per second.
    pub per_second: f64,
    /// Posts allowed in a burst from a full bucket.
    pub burst: u32,
}

/// Everything the broker can be told about its policies. `Default` gives the documented
/// defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct BrokerConfig {
    /// Field size limits.
    pub limits: Limits,
    /// Messages retained per room (the history ring).
    pub history_limit: usize,
    /// Most bytes all rooms' histories hold together, counted by [`Message::weight`]
    /// (`usize::MAX`: no limit). Past it, the room holding the most loses its oldest
    /// messages, so that many full rooms cannot exhaust the server's memory.
    ///
    /// [`Message::weight`]: super::Message::weight
    pub history_bytes: usize,
    /// How long a session whose stream ended stays reserved for a resume.
    pub resume_grace: Duration,
    /// How long a session opened by `Join` may stay without ever attaching a stream.
    pub attach_timeout: Duration,
    /// How long a new stream may stay without its first frame (hello or subscribe) before
    /// it is closed with `DEADLINE_EXCEEDED`: a silent stream holds a thread and a place
    /// under the stream limit.
    pub hello_timeout: Duration,
    /// Above this many members, presence events are not fanned out to everyone (and
    /// welcomes carry no member list); clients ask `ListMembers` instead.
    pub presence_limit: usize,
    /// Posting rate per session; `None` disables rate limiting.
    pub rate_limit: Option<RateLimit>,
    /// How many recent `client_msg_id`s per session are remembered for idempotency.
    pub dedup_window: usize,
    /// Most rooms the broker holds.
    pub max_rooms: usize,
    /// Most sessions the broker holds.
    pub max_sessions: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            limits: Limits::default(),
            history_limit: 500,
            history_bytes: 1 << 30,
            resume_grace: Duration::from_secs(15),
            attach_timeout: Duration::from_secs(30),
            hello_timeout: Duration::from_secs(10),
            presence_limit: 256,
            rate_limit: Some(RateLimit { per_second: 20.0, burst: 50 }),
            dedup_window: 256,
            max_rooms: 10_000,
            max_sessions: 100_000,
        }
    }
}
