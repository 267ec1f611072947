//! Every `chat.v1` RPC against a real server on loopback, and bad input answered with
//! the right status while the server keeps serving.

mod e2e;

use e2e::*;
use futures::executor::block_on;
use futures::{SinkExt, StreamExt};
use grpc_chat::pb::{self, client_frame::Frame, server_event::Event};
use grpcio::{GrpcSlice, Marshaller, MessageReader, Method, MethodType, RpcStatusCode};

#[test]
fn join_send_history_members_rooms_leave() {
    let server = server(|_| {});
    let c = client(&server.addr());

    let alice = c.join(&pb::JoinRequest { user: "alice".into(), room: "lobby".into() }).expect("alice joins");
    assert!(!alice.session.is_empty());
    assert_eq!(alice.members, vec!["alice".to_owned()]);
    assert_eq!((alice.last_seq, alice.member_count, alice.history_limit), (0, 1, 500));
    assert_ne!(alice.epoch, 0);

    let taken = c.join(&pb::JoinRequest { user: "alice".into(), room: "lobby".into() });
    assert_eq!(code_of(taken), RpcStatusCode::ALREADY_EXISTS);

    for (i, text) in ["one", "two", "three"].iter().enumerate() {
        let r = c.send(&pb::SendRequest {
            session: alice.session.clone(),
            text: (*text).into(),
            client_msg_id: format!("m{i}"),
        });
        assert_eq!(r.expect("send accepted"), pb::SendReply { seq: i as u64 + 1, duplicate: false });
    }
    let again = c.send(&pb::SendRequest {
        session: alice.session.clone(),
        text: "two".into(),
        client_msg_id: "m1".into(),
    });
    assert_eq!(again.expect("repeat answered"), pb::SendReply { seq: 2, duplicate: true });

    let history: Vec<pb::ChatMessage> = block_on(
        c.history(&pb::HistoryRequest { room: "lobby".into(), since_seq: 1, limit: 0 })
            .expect("history starts")
            .collect::<Vec<_>>(),
    )
    .into_iter()
    .map(|m| m.expect("history message"))
    .collect();
    assert_eq!(
        history.iter().map(|m| (m.seq, m.text.as_str())).collect::<Vec<_>>(),
        vec![(2, "two"), (3, "three")]
    );
    assert!(history.iter().all(|m| m.user == "alice" && m.room == "lobby" && m.sent_at_ms > 0));

    let limited: Vec<u64> = block_on(
        c.history(&pb::HistoryRequest { room: "lobby".into(), since_seq: 0, limit: 1 })
            .expect("history starts")
            .collect::<Vec<_>>(),
    )
    .into_iter()
    .map(|m| m.expect("history message").seq)
    .collect();
    assert_eq!(limited, vec![3], "limit keeps the newest");

    c.join(&pb::JoinRequest { user: "bob".into(), room: "lobby".into() }).expect("bob joins");
    c.join(&pb::JoinRequest { user: "carol".into(), room: "attic".into() }).expect("carol joins");
    let members = c.list_members(&pb::ListMembersRequest { room: "lobby".into() }).expect("members");
    assert_eq!(members.members, vec!["alice".to_owned(), "bob".to_owned()]);
    let rooms = c.list_rooms(&pb::ListRoomsRequest {}).expect("rooms");
    let summary: Vec<_> = rooms.rooms.iter().map(|r| (r.name.as_str(), r.members, r.last_seq)).collect();
    assert_eq!(summary, vec![("attic", 1, 0), ("lobby", 2, 3)]);

    c.leave(&pb::LeaveRequest { session: alice.session.clone() }).expect("alice leaves");
    let members = c.list_members(&pb::ListMembersRequest { room: "lobby".into() }).expect("members");
    assert_eq!(members.members, vec!["bob".to_owned()]);
    let after = c.send(&pb::SendRequest {
        session: alice.session,
        text: "late".into(),
        client_msg_id: String::new(),
    });
    assert_eq!(code_of(after), RpcStatusCode::FAILED_PRECONDITION, "posting after leave");
}

