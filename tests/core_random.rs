//! A seeded, deterministic scenario test: thousands of random operations against the
//! core, compared step by step with a small model of sessions and streams.
//!
//! Checked at every step: the harness's per-stream checker (welcome first, replay
//! contiguous, live seqs strictly increasing by one, only the stream's own room, nothing
//! after a close), plus: every connected stream has seen its room's last seq (no gap
//! while connected), member names are unique per room and exactly the model's, session
//! and stream counts and the next deadline match the model, and every answer (accepted
//! or which rejection code) is the one the model predicts.

mod core_harness;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use core_harness::{code, config, Harness, XorShift};
use grpc_chat::core::{
    Accepted, BrokerConfig, Code, ConnId, Epoch, Hello, Input, Message, Seq, Token, MESSAGE_OVERHEAD,
};

const USERS: &[&str] = &["ann", "bob", "cid", "dee", "eve", "fay"];
const ROOMS: &[&str] = &["r1", "r2", "r3"];

struct Session {
    token: Token,
    user: String,
    room: String,
    conn: Option<ConnId>,
    alive: bool,
    /// Ended by an explicit leave (its token answers FailedPrecondition); an expired
    /// session's token is simply unknown (NotFound).
    left: bool,
    ever_attached: bool,
    /// The room's last seq when it joined: a resume from 0 is owed everything after it.
    joined_at: u64,
    deadline: Option<Instant>,
}

#[derive(Clone)]
struct Stream {
    room: String,
    /// Index into `Model::sessions`; `None` for an anonymous listener.
    session: Option<usize>,
}

#[derive(Default)]
struct Model {
    sessions: Vec<Session>,
    streams: BTreeMap<ConnId, Stream>,
    /// Streams the core closed or was told have ended.
    dead_streams: Vec<ConnId>,
}

impl Model {
    fn taken(&self, user: &str, room: &str) -> bool {
        self.sessions.iter().any(|s| s.alive && s.user == user && s.room == room)
    }

    fn end_session(&mut self, i: usize, left: bool) {
        let s = &mut self.sessions[i];
        s.alive = false;
        s.left = left;
        s.deadline = None;
        if let Some(c) = s.conn.take() {
            self.streams.remove(&c);
            self.dead_streams.push(c);
        }
    }

    fn drop_stream(&mut self, conn: ConnId, now: Instant, grace: Duration) {
        let stream = self.streams.remove(&conn).expect("dropping a live stream");
        self.dead_streams.push(conn);
        if let Some(i) = stream.session {
            let s = &mut self.sessions[i];
            s.conn = None;
            s.deadline = Some(now + grace);
        }
    }

    /// What a dead session's token is answered with.
    fn dead_code(&self, i: usize) -> Code {
        if self.sessions[i].left {
            Code::FailedPrecondition
        } else {
            Code::NotFound
        }
    }

    fn members(&self, room: &str) -> Vec<String> {
        let mut m: Vec<String> =
            self.sessions.iter().filter(|s| s.alive && s.room == room).map(|s| s.user.clone()).collect();
        m.sort();
        m
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.sessions.iter().filter_map(|s| s.deadline).min()
    }
}

/// Any stream the test knows of, live or dead.
fn any_stream(rng: &mut XorShift, m: &Model) -> Option<ConnId> {
    let live: Vec<ConnId> = m.streams.keys().copied().collect();
    if !m.dead_streams.is_empty() && rng.chance(15) {
        return rng.pick(&m.dead_streams).copied();
    }
    rng.pick(&live).copied()
}

/// How often the interesting things happened, to prove the scenario exercised them.
#[derive(Default, Debug)]
struct Stats {
    posts: usize,
    duplicates: usize,
    resumes: usize,
    supersedes: usize,
    expiries: usize,
    lags: usize,
}

/// Any session the test knows of, mostly a live one.
fn any_session(rng: &mut XorShift, m: &Model) -> Option<usize> {
    let alive: Vec<usize> = (0..m.sessions.len()).filter(|&i| m.sessions[i].alive).collect();
    if alive.is_empty() || rng.chance(15) {
        return (!m.sessions.is_empty()).then(|| rng.below(m.sessions.len()));
    }
    rng.pick(&alive).copied()
}

