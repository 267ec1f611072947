//! `chat-server`: the grpc-chat server command.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use grpc_chat::core::{BrokerConfig, Limits, RateLimit};
use grpc_chat::server::{ChatServer, ServerConfig, ThreadRole, WriteBudget};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

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
        help = "Address to listen on (use 0.0.0.0:50051 or [::]:50051 to accept remote clients)"
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
    /// Seconds shutdown waits for streams to take their notice.
    #[arg(long, default_value_t = 5.0)]
    shutdown_grace: f64,
    /// Writes per second over all streams: N (fixed; 0 = unpaced) or MIN..MAX, a range
    /// the budget moves in with the machine's load (up while its CPUs are under 70 % busy,
    /// down while over 80 %). A busy stream writes about once per (open streams / budget),
    /// on shared ticks, batching what queued meanwhile; an idle stream writes at once.
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
        queue_capacity: args.queue.max(1),
        stream_stack_size: args.stack_kib.max(64) * 1024,
        shutdown_grace: seconds(args.shutdown_grace, "shutdown-grace")?,
        writes_per_second: args.writes_per_second,
        pacer_threads: args.pacer_threads.max(1),
        cq_count: args.cq_threads.max(1),
        max_write_interval: Duration::from_millis(args.max_write_interval_ms),
        on_thread_start: args.batch_cq_threads.then_some(sched::on_thread_start as fn(ThreadRole)),
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
    match futex::size_hash(config.max_streams) {
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

/// The scheduling of the server's threads: completion-queue threads as `SCHED_BATCH`,
/// stream threads (started by them) as normal threads again.
///
/// Every paced write ends in a completion that C-core hands to a completion-queue thread,
/// waking it. A normal thread woken like that may preempt the pacer thread that made the
/// write. At 500 k deliveries/s the completion-queue thread got the CPU 17,000–31,000
/// times a second, for one or a few completions each time. A `SCHED_BATCH` thread does
/// not preempt the thread that is running when it is woken. It runs when a core comes
/// free, and takes all the completions that queued meanwhile (11,000–12,000 times a
/// second, with half the CPU). Measured in BENCHMARKS.md ("Completion-queue threads as
/// SCHED_BATCH").
#[cfg(target_os = "linux")]
mod sched {
    use std::io;

    use grpc_chat::server::ThreadRole;

    /// `ServerConfig::on_thread_start` for `chat-server`.
    pub fn on_thread_start(role: ThreadRole) {
        let (policy, name) = match role {
            ThreadRole::CompletionQueue => (libc::SCHED_BATCH, "SCHED_BATCH"),
            ThreadRole::Stream => (libc::SCHED_OTHER, "SCHED_OTHER"),
        };
        if let Err(e) = set_policy(policy) {
            log::debug!("cannot run a {role:?} thread as {name}: {e}");
        }
    }

    /// Sets the calling thread's scheduling policy (one without a static priority).
    fn set_policy(policy: libc::c_int) -> io::Result<()> {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a valid `sched_param` that outlives the call, which only reads
        // it; pid 0 is the calling thread.
        let rc = unsafe { libc::sched_setscheduler(0, policy, &param) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// Elsewhere threads keep the scheduling they start with.
#[cfg(not(target_os = "linux"))]
mod sched {
    use grpc_chat::server::ThreadRole;

    /// `ServerConfig::on_thread_start` for `chat-server`: nothing to do here.
    pub fn on_thread_start(_role: ThreadRole) {}
}

/// The kernel's futex hash, sized for a thread per stream.
///
/// Every parked thread waits on a futex word of its own, and the kernel finds a waiter by
/// walking the chain of its word's hash slot. Since Linux 6.17 a process gets a private
/// hash sized by the number of CPUs — 16 slots on 2 CPUs — however many threads wait: with
/// 10,000 stream threads every wake-up walked a chain of ~600 waiters, and `futex_wake`
/// alone had a third of the server's CPU samples while 10,000 members joined (see
/// BENCHMARKS.md). `PR_FUTEX_HASH` sets the size instead.
#[cfg(target_os = "linux")]
mod futex {
    use std::io;

    // From <linux/prctl.h> (Linux 6.17); the `libc` crate does not name them yet.
    const PR_FUTEX_HASH: libc::c_int = 78;
    const PR_FUTEX_HASH_SET_SLOTS: libc::c_ulong = 1;

    /// Most slots asked for: 8 MiB of the kernel's memory at 64 bytes a slot.
    const MAX_SLOTS: usize = 1 << 17;

    /// Slots for `max_streams` stream threads and the server's few others: at least one
    /// slot per thread, a power of two as the kernel requires.
    pub fn slots_for(max_streams: usize) -> usize {
        max_streams.saturating_add(256).checked_next_power_of_two().map_or(MAX_SLOTS, |s| s.min(MAX_SLOTS))
    }

    /// Gives this process a private futex hash with `slots_for(max_streams)` slots.
    /// `Ok(None)` on kernels before 6.17, which have only the global hash (sized by the
    /// machine, not by a process's threads), and on kernels built without private hashes.
    pub fn size_hash(max_streams: usize) -> io::Result<Option<usize>> {
        let slots = slots_for(max_streams);
        let size = libc::c_ulong::try_from(slots).expect("at most MAX_SLOTS");
        // SAFETY: PR_FUTEX_HASH takes integers only; no memory is passed to the kernel.
        let rc = unsafe { libc::prctl(PR_FUTEX_HASH, PR_FUTEX_HASH_SET_SLOTS, size, 0 as libc::c_ulong) };
        if rc == 0 {
            return Ok(Some(slots));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // The size is a power of two, so the kernel does not know the option (or was
            // built without private hashes).
            Some(libc::EINVAL) => Ok(None),
            _ => Err(err),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        const PR_FUTEX_HASH_GET_SLOTS: libc::c_ulong = 2;

        /// The size of this process's private futex hash (0: it uses the global hash).
        fn current_slots() -> io::Result<usize> {
            // SAFETY: PR_FUTEX_HASH takes integers only.
            let rc = unsafe { libc::prctl(PR_FUTEX_HASH, PR_FUTEX_HASH_GET_SLOTS) };
            usize::try_from(rc).map_err(|_| io::Error::last_os_error())
        }

        #[test]
        fn slots_cover_every_stream_thread_in_a_power_of_two() {
            assert_eq!(slots_for(10_000), 16_384);
            assert_eq!(slots_for(0), 256);
            assert_eq!(slots_for(1), 512);
            assert_eq!(slots_for(usize::MAX), MAX_SLOTS);
            for n in [0, 7, 100, 1000, 65_000, 200_000] {
                let s = slots_for(n);
                assert!(s.is_power_of_two() && (s >= n + 256 || s == MAX_SLOTS), "{n} -> {s}");
            }
        }

        #[test]
        fn the_kernel_keeps_the_size_asked_for() {
            match size_hash(3000).expect("PR_FUTEX_HASH accepts a power of two") {
                Some(slots) => {
                    assert_eq!(slots, 4096);
                    assert_eq!(current_slots().expect("GET_SLOTS works where SET_SLOTS did"), 4096);
                    // Threads started afterwards do not make the kernel resize it.
                    let threads: Vec<_> = (0..8).map(|_| std::thread::spawn(|| ())).collect();
                    threads.into_iter().for_each(|t| t.join().expect("the thread ran"));
                    assert_eq!(current_slots().expect("GET_SLOTS"), 4096);
                }
                None => assert!(
                    current_slots().map_or(true, |slots| slots == 0),
                    "a kernel that cannot size the hash has no private one"
                ),
            }
        }
    }
}

/// Other systems have no futex hash to size.
#[cfg(not(target_os = "linux"))]
mod futex {
    pub fn size_hash(_max_streams: usize) -> std::io::Result<Option<usize>> {
        Ok(None)
    }
}
