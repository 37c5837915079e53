//! A typed domain-event bus.
//!
//! An application describes what happens in its domain as one event enum.
//! Request handlers [`emit`](EventBus::emit) an event and return; background
//! [listeners](Listener) (a search indexer, a cache invalidator, a mailer)
//! receive the events they are interested in, each in its own supervised
//! task. The bus delivers at the speed of a channel, never blocks or fails
//! the emitter, and counts every event it could not deliver.
//!
//! # Examples
//!
//! ```
//! use std::time::Duration;
//! use event_bus::{DomainEvent, EventBus, HandlerError, listener};
//!
//! // The application's events. The derive writes the kind enum, the emit
//! // helpers (`emit_post_published`) and the handler trait (`AppEventHandler`).
//! #[derive(Debug, DomainEvent)]
//! enum AppEvent {
//!     UserCreated { id: u64 },
//!     PostPublished { id: u64 },
//! }
//!
//! // A listener: subscribed to exactly the events whose methods it implements.
//! struct SearchIndexer;
//!
//! #[listener]
//! impl AppEventHandler for SearchIndexer {
//!     async fn on_post_published(&self, id: &u64) -> Result<(), HandlerError> {
//!         println!("indexing post {id}");
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let bus = EventBus::new();
//! bus.spawn(SearchIndexer);
//!
//! bus.emit_user_created(1);   // nobody listens: costs a counter
//! bus.emit_post_published(2); // queued for SearchIndexer
//!
//! bus.quiesce().await; // every listener idle: no sleeps in tests
//! assert_eq!(bus.metrics().listener("SearchIndexer").unwrap().handled, 1);
//!
//! let report = bus.shutdown(Duration::from_secs(5)).await;
//! assert!(report.drained());
//! # }
//! ```
//!
//! [`Event`] and [`Listener`] can also be implemented by hand; see their
//! documentation.
//!
//! The rest of this page states the delivery rules; the tests in the
//! repository prove each one. The examples below share this event type:
//!
//! ```
//! #[derive(Debug, PartialEq, event_bus::DomainEvent)]
//! enum Tick {
//!     Fast(u64),
//!     Slow(u64),
//! }
//! ```
//!
//! ## Ordering
//!
//! Every emit takes a place in one bus-wide order, numbered by
//! [`Envelope::sequence`]. A subscriber receives every event whose kind is in
//! its interest set, and is never queued for or woken by any other. Events
//! of one [priority](#priority) arrive in that order, and all subscribers
//! agree on the relative order of the events they share; a higher-priority
//! event may overtake lower ones. A listener with the default concurrency of
//! 1 handles its events in the order it receives them; with
//! [`ListenerOptions::concurrency`] above 1 its handlers may finish in any
//! order.
//!
//! ```
//! # use event_bus::EventBus;
//! # #[derive(Debug, PartialEq, event_bus::DomainEvent)] enum Tick { Fast(u64), Slow(u64) }
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let bus = EventBus::new();
//! let mut slow = bus.subscribe(TickKind::Slow);
//! for i in 0..4 {
//!     bus.emit(Tick::Fast(i));
//!     bus.emit(Tick::Slow(i));
//! }
//! for i in 0..4 {
//!     assert_eq!(**slow.recv().await.unwrap(), Tick::Slow(i));
//! }
//! assert!(slow.is_empty()); // no `Fast` tick was ever queued
//! # }
//! ```
//!
//! ## Lagging
//!
//! Each subscriber has a bounded queue: one lane per priority, each of
//! [`Builder::capacity`] events (1024 by default). Under the default
//! [`LagPolicy::DropOldest`], an event that arrives at a full lane evicts the
//! oldest one of that lane. Nothing is lost silently: the consumer is told
//! [`RecvError::Lagged(n)`] with the exact number dropped, before the next
//! event it takes from the queue, a warning is logged, and the drop is
//! counted. For every subscriber and every lane, `delivered + dropped +
//! queued` equals the events of interest of that priority emitted since it
//! subscribed, in every snapshot ([`Subscription::lane`],
//! [`ListenerMetrics::lanes`], [`EventBus::metrics`]), even one taken while
//! other threads emit and receive.
//!
//! A lagging consumer never slows the emitters: the warning is logged after
//! the queue's lock is released, by the consumer, at most once a second per
//! queue (with the drops of the warnings it held back), so a slow log sink
//! delays nobody but that consumer. The events a full lane drops are dropped
//! by its consumer too, when it next receives (an event's last drop may close
//! the span it was emitted in): up to the lane's capacity of them wait for
//! it, and past that, for a consumer that never receives, the emitter drops
//! them itself.
//!
//! A consumer takes events from a lane in batches of up to 32 (never more
//! than the capacity), so that it and the emitters rarely meet on the
//! queue's lock; events it has taken are no longer dropped, and
//! [`Subscription::len`] counts them as queued. The capacity bounds what is
//! queued, so a lane holds at most its capacity plus that batch, and what a
//! full lane drops is always its oldest queued event, never the newest.
//!
//! ```
//! # use event_bus::{EventBus, LagPolicy, RecvError};
//! # #[derive(Debug, PartialEq, event_bus::DomainEvent)] enum Tick { Fast(u64), Slow(u64) }
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let bus = EventBus::new();
//! let mut ticks = bus.subscribe_with(TickKind::Fast, 2, LagPolicy::DropOldest);
//! for i in 0..5 {
//!     bus.emit(Tick::Fast(i));
//! }
//! assert_eq!(ticks.recv().await.unwrap_err(), RecvError::Lagged(3));
//! assert_eq!(**ticks.recv().await.unwrap(), Tick::Fast(3));
//! assert_eq!(**ticks.recv().await.unwrap(), Tick::Fast(4));
//! assert_eq!(ticks.delivered() + ticks.dropped(), 5);
//! # }
//! ```
//!
//! [`RecvError::Lagged(n)`]: RecvError::Lagged
//!
//! ## Backpressure
//!
//! A subscriber that must not lose events in memory uses
//! [`LagPolicy::Backpressure`]. [`EventBus::emit_wait`] waits until every
//! backpressure subscriber interested in the event has room in the event's
//! lane (one that subscribed while it waited included), so a slow consumer
//! slows the emitter instead; `emit_wait` never takes a lane past its
//! capacity and never drops an event to make room. A waiting emitter is woken once the
//! consumer holds at most `capacity - min(capacity / 2, 32)` events of the
//! lane (places reserved by other waiting emitters are not the consumer's),
//! and fills the free places in one go.
//!
//! [`EventBus::emit`], which must never block, queues past the capacity and
//! counts the event as overflowed, up to a hard ceiling of
//! [`OVERFLOW_FACTOR`] (2) times the capacity queued, places promised to
//! waiting `emit_wait` callers included (plus the batch the consumer has
//! taken, as for `DropOldest`); past it the lane drops its oldest queued
//! event, whoever emitted it, as `DropOldest` does, counted and reported as
//! `Lagged`. So memory stays bounded whatever the emitter does, and a
//! backpressure subscriber loses nothing as long as its emitters all use
//! `emit_wait`.
//!
//! ```
//! # use event_bus::{EventBus, LagPolicy};
//! # #[derive(Debug, PartialEq, event_bus::DomainEvent)] enum Tick { Fast(u64), Slow(u64) }
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let bus = EventBus::new();
//! let mut ticks = bus.subscribe_with(TickKind::Fast, 8, LagPolicy::Backpressure);
//!
//! let emitter = tokio::spawn({
//!     let bus = bus.clone();
//!     async move {
//!         for i in 0..1_000 {
//!             bus.emit_wait(Tick::Fast(i)).await; // waits while `ticks` is full
//!         }
//!     }
//! });
//! for i in 0..1_000 {
//!     assert_eq!(**ticks.recv().await.unwrap(), Tick::Fast(i));
//! }
//! emitter.await.unwrap();
//! assert_eq!((ticks.dropped(), ticks.overflowed()), (0, 0));
//! # }
//! ```
//!
//! ## Priority
//!
//! Each event kind has a [`Priority`], normal unless its variant says
//! `#[event(priority = "high")]` (or `"low"`); an emit can override it with
//! [`EventBus::with_priority`]. Every queue hands out the oldest event
//! of its highest non-empty lane: a high-priority event goes before every
//! normal and low event still queued, even those the consumer has already
//! taken in a batch, while events of one priority keep their emit order. A
//! listener does not interrupt the event it is handling.
//!
//! A fairness bound keeps a steady high-priority stream from starving the
//! rest: while a lane has events waiting, at most `fairness` events of higher
//! priority are handed out before the lane's oldest event
//! ([`Builder::fairness`] for the bus, [`ListenerOptions::fairness`] per
//! listener; [`DEFAULT_FAIRNESS`] is 32). When that many have passed it, the
//! oldest event of the lane goes next (and the count starts again for the
//! next one);
//! when two lanes are due, the lower goes first. `usize::MAX` serves strictly
//! by priority.
//!
//! Lanes are bounded and accounted for one by one (see [Lagging](#lagging)
//! and [Backpressure](#backpressure)): a flood of normal events can neither
//! evict a high-priority one nor make [`EventBus::emit_wait`] of one wait.
//!
//! ```
//! # use event_bus::{DomainEvent, EventBus, Priority};
//! #[derive(Debug, PartialEq, DomainEvent)]
//! enum Content {
//!     PostUpdated(u64),
//!     #[event(priority = "high")]
//!     PostTakenDown(u64),
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let bus = EventBus::builder().fairness(2).build();
//! let mut moderation = bus.subscribe(event_bus::KindSet::all());
//! for id in 0..3 {
//!     bus.emit(Content::PostUpdated(id));
//! }
//! for id in 10..15 {
//!     bus.emit(Content::PostTakenDown(id));
//! }
//!
//! let mut order = Vec::new();
//! while let Ok(event) = moderation.try_recv() {
//!     order.push(event.priority());
//! }
//! use Priority::{High, Normal};
//! // Take-downs first, but an update goes after every two of them.
//! assert_eq!(order, [High, High, Normal, High, High, Normal, High, Normal]);
//! # }
//! ```
//!
//! ## Batching
//!
//! A [`BatchListener`] handles events in batches: a search index that
//! commits once per batch, a cache that purges many keys at once. Spawned
//! with [`EventBus::spawn_with`], it is handed up to
//! [`ListenerOptions::max_batch`] events: what its queue holds when it is
//! free, and, with a [`ListenerOptions::max_wait`], whatever else arrives
//! until that long after the batch's first event
//! ([`Duration::MAX`](std::time::Duration::MAX): until the batch is full). A high-priority event ends the wait. A batch is in the
//! order the queue hands events out (see [Priority](#priority)): the highest
//! priority first, within the fairness bound, and an event that arrives
//! while a batch is being collected goes after the events already collected.
//!
//! The handler says which events failed: `Ok(())` handles the whole batch;
//! an error naming events ([`BatchError::event`], [`BatchError::events`])
//! fails those; any other error (`?`) or a panic fails the whole batch. The
//! listener's [`ListenerOptions::batch_failure`] says what is retried, per
//! its [`RetryPolicy`]:
//!
//! - [`BatchFailure::Independent`] (the default): the events not named are
//!   handled; the failed ones are retried together, as a smaller batch in
//!   their batch order, after the events that followed them were handled.
//!   Each one still failing after the last attempt becomes its own
//!   [`DeadLetter`].
//! - [`BatchFailure::StopAtFirst`]: the events before the first failed one
//!   are handled; that event and every event after it are retried, in
//!   order. After its last attempt the first failed event becomes a
//!   [`DeadLetter`] and the events after it go on as a new batch. With
//!   concurrency 1, events are handled in the order they were delivered.
//!
//! Metrics count events, not batches: every delivered event ends handled or
//! dead-lettered, once, and `failed == retried + dead_lettered`.
//!
//! The derive writes a batch handler trait too (`AppEventBatchHandler`),
//! whose methods take the payloads of a run of consecutive events of one
//! kind; it calls them run after run, in batch order, and under
//! `StopAtFirst` calls no run after the first that fails. `#[listener]` on
//! an impl of it makes a `BatchListener`.
//!
//! ```
//! # use event_bus::{BatchError, DomainEvent, EventBus, ListenerOptions, RetryPolicy, listener};
//! # use std::time::Duration;
//! #[derive(Debug, DomainEvent)]
//! enum Catalog {
//!     PostPublished(u64),
//! }
//!
//! struct Indexer;
//!
//! #[listener]
//! impl CatalogBatchHandler for Indexer {
//!     async fn on_post_published(&self, ids: &[&u64]) -> Result<(), BatchError> {
//!         // Index every post in one commit; post 13 cannot be read.
//!         match ids.iter().position(|&&id| id == 13) {
//!             Some(at) => Err(BatchError::event(at, "row locked")),
//!             None => Ok(()),
//!         }
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let bus = EventBus::new();
//! let options = ListenerOptions::new()
//!     .max_batch(50)
//!     .max_wait(Duration::from_millis(20))
//!     .retry(RetryPolicy::exponential(2));
//! let indexer = bus.spawn_with(Indexer, options);
//! for id in 0..100 {
//!     bus.emit(Catalog::PostPublished(id));
//! }
//! bus.quiesce().await;
//!
//! let metrics = indexer.metrics();
//! assert_eq!((metrics.handled, metrics.dead_lettered), (99, 1));
//! assert_eq!(bus.dead_letters().take()[0].attempts, 2);
//! # }
//! ```
//!
//! Writes whose order matters retry from their first failure:
//!
//! ```
//! # use event_bus::{BatchError, BatchFailure, DomainEvent, EventBus, ListenerOptions, RetryPolicy, listener};
//! # use std::collections::HashMap;
//! # use std::sync::atomic::{AtomicBool, Ordering};
//! # use std::sync::{Arc, Mutex};
//! #[derive(Debug, DomainEvent)]
//! enum Kv {
//!     Set { key: u64, value: u64 },
//!     Clear(u64),
//! }
//!
//! #[derive(Clone, Default)]
//! struct Store {
//!     values: Arc<Mutex<HashMap<u64, u64>>>,
//!     was_busy: Arc<AtomicBool>,
//! }
//!
//! #[listener]
//! impl KvBatchHandler for Store {
//!     async fn on_set(&self, writes: &[(&u64, &u64)]) -> Result<(), BatchError> {
//!         for (at, &(&key, &value)) in writes.iter().enumerate() {
//!             // Busy once, at `value: 20`. Under `StopAtFirst` the handler
//!             // may stop at its first failure: nothing after it counts.
//!             if value == 20 && !self.was_busy.swap(true, Ordering::Relaxed) {
//!                 return Err(BatchError::event(at, "store busy"));
//!             }
//!             self.values.lock().unwrap().insert(key, value);
//!         }
//!         Ok(())
//!     }
//!
//!     async fn on_clear(&self, keys: &[&u64]) -> Result<(), BatchError> {
//!         for key in keys {
//!             self.values.lock().unwrap().remove(key);
//!         }
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let bus = EventBus::new();
//! let store = Store::default();
//! let options = ListenerOptions::new()
//!     .batch_failure(BatchFailure::StopAtFirst)
//!     .retry(RetryPolicy::exponential(3));
//! bus.spawn_with(store.clone(), options);
//! bus.emit(Kv::Set { key: 1, value: 10 });
//! bus.emit(Kv::Set { key: 1, value: 20 }); // fails once
//! bus.emit(Kv::Clear(1));
//! bus.emit(Kv::Set { key: 2, value: 5 });
//! bus.quiesce().await;
//!
//! // As if nothing had failed: retried from `value: 20` on, in order. (The
//! // default mode would retry it after the clear, leaving key 1 set.)
//! assert_eq!(*store.values.lock().unwrap(), HashMap::from([(2, 5)]));
//! # }
//! ```
//!
//! ## Failures
//!
//! A listener's error, panic or slowness never reaches the emitter and never
//! delays another listener: each listener has its own queue and task. A
//! handler error is logged with the listener, event name and event id, and
//! counted; a panic is caught, counted, and the listener goes on with its
//! next event. Both are retried per the listener's [`RetryPolicy`]
//! (exponential backoff with jitter); after the last attempt the event
//! becomes a [`DeadLetter`] that the application can
//! [read or subscribe to](EventBus::dead_letters). Should the bus's own code
//! panic in a listener's task, the panic is caught too: it is logged at error
//! level and the listener ends with [`ListenerStatus::Crashed`], its
//! unhandled events reported undelivered; it never disappears silently.
//!
//! [`ListenerMetrics`] accounts for every event, in every snapshot: each
//! delivered event is `handled`, `dead_lettered` or still `in_flight`, and
//! every failed attempt was `retried` or ended in a dead letter (`failed ==
//! retried + dead_lettered`).
//!
//! ## Handlers and their task
//!
//! A listener's events are handled on its own tokio task. Between events the
//! runtime takes part in tokio's cooperative budget, as tokio's channels do:
//! a handler that never awaits (CPU work, a ready future) still lets the
//! other tasks of its worker run every so many events, and a stop
//! ([`ListenerHandle::abort`], the [`shutdown`](EventBus::shutdown) deadline)
//! is checked between events, so it takes effect even then, and is final. A
//! handler that *blocks its thread* (a synchronous call that waits) blocks
//! that worker, and nothing can stop it before it returns: run such work with
//! [`tokio::task::spawn_blocking`] and await it.
//!
//! ```
//! # use event_bus::{EventBus, Envelope, HandlerError, Listener, ListenerOptions};
//! # use std::sync::Arc;
//! # #[derive(Debug, PartialEq, event_bus::DomainEvent)] enum Tick { Fast(u64), Slow(u64) }
//! struct Checksum;
//!
//! impl Listener<Tick> for Checksum {
//!     async fn handle(&self, tick: Arc<Envelope<Tick>>, _: event_bus::Meta) -> Result<(), HandlerError> {
//!         std::hint::black_box(&tick); // CPU work: never awaits
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let bus = EventBus::new();
//! let checksum = bus.spawn_with(Checksum, ListenerOptions::new().capacity(100_000));
//! for i in 0..100_000 {
//!     bus.emit(Tick::Fast(i));
//! }
//! // On this one-thread runtime the listener runs until its budget is
//! // spent, then lets this task go on, which stops it.
//! tokio::task::yield_now().await;
//! checksum.abort();
//! checksum.finished().await;
//! let handled = checksum.metrics().handled;
//! assert!(0 < handled && handled < 100_000);
//! # }
//! ```
//!
//! ```
//! # use event_bus::{EventBus, Envelope, HandlerError, Listener, ListenerOptions, RetryPolicy};
//! # use std::sync::Arc;
//! # use std::time::Duration;
//! # #[derive(Debug, PartialEq, event_bus::DomainEvent)] enum Tick { Fast(u64), Slow(u64) }
//! struct Flaky;
//!
//! impl Listener<Tick> for Flaky {
//!     async fn handle(&self, tick: Arc<Envelope<Tick>>, _: event_bus::Meta) -> Result<(), HandlerError> {
//!         match **tick {
//!             Tick::Fast(0) => panic!("bug"),
//!             Tick::Fast(_) => Err("timeout".into()),
//!             Tick::Slow(_) => Ok(()),
//!         }
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let bus = EventBus::new();
//! let retry = RetryPolicy::exponential(3).initial_backoff(Duration::from_millis(10));
//! bus.spawn_with(Flaky, ListenerOptions::new().retry(retry));
//!
//! bus.emit(Tick::Fast(0));
//! bus.emit(Tick::Fast(1));
//! bus.emit(Tick::Slow(2));
//! bus.quiesce().await;
//!
//! let metrics = bus.metrics();
//! let flaky = metrics.listener("Flaky").unwrap();
//! assert_eq!((flaky.handled, flaky.failed, flaky.panicked), (1, 6, 3));
//! assert_eq!((flaky.retried, flaky.dead_lettered), (4, 2));
//!
//! let letters = bus.dead_letters().take();
//! assert_eq!(letters[0].error, "panicked: bug");
//! assert_eq!(letters[1].error, "timeout");
//! assert_eq!(letters[1].attempts, 3);
//! # }
//! ```
//!
//! ## Shutdown
//!
//! [`EventBus::shutdown`] shuts down in two phases within a deadline. First
//! it refuses new events from outside (counted as rejected) while listeners
//! finish their queues; the follow-up events that listeners' handlers emit
//! meanwhile are still delivered, so a chain of listeners drains to its end.
//! Once every listener is idle, or the deadline has passed, the bus closes;
//! listeners still busy are stopped. It returns a [`ShutdownReport`] with
//! what each listener handled and what it left undelivered, once their tasks
//! have ended, so the report is final. Dropping every `EventBus` handle
//! closes the bus at once, without the first phase: listeners finish their
//! queues and end. (A listener that holds a handle to emit follow-up events
//! keeps the bus open; call `shutdown`.)
//!
//! ```
//! # use event_bus::{EventBus, Envelope, HandlerError, Listener};
//! # use std::sync::Arc;
//! # use std::time::Duration;
//! # #[derive(Debug, PartialEq, event_bus::DomainEvent)] enum Tick { Fast(u64), Slow(u64) }
//! struct Archiver;
//!
//! impl Listener<Tick> for Archiver {
//!     async fn handle(&self, _: Arc<Envelope<Tick>>, _: event_bus::Meta) -> Result<(), HandlerError> {
//!         tokio::time::sleep(Duration::from_millis(10)).await; // slow work
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let bus = EventBus::new();
//! bus.spawn(Archiver);
//! for i in 0..100 {
//!     bus.emit(Tick::Slow(i));
//! }
//!
//! // 100 events at 10ms each do not fit in 500ms.
//! let report = bus.shutdown(Duration::from_millis(500)).await;
//! let archiver = report.listener("Archiver").unwrap();
//! assert!(!archiver.drained);
//! assert_eq!(archiver.handled + archiver.undelivered, 100);
//!
//! bus.emit(Tick::Slow(100)); // after shutdown: rejected and counted
//! assert_eq!(bus.metrics().rejected, 1);
//! # }
//! ```
//!
//! ## Tiers: the same listeners over other carriers
//!
//! The bus is the *memory tier*: events live in per-listener queues in the
//! process. The listener code does not depend on it. Everything above is
//! done by the [`runner`], which runs a listener over any
//! [`Source`](runner::Source) of deliveries; the bus's queues are one source,
//! and a durable log or a broker's consumer are others (see the [`runner`]
//! module for how their acks, retries and leases map onto it).
//! [`runner::run`] runs any listener over a source of one's own with the same
//! supervision, retries, dead letters and batching.
//!
//! What a handler can count on, on every tier:
//!
//! - [`Meta`]: the event's id, the same on every attempt and every tier, and
//!   the attempt. A tier that stores events delivers *at least once*, so a
//!   handler whose effect must happen once records the ids it applied.
//! - Retries per its [`RetryPolicy`], then a [`DeadLetter`]; an event that
//!   no longer decodes is a dead letter with the reason, never a crash loop.
//! - Its [`Scope`]: handled once across processes, or once in each.
//!
//! Priority lanes, fairness, lag policies, the bus-wide sequence and
//! [`quiesce`](EventBus::quiesce) are the memory tier's.
//!
//! Publishing is a trait too: [`Publish`]. The derive's emit helpers work on
//! anything that publishes: the bus, [`bus.with_priority(p)`](EventBus::with_priority),
//! the application's state (through `AsRef<EventBus<E>>`), or a type of the
//! application's own, such as an outbox transaction that buffers its events
//! and writes them when it commits. Events cross a process boundary through
//! the `codec` module (feature `serde`): JSON, tagged by the event's name
//! (`user.created`), never its variant's position, so reordering the enum
//! breaks nothing, and `#[event(alias = "…")]` reads events stored under an
//! old name.
//!
//! ```
//! use std::sync::Mutex;
//! use event_bus::{DomainEvent, EventBus, Priority, Publish};
//!
//! #[derive(Debug, DomainEvent)]
//! enum Shop {
//!     OrderPaid(u64),
//! }
//!
//! /// Buffers what a request emits, as an outbox transaction would.
//! #[derive(Default)]
//! struct Outbox(Mutex<Vec<Shop>>);
//!
//! impl Publish<Shop> for Outbox {
//!     fn publish(&self, event: Shop) {
//!         self.0.lock().unwrap().push(event);
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let outbox = Outbox::default();
//! outbox.emit_order_paid(7); // the same helper as on the bus
//! assert_eq!(outbox.0.lock().unwrap().len(), 1);
//!
//! let bus = EventBus::new();
//! let mut orders = bus.subscribe(ShopKind::OrderPaid);
//! bus.with_priority(Priority::High).emit_order_paid(8);
//! assert_eq!(orders.recv().await.unwrap().priority(), Priority::High);
//! # }
//! ```
//!
//! # Feature flags
//!
//! - `derive` (default): [`DomainEvent`](derive@DomainEvent) and
//!   [`listener`](macro@listener), from `event-bus-derive`.
//! - `metrics`: exports the bus's counters through the
//!   [`metrics`](https://docs.rs/metrics) facade; see [`mod@metrics`].
//! - `testing`: the `testing` module, `EventRecorder` and its assertions,
//!   for the application's tests of what its handlers emit (enable it in
//!   `[dev-dependencies]`).
//! - `serde`: `Serialize` for metrics snapshots and shutdown reports, and
//!   the `codec` module: events to and from JSON, for tiers that store or
//!   carry them out of the process. Without it, nothing of serde is
//!   compiled.

