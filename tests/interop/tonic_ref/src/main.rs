//! A straightforward tonic/tokio server on chat.v1, for comparison only (BENCHMARKS.md,
//! "A tonic server measured with chat-bench"): the kind of server the reference
//! figures name, "a straightforward tonic/tokio server on the same contract". Its design
//! is the plainest one: rooms in one mutex, one unbounded channel per member, every event
//! cloned to every member and written as its own gRPC message, presence sent to everyone.
//!
//! It serves `Chat` only, which is all that `chat-bench fanout` and `streams` use:
//! `Hello` gets a `Welcome`, each `Post` gets the room's next `seq` and goes to every
//! member, `Leave` or the stream's end removes the member. There is no history, no
//! resume, no limits and no rate limiting; the other methods answer `UNIMPLEMENTED`.
//!
//! Usage: `tonic-ref [ADDR]` (default 127.0.0.1:50551).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_stream::{wrappers::UnboundedReceiverStream, Stream};
use tonic::{Request, Response, Status, Streaming};

pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/chat.v1.rs"));
}
use pb::chat_server::{Chat, ChatServer};
use pb::{client_frame::Frame, server_event::Event, ServerEvent};

type Tx = mpsc::UnboundedSender<Result<ServerEvent, Status>>;

#[derive(Default)]
struct Room {
    seq: u64,
    members: Vec<(u64, String, Tx)>,
}

#[derive(Default)]
struct Svc {
    rooms: Arc<Mutex<HashMap<String, Room>>>,
    next: std::sync::atomic::AtomicU64,
}

fn ev(e: Event) -> ServerEvent {
    ServerEvent { event: Some(e) }
}

type Out<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Chat for Svc {
    type ChatStream = Out<ServerEvent>;
    type HistoryStream = Out<pb::ChatMessage>;
    type SubscribeStream = Out<ServerEvent>;

    async fn chat(
        &self,
        req: Request<Streaming<pb::ClientFrame>>,
    ) -> Result<Response<Self::ChatStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        let rooms = self.rooms.clone();
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::spawn(async move {
            let mut joined: Option<(String, String)> = None;
            while let Ok(Some(frame)) = inbound.message().await {
                match frame.frame {
                    Some(Frame::Hello(h)) if joined.is_none() => {
                        let mut rooms = rooms.lock().unwrap();
                        let room = rooms.entry(h.room.clone()).or_default();
                        let presence = ev(Event::Presence(pb::Presence {
                            room: h.room.clone(),
                            user: h.user.clone(),
                            joined: true,
                        }));
                        for (_, _, m) in &room.members {
                            let _ = m.send(Ok(presence.clone()));
                        }
                        room.members.push((id, h.user.clone(), tx.clone()));
                        let welcome = pb::Welcome {
                            session: format!("s{id}"),
                            user: h.user.clone(),
                            room: h.room.clone(),
                            members: room.members.iter().map(|(_, u, _)| u.clone()).collect(),
                            last_seq: room.seq,
                            epoch: 1,
                            resumed: false,
                            gap: false,
                            member_count: room.members.len() as u32,
                            history_limit: 0,
                        };
                        let _ = tx.send(Ok(ev(Event::Welcome(welcome))));
                        joined = Some((h.room, h.user));
                    }
                    Some(Frame::Post(p)) => {
                        let Some((room_name, user)) = &joined else {
                            let _ = tx.send(Err(Status::failed_precondition("hello first")));
                            break;
                        };
                        let mut rooms = rooms.lock().unwrap();
                        let room = rooms.get_mut(room_name).expect("joined room exists");
                        room.seq += 1;
                        let msg = ev(Event::Message(pb::ChatMessage {
                            room: room_name.clone(),
                            user: user.clone(),
                            text: p.text,
                            seq: room.seq,
                            sent_at_ms: 0,
                            client_msg_id: p.client_msg_id,
                        }));
                        for (_, _, m) in &room.members {
                            let _ = m.send(Ok(msg.clone()));
                        }
                    }
                    Some(Frame::Leave(_)) => break,
                    _ => {
                        let _ = tx.send(Err(Status::invalid_argument("unexpected frame")));
                        break;
                    }
                }
            }
            if let Some((room_name, user)) = joined {
                let mut rooms = rooms.lock().unwrap();
                if let Some(room) = rooms.get_mut(&room_name) {
                    room.members.retain(|(m, _, _)| *m != id);
                    let presence = ev(Event::Presence(pb::Presence { room: room_name, user, joined: false }));
                    for (_, _, m) in &room.members {
                        let _ = m.send(Ok(presence.clone()));
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }

    async fn join(&self, _: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        Err(Status::unimplemented("not in this reference server"))
    }
    async fn history(&self, _: Request<pb::HistoryRequest>) -> Result<Response<Self::HistoryStream>, Status> {
        Err(Status::unimplemented("not in this reference server"))
    }
    async fn send(&self, _: Request<pb::SendRequest>) -> Result<Response<pb::SendReply>, Status> {
        Err(Status::unimplemented("not in this reference server"))
    }
    async fn subscribe(
        &self,
        _: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        Err(Status::unimplemented("not in this reference server"))
    }
    async fn leave(&self, _: Request<pb::LeaveRequest>) -> Result<Response<pb::LeaveReply>, Status> {
        Err(Status::unimplemented("not in this reference server"))
    }
    async fn list_rooms(
        &self,
        _: Request<pb::ListRoomsRequest>,
    ) -> Result<Response<pb::ListRoomsReply>, Status> {
        Err(Status::unimplemented("not in this reference server"))
    }
    async fn list_members(
        &self,
        _: Request<pb::ListMembersRequest>,
    ) -> Result<Response<pb::ListMembersReply>, Status> {
        Err(Status::unimplemented("not in this reference server"))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:50551".into()).parse()?;
    eprintln!("tonic-ref listening on {addr}");
    tonic::transport::Server::builder().add_service(ChatServer::new(Svc::default())).serve(addr).await?;
    Ok(())
}
