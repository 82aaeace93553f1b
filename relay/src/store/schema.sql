-- fieldsync relay store, SQLite. Applied on every open; every statement is idempotent.

CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);

CREATE TABLE IF NOT EXISTS spaces (
    space_id   BLOB PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL
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

-- One row per entity. The Automerge document is `snapshot` followed by the changes of every
-- feed row of this document with seq > snapshot_seq.
CREATE TABLE IF NOT EXISTS documents (
    doc_key      INTEGER PRIMARY KEY AUTOINCREMENT,
    entity_id    BLOB NOT NULL UNIQUE,
    space_id     BLOB NOT NULL REFERENCES spaces(space_id),
    entity_type  TEXT NOT NULL,
    version      INTEGER NOT NULL,
    last_seq     INTEGER NOT NULL,
    deleted      INTEGER NOT NULL DEFAULT 0,
    signed       INTEGER NOT NULL DEFAULT 0,
    locked       INTEGER NOT NULL DEFAULT 0,
    lww_stamps   TEXT NOT NULL DEFAULT '',
    snapshot     BLOB NOT NULL DEFAULT x'',
    snapshot_seq INTEGER NOT NULL DEFAULT 0,
    created_ms   INTEGER NOT NULL,
    updated_ms   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS documents_space ON documents(space_id, doc_key);

-- The change feed: one row per applied mutation, seq strictly increasing, never reused.
CREATE TABLE IF NOT EXISTS feed (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_key       INTEGER NOT NULL REFERENCES documents(doc_key),
    space_id      BLOB NOT NULL,
    entity_type   TEXT NOT NULL,
    entity_id     BLOB NOT NULL,
    version       INTEGER NOT NULL,
    origin_device BLOB NOT NULL,
    origin_user   BLOB NOT NULL,
    mutation_id   BLOB NOT NULL,
    hlc           TEXT NOT NULL,
    changes       BLOB NOT NULL,
    lww_losses    BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS feed_space ON feed(space_id, seq);
CREATE INDEX IF NOT EXISTS feed_doc ON feed(doc_key, seq);

-- The stored answer for every mutation id the relay decided on (idempotent retries), bound to
-- the envelope it answered: envelope_hash is SHA-256 of the envelope's signing bytes.
CREATE TABLE IF NOT EXISTS receipts (
    mutation_id   BLOB PRIMARY KEY,
    device_id     BLOB NOT NULL,
    outcome       BLOB NOT NULL,
    created_ms    INTEGER NOT NULL,
    entity_id     BLOB,
    space_id      BLOB,
    envelope_hash BLOB
) WITHOUT ROWID;

-- Hash-chained audit log: hash = SHA-256(prev_hash || record). Never updated or deleted.
CREATE TABLE IF NOT EXISTS audit (
    audit_id     INTEGER PRIMARY KEY AUTOINCREMENT,
    seq          INTEGER NOT NULL,
    mutation_id  BLOB NOT NULL,
    actor_id     BLOB NOT NULL,
    device_id    BLOB NOT NULL,
    space_id     BLOB NOT NULL,
    entity_type  TEXT NOT NULL,
    entity_id    BLOB NOT NULL,
    kind         TEXT NOT NULL,
    version      INTEGER NOT NULL,
    before_json  TEXT NOT NULL,
    after_json   TEXT NOT NULL,
    client_ts    TEXT NOT NULL,
    server_ts_ms INTEGER NOT NULL,
    prev_hash    TEXT NOT NULL,
    hash         TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'audit records are immutable');
END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN
    SELECT RAISE(ABORT, 'audit records are immutable');
END;

-- Losing versions kept for operators: LWW losers and conflict-resolution losers.
CREATE TABLE IF NOT EXISTS conflict_archive (
    archive_id      INTEGER PRIMARY KEY AUTOINCREMENT,
    kind            TEXT NOT NULL,
    space_id        BLOB NOT NULL,
    entity_type     TEXT NOT NULL,
    entity_id       BLOB NOT NULL,
    field           TEXT,
    losing_json     TEXT NOT NULL,
    winning_json    TEXT NOT NULL,
    loser_device    BLOB,
    loser_mutation  BLOB,
    winner_device   BLOB,
    winner_mutation BLOB,
    version         INTEGER NOT NULL,
    created_ms      INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS archive_entity ON conflict_archive(entity_id);
