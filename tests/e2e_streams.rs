//! Streams under load and in trouble: many members posting at once, resume after a
//! dropped stream, the stream limit, a member that never reads, shutdown.

mod e2e;

use std::collections::HashMap;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use e2e::*;
use futures::executor::block_on;
use futures::{SinkExt, StreamExt};
use grpc_chat::pb::{self, client_frame::Frame, server_event::Event};
use grpcio::{ChannelBuilder, EnvBuilder, RpcStatusCode};

/// Whether a stream joining room `r` as `user` is let in within 200 tries: a place under
/// the stream limit that was just given up may take a moment to be released.
fn gets_in_soon(c: &pb::ChatClient, user: &str) -> bool {
    (0..200).any(|_| {
        let mut s = ChatStream::open(c);
        s.send(hello(user, "r"));
        match s.events.next() {
            Seen::Event(Event::Welcome(_)) => true,
            Seen::End(RpcStatusCode::RESOURCE_EXHAUSTED, _) => false,
            other => panic!("unexpected {other:?}"),
        }
    })
}

#[test]
fn fifty_clients_in_three_rooms_see_their_room_in_order() {
    const CLIENTS: usize = 50;
    const POSTS: usize = 20;
    let server = server(|_| {});
    let env = Arc::new(EnvBuilder::new().cq_count(2).build());
    let rooms = ["red", "green", "blue"];
    let mut members = Vec::new();
    for i in 0..CLIENTS {
        let c = client_in(Arc::clone(&env), &server.addr());
        let room = rooms[i % 3];
        let (s, _) = ChatStream::join(&c, &format!("user{i}"), room);
        members.push((c, s, room));
    }
    let expected_per_room: HashMap<&str, usize> =
        rooms.iter().map(|r| (*r, members.iter().filter(|m| m.2 == *r).count() * POSTS)).collect();

    // Everyone posts at once.
    let posters: Vec<_> = members
        .into_iter()
        .enumerate()
        .map(|(i, (c, mut s, room))| {
            thread::spawn(move || {
                for n in 0..POSTS {
                    s.send(Frame::Post(pb::Post {
                        text: format!("user{i} #{n}"),
                        client_msg_id: format!("{i}-{n}"),
                    }));
                }
                (c, s, room, i)
            })
        })
        .collect();
    let members: Vec<_> = posters.into_iter().map(|t| t.join().expect("poster thread")).collect();

    for (_c, s, room, i) in &members {
        let want = expected_per_room[room];
        let mut own = 0;
        for expected_seq in 1..=want as u64 {
            let m = s.events.message();
            assert_eq!(m.room, *room, "member {i} got a message of another room");
            assert_eq!(m.seq, expected_seq, "member {i} in {room}: gap, duplicate or reorder");
            if m.user == format!("user{i}") {
                own += 1;
            }
        }
        assert_eq!(own, POSTS, "member {i} saw each of its own posts once");
    }
}

#[test]
fn resume_after_dropped_stream_loses_and_duplicates_nothing() {
    let server = server(|_| {});
    let c = client(&server.addr());
    let (alice, w) = ChatStream::join(&c, "alice", "r");
    let (token, epoch) = (w.session.clone(), w.epoch);
    let (mut bob, _) = ChatStream::join(&c, "bob", "r");
    let _ = alice.events.event(); // bob's presence

    for n in 1..=3 {
        bob.post(&format!("m{n}"));
    }
    let mut last = 0;
    for _ in 0..3 {
        last = alice.events.message().seq;
    }
    assert_eq!(last, 3);

    // The server side drops every stream (as if the connection were cut).
    server.drop_all_streams();
    assert_eq!(alice.events.end().0, RpcStatusCode::RESOURCE_EXHAUSTED);
    assert_eq!(bob.events.end().0, RpcStatusCode::RESOURCE_EXHAUSTED);

    // Both sessions survive the drop; while alice is away, a message arrives.
    let members = c.list_members(&pb::ListMembersRequest { room: "r".into() }).expect("members");
    assert_eq!(members.members, vec!["alice".to_owned(), "bob".to_owned()], "sessions survive the drop");
    drop(bob);
    let sent = c.send(&pb::SendRequest {
        session: token.clone(),
        text: "m4 via Send".into(),
        client_msg_id: "x".into(),
    });
    assert_eq!(sent.expect("a detached session can still Send").seq, 4);

    let mut alice2 = ChatStream::open(&c);
    alice2.send(resume(&token, last, epoch));
    let w = alice2.events.welcome();
    assert!(w.resumed && !w.gap, "resumed without gap: {w:?}");
    let m = alice2.events.message();
    assert_eq!((m.seq, m.text.as_str()), (4, "m4 via Send"), "exactly the missed message");
    alice2.post("back");
    assert_eq!(alice2.events.message().seq, 5, "no duplicate of 1..=3 before live traffic");
    assert!(alice2.events.is_empty() || !matches!(alice2.events.next(), Seen::Event(Event::Message(_))));
}

