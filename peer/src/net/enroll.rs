//! Enrollment: present a single-use token and this device's public key; become a device of
//! the token's user.

use fieldsync_schema::{ClientMessage, RelayMessage};

use super::{NetError, TlsOptions, close, connect, receive, send};
use crate::device::{Device, Enrollment};

/// Registers this device with the relay and records the enrollment (adopting any data written
/// before it into the user's first space). Returns the enrollment.
pub async fn enroll(dev: &mut Device, relay_url: &str, token: &str) -> Result<Enrollment, NetError> {
    enroll_with_tls(dev, relay_url, token, &TlsOptions::default()).await
}

/// [`enroll`] with a custom trust for a `wss://` relay (e.g. a private CA file).
pub async fn enroll_with_tls(
    dev: &mut Device,
    relay_url: &str,
    token: &str,
    tls: &TlsOptions,
) -> Result<Enrollment, NetError> {
    let request = ClientMessage::enroll(dev.key(), token.trim(), dev.device_id(), dev.schema());
    let reply = exchange(relay_url, &request, tls).await?;
    complete(dev, relay_url, reply)
}

/// A revoked device enrolls a fresh identity with a new token from its operator and hands it
/// every unconfirmed change ([`crate::new_identity`]), at the relay it was enrolled with.
pub async fn enroll_new_identity(
    dev: &mut Device,
    token: &str,
    tls: &TlsOptions,
) -> Result<crate::IdentityReport, NetError> {
    let relay_url = dev
        .enrollment()
        .map(|e| e.relay_url.clone())
        .ok_or(NetError::NotEnrolled)?;
    let pending = dev.new_identity_request(token)?;
    match exchange(&relay_url, &pending.request, tls).await? {
        RelayMessage::Enrolled { relay_id, user } => Ok(dev.adopt_identity(pending, relay_id, user)?),
        other => Err(refusal(other)),
    }
}

/// The network half of enrollment: the request out, the relay's answer back. Needs no device,
/// so a caller sharing one (an app's [`crate::Client`]) holds no lock while it waits.
pub(crate) async fn exchange(
    relay_url: &str,
    request: &ClientMessage,
    tls: &TlsOptions,
) -> Result<RelayMessage, NetError> {
    super::endpoint(relay_url)?;
    let mut socket = connect(relay_url, tls).await?;
    send(&mut socket, request).await?;
    let reply = receive(&mut socket).await;
    close(&mut socket).await;
    reply
}

/// The device half: records the enrollment the relay granted, or says why it refused.
pub(crate) fn complete(dev: &mut Device, relay_url: &str, reply: RelayMessage) -> Result<Enrollment, NetError> {
    match reply {
        RelayMessage::Enrolled { relay_id, user } => {
            let Some(default_space) = user.spaces.first().map(|s| s.space_id) else {
                return Err(NetError::EnrollRefused {
                    reason: "no_space",
                    message: format!(
                        "user {} belongs to no space yet; ask the relay operator to add them",
                        user.name
                    ),
                });
            };
            dev.enroll_complete(relay_url.trim(), relay_id, user, default_space)?;
            dev.enrollment().cloned().ok_or(NetError::NotEnrolled)
        }
        other => Err(refusal(other)),
    }
}

/// What an answer other than `Enrolled` means: the relay's refusal, or a confused relay.
fn refusal(reply: RelayMessage) -> NetError {
    match reply {
        RelayMessage::AuthFailed { reason, message } => NetError::EnrollRefused {
            reason: reason.as_str(),
            message,
        },
        RelayMessage::Error { message, .. } => NetError::EnrollRefused {
            reason: "error",
            message,
        },
        other => NetError::ConnectionLost(format!("unexpected `{}` during enrollment", other.name())),
    }
}