#[test]
fn chat_stream_relays_in_order_with_presence_and_echo() {
    let server = server(|_| {});
    let c = client(&server.addr());
    let (mut alice, w) = ChatStream::join(&c, "alice", "room1");
    assert_eq!((w.user.as_str(), w.room.as_str(), w.resumed, w.gap), ("alice", "room1", false, false));
    let (mut bob, w) = ChatStream::join(&c, "bob", "room1");
    assert_eq!(w.members, vec!["alice".to_owned(), "bob".to_owned()]);
    match alice.events.event() {
        Event::Presence(p) => assert_eq!((p.user.as_str(), p.joined), ("bob", true)),
        other => panic!("alice expected bob's presence, got {other:?}"),
    }
    alice.post("hi bob");
    bob.post("hi alice");
    for s in [&alice, &bob] {
        let a = s.events.message();
        let b = s.events.message();
        assert_eq!((a.seq, b.seq), (1, 2));
        let mut texts = [a.text, b.text];
        texts.sort();
        assert_eq!(texts, ["hi alice".to_owned(), "hi bob".to_owned()]);
    }
    bob.send(Frame::Leave(pb::Leave {}));
    assert_eq!(bob.events.end().0, RpcStatusCode::OK, "leave ends the stream with OK");
    match alice.events.event() {
        Event::Presence(p) => assert_eq!((p.user.as_str(), p.joined), ("bob", false)),
        other => panic!("alice expected bob to leave, got {other:?}"),
    }
}

#[test]
fn subscribe_with_session_and_anonymously() {
    let server = server(|_| {});
    let c = client(&server.addr());
    let joined = c.join(&pb::JoinRequest { user: "poster".into(), room: "news".into() }).expect("join");
    c.send(&pb::SendRequest {
        session: joined.session.clone(),
        text: "before".into(),
        client_msg_id: String::new(),
    })
    .expect("send");

    let anon = Events::spawn(
        c.subscribe(&pb::SubscribeRequest { room: "news".into(), ..Default::default() }).expect("subscribe"),
    );
    let w = anon.welcome();
    assert!(w.session.is_empty() && w.user.is_empty());
    assert_eq!(anon.message().text, "before", "replay of retained history");

    let mine = Events::spawn(
        c.subscribe(&pb::SubscribeRequest {
            session: joined.session.clone(),
            since_seq: 1,
            ..Default::default()
        })
        .expect("subscribe"),
    );
    let w = mine.welcome();
    assert_eq!((w.user.as_str(), w.room.as_str(), w.last_seq), ("poster", "news", 1));

    c.send(&pb::SendRequest { session: joined.session, text: "after".into(), client_msg_id: String::new() })
        .expect("send");
    assert_eq!(anon.message().seq, 2);
    assert_eq!(mine.message().seq, 2, "since_seq 1 skips the first message");

    let unknown = Events::spawn(
        c.subscribe(&pb::SubscribeRequest { session: "nope".into(), ..Default::default() }).expect("starts"),
    );
    assert_eq!(unknown.end().0, RpcStatusCode::NOT_FOUND);
}

#[test]
fn health_reports_serving() {
    let server = server(|_| {});
    let env = std::sync::Arc::new(grpcio::EnvBuilder::new().build());
    let ch = grpcio::ChannelBuilder::new(env).connect(&server.addr());
    let health = grpcio_health::HealthClient::new(ch);
    let reply = health
        .check(&grpcio_health::proto::HealthCheckRequest { service: String::new() })
        .expect("health check");
    assert_eq!(reply.status, grpcio_health::proto::ServingStatus::Serving as i32);
}

