//! One raw WebSocket connection to the relay: frames in and out, recorded, with the ways it can end.

use std::net::SocketAddr;
use std::time::Duration;

use fieldsync_schema::wire::{ErrorCode, UserInfo};
use fieldsync_schema::{ClientMessage, RelayMessage};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::Message;

use super::{RECV_TIMEOUT, Recorder, Ws};
use crate::Relay;

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// A WebSocket close frame with its code and reason.
    Closed(u16, String),
    /// A close frame without a code.
    ClosedBare,
    /// The TCP connection ended (EOF or reset) without a close frame.
    Dropped(String),
}

impl Ending {
    /// Closed with `code`, or reset right after the relay's last message: a relay that closes a
    /// connection with frames of ours still unread makes the kernel answer with a reset, which
    /// can overtake its close frame.
    pub fn is_close_or_reset(&self, code: u16) -> bool {
        match self {
            Ending::Closed(c, _) => *c == code,
            Ending::Dropped(e) => e.contains("reset") || e.contains("end of stream"),
            Ending::ClosedBare => false,
        }
    }

    pub fn code(&self) -> Option<u16> {
        match self {
            Ending::Closed(c, _) => Some(*c),
            _ => None,
        }
    }
}

/// One thing the relay sent.
#[derive(Debug)]
pub enum Frame {
    Msg(Box<RelayMessage>),
    End(Ending),
}

/// One WebSocket connection to the relay, speaking raw frames.
pub struct RawConn {
    ws: Ws,
    pub recorder: Recorder,
    /// Every message received on this connection, in order.
    pub received: Vec<RelayMessage>,
    pub ended: Option<Ending>,
    /// The `Welcome` this connection got, if it authenticated.
    pub welcome: Option<RelayMessage>,
}

pub fn sync_url(relay: &Relay) -> String {
    format!("{}/v1/sync", relay.url())
}

impl RawConn {
    pub async fn open(relay: &Relay) -> RawConn {
        Self::open_recorded(relay, &Recorder::new()).await
    }

    pub async fn open_recorded(relay: &Relay, recorder: &Recorder) -> RawConn {
        let url = sync_url(relay);
        let (ws, _) = tokio::time::timeout(RECV_TIMEOUT, tokio_tungstenite::connect_async(url.as_str()))
            .await
            .expect("connect timed out")
            .expect("connect to the relay");
        RawConn {
            ws,
            recorder: recorder.clone(),
            received: Vec::new(),
            ended: None,
            welcome: None,
        }
    }

    pub async fn send(&mut self, msg: &ClientMessage) {
        self.send_bytes(msg.encode()).await.expect("send a frame");
    }

    /// Sends one binary frame; an error means the relay already dropped the connection.
    pub async fn send_bytes(&mut self, bytes: Vec<u8>) -> Result<(), String> {
        tokio::time::timeout(RECV_TIMEOUT, self.ws.send(Message::Binary(bytes.into())))
            .await
            .map_err(|_| "send timed out".to_string())?
            .map_err(|e| e.to_string())
    }

    pub async fn send_text(&mut self, text: &str) -> Result<(), String> {
        self.ws
            .send(Message::Text(text.to_string().into()))
            .await
            .map_err(|e| e.to_string())
    }

    /// Queues frames without flushing (to pipeline many requests in one write).
    pub async fn feed(&mut self, msg: &ClientMessage) {
        self.ws
            .feed(Message::Binary(msg.encode().into()))
            .await
            .expect("queue a frame");
    }

    /// Flushes queued frames; an error means the relay already dropped the connection.
    pub async fn try_flush(&mut self) -> Result<(), String> {
        self.ws.flush().await.map_err(|e| e.to_string())
    }

    pub async fn flush(&mut self) {
        self.ws.flush().await.expect("flush");
    }

    /// The next message or the end of the connection; fails the test after [`RECV_TIMEOUT`].
    pub async fn next(&mut self) -> Frame {
        self.next_within(RECV_TIMEOUT)
            .await
            .unwrap_or_else(|| panic!("nothing from the relay within {RECV_TIMEOUT:?}"))
    }