mod batch;
#[cfg(feature = "serde")]
pub mod codec;
mod dead_letter;
mod envelope;
pub mod error;
mod event;
pub mod handler;
mod listener;
mod memory;
mod meta;
pub mod metrics;
#[cfg(feature = "nats")]
pub mod nats;
mod publish;
pub mod runner;
#[cfg(feature = "sql")]
pub mod sql;
mod sync;
#[cfg(feature = "testing")]
pub mod testing;
mod throttle;
mod trace;

#[cfg(all(test, loom))]
mod loom_tests;

pub use batch::{Batch, BatchError, BatchListener};
pub use dead_letter::DeadLetter;
pub use envelope::{Envelope, Metadata};
pub use error::{HandlerError, Lagged, RecvError, TryRecvError};
pub use event::{Event, EventKind, KindSet, KindSetIter, Priority};
pub use listener::{
    BatchFailure, DEFAULT_MAX_BATCH, LagPolicy, Listener, ListenerOptions, OVERFLOW_FACTOR,
    RetryPolicy, Scope,
};
pub use memory::bus::{
    Builder, DEFAULT_CAPACITY, DEFAULT_DEAD_LETTER_CAPACITY, DEFAULT_FAIRNESS, EventBus,
    Prioritized,
};
pub use memory::dead_letters::{DeadLetterSubscription, DeadLetters};
pub use memory::listeners::{ListenerHandle, ListenerReport, ShutdownReport};
pub use memory::runtime::ABORT_GRACE;
pub use memory::subscription::Subscription;
pub use meta::Meta;
pub use metrics::{
    BusMetrics, KindCount, LaneMetrics, LatencySummary, ListenerMetrics, ListenerStatus,
};
pub use publish::Publish;
pub use runner::{InBatches, OneByOne, Spawnable};
pub use trace::TraceParent;

