//! The client library against a real server on loopback: join, post, history, lists,
//! room switching, reconnect after a dropped stream and resume after a server restart.
//!
//! Every wait has a generous deadline and ends as soon as the awaited event arrives.

mod e2e;

use std::time::{Duration, Instant};

use grpc_chat::client::{ChatConfig, ChatSession, Client, ClientConfig, Error, Event};
use grpc_chat::core::RateLimit;
use grpc_chat::server::{ChatServer, ServerConfig};

const DEADLINE: Duration = Duration::from_secs(20);

fn server_on(listen: &str) -> ChatServer {
    let mut config = ServerConfig { listen: listen.into(), ..Default::default() };
    config.broker.history_limit = 500;
    ChatServer::start(config).expect("the server starts on loopback")
}

fn server() -> ChatServer {
    server_on("127.0.0.1:0")
}

fn connect(addr: &str) -> Client {
    Client::connect(addr, Duration::from_secs(10)).expect("connects to the test server")
}

/// Collects events until `done` returns true for one of them; panics with everything
/// seen when the deadline passes first.
fn wait_for(chat: &ChatSession, what: &str, mut done: impl FnMut(&Event) -> bool) -> Vec<Event> {
    let end = Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match chat.events().recv_timeout(left) {
            Ok(event) => {
                let hit = done(&event);
                seen.push(event);
                if hit {
                    return seen;
                }
            }
            Err(_) => panic!("{} never saw {what}; events: {seen:#?}", chat.user()),
        }
    }
}

fn is_text(event: &Event, text: &str) -> bool {
    matches!(event, Event::Message(m) if m.text == text)
}

fn texts(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(m.text.clone()),
            _ => None,
        })
        .collect()
}

fn welcome(chat: &ChatSession) -> Vec<Event> {
    wait_for(chat, "the welcome", |e| matches!(e, Event::Welcome { .. }))
}

#[test]
fn join_post_history_lists_and_errors() {
    let server = server();
    let addr = server.addr();
    let client = connect(&addr);

    let alice = client.enter("alice", "general").unwrap();
    welcome(&alice);
    let bob = client.enter("bob", "general").unwrap();
    welcome(&bob);
    wait_for(&alice, "bob joining", |e| matches!(e, Event::Presence { user, joined: true } if user == "bob"));

    let id = alice.post("hello bob").unwrap();
    let seen = wait_for(&alice, "the echo", |e| is_text(e, "hello bob"));
    match seen.last() {
        Some(Event::Message(m)) => {
            assert_eq!((m.user.as_str(), m.client_msg_id.as_str(), m.seq), ("alice", id.as_str(), 1));
        }
        other => panic!("unexpected {other:?}"),
    }
    alice.wait_acked(DEADLINE).unwrap();
    assert_eq!(alice.state().pending_posts, 0);
    wait_for(&bob, "alice's message", |e| is_text(e, "hello bob"));
    bob.post("hi alice").unwrap();
    wait_for(&alice, "bob's answer", |e| is_text(e, "hi alice"));

    let history = client.history("general", 0, 0).unwrap();
    let h: Vec<(&str, &str, u64)> =
        history.iter().map(|m| (m.user.as_str(), m.text.as_str(), m.seq)).collect();
    assert_eq!(h, vec![("alice", "hello bob", 1), ("bob", "hi alice", 2)]);
    assert_eq!(client.history("general", 1, 0).unwrap().len(), 1);
    assert_eq!(client.history("general", 0, 1).unwrap()[0].text, "hi alice");

    assert_eq!(client.list_members("general").unwrap(), vec!["alice", "bob"]);
    let rooms = client.list_rooms().unwrap();
    let general = rooms.iter().find(|r| r.name == "general").expect("general is listed");
    assert_eq!((general.members, general.last_seq), (2, 2));

    // Mistakes come back as one readable sentence.
    let taken = client.join("bob", "general").unwrap_err();
    assert_eq!(taken.to_string(), "the name bob is already taken in room general");
    let bad = client.join("carol", "no spaces here").unwrap_err();
    assert!(matches!(bad, Error::BadRoom(_)), "{bad:?}");
    assert!(bad.to_string().starts_with("bad room name: "), "{bad}");
    let bad = client.join("", "general").unwrap_err();
    assert!(matches!(bad, Error::BadName(_)), "{bad:?}");

    // A late joiner replays recent history before live messages.
    let carol = client.chat(&client.join("carol", "general").unwrap(), ChatConfig::default());
    let seen = wait_for(&carol, "the replay", |e| is_text(e, "hi alice"));
    assert_eq!(texts(&seen), vec!["hello bob", "hi alice"]);

    bob.leave().unwrap();
    wait_for(
        &alice,
        "bob leaving",
        |e| matches!(e, Event::Presence { user, joined: false } if user == "bob"),
    );
    assert_eq!(client.list_members("general").unwrap(), vec!["alice", "carol"]);
    alice.leave().unwrap();
    carol.leave().unwrap();
}

