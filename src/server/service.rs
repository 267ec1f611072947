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
use log::{debug, error, info, warn};
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

/// The request of a unary or server-streaming call: decoded, or why it did not decode.
///
/// grpcio ends a call whose request its marshaller cannot decode with `INTERNAL` and
/// "Failed to deserialize response message"; with this marshaller, which never fails,
/// the handler answers `INVALID_ARGUMENT` and says what was wrong, as a `Chat` stream
/// does for a malformed frame.
struct Request<T>(grpcio::Result<T>);

fn decode_request<T: prost::Message + Default>(reader: grpcio::MessageReader) -> grpcio::Result<Request<T>> {
    Ok(Request(grpcio::pr_de(reader)))
}

fn encode_request<T: prost::Message>(
    request: &Request<T>,
    out: &mut grpcio::GrpcSlice,
) -> grpcio::Result<()> {
    match &request.0 {
        Ok(message) => grpcio::pr_ser(message, out),
        Err(_) => Err(grpcio::Error::Codec("a request that did not decode cannot be sent".into())),
    }
}

const fn method<Req, Resp>(
    ty: MethodType,
    name: &'static str,
    resp: Marshaller<Resp>,
) -> Method<Request<Req>, Resp>
where
    Req: prost::Message + Default,
{
    Method {
        ty,
        name,
        req_mar: Marshaller { ser: encode_request::<Req>, de: decode_request::<Req> },
        resp_mar: resp,
    }
}

const JOIN: Method<Request<pb::JoinRequest>, pb::JoinReply> =
    method(MethodType::Unary, "/chat.v1.Chat/Join", prost());
const HISTORY: Method<Request<pb::HistoryRequest>, pb::ChatMessage> =
    method(MethodType::ServerStreaming, "/chat.v1.Chat/History", prost());
const CHAT: Method<pb::ClientFrame, Encoded> =
    Method { ty: MethodType::Duplex, name: "/chat.v1.Chat/Chat", req_mar: prost(), resp_mar: ENCODED };
const SEND: Method<Request<pb::SendRequest>, pb::SendReply> =
    method(MethodType::Unary, "/chat.v1.Chat/Send", prost());
const SUBSCRIBE: Method<Request<pb::SubscribeRequest>, Encoded> =
    method(MethodType::ServerStreaming, "/chat.v1.Chat/Subscribe", ENCODED);
const LEAVE: Method<Request<pb::LeaveRequest>, pb::LeaveReply> =
    method(MethodType::Unary, "/chat.v1.Chat/Leave", prost());
const LIST_ROOMS: Method<Request<pb::ListRoomsRequest>, pb::ListRoomsReply> =
    method(MethodType::Unary, "/chat.v1.Chat/ListRooms", prost());
const LIST_MEMBERS: Method<Request<pb::ListMembersRequest>, pb::ListMembersReply> =
    method(MethodType::Unary, "/chat.v1.Chat/ListMembers", prost());

/// The status of a request that did not decode (logged at debug level).
fn malformed(ctx: &RpcContext, error: &grpcio::Error) -> RpcStatus {
    let why = match error {
        grpcio::Error::Codec(e) => format!("malformed request: {e}"),
        other => format!("malformed request: {other}"),
    };
    debug!("{} from {}: {why}", String::from_utf8_lossy(ctx.method()), ctx.peer());
    RpcStatus::with_message(RpcStatusCode::INVALID_ARGUMENT, why)
}

type Handler<Req, Sink> = fn(&ChatService, RpcContext, Req, Sink);

/// `handle` as a grpcio handler, behind the check that the request decoded: one that did
/// not ends the call through `fail` with `INVALID_ARGUMENT`.
fn checked<Req: 'static, Sink: 'static>(
    service: &ChatService,
    handle: Handler<Req, Sink>,
    fail: fn(&RpcContext, Sink, RpcStatus),
) -> impl FnMut(RpcContext, Request<Req>, Sink) + Send + Clone + 'static {
    let service = service.clone();
    move |ctx, request, sink| match request.0 {
        Ok(request) => handle(&service, ctx, request, sink),
        Err(e) => {
            let status = malformed(&ctx, &e);
            fail(&ctx, sink, status)
        }
    }
}

fn unary<Req: 'static, Resp: Send + 'static>(
    service: &ChatService,
    handle: Handler<Req, UnarySink<Resp>>,
) -> impl FnMut(RpcContext, Request<Req>, UnarySink<Resp>) + Send + Clone + 'static {
    checked(service, handle, |ctx, sink, status| reply_unary(ctx, sink, Err(status)))
}

