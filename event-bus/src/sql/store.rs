//! [`Store`]: the durable tier's handle on its database, its listeners and
//! its dead deliveries.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::{Pool, Transaction};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::Error;
use super::backend::{Backend, StartAt};
use super::outbox::Outbox;
use super::worker::{Gate, WorkerConfig, millis, worker};
use crate::codec::JsonCodec;
use crate::dead_letter::{DeadLetter, DeadLetterSink, UndecodableLetter};
use crate::envelope::Envelope;
use crate::event::{Event, EventKind, KindSet};
use crate::listener::{ListenerOptions, Scope};
use crate::meta::Meta;
use crate::metrics::ListenerStatus;
use crate::runner::{ListenerCore, Run, RunReport, Spawnable, spawn_run};

/// The lease a process holds on what it is handling, by default: renewed
/// every third of it while the process lives, it expires this long after
/// the process died.
const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// How often a listener looks for work no notification told it about, by
/// default.
const DEFAULT_POLL: Duration = Duration::from_millis(500);

/// How long past its deadline a shutdown waits for the finishes to be
/// written.
const WRITE_GRACE: Duration = Duration::from_secs(1);

/// The most events a process leases ahead of its handler.
const MAX_PREFETCH: usize = 1 << 16;

/// The shortest lease kept.
const MIN_LEASE: Duration = Duration::from_millis(30);

/// Where a durable listener starts reading the log the first time a
/// listener of its name is spawned on the database. Later spawns (a
/// restart, another process) go on from its checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Start {
    /// After the events already in the log: the listener sees what is
    /// committed from now on.
    #[default]
    Now,
    /// From the first event the log still holds: a replay.
    Beginning,
    /// After the event at this position.
    After(u64),
}

impl Start {
    fn at(self) -> StartAt {
        match self {
            Self::Now => StartAt::Now,
            Self::Beginning => StartAt::Beginning,
            Self::After(position) => StartAt::After(i64::try_from(position).unwrap_or(i64::MAX)),
        }
    }
}

/// How a durable listener reads the log, beside its
/// [`ListenerOptions`] (of which the retry policy, concurrency and batching
/// apply; the memory queue's capacity, lag policy and fairness do not).
#[derive(Debug, Clone)]
pub struct Durable {
    start: Start,
    group: Option<Arc<str>>,
    lease: Duration,
    poll: Duration,
    prefetch: Option<usize>,
}

impl Default for Durable {
    fn default() -> Self {
        Self::new()
    }
}

impl Durable {
    /// The defaults: [`Start::Now`], a lease of 30 s, a poll every 500 ms,
    /// and a prefetch of twice what the listener handles at once (at least
    /// 32).
    #[must_use]
    pub fn new() -> Self {
        Self {
            start: Start::Now,
            group: None,
            lease: DEFAULT_LEASE,
            poll: DEFAULT_POLL,
            prefetch: None,
        }
    }

    /// Where a listener of this name starts the first time: see [`Start`].
    #[must_use]
    pub fn start(mut self, start: Start) -> Self {
        self.start = start;
        self
    }

    /// The name the listener's checkpoint, leases and dead deliveries are
    /// kept under: every listener spawned under one name, in any process,
    /// shares its events (each handled by one of them). Defaults to the
    /// listener's own name; a name of its own per process (its host name,
    /// say) makes a listener that sees every event in each process.
    #[must_use]
    pub fn group(mut self, group: impl Into<Arc<str>>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// How long what this process holds stays its own should it die
    /// (renewed every third of it while it lives): how soon another
    /// process, or a restart, takes its events again. At least 30 ms.
    ///
    /// Keep it well above the longest write transaction on the database:
    /// SQLite takes one writer at a time, and a renewal waits for the
    /// writer before it, so a lease shorter than an application's
    /// transaction can lapse while its process lives (another process may
    /// then take the events too; this process never takes its own again).
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(MIN_LEASE);
        self
    }

