//! Core broker tests without sockets, in virtual time: ordering, history, replay,
//! names, session expiry and resume, idempotency, rate limits, slow members.

mod core_harness;

use std::time::Duration;

use core_harness::{code, config, Harness};
use grpc_chat::core::{Accepted, BrokerConfig, Code, Epoch, Event, Hello, Input, RateLimit, Recipients, Seq};

fn small_history(limit: usize) -> Harness {
    Harness::new(BrokerConfig { history_limit: limit, ..config() })
}

// ---- ordering --------------------------------------------------------------------

#[test]
fn every_member_sees_every_message_in_seq_order_including_its_own() {
    let mut h = Harness::new(config());
    let conns: Vec<_> = (0..5).map(|i| h.connect(&format!("u{i}"), "lobby").0).collect();
    let n = 200;
    for k in 0..n {
        let poster = conns[k % conns.len()];
        let p = h.post(poster, &format!("m{k}")).unwrap();
        assert_eq!(p.seq, Seq(k as u64 + 1));
        assert!(!p.duplicate);
        assert_eq!(p.recipients, conns.len());
    }
    let expected: Vec<u64> = (1..=n as u64).collect();
    for (i, &c) in conns.iter().enumerate() {
        assert_eq!(h.live_seqs(c), expected, "member {i}");
        let live = h.live(c);
        // The poster is among the recipients of its own message, with its text.
        for (k, m) in live.iter().enumerate() {
            assert_eq!(m.text, format!("m{k}"));
            assert_eq!(&*m.user, format!("u{}", k % conns.len()));
            assert_eq!(&*m.room, "lobby");
        }
    }
    assert_eq!(h.last_seq("lobby"), n as u64);
}

#[test]
fn recipients_are_in_ascending_conn_order_and_the_payload_is_shared() {
    let mut h = Harness::new(config());
    let mut conns: Vec<_> = (0..6).map(|i| h.connect(&format!("u{i}"), "r").0).collect();
    // Detach and re-attach one in the middle so that conn ids are not join order.
    let (_, t) = h.connect("late", "r");
    let c = h.attach(&t, 0);
    conns.push(c);
    h.post(conns[3], "hello").unwrap();
    let deliveries = h.last_deliveries();
    assert_eq!(deliveries.len(), 1, "one Deliver for the whole room");
    let (to, event) = &deliveries[0];
    let mut sorted = conns.clone();
    sorted.sort();
    assert_eq!(to.as_slice(), &sorted[..]);
    assert!(matches!(to, Recipients::Many(_)));
    assert!(matches!(event, Event::Message(_)));
    // Every inbox holds the same Arc, not a copy.
    let first = h.live(conns[0])[0].clone();
    for &c in &conns {
        assert!(std::sync::Arc::ptr_eq(&h.live(c)[0], &first));
    }
}

#[test]
fn rooms_are_sequenced_independently() {
    let mut h = Harness::new(config());
    let (a, _) = h.connect("ann", "a");
    let (b, _) = h.connect("bob", "b");
    for i in 0..10 {
        h.post(a, &format!("a{i}")).unwrap();
        if i % 2 == 0 {
            h.post(b, &format!("b{i}")).unwrap();
        }
    }
    assert_eq!(h.live_seqs(a), (1..=10).collect::<Vec<_>>());
    assert_eq!(h.live_seqs(b), (1..=5).collect::<Vec<_>>());
    assert!(h.live(a).iter().all(|m| &*m.room == "a"));
    assert!(h.live(b).iter().all(|m| &*m.room == "b"));
}

// ---- history ---------------------------------------------------------------------

