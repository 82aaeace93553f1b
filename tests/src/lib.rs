//! Helpers for the end-to-end tests: the real `fieldsync-relay` and `fieldsync-peer` binaries
//! on temporary directories, talking over 127.0.0.1, plus a TCP proxy that cuts connections.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod proxy;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Once};
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
                .args(["build", "--bins", "-p", "fieldsync-relay", "-p", "fieldsync-peer"])
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
    child: Option<Child>,
}

impl Relay {
    /// Starts `fieldsync-relay serve` on `port` (0: any free port) and waits until it listens.
    pub fn start(data: &Path, port: u16) -> Relay {
        let mut child = Command::new(bin("fieldsync-relay"))
            .args(["serve", "--data"])
            .arg(data)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the relay");
        let stderr = child.stderr.take().expect("relay stderr");
        let mut lines = BufReader::new(stderr).lines();
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            assert!(Instant::now() < deadline, "the relay did not start");
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("the relay exited before listening: {:?}", child.wait()))
                .expect("read relay stderr");
            if let Some(rest) = line.split("listening on ws://").nth(1) {
                let addr = rest.split('/').next().expect("address");
                break addr.parse().expect("socket address");
            }
        };
        // Keep draining stderr so the relay never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
        Relay {
            data: data.to_path_buf(),
            addr,
            child: Some(child),
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
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
        *self = Relay::start(&self.data.clone(), port);
    }

    /// Runs `fieldsync-relay admin --data DIR --json ARGS` and parses its JSON output.
    pub fn admin(&self, args: &[&str]) -> Value {
        let out = Command::new(bin("fieldsync-relay"))
            .args(["admin", "--data"])
            .arg(&self.data)
            .arg("--json")
            .args(args)
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
