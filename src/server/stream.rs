//! One thread per stream: it reads the client's frames, hands them to the hub, and ends
//! the stream. Its writes — everything queued since the last write as one
//! `EventBatch` — are made by others. When an idle stream's queue gets an item, the
//! thread that queued it writes it at once, after the hub's lock (a gRPC handler leaves
//! that to the pacer); from then on the pacer (`pacer.rs`) writes for the stream on
//! shared ticks until a tick finds nothing to send. Nobody wakes the stream's thread for
//! a write. A stream being closed takes its writes back to send what is left before its
//! status; with pacing off (`writes_per_second` 0) each thread makes its own writes.
//!
//! The thread polls grpcio's futures itself with a waker that unparks it, and parks
//! when there is nothing to do.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use futures::{Sink, Stream};
use grpcio::{DuplexSink, RequestStream, RpcStatus, RpcStatusCode, WriteFlags};
use log::debug;

use parking_lot::Mutex;

use super::encode::{self, Batcher, Encoded};
use super::hub::{self, Hub, IdleWriter, Queued, StreamShared, MAX_BATCH_BYTES};
use super::pacer::{Paced, Pacing, Ticked, WriteOrder};
use crate::core::{Close, Input, Message, Token};
use crate::pb;
use crate::pb::client_frame::Frame;

/// How long ending a stream (sending its status) may take before the call is cancelled.
const FINISH_DEADLINE: Duration = Duration::from_secs(5);

/// A waker that unparks the stream's thread.
struct Unparker(Thread);

impl Wake for Unparker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// A response sink of pre-encoded events: `Chat`'s duplex sink, or `Subscribe`'s with what
/// its call holds (see [`super::calls::Held`]).
pub trait EventSink: Sink<(Encoded, WriteFlags), Error = grpcio::Error> + Unpin + Send + 'static {
    /// Ends the call with `status`.
    fn fail_with(self, status: RpcStatus) -> Pin<Box<dyn Future<Output = grpcio::Result<()>>>>;
}

impl EventSink for DuplexSink<Encoded> {
    fn fail_with(self, status: RpcStatus) -> Pin<Box<dyn Future<Output = grpcio::Result<()>>>> {
        Box::pin(self.fail(status))
    }
}

/// A fresh session token from the operating system's random source.
pub fn new_token() -> Token {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).expect("the operating system's random source is available");
    Token::from_entropy(bytes)
}

/// Runs a `Chat` stream to its end on the current thread.
pub fn run_chat(
    hub: Arc<Hub>,
    pacing: Arc<Pacing>,
    connection: u64,
    requests: RequestStream<pb::ClientFrame>,
    sink: DuplexSink<Encoded>,
) {
    let (shared, rx) = match hub.open_stream() {
        Ok(opened) => opened,
        Err(rejection) => return finish(sink, Some(encode::rpc_status(&rejection)), Some(requests)),
    };
    drive(&hub, &pacing, connection, &shared, rx, Some(requests), sink);
}

/// Runs a `Subscribe` stream to its end on the current thread.
pub fn run_subscribe<S: EventSink>(
    hub: Arc<Hub>,
    pacing: Arc<Pacing>,
    connection: u64,
    req: pb::SubscribeRequest,
    sink: S,
) {
    let (shared, rx) = match hub.open_stream() {
        Ok(opened) => opened,
        Err(rejection) => return finish(sink, Some(encode::rpc_status(&rejection)), None),
    };
    let result = hub.input(Input::Subscribe {
        conn: shared.conn(),
        session: req.session,
        room: req.room,
        since: crate::core::Seq(req.since_seq),
        epoch: crate::core::Epoch(req.epoch),
    });
    hub::log_result("subscribe", &result);
    drive(&hub, &pacing, connection, &shared, rx, None, sink);
}

/// How the loop ended.
enum End {
    /// The core closed the stream.
    Closed(Close),
    /// The transport must end it with this status (malformed frame).
    Refused(RpcStatus),
    /// The client is gone or the call broke.
    Gone,
}

/// The write side of a stream, shared by its thread and the pacer: what is queued for it,
/// the rest of a replay being written, and the sink with its write in flight.
struct Writer<S> {
    state: Mutex<WriteState<S>>,
    rx: Receiver<Queued>,
    shared: Arc<StreamShared>,
    pacing: Weak<Pacing>,
    /// The stream's connection (see [`super::pacer::connection_key`]): the pacer writes the
    /// streams of one connection one after another.
    connection: u64,
}

struct WriteState<S> {
    /// Taken by the stream's thread when the stream ends.
    sink: Option<S>,
    /// The rest of a history replay taken off the queue: it goes out before anything
    /// queued after it.
    replay: VecDeque<Arc<Message>>,
    batcher: Batcher,
    /// A write is in flight.
    writing: bool,
    /// A write failed: the client is gone.
    broken: bool,
    /// The stream's thread makes the writes (pacing is off, or the stream is closing);
    /// the pacer lets go of the stream when it sees this.
    own_writes: bool,
}

