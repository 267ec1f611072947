//! The console client (`examples/client.rs`) run as a process with piped standard
//! input, talking to another console client through a real server on loopback.
//!
//! The example binary must be built: `cargo test` builds every example before running
//! tests, so a plain `cargo test` works. When only this test is selected
//! (`cargo test --test client_example`), run `cargo build --example client` first.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{unbounded, Receiver};
use grpc_chat::server::{ChatServer, ServerConfig};

const DEADLINE: Duration = Duration::from_secs(30);

/// `target/debug/examples/client`, next to the `deps` directory this test runs from.
fn client_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    let target = exe.parent().and_then(|deps| deps.parent()).expect("tests run from target/<profile>/deps");
    let path = target.join("examples").join(format!("client{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --example client` (a plain `cargo test` builds it)",
        path.display()
    );
    path
}

fn server() -> ChatServer {
    server_on("127.0.0.1:0")
}

fn server_on(listen: &str) -> ChatServer {
    let config = ServerConfig { listen: listen.into(), ..Default::default() };
    ChatServer::start(config).expect("the server starts on loopback")
}

/// A running console client: its stdin (while open) and its stdout, line by line.
struct Console {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Console {
    fn start(addr: &str, args: &[&str]) -> Console {
        let mut child = Command::new(client_binary())
            .arg("--server")
            .arg(addr)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the example starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, lines) = unbounded();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Console { name: args.first().unwrap_or(&"?").to_string(), child, stdin, lines, seen: Vec::new() }
    }

    fn type_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is still open");
        writeln!(stdin, "{line}").expect("the client reads its input");
        stdin.flush().unwrap();
    }

    fn type_bytes(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin is still open");
        stdin.write_all(bytes).expect("the client reads its input");
        stdin.flush().unwrap();
    }

    /// Closes stdin: end of input.
    fn end_input(&mut self) {
        self.stdin = None;
    }

    /// Waits for a printed line matching `want`; returns it.
    fn expect_line(&mut self, what: &str, want: impl Fn(&str) -> bool) -> String {
        let end = std::time::Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if want(&line) {
                        return line;
                    }
                }
                Err(_) => panic!("{} never printed {what}; it printed: {:#?}", self.name, self.seen),
            }
        }
    }

    /// Waits for the process to exit; returns its status code and the rest of stdout.
    fn wait_exit(mut self) -> (i32, Vec<String>, String) {
        self.end_input();
        let (tx, rx) = unbounded();
        let mut child = self.child;
        thread::spawn(move || {
            let status = child.wait();
            let mut err = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                let _ = stderr.read_to_string(&mut err);
            }
            let _ = tx.send((status, err));
        });
        let (status, stderr) = rx.recv_timeout(DEADLINE).expect("the client exits in time");
        let code = status.expect("the client ran").code().unwrap_or(-1);
        // The stdout reader ends when the process closes its stdout.
        let mut out = self.seen;
        while let Ok(line) = self.lines.recv_timeout(DEADLINE) {
            out.push(line);
        }
        (code, out, stderr)
    }
}

/// `[HH:MM:SS] [user] text`
fn is_message(line: &str, user: &str, text: &str) -> bool {
    let b = line.as_bytes();
    b.len() > 11
        && b[0] == b'['
        && b[3] == b':'
        && b[6] == b':'
        && b[9] == b']'
        && line[1..9].chars().all(|c| c.is_ascii_digit() || c == ':')
        && line[10..] == format!(" [{user}] {text}")
}

