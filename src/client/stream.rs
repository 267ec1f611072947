//! One `Chat` call driven by two threads: a sender that owns the request sink and a
//! receiver that owns the response stream. Sending never waits for receiving.

use std::thread;

use crossbeam_channel::{unbounded, Receiver, Sender};
use futures::executor::block_on;
use futures::{SinkExt, StreamExt};
use grpcio::{CallOption, WriteFlags};

use super::convert;
use super::error::{Code, Status};
use super::session::{HelloParams, StreamId};
use super::types::Incoming;
use crate::pb;

/// Stack size of the two threads of a stream: they only move frames.
const STACK: usize = 256 * 1024;

/// What the sender thread is asked to do.
pub(crate) enum Out {
    /// Write a frame.
    Frame(pb::ClientFrame),
    /// Half-close the request side (after a leave frame).
    Close,
}

/// What a stream reports to its driver.
pub(crate) enum StreamReport {
    /// Events received, batches flattened, in order.
    Events(StreamId, Vec<Incoming>),
    /// The call ended with this status (OK when the server ended it normally).
    Ended(StreamId, Status),
}

/// The driver's side of an open stream. Dropping it cancels the call (unless it was
/// half-closed after a leave).
pub(crate) struct StreamHandle {
    out: Sender<Out>,
}

impl StreamHandle {
    /// Queues a frame; a stream that has already failed drops it silently (its end is
    /// reported by the receiver).
    pub(crate) fn send(&self, frame: pb::ClientFrame) {
        let _ = self.out.send(Out::Frame(frame));
    }

    /// Half-closes the request side once queued frames are written.
    pub(crate) fn close(&self) {
        let _ = self.out.send(Out::Close);
    }
}

/// Opens a `Chat` call, queues `hello` as its first frame and starts its threads.
/// Reports go to `reports`; `wrap` turns them into the driver's message type.
pub(crate) fn open<M: Send + 'static>(
    stub: &pb::ChatClient,
    id: StreamId,
    hello: &HelloParams,
    reports: Sender<M>,
    wrap: fn(StreamReport) -> M,
) -> Result<StreamHandle, Status> {
    let (sink, receiver) = stub.chat_opt(CallOption::default()).map_err(|e| Status::from_grpc(&e))?;
    let (out_tx, out_rx) = unbounded();
    out_tx.send(Out::Frame(convert::hello(hello))).expect("the receiver is held right here");
    thread::Builder::new()
        .name(format!("chat-send-{}", id.0))
        .stack_size(STACK)
        .spawn(move || run_sender(sink, out_rx))
        .map_err(|e| Status::new(Code::Internal, format!("cannot start a thread: {e}")))?;
    thread::Builder::new()
        .name(format!("chat-recv-{}", id.0))
        .stack_size(STACK)
        .spawn(move || run_receiver(id, receiver, reports, wrap))
        .map_err(|e| Status::new(Code::Internal, format!("cannot start a thread: {e}")))?;
    Ok(StreamHandle { out: out_tx })
}

fn run_sender(mut sink: grpcio::ClientDuplexSender<pb::ClientFrame>, frames: Receiver<Out>) {
    loop {
        let first = match frames.recv() {
            Ok(out) => out,
            Err(_) => {
                // The driver dropped the stream: cancel the call so the receiver ends.
                sink.cancel();
                return;
            }
        };
        // Write everything queued in one go, flushing with the last frame.
        let mut batch = vec![first];
        batch.extend(frames.try_iter());
        let mut close = false;
        let frames_only: Vec<pb::ClientFrame> = batch
            .into_iter()
            .filter_map(|o| match o {
                Out::Frame(f) => Some(f),
                Out::Close => {
                    close = true;
                    None
                }
            })
            .collect();
        let n = frames_only.len();
        for (i, frame) in frames_only.into_iter().enumerate() {
            let last = i + 1 == n;
            let item = (frame, WriteFlags::default().buffer_hint(!last));
            let written = if last { block_on(sink.send(item)) } else { block_on(sink.feed(item)) };
            if written.is_err() {
                return; // the call is over; the receiver reports how it ended
            }
        }
        if close {
            let _ = block_on(sink.close());
            // Keep waiting so that dropping the driver's handle does not cancel a call
            // that ends normally; nothing more is written.
            while frames.recv().is_ok() {}
            return;
        }
    }
}

fn run_receiver<M>(
    id: StreamId,
    mut receiver: grpcio::ClientDuplexReceiver<pb::ServerEvent>,
    reports: Sender<M>,
    wrap: fn(StreamReport) -> M,
) {
    loop {
        let report = match block_on(receiver.next()) {
            Some(Ok(event)) => {
                let mut events = Vec::with_capacity(1);
                convert::flatten(event, &mut events);
                StreamReport::Events(id, events)
            }
            Some(Err(e)) => StreamReport::Ended(id, Status::from_grpc(&e)),
            None => StreamReport::Ended(id, Status::new(Code::Ok, "")),
        };
        let ended = matches!(report, StreamReport::Ended(..));
        if reports.send(wrap(report)).is_err() || ended {
            return;
        }
    }
}
