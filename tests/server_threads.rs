//! The threads an in-process server starts end when it shuts down. Alone in its test
//! binary, because it counts the threads of the whole process by name.

mod e2e;
mod procfs;

use std::collections::BTreeMap;
use std::time::Instant;

use e2e::{ChatStream, WAIT};
use grpc_chat::server::WriteBudget;

/// This process's threads whose names start with one of `prefixes`, counted by name.
fn threads_named(prefixes: &[&str]) -> BTreeMap<String, usize> {
    let mut names = BTreeMap::new();
    for name in procfs::thread_names(std::process::id()) {
        if prefixes.iter().any(|p| name.starts_with(p)) {
            *names.entry(name).or_default() += 1;
        }
    }
    names
}

#[test]
fn a_server_that_shuts_down_leaves_none_of_its_threads_running() {
    // The server's own threads. The test's client threads have no names of their own (so
    // on Linux they carry the test thread's).
    let ours = ["chat-", "grpc-cq", "grpc-shutdown"];
    assert!(threads_named(&ours).is_empty(), "before the server: {:?}", threads_named(&ours));
    // A fixed budget: an idle pacer thread then sleeps with no timeout (an adaptive one
    // below its top wakes for samples), so only the shutdown can wake it to end.
    let server = e2e::server(|c| {
        c.pacer_threads = 3;
        c.writes_per_second = WriteBudget::fixed(100_000);
    });
    let addr = server.addr();
    let client = e2e::client(&addr);
    // Two members and a message between them: stream threads, and pacer threads that
    // have written (and gone back to sleep).
    let (mut alice, _) = ChatStream::join(&client, "alice", "lobby");
    let (bob, _) = ChatStream::join(&client, "bob", "lobby");
    alice.post("hello");
    assert_eq!(bob.events.message().text, "hello");
    let running = threads_named(&ours);
    for name in ["chat-stream", "chat-timers", "chat-pacer", "chat-pacer-1", "chat-pacer-2"] {
        assert!(running.contains_key(name), "no {name} thread while serving: {running:?}");
    }
    assert!(running.keys().any(|n| n.starts_with("grpc-cq")), "no completion-queue thread: {running:?}");

    server.shutdown();
    let (code, _) = bob.events.end();
    assert_eq!(code, grpcio::RpcStatusCode::UNAVAILABLE, "the stream ends with the shutdown");
    drop((alice, bob, client));
    let deadline = Instant::now() + WAIT;
    loop {
        let left = threads_named(&ours);
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "still running {WAIT:?} after the shutdown: {left:?}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
