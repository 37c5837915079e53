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
//! use std::sync::Arc;
//! use std::time::Duration;
//! use event_bus::{Envelope, Event, EventBus, EventKind, HandlerError, KindSet, Listener};
//!
//! // The event model. `#[derive(DomainEvent)]` writes these two impls.
//! #[derive(Debug)]
//! enum AppEvent {
//!     UserCreated { id: u64 },
//!     PostPublished { id: u64 },
//! }
//!
//! #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
//! enum AppEventKind { UserCreated, PostPublished }
//!
//! impl EventKind for AppEventKind {
//!     const ALL: &'static [Self] = &[Self::UserCreated, Self::PostPublished];
//!     fn index(self) -> usize { self as usize }
//!     fn name(self) -> &'static str {
//!         match self { Self::UserCreated => "user.created", Self::PostPublished => "post.published" }
//!     }
//! }
//!
//! impl Event for AppEvent {
//!     type Kind = AppEventKind;
//!     fn kind(&self) -> AppEventKind {
//!         match self {
//!             Self::UserCreated { .. } => AppEventKind::UserCreated,
//!             Self::PostPublished { .. } => AppEventKind::PostPublished,
//!         }
//!     }
//! }
//!
//! // A listener: woken only for the kinds it names.
//! struct SearchIndexer;
//!
//! impl Listener<AppEvent> for SearchIndexer {
//!     fn interests(&self) -> KindSet<AppEventKind> {
//!         KindSet::from(AppEventKind::PostPublished)
//!     }
//!
//!     async fn handle(&self, event: Arc<Envelope<AppEvent>>) -> Result<(), HandlerError> {
//!         if let AppEvent::PostPublished { id } = **event {
//!             println!("indexing post {id}");
//!         }
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let bus = EventBus::new();
//! bus.spawn(SearchIndexer);
//!
//! bus.emit(AppEvent::UserCreated { id: 1 });   // nobody listens: costs a counter
//! bus.emit(AppEvent::PostPublished { id: 2 }); // queued for SearchIndexer
//!
//! bus.quiesce().await; // every listener idle: no sleeps in tests
//! assert_eq!(bus.metrics().listener("SearchIndexer").unwrap().handled, 1);
//!
//! let report = bus.shutdown(Duration::from_secs(5)).await;
//! assert!(report.drained());
//! # }
//! ```
//!
//! The rest of this page states the delivery rules; the tests in the
//! repository prove each one. The examples below share this event type:
//!
//! ```
//! # use event_bus::{Event, EventKind};
//! #[derive(Debug, PartialEq)]
//! enum Tick { Fast(u64), Slow(u64) }
//!
//! #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
//! enum TickKind { Fast, Slow }
//!
//! impl EventKind for TickKind {
//!     const ALL: &'static [Self] = &[Self::Fast, Self::Slow];
//!     fn index(self) -> usize { self as usize }
//!     fn name(self) -> &'static str { ["tick.fast", "tick.slow"][self as usize] }
//! }
//!
//! impl Event for Tick {
//!     type Kind = TickKind;
//!     fn kind(&self) -> TickKind {
//!         match self { Tick::Fast(_) => TickKind::Fast, Tick::Slow(_) => TickKind::Slow }
//!     }
//! }
//! ```
//!
//! ## Ordering
//!
//! Every emit takes a place in one bus-wide order, numbered by
//! [`Envelope::sequence`]. A subscriber receives every event whose kind is in
//! its interest set, in that order, and is never queued for or woken by any
//! other. All subscribers agree on the relative order of the events they
//! share. A listener with the default concurrency of 1 handles its events in
//! the same order; with [`ListenerOptions::concurrency`] above 1 its handlers
//! may finish in any order.
//!
//! ```
//! # use event_bus::{Event, EventKind, EventBus};
//! # #[derive(Debug, PartialEq)] enum Tick { Fast(u64), Slow(u64) }
//! # #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)] enum TickKind { Fast, Slow }
//! # impl EventKind for TickKind { const ALL: &'static [Self] = &[Self::Fast, Self::Slow];
//! #     fn index(self) -> usize { self as usize } fn name(self) -> &'static str { ["tick.fast", "tick.slow"][self as usize] } }
//! # impl Event for Tick { type Kind = TickKind;
//! #     fn kind(&self) -> TickKind { match self { Tick::Fast(_) => TickKind::Fast, Tick::Slow(_) => TickKind::Slow } } }
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
//! Each subscriber has a bounded queue ([`Builder::capacity`], 1024 by
//! default). Under the default [`LagPolicy::DropOldest`], an event that
//! arrives at a full queue evicts the oldest one. Nothing is lost silently:
//! the consumer's next receive returns [`RecvError::Lagged(n)`] with the
//! exact number dropped, a warning is logged, and the drop is counted. For
//! every subscriber, at every moment, `delivered + dropped + queued` equals
//! the events of interest emitted since it subscribed.
//!
//! ```
//! # use event_bus::{Event, EventKind, EventBus, LagPolicy, RecvError};
//! # #[derive(Debug, PartialEq)] enum Tick { Fast(u64), Slow(u64) }
//! # #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)] enum TickKind { Fast, Slow }
//! # impl EventKind for TickKind { const ALL: &'static [Self] = &[Self::Fast, Self::Slow];
//! #     fn index(self) -> usize { self as usize } fn name(self) -> &'static str { ["tick.fast", "tick.slow"][self as usize] } }
//! # impl Event for Tick { type Kind = TickKind;
//! #     fn kind(&self) -> TickKind { match self { Tick::Fast(_) => TickKind::Fast, Tick::Slow(_) => TickKind::Slow } } }
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
//! [`LagPolicy::Backpressure`]. It never drops: [`EventBus::emit_wait`] waits
//! until every interested backpressure subscriber has room, so a slow
//! consumer slows the emitter instead. [`EventBus::emit`], which must never
//! block, queues past the capacity and counts the event as overflowed.
//!
//! ```
//! # use event_bus::{Event, EventKind, EventBus, LagPolicy};
//! # #[derive(Debug, PartialEq)] enum Tick { Fast(u64), Slow(u64) }
//! # #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)] enum TickKind { Fast, Slow }
//! # impl EventKind for TickKind { const ALL: &'static [Self] = &[Self::Fast, Self::Slow];
//! #     fn index(self) -> usize { self as usize } fn name(self) -> &'static str { ["tick.fast", "tick.slow"][self as usize] } }
//! # impl Event for Tick { type Kind = TickKind;
//! #     fn kind(&self) -> TickKind { match self { Tick::Fast(_) => TickKind::Fast, Tick::Slow(_) => TickKind::Slow } } }
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
//! ## Failures
//!
//! A listener's error, panic or slowness never reaches the emitter and never
//! delays another listener: each listener has its own queue and task. A
//! handler error is logged with the listener, event name and event id, and
//! counted; a panic is caught, counted, and the listener goes on with its
//! next event. Both are retried per the listener's [`RetryPolicy`]
//! (exponential backoff with jitter); after the last attempt the event
//! becomes a [`DeadLetter`] that the application can
//! [read or subscribe to](EventBus::dead_letters).
//!
//! ```
//! # use event_bus::{Event, EventKind, EventBus, Envelope, HandlerError, Listener, ListenerOptions, RetryPolicy};
//! # use std::sync::Arc;
//! # use std::time::Duration;
//! # #[derive(Debug, PartialEq)] enum Tick { Fast(u64), Slow(u64) }
//! # #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)] enum TickKind { Fast, Slow }
//! # impl EventKind for TickKind { const ALL: &'static [Self] = &[Self::Fast, Self::Slow];
//! #     fn index(self) -> usize { self as usize } fn name(self) -> &'static str { ["tick.fast", "tick.slow"][self as usize] } }
//! # impl Event for Tick { type Kind = TickKind;
//! #     fn kind(&self) -> TickKind { match self { Tick::Fast(_) => TickKind::Fast, Tick::Slow(_) => TickKind::Slow } } }
//! struct Flaky;
//!
//! impl Listener<Tick> for Flaky {
//!     async fn handle(&self, tick: Arc<Envelope<Tick>>) -> Result<(), HandlerError> {
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
//! [`EventBus::shutdown`] stops accepting events, lets every listener drain
//! its queue within a deadline, stops the ones that did not, and returns a
//! [`ShutdownReport`] with what each handled and what was left undelivered.
//! Dropping every `EventBus` handle closes the bus the same way without
//! waiting: listeners finish their queues and end. (A listener that holds a
//! handle to emit follow-up events keeps the bus open; call `shutdown`.)
//!
//! ```
//! # use event_bus::{Event, EventKind, EventBus, Envelope, HandlerError, Listener};
//! # use std::sync::Arc;
//! # use std::time::Duration;
//! # #[derive(Debug, PartialEq)] enum Tick { Fast(u64), Slow(u64) }
//! # #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)] enum TickKind { Fast, Slow }
//! # impl EventKind for TickKind { const ALL: &'static [Self] = &[Self::Fast, Self::Slow];
//! #     fn index(self) -> usize { self as usize } fn name(self) -> &'static str { ["tick.fast", "tick.slow"][self as usize] } }
//! # impl Event for Tick { type Kind = TickKind;
//! #     fn kind(&self) -> TickKind { match self { Tick::Fast(_) => TickKind::Fast, Tick::Slow(_) => TickKind::Slow } } }
//! struct Archiver;
//!
//! impl Listener<Tick> for Archiver {
//!     async fn handle(&self, _: Arc<Envelope<Tick>>) -> Result<(), HandlerError> {
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
//! # Feature flags
//!
//! - `derive` (default): re-exports the `DomainEvent` derive from
//!   `event-bus-derive`.
//! - `metrics`: exports the bus's counters through the
//!   [`metrics`](https://docs.rs/metrics) facade; see [`mod@metrics`].
//! - `serde`: `Serialize` for metrics snapshots and shutdown reports.

mod bus;
mod dead_letter;
mod envelope;
pub mod error;
mod event;
mod listener;
pub mod metrics;
mod queue;
mod runtime;
mod subscription;
pub mod testing;

pub use bus::{Builder, DEFAULT_CAPACITY, DEFAULT_DEAD_LETTER_CAPACITY, EventBus};
pub use dead_letter::{DeadLetter, DeadLetterSubscription, DeadLetters};
pub use envelope::Envelope;
pub use error::{HandlerError, Lagged, RecvError, TryRecvError};
pub use event::{Event, EventKind, KindSet, KindSetIter};
pub use listener::{Listener, ListenerOptions, RetryPolicy};
pub use metrics::{BusMetrics, KindCount, LatencySummary, ListenerMetrics};
pub use queue::LagPolicy;
pub use runtime::{ListenerHandle, ListenerReport, ShutdownReport};
pub use subscription::Subscription;