    /// How often the listener looks for work it was not told about: events
    /// committed by another process on SQLite, retries and expired leases
    /// of other processes. At least 1 ms.
    #[must_use]
    pub fn poll_interval(mut self, poll: Duration) -> Self {
        self.poll = poll.max(Duration::from_millis(1));
        self
    }

    /// The lease: see [`lease`](Self::lease).
    #[cfg(feature = "nats")]
    pub(crate) fn lease_of(&self) -> Duration {
        self.lease
    }

    /// How many events the process leases ahead of its handler (from 1
    /// to 65,536): more makes a claim cheaper per event, fewer shares a
    /// group's events more evenly between processes.
    #[must_use]
    pub fn prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = Some(prefetch.clamp(1, MAX_PREFETCH));
        self
    }
}

/// A durable listener spawned on a [`Store`], in this process.
#[derive(Clone)]
pub struct DurableListener {
    core: Arc<ListenerCore>,
    group: Arc<str>,
    delivered: Arc<AtomicU64>,
    task: tokio::task::AbortHandle,
    done: watch::Receiver<bool>,
}

impl fmt::Debug for DurableListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableListener")
            .field("name", &self.core.name)
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl DurableListener {
    /// The listener's name: the group its processes share.
    pub fn name(&self) -> &str {
        &self.core.name
    }

    /// The name its checkpoint is kept under: see [`Durable::group`].
    pub fn group(&self) -> &str {
        &self.group
    }

    /// How many deliveries it was handed in this process so far (an event
    /// delivered again after a restart or a lost lease counts again; a
    /// retry in place does not).
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// What it did in this process so far.
    pub fn report(&self) -> RunReport {
        RunReport::of(&self.core)
    }

    /// Whether it runs: `Running` until its task ends.
    pub fn status(&self) -> ListenerStatus {
        if *self.done.borrow() {
            self.core.outcome()
        } else {
            ListenerStatus::Running
        }
    }

    /// Stops it: it starts no event after this. What it held is given back
    /// (its attempts counted) and handled again by another process or the
    /// next run.
    pub fn abort(&self) {
        self.core.cancel();
        self.task.abort();
    }

    /// Waits until its task has ended.
    pub async fn finished(&self) {
        let mut done = self.done.clone();
        let _ = done.wait_for(|done| *done).await;
    }
}

/// A durable listener's progress through the log, as the database has it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListenerProgress {
    /// The listener's name.
    pub listener: String,
    /// The last position it has looked at.
    pub head: u64,
    /// Every event up to here is finished (handled or dead).
    pub checkpoint: u64,
    /// The log's last position minus the checkpoint.
    pub lag: u64,
    /// Deliveries in progress or waiting to be retried.
    pub unfinished: u64,
    /// Dead deliveries.
    pub dead: u64,
}

/// A delivery whose last attempt failed, as the store keeps it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeadDelivery<E> {
    /// The listener that gave up.
    pub listener: String,
    /// The event's position in the log.
    pub position: u64,
    /// The event's id.
    pub id: Uuid,
    /// The event's name.
    pub name: String,
    /// The event, or `None` if it does not decode into `E`.
    pub envelope: Option<Arc<Envelope<E>>>,
    /// How many attempts were made.
    pub attempts: u32,
    /// The last attempt's error.
    pub error: String,
    /// When the listener gave up.
    pub failed_at: SystemTime,
}

/// What every listener of the store shares.
struct Shared<DB: Backend> {
    pool: Pool<DB>,
    /// Bumped by every commit of this process (and, on PostgreSQL, every
    /// `NOTIFY` from any): the listeners' cue to look for work.
    wake: watch::Sender<u64>,
    /// `true` once the store shuts down.
    closing: watch::Sender<bool>,
    listeners: Mutex<Vec<Spawned>>,
    notifications: Option<JoinHandle<()>>,
    gate: Gate,
}

