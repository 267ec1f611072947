//! The sans-IO client session: reconnect, resume, dedup and post acknowledgement.
//!
//! [`Session`] decides *what* a chat client must do; a driver (see
//! [`ChatSession`](super::ChatSession)) does it with sockets and threads. The session
//! never touches a socket, thread, channel or clock: every input that depends on time
//! takes `now`.
//!
//! # Run loop
//!
//! ```text
//! let mut s = Session::new(config, &joined, since_seq, now);
//! loop {
//!     while let Some(action) = s.poll_action() { perform(action) }   // drain completely
//!     wait for an input or until s.poll_timeout();
//!     s.handle_event / handle_stream_end / handle_rejoined / handle_rejoin_failed
//!       / handle_timeout / post / leave / retry_now (now, …);
//! }
//! ```
//!
//! Rule: after every input, drain [`Session::poll_action`] completely and perform the
//! actions in order. Inputs naming a stream the session no longer uses are ignored (such
//! races are normal), and a spurious `handle_timeout` is a harmless no-op.
//!
//! # What it guarantees
//!
//! - Messages are emitted once: a message whose `seq` is not above the last one seen is
//!   dropped (resume replays overlap what was seen). When the room's epoch changes, the
//!   count restarts and [`Event::Gap`] is emitted, as when the server reports a gap or a
//!   message's `seq` skips past what the session is owed (it joined at a known `seq`, and
//!   every member receives every later one), once per welcome.
//! - Posts stay pending until the server echoes them (same `client_msg_id`) or rejects
//!   them with a notice. After a resume they are re-sent once the replay has caught up,
//!   so a post the server already accepted is recognised in the replay, not posted twice.
//! - A post refused for posting too fast is held back with every later one and re-sent
//!   after a pause (up to a limit), so piped input is not lost to the rate limit. Posts
//!   already in flight when the refusal arrives may overtake it.
//! - A post above the server's gRPC receive limit, which ends the stream it is sent on,
//!   is rejected (not re-sent) once a stream has ended with that limit in its status, and
//!   so is every later one above it.
//! - A dropped stream is retried with capped exponential backoff; an unknown session
//!   (server restart, expired grace) is joined again under the same name and resumed
//!   from the last `seq`; a session taken over by another stream is not fought over.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::error::{Code, Error, Status};
use super::outbox::Outbox;
use super::types::{Event, Incoming, Joined, Message, WelcomeInfo};

/// Timing policies of a [`Session`]. `Default` gives the documented defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    /// The first reconnect delay (default 250 ms); it doubles on each failed attempt.
    pub backoff_initial: Duration,
    /// The longest reconnect delay (default 8 s).
    pub backoff_max: Duration,
    /// How long to wait for the welcome after opening a stream, and for a rejoin to be
    /// answered (default 10 s).
    pub open_timeout: Duration,
    /// How long a replay may take before queued posts are sent anyway (default 10 s).
    pub replay_timeout: Duration,
    /// How long to wait for the server to end the stream after a leave (default 3 s).
    pub leave_timeout: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            backoff_initial: Duration::from_millis(250),
            backoff_max: Duration::from_secs(8),
            open_timeout: Duration::from_secs(10),
            replay_timeout: Duration::from_secs(10),
            leave_timeout: Duration::from_secs(3),
        }
    }
}

/// Identifies one chat stream opened on behalf of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u64);

/// The `hello` frame a new stream must start with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloParams {
    /// The session token to attach to.
    pub session: String,
    /// Replay messages after this `seq`.
    pub since_seq: u64,
    /// The epoch `since_seq` belongs to.
    pub epoch: u64,
}

/// What the driver must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Open a `Chat` stream and send `hello` as its first frame.
    OpenStream {
        /// The id to report the stream's events and end with.
        stream: StreamId,
        /// The first frame.
        hello: HelloParams,
    },
    /// Send a post on the stream.
    SendPost {
        /// The stream.
        stream: StreamId,
        /// The text.
        text: String,
        /// The idempotency key.
        client_msg_id: String,
    },
    /// Send a leave frame on the stream and half-close it.
    SendLeave {
        /// The stream.
        stream: StreamId,
    },
    /// Cancel the stream; the session no longer uses it.
    CloseStream {
        /// The stream.
        stream: StreamId,
    },
    /// Call `Join` with the same name and room; answer with `handle_rejoined` or
    /// `handle_rejoin_failed`.
    Rejoin {
        /// The user name.
        user: String,
        /// The room.
        room: String,
    },
    /// Call `Leave` for the session token (best effort; no answer expected).
    LeaveSession {
        /// The token.
        session: String,
    },
    /// Hand this event to the application.
    Emit(Event),
}

