//! One sync round (`sync`) and a long-lived connection (`sync --watch`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use fieldsync_schema::ClientMessage;

use super::{NetError, Socket, TlsOptions, TrafficMeter, close, connect, receive, send, send_all};
use crate::deadline::Deadline;
use crate::device::Device;
use crate::sync::{Phase, SyncInput, SyncMachine, SyncSummary};

/// Items moving in one round above which a progress bar is worth showing (a week offline).
#[cfg(feature = "cli")]
const PROGRESS_THRESHOLD: u64 = 1000;

#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Draw a progress bar on stderr when thousands of items move (hidden when not a terminal).
    pub progress: bool,
    /// How often the machine gets a tick (picks up writes made by other processes, timeouts).
    pub tick_every: Duration,
    /// Keep-alive ping interval on an otherwise quiet connection.
    pub ping_every: Duration,
    /// How to trust a `wss://` relay (system roots unless a CA file is given).
    pub tls: TlsOptions,
    /// A one-shot sync waits this long for changes the relay deferred to be due again; when
    /// the retry is further away (the relay's disk is full, it is overloaded) the round ends
    /// and they stay queued for the next sync.
    pub retry_patience: Duration,
    /// Offer the relay compressed frames (on by default; off only to measure what it saves).
    pub compression: bool,
    /// Bytes over the wire, summed over every connection made with these options.
    pub traffic: Arc<TrafficMeter>,
}

impl SyncOptions {
    /// The defaults without a progress bar: for tools and tests that drive many devices.
    pub fn quiet() -> Self {
        SyncOptions {
            progress: false,
            ..SyncOptions::default()
        }
    }
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            progress: true,
            tick_every: Duration::from_secs(1),
            ping_every: Duration::from_secs(30),
            tls: TlsOptions::default(),
            retry_patience: Duration::from_secs(5),
            compression: true,
            traffic: Arc::new(TrafficMeter::default()),
        }
    }
}

/// How the shell reaches the device and its machine, one step at a time. The CLI's `sync`
/// holds both for the whole round ([`Exclusive`]); an app's [`crate::Client`] shares them with
/// the app and takes its lock for each step only, never across a wait on the network.
pub trait Drive {
    fn step<R>(&mut self, f: impl FnOnce(&mut Device, &mut SyncMachine) -> R) -> R;

    /// Resolves when a local write (or the app) asks for a push now rather than at the next
    /// tick. Owned, so the session can wait on it beside the socket.
    fn nudged(&self) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        Box::pin(std::future::pending())
    }
}

/// A device and machine held by one caller for the whole session.
pub struct Exclusive<'a> {
    pub dev: &'a mut Device,
    pub machine: &'a mut SyncMachine,
}

impl Drive for Exclusive<'_> {
    fn step<R>(&mut self, f: impl FnOnce(&mut Device, &mut SyncMachine) -> R) -> R {
        f(self.dev, self.machine)
    }
}

/// What `watch` reports as it goes.
#[derive(Debug, Clone)]
pub enum WatchEvent {
    Connected,
    /// Something moved: a batch was sent or answered, or changes arrived. The summary is the
    /// running total since `watch` began.
    Progress(SyncSummary),
    Disconnected {
        reason: String,
        retry_in_ms: u64,
    },
    Summary(SyncSummary),
}

/// One round: connect, push everything, pull until caught up, close. The summary says what
/// moved; an error leaves everything queued for the next attempt (same mutation ids). With
/// several relays ([`Device::set_relays`]) it tries them in order until one takes the device.
pub async fn sync_once(
    dev: &mut Device,
    machine: &mut SyncMachine,
    opts: &SyncOptions,
) -> Result<SyncSummary, NetError> {
    sync_round(&mut Exclusive { dev, machine }, opts).await
}

/// [`sync_once`] through any [`Drive`].
pub async fn sync_round(drive: &mut impl Drive, opts: &SyncOptions) -> Result<SyncSummary, NetError> {
    let urls = relay_urls(drive)?;
    let mut result = Err(NetError::NotEnrolled);
    for (n, url) in urls.iter().enumerate() {
        drive.step(|_, m| m.set_on_other_relay(n > 0));
        result = match connect(url, &opts.tls).await {
            Ok(mut socket) => {
                let mut never = std::pin::pin!(std::future::pending::<()>());
                let result = session(drive, &mut socket, opts, true, &mut never, &mut |_| {}).await;
                if result.is_ok() {
                    close(&mut socket).await;
                }
                opts.traffic.add(socket.traffic);
                result
            }
            Err(e) => Err(e),
        };
        let reached = drive.step(|_, m| m.phase());
        drive.step(|d, m| m.handle(d, SyncInput::Disconnected))?;
        if !try_next_relay(&result, reached) {
            break;
        }
    }
    result
}

