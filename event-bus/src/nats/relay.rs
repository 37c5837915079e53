//! [`Relay`]: the outbox relay, the listener that publishes what it is
//! handed into the event stream.

use std::fmt;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::jetstream::JetStream;
use crate::batch::{Batch, BatchError, BatchListener};
use crate::error::NatsError;
use crate::event::Event;
use crate::listener::{BatchFailure, ListenerOptions, RetryPolicy};

/// The relay's name: its group on the durable tier.
pub(crate) const RELAY: &str = "nats-relay";

/// The most events the relay publishes in one batch.
const RELAY_BATCH: usize = 100;

/// How long one attempt at a batch waits for its publishes to be sent and
/// acknowledged before it fails.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// The outbox relay: a batch listener that publishes each event it is
/// handed into a [`JetStream`]'s event stream, with the event's own id (its
/// `Nats-Msg-Id`) and trace context, and succeeds once the stream has
/// stored every one.
///
/// Spawned on the durable tier ([`JetStream::spawn_relay`]), it reads the
/// SQL log like any durable listener: the events an application commits in
/// its own transactions reach the stream at least once, and the relay's
/// checkpoint is what marks them published. The database commit and the
/// publish need no distributed transaction: a crash between a publish and
/// the checkpoint publishes again, and the stream stores the copy once
/// (within its duplicate window, which [`JetStream::spawn_relay`] checks
/// covers the relay's retries). The window does not cover an outage: a
/// relay that stays down (every process that spawns it) longer than the
/// window after a publish and before its checkpoint publishes that batch
/// again after the window, and the stream stores it twice; listeners that
/// make their effect once by the event's id
/// (`event_bus::sql::first_time`) are not affected.
///
/// A batch's events are sent at once and their acks awaited in order, so
/// the stream holds them in log order; nothing is sent after an event that
/// could not be (it does not encode, or its send failed). An event that
/// was sent but not acknowledged (a timeout, a lost connection) may be
/// followed in the stream by later events of its batch, sent with it and
/// stored: its retry stores it after them. With the relay in several
/// processes, each publishes the part of the log it claims, at the same
/// time as the others: the stream holds each process's batches in log
/// order, not the whole log; spawn it in one process where that matters.
/// An event the stream did not store
/// fails, with it every event after it ([`BatchFailure::StopAtFirst`] in
/// [`options`](Self::options)), and is retried by the listener's
/// [`RetryPolicy`]: on the durable tier each retry is persisted, and an
/// event that fails every attempt is a dead delivery of the `nats-relay`
/// group, listed and redriven with the store's own API.
pub struct Relay<E> {
    stream: JetStream<E>,
}

impl<E> fmt::Debug for Relay<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relay")
            .field("stream", &self.stream)
            .finish()
    }
}

impl<E> Relay<E> {
    pub(crate) fn new(stream: JetStream<E>) -> Self {
        Self { stream }
    }

    /// The options it runs with on [`JetStream::spawn_relay`]: batches of
    /// up to 100, [`BatchFailure::StopAtFirst`] (what follows a failed
    /// event is published after it), and 9 attempts 100 ms to 2 s apart
    /// (with each attempt's wait for its ack, up to 5 s, about a minute in
    /// all): a server restart or a lost connection is waited out; an event
    /// still not stored after that is a dead delivery, to be redriven.
    pub fn options() -> ListenerOptions {
        ListenerOptions::new()
            .max_batch(RELAY_BATCH)
            .max_wait(Duration::ZERO)
            .batch_failure(BatchFailure::StopAtFirst)
            .retry(
                RetryPolicy::exponential(9)
                    .initial_backoff(Duration::from_millis(100))
                    .max_backoff(Duration::from_secs(2)),
            )
    }
}

/// How long after an event's first publish the relay may publish it again
/// under `options`: every backoff of its retry policy, each attempt's wait
/// for its ack, and the lease another process waits out should the
/// relaying one die (twice: for one that dies while retrying, too).
#[cfg(feature = "sql")]
pub(crate) fn retry_span(options: &ListenerOptions, lease: Duration) -> Duration {
    let policy = options.get_retry();
    let attempts = policy.max_attempts();
    let backoffs = (1..attempts).fold(Duration::ZERO, |span, retry| {
        span.saturating_add(policy.backoff(retry))
    });
    backoffs
        .saturating_add(ACK_TIMEOUT.saturating_mul(attempts))
        .saturating_add(lease.saturating_mul(2))
}

/// Why an event of a batch was not sent: an event before it could not be.
#[derive(Debug)]
struct NotSent;

impl fmt::Display for NotSent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not sent: an earlier event of its batch could not be")
    }
}

impl std::error::Error for NotSent {}

impl<E> BatchListener<E> for Relay<E>
where
    E: Event + Serialize + DeserializeOwned,
{
    fn name(&self) -> &str {
        RELAY
    }

    async fn handle_batch(&self, batch: &Batch<E>) -> Result<(), BatchError> {
        let context = self.stream.context();
        // One attempt at the batch, its sends and acks, within the ack
        // timeout: a client that cannot reach its server waits in either.
        let until = tokio::time::Instant::now() + ACK_TIMEOUT;
        let mut sent = Vec::with_capacity(batch.len());
        let mut unsent = false;
        for envelope in batch.iter() {
            // Nothing is sent after an event that could not be: the events
            // after it must not reach the stream ahead of its retry.
            if unsent {
                sent.push(Err(NatsError::Publish(Box::new(NotSent))));
                continue;
            }
            let attempt = match self.stream.message(envelope) {
                Ok((subject, message)) => {
                    match tokio::time::timeout_at(until, context.send_publish(subject, message))
                        .await
                    {
                        Ok(Ok(ack)) => Ok(ack),
                        Ok(Err(error)) => Err(NatsError::Publish(Box::new(error))),
                        Err(elapsed) => Err(NatsError::Publish(Box::new(elapsed))),
                    }
                }
                Err(error) => Err(error),
            };
            unsent = attempt.is_err();
            sent.push(attempt);
        }
        let mut failed: Option<BatchError> = None;
        for (index, attempt) in sent.into_iter().enumerate() {
            let stored = match attempt {
                Ok(ack) => match tokio::time::timeout_at(until, ack).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(error)) => Err(NatsError::Publish(Box::new(error))),
                    Err(elapsed) => Err(NatsError::Publish(Box::new(elapsed))),
                },
                Err(error) => Err(error),
            };
            // Every event not stored is named: under `StopAtFirst` the
            // first of them and all after it are tried again, under
            // `Independent` each of them.
            if let Err(error) = stored {
                let this = BatchError::event(index, error);
                failed = Some(match failed {
                    Some(failed) => failed.and(this),
                    None => this,
                });
            }
        }
        failed.map_or(Ok(()), Err)
    }
}