/// What one look at the write side did.
enum Step {
    /// Started a write.
    Wrote,
    /// The previous write is still in flight.
    InFlight,
    /// Nothing to write, and no write in flight.
    Empty,
    /// The call broke.
    Broken,
}

impl<S: EventSink> Writer<S> {
    /// Finishes the write in flight if it is done (a waker in `cx` is woken when it is),
    /// then starts the next one with everything queued.
    fn step(&self, st: &mut WriteState<S>, cx: &mut Context<'_>) -> Step {
        let WriteState { sink, replay, batcher, writing, broken, .. } = st;
        let Some(sink) = sink.as_mut() else { return Step::Broken };
        if *writing {
            match Pin::new(&mut *sink).poll_flush(cx) {
                Poll::Ready(Ok(())) => *writing = false,
                Poll::Ready(Err(_)) => {
                    *broken = true;
                    return Step::Broken;
                }
                Poll::Pending => return Step::InFlight,
            }
        }
        let Some(item) = next_write(&self.rx, replay, batcher) else { return Step::Empty };
        if Pin::new(&mut *sink).start_send((item, WriteFlags::default())).is_err() {
            *broken = true;
            return Step::Broken;
        }
        *writing = true;
        Step::Wrote
    }

    /// True if nothing waits to be written.
    fn drained(&self) -> bool {
        self.rx.is_empty() && self.state.lock().replay.is_empty()
    }
}

impl<S> Writer<S> {
    fn order(&self) -> WriteOrder {
        WriteOrder { connection: self.connection, stream: self.shared.conn() }
    }
}

impl<S: EventSink> Paced for Writer<S> {
    fn tick(&self) -> Ticked {
        let mut st = self.state.lock();
        if st.own_writes {
            return Ticked::LetGo;
        }
        // Nobody is woken by the completion: the next tick looks again.
        match self.step(&mut st, &mut Context::from_waker(Waker::noop())) {
            Step::Wrote => Ticked::Wrote,
            Step::InFlight => Ticked::Waiting,
            Step::Broken => {
                drop(st);
                self.shared.thread().unpark();
                Ticked::LetGo
            }
            Step::Empty => {
                // Idle: whoever queues the next event writes it; if one came in
                // between, the pacer does now.
                drop(st);
                self.shared.set_idle(true);
                if !self.drained() {
                    self.shared.wake();
                }
                Ticked::LetGo
            }
        }
    }
}

impl<S: EventSink> IdleWriter for Writer<S> {
    fn write_now(self: Arc<Self>) {
        let mut st = self.state.lock();
        if st.own_writes {
            // Pacing is off, or the stream is closing: its thread writes.
            drop(st);
            self.shared.thread().unpark();
            return;
        }
        match self.step(&mut st, &mut Context::from_waker(Waker::noop())) {
            Step::Wrote | Step::InFlight => {
                drop(st);
                if let Some(pacing) = self.pacing.upgrade() {
                    pacing.add(self.order(), self as Arc<dyn Paced>);
                }
            }
            Step::Broken => {
                drop(st);
                self.shared.thread().unpark();
            }
            Step::Empty => {
                // Someone else took what was queued: idle again.
                drop(st);
                self.shared.set_idle(true);
                if !self.drained() && self.shared.needs_wake() {
                    self.write_soon();
                }
            }
        }
    }

    fn write_soon(self: Arc<Self>) {
        if let Some(pacing) = self.pacing.upgrade() {
            pacing.ready(self.order(), self as Arc<dyn Paced>);
        }
    }
}

