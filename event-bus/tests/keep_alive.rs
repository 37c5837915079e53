//! A zero [`progress_interval`](event_bus::runner::Delivery::progress_interval)
//! is taken as `MIN_PROGRESS_INTERVAL`: the run neither panics nor loses
//! the delivery.

mod scripted;

use std::sync::Arc;
use std::time::Duration;

use event_bus::ListenerOptions;
use event_bus::runner;
use scripted::{Letters, Mode, Script, Worker};

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
    let report = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("the run ends")
        .expect("the run does not panic");
    assert_eq!(report.handled, 1);
    script.check_exactly_once(&[1]);
}
