//! The sans-IO client session, driven with virtual time: no sockets, no threads, no sleep.

use std::time::{Duration, Instant};

use grpc_chat::client::{
    Action, Code, Error, Event, HelloParams, Incoming, Joined, Message, Session, SessionConfig, Status,
    StreamId, WelcomeInfo,
};

/// A session plus a virtual clock.
struct Harness {
    s: Session,
    now: Instant,
}

impl Harness {
    fn new(last_seq: u64, since: u64) -> Harness {
        let now = Instant::now();
        let joined = Joined {
            user: "alice".into(),
            room: "general".into(),
            session: "tok1".into(),
            members: vec!["alice".into()],
            member_count: 1,
            last_seq,
            epoch: 7,
            history_limit: 500,
        };
        Harness { s: Session::new(SessionConfig::default(), &joined, since, now), now }
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.s.handle_timeout(self.now);
    }

    fn actions(&mut self) -> Vec<Action> {
        std::iter::from_fn(|| self.s.poll_action()).collect()
    }

    /// Expects exactly one OpenStream among the actions and returns it.
    fn opened(&mut self) -> (StreamId, HelloParams) {
        let mut found = None;
        for a in self.actions() {
            if let Action::OpenStream { stream, hello } = a {
                assert!(found.is_none(), "two streams opened");
                found = Some((stream, hello));
            }
        }
        found.expect("a stream is opened")
    }

    fn welcome(&mut self, stream: StreamId, last_seq: u64, epoch: u64, gap: bool) -> Vec<Action> {
        let w = WelcomeInfo {
            session: self.s.token().to_string(),
            user: "alice".into(),
            room: "general".into(),
            members: vec!["alice".into()],
            member_count: 1,
            last_seq,
            epoch,
            resumed: false,
            gap,
        };
        self.s.handle_event(self.now, stream, Incoming::Welcome(w));
        self.actions()
    }

    fn message(&mut self, stream: StreamId, seq: u64, user: &str, id: &str) -> Vec<Action> {
        let m = Message {
            room: "general".into(),
            user: user.into(),
            text: format!("m{seq}"),
            seq,
            sent_at_ms: 0,
            client_msg_id: id.into(),
        };
        self.s.handle_event(self.now, stream, Incoming::Message(m));
        self.actions()
    }

    fn end(&mut self, stream: StreamId, code: Code) -> Vec<Action> {
        self.s.handle_stream_end(self.now, stream, Status::new(code, "x"));
        self.actions()
    }

    /// Opens the first stream and makes it live with the room at `last_seq`.
    fn live(last_seq: u64) -> (Harness, StreamId) {
        let mut h = Harness::new(last_seq, last_seq);
        let (stream, _) = h.opened();
        h.welcome(stream, last_seq, 7, false);
        assert!(h.s.is_live());
        (h, stream)
    }
}

/// What a rejoin under the same name in `general` answers: a new token, an empty room.
fn rejoined(session: &str, epoch: u64) -> Joined {
    Joined {
        user: "alice".into(),
        room: "general".into(),
        session: session.into(),
        members: vec![],
        member_count: 1,
        last_seq: 0,
        epoch,
        history_limit: 500,
    }
}

fn shown_seqs(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Emit(Event::Message(m)) => Some(m.seq),
            _ => None,
        })
        .collect()
}

fn sent_ids(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SendPost { client_msg_id, .. } => Some(client_msg_id.clone()),
            _ => None,
        })
        .collect()
}

fn retry_in(actions: &[Action]) -> Option<Duration> {
    actions.iter().find_map(|a| match a {
        Action::Emit(Event::Disconnected { retry_in, .. }) => Some(*retry_in),
        _ => None,
    })
}

#[test]
fn first_stream_says_hello_with_token_since_and_epoch() {
    let mut h = Harness::new(30, 10);
    let (_, hello) = h.opened();
    assert_eq!(hello, HelloParams { session: "tok1".into(), since_seq: 10, epoch: 7 });
}

