//! `fanout`: R rooms × M members, P of them publishing N messages of B bytes at an
//! offered rate (or a ramp of rates); end-to-end latency and verified delivery.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use clap::Args;
use futures::executor::block_on;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::SinkExt;
use grpc_chat::pb;
use grpcio::{ClientDuplexSender, WriteFlags};

use crate::h2wire::H2Conns;
use crate::hist::{now_ns, take_all, Summary};
use crate::report::{latency, Obj, Progress, Val};
use crate::swarm::{self, MemberSpec, Swarm};
use crate::target::{cpu_secs, Needs, Target};
use crate::wire::{code_name, error_code, post, stamped_text};
use crate::{connect, run_id, verified, Global, Outcome, PublishVia, Receivers, VERIFICATION_FAILED};

/// Options of the `fanout` scenario.
#[derive(Args, Debug)]
pub struct FanoutArgs {
    /// Number of rooms.
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,
    /// Members per room (publishers included).
    #[arg(long, default_value_t = 100)]
    pub members: usize,
    /// Publishing members in total, spread over the rooms (default: one per room).
    #[arg(long)]
    pub publishers: Option<usize>,
    /// Messages to publish in total (fixed-rate mode).
    #[arg(long, default_value_t = 10_000)]
    pub messages: u64,
    /// Size of each message text in bytes (at least 17: a time stamp leads the text).
    #[arg(long, default_value_t = 64)]
    pub bytes: usize,
    /// Offered rate in messages per second over all publishers (0 = as fast as possible).
    /// With --ramp: the first step's rate.
    #[arg(long, default_value_t = 10_000.0)]
    pub rate: f64,
    /// How publishers post.
    #[arg(long, value_enum, default_value_t = PublishVia::Post)]
    pub via: PublishVia,
    /// Threads that publish.
    #[arg(long, default_value_t = 1)]
    pub pub_threads: usize,
    /// Unary Send calls in flight per publishing thread (--via send).
    #[arg(long, default_value_t = 256)]
    pub window: usize,
    /// Increase the offered rate step by step; report the highest sustainable one.
    #[arg(long)]
    pub ramp: bool,
    /// Factor between ramp steps.
    #[arg(long, default_value_t = 1.5)]
    pub ramp_factor: f64,
    /// Most ramp steps.
    #[arg(long, default_value_t = 12)]
    pub ramp_steps: usize,
    /// Seconds of publishing per ramp step.
    #[arg(long, default_value_t = 5.0)]
    pub step_secs: f64,
    /// A ramp step is sustainable only if its p99 latency stays below this.
    #[arg(long, default_value_t = 100.0)]
    pub max_p99_ms: f64,
    /// Seconds without any new delivery after which missing deliveries count as lost.
    #[arg(long, default_value_t = 5.0)]
    pub drain_secs: f64,
}

impl FanoutArgs {
    pub fn needs(&self) -> Needs {
        let streams = self.rooms * self.members;
        Needs { max_streams: Some(10_000.max(streams + 64)), history: None }
    }
}

/// A publishing member.
struct Publisher {
    member: usize,
    room: usize,
    tx: Option<ClientDuplexSender<pb::ClientFrame>>,
    session: String,
    stub: pb::ChatClient,
    next_id: u64,
}

struct PhaseCfg {
    rate: f64,
    count: u64,
    bytes: usize,
    via: PublishVia,
    window: usize,
    t0: u64,
    publishers: usize,
}

/// How the report names the posts a publisher skipped because its stream had ended.
const NOT_SENT: &str = "NOT_SENT_STREAM_ENDED";

#[derive(Default)]
struct PubStats {
    ok_per_room: Vec<u64>,
    errors: u64,
    /// Failed posts and calls by status name, and the posts not sent ([`NOT_SENT`]).
    codes: BTreeMap<String, u64>,
    last_ns: u64,
}

impl PubStats {
    fn fail(&mut self, e: &grpcio::Error) {
        self.count(code_name(error_code(e)));
    }
    fn count(&mut self, what: String) {
        self.errors += 1;
        *self.codes.entry(what).or_insert(0) += 1;
    }
    fn merge(&mut self, o: PubStats) {
        for (a, b) in self.ok_per_room.iter_mut().zip(o.ok_per_room) {
            *a += b;
        }
        self.errors += o.errors;
        for (c, n) in o.codes {
            *self.codes.entry(c).or_insert(0) += n;
        }
        self.last_ns = self.last_ns.max(o.last_ns);
    }
}