impl<DB: Backend> Drop for Shared<DB> {
    fn drop(&mut self) {
        if let Some(task) = &self.notifications {
            task.abort();
        }
    }
}

struct Spawned {
    core: Arc<ListenerCore>,
    group: Arc<str>,
    task: JoinHandle<()>,
    worker: JoinHandle<()>,
}

/// The durable tier on one database: the outbox, the log, the listeners of
/// this process and the dead deliveries of all.
///
/// Cloning it is cheap: clones share the listeners.
pub struct Store<E, DB: Backend> {
    shared: Arc<Shared<DB>>,
    /// This process's name for its instance listeners: see
    /// [`Store::with_instance`].
    instance: Arc<str>,
    _event: std::marker::PhantomData<fn(E) -> E>,
}

impl<E, DB: Backend> Clone for Store<E, DB> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            instance: self.instance.clone(),
            _event: std::marker::PhantomData,
        }
    }
}

impl<E, DB: Backend> fmt::Debug for Store<E, DB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("database", &DB::NAME)
            .finish_non_exhaustive()
    }
}

/// The sink of durable listeners: the dead delivery is the record (written
/// when the runner terminates it), so there is nothing more to keep.
struct Dead;

impl<E: Event> DeadLetterSink<E> for Dead {
    async fn record(&self, _letter: DeadLetter<E>) {}

    async fn record_undecodable(&self, _letter: UndecodableLetter) {}
}

