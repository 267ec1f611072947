//! Core tests of input validation (DESIGN.md section 5) and of the stream protocol:
//! every bad input is rejected with the right code and changes nothing.

mod core_harness;

use core_harness::{code, config, Harness};
use grpc_chat::core::{Accepted, Code, ConnId, Epoch, Event, Hello, Input, Seq};

/// A snapshot of everything observable, to prove a rejected input changed nothing.
fn state(h: &Harness) -> String {
    let rooms = h.broker.rooms();
    let members: Vec<_> = rooms.iter().map(|r| h.members(&r.name)).collect();
    format!(
        "{rooms:?} {members:?} sessions={} streams={} timeout={:?}",
        h.broker.session_count(),
        h.broker.stream_count(),
        h.broker.poll_timeout()
    )
}

/// A room "r" with ann attached (and one message), bob attached, and their tokens.
fn setup() -> (Harness, ConnId, ConnId, String) {
    let mut h = Harness::new(config());
    let (a, token) = h.connect("ann", "r");
    let (b, _) = h.connect("bob", "r");
    h.post(a, "first").unwrap();
    (h, a, b, token.as_str().to_string())
}

const BAD_USERS: &[(&str, &str)] = &[
    ("", "empty"),
    ("   ", "blank"),
    ("\t", "blank tab"),
    ("abcdefghijabcdefghijabcdefghijabc", "33 characters"),
    ("an\u{7}n", "BEL"),
    ("an\nn", "newline"),
    ("ann\u{0}", "NUL"),
    ("\u{9b}x", "C1 control"),
    (" ann", "a leading space"),
    ("ann ", "a trailing space"),
    ("a\u{200B}nn", "a zero-width space"),
    ("ann\u{202E}", "a right-to-left override"),
    ("\u{FEFF}ann", "a byte-order mark"),
    ("an\u{AD}n", "a soft hyphen"),
    ("ann\u{E0041}", "a tag character"),
];

