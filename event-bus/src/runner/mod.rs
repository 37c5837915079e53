//! How listeners are run, whatever carries their events: the seam between a
//! tier (where events are stored and carried) and the runner (supervision,
//! retries, dead letters, batching, concurrency, cooperative yielding,
//! cancellation and draining).
//!
//! A tier hands the runner a [`Source`] per listener (or per group of
//! listener instances). The source yields [`Delivery`]s: an envelope, the
//! number of the attempt it is on, and the way to finish it. The runner calls
//! the listener's handler and finishes every delivery exactly once, in one of
//! three ways:
//!
//! - [`ack`](Delivery::ack): handled; the source forgets it.
//! - [`retry`](Delivery::retry): the attempt failed and the listener's
//!   [`RetryPolicy`](crate::RetryPolicy) allows another after `delay`. The
//!   source either keeps the retry with the runner ([`Retry::InPlace`]: the
//!   runner holds the delivery, waits, and attempts it again, its slot of
//!   the listener's concurrency held meanwhile) or takes it back
//!   ([`Retry::Redelivered`]: it comes again through the source, no sooner
//!   than `delay`, with its attempt one higher, and a durable source makes
//!   that survive a crash).
//! - [`terminate`](Delivery::terminate): the last attempt failed; the runner
//!   has recorded a [`DeadLetter`](crate::DeadLetter) in its [`DeadLetterSink`] with the reason,
//!   and the source never delivers the event to this listener again.
//!
//! [`Delivery::attempt`] is what the handler sees as the attempt, and what
//! the runner measures the retry policy against, so a source that counts
//! redeliveries (a durable log, a broker) keeps the count across processes.
//!
//! # How the tiers map onto it
//!
//! | | memory | SQL log | NATS JetStream pull consumer |
//! |---|---|---|---|
//! | source | the listener's queue | rows past the listener's checkpoint, leased | a durable consumer (per group) or an ordered/ephemeral one (per instance) |
//! | attempt | counted by the runner (in place) | the delivery row's `attempts` | the message's `num_delivered` |
//! | `ack` | the event leaves the queue's in-flight count | the position is done; the checkpoint moves past the lowest unfinished position | `ack` |
//! | `retry(delay)` | [`Retry::InPlace`] | `attempts + 1`, `next_try = now + delay` persisted; in place while the lease holds, else redelivered | `nak` with `delay`: [`Retry::Redelivered`] |
//! | `terminate` | the event leaves the queue's in-flight count | the delivery row is marked dead with its last error; the checkpoint moves past it | `term` |
//! | [`in_progress`](Delivery::in_progress) | nothing to do | the lease is extended | `in_progress` (resets `ack_wait`) |
//! | concurrency | handlers run at once, each delivery held until finished | leases taken at once; finished out of order, the checkpoint waits for the lowest | `max_ack_pending` |
//!
//! With a concurrency of 1, a delivery retried in place holds back the ones
//! after it: events are handled in their source's order. A source that takes
//! retries back keeps that order only if it delivers nothing past an
//! unfinished event (JetStream's `max_ack_pending = 1`, a SQL source that
//! leases one position at a time).
//!
//! Some semantics belong to one tier and are documented there: priority
//! lanes, fairness, lag policies, the bus-wide sequence and
//! [`quiesce`](crate::EventBus::quiesce) are the memory tier's.

mod batch;
mod core;
mod supervisor;

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::envelope::Envelope;
use crate::event::Event;

pub(crate) use self::core::{ListenerCore, ListenerCounts};
pub(crate) use self::supervisor::{Supervisor, panicked};
pub use crate::dead_letter::DeadLetterSink;

/// Where a listener's deliveries come from: one per listener, or per group
/// of listener instances sharing the work.
///
/// A source is polled by one runner task only. It ends
/// (`Poll::Ready(None)`) once it is closed and every delivery it holds has
/// been yielded; deliveries yielded and not yet finished are the runner's.
pub trait Source<E: Event>: Send + 'static {
    /// What the source yields.
    type Delivery: Delivery<E>;

    /// Polls for the next delivery: `Ready(Some)` with one, `Pending` (the
    /// waker registered) while there is none yet, `Ready(None)` once the
    /// source has ended.
    ///
    /// A source whose deliveries are all ready should take part in tokio's
    /// cooperative budget ([`tokio::task::coop`]), as tokio's channels do,
    /// so that a listener whose handler never awaits still lets other tasks
    /// run.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Self::Delivery>>;

    /// The next delivery if one is ready now, without waiting: `Ok(None)`
    /// when none is, `Err(Ended)` once the source has ended. Batching
    /// listeners collect what is ready through this.
    ///
    /// Defaults to polling once with a waker that does nothing.
    fn try_next(&mut self) -> Result<Option<Self::Delivery>, Ended> {
        match self.poll_next(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Some(delivery)) => Ok(Some(delivery)),
            Poll::Ready(None) => Err(Ended),
            Poll::Pending => Ok(None),
        }
    }

    /// Whether the source is draining (its tier is shutting down): a batch
    /// being collected is handed to its listener at once rather than waiting
    /// to fill. Defaults to `false`.
    fn is_draining(&self) -> bool {
        false
    }

    /// Completes once the source starts draining; owns what it waits on,
    /// so that it can be awaited while the source is polled. Defaults to
    /// never.
    fn draining(&self) -> impl Future<Output = ()> + Send + 'static {
        std::future::pending()
    }
}

/// The source has ended: it will yield nothing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ended;

/// One event delivered to one listener, for one attempt, finished by the
/// runner exactly once.
///
/// Dropping a delivery without finishing it (the runner was stopped
/// mid-handler) leaves the event unfinished: a durable source delivers it
/// again after its lease or `ack_wait` expires; the memory tier reports it
/// undelivered.
pub trait Delivery<E: Event>: Send + Sized + 'static {
    /// The event and its metadata.
    fn envelope(&self) -> &Arc<Envelope<E>>;

    /// Which attempt this is: 1 for the first.
    fn attempt(&self) -> u32;

    /// The attempt succeeded.
    fn ack(self) -> impl Future<Output = ()> + Send;

    /// The attempt failed and another may follow after `delay`: kept in
    /// place, or taken back by the source. See [`Retry`].
    fn retry(self, delay: Duration) -> impl Future<Output = Retry<Self>> + Send;

    /// The last attempt failed with `reason`; the runner has recorded the
    /// dead letter. The source never delivers this event to this listener
    /// again.
    fn terminate(self, reason: &str) -> impl Future<Output = ()> + Send;

    /// The handler is still working: a source whose deliveries expire
    /// (a lease, an `ack_wait`) extends this one's. Defaults to nothing.
    fn in_progress(&self) {}
}

/// How a source carries a retry: see [`Delivery::retry`].
#[derive(Debug)]
pub enum Retry<D> {
    /// The runner keeps the delivery: it waits the delay and attempts it
    /// again with this delivery, whose [`attempt`](Delivery::attempt) is now
    /// one higher.
    InPlace(D),
    /// The source took the delivery back and will yield it again, no sooner
    /// than the delay, with its attempt one higher.
    Redelivered,
}
