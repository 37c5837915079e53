//! The durable tier: events written in the application's own SQL
//! transaction (a transactional outbox) into a log that durable listeners
//! read from their checkpoints, at least once, surviving a crash anywhere
//! (features `sqlite`, `postgres`, and `any` for `sqlx::Any`).
//!
//! A [`Store`] owns the tables (it creates them: see [`schema`]). The
//! application emits on an [`Outbox`], its transaction, and the events are
//! written when it commits: no event without its change, no change without
//! its event. The same `#[listener]` code as on the bus is spawned on the
//! store, and each listener reads the log as one group: every process that
//! spawns a listener of that name shares its events, each handled by one of
//! them (a lease, renewed while the process lives, says which).
//!
//! # Guarantees
//!
//! - **At least once, per listener**: an event committed is handed to each
//!   durable listener interested in its kind until the listener handles it
//!   or gives up on it (a dead delivery). A process that dies mid-handler
//!   leaves a lease that expires; the event is then delivered again, its
//!   attempt one higher. Handlers that write to the same database make
//!   their effect exactly once with [`first_time`].
//! - **Order**: a listener is handed its events in log order (commit
//!   order). With a concurrency of 1 and one process, it handles them in
//!   that order, a retried event holding back the ones after it. With more
//!   (concurrency, processes), they finish out of order. An event handed
//!   out again (its process died, or it was redriven) comes when it is
//!   due, after events its listener has already been handed: a listener
//!   looks for those every [`Durable::poll_interval`] (at most every
//!   lease).
//! - **Checkpoints** move past the lowest unfinished position only: the
//!   checkpoint is the position below which every event is finished.
//! - **Cost**: a claim is one row for a page of events, and handling an
//!   event writes nothing of its own (its claim moves past it in the next
//!   transaction, which also claims what is next); only a failure or an
//!   event given back gets a row ([`schema`] has the tables).
//! - **Failures are states**: a failed attempt is recorded with its error,
//!   the attempt count and the time of the next try (the listener's
//!   [`RetryPolicy`](crate::RetryPolicy)); a retry survives a restart. After
//!   the last attempt the delivery is dead: listed by
//!   [`Store::dead_letters`], given a new start by [`Store::redrive`], or
//!   dropped by [`Store::discard`].
//! - **Wake-up**: a commit wakes this process's listeners at once;
//!   PostgreSQL wakes every process through `LISTEN/NOTIFY`; a poll
//!   ([`Durable::poll_interval`]) is the fallback (and SQLite's only way
//!   across processes).
//!
//! An attempt counts from when a process is handed the event, so one cut
//! short by a crash or a stop counts, and the event comes again with the
//! next. A retry made in place (the runner waits out its delay and tries
//! again) is counted when its outcome is written: a process that dies
//! during it hands the next process that same attempt again.
//!
//! # Examples
//!
//! ```
//! # #[cfg(feature = "sqlite")]
//! # mod example {
//! use event_bus::sql::{Durable, SqliteStore, Start};
//! use event_bus::{DomainEvent, HandlerError, listener};
//! use serde::{Deserialize, Serialize};
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU64, Ordering};
//!
//! #[derive(Debug, Clone, DomainEvent, Serialize, Deserialize)]
//! enum Shop {
//!     OrderPaid { order: u64 },
//! }
//!
//! struct Revenue(Arc<AtomicU64>);
//!
//! #[listener]
//! impl ShopHandler for Revenue {
//!     async fn on_order_paid(&self, order: &u64) -> Result<(), HandlerError> {
//!         self.0.fetch_add(*order, Ordering::Relaxed);
//!         Ok(())
//!     }
//! }
//!
//! pub async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let pool = sqlx::SqlitePool::connect("sqlite::memory:").await?;
//!     let store = SqliteStore::<Shop>::new(pool).await?;
//!     sqlx::raw_sql("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
//!         .execute(store.pool())
//!         .await?;
//!
//!     // The order and its event commit together.
//!     let mut tx = store.begin().await?;
//!     sqlx::query("INSERT INTO orders (id) VALUES (7)").execute(&mut *tx).await?;
//!     tx.emit_order_paid(7);
//!     tx.commit().await?;
//!
//!     // A listener spawned later reads the log from where it says.
//!     let revenue = Arc::new(AtomicU64::new(0));
//!     let listener = Revenue(revenue.clone());
//!     let from_the_start = Durable::new().start(Start::Beginning);
//!     let running = store.spawn_with(listener, Default::default(), from_the_start).await?;
//!     store.idle().await?;
//!     assert_eq!(revenue.load(Ordering::Relaxed), 7);
//!     assert_eq!(running.report().handled, 1);
//!     store.shutdown(std::time::Duration::from_secs(5)).await;
//!     Ok(())
//! }
//! # }
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! #     #[cfg(feature = "sqlite")]
//! #     example::main().await.unwrap();
//! # }
//! ```

mod backend;
mod outbox;
pub mod schema;
mod store;
mod worker;

pub use self::backend::Backend;
pub use self::outbox::Outbox;
pub use self::store::{
    DeadDelivery, Durable, DurableListener, ListenerProgress, Start, Store, first_time,
};
pub use self::worker::LogDelivery;
pub use crate::error::StoreError as Error;

/// A [`Store`] on SQLite.
#[cfg(feature = "sqlite")]
pub type SqliteStore<E> = Store<E, sqlx::Sqlite>;

/// A [`Store`] on PostgreSQL.
#[cfg(feature = "postgres")]
pub type PgStore<E> = Store<E, sqlx::Postgres>;

/// A [`Store`] on `sqlx::Any` (feature `any`): SQLite or PostgreSQL, as
/// the pool's URL says. On PostgreSQL, other processes' commits wake this
/// one's listeners with the `postgres` feature; without it they poll.
#[cfg(feature = "any")]
pub type AnyStore<E> = Store<E, sqlx::Any>;
