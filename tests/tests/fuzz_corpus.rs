//! Replays every input the fuzzers kept (`fuzz/corpus/<target>/`) and the built-in seeds
//! through the fuzz targets' bodies, on stable: what a fuzzer once found stays fixed.
//! `cargo +nightly fuzz run <target>` (see `fuzz/README.md`) grows the corpus.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use fieldsync_tests::fuzzing::{TARGETS, relay_core_outcomes, seeds};

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

#[test]
fn every_kept_fuzz_input_and_seed_passes_its_target() {
    for (name, target) in TARGETS {
        let mut inputs: Vec<(String, Vec<u8>)> = seeds(name)
            .into_iter()
            .enumerate()
            .map(|(i, s)| (format!("seed {i}"), s))
            .collect();
        if let Ok(entries) = std::fs::read_dir(corpus_dir(name)) {
            for e in entries {
                let path = e.unwrap().path();
                inputs.push((path.display().to_string(), std::fs::read(&path).unwrap()));
            }
        }
        assert!(!inputs.is_empty(), "{name}: nothing to replay");
        for (label, input) in &inputs {
            let outcome = std::panic::catch_unwind(|| target(input));
            assert!(outcome.is_ok(), "fuzz target {name} failed on {label}");
        }
        eprintln!("{name}: {} inputs replayed", inputs.len());
    }
}

#[test]
fn the_relay_core_seed_reaches_the_acceptance_pipeline() {
    let outcomes = relay_core_outcomes(&seeds("relay_core")[0]).expect("the seed decodes");
    assert_eq!(outcomes, ["applied", "applied", "already_applied"]);
}

/// Writes the seeds into the corpus directories (run once by hand before fuzzing:
/// `cargo test -p fieldsync-tests --test fuzz_corpus -- --ignored`).
#[test]
#[ignore = "writes files into fuzz/corpus"]
fn write_seeds() {
    for (name, _) in TARGETS {
        let dir = corpus_dir(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, s) in seeds(name).into_iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), s).unwrap();
        }
    }
}
