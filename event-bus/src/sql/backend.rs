//! The SQL the durable tier runs, per database: the schema, and one method
//! per statement group, each written once (the `backend!` macro) for every
//! database whose dialect takes it as it is.

// With the `sql` feature alone, no database's statements are written.
#![cfg_attr(
    not(any(feature = "sqlite", feature = "postgres", feature = "any")),
    allow(unused)
)]

use std::future::Future;

use sqlx::{Database, Pool, Row};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A database the durable tier runs on: SQLite (feature `sqlite`) or
/// PostgreSQL (feature `postgres`).
///
/// Sealed: the tier's statements are written for these databases.
pub trait Backend: Database + sealed::Sealed {}

/// An event the outbox writes at commit.
#[derive(Debug)]
pub struct NewEvent {
    pub id: String,
    pub name: &'static str,
    pub payload: Vec<u8>,
}

/// An event a claim handed to this process, with its attempt.
#[derive(Debug)]
pub struct Claimed {
    pub position: i64,
    pub attempts: i64,
    pub payload: Vec<u8>,
    /// The last position of the claim whose range covers it; `None` when
    /// a delivery row does (a retry taken again, a redrive, an event
    /// given back).
    pub range: Option<i64>,
}

/// What a claim found.
#[derive(Debug)]
pub struct Claim {
    pub claimed: Vec<Claimed>,
    /// Whether there may be more to claim at once: it took as many as it
    /// was asked for, or took over another process's claim.
    pub full: bool,
    /// Whether it took deliveries due again or an expired claim.
    pub reclaimed: bool,
    /// The log's last position when it looked.
    pub last_position: i64,
}

/// What a claim asks for.
#[derive(Debug)]
pub struct ClaimArgs<'a> {
    /// The lease this claim takes: `<worker>:<claim>`, so that a finish
    /// of an earlier claim of the same position (forgotten by a replay)
    /// matches nothing.
    pub owner: &'a str,
    /// `<worker>:%`: every lease of this worker, which it holds while it
    /// lives and never takes again as expired.
    pub worker: &'a str,
    /// The names of the events the listener wants; `None` for all.
    pub names: Option<&'a [&'static str]>,
    pub limit: usize,
    /// How long the lease lasts, in milliseconds from when the claim
    /// holds the listener's row.
    pub lease: i64,
    /// Whether to look for deliveries due again and expired claims first.
    pub reclaim: bool,
}

/// One transaction of a worker: what was finished, then (if asked) the
/// next claim.
#[derive(Debug)]
pub struct Step<'a> {
    pub listener: &'a str,
    /// Finishes, in the order they came.
    pub finishes: &'a [Finished],
    /// The claims whose events were finished, as they are left.
    pub ranges: &'a [RangeLeft<'a>],
    pub claim: Option<ClaimArgs<'a>>,
}

/// A claim of this worker after some of its events were finished.
#[derive(Debug)]
pub struct RangeLeft<'a> {
    pub owner: &'a str,
    pub up_to: i64,
    /// The position before its lowest unfinished event, and how many are
    /// unfinished; `None` once all are finished (the claim goes).
    pub left: Option<(i64, i64)>,
}

/// What a step wrote and claimed.
#[derive(Debug)]
pub struct Stepped {
    /// The listener's checkpoint after it.
    pub checkpoint: i64,
    pub claim: Option<Claim>,
}

/// A finish of the delivery leased as `lease`.
#[derive(Debug)]
pub struct Finished {
    pub lease: std::sync::Arc<str>,
    /// The last position of the claim whose range covers the delivery;
    /// `None` when a delivery row does.
    pub range: Option<i64>,
    pub finish: Finish,
}

/// How a delivery was finished, applied in the next step.
#[derive(Debug)]
pub enum Finish {
    /// Handled: its claim moves past it, or its row goes.
    Ack(i64),
    /// Failed, to be attempted again no sooner than `next_try_at`;
    /// `attempts` is the failed attempt's number (the next is counted when
    /// it is handed out again: after a restart, by the reclaim).
    Retry {
        position: i64,
        attempts: i64,
        next_try_at: i64,
        error: String,
    },
    /// Failed for the last time.
    Dead {
        position: i64,
        attempts: i64,
        error: String,
        at: i64,
    },
    /// Dropped unfinished (the listener was stopped) as attempt
    /// `attempts`: another process, or the next run, takes it at once, as
    /// the next (an event with a row of its own keeps the row's count: a
    /// retry dropped while it waited comes back as the attempt it was).
    Abandon { position: i64, attempts: i64 },
    /// Given back unattempted: taken again as attempt `attempts + 1`.
    Release { position: i64, attempts: i64 },
}

impl Finish {
    pub(crate) fn position(&self) -> i64 {
        match *self {
            Self::Ack(position)
            | Self::Retry { position, .. }
            | Self::Dead { position, .. }
            | Self::Abandon { position, .. }
            | Self::Release { position, .. } => position,
        }
    }
}

/// A dead delivery as stored.
#[derive(Debug)]
pub struct DeadRow {
    pub listener: String,
    pub position: i64,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub failed_at: Option<i64>,
    pub id: String,
    pub name: String,
    pub payload: Vec<u8>,
}

/// A listener's progress as stored.
#[derive(Debug)]
pub struct ProgressRow {
    pub listener: String,
    pub head: i64,
    pub checkpoint: i64,
    pub unfinished: i64,
    pub dead: i64,
}

/// Where a listener starts when it is first registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    Beginning,
    Now,
    After(i64),
}

pub(super) mod sealed {
    use super::*;

    /// The statements of [`Backend`], per database.
    pub trait Sealed: Database {
        /// Whether the database takes one writer at a time (SQLite): then
        /// the store's own writers queue on a gate in the process rather
        /// than in the database's busy handler, which sleeps.
        fn one_writer(pool: &Pool<Self>) -> bool;

        fn migrate(pool: &Pool<Self>) -> impl Future<Output = sqlx::Result<()>> + Send;

        /// Begins a transaction that will write.
        fn begin_writer(
            pool: &Pool<Self>,
        ) -> impl Future<Output = sqlx::Result<sqlx::Transaction<'static, Self>>> + Send;

