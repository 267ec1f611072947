//! A small harness for testing the sans-IO core without sockets, in virtual time.
//!
//! - The clock starts at a fixed `Instant` captured once; [`Harness::advance`] jumps it
//!   and calls `handle_timeout`. Nothing ever sleeps.
//! - Every input goes through [`Harness::input`], which drains *all* outputs afterwards
//!   (the core's run-loop rule) and files them: deliveries into one inbox per stream
//!   (a `Recipients::Many` becomes one entry per stream), closes into a list.
//! - Tokens are deterministic: `Token::from_entropy` over a counter.
//! - While filing, a checker enforces what every stream must observe (welcome first,
//!   replay contiguous and ending at the welcome's `last_seq`, live messages of the
//!   stream's own room in `seq` order without gap or duplicate, nothing after a close,
//!   recipients in ascending `ConnId` order). A violation panics at the step that
//!   caused it, so every test, and the randomised one above all, checks it throughout.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use grpc_chat::core::{
    Accepted, Broker, BrokerConfig, Close, Code, ConnId, Epoch, Event, Hello, Input, JoinInfo, Message,
    Output, Posted, Recipients, Rejection, Seq, Token, Welcome,
};

/// The fixed start of virtual time, captured once per test process.
pub fn start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// What the checker knows of one stream.
#[derive(Default)]
struct StreamView {
    /// The `since`/`epoch` the stream asked for (recorded when the input was fed).
    asked: Option<(Seq, Epoch)>,
    welcome: Option<Welcome>,
    /// The last event was the welcome (a backlog may only come right after it).
    just_welcomed: bool,
    /// The seq the next live message must carry.
    next_seq: u64,
    closed: bool,
}

/// A broker, a virtual clock, and what every stream received.
pub struct Harness {
    pub broker: Broker,
    pub now: Instant,
    next_entropy: u128,
    /// Events delivered to each stream, in order (one entry per recipient).
    pub inbox: BTreeMap<ConnId, Vec<Event>>,
    /// Every close, in order.
    pub closes: Vec<Close>,
    /// The outputs of the most recent input or timeout, as the core emitted them.
    pub last: Vec<Output>,
    /// Deliveries (one per recipient) since the harness was made.
    pub delivered: usize,
    /// `Output`s since the harness was made.
    pub outputs: usize,
    views: HashMap<ConnId, StreamView>,
}

impl Harness {
    pub fn new(config: BrokerConfig) -> Harness {
        Harness::with_epoch(config, 1000)
    }

    pub fn with_epoch(config: BrokerConfig, epoch: u64) -> Harness {
        Harness {
            broker: Broker::new(config, epoch),
            now: start(),
            next_entropy: 0,
            inbox: BTreeMap::new(),
            closes: Vec::new(),
            last: Vec::new(),
            delivered: 0,
            outputs: 0,
            views: HashMap::new(),
        }
    }

    pub fn default_config() -> Harness {
        Harness::new(BrokerConfig::default())
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - start()
    }

    /// Jumps the clock and fires whatever timers are due.
    pub fn advance(&mut self, d: Duration) {
        self.now += d;
        self.broker.handle_timeout(self.now);
        self.drain();
    }

    /// A fresh, deterministic token.
    pub fn token(&mut self) -> Token {
        self.next_entropy += 1;
        Token::from_entropy(self.next_entropy.to_be_bytes())
    }

    /// Feeds one input and drains every output.
    pub fn input(&mut self, input: Input) -> Result<Accepted, Rejection> {
        assert_eq!(self.broker.pending_outputs(), 0, "the harness drains after every input");
        match &input {
            Input::Hello { conn, hello, .. } => self.ask(*conn, hello.since, hello.epoch),
            Input::Subscribe { conn, since, epoch, .. } => self.ask(*conn, *since, *epoch),
            _ => {}
        }
        let result = self.broker.handle_input(self.now, input);
        self.drain();
        result
    }

