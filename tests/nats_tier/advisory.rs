//! What the advisory reviews share: a recording listener whose handler
//! waits at a gate, one attempt, and a raw JetStream context to look at
//! the server's state.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::jetstream::consumer::pull::Config as PullConfig;
use event_bus::{Envelope, HandlerError, Listener, ListenerOptions, Meta, RetryPolicy};
use tokio::sync::Semaphore;

use super::work::Work;

/// A listener that records each value it handled with its attempt, and
/// whose calls wait at a gate until it is opened.
#[derive(Clone)]
pub(crate) struct Recorder {
    name: String,
    entered: Arc<AtomicUsize>,
    handled: Arc<Mutex<Vec<(u64, u32)>>>,
    gate: Arc<Semaphore>,
}

impl Recorder {
    pub(crate) fn new(name: &str, open: bool) -> Self {
        let recorder = Self {
            name: name.to_owned(),
            entered: Arc::default(),
            handled: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
        };
        if open {
            recorder.open();
        }
        recorder
    }

    pub(crate) fn open(&self) {
        self.gate.add_permits(Semaphore::MAX_PERMITS / 2);
    }

    pub(crate) fn entered(&self) -> usize {
        self.entered.load(Ordering::SeqCst)
    }

    pub(crate) fn handled(&self) -> Vec<(u64, u32)> {
        self.handled.lock().unwrap().clone()
    }
}

impl Listener<Work> for Recorder {
    fn name(&self) -> &str {
        &self.name
    }

    async fn handle(&self, event: Arc<Envelope<Work>>, meta: Meta) -> Result<(), HandlerError> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        let _ = self.gate.acquire().await.map(|permit| permit.forget());
        self.handled
            .lock()
            .unwrap()
            .push((event.event().value(), meta.attempt()));
        Ok(())
    }
}

/// One attempt: the consumer's `max_deliver` is 2.
pub(crate) fn one_attempt() -> ListenerOptions {
    ListenerOptions::new().retry(RetryPolicy::none())
}

/// A JetStream context on the server, beside the tier's.
pub(crate) async fn raw(url: &str) -> async_nats::jetstream::Context {
    let client = async_nats::connect(url).await.expect("a raw client");
    async_nats::jetstream::new(client)
}

/// How many messages the stream `name` holds (0 if it cannot say).
pub(crate) async fn messages_in(context: &async_nats::jetstream::Context, name: &str) -> u64 {
    let Ok(mut stream) = context.get_stream(name).await else {
        return 0;
    };
    stream.info().await.map_or(0, |info| info.state.messages)
}

/// The consumer `durable` of the stream `stream`.
pub(crate) async fn consumer_info(
    context: &async_nats::jetstream::Context,
    stream: &str,
    durable: &str,
) -> Option<async_nats::jetstream::consumer::Info> {
    let stream = context.get_stream(stream).await.ok()?;
    let mut consumer = stream.get_consumer::<PullConfig>(durable).await.ok()?;
    consumer.info().await.ok().cloned()
}