/// What to do when a backoff delay ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    Open,
    Rejoin,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    /// Stream requested; waiting for its welcome.
    Opening { stream: StreamId, deadline: Instant },
    /// Welcomed; replaying until `seq` reaches `until`. Posts wait.
    Replaying { stream: StreamId, until: u64, deadline: Instant },
    /// Attached and caught up.
    Live { stream: StreamId },
    /// Waiting before the next attempt.
    Backoff { until: Instant, next: Next },
    /// A `Join` call is outstanding.
    Rejoining { deadline: Instant },
    /// A leave frame was sent; waiting for the stream to end.
    Leaving { stream: StreamId, deadline: Instant },
    /// Over; nothing more happens.
    Closed,
}

/// The sans-IO state of one chat session. See the [module docs](self) for the run loop.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    user: String,
    room: String,
    token: String,
    epoch: u64,
    last_seq: u64,
    /// Every message above this `seq` (in this epoch) is owed to the session: the room's
    /// last `seq` when it joined, or the `since_seq` it started from if higher.
    owed_after: u64,
    /// A gap was already reported since the last welcome.
    gap_noted: bool,
    /// The largest post frame the server takes, once a refusal has told us.
    max_post_bytes: Option<usize>,
    state: State,
    attempts: u32,
    welcomed_before: bool,
    /// A rejoin succeeded and its stream has not been welcomed yet.
    rejoined: bool,
    next_stream: u64,
    outbox: Outbox,
    actions: VecDeque<Action>,
    closed_with: Option<Option<Error>>,
}

impl Session {
    /// A session for a successful join; it starts by opening a stream that replays the
    /// messages after `since_seq` (use `joined.last_seq` for live messages only).
    pub fn new(config: SessionConfig, joined: &Joined, since_seq: u64, now: Instant) -> Session {
        let mut s = Session {
            config,
            user: joined.user.clone(),
            room: joined.room.clone(),
            token: joined.session.clone(),
            epoch: joined.epoch,
            last_seq: since_seq,
            owed_after: joined.last_seq.max(since_seq),
            gap_noted: false,
            max_post_bytes: None,
            state: State::Closed,
            attempts: 0,
            welcomed_before: false,
            rejoined: false,
            next_stream: 1,
            outbox: Outbox::default(),
            actions: VecDeque::new(),
            closed_with: None,
        };
        s.open(now);
        s
    }

    // ---- getters -------------------------------------------------------------------

    /// The user name.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The room.
    pub fn room(&self) -> &str {
        &self.room
    }

    /// The current session token (it changes after a rejoin).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The highest `seq` shown so far.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The room epoch `last_seq` belongs to.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Posts not yet acknowledged or rejected by the server.
    pub fn pending_posts(&self) -> usize {
        self.outbox.len()
    }

    /// True while a stream is attached and caught up with the room.
    pub fn is_live(&self) -> bool {
        matches!(self.state, State::Live { .. })
    }

    /// `Some(reason)` once the session is over (`Some(None)` after a clean leave).
    pub fn closed(&self) -> Option<&Option<Error>> {
        self.closed_with.as_ref()
    }

    // ---- application commands ------------------------------------------------------

    /// Queues a post. It is sent now if the stream is live, otherwise once it is; it
    /// stays pending until acknowledged. `client_msg_id` must be unique per session.
    /// Fails with [`Error::Closed`] once the session is leaving or over.
    pub fn post(&mut self, _now: Instant, client_msg_id: String, text: String) -> Result<(), Error> {
        if matches!(self.state, State::Leaving { .. } | State::Closed) {
            return Err(Error::Closed);
        }
        if let Some(reason) = self.max_post_bytes.and_then(|limit| too_big(&text, &client_msg_id, limit)) {
            self.emit(Event::PostRejected { client_msg_id, code: Code::ResourceExhausted, reason });
            return Ok(());
        }
        self.outbox.push(client_msg_id, text);
        self.flush_posts();
        Ok(())
    }

