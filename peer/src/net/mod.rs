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
pub use enroll::{enroll, enroll_with_tls};
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
            NetError::Sync(e) => matches!(e, SyncError::Timeout),
            _ => false,
        }
    }
}

pub(crate) type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

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
        Ok(Ok((socket, _))) => Ok(socket),
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
    socket
        .send(Message::Binary(msg.encode().into()))
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
        match socket.next().await {
            None => return Err(NetError::ConnectionLost("the relay hung up".into())),
            Some(Err(e)) => return Err(NetError::ConnectionLost(e.to_string())),
            Some(Ok(Message::Binary(bytes))) => return Ok(RelayMessage::decode(&bytes)?),
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
        .send(Message::Close(Some(tungstenite::protocol::CloseFrame {
            code: tungstenite::protocol::frame::coding::CloseCode::Normal,
            reason: "sync done".into(),
        })))
        .await;
    let _ = socket.close(None).await;
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