impl<E, DB> Store<E, DB>
where
    E: Event + Serialize + DeserializeOwned,
    DB: Backend,
{
    /// The store on `pool`'s database: creates the tables if they are not
    /// there (see [`schema`](super::schema)), and on PostgreSQL listens for
    /// other processes' commits.
    ///
    /// Must be called within a tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the tables could not be created.
    pub async fn new(pool: Pool<DB>) -> Result<Self, Error> {
        DB::migrate(&pool).await?;
        let (wake, _) = watch::channel(0);
        let notifications = DB::listen(&pool, wake.clone());
        let (closing, _) = watch::channel(false);
        Ok(Self {
            shared: Arc::new(Shared {
                pool,
                wake,
                closing,
                listeners: Mutex::new(Vec::new()),
                notifications,
                gate: Gate::default(),
            }),
            instance: format!("{:016x}", fastrand::u64(..)).into(),
            _event: std::marker::PhantomData,
        })
    }

    /// Names this process for its instance listeners (those spawned with
    /// [`Scope::Instance`](crate::Scope::Instance)): each keeps its
    /// checkpoint as `<listener>@<instance>`, so every process handles
    /// every event, and a restart under the same name goes on from where
    /// it stopped.
    ///
    /// Without a name of its own (the host's name, a pod's) a store has a
    /// random one: its instance listeners start afresh, at their
    /// [`Start`], on every run, and the checkpoints of earlier runs stay
    /// behind (holding back [`prune`](Self::prune)) until
    /// [`forget`](Self::forget) removes them.
    #[must_use]
    pub fn with_instance(mut self, instance: impl Into<Arc<str>>) -> Self {
        self.instance = instance.into();
        self
    }

    /// This process's name for its instance listeners.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The store's connection pool.
    pub fn pool(&self) -> &Pool<DB> {
        &self.shared.pool
    }

    /// Begins a transaction to emit events on: see [`Outbox`].
    ///
    /// On SQLite, which takes one writer at a time, the transaction is
    /// begun as a writer (`BEGIN IMMEDIATE`) once the store's other writers
    /// in this process are done, and holds the turn until it ends: commit
    /// or drop it before waiting on a listener.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if no transaction could be begun.
    pub async fn begin(&self) -> Result<Outbox<E, DB>, Error> {
        let turn = self.shared.gate.turn(&self.shared.pool).await;
        let tx = DB::begin_writer(&self.shared.pool).await?;
        let mut outbox = self.outbox(tx);
        outbox.hold(turn);
        Ok(outbox)
    }

    /// Emits on `tx`, a transaction the application began itself.
    ///
    /// On SQLite, begin it as a writer (`pool.begin_with("BEGIN
    /// IMMEDIATE")`): a transaction that reads before it writes fails with
    /// "database is locked" when another wrote meanwhile, and the store's
    /// listeners write often. [`begin`](Self::begin) does that for you.
    pub fn outbox(&self, tx: Transaction<'static, DB>) -> Outbox<E, DB> {
        Outbox::new(tx, self.shared.wake.clone())
    }

    /// Spawns `listener` on the log with the default options: see
    /// [`spawn_with`](Self::spawn_with).
    ///
    /// # Errors
    ///
    /// As [`spawn_with`](Self::spawn_with).
    pub async fn spawn<M, L: Spawnable<E, M>>(
        &self,
        listener: L,
    ) -> Result<DurableListener, Error> {
        self.spawn_with(listener, ListenerOptions::new(), Durable::new())
            .await
    }

    /// Spawns `listener` on the log: it is handed, at least once, every
    /// event of its interests from its checkpoint on (from `durable`'s
    /// [`Start`] the first time a listener of its name is spawned on this
    /// database), sharing them with the processes that run a listener of
    /// the same name.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] once the store is shutting down;
    /// [`Error::Database`] if the listener could not be registered.
    pub async fn spawn_with<M, L: Spawnable<E, M>>(
        &self,
        listener: L,
        options: ListenerOptions,
        durable: Durable,
    ) -> Result<DurableListener, Error> {
        if *self.shared.closing.borrow() {
            return Err(Error::Closed);
        }
        let name: Arc<str> = listener.listener_name().into();
        let group = match (&durable.group, options.scope) {
            (Some(group), _) => group.clone(),
            (None, Scope::Instance) => format!("{name}@{}", self.instance).into(),
            (None, _) => name.clone(),
        };
        DB::register(&self.shared.pool, &group, durable.start.at(), false).await?;
        let interests = listener.listener_interests();
        let names = (interests != KindSet::all()).then(|| {
            interests
                .iter()
                .flat_map(|kind| std::iter::once(kind.name()).chain(kind.aliases().iter().copied()))
                .collect()
        });
        let at_once = options
            .concurrency
            .max(1)
            .saturating_mul(options.max_batch.max(1));
        let config = WorkerConfig {
            listener: group.clone(),
            names,
            prefetch: durable
                .prefetch
                .unwrap_or_else(|| at_once.saturating_mul(2).clamp(32, MAX_PREFETCH)),
            lease: durable.lease,
            poll: durable.poll,
        };
        let delivered = Arc::new(AtomicU64::new(0));
        let (worker, source) = worker::<E, DB>(
            self.shared.pool.clone(),
            self.shared.gate.clone(),
            config,
            self.shared.wake.subscribe(),
            self.shared.closing.subscribe(),
            delivered.clone(),
        );
        let core = Arc::new(ListenerCore::new(name, options.retry));
        let run = listener.run(Run {
            core: core.clone(),
            source,
            sink: Dead,
            options,
        });
        let (task, done) = spawn_run(core.clone(), run);
        let worker = tokio::spawn(worker.run());
        let handle = DurableListener {
            core: core.clone(),
            group: group.clone(),
            delivered,
            task: task.abort_handle(),
            done,
        };
        self.shared
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Spawned {
                core,
                group,
                task,
                worker,
            });
        Ok(handle)
    }

    /// Waits until every listener spawned on this store has looked at the
    /// whole log and finished everything it was handed (handled it, or
    /// gave up on it): nothing is in progress or waiting to be retried.
    ///
    /// It reads the database: what another process spawned counts too, if
    /// a listener of the same name runs here.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the progress could not be read.
    pub async fn idle(&self) -> Result<(), Error> {
        let mut wake = self.shared.wake.subscribe();
        loop {
            let names: Vec<Arc<str>> = self
                .shared
                .listeners
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .filter(|spawned| !spawned.task.is_finished())
                .map(|spawned| spawned.group.clone())
                .collect();
            let progress = self.progress().await?;
            let busy = progress.iter().any(|listener| {
                names.iter().any(|name| **name == *listener.listener)
                    && (listener.lag > 0 || listener.unfinished > 0)
            });
            if !busy {
                return Ok(());
            }
            // Progress is written by the listeners' workers: look again
            // soon, or at once after a commit.
            let _ = tokio::time::timeout(Duration::from_millis(5), wake.changed()).await;
        }
    }

    /// Every durable listener's progress through the log, by name.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if it could not be read.
    pub async fn progress(&self) -> Result<Vec<ListenerProgress>, Error> {
        let (last, rows) = DB::progress(&self.shared.pool).await?;
        Ok(rows
            .into_iter()
            .map(|row| ListenerProgress {
                lag: (last - row.checkpoint).max(0).unsigned_abs(),
                listener: row.listener,
                head: row.head.unsigned_abs(),
                checkpoint: row.checkpoint.unsigned_abs(),
                unfinished: row.unfinished.unsigned_abs(),
                dead: row.dead.unsigned_abs(),
            })
            .collect())
    }

    /// The dead deliveries, of `listener` or of all, oldest first.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if they could not be read.
    pub async fn dead_letters(
        &self,
        listener: Option<&str>,
    ) -> Result<Vec<DeadDelivery<E>>, Error> {
        let rows = DB::dead(&self.shared.pool, listener).await?;
        Ok(rows
            .into_iter()
            .map(|row| DeadDelivery {
                listener: row.listener,
                position: row.position.unsigned_abs(),
                id: Uuid::parse_str(&row.id).unwrap_or_default(),
                name: row.name,
                envelope: JsonCodec.decode::<E>(&row.payload).ok().map(Arc::new),
                attempts: u32::try_from(row.attempts.max(0)).unwrap_or(u32::MAX),
                error: row.last_error.unwrap_or_default(),
                failed_at: SystemTime::UNIX_EPOCH
                    + Duration::from_millis(row.failed_at.unwrap_or(0).unsigned_abs()),
            })
            .collect())
    }

    /// Gives the dead delivery of `listener` at `position` (or, with
    /// `None`, every dead delivery of `listener`) a new start: it is handed
    /// to the listener again, as a first attempt, with its retry policy
    /// afresh, when it next looks for redeliveries (every
    /// [`Durable::poll_interval`]). Returns how many were redriven.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if they could not be written.
    pub async fn redrive(&self, listener: &str, position: Option<u64>) -> Result<u64, Error> {
        let position = position.map(|p| i64::try_from(p).unwrap_or(i64::MAX));
        let redriven = DB::redrive(&self.shared.pool, listener, position).await?;
        if redriven > 0 {
            self.shared
                .wake
                .send_modify(|version| *version = version.wrapping_add(1));
        }
        Ok(redriven)
    }

    /// Drops the dead delivery of `listener` at `position` (or, with
    /// `None`, every dead delivery of `listener`): the listener will not
    /// be handed it again. Returns how many were discarded.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if they could not be deleted.
    pub async fn discard(&self, listener: &str, position: Option<u64>) -> Result<u64, Error> {
        let position = position.map(|p| i64::try_from(p).unwrap_or(i64::MAX));
        Ok(DB::discard(&self.shared.pool, listener, position).await?)
    }

    /// Moves `listener` to `start` (creating it there if it is new): it
    /// reads the log again from there, in every process that runs it. What
    /// it held in progress is forgotten (a finish for it is ignored); its
    /// dead deliveries stay.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if it could not be written.
    pub async fn replay(&self, listener: &str, start: Start) -> Result<(), Error> {
        DB::register(&self.shared.pool, listener, start.at(), true).await?;
        self.shared
            .wake
            .send_modify(|version| *version = version.wrapping_add(1));
        Ok(())
    }

    /// Removes `listener` from the database: its checkpoint and every
    /// delivery of it, dead ones included (for a listener that will not
    /// run again, such as the instance listener of a process gone for
    /// good). Returns whether it was registered. A listener of that name
    /// spawned later starts afresh, at its [`Start`].
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if it could not be deleted.
    pub async fn forget(&self, listener: &str) -> Result<bool, Error> {
        Ok(DB::forget(&self.shared.pool, listener).await?)
    }

    /// Deletes the events every listener registered on the database has
    /// finished (those at or below the lowest checkpoint, and no dead
    /// delivery's): the log's retention. Returns how many were deleted.
    ///
    /// A listener spawned later with [`Start::Beginning`] starts at the
    /// first event left. With no listener registered, nothing is deleted.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if they could not be deleted.
    pub async fn prune(&self) -> Result<u64, Error> {
        Ok(DB::prune(&self.shared.pool).await?)
    }

    /// Shuts the store's listeners down, draining them: each claims what
    /// the log holds for it up to its end and handles it within
    /// `deadline`, and is stopped after it (what it still held is given
    /// back, to be handled again); then what they finished is written,
    /// for at most a second more (what is not written by then is delivered
    /// again). Returns each listener's report.
    ///
    /// Nothing committed is lost either way: what was not handled stays in
    /// the log for the next run. Spawning fails after this.
    pub async fn shutdown(&self, deadline: Duration) -> Vec<RunReport> {
        self.shared.closing.send_replace(true);
        let spawned = std::mem::take(
            &mut *self
                .shared
                .listeners
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let until = tokio::time::Instant::now() + deadline;
        let mut reports = Vec::with_capacity(spawned.len());
        for Spawned {
            core, task, worker, ..
        } in spawned
        {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(until, task).await.is_err() {
                core.cancel();
                abort.abort();
            }
            // The worker writes what was finished; should the database keep
            // it waiting past the deadline (and a grace to write), it is
            // stopped: the unwritten finishes' events are delivered again.
            let worker_abort = worker.abort_handle();
            let write_until = until.max(tokio::time::Instant::now()) + WRITE_GRACE;
            if tokio::time::timeout_at(write_until, worker).await.is_err() {
                worker_abort.abort();
            }
            reports.push(RunReport::of(&core));
        }
        reports
    }
}