fn run(seed: u64, steps: usize) -> Stats {
    let mut stats = Stats::default();
    let cfg = BrokerConfig {
        history_limit: 8,
        history_bytes: HISTORY_BYTES,
        presence_limit: 4,
        dedup_window: 4,
        ..config()
    };
    let (grace, attach_timeout) = (cfg.resume_grace, cfg.attach_timeout);
    let mut h = Harness::new(cfg);
    let mut m = Model::default();
    let mut rng = XorShift::new(seed);
    for step in 0..steps {
        let ctx = format!("seed {seed} step {step}");
        match rng.below(100) {
            // Join by RPC.
            0..=9 => {
                let (user, room) = (*rng.pick(USERS).unwrap(), *rng.pick(ROOMS).unwrap());
                let taken = m.taken(user, room);
                match h.try_join(user, room) {
                    Ok(info) => {
                        assert!(!taken, "{ctx}: {user}@{room} joined twice");
                        m.sessions.push(Session {
                            token: info.token,
                            user: user.into(),
                            room: room.into(),
                            conn: None,
                            alive: true,
                            left: false,
                            ever_attached: false,
                            joined_at: info.last_seq.get(),
                            deadline: Some(h.now + attach_timeout),
                        });
                    }
                    Err(r) => {
                        assert!(taken, "{ctx}: {r}");
                        assert_eq!(r.code, Code::AlreadyExists, "{ctx}");
                    }
                }
            }
            // Implicit join on a stream.
            10..=17 => {
                let (user, room) = (*rng.pick(USERS).unwrap(), *rng.pick(ROOMS).unwrap());
                let taken = m.taken(user, room);
                let conn = h.open();
                let joined_at = h.last_seq(room);
                let since = rng.below(joined_at as usize + 3) as u64;
                let hello =
                    Hello { user: user.into(), room: room.into(), since: Seq(since), ..Hello::default() };
                match h.hello(conn, hello) {
                    Ok(Accepted::Attached { session: Some(token), resumed, .. }) => {
                        assert!(!taken && !resumed, "{ctx}");
                        m.sessions.push(Session {
                            token,
                            user: user.into(),
                            room: room.into(),
                            conn: Some(conn),
                            alive: true,
                            left: false,
                            ever_attached: true,
                            joined_at,
                            deadline: None,
                        });
                        let session = Some(m.sessions.len() - 1);
                        m.streams.insert(conn, Stream { room: room.into(), session });
                    }
                    other => {
                        assert!(taken, "{ctx}: {other:?}");
                        assert_eq!(code(other), Code::AlreadyExists, "{ctx}");
                        assert_eq!(h.close_code(conn), Some(Code::AlreadyExists));
                        m.dead_streams.push(conn);
                    }
                }
            }
            // Attach (resume) a known session, live or not, by Hello or Subscribe.
            18..=29 => {
                let Some(i) = any_session(&mut rng, &m) else { continue };
                let room = m.sessions[i].room.clone();
                let last = h.last_seq(&room);
                let since = if rng.chance(50) { last.saturating_sub(rng.below(12) as u64) } else { 0 };
                let token = m.sessions[i].token.clone();
                let retained_before = retained(h.broker.history(&room, Seq(0), 0).unwrap_or_default());
                let (conn, result) = if rng.chance(70) {
                    h.try_attach(&token, since, Epoch(0))
                } else {
                    h.subscribe(token.as_str(), "", since)
                };
                if m.sessions[i].alive {
                    match result {
                        Ok(Accepted::Attached { resumed, gap, .. }) => {
                            assert_eq!(resumed, m.sessions[i].ever_attached, "{ctx}");
                            stats.resumes += usize::from(resumed);
                            let retained_from = retained_before.first().copied().unwrap_or(last + 1);
                            // A resume from 0 is owed everything since the join.
                            let owed_after =
                                if since > 0 || !resumed { since } else { m.sessions[i].joined_at };
                            let owed = since > 0 || resumed;
                            assert_eq!(gap, owed && owed_after + 1 < retained_from, "{ctx}");
                        }
                        other => panic!("{ctx}: {other:?}"),
                    }
                    if let Some(old) = m.sessions[i].conn.take() {
                        assert_eq!(h.close_code(old), Some(Code::Aborted), "{ctx}");
                        stats.supersedes += 1;
                        m.streams.remove(&old);
                        m.dead_streams.push(old);
                    }
                    let s = &mut m.sessions[i];
                    (s.conn, s.ever_attached, s.deadline) = (Some(conn), true, None);
                    m.streams.insert(conn, Stream { room, session: Some(i) });
                } else {
                    assert_eq!(code(result), m.dead_code(i), "{ctx}");
                    assert_eq!(h.close_code(conn), Some(m.dead_code(i)));
                    m.dead_streams.push(conn);
                }
            }
            // Anonymous listener.
            30..=33 => {
                let room = *rng.pick(ROOMS).unwrap();
                let (conn, result) = h.subscribe("", room, rng.below(5) as u64);
                assert!(matches!(result, Ok(Accepted::Attached { session: None, .. })), "{ctx}");
                m.streams.insert(conn, Stream { room: room.into(), session: None });
            }
            // Post on a stream (sometimes a dead one), sometimes repeating an id.
            34..=59 => {
                let Some(conn) = any_stream(&mut rng, &m) else { continue };
                let id = if rng.chance(30) { format!("k{}", rng.below(6)) } else { String::new() };
                let result = h.post_id(conn, "text", &id);
                match m.streams.get(&conn).cloned() {
                    None => assert_eq!(code(result), Code::FailedPrecondition, "{ctx}"),
                    Some(Stream { session: None, .. }) => {
                        assert_eq!(code(result), Code::FailedPrecondition, "{ctx}");
                        assert_eq!(h.close_code(conn), Some(Code::FailedPrecondition));
                        m.streams.remove(&conn);
                        m.dead_streams.push(conn);
                    }
                    Some(Stream { room, .. }) => {
                        let p = result.unwrap_or_else(|r| panic!("{ctx}: {r}"));
                        stats.posts += 1;
                        if p.duplicate {
                            stats.duplicates += 1;
                            assert!(!id.is_empty() && p.seq.get() <= h.last_seq(&room), "{ctx}");
                            assert!(h.last.is_empty(), "{ctx}: a duplicate is not broadcast");
                        } else {
                            assert_eq!(p.seq.get(), h.last_seq(&room), "{ctx}");
                        }
                    }
                }
            }
            // Send by token.
            60..=64 => {
                let Some(i) = any_session(&mut rng, &m) else { continue };
                let token = m.sessions[i].token.clone();
                let result = h.send(token.as_str(), "sent");
                if m.sessions[i].alive {
                    result.unwrap_or_else(|r| panic!("{ctx}: {r}"));
                    let s = &mut m.sessions[i];
                    if s.deadline.is_some() {
                        s.deadline = Some(h.now + if s.ever_attached { grace } else { attach_timeout });
                    }
                } else {
                    assert_eq!(code(result), m.dead_code(i), "{ctx}");
                }
            }
            // A stream ends, or lags.
            65..=76 => {
                let Some(conn) = any_stream(&mut rng, &m) else { continue };
                let lagging = rng.chance(40);
                let input = if lagging { Input::Lagging { conn } } else { Input::StreamEnded { conn } };
                let result = h.input(input);
                if m.streams.contains_key(&conn) {
                    assert_eq!(result, Ok(Accepted::Detached), "{ctx}");
                    if lagging {
                        stats.lags += 1;
                        let close = h.close_of(conn);
                        assert_eq!(close.error.as_ref().map(|r| r.code), Some(Code::ResourceExhausted));
                        assert!(!close.flush);
                    }
                    m.drop_stream(conn, h.now, grace);
                } else {
                    assert_eq!(result, Ok(Accepted::Ignored), "{ctx}");
                }
            }
            // Leave on a stream.
            77..=80 => {
                let Some(conn) = any_stream(&mut rng, &m) else { continue };
                let result = h.input(Input::LeaveStream { conn });
                match m.streams.get(&conn).cloned() {
                    None => assert_eq!(code(result), Code::FailedPrecondition, "{ctx}"),
                    Some(Stream { session: None, .. }) => {
                        assert_eq!(result, Ok(Accepted::Detached), "{ctx}");
                        m.streams.remove(&conn);
                        m.dead_streams.push(conn);
                    }
                    Some(Stream { session: Some(i), .. }) => {
                        assert!(matches!(result, Ok(Accepted::Left { .. })), "{ctx}");
                        m.end_session(i, true);
                    }
                }
                assert!(!m.streams.contains_key(&conn), "{ctx}");
            }
            // Leave by RPC.
            81..=84 => {
                let Some(i) = any_session(&mut rng, &m) else { continue };
                let result = h.leave(m.sessions[i].token.clone().as_str());
                if m.sessions[i].alive {
                    assert!(matches!(result, Ok(Accepted::Left { .. })), "{ctx}");
                    if let Some(c) = m.sessions[i].conn {
                        assert_eq!(h.close_code(c), None, "{ctx}");
                    }
                    m.end_session(i, true);
                } else {
                    assert_eq!(code(result), m.dead_code(i), "{ctx}");
                }
            }
            // A protocol error on a live stream: a second hello.
            85..=86 => {
                let Some(conn) = any_stream(&mut rng, &m) else { continue };
                let hello = Hello { user: "zed".into(), room: "r1".into(), ..Hello::default() };
                let result = h.hello(conn, hello);
                assert_eq!(code(result), Code::FailedPrecondition, "{ctx}");
                if m.streams.contains_key(&conn) {
                    assert_eq!(h.close_code(conn), Some(Code::FailedPrecondition), "{ctx}");
                    m.drop_stream(conn, h.now, grace);
                }
            }
            // Time passes.
            _ => {
                let d = *rng.pick(&[0u64, 100, 1_000, 5_000, 14_900, 15_000, 16_000, 31_000]).unwrap();
                h.advance(Duration::from_millis(d));
                for i in 0..m.sessions.len() {
                    if m.sessions[i].deadline.is_some_and(|at| at <= h.now) {
                        stats.expiries += 1;
                        m.end_session(i, false);
                    }
                }
            }
        }
        check(&h, &m, &ctx);
    }
    stats
}