#[test]
fn resume_reports_gap_when_history_was_lost() {
    let server = server(|c| c.broker.history_limit = 3);
    let c = client(&server.addr());
    let (_alice, w) = ChatStream::join(&c, "alice", "r");
    let s = c.join(&pb::JoinRequest { user: "bob".into(), room: "r".into() }).expect("bob").session;
    for n in 0..10 {
        c.send(&pb::SendRequest { session: s.clone(), text: format!("m{n}"), client_msg_id: String::new() })
            .expect("send");
    }
    let mut again = ChatStream::open(&c);
    again.send(resume(&w.session, 2, w.epoch));
    let w2 = again.events.welcome();
    assert!(w2.gap, "messages 3..=7 are gone");
    let seqs: Vec<u64> = (0..3).map(|_| again.events.message().seq).collect();
    assert_eq!(seqs, vec![8, 9, 10]);

    let mut other_epoch = ChatStream::open(&c);
    let s2 = c.join(&pb::JoinRequest { user: "carol".into(), room: "r".into() }).expect("carol").session;
    other_epoch.send(resume(&s2, 9, w.epoch.wrapping_add(12345)));
    let w3 = other_epoch.events.welcome();
    assert!(w3.gap, "a different epoch means a new log");
    assert_eq!(other_epoch.events.message().seq, 8, "everything retained is replayed");
}

#[test]
fn stream_limit_refuses_at_once_with_resource_exhausted() {
    let server = server(|c| c.max_streams = 3);
    let c = client(&server.addr());
    let held: Vec<_> = (0..3).map(|i| ChatStream::join(&c, &format!("u{i}"), "r").0).collect();
    let mut extra = ChatStream::open(&c);
    extra.send(hello("u3", "r"));
    let (code, msg) = extra.events.end();
    assert_eq!(code, RpcStatusCode::RESOURCE_EXHAUSTED, "{msg}");
    let sub = Events::spawn(
        c.subscribe(&pb::SubscribeRequest { room: "r".into(), ..Default::default() }).expect("starts"),
    );
    assert_eq!(sub.end().0, RpcStatusCode::RESOURCE_EXHAUSTED);
    // Unary calls are not streams: still served.
    c.list_rooms(&pb::ListRoomsRequest {}).expect("unary still works");
    // A freed slot is usable again.
    let mut first = held.into_iter().next().expect("three held");
    first.send(Frame::Leave(pb::Leave {}));
    assert_eq!(first.events.end().0, RpcStatusCode::OK);
    assert!(gets_in_soon(&c, "late"), "the slot of the stream that left is released");
}

