//! The hub: the broker behind one lock, the routing table of stream queues, and the
//! timer thread. Outputs are routed while the lock that produced them is held, so every
//! queue receives events in the order the core emitted them.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::{self, Thread};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};
use log::{debug, info, warn};
use parking_lot::Mutex;

use super::encode::{self, Encoded};
use crate::core::{Accepted, Broker, Close, ConnId, Event, Input, Message, Output, Rejection};

/// Largest batch a stream puts in one gRPC message (one event larger than this still goes
/// out whole). A write to a client that stopped reading stays in flight, so this is also
/// about what such a stream holds beyond references to shared events.
pub const MAX_BATCH_BYTES: usize = 64 << 10;

/// An item of a stream's queue.
#[derive(Clone)]
pub enum Queued {
    /// An event encoded once, shared with its other recipients.
    Event(Encoded),
    /// Retained messages to replay, encoded by whichever thread writes, a batch at a time
    /// as it writes: a stream that does not read holds references to the room's history,
    /// not a copy of it (which, for 1000 such streams joining a room with 500 messages of
    /// 4 KB, came to 1.9 GB).
    Backlog(Vec<Arc<Message>>),
}

/// The write side of a paced stream, as the router sees it: when an idle stream's queue
/// gets an item, its write starts on the thread that queued it, or, if that thread must
/// not write (a gRPC handler on a completion-queue thread), on the pacer's.
pub trait IdleWriter: Send + Sync {
    /// Writes what is queued, on the calling thread.
    fn write_now(self: Arc<Self>);
    /// Has the pacer thread write what is queued, as soon as it gets to it.
    fn write_soon(self: Arc<Self>);
}

/// Where an input comes from, which decides who starts idle streams' writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// One of this server's threads (a stream's, the timer's, the pacer's) or an
    /// embedding program's: it writes to idle streams itself, after the lock.
    Own,
    /// A gRPC handler, which must return at once: the pacer writes.
    Handler,
}

/// What a stream's thread shares with the router.
pub struct StreamShared {
    conn: ConnId,
    queue: Sender<Queued>,
    capacity: usize,
    /// Set by the router when the core closes the stream.
    close: Mutex<Option<Close>>,
    thread: Thread,
    /// Nobody is writing for the stream: the next item queued must start a write.
    idle: AtomicBool,
    /// How to start that write. Unset (unpaced streams), the stream's thread is unparked
    /// and writes itself.
    writer: OnceLock<Weak<dyn IdleWriter>>,
    /// A delivery did not fit: drop everything after it.
    lagged: AtomicBool,
}

impl StreamShared {
    /// The stream's id in the core.
    pub fn conn(&self) -> ConnId {
        self.conn
    }

    /// Takes the close command, if the core gave one.
    pub fn take_close(&self) -> Option<Close> {
        self.close.lock().take()
    }

    /// True if a close is waiting.
    pub fn close_pending(&self) -> bool {
        self.close.lock().is_some()
    }

    /// Marks the stream idle (nobody writes for it; the next item queued starts a write)
    /// or busy.
    pub fn set_idle(&self, idle: bool) {
        self.idle.store(idle, Ordering::SeqCst);
    }

    /// Sets the stream's write side (once, before the stream is first marked idle).
    pub fn set_writer(&self, writer: Weak<dyn IdleWriter>) {
        if self.writer.set(writer).is_err() {
            debug_assert!(false, "a stream's writer is set once");
        }
    }

    /// True (once) if the stream was idle and its write must be started.
    pub fn needs_wake(&self) -> bool {
        self.idle.load(Ordering::SeqCst) && self.idle.swap(false, Ordering::SeqCst)
    }

    /// Starts the stream's write on this thread if it is idle (and nobody else did
    /// since it became so).
    pub fn wake(&self) {
        if self.needs_wake() {
            self.start_write(Caller::Own);
        }
    }

    /// Starts the stream's write: on this thread, by the pacer, or by its own thread.
    fn start_write(&self, caller: Caller) {
        match (self.writer.get().and_then(Weak::upgrade), caller) {
            (Some(writer), Caller::Own) => writer.write_now(),
            (Some(writer), Caller::Handler) => writer.write_soon(),
            (None, _) => self.thread.unpark(),
        }
    }

    /// The stream's thread.
    pub fn thread(&self) -> &Thread {
        &self.thread
    }
}

