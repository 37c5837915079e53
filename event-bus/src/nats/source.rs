//! One listener's link to its JetStream consumer: a pump task that pulls
//! messages (no more than `max_ack_pending` are out at once), decodes them
//! and hands them to the runner through a [`ConsumerSource`]; and the
//! [`JetStreamDelivery`] whose finish is an ack, a nak with a delay, a
//! term or a keep-alive on the message.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::{Config as PullConfig, MessagesErrorKind};
use async_nats::jetstream::message::AckKind;
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};

use super::dead_letters::{Failure, Holding, Letters};
use super::names;
use crate::codec::JsonCodec;
use crate::envelope::Envelope;
use crate::event::{Event, EventKind, KindSet};
use crate::runner::{Delivery, Retry, Source, Undecodable};
use crate::trace::TraceParent;

/// The fewest messages one pull request asks for.
const PULL_BATCH: usize = 128;

/// How long one pull request waits on the server for messages.
const EXPIRES: Duration = Duration::from_secs(5);

/// How often the server says an open pull request is alive.
const HEARTBEAT: Duration = Duration::from_secs(2);

/// How long the pump waits after a failed request before it tries again.
const BACKOFF: Duration = Duration::from_millis(250);

/// How long an ack (or term) waits for the server to confirm it.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// The most acks a listener's acker sends at once.
const ACK_BATCH: usize = 256;

/// How a dead letter that could not be written is tried again: the message
/// comes back after this.
const UNWRITTEN_DELAY: Duration = Duration::from_secs(1);

type Item<E> = Result<JetStreamDelivery<E>, Undecodable>;

/// What one listener's messages reach the server through: the client, its
/// acks sent and not yet confirmed, and its acker (see [`acker`]). Shared
/// by the listener's replies.
struct Link {
    client: async_nats::Client,
    sent: Arc<Sent>,
    /// For an ack that could not be sent at once.
    acks: mpsc::UnboundedSender<(Subject, Option<Held>)>,
}

/// A listener's acks sent and not yet confirmed, which its acker confirms
/// together (see [`acker`]).
#[derive(Default)]
struct Sent {
    unconfirmed: Mutex<Unconfirmed>,
    /// Woken by the first ack after a confirmation, and when
    /// [`ACK_BATCH`] wait.
    wake: tokio::sync::Notify,
}

#[derive(Default)]
struct Unconfirmed {
    /// The last ack's subject: the confirmation is asked for on it.
    last: Option<Subject>,
    /// What each ack holds.
    helds: Vec<Option<Held>>,
}

impl Sent {
    /// Records an ack on `subject`, sent: it is confirmed with the others.
    fn push(&self, subject: Subject, held: Option<Held>) {
        let waiting = {
            let mut unconfirmed = self
                .unconfirmed
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            unconfirmed.last = Some(subject);
            unconfirmed.helds.push(held);
            unconfirmed.helds.len()
        };
        if waiting == 1 || waiting >= ACK_BATCH {
            self.wake.notify_one();
        }
    }

    fn waiting(&self) -> usize {
        self.unconfirmed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .helds
            .len()
    }

    fn take(&self) -> Unconfirmed {
        std::mem::take(
            &mut *self
                .unconfirmed
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }
}

/// How to reach one message on the server: the listener's link and the
/// message's ack subject.
#[derive(Clone)]
struct Reply {
    link: Arc<Link>,
    subject: Subject,
}

impl Reply {
    /// Sends `kind` without waiting for the server.
    async fn send(&self, kind: AckKind) {
        if let Err(error) = self
            .link
            .client
            .publish(self.subject.clone(), Bytes::from(kind))
            .await
        {
            tracing::debug!(error = %error, "could not send an acknowledgement; the message will be delivered again");
        }
    }

    /// Sends `kind` and waits until the server confirms it: `false` if it
    /// did not (the message is then delivered again after `ack_wait`).
    async fn confirm(&self, kind: AckKind) -> bool {
        confirm(&self.link.client, self.subject.clone(), kind).await
    }

