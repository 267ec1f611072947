//! The `chat.v1.Chat` service: method descriptors and handlers.
//!
//! Handlers run on grpcio's completion-queue threads and return at once: unary calls
//! take the hub's lock briefly and hand their reply to `ctx.spawn`; streams get a
//! thread of their own. Nothing here blocks on a future.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use futures::{FutureExt as _, SinkExt as _};
use grpcio::{
    DuplexSink, Marshaller, Method, MethodType, RequestStream, RpcContext, RpcStatus, RpcStatusCode,
    ServerStreamingSink, Service, ServiceBuilder, UnarySink, WriteFlags,
};
use log::{error, info, warn};
use parking_lot::Mutex;

use super::encode::{self, deserialize_encoded, serialize_encoded, Encoded};
use super::hub::{self, Caller, Hub};
use super::pacer::{self, Pacing};
use super::{stream, ThreadRole};
use crate::core::{Accepted, Input, Seq};
use crate::pb;

const fn prost<T: prost::Message + Default>() -> Marshaller<T> {
    Marshaller { ser: grpcio::pr_ser, de: grpcio::pr_de }
}

const ENCODED: Marshaller<Encoded> = Marshaller { ser: serialize_encoded, de: deserialize_encoded };

const fn method<Req, Resp>(ty: MethodType, name: &'static str, resp: Marshaller<Resp>) -> Method<Req, Resp>
where
    Req: prost::Message + Default,
{
    Method { ty, name, req_mar: prost::<Req>(), resp_mar: resp }
}

const JOIN: Method<pb::JoinRequest, pb::JoinReply> = method(MethodType::Unary, "/chat.v1.Chat/Join", prost());
const HISTORY: Method<pb::HistoryRequest, pb::ChatMessage> =
    method(MethodType::ServerStreaming, "/chat.v1.Chat/History", prost());
const CHAT: Method<pb::ClientFrame, Encoded> = method(MethodType::Duplex, "/chat.v1.Chat/Chat", ENCODED);
const SEND: Method<pb::SendRequest, pb::SendReply> = method(MethodType::Unary, "/chat.v1.Chat/Send", prost());
const SUBSCRIBE: Method<pb::SubscribeRequest, Encoded> =
    method(MethodType::ServerStreaming, "/chat.v1.Chat/Subscribe", ENCODED);
const LEAVE: Method<pb::LeaveRequest, pb::LeaveReply> =
    method(MethodType::Unary, "/chat.v1.Chat/Leave", prost());
const LIST_ROOMS: Method<pb::ListRoomsRequest, pb::ListRoomsReply> =
    method(MethodType::Unary, "/chat.v1.Chat/ListRooms", prost());
const LIST_MEMBERS: Method<pb::ListMembersRequest, pb::ListMembersReply> =
    method(MethodType::Unary, "/chat.v1.Chat/ListMembers", prost());

/// Counts open streams against the configured limit.
pub struct StreamLimit {
    max: usize,
    open: AtomicUsize,
}

impl StreamLimit {
    /// A limit of `max` concurrent streams.
    pub fn new(max: usize) -> Arc<StreamLimit> {
        Arc::new(StreamLimit { max, open: AtomicUsize::new(0) })
    }

    /// Streams open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    pub(super) fn acquire(self: &Arc<Self>) -> Option<Permit> {
        let before = self.open.fetch_add(1, Ordering::SeqCst);
        if before >= self.max {
            self.open.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Permit(Arc::clone(self)))
    }
}

