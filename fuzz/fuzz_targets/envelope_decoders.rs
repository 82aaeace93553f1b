//! `cargo +nightly fuzz run envelope_decoders`: see `fieldsync_tests::fuzzing::envelope_decoders`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fieldsync_tests::fuzzing::envelope_decoders(data));
