//! The bench's view of the wire: a hand-written `Chat` method whose responses are
//! decoded only as far as the bench needs (no strings but the session, no presence),
//! and the connections to the server.

use std::ffi::CString;
use std::sync::Arc;
use std::time::{Duration, Instant};

use grpc_chat::pb;
use grpcio::{
    CallOption, Channel, ChannelBuilder, ClientDuplexReceiver, ClientDuplexSender, ConnectivityState,
    EnvBuilder, Environment, GrpcSlice, Marshaller, MessageReader, Method, MethodType,
};
use prost::bytes::Buf;

/// What one received `ServerEvent` (or one element of a batch) means to the bench.
#[derive(Debug)]
pub enum Item {
    /// The stream is attached.
    Welcome { session: String, last_seq: u64, history_limit: u32 },
    /// A chat message: its `seq` and, when the text starts with a bench stamp, the
    /// publisher's intended send time (nanoseconds since the bench's origin).
    Message { seq: u64, stamp_ns: Option<u64> },
    /// A notice; `code != 0` is a rejected post.
    Notice { code: i32 },
    /// Presence or an event unknown to the bench.
    Other,
}

/// One received gRPC message: one event, or the events of a batch in order.
#[derive(Debug, Default)]
pub struct Incoming {
    pub items: Vec<Item>,
}

fn bad(what: &str) -> grpcio::Error {
    grpcio::Error::Codec(format!("malformed ServerEvent: {what}").into())
}

struct Rd<'a> {
    b: &'a [u8],
}

impl<'a> Rd<'a> {
    fn varint(&mut self) -> grpcio::Result<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&byte, rest) = self.b.split_first().ok_or_else(|| bad("truncated varint"))?;
            self.b = rest;
            v |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                return Ok(v);
            }
        }
        Err(bad("varint too long"))
    }

    fn key(&mut self) -> grpcio::Result<(u64, u8)> {
        let k = self.varint()?;
        Ok((k >> 3, (k & 7) as u8))
    }

    fn bytes(&mut self) -> grpcio::Result<&'a [u8]> {
        let n = self.varint()? as usize;
        if n > self.b.len() {
            return Err(bad("truncated field"));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }

    fn skip(&mut self, wire_type: u8) -> grpcio::Result<()> {
        let n = match wire_type {
            0 => return self.varint().map(drop),
            1 => 8,
            2 => return self.bytes().map(drop),
            5 => 4,
            _ => return Err(bad("unsupported wire type")),
        };
        if n > self.b.len() {
            return Err(bad("truncated fixed field"));
        }
        self.b = &self.b[n..];
        Ok(())
    }
}

/// Parses the 16 lowercase hex digits a bench publisher puts at the start of a text.
pub fn parse_stamp(text: &[u8]) -> Option<u64> {
    if text.len() < 16 {
        return None;
    }
    let mut v = 0u64;
    for &c in &text[..16] {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        v = (v << 4) | u64::from(d);
    }
    Some(v)
}

/// The text a publisher sends: a stamp, a space, padding up to `bytes` bytes.
pub fn stamped_text(stamp_ns: u64, bytes: usize) -> String {
    let mut s = format!("{stamp_ns:016x} ");
    while s.len() < bytes {
        s.push('x');
    }
    s
}

pub fn parse_event(b: &[u8], depth: u32, out: &mut Vec<Item>) -> grpcio::Result<()> {
    let mut r = Rd { b };
    while !r.b.is_empty() {
        let (field, wt) = r.key()?;
        match (field, wt) {
            (1, 2) => out.push(parse_welcome(r.bytes()?)?),
            (2, 2) => out.push(parse_message(r.bytes()?)?),
            (4, 2) => out.push(parse_notice(r.bytes()?)?),
            (5, 2) if depth == 0 => {
                let mut batch = Rd { b: r.bytes()? };
                while !batch.b.is_empty() {
                    let (f, w) = batch.key()?;
                    if (f, w) == (1, 2) {
                        parse_event(batch.bytes()?, depth + 1, out)?;
                    } else {
                        batch.skip(w)?;
                    }
                }
            }
            (5, _) => return Err(bad("nested batch")),
            (3, 2) => {
                r.skip(2)?;
                out.push(Item::Other);
            }
            (_, w) => r.skip(w)?,
        }
    }
    Ok(())
}