#[test]
fn history_keeps_only_the_newest_and_honours_since_and_limit() {
    let mut h = small_history(5);
    let (c, _) = h.connect("ann", "r");
    for i in 1..=12 {
        h.post(c, &format!("t{i}")).unwrap();
    }
    let seqs =
        |v: Vec<std::sync::Arc<grpc_chat::core::Message>>| v.iter().map(|m| m.seq.get()).collect::<Vec<_>>();
    assert_eq!(seqs(h.broker.history("r", Seq(0), 0).unwrap()), vec![8, 9, 10, 11, 12]);
    assert_eq!(h.broker.history("r", Seq(0), 0).unwrap()[0].text, "t8");
    assert_eq!(seqs(h.broker.history("r", Seq(0), 2).unwrap()), vec![11, 12], "limit keeps the newest");
    assert_eq!(seqs(h.broker.history("r", Seq(0), 50).unwrap()), vec![8, 9, 10, 11, 12]);
    assert_eq!(seqs(h.broker.history("r", Seq(9), 0).unwrap()), vec![10, 11, 12]);
    assert_eq!(seqs(h.broker.history("r", Seq(9), 1).unwrap()), vec![12]);
    assert_eq!(
        seqs(h.broker.history("r", Seq(3), 0).unwrap()),
        vec![8, 9, 10, 11, 12],
        "since older than retained"
    );
    assert!(h.broker.history("r", Seq(12), 0).unwrap().is_empty());
    assert!(h.broker.history("r", Seq(99), 0).unwrap().is_empty());
    assert!(h.broker.history("nowhere", Seq(0), 0).unwrap().is_empty(), "unknown room");
    assert_eq!(code(h.broker.history("bad room!", Seq(0), 0)), Code::InvalidArgument);
    assert_eq!(code(h.broker.history("", Seq(0), 0)), Code::InvalidArgument);
    assert!(h.broker.rooms().iter().all(|r| &*r.name != "nowhere"), "a history query creates no room");
}

#[test]
fn history_limit_zero_retains_nothing_but_still_sequences() {
    let mut h = small_history(0);
    let (c, t) = h.connect("ann", "r");
    for i in 0..3 {
        h.post(c, &format!("{i}")).unwrap();
    }
    assert!(h.broker.history("r", Seq(0), 0).unwrap().is_empty());
    assert_eq!(h.last_seq("r"), 3);
    h.end_stream(c);
    let (c2, r) = h.try_attach(&t, 1, Epoch(0));
    assert!(matches!(r, Ok(Accepted::Attached { gap: true, replayed: 0, .. })), "{r:?}");
    assert!(h.welcome(c2).gap);
}

// ---- replay on attach ------------------------------------------------------------

/// A room "r" with `n` messages, history 5, and a detached session "bob" at hand.
fn room_with(n: usize) -> (Harness, grpc_chat::core::Token, Epoch) {
    let mut h = small_history(5);
    let (a, _) = h.connect("ann", "r");
    let info = h.join("bob", "r");
    for i in 1..=n {
        h.post(a, &format!("t{i}")).unwrap();
    }
    (h, info.token, info.epoch)
}

#[test]
fn replay_gives_exactly_the_missed_messages_after_the_welcome() {
    let (mut h, token, epoch) = room_with(8);
    let (c, r) = h.try_attach(&token, 5, epoch);
    assert!(matches!(r, Ok(Accepted::Attached { gap: false, replayed: 3, resumed: false, .. })), "{r:?}");
    let events = h.events(c);
    assert!(matches!(&events[0], Event::Welcome(w) if w.last_seq == Seq(8) && !w.gap && w.epoch == epoch));
    match &events[1] {
        Event::Backlog(ms) => {
            assert_eq!(ms.iter().map(|m| m.seq.get()).collect::<Vec<_>>(), vec![6, 7, 8]);
            assert_eq!(ms.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(), vec!["t6", "t7", "t8"]);
        }
        other => panic!("expected a backlog, got {other:?}"),
    }
    assert_eq!(events.len(), 2);
}

