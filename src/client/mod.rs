//! The client library: connect, join, chat with automatic resume, and the typed calls.
//!
//! Used by the console client (`examples/client.rs`), the benchmark and the tests.
//!
//! ```no_run
//! use std::time::Duration;
//! use grpc_chat::client::{Client, Event};
//!
//! let client = Client::connect("127.0.0.1:50051", Duration::from_secs(5))?;
//! let chat = client.enter("alice", "general")?;
//! chat.post("hello")?;
//! while let Some(event) = chat.next_event(Duration::from_secs(1)) {
//!     if let Event::Message(m) = event {
//!         println!("[{}] {}", m.user, m.text);
//!     }
//! }
//! chat.wait_acked(Duration::from_secs(10))?;
//! chat.leave()?;
//! # Ok::<(), grpc_chat::client::Error>(())
//! ```
//!
//! # Layers
//!
//! - [`Session`] (in [`session`]) is the sans-IO state machine that decides when to
//!   reconnect, rejoin, resume, re-send posts and which messages to show; it is tested
//!   with virtual time.
//! - [`ChatSession`] drives a `Session` with threads: a driver thread, and per stream a
//!   sender thread (owning the request sink) and a receiver thread (owning the response
//!   stream), so sending never waits for receiving.
//! - [`Client`] holds the connection and makes the unary calls.
//!
//! Every error is an [`Error`] whose `Display` is one sentence for a person.

mod chat;
mod connection;
mod convert;
mod error;
mod outbox;
pub mod session;
mod stream;
mod types;

pub use chat::{ChatConfig, ChatSession, SessionState};
pub use connection::{Client, ClientConfig};
pub use error::{Code, Error, Status};
pub use session::{Action, HelloParams, Session, SessionConfig, StreamId};
pub use types::{Event, Incoming, Joined, Message, RoomInfo, Sent, WelcomeInfo};