fn parse_welcome(b: &[u8]) -> grpcio::Result<Item> {
    let mut r = Rd { b };
    let (mut session, mut last_seq, mut history_limit) = (String::new(), 0, 0);
    while !r.b.is_empty() {
        match r.key()? {
            (1, 2) => session = String::from_utf8_lossy(r.bytes()?).into_owned(),
            (5, 0) => last_seq = r.varint()?,
            (10, 0) => history_limit = r.varint()? as u32,
            (_, w) => r.skip(w)?,
        }
    }
    Ok(Item::Welcome { session, last_seq, history_limit })
}

fn parse_message(b: &[u8]) -> grpcio::Result<Item> {
    let mut r = Rd { b };
    let (mut seq, mut stamp_ns) = (0, None);
    while !r.b.is_empty() {
        match r.key()? {
            (3, 2) => stamp_ns = parse_stamp(r.bytes()?),
            (4, 0) => seq = r.varint()?,
            (_, w) => r.skip(w)?,
        }
    }
    Ok(Item::Message { seq, stamp_ns })
}

fn parse_notice(b: &[u8]) -> grpcio::Result<Item> {
    let mut r = Rd { b };
    let mut code = 0;
    while !r.b.is_empty() {
        match r.key()? {
            (2, 0) => code = r.varint()? as i32,
            (_, w) => r.skip(w)?,
        }
    }
    Ok(Item::Notice { code })
}

/// Decodes one `ServerEvent` (flattening a batch) from the gRPC receive buffer.
pub fn decode_incoming(mut reader: MessageReader) -> grpcio::Result<Incoming> {
    let mut items = Vec::with_capacity(4);
    let n = reader.remaining();
    if reader.chunk().len() == n {
        parse_event(reader.chunk(), 0, &mut items)?;
    } else {
        let mut v = vec![0u8; n];
        reader.copy_to_slice(&mut v);
        parse_event(&v, 0, &mut items)?;
    }
    Ok(Incoming { items })
}

fn encode_unsupported(_: &Incoming, _: &mut GrpcSlice) -> grpcio::Result<()> {
    Err(grpcio::Error::Codec("the bench never sends server events".into()))
}

/// `chat.v1.Chat/Chat` with generated requests and lightweight responses.
pub const CHAT: Method<pb::ClientFrame, Incoming> = Method {
    ty: MethodType::Duplex,
    name: "/chat.v1.Chat/Chat",
    req_mar: Marshaller { ser: grpcio::pr_ser, de: grpcio::pr_de },
    resp_mar: Marshaller { ser: encode_unsupported, de: decode_incoming },
};

/// A `hello` frame for an implicit join.
pub fn hello(user: &str, room: &str) -> pb::ClientFrame {
    pb::ClientFrame {
        frame: Some(pb::client_frame::Frame::Hello(pb::Hello {
            user: user.to_string(),
            room: room.to_string(),
            ..Default::default()
        })),
    }
}

/// A `post` frame.
pub fn post(text: String, client_msg_id: String) -> pb::ClientFrame {
    pb::ClientFrame { frame: Some(pb::client_frame::Frame::Post(pb::Post { text, client_msg_id })) }
}

