//! A swarm of chat members: many `Chat` streams spread over a few connections, their
//! receive sides driven by a few threads (no thread per member), every delivery
//! checked for loss, duplication and order.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::SinkExt;
use grpc_chat::pb;
use grpcio::{ClientDuplexReceiver, ClientDuplexSender, WriteFlags};
use parking_lot::Mutex;

use crate::h2wire::{H2Conns, StreamTx};
use crate::hist::{now_ns, with_local};
use crate::wire::{self, error_code, Conns, Incoming, Item};

/// Most gap positions remembered per member (beyond that, losses are only counted).
const MAX_TRACKED_GAPS: usize = 100_000;

/// One member: a unique user name in one room.
#[derive(Clone, Debug)]
pub struct MemberSpec {
    pub user: String,
    pub room: usize,
}

/// Counters the receive loops update and the main thread watches.
pub struct Shared {
    /// Set before the bench ends the streams, so that those ends are not failures.
    pub teardown: AtomicBool,
    pub welcomed: AtomicUsize,
    /// Streams that ended before their welcome (refused).
    pub refused: AtomicUsize,
    /// Streams that ended after their welcome, before teardown.
    pub cut_off: AtomicUsize,
    /// Streams that ended, for whatever reason.
    pub ended: AtomicUsize,
    /// New messages with `seq` above the welcome's `last_seq`.
    pub delivered: AtomicU64,
    /// New messages at or below the welcome's `last_seq` (history replay).
    pub replayed: AtomicU64,
    /// gRPC messages received (a batch counts once).
    pub grpc_messages: AtomicU64,
    pub duplicates: AtomicU64,
    pub reordered: AtomicU64,
    pub gaps: AtomicU64,
    /// Notices with a non-zero code (rejected posts), in total and per room.
    pub rejected: AtomicU64,
    pub room_rejected: Vec<AtomicU64>,
    /// Events that break the protocol (a message before the welcome, a second welcome).
    pub protocol_errors: AtomicU64,
    pub hello_ns: Vec<AtomicU64>,
    pub welcome_ns: Vec<AtomicU64>,
    /// When the member had every message up to its welcome's `last_seq` (0 = not yet).
    pub caught_up_ns: Vec<AtomicU64>,
    pub sessions: Mutex<Vec<String>>,
    /// Final status codes of streams that ended before teardown.
    pub end_codes: Mutex<BTreeMap<i32, usize>>,
    /// First error message seen per status code (for one-sentence diagnostics).
    pub end_messages: Mutex<BTreeMap<i32, String>>,
}

impl Shared {
    fn new(members: usize, rooms: usize) -> Shared {
        let zeros = |n| (0..n).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
        Shared {
            teardown: AtomicBool::new(false),
            welcomed: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            cut_off: AtomicUsize::new(0),
            ended: AtomicUsize::new(0),
            delivered: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            grpc_messages: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            reordered: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            room_rejected: zeros(rooms),
            protocol_errors: AtomicU64::new(0),
            hello_ns: zeros(members),
            welcome_ns: zeros(members),
            caught_up_ns: zeros(members),
            sessions: Mutex::new(vec![String::new(); members]),
            end_codes: Mutex::new(BTreeMap::new()),
            end_messages: Mutex::new(BTreeMap::new()),
        }
    }
}

/// What one member saw, for the final verification.
#[derive(Debug, Default)]
pub struct Outcome {
    pub id: usize,
    pub room: usize,
    pub welcomed: bool,
    pub welcome_last_seq: u64,
    /// Messages at or below this were not expected (before the retained history).
    pub base: u64,
    /// The next `seq` expected in order.
    pub next: u64,
    pub missing: BTreeSet<u64>,
    pub untracked_lost: u64,
    pub received: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub cut_off: bool,
    pub end_code: Option<i32>,
}

impl Outcome {
    /// Messages up to `final_seq` this member never received.
    pub fn lost(&self, final_seq: u64) -> u64 {
        if !self.welcomed {
            return 0;
        }
        let tail = final_seq.saturating_sub(self.next.saturating_sub(1));
        self.missing.len() as u64 + self.untracked_lost + tail
    }
}

