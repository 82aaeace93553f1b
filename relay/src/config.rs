//! The relay's TOML configuration file (`fieldsync-relay serve --config relay.toml`).
//!
//! Every `serve` flag has a key of the same name (dashes become underscores); a flag given on
//! the command line overrides the file. Relative paths in the file are relative to the file's
//! own directory, so a config file and its certificates can move together. Unknown keys are an
//! error: a typo must not silently turn TLS or backups off.
//!
//! ```toml
//! data = "/var/lib/fieldsync"
//! listen = "0.0.0.0:7070"
//! schema = "entities.toml"          # optional; the built-in schema when absent
//! tls_cert = "/etc/fieldsync/relay.crt"
//! tls_key = "/etc/fieldsync/relay.key"
//! backup_dir = "/var/backups/fieldsync"
//! backup_every = "24h"
//! backup_keep = 14
//! log_format = "json"               # or "text"
//! log_filter = "info"               # tracing EnvFilter syntax
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
/// Default number of scheduled backups kept.
pub const DEFAULT_BACKUP_KEEP: usize = 14;
/// Default interval between scheduled backups.
pub const DEFAULT_BACKUP_EVERY: Duration = Duration::from_secs(24 * 60 * 60);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format `{other}` (text or json)")),
        }
    }
}

/// The file as written. Every field optional: flags may supply the rest.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub data: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub schema: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub backup_dir: Option<PathBuf>,
    pub backup_every: Option<String>,
    pub backup_keep: Option<usize>,
    pub log_format: Option<LogFormat>,
    pub log_filter: Option<String>,
    pub workers: Option<usize>,
    pub shards: Option<u32>,
    pub doc_cache: Option<usize>,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut file: ConfigFile = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        for p in [
            &mut file.data,
            &mut file.schema,
            &mut file.tls_cert,
            &mut file.tls_key,
            &mut file.backup_dir,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(file)
    }

    /// Flags win over the file: `flags` holds what the command line set.
    pub fn overridden_by(self, flags: ConfigFile) -> ConfigFile {
        ConfigFile {
            data: flags.data.or(self.data),
            listen: flags.listen.or(self.listen),
            schema: flags.schema.or(self.schema),
            tls_cert: flags.tls_cert.or(self.tls_cert),
            tls_key: flags.tls_key.or(self.tls_key),
            backup_dir: flags.backup_dir.or(self.backup_dir),
            backup_every: flags.backup_every.or(self.backup_every),
            backup_keep: flags.backup_keep.or(self.backup_keep),
            log_format: flags.log_format.or(self.log_format),
            log_filter: flags.log_filter.or(self.log_filter),
            workers: flags.workers.or(self.workers),
            shards: flags.shards.or(self.shards),
            doc_cache: flags.doc_cache.or(self.doc_cache),
        }
    }

    /// Checks the combination and fills in defaults.
    pub fn resolve(self) -> Result<ServeConfig, ConfigError> {
        let data = self.data.ok_or_else(|| {
            ConfigError::Invalid("no data directory: pass --data DIR or set `data` in the config file".into())
        })?;
        let listen = match self.listen {
            Some(l) => l,
            None => DEFAULT_LISTEN
                .parse()
                .map_err(|e| ConfigError::Invalid(format!("default listen address: {e}")))?,
        };
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid(
                    "TLS needs both a certificate and a key (--tls-cert and --tls-key)".into(),
                ));
            }
        };
        let backup = match self.backup_dir {
            Some(dir) => {
                let every = match &self.backup_every {
                    Some(s) => parse_duration(s)?,
                    None => DEFAULT_BACKUP_EVERY,
                };
                let keep = self.backup_keep.unwrap_or(DEFAULT_BACKUP_KEEP);
                if keep == 0 {
                    return Err(ConfigError::Invalid("backup_keep must be at least 1".into()));
                }
                Some(BackupSchedule { dir, every, keep })
            }
            None => {
                if self.backup_every.is_some() || self.backup_keep.is_some() {
                    return Err(ConfigError::Invalid(
                        "--backup-every and --backup-keep need --backup-dir".into(),
                    ));
                }
                None
            }
        };
        let workers = match self.workers {
            Some(0) => return Err(ConfigError::Invalid("workers must be at least 1".into())),
            Some(n) if n > MAX_WORKERS => {
                return Err(ConfigError::Invalid(format!("workers must be at most {MAX_WORKERS}")));
            }
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, usize::from),
        };
        let shards = match self.shards {
            Some(n) if n == 0 || n > MAX_SHARDS => {
                return Err(ConfigError::Invalid(format!(
                    "shards must be between 1 and {MAX_SHARDS}"
                )));
            }
            Some(n) => n,
            None => crate::store::sqlite::DEFAULT_SHARDS,
        };
        let doc_cache = match self.doc_cache {
            Some(0) => return Err(ConfigError::Invalid("doc_cache must be at least 1 document".into())),
            Some(n) => n,
            None => crate::core::RelayConfig::default().doc_cache_capacity,
        };
        Ok(ServeConfig {
            data,
            listen,
            schema: self.schema,
            tls,
            backup,
            log_format: self.log_format.unwrap_or_default(),
            log_filter: self.log_filter,
            workers,
            shards,
            doc_cache,
        })
    }
}

