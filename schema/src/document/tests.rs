use serde_json::json;

use crate::registry::Schema;

use super::*;

use crate::testkit::obj;

fn dev(n: u8) -> Uuid {
    Uuid::from_bytes([n; 16])
}

#[test]
fn fields_round_trip_through_save_and_load() {
    let schema = Schema::default_schema();
    let set = schema.entity_type("set").unwrap();
    let mut d = EntityDoc::new(device_actor(dev(1)));
    d.init_type("set").unwrap();
    let fields = obj(json!({"session_id": dev(2).to_string(), "exercise_name": "Squat", "reps": 8, "weight_kg": 60.5}));
    d.write_fields(set, &fields).unwrap();
    let change = d.commit(1_000_000).unwrap();
    assert_eq!(change.timestamp(), 1_000);
    assert_eq!(actor_device(change.actor_id()), Some(dev(1)));
    let bytes = d.save();
    let loaded = EntityDoc::load(&bytes, device_actor(dev(1))).unwrap();
    assert_eq!(loaded.fields(), fields);
    assert_eq!(loaded.entity_type().as_deref(), Some("set"));
    assert!(!loaded.is_deleted());
}

#[test]
fn concurrent_text_edits_both_survive() {
    let schema = Schema::default_schema();
    let note = schema.entity_type("note").unwrap();
    let mut a = EntityDoc::new(device_actor(dev(1)));
    a.init_type("note").unwrap();
    a.write_fields(
        note,
        &obj(json!({"patient_id": dev(9).to_string(), "body": "Knee stable. Continue plan."})),
    )
    .unwrap();
    a.commit(1).unwrap();
    let mut b = EntityDoc::load(&a.save(), device_actor(dev(2))).unwrap();
    a.set_text("body", "Knee stable, swelling down. Continue plan.")
        .unwrap();
    let ca = a.commit(2).unwrap();
    b.set_text("body", "Knee stable. Continue plan; add balance work.")
        .unwrap();
    let cb = b.commit(3).unwrap();
    a.apply(vec![cb]).unwrap();
    b.apply(vec![ca]).unwrap();
    assert_eq!(a.fields(), b.fields());
    let body = a.fields()["body"].as_str().unwrap().to_string();
    assert!(
        body.contains("swelling down") && body.contains("balance work"),
        "{body}"
    );
}

#[test]
fn concurrent_increments_add_and_counters_refuse_overwrites() {
    let schema = Schema::default_schema();
    let vol = schema.entity_type("volume").unwrap();
    let mut a = EntityDoc::new(device_actor(dev(1)));
    a.init_type("volume").unwrap();
    a.write_fields(vol, &obj(json!({"week": "2026-11-16", "legs_sets": 0})))
        .unwrap();
    a.commit(1).unwrap();
    let mut b = EntityDoc::load(&a.save(), device_actor(dev(2))).unwrap();
    a.increment("legs_sets", 3).unwrap();
    let ca = a.commit(2).unwrap();
    b.increment("legs_sets", 4).unwrap();
    let cb = b.commit(2).unwrap();
    let ops = RootOps::of(std::slice::from_ref(&cb)).unwrap();
    assert_eq!(ops.increments.get("legs_sets"), Some(&4));
    assert!(ops.counter_puts.is_empty());
    a.apply(vec![cb]).unwrap();
    b.apply(vec![ca]).unwrap();
    assert_eq!(a.fields()["legs_sets"], json!(7));
    assert_eq!(b.fields()["legs_sets"], json!(7));
    let err = a.write_fields(vol, &obj(json!({"legs_sets": 0}))).unwrap_err();
    assert!(matches!(err, DocError::CounterSet(_)));
    // Increments never create a counter: two devices would create two counter objects.
    assert!(matches!(a.increment("core_sets", 2), Err(DocError::CounterMissing(_))));
    a.init_counters(vol).unwrap();
    assert_eq!(a.fields()["core_sets"], json!(0));
    assert_eq!(a.fields()["legs_sets"], json!(7), "existing counters are left alone");
}