type Reply = (usize, grpcio::Result<pb::SendReply>);

fn reap(done: Reply, st: &mut PubStats) {
    match done {
        (room, Ok(_)) => st.ok_per_room[room] += 1,
        (_, Err(e)) => st.fail(&e),
    }
}

/// Publishes this thread's share of one phase: message `k` belongs to publisher
/// `k % P` and is due at `t0 + k / rate`; its stamp is that intended time, so a
/// publisher falling behind shows up as latency (no coordinated omission).
fn publish(pubs: &mut [Publisher], first: usize, cfg: &PhaseCfg, rooms: usize, sent: &AtomicU64) -> PubStats {
    let mut st = PubStats { ok_per_room: vec![0; rooms], ..PubStats::default() };
    let mut inflight = FuturesUnordered::new();
    let waker = futures::task::noop_waker_ref();
    let mut round = 0u64;
    'outer: loop {
        for (j, p) in pubs.iter_mut().enumerate() {
            let k = round * cfg.publishers as u64 + (first + j) as u64;
            if k >= cfg.count {
                break 'outer;
            }
            let due = if cfg.rate > 0.0 { cfg.t0 + (k as f64 * 1e9 / cfg.rate) as u64 } else { 0 };
            let now = now_ns();
            if due > now {
                let mut cx = Context::from_waker(waker);
                while let Poll::Ready(Some(done)) = inflight.poll_next_unpin(&mut cx) {
                    reap(done, &mut st);
                }
                std::thread::sleep(Duration::from_nanos(due - now));
            }
            let stamp = if due > 0 { due } else { now_ns() };
            let text = stamped_text(stamp, cfg.bytes);
            let id = format!("{}", p.next_id);
            p.next_id += 1;
            match cfg.via {
                PublishVia::Post => {
                    let Some(tx) = p.tx.as_mut() else {
                        st.count(NOT_SENT.to_string());
                        continue;
                    };
                    match block_on(tx.feed((post(text, id), WriteFlags::default()))) {
                        Ok(()) => st.ok_per_room[p.room] += 1,
                        Err(e) => {
                            st.fail(&e);
                            p.tx = None;
                        }
                    }
                }
                PublishVia::Send => {
                    while inflight.len() >= cfg.window.max(1) {
                        if let Some(done) = block_on(inflight.next()) {
                            reap(done, &mut st);
                        }
                    }
                    let req = pb::SendRequest { session: p.session.clone(), text, client_msg_id: id };
                    match p.stub.send_async(&req) {
                        Ok(f) => {
                            let room = p.room;
                            inflight.push(async move { (room, f.await) });
                        }
                        Err(e) => st.fail(&e),
                    }
                }
            }
            sent.fetch_add(1, Ordering::Relaxed);
        }
        round += 1;
    }
    for p in pubs.iter_mut() {
        if let Some(tx) = p.tx.as_mut() {
            if let Err(e) = block_on(tx.flush()) {
                st.fail(&e);
                p.tx = None;
            }
        }
    }
    while let Some(done) = block_on(inflight.next()) {
        reap(done, &mut st);
    }
    st.last_ns = now_ns();
    st
}

/// What one phase (the whole fixed-rate run, or one ramp step) measured.
struct Phase {
    rate: f64,
    sent: u64,
    errors: u64,
    codes: BTreeMap<String, u64>,
    expected: u64,
    delivered: u64,
    publish_secs: f64,
    deliver_secs: f64,
    latency: Summary,
    cut_off: usize,
    duplicates: u64,
    reordered: u64,
    grpc_messages: u64,
    cpu: Cpu,
}

/// The CPU the server and the load generator used during a phase, in cores (CPU seconds
/// per second of the phase), read from `/proc`. `server` is `None` when its process
/// cannot be observed (an external server without `--server-pid`); with an in-process
/// server, `bench` covers both and `server` is `None`.
#[derive(Clone, Copy, Debug, Default)]
struct Cpu {
    server: Option<f64>,
    bench: Option<f64>,
}

/// CPU seconds of the server (if observable apart from the bench) and of the bench.
#[derive(Clone, Copy)]
struct CpuMark {
    at: Instant,
    server: Option<f64>,
    bench: Option<f64>,
}

