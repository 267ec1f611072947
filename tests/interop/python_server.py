"""A chat.v1 server in Python grpcio, in the design grpc-chat replaces: a pool of worker
threads with one worker held by each open stream, one queue per member, one event per
write, one lock for everything.

`tests/python_interop.rs` drives it with `chat-bench --server`, so that the bench is shown
to work against a server that speaks chat.v1 but is not this crate's: no batches, no
presence limit of ours, its own status texts. It keeps the rules the contract states:
consecutive `seq`s per room in every member's order, history replayed after `since_seq`,
a member's own posts echoed to it, `client_msg_id` idempotent on `Send`, most statuses of
DESIGN.md section 5 (a session that has left is simply unknown: NOT_FOUND). It leaves out
rate limits, send-queue limits and the resume grace: a session ends with its stream (or
with `Leave`; one from `Join` lives until it attaches).

Usage: python_server.py PROTO_DIR OUT_DIR [WORKERS]
Listens on 127.0.0.1 on a free port, prints `LISTENING <port>` when ready, and serves
until killed. WORKERS (default 32, the pool size of the Python programs replaced) bounds
the calls served at once: a stream past it waits for a worker.
"""
import collections
import os
import queue
import re
import secrets
import sys
import threading
import time
import unicodedata
from concurrent import futures

proto_dir, out_dir = sys.argv[1:3]
workers = int(sys.argv[3]) if len(sys.argv) > 3 else 32
from grpc_tools import protoc  # noqa: E402

rc = protoc.main(["protoc", "-I" + proto_dir, "--python_out=" + out_dir, "--grpc_python_out=" + out_dir,
                  os.path.join(proto_dir, "chat/v1/chat.proto")])
assert rc == 0, "protoc failed"
sys.path.insert(0, out_dir)

import grpc  # noqa: E402
from chat.v1 import chat_pb2 as pb, chat_pb2_grpc as rpc  # noqa: E402

HISTORY = 500
PRESENCE_LIMIT = 100
EPOCH = time.time_ns() // 1000
ROOM_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
END = object()  # put in a member's queue: end its stream with OK


class Refused(Exception):
    def __init__(self, code, text):
        super().__init__(text)
        self.code, self.text = code, text


class Room:
    def __init__(self, name):
        self.name, self.seq = name, 0
        self.history = collections.deque(maxlen=HISTORY)
        self.members = {}  # user -> Session
        self.listeners = set()  # queues of attached streams


class Session:
    def __init__(self, user, room):
        self.token, self.user, self.room = secrets.token_hex(16), user, room
        self.sent = {}  # client_msg_id -> seq
        self.queue = None  # the attached stream's queue
        self.attached_before = False


lock = threading.Lock()
rooms = {}
sessions = {}


def check_user(user):
    if not 1 <= len(user) <= 32 or any(unicodedata.category(c) == "Cc" for c in user):
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "a user name is 1-32 characters, none a control character")


def check_room(room):
    if not ROOM_NAME.fullmatch(room):
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "a room name is 1-64 characters of [A-Za-z0-9._-]")


def check_text(text):
    if not 1 <= len(text.encode()) <= 4096 or any(unicodedata.category(c) == "Cc" and c not in "\n\t" for c in text):
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "a text is 1-4096 bytes, no control characters but newline and tab")


def members_of(room):
    return sorted(room.members) if len(room.members) <= PRESENCE_LIMIT else []


def announce(room, user, joined):
    """Presence to every attached member; caller holds the lock."""
    if len(room.members) <= PRESENCE_LIMIT:
        ev = pb.ServerEvent(presence=pb.Presence(room=room.name, user=user, joined=joined))
        for q in room.listeners:
            q.put(ev)


def join(user, room_name):
    check_user(user)
    check_room(room_name)
    with lock:
        room = rooms.setdefault(room_name, Room(room_name))
        if user in room.members:
            raise Refused(grpc.StatusCode.ALREADY_EXISTS, f"{user} is already in {room_name}")
        s = Session(user, room)
        room.members[user] = s
        sessions[s.token] = s
        announce(room, user, True)
        return s


def end_session(s):
    """Caller holds the lock."""
    if sessions.pop(s.token, None) is not None:
        del s.room.members[s.user]
        if s.queue is not None:
            s.room.listeners.discard(s.queue)
        announce(s.room, s.user, False)


def session_of(token):
    s = sessions.get(token)
    if s is None:
        raise Refused(grpc.StatusCode.NOT_FOUND, "no such session")
    return s


