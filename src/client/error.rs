//! Errors of the client library: gRPC status codes and sentences a person can act on.

use std::fmt;

/// A gRPC status code, as the client sees it (the 17 standard codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Code {
    /// 0: success (a stream that ended normally).
    Ok,
    /// 1: the call was cancelled (often: the connection went away).
    Cancelled,
    /// 2: an unknown error.
    Unknown,
    /// 3: the request was malformed (bad name, bad text).
    InvalidArgument,
    /// 4: the deadline passed before the call finished.
    DeadlineExceeded,
    /// 5: unknown or expired session.
    NotFound,
    /// 6: the user name is taken in that room.
    AlreadyExists,
    /// 7: not allowed.
    PermissionDenied,
    /// 8: a limit was hit (rate, size, slow member, too many rooms).
    ResourceExhausted,
    /// 9: the request does not fit the state (e.g. the session has left).
    FailedPrecondition,
    /// 10: the stream was superseded (its session was resumed elsewhere).
    Aborted,
    /// 11: out of range.
    OutOfRange,
    /// 12: the server does not implement the call.
    Unimplemented,
    /// 13: an internal server error.
    Internal,
    /// 14: the server cannot be reached or is shutting down.
    Unavailable,
    /// 15: data loss.
    DataLoss,
    /// 16: not authenticated.
    Unauthenticated,
}

impl Code {
    /// The code for a numeric gRPC status (unknown numbers map to [`Code::Unknown`]).
    pub fn from_i32(code: i32) -> Code {
        match code {
            0 => Code::Ok,
            1 => Code::Cancelled,
            3 => Code::InvalidArgument,
            4 => Code::DeadlineExceeded,
            5 => Code::NotFound,
            6 => Code::AlreadyExists,
            7 => Code::PermissionDenied,
            8 => Code::ResourceExhausted,
            9 => Code::FailedPrecondition,
            10 => Code::Aborted,
            11 => Code::OutOfRange,
            12 => Code::Unimplemented,
            13 => Code::Internal,
            14 => Code::Unavailable,
            15 => Code::DataLoss,
            16 => Code::Unauthenticated,
            _ => Code::Unknown,
        }
    }

    /// The conventional upper-case name, e.g. `UNAVAILABLE`.
    pub fn name(self) -> &'static str {
        match self {
            Code::Ok => "OK",
            Code::Cancelled => "CANCELLED",
            Code::Unknown => "UNKNOWN",
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Code::NotFound => "NOT_FOUND",
            Code::AlreadyExists => "ALREADY_EXISTS",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::FailedPrecondition => "FAILED_PRECONDITION",
            Code::Aborted => "ABORTED",
            Code::OutOfRange => "OUT_OF_RANGE",
            Code::Unimplemented => "UNIMPLEMENTED",
            Code::Internal => "INTERNAL",
            Code::Unavailable => "UNAVAILABLE",
            Code::DataLoss => "DATA_LOSS",
            Code::Unauthenticated => "UNAUTHENTICATED",
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a call or stream ended: a status code and the server's (or gRPC's) message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// The status code.
    pub code: Code,
    /// The message that came with it (may be empty).
    pub message: String,
}

impl Status {
    /// A status with a code and a message.
    pub fn new(code: Code, message: impl Into<String>) -> Status {
        Status { code, message: message.into() }
    }

    /// The status of a grpcio error. Errors that are not an RPC status (a codec error, a
    /// write to a finished call, a stopped remote) count as `UNAVAILABLE`.
    pub fn from_grpc(error: &grpcio::Error) -> Status {
        match error {
            grpcio::Error::RpcFailure(s) => {
                Status::new(Code::from_i32(s.code().into()), s.message().to_string())
            }
            grpcio::Error::RpcFinished(Some(s)) => {
                Status::new(Code::from_i32(s.code().into()), s.message().to_string())
            }
            grpcio::Error::Codec(e) => Status::new(Code::Internal, format!("bad data: {e}")),
            other => Status::new(Code::Unavailable, other.to_string()),
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() {
            write!(f, "{}", self.code)
        } else {
            write!(f, "{} ({})", self.message, self.code)
        }
    }
}

/// Everything that can go wrong in the client library. `Display` gives one sentence a
/// person can read and act on; no status dumps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// No connection to the server could be made in time.
    Unreachable {
        /// The address tried.
        addr: String,
    },
    /// A call failed because the connection to the server was lost.
    ConnectionLost {
        /// The server's address.
        addr: String,
    },
    /// The user name is held by a live session in that room.
    NameTaken {
        /// The name.
        user: String,
        /// The room.
        room: String,
    },
    /// The server refused the user name; the text says why.
    BadName(String),
    /// The server refused the room name; the text says why.
    BadRoom(String),
    /// The server refused the message text; the text says why.
    BadMessage(String),
    /// Another malformed request; the text says why.
    BadRequest(String),
    /// The session token is unknown or has expired.
    SessionUnknown,
    /// The session has left its room; nothing more can be done with it.
    SessionEnded,
    /// The session was resumed by another connection, which now owns it.
    Superseded,
    /// A server limit was hit (rate, size, too many rooms or sessions); the text says which.
    Limit(String),
    /// The server is shutting down.
    ShuttingDown,
    /// Waiting for something took longer than allowed.
    TimedOut(String),
    /// The chat session is closed (after a leave or a fatal error).
    Closed,
    /// This many posts already wait for the server's acknowledgement, the most the
    /// session keeps ([`crate::client::ChatConfig::max_pending_posts`]).
    OutboxFull(usize),
    /// Any other failure reported by the server.
    Server(Status),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Unreachable { addr } => write!(f, "cannot reach the server at {addr}"),
            Error::ConnectionLost { addr } => write!(f, "lost the connection to the server at {addr}"),
            Error::NameTaken { user, room } => {
                write!(f, "the name {user} is already taken in room {room}")
            }
            Error::BadName(why) => write!(f, "bad user name: {why}"),
            Error::BadRoom(why) => write!(f, "bad room name: {why}"),
            Error::BadMessage(why) => write!(f, "bad message: {why}"),
            Error::BadRequest(why) => write!(f, "bad request: {why}"),
            Error::SessionUnknown => f.write_str("the session is unknown or has expired"),
            Error::SessionEnded => f.write_str("the session has already left its room"),
            Error::Superseded => f.write_str("this session was taken over by another connection"),
            Error::Limit(why) => write!(f, "the server refused: {why}"),
            Error::ShuttingDown => f.write_str("the server is shutting down"),
            Error::TimedOut(what) => write!(f, "timed out waiting for {what}"),
            Error::Closed => f.write_str("the chat session is closed"),
            Error::OutboxFull(n) => {
                write!(f, "{n} messages are still waiting for the server; wait for them before sending more")
            }
            Error::Server(status) => write!(f, "the server reported an error: {status}"),
        }
    }
}

