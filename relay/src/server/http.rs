//! Plain HTTP endpoints next to the WebSocket: liveness and a JSON status.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;

use super::Shared;

pub(crate) async fn healthz() -> &'static str {
    "ok\n"
}

pub(crate) async fn status(State(shared): State<Shared>) -> impl IntoResponse {
    match shared.status.lock() {
        Ok(s) => Ok(Json(s.clone())),
        Err(_) => Err((StatusCode::INTERNAL_SERVER_ERROR, "status unavailable")),
    }
}
