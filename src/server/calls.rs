//! Calls as the server sees them from their first HTTP/2 frame.
//!
//! C-core enforces `MAX_CONCURRENT_STREAMS` and `MAX_HEADER_LIST_SIZE` only once the client
//! has acknowledged the SETTINGS that announce them; C-core 1.56 has no timeout for that
//! acknowledgement. Until then a connection may open any number of calls, each with up to
//! 16 MiB of metadata. And grpcio shows a unary or server-streaming call to its handler only
//! when the request has arrived: a call whose client sends headers and never a request is
//! held in C-core (about 12 KiB each) without the server's code ever seeing it.
//!
//! So no method of this server is registered as unary or server-streaming: grpcio hands a
//! client-streaming or duplex call to its handler as soon as the headers are in, and each
//! call passes the [`CallGate`] there. Calls over the limit of their connection, or with
//! metadata past the limit, end at once with `RESOURCE_EXHAUSTED`. [`one_request`] then
//! serves a method whose client sends one request from such a call: one reply (unary on the
//! wire) from a client-streaming call, whose sink sends the reply and the status in one
//! batch as a unary sink does; a stream of replies (server-streaming on the wire) from a
//! duplex call. The wire is the same either way.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use futures::{FutureExt as _, Sink, SinkExt as _, StreamExt as _};
use grpcio::{
    ClientStreamingSink, DuplexSink, Marshaller, Method, MethodType, RequestStream, RpcContext, RpcStatus,
    RpcStatusCode, WriteFlags,
};
use log::{debug, warn};
use parking_lot::Mutex;

use super::stream::EventSink;

/// The most request metadata a call may carry, counted as HTTP/2 counts a header list (name,
/// value and 32 bytes per entry): C-core's `MAX_HEADER_LIST_SIZE`, 16 KiB.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

/// Counts each connection's calls of this server, from the moment their headers arrive to
/// the moment they end.
pub struct CallGate {
    per_connection: usize,
    open: Mutex<HashMap<String, usize>>,
}

impl CallGate {
    /// A gate that lets each connection have `per_connection` calls at a time.
    pub fn new(per_connection: usize) -> Arc<CallGate> {
        Arc::new(CallGate { per_connection: per_connection.max(1), open: Mutex::new(HashMap::new()) })
    }

    /// Calls open now, over all connections.
    pub fn open(&self) -> usize {
        self.open.lock().values().sum()
    }

    /// Lets the call in, or says why not: its metadata is over [`MAX_METADATA_BYTES`], or
    /// its connection (`peer`, as `ctx.peer()` names it) already has as many calls as the
    /// gate allows. Calls over a Unix socket are not counted: C-core gives every client of
    /// a Unix socket the same name, `unix:`, so one count would cover all its connections.
    pub fn admit(self: &Arc<Self>, ctx: &RpcContext, peer: &str) -> Result<Ticket, RpcStatus> {
        self.admit_from(peer, metadata_bytes(ctx))
    }

    /// [`CallGate::admit`] for a call from `peer` (its connection's address, as C-core
    /// names it) with `metadata` bytes of metadata.
    pub fn admit_from(self: &Arc<Self>, peer: &str, metadata: usize) -> Result<Ticket, RpcStatus> {
        if metadata > MAX_METADATA_BYTES {
            debug!("refused a call from {peer}: {metadata} bytes of metadata");
            let why = format!(
                "the request's metadata ({metadata} bytes) is over the limit of {MAX_METADATA_BYTES} bytes"
            );
            return Err(RpcStatus::with_message(RpcStatusCode::RESOURCE_EXHAUSTED, why));
        }
        if !names_a_connection(peer) {
            return Ok(Ticket { counted: None });
        }
        let mut open = self.open.lock();
        let count = open.entry(peer.to_owned()).or_insert(0);
        if *count >= self.per_connection {
            drop(open);
            warn!("refused a call from {peer}: the connection has {} calls open", self.per_connection);
            let why = format!(
                "the connection has its limit of {} calls open (MAX_CONCURRENT_STREAMS)",
                self.per_connection
            );
            return Err(RpcStatus::with_message(RpcStatusCode::RESOURCE_EXHAUSTED, why));
        }
        *count += 1;
        Ok(Ticket { counted: Some((Arc::clone(self), peer.to_owned())) })
    }
}

