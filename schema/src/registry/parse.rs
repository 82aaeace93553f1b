//! Parsing `entities.toml` by hand, so every error names the type and field at fault.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use toml::{Table, Value};

use super::{
    Authority, DUPLICATE_OF, DuplicateKey, EntityType, FIELD_TYPES, Field, FieldKind, MERGED_INTO, Policy, Role,
    SUPERSEDED_AT, SUPERSEDED_BY_VERSION, SUPERSEDED_NOTICE, SchemaError, invalid, join_names,
};

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && s.len() <= 64
}

pub(super) fn parse_type(name: &str, def: &Value) -> Result<EntityType, SchemaError> {
    let loc = format!("type `{name}`");
    if !is_identifier(name) {
        return Err(invalid(
            &loc,
            "type names are lowercase identifiers (a-z, 0-9, _), starting with a letter",
        ));
    }
    let table = def
        .as_table()
        .ok_or_else(|| invalid(&loc, "must be a table with `policy` and `fields`"))?;
    let mut policy = None;
    let mut lockable = false;
    let mut signable = false;
    let mut write_roles = None;
    let mut sign_roles = BTreeSet::new();
    let mut fields = BTreeMap::new();
    let mut description = None;
    let mut duplicates = None;
    let mut request_for = None;
    let mut window = None;
    let mut low_priority = false;
    for (key, value) in table {
        match key.as_str() {
            "priority" => {
                low_priority = match value.as_str() {
                    Some("low") => true,
                    Some("normal") => false,
                    _ => return Err(invalid(&loc, "`priority` must be \"normal\" or \"low\"")),
                }
            }
            "window" => window = Some(value),
            "duplicates" => duplicates = Some(parse_duplicate_key(value, &loc)?),
            "request_for" => request_for = Some(as_string(value, &loc, "request_for")?),
            "policy" => {
                let s = value
                    .as_str()
                    .ok_or_else(|| invalid(&loc, "`policy` must be a string"))?;
                policy = Some(Policy::from_str(s).map_err(|m| invalid(&loc, m))?);
            }
            "lockable" => lockable = as_bool(value, &loc, "lockable")?,
            "signable" => signable = as_bool(value, &loc, "signable")?,
            "write" => write_roles = Some(parse_roles(value, &loc, "write")?),
            "sign" => sign_roles = parse_roles(value, &loc, "sign")?,
            "description" => description = Some(as_string(value, &loc, "description")?),
            "fields" => {
                let ft = value
                    .as_table()
                    .ok_or_else(|| invalid(&loc, "`fields` must be a table of field definitions"))?;
                for (fname, fdef) in ft {
                    fields.insert(fname.clone(), parse_field(name, fname, fdef)?);
                }
            }
            other => {
                return Err(invalid(
                    &loc,
                    format!(
                        "unknown key `{other}` (expected policy, lockable, signable, write, sign, description, fields, \
                         duplicates, request_for, window, priority)"
                    ),
                ));
            }
        }
    }
    let policy = policy.ok_or_else(|| invalid(&loc, "missing `policy`"))?;
    let write_roles =
        write_roles.ok_or_else(|| invalid(&loc, "missing `write` (the roles that may write this type)"))?;
    if policy == Policy::ServerOwned
        && let Some(r) = write_roles.iter().find(|r| !matches!(r, Role::Admin | Role::Service))
    {
        return Err(invalid(
            &loc,
            format!("policy `server_owned` allows only `admin` and `service` to write, not `{r}`"),
        ));
    }
    if signable && sign_roles.is_empty() {
        return Err(invalid(&loc, "`signable` types need `sign` (the roles that may sign)"));
    }
    if !signable && !sign_roles.is_empty() {
        return Err(invalid(&loc, "`sign` roles are only meaningful with `signable = true`"));
    }
    if lockable {
        match fields.get("locked") {
            Some(Field {
                kind: FieldKind::Bool, ..
            }) => {}
            _ => return Err(invalid(&loc, "`lockable` types need a `locked` field of type `bool`")),
        }
    }
    let has_counter = fields
        .values()
        .any(|f: &Field| matches!(f.kind, FieldKind::Counter { .. }));
    if has_counter && policy != Policy::Counter {
        return Err(invalid(
            &loc,
            "counter fields are only allowed in types with policy `counter`",
        ));
    }
    if policy == Policy::Counter && !has_counter {
        return Err(invalid(
            &loc,
            "policy `counter` needs at least one field of type `counter`",
        ));
    }
    let mut old_names: BTreeMap<&str, &str> = BTreeMap::new();
    for f in fields.values() {
        for old in &f.renamed_from {
            let at = format!("type `{name}`, field `{}`", f.name);
            if fields.contains_key(old) {
                return Err(invalid(
                    at,
                    format!("`renamed_from` names `{old}`, which is still a field of `{name}`"),
                ));
            }
            if let Some(other) = old_names.insert(old, &f.name) {
                return Err(invalid(at, format!("`{old}` is also the old name of `{other}`")));
            }
            if policy == Policy::Lww {
                return Err(invalid(
                    at,
                    "`renamed_from` is not supported in `lww` types yet: last-writer-wins stamps are kept per stored name",
                ));
            }
        }
    }
    for f in fields.values() {
        if let Some(other) = &f.required_unless
            && !fields.contains_key(other)
        {
            return Err(invalid(
                format!("type `{name}`, field `{}`", f.name),
                format!("`required_unless` names `{other}`, which is not a field of `{name}`"),
            ));
        }
    }
    let window = window
        .map(|w| super::window::parse_window(w, &fields, &loc))
        .transpose()?;
    let ty = EntityType {
        name: name.to_string(),
        policy,
        lockable,
        signable,
        write_roles,
        sign_roles,
        fields,
        duplicates,
        request_for,
        window,
        low_priority,
        description,
    };
    check_authority(&ty, &loc)?;
    Ok(ty)
}

