//! Connecting and enrolling (SPEC §4, §7): `Hello` → `Challenge` → `Auth` → `Welcome`, and the
//! one-shot `Enroll` that registers a device key with a single-use token.

use std::collections::{BTreeMap, BTreeSet};

use fieldsync_schema::signing::{self, connect_signing_bytes, enroll_signing_bytes, rotate_signing_bytes};
use fieldsync_schema::wire::{AuthFailure, PROTOCOL_VERSION, SpaceGrant, UserInfo};
use fieldsync_schema::{Bytes, RelayMessage, SchemaHash, ids};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::{ConnState, Front, Session, Turn};
use crate::core::{CloseReason, ConnId, Output};
use crate::store::{Directory, MembershipRow, SpaceStore, StoreError, UserRow};

/// What a device's `Hello` asks for.
pub(crate) struct HelloRequest {
    pub protocol_version: u16,
    pub device_id: Uuid,
    /// The device's schema hash and version.
    pub schema: (SchemaHash, u64),
    pub types: Option<BTreeSet<String>>,
    pub windowed: bool,
    pub priority_order: bool,
    pub metered: bool,
}

pub(crate) struct EnrollRequest<'a> {
    pub protocol_version: u16,
    pub token: &'a str,
    pub device_id: Uuid,
    pub public_key: &'a [u8],
    /// The device's schema hash and version.
    pub schema: (SchemaHash, u64),
    pub proof: &'a [u8],
    /// The revoked device this enrollment takes over from (`enroll --new-identity`).
    pub replaces: Option<&'a fieldsync_schema::wire::Replacement>,
}

/// What a device is told about its user: name and the spaces it may see, with its roles.
pub(super) fn user_info(user: &UserRow, memberships: Vec<MembershipRow>) -> UserInfo {
    UserInfo {
        user_id: user.user_id,
        name: user.name.clone(),
        spaces: memberships
            .into_iter()
            .map(|m| SpaceGrant {
                space_id: m.space_id,
                name: m.space_name,
                role: m.role,
            })
            .collect(),
    }
}

/// Tokens are stored hashed, so reading the database does not let anyone enroll a device.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.trim().as_bytes()).into()
}

impl<D: Directory, R: SpaceStore> Front<D, R> {
    fn auth_failed(&mut self, conn: ConnId, reason: AuthFailure, message: String, out: &mut Vec<Output>) {
        *self.stats.auth_failures.entry(reason.as_str().to_string()).or_insert(0) += 1;
        tracing::info!(conn, reason = reason.as_str(), %message, "authentication failed");
        out.push(Output::Send(conn, RelayMessage::AuthFailed { reason, message }));
        self.close(conn, CloseReason::policy(reason.as_str()), out);
    }

    /// `schema` is the device's schema hash and version (0 when the device does not say).
    fn check_versions(
        &mut self,
        conn: ConnId,
        protocol_version: u16,
        (schema_hash, schema_version): (SchemaHash, u64),
        out: &mut Vec<Output>,
    ) -> bool {
        if protocol_version != PROTOCOL_VERSION {
            self.auth_failed(
                conn,
                AuthFailure::UnsupportedProtocol,
                format!("this relay speaks protocol {PROTOCOL_VERSION}, the device {protocol_version}"),
                out,
            );
            return false;
        }
        if schema_hash == self.schema.hash() || self.config.schemas.compatible.contains_key(&schema_hash) {
            return true;
        }
        let current = self.schema.version();
        if schema_version > current {
            self.auth_failed(
                conn,
                AuthFailure::SchemaAhead,
                format!(
                    "the relay has not been upgraded to schema v{schema_version} yet (it serves v{current}); the \
                     device keeps its changes and syncs once it is"
                ),
                out,
            );
            return false;
        }
        let message = match self.config.schemas.retired.get(&schema_hash) {
            Some(old) => format!(
                "the device's schema v{old} is no longer accepted: the relay serves v{current}, which changed it \
                 incompatibly; update the app"
            ),
            None => format!(
                "the device's schema ({}{}) is not one this relay has served (it serves v{current}, {}); update the \
                 app — or, if that app version shipped while the relay ran an older one, start the relay with \
                 `--accept-schema` and its schema file",
                if schema_version > 0 {
                    format!("v{schema_version}, ")
                } else {
                    String::new()
                },
                schema_hash.to_hex(),
                self.schema.hash().to_hex()
            ),
        };
        self.auth_failed(conn, AuthFailure::SchemaMismatch, message, out);
        false
    }