/// Hashes a `ConnId` with one multiplication. Routing looks one up for every recipient
/// of every event, under the hub's lock; the ids are the core's own counter, not input
/// a client could choose, so they need no protection against collisions made on purpose.
#[derive(Default)]
struct ConnIdHasher(u64);

impl Hasher for ConnIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing: the multiplication spreads consecutive ids over the high bits
        // the table uses as tags, and keeps the low bits a bijection.
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

struct State {
    broker: Broker,
    routes: HashMap<ConnId, Arc<StreamShared>, BuildHasherDefault<ConnIdHasher>>,
    /// The deadline the timer thread currently sleeps until.
    timer_deadline: Option<Instant>,
}

/// The shared broker and routing table.
pub struct Hub {
    state: Mutex<State>,
    /// During shutdown: until when a stream that was sent its notice waits for the
    /// client to read it before the final status goes out.
    linger_until: Mutex<Option<Instant>>,
    queue_capacity: usize,
    timer_kick: Sender<()>,
}

/// Idle streams whose writes start once the lock is released (writing, and waking a
/// thread, are system calls; they are kept out of the critical section).
pub type Wakes = Vec<Arc<StreamShared>>;

/// From this many idle streams woken by one input on, a thread of ours writes the first
/// half of them and hands the rest to the pacer thread, so that the two halves go out on
/// two cores at once instead of one after the other.
pub const SHARED_IDLE_WRITES: usize = 128;

/// Starts the writes of the idle streams routing woke, after the hub's lock.
fn start_writes(wakes: &Wakes, caller: Caller) {
    let own = match caller {
        Caller::Own if wakes.len() >= SHARED_IDLE_WRITES => wakes.len().div_ceil(2),
        Caller::Own => wakes.len(),
        Caller::Handler => 0,
    };
    let (now, soon) = wakes.split_at(own);
    soon.iter().for_each(|s| s.start_write(Caller::Handler));
    now.iter().for_each(|s| s.start_write(Caller::Own));
}

impl Hub {
    /// A hub around `broker`, with its timer thread started.
    pub fn start(broker: Broker, queue_capacity: usize) -> std::io::Result<Arc<Hub>> {
        let (timer_kick, kicks) = crossbeam_channel::bounded(1);
        let hub = Arc::new(Hub {
            state: Mutex::new(State { broker, routes: HashMap::default(), timer_deadline: None }),
            linger_until: Mutex::new(None),
            queue_capacity,
            timer_kick,
        });
        let weak = Arc::downgrade(&hub);
        thread::Builder::new()
            .name("chat-timers".into())
            .stack_size(256 * 1024)
            .spawn(move || run_timers(weak, kicks))?;
        Ok(hub)
    }

    /// Feeds one input, routes every output in order, and returns the result. Idle
    /// streams that got events are written after the lock is released, on this thread.
    pub fn input(&self, input: Input) -> Result<Accepted, Rejection> {
        self.input_from(Caller::Own, input)
    }

    /// [`Hub::input`] for `caller`: a gRPC handler leaves idle streams' writes to the pacer.
    pub fn input_from(&self, caller: Caller, input: Input) -> Result<Accepted, Rejection> {
        let mut wakes = Vec::new();
        let result = {
            let mut state = self.state.lock();
            let result = state.broker.handle_input(Instant::now(), input);
            self.route(&mut state, &mut wakes);
            result
        };
        start_writes(&wakes, caller);
        result
    }

    /// Registers a new stream: the core numbers it and its queue is added to the
    /// routing table before anything can be routed to it.
    pub fn open_stream(&self) -> Result<(Arc<StreamShared>, Receiver<Queued>), Rejection> {
        let mut state = self.state.lock();
        let conn = match state.broker.handle_input(Instant::now(), Input::Open)? {
            Accepted::Opened(conn) => conn,
            other => unreachable!("Open is answered with Opened, not {other:?}"),
        };
        let (queue, rx) = crossbeam_channel::unbounded();
        let shared = Arc::new(StreamShared {
            conn,
            queue,
            capacity: self.queue_capacity,
            close: Mutex::new(None),
            thread: thread::current(),
            idle: AtomicBool::new(false),
            writer: OnceLock::new(),
            lagged: AtomicBool::new(false),
        });
        state.routes.insert(conn, Arc::clone(&shared));
        // Its hello deadline.
        self.schedule_timer(&mut state);
        Ok((shared, rx))
    }

