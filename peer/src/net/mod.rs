//! The network shell: WebSocket transport around the sans-IO [`crate::sync::SyncMachine`].
//!
//! Everything here moves bytes and waits for timers; every decision (what to send, when to
//! retry, what a reply means) is the machine's. Enrollment is the one exchange outside the
//! machine: a single request and answer before the device has an identity at the relay.

pub mod app;
mod client;
pub(crate) mod enroll;
mod tls;

use std::time::Duration;

use fieldsync_schema::wire::{MAX_MESSAGE_BYTES, WireError};
use fieldsync_schema::{ClientMessage, RelayMessage};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub use client::{Drive, Exclusive, SyncOptions, WatchEvent, sync_once, sync_round, watch, watch_with};
pub use enroll::{enroll, enroll_new_identity, enroll_with_tls};
pub use tls::TlsOptions;

use crate::error::PeerError;
use crate::sync::SyncError;

/// How long to wait for a TCP + WebSocket handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("`{0}` is not a relay address (expected ws://HOST:PORT or wss://HOST:PORT)")]
    BadUrl(String),
    #[error("cannot reach the relay at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("connection to the relay lost: {0}")]
    ConnectionLost(String),
    #[error("the relay closed the connection: {0}")]
    Closed(String),
    #[error("the relay sent a malformed message: {0}")]
    Malformed(#[from] WireError),
    #[error("this device is not enrolled; run `fieldsync-peer enroll --relay URL --token TOKEN` first")]
    NotEnrolled,
    #[error("enrollment refused ({reason}): {message}")]
    EnrollRefused { reason: &'static str, message: String },
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error(transparent)]
    Store(#[from] PeerError),
}

impl NetError {
    /// Whether trying again later can help (network trouble) or the user must act first.
    pub fn is_retryable(&self) -> bool {
        match self {
            NetError::Unreachable { .. } | NetError::ConnectionLost(_) | NetError::Closed(_) => true,
            NetError::Sync(e) => matches!(e, SyncError::Timeout | SyncError::DeliveryChanged),
            _ => false,
        }
    }
}

/// One connection to a relay: the WebSocket, whether frames may go compressed, and what
/// crossed it.
pub(crate) struct Socket {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The relay said in `Welcome` that it reads compressed frames; until then, and with an
    /// older relay, every frame goes as it is.
    compress: bool,
    /// Offer compression in `Hello` (off only to measure what it saves).
    offer_compression: bool,
    pub(crate) traffic: Traffic,
}

/// Bytes of frames (WebSocket payloads) over one connection, each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Traffic {
    pub sent_bytes: u64,
    pub received_bytes: u64,
}

/// A running total of [`Traffic`] over every connection of a [`SyncOptions`] (clones share
/// it): what a benchmark or an app's data-usage screen reads.
#[derive(Debug, Default)]
pub struct TrafficMeter {
    sent_bytes: std::sync::atomic::AtomicU64,
    received_bytes: std::sync::atomic::AtomicU64,
}

impl TrafficMeter {
    pub fn total(&self) -> Traffic {
        use std::sync::atomic::Ordering::Relaxed;
        Traffic {
            sent_bytes: self.sent_bytes.load(Relaxed),
            received_bytes: self.received_bytes.load(Relaxed),
        }
    }

    pub(crate) fn add(&self, t: Traffic) {
        use std::sync::atomic::Ordering::Relaxed;
        self.sent_bytes.fetch_add(t.sent_bytes, Relaxed);
        self.received_bytes.fetch_add(t.received_bytes, Relaxed);
    }
}

/// The sync endpoint for a relay address: `ws://host:port` gets `/v1/sync` appended.
pub fn endpoint(relay_url: &str) -> Result<String, NetError> {
    let url = relay_url.trim().trim_end_matches('/');
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("wss://"))
        .ok_or_else(|| NetError::BadUrl(relay_url.to_string()))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(NetError::BadUrl(relay_url.to_string()));
    }
    if rest.contains('/') {
        Ok(url.to_string())
    } else {
        Ok(format!("{url}/v1/sync"))
    }
}

