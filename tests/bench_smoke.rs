//! Smoke test of `chat-bench`: a tiny run of every scenario against a server the bench
//! starts itself (the `chat-server` binary next to it, or in its own process with
//! `--in-process`), checking the exit status and the verification figures of the JSON
//! report. No speed is asserted.

use std::process::Command;

use grpc_chat::server::{ChatServer, ServerConfig};

mod benchrun;
#[cfg(target_os = "linux")]
mod procfs;

use benchrun::{assert_verified, bench, float, one, run_ok, values};

#[test]
fn fanout_delivers_everything_in_order() {
    let json = run_ok(&["fanout", "--rooms", "1", "--members", "5", "--messages", "50", "--rate", "2000"]);
    assert_verified(&json);
    assert_eq!(one(&json, "members_checked"), 5);
    assert_eq!(one(&json, "deliveries"), 250);
    assert_eq!(one(&json, "received"), 250);
    assert_eq!(one(&json, "rejected_posts"), 0);
    // The child server's CPU and the bench's own are reported apart.
    let cpu = &json[json.find("\"cpu_cores\": {").expect("a cpu_cores object")..];
    let cpu = &cpu[..cpu.find('}').unwrap()];
    assert!(cpu.contains("\"server\": ") && cpu.contains("\"load_generator\": "), "{cpu}");
    // Publishing waited until no event (the joins' presence) had arrived for 200 ms.
    let settle = float(&json, "settle_secs");
    assert!((0.2..20.0).contains(&settle), "settle_secs {settle}");
}

#[test]
fn fanout_over_two_rooms_via_send() {
    let json = run_ok(&[
        "fanout",
        "--rooms",
        "2",
        "--members",
        "3",
        "--publishers",
        "2",
        "--messages",
        "40",
        "--rate",
        "2000",
        "--via",
        "send",
    ]);
    assert_verified(&json);
    assert_eq!(one(&json, "deliveries"), 40 * 3);
}

#[test]
fn fanout_ramp_finds_a_sustainable_step() {
    let json = run_ok(&[
        "fanout",
        "--members",
        "5",
        "--ramp",
        "--rate",
        "200",
        "--ramp-steps",
        "2",
        "--step-secs",
        "0.2",
        "--max-p99-ms",
        "2000",
    ]);
    for key in ["duplicates", "reordered"] {
        assert!(values(&json, key).iter().all(|&n| n == 0), "{key} in {json}");
    }
    assert!(json.contains("\"best\": {"), "{json}");
}

#[test]
fn a_ramp_without_a_sustainable_step_says_why_and_is_not_called_a_verification_failure() {
    // No step can have a p99 of at most 0 ms.
    let args =
        ["fanout", "--members", "3", "--ramp", "--rate", "100", "--step-secs", "0.2", "--max-p99-ms", "0"];
    let out = bench(&args);
    let json = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{json}\n{stderr}");
    assert!(
        stderr.contains("no step of the ramp was sustainable: the first, at 100 msg/s, had p99")
            && stderr.contains("over --max-p99-ms 0"),
        "{stderr}"
    );
    assert!(!stderr.contains("verification FAILED"), "{stderr}");
    assert!(json.contains("\"why_not\": \"had p99 "), "{json}");
    assert!(json.contains("\"best\": \"none"), "{json}");
    // What was delivered checked out.
    assert_verified(&json);
    assert!(json.contains("\"ok\": true"), "{json}");
}

#[test]
fn streams_are_all_accepted() {
    let json = run_ok(&["streams", "--streams", "50", "--rooms", "2", "--hold-secs", "0.1"]);
    assert_eq!(one(&json, "accepted"), 50);
    assert_eq!(one(&json, "refused"), 0);
    assert_eq!(one(&json, "cut_off_while_holding"), 0);
}

#[test]
fn streams_past_the_limit_are_refused() {
    let json = run_ok(&["streams", "--streams", "30", "--max-streams", "20", "--hold-secs", "0"]);
    assert_eq!(one(&json, "accepted"), 20);
    assert_eq!(one(&json, "refused"), 10);
    assert_eq!(one(&json, "RESOURCE_EXHAUSTED"), 10);
    // The status message comes with the code, so the report says why without the server's log.
    let messages = &json[json.find("\"refused_messages\": {").expect("a refused_messages object")..];
    assert!(
        messages.starts_with("\"refused_messages\": {\n    \"RESOURCE_EXHAUSTED\": \"RpcFailure: 8-"),
        "{json}"
    );
}