    /// The stream ended on the client's side (or a write failed): detach it.
    pub fn stream_ended(&self, conn: ConnId) {
        let mut wakes = Vec::new();
        {
            let mut state = self.state.lock();
            state.routes.remove(&conn);
            let result = state.broker.handle_input(Instant::now(), Input::StreamEnded { conn });
            debug!("stream {conn} ended: {result:?}");
            self.route(&mut state, &mut wakes);
        }
        start_writes(&wakes, Caller::Own);
    }

    /// Starts a shutdown: closed streams will linger until `until` (see [`Hub::linger_until`]).
    pub fn begin_shutdown(&self, until: Instant) {
        *self.linger_until.lock() = Some(until);
    }

    /// Set during shutdown. grpcio's Rust client reports a non-OK status as soon as it
    /// has arrived, even ahead of a message received just before it; a stream that has
    /// flushed its shutdown notice therefore waits for the client to hang up (or for
    /// this deadline) before it sends `UNAVAILABLE`, so the notice is read.
    pub fn linger_until(&self) -> Option<Instant> {
        *self.linger_until.lock()
    }

    /// Every stream with a route, in ascending order.
    pub fn open_conns(&self) -> Vec<ConnId> {
        let mut conns: Vec<ConnId> = self.state.lock().routes.keys().copied().collect();
        conns.sort_unstable();
        conns
    }

    /// Runs `f` with read access to the broker (for getters).
    pub fn read<T>(&self, f: impl FnOnce(&Broker) -> T) -> T {
        f(&self.state.lock().broker)
    }

    /// Routes every queued output. Deliveries that do not fit a stream's queue are
    /// reported back to the core as `Lagging`, whose outputs are routed in turn.
    fn route(&self, state: &mut State, wakes: &mut Wakes) {
        let mut lagging = Vec::new();
        loop {
            while let Some(output) = state.broker.poll_output() {
                match output {
                    Output::Deliver { to, event } => {
                        let item = match event {
                            Event::Backlog(messages) => Queued::Backlog(messages),
                            other => Queued::Event(encode::encode(&other)),
                        };
                        for conn in to.as_slice() {
                            let Some(route) = state.routes.get(conn) else { continue };
                            if route.lagged.load(Ordering::Relaxed) {
                                continue;
                            }
                            if route.queue.len() >= route.capacity {
                                route.lagged.store(true, Ordering::Relaxed);
                                lagging.push(*conn);
                                continue;
                            }
                            route.queue.send(item.clone()).expect("the stream thread owns the receiver");
                            if route.needs_wake() {
                                wakes.push(Arc::clone(route));
                            }
                        }
                    }
                    Output::Close(close) => {
                        if let Some(route) = state.routes.remove(&close.conn) {
                            *route.close.lock() = Some(close);
                            route.thread.unpark();
                        }
                    }
                }
            }
            if lagging.is_empty() {
                break;
            }
            for conn in lagging.drain(..) {
                warn!("stream {conn} is too slow: its queue of {} events is full", self.queue_capacity);
                let _ = state.broker.handle_input(Instant::now(), Input::Lagging { conn });
            }
        }
        self.schedule_timer(state);
    }

    /// Wakes the timer thread if the broker's next deadline is earlier than the one it
    /// sleeps until.
    fn schedule_timer(&self, state: &mut State) {
        let next = state.broker.poll_timeout();
        if next.is_some() && (state.timer_deadline.is_none() || next < state.timer_deadline) {
            state.timer_deadline = next;
            let _ = self.timer_kick.try_send(());
        }
    }

    fn fire_timers(&self) -> Option<Instant> {
        let mut wakes = Vec::new();
        let next = {
            let mut state = self.state.lock();
            state.broker.handle_timeout(Instant::now());
            self.route(&mut state, &mut wakes);
            state.timer_deadline = state.broker.poll_timeout();
            state.timer_deadline
        };
        start_writes(&wakes, Caller::Own);
        next
    }
}

/// Sleeps until the broker's next deadline (or a kick that says it moved earlier),
/// then fires due timers. Ends when the hub is dropped.
fn run_timers(hub: Weak<Hub>, kicks: Receiver<()>) {
    let mut next: Option<Instant> = None;
    loop {
        let wait = next.map_or(Duration::from_secs(1), |at| at.saturating_duration_since(Instant::now()));
        let _ = kicks.recv_timeout(wait.min(Duration::from_secs(1)));
        let Some(hub) = hub.upgrade() else { return };
        next = hub.fire_timers();
    }
}

