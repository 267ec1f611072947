//! Generated protobuf messages and grpcio stubs for `chat.v1` (see `build.rs`).
//!
//! This is the one module that includes generated code. Everything else names these
//! types through `crate::pb`.
#![allow(missing_docs, clippy::all, clippy::pedantic, unreachable_pub)]

include!(concat!(env!("OUT_DIR"), "/chat.v1.rs"));
