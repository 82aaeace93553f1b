//! The bindings for real: builds on the cdylib `cargo test` just built, generates the Python,
//! Kotlin and Swift sources with this crate's `uniffi-bindgen`, and runs the Python suite
//! (`bindings/python/tests`) against real relay processes. Kotlin and Swift cannot be
//! compiled on these machines; generating them still breaks this test when the interface
//! stops fitting a language.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// `target/<profile>`.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

/// The cdylib this test run built: `cargo test` leaves it in `deps/` (only `cargo build`
/// copies it up to `target/<profile>`, where it may be older).
fn cdylib() -> PathBuf {
    let name = format!(
        "{}fieldsync_ffi{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    let path = target_dir().join("deps").join(&name);
    assert!(
        path.exists(),
        "{} is missing: `cargo test -p fieldsync-ffi` builds it",
        path.display()
    );
    path
}

/// Generates the bindings for `language` into `out` and returns the files written.
fn generate(language: &str, out: &Path) -> Vec<String> {
    let status = Command::new(env!("CARGO_BIN_EXE_uniffi-bindgen"))
        .args(["generate", "--no-format", "--language", language, "--out-dir"])
        .arg(out)
        .arg("--library")
        .arg(cdylib())
        .status()
        .unwrap();
    assert!(status.success(), "generating the {language} bindings failed");
    let mut files: Vec<String> = walk(out)
        .iter()
        .map(|p| p.strip_prefix(out).unwrap().display().to_string())
        .collect();
    files.sort();
    files
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(walk(&path));
        } else {
            found.push(path);
        }
    }
    found
}

/// The Python interpreter, or `None` (with a notice) where there is none and CI does not
/// demand one.
fn python() -> Option<String> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    match Command::new(&python).arg("--version").output() {
        Ok(out) if out.status.success() => Some(python),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("`{python}` is not installed: CI runs the Python bindings' suite; install Python 3")
        }
        _ => {
            eprintln!("NOTICE: skipping the Python bindings' suite: `{python}` is not installed (set PYTHON)");
            None
        }
    }
}

#[test]
fn kotlin_and_swift_bindings_generate_from_the_library() {
    let out = tempfile::tempdir().unwrap();
    let kotlin = generate("kotlin", &out.path().join("kotlin"));
    assert_eq!(kotlin, ["uniffi/fieldsync/fieldsync.kt"]);
    let kt = std::fs::read_to_string(out.path().join("kotlin").join(&kotlin[0])).unwrap();
    for name in [
        "class FieldsyncClient",
        "interface SyncListener",
        "sealed class FieldsyncException",
    ] {
        assert!(kt.contains(name), "the Kotlin bindings lack `{name}`");
    }
    let swift = generate("swift", &out.path().join("swift"));
    assert_eq!(swift, ["fieldsync.swift", "fieldsyncFFI.h", "fieldsyncFFI.modulemap"]);
    let sw = std::fs::read_to_string(out.path().join("swift/fieldsync.swift")).unwrap();
    for name in [
        "open class FieldsyncClient",
        "public protocol SyncListener",
        "enum FieldsyncError: Swift.Error",
    ] {
        assert!(sw.contains(name), "the Swift bindings lack `{name}`");
    }
}

/// The `fieldsync` module as an app would have it: generated, with the library beside it
/// (the generated module loads the library from its own directory).
fn python_module(out: &Path) -> PathBuf {
    let module_dir = out.join("python");
    let files = generate("python", &module_dir);
    assert_eq!(files, ["fieldsync.py"]);
    let library = cdylib();
    std::fs::copy(&library, module_dir.join(library.file_name().unwrap())).unwrap();
    module_dir
}

fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python")
}

#[test]
fn the_python_suite_passes_against_a_real_relay() {
    let Some(python) = python() else { return };
    let out = tempfile::tempdir().unwrap();
    let module_dir = python_module(out.path());
    let status = Command::new(python)
        .args(["-m", "unittest", "discover", "-v", "-s"])
        .arg(python_dir().join("tests"))
        .env("PYTHONPATH", &module_dir)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("FIELDSYNC_RELAY", fieldsync_tests::bin("fieldsync-relay"))
        .status()
        .unwrap();
    assert!(status.success(), "the Python suite failed (its output is above)");
}

/// README's "Use it from your app" shows `bindings/python/example.py` as is, and it runs as
/// written against a relay.
#[test]
fn the_readme_python_example_runs_as_written() {
    let example = std::fs::read_to_string(python_dir().join("example.py")).unwrap();
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    assert!(
        readme.contains(&format!("```python\n{example}```")),
        "README's Python example is not bindings/python/example.py"
    );
    let Some(python) = python() else { return };
    let out = tempfile::tempdir().unwrap();
    let module_dir = python_module(out.path());
    let relay = fieldsync_tests::Relay::start(&out.path().join("relay"), 0);
    relay.setup("clinic", &[("dana", "clinician")]);
    let mut child = Command::new(python)
        .arg(python_dir().join("example.py"))
        .arg(out.path().join("phone"))
        .arg(relay.url())
        .arg(relay.token("dana"))
        .env("PYTHONPATH", &module_dir)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let finished = fieldsync_tests::eventually(Duration::from_secs(60), || child.try_wait().unwrap().is_some());
    if !finished {
        let _ = child.kill();
    }
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(finished && output.status.success(), "the example failed: {stdout}");
    assert!(stdout.contains("synced: {'name': 'Ada Lovelace'}"), "{stdout}");
}