def post(token, text, client_msg_id):
    """Returns (seq, duplicate)."""
    with lock:
        s = session_of(token)
        check_text(text)
        if client_msg_id and client_msg_id in s.sent:
            return s.sent[client_msg_id], True
        room = s.room
        room.seq += 1
        msg = pb.ChatMessage(room=room.name, user=s.user, text=text, seq=room.seq,
                             sent_at_ms=time.time_ns() // 1_000_000, client_msg_id=client_msg_id)
        room.history.append(msg)
        if client_msg_id:
            s.sent[client_msg_id] = room.seq
        ev = pb.ServerEvent(message=msg)
        for q in room.listeners:
            q.put(ev)
        return room.seq, False


def attach(room, since_seq, epoch, q):
    """Adds `q` to the room's listeners; returns (welcome fields, replay). Caller holds the lock."""
    retained = list(room.history)
    gap = False
    if epoch not in (0, EPOCH):
        since_seq, gap = 0, since_seq > 0
    elif retained and since_seq + 1 < retained[0].seq:
        gap = since_seq > 0
    room.listeners.add(q)
    fields = dict(room=room.name, members=members_of(room), last_seq=room.seq, epoch=EPOCH, gap=gap,
                  member_count=len(room.members), history_limit=HISTORY)
    return fields, [pb.ServerEvent(message=m) for m in retained if m.seq > since_seq]


def detach(s, q):
    with lock:
        if s is not None and s.queue is q:
            end_session(s)


def stream_events(context, q, first):
    """Yields `first`, then what arrives in `q`, until END or the call ends."""
    context.add_callback(lambda: q.put(END))
    yield from first
    while True:
        ev = q.get()
        if ev is END:
            return
        if isinstance(ev, Refused):
            context.abort(ev.code, ev.text)
        yield ev


class Chat(rpc.ChatServicer):
    def Join(self, request, context):
        try:
            s = join(request.user, request.room)
        except Refused as r:
            context.abort(r.code, r.text)
        with lock:
            room = s.room
            return pb.JoinReply(session=s.token, members=members_of(room), last_seq=room.seq, epoch=EPOCH,
                                history_limit=HISTORY, member_count=len(room.members))

    def Send(self, request, context):
        try:
            seq, duplicate = post(request.session, request.text, request.client_msg_id)
        except Refused as r:
            context.abort(r.code, r.text)
        return pb.SendReply(seq=seq, duplicate=duplicate)

    def Leave(self, request, context):
        with lock:
            s = sessions.get(request.session)
            if s is None:
                context.abort(grpc.StatusCode.NOT_FOUND, "no such session")
            end_session(s)
            if s.queue is not None:
                s.queue.put(END)
        return pb.LeaveReply()

    def History(self, request, context):
        with lock:
            room = rooms.get(request.room)
            retained = [m for m in room.history if m.seq > request.since_seq] if room else []
        if request.limit:
            retained = retained[-request.limit:]
        yield from retained

    def ListRooms(self, request, context):
        with lock:
            return pb.ListRoomsReply(rooms=[pb.RoomInfo(name=n, members=len(r.members), last_seq=r.seq)
                                            for n, r in sorted(rooms.items())])

    def ListMembers(self, request, context):
        with lock:
            room = rooms.get(request.room)
            return pb.ListMembersReply(members=sorted(room.members) if room else [])

    def Subscribe(self, request, context):
        q = queue.Queue()
        with lock:
            if request.session:
                s = sessions.get(request.session)
                if s is None or (request.room and request.room != s.room.name):
                    context.abort(grpc.StatusCode.NOT_FOUND, "no such session in that room")
                s.queue, s.attached_before, resumed = q, True, s.attached_before
                fields, replay = attach(s.room, request.since_seq, request.epoch, q)
                welcome = pb.Welcome(session=s.token, user=s.user, resumed=resumed, **fields)
            else:
                room = rooms.get(request.room)
                if room is None:
                    check_room(request.room)
                    room = rooms.setdefault(request.room, Room(request.room))
                fields, replay = attach(room, request.since_seq, request.epoch, q)
                welcome = pb.Welcome(**fields)
        try:
            yield from stream_events(context, q, [pb.ServerEvent(welcome=welcome)] + replay)
        finally:
            with lock:
                (s.room if request.session else room).listeners.discard(q)

    def Chat(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("frame") != "hello":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first frame must be a hello")
        hello, q = first.hello, queue.Queue()
        try:
            if hello.session:
                with lock:
                    s = session_of(hello.session)
            else:
                s = join(hello.user, hello.room)
        except Refused as r:
            context.abort(r.code, r.text)
        with lock:
            if s.queue is not None:
                s.room.listeners.discard(s.queue)
                s.queue.put(Refused(grpc.StatusCode.ABORTED, "the session attached to another stream"))
            s.queue, s.attached_before, resumed = q, True, s.attached_before
            fields, replay = attach(s.room, hello.since_seq, hello.epoch, q)
        welcome = pb.ServerEvent(welcome=pb.Welcome(session=s.token, user=s.user, resumed=resumed, **fields))
        threading.Thread(target=read_frames, args=(request_iterator, s, q), daemon=True).start()
        try:
            yield from stream_events(context, q, [welcome] + replay)
        finally:
            detach(s, q)


def read_frames(frames, s, q):
    """The posts and the leave of one `Chat` stream, read beside the worker that writes it."""
    try:
        for frame in frames:
            kind = frame.WhichOneof("frame")
            if kind == "post":
                try:
                    post(s.token, frame.post.text, frame.post.client_msg_id)
                except Refused as r:
                    q.put(pb.ServerEvent(notice=pb.Notice(text=r.text, code=r.code.value[0],
                                                          client_msg_id=frame.post.client_msg_id)))
            elif kind == "leave":
                with lock:
                    end_session(s)
                q.put(END)
                return
            else:
                q.put(Refused(grpc.StatusCode.FAILED_PRECONDITION, "hello was already sent on this stream"))
                return
    except grpc.RpcError:
        pass  # the call ended; its callback has ended the stream


server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
rpc.add_ChatServicer_to_server(Chat(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(f"LISTENING {port}", flush=True)
server.wait_for_termination()