    pub(super) fn on_hello(
        &mut self,
        conn: ConnId,
        hello: HelloRequest,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) -> Result<(), StoreError> {
        let HelloRequest {
            protocol_version,
            device_id,
            schema,
            types,
            windowed,
            priority_order,
            metered,
        } = hello;
        if !matches!(self.conns.get(&conn), Some(ConnState::Fresh)) {
            self.protocol_close(conn, "hello sent twice", out);
            return Ok(());
        }
        if !self.check_versions(conn, protocol_version, schema, out) {
            return Ok(());
        }
        match self.directory.device(device_id)? {
            None => {
                self.auth_failed(
                    conn,
                    AuthFailure::UnknownDevice,
                    format!("device {device_id} is not enrolled"),
                    out,
                );
            }
            // A device to be wiped is let through the challenge: only it may report the wipe.
            Some(d) if d.revoked_ms.is_some() && !d.wipe_pending() => {
                self.auth_failed(
                    conn,
                    AuthFailure::Revoked,
                    format!("device {device_id} was revoked"),
                    out,
                );
            }
            Some(_) => {
                let nonce = ids::random_bytes(&mut self.rng, 32);
                self.conns.insert(
                    conn,
                    ConnState::Challenged {
                        device_id,
                        nonce: nonce.clone(),
                        issued_ms: now_ms,
                        types,
                        windowed,
                        priority_order,
                        metered,
                    },
                );
                out.push(Output::Send(
                    conn,
                    RelayMessage::Challenge {
                        relay_id: self.relay_id,
                        nonce: Bytes(nonce),
                    },
                ));
            }
        }
        Ok(())
    }

