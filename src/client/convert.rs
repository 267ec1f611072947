//! Conversions between the generated `pb` types and the client's own types. The only
//! file of the client that reads generated message fields.

use crate::pb;
use crate::pb::server_event::Event as PbEvent;

use super::session::HelloParams;
use super::types::{Incoming, Joined, Message, RoomInfo, WelcomeInfo};

pub(crate) fn message(m: pb::ChatMessage) -> Message {
    Message {
        room: m.room,
        user: m.user,
        text: m.text,
        seq: m.seq,
        sent_at_ms: m.sent_at_ms,
        client_msg_id: m.client_msg_id,
    }
}

pub(crate) fn joined(user: &str, room: &str, r: pb::JoinReply) -> Joined {
    Joined {
        user: user.to_string(),
        room: room.to_string(),
        session: r.session,
        members: r.members,
        member_count: r.member_count,
        last_seq: r.last_seq,
        epoch: r.epoch,
        history_limit: r.history_limit,
    }
}

pub(crate) fn room_info(r: pb::RoomInfo) -> RoomInfo {
    RoomInfo { name: r.name, members: r.members, last_seq: r.last_seq }
}

fn welcome(w: pb::Welcome) -> WelcomeInfo {
    WelcomeInfo {
        session: w.session,
        user: w.user,
        room: w.room,
        members: w.members,
        member_count: w.member_count,
        last_seq: w.last_seq,
        epoch: w.epoch,
        resumed: w.resumed,
        gap: w.gap,
    }
}

/// Appends the events of `event` to `out`, flattening batches (nested ones too, although
/// the server never nests them). Empty events are skipped.
pub(crate) fn flatten(event: pb::ServerEvent, out: &mut Vec<Incoming>) {
    match event.event {
        Some(PbEvent::Welcome(w)) => out.push(Incoming::Welcome(welcome(w))),
        Some(PbEvent::Message(m)) => out.push(Incoming::Message(message(m))),
        Some(PbEvent::Presence(p)) => out.push(Incoming::Presence { user: p.user, joined: p.joined }),
        Some(PbEvent::Notice(n)) => {
            out.push(Incoming::Notice { text: n.text, code: n.code, client_msg_id: n.client_msg_id })
        }
        Some(PbEvent::Batch(b)) => {
            for e in b.events {
                flatten(e, out);
            }
        }
        None => {}
    }
}

pub(crate) fn hello(h: &HelloParams) -> pb::ClientFrame {
    pb::ClientFrame {
        frame: Some(pb::client_frame::Frame::Hello(pb::Hello {
            session: h.session.clone(),
            user: String::new(),
            room: String::new(),
            since_seq: h.since_seq,
            epoch: h.epoch,
        })),
    }
}

pub(crate) fn post(text: String, client_msg_id: String) -> pb::ClientFrame {
    pb::ClientFrame { frame: Some(pb::client_frame::Frame::Post(pb::Post { text, client_msg_id })) }
}

pub(crate) fn leave() -> pb::ClientFrame {
    pb::ClientFrame { frame: Some(pb::client_frame::Frame::Leave(pb::Leave {})) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64) -> pb::ServerEvent {
        pb::ServerEvent { event: Some(PbEvent::Message(pb::ChatMessage { seq, ..Default::default() })) }
    }

    #[test]
    fn batches_are_flattened_in_order() {
        let batch = pb::ServerEvent {
            event: Some(PbEvent::Batch(pb::EventBatch { events: vec![msg(1), msg(2), msg(3)] })),
        };
        let mut out = Vec::new();
        flatten(msg(0), &mut out);
        flatten(batch, &mut out);
        let seqs: Vec<u64> = out
            .iter()
            .map(|e| match e {
                Incoming::Message(m) => m.seq,
                _ => u64::MAX,
            })
            .collect();
        assert_eq!(seqs, vec![0, 1, 2, 3]);
    }
}
