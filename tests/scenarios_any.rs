//! The scenario suite on the durable tier over `sqlx::Any`, on SQLite (a
//! file per scenario, in `cargo test`): the store picks its dialect from
//! the pool's URL. Run it with `cargo test --test scenarios_any`.

mod scenarios;
mod sql_tier;

use sql_tier::{Db, SqlTier};
use sqlx::any::AnyPoolOptions;
use sqlx::{Any, Pool};

impl Db for Any {
    const NAME: &'static str = "Any (SQLite)";

    async fn fresh(scenario: &'static str) -> (Pool<Self>, Box<dyn Send + Sync>) {
        sqlx::any::install_default_drivers();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join(format!("{scenario}.db"));
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let pool = AnyPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .expect("open the database");
        sqlx::query("PRAGMA journal_mode = WAL")
            .execute(&pool)
            .await
            .expect("WAL");
        (pool, Box::new(dir))
    }

    sql_tier::raw_rows!();
}

scenarios::scenarios!(SqlTier<Any>);
