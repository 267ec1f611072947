//! Paced writes. A stream that has just written is handed to the pacer thread, which
//! writes for it on its tick group's next tick everything that queued meanwhile, as one
//! batch, and lets go of it (idle again) once a tick finds nothing to send.
//!
//! Each gRPC write costs a C-core operation and a `sendmsg`; when every busy stream's
//! thread woke up to make its own write, the wake-up cost as much again. One thread
//! that walks a tick group's streams makes those writes without a wake-up each: measured
//! on 2 cores at 500 k deliveries/s this took the server from about 1.0 to 0.7 cores and
//! kept the latency steady at twice the write rate (see BENCHMARKS.md). An idle
//! stream's first write is made at once by the thread that queued its event, or, when
//! that is a gRPC handler, by the pacer as soon as it gets to it (`ready`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::service::StreamLimit;
use crate::core::ConnId;

/// How many tick groups busy streams are spread over (by stream id). Each group's ticks
/// sit `1/TICK_GROUPS` of an interval after the previous group's, so the pacer writes for
/// a sixteenth of the busy streams at a time instead of all of them in one burst, which
/// added the length of the burst to the median latency.
pub const TICK_GROUPS: u32 = 16;

/// The longest the pacer thread sleeps before it looks at the interval again.
const MAX_SLEEP: Duration = Duration::from_millis(20);

/// The shortest time between two ticks. A sleep takes at least ~60 µs (the kernel's timer
/// slack), so with short intervals (few streams) each tick serves several groups at once
/// instead of one group per sleep, which would stretch the interval sixteenfold.
const MIN_STEP: Duration = Duration::from_micros(250);

/// A stream the pacer writes for.
pub(super) trait Paced: Send + Sync {
    /// Called on the stream's ticks (and once when it is made ready): writes what is
    /// queued if the previous write is done. Returns false when the pacer should let go
    /// of the stream (nothing was left to send, the call broke, or the stream's thread
    /// took its writes back).
    fn tick(&self) -> bool;
}

/// The write budget and the pacer's groups. `interval()` grows with the number of open
/// streams so that all of them together stay near `writes_per_second`.
pub struct Pacing {
    streams: Arc<StreamLimit>,
    per_stream: Duration,
    max: Duration,
    /// Where the tick grid starts.
    epoch: Instant,
    groups: Vec<Mutex<Vec<Arc<dyn Paced>>>>,
    /// Idle streams to write as soon as the pacer gets to them (see [`Pacing::ready`]),
    /// with the ids that pick their groups.
    ready: Mutex<Vec<(ConnId, Arc<dyn Paced>)>>,
    /// The pacer thread; whether it sleeps (then a stream made ready wakes it); and
    /// whether it sleeps for want of open streams (then a stream added wakes it too: its
    /// first tick must not wait for the end of that sleep).
    thread: OnceLock<Thread>,
    sleeping: AtomicBool,
    dormant: AtomicBool,
}

impl Pacing {
    /// Pacing for the streams counted by `streams`: at most `writes_per_second` writes in
    /// total, and never an interval above `max`. With `writes_per_second` 0 nothing is
    /// paced (every stream writes as fast as its client reads) and no thread is started.
    pub fn start(
        streams: Arc<StreamLimit>,
        writes_per_second: u32,
        max: Duration,
    ) -> std::io::Result<Arc<Pacing>> {
        let per_stream =
            if writes_per_second == 0 { Duration::ZERO } else { Duration::from_secs(1) / writes_per_second };
        let groups = (0..TICK_GROUPS).map(|_| Mutex::new(Vec::new())).collect();
        let pacing = Arc::new(Pacing {
            streams,
            per_stream,
            max,
            epoch: Instant::now(),
            groups,
            ready: Mutex::new(Vec::new()),
            thread: OnceLock::new(),
            sleeping: AtomicBool::new(false),
            dormant: AtomicBool::new(false),
        });
        if pacing.enabled() {
            let weak = Arc::downgrade(&pacing);
            let handle = thread::Builder::new()
                .name("chat-pacer".into())
                .stack_size(256 * 1024)
                .spawn(move || run(weak))?;
            let _ = pacing.thread.set(handle.thread().clone());
        }
        Ok(pacing)
    }

    /// True if busy streams are paced.
    pub fn enabled(&self) -> bool {
        !self.per_stream.is_zero()
    }

    /// The time between two writes of a busy stream, now.
    pub fn interval(&self) -> Duration {
        let open = u32::try_from(self.streams.open()).unwrap_or(u32::MAX);
        self.per_stream.saturating_mul(open).min(self.max)
    }

