//! grpc-chat: a real-time chat system over gRPC without an async runtime.
//!
//! - [`core`]: the sans-IO broker (rooms, sessions, history, sequencing, broadcast).
//! - [`pb`]: the generated `chat.v1` messages and stubs.
//! - [`server`]: the thread-per-stream grpcio server.
//! - [`client`]: the client library used by the console client, the benchmark and tests.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod core;
pub mod pb;
pub mod server;