#[test]
fn unreachable_server_is_one_sentence() {
    // Bind and drop a listener to find a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let err = Client::connect(&addr, Duration::from_millis(300)).unwrap_err();
    assert_eq!(err.to_string(), format!("cannot reach the server at {addr}"));
}

#[test]
fn switching_rooms_leaves_the_old_one() {
    let server = server();
    let client = connect(&server.addr());
    let bob = client.enter("bob", "general").unwrap();
    welcome(&bob);
    let dave = client.enter("dave", "random").unwrap();
    welcome(&dave);
    let alice = client.enter("alice", "general").unwrap();
    welcome(&alice);
    wait_for(
        &bob,
        "alice joining",
        |e| matches!(e, Event::Presence { user, joined: true } if user == "alice"),
    );

    // Switch: join the new room, then leave the old one.
    let moved = client.enter("alice", "random").unwrap();
    welcome(&moved);
    alice.wait_acked(DEADLINE).unwrap();
    alice.leave().unwrap();
    wait_for(
        &bob,
        "alice leaving",
        |e| matches!(e, Event::Presence { user, joined: false } if user == "alice"),
    );
    wait_for(
        &dave,
        "alice arriving",
        |e| matches!(e, Event::Presence { user, joined: true } if user == "alice"),
    );

    moved.post("hi random").unwrap();
    wait_for(&dave, "alice's message", |e| is_text(e, "hi random"));
    assert_eq!(client.list_members("general").unwrap(), vec!["bob"]);
    assert_eq!(client.list_members("random").unwrap(), vec!["alice", "dave"]);
    assert!(client.history("general", 0, 0).unwrap().is_empty());
}

#[test]
fn reconnects_after_the_server_drops_the_stream_and_shows_each_message_once() {
    let server = server();
    let client = connect(&server.addr());
    let alice = client.enter("alice", "general").unwrap();
    welcome(&alice);
    let bob = client.enter("bob", "general").unwrap();
    welcome(&bob);
    for i in 1..=3 {
        bob.post(format!("before {i}")).unwrap();
    }
    wait_for(&alice, "the first messages", |e| is_text(e, "before 3"));
    let token = alice.state().session;

    server.drop_all_streams();
    wait_for(&alice, "the drop", |e| matches!(e, Event::Disconnected { .. }));
    // Posts made while away are queued and acknowledged after the resume.
    alice.post("while away").unwrap();
    let seen = wait_for(&alice, "the resume", |e| matches!(e, Event::Welcome { reconnected: true, .. }));
    assert!(!seen.contains(&Event::Gap), "{seen:?}");
    alice.wait_acked(DEADLINE).unwrap();
    bob.post("after").unwrap();
    let seen = wait_for(&alice, "bob's next message", |e| is_text(e, "after"));
    assert_eq!(texts(&seen), vec!["while away", "after"], "nothing is shown twice");
    assert_eq!(alice.state().session, token, "the same session was resumed");

    // /retry: skip the backoff.
    server.drop_all_streams();
    wait_for(&alice, "the second drop", |e| matches!(e, Event::Disconnected { .. }));
    alice.retry_now();
    wait_for(&alice, "the second resume", |e| matches!(e, Event::Welcome { reconnected: true, .. }));
    alice.leave().unwrap();
    bob.leave().unwrap();
}

