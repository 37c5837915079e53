//! The dead-letter stream: what listeners gave up on, written as messages
//! of `<STREAM>_DLQ` on `<prefix>_dlq.<listener>`, listed, redriven and
//! discarded from there.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::names;
use crate::codec::JsonCodec;
use crate::envelope::Envelope;
use crate::error::NatsError;
use crate::event::Event;

/// How long a listing waits for the dead-letter stream's messages.
const LIST_DEADLINE: Duration = Duration::from_secs(30);

/// The most messages one listing request asks for.
const LIST_BATCH: usize = 256;

/// Publishes a message and waits for the stream's ack, trying again (the
/// message id makes a retry land once) until `span` has passed.
pub(crate) async fn publish_acked(
    context: &async_nats::jetstream::Context,
    subject: Subject,
    message: PublishMessage,
    span: Duration,
) -> Result<PublishAck, NatsError> {
    let deadline = tokio::time::Instant::now() + span;
    let first = publish_once(context, &subject, &message).await;
    retry_publish(context, subject, message, deadline, first).await
}

/// Goes on from a publish's `last` attempt: tries again, pausing between
/// attempts, as long as an attempt can start by `deadline`. A deadline at
/// most the retry span after the message's first send keeps every send
/// within the stream's duplicate window, which covers the span: however
/// often it is sent, the message is stored once.
pub(crate) async fn retry_publish(
    context: &async_nats::jetstream::Context,
    subject: Subject,
    message: PublishMessage,
    deadline: tokio::time::Instant,
    mut last: Result<PublishAck, NatsError>,
) -> Result<PublishAck, NatsError> {
    let mut pause = Duration::from_millis(20);
    loop {
        match last {
            Ok(ack) => return Ok(ack),
            Err(error) if tokio::time::Instant::now() + pause > deadline => return Err(error),
            Err(error) => {
                tracing::debug!(subject = %subject, error = %error, "a publish was not acknowledged; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
        last = publish_once(context, &subject, &message).await;
    }
}

/// One attempt: sends the message and waits for its ack.
async fn publish_once(
    context: &async_nats::jetstream::Context,
    subject: &Subject,
    message: &PublishMessage,
) -> Result<PublishAck, NatsError> {
    match context.send_publish(subject.clone(), message.clone()).await {
        Ok(ack) => ack.await.map_err(unacked),
        Err(error) => Err(unacked(error)),
    }
}

pub(crate) fn unacked(error: impl std::error::Error + Send + Sync + 'static) -> NatsError {
    NatsError::Publish(Box::new(error))
}

/// What a letter's headers keep of its error however large its event: its
/// error shortened to no less than this, else the event's bytes dropped.
const MIN_ERROR: usize = 256;

/// Bytes a letter leaves below the server's `max_payload`.
const LETTER_MARGIN: usize = 64;

/// The header a message id is sent in.
const MSG_ID: &str = "Nats-Msg-Id";

/// The bytes of a message's header block around its lines: `NATS/1.0\r\n`
/// before them and `\r\n` after.
const HEADER_BLOCK: usize = "NATS/1.0\r\n\r\n".len();

/// The bytes one header line `name: value\r\n` takes.
fn line_bytes(name: &str, value: usize) -> usize {
    name.len() + ": \r\n".len() + value
}

/// The bytes `headers` take in a message's header block, its lines and
/// what is around them.
fn header_bytes(headers: &HeaderMap) -> usize {
    HEADER_BLOCK
        + headers
            .iter()
            .flat_map(|(name, values)| values.iter().map(move |value| (name, value)))
            .map(|(name, value)| line_bytes(name.as_ref(), value.as_str().len()))
            .sum::<usize>()
}

/// How many of a listener's latest handled events its process remembers.
const HANDLED_KEPT: usize = 65_536;

/// The stream sequences of the events a listener (its group, every spawn
/// of it in this process) handled lately here, and of those it holds now:
/// those its consumer gave up on while their handling was late (the
/// deliveries came through a stalled connection) are not its dead letters.
#[derive(Clone, Default)]
pub(crate) struct Handled(Arc<HandledState>);

#[derive(Default)]
struct HandledState {
    sets: std::sync::Mutex<HandledSet>,
    /// Woken when a held event is finished.
    finished: tokio::sync::Notify,
}

#[derive(Default)]
struct HandledSet {
    order: std::collections::VecDeque<u64>,
    set: std::collections::HashSet<u64>,
    /// The events held here (handed to the runner, not finished), each
    /// with how many deliveries of it are.
    held: std::collections::HashMap<u64, usize>,
}

/// An event held here until dropped (its delivery finished or gone).
pub(crate) struct Holding {
    handled: Handled,
    sequence: u64,
}

impl Drop for Holding {
    fn drop(&mut self) {
        {
            let mut sets = self.handled.sets();
            if let Some(count) = sets.held.get_mut(&self.sequence) {
                *count -= 1;
                if *count == 0 {
                    sets.held.remove(&self.sequence);
                }
            }
        }
        self.handled.0.finished.notify_waiters();
    }
}

impl Handled {
    fn sets(&self) -> std::sync::MutexGuard<'_, HandledSet> {
        self.0
            .sets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Marks the event at `sequence` held until the guard is dropped.
    pub(crate) fn hold(&self, sequence: u64) -> Holding {
        *self.sets().held.entry(sequence).or_default() += 1;
        Holding {
            handled: self.clone(),
            sequence,
        }
    }

    /// Whether the event at `sequence` is held here now.
    pub(crate) fn is_held(&self, sequence: u64) -> bool {
        self.sets().held.contains_key(&sequence)
    }

    /// Waits until a held event is finished (or `timeout` passed).
    pub(crate) async fn finished(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.0.finished.notified()).await;
    }

    pub(crate) fn record(&self, sequence: u64) {
        let mut handled = self.sets();
        if handled.set.insert(sequence) {
            handled.order.push_back(sequence);
            if handled.order.len() > HANDLED_KEPT {
                if let Some(oldest) = handled.order.pop_front() {
                    handled.set.remove(&oldest);
                }
            }
        }
    }

    pub(crate) fn contains(&self, sequence: u64) -> bool {
        self.sets().set.contains(&sequence)
    }
}

/// One listener's dead letters: where they are written.
#[derive(Clone)]
pub(crate) struct Letters {
    pub(crate) context: async_nats::jetstream::Context,
    /// The listener's name as dead letters and redrives address it.
    pub(crate) key: Arc<str>,
    /// `<prefix>_dlq.<token of key>`.
    pub(crate) subject: Subject,
    pub(crate) span: Duration,
    /// What the listener handled lately, here.
    pub(crate) handled: Handled,
}

/// A message whose last attempt failed.
pub(crate) struct Failure<'a> {
    pub(crate) subject: &'a Subject,
    pub(crate) headers: Option<&'a HeaderMap>,
    pub(crate) payload: Bytes,
    pub(crate) sequence: u64,
    pub(crate) attempts: u32,
    pub(crate) error: &'a str,
}

impl Letters {
    pub(crate) fn listener(&self) -> &str {
        &self.key
    }

    /// Writes `failure` to the dead-letter stream, once: its message id is
    /// the event's stream sequence and the listener. A letter never goes
    /// over the server's `max_payload` (which would close the connection):
    /// its error is shortened to fit, and if the event itself leaves too
    /// little room, the letter keeps its size instead of its bytes
    /// ([`names::DROPPED`]; a redrive reads it back from the event stream).
    pub(crate) async fn write(&self, failure: Failure<'_>) -> Result<(), NatsError> {
        let max = self.context.client().server_info().max_payload;
        let mut headers = HeaderMap::new();
        if let Some(traceparent) = failure
            .headers
            .and_then(|original| original.get(names::TRACEPARENT))
        {
            headers.insert(names::TRACEPARENT, traceparent.as_str());
        }
        headers.insert(names::LISTENER, names::header_value(&self.key));
        headers.insert(names::ATTEMPTS, failure.attempts.to_string());
        headers.insert(names::SUBJECT, failure.subject.as_str());
        headers.insert(names::SEQUENCE, failure.sequence.to_string());
        let failed_at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |since| since.as_millis());
        headers.insert(names::FAILED_AT, failed_at.to_string());
        let id = format!("{}:{}", failure.sequence, self.key);
        // What the letter takes besides its payload and error: its header
        // block, with its message id, its error and a dropped size among
        // them, and a margin.
        let fixed = header_bytes(&headers)
            + line_bytes(MSG_ID, id.len())
            + line_bytes(names::ERROR, 0)
            + line_bytes(names::DROPPED, u64::MAX.to_string().len())
            + LETTER_MARGIN;
        let room = max.saturating_sub(fixed);
        let mut payload = failure.payload;
        let error_room = room
            .saturating_sub(payload.len())
            .clamp(MIN_ERROR, names::MAX_HEADER);
        let error = names::header_value_within(failure.error, error_room);
        if payload.len() + error.len() > room {
            headers.insert(names::DROPPED, payload.len().to_string());
            payload = Bytes::new();
        }
        headers.insert(names::ERROR, error);
        let message = PublishMessage::build()
            .payload(payload)
            .headers(headers)
            .message_id(id);
        publish_acked(&self.context, self.subject.clone(), message, self.span).await?;
        Ok(())
    }
}

