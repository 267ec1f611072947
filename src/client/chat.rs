//! [`ChatSession`]: a chat stream that reconnects, resumes and acknowledges by itself.
//!
//! A driver thread owns the sans-IO [`Session`] and performs its actions: each stream
//! runs on two threads of its own (see `stream.rs`), rejoins run on a short-lived thread,
//! and the application talks to the driver through channels. Nothing the application
//! does waits for the network, except the calls documented as waiting.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;

use super::connection::Client;
use super::convert;
use super::error::{Code, Error, Status};
use super::session::{Action, Session, SessionConfig, StreamId};
use super::stream::{self, StreamHandle, StreamReport};
use super::types::{Event, Joined};

/// How a [`ChatSession`] starts and behaves. `Default` gives the documented defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatConfig {
    /// How many of the room's most recent messages to replay before live ones (default
    /// 20; 0 = live messages only).
    pub replay: u64,
    /// How many posts may wait for the server's acknowledgement at once (default 1000,
    /// at least 1). Beyond that [`ChatSession::post`] refuses with
    /// [`Error::OutboxFull`], so a program that posts faster than the server acknowledges
    /// — or during a long outage — holds a bounded amount of text.
    pub max_pending_posts: usize,
    /// Reconnect and timeout policies.
    pub session: SessionConfig,
}

impl Default for ChatConfig {
    fn default() -> Self {
        ChatConfig { replay: 20, max_pending_posts: 1000, session: SessionConfig::default() }
    }
}

/// A snapshot of a chat session's bookkeeping, for display and tests.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SessionState {
    /// The current session token (it changes after a rejoin).
    pub session: String,
    /// The highest `seq` shown.
    pub last_seq: u64,
    /// The room epoch `last_seq` belongs to.
    pub epoch: u64,
    /// Posts not yet acknowledged or rejected (including those just made).
    pub pending_posts: usize,
    /// A stream is attached and caught up.
    pub live: bool,
    /// The session is over.
    pub closed: bool,
}

enum DriverMsg {
    Stream(StreamReport),
    Rejoined(Result<Joined, Status>),
    Post { client_msg_id: String, text: String },
    Leave(Sender<()>),
    Retry,
    WaitAcked(AckWaiter),
    Stop,
}

/// Someone waiting for the pending posts to drop to `at_most`: those made before it asked
/// (`acked`), or all of them, also those made since (`room_to_post`).
struct AckWaiter {
    at_most: usize,
    newer_too: bool,
    done: Sender<Result<(), Error>>,
}

/// The snapshot the driver publishes, and the posts handed to it but not yet taken in.
#[derive(Debug, Default)]
struct Shared {
    state: SessionState,
    /// Posts sent to the driver that it has not taken from its inbox yet; they count in
    /// `state.pending_posts` already.
    untaken: usize,
}

/// A joined chat session with its stream, running on background threads.
///
/// Events (messages exactly once, presence, gaps, disconnections, the final
/// [`Event::Closed`]) arrive on [`ChatSession::events`]; the channel is unbounded, so
/// read it. Posts are acknowledged by the server's echo and re-sent after a resume until
/// they are. Dropping the session abandons it without leaving: the server keeps the
/// name reserved for its resume grace period. Call [`ChatSession::leave`] to leave.
pub struct ChatSession {
    user: String,
    room: String,
    to_driver: Sender<DriverMsg>,
    events: Receiver<Event>,
    shared: Arc<Mutex<Shared>>,
    max_pending_posts: usize,
    id_prefix: String,
    next_id: AtomicU64,
    leave_wait: Duration,
}

impl std::fmt::Debug for ChatSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatSession")
            .field("user", &self.user)
            .field("room", &self.room)
            .field("state", &self.shared.lock().state)
            .finish()
    }
}

