//! `chat-server`: the grpc-chat server command.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use grpc_chat::core::{BrokerConfig, Limits, RateLimit};
use grpc_chat::server::{ChatServer, ServerConfig, ThreadRole, WriteBudget};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

#[path = "shared/os.rs"]
mod os;

/// A real-time chat server over gRPC (chat.v1.Chat and grpc.health.v1.Health).
///
/// Logs go to stderr; set RUST_LOG=info (joins and leaves) or RUST_LOG=debug (every
/// message and its number of recipients). SIGINT or SIGTERM shuts down gracefully.
#[derive(Parser, Debug)]
#[command(name = "chat-server", version)]
struct Args {
    /// Address to listen on; the help text names the any-address forms.
    #[arg(
        long,
        default_value = "127.0.0.1:50051",
        help = "Address to listen on (use 0.0.0.0:50051 or [::]:50051 to accept remote clients, unix:/run/chat.sock for a Unix socket)"
    )]
    listen: String,
    /// Messages retained per room and replayed to joining or resuming members.
    #[arg(long, default_value_t = 500)]
    history: usize,
    /// Most memory all rooms' histories may take together, in MiB (0 = no limit); past it
    /// the room holding the most drops its oldest messages
    #[arg(long, default_value_t = 1024)]
    history_mib: usize,
    /// Most concurrent Chat and Subscribe streams; past it, RESOURCE_EXHAUSTED at once.
    #[arg(long, default_value_t = 10_000)]
    max_streams: usize,
    /// Most calls one connection may have open at once (HTTP/2 MAX_CONCURRENT_STREAMS);
    /// default --max-streams + 1024
    #[arg(long)]
    max_calls_per_connection: Option<usize>,
    /// Events queued per stream before that member counts as too slow and is cut off.
    #[arg(long, default_value_t = 1024)]
    queue: usize,
    /// Posts per second allowed per session, sustained (0 disables rate limiting).
    #[arg(long, default_value_t = 20.0)]
    rate_limit: f64,
    /// Posts a session may make in a burst.
    #[arg(long, default_value_t = 50)]
    burst: u32,
    /// Above this many members a room sends no join/leave presence (ListMembers instead).
    #[arg(long, default_value_t = 256)]
    presence_limit: usize,
    /// Longest message text, in bytes (the gRPC receive limit is set 1 KiB above it).
    #[arg(long, default_value_t = 4096)]
    max_text_bytes: usize,
    /// Longest user name, in characters.
    #[arg(long, default_value_t = 32)]
    max_user_chars: usize,
    /// Most rooms the server holds (at the limit, an idle room is evicted to make space).
    #[arg(long, default_value_t = 10_000)]
    max_rooms: usize,
    /// Most sessions the server holds.
    #[arg(long, default_value_t = 100_000)]
    max_sessions: usize,
    /// Most memory ListRooms and ListMembers replies may hold while their clients have not
    /// taken them, in MiB (0 = no limit); past it such calls get RESOURCE_EXHAUSTED
    #[arg(long, default_value_t = 64)]
    directory_mib: usize,
    /// Seconds a session whose stream dropped stays reserved for a resume.
    #[arg(long, default_value_t = 15.0)]
    resume_grace: f64,
    /// Seconds a session opened by Join may stay without attaching a stream.
    #[arg(long, default_value_t = 30.0)]
    attach_timeout: f64,
    /// Seconds a new stream may stay without its first frame (hello or subscribe) before it
    /// is closed with DEADLINE_EXCEEDED
    #[arg(long, default_value_t = 10.0)]
    hello_timeout: f64,
    /// Seconds a new connection may take to open HTTP/2 (its preface and first SETTINGS)
    /// before it is closed; until then it holds a file descriptor
    #[arg(long, default_value_t = 10.0)]
    handshake_timeout: f64,
    /// Seconds shutdown waits for streams to take their notice.
    #[arg(long, default_value_t = 5.0)]
    shutdown_grace: f64,
    /// Writes per second over all streams: N (fixed; 0 = unpaced) or MIN..MAX, a range
    /// the budget moves in with the machine's load (it starts at MAX; up while the CPUs
    /// are under 70 % busy, down while over 80 %). A busy stream writes about once per
    /// (open streams / budget), on shared ticks, batching what queued meanwhile; an idle
    /// stream writes at once.
    /// Fewer, larger writes trade a little latency for much more fan-out.
    #[arg(long, default_value_t = WriteBudget::default())]
    writes_per_second: WriteBudget,
    /// Most threads that make the paced writes: one per 40 k writes/s of the budget begun
    /// (one thread makes about 60 k writes/s on a 2-core machine).
    #[arg(long, default_value_t = 3)]
    pacer_threads: usize,
    /// Longest pause between two writes of a busy stream, in milliseconds.
    #[arg(long, default_value_t = 50)]
    max_write_interval_ms: u64,
    /// grpcio completion-queue threads (they deliver every read and write completion).
    #[arg(long, default_value_t = 1)]
    cq_threads: usize,
    /// Run the completion-queue threads as SCHED_BATCH (Linux), so that the completion
    /// of each write wakes them without preempting the thread that writes; `false` leaves
    /// every thread's scheduling as it is.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    batch_cq_threads: bool,
    /// Stack size of each stream thread, in KiB.
    #[arg(long, default_value_t = 128)]
    stack_kib: usize,
}

