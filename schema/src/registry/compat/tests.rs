use super::*;

const BASE: &str = r#"
    schema_version = 1
    [types.patient]
    policy = "gated"
    write = ["admin", "clinician"]
    fields.name = { type = "string", required = true, max_length = 200 }
    fields.pain = { type = "int", min = 0, max = 10 }
    fields.weight = { type = "float", min = 0.0 }
    fields.status = { type = "enum", values = ["active", "discharged"] }
    fields.phone = { type = "string", max_length = 40 }
    [types.visit]
    policy = "gated"
    write = ["clinician"]
    fields.patient_id = { type = "ref", to = "patient", required = true }
    fields.room = { type = "string", required_unless = "patient_id" }
    [types.note]
    policy = "notes"
    signable = true
    write = ["clinician"]
    sign = ["clinician"]
    fields.body = { type = "text", max_length = 1000 }
    [types.tally]
    policy = "counter"
    write = ["clinician"]
    fields.reads = { type = "counter", min = 0 }
"#;

fn schema(text: &str) -> Schema {
    Schema::from_toml_str(text).unwrap()
}

/// Textual edits of BASE, and the one change they should report (location, words).
type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);

/// The report of changing BASE by `edits` (textual replacements) at version 2.
fn report(edits: &[(&str, &str)]) -> CompatReport {
    let mut text = BASE.replace("schema_version = 1", "schema_version = 2");
    for (from, to) in edits {
        assert!(text.contains(from), "{from}");
        text = text.replacen(from, to, 1);
    }
    compare(&schema(BASE), &schema(&text))
}

fn verdicts(r: &CompatReport) -> Vec<(String, Verdict)> {
    r.changes.iter().map(|c| (c.location.clone(), c.verdict)).collect()
}

fn one(r: &CompatReport) -> (&str, Verdict) {
    assert_eq!(r.changes.len(), 1, "{r:#?}");
    (r.changes[0].location.as_str(), r.changes[0].verdict)
}

use Verdict::{Breaking, Compatible};

#[test]
fn an_unchanged_schema_has_no_changes_and_is_compatible() {
    let r = compare(&schema(BASE), &schema(BASE));
    assert!(r.changes.is_empty() && r.is_compatible(), "{r:?}");
}

#[test]
fn the_additive_changes_people_make_are_compatible() {
    let cases: &[Case] = &[
        (
            &[(
                "[types.note]",
                "[types.plan]\npolicy = \"lww\"\nwrite = [\"service\"]\nfields.week = { type = \"int\" }\n[types.note]",
            )],
            "plan",
            "new type",
        ),
        (
            &[("fields.phone =", "fields.email = { type = \"string\" }\nfields.phone =")],
            "patient.email",
            "new optional field",
        ),
        (
            &[("\"discharged\"]", "\"discharged\", \"paused\"]")],
            "patient.status",
            "new value `paused`",
        ),
        (&[("max = 10", "max = 20")], "patient.pain", "max 10 → 20"),
        (
            &[("min = 0, max = 10", "min = -5, max = 10")],
            "patient.pain",
            "min 0 → -5",
        ),
        (
            &[("max_length = 40", "max_length = 80")],
            "patient.phone",
            "max_length 40 → 80",
        ),
        (&[(", max_length = 40", "")], "patient.phone", "max_length 40 → none"),
        (
            &[("type = \"float\", min = 0.0", "type = \"float\"")],
            "patient.weight",
            "min 0 → none",
        ),
        (
            &[("required = true, max_length = 200", "max_length = 200")],
            "patient.name",
            "required → optional",
        ),
        (
            &[(
                "write = [\"admin\", \"clinician\"]",
                "write = [\"admin\", \"clinician\", \"assistant\"]",
            )],
            "patient",
            "assistant may now write",
        ),
        (
            &[("type = \"counter\", min = 0", "type = \"counter\"")],
            "tally.reads",
            "min 0 → none",
        ),
        (
            &[("type = \"text\", max_length = 1000", "type = \"text\"")],
            "note.body",
            "max_length 1000 → none",
        ),
    ];
    for (edits, location, change) in cases {
        let r = report(edits);
        assert_eq!(one(&r), (*location, Compatible), "{edits:?}");
        assert_eq!(r.changes[0].change, *change);
        assert!(r.is_compatible());
    }
}

