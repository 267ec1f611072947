//! Paced writes. A stream that has just written is handed to the pacer thread, which
//! writes for it, about one interval later, everything that queued meanwhile, as one
//! batch, and lets go of it (idle again) once a tick finds nothing to send.
//!
//! The pacer walks its busy streams in connection order, a sixteenth of them per tick, so
//! that the streams of one HTTP/2 connection are written one after another: C-core then
//! often puts several of those writes into one `sendmsg`, and the client reads them with
//! one wake-up (see BENCHMARKS.md).
//!
//! The budget of writes per second may move with the machine's load (see [`budget`]); the
//! pacer thread looks at it every [`budget::SAMPLE`]. With `threads` above 1 and a budget
//! above [`budget::WRITES_PER_THREAD`], each tick's streams are cut into runs, one per
//! that many writes/s, in walk order, and helper threads write all runs but the first at
//! the same time as the pacer thread. One thread tops out at about 60 k writes/s on this
//! machine (C-core's write path and a completion-queue wake-up per write); three reach
//! the 100 k that a 15 ms p99 at 500 k deliveries/s needs, and concurrent writes to one
//! connection share `sendmsg`s.
//!
//! Each gRPC write costs a C-core operation and a `sendmsg`; when every busy stream's
//! thread woke up to make its own write, the wake-up cost as much again. One thread
//! that walks the busy streams makes those writes without a wake-up each: measured
//! on 2 cores at 500 k deliveries/s this took the server from about 1.0 to 0.7 cores and
//! kept the latency steady at twice the write rate (see BENCHMARKS.md). An idle
//! stream's first write is made at once by the thread that queued its event, or, when
//! that is a gRPC handler, by the pacer as soon as it gets to it (`ready`).

use std::collections::BTreeMap;
use std::hash::{BuildHasher, BuildHasherDefault};
use std::ops::{Bound, Range};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::budget::{self, CpuTimes, Governor, WriteBudget};
use super::service::StreamLimit;
use crate::core::ConnId;

/// How many ticks an interval has. Each tick writes the next sixteenth of the busy
/// streams, instead of all of them in one burst, which added the length of the burst to
/// the median latency.
pub const TICKS: u32 = 16;

/// The longest the pacer thread sleeps while streams are busy (or wait in the walk with
/// none open) before it looks at the interval again; with none busy it sleeps until woken.
const MAX_SLEEP: Duration = Duration::from_millis(20);

/// The shortest time between two ticks. A sleep takes at least ~60 µs (the kernel's timer
/// slack), so with short intervals (few streams) each tick serves several sixteenths at
/// once instead of one per sleep, which would stretch the interval sixteenfold.
const MIN_STEP: Duration = Duration::from_micros(250);

/// What a stream's tick did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Ticked {
    /// It started a write: keep the stream.
    Wrote,
    /// Its previous write is still in flight: keep the stream, and look again soon.
    Waiting,
    /// Let go of the stream: nothing was left to send, the call broke, or the stream's
    /// thread took its writes back.
    LetGo,
}

/// A stream the pacer writes for.
pub(super) trait Paced: Send + Sync {
    /// Called on the stream's ticks (and once when it is made ready): writes what is
    /// queued if the previous write is done.
    fn tick(&self) -> Ticked;
}

/// Where a stream comes in the pacer's walk: with the other streams of its connection,
/// by id among them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct WriteOrder {
    /// The stream's HTTP/2 connection, as [`connection_key`] of its peer address.
    pub connection: u64,
    pub stream: ConnId,
}

/// A number for the connection a call came on: a hash of its peer address (such as
/// `ipv4:127.0.0.1:50312`), which the streams of one connection share. Connections whose
/// peers look alike (Unix sockets) get one number; their streams are then walked by id.
pub(super) fn connection_key(peer: &str) -> u64 {
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(peer)
}

/// The busy streams in walking order, and where the walk is.
#[derive(Default)]
struct Walk {
    streams: BTreeMap<WriteOrder, Arc<dyn Paced>>,
    /// The last stream taken; the next tick starts after it, and after the last stream
    /// starts again at the first.
    after: Option<WriteOrder>,
}

impl Walk {
    /// Takes out the streams for sixteenths `parts` of an interval: of `n` busy streams,
    /// as many as lie between `n × start / 16` and `n × end / 16`, so that each of them is
    /// taken once per interval while `n` stays the same. Each call goes on from where the
    /// last one stopped.
    fn take(&mut self, parts: &Range<usize>) -> Batch {
        let n = self.streams.len();
        let count = n * parts.end / TICKS as usize - n * parts.start / TICKS as usize;
        let mut taken = Vec::with_capacity(count);
        while taken.len() < count {
            let start = self.after.map_or(Bound::Unbounded, Bound::Excluded);
            let Some((&key, _)) = self.streams.range((start, Bound::Unbounded)).next() else {
                // Past the last stream: start again at the first.
                self.after = None;
                continue;
            };
            let stream = self.streams.remove(&key).expect("the key was just found");
            taken.push((key, stream));
            self.after = Some(key);
        }
        taken
    }
}

