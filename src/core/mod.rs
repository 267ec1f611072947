//! The sans-IO chat core: rooms, sessions, sequencing, history replay and broadcast
//! decisions, with no sockets, threads, channels or clocks.
//!
//! # Run loop
//!
//! The driver (the gRPC server, or a test) owns one [`Broker`] and the clock:
//!
//! ```text
//! loop {
//!     let result = broker.handle_input(now, input);   // or broker.handle_timeout(now)
//!     while let Some(output) = broker.poll_output() { route(output) }
//!     next_wakeup = broker.poll_timeout();
//! }
//! ```
//!
//! One rule: **after every input, drain [`Broker::poll_output`] completely before the
//! next input**, and route the outputs in the order they come. That order is the order
//! every member must see; a driver that reorders them breaks the guarantee that each
//! member receives a room's messages in `seq` order without gap or duplicate. (A debug
//! build asserts the queue is empty at each input; [`Broker::pending_outputs`] tells.)
//!
//! The core never reads a clock: every input that depends on time takes `now`, and
//! wall-clock stamps (`sent_at_ms`) arrive as data. It never makes randomness either:
//! session tokens are built from entropy the driver passes in. Given the same inputs
//! it produces the same outputs.
//!
//! # Errors
//!
//! - A client's mistake is a [`Rejection`] (a status [`Code`] and a sentence). It is
//!   returned from `handle_input`; for stream inputs the core has also queued what the
//!   stream must see. A rejected input changes no state.
//! - Inputs naming a stream the core has already closed are answered with
//!   [`Accepted::Ignored`] or a rejection, never a panic: such races are normal.
//! - A broken invariant panics with an `expect` that says why it cannot happen. The
//!   core never panics on client input.

mod broker;
mod config;
mod event;
mod ids;
mod input;
mod room;
mod session;
mod timers;
mod validate;

pub use broker::Broker;
pub use config::{BrokerConfig, Limits, RateLimit};
pub use event::{Close, Event, Message, Notice, Output, Presence, Recipients, Welcome, MESSAGE_OVERHEAD};
pub use ids::{ConnId, Epoch, Seq, Token};
pub use input::{Accepted, Hello, Input, JoinInfo, Posted, RoomInfo};
pub use validate::{Code, Rejection};