#[test]
fn replay_up_to_date_sends_no_backlog() {
    let (mut h, token, epoch) = room_with(8);
    let (c, r) = h.try_attach(&token, 8, epoch);
    assert!(matches!(r, Ok(Accepted::Attached { gap: false, replayed: 0, .. })), "{r:?}");
    assert_eq!(h.events(c).len(), 1, "only the welcome");
}

#[test]
fn replay_since_older_than_retained_flags_a_gap() {
    let (mut h, token, epoch) = room_with(12); // retains 8..=12
    let (c, r) = h.try_attach(&token, 6, epoch);
    assert!(matches!(r, Ok(Accepted::Attached { gap: true, replayed: 5, .. })), "{r:?}");
    assert!(h.welcome(c).gap);
    assert_eq!(h.backlog_seqs(c), vec![8, 9, 10, 11, 12]);
    // Exactly at the edge: since 7 wants 8.. which is all there.
    let (mut h, token, epoch) = room_with(12);
    let (c, _) = h.try_attach(&token, 7, epoch);
    assert!(!h.welcome(c).gap);
    assert_eq!(h.backlog_seqs(c), vec![8, 9, 10, 11, 12]);
}

#[test]
fn replay_with_another_epoch_is_a_gap_and_a_full_replay() {
    let (mut h, token, epoch) = room_with(4);
    let other = Epoch(epoch.get() + 77);
    let (c, r) = h.try_attach(&token, 3, other);
    assert!(matches!(r, Ok(Accepted::Attached { gap: true, replayed: 4, .. })), "{r:?}");
    let w = h.welcome(c);
    assert!(w.gap);
    assert_eq!(w.epoch, epoch, "the welcome names the room's real epoch");
    assert_eq!(h.backlog_seqs(c), vec![1, 2, 3, 4]);
}

#[test]
fn replay_since_zero_is_everything_retained_without_gap() {
    let (mut h, token, _) = room_with(9);
    let (c, _) = h.try_attach(&token, 0, Epoch(0));
    assert!(!h.welcome(c).gap, "since 0 asks for what is retained; nothing is missing");
    assert_eq!(h.backlog_seqs(c), vec![5, 6, 7, 8, 9]);
    // Another epoch with since 0 is not a gap either.
    let (mut h, token, epoch) = room_with(2);
    let (c, _) = h.try_attach(&token, 0, Epoch(epoch.get() + 1));
    assert!(!h.welcome(c).gap);
    assert_eq!(h.backlog_seqs(c), vec![1, 2]);
}

#[test]
fn a_resume_from_zero_is_owed_everything_since_the_join() {
    // Bob joins an empty room (history 5) and his stream drops before he reads anything;
    // 9 messages later he resumes with since 0, the only seq he has. 1..=4 are gone.
    let mut h = small_history(5);
    let (a, _) = h.connect("ann", "r");
    let (b, token) = h.connect("bob", "r");
    h.end_stream(b);
    for i in 1..=9 {
        h.post(a, &format!("t{i}")).unwrap();
    }
    let (c, r) = h.try_attach(&token, 0, Epoch(0));
    assert!(matches!(r, Ok(Accepted::Attached { gap: true, resumed: true, replayed: 5, .. })), "{r:?}");
    assert!(h.welcome(c).gap, "a session that joined at 0 missed 1..=4: never silent loss");
    assert_eq!(h.backlog_seqs(c), vec![5, 6, 7, 8, 9]);

    // Nothing is owed from before the join: Cid joins at 9, where 5..=9 are retained,
    // and resumes from 0 after 3 more; everything after 9 is still there.
    let (d, token) = h.connect("cid", "r");
    h.end_stream(d);
    for i in 10..=12 {
        h.post(a, &format!("t{i}")).unwrap();
    }
    let (c, r) = h.try_attach(&token, 0, Epoch(0));
    assert!(matches!(r, Ok(Accepted::Attached { gap: false, resumed: true, .. })), "{r:?}");
    assert!(!h.welcome(c).gap);
    assert_eq!(h.backlog_seqs(c), vec![8, 9, 10, 11, 12], "since 0 still replays all that is retained");

    // A later since is trusted as it is: Cid saw up to 12, resumes after 7 more (retains 15..=19).
    h.end_stream(c);
    for i in 13..=19 {
        h.post(a, &format!("t{i}")).unwrap();
    }
    let (c, r) = h.try_attach(&token, 12, Epoch(0));
    assert!(matches!(r, Ok(Accepted::Attached { gap: true, replayed: 5, .. })), "{r:?}");
    assert_eq!(h.backlog_seqs(c), vec![15, 16, 17, 18, 19]);
}

