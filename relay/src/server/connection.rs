//! One WebSocket connection: bytes in, decoded messages to the core; messages from the core,
//! encoded, out. Garbage gets a clear close reason and ends only this connection.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use fieldsync_schema::signing::Verifier;
use fieldsync_schema::wire::ErrorCode;
use fieldsync_schema::{ClientMessage, RelayMessage};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Notify, mpsc};

use super::core_thread::{CoreInput, Outbound};
use super::{MAX_FRAME_BYTES, SEND_QUEUE, Shared};
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

async fn serve(socket: WebSocket, shared: Shared) {
    let conn = shared.new_conn_id();
    let (tx, mut rx) = mpsc::channel::<Outbound>(SEND_QUEUE);
    let kill = Arc::new(Notify::new());
    if shared
        .core_tx
        .send(CoreInput::Open {
            conn,
            tx,
            kill: kill.clone(),
        })
        .await
        .is_err()
    {
        return;
    }
    let (mut sink, mut stream) = socket.split();
    let mut verifier: Option<Verifier> = None;
    let closing: Option<CloseReason> = loop {
        tokio::select! {
            incoming = tokio::time::timeout(IDLE_TIMEOUT, stream.next()) => match incoming {
                Err(_) => break Some(CloseReason::normal("idle timeout")),
                Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => break None,
                Ok(Some(Ok(Message::Binary(bytes)))) => match ClientMessage::decode(&bytes) {
                    Ok(msg) => {
                        // Signatures are checked here, on this connection's task, so the core's
                        // single thread does not spend its time on them.
                        let checked = match (&msg, &verifier) {
                            (ClientMessage::Push { mutations, .. }, Some(v)) => Some(Prechecked::check(v, mutations)),
                            _ => None,
                        };
                        if shared.core_tx.send(CoreInput::Message(conn, msg, checked)).await.is_err() {
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
                Some(Outbound::Message(msg)) => {
                    if sink.send(Message::Binary(msg.encode().into())).await.is_err() {
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