/// An event a listener gave up on, as the dead-letter stream keeps it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeadMessage<E> {
    /// The listener that gave up: its group, or `<name>@<instance>` for an
    /// instance listener.
    pub listener: String,
    /// The letter's sequence in the dead-letter stream: what
    /// [`redrive`](super::JetStream::redrive) and
    /// [`discard`](super::JetStream::discard) take.
    pub sequence: u64,
    /// The event's sequence in the event stream.
    pub stream_sequence: u64,
    /// The event's id, when it could be read.
    pub id: Option<Uuid>,
    /// The event's name, when it could be read.
    pub name: Option<String>,
    /// The event, or `None` if it does not decode into `E`.
    pub envelope: Option<Arc<Envelope<E>>>,
    /// The event's bytes, as they were published; empty if they were too
    /// large to keep beside the letter's headers (see `dropped`).
    pub payload: Bytes,
    /// The event's size, when its bytes were too large to keep in the
    /// letter under the server's `max_payload`: the event stays in the
    /// event stream at `stream_sequence` (while the stream keeps it), and a
    /// [`redrive`](super::JetStream::redrive) reads it from there.
    pub dropped: Option<usize>,
    /// How many attempts were made.
    pub attempts: u32,
    /// The last attempt's error (or why the event did not decode).
    pub error: String,
    /// When the listener gave up.
    pub failed_at: SystemTime,
    /// The subject the event was published on.
    pub subject: String,
    traceparent: Option<String>,
}

fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers
        .and_then(|headers| headers.get(name))
        .map(|value| value.as_str())
}

impl<E: Event + DeserializeOwned> DeadMessage<E> {
    fn of(message: &async_nats::jetstream::Message) -> Self {
        let sequence = message.info().map_or(0, |info| info.stream_sequence);
        let headers = message.headers.as_ref();
        let decoded = JsonCodec.decode::<E>(&message.payload);
        let (id, name) = match &decoded {
            Ok(envelope) => (Some(envelope.id()), Some(envelope.name().to_owned())),
            Err(error) => (error.id(), error.name().map(str::to_owned)),
        };
        let millis = header(headers, names::FAILED_AT)
            .and_then(|at| at.parse::<u64>().ok())
            .unwrap_or(0);
        Self {
            listener: header(headers, names::LISTENER)
                .unwrap_or_default()
                .to_owned(),
            sequence,
            stream_sequence: header(headers, names::SEQUENCE)
                .and_then(|sequence| sequence.parse().ok())
                .unwrap_or(0),
            id,
            name,
            envelope: decoded.ok().map(Arc::new),
            payload: message.payload.clone(),
            dropped: header(headers, names::DROPPED).and_then(|size| size.parse().ok()),
            attempts: header(headers, names::ATTEMPTS)
                .and_then(|attempts| attempts.parse().ok())
                .unwrap_or(0),
            error: header(headers, names::ERROR).unwrap_or_default().to_owned(),
            failed_at: SystemTime::UNIX_EPOCH + Duration::from_millis(millis),
            subject: header(headers, names::SUBJECT)
                .unwrap_or_default()
                .to_owned(),
            traceparent: header(headers, names::TRACEPARENT).map(str::to_owned),
        }
    }
}

/// The dead-letter stream of a tier.
#[derive(Clone)]
pub(crate) struct DeadLetterStream {
    pub(crate) context: async_nats::jetstream::Context,
    pub(crate) stream: String,
    /// The event stream, where a letter that dropped its event's bytes
    /// reads them back.
    pub(crate) events: String,
    /// `<prefix>_dlq`.
    pub(crate) subjects: String,
    pub(crate) span: Duration,
}

impl DeadLetterStream {
    /// The subject of `listener`'s letters.
    pub(crate) fn subject_of(&self, listener: &str) -> String {
        format!("{}.{}", self.subjects, names::token(listener))
    }

