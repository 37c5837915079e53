//! A nats-server of a test's own: on a free port of 127.0.0.1, with its own
//! storage directory, killed when dropped.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server has to answer after it was started.
const START_DEADLINE: Duration = Duration::from_secs(15);

/// The server binary: `EVENT_BUS_NATS_SERVER`, else `nats-server` as
/// Debian installs it, else on the `PATH`.
fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("EVENT_BUS_NATS_SERVER") {
        return path.into();
    }
    let debian = PathBuf::from("/usr/sbin/nats-server");
    if debian.exists() {
        debian
    } else {
        "nats-server".into()
    }
}

/// A running nats-server with JetStream.
pub(crate) struct NatsServer {
    child: Option<Child>,
    port: u16,
    storage: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a server and waits until it answers.
    pub(crate) fn start() -> Self {
        let storage = tempfile::tempdir().expect("a storage directory");
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let mut server = Self {
            child: None,
            port,
            storage,
        };
        server.launch();
        server
    }

    /// The URL clients connect to.
    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL: nothing is written on the way out) and
    /// starts it again on the same port and storage, waiting until it
    /// answers.
    pub(crate) fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// Kills the server (SIGKILL), leaving it down until
    /// [`start_again`](Self::start_again).
    pub(crate) fn stop(&mut self) {
        self.kill();
    }

    /// Starts a stopped server on its port and storage, waiting until it
    /// answers.
    pub(crate) fn start_again(&mut self) {
        self.launch();
    }

    fn launch(&mut self) {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            let child = Command::new(binary())
                .args([
                    "-js",
                    "-a",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-sd",
                ])
                .arg(self.storage.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start nats-server (set EVENT_BUS_NATS_SERVER to its path)");
            self.child = Some(child);
            if self.wait_until_it_answers(deadline) {
                return;
            }
            // The port may still be held by the server killed before: the
            // new one exited; start it again until the deadline.
            assert!(
                Instant::now() < deadline,
                "nats-server did not answer on port {} within {START_DEADLINE:?}",
                self.port
            );
            self.kill();
        }
    }

    /// Whether the server sends its `INFO` line before `deadline`; `false`
    /// at once if it exited.
    fn wait_until_it_answers(&mut self, deadline: Instant) -> bool {
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        while Instant::now() < deadline {
            if let Some(child) = &mut self.child {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return false;
                }
            }
            if let Ok(stream) = TcpStream::connect_timeout(&address, Duration::from_millis(200)) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
                let mut line = String::new();
                if BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("INFO") {
                    return true;
                }
            }
            // A poll between looks at a condition, bounded by the deadline.
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
