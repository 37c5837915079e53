//! The crate's error types.

use std::error::Error as StdError;

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
