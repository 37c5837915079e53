//! Batching listeners: batch size and wait, priority within batches, and
//! the partial-failure rule for retries and dead letters.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_bus::{
    Batch, BatchError, BatchFailure, BatchListener, DomainEvent, Event, EventBus, ListenerHandle,
    ListenerOptions, Priority, RetryPolicy, listener,
};
use proptest::prelude::*;
use support::{TestEvent, within};

/// A batch as the listener saw it: the attempt and the events' values.
type Seen = (u32, Vec<u64>);

/// Records every batch it is handed and fails the events the test marks.
#[derive(Clone, Default)]
struct Batches {
    seen: Arc<Mutex<Vec<Seen>>>,
    /// The values each call handled, by the rule of the batch's failure
    /// mode, in the order handled.
    handled: Arc<Mutex<Vec<u64>>>,
    /// How many calls attempted each value, by the rule of the batch's
    /// failure mode.
    tries: Arc<Mutex<HashMap<u64, u32>>>,
    /// Values that fail on every attempt.
    poison: HashSet<u64>,
    /// Values that fail on the first attempt only.
    flaky: HashSet<u64>,
    /// Panic instead of returning the error.
    panics: bool,
}

impl Batches {
    fn sizes(&self) -> Vec<usize> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(_, b)| b.len())
            .collect()
    }

    fn batches(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn handled(&self) -> Vec<u64> {
        self.handled.lock().unwrap().clone()
    }
}

impl BatchListener<TestEvent> for Batches {
    fn name(&self) -> &str {
        "batches"
    }

    async fn handle_batch(&self, batch: &Batch<TestEvent>) -> Result<(), BatchError> {
        let values: Vec<u64> = batch.iter().map(|e| e.value()).collect();
        self.seen
            .lock()
            .unwrap()
            .push((batch.attempt(), values.clone()));
        let failed: Vec<usize> = values
            .iter()
            .enumerate()
            .filter(|(_, v)| {
                self.poison.contains(v) || (batch.attempt() == 1 && self.flaky.contains(v))
            })
            .map(|(i, _)| i)
            .collect();
        let attempted = |i: usize| match batch.failure_mode() {
            BatchFailure::Independent => true,
            BatchFailure::StopAtFirst => failed.first().is_none_or(|&first| i <= first),
        };
        let mut tries = self.tries.lock().unwrap();
        for (_, &v) in values.iter().enumerate().filter(|&(i, _)| attempted(i)) {
            *tries.entry(v).or_default() += 1;
        }
        drop(tries);
        let handled = values
            .iter()
            .enumerate()
            .filter(|&(i, _)| attempted(i) && !failed.contains(&i));
        self.handled
            .lock()
            .unwrap()
            .extend(handled.map(|(_, &v)| v));
        if failed.is_empty() {
            return Ok(());
        }
        if self.panics {
            panic!("batch of {} failed", values.len());
        }
        Err(BatchError::events(failed, "row locked"))
    }
}

fn values(bus_events: std::ops::Range<u64>) -> impl Iterator<Item = TestEvent> {
    bus_events.map(TestEvent::A)
}

/// Yields to the listener until `condition` holds; the bound on the number
/// of turns is the deadline, since the paused clock does not move by itself.
async fn turns_until(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if condition() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("{what} did not happen within 10,000 turns");
}

fn delivered(handle: &ListenerHandle<TestEvent>) -> u64 {
    handle.metrics().delivered
}

/// A listener's `(handled, failed, retried, dead_lettered)`.
fn outcomes<E: Event>(handle: &ListenerHandle<E>) -> (u64, u64, u64, u64) {
    let m = handle.metrics();
    (m.handled, m.failed, m.retried, m.dead_lettered)
}