    /// Hands stream `conn`, which has just written, to the pacer: it writes for it on its
    /// group's ticks until its `tick` returns false.
    pub(super) fn add(&self, conn: ConnId, stream: Arc<dyn Paced>) {
        self.groups[group_of(conn)].lock().push(stream);
        if self.dormant.swap(false, Ordering::SeqCst) {
            self.unpark();
        }
    }

    /// Hands idle stream `conn`, whose queue got an item, to the pacer: it is written as
    /// soon as the pacer gets to it, then on its group's ticks. For the threads that must
    /// not write themselves: gRPC's completion-queue threads, which run the unary
    /// handlers and must return at once.
    pub(super) fn ready(&self, conn: ConnId, stream: Arc<dyn Paced>) {
        self.ready.lock().push((conn, stream));
        if self.sleeping.swap(false, Ordering::SeqCst) {
            self.unpark();
        }
    }

    fn unpark(&self) {
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
    }

    /// Writes the streams made ready and puts the ones still busy in their groups.
    fn serve_ready(&self) {
        let ready = std::mem::take(&mut *self.ready.lock());
        for (conn, stream) in ready {
            if stream.tick() {
                self.groups[group_of(conn)].lock().push(stream);
            }
        }
    }

    /// Serves one group's tick.
    fn serve(&self, group: usize) {
        // Streams added meanwhile go into the emptied list and are kept.
        let members = std::mem::take(&mut *self.groups[group].lock());
        let kept: Vec<_> = members.into_iter().filter(|m| m.tick()).collect();
        self.groups[group].lock().extend(kept);
    }

    /// Says the pacer is about to sleep; false if a stream made ready waits for it.
    fn may_sleep(&self) -> bool {
        self.sleeping.store(true, Ordering::SeqCst);
        self.ready.lock().is_empty()
    }
}

fn group_of(conn: ConnId) -> usize {
    (conn.get() % u64::from(TICK_GROUPS)) as usize
}

/// The pacer thread: writes the streams made ready, and serves the groups' ticks in
/// turn, until the `Pacing` is dropped.
fn run(pacing: Weak<Pacing>) {
    let mut last: Option<Instant> = None;
    loop {
        let Some(p) = pacing.upgrade() else { return };
        p.sleeping.store(false, Ordering::SeqCst);
        p.dormant.store(false, Ordering::SeqCst);
        p.serve_ready();
        let now = Instant::now();
        let sleep = match next_tick(p.epoch, last, now, p.interval()) {
            Some(Tick { at, groups }) if at <= now => {
                groups.for_each(|group| p.serve(group));
                last = Some(at);
                continue;
            }
            Some(Tick { at, .. }) => (at - now).min(MAX_SLEEP),
            None => {
                p.dormant.store(true, Ordering::SeqCst);
                last = None;
                // A stream added just before that saw the pacer awake: look again.
                if !p.interval().is_zero() {
                    continue;
                }
                MAX_SLEEP
            }
        };
        // From here on, a stream made ready or added unparks the thread (before or
        // during the sleep; an unpark before it makes it return at once).
        let may_sleep = p.may_sleep();
        drop(p);
        if may_sleep {
            thread::park_timeout(sleep);
        }
    }
}

/// A tick: when, and which groups it serves.
#[derive(Debug, PartialEq)]
struct Tick {
    at: Instant,
    groups: std::ops::Range<usize>,
}

