//! The server under test: an external one (`--server`), this project's `chat-server`
//! as a child process (the default), or this project's server in-process.

use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use grpc_chat::server::{ChatServer, ServerConfig};

use crate::report::Obj;

/// What a scenario needs from a server the bench starts itself.
#[derive(Clone, Debug, Default)]
pub struct Needs {
    pub max_streams: Option<usize>,
    pub history: Option<usize>,
}

/// How to reach (or start) the server; from the global command-line options.
#[derive(Clone, Debug)]
pub struct TargetOpts {
    pub server: Option<String>,
    pub server_pid: Option<u32>,
    pub in_process: bool,
    pub server_bin: Option<PathBuf>,
    pub server_log: Option<PathBuf>,
    pub server_args: Vec<String>,
    pub queue: Option<usize>,
}

/// A running server under test.
pub enum Target {
    External { addr: String, pid: Option<u32> },
    Child { addr: String, child: Child },
    InProcess { addr: String, server: Option<ChatServer> },
}

/// Resident memory and threads of a process, from `/proc/<pid>/status`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcStat {
    pub rss_kb: u64,
    pub threads: u64,
}

/// The kernel's `USER_HZ`, the unit of the CPU times in `/proc/<pid>/stat`: 100 on every
/// Linux architecture this runs on (it is part of the kernel's ABI, not its `HZ`).
const USER_HZ: f64 = 100.0;

/// CPU time a process has used so far (user + system, all its threads), from
/// `/proc/<pid>/stat`; `None` when unreadable. Accurate to 10 ms.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from its end.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

impl ProcStat {
    /// Reads `/proc/<pid>/status` (`None` when unreadable, e.g. not Linux).
    pub fn read(pid: u32) -> Option<ProcStat> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let mut st = ProcStat::default();
        for line in text.lines() {
            let num = |l: &str| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            if line.starts_with("VmRSS:") {
                st.rss_kb = num(line);
            } else if line.starts_with("Threads:") {
                st.threads = num(line);
            }
        }
        Some(st)
    }

    pub fn to_obj(self) -> Obj {
        Obj::new().set("rss_kb", self.rss_kb).set("threads", self.threads)
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn server_binary(opts: &TargetOpts) -> Result<PathBuf, String> {
    if let Some(p) = &opts.server_bin {
        return Ok(p.clone());
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate chat-bench itself: {e}"))?;
    let dir = exe.parent().ok_or("chat-bench has no parent directory")?;
    // Test binaries live in target/<profile>/deps; the server is one level up then.
    for d in [dir, dir.parent().unwrap_or(dir)] {
        let p = d.join("chat-server");
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(format!(
        "cannot find the chat-server binary next to {} (build it, or pass --server-bin, --server or --in-process)",
        exe.display()
    ))
}

fn wait_listening(addr: &str, child: &mut Child, wait: Duration) -> Result<(), String> {
    let deadline = Instant::now() + wait;
    let sock = addr
        .to_socket_addrs()
        .map_err(|e| format!("bad address {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("bad address {addr}"))?;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("chat-server exited at start ({status}); see --server-log"));
        }
        if TcpStream::connect_timeout(&sock, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("chat-server did not listen on {addr} within {wait:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Target {
    /// Uses the external server or starts one as the options say.
    pub fn start(opts: &TargetOpts, needs: &Needs) -> Result<Target, String> {
        if let Some(addr) = &opts.server {
            return Ok(Target::External { addr: addr.clone(), pid: opts.server_pid });
        }
        let max_streams = needs.max_streams.unwrap_or(10_000);
        let history = needs.history.unwrap_or(500).max(1);
        let queue = opts.queue.unwrap_or(1024);
        if opts.in_process {
            // The same operating-system settings as `chat-server` makes by default.
            if let Err(e) = crate::os::futex::size_hash(max_streams) {
                eprintln!("chat-bench: cannot size the futex hash for {max_streams} streams: {e}");
            }
            let mut config = ServerConfig {
                listen: "127.0.0.1:0".into(),
                max_streams,
                queue_capacity: queue,
                on_thread_start: Some(crate::os::sched::on_thread_start),
                ..ServerConfig::default()
            };
            config.broker.history_limit = history;
            config.broker.rate_limit = None;
            config.broker.max_sessions = config.broker.max_sessions.max(max_streams * 2);
            let server =
                ChatServer::start(config).map_err(|e| format!("cannot start the in-process server: {e}"))?;
            return Ok(Target::InProcess { addr: server.addr(), server: Some(server) });
        }
        let bin = server_binary(opts)?;
        let port = free_port().map_err(|e| format!("cannot find a free port: {e}"))?;
        let addr = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(&bin);
        cmd.arg("--listen")
            .arg(&addr)
            .arg("--rate-limit")
            .arg("0")
            .arg("--max-streams")
            .arg(max_streams.to_string())
            .arg("--history")
            .arg(history.to_string())
            .arg("--queue")
            .arg(queue.to_string())
            .args(&opts.server_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        match &opts.server_log {
            Some(path) => {
                let f = std::fs::File::create(path)
                    .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
                cmd.stderr(f);
            }
            None => {
                cmd.stderr(Stdio::null());
            }
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        let mut child = cmd.spawn().map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        if let Err(e) = wait_listening(&addr, &mut child, Duration::from_secs(15)) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        Ok(Target::Child { addr, child })
    }

    pub fn addr(&self) -> &str {
        match self {
            Target::External { addr, .. } | Target::Child { addr, .. } | Target::InProcess { addr, .. } => {
                addr
            }
        }
    }

    /// The process whose memory is the server's (our own when in-process).
    pub fn pid(&self) -> Option<u32> {
        match self {
            Target::External { pid, .. } => *pid,
            Target::Child { child, .. } => Some(child.id()),
            Target::InProcess { .. } => Some(std::process::id()),
        }
    }

    /// "external", "child" or "in-process".
    pub fn kind(&self) -> &'static str {
        match self {
            Target::External { .. } => "external",
            Target::Child { .. } => "child",
            Target::InProcess { .. } => "in-process",
        }
    }

    /// The server's process figures, if it can be observed.
    pub fn stat(&self) -> Option<ProcStat> {
        self.pid().and_then(ProcStat::read)
    }

    /// Describes the target for the report.
    pub fn describe(&self) -> Obj {
        let mut o = Obj::new().set("kind", self.kind()).set("addr", self.addr());
        if let Some(pid) = self.pid() {
            o.push("pid", u64::from(pid));
        }
        o
    }

    /// Stops a server the bench started (SIGTERM-less: a child is killed after the
    /// streams are gone, which is all a benchmark needs).
    pub fn stop(self) {
        match self {
            Target::External { .. } => {}
            Target::Child { mut child, .. } => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Target::InProcess { mut server, .. } => {
                if let Some(s) = server.take() {
                    s.shutdown();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_counts_what_this_process_spends() {
        let me = std::process::id();
        let before = cpu_secs(me).expect("/proc/self/stat is readable");
        let start = Instant::now();
        // Spin for 300 ms of wall time on this thread.
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let spent = cpu_secs(me).unwrap() - before;
        let wall = start.elapsed().as_secs_f64();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        // The spinning thread may be preempted, never more than all CPUs for the wall time.
        assert!(spent >= 0.05, "spinning 300 ms counted only {spent} s");
        assert!(spent <= wall * cpus + 0.02, "{spent} s of CPU in {wall} s on {cpus} CPUs");
        assert_eq!(cpu_secs(u32::MAX), None, "no such process");
    }
}