/// Whether C-core's name for a call's peer tells its connection from others: an IP address
/// with its port (`ipv4:127.0.0.1:50312`, `ipv6:[::1]:50312`) does; a Unix socket's
/// (`unix:`) is the same for every client.
fn names_a_connection(peer: &str) -> bool {
    peer.starts_with("ipv4:") || peer.starts_with("ipv6:")
}

/// A call's place at the [`CallGate`], given back when dropped.
pub struct Ticket {
    /// The gate and the connection the call is counted against, if it is counted.
    counted: Option<(Arc<CallGate>, String)>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let Some((gate, peer)) = &self.counted else { return };
        let mut open = gate.open.lock();
        if let Some(count) = open.get_mut(peer) {
            *count -= 1;
            if *count == 0 {
                open.remove(peer);
            }
        }
    }
}

/// The call's metadata as HTTP/2 counts a header list, with its authority and path.
fn metadata_bytes(ctx: &RpcContext) -> usize {
    const ENTRY: usize = 32;
    let headers = ctx.request_headers();
    let entries: usize = headers.iter().map(|(key, value)| key.len() + value.len() + ENTRY).sum();
    entries + ctx.host().len() + ctx.method().len() + 2 * ENTRY
}

/// The request of a one-request call: decoded, or why it did not decode.
///
/// grpcio ends a call whose request its marshaller cannot decode with `INTERNAL` and
/// "Failed to deserialize response message"; with this marshaller, which never fails,
/// the handler answers `INVALID_ARGUMENT` and says what was wrong, as a `Chat` stream
/// does for a malformed frame.
pub struct Request<T>(grpcio::Result<T>);

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

/// How many replies a method whose client sends one request answers with, which decides
/// how it is registered.
pub enum Replies {
    /// One (unary on the wire): registered as client-streaming, whose sink sends the reply
    /// and the status in one batch.
    One,
    /// A stream (server-streaming on the wire): registered as duplex.
    Stream,
}

/// The descriptor of a method whose client sends one request.
pub const fn one_request_method<Req, Resp>(
    replies: Replies,
    name: &'static str,
    resp: Marshaller<Resp>,
) -> Method<Request<Req>, Resp>
where
    Req: prost::Message + Default,
{
    Method {
        ty: match replies {
            Replies::One => MethodType::ClientStreaming,
            Replies::Stream => MethodType::Duplex,
        },
        name,
        req_mar: Marshaller { ser: encode_request::<Req>, de: decode_request::<Req> },
        resp_mar: resp,
    }
}

/// A sink that a call of this server's can end with a status: the client-streaming sink of
/// a one-reply call, or the duplex sink of a stream.
pub trait CallSink: Send + 'static {
    /// Ends the call with `status` (an error is the client gone).
    fn end_with(self, status: RpcStatus) -> BoxFuture<'static, grpcio::Result<()>>;
}

impl<Resp: Send + 'static> CallSink for ClientStreamingSink<Resp> {
    fn end_with(self, status: RpcStatus) -> BoxFuture<'static, grpcio::Result<()>> {
        self.fail(status).boxed()
    }
}

impl<Resp: Send + 'static> CallSink for DuplexSink<Resp> {
    fn end_with(self, status: RpcStatus) -> BoxFuture<'static, grpcio::Result<()>> {
        self.fail(status).boxed()
    }
}

/// The reply side of a one-request call: `S` is the call's sink. It holds the call's
/// request stream (dropping that before the status is sent would cancel the call) and its
/// [`Ticket`] until the call ends.
pub struct Responder<S> {
    sink: S,
    held: Box<dyn Send>,
}