#[test]
fn replay_then_live_posts_wait_for_the_replay() {
    let mut h = Harness::new(3, 1);
    let (s, _) = h.opened();
    h.s.post(h.now, "p1".into(), "early".into()).unwrap();
    assert!(sent_ids(&h.actions()).is_empty(), "nothing is sent before the welcome");
    let a = h.welcome(s, 3, 7, false);
    assert!(matches!(a[0], Action::Emit(Event::Welcome { reconnected: false, .. })));
    assert!(sent_ids(&a).is_empty(), "nothing is sent during the replay");
    assert_eq!(shown_seqs(&h.message(s, 2, "bob", "")), vec![2]);
    let a = h.message(s, 3, "bob", "");
    assert_eq!(shown_seqs(&a), vec![3]);
    assert_eq!(sent_ids(&a), vec!["p1"], "queued post goes out once caught up");
    assert!(h.s.is_live());
}

#[test]
fn own_echo_acknowledges_and_duplicates_are_dropped() {
    let (mut h, s) = Harness::live(5);
    h.s.post(h.now, "p1".into(), "hi".into()).unwrap();
    assert_eq!(sent_ids(&h.actions()), vec!["p1"]);
    assert_eq!(h.s.pending_posts(), 1);
    // Someone else using the same id does not acknowledge our post.
    h.message(s, 6, "bob", "p1");
    assert_eq!(h.s.pending_posts(), 1);
    assert_eq!(shown_seqs(&h.message(s, 7, "alice", "p1")), vec![7]);
    assert_eq!(h.s.pending_posts(), 0);
    assert!(shown_seqs(&h.message(s, 7, "alice", "p1")).is_empty(), "seq 7 again is not shown");
    assert!(shown_seqs(&h.message(s, 4, "bob", "")).is_empty());
}

#[test]
fn rejected_post_is_reported_and_not_resent() {
    let (mut h, s) = Harness::live(0);
    h.s.post(h.now, "p1".into(), "spam".into()).unwrap();
    h.actions();
    let notice = Incoming::Notice {
        text: "message text must not be empty".into(),
        code: 3,
        client_msg_id: "p1".into(),
    };
    h.s.handle_event(h.now, s, notice);
    let a = h.actions();
    assert!(a.contains(&Action::Emit(Event::PostRejected {
        client_msg_id: "p1".into(),
        code: Code::InvalidArgument,
        reason: "message text must not be empty".into()
    })));
    assert_eq!(h.s.pending_posts(), 0);
    let info =
        Incoming::Notice { text: "server shutting down".into(), code: 0, client_msg_id: String::new() };
    h.s.handle_event(h.now, s, info);
    assert_eq!(h.actions(), vec![Action::Emit(Event::Notice("server shutting down".into()))]);
}

#[test]
fn dropped_stream_backs_off_exponentially_with_a_cap_then_resumes() {
    let (mut h, s) = Harness::live(4);
    let a = h.end(s, Code::Unavailable);
    assert_eq!(retry_in(&a), Some(Duration::from_millis(250)));
    assert_eq!(h.s.poll_timeout(), Some(h.now + Duration::from_millis(250)));
    h.advance(Duration::from_millis(249));
    assert!(h.actions().is_empty(), "not yet");
    h.advance(Duration::from_millis(1));
    let (s2, hello) = h.opened();
    assert_eq!(hello, HelloParams { session: "tok1".into(), since_seq: 4, epoch: 7 });
    let mut delays = vec![];
    let mut stream = s2;
    for _ in 0..8 {
        delays.push(retry_in(&h.end(stream, Code::Unavailable)).unwrap().as_millis());
        h.advance(Duration::from_secs(60));
        stream = h.opened().0;
    }
    assert_eq!(delays, vec![500, 1000, 2000, 4000, 8000, 8000, 8000, 8000]);
    // A welcome resets the backoff.
    h.welcome(stream, 4, 7, false);
    let again = h.s.poll_timeout();
    assert_eq!(again, None);
    assert_eq!(retry_in(&h.end(stream, Code::Cancelled)), Some(Duration::from_millis(250)));
}

