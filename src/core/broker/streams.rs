//! The broker's streams: opening, the first frame (hello or subscribe), attaching a
//! session with its welcome and replay, posts and leaves on a stream, detaching.

use std::sync::Arc;
use std::time::Instant;

use super::{Broker, Conn, Ending};
use crate::core::event::{Close, Event, Notice, Output, Recipients, Welcome};
use crate::core::ids::{ConnId, Epoch, Seq, SessionId, Token};
use crate::core::input::{Accepted, Hello};
use crate::core::timers::Timer;
use crate::core::validate::{self, Code, Rejection};

impl Broker {
    pub(super) fn open(&mut self, now: Instant) -> Result<Accepted, Rejection> {
        self.refuse_if_shutting_down()?;
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        let deadline = now + self.config.hello_timeout;
        self.conns.insert(conn, Conn::AwaitingHello { deadline });
        self.hello_due.insert((deadline, conn));
        Ok(Accepted::Opened(conn))
    }

    pub(super) fn hello(
        &mut self,
        now: Instant,
        conn: ConnId,
        hello: Hello,
        new_token: Token,
    ) -> Result<Accepted, Rejection> {
        self.expect_first_frame(now, conn, "hello may only be sent once per stream")?;
        let session = if hello.session.is_empty() {
            match self.join(now, &hello.user, &hello.room, new_token) {
                Ok(info) => self.tokens[&info.token],
                Err(rejection) => return Err(self.close(now, conn, rejection)),
            }
        } else {
            self.session_for_stream(now, conn, &hello.session, &hello.user, &hello.room)?
        };
        Ok(self.attach(conn, session, hello.since, hello.epoch))
    }

    pub(super) fn half_closed(&mut self, now: Instant, conn: ConnId) -> Result<Accepted, Rejection> {
        match self.conns.get(&conn) {
            Some(Conn::AwaitingHello { .. }) => {
                let why = "the client ended its side of the stream before its hello";
                Err(self.close_with(now, conn, Code::InvalidArgument, why))
            }
            _ => Ok(Accepted::Ignored),
        }
    }

    pub(super) fn subscribe(
        &mut self,
        now: Instant,
        conn: ConnId,
        session: &str,
        room: &str,
        since: Seq,
        epoch: Epoch,
    ) -> Result<Accepted, Rejection> {
        self.expect_first_frame(now, conn, "stream is already attached")?;
        if !session.is_empty() {
            let id = self.session_for_stream(now, conn, session, "", room)?;
            return Ok(self.attach(conn, id, since, epoch));
        }
        let room = match validate::room(room, &self.config.limits).and_then(|()| self.room_for_join(room)) {
            Ok(room) => room,
            Err(rejection) => return Err(self.close(now, conn, rejection)),
        };
        self.conns.insert(conn, Conn::Attached { room: Arc::clone(&room), session: None });
        let r = self.rooms.get_mut(&room).expect("room_for_join returns an existing room");
        r.add_listener(conn);
        Ok(self.welcome(conn, &room, None, "".into(), (since, epoch), None))
    }

    /// A stream's opening frame (hello or subscribe) comes once: a second one closes the
    /// stream with `FAILED_PRECONDITION`, saying `again`.
    pub(super) fn expect_first_frame(
        &mut self,
        now: Instant,
        conn: ConnId,
        again: &'static str,
    ) -> Result<(), Rejection> {
        match self.conns.get(&conn) {
            None => Err(stream_gone()),
            Some(Conn::Attached { .. }) => Err(self.close_with(now, conn, Code::FailedPrecondition, again)),
            Some(&Conn::AwaitingHello { deadline }) => {
                self.hello_due.remove(&(deadline, conn));
                Ok(())
            }
        }
    }

    /// The session a stream attaches to by `token`. A non-empty `user` or `room` must be
    /// the session's own; any refusal also closes the stream.
    pub(super) fn session_for_stream(
        &mut self,
        now: Instant,
        conn: ConnId,
        token: &str,
        user: &str,
        room: &str,
    ) -> Result<SessionId, Rejection> {
        let id = match self.lookup(token) {
            Ok(id) => id,
            Err(rejection) => return Err(self.close(now, conn, rejection)),
        };
        let s = &self.sessions[&id];
        let differs = |given: &str, held: &str| !given.is_empty() && given != held;
        if differs(user, &s.user) || differs(room, &s.room) {
            let why = format!("session belongs to user {:?} in room {:?}", s.user, s.room);
            return Err(self.close_with(now, conn, Code::InvalidArgument, why));
        }
        Ok(id)
    }

    /// Binds `session` to the stream `conn` and queues its welcome and replay.
    pub(super) fn attach(&mut self, conn: ConnId, id: SessionId, since: Seq, epoch: Epoch) -> Accepted {
        let session = self.sessions.get_mut(&id).expect("attach is called with a live session");
        let previous = session.conn.replace(conn);
        let resumed = std::mem::replace(&mut session.ever_attached, true);
        let owed_after = resumed.then_some(session.joined_at);
        let (room, user, token) =
            (Arc::clone(&session.room), Arc::clone(&session.user), session.token.clone());
        self.timers.cancel(id);
        let r = self.rooms.get_mut(&room).expect("a session's room exists while it lives");
        if let Some(old) = previous {
            r.remove_listener(old);
            self.conns.remove(&old);
            let why = Rejection::new(Code::Aborted, "this session was resumed on another stream");
            self.outputs.push_back(Output::Close(Close { conn: old, error: Some(why), flush: false }));
        }
        r.add_listener(conn);
        self.conns.insert(conn, Conn::Attached { room: Arc::clone(&room), session: Some(id) });
        self.welcome(conn, &room, Some(token), user, (since, epoch), owed_after)
    }

