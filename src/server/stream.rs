//! One thread per stream: it reads the client's frames, hands them to the hub, and
//! writes what the hub queued for it — everything queued since the last write goes out
//! as one `EventBatch`, so a busy stream needs one write and one wake-up per batch, not
//! per event.
//!
//! The thread polls grpcio's futures itself with a waker that unparks it, and parks
//! when there is nothing to do. While a write is in flight it does not ask to be woken
//! for new queue items (they will go into the next batch anyway).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use futures::{Sink, Stream};
use grpcio::{DuplexSink, RequestStream, RpcStatus, RpcStatusCode, ServerStreamingSink, WriteFlags};
use log::debug;

use super::encode::{self, Batcher, Encoded};
use super::hub::{self, Hub, Queued, StreamShared, MAX_BATCH_BYTES};
use super::service::StreamLimit;
use crate::core::{Close, ConnId, Input, Message, Token};
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

/// A response sink of pre-encoded events: `Chat`'s duplex sink or `Subscribe`'s.
pub trait EventSink: Sink<(Encoded, WriteFlags), Error = grpcio::Error> + Unpin {
    /// Ends the call with `status`.
    fn fail_with(self, status: RpcStatus) -> Pin<Box<dyn Future<Output = grpcio::Result<()>>>>;
}

impl EventSink for DuplexSink<Encoded> {
    fn fail_with(self, status: RpcStatus) -> Pin<Box<dyn Future<Output = grpcio::Result<()>>>> {
        Box::pin(self.fail(status))
    }
}

impl EventSink for ServerStreamingSink<Encoded> {
    fn fail_with(self, status: RpcStatus) -> Pin<Box<dyn Future<Output = grpcio::Result<()>>>> {
        Box::pin(self.fail(status))
    }
}

/// How often a busy stream may write. An idle stream writes an event at once; a stream
/// that wrote recently waits for its next tick and then writes everything that queued up
/// as one batch. Ticks are `interval()` apart, and the interval grows with the number of
/// open streams so that all of them together stay near `writes_per_second` — each write
/// costs a thread wake-up and a C-core operation, and on a few cores those, not bytes,
/// are what limits fan-out.
///
/// Streams share ticks in [`TICK_GROUPS`] groups (by stream id), each group offset by a
/// fraction of the interval. Threads whose timers expire together are woken in one pass,
/// their write completions reach the completion-queue thread in runs, and a client with
/// many streams on one connection receives them together; measured on 2 cores at 500 k
/// deliveries/s this took 15–30 % off the server's CPU at the same latency. One group for
/// all streams made each tick a burst of every stream's write, which added the length of
/// the burst (about 13 ms for 1000 streams) to the median latency.
pub struct Pacing {
    streams: Arc<StreamLimit>,
    per_stream: Duration,
    max: Duration,
    /// Where every group's tick grid starts.
    epoch: Instant,
}

/// How many tick groups busy streams are spread over.
pub const TICK_GROUPS: u64 = 16;

impl Pacing {
    /// Pacing for the streams counted by `streams`: at most `writes_per_second` writes
    /// in total (0 = no pacing), and never an interval above `max`.
    pub fn new(streams: Arc<StreamLimit>, writes_per_second: u32, max: Duration) -> Pacing {
        let per_stream =
            if writes_per_second == 0 { Duration::ZERO } else { Duration::from_secs(1) / writes_per_second };
        Pacing { streams, per_stream, max, epoch: Instant::now() }
    }

    /// The shortest time between two writes of one stream, now.
    pub fn interval(&self) -> Duration {
        let open = u32::try_from(self.streams.open()).unwrap_or(u32::MAX);
        self.per_stream.saturating_mul(open).min(self.max)
    }

    /// When stream `conn`, having written at `now`, may write again: its group's next tick.
    pub fn next_write(&self, conn: ConnId, now: Instant) -> Instant {
        next_tick(self.epoch, now, self.interval(), conn.get())
    }

    /// When stream `conn`, whose write is still in flight at its tick while more events
    /// wait, looks again — without being woken by the write's completion — after
    /// `retries` earlier looks found it in flight too. `None` without pacing: then the
    /// completion wakes it.
    ///
    /// A write still in flight after a whole interval means the server is behind (the
    /// completion-queue thread) or the client is not reading (C-core completes a write when
    /// it frames it for the socket, which needs room in the client's flow-control window and
    /// the connection's previous socket write finished). Waiting for the
    /// completion would add a wake-up per write just when the CPU is short; measured on 2
    /// cores with one connection at 60 k writes/s, that fed on itself until latency reached
    /// seconds. So the stream looks again on its next tick, then after 2, 4, … intervals,
    /// at most `max` apart: a brief delay costs at most one tick, and a stuck client at
    /// most one wake-up per `max` once the doubling has reached it.
    pub fn retry_write(&self, conn: ConnId, now: Instant, retries: u32) -> Option<Instant> {
        retry_tick(self.epoch, now, self.interval(), self.max, retries, conn.get())
    }
}

