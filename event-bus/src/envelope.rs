//! [`Envelope`]: an event and what the bus knows about its emission, its
//! [`Metadata`].

use std::fmt;
use std::ops::Deref;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use tracing::Span;
use uuid::Uuid;

use crate::event::{Event, EventKind, Priority};
use crate::trace::TraceParent;

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
    metadata: Metadata,
    span: Span,
}

impl<E: Event> Envelope<E> {
    /// Wraps `event` as if it were emitted now, outside any bus: a fresh
    /// UUID v7, sequence number 0, its kind's [priority](EventKind::priority),
    /// no trace context and the current span.
    ///
    /// The bus builds its own envelopes; this constructor is for tests and for
    /// backends that carry events from elsewhere. To rebuild an envelope
    /// whose identity is known, use [`from_parts`](Self::from_parts).
    pub fn new(event: E) -> Self {
        let priority = event.kind().priority();
        Self::with_priority(event, priority)
    }

    /// As [`new`](Self::new), with `priority` instead of the kind's.
    pub fn with_priority(event: E, priority: Priority) -> Self {
        // The one clock read of an emit: the wall-clock time and the id's
        // millisecond come from it through the anchor.
        let emitted = Instant::now();
        Self {
            event,
            metadata: Metadata {
                id: uuid_v7(unix_millis(emitted)),
                sequence: 0,
                emitted,
                given: None,
                priority,
            },
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
    /// An envelope of `event` with the identity `metadata` gives it: the
    /// inverse of [`into_parts`](Self::into_parts).
    ///
    /// A tier that stores or carries events uses this to rebuild the
    /// envelope it decoded, so that listeners see the id, position, priority,
    /// emit time and trace context the event was emitted with. The
    /// [span](Self::span) is the current one, as for [`new`](Self::new): a
    /// span does not leave its process; the trace does, in
    /// [`traceparent`](Self::traceparent).
    ///
    /// # Examples
    ///
    /// ```
    /// # use event_bus::{Envelope, Event, EventKind, Metadata, Priority};
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
    /// let emitted = Envelope::new(Ping(7));
    /// let (event, metadata) = emitted.into_parts();
    /// // ... stored, carried, read back ...
    /// let received = Envelope::from_parts(event, metadata.clone());
    /// assert_eq!(received.metadata(), &metadata);
    /// assert_eq!(received.id(), metadata.id());
    /// ```
    pub fn from_parts(event: E, metadata: Metadata) -> Self {
        Self {
            event,
            metadata,
            span: Span::current(),
        }
    }

    /// The event and its metadata, giving up the span.
    pub fn into_parts(self) -> (E, Metadata) {
        (self.event, self.metadata)
    }

    /// The event.
    pub fn event(&self) -> &E {
        &self.event
    }

    /// The event's identity: id, position, priority, emit time and trace
    /// context.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Unique id of this emission: a UUID v7, so ids sort by emit
    /// millisecond. Within one millisecond, order by
    /// [`sequence`](Self::sequence).
    pub fn id(&self) -> Uuid {
        self.metadata.id
    }

    /// Position of this event in its bus's emit order.
    ///
    /// Strictly increasing across the bus: if `a.sequence() < b.sequence()`
    /// and both have the same [priority](Self::priority), every subscriber
    /// interested in both received `a` before `b`. Events no subscriber was
    /// interested in take no number, so there are gaps.
    ///
    /// For an envelope made [from parts](Self::from_parts), the position its
    /// metadata gives, such as a durable log's.
    pub fn sequence(&self) -> u64 {
        self.metadata.sequence
    }

    /// The priority the event was emitted with: its kind's, unless the emit
    /// overrode it.
    pub fn priority(&self) -> Priority {
        self.metadata.priority
    }

    /// Wall-clock time of the emit. See [`Metadata::emitted_at`].
    pub fn emitted_at(&self) -> SystemTime {
        self.metadata.emitted_at()
    }

    /// Monotonic time of the emit.
    #[inline]
    pub(crate) fn emitted(&self) -> Instant {
        self.metadata.emitted
    }

    /// The W3C trace context the event was emitted in, when its metadata
    /// has one. Events the bus emits have none.
    pub fn traceparent(&self) -> Option<TraceParent> {
        self.metadata.traceparent()
    }

    /// The span that was current when the event was emitted.
    ///
    /// Handler spans [follow from](tracing::Span::follows_from) it, so a
    /// request's trace reaches the listeners it caused to run.
    pub fn span(&self) -> &Span {
        &self.span
    }

    pub(crate) fn set_sequence(&mut self, sequence: u64) {
        self.metadata.sequence = sequence;
    }
}

/// What identifies an emitted event apart from its payload: id, position,
/// priority, wall-clock emit time and W3C trace context.
///
/// Every [`Envelope`] has one ([`Envelope::metadata`]). Built from parts, it
/// lets a tier that stores or carries events give a decoded event back the
/// identity it was emitted with, through [`Envelope::from_parts`]; the codec
/// writes and reads all of it.
///
/// Not `Copy`, so that it can carry more of an event's context later
/// without a breaking change.
///
/// # Examples
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use event_bus::{Metadata, Priority, TraceParent};
/// use uuid::Uuid;
///
/// let id = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001);
/// let emitted = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_717_000_000_123_456_789);
/// let trace: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse()?;
///
/// let metadata = Metadata::new(id)
///     .with_sequence(42)
///     .with_priority(Priority::High)
///     .with_emitted_at(emitted)
///     .with_traceparent(trace);
///
/// assert_eq!(metadata.id(), id);
/// assert_eq!(metadata.sequence(), 42);
/// assert_eq!(metadata.priority(), Priority::High);
/// assert_eq!(metadata.emitted_at(), emitted); // to the nanosecond
/// assert_eq!(metadata.traceparent(), Some(trace));
/// # Ok::<(), event_bus::error::ParseTraceParentError>(())
/// ```
#[derive(Clone)]
pub struct Metadata {
    id: Uuid,
    sequence: u64,
    /// The emit on the monotonic clock: read once per emit in this process;
    /// for a given wall-clock time, that time through the anchor.
    emitted: Instant,
    /// What events emitted in this process have not: boxed, so that every
    /// envelope carries one word for them.
    given: Option<Box<Given>>,
    priority: Priority,
}

/// The parts of an event's metadata it was given from outside the process.
#[derive(Clone, Copy, Default)]
struct Given {
    /// The wall-clock emit time, kept as it is so that it is written back
    /// exactly.
    emitted_at: Option<SystemTime>,
    traceparent: Option<TraceParent>,
}

impl Metadata {
    /// The metadata of an event with id `id` emitted now: sequence number 0,
    /// [`Priority::Normal`], the current time (read as a bus's emit reads
    /// it, see [`emitted_at`](Self::emitted_at)) and no trace context. The
    /// `with_*` methods set the rest.
    ///
    /// Event ids are UUID v7 when the bus makes them; any id is kept as it
    /// is.
    pub fn new(id: Uuid) -> Self {
        Self {
            id,
            sequence: 0,
            emitted: Instant::now(),
            given: None,
            priority: Priority::Normal,
        }
    }

    /// Sets the event's position: its bus's sequence number, or the position
    /// in the log or stream it was read from.
    #[must_use]
    pub fn with_sequence(mut self, sequence: u64) -> Self {
        self.sequence = sequence;
        self
    }

    /// Sets the priority the event was emitted with.
    #[must_use]
    pub fn with_priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// Sets the wall-clock time the event was emitted at, kept exactly.
    #[must_use]
    pub fn with_emitted_at(mut self, emitted_at: SystemTime) -> Self {
        self.emitted = monotonic(emitted_at);
        self.given_mut().emitted_at = Some(emitted_at);
        self
    }

    /// Sets (or, with `None`, clears) the W3C trace context the event was
    /// emitted in.
    #[must_use]
    pub fn with_traceparent(mut self, traceparent: impl Into<Option<TraceParent>>) -> Self {
        let traceparent = traceparent.into();
        if traceparent.is_some() || self.given.is_some() {
            self.given_mut().traceparent = traceparent;
        }
        self
    }

    fn given_mut(&mut self) -> &mut Given {
        self.given.get_or_insert_default()
    }

    /// The event's id.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The event's position: its bus's [sequence
    /// number](Envelope::sequence), or the position its metadata was given.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// The priority the event was emitted with.
    pub fn priority(&self) -> Priority {
        self.priority
    }

    /// Wall-clock time of the emit.
    ///
    /// For an event emitted by a bus in this process, read from the
    /// monotonic clock and placed on the wall clock by an anchor the process
    /// takes once, so that an emit reads one clock, not two; it can differ
    /// from `SystemTime::now()` at the emit by however far the wall clock has
    /// been adjusted since. A time given by
    /// [`with_emitted_at`](Self::with_emitted_at) is returned exactly.
    ///
    /// (The runtime measures a given time's handle latency on the monotonic
    /// clock through the same anchor; a time that clock cannot represent
    /// counts from the anchor.)
    pub fn emitted_at(&self) -> SystemTime {
        match self.given.as_deref() {
            Some(Given {
                emitted_at: Some(at),
                ..
            }) => *at,
            _ => wall_clock(self.emitted),
        }
    }

    /// The W3C trace context the event was emitted in, if it has one.
    #[inline]
    pub fn traceparent(&self) -> Option<TraceParent> {
        self.given.as_ref().and_then(|given| given.traceparent)
    }
}

impl PartialEq for Metadata {
    /// Equal when every part is: an emit time is compared on the wall clock,
    /// whichever clock it was read from.
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
            && self.sequence == other.sequence
            && self.priority == other.priority
            && self.emitted_at() == other.emitted_at()
            && self.traceparent() == other.traceparent()
    }
}

impl Eq for Metadata {}

impl fmt::Debug for Metadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metadata")
            .field("id", &self.id)
            .field("sequence", &self.sequence)
            .field("priority", &self.priority)
            .field("emitted_at", &self.emitted_at())
            .field("traceparent", &self.traceparent())
            .finish()
    }
}

