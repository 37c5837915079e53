//! The keep-alive clock with mixed intervals, spans, phases ending on a
//! tick, batches collected and finished slowly, and a source's own slow
//! `retry` (which the runner cannot keep alive: it consumes the delivery).

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

/// 1 s, 300 ms or none, by id.
fn mixed(id: u64, _: u32) -> Option<Duration> {
    match id % 3 {
        0 => Some(INTERVAL),
        1 => Some(ms(300)),
        _ => None,
    }
}

fn bound(id: u64) -> Duration {
    mixed(id, 1).unwrap_or(Duration::MAX)
}

fn retry_policy() -> RetryPolicy {
    RetryPolicy::exponential(3)
        .initial_backoff(ms(700))
        .max_backoff(ms(700))
        .jitter(false)
}

async fn one_by_one_mixed(concurrency: usize) {
    let ids: Vec<u64> = (1..=9).collect();
    let src = Src::of(ids.iter().map(|&id| Item::Job(id, 1)), plan(mixed));
    // 1 s or 2.5 s of work per attempt; two failures per odd id; id 9
    // dead-lettered through a slow record.
    fn act(id: u64, attempt: u32) -> (Duration, bool) {
        let fail = (id % 2 == 1 && attempt < 3) || id == 9;
        (ms(if id % 4 == 0 { 1000 } else { 2500 }), fail)
    }
    let sink = Arc::new(Sink {
        record: Duration::from_secs(3),
        ..Sink::default()
    });
    let options = ListenerOptions::new()
        .retry(retry_policy())
        .concurrency(concurrency);
    let report = to_end(runner::run(Worker(act), src.clone(), sink, options)).await;
    assert_eq!((report.handled, report.dead_lettered), (8, 1));
    src.check(&ids);
    for id in ids {
        src.assert_never_silent(id, bound(id), "one by one, mixed intervals");
    }
}

#[tokio::test(start_paused = true)]
async fn mixed_intervals_concurrency_1() {
    one_by_one_mixed(1).await;
}

#[tokio::test(start_paused = true)]
async fn mixed_intervals_concurrency_3() {
    one_by_one_mixed(3).await;
}

/// A subscriber that enables every span: the `attempt_all(..).instrument`
/// path instead of the inlined fast path.
struct Everything;

