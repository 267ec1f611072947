//! The broker: the state machine that owns rooms, sessions and streams.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use super::config::BrokerConfig;
use super::event::{Close, Event, Message, Notice, Output, Presence, Recipients};
use super::ids::{ConnId, Epoch, Seq, SessionId, Token};
use super::input::{Accepted, Input, JoinInfo, Posted, RoomInfo};
use super::room::Room;
use super::session::{Bucket, RecentIds, Session};
use super::timers::{Timer, Timers};
use super::validate::{self, Code, Rejection};

mod streams;

/// How many tokens of ended sessions are remembered, so that a late `Send` learns the
/// session has left (`FAILED_PRECONDITION`) rather than that it never existed.
const TOMBSTONES: usize = 4096;

/// Why a session ends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// An explicit leave (frame or RPC).
    Left,
    /// Its attach timeout or resume grace ran out.
    Expired,
}

/// What the core knows of a stream.
enum Conn {
    /// Opened; its first frame (hello or subscribe) has not arrived by `deadline` yet.
    AwaitingHello { deadline: Instant },
    /// Receiving a room's events, on behalf of a session or anonymously.
    Attached { room: Arc<str>, session: Option<SessionId> },
}

/// The sans-IO chat broker. See the [module docs](super) for the run loop.
pub struct Broker {
    config: BrokerConfig,
    base_epoch: u64,
    rooms_created: u64,
    rooms: BTreeMap<Arc<str>, Room>,
    /// Rooms whose history weighs anything, by that weight: the heaviest is last.
    by_weight: BTreeSet<(usize, Arc<str>)>,
    /// What all histories weigh together.
    history_bytes: usize,
    sessions: HashMap<SessionId, Session>,
    tokens: HashMap<Token, SessionId>,
    tombstones: (VecDeque<Token>, HashSet<Token>),
    conns: HashMap<ConnId, Conn>,
    timers: Timers,
    /// Streams awaiting their first frame, by deadline.
    hello_due: BTreeSet<(Instant, ConnId)>,
    outputs: VecDeque<Output>,
    next_session: u64,
    next_conn: u64,
    shutting_down: bool,
}

impl Broker {
    /// A broker with no rooms. `epoch` identifies this broker's logs: pass a value that
    /// differs from any earlier run that lost its history (e.g. random bits).
    pub fn new(config: BrokerConfig, epoch: u64) -> Broker {
        Broker {
            config,
            base_epoch: epoch,
            rooms_created: 0,
            rooms: BTreeMap::new(),
            by_weight: BTreeSet::new(),
            history_bytes: 0,
            sessions: HashMap::new(),
            tokens: HashMap::new(),
            tombstones: (VecDeque::new(), HashSet::new()),
            conns: HashMap::new(),
            timers: Timers::default(),
            hello_due: BTreeSet::new(),
            outputs: VecDeque::new(),
            next_session: 1,
            next_conn: 1,
            shutting_down: false,
        }
    }

    /// The configuration the broker runs with.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    // ---- getters -------------------------------------------------------------------

    /// Retained messages of `room` with `seq > since`, oldest first, the newest `limit`
    /// of them (0 = all). An unknown room has no history.
    pub fn history(&self, room: &str, since: Seq, limit: usize) -> Result<Vec<Arc<Message>>, Rejection> {
        validate::room(room, &self.config.limits)?;
        Ok(self.rooms.get(room).map(|r| r.history_since(since, limit)).unwrap_or_default())
    }

    /// Every room, sorted by name.
    pub fn rooms(&self) -> Vec<RoomInfo> {
        self.rooms
            .values()
            .map(|r| RoomInfo { name: Arc::clone(&r.name), members: r.members.len(), last_seq: r.last_seq() })
            .collect()
    }

    /// Sorted member names of `room` (empty for an unknown room).
    pub fn members(&self, room: &str) -> Result<Vec<Arc<str>>, Rejection> {
        validate::room(room, &self.config.limits)?;
        Ok(self.rooms.get(room).map(|r| r.members.keys().cloned().collect()).unwrap_or_default())
    }

    /// Number of open streams the core knows of.
    pub fn stream_count(&self) -> usize {
        self.conns.len()
    }

    /// Number of live sessions (attached or waiting for a resume).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Outputs queued and not yet drained. Zero whenever the driver follows the run loop.
    pub fn pending_outputs(&self) -> usize {
        self.outputs.len()
    }

    // ---- inputs --------------------------------------------------------------------