impl std::error::Error for Error {}

/// What a failed request was about, so that its status becomes a precise [`Error`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Context<'a> {
    /// The server address (for connection errors).
    pub addr: &'a str,
    /// The user name involved, if any.
    pub user: &'a str,
    /// The room involved, if any.
    pub room: &'a str,
}

impl Error {
    /// The error for a failed request described by `ctx`.
    pub(crate) fn from_status(status: &Status, ctx: Context<'_>) -> Error {
        let message = status.message.trim();
        let lower = message.to_ascii_lowercase();
        let why = || strip_subject(message);
        match status.code {
            Code::InvalidArgument => {
                if lower.starts_with("user") {
                    Error::BadName(why())
                } else if lower.starts_with("room") {
                    Error::BadRoom(why())
                } else if lower.starts_with("message") || lower.starts_with("text") {
                    Error::BadMessage(why())
                } else {
                    Error::BadRequest(non_empty(message, "the server refused the request"))
                }
            }
            Code::AlreadyExists => {
                Error::NameTaken { user: ctx.user.to_string(), room: ctx.room.to_string() }
            }
            Code::NotFound | Code::Unauthenticated => Error::SessionUnknown,
            Code::FailedPrecondition => Error::SessionEnded,
            Code::Aborted => Error::Superseded,
            Code::ResourceExhausted => Error::Limit(non_empty(message, "a limit was reached")),
            Code::Unavailable if lower.contains("shutting down") => Error::ShuttingDown,
            Code::Unavailable | Code::Cancelled => Error::ConnectionLost { addr: ctx.addr.to_string() },
            Code::DeadlineExceeded => Error::TimedOut("the server to answer".into()),
            _ => Error::Server(status.clone()),
        }
    }

    /// The error for a failed grpcio call described by `ctx`.
    pub(crate) fn from_grpc(error: &grpcio::Error, ctx: Context<'_>) -> Error {
        Error::from_status(&Status::from_grpc(error), ctx)
    }
}

/// Drops the subject the error's prefix already names: "user name must not be empty"
/// -> "it must not be empty", "room name \"a b\" may only …" -> "\"a b\" may only …".
fn strip_subject(message: &str) -> String {
    for subject in ["user name ", "room name ", "message text "] {
        if let Some(rest) = message.strip_prefix(subject) {
            return if rest.starts_with('"') { rest.to_string() } else { format!("it {rest}") };
        }
    }
    message.to_string()
}

fn non_empty(message: &str, fallback: &str) -> String {
    if message.is_empty() {
        fallback.to_string()
    } else {
        message.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Context<'static> {
        Context { addr: "127.0.0.1:1", user: "alice", room: "general" }
    }

    #[test]
    fn statuses_become_sentences() {
        let taken = Error::from_status(&Status::new(Code::AlreadyExists, "taken"), ctx());
        assert_eq!(taken.to_string(), "the name alice is already taken in room general");
        let room = Status::new(
            Code::InvalidArgument,
            "room name \"a b\" may only contain letters, digits, '.', '_' and '-'",
        );
        assert_eq!(
            Error::from_status(&room, ctx()).to_string(),
            "bad room name: \"a b\" may only contain letters, digits, '.', '_' and '-'"
        );
        let empty = Status::new(Code::InvalidArgument, "user name must not be empty");
        assert_eq!(Error::from_status(&empty, ctx()).to_string(), "bad user name: it must not be empty");
        let down = Status::new(Code::Unavailable, "failed to connect to all addresses");
        assert_eq!(
            Error::from_status(&down, ctx()).to_string(),
            "lost the connection to the server at 127.0.0.1:1"
        );
        let shut = Status::new(Code::Unavailable, "the server is shutting down");
        assert_eq!(Error::from_status(&shut, ctx()), Error::ShuttingDown);
    }
}
