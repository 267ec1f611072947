"""A Python grpcio client of chat.v1, generated from proto/ at run time.

Usage: python_client.py PROTO_DIR OUT_DIR SERVER_ADDR
Exits non-zero (with the failed check) on any mismatch; prints INTEROP OK at the end.
"""
import os
import queue
import sys

proto_dir, out_dir, addr = sys.argv[1:4]
from grpc_tools import protoc  # noqa: E402

rc = protoc.main(["protoc", "-I" + proto_dir, "--python_out=" + out_dir, "--grpc_python_out=" + out_dir,
                  os.path.join(proto_dir, "chat/v1/chat.proto")])
assert rc == 0, "protoc failed"
sys.path.insert(0, out_dir)

import grpc  # noqa: E402
from chat.v1 import chat_pb2 as pb, chat_pb2_grpc as rpc  # noqa: E402

stub = rpc.ChatStub(grpc.insecure_channel(addr))


def code_of(call):
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    raise AssertionError("expected an error")


joined = stub.Join(pb.JoinRequest(user="py", room="interop"))
assert joined.session and joined.members == ["py"] and joined.history_limit == 500, joined
assert stub.Send(pb.SendRequest(session=joined.session, text="one", client_msg_id="a")).seq == 1
again = stub.Send(pb.SendRequest(session=joined.session, text="one", client_msg_id="a"))
assert (again.seq, again.duplicate) == (1, True), again
assert [m.text for m in stub.History(pb.HistoryRequest(room="interop"))] == ["one"]
assert code_of(lambda: stub.Join(pb.JoinRequest(user="py", room="interop"))) == grpc.StatusCode.ALREADY_EXISTS
assert code_of(lambda: stub.Join(pb.JoinRequest(user="x", room="bad room"))) == grpc.StatusCode.INVALID_ARGUMENT
assert code_of(lambda: stub.Send(pb.SendRequest(session="nope", text="x"))) == grpc.StatusCode.NOT_FOUND

# The bidirectional stream: implicit join, replay, own echo, leave -> OK.
acked = queue.Queue()


def frames():
    yield pb.ClientFrame(hello=pb.Hello(user="py2", room="interop"))
    yield pb.ClientFrame(post=pb.Post(text="two", client_msg_id="b"))
    acked.get(timeout=20)
    yield pb.ClientFrame(leave=pb.Leave())


seen = []
for ev in stub.Chat(frames(), timeout=30):
    events = list(ev.batch.events) if ev.WhichOneof("event") == "batch" else [ev]
    for e in events:
        kind = e.WhichOneof("event")
        assert kind != "batch", "batches must not be nested"
        seen.append(kind)
        if kind == "message":
            seen.append((e.message.seq, e.message.text))
            if e.message.client_msg_id == "b":
                acked.put(True)
assert seen[0] == "welcome", seen
assert (1, "one") in seen and (2, "two") in seen, seen

members = stub.ListMembers(pb.ListMembersRequest(room="interop")).members
assert list(members) == ["py"], members
rooms = [(r.name, r.members, r.last_seq) for r in stub.ListRooms(pb.ListRoomsRequest()).rooms]
assert ("interop", 1, 2) in rooms, rooms
stub.Leave(pb.LeaveRequest(session=joined.session))
assert code_of(lambda: stub.Send(pb.SendRequest(session=joined.session, text="x"))) == grpc.StatusCode.FAILED_PRECONDITION
print("INTEROP OK")