#[test]
fn resume_dedups_the_replay_and_resends_unacknowledged_posts_once() {
    let (mut h, s) = Harness::live(2);
    h.s.post(h.now, "p1".into(), "one".into()).unwrap();
    h.s.post(h.now, "p2".into(), "two".into()).unwrap();
    h.actions();
    h.message(s, 3, "bob", "");
    h.end(s, Code::Unavailable);
    h.advance(Duration::from_secs(1));
    let (s2, hello) = h.opened();
    assert_eq!(hello.since_seq, 3);
    // While the stream was down p1 was accepted (seq 4) and bob posted (seq 5).
    let a = h.welcome(s2, 5, 7, false);
    assert!(matches!(a[0], Action::Emit(Event::Welcome { reconnected: true, .. })));
    assert!(!a.contains(&Action::Emit(Event::Gap)));
    assert!(shown_seqs(&h.message(s2, 3, "bob", "")).is_empty(), "overlap is dropped");
    assert!(sent_ids(&h.message(s2, 4, "alice", "p1")).is_empty());
    let a = h.message(s2, 5, "bob", "");
    assert_eq!(shown_seqs(&a), vec![5]);
    assert_eq!(sent_ids(&a), vec!["p2"], "only the unacknowledged post is re-sent");
}

#[test]
fn lost_session_rejoins_and_reports_the_gap_of_a_new_epoch() {
    let (mut h, s) = Harness::live(9);
    h.s.post(h.now, "p1".into(), "still here?".into()).unwrap();
    h.actions();
    // The server restarted: the stream drops, and the session is unknown.
    h.end(s, Code::Unavailable);
    h.advance(Duration::from_secs(1));
    let (s2, _) = h.opened();
    let a = h.end(s2, Code::NotFound);
    assert_eq!(a, vec![Action::Rejoin { user: "alice".into(), room: "general".into() }]);
    let joined = rejoined("tok2", 8);
    h.s.handle_rejoined(h.now, &joined);
    let (s3, hello) = h.opened();
    assert_eq!(hello, HelloParams { session: "tok2".into(), since_seq: 9, epoch: 7 });
    let a = h.welcome(s3, 0, 8, true);
    assert!(a.contains(&Action::Emit(Event::Gap)));
    assert_eq!(sent_ids(&a), vec!["p1"], "nothing to replay in a new log: re-send at once");
    assert_eq!(h.s.last_seq(), 0);
    assert_eq!(h.s.epoch(), 8);
    assert_eq!(shown_seqs(&h.message(s3, 1, "alice", "p1")), vec![1], "seq 1 of the new log is shown");
    assert_eq!(h.s.pending_posts(), 0);
}

#[test]
fn rejoin_failures_back_off_and_a_taken_name_closes() {
    let (mut h, s) = Harness::live(0);
    h.end(s, Code::NotFound);
    h.s.handle_rejoin_failed(h.now, Status::new(Code::Unavailable, "down"));
    let a = h.actions();
    assert_eq!(retry_in(&a), Some(Duration::from_millis(250)));
    h.advance(Duration::from_millis(250));
    assert_eq!(h.actions(), vec![Action::Rejoin { user: "alice".into(), room: "general".into() }]);
    h.s.handle_rejoin_failed(h.now, Status::new(Code::AlreadyExists, "taken"));
    let a = h.actions();
    let closed = Error::NameTaken { user: "alice".into(), room: "general".into() };
    assert_eq!(a, vec![Action::Emit(Event::Closed(Some(closed)))]);
    assert!(h.s.post(h.now, "p".into(), "x".into()).is_err());
}

