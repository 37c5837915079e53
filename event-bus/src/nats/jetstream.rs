//! [`JetStream`]: the distributed tier's handle on its streams, its
//! publisher and this process's listeners.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::stream::{Config as StreamConfig, RetentionPolicy, StorageType};
use async_nats::{HeaderMap, Subject};
use futures_util::stream::{FuturesOrdered, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::advisories::{self, Advisories};
use super::dead_letters::{
    DeadLetterStream, DeadMessage, Handled, Letters, publish_acked, retry_publish, unacked,
};
use super::names;
use super::relay::Relay;
use super::source::{PumpConfig, pump};
use crate::codec::JsonCodec;
use crate::dead_letter::{DeadLetter, DeadLetterSink, UndecodableLetter};
use crate::envelope::Envelope;
use crate::error::NatsError;
use crate::event::{Event, EventKind, KindSet};
use crate::listener::{ListenerOptions, Scope};
use crate::metrics::ListenerStatus;
use crate::publish::Publish;
use crate::runner::{ListenerCore, Run, RunReport, Spawnable, spawn_run};

/// The default `ack_wait`: how long the server waits for a finish before
/// it delivers a message again.
const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);

/// The default span a publish is retried over.
const DEFAULT_PUBLISH_RETRY: Duration = Duration::from_secs(10);

/// The default duplicate window of a stream the tier creates.
const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// How long an instance listener's consumer outlives its process by
/// default.
const DEFAULT_INACTIVE: Duration = Duration::from_secs(3600);

/// The most events the publisher task has waiting for their acks at once.
const IN_FLIGHT: usize = 256;

/// How long past a listener's end its shutdown waits for the server to
/// have its last acks.
const FINISH_GRACE: Duration = Duration::from_secs(2);

/// What a message's headers take at most, beside its payload: the
/// `Nats-Msg-Id`, the `traceparent` and their framing.
const HEADER_ROOM: usize = 256;

/// The shortest `ack_wait` kept.
const MIN_ACK_WAIT: Duration = Duration::from_millis(100);

/// How the tier lays out its streams: see [`JetStream::new`].
#[derive(Debug, Clone)]
pub struct Config {
    prefix: String,
    stream: Option<String>,
    storage: StorageType,
    replicas: usize,
    duplicate_window: Duration,
    publish_retry: Duration,
    max_age: Duration,
}

impl Config {
    /// Events published on `<prefix>.<event name>` into the stream named
    /// after the prefix (upper case, `.` as `_`), kept on file, one
    /// replica, for ever; a duplicate window of 2 minutes; publishes
    /// retried for up to 10 seconds.
    #[must_use]
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            stream: None,
            storage: StorageType::File,
            replicas: 1,
            duplicate_window: DEFAULT_DUPLICATE_WINDOW,
            publish_retry: DEFAULT_PUBLISH_RETRY,
            max_age: Duration::ZERO,
        }
    }

    /// The event stream's name (the dead letters go to `<name>_DLQ`).
    #[must_use]
    pub fn stream(mut self, name: impl Into<String>) -> Self {
        self.stream = Some(name.into());
        self
    }

    /// Keeps the streams in memory: faster, and lost when the server stops.
    #[must_use]
    pub fn memory(mut self) -> Self {
        self.storage = StorageType::Memory;
        self
    }

    /// How many servers of a cluster keep each stream (1 to 5).
    #[must_use]
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas.clamp(1, 5);
        self
    }

    /// The duplicate window of a stream the tier creates: a message whose
    /// id the stream saw within it is stored once.
    #[must_use]
    pub fn duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = window;
        self
    }

    /// How long a publish is tried again (a server restarting, a lost
    /// connection) before it fails. It must fit in the stream's duplicate
    /// window, or a retried publish could be stored twice:
    /// [`JetStream::new`] checks.
    #[must_use]
    pub fn publish_retry(mut self, span: Duration) -> Self {
        self.publish_retry = span;
        self
    }

    /// How long the event stream keeps an event (zero, the default: until
    /// the stream's limits say otherwise).
    #[must_use]
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = age;
        self
    }
}

/// Where a listener's consumer starts the first time it is created. Later
/// spawns (a restart, another process of the group) go on from where the
/// consumer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Start {
    /// With the events published from now on.
    #[default]
    Now,
    /// From the first event the stream still holds: a replay.
    Beginning,
    /// After the event at this stream sequence.
    After(u64),
}

/// How a listener reads the stream, beside its [`ListenerOptions`] (of
/// which the retry policy, concurrency, batching and scope apply; the
/// memory queue's capacity, lag policy and fairness do not).
#[derive(Debug, Clone)]
pub struct Distributed {
    start: Start,
    group: Option<Arc<str>>,
    ack_wait: Duration,
    max_ack_pending: Option<usize>,
    inactive: Duration,
}

impl Default for Distributed {
    fn default() -> Self {
        Self::new()
    }
}

