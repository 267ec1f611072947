//! A room: its members, its attached streams, its sequence and its history ring.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use super::event::{Message, Recipients};
use super::ids::{ConnId, Epoch, Seq, SessionId};

/// What a resuming reader gets from the history: the messages to replay, and whether
/// some it asked for are no longer there.
pub(crate) struct Replay {
    pub(crate) messages: Vec<Arc<Message>>,
    pub(crate) gap: bool,
}

pub(crate) struct Room {
    pub(crate) name: Arc<str>,
    pub(crate) epoch: Epoch,
    last_seq: Seq,
    history: VecDeque<Arc<Message>>,
    history_limit: usize,
    /// What the retained messages weigh together (see [`Message::weight`]).
    history_bytes: usize,
    /// Reserved user names and the sessions holding them; sorted for member lists.
    pub(crate) members: BTreeMap<Arc<str>, SessionId>,
    /// Streams that receive the room's events.
    listeners: BTreeSet<ConnId>,
    /// `listeners` as a shared slice, rebuilt on the first broadcast after a change.
    snapshot: Option<Arc<[ConnId]>>,
}

impl Room {
    pub(crate) fn new(name: Arc<str>, epoch: Epoch, history_limit: usize) -> Room {
        Room {
            name,
            epoch,
            last_seq: Seq(0),
            history: VecDeque::new(),
            history_limit,
            history_bytes: 0,
            members: BTreeMap::new(),
            listeners: BTreeSet::new(),
            snapshot: None,
        }
    }

    pub(crate) fn last_seq(&self) -> Seq {
        self.last_seq
    }

    /// Assigns the next seq and stores the message, evicting the oldest past the limit.
    pub(crate) fn append(&mut self, make: impl FnOnce(Seq) -> Message) -> Arc<Message> {
        self.last_seq = self.last_seq.next();
        let message = Arc::new(make(self.last_seq));
        if self.history_limit > 0 {
            if self.history.len() == self.history_limit {
                self.evict_oldest();
            }
            self.history_bytes += message.weight();
            self.history.push_back(Arc::clone(&message));
        }
        message
    }

    /// What the retained messages weigh together.
    pub(crate) fn history_bytes(&self) -> usize {
        self.history_bytes
    }

    /// Drops the oldest retained message, if any.
    pub(crate) fn evict_oldest(&mut self) {
        if let Some(old) = self.history.pop_front() {
            self.history_bytes -= old.weight();
        }
    }

    /// The retained messages with `seq > since`, the newest `limit` of them (0 = all).
    pub(crate) fn history_since(&self, since: Seq, limit: usize) -> Vec<Arc<Message>> {
        let first = self.first_retained();
        let skip = since.0.saturating_add(1).saturating_sub(first.0).min(self.history.len() as u64) as usize;
        let available = self.history.len() - skip;
        let take = if limit == 0 { available } else { limit.min(available) };
        self.history.iter().skip(skip + available - take).cloned().collect()
    }

    /// What a reader that saw everything up to `since` in log `epoch` must be sent.
    /// `epoch` 0 means "unknown": the reader's `since` is trusted if it is plausible.
    /// `since` 0 asks for everything retained and by itself claims nothing is owed, but
    /// a resuming session passes `owed_after`, the room's last seq when it joined: having
    /// seen nothing, it is still owed every message after that one.
    pub(crate) fn replay(&self, since: Seq, epoch: Epoch, owed_after: Option<Seq>) -> Replay {
        let same_log = (epoch.0 == 0 || epoch == self.epoch) && since <= self.last_seq;
        if !same_log {
            return Replay { messages: self.history_since(Seq(0), 0), gap: since.0 > 0 };
        }
        let owed_after = if since.0 > 0 { Some(since) } else { owed_after };
        let gap = owed_after.is_some_and(|seen| seen.next() < self.first_retained());
        Replay { messages: self.history_since(since, 0), gap }
    }

    fn first_retained(&self) -> Seq {
        Seq(self.last_seq.0 + 1 - self.history.len() as u64)
    }

    pub(crate) fn add_listener(&mut self, conn: ConnId) {
        if self.listeners.insert(conn) {
            self.snapshot = None;
        }
    }

    pub(crate) fn remove_listener(&mut self, conn: ConnId) {
        if self.listeners.remove(&conn) {
            self.snapshot = None;
        }
    }

    /// Every listening stream, in ascending id order.
    pub(crate) fn recipients(&mut self) -> Recipients {
        let listeners = &self.listeners;
        let snapshot = self.snapshot.get_or_insert_with(|| listeners.iter().copied().collect());
        Recipients::Many(Arc::clone(snapshot))
    }

    /// Every listening stream but `except`.
    pub(crate) fn recipients_except(&mut self, except: Option<ConnId>) -> Recipients {
        match except {
            Some(c) if self.listeners.contains(&c) => {
                Recipients::Many(self.listeners.iter().copied().filter(|&l| l != c).collect())
            }
            _ => self.recipients(),
        }
    }

    pub(crate) fn listener_count(&self) -> usize {
        self.listeners.len()
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.members.is_empty() && self.listeners.is_empty()
    }
}