        /// Spawns the task that bumps `wake` whenever another process
        /// commits events, where the database can tell.
        fn listen(pool: &Pool<Self>, wake: watch::Sender<u64>) -> Option<JoinHandle<()>>;

        /// Writes `events` in the open transaction on `conn`, in order.
        fn insert_events<'a>(
            conn: &'a mut Self::Connection,
            events: &'a [NewEvent],
            now: i64,
        ) -> impl Future<Output = sqlx::Result<Vec<i64>>> + Send + 'a;

        fn register(
            pool: &Pool<Self>,
            listener: &str,
            start: StartAt,
            reset: bool,
        ) -> impl Future<Output = sqlx::Result<()>> + Send;

        /// Writes what was finished and, if asked, claims what is next,
        /// in one transaction.
        fn step(
            pool: &Pool<Self>,
            step: Step<'_>,
        ) -> impl Future<Output = sqlx::Result<Stepped>> + Send;

        /// Renews every lease of `worker` (a `LIKE` pattern).
        fn renew(
            pool: &Pool<Self>,
            listener: &str,
            worker: &str,
            lease_until: i64,
        ) -> impl Future<Output = sqlx::Result<u64>> + Send;

        fn dead(
            pool: &Pool<Self>,
            listener: Option<&str>,
        ) -> impl Future<Output = sqlx::Result<Vec<DeadRow>>> + Send;

        fn redrive(
            pool: &Pool<Self>,
            listener: &str,
            position: Option<i64>,
        ) -> impl Future<Output = sqlx::Result<u64>> + Send;

        fn discard(
            pool: &Pool<Self>,
            listener: &str,
            position: Option<i64>,
        ) -> impl Future<Output = sqlx::Result<u64>> + Send;

        fn progress(
            pool: &Pool<Self>,
        ) -> impl Future<Output = sqlx::Result<(i64, Vec<ProgressRow>)>> + Send;

        fn prune(pool: &Pool<Self>) -> impl Future<Output = sqlx::Result<u64>> + Send;

        fn forget(
            pool: &Pool<Self>,
            listener: &str,
        ) -> impl Future<Output = sqlx::Result<bool>> + Send;

        fn mark_handled<'a>(
            conn: &'a mut Self::Connection,
            listener: &'a str,
            id: &'a str,
            now: i64,
        ) -> impl Future<Output = sqlx::Result<bool>> + Send + 'a;
    }
}

/// The most rows one statement writes or deletes: within every database's
/// limit on binds.
const INSERT_CHUNK: usize = 500;

/// `$from, $from+1, …` for `n` binds.
fn placeholders(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Sets the listener's head to `$2`, and its checkpoint to the lowest of
/// the head, the position below its lowest unfinished delivery row, and the
/// lowest `done_to` of its claims. Dead deliveries do not hold it. `$least`
/// is the dialect's scalar minimum.
macro_rules! checkpoint {
    ($least:literal) => {
        concat!(
            "UPDATE event_bus_listeners SET head = $2, checkpoint = ",
            $least,
            "($2,
                COALESCE((SELECT MIN(position) - 1 FROM event_bus_deliveries
                          WHERE listener = $1 AND state <> 'dead'), $2),
                COALESCE((SELECT MIN(done_to) FROM event_bus_claims WHERE listener = $1), $2))
            WHERE listener = $1 RETURNING checkpoint"
        )
    };
}

#[cfg(any(feature = "sqlite", feature = "any"))]
const CHECKPOINT_SQLITE: &str = checkpoint!("MIN");
#[cfg(any(feature = "postgres", feature = "any"))]
const CHECKPOINT_POSTGRES: &str = checkpoint!("LEAST");

/// Deliveries due again: given back, or whose lease expired (their process
/// died: never this worker's own, which it holds while it lives), and whose
/// retry time has come.
///
/// The conditions are checked again on the rows themselves: on PostgreSQL
/// a row renewed while the statement waited for it is not taken.
const RECLAIM: &str = "UPDATE event_bus_deliveries
    SET state = 'leased', owner = $2, lease_until = $3, attempts = attempts + 1
    WHERE listener = $1 AND state <> 'dead' AND lease_until <= $4 AND next_try_at <= $4
      AND position IN (
        SELECT position FROM event_bus_deliveries
        WHERE listener = $1 AND state <> 'dead' AND lease_until <= $4 AND next_try_at <= $4
          AND (owner IS NULL OR owner NOT LIKE $6)
        ORDER BY position LIMIT $5)
    RETURNING position, attempts";

/// The owner of a dead delivery discarded while a claim still covers it:
/// kept (so that a take-over of the claim leaves it out), never listed.
const DISCARDED: &str = "discarded";

/// Whether a claim of the delivery row's listener still covers its
/// position (in a statement on `event_bus_deliveries`).
const COVERED: &str = "SELECT 1 FROM event_bus_claims c
    WHERE c.listener = event_bus_deliveries.listener
      AND c.done_to < event_bus_deliveries.position
      AND event_bus_deliveries.position <= c.up_to";

/// Takes over the first claim whose lease expired (its process died: never
/// this worker's own), its events as the next attempt; as `RECLAIM`, the
/// lease is checked again on the row itself.
const TAKE_OVER: &str = "UPDATE event_bus_claims
    SET owner = $2, lease_until = $3, attempts = attempts + 1
    WHERE listener = $1 AND lease_until <= $4 AND up_to = (
        SELECT up_to FROM event_bus_claims
        WHERE listener = $1 AND lease_until <= $4 AND owner NOT LIKE $5
        ORDER BY up_to LIMIT 1)
    RETURNING done_to, up_to, attempts, unfinished";

/// A finished event of a claim that did not succeed gets a row of its own,
/// if the claim is still the finisher's (`$3`) and covers it: `$9` is 1 to
/// keep the claim's lease (a retry in place), 0 to give it up.
const ROW_OF_CLAIMED: &str = "INSERT INTO event_bus_deliveries
    (listener, position, state, attempts, owner, lease_until, next_try_at, last_error, failed_at)
    SELECT $1, $2, $4, $5, $6, lease_until * $9, $7, $8, $10 FROM event_bus_claims
    WHERE listener = $1 AND up_to = $11 AND owner = $3 AND done_to < $2
    ON CONFLICT (listener, position) DO NOTHING";