#[test]
fn superseded_stream_is_not_fought_over() {
    let (mut h, s) = Harness::live(0);
    let a = h.end(s, Code::Aborted);
    assert_eq!(a, vec![Action::Emit(Event::Closed(Some(Error::Superseded)))]);
    assert_eq!(h.s.poll_timeout(), None);
}

#[test]
fn retry_now_skips_the_backoff() {
    let (mut h, s) = Harness::live(0);
    h.end(s, Code::Unavailable);
    assert!(h.s.retry_now(h.now));
    let (s2, _) = h.opened();
    assert!(!h.s.retry_now(h.now), "already connecting");
    // Events of the old stream are ignored.
    assert!(h.message(s, 1, "bob", "").is_empty());
    assert!(h.end(s, Code::Unavailable).is_empty());
    h.welcome(s2, 0, 7, false);
    assert!(h.s.is_live());
}

#[test]
fn a_stream_without_welcome_times_out() {
    let mut h = Harness::new(0, 0);
    let (s, _) = h.opened();
    h.advance(Duration::from_secs(10));
    let a = h.actions();
    assert_eq!(a[0], Action::CloseStream { stream: s });
    assert!(retry_in(&a).is_some());
}

#[test]
fn leave_on_the_stream_or_directly() {
    let (mut h, s) = Harness::live(0);
    h.s.leave(h.now);
    assert_eq!(h.actions(), vec![Action::SendLeave { stream: s }]);
    assert_eq!(h.end(s, Code::Ok), vec![Action::Emit(Event::Closed(None))]);

    let (mut h, s) = Harness::live(0);
    h.end(s, Code::Unavailable);
    h.s.leave(h.now);
    assert_eq!(
        h.actions(),
        vec![Action::LeaveSession { session: "tok1".into() }, Action::Emit(Event::Closed(None))]
    );

    let (mut h, s) = Harness::live(0);
    h.s.leave(h.now);
    h.actions();
    h.advance(Duration::from_secs(3));
    assert_eq!(
        h.actions(),
        vec![
            Action::CloseStream { stream: s },
            Action::LeaveSession { session: "tok1".into() },
            Action::Emit(Event::Closed(None))
        ]
    );
}

#[test]
fn replay_that_never_catches_up_still_sends_posts() {
    let mut h = Harness::new(50, 0);
    let (s, _) = h.opened();
    h.s.post(h.now, "p1".into(), "x".into()).unwrap();
    h.welcome(s, 50, 7, false);
    h.advance(Duration::from_secs(10));
    assert_eq!(sent_ids(&h.actions()), vec!["p1"]);
}

#[test]
fn a_session_lost_again_right_after_a_rejoin_backs_off() {
    let (mut h, s) = Harness::live(0);
    assert_eq!(
        h.end(s, Code::NotFound),
        vec![Action::Rejoin { user: "alice".into(), room: "general".into() }]
    );
    let mut joined = rejoined("tok2", 7);
    h.s.handle_rejoined(h.now, &joined);
    let (s2, _) = h.opened();
    let a = h.end(s2, Code::NotFound);
    assert_eq!(retry_in(&a), Some(Duration::from_millis(250)), "no tight rejoin loop");
    h.advance(Duration::from_millis(250));
    assert_eq!(h.actions(), vec![Action::Rejoin { user: "alice".into(), room: "general".into() }]);
    joined.session = "tok3".into();
    h.s.handle_rejoined(h.now, &joined);
    let (_, hello) = h.opened();
    assert_eq!(hello.session, "tok3");
    // A late answer to a rejoin the session gave up on releases the name it reserved.
    h.s.handle_rejoined(h.now, &Joined { session: "tok4".into(), ..joined });
    assert_eq!(h.actions(), vec![Action::LeaveSession { session: "tok4".into() }]);
}

