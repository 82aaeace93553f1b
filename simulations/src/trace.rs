//! The run's trace: every event, hashed as it happens, optionally written to a file.
//!
//! The first line of a trace file is the run's options as JSON, so `fieldsync-sim --replay
//! FILE` reruns exactly that run and compares the hash.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::options::SimOptions;

pub struct Trace {
    hash: Sha256,
    file: Option<BufWriter<File>>,
    events: u64,
}

impl Trace {
    pub fn new(options: &SimOptions, path: Option<&Path>) -> std::io::Result<Self> {
        let mut file = match path {
            Some(p) => Some(BufWriter::new(File::create(p)?)),
            None => None,
        };
        if let Some(f) = &mut file {
            let header = serde_json::to_string(options).map_err(std::io::Error::other)?;
            writeln!(f, "{header}")?;
        }
        Ok(Trace {
            hash: Sha256::new(),
            file,
            events: 0,
        })
    }

    /// Records one event line (time first, then what happened).
    pub fn record(&mut self, now_ms: u64, line: &str) {
        self.events += 1;
        self.hash.update(now_ms.to_be_bytes());
        self.hash.update((line.len() as u64).to_be_bytes());
        self.hash.update(line.as_bytes());
        if let Some(f) = &mut self.file {
            // A trace that cannot be written is reported at the end, not fatal mid-run.
            let _ = writeln!(f, "{now_ms} {line}");
        }
    }

    /// Folds raw bytes (a message on the wire) into the hash without writing them out.
    pub fn absorb(&mut self, bytes: &[u8]) {
        self.hash.update((bytes.len() as u64).to_be_bytes());
        self.hash.update(bytes);
    }

    pub fn events(&self) -> u64 {
        self.events
    }

    pub fn finish(mut self) -> std::io::Result<String> {
        if let Some(f) = &mut self.file {
            f.flush()?;
        }
        Ok(hex::encode(self.hash.finalize()))
    }
}

/// Reads the options from a trace file's first line.
pub fn read_options(path: &Path) -> anyhow::Result<SimOptions> {
    use std::io::BufRead;
    let file = File::open(path).map_err(|e| anyhow::anyhow!("cannot open trace {}: {e}", path.display()))?;
    let mut first = String::new();
    std::io::BufReader::new(file).read_line(&mut first)?;
    serde_json::from_str(first.trim())
        .map_err(|e| anyhow::anyhow!("{} is not a fieldsync-sim trace: {e}", path.display()))
}
