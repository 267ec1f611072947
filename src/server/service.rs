//! The `chat.v1.Chat` service: method descriptors and handlers.
//!
//! Handlers run on grpcio's completion-queue threads and return at once: every call
//! passes the call gate when its headers arrive ([`super::calls`]); calls with one request
//! take the hub's lock briefly and hand their reply to `ctx.spawn`; streams get a thread
//! of their own. Nothing here blocks on a future.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use grpcio::{
    ClientStreamingSink, DuplexSink, Marshaller, Method, MethodType, RequestStream, RpcContext, RpcStatus,
    RpcStatusCode, Service, ServiceBuilder,
};
use log::{error, info, warn};
use parking_lot::Mutex;

use super::calls::{self, one_request, one_request_method, CallGate, Replies, Request, Responder};
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

// Every method is registered as client-streaming or duplex, so that the call gate sees each
// call when its headers arrive (see `calls`): methods that are unary on the wire as
// client-streaming, those that are server-streaming on the wire as duplex.
const JOIN: Method<Request<pb::JoinRequest>, pb::JoinReply> =
    one_request_method(Replies::One, "/chat.v1.Chat/Join", prost());
const HISTORY: Method<Request<pb::HistoryRequest>, pb::ChatMessage> =
    one_request_method(Replies::Stream, "/chat.v1.Chat/History", prost());
const CHAT: Method<pb::ClientFrame, Encoded> =
    Method { ty: MethodType::Duplex, name: "/chat.v1.Chat/Chat", req_mar: prost(), resp_mar: ENCODED };
const SEND: Method<Request<pb::SendRequest>, pb::SendReply> =
    one_request_method(Replies::One, "/chat.v1.Chat/Send", prost());
const SUBSCRIBE: Method<Request<pb::SubscribeRequest>, Encoded> =
    one_request_method(Replies::Stream, "/chat.v1.Chat/Subscribe", ENCODED);
const LEAVE: Method<Request<pb::LeaveRequest>, pb::LeaveReply> =
    one_request_method(Replies::One, "/chat.v1.Chat/Leave", prost());
const LIST_ROOMS: Method<Request<pb::ListRoomsRequest>, pb::ListRoomsReply> =
    one_request_method(Replies::One, "/chat.v1.Chat/ListRooms", prost());
const LIST_MEMBERS: Method<Request<pb::ListMembersRequest>, pb::ListMembersReply> =
    one_request_method(Replies::One, "/chat.v1.Chat/ListMembers", prost());

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
    gate: Arc<CallGate>,
    pacing: Arc<Pacing>,
    stack_size: usize,
    on_thread_start: Option<fn(ThreadRole)>,
}

/// A handler of a method whose client sends one request and gets one reply.
type Unary<Req, Resp> = fn(&ChatService, &str, Req) -> Result<Resp, RpcStatus>;

impl ChatService {
    /// A service over `hub`, with at most `limit` concurrent streams, each on a thread
    /// with `stack_size` bytes of stack that first calls `on_thread_start` (if any) with
    /// [`ThreadRole::Stream`], directory replies held within `replies`, and every call
    /// admitted at `gate`.
    pub fn new(
        hub: Arc<Hub>,
        limit: Arc<StreamLimit>,
        replies: Arc<ReplyBudget>,
        gate: Arc<CallGate>,
        pacing: Arc<Pacing>,
        stack_size: usize,
        on_thread_start: Option<fn(ThreadRole)>,
    ) -> ChatService {
        ChatService { hub, limit, replies, gate, pacing, stack_size, on_thread_start }
    }