/// The device's relays in the order it tries them.
fn relay_urls(drive: &mut impl Drive) -> Result<Vec<String>, NetError> {
    let urls = drive.step(|d, _| d.relay_urls());
    if urls.is_empty() {
        return Err(NetError::NotEnrolled);
    }
    Ok(urls)
}

/// Whether a connection's end sends the device on to its next relay: it could not be reached,
/// or it failed before taking the device (refused as a relay of another cluster, wrong
/// identity, handshake cut). Not after a session that got going (a reset: the same relay is
/// tried again first), nor after a final refusal or a local error.
fn try_next_relay(result: &Result<SyncSummary, NetError>, phase_at_end: Phase) -> bool {
    match result {
        Ok(_) => false,
        Err(NetError::Store(_) | NetError::Tls(_) | NetError::NotEnrolled) => false,
        Err(_) => !matches!(phase_at_end, Phase::Ready | Phase::AuthFailed),
    }
}

/// Stays connected until `stop` resolves: live changes both ways, reconnecting with
/// exponential backoff and jitter. Returns early only when the relay refuses the device.
pub async fn watch<F: Future<Output = ()>>(
    dev: &mut Device,
    machine: &mut SyncMachine,
    opts: &SyncOptions,
    stop: F,
    on_event: impl FnMut(WatchEvent),
) -> Result<(), NetError> {
    watch_with(&mut Exclusive { dev, machine }, opts, stop, on_event).await
}

/// [`watch`] through any [`Drive`].
pub async fn watch_with<F: Future<Output = ()>>(
    drive: &mut impl Drive,
    opts: &SyncOptions,
    stop: F,
    mut on_event: impl FnMut(WatchEvent),
) -> Result<(), NetError> {
    let mut next = 0usize;
    let mut stop = std::pin::pin!(stop);
    loop {
        // Read every round: the app may change the list while watching.
        let urls = relay_urls(drive)?;
        let at = next % urls.len();
        let url = &urls[at];
        drive.step(|_, m| m.set_on_other_relay(at > 0));
        if drive.step(|_, m| m.phase()) == Phase::AuthFailed {
            let reason = drive
                .step(|d, _| d.status())?
                .auth_failure
                .unwrap_or_else(|| "refused".into());
            return Err(NetError::Closed(format!("authentication failed: {reason}")));
        }
        if !drive.step(|d, m| m.should_connect(d)) {
            let wait = drive.step(|d, m| m.reconnect_in(d)).unwrap_or(1000);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(wait)) => continue,
                _ = drive.nudged() => continue,
                _ = &mut stop => return Ok(()),
            }
        }
        let outcome = tokio::select! {
            c = connect(url, &opts.tls) => c,
            _ = &mut stop => return Ok(()),
        };
        let result = match outcome {
            Ok(mut socket) => {
                on_event(WatchEvent::Connected);
                let mut progress = |s: &SyncSummary| on_event(WatchEvent::Progress(*s));
                let r = session(drive, &mut socket, opts, false, &mut stop, &mut progress).await;
                if r.is_ok() {
                    close(&mut socket).await;
                }
                opts.traffic.add(socket.traffic);
                r
            }
            Err(e) => Err(e),
        };
        let reached = drive.step(|_, m| m.phase());
        drive.step(|d, m| m.handle(d, SyncInput::Disconnected))?;
        // Otherwise the same relay first again (it had the device: a reset, most likely).
        if try_next_relay(&result, reached) {
            next = at + 1;
        }
        match result {
            Ok(summary) => {
                on_event(WatchEvent::Summary(summary));
                return Ok(());
            }
            Err(NetError::Store(e)) => return Err(NetError::Store(e)),
            // A missing or unreadable CA file does not fix itself by retrying.
            Err(e @ NetError::Tls(_)) => return Err(e),
            // Refused (revoked, unknown, wrong relay): no reconnect is coming, so none is
            // announced; the loop's first check returns the refusal.
            Err(_) if drive.step(|_, m| m.phase()) == Phase::AuthFailed => {}
            Err(e) => {
                let retry_in_ms = drive.step(|d, m| m.reconnect_in(d)).unwrap_or(0);
                on_event(WatchEvent::Disconnected {
                    reason: e.to_string(),
                    retry_in_ms,
                });
            }
        }
    }
}