#[test]
fn join_replays_the_whole_history() {
    let json = run_ok(&["join", "--clients", "5", "--history", "50"]);
    assert_verified(&json);
    assert_eq!(one(&json, "history_replayed_per_client"), 50);
    assert_eq!(one(&json, "received"), 5 * 50);
    assert_eq!(one(&json, "incomplete"), 0);
}

#[test]
fn send_calls_all_succeed() {
    let json = run_ok(&["send", "--callers", "4", "--calls", "100"]);
    assert_verified(&json);
    assert_eq!(one(&json, "ok_calls"), 100);
    assert_eq!(one(&json, "failed_calls"), 0);
    assert_eq!(one(&json, "received"), 100);
}

#[test]
fn unreachable_server_exits_with_2() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let out = bench(&["send", "--server", &addr, "--calls", "1"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach"), "{err}");
}

#[test]
fn fanout_with_the_benchs_own_http2_receivers() {
    let json = run_ok(&[
        "--receivers",
        "h2",
        "--connections",
        "3",
        // A fixed budget high enough that all three (default) pacer threads write, whatever
        // the load of the machine running the tests.
        "--server-arg=--writes-per-second=100000",
        "fanout",
        "--rooms",
        "2",
        "--members",
        "6",
        "--messages",
        "60",
        "--rate",
        "2000",
    ]);
    assert!(json.contains("\"receivers\": \"h2\""), "{json}");
    assert_verified(&json);
    assert_eq!(one(&json, "members_checked"), 12);
    // Two publishers (grpcio), 30 messages each, to 6 members of each room.
    assert_eq!(one(&json, "deliveries"), 60 * 6);
    assert_eq!(one(&json, "received"), 60 * 6);
}

#[test]
fn http2_receivers_report_the_status_of_a_refused_stream() {
    let server = ChatServer::start(ServerConfig {
        listen: "127.0.0.1:0".into(),
        max_streams: 4,
        ..ServerConfig::default()
    })
    .expect("server starts");
    let out = bench(&[
        "--server",
        &server.addr(),
        "--receivers",
        "h2",
        "fanout",
        "--members",
        "6",
        "--messages",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused 2 of 6") && err.contains("RESOURCE_EXHAUSTED"), "{err}");
}

/// `--in-process` runs the library's server inside the bench, set up as `chat-server` sets
/// up its own: completion-queue threads as `SCHED_BATCH`, stream threads as normal ones.
/// The policies are read while the run is on, once a progress line says every member was
/// welcomed (the completion-queue threads set theirs as they start, the stream threads
/// before they welcome).
#[cfg(target_os = "linux")]
#[test]
fn the_in_process_server_schedules_its_threads_like_chat_server() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    use procfs::{policies_of, thread_policies, SCHED_BATCH, SCHED_OTHER};

    // 400 messages at 50/s: about 8 s of publishing, over which progress lines come every few s.
    let mut child = Command::new(env!("CARGO_BIN_EXE_chat-bench"))
        .args(["--in-process", "--json", "--timeout-secs", "60"])
        .args(["fanout", "--rooms", "1", "--members", "3", "--messages", "400", "--rate", "50"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chat-bench runs");
    let stderr = BufReader::new(child.stderr.take().expect("piped stderr"));
    let mut lines = stderr.lines();
    let welcomed = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|line| line.contains("fanout: welcomed 3/3"))
        .expect("a progress line with every member welcomed");
    let threads = thread_policies(child.id());
    let policies = |prefix: &str| policies_of(&threads, prefix);
    assert!(policies("grpc-cq").contains(&SCHED_BATCH), "{welcomed}: {threads:?}");
    assert_eq!(policies("chat-stream").len(), 3, "{threads:?}");
    assert!(policies("chat-stream").iter().all(|&p| p == SCHED_OTHER), "{threads:?}");
    // The bench's own completion-queue threads are left alone.
    assert!(policies("bench-cq").iter().all(|&p| p == SCHED_OTHER), "{threads:?}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let out = child.wait_with_output().expect("chat-bench ends");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}:\n{stdout}\n{rest:?}", out.status);
    assert_verified(&stdout);
    assert_eq!(one(&stdout, "deliveries"), 1200);
}
