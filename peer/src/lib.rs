//! Device library (filled by the peer issue).
