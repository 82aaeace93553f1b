//! What every fieldsync command line shares: output that stops quietly when the reader goes
//! away (`fieldsync-relay admin enroll dana | head -1` must not panic or fail the pipeline).
//!
//! `println!` panics when stdout is a closed pipe (Rust ignores `SIGPIPE`). The binaries print
//! with [`outln!`](crate::outln) instead, which returns the write's `io::Result`; `main` sees a
//! closed pipe with [`is_closed_pipe`] and exits with success: the reader had what it wanted.

use std::error::Error;
use std::io;

use uuid::Uuid;

/// Prints a command's failure on stderr: `error: MESSAGE`, or — when the command asked for
/// JSON output (`json`) — one JSON object `{"error": MESSAGE, "kind": KIND}`, so scripts that
/// parse the output can parse the failure too. The exit code is the caller's (non-zero).
pub fn report_error(message: &str, kind: &str, json: bool) {
    if json {
        eprintln!("{}", serde_json::json!({ "error": message, "kind": kind }));
    } else {
        eprintln!("error: {message}");
    }
}

/// What `fieldsync-peer schema` and `fieldsync-relay schema show` print: every type (or the one
/// named), as text or JSON. `Err` is the message for a type the schema does not have.
pub fn schema_listing(schema: &crate::Schema, only: Option<&str>, json: bool) -> Result<String, String> {
    if let Some(name) = only
        && schema.entity_type(name).is_none()
    {
        return Err(format!(
            "unknown entity type `{name}`: {}",
            schema.unknown_type_hint(name)
        ));
    }
    if json {
        let types: Vec<_> = schema.types().filter(|t| only.is_none_or(|n| t.name == n)).collect();
        return serde_json::to_string_pretty(&types).map_err(|e| e.to_string());
    }
    Ok(schema.describe(only).unwrap_or_default().trim_end().to_string())
}

/// Parses a command-line UUID, saying what a UUID looks like instead of the parser's own text.
pub fn parse_uuid(s: &str) -> Result<Uuid, String> {
    s.trim().parse().map_err(|_| {
        format!(
            "`{s}` is not a UUID (32 hex digits in groups of 8-4-4-4-12, e.g. 67e55044-10b1-426f-9247-bb680e5fe0c8)"
        )
    })
}

/// "did you mean `x`? " for the candidate closest to `name`, or nothing when none is close:
/// the one wording every command's typo hint starts with.
pub fn did_you_mean<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    closest(name, candidates)
        .map(|c| format!("did you mean `{c}`? "))
        .unwrap_or_default()
}

/// The candidate closest to a mistyped `name`, if one is close enough to be what was meant
/// (a few letters off, or the same but for case).
pub fn closest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let lower = name.to_lowercase();
    let allowed = (name.chars().count() / 3).max(2);
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(&lower, &c.to_lowercase()), c))
        .filter(|(d, _)| *d <= allowed)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// `println!` that returns `io::Result<()>` instead of panicking: use it as `outln!(...)?`.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        ::std::writeln!(::std::io::stdout().lock(), $($arg)*)
    }};
}

/// Whether `err`, or anything it was caused by, is a write to a closed pipe.
pub fn is_closed_pipe(err: &(dyn Error + 'static)) -> bool {
    let mut next: Option<&(dyn Error + 'static)> = Some(err);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<io::Error>()
            && io.kind() == io::ErrorKind::BrokenPipe
        {
            return true;
        }
        next = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("printing the report")]
    struct Wrapper(#[source] io::Error);

    #[test]
    fn a_bad_uuid_is_explained_and_a_near_name_is_suggested() {
        let err = parse_uuid("nope").unwrap_err();
        assert!(err.contains("`nope` is not a UUID"), "{err}");
        assert!(parse_uuid(" 67e55044-10b1-426f-9247-bb680e5fe0c8 ").is_ok());
        let names = ["clinic", "gym", "patient"];
        assert_eq!(closest("clinc", names), Some("clinic"));
        assert_eq!(closest("Patient", names), Some("patient"));
        assert_eq!(closest("warehouse", names), None);
    }

    #[test]
    fn a_closed_pipe_is_found_through_wrapping_errors() {
        let pipe = Wrapper(io::Error::from(io::ErrorKind::BrokenPipe));
        assert!(is_closed_pipe(&pipe));
        let other = Wrapper(io::Error::from(io::ErrorKind::PermissionDenied));
        assert!(!is_closed_pipe(&other));
    }
}