impl tracing::Subscriber for Everything {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn mixed_intervals_in_spans_concurrency_1() {
    let _guard = tracing::subscriber::set_default(Everything);
    one_by_one_mixed(1).await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn mixed_intervals_in_spans_concurrency_3() {
    let _guard = tracing::subscriber::set_default(Everything);
    one_by_one_mixed(3).await;
}

/// A handler that takes exactly the interval, retried with a delay of
/// exactly the interval: every phase ends on a tick.
#[tokio::test(start_paused = true)]
async fn phases_ending_exactly_on_ticks() {
    let src = Src::of([Item::Job(1, 1), Item::Job(2, 1)], plan(every_second));
    fn act(_: u64, attempt: u32) -> (Duration, bool) {
        (INTERVAL, attempt < 3)
    }
    let options = ListenerOptions::new().retry(
        RetryPolicy::exponential(3)
            .initial_backoff(INTERVAL)
            .max_backoff(INTERVAL)
            .jitter(false),
    );
    let report = to_end(runner::run(
        Worker(act),
        src.clone(),
        Arc::new(Sink::default()),
        options,
    ))
    .await;
    assert_eq!(report.handled, 2);
    src.check(&[1, 2]);
    src.assert_never_silent(1, INTERVAL, "phases on ticks");
    src.assert_never_silent(
        2,
        INTERVAL,
        "phases on ticks (waiting at concurrency 1 is not held)",
    );
}

/// A batch being collected: a 1 s delivery first, a 300 ms one joining
/// later, then a slow undecodable record (the batch waits for it), then a
/// batch of two intervals handled through slow acks.
#[tokio::test(start_paused = true)]
async fn a_batch_collected_with_mixed_intervals_and_a_slow_undecodable() {
    let mut plan = plan(mixed);
    plan.ack = ms(800);
    let src = Src::new(plan);
    src.push(Item::Job(3, 1));
    let feeder = src.clone();
    let feed = async move {
        tokio::time::sleep(ms(2500)).await;
        feeder.push(Item::Job(1, 1));
        tokio::time::sleep(ms(2500)).await;
        feeder.push(Item::Undecodable);
        feeder.close();
    };
    let sink = Arc::new(Sink {
        undecodable: Duration::from_secs(4),
        ..Sink::default()
    });
    let options = ListenerOptions::new()
        .max_batch(10)
        .max_wait(Duration::from_secs(60));
    let batcher = Batcher(|_| (ms(2500), None));
    let (report, ()) =
        to_end(async { tokio::join!(runner::run(batcher, src.clone(), sink, options), feed) })
            .await;
    assert_eq!((report.handled, report.dead_lettered), (2, 1));
    src.check(&[1, 3]);
    src.assert_never_silent(3, INTERVAL, "first of a batch");
    src.assert_never_silent(1, ms(300), "joined a batch with a shorter interval");
}

/// StopAtFirst, the first event retried and taken back by the source: the
/// events after it are released, each release slow.
#[tokio::test(start_paused = true)]
async fn stop_at_first_redelivered_then_slow_releases() {
    let mut plan = plan(every_second);
    plan.redeliver = true;
    plan.release = ms(1700);
    plan.retry = ms(1700);
    let src = Src::of((1..=4).map(|id| Item::Job(id, 1)), plan);
    let batcher = Batcher(|seen| {
        let failed = (seen[0] == (1, 1)).then(|| vec![0]);
        (ms(300), failed)
    });
    let options = ListenerOptions::new()
        .max_batch(10)
        .batch_failure(BatchFailure::StopAtFirst)
        .retry(retry_policy());
    let report = to_end(runner::run(
        batcher,
        src.clone(),
        Arc::new(Sink::default()),
        options,
    ))
    .await;
    assert_eq!(report.handled, 4);
    src.check(&[1, 2, 3, 4]);
    for id in 1..=4 {
        src.assert_never_silent(id, INTERVAL, "released behind a redelivered event");
    }
}

/// Independent: the handled events acked slowly while the failed ones
/// wait; their retries (in place) slow too; then a dead letter with a slow
/// record.
#[tokio::test(start_paused = true)]
async fn independent_slow_acks_and_retries() {
    let mut plan = plan(mixed);
    plan.ack = ms(1300);
    plan.retry = ms(1300);
    let src = Src::of((1..=6).map(|id| Item::Job(id, 1)), plan);
    let batcher = Batcher(|seen| {
        let failed: Vec<usize> = (0..seen.len())
            .filter(|&i| seen[i].0 % 2 == 0 && (seen[i].1 < 2 || seen[i].0 == 6))
            .collect();
        (ms(400), (!failed.is_empty()).then_some(failed))
    });
    let sink = Arc::new(Sink {
        record: Duration::from_secs(3),
        ..Sink::default()
    });
    let options = ListenerOptions::new().max_batch(10).retry(retry_policy());
    let report = to_end(runner::run(batcher, src.clone(), sink, options)).await;
    assert_eq!((report.handled, report.dead_lettered), (5, 1));
    src.check(&[1, 2, 3, 4, 5, 6]);
    for id in 1..=6 {
        src.assert_never_silent(id, bound(id), "independent, slow acks and retries");
    }
}

/// Batches at concurrency 3 with mixed intervals: one collected while
/// others are handled.
#[tokio::test(start_paused = true)]
async fn batches_concurrency_3_mixed() {
    let src = Src::new(plan(mixed));
    let feeder = src.clone();
    let feed = async move {
        for id in 1..=12 {
            feeder.push(Item::Job(id, 1));
            tokio::time::sleep(ms(450)).await;
        }
        feeder.close();
    };
    let batcher = Batcher(|seen| {
        let failed: Vec<usize> = (0..seen.len())
            .filter(|&i| seen[i].1 == 1 && seen[i].0 % 5 == 0)
            .collect();
        (ms(2100), (!failed.is_empty()).then_some(failed))
    });
    let options = ListenerOptions::new()
        .max_batch(3)
        .max_wait(Duration::from_secs(3))
        .concurrency(3)
        .retry(retry_policy());
    let (report, ()) = to_end(async {
        tokio::join!(
            runner::run(batcher, src.clone(), Arc::new(Sink::default()), options),
            feed
        )
    })
    .await;
    assert_eq!(report.handled, 12);
    let ids: Vec<u64> = (1..=12).collect();
    src.check(&ids);
    for id in ids {
        src.assert_never_silent(id, bound(id), "batches at concurrency 3");
    }
}

/// Documentation probe: a source's slow `retry` (kept in place after a
/// 5 s write). The delivery is consumed by `retry(self)`, so the runner
/// cannot tell it; counting that call, it is held 5 s without in_progress.
/// "From the source's yield to the finish" reads as if it were covered.
#[tokio::test(start_paused = true)]
async fn a_slow_in_place_retry_call_is_the_sources_own() {
    let mut plan = plan(every_second);
    plan.retry = Duration::from_secs(5);
    let src = Src::of([Item::Job(1, 1)], plan);
    fn act(_: u64, attempt: u32) -> (Duration, bool) {
        (Duration::ZERO, attempt == 1)
    }
    let options = ListenerOptions::new().retry(retry_policy());
    let report = to_end(runner::run(
        Worker(act),
        src.clone(),
        Arc::new(Sink::default()),
        options,
    ))
    .await;
    assert_eq!(report.handled, 1);
    src.check(&[1]);
    // Not counting its own call: kept alive.
    src.assert_never_silent(1, INTERVAL, "a slow in-place retry");
    // Counting it: the 5 s of the call.
    assert_eq!(src.longest_silence(1, true), Duration::from_secs(5));
}
