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

    sql_tier::raw_rows!();
}

scenarios::scenarios!(SqlTier<Sqlite>);