impl CpuMark {
    fn now(server_pid: Option<u32>) -> CpuMark {
        let me = std::process::id();
        let server_pid = server_pid.filter(|&pid| pid != me);
        CpuMark { at: Instant::now(), server: server_pid.and_then(cpu_secs), bench: cpu_secs(me) }
    }

    fn cores_since(&self, start: &CpuMark) -> Cpu {
        let secs = (self.at - start.at).as_secs_f64().max(1e-3);
        let cores = |a: Option<f64>, b: Option<f64>| Some(((a? - b?) / secs * 100.0).round() / 100.0);
        Cpu { server: cores(self.server, start.server), bench: cores(self.bench, start.bench) }
    }
}

/// Why a ramp step at `rate` msg/s was not sustainable, or `None` if it was: everything
/// delivered, no member cut off, no failed post, p99 within `--max-p99-ms`, and the
/// publishers kept up with the offered rate.
fn unsustainable(p: &Phase, rate: f64, a: &FanoutArgs) -> Option<String> {
    let kept_up = p.sent as f64 >= 0.95 * rate * p.publish_secs.min(a.step_secs);
    if p.cut_off > 0 {
        Some(format!("cut off {} members", p.cut_off))
    } else if p.shortfall() > 0 {
        Some(format!("left {} deliveries missing", p.shortfall()))
    } else if p.errors > 0 {
        Some(format!("had {} failed posts", p.errors))
    } else if p.duplicates > 0 || p.reordered > 0 {
        Some(format!("had {} duplicated and {} reordered deliveries", p.duplicates, p.reordered))
    } else if p.latency.p99 > a.max_p99_ms {
        Some(format!("had p99 {:.1} ms, over --max-p99-ms {}", p.latency.p99, a.max_p99_ms))
    } else if !kept_up {
        Some(format!("published only {} messages in {:.1} s", p.sent, p.publish_secs))
    } else {
        None
    }
}

impl Phase {
    fn shortfall(&self) -> u64 {
        self.expected.saturating_sub(self.delivered)
    }
    fn to_obj(&self) -> Obj {
        let per_s = |n: u64, s: f64| if s > 0.0 { (n as f64 / s).round() } else { 0.0 };
        let mut o = Obj::new()
            .set("offered_rate", self.rate)
            .set("sent", self.sent)
            .set("achieved_rate", per_s(self.sent, self.publish_secs))
            .set("expected_deliveries", self.expected)
            .set("deliveries", self.delivered)
            .set("deliveries_per_s", per_s(self.delivered, self.deliver_secs))
            .set("missing", self.shortfall())
            .set(
                "deliveries_per_grpc_message",
                (self.delivered as f64 / self.grpc_messages.max(1) as f64 * 100.0).round() / 100.0,
            )
            .set("publish_errors", self.errors)
            .set("cut_off", self.cut_off)
            .set("duplicates", self.duplicates)
            .set("reordered", self.reordered);
        if !self.codes.is_empty() {
            let mut c = Obj::new();
            for (what, n) in &self.codes {
                c.push(what, *n);
            }
            o.push("publish_error_codes", c);
        }
        o.push("latency", latency(&self.latency));
        let mut cpu = Obj::new();
        if let Some(c) = self.cpu.server {
            cpu.push("server", c);
        }
        if let Some(c) = self.cpu.bench {
            cpu.push(if self.cpu.server.is_some() { "load_generator" } else { "bench_process" }, c);
        }
        o.push("cpu_cores", cpu);
        o
    }
}

struct Run<'a> {
    args: &'a FanoutArgs,
    swarm: Swarm,
    pubs: Vec<Publisher>,
    threads: usize,
    welcomed_per_room: Vec<u64>,
    ok_per_room: Vec<u64>,
    sent: Arc<AtomicU64>,
    server_pid: Option<u32>,
}