/// The log after the head, as one claim reads it: the log's last position
/// (in every row, and in one row of nulls if nothing is to be read) and the
/// first events after `$1` of the names `{filter}` allows (from `$4`), in
/// order, up to `$2` of them (positions a delivery row of listener `$3`
/// covers are left to it). One statement, so that the last position and
/// the events are of one moment.
fn next_page_sql(filter: &str) -> String {
    format!(
        "SELECT m.last, e.position, e.payload
         FROM (SELECT COALESCE(MAX(position), 0) AS last FROM event_bus_events) AS m
         LEFT JOIN (SELECT position, payload FROM event_bus_events
                    WHERE position > $1{filter}
                      AND NOT EXISTS (SELECT 1 FROM event_bus_deliveries d
                                      WHERE d.listener = $3 AND d.position = event_bus_events.position)
                    ORDER BY position LIMIT $2) AS e ON 1 = 1
         ORDER BY e.position"
    )
}

/// The events of a claim taken over, after `$1` up to `$2`, as
/// `next_page_sql` reads them.
fn page_sql(filter: &str) -> String {
    format!(
        "SELECT position, payload FROM event_bus_events
         WHERE position > $1 AND position <= $2{filter}
           AND NOT EXISTS (SELECT 1 FROM event_bus_deliveries d
                           WHERE d.listener = $4 AND d.position = event_bus_events.position)
         ORDER BY position LIMIT $3"
    )
}