    fn ask(&mut self, conn: ConnId, since: Seq, epoch: Epoch) {
        let view = self.views.entry(conn).or_default();
        if view.welcome.is_none() {
            view.asked = Some((since, epoch));
        }
    }

    fn drain(&mut self) {
        self.last.clear();
        while let Some(output) = self.broker.poll_output() {
            self.outputs += 1;
            self.file(&output);
            self.last.push(output);
        }
        assert_eq!(self.broker.pending_outputs(), 0);
    }

    fn file(&mut self, output: &Output) {
        match output {
            Output::Deliver { to, event } => {
                let conns = to.as_slice();
                assert!(!conns.is_empty(), "a delivery to nobody: {event:?}");
                assert!(
                    conns.windows(2).all(|w| w[0] < w[1]),
                    "recipients not strictly ascending: {conns:?}"
                );
                for &conn in conns {
                    self.check(conn, event);
                    self.inbox.entry(conn).or_default().push(event.clone());
                    self.delivered += 1;
                }
            }
            Output::Close(close) => {
                let view = self.views.entry(close.conn).or_default();
                assert!(!view.closed, "{} closed twice: {close:?}", close.conn);
                view.closed = true;
                self.closes.push(close.clone());
            }
        }
    }

    /// The per-stream invariants; panics on the first violation.
    fn check(&mut self, conn: ConnId, event: &Event) {
        let view = self.views.entry(conn).or_default();
        assert!(!view.closed, "{conn} got {event:?} after its close");
        let just_welcomed = std::mem::replace(&mut view.just_welcomed, false);
        match event {
            Event::Notice(_) => {}
            Event::Welcome(w) => {
                assert!(view.welcome.is_none(), "{conn} welcomed twice");
                view.next_seq = w.last_seq.get() + 1;
                view.welcome = Some((**w).clone());
                view.just_welcomed = true;
            }
            Event::Backlog(messages) => {
                assert!(just_welcomed, "{conn}: a backlog not right after the welcome");
                let w = view.welcome.as_ref().expect("just_welcomed implies a welcome");
                assert!(!messages.is_empty(), "{conn}: empty backlog");
                for pair in messages.windows(2) {
                    assert_eq!(pair[1].seq.get(), pair[0].seq.get() + 1, "{conn}: backlog not contiguous");
                }
                assert!(messages.iter().all(|m| m.room == w.room), "{conn}: backlog from another room");
                assert_eq!(messages.last().unwrap().seq, w.last_seq, "{conn}: backlog must end at last_seq");
                if let Some((since, epoch)) = view.asked {
                    let same_log = epoch.get() == 0 || epoch == w.epoch;
                    if same_log && since < w.last_seq {
                        assert!(messages[0].seq > since, "{conn}: replayed a message it had seen");
                        // `since` 0 asks for "all retained": not a gap when history was trimmed.
                        if !w.gap && since.get() > 0 {
                            assert_eq!(messages[0].seq.get(), since.get() + 1, "{conn}: silent loss");
                        }
                    }
                }
            }
            Event::Message(m) => {
                let w = view.welcome.as_ref().unwrap_or_else(|| panic!("{conn}: message before welcome"));
                assert_eq!(m.room, w.room, "{conn}: a message of a room it is not in");
                assert_eq!(m.seq.get(), view.next_seq, "{conn}: gap or duplicate in live messages");
                view.next_seq += 1;
            }
            Event::Presence(p) => {
                let w = view.welcome.as_ref().unwrap_or_else(|| panic!("{conn}: presence before welcome"));
                assert_eq!(p.room, w.room, "{conn}: presence of a room it is not in");
            }
        }
    }

    // ---- inputs, shortcuts --------------------------------------------------------

    pub fn try_join(&mut self, user: &str, room: &str) -> Result<JoinInfo, Rejection> {
        let token = self.token();
        match self.input(Input::Join { user: user.into(), room: room.into(), token })? {
            Accepted::Joined(info) => Ok(info),
            other => panic!("join answered {other:?}"),
        }
    }

