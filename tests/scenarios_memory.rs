//! The scenario suite on the memory tier: [`EventBus`] as the scenarios see
//! a tier. Run it with `cargo test --test scenarios_memory`.

mod scenarios;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use event_bus::{
    BatchListener, Envelope, EventBus, InBatches, KindSet, LagPolicy, Listener, ListenerHandle,
    ListenerOptions, OneByOne,
};
use futures::StreamExt;
use futures::stream::BoxStream;
use scenarios::{Capabilities, Counts, Letter, Running, ScenarioEvent, Stopped, Tier};

/// A bus of its own per scenario.
#[derive(Clone, Debug)]
struct MemoryTier(EventBus<ScenarioEvent>);

/// The bus publishes, so the tier does: `Publish` comes with this.
impl AsRef<EventBus<ScenarioEvent>> for MemoryTier {
    fn as_ref(&self) -> &EventBus<ScenarioEvent> {
        &self.0
    }
}

impl Tier for MemoryTier {
    const NAME: &'static str = "memory";

    const CAPABILITIES: Capabilities = Capabilities::none().priority().lag_policies().quiesce();

    type Handle = ListenerHandle<ScenarioEvent>;

    async fn fresh(_scenario: &'static str) -> Self {
        Self(EventBus::new())
    }

    async fn spawn<L: Listener<ScenarioEvent>>(
        &self,
        listener: L,
        options: ListenerOptions,
    ) -> Self::Handle {
        self.0.spawn_with::<_, OneByOne>(listener, options)
    }

    async fn spawn_batch<L: BatchListener<ScenarioEvent>>(
        &self,
        listener: L,
        options: ListenerOptions,
    ) -> Self::Handle {
        self.0.spawn_with::<_, InBatches>(listener, options)
    }

    async fn shutdown(&self, deadline: Duration) -> Stopped {
        let report = self.0.shutdown(deadline).await;
        let mut undelivered = BTreeMap::new();
        for listener in &report.listeners {
            *undelivered.entry(listener.name.clone()).or_default() += listener.undelivered;
        }
        Stopped {
            drained: report.drained(),
            undelivered,
            unattributed: report.abandoned,
        }
    }

    async fn refused(&self) -> u64 {
        self.0.metrics().rejected
    }

    async fn dead_letters(&self) -> Vec<Letter> {
        let letters = self.0.dead_letters().snapshot();
        letters
            .iter()
            .map(|letter| Letter {
                id: Some(letter.envelope.id()),
                listener: letter.listener.to_string(),
                error: letter.error.clone(),
                attempts: letter.attempts,
            })
            .collect()
    }

    async fn tap(&self) -> BoxStream<'static, Arc<Envelope<ScenarioEvent>>> {
        // As `EventRecorder` does: a backpressure queue, large enough for
        // any scenario, so the tap loses nothing.
        let subscription = self
            .0
            .subscribe_with(KindSet::all(), 1 << 16, LagPolicy::Backpressure);
        subscription
            .map(|received| received.expect("the tap lost events"))
            .boxed()
    }

    async fn quiesce(&self) {
        self.0.quiesce().await;
    }
}

impl Running for ListenerHandle<ScenarioEvent> {
    fn counts(&self) -> Counts {
        self.metrics().into()
    }

    fn abort(&self) {
        ListenerHandle::abort(self);
    }

    async fn finished(&self) {
        ListenerHandle::finished(self).await;
    }
}

scenarios::scenarios!(MemoryTier);