fn drive<S: EventSink>(
    hub: &Hub,
    pacing: &Arc<Pacing>,
    connection: u64,
    shared: &Arc<StreamShared>,
    rx: Receiver<Queued>,
    mut requests: Option<RequestStream<pb::ClientFrame>>,
    sink: S,
) {
    let waker = Waker::from(Arc::new(Unparker(thread::current())));
    let mut cx = Context::from_waker(&waker);
    let writer = Arc::new(Writer {
        state: Mutex::new(WriteState {
            sink: Some(sink),
            replay: VecDeque::new(),
            batcher: Batcher::default(),
            writing: false,
            broken: false,
            own_writes: !pacing.enabled(),
        }),
        rx,
        shared: Arc::clone(shared),
        pacing: Arc::downgrade(pacing),
        connection,
    });
    if pacing.enabled() {
        // From now on whoever queues an item for the idle stream writes it; what was
        // queued before (a subscription's welcome) is written now.
        let weak: Weak<dyn IdleWriter> = Arc::downgrade(&writer) as Weak<Writer<S>>;
        shared.set_writer(weak);
        shared.set_idle(true);
        if !writer.drained() {
            shared.wake();
        }
    }
    let mut reading = requests.is_some();
    let mut closing: Option<Close> = None;
    let end = 'run: loop {
        let mut busy = false;

        // Frames from the client.
        while let (true, Some(stream)) = (reading, requests.as_mut()) {
            match Pin::new(stream).poll_next(&mut cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    busy = true;
                    if let Err(status) = handle_frame(hub, shared, frame) {
                        break 'run End::Refused(status);
                    }
                }
                Poll::Ready(Some(Err(grpcio::Error::Codec(e)))) => {
                    let why = format!("malformed frame: {e}");
                    break 'run End::Refused(RpcStatus::with_message(RpcStatusCode::INVALID_ARGUMENT, why));
                }
                Poll::Ready(Some(Err(_))) => break 'run End::Gone,
                // Half-closed: the client sends no more, but still receives (unless the
                // core closes a stream that never said hello).
                Poll::Ready(None) => {
                    reading = false;
                    let result = hub.input(Input::HalfClosed { conn: shared.conn() });
                    hub::log_result("half-close", &result);
                }
                Poll::Pending => break,
            }
        }

        if closing.is_none() {
            closing = shared.take_close();
        }
        if let Some(close) = closing.take_if(|c| !c.flush) {
            break 'run End::Closed(close);
        }

        // Writes: the pacer's, unless pacing is off or the stream is being closed: then
        // it takes its writes back to send what is left before its status.
        let waits = {
            let mut st = writer.state.lock();
            if st.broken {
                break 'run End::Gone;
            }
            if closing.is_some() {
                st.own_writes = true;
            }
            if st.own_writes {
                // The completion of a write in flight wakes us.
                match writer.step(&mut st, &mut cx) {
                    Step::Broken => break 'run End::Gone,
                    Step::Wrote => busy = true,
                    Step::InFlight => {}
                    Step::Empty => {
                        if let Some(close) = closing.take() {
                            break 'run End::Closed(close);
                        }
                    }
                }
            }
            // For the pacer's writes, or for our write's completion.
            !st.own_writes || st.writing
        };

        if busy {
            continue;
        }
        if waits {
            // Frames, closes, completions and a broken call wake us.
            thread::park();
        } else {
            shared.set_idle(true);
            if writer.drained() && !shared.close_pending() {
                thread::park();
            }
            shared.set_idle(false);
        }
    };

    let sink = {
        let mut st = writer.state.lock();
        st.own_writes = true;
        st.sink.take()
    };
    let Some(mut sink) = sink else { return };
    let conn = shared.conn();
    match end {
        End::Closed(close) => {
            debug!("stream {conn} closed by the core: {:?}", close.error);
            if let Some(until) = hub.linger_until() {
                if !linger(&mut requests, &mut sink, until) {
                    return;
                }
            }
            finish(sink, close.error.as_ref().map(encode::rpc_status), requests);
        }
        End::Refused(status) => {
            hub.stream_ended(conn);
            finish(sink, Some(status), requests);
        }
        End::Gone => {
            debug!("stream {conn}: the client is gone");
            hub.stream_ended(conn);
        }
    }
}