#[tokio::test]
async fn batches_hold_at_most_max_batch_events() {
    let bus = EventBus::new();
    let batches = Batches::default();
    let handle = bus.spawn_with(batches.clone(), ListenerOptions::new().max_batch(30));
    // Queued before the listener first runs: one task, nothing awaited.
    for event in values(0..100) {
        bus.emit(event);
    }
    within("quiesce", bus.quiesce()).await;
    assert_eq!(batches.sizes(), [30, 30, 30, 10]);
    let handled: Vec<u64> = batches.batches().into_iter().flat_map(|(_, b)| b).collect();
    assert_eq!(handled, (0..100).collect::<Vec<_>>());
    let metrics = handle.metrics();
    assert_eq!((metrics.delivered, metrics.handled), (100, 100));
    assert_eq!(metrics.in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn a_batch_waits_max_wait_after_its_first_event() {
    let bus = EventBus::new();
    let batches = Batches::default();
    let options = ListenerOptions::new()
        .max_batch(10)
        .max_wait(Duration::from_millis(100));
    let handle = bus.spawn_with(batches.clone(), options);

    bus.emit(TestEvent::A(1));
    bus.emit(TestEvent::A(2));
    turns_until("two events taken", || delivered(&handle) == 2).await;
    tokio::time::advance(Duration::from_millis(60)).await;
    bus.emit(TestEvent::A(3));
    turns_until("third event taken", || delivered(&handle) == 3).await;
    assert!(batches.batches().is_empty(), "handed over before max_wait");

    // 100ms after the first event, the batch goes as it is.
    tokio::time::advance(Duration::from_millis(40)).await;
    turns_until("batch handled", || handle.metrics().handled == 3).await;
    assert_eq!(batches.batches(), [(1, vec![1, 2, 3])]);

    // A full batch does not wait.
    for event in values(10..20) {
        bus.emit(event);
    }
    turns_until("full batch handled", || handle.metrics().handled == 13).await;
    assert_eq!(batches.sizes(), [3, 10]);

    // Nor does one holding a high-priority event.
    bus.emit(TestEvent::A(30));
    bus.with_priority(Priority::High).emit(TestEvent::A(31));
    turns_until("urgent batch handled", || handle.metrics().handled == 15).await;
    assert_eq!(batches.batches()[2], (1, vec![31, 30]));
}

#[tokio::test(start_paused = true)]
async fn failed_events_are_retried_as_a_smaller_batch_then_dead_lettered() {
    let bus = EventBus::new();
    let batches = Batches {
        poison: HashSet::from([2]),
        flaky: HashSet::from([4]),
        ..Batches::default()
    };
    let retry = RetryPolicy::exponential(3)
        .initial_backoff(Duration::from_millis(10))
        .jitter(false);
    let handle = bus.spawn_with(
        batches.clone(),
        ListenerOptions::new().max_batch(6).retry(retry),
    );
    for event in values(1..7) {
        bus.emit(event);
    }
    within("quiesce", bus.quiesce()).await;

    assert_eq!(
        batches.batches(),
        [(1, vec![1, 2, 3, 4, 5, 6]), (2, vec![2, 4]), (3, vec![2])]
    );
    let letters = bus.dead_letters().snapshot();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].envelope.value(), 2);
    assert_eq!(letters[0].attempts, 3);
    assert_eq!(letters[0].error, "row locked");
    assert_eq!(&*letters[0].listener, "batches");

    let m = handle.metrics();
    assert_eq!(m.handled, 5);
    assert_eq!(m.dead_lettered, 1);
    // Per event: 2 failed at the first attempt, 1 at each later one.
    assert_eq!(m.failed, 4);
    assert_eq!(m.retried, 3);
    assert_eq!(m.failed, m.retried + m.dead_lettered);
    assert_eq!(m.handled + m.dead_lettered, m.delivered);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_batch_fails_as_a_whole() {
    let bus = EventBus::new();
    let batches = Batches {
        poison: HashSet::from([3]),
        panics: true,
        ..Batches::default()
    };
    let retry = RetryPolicy::exponential(2).jitter(false);
    let handle = bus.spawn_with(
        batches.clone(),
        ListenerOptions::new().max_batch(4).retry(retry),
    );
    for event in values(1..5) {
        bus.emit(event);
    }
    within("quiesce", bus.quiesce()).await;

    assert_eq!(
        batches.batches(),
        [(1, vec![1, 2, 3, 4]), (2, vec![1, 2, 3, 4])]
    );
    let letters = bus.dead_letters().snapshot();
    assert_eq!(letters.len(), 4);
    assert!(
        letters
            .iter()
            .all(|l| l.error == "panicked: batch of 4 failed")
    );
    let m = handle.metrics();
    assert_eq!(
        (m.failed, m.panicked, m.retried, m.dead_lettered),
        (8, 8, 4, 4)
    );
}

/// Fails with an error that names an event past the end of its batch.
struct Confused;

impl BatchListener<TestEvent> for Confused {
    async fn handle_batch(&self, batch: &Batch<TestEvent>) -> Result<(), BatchError> {
        Err(BatchError::event(batch.len(), "no such row"))
    }
}

#[tokio::test]
async fn an_error_naming_an_event_outside_the_batch_fails_the_whole_batch() {
    let bus = EventBus::new();
    let handle = bus.spawn(Confused);
    for event in values(0..3) {
        bus.emit(event);
    }
    within("quiesce", bus.quiesce()).await;
    let letters = bus.dead_letters().snapshot();
    assert_eq!(letters.len(), 3);
    assert!(
        letters[0]
            .error
            .contains("named an event outside its batch of 3 (index 3): no such row"),
        "{}",
        letters[0].error
    );
    assert_eq!(handle.metrics().handled, 0);
}

#[tokio::test]
async fn a_question_mark_on_any_error_fails_the_whole_batch() {
    struct Parses;

    impl BatchListener<TestEvent> for Parses {
        async fn handle_batch(&self, _: &Batch<TestEvent>) -> Result<(), BatchError> {
            let _: u64 = "not a number".parse()?;
            Ok(())
        }
    }

    let bus = EventBus::new();
    bus.spawn(Parses);
    bus.emit(TestEvent::A(0));
    bus.emit(TestEvent::A(1));
    within("quiesce", bus.quiesce()).await;
    let letters = bus.dead_letters().snapshot();
    assert_eq!(letters.len(), 2);
    assert_eq!(letters[1].error, "invalid digit found in string");
}

#[tokio::test]
async fn concurrent_batches_handle_every_event_once() {
    let bus = EventBus::new();
    let batches = Batches::default();
    let options = ListenerOptions::new().max_batch(7).concurrency(3);
    let handle = bus.spawn_with(batches.clone(), options);
    for round in 0..10u64 {
        for event in values(round * 50..round * 50 + 50) {
            bus.emit(event);
        }
        tokio::task::yield_now().await;
    }
    within("quiesce", bus.quiesce()).await;
    let mut handled: Vec<u64> = batches.batches().into_iter().flat_map(|(_, b)| b).collect();
    handled.sort_unstable();
    assert_eq!(handled, (0..500).collect::<Vec<_>>());
    assert!(batches.sizes().iter().all(|&n| (1..=7).contains(&n)));
    assert_eq!(handle.metrics().handled, 500);
}

#[tokio::test]
async fn a_batch_listener_drains_its_queue_on_shutdown() {
    let bus = EventBus::new();
    let batches = Batches::default();
    let options = ListenerOptions::new()
        .max_batch(8)
        .max_wait(Duration::from_secs(3600));
    bus.spawn_with(batches.clone(), options);
    for event in values(0..20) {
        bus.emit(event);
    }
    // The last batch does not wait out max_wait once the bus closes.
    let report = within("shutdown", bus.shutdown(Duration::from_secs(60))).await;
    assert!(report.drained(), "{report}");
    assert_eq!(batches.sizes(), [8, 8, 4]);
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum Catalog {
    Published(u64),
    Renamed { id: u64, title: String },
    Cleared,
    Unwatched(u64),
}

/// Through the derive: each run of one kind's payloads in one call.
#[derive(Clone, Default)]
struct Indexer {
    calls: Arc<Mutex<Vec<String>>>,
}

#[listener]
impl CatalogBatchHandler for Indexer {
    async fn on_published(&self, batch: &[&u64]) -> Result<(), BatchError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("published {batch:?}"));
        // The second event of every run of published events fails.
        if batch.len() > 1 {
            return Err(BatchError::event(1, "index busy"));
        }
        Ok(())
    }

    async fn on_renamed(&self, batch: &[(&u64, &String)]) -> Result<(), BatchError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("renamed {batch:?}"));
        Ok(())
    }

    async fn on_cleared(&self, count: usize) -> Result<(), BatchError> {
        self.calls.lock().unwrap().push(format!("cleared {count}"));
        Err(BatchError::all("cache down"))
    }
}

