//! Conversion from core events to `chat.v1` messages, encoded once into shared bytes,
//! and the concatenation of queued events into one `EventBatch` write.
//!
//! This is the only server file that names both `core` and `pb` types.

use grpcio::{GrpcSlice, RpcStatusCode};
use prost::Message as _;

use crate::core::{self, Code, Event};
use crate::pb;

/// Field 5 (`batch`) of `ServerEvent`, wire type 2: the first byte of an encoded batch.
const BATCH_TAG: u8 = (5 << 3) | 2;
/// Field 1 (`events`) of `EventBatch`, wire type 2.
const EVENTS_TAG: u8 = (1 << 3) | 2;

/// An encoded `ServerEvent`, ready to be written to any number of streams. Cloning
/// bumps a reference count; the bytes are never copied.
#[derive(Clone)]
pub struct Encoded(pub GrpcSlice);

/// Passes pre-encoded bytes to grpcio unchanged (the response marshaller of the
/// event-streaming methods).
pub fn serialize_encoded(event: &Encoded, out: &mut GrpcSlice) -> grpcio::Result<()> {
    *out = event.0.clone();
    Ok(())
}

/// Deserializer of [`Encoded`] (the server never receives one; present for completeness).
pub fn deserialize_encoded(reader: grpcio::MessageReader) -> grpcio::Result<Encoded> {
    use std::io::Read;
    let mut bytes = Vec::new();
    let mut reader = reader;
    reader.read_to_end(&mut bytes).map_err(|e| grpcio::Error::Codec(Box::new(e)))?;
    Ok(Encoded(GrpcSlice::from(bytes)))
}

/// The gRPC status code for a core rejection.
pub fn status_code(code: Code) -> RpcStatusCode {
    match code {
        Code::InvalidArgument => RpcStatusCode::INVALID_ARGUMENT,
        Code::NotFound => RpcStatusCode::NOT_FOUND,
        Code::AlreadyExists => RpcStatusCode::ALREADY_EXISTS,
        Code::FailedPrecondition => RpcStatusCode::FAILED_PRECONDITION,
        Code::ResourceExhausted => RpcStatusCode::RESOURCE_EXHAUSTED,
        Code::Unavailable => RpcStatusCode::UNAVAILABLE,
        Code::Aborted => RpcStatusCode::ABORTED,
        Code::DeadlineExceeded => RpcStatusCode::DEADLINE_EXCEEDED,
    }
}

/// A `grpcio` status carrying a core rejection.
pub fn rpc_status(rejection: &core::Rejection) -> grpcio::RpcStatus {
    grpcio::RpcStatus::with_message(status_code(rejection.code), rejection.reason.to_string())
}

/// The wire form of a message.
pub fn chat_message(m: &core::Message) -> pb::ChatMessage {
    pb::ChatMessage {
        room: m.room.to_string(),
        user: m.user.to_string(),
        text: m.text.clone(),
        seq: m.seq.get(),
        sent_at_ms: m.sent_at_ms,
        client_msg_id: m.client_msg_id.clone(),
    }
}

