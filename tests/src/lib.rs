//! Helpers for the end-to-end tests: the real `fieldsync-relay` and `fieldsync-peer` binaries
//! on temporary directories, talking over 127.0.0.1, plus a TCP proxy that cuts connections.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod attacker;
pub mod fuzzing;
pub mod proxy;
pub mod relay_files;
pub mod tls;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use fieldsync_peer::{Device, DeviceRng};
use fieldsync_schema::SystemTimeSource;
use rand_core::SeedableRng;
use serde_json::Value;

/// The directory the workspace's binaries are built into (next to the test executable).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>
    exe.parent().and_then(Path::parent).expect("target dir").to_path_buf()
}

/// Path to a workspace binary, building the binaries once if this test run did not.
pub fn bin(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    let path = bin_dir().join(name);
    if !path.exists() {
        BUILD.call_once(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args([
                    "build",
                    "--bins",
                    "-p",
                    "fieldsync-relay",
                    "-p",
                    "fieldsync-peer",
                    "-p",
                    "fieldsync-simulations",
                ])
                .status()
                .expect("run cargo build");
            assert!(status.success(), "building the binaries failed");
        });
    }
    assert!(path.exists(), "{} is missing", path.display());
    path
}

/// A relay process on 127.0.0.1.
pub struct Relay {
    pub data: PathBuf,
    pub addr: SocketAddr,
    /// `ws` or `wss`.
    pub scheme: String,
    /// Every line the relay wrote to stderr so far.
    pub logs: Arc<Mutex<Vec<String>>>,
    child: Option<Child>,
    extra: Vec<String>,
    env: Vec<(String, String)>,
}

impl Relay {
    /// Starts `fieldsync-relay serve` on `port` (0: any free port) and waits until it listens.
    pub fn start(data: &Path, port: u16) -> Relay {
        Relay::start_with(data, port, &[], &[("RUST_LOG", "warn")])
    }