    /// The grpcio service with every `chat.v1.Chat` method.
    pub fn build(self) -> Service {
        let chat = self.clone();
        let (history, subscribe) = (self.clone(), self.clone());
        let (rooms, members) = (self.clone(), self.clone());
        ServiceBuilder::new()
            .add_client_streaming_handler(&JOIN, self.unary(ChatService::join))
            .add_duplex_streaming_handler(
                &HISTORY,
                one_request(&self.gate, move |peer, req, responder| history.history(&peer, req, responder)),
            )
            .add_duplex_streaming_handler(&CHAT, move |ctx, req, sink| chat.chat(ctx, req, sink))
            .add_client_streaming_handler(&SEND, self.unary(ChatService::send))
            .add_duplex_streaming_handler(
                &SUBSCRIBE,
                one_request(&self.gate, move |peer, req, responder| {
                    subscribe.subscribe(&peer, req, responder)
                }),
            )
            .add_client_streaming_handler(&LEAVE, self.unary(ChatService::leave))
            .add_client_streaming_handler(
                &LIST_ROOMS,
                one_request(&self.gate, move |peer, _req, responder| {
                    let reply = encode::rooms_reply(&rooms.hub.read(|b| b.rooms()));
                    rooms.reply_directory(&peer, "ListRooms", Ok(reply), responder)
                }),
            )
            .add_client_streaming_handler(
                &LIST_MEMBERS,
                one_request(&self.gate, move |peer, req: pb::ListMembersRequest, responder| {
                    let reply = members.hub.read(|b| b.members(&req.room));
                    let reply = reply.map(|m| encode::members_reply(&m)).map_err(|r| encode::rpc_status(&r));
                    members.reply_directory(&peer, "ListMembers", reply, responder)
                }),
            )
            .build()
    }

    /// `handle` as the handler of a one-request, one-reply method.
    fn unary<Req: Send + 'static, Resp: Send + 'static>(
        &self,
        handle: Unary<Req, Resp>,
    ) -> impl FnMut(RpcContext, RequestStream<Request<Req>>, ClientStreamingSink<Resp>) + Send + Clone + 'static
    {
        let service = self.clone();
        one_request(&self.gate, move |peer, req, responder: Responder<ClientStreamingSink<Resp>>| {
            responder.answer(handle(&service, &peer, req))
        })
    }

    fn join(&self, _peer: &str, req: pb::JoinRequest) -> Result<pb::JoinReply, RpcStatus> {
        let (user, room) = (req.user.clone(), req.room.clone());
        let result = self.hub.input_from(
            Caller::Handler,
            Input::Join { user: req.user, room: req.room, token: stream::new_token() },
        );
        match result {
            Ok(Accepted::Joined(info)) => {
                info!("{user} joined #{room} (session {:?})", info.token);
                Ok(encode::join_reply(&info))
            }
            Ok(other) => unreachable!("Join is answered with Joined, not {other:?}"),
            Err(rejection) => Err(encode::rpc_status(&rejection)),
        }
    }

    fn history(
        &self,
        peer: &str,
        req: pb::HistoryRequest,
        responder: Responder<DuplexSink<pb::ChatMessage>>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let limit = usize::try_from(req.limit).unwrap_or(usize::MAX);
        let found = self.hub.read(|b| b.history(&req.room, Seq(req.since_seq), limit));
        // A call whose client does not read stays open with up to a flow-control window of
        // messages in the server, like a stream: it takes a place under the stream limit
        // until it ends (but is no stream to the pacer).
        let admitted = found.map_err(|rejection| encode::rpc_status(&rejection)).and_then(|messages| {
            let Some(permit) = self.limit.acquire_call() else {
                warn!("refused a History call from {peer}: stream limit {} reached", self.limit.max);
                return Err(self.limit_status());
            };
            Ok((messages, permit))
        });
        async move {
            match admitted {
                // Each message is converted when the sink takes it: the call holds
                // references to the room's messages, not copies of them.
                Ok((messages, permit)) => {
                    responder.send_all(messages.into_iter().map(|m| encode::chat_message(&m))).await;
                    drop(permit);
                }
                Err(status) => responder.fail(status).await,
            }
        }
    }

    fn chat(&self, ctx: RpcContext, requests: RequestStream<pb::ClientFrame>, sink: DuplexSink<Encoded>) {
        let peer = ctx.peer();
        let ticket = match self.gate.admit(&ctx, &peer) {
            Ok(ticket) => ticket,
            Err(status) => return ctx.spawn(calls::refuse(requests, sink, status)),
        };
        let (hub, pacing) = (Arc::clone(&self.hub), Arc::clone(&self.pacing));
        let connection = pacer::connection_key(&peer);
        let started = self.start_stream(&peer, (requests, sink), move |(requests, sink)| {
            stream::run_chat(hub, pacing, connection, requests, sink);
            drop(ticket);
        });
        if let Err(((requests, sink), status)) = started {
            ctx.spawn(calls::refuse(requests, sink, status));
        }
    }

