//! Plain HTTP endpoints next to the WebSocket: liveness, Prometheus metrics, a JSON status.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Serialize;

use super::metrics::BackupStats;
use super::{Shared, StatusSnapshot};

#[derive(Serialize)]
struct Status {
    version: &'static str,
    protocol: u16,
    uptime_seconds: u64,
    #[serde(flatten)]
    snapshot: StatusSnapshot,
    backups: BackupStats,
}

pub(crate) async fn healthz() -> &'static str {
    "ok\n"
}

pub(crate) async fn status(State(shared): State<Shared>) -> impl IntoResponse {
    let snapshot = match shared.status.lock() {
        Ok(s) => s.clone(),
        Err(_) => return Err((StatusCode::INTERNAL_SERVER_ERROR, "status unavailable")),
    };
    Ok(Json(Status {
        version: env!("CARGO_PKG_VERSION"),
        protocol: fieldsync_schema::wire::PROTOCOL_VERSION,
        uptime_seconds: shared.metrics.uptime_seconds(),
        snapshot,
        backups: shared.metrics.backup_stats(),
    }))
}

/// Prometheus text exposition format 0.0.4.
pub(crate) async fn metrics(State(shared): State<Shared>) -> impl IntoResponse {
    let snapshot = match shared.status.lock() {
        Ok(s) => s.clone(),
        Err(_) => return Err((StatusCode::INTERNAL_SERVER_ERROR, "metrics unavailable")),
    };
    let body = super::metrics::render(&snapshot, &shared.metrics);
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        body,
    ))
}
