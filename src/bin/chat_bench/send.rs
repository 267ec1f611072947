//! `send`: unary `Send` throughput and latency with C concurrent callers. Each caller
//! holds a session through its own `Chat` stream in its own room, so every accepted
//! message comes back once on that stream and is verified there.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use futures::stream::{FuturesUnordered, StreamExt};
use grpc_chat::pb;

use crate::fanout::join_swarm;
use crate::hist::{now_ns, take_all, Hist, Summary};
use crate::report::{latency, Obj, Progress};
use crate::swarm::{self, MemberSpec, Swarm};
use crate::target::{Needs, Target};
use crate::wire::{code_name, error_code, stamped_text};
use crate::{connect, run_id, verified, Global, Outcome};

/// Options of the `send` scenario.
#[derive(Args, Debug)]
pub struct SendArgs {
    /// Concurrent callers (each with one call in flight).
    #[arg(long, default_value_t = 16)]
    pub callers: usize,
    /// Calls in total.
    #[arg(long, default_value_t = 10_000)]
    pub calls: u64,
    /// Size of each text in bytes.
    #[arg(long, default_value_t = 64)]
    pub bytes: usize,
}

impl SendArgs {
    pub fn needs(&self) -> Needs {
        Needs { max_streams: Some(10_000.max(self.callers + 64)), history: None }
    }
}

struct Lane {
    room: usize,
    session: String,
    stub: pb::ChatClient,
    calls: u64,
}

#[derive(Default)]
struct LaneResult {
    ok: u64,
    errors: BTreeMap<i32, u64>,
    first_error: Option<String>,
}