#[test]
fn every_change_an_old_device_would_trip_on_is_breaking() {
    let cases: &[Case] = &[
        (
            &[("fields.phone = { type = \"string\", max_length = 40 }", "")],
            "patient.phone",
            "field removed",
        ),
        (
            &[(
                "fields.phone = { type = \"string\", max_length = 40 }",
                "fields.phone = { type = \"int\" }",
            )],
            "patient.phone",
            "type string → int",
        ),
        (
            &[(
                "fields.phone =",
                "fields.mrn = { type = \"string\", required = true }\nfields.phone =",
            )],
            "patient.mrn",
            "new required field",
        ),
        (
            &[(
                "fields.phone =",
                "fields.mrn = { type = \"string\", required_unless = \"phone\" }\nfields.phone =",
            )],
            "patient.mrn",
            "new conditionally required field",
        ),
        (&[("max = 10", "max = 5")], "patient.pain", "max 10 → 5"),
        (
            &[("min = 0, max = 10", "min = 1, max = 10")],
            "patient.pain",
            "min 0 → 1",
        ),
        (
            &[("max_length = 40", "max_length = 20")],
            "patient.phone",
            "max_length 40 → 20",
        ),
        (
            &[(", \"discharged\"]", "]")],
            "patient.status",
            "value `discharged` removed",
        ),
        (
            &[(
                "fields.phone = { type = \"string\", max_length = 40 }",
                "fields.phone = { type = \"string\", max_length = 40, required = true }",
            )],
            "patient.phone",
            "optional → required",
        ),
        (
            &[(
                "policy = \"gated\"\n    write = [\"admin\"",
                "policy = \"lww\"\n    write = [\"admin\"",
            )],
            "patient",
            "policy gated → lww",
        ),
        (
            &[(
                "signable = true\n",
                "signable = true\n    lockable = true\n    fields.locked = { type = \"bool\" }\n",
            )],
            "note",
            "lockable false → true",
        ),
        (
            &[("write = [\"admin\", \"clinician\"]", "write = [\"admin\"]")],
            "patient",
            "clinician may no longer write",
        ),
        (
            &[("to = \"patient\"", "to = \"note\"")],
            "visit.patient_id",
            "refers to note instead of patient",
        ),
        (
            &[(
                "[types.visit]\n    policy = \"gated\"\n    write = [\"clinician\"]\n    fields.patient_id = { type = \"ref\", to = \"patient\", required = true }\n    fields.room = { type = \"string\", required_unless = \"patient_id\" }",
                "",
            )],
            "visit",
            "type removed",
        ),
    ];
    for (edits, location, change) in cases {
        let r = report(edits);
        let found = r
            .changes
            .iter()
            .find(|c| c.location == *location && c.change.starts_with(change));
        assert_eq!(found.map(|c| c.verdict), Some(Breaking), "{edits:?}: {r:#?}");
        assert!(!r.is_compatible());
        // Nothing else is reported, apart from a field the edit had to add.
        assert!(
            r.changes.iter().filter(|c| c.verdict == Breaking).count() == 1,
            "{r:#?}"
        );
    }
}

#[test]
fn a_requirement_may_be_relaxed_but_not_tightened_or_moved() {
    let room = "fields.room = { type = \"string\", required_unless = \"patient_id\" }";
    let cases = [
        (
            room,
            "fields.room = { type = \"string\" }",
            "required unless patient_id → optional",
            Compatible,
        ),
        (
            room,
            "fields.room = { type = \"string\", required = true }",
            "required unless patient_id → required",
            Breaking,
        ),
        (
            room,
            "fields.room = { type = \"string\", required_unless = \"room\" }",
            "required unless patient_id → required unless room",
            Breaking,
        ),
        (
            "fields.name = { type = \"string\", required = true, max_length = 200 }",
            "fields.name = { type = \"string\", required_unless = \"phone\", max_length = 200 }",
            "required → required unless phone",
            Compatible,
        ),
        (
            "fields.phone = { type = \"string\", max_length = 40 }",
            "fields.phone = { type = \"string\", max_length = 40, required_unless = \"name\" }",
            "optional → required unless name",
            Breaking,
        ),
    ];
    for (from, to, words, verdict) in cases {
        let r = report(&[(from, to)]);
        assert_eq!(one(&r).1, verdict, "{to}");
        assert_eq!(r.changes[0].change, words);
    }
}