#[test]
fn member_that_never_reads_is_cut_off_without_slowing_others() {
    let server = server(|c| c.queue_capacity = 64);
    let c = client(&server.addr());
    // The sleeper's events are never read: its receiver is held but not polled. It has
    // a connection of its own, as a real stuck client would.
    let sleeper = client(&server.addr());
    let (mut sleeper_tx, sleeper_rx) = sleeper.chat().expect("chat starts");
    block_on(futures::SinkExt::send(
        &mut sleeper_tx,
        (pb::ClientFrame { frame: Some(hello("sleeper", "busy")) }, grpcio::WriteFlags::default()),
    ))
    .expect("hello sent");
    let (reader, _) = ChatStream::join(&c, "reader", "busy");
    let poster =
        c.join(&pb::JoinRequest { user: "poster".into(), room: "busy".into() }).expect("join").session;

    // Enough big messages to fill the sleeper's socket buffers and then its queue. The
    // poster stays at most WINDOW messages ahead of what the reader has received, half
    // the queue: however slowly the server writes, the reader's queue cannot fill, so a
    // cut-off reader would be the server's fault, not the test machine's.
    const N: u64 = 3000;
    const WINDOW: u64 = 32;
    let text = "z".repeat(4000);
    let mut received = 0;
    let mut read_up_to = |seq: u64| {
        while received < seq {
            received += 1;
            assert_eq!(reader.events.message().seq, received, "the reader gets everything, in order");
        }
    };
    for seq in 1..=N {
        c.send(&pb::SendRequest {
            session: poster.clone(),
            text: text.clone(),
            client_msg_id: String::new(),
        })
        .expect("send");
        read_up_to(seq.saturating_sub(WINDOW));
    }
    read_up_to(N);
    // The sleeper was cut off with RESOURCE_EXHAUSTED (its session is kept for a resume).
    let members = c.list_members(&pb::ListMembersRequest { room: "busy".into() }).expect("members").members;
    assert!(members.contains(&"sleeper".to_owned()));
    let mut rx = sleeper_rx;
    let status = loop {
        match block_on(rx.next()) {
            Some(Ok(_)) => continue,
            Some(Err(grpcio::Error::RpcFailure(s))) => break s.code(),
            other => panic!("unexpected end of the sleeper's stream: {other:?}"),
        }
    };
    assert!(
        status == RpcStatusCode::RESOURCE_EXHAUSTED || status == RpcStatusCode::CANCELLED,
        "sleeper ended with {status:?}"
    );
}

#[test]
fn a_stream_whose_thread_cannot_start_is_refused_with_resource_exhausted() {
    // No system can map a 128 TiB stack, so every stream thread fails to start, as when a
    // task limit (systemd's TasksMax) or memory runs out.
    let server = server(|c| {
        c.max_streams = 2;
        c.stream_stack_size = 1 << 47;
    });
    let c = client(&server.addr());
    // More attempts than the stream limit: a failed start gives its slot back.
    for _ in 0..3 {
        let mut chat = ChatStream::open(&c);
        chat.send(hello("u", "r"));
        let (code, msg) = chat.events.end();
        assert_eq!(code, RpcStatusCode::RESOURCE_EXHAUSTED, "{msg}");
        assert!(msg.contains("cannot start a thread"), "{msg}");
        let sub = Events::spawn(
            c.subscribe(&pb::SubscribeRequest { room: "r".into(), ..Default::default() }).expect("starts"),
        );
        let (code, msg) = sub.end();
        assert_eq!(code, RpcStatusCode::RESOURCE_EXHAUSTED, "{msg}");
        assert!(msg.contains("cannot start a thread"), "{msg}");
    }
    assert_eq!(server.stats().streams, 0, "no stream slot is held");
    c.list_rooms(&pb::ListRoomsRequest {}).expect("unary calls are still served");
}

#[test]
fn shutdown_sends_notice_then_unavailable() {
    let server = server(|_| {});
    let c = client(&server.addr());
    let (mut alice, _) = ChatStream::join(&c, "alice", "r");
    alice.post("accepted before shutdown");
    let sub = Events::spawn(
        c.subscribe(&pb::SubscribeRequest { room: "r".into(), ..Default::default() }).expect("starts"),
    );
    let _ = sub.welcome();
    let stopper = thread::spawn(move || server.shutdown());
    assert_eq!(alice.events.message().text, "accepted before shutdown", "queued messages are flushed first");
    for events in [&alice.events, &sub] {
        loop {
            match events.next() {
                Seen::Event(Event::Notice(n)) => {
                    assert_eq!((n.code, n.text.contains("shutting down")), (0, true));
                    break;
                }
                Seen::Event(_) => continue,
                Seen::End(code, msg) => panic!("ended with {code:?} ({msg}) before the notice"),
            }
        }
        assert_eq!(events.end().0, RpcStatusCode::UNAVAILABLE);
    }
    stopper.join().expect("shutdown returns");
}