#[test]
fn replay_since_beyond_last_seq_is_a_new_log() {
    let (mut h, token, _) = room_with(3);
    let (c, r) = h.try_attach(&token, 40, Epoch(0));
    assert!(matches!(r, Ok(Accepted::Attached { gap: true, replayed: 3, .. })), "{r:?}");
    assert!(h.welcome(c).gap);
    assert_eq!(h.backlog_seqs(c), vec![1, 2, 3]);
}

#[test]
fn a_restarted_broker_has_another_epoch() {
    let a = small_history(5).join("x", "r").epoch;
    let b = Harness::with_epoch(config(), 555_000).join("x", "r").epoch;
    assert_ne!(a, b);
    assert_ne!(a, Epoch(0));
}

// ---- names -----------------------------------------------------------------------

#[test]
fn a_name_is_unique_per_room_and_free_again_after_leave() {
    let mut h = Harness::new(config());
    let ann = h.join("ann", "r");
    assert_eq!(ann.member_count, 1);
    assert_eq!(code(h.try_join("ann", "r")), Code::AlreadyExists);
    assert_eq!(h.broker.session_count(), 1, "the refused join left nothing behind");
    let other = h.join("ann", "elsewhere");
    assert_ne!(other.token, ann.token);
    assert!(matches!(h.leave(ann.token.as_str()), Ok(Accepted::Left { .. })));
    assert_eq!(h.members("r"), Vec::<String>::new());
    let again = h.join("ann", "r");
    assert_ne!(again.token, ann.token);
    // An implicit join on a stream is refused the same way, and the stream is closed.
    let c = h.open();
    let r = h.hello(c, Hello { user: "ann".into(), room: "r".into(), ..Hello::default() });
    assert_eq!(code(r), Code::AlreadyExists);
    assert_eq!(h.close_code(c), Some(Code::AlreadyExists));
}

#[test]
fn a_name_is_free_again_after_the_grace_runs_out() {
    let mut h = Harness::new(config());
    let (c, _) = h.connect("ann", "r");
    h.end_stream(c);
    let grace = h.broker.config().resume_grace;
    h.advance(grace - Duration::from_millis(1));
    assert_eq!(code(h.try_join("ann", "r")), Code::AlreadyExists, "still reserved within the grace");
    h.advance(Duration::from_millis(1));
    h.join("ann", "r");
}

// ---- session expiry --------------------------------------------------------------

#[test]
fn a_session_never_attached_expires_after_the_attach_timeout() {
    let mut h = Harness::new(config());
    let info = h.join("ann", "r");
    let timeout = h.broker.config().attach_timeout;
    assert_eq!(h.broker.poll_timeout(), Some(h.now + timeout));
    h.advance(timeout - Duration::from_millis(1));
    assert_eq!(h.broker.session_count(), 1);
    h.advance(Duration::from_millis(1));
    assert_eq!(h.broker.session_count(), 0);
    assert_eq!(h.broker.poll_timeout(), None);
    assert!(h.members("r").is_empty());
    // An expired session is simply unknown: NotFound (only an explicit leave is
    // remembered as FailedPrecondition)...
    assert_eq!(code(h.send(info.token.as_str(), "hi")), Code::NotFound);
    // ...like a token never issued, or garbage.
    let never = h.token();
    assert_eq!(code(h.send(never.as_str(), "hi")), Code::NotFound);
    assert_eq!(code(h.send("", "hi")), Code::NotFound);
    assert_eq!(code(h.send("not a token\u{7}", "hi")), Code::NotFound);
    assert_eq!(h.last_seq("r"), 0);
    // Attaching to the expired session closes the stream with the same answer.
    let (c, r) = h.try_attach(&info.token, 0, Epoch(0));
    assert_eq!(code(r), Code::NotFound);
    assert_eq!(h.close_code(c), Some(Code::NotFound));
}