#[test]
fn posts_refused_for_posting_too_fast_are_paused_and_resent() {
    let (mut h, s) = Harness::live(0);
    h.s.post(h.now, "p1".into(), "one".into()).unwrap();
    h.s.post(h.now, "p2".into(), "two".into()).unwrap();
    assert_eq!(sent_ids(&h.actions()), vec!["p1", "p2"]);
    let too_fast = |id: &str| Incoming::Notice {
        text: "posting too fast; slow down".into(),
        code: 8,
        client_msg_id: id.into(),
    };
    h.s.handle_event(h.now, s, too_fast("p1"));
    assert!(h.actions().is_empty(), "a rate refusal is not shown");
    h.s.post(h.now, "p3".into(), "three".into()).unwrap();
    assert!(sent_ids(&h.actions()).is_empty(), "held back during the pause");
    assert_eq!(h.s.poll_timeout(), Some(h.now + Duration::from_secs(1)));
    h.message(s, 1, "alice", "p2");
    h.advance(Duration::from_secs(1));
    assert_eq!(sent_ids(&h.actions()), vec!["p1", "p3"]);
    assert_eq!(h.s.pending_posts(), 2);
    // A post refused again and again is finally reported.
    for _ in 0..9 {
        h.s.handle_event(h.now, s, too_fast("p1"));
        h.advance(Duration::from_secs(1));
        assert_eq!(sent_ids(&h.actions()), vec!["p1"]);
    }
    h.s.handle_event(h.now, s, too_fast("p1"));
    let a = h.actions();
    assert!(
        matches!(&a[..], [Action::Emit(Event::PostRejected { code: Code::ResourceExhausted, .. })]),
        "{a:?}"
    );
    assert_eq!(h.s.pending_posts(), 1);
}

#[test]
fn a_rejoin_from_seq_0_reports_the_messages_missed_meanwhile() {
    // Joined an empty room, saw nothing, then stayed away longer than the server keeps a
    // session: the rejoin is a new session, which the server owes only what it retains,
    // and resuming from 0 means "whatever is retained" to it, so its welcome has no gap.
    let (mut h, s) = Harness::live(0);
    h.end(s, Code::Unavailable);
    h.advance(Duration::from_secs(1));
    let (s2, _) = h.opened();
    h.end(s2, Code::NotFound);
    h.s.handle_rejoined(h.now, &rejoined("tok2", 7));
    let (s3, hello) = h.opened();
    assert_eq!(hello.since_seq, 0);
    let a = h.welcome(s3, 3000, 7, false);
    assert!(!a.contains(&Action::Emit(Event::Gap)), "the welcome does not know");
    // The replay starts at 2501: seqs 1..=2500 were missed.
    let a = h.message(s3, 2501, "bob", "");
    assert_eq!(a.iter().filter(|a| **a == Action::Emit(Event::Gap)).count(), 1, "{a:?}");
    assert_eq!(
        a.last(),
        Some(&Action::Emit(Event::Message(Message {
            room: "general".into(),
            user: "bob".into(),
            text: "m2501".into(),
            seq: 2501,
            sent_at_ms: 0,
            client_msg_id: String::new(),
        }))),
        "the gap is reported before the message"
    );
    assert!(!h.message(s3, 2502, "bob", "").contains(&Action::Emit(Event::Gap)), "once");
}