/// Field authority, duplicate keys and requests only make sense together with the fields and
/// policy they rely on; say which is missing rather than fail on the first write.
fn check_authority(ty: &EntityType, loc: &str) -> Result<(), SchemaError> {
    let needs_gated = ty.has_authority() || ty.duplicates.is_some() || ty.request_for.is_some();
    if needs_gated && ty.policy != Policy::Gated {
        return Err(invalid(
            loc,
            "field `authority`, `duplicates` and `request_for` are for `gated` types (other policies merge without prompts already)",
        ));
    }
    let service_owned = ty.fields.values().any(|f| f.authority == Some(Authority::Service));
    if service_owned && !ty.write_roles.contains(&Role::Service) {
        return Err(invalid(
            loc,
            "a type with service-owned fields needs `service` among its `write` roles",
        ));
    }
    let field_is = |name: &str, what: &str, ok: &dyn Fn(&Field) -> bool| -> Result<(), SchemaError> {
        match ty.fields.get(name) {
            Some(f) if ok(f) => Ok(()),
            _ => Err(invalid(loc, format!("needs a field `{name}`: {what}"))),
        }
    };
    if let Some(key) = &ty.duplicates {
        for name in key.same.iter().chain([&key.near]) {
            let Some(f) = ty.fields.get(name) else {
                return Err(invalid(
                    loc,
                    format!("`duplicates` names `{name}`, which is not a field of `{}`", ty.name),
                ));
            };
            if matches!(f.kind, FieldKind::Text { .. } | FieldKind::Counter { .. }) {
                return Err(invalid(
                    loc,
                    format!("`duplicates` cannot compare the {} field `{name}`", f.kind.type_name()),
                ));
            }
        }
        if !matches!(
            ty.fields.get(&key.near).map(|f| &f.kind),
            Some(FieldKind::Timestamp | FieldKind::Date)
        ) {
            return Err(invalid(
                loc,
                format!("`duplicates.near` (`{}`) must be a timestamp or date field", key.near),
            ));
        }
        let self_ref = |f: &Field| matches!(&f.kind, FieldKind::Ref { to } if *to == ty.name) && !f.required;
        let what = format!("an optional `ref` to `{}` (with `duplicates`)", ty.name);
        field_is(DUPLICATE_OF, &what, &self_ref)?;
        field_is(MERGED_INTO, &what, &self_ref)?;
    }
    if ty.request_for.is_some() {
        let service = |kind: fn(&FieldKind) -> bool| {
            move |f: &Field| kind(&f.kind) && f.authority == Some(Authority::Service) && !f.required
        };
        field_is(
            SUPERSEDED_AT,
            "an optional timestamp with authority = \"service\" (with `request_for`)",
            &service(|k| matches!(k, FieldKind::Timestamp)),
        )?;
        field_is(
            SUPERSEDED_BY_VERSION,
            "an optional int with authority = \"service\" (with `request_for`)",
            &service(|k| matches!(k, FieldKind::Int { .. })),
        )?;
        field_is(
            SUPERSEDED_NOTICE,
            "an optional string with authority = \"service\" (with `request_for`)",
            &service(|k| matches!(k, FieldKind::String { .. })),
        )?;
    }
    Ok(())
}

