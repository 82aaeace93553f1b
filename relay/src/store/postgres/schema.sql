-- fieldsync relay on PostgreSQL, layout version 1: the directory and every space's data in one
-- database, shared by every relay process of a cluster. Created and migrated by the relay
-- (`fs_meta.layout`); every statement is idempotent. Same tables as the SQLite store
-- (directory.sql, shard.sql); `shard` only assigns a space to an apply worker.

CREATE TABLE IF NOT EXISTS fs_meta (
    key   TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);

CREATE TABLE IF NOT EXISTS spaces (
    space_id   UUID PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    created_ms BIGINT NOT NULL,
    shard      INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS users (
    user_id    UUID PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    created_ms BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS memberships (
    user_id  UUID NOT NULL REFERENCES users(user_id),
    space_id UUID NOT NULL REFERENCES spaces(space_id),
    role     TEXT NOT NULL,
    PRIMARY KEY (user_id, space_id)
);

-- Enrollment tokens are stored by hash: a copy of the database does not enroll devices.
CREATE TABLE IF NOT EXISTS tokens (
    token_hash BYTEA PRIMARY KEY,
    user_id    UUID NOT NULL REFERENCES users(user_id),
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    used_ms    BIGINT,
    used_by    UUID,
    label      TEXT
);

CREATE TABLE IF NOT EXISTS devices (
    device_id    UUID PRIMARY KEY,
    user_id      UUID NOT NULL REFERENCES users(user_id),
    public_key   BYTEA NOT NULL,
    enrolled_ms  BIGINT NOT NULL,
    revoked_ms   BIGINT,
    last_seen_ms BIGINT,
    label        TEXT
);
-- Remote wipe (`admin device revoke --wipe`): asked for, done as the device reported it.
ALTER TABLE devices ADD COLUMN IF NOT EXISTS wipe_requested_ms BIGINT;
ALTER TABLE devices ADD COLUMN IF NOT EXISTS wiped_ms BIGINT;
ALTER TABLE devices ADD COLUMN IF NOT EXISTS wipe_discarded BIGINT;
-- A revoked device's new identity (`enroll --new-identity`): the device it took over from.
ALTER TABLE devices ADD COLUMN IF NOT EXISTS replaces UUID;
CREATE INDEX IF NOT EXISTS devices_revoked ON devices(revoked_ms) WHERE revoked_ms IS NOT NULL;

CREATE TABLE IF NOT EXISTS served_schemas (
    served_id       BIGSERIAL UNIQUE,
    hash            TEXT PRIMARY KEY,
    version         BIGINT NOT NULL,
    toml            TEXT NOT NULL,
    first_served_ms BIGINT NOT NULL,
    retired_ms      BIGINT
);

-- Moves with every membership or revocation change, whichever relay or admin tool made it:
-- the fronts re-read access when it moved (`Directory::outside_writes_marker`).
CREATE SEQUENCE IF NOT EXISTS access_changes;

-- Where each space's feed and audit chain stand. The writing transaction locks the space's row
-- (`SELECT ... FOR UPDATE`): two relays applying mutations of one space serialize, and a
-- sequence is never committed out of order.
CREATE TABLE IF NOT EXISTS space_heads (
    space_id   UUID PRIMARY KEY,
    seq        BIGINT NOT NULL,
    audit_seq  BIGINT NOT NULL,
    audit_hash TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS documents (
    doc_key      BIGSERIAL PRIMARY KEY,
    entity_id    UUID NOT NULL UNIQUE,
    space_id     UUID NOT NULL,
    entity_type  TEXT NOT NULL,
    version      BIGINT NOT NULL,
    last_seq     BIGINT NOT NULL,
    deleted      BOOLEAN NOT NULL DEFAULT FALSE,
    signed       BOOLEAN NOT NULL DEFAULT FALSE,
    locked       BOOLEAN NOT NULL DEFAULT FALSE,
    lww_stamps   TEXT NOT NULL DEFAULT '',
    snapshot     BYTEA NOT NULL DEFAULT '\x',
    snapshot_seq BIGINT NOT NULL DEFAULT 0,
    created_ms   BIGINT NOT NULL,
    updated_ms   BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS documents_space ON documents(space_id, doc_key);
-- The day its type's sync-window field names (SPEC §16); NULL: undated, no window, or written
-- before the column existed.
ALTER TABLE documents ADD COLUMN IF NOT EXISTS window_day BIGINT;

CREATE TABLE IF NOT EXISTS feed (
    space_id      UUID NOT NULL,
    seq           BIGINT NOT NULL,
    doc_key       BIGINT NOT NULL REFERENCES documents(doc_key),
    entity_type   TEXT NOT NULL,
    entity_id     UUID NOT NULL,
    version       BIGINT NOT NULL,
    origin_device UUID NOT NULL,
    origin_user   UUID NOT NULL,
    mutation_id   UUID NOT NULL,
    hlc           TEXT NOT NULL,
    changes       BYTEA NOT NULL,
    lww_losses    BYTEA NOT NULL,
    PRIMARY KEY (space_id, seq)
);
CREATE INDEX IF NOT EXISTS feed_doc ON feed(doc_key, seq);

-- Unique by mutation id whichever relay decided it.
CREATE TABLE IF NOT EXISTS receipts (
    mutation_id   UUID PRIMARY KEY,
    device_id     UUID NOT NULL,
    outcome       BYTEA NOT NULL,
    created_ms    BIGINT NOT NULL,
    entity_id     UUID,
    space_id      UUID,
    envelope_hash BYTEA
);

CREATE TABLE IF NOT EXISTS audit (
    audit_id     BIGSERIAL PRIMARY KEY,
    space_id     UUID NOT NULL,
    audit_seq    BIGINT NOT NULL,
    seq          BIGINT NOT NULL,
    mutation_id  UUID NOT NULL,
    actor_id     UUID NOT NULL,
    device_id    UUID NOT NULL,
    entity_type  TEXT NOT NULL,
    entity_id    UUID NOT NULL,
    kind         TEXT NOT NULL,
    version      BIGINT NOT NULL,
    before_json  TEXT NOT NULL,
    after_json   TEXT NOT NULL,
    client_ts    TEXT NOT NULL,
    server_ts_ms BIGINT NOT NULL,
    prev_hash    TEXT NOT NULL,
    hash         TEXT NOT NULL,
    UNIQUE (space_id, audit_seq)
);

-- Audit records are immutable, for every role that can reach the database.
CREATE OR REPLACE FUNCTION fs_audit_immutable() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'audit records are immutable';
END
$$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS audit_no_update ON audit;
CREATE TRIGGER audit_no_update BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION fs_audit_immutable();

CREATE TABLE IF NOT EXISTS conflict_archive (
    archive_id      BIGSERIAL PRIMARY KEY,
    kind            TEXT NOT NULL,
    space_id        UUID NOT NULL,
    entity_type     TEXT NOT NULL,
    entity_id       UUID NOT NULL,
    field           TEXT,
    losing_json     TEXT NOT NULL,
    winning_json    TEXT NOT NULL,
    loser_device    UUID,
    loser_mutation  UUID,
    winner_device   UUID,
    winner_mutation UUID,
    version         BIGINT NOT NULL,
    created_ms      BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS archive_entity ON conflict_archive(entity_id);

-- The possible-duplicate index (SPEC §17); see shard.sql.
CREATE TABLE IF NOT EXISTS duplicate_keys (
    entity_id   UUID PRIMARY KEY,
    space_id    UUID NOT NULL,
    entity_type TEXT NOT NULL,
    dup_key     TEXT NOT NULL,
    at_ms       BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS duplicate_keys_find ON duplicate_keys(space_id, entity_type, dup_key, at_ms);
