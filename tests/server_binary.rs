//! The `chat-server` binary as a process: its open-files limit, its signal handling, its
//! threads' scheduling, and how often its pacer thread wakes up.
//! Linux only (it reads `/proc`). Waits end on events, with generous deadlines.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

mod procfs;
use procfs::{context_switches, policies_of, thread_policies, SCHED_BATCH, SCHED_OTHER};

const WAIT: Duration = Duration::from_secs(20);

/// A `chat-server` started by `sh` after `ulimit_args` (`ulimit`'s options and value), with
/// its stdout and stderr lines on a channel.
struct Server {
    child: Child,
    lines: Receiver<String>,
    /// What it printed up to its listening line.
    startup: Vec<String>,
}

impl Server {
    fn start(ulimit_args: &str, args: &[&str]) -> Server {
        let script = format!("ulimit {ulimit_args} && exec \"$0\" \"$@\"");
        let mut child = Command::new("sh")
            .args(["-c", &script, env!("CARGO_BIN_EXE_chat-server"), "--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sh starts");
        let (tx, lines) = crossbeam_channel::unbounded();
        let out = child.stdout.take().expect("piped");
        let err = child.stderr.take().expect("piped");
        let tx2 = tx.clone();
        thread::spawn(move || BufReader::new(out).lines().map_while(Result::ok).try_for_each(|l| tx.send(l)));
        thread::spawn(move || {
            BufReader::new(err).lines().map_while(Result::ok).try_for_each(|l| tx2.send(l))
        });
        let mut server = Server { child, lines, startup: Vec::new() };
        server.startup =
            server.expect_line("the listening line", |l| l.starts_with("chat-server listening on"));
        server
    }

    /// Lines until one satisfies `want` (returned with the ones before it).
    fn expect_line(&self, what: &str, want: impl Fn(&str) -> bool) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            match self.lines.recv_timeout(WAIT) {
                Ok(line) => {
                    let hit = want(&line);
                    seen.push(line);
                    if hit {
                        return seen;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!("no {what} within {WAIT:?}; saw {seen:#?}"),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("the server exited before {what}; saw {seen:#?}")
                }
            }
        }
    }

    /// (soft, hard) limit on open files of the server process.
    fn open_files_limit(&self) -> (u64, u64) {
        open_files_limit(self.child.id())
    }

    /// Sends SIGTERM and waits for the exit; returns the exit code.
    fn terminate(mut self) -> i32 {
        let kill = Command::new("sh").args(["-c", &format!("kill -TERM {}", self.child.id())]).status();
        assert!(kill.expect("sh runs").success(), "kill -TERM works");
        self.expect_line("the last log line", |l| l.contains("server stopped"));
        let status = self.child.wait().expect("the server is waited for");
        status.code().expect("exited, not killed by a signal")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (soft, hard) "Max open files" of process `pid`, from `/proc`.
fn open_files_limit(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("/proc is readable");
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("a Max open files line");
    let numbers: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    (numbers[0], numbers[1])
}

#[test]
fn a_low_soft_open_files_limit_is_raised_to_fit_the_stream_limit() {
    let (_, hard) = open_files_limit(std::process::id());
    let server = Server::start("-Sn 256", &["--max-streams", "2000"]);
    let wanted = 2000 + 1024;
    if hard >= wanted {
        assert_eq!(server.open_files_limit(), (wanted, hard));
    } else {
        // This machine's hard limit is too low to show the raise; then the server says so.
        assert_eq!(server.open_files_limit(), (hard, hard));
        assert!(
            server.startup.iter().any(|l| l.contains("open files are limited to")),
            "{:?}",
            server.startup
        );
    }
    assert_eq!(server.terminate(), 0, "SIGTERM is a clean shutdown");
}

#[test]
fn a_hard_open_files_limit_below_the_stream_limit_is_reported() {
    let server = Server::start("-n 256", &["--max-streams", "2000"]);
    assert_eq!(server.open_files_limit(), (256, 256));
    let warning = "open files are limited to 256 (the hard limit), below the 3024 that --max-streams 2000";
    assert!(server.startup.iter().any(|l| l.contains(warning)), "{:?}", server.startup);
    assert_eq!(server.terminate(), 0, "SIGTERM is a clean shutdown");
}

#[test]
fn completion_queue_threads_run_as_sched_batch_and_stream_threads_as_normal_ones() {
    for (args, cq_policy) in [(&[][..], SCHED_BATCH), (&["--batch-cq-threads", "false"][..], SCHED_OTHER)] {
        let server = Server::start("-c 0", args);
        let listening = server.startup.last().expect("the listening line");
        let addr = listening.rsplit(' ').next().expect("an address");
        let client = grpc_chat::client::Client::connect(addr, WAIT).expect("the server is reachable");
        let session = client.enter("ann", "lobby").expect("ann joins");
        // The welcome comes from the stream's thread, after it set its policy.
        let welcome = session.next_event(WAIT);
        assert!(matches!(welcome, Some(grpc_chat::client::Event::Welcome { .. })), "{welcome:?}");
        let threads = thread_policies(server.child.id());
        let policies = |prefix: &str| policies_of(&threads, prefix);
        assert!(!policies("grpc-cq").is_empty() && !policies("chat-stream").is_empty(), "{threads:?}");
        assert!(policies("grpc-cq").iter().all(|&p| p == cq_policy), "{args:?}: {threads:?}");
        assert!(policies("chat-stream").iter().all(|&p| p == SCHED_OTHER), "{args:?}: {threads:?}");
        assert!(policies("chat-pacer").iter().all(|&p| p == SCHED_OTHER), "{args:?}: {threads:?}");
        drop(session);
        assert_eq!(server.terminate(), 0, "SIGTERM is a clean shutdown");
    }
}

#[test]
fn the_pacer_thread_sleeps_while_the_members_are_quiet() {
    // A fixed budget, so that no sampling of the machine's load wakes the pacer either.
    // Five open streams at 100 k writes/s make a 50 µs interval: a pacer that ticked for
    // open streams whether or not they had anything to send woke about 10,000 times a
    // second (as it did before this test).
    let server = Server::start("-c 0", &["--writes-per-second", "100000"]);
    let listening = server.startup.last().expect("the listening line");
    let addr = listening.rsplit(' ').next().expect("an address");
    let client = grpc_chat::client::Client::connect(addr, WAIT).expect("the server is reachable");
    let users = ["ann", "bob", "cy", "dee", "eve"];
    let sessions: Vec<_> = users.iter().map(|u| client.enter(u, "lobby").expect("joins")).collect();
    sessions[0].post("anyone here?").expect("ann posts");
    for (user, session) in users.iter().zip(&sessions) {
        // Every stream was busy (welcome, presence, the message) until this came.
        loop {
            match session.next_event(WAIT) {
                Some(grpc_chat::client::Event::Message(m)) if m.text == "anyone here?" => break,
                Some(_) => continue,
                None => panic!("{user} did not get the message within {WAIT:?}"),
            }
        }
    }
    let pid = server.child.id();
    let deadline = Instant::now() + WAIT;
    loop {
        let before = context_switches(pid, "chat-pacer");
        thread::sleep(Duration::from_millis(200));
        let woke = context_switches(pid, "chat-pacer") - before;
        if woke <= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the pacer thread still woke {woke} times in 200 ms");
    }
    drop(sessions);
    assert_eq!(server.terminate(), 0, "SIGTERM is a clean shutdown");
}
