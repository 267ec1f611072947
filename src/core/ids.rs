//! Identifiers made by the core: connections, sessions, sequence numbers, epochs, tokens.

use std::fmt;

/// One attached stream (a `Chat` or `Subscribe` call), numbered by the core.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub(crate) u64);

impl ConnId {
    /// The number behind the id, for logs and routing tables.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{}", self.0)
    }
}

/// A session (a user name reserved in a room), numbered by the core.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct SessionId(pub(crate) u64);

/// Position of a message in its room's log. The first message is `Seq(1)`; `Seq(0)`
/// means "nothing yet".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Seq(pub u64);

impl Seq {
    /// The number behind the seq.
    pub fn get(self) -> u64 {
        self.0
    }

    pub(crate) fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Identity of a room's log. It changes whenever the server loses the room's history,
/// so a client resuming from a [`Seq`] can tell "same log" from "new log".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The number behind the epoch.
    pub fn get(self) -> u64 {
        self.0
    }
}

/// An opaque, unguessable session token.
///
/// The core never makes randomness: the driver supplies 16 random bytes with every
/// input that may open a session ([`Token::from_entropy`]), so the core stays
/// deterministic under test.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Token(Box<str>);

impl Token {
    /// Longest token string the core accepts from a client.
    pub const MAX_LEN: usize = 64;

    /// Makes a token from 16 bytes of entropy: `s` followed by 32 hex digits.
    pub fn from_entropy(bytes: [u8; 16]) -> Token {
        use fmt::Write;
        let mut s = String::with_capacity(33);
        s.push('s');
        for b in bytes {
            write!(s, "{b:02x}").expect("writing to a String cannot fail");
        }
        Token(s.into_boxed_str())
    }

    /// Wraps a token string presented by a client. Returns `None` when it is empty, too
    /// long or not printable ASCII (it could then never match a token we issued).
    pub fn parse(s: &str) -> Option<Token> {
        let ok = !s.is_empty() && s.len() <= Self::MAX_LEN && s.bytes().all(|b| b.is_ascii_graphic());
        ok.then(|| Token(s.into()))
    }

    /// The token as sent on the wire.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    /// Shows only a prefix: tokens are credentials and must not end up whole in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix: String = self.0.chars().take(7).collect();
        write!(f, "Token({prefix}…)")
    }
}