/// The process-wide anchor that relates the two clocks: both read once, at
/// the first call, and the wall-clock reading also as time since the Unix
/// epoch (zero for a clock set before it), for the ids.
#[derive(Clone, Copy)]
struct Anchor {
    instant: Instant,
    system: SystemTime,
    unix: Duration,
}

fn anchor() -> Anchor {
    static ANCHOR: OnceLock<Anchor> = OnceLock::new();
    *ANCHOR.get_or_init(|| {
        let (instant, system) = (Instant::now(), SystemTime::now());
        let unix = system
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Anchor {
            instant,
            system,
            unix,
        }
    })
}

/// The Unix millisecond of the monotonic instant `at`, through the anchor:
/// one subtraction of instants, where going through [`wall_clock`] and
/// then the epoch took two (about 60 instructions more per emit).
fn unix_millis(at: Instant) -> u64 {
    let Anchor { instant, unix, .. } = anchor();
    let since_epoch = match at.checked_duration_since(instant) {
        Some(after) => unix.saturating_add(after),
        None => unix.saturating_sub(instant.saturating_duration_since(at)),
    };
    u64::try_from(since_epoch.as_millis()).unwrap_or(u64::MAX)
}

/// The monotonic instant of the wall-clock time `at`, through the anchor;
/// the anchor's instant when the monotonic clock cannot represent it.
fn monotonic(at: SystemTime) -> Instant {
    let Anchor {
        instant, system, ..
    } = anchor();
    match at.duration_since(system) {
        Ok(after) => instant.checked_add(after),
        Err(before) => instant.checked_sub(before.duration()),
    }
    .unwrap_or(instant)
}

