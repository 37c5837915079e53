//! Dead letters: events a listener gave up on after its last attempt.

use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use uuid::Uuid;

use crate::envelope::Envelope;

/// An event a listener failed to handle, after every attempt its
/// [`RetryPolicy`](crate::RetryPolicy) allowed.
#[derive(Debug)]
#[non_exhaustive]
pub struct DeadLetter<E> {
    /// The event, as the listener received it.
    pub envelope: Arc<Envelope<E>>,
    /// The name of the listener that gave up.
    pub listener: Arc<str>,
    /// The last attempt's error with its source chain, or `"panicked: …"`.
    pub error: String,
    /// How many attempts were made.
    pub attempts: u32,
    /// When the listener gave up.
    pub failed_at: SystemTime,
}

/// Where the runner records the events whose last attempt failed.
///
/// The memory tier's sink is the bus's dead-letter store
/// ([`EventBus::dead_letters`](crate::EventBus::dead_letters)); a durable
/// tier writes a table, a distributed one a stream.
pub trait DeadLetterSink<E>: Send + Sync + 'static {
    /// Records `letter`.
    fn record(&self, letter: DeadLetter<E>) -> impl Future<Output = ()> + Send;

    /// Records an event that did not decode into `E`.
    fn record_undecodable(&self, letter: UndecodableLetter) -> impl Future<Output = ()> + Send;
}

impl<E, S: DeadLetterSink<E>> DeadLetterSink<E> for Arc<S> {
    fn record(&self, letter: DeadLetter<E>) -> impl Future<Output = ()> + Send {
        (**self).record(letter)
    }

    fn record_undecodable(&self, letter: UndecodableLetter) -> impl Future<Output = ()> + Send {
        (**self).record_undecodable(letter)
    }
}

/// An event a listener's source could not decode, as the runner records it
/// in its [`DeadLetterSink`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UndecodableLetter {
    /// The listener it was for.
    pub listener: Arc<str>,
    /// The event's name, when the source could read it.
    pub name: Option<String>,
    /// The event's id, when the source could read it.
    pub id: Option<Uuid>,
    /// Why it did not decode.
    pub error: String,
    /// The bytes, as the source had them.
    pub payload: Vec<u8>,
    /// Which delivery of the bytes it was.
    pub attempts: u32,
    /// When the runner gave up on it.
    pub failed_at: SystemTime,
}
