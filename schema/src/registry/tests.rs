use super::*;

#[test]
fn default_schema_has_every_type_the_references_name_with_spec_policies() {
    let s = Schema::default_schema();
    let expect = [
        ("patient", Policy::Gated),
        ("session", Policy::Gated),
        ("set", Policy::Gated),
        ("assignment", Policy::Gated),
        ("intake_form", Policy::Gated),
        ("workout", Policy::Gated),
        ("progression", Policy::Gated),
        ("note", Policy::Notes),
        ("volume", Policy::Counter),
        ("profile", Policy::Lww),
        ("settings", Policy::Lww),
        ("recovery", Policy::Lww),
        ("journal_entry", Policy::Lww),
        ("activity", Policy::AppendOnly),
        ("checkin", Policy::AppendOnly),
        ("exercise", Policy::ServerOwned),
        ("vocab", Policy::ServerOwned),
        ("plan", Policy::ServerOwned),
        ("role", Policy::ServerOwned),
        ("plan_change_request", Policy::Gated),
    ];
    for (name, policy) in expect {
        let t = s.entity_type(name).unwrap_or_else(|| panic!("missing type {name}"));
        assert_eq!(t.policy, policy, "policy of {name}");
    }
    assert_eq!(s.types().count(), expect.len());
    assert!(s.entity_type("intake_form").unwrap().lockable);
    assert!(s.entity_type("note").unwrap().signable);
}

#[test]
fn default_schema_has_the_public_field_names_of_the_spec() {
    let s = Schema::default_schema();
    let expect: &[(&str, &[&str])] = &[
        ("patient", &["name", "date_of_birth"]),
        ("session", &["patient_id", "started_at", "status"]),
        (
            "set",
            &["session_id", "exercise_id", "exercise_name", "reps", "weight_kg", "rpe"],
        ),
        ("note", &["patient_id", "session_id", "body", "addendum_to"]),
        ("intake_form", &["patient_id", "answers", "locked"]),
        ("workout", &["name", "started_at", "notes"]),
        ("settings", &["units", "goal_race_date"]),
        ("profile", &["display_name"]),
        (
            "volume",
            &[
                "week",
                "chest_sets",
                "back_sets",
                "legs_sets",
                "shoulders_sets",
                "arms_sets",
                "core_sets",
            ],
        ),
        ("checkin", &["date", "sleep_hours", "soreness", "recovery"]),
    ];
    for (ty, fields) in expect {
        let t = s.entity_type(ty).unwrap();
        for f in *fields {
            assert!(t.field(f).is_some(), "{ty}.{f} missing");
        }
    }
    let note_body = s.entity_type("note").unwrap().field("body").unwrap();
    assert!(matches!(note_body.kind, FieldKind::Text { .. }) && note_body.required);
    let vol = s.entity_type("volume").unwrap();
    assert_eq!(vol.counter_fields().count(), 6);
}

#[test]
fn hash_ignores_layout_and_comments_but_not_content() {
    let a = Schema::from_toml_str(
        r#"
        [types.thing]
        policy = "gated"
        write = ["admin"]
        fields.a = { type = "string", required = true }
        fields.b = { type = "int", min = 0 }
        "#,
    )
    .unwrap();
    let b = Schema::from_toml_str(
        r#"
        # same schema, other order and layout
        [types.thing]
        write = ["admin"]
        policy = "gated"
        [types.thing.fields]
        b = { min = 0, type = "int" }
        a = { required = true, type = "string" }
        "#,
    )
    .unwrap();
    assert_eq!(a.hash(), b.hash());
    let c = Schema::from_toml_str(
        r#"
        [types.thing]
        policy = "gated"
        write = ["admin"]
        fields.a = { type = "string", required = true }
        fields.b = { type = "int", min = 1 }
        "#,
    )
    .unwrap();
    assert_ne!(a.hash(), c.hash());
}

#[test]
fn hash_is_pinned_so_that_it_is_the_same_on_every_machine() {
    // A golden value: if this moves, devices and relays built from different commits or on
    // different machines would refuse each other. Change it only with the schema format.
    let s = Schema::from_toml_str(
        r#"
        [types.thing]
        policy = "lww"
        write = ["admin", "patient"]
        fields.a = { type = "string", required = true, max_length = 5 }
        fields.b = { type = "float", min = 0, max = 2.5 }
        fields.c = { type = "enum", values = ["x", "y"] }
        "#,
    )
    .unwrap();
    assert_eq!(
        s.hash().to_hex(),
        "78378f694545ac59c6c6220ed5aad6d9c76feda3db6a723378f14ece52fceb24"
    );
}

fn err(text: &str) -> String {
    Schema::from_toml_str(text).unwrap_err().to_string()
}

