//! Core tests of presence, anonymous and session subscriptions, shutdown, and the cost
//! of a mass join.

mod core_harness;

use std::time::Duration;

use core_harness::{code, config, Harness};
use grpc_chat::core::{Accepted, BrokerConfig, Code, Epoch, Event, Hello, Input, Output, Seq};

fn limited(presence_limit: usize) -> Harness {
    Harness::new(BrokerConfig { presence_limit, ..config() })
}

fn joined(user: &str) -> (String, bool) {
    (user.to_string(), true)
}

fn left(user: &str) -> (String, bool) {
    (user.to_string(), false)
}

// ---- presence --------------------------------------------------------------------

#[test]
fn join_and_leave_presence_goes_to_the_other_members() {
    let mut h = Harness::new(config());
    let (a, _) = h.connect("ann", "r");
    let (b, tb) = h.connect("bob", "r");
    let (other, _) = h.connect("oz", "elsewhere");
    let info = h.join("cid", "r"); // joins by RPC: announced at once
    assert_eq!(info.members.iter().map(|m| m.to_string()).collect::<Vec<_>>(), vec!["ann", "bob", "cid"]);
    assert_eq!(info.member_count, 3);
    h.leave(tb.as_str()).unwrap();
    assert_eq!(h.presence(a), vec![joined("bob"), joined("cid"), left("bob")]);
    assert_eq!(h.presence(b), vec![joined("cid")], "nobody is told of its own join or leave");
    assert!(h.presence(other).is_empty(), "presence stays in its room");
    // The welcome lists the members, sorted, the new one included.
    let (d, _) = h.connect("dee", "r");
    let w = h.welcome(d);
    assert_eq!(w.members.iter().map(|m| m.to_string()).collect::<Vec<_>>(), vec!["ann", "cid", "dee"]);
    assert_eq!(w.member_count, 3);
    assert_eq!(&*w.user, "dee");
    assert!(!w.resumed);
}

#[test]
fn presence_is_not_history() {
    let mut h = Harness::new(config());
    let (a, _) = h.connect("ann", "r");
    h.connect("bob", "r");
    assert_eq!(h.last_seq("r"), 0);
    assert!(h.broker.history("r", Seq(0), 0).unwrap().is_empty());
    h.post(a, "x").unwrap();
    assert_eq!(h.last_seq("r"), 1);
}

#[test]
fn above_the_presence_limit_no_presence_and_no_member_list() {
    let mut h = limited(3);
    let (a, _) = h.connect("u1", "r");
    h.connect("u2", "r");
    let (c3, _) = h.connect("u3", "r"); // 3 members: still announced
    assert_eq!(h.presence(a), vec![joined("u2"), joined("u3")]);
    assert_eq!(h.welcome(c3).members.len(), 3);
    let (c4, t4) = h.connect("u4", "r"); // 4 > 3: silent
    assert_eq!(h.presence(a).len(), 2);
    let w = h.welcome(c4);
    assert!(w.members.is_empty());
    assert_eq!(w.member_count, 4);
    let info = h.join("u5", "r");
    assert!(info.members.is_empty());
    assert_eq!(info.member_count, 5);
    assert_eq!(h.presence(a).len(), 2);
    // ListMembers still tells.
    assert_eq!(h.members("r"), vec!["u1", "u2", "u3", "u4", "u5"]);
    // Leaving from 5 members is silent; from 4 it is silent too (the room had 4).
    h.leave(info.token.as_str()).unwrap();
    h.leave(t4.as_str()).unwrap();
    assert_eq!(h.presence(a).len(), 2);
    // From 3 members, a leave is announced again.
    h.input(Input::LeaveStream { conn: c3 }).unwrap();
    assert_eq!(h.presence(a), vec![joined("u2"), joined("u3"), left("u3")]);
    assert_eq!(h.broker.rooms()[0].members, 2);
}

#[test]
fn detach_and_resume_are_not_presence() {
    let mut h = Harness::new(config());
    let (a, _) = h.connect("ann", "r");
    let (b, tb) = h.connect("bob", "r");
    h.end_stream(b);
    h.attach(&tb, 0);
    let b2 = h.attach(&tb, 0); // supersede
    h.input(Input::Lagging { conn: b2 }).unwrap();
    h.attach(&tb, 0);
    assert_eq!(h.presence(a), vec![joined("bob")]);
}

// ---- subscribe -------------------------------------------------------------------

