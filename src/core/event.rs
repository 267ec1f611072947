//! What the core emits: events for members and commands for the transport.

use std::sync::Arc;

use super::ids::{ConnId, Epoch, Seq, Token};
use super::validate::{Code, Rejection};

/// One accepted chat message, shared (never copied) between history and deliveries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The room it was posted in.
    pub room: Arc<str>,
    /// Who posted it.
    pub user: Arc<str>,
    /// The validated text.
    pub text: String,
    /// Its place in the room's log.
    pub seq: Seq,
    /// Wall-clock acceptance time as supplied by the driver (ms since the Unix epoch).
    pub sent_at_ms: i64,
    /// The poster's idempotency key ("" if none).
    pub client_msg_id: String,
}

/// What a retained message is counted as besides its text and idempotency key: the record,
/// its allocations and its place in the history ring (room and user names are shared).
/// Measured on the server: 185–205 bytes per retained message beyond text and key.
pub const MESSAGE_OVERHEAD: usize = 256;

impl Message {
    /// The bytes a retained message is counted as against the history budget.
    pub fn weight(&self) -> usize {
        MESSAGE_OVERHEAD + self.text.len() + self.client_msg_id.len()
    }
}

/// First event on every attached stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// The session token; `None` for an anonymous listener.
    pub session: Option<Token>,
    /// The session's user name ("" for an anonymous listener).
    pub user: Arc<str>,
    /// The room.
    pub room: Arc<str>,
    /// Sorted member names; empty when the room is above the presence limit.
    pub members: Vec<Arc<str>>,
    /// Number of members.
    pub member_count: usize,
    /// The room's last seq at attach time.
    pub last_seq: Seq,
    /// The room's epoch.
    pub epoch: Epoch,
    /// The stream resumes a session that was attached before.
    pub resumed: bool,
    /// Messages after the requested seq are missing from the replay that follows.
    pub gap: bool,
    /// Messages retained per room.
    pub history_limit: usize,
}

/// A member joined or left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Presence {
    /// The room.
    pub room: Arc<str>,
    /// Who.
    pub user: Arc<str>,
    /// Joined (`true`) or left (`false`).
    pub joined: bool,
}

/// A sentence from the server; with a `code` it answers a rejected post.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// What happened.
    pub text: String,
    /// The status of a rejected post; `None` for plain information.
    pub code: Option<Code>,
    /// The rejected post's `client_msg_id` ("" if none or not a rejection).
    pub client_msg_id: String,
}

/// Something to send to members. Payloads are shared: the transport encodes an event
/// once and hands the same bytes to every recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The attach confirmation (always to a single stream, always first).
    Welcome(Box<Welcome>),
    /// Retained messages replayed after a welcome, oldest first (single stream).
    Backlog(Vec<Arc<Message>>),
    /// A live message.
    Message(Arc<Message>),
    /// A presence change.
    Presence(Arc<Presence>),
    /// A notice.
    Notice(Arc<Notice>),
}

/// Who receives a [`Output::Deliver`]: one stream, or a room's streams in a
/// deterministic order (ascending [`ConnId`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recipients {
    /// A single stream.
    One(ConnId),
    /// Several streams, shared with the room until its membership changes.
    Many(Arc<[ConnId]>),
}

impl Recipients {
    /// The recipients as a slice, in delivery order.
    pub fn as_slice(&self) -> &[ConnId] {
        match self {
            Recipients::One(c) => std::slice::from_ref(c),
            Recipients::Many(cs) => cs,
        }
    }

    /// How many streams receive the event.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// True when nobody receives it.
    pub fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }
}

/// How a stream should end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Close {
    /// The stream.
    pub conn: ConnId,
    /// `None` ends it with OK; otherwise with this status.
    pub error: Option<Rejection>,
    /// Send what is already queued for the stream first (`true`), or drop it (`false`,
    /// e.g. for a member too slow to read its queue).
    pub flush: bool,
}

/// What the driver must do next. Drained with [`Broker::poll_output`](super::Broker::poll_output).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Queue `event` for every stream in `to`, in order.
    Deliver {
        /// The streams.
        to: Recipients,
        /// The event.
        event: Event,
    },
    /// End a stream. The core has already forgotten it: later inputs naming it are
    /// answered with a rejection and change nothing.
    Close(Close),
}