/// `{ same = ["activity_type"], near = "started_at", within_minutes = 10 }`.
fn parse_duplicate_key(value: &Value, loc: &str) -> Result<DuplicateKey, SchemaError> {
    let what = "`duplicates` must be a table { same = [fields], near = \"field\", within_minutes = N }";
    let t = value.as_table().ok_or_else(|| invalid(loc, what))?;
    let mut same = Vec::new();
    let mut near = None;
    let mut within = None;
    for (key, v) in t {
        match key.as_str() {
            "same" => {
                for item in v.as_array().ok_or_else(|| invalid(loc, what))? {
                    same.push(item.as_str().ok_or_else(|| invalid(loc, what))?.to_string());
                }
            }
            "near" => near = Some(v.as_str().ok_or_else(|| invalid(loc, what))?.to_string()),
            "within_minutes" => {
                within = Some(
                    v.as_integer()
                        .and_then(|i| u32::try_from(i).ok())
                        .filter(|i| (1..=7 * 24 * 60).contains(i))
                        .ok_or_else(|| invalid(loc, "`duplicates.within_minutes` must be 1 to 10080 (a week)"))?,
                )
            }
            other => return Err(invalid(loc, format!("unknown key `{other}` in `duplicates` ({what})"))),
        }
    }
    match (near, within) {
        (Some(near), Some(within_minutes)) => Ok(DuplicateKey {
            same,
            near,
            within_minutes,
        }),
        _ => Err(invalid(loc, what)),
    }
}