/// ` AND name IN ($from, …)` for `names`, or nothing for every name.
fn name_filter(names: Option<&[&'static str]>, from: usize) -> String {
    names.map_or_else(String::new, |names| {
        format!(" AND name IN ({})", placeholders(from, names.len().max(1)))
    })
}

/// Milliseconds since the Unix epoch, now.
fn now() -> i64 {
    super::worker::millis(std::time::SystemTime::now())
}

/// Binds the names of a name filter (`name_filter`) to `query`.
macro_rules! bind_names {
    ($query:expr, $names:expr) => {{
        let mut query = $query;
        if let Some(names) = $names {
            if names.is_empty() {
                query = query.bind("");
            }
            for name in names {
                query = query.bind(*name);
            }
        }
        query
    }};
}

/// A claim, in the transaction on `$conn` that holds the listener's row
/// (whose head is `$head`): deliveries due again, then another process's
/// expired claim, then the log after the head. Evaluates to its `Claim`
/// and the listener's new head.
macro_rules! claim {
    ($conn:expr, $listener:expr, $head:expr, $args:expr) => {{
        let conn = $conn;
        let listener: &str = $listener;
        let head: i64 = $head;
        let args: ClaimArgs<'_> = $args;
        // The lease counts from now, once the claim holds the row: not
        // from before it waited for it.
        let now = now();
        let lease_until = now.saturating_add(args.lease);
        let limit = i64::try_from(args.limit).unwrap_or(i64::MAX);
        let reclaimed: Vec<(i64, i64)> = if args.reclaim {
            sqlx::query_as(RECLAIM)
                .bind(listener)
                .bind(args.owner)
                .bind(lease_until)
                .bind(now)
                .bind(limit)
                .bind(args.worker)
                .fetch_all(&mut *conn)
                .await?
        } else {
            Vec::new()
        };
        let mut took = !reclaimed.is_empty();
        let mut claimed = Vec::with_capacity(args.limit);
        let attempts: std::collections::BTreeMap<i64, i64> = reclaimed.into_iter().collect();
        let positions: Vec<i64> = attempts.keys().copied().collect();
        for chunk in positions.chunks(INSERT_CHUNK) {
            let sql = format!(
                "SELECT position, payload FROM event_bus_events WHERE position IN ({}) ORDER BY position",
                placeholders(1, chunk.len())
            );
            let mut query = sqlx::query(&sql);
            for position in chunk {
                query = query.bind(*position);
            }
            for row in query.fetch_all(&mut *conn).await? {
                let position: i64 = row.get(0);
                claimed.push(Claimed {
                    position,
                    attempts: attempts.get(&position).copied().unwrap_or(1),
                    payload: row.get(1),
                    range: None,
                });
            }
        }
        let page = page_sql(&name_filter(args.names, 5));
        let mut full = false;
        if args.reclaim && claimed.len() < args.limit {
            let taken: Option<(i64, i64, i64, i64)> = sqlx::query_as(TAKE_OVER)
                .bind(listener)
                .bind(args.owner)
                .bind(lease_until)
                .bind(now)
                .bind(args.worker)
                .fetch_optional(&mut *conn)
                .await?;
            if let Some((done_to, up_to, attempts, unfinished)) = taken {
                // There may be more claims to take over.
                full = true;
                took = true;
                let room = args.limit - claimed.len();
                let rows = bind_names!(
                    sqlx::query(&page)
                        .bind(done_to)
                        .bind(up_to)
                        .bind(i64::try_from(room).unwrap_or(i64::MAX))
                        .bind(listener),
                    args.names
                )
                .fetch_all(&mut *conn)
                .await?;
                let taken = i64::try_from(rows.len()).unwrap_or(i64::MAX);
                let last = rows.last().map(|row| row.get::<i64, _>(0));
                let end = match last {
                    // Nothing of it is left to handle.
                    None => {
                        sqlx::query("DELETE FROM event_bus_claims WHERE listener = $1 AND up_to = $2")
                            .bind(listener)
                            .bind(up_to)
                            .execute(&mut *conn)
                            .await?;
                        up_to
                    }
                    // More than there is room for: the rest stays a claim
                    // of nobody's, for the next claim here or elsewhere.
                    Some(last) if rows.len() == room && last < up_to => {
                        sqlx::query(
                            "UPDATE event_bus_claims SET up_to = $3, unfinished = $4
                             WHERE listener = $1 AND up_to = $2",
                        )
                        .bind(listener)
                        .bind(up_to)
                        .bind(last)
                        .bind(taken)
                        .execute(&mut *conn)
                        .await?;
                        sqlx::query(
                            "INSERT INTO event_bus_claims
                             (listener, up_to, done_to, unfinished, attempts, owner, lease_until)
                             VALUES ($1, $2, $3, $4, $5, '', 0)",
                        )
                        .bind(listener)
                        .bind(up_to)
                        .bind(last)
                        .bind(unfinished.saturating_sub(taken).max(1))
                        .bind(attempts - 1)
                        .execute(&mut *conn)
                        .await?;
                        last
                    }
                    Some(_) => {
                        sqlx::query(
                            "UPDATE event_bus_claims SET unfinished = $3
                             WHERE listener = $1 AND up_to = $2",
                        )
                        .bind(listener)
                        .bind(up_to)
                        .bind(taken)
                        .execute(&mut *conn)
                        .await?;
                        up_to
                    }
                };
                for row in rows {
                    claimed.push(Claimed {
                        position: row.get(0),
                        attempts,
                        payload: row.get(1),
                        range: Some(end),
                    });
                }
            }
        }
        let room = args.limit - claimed.len();
        let next_page = next_page_sql(&name_filter(args.names, 4));
        let rows = if room > 0 {
            bind_names!(
                sqlx::query(&next_page)
                    .bind(head)
                    .bind(i64::try_from(room).unwrap_or(i64::MAX))
                    .bind(listener),
                args.names
            )
            .fetch_all(&mut *conn)
            .await?
        } else {
            // Only the last position.
            sqlx::query("SELECT COALESCE(MAX(position), 0) FROM event_bus_events")
                .fetch_all(&mut *conn)
                .await?
        };
        let last_position: i64 = rows.first().map_or(head, |row| row.get(0));
        let page: Vec<(i64, Vec<u8>)> = if room > 0 {
            rows.iter()
                .filter_map(|row| {
                    Some((
                        row.get::<Option<i64>, _>(1)?,
                        row.get::<Option<Vec<u8>>, _>(2)?,
                    ))
                })
                .collect()
        } else {
            Vec::new()
        };
        let new_head = match page.last() {
            // Nothing was read (the room was taken by redeliveries): the
            // head stays where it was.
            _ if room == 0 => head,
            Some(&(last, _)) if page.len() == room => last,
            _ => last_position.max(head),
        };
        if let (Some(&(first, _)), Some(&(last, _))) = (page.first(), page.last()) {
            // One row for the whole page: the events are this claim's until
            // they are finished.
            sqlx::query(
                "INSERT INTO event_bus_claims
                 (listener, up_to, done_to, unfinished, attempts, owner, lease_until)
                 VALUES ($1, $2, $3, $4, 1, $5, $6)",
            )
            .bind(listener)
            .bind(last)
            .bind(first - 1)
            .bind(i64::try_from(page.len()).unwrap_or(i64::MAX))
            .bind(args.owner)
            .bind(lease_until)
            .execute(&mut *conn)
            .await?;
            for (position, payload) in page {
                claimed.push(Claimed {
                    position,
                    attempts: 1,
                    payload,
                    range: Some(last),
                });
            }
        }
        (
            Claim {
                full: full || claimed.len() == args.limit,
                reclaimed: took,
                claimed,
                last_position,
            },
            new_head,
        )
    }};
}

macro_rules! backend {
    ($db:ty, one_writer = $one_writer:path, schema = $schema:path, lock = $lock:path, checkpoint = $checkpoint:path, begin = $begin:path, serialize = $serialize:path, insert = $insert:path, listen = $listen:path) => {
        impl Backend for $db {}

        impl sealed::Sealed for $db {
            fn one_writer(pool: &Pool<Self>) -> bool {
                $one_writer(pool)
            }

            async fn migrate(pool: &Pool<Self>) -> sqlx::Result<()> {
                let mut tx = $begin(pool).await?;
                $serialize(&mut *tx).await?;
                for statement in $schema(pool).split(';').map(str::trim).filter(|s| !s.is_empty()) {
                    sqlx::query(statement).execute(&mut *tx).await?;
                }
                tx.commit().await
            }

            async fn begin_writer(pool: &Pool<Self>) -> sqlx::Result<sqlx::Transaction<'static, Self>> {
                $begin(pool).await
            }

            fn listen(pool: &Pool<Self>, wake: watch::Sender<u64>) -> Option<JoinHandle<()>> {
                $listen(pool, wake)
            }

            fn insert_events<'a>(
                conn: &'a mut Self::Connection,
                events: &'a [NewEvent],
                now: i64,
            ) -> impl Future<Output = sqlx::Result<Vec<i64>>> + Send + 'a {
                async move {
                    if events.is_empty() {
                        return Ok(Vec::new());
                    }
                    let mut positions = Vec::with_capacity(events.len());
                    // One statement per chunk; the rows are numbered in the
                    // order of their VALUES.
                    for chunk in events.chunks(INSERT_CHUNK) {
                        let values = (0..chunk.len())
                            .map(|i| format!("(${}, ${}, ${}, $1)", 3 * i + 2, 3 * i + 3, 3 * i + 4))
                            .collect::<Vec<_>>()
                            .join(", ");
                        let sql = $insert(&*conn, &values);
                        let mut query = sqlx::query_scalar::<_, i64>(&sql).bind(now);
                        for event in chunk {
                            query = query.bind(&event.id).bind(event.name).bind(&event.payload);
                        }
                        let mut written = query.fetch_all(&mut *conn).await?;
                        written.sort_unstable();
                        positions.extend(written);
                    }
                    Ok(positions)
                }
            }

            async fn register(
                pool: &Pool<Self>,
                listener: &str,
                start: StartAt,
                reset: bool,
            ) -> sqlx::Result<()> {
                let mut tx = $begin(pool).await?;
                let head = match start {
                    StartAt::Beginning => 0,
                    StartAt::After(position) => position,
                    StartAt::Now => {
                        sqlx::query_scalar(
                            "SELECT COALESCE(MAX(position), 0) FROM event_bus_events",
                        )
                        .fetch_one(&mut *tx)
                        .await?
                    }
                };
                if reset {
                    sqlx::query(
                        "INSERT INTO event_bus_listeners (listener, head, checkpoint) VALUES ($1, $2, $2)
                         ON CONFLICT (listener) DO UPDATE SET head = $2, checkpoint = $2",
                    )
                    .bind(listener)
                    .bind(head)
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query(
                        "DELETE FROM event_bus_deliveries WHERE listener = $1 AND state <> 'dead'",
                    )
                    .bind(listener)
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query("DELETE FROM event_bus_claims WHERE listener = $1")
                        .bind(listener)
                        .execute(&mut *tx)
                        .await?;
                } else {
                    sqlx::query(
                        "INSERT INTO event_bus_listeners (listener, head, checkpoint) VALUES ($1, $2, $2)
                         ON CONFLICT (listener) DO NOTHING",
                    )
                    .bind(listener)
                    .bind(head)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await
            }

            async fn step(pool: &Pool<Self>, step: Step<'_>) -> sqlx::Result<Stepped> {
                let listener = step.listener;
                let mut tx = $begin(pool).await?;
                let head: i64 = sqlx::query_scalar($lock(pool))
                    .bind(listener)
                    .fetch_one(&mut *tx)
                    .await?;
                // What failed or was given back, in the order it came: an
                // event of a claim gets a row of its own, a row is updated.
                for finished in step.finishes {
                    let owner: &str = &finished.lease;
                    let position = finished.finish.position();
                    let query = match (&finished.finish, finished.range) {
                        (Finish::Ack(_), _) => continue,
                        (finish, Some(up_to)) => {
                            let (state, attempts, keep, next_try_at, error, failed_at) =
                                match finish {
                                    Finish::Ack(_) => continue,
                                    Finish::Retry { attempts, next_try_at, error, .. } => {
                                        ("leased", *attempts, true, *next_try_at, Some(error.as_str()), None)
                                    }
                                    Finish::Dead { attempts, error, at, .. } => {
                                        ("dead", *attempts, false, 0, Some(error.as_str()), Some(*at))
                                    }
                                    Finish::Abandon { attempts, .. }
                                    | Finish::Release { attempts, .. } => {
                                        ("pending", *attempts, false, 0, None, None)
                                    }
                                };
                            sqlx::query(ROW_OF_CLAIMED)
                                .bind(listener)
                                .bind(position)
                                .bind(owner)
                                .bind(state)
                                .bind(attempts)
                                .bind(keep.then_some(owner))
                                .bind(next_try_at)
                                .bind(error)
                                .bind(i64::from(keep))
                                .bind(failed_at)
                                .bind(up_to)
                        }
                        (Finish::Retry { attempts, next_try_at, error, .. }, None) => sqlx::query(
                            "UPDATE event_bus_deliveries
                             SET attempts = $4, next_try_at = $5, last_error = $6
                             WHERE listener = $1 AND position = $2 AND owner = $3",
                        )
                        .bind(listener)
                        .bind(position)
                        .bind(owner)
                        .bind(*attempts)
                        .bind(*next_try_at)
                        .bind(error.as_str()),
                        (Finish::Dead { attempts, error, at, .. }, None) => sqlx::query(
                            "UPDATE event_bus_deliveries
                             SET state = 'dead', owner = NULL, lease_until = 0,
                                 attempts = $4, last_error = $5, failed_at = $6
                             WHERE listener = $1 AND position = $2 AND owner = $3",
                        )
                        .bind(listener)
                        .bind(position)
                        .bind(owner)
                        .bind(*attempts)
                        .bind(error.as_str())
                        .bind(*at),
                        // Its row keeps the attempts it has: those of the
                        // last that failed, or of the claim that took it.
                        (Finish::Abandon { .. }, None) => sqlx::query(
                            "UPDATE event_bus_deliveries
                             SET state = 'pending', owner = NULL, lease_until = 0
                             WHERE listener = $1 AND position = $2 AND owner = $3",
                        )
                        .bind(listener)
                        .bind(position)
                        .bind(owner),
                        (Finish::Release { attempts, .. }, None) => sqlx::query(
                            "UPDATE event_bus_deliveries
                             SET state = 'pending', owner = NULL, lease_until = 0, attempts = $4
                             WHERE listener = $1 AND position = $2 AND owner = $3",
                        )
                        .bind(listener)
                        .bind(position)
                        .bind(owner)
                        .bind(*attempts),
                    };
                    query.execute(&mut *tx).await?;
                }
                // Handled rows go, one statement per claim they came from.
                let mut acked: std::collections::BTreeMap<&str, Vec<i64>> = Default::default();
                for finished in step.finishes {
                    if let (Finish::Ack(position), None) = (&finished.finish, finished.range) {
                        acked.entry(&finished.lease).or_default().push(*position);
                    }
                }
                for (owner, positions) in acked {
                    for chunk in positions.chunks(INSERT_CHUNK) {
                        let sql = format!(
                            "DELETE FROM event_bus_deliveries
                             WHERE listener = $1 AND owner = $2 AND position IN ({})",
                            placeholders(3, chunk.len())
                        );
                        let mut query = sqlx::query(&sql).bind(listener).bind(owner);
                        for position in chunk {
                            query = query.bind(*position);
                        }
                        query.execute(&mut *tx).await?;
                    }
                }
                // Claims move past what is finished, and go once all is.
                for range in step.ranges {
                    let query = match range.left {
                        Some((done_to, unfinished)) => sqlx::query(
                            "UPDATE event_bus_claims SET done_to = $4, unfinished = $5
                             WHERE listener = $1 AND up_to = $2 AND owner = $3",
                        )
                        .bind(listener)
                        .bind(range.up_to)
                        .bind(range.owner)
                        .bind(done_to)
                        .bind(unfinished),
                        None => sqlx::query(
                            "DELETE FROM event_bus_claims
                             WHERE listener = $1 AND up_to = $2 AND owner = $3",
                        )
                        .bind(listener)
                        .bind(range.up_to)
                        .bind(range.owner),
                    };
                    query.execute(&mut *tx).await?;
                }
                let (claim, head) = match step.claim {
                    Some(args) => {
                        let (claim, head) = claim!(&mut *tx, listener, head, args);
                        (Some(claim), head)
                    }
                    None => (None, head),
                };
                let checkpoint: i64 = sqlx::query_scalar($checkpoint(pool))
                    .bind(listener)
                    .bind(head)
                    .fetch_one(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(Stepped { checkpoint, claim })
            }

            async fn renew(
                pool: &Pool<Self>,
                listener: &str,
                worker: &str,
                lease_until: i64,
            ) -> sqlx::Result<u64> {
                let mut tx = $begin(pool).await?;
                let claims = sqlx::query(
                    "UPDATE event_bus_claims SET lease_until = $3
                     WHERE listener = $1 AND owner LIKE $2",
                )
                .bind(listener)
                .bind(worker)
                .bind(lease_until)
                .execute(&mut *tx)
                .await?;
                let rows = sqlx::query(
                    "UPDATE event_bus_deliveries SET lease_until = $3
                     WHERE listener = $1 AND owner LIKE $2 AND state = 'leased'",
                )
                .bind(listener)
                .bind(worker)
                .bind(lease_until)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(claims.rows_affected() + rows.rows_affected())
            }

            async fn dead(pool: &Pool<Self>, listener: Option<&str>) -> sqlx::Result<Vec<DeadRow>> {
                let rows = sqlx::query(
                    "SELECT d.listener, d.position, d.attempts, d.last_error, d.failed_at,
                            e.id, e.name, e.payload
                     FROM event_bus_deliveries d
                     JOIN event_bus_events e ON e.position = d.position
                     WHERE d.state = 'dead' AND d.owner IS NULL AND ($1 IS NULL OR d.listener = $1)
                     ORDER BY d.failed_at, d.position, d.listener",
                )
                .bind(listener)
                .fetch_all(pool)
                .await?;
                Ok(rows
                    .into_iter()
                    .map(|row| DeadRow {
                        listener: row.get(0),
                        position: row.get(1),
                        attempts: row.get(2),
                        last_error: row.get(3),
                        failed_at: row.get(4),
                        id: row.get(5),
                        name: row.get(6),
                        payload: row.get(7),
                    })
                    .collect())
            }

            async fn redrive(
                pool: &Pool<Self>,
                listener: &str,
                position: Option<i64>,
            ) -> sqlx::Result<u64> {
                let mut tx = $begin(pool).await?;
                let Some(head): Option<i64> = sqlx::query_scalar($lock(pool))
                    .bind(listener)
                    .fetch_optional(&mut *tx)
                    .await?
                else {
                    return Ok(0);
                };
                let done = sqlx::query(
                    "UPDATE event_bus_deliveries
                     SET state = 'pending', attempts = 0, owner = NULL, lease_until = 0,
                         next_try_at = 0, failed_at = NULL
                     WHERE listener = $1 AND state = 'dead' AND owner IS NULL
                       AND ($2 IS NULL OR position = $2)",
                )
                .bind(listener)
                .bind(position)
                .execute(&mut *tx)
                .await?;
                sqlx::query($checkpoint(pool))
                    .bind(listener)
                    .bind(head)
                    .fetch_one(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(done.rows_affected())
            }

            async fn discard(
                pool: &Pool<Self>,
                listener: &str,
                position: Option<i64>,
            ) -> sqlx::Result<u64> {
                let mut tx = $begin(pool).await?;
                let Some(_head): Option<i64> = sqlx::query_scalar($lock(pool))
                    .bind(listener)
                    .fetch_optional(&mut *tx)
                    .await?
                else {
                    return Ok(0);
                };
                // Within a claim still open, the row is what keeps the
                // event out of it (should the claim be taken over): it
                // stays, as nobody's.
                let kept = sqlx::query(&format!(
                    "UPDATE event_bus_deliveries SET owner = '{DISCARDED}'
                     WHERE listener = $1 AND state = 'dead' AND owner IS NULL
                       AND ($2 IS NULL OR position = $2)
                       AND EXISTS ({COVERED})"
                ))
                .bind(listener)
                .bind(position)
                .execute(&mut *tx)
                .await?;
                let deleted = sqlx::query(
                    "DELETE FROM event_bus_deliveries
                     WHERE listener = $1 AND state = 'dead' AND owner IS NULL
                       AND ($2 IS NULL OR position = $2)",
                )
                .bind(listener)
                .bind(position)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(kept.rows_affected() + deleted.rows_affected())
            }

            async fn progress(pool: &Pool<Self>) -> sqlx::Result<(i64, Vec<ProgressRow>)> {
                let mut tx = pool.begin().await?;
                let last: i64 =
                    sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM event_bus_events")
                        .fetch_one(&mut *tx)
                        .await?;
                let rows = sqlx::query(
                    "SELECT l.listener, l.head, l.checkpoint,
                        (SELECT COUNT(*) FROM event_bus_deliveries d
                         WHERE d.listener = l.listener AND d.state <> 'dead')
                        + CAST(COALESCE((SELECT SUM(c.unfinished) FROM event_bus_claims c
                                         WHERE c.listener = l.listener), 0) AS BIGINT),
                        (SELECT COUNT(*) FROM event_bus_deliveries d
                         WHERE d.listener = l.listener AND d.state = 'dead' AND d.owner IS NULL)
                     FROM event_bus_listeners l ORDER BY l.listener",
                )
                .fetch_all(&mut *tx)
                .await?;
                tx.commit().await?;
                let rows = rows
                    .into_iter()
                    .map(|row| ProgressRow {
                        listener: row.get(0),
                        head: row.get(1),
                        checkpoint: row.get(2),
                        unfinished: row.get(3),
                        dead: row.get(4),
                    })
                    .collect();
                Ok((last, rows))
            }

            async fn prune(pool: &Pool<Self>) -> sqlx::Result<u64> {
                let mut tx = $begin(pool).await?;
                // Discarded deliveries whose claims are gone.
                sqlx::query(&format!(
                    "DELETE FROM event_bus_deliveries
                     WHERE owner = '{DISCARDED}' AND NOT EXISTS ({COVERED})"
                ))
                .execute(&mut *tx)
                .await?;
                let done = sqlx::query(
                    "DELETE FROM event_bus_events
                     WHERE position <= (SELECT MIN(checkpoint) FROM event_bus_listeners)
                       AND NOT EXISTS (SELECT 1 FROM event_bus_deliveries d
                                       WHERE d.position = event_bus_events.position)",
                )
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(done.rows_affected())
            }

            async fn forget(pool: &Pool<Self>, listener: &str) -> sqlx::Result<bool> {
                let mut tx = $begin(pool).await?;
                for table in ["event_bus_deliveries", "event_bus_claims"] {
                    sqlx::query(&format!("DELETE FROM {table} WHERE listener = $1"))
                        .bind(listener)
                        .execute(&mut *tx)
                        .await?;
                }
                let done = sqlx::query("DELETE FROM event_bus_listeners WHERE listener = $1")
                    .bind(listener)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(done.rows_affected() == 1)
            }

            fn mark_handled<'a>(
                conn: &'a mut Self::Connection,
                listener: &'a str,
                id: &'a str,
                now: i64,
            ) -> impl Future<Output = sqlx::Result<bool>> + Send + 'a {
                async move {
                    let done = sqlx::query(
                        "INSERT INTO event_bus_handled (listener, event_id, handled_at)
                         VALUES ($1, $2, $3) ON CONFLICT (listener, event_id) DO NOTHING",
                    )
                    .bind(listener)
                    .bind(id)
                    .bind(now)
                    .execute(&mut *conn)
                    .await?;
                    Ok(done.rows_affected() == 1)
                }
            }
        }
    };
}

