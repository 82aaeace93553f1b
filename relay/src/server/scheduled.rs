//! Scheduled backups of the running relay: one at start, then every `--backup-every`, each
//! verified by a restore drill, keeping the newest `--backup-keep`. The copying and checking
//! run on a blocking thread; the core thread never waits for them (online backup reads from its
//! own connection).

use std::path::PathBuf;
use std::sync::Arc;

use fieldsync_schema::sqlite_key::DatabaseKey;
use fieldsync_schema::{SystemTimeSource, TimeSource};

use super::metrics::Metrics;
use crate::backup::{self, BackupError, ScheduledBackup};
use crate::config::BackupSchedule;

pub(crate) async fn run(data_dir: PathBuf, schedule: BackupSchedule, key: Option<DatabaseKey>, metrics: Arc<Metrics>) {
    tracing::info!(
        dir = %schedule.dir.display(),
        every = %humantime::format_duration(schedule.every),
        keep = schedule.keep,
        "scheduled backups on"
    );
    let mut every = tokio::time::interval(schedule.every);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let (data_dir, dir, keep, key) = (data_dir.clone(), schedule.dir.clone(), schedule.keep, key.clone());
        let started = SystemTimeSource.now_ms();
        let result =
            tokio::task::spawn_blocking(move || backup::scheduled_backup(&data_dir, &dir, keep, started, key.as_ref()))
                .await;
        let result = match result {
            Ok(r) => r,
            Err(e) => Err(BackupError::DrillFailed(format!("the backup task failed: {e}"))),
        };
        record(&metrics, result, SystemTimeSource.now_ms(), started);
    }
}

fn record(metrics: &Metrics, result: Result<ScheduledBackup, BackupError>, now_ms: u64, started_ms: u64) {
    let Ok(mut stats) = metrics.backups.lock() else { return };
    stats.last_duration_ms = Some(now_ms.saturating_sub(started_ms));
    match result {
        Ok(b) => {
            tracing::info!(
                file = %b.backup.file.display(),
                bytes = b.backup.bytes,
                pruned = b.pruned.len(),
                "backup taken; {}",
                b.drill.verdict()
            );
            stats.ok += 1;
            stats.last_success_ms = Some(now_ms);
            stats.last_file = Some(b.backup.file.display().to_string());
            stats.last_error = None;
        }
        Err(e) => {
            tracing::error!(error = %e, "scheduled backup failed");
            stats.failed += 1;
            stats.last_error = Some(e.to_string());
        }
    }
}
