//! A listener takes part in tokio's cooperative budget: it yields even when
//! its handler never waits, so other tasks run, and `abort` and the
//! `shutdown` deadline stop it between events, for good.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use event_bus::{
    Envelope, EventBus, HandlerError, Listener, ListenerHandle, ListenerOptions, ListenerReport,
    ShutdownReport,
};
use support::{DEADLINE, TestEvent, emit_until_stopped, until, within};

/// A handler that never returns `Pending`: it works for `spin` on the CPU
/// and is done.
struct NeverWaits {
    spin: Duration,
}

impl Listener<TestEvent> for NeverWaits {
    async fn handle(
        &self,
        _: Arc<Envelope<TestEvent>>,
        _: event_bus::Meta,
    ) -> Result<(), HandlerError> {
        let started = Instant::now();
        while started.elapsed() < self.spin {
            std::hint::spin_loop();
        }
        Ok(())
    }
}

/// Enough room that nothing is dropped: every event stays ready.
const ROOMY: usize = 1 << 17;

/// A tokio mpsc loop yields after 128 to 256 messages.
const BUDGET: u64 = 1_024;

/// A bus with `events` ready for one [`NeverWaits`] listener that works
/// `spin` on each, with room for them all.
fn flooded(spin: Duration, events: u64) -> (EventBus<TestEvent>, ListenerHandle<TestEvent>) {
    let bus = EventBus::new();
    let listener = bus.spawn_with(NeverWaits { spin }, ListenerOptions::new().capacity(ROOMY));
    for i in 0..events {
        bus.emit(TestEvent::A(i));
    }
    (bus, listener)
}

/// What `shutdown(deadline)` of a [`flooded`] bus did: how long it took,
/// its report, and the listener's part of it. Returns once the stopped
/// listener has ended.
async fn shut_down(
    bus: &EventBus<TestEvent>,
    listener: &ListenerHandle<TestEvent>,
    deadline: Duration,
) -> (Duration, ShutdownReport, ListenerReport) {
    let started = Instant::now();
    let report = bus.shutdown(deadline).await;
    let took = started.elapsed();
    let reported = report.listener("NeverWaits").unwrap().clone();
    within("the stopped listener to end", listener.finished()).await;
    (took, report, reported)
}

