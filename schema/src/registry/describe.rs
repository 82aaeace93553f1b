//! The schema as people read it: `fieldsync-peer schema` and `fieldsync-relay schema show`
//! print it, and an unknown type name gets a "did you mean" from it.

use std::fmt::Write as _;

use super::{EntityType, Field, FieldKind, Schema};

impl Schema {
    /// Every type with its policy, who may write it and its fields (one type with `only`).
    /// `None` when `only` names no type.
    pub fn describe(&self, only: Option<&str>) -> Option<String> {
        let mut out = String::new();
        match only {
            Some(name) => describe_type(&mut out, self.entity_type(name)?),
            None => {
                for ty in self.types() {
                    describe_type(&mut out, ty);
                    out.push('\n');
                }
            }
        }
        Some(out)
    }

    /// The hint for a type name the schema does not have: the closest name, and every name.
    pub fn unknown_type_hint(&self, name: &str) -> String {
        let names: Vec<&str> = self.type_names().collect();
        let closest = crate::cli::did_you_mean(name, names.iter().copied());
        format!("{closest}the schema's types: {}", names.join(", "))
    }
}

fn describe_type(out: &mut String, ty: &EntityType) {
    let roles: Vec<&str> = ty.write_roles.iter().map(|r| r.as_str()).collect();
    let mut traits = vec![ty.policy.as_str().to_string()];
    if ty.lockable {
        traits.push("lockable".into());
    }
    if ty.signable {
        traits.push("signable".into());
    }
    let _ = writeln!(
        out,
        "{} ({}; written by {})",
        ty.name,
        traits.join(", "),
        roles.join(", ")
    );
    if let Some(d) = &ty.description {
        let _ = writeln!(out, "  {d}");
    }
    for field in ty.fields.values() {
        let _ = writeln!(out, "  {:<20} {}", field.name, field_line(field));
    }
}

fn field_line(field: &Field) -> String {
    let mut line = field.kind.type_name().to_string();
    match &field.kind {
        FieldKind::Enum { values } => {
            let _ = write!(line, " ({})", values.join(" | "));
        }
        FieldKind::Ref { to } => {
            let _ = write!(line, " → {to}");
        }
        _ => {}
    }
    if field.required {
        line.push_str(", required");
    }
    if let Some(other) = &field.required_unless {
        let _ = write!(line, ", required unless {other}");
    }
    if let Some(d) = &field.description {
        let _ = write!(line, " — {d}");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_every_type_or_one_and_suggests_the_closest_name() {
        let schema = Schema::default_schema();
        let all = schema.describe(None).unwrap();
        for name in schema.type_names() {
            assert!(all.contains(&format!("{name} (")), "{name} missing from\n{all}");
        }
        let patient = schema.describe(Some("patient")).unwrap();
        assert!(patient.starts_with("patient (gated; written by"), "{patient}");
        assert!(
            patient.contains("name") && patient.contains("string, required"),
            "{patient}"
        );
        assert!(schema.describe(Some("pateint")).is_none());
        let hint = schema.unknown_type_hint("pateint");
        assert!(hint.starts_with("did you mean `patient`?"), "{hint}");
        assert!(!schema.unknown_type_hint("zzzzzzzz").contains("did you mean"));
    }
}
