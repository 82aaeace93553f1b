//! Administrative operations on a relay store: spaces, users and roles, enrollment tokens,
//! devices. The CLI, the tests and the simulator all go through these, so a rule (say, that a
//! token is stored hashed) holds whichever way a relay is set up.

use fieldsync_schema::{Role, ids};
use rand_core::Rng;
use uuid::Uuid;

use crate::core::token_hash;
use crate::store::{Directory, SpaceRow, StoreError, StoreResult, UserRow};

/// How long an enrollment token stays valid unless told otherwise.
pub const DEFAULT_TOKEN_TTL_MS: u64 = 24 * 60 * 60 * 1000;

pub fn add_space(store: &mut dyn Directory, name: &str, now_ms: u64, rng: &mut impl Rng) -> StoreResult<SpaceRow> {
    let name = name.trim();
    if name.is_empty() {
        return Err(StoreError::Conflict("a space needs a name".into()));
    }
    let space_id = ids::new_uuid(rng);
    store.create_space(space_id, name, now_ms)
}

/// Creates the user if needed and gives them `role` in the space (changing an existing role).
pub fn add_user(
    store: &mut dyn Directory,
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
    store: &mut dyn Directory,
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

pub fn revoke_device(store: &mut dyn Directory, device_id: Uuid, now_ms: u64) -> StoreResult<()> {
    if store.device(device_id)?.is_none() {
        return Err(StoreError::NotFound(format!("no device {device_id}")));
    }
    if !store.revoke_device(device_id, now_ms)? {
        return Err(StoreError::Conflict(format!("device {device_id} is already revoked")));
    }
    Ok(())
}

/// Changes the role of an existing member of a space (use [`add_user`] to add one).
pub fn change_role(store: &mut dyn Directory, user_name: &str, space_name: &str, role: Role) -> StoreResult<Role> {
    let (user, space) = user_and_space(store, user_name, space_name)?;
    let current = store
        .memberships(user.user_id)?
        .into_iter()
        .find(|m| m.space_id == space.space_id)
        .ok_or_else(|| StoreError::NotFound(format!("{user_name} is not a member of {space_name}")))?;
    store.set_membership(user.user_id, space.space_id, role)?;
    Ok(current.role)
}

/// Removes a user from a space. Their devices stop seeing the space within a second (the relay
/// refreshes memberships on its tick); the user and their devices stay.
pub fn remove_member(store: &mut dyn Directory, user_name: &str, space_name: &str) -> StoreResult<()> {
    let (user, space) = user_and_space(store, user_name, space_name)?;
    if !store.remove_membership(user.user_id, space.space_id)? {
        return Err(StoreError::NotFound(format!(
            "{user_name} is not a member of {space_name}"
        )));
    }
    Ok(())
}

fn user_and_space(store: &dyn Directory, user_name: &str, space_name: &str) -> StoreResult<(UserRow, SpaceRow)> {
    let user = store
        .user_by_name(user_name)?
        .ok_or_else(|| StoreError::NotFound(format!("no user named `{user_name}`")))?;
    let space = store
        .space_by_name(space_name)?
        .ok_or_else(|| StoreError::NotFound(format!("no space named `{space_name}`")))?;
    Ok((user, space))
}

/// How an operator names a token: the first 12 hex digits of its hash (the token itself is
/// never stored).
pub fn token_id(hash: &[u8; 32]) -> String {
    hex::encode(&hash[..6])
}

/// Expires an unused token now. `which` is a token id from `token list` (a unique prefix of at
/// least 6 hex digits) or the token text itself. Returns the token's id.
pub fn expire_token(store: &mut dyn Directory, which: &str, now_ms: u64) -> StoreResult<String> {
    let which = which.trim();
    let hash = if which.starts_with("fse_") {
        token_hash(which)
    } else {
        let prefix = which.to_ascii_lowercase();
        if prefix.len() < 6 || !prefix.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(StoreError::Conflict(format!(
                "`{which}` is neither a token id (6+ hex digits, from `token list`) nor a token"
            )));
        }
        let matches: Vec<[u8; 32]> = store
            .tokens()?
            .into_iter()
            .map(|t| t.token_hash)
            .filter(|h| hex::encode(h).starts_with(&prefix))
            .collect();
        match matches.as_slice() {
            [one] => *one,
            [] => return Err(StoreError::NotFound(format!("no token with id {which}"))),
            _ => {
                return Err(StoreError::Conflict(format!(
                    "token id {which} is ambiguous; give more digits"
                )));
            }
        }
    };
    let Some(row) = store.token(&hash)? else {
        return Err(StoreError::NotFound("no such token".into()));
    };
    if row.used_ms.is_some() {
        return Err(StoreError::Conflict(format!(
            "token {} was already used (a device enrolled with it; revoke the device instead)",
            token_id(&hash)
        )));
    }
    store.expire_token(&hash, now_ms)?;
    Ok(token_id(&hash))
}
