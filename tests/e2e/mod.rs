//! Helpers for end-to-end tests: a server on an ephemeral loopback port and raw
//! `chat.v1` streams read on their own threads, so tests wait on events with generous
//! deadlines instead of sleeping.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use futures::executor::block_on;
use futures::{SinkExt, StreamExt};
use grpc_chat::pb::{self, client_frame::Frame, server_event::Event};
use grpc_chat::server::{ChatServer, ServerConfig};
use grpcio::{ChannelBuilder, ClientDuplexSender, EnvBuilder, Environment, RpcStatusCode, WriteFlags};

/// Deadline for anything that should happen "at once" on loopback.
pub const WAIT: Duration = Duration::from_secs(20);

/// A server for one test, with the rate limit off unless the test sets one.
pub fn server(tune: impl FnOnce(&mut ServerConfig)) -> ChatServer {
    let _ = env_logger::builder().is_test(true).try_init();
    let mut config = ServerConfig { listen: "127.0.0.1:0".into(), ..ServerConfig::default() };
    config.broker.rate_limit = None;
    tune(&mut config);
    ChatServer::start(config).expect("server starts on an ephemeral port")
}

/// A client stub on its own channel.
pub fn client(addr: &str) -> pb::ChatClient {
    client_in(Arc::new(EnvBuilder::new().cq_count(1).build()), addr)
}

/// A client stub on a new channel of `env`.
pub fn client_in(env: Arc<Environment>, addr: &str) -> pb::ChatClient {
    let ch = ChannelBuilder::new(env).use_local_subchannel_pool(true).connect(addr);
    assert!(block_on(ch.wait_for_connected(WAIT)), "connects to {addr}");
    pb::ChatClient::new(ch)
}

/// A TCP relay between clients and the server that can stop passing bytes on, while it
/// keeps the connections open: `freeze` stops the server-to-client direction, so what the
/// server writes piles up in the sockets, as for a client process that stopped (SIGSTOP);
/// `cut` stops both, as a hung host or a dropped route would. Either applies to the
/// connections made so far; later ones pass normally.
pub struct Relay {
    /// Where clients connect.
    pub addr: String,
    /// Each connection's state: [`PASS`], [`FROZEN`] or [`CUT`].
    conns: Arc<parking_lot::Mutex<Vec<Arc<AtomicU8>>>>,
    /// Dropping it lets the relay close its sockets.
    _release: crossbeam_channel::Sender<()>,
}

const PASS: u8 = 0;
const FROZEN: u8 = 1;
const CUT: u8 = 2;

impl Relay {
    /// A relay to the server at `server`.
    pub fn to(server: &str) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("the relay binds");
        let addr = listener.local_addr().expect("bound").to_string();
        let conns = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let (release, held) = crossbeam_channel::bounded::<()>(0);
        let (list, server) = (Arc::clone(&conns), server.to_owned());
        thread::spawn(move || {
            for client_side in listener.incoming() {
                let Ok(client_side) = client_side else { return };
                let Ok(server_side) = TcpStream::connect(&server) else { return };
                let state = Arc::new(AtomicU8::new(PASS));
                list.lock().push(Arc::clone(&state));
                let clone = |s: &TcpStream| s.try_clone().expect("socket clones");
                let up = (clone(&client_side), clone(&server_side), Arc::clone(&state), held.clone());
                thread::spawn(move || pump(up.0, up.1, || up.2.load(Ordering::SeqCst) == CUT, &up.3));
                let down = (server_side, client_side, state, held.clone());
                thread::spawn(move || {
                    pump(down.0, down.1, || down.2.load(Ordering::SeqCst) != PASS, &down.3)
                });
            }
        });
        Relay { addr, conns, _release: release }
    }

    /// Stops passing the server's bytes on over the connections made so far.
    pub fn freeze(&self) {
        self.set(FROZEN);
    }

    /// Stops passing bytes on in either direction over the connections made so far.
    pub fn cut(&self) {
        self.set(CUT);
    }

    fn set(&self, state: u8) {
        for conn in self.conns.lock().iter() {
            conn.store(state, Ordering::SeqCst);
        }
    }
}

/// Copies `from` to `to` until `stopped` (what is read then is dropped) or the connection
/// ends; then holds both sockets, unread, until the relay is dropped.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    stopped: impl Fn() -> bool,
    held: &crossbeam_channel::Receiver<()>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) if stopped() => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = held.recv();
}

/// One event as the tests see it: batches are flattened.
#[derive(Debug, Clone)]
pub enum Seen {
    Event(Event),
    /// The stream ended with this status (OK included).
    End(RpcStatusCode, String),
}

/// Reads a server-event stream on a thread, flattening batches into a channel.
pub struct Events {
    rx: Receiver<Seen>,
    /// Number of gRPC messages received (a batch counts once).
    pub writes: Arc<std::sync::atomic::AtomicUsize>,
}