    /// Like [`RawConn::next`], `None` if nothing arrived within `within`.
    pub async fn next_within(&mut self, within: Duration) -> Option<Frame> {
        if let Some(e) = &self.ended {
            return Some(Frame::End(e.clone()));
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let got = tokio::time::timeout_at(deadline, self.ws.next()).await.ok()?;
            let ending = match got {
                Some(Ok(Message::Binary(bytes))) => {
                    self.recorder.record(&bytes);
                    let msg = RelayMessage::decode(&bytes).expect("the relay sends well-formed frames");
                    if matches!(msg, RelayMessage::Welcome { .. }) {
                        self.welcome = Some(msg.clone());
                    }
                    self.received.push(msg.clone());
                    return Some(Frame::Msg(Box::new(msg)));
                }
                Some(Ok(Message::Text(t))) => {
                    self.recorder.record(t.as_bytes());
                    panic!("the relay sent a text frame: {t}");
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Close(Some(f)))) => {
                    self.recorder.record(f.reason.as_bytes());
                    Ending::Closed(u16::from(f.code), f.reason.to_string())
                }
                Some(Ok(Message::Close(None))) => Ending::ClosedBare,
                Some(Err(e)) => Ending::Dropped(e.to_string()),
                None => Ending::Dropped("end of stream".into()),
            };
            self.ended = Some(ending.clone());
            return Some(Frame::End(ending));
        }
    }

    /// The next message; fails the test if the connection ends instead.
    pub async fn recv(&mut self) -> RelayMessage {
        match self.next().await {
            Frame::Msg(m) => *m,
            Frame::End(e) => panic!(
                "the relay ended the connection ({e:?}); before that: {:?}",
                self.received
            ),
        }
    }

    /// Reads until the connection ends; returns the messages that came first and how it ended.
    pub async fn until_end(&mut self) -> (Vec<RelayMessage>, Ending) {
        let mut msgs = Vec::new();
        loop {
            match self.next().await {
                Frame::Msg(m) => msgs.push(*m),
                Frame::End(e) => return (msgs, e),
            }
        }
    }

    /// Expects exactly an `AuthFailed` followed by the end of the connection (1008).
    pub async fn expect_auth_failed(&mut self) -> fieldsync_schema::wire::AuthFailure {
        let (msgs, end) = self.until_end().await;
        let reason = match msgs.as_slice() {
            [RelayMessage::AuthFailed { reason, .. }] => *reason,
            other => panic!("expected one AuthFailed, got {other:?} then {end:?}"),
        };
        assert_eq!(end.code(), Some(1008), "refusals close with 1008: {end:?}");
        reason
    }

    /// Expects an `Error{code}` and then the end of the connection; returns the close.
    pub async fn expect_error_close(&mut self, code: ErrorCode) -> (String, Ending) {
        let (msgs, end) = self.until_end().await;
        let message = msgs
            .iter()
            .find_map(|m| match m {
                RelayMessage::Error { code: c, message } if *c == code => Some(message.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("expected Error{{{code:?}}}, got {msgs:?} then {end:?}"));
        for m in &msgs {
            assert!(
                matches!(
                    m,
                    RelayMessage::Error { .. } | RelayMessage::Changes { .. } | RelayMessage::Pong { .. }
                ),
                "unexpected {m:?} before the close"
            );
        }
        (message, end)
    }

    /// Sends a ping and reads until its pong, returning what arrived before it. The relay
    /// answers in order, so everything it queued for this connection before the ping is in.
    pub async fn barrier(&mut self, nonce: u64) -> Vec<RelayMessage> {
        self.send(&ClientMessage::Ping { nonce }).await;
        let mut before = Vec::new();
        loop {
            match self.recv().await {
                RelayMessage::Pong { nonce: n } if n == nonce => return before,
                other => before.push(other),
            }
        }
    }

    /// This end's address (to find the relay's side of the socket in `/proc/net/tcp`).
    pub fn local_addr(&self) -> SocketAddr {
        match self.ws.get_ref() {
            MaybeTlsStream::Plain(tcp) => tcp.local_addr().unwrap(),
            _ => panic!("plain TCP only"),
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }

    /// The relay's id and the user this connection authenticated as.
    pub fn user(&self) -> UserInfo {
        match &self.welcome {
            Some(RelayMessage::Welcome { user, .. }) => user.clone(),
            _ => panic!("not authenticated"),
        }
    }
}
