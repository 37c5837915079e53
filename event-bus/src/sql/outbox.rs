//! [`Outbox`]: the application's own transaction, which events are emitted
//! on and written in at its commit.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use serde::Serialize;
use sqlx::Transaction;
use tokio::sync::watch;

use super::Error;
use super::backend::{Backend, NewEvent};
use super::worker::millis;
use crate::codec::JsonCodec;
use crate::envelope::Envelope;
use crate::event::Event;
use crate::publish::Publish;

/// A database transaction that events are emitted on: they are written in
/// it when it commits, so that an event exists if and only if the
/// transaction's other writes do.
///
/// Made by [`Store::begin`](super::Store::begin) (or
/// [`Store::outbox`](super::Store::outbox) around a transaction of one's
/// own). It dereferences to the transaction's connection, so the
/// application's queries run on it as on a `sqlx::Transaction`
/// (`.execute(&mut *tx)`), and it is a [`Publish`]er, so the derive's emit
/// helpers work on it: `tx.emit_user_created(user)`.
///
/// - [`commit`](Outbox::commit) writes the events, in emit order, then
///   commits; once it returns `Ok`, each is in the log exactly once and the
///   durable listeners of this process are woken (on PostgreSQL, those of
///   every process, through `NOTIFY`).
/// - [`rollback`](Outbox::rollback), an error of `commit`, or dropping the
///   outbox: no event was written.
///
/// An event whose `Serialize` fails is kept as an error, and `commit` then
/// returns it without writing anything.
pub struct Outbox<E, DB: Backend> {
    tx: Transaction<'static, DB>,
    events: Mutex<Result<Vec<NewEvent>, Error>>,
    wake: watch::Sender<u64>,
    /// The store's writers' turn, on a database that takes one at a time.
    _turn: Option<tokio::sync::OwnedMutexGuard<()>>,
    _event: std::marker::PhantomData<fn(E)>,
}

impl<E, DB: Backend> Outbox<E, DB> {
    pub(super) fn new(tx: Transaction<'static, DB>, wake: watch::Sender<u64>) -> Self {
        Self {
            tx,
            events: Mutex::new(Ok(Vec::new())),
            wake,
            _turn: None,
            _event: std::marker::PhantomData,
        }
    }

    pub(super) fn hold(&mut self, turn: Option<tokio::sync::OwnedMutexGuard<()>>) {
        self._turn = turn;
    }

    /// How many events were emitted on it so far.
    pub fn len(&self) -> usize {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map_or(0, Vec::len)
    }

    /// Whether no event was emitted on it yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the emitted events, in emit order, and commits; returns
    /// their positions in the log.
    ///
    /// # Errors
    ///
    /// [`Error::Encode`] if an event could not be encoded (nothing was
    /// written), [`Error::Database`] if a write or the commit failed (the
    /// transaction is rolled back: neither the application's writes nor
    /// the events exist).
    pub async fn commit(mut self) -> Result<Vec<u64>, Error> {
        let events = self
            .events
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)?;
        let positions = DB::insert_events(&mut self.tx, &events, millis(SystemTime::now())).await?;
        self.tx.commit().await?;
        if !events.is_empty() {
            self.wake
                .send_modify(|version| *version = version.wrapping_add(1));
        }
        Ok(positions.into_iter().map(i64::unsigned_abs).collect())
    }

    /// Rolls back: neither the application's writes nor the events exist.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the rollback failed (the database rolls the
    /// transaction back anyway once its connection is closed).
    pub async fn rollback(self) -> Result<(), Error> {
        Ok(self.tx.rollback().await?)
    }
}

impl<E: Event + Serialize, DB: Backend> Publish<E> for Outbox<E, DB> {
    /// Encodes `event` and keeps it for the commit.
    fn publish(&self, event: E) {
        let envelope = Envelope::new(event);
        let mut events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        let Ok(written) = events.as_mut() else {
            return;
        };
        match JsonCodec.encode(&envelope) {
            Ok(payload) => written.push(NewEvent {
                id: envelope.id().to_string(),
                name: envelope.name(),
                payload,
            }),
            Err(error) => *events = Err(Error::Encode(error)),
        }
    }
}

impl<E, DB: Backend> Deref for Outbox<E, DB> {
    type Target = DB::Connection;

    fn deref(&self) -> &DB::Connection {
        &self.tx
    }
}

impl<E, DB: Backend> DerefMut for Outbox<E, DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        &mut self.tx
    }
}

impl<E, DB: Backend> fmt::Debug for Outbox<E, DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbox")
            .field("events", &self.len())
            .finish_non_exhaustive()
    }
}
