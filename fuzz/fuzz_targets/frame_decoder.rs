//! `cargo +nightly fuzz run frame_decoder`: see `fieldsync_tests::fuzzing::frame_decoder`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fieldsync_tests::fuzzing::frame_decoder(data));