/// The write budget and the pacer's walk. `interval()` grows with the number of open
/// streams so that all of them together stay near the budget's writes per second.
pub struct Pacing {
    streams: Arc<StreamLimit>,
    budget: WriteBudget,
    /// Writes per second allowed now (moved by the pacer thread's [`Governor`]).
    writes_per_second: AtomicU32,
    max: Duration,
    /// Where the tick grid starts.
    epoch: Instant,
    busy: Mutex<Walk>,
    /// Idle streams to write as soon as the pacer gets to them (see [`Pacing::ready`]).
    ready: Mutex<Batch>,
    /// Streams whose turn found their previous write still in flight: looked at once more
    /// on the next tick instead of a whole interval later.
    late: Mutex<Batch>,
    /// The pacer thread; whether it sleeps (then a stream made ready wakes it); and
    /// whether it sleeps for want of busy streams (then a stream added, or put back by a
    /// helper, wakes it too: it has no tick to wake up for).
    thread: OnceLock<Thread>,
    sleeping: AtomicBool,
    dormant: AtomicBool,
    /// The helper threads, which write the runs of each tick the pacer thread hands them.
    helpers: OnceLock<Vec<Helper>>,
}

/// A helper thread and the runs handed to it. A plain slot and `unpark`, not a channel:
/// a channel's blocking receive spins and calls `sched_yield` several times before it
/// sleeps, and a helper waits for every tick (1600 a second at a 10 ms interval),
/// which made 8–12 k `sched_yield`s a second at 100 k writes/s (see BENCHMARKS.md).
struct Helper {
    runs: Arc<Mutex<Vec<Batch>>>,
    thread: Thread,
}

impl Helper {
    fn hand(&self, run: Batch) {
        self.runs.lock().push(run);
        self.thread.unpark();
    }
}

impl Drop for Pacing {
    fn drop(&mut self) {
        self.unpark();
        for helper in self.helpers.get().map_or(&[][..], Vec::as_slice) {
            helper.thread.unpark();
        }
    }
}

/// Streams with their places in the walk: a tick's, one thread's run of them, or those
/// waiting for a look.
type Batch = Vec<(WriteOrder, Arc<dyn Paced>)>;

/// Cuts `taken` into `n` runs of consecutive streams, as even as can be, the longer ones
/// first (a tick of one stream stays with the pacer thread).
fn split(mut taken: Batch, n: usize) -> Vec<Batch> {
    let len = taken.len();
    let mut runs: Vec<Batch> = (1..n.max(1)).rev().map(|k| taken.split_off((len * k).div_ceil(n))).collect();
    runs.push(taken);
    runs.reverse();
    runs
}

impl Pacing {
    /// Pacing for the streams counted by `streams`: at most `budget` writes per second in
    /// total, and never an interval above `max`, written by up to `threads` threads. With
    /// a budget of 0 nothing is paced (every stream writes as fast as its client reads)
    /// and no thread is started.
    pub fn start(
        streams: Arc<StreamLimit>,
        budget: WriteBudget,
        max: Duration,
        threads: usize,
    ) -> std::io::Result<Arc<Pacing>> {
        let governor = Governor::new(budget);
        let pacing = Arc::new(Pacing {
            streams,
            budget,
            writes_per_second: AtomicU32::new(governor.writes_per_second()),
            max,
            epoch: Instant::now(),
            busy: Mutex::new(Walk::default()),
            ready: Mutex::new(Vec::new()),
            late: Mutex::new(Vec::new()),
            thread: OnceLock::new(),
            sleeping: AtomicBool::new(false),
            dormant: AtomicBool::new(false),
            helpers: OnceLock::new(),
        });
        if pacing.enabled() {
            let mut helpers = Vec::new();
            for h in 1..threads.max(1) {
                let runs = Arc::new(Mutex::new(Vec::new()));
                let (weak, inbox) = (Arc::downgrade(&pacing), Arc::clone(&runs));
                let handle = thread::Builder::new()
                    .name(format!("chat-pacer-{h}"))
                    .stack_size(256 * 1024)
                    .spawn(move || help(weak, inbox))?;
                helpers.push(Helper { runs, thread: handle.thread().clone() });
            }
            let _ = pacing.helpers.set(helpers);
            let weak = Arc::downgrade(&pacing);
            let handle = thread::Builder::new()
                .name("chat-pacer".into())
                .stack_size(256 * 1024)
                .spawn(move || run(weak, governor))?;
            let _ = pacing.thread.set(handle.thread().clone());
        }
        Ok(pacing)
    }

    /// True if busy streams are paced.
    pub fn enabled(&self) -> bool {
        self.budget.max > 0
    }