async fn lane(l: Lane, bytes: usize, hist: Rc<RefCell<Hist>>, done: Arc<AtomicU64>) -> (usize, LaneResult) {
    let mut r = LaneResult::default();
    for k in 0..l.calls {
        let t = now_ns();
        let req = pb::SendRequest {
            session: l.session.clone(),
            text: stamped_text(t, bytes),
            client_msg_id: format!("s{k}"),
        };
        let res = match l.stub.send_async(&req) {
            Ok(f) => f.await,
            Err(e) => Err(e),
        };
        match res {
            Ok(_) => {
                r.ok += 1;
                hist.borrow_mut().record(now_ns() - t);
            }
            Err(e) => {
                *r.errors.entry(error_code(&e)).or_insert(0) += 1;
                r.first_error.get_or_insert_with(|| e.to_string());
            }
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
    (l.room, r)
}

/// Runs the scenario.
pub fn run(a: &SendArgs, g: &Global, target: &Target) -> Outcome {
    if a.callers == 0 {
        return Outcome::Refused("--callers must be at least 1".into());
    }
    let conns = match connect(target, g) {
        Ok(c) => c,
        Err(e) => return Outcome::Refused(e),
    };
    let id = run_id();
    let rooms: Vec<String> = (0..a.callers).map(|r| format!("{id}-c{r}")).collect();
    let members: Vec<MemberSpec> =
        (0..a.callers).map(|i| MemberSpec { user: format!("{id}-c{i}"), room: i }).collect();
    let mut swarm = Swarm::open(&conns, rooms, members, g.drivers(), false);
    if let Err(e) = join_swarm(&mut swarm, g, "caller") {
        swarm.finish(Duration::from_millis(500));
        return Outcome::Refused(e);
    }
    let sh = swarm.shared.clone();
    let sessions = sh.sessions.lock().clone();
    if sessions.iter().any(String::is_empty) {
        swarm.finish(Duration::from_millis(500));
        return Outcome::Refused(
            "the server's welcome carried no session token, so Send cannot be used".into(),
        );
    }
    let done = Arc::new(AtomicU64::new(0));
    let progress = {
        let (done, sh) = (done.clone(), sh.clone());
        Progress::start(!g.quiet, move || {
            format!(
                "send: {} calls done, {} delivered",
                done.load(Ordering::Relaxed),
                sh.delivered.load(Ordering::Relaxed)
            )
        })
    };
    take_all();
    let threads = g.drivers().clamp(1, a.callers);
    let t = Instant::now();
    let mut ok_per_room = vec![0u64; a.callers];
    let mut codes: BTreeMap<i32, u64> = BTreeMap::new();
    let mut first_error = None;
    let mut rtt = Hist::default();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|th| {
                let lanes: Vec<Lane> = (th..a.callers)
                    .step_by(threads)
                    .map(|i| Lane {
                        room: i,
                        session: sessions[i].clone(),
                        stub: conns.stub(i).clone(),
                        calls: a.calls / a.callers as u64
                            + u64::from((i as u64) < a.calls % a.callers as u64),
                    })
                    .collect();
                let done = done.clone();
                let bytes = a.bytes.max(17);
                std::thread::Builder::new()
                    .name(format!("bench-send-{th}"))
                    .spawn_scoped(s, move || {
                        let hist = Rc::new(RefCell::new(Hist::default()));
                        let mut all: FuturesUnordered<_> =
                            lanes.into_iter().map(|l| lane(l, bytes, hist.clone(), done.clone())).collect();
                        let results = futures::executor::block_on(async {
                            let mut out = Vec::new();
                            while let Some(r) = all.next().await {
                                out.push(r);
                            }
                            out
                        });
                        drop(all);
                        let h = hist.borrow().clone();
                        (results, h)
                    })
                    .expect("spawning a caller thread")
            })
            .collect();
        for h in handles {
            let (results, hist) = h.join().expect("a caller thread panicked");
            rtt.merge(&hist);
            for (room, r) in results {
                ok_per_room[room] += r.ok;
                for (c, n) in r.errors {
                    *codes.entry(c).or_insert(0) += n;
                }
                if first_error.is_none() {
                    first_error = r.first_error;
                }
            }
        }
    });
    let secs = t.elapsed().as_secs_f64();
    let ok_calls: u64 = ok_per_room.iter().sum();
    // Every accepted message must come back on its caller's stream.
    let deadline = Instant::now() + g.timeout();
    while sh.delivered.load(Ordering::Relaxed) < ok_calls && Instant::now() < deadline {
        if sh.cut_off.load(Ordering::Relaxed) > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(progress);
    let delivery = Summary::of(&take_all());
    let protocol_errors = sh.protocol_errors.load(Ordering::Relaxed);
    let outcomes = swarm.finish(Duration::from_secs(2));
    let verdict = swarm::verify(&outcomes, |o| ok_per_room[o.room]);
    if ok_calls == 0 {
        let why = first_error.unwrap_or_else(|| "no call completed".into());
        return Outcome::Refused(format!("the server accepted none of the Send calls ({why})"));
    }
    let failed: u64 = codes.values().sum();
    let mut error_codes = Obj::new();
    for (c, n) in &codes {
        error_codes.push(&code_name(*c), *n);
    }
    let ok = failed == 0 && verdict.clean() && protocol_errors == 0;
    let report = Obj::new()
        .set("scenario", "send")
        .set("server", target.describe())
        .set(
            "setup",
            Obj::new()
                .set("callers", a.callers)
                .set("calls", a.calls)
                .set("bytes", a.bytes.max(17))
                .set("connections", g.connections)
                .set("threads", threads),
        )
        .set("ok_calls", ok_calls)
        .set("failed_calls", failed)
        .set("error_codes", error_codes)
        .set("secs", (secs * 1000.0).round() / 1000.0)
        .set("calls_per_s", (ok_calls as f64 / secs.max(1e-9)).round())
        .set("call_latency", latency(&Summary::of(&rtt)))
        .set("delivery_latency", latency(&delivery))
        .set("verify", verdict.report(None, protocol_errors, ok));
    Outcome::Done { report, verdict: verified(ok) }
}