fn parse_field(type_name: &str, name: &str, def: &Value) -> Result<Field, SchemaError> {
    let loc = format!("type `{type_name}`, field `{name}`");
    if !is_identifier(name) {
        return Err(invalid(
            &loc,
            "field names are lowercase identifiers (a-z, 0-9, _) starting with a letter; names starting with `_` are reserved",
        ));
    }
    let table = def
        .as_table()
        .ok_or_else(|| invalid(&loc, "must be a table such as { type = \"string\", required = true }"))?;
    let type_name_value = table
        .get("type")
        .ok_or_else(|| invalid(&loc, "missing `type`"))?
        .as_str()
        .ok_or_else(|| invalid(&loc, "`type` must be a string"))?;
    let allowed: &[&str] = match type_name_value {
        "string" | "text" => &["max_length"],
        "int" | "float" => &["min", "max"],
        "counter" => &["min"],
        "enum" => &["values"],
        "ref" => &["to"],
        "bool" | "timestamp" | "date" => &[],
        other => {
            return Err(invalid(
                &loc,
                format!(
                    "unknown field type `{other}` (expected one of {})",
                    join_names(FIELD_TYPES)
                ),
            ));
        }
    };
    let mut required = false;
    let mut required_unless = None;
    let mut description = None;
    let mut renamed_from = Vec::new();
    let mut default = None;
    let mut authority = None;
    let mut provisional = false;
    for (key, value) in table {
        match key.as_str() {
            "type" => {}
            "authority" => {
                let s = as_string(value, &loc, "authority")?;
                authority = Some(Authority::parse(&s).ok_or_else(|| {
                    invalid(
                        &loc,
                        format!("unknown authority `{s}` (expected `user`, `service` or `shared`)"),
                    )
                })?);
            }
            "provisional" => provisional = as_bool(value, &loc, "provisional")?,
            "renamed_from" => renamed_from = parse_old_names(value, &loc)?,
            "default" => default = Some(toml_to_json(value, &loc)?),
            "required" => required = as_bool(value, &loc, "required")?,
            "required_unless" => required_unless = Some(as_string(value, &loc, "required_unless")?),
            "description" => description = Some(as_string(value, &loc, "description")?),
            k if allowed.contains(&k) => {}
            other => {
                return Err(invalid(
                    &loc,
                    format!("key `{other}` is not valid for a field of type `{type_name_value}`"),
                ));
            }
        }
    }
    if required && required_unless.is_some() {
        return Err(invalid(&loc, "use either `required` or `required_unless`, not both"));
    }
    let kind = match type_name_value {
        "string" => FieldKind::String {
            max_length: opt_u64(table, &loc, "max_length")?,
        },
        "text" => FieldKind::Text {
            max_length: opt_u64(table, &loc, "max_length")?,
        },
        "int" => {
            let (min, max) = (opt_i64(table, &loc, "min")?, opt_i64(table, &loc, "max")?);
            if let (Some(a), Some(b)) = (min, max)
                && a > b
            {
                return Err(invalid(&loc, format!("`min` ({a}) is greater than `max` ({b})")));
            }
            FieldKind::Int { min, max }
        }
        "float" => {
            let (min, max) = (opt_f64(table, &loc, "min")?, opt_f64(table, &loc, "max")?);
            if let (Some(a), Some(b)) = (min, max)
                && a > b
            {
                return Err(invalid(&loc, format!("`min` ({a}) is greater than `max` ({b})")));
            }
            FieldKind::Float { min, max }
        }
        "counter" => FieldKind::Counter {
            min: opt_i64(table, &loc, "min")?,
        },
        "bool" => FieldKind::Bool,
        "timestamp" => FieldKind::Timestamp,
        "date" => FieldKind::Date,
        "enum" => {
            let values = table
                .get("values")
                .and_then(Value::as_array)
                .ok_or_else(|| invalid(&loc, "`enum` fields need `values`, an array of strings"))?;
            let mut out = Vec::with_capacity(values.len());
            for v in values {
                let s = v
                    .as_str()
                    .ok_or_else(|| invalid(&loc, "`values` must contain only strings"))?;
                if out.iter().any(|o| o == s) {
                    return Err(invalid(&loc, format!("enum value `{s}` is listed twice")));
                }
                out.push(s.to_string());
            }
            if out.is_empty() {
                return Err(invalid(&loc, "`values` must not be empty"));
            }
            FieldKind::Enum { values: out }
        }
        "ref" => FieldKind::Ref {
            to: table
                .get("to")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid(&loc, "`ref` fields need `to`, the referenced type"))?
                .to_string(),
        },
        _ => unreachable!("field type names are checked above"),
    };
    if !renamed_from.is_empty() && matches!(kind, FieldKind::Text { .. } | FieldKind::Counter { .. }) {
        return Err(invalid(
            &loc,
            "`renamed_from` is for scalar fields: a text or counter field's concurrent edits live in its \
             object under the old name (add a new field and copy instead)",
        ));
    }
    if default.is_some() && matches!(kind, FieldKind::Counter { .. }) {
        return Err(invalid(
            &loc,
            "counters start at zero; a `default` is not valid for them",
        ));
    }
    if provisional && authority != Some(Authority::Service) {
        return Err(invalid(
            &loc,
            "`provisional` is for service-owned fields (authority = \"service\"): people's value stands until the service writes",
        ));
    }
    let field = Field {
        name: name.to_string(),
        kind,
        required,
        required_unless,
        renamed_from,
        default,
        authority,
        provisional,
        description,
    };
    if let Some(value) = &field.default {
        let mut errors = Vec::new();
        crate::validate::check_value(&field, value, &mut errors);
        if let Some(e) = errors.first() {
            return Err(invalid(&loc, format!("`default` {}", e.message)));
        }
    }
    Ok(field)
}