#[test]
fn a_spurious_timeout_is_harmless() {
    let mut h = Harness::new(config());
    let (c, _) = h.connect("ann", "r");
    h.advance(Duration::ZERO);
    h.advance(Duration::from_secs(3600));
    assert_eq!(h.broker.session_count(), 1, "an attached session never expires");
    assert!(h.last.is_empty());
    assert!(!h.is_closed(c));
}

#[test]
fn send_on_a_detached_session_pushes_its_expiry_back() {
    let mut h = Harness::new(config());
    let info = h.join("ann", "r");
    h.advance(Duration::from_secs(20));
    h.send(info.token.as_str(), "still here").unwrap();
    h.advance(Duration::from_secs(20));
    assert_eq!(h.broker.session_count(), 1, "the send refreshed the attach timeout");
    h.advance(Duration::from_secs(10));
    assert_eq!(h.broker.session_count(), 0);
}

// ---- resume ----------------------------------------------------------------------

#[test]
fn resume_within_grace_keeps_the_session_and_replays_what_was_missed() {
    let mut h = Harness::new(config());
    let (watcher, _) = h.connect("ann", "r");
    let (c, token) = h.connect("bob", "r");
    h.post(watcher, "one").unwrap();
    h.end_stream(c);
    h.post(watcher, "two").unwrap();
    h.post(watcher, "three").unwrap();
    h.advance(h.broker.config().resume_grace - Duration::from_secs(1));
    let c2 = h.attach(&token, 1);
    let w = h.welcome(c2);
    assert!(w.resumed);
    assert!(!w.gap);
    assert_eq!(w.session.as_ref(), Some(&token));
    assert_eq!(h.backlog_seqs(c2), vec![2, 3]);
    // Nobody saw bob leave; the grace timer is gone.
    assert_eq!(h.presence(watcher), vec![("bob".to_string(), true)]);
    h.advance(Duration::from_secs(60));
    assert_eq!(h.members("r"), vec!["ann", "bob"]);
    h.post(watcher, "four").unwrap();
    assert_eq!(h.live_seqs(c2), vec![4]);
}

#[test]
fn after_the_grace_the_session_leaves_and_members_see_it() {
    let mut h = Harness::new(config());
    let (watcher, _) = h.connect("ann", "r");
    let (c, token) = h.connect("bob", "r");
    h.end_stream(c);
    assert!(h.closes_of(c).is_empty(), "the stream had ended; the core sends no close");
    assert_eq!(h.presence(watcher), vec![("bob".to_string(), true)]);
    h.advance(h.broker.config().resume_grace);
    assert_eq!(h.presence(watcher), vec![("bob".to_string(), true), ("bob".to_string(), false)]);
    assert_eq!(h.members("r"), vec!["ann"]);
    let (c2, r) = h.try_attach(&token, 0, Epoch(0));
    assert_eq!(code(r), Code::NotFound, "an expired session is unknown");
    assert!(h.is_closed(c2));
}

