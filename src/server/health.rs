//! `grpc.health.v1.Health`, served like `chat.v1.Chat`: every call passes the call gate
//! when its headers arrive (see [`super::calls`]), which grpcio-health's own service,
//! registered with unary and server-streaming handlers, would not.

use std::collections::HashMap;
use std::sync::Arc;

use futures::channel::mpsc;
use futures::StreamExt as _;
use grpcio::{
    ClientStreamingSink, DuplexSink, Marshaller, Method, RpcStatus, RpcStatusCode, Service, ServiceBuilder,
};
use grpcio_health::proto::ServingStatus;
use grpcio_health::proto::{HealthCheckRequest, HealthCheckResponse};
use parking_lot::Mutex;

use super::calls::{one_request, one_request_method, CallGate, Replies, Request, Responder};

const PROST: Marshaller<HealthCheckResponse> = Marshaller { ser: grpcio::pr_ser, de: grpcio::pr_de };
const CHECK: Method<Request<HealthCheckRequest>, HealthCheckResponse> =
    one_request_method(Replies::One, "/grpc.health.v1.Health/Check", PROST);
const WATCH: Method<Request<HealthCheckRequest>, HealthCheckResponse> =
    one_request_method(Replies::Stream, "/grpc.health.v1.Health/Watch", PROST);

/// The serving status of each service name, and the `Watch` calls to tell of changes.
#[derive(Default)]
pub struct Health {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Once set, every status is `NOT_SERVING` for good.
    shut_down: bool,
    status: HashMap<String, ServingStatus>,
    watchers: Vec<(String, mpsc::UnboundedSender<ServingStatus>)>,
}

impl State {
    fn tell(&mut self, service: &str, status: ServingStatus) {
        // A watcher whose call ended has dropped its receiver.
        self.watchers.retain(|(_, tx)| !tx.is_closed());
        for (_, tx) in self.watchers.iter().filter(|(name, _)| name == service) {
            let _ = tx.unbounded_send(status);
        }
    }
}

impl Health {
    /// Sets the status of `service` ("" is the server as a whole); ignored after shutdown.
    pub fn set(&self, service: &str, status: ServingStatus) {
        let mut state = self.state.lock();
        if !state.shut_down {
            state.status.insert(service.to_owned(), status);
            state.tell(service, status);
        }
    }

    /// Every service is `NOT_SERVING` from now on.
    pub fn shut_down(&self) {
        let mut state = self.state.lock();
        state.shut_down = true;
        let names: Vec<String> = state.status.keys().cloned().collect();
        for name in names {
            state.status.insert(name.clone(), ServingStatus::NotServing);
            state.tell(&name, ServingStatus::NotServing);
        }
    }

    fn status(&self, service: &str) -> Option<ServingStatus> {
        self.state.lock().status.get(service).copied()
    }

    /// The grpcio service: `Check` answers the status or `NOT_FOUND`; `Watch` sends the
    /// status (`SERVICE_UNKNOWN` for a name without one) and then each change.
    pub fn service(self: &Arc<Self>, gate: &Arc<CallGate>) -> Service {
        let (check, watch) = (Arc::clone(self), Arc::clone(self));
        ServiceBuilder::new()
            .add_client_streaming_handler(
                &CHECK,
                one_request(
                    gate,
                    move |_peer, req: HealthCheckRequest, responder: Responder<ClientStreamingSink<_>>| {
                        let reply = match check.status(&req.service) {
                            Some(status) => Ok(response(status)),
                            None => Err(RpcStatus::with_message(
                                RpcStatusCode::NOT_FOUND,
                                "unknown service".into(),
                            )),
                        };
                        responder.answer(reply)
                    },
                ),
            )
            .add_duplex_streaming_handler(
                &WATCH,
                one_request(
                    gate,
                    move |_peer, req: HealthCheckRequest, responder: Responder<DuplexSink<_>>| {
                        let (tx, rx) = mpsc::unbounded();
                        let now = {
                            let mut state = watch.state.lock();
                            state.watchers.retain(|(_, tx)| !tx.is_closed());
                            let now = state.status.get(&req.service).copied();
                            state.watchers.push((req.service, tx));
                            now.unwrap_or(ServingStatus::ServiceUnknown)
                        };
                        responder.stream(futures::stream::iter([now]).chain(rx).map(response))
                    },
                ),
            )
            .build()
    }
}

fn response(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse { status: status.into() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchers_hear_their_service_change_and_shutdown_makes_everything_not_serving() {
        let health = Health::default();
        health.set("chat.v1.Chat", ServingStatus::Serving);
        let (tx, mut rx) = mpsc::unbounded();
        let (other_tx, mut other_rx) = mpsc::unbounded();
        let (ended_tx, ended_rx) = mpsc::unbounded();
        drop(ended_rx);
        health.state.lock().watchers.extend([
            ("chat.v1.Chat".into(), tx),
            ("other".into(), other_tx),
            ("chat.v1.Chat".into(), ended_tx),
        ]);
        health.set("chat.v1.Chat", ServingStatus::NotServing);
        assert_eq!(rx.try_recv().expect("a change"), ServingStatus::NotServing);
        assert_eq!(health.state.lock().watchers.len(), 2, "an ended watcher is forgotten");

        health.set("chat.v1.Chat", ServingStatus::Serving);
        health.shut_down();
        assert_eq!(rx.try_recv().expect("a change"), ServingStatus::Serving);
        assert_eq!(rx.try_recv().expect("a change"), ServingStatus::NotServing);
        assert!(other_rx.try_recv().is_err(), "a service without a status has nothing to change");
        health.set("chat.v1.Chat", ServingStatus::Serving);
        assert_eq!(health.status("chat.v1.Chat"), Some(ServingStatus::NotServing), "for good");
        assert!(rx.try_recv().is_err(), "nothing changed after shutdown");
    }
}
