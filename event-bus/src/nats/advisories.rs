//! Dead letters from the server's max-deliveries advisories: the events a
//! consumer stopped delivering with no attempt of the listener's ending
//! them.
//!
//! The server counts deliveries it sent, not attempts a listener made: a
//! delivery lost on its way (a connection that stalls without closing) or
//! cut short (a process killed mid-handler) counts, and once a message has
//! had the consumer's `max_deliver` of them the server delivers it no more.
//! It says so once, in the advisory
//! `$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>`. The
//! advisory stream `<STREAM>_ADV` keeps those advisories (a work queue: one
//! consumer per listener, each taking its own), so that one published
//! while no process of the listener could hear it waits for one that can;
//! each listener's advisory task writes the dead letter of each event its
//! consumer gave up on, from the event stream's copy, then acks the
//! advisory.

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::{Config as PullConfig, MessagesErrorKind};
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use futures_util::StreamExt;
use serde::Deserialize;

use super::dead_letters::{Failure, Letters};
use super::source::is_for;
use crate::event::{Event, KindSet};

/// The subject prefix of a consumer's max-deliveries advisories.
const MAX_DELIVERIES: &str = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES";

/// How long the advisory stream keeps an advisory no listener took (one of
/// a consumer that is no listener's), when the event stream has no age
/// limit of its own.
pub(crate) const MAX_AGE: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// How long at least an advisory waits after it came, for the deliveries
/// that came with it to reach the listener's pump.
const LATE_GRACE: Duration = Duration::from_millis(250);

/// How long after a failed write (or read) an advisory comes back.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// How long a pull for advisories waits, and how often the server says it
/// is still there.
const EXPIRES: Duration = Duration::from_secs(30);
const HEARTBEAT: Duration = Duration::from_secs(5);

/// The advisory stream's subjects for the event stream `stream`: the
/// advisories of each of its consumers.
pub(crate) fn subjects_of(stream: &str) -> String {
    format!("{MAX_DELIVERIES}.{stream}.*")
}

/// The subject of the advisories of `consumer` of `stream`.
pub(crate) fn subject_of(stream: &str, consumer: &str) -> String {
    format!("{MAX_DELIVERIES}.{stream}.{consumer}")
}

/// The part of the advisory the letter needs.
#[derive(Deserialize)]
struct MaxDeliveries {
    stream_seq: u64,
    deliveries: u64,
}

/// One listener's advisory task: what it reads, and where it writes.
pub(crate) struct Advisories<E: Event> {
    /// The listener's consumer of the advisory stream.
    pub(crate) consumer: PullConsumer,
    pub(crate) consumer_config: PullConfig,
    pub(crate) advisories: Stream,
    /// The event stream, where the events are read from.
    pub(crate) events: Stream,
    pub(crate) letters: Letters,
    pub(crate) prefix: std::sync::Arc<str>,
    pub(crate) interests: KindSet<E::Kind>,
    /// `true` once the listener's task has ended: so does this one.
    pub(crate) done: tokio::sync::watch::Receiver<bool>,
}

impl<E: Event> Advisories<E> {
    /// Pulls the listener's advisories until the listener has ended, then
    /// writes the letters of those waiting at once (its handler is done:
    /// what it handled here is known) and ends. Aborted, an advisory cut
    /// short comes back, after its `ack_wait`, to this or another process
    /// of the listener.
    pub(crate) async fn run(mut self) {
        self.pull().await;
        self.last().await;
    }

    /// The advisories waiting once the listener has ended, until none is
    /// left.
    async fn last(&self) {
        loop {
            let Ok(mut batch) = self.consumer.fetch().max_messages(64).messages().await else {
                return;
            };
            let mut any = false;
            while let Some(Ok(message)) = batch.next().await {
                any = true;
                self.letter(message).await;
            }
            if !any {
                return;
            }
        }
    }

    /// Whether the listener has ended.
    fn is_done(&self) -> bool {
        *self.done.borrow()
    }

    async fn pull(&mut self) {
        let mut done = self.done.clone();
        loop {
            if self.is_done() {
                return;
            }
            let messages = self
                .consumer
                .stream()
                .max_messages_per_batch(16)
                .expires(EXPIRES)
                .heartbeat(HEARTBEAT)
                .messages()
                .await;
            let mut messages = match messages {
                Ok(messages) => messages,
                Err(error) => {
                    tracing::debug!(listener = %self.letters.listener(), error = %error, "could not pull the listener's advisories; trying again");
                    self.recreate().await;
                    tokio::time::sleep(RETRY_DELAY).await;
                    continue;
                }
            };
            loop {
                let next = tokio::select! {
                    next = messages.next() => next,
                    _ = done.wait_for(|done| *done) => return,
                };
                let Some(next) = next else { break };
                match next {
                    Ok(message) => self.letter(message).await,
                    Err(error) if error.kind() == MessagesErrorKind::ConsumerDeleted => {
                        self.recreate().await;
                        break;
                    }
                    Err(error) => {
                        tracing::debug!(listener = %self.letters.listener(), error = %error, "pulling the listener's advisories");
                    }
                }
            }
            tokio::time::sleep(RETRY_DELAY).await;
        }
    }