    pub(super) fn on_auth(
        &mut self,
        conn: ConnId,
        signature: &[u8],
        now_ms: u64,
        out: &mut Vec<Output>,
    ) -> Result<(), StoreError> {
        // Taking the state out makes the nonce single-use whatever happens next.
        let Some(ConnState::Challenged {
            device_id,
            nonce,
            issued_ms,
            types,
            windowed,
            priority_order,
            metered,
        }) = self.conns.insert(conn, ConnState::Fresh)
        else {
            self.protocol_close(conn, "auth without a challenge", out);
            return Ok(());
        };
        if now_ms.saturating_sub(issued_ms) > self.config.nonce_ttl_ms {
            self.auth_failed(
                conn,
                AuthFailure::NonceExpired,
                "the challenge expired; reconnect".into(),
                out,
            );
            return Ok(());
        }
        // Re-read the device: it may have been revoked since the challenge was issued.
        let Some(device) = self.directory.device(device_id)? else {
            self.auth_failed(
                conn,
                AuthFailure::UnknownDevice,
                format!("device {device_id} is not enrolled"),
                out,
            );
            return Ok(());
        };
        if device.revoked_ms.is_some() && !device.wipe_pending() {
            self.auth_failed(
                conn,
                AuthFailure::Revoked,
                format!("device {device_id} was revoked"),
                out,
            );
            return Ok(());
        }
        let Ok(public_key) = <[u8; 32]>::try_from(device.public_key.as_slice()) else {
            return Err(StoreError::Corrupt(format!(
                "device {device_id} has a malformed public key"
            )));
        };
        // A key registered before keys were checked strictly is refused, not trusted.
        let Ok(verifier) = signing::Verifier::new(&public_key) else {
            self.auth_failed(
                conn,
                AuthFailure::BadKey,
                format!("device {device_id} is registered with a weak key; enroll it again"),
                out,
            );
            return Ok(());
        };
        let message = connect_signing_bytes(PROTOCOL_VERSION, &self.relay_id, &nonce, &device_id, &public_key);
        if verifier.verify(&message, signature).is_err() {
            self.auth_failed(
                conn,
                AuthFailure::BadSignature,
                "the challenge signature does not verify".into(),
                out,
            );
            return Ok(());
        }
        if device.wipe_pending() {
            self.order_wipe(conn, device_id, out);
            return Ok(());
        }
        let Some(user) = self.directory.user(device.user_id)? else {
            return Err(StoreError::Corrupt(format!(
                "device {device_id} belongs to a missing user"
            )));
        };
        let memberships = self.directory.memberships(user.user_id)?;
        // Last-seen is for operators; a full disk must not stop devices from signing in to
        // read (pulls need no writes).
        if let Err(e) = self.directory.touch_device(device_id, now_ms) {
            tracing::warn!(device_id = %device_id, error = %e, "could not record when the device was last seen");
        }
        let spaces: BTreeMap<Uuid, fieldsync_schema::Role> = memberships.iter().map(|m| (m.space_id, m.role)).collect();
        let info = user_info(&user, memberships);
        tracing::info!(conn, device_id = %device_id, user_id = %user.user_id, "device authenticated");
        self.conns.insert(
            conn,
            ConnState::Ready(Box::new(Session {
                device_id,
                user_id: user.user_id,
                public_key: public_key.to_vec(),
                verifier,
                spaces,
                replaces: device.replaces,
                types,
                windowed,
                priority_order,
                metered,
                live: None,
                tokens: self.config.rate_burst,
                tokens_at_ms: now_ms,
                seen_recorded_ms: now_ms,
            })),
        );
        out.push(Output::Send(
            conn,
            RelayMessage::Welcome {
                relay_id: self.relay_id,
                user: info,
                server_time_ms: now_ms,
                max_batch: self.config.max_batch as u32,
                schema_version: self.schema.version(),
                // This relay reads compressed frames (the connection decodes both forms).
                compression: true,
                fetch: true,
                priority: true,
            },
        ));
        Ok(())
    }