    /// Writes per second over all streams allowed now.
    pub fn writes_per_second(&self) -> u32 {
        self.writes_per_second.load(Ordering::Relaxed)
    }

    /// The time between two writes of a busy stream, now.
    pub fn interval(&self) -> Duration {
        let writes = self.writes_per_second();
        if writes == 0 {
            return Duration::ZERO;
        }
        let open = u32::try_from(self.streams.open()).unwrap_or(u32::MAX);
        (Duration::from_secs(1) / writes).saturating_mul(open).min(self.max)
    }

    /// Hands a stream that has just written to the pacer: it writes for it about once an
    /// interval until its `tick` returns false.
    pub(super) fn add(&self, order: WriteOrder, stream: Arc<dyn Paced>) {
        self.busy.lock().streams.insert(order, stream);
        self.wake_if_dormant();
    }

    /// Wakes the pacer thread if it sleeps for want of busy streams. Called after a
    /// stream was put in the walk or the late list: the pacer sets `dormant` before it
    /// looks at both, so either it sees the stream or this sees `dormant`.
    fn wake_if_dormant(&self) {
        if self.dormant.swap(false, Ordering::SeqCst) {
            self.unpark();
        }
    }

    /// True if any stream waits for a tick: in the walk, or late.
    fn has_busy_streams(&self) -> bool {
        !self.busy.lock().streams.is_empty() || !self.late.lock().is_empty()
    }

    /// Hands an idle stream whose queue got an item to the pacer: it is written as soon
    /// as the pacer gets to it, then about once an interval. For the threads that must
    /// not write themselves: gRPC's completion-queue threads, which run the unary
    /// handlers and must return at once.
    pub(super) fn ready(&self, order: WriteOrder, stream: Arc<dyn Paced>) {
        self.ready.lock().push((order, stream));
        if self.sleeping.swap(false, Ordering::SeqCst) {
            self.unpark();
        }
    }

    fn unpark(&self) {
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
    }

    /// Writes the streams made ready and puts the ones still busy in the walk.
    fn serve_ready(&self) {
        let ready = std::mem::take(&mut *self.ready.lock());
        self.tick_and_keep(ready, true);
    }

    /// Serves a tick: the walk's next streams for sixteenths `parts` of the interval.
    fn serve(&self, parts: &Range<usize>) {
        let late = std::mem::take(&mut *self.late.lock());
        self.tick_and_keep(late, false);
        // Out of the walk while they are written: a stream let go (idle) and at once
        // handed back by the thread that queued its next event stays in it.
        let taken = self.busy.lock().take(parts);
        let helpers = self.helpers.get().map_or(&[][..], Vec::as_slice);
        let threads = budget::threads_for(self.writes_per_second(), helpers.len() + 1);
        let mut runs = split(taken, threads).into_iter();
        let own = runs.next().unwrap_or_default();
        for (helper, run) in helpers.iter().zip(runs) {
            if !run.is_empty() {
                helper.hand(run);
            }
        }
        self.tick_and_keep(own, true);
    }

    /// Ticks `streams` and puts back the ones still busy: in the walk, or, with
    /// `first_look` and a write still in flight, in the list for the next tick. (A stream
    /// whose client does not read is thus looked at twice per interval, not every tick.)
    fn tick_and_keep(&self, streams: Batch, first_look: bool) {
        if streams.is_empty() {
            return;
        }
        let mut late = Vec::new();
        let mut kept = Vec::with_capacity(streams.len());
        for (order, stream) in streams {
            match stream.tick() {
                Ticked::Wrote => kept.push((order, stream)),
                Ticked::Waiting if first_look => late.push((order, stream)),
                Ticked::Waiting => kept.push((order, stream)),
                Ticked::LetGo => {}
            }
        }
        let (kept_any, late_any) = (!kept.is_empty(), !late.is_empty());
        if kept_any {
            self.busy.lock().streams.extend(kept);
        }
        if late_any {
            self.late.lock().extend(late);
        }
        // A helper puts back its run after the pacer thread may have found nothing busy.
        if kept_any || late_any {
            self.wake_if_dormant();
        }
    }

    /// Says the pacer is about to sleep; false if a stream made ready waits for it.
    fn may_sleep(&self) -> bool {
        self.sleeping.store(true, Ordering::SeqCst);
        self.ready.lock().is_empty()
    }
}