impl Distributed {
    /// The defaults: [`Start::Now`], an `ack_wait` of 30 s, and as many
    /// messages out at once as the listener handles at once.
    #[must_use]
    pub fn new() -> Self {
        Self {
            start: Start::Now,
            group: None,
            ack_wait: DEFAULT_ACK_WAIT,
            max_ack_pending: None,
            inactive: DEFAULT_INACTIVE,
        }
    }

    /// Where the consumer starts the first time: see [`Start`].
    #[must_use]
    pub fn start(mut self, start: Start) -> Self {
        self.start = start;
        self
    }

    /// The group the listener joins: every listener spawned under one
    /// group, in any process, shares one durable consumer (each event
    /// handled by one of them). Defaults to the listener's name.
    #[must_use]
    pub fn group(mut self, group: impl Into<Arc<str>>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// How long the server waits for a delivery's finish before it hands
    /// the message out again (at least 100 ms). The runner extends it
    /// every third of it while the handler works (`AckProgress`), so a
    /// long handler keeps its message; a process that died gives its
    /// messages back after it.
    #[must_use]
    pub fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait.max(MIN_ACK_WAIT);
        self
    }

    /// The consumer's `max_ack_pending`: how many messages are out to the
    /// group at once, unfinished (at least 1). Defaults to the listener's
    /// concurrency (times `max_batch` for a batch listener), so a restart
    /// never has more than that to hand out again, and a listener of
    /// concurrency 1 handles its events in stream order.
    #[must_use]
    pub fn max_ack_pending(mut self, max: usize) -> Self {
        self.max_ack_pending = Some(max.max(1));
        self
    }

    /// How long an instance listener's consumer
    /// ([`Scope::Instance`](crate::Scope::Instance)) outlives its process
    /// (default an hour): a restart within it goes on where it stopped.
    #[must_use]
    pub fn inactive_threshold(mut self, threshold: Duration) -> Self {
        self.inactive = threshold;
        self
    }
}

/// A listener spawned on a [`JetStream`], in this process.
#[derive(Clone)]
pub struct JetStreamListener {
    core: Arc<ListenerCore>,
    key: Arc<str>,
    consumer: PullConsumer,
    delivered: Arc<AtomicU64>,
    task: tokio::task::AbortHandle,
    advisor: Option<tokio::task::AbortHandle>,
    done: watch::Receiver<bool>,
}

impl fmt::Debug for JetStreamListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JetStreamListener")
            .field("name", &self.core.name)
            .field("group", &self.key)
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl JetStreamListener {
    /// The listener's name.
    pub fn name(&self) -> &str {
        &self.core.name
    }

    /// The group its consumer serves (`<name>@<instance>` for an instance
    /// listener): what its dead letters are listed and redriven under.
    pub fn group(&self) -> &str {
        &self.key
    }

    /// How many deliveries it was handed in this process (a redelivery
    /// counts again).
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// What it did in this process so far.
    pub fn report(&self) -> RunReport {
        RunReport::of(&self.core)
    }

    /// Whether it runs: `Running` until its task ends.
    pub fn status(&self) -> ListenerStatus {
        if *self.done.borrow() {
            self.core.outcome()
        } else {
            ListenerStatus::Running
        }
    }

    /// How many messages its consumer has not yet delivered, and how many
    /// are out unfinished (in any process of its group).
    ///
    /// # Errors
    ///
    /// [`NatsError::Request`] if the server could not be asked.
    pub async fn pending(&self) -> Result<(u64, u64), NatsError> {
        let mut consumer = self.consumer.clone();
        let info = consumer
            .info()
            .await
            .map_err(|error| NatsError::request("read the consumer's state", error))?;
        Ok((
            info.num_pending,
            u64::try_from(info.num_ack_pending).unwrap_or(u64::MAX),
        ))
    }

    /// Stops it: it starts no event after this. What it held is given back
    /// and handled again, here or by another process of its group.
    pub fn abort(&self) {
        self.core.cancel();
        self.task.abort();
        if let Some(advisor) = &self.advisor {
            advisor.abort();
        }
    }

    /// Waits until its task has ended.
    pub async fn finished(&self) {
        let mut done = self.done.clone();
        let _ = done.wait_for(|done| *done).await;
    }
}

/// What the publisher task is asked.
enum Publishing {
    Event(Subject, PublishMessage, Option<oneshot::Sender<()>>),
    Flush(oneshot::Sender<()>),
}

struct Spawned {
    core: Arc<ListenerCore>,
    /// Its messages handed out and not yet finished on the server.
    held: Arc<AtomicU64>,
    task: JoinHandle<()>,
    pump: JoinHandle<()>,
    advisor: Option<JoinHandle<()>>,
}

struct Shared {
    client: async_nats::Client,
    context: async_nats::jetstream::Context,
    stream: async_nats::jetstream::stream::Stream,
    /// The event stream's name.
    name: String,
    /// Where the server's max-deliveries advisories wait for their
    /// listener; `None` where another stream of the account keeps them.
    advisories: Option<async_nats::jetstream::stream::Stream>,
    prefix: Arc<str>,
    dead: DeadLetterStream,
    span: Duration,
    /// Set once the shutdown began: publishes and spawns are refused.
    refusing: std::sync::atomic::AtomicBool,
    /// `true` once what was published before the shutdown is stored: the
    /// listeners drain.
    closing: watch::Sender<bool>,
    publishing: mpsc::UnboundedSender<Publishing>,
    refused: AtomicU64,
    unpublished: Arc<AtomicU64>,
    listeners: Mutex<Vec<Spawned>>,
    /// What each listener (by its group, every spawn of it here) handled
    /// lately and holds now.
    handled: Mutex<HashMap<Arc<str>, Handled>>,
}

