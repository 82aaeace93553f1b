//! Prometheus text exposition (format 0.0.4), written by hand: a few counters and gauges from
//! the status snapshot and three fixed-bucket histograms do not need a metrics framework.
//!
//! Every name starts with `fieldsync_`. Counters come from [`crate::core::CoreStats`] and the
//! core thread, so they restart from zero with the process (Prometheus handles resets).

use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use super::StatusSnapshot;

/// Bucket upper bounds in seconds: 100 µs to 10 s, roughly ×2.5 per step.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A histogram with fixed buckets (cumulative counts are computed when rendered).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Histogram {
    /// Count per bucket of [`LATENCY_BUCKETS`] (not cumulative); the last slot is `+Inf`.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new() -> Self {
        Histogram {
            counts: vec![0; LATENCY_BUCKETS.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    /// Records `n` observations of `seconds` each.
    pub fn observe_n(&mut self, seconds: f64, n: u64) {
        if n == 0 || !seconds.is_finite() {
            return;
        }
        if self.counts.len() != LATENCY_BUCKETS.len() + 1 {
            self.counts = vec![0; LATENCY_BUCKETS.len() + 1];
        }
        let slot = LATENCY_BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.counts[slot] += n;
        self.sum += seconds * n as f64;
        self.count += n;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn observe(&mut self, d: Duration) {
        self.observe_n(d.as_secs_f64(), 1);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0u64;
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// Timings measured by the core thread.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    /// Wall time of one `RelayCore::handle` call: acceptance of every message in the group,
    /// the group's commit (fsync) and building the replies.
    pub group: Histogram,
    /// Wall time of each `COMMIT` alone (the fsync of a group commit).
    pub commit: Histogram,
    /// Per pushed mutation: (group time − commit time) / mutations in the group.
    pub apply: Histogram,
}

/// Results of the scheduled backups of a running relay.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BackupStats {
    pub ok: u64,
    pub failed: u64,
    pub last_success_ms: Option<u64>,
    pub last_file: Option<String>,
    pub last_duration_ms: Option<u64>,
    pub last_error: Option<String>,
}

/// The relay's store as `/metrics` shows it: which kind, and on PostgreSQL how the
/// connections and the other relays' notifications fare.
#[derive(Debug, Default)]
pub struct StoreMetrics {
    /// `sqlite` or `postgres` (empty until the server says).
    pub kind: std::sync::OnceLock<&'static str>,
    /// Store connections of the apply workers replaced after being lost.
    pub reconnects: std::sync::atomic::AtomicU64,
    /// Other relays' commits and access changes heard through `LISTEN`.
    pub notifications: std::sync::atomic::AtomicU64,
    /// Times the listening connection was (re)established (1 after a clean start).
    pub listener_connects: std::sync::atomic::AtomicU64,
    /// From the notifying statement on another relay to its arrival here (same clock on one
    /// machine; across machines it includes their clocks' difference).
    pub notification_lag: Mutex<Histogram>,
}

impl StoreMetrics {
    pub fn add(counter: &std::sync::atomic::AtomicU64, n: u64) {
        counter.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    fn get(counter: &std::sync::atomic::AtomicU64) -> u64 {
        counter.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Everything `/metrics` shows beyond the status snapshot. Shared by the core thread (timings)
/// and the backup task.
#[derive(Debug, Default)]
pub struct Metrics {
    pub timings: Mutex<Timings>,
    pub store: StoreMetrics,
    pub backups: Mutex<BackupStats>,
    /// When the relay started (Unix ms), for `/v1/status` uptime and the start-time gauge.
    pub started_ms: u64,
}

impl Metrics {
    pub fn new() -> Self {
        Metrics {
            timings: Mutex::new(Timings {
                group: Histogram::new(),
                commit: Histogram::new(),
                apply: Histogram::new(),
            }),
            backups: Mutex::new(BackupStats::default()),
            store: StoreMetrics {
                notification_lag: Mutex::new(Histogram::new()),
                ..StoreMetrics::default()
            },
            started_ms: fieldsync_schema::TimeSource::now_ms(&fieldsync_schema::SystemTimeSource),
        }
    }

    /// Seconds since the relay started.
    pub fn uptime_seconds(&self) -> u64 {
        fieldsync_schema::TimeSource::now_ms(&fieldsync_schema::SystemTimeSource).saturating_sub(self.started_ms) / 1000
    }

    pub fn backup_stats(&self) -> BackupStats {
        self.backups.lock().map(|b| b.clone()).unwrap_or_default()
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn single(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    header(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

fn labelled<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    values: impl IntoIterator<Item = (&'a String, &'a u64)>,
) {
    header(out, name, "counter", help);
    for (k, v) in values {
        let _ = writeln!(out, "{name}{{{label}=\"{}\"}} {v}", escape_label(k));
    }
}

/// Renders the whole exposition.
pub fn render(status: &StatusSnapshot, metrics: &Metrics) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let s = &status.stats;
    single(&mut out, "fieldsync_up", "gauge", "1 while the relay serves.", 1);
    header(
        &mut out,
        "fieldsync_build_info",
        "gauge",
        "The relay's version and protocol (always 1).",
    );
    let _ = writeln!(
        out,
        "fieldsync_build_info{{version=\"{}\",protocol=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        fieldsync_schema::wire::PROTOCOL_VERSION
    );
    single(
        &mut out,
        "fieldsync_start_time_seconds",
        "gauge",
        "When the relay started (Unix time).",
        metrics.started_ms as f64 / 1000.0,
    );
    single(
        &mut out,
        "fieldsync_connections",
        "gauge",
        "Open WebSocket connections.",
        status.connections,
    );
    single(
        &mut out,
        "fieldsync_connections_authenticated",
        "gauge",
        "Open connections with an authenticated device.",
        status.authenticated,
    );
    single(
        &mut out,
        "fieldsync_connections_opened_total",
        "counter",
        "WebSocket connections accepted since start.",
        status.connections_opened,
    );
    labelled(
        &mut out,
        "fieldsync_mutations_total",
        "Mutations decided, by outcome (applied, already_applied, conflict, forbidden, ...).",
        "outcome",
        &s.outcomes,
    );
    single(
        &mut out,
        "fieldsync_mutations_applied_total",
        "counter",
        "Mutations applied (committed and acknowledged).",
        s.applied,
    );
    single(
        &mut out,
        "fieldsync_conflicts_total",
        "counter",
        "Mutations answered with a conflict.",
        s.conflicts,
    );
    labelled(
        &mut out,
        "fieldsync_rejections_total",
        "Mutations rejected, by reason.",
        "reason",
        &s.rejections,
    );
    labelled(
        &mut out,
        "fieldsync_auth_failures_total",
        "Refused connections and enrollments, by reason.",
        "reason",
        &s.auth_failures,
    );
    single(
        &mut out,
        "fieldsync_revoked_disconnects_total",
        "counter",
        "Open connections closed because their device was revoked.",
        status.revoked_disconnects,
    );
    single(
        &mut out,
        "fieldsync_audit_records_total",
        "counter",
        "Audit records written since start.",
        s.audit_records,
    );
    single(
        &mut out,
        "fieldsync_commits_total",
        "counter",
        "Group commits.",
        s.commits,
    );
    single(
        &mut out,
        "fieldsync_commit_failures_total",
        "counter",
        "Group commits that failed and were rolled back.",
        s.commit_failures,
    );
    let apply_groups = metrics.timings.lock().map(|t| t.group.count()).unwrap_or(0);
    single(
        &mut out,
        "fieldsync_groups_total",
        "counter",
        "Apply groups: one shard's jobs decided and committed together (as fieldsync_group_seconds counts).",
        apply_groups,
    );
    single(
        &mut out,
        "fieldsync_core_turns_total",
        "counter",
        "Turns of the front thread that handled at least one message (pulls, pings and sign-ins too).",
        status.groups,
    );
    single(
        &mut out,
        "fieldsync_largest_group",
        "gauge",
        "Most messages handled in one group since start.",
        status.largest_group,
    );
    single(
        &mut out,
        "fieldsync_enrollments_total",
        "counter",
        "Devices enrolled.",
        s.enrollments,
    );
    single(
        &mut out,
        "fieldsync_live_entries_sent_total",
        "counter",
        "Feed entries pushed live to connected devices.",
        s.live_entries_sent,
    );
    single(
        &mut out,
        "fieldsync_pull_pages_total",
        "counter",
        "Pull pages served.",
        s.pull_pages,
    );
    single(
        &mut out,
        "fieldsync_fetches_total",
        "counter",
        "Fetch requests answered (records asked for by id).",
        s.fetches,
    );
    single(
        &mut out,
        "fieldsync_send_queue_messages",
        "gauge",
        "Messages waiting in all per-connection send queues.",
        status.send_queue_messages,
    );
    single(
        &mut out,
        "fieldsync_send_queue_max_messages",
        "gauge",
        "Messages waiting in the fullest per-connection send queue.",
        status.send_queue_max,
    );
    single(
        &mut out,
        "fieldsync_slow_reader_disconnects_total",
        "counter",
        "Connections cut because their send queue was full.",
        status.slow_reader_disconnects,
    );
    if let Ok(t) = metrics.timings.lock() {
        t.group.render(
            &mut out,
            "fieldsync_group_seconds",
            "Time to handle one group: acceptance, commit and replies.",
        );
        t.commit.render(
            &mut out,
            "fieldsync_commit_seconds",
            "Time of one group commit (COMMIT with synchronous=FULL).",
        );
        t.apply.render(
            &mut out,
            "fieldsync_apply_seconds",
            "Acceptance time per pushed mutation: (group time - commit time) / mutations in the group.",
        );
    }
    render_store(&mut out, &metrics.store);
    let b = metrics.backup_stats();
    header(
        &mut out,
        "fieldsync_backups_total",
        "counter",
        "Scheduled backups, by result (a backup counts as ok only once its restore drill passed).",
    );
    let _ = writeln!(out, "fieldsync_backups_total{{result=\"ok\"}} {}", b.ok);
    let _ = writeln!(out, "fieldsync_backups_total{{result=\"failed\"}} {}", b.failed);
    if let Some(ms) = b.last_success_ms {
        single(
            &mut out,
            "fieldsync_backup_last_success_timestamp_seconds",
            "gauge",
            "When the last verified scheduled backup finished (Unix time).",
            ms as f64 / 1000.0,
        );
    }
    out
}

fn render_store(out: &mut String, store: &StoreMetrics) {
    let Some(kind) = store.kind.get() else { return };
    header(
        out,
        "fieldsync_store_info",
        "gauge",
        "The relay's store: sqlite or postgres.",
    );
    let _ = writeln!(out, "fieldsync_store_info{{kind=\"{kind}\"}} 1");
    if *kind != "postgres" {
        return;
    }
    single(
        out,
        "fieldsync_store_reconnects_total",
        "counter",
        "Apply workers' PostgreSQL connections replaced after being lost (the transaction on the lost one was rolled back).",
        StoreMetrics::get(&store.reconnects),
    );
    single(
        out,
        "fieldsync_notifications_total",
        "counter",
        "Other relays' commits and access changes heard through LISTEN.",
        StoreMetrics::get(&store.notifications),
    );
    single(
        out,
        "fieldsync_notification_connects_total",
        "counter",
        "Times the LISTEN connection was established; more than one means notifications were missed and caught up from the feed.",
        StoreMetrics::get(&store.listener_connects),
    );
    if let Ok(lag) = store.notification_lag.lock() {
        lag.render(
            out,
            "fieldsync_notification_lag_seconds",
            "From another relay's notifying statement to its arrival here (includes the machines' clock difference).",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_with_inf() {
        let mut h = Histogram::new();
        h.observe_n(0.0002, 2);
        h.observe_n(0.003, 1);
        h.observe_n(30.0, 1);
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "help");
        assert!(out.contains("x_seconds_bucket{le=\"0.0001\"} 0\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.00025\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.005\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"10\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_seconds_count 4\n"), "{out}");
    }

    #[test]
    fn every_sample_line_belongs_to_a_declared_metric() {
        let mut status = StatusSnapshot::new(uuid::Uuid::nil());
        status.stats.outcomes.insert("applied".into(), 3);
        status.stats.rejections.insert("forbidden\"x".into(), 1);
        let text = render(&status, &Metrics::new());
        let mut declared = std::collections::BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap_or_default().to_string());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            let base = name
                .strip_suffix("_bucket")
                .or_else(|| name.strip_suffix("_sum"))
                .or_else(|| name.strip_suffix("_count"))
                .filter(|b| declared.contains(*b))
                .unwrap_or(name);
            assert!(declared.contains(base), "undeclared sample {line}");
            assert!(name.starts_with("fieldsync_"), "{line}");
        }
        assert!(text.contains(&format!(
            "fieldsync_build_info{{version=\"{}\",protocol=\"2\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(
            text.contains("fieldsync_groups_total 0\n"),
            "no apply group yet: {text}"
        );
        assert!(text.contains("fieldsync_mutations_total{outcome=\"applied\"} 3"));
        assert!(text.contains("fieldsync_rejections_total{reason=\"forbidden\\\"x\"} 1"));
    }
}