/// Derives [`Event`] for an enum, and writes the code around it: the kind
/// enum, an emit helper per variant, a handler trait with one method per
/// variant plus the `match` that routes to them, and the same for batches.
///
/// # Examples
///
/// ```
/// use std::sync::Arc;
/// use event_bus::{DomainEvent, EventBus, HandlerError, listener};
///
/// #[derive(Debug, Clone)]
/// pub struct UserEventData {
///     pub id: i64,
///     pub username: String,
/// }
///
/// #[derive(Debug, DomainEvent)]
/// pub enum AppEvent {
///     UserCreated(UserEventData),          // newtype: the payload
///     UserDeleted { id: i64 },              // struct: its fields
///     #[event(name = "cache.purged")]
///     CacheFlushed,                         // unit: nothing
/// }
///
/// // The row the handler has; listeners get the lighter payload.
/// pub struct User { pub id: i64, pub username: String, pub password_hash: String }
///
/// impl From<&User> for UserEventData {
///     fn from(user: &User) -> Self {
///         Self { id: user.id, username: user.username.clone() }
///     }
/// }
///
/// // The application's state exposes its bus, so the helpers work on it.
/// pub struct AppState { events: EventBus<AppEvent> }
///
/// impl AsRef<EventBus<AppEvent>> for AppState {
///     fn as_ref(&self) -> &EventBus<AppEvent> { &self.events }
/// }
///
/// // A listener implements the methods of the events it wants, and is
/// // subscribed to exactly those.
/// struct SearchIndexer;
///
/// #[listener]
/// impl AppEventHandler for SearchIndexer {
///     async fn on_user_created(&self, user: &UserEventData) -> Result<(), HandlerError> {
///         println!("indexing {}", user.username);
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let state = Arc::new(AppState { events: EventBus::new() });
/// let indexer = state.events.spawn(SearchIndexer);
///
/// let user = User { id: 1, username: "ada".into(), password_hash: "…".into() };
/// state.emit_user_created(&user); // a request handler's one line
/// state.emit_user_deleted(1);
/// state.emit_cache_flushed();
///
/// state.events.quiesce().await;
/// assert_eq!(indexer.metrics().delivered, 1); // never woken for the others
/// # }
/// ```
///
/// # What it generates
///
/// For `AppEvent` above, with the visibility of the enum:
///
/// ```text
/// enum AppEventKind { UserCreated, UserDeleted, CacheFlushed }   // Copy, Eq, Ord, Hash, Debug
/// impl EventKind for AppEventKind { … }   // "user.created", "user.deleted", "cache.purged";
///                                         // `from_name` a `match` on names and aliases
/// impl Event for AppEvent { type Kind = AppEventKind; … }
///
/// trait EmitAppEvent: Publish<AppEvent> {                    // for every such type
///     fn emit_user_created(&self, data: impl Into<UserEventData>);
///     fn emit_user_created_wait(&self, data: impl Into<UserEventData>) -> impl Future<Output = ()> + Send;
///     fn emit_user_deleted(&self, id: i64);
///     fn emit_user_deleted_wait(&self, id: i64) -> impl Future<Output = ()> + Send;
///     fn emit_cache_flushed(&self);
///     fn emit_cache_flushed_wait(&self) -> impl Future<Output = ()> + Send;
/// }
///
/// trait AppEventHandler: Send + Sync + 'static {               // every method defaults to Ok(())
///     async fn on_user_created(&self, data: &UserEventData) -> Result<(), HandlerError>;
///     async fn on_user_deleted(&self, id: &i64) -> Result<(), HandlerError>;
///     async fn on_cache_flushed(&self) -> Result<(), HandlerError>;
///     async fn dispatch(&self, event: &AppEvent) -> Result<(), HandlerError>; // the match
/// }
///
/// impl<H: AppEventHandler> Routes<H> for AppEvent { … }       // what #[listener] builds on
///
/// trait AppEventBatchHandler: Send + Sync + 'static {          // every method defaults to Ok(())
///     async fn on_user_created(&self, batch: &[&UserEventData]) -> Result<(), BatchError>;
///     async fn on_user_deleted(&self, batch: &[&i64]) -> Result<(), BatchError>;
///     async fn on_cache_flushed(&self, count: usize) -> Result<(), BatchError>;
///     async fn dispatch_batch(&self, batch: &Batch<AppEvent>) -> Result<(), BatchError>;
/// }
///
/// impl<H: AppEventBatchHandler> BatchRoutes<H> for AppEvent { … }
/// ```
///
/// A batch handler method gets the payloads of a run of consecutive events
/// of its kind in a batch, in order: a newtype's payload, a struct variant's
/// field (or a tuple of references to its fields, when it has several), or
/// the count of a unit variant's events. `dispatch_batch` splits a batch
/// into maximal runs of one kind and calls their methods in batch order, so
/// the events are handled in the order they were delivered: a batch
/// `[set(1, 10), clear(1), set(1, 20)]` is `on_set` with one payload, then
/// `on_clear`, then `on_set` again, never both sets before the clear. A
/// [`BatchError`] a method returns names failures by their index in its
/// slice, and `dispatch_batch` maps those indices back to the batch.
///
/// A newtype variant's helper takes `impl Into<Payload>`, so
/// `emit_user_created(&user)` works once `From<&User> for UserEventData`
/// exists; a primitive payload (`UserDeleted(u64)`) is taken as it is, so an
/// integer literal needs no suffix.
///
/// The emit helpers work on anything that [publishes](Publish) the enum's
/// events: the bus, anything that exposes one through `AsRef<EventBus<E>>`
/// (the application's state above), or a type of your own, such as an
/// outbox transaction that writes the events when it commits. The `_wait`
/// helpers call [`Publish::publish_wait`], the others [`Publish::publish`];
/// on a bus those are [`EventBus::emit_wait`] and [`EventBus::emit`],
/// inlined, with nothing boxed.
///
/// The handler methods are declared as `fn … -> impl Future<…> + Send`;
/// implement them with `async fn`.
///
/// # Attributes
///
/// On the enum, `#[event(...)]` names the generated items and the crate path:
///
/// | key | default | example |
/// |---|---|---|
/// | `kind` | `{Enum}Kind` | `#[event(kind = "Topic")]` |
/// | `handler` | `{Enum}Handler` | `#[event(handler = "Handles")]` |
/// | `batch_handler` | `{Enum}BatchHandler` | `#[event(batch_handler = "HandlesBatches")]` |
/// | `emitter` | `Emit{Enum}` | `#[event(emitter = "Emits")]` |
/// | `crate` | `::event_bus` | `#[event(crate = "::my_app::event_bus")]`, for a crate that re-exports `event_bus` |
///
/// On a variant:
///
/// | key | effect | example |
/// |---|---|---|
/// | `name` | the event name, instead of the dotted snake case of the variant (`UserCreated` → `"user.created"`); lowercase words separated by dots | `#[event(name = "user.signed_up")]` |
/// | `alias` | a former name of the event, still accepted by [`EventKind::from_name`] (so a codec reads events stored under it) and listed by [`EventKind::aliases`]; repeat the key for several; a valid name that no variant has and no other alias is | `#[event(alias = "user.registered")]` |
/// | `priority` | the kind's [`Priority`]: `"high"`, `"normal"` (the default) or `"low"` | `#[event(priority = "high")]` |
/// | `skip_emit` | no emit helpers for this variant (it can still be emitted with `bus.emit(…)`) | `#[event(skip_emit)]` |
///
/// ```
/// use event_bus::{DomainEvent, EventKind, Priority};
///
/// #[derive(DomainEvent)]
/// #[event(kind = "Topic", handler = "Handles", emitter = "Emits")]
/// enum Signal {
///     #[event(name = "signal.up")]
///     Started,
///     #[event(priority = "high")]
///     Stopped,
///     #[event(skip_emit)]
///     Internal(u8),
/// }
///
/// assert_eq!(Topic::Started.name(), "signal.up");
/// assert_eq!(Topic::Internal.name(), "internal");
/// assert_eq!(Topic::Stopped.priority(), Priority::High);
/// ```
///
/// An event renamed after it was stored keeps its old names as aliases:
///
/// ```
/// use event_bus::{DomainEvent, EventKind};
///
/// #[derive(DomainEvent)]
/// enum AppEvent {
///     // Was `UserRegistered`, then `#[event(name = "account.opened")]`.
///     #[event(alias = "user.registered", alias = "account.opened")]
///     UserCreated { id: u64 },
/// }
///
/// let kind = AppEventKind::UserCreated;
/// assert_eq!(kind.name(), "user.created"); // what is written from now on
/// assert_eq!(kind.aliases(), ["user.registered", "account.opened"]);
/// assert_eq!(AppEventKind::from_name("user.registered"), Some(kind));
/// ```
///
/// # Errors
///
/// Every misuse is a compile error on your own tokens, all of them at once.
/// The most common:
///
/// Deriving on a struct:
///
/// ```text
/// error: `DomainEvent` can only be derived for enums; wrap the struct in an enum variant, like `enum AppEvent { UserCreated(UserCreated) }`
///  --> src/events.rs:4:1
///   |
/// 4 | struct UserCreated {
///   | ^^^^^^
/// ```
///
/// ```compile_fail
/// #[derive(event_bus::DomainEvent)]
/// struct UserCreated {
///     id: u64,
/// }
/// ```
///
/// A misspelled key:
///
/// ```text
/// error: unknown `event` attribute key `nmae`; expected one of `name`, `alias`, `priority`, `skip_emit`
///  --> src/events.rs:6:13
///   |
/// 6 |     #[event(nmae = "user.created")]
///   |             ^^^^
/// ```
///
/// ```compile_fail
/// #[derive(event_bus::DomainEvent)]
/// enum AppEvent {
///     #[event(nmae = "user.created")]
///     UserCreated,
/// }
/// ```
///
/// Two variants with one event name:
///
/// ```text
/// error: event name `user.created` is already used by variant `UserCreated`; give one of them another name with `#[event(name = "…")]`
///  --> src/events.rs:6:20
///   |
/// 6 |     #[event(name = "user.created")]
///   |                    ^^^^^^^^^^^^^^
/// ```
///
/// ```compile_fail
/// #[derive(event_bus::DomainEvent)]
/// enum AppEvent {
///     UserCreated,
///     #[event(name = "user.created")]
///     UserRegistered,
/// }
/// ```
///
/// An alias that is already an event's name, or another variant's alias:
///
/// ```text
/// error: alias `user.created` is already the name of `UserCreated`; remove the alias, or give `UserCreated` another name with `#[event(name = "…")]`
///  --> src/events.rs:6:21
///   |
/// 6 |     #[event(alias = "user.created")]
///   |                     ^^^^^^^^^^^^^^
/// ```
///
/// ```compile_fail
/// #[derive(event_bus::DomainEvent)]
/// enum AppEvent {
///     UserCreated,
///     #[event(alias = "user.created")]
///     UserRegistered,
/// }
/// ```
///
/// Also rejected: unions, empty and generic enums, tuple variants of more than
/// one field, duplicate keys, invalid names and aliases.
#[cfg(feature = "derive")]
#[doc(inline)]
pub use event_bus_derive::DomainEvent;