    /// Handles one input. Afterwards drain [`poll_output`](Self::poll_output) completely
    /// and re-read [`poll_timeout`](Self::poll_timeout) before the next input.
    ///
    /// `Err` is a rejection of the client's request, to be returned to that client as a
    /// status. For stream inputs the core has also queued what the stream must see (a
    /// [`Notice`] for a rejected post, a [`Close`] for a protocol violation), so the
    /// driver only needs the `Err` for logging there. A rejected input changes nothing.
    pub fn handle_input(&mut self, now: Instant, input: Input) -> Result<Accepted, Rejection> {
        debug_assert!(
            self.outputs.is_empty(),
            "driver misuse: {} outputs were not drained before the next input",
            self.outputs.len()
        );
        match input {
            Input::Join { user, room, token } => self.join(now, &user, &room, token).map(Accepted::Joined),
            Input::Open => self.open(now),
            Input::Hello { conn, hello, new_token } => self.hello(now, conn, hello, new_token),
            Input::Subscribe { conn, session, room, since, epoch } => {
                self.subscribe(now, conn, &session, &room, since, epoch)
            }
            Input::Post { conn, text, client_msg_id, sent_at_ms } => {
                self.post_on_stream(now, conn, text, client_msg_id, sent_at_ms)
            }
            Input::Send { session, text, client_msg_id, sent_at_ms } => {
                self.refuse_if_shutting_down()?;
                let id = self.lookup(&session)?;
                let posted = self.post(now, id, text, client_msg_id, sent_at_ms)?;
                self.refresh_detached(now, id);
                Ok(Accepted::Posted(posted))
            }
            Input::LeaveStream { conn } => self.leave_on_stream(now, conn),
            Input::Leave { session } => {
                let id = self.lookup(&session)?;
                let (user, room) = self.end_session(id, Ending::Left);
                Ok(Accepted::Left { user, room })
            }
            Input::HalfClosed { conn } => self.half_closed(now, conn),
            Input::StreamEnded { conn } => Ok(self.detach(now, conn, None)),
            Input::Lagging { conn } => {
                let close =
                    Rejection::new(Code::ResourceExhausted, "too slow: the stream's send queue is full");
                Ok(self.detach(now, conn, Some(close)))
            }
            Input::Shutdown { notice } => Ok(self.shutdown(now, notice)),
        }
    }