/// What all histories may weigh together: fewer messages than the rooms' rings could hold.
const HISTORY_BYTES: usize = 14 * (MESSAGE_OVERHEAD + 8);

fn retained(history: Vec<Arc<Message>>) -> Vec<u64> {
    history.iter().map(|m| m.seq.get()).collect()
}

fn check(h: &Harness, m: &Model, ctx: &str) {
    let mut weight = 0;
    for room in ROOMS {
        let history = h.broker.history(room, Seq(0), 0).unwrap_or_default();
        weight += history.iter().map(|m| m.weight()).sum::<usize>();
        let seqs = retained(history);
        let last = h.last_seq(room);
        let suffix: Vec<u64> = (last + 1 - seqs.len() as u64..=last).collect();
        assert!(seqs.len() <= 8 && seqs == suffix, "{ctx}: {room} retains {seqs:?} of {last}");
    }
    assert_eq!(h.broker.history_bytes(), weight, "{ctx}: history weight");
    assert!(weight <= HISTORY_BYTES, "{ctx}: history over budget");
    for room in ROOMS {
        let members = h.members(room);
        let mut unique = members.clone();
        unique.dedup();
        assert_eq!(members, unique, "{ctx}: duplicate names in {room}");
        assert_eq!(members, m.members(room), "{ctx}: members of {room}");
    }
    assert_eq!(h.broker.session_count(), m.sessions.iter().filter(|s| s.alive).count(), "{ctx}");
    assert_eq!(h.broker.stream_count(), m.streams.len(), "{ctx}: streams");
    assert_eq!(h.broker.poll_timeout(), m.next_deadline(), "{ctx}: next deadline");
    for (&conn, stream) in &m.streams {
        assert!(!h.is_closed(conn), "{ctx}: {conn} is live but was closed");
        assert_eq!(h.seen_up_to(conn), Some(h.last_seq(&stream.room)), "{ctx}: {conn} missed messages");
    }
}

#[test]
fn random_scenarios_keep_every_invariant() {
    for seed in 1..=24u64 {
        let stats = run(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15), 1_500);
        assert!(stats.posts > 100 && stats.resumes > 0 && stats.expiries > 0, "seed {seed}: {stats:?}");
    }
}

#[test]
fn one_long_random_scenario() {
    let stats = run(0xC0FF_EE00_D15E_A5E5, 20_000);
    let Stats { posts, duplicates, resumes, supersedes, expiries, lags } = stats;
    assert!(posts > 2_000 && duplicates > 10 && resumes > 100, "{posts} {duplicates} {resumes}");
    assert!(supersedes > 10 && expiries > 100 && lags > 50, "{supersedes} {expiries} {lags}");
}

#[test]
fn the_generator_is_deterministic() {
    let a: Vec<u64> = {
        let mut r = XorShift::new(7);
        (0..5).map(|_| r.next_u64()).collect()
    };
    let b: Vec<u64> = {
        let mut r = XorShift::new(7);
        (0..5).map(|_| r.next_u64()).collect()
    };
    assert_eq!(a, b);
    assert!(a.windows(2).all(|w| w[0] != w[1]));
}