/// The pacer thread: writes the streams made ready, serves the ticks in turn, and moves
/// the budget with the machine's load, until the `Pacing` is dropped. With no busy
/// stream it sleeps until one is added or made ready; while the budget can still rise,
/// it also wakes for the governor's samples, so that a burst after a quiet spell finds
/// the budget the machine's load allows.
fn run(pacing: Weak<Pacing>, mut governor: Governor) {
    let mut last: Option<Instant> = None;
    let mut next_sample = Instant::now();
    loop {
        let Some(p) = pacing.upgrade() else { return };
        p.sleeping.store(false, Ordering::SeqCst);
        p.dormant.store(false, Ordering::SeqCst);
        p.serve_ready();
        let now = Instant::now();
        if governor.takes_samples() && now >= next_sample {
            next_sample = now + budget::SAMPLE;
            let times = CpuTimes::read();
            if times.is_none() {
                log::warn!("pacer: cannot read /proc/stat; the write budget stays at {}", p.budget.min);
            }
            let writes = governor.handle_sample(times);
            if writes != p.writes_per_second.swap(writes, Ordering::Relaxed) {
                log::trace!("pacer: {writes} writes/s");
            }
        }
        let tick = next_tick(p.epoch, last, now, p.interval()).filter(|_| p.has_busy_streams());
        let sleep = match tick {
            Some(Tick { at, parts }) if at <= now => {
                p.serve(&parts);
                last = Some(at);
                continue;
            }
            Some(Tick { at, .. }) => Some((at - now).min(MAX_SLEEP)),
            None => {
                p.dormant.store(true, Ordering::SeqCst);
                last = None;
                if p.has_busy_streams() {
                    if !p.interval().is_zero() {
                        // Added (or put back) just before that saw the pacer awake.
                        continue;
                    }
                    // In the walk, but no stream is open (their calls ended): no ticks
                    // until one is; look again later.
                    Some(MAX_SLEEP)
                } else {
                    governor.may_rise().then(|| next_sample.saturating_duration_since(now))
                }
            }
        };
        // From here on, a stream made ready or added unparks the thread (before or
        // during the sleep; an unpark before it makes it return at once).
        let may_sleep = p.may_sleep();
        drop(p);
        match sleep {
            _ if !may_sleep => {}
            Some(sleep) => thread::park_timeout(sleep),
            None => thread::park(),
        }
    }
}

/// A helper thread: writes the runs the pacer thread hands it, until the `Pacing` is
/// dropped. Runs handed before a `park` make it return at once (`unpark` leaves a token),
/// so none waits for the next hand-off; dropping the `Pacing` unparks it to end.
fn help(pacing: Weak<Pacing>, runs: Arc<Mutex<Vec<Batch>>>) {
    loop {
        let handed = std::mem::take(&mut *runs.lock());
        if handed.is_empty() {
            if pacing.strong_count() == 0 {
                return;
            }
            thread::park();
            continue;
        }
        let Some(p) = pacing.upgrade() else { return };
        for run in handed {
            p.tick_and_keep(run, true);
        }
    }
}

/// A tick: when, and which sixteenths of an interval it serves.
#[derive(Debug, PartialEq)]
struct Tick {
    at: Instant,
    parts: Range<usize>,
}