#[test]
fn malformed_input_gets_the_right_status_and_server_keeps_serving() {
    let server = server(|_| {});
    let c = client(&server.addr());

    let mut early = ChatStream::open(&c);
    early.post("before hello");
    assert_eq!(early.events.end().0, RpcStatusCode::INVALID_ARGUMENT, "post before hello");

    let mut empty = ChatStream::open(&c);
    // The send itself may already see the call ended by the server; the status is what counts.
    let _ = block_on(futures::SinkExt::send(
        &mut empty.tx,
        (pb::ClientFrame { frame: None }, grpcio::WriteFlags::default()),
    ));
    assert_eq!(empty.events.end().0, RpcStatusCode::INVALID_ARGUMENT, "empty frame");

    let mut ghost = ChatStream::open(&c);
    ghost.send(resume("s0123456789abcdef0123456789abcdef", 0, 0));
    assert_eq!(ghost.events.end().0, RpcStatusCode::NOT_FOUND, "unknown session");

    let (mut twice, _) = ChatStream::join(&c, "twice", "r");
    twice.send(hello("twice", "r"));
    assert_eq!(twice.events.end().0, RpcStatusCode::FAILED_PRECONDITION, "second hello");

    let mut bad_name = ChatStream::open(&c);
    bad_name.send(hello("x", "no spaces allowed"));
    assert_eq!(bad_name.events.end().0, RpcStatusCode::INVALID_ARGUMENT, "bad room name");

    // Text just over the limit: rejected by the core, in-band, the stream stays open.
    let (mut poster, _) = ChatStream::join(&c, "poster", "r");
    poster.send(Frame::Post(pb::Post { text: "x".repeat(4097), client_msg_id: "big".into() }));
    match poster.events.event() {
        Event::Notice(n) => {
            assert_eq!(n.code, i32::from(RpcStatusCode::INVALID_ARGUMENT));
            assert_eq!(n.client_msg_id, "big");
        }
        other => panic!("expected a notice, got {other:?}"),
    }
    poster.post("still here");
    assert_eq!(poster.events.message().text, "still here");

    // Far over the gRPC receive limit: the transport refuses the whole frame.
    poster.send(Frame::Post(pb::Post { text: "y".repeat(64 * 1024), client_msg_id: String::new() }));
    assert_eq!(poster.events.end().0, RpcStatusCode::RESOURCE_EXHAUSTED, "frame over the receive limit");

    let unknown =
        c.send(&pb::SendRequest { session: "bogus".into(), text: "x".into(), client_msg_id: String::new() });
    assert_eq!(code_of(unknown), RpcStatusCode::NOT_FOUND);
    let control = c.join(&pb::JoinRequest { user: "bad\u{7}name".into(), room: "r".into() });
    assert_eq!(code_of(control), RpcStatusCode::INVALID_ARGUMENT);
    let long = c.join(&pb::JoinRequest { user: "u".repeat(33), room: "r".into() });
    assert_eq!(code_of(long), RpcStatusCode::INVALID_ARGUMENT);
    let bad_room =
        c.history(&pb::HistoryRequest { room: "a b".into(), since_seq: 0, limit: 0 }).expect("starts");
    let first = block_on(bad_room.collect::<Vec<_>>());
    assert!(
        matches!(&first[..], [Err(grpcio::Error::RpcFailure(s))] if s.code() == RpcStatusCode::INVALID_ARGUMENT)
    );

    // After all of that, the server still serves.
    let (mut ok, w) = ChatStream::join(&c, "survivor", "r");
    let replayed: Vec<u64> = (0..w.last_seq).map(|_| ok.events.message().seq).collect();
    assert_eq!(replayed, vec![1], "the retained message is replayed first");
    ok.post("fine");
    assert_eq!(ok.events.message().text, "fine");
    assert_eq!(
        c.list_members(&pb::ListMembersRequest { room: "r".into() }).expect("members").members.len(),
        3
    );
}

