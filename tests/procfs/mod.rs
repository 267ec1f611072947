//! What tests read of a process from Linux's `/proc`.

#![allow(dead_code)]

/// Scheduling policies, as `/proc/PID/task/TID/stat` gives them.
pub const SCHED_OTHER: u32 = 0;
pub const SCHED_BATCH: u32 = 3;

/// (name, contents of `file`) of each thread of process `pid`, from `/proc/PID/task/TID/`.
fn threads_with(pid: u32, file: &str) -> Vec<(String, String)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc is readable");
    let mut threads = Vec::new();
    for task in tasks {
        let dir = task.expect("a task entry").path();
        let (Ok(name), Ok(contents)) =
            (std::fs::read_to_string(dir.join("comm")), std::fs::read_to_string(dir.join(file)))
        else {
            continue; // the thread ended between the listing and the reads
        };
        threads.push((name.trim().to_string(), contents));
    }
    threads
}

/// The name of each thread of process `pid`, from `/proc`.
pub fn thread_names(pid: u32) -> Vec<String> {
    threads_with(pid, "comm").into_iter().map(|(name, _)| name).collect()
}

/// (name, scheduling policy) of each thread of process `pid`, from `/proc`.
pub fn thread_policies(pid: u32) -> Vec<(String, u32)> {
    let policy = |stat: &str| {
        // After the name in parentheses come fields 3, 4, ...; the policy is field 41.
        let (_, fields) = stat.rsplit_once(')').expect("stat names the thread in parentheses");
        let policy = fields.split_whitespace().nth(41 - 3).expect("a policy field");
        policy.parse().expect("a number")
    };
    threads_with(pid, "stat").into_iter().map(|(name, stat)| (name, policy(&stat))).collect()
}

/// The policies of the threads in `threads` whose names start with `prefix`.
pub fn policies_of(threads: &[(String, u32)], prefix: &str) -> Vec<u32> {
    threads.iter().filter(|(name, _)| name.starts_with(prefix)).map(|&(_, p)| p).collect()
}

/// Context switches so far (voluntary and not) of the threads of process `pid` named
/// exactly `name`: how often they stopped running, which for a thread that sleeps
/// between its rounds is how often it woke up.
pub fn context_switches(pid: u32, name: &str) -> u64 {
    let switches = |status: &str| -> u64 {
        status
            .lines()
            .filter(|l| {
                l.starts_with("voluntary_ctxt_switches") || l.starts_with("nonvoluntary_ctxt_switches")
            })
            .map(|l| l.split_whitespace().nth(1).and_then(|n| n.parse::<u64>().ok()).expect("a count"))
            .sum()
    };
    threads_with(pid, "status").iter().filter(|(n, _)| n == name).map(|(_, status)| switches(status)).sum()
}