fn server_streaming<Req: 'static, Resp: Send + 'static>(
    service: &ChatService,
    handle: Handler<Req, ServerStreamingSink<Resp>>,
) -> impl FnMut(RpcContext, Request<Req>, ServerStreamingSink<Resp>) + Send + Clone + 'static {
    checked(service, handle, |ctx, sink, status| ctx.spawn(sink.fail(status).map(|_| ())))
}

/// Counts open streams, and `History` calls in progress, against the configured limit.
pub struct StreamLimit {
    max: usize,
    /// Places taken: streams and `History` calls.
    taken: AtomicUsize,
    /// Of those, streams: what the pacer shares its budget among.
    streams: AtomicUsize,
}

impl StreamLimit {
    /// A limit of `max` concurrent streams.
    pub fn new(max: usize) -> Arc<StreamLimit> {
        Arc::new(StreamLimit { max, taken: AtomicUsize::new(0), streams: AtomicUsize::new(0) })
    }

    /// Streams open now (not counting `History` calls).
    pub fn open(&self) -> usize {
        self.streams.load(Ordering::SeqCst)
    }

    /// A place for a stream, or none at the limit.
    pub(super) fn acquire(self: &Arc<Self>) -> Option<Permit> {
        self.take(true)
    }

    /// A place for a `History` call, or none at the limit.
    fn acquire_call(self: &Arc<Self>) -> Option<Permit> {
        self.take(false)
    }

    fn take(self: &Arc<Self>, stream: bool) -> Option<Permit> {
        let before = self.taken.fetch_add(1, Ordering::SeqCst);
        if before >= self.max {
            self.taken.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        if stream {
            self.streams.fetch_add(1, Ordering::SeqCst);
        }
        Some(Permit { limit: Arc::clone(self), stream })
    }
}

/// One place under the limit; given back when dropped.
pub(super) struct Permit {
    limit: Arc<StreamLimit>,
    stream: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.stream {
            self.limit.streams.fetch_sub(1, Ordering::SeqCst);
        }
        self.limit.taken.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Bounds the bytes of `ListRooms` and `ListMembers` replies that are sent but not yet
/// taken by the transport. Such a reply is one message of up to megabytes (every room's
/// name, every member's name) for a request of a few bytes; the call keeps it until its
/// client's HTTP/2 flow control lets it out. A client that stops reading, or never grants
/// window, could otherwise make the server hold a copy for each call it makes.
pub struct ReplyBudget {
    /// Most bytes held; `usize::MAX` for no limit.
    max: usize,
    held: AtomicUsize,
}

impl ReplyBudget {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> Arc<ReplyBudget> {
        Arc::new(ReplyBudget { max, held: AtomicUsize::new(0) })
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// A charge of `bytes`, or none when it would take the total past the budget. While
    /// nothing is held any one reply is admitted, so a budget smaller than a reply still
    /// lets replies out one at a time.
    fn charge(self: &Arc<Self>, bytes: usize) -> Option<Charge> {
        let admitted = self.held.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
            let total = held.saturating_add(bytes);
            (held == 0 || total <= self.max).then_some(total)
        });
        admitted.ok().map(|_| Charge { budget: Arc::clone(self), bytes })
    }
}

/// Bytes of one reply held against the [`ReplyBudget`]; given back when dropped.
struct Charge {
    budget: Arc<ReplyBudget>,
    bytes: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct ChatService {
    hub: Arc<Hub>,
    limit: Arc<StreamLimit>,
    replies: Arc<ReplyBudget>,
    pacing: Arc<Pacing>,
    stack_size: usize,
    on_thread_start: Option<fn(ThreadRole)>,
}

impl ChatService {
    /// A service over `hub`, with at most `limit` concurrent streams, each on a thread
    /// with `stack_size` bytes of stack that first calls `on_thread_start` (if any) with
    /// [`ThreadRole::Stream`], and directory replies held within `replies`.
    pub fn new(
        hub: Arc<Hub>,
        limit: Arc<StreamLimit>,
        replies: Arc<ReplyBudget>,
        pacing: Arc<Pacing>,
        stack_size: usize,
        on_thread_start: Option<fn(ThreadRole)>,
    ) -> ChatService {
        ChatService { hub, limit, replies, pacing, stack_size, on_thread_start }
    }

