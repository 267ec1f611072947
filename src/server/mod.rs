//! The thread-per-stream grpcio server: a thin pump between gRPC calls and the core.
//!
//! - [`hub`]: the broker behind one lock; outputs routed into per-stream queues in the
//!   order the core emitted them; the timer thread.
//! - [`stream`]: one thread per `Chat`/`Subscribe` stream, reading frames and writing
//!   everything queued as one batch per write.
//! - [`service`]: method descriptors and handlers (never blocking a completion queue).
//! - [`encode`]: the only file naming both core and protobuf types; each event is
//!   encoded once and the same bytes go to every recipient.
//! - [`pacer`]: the thread(s) that write for busy streams, about once an interval each,
//!   batching what queued meanwhile; [`budget`]: how many writes per second that may be,
//!   moving with the machine's load.

pub mod budget;
pub mod calls;
pub mod encode;
pub mod health;
pub mod hub;
pub mod pacer;
pub mod service;
pub mod stream;

use std::ffi::CString;
use std::sync::Arc;
use std::time::{Duration, Instant};

use grpcio::{ChannelBuilder, EnvBuilder, Environment, Server, ServerBuilder, ServerCredentials};
use grpcio_health::proto::ServingStatus;
use log::{info, warn};

use crate::core::{Broker, BrokerConfig, Input};
pub use budget::WriteBudget;
use calls::CallGate;
use health::Health;
use hub::Hub;
use service::{ChatService, ReplyBudget, StreamLimit};

/// How long shutdown waits, after the grace period, for C-core to close the connections.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Everything the server can be configured with. `Default` gives the documented
/// defaults (DESIGN.md section 5).
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Address to listen on, `host:port` (port 0 picks a free one).
    pub listen: String,
    /// The core's policies: limits, history, grace periods, rate limit.
    pub broker: BrokerConfig,
    /// Most concurrent `Chat` + `Subscribe` streams; past it, `RESOURCE_EXHAUSTED` at once.
    pub max_streams: usize,
    /// Events queued per stream before it counts as too slow.
    pub queue_capacity: usize,
    /// Stack size of each stream thread, in bytes.
    pub stream_stack_size: usize,
    /// gRPC receive limit in bytes; `None` = the text limit plus 1 KiB for framing.
    pub max_receive_bytes: Option<usize>,
    /// Interval of HTTP/2 keepalive pings, which find dead peers of idle streams.
    pub keepalive_time: Duration,
    /// How long a keepalive ping may go unanswered before the connection is dropped.
    pub keepalive_timeout: Duration,
    /// How long a new connection may take to open HTTP/2 (send its preface and first
    /// SETTINGS frame) before the server closes it. C-core's own default is 120 s, during
    /// which a connection that says nothing holds a file descriptor.
    pub handshake_timeout: Duration,
    /// The shortest interval at which a client may ping while the server sends it nothing
    /// (a quiet room). A client that pings more often is cut off with `too_many_pings`.
    pub min_client_ping_interval: Duration,
    /// Most bytes of `ListRooms` and `ListMembers` replies held while their clients have
    /// not taken them (flow control); past it such calls get `RESOURCE_EXHAUSTED`.
    /// `usize::MAX` for no limit.
    pub directory_reply_bytes: usize,
    /// How long shutdown waits for streams to take their notice and status.
    pub shutdown_grace: Duration,
    /// Most calls one connection may have open at once (HTTP/2 `MAX_CONCURRENT_STREAMS`);
    /// `None` for `max_streams` + 1024, so that one connection can still reach the stream
    /// limit and be refused past it. A call whose reply waits for the client's flow-control
    /// window keeps about 16 KB of C-core's state until it ends; this bounds how many one
    /// connection can hold. A client opening more is closed by C-core (a grpcio client waits
    /// for a call to end instead). C-core holds a client to it only once the client has
    /// acknowledged the SETTINGS that announce it; the server's call gate
    /// ([`calls::CallGate`]) holds the others to a quarter more.
    pub max_calls_per_connection: Option<usize>,
    /// Number of grpcio completion-queue threads.
    pub cq_count: usize,
    /// Writes per second over all streams (0 = unpaced), fixed or moving in a range with
    /// the machine's load (see [`budget`]). A busy stream writes about once per `open
    /// streams / writes per second`, on shared ticks, batching what queued meanwhile; an
    /// idle stream writes at once. See `pacer::Pacing`.
    pub writes_per_second: WriteBudget,
    /// Most threads that make the paced writes (the pacer and its helpers); each tick's
    /// streams are shared among one per [`budget::WRITES_PER_THREAD`] of the budget.
    pub pacer_threads: usize,
    /// Longest pacing interval, whatever the number of streams.
    pub max_write_interval: Duration,
    /// Called first on each completion-queue thread and each stream thread, with what the
    /// thread is for: where an embedding program sets their scheduling (a stream thread is
    /// started by a completion-queue thread and inherits its policy). `chat-server` runs
    /// the completion-queue threads as `SCHED_BATCH` (README, "Server flags").
    pub on_thread_start: Option<fn(ThreadRole)>,
}