    /// Sends the ack if the client takes it at once, else hands it to the
    /// listener's acker to send; the acker releases `held` once the server
    /// confirmed it. Never waits: a runner stopped after this has acked.
    fn ack(self, held: Option<Held>) {
        let link = &self.link;
        let send = link
            .client
            .publish(self.subject.clone(), Bytes::from(AckKind::Ack));
        // Polled once: sent, or not begun (the client's queue is full, or
        // the task's budget spent) and dropped.
        if let Some(sent) = send.now_or_never() {
            if let Err(error) = sent {
                tracing::debug!(error = %error, "could not send an acknowledgement; the message will be delivered again");
            }
            link.sent.push(self.subject, held);
        } else if link.acks.send((self.subject, held)).is_err() {
            // Only once the runtime is going away: the message is then
            // delivered again, after its `ack_wait`.
            tracing::debug!(
                "could not send an acknowledgement; the message will be delivered again"
            );
        }
    }

    /// Sends `kind` from a task of its own: for what cannot await.
    fn spawn(&self, kind: AckKind) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let reply = self.clone();
            runtime.spawn(async move { reply.send(kind).await });
        }
    }
}

/// Sends `kind` on `subject` and waits until the server confirms it:
/// `false` if it did not (the message is then delivered again after
/// `ack_wait`).
async fn confirm(client: &async_nats::Client, subject: Subject, kind: AckKind) -> bool {
    // One timer, this one, for the send and the wait: not the client's too.
    let request = async_nats::Request::new()
        .payload(Bytes::from(kind))
        .timeout(None);
    let request = client.send_request(subject, request);
    match tokio::time::timeout(ACK_TIMEOUT, request).await {
        Ok(Ok(_)) => true,
        Ok(Err(error)) => {
            tracing::debug!(error = %error, "an acknowledgement was not confirmed; the message may be delivered again");
            false
        }
        Err(_) => {
            tracing::debug!(
                "an acknowledgement was not confirmed in time; the message may be delivered again"
            );
            false
        }
    }
}

/// How long an ack may go unconfirmed: the acks sent since the last
/// confirmation are confirmed together at the latest this long after the
/// first of them.
const CONFIRM_AFTER: Duration = Duration::from_millis(50);

/// Sends the acks of one listener's deliveries that could not be sent at
/// once, and has the server confirm the listener's acks, releasing their
/// `held` once it has applied them (or did not confirm it in time: the
/// messages are then delivered again).
///
/// The server confirms a request (`AckAck`) on an ack subject once it has
/// applied it, even one already acked, and applies a consumer's acks in
/// the order they come: so that one confirmation, asked for after them
/// (the client sends in order), covers the acks before it. It is asked for
/// on the last ack sent, once [`ACK_BATCH`] acks wait for one, or
/// [`CONFIRM_AFTER`] after the first of them, or at once while the tier
/// drains and once the listener's acks end: a reply per batch or per
/// moment rather than per ack, which at a concurrency of one (every ack
/// the last of its batch) cost the server a reply and the client two
/// wake-ups per event. The confirmations are awaited together, while later
/// acks go out. Ends once every delivery and the pump are gone and the
/// last acks are confirmed.
async fn acker(
    client: async_nats::Client,
    sent: Arc<Sent>,
    mut acks: mpsc::UnboundedReceiver<(Subject, Option<Held>)>,
    closing: watch::Receiver<bool>,
) {
    let client = &client;
    let mut batch = Vec::with_capacity(ACK_BATCH);
    // Armed while acks wait for a confirmation.
    let timer = tokio::time::sleep(CONFIRM_AFTER);
    tokio::pin!(timer);
    let mut armed = false;
    let mut confirming = FuturesUnordered::new();
    let mut open = true;
    loop {
        let confirm_now = tokio::select! {
            received = acks.recv_many(&mut batch, ACK_BATCH), if open => {
                if received == 0 {
                    // Every reply is gone: nothing is sent after this.
                    open = false;
                }
                for (subject, held) in batch.drain(..) {
                    if let Err(error) = client.publish(subject.clone(), Bytes::from(AckKind::Ack)).await {
                        tracing::debug!(error = %error, "could not send an acknowledgement; the message will be delivered again");
                    }
                    sent.push(subject, held);
                }
                !open
            }
            () = sent.wake.notified(), if open => {
                sent.waiting() >= ACK_BATCH || *closing.borrow()
            }
            () = &mut timer, if armed => true,
            Some(()) = confirming.next() => false,
            else => return,
        };
        if confirm_now {
            armed = false;
            let Unconfirmed { last, helds } = sent.take();
            if let Some(last) = last {
                // Sent when first polled, by the next `confirming.next()`:
                // after the acks it covers, which were sent before they
                // were recorded.
                confirming.push(async move {
                    confirm(client, last, AckKind::Ack).await;
                    drop(helds);
                });
            }
        } else if !armed && sent.waiting() > 0 {
            timer
                .as_mut()
                .reset(tokio::time::Instant::now() + CONFIRM_AFTER);
            armed = true;
        }
    }
}

