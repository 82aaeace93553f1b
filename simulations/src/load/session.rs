//! One loading device over a real WebSocket: enroll, authenticate, catch up, then push its
//! prepared batches (one in flight, like a real device) while timing acks and live entries.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fieldsync_schema::{ClientMessage, PullCursor, RelayMessage};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

use crate::synth::SynthDevice;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What every session shares: the clock origin, when each mutation was sent, and progress.
pub struct Shared {
    pub start: Instant,
    /// Mutation id → index into `sent_ns`.
    pub index: HashMap<Uuid, usize>,
    pub sent_ns: Vec<AtomicU64>,
    pub acked: AtomicU64,
    pub total: u64,
}

/// What one session measured.
#[derive(Default)]
pub struct SessionResult {
    pub ack_ms: Vec<f64>,
    pub fanout_ms: Vec<f64>,
    pub applied: u64,
    pub errors: BTreeMap<String, u64>,
    pub finished_ns: u64,
}

pub async fn connect(url: &str) -> anyhow::Result<Socket> {
    let endpoint = format!("{}/v1/sync", url.trim_end_matches('/'));
    let (ws, _) = tokio_tungstenite::connect_async(endpoint.as_str())
        .await
        .with_context(|| format!("connecting to {endpoint}"))?;
    Ok(ws)
}

async fn send(ws: &mut Socket, bytes: Vec<u8>) -> anyhow::Result<()> {
    ws.send(Message::Binary(bytes.into())).await.context("sending")
}

async fn recv(ws: &mut Socket) -> anyhow::Result<RelayMessage> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => return Ok(RelayMessage::decode(&b)?),
            Some(Ok(Message::Close(f))) => bail!("closed by the relay: {f:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => bail!("connection error: {e}"),
            None => bail!("connection ended"),
        }
    }
}

/// Enrolls the device; fills in its user and first space.
pub async fn enroll(url: &str, device: &mut SynthDevice, token: &str) -> anyhow::Result<()> {
    let mut ws = connect(url).await?;
    send(&mut ws, device.enroll_message(token).encode()).await?;
    match recv(&mut ws).await? {
        RelayMessage::Enrolled { user, .. } => {
            device.user_id = user.user_id;
            device.space_id = user
                .spaces
                .first()
                .map(|s| s.space_id)
                .context("user without a space")?;
            Ok(())
        }
        other => bail!("enrollment refused: {other:?}"),
    }
}

/// Authenticates and pulls until caught up, so the relay pushes live entries from then on.
pub async fn open(url: &str, device: &SynthDevice) -> anyhow::Result<Socket> {
    let mut ws = connect(url).await?;
    send(&mut ws, device.hello().encode()).await?;
    let RelayMessage::Challenge { relay_id, nonce } = recv(&mut ws).await? else {
        bail!("no challenge");
    };
    send(&mut ws, device.auth(relay_id, &nonce.0).encode()).await?;
    let RelayMessage::Welcome { .. } = recv(&mut ws).await? else {
        bail!("not welcomed");
    };
    let mut cursor = PullCursor::default();
    loop {
        let pull = ClientMessage::Pull {
            cursor,
            max_entries: 1000,
        };
        send(&mut ws, pull.encode()).await?;
        match recv(&mut ws).await? {
            RelayMessage::Changes { next, caught_up, .. } => {
                cursor = next;
                if caught_up {
                    return Ok(ws);
                }
            }
            other => bail!("unexpected {}", other.name()),
        }
    }
}

/// A prepared push: its frame and the mutations it carries.
pub struct Batch {
    pub batch_id: u64,
    pub frame: Vec<u8>,
    pub mutations: Vec<Uuid>,
}

fn now_ns(shared: &Shared) -> u64 {
    shared.start.elapsed().as_nanos() as u64
}