fn on_message(o: &mut Outcome, sh: &Shared, seq: u64) -> bool {
    if seq <= o.base {
        return false;
    }
    let fresh = if seq == o.next {
        o.next += 1;
        true
    } else if seq > o.next {
        sh.gaps.fetch_add(1, Ordering::Relaxed);
        let gap = seq - o.next;
        if o.missing.len() + gap as usize <= MAX_TRACKED_GAPS {
            o.missing.extend(o.next..seq);
        } else {
            o.untracked_lost += gap;
        }
        o.next = seq + 1;
        true
    } else if o.missing.remove(&seq) {
        o.reordered += 1;
        sh.reordered.fetch_add(1, Ordering::Relaxed);
        true
    } else {
        o.duplicates += 1;
        sh.duplicates.fetch_add(1, Ordering::Relaxed);
        false
    };
    if fresh {
        o.received += 1;
    }
    fresh
}

pub fn handle(o: &mut Outcome, sh: &Shared, replay: bool, inc: Incoming) {
    let now = now_ns();
    let (mut live, mut old) = (0u64, 0u64);
    with_local(|h| {
        for item in inc.items {
            match item {
                Item::Welcome { session, last_seq, history_limit } => {
                    if o.welcomed {
                        sh.protocol_errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    o.welcomed = true;
                    o.welcome_last_seq = last_seq;
                    o.base = if replay && history_limit > 0 {
                        last_seq.saturating_sub(u64::from(history_limit))
                    } else if replay {
                        0
                    } else {
                        last_seq
                    };
                    o.next = o.base + 1;
                    sh.sessions.lock()[o.id] = session;
                    sh.welcome_ns[o.id].store(now, Ordering::Relaxed);
                    sh.welcomed.fetch_add(1, Ordering::Release);
                }
                Item::Message { seq, stamp_ns } => {
                    if !o.welcomed {
                        sh.protocol_errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if on_message(o, sh, seq) {
                        if seq > o.welcome_last_seq {
                            live += 1;
                            if let Some(t) = stamp_ns {
                                h.record(now.saturating_sub(t));
                            }
                        } else {
                            old += 1;
                        }
                    }
                }
                Item::Notice { code } if code != 0 => {
                    sh.rejected.fetch_add(1, Ordering::Relaxed);
                    sh.room_rejected[o.room].fetch_add(1, Ordering::Relaxed);
                }
                Item::Notice { .. } | Item::Other => {}
            }
        }
    });
    if o.welcomed && o.next > o.welcome_last_seq && sh.caught_up_ns[o.id].load(Ordering::Relaxed) == 0 {
        sh.caught_up_ns[o.id].store(now.max(1), Ordering::Relaxed);
    }
    sh.grpc_messages.fetch_add(1, Ordering::Relaxed);
    if live > 0 {
        sh.delivered.fetch_add(live, Ordering::Relaxed);
    }
    if old > 0 {
        sh.replayed.fetch_add(old, Ordering::Relaxed);
    }
}

/// Records the end of member `o`'s stream with status `code` (`None` = OK).
pub fn end_member(o: &mut Outcome, sh: &Shared, code: Option<i32>, message: Option<String>) {
    o.end_code = code;
    if !sh.teardown.load(Ordering::Relaxed) {
        if let (Some(c), Some(m)) = (code, message) {
            sh.end_messages.lock().entry(c).or_insert(m);
        }
        *sh.end_codes.lock().entry(code.unwrap_or(0)).or_insert(0) += 1;
        if o.welcomed {
            o.cut_off = true;
            sh.cut_off.fetch_add(1, Ordering::Relaxed);
        } else {
            sh.refused.fetch_add(1, Ordering::Relaxed);
        }
    }
    sh.ended.fetch_add(1, Ordering::Release);
}

async fn member_loop(
    id: usize,
    room: usize,
    replay: bool,
    mut rx: ClientDuplexReceiver<Incoming>,
    sh: Arc<Shared>,
) -> Outcome {
    let mut o = Outcome { id, room, ..Outcome::default() };
    let (code, message) = loop {
        match rx.next().await {
            Some(Ok(inc)) => handle(&mut o, &sh, replay, inc),
            Some(Err(e)) => break (Some(error_code(&e)), Some(e.to_string())),
            None => break (None, None),
        }
    };
    end_member(&mut o, &sh, code, message);
    o
}

/// The sending side of a member's stream.
pub enum Tx {
    Grpc(ClientDuplexSender<pb::ClientFrame>),
    H2(StreamTx),
}

/// The members of one run and their streams.
pub struct Swarm {
    pub shared: Arc<Shared>,
    pub members: Vec<MemberSpec>,
    pub rooms: Vec<String>,
    senders: Vec<Option<Tx>>,
    drivers: Vec<JoinHandle<Vec<Outcome>>>,
    /// The HTTP/2 connections of members that do not use grpcio.
    h2: Option<H2Conns>,
    /// Receive loops running on completion-queue threads, and where they report.
    spawned: (usize, Receiver<Outcome>),
}

type Part = Vec<(usize, usize, ClientDuplexReceiver<Incoming>)>;

/// A thread that drives the receive loops of `part` with one `block_on`.
fn spawn_driver(d: usize, part: Part, replay: bool, shared: &Arc<Shared>) -> JoinHandle<Vec<Outcome>> {
    let sh = shared.clone();
    std::thread::Builder::new()
        .name(format!("bench-recv-{d}"))
        .spawn(move || {
            let mut all: FuturesUnordered<_> = part
                .into_iter()
                .map(|(id, room, rx)| member_loop(id, room, replay, rx, sh.clone()))
                .collect();
            futures::executor::block_on(async move {
                let mut out = Vec::new();
                while let Some(o) = all.next().await {
                    out.push(o);
                }
                out
            })
        })
        .expect("spawning a receive thread")
}

impl Swarm {
    /// Opens one `Chat` stream per member over `conns` and starts `drivers` threads
    /// that receive on them (`0`: the receive loops run as futures on the grpcio
    /// completion-queue threads instead, which saves a thread wake-up per message).
    /// With `replay`, members expect the retained history.
    pub fn open(
        conns: &Conns,
        rooms: Vec<String>,
        members: Vec<MemberSpec>,
        drivers: usize,
        replay: bool,
    ) -> Swarm {
        Swarm::open_mixed(conns, None, |_| true, rooms, members, drivers, replay)
    }

    /// Like [`Swarm::open`], but with `h2` the members for which `grpc(i)` is false use
    /// the bench's own HTTP/2 client instead of grpcio (and cannot be publishers).
    pub fn open_mixed(
        conns: &Conns,
        mut h2: Option<H2Conns>,
        grpc: impl Fn(usize) -> bool,
        rooms: Vec<String>,
        members: Vec<MemberSpec>,
        drivers: usize,
        replay: bool,
    ) -> Swarm {
        let shared = Arc::new(Shared::new(members.len(), rooms.len()));
        let parts_n = drivers.clamp(1, members.len().max(1));
        let mut parts: Vec<Vec<_>> = (0..parts_n).map(|_| Vec::new()).collect();
        let mut senders = Vec::with_capacity(members.len());
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let mut spawned = 0;
        if let Some(h2) = h2.as_mut() {
            h2.start(&shared, replay);
        }
        for (i, m) in members.iter().enumerate() {
            if let Some(h2) = h2.as_ref().filter(|_| !grpc(i)) {
                senders.push(Some(Tx::H2(h2.stream(i, m.room))));
                continue;
            }
            match conns.open_chat(i) {
                Ok((tx, rx)) if drivers == 0 => {
                    senders.push(Some(Tx::Grpc(tx)));
                    spawned += 1;
                    let (sh, done, room) = (shared.clone(), done_tx.clone(), m.room);
                    // Never blocks: the loop only awaits the stream and updates counters.
                    conns.client(i).spawn(async move {
                        let _ = done.send(member_loop(i, room, replay, rx, sh).await);
                    });
                }
                Ok((tx, rx)) => {
                    senders.push(Some(Tx::Grpc(tx)));
                    parts[i % parts_n].push((i, m.room, rx));
                }
                Err(_) => {
                    senders.push(None);
                    shared.ended.fetch_add(1, Ordering::Relaxed);
                    shared.refused.fetch_add(1, Ordering::Relaxed);
                    *shared.end_codes.lock().entry(-1).or_insert(0) += 1;
                }
            }
        }
        let handles = parts
            .into_iter()
            .enumerate()
            .filter(|(_, part)| !part.is_empty())
            .map(|(d, part)| spawn_driver(d, part, replay, &shared))
            .collect();
        Swarm { shared, members, rooms, senders, drivers: handles, h2, spawned: (spawned, done_rx) }
    }

    /// Sends `frame(i)` on every stream that has one, `window` at a time.
    fn send_all(&mut self, window: usize, frame: impl Fn(usize) -> Option<pb::ClientFrame>) {
        let mut pending = FuturesUnordered::new();
        let mut idx = 0;
        let n = self.senders.len();
        futures::executor::block_on(async {
            loop {
                while pending.len() < window && idx < n {
                    let i = idx;
                    idx += 1;
                    let (Some(f), Some(tx)) = (frame(i), self.senders[i].take()) else {
                        continue;
                    };
                    // The first frame of a stream is its hello: remember when it left.
                    let _ = self.shared.hello_ns[i].compare_exchange(
                        0,
                        now_ns(),
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    match tx {
                        Tx::Grpc(mut tx) => pending.push(async move {
                            let r = tx.send((f, WriteFlags::default())).await;
                            (i, Tx::Grpc(tx), r.is_ok())
                        }),
                        // A blocking write of a few bytes; a failure shows as the stream's end.
                        Tx::H2(mut tx) => {
                            if tx.send(&f).is_ok() {
                                self.senders[i] = Some(Tx::H2(tx));
                            }
                        }
                    }
                }
                match pending.next().await {
                    Some((i, tx, _result)) => self.senders[i] = Some(tx),
                    None => break,
                }
            }
        });
    }

    /// Sends every member's `hello` (implicit join), at most `window` in flight.
    pub fn hello_all(&mut self, window: usize) {
        let frames: Vec<_> = self.members.iter().map(|m| wire::hello(&m.user, &self.rooms[m.room])).collect();
        self.send_all(window, |i| Some(frames[i].clone()));
    }

    /// Streams that are welcomed or refused, compared with all.
    pub fn settled(&self) -> (usize, usize) {
        let sh = &self.shared;
        let done = sh.welcomed.load(Ordering::Acquire) + sh.refused.load(Ordering::Acquire);
        (done, self.members.len())
    }

    /// Waits until every stream was welcomed or refused; false on timeout.
    pub fn wait_settled(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let (done, all) = self.settled();
            if done >= all {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits until no member has received anything for `quiet` (the presence of the
    /// joins has arrived), at most `timeout`; returns the seconds waited.
    pub fn wait_quiet(&self, quiet: Duration, timeout: Duration) -> f64 {
        let start = Instant::now();
        let mut seen = self.shared.grpc_messages.load(Ordering::Acquire);
        let mut since = start;
        while since.elapsed() < quiet && start.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(5));
            let now = self.shared.grpc_messages.load(Ordering::Acquire);
            if now != seen {
                seen = now;
                since = Instant::now();
            }
        }
        start.elapsed().as_secs_f64()
    }

    /// Takes member `i`'s sending side (for a publisher).
    pub fn take_sender(&mut self, i: usize) -> Option<ClientDuplexSender<pb::ClientFrame>> {
        match self.senders[i].take() {
            Some(Tx::Grpc(tx)) => Some(tx),
            other => {
                self.senders[i] = other;
                None
            }
        }
    }

    /// Gives back a sender taken with `take_sender`.
    pub fn put_sender(&mut self, i: usize, tx: ClientDuplexSender<pb::ClientFrame>) {
        self.senders[i] = Some(Tx::Grpc(tx));
    }

    /// Members currently welcomed in each room.
    pub fn welcomed_per_room(&self) -> Vec<u64> {
        let mut per = vec![0u64; self.rooms.len()];
        for (i, m) in self.members.iter().enumerate() {
            if self.shared.welcome_ns[i].load(Ordering::Relaxed) != 0 {
                per[m.room] += 1;
            }
        }
        per
    }

    /// Ends every stream (a `leave`, then cancellation of what is left) and returns
    /// what each member saw, ordered by member.
    pub fn finish(mut self, grace: Duration) -> Vec<Outcome> {
        self.shared.teardown.store(true, Ordering::SeqCst);
        let leave = pb::ClientFrame { frame: Some(pb::client_frame::Frame::Leave(pb::Leave {})) };
        self.send_all(256, |_| Some(leave.clone()));
        let deadline = Instant::now() + grace;
        while self.shared.ended.load(Ordering::Acquire) < self.members.len() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        for tx in self.senders.iter_mut().flatten() {
            match tx {
                Tx::Grpc(tx) => tx.cancel(),
                Tx::H2(tx) => tx.cancel(),
            }
        }
        self.senders.clear();
        let mut all: Vec<Outcome> = Vec::with_capacity(self.members.len());
        for h in self.drivers.drain(..) {
            all.extend(h.join().expect("a receive thread panicked"));
        }
        if let Some(h2) = self.h2.take() {
            all.extend(h2.close());
        }
        let (n, rx) = &self.spawned;
        for _ in 0..*n {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(o) => all.push(o),
                Err(_) => break,
            }
        }
        all.sort_by_key(|o| o.id);
        all
    }
}

/// Totals of a verification.
#[derive(Debug, Default, Clone)]
pub struct Verdict {
    pub checked: usize,
    pub lost: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub cut_off: usize,
    /// The status each cut-off member's stream ended with (0 = OK), and how many.
    pub cut_off_codes: BTreeMap<i32, usize>,
    pub received: u64,
}

impl Verdict {
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.duplicates == 0 && self.reordered == 0 && self.cut_off == 0
    }

    /// The `verify` section of a report; `rejected_posts` only where posts are counted.
    pub fn report(&self, rejected_posts: Option<u64>, protocol_errors: u64, ok: bool) -> crate::report::Obj {
        let mut obj = crate::report::Obj::new()
            .set("members_checked", self.checked)
            .set("received", self.received)
            .set("lost", self.lost)
            .set("duplicates", self.duplicates)
            .set("reordered", self.reordered)
            .set("cut_off", self.cut_off);
        if !self.cut_off_codes.is_empty() {
            let mut codes = crate::report::Obj::new();
            for (code, n) in &self.cut_off_codes {
                codes.push(&wire::code_name(*code), *n);
            }
            obj = obj.set("cut_off_codes", codes);
        }
        if let Some(rejected) = rejected_posts {
            obj = obj.set("rejected_posts", rejected);
        }
        obj.set("protocol_errors", protocol_errors).set("ok", ok)
    }
}

/// Checks every welcomed member against the last `seq` of its room.
pub fn verify(outcomes: &[Outcome], final_seq: impl Fn(&Outcome) -> u64) -> Verdict {
    let mut v = Verdict::default();
    for o in outcomes.iter().filter(|o| o.welcomed) {
        v.checked += 1;
        v.lost += o.lost(final_seq(o));
        v.duplicates += o.duplicates;
        v.reordered += o.reordered;
        v.received += o.received;
        if o.cut_off {
            v.cut_off += 1;
            *v.cut_off_codes.entry(o.end_code.unwrap_or(0)).or_insert(0) += 1;
        }
    }
    v
}

/// The highest `seq` any member of each room saw.
pub fn max_seq_per_room(outcomes: &[Outcome], rooms: usize) -> Vec<u64> {
    let mut max = vec![0u64; rooms];
    for o in outcomes.iter().filter(|o| o.welcomed) {
        let seen = o.next.saturating_sub(1);
        max[o.room] = max[o.room].max(seen).max(o.welcome_last_seq);
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(next: u64, end_code: Option<i32>, cut_off: bool) -> Outcome {
        Outcome { welcomed: true, next, end_code, cut_off, ..Outcome::default() }
    }

    #[test]
    fn a_verdict_counts_cut_off_members_by_the_status_that_ended_them() {
        let outcomes = [
            member(11, None, false),
            member(4, Some(8), true),
            member(7, Some(8), true),
            member(2, Some(14), true),
            Outcome { welcomed: false, end_code: Some(8), ..Outcome::default() },
        ];
        let v = verify(&outcomes, |_| 10);
        assert_eq!(v.checked, 4);
        assert_eq!(v.cut_off, 3);
        assert_eq!(v.cut_off_codes, BTreeMap::from([(8, 2), (14, 1)]));
        assert_eq!(v.lost, 7 + 4 + 9, "each cut-off member lost what came after its last seq");
        assert!(!v.clean());
        let json: String = crate::report::to_json(&v.report(None, 0, false)).split_whitespace().collect();
        assert!(json.contains(r#""cut_off_codes":{"RESOURCE_EXHAUSTED":2,"UNAVAILABLE":1}"#), "{json}");

        let v = verify(&outcomes[..1], |_| 10);
        assert!(v.clean() && v.cut_off_codes.is_empty());
        assert!(!crate::report::to_json(&v.report(None, 0, true)).contains("cut_off_codes"));
    }
}
