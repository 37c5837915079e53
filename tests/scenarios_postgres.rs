//! The scenario suite on the durable tier over PostgreSQL: a database of
//! its own per scenario on the server at `EVENT_BUS_TEST_POSTGRES`
//! (default `postgres://postgres@127.0.0.1:5432`), dropped after it. The
//! tests are ignored in a plain `cargo test`; `.ci/run` starts the server
//! and runs them: `cargo test --test scenarios_postgres -- --include-ignored`.

mod scenarios;
mod sql_tier;

use std::sync::atomic::{AtomicU64, Ordering};

use sql_tier::{Db, SqlTier};
use sqlx::{Executor, Pool, Postgres};

fn server() -> String {
    std::env::var("EVENT_BUS_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// Drops its database when the scenario's tier is dropped.
struct Database(String);

impl Drop for Database {
    fn drop(&mut self) {
        let name = self.0.clone();
        // A runtime of its own: the scenario's may be shutting down.
        let dropped = std::thread::spawn(move || -> sqlx::Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async {
                let admin = sqlx::PgPool::connect(&format!("{}/postgres", server())).await?;
                // FORCE: the scenario's connections may still be open.
                admin
                    .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                    .await?;
                Ok(())
            })
        });
        if let Ok(Err(error)) = dropped.join() {
            eprintln!("could not drop the scenario database {}: {error}", self.0);
        }
    }
}

impl Db for Postgres {
    const NAME: &'static str = "PostgreSQL";

    async fn fresh(_scenario: &'static str) -> (Pool<Self>, Box<dyn Send + Sync>) {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "event_bus_scenario_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let admin = sqlx::PgPool::connect(&format!("{}/postgres", server()))
            .await
            .expect("connect to PostgreSQL");
        admin
            .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
            .await
            .expect("drop a stale scenario database");
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("create the scenario database");
        admin.close().await;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .connect(&format!("{}/{name}", server()))
            .await
            .expect("connect to the scenario database");
        (pool, Box::new(Database(name)))
    }

    sql_tier::raw_rows!();
}

scenarios::scenarios!(
    SqlTier<Postgres>,
    #[ignore = "needs PostgreSQL on 127.0.0.1:5432 (run by .ci/run)"]
);
