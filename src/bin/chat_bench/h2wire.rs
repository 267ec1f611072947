//! A minimal HTTP/2 client for receiving members: plain-text gRPC over non-blocking
//! sockets that a few poller threads drain, no gRPC library in the receive path.
//!
//! The grpcio client spends about as much CPU per received message as the server
//! spends sending it, and on a machine where the load generator shares the server's
//! cores that CPU is taken from the server. This client opens `Chat` streams, sends
//! their `hello` and `leave` frames, and reads what the server sends: DATA frames are
//! cut into gRPC messages and decoded as far as the bench needs ([`wire::parse_event`]),
//! trailers give the stream's `grpc-status`. Flow-control windows are large and
//! replenished rarely; nothing is compressed.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use grpc_chat::pb;
use parking_lot::Mutex;
use prost::Message;

use crate::hpack::Decoder;
use crate::swarm::{self, Outcome, Shared};
use crate::wire::{self, Incoming};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const CONTINUATION: u8 = 9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// The receive window each stream starts with (our SETTINGS_INITIAL_WINDOW_SIZE).
const STREAM_WINDOW: u32 = 8 << 20;
/// The connection's receive window after our first WINDOW_UPDATE.
const CONN_WINDOW: u32 = 1 << 30;
/// The largest frame payload we accept (SETTINGS_MAX_FRAME_SIZE is left at 16 KiB; the
/// bound only protects against a broken peer).
const MAX_PAYLOAD: usize = 1 << 24;

fn frame_header(out: &mut Vec<u8>, len: usize, ty: u8, flags: u8, sid: u32) {
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(ty);
    out.push(flags);
    out.extend_from_slice(&sid.to_be_bytes());
}

fn window_update(out: &mut Vec<u8>, sid: u32, increment: u32) {
    frame_header(out, 4, WINDOW_UPDATE, 0, sid);
    out.extend_from_slice(&increment.to_be_bytes());
}

/// An HPACK string literal without Huffman coding (lengths below 127 bytes).
fn hpack_str(out: &mut Vec<u8>, s: &[u8]) {
    assert!(s.len() < 127, "header value too long for a one-byte length");
    out.push(s.len() as u8);
    out.extend_from_slice(s);
}

/// The request headers of a `Chat` call, never indexed, so every stream sends the
/// same block.
fn request_headers(authority: &str) -> Vec<u8> {
    let mut b = vec![0x83, 0x86]; // :method POST, :scheme http (static table 3 and 6)
    b.push(0x04); // :path, literal without indexing, static name 4
    hpack_str(&mut b, wire::CHAT.name.as_bytes());
    b.push(0x01); // :authority, static name 1
    hpack_str(&mut b, authority.as_bytes());
    b.extend_from_slice(&[0x0f, 0x10]); // content-type, static name 31
    hpack_str(&mut b, b"application/grpc");
    b.push(0x00); // te: trailers, new name
    hpack_str(&mut b, b"te");
    hpack_str(&mut b, b"trailers");
    b
}

/// The sending half of a connection, shared by the streams and the reader thread.
struct Writer {
    sock: TcpStream,
    next_sid: u32,
    out: Vec<u8>,
}

