//! A TCP proxy on 127.0.0.1 that forwards to the relay and can cut every open connection,
//! to test what happens to a device when its network drops mid-batch.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub addr: SocketAddr,
    /// Where new connections go ([`Proxy::retarget`]: a load balancer moving to another relay).
    target: Arc<std::sync::Mutex<SocketAddr>>,
    cut: watch::Sender<u64>,
    generation: Arc<AtomicU64>,
    /// Bytes forwarded from device to relay so far.
    pub upstream_bytes: Arc<AtomicU64>,
}

impl Proxy {
    /// Listens on an ephemeral port and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (cut, _) = watch::channel(0u64);
        let generation = Arc::new(AtomicU64::new(0));
        let upstream_bytes = Arc::new(AtomicU64::new(0));
        let cut_tx = cut.clone();
        let up = upstream_bytes.clone();
        let target = Arc::new(std::sync::Mutex::new(target));
        let current = target.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let cut_rx = cut_tx.subscribe();
                let up = up.clone();
                let target = *current.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    forward(client, server, cut_rx, up).await;
                });
            }
        });
        Proxy {
            addr,
            target,
            cut,
            generation,
            upstream_bytes,
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Sends new connections to `target` from now on (open ones stay where they are).
    pub fn retarget(&self, target: SocketAddr) {
        *self.target.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = target;
    }

    /// Drops every connection open right now (new ones are accepted as usual).
    pub fn cut_all(&self) {
        let g = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let _ = self.cut.send(g);
    }
}

async fn forward(mut client: TcpStream, mut server: TcpStream, mut cut: watch::Receiver<u64>, up: Arc<AtomicU64>) {
    let start = *cut.borrow();
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    let mut a = [0u8; 16 * 1024];
    let mut b = [0u8; 16 * 1024];
    loop {
        tokio::select! {
            n = cr.read(&mut a) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    up.fetch_add(n as u64, Ordering::Relaxed);
                    if sw.write_all(&a[..n]).await.is_err() { return; }
                }
            },
            n = sr.read(&mut b) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => if cw.write_all(&b[..n]).await.is_err() { return; },
            },
            changed = cut.changed() => {
                if changed.is_err() || *cut.borrow() != start {
                    return; // dropping both sockets resets the connection
                }
            }
        }
    }
}
