//! `cargo +nightly fuzz run peer_machine`: see `fieldsync_tests::fuzzing::peer_machine`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fieldsync_tests::fuzzing::peer_machine(data));
