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

/// Creates the user if needed and makes them a member of the space with `role`. A user who
/// is already a member keeps their role: changing it is `change_role` (`user role`), so a
/// repeated `user add` can never demote or escalate anyone by accident. Adding a member again
/// with the role they have is a no-op.
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
        .ok_or_else(|| no_space(store, space_name))?;
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
    if let Some(existing) = store
        .memberships(user.user_id)?
        .into_iter()
        .find(|m| m.space_id == space.space_id)
    {
        if existing.role == role {
            return Ok(user);
        }
        return Err(StoreError::Conflict(format!(
            "`{name}` is already a member of `{space_name}` as {}; to change the role run \
             `fieldsync-relay admin user role {name} --space {space_name} --role {}`",
            existing.role.as_str(),
            role.as_str()
        )));
    }
    store.set_membership(user.user_id, space.space_id, role)?;
    Ok(user)
}

/// "No such space", with the closest name and every name (an operator's typo gets help).
fn no_space(store: &dyn Directory, name: &str) -> StoreError {
    let names: Vec<String> = store
        .spaces()
        .map(|v| v.into_iter().map(|s| s.name).collect())
        .unwrap_or_default();
    StoreError::NotFound(format!("no space named `{name}`{}", hint(name, &names, "spaces")))
}

fn no_user(store: &dyn Directory, name: &str) -> StoreError {
    let names: Vec<String> = store
        .users()
        .map(|v| v.into_iter().map(|u| u.name).collect())
        .unwrap_or_default();
    StoreError::NotFound(format!("no user named `{name}`{}", hint(name, &names, "users")))
}

fn hint(name: &str, names: &[String], what: &str) -> String {
    if names.is_empty() {
        return format!(" (there are no {what} yet)");
    }
    let closest = fieldsync_schema::cli::did_you_mean(name, names.iter().map(String::as_str));
    let shown: Vec<&str> = names.iter().take(20).map(String::as_str).collect();
    let more = if names.len() > shown.len() { ", …" } else { "" };
    format!(" ({closest}{what}: {}{more})", shown.join(", "))
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
        .ok_or_else(|| no_user(store, user_name))?;
    let token = format!("fse_{}", hex::encode(ids::random_bytes(rng, 20)));
    let expires_ms = now_ms.saturating_add(ttl_ms);
    store.create_token(token_hash(&token), user.user_id, now_ms, expires_ms)?;
    Ok((token, expires_ms))
}

/// The longest device label: a name for people, not a document.
pub const MAX_LABEL_CHARS: usize = 80;

/// Checks a device label: trimmed, not empty, at most [`MAX_LABEL_CHARS`], no control
/// characters (it is printed in tables and logs).
pub fn check_label(label: &str) -> StoreResult<&str> {
    let label = label.trim();
    if label.is_empty() || label.chars().count() > MAX_LABEL_CHARS || label.chars().any(char::is_control) {
        return Err(StoreError::Conflict(format!(
            "a device label is 1–{MAX_LABEL_CHARS} printable characters, e.g. \"Dana's iPad\""
        )));
    }
    Ok(label)
}

/// [`create_enrollment_token`] whose device will carry `label` ("Dana's iPad").
pub fn create_labelled_enrollment_token(
    store: &mut dyn Directory,
    user_name: &str,
    label: &str,
    ttl_ms: u64,
    now_ms: u64,
    rng: &mut impl Rng,
) -> StoreResult<(String, u64)> {
    let label = check_label(label)?;
    let (token, expires_ms) = create_enrollment_token(store, user_name, ttl_ms, now_ms, rng)?;
    store.set_token_label(&token_hash(&token), label)?;
    Ok((token, expires_ms))
}

/// Names a device for people.
pub fn label_device(store: &mut dyn Directory, device_id: Uuid, label: &str) -> StoreResult<()> {
    let label = check_label(label)?;
    if !store.set_device_label(device_id, label)? {
        return Err(StoreError::NotFound(format!("no device {device_id}")));
    }
    Ok(())
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

/// What [`revoke_and_wipe`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WipeRequest {
    /// The device was active: revoked now, and told to erase its data at its next contact.
    RevokedWithWipe,
    /// The device was already revoked (a tablet reported lost after it was cut off): its
    /// data is erased at its next contact.
    WipeAdded,
}

/// Revokes a device (if it is not already) and has it erase its local data at its next
/// contact: it still proves its key, is told to wipe, and reports what it discarded (SPEC §16).
/// Both in one directory transaction, so a wipe is never asked of an active device.
pub fn revoke_and_wipe(store: &mut dyn Directory, device_id: Uuid, now_ms: u64) -> StoreResult<WipeRequest> {
    store.begin()?;
    let result = revoke_and_wipe_in_tx(store, device_id, now_ms);
    match result {
        Ok(_) => store.commit()?,
        Err(_) => store.rollback()?,
    }
    result
}

fn revoke_and_wipe_in_tx(store: &mut dyn Directory, device_id: Uuid, now_ms: u64) -> StoreResult<WipeRequest> {
    let Some(device) = store.device(device_id)? else {
        return Err(StoreError::NotFound(format!("no device {device_id}")));
    };
    if let Some(t) = device.wiped_ms {
        return Err(StoreError::Conflict(format!(
            "device {device_id} already erased its data (reported {})",
            fieldsync_schema::time_fmt::render_ms(t)
        )));
    }
    if device.wipe_requested_ms.is_some() {
        return Err(StoreError::Conflict(format!(
            "a wipe of device {device_id} is already pending: it happens at the device's next contact"
        )));
    }
    let done = if device.revoked_ms.is_none() {
        store.revoke_device(device_id, now_ms)?;
        WipeRequest::RevokedWithWipe
    } else {
        WipeRequest::WipeAdded
    };
    if !store.request_wipe(device_id, now_ms)? {
        return Err(StoreError::Conflict(format!(
            "device {device_id} changed while the wipe was asked for; try again"
        )));
    }
    Ok(done)
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
        .ok_or_else(|| no_user(store, user_name))?;
    let space = store
        .space_by_name(space_name)?
        .ok_or_else(|| no_space(store, space_name))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Backend;
    use crate::store::sqlite::SqliteBackend;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn adding_a_member_again_never_changes_their_role() {
        let dir = tempfile::tempdir().unwrap();
        let backend = SqliteBackend::open(dir.path(), Uuid::from_bytes([7; 16])).unwrap();
        let mut store = backend.open_directory().unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        add_space(&mut store, "clinic", 1, &mut rng).unwrap();
        let dana = add_user(&mut store, "dana", "clinic", Role::Clinician, 1, &mut rng).unwrap();

        let same = add_user(&mut store, "dana", "clinic", Role::Clinician, 2, &mut rng).unwrap();
        assert_eq!(same.user_id, dana.user_id, "the same role again is a no-op");
        for other in [Role::Assistant, Role::Admin] {
            let err = add_user(&mut store, "dana", "clinic", other, 3, &mut rng).unwrap_err();
            let message = err.to_string();
            assert!(
                message.contains("already a member of `clinic` as clinician"),
                "{message}"
            );
            assert!(message.contains("admin user role dana --space clinic"), "{message}");
        }
        let roles: Vec<Role> = store
            .memberships(dana.user_id)
            .unwrap()
            .iter()
            .map(|m| m.role)
            .collect();
        assert_eq!(roles, vec![Role::Clinician]);
        change_role(&mut store, "dana", "clinic", Role::Admin).unwrap();
        assert_eq!(store.memberships(dana.user_id).unwrap()[0].role, Role::Admin);
    }
}
