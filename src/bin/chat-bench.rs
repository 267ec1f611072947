//! `chat-bench`: load generator and verifier for any `chat.v1` server.
//!
//! Scenarios: `fanout` (rooms × members, fixed or ramped offered rate, end-to-end
//! latency, every delivery verified), `streams` (how many streams, at what memory
//! cost), `join` (history replay to many joiners at once) and `send` (unary `Send`).
//! Without `--server` it starts this project's `chat-server` as a child process (or
//! in-process with `--in-process`). Exit status: 0 success, 1 verification failed
//! (loss, duplicates, reordering, members cut off, rejected posts), 2 the server is
//! unreachable, refused the run, or the arguments are wrong.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[path = "chat_bench/fanout.rs"]
mod fanout;
#[path = "chat_bench/h2wire.rs"]
mod h2wire;
#[path = "chat_bench/hist.rs"]
mod hist;
#[path = "chat_bench/hpack.rs"]
mod hpack;
#[path = "chat_bench/join.rs"]
mod join;
#[path = "shared/os.rs"]
mod os;
#[path = "chat_bench/report.rs"]
mod report;
#[path = "chat_bench/send.rs"]
mod send;
#[path = "chat_bench/streams.rs"]
mod streams;
#[path = "chat_bench/swarm.rs"]
mod swarm;
#[path = "chat_bench/target.rs"]
mod target;
#[path = "chat_bench/wire.rs"]
mod wire;

use report::Obj;
use target::{Needs, Target, TargetOpts};

/// Benchmark and verify a chat.v1 gRPC chat server.
#[derive(Parser, Debug)]
#[command(name = "chat-bench", version)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// Options shared by every scenario.
#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Address of the server under test (host:port). Without it, chat-bench starts
    /// this project's chat-server (rate limit off) as a child process.
    #[arg(long, global = true)]
    pub server: Option<String>,
    /// Pid of the external server, to report its memory, threads and CPU.
    #[arg(long, global = true)]
    pub server_pid: Option<u32>,
    /// Run this project's server inside the bench process instead of as a child
    /// (memory figures then include the bench itself).
    #[arg(long, global = true)]
    pub in_process: bool,
    /// The chat-server binary to start (default: next to chat-bench).
    #[arg(long, global = true)]
    pub server_bin: Option<PathBuf>,
    /// Where the child server's log (stderr) goes (default: discarded).
    #[arg(long, global = true)]
    pub server_log: Option<PathBuf>,
    /// Extra argument for the child server (repeatable), e.g. --server-arg=--queue=4096.
    #[arg(long = "server-arg", global = true, allow_hyphen_values = true)]
    pub server_args: Vec<String>,
    /// Per-stream queue of a server the bench starts (its --queue).
    #[arg(long, global = true)]
    pub server_queue: Option<usize>,
    /// Number of HTTP/2 connections the members are spread over.
    #[arg(long, global = true, default_value_t = 8)]
    pub connections: usize,
    /// Threads that drive the receive streams (default: number of CPUs); 0 runs the
    /// receive loops on the grpcio completion-queue threads instead.
    #[arg(long, global = true)]
    pub drivers: Option<usize>,
    /// The client that receiving members use: grpcio, or the bench's own HTTP/2 client
    /// (`h2`, a fraction of grpcio's CPU per message; fanout only, publishers stay on grpcio).
    #[arg(long, global = true, value_enum, default_value_t = Receivers::Grpcio)]
    pub receivers: Receivers,
    /// With `--receivers h2`: microseconds each reader thread sleeps after draining its
    /// sockets (it adds up to this much to the measured latency).
    #[arg(long, global = true, default_value_t = 1000)]
    pub h2_poll_us: u64,
    /// grpcio completion-queue threads of the bench.
    #[arg(long, global = true, default_value_t = 2)]
    pub cq: usize,
    /// Seconds to wait for joins, replies and the last deliveries.
    #[arg(long, global = true, default_value_t = 30.0)]
    pub timeout_secs: f64,
    /// Print the report as JSON on stdout instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress line on stderr.
    #[arg(long, short, global = true)]
    pub quiet: bool,
}