    /// Leaves the room: on the stream if there is one (the session closes when the
    /// server ends it), otherwise with a `Leave` call at once. Pending posts are not sent
    /// any more (they stay counted in [`Session::pending_posts`]).
    pub fn leave(&mut self, now: Instant) {
        match self.state {
            State::Opening { stream, .. } | State::Replaying { stream, .. } | State::Live { stream } => {
                self.actions.push_back(Action::SendLeave { stream });
                let deadline = now + self.config.leave_timeout;
                self.state = State::Leaving { stream, deadline };
            }
            State::Backoff { .. } | State::Rejoining { .. } => {
                self.actions.push_back(Action::LeaveSession { session: self.token.clone() });
                self.close(None);
            }
            State::Leaving { .. } | State::Closed => {}
        }
    }

    /// Skips the current backoff delay and tries again now. Returns false (and does
    /// nothing) when the session is not waiting to reconnect.
    pub fn retry_now(&mut self, now: Instant) -> bool {
        match self.state {
            State::Backoff { next, .. } => {
                self.fire(next, now);
                true
            }
            _ => false,
        }
    }

    // ---- inputs ---------------------------------------------------------------------

    /// An event arrived on `stream`.
    pub fn handle_event(&mut self, now: Instant, stream: StreamId, event: Incoming) {
        if self.current_stream() != Some(stream) {
            return;
        }
        match event {
            Incoming::Welcome(w) => self.on_welcome(now, stream, w),
            Incoming::Message(m) => self.on_message(m),
            Incoming::Presence { user, joined } => {
                self.emit(Event::Presence { user, joined });
            }
            Incoming::Notice { text, code, client_msg_id } => {
                self.on_notice(now, text, code, client_msg_id);
            }
        }
    }

    /// `stream` ended (or could not be opened) with `status`.
    pub fn handle_stream_end(&mut self, now: Instant, stream: StreamId, status: Status) {
        if self.current_stream() != Some(stream) {
            return;
        }
        if let State::Leaving { .. } = self.state {
            self.close(None);
            return;
        }
        match status.code {
            Code::NotFound | Code::Unauthenticated => {
                // The server no longer knows the session: join again under the same name,
                // at once unless a fresh rejoin was just refused the same way.
                if !self.rejoined {
                    self.rejoin(now);
                } else {
                    let why = "the session expired on the server; joining again".to_string();
                    self.backoff(now, Next::Rejoin, why);
                }
            }
            Code::Aborted => self.close(Some(Error::Superseded)),
            Code::InvalidArgument
            | Code::AlreadyExists
            | Code::FailedPrecondition
            | Code::PermissionDenied
            | Code::Unimplemented
            | Code::OutOfRange
            | Code::DataLoss => {
                let ctx = super::error::Context { addr: "", user: &self.user, room: &self.room };
                self.close(Some(Error::from_status(&status, ctx)));
            }
            Code::Ok
            | Code::Cancelled
            | Code::Unknown
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Internal
            | Code::Unavailable => {
                if status.code == Code::ResourceExhausted {
                    self.reject_oversized_posts(&status.message);
                }
                let why = describe_drop(&status);
                self.backoff(now, Next::Open, why);
            }
        }
    }

    /// The `Join` requested by [`Action::Rejoin`] succeeded.
    pub fn handle_rejoined(&mut self, now: Instant, joined: &Joined) {
        if !matches!(self.state, State::Rejoining { .. }) {
            // Too late: the session gave up on this call. Release the name it reserved.
            if joined.session != self.token {
                self.actions.push_back(Action::LeaveSession { session: joined.session.clone() });
            }
            return;
        }
        self.token = joined.session.clone();
        self.rejoined = true;
        self.open(now);
    }

    /// The `Join` requested by [`Action::Rejoin`] failed with `status`.
    pub fn handle_rejoin_failed(&mut self, now: Instant, status: Status) {
        if !matches!(self.state, State::Rejoining { .. }) {
            return;
        }
        match status.code {
            Code::Unavailable
            | Code::Cancelled
            | Code::Unknown
            | Code::DeadlineExceeded
            | Code::Internal
            | Code::ResourceExhausted => {
                let why = describe_drop(&status);
                self.backoff(now, Next::Rejoin, why);
            }
            _ => {
                let ctx = super::error::Context { addr: "", user: &self.user, room: &self.room };
                self.close(Some(Error::from_status(&status, ctx)));
            }
        }
    }