/// The wall-clock time of the monotonic instant `at`, through the anchor.
fn wall_clock(at: Instant) -> SystemTime {
    let Anchor {
        instant, system, ..
    } = anchor();
    match at.checked_duration_since(instant) {
        Some(after) => system + after,
        None => system - instant.saturating_duration_since(at),
    }
}

/// A UUID v7 for an event emitted at the Unix millisecond `millis`: the
/// millisecond in the first 48 bits, then 74 random bits from a
/// thread-local generator.
///
/// `Uuid::now_v7` would take a process-wide lock and make a `getrandom`
/// system call per event, which costs more than the rest of an emit; the
/// bus's sequence number already orders events within a millisecond.
fn uuid_v7(millis: u64) -> Uuid {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    struct Kind;

    impl EventKind for Kind {
        const ALL: &'static [Self] = &[Kind];

        fn index(self) -> usize {
            0
        }

        fn name(self) -> &'static str {
            "ping"
        }
    }

    #[derive(Debug, PartialEq)]
    struct Ping(u32);

    impl Event for Ping {
        type Kind = Kind;

        fn kind(&self) -> Kind {
            Kind
        }
    }

    #[test]
    fn parts_come_back_as_they_were_given() {
        let emitted = SystemTime::UNIX_EPOCH + Duration::new(1_717_000_000, 123_456_789);
        let trace = TraceParent::new([7; 16], [9; 8], 1).unwrap();
        let metadata = Metadata::new(Uuid::from_u128(1))
            .with_sequence(42)
            .with_priority(Priority::Low)
            .with_emitted_at(emitted)
            .with_traceparent(trace);
        let envelope = Envelope::from_parts(Ping(3), metadata.clone());
        assert_eq!(
            (envelope.id(), envelope.sequence(), envelope.priority()),
            (Uuid::from_u128(1), 42, Priority::Low)
        );
        assert_eq!(envelope.emitted_at(), emitted);
        assert_eq!(envelope.traceparent(), Some(trace));
        assert_eq!(envelope.name(), "ping");
        assert_eq!(envelope.into_parts(), (Ping(3), metadata));
    }

    #[test]
    fn an_emitted_envelope_keeps_its_identity_through_its_parts() {
        let mut envelope = Envelope::with_priority(Ping(1), Priority::High);
        envelope.set_sequence(5);
        let (id, at) = (envelope.id(), envelope.emitted_at());
        let (event, metadata) = envelope.into_parts();
        let rebuilt = Envelope::from_parts(event, metadata.clone().with_emitted_at(at));
        assert_eq!(rebuilt.metadata(), &metadata);
        assert_eq!((rebuilt.id(), rebuilt.sequence()), (id, 5));
        assert_eq!(rebuilt.traceparent(), None);
    }

    #[test]
    fn an_id_carries_the_millisecond_of_its_emit_time() {
        let envelope = Envelope::new(Ping(0));
        let at = envelope
            .emitted_at()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap();
        let (seconds, nanos) = envelope.id().get_timestamp().expect("a v7 id").to_unix();
        let millis = u128::from(seconds) * 1_000 + u128::from(nanos / 1_000_000);
        assert_eq!(millis, at.as_millis());
        // An instant before the anchor, as through the wall clock.
        let before = anchor().instant.checked_sub(Duration::from_secs(3));
        if let Some(before) = before {
            let through_wall_clock = wall_clock(before)
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_millis();
            assert_eq!(u128::from(unix_millis(before)), through_wall_clock);
        }
    }

    #[test]
    fn a_given_time_maps_onto_the_monotonic_clock_through_the_anchor() {
        let now = Instant::now();
        let later = wall_clock(now) + Duration::from_millis(250);
        let envelope =
            Envelope::from_parts(Ping(0), Metadata::new(Uuid::nil()).with_emitted_at(later));
        assert_eq!(envelope.emitted() - now, Duration::from_millis(250));
        // However far back, the time is kept; the monotonic reading never panics.
        let ancient = Envelope::from_parts(
            Ping(0),
            Metadata::new(Uuid::nil()).with_emitted_at(SystemTime::UNIX_EPOCH),
        );
        assert_eq!(ancient.emitted_at(), SystemTime::UNIX_EPOCH);
        let _ = ancient.emitted();
    }

    #[test]
    fn traceparent_can_be_cleared() {
        let trace = TraceParent::new([7; 16], [9; 8], 0).unwrap();
        let metadata = Metadata::new(Uuid::nil()).with_traceparent(trace);
        assert_eq!(metadata.clone().with_traceparent(None).traceparent(), None);
        assert_eq!(
            metadata.with_traceparent(Some(trace)).traceparent(),
            Some(trace)
        );
    }
}