/// Records, in the handler's own transaction on `conn`, that `listener`
/// applied the event `meta` is about; `true` the first time, `false` if it
/// was recorded before (a redelivery whose effect is already committed).
///
/// For a handler whose effect is a write to the same database: it begins a
/// transaction, calls this, writes only when it returns `true`, and
/// commits. The record and the effect then commit together, so the effect
/// happens once however often the event is delivered.
///
/// # Examples
///
/// ```
/// # #[cfg(feature = "sqlite")]
/// # mod example {
/// use event_bus::sql::first_time;
/// use event_bus::{HandlerError, Meta};
///
/// async fn on_order_paid(pool: &sqlx::SqlitePool, order: u64, meta: Meta) -> Result<(), HandlerError> {
///     let mut tx = pool.begin().await?;
///     if first_time::<sqlx::Sqlite>(&mut tx, "receipts", &meta).await? {
///         sqlx::query("INSERT INTO receipts (order_id) VALUES ($1)")
///             .bind(order as i64)
///             .execute(&mut *tx)
///             .await?;
///     }
///     tx.commit().await?;
///     Ok(())
/// }
/// # }
/// ```
///
/// # Errors
///
/// [`Error::Database`] if the record could not be written.
pub async fn first_time<DB: Backend>(
    conn: &mut DB::Connection,
    listener: &str,
    meta: &Meta,
) -> Result<bool, Error> {
    let id = meta.id().to_string();
    Ok(DB::mark_handled(conn, listener, &id, millis(SystemTime::now())).await?)
}