/// What a thread that [`ServerConfig::on_thread_start`] is called on is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadRole {
    /// One of grpcio's completion-queue threads: they run the gRPC handlers (which start
    /// the stream threads) and take the completion of every read and write.
    CompletionQueue,
    /// A stream's thread: it reads the client's frames and routes what they say.
    Stream,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:50051".into(),
            broker: BrokerConfig::default(),
            max_streams: 10_000,
            queue_capacity: 1024,
            stream_stack_size: 128 * 1024,
            max_receive_bytes: None,
            keepalive_time: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            min_client_ping_interval: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            directory_reply_bytes: 64 << 20,
            shutdown_grace: Duration::from_secs(5),
            max_calls_per_connection: None,
            cq_count: 1,
            writes_per_second: WriteBudget::default(),
            pacer_threads: 3,
            max_write_interval: Duration::from_millis(50),
            on_thread_start: None,
        }
    }
}

/// Counters of a running server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerStats {
    /// Streams open now (threads running).
    pub streams: usize,
    /// Sessions held by the core.
    pub sessions: usize,
    /// Bytes of `ListRooms` and `ListMembers` replies waiting for their clients to take
    /// them (see [`ServerConfig::directory_reply_bytes`]).
    pub directory_reply_bytes: usize,
}

/// A running chat server. Dropping it shuts it down like [`ChatServer::shutdown`].
pub struct ChatServer {
    server: Option<Server>,
    hub: Arc<Hub>,
    limit: Arc<StreamLimit>,
    replies: Arc<ReplyBudget>,
    health: Arc<Health>,
    addr: String,
    grace: Duration,
    env: Arc<Environment>,
}

