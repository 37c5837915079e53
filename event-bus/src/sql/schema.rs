//! The durable tier's tables, as [`Store::new`](super::Store::new) creates
//! them (idempotently: every statement is `IF NOT EXISTS`).
//!
//! - `event_bus_events`: the log. One row per committed event, numbered by
//!   `position` in commit order; `payload` is the event and its metadata in
//!   the [`JsonCodec`](crate::codec::JsonCodec) format; `id` is the event's
//!   id (unique: an event is in the log once).
//! - `event_bus_listeners`: one row per durable listener (per group of
//!   processes running it). `head` is the last position it has looked at:
//!   every event of its kinds up to `head` is finished, in a claim, or has
//!   a delivery row. `checkpoint` is the last position below which
//!   everything is finished (handled or dead).
//! - `event_bus_claims`: what a process took to handle, as ranges of the
//!   log: the listener's events after `done_to` up to `up_to` (those
//!   without a delivery row) are `owner`'s until `lease_until`, which the
//!   process renews while it lives; `attempts` is the attempt they are
//!   handed out for, `unfinished` how many of them are not yet finished.
//!   A handled event writes nothing of its own: its claim's `done_to`
//!   moves past it, and the claim goes once all of it is finished. A
//!   claim whose lease expired (its process died) is taken over whole,
//!   its events handed out again as the next attempt.
//! - `event_bus_deliveries`: one row per (listener, position) that failed
//!   or was given back, which its claim no longer covers: `leased` by a
//!   process (retried in place by `owner`, until `lease_until`), `pending`
//!   (to be taken again: given back, abandoned, or redriven), or `dead`
//!   (its last attempt failed: `last_error`, `failed_at`; a dead delivery
//!   discarded while its claim is still open stays, owned by
//!   `discarded`, until [`prune`](super::Store::prune) finds the claim
//!   gone). `attempts`
//!   counts the attempts handed out; `next_try_at` is when a retry is due.
//!   Times are milliseconds since the Unix epoch, by the clock of the
//!   process that wrote them.
//! - `event_bus_handled`: the ids of events a listener's handler applied
//!   in its own transaction ([`first_time`](super::first_time)).
//! - `event_bus_schema`: the schema's version.
//!
//! The same SQL, by hand, for a migration tool of one's own:
//! [`SQLITE`] and [`POSTGRES`].

/// The tables on SQLite.
pub const SQLITE: &str = "
CREATE TABLE IF NOT EXISTS event_bus_schema (
    version INTEGER NOT NULL
);
INSERT INTO event_bus_schema (version) SELECT 2 WHERE NOT EXISTS (SELECT 1 FROM event_bus_schema);
UPDATE event_bus_schema SET version = 2 WHERE version < 2;
CREATE TABLE IF NOT EXISTS event_bus_events (
    position    INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT    NOT NULL UNIQUE,
    name        TEXT    NOT NULL,
    payload     BLOB    NOT NULL,
    recorded_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS event_bus_listeners (
    listener   TEXT    PRIMARY KEY,
    head       INTEGER NOT NULL,
    checkpoint INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS event_bus_deliveries (
    listener    TEXT    NOT NULL,
    position    INTEGER NOT NULL,
    state       TEXT    NOT NULL CHECK (state IN ('pending', 'leased', 'dead')),
    attempts    INTEGER NOT NULL,
    owner       TEXT,
    lease_until INTEGER NOT NULL,
    next_try_at INTEGER NOT NULL,
    last_error  TEXT,
    failed_at   INTEGER,
    PRIMARY KEY (listener, position)
);
CREATE INDEX IF NOT EXISTS event_bus_deliveries_position ON event_bus_deliveries (position);
CREATE TABLE IF NOT EXISTS event_bus_claims (
    listener    TEXT    NOT NULL,
    up_to       INTEGER NOT NULL,
    done_to     INTEGER NOT NULL,
    unfinished  INTEGER NOT NULL,
    attempts    INTEGER NOT NULL,
    owner       TEXT    NOT NULL,
    lease_until INTEGER NOT NULL,
    PRIMARY KEY (listener, up_to)
);
CREATE TABLE IF NOT EXISTS event_bus_handled (
    listener   TEXT    NOT NULL,
    event_id   TEXT    NOT NULL,
    handled_at INTEGER NOT NULL,
    PRIMARY KEY (listener, event_id)
);
";

/// The tables on PostgreSQL.
pub const POSTGRES: &str = "
CREATE TABLE IF NOT EXISTS event_bus_schema (
    version INTEGER NOT NULL
);
INSERT INTO event_bus_schema (version) SELECT 2 WHERE NOT EXISTS (SELECT 1 FROM event_bus_schema);
UPDATE event_bus_schema SET version = 2 WHERE version < 2;
CREATE TABLE IF NOT EXISTS event_bus_events (
    position    BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id          TEXT    NOT NULL UNIQUE,
    name        TEXT    NOT NULL,
    payload     BYTEA   NOT NULL,
    recorded_at BIGINT  NOT NULL
);
CREATE TABLE IF NOT EXISTS event_bus_listeners (
    listener   TEXT    PRIMARY KEY,
    head       BIGINT  NOT NULL,
    checkpoint BIGINT  NOT NULL
);
CREATE TABLE IF NOT EXISTS event_bus_deliveries (
    listener    TEXT    NOT NULL,
    position    BIGINT  NOT NULL,
    state       TEXT    NOT NULL CHECK (state IN ('pending', 'leased', 'dead')),
    attempts    BIGINT  NOT NULL,
    owner       TEXT,
    lease_until BIGINT  NOT NULL,
    next_try_at BIGINT  NOT NULL,
    last_error  TEXT,
    failed_at   BIGINT,
    PRIMARY KEY (listener, position)
);
CREATE INDEX IF NOT EXISTS event_bus_deliveries_position ON event_bus_deliveries (position);
CREATE TABLE IF NOT EXISTS event_bus_claims (
    listener    TEXT    NOT NULL,
    up_to       BIGINT  NOT NULL,
    done_to     BIGINT  NOT NULL,
    unfinished  BIGINT  NOT NULL,
    attempts    BIGINT  NOT NULL,
    owner       TEXT    NOT NULL,
    lease_until BIGINT  NOT NULL,
    PRIMARY KEY (listener, up_to)
);
CREATE TABLE IF NOT EXISTS event_bus_handled (
    listener   TEXT    NOT NULL,
    event_id   TEXT    NOT NULL,
    handled_at BIGINT  NOT NULL,
    PRIMARY KEY (listener, event_id)
);
";

/// The advisory lock key PostgreSQL transactions take to write events (and
/// to create the tables): "evbus" in ASCII.
#[cfg(any(feature = "postgres", feature = "any"))]
pub(crate) const POSTGRES_LOCK: i64 = 0x65_76_62_75_73;
