//! Core tests of the broker's own limits (rooms, sessions), the room directory, epochs
//! of evicted rooms, token collisions and the timer table.

mod core_harness;

use std::time::Duration;

use core_harness::{code, config, Harness};
use grpc_chat::core::{Accepted, BrokerConfig, Code, Input, Seq, Token, MESSAGE_OVERHEAD};

#[test]
fn the_directory_lists_rooms_sorted_with_counts() {
    let mut h = Harness::new(config());
    let (c, _) = h.connect("ann", "zeta");
    h.join("bob", "alpha");
    h.join("cid", "zeta");
    h.post(c, "x").unwrap();
    let rooms = h.broker.rooms();
    let view: Vec<_> = rooms.iter().map(|r| (r.name.to_string(), r.members, r.last_seq.get())).collect();
    assert_eq!(view, vec![("alpha".to_string(), 1, 0), ("zeta".to_string(), 2, 1)]);
    assert!(h.broker.members("nowhere").unwrap().is_empty());
}

#[test]
fn at_the_room_limit_an_idle_room_is_evicted_but_a_busy_one_is_not() {
    let mut h = Harness::new(BrokerConfig { max_rooms: 2, ..config() });
    let (c, _) = h.connect("ann", "a");
    h.post(c, "x").unwrap();
    h.input(Input::LeaveStream { conn: c }).unwrap(); // "a" is idle now
    h.join("bob", "b");
    h.join("cid", "c"); // evicts "a"
    let names: Vec<_> = h.broker.rooms().iter().map(|r| r.name.to_string()).collect();
    assert_eq!(names, vec!["b", "c"]);
    assert!(h.broker.history("a", Seq(0), 0).unwrap().is_empty());
    // Both rooms are busy: a third is refused, and nothing changes.
    assert_eq!(code(h.try_join("dee", "d")), Code::ResourceExhausted);
    let (l, r) = h.subscribe("", "d", 0);
    assert_eq!(code(r), Code::ResourceExhausted);
    assert_eq!(h.close_code(l), Some(Code::ResourceExhausted));
    assert_eq!(h.broker.rooms().len(), 2);
    assert_eq!(h.broker.session_count(), 2);
}

#[test]
fn an_evicted_room_reappears_with_another_epoch_and_resumers_see_a_gap() {
    let mut h = Harness::new(BrokerConfig { max_rooms: 1, ..config() });
    let (c, _) = h.connect("ann", "a");
    for i in 0..3 {
        h.post(c, &format!("{i}")).unwrap();
    }
    let old_epoch = h.welcome(c).epoch;
    h.input(Input::LeaveStream { conn: c }).unwrap();
    let other = h.join("bob", "b"); // evicts "a"
    h.leave(other.token.as_str()).unwrap();
    let info = h.join("ann", "a"); // evicts "b", recreates "a"
    assert_ne!(info.epoch, old_epoch, "a recreated room is a new log");
    assert_eq!(info.last_seq, Seq(0));
    let (c2, r) = h.try_attach(&info.token, 3, old_epoch);
    assert!(matches!(r, Ok(Accepted::Attached { gap: true, replayed: 0, .. })), "{r:?}");
    assert_eq!(h.welcome(c2).epoch, info.epoch);
    assert_eq!(h.post(c2, "new").unwrap().seq, Seq(1));
}

#[test]
fn the_session_limit_is_resource_exhausted() {
    let mut h = Harness::new(BrokerConfig { max_sessions: 2, ..config() });
    let a = h.join("ann", "r");
    h.join("bob", "r");
    assert_eq!(code(h.try_join("cid", "r")), Code::ResourceExhausted);
    let c = h.open();
    let hello = grpc_chat::core::Hello { user: "cid".into(), room: "r".into(), ..Default::default() };
    assert_eq!(code(h.hello(c, hello)), Code::ResourceExhausted);
    assert_eq!(h.close_code(c), Some(Code::ResourceExhausted));
    assert_eq!(h.broker.session_count(), 2);
    h.leave(a.token.as_str()).unwrap();
    h.join("cid", "r");
}

