//! "The runner ... finishes every delivery exactly once"
//! (event-bus/src/runner/mod.rs, module docs), over a source that keeps
//! retries in place and one that takes them back, at concurrency 1 and
//! above, with failures and panics in making, polling and dropping the
//! handler's future; and the counters' identities after the run.

mod scripted;

use event_bus::BatchFailure;
use scripted::Mode;
use scripted::matrix::{batches, one_by_one};

#[tokio::test(start_paused = true)]
async fn exactly_once_in_place_concurrency_1() {
    _ = one_by_one(Mode::InPlace, 1).await;
}
#[tokio::test(start_paused = true)]
async fn exactly_once_in_place_concurrency_3() {
    _ = one_by_one(Mode::InPlace, 3).await;
}
#[tokio::test(start_paused = true)]
async fn exactly_once_redelivered_concurrency_1() {
    _ = one_by_one(Mode::Redelivered, 1).await;
}
#[tokio::test(start_paused = true)]
async fn exactly_once_redelivered_concurrency_3() {
    _ = one_by_one(Mode::Redelivered, 3).await;
}
#[tokio::test(start_paused = true)]
async fn batches_independent_in_place() {
    for concurrency in [1, 3] {
        _ = batches(Mode::InPlace, concurrency, BatchFailure::Independent, 4).await;
    }
}
#[tokio::test(start_paused = true)]
async fn batches_independent_redelivered() {
    for concurrency in [1, 3] {
        _ = batches(Mode::Redelivered, concurrency, BatchFailure::Independent, 4).await;
    }
}
#[tokio::test(start_paused = true)]
async fn batches_stop_at_first_in_place() {
    for concurrency in [1, 3] {
        _ = batches(Mode::InPlace, concurrency, BatchFailure::StopAtFirst, 4).await;
    }
}
#[tokio::test(start_paused = true)]
async fn batches_stop_at_first_redelivered() {
    for concurrency in [1, 3] {
        _ = batches(Mode::Redelivered, concurrency, BatchFailure::StopAtFirst, 4).await;
    }
}
