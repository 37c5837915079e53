//! What the outbox relay's tests share: a SQLite store in a directory of
//! the test's, a listener that records what the stream handed it, and
//! waits bounded by a deadline.

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_bus::nats::JetStream;
use event_bus::sql::SqliteStore;
use event_bus::{Envelope, Event, HandlerError, Listener, Meta};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

/// How long a test waits for anything that should happen.
pub(crate) const DEADLINE: Duration = Duration::from_secs(90);

/// An event of the tests' shop: each names an order.
pub(crate) trait Order {
    fn order(&self) -> u64;
}

/// Every delivery a JetStream listener was handed: the event's id and its
/// order number.
pub(crate) struct Seen<E>(
    Arc<Mutex<Vec<(String, u64)>>>,
    std::marker::PhantomData<fn(E)>,
);

impl<E> Clone for Seen<E> {
    fn clone(&self) -> Self {
        Self(self.0.clone(), std::marker::PhantomData)
    }
}

impl<E> Default for Seen<E> {
    fn default() -> Self {
        Self(Arc::default(), std::marker::PhantomData)
    }
}

impl<E> Seen<E> {
    pub(crate) fn all(&self) -> Vec<(String, u64)> {
        self.0.lock().unwrap().clone()
    }

    /// How many distinct events it was handed.
    pub(crate) fn len(&self) -> usize {
        let all = self.0.lock().unwrap();
        all.iter().map(|(id, _)| id).collect::<HashSet<_>>().len()
    }

    /// The orders it was handed, in the order it was.
    pub(crate) fn orders(&self) -> Vec<u64> {
        self.all().iter().map(|(_, order)| *order).collect()
    }

    pub(crate) fn has(&self, order: u64) -> bool {
        self.all().iter().any(|(_, o)| *o == order)
    }
}

impl<E: Event + Order> Listener<E> for Seen<E> {
    fn name(&self) -> &str {
        "seen"
    }

    async fn handle(&self, event: Arc<Envelope<E>>, _: Meta) -> Result<(), HandlerError> {
        self.0
            .lock()
            .unwrap()
            .push((event.id().to_string(), event.event().order()));
        Ok(())
    }
}

/// `future`'s output, or a panic naming `what` after [`DEADLINE`].
pub(crate) async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(DEADLINE, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {DEADLINE:?}"))
}

/// Waits until `condition` holds, looking every few milliseconds: what is
/// waited for happens on a server.
pub(crate) async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    within(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// A store on `shop.db` in `dir` (WAL, 4 connections): another call on the
/// same directory is another process's store on the same database.
pub(crate) async fn store_in<E>(dir: &std::path::Path) -> SqliteStore<E>
where
    E: Event + Serialize + DeserializeOwned,
{
    let options = SqliteConnectOptions::from_str("sqlite://")
        .unwrap()
        .filename(dir.join("shop.db"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal);
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .unwrap();
    SqliteStore::new(pool).await.unwrap()
}

/// How many messages the event stream (`SHOP`) holds.
pub(crate) async fn stored<E>(stream: &JetStream<E>) -> u64
where
    E: Event + Serialize + DeserializeOwned,
{
    let context = async_nats::jetstream::new(stream.client().clone());
    let mut events = context.get_stream("SHOP").await.unwrap();
    events.info().await.unwrap().state.messages
}