#[test]
fn a_token_collision_is_refused_and_changes_nothing() {
    let mut h = Harness::new(config());
    let token = Token::from_entropy([7; 16]);
    let r = h.input(Input::Join { user: "ann".into(), room: "r".into(), token: token.clone() });
    assert!(matches!(r, Ok(Accepted::Joined(_))));
    let r = h.input(Input::Join { user: "bob".into(), room: "r".into(), token: token.clone() });
    assert_eq!(code(r), Code::Unavailable);
    assert_eq!(h.members("r"), vec!["ann"]);
    assert_eq!(h.broker.session_count(), 1);
}

#[test]
fn tokens_are_opaque_and_debug_does_not_leak_them() {
    let t = Token::from_entropy([0xab; 16]);
    assert_eq!(t.as_str().len(), 33);
    assert!(t.as_str().starts_with('s'));
    assert_eq!(Token::parse(t.as_str()), Some(t.clone()));
    assert!(!format!("{t:?}").contains(&t.as_str()[8..]));
    assert_eq!(Token::parse(""), None);
    assert_eq!(Token::parse("has space"), None);
    assert_eq!(Token::parse(&"x".repeat(65)), None);
}

#[test]
fn the_next_deadline_is_the_earliest_and_timers_fire_in_order() {
    let mut h = Harness::new(config());
    let (watcher, _) = h.connect("w", "r");
    let first = h.join("a", "r"); // attach timeout at 30 s
    h.advance(Duration::from_secs(10));
    let (c, _) = h.connect("b", "r");
    h.end_stream(c); // grace ends at 10 + 15 = 25 s
    let start = h.now - Duration::from_secs(10);
    assert_eq!(h.broker.poll_timeout(), Some(start + Duration::from_secs(25)));
    h.advance(Duration::from_secs(15));
    assert_eq!(h.members("r"), vec!["a", "w"]);
    assert_eq!(h.broker.poll_timeout(), Some(start + Duration::from_secs(30)));
    // One big jump fires everything due, in deadline order.
    let (c, _) = h.connect("c", "r");
    h.end_stream(c); // grace ends at 40 s
    h.advance(Duration::from_secs(100));
    assert_eq!(h.members("r"), vec!["w"]);
    let leaves: Vec<_> = h.presence(watcher).into_iter().filter(|p| !p.1).map(|p| p.0).collect();
    assert_eq!(leaves, vec!["b", "a", "c"]);
    assert_eq!(h.broker.poll_timeout(), None);
    assert_eq!(code(h.send(first.token.as_str(), "x")), Code::NotFound, "expired, not left");
}

/// The seqs `room` retains.
fn retained(h: &Harness, room: &str) -> Vec<u64> {
    h.broker.history(room, Seq(0), 0).unwrap().iter().map(|m| m.seq.get()).collect()
}

#[test]
fn the_history_budget_trims_the_heaviest_room_first() {
    let text = "x".repeat(100);
    let weight = MESSAGE_OVERHEAD + 100;
    let mut h = Harness::new(BrokerConfig { history_bytes: 10 * weight, ..config() });
    let (big, _) = h.connect("ann", "big");
    let (small, _) = h.connect("bob", "small");
    for _ in 0..8 {
        h.post(big, &text).unwrap();
    }
    for _ in 0..2 {
        h.post(small, &text).unwrap();
    }
    assert_eq!(h.broker.history_bytes(), 10 * weight, "exactly at the budget: nothing trimmed");
    assert_eq!(retained(&h, "big"), (1..=8).collect::<Vec<_>>());
    // One more message anywhere: the heaviest room gives up its oldest.
    h.post(small, &text).unwrap();
    assert_eq!(retained(&h, "big"), (2..=8).collect::<Vec<_>>());
    assert_eq!(retained(&h, "small"), vec![1, 2, 3]);
    assert_eq!(h.broker.history_bytes(), 10 * weight);
    // Rooms of equal weight keep a total within the budget whatever posts next.
    for _ in 0..20 {
        h.post(small, &text).unwrap();
        assert!(h.broker.history_bytes() <= 10 * weight);
    }
    assert_eq!(retained(&h, "big").len() + retained(&h, "small").len(), 10);
    assert_eq!(retained(&h, "small").last(), Some(&23), "the newest message is always kept");
    // Every member still received every message live.
    assert_eq!(h.live_seqs(small), (1..=23).collect::<Vec<_>>());
}

