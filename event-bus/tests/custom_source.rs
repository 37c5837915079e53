//! The runner over a source other than the bus's queues, as a durable or
//! distributed tier runs it: stored bytes decoded with the JSON codec,
//! retries taken back by the source and redelivered, an event that does not
//! decode recorded as a dead letter with the reason and terminated, never
//! handed to the handler. Run with `cargo test -p event-bus --all-features`.
#![cfg(all(feature = "serde", feature = "derive"))]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use event_bus::codec::JsonCodec;
use event_bus::runner::{
    self, DeadLetterSink, Delivery, Retry, Source, Undecodable, UndecodableLetter,
};
use event_bus::{
    Batch, BatchError, BatchListener, DeadLetter, DomainEvent, Envelope, HandlerError,
    ListenerOptions, ListenerStatus, Meta, RetryPolicy, listener,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, DomainEvent, Serialize, Deserialize)]
enum Shop {
    OrderPaid(u64),
    OrderShipped { order: u64 },
}

/// What the log did with each of its entries.
#[derive(Debug, Default)]
struct Outcomes {
    acked: Vec<u64>,
    terminated: Vec<String>,
    redelivered: usize,
    released: usize,
}

/// An entry's bytes and how many times it was delivered.
type Stored = (Vec<u8>, u32);

/// A log of stored events read to its end: each entry is its bytes and the
/// number of times it was delivered, as a durable tier would persist it.
#[derive(Clone, Default)]
struct Log {
    entries: Arc<Mutex<VecDeque<Stored>>>,
    outcomes: Arc<Mutex<Outcomes>>,
}

impl Log {
    fn of(events: &[Shop]) -> Self {
        let log = Log::default();
        for event in events {
            log.append(JsonCodec.encode(&Envelope::new(event.clone())).unwrap());
        }
        log
    }

    fn append(&self, bytes: Vec<u8>) {
        self.entries.lock().unwrap().push_back((bytes, 1));
    }
}

fn order(event: &Shop) -> u64 {
    match *event {
        Shop::OrderPaid(order) | Shop::OrderShipped { order } => order,
    }
}

struct Entry {
    envelope: Arc<Envelope<Shop>>,
    bytes: Vec<u8>,
    attempt: u32,
    log: Log,
}

impl Delivery<Shop> for Entry {
    fn envelope(&self) -> &Arc<Envelope<Shop>> {
        &self.envelope
    }

    fn attempt(&self) -> u32 {
        self.attempt
    }

    async fn ack(self) {
        self.log
            .outcomes
            .lock()
            .unwrap()
            .acked
            .push(order(&self.envelope));
    }

    /// Taken back, as a broker's `nak`: delivered again after the entries
    /// already queued, one attempt later.
    async fn retry(self, _delay: Duration, _error: &str) -> Retry<Self> {
        self.log.outcomes.lock().unwrap().redelivered += 1;
        self.log
            .entries
            .lock()
            .unwrap()
            .push_back((self.bytes, self.attempt + 1));
        Retry::Redelivered
    }

    async fn terminate(self, reason: &str) {
        let mut outcomes = self.log.outcomes.lock().unwrap();
        outcomes.terminated.push(reason.to_owned());
    }

    /// Given back unattempted: delivered again after what is queued, at
    /// the same attempt.
    async fn release(self) {
        self.log.outcomes.lock().unwrap().released += 1;
        let entry = (self.bytes, self.attempt);
        self.log.entries.lock().unwrap().push_back(entry);
    }
}

impl Source<Shop> for Log {
    type Delivery = Entry;

    fn poll_next(&mut self, _: &mut Context<'_>) -> Poll<Option<Result<Entry, Undecodable>>> {
        let Some((bytes, attempt)) = self.entries.lock().unwrap().pop_front() else {
            return Poll::Ready(None);
        };
        Poll::Ready(Some(match JsonCodec.decode::<Shop>(&bytes) {
            Ok(envelope) => Ok(Entry {
                envelope: Arc::new(envelope),
                bytes,
                attempt,
                log: self.clone(),
            }),
            Err(error) => {
                let outcomes = self.outcomes.clone();
                let mut undecodable = Undecodable::new(&error, bytes, move |reason| async move {
                    outcomes.lock().unwrap().terminated.push(reason);
                })
                .with_attempt(attempt);
                if let Some(name) = error.name() {
                    undecodable = undecodable.with_name(name);
                }
                if let Some(id) = error.id() {
                    undecodable = undecodable.with_id(id);
                }
                Err(undecodable)
            }
        }))
    }
}

