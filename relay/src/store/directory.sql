-- fieldsync relay directory (SQLite, `DIR/relay.db`): who may do what, and where each space's
-- data lives. Applied on every open; every statement is idempotent. Space data (documents,
-- feeds, receipts, audit chains, the conflict archive) lives in the shard files
-- (`DIR/shards/shard-N.db`, see shard.sql).

CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);

CREATE TABLE IF NOT EXISTS spaces (
    space_id   BLOB PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL,
    -- The shard file that holds the space's data; fixed when the space is created.
    shard      INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS users (
    user_id    BLOB PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS memberships (
    user_id  BLOB NOT NULL REFERENCES users(user_id),
    space_id BLOB NOT NULL REFERENCES spaces(space_id),
    role     TEXT NOT NULL,
    PRIMARY KEY (user_id, space_id)
);

-- Enrollment tokens are stored by hash: a copy of the database does not enroll devices.
CREATE TABLE IF NOT EXISTS tokens (
    token_hash BLOB PRIMARY KEY,
    user_id    BLOB NOT NULL REFERENCES users(user_id),
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    used_ms    INTEGER,
    used_by    BLOB
);

CREATE TABLE IF NOT EXISTS devices (
    device_id    BLOB PRIMARY KEY,
    user_id      BLOB NOT NULL REFERENCES users(user_id),
    public_key   BLOB NOT NULL,
    enrolled_ms  INTEGER NOT NULL,
    revoked_ms   INTEGER,
    last_seen_ms INTEGER
);
CREATE INDEX IF NOT EXISTS devices_revoked ON devices(revoked_ms) WHERE revoked_ms IS NOT NULL;

-- Every schema this relay has served, once per hash: devices may still hold any of them, so a
-- new schema must stay compatible with each (or the operator says otherwise).
CREATE TABLE IF NOT EXISTS served_schemas (
    hash            TEXT PRIMARY KEY,
    version         INTEGER NOT NULL,
    toml            TEXT NOT NULL,
    first_served_ms INTEGER NOT NULL,
    -- When the operator served a schema that breaks this one (`--allow-breaking-schema`): its
    -- devices are refused from then on, and later starts no longer weigh it.
    retired_ms      INTEGER
);