#[test]
fn a_jump_in_seqs_is_a_gap_once_per_welcome_but_history_before_the_join_is_not() {
    // Joined at seq 3000 and asked for the history: it starts wherever the server's
    // retention starts, and that is no loss.
    let mut h = Harness::new(3000, 0);
    let (s, _) = h.opened();
    h.welcome(s, 3000, 7, false);
    for seq in 2501..=3000 {
        assert!(!h.message(s, seq, "bob", "").contains(&Action::Emit(Event::Gap)), "seq {seq}");
    }
    assert!(h.s.is_live());
    // A live message that skips one: the member missed seq 3001.
    assert!(h.message(s, 3002, "bob", "").contains(&Action::Emit(Event::Gap)));
    assert!(!h.message(s, 3004, "bob", "").contains(&Action::Emit(Event::Gap)), "once per welcome");
    // A resume that the server reports as a gap is reported once, not again at the jump.
    h.end(s, Code::Unavailable);
    h.advance(Duration::from_secs(1));
    let (s2, hello) = h.opened();
    assert_eq!(hello.since_seq, 3004);
    let a = h.welcome(s2, 4000, 7, true);
    assert!(a.contains(&Action::Emit(Event::Gap)));
    assert!(!h.message(s2, 3501, "bob", "").contains(&Action::Emit(Event::Gap)));
    // The next welcome starts afresh.
    h.end(s2, Code::Unavailable);
    h.advance(Duration::from_secs(1));
    let (s3, _) = h.opened();
    h.welcome(s3, 5000, 7, false);
    assert!(h.message(s3, 4600, "bob", "").contains(&Action::Emit(Event::Gap)));
}

#[test]
fn a_post_over_the_servers_receive_limit_is_rejected_not_resent_forever() {
    let (mut h, s) = Harness::live(0);
    h.s.post(h.now, "p1".into(), "small".into()).unwrap();
    h.s.post(h.now, "p2".into(), "z".repeat(6000)).unwrap();
    h.s.post(h.now, "p3".into(), "after".into()).unwrap();
    assert_eq!(sent_ids(&h.actions()), vec!["p1", "p2", "p3"]);
    // gRPC refuses the frame and ends the stream (the status a C-core server sends).
    let refusal = "Received message larger than max (6010 vs. 5120)";
    h.s.handle_stream_end(h.now, s, Status::new(Code::ResourceExhausted, refusal));
    let a = h.actions();
    let rejected: Vec<_> = a
        .iter()
        .filter_map(|a| match a {
            Action::Emit(Event::PostRejected { client_msg_id, code, reason }) => {
                Some((client_msg_id.as_str(), *code, reason.as_str()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        rejected,
        vec![(
            "p2",
            Code::ResourceExhausted,
            "the message is 6010 bytes with its framing; the server takes at most 5120"
        )]
    );
    assert!(retry_in(&a).is_some(), "the stream is reopened as after any drop");
    assert_eq!(h.s.pending_posts(), 2);
    h.advance(Duration::from_secs(1));
    let (s2, _) = h.opened();
    let a = h.welcome(s2, 0, 7, false);
    assert_eq!(sent_ids(&a), vec!["p1", "p3"], "the others are re-sent, the big one is not");
    // From now on a post over the limit is refused without being sent.
    h.s.post(h.now, "p4".into(), "y".repeat(5200)).unwrap();
    let a = h.actions();
    assert!(sent_ids(&a).is_empty());
    assert!(
        matches!(&a[..], [Action::Emit(Event::PostRejected { client_msg_id, .. })] if client_msg_id == "p4")
    );
    assert_eq!(h.s.pending_posts(), 2);
}

#[test]
fn other_resource_exhausted_ends_reject_no_post() {
    let (mut h, mut stream) = Harness::live(0);
    h.s.post(h.now, "p1".into(), "z".repeat(6000)).unwrap();
    h.actions();
    for why in ["stream is too slow: its queue of 1024 events is full", "larger than max (but no numbers)"] {
        h.s.handle_stream_end(h.now, stream, Status::new(Code::ResourceExhausted, why));
        let a = h.actions();
        assert!(retry_in(&a).is_some(), "{why}: reconnects");
        assert!(!a.iter().any(|a| matches!(a, Action::Emit(Event::PostRejected { .. }))), "{why}");
        assert_eq!(h.s.pending_posts(), 1, "{why}");
        h.advance(Duration::from_secs(10));
        stream = h.opened().0;
        assert_eq!(sent_ids(&h.welcome(stream, 0, 7, false)), vec!["p1"], "{why}: re-sent");
    }
}