    /// Queues the welcome for `conn`, then the replay of what it missed after `since` in
    /// log `epoch`. `owed_after` is given when a session resumes: see `Room::replay`.
    pub(super) fn welcome(
        &mut self,
        conn: ConnId,
        room: &Arc<str>,
        token: Option<Token>,
        user: Arc<str>,
        (since, epoch): (Seq, Epoch),
        owed_after: Option<Seq>,
    ) -> Accepted {
        let resumed = owed_after.is_some();
        let members = self.member_list(room);
        let r = &self.rooms[room];
        let replay = r.replay(since, epoch, owed_after);
        let welcome = Welcome {
            session: token.clone(),
            user: Arc::clone(&user),
            room: Arc::clone(room),
            members,
            member_count: r.members.len(),
            last_seq: r.last_seq(),
            epoch: r.epoch,
            resumed,
            gap: replay.gap,
            history_limit: self.config.history_limit,
        };
        self.outputs.push_back(Output::Deliver {
            to: Recipients::One(conn),
            event: Event::Welcome(Box::new(welcome)),
        });
        let replayed = replay.messages.len();
        if replayed > 0 {
            self.outputs.push_back(Output::Deliver {
                to: Recipients::One(conn),
                event: Event::Backlog(replay.messages),
            });
        }
        Accepted::Attached {
            conn,
            session: token,
            user,
            room: Arc::clone(room),
            resumed,
            gap: replay.gap,
            replayed,
        }
    }

    pub(super) fn post_on_stream(
        &mut self,
        now: Instant,
        conn: ConnId,
        text: String,
        client_msg_id: String,
        sent_at_ms: i64,
    ) -> Result<Accepted, Rejection> {
        let id = match self.conns.get(&conn) {
            None => return Err(stream_gone()),
            Some(Conn::AwaitingHello { .. }) => {
                return Err(self.close_with(
                    now,
                    conn,
                    Code::InvalidArgument,
                    "the first frame must be a hello",
                ))
            }
            Some(Conn::Attached { session: None, .. }) => {
                return Err(self.close_with(
                    now,
                    conn,
                    Code::FailedPrecondition,
                    "an anonymous listener cannot post",
                ))
            }
            Some(&Conn::Attached { session: Some(id), .. }) => id,
        };
        let cmid = client_msg_id.clone();
        match self.post(now, id, text, client_msg_id, sent_at_ms) {
            Ok(posted) => Ok(Accepted::Posted(posted)),
            Err(rejection) => {
                let notice = Notice {
                    text: format!("message not posted: {}", rejection.reason),
                    code: Some(rejection.code),
                    client_msg_id: cmid,
                };
                self.outputs.push_back(Output::Deliver {
                    to: Recipients::One(conn),
                    event: Event::Notice(Arc::new(notice)),
                });
                Err(rejection)
            }
        }
    }

    pub(super) fn leave_on_stream(&mut self, now: Instant, conn: ConnId) -> Result<Accepted, Rejection> {
        match self.conns.get(&conn) {
            None => Err(stream_gone()),
            Some(Conn::AwaitingHello { .. }) => {
                Err(self.close_with(now, conn, Code::InvalidArgument, "the first frame must be a hello"))
            }
            Some(Conn::Attached { session: None, .. }) => {
                self.forget_conn(now, conn);
                self.outputs.push_back(Output::Close(Close { conn, error: None, flush: true }));
                Ok(Accepted::Detached)
            }
            Some(&Conn::Attached { session: Some(id), .. }) => {
                let (user, room) = self.end_session(id, Ending::Left);
                Ok(Accepted::Left { user, room })
            }
        }
    }

    /// The stream `conn` is gone (or must go, when `close` is given): its session, if
    /// any, waits for a resume during the grace period.
    pub(super) fn detach(&mut self, now: Instant, conn: ConnId, close: Option<Rejection>) -> Accepted {
        if self.forget_conn(now, conn).is_none() {
            return Accepted::Ignored;
        }
        if let Some(error) = close {
            self.outputs.push_back(Output::Close(Close { conn, error: Some(error), flush: false }));
        }
        Accepted::Detached
    }

    /// Removes a stream from the core. Returns `None` if it was unknown, otherwise the
    /// session it was attached for (if any). That session now has no stream: it waits
    /// for a resume during the grace period, so it can never be left holding a stream
    /// the core has forgotten (and its name forever).
    pub(super) fn forget_conn(&mut self, now: Instant, conn: ConnId) -> Option<Option<SessionId>> {
        match self.conns.remove(&conn)? {
            Conn::AwaitingHello { deadline } => {
                self.hello_due.remove(&(deadline, conn));
                Some(None)
            }
            Conn::Attached { room, session } => {
                if let Some(r) = self.rooms.get_mut(&room) {
                    r.remove_listener(conn);
                }
                if let Some(id) = session {
                    let s = self.sessions.get_mut(&id).expect("an attached conn's session lives");
                    s.conn = None;
                    self.timers.set(id, now + self.config.resume_grace, Timer::ResumeGrace);
                }
                Some(session)
            }
        }
    }
}

fn stream_gone() -> Rejection {
    Rejection::new(Code::FailedPrecondition, "the stream has already been closed")
}
