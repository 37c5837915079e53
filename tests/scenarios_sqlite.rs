//! The scenario suite on the durable tier over SQLite: a database file of
//! its own per scenario, in a temporary directory. Run it with
//! `cargo test --test scenarios_sqlite`.

mod scenarios;
mod sql_tier;

use std::str::FromStr;

use sql_tier::{Db, SqlTier};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Pool, Sqlite};

impl Db for Sqlite {
    const NAME: &'static str = "SQLite";

    async fn fresh(scenario: &'static str) -> (Pool<Self>, Box<dyn Send + Sync>) {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join(format!("{scenario}.db"));
        let options = SqliteConnectOptions::from_str("sqlite://")
            .expect("sqlite options")
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .expect("open the database");
        (pool, Box::new(dir))
    }

    async fn insert_raw(pool: &Pool<Self>, id: String, name: String, bytes: Vec<u8>) {
        sqlx::query(
            "INSERT INTO event_bus_events (id, name, payload, recorded_at) VALUES ($1, $2, $3, 0)",
        )
        .bind(id)
        .bind(name)
        .bind(bytes)
        .execute(pool)
        .await
        .expect("insert a raw event");
    }

    async fn payloads(pool: &Pool<Self>, positions: Vec<u64>) -> Vec<Vec<u8>> {
        let mut payloads = Vec::with_capacity(positions.len());
        for position in positions {
            let payload: Vec<u8> =
                sqlx::query_scalar("SELECT payload FROM event_bus_events WHERE position = $1")
                    .bind(position as i64)
                    .fetch_one(pool)
                    .await
                    .expect("read a payload");
            payloads.push(payload);
        }
        payloads
    }
}

scenarios::scenarios!(SqlTier<Sqlite>);