/// The message as it came, for its dead letter.
struct Raw {
    subject: Subject,
    headers: Option<HeaderMap>,
    payload: Bytes,
    sequence: u64,
}

/// Counts a message handed to the runner until it is finished: with the
/// consumer's `num_ack_pending`, what tells a drain whether messages are
/// still on their way to this process.
struct Held(Arc<AtomicU64>);

impl Held {
    fn new(held: &Arc<AtomicU64>) -> Self {
        held.fetch_add(1, Ordering::Relaxed);
        Self(held.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One message of the stream delivered to one listener, for one attempt.
///
/// Its [`attempt`](Delivery::attempt) is the server's delivery count, so it
/// holds across processes and restarts. Dropped unfinished (the listener
/// was stopped mid-handler), the message is left to the server, which
/// delivers it again once its `ack_wait` has passed, its attempt one
/// higher.
pub struct JetStreamDelivery<E> {
    envelope: Arc<Envelope<E>>,
    attempt: u32,
    reply: Option<Reply>,
    raw: Arc<Raw>,
    /// The listener's, shared: a `Letters` holds a JetStream context.
    letters: Arc<Letters>,
    ack_wait: Duration,
    held: Option<Held>,
    /// Marks the event held here while the delivery lives (for the
    /// listener's advisory task).
    _holding: Holding,
    behind: Behind,
}

/// When the last retry of a listener's event comes due: what it releases
/// unattempted (the events after a failed one, under
/// [`BatchFailure::StopAtFirst`](crate::BatchFailure::StopAtFirst)) comes
/// back after it, so that they stay behind it.
type Behind = Arc<Mutex<Option<tokio::time::Instant>>>;

/// How long after the failed event a released one is handed out again:
/// the server's redeliveries come due in their order, this keeps them
/// apart.
const BEHIND_MARGIN: Duration = Duration::from_millis(50);

impl<E> std::fmt::Debug for JetStreamDelivery<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamDelivery")
            .field("sequence", &self.raw.sequence)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

impl<E> JetStreamDelivery<E> {
    /// The message's sequence number in the stream.
    #[must_use]
    pub fn stream_sequence(&self) -> u64 {
        self.raw.sequence
    }
}

impl<E: Event> Delivery<E> for JetStreamDelivery<E> {
    fn envelope(&self) -> &Arc<Envelope<E>> {
        &self.envelope
    }

    fn attempt(&self) -> u32 {
        self.attempt
    }

    async fn ack(mut self) {
        if let Some(reply) = self.reply.take() {
            // Sent or handed to the acker's task, never waited for: the
            // runner counts the event handled before it acks, so a
            // listener stopped between two acks of a batch must not take
            // back the second. The shutdown waits until the server has
            // applied them (`held`).
            self.letters.handled.record(self.raw.sequence);
            reply.ack(self.held.take());
        }
    }

    async fn retry(mut self, delay: Duration, _error: &str) -> Retry<Self> {
        if let Some(reply) = self.reply.take() {
            let due = tokio::time::Instant::now() + delay;
            {
                let mut behind = self.behind.lock().unwrap_or_else(PoisonError::into_inner);
                *behind = Some(behind.map_or(due, |behind| behind.max(due)));
            }
            reply.send(AckKind::Nak(Some(delay))).await;
        }
        Retry::Redelivered
    }

    async fn terminate(mut self, reason: &str) {
        if let Some(reply) = self.reply.take() {
            // On a task of its own, as an ack: the runner has counted the
            // dead letter, so a stop must not cut its writing short.
            let (letters, raw, attempt) = (self.letters.clone(), self.raw.clone(), self.attempt);
            let (reason, held) = (reason.to_owned(), self.held.take());
            tokio::spawn(async move {
                terminate(&letters, &raw, reply, attempt, reason).await;
                drop(held);
            });
        }
    }

    fn in_progress(&self) {
        if let Some(reply) = &self.reply {
            reply.spawn(AckKind::Progress);
        }
    }

    fn progress_interval(&self) -> Option<Duration> {
        Some(self.ack_wait / 3)
    }

    /// Given back with a `nak` whose delay puts it after the retry the
    /// runner asked for just before (the failed event it follows), which
    /// the server hands out first.
    async fn release(mut self) {
        if let Some(reply) = self.reply.take() {
            let due = *self.behind.lock().unwrap_or_else(PoisonError::into_inner);
            let delay = due
                .map(|due| due.saturating_duration_since(tokio::time::Instant::now()))
                .filter(|delay| !delay.is_zero())
                .map(|delay| delay + BEHIND_MARGIN);
            reply.send(AckKind::Nak(delay)).await;
        }
    }
}

/// Writes the dead letter of `raw`, then terminates the message; if the
/// letter could not be written, the message comes back to be terminated
/// again rather than being dropped unrecorded.
async fn terminate(letters: &Letters, raw: &Raw, reply: Reply, attempts: u32, error: String) {
    let failure = Failure {
        subject: &raw.subject,
        headers: raw.headers.as_ref(),
        payload: raw.payload.clone(),
        sequence: raw.sequence,
        attempts,
        error: &error,
    };
    match letters.write(failure).await {
        Ok(()) => {
            reply.confirm(AckKind::Term).await;
        }
        Err(write) => {
            tracing::error!(
                listener = %letters.listener(),
                sequence = raw.sequence,
                error = %write,
                "could not write a dead letter; the event will be delivered again",
            );
            reply.send(AckKind::Nak(Some(UNWRITTEN_DELAY))).await;
        }
    }
}

/// The replies of the messages a pump handed over that the runner has not
/// taken yet, in the order they wait: the pump keeps them alive, as the
/// runner keeps alive what it took.
type Waiting = Arc<Mutex<VecDeque<Reply>>>;

/// A listener's [`Source`]: what its pump pulled, in stream order.
pub(crate) struct ConsumerSource<E> {
    pulled: mpsc::Receiver<Item<E>>,
    waiting: Waiting,
    delivered: Arc<AtomicU64>,
    closing: watch::Receiver<bool>,
}

impl<E: Event> Source<E> for ConsumerSource<E> {
    type Delivery = JetStreamDelivery<E>;

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Item<E>>> {
        // tokio's channel takes part in the cooperative budget.
        let next = self.pulled.poll_recv(cx);
        if let Poll::Ready(Some(item)) = &next {
            // Taken: the runner keeps it alive from now on.
            self.waiting
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop_front();
            if item.is_ok() {
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
        }
        next
    }

    fn is_draining(&self) -> bool {
        *self.closing.borrow()
    }

    fn draining(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut closing = self.closing.clone();
        async move {
            let _ = closing.wait_for(|closing| *closing).await;
        }
    }
}

/// What woke the pump.
enum Step<T> {
    /// The source is gone: the listener's run ended.
    Gone,
    /// The tier started draining.
    Drain,
    /// A drain's time to look whether anything is left for it.
    Check,
    /// Time to keep alive what waits for the runner.
    KeepAlive,
    /// The pull stream's next item.
    Next(Option<T>),
}

/// What a pump needs to know of its listener.
pub(crate) struct PumpConfig<E: Event> {
    pub(crate) listener: Arc<str>,
    /// The name redriven events are addressed to it by.
    pub(crate) key: Arc<str>,
    pub(crate) prefix: Arc<str>,
    pub(crate) interests: KindSet<E::Kind>,
    pub(crate) batch: usize,
    pub(crate) ack_wait: Duration,
}

/// Pulls one consumer's messages for one listener in this process.
pub(crate) struct Pump<E: Event> {
    link: Arc<Link>,
    stream: async_nats::jetstream::stream::Stream,
    consumer: PullConsumer,
    consumer_config: PullConfig,
    config: PumpConfig<E>,
    letters: Arc<Letters>,
    pulled: mpsc::Sender<Item<E>>,
    /// Messages handed over and not yet taken by the runner.
    waiting: Waiting,
    closing: watch::Receiver<bool>,
    /// Messages handed over and not yet finished.
    held: Arc<AtomicU64>,
    behind: Behind,
}

/// How often a drain looks again whether messages are on their way.
const DRAIN_CHECK: Duration = Duration::from_millis(20);

/// Makes a listener's pump and the source it feeds, and spawns the task
/// that sends its acks.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pump<E: Event>(
    client: async_nats::Client,
    stream: async_nats::jetstream::stream::Stream,
    consumer: PullConsumer,
    consumer_config: PullConfig,
    config: PumpConfig<E>,
    letters: Letters,
    closing: watch::Receiver<bool>,
    delivered: Arc<AtomicU64>,
    held: Arc<AtomicU64>,
) -> (Pump<E>, ConsumerSource<E>) {
    let (pulled_tx, pulled) = mpsc::channel(config.batch.max(1));
    let (acks, finished) = mpsc::unbounded_channel();
    let sent = Arc::<Sent>::default();
    tokio::spawn(acker(
        client.clone(),
        sent.clone(),
        finished,
        closing.clone(),
    ));
    let link = Arc::new(Link { client, sent, acks });
    let waiting = Waiting::default();
    let pump = Pump {
        link,
        stream,
        consumer,
        consumer_config,
        config,
        letters: Arc::new(letters),
        pulled: pulled_tx,
        waiting: waiting.clone(),
        closing: closing.clone(),
        held,
        behind: Behind::default(),
    };
    let source = ConsumerSource {
        pulled,
        waiting,
        delivered,
        closing,
    };
    (pump, source)
}

impl<E: Event + DeserializeOwned> Pump<E> {
    /// Pulls until the listener's run ends, or, once the tier drains,
    /// until the consumer has nothing more for it; then ends the source.
    pub(crate) async fn run(mut self) {
        let mut draining = false;
        let mut backoff = false;
        // What waits for the runner (behind a slow batch, say) must not
        // see its `ack_wait` pass: it would be handed out again.
        let every = (self.config.ack_wait / 3).max(crate::runner::MIN_PROGRESS_INTERVAL);
        let mut keep_alive = tokio::time::Instant::now() + every;
        loop {
            if backoff {
                tokio::select! {
                    () = tokio::time::sleep(BACKOFF) => {}
                    () = self.pulled.closed() => return,
                }
                backoff = false;
            }
            if draining && !self.has_pending().await {
                return;
            }
            let messages = self
                .consumer
                .stream()
                // The consumer's `max_ack_pending` bounds what is out; a
                // pull asks for more, so that the next message comes as
                // soon as one is acked, without a request of its own.
                .max_messages_per_batch(self.config.batch.max(PULL_BATCH))
                .expires(EXPIRES)
                .heartbeat(HEARTBEAT)
                .messages()
                .await;
            let mut messages = match messages {
                Ok(messages) => messages,
                Err(error) => {
                    tracing::warn!(listener = %self.config.listener, error = %error, "could not pull from the consumer; trying again");
                    self.recreate().await;
                    backoff = true;
                    continue;
                }
            };
            loop {
                let step = tokio::select! {
                    biased;
                    () = self.pulled.closed() => Step::Gone,
                    _ = self.closing.wait_for(|closing| *closing), if !draining => Step::Drain,
                    () = tokio::time::sleep_until(keep_alive) => Step::KeepAlive,
                    next = messages.next() => Step::Next(next),
                    () = tokio::time::sleep(DRAIN_CHECK), if draining => Step::Check,
                };
                match step {
                    Step::Gone => return,
                    Step::Drain => {
                        draining = true;
                        if !self.has_pending().await {
                            return;
                        }
                    }
                    Step::Check => {
                        if !self.has_pending().await {
                            return;
                        }
                    }
                    Step::KeepAlive => {
                        self.keep_waiting_alive().await;
                        keep_alive = tokio::time::Instant::now() + every;
                    }
                    Step::Next(Some(Ok(message))) => {
                        if !self.hand_over(message).await {
                            return;
                        }
                    }
                    Step::Next(Some(Err(error))) => {
                        if error.kind() == MessagesErrorKind::ConsumerDeleted {
                            tracing::warn!(listener = %self.config.listener, "the consumer was deleted; creating it again");
                            self.recreate().await;
                            break;
                        }
                        tracing::debug!(listener = %self.config.listener, error = %error, "pulling from the consumer");
                    }
                    Step::Next(None) => {
                        backoff = true;
                        break;
                    }
                }
            }
        }
    }

    /// Whether the consumer has messages this process may still be handed:
    /// not yet delivered, or delivered and not held here (on their way to
    /// this process, or held by another of the group, or waiting out a
    /// retry's delay), or held here: an attempt under way may fail and come
    /// back to be retried. `true` when the server cannot say: a drain then
    /// pulls on, until its deadline.
    async fn has_pending(&mut self) -> bool {
        match self.consumer.info().await {
            Ok(info) => {
                let out = u64::try_from(info.num_ack_pending).unwrap_or(u64::MAX);
                // Read after the server answered: a message finished since
                // is no longer held, and still out if it went back.
                let held = self.held.load(Ordering::Relaxed);
                info.num_pending > 0 || out > held || held > 0
            }
            Err(_) => true,
        }
    }

    /// Tells the server that the messages waiting for the runner are still
    /// worked on (`AckProgress`).
    async fn keep_waiting_alive(&self) {
        let waiting: Vec<Reply> = self
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect();
        for reply in waiting {
            reply.send(AckKind::Progress).await;
        }
    }

    /// Creates the consumer again, as it was configured: after the server
    /// lost it (a restart on memory storage, a deletion by hand).
    async fn recreate(&mut self) {
        match self
            .stream
            .create_consumer(self.consumer_config.clone())
            .await
        {
            Ok(consumer) => self.consumer = consumer,
            Err(error) => {
                tracing::warn!(listener = %self.config.listener, error = %error, "could not create the consumer again; trying again");
            }
        }
    }

    /// Hands `message` to the source, or acks it at once when it is not for
    /// this listener; `false` once the source is gone.
    async fn hand_over(&self, message: async_nats::jetstream::Message) -> bool {
        let (attempt, sequence) = match message.info() {
            Ok(info) => (
                u32::try_from(info.delivered.max(1)).unwrap_or(u32::MAX),
                info.stream_sequence,
            ),
            Err(_) => (1, 0),
        };
        let message = message.message;
        let Some(subject) = message.reply.clone() else {
            return true;
        };
        let reply = Reply {
            link: self.link.clone(),
            subject,
        };
        if !self.is_for_me(&message) {
            reply.send(AckKind::Ack).await;
            return true;
        }
        let held = Held::new(&self.held);
        let waiting = reply.clone();
        // Moved, not copied: the headers are a map of their own.
        let raw = Arc::new(Raw {
            subject: message.subject,
            headers: message.headers,
            payload: message.payload,
            sequence,
        });
        let item = match JsonCodec.decode::<E>(&raw.payload) {
            Ok(envelope) => {
                let (event, metadata) = envelope.into_parts();
                let from_header = raw
                    .headers
                    .as_ref()
                    .and_then(|headers| headers.get(names::TRACEPARENT))
                    .and_then(|value| value.as_str().parse::<TraceParent>().ok());
                let traceparent = metadata.traceparent().or(from_header);
                let metadata = metadata
                    .with_sequence(sequence)
                    .with_traceparent(traceparent);
                Ok(JetStreamDelivery {
                    envelope: Arc::new(Envelope::from_parts(event, metadata)),
                    attempt,
                    reply: Some(reply),
                    raw,
                    letters: Arc::clone(&self.letters),
                    ack_wait: self.config.ack_wait,
                    held: Some(held),
                    _holding: self.letters.handled.hold(sequence),
                    behind: self.behind.clone(),
                })
            }
            Err(error) => {
                let letters = Arc::clone(&self.letters);
                let payload = raw.payload.to_vec();
                let name = error.name().map(str::to_owned);
                let id = error.id();
                let mut undecodable = Undecodable::new(&error, payload, move |reason| async move {
                    terminate(&letters, &raw, reply, attempt, reason).await;
                    drop(held);
                })
                .with_attempt(attempt);
                if let Some(name) = name {
                    undecodable = undecodable.with_name(name);
                }
                if let Some(id) = id {
                    undecodable = undecodable.with_id(id);
                }
                Err(undecodable)
            }
        };
        // Before the send: the runner may take the item at once, and takes
        // it off the front.
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(waiting);
        self.pulled.send(item).await.is_ok()
    }

    /// Whether `message` is for this listener ([`is_for`]).
    fn is_for_me(&self, message: &async_nats::Message) -> bool {
        is_for::<E>(
            &self.config.prefix,
            &self.config.key,
            &self.config.interests,
            &message.subject,
            message.headers.as_ref(),
        )
    }
}

/// Whether the message on `subject` with `headers` is for the listener
/// `key` of `interests`: of a kind it is interested in (an unknown name is,
/// so that it becomes a dead letter), and not redriven to another listener.
pub(crate) fn is_for<E: Event>(
    prefix: &str,
    key: &str,
    interests: &KindSet<E::Kind>,
    subject: &str,
    headers: Option<&HeaderMap>,
) -> bool {
    if let Some(redriven) = headers.and_then(|headers| headers.get(names::REDRIVE)) {
        let redriven = redriven.as_str();
        return redriven == key
            || (redriven.starts_with('#') && redriven == names::redrive_tag(key));
    }
    let name = subject
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('.'));
    match name.and_then(E::Kind::from_name) {
        Some(kind) => interests.contains(kind),
        None => true,
    }
}
