//! The crate's error types.

use std::error::Error as StdError;

#[cfg(feature = "serde")]
use uuid::Uuid;

/// The error a listener's handler returns: any error type, boxed.
///
/// Handlers use `?` on any `std::error::Error + Send + Sync`; the runtime logs
/// the error with its source chain, counts it, retries per the listener's
/// [`RetryPolicy`](crate::RetryPolicy) and finally records a
/// [`DeadLetter`](crate::DeadLetter).
pub type HandlerError = Box<dyn StdError + Send + Sync + 'static>;

/// Error returned by [`Subscription::recv`](crate::Subscription::recv).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecvError {
    /// The subscription's queue was full and this many of its oldest events
    /// were dropped to make room (the default [`LagPolicy::DropOldest`]).
    ///
    /// The dropped events are also counted in the subscription's
    /// [`dropped`](crate::Subscription::dropped) total. Keep receiving: the
    /// next call returns the oldest event still queued. To never drop, use
    /// [`LagPolicy::Backpressure`].
    ///
    /// [`LagPolicy::DropOldest`]: crate::LagPolicy::DropOldest
    /// [`LagPolicy::Backpressure`]: crate::LagPolicy::Backpressure
    #[error("subscription lagged by {0}")]
    Lagged(u64),
    /// The bus was shut down or every [`EventBus`](crate::EventBus) handle was
    /// dropped, and every queued event has been received. No more events
    /// will arrive.
    #[error("event bus closed")]
    Closed,
}

/// Error returned by [`Subscription::try_recv`](crate::Subscription::try_recv).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TryRecvError {
    /// No event is queued right now; one may arrive later.
    #[error("subscription queue empty")]
    Empty,
    /// As [`RecvError::Lagged`]: this many of the oldest events were dropped.
    #[error("subscription lagged by {0}")]
    Lagged(u64),
    /// As [`RecvError::Closed`]: the bus is closed and the queue is empty.
    #[error("event bus closed")]
    Closed,
}

/// The item error of a [`Subscription`](crate::Subscription) used as a
/// [`Stream`](futures_core::Stream): this many of the oldest queued events
/// were dropped. The stream goes on with the oldest event still queued and
/// ends when the bus closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("subscription lagged by {0}")]
pub struct Lagged(pub u64);

impl From<Lagged> for RecvError {
    fn from(Lagged(count): Lagged) -> Self {
        RecvError::Lagged(count)
    }
}

/// Error returned by [`EventRecorder`](crate::testing::EventRecorder)'s
/// waiting methods when the condition did not hold before the deadline.
#[cfg(feature = "testing")]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("condition not met within {timeout:?}; recorded {recorded:?}")]
pub struct WaitTimeout {
    /// How long the recorder waited.
    pub timeout: std::time::Duration,
    /// The names of the events recorded when the wait gave up.
    pub recorded: Vec<&'static str>,
}

/// Error returned when a string is not a valid W3C `traceparent`, by
/// [`TraceParent`](crate::TraceParent)'s `FromStr`.
///
/// The header came from outside the process; a caller that cannot use it
/// goes on without the trace (the specification says to start a new one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseTraceParentError {
    /// Shorter than the 55 characters of a version `00` header, or, for
    /// version `00`, longer.
    #[error("traceparent has the wrong length")]
    Length,
    /// The fields are not separated by single `-` at their places: a field
    /// has the wrong length.
    #[error("traceparent fields are not where they belong")]
    Format,
    /// A field (`version`, `trace-id`, `parent-id` or `trace-flags`) has a
    /// character that is not a lowercase hex digit.
    #[error("traceparent {field} is not lowercase hex")]
    Hex {
        /// The field, as the specification names it.
        field: &'static str,
    },
    /// The version is `ff`, which the specification forbids.
    #[error("traceparent version ff is invalid")]
    Version,
    /// The trace id is all zeros.
    #[error("traceparent trace-id is all zeros")]
    ZeroTraceId,
    /// The parent id is all zeros.
    #[error("traceparent parent-id is all zeros")]
    ZeroParentId,
}