    /// Fires every deadline due at `now`; a no-op when none is.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.outbox.handle_timeout(now) {
            self.flush_posts();
        }
        match self.state.clone() {
            State::Backoff { until, next } if now >= until => self.fire(next, now),
            State::Opening { stream, deadline } if now >= deadline => {
                self.actions.push_back(Action::CloseStream { stream });
                let why = "the server did not answer in time".to_string();
                self.backoff(now, Next::Open, why);
            }
            State::Rejoining { deadline } if now >= deadline => {
                let why = "the server did not answer in time".to_string();
                self.backoff(now, Next::Rejoin, why);
            }
            State::Replaying { stream, deadline, .. } if now >= deadline => self.go_live(stream),
            State::Leaving { stream, deadline } if now >= deadline => {
                self.actions.push_back(Action::CloseStream { stream });
                self.actions.push_back(Action::LeaveSession { session: self.token.clone() });
                self.close(None);
            }
            _ => {}
        }
    }

    // ---- outputs --------------------------------------------------------------------

    /// The next action to perform, in order; `None` when drained.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Session::handle_timeout`] must be called next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let state = match self.state {
            State::Opening { deadline, .. }
            | State::Replaying { deadline, .. }
            | State::Rejoining { deadline }
            | State::Leaving { deadline, .. } => Some(deadline),
            State::Backoff { until, .. } => Some(until),
            State::Live { .. } | State::Closed => None,
        };
        match (state, self.outbox.deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    // ---- internals ------------------------------------------------------------------

    fn current_stream(&self) -> Option<StreamId> {
        match self.state {
            State::Opening { stream, .. }
            | State::Replaying { stream, .. }
            | State::Live { stream }
            | State::Leaving { stream, .. } => Some(stream),
            _ => None,
        }
    }

    fn emit(&mut self, event: Event) {
        self.actions.push_back(Action::Emit(event));
    }

    fn open(&mut self, now: Instant) {
        let stream = StreamId(self.next_stream);
        self.next_stream += 1;
        self.outbox.mark_all_unsent();
        let hello = HelloParams { session: self.token.clone(), since_seq: self.last_seq, epoch: self.epoch };
        self.actions.push_back(Action::OpenStream { stream, hello });
        self.state = State::Opening { stream, deadline: now + self.config.open_timeout };
    }

    fn rejoin(&mut self, now: Instant) {
        self.actions.push_back(Action::Rejoin { user: self.user.clone(), room: self.room.clone() });
        self.state = State::Rejoining { deadline: now + self.config.open_timeout };
    }

    fn fire(&mut self, next: Next, now: Instant) {
        match next {
            Next::Open => self.open(now),
            Next::Rejoin => self.rejoin(now),
        }
    }

    fn backoff(&mut self, now: Instant, next: Next, reason: String) {
        self.attempts = self.attempts.saturating_add(1);
        let delay = backoff_delay(&self.config, self.attempts);
        self.state = State::Backoff { until: now + delay, next };
        self.emit(Event::Disconnected { reason, retry_in: delay });
    }

    fn close(&mut self, error: Option<Error>) {
        self.state = State::Closed;
        self.closed_with = Some(error.clone());
        self.emit(Event::Closed(error));
    }

    fn on_welcome(&mut self, now: Instant, stream: StreamId, w: WelcomeInfo) {
        if !matches!(self.state, State::Opening { .. }) {
            return; // a second welcome on one stream: ignore
        }
        let mut gap = w.gap;
        if self.epoch != 0 && w.epoch != self.epoch {
            // A new log: its seqs restart, so everything it replays is new to us.
            self.last_seq = 0;
            self.owed_after = 0;
            gap = true;
        }
        self.gap_noted = gap;
        self.epoch = w.epoch;
        if !w.session.is_empty() {
            self.token = w.session;
        }
        self.attempts = 0;
        self.rejoined = false;
        self.emit(Event::Welcome {
            room: w.room,
            user: w.user,
            members: w.members,
            member_count: w.member_count,
            reconnected: self.welcomed_before,
        });
        self.welcomed_before = true;
        if gap {
            self.emit(Event::Gap);
        }
        if w.last_seq > self.last_seq {
            let deadline = now + self.config.replay_timeout;
            self.state = State::Replaying { stream, until: w.last_seq, deadline };
        } else {
            self.go_live(stream);
        }
    }

    fn go_live(&mut self, stream: StreamId) {
        self.state = State::Live { stream };
        self.flush_posts();
    }

    /// Writes the posts not yet written on the live stream (none while throttled).
    fn flush_posts(&mut self) {
        let State::Live { stream } = self.state else { return };
        for (client_msg_id, text) in self.outbox.take_unsent() {
            self.actions.push_back(Action::SendPost { stream, text, client_msg_id });
        }
    }

    fn on_message(&mut self, m: Message) {
        if m.seq <= self.last_seq {
            return; // seen before (replay overlap after a resume)
        }
        // Every member receives every seq of its room, so a jump past what is owed means
        // messages were lost. The server says so in the welcome when it resumes a session,
        // but not after a rejoin (a new session): a client that had seen nothing resumes
        // from 0, which to the server means "whatever is retained".
        if m.seq > self.last_seq.max(self.owed_after) + 1 && !self.gap_noted {
            self.gap_noted = true;
            self.emit(Event::Gap);
        }
        self.last_seq = m.seq;
        if !m.client_msg_id.is_empty() && m.user == self.user {
            self.outbox.acknowledge(&m.client_msg_id);
        }
        self.emit(Event::Message(m));
        if let State::Replaying { stream, until, .. } = self.state {
            if self.last_seq >= until {
                self.go_live(stream);
            }
        }
    }

    /// The stream ended with RESOURCE_EXHAUSTED `message`. If that is gRPC's receive
    /// limit ("Received message larger than max (N vs. LIMIT)"), a pending post is too big
    /// for the server and would end every stream it is re-sent on: reject every post
    /// above the limit, and any later one at once.
    fn reject_oversized_posts(&mut self, message: &str) {
        let Some(limit) = receive_limit(message) else { return };
        self.max_post_bytes = Some(limit);
        for (client_msg_id, reason) in self.outbox.remove_where(|p| too_big(&p.text, &p.client_msg_id, limit))
        {
            self.emit(Event::PostRejected { client_msg_id, code: Code::ResourceExhausted, reason });
        }
    }

    fn on_notice(&mut self, now: Instant, text: String, code: i32, client_msg_id: String) {
        if code == 0 || client_msg_id.is_empty() {
            self.emit(Event::Notice(text));
            return;
        }
        let code = Code::from_i32(code);
        let lower = text.to_ascii_lowercase();
        let too_fast = lower.contains("too fast") || lower.contains("rate");
        if code == Code::ResourceExhausted && too_fast && self.outbox.rate_limited(now, &client_msg_id) {
            return; // held back and re-sent after a pause
        }
        if self.outbox.acknowledge(&client_msg_id) {
            self.emit(Event::PostRejected { client_msg_id, code, reason: text });
        } else {
            self.emit(Event::Notice(text));
        }
    }
}

