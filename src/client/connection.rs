//! [`Client`]: a connection to a chat server and its typed unary calls.

use std::sync::Arc;
use std::time::Duration;

use futures::executor::block_on;
use futures::StreamExt;
use grpcio::{CallOption, ChannelBuilder, EnvBuilder, Environment};

use super::chat::{ChatConfig, ChatSession};
use super::convert;
use super::error::{Context, Error};
use super::types::{Joined, Message, RoomInfo, Sent};
use crate::pb;

/// How a [`Client`] connects and how long its calls may take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientConfig {
    /// How long [`Client::connect_with`] waits for the connection (default 5 s).
    pub connect_timeout: Duration,
    /// Deadline of each unary call and of a history read (default 10 s).
    pub call_timeout: Duration,
    /// Longest delay between the channel's own reconnection attempts (default 1 s), so
    /// that a restarted server is found again quickly.
    pub max_reconnect_backoff: Duration,
    /// How often the client pings the server while a call is open (default 20 s; `None`
    /// = never). Without pings, a server or network that goes silent without closing the
    /// connection (a hung host, a dropped route) goes unnoticed for as long as it lasts.
    pub keepalive_interval: Option<Duration>,
    /// How long a ping may go unanswered before the connection counts as lost and its
    /// calls fail with `UNAVAILABLE` (default 10 s).
    pub keepalive_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(10),
            max_reconnect_backoff: Duration::from_secs(1),
            keepalive_interval: Some(Duration::from_secs(20)),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

/// A connection to a chat server. Cheap to clone; clones share the connection.
///
/// Unary calls block the calling thread until the server answers or the call timeout
/// passes. A chat stream runs on threads of its own (see [`Client::chat`]).
#[derive(Clone)]
pub struct Client {
    addr: String,
    config: ClientConfig,
    stub: pb::ChatClient,
    // Keeps the completion-queue threads alive as long as a clone exists.
    _env: Arc<Environment>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to `addr` (`host:port`) with the default configuration, waiting at most
    /// `timeout`. Fails with [`Error::Unreachable`] when no connection is made in time.
    pub fn connect(addr: &str, timeout: Duration) -> Result<Client, Error> {
        Client::connect_with(addr, ClientConfig { connect_timeout: timeout, ..Default::default() })
    }

    /// Connects to `addr` with `config`, waiting at most `config.connect_timeout`.
    pub fn connect_with(addr: &str, config: ClientConfig) -> Result<Client, Error> {
        let env = Arc::new(EnvBuilder::new().cq_count(1).name_prefix("chat-client").build());
        let mut builder = ChannelBuilder::new(env.clone())
            .initial_reconnect_backoff(Duration::from_millis(100))
            .max_reconnect_backoff(config.max_reconnect_backoff);
        if let Some(interval) = config.keepalive_interval {
            // Unless told otherwise C-core sends at most two pings until it next sends
            // data, and a member that only listens sends no data.
            builder = builder
                .keepalive_time(interval)
                .keepalive_timeout(config.keepalive_timeout)
                .http2_max_pings_without_data(0);
        }
        let channel = builder.connect(addr);
        if !block_on(channel.wait_for_connected(config.connect_timeout)) {
            return Err(Error::Unreachable { addr: addr.to_string() });
        }
        Ok(Client { addr: addr.to_string(), config, stub: pb::ChatClient::new(channel), _env: env })
    }

    /// The address this client connected to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The generated stub, for calls this library does not wrap.
    pub fn stub(&self) -> &pb::ChatClient {
        &self.stub
    }

    fn opt(&self) -> CallOption {
        CallOption::default().timeout(self.config.call_timeout)
    }