/// Waits until the client hangs up or `until` passes, whichever is first. Returns
/// false if the client is gone (nothing more can be sent).
fn linger<S: EventSink>(
    requests: &mut Option<RequestStream<pb::ClientFrame>>,
    sink: &mut S,
    until: Instant,
) -> bool {
    let waker = Waker::from(Arc::new(Unparker(thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Some(stream) = requests.as_mut() {
            match Pin::new(stream).poll_next(&mut cx) {
                Poll::Ready(Some(Ok(_))) => continue,
                Poll::Ready(Some(Err(_))) => return false,
                Poll::Ready(None) => *requests = None,
                Poll::Pending => {}
            }
        }
        if let Poll::Ready(Err(_)) = Pin::new(&mut *sink).poll_flush(&mut cx) {
            return false;
        }
        let now = Instant::now();
        if now >= until {
            return true;
        }
        thread::park_timeout(until - now);
    }
}

/// Hands one client frame to the hub. A frame with nothing in it is refused here: it
/// cannot be expressed as a core input.
fn handle_frame(hub: &Hub, shared: &StreamShared, frame: pb::ClientFrame) -> Result<(), RpcStatus> {
    let conn = shared.conn();
    let (what, input) = match frame.frame {
        Some(Frame::Hello(h)) => {
            ("hello", Input::Hello { conn, hello: encode::hello(h), new_token: new_token() })
        }
        Some(Frame::Post(p)) => (
            "post",
            Input::Post {
                conn,
                text: p.text,
                client_msg_id: p.client_msg_id,
                sent_at_ms: hub::wall_clock_ms(),
            },
        ),
        Some(Frame::Leave(_)) => ("leave", Input::LeaveStream { conn }),
        None => {
            let why = "empty frame: set one of hello, post or leave".to_owned();
            return Err(RpcStatus::with_message(RpcStatusCode::INVALID_ARGUMENT, why));
        }
    };
    let result = hub.input(input);
    hub::log_result(what, &result);
    Ok(())
}

/// Takes what is queued, up to `MAX_BATCH_BYTES`: a single event as it is, several as one
/// batch. A replay is encoded here, message by message, as far as the batch reaches; the
/// rest waits in `replay` and goes before the queue next time.
fn next_write(
    rx: &Receiver<Queued>,
    replay: &mut VecDeque<Arc<Message>>,
    batcher: &mut Batcher,
) -> Option<Encoded> {
    while batcher.body_len() < MAX_BATCH_BYTES {
        let next = match replay.pop_front() {
            Some(message) => encode::message(&message),
            None => match rx.try_recv() {
                Ok(Queued::Event(event)) => event,
                Ok(Queued::Backlog(messages)) => {
                    replay.extend(messages);
                    continue;
                }
                Err(_) => break,
            },
        };
        batcher.push(next);
    }
    batcher.take()
}

/// Ends the call: OK (`status` is `None`) or with `status`. Gives up and cancels the
/// call if the client does not take the status within the deadline.
fn finish<S: EventSink>(
    sink: S,
    status: Option<RpcStatus>,
    requests: Option<RequestStream<pb::ClientFrame>>,
) {
    let status = status.unwrap_or_else(|| RpcStatus::new(RpcStatusCode::OK));
    let done = poll_until(sink.fail_with(status), Instant::now() + FINISH_DEADLINE);
    if done.is_none() {
        debug!("a client did not take its stream's status in time; the call is cancelled");
    }
    drop(requests);
}

/// Polls `fut` on this thread until it completes or `deadline` passes.
pub(super) fn poll_until<F: Future + Unpin>(mut fut: F, deadline: Instant) -> Option<F::Output> {
    let waker = Waker::from(Arc::new(Unparker(thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(out) = Pin::new(&mut fut).poll(&mut cx) {
            return Some(out);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        thread::park_timeout(deadline - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(seq: u64, bytes: usize) -> Arc<Message> {
        Arc::new(Message {
            room: "r".into(),
            user: "u".into(),
            text: "x".repeat(bytes),
            seq: crate::core::Seq(seq),
            sent_at_ms: 0,
            client_msg_id: String::new(),
        })
    }

    /// The seqs of the messages in one write (a single event or a batch).
    fn seqs(write: &Encoded) -> Vec<u64> {
        use crate::pb::server_event::Event as E;
        use prost::Message as _;
        let event = crate::pb::ServerEvent::decode(write.0.as_slice()).expect("a server event");
        let events = match event.event {
            Some(E::Batch(b)) => b.events,
            _ => vec![event],
        };
        events
            .into_iter()
            .map(|e| match e.event {
                Some(E::Message(m)) => m.seq,
                other => panic!("not a message: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_replay_is_encoded_a_batch_at_a_time_and_goes_before_what_was_queued_after_it() {
        let (tx, rx) = crossbeam_channel::unbounded();
        tx.send(Queued::Event(encode::message(&chat(1, 10)))).unwrap();
        tx.send(Queued::Backlog((2..=101).map(|seq| chat(seq, 2000)).collect())).unwrap();
        tx.send(Queued::Event(encode::message(&chat(102, 10)))).unwrap();
        let (mut replay, mut batcher) = (VecDeque::new(), Batcher::default());
        let mut writes = Vec::new();
        while let Some(write) = next_write(&rx, &mut replay, &mut batcher) {
            assert!(write.0.len() <= MAX_BATCH_BYTES + 2100, "a write of {} bytes", write.0.len());
            writes.push(seqs(&write));
            if writes.len() == 1 {
                // What the first write did not take waits, encoded only when written.
                assert!(!replay.is_empty() && replay.len() < 100, "{} left", replay.len());
            }
        }
        assert!(writes.len() >= 3, "about 200 KB go out in batches of at most 64 KiB: {}", writes.len());
        let all: Vec<u64> = writes.concat();
        assert_eq!(all, (1..=102).collect::<Vec<_>>(), "in order, nothing lost or repeated");
        assert!(replay.is_empty() && rx.is_empty());
    }

    #[test]
    fn a_lone_event_goes_out_as_it_is() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let event = encode::message(&chat(7, 10));
        tx.send(Queued::Event(event.clone())).unwrap();
        let write = next_write(&rx, &mut VecDeque::new(), &mut Batcher::default()).expect("a write");
        assert_eq!(write.0.as_slice(), event.0.as_slice());
        assert!(next_write(&rx, &mut VecDeque::new(), &mut Batcher::default()).is_none());
    }
}
