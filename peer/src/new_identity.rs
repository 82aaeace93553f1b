//! A revoked device's way back (issue 19). A device revoked by mistake, or a lost tablet that
//! turned up, keeps every local write, but none of them can sync: the relay refuses the device,
//! and re-enrolling it is refused too (the identity is already enrolled). With a fresh token
//! from the operator, the device enrolls a *new* identity (a new id and key) that takes over
//! its unconfirmed changes: the old key signs the hand-over, the relay checks that the old
//! device is revoked, was never ordered to wipe, belongs to the token's user and was not taken
//! over before, and records which device the new one replaces. Every unconfirmed envelope is
//! then re-signed by the new identity with its mutation id unchanged (the relay applied none
//! of them from the revoked device; one it did apply before the revocation is answered from
//! its receipt). The changes inside stay authored by the old device's Automerge actor, which
//! the relay accepts from the device that replaces it.

use fieldsync_schema::signing::replace_signing_bytes;
use fieldsync_schema::wire::{Replacement, UserInfo};
use fieldsync_schema::{Bytes, ClientMessage, DeviceKey, HlcClock, ids};
use rusqlite::TransactionBehavior;
use serde::Serialize;
use uuid::Uuid;

use crate::db::{self, keys};
use crate::device::Device;
use crate::error::{PeerError, Result};
use crate::outbox;

/// A new identity generated for a hand-over, not yet enrolled (nothing stored).
pub struct PendingIdentity {
    device_id: Uuid,
    key: DeviceKey,
    /// The enrollment to send: the new key's proof and the old key's hand-over.
    pub request: ClientMessage,
}

/// What [`Device::adopt_identity`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IdentityReport {
    pub old_device_id: Uuid,
    pub new_device_id: Uuid,
    /// Unconfirmed changes re-signed by the new identity (same mutation ids).
    pub carried: u64,
}

impl Device {
    /// Whether the relay refused this device as revoked (its writes are kept but cannot sync
    /// until `enroll --new-identity`).
    pub fn is_revoked(&self) -> Result<bool> {
        Ok(db::meta_get(&self.conn, keys::AUTH_FAILED)?.is_some_and(|r| r.starts_with("revoked")))
    }

    /// A fresh identity and the enrollment that hands this device's unconfirmed changes to it.
    /// Refused on a wiped device (its data is meant to be gone) and on one never enrolled.
    pub fn new_identity_request(&mut self, token: &str) -> Result<PendingIdentity> {
        if let Some(w) = self.wiped()? {
            return Err(PeerError::Wiped {
                at_ms: w.wiped_at_ms,
                discarded: w.discarded,
            });
        }
        if self.enrollment.is_none() {
            return Err(PeerError::NotAllowed(
                "this device was never enrolled: enroll it with the token (a new identity is for a revoked device)"
                    .into(),
            ));
        }
        let token = token.trim();
        let device_id = ids::new_uuid(&mut self.rng);
        let key = DeviceKey::generate(&mut self.rng);
        let mut request = ClientMessage::enroll(&key, token, device_id, &self.schema);
        let consent = replace_signing_bytes(token, &self.device_id, &device_id, &key.public_key());
        if let ClientMessage::Enroll { replaces, .. } = &mut request {
            *replaces = Some(Box::new(Replacement {
                device_id: self.device_id,
                signature: Bytes(self.key.sign(&consent).to_vec()),
            }));
        }
        Ok(PendingIdentity {
            device_id,
            key,
            request,
        })
    }

    /// Adopts the identity the relay enrolled, in one transaction: the new id and key, every
    /// unconfirmed envelope re-signed by it, the refusal cleared, the user as the relay reported
    /// it. Refused when the relay is another cluster than the one this device belonged to.
    pub fn adopt_identity(
        &mut self,
        pending: PendingIdentity,
        relay_id: Uuid,
        user: UserInfo,
    ) -> Result<IdentityReport> {
        let Some(mut enrollment) = self.enrollment.clone() else {
            return Err(PeerError::NotAllowed("this device was never enrolled".into()));
        };
        if enrollment.relay_id != relay_id || enrollment.user.user_id != user.user_id {
            return Err(PeerError::NotAllowed(format!(
                "the new identity was enrolled with relay {relay_id} for user {}, but this device belongs to relay {} and user {}",
                user.user_id, enrollment.relay_id, enrollment.user.user_id
            )));
        }
        let PendingIdentity { device_id, key, .. } = pending;
        let old_device_id = self.device_id;
        if !user.spaces.iter().any(|s| s.space_id == enrollment.default_space)
            && let Some(first) = user.spaces.first()
        {
            enrollment.default_space = first.space_id;
        }
        enrollment.user = user;
        let mut hlc = HlcClock::resume(device_id, Some(self.hlc.last()));
        if let Some(stored) = db::meta_get_json::<fieldsync_schema::Hlc>(&self.conn, keys::HLC)?
            && stored > hlc.last()
        {
            hlc = HlcClock::resume(device_id, Some(stored));
        }
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        db::meta_set(&tx, keys::DEVICE_ID, &device_id.to_string())?;
        db::meta_set(&tx, keys::SECRET_KEY, &hex::encode(key.secret_bytes()))?;
        db::meta_set(&tx, keys::REPLACED_DEVICE, &old_device_id.to_string())?;
        db::meta_set_json(&tx, keys::HLC, &hlc.last())?;
        db::meta_set_json(&tx, keys::ENROLLMENT, &enrollment)?;
        db::meta_delete(&tx, keys::AUTH_FAILED)?;
        let mut carried = 0;
        for (seq, mut m) in outbox::unconfirmed(&tx)? {
            m.device_id = device_id;
            m.client_timestamp.device = device_id;
            key.sign_mutation(&mut m);
            outbox::replace_envelope(&tx, seq, &m)?;
            carried += 1;
        }
        tx.commit()?;
        self.device_id = device_id;
        self.key = key;
        self.hlc = hlc;
        self.enrollment = Some(enrollment);
        Ok(IdentityReport {
            old_device_id,
            new_device_id: device_id,
            carried,
        })
    }
}