/// Error returned when an event cannot be encoded, by a
/// [`Codec`](crate::codec::Codec).
///
/// The event's own `Serialize` impl is at fault: fix the type, since every
/// event of that kind will fail the same way.
#[cfg(feature = "serde")]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The event's `Serialize` impl returned an error (a map with non-string
    /// keys, a `#[serde(skip_serializing)]` variant, a failing custom impl).
    #[error("event `{name}` could not be serialized")]
    Serialize {
        /// The event's name.
        name: &'static str,
        /// What the serializer said.
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    /// The event did not serialize as an externally tagged enum (serde's
    /// default: `"Variant"` or `{"Variant": data}`), so its payload cannot be
    /// told apart from its variant: remove `#[serde(tag = "…")]` or
    /// `#[serde(untagged)]` from the enum.
    #[error("event `{name}` is not serialized as an externally tagged enum")]
    NotExternallyTagged {
        /// The event's name.
        name: &'static str,
    },
    /// The emit time is outside the years 0000 to 9999 that RFC 3339 can
    /// write.
    #[error("event `{name}` has an emit time out of range")]
    Time {
        /// The event's name.
        name: &'static str,
    },
}

#[cfg(feature = "serde")]
impl EncodeError {
    /// The name of the event that could not be encoded.
    pub fn name(&self) -> &'static str {
        match *self {
            Self::Serialize { name, .. }
            | Self::NotExternallyTagged { name }
            | Self::Time { name } => name,
        }
    }
}

/// Error returned when bytes cannot be decoded into an event, by a
/// [`Codec`](crate::codec::Codec).
///
/// Decoding again will fail again: a tier turns the event into a dead
/// letter with this error as the reason, never into a retry loop. As much
/// of the event's identity as could be read comes with the error, so the
/// dead letter still says what the event was: see [`name`](Self::name) and
/// [`id`](Self::id).
#[cfg(feature = "serde")]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The bytes are not in the codec's format at all (for JSON: not a JSON
    /// object).
    #[error("malformed event")]
    Malformed {
        /// What the parser said.
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    /// A field of the envelope is missing or of the wrong type.
    #[error("malformed event envelope: {reason}")]
    Envelope {
        /// Which field, and what is wrong with it.
        reason: String,
        /// The event's type tag, if it could be read.
        name: Option<String>,
        /// The event's id, if it could be read.
        id: Option<Uuid>,
    },
    /// No kind of the event enum has this name or alias: an event of a newer
    /// version of the enum, or one renamed without an
    /// `#[event(alias = "…")]`.
    #[error("unknown event type `{name}`")]
    UnknownType {
        /// The type tag.
        name: String,
        /// The event's id, if it could be read.
        id: Option<Uuid>,
    },
    /// The payload does not fit the variant of its type: the variant's
    /// fields changed incompatibly since the event was stored.
    #[error("payload of `{name}` does not fit: {message}")]
    Payload {
        /// The type tag.
        name: String,
        /// The event's id, if it could be read.
        id: Option<Uuid>,
        /// What serde said.
        message: String,
    },
    /// The id is not a UUID.
    #[error("invalid event id `{value}`")]
    Id {
        /// The id as it was read.
        value: String,
        /// The event's type tag, if it could be read.
        name: Option<String>,
    },
    /// The emit time is not an RFC 3339 time, or not one this platform's
    /// `SystemTime` can hold.
    #[error("invalid event time `{value}`")]
    Time {
        /// The time as it was read.
        value: String,
        /// The event's type tag, if it could be read.
        name: Option<String>,
        /// The event's id, if it could be read.
        id: Option<Uuid>,
    },
    /// The trace context is not a valid W3C `traceparent`.
    #[error("invalid event traceparent")]
    TraceParent {
        /// What is wrong with it.
        #[source]
        source: ParseTraceParentError,
        /// The event's type tag, if it could be read.
        name: Option<String>,
        /// The event's id, if it could be read.
        id: Option<Uuid>,
    },
}

#[cfg(feature = "serde")]
impl DecodeError {
    /// The event's type tag (its name, or an alias, as stored), when the
    /// bytes had a readable one.
    pub fn name(&self) -> Option<&str> {
        match self {
            Self::Malformed { .. } => None,
            Self::UnknownType { name, .. } | Self::Payload { name, .. } => Some(name),
            Self::Envelope { name, .. } | Self::Id { name, .. } | Self::Time { name, .. } => {
                name.as_deref()
            }
            Self::TraceParent { name, .. } => name.as_deref(),
        }
    }