#[tokio::test]
async fn the_derived_batch_handler_hands_each_run_of_one_kind_to_its_method_in_batch_order() {
    let bus = EventBus::new();
    let indexer = Indexer::default();
    let handle = bus.spawn(indexer.clone());
    bus.emit(Catalog::Published(1));
    bus.emit(Catalog::Cleared);
    bus.emit(Catalog::Unwatched(9)); // no method: not subscribed
    bus.emit(Catalog::Renamed {
        id: 1,
        title: "One".into(),
    });
    bus.emit(Catalog::Published(2));
    bus.emit(Catalog::Published(3));
    bus.emit(Catalog::Cleared);
    within("quiesce", bus.quiesce()).await;

    assert_eq!(
        *indexer.calls.lock().unwrap(),
        [
            "published [1]",
            "cleared 1",
            "renamed [(1, \"One\")]",
            "published [2, 3]",
            "cleared 1",
        ]
    );
    // Failures map back to the events: the second of the run
    // `[Published(2), Published(3)]`, and both `Cleared`.
    let failed: Vec<(Catalog, String)> = bus
        .dead_letters()
        .snapshot()
        .iter()
        .map(|l| (l.envelope.event().clone(), l.error.clone()))
        .collect();
    assert_eq!(
        failed,
        [
            (Catalog::Cleared, "cache down".to_string()),
            (Catalog::Published(3), "index busy".to_string()),
            (Catalog::Cleared, "cache down".to_string()),
        ]
    );
    let m = handle.metrics();
    assert_eq!((m.delivered, m.handled, m.dead_lettered), (6, 3, 3));
}