/// A method of `chat.v1.Chat` that sends and receives raw bytes, to send what no stub would.
fn raw_method(ty: MethodType, name: &'static str) -> Method<Vec<u8>, Vec<u8>> {
    fn ser(bytes: &Vec<u8>, out: &mut GrpcSlice) -> grpcio::Result<()> {
        *out = GrpcSlice::from(bytes.as_slice());
        Ok(())
    }
    fn de(mut reader: MessageReader) -> grpcio::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut reader, &mut bytes).map_err(|e| grpcio::Error::Codec(Box::new(e)))?;
        Ok(bytes)
    }
    let path = Box::leak(format!("/chat.v1.Chat/{name}").into_boxed_str());
    Method { ty, name: path, req_mar: Marshaller { ser, de }, resp_mar: Marshaller { ser, de } }
}

fn failure<T: std::fmt::Debug>(r: grpcio::Result<T>) -> (RpcStatusCode, String) {
    match r {
        Err(grpcio::Error::RpcFailure(s)) => (s.code(), s.message().to_owned()),
        other => panic!("expected an RPC failure, got {other:?}"),
    }
}

#[test]
fn requests_that_do_not_decode_get_invalid_argument_on_every_method() {
    let server = server(|_| {});
    let env = std::sync::Arc::new(grpcio::EnvBuilder::new().cq_count(1).build());
    let ch = grpcio::ChannelBuilder::new(env).connect(&server.addr());
    assert!(block_on(ch.wait_for_connected(WAIT)), "connects");
    let raw = grpcio::Client::new(ch.clone());
    let opt = || grpcio::CallOption::default().timeout(WAIT);

    // (bytes, what the status must say): in every request, field 1 is a string.
    let undecodable: [(&[u8], &str); 3] = [
        (b"\xff\xff\xff", "invalid varint"),
        (b"\x0a\x02\xc3\x28", "not UTF-8"), // field 1, two bytes that are not UTF-8
        (b"\x0a\x10ab", "buffer underflow"), // field 1 announces 16 bytes, 2 follow
    ];
    for (bytes, says) in undecodable {
        for name in ["Join", "Send", "Leave", "ListMembers", "ListRooms"] {
            if name == "ListRooms" && says == "not UTF-8" {
                // ListRoomsRequest has no field 1: an unknown field is skipped, not checked.
                let reply = raw.unary_call(&raw_method(MethodType::Unary, name), &bytes.to_vec(), opt());
                assert!(reply.is_ok(), "{name} with an unknown field: {reply:?}");
                continue;
            }
            let (code, message) =
                failure(raw.unary_call(&raw_method(MethodType::Unary, name), &bytes.to_vec(), opt()));
            assert_eq!(code, RpcStatusCode::INVALID_ARGUMENT, "{name}, {says}: {message}");
            assert!(message.starts_with("malformed request:") && message.contains(says), "{name}: {message}");
        }
        for name in ["History", "Subscribe"] {
            let method = raw_method(MethodType::ServerStreaming, name);
            let replies = raw.server_streaming(&method, &bytes.to_vec(), opt()).expect("starts");
            let replies = block_on(replies.collect::<Vec<_>>());
            let [only] = <[_; 1]>::try_from(replies).expect("one failure and nothing else");
            let (code, message) = failure(only);
            assert_eq!(code, RpcStatusCode::INVALID_ARGUMENT, "{name}, {says}: {message}");
            assert!(message.starts_with("malformed request:") && message.contains(says), "{name}: {message}");
        }
        let (mut frames, mut events) =
            raw.duplex_streaming(&raw_method(MethodType::Duplex, "Chat"), opt()).expect("starts");
        let _ = block_on(frames.send((bytes.to_vec(), grpcio::WriteFlags::default())));
        let (code, message) = failure(block_on(events.next()).expect("the stream ends with a status"));
        assert_eq!(code, RpcStatusCode::INVALID_ARGUMENT, "Chat, {says}: {message}");
        assert!(message.starts_with("malformed frame:"), "Chat: {message}");
        drop(frames);
    }

    // None of it took a session or a stream: the server still serves.
    let c = pb::ChatClient::new(ch);
    let joined = c.join(&pb::JoinRequest { user: "after".into(), room: "r".into() }).expect("join");
    assert_eq!(joined.members, vec!["after".to_owned()]);
}

