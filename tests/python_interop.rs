//! Python's grpcio against this crate, both ways round: a client generated from `proto/`
//! talks to the server (the wire contract works for external clients, not only for our
//! own stubs), and `chat-bench` drives a Python chat.v1 server (the bench works against
//! any server that speaks the contract, not only ours).
//!
//! Needs a Python with `grpcio` and `grpcio-tools` (`python3 -m pip install grpcio
//! grpcio-tools`; `.ci/run` installs them). Set `GRPC_CHAT_PYTHON` to choose the
//! interpreter. Where they are missing the tests say so and pass, unless
//! `GRPC_CHAT_REQUIRE_PYTHON=1` is set (as in CI), where they fail.

mod benchrun;
mod e2e;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use benchrun::{assert_verified, bench_waiting, one};

/// The Python interpreter to use, or `None` when it lacks grpcio/grpcio-tools (the test
/// then says it is skipped, unless `GRPC_CHAT_REQUIRE_PYTHON` is set).
fn python(test: &str) -> Option<String> {
    let python = std::env::var("GRPC_CHAT_PYTHON").unwrap_or_else(|_| "python3".into());
    let available = Command::new(&python)
        .args(["-c", "import grpc, grpc_tools"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !available {
        assert!(
            std::env::var("GRPC_CHAT_REQUIRE_PYTHON").is_err(),
            "GRPC_CHAT_REQUIRE_PYTHON is set but {python} cannot import grpc and grpc_tools"
        );
        eprintln!("SKIPPED {test}: {python} lacks grpcio/grpcio-tools");
        return None;
    }
    Some(python)
}

/// A scratch directory for generated Python code, unique to this process and `what`.
fn scratch(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("grpc-chat-py-{}-{what}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// `tests/interop/python_server.py` with a pool of `workers`, stopped when dropped.
struct PythonServer {
    child: Child,
    addr: String,
    dir: PathBuf,
}

impl PythonServer {
    fn start(python: &str, workers: usize, what: &str) -> PythonServer {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = scratch(what);
        let log = std::fs::File::create(dir.join("server.log")).expect("a log file");
        let mut child = Command::new(python)
            .arg(root.join("tests/interop/python_server.py"))
            .arg(root.join("proto"))
            .arg(&dir)
            .arg(workers.to_string())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("python runs");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut server = PythonServer { child, addr: String::new(), dir };
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        let port = line.strip_prefix("LISTENING ").map(str::trim);
        let port =
            port.unwrap_or_else(|| panic!("the Python server did not start: {line:?}\n{}", server.log()));
        server.addr = format!("127.0.0.1:{port}");
        server
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for PythonServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn python_grpcio_client_is_served() {
    let Some(python) = python("python_grpcio_client_is_served") else { return };
    let server = e2e::server(|_| {});
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = scratch("client");
    let run = Command::new(&python)
        .arg(root.join("tests/interop/python_client.py"))
        .arg(root.join("proto"))
        .arg(&out)
        .arg(server.addr())
        .output()
        .expect("python runs");
    let _ = std::fs::remove_dir_all(&out);
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success() && stdout.contains("INTEROP OK"),
        "python client failed:\n{stdout}\n{stderr}"
    );
}

/// `chat-bench` drives a chat.v1 server that is not this crate's — Python's grpcio, one
/// event per write, no batches — and checks every delivery of each scenario.
#[test]
fn chat_bench_drives_a_python_chat_v1_server() {
    let Some(python) = python("chat_bench_drives_a_python_chat_v1_server") else { return };
    let server = PythonServer::start(&python, 64, "bench");
    let at = ["--server", server.addr.as_str()];
    let scenario = |args: &[&str]| -> String {
        let out = bench_waiting(&[&at[..], args].concat(), 20);
        assert!(out.status.success(), "chat-bench {args:?}: {out:?}\nserver log:\n{}", server.log());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    let json = scenario(&["fanout", "--rooms", "2", "--members", "5", "--messages", "100", "--rate", "500"]);
    assert_verified(&json);
    assert_eq!(one(&json, "deliveries"), 100 * 5);

    let json = scenario(&["fanout", "--rooms", "1", "--members", "4", "--messages", "60", "--via", "send"]);
    assert_verified(&json);
    assert_eq!(one(&json, "deliveries"), 60 * 4);

    let json = scenario(&["join", "--clients", "5", "--history", "50"]);
    assert_verified(&json);
    assert_eq!(one(&json, "history_replayed_per_client"), 50);
    assert_eq!(one(&json, "received"), 5 * 50);

    let json = scenario(&["send", "--callers", "4", "--calls", "200"]);
    assert_verified(&json);
    assert_eq!(one(&json, "ok_calls"), 200);
    assert_eq!(one(&json, "received"), 200);

    let json = scenario(&["streams", "--streams", "20", "--rooms", "2", "--hold-secs", "0.1"]);
    assert_eq!(one(&json, "accepted"), 20);
    assert_eq!(one(&json, "held_to_the_end"), 20);
    assert_eq!(one(&json, "unsettled"), 0);
}

/// A Python server serves as many calls at once as its pool has workers; a stream past
/// them waits without an answer. `chat-bench streams` says so, and fails.
#[test]
fn chat_bench_says_how_many_streams_a_python_server_left_unanswered() {
    let Some(python) = python("chat_bench_says_how_many_streams_a_python_server_left_unanswered") else {
        return;
    };
    let server = PythonServer::start(&python, 4, "pool");
    // The wait is generous so that a slow machine still welcomes the first four in it.
    let out = bench_waiting(&["--server", &server.addr, "streams", "--streams", "6", "--hold-secs", "0"], 10);
    let json = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{json}\n{stderr}");
    assert_eq!(one(&json, "accepted"), 4, "{json}");
    assert_eq!(one(&json, "unsettled"), 2, "{json}");
    assert_eq!(one(&json, "held_to_the_end"), 4, "{json}");
    assert!(stderr.contains("2 of 6 streams had neither a welcome nor an error after 10 s"), "{stderr}");
}
