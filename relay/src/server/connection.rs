//! One WebSocket connection: bytes in, decoded messages to the core; messages from the core,
//! encoded, out. Garbage gets a clear close reason and ends only this connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use fieldsync_schema::signing::Verifier;
use fieldsync_schema::wire::{
    ErrorCode, MAX_FETCHES_IN_FLIGHT, MAX_PINGS_IN_FLIGHT, MAX_PULLS_IN_FLIGHT, MAX_PUSHES_IN_FLIGHT,
};
use fieldsync_schema::{ClientMessage, RelayMessage};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};

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

/// A frame that cannot be written for this long means the device stopped reading: the socket
/// is dropped (its queue and the frame go with it) instead of being held for ever.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the closing handshake may take before the socket is simply dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// A WebSocket close reason travels in a control frame: at most 123 bytes after the code.
const MAX_CLOSE_REASON_BYTES: usize = 123;

fn close_frame(reason: &CloseReason) -> Message {
    let mut text = reason.reason.as_str();
    if text.len() > MAX_CLOSE_REASON_BYTES {
        let mut cut = MAX_CLOSE_REASON_BYTES;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text = &text[..cut];
    }
    Message::Close(Some(CloseFrame {
        code: reason.code,
        reason: text.to_string().into(),
    }))
}

/// Resolves once the core cut this connection (a slow reader); never if it did not.
async fn cut(kill: &mut watch::Receiver<bool>) {
    if kill.wait_for(|cut| *cut).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Why a connection ends without the relay saying so first.
fn slow_reader() -> CloseReason {
    CloseReason::policy("send queue full: the device is not reading its messages")
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
    fetches: usize,
}

impl InFlight {
    /// Counts a request, or says which limit it exceeds.
    fn admit(&mut self, msg: &ClientMessage) -> Result<(), String> {
        let (count, limit, what) = match msg {
            ClientMessage::Pull { .. } => (&mut self.pulls, MAX_PULLS_IN_FLIGHT, "pulls"),
            ClientMessage::Push { .. } => (&mut self.pushes, MAX_PUSHES_IN_FLIGHT, "pushes"),
            ClientMessage::Ping { .. } => (&mut self.pings, MAX_PINGS_IN_FLIGHT, "pings"),
            ClientMessage::Fetch { .. } => (&mut self.fetches, MAX_FETCHES_IN_FLIGHT, "fetches"),
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
            RelayMessage::Fetched { .. } => &mut self.fetches,
            // The only errors answering a request without closing are a failed pull page and a
            // failed fetch: either frees a place (a pull's first).
            RelayMessage::Error {
                code: ErrorCode::Internal,
                ..
            } if self.pulls > 0 => &mut self.pulls,
            RelayMessage::Error {
                code: ErrorCode::Internal,
                ..
            } => &mut self.fetches,
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
    // Level-triggered: a cut is seen whenever the task next looks, never lost between selects.
    let (kill_tx, mut kill) = watch::channel(false);
    let queued = Arc::new(AtomicUsize::new(0));
    if shared
        .core_tx
        .send(CoreInput::Open {
            conn,
            tx,
            kill: kill_tx,
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
    // Whether the device said in `Hello` that it reads compressed frames (wire::compress).
    let mut compress = false;
    let closing: Option<CloseReason> = loop {
        tokio::select! {
            // A cut connection is cut, even when its queue went away at the same moment.
            biased;
            _ = cut(&mut kill) => break Some(slow_reader()),
            incoming = tokio::time::timeout(IDLE_TIMEOUT, stream.next()) => match incoming {
                Err(_) => break Some(CloseReason::normal("idle timeout")),
                Ok(Some(Err(e))) => break too_large(&e),
                Ok(None) | Ok(Some(Ok(Message::Close(_)))) => break None,
                Ok(Some(Ok(Message::Binary(bytes)))) => match ClientMessage::decode(&bytes) {
                    Ok(msg) => {
                        if let ClientMessage::Hello { compression, .. } = &msg {
                            compress = *compression;
                        }
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
                    let frame = if compress { msg.encode_compressed() } else { msg.encode() };
                    drop(msg);
                    // A device that stops reading blocks this write: the cut and a deadline
                    // must still end the connection, or its queue is pinned for ever.
                    let written = tokio::select! {
                        biased;
                        _ = cut(&mut kill) => Err(slow_reader()),
                        sent = tokio::time::timeout(WRITE_TIMEOUT, sink.send(Message::Binary(frame.into()))) => match sent {
                            Ok(Ok(())) => Ok(()),
                            Ok(Err(_)) => Err(CloseReason::normal("connection lost")),
                            Err(_) => Err(slow_reader()),
                        },
                    };
                    queued.fetch_sub(size, Ordering::Relaxed);
                    match written {
                        Ok(()) => {}
                        // The reason goes out if the device reads again within the close
                        // timeout; otherwise the socket is dropped with its queue.
                        Err(reason) if reason.code == 1008 => break Some(reason),
                        Err(_) => break None,
                    }
                }
                Some(Outbound::Key(key)) => verifier = Verifier::new(&key).ok(),
                Some(Outbound::Close(reason)) => break Some(reason),
                None => break Some(CloseReason::try_later("relay shutting down")),
            },
        }
    };
    if let Some(reason) = closing {
        let goodbye = async {
            let _ = sink.send(close_frame(&reason)).await;
            let _ = sink.close().await;
        };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, goodbye).await;
    }
    let _ = shared.core_tx.send(CoreInput::Closed(conn)).await;
}

/// A read error: a frame over the size limit gets a close saying so (1009); anything else is a
/// broken connection.
fn too_large(e: &axum::Error) -> Option<CloseReason> {
    let text = e.to_string();
    let over_limit = text.contains("too long") || text.contains("too big") || text.contains("Space limit");
    over_limit.then(|| CloseReason {
        code: 1009,
        reason: format!("frame over the {MAX_FRAME_BYTES}-byte limit"),
    })
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