#[test]
fn two_consoles_chat_through_a_server() {
    let server = server();
    let addr = server.addr();
    let mut bob = Console::start(&addr, &["bob"]);
    bob.expect_line("its welcome", |l| l == "* you joined general as bob; members: bob");

    let mut alice = Console::start(&addr, &["alice", "general"]);
    alice.type_line("hello bob");
    alice.type_line("/list");
    alice.type_line("/history 5");
    alice.type_line("/nonsense");
    alice.end_input();
    let (code, out, stderr) = alice.wait_exit();
    assert_eq!(code, 0, "alice exits cleanly; stdout {out:#?} stderr {stderr}");
    assert_eq!(stderr, "");
    assert_eq!(out[0], "* you joined general as alice; members: alice, bob");
    assert!(is_message(&out[1], "alice", "hello bob"), "{out:#?}");
    assert_eq!(out[2], "* members of general: alice, bob");
    assert_eq!(out[3], "* the last 1 message(s) of general:");
    assert!(is_message(&out[4], "alice", "hello bob"), "{out:#?}");
    assert_eq!(out[5], "* unknown command /nonsense; type /help for the list of commands");
    assert_eq!(out.len(), 6, "{out:#?}");

    bob.expect_line("alice joining", |l| l == "* alice joined");
    bob.expect_line("alice's message", |l| is_message(l, "alice", "hello bob"));
    bob.expect_line("alice leaving", |l| l == "* alice left");

    // Bob answers; a late joiner gets it in the replay, then bob quits.
    bob.type_line("bye alice");
    bob.expect_line("his own echo", |l| is_message(l, "bob", "bye alice"));
    bob.type_line("/quit");
    let (code, _, stderr) = bob.wait_exit();
    assert_eq!((code, stderr.as_str()), (0, ""));

    let mut carol = Console::start(&addr, &["carol"]);
    carol.expect_line("the replay", |l| is_message(l, "bob", "bye alice"));
    carol.type_line("/rooms");
    carol.expect_line("the room list", |l| l == "* rooms: general (1 member)");
    let (code, _, _) = carol.wait_exit();
    assert_eq!(code, 0);
}

#[test]
fn a_name_given_on_stdin_and_room_switching() {
    let server = server();
    let addr = server.addr();
    let mut dave = Console::start(&addr, &[]);
    dave.type_line("dave");
    dave.expect_line("its welcome", |l| l == "* you joined general as dave; members: dave");
    dave.type_line("/join random");
    dave.expect_line("leaving general", |l| l == "* you left general");
    dave.expect_line("the switch", |l| l == "* you joined random as dave; members: dave");
    dave.type_line("in random");
    dave.expect_line("the echo", |l| is_message(l, "dave", "in random"));
    let (code, _, stderr) = dave.wait_exit();
    assert_eq!((code, stderr.as_str()), (0, ""));
}