pub(crate) async fn connect(relay_url: &str, tls: &TlsOptions) -> Result<Socket, NetError> {
    let url = endpoint(relay_url)?;
    let connector = tls::connector(&url, tls)?;
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(MAX_MESSAGE_BYTES);
    config.max_frame_size = Some(MAX_MESSAGE_BYTES);
    let attempt = tokio_tungstenite::connect_async_tls_with_config(url.as_str(), Some(config), false, Some(connector));
    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(Ok((ws, _))) => Ok(Socket {
            ws,
            compress: false,
            offer_compression: true,
            traffic: Traffic::default(),
        }),
        Ok(Err(e)) => Err(NetError::Unreachable {
            url,
            reason: e.to_string(),
        }),
        Err(_) => Err(NetError::Unreachable {
            url,
            reason: "timed out".into(),
        }),
    }
}

pub(crate) async fn send(socket: &mut Socket, msg: &ClientMessage) -> Result<(), NetError> {
    let frame = match msg {
        ClientMessage::Hello { .. } if !socket.offer_compression => {
            let mut plain = msg.clone();
            if let ClientMessage::Hello { compression, .. } = &mut plain {
                *compression = false;
            }
            plain.encode()
        }
        _ if socket.compress => msg.encode_compressed(),
        _ => msg.encode(),
    };
    socket.traffic.sent_bytes += frame.len() as u64;
    socket
        .ws
        .send(Message::Binary(frame.into()))
        .await
        .map_err(|e| NetError::ConnectionLost(e.to_string()))
}

pub(crate) async fn send_all(socket: &mut Socket, msgs: Vec<ClientMessage>) -> Result<(), NetError> {
    for m in &msgs {
        send(socket, m).await?;
    }
    Ok(())
}

/// The next relay message, or why there is none.
pub(crate) async fn receive(socket: &mut Socket) -> Result<RelayMessage, NetError> {
    loop {
        match socket.ws.next().await {
            None => return Err(NetError::ConnectionLost("the relay hung up".into())),
            Some(Err(e)) => return Err(NetError::ConnectionLost(e.to_string())),
            Some(Ok(Message::Binary(bytes))) => {
                socket.traffic.received_bytes += bytes.len() as u64;
                let msg = RelayMessage::decode(&bytes)?;
                if let RelayMessage::Welcome { compression, .. } = &msg {
                    socket.compress = *compression && socket.offer_compression;
                }
                return Ok(msg);
            }
            Some(Ok(Message::Close(frame))) => {
                let reason = frame
                    .map(|f| format!("{} ({})", f.reason, u16::from(f.code)))
                    .unwrap_or_else(|| "no reason given".into());
                return Err(NetError::Closed(reason));
            }
            Some(Ok(Message::Text(_))) => {
                return Err(NetError::ConnectionLost("the relay sent a text frame".into()));
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
        }
    }
}

pub(crate) async fn close(socket: &mut Socket) {
    let _ = socket
        .ws
        .send(Message::Close(Some(tungstenite::protocol::CloseFrame {
            code: tungstenite::protocol::frame::coding::CloseCode::Normal,
            reason: "sync done".into(),
        })))
        .await;
    let _ = socket.ws.close(None).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(endpoint("ws://127.0.0.1:7070").unwrap(), "ws://127.0.0.1:7070/v1/sync");
        assert_eq!(endpoint("ws://h:1/").unwrap(), "ws://h:1/v1/sync");
        assert_eq!(
            endpoint("wss://relay.example/v1/sync").unwrap(),
            "wss://relay.example/v1/sync"
        );
        assert!(endpoint("http://h:1").is_err());
        assert!(endpoint("ws://").is_err());
    }
}