impl<S: CallSink> Responder<S> {
    /// Ends the call with `status`.
    pub async fn fail(self, status: RpcStatus) {
        let _ = self.sink.end_with(status).await;
        drop(self.held);
    }
}

impl<Resp: Send + 'static> Responder<ClientStreamingSink<Resp>> {
    /// Ends the call with `reply` and OK (sent together), or with the status.
    pub async fn answer(self, reply: Result<Resp, RpcStatus>) {
        let _ = match reply {
            Ok(reply) => self.sink.success(reply).await,
            Err(status) => self.sink.fail(status).await,
        };
        drop(self.held);
    }
}

impl<Resp: Send + 'static> Responder<DuplexSink<Resp>> {
    /// Sends each of `replies`, then OK; stops when the client is gone.
    pub async fn send_all(mut self, replies: impl IntoIterator<Item = Resp>) {
        for reply in replies {
            // Each message may wait for the next write; the last goes out with the status.
            if self.sink.feed((reply, WriteFlags::default().buffer_hint(true))).await.is_err() {
                return;
            }
        }
        let _ = self.sink.close().await;
        drop(self.held);
    }

    /// Sends each of `replies` as it comes, then OK when they end; stops when the client
    /// is gone (the sink notices while it waits for the next reply).
    pub async fn stream(mut self, replies: impl futures::Stream<Item = Resp> + Unpin) {
        let mut items = replies.map(|reply| Ok((reply, WriteFlags::default())));
        if self.sink.send_all(&mut items).await.is_ok() {
            let _ = self.sink.close().await;
        }
        drop(self.held);
    }

    /// The sink as an [`EventSink`] for a stream's thread, still holding what the call needs.
    pub fn into_event_sink(self) -> Held<DuplexSink<Resp>> {
        Held { sink: self.sink, held: self.held }
    }
}

/// A sink that holds the call's request stream and [`Ticket`] until its status is sent.
pub struct Held<S> {
    sink: S,
    held: Box<dyn Send>,
}

impl<S: Sink<T> + Unpin, T> Sink<T> for Held<S> {
    type Error = S::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        Pin::new(&mut self.sink).poll_ready(cx)
    }

    fn start_send(mut self: Pin<&mut Self>, item: T) -> Result<(), S::Error> {
        Pin::new(&mut self.sink).start_send(item)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        Pin::new(&mut self.sink).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        Pin::new(&mut self.sink).poll_close(cx)
    }
}

impl<S: EventSink> EventSink for Held<S> {
    fn fail_with(self, status: RpcStatus) -> Pin<Box<dyn Future<Output = grpcio::Result<()>>>> {
        let Held { sink, held } = self;
        Box::pin(async move {
            let sent = sink.fail_with(status).await;
            drop(held);
            sent
        })
    }
}

/// Serves a method whose client sends one request: admits the call at the gate when its
/// headers arrive, reads the request, and gives it to `handle` with the [`Responder`]
/// (and the peer's address). A call that ends without a request gets `INTERNAL`, as
/// gRPC's own unary handling does; one whose request does not decode gets
/// `INVALID_ARGUMENT`.
pub fn one_request<Req, S, H, F>(
    gate: &Arc<CallGate>,
    handle: H,
) -> impl FnMut(RpcContext, RequestStream<Request<Req>>, S) + Send + Clone + 'static
where
    Req: Send + 'static,
    S: CallSink,
    H: Fn(String, Req, Responder<S>) -> F + Send + Sync + Clone + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let gate = Arc::clone(gate);
    move |ctx, mut requests, sink| {
        let peer = ctx.peer();
        let ticket = match gate.admit(&ctx, &peer) {
            Ok(ticket) => ticket,
            Err(status) => return ctx.spawn(refuse(requests, sink, status)),
        };
        let method = String::from_utf8_lossy(ctx.method()).into_owned();
        let handle = handle.clone();
        ctx.spawn(async move {
            let first = requests.next().await;
            let responder = Responder { sink, held: Box::new((requests, ticket)) };
            match first {
                Some(Ok(Request(Ok(request)))) => handle(peer, request, responder).await,
                Some(Ok(Request(Err(e)))) => responder.fail(malformed(&method, &peer, &e)).await,
                None => {
                    let why = "the call ended without its request";
                    responder.fail(RpcStatus::with_message(RpcStatusCode::INTERNAL, why.into())).await
                }
                // The call failed: the client cancelled it or its connection went.
                Some(Err(_)) => {}
            }
        });
    }
}