/// Reads a listener's head, locking its row until the transaction ends:
/// on SQLite the transaction holds the database's write lock already.
#[cfg(any(feature = "sqlite", feature = "any"))]
const LOCK_SQLITE: &str = "SELECT head FROM event_bus_listeners WHERE listener = $1";
/// The channel of PostgreSQL's `NOTIFY` after an outbox commit.
#[cfg(any(feature = "postgres", feature = "any"))]
const CHANNEL: &str = "event_bus";

/// Taken by every transaction that writes events on PostgreSQL: see
/// `postgres::serialize`.
#[cfg(any(feature = "postgres", feature = "any"))]
const SERIALIZE_POSTGRES: &str = "SELECT pg_advisory_xact_lock($1)";

/// Writes the events of `values` (rows of id, name, payload and time).
#[cfg(any(feature = "sqlite", feature = "any"))]
fn insert_sqlite(values: &str) -> String {
    format!(
        "INSERT INTO event_bus_events (id, name, payload, recorded_at) VALUES {values}
         RETURNING position"
    )
}

/// As `insert_sqlite`, in one statement with what a transaction that
/// writes events takes first (see `postgres::serialize`) and the `NOTIFY`
/// that wakes every listening session when it commits: one round trip.
#[cfg(any(feature = "postgres", feature = "any"))]
fn insert_postgres(values: &str) -> String {
    format!(
        "WITH serialized AS (SELECT pg_advisory_xact_lock({lock})),
              notified AS (SELECT pg_notify('{CHANNEL}', ''))
         INSERT INTO event_bus_events (id, name, payload, recorded_at)
         SELECT v.id, v.name, v.payload, v.recorded_at
         FROM (VALUES {values}) AS v (id, name, payload, recorded_at), serialized, notified
         RETURNING position",
        lock = super::schema::POSTGRES_LOCK,
    )
}