/// The distributed tier on one NATS JetStream: the event stream, its
/// dead-letter stream and this process's listeners.
///
/// Cloning it is cheap: clones share the listeners and the publisher.
pub struct JetStream<E> {
    shared: Arc<Shared>,
    instance: Arc<str>,
    _event: std::marker::PhantomData<fn(E) -> E>,
}

impl<E> Clone for JetStream<E> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            instance: self.instance.clone(),
            _event: std::marker::PhantomData,
        }
    }
}

impl<E> fmt::Debug for JetStream<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JetStream")
            .field("prefix", &self.shared.prefix)
            .field("stream", &self.shared.stream.cached_info().config.name)
            .finish_non_exhaustive()
    }
}

/// The sink of JetStream listeners: a delivery writes its dead letter to
/// the dead-letter stream when the runner terminates it.
struct Streamed;

impl<E: Event> DeadLetterSink<E> for Streamed {
    async fn record(&self, _letter: DeadLetter<E>) {}

    async fn record_undecodable(&self, _letter: UndecodableLetter) {}
}

impl<E> JetStream<E>
where
    E: Event + Serialize + DeserializeOwned,
{
    /// Connects to the server at `url` (`nats://127.0.0.1:4222`): see
    /// [`new`](Self::new).
    ///
    /// # Errors
    ///
    /// [`NatsError::Connect`] if the server cannot be reached, and as
    /// [`new`](Self::new).
    pub async fn connect(url: &str, config: Config) -> Result<Self, NatsError> {
        let client = async_nats::connect(url).await.map_err(NatsError::Connect)?;
        Self::new(client, config).await
    }

    /// The tier on `client`'s server: creates the event stream (subjects
    /// `<prefix>.>`), the dead-letter stream (`<prefix>_dlq.>`) and the
    /// advisory stream (the max-deliveries advisories of the event
    /// stream's consumers) if they are not there, and checks that the
    /// event stream's duplicate window covers the publish retry span.
    ///
    /// Must be called within a tokio runtime.
    ///
    /// # Errors
    ///
    /// [`NatsError::Request`] if a stream could not be created or read;
    /// [`NatsError::DuplicateWindow`] if the event stream (created before,
    /// by another configuration) dedups over less than the retry span.
    pub async fn new(client: async_nats::Client, config: Config) -> Result<Self, NatsError> {
        let context = async_nats::jetstream::new(client.clone());
        let name = config
            .stream
            .clone()
            .unwrap_or_else(|| names::stream_of(&config.prefix));
        let window = config.duplicate_window.max(config.publish_retry);
        let mut stream = context
            .get_or_create_stream(StreamConfig {
                name: name.clone(),
                subjects: vec![format!("{}.>", config.prefix)],
                storage: config.storage,
                num_replicas: config.replicas,
                duplicate_window: window,
                max_age: config.max_age,
                ..StreamConfig::default()
            })
            .await
            .map_err(|error| NatsError::request("create the event stream", error))?;
        let window = stream
            .info()
            .await
            .map_err(|error| NatsError::request("read the event stream", error))?
            .config
            .duplicate_window;
        if window < config.publish_retry {
            return Err(NatsError::DuplicateWindow {
                window,
                span: config.publish_retry,
            });
        }
        let dead_subjects = format!("{}_dlq", config.prefix);
        let dead_name = format!("{name}_DLQ");
        context
            .get_or_create_stream(StreamConfig {
                name: dead_name.clone(),
                subjects: vec![format!("{dead_subjects}.>")],
                storage: config.storage,
                num_replicas: config.replicas,
                duplicate_window: config.duplicate_window.max(config.publish_retry),
                ..StreamConfig::default()
            })
            .await
            .map_err(|error| NatsError::request("create the dead-letter stream", error))?;
        // A work queue: each listener's advisory consumer takes its own,
        // and an advisory no process of its listener has taken yet waits.
        let advisories = match context
            .get_or_create_stream(StreamConfig {
                name: format!("{name}_ADV"),
                subjects: vec![advisories::subjects_of(&name)],
                retention: RetentionPolicy::WorkQueue,
                storage: config.storage,
                num_replicas: config.replicas,
                // An advisory outliving its event could write no letter;
                // one of a consumer no listener's ever takes goes in time.
                max_age: if config.max_age.is_zero() {
                    advisories::MAX_AGE
                } else {
                    config.max_age
                },
                ..StreamConfig::default()
            })
            .await
        {
            Ok(advisories) => Some(advisories),
            Err(error) if is_overlap(&error) => {
                tracing::warn!(
                    stream = %name,
                    "another stream keeps this stream's max-deliveries advisories: \
                     events the server stops delivering with no attempt ending them \
                     will not be dead-lettered",
                );
                None
            }
            Err(error) => return Err(NatsError::request("create the advisory stream", error)),
        };
        let (closing, _) = watch::channel(false);
        let (publishing, requests) = mpsc::unbounded_channel();
        let unpublished = Arc::new(AtomicU64::new(0));
        tokio::spawn(publisher(
            context.clone(),
            requests,
            config.publish_retry,
            unpublished.clone(),
        ));
        Ok(Self {
            shared: Arc::new(Shared {
                dead: DeadLetterStream {
                    context: context.clone(),
                    stream: dead_name,
                    events: name.clone(),
                    subjects: dead_subjects,
                    span: config.publish_retry,
                },
                client,
                context,
                stream,
                name,
                advisories,
                prefix: config.prefix.into(),
                span: config.publish_retry,
                refusing: std::sync::atomic::AtomicBool::new(false),
                closing,
                publishing,
                refused: AtomicU64::new(0),
                unpublished,
                listeners: Mutex::new(Vec::new()),
                handled: Mutex::new(HashMap::new()),
            }),
            instance: format!("{:016x}", fastrand::u64(..)).into(),
            _event: std::marker::PhantomData,
        })
    }

    /// Names this process for its instance listeners: each has the
    /// consumer `<listener>@<instance>`, so a restart under the same name
    /// goes on where it stopped. Without a name of its own, a handle has a
    /// random one.
    #[must_use]
    pub fn with_instance(mut self, instance: impl Into<Arc<str>>) -> Self {
        self.instance = instance.into();
        self
    }

    /// This process's name for its instance listeners.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The NATS client.
    pub fn client(&self) -> &async_nats::Client {
        &self.shared.client
    }

    /// The subject events of `name` are published on:
    /// `<prefix>.<name>`.
    pub fn subject_of(&self, name: &str) -> String {
        format!("{}.{name}", self.shared.prefix)
    }

    /// Publishes `event` and waits until the stream has stored it. Returns
    /// its sequence in the stream.
    ///
    /// # Errors
    ///
    /// [`NatsError::Closed`] once the handle is shutting down;
    /// [`NatsError::Encode`] if the event does not encode;
    /// [`NatsError::TooLarge`] if it is over the server's `max_payload`;
    /// [`NatsError::Publish`] if the stream did not acknowledge it within
    /// the publish retry span: it may have been stored. Each call gives the
    /// event a new id, so to publish it again safely, publish one
    /// [`Envelope`] with [`publish_envelope`](Self::publish_envelope): the
    /// stream stores it once within its duplicate window.
    pub async fn publish(&self, event: E) -> Result<u64, NatsError> {
        self.publish_envelope(&Envelope::new(event)).await
    }

    /// Publishes `envelope` with its id (the `Nats-Msg-Id`, so the stream
    /// stores it once however often it is published within the duplicate
    /// window) and its trace context (the `traceparent` header), and waits
    /// until the stream has stored it. Returns its sequence in the stream.
    ///
    /// # Errors
    ///
    /// As [`publish`](Self::publish).
    pub async fn publish_envelope(&self, envelope: &Envelope<E>) -> Result<u64, NatsError> {
        if self.shared.refusing.load(Ordering::SeqCst) {
            return Err(NatsError::Closed);
        }
        let (subject, message) = self.message(envelope)?;
        let ack = publish_acked(&self.shared.context, subject, message, self.shared.span).await?;
        Ok(ack.sequence)
    }

    /// The JetStream context publishes go through.
    pub(crate) fn context(&self) -> &async_nats::jetstream::Context {
        &self.shared.context
    }

    /// The outbox relay on this handle's stream: see [`Relay`] and
    /// [`spawn_relay`](Self::spawn_relay).
    pub fn relay(&self) -> Relay<E> {
        Relay::new(self.clone())
    }

    /// Spawns the outbox relay on `store`: a durable listener of the group
    /// `nats-relay` (every process that spawns it shares the work, at the
    /// cost of log order across processes: see [`Relay`]) that
    /// publishes every event committed in the store's outbox into this
    /// handle's stream, from `durable`'s [`Start`](crate::sql::Start) the
    /// first time, with [`Relay::options`]. The events stay in the store's
    /// log; its checkpoint marks what was published.
    ///
    /// Shut the store down before this handle, so that the relay's last
    /// batch is published.
    ///
    /// # Errors
    ///
    /// [`NatsError::DuplicateWindow`] if the stream's duplicate window is
    /// shorter than the span over which the relay may publish an event
    /// again (its retries, each attempt's wait for its ack, and twice the
    /// lease another process waits out should the relaying one die: about
    /// two minutes with the default lease of 30 s, within the default
    /// window of the stream the tier creates):
    /// a copy published after the window would be stored twice.
    /// [`NatsError::Store`] if the store could not spawn it.
    #[cfg(feature = "sql")]
    pub async fn spawn_relay<DB: crate::sql::Backend>(
        &self,
        store: &crate::sql::Store<E, DB>,
        durable: crate::sql::Durable,
    ) -> Result<crate::sql::DurableListener, NatsError> {
        let options = Relay::<E>::options();
        let span = super::relay::retry_span(&options, durable.lease_of());
        let window = self.shared.stream.cached_info().config.duplicate_window;
        if window < span {
            return Err(NatsError::DuplicateWindow { window, span });
        }
        Ok(store.spawn_with(self.relay(), options, durable).await?)
    }

    pub(crate) fn message(
        &self,
        envelope: &Envelope<E>,
    ) -> Result<(Subject, PublishMessage), NatsError> {
        let payload = JsonCodec.encode(envelope)?;
        // The server takes no message over its max_payload (it closes the
        // connection on one): refused here, at once.
        let max = self.shared.client.server_info().max_payload;
        let size = payload.len() + HEADER_ROOM;
        if max > 0 && size > max {
            return Err(NatsError::TooLarge { size, max });
        }
        let mut headers = HeaderMap::new();
        if let Some(traceparent) = envelope.traceparent() {
            headers.insert(names::TRACEPARENT, traceparent.to_string());
        }
        let message = PublishMessage::build()
            .payload(payload.into())
            .headers(headers)
            .message_id(envelope.id().to_string());
        Ok((Subject::from(self.subject_of(envelope.name())), message))
    }

    /// Publishes raw bytes on `<prefix>.<name>`, as another producer
    /// would, and waits until the stream has stored them: for tools and
    /// tests. Listeners that cannot decode them dead-letter them.
    ///
    /// # Errors
    ///
    /// As [`publish`](Self::publish).
    pub async fn publish_bytes(&self, name: &str, bytes: Vec<u8>) -> Result<u64, NatsError> {
        let subject = Subject::from(self.subject_of(name));
        let message = PublishMessage::build().payload(bytes.into());
        let ack = publish_acked(&self.shared.context, subject, message, self.shared.span).await?;
        Ok(ack.sequence)
    }

    /// Waits until every event handed to [`Publish`] so far is stored (or
    /// failed, and was counted in [`unpublished`](Self::unpublished)).
    pub async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        if self.shared.publishing.send(Publishing::Flush(done)).is_ok() {
            let _ = flushed.await;
        }
    }

    /// How many events [`Publish`] refused because the handle was shutting
    /// down.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::Relaxed)
    }

    /// How many events handed to [`Publish`] the stream never acknowledged
    /// within the publish retry span (each logged as an error with its id).
    pub fn unpublished(&self) -> u64 {
        self.shared.unpublished.load(Ordering::Relaxed)
    }

    /// Spawns `listener` with the default options: see
    /// [`spawn_with`](Self::spawn_with).
    ///
    /// # Errors
    ///
    /// As [`spawn_with`](Self::spawn_with).
    pub async fn spawn<M, L: Spawnable<E, M>>(
        &self,
        listener: L,
    ) -> Result<JetStreamListener, NatsError> {
        self.spawn_with(listener, ListenerOptions::new(), Distributed::new())
            .await
    }

    /// Spawns `listener` on its consumer: a durable pull consumer named
    /// after its group (the listener's name, or
    /// [`Distributed::group`]), shared with every process that runs the
    /// group, or, for [`Scope::Instance`], one of this process's own. When
    /// this returns, the consumer exists: the listener is handed, at least
    /// once, every event of its interests published from then on (from
    /// `distributed`'s [`Start`] the first time).
    ///
    /// # Errors
    ///
    /// [`NatsError::Closed`] once the handle is shutting down;
    /// [`NatsError::Request`] if the consumer could not be created.
    pub async fn spawn_with<M, L: Spawnable<E, M>>(
        &self,
        listener: L,
        options: ListenerOptions,
        distributed: Distributed,
    ) -> Result<JetStreamListener, NatsError> {
        if self.shared.refusing.load(Ordering::SeqCst) {
            return Err(NatsError::Closed);
        }
        let name: Arc<str> = listener.listener_name().into();
        let key: Arc<str> = match (&distributed.group, options.scope) {
            (Some(group), _) => group.clone(),
            (None, Scope::Instance) => format!("{name}@{}", self.instance).into(),
            (None, _) => name.clone(),
        };
        let interests = listener.listener_interests();
        let per_call = if listener.listener_batches() {
            options.max_batch.max(1)
        } else {
            1
        };
        let at_once = options.concurrency.max(1).saturating_mul(per_call);
        let batch = distributed.max_ack_pending.unwrap_or(at_once);
        let durable = names::token(&key);
        let mut consumer_config = PullConfig {
            durable_name: Some(durable.clone()),
            description: Some(format!("event-bus listener {key}")),
            deliver_policy: match distributed.start {
                Start::Now => DeliverPolicy::New,
                Start::Beginning => DeliverPolicy::All,
                Start::After(sequence) => DeliverPolicy::ByStartSequence {
                    start_sequence: sequence.saturating_add(1),
                },
            },
            ack_policy: AckPolicy::Explicit,
            ack_wait: distributed.ack_wait,
            max_deliver: max_deliver(options.retry.max_attempts()),
            filter_subject: self.filter_of(&interests),
            max_ack_pending: i64::try_from(batch).unwrap_or(i64::MAX),
            inactive_threshold: match options.scope {
                Scope::Instance => distributed.inactive,
                _ => Duration::ZERO,
            },
            ..PullConfig::default()
        };
        // A consumer that exists goes on from where it is: its start stays
        // (the server refuses to change it), the rest follows the options.
        // Only a consumer the server says is not there is a new one: one
        // it could not say of keeps what it has.
        let existed = match self.shared.stream.consumer_info(&durable).await {
            Ok(existing) => {
                consumer_config.deliver_policy = existing.config.deliver_policy;
                true
            }
            Err(error) => {
                error.kind() != async_nats::jetstream::context::ConsumerInfoErrorKind::NotFound
            }
        };
        let consumer: PullConsumer = self
            .shared
            .stream
            .create_consumer(consumer_config.clone())
            .await
            .map_err(|error| NatsError::request("create the listener's consumer", error))?;
        let letters = Letters {
            context: self.shared.context.clone(),
            subject: Subject::from(self.shared.dead.subject_of(&key)),
            key: key.clone(),
            span: self.shared.span,
            handled: self
                .shared
                .handled
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(key.clone())
                .or_default()
                .clone(),
        };
        let advisor = match &self.shared.advisories {
            Some(advisories) => {
                let (consumer, config) = self
                    .advisor_of(
                        advisories,
                        &durable,
                        &key,
                        &distributed,
                        &consumer_config,
                        existed,
                    )
                    .await?;
                Some((consumer, config, advisories.clone()))
            }
            None => None,
        };
        let advisor_letters = letters.clone();
        let advisor_interests = interests.clone();
        let delivered = Arc::new(AtomicU64::new(0));
        let held = Arc::new(AtomicU64::new(0));
        let (pump, source) = pump::<E>(
            self.shared.client.clone(),
            self.shared.stream.clone(),
            consumer.clone(),
            consumer_config,
            PumpConfig {
                listener: name.clone(),
                key: key.clone(),
                prefix: self.shared.prefix.clone(),
                interests,
                batch,
                ack_wait: distributed.ack_wait,
            },
            letters,
            self.shared.closing.subscribe(),
            delivered.clone(),
            held.clone(),
        );
        let core = Arc::new(ListenerCore::new(name, options.retry));
        let run = listener.run(Run {
            core: core.clone(),
            source,
            sink: Streamed,
            options,
        });
        let (task, done) = spawn_run(core.clone(), run);
        let pump = tokio::spawn(pump.run());
        let advisor = advisor.map(|(consumer, consumer_config, advisories)| {
            tokio::spawn(
                Advisories::<E> {
                    consumer,
                    consumer_config,
                    advisories,
                    events: self.shared.stream.clone(),
                    letters: advisor_letters,
                    prefix: self.shared.prefix.clone(),
                    interests: advisor_interests,
                    done: done.clone(),
                }
                .run(),
            )
        });
        let handle = JetStreamListener {
            core: core.clone(),
            key,
            consumer,
            delivered,
            task: task.abort_handle(),
            advisor: advisor.as_ref().map(JoinHandle::abort_handle),
            done,
        };
        self.shared
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Spawned {
                core,
                held,
                task,
                pump,
                advisor,
            });
        Ok(handle)
    }

    /// The listener's consumer of the advisory stream, made (or updated) for
    /// its `durable` consumer of the event stream. A consumer new to the
    /// event stream (an instance listener's, deleted while away, say) is a
    /// new one: the advisories of the one it replaces are dropped, as its
    /// deliveries were.
    async fn advisor_of(
        &self,
        advisories: &async_nats::jetstream::stream::Stream,
        durable: &str,
        key: &str,
        distributed: &Distributed,
        consumer_config: &PullConfig,
        existed: bool,
    ) -> Result<(PullConsumer, PullConfig), NatsError> {
        let subject = advisories::subject_of(&self.shared.name, durable);
        if !existed {
            advisories
                .purge()
                .filter(subject.clone())
                .await
                .map_err(|error| {
                    NatsError::request("drop a former consumer's advisories", error)
                })?;
        }
        let config = PullConfig {
            durable_name: Some(durable.to_owned()),
            description: Some(format!("event-bus dead letters of {key}")),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: distributed.ack_wait,
            filter_subject: subject,
            inactive_threshold: consumer_config.inactive_threshold,
            ..PullConfig::default()
        };
        let consumer = advisories
            .create_consumer(config.clone())
            .await
            .map_err(|error| {
                NatsError::request("create the listener's advisory consumer", error)
            })?;
        Ok((consumer, config))
    }

    /// The consumer's filter: the one subject of a listener of one kind
    /// without aliases, else every event (and the pump acks, unhandled,
    /// what is not of its interests).
    fn filter_of(&self, interests: &KindSet<E::Kind>) -> String {
        let mut kinds = interests.iter();
        if let (Some(kind), None) = (kinds.next(), kinds.next()) {
            if kind.aliases().is_empty() {
                return self.subject_of(kind.name());
            }
        }
        format!("{}.>", self.shared.prefix)
    }

    /// The dead letters, of `listener` (its group, or
    /// `<name>@<instance>`) or of all, oldest first.
    ///
    /// # Errors
    ///
    /// [`NatsError::Request`] if the dead-letter stream could not be read.
    pub async fn dead_letters(
        &self,
        listener: Option<&str>,
    ) -> Result<Vec<DeadMessage<E>>, NatsError> {
        self.shared.dead.list(listener).await
    }

    /// Publishes the dead letter of `listener` at `sequence` (or, with
    /// `None`, every one of `listener`) again, to that listener alone (an
    /// `Event-Bus-Redrive` header names it; other listeners ack it
    /// unhandled), and removes it from the dead-letter stream. The
    /// listener handles it as a new message: a first attempt, with its
    /// retry policy afresh. Returns how many were redriven.
    ///
    /// # Errors
    ///
    /// [`NatsError::Request`] or [`NatsError::Publish`] if a letter could
    /// not be read, published or removed: those redriven before it are;
    /// [`NatsError::TooLarge`] for an event that, with the redrive's header
    /// naming its listener, is over the server's `max_payload` (its letter
    /// stays). A listener's name that leaves the event too little room is
    /// sent as a hash of it, which its listener takes as its own.
    pub async fn redrive(&self, listener: &str, sequence: Option<u64>) -> Result<u64, NatsError> {
        let letters = self.letters_of(listener, sequence).await?;
        self.shared.dead.redrive(letters).await
    }

    /// Removes the dead letter of `listener` at `sequence` (or, with
    /// `None`, every one of `listener`). Returns how many were removed.
    ///
    /// # Errors
    ///
    /// [`NatsError::Request`] if they could not be read or removed.
    pub async fn discard(&self, listener: &str, sequence: Option<u64>) -> Result<u64, NatsError> {
        let letters = self.letters_of(listener, sequence).await?;
        self.shared.dead.discard(letters).await
    }

    async fn letters_of(
        &self,
        listener: &str,
        sequence: Option<u64>,
    ) -> Result<Vec<DeadMessage<E>>, NatsError> {
        let mut letters = self.shared.dead.list::<E>(Some(listener)).await?;
        if let Some(sequence) = sequence {
            letters.retain(|letter| letter.sequence == sequence);
        }
        Ok(letters)
    }

    /// Shuts down, draining: refuses what is published from now on, waits
    /// until what was handed to [`Publish`] is stored (not bounded by
    /// `deadline`: each publish by the retry span), then each listener
    /// stops pulling once its consumer has nothing more for it (or at
    /// once, if it had nothing), finishes and acks what it holds within
    /// `deadline`, and is stopped after it (what it still held is given
    /// back, to be handled again); the dead letters of the events its
    /// consumer gave up on that wait for it are written, within the
    /// deadline too. Returns each listener's report.
    ///
    /// Nothing stored is lost either way: what was not handled stays in the
    /// stream for the consumer's next run.
    pub async fn shutdown(&self, deadline: Duration) -> Vec<RunReport> {
        self.shared.refusing.store(true, Ordering::SeqCst);
        // Every publish accepted is stored (or fails) first, each within
        // the publish retry span: the drain covers them.
        self.flush().await;
        self.shared.closing.send_replace(true);
        let until = tokio::time::Instant::now() + deadline;
        let spawned = std::mem::take(
            &mut *self
                .shared
                .listeners
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let mut reports = Vec::with_capacity(spawned.len());
        for Spawned {
            core,
            held,
            mut task,
            pump,
            advisor,
        } in spawned
        {
            if tokio::time::timeout_at(until, &mut task).await.is_err() {
                core.cancel();
                task.abort();
                // Until it has ended: a runner in the middle of a poll on
                // another thread could still take and finish an event
                // after the count below.
                let _ = tokio::time::timeout(FINISH_GRACE, task).await;
            }
            pump.abort();
            // The advisories waiting for it are written, within the
            // deadline; what is left comes back to its next process.
            if let Some(advisor) = advisor {
                let abort = advisor.abort_handle();
                if tokio::time::timeout_at(until, advisor).await.is_err() {
                    abort.abort();
                }
            }
            // The acks and give-backs of what it held go on their own
            // tasks: wait for the server to have them, a moment at most.
            let finishing = async {
                while held.load(Ordering::Relaxed) > 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            };
            let _ = tokio::time::timeout(FINISH_GRACE, finishing).await;
            reports.push(RunReport::of(&core));
        }
        // Gives back what was dropped unfinished, and sends the last acks.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.shared.client.flush()).await;
        reports
    }
}