#[test]
fn shutdown_does_not_wait_for_a_client_that_stopped_reading() {
    const GRACE: Duration = Duration::from_secs(1);
    let server = server(|c| {
        c.shutdown_grace = GRACE;
        c.broker.limits.max_text_bytes = 64 * 1024;
        c.queue_capacity = 4096;
        // C-core closes a connection only once its write in progress ends; to a stopped
        // client that is when the kernel gives up, after the keepalive timeout.
        c.keepalive_time = Duration::from_secs(60);
        c.keepalive_timeout = Duration::from_secs(60);
    });
    // The stopped client announces a flow-control window far larger than socket buffers,
    // so the server's writes to it stop in the socket, not for want of window.
    let relay = Relay::to(&server.addr());
    let channel = ChannelBuilder::new(Arc::new(EnvBuilder::new().cq_count(1).build()))
        .stream_initial_window_size(256 << 20)
        .connect(&relay.addr);
    assert!(block_on(channel.wait_for_connected(WAIT)), "connects through the relay");
    let (_stopped, _) = ChatStream::join(&pb::ChatClient::new(channel), "stopped", "r");
    relay.freeze();

    let c = client(&server.addr());
    let (reader, _) = ChatStream::join(&c, "reader", "r");
    let poster = c.join(&pb::JoinRequest { user: "poster".into(), room: "r".into() }).expect("join").session;
    // 36 MB for the stopped client: far beyond its sockets' buffers (a few MB each).
    const N: u64 = 600;
    let text = "z".repeat(60_000);
    for _ in 0..N {
        let sent =
            pb::SendRequest { session: poster.clone(), text: text.clone(), client_msg_id: String::new() };
        c.send(&sent).expect("send");
    }
    for seq in 1..=N {
        assert_eq!(reader.events.message().seq, seq, "the reader gets everything, in order");
    }

    let started = Instant::now();
    server.shutdown();
    let took = started.elapsed();
    // The grace period, then at most a second for C-core to close the connections.
    assert!(took < GRACE + Duration::from_secs(10), "shutdown took {took:?}");
    loop {
        match reader.events.next() {
            Seen::Event(Event::Notice(n)) => {
                assert!(n.text.contains("shutting down"), "{n:?}");
                break;
            }
            Seen::Event(_) => continue,
            Seen::End(code, msg) => panic!("ended with {code:?} ({msg}) before the notice"),
        }
    }
    assert_eq!(reader.events.end().0, RpcStatusCode::UNAVAILABLE);
}

#[test]
fn a_replay_larger_than_one_write_arrives_whole_and_in_order_before_live_messages() {
    let server = server(|_| {});
    let c = client(&server.addr());
    let poster =
        c.join(&pb::JoinRequest { user: "poster".into(), room: "deep".into() }).expect("join").session;
    // 100 messages of 3000 bytes: about 300 KB of replay, several writes of at most 64 KiB.
    let text = "y".repeat(3000);
    for _ in 0..100 {
        let sent =
            pb::SendRequest { session: poster.clone(), text: text.clone(), client_msg_id: String::new() };
        c.send(&sent).expect("send");
    }
    let (mut late, welcome) = ChatStream::join(&c, "late", "deep");
    assert_eq!(welcome.last_seq, 100);
    let sent = pb::SendRequest { session: poster, text: "live".into(), client_msg_id: String::new() };
    c.send(&sent).expect("send");
    for seq in 1..=100 {
        let m = late.events.message();
        assert_eq!((m.seq, m.text.len()), (seq, 3000), "the replay, in order");
    }
    assert_eq!(late.events.message().text, "live", "then the live message");
    assert!(late.events.writes.load(std::sync::atomic::Ordering::SeqCst) >= 5, "split over several writes");
    late.send(Frame::Leave(pb::Leave {}));
}

#[test]
fn a_stream_that_never_says_hello_is_closed_and_frees_its_place() {
    let server = server(|c| {
        c.max_streams = 1;
        c.broker.hello_timeout = Duration::from_millis(300);
    });
    let c = client(&server.addr());
    let silent = ChatStream::open(&c);
    let (code, msg) = silent.events.end();
    assert_eq!(code, RpcStatusCode::DEADLINE_EXCEEDED, "{msg}");
    assert_eq!(msg, "no hello within 0.3 s");
    // Its place under the stream limit (1 here) is free again.
    assert!(gets_in_soon(&c, "next"), "the silent stream's place was released");
}