impl Run<'_> {
    fn expected(&self) -> u64 {
        let sh = &self.swarm.shared;
        (0..self.ok_per_room.len())
            .map(|r| {
                let ok = self.ok_per_room[r].saturating_sub(sh.room_rejected[r].load(Ordering::Relaxed));
                ok * self.welcomed_per_room[r]
            })
            .sum()
    }

    fn phase(&mut self, rate: f64, count: u64, drain: Duration, timeout: Duration) -> Phase {
        let sh = self.swarm.shared.clone();
        let before = (
            sh.delivered.load(Ordering::Relaxed),
            self.expected(),
            sh.cut_off.load(Ordering::Relaxed),
            sh.duplicates.load(Ordering::Relaxed),
            sh.reordered.load(Ordering::Relaxed),
            sh.grpc_messages.load(Ordering::Relaxed),
        );
        take_all();
        let cpu_start = CpuMark::now(self.server_pid);
        let cfg = PhaseCfg {
            rate,
            count,
            bytes: self.args.bytes.max(17),
            via: self.args.via,
            window: self.args.window,
            t0: now_ns() + 1_000_000,
            publishers: self.pubs.len(),
        };
        let rooms = self.ok_per_room.len();
        let per = self.pubs.len().div_ceil(self.threads);
        let sent = &self.sent;
        let sent_before = sent.load(Ordering::Relaxed);
        let mut stats = PubStats { ok_per_room: vec![0; rooms], ..PubStats::default() };
        std::thread::scope(|s| {
            let handles: Vec<_> = self
                .pubs
                .chunks_mut(per)
                .enumerate()
                .map(|(c, chunk)| {
                    let cfg = &cfg;
                    std::thread::Builder::new()
                        .name(format!("bench-pub-{c}"))
                        .spawn_scoped(s, move || publish(chunk, c * per, cfg, rooms, sent))
                        .expect("spawning a publisher thread")
                })
                .collect();
            for h in handles {
                stats.merge(h.join().expect("a publisher thread panicked"));
            }
        });
        for (a, b) in self.ok_per_room.iter_mut().zip(&stats.ok_per_room) {
            *a += b;
        }
        // Wait for the deliveries: until all arrived, or none arrived for `drain`.
        // `done_ns` ends up as the time the last delivery was seen (within 1 ms).
        let mut last = sh.delivered.load(Ordering::Relaxed);
        let mut last_change = Instant::now();
        let deadline = Instant::now() + timeout.max(drain);
        let mut done_ns = now_ns();
        loop {
            let d = sh.delivered.load(Ordering::Relaxed);
            if d != last {
                last = d;
                last_change = Instant::now();
                done_ns = now_ns();
            }
            if d >= self.expected() {
                done_ns = now_ns();
                break;
            }
            if last_change.elapsed() >= drain || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let cpu = CpuMark::now(self.server_pid).cores_since(&cpu_start);
        let expected = self.expected() - before.1;
        let delivered = sh.delivered.load(Ordering::Relaxed) - before.0;
        let secs = |ns: u64| ns.saturating_sub(cfg.t0) as f64 / 1e9;
        Phase {
            rate,
            sent: sent.load(Ordering::Relaxed) - sent_before,
            errors: stats.errors,
            codes: stats.codes,
            expected,
            delivered,
            publish_secs: secs(stats.last_ns),
            deliver_secs: secs(done_ns),
            latency: Summary::of(&take_all()),
            cut_off: sh.cut_off.load(Ordering::Relaxed) - before.2,
            duplicates: sh.duplicates.load(Ordering::Relaxed) - before.3,
            reordered: sh.reordered.load(Ordering::Relaxed) - before.4,
            grpc_messages: sh.grpc_messages.load(Ordering::Relaxed) - before.5,
            cpu,
        }
    }
}

/// Joins every member; `Err` is the refusal to report.
pub fn join_swarm(swarm: &mut Swarm, g: &Global, what: &str) -> Result<f64, String> {
    let t = Instant::now();
    swarm.hello_all(512);
    let settled = swarm.wait_settled(g.timeout());
    let secs = t.elapsed().as_secs_f64();
    let sh = &swarm.shared;
    let (welcomed, refused) = (sh.welcomed.load(Ordering::Relaxed), sh.refused.load(Ordering::Relaxed));
    if refused > 0 {
        let msgs = sh.end_messages.lock();
        let why = msgs
            .iter()
            .next()
            .map_or_else(|| "no status".to_string(), |(c, m)| format!("{}: {m}", code_name(*c)));
        return Err(format!(
            "the server refused {refused} of {} {what} streams ({why})",
            swarm.members.len()
        ));
    }
    if !settled {
        return Err(format!(
            "only {welcomed} of {} {what} streams were welcomed within {:.0} s",
            swarm.members.len(),
            g.timeout().as_secs_f64()
        ));
    }
    Ok(secs)
}