    pub(super) fn on_enroll(
        &mut self,
        conn: ConnId,
        req: EnrollRequest<'_>,
        now_ms: u64,
        turn: &mut Turn,
        out: &mut Vec<Output>,
    ) -> Result<(), StoreError> {
        if !matches!(self.conns.get(&conn), Some(ConnState::Fresh)) {
            self.protocol_close(conn, "enroll on a connection already in use", out);
            return Ok(());
        }
        if !self.check_versions(conn, req.protocol_version, req.schema, out) {
            return Ok(());
        }
        let hash = token_hash(req.token);
        let Some(token) = self.directory.token(&hash)? else {
            self.auth_failed(conn, AuthFailure::InvalidToken, "unknown enrollment token".into(), out);
            return Ok(());
        };
        if token.used_ms.is_some() {
            self.auth_failed(
                conn,
                AuthFailure::TokenUsed,
                "this enrollment token was already used".into(),
                out,
            );
            return Ok(());
        }
        if now_ms >= token.expires_ms {
            self.auth_failed(
                conn,
                AuthFailure::TokenExpired,
                "this enrollment token has expired".into(),
                out,
            );
            return Ok(());
        }
        let Ok(public_key) = <[u8; 32]>::try_from(req.public_key) else {
            self.auth_failed(conn, AuthFailure::BadKey, "the public key is not 32 bytes".into(), out);
            return Ok(());
        };
        let verifier = match signing::Verifier::new(&public_key) {
            Ok(v) => v,
            Err(e) => {
                self.auth_failed(
                    conn,
                    AuthFailure::BadKey,
                    format!("the presented public key is refused: {e}"),
                    out,
                );
                return Ok(());
            }
        };
        let message = enroll_signing_bytes(req.token.trim(), &req.device_id, &public_key);
        if verifier.verify(&message, req.proof).is_err() {
            self.auth_failed(
                conn,
                AuthFailure::BadSignature,
                "the enrollment proof does not verify with the presented key".into(),
                out,
            );
            return Ok(());
        }
        if self.directory.device(req.device_id)?.is_some() {
            self.auth_failed(
                conn,
                AuthFailure::AlreadyEnrolled,
                format!("device {} is already enrolled", req.device_id),
                out,
            );
            return Ok(());
        }
        let Some(user) = self.directory.user(token.user_id)? else {
            return Err(StoreError::Corrupt("enrollment token for a missing user".into()));
        };
        if let Some(replacement) = req.replaces
            && let Err(refusal) = self.replacement_refusal(replacement, &req, &public_key, user.user_id)?
        {
            self.auth_failed(conn, refusal.0, refusal.1, out);
            return Ok(());
        }
        self.directory
            .register_device(req.device_id, user.user_id, &public_key, now_ms)?;
        if let Some(replacement) = req.replaces {
            self.directory
                .set_device_replaces(req.device_id, replacement.device_id)?;
            tracing::info!(conn, device_id = %req.device_id, replaces = %replacement.device_id,
                "a revoked device enrolled a new identity to carry its unsynced changes");
        }
        self.directory.use_token(&hash, req.device_id, now_ms)?;
        if let Some(label) = &token.label {
            self.directory.set_device_label(req.device_id, label)?;
        }
        let memberships = self.directory.memberships(user.user_id)?;
        self.stats.enrollments += 1;
        tracing::info!(conn, device_id = %req.device_id, user_id = %user.user_id, "device enrolled");
        turn.replies.push((
            conn,
            RelayMessage::Enrolled {
                relay_id: self.relay_id,
                user: user_info(&user, memberships),
            },
        ));
        turn.closes.push((conn, CloseReason::normal("enrolled")));
        Ok(())
    }

    /// Why a new identity may not take over from `replacement.device_id`, if it may not: the
    /// old device must exist, belong to the token's user, be revoked, never have been ordered
    /// to wipe (its data is meant to be gone), not have been taken over already, and its key
    /// must have signed this hand-over.
    fn replacement_refusal(
        &self,
        replacement: &fieldsync_schema::wire::Replacement,
        req: &EnrollRequest<'_>,
        new_key: &[u8; 32],
        user_id: Uuid,
    ) -> Result<Result<(), (AuthFailure, String)>, StoreError> {
        let old_id = replacement.device_id;
        let refuse = |message: String| Ok(Err((AuthFailure::Revoked, message)));
        let Some(old) = self.directory.device(old_id)?.filter(|d| d.user_id == user_id) else {
            return refuse(format!("device {old_id} is not a device of this token's user"));
        };
        if old.revoked_ms.is_none() {
            return refuse(format!(
                "device {old_id} is not revoked: it syncs its own changes (a new identity is only for a revoked device)"
            ));
        }
        if old.wipe_requested_ms.is_some() {
            return refuse(format!(
                "device {old_id} was ordered to erase its data: its changes are not carried to a new identity"
            ));
        }
        if let Some(successor) = self.directory.replaced_by(old_id)? {
            return refuse(format!("device {old_id} was already taken over by device {successor}"));
        }
        let Ok(old_key) = <[u8; 32]>::try_from(old.public_key.as_slice()) else {
            return Err(StoreError::Corrupt(format!("device {old_id} has a malformed key")));
        };
        let message = signing::replace_signing_bytes(req.token.trim(), &old_id, &req.device_id, new_key);
        if signing::verify(&old_key, &message, &replacement.signature.0).is_err() {
            return Ok(Err((
                AuthFailure::BadSignature,
                format!("the hand-over is not signed by device {old_id}'s key"),
            )));
        }
        Ok(Ok(()))
    }

