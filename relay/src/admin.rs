//! Administrative operations on a relay store: spaces, users and roles, enrollment tokens,
//! devices. The CLI, the tests and the simulator all go through these, so a rule (say, that a
//! token is stored hashed) holds whichever way a relay is set up.

use fieldsync_schema::{Role, ids};
use rand_core::Rng;
use uuid::Uuid;

use crate::core::token_hash;
use crate::store::{SpaceRow, Store, StoreError, StoreResult, UserRow};

/// How long an enrollment token stays valid unless told otherwise.
pub const DEFAULT_TOKEN_TTL_MS: u64 = 24 * 60 * 60 * 1000;

pub fn add_space(store: &mut dyn Store, name: &str, now_ms: u64, rng: &mut impl Rng) -> StoreResult<SpaceRow> {
    let name = name.trim();
    if name.is_empty() {
        return Err(StoreError::Conflict("a space needs a name".into()));
    }
    let space_id = ids::new_uuid(rng);
    store.create_space(space_id, name, now_ms)?;
    Ok(SpaceRow {
        space_id,
        name: name.to_string(),
        created_ms: now_ms,
    })
}

/// Creates the user if needed and gives them `role` in the space (changing an existing role).
pub fn add_user(
    store: &mut dyn Store,
    name: &str,
    space_name: &str,
    role: Role,
    now_ms: u64,
    rng: &mut impl Rng,
) -> StoreResult<UserRow> {
    let name = name.trim();
    if name.is_empty() {
        return Err(StoreError::Conflict("a user needs a name".into()));
    }
    let space = store
        .space_by_name(space_name)?
        .ok_or_else(|| StoreError::NotFound(format!("no space named `{space_name}`")))?;
    let user = match store.user_by_name(name)? {
        Some(u) => u,
        None => {
            let user_id = ids::new_uuid(rng);
            store.create_user(user_id, name, now_ms)?;
            UserRow {
                user_id,
                name: name.to_string(),
                created_ms: now_ms,
            }
        }
    };
    store.set_membership(user.user_id, space.space_id, role)?;
    Ok(user)
}

/// A single-use enrollment token for the user, valid for `ttl_ms`. Only its hash is stored.
pub fn create_enrollment_token(
    store: &mut dyn Store,
    user_name: &str,
    ttl_ms: u64,
    now_ms: u64,
    rng: &mut impl Rng,
) -> StoreResult<(String, u64)> {
    let user = store
        .user_by_name(user_name)?
        .ok_or_else(|| StoreError::NotFound(format!("no user named `{user_name}`")))?;
    let token = format!("fse_{}", hex::encode(ids::random_bytes(rng, 20)));
    let expires_ms = now_ms.saturating_add(ttl_ms);
    store.create_token(token_hash(&token), user.user_id, now_ms, expires_ms)?;
    Ok((token, expires_ms))
}

pub fn revoke_device(store: &mut dyn Store, device_id: Uuid, now_ms: u64) -> StoreResult<()> {
    if store.device(device_id)?.is_none() {
        return Err(StoreError::NotFound(format!("no device {device_id}")));
    }
    if !store.revoke_device(device_id, now_ms)? {
        return Err(StoreError::Conflict(format!("device {device_id} is already revoked")));
    }
    Ok(())
}