#[cfg(any(feature = "postgres", feature = "any"))]
const LOCK_POSTGRES: &str = "SELECT head FROM event_bus_listeners WHERE listener = $1 FOR UPDATE";

#[cfg(feature = "sqlite")]
mod sqlite {
    use sqlx::{Pool, Sqlite, SqliteConnection, Transaction};

    use super::super::schema;

    pub(super) fn one_writer(_: &Pool<Sqlite>) -> bool {
        true
    }

    pub(super) fn schema(_: &Pool<Sqlite>) -> &'static str {
        schema::SQLITE
    }

    pub(super) fn lock(_: &Pool<Sqlite>) -> &'static str {
        super::LOCK_SQLITE
    }

    pub(super) fn checkpoint(_: &Pool<Sqlite>) -> &'static str {
        super::CHECKPOINT_SQLITE
    }

    /// A writer from the start: a deferred transaction that reads first
    /// fails with `SQLITE_BUSY`, without waiting, when another wrote
    /// meanwhile.
    pub(super) async fn begin(pool: &Pool<Sqlite>) -> sqlx::Result<Transaction<'static, Sqlite>> {
        pool.begin_with("BEGIN IMMEDIATE").await
    }

    /// One writer at a time already: positions are assigned in commit order.
    #[allow(clippy::unused_async)]
    pub(super) async fn serialize(_: &mut SqliteConnection) -> sqlx::Result<()> {
        Ok(())
    }

    /// No notification: other processes poll (SQLite has none).
    pub(super) fn insert(_: &SqliteConnection, values: &str) -> String {
        super::insert_sqlite(values)
    }

    pub(super) fn listen(
        _: &Pool<Sqlite>,
        _: tokio::sync::watch::Sender<u64>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        None
    }
}