impl ChatSession {
    pub(crate) fn start(client: Client, joined: &Joined, config: ChatConfig) -> ChatSession {
        let since = joined.last_seq.saturating_sub(config.replay);
        let leave_wait = config.session.leave_timeout + Duration::from_secs(3);
        let rejoin_timeout = config.session.open_timeout.mul_f64(0.8);
        let session = Session::new(config.session, joined, since, Instant::now());
        let (to_driver, inbox) = unbounded();
        let (events_tx, events) = unbounded();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let driver = Driver {
            client,
            session,
            streams: HashMap::new(),
            inbox_tx: to_driver.clone(),
            events: events_tx,
            shared: shared.clone(),
            ack_waiters: Vec::new(),
            leave_waiters: Vec::new(),
            rejoin_timeout,
        };
        let spawned = thread::Builder::new()
            .name("chat-session".into())
            .stack_size(512 * 1024)
            .spawn(move || driver.run(inbox));
        if let Err(e) = spawned {
            // Without its thread the session cannot run: report it closed.
            let _ = e;
            shared.lock().state.closed = true;
        }
        ChatSession {
            user: joined.user.clone(),
            room: joined.room.clone(),
            to_driver,
            events,
            shared,
            max_pending_posts: config.max_pending_posts.max(1),
            id_prefix: id_prefix(),
            next_id: AtomicU64::new(1),
            leave_wait,
        }
    }

    /// The user name.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The room.
    pub fn room(&self) -> &str {
        &self.room
    }

    /// What the session knows right now.
    pub fn state(&self) -> SessionState {
        self.shared.lock().state.clone()
    }

    /// The events, in order. The channel disconnects after [`Event::Closed`].
    pub fn events(&self) -> &Receiver<Event> {
        &self.events
    }

    /// The next event, waiting at most `timeout`; `None` on timeout or after the end.
    pub fn next_event(&self, timeout: Duration) -> Option<Event> {
        self.events.recv_timeout(timeout).ok()
    }

    /// Posts `text` and returns its `client_msg_id`, without waiting: the post is sent
    /// as soon as the stream is live and re-sent after a resume until the server echoes
    /// it (an [`Event::Message`] with the same id) or rejects it
    /// ([`Event::PostRejected`]). Fails with [`Error::Closed`] once the session is over,
    /// and with [`Error::OutboxFull`] while [`ChatConfig::max_pending_posts`] posts are
    /// pending ([`ChatSession::room_to_post`] says when that is over).
    pub fn post(&self, text: impl Into<String>) -> Result<String, Error> {
        let mut shared = self.shared.lock();
        if shared.state.closed {
            return Err(Error::Closed);
        }
        if shared.state.pending_posts >= self.max_pending_posts {
            return Err(Error::OutboxFull(shared.state.pending_posts));
        }
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let client_msg_id = format!("{}-{n}", self.id_prefix);
        let msg = DriverMsg::Post { client_msg_id: client_msg_id.clone(), text: text.into() };
        self.to_driver.send(msg).map_err(|_| Error::Closed)?;
        shared.untaken += 1;
        shared.state.pending_posts += 1;
        Ok(client_msg_id)
    }

    /// Reconnects now if the session is waiting to (skips the backoff delay).
    pub fn retry_now(&self) {
        let _ = self.to_driver.send(DriverMsg::Retry);
    }

    /// A channel that receives one value once every post made so far is acknowledged or
    /// rejected (`Ok`), or the session closes first (`Err`).
    pub fn acked(&self) -> Receiver<Result<(), Error>> {
        self.pending_at_most(0, false)
    }

    /// A channel that receives one value once [`ChatSession::post`] would take another
    /// post, that is fewer than [`ChatConfig::max_pending_posts`] are pending (`Ok`), or
    /// the session closes first (`Err`).
    pub fn room_to_post(&self) -> Receiver<Result<(), Error>> {
        self.pending_at_most(self.max_pending_posts - 1, true)
    }

    fn pending_at_most(&self, at_most: usize, newer_too: bool) -> Receiver<Result<(), Error>> {
        let (done, rx) = crossbeam_channel::bounded(1);
        let waiter = AckWaiter { at_most, newer_too, done };
        if let Err(e) = self.to_driver.send(DriverMsg::WaitAcked(waiter)) {
            if let DriverMsg::WaitAcked(waiter) = e.into_inner() {
                let _ = waiter.done.send(Err(Error::Closed));
            }
        }
        rx
    }

