//! Declared renames on the relay: every name a renamed field has had holds the same value.
//!
//! Devices on a version before the rename write the old name, devices after it the new one.
//! The relay applies mutations of a space one at a time, so after each accepted write it copies
//! the value the write gave (under whichever name it used) to the field's other names, as its
//! own change in the same feed entry. Every replica then holds equal values under every name:
//! an old device reads the new device's edit under the name it knows, and a new device reads an
//! old device's edit through [`crate::registry::EntityType::view`]. The copy happens once per
//! write, in the relay's order, and travels (and is audited) with the write that caused it.

use std::collections::BTreeSet;

use automerge::ROOT;
use automerge::transaction::Transactable;

use super::{DocError, EntityDoc};
use crate::registry::EntityType;

impl EntityDoc {
    /// Makes every name of each renamed field that `touched` (the keys a write changed) names
    /// hold the value the write left: the new name's when the write used it, else the first old
    /// name it used. Returns whether anything was written (the caller commits it).
    pub fn align_renamed(&mut self, ty: &EntityType, touched: &BTreeSet<String>) -> Result<bool, DocError> {
        let mut wrote = false;
        for field in ty.fields.values().filter(|f| !f.renamed_from.is_empty()) {
            let names: Vec<&str> = std::iter::once(field.name.as_str())
                .chain(field.renamed_from.iter().map(String::as_str))
                .collect();
            let Some(source) = names.iter().find(|n| touched.contains(**n)) else {
                continue;
            };
            let stored = self.fields();
            let value = stored.get(*source).cloned();
            for name in names.iter().filter(|n| *n != source) {
                let settled = stored.get(*name) == value.as_ref() && !self.has_concurrent_values(name);
                if settled {
                    continue;
                }
                match &value {
                    Some(v) if !v.is_null() => self.put_value(name, field, v)?,
                    _ if stored.contains_key(*name) => self.doc.delete(ROOT, *name)?,
                    _ => continue,
                }
                wrote = true;
            }
        }
        Ok(wrote)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::{Map, Value, json};
    use uuid::Uuid;

    use crate::document::{EntityDoc, device_actor};
    use crate::registry::Schema;

    const V2: &str = r#"
schema_version = 2
[types.visit]
policy = "gated"
write = ["clinician"]
fields.title = { type = "string", renamed_from = ["label", "name"] }
fields.room = { type = "string" }
fields.status = { type = "enum", values = ["open", "closed"], required = true, default = "open" }
"#;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    fn touched(keys: &[&str]) -> BTreeSet<String> {
        keys.iter().map(|k| k.to_string()).collect()
    }

    /// A document as a device before the rename wrote it: the raw key `label`.
    fn old_write(label: &str) -> EntityDoc {
        let mut doc = EntityDoc::new(device_actor(Uuid::from_u128(1)));
        doc.init_type("visit").unwrap();
        doc.automerge()
            .put(automerge::ROOT, "label", label)
            .map(|_| ())
            .unwrap();
        doc.commit(1_000);
        doc
    }

    use automerge::transaction::Transactable;

    #[test]
    fn an_old_name_write_is_copied_to_every_other_name() {
        let schema = Schema::from_toml_str(V2).unwrap();
        let ty = schema.entity_type("visit").unwrap();
        let mut doc = old_write("Knee");
        assert!(doc.align_renamed(ty, &touched(&["label"])).unwrap());
        let f = doc.fields();
        assert_eq!(f.get("title"), Some(&json!("Knee")));
        assert_eq!(f.get("name"), Some(&json!("Knee")));
        assert_eq!(f.get("label"), Some(&json!("Knee")));
        // A second pass finds every name settled and writes nothing.
        assert!(!doc.align_renamed(ty, &touched(&["label"])).unwrap());
    }

    #[test]
    fn a_new_name_write_wins_over_old_names_and_a_removal_removes_them() {
        let schema = Schema::from_toml_str(V2).unwrap();
        let ty = schema.entity_type("visit").unwrap();
        let mut doc = old_write("Knee");
        doc.write_fields(ty, &obj(json!({"title": "Hip"}))).unwrap();
        assert!(doc.align_renamed(ty, &touched(&["title", "label"])).unwrap());
        assert_eq!(doc.fields().get("label"), Some(&json!("Hip")));
        doc.write_fields(ty, &obj(json!({"title": null}))).unwrap();
        assert!(!doc.fields().contains_key("label"), "a removal reaches the old name");
        // The removal reached every name the record held: nothing is left to align.
        assert!(!doc.align_renamed(ty, &touched(&["title", "label"])).unwrap());
        let f = doc.fields();
        assert!(
            !f.contains_key("title") && !f.contains_key("label") && !f.contains_key("name"),
            "{f:?}"
        );
    }

    #[test]
    fn an_old_device_removing_the_old_name_removes_the_new_one() {
        let schema = Schema::from_toml_str(V2).unwrap();
        let ty = schema.entity_type("visit").unwrap();
        let mut doc = old_write("Knee");
        doc.align_renamed(ty, &touched(&["label"])).unwrap();
        doc.automerge().delete(automerge::ROOT, "label").unwrap();
        assert!(doc.align_renamed(ty, &touched(&["label"])).unwrap());
        let f = doc.fields();
        assert!(!f.contains_key("title") && !f.contains_key("name"), "{f:?}");
    }

    #[test]
    fn a_null_under_an_old_name_counts_as_absent() {
        // A raw null (no device library writes one) removes the other names instead of failing.
        let schema = Schema::from_toml_str(V2).unwrap();
        let ty = schema.entity_type("visit").unwrap();
        let mut doc = old_write("Knee");
        doc.align_renamed(ty, &touched(&["label"])).unwrap();
        doc.automerge()
            .put(automerge::ROOT, "label", automerge::ScalarValue::Null)
            .unwrap();
        assert!(doc.align_renamed(ty, &touched(&["label"])).unwrap());
        assert!(!doc.fields().contains_key("title"));
        // Where the other names hold nothing, there is nothing to remove.
        let mut fresh = old_write("Knee");
        fresh
            .automerge()
            .put(automerge::ROOT, "label", automerge::ScalarValue::Null)
            .unwrap();
        assert!(!fresh.align_renamed(ty, &touched(&["label"])).unwrap());
    }

    #[test]
    fn a_write_that_touches_no_renamed_name_writes_nothing() {
        let schema = Schema::from_toml_str(V2).unwrap();
        let ty = schema.entity_type("visit").unwrap();
        let mut doc = old_write("Knee");
        assert!(!doc.align_renamed(ty, &touched(&["room"])).unwrap());
        assert!(!doc.fields().contains_key("title"));
    }

    #[test]
    fn the_view_reads_old_names_and_defaults() {
        let schema = Schema::from_toml_str(V2).unwrap();
        let ty = schema.entity_type("visit").unwrap();
        let view = ty.view(obj(json!({"name": "Oldest", "label": "Old", "x_unknown": 1})));
        // The first old name listed is the most recent one: it wins over older ones.
        assert_eq!(
            Value::Object(view),
            json!({"title": "Old", "status": "open", "x_unknown": 1})
        );
        let view = ty.view(obj(json!({"title": "New", "label": "Old", "status": "closed"})));
        assert_eq!(Value::Object(view), json!({"title": "New", "status": "closed"}));
    }
}