#[test]
fn a_stream_half_closed_before_its_hello_ends_at_once_and_one_after_it_keeps_receiving() {
    // A hello timeout far beyond the test's deadlines: only the half-close can end the
    // first stream in time, and it must free its place (the limit is 2 here).
    let server = server(|c| {
        c.max_streams = 2;
        c.broker.hello_timeout = Duration::from_secs(600);
    });
    let c = client(&server.addr());

    let mut quiet = ChatStream::open(&c);
    block_on(quiet.tx.close()).expect("half-closes");
    let (code, msg) = quiet.events.end();
    assert_eq!(code, RpcStatusCode::INVALID_ARGUMENT, "{msg}");
    assert_eq!(msg, "the client ended its side of the stream before its hello");

    // After its hello a half-closed stream is a listener: it receives until the server
    // or the client ends the call.
    let (mut listener, _) = ChatStream::join(&c, "listener", "r");
    block_on(listener.tx.close()).expect("half-closes");
    assert!(gets_in_soon(&c, "poster"), "the quiet stream's place was released");
    let joined = c.join(&pb::JoinRequest { user: "unary".into(), room: "r".into() }).expect("joins");
    let sent = c.send(&pb::SendRequest {
        session: joined.session,
        text: "after the half-close".into(),
        client_msg_id: String::new(),
    });
    let seq = sent.expect("sent").seq;
    let m = listener.events.message();
    assert_eq!((m.seq, m.text.as_str(), m.user.as_str()), (seq, "after the half-close", "unary"));
}

#[test]
fn a_history_call_the_client_does_not_read_holds_a_place_under_the_stream_limit_until_it_ends() {
    let server = server(|c| c.max_streams = 1);
    let c = client(&server.addr());
    // 500 messages of 4000 bytes: 2 MB of history, far more than the reader's window.
    let filler = c.join(&pb::JoinRequest { user: "filler".into(), room: "r".into() }).expect("joins");
    for i in 0..500 {
        let text = format!("{i:04}").repeat(1000);
        c.send(&pb::SendRequest { session: filler.session.clone(), text, client_msg_id: String::new() })
            .expect("sent");
    }

    // A reader with a fixed 64 KiB window (no BDP probing) takes one message and stops.
    let env = Arc::new(EnvBuilder::new().cq_count(1).build());
    let ch = ChannelBuilder::new(env)
        .use_local_subchannel_pool(true)
        .http2_bdp_probe(false)
        .stream_initial_window_size(64 * 1024)
        .connect(&server.addr());
    assert!(block_on(ch.wait_for_connected(WAIT)), "connects");
    let request = pb::HistoryRequest { room: "r".into(), since_seq: 0, limit: 0 };
    let reader = pb::ChatClient::new(ch);
    let mut stalled = reader.history(&request).expect("starts");
    let first = block_on(stalled.next()).expect("a message").expect("no error");
    assert_eq!(first.seq, 1);

    // Its call holds the only place: a stream and another History call are refused.
    let mut refused = ChatStream::open(&c);
    refused.send(hello("late", "r"));
    assert_eq!(refused.events.end().0, RpcStatusCode::RESOURCE_EXHAUSTED, "a stream");
    let other = block_on(c.history(&request).expect("starts").collect::<Vec<_>>());
    assert!(
        matches!(&other[..], [Err(grpcio::Error::RpcFailure(s))] if s.code() == RpcStatusCode::RESOURCE_EXHAUSTED),
        "another History call: {:?}",
        other.iter().map(|r| r.as_ref().map(|m| m.seq)).collect::<Vec<_>>()
    );

    // Cancelled, the call gives its place back.
    drop(stalled);
    assert!(gets_in_soon(&c, "late"), "the History call's place was released");
}

/// The first bytes of every HTTP/2 connection.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The next HTTP/2 frame from `socket`: (type, flags, payload), or what ended the connection.
fn read_frame(socket: &mut std::net::TcpStream) -> Result<(u8, u8, Vec<u8>), String> {
    read_frame_on(socket).map(|(kind, flags, _, payload)| (kind, flags, payload))
}

