-- fieldsync relay shard (SQLite, `DIR/shards/shard-N.db`): the data of the spaces assigned to
-- this shard. Each space is its own ordering domain: a dense feed sequence, a hash-chained
-- audit log, both advanced in the transaction that writes the mutation (`space_heads`). Applied
-- on every open; every statement is idempotent.

CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);

-- Where each space's feed and audit chain stand.
CREATE TABLE IF NOT EXISTS space_heads (
    space_id   BLOB PRIMARY KEY,
    seq        INTEGER NOT NULL,
    audit_seq  INTEGER NOT NULL,
    audit_hash TEXT NOT NULL
) WITHOUT ROWID;

-- One row per entity. The Automerge document is `snapshot` followed by the changes of every
-- feed row of this document with seq > snapshot_seq.
CREATE TABLE IF NOT EXISTS documents (
    doc_key      INTEGER PRIMARY KEY AUTOINCREMENT,
    entity_id    BLOB NOT NULL UNIQUE,
    space_id     BLOB NOT NULL,
    entity_type  TEXT NOT NULL,
    version      INTEGER NOT NULL,
    last_seq     INTEGER NOT NULL,
    deleted      INTEGER NOT NULL DEFAULT 0,
    signed       INTEGER NOT NULL DEFAULT 0,
    locked       INTEGER NOT NULL DEFAULT 0,
    lww_stamps   TEXT NOT NULL DEFAULT '',
    -- The day its type's sync-window field names (SPEC §16); NULL: undated, no window, or
    -- written before the column existed.
    window_day   INTEGER,
    snapshot     BLOB NOT NULL DEFAULT x'',
    snapshot_seq INTEGER NOT NULL DEFAULT 0,
    created_ms   INTEGER NOT NULL,
    updated_ms   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS documents_space ON documents(space_id, doc_key);

-- The change feed of each space: one row per applied mutation, seq dense per space (1, 2, ...),
-- never reused. `legacy_seq`: the global sequence number a row had before the per-space layout
-- (rows migrated from a round-1 relay), so old device cursors carry over.
CREATE TABLE IF NOT EXISTS feed (
    space_id      BLOB NOT NULL,
    seq           INTEGER NOT NULL,
    doc_key       INTEGER NOT NULL REFERENCES documents(doc_key),
    entity_type   TEXT NOT NULL,
    entity_id     BLOB NOT NULL,
    version       INTEGER NOT NULL,
    origin_device BLOB NOT NULL,
    origin_user   BLOB NOT NULL,
    mutation_id   BLOB NOT NULL,
    hlc           TEXT NOT NULL,
    changes       BLOB NOT NULL,
    lww_losses    BLOB NOT NULL,
    legacy_seq    INTEGER,
    PRIMARY KEY (space_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS feed_doc ON feed(doc_key, seq);
CREATE INDEX IF NOT EXISTS feed_legacy ON feed(space_id, legacy_seq) WHERE legacy_seq IS NOT NULL;

-- The stored answer for every mutation id decided in this shard (idempotent retries), bound
-- to the envelope it answered: envelope_hash is SHA-256 of the envelope's signing bytes.
CREATE TABLE IF NOT EXISTS receipts (
    mutation_id   BLOB PRIMARY KEY,
    device_id     BLOB NOT NULL,
    outcome       BLOB NOT NULL,
    created_ms    INTEGER NOT NULL,
    entity_id     BLOB,
    space_id      BLOB,
    envelope_hash BLOB
) WITHOUT ROWID;

-- One hash chain per space: hash = SHA-256(prev_hash || record); audit_seq is dense per space.
-- Never updated or deleted.
CREATE TABLE IF NOT EXISTS audit (
    audit_id     INTEGER PRIMARY KEY AUTOINCREMENT,
    space_id     BLOB NOT NULL,
    audit_seq    INTEGER NOT NULL,
    seq          INTEGER NOT NULL,
    mutation_id  BLOB NOT NULL,
    actor_id     BLOB NOT NULL,
    device_id    BLOB NOT NULL,
    entity_type  TEXT NOT NULL,
    entity_id    BLOB NOT NULL,
    kind         TEXT NOT NULL,
    version      INTEGER NOT NULL,
    before_json  TEXT NOT NULL,
    after_json   TEXT NOT NULL,
    client_ts    TEXT NOT NULL,
    server_ts_ms INTEGER NOT NULL,
    prev_hash    TEXT NOT NULL,
    hash         TEXT NOT NULL,
    UNIQUE (space_id, audit_seq)
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

-- The possible-duplicate index (SPEC §17): one row per live record of a type that declares
-- `duplicates`, by its key (the `same` fields' values, as JSON) and its `near` time in ms. The
-- relay looks here when a new record is applied, instead of reading every record of the space.
CREATE TABLE IF NOT EXISTS duplicate_keys (
    entity_id   BLOB PRIMARY KEY,
    space_id    BLOB NOT NULL,
    entity_type TEXT NOT NULL,
    dup_key     TEXT NOT NULL,
    at_ms       INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS duplicate_keys_find ON duplicate_keys(space_id, entity_type, dup_key, at_ms);
