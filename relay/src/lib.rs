//! Relay library (filled by the relay core issue).