#[derive(Default)]
struct Letters {
    letters: Mutex<Vec<(u64, String, u32)>>,
    undecodable: Mutex<Vec<UndecodableLetter>>,
}

impl DeadLetterSink<Shop> for Letters {
    async fn record(&self, letter: DeadLetter<Shop>) {
        let entry = (order(&letter.envelope), letter.error, letter.attempts);
        self.letters.lock().unwrap().push(entry);
    }

    async fn record_undecodable(&self, letter: UndecodableLetter) {
        self.undecodable.lock().unwrap().push(letter);
    }
}

/// Records what it handled; fails order 13 on every attempt and order 7 on
/// its first.
#[derive(Clone, Default)]
struct Shipping {
    handled: Arc<Mutex<Vec<(u64, u32)>>>,
}

#[listener]
impl ShopHandler for Shipping {
    async fn on_order_paid(&self, order: &u64, meta: Meta) -> Result<(), HandlerError> {
        self.handled.lock().unwrap().push((*order, meta.attempt()));
        match (*order, meta.attempt()) {
            (13, _) => Err("address unknown".into()),
            (7, 1) => Err("warehouse busy".into()),
            _ => Ok(()),
        }
    }

    async fn on_order_shipped(&self, order: &u64, meta: Meta) -> Result<(), HandlerError> {
        self.handled.lock().unwrap().push((*order, meta.attempt()));
        Ok(())
    }
}

fn three_attempts() -> ListenerOptions {
    ListenerOptions::new().retry(RetryPolicy::exponential(3).initial_backoff(Duration::ZERO))
}

