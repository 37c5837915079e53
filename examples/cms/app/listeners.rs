//! The listeners this process runs, durable ones (spawned on the store,
//! named by the groups their checkpoints are kept under), those on
//! JetStream (with `NATS_URL`) and those of its bus, read together, with
//! the store's progress, for `/health`, `/metrics/json` and the shutdown
//! report.

use std::fmt;
use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use event_bus::nats::{Distributed, JetStream, JetStreamListener};
use event_bus::sql::{AnyStore, Durable, DurableListener, ListenerProgress};
use event_bus::{ListenerOptions, ListenerStatus, Spawnable};
use serde::Serialize;

use super::AppState;
use super::events::AppEvent;

/// The durable and JetStream listeners spawned in this process, in spawn
/// order.
#[derive(Default)]
pub(crate) struct Listeners {
    durable: Mutex<Vec<DurableListener>>,
    distributed: Mutex<Vec<JetStreamListener>>,
}

impl Listeners {
    /// Spawns `listener` on `store` and keeps its handle.
    pub(crate) async fn spawn<M, L: Spawnable<AppEvent, M>>(
        &self,
        store: &AnyStore<AppEvent>,
        listener: L,
        options: ListenerOptions,
        durable: Durable,
    ) -> Result<DurableListener, event_bus::sql::Error> {
        let spawned = store.spawn_with(listener, options, durable).await?;
        self.keep(spawned.clone());
        Ok(spawned)
    }

    /// Keeps the handle of a durable listener spawned elsewhere (the
    /// relay).
    pub(crate) fn keep(&self, listener: DurableListener) {
        self.durable
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(listener);
    }

    /// Spawns `listener` on `stream` and keeps its handle.
    pub(crate) async fn spawn_distributed<M, L: Spawnable<AppEvent, M>>(
        &self,
        stream: &JetStream<AppEvent>,
        listener: L,
        options: ListenerOptions,
        distributed: Distributed,
    ) -> Result<JetStreamListener, event_bus::nats::Error> {
        let spawned = stream.spawn_with(listener, options, distributed).await?;
        self.distributed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(spawned.clone());
        Ok(spawned)
    }

    fn all(&self) -> Vec<DurableListener> {
        self.durable
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn all_distributed(&self) -> Vec<JetStreamListener> {
        self.distributed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The JetStream listener named `name`, if this process runs it.
    #[allow(dead_code)] // for the tests
    pub(crate) fn distributed_named(&self, name: &str) -> Option<JetStreamListener> {
        self.all_distributed()
            .into_iter()
            .find(|l| l.name() == name)
    }

    /// The listener whose group is `group`, if this process runs it.
    pub(crate) fn by_group(&self, group: &str) -> Option<DurableListener> {
        self.all().into_iter().find(|l| l.group() == group)
    }

    /// The listener named `name`, if this process runs it.
    #[allow(dead_code)] // for the tests
    pub(crate) fn named(&self, name: &str) -> Option<DurableListener> {
        self.all().into_iter().find(|l| l.name() == name)
    }
}

/// One listener of this process as it stands: its counts in this process
/// and, for a durable one, its group's progress through the log (`None`
/// when the database did not say).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ListenerState {
    pub(crate) name: String,
    /// `"durable"`, `"jetstream"` or `"bus"`.
    pub(crate) tier: &'static str,
    /// The group a durable listener's checkpoint is kept under, or a
    /// JetStream listener's consumer serves.
    pub(crate) group: Option<String>,
    pub(crate) status: ListenerStatus,
    pub(crate) handled: u64,
    pub(crate) failed: u64,
    pub(crate) retried: u64,
    pub(crate) dead_lettered: u64,
    pub(crate) panicked: u64,
    /// Events the bus dropped for it (never, for a durable one).
    pub(crate) dropped: u64,
    /// What it has yet to handle: the events of the log past its
    /// checkpoint, those its consumer has not delivered, or those in its
    /// queue on the bus.
    pub(crate) lag: Option<u64>,
    /// Deliveries in progress or waiting for their retry.
    pub(crate) unfinished: Option<u64>,
    /// Its dead deliveries: of its group in the database, or in the bus's
    /// dead letters.
    pub(crate) dead_letters: Option<u64>,
}

/// How long the store's progress may take to read for a report.
const PROGRESS_DEADLINE: Duration = Duration::from_secs(2);

impl AppState {
    /// Spawns `listener` on the store, as one of this process's listeners.
    #[allow(dead_code)] // for the tests
    pub(crate) async fn spawn<M, L: Spawnable<AppEvent, M>>(
        &self,
        listener: L,
        options: ListenerOptions,
        durable: Durable,
    ) -> Result<DurableListener, event_bus::sql::Error> {
        self.listeners
            .spawn(&self.store, listener, options, durable)
            .await
    }

