//! The JetStream tier as the scenario suite sees it: a nats-server of its
//! own per scenario ([`server::NatsServer`]), and the tier's own API.

#![allow(dead_code)]

pub(crate) mod proxy;
pub(crate) mod server;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use event_bus::codec::JsonCodec;
use event_bus::nats::{Config, Distributed, JetStream, JetStreamListener, Start};
use event_bus::{BatchListener, Envelope, InBatches, Listener, ListenerOptions, OneByOne, Publish};
use futures::stream::{BoxStream, StreamExt};

use crate::scenarios::{Capabilities, Counts, Letter, Running, ScenarioEvent, Stopped, Tier};
use server::NatsServer;

/// Short enough that a scenario sees a lost delivery come back, long
/// enough that a loaded machine extends it in time.
pub(crate) const ACK_WAIT: Duration = Duration::from_secs(2);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A server and a handle of their own per scenario.
#[derive(Clone)]
pub(crate) struct NatsTier(Arc<State>);

struct State {
    jetstream: JetStream<ScenarioEvent>,
    handles: Mutex<Vec<NatsHandle>>,
    // Dropped last: the server outlives the handle's tasks.
    _server: NatsServer,
}

impl NatsTier {
    /// The tier's handle.
    pub(crate) fn jetstream(&self) -> &JetStream<ScenarioEvent> {
        &self.0.jetstream
    }

    async fn start<M, L: event_bus::Spawnable<ScenarioEvent, M>>(
        &self,
        listener: L,
        options: ListenerOptions,
        distributed: Distributed,
    ) -> NatsHandle {
        // What was published before is stored before the consumer exists.
        self.0.jetstream.flush().await;
        let listener = self
            .0
            .jetstream
            .spawn_with(listener, options, distributed.ack_wait(ACK_WAIT))
            .await
            .expect("spawn a listener on its consumer");
        let handle = NatsHandle(listener);
        lock(&self.0.handles).push(handle.clone());
        handle
    }

    /// Per consumer, its listener's name, group and the messages not yet
    /// finished: of every listener, or only of those still running.
    async fn unfinished(&self, running_only: bool) -> Vec<(String, String, u64)> {
        let mut handles = lock(&self.0.handles).clone();
        if running_only {
            handles.retain(|handle| handle.0.status() == event_bus::ListenerStatus::Running);
        }
        let mut groups = HashSet::new();
        let mut left = Vec::new();
        for handle in handles {
            if !groups.insert(handle.0.group().to_owned()) {
                continue;
            }
            let (pending, out) = handle.0.pending().await.expect("read a consumer's state");
            left.push((
                handle.0.name().to_owned(),
                handle.0.group().to_owned(),
                pending + out,
            ));
        }
        left
    }
}

impl Publish<ScenarioEvent> for NatsTier {
    fn publish(&self, event: ScenarioEvent) {
        Publish::publish(&self.0.jetstream, event);
    }

    fn publish_wait(&self, event: ScenarioEvent) -> impl std::future::Future<Output = ()> + Send {
        Publish::publish_wait(&self.0.jetstream, event)
    }
}

impl Tier for NatsTier {
    const NAME: &'static str = "JetStream";

    const CAPABILITIES: Capabilities = Capabilities::none()
        .persistent()
        .groups()
        .replay()
        .decodes()
        .quiesce();

    type Handle = NatsHandle;

    async fn fresh(scenario: &'static str) -> Self {
        let server = NatsServer::start();
        let jetstream = JetStream::connect(&server.url(), Config::new(scenario))
            .await
            .expect("connect to the test's nats-server");
        Self(Arc::new(State {
            jetstream,
            handles: Mutex::new(Vec::new()),
            _server: server,
        }))
    }

    async fn spawn<L: Listener<ScenarioEvent>>(
        &self,
        listener: L,
        options: ListenerOptions,
    ) -> NatsHandle {
        self.start::<OneByOne, _>(listener, options, Distributed::new())
            .await
    }

    async fn spawn_batch<L: BatchListener<ScenarioEvent>>(
        &self,
        listener: L,
        options: ListenerOptions,
    ) -> NatsHandle {
        self.start::<InBatches, _>(listener, options, Distributed::new())
            .await
    }

    async fn spawn_in_group<L: Listener<ScenarioEvent>>(
        &self,
        group: &'static str,
        listener: L,
        options: ListenerOptions,
    ) -> NatsHandle {
        self.start::<OneByOne, _>(listener, options, Distributed::new().group(group))
            .await
    }

    async fn spawn_replaying<L: Listener<ScenarioEvent>>(
        &self,
        listener: L,
        options: ListenerOptions,
    ) -> NatsHandle {
        let distributed = Distributed::new().start(Start::Beginning);
        self.start::<OneByOne, _>(listener, options, distributed)
            .await
    }

    async fn shutdown(&self, deadline: Duration) -> Stopped {
        let reports = self.0.jetstream.shutdown(deadline).await;
        let mut stopped = Stopped::default();
        for (name, _, left) in self.unfinished(false).await {
            *stopped.undelivered.entry(name).or_default() += left;
        }
        stopped.drained = reports
            .iter()
            .all(|report| report.status == event_bus::ListenerStatus::Drained)
            && stopped.undelivered() == 0;
        stopped
    }

    async fn refused(&self) -> u64 {
        self.0.jetstream.refused()
    }

    async fn dead_letters(&self) -> Vec<Letter> {
        let letters = self
            .0
            .jetstream
            .dead_letters(None)
            .await
            .expect("read the dead letters");
        letters
            .into_iter()
            .map(|letter| Letter {
                id: letter.id,
                listener: letter.listener,
                error: letter.error,
                attempts: letter.attempts,
            })
            .collect()
    }

    async fn tap(&self) -> BoxStream<'static, Arc<Envelope<ScenarioEvent>>> {
        self.0.jetstream.flush().await;
        let client = self.0.jetstream.client().clone();
        let subscriber = client
            .subscribe(self.0.jetstream.subject_of(">"))
            .await
            .expect("subscribe to the events");
        client
            .flush()
            .await
            .expect("the subscription to reach the server");
        subscriber
            .filter_map(
                |message| async move { JsonCodec.decode(&message.payload).ok().map(Arc::new) },
            )
            .boxed()
    }

    async fn quiesce(&self) {
        self.0.jetstream.flush().await;
        loop {
            let busy = self
                .unfinished(true)
                .await
                .iter()
                .any(|(_, _, left)| *left > 0);
            if !busy {
                return;
            }
            // The consumers' state is the server's: look again soon.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn publish_raw(&self, bytes: Vec<u8>) {
        self.0.jetstream.flush().await;
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let name = value
            .get("type")
            .and_then(|name| name.as_str())
            .filter(|name| {
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_')
            })
            .unwrap_or("unknown")
            .to_owned();
        self.0
            .jetstream
            .publish_bytes(&name, bytes)
            .await
            .expect("publish raw bytes");
    }
}

/// A JetStream listener, as the scenarios see it.
#[derive(Clone)]
pub(crate) struct NatsHandle(pub(crate) JetStreamListener);

impl Running for NatsHandle {
    fn counts(&self) -> Counts {
        let report = self.0.report();
        Counts {
            delivered: self.0.delivered(),
            handled: report.handled,
            failed: report.failed,
            retried: report.retried,
            dead_lettered: report.dead_lettered,
            dropped: 0,
        }
    }

    fn abort(&self) {
        self.0.abort();
    }

    async fn finished(&self) {
        self.0.finished().await;
    }
}