#[cfg(feature = "sqlite")]
backend!(
    sqlx::Sqlite,
    one_writer = sqlite::one_writer,
    schema = sqlite::schema,
    lock = sqlite::lock,
    checkpoint = sqlite::checkpoint,
    begin = sqlite::begin,
    serialize = sqlite::serialize,
    insert = sqlite::insert,
    listen = sqlite::listen
);

#[cfg(feature = "postgres")]
mod postgres {
    use sqlx::{PgConnection, Pool, Postgres, Transaction};

    use super::super::schema;

    pub(super) fn one_writer(_: &Pool<Postgres>) -> bool {
        false
    }

    pub(super) fn schema(_: &Pool<Postgres>) -> &'static str {
        schema::POSTGRES
    }

    pub(super) fn lock(_: &Pool<Postgres>) -> &'static str {
        super::LOCK_POSTGRES
    }

    pub(super) fn checkpoint(_: &Pool<Postgres>) -> &'static str {
        super::CHECKPOINT_POSTGRES
    }

    pub(super) async fn begin(
        pool: &Pool<Postgres>,
    ) -> sqlx::Result<Transaction<'static, Postgres>> {
        pool.begin().await
    }

    /// Positions come from a sequence, in the order transactions insert,
    /// not the order they commit: a reader could see position 11 committed
    /// and move past 10, still to commit. Transactions that write events
    /// take this lock (until they end), so that they commit in the order
    /// of their positions.
    pub(super) async fn serialize(conn: &mut PgConnection) -> sqlx::Result<()> {
        sqlx::query(super::SERIALIZE_POSTGRES)
            .bind(schema::POSTGRES_LOCK)
            .execute(conn)
            .await
            .map(drop)
    }

    pub(super) fn listen(
        pool: &Pool<Postgres>,
        wake: tokio::sync::watch::Sender<u64>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let pool = pool.clone();
        Some(spawn_listening(
            move || {
                let pool = pool.clone();
                async move { sqlx::postgres::PgListener::connect_with(&pool).await }
            },
            wake,
        ))
    }

    /// Listens for the commits of every process, on a connection of its
    /// own that `connect` makes: each `NOTIFY` bumps `wake`, and so does
    /// every reconnection (notifications sent while it was away are lost:
    /// the listeners look).
    pub(super) fn spawn_listening<F, Fut>(
        connect: F,
        wake: tokio::sync::watch::Sender<u64>,
    ) -> tokio::task::JoinHandle<()>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = sqlx::Result<sqlx::postgres::PgListener>> + Send,
    {
        let bump = move || wake.send_modify(|version| *version = version.wrapping_add(1));
        tokio::spawn(async move {
            loop {
                let error = match listen_once(&connect, &bump).await {
                    Ok(never) => match never {},
                    Err(error) => error,
                };
                tracing::warn!(
                    error = %error,
                    "could not listen for other processes' events; polling until it can again",
                );
                bump();
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        })
    }

    async fn listen_once<F, Fut>(
        connect: &F,
        bump: &impl Fn(),
    ) -> sqlx::Result<std::convert::Infallible>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = sqlx::Result<sqlx::postgres::PgListener>>,
    {
        let mut listener = connect().await?;
        listener.listen(super::CHANNEL).await?;
        bump();
        loop {
            // `recv` reconnects by itself after a lost connection, and
            // fails only when it cannot.
            listener.recv().await?;
            bump();
        }
    }

    pub(super) fn insert(_: &PgConnection, values: &str) -> String {
        super::insert_postgres(values)
    }
}

