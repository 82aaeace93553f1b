//! Property tests of local writes: for any sequence of creates, renames, increments and
//! deletes, the outbox carries exactly the changes the writes made, in write order, and every
//! entity's materialised fields equal its document's.

use fieldsync_schema::document::parse_change;
use proptest::prelude::*;
use serde_json::json;

use crate::testutil::{Fixture, obj};

#[derive(Debug, Clone)]
enum W {
    Create,
    Rename(usize, u8),
    Incr(usize, i8),
    Delete(usize),
}

fn write() -> impl Strategy<Value = W> {
    prop_oneof![
        Just(W::Create),
        (0usize..4, any::<u8>()).prop_map(|(i, n)| W::Rename(i, n)),
        (0usize..4, 0i8..5).prop_map(|(i, n)| W::Incr(i, n)),
        (0usize..4).prop_map(W::Delete),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// For any sequence of writes: the changes in the outbox, read in outbox order, are
    /// exactly the changes the successful writes made, in write order; and every entity's
    /// materialised fields equal its document's fields.
    #[test]
    fn outbox_replays_the_writes_in_order_and_listing_matches_documents(
        writes in proptest::collection::vec(write(), 1..30)
    ) {
        let mut f = Fixture::new(77);
        let mut patients = Vec::new();
        let mut volumes = Vec::new();
        let mut made = Vec::new();
        for w in writes {
            f.time.advance(3);
            let r = match w {
                W::Create => {
                    let r = f.dev.put("patient", None, obj(json!({"name": "p"}))).unwrap();
                    patients.push(r.entity_id);
                    let v = f.dev.put("volume", None, obj(json!({"week": "2026-11-16"}))).unwrap();
                    volumes.push(v.entity_id);
                    made.extend(r.change_hash);
                    made.extend(v.change_hash);
                    continue;
                }
                W::Rename(i, n) => match patients.get(i) {
                    Some(p) => f.dev.update("patient", *p, obj(json!({"name": format!("p{n}")}))),
                    None => continue,
                },
                W::Incr(i, n) => match volumes.get(i) {
                    Some(v) => f.dev.increment("volume", *v, "legs_sets", i64::from(n)),
                    None => continue,
                },
                W::Delete(i) => match patients.get(i) {
                    Some(p) => f.dev.delete("patient", *p),
                    None => continue,
                },
            };
            if let Ok(r) = r {
                made.extend(r.change_hash);
            }
        }
        let mut queued = Vec::new();
        for item in f.dev.queue(true).unwrap() {
            for c in f.dev.envelope(item.mutation_id).unwrap().unwrap().changes {
                queued.push(parse_change(&c.0).unwrap().hash().to_string());
            }
        }
        prop_assert_eq!(queued, made);
        for id in patients.iter().chain(&volumes) {
            let listed = f.dev.get(*id).unwrap().unwrap();
            let bytes = f.dev.document_bytes(*id).unwrap();
            let doc = fieldsync_schema::EntityDoc::load(&bytes, automerge::ActorId::random()).unwrap();
            prop_assert_eq!(&listed.fields, &doc.fields());
            prop_assert_eq!(listed.deleted, doc.is_deleted());
        }
    }
}
