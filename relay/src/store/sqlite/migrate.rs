//! In-place upgrades of relay databases written by earlier releases, run on every open after
//! `schema.sql` (whose statements only create what is missing). Each step is idempotent.

use rusqlite::Connection;

use crate::store::StoreResult;

pub(super) fn run(conn: &Connection) -> StoreResult<()> {
    bind_receipts(conn)
}

fn has_column(conn: &Connection, table: &str, column: &str) -> StoreResult<bool> {
    let mut st = conn.prepare(&format!("SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"))?;
    Ok(st.exists([column])?)
}

/// Receipts gained the entity, space and envelope hash they answer (a receipt replayed for a
/// different envelope revealed another space's record). Old receipts of applied mutations get
/// their entity and space from the feed; their hash stays unknown.
fn bind_receipts(conn: &Connection) -> StoreResult<()> {
    if has_column(conn, "receipts", "envelope_hash")? {
        return Ok(());
    }
    conn.execute_batch(
        "BEGIN IMMEDIATE;
         ALTER TABLE receipts ADD COLUMN entity_id BLOB;
         ALTER TABLE receipts ADD COLUMN space_id BLOB;
         ALTER TABLE receipts ADD COLUMN envelope_hash BLOB;
         UPDATE receipts SET entity_id = f.entity_id, space_id = f.space_id
             FROM feed f WHERE f.mutation_id = receipts.mutation_id;
         COMMIT;",
    )?;
    Ok(())
}