/// The limit in gRPC's refusal of an oversized message, e.g. 5120 in "Received message
/// larger than max (60029 vs. 5120)".
fn receive_limit(message: &str) -> Option<usize> {
    let rest = &message[message.find("larger than max")?..];
    let after = rest[rest.find("vs.")? + 3..].trim_start();
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Why a post of `text` does not fit a receive limit of `limit` bytes, if it does not.
fn too_big(text: &str, client_msg_id: &str, limit: usize) -> Option<String> {
    use prost::Message as _;
    let frame = crate::pb::ClientFrame {
        frame: Some(crate::pb::client_frame::Frame::Post(crate::pb::Post {
            text: text.to_owned(),
            client_msg_id: client_msg_id.to_owned(),
        })),
    };
    let len = frame.encoded_len();
    (len > limit)
        .then(|| format!("the message is {len} bytes with its framing; the server takes at most {limit}"))
}

/// The delay before attempt `attempts` (1-based): initial · 2^(attempts-1), capped.
fn backoff_delay(config: &SessionConfig, attempts: u32) -> Duration {
    let factor = 1u32 << attempts.saturating_sub(1).min(20);
    config.backoff_initial.saturating_mul(factor).min(config.backoff_max)
}

/// One sentence for a dropped stream.
fn describe_drop(status: &Status) -> String {
    let lower = status.message.to_ascii_lowercase();
    match status.code {
        Code::Unavailable if lower.contains("shutting down") => "the server is shutting down".into(),
        Code::ResourceExhausted if lower.contains("too slow") => {
            "the server dropped us for reading too slowly".into()
        }
        Code::ResourceExhausted => format!("the server refused: {}", status.message),
        Code::Ok => "the server ended the stream".into(),
        Code::DeadlineExceeded => "the server did not answer in time".into(),
        _ => "lost the connection to the server".into(),
    }
}