/// One open stream; released when dropped.
pub(super) struct Permit(Arc<StreamLimit>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct ChatService {
    hub: Arc<Hub>,
    limit: Arc<StreamLimit>,
    pacing: Arc<Pacing>,
    stack_size: usize,
    on_thread_start: Option<fn(ThreadRole)>,
}

impl ChatService {
    /// A service over `hub`, with at most `limit` concurrent streams, each on a thread
    /// with `stack_size` bytes of stack that first calls `on_thread_start` (if any) with
    /// [`ThreadRole::Stream`].
    pub fn new(
        hub: Arc<Hub>,
        limit: Arc<StreamLimit>,
        pacing: Arc<Pacing>,
        stack_size: usize,
        on_thread_start: Option<fn(ThreadRole)>,
    ) -> ChatService {
        ChatService { hub, limit, pacing, stack_size, on_thread_start }
    }

    /// The grpcio service with every `chat.v1.Chat` method.
    pub fn build(self) -> Service {
        let (s1, s2, s3, s4, s5, s6, s7) = (
            self.clone(),
            self.clone(),
            self.clone(),
            self.clone(),
            self.clone(),
            self.clone(),
            self.clone(),
        );
        ServiceBuilder::new()
            .add_unary_handler(&JOIN, move |ctx, req, sink| s1.join(ctx, req, sink))
            .add_server_streaming_handler(&HISTORY, move |ctx, req, sink| s2.history(ctx, req, sink))
            .add_duplex_streaming_handler(&CHAT, move |ctx, req, sink| s3.chat(ctx, req, sink))
            .add_unary_handler(&SEND, move |ctx, req, sink| s4.send(ctx, req, sink))
            .add_server_streaming_handler(&SUBSCRIBE, move |ctx, req, sink| s5.subscribe(ctx, req, sink))
            .add_unary_handler(&LEAVE, move |ctx, req, sink| s6.leave(ctx, req, sink))
            .add_unary_handler(&LIST_ROOMS, move |ctx, req, sink| s7.list_rooms(ctx, req, sink))
            .add_unary_handler(&LIST_MEMBERS, move |ctx, req, sink| self.list_members(ctx, req, sink))
            .build()
    }

    fn join(&self, ctx: RpcContext, req: pb::JoinRequest, sink: UnarySink<pb::JoinReply>) {
        let (user, room) = (req.user.clone(), req.room.clone());
        let result = self.hub.input_from(
            Caller::Handler,
            Input::Join { user: req.user, room: req.room, token: stream::new_token() },
        );
        let reply = match result {
            Ok(Accepted::Joined(info)) => {
                info!("{user} joined #{room} (session {:?})", info.token);
                Ok(encode::join_reply(&info))
            }
            Ok(other) => unreachable!("Join is answered with Joined, not {other:?}"),
            Err(rejection) => Err(rejection),
        };
        reply_unary(&ctx, sink, reply.map_err(|r| encode::rpc_status(&r)));
    }

    fn history(
        &self,
        ctx: RpcContext,
        req: pb::HistoryRequest,
        mut sink: ServerStreamingSink<pb::ChatMessage>,
    ) {
        let limit = usize::try_from(req.limit).unwrap_or(usize::MAX);
        match self.hub.read(|b| b.history(&req.room, Seq(req.since_seq), limit)) {
            Err(rejection) => ctx.spawn(sink.fail(encode::rpc_status(&rejection)).map(|_| ())),
            Ok(messages) => {
                let last = messages.len().saturating_sub(1);
                let items: Vec<_> = messages
                    .iter()
                    .enumerate()
                    .map(|(i, m)| Ok((encode::chat_message(m), WriteFlags::default().buffer_hint(i < last))))
                    .collect();
                ctx.spawn(async move {
                    let mut items = futures::stream::iter(items);
                    if sink.send_all(&mut items).await.is_ok() {
                        let _ = sink.close().await;
                    }
                });
            }
        }
    }

    fn chat(&self, ctx: RpcContext, requests: RequestStream<pb::ClientFrame>, sink: DuplexSink<Encoded>) {
        let (hub, pacing) = (Arc::clone(&self.hub), Arc::clone(&self.pacing));
        let connection = pacer::connection_key(&ctx.peer());
        self.start_stream(
            ctx,
            (requests, sink),
            move |(requests, sink)| stream::run_chat(hub, pacing, connection, requests, sink),
            |(requests, sink), status| async move {
                // The request stream must outlive the status: dropping it first cancels
                // the call, and the client would see CANCELLED instead.
                let _ = sink.fail(status).await;
                drop(requests);
            },
        );
    }

    fn subscribe(&self, ctx: RpcContext, req: pb::SubscribeRequest, sink: ServerStreamingSink<Encoded>) {
        let (hub, pacing) = (Arc::clone(&self.hub), Arc::clone(&self.pacing));
        let connection = pacer::connection_key(&ctx.peer());
        self.start_stream(
            ctx,
            (req, sink),
            move |(req, sink)| stream::run_subscribe(hub, pacing, connection, req, sink),
            |(_, sink), status| sink.fail(status).map(|_| ()),
        );
    }

    fn send(&self, ctx: RpcContext, req: pb::SendRequest, sink: UnarySink<pb::SendReply>) {
        let result = self.hub.input_from(
            Caller::Handler,
            Input::Send {
                session: req.session,
                text: req.text,
                client_msg_id: req.client_msg_id,
                sent_at_ms: hub::wall_clock_ms(),
            },
        );
        hub::log_result("send", &result);
        let reply = match result {
            Ok(Accepted::Posted(p)) => Ok(pb::SendReply { seq: p.seq.get(), duplicate: p.duplicate }),
            Ok(other) => unreachable!("Send is answered with Posted, not {other:?}"),
            Err(rejection) => Err(encode::rpc_status(&rejection)),
        };
        reply_unary(&ctx, sink, reply);
    }

    fn leave(&self, ctx: RpcContext, req: pb::LeaveRequest, sink: UnarySink<pb::LeaveReply>) {
        let result = self.hub.input_from(Caller::Handler, Input::Leave { session: req.session });
        hub::log_result("leave", &result);
        reply_unary(&ctx, sink, result.map(|_| pb::LeaveReply {}).map_err(|r| encode::rpc_status(&r)));
    }

    fn list_rooms(&self, ctx: RpcContext, _req: pb::ListRoomsRequest, sink: UnarySink<pb::ListRoomsReply>) {
        let rooms = self.hub.read(|b| b.rooms());
        reply_unary(&ctx, sink, Ok(encode::rooms_reply(&rooms)));
    }

    fn list_members(
        &self,
        ctx: RpcContext,
        req: pb::ListMembersRequest,
        sink: UnarySink<pb::ListMembersReply>,
    ) {
        let members = self.hub.read(|b| b.members(&req.room));
        reply_unary(
            &ctx,
            sink,
            members.map(|m| encode::members_reply(&m)).map_err(|r| encode::rpc_status(&r)),
        );
    }

    fn limit_status(&self) -> RpcStatus {
        let why = format!("the server's limit of {} concurrent streams is reached", self.limit.max);
        RpcStatus::with_message(RpcStatusCode::RESOURCE_EXHAUSTED, why)
    }

    /// Gives a stream (the call's `parts`) a thread of its own that runs `run`, or ends the
    /// call with `refuse` and `RESOURCE_EXHAUSTED`: at the stream limit, and when no thread
    /// can be started (a task limit such as systemd's `TasksMax`, or memory).
    fn start_stream<P, F>(
        &self,
        ctx: RpcContext,
        parts: P,
        run: impl FnOnce(P) + Send + 'static,
        refuse: impl FnOnce(P, RpcStatus) -> F,
    ) where
        P: Send + 'static,
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let Some(permit) = self.limit.acquire() else {
            warn!("refused a stream from {}: stream limit {} reached", ctx.peer(), self.limit.max);
            return ctx.spawn(refuse(parts, self.limit_status()));
        };
        // The parts stay within reach until the thread takes them, so that a thread that
        // cannot start still leaves the call to end with a status.
        let slot = Arc::new(Mutex::new(Some(parts)));
        let taken = Arc::clone(&slot);
        let on_start = self.on_thread_start;
        let spawned =
            thread::Builder::new().name("chat-stream".into()).stack_size(self.stack_size).spawn(move || {
                let _permit = permit;
                if let Some(on_start) = on_start {
                    on_start(ThreadRole::Stream);
                }
                let parts = taken.lock().take();
                if let Some(parts) = parts {
                    run(parts);
                }
            });
        if let Err(e) = spawned {
            error!("cannot start a thread for a stream from {}: {e}", ctx.peer());
            let parts = slot.lock().take();
            if let Some(parts) = parts {
                let why = "the server cannot start a thread for another stream".to_owned();
                ctx.spawn(refuse(parts, RpcStatus::with_message(RpcStatusCode::RESOURCE_EXHAUSTED, why)));
            }
        }
    }
}

fn reply_unary<T: Send + 'static>(ctx: &RpcContext, sink: UnarySink<T>, reply: Result<T, RpcStatus>) {
    match reply {
        Ok(value) => ctx.spawn(sink.success(value).map(|_| ())),
        Err(status) => ctx.spawn(sink.fail(status).map(|_| ())),
    }
}