#[test]
fn a_second_stream_on_the_same_session_aborts_the_first() {
    let mut h = Harness::new(config());
    let (watcher, _) = h.connect("ann", "r");
    let (first, token) = h.connect("bob", "r");
    let second = h.attach(&token, 0);
    let close = h.close_of(first);
    assert_eq!(close.error.as_ref().map(|r| r.code), Some(Code::Aborted));
    assert!(!close.flush);
    assert!(h.welcome(second).resumed);
    // Posts go to the second stream only; the first is forgotten.
    h.post(watcher, "x").unwrap();
    assert_eq!(h.live_seqs(second), vec![1]);
    assert!(h.live_seqs(first).is_empty());
    assert_eq!(code(h.post(first, "from the old stream")), Code::FailedPrecondition);
    assert_eq!(h.input(Input::StreamEnded { conn: first }), Ok(Accepted::Ignored));
    assert_eq!(h.broker.stream_count(), 2);
    assert_eq!(h.presence(watcher), vec![("bob".to_string(), true)], "no presence churn");
}

// ---- idempotent posting ----------------------------------------------------------

#[test]
fn a_repeated_client_msg_id_returns_the_original_seq_without_a_second_delivery() {
    let mut h = Harness::new(config());
    let (a, ta) = h.connect("ann", "r");
    let (b, tb) = h.connect("bob", "r");
    h.post(b, "before").unwrap();
    let first = h.post_id(a, "hello", "id-1").unwrap();
    assert_eq!((first.seq, first.duplicate), (Seq(2), false));
    h.post(b, "between").unwrap();
    let again = h.post_id(a, "hello", "id-1").unwrap();
    assert_eq!((again.seq, again.duplicate, again.recipients), (Seq(2), true, 0));
    assert!(h.last.is_empty(), "no second Deliver");
    // Through Send too, on the same session.
    let via_send = h.send_id(ta.as_str(), "hello", "id-1").unwrap();
    assert_eq!((via_send.seq, via_send.duplicate), (Seq(2), true));
    assert_eq!(h.last_seq("r"), 3);
    assert_eq!(h.live_seqs(b), vec![1, 2, 3]);
    // Another session may use the same id.
    let other = h.send_id(tb.as_str(), "mine", "id-1").unwrap();
    assert_eq!((other.seq, other.duplicate), (Seq(4), false));
    assert_eq!(h.live(a).last().unwrap().client_msg_id, "id-1");
    // An empty id is never deduplicated.
    assert_eq!(h.post(a, "same").unwrap().seq, Seq(5));
    assert_eq!(h.post(a, "same").unwrap().seq, Seq(6));
}

#[test]
fn the_dedup_window_is_bounded() {
    let mut h = Harness::new(BrokerConfig { dedup_window: 2, ..config() });
    let (a, _) = h.connect("ann", "r");
    h.post_id(a, "1", "a").unwrap();
    h.post_id(a, "2", "b").unwrap();
    assert!(h.post_id(a, "1", "a").unwrap().duplicate);
    h.post_id(a, "3", "c").unwrap(); // evicts "a"
    let p = h.post_id(a, "1", "a").unwrap();
    assert!(!p.duplicate);
    assert_eq!(p.seq, Seq(4));
}

// ---- rate limit ------------------------------------------------------------------

fn rate_limited() -> Harness {
    Harness::new(BrokerConfig { rate_limit: Some(RateLimit { per_second: 2.0, burst: 3 }), ..config() })
}

#[test]
fn the_rate_limit_allows_a_burst_then_refills() {
    let mut h = rate_limited();
    let (a, _) = h.connect("ann", "r");
    let (b, _) = h.connect("bob", "r");
    for i in 0..3 {
        h.post(a, &format!("{i}")).unwrap();
    }
    let before = h.events(b).len();
    let r = h.post_id(a, "one too many", "cm-4");
    assert_eq!(code(r), Code::ResourceExhausted);
    assert_eq!(h.last_seq("r"), 3);
    // The rejection is a notice to the poster only, carrying the code and the id.
    assert_eq!(h.events(b).len(), before);
    let deliveries = h.last_deliveries();
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0].0, Recipients::One(a));
    match &deliveries[0].1 {
        Event::Notice(n) => {
            assert_eq!(n.code, Some(Code::ResourceExhausted));
            assert_eq!(n.client_msg_id, "cm-4");
        }
        other => panic!("expected a notice, got {other:?}"),
    }
    assert!(!h.is_closed(a), "a rate-limited stream stays open");
    // A rejected id is not remembered: retrying it later posts it.
    h.advance(Duration::from_secs(1));
    assert_eq!(h.post_id(a, "retry", "cm-4").unwrap().seq, Seq(4));
    assert_eq!(h.post(a, "five").unwrap().seq, Seq(5));
    assert_eq!(code(h.post(a, "six")), Code::ResourceExhausted);
    // Other sessions have their own buckets.
    h.post(b, "bob's").unwrap();
}