impl Events {
    pub fn spawn(
        mut stream: impl futures::Stream<Item = grpcio::Result<pb::ServerEvent>> + Unpin + Send + 'static,
    ) -> Events {
        let (tx, rx) = crossbeam_channel::unbounded();
        let writes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let w = Arc::clone(&writes);
        thread::spawn(move || loop {
            match block_on(stream.next()) {
                Some(Ok(ev)) => {
                    w.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    for e in flatten(ev) {
                        if tx.send(Seen::Event(e)).is_err() {
                            return;
                        }
                    }
                }
                Some(Err(grpcio::Error::RpcFailure(s))) => {
                    let _ = tx.send(Seen::End(s.code(), s.message().to_owned()));
                    return;
                }
                Some(Err(e)) => {
                    let _ = tx.send(Seen::End(RpcStatusCode::UNKNOWN, e.to_string()));
                    return;
                }
                None => {
                    let _ = tx.send(Seen::End(RpcStatusCode::OK, String::new()));
                    return;
                }
            }
        });
        Events { rx, writes }
    }

    /// The next event or end, failing the test after the deadline.
    pub fn next(&self) -> Seen {
        match self.rx.recv_timeout(WAIT) {
            Ok(seen) => seen,
            Err(RecvTimeoutError::Timeout) => panic!("no event within {WAIT:?}"),
            Err(RecvTimeoutError::Disconnected) => panic!("event reader ended without a status"),
        }
    }

    /// The next event, which must not be the end of the stream.
    pub fn event(&self) -> Event {
        match self.next() {
            Seen::Event(e) => e,
            Seen::End(code, msg) => panic!("stream ended with {code:?}: {msg}"),
        }
    }

    pub fn welcome(&self) -> pb::Welcome {
        match self.event() {
            Event::Welcome(w) => w,
            other => panic!("expected a welcome, got {other:?}"),
        }
    }

    /// The next chat message, skipping presence events.
    pub fn message(&self) -> pb::ChatMessage {
        loop {
            match self.event() {
                Event::Message(m) => return m,
                Event::Presence(_) => continue,
                other => panic!("expected a message, got {other:?}"),
            }
        }
    }

    /// Skips events until the stream ends; returns its status.
    pub fn end(&self) -> (RpcStatusCode, String) {
        loop {
            if let Seen::End(code, msg) = self.next() {
                return (code, msg);
            }
        }
    }

    /// Nothing more is buffered right now.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }
}

pub fn flatten(ev: pb::ServerEvent) -> Vec<Event> {
    match ev.event {
        Some(Event::Batch(b)) => b
            .events
            .into_iter()
            .map(|e| match e.event {
                Some(Event::Batch(_)) => panic!("batches must never be nested"),
                Some(inner) => inner,
                None => panic!("empty event in a batch"),
            })
            .collect(),
        Some(e) => vec![e],
        None => panic!("empty server event"),
    }
}

/// A chat stream: its sender and its events.
pub struct ChatStream {
    pub tx: ClientDuplexSender<pb::ClientFrame>,
    pub events: Events,
}

impl ChatStream {
    pub fn open(client: &pb::ChatClient) -> ChatStream {
        let (tx, rx) = client.chat().expect("chat call starts");
        ChatStream { tx, events: Events::spawn(rx) }
    }

    /// Sends a frame. If the server already ended the call (the status arrives through
    /// `events`), the send reports that instead of succeeding; that is not a failure.
    pub fn send(&mut self, frame: Frame) {
        let sent = block_on(self.tx.send((pb::ClientFrame { frame: Some(frame) }, WriteFlags::default())));
        match sent {
            Ok(()) | Err(grpcio::Error::RpcFinished(_)) => {}
            Err(e) => panic!("frame not sent: {e}"),
        }
    }

    /// Opens a stream that joins `user` in `room` with an implicit hello.
    pub fn join(client: &pb::ChatClient, user: &str, room: &str) -> (ChatStream, pb::Welcome) {
        let mut s = ChatStream::open(client);
        s.send(hello(user, room));
        let w = s.events.welcome();
        (s, w)
    }

    pub fn post(&mut self, text: &str) {
        self.send(Frame::Post(pb::Post { text: text.into(), client_msg_id: String::new() }));
    }
}

pub fn hello(user: &str, room: &str) -> Frame {
    Frame::Hello(pb::Hello { user: user.into(), room: room.into(), ..Default::default() })
}

pub fn resume(session: &str, since_seq: u64, epoch: u64) -> Frame {
    Frame::Hello(pb::Hello { session: session.into(), since_seq, epoch, ..Default::default() })
}

/// The status code of a failed unary call.
pub fn code_of<T: std::fmt::Debug>(r: grpcio::Result<T>) -> RpcStatusCode {
    match r {
        Err(grpcio::Error::RpcFailure(s)) => s.code(),
        other => panic!("expected an RPC failure, got {other:?}"),
    }
}
