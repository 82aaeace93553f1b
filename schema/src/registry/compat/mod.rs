//! Which schema changes a fleet of devices on mixed versions survives.
//!
//! Devices update over days or weeks, so a relay serving schema N+1 meets devices still on N,
//! and an updated device meets a relay still on N. A change is *compatible* when every write
//! valid under the old schema stays valid under the new one and every value an old device holds
//! keeps its meaning: new types, new optional fields, new enum values, widened ranges, relaxed
//! requirements, new permissions. Anything else is *breaking*: an old device would write what
//! the new relay refuses, or read a value under a meaning that changed.
//!
//! [`compare`] lists every change between two schemas with its verdict, for
//! `fieldsync-relay schema check` and for the relay's refusal to serve a breaking schema.

use std::collections::BTreeSet;
use std::fmt;

use serde::Serialize;

use super::{EntityType, Field, FieldKind, Role, Schema};

/// Whether devices on the old schema keep working against the new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Compatible,
    Breaking,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Compatible => "compatible",
            Verdict::Breaking => "breaking",
        })
    }
}

/// One difference between two schemas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SchemaChange {
    /// `type`, `type.field`, or `schema_version`.
    pub location: String,
    /// What changed, in words (`"new optional field"`, `"max 10 → 5"`).
    pub change: String,
    pub verdict: Verdict,
}

/// Every change from one schema to another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CompatReport {
    pub from_version: u64,
    pub to_version: u64,
    pub changes: Vec<SchemaChange>,
}

impl CompatReport {
    /// Whether devices on the old schema keep working (no change is breaking).
    pub fn is_compatible(&self) -> bool {
        self.breaking().next().is_none()
    }

    pub fn breaking(&self) -> impl Iterator<Item = &SchemaChange> {
        self.changes.iter().filter(|c| c.verdict == Verdict::Breaking)
    }

    /// The report for people: one line per change, then the verdict.
    pub fn render(&self) -> String {
        let mut out = format!("schema v{} → v{}\n", self.from_version, self.to_version);
        if self.changes.is_empty() {
            out.push_str("no changes\n");
        }
        for c in &self.changes {
            out.push_str(&format!(
                "  {:<10}  {}: {}\n",
                c.verdict.to_string(),
                c.location,
                c.change
            ));
        }
        let breaking = self.breaking().count();
        if breaking == 0 {
            out.push_str("compatible: devices on the old version keep syncing\n");
        } else {
            out.push_str(&format!(
                "{breaking} breaking change{}: devices on v{} would be refused\n",
                if breaking == 1 { "" } else { "s" },
                self.from_version
            ));
        }
        out
    }
}

/// Lists every change from `old` to `new`, types and fields in name order.
pub fn compare(old: &Schema, new: &Schema) -> CompatReport {
    let mut changes = Changes::default();
    let names: BTreeSet<&str> = old.type_names().chain(new.type_names()).collect();
    for name in names {
        match (old.entity_type(name), new.entity_type(name)) {
            (Some(_), None) => changes.breaking(name, "type removed"),
            (None, Some(_)) => changes.compatible(name, "new type"),
            (Some(o), Some(n)) => compare_types(&mut changes, o, n),
            (None, None) => {}
        }
    }
    let mut changes = changes.0;
    if !changes.is_empty() && new.version() <= old.version() {
        changes.push(SchemaChange {
            location: "schema_version".into(),
            change: format!(
                "the schema changed but its version did not rise ({} → {}): devices could not tell the two apart",
                old.version(),
                new.version()
            ),
            verdict: Verdict::Breaking,
        });
    }
    CompatReport {
        from_version: old.version(),
        to_version: new.version(),
        changes,
    }
}

#[derive(Default)]
struct Changes(Vec<SchemaChange>);

impl Changes {
    fn push(&mut self, location: &str, change: impl Into<String>, verdict: Verdict) {
        self.0.push(SchemaChange {
            location: location.to_string(),
            change: change.into(),
            verdict,
        });
    }
    fn breaking(&mut self, location: &str, change: impl Into<String>) {
        self.push(location, change, Verdict::Breaking);
    }
    fn compatible(&mut self, location: &str, change: impl Into<String>) {
        self.push(location, change, Verdict::Compatible);
    }
}