    fn subscribe(
        &self,
        peer: &str,
        req: pb::SubscribeRequest,
        responder: Responder<DuplexSink<Encoded>>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (hub, pacing) = (Arc::clone(&self.hub), Arc::clone(&self.pacing));
        let connection = pacer::connection_key(peer);
        let started = self.start_stream(peer, (req, responder), move |(req, responder)| {
            stream::run_subscribe(hub, pacing, connection, req, responder.into_event_sink());
        });
        async move {
            if let Err(((_, responder), status)) = started {
                responder.fail(status).await;
            }
        }
    }

    fn send(&self, _peer: &str, req: pb::SendRequest) -> Result<pb::SendReply, RpcStatus> {
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
        match result {
            Ok(Accepted::Posted(p)) => Ok(pb::SendReply { seq: p.seq.get(), duplicate: p.duplicate }),
            Ok(other) => unreachable!("Send is answered with Posted, not {other:?}"),
            Err(rejection) => Err(encode::rpc_status(&rejection)),
        }
    }

    fn leave(&self, _peer: &str, req: pb::LeaveRequest) -> Result<pb::LeaveReply, RpcStatus> {
        let result = self.hub.input_from(Caller::Handler, Input::Leave { session: req.session });
        hub::log_result("leave", &result);
        result.map(|_| pb::LeaveReply {}).map_err(|r| encode::rpc_status(&r))
    }

    /// Sends a `ListRooms` or `ListMembers` reply with its size charged to the reply
    /// budget until the transport has taken it (or the call failed), or refuses the call
    /// with `RESOURCE_EXHAUSTED` when the budget has no room for it.
    fn reply_directory<T: prost::Message + Send + 'static>(
        &self,
        peer: &str,
        method: &str,
        reply: Result<T, RpcStatus>,
        responder: Responder<ClientStreamingSink<T>>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let charged = reply.and_then(|reply| match self.replies.charge(reply.encoded_len()) {
            Some(charge) => Ok((reply, charge)),
            None => {
                warn!(
                    "refused {method} from {peer}: {} bytes of directory replies are waiting for \
                     their clients",
                    self.replies.held()
                );
                let why = format!(
                    "the server holds its limit of {} KiB of ListRooms and ListMembers replies \
                     that their clients have not taken yet; try again",
                    self.replies.max / 1024
                );
                Err(RpcStatus::with_message(RpcStatusCode::RESOURCE_EXHAUSTED, why))
            }
        });
        async move {
            match charged {
                Ok((reply, charge)) => {
                    responder.answer(Ok(reply)).await;
                    drop(charge);
                }
                Err(status) => responder.fail(status).await,
            }
        }
    }

    fn limit_status(&self) -> RpcStatus {
        let why = format!("the server's limit of {} concurrent streams is reached", self.limit.max);
        RpcStatus::with_message(RpcStatusCode::RESOURCE_EXHAUSTED, why)
    }

    /// Gives a stream (the call's `parts`) a thread of its own that runs `run`, or hands
    /// the parts back with `RESOURCE_EXHAUSTED`: at the stream limit, and when no thread
    /// can be started (a task limit such as systemd's `TasksMax`, or memory).
    fn start_stream<P: Send + 'static>(
        &self,
        peer: &str,
        parts: P,
        run: impl FnOnce(P) + Send + 'static,
    ) -> Result<(), (P, RpcStatus)> {
        let Some(permit) = self.limit.acquire() else {
            warn!("refused a stream from {peer}: stream limit {} reached", self.limit.max);
            return Err((parts, self.limit_status()));
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
        match spawned {
            Ok(_) => Ok(()),
            Err(e) => {
                error!("cannot start a thread for a stream from {peer}: {e}");
                let parts = slot.lock().take().expect("a thread that did not start took nothing");
                let why = "the server cannot start a thread for another stream".to_owned();
                Err((parts, RpcStatus::with_message(RpcStatusCode::RESOURCE_EXHAUSTED, why)))
            }
        }
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