impl Writer {
    /// Writes `out` (the socket is non-blocking: a full send buffer is waited out).
    fn flush_out(&mut self) -> io::Result<()> {
        let mut done = 0;
        let r = loop {
            match self.sock.write(&self.out[done..]) {
                Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    done += n;
                    if done == self.out.len() {
                        break Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_micros(100))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.out.clear();
        r
    }
}

/// One HTTP/2 connection.
struct Conn {
    writer: Mutex<Writer>,
    /// Streams opened but not yet seen by the reader: (stream id, member, room).
    opened: Mutex<Vec<(u32, usize, usize)>>,
    headers: Vec<u8>,
    read_half: Mutex<Option<TcpStream>>,
}

/// The members' connections.
pub struct H2Conns {
    conns: Vec<Arc<Conn>>,
    threads: usize,
    poll: Duration,
    readers: Vec<JoinHandle<Vec<Outcome>>>,
}

/// The sending side of one member's stream; the stream opens with the first frame.
pub struct StreamTx {
    conn: Arc<Conn>,
    member: usize,
    room: usize,
    sid: Option<u32>,
}

impl StreamTx {
    /// Sends `frame` as one gRPC message (opening the stream first if needed).
    pub fn send(&mut self, frame: &pb::ClientFrame) -> io::Result<()> {
        let msg = frame.encode_to_vec();
        let mut w = self.conn.writer.lock();
        let sid = match self.sid {
            Some(sid) => sid,
            None => {
                let sid = w.next_sid;
                if sid > (1 << 31) - 1 {
                    return Err(io::Error::other("stream ids exhausted"));
                }
                w.next_sid += 2;
                self.sid = Some(sid);
                self.conn.opened.lock().push((sid, self.member, self.room));
                let headers = &self.conn.headers;
                frame_header(&mut w.out, headers.len(), HEADERS, END_HEADERS, sid);
                w.out.extend_from_slice(headers);
                sid
            }
        };
        frame_header(&mut w.out, msg.len() + 5, DATA, 0, sid);
        w.out.push(0);
        w.out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        w.out.extend_from_slice(&msg);
        w.flush_out()
    }

    /// Resets the stream (CANCEL) if it was opened.
    pub fn cancel(&mut self) {
        if let Some(sid) = self.sid.take() {
            let mut w = self.conn.writer.lock();
            frame_header(&mut w.out, 4, RST_STREAM, 0, sid);
            w.out.extend_from_slice(&8u32.to_be_bytes());
            let _ = w.flush_out();
        }
    }
}

impl H2Conns {
    /// Opens `n` connections to `addr` and sends each its preface and settings; they
    /// will be read by `threads` pollers that sleep `poll` between rounds.
    pub fn connect(
        addr: &str,
        n: usize,
        wait: Duration,
        threads: usize,
        poll: Duration,
    ) -> Result<H2Conns, String> {
        if addr.starts_with("unix:") {
            return Err(format!(
                "--receivers h2 connects over TCP only, not to {addr}; give the server's host:port"
            ));
        }
        let sa = addr
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {addr}: {e}"))?
            .next()
            .ok_or_else(|| format!("cannot resolve {addr}"))?;
        let mut conns = Vec::new();
        for _ in 0..n.max(1) {
            let sock = TcpStream::connect_timeout(&sa, wait)
                .map_err(|e| format!("cannot reach a chat server at {addr} ({e})"))?;
            sock.set_nodelay(true).map_err(|e| e.to_string())?;
            sock.set_nonblocking(true).map_err(|e| e.to_string())?;
            let mut out = PREFACE.to_vec();
            frame_header(&mut out, 12, SETTINGS, 0, 0);
            out.extend_from_slice(&2u16.to_be_bytes()); // ENABLE_PUSH = 0
            out.extend_from_slice(&0u32.to_be_bytes());
            out.extend_from_slice(&4u16.to_be_bytes()); // INITIAL_WINDOW_SIZE
            out.extend_from_slice(&STREAM_WINDOW.to_be_bytes());
            window_update(&mut out, 0, CONN_WINDOW - 65_535);
            let read_half = sock.try_clone().map_err(|e| e.to_string())?;
            let mut w = Writer { sock, next_sid: 1, out };
            w.flush_out().map_err(|e| format!("cannot reach a chat server at {addr} ({e})"))?;
            conns.push(Arc::new(Conn {
                writer: Mutex::new(w),
                opened: Mutex::new(Vec::new()),
                headers: request_headers(addr),
                read_half: Mutex::new(Some(read_half)),
            }));
        }
        Ok(H2Conns { conns, threads, poll, readers: Vec::new() })
    }

    /// Starts the poller threads that read the connections (each its share); they
    /// report to `shared`. A poller drains every socket it owns, then sleeps for its
    /// poll interval: it never waits in a read, so the server's sends never have to wake
    /// it (on loopback the sender pays for waking the receiver).
    pub fn start(&mut self, shared: &Arc<Shared>, replay: bool) {
        let (threads, poll) = (self.threads.clamp(1, self.conns.len()), self.poll);
        let mut groups: Vec<Vec<Reader>> = (0..threads).map(|_| Vec::new()).collect();
        for (i, c) in self.conns.iter().enumerate() {
            let sock = c.read_half.lock().take().expect("started once");
            groups[i % threads].push(Reader::new(c.clone(), sock, shared.clone(), replay));
        }
        for (t, group) in groups.into_iter().enumerate() {
            let h = std::thread::Builder::new()
                .name(format!("bench-h2-{t}"))
                .spawn(move || poll_loop(group, poll))
                .expect("spawning an HTTP/2 reader thread");
            self.readers.push(h);
        }
    }

    /// A not-yet-opened stream for `member` on connection `member % n`.
    pub fn stream(&self, member: usize, room: usize) -> StreamTx {
        let conn = self.conns[member % self.conns.len()].clone();
        StreamTx { conn, member, room, sid: None }
    }

    /// Closes every connection and returns what each member saw.
    pub fn close(self) -> Vec<Outcome> {
        for c in &self.conns {
            let _ = c.writer.lock().sock.shutdown(Shutdown::Both);
        }
        let mut all = Vec::new();
        for h in self.readers {
            all.extend(h.join().expect("an HTTP/2 reader thread panicked"));
        }
        all
    }
}

/// A `grpc-message` value: UTF-8 with `%XX` escapes.
fn percent_decode(v: &[u8]) -> String {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        let hex = v.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (v[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Calls `f` with each complete gRPC message at the start of `src`; returns the bytes
/// used and the first error.
fn each_message(src: &[u8], f: &mut impl FnMut(&[u8]) -> Result<(), String>) -> (usize, Result<(), String>) {
    let mut used = 0;
    while let Some(head) = src.get(used..used + 5) {
        let n = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if head[0] != 0 {
            return (used, Err("a compressed message (none was asked for)".into()));
        }
        let Some(msg) = src.get(used + 5..used + 5 + n) else { break };
        if let Err(e) = f(msg) {
            return (used, Err(e));
        }
        used += 5 + n;
    }
    (used, Ok(()))
}

/// One stream as the reader sees it.
struct RxStream {
    o: Outcome,
    /// Bytes of an incomplete gRPC message.
    buf: Vec<u8>,
    /// Received since the last WINDOW_UPDATE.
    unacked: u32,
}

/// The gRPC status for an HTTP/2 RST_STREAM error code (gRPC's HTTP/2 mapping).
fn rst_status(code: u32) -> i32 {
    match code {
        7 => 14, // REFUSED_STREAM: UNAVAILABLE
        8 => 1,  // CANCEL: CANCELLED
        11 => 8, // ENHANCE_YOUR_CALM: RESOURCE_EXHAUSTED
        12 => 7, // INADEQUATE_SECURITY: PERMISSION_DENIED
        _ => 13, // INTERNAL
    }
}

/// Drives `readers` until every connection is closed; returns what each member saw.
fn poll_loop(mut readers: Vec<Reader>, poll: Duration) -> Vec<Outcome> {
    let mut out = Vec::new();
    while !readers.is_empty() {
        let mut i = 0;
        while i < readers.len() {
            match readers[i].pump() {
                Ok(_) => i += 1,
                Err(why) => out.extend(readers.swap_remove(i).close(why)),
            }
        }
        std::thread::sleep(poll);
    }
    out
}

struct Reader {
    conn: Arc<Conn>,
    sock: TcpStream,
    /// Received bytes; `..filled` are not yet handled (at most one partial frame
    /// between pumps).
    inbuf: Vec<u8>,
    filled: usize,
    sh: Arc<Shared>,
    replay: bool,
    streams: HashMap<u32, RxStream>,
    done: Vec<Outcome>,
    hpack: Decoder,
    /// Header block being collected (HEADERS then CONTINUATION frames) and its flags.
    block: Vec<u8>,
    block_sid: u32,
    block_end: bool,
    conn_unacked: u32,
}

impl Reader {
    fn new(conn: Arc<Conn>, sock: TcpStream, sh: Arc<Shared>, replay: bool) -> Reader {
        Reader {
            conn,
            sock,
            inbuf: vec![0; 256 << 10],
            filled: 0,
            sh,
            replay,
            streams: HashMap::new(),
            done: Vec::new(),
            hpack: Decoder::new(),
            block: Vec::new(),
            block_sid: 0,
            block_end: false,
            conn_unacked: 0,
        }
    }

    /// Reads what the socket has and handles every complete frame; `Ok(false)` when
    /// there was nothing to read.
    fn pump(&mut self) -> Result<bool, String> {
        let mut got = false;
        loop {
            if self.filled == self.inbuf.len() {
                self.inbuf.resize(self.inbuf.len() * 2, 0);
            }
            match self.sock.read(&mut self.inbuf[self.filled..]) {
                Ok(0) => return Err("the server closed the connection".into()),
                Ok(n) => {
                    self.filled += n;
                    got = true;
                }
                Err(e) => match e.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(format!("connection lost ({e})")),
                },
            }
        }
        let mut at = 0;
        let buf = std::mem::take(&mut self.inbuf);
        let r = loop {
            let Some(head) = buf[..self.filled].get(at..at + 9) else { break Ok(()) };
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            if len > MAX_PAYLOAD {
                break Err(format!("frame of {len} bytes"));
            }
            let Some(payload) = buf[..self.filled].get(at + 9..at + 9 + len) else { break Ok(()) };
            let sid = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            if let Err(e) = self.frame(head[3], head[4], sid, payload) {
                break Err(e);
            }
            at += 9 + len;
        };
        self.inbuf = buf;
        self.inbuf.copy_within(at..self.filled, 0);
        self.filled -= at;
        r.map(|()| got)
    }

    /// Ends every stream still open: the connection is gone.
    fn close(mut self, why: String) -> Vec<Outcome> {
        self.adopt_opened();
        let sids: Vec<u32> = self.streams.keys().copied().collect();
        for sid in sids {
            self.end(sid, Some(14), Some(why.clone()));
        }
        self.done
    }

    /// Moves streams opened since the last look into the reader's table.
    fn adopt_opened(&mut self) {
        for (sid, id, room) in self.conn.opened.lock().drain(..) {
            let o = Outcome { id, room, ..Outcome::default() };
            self.streams.insert(sid, RxStream { o, buf: Vec::new(), unacked: 0 });
        }
    }

    fn send(&self, f: impl FnOnce(&mut Vec<u8>)) -> Result<(), String> {
        let mut w = self.conn.writer.lock();
        f(&mut w.out);
        w.flush_out().map_err(|e| format!("cannot write ({e})"))
    }

    fn frame(&mut self, ty: u8, flags: u8, sid: u32, p: &[u8]) -> Result<(), String> {
        if !self.block.is_empty() && ty != CONTINUATION {
            return Err("header block interrupted".into());
        }
        match ty {
            DATA => self.data(flags, sid, p)?,
            HEADERS => {
                let mut p = p;
                let mut pad = 0;
                if flags & PADDED != 0 {
                    pad = *p.first().ok_or("empty padded frame")? as usize;
                    p = &p[1..];
                }
                if flags & PRIORITY != 0 {
                    p = p.get(5..).ok_or("short priority")?;
                }
                let p = p.get(..p.len().saturating_sub(pad)).ok_or("bad padding")?;
                self.block.extend_from_slice(p);
                self.block_sid = sid;
                self.block_end = flags & END_STREAM != 0;
                if flags & END_HEADERS != 0 {
                    self.headers_done()?;
                }
            }
            CONTINUATION => {
                self.block.extend_from_slice(p);
                if flags & END_HEADERS != 0 {
                    self.headers_done()?;
                }
            }
            RST_STREAM => {
                let code = p.get(..4).map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                self.adopt_opened();
                self.end(sid, Some(rst_status(code)), Some(format!("stream reset (HTTP/2 code {code})")));
            }
            SETTINGS if flags & ACK == 0 => self.send(|o| frame_header(o, 0, SETTINGS, ACK, 0))?,
            PING if flags & ACK == 0 => self.send(|o| {
                frame_header(o, p.len(), PING, ACK, 0);
                o.extend_from_slice(p);
            })?,
            GOAWAY => {
                let last =
                    p.get(..4).map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff);
                self.adopt_opened();
                let refused: Vec<u32> = self.streams.keys().copied().filter(|&s| s > last).collect();
                for sid in refused {
                    self.end(sid, Some(14), Some("the server is going away".into()));
                }
            }
            _ => {} // WINDOW_UPDATE (our sends are tiny), PRIORITY, unknown types.
        }
        Ok(())
    }

    fn data(&mut self, flags: u8, sid: u32, p: &[u8]) -> Result<(), String> {
        let total = p.len() as u32;
        let mut p = p;
        if flags & PADDED != 0 {
            let pad = *p.first().ok_or("empty padded frame")? as usize;
            p = p.get(1..p.len().saturating_sub(pad)).ok_or("bad padding")?;
        }
        self.conn_unacked += total;
        if self.conn_unacked >= CONN_WINDOW / 2 {
            let n = std::mem::take(&mut self.conn_unacked);
            self.send(|o| window_update(o, 0, n))?;
        }
        if !self.streams.contains_key(&sid) {
            self.adopt_opened();
        }
        let Some(st) = self.streams.get_mut(&sid) else {
            return Ok(()); // A stream we already ended (after a reset we sent).
        };
        st.unacked += total;
        let update =
            if st.unacked >= STREAM_WINDOW / 2 { Some(std::mem::take(&mut st.unacked)) } else { None };
        let (sh, replay) = (&self.sh, self.replay);
        let mut deliver = |m: &[u8]| {
            let mut items = Vec::with_capacity(4);
            wire::parse_event(m, 0, &mut items).map_err(|e| e.to_string())?;
            swarm::handle(&mut st.o, sh, replay, Incoming { items });
            Ok::<(), String>(())
        };
        // Whole messages are read straight from the frame; a partial one waits in `buf`.
        let failed = if st.buf.is_empty() {
            let (used, r) = each_message(p, &mut deliver);
            st.buf.extend_from_slice(&p[used..]);
            r.err()
        } else {
            let mut buf = std::mem::take(&mut st.buf);
            buf.extend_from_slice(p);
            let (used, r) = each_message(&buf, &mut deliver);
            buf.drain(..used);
            st.buf = buf;
            r.err()
        };
        if let Some(n) = update {
            self.send(|o| window_update(o, sid, n))?;
        }
        if let Some(why) = failed {
            self.send(|o| {
                frame_header(o, 4, RST_STREAM, 0, sid);
                o.extend_from_slice(&1u32.to_be_bytes()); // PROTOCOL_ERROR
            })?;
            self.end(sid, Some(13), Some(why));
        }
        if flags & END_STREAM != 0 {
            self.end(sid, Some(13), Some("the stream ended without trailers".into()));
        }
        Ok(())
    }

    fn headers_done(&mut self) -> Result<(), String> {
        let block = std::mem::take(&mut self.block);
        let fields = self.hpack.decode(&block).map_err(|e| format!("bad header block: {e}"))?;
        if !self.block_end {
            return Ok(()); // Response headers; a trailers-only response carries END_STREAM.
        }
        let field = |name: &str| fields.iter().find(|(n, _)| n == name.as_bytes()).map(|(_, v)| v);
        let status = field("grpc-status").and_then(|v| std::str::from_utf8(v).ok()?.parse::<i32>().ok());
        let message = field("grpc-message").map(|v| percent_decode(v));
        self.adopt_opened();
        let sid = self.block_sid;
        let code = Some(status.unwrap_or(2));
        self.end(
            sid,
            code,
            message.or_else(|| status.is_none().then(|| "trailers without grpc-status".into())),
        );
        Ok(())
    }

    /// Ends stream `sid` with `code` (0 = OK).
    fn end(&mut self, sid: u32, code: Option<i32>, message: Option<String>) {
        if let Some(mut st) = self.streams.remove(&sid) {
            let code = code.filter(|&c| c != 0);
            swarm::end_member(&mut st.o, &self.sh, code, message);
            self.done.push(st.o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_headers_are_a_valid_hpack_block() {
        let fields = Decoder::new().decode(&request_headers("127.0.0.1:50051")).expect("decodes");
        let text: Vec<(String, String)> = fields
            .iter()
            .map(|(n, v)| (String::from_utf8_lossy(n).into_owned(), String::from_utf8_lossy(v).into_owned()))
            .collect();
        let want = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/chat.v1.Chat/Chat"),
            (":authority", "127.0.0.1:50051"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ];
        assert_eq!(text, want.map(|(n, v)| (n.to_string(), v.to_string())));
    }

    #[test]
    fn messages_are_cut_at_their_length_prefixes() {
        let mut stream = Vec::new();
        for body in [&b"abc"[..], b"", b"hello world"] {
            stream.push(0);
            stream.extend_from_slice(&(body.len() as u32).to_be_bytes());
            stream.extend_from_slice(body);
        }
        // Every split point: whole messages are delivered, the rest is left over.
        for cut in 0..=stream.len() {
            let mut seen = Vec::new();
            let (used, r) = each_message(&stream[..cut], &mut |m: &[u8]| {
                seen.push(m.to_vec());
                Ok(())
            });
            assert!(r.is_ok());
            let ends = [0, 8, 13, 29];
            let whole = ends.iter().filter(|&&e| e > 0 && e <= cut).count();
            assert_eq!(seen.len(), whole, "cut at {cut}");
            assert_eq!(used, ends[whole], "cut at {cut}");
        }
        let mut compressed = stream.clone();
        compressed[0] = 1;
        assert!(each_message(&compressed, &mut |_: &[u8]| Ok(())).1.is_err());
    }

    #[test]
    fn status_messages_are_percent_decoded() {
        assert_eq!(percent_decode(b"limit of 4 reached"), "limit of 4 reached");
        assert_eq!(percent_decode(b"caf%C3%A9 100%25"), "caf\u{e9} 100%");
        assert_eq!(percent_decode(b"bad %zz and %4"), "bad %zz and %4");
    }

    #[test]
    fn reset_codes_map_to_grpc_statuses() {
        assert_eq!(rst_status(8), 1, "CANCEL");
        assert_eq!(rst_status(7), 14, "REFUSED_STREAM");
        assert_eq!(rst_status(11), 8, "ENHANCE_YOUR_CALM");
        assert_eq!(rst_status(2), 13, "INTERNAL_ERROR");
    }
}