#[cfg(feature = "postgres")]
backend!(
    sqlx::Postgres,
    one_writer = postgres::one_writer,
    schema = postgres::schema,
    lock = postgres::lock,
    checkpoint = postgres::checkpoint,
    begin = postgres::begin,
    serialize = postgres::serialize,
    insert = postgres::insert,
    listen = postgres::listen
);

#[cfg(feature = "any")]
mod any {
    use sqlx::{Any, AnyConnection, Pool, Transaction};

    use super::super::schema;

    fn is_sqlite(pool: &Pool<Any>) -> bool {
        pool.connect_options()
            .database_url
            .scheme()
            .starts_with("sqlite")
    }

    fn is_postgres(conn: &AnyConnection) -> bool {
        conn.backend_name() == "PostgreSQL"
    }

    pub(super) fn one_writer(pool: &Pool<Any>) -> bool {
        is_sqlite(pool)
    }

    pub(super) fn schema(pool: &Pool<Any>) -> &'static str {
        if is_sqlite(pool) {
            schema::SQLITE
        } else {
            schema::POSTGRES
        }
    }

    pub(super) fn lock(pool: &Pool<Any>) -> &'static str {
        if is_sqlite(pool) {
            super::LOCK_SQLITE
        } else {
            super::LOCK_POSTGRES
        }
    }

    pub(super) fn checkpoint(pool: &Pool<Any>) -> &'static str {
        if is_sqlite(pool) {
            super::CHECKPOINT_SQLITE
        } else {
            super::CHECKPOINT_POSTGRES
        }
    }

    pub(super) async fn begin(pool: &Pool<Any>) -> sqlx::Result<Transaction<'static, Any>> {
        if is_sqlite(pool) {
            pool.begin_with("BEGIN IMMEDIATE").await
        } else {
            pool.begin().await
        }
    }

    /// As `postgres::serialize` on PostgreSQL; nothing on SQLite.
    pub(super) async fn serialize(conn: &mut AnyConnection) -> sqlx::Result<()> {
        if is_postgres(conn) {
            sqlx::query(super::SERIALIZE_POSTGRES)
                .bind(schema::POSTGRES_LOCK)
                .execute(conn)
                .await?;
        }
        Ok(())
    }

    pub(super) fn insert(conn: &AnyConnection, values: &str) -> String {
        if is_postgres(conn) {
            super::insert_postgres(values)
        } else {
            super::insert_sqlite(values)
        }
    }

    /// On PostgreSQL with the `postgres` feature, as `postgres::listen`,
    /// through a connection of its own to the pool's URL; else polling.
    #[cfg_attr(not(feature = "postgres"), allow(unused_variables))]
    pub(super) fn listen(
        pool: &Pool<Any>,
        wake: tokio::sync::watch::Sender<u64>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if is_sqlite(pool) {
            return None;
        }
        #[cfg(feature = "postgres")]
        {
            let url = pool.connect_options().database_url.to_string();
            Some(super::postgres::spawn_listening(
                move || {
                    let url = url.clone();
                    async move { sqlx::postgres::PgListener::connect(&url).await }
                },
                wake,
            ))
        }
        #[cfg(not(feature = "postgres"))]
        None
    }
}

#[cfg(feature = "any")]
backend!(
    sqlx::Any,
    one_writer = any::one_writer,
    schema = any::schema,
    lock = any::lock,
    checkpoint = any::checkpoint,
    begin = any::begin,
    serialize = any::serialize,
    insert = any::insert,
    listen = any::listen
);