fn strings(names: &[std::sync::Arc<str>]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

/// The wire form of a join result.
pub fn join_reply(info: &core::JoinInfo) -> pb::JoinReply {
    pb::JoinReply {
        session: info.token.as_str().to_owned(),
        members: strings(&info.members),
        last_seq: info.last_seq.get(),
        epoch: info.epoch.get(),
        history_limit: u32::try_from(info.history_limit).unwrap_or(u32::MAX),
        member_count: u32::try_from(info.member_count).unwrap_or(u32::MAX),
    }
}

/// The wire form of the room directory.
pub fn rooms_reply(rooms: &[core::RoomInfo]) -> pb::ListRoomsReply {
    let rooms = rooms
        .iter()
        .map(|r| pb::RoomInfo {
            name: r.name.to_string(),
            members: u32::try_from(r.members).unwrap_or(u32::MAX),
            last_seq: r.last_seq.get(),
        })
        .collect();
    pb::ListRoomsReply { rooms }
}

/// The wire form of a member list.
pub fn members_reply(members: &[std::sync::Arc<str>]) -> pb::ListMembersReply {
    pb::ListMembersReply { members: strings(members) }
}

/// The core's view of a `Hello` frame.
pub fn hello(h: pb::Hello) -> core::Hello {
    core::Hello {
        session: h.session,
        user: h.user,
        room: h.room,
        since: core::Seq(h.since_seq),
        epoch: core::Epoch(h.epoch),
    }
}

fn event(e: pb::server_event::Event) -> pb::ServerEvent {
    pb::ServerEvent { event: Some(e) }
}

/// Encodes a core event into the bytes every recipient receives; a backlog becomes one
/// batch. (The hub does not encode backlogs: it queues their messages, and the stream's
/// thread encodes them with [`message`] a batch at a time as it writes.)
pub fn encode(ev: &Event) -> Encoded {
    use pb::server_event::Event as E;
    let single = |e: E| Encoded(GrpcSlice::from(event(e).encode_to_vec()));
    match ev {
        Event::Message(m) => single(E::Message(chat_message(m))),
        Event::Presence(p) => single(E::Presence(pb::Presence {
            room: p.room.to_string(),
            user: p.user.to_string(),
            joined: p.joined,
        })),
        Event::Notice(n) => single(E::Notice(pb::Notice {
            text: n.text.clone(),
            code: n.code.map_or(0, |c| i32::from(status_code(c))),
            client_msg_id: n.client_msg_id.clone(),
        })),
        Event::Welcome(w) => single(E::Welcome(pb::Welcome {
            session: w.session.as_ref().map(|t| t.as_str().to_owned()).unwrap_or_default(),
            user: w.user.to_string(),
            room: w.room.to_string(),
            members: strings(&w.members),
            last_seq: w.last_seq.get(),
            epoch: w.epoch.get(),
            resumed: w.resumed,
            gap: w.gap,
            member_count: u32::try_from(w.member_count).unwrap_or(u32::MAX),
            history_limit: u32::try_from(w.history_limit).unwrap_or(u32::MAX),
        })),
        Event::Backlog(messages) => {
            let mut batcher = Batcher::default();
            messages.iter().for_each(|m| batcher.push(message(m)));
            batcher.finish()
        }
    }
}

/// One chat message as a `ServerEvent`.
pub fn message(m: &core::Message) -> Encoded {
    Encoded(GrpcSlice::from(event(pb::server_event::Event::Message(chat_message(m))).encode_to_vec()))
}

/// Builds one `ServerEvent{batch}` from encoded events without decoding them: each
/// event becomes an `EventBatch.events` entry; an event that is itself a batch
/// contributes its entries (batches are never nested). The events are held (reference
/// counts only) until `finish`, which sizes the output exactly and copies each byte once.
#[derive(Default)]
pub struct Batcher {
    parts: Vec<Encoded>,
    body_len: usize,
}

impl Batcher {
    /// True when nothing was pushed since the last `finish`.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Bytes in the batch body so far.
    pub fn body_len(&self) -> usize {
        self.body_len
    }

    /// Appends one encoded `ServerEvent`.
    pub fn push(&mut self, event: Encoded) {
        let bytes = event.0.as_slice();
        self.body_len += match split_batch(bytes) {
            Some(entries) => entries.len(),
            None => 1 + varint_len(bytes.len() as u64) + bytes.len(),
        };
        self.parts.push(event);
    }

    /// What was pushed, as one write: nothing, a single event (or batch) as it is, or one
    /// batch of all of them. The batcher is empty again afterwards.
    pub fn take(&mut self) -> Option<Encoded> {
        match self.parts.len() {
            0 => None,
            1 => {
                self.body_len = 0;
                self.parts.pop()
            }
            _ => Some(self.finish()),
        }
    }

    /// The batch as one encoded `ServerEvent`; the batcher is empty again afterwards.
    pub fn finish(&mut self) -> Encoded {
        let total = 1 + varint_len(self.body_len as u64) + self.body_len;
        let mut out = Vec::with_capacity(total);
        out.push(BATCH_TAG);
        put_varint(&mut out, self.body_len as u64);
        for part in self.parts.drain(..) {
            let bytes = part.0.as_slice();
            match split_batch(bytes) {
                Some(entries) => out.extend_from_slice(entries),
                None => {
                    out.push(EVENTS_TAG);
                    put_varint(&mut out, bytes.len() as u64);
                    out.extend_from_slice(bytes);
                }
            }
        }
        debug_assert_eq!(out.len(), total, "the batch was sized exactly");
        self.body_len = 0;
        Encoded(GrpcSlice::from(out))
    }
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// If `encoded` is a `ServerEvent{batch}`, the bytes of its `EventBatch` body.
fn split_batch(encoded: &[u8]) -> Option<&[u8]> {
    let (&tag, rest) = encoded.split_first()?;
    if tag != BATCH_TAG {
        return None;
    }
    let (len, used) = get_varint(rest)?;
    let body = rest.get(used..)?;
    (body.len() as u64 == len).then_some(body)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn chat(seq: u64) -> Arc<core::Message> {
        Arc::new(core::Message {
            room: "r".into(),
            user: "u".into(),
            text: format!("text {seq}"),
            seq: core::Seq(seq),
            sent_at_ms: 7,
            client_msg_id: String::new(),
        })
    }

    fn message(seq: u64) -> Event {
        Event::Message(chat(seq))
    }

    fn backlog(seqs: std::ops::RangeInclusive<u64>) -> Event {
        Event::Backlog(seqs.map(chat).collect())
    }

    fn seqs(bytes: &[u8]) -> Vec<u64> {
        let ev = pb::ServerEvent::decode(bytes).expect("batch decodes");
        match ev.event {
            Some(pb::server_event::Event::Batch(b)) => b
                .events
                .into_iter()
                .map(|e| match e.event {
                    Some(pb::server_event::Event::Message(m)) => m.seq,
                    other => panic!("unexpected nested event {other:?}"),
                })
                .collect(),
            other => panic!("not a batch: {other:?}"),
        }
    }

    #[test]
    fn batch_of_single_events_decodes_in_order() {
        let mut b = Batcher::default();
        for seq in 1..=3 {
            b.push(encode(&message(seq)));
        }
        assert_eq!(seqs(b.finish().0.as_slice()), vec![1, 2, 3]);
        assert!(b.is_empty());
    }

    #[test]
    fn batches_are_flattened_not_nested() {
        let mut b = Batcher::default();
        b.push(encode(&backlog(1..=4)));
        b.push(encode(&message(5)));
        assert_eq!(seqs(b.finish().0.as_slice()), vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn take_sends_a_single_event_as_it_is_and_several_as_a_batch() {
        let mut b = Batcher::default();
        assert!(b.take().is_none());
        b.push(encode(&message(1)));
        let single = b.take().expect("one event");
        assert_eq!(single.0.as_slice(), encode(&message(1)).0.as_slice());
        assert!(b.is_empty() && b.body_len() == 0);
        b.push(encode(&message(2)));
        b.push(encode(&message(3)));
        assert_eq!(seqs(b.take().expect("a batch").0.as_slice()), vec![2, 3]);
        // A lone batch goes out as it is.
        b.push(encode(&backlog(4..=5)));
        assert_eq!(seqs(b.take().expect("a batch").0.as_slice()), vec![4, 5]);
        b.push(encode(&backlog(6..=7)));
        b.push(encode(&message(8)));
        assert_eq!(seqs(b.take().expect("a batch").0.as_slice()), vec![6, 7, 8], "flattened, never nested");
    }

    #[test]
    fn varint_lengths() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u64::MAX] {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            assert_eq!(buf.len(), varint_len(v), "{v}");
            assert_eq!(get_varint(&buf), Some((v, buf.len())));
        }
    }
}