#[test]
fn a_connection_that_goes_silent_is_noticed_and_the_session_resumes_over_a_new_one() {
    // C-core's client pings at most once a second; the server accepts pings twice as often.
    let ping = Duration::from_secs(1);
    let mut config = ServerConfig { listen: "127.0.0.1:0".into(), ..Default::default() };
    config.min_client_ping_interval = ping / 2;
    let server = ChatServer::start(config).expect("the server starts on loopback");
    let bob = connect(&server.addr()).enter("bob", "quiet").unwrap();
    welcome(&bob);
    // Carol's connection goes through a relay that will stop passing anything on, in
    // either direction, while keeping the connection open: no error ever reaches her.
    let relay = e2e::Relay::to(&server.addr());
    let config = ClientConfig {
        keepalive_interval: Some(ping),
        keepalive_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    let client = Client::connect_with(&relay.addr, config).expect("connects through the relay");
    let carol = client.enter("carol", "quiet").unwrap();
    welcome(&carol);
    // A quiet room for five pings: the server takes pings at this rate from a client it
    // sends nothing (with C-core's default policy it would cut her off after the third).
    bob.post("ping-pong").unwrap();
    wait_for(&carol, "bob's message", |e| is_text(e, "ping-pong"));
    std::thread::sleep(ping * 5);
    bob.post("still there").unwrap();
    let seen = wait_for(&carol, "bob's second message", |e| is_text(e, "still there"));
    assert!(!seen.iter().any(|e| matches!(e, Event::Disconnected { .. })), "{seen:?}");

    relay.cut();
    carol.post("into the void").unwrap();
    bob.post("while carol is cut off").unwrap();
    wait_for(&carol, "the lost connection", |e| matches!(e, Event::Disconnected { .. }));
    // Over a new connection she resumes her session: what she missed is replayed, and
    // her post, never acknowledged, is sent again and shown once.
    let seen = wait_for(&carol, "her own post", |e| is_text(e, "into the void"));
    assert!(seen.iter().any(|e| matches!(e, Event::Welcome { reconnected: true, .. })), "{seen:?}");
    assert_eq!(texts(&seen), vec!["while carol is cut off", "into the void"]);
    carol.wait_acked(DEADLINE).unwrap();
    bob.post("after").unwrap();
    let seen = wait_for(&carol, "bob's next message", |e| is_text(e, "after"));
    assert_eq!(texts(&seen), vec!["after"], "nothing is shown twice");
}

#[test]
fn resume_after_a_server_restart_rejoins_and_reports_the_gap() {
    let first = server();
    let addr = first.addr();
    let client = connect(&addr);
    let alice = client.enter("alice", "general").unwrap();
    welcome(&alice);
    alice.post("before the restart").unwrap();
    alice.wait_acked(DEADLINE).unwrap();
    let epoch = alice.state().epoch;

    first.shutdown();
    wait_for(&alice, "the drop", |e| matches!(e, Event::Disconnected { .. }));
    alice.post("during the restart").unwrap();
    let second = server_on(&addr);
    alice.retry_now();
    let seen = wait_for(&alice, "the gap", |e| *e == Event::Gap);
    assert!(seen.iter().any(|e| matches!(e, Event::Welcome { reconnected: true, .. })), "{seen:?}");
    alice.wait_acked(DEADLINE).unwrap();
    let state = alice.state();
    assert_ne!(state.epoch, epoch, "a new server has a new log");
    assert_eq!(state.last_seq, 1, "the re-sent post is the first message of the new log");
    let history = client.history("general", 0, 0).unwrap();
    assert_eq!(texts_of(&history), vec!["during the restart"]);
    alice.leave().unwrap();
    drop(second);
}

#[test]
fn posts_beyond_the_outbox_limit_are_refused_until_the_server_takes_some() {
    let first = server();
    let addr = first.addr();
    let client = connect(&addr);
    let joined = client.join("alice", "general").unwrap();
    let alice = client.chat(&joined, ChatConfig { max_pending_posts: 3, ..Default::default() });
    welcome(&alice);
    // With the server gone nothing is acknowledged: three posts wait, the fourth is refused.
    first.shutdown();
    wait_for(&alice, "the drop", |e| matches!(e, Event::Disconnected { .. }));
    for i in 1..=3 {
        alice.post(format!("queued {i}")).unwrap();
    }
    assert_eq!(alice.post("one too many"), Err(Error::OutboxFull(3)));
    assert_eq!(alice.state().pending_posts, 3);
    let room = alice.room_to_post();
    let all_acked = alice.acked();
    assert!(room.recv_timeout(Duration::from_millis(300)).is_err(), "no room while the server is away");

    let second = server_on(&addr);
    alice.retry_now();
    assert_eq!(room.recv_timeout(DEADLINE), Ok(Ok(())), "room once the new server takes the posts");
    alice.post("queued 4").unwrap();
    assert_eq!(all_acked.recv_timeout(DEADLINE), Ok(Ok(())));
    alice.wait_acked(DEADLINE).unwrap();
    assert_eq!(alice.state().pending_posts, 0);
    let history = client.history("general", 0, 0).unwrap();
    assert_eq!(texts_of(&history), vec!["queued 1", "queued 2", "queued 3", "queued 4"]);
    alice.leave().unwrap();
    drop(second);
}

fn texts_of(messages: &[grpc_chat::client::Message]) -> Vec<&str> {
    messages.iter().map(|m| m.text.as_str()).collect()
}

#[test]
fn piped_bursts_survive_the_rate_limit() {
    let mut config = ServerConfig { listen: "127.0.0.1:0".into(), ..Default::default() };
    config.broker.rate_limit = Some(RateLimit { per_second: 20.0, burst: 5 });
    let server = ChatServer::start(config).unwrap();
    let client = connect(&server.addr());
    let bob = client.enter("bob", "general").unwrap();
    welcome(&bob);
    let alice = client.enter("alice", "general").unwrap();
    welcome(&alice);
    let sent: Vec<String> = (1..=30).map(|i| format!("line {i}")).collect();
    for text in &sent {
        alice.post(text.clone()).unwrap();
    }
    alice.wait_acked(DEADLINE).unwrap();
    let mut got = Vec::new();
    wait_for(&bob, "all 30 lines", |e| {
        if let Event::Message(m) = e {
            got.push(m.text.clone());
        }
        got.len() == 30
    });
    got.sort();
    let mut want = sent.clone();
    want.sort();
    assert_eq!(got, want, "every line arrives exactly once");
    alice.leave().unwrap();
}

#[test]
fn a_post_too_big_for_the_server_is_rejected_and_the_next_one_goes_out() {
    let server = server();
    let client = connect(&server.addr());
    let alice = client.enter("alice", "general").unwrap();
    welcome(&alice);
    // Over gRPC's receive limit (1 KiB above the 4096-byte text limit): the server's
    // transport refuses the frame and ends the stream, so re-sending it would never end.
    let big = alice.post("z".repeat(6000)).unwrap();
    alice.post("after the big one").unwrap();
    let seen = wait_for(&alice, "the rejection", |e| matches!(e, Event::PostRejected { .. }));
    match seen.last() {
        Some(Event::PostRejected { client_msg_id, code, reason }) => {
            assert_eq!((client_msg_id, *code), (&big, grpc_chat::client::Code::ResourceExhausted));
            assert!(reason.ends_with("the server takes at most 5120"), "{reason}");
        }
        other => panic!("unexpected {other:?}"),
    }
    wait_for(&alice, "the next post", |e| is_text(e, "after the big one"));
    alice.wait_acked(DEADLINE).unwrap();
    // Now the session knows the limit: the next big post is refused without a round trip.
    let big = alice.post("y".repeat(5200)).unwrap();
    let seen = wait_for(&alice, "the second rejection", |e| matches!(e, Event::PostRejected { .. }));
    assert!(!seen.iter().any(|e| matches!(e, Event::Disconnected { .. })), "{seen:?}");
    assert!(matches!(seen.last(), Some(Event::PostRejected { client_msg_id, .. }) if *client_msg_id == big));
    assert_eq!(texts_of(&client.history("general", 0, 0).unwrap()), vec!["after the big one"]);
    alice.leave().unwrap();
}

#[test]
fn a_session_that_expired_before_it_saw_anything_rejoins_and_reports_the_gap() {
    let mut config = ServerConfig { listen: "127.0.0.1:0".into(), ..Default::default() };
    config.broker.history_limit = 5;
    config.broker.resume_grace = Duration::from_millis(1);
    let server = ChatServer::start(config).unwrap();
    let client = connect(&server.addr());
    // Bob keeps the room (and its epoch) alive; nobody has posted yet.
    let bob = client.join("bob", "quiet").unwrap();
    let mut chat_config = ChatConfig::default();
    // Reconnect only when told to, after the session has expired on the server.
    chat_config.session.backoff_initial = Duration::from_secs(600);
    let alice = client.chat(&client.join("alice", "quiet").unwrap(), chat_config);
    welcome(&alice);
    let (first_token, epoch) = (alice.state().session, alice.state().epoch);
    server.drop_all_streams();
    wait_for(&alice, "the drop", |e| matches!(e, Event::Disconnected { .. }));
    let end = Instant::now() + DEADLINE;
    while client.list_members("quiet").unwrap().contains(&"alice".to_owned()) {
        assert!(Instant::now() < end, "alice's session never expired");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Ten messages while she is away; the room keeps the last five.
    for i in 1..=10 {
        client.send(&bob.session, &format!("m{i}"), &format!("b{i}")).unwrap();
    }
    alice.retry_now();
    let seen = wait_for(&alice, "m10", |e| is_text(e, "m10"));
    let gap = seen.iter().position(|e| *e == Event::Gap).expect("the gap is reported");
    let first = seen.iter().position(|e| is_text(e, "m6")).expect("the retained messages follow");
    assert!(gap < first, "{seen:?}");
    assert_eq!(texts(&seen), vec!["m6", "m7", "m8", "m9", "m10"]);
    assert_ne!(alice.state().session, first_token, "she joined again: a new session");
    assert_eq!(alice.state().epoch, epoch, "in the same log: no epoch change told her");
    alice.leave().unwrap();
}