#[test]
fn malformed_schemas_name_the_type_and_field() {
    let e = err(r#"
        [types.set]
        policy = "gated"
        write = ["admin"]
        fields.reps = { type = "integer" }
    "#);
    assert!(
        e.contains("type `set`, field `reps`") && e.contains("unknown field type `integer`"),
        "{e}"
    );

    let e = err(r#"
        [types.set]
        policy = "gated"
        write = ["admin"]
        fields.reps = { type = "int", minn = 0 }
    "#);
    assert!(e.contains("type `set`, field `reps`") && e.contains("`minn`"), "{e}");

    let e = err(r#"
        [types.session]
        policy = "gated"
        write = ["admin"]
        fields.patient_id = { type = "ref", to = "patinet" }
    "#);
    assert!(
        e.contains("type `session`, field `patient_id`") && e.contains("patinet"),
        "{e}"
    );

    let e = err(r#"
        [types.set]
        policy = "gated"
        write = ["admin"]
        fields.exercise_name = { type = "string", required_unless = "exercise" }
    "#);
    assert!(e.contains("field `exercise_name`") && e.contains("`exercise`"), "{e}");

    let e = err(r#"
        [types.session]
        policy = "gatd"
        write = ["admin"]
    "#);
    assert!(
        e.contains("type `session`") && e.contains("unknown policy `gatd`"),
        "{e}"
    );

    let e = err(r#"
        [types.plan]
        policy = "server_owned"
        write = ["patient"]
    "#);
    assert!(e.contains("type `plan`") && e.contains("patient"), "{e}");

    let e = err(r#"
        [types.thing]
        policy = "gated"
        write = ["admin"]
        fields.status = { type = "enum", values = [] }
    "#);
    assert!(e.contains("field `status`") && e.contains("empty"), "{e}");

    let e = err(r#"
        [types.form]
        policy = "gated"
        write = ["admin"]
        lockable = true
    "#);
    assert!(e.contains("type `form`") && e.contains("locked"), "{e}");

    let e = err("this is = = not toml");
    assert!(e.contains("not valid TOML"), "{e}");

    let e = err(r#"
        [types.thing]
        policy = "gated"
        write = ["admin"]
        fields._secret = { type = "string" }
    "#);
    assert!(e.contains("field `_secret`") && e.contains("reserved"), "{e}");
}

#[test]
fn loading_a_missing_file_names_it() {
    let e = Schema::load(Some(Path::new("/nonexistent/entities.toml"))).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/entities.toml"));
}

#[test]
fn declared_migrations_are_checked_where_they_are_written() {
    let ty =
        |fields: &str, policy: &str| format!("[types.visit]\npolicy = \"{policy}\"\nwrite = [\"admin\"]\n{fields}\n");
    let cases = [
        (
            ty(
                r#"fields.title = { type = "string", renamed_from = "room" }
fields.room = { type = "string" }"#,
                "gated",
            ),
            "`room`, which is still a field",
        ),
        (
            ty(
                r#"fields.a = { type = "string", renamed_from = "old" }
fields.b = { type = "string", renamed_from = "old" }"#,
                "gated",
            ),
            "also the old name of",
        ),
        (
            ty(r#"fields.body = { type = "text", renamed_from = "old" }"#, "notes"),
            "scalar fields",
        ),
        (
            ty(r#"fields.a = { type = "string", renamed_from = "old" }"#, "lww"),
            "not supported in `lww`",
        ),
        (
            ty(r#"fields.a = { type = "string", renamed_from = ["x", "x"] }"#, "gated"),
            "lists `x` twice",
        ),
        (
            ty(
                r#"fields.a = { type = "string", renamed_from = "Not A Name" }"#,
                "gated",
            ),
            "not a field name",
        ),
        (
            ty(r#"fields.n = { type = "int", max = 10, default = 11 }"#, "gated"),
            "`default`",
        ),
        (
            ty(r#"fields.n = { type = "int", default = "ten" }"#, "gated"),
            "`default`",
        ),
        (
            ty(r#"fields.d = { type = "date", default = 2026-01-01 }"#, "gated"),
            "as strings",
        ),
    ];
    for (text, expected) in cases {
        let e = err(&text);
        assert!(e.contains("type `visit`") && e.contains(expected), "{expected}: {e}");
    }
    let defaults = Schema::from_toml_str(&ty(
        r#"fields.n = { type = "int", default = 3 }
fields.x = { type = "float", default = 1.5 }
fields.b = { type = "bool", default = true }"#,
        "gated",
    ))
    .unwrap();
    let view = defaults.entity_type("visit").unwrap().view(serde_json::Map::new());
    assert_eq!(
        serde_json::Value::Object(view),
        serde_json::json!({"n": 3, "x": 1.5, "b": true})
    );
    let ok = Schema::from_toml_str(&ty(
        r#"fields.title = { type = "string", renamed_from = ["label", "name"] }
fields.status = { type = "enum", values = ["open", "closed"], required = true, default = "open" }"#,
        "gated",
    ))
    .unwrap();
    let visit = ok.entity_type("visit").unwrap();
    assert!(ok.has_migrations() && visit.knows_key("label") && visit.knows_key("title"));
    assert!(!visit.knows_key("room"));
    assert_eq!(visit.renamed_field("name").map(|f| f.name.as_str()), Some("title"));
    assert!(!Schema::default_schema().has_migrations());
}

#[test]
fn field_authority_parses_and_names_what_is_missing() {
    let ok = Schema::from_toml_str(
        r#"
        [types.run]
        policy = "gated"
        write = ["patient", "service"]
        duplicates = { same = ["kind"], near = "at", within_minutes = 5 }
        fields.kind = { type = "string", authority = "shared" }
        fields.at = { type = "timestamp", authority = "shared" }
        fields.hr = { type = "int", authority = "service" }
        fields.km = { type = "float", authority = "service", provisional = true }
        fields.feel = { type = "string" }
        fields.duplicate_of = { type = "ref", to = "run" }
        fields.merged_into = { type = "ref", to = "run" }
        "#,
    )
    .unwrap();
    let run = ok.entity_type("run").unwrap();
    assert!(run.has_authority());
    assert_eq!(run.owner_of("hr"), Authority::Service);
    assert_eq!(
        run.owner_of("feel"),
        Authority::User,
        "people own what is not annotated"
    );
    assert!(run.field("km").unwrap().provisional);
    assert_eq!(run.duplicates.as_ref().unwrap().within_minutes, 5);

    let base = |policy: &str, write: &str, extra: &str| {
        format!(
            "[types.run]\npolicy = \"{policy}\"\nwrite = [{write}]\nfields.at = {{ type = \"timestamp\" }}\n\
             fields.hr = {{ type = \"int\", authority = \"service\" }}\n{extra}"
        )
    };
    let e = err(&base("lww", "\"patient\", \"service\"", ""));
    assert!(e.contains("type `run`") && e.contains("for `gated` types"), "{e}");
    let e = err(&base("gated", "\"patient\"", ""));
    assert!(e.contains("needs `service` among its `write` roles"), "{e}");
    let e = err(&base(
        "gated",
        "\"service\"",
        "fields.x = { type = \"int\", authority = \"machine\" }\n",
    ));
    assert!(e.contains("field `x`") && e.contains("machine"), "{e}");
    let dup = "duplicates = { same = [\"hr\"], near = \"hr\", within_minutes = 5 }\n";
    let e = err(&base("gated", "\"service\"", dup));
    assert!(
        e.contains("`duplicates.near` (`hr`) must be a timestamp or date field"),
        "{e}"
    );
    let dup = "duplicates = { same = [\"kind\"], near = \"at\", within_minutes = 5 }\n";
    let e = err(&base("gated", "\"service\"", dup));
    assert!(e.contains("`duplicates` names `kind`"), "{e}");
    let dup = "duplicates = { same = [\"hr\"], near = \"at\", within_minutes = 5 }\n";
    let e = err(&base("gated", "\"service\"", dup));
    assert!(e.contains("needs a field `duplicate_of`"), "{e}");
    let e = err(&base("gated", "\"service\"", "request_for = \"plan\"\n"));
    assert!(e.contains("needs a field `superseded_at`"), "{e}");
    let superseded = "request_for = \"plan\"\n\
        fields.superseded_at = { type = \"timestamp\", authority = \"service\" }\n\
        fields.superseded_by_version = { type = \"int\", authority = \"service\" }\n\
        fields.superseded_notice = { type = \"string\", authority = \"service\" }\n";
    let e = err(&base("gated", "\"service\"", superseded));
    assert!(e.contains("`request_for` names unknown type `plan`"), "{e}");
}

#[test]
fn windows_and_priorities_are_checked_and_left_out_of_the_hash() {
    let base = r#"
        [types.log]
        policy = "lww"
        write = ["admin"]
        fields.day = { type = "date" }
        fields.note = { type = "string" }
    "#;
    let plain = Schema::from_toml_str(base).unwrap();
    let with = Schema::from_toml_str(&format!(
        "{base}\nwindow = {{ field = \"day\", days_back = 30 }}\npriority = \"low\"\n"
    ))
    .unwrap();
    let log = with.entity_type("log").unwrap();
    assert_eq!(
        log.window.as_ref().map(|w| (w.field.as_str(), w.days_back)),
        Some(("day", Some(30)))
    );
    assert!(log.low_priority);
    assert_eq!(plain.hash(), with.hash(), "delivery is not part of the hash");

    let e = err(&format!("{base}\nwindow = {{ field = \"note\", days_back = 30 }}\n"));
    assert!(e.contains("must be a date or timestamp field"), "{e}");
    let e = err(&format!("{base}\nwindow = {{ field = \"gone\", days_back = 30 }}\n"));
    assert!(e.contains("not a field"), "{e}");
    let e = err(&format!("{base}\nwindow = {{ field = \"day\" }}\n"));
    assert!(e.contains("days_back"), "{e}");
    let e = err(&format!("{base}\nwindow = {{ field = \"day\", days_back = -1 }}\n"));
    assert!(e.contains("0 to"), "{e}");
    let e = err(&format!("{base}\npriority = \"urgent\"\n"));
    assert!(e.contains("`priority`"), "{e}");
}
