//! Validation of client input and the rejections the core answers with.

use std::borrow::Cow;
use std::fmt;

use super::config::Limits;

/// Why a client's request was refused. Maps one-to-one onto gRPC status codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// Malformed input: bad name, bad text, wrong first frame.
    InvalidArgument,
    /// Unknown or expired session token.
    NotFound,
    /// The user name is taken in that room by a live session.
    AlreadyExists,
    /// The request is valid but not in this state (second hello, post after leave).
    FailedPrecondition,
    /// A limit was hit: rate, rooms, sessions, a slow member.
    ResourceExhausted,
    /// The server is shutting down.
    Unavailable,
    /// The stream was superseded: its session was resumed on another stream.
    Aborted,
    /// A stream sent no first frame in time.
    DeadlineExceeded,
}

/// A refusal to be shown to the client that caused it: a status code and one sentence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The status code.
    pub code: Code,
    /// What was wrong, in words a user can act on.
    pub reason: Cow<'static, str>,
}

impl Rejection {
    pub(crate) fn new(code: Code, reason: impl Into<Cow<'static, str>>) -> Rejection {
        Rejection { code, reason: reason.into() }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.reason)
    }
}

impl std::error::Error for Rejection {}

fn invalid(reason: String) -> Rejection {
    Rejection::new(Code::InvalidArgument, reason)
}

/// Checks a user name: 1..=max characters, not blank, no control characters, and
/// nothing that makes two names look alike: no whitespace at either end, no invisible
/// formatting characters (see [`invisible`]).
pub(crate) fn user(name: &str, limits: &Limits) -> Result<(), Rejection> {
    let chars = name.chars().count();
    if name.trim().is_empty() {
        return Err(invalid("user name must not be empty".into()));
    }
    if name.trim() != name {
        return Err(invalid("user name must not start or end with a space".into()));
    }
    if let Some(c) = name.chars().find(|&c| invisible(c)) {
        return Err(invalid(format!(
            "user name must not contain invisible formatting characters (found U+{:04X})",
            u32::from(c)
        )));
    }
    if chars > limits.max_user_chars {
        return Err(invalid(format!(
            "user name is {chars} characters; at most {} are allowed",
            limits.max_user_chars
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid("user name must not contain control characters".into()));
    }
    Ok(())
}

/// Characters that change how text is shown without showing themselves: the zero-width
/// space, bidirectional marks, overrides and isolates, the byte-order mark, the soft
/// hyphen, blank Hangul fillers, tags and the like. In a user name they let `ann` and a
/// look-alike such as `a\u{200B}nn` be two people. The zero-width joiner and non-joiner
/// (U+200D, U+200C) stay allowed: Persian and Indic names and emoji sequences need them.
fn invisible(c: char) -> bool {
    matches!(
        c,
        '\u{AD}'
            | '\u{34F}'
            | '\u{61C}'
            | '\u{115F}'..='\u{1160}'
            | '\u{17B4}'..='\u{17B5}'
            | '\u{180E}'
            | '\u{200B}'
            | '\u{200E}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E007F}'
    )
}

/// Checks a room name: 1..=max characters of `[A-Za-z0-9._-]`.
pub(crate) fn room(name: &str, limits: &Limits) -> Result<(), Rejection> {
    if name.is_empty() {
        return Err(invalid("room name must not be empty".into()));
    }
    if name.len() > limits.max_room_chars {
        return Err(invalid(format!(
            "room name is {} characters; at most {} are allowed",
            name.chars().count(),
            limits.max_room_chars
        )));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return Err(invalid(format!(
            "room name {:?} may only contain letters, digits, '.', '_' and '-'",
            name
        )));
    }
    Ok(())
}

/// Checks a message text: 1..=max bytes, no control characters but newline and tab.
pub(crate) fn text(text: &str, limits: &Limits) -> Result<(), Rejection> {
    if text.trim().is_empty() {
        return Err(invalid("message text must not be empty".into()));
    }
    if text.len() > limits.max_text_bytes {
        return Err(invalid(format!(
            "message text is {} bytes; at most {} are allowed",
            text.len(),
            limits.max_text_bytes
        )));
    }
    if text.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(invalid(
            "message text must not contain control characters (newline and tab are allowed)".into(),
        ));
    }
    Ok(())
}

/// Checks an idempotency key: at most 64 bytes of printable characters (may be empty).
pub(crate) fn client_msg_id(id: &str) -> Result<(), Rejection> {
    const MAX: usize = 64;
    if id.len() > MAX {
        return Err(invalid(format!("client_msg_id is {} bytes; at most {MAX} are allowed", id.len())));
    }
    if id.chars().any(char::is_control) {
        return Err(invalid("client_msg_id must not contain control characters".into()));
    }
    Ok(())
}