    /// Fires every timer due at `now`: sessions that never attached, and detached
    /// sessions whose resume grace ran out, leave their rooms. A call with nothing due
    /// is a harmless no-op. Drain outputs afterwards.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some((session, timer)) = self.timers.pop_due(now) {
            debug_assert!(self.sessions[&session].conn.is_none(), "attached sessions have no timer");
            let _ = timer;
            self.end_session(session, Ending::Expired);
        }
        while let Some(&(deadline, conn)) = self.hello_due.first() {
            if deadline > now {
                break;
            }
            let why = format!("no hello within {} s", self.config.hello_timeout.as_secs_f64());
            self.close_with(now, conn, Code::DeadlineExceeded, why);
        }
    }

    // ---- outputs -------------------------------------------------------------------

    /// The next thing the driver must do, in the order the core decided it.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let hello = self.hello_due.first().map(|&(at, _)| at);
        match (self.timers.next(), hello) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    // ---- sessions ------------------------------------------------------------------

    fn join(&mut self, now: Instant, user: &str, room: &str, token: Token) -> Result<JoinInfo, Rejection> {
        self.refuse_if_shutting_down()?;
        validate::user(user, &self.config.limits)?;
        validate::room(room, &self.config.limits)?;
        if self.sessions.len() >= self.config.max_sessions {
            return Err(Rejection::new(Code::ResourceExhausted, "the server holds too many sessions"));
        }
        if self.tokens.contains_key(&token) {
            return Err(Rejection::new(Code::Unavailable, "session token collision; please retry"));
        }
        let room = self.room_for_join(room)?;
        let r = self.rooms.get_mut(&room).expect("room_for_join returns an existing room");
        if r.members.contains_key(user) {
            return Err(Rejection::new(
                Code::AlreadyExists,
                format!("the name {user:?} is already taken in room {room:?}"),
            ));
        }
        let id = SessionId(self.next_session);
        self.next_session += 1;
        let user: Arc<str> = user.into();
        r.members.insert(Arc::clone(&user), id);
        let (member_count, last_seq, epoch) = (r.members.len(), r.last_seq(), r.epoch);
        let info = JoinInfo {
            token: token.clone(),
            members: self.member_list(&room),
            member_count,
            last_seq,
            epoch,
            history_limit: self.config.history_limit,
        };
        self.announce(&room, &user, true, None);
        self.sessions.insert(
            id,
            Session {
                token: token.clone(),
                user,
                room,
                conn: None,
                ever_attached: false,
                joined_at: last_seq,
                recent: RecentIds::new(self.config.dedup_window),
                bucket: self.config.rate_limit.map(|l| Bucket::new(l, now)),
            },
        );
        self.tokens.insert(token, id);
        self.timers.set(id, now + self.config.attach_timeout, Timer::AttachTimeout);
        Ok(info)
    }

    /// The room to join, created if new; at the room limit an idle room is evicted.
    fn room_for_join(&mut self, name: &str) -> Result<Arc<str>, Rejection> {
        if let Some((key, _)) = self.rooms.get_key_value(name) {
            return Ok(Arc::clone(key));
        }
        if self.rooms.len() >= self.config.max_rooms {
            let idle = self.rooms.iter().find(|(_, r)| r.is_idle()).map(|(k, _)| Arc::clone(k));
            match idle {
                Some(k) => {
                    if let Some(evicted) = self.rooms.remove(&k) {
                        self.reweigh(&k, evicted.history_bytes(), 0);
                    }
                }
                None => {
                    return Err(Rejection::new(Code::ResourceExhausted, "the server holds too many rooms"))
                }
            }
        }
        self.rooms_created += 1;
        // Each creation gets a fresh epoch, so a room evicted and created again is a new log.
        let epoch = Epoch(self.base_epoch.wrapping_add(self.rooms_created).max(1));
        let name: Arc<str> = name.into();
        self.rooms.insert(Arc::clone(&name), Room::new(Arc::clone(&name), epoch, self.config.history_limit));
        Ok(name)
    }

    fn lookup(&self, token: &str) -> Result<SessionId, Rejection> {
        let not_found = || Rejection::new(Code::NotFound, "unknown or expired session");
        let token = Token::parse(token).ok_or_else(not_found)?;
        if let Some(&id) = self.tokens.get(&token) {
            return Ok(id);
        }
        if self.tombstones.1.contains(&token) {
            return Err(Rejection::new(Code::FailedPrecondition, "this session has left its room"));
        }
        Err(not_found())
    }

    /// Removes a session and its stream (closed with OK after its queue is flushed);
    /// members see it leave. The token of a session that left is remembered, so a late
    /// `Send` learns it has left; an expired one becomes simply unknown.
    fn end_session(&mut self, id: SessionId, ending: Ending) -> (Arc<str>, Arc<str>) {
        let session = self.sessions.remove(&id).expect("end_session is called with a live session");
        self.tokens.remove(&session.token);
        self.timers.cancel(id);
        let room = self.rooms.get_mut(&session.room).expect("a session's room exists while it lives");
        room.members.remove(&session.user);
        if let Some(conn) = session.conn {
            room.remove_listener(conn);
            self.conns.remove(&conn);
            self.outputs.push_back(Output::Close(Close { conn, error: None, flush: true }));
        }
        self.announce(&session.room, &session.user, false, None);
        if ending == Ending::Expired {
            return (session.user, session.room);
        }
        let (order, set) = &mut self.tombstones;
        if order.len() == TOMBSTONES {
            let old = order.pop_front().expect("a full tombstone ring is not empty");
            set.remove(&old);
        }
        set.insert(session.token.clone());
        order.push_back(session.token);
        (session.user, session.room)
    }

    /// A detached session that posts is in use: push its expiry back.
    fn refresh_detached(&mut self, now: Instant, id: SessionId) {
        if let Some(timer) = self.timers.get(id) {
            let wait = match timer {
                Timer::AttachTimeout => self.config.attach_timeout,
                Timer::ResumeGrace => self.config.resume_grace,
            };
            self.timers.set(id, now + wait, timer);
        }
    }

    // ---- posting -------------------------------------------------------------------

    fn post(
        &mut self,
        now: Instant,
        id: SessionId,
        text: String,
        client_msg_id: String,
        sent_at_ms: i64,
    ) -> Result<Posted, Rejection> {
        validate::text(&text, &self.config.limits)?;
        validate::client_msg_id(&client_msg_id)?;
        let session = self.sessions.get_mut(&id).expect("post is called with a live session");
        if !client_msg_id.is_empty() {
            if let Some(seq) = session.recent.get(&client_msg_id) {
                return Ok(Posted { seq, duplicate: true, recipients: 0 });
            }
        }
        if let Some(bucket) = &mut session.bucket {
            if !bucket.try_take(now) {
                return Err(Rejection::new(Code::ResourceExhausted, "posting too fast; slow down"));
            }
        }
        if !client_msg_id.is_empty() {
            let next = self.rooms[&session.room].last_seq().next();
            session.recent.remember(&client_msg_id, next);
        }
        let (room, user) = (Arc::clone(&session.room), Arc::clone(&session.user));
        let r = self.rooms.get_mut(&room).expect("a session's room exists while it lives");
        let before = r.history_bytes();
        let message =
            r.append(|seq| Message { room: Arc::clone(&room), user, text, seq, sent_at_ms, client_msg_id });
        let (to, after) = (r.recipients(), r.history_bytes());
        let posted = Posted { seq: message.seq, duplicate: false, recipients: to.len() };
        if !to.is_empty() {
            self.outputs.push_back(Output::Deliver { to, event: Event::Message(message) });
        }
        self.reweigh(&room, before, after);
        self.trim_histories();
        Ok(posted)
    }

    /// Records that `room`'s history went from weighing `before` to `after`.
    fn reweigh(&mut self, room: &Arc<str>, before: usize, after: usize) {
        if before == after {
            return;
        }
        if before > 0 {
            self.by_weight.remove(&(before, Arc::clone(room)));
        }
        if after > 0 {
            self.by_weight.insert((after, Arc::clone(room)));
        }
        self.history_bytes = self.history_bytes - before + after;
    }

    /// Keeps all histories together within the budget: the heaviest room loses its
    /// oldest messages first. A reader that later asks for them is told of the gap.
    fn trim_histories(&mut self) {
        while self.history_bytes > self.config.history_bytes {
            let Some((before, name)) = self.by_weight.last().cloned() else { break };
            let room = self.rooms.get_mut(&name).expect("a weighed room exists");
            room.evict_oldest();
            let after = room.history_bytes();
            self.reweigh(&name, before, after);
        }
    }

    /// What all rooms' histories weigh together (see [`Message::weight`]).
    pub fn history_bytes(&self) -> usize {
        self.history_bytes
    }

    fn shutdown(&mut self, now: Instant, notice: String) -> Accepted {
        self.shutting_down = true;
        let mut all: Vec<ConnId> = self.conns.keys().copied().collect();
        all.sort_unstable();
        if !all.is_empty() {
            let notice = Notice { text: notice, code: None, client_msg_id: String::new() };
            self.outputs.push_back(Output::Deliver {
                to: Recipients::Many(all.clone().into()),
                event: Event::Notice(Arc::new(notice)),
            });
        }
        for conn in all {
            self.forget_conn(now, conn);
            let error = Rejection::new(Code::Unavailable, "the server is shutting down");
            self.outputs.push_back(Output::Close(Close { conn, error: Some(error), flush: true }));
        }
        Accepted::ShuttingDown
    }

    // ---- helpers -------------------------------------------------------------------

    fn refuse_if_shutting_down(&self) -> Result<(), Rejection> {
        if self.shutting_down {
            return Err(Rejection::new(Code::Unavailable, "the server is shutting down"));
        }
        Ok(())
    }

    /// Forgets `conn` and queues its close with `rejection`; returns the rejection.
    fn close(&mut self, now: Instant, conn: ConnId, rejection: Rejection) -> Rejection {
        self.forget_conn(now, conn);
        self.outputs.push_back(Output::Close(Close { conn, error: Some(rejection.clone()), flush: true }));
        rejection
    }

    fn close_with(
        &mut self,
        now: Instant,
        conn: ConnId,
        code: Code,
        reason: impl Into<std::borrow::Cow<'static, str>>,
    ) -> Rejection {
        self.close(now, conn, Rejection::new(code, reason))
    }

    /// Sorted member names, or none above the presence limit.
    fn member_list(&self, room: &str) -> Vec<Arc<str>> {
        let r = &self.rooms[room];
        if r.members.len() > self.config.presence_limit {
            return Vec::new();
        }
        r.members.keys().cloned().collect()
    }

    /// Tells the room's streams (but `except`) that `user` joined or left, unless the
    /// room is above the presence limit.
    fn announce(&mut self, room: &str, user: &Arc<str>, joined: bool, except: Option<ConnId>) {
        let r = self.rooms.get_mut(room).expect("announce is called for an existing room");
        let size = r.members.len() + usize::from(!joined);
        if size > self.config.presence_limit || r.listener_count() == 0 {
            return;
        }
        let to = r.recipients_except(except);
        if to.is_empty() {
            return;
        }
        let presence = Presence { room: Arc::clone(&r.name), user: Arc::clone(user), joined };
        self.outputs.push_back(Output::Deliver { to, event: Event::Presence(Arc::new(presence)) });
    }
}