const BAD_ROOMS: &[(&str, &str)] = &[
    ("", "empty"),
    ("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "65 characters"),
    ("with space", "space"),
    ("slash/room", "slash"),
    ("caf\u{e9}", "non-ASCII"),
    ("r\n", "newline"),
    ("#general", "hash"),
];

#[test]
fn names_with_joiners_and_emoji_are_allowed() {
    let mut h = Harness::new(config());
    for user in [
        "\u{645}\u{647}\u{631}\u{200C}\u{622}\u{633}\u{627}",
        "\u{1F468}\u{200D}\u{1F469}",
        "\u{2764}\u{FE0F} bo",
        "Zoë",
    ] {
        h.join(user, "r");
    }
    assert_eq!(h.members("r").len(), 4);
}

#[test]
fn the_limits_are_inclusive() {
    let mut h = Harness::new(config());
    let user32 = "é".repeat(32); // characters, not bytes
    let room64 = "a".repeat(64);
    h.join(&user32, &room64);
    h.join("x", "A-z_0.9");
    h.join("x y ünïcødé 名前", "r");
    let (c, _) = h.connect("ann", "r");
    h.post(c, &"x".repeat(4096)).unwrap();
    h.post(c, "two\nlines\tand a tab").unwrap();
    h.post(c, "€").unwrap();
    h.post_id(c, "id at the limit", &"k".repeat(64)).unwrap();
    assert_eq!(h.last_seq("r"), 4);
}

#[test]
fn bad_user_names_are_invalid_argument_and_change_nothing() {
    let (mut h, _, b, _) = setup();
    let before = state(&h);
    let bob_events = h.events(b).len();
    for (user, why) in BAD_USERS {
        assert_eq!(code(h.try_join(user, "r")), Code::InvalidArgument, "join: {why}");
        assert_eq!(code(h.try_join(user, "fresh")), Code::InvalidArgument, "join, new room: {why}");
        assert!(h.last.is_empty(), "{why}: no output for a refused join");
        let c = h.open();
        let r = h.hello(c, Hello { user: user.to_string(), room: "r".into(), ..Hello::default() });
        assert_eq!(code(r), Code::InvalidArgument, "hello: {why}");
        assert_eq!(h.close_code(c), Some(Code::InvalidArgument), "hello: {why}");
        assert_eq!(h.last.len(), 1, "{why}: only the close");
    }
    assert_eq!(state(&h), before);
    assert_eq!(h.events(b).len(), bob_events, "nobody else saw anything");
}

#[test]
fn bad_room_names_are_invalid_argument_and_change_nothing() {
    let (mut h, _, b, _) = setup();
    let before = state(&h);
    let bob_events = h.events(b).len();
    for (room, why) in BAD_ROOMS {
        assert_eq!(code(h.try_join("zed", room)), Code::InvalidArgument, "join: {why}");
        let c = h.open();
        let r = h.hello(c, Hello { user: "zed".into(), room: room.to_string(), ..Hello::default() });
        assert_eq!(code(r), Code::InvalidArgument, "hello: {why}");
        assert_eq!(h.close_code(c), Some(Code::InvalidArgument));
        let (c, r) = h.subscribe("", room, 0);
        assert_eq!(code(r), Code::InvalidArgument, "subscribe: {why}");
        assert_eq!(h.close_code(c), Some(Code::InvalidArgument));
        assert_eq!(code(h.broker.history(room, Seq(0), 0)), Code::InvalidArgument, "history: {why}");
        assert_eq!(code(h.broker.members(room)), Code::InvalidArgument, "members: {why}");
    }
    assert_eq!(state(&h), before);
    assert_eq!(h.events(b).len(), bob_events);
}

#[test]
fn bad_texts_on_a_stream_are_a_notice_to_the_poster_only() {
    let (mut h, a, b, _) = setup();
    let cases: &[(String, &str)] = &[
        (String::new(), "empty"),
        ("   ".into(), "blank"),
        ("\n\t".into(), "only whitespace"),
        ("x".repeat(4097), "4097 bytes"),
        (format!("{}é", "x".repeat(4095)), "4097 bytes, multi-byte at the end"),
        ("bell\u{7}".into(), "BEL"),
        ("cr\r".into(), "carriage return"),
        ("esc\u{1b}[31m".into(), "escape"),
        ("nul\u{0}".into(), "NUL"),
    ];
    let before = state(&h);
    let bob_events = h.events(b).len();
    for (i, (text, why)) in cases.iter().enumerate() {
        let id = format!("cm{i}");
        assert_eq!(code(h.post_id(a, text, &id)), Code::InvalidArgument, "{why}");
        assert_eq!(h.last.len(), 1, "{why}: one notice, no close");
        match &h.last_deliveries()[0] {
            (to, Event::Notice(n)) => {
                assert_eq!(to.as_slice(), &[a]);
                assert_eq!(n.code, Some(Code::InvalidArgument), "{why}");
                assert_eq!(n.client_msg_id, id);
                assert!(!n.text.is_empty());
            }
            other => panic!("{why}: {other:?}"),
        }
        assert!(!h.is_closed(a), "{why}: a bad post does not end the stream");
    }
    assert_eq!(state(&h), before);
    assert_eq!(h.events(b).len(), bob_events);
    // Rejected ids were not remembered.
    assert!(!h.post_id(a, "fine now", "cm0").unwrap().duplicate);
}

#[test]
fn bad_texts_and_ids_through_send_are_only_a_status() {
    let (mut h, _, b, token) = setup();
    let before = state(&h);
    let bob_events = h.events(b).len();
    for text in ["", " ", &"y".repeat(4097), "a\u{8}b"] {
        assert_eq!(code(h.send(&token, text)), Code::InvalidArgument, "{text:?}");
        assert!(h.last.is_empty());
    }
    assert_eq!(code(h.send_id(&token, "ok", &"k".repeat(65))), Code::InvalidArgument);
    assert_eq!(code(h.send_id(&token, "ok", "k\u{0}")), Code::InvalidArgument);
    assert!(h.last.is_empty());
    assert_eq!(state(&h), before);
    assert_eq!(h.events(b).len(), bob_events);
}

#[test]
fn an_overlong_client_msg_id_on_a_stream_is_rejected() {
    let (mut h, a, _, _) = setup();
    let long = "k".repeat(65);
    assert_eq!(code(h.post_id(a, "text", &long)), Code::InvalidArgument);
    assert_eq!(h.last_seq("r"), 1);
    assert!(matches!(&h.last_deliveries()[0].1, Event::Notice(n) if n.code == Some(Code::InvalidArgument)));
    // 64 multi-byte characters are more than 64 bytes.
    assert_eq!(code(h.post_id(a, "text", &"é".repeat(33))), Code::InvalidArgument);
    assert_eq!(h.last_seq("r"), 1);
}

#[test]
fn a_rejected_post_does_not_use_the_rate_budget() {
    use grpc_chat::core::{BrokerConfig, RateLimit};
    let mut h =
        Harness::new(BrokerConfig { rate_limit: Some(RateLimit { per_second: 1.0, burst: 1 }), ..config() });
    let (a, _) = h.connect("ann", "r");
    for _ in 0..5 {
        assert_eq!(code(h.post(a, "")), Code::InvalidArgument);
    }
    h.post(a, "the one allowed").unwrap();
}

// ---- stream protocol -------------------------------------------------------------

#[test]
fn a_post_before_hello_closes_the_stream_with_invalid_argument() {
    let (mut h, _, b, _) = setup();
    let before_streams = h.broker.stream_count();
    let c = h.open();
    assert_eq!(code(h.post(c, "too early")), Code::InvalidArgument);
    let close = h.close_of(c);
    assert_eq!(close.error.as_ref().map(|r| r.code), Some(Code::InvalidArgument));
    assert!(close.flush);
    assert_eq!(h.broker.stream_count(), before_streams);
    assert_eq!(h.last_seq("r"), 1);
    // LeaveStream before hello is the same protocol violation.
    let c = h.open();
    assert_eq!(code(h.input(Input::LeaveStream { conn: c })), Code::InvalidArgument);
    assert_eq!(h.close_code(c), Some(Code::InvalidArgument));
    assert_eq!(h.live_seqs(b), vec![1]);
}

#[test]
fn a_second_hello_is_failed_precondition() {
    let (mut h, a, b, token) = setup();
    let r = h.hello(a, Hello { session: token.clone(), ..Hello::default() });
    assert_eq!(code(r), Code::FailedPrecondition);
    assert_eq!(h.close_code(a), Some(Code::FailedPrecondition));
    let r = h.input(Input::Subscribe {
        conn: b,
        session: String::new(),
        room: "r".into(),
        since: Seq(0),
        epoch: Epoch(0),
    });
    assert_eq!(code(r), Code::FailedPrecondition);
    assert_eq!(h.close_code(b), Some(Code::FailedPrecondition));
}

#[test]
fn a_session_whose_stream_was_closed_for_a_protocol_error_is_not_leaked() {
    // The stream is gone, so the session must either resume or leave after the grace;
    // it must never keep its name forever.
    let (mut h, a, _, token) = setup();
    let watcher = h.connect("cid", "r").0;
    h.hello(a, Hello { session: token.clone(), ..Hello::default() }).unwrap_err();
    assert!(h.broker.poll_timeout().is_some(), "the session waits for a resume with a deadline");
    h.advance(h.broker.config().resume_grace);
    assert_eq!(h.members("r"), vec!["bob", "cid"]);
    assert_eq!(h.presence(watcher), vec![("ann".to_string(), false)]);
    h.join("ann", "r");
}

#[test]
fn a_session_closed_for_a_protocol_error_can_resume_without_a_stray_close() {
    let (mut h, a, _, token) = setup();
    h.hello(a, Hello { session: token.clone(), ..Hello::default() }).unwrap_err();
    let c = h.attach(&grpc_chat::core::Token::parse(&token).unwrap(), 1);
    assert!(h.welcome(c).resumed);
    // The harness panics on a second close of `a`; check explicitly as well.
    assert_eq!(h.closes_of(a).len(), 1);
}

#[test]
fn hello_with_an_unknown_session_is_not_found() {
    let (mut h, _, _, _) = setup();
    let before = state(&h);
    for bad in ["s0000000000000000000000000000dead", "nonsense", "with space", &"s".repeat(65)] {
        let c = h.open();
        let r = h.hello(c, Hello { session: bad.into(), ..Hello::default() });
        assert_eq!(code(r), Code::NotFound, "{bad:?}");
        let close = h.close_of(c);
        assert_eq!(close.error.as_ref().map(|r| r.code), Some(Code::NotFound));
        let (c, r) = h.subscribe(bad, "", 0);
        assert_eq!(code(r), Code::NotFound);
        assert_eq!(h.close_code(c), Some(Code::NotFound));
        assert_eq!(code(h.leave(bad)), Code::NotFound);
    }
    assert_eq!(state(&h), before);
}

#[test]
fn hello_with_a_session_of_another_user_or_room_is_invalid_argument() {
    let (mut h, _, _, token) = setup();
    for (user, room) in [("mallory", ""), ("", "other"), ("ann", "other")] {
        let c = h.open();
        let hello =
            Hello { session: token.clone(), user: user.into(), room: room.into(), ..Hello::default() };
        assert_eq!(code(h.hello(c, hello)), Code::InvalidArgument, "{user:?} {room:?}");
        assert_eq!(h.close_code(c), Some(Code::InvalidArgument));
    }
    let (c, r) = h.subscribe(&token, "other", 0);
    assert_eq!(code(r), Code::InvalidArgument);
    assert!(h.is_closed(c));
    // Naming the right user and room is fine (and supersedes the old stream).
    let c = h.open();
    let hello = Hello { session: token.clone(), user: "ann".into(), room: "r".into(), ..Hello::default() };
    assert!(matches!(h.hello(c, hello), Ok(Accepted::Attached { resumed: true, .. })));
}

#[test]
fn leave_on_a_stream_ends_the_session_and_closes_with_ok() {
    let (mut h, a, b, token) = setup();
    let r = h.input(Input::LeaveStream { conn: a });
    assert!(matches!(&r, Ok(Accepted::Left { user, room }) if &**user == "ann" && &**room == "r"), "{r:?}");
    let close = h.close_of(a);
    assert_eq!(close.error, None);
    assert!(close.flush);
    assert_eq!(h.presence(b), vec![("ann".to_string(), false)]);
    assert_eq!(h.presence(a), vec![("bob".to_string(), true)], "the leaver is not told of its own leave");
    assert_eq!(h.members("r"), vec!["bob"]);
    assert_eq!(h.broker.poll_timeout(), None, "no timer: the session is gone, not detached");
    // Everything about the session now fails, and changes nothing.
    let before = state(&h);
    assert_eq!(code(h.send(&token, "late")), Code::FailedPrecondition);
    assert_eq!(code(h.leave(&token)), Code::FailedPrecondition);
    assert_eq!(code(h.post(a, "late")), Code::FailedPrecondition);
    assert_eq!(code(h.input(Input::LeaveStream { conn: a })), Code::FailedPrecondition);
    assert_eq!(state(&h), before);
}

#[test]
fn leave_by_rpc_closes_the_attached_stream_with_ok() {
    let (mut h, a, b, token) = setup();
    assert!(matches!(h.leave(&token), Ok(Accepted::Left { .. })));
    assert_eq!(h.close_code(a), None);
    assert!(h.close_of(a).flush);
    assert_eq!(h.presence(b), vec![("ann".to_string(), false)]);
}

#[test]
fn inputs_naming_a_closed_or_unknown_stream_never_panic_and_change_nothing() {
    let (mut h, a, b, _) = setup();
    h.input(Input::LeaveStream { conn: a }).unwrap();
    let never_opened = {
        // A conn id the core never issued: take a real one and go past it.
        let c = h.open();
        h.end_stream(c);
        c
    };
    let before = state(&h);
    let bob_events = h.events(b).len();
    for conn in [a, never_opened] {
        assert_eq!(code(h.post(conn, "x")), Code::FailedPrecondition);
        assert_eq!(code(h.input(Input::LeaveStream { conn })), Code::FailedPrecondition);
        let r = h.hello(conn, Hello { user: "zed".into(), room: "r".into(), ..Hello::default() });
        assert_eq!(code(r), Code::FailedPrecondition);
        let r = h.input(Input::Subscribe {
            conn,
            session: String::new(),
            room: "r".into(),
            since: Seq(0),
            epoch: Epoch(0),
        });
        assert_eq!(code(r), Code::FailedPrecondition);
        assert_eq!(h.input(Input::StreamEnded { conn }), Ok(Accepted::Ignored));
        assert_eq!(h.input(Input::Lagging { conn }), Ok(Accepted::Ignored));
        assert!(h.last.is_empty());
    }
    assert_eq!(state(&h), before);
    assert_eq!(h.events(b).len(), bob_events);
    assert_eq!(h.members("r"), vec!["bob"], "the hello on a dead stream joined nobody");
}

#[test]
fn a_stream_that_ends_before_its_hello_is_forgotten() {
    let mut h = Harness::new(config());
    let c = h.open();
    assert_eq!(h.broker.stream_count(), 1);
    assert_eq!(h.end_stream(c), Accepted::Detached);
    assert_eq!(h.broker.stream_count(), 0);
    assert!(h.closes.is_empty());
    let c = h.open();
    assert_eq!(h.input(Input::Lagging { conn: c }), Ok(Accepted::Detached));
    assert_eq!(h.close_code(c), Some(Code::ResourceExhausted));
    assert_eq!(h.broker.stream_count(), 0);
}