/// `renamed_from = "old"` or `renamed_from = ["older", "old"]`.
fn parse_old_names(value: &Value, loc: &str) -> Result<Vec<String>, SchemaError> {
    let names: Vec<&Value> = match value {
        Value::Array(items) => items.iter().collect(),
        one => vec![one],
    };
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for v in names {
        let name = v
            .as_str()
            .ok_or_else(|| invalid(loc, "`renamed_from` must be a field name or an array of field names"))?;
        if !is_identifier(name) {
            return Err(invalid(
                loc,
                format!("`renamed_from` names `{name}`, which is not a field name"),
            ));
        }
        if out.iter().any(|o| o == name) {
            return Err(invalid(loc, format!("`renamed_from` lists `{name}` twice")));
        }
        out.push(name.to_string());
    }
    if out.is_empty() {
        return Err(invalid(loc, "`renamed_from` must not be empty"));
    }
    Ok(out)
}

/// A `default` as the JSON value a record would hold (dates and timestamps are strings).
fn toml_to_json(value: &Value, loc: &str) -> Result<serde_json::Value, SchemaError> {
    Ok(match value {
        Value::String(s) => serde_json::Value::String(s.clone()),
        Value::Integer(i) => serde_json::Value::from(*i),
        Value::Float(x) => serde_json::Number::from_f64(*x)
            .map(serde_json::Value::Number)
            .ok_or_else(|| invalid(loc, "`default` must be a finite number"))?,
        Value::Boolean(b) => serde_json::Value::Bool(*b),
        _ => {
            return Err(invalid(
                loc,
                "`default` must be a string, number or boolean (write dates and timestamps as strings)",
            ));
        }
    })
}

pub(super) fn check_cross_references(types: &BTreeMap<String, EntityType>) -> Result<(), SchemaError> {
    for t in types.values() {
        if let Some(target) = &t.request_for
            && !types.contains_key(target)
        {
            return Err(invalid(
                format!("type `{}`", t.name),
                format!("`request_for` names unknown type `{target}`"),
            ));
        }
        for (f, to) in t.ref_fields() {
            if !types.contains_key(to) {
                return Err(invalid(
                    format!("type `{}`, field `{}`", t.name, f.name),
                    format!("`ref` to unknown type `{to}`"),
                ));
            }
        }
    }
    Ok(())
}

fn as_bool(v: &Value, loc: &str, key: &str) -> Result<bool, SchemaError> {
    v.as_bool()
        .ok_or_else(|| invalid(loc, format!("`{key}` must be true or false")))
}

fn as_string(v: &Value, loc: &str, key: &str) -> Result<String, SchemaError> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| invalid(loc, format!("`{key}` must be a string")))
}

fn parse_roles(v: &Value, loc: &str, key: &str) -> Result<BTreeSet<Role>, SchemaError> {
    let arr = v
        .as_array()
        .ok_or_else(|| invalid(loc, format!("`{key}` must be an array of roles")))?;
    arr.iter()
        .map(|r| {
            let s = r
                .as_str()
                .ok_or_else(|| invalid(loc, format!("`{key}` must contain only role names")))?;
            Role::from_str(s).map_err(|m| invalid(loc, format!("in `{key}`: {m}")))
        })
        .collect()
}

fn opt_u64(t: &Table, loc: &str, key: &str) -> Result<Option<u64>, SchemaError> {
    t.get(key)
        .map(|v| {
            v.as_integer()
                .and_then(|i| u64::try_from(i).ok())
                .ok_or_else(|| invalid(loc, format!("`{key}` must be a non-negative integer")))
        })
        .transpose()
}

fn opt_i64(t: &Table, loc: &str, key: &str) -> Result<Option<i64>, SchemaError> {
    t.get(key)
        .map(|v| {
            v.as_integer()
                .ok_or_else(|| invalid(loc, format!("`{key}` must be an integer")))
        })
        .transpose()
}

fn opt_f64(t: &Table, loc: &str, key: &str) -> Result<Option<f64>, SchemaError> {
    t.get(key)
        .map(|v| {
            v.as_float()
                .or_else(|| v.as_integer().map(|i| i as f64))
                .filter(|f| f.is_finite())
                .ok_or_else(|| invalid(loc, format!("`{key}` must be a finite number")))
        })
        .transpose()
}
