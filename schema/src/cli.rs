//! What every fieldsync command line shares: output that stops quietly when the reader goes
//! away (`fieldsync-relay admin enroll dana | head -1` must not panic or fail the pipeline).
//!
//! `println!` panics when stdout is a closed pipe (Rust ignores `SIGPIPE`). The binaries print
//! with [`outln!`](crate::outln) instead, which returns the write's `io::Result`; `main` sees a
//! closed pipe with [`is_closed_pipe`] and exits with success: the reader had what it wanted.

use std::error::Error;
use std::io;

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
    fn a_closed_pipe_is_found_through_wrapping_errors() {
        let pipe = Wrapper(io::Error::from(io::ErrorKind::BrokenPipe));
        assert!(is_closed_pipe(&pipe));
        let other = Wrapper(io::Error::from(io::ErrorKind::PermissionDenied));
        assert!(!is_closed_pipe(&other));
    }
}