impl Global {
    pub fn drivers(&self) -> usize {
        self.drivers.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())).max(1)
    }

    pub fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.timeout_secs.max(0.1))
    }

    fn target_opts(&self) -> TargetOpts {
        TargetOpts {
            server: self.server.clone(),
            server_pid: self.server_pid,
            in_process: self.in_process,
            server_bin: self.server_bin.clone(),
            server_log: self.server_log.clone(),
            server_args: self.server_args.clone(),
            queue: self.server_queue,
        }
    }
}

/// The client receiving members use.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Receivers {
    /// grpcio, like every other client of the bench.
    Grpcio,
    /// The bench's minimal HTTP/2 client (plain text, sockets drained by poller threads).
    H2,
}

/// How publishers post.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum PublishVia {
    /// `post` frames on the publisher's own Chat stream.
    Post,
    /// Unary `Send` calls with the publisher's session.
    Send,
}

#[derive(Subcommand, Debug)]
pub enum Scenario {
    /// Rooms × members, publishers at an offered rate; latency and verified delivery.
    Fanout(fanout::FanoutArgs),
    /// Many held streams: join time, accepted/refused, server memory per stream.
    Streams(streams::StreamsArgs),
    /// Many clients join a room with full history at once and replay it.
    Join(join::JoinArgs),
    /// Unary Send throughput and latency.
    Send(send::SendArgs),
}

/// How a scenario ended.
pub enum Outcome {
    /// The report, and whether every check passed or the one sentence that says which
    /// did not.
    Done { report: Obj, verdict: Result<(), String> },
    /// The server could not be reached or refused the run (one sentence).
    Refused(String),
}

/// What a run whose deliveries (or calls, or streams) did not check out says.
pub const VERIFICATION_FAILED: &str = "verification FAILED (see the report)";

/// The verdict of a run whose checks all passed (`ok`) or not.
pub fn verified(ok: bool) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(VERIFICATION_FAILED.to_owned())
    }
}

/// Connects to the target; the error is the one-sentence refusal.
pub fn connect(target: &Target, g: &Global) -> Result<wire::Conns, String> {
    let wait = g.timeout().min(std::time::Duration::from_secs(10));
    wire::Conns::connect(target.addr(), g.connections, g.cq, wait)
}

fn needs(s: &Scenario) -> Needs {
    match s {
        Scenario::Fanout(a) => a.needs(),
        Scenario::Streams(a) => a.needs(),
        Scenario::Join(a) => a.needs(),
        Scenario::Send(a) => a.needs(),
    }
}

/// A name unique to this run, so that rooms and users never collide with earlier runs.
pub fn run_id() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    format!("b{:x}{:x}", std::process::id() & 0xffff, t & 0xff_ffff)
}

fn main() -> ExitCode {
    hist::init_clock();
    let cli = Cli::parse();
    let g = cli.global.clone();
    // Every connection takes a file descriptor (two when the server runs in this process).
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("chat-bench: cannot raise the open files limit: {e}");
    }
    let before = target::ProcStat::read(std::process::id());
    let target = match Target::start(&g.target_opts(), &needs(&cli.scenario)) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("chat-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match &cli.scenario {
        Scenario::Fanout(a) => fanout::run(a, &g, &target),
        Scenario::Streams(a) => streams::run(a, &g, &target, before),
        Scenario::Join(a) => join::run(a, &g, &target),
        Scenario::Send(a) => send::run(a, &g, &target),
    };
    target.stop();
    match result {
        Outcome::Refused(msg) => {
            eprintln!("chat-bench: {msg}");
            ExitCode::from(2)
        }
        Outcome::Done { report, verdict } => {
            if g.json {
                print!("{}", report::to_json(&report));
            } else {
                print!("{}", report::to_table(&report));
            }
            match verdict {
                Ok(()) => ExitCode::SUCCESS,
                Err(why) => {
                    eprintln!("chat-bench: {why}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