/// Pushes every batch in order (one in flight), optionally paced to one batch per `pace`,
/// recording ack latency per mutation and fan-out latency of other devices' live entries.
/// Keeps reading live entries until every session's mutations are acknowledged.
pub async fn push_all(
    mut ws: Socket,
    batches: Vec<Batch>,
    pace: Option<(Duration, Duration)>,
    shared: Arc<Shared>,
) -> SessionResult {
    let mut out = SessionResult::default();
    // Paced devices start spread over one interval, so the load is steady rather than bursts.
    let mut next_send = tokio::time::Instant::now() + pace.map_or(Duration::ZERO, |(_, offset)| offset);
    let mut pending = batches.into_iter();
    let mut in_flight: Option<(u64, u64, usize)> = None; // (batch id, sent ns, mutation count)
    let mut done_pushing = false;
    loop {
        let due = pace.is_none() || tokio::time::Instant::now() >= next_send;
        if in_flight.is_none() && !done_pushing && due {
            if let Some((interval, _)) = pace {
                next_send += interval;
            }
            match pending.next() {
                Some(b) => {
                    let t = now_ns(&shared);
                    for m in &b.mutations {
                        if let Some(i) = shared.index.get(m) {
                            shared.sent_ns[*i].store(t, Ordering::Relaxed);
                        }
                    }
                    in_flight = Some((b.batch_id, t, b.mutations.len()));
                    if send(&mut ws, b.frame).await.is_err() {
                        *out.errors.entry("connection".into()).or_insert(0) += 1;
                        break;
                    }
                }
                None => {
                    done_pushing = true;
                    out.finished_ns = now_ns(&shared);
                }
            }
        }
        // Stay for the other devices' live entries until everything is acknowledged (or, if
        // something was lost, a while longer).
        let waited_ns = now_ns(&shared).saturating_sub(out.finished_ns);
        if done_pushing && (shared.acked.load(Ordering::Relaxed) >= shared.total || waited_ns > 10_000_000_000) {
            break;
        }
        // Keep reading (live entries of other devices) while waiting for the next paced send.
        let wait = if in_flight.is_none() && !done_pushing && pace.is_some() {
            next_send.saturating_duration_since(tokio::time::Instant::now())
        } else {
            Duration::from_millis(200)
        };
        let msg = match tokio::time::timeout(wait, recv(&mut ws)).await {
            Err(_) => continue,
            Ok(Err(e)) => {
                *out.errors.entry(format!("connection: {e}")).or_insert(0) += 1;
                break;
            }
            Ok(Ok(m)) => m,
        };
        let t = now_ns(&shared);
        match msg {
            RelayMessage::PushResult { batch_id, results } => {
                let Some((id, sent, n)) = in_flight.take() else {
                    continue;
                };
                if id != batch_id {
                    *out.errors.entry("batch_mismatch".into()).or_insert(0) += 1;
                }
                let ms = (t - sent) as f64 / 1e6;
                for r in &results {
                    if r.outcome.applied().is_some() {
                        out.applied += 1;
                        out.ack_ms.push(ms);
                    } else {
                        *out.errors.entry(r.outcome.name().to_string()).or_insert(0) += 1;
                    }
                }
                shared.acked.fetch_add(n as u64, Ordering::Relaxed);
            }
            RelayMessage::PushDeferred { .. } => {
                *out.errors.entry("push_deferred".into()).or_insert(0) += 1;
                if let Some((_, _, n)) = in_flight.take() {
                    shared.acked.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            RelayMessage::Live { entries, .. } => {
                for e in entries {
                    let Some(origin) = e.origin else { continue };
                    if let Some(i) = shared.index.get(&origin.mutation_id) {
                        let sent = shared.sent_ns[*i].load(Ordering::Relaxed);
                        if sent > 0 && matches!(e.payload, fieldsync_schema::FeedPayload::Changes(_)) {
                            out.fanout_ms.push((t.saturating_sub(sent)) as f64 / 1e6);
                        }
                    }
                }
            }
            RelayMessage::Error { message, .. } => {
                *out.errors.entry(format!("relay error: {message}")).or_insert(0) += 1;
            }
            _ => {}
        }
    }
    let _ = ws.close(None).await;
    out
}