/// Whether a stream could not be made because another one of the account
/// takes (some of) its subjects.
fn is_overlap(error: &async_nats::jetstream::context::CreateStreamError) -> bool {
    use async_nats::jetstream::context::CreateStreamErrorKind;
    matches!(
        error.kind(),
        CreateStreamErrorKind::JetStream(error)
            if error.error_code() == async_nats::jetstream::ErrorCode::STREAM_SUBJECT_OVERLAP
    )
}

/// The consumer's `max_deliver` for a policy of `max_attempts`: one
/// delivery more, so that an event whose last attempt was cut short (a
/// crash, an expired `ack_wait`, a stop mid-handler) or whose dead letter
/// could not be written comes once more, to end handled or in the
/// dead-letter stream, rather than being dropped by the server unrecorded.
fn max_deliver(max_attempts: u32) -> i64 {
    i64::from(max_attempts).saturating_add(1)
}

impl<E> Publish<E> for JetStream<E>
where
    E: Event + Serialize + DeserializeOwned,
{
    /// Hands `event` to this handle's publisher task, which publishes in
    /// order and waits for each ack, retrying over the publish retry span.
    /// Never blocks. An event refused (the handle is shutting down) or not
    /// acknowledged in time is logged with its id and counted
    /// ([`refused`](JetStream::refused),
    /// [`unpublished`](JetStream::unpublished)); to have the error at the
    /// call, use [`JetStream::publish`].
    fn publish(&self, event: E) {
        self.hand(event, None);
    }

    /// As [`publish`](Self::publish), then waits until the stream stored
    /// the event (or it was refused or failed).
    fn publish_wait(&self, event: E) -> impl std::future::Future<Output = ()> + Send {
        let (done, stored) = oneshot::channel();
        self.hand(event, Some(done));
        async move {
            let _ = stored.await;
        }
    }
}