    /// Waits until every post made so far is acknowledged or rejected, at most `timeout`.
    pub fn wait_acked(&self, timeout: Duration) -> Result<(), Error> {
        match self.acked().recv_timeout(timeout) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => {
                let n = self.shared.lock().state.pending_posts;
                Err(Error::TimedOut(format!("the server to acknowledge {n} message(s)")))
            }
            Err(RecvTimeoutError::Disconnected) => Err(Error::Closed),
        }
    }

    /// Leaves the room and ends the session, waiting (a few seconds at most) for the
    /// server to confirm. Unacknowledged posts are abandoned: call
    /// [`ChatSession::wait_acked`] first to keep them.
    pub fn leave(self) -> Result<(), Error> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.to_driver.send(DriverMsg::Leave(tx)).is_err() {
            return Ok(()); // already over
        }
        match rx.recv_timeout(self.leave_wait) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => Ok(()),
            Err(RecvTimeoutError::Timeout) => Err(Error::TimedOut("the server to confirm the leave".into())),
        }
    }
}

impl Drop for ChatSession {
    fn drop(&mut self) {
        let _ = self.to_driver.send(DriverMsg::Stop);
    }
}

/// A prefix unique to this session handle, for `client_msg_id`s.
fn id_prefix() -> String {
    let mut bytes = [0u8; 8];
    if getrandom::getrandom(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        bytes = (nanos ^ u64::from(std::process::id()).rotate_left(32)).to_le_bytes();
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("c{hex}")
}

/// Inputs produced while performing actions, fed back after the queue is drained.
enum Deferred {
    StreamEnd(StreamId, Status),
    RejoinFailed(Status),
}

struct Driver {
    client: Client,
    session: Session,
    streams: HashMap<StreamId, StreamHandle>,
    inbox_tx: Sender<DriverMsg>,
    events: Sender<Event>,
    shared: Arc<Mutex<Shared>>,
    ack_waiters: Vec<AckWaiter>,
    leave_waiters: Vec<Sender<()>>,
    rejoin_timeout: Duration,
}

impl Driver {
    fn run(mut self, inbox: Receiver<DriverMsg>) {
        loop {
            self.perform();
            self.publish();
            if self.session.closed().is_some() {
                break;
            }
            let msg = match self.session.poll_timeout() {
                Some(at) => inbox.recv_deadline(at).map_err(|e| e == RecvTimeoutError::Timeout),
                None => inbox.recv().map_err(|_| false),
            };
            let now = Instant::now();
            match msg {
                Err(true) => self.session.handle_timeout(now),
                Err(false) | Ok(DriverMsg::Stop) => break,
                Ok(DriverMsg::Stream(StreamReport::Events(id, events))) => {
                    for event in events {
                        self.session.handle_event(now, id, event);
                    }
                }
                Ok(DriverMsg::Stream(StreamReport::Ended(id, status))) => {
                    self.streams.remove(&id);
                    self.session.handle_stream_end(now, id, status);
                }
                Ok(DriverMsg::Rejoined(Ok(joined))) => self.session.handle_rejoined(now, &joined),
                Ok(DriverMsg::Rejoined(Err(status))) => self.session.handle_rejoin_failed(now, status),
                Ok(DriverMsg::Post { client_msg_id, text }) => {
                    if self.session.post(now, client_msg_id, text).is_err() {
                        // Closed meanwhile; the application learns it from Event::Closed.
                    }
                    // The post moves from the inbox to the session in one step, so the
                    // count `post` checks never drops below what is really pending.
                    let mut shared = self.shared.lock();
                    shared.untaken -= 1;
                    shared.state.pending_posts = self.session.pending_posts() + shared.untaken;
                }
                Ok(DriverMsg::Leave(done)) => {
                    self.leave_waiters.push(done);
                    self.session.leave(now);
                }
                Ok(DriverMsg::Retry) => {
                    self.session.retry_now(now);
                }
                Ok(DriverMsg::WaitAcked(waiter)) => self.ack_waiters.push(waiter),
            }
        }
        // Over (or abandoned): cancel the streams and answer everyone still waiting.
        self.streams.clear();
        let error = match self.session.closed() {
            Some(Some(e)) => e.clone(),
            _ => Error::Closed,
        };
        for w in self.ack_waiters.drain(..) {
            let _ = w.done.send(Err(error.clone()));
        }
        for w in self.leave_waiters.drain(..) {
            let _ = w.send(());
        }
        self.shared.lock().state.closed = true;
    }

    /// Performs every queued action, feeding back failures that happen on the way.
    fn perform(&mut self) {
        loop {
            let mut deferred = Vec::new();
            while let Some(action) = self.session.poll_action() {
                self.act(action, &mut deferred);
            }
            if deferred.is_empty() {
                return;
            }
            let now = Instant::now();
            for d in deferred {
                match d {
                    Deferred::StreamEnd(id, status) => self.session.handle_stream_end(now, id, status),
                    Deferred::RejoinFailed(status) => self.session.handle_rejoin_failed(now, status),
                }
            }
        }
    }

    fn act(&mut self, action: Action, deferred: &mut Vec<Deferred>) {
        match action {
            Action::OpenStream { stream, hello } => {
                let opened = stream::open(
                    self.client.stub(),
                    stream,
                    &hello,
                    self.inbox_tx.clone(),
                    DriverMsg::Stream,
                );
                match opened {
                    Ok(handle) => {
                        self.streams.insert(stream, handle);
                    }
                    Err(status) => deferred.push(Deferred::StreamEnd(stream, status)),
                }
            }
            Action::SendPost { stream, text, client_msg_id } => {
                if let Some(h) = self.streams.get(&stream) {
                    h.send(convert::post(text, client_msg_id));
                }
            }
            Action::SendLeave { stream } => {
                if let Some(h) = self.streams.get(&stream) {
                    h.send(convert::leave());
                    h.close();
                }
            }
            Action::CloseStream { stream } => {
                self.streams.remove(&stream);
            }
            Action::Rejoin { user, room } => {
                let client = self.client.clone();
                let tx = self.inbox_tx.clone();
                let timeout = self.rejoin_timeout;
                let spawned = thread::Builder::new().name("chat-rejoin".into()).stack_size(256 * 1024).spawn(
                    move || {
                        let result = client.join_for_session(&user, &room, timeout);
                        let _ = tx.send(DriverMsg::Rejoined(result));
                    },
                );
                if let Err(e) = spawned {
                    let status = Status::new(Code::Internal, format!("cannot start a thread: {e}"));
                    deferred.push(Deferred::RejoinFailed(status));
                }
            }
            Action::LeaveSession { session } => self.client.leave_quietly(&session),
            Action::Emit(event) => {
                let _ = self.events.send(event);
            }
        }
    }

    /// Updates the shared snapshot and answers acknowledgement waiters.
    fn publish(&mut self) {
        // The posts made before a waiter asked are all taken in by now: they came through
        // the same inbox, earlier.
        let pending = self.session.pending_posts();
        let untaken = {
            let mut shared = self.shared.lock();
            let untaken = shared.untaken;
            let s = &mut shared.state;
            s.session = self.session.token().to_string();
            s.last_seq = self.session.last_seq();
            s.epoch = self.session.epoch();
            s.pending_posts = pending + untaken;
            s.live = self.session.is_live();
            s.closed = self.session.closed().is_some();
            untaken
        };
        if self.session.closed().is_none_or(|e| e.is_none()) {
            self.ack_waiters.retain(|w| {
                let done = pending + if w.newer_too { untaken } else { 0 } <= w.at_most;
                if done {
                    let _ = w.done.send(Ok(()));
                }
                !done
            });
        }
    }
}