#[tokio::test(flavor = "current_thread")]
async fn a_listener_whose_handler_never_waits_lets_other_tasks_run() {
    const EVENTS: u64 = 20_000;
    let (bus, listener) = flooded(Duration::ZERO, EVENTS);
    // Queued behind the listener's task: it runs when the listener yields.
    let probe = tokio::spawn({
        let listener = listener.clone();
        async move { listener.metrics().handled }
    });
    let handled_when_the_probe_ran = within("probe task", probe).await.unwrap();
    assert!(
        handled_when_the_probe_ran < BUDGET,
        "the listener handled {handled_when_the_probe_ran} of {EVENTS} ready events before another task ran"
    );
    within("quiesce", bus.quiesce()).await;
    assert_eq!(listener.metrics().handled, EVENTS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_stops_a_listener_whose_handler_never_waits() {
    let bus = EventBus::new();
    // Slower than the emitter, so its queue is never empty and it never
    // waits for an event either.
    let listener = bus.spawn(NeverWaits {
        spin: Duration::from_micros(5),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let emitter = emit_until_stopped(&bus, &stop, 500_000_000);
    until("the listener to handle 1,000 events", || {
        listener.metrics().handled >= 1_000
    })
    .await;

    listener.abort();
    let at_abort = listener.metrics().handled;
    let finished = tokio::time::timeout(DEADLINE, listener.finished()).await;
    let at_finish = listener.metrics().handled;
    stop.store(true, Ordering::Relaxed);
    emitter.join().unwrap();
    assert!(
        finished.is_ok(),
        "the aborted listener was still running {DEADLINE:?} later, {} events after the abort",
        at_finish - at_abort
    );
    // Only the event in hand when `abort` returned may still finish.
    assert!(
        at_finish <= at_abort + 1,
        "the aborted listener handled {} more events",
        at_finish - at_abort
    );
    for _ in 0..1_000 {
        tokio::task::yield_now().await;
    }
    within("quiesce", bus.quiesce()).await;
    assert_eq!(
        listener.metrics().handled,
        at_finish,
        "handled after finishing"
    );
    bus.shutdown(DEADLINE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_past_its_deadline_stops_a_listener_whose_handler_never_waits() {
    const EVENTS: u64 = 20_000;
    // 20,000 events at 20µs each take 400ms: far past the deadline.
    let (bus, listener) = flooded(Duration::from_micros(20), EVENTS);

    let deadline = Duration::from_millis(50);
    let (took, report, reported) = shut_down(&bus, &listener, deadline).await;
    for _ in 0..1_000 {
        tokio::task::yield_now().await;
    }

    assert!(
        took < deadline + Duration::from_millis(500),
        "took {took:?}"
    );
    assert!(!reported.drained, "{report}");
    assert_eq!(
        reported.handled + reported.dead_lettered + reported.undelivered,
        EVENTS,
        "{reported:?}"
    );
    assert_eq!(
        listener.metrics().handled,
        reported.handled,
        "the listener went on handling after its shutdown report"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn shutdown_returns_at_its_deadline_on_one_thread_though_a_listener_never_waits() {
    const EVENTS: u64 = 50_000;
    // 50,000 events at 20µs each take a second.
    let (bus, listener) = flooded(Duration::from_micros(20), EVENTS);

    let deadline = Duration::from_millis(50);
    let (took, report, reported) = shut_down(&bus, &listener, deadline).await;

    assert!(
        took < deadline + Duration::from_millis(250),
        "shutdown({deadline:?}) took {took:?}; {report}"
    );
    assert_eq!(
        reported.handled + reported.dead_lettered + reported.undelivered,
        EVENTS,
        "{reported:?}"
    );
    assert_eq!(listener.metrics().handled, reported.handled);
}

/// Fails the first event of every batch, at once and without waiting: under
/// `StopAtFirst` with no retries, each becomes a dead letter and the rest
/// of the batch goes on, attempt after attempt, with no await between them.
struct FailsTheFirst(Arc<std::sync::atomic::AtomicU64>);

impl event_bus::BatchListener<TestEvent> for FailsTheFirst {
    async fn handle_batch(
        &self,
        _: &event_bus::Batch<TestEvent>,
    ) -> Result<(), event_bus::BatchError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Err(event_bus::BatchError::event(0, "unreadable"))
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_stop_at_first_batch_going_on_after_dead_letters_lets_other_tasks_run_and_stops() {
    const EVENTS: u64 = 5_000;
    let bus = EventBus::new();
    let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let options = ListenerOptions::new()
        .capacity(ROOMY)
        .max_batch(EVENTS as usize)
        .batch_failure(event_bus::BatchFailure::StopAtFirst);
    let listener = bus.spawn_with(FailsTheFirst(calls.clone()), options);
    for i in 0..EVENTS {
        bus.emit(TestEvent::A(i));
    }
    // Queued behind the listener's task: it runs when the listener yields,
    // and stops it there.
    let probe = tokio::spawn({
        let (listener, calls) = (listener.clone(), calls.clone());
        async move {
            listener.abort();
            calls.load(Ordering::Relaxed)
        }
    });
    let calls_when_the_probe_ran = within("probe task", probe).await.unwrap();
    within("the aborted listener to end", listener.finished()).await;
    assert!(
        calls_when_the_probe_ran < BUDGET,
        "{calls_when_the_probe_ran} handler calls before another task ran"
    );
    // Nothing was handled after the stop.
    assert_eq!(calls.load(Ordering::Relaxed), calls_when_the_probe_ran);
}