fn seconds(s: f64, flag: &str) -> Result<Duration, String> {
    Duration::try_from_secs_f64(s).map_err(|_| format!("--{flag} must be a non-negative number of seconds"))
}

fn config(args: &Args) -> Result<ServerConfig, String> {
    if args.history == 0 {
        return Err("--history must be at least 1".into());
    }
    if args.handshake_timeout <= 0.0 {
        return Err("--handshake-timeout must be more than 0 seconds".into());
    }
    let rate_limit = if args.rate_limit > 0.0 {
        Some(RateLimit { per_second: args.rate_limit, burst: args.burst.max(1) })
    } else {
        None
    };
    let broker = BrokerConfig {
        limits: Limits {
            max_user_chars: args.max_user_chars,
            max_text_bytes: args.max_text_bytes,
            ..Limits::default()
        },
        history_limit: args.history,
        history_bytes: match args.history_mib {
            0 => usize::MAX,
            mib => mib.saturating_mul(1 << 20),
        },
        resume_grace: seconds(args.resume_grace, "resume-grace")?,
        attach_timeout: seconds(args.attach_timeout, "attach-timeout")?,
        hello_timeout: seconds(args.hello_timeout, "hello-timeout")?,
        presence_limit: args.presence_limit,
        rate_limit,
        max_rooms: args.max_rooms,
        max_sessions: args.max_sessions,
        ..BrokerConfig::default()
    };
    Ok(ServerConfig {
        listen: args.listen.clone(),
        broker,
        max_streams: args.max_streams,
        max_calls_per_connection: args.max_calls_per_connection,
        queue_capacity: args.queue.max(1),
        stream_stack_size: args.stack_kib.max(64) * 1024,
        shutdown_grace: seconds(args.shutdown_grace, "shutdown-grace")?,
        directory_reply_bytes: match args.directory_mib {
            0 => usize::MAX,
            mib => mib.saturating_mul(1 << 20),
        },
        handshake_timeout: seconds(args.handshake_timeout, "handshake-timeout")?,
        writes_per_second: args.writes_per_second,
        pacer_threads: args.pacer_threads.max(1),
        cq_count: args.cq_threads.max(1),
        max_write_interval: Duration::from_millis(args.max_write_interval_ms),
        on_thread_start: args.batch_cq_threads.then_some(os::sched::on_thread_start as fn(ThreadRole)),
        ..ServerConfig::default()
    })
}

/// Raises the soft limit on open files so that `max_streams` clients fit, each on a
/// connection of its own, with room for everything else; warns when the hard limit is
/// lower. Many systems start services with a soft limit of 1024, and at the limit C-core
/// stops accepting connections (the clients wait until they time out).
fn raise_open_files_limit(max_streams: usize) {
    const OTHER_FILES: u64 = 1024;
    let wanted = u64::try_from(max_streams).unwrap_or(u64::MAX).saturating_add(OTHER_FILES);
    match rlimit::increase_nofile_limit(wanted) {
        Ok(got) if got >= wanted => log::debug!("open files limit: {got}"),
        Ok(got) => log::warn!(
            "open files are limited to {got} (the hard limit), below the {wanted} that \
             --max-streams {max_streams} may need (a connection per client, plus {OTHER_FILES}); \
             raise the limit (ulimit -n, systemd's LimitNOFILE) or lower --max-streams"
        ),
        Err(e) => log::warn!("cannot raise the open files limit: {e}"),
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let config = match config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chat-server: {e}");
            return ExitCode::from(2);
        }
    };
    let mut signals = match Signals::new([SIGINT, SIGTERM]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("chat-server: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    raise_open_files_limit(config.max_streams);
    match os::futex::size_hash(config.max_streams) {
        Ok(Some(slots)) => log::debug!("futex hash: {slots} slots"),
        Ok(None) => log::debug!("futex hash: the kernel's global one (no private hash before Linux 6.17)"),
        Err(e) => log::warn!("cannot size the futex hash for {} streams: {e}", config.max_streams),
    }
    let server = match ChatServer::start(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("chat-server: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The line scripts wait for; it carries the bound port.
    println!("chat-server listening on {}", server.addr());
    if let Some(signal) = signals.forever().next() {
        log::info!("received signal {signal}; shutting down");
    }
    server.shutdown();
    ExitCode::SUCCESS
}