/// Drives the machine over one connection. With `until_idle`, returns once the round is done;
/// otherwise runs until `stop` resolves or the connection fails.
async fn session<F: Future<Output = ()>>(
    drive: &mut impl Drive,
    socket: &mut Socket,
    opts: &SyncOptions,
    until_idle: bool,
    stop: &mut Pin<&mut F>,
    on_progress: &mut impl FnMut(&SyncSummary),
) -> Result<SyncSummary, NetError> {
    let start = drive.step(|_, m| m.summary());
    let mut reported = start;
    let queued = drive.step(|d, _| d.status())?.unsynced;
    let mut bar = Progress::new(queued, opts);
    socket.offer_compression = opts.compression;
    send_all(socket, drive.step(|d, m| m.handle(d, SyncInput::Connected))?).await?;
    let mut last_traffic = tokio::time::Instant::now();
    loop {
        let summary = drive.step(|_, m| m.summary());
        bar.update(&start, &summary);
        if moved(&reported, &summary) {
            on_progress(&summary);
            reported = summary;
        }
        let (now, wakeup) = drive.step(|d, m| (d.now_ms(), m.next_wakeup()));
        let retry_is_far = summary
            .retry_at
            .is_some_and(|t| Deadline::at(t).remaining(now) > opts.retry_patience.as_millis() as u64);
        if until_idle && (summary.idle || retry_is_far) {
            bar.finish();
            return Ok(summary);
        }
        let until_wakeup = wakeup
            .map_or(u64::MAX, |t| t.remaining(now))
            .min(opts.tick_every.as_millis() as u64);
        tokio::select! {
            msg = receive(socket) => {
                let msg = msg?;
                last_traffic = tokio::time::Instant::now();
                let out = drive.step(|d, m| m.handle(d, SyncInput::Message(msg)))?;
                send_all(socket, out).await?;
            }
            _ = tokio::time::sleep(Duration::from_millis(until_wakeup)) => {
                let out = drive.step(|d, m| m.handle(d, SyncInput::Tick))?;
                if !out.is_empty() {
                    last_traffic = tokio::time::Instant::now();
                }
                send_all(socket, out).await?;
                if last_traffic.elapsed() >= opts.ping_every && drive.step(|_, m| m.phase()) == Phase::Ready {
                    send(socket, &ClientMessage::Ping { nonce: drive.step(|d, _| d.now_ms()) }).await?;
                    last_traffic = tokio::time::Instant::now();
                }
            }
            _ = drive.nudged() => {
                let out = drive.step(|d, m| m.handle(d, SyncInput::LocalWrite))?;
                if !out.is_empty() {
                    last_traffic = tokio::time::Instant::now();
                }
                send_all(socket, out).await?;
            }
            _ = stop.as_mut() => {
                bar.finish();
                return Ok(drive.step(|_, m| m.summary()));
            }
        }
    }
}

/// Whether anything a person would want to hear about happened between two summaries.
fn moved(before: &SyncSummary, now: &SyncSummary) -> bool {
    (
        before.pushed,
        before.applied,
        before.conflicts,
        before.rejected,
        before.pulled,
    ) != (now.pushed, now.applied, now.conflicts, now.rejected, now.pulled)
}

/// A progress bar that appears only when a round moves thousands of items (with the `cli`
/// feature; an app embedding the library draws its own).
struct Progress {
    #[cfg(feature = "cli")]
    enabled: bool,
    #[cfg(feature = "cli")]
    queued: u64,
    #[cfg(feature = "cli")]
    bar: Option<indicatif::ProgressBar>,
}

#[cfg(feature = "cli")]
impl Progress {
    fn new(queued: u64, opts: &SyncOptions) -> Self {
        Progress {
            enabled: opts.progress,
            queued,
            bar: None,
        }
    }

    fn update(&mut self, start: &SyncSummary, now: &SyncSummary) {
        use indicatif::{ProgressBar, ProgressStyle};
        if !self.enabled {
            return;
        }
        let done = now.applied + now.conflicts + now.rejected - (start.applied + start.conflicts + start.rejected);
        let pulled = now.pulled - start.pulled;
        if self.bar.is_none() && (self.queued >= PROGRESS_THRESHOLD || pulled >= PROGRESS_THRESHOLD) {
            let bar = ProgressBar::new(self.queued.max(1));
            if let Ok(style) =
                ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} pushed · {msg} ({elapsed})")
            {
                bar.set_style(style.progress_chars("=> "));
            }
            self.bar = Some(bar);
        }
        if let Some(bar) = &self.bar {
            bar.set_position(done.min(self.queued.max(1)));
            bar.set_message(format!("{pulled} pulled"));
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

#[cfg(not(feature = "cli"))]
impl Progress {
    fn new(_queued: u64, _opts: &SyncOptions) -> Self {
        Progress {}
    }
    fn update(&mut self, _start: &SyncSummary, _now: &SyncSummary) {}
    fn finish(&mut self) {}
}
