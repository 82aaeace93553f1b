//! `cargo +nightly fuzz run relay_core`: see `fieldsync_tests::fuzzing::relay_core`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fieldsync_tests::fuzzing::relay_core(data));
