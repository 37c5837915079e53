//! Helpers for testing code that emits events.
//!
//! An [`EventRecorder`] subscribes to a bus and keeps every event of the kinds
//! it was given, losing none: it waits for conditions with a deadline instead
//! of sleeping, and its assertions print what was recorded when they fail.
//!
//! # Examples
//!
//! "This handler emitted exactly these events":
//!
//! ```
//! # use event_bus::{EventBus, Event, EventKind};
//! # use event_bus::testing::EventRecorder;
//! # use std::time::Duration;
//! # #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
//! # enum Kind { UserCreated, MailSent }
//! # impl EventKind for Kind {
//! #     const ALL: &'static [Self] = &[Kind::UserCreated, Kind::MailSent];
//! #     fn index(self) -> usize { self as usize }
//! #     fn name(self) -> &'static str { ["user.created", "mail.sent"][self as usize] }
//! # }
//! # #[derive(Debug)]
//! # enum AppEvent { UserCreated(u64), MailSent }
//! # impl Event for AppEvent { type Kind = Kind; fn kind(&self) -> Kind {
//! #     match self { AppEvent::UserCreated(_) => Kind::UserCreated, AppEvent::MailSent => Kind::MailSent } } }
//! fn create_user(bus: &EventBus<AppEvent>, id: u64) {
//!     bus.emit(AppEvent::UserCreated(id));
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let bus = EventBus::new();
//! let mut recorder = EventRecorder::new(&bus);
//!
//! create_user(&bus, 7);
//!
//! recorder.assert_names(&["user.created"]);
//! recorder.wait_for_count(1, Duration::from_secs(5)).await.unwrap();
//! # }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::envelope::Envelope;
use crate::error::{RecvError, TryRecvError, WaitTimeout};
use crate::event::{Event, KindSet};
use crate::listener::LagPolicy;
use crate::memory::bus::EventBus;
use crate::memory::subscription::Subscription;

/// Records the events emitted on a bus, for assertions in tests.
///
/// It subscribes with [`LagPolicy::Backpressure`] and a queue of
/// [`CAPACITY`](Self::CAPACITY) events per priority lane:
/// [`emit_wait`](EventBus::emit_wait) waits until the recorder is read, and
/// plain `emit` queues past the capacity up to
/// [`OVERFLOW_FACTOR`](crate::OVERFLOW_FACTOR) times it. Events are kept in
/// emit order, whatever their priority.
///
/// # Panics
///
/// Its methods panic if the subscription lost events: when more than
/// `OVERFLOW_FACTOR * CAPACITY` events of one priority were emitted with
/// plain `emit` and not read in between, which a test should not do.
pub struct EventRecorder<E: Event> {
    subscription: Subscription<E>,
    events: Vec<Arc<Envelope<E>>>,
}

impl<E: Event> EventRecorder<E> {
    /// The queue capacity of a recorder's subscription.
    pub const CAPACITY: usize = 1 << 16;

    /// Records every event emitted on `bus` from now on.
    pub fn new(bus: &EventBus<E>) -> Self {
        Self::with_interests(bus, KindSet::all())
    }

    /// Records the events of the kinds in `interests` emitted from now on.
    pub fn with_interests(bus: &EventBus<E>, interests: impl Into<KindSet<E::Kind>>) -> Self {
        Self {
            subscription: bus.subscribe_with(interests, Self::CAPACITY, LagPolicy::Backpressure),
            events: Vec::new(),
        }
    }

    /// Takes every event queued so far into the record.
    fn collect(&mut self) {
        loop {
            match self.subscription.try_recv() {
                Ok(envelope) => self.record(envelope),
                Err(TryRecvError::Empty | TryRecvError::Closed) => return,
                Err(TryRecvError::Lagged(count)) => lost(count),
            }
        }
    }

    /// Adds `envelope` to the record in emit order: a higher-priority event
    /// is received before lower ones emitted earlier, and goes back to its
    /// place by [`sequence`](Envelope::sequence).
    fn record(&mut self, envelope: Arc<Envelope<E>>) {
        let place = self
            .events
            .iter()
            .rposition(|earlier| earlier.sequence() < envelope.sequence())
            .map_or(0, |at| at + 1);
        self.events.insert(place, envelope);
    }