/// `24h`, `30m`, `90s`, `7d`, `1h 30m` (humantime syntax); at least one second.
pub fn parse_duration(s: &str) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| ConfigError::Invalid(format!("`{s}` is not a duration like 24h or 30m: {e}")))?;
    if d < Duration::from_secs(1) {
        return Err(ConfigError::Invalid(format!(
            "backup interval `{s}` is below one second"
        )));
    }
    Ok(d)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSchedule {
    pub dir: PathBuf,
    pub every: Duration,
    pub keep: usize,
}

/// Everything `serve` runs with, after the file and the flags are merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    pub data: PathBuf,
    pub listen: SocketAddr,
    pub schema: Option<PathBuf>,
    pub tls: Option<TlsFiles>,
    pub backup: Option<BackupSchedule>,
    pub log_format: LogFormat,
    pub log_filter: Option<String>,
    /// Threads applying mutations.
    pub workers: usize,
    /// Shards of a store created now (an existing store keeps its own).
    pub shards: u32,
    /// Documents kept parsed in memory, per worker.
    pub doc_cache: usize,
}

/// More apply threads than this only contend for the same few shard files.
pub const MAX_WORKERS: usize = 256;
/// A store's shard count is fixed at creation; each shard is a file and a writer.
pub const MAX_SHARDS: u32 = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_paths_are_relative_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        std::fs::write(
            &path,
            r#"
data = "data"
listen = "127.0.0.1:9000"
tls_cert = "/etc/relay.crt"
tls_key = "relay.key"
backup_dir = "backups"
backup_every = "30m"
backup_keep = 3
log_format = "json"
"#,
        )
        .unwrap();
        let file = ConfigFile::load(&path).unwrap();
        let flags = ConfigFile {
            listen: Some("127.0.0.1:9100".parse().unwrap()),
            backup_keep: Some(5),
            ..ConfigFile::default()
        };
        let c = file.overridden_by(flags).resolve().unwrap();
        assert_eq!(c.data, dir.path().join("data"));
        assert_eq!(c.listen, "127.0.0.1:9100".parse().unwrap());
        assert_eq!(
            c.tls,
            Some(TlsFiles {
                cert: "/etc/relay.crt".into(),
                key: dir.path().join("relay.key")
            })
        );
        let b = c.backup.unwrap();
        assert_eq!((b.every, b.keep), (Duration::from_secs(1800), 5));
        assert_eq!(b.dir, dir.path().join("backups"));
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn mistakes_are_errors() {
        assert!(
            toml::from_str::<ConfigFile>("dta = \"x\"").is_err(),
            "unknown key accepted"
        );
        let only_cert = ConfigFile {
            data: Some("d".into()),
            tls_cert: Some("c".into()),
            ..ConfigFile::default()
        };
        assert!(only_cert.resolve().is_err());
        let keep_without_dir = ConfigFile {
            data: Some("d".into()),
            backup_keep: Some(2),
            ..ConfigFile::default()
        };
        assert!(keep_without_dir.resolve().is_err());
        assert!(ConfigFile::default().resolve().is_err(), "no data dir");
        let with = |workers, shards, doc_cache| {
            ConfigFile {
                data: Some("d".into()),
                workers,
                shards,
                doc_cache,
                ..ConfigFile::default()
            }
            .resolve()
        };
        for bad in [
            with(Some(0), None, None),
            with(Some(MAX_WORKERS + 1), None, None),
            with(None, Some(0), None),
            with(None, Some(MAX_SHARDS + 1), None),
            with(None, None, Some(0)),
        ] {
            assert!(matches!(bad, Err(ConfigError::Invalid(_))), "{bad:?}");
        }
        let ok = with(Some(3), Some(8), Some(10)).unwrap();
        assert_eq!((ok.workers, ok.shards, ok.doc_cache), (3, 8, 10));
        let defaults = with(None, None, None).unwrap();
        assert!(defaults.workers >= 1);
        assert_eq!(defaults.shards, crate::store::sqlite::DEFAULT_SHARDS);
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("10ms").is_err());
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5_400));
    }
}
