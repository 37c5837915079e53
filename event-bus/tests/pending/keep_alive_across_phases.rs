//! NOT COMPILED (no test target): these tests fail on the current runner
//! and are kept here for the change that fixes them (issue #12).
//!
//! `Delivery::in_progress` promises a call every `progress_interval` while
//! the runner holds a delivery. The runner keeps a delivery alive only
//! within one phase at a time (a handler attempt, an in-place retry's
//! delay), each with a fresh timer, and not at all while a batch is being
//! collected or a dead letter is recorded; phases shorter than the interval
//! add up to a silence longer than a lease. The fix: one keep-alive clock
//! per held unit, from the yield to the finish, polled at every await that
//! holds it. Move this file to `event-bus/tests/` with that fix (it uses
//! `mod scripted;`, which is `event-bus/tests/scripted/`).

#[path = "../scripted/mod.rs"]
mod scripted;

use std::sync::Arc;
use std::time::Duration;

use event_bus::runner;
use event_bus::{ListenerOptions, RetryPolicy};
use scripted::{BatchWorker, Letters, Mode, Script, Worker};

const INTERVAL: Duration = Duration::from_secs(1);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Three attempts, 900 ms apart, without jitter.
fn three_attempts_900ms_apart() -> RetryPolicy {
    RetryPolicy::exponential(3)
        .initial_backoff(ms(900))
        .max_backoff(ms(900))
        .jitter(false)
}

async fn held_across_attempts(concurrency: usize) {
    let script = Script::of([1], Mode::InPlace, Some(INTERVAL));
    let worker = Worker {
        work: ms(900),
        fail_while: 2,
        ..Worker::default()
    };
    let options = ListenerOptions::new()
        .retry(three_attempts_900ms_apart())
        .concurrency(concurrency);
    let report = tokio::time::timeout(
        Duration::from_secs(600),
        runner::run(
            worker,
            script.clone(),
            Arc::new(Letters::default()),
            options,
        ),
    )
    .await
    .expect("the run ends");
    assert_eq!(report.handled, 1);
    script.check_exactly_once(&[1]);
    // Held from 0 s to 4.5 s: attempt (0.9 s), delay (0.9 s), attempt,
    // delay, attempt. A lease of 1.5 x the interval has long expired.
    let silence = script.longest_silence(1);
    assert!(
        silence <= INTERVAL,
        "the delivery was held {silence:?} without one in_progress (interval {INTERVAL:?}): {:#?}",
        script.log()
    );
}

#[tokio::test(start_paused = true)]
async fn keep_alive_across_attempts_and_in_place_delays_concurrency_1() {
    held_across_attempts(1).await;
}

#[tokio::test(start_paused = true)]
async fn keep_alive_across_attempts_and_in_place_delays_concurrency_2() {
    held_across_attempts(2).await;
}

#[tokio::test(start_paused = true)]
async fn keep_alive_across_batch_attempts_and_in_place_delays() {
    let script = Script::of([1, 2], Mode::InPlace, Some(INTERVAL));
    let worker = BatchWorker {
        work: ms(900),
        fail_while: 2,
        ..BatchWorker::default()
    };
    let options = ListenerOptions::new().retry(three_attempts_900ms_apart());
    let report = tokio::time::timeout(
        Duration::from_secs(600),
        runner::run(
            worker,
            script.clone(),
            Arc::new(Letters::default()),
            options,
        ),
    )
    .await
    .expect("the run ends");
    assert_eq!(report.handled, 2);
    script.check_exactly_once(&[1, 2]);
    let silence = script.longest_silence(1);
    assert!(
        silence <= INTERVAL,
        "the delivery was held {silence:?} without one in_progress: {:#?}",
        script.log()
    );
}

/// A batch waiting `max_wait` for more events holds what it collected.
#[tokio::test(start_paused = true)]
async fn keep_alive_while_a_batch_is_collected() {
    let script = Script::new(Mode::InPlace, Some(INTERVAL));
    script.push(1);
    let worker = BatchWorker {
        // The handler closes the source, so the run ends after this batch.
        closes: Some(script.clone()),
        ..BatchWorker::default()
    };
    let options = ListenerOptions::new()
        .max_batch(10)
        .max_wait(Duration::from_secs(5));
    let report = tokio::time::timeout(
        Duration::from_secs(600),
        runner::run(
            worker,
            script.clone(),
            Arc::new(Letters::default()),
            options,
        ),
    )
    .await
    .expect("the run ends");
    assert_eq!(report.handled, 1);
    script.check_exactly_once(&[1]);
    let silence = script.longest_silence(1);
    assert!(
        silence <= INTERVAL,
        "the collected delivery was held {silence:?} without one in_progress: {:#?}",
        script.log()
    );
}

/// A dead letter's record (a durable sink's write) holds the delivery until
/// it is terminated.
#[tokio::test(start_paused = true)]
async fn keep_alive_while_the_dead_letter_is_recorded() {
    let script = Script::of([1], Mode::InPlace, Some(INTERVAL));
    let worker = Worker {
        fail_while: u32::MAX,
        ..Worker::default()
    };
    let letters = Arc::new(Letters {
        slow: Some(Duration::from_secs(5)),
        ..Letters::default()
    });
    let report = tokio::time::timeout(
        Duration::from_secs(600),
        runner::run(worker, script.clone(), letters, ListenerOptions::new()),
    )
    .await
    .expect("the run ends");
    assert_eq!(report.dead_lettered, 1);
    script.check_exactly_once(&[1]);
    let silence = script.longest_silence(1);
    assert!(
        silence <= INTERVAL,
        "the delivery was held {silence:?} without one in_progress: {:#?}",
        script.log()
    );
}