    /// Makes the consumer again (an instance listener's, deleted while its
    /// process was away).
    async fn recreate(&mut self) {
        if let Ok(consumer) = self
            .advisories
            .create_consumer(self.consumer_config.clone())
            .await
        {
            self.consumer = consumer;
        }
    }

    /// Writes the dead letter the advisory `message` stands for and acks
    /// it; naks it to come back if the letter could not be written.
    async fn letter(&self, message: async_nats::jetstream::Message) {
        let Ok(info) = message.info() else {
            return;
        };
        let (sequence, published) = (info.stream_sequence, info.published);
        let advisory: MaxDeliveries = match serde_json::from_slice(&message.payload) {
            Ok(advisory) => advisory,
            Err(error) => {
                tracing::error!(listener = %self.letters.listener(), error = %error, "a max-deliveries advisory did not parse; dropped");
                let _ = message.ack().await;
                return;
            }
        };
        // A copy that came late (this process's connection stalled, and
        // another process took the advisory meanwhile): the work queue
        // removed the advisory when that one, its letter written, acked it.
        if self.taken(sequence).await {
            let _ = message.ack().await;
            return;
        }
        // Deliveries that came late through a stalled connection may still
        // be on their way to this process's handler, or in it: wait out an
        // `ack_wait` from the advisory (a moment at least from its coming
        // here, for what came with it to reach the pump), and while the
        // event is held here, then leave alone an event handled here.
        let grace = self.consumer_config.ack_wait;
        let age =
            Duration::try_from(time::OffsetDateTime::now_utc() - published).unwrap_or_default();
        let wait = grace.saturating_sub(age).max(LATE_GRACE.min(grace));
        if !self.is_done() {
            let _ = message.ack_with(AckKind::Progress).await;
            let mut done = self.done.clone();
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = done.wait_for(|done| *done) => {}
            }
        }
        let handled = &self.letters.handled;
        while handled.is_held(advisory.stream_seq) && !self.is_done() {
            let _ = message.ack_with(AckKind::Progress).await;
            let mut done = self.done.clone();
            tokio::select! {
                () = handled.finished(grace / 3) => {}
                _ = done.wait_for(|done| *done) => {}
            }
        }
        let kind = match self.write(&advisory).await {
            Ok(()) => AckKind::Ack,
            Err(()) => AckKind::Nak(Some(RETRY_DELAY)),
        };
        if let Err(error) = message.ack_with(kind).await {
            // Not acked, it is delivered again: its letter is written once
            // either way (the letter's message id).
            tracing::debug!(listener = %self.letters.listener(), error = %error, "could not ack an advisory; it will be delivered again");
        }
    }

    /// Whether the advisory at `sequence` of the advisory stream was taken
    /// (acked, so removed from the work queue) by another delivery of it.
    async fn taken(&self, sequence: u64) -> bool {
        matches!(
            self.advisories.get_raw_message(sequence).await,
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound
        )
    }

    /// `Err` if the advisory is to come back: the event could not be read
    /// or its letter not written.
    async fn write(&self, advisory: &MaxDeliveries) -> Result<(), ()> {
        let listener = self.letters.listener();
        let sequence = advisory.stream_seq;
        if self.letters.handled.contains(sequence) {
            tracing::debug!(listener = %listener, sequence, "the server stopped delivering an event this process handled late; no dead letter");
            return Ok(());
        }
        let event = match self.events.get_raw_message(sequence).await {
            Ok(event) => event,
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => {
                tracing::error!(
                    listener = %listener,
                    sequence,
                    "the server stopped delivering an event that is no longer in the stream: no dead letter can be written",
                );
                return Ok(());
            }
            Err(error) => {
                tracing::warn!(listener = %listener, sequence, error = %error, "could not read an event the server stopped delivering; trying again");
                return Err(());
            }
        };
        // An event the listener does not handle (of another kind, or
        // redriven to another listener) is acked unhandled when it comes:
        // one it never came to is not its dead letter.
        if !is_for::<E>(
            &self.prefix,
            self.letters.listener(),
            &self.interests,
            &event.subject,
            Some(&event.headers),
        ) {
            return Ok(());
        }
        let deliveries = u32::try_from(advisory.deliveries).unwrap_or(u32::MAX);
        let error = format!(
            "delivered {deliveries} times with no attempt ending it (the consumer's max_deliver): \
             the deliveries were lost on their way to the listener, or its attempts cut short \
             (one that reached it late may have been handled)"
        );
        let failure = Failure {
            subject: &event.subject,
            headers: Some(&event.headers),
            payload: event.payload.clone(),
            sequence,
            attempts: deliveries,
            error: &error,
        };
        match self.letters.write(failure).await {
            Ok(()) => {
                tracing::error!(listener = %listener, sequence, deliveries, "the server stopped delivering an event; recorded a dead letter");
                Ok(())
            }
            Err(write) => {
                tracing::warn!(listener = %listener, sequence, error = %write, "could not write the dead letter of an event the server stopped delivering; trying again");
                Err(())
            }
        }
    }
}