#[test]
fn the_rate_limit_applies_to_send_too_and_never_exceeds_the_burst() {
    let mut h = rate_limited();
    let info = h.join("ann", "r");
    h.advance(Duration::from_secs(25)); // a long idle time refills to `burst`, not beyond
    for _ in 0..3 {
        h.send(info.token.as_str(), "x").unwrap();
    }
    assert_eq!(code(h.send(info.token.as_str(), "x")), Code::ResourceExhausted);
    assert!(h.last.is_empty(), "a Send rejection is only the status");
    h.advance(Duration::from_millis(500));
    h.send(info.token.as_str(), "y").unwrap();
    assert_eq!(code(h.send(info.token.as_str(), "z")), Code::ResourceExhausted);
    // A duplicate id is answered even when the bucket is empty.
    h.advance(Duration::from_millis(500));
    h.send_id(info.token.as_str(), "w", "k").unwrap();
    assert!(h.send_id(info.token.as_str(), "w", "k").unwrap().duplicate);
}

// ---- slow members ----------------------------------------------------------------

#[test]
fn a_lagging_member_is_closed_without_flush_and_may_resume() {
    let mut h = Harness::new(config());
    let (a, _) = h.connect("ann", "r");
    let (slow, token) = h.connect("bob", "r");
    let (c, _) = h.connect("cid", "r");
    h.post(a, "1").unwrap();
    assert_eq!(h.input(Input::Lagging { conn: slow }), Ok(Accepted::Detached));
    let close = h.close_of(slow);
    assert_eq!(close.error.as_ref().map(|r| r.code), Some(Code::ResourceExhausted));
    assert!(!close.flush);
    assert_eq!(h.last.len(), 1, "only the close: no presence, nothing to others");
    assert_eq!(h.broker.session_count(), 3);
    h.post(a, "2").unwrap();
    h.post(c, "3").unwrap();
    assert_eq!(h.live_seqs(a), vec![1, 2, 3]);
    assert_eq!(h.live_seqs(c), vec![1, 2, 3]);
    assert_eq!(h.live_seqs(slow), vec![1]);
    // Repeated reports for the gone stream are ignored.
    assert_eq!(h.input(Input::Lagging { conn: slow }), Ok(Accepted::Ignored));
    assert_eq!(h.input(Input::StreamEnded { conn: slow }), Ok(Accepted::Ignored));
    let back = h.attach(&token, 1);
    assert!(h.welcome(back).resumed);
    assert_eq!(h.backlog_seqs(back), vec![2, 3]);
    assert_eq!(h.presence(a), vec![("bob".to_string(), true), ("cid".to_string(), true)]);
}

#[test]
fn a_lagging_member_that_never_comes_back_leaves_after_the_grace() {
    let mut h = Harness::new(config());
    let (a, _) = h.connect("ann", "r");
    let (slow, _) = h.connect("bob", "r");
    h.input(Input::Lagging { conn: slow }).unwrap();
    h.advance(h.broker.config().resume_grace);
    assert_eq!(h.members("r"), vec!["ann"]);
    assert_eq!(h.presence(a).last(), Some(&("bob".to_string(), false)));
}