/// Makes an `impl` of a handler trait generated by
/// [`DomainEvent`](derive@DomainEvent) a [`Listener`], subscribed to exactly
/// the kinds whose `on_*` methods the block defines; an `impl` of the batch
/// handler trait becomes a [`BatchListener`] the same way.
///
/// The listener is never queued for or woken by the other kinds. Its name
/// is the type's name unless `name` is given; `crate` is the path of
/// `event_bus` for crates that re-export it.
///
/// The trait's methods end with a [`Meta`] parameter (`meta: Meta`, or
/// `metas: &[Meta]` for a batch handler, one per payload): the event's id
/// and the attempt. A method that does not read it leaves it out, and the
/// attribute adds it; write its type as `Meta` (or a path ending in `Meta`)
/// so that the attribute sees it.
///
/// # Examples
///
/// ```
/// use event_bus::{DomainEvent, EventBus, HandlerError, Listener, listener};
///
/// #[derive(DomainEvent)]
/// enum AppEvent {
///     UserCreated(u64),
///     PostPublished(u64),
///     PostDeleted(u64),
/// }
///
/// struct Cache;
///
/// #[listener(name = "cache")]
/// impl AppEventHandler for Cache {
///     async fn on_post_published(&self, id: &u64) -> Result<(), HandlerError> {
///         println!("invalidate post {id}");
///         Ok(())
///     }
///
///     async fn on_post_deleted(&self, id: &u64) -> Result<(), HandlerError> {
///         println!("invalidate post {id}");
///         Ok(())
///     }
/// }
///
/// assert_eq!(
///     Listener::<AppEvent>::interests(&Cache),
///     [AppEventKind::PostPublished, AppEventKind::PostDeleted].into(),
/// );
/// assert_eq!(Listener::<AppEvent>::name(&Cache), "cache");
/// ```
///
/// # Errors
///
/// A method that matches no variant is not a member of the trait, and the
/// compiler suggests the closest:
///
/// ```text
/// error[E0407]: method `on_user_craeted` is not a member of trait `AppEventHandler`
///   --> src/listeners.rs:13:5
///    |
/// 13 |     async fn on_user_craeted(&self, id: &u64) -> Result<(), HandlerError> {
///    |     ^        --------------- help: there is an associated function with a similar name: `on_user_created`
/// ```
///
/// ```compile_fail,E0407
/// # use event_bus::{DomainEvent, HandlerError, listener};
/// # #[derive(DomainEvent)]
/// # enum AppEvent { UserCreated(u64) }
/// struct Mailer;
///
/// #[listener]
/// impl AppEventHandler for Mailer {
///     async fn on_user_craeted(&self, id: &u64) -> Result<(), HandlerError> {
///         Ok(())
///     }
/// }
/// ```
///
/// A block with no `on_*` method, or the attribute on anything but a trait
/// `impl`, is rejected with a message that says what to write instead.
#[cfg(feature = "derive")]
#[doc(inline)]
pub use event_bus_derive::listener;

/// What the code generated by `#[derive(DomainEvent)]` and `#[listener]`
/// names. Not public API: it may change in any release.
#[doc(hidden)]
pub mod __private {
    pub use crate::handler::{BatchRoutes, Routes};
    pub use crate::{
        Batch, BatchError, BatchFailure, BatchListener, Envelope, Event, EventBus, EventKind,
        HandlerError, KindSet, Listener, Meta, Priority, Publish,
    };
    pub use core::future::Future;
    pub use core::option::Option;
    pub use core::result::Result;
    pub use std::sync::Arc;
    pub use std::vec::Vec;

    /// The kind type of an input the derive rejected, so that the
    /// `Event` impl it still emits keeps follow-on errors away.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum StubKind {}

    impl EventKind for StubKind {
        const ALL: &'static [Self] = &[];

        fn index(self) -> usize {
            match self {}
        }

        fn name(self) -> &'static str {
            match self {}
        }
    }
}