#[test]
fn mistakes_print_one_sentence() {
    let server = server();
    let addr = server.addr();
    let mut bob = Console::start(&addr, &["bob"]);
    bob.expect_line("its welcome", |l| l.starts_with("* you joined general as bob"));

    let run = |args: &[&str]| {
        let out = Command::new(client_binary()).args(args).stdin(Stdio::null()).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = run(&["--server", &addr, "bob"]);
    assert_eq!((code, stdout.as_str()), (Some(1), ""));
    assert_eq!(stderr, "error: the name bob is already taken in room general\n");

    let (code, _, stderr) = run(&["--server", &addr, "eve", "no spaces"]);
    assert_eq!(code, Some(1));
    assert_eq!(
        stderr,
        "error: bad room name: \"no spaces\" may only contain letters, digits, '.', '_' and '-'\n"
    );

    let (code, _, stderr) = run(&["--server", &addr]);
    assert_eq!((code, stderr.as_str()), (Some(1), "error: no user name was given\n"));

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let nowhere = format!("127.0.0.1:{port}");
    let (code, _, stderr) = run(&["--server", &nowhere, "eve"]);
    assert_eq!(code, Some(1));
    assert_eq!(stderr, format!("error: cannot reach the server at {nowhere}\n"));

    // Mistakes inside a session are one line each, and the session goes on.
    bob.type_line("/history zero");
    bob.expect_line("the usage", |l| l == "* usage: /history [N], where N is a number of messages above 0");
    bob.type_line("/join");
    bob.expect_line("the usage", |l| l == "* usage: /join ROOM");
    bob.type_line("/join bad!room");
    bob.expect_line("the refusal", |l| {
        l == "* bad room name: \"bad!room\" may only contain letters, digits, '.', '_' and '-'"
    });
    bob.type_line("/retry");
    bob.expect_line("the answer", |l| l == "* already connected");
    // A line that is not UTF-8 (a terminal in another encoding) is refused; the next goes out.
    bob.type_bytes(b"caf\xe9\n");
    bob.expect_line("the refusal", |l| {
        l == "* that line is not UTF-8 (is the terminal set to UTF-8?); it was not sent"
    });
    bob.type_line("cafe");
    bob.expect_line("the next line", |l| is_message(l, "bob", "cafe"));
    bob.type_line("/quit");
    let (code, _, stderr) = bob.wait_exit();
    assert_eq!((code, stderr.as_str()), (0, ""));
}

#[test]
fn a_closed_output_makes_the_client_leave_and_exit_quietly() {
    let server = server();
    let addr = server.addr();
    let mut bob = Console::start(&addr, &["bob"]);
    bob.expect_line("its welcome", |l| l.starts_with("* you joined general as bob"));
    // `client erin | head -1`: the reader of erin's output goes away after one line.
    let mut erin = Command::new(client_binary())
        .args(["--server", &addr, "erin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the example starts");
    let mut first = String::new();
    BufReader::new(erin.stdout.take().expect("piped")).read_line(&mut first).expect("one line");
    assert!(first.starts_with("* you joined general as erin"), "{first}");
    bob.expect_line("erin joining", |l| l == "* erin joined");
    // Her output is closed now; her next line is still sent, and printing it ends her.
    let mut stdin = erin.stdin.take().expect("piped");
    writeln!(stdin, "the reader left").expect("erin reads her input");
    stdin.flush().unwrap();
    bob.expect_line("erin's message", |l| is_message(l, "erin", "the reader left"));
    bob.expect_line("erin leaving", |l| l == "* erin left");
    let (tx, rx) = unbounded();
    thread::spawn(move || {
        let status = erin.wait();
        let mut err = String::new();
        let _ = erin.stderr.take().expect("piped").read_to_string(&mut err);
        let _ = tx.send((status, err));
    });
    let (status, stderr) = rx.recv_timeout(DEADLINE).expect("erin exits in time");
    assert_eq!(status.expect("erin ran").code(), Some(0), "stderr: {stderr}");
    assert_eq!(stderr, "");
    drop(stdin);
}

#[test]
fn input_waits_while_a_thousand_messages_wait_for_the_server() {
    let first = server();
    let addr = first.addr();
    let mut erin = Console::start(&addr, &["erin", "backlog"]);
    erin.expect_line("its welcome", |l| l == "* you joined backlog as erin; members: erin");
    first.shutdown();
    erin.expect_line("the lost connection", |l| l.contains("reconnecting in"));
    // More lines than the client keeps unacknowledged (1000). The rest of them wait
    // unread in the pipe; none is lost.
    let lines: String = (1..=1050).map(|i| format!("line {i}\n")).collect();
    erin.type_bytes(lines.as_bytes());
    erin.expect_line("the pause", |l| l.starts_with("* 1000 messages are waiting for the server"));
    let mut config = ServerConfig { listen: addr.clone(), ..Default::default() };
    config.broker.rate_limit = None;
    config.broker.history_limit = 2000;
    let second = ChatServer::start(config).expect("the server restarts on the same address");
    let (code, out, stderr) = erin.wait_exit();
    assert_eq!((code, stderr.as_str()), (0, ""), "{out:#?}");
    let client = grpc_chat::client::Client::connect(&addr, DEADLINE).unwrap();
    let history: Vec<String> = client.history("backlog", 0, 0).unwrap().into_iter().map(|m| m.text).collect();
    let want: Vec<String> = (1..=1050).map(|i| format!("line {i}")).collect();
    assert_eq!(history.len(), want.len());
    assert!(history == want, "every line once, in order");
    drop(second);
}