/// Ends a call refused at the gate. The request stream must outlive the status: dropping it
/// first cancels the call, and the client would see CANCELLED instead.
pub async fn refuse<Req>(requests: RequestStream<Req>, sink: impl CallSink, status: RpcStatus) {
    let _ = sink.end_with(status).await;
    drop(requests);
}

/// The status of a request that did not decode (logged at debug level).
fn malformed(method: &str, peer: &str, error: &grpcio::Error) -> RpcStatus {
    let why = match error {
        grpcio::Error::Codec(e) => format!("malformed request: {e}"),
        other => format!("malformed request: {other}"),
    };
    debug!("{method} from {peer}: {why}");
    RpcStatus::with_message(RpcStatusCode::INVALID_ARGUMENT, why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_connection_gets_its_own_calls_and_a_call_that_ends_gives_its_place_back() {
        let gate = CallGate::new(2);
        let a1 = gate.admit_from("ipv4:127.0.0.1:1000", 100).expect("a place");
        let a2 = gate.admit_from("ipv4:127.0.0.1:1000", 100).expect("a place");
        let refused = gate.admit_from("ipv4:127.0.0.1:1000", 100).err().expect("the third is refused");
        assert_eq!(refused.code(), RpcStatusCode::RESOURCE_EXHAUSTED);
        let b = gate.admit_from("ipv4:127.0.0.1:1001", 100).expect("another connection has its own");
        assert_eq!(gate.open(), 3);
        drop(a1);
        let a3 = gate.admit_from("ipv4:127.0.0.1:1000", 100).expect("the ended call's place");
        drop((a2, a3, b));
        assert_eq!(gate.open(), 0);
        assert!(gate.open.lock().is_empty(), "a connection without calls is forgotten");
    }

    #[test]
    fn calls_over_a_unix_socket_are_not_counted_since_its_clients_share_one_name() {
        let gate = CallGate::new(1);
        let calls: Vec<Ticket> =
            (0..3).map(|_| gate.admit_from("unix:", 100).expect("not counted")).collect();
        assert_eq!(gate.open(), 0);
        let refused = gate.admit_from("unix:", MAX_METADATA_BYTES + 1).err().expect("metadata still checked");
        assert_eq!(refused.code(), RpcStatusCode::RESOURCE_EXHAUSTED);
        let _ip = gate.admit_from("ipv6:[::1]:1000", 100).expect("a place");
        assert!(gate.admit_from("ipv6:[::1]:1000", 100).is_err(), "IPv6 connections are counted");
        drop(calls);
    }

    #[test]
    fn metadata_past_the_limit_is_refused_and_takes_no_place() {
        let gate = CallGate::new(1);
        let refused = gate.admit_from("ipv4:127.0.0.1:1000", MAX_METADATA_BYTES + 1).err().expect("refused");
        assert_eq!(refused.code(), RpcStatusCode::RESOURCE_EXHAUSTED);
        assert!(refused.message().contains("metadata"), "{}", refused.message());
        assert_eq!(gate.open(), 0);
        let _ticket = gate.admit_from("ipv4:127.0.0.1:1000", MAX_METADATA_BYTES).expect("at the limit");
    }
}
