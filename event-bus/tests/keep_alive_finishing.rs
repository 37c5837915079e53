//! `Delivery::in_progress` every `progress_interval` while a delivery is
//! held beside a slow finish (a durable source's `terminate`), and on the
//! interval of a delivery retried in place, which may be another.

mod leases;

use std::sync::Arc;
use std::time::Duration;

use event_bus::runner;
use event_bus::{BatchFailure, ListenerOptions, RetryPolicy};
use leases::{Batcher, Item, Sink, Src, Worker, ms, plan, to_end};

const INTERVAL: Duration = Duration::from_secs(1);

fn every_second(_: u64, _: u32) -> Option<Duration> {
    Some(INTERVAL)
}

/// StopAtFirst, no retries: event 1 fails and becomes a dead letter; its
/// `terminate` (a durable source's write) takes 5 s. Event 2, beside it in
/// the batch, is held all along and kept alive meanwhile.
#[tokio::test(start_paused = true)]
async fn stop_at_first_a_slow_terminate_keeps_the_rest_of_the_batch_alive() {
    let mut plan = plan(every_second);
    plan.terminate = Duration::from_secs(5);
    let src = Src::of([Item::Job(1, 1), Item::Job(2, 1)], plan);
    let batcher = Batcher(|seen| {
        let failed = (seen[0].0 == 1).then(|| vec![0]);
        (Duration::ZERO, failed)
    });
    let options = ListenerOptions::new()
        .max_batch(10)
        .batch_failure(BatchFailure::StopAtFirst);
    let report = to_end(runner::run(
        batcher,
        src.clone(),
        Arc::new(Sink::default()),
        options,
    ))
    .await;
    assert_eq!((report.handled, report.dead_lettered), (1, 1));
    src.check(&[1, 2]);
    src.assert_never_silent(2, INTERVAL, "beside a dead letter being terminated");
}

/// Independent, no retries: both events fail and become dead letters; the
/// first's `terminate` takes 5 s while the second waits its turn.
#[tokio::test(start_paused = true)]
async fn independent_a_slow_terminate_keeps_the_other_dead_letters_alive() {
    let mut plan = plan(every_second);
    plan.terminate = Duration::from_secs(5);
    let src = Src::of([Item::Job(1, 1), Item::Job(2, 1)], plan);
    let batcher = Batcher(|seen| (Duration::ZERO, Some((0..seen.len()).collect())));
    let options = ListenerOptions::new().max_batch(10);
    let report = to_end(runner::run(
        batcher,
        src.clone(),
        Arc::new(Sink::default()),
        options,
    ))
    .await;
    assert_eq!(report.dead_lettered, 2);
    src.check(&[1, 2]);
    src.assert_never_silent(2, INTERVAL, "a dead letter waiting for another's terminate");
}

/// Independent, retries: event 1 is out of attempts (a redelivery counted
/// by the source), event 2 is retried in place. Event 2, waiting for its
/// retry, is kept alive through event 1's slow terminate.
#[tokio::test(start_paused = true)]
async fn independent_a_slow_terminate_keeps_the_retried_events_alive() {
    let mut plan = plan(every_second);
    plan.terminate = Duration::from_secs(5);
    let src = Src::of([Item::Job(1, 3), Item::Job(2, 1)], plan);
    let batcher = Batcher(|seen| {
        let failed: Vec<usize> = (0..seen.len())
            .filter(|&i| seen[i].1 < 2 || seen[i].0 == 1)
            .collect();
        (Duration::ZERO, (!failed.is_empty()).then_some(failed))
    });
    let options = ListenerOptions::new().max_batch(10).retry(
        RetryPolicy::exponential(3)
            .initial_backoff(ms(100))
            .jitter(false),
    );
    let report = to_end(runner::run(
        batcher,
        src.clone(),
        Arc::new(Sink::default()),
        options,
    ))
    .await;
    assert_eq!((report.handled, report.dead_lettered), (1, 1));
    src.check(&[1, 2]);
    src.assert_never_silent(
        2,
        INTERVAL,
        "a retried event waiting for a dead letter's terminate",
    );
}

/// Attempt 1 of the delivery has a long interval (10 s), the delivery the
/// source keeps in place for attempt 2 a short one (1 s): the 5 s delay is
/// kept alive on the short one.
fn shorter_after_retry(_: u64, attempt: u32) -> Option<Duration> {
    Some(if attempt == 1 {
        Duration::from_secs(10)
    } else {
        INTERVAL
    })
}

fn fails_first(_: u64, attempt: u32) -> (Duration, bool) {
    (Duration::ZERO, attempt == 1)
}

fn five_second_retry() -> RetryPolicy {
    RetryPolicy::exponential(2)
        .initial_backoff(Duration::from_secs(5))
        .max_backoff(Duration::from_secs(5))
        .jitter(false)
}

async fn in_place_with_a_shorter_interval(concurrency: usize) {
    let src = Src::of([Item::Job(1, 1)], plan(shorter_after_retry));
    let options = ListenerOptions::new()
        .retry(five_second_retry())
        .concurrency(concurrency);
    let report = to_end(runner::run(
        Worker(fails_first),
        src.clone(),
        Arc::new(Sink::default()),
        options,
    ))
    .await;
    assert_eq!(report.handled, 1);
    src.check(&[1]);
    src.assert_never_silent(1, INTERVAL, "an in-place retry with a shorter interval");
}

#[tokio::test(start_paused = true)]
async fn an_in_place_retry_with_a_shorter_interval_concurrency_1() {
    in_place_with_a_shorter_interval(1).await;
}

#[tokio::test(start_paused = true)]
async fn an_in_place_retry_with_a_shorter_interval_concurrency_2() {
    in_place_with_a_shorter_interval(2).await;
}

/// The same when attempt 1 does not expire at all (no interval, so no
/// clock) and the delivery kept in place does.
fn expires_after_retry(_: u64, attempt: u32) -> Option<Duration> {
    (attempt > 1).then_some(INTERVAL)
}

#[tokio::test(start_paused = true)]
async fn an_in_place_retry_that_starts_to_expire() {
    let src = Src::of([Item::Job(1, 1)], plan(expires_after_retry));
    let options = ListenerOptions::new().retry(five_second_retry());
    let report = to_end(runner::run(
        Worker(fails_first),
        src.clone(),
        Arc::new(Sink::default()),
        options,
    ))
    .await;
    assert_eq!(report.handled, 1);
    src.check(&[1]);
    src.assert_never_silent(1, INTERVAL, "an in-place retry that starts to expire");
}

/// The batch analogue: the failed events kept in place for their next
/// attempt have a shorter interval than the batch's clock.
#[tokio::test(start_paused = true)]
async fn a_batch_retried_in_place_with_a_shorter_interval() {
    let src = Src::of(
        [Item::Job(1, 1), Item::Job(2, 1)],
        plan(shorter_after_retry),
    );
    let batcher = Batcher(|seen| (Duration::ZERO, (seen[0].1 == 1).then(|| vec![0, 1])));
    let options = ListenerOptions::new()
        .max_batch(10)
        .retry(five_second_retry());
    let report = to_end(runner::run(
        batcher,
        src.clone(),
        Arc::new(Sink::default()),
        options,
    ))
    .await;
    assert_eq!(report.handled, 2);
    src.check(&[1, 2]);
    src.assert_never_silent(
        1,
        INTERVAL,
        "a batch retried in place with a shorter interval",
    );
}
