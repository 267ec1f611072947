//! `join`: N clients join, all at once, a room whose history is full and replay it;
//! time from each hello to the last history message, and the replay verified.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Args;
use futures::executor::block_on;
use futures::SinkExt;
use grpcio::WriteFlags;

use crate::fanout::join_swarm;
use crate::hist::{Hist, Summary};
use crate::report::{latency, Obj, Progress};
use crate::swarm::{self, MemberSpec, Swarm};
use crate::target::{Needs, Target};
use crate::wire::{post, stamped_text};
use crate::{connect, run_id, verified, Global, Outcome};

/// Options of the `join` scenario.
#[derive(Args, Debug)]
pub struct JoinArgs {
    /// Clients that join at once.
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// Messages posted before the joins (the server should retain them all).
    #[arg(long, default_value_t = 500)]
    pub history: usize,
    /// Size of each history message in bytes.
    #[arg(long, default_value_t = 64)]
    pub bytes: usize,
}

impl JoinArgs {
    pub fn needs(&self) -> Needs {
        Needs { max_streams: Some(10_000.max(self.clients + 64)), history: Some(self.history.max(500)) }
    }
}

/// Fills `room` with `n` messages from one member; returns the room's last `seq`.
fn prefill(
    conns: &crate::wire::Conns,
    g: &Global,
    id: &str,
    room: &str,
    a: &JoinArgs,
) -> Result<u64, String> {
    let members = vec![MemberSpec { user: format!("{id}-filler"), room: 0 }];
    let mut filler = Swarm::open(conns, vec![room.to_string()], members, 1, false);
    join_swarm(&mut filler, g, "filler")?;
    let sh = filler.shared.clone();
    let mut tx = filler.take_sender(0).ok_or("the filler stream could not be opened")?;
    for k in 0..a.history {
        let frame = post(stamped_text(0, a.bytes.max(17)), format!("fill-{k}"));
        if let Err(e) = block_on(tx.feed((frame, WriteFlags::default()))) {
            filler.finish(Duration::from_millis(200));
            return Err(format!("the server ended the filler stream while prefilling: {e}"));
        }
    }
    let _ = block_on(tx.flush());
    let deadline = Instant::now() + g.timeout();
    while (sh.delivered.load(Ordering::Relaxed) + sh.rejected.load(Ordering::Relaxed)) < a.history as u64 {
        if Instant::now() >= deadline || sh.cut_off.load(Ordering::Relaxed) > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let rejected = sh.rejected.load(Ordering::Relaxed);
    let got = sh.delivered.load(Ordering::Relaxed);
    filler.put_sender(0, tx);
    let outcomes = filler.finish(Duration::from_secs(2));
    if rejected > 0 {
        return Err(format!(
            "the server rejected {rejected} of {} prefill posts (is its rate limit on?)",
            a.history
        ));
    }
    if got < a.history as u64 {
        return Err(format!("only {got} of {} prefill posts came back within the timeout", a.history));
    }
    Ok(outcomes.first().map_or(0, |o| o.next.saturating_sub(1)))
}

/// Runs the scenario.
pub fn run(a: &JoinArgs, g: &Global, target: &Target) -> Outcome {
    if a.clients == 0 {
        return Outcome::Refused("--clients must be at least 1".into());
    }
    let conns = match connect(target, g) {
        Ok(c) => c,
        Err(e) => return Outcome::Refused(e),
    };
    let id = run_id();
    let room = format!("{id}-j");
    let t = Instant::now();
    let last_seq = match prefill(&conns, g, &id, &room, a) {
        Ok(s) => s,
        Err(e) => return Outcome::Refused(e),
    };
    let prefill_secs = t.elapsed().as_secs_f64();

    let members: Vec<MemberSpec> =
        (0..a.clients).map(|i| MemberSpec { user: format!("{id}-j{i}"), room: 0 }).collect();
    let mut swarm = Swarm::open(&conns, vec![room], members, g.drivers(), true);
    let sh = swarm.shared.clone();
    let progress = {
        let sh = sh.clone();
        let n = a.clients;
        Progress::start(!g.quiet, move || {
            let done = sh.caught_up_ns.iter().filter(|c| c.load(Ordering::Relaxed) != 0).count();
            format!("join: welcomed {}/{n}, replayed {done}/{n}", sh.welcomed.load(Ordering::Relaxed))
        })
    };
    let t = Instant::now();
    if let Err(e) = join_swarm(&mut swarm, g, "joining") {
        drop(progress);
        swarm.finish(Duration::from_millis(500));
        return Outcome::Refused(e);
    }
    let deadline = Instant::now() + g.timeout();
    loop {
        let done = sh.caught_up_ns.iter().filter(|c| c.load(Ordering::Relaxed) != 0).count();
        if done >= a.clients || Instant::now() >= deadline || sh.cut_off.load(Ordering::Relaxed) > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let all_secs = t.elapsed().as_secs_f64();
    let mut to_welcome = Hist::default();
    let mut to_last = Hist::default();
    let mut incomplete = 0usize;
    for i in 0..a.clients {
        let hello = sh.hello_ns[i].load(Ordering::Relaxed);
        let welcome = sh.welcome_ns[i].load(Ordering::Relaxed);
        let caught = sh.caught_up_ns[i].load(Ordering::Relaxed);
        if welcome > 0 {
            to_welcome.record(welcome.saturating_sub(hello));
        }
        if caught > 0 {
            to_last.record(caught.saturating_sub(hello));
        } else {
            incomplete += 1;
        }
    }
    drop(progress);
    let replayed = sh.replayed.load(Ordering::Relaxed);
    let protocol_errors = sh.protocol_errors.load(Ordering::Relaxed);
    let outcomes = swarm.finish(Duration::from_secs(2));
    let verdict = swarm::verify(&outcomes, |o| o.welcome_last_seq);
    let retained: Vec<u64> =
        outcomes.iter().filter(|o| o.welcomed).map(|o| o.welcome_last_seq - o.base).collect();
    let expected_each = retained.iter().copied().min().unwrap_or(0);
    let short_history = expected_each < a.history as u64;
    let ok = verdict.clean() && incomplete == 0 && protocol_errors == 0;
    let report = Obj::new()
        .set("scenario", "join")
        .set("server", target.describe())
        .set(
            "setup",
            Obj::new()
                .set("clients", a.clients)
                .set("history", a.history)
                .set("bytes", a.bytes.max(17))
                .set("connections", g.connections)
                .set("drivers", g.drivers()),
        )
        .set("prefill_secs", (prefill_secs * 1000.0).round() / 1000.0)
        .set("room_last_seq", last_seq)
        .set("history_replayed_per_client", expected_each)
        .set("server_retains_less_than_prefilled", short_history)
        .set("all_replayed_secs", (all_secs * 1000.0).round() / 1000.0)
        .set("replayed_messages", replayed)
        .set("incomplete", incomplete)
        .set("hello_to_welcome", latency(&Summary::of(&to_welcome)))
        .set("hello_to_last_history", latency(&Summary::of(&to_last)))
        .set("verify", verdict.report(None, protocol_errors, ok));
    Outcome::Done { report, verdict: verified(ok) }
}