/// Waits until `ch` is connected; a refused connection fails at once.
fn wait_ready(ch: &Channel, addr: &str, deadline: Instant, wait: Duration) -> Result<(), String> {
    let mut state = ch.check_connectivity_state(true);
    loop {
        match state {
            ConnectivityState::GRPC_CHANNEL_READY => return Ok(()),
            ConnectivityState::GRPC_CHANNEL_TRANSIENT_FAILURE => {
                return Err(format!("cannot reach a chat server at {addr} (connection failed)"))
            }
            ConnectivityState::GRPC_CHANNEL_SHUTDOWN => {
                return Err(format!("cannot reach a chat server at {addr} (channel shut down)"))
            }
            _ => {}
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || !futures::executor::block_on(ch.wait_for_state_change(state, left)) {
            return Err(format!(
                "cannot reach a chat server at {addr} (no connection within {:.0} s)",
                wait.as_secs_f64()
            ));
        }
        state = ch.check_connectivity_state(true);
    }
}

/// Several independent connections (HTTP/2 connections) to one server.
pub struct Conns {
    pub env: Arc<Environment>,
    pub channels: Vec<Channel>,
    pub clients: Vec<grpcio::Client>,
    pub chat: Vec<pb::ChatClient>,
}

impl Conns {
    /// Opens `n` connections and waits (up to `wait`) until all are connected.
    pub fn connect(addr: &str, n: usize, cq: usize, wait: Duration) -> Result<Conns, String> {
        let env = Arc::new(EnvBuilder::new().cq_count(cq.max(1)).name_prefix("bench-cq").build());
        let mut channels = Vec::new();
        for i in 0..n.max(1) {
            let ch = ChannelBuilder::new(env.clone())
                .use_local_subchannel_pool(true)
                .raw_cfg_int(CString::new("grpc.bench_channel_index").expect("no NUL"), i as i32)
                .max_receive_message_len(64 << 20)
                .keepalive_time(Duration::from_secs(60))
                .connect(addr);
            channels.push(ch);
        }
        let deadline = Instant::now() + wait;
        for ch in &channels {
            wait_ready(ch, addr, deadline, wait)?;
        }
        let clients = channels.iter().map(|c| grpcio::Client::new(c.clone())).collect();
        let chat = channels.iter().map(|c| pb::ChatClient::new(c.clone())).collect();
        Ok(Conns { env, channels, clients, chat })
    }

    /// Opens a `Chat` stream on connection `i % n`.
    pub fn open_chat(
        &self,
        i: usize,
    ) -> grpcio::Result<(ClientDuplexSender<pb::ClientFrame>, ClientDuplexReceiver<Incoming>)> {
        let c = &self.clients[i % self.clients.len()];
        c.duplex_streaming(&CHAT, CallOption::default())
    }

    /// The grpcio client of connection `i % n`.
    pub fn client(&self, i: usize) -> &grpcio::Client {
        &self.clients[i % self.clients.len()]
    }

    /// The typed stub for connection `i % n`.
    pub fn stub(&self, i: usize) -> &pb::ChatClient {
        &self.chat[i % self.chat.len()]
    }
}

/// The status code of a failed call, as a number (`-1` when it is not an RPC status).
pub fn error_code(e: &grpcio::Error) -> i32 {
    match e {
        grpcio::Error::RpcFailure(s) => s.code().into(),
        grpcio::Error::RpcFinished(Some(s)) => s.code().into(),
        _ => -1,
    }
}

/// The conventional name of a gRPC status code; `NO_STATUS` for `-1`, a call that ended
/// without one (the connection failed, or the stream had already ended).
pub fn code_name(code: i32) -> String {
    let name = match code {
        -1 => "NO_STATUS",
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => return format!("CODE_{code}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn items(ev: &pb::ServerEvent) -> Vec<Item> {
        let mut out = Vec::new();
        parse_event(&ev.encode_to_vec(), 0, &mut out).unwrap();
        out
    }

    #[test]
    fn decodes_single_and_batched_events() {
        use pb::server_event::Event;
        let msg = |seq| pb::ServerEvent {
            event: Some(Event::Message(pb::ChatMessage {
                room: "r".into(),
                user: "u".into(),
                text: stamped_text(0xabc, 40),
                seq,
                sent_at_ms: 5,
                client_msg_id: "id".into(),
            })),
        };
        let welcome = pb::ServerEvent {
            event: Some(Event::Welcome(pb::Welcome {
                session: "tok".into(),
                last_seq: 7,
                history_limit: 500,
                ..Default::default()
            })),
        };
        let batch = pb::ServerEvent {
            event: Some(Event::Batch(pb::EventBatch { events: vec![welcome, msg(8), msg(9)] })),
        };
        let got = items(&batch);
        assert_eq!(got.len(), 3);
        assert!(
            matches!(&got[0], Item::Welcome { session, last_seq: 7, history_limit: 500 } if session == "tok")
        );
        assert!(matches!(got[1], Item::Message { seq: 8, stamp_ns: Some(0xabc) }));
        assert!(matches!(got[2], Item::Message { seq: 9, .. }));
        let notice = pb::ServerEvent {
            event: Some(Event::Notice(pb::Notice { text: "no".into(), code: 8, client_msg_id: "x".into() })),
        };
        assert!(matches!(items(&notice)[0], Item::Notice { code: 8 }));
        assert_eq!(stamped_text(1, 10).len(), 17);
        assert_eq!(stamped_text(1, 64).len(), 64);
    }
}