#[test]
fn an_anonymous_listener_receives_but_cannot_post() {
    let mut h = Harness::new(config());
    let (a, _) = h.connect("ann", "r");
    h.post(a, "before").unwrap();
    let (l, r) = h.subscribe("", "r", 0);
    match r {
        Ok(Accepted::Attached { session: None, user, resumed: false, replayed: 1, .. }) => {
            assert_eq!(&*user, "")
        }
        other => panic!("{other:?}"),
    }
    let w = h.welcome(l);
    assert_eq!(w.session, None);
    assert_eq!(
        w.members.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
        vec!["ann"],
        "a listener is no member"
    );
    assert_eq!(h.backlog_seqs(l), vec![1]);
    h.post(a, "after").unwrap();
    assert_eq!(h.live_seqs(l), vec![2]);
    assert_eq!(h.broker.session_count(), 1);
    // A listener sees presence too.
    h.connect("bob", "r");
    assert_eq!(h.presence(l), vec![joined("bob")]);
    // It cannot post: the stream is closed and nothing is posted.
    assert_eq!(code(h.post(l, "may I?")), Code::FailedPrecondition);
    assert_eq!(h.close_code(l), Some(Code::FailedPrecondition));
    assert_eq!(h.last_seq("r"), 2);
    h.post(a, "later").unwrap();
    assert_eq!(h.live_seqs(l), vec![2], "nothing after the close");
}

#[test]
fn an_anonymous_listener_of_a_new_room_and_its_end() {
    let mut h = Harness::new(config());
    let (l, r) = h.subscribe("", "quiet", 5);
    assert!(matches!(r, Ok(Accepted::Attached { gap: true, replayed: 0, .. })), "{r:?}");
    assert_eq!(h.broker.rooms().len(), 1);
    let (a, _) = h.connect("ann", "quiet");
    h.post(a, "hi").unwrap();
    assert_eq!(h.live_seqs(l), vec![1]);
    // A leave frame from a listener just closes it; the lagging policy applies too.
    assert_eq!(h.input(Input::LeaveStream { conn: l }), Ok(Accepted::Detached));
    assert_eq!(h.close_code(l), None);
    let (l2, _) = h.subscribe("", "quiet", 0);
    assert_eq!(h.input(Input::Lagging { conn: l2 }), Ok(Accepted::Detached));
    assert_eq!(h.close_code(l2), Some(Code::ResourceExhausted));
    assert_eq!(h.members("quiet"), vec!["ann"]);
    assert_eq!(h.broker.stream_count(), 1);
}

#[test]
fn subscribe_with_a_session_attaches_like_hello() {
    let mut h = Harness::new(config());
    let (a, _) = h.connect("ann", "r");
    let info = h.join("bob", "r");
    h.post(a, "1").unwrap();
    h.post(a, "2").unwrap();
    let (s, r) = h.subscribe(info.token.as_str(), "", 1);
    assert!(
        matches!(&r, Ok(Accepted::Attached { session: Some(t), resumed: false, replayed: 1, .. }) if *t == info.token),
        "{r:?}"
    );
    assert_eq!(&*h.welcome(s).user, "bob");
    assert_eq!(h.backlog_seqs(s), vec![2]);
    assert_eq!(h.broker.poll_timeout(), None, "attached: the attach timeout is cancelled");
    h.post(a, "3").unwrap();
    assert_eq!(h.live_seqs(s), vec![3]);
    // With the room named, it must match; a second attach supersedes the first.
    let (s2, r) = h.subscribe(info.token.as_str(), "r", 3);
    assert!(matches!(r, Ok(Accepted::Attached { resumed: true, replayed: 0, .. })));
    assert_eq!(h.close_code(s), Some(Code::Aborted));
    // Its stream ending starts the grace, like a chat stream.
    h.end_stream(s2);
    h.advance(h.broker.config().resume_grace);
    assert_eq!(h.members("r"), vec!["ann"]);
}

// ---- shutdown --------------------------------------------------------------------