/// Reads HTTP/2 frames from `socket` until one of type `kind` with the ACK flag and
/// `payload` arrives (`Ok`), or the server closes the connection (`Err` with what ended it).
fn until_ack(socket: &mut std::net::TcpStream, kind: u8, payload: &[u8]) -> Result<(), String> {
    loop {
        let (k, flags, body) = read_frame(socket)?;
        if k == kind && flags & 1 == 1 && body == payload {
            return Ok(());
        }
    }
}

/// Reads from `socket` until the server closes it; `Err` if it is still open at `WAIT`.
fn until_closed(mut socket: std::net::TcpStream) -> Result<(), String> {
    use std::io::Read;
    socket.set_read_timeout(Some(WAIT)).expect("sets a timeout");
    let mut buf = [0u8; 4096];
    loop {
        match socket.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(format!("still open after {WAIT:?}: {e}")),
        }
    }
}

#[test]
fn a_connection_that_does_not_open_http2_in_time_is_closed_and_one_that_did_is_kept() {
    use std::io::Write;
    use std::net::TcpStream;
    let server = server(|c| c.handshake_timeout = Duration::from_millis(500));
    let addr = server.addr();
    // Opened first: had the handshake timeout applied to it, it would be closed first.
    let mut opened = TcpStream::connect(&addr).expect("connects");
    opened.set_read_timeout(Some(WAIT)).expect("sets a timeout");
    opened.write_all(&[PREFACE, &frame(4, 0, 0, &[])].concat()).expect("writes");
    until_ack(&mut opened, 4, &[]).expect("the server acknowledges the SETTINGS");
    let silent = TcpStream::connect(&addr).expect("connects");
    let mut preface_only = TcpStream::connect(&addr).expect("connects");
    preface_only.write_all(PREFACE).expect("writes");

    // C-core's default would keep these two for 120 s, far beyond WAIT.
    until_closed(silent).expect("a connection that sends nothing");
    until_closed(preface_only).expect("a connection that sends no SETTINGS");

    // The one that opened HTTP/2 answers a PING after both were closed.
    let ping = [0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
    opened.write_all(&ping).expect("writes");
    until_ack(&mut opened, 6, &ping[9..]).expect("the connection that opened HTTP/2 is kept");
    // And real clients still get in.
    assert!(gets_in_soon(&client(&addr), "after"), "a grpcio client joins");
}

/// An HTTP/2 frame: the 9-byte header, then `payload`.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The frames of a unary `ListRooms` call on `stream`: its HEADERS and one DATA frame with
/// an empty request, which ends the stream.
fn list_rooms_call(stream: u32) -> Vec<u8> {
    [headers(stream, "/chat.v1.Chat/ListRooms", &[], 0), frame(0, 0x1, stream, &[0; 5])].concat()
}

/// The HEADERS (and, past 16 KiB, CONTINUATION) frames that open a call of `path` on
/// `stream` with the `extra` metadata, each field an HPACK literal with a literal name;
/// `flags` are added to the HEADERS frame's END_HEADERS (END_STREAM: no request follows).
fn headers(stream: u32, path: &str, extra: &[(&str, &str)], flags: u8) -> Vec<u8> {
    /// An HPACK string: its length as a 7-bit prefix integer, then its bytes.
    fn string(out: &mut Vec<u8>, s: &str) {
        let mut len = s.len();
        if len < 127 {
            out.push(len as u8);
        } else {
            out.push(127);
            len -= 127;
            while len >= 128 {
                out.push((len % 128) as u8 | 128);
                len /= 128;
            }
            out.push(len as u8);
        }
        out.extend_from_slice(s.as_bytes());
    }
    let fields = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ];
    let mut block = Vec::new();
    for (name, value) in fields.iter().chain(extra) {
        block.push(0);
        string(&mut block, name);
        string(&mut block, value);
    }
    let parts: Vec<&[u8]> = block.chunks(16 * 1024).collect();
    let last = parts.len() - 1;
    let mut out = Vec::new();
    for (i, part) in parts.into_iter().enumerate() {
        let end_headers = if i == last { 0x4 } else { 0 };
        let (kind, flags) = if i == 0 { (1, end_headers | flags) } else { (9, end_headers) };
        out.extend(frame(kind, flags, stream, part));
    }
    out
}