/// Runs the scenario.
pub fn run(a: &FanoutArgs, g: &Global, target: &Target) -> Outcome {
    if a.rooms == 0 || a.members == 0 {
        return Outcome::Refused("--rooms and --members must be at least 1".into());
    }
    let publishers = a.publishers.unwrap_or(a.rooms).clamp(1, a.rooms * a.members);
    let conns = match connect(target, g) {
        Ok(c) => c,
        Err(e) => return Outcome::Refused(e),
    };
    let id = run_id();
    let rooms: Vec<String> = (0..a.rooms).map(|r| format!("{id}-f{r}")).collect();
    let members: Vec<MemberSpec> = (0..a.rooms * a.members)
        .map(|i| MemberSpec { user: format!("{id}-m{i}"), room: i / a.members })
        .collect();
    let h2 = match g.receivers {
        Receivers::Grpcio => None,
        Receivers::H2 => {
            let wait = g.timeout().min(Duration::from_secs(10));
            let poll = Duration::from_micros(g.h2_poll_us);
            match H2Conns::connect(target.addr(), g.connections, wait, g.drivers(), poll) {
                Ok(h) => Some(h),
                Err(e) => return Outcome::Refused(e),
            }
        }
    };
    // Publisher j is member j / R of room j % R (below), so member i publishes when
    // (i % M) * R + i / M < P.
    let publishes = |i: usize| (i % a.members) * a.rooms + i / a.members < publishers;
    let mut swarm = Swarm::open_mixed(&conns, h2, publishes, rooms, members, g.drivers(), false);
    let sh = swarm.shared.clone();
    let sent = Arc::new(AtomicU64::new(0));
    let total = swarm.members.len();
    let progress = {
        let (sh, sent) = (sh.clone(), sent.clone());
        Progress::start(!g.quiet, move || {
            format!(
                "fanout: welcomed {}/{total}, sent {}, delivered {}",
                sh.welcomed.load(Ordering::Relaxed),
                sent.load(Ordering::Relaxed),
                sh.delivered.load(Ordering::Relaxed)
            )
        })
    };
    let join_secs = match join_swarm(&mut swarm, g, "member") {
        Ok(s) => s,
        Err(e) => {
            swarm.finish(Duration::from_millis(500));
            return Outcome::Refused(e);
        }
    };
    // Members are welcomed before the presence of later joins reaches them; in rooms with
    // presence, messages published at once would queue behind that backlog and measure the
    // joins, not the fan-out.
    let settle_secs = swarm.wait_quiet(Duration::from_millis(200), g.timeout());
    // Publisher j is member j / R of room j % R.
    let mut pubs = Vec::with_capacity(publishers);
    for j in 0..publishers {
        let room = j % a.rooms;
        let member = room * a.members + j / a.rooms;
        let session = sh.sessions.lock()[member].clone();
        if a.via == PublishVia::Send && session.is_empty() {
            swarm.finish(Duration::from_millis(500));
            return Outcome::Refused(
                "the server's welcome carried no session token, so Send cannot be used".into(),
            );
        }
        let tx = swarm.take_sender(member);
        pubs.push(Publisher { member, room, tx, session, stub: conns.stub(member).clone(), next_id: 0 });
    }
    let welcomed_per_room = swarm.welcomed_per_room();
    let mut run = Run {
        args: a,
        swarm,
        pubs,
        threads: a.pub_threads.clamp(1, publishers),
        welcomed_per_room,
        ok_per_room: vec![0; a.rooms],
        sent,
        server_pid: target.pid(),
    };
    let drain = Duration::from_secs_f64(a.drain_secs.max(0.1));
    let mut phases = Vec::new();
    let mut best: Option<usize> = None;
    if a.ramp {
        let mut rate = if a.rate > 0.0 { a.rate } else { 1000.0 };
        for _ in 0..a.ramp_steps.max(1) {
            let count = (rate * a.step_secs).ceil().max(1.0) as u64;
            let p = run.phase(rate, count, drain, g.timeout());
            let why_not = unsustainable(&p, rate, a);
            let pass = why_not.is_none();
            phases.push((p, why_not));
            if !pass {
                break;
            }
            best = Some(phases.len() - 1);
            rate *= a.ramp_factor.max(1.01);
        }
    } else {
        let p = run.phase(a.rate, a.messages, drain, g.timeout());
        phases.push((p, None));
    }
    drop(progress);
    let Run { swarm, pubs, ok_per_room, .. } = run;
    let mut swarm = swarm;
    let pub_members: Vec<(usize, usize)> = pubs.iter().map(|p| (p.member, p.room)).collect();
    for p in pubs {
        if let Some(tx) = p.tx {
            swarm.put_sender(p.member, tx);
        }
    }
    let protocol_errors = sh.protocol_errors.load(Ordering::Relaxed);
    let rejected = sh.rejected.load(Ordering::Relaxed);
    let outcomes = swarm.finish(Duration::from_secs(2));
    let seen = swarm::max_seq_per_room(&outcomes, a.rooms);
    // A room's last `seq` is what its publishers had accepted; when a publisher was cut
    // off, its unanswered posts may never have been accepted, so only what some
    // member saw counts (the cut-off itself fails the run).
    let mut publisher_cut = vec![false; a.rooms];
    for &(m, r) in &pub_members {
        publisher_cut[r] |= outcomes.get(m).is_some_and(|o| o.id == m && o.cut_off);
    }
    let final_seq: Vec<u64> = (0..a.rooms)
        .map(|r| {
            let ok = ok_per_room[r].saturating_sub(sh.room_rejected[r].load(Ordering::Relaxed));
            if publisher_cut[r] {
                seen[r]
            } else {
                seen[r].max(ok)
            }
        })
        .collect();
    let verdict = swarm::verify(&outcomes, |o| final_seq[o.room]);

    let mut report = Obj::new()
        .set("scenario", "fanout")
        .set("server", target.describe())
        .set(
            "setup",
            Obj::new()
                .set("rooms", a.rooms)
                .set("members_per_room", a.members)
                .set("publishers", publishers)
                .set("bytes", a.bytes.max(17))
                .set("via", format!("{:?}", a.via).to_lowercase())
                .set("connections", g.connections)
                .set("receivers", format!("{:?}", g.receivers).to_lowercase())
                .set("drivers", g.drivers())
                .set("mode", if a.ramp { "ramp" } else { "fixed" }),
        )
        .set("join_secs", (join_secs * 1000.0).round() / 1000.0)
        .set("settle_secs", (settle_secs * 1000.0).round() / 1000.0);
    let result = if a.ramp {
        let steps: Vec<Val> = phases
            .iter()
            .map(|(p, why_not)| {
                let mut o = p.to_obj();
                o.push("p99_ms", (p.latency.p99 * 1000.0).round() / 1000.0);
                o.push("sustainable", why_not.is_none());
                if let Some(why) = why_not {
                    o.push("why_not", why.as_str());
                }
                Val::Obj(o.0)
            })
            .collect();
        report.push("steps", Val::Arr(steps));
        match best {
            Some(i) => {
                let p = &phases[i].0;
                report.push(
                    "best",
                    Obj::new()
                        .set("offered_rate", p.rate)
                        .set("deliveries_per_s", (p.delivered as f64 / p.deliver_secs.max(1e-9)).round())
                        .set("p99_ms", p.latency.p99),
                );
            }
            None => report.push("best", "none: the first step was not sustainable"),
        }
        // Past the sustainable rate members may be cut off and miss messages; what must
        // never happen at any rate is a duplicate, a reordering or a malformed event.
        let ok = verdict.duplicates == 0 && verdict.reordered == 0 && protocol_errors == 0;
        report.push("verify", verdict.report(Some(rejected), protocol_errors, ok));
        match (&phases[0], best) {
            _ if !ok => Err(VERIFICATION_FAILED.to_owned()),
            ((first, Some(why)), None) => {
                Err(format!("no step of the ramp was sustainable: the first, at {} msg/s, {why}", first.rate))
            }
            _ => Ok(()),
        }
    } else {
        let p = &phases[0].0;
        for (k, v) in p.to_obj().0 {
            report.push(&k, v);
        }
        let ok = verdict.clean() && rejected == 0 && protocol_errors == 0 && p.errors == 0;
        report.push("verify", verdict.report(Some(rejected), protocol_errors, ok));
        verified(ok)
    };
    Outcome::Done { report, verdict: result }
}