/// The tick of `group` at which a stream whose write was still in flight at `now` (and at
/// `retries` looks before) looks again: the last of its ticks at most `interval × 2^retries`
/// away, or at most `max` away if that is shorter; `None` without pacing.
fn retry_tick(
    epoch: Instant,
    now: Instant,
    interval: Duration,
    max: Duration,
    retries: u32,
    group: u64,
) -> Option<Instant> {
    if interval.is_zero() {
        return None;
    }
    let wait = interval.saturating_mul(1 << retries.min(16)).min(max.max(interval));
    Some(next_tick(epoch, now + (wait - interval), interval, group))
}

/// The first tick of `group` (taken modulo [`TICK_GROUPS`]) after `now`, on a grid of `interval` that starts at `epoch`
/// shifted by `group / TICK_GROUPS` of an interval (a `now` before `epoch` counts as `epoch`).
fn next_tick(epoch: Instant, now: Instant, interval: Duration, group: u64) -> Instant {
    let step = interval.as_nanos();
    if step == 0 {
        return now;
    }
    let offset = step * u128::from(group % TICK_GROUPS) / u128::from(TICK_GROUPS);
    let since = now.saturating_duration_since(epoch).as_nanos();
    // The smallest `k * step + offset` above `since`.
    let tick = (since + step - offset) / step * step + offset;
    epoch + Duration::from_nanos(u64::try_from(tick).unwrap_or(u64::MAX))
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
    requests: RequestStream<pb::ClientFrame>,
    sink: DuplexSink<Encoded>,
) {
    let (shared, rx) = match hub.open_stream() {
        Ok(opened) => opened,
        Err(rejection) => return finish(sink, Some(encode::rpc_status(&rejection)), Some(requests)),
    };
    drive(&hub, &pacing, &shared, &rx, Some(requests), sink);
}

