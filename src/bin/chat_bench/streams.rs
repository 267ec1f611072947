//! `streams`: N members join and hold `Chat` streams; how many were accepted, how
//! fast, and what they cost the server in memory and threads.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Args;

use crate::report::{Obj, Progress};
use crate::swarm::{MemberSpec, Swarm};
use crate::target::{Needs, ProcStat, Target};
use crate::wire::code_name;
use crate::{connect, run_id, verified, Global, Outcome};

/// Options of the `streams` scenario.
#[derive(Args, Debug)]
pub struct StreamsArgs {
    /// Streams to open (each a member with its own user name).
    #[arg(long, default_value_t = 1000)]
    pub streams: usize,
    /// Rooms the members are spread over.
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,
    /// Seconds to hold the streams before measuring the server again.
    #[arg(long, default_value_t = 1.0)]
    pub hold_secs: f64,
    /// Stream limit of a server the bench starts (default: the server's 10 000, so
    /// that a larger run shows refusals).
    #[arg(long)]
    pub max_streams: Option<usize>,
}

impl StreamsArgs {
    pub fn needs(&self) -> Needs {
        Needs { max_streams: self.max_streams, history: None }
    }
}

fn stat_delta(before: Option<ProcStat>, after: Option<ProcStat>, accepted: usize) -> Obj {
    let mut o = Obj::new();
    if let Some(b) = before {
        o.push("before", b.to_obj());
    }
    if let Some(a) = after {
        o.push("holding", a.to_obj());
    }
    if let (Some(b), Some(a)) = (before, after) {
        let rss = a.rss_kb as i64 - b.rss_kb as i64;
        o.push("rss_delta_kb", rss);
        o.push("threads_delta", a.threads as i64 - b.threads as i64);
        if accepted > 0 {
            o.push("rss_per_stream_kb", (rss as f64 / accepted as f64 * 100.0).round() / 100.0);
        }
    }
    o
}

/// Runs the scenario. `bench_start` is this process before any server was started.
pub fn run(a: &StreamsArgs, g: &Global, target: &Target, bench_start: Option<ProcStat>) -> Outcome {
    if a.streams == 0 || a.rooms == 0 {
        return Outcome::Refused("--streams and --rooms must be at least 1".into());
    }
    let conns = match connect(target, g) {
        Ok(c) => c,
        Err(e) => return Outcome::Refused(e),
    };
    let server_before = target.stat();
    let bench_before = ProcStat::read(std::process::id());
    let id = run_id();
    let rooms: Vec<String> = (0..a.rooms).map(|r| format!("{id}-s{r}")).collect();
    let members: Vec<MemberSpec> =
        (0..a.streams).map(|i| MemberSpec { user: format!("{id}-s{i}"), room: i % a.rooms }).collect();
    let mut swarm = Swarm::open(&conns, rooms, members, g.drivers(), false);
    let sh = swarm.shared.clone();
    let progress = {
        let sh = sh.clone();
        let n = a.streams;
        Progress::start(!g.quiet, move || {
            format!(
                "streams: welcomed {}/{n}, refused {}",
                sh.welcomed.load(Ordering::Relaxed),
                sh.refused.load(Ordering::Relaxed)
            )
        })
    };
    let t = Instant::now();
    swarm.hello_all(512);
    swarm.wait_settled(g.timeout());
    let join_secs = t.elapsed().as_secs_f64();
    let welcomed = sh.welcomed.load(Ordering::Relaxed);
    let refused = sh.refused.load(Ordering::Relaxed);
    // When the last welcome arrived, relative to the first hello.
    let first_hello =
        sh.hello_ns.iter().map(|h| h.load(Ordering::Relaxed)).filter(|&v| v > 0).min().unwrap_or(0);
    let last_welcome = sh.welcome_ns.iter().map(|w| w.load(Ordering::Relaxed)).max().unwrap_or(0);
    std::thread::sleep(Duration::from_secs_f64(a.hold_secs.max(0.0)));
    let server_holding = target.stat();
    let bench_holding = ProcStat::read(std::process::id());
    let cut_off = sh.cut_off.load(Ordering::Relaxed);
    // Counted before the teardown: a server that queues streams it has no room for
    // welcomes them once the others end, and those were never held.
    let held = sh.welcomed.load(Ordering::Relaxed).saturating_sub(cut_off);
    let codes: Vec<(i32, usize)> = sh.end_codes.lock().iter().map(|(c, n)| (*c, *n)).collect();
    let messages = sh.end_messages.lock().clone();
    drop(progress);
    swarm.finish(Duration::from_secs(5));

    if welcomed == 0 {
        let why = messages.values().next().cloned().unwrap_or_else(|| "no welcome within the timeout".into());
        return Outcome::Refused(format!("the server accepted none of {} streams ({why})", a.streams));
    }
    let unsettled = a.streams.saturating_sub(welcomed + refused);
    let mut refused_codes = Obj::new();
    for (c, n) in codes {
        refused_codes.push(&code_name(c), n);
    }
    // The first status message of each code, to tell why without the server's log.
    let mut refused_messages = Obj::new();
    for (c, m) in messages {
        refused_messages.push(&code_name(c), m);
    }
    let mut server = target.describe();
    let server_mem = stat_delta(server_before, server_holding, welcomed);
    let label = match target.kind() {
        "in-process" => "server_and_bench_process",
        _ => "server_process",
    };
    server.push(label, server_mem);
    let mut report = Obj::new()
        .set("scenario", "streams")
        .set("server", server)
        .set(
            "setup",
            Obj::new()
                .set("streams", a.streams)
                .set("rooms", a.rooms)
                .set("connections", g.connections)
                .set("drivers", g.drivers()),
        )
        .set("accepted", welcomed)
        .set("refused", refused)
        .set("refused_codes", refused_codes)
        .set("refused_messages", refused_messages)
        .set("unsettled", unsettled)
        .set("cut_off_while_holding", cut_off)
        .set("held_to_the_end", held)
        .set("join_secs", (join_secs * 1000.0).round() / 1000.0)
        .set(
            "last_welcome_after_ms",
            (last_welcome.saturating_sub(first_hello) as f64 / 1e6 * 1000.0).round() / 1000.0,
        );
    if welcomed > 0 {
        report.push(
            "joins_per_s",
            (welcomed as f64 / (last_welcome.saturating_sub(first_hello) as f64 / 1e9).max(1e-9)).round(),
        );
    }
    let mut bench = stat_delta(bench_before, bench_holding, welcomed);
    if let Some(s) = bench_start {
        bench.push("at_start", s.to_obj());
    }
    report.push("bench_process", bench);
    let ok = unsettled == 0 && cut_off == 0;
    report.push("ok", ok);
    let verdict = if unsettled > 0 {
        Err(format!(
            "{unsettled} of {} streams had neither a welcome nor an error after {} s (--timeout-secs): \
             the server holds them without answering",
            a.streams,
            g.timeout().as_secs_f64()
        ))
    } else if cut_off > 0 {
        Err(format!("{cut_off} of {welcomed} welcomed streams were ended by the server while held"))
    } else {
        verified(ok)
    };
    Outcome::Done { report, verdict }
}