    /// Every listener of this process, the durable ones first, with their
    /// groups' progress, or the error that kept it from being read.
    pub(crate) async fn listener_states(&self) -> (Vec<ListenerState>, Option<String>) {
        let progress = match tokio::time::timeout(PROGRESS_DEADLINE, self.store.progress()).await {
            Ok(Ok(progress)) => Ok(progress),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("no answer within {PROGRESS_DEADLINE:?}")),
        };
        let mut states: Vec<ListenerState> = self
            .listeners
            .all()
            .iter()
            .map(|listener| {
                let report = listener.report();
                let group: Option<&ListenerProgress> = progress
                    .as_ref()
                    .ok()
                    .and_then(|p| p.iter().find(|p| p.listener == listener.group()));
                ListenerState {
                    name: listener.name().to_owned(),
                    tier: "durable",
                    group: Some(listener.group().to_owned()),
                    status: listener.status(),
                    handled: report.handled,
                    failed: report.failed,
                    retried: report.retried,
                    dead_lettered: report.dead_lettered,
                    panicked: report.panicked,
                    dropped: 0,
                    lag: group.map(|p| p.lag),
                    unfinished: group.map(|p| p.unfinished),
                    dead_letters: group.map(|p| p.dead),
                }
            })
            .collect();
        states.extend(self.distributed_states().await);
        let letters = self.bus.dead_letters().snapshot();
        states.extend(self.bus.metrics().listeners.iter().map(|l| ListenerState {
            name: l.name.clone(),
            tier: "bus",
            group: None,
            status: l.status,
            handled: l.handled,
            failed: l.failed,
            retried: l.retried,
            dead_lettered: l.dead_lettered,
            panicked: l.panicked,
            dropped: l.dropped,
            lag: Some(l.queue_depth as u64),
            unfinished: Some(l.in_flight as u64),
            dead_letters: Some(letters.iter().filter(|d| *d.listener == l.name).count() as u64),
        }));
        (states, progress.err())
    }

    /// This process's JetStream listeners, with what their consumers hold
    /// for them (`None` when the server did not say).
    async fn distributed_states(&self) -> Vec<ListenerState> {
        let mut states = Vec::new();
        for listener in self.listeners.all_distributed() {
            let report = listener.report();
            let pending = tokio::time::timeout(PROGRESS_DEADLINE, listener.pending())
                .await
                .ok()
                .and_then(Result::ok);
            states.push(ListenerState {
                name: listener.name().to_owned(),
                tier: "jetstream",
                group: Some(listener.group().to_owned()),
                status: listener.status(),
                handled: report.handled,
                failed: report.failed,
                retried: report.retried,
                dead_lettered: report.dead_lettered,
                panicked: report.panicked,
                dropped: 0,
                lag: pending.map(|(waiting, _)| waiting),
                unfinished: pending.map(|(_, out)| out),
                dead_letters: None,
            });
        }
        states
    }

    /// Waits until every listener of the store has handled (or given up
    /// on) everything committed so far, for the tests and `--seed`.
    pub(crate) async fn idle(&self) -> Result<(), event_bus::sql::Error> {
        self.store.idle().await
    }

    /// Finishes the writes in flight, then stops the listeners: the
    /// durable ones each handle what the log holds for it within
    /// `deadline` (what is left stays in the log for the next start), the
    /// bus drains its queues; then the JetStream ones drain (what is left
    /// stays in the stream).
    pub(crate) async fn shutdown(&self, deadline: Duration) -> Report {
        self.writes_done().await;
        let (bus, store) = tokio::join!(self.bus.shutdown(deadline), self.store.shutdown(deadline));
        drop(store);
        // After the store: the relay has published what it took.
        if let Some(stream) = &self.nats {
            stream.shutdown(deadline).await;
        }
        let (mut listeners, error) = self.listener_states().await;
        // The bus's report says what it left undelivered.
        listeners.retain(|l| l.tier != "bus");
        listeners.extend(bus.listeners.iter().map(|l| ListenerState {
            name: l.name.clone(),
            tier: "bus",
            group: None,
            status: l.status,
            handled: l.handled,
            failed: l.failed,
            retried: l.failed.saturating_sub(l.dead_lettered),
            dead_lettered: l.dead_lettered,
            panicked: 0,
            dropped: l.dropped,
            lag: Some(l.undelivered),
            unfinished: None,
            dead_letters: None,
        }));
        Report { listeners, error }
    }
}

/// What the listeners did in this process, once stopped: the Ctrl-C report.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) listeners: Vec<ListenerState>,
    /// Why the log's progress could not be read, if it could not.
    pub(crate) error: Option<String>,
}

impl Report {
    /// Whether every listener drained: it ended on its own, dropped
    /// nothing and left nothing unhandled.
    #[allow(dead_code)] // for the tests
    pub(crate) fn drained(&self) -> bool {
        self.error.is_none() && self.listeners.iter().all(|l| l.drained())
    }

    #[allow(dead_code)] // for the tests
    pub(crate) fn listener(&self, name: &str) -> Option<&ListenerState> {
        self.listeners.iter().find(|l| l.name == name)
    }
}

impl ListenerState {
    fn drained(&self) -> bool {
        self.status == ListenerStatus::Drained && self.lag == Some(0) && self.dropped == 0
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let drained = self.listeners.iter().filter(|l| l.drained()).count();
        write!(f, "{drained} of {} listeners drained", self.listeners.len())?;
        match &self.error {
            Some(error) => write!(f, "; the log's progress unread: {error}"),
            None => {
                let left: u64 = self.listeners.iter().filter_map(|l| l.lag).sum();
                write!(f, ", {left} events left unhandled")
            }
        }
    }
}

/// This data directory's name among the processes on one database: a
/// random id kept in `{data_dir}/instance`, made at its first start.
///
/// The search index and the cache are this process's own, so their
/// listeners need every event, not a share of a group's: each takes a
/// group of its own, named after the instance. A name per data directory
/// rather than per start keeps the search index's checkpoint across
/// restarts (it goes on where it stopped) and keeps the database from
/// collecting a group per start.
pub(crate) fn instance(data_dir: &Path) -> std::io::Result<String> {
    let file = data_dir.join("instance");
    match std::fs::read_to_string(&file) {
        Ok(id) if uuid::Uuid::parse_str(id.trim()).is_ok() => Ok(id.trim().to_owned()),
        Ok(_) | Err(_) => {
            let id = uuid::Uuid::new_v4().to_string();
            std::fs::write(&file, &id)?;
            Ok(id)
        }
    }
}
