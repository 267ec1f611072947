//! What the server's binaries ask of the operating system, shared by `chat-server` and
//! `chat-bench --in-process` (included in each with `#[path]`): the scheduling policy of
//! the server's threads and the size of the process's futex hash. Both need `unsafe`
//! system calls, which the library forbids; the library offers the hook
//! (`ServerConfig::on_thread_start`) and leaves the calls to the binaries.

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
pub mod sched {
    use std::io;

    use grpc_chat::server::ThreadRole;

    /// `ServerConfig::on_thread_start` for a server of this crate started by a binary.
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
pub mod sched {
    use grpc_chat::server::ThreadRole;

    /// `ServerConfig::on_thread_start` for a server of this crate: nothing to do here.
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
pub mod futex {
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
pub mod futex {
    pub fn size_hash(_max_streams: usize) -> std::io::Result<Option<usize>> {
        Ok(None)
    }
}