/// The tick to serve after the one at `last` (`None`: none served yet): the first point
/// after it on a grid that starts at `epoch`. Normally the grid's step is `interval /
/// TICK_GROUPS` and each tick serves one group; when that step would be under
/// [`MIN_STEP`], each tick serves 2, 4, 8 or all 16 groups and the step grows to match.
/// A pacer more than a whole interval behind skips to the latest tick at or before `now`
/// rather than racing through every missed one. `None` when `interval` is zero (no open
/// streams, or no pacing).
fn next_tick(epoch: Instant, last: Option<Instant>, now: Instant, interval: Duration) -> Option<Tick> {
    let mut per_tick = 1u32;
    while per_tick < TICK_GROUPS && interval * per_tick / TICK_GROUPS < MIN_STEP {
        per_tick *= 2;
    }
    let step = (interval * per_tick / TICK_GROUPS).as_nanos();
    if step == 0 {
        return None;
    }
    let ticks_per_interval = u128::from(TICK_GROUPS / per_tick);
    let index_at = |t: Instant| t.saturating_duration_since(epoch).as_nanos() / step;
    let current = index_at(now);
    let index = match last {
        Some(last) if current.saturating_sub(index_at(last)) <= ticks_per_interval => index_at(last) + 1,
        _ => current,
    };
    let at = epoch + Duration::from_nanos(u64::try_from(index * step).unwrap_or(u64::MAX));
    let first = (index % ticks_per_interval) as usize * per_tick as usize;
    Some(Tick { at, groups: first..first + per_tick as usize })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    const MS: Duration = Duration::from_millis(1);

    /// A stream that stays busy for `busy_for` ticks and reports each tick.
    struct Fake {
        ticks: AtomicU32,
        busy_for: u32,
        seen: crossbeam_channel::Sender<u32>,
    }

    impl Paced for Fake {
        fn tick(&self) -> bool {
            let n = self.ticks.fetch_add(1, Ordering::SeqCst) + 1;
            let _ = self.seen.send(n);
            n < self.busy_for
        }
    }

    #[test]
    fn a_ready_stream_is_written_then_ticked_until_it_has_nothing_to_send() {
        let streams = StreamLimit::new(10);
        let _open = streams.acquire().expect("room for a stream");
        let pacing = Pacing::start(streams, 1000, 50 * MS).expect("the pacer thread starts");
        let wait = Duration::from_secs(10);
        for conn in [1, 2, 7] {
            let (seen, ticks) = crossbeam_channel::unbounded();
            let fake = Arc::new(Fake { ticks: AtomicU32::new(0), busy_for: 3, seen });
            pacing.ready(ConnId(conn), Arc::clone(&fake) as Arc<dyn Paced>);
            for expected in 1..=3 {
                assert_eq!(ticks.recv_timeout(wait), Ok(expected), "stream {conn}");
            }
            // Let go after the tick that found it idle: no fourth tick in several intervals.
            assert!(ticks.recv_timeout(20 * MS).is_err(), "stream {conn} ticked after it was let go");
        }
        let (seen, ticks) = crossbeam_channel::unbounded();
        let added = Arc::new(Fake { ticks: AtomicU32::new(1), busy_for: 3, seen });
        pacing.add(ConnId(9), added as Arc<dyn Paced>);
        assert_eq!(ticks.recv_timeout(wait), Ok(2), "an added stream is ticked on its group's ticks");
        assert_eq!(ticks.recv_timeout(wait), Ok(3));
    }

    #[test]
    fn ticks_are_a_sixteenth_of_an_interval_apart_and_walk_through_the_groups() {
        let epoch = Instant::now();
        let interval = 16 * MS;
        let first = next_tick(epoch, None, epoch + 5 * MS, interval).expect("paced");
        assert_eq!(
            first,
            Tick { at: epoch + 5 * MS, groups: 5..6 },
            "the first tick is the latest one so far"
        );
        let mut at = first.at;
        let mut groups = vec![first.groups.start];
        for _ in 0..40 {
            let next = next_tick(epoch, Some(at), at, interval).unwrap();
            assert_eq!(next.at - at, MS);
            assert_eq!(next.groups.len(), 1);
            groups.push(next.groups.start);
            at = next.at;
        }
        for pair in groups.windows(2) {
            assert_eq!(pair[1], (pair[0] + 1) % TICK_GROUPS as usize, "{groups:?}");
        }
    }

    #[test]
    fn a_late_pacer_serves_missed_ticks_in_order_unless_it_is_a_whole_interval_behind() {
        let epoch = Instant::now();
        let interval = 16 * MS;
        // 10 ticks late: the next one in order, already due.
        let last = epoch + 100 * MS;
        let tick = next_tick(epoch, Some(last), last + 10 * MS, interval).unwrap();
        assert_eq!(tick, Tick { at: epoch + 101 * MS, groups: 5..6 });
        // 40 ticks late: skip to the latest.
        let tick = next_tick(epoch, Some(last), last + 40 * MS, interval).unwrap();
        assert_eq!(tick, Tick { at: epoch + 140 * MS, groups: 12..13 });
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
    fn short_intervals_serve_several_groups_per_tick_and_every_group_once_per_interval() {
        let epoch = Instant::now();
        // 4 ms: a sixteenth would be 250 µs, just enough for one group per tick.
        assert_eq!(next_tick(epoch, None, epoch, 4 * MS).unwrap().groups.len(), 1);
        for (interval, per_tick) in
            [(Duration::from_micros(3999), 2), (2 * MS, 2), (MS, 4), (100 * MS / 1000, 16)]
        {
            let mut at = epoch;
            let mut served = Vec::new();
            for _ in 0..(16 / per_tick) {
                let tick = next_tick(epoch, Some(at), at, interval).unwrap();
                assert_eq!(tick.groups.len(), per_tick as usize, "{interval:?}");
                assert!(
                    tick.at - at >= MIN_STEP || per_tick == 16,
                    "{interval:?}: ticks {:?} apart",
                    tick.at - at
                );
                served.extend(tick.groups);
                at = tick.at;
            }
            served.sort_unstable();
            assert_eq!(served, (0..16).collect::<Vec<_>>(), "{interval:?}");
        }
    }
}