#[test]
fn a_member_resuming_past_messages_the_budget_dropped_is_told_of_the_gap() {
    let weight = MESSAGE_OVERHEAD + 1;
    let mut h = Harness::new(BrokerConfig { history_bytes: 3 * weight, ..config() });
    let (ann, token) = h.connect("ann", "r");
    let (bob, _) = h.connect("bob", "r");
    h.post(bob, "1").unwrap();
    h.end_stream(ann); // ann saw seq 1
    for i in 2..=6 {
        h.post(bob, &i.to_string()).unwrap();
    }
    assert_eq!(retained(&h, "r"), vec![4, 5, 6], "the budget holds three");
    let epoch = h.welcome(ann).epoch;
    let (again, r) = h.try_attach(&token, 1, epoch);
    assert!(matches!(r, Ok(Accepted::Attached { gap: true, replayed: 3, .. })), "{r:?}");
    assert_eq!(h.backlog_seqs(again), vec![4, 5, 6]);
}

#[test]
fn an_evicted_room_gives_its_history_weight_back() {
    let mut h = Harness::new(BrokerConfig { max_rooms: 1, ..config() });
    let (c, _) = h.connect("ann", "a");
    h.post_id(c, "hello", "id-1").unwrap();
    assert_eq!(h.broker.history_bytes(), MESSAGE_OVERHEAD + "hello".len() + "id-1".len());
    h.input(Input::LeaveStream { conn: c }).unwrap();
    h.join("bob", "b"); // evicts "a"
    assert_eq!(h.broker.history_bytes(), 0);
}

#[test]
fn a_stream_half_closed_before_its_hello_is_closed_at_once_and_one_after_it_goes_on() {
    let mut h = Harness::new(config());
    let quiet = h.open();
    let refused = h.input(Input::HalfClosed { conn: quiet });
    assert_eq!(refused.map_err(|r| r.code), Err(Code::InvalidArgument));
    assert_eq!(h.close_code(quiet), Some(Code::InvalidArgument));
    assert_eq!(
        h.close_of(quiet).error.as_ref().map(|e| e.reason.to_string()).as_deref(),
        Some("the client ended its side of the stream before its hello")
    );
    assert_eq!(h.broker.stream_count(), 0);
    assert_eq!(h.broker.poll_timeout(), None, "its hello deadline went with it");

    let (listener, _) = h.connect("ann", "r");
    assert_eq!(h.input(Input::HalfClosed { conn: listener }), Ok(Accepted::Ignored));
    assert!(!h.is_closed(listener));
    let (poster, _) = h.connect("bob", "r");
    let seq = h.post(poster, "still heard").expect("posted").seq;
    assert_eq!(h.live_seqs(listener), vec![seq.get()], "a half-closed member still receives");
    // Twice, or for a stream already gone, it changes nothing.
    assert_eq!(h.input(Input::HalfClosed { conn: listener }), Ok(Accepted::Ignored));
    assert_eq!(h.input(Input::HalfClosed { conn: quiet }), Ok(Accepted::Ignored));
}

#[test]
fn a_stream_without_its_first_frame_is_closed_after_the_hello_timeout() {
    let timeout = Duration::from_secs(10);
    let mut h = Harness::new(BrokerConfig { hello_timeout: timeout, ..config() });
    let start = h.now;
    let silent = h.open();
    assert_eq!(h.broker.poll_timeout(), Some(start + timeout), "the hello deadline is a timer");
    h.advance(Duration::from_secs(5));
    let (late, _) = h.connect("ann", "r"); // its hello comes at once
    let ended = h.open();
    h.end_stream(ended); // gone before its hello: no timer left behind
    let (listener, r) = h.subscribe("", "r", 0);
    r.unwrap();
    h.advance(Duration::from_millis(4_999));
    assert!(!h.is_closed(silent), "not before the deadline");
    h.advance(Duration::from_millis(1));
    assert_eq!(h.close_code(silent), Some(Code::DeadlineExceeded));
    assert_eq!(
        h.close_of(silent).error.as_ref().map(|e| e.reason.to_string()).as_deref(),
        Some("no hello within 10 s")
    );
    assert_eq!(h.broker.stream_count(), 2, "the joined stream and the listener remain");
    assert!(!h.is_closed(late) && !h.is_closed(listener));
    assert_eq!(h.broker.poll_timeout(), None, "no deadline is left");
    h.advance(Duration::from_secs(60));
    assert!(!h.is_closed(late) && !h.is_closed(listener), "a stream that said hello has no deadline");
}
