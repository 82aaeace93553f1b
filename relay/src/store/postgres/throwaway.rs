//! A throwaway PostgreSQL server for tests: `initdb` and `pg_ctl` from the installed server
//! binaries, in a temporary directory, on a free port of 127.0.0.1, stopped (and deleted) on
//! drop. PostgreSQL refuses to run as root, so under root (CI) it runs as `nobody`.
//!
//! Where no server binaries are found the tests that need one fail under `CI=true` with what
//! to install, and are skipped with a printed notice elsewhere ([`Throwaway::start_or_skip`]).
#![allow(clippy::expect_used)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the server binaries are looked for: `FIELDSYNC_PG_BIN`, then the newest
/// `/usr/lib/postgresql/N/bin`, then `pg_config --bindir`.
pub fn find_binaries() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("FIELDSYNC_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    dir.join("initdb").exists().then_some(dir)
}

pub struct Throwaway {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// `Some("nobody")` when this process is root.
    run_as: Option<&'static str>,
}

impl Throwaway {
    /// A running server, or `None` (after a notice) where there are no binaries and CI does
    /// not demand them. Panics, with the reason, when a server cannot be started.
    pub fn start_or_skip(test: &str) -> Option<Throwaway> {
        let Some(bin) = find_binaries() else {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!(
                    "{test}: no PostgreSQL server binaries (initdb, pg_ctl) found: install PostgreSQL's server package \
                     (Debian: postgresql-15) or point FIELDSYNC_PG_BIN at its bin directory"
                );
            }
            eprintln!("NOTICE: skipping {test}: no PostgreSQL server binaries found (set FIELDSYNC_PG_BIN)");
            return None;
        };
        Some(Throwaway::start(&bin))
    }

    /// Initialises a cluster and starts it.
    pub fn start(bin: &Path) -> Throwaway {
        let dir = tempfile::Builder::new()
            .prefix("fieldsync-pg-")
            .tempdir()
            .expect("a temporary directory");
        let root = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
        let run_as = root.then_some("nobody");
        if root {
            let status = Command::new("chown")
                .args(["-R", "nobody"])
                .arg(dir.path())
                .status()
                .expect("run chown");
            assert!(status.success(), "cannot give the temporary directory to `nobody`");
        }
        let mut server = Throwaway {
            dir,
            bin: bin.to_path_buf(),
            port: 0,
            run_as,
        };
        let data = server.data();
        server.run(
            "initdb",
            &[
                "-D",
                &data,
                "-A",
                "trust",
                "-U",
                "fieldsync",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ],
        );
        let log = server.dir.path().join("server.log").display().to_string();
        // A free port now may be taken by another test's server before this one binds it:
        // then try another.
        for attempt in 1..=5 {
            server.port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let options = format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
                 -c full_page_writes=off",
                server.port,
                server.dir.path().display()
            );
            let started = server
                .command("pg_ctl")
                .args(["-D", &data, "-l", &log, "-o", &options, "-w", "-t", "60", "start"])
                .output()
                .expect("run pg_ctl");
            if started.status.success() {
                return server;
            }
            assert!(
                attempt < 5,
                "pg_ctl start failed: {}{}\n(server log: {})",
                String::from_utf8_lossy(&started.stdout),
                String::from_utf8_lossy(&started.stderr),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        server
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// `program` of the server's binaries, as the user the server runs as.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&path);
                c
            }
            None => Command::new(&path),
        }
    }

    fn run(&self, program: &str, args: &[&str]) {
        let out = self
            .command(program)
            .args(args)
            .output()
            .expect("run a PostgreSQL binary");
        assert!(
            out.status.success(),
            "{program} failed: {}{}\n(server log: {})",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A new, empty database and the URL of it.
    pub fn database(&self, name: &str) -> String {
        let mut admin = postgres::Client::connect(&self.url("postgres"), postgres::NoTls).expect("connect to postgres");
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .expect("create a database");
        self.url(name)
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://fieldsync@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for Throwaway {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self
            .command("pg_ctl")
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .output();
    }
}