/// The next HEADERS frame from `socket` that ends its stream (the call's status):
/// (stream, header block); what else arrived before it is kept in `seen` as (type, stream).
fn next_status(
    socket: &mut std::net::TcpStream,
    seen: &mut Vec<(u8, u32)>,
) -> Result<(u32, Vec<u8>), String> {
    loop {
        let (kind, flags, stream, body) = read_frame_on(socket)?;
        if kind == 1 && flags & 0x1 == 1 {
            return Ok((stream, body));
        }
        seen.push((kind, stream));
    }
}

/// [`read_frame`] with the frame's stream.
fn read_frame_on(socket: &mut std::net::TcpStream) -> Result<(u8, u8, u32, Vec<u8>), String> {
    use std::io::Read;
    let mut head = [0u8; 9];
    socket.read_exact(&mut head).map_err(|e| format!("closed: {e}"))?;
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let stream = u32::from_be_bytes(head[5..].try_into().expect("4 bytes")) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    socket.read_exact(&mut payload).map_err(|e| format!("closed: {e}"))?;
    Ok((head[3], head[4], stream, payload))
}

/// Whether `haystack` holds `needle`.
fn holds(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn a_connection_that_grants_no_window_holds_at_most_its_share_of_calls_and_is_closed_past_it() {
    use std::io::Write;
    const PER_CONNECTION: usize = 50;
    let server = server(|c| c.max_calls_per_connection = Some(PER_CONNECTION));
    let mut socket = std::net::TcpStream::connect(server.addr()).expect("connects");
    socket.set_read_timeout(Some(WAIT)).expect("sets a timeout");
    // SETTINGS_INITIAL_WINDOW_SIZE 0: no reply can send its message, so no call ends.
    socket.write_all(&[PREFACE, &frame(4, 0, 0, &[0, 4, 0, 0, 0, 0])].concat()).expect("writes");
    // The server's SETTINGS announce the limit; the client acknowledges them, from when
    // C-core enforces it.
    let limit = loop {
        let (kind, flags, body) = read_frame(&mut socket).expect("the server's SETTINGS");
        if kind == 4 && flags & 1 == 0 {
            let setting = body.chunks(6).find(|s| s[..2] == [0, 3]).expect("MAX_CONCURRENT_STREAMS");
            break u32::from_be_bytes(setting[2..].try_into().expect("4 bytes")) as usize;
        }
    };
    assert_eq!(limit, PER_CONNECTION);
    socket.write_all(&frame(4, 1, 0, &[])).expect("acknowledges");

    // As many calls as the limit: none can end, and the connection stays up.
    let calls: Vec<u8> = (0..PER_CONNECTION as u32).flat_map(|i| list_rooms_call(2 * i + 1)).collect();
    socket.write_all(&calls).expect("writes");
    let ping = frame(6, 0, 0, &[9, 8, 7, 6, 5, 4, 3, 2]);
    socket.write_all(&ping).expect("writes");
    until_ack(&mut socket, 6, &ping[9..]).expect("the connection holds its calls and answers a PING");
    // One more is refused by closing the connection, which ends all its calls.
    socket.write_all(&list_rooms_call(2 * PER_CONNECTION as u32 + 1)).expect("writes");
    until_closed(socket).expect("the connection that opened one call too many");
    assert!(gets_in_soon(&client(&server.addr()), "after"), "the server goes on");
}

#[cfg(unix)]
#[test]
fn clients_on_a_unix_socket_are_each_held_to_their_own_connections_limit_not_to_one_shared() {
    // C-core names every client of a Unix socket `unix:`, so the call gate cannot tell their
    // connections apart; it must not count them as one. With a limit of 2 calls per
    // connection the gate's count is 3: three clients with two streams each are six.
    let dir = std::env::temp_dir().join(format!("grpc-chat-unix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory for the socket");
    let listen = format!("unix:{}", dir.join("chat.sock").display());
    let server = server(|c| {
        c.listen = listen.clone();
        c.max_calls_per_connection = Some(2);
    });
    assert_eq!(server.addr(), listen, "the address is the socket's");
    let mut held = Vec::new();
    for client_no in 0..3 {
        let c = client(&server.addr());
        for stream_no in 0..2 {
            let (s, w) = ChatStream::join(&c, &format!("u{client_no}-{stream_no}"), "r");
            assert_eq!(w.room, "r");
            held.push(s);
        }
    }
    assert_eq!(server.stats().streams, 6);
    drop(held);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_connection_that_never_acknowledges_the_limit_is_held_to_it_and_to_the_metadata_limit_by_the_server() {
    use std::io::Write;
    const PER_CONNECTION: usize = 40;
    // C-core enforces MAX_CONCURRENT_STREAMS and MAX_HEADER_LIST_SIZE only once the client
    // has acknowledged them; the server's call gate allows a quarter more, plus one.
    const GATE: usize = PER_CONNECTION + PER_CONNECTION / 4 + 1;
    let server = server(|c| c.max_calls_per_connection = Some(PER_CONNECTION));
    let mut socket = std::net::TcpStream::connect(server.addr()).expect("connects");
    socket.set_read_timeout(Some(WAIT)).expect("sets a timeout");
    socket.write_all(&[PREFACE, &frame(4, 0, 0, &[])].concat()).expect("writes");
    // The server's SETTINGS, which this client never acknowledges.
    while read_frame(&mut socket).expect("the server's SETTINGS").0 != 4 {}
    let mut seen = Vec::new();

    // A unary call that ends without its request.
    socket.write_all(&headers(1, "/chat.v1.Chat/Join", &[], 0x1)).expect("writes");
    let (stream, status) = next_status(&mut socket, &mut seen).expect("a status");
    assert_eq!(stream, 1);
    assert!(holds(&status, "the call ended without its request"), "{}", String::from_utf8_lossy(&status));

    // A stream with 20,000 bytes of metadata: C-core would let up to 16 MiB through.
    let pad = "m".repeat(20_000);
    socket.write_all(&headers(3, "/chat.v1.Chat/Chat", &[("x-pad", &pad)], 0)).expect("writes");
    let (stream, status) = next_status(&mut socket, &mut seen).expect("a status");
    assert_eq!(stream, 3);
    assert!(holds(&status, "over the limit of 16384 bytes"), "{}", String::from_utf8_lossy(&status));

    // Calls that send their headers and never a request: the gate holds as many as it
    // allows, and the next is refused at once (grpcio alone would show none of them to
    // the server, and C-core would hold every one).
    let held: Vec<u8> =
        (0..GATE as u32).flat_map(|i| headers(5 + 2 * i, "/chat.v1.Chat/ListRooms", &[], 0)).collect();
    socket.write_all(&held).expect("writes");
    let next = 5 + 2 * GATE as u32;
    socket.write_all(&headers(next, "/chat.v1.Chat/ListRooms", &[], 0)).expect("writes");
    let (stream, status) = next_status(&mut socket, &mut seen).expect("a status");
    assert_eq!(stream, next, "the first call to end is the one past the gate");
    assert!(
        holds(&status, &format!("its limit of {GATE} calls open")),
        "{}",
        String::from_utf8_lossy(&status)
    );
    assert!(
        !seen.iter().any(|&(kind, stream)| kind == 1 && stream >= 5),
        "the held calls got nothing: {seen:?}"
    );
    let ping = frame(6, 0, 0, &[1, 2, 3, 4, 5, 6, 7, 8]);
    socket.write_all(&ping).expect("writes");
    until_ack(&mut socket, 6, &ping[9..]).expect("the connection is kept");

    // One of the held calls ends (its client resets it) and gives its place back.
    socket.write_all(&frame(3, 0, 5, &8u32.to_be_bytes())).expect("writes");
    let again = next + 2;
    let call = [headers(again, "/chat.v1.Chat/ListRooms", &[], 0), frame(0, 0x1, again, &[0; 5])].concat();
    socket.write_all(&call).expect("writes");
    let (stream, status) = loop {
        // The reset call may still get its status (C-core sends what the server ends it with).
        match next_status(&mut socket, &mut seen).expect("a status") {
            (5, _) => continue,
            other => break other,
        }
    };
    assert_eq!(stream, again, "the call in the freed place is answered");
    assert!(!holds(&status, "calls open"), "{}", String::from_utf8_lossy(&status));
    assert!(gets_in_soon(&client(&server.addr()), "after"), "the server goes on");
}