/// Retries after 10ms, then 20ms: `jitter(false)` keeps the paused clock's
/// steps exact.
fn three_attempts() -> RetryPolicy {
    RetryPolicy::exponential(3)
        .initial_backoff(Duration::from_millis(10))
        .jitter(false)
}

/// Emits [`writes`] to a fresh bus with a `store` listener in `mode`, and
/// waits until it is done.
async fn run_writes(store: &Store, mode: BatchFailure) -> ListenerHandle<Kv> {
    let bus = EventBus::new();
    let options = ListenerOptions::new()
        .batch_failure(mode)
        .retry(three_attempts());
    let handle = bus.spawn_with(store.clone(), options);
    for write in writes() {
        bus.emit(write);
    }
    within("quiesce", bus.quiesce()).await;
    handle
}

#[tokio::test(start_paused = true)]
async fn stop_at_first_retries_from_the_first_failure_in_order_and_ends_as_without_failure() {
    let clean = Store::default();
    run_writes(&clean, BatchFailure::StopAtFirst).await;

    // `set(1, 20)` fails once: the third event of the batch.
    let store = Store::failing_once([20]);
    let handle = run_writes(&store, BatchFailure::StopAtFirst).await;

    assert_eq!(
        store.calls(),
        [
            "set [(1, 10)]",
            "clear [1]",
            // Fails at its first write; the runs after it are not called.
            "set [(1, 20), (2, 5)]",
            // The retry: from the failed event on, in order.
            "set [(1, 20), (2, 5)]",
            "clear [2]",
            "set [(2, 7)]",
        ]
    );
    assert_eq!(store.applied(), writes());
    assert_eq!(store.applied(), clean.applied());
    assert_eq!(store.values(), clean.values());
    assert_eq!(store.values(), HashMap::from([(1, 20), (2, 7)]));
    assert_eq!(outcomes(&handle), (6, 1, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn independent_failures_are_retried_after_the_events_that_followed_them() {
    let store = Store::failing_once([20]);
    let handle = run_writes(&store, BatchFailure::Independent).await;

    // Every run is called; the two failed sets go again at the end.
    assert_eq!(
        store.calls(),
        [
            "set [(1, 10)]",
            "clear [1]",
            "set [(1, 20), (2, 5)]",
            "clear [2]",
            "set [(2, 7)]",
            "set [(1, 20), (2, 5)]",
        ]
    );
    assert_eq!(
        store.applied(),
        [
            set(1, 10),
            Kv::Clear(1),
            Kv::Clear(2),
            set(2, 7),
            set(1, 20),
            set(2, 5),
        ]
    );
    // Right for events that stand alone; here `set(2, 5)` lands last.
    assert_eq!(store.values(), HashMap::from([(1, 20), (2, 5)]));
    assert_eq!(outcomes(&handle), (6, 2, 2, 0));
}

#[tokio::test(start_paused = true)]
async fn stop_at_first_dead_letters_the_first_failure_and_goes_on_with_the_events_after_it() {
    let bus = EventBus::new();
    let batches = Batches {
        poison: HashSet::from([2]),
        flaky: HashSet::from([4]),
        ..Batches::default()
    };
    let options = ListenerOptions::new()
        .max_batch(6)
        .batch_failure(BatchFailure::StopAtFirst)
        .retry(three_attempts());
    let handle = bus.spawn_with(batches.clone(), options);
    for event in values(1..7) {
        bus.emit(event);
    }
    within("quiesce", bus.quiesce()).await;

    assert_eq!(
        batches.batches(),
        [
            // 2 fails: 1 is handled, 2 and everything after it go again.
            (1, vec![1, 2, 3, 4, 5, 6]),
            (2, vec![2, 3, 4, 5, 6]),
            (3, vec![2, 3, 4, 5, 6]),
            // 2 had its three attempts: the rest go on as a new batch, in
            // which 4 fails once.
            (1, vec![3, 4, 5, 6]),
            (2, vec![4, 5, 6]),
        ]
    );
    assert_eq!(batches.handled(), [1, 3, 4, 5, 6]);
    let letters = bus.dead_letters().snapshot();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].envelope.value(), 2);
    assert_eq!(letters[0].attempts, 3);
    assert_eq!(letters[0].error, "row locked");

    // One failed event per failed attempt: 2 three times, 4 once.
    assert_eq!(outcomes(&handle), (5, 4, 3, 1));
}

fn failure_mode() -> impl Strategy<Value = BatchFailure> {
    prop_oneof![
        Just(BatchFailure::Independent),
        Just(BatchFailure::StopAtFirst)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// For random failures, batch sizes, attempts and both modes: every
    /// delivered event ends handled or dead-lettered, once; each failure is
    /// retried or dead-lettered; and under `StopAtFirst` the events are
    /// handled in the order they were delivered.
    #[test]
    fn counters_keep_their_identities_after_partial_failures_in_both_modes(
        mode in failure_mode(),
        max_batch in 1usize..8,
        attempts in 1u32..4,
        poison in prop::collection::hash_set(0u64..30, 0..6),
        flaky in prop::collection::hash_set(0u64..30, 0..6),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(async {
            let bus = EventBus::new();
            let batches = Batches {
                poison: poison.clone(),
                flaky: flaky.clone(),
                ..Batches::default()
            };
            let retry = RetryPolicy::exponential(attempts)
                .initial_backoff(Duration::from_millis(10))
                .jitter(false);
            let options = ListenerOptions::new()
                .max_batch(max_batch)
                .batch_failure(mode)
                .retry(retry);
            let handle = bus.spawn_with(batches.clone(), options);
            for event in values(0..30) {
                bus.emit(event);
            }
            within("quiesce", bus.quiesce()).await;

            let m = handle.metrics();
            prop_assert_eq!(m.delivered, 30);
            prop_assert_eq!(m.failed, m.retried + m.dead_lettered);
            prop_assert_eq!(m.handled + m.dead_lettered, m.delivered);

            // The poisoned events are the dead letters, and the flaky ones
            // too when there is no retry.
            let letters = bus.dead_letters().snapshot();
            let tries = batches.tries.lock().unwrap().clone();
            for letter in &letters {
                // Dead after every attempt, each counted from its own.
                let value = letter.envelope.value();
                prop_assert_eq!(letter.attempts, attempts, "{}", value);
                prop_assert_eq!(tries[&value], attempts, "{}", value);
            }
            let mut dead: Vec<u64> = letters.iter().map(|l| l.envelope.value()).collect();
            dead.sort_unstable();
            let expected_dead: HashSet<u64> = if attempts == 1 {
                poison.union(&flaky).copied().collect()
            } else {
                poison.clone()
            };
            let mut expected_dead: Vec<u64> = expected_dead.into_iter().collect();
            expected_dead.sort_unstable();
            prop_assert_eq!(&dead, &expected_dead);

            // Every other event handled once; in delivered order under
            // `StopAtFirst`.
            let mut handled = batches.handled();
            prop_assert_eq!(handled.len() as u64, m.handled);
            if mode == BatchFailure::Independent {
                handled.sort_unstable();
            }
            let expected: Vec<u64> = (0..30).filter(|v| !expected_dead.contains(v)).collect();
            prop_assert_eq!(handled, expected);
            Ok(())
        })?;
    }
}

#[tokio::test(start_paused = true)]
async fn max_wait_duration_max_waits_until_full_or_urgent_and_drains_on_close() {
    let bus = EventBus::new();
    let batches = Batches::default();
    let options = ListenerOptions::new().max_batch(4).max_wait(Duration::MAX);
    let handle = bus.spawn_with(batches.clone(), options);

    // A full batch goes at once.
    for event in values(0..4) {
        bus.emit(event);
    }
    within("quiesce", bus.quiesce()).await;
    assert_eq!(batches.batches(), [(1, vec![0, 1, 2, 3])]);

    // A batch that is not full waits, however long.
    bus.emit(TestEvent::A(4));
    turns_until("fifth event taken", || delivered(&handle) == 5).await;
    tokio::time::advance(Duration::from_secs(365 * 24 * 3600)).await;
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert_eq!(batches.sizes(), [4], "handed over before it was full");

    // Until it takes a high-priority event.
    bus.with_priority(Priority::High).emit(TestEvent::A(5));
    turns_until("urgent batch handled", || handle.metrics().handled == 6).await;
    assert_eq!(batches.batches()[1], (1, vec![4, 5]));

    // Or the bus closes.
    bus.emit(TestEvent::A(6));
    let report = within("shutdown", bus.shutdown(Duration::from_secs(60))).await;
    assert!(report.drained(), "{report}");
    assert_eq!(batches.batches()[2], (1, vec![6]));
    assert_eq!(handle.metrics().handled, 7);
}

/// A key-value store's writes: the order of a key's writes decides its value.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum Kv {
    Set { key: u64, value: u64 },
    Clear(u64),
}

/// A store fed by the derive's batch handler.
#[derive(Clone, Default)]
struct Store {
    values: Arc<Mutex<HashMap<u64, u64>>>,
    /// Every write applied, in the order applied.
    applied: Arc<Mutex<Vec<Kv>>>,
    /// Every call of a handler method, in the order called.
    calls: Arc<Mutex<Vec<String>>>,
    /// Values whose `set` fails the first time it is applied.
    busy_once: Arc<Mutex<HashSet<u64>>>,
}

impl Store {
    fn failing_once(values: impl IntoIterator<Item = u64>) -> Self {
        let store = Self::default();
        store.busy_once.lock().unwrap().extend(values);
        store
    }

    fn values(&self) -> HashMap<u64, u64> {
        self.values.lock().unwrap().clone()
    }

    fn applied(&self) -> Vec<Kv> {
        self.applied.lock().unwrap().clone()
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

#[listener]
impl KvBatchHandler for Store {
    async fn on_set(&self, batch: &[(&u64, &u64)]) -> Result<(), BatchError> {
        self.calls.lock().unwrap().push(format!("set {batch:?}"));
        for (i, &(&key, &value)) in batch.iter().enumerate() {
            if self.busy_once.lock().unwrap().remove(&value) {
                // This write and those after it were not applied.
                return Err(BatchError::events(i..batch.len(), "store busy"));
            }
            self.values.lock().unwrap().insert(key, value);
            self.applied.lock().unwrap().push(Kv::Set { key, value });
        }
        Ok(())
    }

    async fn on_clear(&self, keys: &[&u64]) -> Result<(), BatchError> {
        self.calls.lock().unwrap().push(format!("clear {keys:?}"));
        for &&key in keys {
            self.values.lock().unwrap().remove(&key);
            self.applied.lock().unwrap().push(Kv::Clear(key));
        }
        Ok(())
    }
}

fn set(key: u64, value: u64) -> Kv {
    Kv::Set { key, value }
}

/// Two keys, each set, cleared and set again.
fn writes() -> Vec<Kv> {
    vec![
        set(1, 10),
        Kv::Clear(1),
        set(1, 20),
        set(2, 5),
        Kv::Clear(2),
        set(2, 7),
    ]
}

#[tokio::test]
async fn set_clear_set_in_one_batch_ends_with_the_last_value_stored() {
    let bus = EventBus::new();
    let store = Store::default();
    bus.spawn(store.clone());
    // Emitted before the listener first runs: one batch.
    bus.emit(set(1, 10));
    bus.emit(Kv::Clear(1));
    bus.emit(set(1, 20));
    within("quiesce", bus.quiesce()).await;
    assert_eq!(store.values(), HashMap::from([(1, 20)]));
}

#[tokio::test]
async fn the_derived_batch_handler_handles_events_in_delivered_order_across_kinds() {
    let bus = EventBus::new();
    let store = Store::default();
    let handle = bus.spawn(store.clone());
    for write in writes() {
        bus.emit(write);
    }
    within("quiesce", bus.quiesce()).await;
    assert_eq!(store.applied(), writes());
    // One call per run of consecutive events of one kind.
    assert_eq!(
        store.calls(),
        [
            "set [(1, 10)]",
            "clear [1]",
            "set [(1, 20), (2, 5)]",
            "clear [2]",
            "set [(2, 7)]",
        ]
    );
    assert_eq!(store.values(), HashMap::from([(1, 20), (2, 7)]));
    assert_eq!(handle.metrics().handled, 6);
}