fn compare_types(changes: &mut Changes, old: &EntityType, new: &EntityType) {
    let at = old.name.as_str();
    if old.policy != new.policy {
        changes.breaking(at, format!("policy {} → {}", old.policy, new.policy));
    }
    for (modifier, was, is) in [
        ("lockable", old.lockable, new.lockable),
        ("signable", old.signable, new.signable),
    ] {
        if was != is {
            changes.breaking(at, format!("{modifier} {was} → {is}"));
        }
    }
    compare_roles(changes, at, "write", &old.write_roles, &new.write_roles);
    compare_roles(changes, at, "sign", &old.sign_roles, &new.sign_roles);
    let fields: BTreeSet<&String> = old.fields.keys().chain(new.fields.keys()).collect();
    for name in fields {
        let location = format!("{at}.{name}");
        match (old.fields.get(name), new.fields.get(name)) {
            // Reported at the new name, as a rename.
            (Some(_), None) if renamed_target(old, new, name).is_some() => {}
            (Some(_), None) => changes.breaking(&location, "field removed"),
            (None, Some(f)) => match f.renamed_from.iter().find_map(|o| old.fields.get(o)) {
                Some(was) => {
                    changes.compatible(
                        &location,
                        format!(
                            "renamed from `{}` (devices on the old version keep writing `{}`; the relay keeps both names equal)",
                            was.name, was.name
                        ),
                    );
                    compare_fields(changes, &location, was, f);
                }
                None if f.required && f.default.is_some() => changes.compatible(
                    &location,
                    "new required field with a default (records without it read the default)",
                ),
                None if f.required => changes.breaking(
                    &location,
                    "new required field (devices on the old version cannot fill it; give it a `default`)",
                ),
                None if f.required_unless.is_some() => changes.breaking(
                    &location,
                    "new conditionally required field (devices on the old version cannot fill it)",
                ),
                None => changes.compatible(&location, "new optional field"),
            },
            (Some(o), Some(n)) => {
                compare_fields(changes, &location, o, n);
                compare_owners(changes, &location, old, new, o, n);
            }
            (None, None) => {}
        }
    }
    if old.duplicates != new.duplicates {
        changes.compatible(at, "duplicate key changed (the relay flags new records by the new key)");
    }
    if old.request_for != new.request_for {
        changes.compatible(at, "request_for changed");
    }
}

/// A change of owner is breaking only when a role that could write the type before loses the
/// right to write the field (a device on the old version still writes it and is refused):
/// passing to `shared`, or to the one class that wrote the type anyway, only narrows who merges
/// without a prompt. A provisional field made strict refuses people's writes.
fn compare_owners(changes: &mut Changes, at: &str, old_ty: &EntityType, new_ty: &EntityType, old: &Field, new: &Field) {
    use crate::registry::Authority;
    let (was, is) = (old_ty.owner_of(&old.name), new_ty.owner_of(&new.name));
    let loses = |owner: Authority, provisional: bool| {
        old_ty
            .write_roles
            .iter()
            .filter_map(|r| Authority::of_role(*r))
            .any(|class| class.may_write(was, old.provisional) && !class.may_write(owner, provisional))
    };
    if was != is || old.provisional != new.provisional {
        let words = if was == is {
            format!("provisional {} → {}", old.provisional, new.provisional)
        } else {
            format!("authority {was} → {is}")
        };
        if loses(is, new.provisional) {
            changes.breaking(
                at,
                format!("{words} (devices on the old version may write a field they no longer own)"),
            );
        } else {
            changes.compatible(at, words);
        }
    }
}

fn renamed_target<'a>(old: &EntityType, new: &'a EntityType, old_name: &str) -> Option<&'a Field> {
    new.renamed_field(old_name)
        .filter(|f| !old.fields.contains_key(&f.name))
}

fn compare_roles(changes: &mut Changes, at: &str, what: &str, old: &BTreeSet<Role>, new: &BTreeSet<Role>) {
    for role in new.difference(old) {
        changes.compatible(at, format!("{role} may now {what}"));
    }
    for role in old.difference(new) {
        changes.breaking(at, format!("{role} may no longer {what}"));
    }
}