impl ChatServer {
    /// Binds `config.listen` and starts serving `chat.v1.Chat` and `grpc.health.v1.Health`.
    pub fn start(config: ServerConfig) -> std::io::Result<ChatServer> {
        let io_err = |e: grpcio::Error| std::io::Error::other(e.to_string());
        let mut env = EnvBuilder::new().cq_count(config.cq_count.max(1)).name_prefix("grpc-cq");
        if let Some(on_start) = config.on_thread_start {
            env = env.after_start(move || on_start(ThreadRole::CompletionQueue));
        }
        let env = Arc::new(env.build());
        let mut seed = [0u8; 8];
        getrandom::getrandom(&mut seed).map_err(|e| std::io::Error::other(e.to_string()))?;
        let broker = Broker::new(config.broker.clone(), u64::from_le_bytes(seed));
        let hub = Hub::start(broker, config.queue_capacity)?;
        let limit = StreamLimit::new(config.max_streams);
        let replies = ReplyBudget::new(config.directory_reply_bytes);
        let pacing = pacer::Pacing::start(
            Arc::clone(&limit),
            config.writes_per_second,
            config.max_write_interval,
            config.pacer_threads,
        )?;
        let receive = config.max_receive_bytes.unwrap_or(config.broker.limits.max_text_bytes + 1024);
        let calls_per_connection =
            config.max_calls_per_connection.unwrap_or(config.max_streams.saturating_add(1024)).max(1);
        // The gate counts calls a little after C-core does (when their end reaches a
        // completion queue), so it allows a quarter more than C-core: a client that keeps
        // to the announced limit never meets it.
        let gate = CallGate::new(calls_per_connection.saturating_add(calls_per_connection / 4 + 1));
        let service = ChatService::new(
            Arc::clone(&hub),
            Arc::clone(&limit),
            Arc::clone(&replies),
            Arc::clone(&gate),
            pacing,
            config.stream_stack_size,
            config.on_thread_start,
        )
        .build();
        let health = Arc::new(Health::default());
        health.set("", ServingStatus::Serving);
        health.set("chat.v1.Chat", ServingStatus::Serving);

        let args = ChannelBuilder::new(Arc::clone(&env))
            .max_receive_message_len(i32::try_from(receive).unwrap_or(i32::MAX))
            .keepalive_time(config.keepalive_time)
            .keepalive_timeout(config.keepalive_timeout)
            .http2_min_recv_ping_interval_without_data(config.min_client_ping_interval)
            .max_concurrent_stream(i32::try_from(calls_per_connection).unwrap_or(i32::MAX))
            .raw_cfg_int(
                CString::new("grpc.server_handshake_timeout_ms").expect("no NUL"),
                i32::try_from(config.handshake_timeout.as_millis()).unwrap_or(i32::MAX).max(1),
            )
            .build_args();
        let mut server = ServerBuilder::new(Arc::clone(&env))
            .channel_args(args)
            .register_service(service)
            .register_service(health.service(&gate))
            .build()
            .map_err(io_err)?;
        let port = server.add_listening_port(config.listen.as_str(), ServerCredentials::insecure()).map_err(
            |e| {
                std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("cannot listen on {}: {e}", config.listen),
                )
            },
        )?;
        server.start();
        let addr = if config.listen.starts_with("unix:") || config.listen.starts_with("unix-abstract:") {
            // A Unix socket has no port (grpcio reports 1).
            config.listen.clone()
        } else {
            let host = config.listen.rsplit_once(':').map_or(config.listen.as_str(), |(h, _)| h);
            format!("{host}:{port}")
        };
        info!("chat server listening on {addr}");
        Ok(ChatServer {
            server: Some(server),
            hub,
            limit,
            replies,
            health,
            addr,
            grace: config.shutdown_grace,
            env,
        })
    }

    /// The address clients connect to, with the bound port (`127.0.0.1:PORT`), or the
    /// Unix socket as given (`unix:/run/chat.sock`).
    pub fn addr(&self) -> String {
        self.addr.clone()
    }

    /// The bound port (0 for a Unix socket).
    pub fn port(&self) -> u16 {
        self.addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or(0)
    }

    /// Open streams and live sessions.
    pub fn stats(&self) -> ServerStats {
        ServerStats {
            streams: self.limit.open(),
            sessions: self.hub.read(|b| b.session_count()),
            directory_reply_bytes: self.replies.held(),
        }
    }

    /// Closes every open stream as if it were too slow (`RESOURCE_EXHAUSTED`), keeping
    /// the sessions for a resume: what a client sees when its connection is cut. Meant
    /// for tests and operators.
    pub fn drop_all_streams(&self) {
        let conns = self.hub.open_conns();
        for conn in conns {
            let _ = self.hub.input(Input::Lagging { conn });
        }
    }

    /// Graceful shutdown: health turns NOT_SERVING, new calls are refused with
    /// `UNAVAILABLE`, every stream receives a notice and ends with `UNAVAILABLE`, and
    /// the call returns once all streams ended or the grace period passed, plus at most
    /// a second for C-core to close the connections (one still writing to a client that
    /// stopped reading is left to a background thread).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(mut server) = self.server.take() else { return };
        info!("shutting down: notifying {} streams", self.limit.open());
        self.health.set("", ServingStatus::NotServing);
        self.health.set("chat.v1.Chat", ServingStatus::NotServing);
        let deadline = Instant::now() + self.grace;
        self.hub.begin_shutdown(Instant::now() + (self.grace / 2).min(Duration::from_secs(1)));
        let _ = self.hub.input(Input::Shutdown { notice: "server shutting down".into() });
        while self.limit.open() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut done = server.shutdown();
        server.cancel_all_calls();
        if stream::poll_until(&mut done, Instant::now() + CLOSE_WAIT).is_none() {
            // C-core shuts a connection's socket down only once its write in progress
            // ends, and the write to a client that stopped reading ends when the kernel
            // gives up on it (the keepalive timeout). Until then the server must not be
            // destroyed, so a thread of its own waits for that; the process need not.
            warn!(
                "a connection is still writing to a client that stopped reading; \
                 it is dropped when the server exits"
            );
            let env = Arc::clone(&self.env);
            let reaper = std::thread::Builder::new().name("grpc-shutdown".into()).spawn(move || {
                let _ = futures::executor::block_on(done);
                drop(server);
                drop(env);
            });
            if let Err(e) = reaper {
                warn!("cannot start a thread to finish the shutdown: {e}");
            }
        }
        self.health.shut_down();
        info!("server stopped");
    }
}

impl Drop for ChatServer {
    fn drop(&mut self) {
        self.stop();
    }
}
