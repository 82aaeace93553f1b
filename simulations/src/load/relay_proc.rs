//! The relay under load: a process this tool starts (`--spawn`) or one already running
//! (`--relay URL --data DIR`), administered through its data directory.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fieldsync_relay::admin;
use fieldsync_relay::store::postgres::{PgBackend, redact};
use fieldsync_relay::store::sqlite::SqliteBackend;
use fieldsync_relay::store::{Backend, Directory};
use fieldsync_schema::Role;
use rand_chacha::ChaCha20Rng;

/// A binary of this workspace built next to this one (`fieldsync-relay`, `fieldsync-peer`).
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let dir = me.parent().context("no directory for the current executable")?;
    for candidate in [dir.join(name), dir.join("..").join(name)] {
        if candidate.exists() {
            return Ok(candidate);
        }
    }
    bail!(
        "{name} is not built next to {} (run `cargo build --release --bins`)",
        me.display()
    )
}

pub struct RelayProc {
    pub url: String,
    pub data: PathBuf,
    /// The PostgreSQL store of a relay of a cluster (then `data` is unused).
    pub store: Option<String>,
    pub pid: Option<u32>,
    child: Option<Child>,
    _scratch: Option<tempfile::TempDir>,
}

impl RelayProc {
    /// Starts a relay on a scratch data directory and a free port.
    pub fn spawn() -> anyhow::Result<Self> {
        Self::spawn_with(None)
    }

    /// [`RelayProc::spawn`] with this many apply threads (`serve --workers`).
    pub fn spawn_with(workers: Option<usize>) -> anyhow::Result<Self> {
        let scratch = tempfile::Builder::new().prefix("fieldsync-load-").tempdir()?;
        let data = scratch.path().join("relay");
        let mut extra = Vec::new();
        if let Some(n) = workers {
            extra = vec!["--workers".to_string(), n.to_string()];
        }
        let mut relay = Self::start(&data, "127.0.0.1:0", &extra)?;
        relay._scratch = Some(scratch);
        Ok(relay)
    }

    /// Starts a relay on `data` (kept when the relay stops, so it can be started again on it)
    /// listening on `listen`.
    pub fn spawn_on(data: &Path, listen: &str) -> anyhow::Result<Self> {
        Self::start(data, listen, &[])
    }

    fn start(data: &Path, listen: &str, extra: &[String]) -> anyhow::Result<Self> {
        let mut child = Command::new(sibling_binary("fieldsync-relay")?)
            .args(["serve", "--data"])
            .arg(data)
            .args(extra)
            .args(["--listen", listen])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting fieldsync-relay")?;
        let stderr = child.stderr.take().context("relay stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            if Instant::now() > deadline {
                bail!("the relay did not start within 30 s");
            }
            let Some(line) = lines.next() else {
                bail!("the relay exited before listening: {:?}", child.wait());
            };
            let line = line?;
            if let Some(rest) = line.split("listening on ws://").nth(1) {
                break rest.split('/').next().unwrap_or_default().to_string();
            }
        };
        std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
        Ok(RelayProc {
            url: format!("ws://{addr}"),
            data: data.to_path_buf(),
            store: None,
            pid: Some(child.id()),
            child: Some(child),
            _scratch: None,
        })
    }

    /// Kills the relay with SIGKILL (no shutdown, no flush) and waits for it to be gone.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().context("killing the relay")?;
            c.wait().context("waiting for the killed relay")?;
        }
        self.pid = None;
        Ok(())
    }

    /// A relay someone else runs; `data` is its data directory (for enrolling devices).
    pub fn existing(url: &str, data: &Path, pid: Option<u32>) -> Self {
        RelayProc {
            url: url.trim_end_matches('/').to_string(),
            data: data.to_path_buf(),
            store: None,
            pid,
            child: None,
            _scratch: None,
        }
    }

    /// A relay of a cluster someone else runs, on the PostgreSQL store `store`.
    pub fn existing_on_postgres(url: &str, store: &str, pid: Option<u32>) -> Self {
        let mut relay = Self::existing(url, Path::new("."), pid);
        relay.store = Some(store.to_string());
        relay
    }

    /// Creates `spaces` spaces with one user each and returns an enrollment token per device,
    /// devices spread over the spaces in turn.
    pub fn enrollment_tokens(
        &self,
        spaces: usize,
        devices: usize,
        now_ms: u64,
        rng: &mut ChaCha20Rng,
    ) -> anyhow::Result<Vec<String>> {
        match &self.store {
            Some(url) => {
                let store = PgBackend::open_existing(url)
                    .and_then(|b| b.open_directory())
                    .with_context(|| format!("opening the relay's store {}", redact(url)))?;
                Self::tokens_in(store, spaces, devices, now_ms, rng)
            }
            None => {
                let store = SqliteBackend::open_current(&self.data)
                    .and_then(|b| b.open_directory())
                    .with_context(|| format!("opening the relay's data directory {}", self.data.display()))?;
                Self::tokens_in(store, spaces, devices, now_ms, rng)
            }
        }
    }

    fn tokens_in(
        mut store: impl Directory,
        spaces: usize,
        devices: usize,
        now_ms: u64,
        rng: &mut ChaCha20Rng,
    ) -> anyhow::Result<Vec<String>> {
        let run = fieldsync_schema::ids::new_uuid(rng).simple().to_string();
        let mut users = Vec::new();
        for s in 0..spaces {
            let space = format!("load-{}-{s}", &run[..8]);
            let user = format!("loader-{}-{s}", &run[..8]);
            admin::add_space(&mut store, &space, now_ms, rng)?;
            admin::add_user(&mut store, &user, &space, Role::Clinician, now_ms, rng)?;
            users.push(user);
        }
        (0..devices)
            .map(|i| {
                let user = &users[i % users.len()];
                Ok(admin::create_enrollment_token(&mut store, user, 3_600_000, now_ms, rng)?.0)
            })
            .collect()
    }

    /// The relay's CPU time so far (user + system), in microseconds.
    pub fn cpu_us(&self) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid?)).ok()?;
        let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
        let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some(ticks * 10_000)
    }

    /// (current, peak) resident memory in KiB.
    pub fn rss_kib(&self) -> Option<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid?)).ok()?;
        let get = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        };
        Some((get("VmRSS:")?, get("VmHWM:")?))
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
