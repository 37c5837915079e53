//! The listeners the scenarios spawn: they record what they are handed and
//! fail, hold or work as a scenario scripts them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use event_bus::{
    Batch, BatchError, BatchListener, Envelope, HandlerError, KindSet, Listener, Meta, listener,
};
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::{ScenarioEvent, ScenarioEventHandler, ScenarioEventKind};

/// A gate handlers wait at until the scenario opens it.
#[derive(Clone, Debug)]
pub(crate) struct Gate(Arc<Semaphore>);

impl Gate {
    pub(crate) fn closed() -> Self {
        Self(Arc::new(Semaphore::new(0)))
    }

    pub(crate) fn open(&self) {
        self.0.add_permits(Semaphore::MAX_PERMITS / 2);
    }

    async fn pass(&self) {
        // The semaphore is never closed: `acquire` cannot fail.
        let _ = self.0.acquire().await.map(|permit| permit.forget());
    }
}

/// One handler call as a probe saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Call {
    pub(crate) id: Uuid,
    pub(crate) value: u64,
    pub(crate) attempt: u32,
    pub(crate) event: ScenarioEvent,
}

/// A listener that records every call, and the events it handled, in the
/// order it saw them; scripted to fail, hold or work per event.
#[derive(Clone, Debug)]
pub(crate) struct Probe {
    name: Arc<str>,
    interests: KindSet<ScenarioEventKind>,
    /// Per value: how many of its first attempts fail (`u32::MAX`: all).
    failures: Arc<HashMap<u64, u32>>,
    /// The call (value, attempt) that waits at the gate.
    hold: Option<(u64, u32)>,
    /// How many times the handler yields per call: its work.
    yields: u32,
    gate: Gate,
    record: Arc<Record>,
}

#[derive(Debug, Default)]
struct Record {
    calls: Mutex<Vec<Call>>,
    handled: Mutex<Vec<Call>>,
}

impl Probe {
    /// A probe interested in every kind, that handles every event at once.
    pub(crate) fn new(name: impl Into<Arc<str>>) -> Self {
        Self {
            name: name.into(),
            interests: KindSet::all(),
            failures: Arc::default(),
            hold: None,
            yields: 0,
            gate: Gate::closed(),
            record: Arc::default(),
        }
    }

    /// Interested in `interests` only.
    pub(crate) fn interests(mut self, interests: impl Into<KindSet<ScenarioEventKind>>) -> Self {
        self.interests = interests.into();
        self
    }

    /// The first `attempts` attempts at event `value` fail.
    pub(crate) fn failing(mut self, value: u64, attempts: u32) -> Self {
        Arc::make_mut(&mut self.failures).insert(value, attempts);
        self
    }

    /// Every attempt at event `value` fails, with the error `poison {value}`.
    pub(crate) fn poisoned(self, value: u64) -> Self {
        self.failing(value, u32::MAX)
    }

    /// Attempt `attempt` at event `value` is recorded as a call, then waits
    /// until [`open`](Self::open).
    pub(crate) fn holding(mut self, value: u64, attempt: u32) -> Self {
        self.hold = Some((value, attempt));
        self
    }

    /// Each call yields `yields` times: work that lets other tasks run.
    pub(crate) fn yielding(mut self, yields: u32) -> Self {
        self.yields = yields;
        self
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Lets the held call, and every later one, go on.
    pub(crate) fn open(&self) {
        self.gate.open();
    }

    /// Every call so far, attempts included, in the order they started.
    pub(crate) fn calls(&self) -> Vec<Call> {
        self.record.calls.lock().unwrap().clone()
    }

    /// Whether call (`value`, `attempt`) has started.
    pub(crate) fn entered(&self, value: u64, attempt: u32) -> bool {
        self.record
            .calls
            .lock()
            .unwrap()
            .iter()
            .any(|call| (call.value, call.attempt) == (value, attempt))
    }

    /// The successful calls so far, in the order they finished.
    pub(crate) fn handled(&self) -> Vec<Call> {
        self.record.handled.lock().unwrap().clone()
    }

    /// The values of the successful calls so far, in order.
    pub(crate) fn handled_values(&self) -> Vec<u64> {
        self.record
            .handled
            .lock()
            .unwrap()
            .iter()
            .map(|call| call.value)
            .collect()
    }

    /// How many calls succeeded so far.
    pub(crate) fn handled_count(&self) -> usize {
        self.record.handled.lock().unwrap().len()
    }

    /// The error event `value` fails with at `attempt`, if it does.
    fn failure(&self, value: u64, attempt: u32) -> Option<String> {
        let failing = *self.failures.get(&value)?;
        if attempt > failing {
            return None;
        }
        Some(match failing {
            u32::MAX => format!("poison {value}"),
            _ => format!("attempt {attempt} at {value} fails"),
        })
    }
}

impl Listener<ScenarioEvent> for Probe {
    fn name(&self) -> &str {
        &self.name
    }

