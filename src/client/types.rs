//! Plain data the client library hands out: messages, join results, rooms, events.

use std::time::Duration;

use super::error::{Code, Error};

/// One chat message, as stored in a room's history and delivered to members.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The room it was posted in.
    pub room: String,
    /// Who posted it.
    pub user: String,
    /// The text.
    pub text: String,
    /// Its position in the room's log (1, 2, 3, … without gaps).
    pub seq: u64,
    /// Server wall-clock time of acceptance, milliseconds since the Unix epoch.
    pub sent_at_ms: i64,
    /// The poster's idempotency key (empty if none).
    pub client_msg_id: String,
}

/// The answer to a successful join: a session token and a description of the room.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Joined {
    /// The user name now reserved.
    pub user: String,
    /// The room joined.
    pub room: String,
    /// The opaque session token.
    pub session: String,
    /// Members after the join, sorted (empty above the server's presence limit).
    pub members: Vec<String>,
    /// Number of members after the join.
    pub member_count: u32,
    /// The room's last assigned `seq` (0 if nothing was posted yet).
    pub last_seq: u64,
    /// The room's epoch (changes when the server lost the room's history).
    pub epoch: u64,
    /// How many messages the server retains per room.
    pub history_limit: u32,
}

/// One entry of the room directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomInfo {
    /// The room name.
    pub name: String,
    /// Number of members.
    pub members: u32,
    /// The room's last assigned `seq`.
    pub last_seq: u64,
}

/// The answer to a unary [`Client::send`](super::Client::send).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sent {
    /// The `seq` given to the message (the original one for a repeated id).
    pub seq: u64,
    /// True when the `client_msg_id` was a repeat and nothing new was posted.
    pub duplicate: bool,
}

/// The server's welcome on a chat stream, as the session state machine consumes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WelcomeInfo {
    /// The session token.
    pub session: String,
    /// The session's user name.
    pub user: String,
    /// The room.
    pub room: String,
    /// Members, sorted (empty above the server's presence limit).
    pub members: Vec<String>,
    /// Number of members.
    pub member_count: u32,
    /// The room's last `seq` at the moment of attaching.
    pub last_seq: u64,
    /// The room's epoch.
    pub epoch: u64,
    /// The server resumed a session that had been attached before.
    pub resumed: bool,
    /// Messages after the requested `since_seq` are no longer retained (or the epoch
    /// changed): the replay starts later than asked.
    pub gap: bool,
}

/// One event received on a chat stream (batches already flattened).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// The first event of a stream.
    Welcome(WelcomeInfo),
    /// A replayed or live message.
    Message(Message),
    /// Someone joined or left.
    Presence {
        /// Who.
        user: String,
        /// Joined (true) or left (false).
        joined: bool,
    },
    /// A notice: information (`code == 0`) or a rejected post.
    Notice {
        /// What happened.
        text: String,
        /// 0, or the status code of a rejected post.
        code: i32,
        /// The rejected post's `client_msg_id`, if any.
        client_msg_id: String,
    },
}

/// What a chat session reports to the application, in the order it happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The stream is attached: first connect (`reconnected == false`) or after a drop.
    Welcome {
        /// The room.
        room: String,
        /// The user name.
        user: String,
        /// Members, sorted (empty above the server's presence limit).
        members: Vec<String>,
        /// Number of members.
        member_count: u32,
        /// True when this follows a lost connection.
        reconnected: bool,
    },
    /// A message, shown exactly once: replayed history first, then live ones. The
    /// session's own posts come back here too (that is their acknowledgement).
    Message(Message),
    /// Someone joined or left the room.
    Presence {
        /// Who.
        user: String,
        /// Joined (true) or left (false).
        joined: bool,
    },
    /// Some messages were missed: the server no longer had them (or lost the room's log).
    Gap,
    /// Information from the server (e.g. "server shutting down").
    Notice(String),
    /// The server refused one of our posts; it will not be re-sent.
    PostRejected {
        /// The post's `client_msg_id`.
        client_msg_id: String,
        /// The status code of the refusal.
        code: Code,
        /// Why, in the server's words.
        reason: String,
    },
    /// The stream dropped; the session reconnects after `retry_in` (or at once on a
    /// retry request).
    Disconnected {
        /// What happened, in one sentence.
        reason: String,
        /// How long until the next attempt.
        retry_in: Duration,
    },
    /// The session is over: `None` after a clean leave, otherwise why it failed. Nothing
    /// follows this event.
    Closed(Option<Error>),
}