    pub(super) fn on_rotate_key(
        &mut self,
        conn: ConnId,
        new_key: &[u8],
        signature: &[u8],
        turn: &mut Turn,
        out: &mut Vec<Output>,
    ) -> Result<(), StoreError> {
        let Some(ConnState::Ready(session)) = self.conns.get(&conn) else {
            self.protocol_close(conn, "key rotation before authentication", out);
            return Ok(());
        };
        let (device_id, old_key) = (session.device_id, session.public_key.clone());
        let (Ok(old), Ok(new)) = (<[u8; 32]>::try_from(old_key.as_slice()), <[u8; 32]>::try_from(new_key)) else {
            self.protocol_close(conn, "malformed key", out);
            return Ok(());
        };
        // Only a strict key may replace the old one: a weak key would let anyone sign as this
        // device from then on.
        let verifier = match signing::Verifier::new(&new) {
            Ok(v) => v,
            Err(e) => {
                self.auth_failed(conn, AuthFailure::BadKey, format!("the new key is refused: {e}"), out);
                return Ok(());
            }
        };
        let message = rotate_signing_bytes(&device_id, &old, &new);
        if signing::verify(&old, &message, signature).is_err() {
            self.auth_failed(
                conn,
                AuthFailure::BadSignature,
                "the old key did not sign the new key".into(),
                out,
            );
            return Ok(());
        }
        self.directory.set_device_key(device_id, &new)?;
        if let Some(ConnState::Ready(s)) = self.conns.get_mut(&conn) {
            s.public_key = new.to_vec();
            s.verifier = verifier;
        }
        // The old key is retired everywhere at once: other sessions of this device proved
        // themselves with it, so they end and must log in again with the new key.
        let others: Vec<ConnId> = self
            .conns
            .iter()
            .filter_map(|(id, st)| match st {
                ConnState::Ready(s) if s.device_id == device_id && *id != conn => Some(*id),
                // A pending challenge is answered against the stored key, the new one.
                _ => None,
            })
            .collect();
        for other in others {
            self.close(
                other,
                CloseReason::policy("the device key was rotated; reconnect with the new key"),
                out,
            );
        }
        tracing::info!(conn, device_id = %device_id, "device key rotated");
        turn.replies.push((conn, RelayMessage::KeyRotated));
        Ok(())
    }

    /// Tells a device that proved its key, and was revoked with a wipe, to erase its data. Its
    /// session is over: nothing but its report is taken from it.
    pub(super) fn order_wipe(&mut self, conn: ConnId, device_id: Uuid, out: &mut Vec<Output>) {
        tracing::warn!(conn, device_id = %device_id, "revoked device told to erase its local data");
        self.conns.insert(conn, ConnState::Wiping { device_id });
        out.push(Output::Send(conn, RelayMessage::Wipe));
    }

    /// The device reports its wipe: recorded in the directory (when, and how many unsynced
    /// changes it discarded), then it is refused as any revoked device, after the commit.
    pub(super) fn on_wiped(
        &mut self,
        conn: ConnId,
        discarded: u64,
        now_ms: u64,
        turn: &mut Turn,
    ) -> Result<(), StoreError> {
        let Some(ConnState::Wiping { device_id }) = self.conns.get(&conn) else {
            return Ok(());
        };
        let device_id = *device_id;
        // `false`: another relay of the cluster recorded this device's earlier report.
        if self.directory.record_wipe(device_id, now_ms, discarded)? {
            tracing::warn!(conn, device_id = %device_id, discarded, "revoked device erased its local data");
        }
        turn.replies.push((
            conn,
            RelayMessage::AuthFailed {
                reason: AuthFailure::Revoked,
                message: format!("device {device_id} was revoked and has erased its local data"),
            },
        ));
        turn.closes
            .push((conn, CloseReason::policy(AuthFailure::Revoked.as_str())));
        Ok(())
    }
}
