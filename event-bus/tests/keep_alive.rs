//! `Delivery::in_progress` is called every `progress_interval` while the
//! runner holds a delivery, through every phase: attempts, in-place retry
//! delays, a batch being collected, a dead letter being recorded. (Before,
//! each phase had its own timer, and phases shorter than the interval
//! added up to a silence longer than a lease.) A zero interval is taken as
//! `MIN_PROGRESS_INTERVAL`.

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

/// Runs to its end, within a deadline on the paused clock.
async fn to_end<F: std::future::Future>(run: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("the run ends")
}

/// `id` was never held longer than the interval without an `in_progress`.
fn assert_never_silent(script: &Script, id: u64, what: &str) {
    let silence = script.longest_silence(id);
    assert!(
        silence <= INTERVAL,
        "{what}: held {silence:?} without one in_progress (interval {INTERVAL:?}): {:#?}",
        script.log()
    );
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
    let report = to_end(runner::run(
        worker,
        script.clone(),
        Arc::new(Letters::default()),
        options,
    ))
    .await;
    assert_eq!(report.handled, 1);
    script.check_exactly_once(&[1]);
    // Held from 0 s to 4.5 s: attempt (0.9 s), delay (0.9 s), attempt,
    // delay, attempt. A lease of 1.5 x the interval has long expired.
    assert_never_silent(&script, 1, "a delivery across attempts and delays");
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
    let report = to_end(runner::run(
        worker,
        script.clone(),
        Arc::new(Letters::default()),
        options,
    ))
    .await;
    assert_eq!(report.handled, 2);
    script.check_exactly_once(&[1, 2]);
    assert_never_silent(&script, 1, "a batch across attempts and delays");
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
    let report = to_end(runner::run(
        worker,
        script.clone(),
        Arc::new(Letters::default()),
        options,
    ))
    .await;
    assert_eq!(report.handled, 1);
    script.check_exactly_once(&[1]);
    assert_never_silent(&script, 1, "a batch being collected");
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
    let report = to_end(runner::run(
        worker,
        script.clone(),
        letters,
        ListenerOptions::new(),
    ))
    .await;
    assert_eq!(report.dead_lettered, 1);
    script.check_exactly_once(&[1]);
    assert_never_silent(&script, 1, "a delivery whose dead letter is recorded");
}

/// A delivery whose `progress_interval` is zero (a lease configured to 0,
/// a third of a lease rounded down). Before, `tokio::time::interval_at`
/// panicked on the zero period, outside the handler's panic catch.
#[tokio::test(start_paused = true)]
async fn a_zero_progress_interval_does_not_crash_the_run() {
    let script = Script::of([1], Mode::InPlace, Some(Duration::ZERO));
    let run = tokio::spawn(runner::run(
        Worker::default(),
        script.clone(),
        Arc::new(Letters::default()),
        ListenerOptions::new(),
    ));
    let report = to_end(run).await.expect("the run does not panic");
    assert_eq!(report.handled, 1);
    script.check_exactly_once(&[1]);
}