    pub fn join(&mut self, user: &str, room: &str) -> JoinInfo {
        self.try_join(user, room).unwrap_or_else(|r| panic!("join {user}@{room}: {r}"))
    }

    pub fn open(&mut self) -> ConnId {
        match self.input(Input::Open) {
            Ok(Accepted::Opened(conn)) => conn,
            other => panic!("open answered {other:?}"),
        }
    }

    pub fn hello(&mut self, conn: ConnId, hello: Hello) -> Result<Accepted, Rejection> {
        let new_token = self.token();
        self.input(Input::Hello { conn, hello, new_token })
    }

    /// Opens a stream and joins implicitly with `user`+`room`; returns the stream and token.
    pub fn connect(&mut self, user: &str, room: &str) -> (ConnId, Token) {
        let conn = self.open();
        let hello = Hello { user: user.into(), room: room.into(), ..Hello::default() };
        match self.hello(conn, hello) {
            Ok(Accepted::Attached { session: Some(token), .. }) => (conn, token),
            other => panic!("connect {user}@{room} answered {other:?}"),
        }
    }

    /// Opens a stream and attaches it to `token`, replaying after `since` of `epoch`.
    pub fn try_attach(
        &mut self,
        token: &Token,
        since: u64,
        epoch: Epoch,
    ) -> (ConnId, Result<Accepted, Rejection>) {
        let conn = self.open();
        let hello = Hello { session: token.as_str().into(), since: Seq(since), epoch, ..Hello::default() };
        let result = self.hello(conn, hello);
        (conn, result)
    }

    pub fn attach(&mut self, token: &Token, since: u64) -> ConnId {
        let (conn, result) = self.try_attach(token, since, Epoch(0));
        result.unwrap_or_else(|r| panic!("attach: {r}"));
        conn
    }

    pub fn subscribe(
        &mut self,
        session: &str,
        room: &str,
        since: u64,
    ) -> (ConnId, Result<Accepted, Rejection>) {
        let conn = self.open();
        let result = self.input(Input::Subscribe {
            conn,
            session: session.into(),
            room: room.into(),
            since: Seq(since),
            epoch: Epoch(0),
        });
        (conn, result)
    }

    pub fn post_id(&mut self, conn: ConnId, text: &str, id: &str) -> Result<Posted, Rejection> {
        let sent_at_ms = self.elapsed().as_millis() as i64;
        let input = Input::Post { conn, text: text.into(), client_msg_id: id.into(), sent_at_ms };
        self.input(input).map(posted)
    }

    pub fn post(&mut self, conn: ConnId, text: &str) -> Result<Posted, Rejection> {
        self.post_id(conn, text, "")
    }

    pub fn send_id(&mut self, token: &str, text: &str, id: &str) -> Result<Posted, Rejection> {
        let sent_at_ms = self.elapsed().as_millis() as i64;
        let input =
            Input::Send { session: token.into(), text: text.into(), client_msg_id: id.into(), sent_at_ms };
        self.input(input).map(posted)
    }

    pub fn send(&mut self, token: &str, text: &str) -> Result<Posted, Rejection> {
        self.send_id(token, text, "")
    }

    pub fn leave(&mut self, token: &str) -> Result<Accepted, Rejection> {
        self.input(Input::Leave { session: token.into() })
    }

    pub fn end_stream(&mut self, conn: ConnId) -> Accepted {
        self.input(Input::StreamEnded { conn }).expect("StreamEnded is never rejected")
    }

    // ---- what streams saw -----------------------------------------------------------

