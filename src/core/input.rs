//! What the driver feeds the broker, and what it answers.

use std::sync::Arc;

use super::ids::{ConnId, Epoch, Seq, Token};

/// Everything a client (through the driver) can cause. See
/// [`Broker::handle_input`](super::Broker::handle_input).
#[derive(Clone, Debug)]
pub enum Input {
    /// `Join` RPC: reserve `user` in `room`. `token` is fresh from
    /// [`Token::from_entropy`] and becomes the session's token if the join succeeds.
    Join {
        /// Requested user name (validated by the core).
        user: String,
        /// Requested room (validated by the core).
        room: String,
        /// The new session's token.
        token: Token,
    },
    /// A `Chat` or `Subscribe` stream arrived. Answered with [`Accepted::Opened`]; the
    /// stream then waits for its `Hello` or `Subscribe` input.
    Open,
    /// The first frame of a `Chat` stream.
    Hello {
        /// The stream.
        conn: ConnId,
        /// The frame's fields.
        hello: Hello,
        /// Token for the session if this hello joins implicitly.
        new_token: Token,
    },
    /// A `Subscribe` call, for a stream made with [`Input::Open`].
    Subscribe {
        /// The stream.
        conn: ConnId,
        /// Session token, or "" for an anonymous listener.
        session: String,
        /// Room ("" allowed with a session).
        room: String,
        /// Replay after this seq.
        since: Seq,
        /// The epoch `since` belongs to (0 = unknown).
        epoch: Epoch,
    },
    /// A `post` frame on a `Chat` stream.
    Post {
        /// The stream.
        conn: ConnId,
        /// Message text (validated by the core).
        text: String,
        /// Idempotency key, or "".
        client_msg_id: String,
        /// Wall-clock time of receipt, ms since the Unix epoch (stamped by the driver).
        sent_at_ms: i64,
    },
    /// `Send` RPC: post without a stream.
    Send {
        /// Session token.
        session: String,
        /// Message text.
        text: String,
        /// Idempotency key, or "".
        client_msg_id: String,
        /// Wall-clock time of receipt, ms since the Unix epoch.
        sent_at_ms: i64,
    },
    /// A `leave` frame on a `Chat` stream.
    LeaveStream {
        /// The stream.
        conn: ConnId,
    },
    /// `Leave` RPC.
    Leave {
        /// Session token.
        session: String,
    },
    /// The client ended its side of a `Chat` stream: it sends no more frames. A stream
    /// still waiting for its hello is closed (`INVALID_ARGUMENT`), since it could never
    /// receive anything; any other goes on receiving.
    HalfClosed {
        /// The stream.
        conn: ConnId,
    },
    /// The stream ended without a leave (client gone, cancelled, write failed). Its
    /// session stays reserved for the resume grace period.
    StreamEnded {
        /// The stream.
        conn: ConnId,
    },
    /// The driver could not queue an event for this stream: its queue is full. The
    /// core closes it (`RESOURCE_EXHAUSTED`) and keeps its session for a resume. After
    /// reporting this, the driver must drop further deliveries to the stream, so that
    /// it never sees a message after a missing one.
    Lagging {
        /// The stream.
        conn: ConnId,
    },
    /// The server is stopping: every stream gets `notice` and is closed with
    /// `UNAVAILABLE`; new joins and streams are refused.
    Shutdown {
        /// The text of the notice.
        notice: String,
    },
}

/// The fields of a `Hello` frame.
#[derive(Clone, Debug, Default)]
pub struct Hello {
    /// A session token to attach to, or "" to join implicitly with `user` and `room`.
    pub session: String,
    /// User name for an implicit join.
    pub user: String,
    /// Room for an implicit join.
    pub room: String,
    /// Replay retained messages after this seq.
    pub since: Seq,
    /// The epoch `since` belongs to (0 = unknown).
    pub epoch: Epoch,
}

/// What the broker did with an accepted input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Accepted {
    /// A session was opened.
    Joined(JoinInfo),
    /// A stream was registered; feed its first frame next.
    Opened(ConnId),
    /// A stream was attached; its welcome (and replay) are queued.
    Attached {
        /// The stream.
        conn: ConnId,
        /// The session's token (`None` for an anonymous listener).
        session: Option<Token>,
        /// The session's user ("" for an anonymous listener).
        user: Arc<str>,
        /// The room.
        room: Arc<str>,
        /// It resumed an earlier attach.
        resumed: bool,
        /// Some requested messages were no longer retained.
        gap: bool,
        /// How many messages are replayed.
        replayed: usize,
    },
    /// A message was accepted (or was a repeat of one).
    Posted(Posted),
    /// A session ended; its stream, if any, is closed with OK.
    Left {
        /// Who left.
        user: Arc<str>,
        /// From where.
        room: Arc<str>,
    },
    /// A stream was detached or closed; its session (if any) may resume.
    Detached,
    /// The input named a stream the core has already closed; nothing changed.
    Ignored,
    /// Shutdown is under way.
    ShuttingDown,
}

/// The answer to a successful join.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinInfo {
    /// The session token.
    pub token: Token,
    /// Sorted member names (empty above the presence limit).
    pub members: Vec<Arc<str>>,
    /// Number of members, the new one included.
    pub member_count: usize,
    /// The room's last seq.
    pub last_seq: Seq,
    /// The room's epoch.
    pub epoch: Epoch,
    /// Messages retained per room.
    pub history_limit: usize,
}

/// The answer to a post.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Posted {
    /// The message's seq (the original one for a repeat).
    pub seq: Seq,
    /// The `client_msg_id` was a repeat; nothing was posted.
    pub duplicate: bool,
    /// How many streams the message was queued for.
    pub recipients: usize,
}

/// One line of the room directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomInfo {
    /// Room name.
    pub name: Arc<str>,
    /// Number of members.
    pub members: usize,
    /// Last seq.
    pub last_seq: Seq,
}
