//! A TCP proxy between a test's client and its nats-server, on 127.0.0.1,
//! that holds back what the server sends: a connection that stalls
//! without closing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP proxy between the tier's client and the server, on 127.0.0.1, that
/// can hold back what the server sends: for a while, or (its acks) until the
/// client has sent a needle some number of times.
pub(crate) struct Proxy {
    port: u16,
    state: Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

struct ProxyState {
    /// `true` while what the server sends is held back.
    held: watch::Sender<bool>,
    needle: Mutex<Vec<u8>>,
    times: AtomicUsize,
    seen: AtomicUsize,
}

impl Proxy {
    /// A proxy to the server at `url` (`nats://127.0.0.1:<port>`).
    pub(crate) async fn start(url: &str) -> Self {
        let upstream: u16 = url
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .expect("the server's port");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let port = listener.local_addr().expect("its address").port();
        let state = Arc::new(ProxyState {
            held: watch::channel(false).0,
            needle: Mutex::new(Vec::new()),
            times: AtomicUsize::new(usize::MAX),
            seen: AtomicUsize::new(0),
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let up = shared.clone();
                tokio::spawn(async move {
                    let mut buffer = vec![0; 64 * 1024];
                    let mut tail = Vec::new();
                    while let Ok(read) = client_read.read(&mut buffer).await {
                        if read == 0 || server_write.write_all(&buffer[..read]).await.is_err() {
                            break;
                        }
                        up.count(&mut tail, &buffer[..read]);
                    }
                });
                let mut held = shared.held.subscribe();
                tokio::spawn(async move {
                    let mut buffer = vec![0; 64 * 1024];
                    while let Ok(read) = server_read.read(&mut buffer).await {
                        if read == 0 || held.wait_for(|held| !*held).await.is_err() {
                            break;
                        }
                        if client_write.write_all(&buffer[..read]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Self { port, state, task }
    }

    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Holds back what the server sends until the client has sent `needle`
    /// `times` times (counted from now).
    pub(crate) fn hold_until_sent(&self, needle: &str, times: usize) {
        *self.state.needle.lock().unwrap() = needle.as_bytes().to_vec();
        self.state.seen.store(0, Ordering::SeqCst);
        self.state.times.store(times, Ordering::SeqCst);
        self.state.held.send_replace(true);
    }

    /// Holds back what the server sends while `held`.
    pub(crate) fn hold(&self, held: bool) {
        self.state.needle.lock().unwrap().clear();
        self.state.held.send_replace(held);
    }

    pub(crate) fn seen(&self) -> usize {
        self.state.seen.load(Ordering::SeqCst)
    }
}

impl ProxyState {
    /// Counts the needles in `chunk` (with the end of the chunk before it),
    /// and lets the server's bytes through once there were enough.
    fn count(&self, tail: &mut Vec<u8>, chunk: &[u8]) {
        let needle = self.needle.lock().unwrap().clone();
        if needle.is_empty() {
            return;
        }
        tail.extend_from_slice(chunk);
        let found = tail
            .windows(needle.len())
            .filter(|window| *window == needle.as_slice())
            .count();
        let keep = tail.len().saturating_sub(needle.len() - 1);
        tail.drain(..keep);
        if found > 0 {
            let seen = self.seen.fetch_add(found, Ordering::SeqCst) + found;
            if seen >= self.times.load(Ordering::SeqCst) {
                self.held.send_replace(false);
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