    /// The letters of `listener`, or of all, oldest first.
    pub(crate) async fn list<E: Event + DeserializeOwned>(
        &self,
        listener: Option<&str>,
    ) -> Result<Vec<DeadMessage<E>>, NatsError> {
        let filter =
            listener.map_or_else(|| format!("{}.>", self.subjects), |l| self.subject_of(l));
        let stream = self
            .context
            .get_stream(&self.stream)
            .await
            .map_err(|error| NatsError::request("read the dead-letter stream", error))?;
        let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
            .create_consumer(PullConfig {
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::None,
                filter_subject: filter,
                inactive_threshold: Duration::from_secs(30),
                ..PullConfig::default()
            })
            .await
            .map_err(|error| NatsError::request("list the dead letters", error))?;
        let mut left = consumer
            .info()
            .await
            .map_err(|error| NatsError::request("list the dead letters", error))?
            .num_pending;
        let deadline = tokio::time::Instant::now() + LIST_DEADLINE;
        let mut letters = Vec::new();
        while left > 0 {
            if tokio::time::Instant::now() >= deadline {
                return Err(NatsError::request(
                    "list the dead letters",
                    "the dead-letter stream did not deliver every letter in time",
                ));
            }
            let mut batch = consumer
                .fetch()
                .max_messages(LIST_BATCH)
                .expires(Duration::from_secs(1))
                .messages()
                .await
                .map_err(|error| NatsError::request("list the dead letters", error))?;
            while let Some(message) = batch.next().await {
                let Ok(message) = message else { break };
                let letter = DeadMessage::of(&message);
                let pending = message
                    .info()
                    .map_or(left.saturating_sub(1), |info| info.pending);
                if listener.is_none_or(|l| letter.listener == l) {
                    letters.push(letter);
                }
                left = pending;
                if left == 0 {
                    break;
                }
            }
        }
        let name = consumer.cached_info().name.clone();
        // The consumer goes by itself when inactive; deleting it is a
        // courtesy.
        let _ = stream.delete_consumer(&name).await;
        Ok(letters)
    }

    /// Publishes `letters` again, each to its listener alone, and removes
    /// them from the dead-letter stream. Returns how many were redriven.
    pub(crate) async fn redrive<E>(&self, letters: Vec<DeadMessage<E>>) -> Result<u64, NatsError> {
        let stream = self
            .context
            .get_stream(&self.stream)
            .await
            .map_err(|error| NatsError::request("read the dead-letter stream", error))?;
        let mut redriven = 0;
        let max = self.context.client().server_info().max_payload;
        for letter in letters {
            let payload = match letter.dropped {
                None => letter.payload.clone(),
                Some(_) => self.event_of(&letter).await?,
            };
            let message = redrive_message(&letter, payload, &self.stream, max)?;
            publish_acked(
                &self.context,
                Subject::from(letter.subject.as_str()),
                message,
                self.span,
            )
            .await?;
            stream
                .delete_message(letter.sequence)
                .await
                .map_err(|error| NatsError::request("remove a redriven dead letter", error))?;
            redriven += 1;
        }
        Ok(redriven)
    }

    /// The bytes of the event a letter dropped, from the event stream.
    async fn event_of<E>(&self, letter: &DeadMessage<E>) -> Result<Bytes, NatsError> {
        let events = self
            .context
            .get_stream(&self.events)
            .await
            .map_err(|error| NatsError::request("read the event stream", error))?;
        let event = events
            .get_raw_message(letter.stream_sequence)
            .await
            .map_err(|error| NatsError::request("read a dead letter's event back", error))?;
        Ok(event.payload)
    }

    /// Removes `letters` from the dead-letter stream.
    pub(crate) async fn discard<E>(&self, letters: Vec<DeadMessage<E>>) -> Result<u64, NatsError> {
        let stream = self
            .context
            .get_stream(&self.stream)
            .await
            .map_err(|error| NatsError::request("read the dead-letter stream", error))?;
        let mut discarded = 0;
        for letter in letters {
            if stream
                .delete_message(letter.sequence)
                .await
                .map_err(|error| NatsError::request("discard a dead letter", error))?
            {
                discarded += 1;
            }
        }
        Ok(discarded)
    }
}

/// The message that redrives `letter` with the event's `payload`: its
/// listener named in [`names::REDRIVE`], its trace context, and a message
/// id that has a retried redrive stored once. Under the server's
/// `max_payload`, a long name gives way to its tag and then the message id
/// goes; an event that leaves no room even so is [`NatsError::TooLarge`],
/// and its letter stays.
fn redrive_message<E>(
    letter: &DeadMessage<E>,
    payload: Bytes,
    stream: &str,
    max: usize,
) -> Result<PublishMessage, NatsError> {
    let mut headers = HeaderMap::new();
    if let Some(traceparent) = &letter.traceparent {
        headers.insert(names::TRACEPARENT, traceparent.as_str());
    }
    let id = format!("redrive:{stream}:{}", letter.sequence);
    let id_bytes = line_bytes(MSG_ID, id.len());
    let tag = names::redrive_tag(&letter.listener);
    let name = if payload.len()
        + header_bytes(&headers)
        + line_bytes(names::REDRIVE, letter.listener.len())
        + id_bytes
        <= max
    {
        letter.listener.as_str()
    } else {
        tag.as_str()
    };
    headers.insert(names::REDRIVE, name);
    let size = payload.len() + header_bytes(&headers);
    let message = PublishMessage::build().payload(payload).headers(headers);
    if size + id_bytes <= max {
        Ok(message.message_id(id))
    } else if size <= max {
        Ok(message)
    } else {
        Err(NatsError::TooLarge { size, max })
    }
}