#[test]
fn history_keeps_earlier_values_readable() {
    let schema = Schema::default_schema();
    let p = schema.entity_type("patient").unwrap();
    let mut d = EntityDoc::new(device_actor(dev(1)));
    d.init_type("patient").unwrap();
    d.write_fields(p, &obj(json!({"name": "Ada"}))).unwrap();
    d.commit(1).unwrap();
    let before = d.heads();
    d.write_fields(p, &obj(json!({"name": "Ada L.", "mrn": null}))).unwrap();
    d.commit(2).unwrap();
    assert_eq!(d.fields_at(&before)["name"], json!("Ada"));
    assert_eq!(d.fields()["name"], json!("Ada L."));
}

#[test]
fn unchanged_values_produce_no_operations() {
    let schema = Schema::default_schema();
    let p = schema.entity_type("patient").unwrap();
    let mut d = EntityDoc::new(device_actor(dev(1)));
    d.init_type("patient").unwrap();
    d.write_fields(p, &obj(json!({"name": "Ada"}))).unwrap();
    d.commit(1).unwrap();
    d.write_fields(p, &obj(json!({"name": "Ada"}))).unwrap();
    assert!(d.commit(2).is_none());
}

#[test]
fn rewriting_the_shown_value_of_a_concurrently_written_field_supersedes_both() {
    let schema = Schema::default_schema();
    let p = schema.entity_type("patient").unwrap();
    let mut a = EntityDoc::new(device_actor(dev(1)));
    a.init_type("patient").unwrap();
    a.write_fields(p, &obj(json!({"name": "Ada"}))).unwrap();
    a.commit(1).unwrap();
    let mut b = EntityDoc::load(&a.save(), device_actor(dev(2))).unwrap();
    a.write_fields(p, &obj(json!({"name": "A"}))).unwrap();
    let ca = a.commit(2).unwrap();
    b.write_fields(p, &obj(json!({"name": "B"}))).unwrap();
    b.commit(2).unwrap();
    b.apply(vec![ca]).unwrap();
    assert!(b.has_concurrent_values("name"));
    let shown = b.fields()["name"].clone();
    b.write_fields(p, &obj(json!({"name": shown}))).unwrap();
    assert!(b.commit(3).is_some(), "resolving to the shown value must still write");
    assert!(!b.has_concurrent_values("name"));
}

#[test]
fn only_concurrent_values_that_differ_are_a_disagreement() {
    let schema = Schema::default_schema();
    let p = schema.entity_type("patient").unwrap();
    let mut a = EntityDoc::new(device_actor(dev(1)));
    a.init_type("patient").unwrap();
    a.write_fields(p, &obj(json!({"name": "Ada", "mrn": "M-1"}))).unwrap();
    a.commit(1).unwrap();
    let mut b = EntityDoc::load(&a.save(), device_actor(dev(2))).unwrap();
    a.write_fields(p, &obj(json!({"name": "Same", "mrn": "M-2"}))).unwrap();
    let ca = a.commit(2).unwrap();
    b.write_fields(p, &obj(json!({"name": "Same", "mrn": "M-3"}))).unwrap();
    b.commit(2).unwrap();
    assert!(!b.has_differing_values("mrn"), "one value is no disagreement");
    b.apply(vec![ca]).unwrap();
    assert!(b.has_concurrent_values("name"));
    assert!(!b.has_differing_values("name"), "both wrote the same value");
    assert!(b.has_differing_values("mrn"));
}