    /// Like [`Relay::start`] with further `serve` arguments and environment variables.
    pub fn start_with(data: &Path, port: u16, extra: &[&str], env: &[(&str, &str)]) -> Relay {
        let mut cmd = Command::new(bin("fieldsync-relay"));
        cmd.args(["serve", "--data"])
            .arg(data)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start the relay");
        let stderr = child.stderr.take().expect("relay stderr");
        let mut lines = BufReader::new(stderr).lines();
        let deadline = Instant::now() + Duration::from_secs(30);
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (scheme, addr) = loop {
            assert!(Instant::now() < deadline, "the relay did not start");
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("the relay exited before listening: {:?}; {:?}", child.wait(), logs))
                .expect("read relay stderr");
            logs.lock().unwrap().push(line.clone());
            if let Some((_, rest)) = line.split_once("listening on ")
                && let Some((scheme, after)) = rest.split_once("://")
                && (scheme == "ws" || scheme == "wss")
            {
                let addr = after.split('/').next().expect("address");
                break (scheme.to_string(), addr.parse().expect("socket address"));
            }
        };
        // Keep draining stderr so the relay never blocks on a full pipe.
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Relay {
            data: data.to_path_buf(),
            addr,
            scheme,
            logs,
            child: Some(child),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// A relay of a cluster: `serve --store URL` on a shared PostgreSQL store (`data` holds
    /// nothing of the store).
    pub fn start_postgres(store: &str, data: &Path, port: u16) -> Relay {
        Relay::start_with(data, port, &["--store", store], &[("RUST_LOG", "warn")])
    }

    /// The PostgreSQL store this relay serves, if it serves one.
    pub fn store(&self) -> Option<&str> {
        let at = self.extra.iter().position(|a| a == "--store")?;
        self.extra.get(at + 1).map(String::as_str)
    }

    /// How the relay's CLI names this relay's store: `--store URL` or `--data DIR`.
    pub fn store_args(&self) -> Vec<std::ffi::OsString> {
        match self.store() {
            Some(url) => vec!["--store".into(), url.into()],
            None => vec!["--data".into(), self.data.clone().into_os_string()],
        }
    }

    /// Runs `fieldsync-relay ARGS` (any subcommand) to completion.
    pub fn cli(args: &[&str]) -> Output {
        Command::new(bin("fieldsync-relay"))
            .args(args)
            .output()
            .expect("run fieldsync-relay")
    }

    /// SIGKILL: no shutdown, no flush; only what was committed survives.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a graceful exit; returns whether it exited successfully.
    pub fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else { return true };
        let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the relay again on the same data directory and port.
    pub fn restart(&mut self) {
        self.kill();
        let port = self.addr.port();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // The port can take a moment to free up after a kill.
            if std::net::TcpListener::bind(self.addr).is_ok() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let extra: Vec<String> = self.extra.clone();
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let env = self.env.clone();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        *self = Relay::start_with(&self.data.clone(), port, &extra, &env);
    }

    /// Runs `fieldsync-relay admin --data DIR --json ARGS` and parses its JSON output.
    pub fn admin(&self, args: &[&str]) -> Value {
        // With the relay's environment: an encrypted store's key travels with it.
        let out = Command::new(bin("fieldsync-relay"))
            .arg("admin")
            .args(self.store_args())
            .arg("--json")
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run admin");
        assert!(
            out.status.success(),
            "admin {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("admin prints JSON")
    }

    pub fn token(&self, user: &str) -> String {
        self.admin(&["enroll", user])["token"]
            .as_str()
            .expect("token")
            .to_string()
    }

    /// A space and users in it, as `(name, role)`.
    pub fn setup(&self, space: &str, users: &[(&str, &str)]) {
        self.admin(&["space", "add", space]);
        for (name, role) in users {
            self.admin(&["user", "add", name, "--space", space, "--role", role]);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A device driven through the `fieldsync-peer` CLI.
pub struct Peer {
    pub data: PathBuf,
}

impl Peer {
    pub fn init(data: &Path) -> Peer {
        let p = Peer {
            data: data.to_path_buf(),
        };
        p.ok(&["init"]);
        p
    }

    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(bin("fieldsync-peer"))
            .arg("--data")
            .arg(&self.data)
            .args(args)
            .output()
            .expect("run fieldsync-peer")
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "fieldsync-peer {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// Runs a command that must fail; returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "fieldsync-peer {args:?} unexpectedly succeeded");
        String::from_utf8(out.stderr).expect("utf-8 output")
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        serde_json::from_str(&self.ok(&args)).expect("JSON output")
    }

    pub fn enroll(&self, relay: &Relay, user: &str) {
        self.ok(&["enroll", "--relay", &relay.url(), "--token", &relay.token(user)]);
    }

    /// Creates an entity; returns its id.
    pub fn put(&self, entity_type: &str, fields: &str) -> String {
        self.ok(&["put", entity_type, "--json", fields]).trim().to_string()
    }

    pub fn get(&self, entity_type: &str, id: &str) -> Value {
        self.json(&["get", entity_type, id])
    }

    pub fn status(&self) -> Value {
        self.json(&["status"])
    }
}

/// Opens a device directory in this process (for the library-level tests).
pub fn open_device(dir: &Path, seed: u64) -> Device {
    let rng: DeviceRng = Box::new(rand_chacha::ChaCha20Rng::seed_from_u64(seed));
    Device::open(dir, Arc::new(SystemTimeSource), rng).expect("open device")
}

/// Sync options for tests: no progress bar on the test's output.
pub fn quiet() -> fieldsync_peer::net::SyncOptions {
    fieldsync_peer::net::SyncOptions::quiet()
}

/// A current-thread runtime for driving the device library's async shell from a plain test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// A command's standard output as text.
pub fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

pub use fieldsync_schema::testkit::obj;

/// Polls `check` until it returns true or `within` passes; returns whether it did.
pub fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A plain HTTP/1.1 GET on 127.0.0.1; returns the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect for HTTP");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read HTTP response");
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_string()
    };
    (code, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The value of one sample in a Prometheus text exposition, by its full name with labels
/// (e.g. `fieldsync_mutations_total{outcome="applied"}`).
pub fn metric(exposition: &str, sample: &str) -> Option<f64> {
    exposition.lines().find_map(|l| {
        let rest = l.strip_prefix(sample)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// Whether `needle` stands in plain bytes in `path` (a file) or in any file directly inside it
/// (a directory: a device's database, WAL and shared memory): what `strings FILE | grep` finds.
/// A file that vanished while the directory was read (a `-shm` removed on close) holds nothing.
pub fn plaintext_in(path: &Path, needle: &str) -> bool {
    let files: Vec<PathBuf> = if path.is_dir() {
        std::fs::read_dir(path)
            .expect("read the directory")
            .map(|e| e.expect("a directory entry").path())
            .filter(|p| p.is_file())
            .collect()
    } else {
        vec![path.to_path_buf()]
    };
    files.iter().any(|f| match std::fs::read(f) {
        Ok(bytes) => bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => panic!("read {}: {e}", f.display()),
    })
}