/// Runs a `Subscribe` stream to its end on the current thread.
pub fn run_subscribe(
    hub: Arc<Hub>,
    pacing: Arc<Pacing>,
    req: pb::SubscribeRequest,
    sink: ServerStreamingSink<Encoded>,
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
    drive(&hub, &pacing, &shared, &rx, None, sink);
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

fn drive<S: EventSink>(
    hub: &Hub,
    pacing: &Pacing,
    shared: &StreamShared,
    rx: &Receiver<Queued>,
    mut requests: Option<RequestStream<pb::ClientFrame>>,
    mut sink: S,
) {
    let waker = Waker::from(Arc::new(Unparker(thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut batcher = Batcher::default();
    // The rest of a history replay taken off the queue: it goes out before anything
    // queued after it.
    let mut replay = VecDeque::new();
    let mut reading = requests.is_some();
    let mut writing = false;
    // Looks in a row that found the write still in flight at a tick.
    let mut retries = 0u32;
    let mut next_write_at = Instant::now();
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
                // Half-closed: the client sends no more, but still receives.
                Poll::Ready(None) => reading = false,
                Poll::Pending => break,
            }
        }

        // The write in flight. A busy stream does not look at it before its pacing
        // interval is over, so grpcio holds no waker of ours and its completion wakes
        // nobody; events queued meanwhile go out together in the next batch. Polling an
        // idle sink also notices a call the client cancelled.
        let now = Instant::now();
        if !writing || now >= next_write_at {
            // A busy stream whose write is still in flight at its tick does not ask to be
            // woken by the completion either: it backs off to a later tick (see
            // `Pacing::retry_write`).
            let retry_at = if writing && (!replay.is_empty() || !rx.is_empty()) {
                pacing.retry_write(shared.conn(), now, retries)
            } else {
                None
            };
            let mut unwoken = Context::from_waker(Waker::noop());
            match Pin::new(&mut sink).poll_flush(if retry_at.is_some() { &mut unwoken } else { &mut cx }) {
                Poll::Ready(Ok(())) => (writing, retries) = (false, 0),
                Poll::Ready(Err(_)) => break 'run End::Gone,
                Poll::Pending => {
                    if let Some(at) = retry_at {
                        next_write_at = at;
                        retries = retries.saturating_add(1);
                    }
                }
            }
        }

        if closing.is_none() {
            closing = shared.take_close();
        }
        if let Some(close) = closing.take_if(|c| !c.flush) {
            break 'run End::Closed(close);
        }

        // The next write: everything queued, as one batch.
        if !writing && now >= next_write_at {
            if let Some(item) = next_write(rx, &mut replay, &mut batcher) {
                let flags = WriteFlags::default();
                if Pin::new(&mut sink).start_send((item, flags)).is_err() {
                    break 'run End::Gone;
                }
                writing = true;
                next_write_at = pacing.next_write(shared.conn(), now);
                continue;
            }
            if let Some(close) = closing.take() {
                break 'run End::Closed(close);
            }
        }

        if busy {
            continue;
        }
        let queued = !replay.is_empty() || !rx.is_empty() || closing.is_some();
        if now < next_write_at && (writing || queued) {
            // Pacing: come back when the interval is over (a close or a frame may wake
            // us earlier).
            thread::park_timeout(next_write_at - now);
        } else if writing {
            // The write is still in flight after the interval (a slow reader): its
            // completion wakes us.
            thread::park();
        } else {
            shared.set_idle(true);
            if replay.is_empty() && rx.is_empty() && !shared.close_pending() {
                thread::park();
            }
            shared.set_idle(false);
        }
    };

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

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_next_tick_is_after_now_and_at_most_one_interval_away() {
        let epoch = Instant::now();
        let interval = 16 * MS;
        for group in 0..TICK_GROUPS {
            for at in [0u64, 1, 2, 15, 16, 17, 31, 32, 1000, 123_457] {
                let now = epoch + Duration::from_micros(at * 250);
                let tick = next_tick(epoch, now, interval, group);
                assert!(tick > now, "group {group} at {at}: {tick:?} is not after {now:?}");
                assert!(tick - now <= interval, "group {group} at {at}: more than an interval away");
            }
        }
    }

    #[test]
    fn a_group_shares_its_ticks_and_groups_are_spread_over_the_interval() {
        let epoch = Instant::now();
        let interval = 16 * MS;
        // Two streams of group 3 that wrote at different times meet on the same tick.
        let a = next_tick(epoch, epoch + 40 * MS, interval, 3);
        let b = next_tick(epoch, epoch + 50 * MS, interval, 3);
        assert_eq!(a, b);
        assert_eq!(a, epoch + 51 * MS);
        // Group g's ticks sit g/16 of an interval (g ms here) after group 0's.
        assert_eq!(next_tick(epoch, epoch + 32 * MS, interval, 0), epoch + 48 * MS);
        for group in 1..16u32 {
            assert_eq!(next_tick(epoch, epoch + 32 * MS, interval, group.into()), epoch + (32 + group) * MS);
        }
        // Stream ids wrap around the groups.
        assert_eq!(next_tick(epoch, epoch, interval, 3 + TICK_GROUPS), next_tick(epoch, epoch, interval, 3));
    }

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

    #[test]
    fn without_pacing_a_stream_may_write_at_once() {
        let epoch = Instant::now();
        let now = epoch + 5 * MS;
        assert_eq!(next_tick(epoch, now, Duration::ZERO, 7), now);
        assert_eq!(retry_tick(epoch, now, Duration::ZERO, 50 * MS, 0, 7), None, "the completion wakes it");
    }

    #[test]
    fn a_stream_still_writing_at_its_tick_retries_on_its_own_ticks_doubling_up_to_max() {
        let epoch = Instant::now();
        let max = 50 * MS;
        for interval in [MS, 16 * MS, 29 * MS, max] {
            for group in 0..TICK_GROUPS {
                for at in [0u64, 7, 64, 1000, 123_457] {
                    let now = epoch + Duration::from_micros(at * 250);
                    for retries in 0..40 {
                        let retry = retry_tick(epoch, now, interval, max, retries, group).expect("paced");
                        let wait = (interval * 2u32.pow(retries.min(20))).min(max);
                        let case =
                            format!("interval {interval:?}, group {group}, at {at}, retries {retries}");
                        assert!(retry > now + wait - interval && retry <= now + wait, "{case}");
                        let on_grid = next_tick(epoch, retry - Duration::from_nanos(1), interval, group);
                        assert_eq!(retry, on_grid, "{case}: not one of the group's ticks");
                    }
                }
            }
        }
        // The first look again is simply the next tick.
        let now = epoch + 77 * MS;
        assert_eq!(retry_tick(epoch, now, 16 * MS, max, 0, 3), Some(next_tick(epoch, now, 16 * MS, 3)));
        // 1 ms ticks: 1, 2, 4, …, 32 ms, then 50 ms from there on.
        let waits: Vec<_> = (0..8).map(|r| retry_tick(epoch, now, MS, max, r, 0).unwrap() - now).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 50, 50].map(|ms| ms * MS));
    }
}