#[test]
fn a_changed_schema_must_raise_its_version() {
    let text = BASE.replace("max = 10", "max = 20");
    let r = compare(&schema(BASE), &schema(&text));
    assert_eq!(
        verdicts(&r),
        [
            ("patient.pain".to_string(), Compatible),
            ("schema_version".to_string(), Breaking)
        ]
    );
    assert!(
        r.render().contains("1 breaking change: devices on v1 would be refused"),
        "{}",
        r.render()
    );
}

#[test]
fn the_report_lists_changes_in_type_and_field_order_with_their_verdicts() {
    let r = report(&[
        ("max = 10", "max = 5"),
        ("\"discharged\"]", "\"discharged\", \"paused\"]"),
    ]);
    let text = r.render();
    assert!(text.starts_with("schema v1 → v2\n"), "{text}");
    let pain = text.find("patient.pain: max 10 → 5").unwrap();
    let status = text.find("patient.status: new value `paused`").unwrap();
    assert!(pain < status, "{text}");
    assert!(text.contains("breaking    patient.pain"), "{text}");
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["changes"][0]["verdict"], "breaking");
    assert_eq!(json["to_version"], 2);
}

#[test]
fn declared_migrations_make_renames_and_new_required_fields_compatible() {
    let r = report(&[(
        "fields.phone = { type = \"string\", max_length = 40 }",
        "fields.telephone = { type = \"string\", max_length = 40, renamed_from = \"phone\" }",
    )]);
    assert_eq!(one(&r), ("patient.telephone", Compatible));
    assert!(r.changes[0].change.starts_with("renamed from `phone`"), "{r:?}");

    let r = report(&[(
        "fields.phone =",
        "fields.ward = { type = \"string\", required = true, default = \"general\" }\nfields.phone =",
    )]);
    assert_eq!(one(&r), ("patient.ward", Compatible));

    // Tightening a requirement is compatible once records without the field read a default.
    let r = report(&[(
        "fields.status = { type = \"enum\", values = [\"active\", \"discharged\"] }",
        "fields.status = { type = \"enum\", values = [\"active\", \"discharged\"], required = true, default = \"active\" }",
    )]);
    assert!(r.is_compatible(), "{r:#?}");
    assert_eq!(
        verdicts(&r),
        vec![
            ("patient.status".to_string(), Compatible),
            ("patient.status".to_string(), Compatible)
        ]
    );
}

#[test]
fn a_rename_that_changes_meaning_or_a_changed_default_is_breaking() {
    // The rename itself is fine; the new type under the new name is not.
    let r = report(&[(
        "fields.phone = { type = \"string\", max_length = 40 }",
        "fields.telephone = { type = \"int\", renamed_from = \"phone\" }",
    )]);
    assert_eq!(
        verdicts(&r),
        vec![
            ("patient.telephone".to_string(), Compatible),
            ("patient.telephone".to_string(), Breaking)
        ]
    );
    let r = report(&[(
        "fields.phone =",
        "fields.ward = { type = \"string\", required = true }\nfields.phone =",
    )]);
    assert_eq!(one(&r), ("patient.ward", Breaking));
    assert!(r.changes[0].change.contains("give it a `default`"), "{r:?}");

    let with_default = BASE.replace(
        "fields.phone = { type = \"string\", max_length = 40 }",
        "fields.phone = { type = \"string\", max_length = 40, default = \"none\" }",
    );
    let same = with_default.replace("schema_version = 1", "schema_version = 2");
    assert!(compare(&schema(&with_default), &schema(&same)).changes.is_empty());
    for (edited, words) in [
        (with_default.replace("default = \"none\"", "default = \"n/a\""), "→"),
        (with_default.replace(", default = \"none\"", ""), "removed"),
    ] {
        let r = compare(
            &schema(&with_default),
            &schema(&edited.replace("schema_version = 1", "schema_version = 2")),
        );
        assert_eq!(one(&r), ("patient.phone", Breaking));
        assert!(r.changes[0].change.contains(words), "{r:?}");
    }
}