fn compare_fields(changes: &mut Changes, at: &str, old: &Field, new: &Field) {
    if old.kind.type_name() != new.kind.type_name() {
        changes.breaking(at, format!("type {} → {}", old.kind.type_name(), new.kind.type_name()));
        return;
    }
    let (was, is) = (requirement(old), requirement(new));
    if was != is {
        let words = format!("{was} → {is}");
        // Relaxing is compatible: everything an old device writes still satisfies it.
        let relaxed = matches!(
            (&was, &is),
            (_, Requirement::Optional) | (Requirement::Required, Requirement::RequiredUnless(_))
        );
        // A record an old device writes without the field reads the default.
        let defaulted = is == Requirement::Required && new.default.is_some();
        if relaxed || defaulted {
            changes.compatible(at, words);
        } else {
            changes.breaking(at, words);
        }
    }
    match (&old.default, &new.default) {
        (None, Some(d)) => changes.compatible(at, format!("default {d} (records without the field read it)")),
        (Some(d), None) => changes.breaking(
            at,
            format!("default {d} removed (records without the field would read nothing)"),
        ),
        (Some(a), Some(b)) if a != b => changes.breaking(
            at,
            format!("default {a} → {b} (records without the field would read another value)"),
        ),
        _ => {}
    }
    compare_kinds(changes, at, &old.kind, &new.kind);
}

#[derive(Debug, PartialEq, Eq)]
enum Requirement<'a> {
    Optional,
    Required,
    RequiredUnless(&'a str),
}

impl fmt::Display for Requirement<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Requirement::Optional => f.write_str("optional"),
            Requirement::Required => f.write_str("required"),
            Requirement::RequiredUnless(other) => write!(f, "required unless {other}"),
        }
    }
}

fn requirement(f: &Field) -> Requirement<'_> {
    match (&f.required_unless, f.required) {
        (Some(other), _) => Requirement::RequiredUnless(other),
        (None, true) => Requirement::Required,
        (None, false) => Requirement::Optional,
    }
}

/// A bound from `old` to `new`; `upper` says which way widens.
fn compare_bound<T: PartialOrd + fmt::Display>(
    changes: &mut Changes,
    at: &str,
    name: &str,
    old: Option<T>,
    new: Option<T>,
    upper: bool,
) {
    let words = |o: &Option<T>, n: &Option<T>| {
        let show = |b: &Option<T>| b.as_ref().map_or("none".to_string(), ToString::to_string);
        format!("{name} {} → {}", show(o), show(n))
    };
    let widened = match (&old, &new) {
        (None, None) => return,
        (Some(o), Some(n)) if o == n => return,
        (Some(_), None) => true,
        (None, Some(_)) => false,
        (Some(o), Some(n)) => (n > o) == upper,
    };
    if widened {
        changes.compatible(at, words(&old, &new));
    } else {
        changes.breaking(at, words(&old, &new));
    }
}

fn compare_kinds(changes: &mut Changes, at: &str, old: &FieldKind, new: &FieldKind) {
    match (old, new) {
        (FieldKind::String { max_length: o }, FieldKind::String { max_length: n })
        | (FieldKind::Text { max_length: o }, FieldKind::Text { max_length: n }) => {
            compare_bound(changes, at, "max_length", *o, *n, true);
        }
        (FieldKind::Int { min: omin, max: omax }, FieldKind::Int { min: nmin, max: nmax }) => {
            compare_bound(changes, at, "min", *omin, *nmin, false);
            compare_bound(changes, at, "max", *omax, *nmax, true);
        }
        (FieldKind::Float { min: omin, max: omax }, FieldKind::Float { min: nmin, max: nmax }) => {
            compare_bound(changes, at, "min", *omin, *nmin, false);
            compare_bound(changes, at, "max", *omax, *nmax, true);
        }
        (FieldKind::Counter { min: o }, FieldKind::Counter { min: n }) => {
            compare_bound(changes, at, "min", *o, *n, false);
        }
        (FieldKind::Enum { values: o }, FieldKind::Enum { values: n }) => {
            for v in n.iter().filter(|v| !o.contains(v)) {
                changes.compatible(at, format!("new value `{v}`"));
            }
            for v in o.iter().filter(|v| !n.contains(v)) {
                changes.breaking(at, format!("value `{v}` removed"));
            }
        }
        (FieldKind::Ref { to: o }, FieldKind::Ref { to: n }) if o != n => {
            changes.breaking(at, format!("refers to {n} instead of {o}"));
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests;