#[test]
fn rate_limit_answers_resource_exhausted() {
    let server =
        server(|c| c.broker.rate_limit = Some(grpc_chat::core::RateLimit { per_second: 0.001, burst: 2 }));
    let c = client(&server.addr());
    let s = c.join(&pb::JoinRequest { user: "fast".into(), room: "r".into() }).expect("join").session;
    let send = |t: &str| {
        c.send(&pb::SendRequest { session: s.clone(), text: t.into(), client_msg_id: String::new() })
    };
    send("1").expect("within burst");
    send("2").expect("within burst");
    assert_eq!(code_of(send("3")), RpcStatusCode::RESOURCE_EXHAUSTED);
}

/// Waits until `done` holds, checking every 10 ms; panics naming `what` after `WAIT`.
fn until(what: &str, done: impl Fn() -> bool) {
    let started = std::time::Instant::now();
    while !done() {
        assert!(started.elapsed() < WAIT, "not within {WAIT:?}: {what}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn directory_replies_a_client_does_not_take_are_held_within_a_budget_given_back_when_the_calls_end() {
    const BUDGET: usize = 300_000;
    let server = server(|c| {
        c.directory_reply_bytes = BUDGET;
        c.broker.attach_timeout = std::time::Duration::from_secs(600);
    });
    let c = client(&server.addr());
    // 2000 rooms with 60-character names: a ListRooms reply of about 130 KB, twice the
    // window the stopped client below grants each call.
    for i in 0..2000 {
        let room = format!("room-{i:055}");
        c.join(&pb::JoinRequest { user: "u".into(), room }).expect("joins");
    }
    let size = prost::Message::encoded_len(&c.list_rooms(&pb::ListRoomsRequest {}).expect("lists"));
    assert!(2 * size <= BUDGET && 3 * size > BUDGET, "two replies of {size} bytes fit, three do not");
    assert_eq!(server.stats().directory_reply_bytes, 0, "a reply taken is given back");

    // A client that stops reading, with a 64 KiB window per call and no more.
    let relay = Relay::to(&server.addr());
    let env = std::sync::Arc::new(grpcio::EnvBuilder::new().cq_count(1).build());
    let channel = grpcio::ChannelBuilder::new(env)
        .use_local_subchannel_pool(true)
        .http2_bdp_probe(false)
        .stream_initial_window_size(64 * 1024)
        .connect(&relay.addr);
    assert!(block_on(channel.wait_for_connected(WAIT)), "connects through the relay");
    let stopped = pb::ChatClient::new(channel);
    relay.freeze();
    let calls: Vec<_> =
        (0..3).map(|_| stopped.list_rooms_async(&pb::ListRoomsRequest {}).expect("starts")).collect();
    // Two replies are held for it; the third call was refused.
    until("two replies held", || server.stats().directory_reply_bytes == 2 * size);

    let refused = c.list_rooms(&pb::ListRoomsRequest {});
    let (code, msg) = failure(refused);
    assert_eq!(code, RpcStatusCode::RESOURCE_EXHAUSTED, "{msg}");
    assert!(msg.contains("ListRooms and ListMembers replies"), "{msg}");
    // What still fits is answered: a room of one member.
    let small = c.list_members(&pb::ListMembersRequest { room: format!("room-{:055}", 7) });
    assert_eq!(small.expect("a small reply fits").members, ["u"]);

    // Cancelled, the stopped client's calls give their bytes back.
    drop((calls, stopped));
    until("the budget given back", || server.stats().directory_reply_bytes == 0);
    assert_eq!(c.list_rooms(&pb::ListRoomsRequest {}).expect("lists again").rooms.len(), 2000);
}