/// Milliseconds since the Unix epoch, for `sent_at_ms`.
pub fn wall_clock_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Logs what an accepted input did, at the levels the design asks for.
pub fn log_result(what: &str, result: &Result<Accepted, Rejection>) {
    match result {
        Ok(Accepted::Joined(info)) => info!("{what}: session {:?} joined", info.token),
        Ok(Accepted::Attached { conn, user, room, resumed, gap, replayed, .. }) => {
            if user.is_empty() {
                info!("{what}: listener {conn} attached to #{room} ({replayed} replayed)");
            } else {
                info!(
                    "{what}: {user} {} #{room} on {conn} ({replayed} replayed{})",
                    if *resumed { "resumed in" } else { "joined" },
                    if *gap { ", with a gap" } else { "" }
                );
            }
        }
        Ok(Accepted::Left { user, room }) => info!("{what}: {user} left #{room}"),
        Ok(Accepted::Posted(p)) if p.duplicate => debug!("{what}: repeat of seq {} ignored", p.seq),
        Ok(Accepted::Posted(p)) => debug!("{what}: seq {} relayed to {} streams", p.seq, p.recipients),
        Ok(_) => {}
        Err(rejection) => debug!("{what}: rejected: {rejection}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{BrokerConfig, Epoch, Seq, Token};
    use std::sync::atomic::AtomicUsize;

    /// How many idle streams' writes were started on the calling thread, and how many
    /// were handed to the pacer.
    #[derive(Default)]
    struct Started {
        now: AtomicUsize,
        soon: AtomicUsize,
    }

    struct Recorder(Arc<Started>);

    impl IdleWriter for Recorder {
        fn write_now(self: Arc<Self>) {
            self.0.now.fetch_add(1, Ordering::SeqCst);
        }
        fn write_soon(self: Arc<Self>) {
            self.0.soon.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Posts one message, from `caller`, to a room with `listeners` idle streams; returns
    /// the writes started (now, handed to the pacer).
    fn post_to_idle_streams(listeners: usize, caller: Caller) -> (usize, usize) {
        let hub = Hub::start(Broker::new(BrokerConfig::default(), 1), 1000).expect("the timer thread starts");
        let token = Token::from_entropy([7; 16]);
        let session = token.as_str().to_string();
        hub.input(Input::Join { user: "poster".into(), room: "r".into(), token }).expect("joined");
        let started = Arc::new(Started::default());
        let mut streams = Vec::new();
        for _ in 0..listeners {
            let (shared, rx) = hub.open_stream().expect("a stream");
            let listen = Input::Subscribe {
                conn: shared.conn(),
                session: String::new(),
                room: "r".into(),
                since: Seq(0),
                epoch: Epoch(0),
            };
            hub.input(listen).expect("listening");
            rx.try_iter().for_each(drop); // the welcome
            let writer: Arc<dyn IdleWriter> = Arc::new(Recorder(Arc::clone(&started)));
            shared.set_writer(Arc::downgrade(&writer));
            shared.set_idle(true);
            streams.push((shared, rx, writer));
        }
        let send = Input::Send { session, text: "hello".into(), client_msg_id: String::new(), sent_at_ms: 0 };
        hub.input_from(caller, send).expect("posted");
        for (_, rx, _) in &streams {
            assert_eq!(rx.try_iter().count(), 1, "every listener got the message");
        }
        (started.now.load(Ordering::SeqCst), started.soon.load(Ordering::SeqCst))
    }

    #[test]
    fn a_message_to_many_idle_streams_is_written_half_by_its_sender_and_half_by_the_pacer() {
        assert_eq!(post_to_idle_streams(SHARED_IDLE_WRITES - 1, Caller::Own), (SHARED_IDLE_WRITES - 1, 0));
        assert_eq!(post_to_idle_streams(SHARED_IDLE_WRITES, Caller::Own), (64, 64));
        assert_eq!(post_to_idle_streams(301, Caller::Own), (151, 150));
        // A gRPC handler writes none itself.
        assert_eq!(post_to_idle_streams(301, Caller::Handler), (0, 301));
    }
}