impl<E> JetStream<E>
where
    E: Event + Serialize + DeserializeOwned,
{
    fn hand(&self, event: E, done: Option<oneshot::Sender<()>>) {
        let envelope = Envelope::new(event);
        if self.shared.refusing.load(Ordering::SeqCst) {
            self.shared.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(id = %envelope.id(), name = envelope.name(), "an event was published after the shutdown began; it was refused");
            return;
        }
        match self.message(&envelope) {
            Ok((subject, message)) => {
                let request = Publishing::Event(subject, message, done);
                if self.shared.publishing.send(request).is_err() {
                    self.shared.unpublished.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(error) => {
                self.shared.unpublished.fetch_add(1, Ordering::Relaxed);
                tracing::error!(id = %envelope.id(), name = envelope.name(), error = %crate::error::chain(&error), "an event could not be published");
            }
        }
    }
}

/// Publishes what [`Publish`] hands over, in order: keeps up to
/// [`IN_FLIGHT`] sent and awaiting their acks (a window that slides as the
/// oldest is acked), and retries, in order, those that failed, each until
/// `span` after its first send (so that the stream's duplicate window,
/// which covers the span, stores it once however often it was sent).
async fn publisher(
    context: async_nats::jetstream::Context,
    mut requests: mpsc::UnboundedReceiver<Publishing>,
    span: Duration,
    unpublished: Arc<AtomicU64>,
) {
    let mut batch = Vec::with_capacity(IN_FLIGHT);
    // Each ack's wait starts when it is first polled, all of them together,
    // so that one lost ack does not spend the span of those after it.
    let mut acks = FuturesOrdered::new();
    let mut open = true;
    loop {
        let room = IN_FLIGHT - acks.len();
        tokio::select! {
            biased;
            Some((request, sent_at, acked)) = acks.next(), if !acks.is_empty() => {
                finish(&context, request, sent_at, acked, span, &unpublished).await;
            }
            received = requests.recv_many(&mut batch, room), if open && room > 0 => {
                if received == 0 {
                    open = false;
                    continue;
                }
                for request in batch.drain(..) {
                    let sent_at = tokio::time::Instant::now();
                    let sent = match &request {
                        Publishing::Event(subject, message, _) => {
                            Some(context.send_publish(subject.clone(), message.clone()).await)
                        }
                        Publishing::Flush(_) => None,
                    };
                    acks.push_back(async move {
                        let acked = match sent {
                            Some(Ok(ack)) => Some(ack.await.map_err(unacked)),
                            Some(Err(error)) => Some(Err(unacked(error))),
                            None => None,
                        };
                        (request, sent_at, acked)
                    });
                }
            }
            else => return,
        }
    }
}

/// Ends one request of the publisher once its first send is acked or
/// failed: retries a failed publish over what is left of `span`, counts one
/// that never was stored, and answers whoever waits for it.
async fn finish(
    context: &async_nats::jetstream::Context,
    request: Publishing,
    sent_at: tokio::time::Instant,
    acked: Option<Result<PublishAck, NatsError>>,
    span: Duration,
    unpublished: &AtomicU64,
) {
    match (request, acked) {
        (Publishing::Event(subject, message, done), Some(first)) => {
            let until = sent_at + span;
            if let Err(error) = retry_publish(context, subject.clone(), message, until, first).await
            {
                unpublished.fetch_add(1, Ordering::Relaxed);
                tracing::error!(subject = %subject, error = %crate::error::chain(&error), "an event was not acknowledged by the stream; it may be lost");
            }
            if let Some(done) = done {
                let _ = done.send(());
            }
        }
        (Publishing::Event(_, _, done), None) => {
            if let Some(done) = done {
                let _ = done.send(());
            }
        }
        (Publishing::Flush(done), _) => {
            let _ = done.send(());
        }
    }
}