    /// The events recorded so far, in emit order (by
    /// [`sequence`](Envelope::sequence), whatever their priority).
    pub fn events(&mut self) -> &[Arc<Envelope<E>>] {
        self.collect();
        &self.events
    }

    /// The names of the events recorded so far, in emit order.
    pub fn names(&mut self) -> Vec<&'static str> {
        self.events().iter().map(|e| e.name()).collect()
    }

    /// The kinds of the events recorded so far, in emit order.
    pub fn kinds(&mut self) -> Vec<E::Kind> {
        self.events().iter().map(|e| e.kind()).collect()
    }

    /// How many events of `kind` were recorded.
    pub fn count(&mut self, kind: E::Kind) -> usize {
        self.events().iter().filter(|e| e.kind() == kind).count()
    }

    /// Removes and returns everything recorded so far, so the next assertion
    /// sees only what comes after.
    pub fn take(&mut self) -> Vec<Arc<Envelope<E>>> {
        self.collect();
        std::mem::take(&mut self.events)
    }

    /// Waits until `condition` holds for the events recorded, for at most
    /// `timeout`.
    ///
    /// # Errors
    ///
    /// [`WaitTimeout`], listing what was recorded, when `timeout` passes
    /// first or the bus closes with the condition still false.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        mut condition: impl FnMut(&[Arc<Envelope<E>>]) -> bool,
    ) -> Result<&[Arc<Envelope<E>>], WaitTimeout> {
        let deadline = tokio::time::Instant::now().checked_add(timeout);
        loop {
            self.collect();
            if condition(&self.events) {
                return Ok(&self.events);
            }
            let next = match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, self.subscription.recv()).await,
                None => Ok(self.subscription.recv().await),
            };
            match next {
                Ok(Ok(envelope)) => self.record(envelope),
                Ok(Err(RecvError::Lagged(count))) => lost(count),
                Ok(Err(RecvError::Closed)) | Err(_) => {
                    return Err(WaitTimeout {
                        timeout,
                        recorded: self.events.iter().map(|e| e.name()).collect(),
                    });
                }
            }
        }
    }

    /// Waits until at least `count` events are recorded, for at most
    /// `timeout`.
    ///
    /// # Errors
    ///
    /// As [`wait_for`](Self::wait_for).
    pub async fn wait_for_count(
        &mut self,
        count: usize,
        timeout: Duration,
    ) -> Result<&[Arc<Envelope<E>>], WaitTimeout> {
        self.wait_for(timeout, |events| events.len() >= count).await
    }

    /// Asserts that the events recorded so far have exactly these names, in
    /// this order.
    ///
    /// # Panics
    ///
    /// When they differ, with both lists in the message.
    #[track_caller]
    pub fn assert_names(&mut self, expected: &[&str]) {
        let recorded = self.names();
        assert!(
            recorded == expected,
            "recorded events differ\n  expected: {expected:?}\n  recorded: {recorded:?}"
        );
    }

    /// Asserts that the events recorded so far have exactly these kinds, in
    /// this order.
    ///
    /// # Panics
    ///
    /// When they differ, with both lists in the message.
    #[track_caller]
    pub fn assert_kinds(&mut self, expected: &[E::Kind]) {
        let recorded = self.kinds();
        assert!(
            recorded == expected,
            "recorded events differ\n  expected: {expected:?}\n  recorded: {recorded:?}"
        );
    }

    /// Asserts that nothing was recorded.
    ///
    /// # Panics
    ///
    /// When something was, naming it.
    #[track_caller]
    pub fn assert_empty(&mut self) {
        self.assert_names(&[]);
    }
}

/// A backpressure subscription never drops; should one ever report a gap,
/// the recorder must not let an assertion pass on incomplete data.
#[track_caller]
fn lost(count: u64) -> ! {
    panic!("EventRecorder's subscription lost {count} events, which backpressure forbids")
}

impl<E: Event> fmt::Debug for EventRecorder<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventRecorder")
            .field(
                "recorded",
                &self.events.iter().map(|e| e.name()).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}