    fn interests(&self) -> KindSet<ScenarioEventKind> {
        self.interests.clone()
    }

    async fn handle(
        &self,
        event: Arc<Envelope<ScenarioEvent>>,
        meta: Meta,
    ) -> Result<(), HandlerError> {
        let call = Call {
            id: meta.id(),
            value: event.value(),
            attempt: meta.attempt(),
            event: event.event().clone(),
        };
        self.record.calls.lock().unwrap().push(call.clone());
        if self.hold == Some((call.value, call.attempt)) {
            self.gate.pass().await;
        }
        for _ in 0..self.yields {
            tokio::task::yield_now().await;
        }
        if let Some(error) = self.failure(call.value, call.attempt) {
            return Err(error.into());
        }
        self.record.handled.lock().unwrap().push(call);
        Ok(())
    }
}

/// A batch as a [`BatchProbe`] saw it: the attempt and the events' values.
pub(crate) type SeenBatch = (u32, Vec<u64>);

/// A batch listener that records every batch; its first batch waits at the
/// gate until [`open`](Self::open).
#[derive(Clone, Debug)]
pub(crate) struct BatchProbe {
    name: Arc<str>,
    gate: Gate,
    batches: Arc<Mutex<Vec<SeenBatch>>>,
}

impl BatchProbe {
    pub(crate) fn new(name: impl Into<Arc<str>>) -> Self {
        Self {
            name: name.into(),
            gate: Gate::closed(),
            batches: Arc::default(),
        }
    }

    pub(crate) fn open(&self) {
        self.gate.open();
    }

    /// Every batch so far, in the order they started.
    pub(crate) fn batches(&self) -> Vec<SeenBatch> {
        self.batches.lock().unwrap().clone()
    }

    /// How many events its batches have held so far.
    pub(crate) fn events(&self) -> usize {
        self.batches
            .lock()
            .unwrap()
            .iter()
            .map(|(_, values)| values.len())
            .sum()
    }
}

impl BatchListener<ScenarioEvent> for BatchProbe {
    fn name(&self) -> &str {
        &self.name
    }

    async fn handle_batch(&self, batch: &Batch<ScenarioEvent>) -> Result<(), BatchError> {
        let values = batch.iter().map(|event| event.value()).collect();
        let first = {
            let mut batches = self.batches.lock().unwrap();
            batches.push((batch.attempt(), values));
            batches.len() == 1
        };
        if first {
            self.gate.pass().await;
        }
        Ok(())
    }
}

/// What a derive handler is told of a call: the event's value and the
/// handler's [`Meta`].
pub(crate) type MetaCall = (u64, Meta);

/// A listener written with the derive: `#[listener]` on an impl of the
/// generated handler trait, whose methods declare `meta: Meta`.
#[derive(Clone, Debug, Default)]
pub(crate) struct MetaProbe {
    calls: Arc<Mutex<Vec<MetaCall>>>,
}

impl MetaProbe {
    pub(crate) fn calls(&self) -> Vec<MetaCall> {
        self.calls.lock().unwrap().clone()
    }

    fn saw(&self, value: u64, meta: Meta) -> Result<(), HandlerError> {
        self.calls.lock().unwrap().push((value, meta));
        Ok(())
    }
}

#[listener(name = "meta-probe")]
impl ScenarioEventHandler for MetaProbe {
    async fn on_user_created(&self, id: &u64, meta: Meta) -> Result<(), HandlerError> {
        self.saw(*id, meta)
    }

    async fn on_post_edited(
        &self,
        id: &u64,
        _revision: &u64,
        meta: Meta,
    ) -> Result<(), HandlerError> {
        self.saw(*id, meta)
    }
}