#[tokio::test]
async fn an_event_that_does_not_decode_is_a_dead_letter_with_the_reason_and_is_terminated() {
    let log = Log::of(&[Shop::OrderPaid(1)]);
    // Stored by a version that had an event this one does not know, and a
    // payload this one cannot read.
    log.append(
        br#"{"id":"0190c0a4-7b3e-7cc2-9a41-2f6d1e8b5a73","type":"order.refunded","time":"2024-07-10T08:30:12Z","data":5}"#
            .to_vec(),
    );
    log.append(br#"{"id":"0190c0a4-7b3e-7cc2-9a41-2f6d1e8b5a74","type":"order.paid","time":"2024-07-10T08:30:12Z","data":"six"}"#.to_vec());
    log.append(
        JsonCodec
            .encode(&Envelope::new(Shop::OrderShipped { order: 2 }))
            .unwrap(),
    );
    let letters = Arc::new(Letters::default());
    let shipping = Shipping::default();

    let report = runner::run(
        shipping.clone(),
        log.clone(),
        letters.clone(),
        three_attempts(),
    )
    .await;

    // The handler saw the decodable events only, and the run went on past
    // the undecodable ones.
    assert_eq!(*shipping.handled.lock().unwrap(), [(1, 1), (2, 1)]);
    assert_eq!((report.handled, report.dead_lettered), (2, 2));
    assert_eq!(report.status, ListenerStatus::Drained);
    let undecodable = letters.undecodable.lock().unwrap();
    let names: Vec<_> = undecodable.iter().map(|l| l.name.as_deref()).collect();
    assert_eq!(names, [Some("order.refunded"), Some("order.paid")]);
    assert_eq!(
        undecodable[0].id.unwrap().to_string(),
        "0190c0a4-7b3e-7cc2-9a41-2f6d1e8b5a73"
    );
    assert_eq!(
        undecodable[0].error,
        "does not decode: unknown event type `order.refunded`"
    );
    assert!(
        undecodable[1].error.starts_with("does not decode: "),
        "{}",
        undecodable[1].error
    );
    assert!(undecodable[1].payload.ends_with(br#""data":"six"}"#));
    assert_eq!(&*undecodable[0].listener, "Shipping");
    // The source was told to forget them, with the reason.
    let outcomes = log.outcomes.lock().unwrap();
    assert_eq!(
        outcomes.terminated,
        undecodable
            .iter()
            .map(|l| l.error.clone())
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_source_that_takes_retries_back_redelivers_them_with_the_attempt_it_counted() {
    let log = Log::of(&[Shop::OrderPaid(7), Shop::OrderPaid(13), Shop::OrderPaid(8)]);
    let letters = Arc::new(Letters::default());
    let shipping = Shipping::default();

    let report = runner::run(
        shipping.clone(),
        log.clone(),
        letters.clone(),
        three_attempts(),
    )
    .await;

    // Retries went back to the log and came again after what was queued:
    // the attempt is the log's count.
    assert_eq!(
        *shipping.handled.lock().unwrap(),
        [(7, 1), (13, 1), (8, 1), (7, 2), (13, 2), (13, 3)]
    );
    assert_eq!(
        *letters.letters.lock().unwrap(),
        [(13, "address unknown".to_owned(), 3)]
    );
    let outcomes = log.outcomes.lock().unwrap();
    assert_eq!(outcomes.acked, [8, 7]);
    assert_eq!(outcomes.redelivered, 3);
    assert_eq!(outcomes.terminated, ["address unknown"]);
    assert_eq!(
        (
            report.handled,
            report.retried,
            report.dead_lettered,
            report.failed
        ),
        (2, 3, 1, 4)
    );
}

/// Handles batches; counts the events of each.
#[derive(Clone, Default)]
struct Counter(Arc<Mutex<Vec<usize>>>);

impl BatchListener<Shop> for Counter {
    async fn handle_batch(&self, batch: &Batch<Shop>) -> Result<(), BatchError> {
        self.0.lock().unwrap().push(batch.len());
        Ok(())
    }
}

#[tokio::test]
async fn a_batch_listener_gets_every_decodable_event_and_the_rest_are_dead_letters() {
    let log = Log::of(&(0..10).map(Shop::OrderPaid).collect::<Vec<_>>());
    log.append(b"not json".to_vec());
    for order in 10..15 {
        log.append(
            JsonCodec
                .encode(&Envelope::new(Shop::OrderPaid(order)))
                .unwrap(),
        );
    }
    let letters = Arc::new(Letters::default());
    let counter = Counter::default();

    let options = ListenerOptions::new().max_batch(4);
    let report = runner::run(counter.clone(), log.clone(), letters.clone(), options).await;

    let batches = counter.0.lock().unwrap().clone();
    assert!(batches.iter().all(|&len| len <= 4), "{batches:?}");
    assert_eq!(batches.iter().sum::<usize>(), 15);
    assert_eq!((report.handled, report.dead_lettered), (15, 1));
    let undecodable = letters.undecodable.lock().unwrap();
    assert_eq!(undecodable.len(), 1);
    assert_eq!(undecodable[0].payload, b"not json");
    assert_eq!(
        log.outcomes.lock().unwrap().acked,
        (0..15).collect::<Vec<_>>()
    );
}

/// Fails every event's first attempt.
#[derive(Clone, Default)]
struct FirstTimeUnlucky(Arc<Mutex<Vec<(u64, u32)>>>);

impl BatchListener<Shop> for FirstTimeUnlucky {
    async fn handle_batch(&self, batch: &Batch<Shop>) -> Result<(), BatchError> {
        let mut failed = Vec::new();
        for (at, (envelope, &attempt)) in batch.iter().zip(batch.attempts()).enumerate() {
            self.0.lock().unwrap().push((order(envelope), attempt));
            if attempt == 1 {
                failed.push(at);
            }
        }
        match failed.is_empty() {
            true => Ok(()),
            false => Err(BatchError::events(failed, "first attempt")),
        }
    }
}

#[tokio::test]
async fn what_goes_back_to_a_source_that_ended_is_still_handled_by_a_batch_listener() {
    // The log ends as soon as it is read to its end; the retries it takes
    // back after that come again, and are handled.
    let log = Log::of(&[Shop::OrderPaid(1), Shop::OrderPaid(2)]);
    let letters = Arc::new(Letters::default());
    let listener = FirstTimeUnlucky::default();

    let report = runner::run(
        listener.clone(),
        log.clone(),
        letters.clone(),
        three_attempts(),
    )
    .await;

    assert_eq!(
        (report.handled, report.retried, report.dead_lettered),
        (2, 2, 0)
    );
    assert_eq!(log.outcomes.lock().unwrap().acked, [1, 2]);
    assert!(log.entries.lock().unwrap().is_empty());
}

#[tokio::test]
async fn what_goes_back_to_a_source_that_ended_is_still_handled_at_concurrency_above_one() {
    let log = Log::of(&[Shop::OrderPaid(7), Shop::OrderPaid(3)]);
    let letters = Arc::new(Letters::default());
    let shipping = Shipping::default();

    let options = three_attempts().concurrency(2);
    let report = runner::run(shipping.clone(), log.clone(), letters.clone(), options).await;

    // Order 7 fails its first attempt and goes back to the log, which had
    // ended: it is handled on its second.
    assert_eq!((report.handled, report.retried), (2, 1));
    let mut acked = log.outcomes.lock().unwrap().acked.clone();
    acked.sort_unstable();
    assert_eq!(acked, [3, 7]);
}

/// Processes a batch in order, stopping at the first event it fails, and
/// fails each event the first time it processes it.
#[derive(Clone, Default)]
struct InOrder {
    processed: Arc<Mutex<Vec<(u64, u32)>>>,
    failed_once: Arc<Mutex<Vec<u64>>>,
}

impl BatchListener<Shop> for InOrder {
    async fn handle_batch(&self, batch: &Batch<Shop>) -> Result<(), BatchError> {
        for (at, (envelope, &attempt)) in batch.iter().zip(batch.attempts()).enumerate() {
            let order = order(envelope);
            self.processed.lock().unwrap().push((order, attempt));
            let mut failed_once = self.failed_once.lock().unwrap();
            if !failed_once.contains(&order) {
                failed_once.push(order);
                return Err(BatchError::event(at, "busy"));
            }
        }
        Ok(())
    }
}

#[tokio::test]
async fn stop_at_first_gives_back_the_events_after_a_retry_the_source_took_unattempted() {
    let log = Log::of(&[Shop::OrderPaid(1), Shop::OrderPaid(2), Shop::OrderPaid(3)]);
    let letters = Arc::new(Letters::default());
    let listener = InOrder::default();

    let options = ListenerOptions::new()
        .batch_failure(event_bus::BatchFailure::StopAtFirst)
        .retry(RetryPolicy::exponential(2).initial_backoff(Duration::ZERO));
    let report = runner::run(listener.clone(), log.clone(), letters.clone(), options).await;

    // Every event fails once and succeeds on its second attempt: the
    // events after a failure went back unattempted, so none used up an
    // attempt it did not make, and they were handled in order.
    assert_eq!(
        (report.handled, report.retried, report.dead_lettered),
        (3, 3, 0)
    );
    assert!(letters.letters.lock().unwrap().is_empty());
    assert_eq!(log.outcomes.lock().unwrap().acked, [1, 2, 3]);
    let processed = listener.processed.lock().unwrap().clone();
    assert_eq!(processed, [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)]);
    assert_eq!(log.outcomes.lock().unwrap().released, 3);
}

/// A delivery whose lease must be extended while its handler works.
struct Leased {
    entry: Entry,
    extended: Arc<std::sync::atomic::AtomicUsize>,
}

impl Delivery<Shop> for Leased {
    fn envelope(&self) -> &Arc<Envelope<Shop>> {
        self.entry.envelope()
    }

    fn attempt(&self) -> u32 {
        self.entry.attempt
    }

    async fn ack(self) {
        self.entry.ack().await;
    }

    async fn retry(self, _delay: Duration, _error: &str) -> Retry<Self> {
        Retry::InPlace(Leased {
            entry: Entry {
                attempt: self.entry.attempt + 1,
                ..self.entry
            },
            extended: self.extended,
        })
    }

    async fn terminate(self, reason: &str) {
        self.entry.terminate(reason).await;
    }

    async fn release(self) {
        self.entry.release().await;
    }

    fn in_progress(&self) {
        self.extended
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn progress_interval(&self) -> Option<Duration> {
        Some(Duration::from_secs(10))
    }
}

/// A log whose deliveries are leased.
struct LeasedLog(Log, Arc<std::sync::atomic::AtomicUsize>);

impl Source<Shop> for LeasedLog {
    type Delivery = Leased;

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Leased, Undecodable>>> {
        self.0.poll_next(cx).map(|next| {
            next.map(|next| {
                next.map(|entry| Leased {
                    entry,
                    extended: self.1.clone(),
                })
            })
        })
    }
}

/// Works a minute on the clock, and fails its first attempt.
struct Slow;

impl event_bus::Listener<Shop> for Slow {
    async fn handle(&self, _: Arc<Envelope<Shop>>, meta: Meta) -> Result<(), HandlerError> {
        tokio::time::sleep(Duration::from_secs(60)).await;
        match meta.attempt() {
            1 => Err("slow and wrong".into()),
            _ => Ok(()),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_leased_delivery_is_kept_alive_while_its_handler_works_and_its_retry_waits() {
    let extended = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let log = LeasedLog(Log::of(&[Shop::OrderPaid(1)]), extended.clone());
    let letters = Arc::new(Letters::default());
    let options = ListenerOptions::new().retry(
        RetryPolicy::exponential(2)
            .initial_backoff(Duration::from_secs(30))
            .jitter(false),
    );

    let report = runner::run(Slow, log, letters, options).await;

    assert_eq!(report.handled, 1);
    // Every 10s while held, on one clock from the first attempt to the
    // ack: at 10s to 140s (150s held: 60s, the 30s backoff, 60s; at 150s
    // it is done).
    assert_eq!(extended.load(std::sync::atomic::Ordering::Relaxed), 14);
}
