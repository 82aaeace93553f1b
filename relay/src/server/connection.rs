//! One WebSocket connection: bytes in, decoded messages to the core; messages from the core,
//! encoded, out. Garbage gets a clear close reason and ends only this connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use fieldsync_schema::signing::Verifier;
use fieldsync_schema::wire::{ErrorCode, MAX_PINGS_IN_FLIGHT, MAX_PULLS_IN_FLIGHT, MAX_PUSHES_IN_FLIGHT};
use fieldsync_schema::{ClientMessage, RelayMessage};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Notify, mpsc};

use super::core_thread::{CoreInput, Outbound};
use super::{INBOUND_BUDGET_BYTES, MAX_FRAME_BYTES, SEND_QUEUE, Shared};
use crate::core::{CloseReason, Prechecked};

/// A connection that says nothing for this long is closed (devices ping while idle).
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Per-connection socket buffers: small, so that thousands of idle devices stay cheap.
const SOCKET_BUFFER: usize = 16 * 1024;

pub(crate) async fn upgrade(ws: WebSocketUpgrade, State(shared): State<Shared>) -> Response {
    ws.max_frame_size(MAX_FRAME_BYTES)
        .max_message_size(MAX_FRAME_BYTES)
        .read_buffer_size(SOCKET_BUFFER)
        .write_buffer_size(SOCKET_BUFFER)
        .max_write_buffer_size(MAX_FRAME_BYTES + SOCKET_BUFFER)
        .on_upgrade(move |socket| serve(socket, shared))
}

fn close_frame(reason: &CloseReason) -> Message {
    Message::Close(Some(CloseFrame {
        code: reason.code,
        reason: reason.reason.clone().into(),
    }))
}

/// Requests this connection forwarded to the core and has not yet seen answered. Counting them
/// here, where both directions pass, bounds what one device can make the relay build and hold:
/// each pull page can be megabytes, and a client that pipelines pulls without reading would
/// otherwise have the core build thousands of them (the slow-reader attack).
#[derive(Debug, Default)]
struct InFlight {
    pulls: usize,
    pushes: usize,
    pings: usize,
}

impl InFlight {
    /// Counts a request, or says which limit it exceeds.
    fn admit(&mut self, msg: &ClientMessage) -> Result<(), String> {
        let (count, limit, what) = match msg {
            ClientMessage::Pull { .. } => (&mut self.pulls, MAX_PULLS_IN_FLIGHT, "pulls"),
            ClientMessage::Push { .. } => (&mut self.pushes, MAX_PUSHES_IN_FLIGHT, "pushes"),
            ClientMessage::Ping { .. } => (&mut self.pings, MAX_PINGS_IN_FLIGHT, "pings"),
            _ => return Ok(()),
        };
        if *count >= limit {
            return Err(format!("more than {limit} {what} in flight: read the answers first"));
        }
        *count += 1;
        Ok(())
    }

    fn answered(&mut self, msg: &RelayMessage) {
        let count = match msg {
            RelayMessage::Changes { .. } => &mut self.pulls,
            // The only error answering a request without closing is a failed pull page.
            RelayMessage::Error {
                code: ErrorCode::Internal,
                ..
            } => &mut self.pulls,
            RelayMessage::PushResult { .. } | RelayMessage::PushDeferred { .. } => &mut self.pushes,
            RelayMessage::Pong { .. } => &mut self.pings,
            _ => return,
        };
        *count = count.saturating_sub(1);
    }
}