    /// The grpcio service with every `chat.v1.Chat` method.
    pub fn build(self) -> Service {
        let chat = self.clone();
        ServiceBuilder::new()
            .add_unary_handler(&JOIN, unary(&self, ChatService::join))
            .add_server_streaming_handler(&HISTORY, server_streaming(&self, ChatService::history))
            .add_duplex_streaming_handler(&CHAT, move |ctx, req, sink| chat.chat(ctx, req, sink))
            .add_unary_handler(&SEND, unary(&self, ChatService::send))
            .add_server_streaming_handler(&SUBSCRIBE, server_streaming(&self, ChatService::subscribe))
            .add_unary_handler(&LEAVE, unary(&self, ChatService::leave))
            .add_unary_handler(&LIST_ROOMS, unary(&self, ChatService::list_rooms))
            .add_unary_handler(&LIST_MEMBERS, unary(&self, ChatService::list_members))
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
                // A call whose client does not read stays open with up to a flow-control
                // window of messages in the server, like a stream: it takes a place under
                // the stream limit until it ends (but is no stream to the pacer).
                let Some(permit) = self.limit.acquire_call() else {
                    warn!(
                        "refused a History call from {}: stream limit {} reached",
                        ctx.peer(),
                        self.limit.max
                    );
                    return ctx.spawn(sink.fail(self.limit_status()).map(|_| ()));
                };
                // Each message is converted when the sink takes it: the call holds references
                // to the room's messages, not copies of them.
                let last = messages.len().saturating_sub(1);
                let items = messages.into_iter().enumerate().map(move |(i, m)| {
                    Ok((encode::chat_message(&m), WriteFlags::default().buffer_hint(i < last)))
                });
                ctx.spawn(async move {
                    let _permit = permit;
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
        self.reply_directory(&ctx, sink, encode::rooms_reply(&rooms));
    }

    fn list_members(
        &self,
        ctx: RpcContext,
        req: pb::ListMembersRequest,
        sink: UnarySink<pb::ListMembersReply>,
    ) {
        match self.hub.read(|b| b.members(&req.room)) {
            Ok(members) => self.reply_directory(&ctx, sink, encode::members_reply(&members)),
            Err(rejection) => reply_unary(&ctx, sink, Err(encode::rpc_status(&rejection))),
        }
    }

    /// Sends a `ListRooms` or `ListMembers` reply with its size charged to the reply
    /// budget until the transport has taken it (or the call failed), or refuses the call
    /// with `RESOURCE_EXHAUSTED` when the budget has no room for it.
    fn reply_directory<T: prost::Message + Send + 'static>(
        &self,
        ctx: &RpcContext,
        sink: UnarySink<T>,
        reply: T,
    ) {
        let Some(charge) = self.replies.charge(reply.encoded_len()) else {
            warn!(
                "refused {} from {}: {} bytes of directory replies are waiting for their clients",
                String::from_utf8_lossy(ctx.method()),
                ctx.peer(),
                self.replies.held()
            );
            let why = format!(
                "the server holds its limit of {} KiB of ListRooms and ListMembers replies that \
                 their clients have not taken yet; try again",
                self.replies.max / 1024
            );
            let status = RpcStatus::with_message(RpcStatusCode::RESOURCE_EXHAUSTED, why);
            return reply_unary(ctx, sink, Err(status));
        };
        ctx.spawn(sink.success(reply).map(move |_| drop(charge)));
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

#[cfg(test)]
mod tests {
    use super::{ReplyBudget, StreamLimit};

    #[test]
    fn the_reply_budget_admits_what_fits_and_any_one_reply_while_it_holds_nothing() {
        let budget = ReplyBudget::new(100);
        let big = budget.charge(250).expect("alone, a reply over the budget goes out");
        assert!(budget.charge(1).is_none(), "nothing more while it is held");
        drop(big);
        let (a, b) = (budget.charge(60).expect("fits"), budget.charge(40).expect("fits exactly"));
        assert_eq!(budget.held(), 100);
        assert!(budget.charge(1).is_none(), "full");
        drop(a);
        assert!(budget.charge(61).is_none(), "60 given back, 61 do not fit");
        let c = budget.charge(60).expect("60 fit again");
        drop((b, c));
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn history_calls_share_the_limit_but_are_not_counted_as_streams() {
        let limit = StreamLimit::new(2);
        let call = limit.acquire_call().expect("a place");
        let stream = limit.acquire().expect("a place");
        assert_eq!(limit.open(), 1, "only the stream is open to the pacer");
        assert!(limit.acquire().is_none(), "the call and the stream fill the limit");
        assert!(limit.acquire_call().is_none());
        drop(call);
        let second = limit.acquire().expect("the call's place");
        assert_eq!(limit.open(), 2);
        drop((stream, second));
        assert_eq!(limit.open(), 0);
        assert!(limit.acquire_call().is_some());
    }
}