#[test]
fn shutdown_notifies_then_closes_every_stream_and_refuses_new_work() {
    let mut h = Harness::new(config());
    let (a, ta) = h.connect("ann", "r");
    let (b, _) = h.connect("bob", "s");
    let (l, _) = h.subscribe("", "r", 0);
    let waiting = h.open(); // no hello yet
    let info = h.join("cid", "r");
    let all = [a, b, l, waiting];
    assert_eq!(
        h.input(Input::Shutdown { notice: "server shutting down".into() }),
        Ok(Accepted::ShuttingDown)
    );
    for &c in &all {
        let notices: Vec<_> = h
            .events(c)
            .iter()
            .filter_map(|e| match e {
                Event::Notice(n) => Some(n.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(notices.len(), 1, "{c}");
        assert_eq!(notices[0].text, "server shutting down");
        assert_eq!(notices[0].code, None);
        assert!(matches!(h.events(c).last(), Some(Event::Notice(_))), "{c}: the notice is the last event");
        let close = h.close_of(c);
        assert_eq!(close.error.as_ref().map(|r| r.code), Some(Code::Unavailable));
        assert!(close.flush, "the notice must get out");
    }
    // The notice precedes every close in the output order.
    let first_close = h.last.iter().position(|o| matches!(o, Output::Close(_))).unwrap();
    assert!(h.last[..first_close]
        .iter()
        .any(|o| matches!(o, Output::Deliver { event: Event::Notice(_), .. })));
    assert_eq!(h.broker.stream_count(), 0);
    // New work is refused.
    assert_eq!(code(h.try_join("zed", "r")), Code::Unavailable);
    assert_eq!(code(h.input(Input::Open)), Code::Unavailable);
    assert_eq!(code(h.send(info.token.as_str(), "too late")), Code::Unavailable);
    // Late inputs about the closed streams are harmless and close nothing twice.
    assert_eq!(code(h.post(a, "late")), Code::FailedPrecondition);
    assert_eq!(h.input(Input::StreamEnded { conn: b }), Ok(Accepted::Ignored));
    h.leave(ta.as_str()).unwrap();
    h.leave(info.token.as_str()).unwrap();
    assert_eq!(h.closes.len(), all.len(), "every stream closed exactly once");
    // A second shutdown has nobody left to tell.
    h.input(Input::Shutdown { notice: "again".into() }).unwrap();
    assert!(h.last.is_empty());
}

#[test]
fn sessions_left_over_at_shutdown_still_expire() {
    let mut h = Harness::new(config());
    h.connect("ann", "r");
    h.input(Input::Shutdown { notice: "bye".into() }).unwrap();
    h.advance(h.broker.config().resume_grace.max(h.broker.config().attach_timeout));
    assert_eq!(h.broker.session_count(), 0, "no session is stranded on a closed stream");
}

// ---- cost of a mass join ---------------------------------------------------------

#[test]
fn ten_thousand_members_join_one_room_in_linear_output() {
    let members = 10_000;
    let mut h = Harness::new(config()); // presence_limit: the default 256
    let limit = h.broker.config().presence_limit;
    assert_eq!(limit, 256);
    let mut conns = Vec::with_capacity(members);
    for i in 0..members {
        let conn = h.open();
        let hello = Hello { user: format!("user{i:05}"), room: "big".into(), ..Hello::default() };
        h.hello(conn, hello).unwrap();
        conns.push(conn);
    }
    assert_eq!(h.broker.rooms()[0].members, members);
    // Per join: one welcome; presence only while the room is small.
    let presence: usize = conns.iter().map(|&c| h.presence(c).len()).sum();
    assert_eq!(presence, limit * (limit - 1) / 2, "presence stops at the limit");
    assert!(h.delivered < 10 * members, "{} deliveries for {members} joins", h.delivered);
    assert!(h.outputs < 2 * members, "{} outputs for {members} joins", h.outputs);
    // The last welcome carries no member list but the right count.
    let w = h.welcome(*conns.last().unwrap());
    assert!(w.members.is_empty());
    assert_eq!(w.member_count, members);
    // One post is one output that reaches everyone.
    let before = h.outputs;
    let p = h.post(conns[0], "hello, everyone").unwrap();
    assert_eq!(p.recipients, members);
    assert_eq!(h.outputs - before, 1);
    assert!(conns.iter().all(|&c| h.live_seqs(c) == vec![1]));
    // Everyone leaving is silent, too.
    let before = h.delivered;
    for &c in &conns[..members - limit] {
        h.input(Input::LeaveStream { conn: c }).unwrap();
    }
    assert_eq!(h.delivered, before, "no presence fan-out from a big room");
}

#[test]
fn mass_join_by_rpc_then_attach_is_linear_too() {
    let members = 3_000;
    let mut h = limited(64);
    let tokens: Vec<_> = (0..members).map(|i| h.join(&format!("u{i}"), "big").token).collect();
    h.advance(Duration::from_secs(1));
    for t in &tokens {
        h.attach(t, 0);
    }
    assert!(h.delivered < 3 * members, "{} deliveries", h.delivered);
    let (_, r) = h.try_attach(&tokens[0], 0, Epoch(0));
    assert!(matches!(r, Ok(Accepted::Attached { resumed: true, .. })));
}