    /// Everything `conn` received so far.
    pub fn events(&self, conn: ConnId) -> &[Event] {
        self.inbox.get(&conn).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Removes and returns everything `conn` received so far.
    pub fn take(&mut self, conn: ConnId) -> Vec<Event> {
        self.inbox.remove(&conn).unwrap_or_default()
    }

    /// The live messages `conn` received, in order.
    pub fn live(&self, conn: ConnId) -> Vec<Arc<Message>> {
        self.events(conn)
            .iter()
            .filter_map(|e| match e {
                Event::Message(m) => Some(Arc::clone(m)),
                _ => None,
            })
            .collect()
    }

    /// The seqs of the live messages `conn` received, in order.
    pub fn live_seqs(&self, conn: ConnId) -> Vec<u64> {
        self.live(conn).iter().map(|m| m.seq.get()).collect()
    }

    /// The welcome `conn` received.
    pub fn welcome(&self, conn: ConnId) -> Welcome {
        self.events(conn)
            .iter()
            .find_map(|e| match e {
                Event::Welcome(w) => Some((**w).clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{conn} has no welcome"))
    }

    /// The seqs of the backlog `conn` received (empty if none).
    pub fn backlog_seqs(&self, conn: ConnId) -> Vec<u64> {
        self.events(conn)
            .iter()
            .filter_map(|e| match e {
                Event::Backlog(ms) => Some(ms.iter().map(|m| m.seq.get()).collect::<Vec<_>>()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// `(user, joined)` of the presence events `conn` received.
    pub fn presence(&self, conn: ConnId) -> Vec<(String, bool)> {
        self.events(conn)
            .iter()
            .filter_map(|e| match e {
                Event::Presence(p) => Some((p.user.to_string(), p.joined)),
                _ => None,
            })
            .collect()
    }

    /// The closes of `conn`.
    pub fn closes_of(&self, conn: ConnId) -> Vec<&Close> {
        self.closes.iter().filter(|c| c.conn == conn).collect()
    }

    /// The single close of `conn`.
    pub fn close_of(&self, conn: ConnId) -> &Close {
        let closes = self.closes_of(conn);
        assert_eq!(closes.len(), 1, "{conn} closes: {closes:?}");
        closes[0]
    }

    /// The highest seq `conn` has seen (welcome, backlog or live), if it was welcomed.
    pub fn seen_up_to(&self, conn: ConnId) -> Option<u64> {
        let view = self.views.get(&conn)?;
        view.welcome.as_ref().map(|_| view.next_seq - 1)
    }

    pub fn is_closed(&self, conn: ConnId) -> bool {
        self.views.get(&conn).is_some_and(|v| v.closed)
    }

    /// The code a stream was closed with (`None` = OK), panicking if it is open.
    pub fn close_code(&self, conn: ConnId) -> Option<Code> {
        self.close_of(conn).error.as_ref().map(|r| r.code)
    }

    /// The last seq of `room` from the directory (0 for an unknown room).
    pub fn last_seq(&self, room: &str) -> u64 {
        self.broker.rooms().iter().find(|r| &*r.name == room).map_or(0, |r| r.last_seq.get())
    }

    pub fn members(&self, room: &str) -> Vec<String> {
        self.broker.members(room).expect("valid room").iter().map(|m| m.to_string()).collect()
    }

    /// Every `Deliver` of the last step, with its recipients.
    pub fn last_deliveries(&self) -> Vec<(Recipients, Event)> {
        self.last
            .iter()
            .filter_map(|o| match o {
                Output::Deliver { to, event } => Some((to.clone(), event.clone())),
                Output::Close(_) => None,
            })
            .collect()
    }
}

/// Unwraps `Accepted::Posted`.
pub fn posted(accepted: Accepted) -> Posted {
    match accepted {
        Accepted::Posted(p) => p,
        other => panic!("expected Posted, got {other:?}"),
    }
}

/// The code of a result's rejection.
pub fn code<T: std::fmt::Debug>(result: Result<T, Rejection>) -> Code {
    match result {
        Ok(v) => panic!("expected a rejection, got {v:?}"),
        Err(r) => r.code,
    }
}

/// A configuration with no rate limit (so tests post freely) and small sizes.
pub fn config() -> BrokerConfig {
    BrokerConfig { rate_limit: None, ..BrokerConfig::default() }
}

/// xorshift64*: a tiny deterministic generator for scenario tests.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        (!items.is_empty()).then(|| &items[self.below(items.len())])
    }
}
