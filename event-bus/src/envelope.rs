//! [`Envelope`]: an event and what the bus knows about its emission.

use std::ops::Deref;
use std::sync::OnceLock;
use std::time::{Instant, SystemTime};

use tracing::Span;
use uuid::Uuid;

use crate::event::{Event, EventKind, Priority};

/// An emitted event with its identity, position and origin.
///
/// Subscribers and listeners receive `Arc<Envelope<E>>`: one allocation per
/// emitted event, shared by every receiver, so the payload is never cloned
/// per subscriber. `Envelope<E>` dereferences to `E`.
///
/// # Examples
///
/// ```
/// # use event_bus::{Envelope, Event, EventKind};
/// # #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
/// # enum Kind { Ping }
/// # impl EventKind for Kind {
/// #     const ALL: &'static [Self] = &[Kind::Ping];
/// #     fn index(self) -> usize { 0 }
/// #     fn name(self) -> &'static str { "ping" }
/// # }
/// # #[derive(Debug)]
/// # struct Ping(u32);
/// # impl Event for Ping { type Kind = Kind; fn kind(&self) -> Kind { Kind::Ping } }
/// let envelope = Envelope::new(Ping(7));
/// assert_eq!(envelope.0, 7); // through `Deref`
/// assert_eq!(envelope.name(), "ping");
/// assert_eq!(envelope.id().get_version_num(), 7); // a UUID v7: time-ordered
/// ```
#[derive(Debug)]
pub struct Envelope<E> {
    event: E,
    id: Uuid,
    sequence: u64,
    priority: Priority,
    emitted: Instant,
    span: Span,
}

impl<E: Event> Envelope<E> {
    /// Wraps `event` as if it were emitted now, outside any bus: a fresh
    /// UUID v7, sequence number 0, its kind's [priority](EventKind::priority)
    /// and the current span.
    ///
    /// The bus builds its own envelopes; this constructor is for tests and for
    /// backends that carry events from elsewhere.
    pub fn new(event: E) -> Self {
        let priority = event.kind().priority();
        Self::with_priority(event, priority)
    }

    /// As [`new`](Self::new), with `priority` instead of the kind's.
    pub fn with_priority(event: E, priority: Priority) -> Self {
        let emitted = Instant::now();
        Self {
            event,
            id: uuid_v7(wall_clock(emitted)),
            sequence: 0,
            priority,
            emitted,
            span: Span::current(),
        }
    }

    /// The event's name, such as `"user.created"`.
    pub fn name(&self) -> &'static str {
        self.event.name()
    }

    /// The event's kind.
    pub fn kind(&self) -> E::Kind {
        self.event.kind()
    }
}

impl<E> Envelope<E> {
    /// The event.
    pub fn event(&self) -> &E {
        &self.event
    }

    /// Unique id of this emission: a UUID v7, so ids sort by emit
    /// millisecond. Within one millisecond, order by
    /// [`sequence`](Self::sequence).
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// Position of this event in its bus's emit order.
    ///
    /// Strictly increasing across the bus: if `a.sequence() < b.sequence()`
    /// and both have the same [priority](Self::priority), every subscriber
    /// interested in both received `a` before `b`. Events no subscriber was
    /// interested in take no number, so there are gaps.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// The priority the event was emitted with: its kind's, unless the emit
    /// overrode it.
    pub fn priority(&self) -> Priority {
        self.priority
    }

    /// Wall-clock time of the emit.
    ///
    /// Read from the monotonic clock and placed on the wall clock by an
    /// anchor the process takes once, so that an emit reads one clock, not
    /// two; it can differ from `SystemTime::now()` at the emit by however
    /// far the wall clock has been adjusted since.
    pub fn emitted_at(&self) -> SystemTime {
        wall_clock(self.emitted)
    }

    /// Monotonic time of the emit.
    pub(crate) fn emitted(&self) -> Instant {
        self.emitted
    }

    /// The span that was current when the event was emitted.
    ///
    /// Handler spans [follow from](tracing::Span::follows_from) it, so a
    /// request's trace reaches the listeners it caused to run.
    pub fn span(&self) -> &Span {
        &self.span
    }

    pub(crate) fn set_sequence(&mut self, sequence: u64) {
        self.sequence = sequence;
    }
}

/// The wall-clock time of the monotonic instant `at`, through a process-wide
/// anchor: both clocks read once, at the first call.
fn wall_clock(at: Instant) -> SystemTime {
    static ANCHOR: OnceLock<(Instant, SystemTime)> = OnceLock::new();
    let &(instant, system) = ANCHOR.get_or_init(|| (Instant::now(), SystemTime::now()));
    match at.checked_duration_since(instant) {
        Some(after) => system + after,
        None => system - instant.saturating_duration_since(at),
    }
}

/// A UUID v7 for an event emitted at `at`: its millisecond in the first 48
/// bits, then 74 random bits from a thread-local generator.
///
/// `Uuid::now_v7` would take a process-wide lock and make a `getrandom`
/// system call per event, which costs more than the rest of an emit; the
/// bus's sequence number already orders events within a millisecond.
fn uuid_v7(at: SystemTime) -> Uuid {
    let millis = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64);
    let mut random = [0; 10];
    fastrand::fill(&mut random);
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
}

impl<E> Deref for Envelope<E> {
    type Target = E;

    fn deref(&self) -> &E {
        &self.event
    }
}