    /// The event's id, when the bytes had a valid one.
    pub fn id(&self) -> Option<Uuid> {
        match *self {
            Self::Malformed { .. } | Self::Id { .. } => None,
            Self::Envelope { id, .. }
            | Self::UnknownType { id, .. }
            | Self::Payload { id, .. }
            | Self::Time { id, .. }
            | Self::TraceParent { id, .. } => id,
        }
    }
}

/// Formats an error with its chain of sources: `"outer: middle: root"`.
pub(crate) fn chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Error returned by the durable tier's [`Store`](crate::sql::Store) and
/// [`Outbox`](crate::sql::Outbox).
#[cfg(feature = "sql")]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database refused or failed a statement (or could not be
    /// reached). What the call wrote is rolled back; trying again later may
    /// succeed.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// An event emitted on an outbox could not be encoded, so its
    /// transaction was not committed: fix the event type's `Serialize`.
    #[error("an event could not be encoded")]
    Encode(#[from] EncodeError),
    /// The store is shutting down: no listener is spawned on it.
    #[error("the store is shutting down")]
    Closed,
}

/// Error returned by the distributed tier's
/// [`JetStream`](crate::nats::JetStream).
#[cfg(feature = "nats")]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatsError {
    /// The NATS server could not be reached at connect. Check the URL and
    /// that the server runs with JetStream enabled (`nats-server -js`).
    #[error("could not connect to the NATS server")]
    Connect(#[source] async_nats::ConnectError),
    /// A JetStream API request (`what`) failed or timed out: the server is
    /// down, restarting, or refused the request. Trying again later may
    /// succeed.
    #[error("jetstream request failed: {what}")]
    Request {
        /// What was asked of the server.
        what: &'static str,
        /// What the client said.
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    /// The server did not acknowledge a publish within the publish retry
    /// span: the event may or may not be in the stream. Publishing it
    /// again is safe: its id is its `Nats-Msg-Id`, so the stream keeps one
    /// copy within its duplicate window.
    #[error("the event was not acknowledged by the stream")]
    Publish(#[source] Box<dyn StdError + Send + Sync>),
    /// The event could not be encoded: fix the event type's `Serialize`.
    #[error("an event could not be encoded")]
    Encode(#[from] EncodeError),
    /// The stream's duplicate window is shorter than the span over which a
    /// publish is retried (by the handle, or by the outbox relay), so a
    /// retried publish could be stored twice. Lengthen the stream's window
    /// ([`duplicate_window`](crate::nats::Config::duplicate_window), for a
    /// stream the tier creates) or shorten
    /// [`publish_retry`](crate::nats::Config::publish_retry) (or the
    /// relay's lease).
    #[error(
        "the stream's duplicate window ({window:?}) is shorter than the span a publish is retried over ({span:?})"
    )]
    DuplicateWindow {
        /// The stream's duplicate window.
        window: std::time::Duration,
        /// The span a publish is retried over.
        span: std::time::Duration,
    },
    /// The event, encoded, is larger than the server takes in one message
    /// (its `max_payload`, 1 MiB by default): it is not sent. Keep large
    /// data out of events (the event names it, the handler reads it), or
    /// raise the server's `max_payload`.
    #[error("the event takes {size} bytes, over the server's max_payload of {max}")]
    TooLarge {
        /// The event's size, with room for its headers.
        size: usize,
        /// The server's `max_payload`.
        max: usize,
    },
    /// The handle is shutting down: nothing is published or spawned on it.
    #[error("the jetstream tier is shutting down")]
    Closed,
    /// The durable tier refused to spawn the outbox relay
    /// ([`JetStream::spawn_relay`](crate::nats::JetStream::spawn_relay)).
    #[cfg(feature = "sql")]
    #[error("the store could not spawn the relay")]
    Store(#[from] StoreError),
}

#[cfg(feature = "nats")]
impl NatsError {
    pub(crate) fn request(
        what: &'static str,
        source: impl Into<Box<dyn StdError + Send + Sync>>,
    ) -> Self {
        Self::Request {
            what,
            source: source.into(),
        }
    }
}