#[test]
fn values_at_names_the_writer_of_each_concurrent_value_and_commit_always_commits() {
    let schema = Schema::default_schema();
    let p = schema.entity_type("patient").unwrap();
    let mut a = EntityDoc::new(device_actor(dev(1)));
    a.init_type("patient").unwrap();
    a.write_fields(p, &obj(json!({"name": "Ada"}))).unwrap();
    a.commit(1).unwrap();
    let base = a.heads();
    let mut b = EntityDoc::load(&a.save(), device_actor(dev(2))).unwrap();
    a.write_fields(p, &obj(json!({"name": "A"}))).unwrap();
    let ca = a.commit(2_000).unwrap();
    b.write_fields(p, &obj(json!({"name": "B"}))).unwrap();
    b.commit(2_000).unwrap();
    b.apply(vec![ca]).unwrap();
    let heads = b.heads();
    let mut values = b.values_at("name", &heads);
    values.sort_by_key(|(_, d)| *d);
    assert_eq!(values, vec![(json!("A"), Some(dev(1))), (json!("B"), Some(dev(2)))]);
    assert_eq!(b.values_at("name", &base), vec![(json!("Ada"), Some(dev(1)))]);
    assert!(b.values_at("mrn", &heads).is_empty());
    // Nothing to commit: still a change, on top of both sides.
    let empty = b.commit_always(3_000).unwrap();
    assert_eq!(empty.len(), 0);
    assert_eq!(b.heads(), vec![empty.hash()]);
    assert_eq!(empty.deps().len(), 2);
    assert_eq!(empty.timestamp(), 3);
}

#[test]
fn tombstone_signature_and_lock_are_visible() {
    let schema = Schema::default_schema();
    let form = schema.entity_type("intake_form").unwrap();
    let mut d = EntityDoc::new(device_actor(dev(1)));
    d.init_type("intake_form").unwrap();
    d.write_fields(form, &obj(json!({"patient_id": dev(3).to_string(), "locked": true})))
        .unwrap();
    d.set_deleted(true).unwrap();
    let sig = NoteSignature {
        signer_user: dev(4),
        signer_device: dev(1),
        signed_at_ms: 5,
        content_hash: "ab".into(),
        signature: "cd".into(),
    };
    d.set_signature(&sig).unwrap();
    d.commit(1).unwrap();
    assert!(d.is_locked() && d.is_deleted() && d.is_signed());
    assert_eq!(d.signature(), Some(sig));
    assert!(!d.fields().contains_key(META_DELETED));
}

#[test]
fn content_hash_ignores_key_order_but_not_values() {
    let a = obj(json!({"a": 1, "b": "x"}));
    let mut b = Map::new();
    b.insert("b".into(), json!("x"));
    b.insert("a".into(), json!(1));
    assert_eq!(content_hash(&a), content_hash(&b));
    assert_ne!(content_hash(&a), content_hash(&obj(json!({"a": 2, "b": "x"}))));
}

#[test]
fn relay_actor_never_collides_with_a_device_actor() {
    let id = dev(7);
    assert_ne!(relay_actor(id), device_actor(id));
    assert_eq!(actor_device(&relay_actor(id)), None);
}

/// Found by the relay's fuzzer: a change Automerge 0.12 accepts from bytes and then panics on
/// while applying. It must be an error the relay can answer, never a panic of its core thread.
#[test]
fn a_change_that_makes_automerge_panic_is_an_error_not_a_crash() {
    let hex_change = "856f4a83f3068298016000101111111111111111111111111111111101010101010101010101010101010101\
                      696465766963655f69645070650d649c74655f6f665f6269727468046e616d650303017d76a6013670617469\
                      656e74313831352d31322d31304164610300";
    let bytes = hex::decode(hex_change).unwrap();
    let Ok(change) = parse_change(&bytes) else {
        return; // refused already at parsing: fine too
    };
    let mut doc = EntityDoc::new(device_actor(Uuid::from_bytes([0x11; 16])));
    let applied = doc.apply(vec![change.clone()]);
    let ops = RootOps::of(std::slice::from_ref(&change));
    assert!(
        applied.is_err() || ops.is_err(),
        "the malformed change was accepted: {applied:?}"
    );
}