/// The tick to serve after the one at `last` (`None`: none served yet): the first point
/// after it on a grid that starts at `epoch`. Normally the grid's step is `interval /
/// TICKS` and each tick serves one sixteenth; when that step would be under
/// [`MIN_STEP`], each tick serves 2, 4, 8 or all 16 sixteenths and the step grows to match.
/// A pacer more than a whole interval behind skips to the latest tick at or before `now`
/// rather than racing through every missed one. `None` when `interval` is zero (no open
/// streams, or no pacing).
fn next_tick(epoch: Instant, last: Option<Instant>, now: Instant, interval: Duration) -> Option<Tick> {
    let mut per_tick = 1u32;
    while per_tick < TICKS && interval * per_tick / TICKS < MIN_STEP {
        per_tick *= 2;
    }
    let step = (interval * per_tick / TICKS).as_nanos();
    if step == 0 {
        return None;
    }
    let ticks_per_interval = u128::from(TICKS / per_tick);
    let index_at = |t: Instant| t.saturating_duration_since(epoch).as_nanos() / step;
    let current = index_at(now);
    let index = match last {
        Some(last) if current.saturating_sub(index_at(last)) <= ticks_per_interval => index_at(last) + 1,
        _ => current,
    };
    let at = epoch + Duration::from_nanos(u64::try_from(index * step).unwrap_or(u64::MAX));
    let first = (index % ticks_per_interval) as usize * per_tick as usize;
    Some(Tick { at, parts: first..first + per_tick as usize })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::service::Permit;
    use std::sync::atomic::AtomicU32;

    const MS: Duration = Duration::from_millis(1);

    /// A stream that stays busy for `busy_for` ticks and reports each tick.
    struct Fake {
        ticks: AtomicU32,
        busy_for: u32,
        seen: crossbeam_channel::Sender<u32>,
    }

    impl Paced for Fake {
        fn tick(&self) -> Ticked {
            let n = self.ticks.fetch_add(1, Ordering::SeqCst) + 1;
            let _ = self.seen.send(n);
            if n < self.busy_for {
                Ticked::Wrote
            } else {
                Ticked::LetGo
            }
        }
    }

    fn order(connection: u64, stream: u64) -> WriteOrder {
        WriteOrder { connection, stream: ConnId(stream) }
    }

    /// A stream for the walk's tests: always busy, never ticked.
    struct Busy;

    impl Paced for Busy {
        fn tick(&self) -> Ticked {
            Ticked::Wrote
        }
    }

    /// Takes the walk's streams for each sixteenth of `intervals` intervals, one tick at a
    /// time, and puts them back (as if still busy) before the next; returns their orders.
    fn walk_through(walk: &mut Walk, intervals: usize) -> Vec<Vec<WriteOrder>> {
        let mut ticks = Vec::new();
        for part in (0..TICKS as usize).cycle().take(TICKS as usize * intervals) {
            let taken = walk.take(&(part..part + 1));
            ticks.push(taken.iter().map(|(order, _)| *order).collect());
            walk.streams.extend(taken);
        }
        ticks
    }

    #[test]
    fn the_walk_writes_each_connections_streams_together_and_each_stream_once_per_interval() {
        let mut walk = Walk::default();
        // 40 streams over 4 connections, their ids interleaved as they are when clients
        // join at once.
        for id in 0..40 {
            walk.streams.insert(order(id % 4, id), Arc::new(Busy));
        }
        let ticks = walk_through(&mut walk, 2);
        for interval in ticks.chunks(TICKS as usize) {
            let sizes: Vec<_> = interval.iter().map(Vec::len).collect();
            assert!(sizes.iter().all(|&n| n == 2 || n == 3), "40 streams over 16 ticks: {sizes:?}");
            let walked: Vec<_> = interval.concat();
            let mut expected: Vec<_> = (0..40).map(|id| order(id % 4, id)).collect();
            expected.sort();
            assert_eq!(walked, expected, "by connection, then id, once each");
        }
        // Within a tick, one connection's streams come one after another.
        for tick in &ticks {
            let connections: Vec<_> = tick.iter().map(|o| o.connection).collect();
            assert!(connections.windows(2).all(|w| w[0] <= w[1]), "{tick:?}");
        }
    }

    #[test]
    fn with_fewer_streams_than_ticks_each_is_still_taken_once_per_interval() {
        let mut walk = Walk::default();
        for id in 0..5 {
            walk.streams.insert(order(7, id), Arc::new(Busy));
        }
        for interval in walk_through(&mut walk, 3).chunks(TICKS as usize) {
            let walked: Vec<_> = interval.concat();
            assert_eq!(walked, (0..5).map(|id| order(7, id)).collect::<Vec<_>>());
        }
    }

    #[test]
    fn streams_added_mid_walk_are_taken_when_the_walk_reaches_them() {
        let mut walk = Walk::default();
        for connection in [1, 3] {
            for id in 0..8 {
                walk.streams.insert(order(connection, connection * 100 + id), Arc::new(Busy));
            }
        }
        let tick = |walk: &mut Walk, part: usize| -> Vec<WriteOrder> {
            let taken = walk.take(&(part..part + 1));
            let orders = taken.iter().map(|(order, _)| *order).collect();
            walk.streams.extend(taken);
            orders
        };
        // Half an interval: connection 1's streams.
        let first_half: Vec<_> = (0..8).flat_map(|part| tick(&mut walk, part)).collect();
        assert_eq!(first_half, (100..108).map(|id| order(1, id)).collect::<Vec<_>>());
        // One stream joins behind the walk, one ahead of it.
        walk.streams.insert(order(0, 1), Arc::new(Busy));
        walk.streams.insert(order(2, 1), Arc::new(Busy));
        let second_half: Vec<_> = (8..16).flat_map(|part| tick(&mut walk, part)).collect();
        assert_eq!(second_half.first(), Some(&order(2, 1)), "the one ahead comes next: {second_half:?}");
        assert!(second_half.ends_with(&[order(3, 307)]), "{second_half:?}");
        assert!(!second_half.contains(&order(0, 1)), "the one behind waits: {second_half:?}");
        assert_eq!(tick(&mut walk, 0).first(), Some(&order(0, 1)), "and starts the next interval");
    }

    /// A stream whose write stays in flight for its first `waiting` ticks.
    struct Slow {
        ticks: AtomicU32,
        waiting: u32,
    }

    impl Paced for Slow {
        fn tick(&self) -> Ticked {
            if self.ticks.fetch_add(1, Ordering::SeqCst) < self.waiting {
                Ticked::Waiting
            } else {
                Ticked::Wrote
            }
        }
    }

    #[test]
    fn a_new_pacer_starts_at_the_top_of_a_budget_range() {
        if !std::path::Path::new("/proc/stat").exists() {
            return; // without CPU times the first sample puts the budget at its lowest
        }
        let streams = StreamLimit::new(2000);
        let held: Vec<_> = (0..1000).map(|_| streams.acquire().expect("under the limit")).collect();
        let budget = WriteBudget { min: 35_000, max: 100_000 };
        let pacing =
            Pacing::start(Arc::clone(&streams), budget, 50 * MS, 1).expect("the pacer thread starts");
        assert_eq!(pacing.writes_per_second(), 100_000, "not the lowest, 35 k");
        assert_eq!(pacing.interval(), 10 * MS, "1000 open streams at 100 k writes/s");
        drop(held);
        assert_eq!(pacing.interval(), Duration::ZERO, "no stream open");
    }

    #[test]
    fn a_stream_still_writing_at_its_turn_is_looked_at_again_on_the_next_tick_only() {
        // Unpaced, so no thread runs: the test serves the ticks itself.
        let pacing = Pacing::start(StreamLimit::new(10), WriteBudget::fixed(0), 50 * MS, 1)
            .expect("no thread to start");
        let late_once = Arc::new(Slow { ticks: AtomicU32::new(0), waiting: 1 });
        let stuck = Arc::new(Slow { ticks: AtomicU32::new(0), waiting: u32::MAX });
        pacing.add(order(0, 0), Arc::clone(&late_once) as Arc<dyn Paced>);
        pacing.add(order(0, 1), Arc::clone(&stuck) as Arc<dyn Paced>);
        for id in 2..16 {
            pacing.add(order(0, id), Arc::new(Busy));
        }
        let ticks = |s: &Arc<Slow>| s.ticks.load(Ordering::SeqCst);
        // 16 streams: each tick takes one, in order.
        pacing.serve(&(0..1));
        assert_eq!(ticks(&late_once), 1, "its turn: still in flight");
        pacing.serve(&(1..2));
        assert_eq!(ticks(&late_once), 2, "looked at again on the next tick, and written");
        assert_eq!(ticks(&stuck), 1, "its turn: still in flight");
        pacing.serve(&(2..3));
        assert_eq!(ticks(&stuck), 2, "looked at again on the next tick");
        for part in 3..16 {
            pacing.serve(&(part..part + 1));
        }
        assert_eq!((ticks(&late_once), ticks(&stuck)), (2, 2), "neither is looked at again before its turn");
        pacing.serve(&(0..1));
        pacing.serve(&(1..2));
        assert_eq!((ticks(&late_once), ticks(&stuck)), (3, 3), "the next interval: once more each");
        assert_eq!(pacing.busy.lock().streams.len() + pacing.late.lock().len(), 16, "no stream lost");
    }

    #[test]
    fn a_tick_is_cut_into_even_runs_in_walk_order() {
        for (len, n) in [(10, 3), (2, 3), (0, 3), (7, 1), (16, 4)] {
            let taken: Batch =
                (0..len).map(|id| (order(id % 2, id), Arc::new(Busy) as Arc<dyn Paced>)).collect();
            let runs = split(taken, n);
            assert_eq!(runs.len(), n);
            let sizes: Vec<usize> = runs.iter().map(Vec::len).collect();
            assert_eq!(sizes.iter().sum::<usize>(), len as usize, "{sizes:?}");
            assert!(sizes.windows(2).all(|w| w[0] >= w[1] && w[0] - w[1] <= 1), "{sizes:?}");
            let ids: Vec<u64> = runs.concat().iter().map(|(o, _)| o.stream.0).collect();
            assert_eq!(ids, (0..len).collect::<Vec<_>>(), "runs keep the walk's order");
        }
    }

    /// Like `Fake`, and remembers which thread made each tick.
    struct Named {
        ticks: AtomicU32,
        seen: crossbeam_channel::Sender<String>,
    }

    impl Paced for Named {
        fn tick(&self) -> Ticked {
            let name = thread::current().name().unwrap_or("?").to_string();
            let _ = self.seen.send(name);
            if self.ticks.fetch_add(1, Ordering::SeqCst) + 1 < 5 {
                Ticked::Wrote
            } else {
                Ticked::LetGo
            }
        }
    }

    /// Three pacer threads at 100 k writes/s (enough for all three: one per 40 k begun) with
    /// one stream open, after they wrote 30 `Named` streams to the end.
    struct ThirtyWritten {
        pacing: Arc<Pacing>,
        /// The open stream, which gives the pacing its interval.
        _open: Permit,
        fakes: Vec<Arc<Named>>,
        /// The threads that made the 150 ticks.
        ticked_on: Vec<String>,
        /// Where any later tick would be seen.
        names: crossbeam_channel::Receiver<String>,
    }

    fn three_threads_after_thirty_named_streams() -> ThirtyWritten {
        let streams = StreamLimit::new(10);
        let open = streams.acquire().expect("room for a stream");
        let pacing =
            Pacing::start(streams, WriteBudget::fixed(100_000), 50 * MS, 3).expect("the pacer threads start");
        let (seen, names) = crossbeam_channel::unbounded();
        let fakes: Vec<_> =
            (0..30).map(|_| Arc::new(Named { ticks: AtomicU32::new(0), seen: seen.clone() })).collect();
        for (id, fake) in fakes.iter().enumerate() {
            pacing.add(order(id as u64 % 3, id as u64), Arc::clone(fake) as Arc<dyn Paced>);
        }
        let ticked_on = (0..30 * 5)
            .map(|_| names.recv_timeout(Duration::from_secs(10)).expect("a tick within 10 s"))
            .collect();
        ThirtyWritten { pacing, _open: open, fakes, ticked_on, names }
    }

    #[test]
    fn helper_threads_share_the_ticks_and_every_stream_gets_all_of_its_own() {
        // All bound, so that the pacing lives to the end of the test.
        let ThirtyWritten { pacing: _pacing, _open, fakes, ticked_on, names } =
            three_threads_after_thirty_named_streams();
        assert!(ticked_on.iter().all(|name| name.starts_with("chat-pacer")), "ticked on {ticked_on:?}");
        assert!(fakes.iter().all(|f| f.ticks.load(Ordering::SeqCst) == 5), "each stream ticked 5 times");
        assert!(names.recv_timeout(20 * MS).is_err(), "no tick after every stream was let go");
        let threads: std::collections::BTreeSet<_> = ticked_on.iter().collect();
        assert!(threads.len() > 1, "only {threads:?} wrote");
    }

    #[test]
    fn helper_threads_end_when_the_pacing_is_dropped() {
        // Every stream was let go: the threads are idle (the helpers had runs to write, if
        // the ticks were shared, which they usually are).
        let ThirtyWritten { pacing, _open, .. } = three_threads_after_thirty_named_streams();
        // Each helper thread holds its slot until it returns.
        let slots: Vec<_> =
            pacing.helpers.get().expect("helpers").iter().map(|h| Arc::clone(&h.runs)).collect();
        assert_eq!(slots.len(), 2);
        assert!(
            slots.iter().all(|slot| Arc::strong_count(slot) == 3),
            "held by the pacing, its thread and us"
        );
        // Not needed for the test to pass, only for it to fail without the drop's unpark:
        // the helpers are then asleep with nothing to wake them.
        thread::sleep(20 * MS);
        drop(pacing);
        let deadline = Instant::now() + Duration::from_secs(10);
        while slots.iter().any(|slot| Arc::strong_count(slot) > 1) {
            assert!(Instant::now() < deadline, "a helper thread is still running 10 s after the drop");
            thread::sleep(MS);
        }
    }

    /// A stream whose first tick waits for the test to let it finish.
    struct Gate {
        ticks: AtomicU32,
        entered: crossbeam_channel::Sender<String>,
        release: crossbeam_channel::Receiver<()>,
        seen: crossbeam_channel::Sender<u32>,
    }
    impl Paced for Gate {
        fn tick(&self) -> Ticked {
            let n = self.ticks.fetch_add(1, Ordering::SeqCst) + 1;
            if n == 1 {
                let _ = self.entered.send(thread::current().name().unwrap_or_default().to_string());
                let _ = self.release.recv_timeout(Duration::from_secs(10));
                return Ticked::Wrote;
            }
            let _ = self.seen.send(n);
            Ticked::LetGo
        }
    }

    #[test]
    fn a_stream_a_helper_puts_back_wakes_the_pacer_that_found_none_busy() {
        let streams = StreamLimit::new(10);
        let _open = streams.acquire().expect("room for a stream");
        let pacing =
            Pacing::start(streams, WriteBudget::fixed(100_000), 50 * MS, 2).expect("the pacer threads start");
        let wait = Duration::from_secs(10);
        let (entered, entered_on) = crossbeam_channel::unbounded();
        let (let_go, release) = crossbeam_channel::unbounded();
        let (seen, ticks) = crossbeam_channel::unbounded();
        let gate = Arc::new(Gate { ticks: AtomicU32::new(0), entered, release, seen });
        let (done, _) = crossbeam_channel::unbounded();
        let once = Arc::new(Fake { ticks: AtomicU32::new(0), busy_for: 1, seen: done });
        // Both in the walk at once, so that one tick takes both and cuts them into two
        // runs: `once` for the pacer thread, which lets it go, `gate` for the helper.
        {
            let mut walk = pacing.busy.lock();
            walk.streams.insert(order(0, 1), once as Arc<dyn Paced>);
            walk.streams.insert(order(1, 2), Arc::clone(&gate) as Arc<dyn Paced>);
        }
        pacing.wake_if_dormant();
        assert_eq!(
            entered_on.recv_timeout(wait).as_deref(),
            Ok("chat-pacer-1"),
            "the helper writes the gate"
        );
        // With `once` let go and `gate` with the helper, the pacer finds nothing busy and
        // sleeps with no timeout (a fixed budget has no samples to take).
        let deadline = Instant::now() + wait;
        while !pacing.dormant.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the pacer thread did not go to sleep");
            thread::sleep(MS);
        }
        let_go.send(()).expect("the gate waits");
        assert_eq!(ticks.recv_timeout(wait), Ok(2), "the stream the helper put back was ticked again");
    }

    #[test]
    fn a_ready_stream_is_written_then_ticked_until_it_has_nothing_to_send() {
        let streams = StreamLimit::new(10);
        let _open = streams.acquire().expect("room for a stream");
        let pacing =
            Pacing::start(streams, WriteBudget::fixed(1000), 50 * MS, 1).expect("the pacer thread starts");
        let wait = Duration::from_secs(10);
        for conn in [1, 2, 7] {
            let (seen, ticks) = crossbeam_channel::unbounded();
            let fake = Arc::new(Fake { ticks: AtomicU32::new(0), busy_for: 3, seen });
            pacing.ready(order(conn % 2, conn), Arc::clone(&fake) as Arc<dyn Paced>);
            for expected in 1..=3 {
                assert_eq!(ticks.recv_timeout(wait), Ok(expected), "stream {conn}");
            }
            // Let go after the tick that found it idle: no fourth tick in several intervals.
            assert!(ticks.recv_timeout(20 * MS).is_err(), "stream {conn} ticked after it was let go");
        }
        let (seen, ticks) = crossbeam_channel::unbounded();
        let added = Arc::new(Fake { ticks: AtomicU32::new(1), busy_for: 3, seen });
        pacing.add(order(0, 9), added as Arc<dyn Paced>);
        assert_eq!(ticks.recv_timeout(wait), Ok(2), "an added stream is ticked");
        assert_eq!(ticks.recv_timeout(wait), Ok(3));
    }

    #[test]
    fn ticks_are_a_sixteenth_of_an_interval_apart_and_serve_the_sixteenths_in_turn() {
        let epoch = Instant::now();
        let interval = 16 * MS;
        let first = next_tick(epoch, None, epoch + 5 * MS, interval).expect("paced");
        assert_eq!(
            first,
            Tick { at: epoch + 5 * MS, parts: 5..6 },
            "the first tick is the latest one so far"
        );
        let mut at = first.at;
        let mut parts = vec![first.parts.start];
        for _ in 0..40 {
            let next = next_tick(epoch, Some(at), at, interval).unwrap();
            assert_eq!(next.at - at, MS);
            assert_eq!(next.parts.len(), 1);
            parts.push(next.parts.start);
            at = next.at;
        }
        for pair in parts.windows(2) {
            assert_eq!(pair[1], (pair[0] + 1) % TICKS as usize, "{parts:?}");
        }
    }

    #[test]
    fn a_late_pacer_serves_missed_ticks_in_order_unless_it_is_a_whole_interval_behind() {
        let epoch = Instant::now();
        let interval = 16 * MS;
        // 10 ticks late: the next one in order, already due.
        let last = epoch + 100 * MS;
        let tick = next_tick(epoch, Some(last), last + 10 * MS, interval).unwrap();
        assert_eq!(tick, Tick { at: epoch + 101 * MS, parts: 5..6 });
        // 40 ticks late: skip to the latest.
        let tick = next_tick(epoch, Some(last), last + 40 * MS, interval).unwrap();
        assert_eq!(tick, Tick { at: epoch + 140 * MS, parts: 12..13 });
    }

    #[test]
    fn a_changed_interval_moves_the_grid_and_no_interval_means_no_ticks() {
        let epoch = Instant::now();
        let last = epoch + 32 * MS;
        let tick = next_tick(epoch, Some(last), last, 32 * MS).unwrap();
        assert_eq!(tick.at, epoch + 34 * MS, "a step of 2 ms now");
        assert_eq!(next_tick(epoch, Some(last), last, Duration::ZERO), None);
    }

    #[test]
    fn short_intervals_serve_several_sixteenths_per_tick_and_each_once_per_interval() {
        let epoch = Instant::now();
        // 4 ms: a sixteenth would be 250 µs, just enough for one per tick.
        assert_eq!(next_tick(epoch, None, epoch, 4 * MS).unwrap().parts.len(), 1);
        for (interval, per_tick) in
            [(Duration::from_micros(3999), 2), (2 * MS, 2), (MS, 4), (100 * MS / 1000, 16)]
        {
            let mut at = epoch;
            let mut served = Vec::new();
            for _ in 0..(16 / per_tick) {
                let tick = next_tick(epoch, Some(at), at, interval).unwrap();
                assert_eq!(tick.parts.len(), per_tick as usize, "{interval:?}");
                assert!(
                    tick.at - at >= MIN_STEP || per_tick == 16,
                    "{interval:?}: ticks {:?} apart",
                    tick.at - at
                );
                served.extend(tick.parts);
                at = tick.at;
            }
            served.sort_unstable();
            assert_eq!(served, (0..16).collect::<Vec<_>>(), "{interval:?}");
        }
    }
}
