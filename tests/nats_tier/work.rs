//! What the JetStream reviews share: one kind of event carrying a number,
//! a handle on a test's server, publishing, and waiting on a condition
//! with a deadline.

use std::future::Future;
use std::time::Duration;

use event_bus::nats::{Config, JetStream};
use event_bus::{DomainEvent, Publish};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// How long a test waits for anything that should happen.
pub(crate) const DEADLINE: Duration = Duration::from_secs(60);

/// What the shutdown may take past its deadline: its grace for the last
/// acks (2s), its last flush (1s), and a margin for a loaded machine.
pub(crate) const SHUTDOWN_SLACK: Duration = Duration::from_secs(6);

#[derive(Debug, Clone, DomainEvent, Serialize, Deserialize)]
pub(crate) enum Work {
    Item(u64),
}

impl Work {
    pub(crate) fn value(&self) -> u64 {
        match *self {
            Self::Item(value) => value,
        }
    }
}

pub(crate) async fn connect_to(url: &str, prefix: &str) -> JetStream<Work> {
    JetStream::connect(url, Config::new(prefix))
        .await
        .expect("connect to the test's nats-server")
}

/// Publishes `values` through [`Publish`], then waits until the stream
/// stored them.
pub(crate) async fn publish_all(jetstream: &JetStream<Work>, values: std::ops::Range<u64>) {
    for value in values {
        Publish::publish(jetstream, Work::Item(value));
    }
    tokio::time::timeout(DEADLINE, jetstream.flush())
        .await
        .expect("the publisher stored the events");
}

/// Looks at `check` until it holds, or panics naming `what` after
/// [`DEADLINE`].
pub(crate) async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {DEADLINE:?}"
        );
        // A poll between looks, bounded by the deadline.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