    fn ctx<'a>(&'a self, user: &'a str, room: &'a str) -> Context<'a> {
        Context { addr: &self.addr, user, room }
    }

    /// Reserves `user` in `room` and opens a session.
    ///
    /// Errors: [`Error::NameTaken`], [`Error::BadName`], [`Error::BadRoom`],
    /// [`Error::Limit`], [`Error::ShuttingDown`], [`Error::ConnectionLost`].
    pub fn join(&self, user: &str, room: &str) -> Result<Joined, Error> {
        let req = pb::JoinRequest { user: user.to_string(), room: room.to_string() };
        let reply =
            self.stub.join_opt(&req, self.opt()).map_err(|e| Error::from_grpc(&e, self.ctx(user, room)))?;
        Ok(convert::joined(user, room, reply))
    }

    /// Posts `text` without a stream, on behalf of session token `session`.
    pub fn send(&self, session: &str, text: &str, client_msg_id: &str) -> Result<Sent, Error> {
        let req = pb::SendRequest {
            session: session.to_string(),
            text: text.to_string(),
            client_msg_id: client_msg_id.to_string(),
        };
        let reply =
            self.stub.send_opt(&req, self.opt()).map_err(|e| Error::from_grpc(&e, self.ctx("", "")))?;
        Ok(Sent { seq: reply.seq, duplicate: reply.duplicate })
    }

    /// The retained messages of `room` with `seq > since_seq`, oldest first: the newest
    /// `limit` of them (0 = all).
    pub fn history(&self, room: &str, since_seq: u64, limit: u32) -> Result<Vec<Message>, Error> {
        let req = pb::HistoryRequest { room: room.to_string(), since_seq, limit };
        let ctx = self.ctx("", room);
        let mut stream = self.stub.history_opt(&req, self.opt()).map_err(|e| Error::from_grpc(&e, ctx))?;
        let mut out = Vec::new();
        while let Some(item) = block_on(stream.next()) {
            out.push(convert::message(item.map_err(|e| Error::from_grpc(&e, ctx))?));
        }
        Ok(out)
    }

    /// Every room on the server, sorted by name.
    pub fn list_rooms(&self) -> Result<Vec<RoomInfo>, Error> {
        let reply = self
            .stub
            .list_rooms_opt(&pb::ListRoomsRequest {}, self.opt())
            .map_err(|e| Error::from_grpc(&e, self.ctx("", "")))?;
        Ok(reply.rooms.into_iter().map(convert::room_info).collect())
    }

    /// The members of `room`, sorted.
    pub fn list_members(&self, room: &str) -> Result<Vec<String>, Error> {
        let req = pb::ListMembersRequest { room: room.to_string() };
        let reply = self
            .stub
            .list_members_opt(&req, self.opt())
            .map_err(|e| Error::from_grpc(&e, self.ctx("", room)))?;
        Ok(reply.members)
    }

    /// Ends the session `session` now: the name is released and members see it leave.
    pub fn leave(&self, session: &str) -> Result<(), Error> {
        let req = pb::LeaveRequest { session: session.to_string() };
        self.stub.leave_opt(&req, self.opt()).map_err(|e| Error::from_grpc(&e, self.ctx("", "")))?;
        Ok(())
    }

    /// Opens the chat stream of a joined session, on threads of its own. The session
    /// replays up to `config.replay` recent messages, then live ones, and reconnects by
    /// itself; see [`ChatSession`].
    pub fn chat(&self, joined: &Joined, config: ChatConfig) -> ChatSession {
        ChatSession::start(self.clone(), joined, config)
    }

    /// Joins `room` as `user` and opens its chat stream with the default configuration.
    pub fn enter(&self, user: &str, room: &str) -> Result<ChatSession, Error> {
        let joined = self.join(user, room)?;
        Ok(self.chat(&joined, ChatConfig::default()))
    }

    /// Leave with a short deadline, ignoring the answer (used when closing).
    pub(crate) fn leave_quietly(&self, session: &str) {
        let req = pb::LeaveRequest { session: session.to_string() };
        let opt = CallOption::default().timeout(Duration::from_secs(2));
        let _ = self.stub.leave_opt(&req, opt);
    }

    /// Join returning the raw status, for the session's rejoin.
    pub(crate) fn join_for_session(
        &self,
        user: &str,
        room: &str,
        timeout: Duration,
    ) -> Result<Joined, super::error::Status> {
        let req = pb::JoinRequest { user: user.to_string(), room: room.to_string() };
        let opt = CallOption::default().timeout(timeout);
        match self.stub.join_opt(&req, opt) {
            Ok(reply) => Ok(convert::joined(user, room, reply)),
            Err(e) => Err(super::error::Status::from_grpc(&e)),
        }
    }
}