async fn serve(socket: WebSocket, shared: Shared) {
    let conn = shared.new_conn_id();
    let (tx, mut rx) = mpsc::channel::<Outbound>(SEND_QUEUE);
    let kill = Arc::new(Notify::new());
    let queued = Arc::new(AtomicUsize::new(0));
    if shared
        .core_tx
        .send(CoreInput::Open {
            conn,
            tx,
            kill: kill.clone(),
            queued_bytes: queued.clone(),
        })
        .await
        .is_err()
    {
        return;
    }
    let (mut sink, mut stream) = socket.split();
    let mut verifier: Option<Verifier> = None;
    let mut in_flight = InFlight::default();
    let closing: Option<CloseReason> = loop {
        tokio::select! {
            incoming = tokio::time::timeout(IDLE_TIMEOUT, stream.next()) => match incoming {
                Err(_) => break Some(CloseReason::normal("idle timeout")),
                Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => break None,
                Ok(Some(Ok(Message::Binary(bytes)))) => match ClientMessage::decode(&bytes) {
                    Ok(msg) => {
                        if let Err(reason) = in_flight.admit(&msg) {
                            tracing::info!(conn, %reason, "request limit exceeded; closing the connection");
                            let error = RelayMessage::Error { code: ErrorCode::LimitExceeded, message: reason.clone() };
                            let _ = sink.send(Message::Binary(error.encode().into())).await;
                            break Some(CloseReason::policy(&reason));
                        }
                        // What waits for the core counts against one budget for all connections:
                        // when it is spent, connections stop reading instead of the relay growing.
                        let wanted = u32::try_from(bytes.len()).unwrap_or(u32::MAX).clamp(1, INBOUND_BUDGET_BYTES);
                        let Ok(permit) = shared.inbound.clone().acquire_many_owned(wanted).await else {
                            break Some(CloseReason::try_later("relay shutting down"));
                        };
                        // Signatures are checked here, on this connection's task, so the core's
                        // single thread does not spend its time on them.
                        let checked = match (&msg, &verifier) {
                            (ClientMessage::Push { mutations, .. }, Some(v)) => Some(Prechecked::check(v, mutations)),
                            _ => None,
                        };
                        let input = CoreInput::Message { conn, msg, checked, permit };
                        if shared.core_tx.send(input).await.is_err() {
                            break Some(CloseReason::try_later("relay shutting down"));
                        }
                    }
                    Err(e) => {
                        tracing::info!(conn, error = %e, "malformed message; closing the connection");
                        let error = RelayMessage::Error { code: ErrorCode::Malformed, message: e.to_string() };
                        let _ = sink.send(Message::Binary(error.encode().into())).await;
                        break Some(CloseReason::protocol(&format!("malformed message: {e}")));
                    }
                },
                Ok(Some(Ok(Message::Text(_)))) => {
                    break Some(CloseReason { code: 1003, reason: "fieldsync speaks binary CBOR frames only".into() });
                }
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            },
            outgoing = rx.recv() => match outgoing {
                Some(Outbound::Message { msg, size }) => {
                    in_flight.answered(&msg);
                    let frame = msg.encode();
                    drop(msg);
                    let sent = sink.send(Message::Binary(frame.into())).await;
                    queued.fetch_sub(size, Ordering::Relaxed);
                    if sent.is_err() {
                        break None;
                    }
                }
                Some(Outbound::Key(key)) => verifier = Verifier::new(&key).ok(),
                Some(Outbound::Close(reason)) => break Some(reason),
                None => break Some(CloseReason::try_later("relay shutting down")),
            },
            _ = kill.notified() => {
                break Some(CloseReason::policy("send queue full: the device is not reading its messages"));
            }
        }
    };
    if let Some(reason) = closing {
        let _ = sink.send(close_frame(&reason)).await;
        let _ = sink.close().await;
    }
    let _ = shared.core_tx.send(CoreInput::Closed(conn)).await;
}

#[cfg(test)]
mod tests {
    use fieldsync_schema::PullCursor;

    use super::*;

    fn pull() -> ClientMessage {
        ClientMessage::Pull {
            cursor: PullCursor::default(),
            max_entries: 10,
        }
    }

    #[test]
    fn pipelined_pulls_beyond_the_limit_are_refused_until_answered() {
        let mut f = InFlight::default();
        for _ in 0..MAX_PULLS_IN_FLIGHT {
            f.admit(&pull()).unwrap();
        }
        assert!(f.admit(&pull()).unwrap_err().contains("pulls in flight"));
        f.answered(&RelayMessage::Changes {
            entries: Vec::new(),
            next: PullCursor::default(),
            caught_up: true,
        });
        f.admit(&pull()).unwrap();
        // Other requests have their own counts; handshake messages are not counted.
        for nonce in 0..MAX_PINGS_IN_FLIGHT as u64 {
            f.admit(&ClientMessage::Ping { nonce }).unwrap();
        }
        assert!(f.admit(&ClientMessage::Ping { nonce: 99 }).is_err());
        f.admit(&ClientMessage::Auth {
            signature: fieldsync_schema::Bytes(vec![0; 64]),
        })
        .unwrap();
    }
}
